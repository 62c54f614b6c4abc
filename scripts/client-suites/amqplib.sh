# amqplib's own test suite (Node's test runner), for scripts/client-suites.sh.
# Made for github.com/amqp-node/amqplib at commit
# f7503e571a80dacfc863c2690ab797d31667b868 (main, v2.0.1); the checkout is a
# plain clone of that repository: git clone https://github.com/amqp-node/amqplib
#
# The tests take the broker from $URL in channel_api.test.js, but
# callback_api.test.js and connect.test.js connect to the library's default
# amqp://localhost (port 5672), so a preload (NODE_OPTIONS --require) sends
# every TCP connection aimed at port 5672 to $AMQP_PORT instead; nothing in
# the checkout is edited. Counts come from the TAP reporter's closing summary
# (cancelled tests, e.g. timeouts and failed hooks, count as failed).

suite_setup() {
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
        npm ci --ignore-scripts --no-audit --no-fund
    fi
}

suite_run() {
    local log="$1" tap=".client-suites-results.tap"
    rm -f "$tap"
    URL="$AMQP_URL" NODE_OPTIONS="--require $CLIENT_SUITES_SUPPORT/redirect-5672.js" \
        timeout 900 node --test --test-timeout=20000 \
        --test-reporter=spec --test-reporter-destination=stdout \
        --test-reporter=tap --test-reporter-destination="$tap" \
        test/*.test.js >>"$log" 2>&1 || true
    cat "$tap" >>"$log" 2>/dev/null || true
    awk -f "$CLIENT_SUITES_SUPPORT/tap_counts.awk" "$tap"
}
