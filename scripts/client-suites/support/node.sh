# What the Node.js suites (amqplib, rabbitmq-client) share; sourced by their
# suite files.

# Installs the checkout's locked dependencies, without their install scripts.
node_suite_setup() {
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
        npm ci --ignore-scripts --no-audit --no-fund
    fi
}

# node_suite_run LOG NODE_ARGS...: runs `node NODE_ARGS...` (Node's test
# runner) with connections to port 5672 sent to $AMQP_PORT, within 900 s,
# and prints the counts from its TAP report.
node_suite_run() {
    local log="$1" tap=".client-suites-results.tap"
    shift
    rm -f "$tap"
    NODE_OPTIONS="--require $CLIENT_SUITES_SUPPORT/redirect-5672.js" \
        timeout 900 node \
        --test-reporter=spec --test-reporter-destination=stdout \
        --test-reporter=tap --test-reporter-destination="$tap" "$@" >>"$log" 2>&1 || true
    cat "$tap" >>"$log" 2>/dev/null || true
    awk -f "$CLIENT_SUITES_SUPPORT/tap_counts.awk" "$tap"
}
