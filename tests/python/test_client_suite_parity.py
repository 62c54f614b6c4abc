"""Behaviours that client libraries' own test suites rely on, each as
RabbitMQ has it (scripts/client-suites.sh runs those suites themselves).

Every test here passes against RabbitMQ too (WARREN_TEST_EXTERNAL_AMQP),
except those marked warren_only, which say why.
"""

from __future__ import annotations

import socket
import subprocess

import pika
import pytest
import requests

from conftest import unique_name

TIMEOUT = 10.0
MIB = 1024 * 1024


# ------------------------------------------------ unbinding what is gone


def test_unbinding_a_deleted_queue_or_exchange_is_ok(broker):
    """aio-pika's RPC unbinds its auto-delete reply queue after cancelling
    its consumer, which deleted the queue: RabbitMQ answers unbind-ok."""
    conn = broker.connect()
    ch = conn.channel()
    exchange = unique_name("x")
    queue = unique_name("q")
    ch.exchange_declare(exchange=exchange, exchange_type="direct", auto_delete=False)
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange=exchange, routing_key="k")
    ch.queue_delete(queue=queue)

    ch.queue_unbind(queue=queue, exchange=exchange, routing_key="k")
    ch.queue_unbind(queue=unique_name("never"), exchange=exchange, routing_key="k")
    ch.exchange_unbind(destination=exchange, source=unique_name("never"), routing_key="k")
    ch.exchange_unbind(destination=unique_name("never"), source=exchange, routing_key="k")
    ch.exchange_delete(exchange=exchange)
    ch.queue_unbind(queue=unique_name("never"), exchange=exchange, routing_key="k")
    assert ch.is_open and conn.is_open

    # Binding to something that is gone is still an error.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.queue_bind(queue=queue, exchange="amq.direct", routing_key="k")
    assert excinfo.value.reply_code == 404


def test_unbinding_an_auto_delete_queue_after_its_consumer_left(broker):
    conn = broker.connect()
    ch = conn.channel()
    exchange = unique_name("rpc")
    ch.exchange_declare(exchange=exchange, exchange_type="direct")
    queue = ch.queue_declare(queue="", auto_delete=True).method.queue
    ch.queue_bind(queue=queue, exchange=exchange, routing_key=queue)
    tag = ch.basic_consume(queue=queue, on_message_callback=lambda *_: None)
    ch.basic_cancel(tag)
    ch.queue_unbind(queue=queue, exchange=exchange, routing_key=queue)
    assert ch.is_open
    ch.exchange_delete(exchange=exchange)


# ------------------------------------- "" means the last declared queue


def test_an_empty_queue_name_means_the_channels_last_declared_queue(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue=unique_name("earlier"), auto_delete=True)
    queue = ch.queue_declare(queue="", exclusive=True).method.queue

    # queue.bind with queue "" and routing key "": both are the queue's name.
    ch.queue_bind(queue="", exchange="amq.direct", routing_key="")
    ch.basic_publish(exchange="amq.direct", routing_key=queue, body=b"one")
    ch.basic_publish(exchange="amq.direct", routing_key=queue, body=b"two")
    method, _props, body = ch.basic_get(queue="", auto_ack=True)
    assert method is not None and body == b"one"

    received = []
    tag = ch.basic_consume(
        queue="", on_message_callback=lambda _c, _m, _p, b: received.append(b), auto_ack=True
    )
    conn.process_data_events(time_limit=0)
    deadline_events = 0
    while not received and deadline_events < 500:
        conn.process_data_events(time_limit=0.02)
        deadline_events += 1
    assert received == [b"two"]
    ch.basic_cancel(tag)

    ch.queue_unbind(queue="", exchange="amq.direct", routing_key="")
    ch.basic_publish(exchange="amq.direct", routing_key=queue, body=b"unrouted")
    ch.basic_publish(exchange="", routing_key=queue, body=b"three")
    assert ch.queue_purge(queue="").method.message_count == 1
    ch.queue_delete(queue="")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        conn.channel().queue_declare(queue=queue, passive=True)
    assert excinfo.value.reply_code == 404


