# rabbitmq-client's own test suite (Node's test runner with ts-node, as its
# package.json "test" script), for scripts/client-suites.sh.
# Made for github.com/cody-greene/node-rabbitmq-client at commit
# 2729343807acedde3ac0b80adc2fc5c5b5d3f2a0 (master, v5.0.8); the checkout is
# a plain clone: git clone https://github.com/cody-greene/node-rabbitmq-client
#
# The tests take the broker from $RABBITMQ_URL, except two that name port
# 5672 outright (a wrong password on 127.0.0.1:5672, and a URL built from
# the library's default); a preload (NODE_OPTIONS --require) sends every TCP
# connection aimed at port 5672 to $AMQP_PORT instead, so nothing in the
# checkout is edited. Counts come from the TAP reporter's closing summary
# (cancelled tests, e.g. timeouts and failed hooks, count as failed).

source "$CLIENT_SUITES_SUPPORT/node.sh"

suite_setup() {
    node_suite_setup
}

suite_run() {
    RABBITMQ_URL="$AMQP_URL" node_suite_run "$1" -r ts-node/register --test --test-timeout=60000 test/*.ts
}
