"""Pytest fixtures that run the real `warren` binary (see docs/configuration.md).

The `broker` fixture starts

    $WARREN_BIN serve --amqp-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir DIR

reads its stderr until the line `AMQP listener ready addr=HOST:PORT` appears,
yields a `Broker` handle, and on teardown sends SIGTERM and asserts that the
process exits with status 0 within 10 s. The line `HTTP listener ready
addr=HOST:PORT`, logged before it, gives `Broker.http_url` (the dashboard and
/api, docs/http-api.md); it is None if no such line was logged.

WARREN_BIN defaults to <repo>/target/release/warren.

External mode: with WARREN_TEST_EXTERNAL_AMQP=HOST:PORT set, the `broker`
fixture starts nothing and yields an `ExternalBroker` pointing at that AMQP
0-9-1 broker (for instance a RabbitMQ node started by scripts/rabbitmq.sh),
so the same tests can be checked against RabbitMQ. The connection uses
guest/guest on vhost "/" unless WARREN_TEST_EXTERNAL_USER,
WARREN_TEST_EXTERNAL_PASSWORD or WARREN_TEST_EXTERNAL_VHOST say otherwise;
WARREN_TEST_EXTERNAL_HTTP=HOST:PORT names its management API (RabbitMQ's
management plugin), for the tests that drive both brokers over HTTP.
Tests that need a Warren process of their own (restarts, a config file, its
log) are skipped in that mode: `broker_factory` and `start_broker` skip, and
a test can be marked `@pytest.mark.warren_only("why")`. The broker is shared
by every test, so tests run against it must use unique names (see
`unique_name`) and delete what they declare.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import uuid
from typing import Callable, Iterable, List, Optional
from urllib.parse import quote

import pika
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "warren"

READY_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 200

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_READY_RE = re.compile(r"AMQP listener ready\b.*?\baddr=(\S+)")
_HTTP_READY_RE = re.compile(r"HTTP listener ready\b.*?\baddr=(\S+)")


def warren_bin() -> pathlib.Path:
    return pathlib.Path(os.environ.get("WARREN_BIN") or DEFAULT_BIN)


def _split_addr(addr: str):
    """'127.0.0.1:5672' / '[::1]:5672' -> (host, port)."""
    addr = addr.strip().strip('",;')
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    return host, int(port)


EXTERNAL_ENV = "WARREN_TEST_EXTERNAL_AMQP"


def external_addr() -> Optional[str]:
    """HOST:PORT of the external broker the tests run against, or None."""
    addr = os.environ.get(EXTERNAL_ENV, "").strip()
    return addr or None


def unique_name(prefix: str = "t") -> str:
    """A queue/exchange name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class AmqpEndpoint:
    """Where tests connect: host, port and default credentials, and the
    connections opened through it (closed at teardown)."""

    external = False

    def __init__(self) -> None:
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.username = "guest"
        self.password = "guest"
        self.vhost = "/"
        # The HTTP listener (Warren's own; an external broker has none here).
        self.http_host: Optional[str] = None
        self.http_port: Optional[int] = None
        self._connections: List[pika.BlockingConnection] = []

    @property
    def http_url(self) -> Optional[str]:
        """http://HOST:PORT of the HTTP API and dashboard, or None."""
        if self.http_host is None or self.http_port is None:
            return None
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"http://{host}:{self.http_port}"

    @property
    def url(self) -> str:
        return (f"amqp://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{quote(self.vhost, safe='')}")

    def params(self, username: Optional[str] = None, password: Optional[str] = None,
               vhost: Optional[str] = None, **kwargs) -> pika.ConnectionParameters:
        kwargs.setdefault("connection_attempts", 1)
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("stack_timeout", 15)
        kwargs.setdefault("blocked_connection_timeout", 30)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost if vhost is None else vhost,
            credentials=pika.PlainCredentials(
                self.username if username is None else username,
                self.password if password is None else password,
            ),
            **kwargs,
        )

    def connect(self, **kwargs) -> pika.BlockingConnection:
        """Open a pika BlockingConnection; closed automatically at teardown."""
        conn = pika.BlockingConnection(self.params(**kwargs))
        self._connections.append(conn)
        return conn

    def channel(self, **kwargs):
        """Convenience: (connection, channel)."""
        conn = self.connect(**kwargs)
        return conn, conn.channel()

    def close_connections(self) -> None:
        for conn in self._connections:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        self._connections.clear()


