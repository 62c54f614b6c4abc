"""The memory alarm, as RabbitMQ's: over the high watermark, a connection
that publishes gets connection.blocked ("low on memory") and is not read,
a consumer on another connection keeps draining, and once memory is under
the watermark again the publisher gets connection.unblocked and every
publish it made is confirmed and delivered.

The watermark is lowered and raised at run time (`PUT
/api/vm-memory-high-watermark`, the broker's equivalent of `rabbitmqctl
set_vm_memory_high_watermark`): an absolute watermark of one byte is under
any process's resident memory, so the alarm is raised by the broker's own
sampling, not by anything the test fakes."""

import threading
import time

import pika
import requests

from conftest import start_broker

CONFIG = """
[storage]
memory_check_interval_ms = 50
"""


def watermark(broker, session):
    response = session.get(f"{broker.http_url}/api/vm-memory-high-watermark")
    assert response.status_code == 200, response.text
    return response.json()


def set_watermark(session, broker, body):
    response = session.put(f"{broker.http_url}/api/vm-memory-high-watermark", json=body)
    assert response.status_code == 204, response.text


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_publishers_are_blocked_over_the_memory_watermark_and_released_under_it(tmp_path):
    broker = start_broker(tmp_path / "warren", CONFIG)
    session = requests.Session()
    session.auth = ("guest", "guest")
    try:
        initial = watermark(broker, session)
        assert initial["relative"] == 0.4, initial
        assert initial["alarm"] is False
        assert 0 < initial["used"] < initial["limit"]

        events = []
        publisher = broker.connect()
        publisher.add_on_connection_blocked_callback(
            lambda _c, method: events.append(("blocked", method.method.reason)))
        publisher.add_on_connection_unblocked_callback(
            lambda _c, _m: events.append(("unblocked", None)))
        channel = publisher.channel()
        channel.queue_declare("held", durable=True)
        channel.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=2)
        channel.basic_publish("", "held", b"before", persistent)

        set_watermark(session, broker, {"absolute": 1})
        wait_for(lambda: watermark(broker, session)["alarm"], "the memory alarm")
        overview = session.get(f"{broker.http_url}/api/overview").json()
        assert overview["mem_alarm"] is True and overview["mem_limit"] == 1
        metrics = session.get(f"{broker.http_url}/metrics").text
        assert "warren_memory_alarm 1" in metrics

        # The next publish is read, then the connection is blocked: the
        # publish after it waits, unconfirmed, in the socket.
        published = []

        def publish_while_blocked():
            for body in (b"during-1", b"during-2"):
                channel.basic_publish("", "held", body, persistent)
                published.append(body)

        thread = threading.Thread(target=publish_while_blocked, daemon=True)
        thread.start()
        wait_for(lambda: "publisher blocked" in broker.log(), "the publisher to be blocked")
        time.sleep(0.3)
        assert len(published) < 2, "a blocked publisher's confirms must wait"

        # A consumer on another connection is not blocked.
        consumer = broker.connect()
        consuming = consumer.channel()
        method, _properties, body = consuming.basic_get("held", auto_ack=True)
        assert body == b"before"

        set_watermark(session, broker, {"relative": 0.4})
        wait_for(lambda: not watermark(broker, session)["alarm"], "the alarm to clear")
        thread.join(timeout=10)
        assert not thread.is_alive(), "the publisher was never released"
        publisher.process_data_events(time_limit=0.2)
        assert [event for event, _ in events] == ["blocked", "unblocked"]
        assert events[0][1] == "low on memory"
        received = []
        deadline = time.monotonic() + 10
        while len(received) < 2:
            assert time.monotonic() < deadline, f"only {received} arrived"
            _method, _properties, body = consuming.basic_get("held", auto_ack=True)
            if body is None:
                time.sleep(0.05)
            else:
                received.append(body)
        assert received == [b"during-1", b"during-2"]
    finally:
        session.close()
        broker.close_connections()
        status = broker.stop()
        broker.finish()
        assert status == 0, broker.log(tail=50)


def test_a_watermark_out_of_range_is_refused(tmp_path):
    broker = start_broker(tmp_path / "warren")
    session = requests.Session()
    session.auth = ("guest", "guest")
    try:
        for body in ({"relative": 0}, {"relative": 1.5}, {"absolute": 0},
                     {"relative": 0.5, "absolute": 10}, {}):
            response = session.put(f"{broker.http_url}/api/vm-memory-high-watermark", json=body)
            assert response.status_code == 400, (body, response.text)
        assert watermark(broker, session)["relative"] == 0.4
    finally:
        session.close()
        broker.close_connections()
        status = broker.stop()
        broker.finish()
        assert status == 0, broker.log(tail=50)
