"""Protocol behaviours a pika user relies on; each expectation is RabbitMQ's."""

from __future__ import annotations

import time

import pika
import pytest

TIMEOUT = 10.0


def test_publisher_confirms(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="confirmed")
    ch.confirm_delivery()  # blocks until confirm.select-ok
    # pika raises NackError/UnroutableError if the broker does not ack.
    for i in range(100):
        ch.basic_publish(exchange="", routing_key="confirmed", body=str(i).encode())
    assert h.message_count(ch, "confirmed") == 100
    assert h.get_all(ch, "confirmed") == [str(i).encode() for i in range(100)]


def test_publisher_confirms_persistent_to_durable_queue(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="durable-confirmed", durable=True)
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, content_type="text/plain",
                                 headers={"x-k": "v"}, message_id="m-1")
    ch.basic_publish(exchange="", routing_key="durable-confirmed", body=b"p", properties=props)
    method, got_props, body = ch.basic_get("durable-confirmed", auto_ack=True)
    assert body == b"p"
    assert got_props.delivery_mode == 2
    assert got_props.content_type == "text/plain"
    assert got_props.headers == {"x-k": "v"}
    assert got_props.message_id == "m-1"


def test_basic_get_on_empty_queue(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="empty")
    assert ch.basic_get(queue="empty", auto_ack=False) == (None, None, None)
    assert ch.basic_get(queue="empty", auto_ack=True) == (None, None, None)
    # channel is still usable
    ch.queue_declare(queue="empty", passive=True)


def test_basic_get_message_count_and_redelivered_flag(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="q-get")
    ch.confirm_delivery()
    for b in (b"one", b"two", b"three"):
        ch.basic_publish(exchange="", routing_key="q-get", body=b)
    method, _props, body = ch.basic_get(queue="q-get", auto_ack=True)
    assert body == b"one"
    assert method.message_count == 2  # messages remaining
    assert method.redelivered is False
    assert method.routing_key == "q-get"


def test_basic_nack_requeue_redelivers(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="nack-me")
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key="nack-me", body=b"retry")

    method, _props, body = ch.basic_get(queue="nack-me", auto_ack=False)
    assert body == b"retry"
    assert method.redelivered is False
    ch.basic_nack(delivery_tag=method.delivery_tag, requeue=True)

    method2, _props, body2 = ch.basic_get(queue="nack-me", auto_ack=False)
    assert body2 == b"retry"
    assert method2.redelivered is True
    assert method2.delivery_tag != method.delivery_tag

    # Same through a consumer: nack(requeue) -> redelivered=True, then ack.
    ch.basic_nack(delivery_tag=method2.delivery_tag, requeue=True)
    seen = []

    def cb(ch_, m, p, b):
        seen.append((b, m.redelivered))
        ch_.basic_ack(m.delivery_tag)

    tag = ch.basic_consume(queue="nack-me", on_message_callback=cb)
    h.pump_until(conn, lambda: seen, TIMEOUT, "redelivery to consumer")
    assert seen == [(b"retry", True)]
    ch.basic_cancel(tag)
    assert h.message_count(ch, "nack-me") == 0


def test_basic_reject_without_requeue_drops(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="reject-me")
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key="reject-me", body=b"bad")
    method, _p, _b = ch.basic_get(queue="reject-me", auto_ack=False)
    ch.basic_reject(delivery_tag=method.delivery_tag, requeue=False)
    assert ch.basic_get(queue="reject-me") == (None, None, None)
    assert h.message_count(ch, "reject-me") == 0


def test_unacked_messages_requeued_when_channel_closes(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="requeue-on-close")
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key="requeue-on-close", body=b"m")
    method, _p, _b = ch.basic_get(queue="requeue-on-close", auto_ack=False)
    assert method is not None
    ch.close()
    ch2 = conn.channel()
    method, _p, body = ch2.basic_get(queue="requeue-on-close", auto_ack=True)
    assert body == b"m"
    assert method.redelivered is True


def test_passive_declare_missing_queue_is_404(broker):
    conn = broker.connect()
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.queue_declare(queue="does-not-exist", passive=True)
    assert excinfo.value.reply_code == 404
    assert "NOT_FOUND" in excinfo.value.reply_text
    assert ch.is_closed
    # The connection survives a channel-level error.
    assert conn.is_open
    conn.channel().queue_declare(queue="now-it-exists")


def test_redeclare_with_different_durable_flag_is_406(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="durability", durable=False)
    # Same arguments again is fine (idempotent).
    ch.queue_declare(queue="durability", durable=False)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.queue_declare(queue="durability", durable=True)
    assert excinfo.value.reply_code == 406
    assert "PRECONDITION_FAILED" in excinfo.value.reply_text
    assert conn.is_open


