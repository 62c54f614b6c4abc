"""`warren worker` against a real RabbitMQ: the end-to-end checks of the
model workers (crates/warren/tests/inference.rs runs them against Warren)
with all-MiniLM-L6-v2 served by a separate `warren worker --broker URL
--config FILE` process, and RabbitMQ as the broker. Every test runs twice:
against a private RabbitMQ node and, for comparison, against `warren serve`,
so a difference between the two brokers shows as one failing variant.

The RabbitMQ node is started once for the module by scripts/rabbitmq.sh
(Debian's rabbitmq-server package must be installed; scripts/test.sh
installs it when run as root). With WARREN_TEST_EXTERNAL_AMQP set, that
broker is used instead (e.g. `scripts/rabbitmq.sh run .venv/bin/python -m
pytest tests/python/test_worker_rabbitmq.py`) and the Warren variant is
skipped, as conftest.py does for every test that starts its own Warren.

What is checked, on both brokers:

* the worker declares its queue durable, as a quorum queue with
  x-delivery-limit, dead-lettering to `<queue>.dead-letter`;
* replies to three sentences (on a reply queue, and through direct reply-to)
  carry the correlation id, the `x-warren-*` headers and `application/json`,
  and hold L2-normalised 384-dimensional embeddings whose cosines match ONNX
  Runtime's reference (tests/models/minilm-reference.json);
* a burst of 48 requests is batched and each request answered exactly once;
* a body that is not UTF-8 goes to `<queue>.dead-letter` with the reason in
  `x-warren-error`, is acked and never retried;
* a worker killed with SIGKILL part way through 200 long requests loses
  none: a second worker answers the rest (a few answered twice, at most);
* every worker stops cleanly on SIGTERM (status 0) and logs no warning or
  error while it runs.

The models come from `bash scripts/fetch-models.sh` (models/all-MiniLM-L6-v2
and ONNX Runtime in .venv, or ORT_DYLIB_PATH). Waits are deadlines around
polling, never sleeps. On failure the workers' logs and the broker's log
(RabbitMQ's DIR/log/rabbit.log, or Warren's stderr) are attached to the
error; the logs also stay in the test's tmp directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import re
import signal
import subprocess
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from conftest import (
    EXTERNAL_ENV,
    REPO_ROOT,
    ExternalBroker,
    external_addr,
    start_broker,
    unique_name,
    warren_bin,
)

pytestmark = pytest.mark.timeout(240)

RABBITMQ_SH = REPO_ROOT / "scripts" / "rabbitmq.sh"
RABBITMQ_SBIN = pathlib.Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
REFERENCE = REPO_ROOT / "tests" / "models" / "minilm-reference.json"

MODEL = "minilm"
MODEL_VERSION = "test-1"
BATCH_SIZE_MAX = 8
BATCH_DELAY_MAX_MS = 20
DIMENSIONS = 384

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
MARKET = "The stock market fell today."
FOOD_BREAD_COSINE = 0.7535
FOOD_MARKET_COSINE = -0.012
TOLERANCE = 1e-3

WORKER_READY_TIMEOUT_S = 60.0
WORKER_SHUTDOWN_TIMEOUT_S = 15.0
REPLY_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
RABBITMQ_START_TIMEOUT_S = 150.0
LOG_TAIL_LINES = 200
BROKER_LOG_TAIL_LINES = 80

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A worker log line above INFO (tracing's format: "<time>  WARN target: ...").
_COMPLAINT_RE = re.compile(r"^\S+\s+(WARN|ERROR)\s+(\S+)")
_SHUTDOWN_RE = re.compile(r"^\S+\s+INFO\s+warren: shutting down")


# --------------------------------------------------------------------------
# Files the worker needs.
def onnxruntime_library() -> pathlib.Path:
    """ORT_DYLIB_PATH, or the library scripts/fetch-models.sh put in .venv."""
    explicit = os.environ.get("ORT_DYLIB_PATH")
    if explicit:
        return pathlib.Path(explicit)
    found = sorted(REPO_ROOT.glob(
        ".venv/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so.*"))
    if not found:
        pytest.fail("ONNX Runtime not found in .venv and ORT_DYLIB_PATH is not set; "
                    "run `bash scripts/fetch-models.sh`", pytrace=False)
    return found[0]


def worker_config(queue: str) -> str:
    for name in ("model.onnx", "tokenizer.json"):
        if not (MODEL_DIR / name).exists():
            pytest.fail(f"{MODEL_DIR / name} is missing; run `bash scripts/fetch-models.sh`",
                        pytrace=False)
    return f"""\
