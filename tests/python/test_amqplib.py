"""amqplib (Node.js) against Warren: runs tests/node/roundtrip.test.js.

scripts/test.sh installs their dependencies (`npm ci` in tests/node). Node.js
is a requirement of the test suite, not an option: without it this test fails
and says so, rather than skipping and leaving amqplib untested.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

NODE_TESTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "node"
# amqplib needs 18; the node:test runner has --test-reporter from 18.15 on.
MIN_NODE = (18, 15)
MIN_NODE_TEXT = ".".join(map(str, MIN_NODE))
NODE_TIMEOUT_S = 150

pytestmark = pytest.mark.timeout(NODE_TIMEOUT_S + 30)


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"`node` is not on PATH: the amqplib tests need Node.js >= {MIN_NODE_TEXT} "
            f"(on Debian: apt-get install -y nodejs npm), then `npm ci` in {NODE_TESTS_DIR}",
            pytrace=False,
        )
    version = subprocess.run(
        [node, "--version"], stdout=subprocess.PIPE, text=True, check=True, timeout=30
    ).stdout.strip()
    m = re.match(r"v(\d+)\.(\d+)\.", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_NODE:
        pytest.fail(
            f"{node} is Node.js {version}; the amqplib tests need >= {MIN_NODE_TEXT}",
            pytrace=False,
        )
    if not (NODE_TESTS_DIR / "node_modules" / "amqplib").is_dir():
        pytest.fail(
            f"amqplib is not installed: run `npm ci` in {NODE_TESTS_DIR} "
            f"(scripts/test.sh does this)",
            pytrace=False,
        )
    return node


def test_amqplib_confirms_and_manual_acks(broker):
    node = node_binary()
    env = dict(os.environ)
    env["WARREN_AMQP_URL"] = f"amqp://guest:guest@{broker.host}:{broker.port}/%2f"
    env["NO_COLOR"] = "1"
    # The amqplib file only: the other one in tests/node, dashboard.test.js,
    # needs the HTTP side and a browser and is run by test_dashboard.py.
    try:
        run = subprocess.run(
            # TAP explicitly: the default reporter differs between versions.
            [node, "--test", "--test-reporter=tap", "roundtrip.test.js"],
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
            f"node --test did not finish within {NODE_TIMEOUT_S}s. Its output:\n{output}",
            pytrace=False,
        )

    assert run.returncode == 0, f"node --test exited {run.returncode}. Its output:\n{run.stdout}"
    # The TAP summary: a runner that found no test files must not pass.
    tests = re.search(r"^# tests (\d+)$", run.stdout, re.MULTILINE)
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.MULTILINE)
    assert tests and passed, f"no TAP summary in node's output:\n{run.stdout}"
    assert int(tests.group(1)) > 0, f"node --test ran no tests:\n{run.stdout}"
    assert passed.group(1) == tests.group(1), run.stdout
