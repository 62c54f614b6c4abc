"""The web dashboard in Chromium: runs tests/node/dashboard.test.js,
tests/node/policies.test.js and tests/node/models.test.js.

That node:test file drives Debian's Chromium (/usr/bin/chromium, or
CHROMIUM_PATH) with playwright-core: it logs in, watches a queue filled over
AMQP reach its depth in the queues table, gets a message through the queue
page and checks that the overview draws its charts. Screenshots go to
<repo>/artifacts (dashboard-queues.png, dashboard-overview.png).
models.test.js, against a broker of its own serving tests/models/tiny-cnn.onnx
on tract and on ONNX Runtime, checks that the models page names each
model's backend and flags the one on tract (dashboard-models.png).

scripts/test.sh installs the requirements: `npm ci` in tests/node and, as
root with apt-get, Debian's `chromium` package. Like the amqplib test, a
missing requirement fails this test and says what is missing rather than
skipping it.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from conftest import start_broker
from test_http_inference import onnxruntime_library

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_TESTS_DIR = REPO_ROOT / "tests" / "node"
TEST_FILE = "dashboard.test.js"
MODELS_TEST_FILE = "models.test.js"
ARTIFACTS_DIR = REPO_ROOT / "artifacts"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# playwright-core (tests/node/package.json) needs Node.js 20.
MIN_NODE = (20, 0)
MIN_NODE_TEXT = ".".join(map(str, MIN_NODE))
NODE_TIMEOUT_S = 150

pytestmark = [
    pytest.mark.timeout(NODE_TIMEOUT_S + 30),
    pytest.mark.warren_only("the dashboard is Warren's own"),
]


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"`node` is not on PATH: the dashboard test needs Node.js >= {MIN_NODE_TEXT}, "
            f"then `npm ci` in {NODE_TESTS_DIR}",
            pytrace=False,
        )
    version = subprocess.run(
        [node, "--version"], stdout=subprocess.PIPE, text=True, check=True, timeout=30
    ).stdout.strip()
    m = re.match(r"v(\d+)\.(\d+)\.", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_NODE:
        pytest.fail(
            f"{node} is Node.js {version}; the dashboard test (playwright-core) needs "
            f">= {MIN_NODE_TEXT}",
            pytrace=False,
        )
    for package in ("playwright-core", "amqplib"):
        if not (NODE_TESTS_DIR / "node_modules" / package).is_dir():
            pytest.fail(
                f"{package} is not installed: run `npm ci` in {NODE_TESTS_DIR} "
                f"(scripts/test.sh does this)",
                pytrace=False,
            )
    return node


def chromium_binary() -> str:
    chromium = os.environ.get("CHROMIUM_PATH") or DEFAULT_CHROMIUM
    if not os.access(chromium, os.X_OK):
        pytest.fail(
            f"Chromium not found at {chromium}: the dashboard test needs it (on Debian, as "
            f"root: apt-get install -y chromium; scripts/test.sh does this), or set "
            f"CHROMIUM_PATH to a Chromium or Chrome binary",
            pytrace=False,
        )
    return chromium


def run_node_test(test_file: str, env_extra: dict, screenshots: list) -> None:
    """Runs one node:test file against Chromium; it must pass at least one
    test and leave its screenshots."""
    node = node_binary()
    chromium = chromium_binary()
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    for shot in screenshots:  # so that a stale one from an earlier run does not count
        shot.unlink(missing_ok=True)

    env = dict(os.environ)
    env.update(env_extra)
    env["CHROMIUM_PATH"] = chromium
    env["WARREN_ARTIFACTS_DIR"] = str(ARTIFACTS_DIR)
    env["NO_COLOR"] = "1"
    try:
        run = subprocess.run(
            # TAP explicitly: the default reporter differs between versions.
            [node, "--test", "--test-reporter=tap", test_file],
            cwd=str(NODE_TESTS_DIR),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=NODE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout or ""
        if isinstance(output, bytes):
            output = output.decode("utf-8", "replace")
        pytest.fail(
            f"node --test {test_file} did not finish within {NODE_TIMEOUT_S}s. "
            f"Its output:\n{output}",
            pytrace=False,
        )

    assert run.returncode == 0, (
        f"node --test {test_file} exited {run.returncode}. Its output:\n{run.stdout}"
    )
    # The TAP summary: a run that found no test must not pass.
    tests = re.search(r"^# tests (\d+)$", run.stdout, re.MULTILINE)
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.MULTILINE)
    assert tests and passed, f"no TAP summary in node's output:\n{run.stdout}"
    assert int(tests.group(1)) > 0, f"node --test ran no tests:\n{run.stdout}"
    assert passed.group(1) == tests.group(1), run.stdout
    for shot in screenshots:
        assert shot.is_file(), f"no screenshot {shot}:\n{run.stdout}"


def test_dashboard_in_chromium(broker):
    assert broker.http_url is not None, (
        "warren did not log 'HTTP listener ready addr=HOST:PORT' before "
        "'AMQP listener ready'"
    )
    run_node_test(
        TEST_FILE,
        {"WARREN_HTTP_URL": broker.http_url, "WARREN_AMQP_URL": broker.url},
        [ARTIFACTS_DIR / "dashboard-queues.png", ARTIFACTS_DIR / "dashboard-overview.png"],
    )


def test_policies_page_in_chromium(broker):
    run_node_test(
        "policies.test.js",
        {"WARREN_HTTP_URL": broker.http_url},
        [ARTIFACTS_DIR / "dashboard-policies.png"],
    )


TRACT_MODEL = "cnn-on-tract"
ORT_MODEL = "cnn-on-onnxruntime"


def models_config() -> str:
    """tests/models/tiny-cnn.onnx served twice: on tract and on ONNX Runtime."""
    model = (REPO_ROOT / "tests" / "models" / "tiny-cnn.onnx").resolve()
    entries = []
    for name, backend, library in ((TRACT_MODEL, "tract", None),
                                   (ORT_MODEL, "onnxruntime", onnxruntime_library())):
        entry = f"""
[[model]]
name = "{name}"
path = "{model}"
task = "tensor"
queue = "dashboard-{name}"

[model.runtime]
backend = "{backend}"
"""
        if library is not None:
            entry += f'onnxruntime_library = "{library}"\n'
        entries.append(entry)
    return "".join(entries)


def test_models_page_in_chromium(tmp_path):
    broker = start_broker(tmp_path, models_config())
    try:
        assert broker.http_url is not None, broker.log(tail=50)
        run_node_test(
            MODELS_TEST_FILE,
            {"WARREN_HTTP_URL": broker.http_url, "WARREN_TRACT_MODEL": TRACT_MODEL,
             "WARREN_ORT_MODEL": ORT_MODEL},
            [ARTIFACTS_DIR / "dashboard-models.png"],
        )
    finally:
        broker.close_connections()
        broker.stop()
        broker.finish()
