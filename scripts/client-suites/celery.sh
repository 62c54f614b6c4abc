# celery: https://github.com/celery/celery, made for commit
# 5dc781f0bd5f36186bfcc74e0a4f9f654452c69b (main, 2026-08-08, celery 5.6.2+).
# Checkout: git clone https://github.com/celery/celery SUITES_DIR/celery
#
# Runs t/integration as CI's tox env "integration-rabbitmq" does:
# TEST_BROKER=pyamqp://..., TEST_BACKEND=rpc (results travel over AMQP too,
# so no redis is needed; the tests that need a redis backend skip
# themselves), one pytest run per test module as CI's matrix does, each
# with the session worker (prefork pool) that celery.contrib.pytest starts
# in-process. Differences from CI: kombu comes from PyPI (CI installs
# kombu's git main), without -x, and without the optional backends' client
# libraries that need compiling (pylibmc), and with `-p celery.contrib.pytest`
# (CI gets celery's pytest fixtures through pytest-celery[all], which pulls
# in docker's client). test_backend.py needs AZUREBLOCKBLOB_URL and skips.
# CI's reruns of tests marked flaky (OSError/ConnectionError/TimeoutError
# only) are kept.

suite_setup() {
    if [ ! -x .venv/bin/pytest ]; then
        python3 -m venv .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check -e . 'kombu[redis]' \
        'pytest==9.0.3' 'pytest-rerunfailures>=15.0' 'pytest-subtests>=0.14.1' \
        'pytest-timeout==2.4.0' 'pytest-order==1.4.0' 'pytest-click==1.1.0' \
        -r requirements/extras/pydantic.txt -r requirements/extras/auth.txt \
        -r requirements/extras/django.txt -r requirements/extras/msgpack.txt \
        -r requirements/extras/yaml.txt -r requirements/extras/azureblockblob.txt \
        sqlalchemy
}

suite_run() {
    local log="$1" dir=".junit-integration" mod xmls=()
    rm -rf "$dir"
    mkdir -p "$dir"
    export TEST_BROKER="pyamqp://guest:guest@$AMQP_HOST:$AMQP_PORT//"
    export TEST_BACKEND="rpc"
    export WORKER_LOGLEVEL=INFO PYTHONIOENCODING=UTF-8 PYTHONUNBUFFERED=1 \
        PYTHONDONTWRITEBYTECODE=1 BOTO_CONFIG=/dev/null
    export PATH="$PWD/.venv/bin:$PATH"   # test_worker runs the `celery` command
    local deadline=$((SECONDS + 2400))
    for mod in t/integration/test_*.py; do
        local name xml left
        name="$(basename "$mod" .py)"
        xml="$dir/$name.xml"
        xmls+=("$xml")
        left=$((deadline - SECONDS))
        if [ "$left" -le 30 ]; then
            echo "=== $mod: not run, the suite's time is up" >>"$log"
            continue
        fi
        [ "$left" -gt 1200 ] && left=1200
        echo "=== $mod (timeout ${left}s)" >>"$log"
        timeout -k 10 "$left" .venv/bin/pytest -svv -p no:cacheprovider -p celery.contrib.pytest \
            --timeout=300 --junitxml="$xml" "$mod" >>"$log" 2>&1 || true
    done
    python3 "$CLIENT_SUITES_SUPPORT/junit_counts.py" "${xmls[@]}"
}
