# Client suite: pika (https://github.com/pika/pika), made for commit
# 2126d43a76c14fb8d365d96bd1bdcef13dad75b5 (1.4.0-577, default branch).
# Checkout: git clone https://github.com/pika/pika SUITES_DIR/pika
#
# Runs pika's acceptance tests (tests/acceptance: blocking, select/asyncio/
# tornado/twisted/gevent adapters, thread-safe connection) with pytest, one
# process, in a virtualenv at ./.venv. The tests hard-code 127.0.0.1:5672,
# so suite_run rewrites that port to $AMQP_PORT in the checkout's test files
# and restores them afterwards. TLS variants (--use-tls) are not run.
# Counts come from pytest's JUnit XML, kept next to LOG as NAME.junit.xml.

suite_setup() {
    if [ ! -f .venv/.suite-ready ]; then
        rm -rf .venv
        python3.11 -m venv .venv
        .venv/bin/pip install -q -U pip
        .venv/bin/pip install -q pytest pytest-timeout gevent tornado twisted
        touch .venv/.suite-ready
    fi
}

suite_run() {
    local log="$1" junit="${1%.log}.junit.xml" files rc
    files="tests/acceptance tests/base tests/misc"
    git checkout -q -- $files
    grep -rlw 5672 $files | xargs -r sed -i "s/\\b5672\\b/$AMQP_PORT/g"
    rm -f "$junit"
    timeout 1500 .venv/bin/python -m pytest tests/acceptance \
        -p no:cacheprovider --timeout=120 -rfE \
        --junitxml="$junit" >>"$log" 2>&1
    rc=$?
    echo "pytest exit status $rc" >>"$log"
    git checkout -q -- $files
    python3 "$CLIENT_SUITES_SUPPORT/junit_counts.py" "$junit"
}
