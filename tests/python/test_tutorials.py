"""The six classic RabbitMQ tutorials (https://www.rabbitmq.com/tutorials), with pika.

Every expectation here is RabbitMQ's documented behaviour. Waits are bounded
blocking waits (process_data_events loops with a deadline); "nothing arrived"
checks are made after publisher confirms, which RabbitMQ sends only once the
message has been routed to (and enqueued in) every matching queue.
"""

from __future__ import annotations

import uuid

import pika
import pytest

TIMEOUT = 10.0


# ---------------------------------------------------------------- tutorial 1
def test_hello_world(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue="hello")

    ch.basic_publish(exchange="", routing_key="hello", body=b"Hello World!")

    received = []

    def callback(ch_, method, properties, body):
        received.append((method.routing_key, method.exchange, body))

    tag = ch.basic_consume(queue="hello", on_message_callback=callback, auto_ack=True)
    h.pump_until(conn, lambda: received, TIMEOUT, "'Hello World!' delivery")

    assert received == [("hello", "", b"Hello World!")]
    ch.basic_cancel(tag)
    assert h.message_count(ch, "hello") == 0


# ---------------------------------------------------------------- tutorial 2
def test_work_queues(broker, h):
    queue = "task_queue"
    pub_conn = broker.connect()
    pub = pub_conn.channel()
    decl = pub.queue_declare(queue=queue, durable=True)
    assert decl.method.queue == queue
    pub.confirm_delivery()

    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)

    def publish(body: bytes):
        pub.basic_publish(exchange="", routing_key=queue, body=body, properties=persistent)

    # Each worker records (body, delivery_tag, properties) and acks only when
    # told to (auto_ack_in_callback) so the test controls the unacked window.
    class Worker:
        def __init__(self, name):
            self.name = name
            self.conn = broker.connect()
            self.ch = self.conn.channel()
            self.ch.queue_declare(queue=queue, durable=True)
            self.ch.basic_qos(prefetch_count=1)
            self.received = []
            self.held = []
            self.ack_in_callback = False

        def start(self):
            self.tag = self.ch.basic_consume(queue=queue, on_message_callback=self._on_message)

        def _on_message(self, ch_, method, properties, body):
            self.received.append(body)
            assert properties.delivery_mode == 2, "persistent flag lost"
            if self.ack_in_callback:
                ch_.basic_ack(delivery_tag=method.delivery_tag)
            else:
                self.held.append(method.delivery_tag)

        def ack_held(self):
            for tag in self.held:
                self.ch.basic_ack(delivery_tag=tag)
            self.held.clear()

    a = Worker("A")
    b = Worker("B")
    a.start()

    # A takes task 0 and holds it unacked.
    publish(b"task 0")
    h.pump_until(a.conn, lambda: len(a.received) == 1, TIMEOUT, "worker A to get task 0")
    assert a.received == [b"task 0"]

    # With prefetch_count=1, task 1 must stay in the queue while A holds task 0.
    publish(b"task 1")
    check = pub_conn.channel()
    assert h.message_count(check, queue) == 1, "prefetch=1 worker was given a 2nd message"
    assert h.consumer_count(check, queue) == 1

    # Worker B starts and must get task 1 (proving A did not).
    b.start()
    h.pump_until([a.conn, b.conn], lambda: len(b.received) == 1, TIMEOUT, "worker B to get task 1")
    assert b.received == [b"task 1"]
    assert a.received == [b"task 0"]
    assert h.message_count(check, queue) == 0
    assert h.consumer_count(check, queue) == 2

    # Now the tutorial proper: ack held tasks, then send 10 tasks; each worker
    # acks after "processing". With prefetch 1 both workers must share them.
    a.ack_in_callback = b.ack_in_callback = True
    a.ack_held()
    b.ack_held()
    tasks = [f"task {i}".encode() for i in range(2, 12)]
    for t in tasks:
        publish(t)

    h.pump_until(
        [a.conn, b.conn],
        lambda: len(a.received) + len(b.received) >= 12,
        TIMEOUT,
        "all 12 tasks to be processed",
    )
    done_a = a.received[1:]
    done_b = b.received[1:]
    assert sorted(done_a + done_b) == sorted(tasks), "a task was lost or processed twice"
    assert len(done_a + done_b) == len(set(done_a + done_b))
    assert done_a, "worker A got none of the 10 tasks"
    assert done_b, "worker B got none of the 10 tasks"

    # Everything was acked: nothing ready, nothing redelivered.
    a.ch.basic_cancel(a.tag)
    b.ch.basic_cancel(b.tag)
    assert h.message_count(check, queue) == 0
    assert h.consumer_count(check, queue) == 0