class ExternalBroker(AmqpEndpoint):
    """An AMQP broker the tests did not start (WARREN_TEST_EXTERNAL_AMQP).

    `log()` is empty since its log is not ours.
    """

    external = True

    def __init__(self, addr: str):
        super().__init__()
        self.host, self.port = _split_addr(addr)
        self.username = os.environ.get("WARREN_TEST_EXTERNAL_USER", "guest")
        self.password = os.environ.get("WARREN_TEST_EXTERNAL_PASSWORD", "guest")
        self.vhost = os.environ.get("WARREN_TEST_EXTERNAL_VHOST", "/")
        http = os.environ.get("WARREN_TEST_EXTERNAL_HTTP", "").strip()
        if http:
            self.http_host, self.http_port = _split_addr(http)

    def log(self, tail: Optional[int] = None) -> str:
        return ""

    def log_lines(self) -> List[str]:
        return []


class Broker(AmqpEndpoint):
    """A running `warren serve` process."""

    def __init__(self, proc: subprocess.Popen, workdir: pathlib.Path):
        super().__init__()
        self.proc = proc
        self.workdir = workdir
        self._lines: List[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._eof = threading.Event()
        self._log_file = open(workdir / "warren.stderr.log", "w", encoding="utf-8")
        self._reader = threading.Thread(
            target=self._drain_stderr, name="warren-stderr", daemon=True
        )
        self._reader.start()

    # ----------------------------------------------------------------- logs
    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = _ANSI_RE.sub("", raw.rstrip("\r\n"))
                with self._lock:
                    self._lines.append(line)
                try:
                    self._log_file.write(line + "\n")
                    self._log_file.flush()
                except ValueError:  # file closed during teardown
                    pass
                if self.http_port is None:
                    m = _HTTP_READY_RE.search(line)
                    if m:
                        self.http_host, self.http_port = _split_addr(m.group(1))
                if not self._ready.is_set():
                    m = _READY_RE.search(line)
                    if m:
                        self.host, self.port = _split_addr(m.group(1))
                        self._ready.set()
        finally:
            self._eof.set()

    def log(self, tail: Optional[int] = None) -> str:
        with self._lock:
            lines = list(self._lines)
        if tail is not None:
            lines = lines[-tail:]
        return "\n".join(lines)

    def log_lines(self) -> List[str]:
        with self._lock:
            return list(self._lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> None:
        """Waits until a log line matches the regular expression: stderr is
        read by another thread, so a line the broker wrote before answering
        a client may arrive here after the answer."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not any(regex.search(line) for line in self.log_lines()):
            if time.monotonic() >= deadline:
                raise AssertionError(f"the log never matched {pattern!r}:\n{self.log()}")
            time.sleep(0.01)

    # --------------------------------------------------------------- startup
    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._eof.wait(2.0)
                if self._ready.is_set():
                    break
                raise RuntimeError(
                    f"warren exited with status {self.proc.returncode} before "
                    f"'AMQP listener ready' was logged. Captured stderr:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"warren did not log 'AMQP listener ready addr=HOST:PORT' within "
                    f"{timeout:.0f}s. Captured stderr:\n{self.log()}"
                )

    # -------------------------------------------------------------- shutdown
    def stop(self) -> Optional[int]:
        """SIGTERM, wait up to SHUTDOWN_TIMEOUT_S, then SIGKILL.

        Returns the exit status, or None if the process had to be killed.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._eof.wait(2.0)
                self._reader.join(2.0)
                return None
        self._eof.wait(2.0)
        self._reader.join(2.0)
        return self.proc.returncode

    def finish(self) -> None:
        try:
            self._log_file.close()
        except Exception:  # noqa: BLE001
            pass


def start_broker(
    workdir: pathlib.Path,
    config: Optional[str] = None,
    extra_args: Iterable[str] = (),
) -> Broker:
    if external_addr() is not None:
        pytest.skip(f"starts its own Warren process ({EXTERNAL_ENV} is set)")
    binary = warren_bin()
    if not binary.exists():
        pytest.fail(
            f"warren binary not found at {binary}; run `cargo build --release -p warren` "
            f"or set WARREN_BIN",
            pytrace=False,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    extra_args = list(extra_args)
    args = [str(binary), "serve", "--data-dir", str(data_dir)]
    # Ephemeral loopback ports unless the test names its own listeners
    # (--amqps-listen is used only when the config has a [tls] section).
    for listener in ("--amqp-listen", "--http-listen", "--amqps-listen"):
        if listener not in extra_args:
            args += [listener, "127.0.0.1:0"]
    if config is not None:
        cfg = workdir / "warren.toml"
        cfg.write_text(config, encoding="utf-8")
        args += ["--config", str(cfg)]
    args += extra_args

    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    env.setdefault("RUST_BACKTRACE", "1")
    stdout = open(workdir / "warren.stdout.log", "wb")
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=env,
            cwd=str(workdir),
        )
    finally:
        stdout.close()
    broker = Broker(proc, workdir)
    try:
        broker.wait_ready()
    except RuntimeError as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.finish()
        pytest.fail(str(exc), pytrace=False)
    return broker


def _teardown(broker: Broker, request) -> None:
    broker.close_connections()
    status = broker.stop()
    broker.finish()
    log = broker.log(tail=LOG_TAIL_LINES)
    if status is None:
        pytest.fail(
            f"warren did not exit within {SHUTDOWN_TIMEOUT_S:.0f}s of SIGTERM (killed). "
            f"Last stderr lines:\n{log}",
            pytrace=False,
        )
    if status != 0:
        pytest.fail(
            f"warren exited with status {status} after SIGTERM (expected 0). "
            f"Last stderr lines:\n{log}",
            pytrace=False,
        )


_active_brokers: "dict[str, List[Broker]]" = {}


@pytest.fixture
def broker(request, tmp_path):
    """A fresh broker per test (isolated state, checked clean shutdown).

    With WARREN_TEST_EXTERNAL_AMQP set: the external broker instead (shared,
    nothing started or stopped; only the test's connections are closed).
    """
    addr = external_addr()
    if addr is not None:
        ext = ExternalBroker(addr)
        try:
            yield ext
        finally:
            ext.close_connections()
        return
    b = start_broker(tmp_path / "warren")
    _active_brokers.setdefault(request.node.nodeid, []).append(b)
    try:
        yield b
    finally:
        _teardown(b, request)


@pytest.fixture
def broker_factory(request, tmp_path):
    """Start extra brokers (e.g. with a config file): factory(config=None)."""
    if external_addr() is not None:
        pytest.skip(f"starts its own Warren processes ({EXTERNAL_ENV} is set)")
    started: List[Broker] = []

    def factory(config: Optional[str] = None, extra_args: Iterable[str] = ()) -> Broker:
        b = start_broker(tmp_path / f"warren-{len(started)}", config, extra_args)
        started.append(b)
        _active_brokers.setdefault(request.node.nodeid, []).append(b)
        return b

    yield factory
    errors = []
    for b in started:
        try:
            _teardown(b, request)
        except BaseException as exc:  # noqa: BLE001 - collect, then report
            errors.append(exc)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------
# A RabbitMQ node with its management plugin, for the tests that compare
# Warren's HTTP API with RabbitMQ's (test_policies.py, test_definitions.py).
RABBITMQ_SH = REPO_ROOT / "scripts" / "rabbitmq.sh"
RABBITMQ_SBIN = pathlib.Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
RABBITMQ_START_TIMEOUT_S = 180.0
RABBITMQ_HTTP_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory):
    """A private RabbitMQ node (scripts/rabbitmq.sh) with the management
    plugin, shared by the session: an ExternalBroker whose `http_url` is
    RabbitMQ's management API. Debian's rabbitmq-server must be installed
    (scripts/test.sh installs it)."""
    import requests

    if not (RABBITMQ_SBIN / "rabbitmq-server").exists():
        pytest.fail(f"RabbitMQ is not installed ({RABBITMQ_SBIN}/rabbitmq-server is missing); "
                    "install Debian's rabbitmq-server (scripts/test.sh does)", pytrace=False)
    node_dir = tmp_path_factory.mktemp("rabbitmq-management")
    ports = subprocess.run(["bash", str(RABBITMQ_SH), "free-ports", "1"],
                           capture_output=True, text=True, check=True, timeout=30)
    http_port = int(ports.stdout.split()[0])
    env = dict(os.environ)
    env["RABBITMQ_PLUGINS"] = "rabbitmq_management"
    env["RABBITMQ_EXTRA_CONF"] = (f"management.tcp.port = {http_port}\n"
                                  "management.tcp.ip = 127.0.0.1")
    started = subprocess.run(["bash", str(RABBITMQ_SH), "start", str(node_dir)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=RABBITMQ_START_TIMEOUT_S, env=env)
    if started.returncode != 0:
        pytest.fail(f"scripts/rabbitmq.sh start failed (exit {started.returncode}):\n"
                    f"{started.stderr}", pytrace=False)
    assignments = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    node = ExternalBroker(assignments["WARREN_TEST_EXTERNAL_AMQP"])
    node.http_host, node.http_port = "127.0.0.1", http_port
    try:
        # The plugin starts after AMQP; its first answer is the signal.
        deadline = time.monotonic() + RABBITMQ_HTTP_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{node.http_url}/api/overview", auth=("guest", "guest"),
                                timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("RabbitMQ's management API did not answer", pytrace=False)
            time.sleep(0.2)
        yield node
    finally:
        node.close_connections()
        subprocess.run(["bash", str(RABBITMQ_SH), "stop", str(node_dir)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=90)


# --------------------------------------------------------------------------
# Attach the broker log to the report of a failing test.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, b in enumerate(_active_brokers.get(item.nodeid, [])):
            report.sections.append(
                (f"warren stderr (broker {i}, last {LOG_TAIL_LINES} lines)",
                 b.log(tail=LOG_TAIL_LINES))
            )
    if report.when == "teardown":
        _active_brokers.pop(item.nodeid, None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "warren_only(reason): checks Warren-specific behaviour; skipped when the "
        "tests run against an external broker (WARREN_TEST_EXTERNAL_AMQP)",
    )


def pytest_collection_modifyitems(config, items):
    if external_addr() is not None:
        for item in items:
            marker = item.get_closest_marker("warren_only")
            if marker is not None:
                why = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
                item.add_marker(pytest.mark.skip(
                    reason=f"Warren only ({why})" if why else "Warren only"))
    # A hung broker must not hang the whole run: default per-test timeout
    # (pytest-timeout) unless a test sets its own.
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120))


# --------------------------------------------------------------------------
# Helpers shared by the test modules (exposed as a fixture so the test files
# do not depend on conftest being importable).
class Helpers:
    @staticmethod
    def pump_until(
        connections,
        predicate: Callable[[], bool],
        timeout: float = 10.0,
        what: str = "condition",
    ) -> None:
        """Process I/O on `connections` until predicate() is true or timeout."""
        if isinstance(connections, pika.BlockingConnection):
            connections = [connections]
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            for c in connections:
                c.process_data_events(time_limit=0.02)

    @staticmethod
    def get_all(channel, queue: str, auto_ack: bool = True) -> List[bytes]:
        """basic_get until the queue reports empty; returns the bodies."""
        bodies = []
        while True:
            method, _props, body = channel.basic_get(queue=queue, auto_ack=auto_ack)
            if method is None:
                return bodies
            bodies.append(body)

    @staticmethod
    def message_count(channel, queue: str) -> int:
        return channel.queue_declare(queue=queue, passive=True).method.message_count

    @staticmethod
    def consumer_count(channel, queue: str) -> int:
        return channel.queue_declare(queue=queue, passive=True).method.consumer_count


@pytest.fixture
def h():
    return Helpers
