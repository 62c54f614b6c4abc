# Client suite: kombu (https://github.com/celery/kombu), made for commit
# 9ee8595b835c77b4f04cfb54b40b5d446f985a35 (v5.6.2-104, default branch).
# Checkout: git clone https://github.com/celery/kombu SUITES_DIR/kombu
#
# Runs kombu's RabbitMQ integration tests (t/integration/test_py_amqp.py,
# `-E py-amqp`, the py-amqp transport; kombu has no pika transport any more)
# in a virtualenv at ./.venv. The tests read the broker from RABBITMQ_HOST
# and RABBITMQ_5672_TCP. Upstream marks them flaky (5 reruns); here
# pytest-rerunfailures is turned off so that every failure is counted.
# Counts come from pytest's JUnit XML, kept next to LOG as NAME.junit.xml.

suite_setup() {
    if [ ! -f .venv/.suite-ready ]; then
        rm -rf .venv
        python3.11 -m venv .venv
        .venv/bin/pip install -q -U pip
        .venv/bin/pip install -q "pytest==9.0.2" pytest-timeout -e .
        touch .venv/.suite-ready
    fi
}

suite_run() {
    local log="$1" junit="${1%.log}.junit.xml" rc
    rm -f "$junit"
    RABBITMQ_HOST="$AMQP_HOST" RABBITMQ_5672_TCP="$AMQP_PORT" \
        timeout 900 .venv/bin/python -m pytest -v -E py-amqp \
        t/integration/test_py_amqp.py -p no:cacheprovider -p no:rerunfailures \
        --timeout=120 -rfE --junitxml="$junit" >>"$log" 2>&1
    rc=$?
    echo "pytest exit status $rc" >>"$log"
    python3 "$CLIENT_SUITES_SUPPORT/junit_counts.py" "$junit"
}
