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

source "$CLIENT_SUITES_SUPPORT/node.sh"

suite_setup() {
    node_suite_setup
}

suite_run() {
    URL="$AMQP_URL" node_suite_run "$1" --test --test-timeout=20000 test/*.test.js
}