# ---------------------------------------------------------------- tutorial 3
def test_publish_subscribe(broker, h):
    pub_conn = broker.connect()
    pub = pub_conn.channel()
    pub.exchange_declare(exchange="logs", exchange_type="fanout")
    pub.confirm_delivery()

    subscribers = []
    for _ in range(2):
        conn = broker.connect()
        ch = conn.channel()
        ch.exchange_declare(exchange="logs", exchange_type="fanout")
        result = ch.queue_declare(queue="", exclusive=True)
        qname = result.method.queue
        assert qname.startswith("amq.gen-"), qname
        ch.queue_bind(exchange="logs", queue=qname)
        got = []
        ch.basic_consume(
            queue=qname,
            on_message_callback=lambda c, m, p, body, got=got: got.append(body),
            auto_ack=True,
        )
        subscribers.append((conn, qname, got))

    assert subscribers[0][1] != subscribers[1][1], "server-named queues must be unique"

    messages = [f"log line {i}".encode() for i in range(5)]
    for m in messages:
        # routing key is ignored by fanout
        pub.basic_publish(exchange="logs", routing_key="ignored", body=m)

    conns = [s[0] for s in subscribers]
    h.pump_until(
        conns,
        lambda: all(len(s[2]) >= len(messages) for s in subscribers),
        TIMEOUT,
        "both subscribers to receive every log line",
    )
    for _conn, qname, got in subscribers:
        assert got == messages, f"{qname} got {got!r}"


