"""Asynchronous inference jobs (docs/http-api.md, "Jobs"): KServe v2
`POST /v2/models/{m}/infer` with `Prefer: respond-async` answers 202 with
a `Location`, `GET /v2/jobs/{id}` says where the job is and gives its
result once done, results survive `kill -9` of the broker and expire after
the configured retention, and an AMQP request with a `message_id` and no
`reply_to` has its result kept under that id.

The model is all-MiniLM-L6-v2 (test_http_inference's entry), checked
against ONNX Runtime's reference values. A model whose worker never starts
consuming (its `result_exchange` names an exchange that does not exist, as
in test_http_inference) keeps jobs queued for as long as a test needs;
restarting the broker with a working entry for the same queue then serves
them. Waits are deadlines around polling, never sleeps.
"""

from __future__ import annotations

import pathlib
import signal
from typing import Any, Dict, List

import pika
import pytest
import requests

from conftest import start_broker
from test_http_inference import (BREAD, FOOD, MISSING_EXCHANGE, TOLERANCE, cosine,
                                 describe, embeddings, eventually, http_url_of,
                                 model_entry, reference, session, texts_request,
                                 wait_for_consumer)

pytestmark = [pytest.mark.warren_only("jobs are Warren's"), pytest.mark.timeout(300)]

MODEL = "minilm-jobs"
QUEUE = "jobs-embed"
JOB_TIMEOUT = 60.0
ASYNC = {"Prefer": "respond-async"}


def working(extra_http: str = "") -> str:
    return f"[http]\n{extra_http}\n" + model_entry(MODEL, QUEUE)


def stalled(extra_http: str = "") -> str:
    """The same model and queue, with a worker that never consumes."""
    return f"[http]\n{extra_http}\n" + model_entry(
        MODEL, QUEUE, f'result_exchange = "{MISSING_EXCHANGE}"')


def submit(http: requests.Session, base: str, texts: List[str], **body: Any) -> Dict[str, Any]:
    request = texts_request(texts)
    request.update(body)
    resp = http.post(f"{base}/v2/models/{MODEL}/infer", json=request, headers=ASYNC,
                     timeout=JOB_TIMEOUT)
    assert resp.status_code == 202, describe(resp)
    assert resp.headers.get("Preference-Applied") == "respond-async", resp.headers
    job = resp.json()
    assert resp.headers["Location"] == f"/v2/jobs/{job['id']}", (resp.headers, job)
    assert job["model_name"] == MODEL and job["parts"] == len(texts), job
    return job


def status(http: requests.Session, base: str, job_id: str) -> Dict[str, Any]:
    resp = http.get(f"{base}/v2/jobs/{job_id}", timeout=JOB_TIMEOUT)
    assert resp.status_code == 200, describe(resp)
    return resp.json()


def finished(http: requests.Session, base: str, job_id: str) -> Dict[str, Any]:
    def done():
        job = status(http, base, job_id)
        assert job["status"] in ("queued", "running", "done"), job
        return job if job["status"] == "done" else None
    return eventually(done, f"job {job_id} to finish", timeout=JOB_TIMEOUT)


def assert_food_and_bread(result: Dict[str, Any]) -> None:
    food, bread = embeddings(result, 2)
    first_dims, expected_cosine = reference()
    assert abs(cosine(food, bread) - expected_cosine) < TOLERANCE
    for text, vector in ((FOOD, food), (BREAD, bread)):
        expected = first_dims[text]
        assert all(abs(g - e) < TOLERANCE for g, e in zip(vector, expected)), text


def publish_amqp_job(broker, message_id: str, body: bytes) -> None:
    conn = broker.connect()
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange="", routing_key=QUEUE, body=body, mandatory=True,
                         properties=pika.BasicProperties(message_id=message_id,
                                                         content_type="text/plain",
                                                         delivery_mode=2))
    finally:
        conn.close()


def kill_and_restart(broker, workdir: pathlib.Path, config: str):
    broker.close_connections()
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait()
    broker.finish()
    restarted = start_broker(workdir, config)
    return restarted, http_url_of(restarted)


# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_broker(tmp_path_factory):
    broker = start_broker(tmp_path_factory.mktemp("warren-jobs"), working())
    try:
        wait_for_consumer(broker, QUEUE)
        yield broker, http_url_of(broker)
    finally:
        broker.close_connections()
        assert broker.stop() == 0, broker.log(tail=100)
        broker.finish()


def test_a_job_gives_the_answer_the_synchronous_call_gives(jobs_broker):
    broker, base = jobs_broker
    http = session()
    job = submit(http, base, [FOOD, BREAD], id="request-7",
                 outputs=[{"name": "embedding"}])
    assert job["status"] in ("queued", "running", "done"), job
    done = finished(http, base, job["id"])
    assert done["completed_ms"] >= done["submitted_ms"], done
    assert done["expires_ms"] > done["completed_ms"], done
    result = done["result"]
    assert result["id"] == "request-7" and result["model_name"] == MODEL, result
    assert_food_and_bread(result)

    sync = http.post(f"{base}/v2/models/{MODEL}/infer", json=texts_request([FOOD, BREAD]),
                     timeout=JOB_TIMEOUT)
    assert sync.status_code == 200, describe(sync)
    assert sync.json()["outputs"][0]["shape"] == result["outputs"][0]["shape"]

    resp = http.delete(f"{base}/v2/jobs/{job['id']}", timeout=JOB_TIMEOUT)
    assert resp.status_code == 204, describe(resp)
    assert http.get(f"{base}/v2/jobs/{job['id']}", timeout=JOB_TIMEOUT).status_code == 404
    assert http.delete(f"{base}/v2/jobs/{job['id']}", timeout=JOB_TIMEOUT).status_code == 404