def test_an_empty_queue_name_with_nothing_declared_is_404(broker):
    conn = broker.connect()
    for operation in (
        lambda ch: ch.basic_get(queue=""),
        lambda ch: ch.queue_bind(queue="", exchange="amq.direct", routing_key="k"),
        lambda ch: ch.basic_consume(queue="", on_message_callback=lambda *_: None),
        lambda ch: ch.queue_purge(queue=""),
    ):
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
            operation(ch)
        assert excinfo.value.reply_code == 404
        assert "no previously declared queue" in excinfo.value.reply_text
    assert conn.is_open


# ------------------------------------------------------------ channel.flow


def _channel_flow(conn, ch, active: bool):
    """pika's blocking adapter has no channel.flow; its channel does."""
    answers = []
    ch._impl.flow(active, callback=answers.append)
    for _ in range(500):
        if answers:
            return answers[0]
        conn.process_data_events(time_limit=0.02)
    raise AssertionError("no channel.flow-ok within 10 s")


def test_channel_flow_active_true_is_acknowledged(broker):
    conn = broker.connect()
    ch = conn.channel()
    assert _channel_flow(conn, ch, True) is True
    assert conn.is_open


def test_channel_flow_active_false_closes_the_connection_with_540(broker):
    """A client may not pause the broker's deliveries: RabbitMQ closes the
    connection with 540 NOT_IMPLEMENTED."""
    conn = broker.connect()
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as excinfo:
        _channel_flow(conn, ch, False)
    assert excinfo.value.reply_code == 540
    assert "NOT_IMPLEMENTED" in excinfo.value.reply_text
    assert broker.connect().is_open


# -------------------------------------------------------- large messages


def test_a_22_mb_message_is_accepted_by_default(broker):
    """RabbitMQ 3.x accepts messages up to 128 MiB by default."""
    conn = broker.connect()
    ch = conn.channel()
    queue = unique_name("large")
    ch.queue_declare(queue=queue, auto_delete=True)
    ch.confirm_delivery()
    body = bytes(range(256)) * (22_000_000 // 256) + b"end"
    ch.basic_publish(exchange="", routing_key=queue, body=body)
    method, _props, got = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None
    assert len(got) == len(body) and got == body
    ch.queue_delete(queue=queue)


def test_a_message_over_128_mib_is_refused_with_406(broker):
    conn = broker.connect()
    ch = conn.channel()
    queue = unique_name("too-large")
    ch.queue_declare(queue=queue, auto_delete=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.basic_publish(exchange="", routing_key=queue, body=b"\0" * (128 * MIB + 1))
        ch.queue_declare(queue=queue, passive=True)
    assert excinfo.value.reply_code == 406
    assert "larger than configured max size 134217728" in excinfo.value.reply_text


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.warren_only("reads the broker process's memory")
def test_large_messages_wait_on_disk_not_in_memory(broker):
    """Four 40 MiB messages, each waiting alone in a queue (persistent in
    two durable queues, transient in two plain ones), cost the broker far
    less memory than their 160 MiB, and come back intact. (A queue keeps
    its first messages in memory up to a byte budget; a body larger than
    the budget waits on disk from the start.)"""
    conn = broker.connect(blocked_connection_timeout=120)
    ch = conn.channel()
    ch.confirm_delivery()
    bodies = [bytes([index]) * (40 * MIB) for index in range(4)]
    queues = [unique_name("large") for _ in bodies]
    for index, queue in enumerate(queues):
        ch.queue_declare(queue=queue, durable=index < 2)

    # Warm up: one large message through, so buffers that are reused anyway
    # are counted in the baseline.
    ch.basic_publish(exchange="", routing_key=queues[3], body=bodies[3])
    assert ch.basic_get(queue=queues[3], auto_ack=True)[2] == bodies[3]
    baseline = _rss_bytes(broker.proc.pid)

    persistent = pika.BasicProperties(delivery_mode=2)
    for index, (queue, body) in enumerate(zip(queues, bodies)):
        properties = persistent if index < 2 else None
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=properties)
    # The store writes in order: once a persistent message published after
    # them is confirmed (fsynced), the transient bodies are on disk too.
    ch.basic_publish(exchange="", routing_key=queues[0], body=b"fence", properties=persistent)
    waiting = sum(len(body) for body in bodies)
    grown = _rss_bytes(broker.proc.pid) - baseline
    assert grown < waiting // 4, (
        f"the broker grew by {grown / MIB:.0f} MiB while {waiting / MIB:.0f} MiB of "
        f"messages wait in its queues"
    )

    got = [ch.basic_get(queue=queue, auto_ack=True)[2] for queue in queues]
    assert got == bodies
    assert ch.basic_get(queue=queues[0], auto_ack=True)[2] == b"fence"
    for queue in queues:
        ch.queue_delete(queue=queue)


