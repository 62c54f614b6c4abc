"""Inference over HTTP (KServe v2 / Open Inference Protocol, docs/http-api.md):
`warren serve` with `[[model]]` entries serving all-MiniLM-L6-v2, driven by
HTTP requests to /v2/... and checked against ONNX Runtime's reference values
(tests/models/minilm-reference.json).

One broker serves the module (loading the model takes a few seconds). Its
configuration has two models:

* `minilm`: the embedding model, with an in-process worker on `QUEUE`.
* `minilm-stalled`: the same model files, whose worker can never start
  consuming: its `result_exchange` names an exchange that does not exist,
  and the worker checks that exchange (passive declare, 404) before it
  declares or consumes anything, then retries every second, forever. So
  nothing ever consumes `STALLED_QUEUE`, and the tests can declare that
  queue themselves and fill it. That is what makes the 429 test
  deterministic: the queue is declared (by pika) with x-max-length 1 and
  x-overflow reject-publish, a filler message is published and confirmed,
  and the infer request then has nowhere to go. With a live worker the
  queue would be drained at a rate no test controls.

`queue_length_max` (a `[[model]]` key declaring the model's queue with
x-max-length and x-overflow reject-publish) gets a broker of its own, so
that a configuration the broker refuses fails that test alone.

The models come from `bash scripts/fetch-models.sh` (models/all-MiniLM-L6-v2
and ONNX Runtime in .venv, or ORT_DYLIB_PATH, which scripts/test.sh
exports). Waits are deadlines around polling, never sleeps.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import pika
import pytest
import requests
from pika.exceptions import ChannelClosedByBroker
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, external_addr, start_broker

pytestmark = [pytest.mark.warren_only("the HTTP inference endpoints are Warren's"),
              pytest.mark.timeout(300)]

MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
REFERENCE = REPO_ROOT / "tests" / "models" / "minilm-reference.json"

MODEL = "minilm"
MODEL_VERSION = "test-1"
QUEUE = "http-embed"
STALLED_MODEL = "minilm-stalled"
STALLED_QUEUE = "http-embed-stalled"
MISSING_EXCHANGE = "http-test-no-such-exchange"
LIMITED_MODEL = "minilm-limited"
LIMITED_QUEUE = "http-embed-limited"
QUEUE_LENGTH_MAX = 2
DIMENSIONS = 384
TOLERANCE = 1e-3

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."

TIMEOUT = 10.0
INFER_TIMEOUT = 60.0
WORKER_READY_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.05
PARALLEL_REQUESTS = 20



# --------------------------------------------------------------------------
# helpers


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


def model_entry(name: str, queue: str, extra: str = "") -> str:
    for file in ("model.onnx", "tokenizer.json"):
        if not (MODEL_DIR / file).exists():
            pytest.fail(f"{MODEL_DIR / file} is missing; run `bash scripts/fetch-models.sh`",
                        pytrace=False)
    return f"""
[[model]]
name = "{name}"
version = "{MODEL_VERSION}"
path = "{(MODEL_DIR / 'model.onnx').resolve()}"
tokenizer = "{(MODEL_DIR / 'tokenizer.json').resolve()}"
task = "embedding"
queue = "{queue}"
max_tokens = 256
batch_size_max = 8
batch_delay_max_ms = 5
{extra}

[model.runtime]
backend = "onnxruntime"
onnxruntime_library = "{onnxruntime_library()}"
"""


def reference() -> Tuple[Dict[str, List[float]], float]:
    """(first dimensions of each sentence's embedding, cos(FOOD, BREAD))
    from ONNX Runtime's reference."""
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    sentences = data["sentences"]
    dims = {s["text"]: s["embedding_first_dims"] for s in sentences}
    index = {s["text"]: i for i, s in enumerate(sentences)}
    a, b = sorted((index[FOOD], index[BREAD]))
    cosine_ab = [c["cosine"] for c in data["cosines"] if (c["a"], c["b"]) == (a, b)]
    assert len(cosine_ab) == 1, data["cosines"]
    return dims, cosine_ab[0]


def http_url_of(broker) -> str:
    """http://HOST:PORT of the broker's HTTP listener, which conftest reads
    from its `HTTP listener ready addr=HOST:PORT` log line."""
    if broker.http_url is None:
        pytest.fail("the broker did not log 'HTTP listener ready addr=HOST:PORT'. "
                    f"Its log:\n{broker.log(tail=100)}", pytrace=False)
    return broker.http_url


def eventually(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Calls check() until it returns a value other than False/None without
    an AssertionError; fails after `timeout` with the last assertion."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value is not False and value is not None:
                return value
            last: Optional[BaseException] = None
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            detail = f": {last}" if last is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(POLL_INTERVAL_S)


def describe(resp: requests.Response) -> str:
    return f"{resp.request.method} {resp.request.url} -> {resp.status_code} {resp.text[:500]!r}"


def session(auth: Optional[Tuple[str, str]] = ("guest", "guest")) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.auth = auth
    return s


def assert_error(resp: requests.Response, status: int) -> Dict[str, Any]:
    """A KServe v2 error: the status, and `{"error": MESSAGE}` as the
    protocol has it (tritonclient shows that message)."""
    assert resp.status_code == status, describe(resp)
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert set(body) == {"error"}, body
    return body


def texts_request(texts: List[str], request_id: Optional[str] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES",
                                        "shape": [len(texts)], "data": texts}]}
    if request_id is not None:
        body["id"] = request_id
    return body