def test_a_job_needs_credentials_and_an_unknown_one_is_404(jobs_broker):
    _broker, base = jobs_broker
    resp = session(auth=None).get(f"{base}/v2/jobs/0123", timeout=JOB_TIMEOUT)
    assert resp.status_code == 401, describe(resp)
    resp = session().get(f"{base}/v2/jobs/0123", timeout=JOB_TIMEOUT)
    assert resp.status_code == 404, describe(resp)
    assert "0123" in resp.json()["error"], resp.text


def test_an_amqp_request_with_a_message_id_and_no_reply_to_is_kept_as_a_job(jobs_broker):
    broker, base = jobs_broker
    http = session()
    publish_amqp_job(broker, "amqp-job-food", FOOD.encode())
    done = finished(http, base, "amqp-job-food")
    assert (done["model_name"], done["parts"]) == (MODEL, 1), done
    [vector] = embeddings(done["result"], 1)
    expected = reference()[0][FOOD]
    assert all(abs(g - e) < TOLERANCE for g, e in zip(vector, expected))

    # An input the model refuses fails the job, with the model's reason.
    publish_amqp_job(broker, "amqp-job-poison", b"\xff\xfe not UTF-8")

    def failed():
        resp = http.get(f"{base}/v2/jobs/amqp-job-poison", timeout=JOB_TIMEOUT)
        return resp.json() if resp.status_code == 200 else None
    job = eventually(failed, "the poison job's failure", timeout=JOB_TIMEOUT)
    assert job["status"] == "failed" and "UTF-8" in job["error"], job
    assert "result" not in job, job


def test_jobs_survive_kill_9_queued_and_finished(tmp_path):
    """Jobs queued while nothing consumes their queue are still there after
    SIGKILL, are served by the restarted broker, and their results are
    still there after a second SIGKILL."""
    workdir = tmp_path / "warren"
    broker = start_broker(workdir, stalled("jobs_max = 2"))
    base = http_url_of(broker)
    http = session()
    conn = broker.connect()
    # The stalled worker never declares its queue: declare it as the
    # working one will find it.
    conn.channel().queue_declare(queue=QUEUE, durable=True)
    conn.close()

    first = submit(http, base, [FOOD, BREAD])
    second = submit(http, base, [FOOD])
    assert (first["status"], first["position"]) == ("queued", 0), first
    assert (second["status"], second["position"]) == ("queued", 2), second
    assert second["expected_wait_seconds"] is None, second  # nothing drains the queue
    refused = http.post(f"{base}/v2/models/{MODEL}/infer", json=texts_request([FOOD]),
                        headers=ASYNC, timeout=JOB_TIMEOUT)
    assert refused.status_code == 429, describe(refused)
    assert refused.headers.get("Retry-After"), refused.headers
    publish_amqp_job(broker, "amqp-before-the-crash", BREAD.encode())

    broker, base = kill_and_restart(broker, workdir, working())
    try:
        assert status(http, base, first["id"])["status"] in ("queued", "running", "done")
        first_done = finished(http, base, first["id"])
        assert_food_and_bread(first_done["result"])
        second_done = finished(http, base, second["id"])
        embeddings(second_done["result"], 1)
        amqp_done = finished(http, base, "amqp-before-the-crash")
        embeddings(amqp_done["result"], 1)

        broker, base = kill_and_restart(broker, workdir, working())
        for before in (first_done, second_done, amqp_done):
            after = status(http, base, before["id"])
            assert after == before, (before, after)
    finally:
        broker.close_connections()
        broker.stop()
        broker.finish()


def test_finished_jobs_are_forgotten_after_their_retention(tmp_path):
    workdir = tmp_path / "warren"
    broker = start_broker(workdir, working("job_retention_s = 2"))
    base = http_url_of(broker)
    http = session()
    try:
        wait_for_consumer(broker, QUEUE)
        job = submit(http, base, [FOOD])
        done = finished(http, base, job["id"])
        assert done["expires_ms"] == done["completed_ms"] + 2_000, done
        jobs_dir = workdir / "data" / "jobs"
        assert len(list(jobs_dir.iterdir())) == 1, list(jobs_dir.iterdir())

        def forgotten():
            resp = http.get(f"{base}/v2/jobs/{job['id']}", timeout=JOB_TIMEOUT)
            assert resp.status_code in (200, 404), describe(resp)
            return resp.status_code == 404
        eventually(forgotten, "the job to expire", timeout=JOB_TIMEOUT)
        assert list(jobs_dir.iterdir()) == [], list(jobs_dir.iterdir())
    finally:
        broker.close_connections()
        broker.stop()
        broker.finish()
