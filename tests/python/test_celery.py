"""Celery end to end: a real worker and a real client against Warren.

Celery runs with its default configuration apart from the broker URL and the
`rpc://` result backend (tests/python/celery_app.py), so these tests exercise
what Celery does against RabbitMQ out of the box: the default pyamqp
transport, the worker's default startup (mingle, gossip, heartbeats), the
prefork pool, ETA tasks held unacked while the worker raises its prefetch,
results sent back on the client's reply queue, and remote control over the
pidbox fanout exchange. The worker must log no warning or error.

On failure the worker's log is printed (pytest shows it as the teardown's
captured stdout) and kept in the test's tmp dir as celery-worker.log.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

import pytest

import celery_app

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
WORKER_NAME = "worker@warren-test"
WORKER_READY_TIMEOUT_S = 60.0
WORKER_SHUTDOWN_TIMEOUT_S = 30.0
RESULT_TIMEOUT_S = 30.0
COUNTDOWN_S = 3.0
# A worker log line at WARNING or above: "[2024-01-01 12:00:00,000: ERROR/MainProcess] ..."
WORKER_COMPLAINT_RE = re.compile(r"^\[[^\]]*: (WARNING|ERROR|CRITICAL)/")

# Celery reads these before the app's own settings; one left in a developer's
# shell would send the worker and the client to some other broker.
CELERY_OVERRIDE_ENV = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


def celery_env(broker_url: str) -> dict:
    """Environment for a `celery -A celery_app ...` subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in CELERY_OVERRIDE_ENV}
    env[celery_app.BROKER_URL_ENV] = broker_url
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p
    )
    # Log lines must reach the reader as they are written, not at exit.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def celery_cmd(*args: str) -> List[str]:
    # The interpreter running pytest, so the worker uses the same venv.
    return [sys.executable, "-m", "celery", "-A", "celery_app", *args]


