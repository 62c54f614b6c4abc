"""How a model's worker schedules what it holds (docs/inference.md,
"Scheduling"): requests of higher AMQP `priority` run first, a request
whose `expiration` has passed is dead-lettered before it costs an
inference, and `max_batch_tokens` keeps a batch within its token budget.
And how HTTP requests are admitted by their tokens (`max_queued_tokens`).

The requests are queued before the model loads (through the management
API), so the worker finds them all waiting: with `batch_size_max` as large
as the whole set and a long `batch_delay_max_ms`, it holds every one of
them before it forms its first batch, and the order of the replies on the
reply queue is the order in which it ran them. The queue is a plain FIFO
queue declared by the test, so the order comes from the worker, not the
broker.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import pika
import pytest

from conftest import start_broker
from test_http_inference import (FOOD, TIMEOUT, assert_error, describe, eventually,
                                 http_url_of, session, texts_request)
from test_inference_jobs import ASYNC
from test_model_deploy import LOAD_TIMEOUT, entry

pytestmark = [pytest.mark.warren_only("the model worker is Warren's"),
              pytest.mark.timeout(300)]

MODEL = "minilm-scheduled"
QUEUE = "scheduled-embed"
DEAD_LETTERS = f"{QUEUE}.dead-letter"
# "A man is eating food." is 8 tokens with [CLS] and [SEP]: two fit in a
# batch of 20 tokens, three do not.
TOKEN_BUDGET = 20


def publish(ch, reply_to: str, name: str, priority: int = 0,
            expiration_ms: int = 0, published_ms_ago: int = 0) -> None:
    headers: Dict[str, Any] = {}
    if published_ms_ago:
        headers["timestamp_in_ms"] = int(time.time() * 1000) - published_ms_ago
    ch.basic_publish(
        exchange="", routing_key=QUEUE, body=FOOD.encode(), mandatory=True,
        properties=pika.BasicProperties(
            reply_to=reply_to, correlation_id=name, priority=priority,
            expiration=str(expiration_ms) if expiration_ms else None,
            content_type="text/plain", headers=headers or None))


def test_priority_expiry_and_token_budget_shape_the_batches(tmp_path):
    broker = start_broker(tmp_path / "warren")
    try:
        base = http_url_of(broker)
        http = session()
        conn = broker.connect()
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue=QUEUE, durable=True)
        replies = ch.queue_declare(queue="", exclusive=True).method.queue

        # Published, by its own clock, two minutes ago with a minute to
        # live: the broker delivers it (it measures from its arrival), the
        # worker sees it is past its time.
        publish(ch, replies, "stale", expiration_ms=60_000, published_ms_ago=120_000)
        publish(ch, replies, "fresh", expiration_ms=60_000)
        for index in range(1, 7):
            publish(ch, replies, f"low-{index}")
        publish(ch, replies, "high-1", priority=9)
        publish(ch, replies, "high-2", priority=9)

        model = {**entry(QUEUE), "batch_size_max": 10, "batch_delay_max_ms": 3_000,
                 "max_batch_tokens": TOKEN_BUDGET}
        resp = http.put(f"{base}/api/models/{MODEL}/versions/1", json=model,
                        timeout=LOAD_TIMEOUT)
        assert resp.status_code == 201, describe(resp)

        got: List[Tuple[str, Dict[str, Any]]] = []

        def all_replies():
            while True:
                method, props, _body = ch.basic_get(queue=replies, auto_ack=True)
                if method is None:
                    return len(got) == 10
                got.append((props.correlation_id, props.headers or {}))
        eventually(all_replies, "ten replies", timeout=LOAD_TIMEOUT)

        assert got[0][0] == "stale" and "expired" in got[0][1]["x-warren-error"], got[0]
        order = [name for name, _ in got[1:]]
        assert order == ["high-1", "high-2", "fresh", "low-1", "low-2", "low-3", "low-4",
                         "low-5", "low-6"], order
        sizes = [headers["x-warren-batch-size"] for _, headers in got[1:]]
        assert sizes == [2] * 8 + [1], sizes
        method, props, _ = ch.basic_get(queue=DEAD_LETTERS, auto_ack=True)
        assert method is not None and props.correlation_id == "stale", props
        assert "expired" in props.headers["x-warren-error"], props.headers

        listed = {m["name"]: m for m in http.get(f"{base}/api/models", timeout=TIMEOUT).json()}
        stats = listed[MODEL]
        assert (stats["expired"], stats["replies"], stats["requests"]) == (1, 9, 10), stats
        conn.close()
    finally:
        broker.close_connections()
        assert broker.stop() == 0, broker.log(tail=100)
        broker.finish()


def test_http_requests_are_admitted_by_their_queued_tokens(tmp_path):
    """With `max_queued_tokens` 20, the 8-token requests the worker holds
    (its batch waits BATCH_DELAY_S to fill) take 8 tokens each until they
    are answered, a job's until it finishes: a third is refused with 429
    and a Retry-After, and a request of 24 tokens can never fit (413)."""
    model_name, queue, budget = "minilm-admitted", "admitted-embed", 20
    batch_delay_ms = 6_000
    broker = start_broker(tmp_path / "warren")
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        base = http_url_of(broker)
        http = session()
        model = {**entry(queue), "batch_size_max": 64, "batch_delay_max_ms": batch_delay_ms,
                 "max_queued_tokens": budget}
        resp = http.put(f"{base}/api/models/{model_name}/versions/1", json=model,
                        timeout=LOAD_TIMEOUT)
        assert resp.status_code == 201, describe(resp)
        assert (resp.json()["max_queued_tokens"], resp.json()["queued_tokens"]) == (budget, 0)
        url = f"{base}/v2/models/{model_name}/infer"

        def queued_tokens() -> Optional[int]:
            listed = {m["name"]: m for m in http.get(f"{base}/api/models",
                                                      timeout=TIMEOUT).json()}
            return listed[model_name]["queued_tokens"]

        error = assert_error(http.post(url, json=texts_request([FOOD] * 3), timeout=TIMEOUT),
                             413)
        assert "24 tokens" in error["error"], error
        assert queued_tokens() == 0

        held = pool.submit(http.post, url, json=texts_request([FOOD]),
                           timeout=batch_delay_ms / 1000 + TIMEOUT)
        eventually(lambda: queued_tokens() == 8, "the first request's 8 tokens queued")
        resp = http.post(url, json=texts_request([FOOD]), headers=ASYNC, timeout=TIMEOUT)
        assert resp.status_code == 202, describe(resp)
        job_id = resp.json()["id"]
        assert queued_tokens() == 16

        refused = http.post(url, json=texts_request([FOOD]), timeout=TIMEOUT)
        error = assert_error(refused, 429)
        assert "16 of its 20 queued tokens" in error["error"], error
        assert int(refused.headers["Retry-After"]) >= 1, refused.headers
        assert queued_tokens() == 16

        answered = held.result()
        assert answered.status_code == 200, describe(answered)

        def job_done():
            job = http.get(f"{base}/v2/jobs/{job_id}", timeout=TIMEOUT).json()
            return job if job["status"] == "done" else None
        eventually(job_done, "the job's result", timeout=LOAD_TIMEOUT)
        eventually(lambda: queued_tokens() == 0, "every token given back")
        resp = http.post(url, json=texts_request([FOOD, FOOD]),
                         timeout=batch_delay_ms / 1000 + TIMEOUT)
        assert resp.status_code == 200, describe(resp)
        assert queued_tokens() == 0
    finally:
        pool.shutdown(wait=True)
        broker.close_connections()
        assert broker.stop() == 0, broker.log(tail=100)
        broker.finish()