[[model]]
name = "{MODEL}"
version = "{MODEL_VERSION}"
path = "{(MODEL_DIR / 'model.onnx').resolve()}"
tokenizer = "{(MODEL_DIR / 'tokenizer.json').resolve()}"
task = "embedding"
queue = "{queue}"
max_tokens = 256
batch_size_max = {BATCH_SIZE_MAX}
batch_delay_max_ms = {BATCH_DELAY_MAX_MS}

[model.runtime]
backend = "onnxruntime"
onnxruntime_library = "{onnxruntime_library()}"
"""


def reference_first_dims() -> Dict[str, List[float]]:
    """The first dimensions of ONNX Runtime's embedding of each sentence."""
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return {s["text"]: s["embedding_first_dims"] for s in data["sentences"]}


# --------------------------------------------------------------------------
# `warren worker` processes.
class WorkerProcess:
    """A `warren worker --broker URL --config FILE` process; its stdout and
    stderr go to NAME.log in `workdir`."""

    def __init__(self, name: str, url: str, config: str, workdir: pathlib.Path):
        binary = warren_bin()
        if not binary.exists():
            pytest.fail(f"warren binary not found at {binary}; run `cargo build --release "
                        f"-p warren` or set WARREN_BIN", pytrace=False)
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config, encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ)
        env.setdefault("NO_COLOR", "1")
        env.setdefault("RUST_BACKTRACE", "1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "worker", "--broker", url, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(workdir),
            )
        self.killed = False

    def log(self, tail: Optional[int] = None) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        lines = [_ANSI_RE.sub("", line) for line in text.splitlines()]
        if tail is not None:
            lines = lines[-tail:]
        return "\n".join(lines)

    def complaints(self) -> List[str]:
        """Log lines at WARN or ERROR: any before the worker starts shutting
        down, and the worker's own (targets `warren...`) after that. Once it
        has sent connection.close, lapin (the worker's AMQP client) may log
        the broker's closing of the socket after close-ok as a broken
        connection; RabbitMQ leaves the socket to the client to close, Warren
        closes it at once."""
        found = []
        shutting_down = False
        for line in self.log().splitlines():
            if _SHUTDOWN_RE.match(line):
                shutting_down = True
            m = _COMPLAINT_RE.match(line)
            if m and (not shutting_down or m.group(2).startswith("warren")):
                found.append(line)
        return found

    def check_alive(self) -> None:
        status = self.proc.poll()
        if status is not None and not self.killed:
            raise AssertionError(
                f"worker {self.name} exited with status {status}. Its log:\n"
                f"{self.log(tail=LOG_TAIL_LINES)}")

    def kill9(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after WORKER_SHUTDOWN_TIMEOUT_S.

        Returns the exit status, None if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WORKER_SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

    def check_stopped_cleanly(self) -> None:
        status = self.stop()
        if status != 0:
            what = ("did not exit within "
                    f"{WORKER_SHUTDOWN_TIMEOUT_S:.0f}s of SIGTERM" if status is None
                    else f"exited with status {status} after SIGTERM")
            raise AssertionError(f"worker {self.name} {what}. Its log:\n"
                                 f"{self.log(tail=LOG_TAIL_LINES)}")
        complaints = self.complaints()
        assert not complaints, (
            f"worker {self.name} logged warnings or errors:\n" + "\n".join(complaints))


# --------------------------------------------------------------------------
# The broker under test and its workers.
class Stack:
    """A broker (RabbitMQ or Warren) and the `warren worker` processes
    started against it."""

    def __init__(self, kind: str, endpoint, workdir: pathlib.Path,
                 broker_log: Callable[[int], str]):
        self.kind = kind
        self.endpoint = endpoint
        self.workdir = workdir
        self.broker_log = broker_log
        self.workers: List[WorkerProcess] = []
        self.queue = ""  # the module worker's queue

    @property
    def url(self) -> str:
        return self.endpoint.url

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.endpoint.params())

    def start_worker(self, name: str, queue: str) -> WorkerProcess:
        worker = WorkerProcess(name, self.url, worker_config(queue), self.workdir)
        self.workers.append(worker)
        return worker

    def diagnostics(self) -> str:
        parts = []
        for worker in self.workers:
            parts.append(f"----- worker {worker.name} ({worker.log_path}), last "
                         f"{LOG_TAIL_LINES} lines -----\n{worker.log(tail=LOG_TAIL_LINES)}")
        parts.append(f"----- {self.kind} log, last {BROKER_LOG_TAIL_LINES} lines -----\n"
                     f"{self.broker_log(BROKER_LOG_TAIL_LINES)}")
        return "\n".join(parts)