class Worker:
    """A `celery worker` subprocess whose output is collected as it runs."""

    def __init__(self, broker_url: str, workdir: pathlib.Path):
        self.log_path = workdir / "celery-worker.log"
        self._lines: List[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_re = re.compile(re.escape(WORKER_NAME) + r" ready\.")
        self.proc = subprocess.Popen(
            celery_cmd(
                "worker",
                "--loglevel=info",
                f"--hostname={WORKER_NAME}",
                # The default pool, with its size fixed rather than one child
                # per CPU of whatever machine runs the tests.
                "--pool=prefork",
                "--concurrency=2",
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=celery_env(broker_url),
            cwd=str(workdir),
            # Its own process group, so that a worker that ignores SIGTERM
            # can be killed with its pool children.
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._drain, name="celery-worker-output", daemon=True
        )
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w", encoding="utf-8") as log_file:
            for raw in self.proc.stdout:
                line = raw.rstrip("\r\n")
                with self._lock:
                    self._lines.append(line)
                log_file.write(line + "\n")
                log_file.flush()
                if self._ready_re.search(line):
                    self._ready.set()

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def wait_ready(self) -> None:
        """Wait for the worker's "<name> ready." line: it is then consuming."""
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2.0)
                raise AssertionError(
                    f"celery worker exited with status {self.proc.returncode} "
                    f"before it was ready. Its log:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"celery worker did not log '{WORKER_NAME} ready.' within "
                    f"{WORKER_READY_TIMEOUT_S:.0f}s. Its log:\n{self.log()}"
                )

    def stop(self) -> Optional[int]:
        """SIGTERM (Celery's warm shutdown); the exit status, None if killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WORKER_SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # The whole process group: the prefork children too.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self._reader.join(2.0)
                return None
        self._reader.join(2.0)
        return self.proc.returncode


def amqp_url(broker) -> str:
    # Celery's URL form: the vhost "/" is the path after the first "/".
    return f"amqp://guest:guest@{broker.host}:{broker.port}//"


@pytest.fixture
def worker(broker, tmp_path):
    w = Worker(amqp_url(broker), tmp_path)
    try:
        w.wait_ready()
        yield w
    finally:
        status = w.stop()
        # Shown by pytest only when the test fails.
        print(f"----- celery worker log ({w.log_path}) -----\n{w.log()}")
    if status is None:
        pytest.fail(
            f"celery worker did not exit within {WORKER_SHUTDOWN_TIMEOUT_S:.0f}s of "
            f"SIGTERM (killed)",
            pytrace=False,
        )
    if status != 0:
        pytest.fail(f"celery worker exited with status {status} after SIGTERM", pytrace=False)
    # Celery recovers from many broker faults by itself (a channel error, a
    # lost connection: it logs them and reconnects), so a passing test could
    # hide one. Its own log lines above INFO show them.
    complaints = [line for line in w.log().splitlines() if WORKER_COMPLAINT_RE.match(line)]
    if complaints:
        pytest.fail(
            "celery worker logged warnings or errors:\n" + "\n".join(complaints),
            pytrace=False,
        )


@pytest.fixture
def app(broker, worker, monkeypatch):
    """The client side: a Celery app connected to the broker the worker uses."""
    for name in CELERY_OVERRIDE_ENV:
        monkeypatch.delenv(name, raising=False)
    client = celery_app.create_app(amqp_url(broker))
    try:
        yield client
    finally:
        # app.close() only drops the connection pool; close the connections
        # themselves, so that they end with a closing handshake before the
        # broker fixture stops Warren.
        results = client.backend.result_consumer
        if results._consumer is not None:  # started by the first .get()
            results.stop()
        client.pool.force_close_all()
        client.close()


def test_delay_and_apply_async_return_results(app):
    add = app.tasks["celery_app.add"]

    assert add.delay(2, 3).get(timeout=RESULT_TIMEOUT_S) == 5
    assert add.apply_async((40,), {"y": 2}).get(timeout=RESULT_TIMEOUT_S) == 42

    # Many in flight at once: the worker prefetches several, both pool
    # children run them, and the results come back on the one reply queue
    # in whatever order they finish; each must reach its own AsyncResult.
    pending = [(i, add.delay(i, 1000 * i)) for i in range(50)]
    got = {i: r.get(timeout=RESULT_TIMEOUT_S) for i, r in pending}
    assert got == {i: 1001 * i for i in range(50)}


def test_priority_is_delivered_to_the_task(app):
    delivery = app.tasks["celery_app.delivery"]

    plain = delivery.delay().get(timeout=RESULT_TIMEOUT_S)
    urgent = delivery.apply_async(priority=7).get(timeout=RESULT_TIMEOUT_S)

    # Celery sends a task for its default queue "celery" (bound to a direct
    # exchange of the same name) through the default exchange, routing key
    # "celery"; basic.deliver must report both as published.
    for info in (plain, urgent):
        assert info["exchange"] == ""
        assert info["routing_key"] == "celery"
        assert info["hostname"] == WORKER_NAME
    # kombu's Producer.publish sends priority 0 when none is given.
    assert plain["priority"] == 0
    assert urgent["priority"] == 7


def test_countdown_runs_the_task_no_earlier_and_does_not_block(app):
    stamp = app.tasks["celery_app.stamp"]

    started = time.monotonic()
    later = stamp.apply_async(("later",), countdown=COUNTDOWN_S)
    # The worker keeps the countdown task's message unacked until it is due
    # and raises its prefetch count (basic.qos on a channel that already
    # consumes) so that it can go on taking other tasks meanwhile.
    now = stamp.delay("now")

    now_result = now.get(timeout=RESULT_TIMEOUT_S)
    later_result = later.get(timeout=COUNTDOWN_S + RESULT_TIMEOUT_S)
    elapsed = time.monotonic() - started

    assert later_result["tag"] == "later"
    assert elapsed >= COUNTDOWN_S, f"countdown result arrived after {elapsed:.3f}s"
    assert now_result["tag"] == "now"
    assert now_result["ran_at"] < later_result["ran_at"], (
        "the task sent after the countdown task ran after it: the worker "
        f"stopped taking tasks while one waited ({now_result} vs {later_result})"
    )


def test_remote_control_ping_and_inspect(app, broker):
    # From Python: a broadcast on the celery.pidbox fanout exchange, replies
    # on reply.celery.pidbox. Naming the destination makes Celery return as
    # soon as that worker answers rather than wait out the timeout.
    assert app.control.ping(destination=[WORKER_NAME], timeout=10) == [
        {WORKER_NAME: {"ok": "pong"}}
    ]
    registered = app.control.inspect(destination=[WORKER_NAME], timeout=10).registered()
    assert registered is not None, "no reply to inspect registered"
    assert {"celery_app.add", "celery_app.stamp", "celery_app.delivery"} <= set(
        registered[WORKER_NAME]
    )

    # The command line a user would type.
    cli = subprocess.run(
        celery_cmd("inspect", "ping", f"--destination={WORKER_NAME}", "--timeout=10"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=celery_env(amqp_url(broker)),
        cwd=str(TESTS_DIR),
        timeout=60,
    )
    assert cli.returncode == 0, f"celery inspect ping exited {cli.returncode}:\n{cli.stdout}"
    assert re.search(re.escape(WORKER_NAME) + r": OK\s+pong", cli.stdout), cli.stdout
    assert "1 node online." in cli.stdout, cli.stdout
