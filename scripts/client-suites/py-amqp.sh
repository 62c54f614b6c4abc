# py-amqp: https://github.com/celery/py-amqp, made for commit
# a03ad34f9b620773f50a4e19f26382bc23140e63 (main, 2026-07-04, after 5.3.1).
# Checkout: git clone https://github.com/celery/py-amqp SUITES_DIR/py-amqp
#
# Runs t/integration as its CI does (pytest -E rabbitmq), in one process
# (CI's `-n2` would make each xdist worker use a vhost named after it, gw0
# and gw1, which CI's RabbitMQ image creates and a fresh broker has not).
# Deselected: the TLS tests (the `tls` parametrisation of the connection
# fixture and test_tls_connect_fails need a TLS listener on 5671 with the
# repository's t/certs, which the driver's brokers do not have) and the two
# that connect to tls-v1-2.badssl.com (no internet). test_integration.py
# runs against mocked sockets, so it passes whatever the broker.
# pytest-rerunfailures is disabled so that a flaky difference shows.

suite_setup() {
    if [ ! -x .venv/bin/pytest ]; then
        python3 -m venv .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check -e . -r requirements/test.txt pytest-timeout
}

suite_run() {
    local log="$1" xml=".junit-integration.xml"
    rm -f "$xml"
    RABBITMQ_HOST=localhost RABBITMQ_5672_TCP="$AMQP_PORT" \
        timeout 900 .venv/bin/pytest -v -E rabbitmq t/integration \
        -p no:rerunfailures -p no:sugar -p no:cacheprovider \
        --timeout=120 \
        -k 'not tls and not badssl' \
        --junitxml="$xml" >>"$log" 2>&1 || true
    python3 "$CLIENT_SUITES_SUPPORT/junit_counts.py" "$xml"
}