def explain_failure(test):
    """Attaches the workers' and the broker's logs to a failing test."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - annotate and re-raise
            stack = kwargs.get("stack")
            if stack is not None:
                exc.add_note(stack.diagnostics())
            raise

    return wrapper


def _tail_file(path: pathlib.Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class RabbitNode:
    def __init__(self, addr: str, node_dir: Optional[pathlib.Path]):
        self.addr = addr
        self.node_dir = node_dir

    def log(self, lines: int) -> str:
        if self.node_dir is None:
            return f"(not ours: {EXTERNAL_ENV}={self.addr})"
        path = self.node_dir / "log" / "rabbit.log"
        return f"({path})\n{_tail_file(path, lines)}"


@contextlib.contextmanager
def rabbitmq_node(tmp_path_factory):
    """A private RabbitMQ node (scripts/rabbitmq.sh), or the external broker
    of WARREN_TEST_EXTERNAL_AMQP."""
    addr = external_addr()
    if addr is not None:
        rabbit_dir = os.environ.get("WARREN_RABBITMQ_DIR")
        yield RabbitNode(addr, pathlib.Path(rabbit_dir) if rabbit_dir else None)
        return
    if not (RABBITMQ_SBIN / "rabbitmq-server").exists():
        pytest.fail(
            f"RabbitMQ is not installed ({RABBITMQ_SBIN}/rabbitmq-server is missing), so "
            f"`warren worker` cannot be checked against it. Install Debian's package "
            f"(`apt-get install -y rabbitmq-server`; scripts/test.sh does so as root), set "
            f"RABBITMQ_SBIN, or point {EXTERNAL_ENV} at a running RabbitMQ.",
            pytrace=False,
        )
    # A directory of our own: the script keeps it after stopping the node,
    # so RabbitMQ's log stays with the test's other files.
    node_dir = tmp_path_factory.mktemp("rabbitmq")
    try:
        started = subprocess.run(
            ["bash", str(RABBITMQ_SH), "start", str(node_dir)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=RABBITMQ_START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(["bash", str(RABBITMQ_SH), "stop", str(node_dir)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
        pytest.fail(f"scripts/rabbitmq.sh start did not finish within {exc.timeout:.0f}s",
                    pytrace=False)
    if started.returncode != 0:
        pytest.fail(f"scripts/rabbitmq.sh start failed (exit {started.returncode}):\n"
                    f"{started.stderr}", pytrace=False)
    assignments = dict(line.split("=", 1) for line in started.stdout.splitlines()
                       if "=" in line)
    node = RabbitNode(assignments["WARREN_TEST_EXTERNAL_AMQP"], node_dir)
    try:
        yield node
    finally:
        stopped = subprocess.run(
            ["bash", str(RABBITMQ_SH), "stop", str(node_dir)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90,
        )
        if stopped.returncode != 0:
            pytest.fail(f"scripts/rabbitmq.sh stop failed (exit {stopped.returncode}):\n"
                        f"{stopped.stderr}", pytrace=False)


@pytest.fixture(scope="module", params=["rabbitmq", "warren"])
def broker_under_test(request, tmp_path_factory):
    """(kind, endpoint, log tail function) for each broker."""
    if request.param == "rabbitmq":
        with rabbitmq_node(tmp_path_factory) as node:
            endpoint = ExternalBroker(node.addr)
            try:
                yield "rabbitmq", endpoint, node.log
            finally:
                endpoint.close_connections()
        return
    broker = start_broker(tmp_path_factory.mktemp("warren"))
    try:
        yield "warren", broker, lambda lines: broker.log(tail=lines)
    finally:
        broker.close_connections()
        status = broker.stop()
        broker.finish()
    assert status == 0, (f"warren serve exited with status {status} after SIGTERM:\n"
                         f"{broker.log(tail=LOG_TAIL_LINES)}")


@pytest.fixture(scope="module")
def stack(broker_under_test, tmp_path_factory):
    """The broker with one `warren worker` serving a queue of its own,
    consuming before the first test runs."""
    kind, endpoint, broker_log = broker_under_test
    s = Stack(kind, endpoint, tmp_path_factory.mktemp(f"workers-{kind}"), broker_log)
    s.queue = unique_name("embed")
    worker = s.start_worker("worker", s.queue)
    try:
        try:
            wait_for_consumer(s, s.queue, worker)
        except AssertionError as exc:
            pytest.fail(f"{exc}\n{s.diagnostics()}", pytrace=False)
        yield s
        worker.check_stopped_cleanly()
    finally:
        worker.stop()
        delete_queues(s, s.queue)


# --------------------------------------------------------------------------
# AMQP helpers.
def queue_counts(conn: pika.BlockingConnection, queue: str) -> Optional[Tuple[int, int]]:
    """(ready messages, consumers) of `queue`, None if it does not exist.

    A passive declare of a missing queue closes its channel, so each call
    uses a channel of its own."""
    channel = conn.channel()
    # pika logs the expected NOT_FOUND as a warning.
    pika_channel_log = logging.getLogger("pika.channel")
    level = pika_channel_log.level
    pika_channel_log.setLevel(logging.ERROR)
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    finally:
        pika_channel_log.setLevel(level)
    channel.close()
    return ok.method.message_count, ok.method.consumer_count


def wait_for_consumer(stack: Stack, queue: str, worker: WorkerProcess,
                      timeout: float = WORKER_READY_TIMEOUT_S) -> None:
    """Polls until `queue` exists and has a consumer (the worker has loaded
    the model, connected and subscribed)."""
    deadline = time.monotonic() + timeout
    with stack.connect() as conn:
        while True:
            worker.check_alive()
            counts = queue_counts(conn, queue)
            if counts is not None and counts[1] > 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no consumer on {queue} within {timeout:.0f}s "
                    f"({'no such queue' if counts is None else f'{counts[0]} messages'})")
            conn.sleep(POLL_INTERVAL_S)


def wait_for_no_consumer(conn: pika.BlockingConnection, queue: str,
                         timeout: float = 30.0) -> int:
    """Polls until `queue` has no consumer; returns its ready messages."""
    deadline = time.monotonic() + timeout
    while True:
        counts = queue_counts(conn, queue)
        assert counts is not None, f"{queue} disappeared"
        if counts[1] == 0:
            return counts[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} still has {counts[1]} consumers after {timeout:.0f}s")
        conn.sleep(POLL_INTERVAL_S)


def delete_queues(stack: Stack, queue: str) -> None:
    try:
        with stack.connect() as conn:
            channel = conn.channel()
            channel.queue_delete(queue)
            channel.queue_delete(f"{queue}.dead-letter")
    except Exception:  # noqa: BLE001 - best effort; the broker may be gone
        pass


class Replies:
    """Collects the replies delivered to a consumer (auto-ack)."""

    def __init__(self, channel, queue: str):
        self.received: List[Tuple[pika.BasicProperties, bytes]] = []
        self.count: Counter = Counter()
        channel.basic_consume(queue=queue, on_message_callback=self._on_reply, auto_ack=True)

    def _on_reply(self, _channel, _method, properties, body) -> None:
        self.received.append((properties, body))
        self.count[properties.correlation_id] += 1

    def by_id(self) -> Dict[str, Tuple[pika.BasicProperties, bytes]]:
        return {properties.correlation_id: (properties, body)
                for properties, body in self.received}


def pump_until(conn: pika.BlockingConnection, predicate: Callable[[], bool], what: str,
               workers: List[WorkerProcess], timeout: float = REPLY_TIMEOUT_S) -> None:
    """Processes I/O until predicate() holds; fails if a worker that was not
    killed on purpose exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for worker in workers:
            worker.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        conn.process_data_events(time_limit=0.05)