# ---------------------------------------------------------------- tutorial 4
def test_routing(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare(exchange="direct_logs", exchange_type="direct")
    q_err = ch.queue_declare(queue="", exclusive=True).method.queue
    q_all = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(exchange="direct_logs", queue=q_err, routing_key="error")
    for severity in ("info", "warning", "error"):
        ch.queue_bind(exchange="direct_logs", queue=q_all, routing_key=severity)

    pub = conn.channel()
    pub.confirm_delivery()
    for severity in ("info", "warning", "error", "debug"):
        pub.basic_publish(
            exchange="direct_logs", routing_key=severity, body=f"{severity}: msg".encode()
        )

    assert h.get_all(ch, q_err) == [b"error: msg"]
    assert h.get_all(ch, q_all) == [b"info: msg", b"warning: msg", b"error: msg"]

    # Mandatory + routable: no return.
    pub.basic_publish(
        exchange="direct_logs", routing_key="error", body=b"mandatory ok", mandatory=True
    )
    assert h.get_all(ch, q_err) == [b"mandatory ok"]
    assert h.get_all(ch, q_all) == [b"mandatory ok"]

    # Mandatory + unroutable: basic.return, surfaced by pika as UnroutableError.
    with pytest.raises(pika.exceptions.UnroutableError) as excinfo:
        pub.basic_publish(
            exchange="direct_logs", routing_key="debug", body=b"nobody listens", mandatory=True
        )
    returned = excinfo.value.messages
    assert len(returned) == 1
    assert returned[0].body == b"nobody listens"
    assert returned[0].method.reply_code == 312  # NO_ROUTE
    assert returned[0].method.exchange == "direct_logs"
    assert returned[0].method.routing_key == "debug"

    # The channel stays usable after a return.
    pub.basic_publish(exchange="direct_logs", routing_key="info", body=b"after return")
    assert h.get_all(ch, q_all) == [b"after return"]
    assert h.get_all(ch, q_err) == []


# ---------------------------------------------------------------- tutorial 5
TOPIC_CASES = [
    # routing key,              Q1 (*.orange.*), Q2 (*.*.rabbit, lazy.#)
    ("quick.orange.rabbit", True, True),
    ("lazy.orange.elephant", True, True),
    ("quick.orange.fox", True, False),
    ("lazy.brown.fox", False, True),
    ("lazy.pink.rabbit", False, True),  # matches both Q2 bindings: delivered once
    ("quick.brown.fox", False, False),
    ("orange", False, False),
    ("quick.orange.new.rabbit", False, False),
    ("lazy.orange.new.rabbit", False, True),
    ("lazy.orange.male.rabbit", False, True),
    ("lazy", False, True),  # '#' matches zero words
]


def test_topics(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare(exchange="topic_logs", exchange_type="topic")
    q1 = ch.queue_declare(queue="", exclusive=True).method.queue
    q2 = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(exchange="topic_logs", queue=q1, routing_key="*.orange.*")
    ch.queue_bind(exchange="topic_logs", queue=q2, routing_key="*.*.rabbit")
    ch.queue_bind(exchange="topic_logs", queue=q2, routing_key="lazy.#")

    pub = conn.channel()
    pub.confirm_delivery()
    for key, _, _ in TOPIC_CASES:
        pub.basic_publish(exchange="topic_logs", routing_key=key, body=key.encode())

    got1 = [b.decode() for b in h.get_all(ch, q1)]
    got2 = [b.decode() for b in h.get_all(ch, q2)]
    want1 = [k for k, in1, _ in TOPIC_CASES if in1]
    want2 = [k for k, _, in2 in TOPIC_CASES if in2]
    assert got1 == want1
    assert got2 == want2  # lazy.pink.rabbit exactly once

    # Unroutable topic keys are returned when mandatory.
    for key in ("quick.brown.fox", "orange", "quick.orange.new.rabbit"):
        with pytest.raises(pika.exceptions.UnroutableError):
            pub.basic_publish(
                exchange="topic_logs", routing_key=key, body=b"x", mandatory=True
            )


def test_topic_hash_matches_empty_routing_key(broker, h):
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare(exchange="topic_all", exchange_type="topic")
    q_all = ch.queue_declare(queue="", exclusive=True).method.queue
    q_star = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(exchange="topic_all", queue=q_all, routing_key="#")
    ch.queue_bind(exchange="topic_all", queue=q_star, routing_key="*")

    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(exchange="topic_all", routing_key="", body=b"empty key")
    pub.basic_publish(exchange="topic_all", routing_key="a.b.c", body=b"three words")
    pub.basic_publish(exchange="topic_all", routing_key="word", body=b"one word")

    assert h.get_all(ch, q_all) == [b"empty key", b"three words", b"one word"]
    # '*' matches exactly one word: not the empty key, not three words.
    assert h.get_all(ch, q_star) == [b"one word"]


# ---------------------------------------------------------------- tutorial 6
def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_rpc(broker, h):
    # --- server
    srv_conn = broker.connect()
    srv = srv_conn.channel()
    srv.queue_declare(queue="rpc_queue")
    srv.basic_qos(prefetch_count=1)
    served = []

    def on_request(ch_, method, props, body):
        n = int(body)
        served.append(n)
        ch_.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id),
            body=str(_fib(n)).encode(),
        )
        ch_.basic_ack(delivery_tag=method.delivery_tag)

    srv.basic_consume(queue="rpc_queue", on_message_callback=on_request)

    # --- client
    cli_conn = broker.connect()
    cli = cli_conn.channel()
    callback_queue = cli.queue_declare(queue="", exclusive=True).method.queue
    assert callback_queue.startswith("amq.gen-")
    responses = {}

    def on_response(ch_, method, props, body):
        responses.setdefault(props.correlation_id, []).append(body)

    cli.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)

    def call(n: int) -> int:
        corr_id = str(uuid.uuid4())
        cli.basic_publish(
            exchange="",
            routing_key="rpc_queue",
            properties=pika.BasicProperties(reply_to=callback_queue, correlation_id=corr_id),
            body=str(n).encode(),
        )
        h.pump_until(
            [cli_conn, srv_conn], lambda: corr_id in responses, TIMEOUT, f"fib({n}) reply"
        )
        assert len(responses[corr_id]) == 1
        return int(responses[corr_id][0])

    assert call(30) == 832040
    for n in (0, 1, 2, 10, 20):
        assert call(n) == _fib(n)
    assert served == [30, 0, 1, 2, 10, 20]
    # No stray replies with unknown correlation ids.
    assert len(responses) == 6
    assert all(len(v) == 1 for v in responses.values())
