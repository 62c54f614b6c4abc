# lapin: https://github.com/amqp-rs/lapin, made for commit
# 70611e8f4085da2f15acaa781fc2bf79bf36b484 (main, tag v4.7.4).
# Checkout: git clone https://github.com/amqp-rs/lapin SUITES_DIR/lapin
#
# Runs lapin's integration tests (tests/*.rs: connection, publisher_confirms,
# runtime_isolation, tokio, smol, conn_refused) with the default features
# plus `smol` (so that tests/smol.rs is built too), against $AMQP_ADDR as
# lapin's CI does against its RabbitMQ service. The library's unit tests
# and doc tests (no_run) do not talk to a broker and are not run.
# conn_refused expects nothing to listen on localhost:5673.
# Counts come from libtest's "test result:" summary of each test binary.
# Builds with cargo under nice into ./target (CARGO_TARGET_DIR), using the
# checkout's Cargo.lock.

suite_setup() {
    CARGO_TARGET_DIR=./target nice -n 19 cargo test --locked --features smol \
        --tests --no-run -j 2
}

suite_run() {
    local log="$1" out=".suite-output.txt"
    export AMQP_ADDR="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
    local rc=0
    CARGO_TARGET_DIR=./target RUST_LOG="${RUST_LOG:-info}" \
        timeout -k 10 600 cargo test --locked --features smol --test '*' \
        --no-fail-fast -- --color never >"$out" 2>&1 || rc=$?
    cat "$out" >>"$log"
    echo "lapin: cargo test exited with $rc" >>"$log"
    python3 - "$out" "$rc" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
p = f = s = 0
for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
    p += int(m.group(1)); f += int(m.group(2)); s += int(m.group(3))
# A test binary that crashed or timed out prints no summary: count its
# tests ("test NAME ..." lines without a result, or "running N tests").
running = sum(int(n) for n in re.findall(r"^running (\d+) tests?$", text, re.M))
if running > p + f + s:
    f += running - (p + f + s)
print(p, f, s)
PY
}
