"""What operators ask of a queue beyond its counts (rabbitmq-server#6813,
LavinMQ#2200), in /api/queues and /metrics: how long the message at the
head has waited, how long the oldest unacknowledged delivery has been out,
and how many times the messages it let go had been delivered."""

from __future__ import annotations

import pytest

from test_http_api import Api, eventually, http_url_of, uname
from test_rabbitmq_tools import scrape

pytestmark = pytest.mark.warren_only("Warren's own queue fields and metrics")


@pytest.fixture
def api(broker):
    client = Api(http_url_of(broker))
    yield client
    client.close()


def test_the_oldest_ready_and_unacked_ages_follow_the_queue(broker, api):
    queue = uname("ages")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue)
    info = api.queue(queue)
    assert info["oldest_ready_age_ms"] is None and info["oldest_unacked_age_ms"] is None

    ch.basic_publish("", queue, b"first")
    # The head ages while it waits.
    eventually(lambda: (api.queue(queue)["oldest_ready_age_ms"] or 0) >= 1500,
               "the head to have waited 1.5 s")
    ch.basic_publish("", queue, b"second")
    assert api.queue(queue)["oldest_ready_age_ms"] >= 1500, "the head is still the first"

    # Taken without an ack, the first is the oldest delivery out, and the
    # head is now the second, which has waited less.
    method, _props, body = ch.basic_get(queue, auto_ack=False)
    assert body == b"first"
    info = api.queue(queue)
    assert info["oldest_unacked_age_ms"] is not None and info["oldest_unacked_age_ms"] < 1500
    assert info["oldest_ready_age_ms"] < 1500, info
    eventually(lambda: (api.queue(queue)["oldest_unacked_age_ms"] or 0) >= 2000,
               "the delivery to have been out 2 s")
    samples = scrape(api, "/metrics")
    labels = {"vhost": "/", "queue": queue}
    (unacked_age,) = [value for sample_labels, value in
                      samples["warren_queue_oldest_unacked_age_seconds"]
                      if sample_labels == labels]
    assert unacked_age >= 2.0
    assert any(sample_labels == labels
               for sample_labels, _ in samples["warren_queue_oldest_ready_age_seconds"])

    ch.basic_ack(method.delivery_tag)
    assert api.queue(queue)["oldest_unacked_age_ms"] is None
    ch.queue_delete(queue)
    conn.close()


def test_delivery_counts_of_settled_messages(broker, api):
    queue = uname("deliveries")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue)
    ch.basic_publish("", queue, b"once")
    ch.basic_publish("", queue, b"thrice")
    method, _props, body = ch.basic_get(queue, auto_ack=False)
    assert body == b"once"
    ch.basic_ack(method.delivery_tag)
    # Returned twice, then acknowledged: delivered three times.
    for _ in range(2):
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        assert body == b"thrice"
        ch.basic_nack(method.delivery_tag, requeue=True)
    method, _props, body = ch.basic_get(queue, auto_ack=False)
    assert body == b"thrice" and method.redelivered
    ch.basic_reject(method.delivery_tag, requeue=False)

    counts = api.queue(queue)["delivery_counts"]
    assert counts == {"1": 1, "2": 0, "3": 1, "4-5": 0, "6-10": 0, "11+": 0}, counts
    samples = scrape(api, "/metrics")
    labels = {"vhost": "/", "queue": queue}

    def sample(name: str, **extra) -> float:
        (value,) = [v for l, v in samples[name] if l == {**labels, **extra}]
        return value
    assert sample("warren_queue_message_deliveries_count") == 2
    assert sample("warren_queue_message_deliveries_sum") == 4
    assert sample("warren_queue_message_deliveries_bucket", le="1.0") == 1
    assert sample("warren_queue_message_deliveries_bucket", le="3.0") == 2
    ch.queue_delete(queue)
    conn.close()