def request(channel, queue: str, body: bytes, reply_to: str, correlation_id: str) -> None:
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        body=body,
        properties=pika.BasicProperties(reply_to=reply_to, correlation_id=correlation_id),
    )


# --------------------------------------------------------------------------
# What a reply must look like.
def check_reply(properties: pika.BasicProperties, body: bytes, batch_size_max: int) -> List[float]:
    assert properties.content_type == "application/json", properties
    headers = properties.headers or {}
    assert headers.get("x-warren-model") == MODEL, headers
    assert headers.get("x-warren-model-version") == MODEL_VERSION, headers
    batch = headers.get("x-warren-batch-size")
    assert isinstance(batch, int) and 1 <= batch <= batch_size_max, headers
    inference_us = headers.get("x-warren-inference-us")
    assert isinstance(inference_us, int) and inference_us >= 0, headers
    vector = json.loads(body)
    assert isinstance(vector, list) and len(vector) == DIMENSIONS, f"{len(vector)} dimensions"
    assert all(isinstance(x, (int, float)) for x in vector)
    norm = math.sqrt(sum(x * x for x in vector))
    assert abs(norm - 1.0) < TOLERANCE, f"not L2-normalised: norm {norm}"
    return vector


def cosine(a: List[float], b: List[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check_sentences(replies: Replies) -> None:
    """The replies to FOOD, BREAD and MARKET (correlation ids food, bread,
    market) match ONNX Runtime's reference."""
    assert sorted(replies.count.items()) == [("bread", 1), ("food", 1), ("market", 1)], \
        replies.count
    by_id = replies.by_id()
    vectors = {cid: check_reply(props, body, 3) for cid, (props, body) in by_id.items()}
    food_bread = cosine(vectors["food"], vectors["bread"])
    food_market = cosine(vectors["food"], vectors["market"])
    assert abs(food_bread - FOOD_BREAD_COSINE) < TOLERANCE, f"cos(food, bread) = {food_bread}"
    assert abs(food_market - FOOD_MARKET_COSINE) < TOLERANCE, \
        f"cos(food, market) = {food_market}"
    reference = reference_first_dims()
    for cid, text in (("food", FOOD), ("bread", BREAD), ("market", MARKET)):
        expected = reference[text]
        got = vectors[cid][:len(expected)]
        assert all(abs(g - e) < TOLERANCE for g, e in zip(got, expected)), \
            f"{text!r}: first dimensions {got}, ONNX Runtime {expected}"


# --------------------------------------------------------------------------
@explain_failure
def test_the_worker_declares_a_quorum_queue_with_a_delivery_limit(stack: Stack):
    """The model queue is durable, a quorum queue with x-delivery-limit 5
    (docs/inference.md's default), dead-lettering to <queue>.dead-letter,
    which is durable too: redeclaring it with exactly those arguments is
    accepted, and with any of them changed refused (406)."""
    dead_letter_queue = f"{stack.queue}.dead-letter"
    declared = {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue,
    }
    with stack.connect() as conn:
        ok = conn.channel().queue_declare(stack.queue, durable=True, arguments=declared)
        assert ok.method.consumer_count == 1
        conn.channel().queue_declare(dead_letter_queue, durable=True)
        for durable, changed in (
            (False, {}),
            (True, {"x-delivery-limit": 6}),
            (True, {"x-queue-type": "classic"}),
            (True, {"x-dead-letter-routing-key": f"{stack.queue}.elsewhere"}),
        ):
            with pytest.raises(ChannelClosedByBroker) as refused:
                conn.channel().queue_declare(stack.queue, durable=durable,
                                             arguments={**declared, **changed})
            assert refused.value.reply_code == 406, (durable, changed, refused.value)
        with pytest.raises(ChannelClosedByBroker) as refused:
            conn.channel().queue_declare(dead_letter_queue, durable=False)
        assert refused.value.reply_code == 406, refused.value
        assert queue_counts(conn, stack.queue) == (0, 1)


@explain_failure
def test_embeddings_match_onnx_runtime(stack: Stack):
    with stack.connect() as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
        replies = Replies(channel, reply_queue)
        for cid, text in (("food", FOOD), ("bread", BREAD), ("market", MARKET)):
            request(channel, stack.queue, text.encode(), reply_queue, cid)
        pump_until(conn, lambda: len(replies.received) >= 3, "three replies", stack.workers)
        check_sentences(replies)


@explain_failure
def test_direct_reply_to(stack: Stack):
    with stack.connect() as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        replies = Replies(channel, DIRECT_REPLY_TO)
        for cid, text in (("food", FOOD), ("bread", BREAD), ("market", MARKET)):
            request(channel, stack.queue, text.encode(), DIRECT_REPLY_TO, cid)
        pump_until(conn, lambda: len(replies.received) >= 3, "three direct replies",
                   stack.workers)
        check_sentences(replies)


@explain_failure
def test_a_burst_is_batched_and_each_request_answered_once(stack: Stack):
    requests = 48
    with stack.connect() as conn:
        # No publisher confirms here: pika's blocking channel would wait for
        # each one, spreading the burst out; the replies show that every
        # request arrived.
        channel = conn.channel()
        replies = Replies(channel, DIRECT_REPLY_TO)
        for index in range(requests):
            request(channel, stack.queue, f"request number {index}".encode(),
                    DIRECT_REPLY_TO, str(index))
        pump_until(conn, lambda: len(replies.count) >= requests,
                   f"replies to {requests} requests", stack.workers)
        # One more request, answered after any redelivery of the burst would
        # have been: no request of the burst may be answered twice.
        request(channel, stack.queue, b"the last request", DIRECT_REPLY_TO, "last")
        pump_until(conn, lambda: "last" in replies.count, "the reply to the last request",
                   stack.workers)
        burst = {cid: n for cid, n in replies.count.items() if cid != "last"}
        assert set(burst) == {str(i) for i in range(requests)}, sorted(burst)
        twice = {cid: n for cid, n in burst.items() if n != 1}
        assert not twice, f"answered more than once: {twice}"
        sizes = []
        for properties, body in replies.received:
            check_reply(properties, body, BATCH_SIZE_MAX)
            sizes.append(properties.headers["x-warren-batch-size"])
        assert max(sizes) > 1, f"the burst was not batched: batch sizes {sizes}"


@explain_failure
def test_poison_is_dead_lettered_with_its_reason_and_not_retried(stack: Stack):
    poison = b"\xff\xfe not text"
    dead_letter_queue = f"{stack.queue}.dead-letter"
    with stack.connect() as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
        replies = Replies(channel, reply_queue)
        request(channel, stack.queue, poison, reply_queue, "poison")
        request(channel, stack.queue, FOOD.encode(), reply_queue, "fine")
        pump_until(conn, lambda: "fine" in replies.count, "the reply to the good request",
                   stack.workers)

        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            method, properties, body = channel.basic_get(dead_letter_queue, auto_ack=True)
            if method is not None:
                break
            assert time.monotonic() < deadline, f"nothing in {dead_letter_queue}"
            conn.sleep(POLL_INTERVAL_S)
        assert body == poison
        assert properties.correlation_id == "poison"
        headers = properties.headers or {}
        reason = headers.get("x-warren-error")
        assert isinstance(reason, (str, bytes)), f"no x-warren-error header: {headers}"
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason
        assert "UTF-8" in reason, reason
        assert headers.get("x-warren-model") == MODEL, headers
        assert headers.get("x-warren-queue") == stack.queue, headers
        # Published by the worker, not dead-lettered by the queue after retries.
        assert "x-death" not in headers, headers

        # Not retried: once a later request has been answered, the poison
        # request has not come back to the dead-letter queue or the model
        # queue, and it was never answered.
        request(channel, stack.queue, BREAD.encode(), reply_queue, "later")
        pump_until(conn, lambda: "later" in replies.count, "the reply to a later request",
                   stack.workers)
        method, _properties, body = channel.basic_get(dead_letter_queue, auto_ack=True)
        assert method is None, f"dead-lettered again: {body!r}"
        assert queue_counts(conn, stack.queue) == (0, 1)
        # The requester was told why, once, instead of waiting for nothing.
        assert replies.count["poison"] == 1, replies.count
        error_properties, error_body = replies.by_id()["poison"]
        error_headers = error_properties.headers or {}
        error_reason = error_headers.get("x-warren-error")
        error_reason = (error_reason.decode("utf-8", "replace")
                        if isinstance(error_reason, bytes) else error_reason)
        assert isinstance(error_reason, str) and "UTF-8" in error_reason, error_headers
        assert "UTF-8" in json.loads(error_body)["error"], error_body
        assert replies.count == Counter({"poison": 1, "fine": 1, "later": 1})


@pytest.mark.timeout(480)
@explain_failure
def test_a_worker_killed_mid_batch_loses_no_request(stack: Stack):
    requests = 200
    queue = unique_name("embed-kill")
    # About 200 tokens each: a batch keeps the worker busy for a while.
    filler = "the quick brown fox jumps over the lazy dog " * 20
    first = stack.start_worker("first", queue)
    try:
        wait_for_consumer(stack, queue, first)
        with stack.connect() as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
            replies = Replies(channel, reply_queue)
            for index in range(requests):
                request(channel, queue, f"text number {index}: {filler}".encode(),
                        reply_queue, str(index))
            # Kill the worker once it has answered some, while it holds others.
            pump_until(conn, lambda: len(replies.count) >= 20, "20 replies before the kill",
                       [first], timeout=240)
            first.kill9()
            answered_before = len(replies.count)
            # The broker has seen the worker go and requeued what it held:
            # work is left for the next worker.
            waiting = wait_for_no_consumer(conn, queue)
            assert waiting > 0, (f"the first worker finished everything before the kill "
                                 f"({answered_before} answered)")
            second = stack.start_worker("second", queue)
            pump_until(conn, lambda: len(replies.count) >= requests,
                       f"replies to all {requests} requests", [second], timeout=360)
            assert set(replies.count) == {str(i) for i in range(requests)}
            for properties, body in replies.received[:5]:
                check_reply(properties, body, BATCH_SIZE_MAX)
            # A request answered twice can only be one whose reply went out
            # just before the kill, before its ack.
            duplicates = sum(1 for n in replies.count.values() if n > 1)
            assert duplicates <= 16, f"{duplicates} requests answered twice"
            print(f"{stack.kind}: {answered_before} answered before the kill, {waiting} "
                  f"waiting after it, {duplicates} answered twice")
        complaints = first.complaints()
        assert not complaints, "the first worker logged warnings or errors:\n" + \
            "\n".join(complaints)
        second.check_stopped_cleanly()
    finally:
        for worker in stack.workers:
            if worker.name in ("first", "second"):
                worker.stop()
        delete_queues(stack, queue)
