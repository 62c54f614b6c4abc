# Client suite: aio-pika (https://github.com/mosquito/aio-pika), made for
# commit 0a9f24c9349f9158a959bf1e64d2c909350727d7 (9.6.0-5, default branch).
# Checkout: git clone https://github.com/mosquito/aio-pika SUITES_DIR/aio-pika
#
# Runs aio-pika's pytest suite (tests/, as its CI does: aiomisc-pytest,
# 120 s per test) in a virtualenv at ./.venv with the versions pinned in its
# uv.lock. Its conftest starts RabbitMQ in docker; suite_run appends to
# tests/conftest.py an override that skips the docker check and points the
# rabbitmq_container fixture at $AMQP_URL, and restores the file afterwards.
# tests/test_amqps.py is left out: it needs a TLS listener on 5671.
# Counts come from pytest's JUnit XML, kept next to LOG as NAME.junit.xml.

suite_setup() {
    if [ ! -f .venv/.suite-ready ]; then
        rm -rf .venv
        python3.11 -m venv .venv
        .venv/bin/pip install -q -U pip
        .venv/bin/pip install -q "aiormq==6.9.2" "pamqp==3.3.0" "yarl==1.22.0" \
            "aiomisc==18.0.6" "aiomisc-pytest==2.0.0" "pytest==9.0.2" \
            "shortuuid==1.0.13" "timeout-decorator==0.5.0" pytest-timeout
        .venv/bin/pip install -q --no-deps -e .
        touch .venv/.suite-ready
    fi
}

suite_run() {
    local log="$1" junit="${1%.log}.junit.xml" rc
    git checkout -q -- tests/conftest.py
    cat >>tests/conftest.py <<'PY'


# Added by Warren's scripts/client-suites/aio-pika.sh: use the broker at
# $AMQP_URL instead of a docker container.
import os as _os  # noqa: E402

if _os.environ.get("AMQP_URL"):
    def pytest_configure(config):  # noqa: F811
        pass

    @pytest.fixture(scope="session")
    def rabbitmq_container() -> ContainerInfo:  # noqa: F811
        url = URL(_os.environ["AMQP_URL"])
        return ContainerInfo(
            id="external", host=url.host,
            ports={"5672/tcp": url.port, "5671/tcp": 5671},
        )
PY
    rm -f "$junit"
    timeout 1500 .venv/bin/python -m pytest tests -v -p no:cacheprovider \
        --ignore=tests/test_amqps.py --aiomisc-test-timeout=120 --timeout=300 \
        -rfE --junitxml="$junit" >>"$log" 2>&1
    rc=$?
    echo "pytest exit status $rc" >>"$log"
    git checkout -q -- tests/conftest.py
    python3 "$CLIENT_SUITES_SUPPORT/junit_counts.py" "$junit"
}