def flatten(data: Any) -> List[float]:
    """A v2 tensor's data, flat (the protocol allows nested row-major)."""
    if isinstance(data, list):
        out: List[float] = []
        for item in data:
            out.extend(flatten(item))
        return out
    return [data]


def embeddings(response: Dict[str, Any], count: int) -> List[List[float]]:
    """The `embedding` output of a v2 response, checked for shape and type,
    as `count` vectors."""
    outputs = response["outputs"]
    assert len(outputs) == 1, outputs
    out = outputs[0]
    assert out["name"] == "embedding", out.get("name")
    assert out["datatype"] == "FP32", out["datatype"]
    assert out["shape"] == [count, DIMENSIONS], out["shape"]
    flat = flatten(out["data"])
    assert len(flat) == count * DIMENSIONS, len(flat)
    assert all(isinstance(x, (int, float)) for x in flat)
    vectors = [flat[i * DIMENSIONS:(i + 1) * DIMENSIONS] for i in range(count)]
    for v in vectors:
        norm = math.sqrt(sum(x * x for x in v))
        assert abs(norm - 1.0) < TOLERANCE, f"not L2-normalised: norm {norm}"
    return vectors


def cosine(a: List[float], b: List[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def queue_counts(conn: pika.BlockingConnection, queue: str) -> Optional[Tuple[int, int]]:
    """(ready messages, consumers), None if the queue does not exist."""
    ch = conn.channel()
    try:
        ok = ch.queue_declare(queue=queue, passive=True)
    except ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return None
    ch.close()
    return ok.method.message_count, ok.method.consumer_count


def wait_for_consumer(broker, queue: str, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
    """Until the model's worker consumes from `queue` (seen over AMQP, so a
    broken HTTP side cannot hide a worker that is up)."""
    conn = broker.connect()
    try:
        deadline = time.monotonic() + timeout
        while True:
            counts = queue_counts(conn, queue)
            if counts is not None and counts[1] > 0:
                return
            if broker.proc.poll() is not None:
                pytest.fail(f"warren exited with status {broker.proc.returncode}:\n"
                            f"{broker.log(tail=100)}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no worker consumes {queue} after {timeout:.0f}s. Broker log:\n"
                            f"{broker.log(tail=100)}", pytrace=False)
            conn.sleep(POLL_INTERVAL_S)
    finally:
        conn.close()


class Inference:
    def __init__(self, broker, base: str):
        self.broker = broker
        self.base = base
        self.http = session()

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        return self.http.get(self.base + path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", INFER_TIMEOUT)
        return self.http.post(self.base + path, **kwargs)

    def infer(self, texts: List[str], model: str = MODEL, **kwargs) -> Dict[str, Any]:
        resp = self.post(f"/v2/models/{model}/infer", json=texts_request(texts, **kwargs))
        assert resp.status_code == 200, describe(resp)
        return resp.json()


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def inference(tmp_path_factory):
    if external_addr() is not None:
        pytest.skip("starts its own Warren process")
    config = (model_entry(MODEL, QUEUE)
              + model_entry(STALLED_MODEL, STALLED_QUEUE,
                            f'result_exchange = "{MISSING_EXCHANGE}"'))
    broker = start_broker(tmp_path_factory.mktemp("warren-http-inference"), config)
    try:
        wait_for_consumer(broker, QUEUE)
        client = Inference(broker, http_url_of(broker))
        yield client
        client.http.close()
    finally:
        broker.close_connections()
        status = broker.stop()
        broker.finish()
    assert status == 0, f"warren exited with status {status} after SIGTERM:\n{broker.log(tail=100)}"


@pytest.fixture(autouse=True)
def _attach_broker_log(request):
    """Lets conftest attach the module broker's log to a failing test."""
    if "inference" not in request.fixturenames:
        yield
        return
    broker = request.getfixturevalue("inference").broker
    try:
        from conftest import _active_brokers  # pylint: disable=import-outside-toplevel
    except ImportError:
        yield
        return
    _active_brokers.setdefault(request.node.nodeid, []).append(broker)
    yield


# --------------------------------------------------------------------------
# health and metadata


def test_health(inference):
    resp = inference.get("/v2/health/live")
    assert resp.status_code == 200, describe(resp)
    # KServe v2: the server is ready when all its models are; the stalled
    # model has no worker on its queue, so the server is not.
    eventually(lambda: inference.get(f"/v2/models/{MODEL}/ready").status_code == 200,
               f"{MODEL} to be ready")
    resp = inference.get("/v2/health/ready")
    assert resp.status_code == 503, describe(resp)


def test_v2_needs_credentials(inference):
    anon = session(None)
    try:
        for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
            resp = anon.get(inference.base + path, timeout=TIMEOUT)
            assert_error(resp, 401)
        resp = anon.post(inference.base + f"/v2/models/{MODEL}/infer",
                         json=texts_request([FOOD]), timeout=TIMEOUT)
        assert_error(resp, 401)
        resp = session(("guest", "wrong")).get(inference.base + f"/v2/models/{MODEL}",
                                              timeout=TIMEOUT)
        assert_error(resp, 401)
    finally:
        anon.close()


def test_model_metadata(inference):
    resp = inference.get(f"/v2/models/{MODEL}")
    assert resp.status_code == 200, describe(resp)
    meta = resp.json()
    assert meta["name"] == MODEL
    assert MODEL_VERSION in meta["versions"], meta
    assert isinstance(meta["platform"], str) and meta["platform"], meta
    assert len(meta["inputs"]) == 1, meta["inputs"]
    text_input = meta["inputs"][0]
    assert (text_input["name"], text_input["datatype"]) == ("text", "BYTES"), text_input
    assert len(text_input["shape"]) == 1, text_input
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert set(outputs) == {"embedding"}, meta["outputs"]
    assert outputs["embedding"]["datatype"] == "FP32"
    assert len(outputs["embedding"]["shape"]) == 2, outputs
    # The metadata comes from the configuration, before the model is
    # loaded: the vector length shows as -1 (variable), as KServe allows.
    assert outputs["embedding"]["shape"] == [-1, -1], outputs


def test_model_ready_once_the_worker_consumes(inference):
    eventually(lambda: inference.get(f"/v2/models/{MODEL}/ready").status_code == 200,
               f"/v2/models/{MODEL}/ready to answer 200")


def test_model_without_a_consumer_is_not_ready(inference):
    resp = inference.get(f"/v2/models/{STALLED_MODEL}/ready")
    assert resp.status_code == 503, describe(resp)
    # Its metadata is there all the same.
    assert inference.get(f"/v2/models/{STALLED_MODEL}").json()["name"] == STALLED_MODEL


def test_unknown_model_is_404(inference):
    assert_error(inference.get("/v2/models/no-such-model"), 404)
    assert_error(inference.get("/v2/models/no-such-model/ready"), 404)
    assert_error(inference.post("/v2/models/no-such-model/infer",
                                json=texts_request([FOOD])), 404)
    assert_error(inference.post(f"/v2/models/{MODEL}/versions/no-such-version/infer",
                                json=texts_request([FOOD])), 404)


# --------------------------------------------------------------------------
# infer


def test_infer_embeddings_match_onnx_runtime(inference):
    response = inference.infer([FOOD, BREAD], request_id="req-food-bread")
    assert response["model_name"] == MODEL, response.get("model_name")
    assert response.get("id") == "req-food-bread", response.get("id")
    food, bread = embeddings(response, 2)
    first_dims, expected_cosine = reference()
    got = cosine(food, bread)
    assert abs(got - expected_cosine) < TOLERANCE, f"cos(food, bread) = {got}, " \
                                                   f"ONNX Runtime {expected_cosine}"
    assert abs(got - 0.75349) < TOLERANCE, got
    for text, vector in ((FOOD, food), (BREAD, bread)):
        expected = first_dims[text]
        head = vector[:len(expected)]
        assert all(abs(g - e) < TOLERANCE for g, e in zip(head, expected)), \
            f"{text!r}: first dimensions {head}, ONNX Runtime {expected}"


def test_infer_with_a_version_in_the_path(inference):
    resp = inference.post(f"/v2/models/{MODEL}/versions/{MODEL_VERSION}/infer",
                          json=texts_request([FOOD]))
    assert resp.status_code == 200, describe(resp)
    (vector,) = embeddings(resp.json(), 1)
    first_dims, _ = reference()
    expected = first_dims[FOOD]
    assert all(abs(g - e) < TOLERANCE for g, e in zip(vector, expected)), vector[:8]


BAD_REQUESTS = {
    "wrong-datatype": {"inputs": [{"name": "text", "datatype": "FP32", "shape": [2],
                                   "data": [1.0, 2.0]}]},
    "no-inputs-field": {},
    "empty-inputs": {"inputs": []},
    "shape-does-not-match-data": {"inputs": [{"name": "text", "datatype": "BYTES",
                                              "shape": [3], "data": [FOOD, BREAD]}]},
    "malformed-json": '{"inputs": [',
}


@pytest.mark.parametrize("body", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_infer_with_an_input_the_model_cannot_take_is_400(inference, body):
    if isinstance(body, str):
        resp = inference.post(f"/v2/models/{MODEL}/infer", data=body,
                              headers={"Content-Type": "application/json"})
    else:
        resp = inference.post(f"/v2/models/{MODEL}/infer", json=body)
    assert_error(resp, 400)
    # The model still answers.
    embeddings(inference.infer([FOOD]), 1)


def test_parallel_requests_each_get_their_own_answer(inference):
    texts = [f"sentence number {i} about queues and brokers" for i in range(PARALLEL_REQUESTS)]

    def one(text: str) -> Tuple[int, Any]:
        with session() as s:
            resp = s.post(inference.base + f"/v2/models/{MODEL}/infer",
                          json=texts_request([text]), timeout=INFER_TIMEOUT)
            return resp.status_code, (resp.json() if resp.status_code == 200 else resp.text)

    with ThreadPoolExecutor(max_workers=PARALLEL_REQUESTS) as pool:
        results = list(pool.map(one, texts))
    failed = [(t, r) for t, r in zip(texts, results) if r[0] != 200]
    assert not failed, failed
    parallel = [embeddings(body, 1)[0] for _status, body in results]
    # Each answer is its own request's: the same text alone gives the same
    # vector, and different texts give different vectors.
    for text, vector in zip(texts[:5], parallel[:5]):
        (alone,) = embeddings(inference.infer([text]), 1)
        assert max(abs(a - b) for a, b in zip(alone, vector)) < TOLERANCE, text
    assert len({tuple(round(x, 4) for x in v[:16]) for v in parallel}) == PARALLEL_REQUESTS


def test_infer_on_a_full_model_queue_is_429(inference):
    """Deterministic: nothing consumes STALLED_QUEUE (see the module doc), so
    once it holds its one allowed message the request cannot be queued."""
    conn = inference.broker.connect()
    ch = conn.channel()
    ch.queue_delete(queue=STALLED_QUEUE)
    ch.queue_declare(queue=STALLED_QUEUE, durable=True,
                     arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key=STALLED_QUEUE, body=b"filler", mandatory=True)
    try:
        resp = inference.post(f"/v2/models/{STALLED_MODEL}/infer", json=texts_request([FOOD]),
                              timeout=TIMEOUT)
        assert_error(resp, 429)
        # Nothing drains the queue, so there is no drain time to give: the
        # client is told one rate window (5 s), after which there is one.
        assert resp.headers.get("Retry-After") == "5", resp.headers
        stalled = {m["name"]: m for m in inference.get("/api/models").json()}[STALLED_MODEL]
        assert (stalled["messages"], stalled["service_rate"], stalled["drain_seconds"]) == \
            (1, 0, None), stalled
        assert queue_counts(conn, STALLED_QUEUE) == (1, 0)
        method, _props, body = ch.basic_get(queue=STALLED_QUEUE, auto_ack=True)
        assert method is not None and body == b"filler"
    finally:
        ch.queue_delete(queue=STALLED_QUEUE)


def test_a_request_past_its_timeout_is_dead_lettered_before_any_worker_runs_it(inference):
    """Triton's `timeout` parameter (microseconds) becomes the request's AMQP
    expiration: nothing consumes STALLED_QUEUE, so the request expires in
    the queue and the broker dead-letters it with reason `expired`, and the
    HTTP client gets 504 after its own timeout rather than the server's."""
    expired_queue = "http-embed-stalled-expired"
    timeout_us = 300_000
    conn = inference.broker.connect()
    ch = conn.channel()
    ch.queue_delete(queue=STALLED_QUEUE)
    ch.queue_declare(queue=expired_queue, durable=True)
    ch.queue_purge(queue=expired_queue)
    ch.queue_declare(queue=STALLED_QUEUE, durable=True,
                     arguments={"x-dead-letter-exchange": "",
                                "x-dead-letter-routing-key": expired_queue})
    try:
        body = texts_request([FOOD])
        body["parameters"] = {"timeout": timeout_us}
        started = time.monotonic()
        resp = inference.post(f"/v2/models/{STALLED_MODEL}/infer", json=body)
        waited = time.monotonic() - started
        assert_error(resp, 504)
        assert "300ms" in resp.json()["error"], resp.text
        assert waited < TIMEOUT, waited

        def dead_lettered():
            method, props, dead = ch.basic_get(queue=expired_queue, auto_ack=True)
            return (props, dead) if method is not None else None

        props, dead = eventually(dead_lettered, "the expired request in the dead-letter queue")
        assert dead == FOOD.encode(), dead
        assert props.expiration is None, props  # RabbitMQ removes it on dead-lettering
        death = props.headers["x-death"][0]
        assert (death["reason"], death["queue"]) == ("expired", STALLED_QUEUE), death
        assert death["original-expiration"] == str(timeout_us // 1000), death
        assert queue_counts(conn, STALLED_QUEUE) == (0, 0)

        body["parameters"] = {"timeout": "soon"}
        assert_error(inference.post(f"/v2/models/{STALLED_MODEL}/infer", json=body), 400)
    finally:
        ch.queue_delete(queue=STALLED_QUEUE)
        ch.queue_delete(queue=expired_queue)
        conn.close()


# --------------------------------------------------------------------------
# the management side of models


def test_api_models_and_model_metrics(inference):
    inference.infer([FOOD])

    def check():
        resp = inference.get("/api/models")
        assert resp.status_code == 200, describe(resp)
        models = {m["name"]: m for m in resp.json()}
        assert set(models) == {MODEL, STALLED_MODEL}, models
        m = models[MODEL]
        assert (m["version"], m["queue"], m["task"], m["ready"]) == \
            (MODEL_VERSION, QUEUE, "embedding", True), m
        assert m["consumers"] >= 1, m
        assert m["requests"] >= 1 and m["replies"] >= 1, m
        for hist in ("batch_size", "batch_wait_us", "inference_us"):
            h = m[hist]
            assert h["count"] >= 1, (hist, h)
            assert isinstance(h["buckets"], list) and h["buckets"], (hist, h)
            assert h["buckets"][-1][0] is None, (hist, h["buckets"])
        stalled = models[STALLED_MODEL]
        assert (stalled["ready"], stalled["consumers"], stalled["queue"]) == \
            (False, 0, STALLED_QUEUE), stalled
        return True

    eventually(check, "/api/models to show the models and the request served")

    def metric_check():
        resp = requests.get(inference.base + "/metrics", timeout=TIMEOUT)
        assert resp.status_code == 200, describe(resp)
        pattern = re.compile(r'^warren_model_requests_total\{[^}]*model="%s"[^}]*\}\s+(\S+)$'
                             % re.escape(MODEL), re.M)
        m = pattern.search(resp.text)
        assert m and float(m.group(1)) >= 1, resp.text[:2000]
        assert re.search(r'^warren_model_batch_size_count\{[^}]*model="%s"' % re.escape(MODEL),
                         resp.text, re.M), "no warren_model_batch_size histogram"
        return True

    eventually(metric_check, "warren_model_requests_total for the model")


def test_backlog_signals_while_the_model_drains_its_queue(inference):
    """A backlog published straight onto the model's queue: while the
    worker drains it, /api/models, the queue in /api/queues and /metrics
    show the measured service rate and the expected time to drain, and once
    it is empty the drain time is 0."""
    # Published without waiting for each confirm, and long enough texts,
    # so that the backlog outlasts the 5 s rate window on a fast machine.
    backlog = 1200
    conn = inference.broker.connect()
    ch = conn.channel()
    for i in range(backlog):
        ch.basic_publish(exchange="", routing_key=QUEUE,
                         body=(f"backlog text {i}, " * 8).encode(),
                         properties=pika.BasicProperties(content_type="text/plain"))
    conn.close()

    def draining():
        model = {m["name"]: m for m in inference.get("/api/models").json()}[MODEL]
        if model["messages"] == 0 or model["service_rate"] == 0:
            return None
        return model

    model = eventually(draining, "a service rate measured while the backlog drains",
                       timeout=INFER_TIMEOUT)
    assert 0 < model["service_rate"] <= backlog, model
    assert model["drain_seconds"] > 0, model
    assert model["drain_seconds"] == pytest.approx(model["messages"] / model["service_rate"]), model
    queue = inference.get(f"/api/queues/%2F/{QUEUE}").json()
    assert queue["model"]["name"] == MODEL, queue
    assert queue["model"]["service_rate"] > 0, queue
    assert queue["messages"] >= 0 and "message_stats" in queue, queue
    metrics = requests.get(inference.base + "/metrics", timeout=TIMEOUT).text
    rate = re.search(r'^warren_model_service_rate\{model="%s"\}\s+(\S+)$' % re.escape(MODEL),
                     metrics, re.M)
    assert rate, metrics[:2000]
    assert re.search(r'^warren_model_drain_seconds\{model="%s"\}\s+\S+$' % re.escape(MODEL),
                     metrics, re.M), "no warren_model_drain_seconds"

    def drained():
        model = {m["name"]: m for m in inference.get("/api/models").json()}[MODEL]
        return model if model["messages"] == 0 else None

    model = eventually(drained, "the backlog to drain", timeout=INFER_TIMEOUT * 4)
    assert model["drain_seconds"] == 0, model


# --------------------------------------------------------------------------
# queue_length_max: a broker of its own


def test_queue_length_max_declares_a_bounded_model_queue(broker_factory):
    """`queue_length_max = N` in `[[model]]` declares the model's queue with
    x-max-length N and x-overflow reject-publish. The worker drains the
    queue at its own pace, so how many of a burst find it full is not
    deterministic: each request must get either its answer or a 429 with
    Retry-After (test_infer_on_a_full_model_queue_is_429 checks the 429
    itself deterministically)."""
    broker = broker_factory(config=model_entry(
        LIMITED_MODEL, LIMITED_QUEUE, f"queue_length_max = {QUEUE_LENGTH_MAX}"))
    wait_for_consumer(broker, LIMITED_QUEUE)
    base = http_url_of(broker)
    with session() as http:
        resp = http.get(base + f"/api/queues/%2F/{LIMITED_QUEUE}", timeout=TIMEOUT)
        assert resp.status_code == 200, describe(resp)
        arguments = resp.json()["arguments"]
        assert arguments.get("x-max-length") == QUEUE_LENGTH_MAX, arguments
        assert arguments.get("x-overflow") == "reject-publish", arguments

    def one(i: int) -> requests.Response:
        with session() as s:
            return s.post(base + f"/v2/models/{LIMITED_MODEL}/infer",
                          json=texts_request([f"burst request {i} " * 20]),
                          timeout=INFER_TIMEOUT)

    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(one, range(30)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses, statuses
    for resp in answers:
        if resp.status_code == 200:
            embeddings(resp.json(), 1)
        else:
            assert_error(resp, 429)
            retry_after = resp.headers.get("Retry-After", "")
            assert retry_after.isdigit() and 1 <= int(retry_after) <= 300, resp.headers


GRAFANA_DASHBOARD = REPO_ROOT / "grafana" / "warren-models.json"


def test_the_grafana_dashboard_queries_metrics_the_broker_serves(inference):
    """grafana/warren-models.json graphs the model metrics: every metric its
    queries name is served by /metrics, labelled `model`, once a request has
    been answered."""
    inference.infer([FOOD])
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs, dashboard
    queried = {re.sub(r"_(bucket|sum|count)$", "", name)
               for expr in exprs for name in re.findall(r"\bwarren_[a-z_]+", expr)}
    assert len(queried) >= 8, queried

    def served_with_model_label():
        resp = requests.get(inference.base + "/metrics", timeout=TIMEOUT)
        assert resp.status_code == 200, describe(resp)
        labelled = set()
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if sample.labels.get("model") == MODEL:
                    labelled.add(family.name)
                    # A counter's family is named without `_total`.
                    labelled.add(family.name + "_total")
        missing = sorted(queried - labelled)
        assert not missing, missing
        return True

    eventually(served_with_model_label, "every metric the dashboard queries")