# ---------------------------------------------------- exchange types


@pytest.mark.warren_only(
    "RabbitMQ 3.10 closes the connection with 503; the current RabbitMQ, which "
    "Warren follows, closes the channel with 406"
)
def test_an_unknown_exchange_type_closes_only_the_channel_with_406(broker):
    conn = broker.connect()
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        ch.exchange_declare(exchange=unique_name("x"), exchange_type="no-such-type")
    assert excinfo.value.reply_code == 406
    assert "invalid exchange type 'no-such-type'" in excinfo.value.reply_text
    assert conn.is_open
    conn.channel().queue_declare(queue="", exclusive=True)


# ------------------------------------------------------------- IPv6


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_default_listeners_are_dual_stack():
    """`warren serve` listens on [::] by default, which takes IPv4 too."""
    from conftest import warren_bin

    help_text = subprocess.run(
        [str(warren_bin()), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for port in ("5672", "5671", "15672"):
        assert f"[default: [::]:{port}]" in help_text, help_text


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_a_broker_on_the_ipv6_wildcard_takes_ipv4_and_ipv6_clients(broker_factory):
    broker = broker_factory(extra_args=["--amqp-listen", "[::]:0", "--http-listen", "[::]:0"])
    port = broker.port

    def connect(host):
        return pika.BlockingConnection(pika.ConnectionParameters(
            host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=TIMEOUT))

    for host in ("127.0.0.1", "::1"):
        conn = connect(host)  # guest logs in: loopback in both families
        ch = conn.channel()
        ch.queue_declare(queue="", exclusive=True)
        conn.close()
        http_host = f"[{host}]" if ":" in host else host
        response = requests.get(
            f"http://{http_host}:{broker.http_port}/api/overview",
            auth=("guest", "guest"),
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text

    # An IPv4 client of the dual-stack socket is shown with its IPv4 address.
    conn = connect("127.0.0.1")
    connections = requests.get(
        f"http://127.0.0.1:{broker.http_port}/api/connections",
        auth=("guest", "guest"),
        timeout=TIMEOUT,
    ).json()
    hosts = {c["peer_host"] for c in connections}
    assert "127.0.0.1" in hosts and hosts <= {"127.0.0.1", "::1"}, connections
    conn.close()


# --------------------------------------------------------- product name


@pytest.mark.warren_only("checks Warren's own default")
def test_the_product_is_warren_by_default(broker):
    properties = broker.connect()._impl.server_properties
    assert properties["product"] == "Warren"


def test_the_product_can_be_presented_as_rabbitmq(broker_factory):
    broker = broker_factory(config='[amqp]\nproduct = "RabbitMQ"\n')
    properties = broker.connect()._impl.server_properties
    assert properties["product"] == "RabbitMQ"
    major, minor, _patch = (int(part) for part in properties["version"].split("."))
    assert (major, minor) >= (3, 3), properties["version"]