def test_exchange_redeclare_with_different_type_is_406(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare(exchange="typed", exchange_type="direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.exchange_declare(exchange="typed", exchange_type="fanout")
    assert excinfo.value.reply_code == 406


def test_publish_to_missing_exchange_closes_channel_404(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.basic_publish(exchange="no-such-exchange", routing_key="x", body=b"x")
    # The channel error arrives asynchronously; the next synchronous call sees it.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.queue_declare(queue="after-bad-publish")
    assert excinfo.value.reply_code == 404
    assert conn.is_open


def test_exclusive_queue_is_locked_to_its_connection(broker):
    owner = broker.connect()
    qname = owner.channel().queue_declare(queue="", exclusive=True).method.queue
    other = broker.connect()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        other.channel().queue_declare(queue=qname, passive=True)
    assert excinfo.value.reply_code == 405  # RESOURCE_LOCKED
    # Exclusive queues are deleted when the owning connection closes.
    owner.close()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        other.channel().queue_declare(queue=qname, passive=True)
    assert excinfo.value.reply_code == 404


def test_wrong_password_is_refused(broker):
    with pytest.raises(
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)
    ) as excinfo:
        broker.connect(password="definitely-wrong")
    # RabbitMQ answers with connection.close 403 ACCESS_REFUSED; pika wraps it.
    if isinstance(excinfo.value, pika.exceptions.ProbableAuthenticationError):
        assert "403" in str(excinfo.value), repr(excinfo.value)
    # The broker is still fine for correct credentials.
    assert broker.connect().is_open


def test_unknown_vhost_is_530(broker):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as excinfo:
        broker.connect(vhost="nope")
    err = excinfo.value
    # pika raises ConnectionClosedByBroker(530, ...) or, because the close comes
    # during connection.open, wraps it in ProbableAccessDeniedError whose text
    # is the repr of the ConnectionClosedByBroker.
    if isinstance(err, pika.exceptions.ConnectionClosedByBroker):
        assert err.reply_code == 530
    else:
        assert isinstance(err, pika.exceptions.ProbableAccessDeniedError), repr(err)
        assert "ConnectionClosedByBroker" in str(err) and "530" in str(err), repr(err)
    assert broker.connect().is_open


def test_server_properties_and_tuning(broker):
    conn = broker.connect()
    impl = conn._impl  # pika keeps the negotiated values on the impl
    caps = impl.server_capabilities
    for cap in ("publisher_confirms", "basic.nack", "consumer_cancel_notify",
                "exchange_exchange_bindings", "connection.blocked",
                "authentication_failure_close", "per_consumer_qos",
                "consumer_priorities", "direct_reply_to"):
        assert caps.get(cap) is True, f"server capability {cap} missing: {caps}"
    # docs/configuration.md defaults (also RabbitMQ's): channel_max 2047,
    # frame_max 131072, heartbeat 60 s. pika accepts the server's proposals.
    assert impl.params.channel_max == 2047
    assert impl.params.frame_max == 131072
    assert impl.params.heartbeat == 60
    assert conn.is_open


def test_large_message_spans_many_frames(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="big")
    ch.confirm_delivery()
    body = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, many body frames
    ch.basic_publish(exchange="", routing_key="big", body=body)
    method, _p, got = ch.basic_get(queue="big", auto_ack=True)
    assert method is not None
    assert len(got) == len(body)
    assert got == body
    # zero-length body
    ch.basic_publish(exchange="", routing_key="big", body=b"")
    method, _p, got = ch.basic_get(queue="big", auto_ack=True)
    assert method is not None
    assert got == b""


def test_sigterm_closes_open_connections_with_320(broker_factory):
    b = broker_factory()
    conn = b.connect()
    ch = conn.channel()
    ch.queue_declare(queue="held")
    ch.basic_consume(queue="held", on_message_callback=lambda *a: None)
    assert b.stop() == 0, f"broker did not exit 0 on SIGTERM:\n{b.log()}"
    # RabbitMQ sends connection.close 320 CONNECTION_FORCED on shutdown.
    deadline = time.monotonic() + TIMEOUT
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as excinfo:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
    assert excinfo.value.reply_code == 320


CONFIG = """
[[users]]
name = "alice"
password = "secret"

[[vhosts]]
name = "ml"

[[permissions]]
user = "alice"
vhost = "ml"
configure = ".*"
write = ".*"
read = ".*"
"""


def test_config_users_and_vhosts(broker_factory, h):
    b = broker_factory(config=CONFIG)
    alice = b.connect(username="alice", password="secret", vhost="ml")
    ch_ml = alice.channel()
    ch_ml.queue_declare(queue="only-in-ml")
    ch_ml.confirm_delivery()
    ch_ml.basic_publish(exchange="", routing_key="only-in-ml", body=b"ml")
    assert h.message_count(ch_ml, "only-in-ml") == 1

    # Vhosts are isolated: the queue does not exist in "/".
    root = b.connect()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        root.channel().queue_declare(queue="only-in-ml", passive=True)
    assert excinfo.value.reply_code == 404

    # guest still works beside the configured user, but only where it has
    # permissions: none were given in "ml" (530, as in RabbitMQ).
    assert b.connect().is_open
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        b.connect(vhost="ml")
    assert "530" in str(refused.value) and "access to vhost 'ml' refused" in str(refused.value)
    # A wrong password is refused.
    with pytest.raises(
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)
    ):
        b.connect(username="alice", password="wrong", vhost="ml")
