"""RabbitMQ's AMQP 0-9-1 extensions, as a pika client observes them.

Each test states one behaviour from RabbitMQ's documentation (rabbitmq.com
docs: ttl, dlx, maxlength, priority, consumers, consumer-priority,
quorum-queues, ae, direct-reply-to, validated-user-id, queues) and checks it
from the client's side: what is delivered, what basic.get returns, which
reply code closes the channel. Refusals are checked by reply code and by the
argument or property the reply text names, not by RabbitMQ's exact wording.

The tests also run against a real RabbitMQ, through the external mode of
conftest.py (scripts/rabbitmq.sh starts a private node):

    scripts/rabbitmq.sh run .venv/bin/python -m pytest tests/python/test_extensions.py

so every name is unique per test and everything declared is deleted at the
end. Where the documented behaviour of current RabbitMQ (3.13 / 4.x) is newer
than the RabbitMQ under test, the test is skipped for that older RabbitMQ
(see `require_rabbitmq`); tests of what only Warren does are marked
`warren_only`.

Waits are deadlines around polling, never sleeps that hope a race is over.
The only sleeps wait out a TTL or an idle period, because that passage of
time is the behaviour under test, and they keep a wide margin.
"""

from __future__ import annotations

import datetime
import re
import time
import uuid
from typing import Callable, List, Optional, Tuple

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

TIMEOUT = 10.0
TTL_MS = 200
# Time waited before checking that a message published with TTL_MS has
# expired: three TTLs, so that a slow machine cannot make the check early.
PAST_TTL_S = 0.6


# --------------------------------------------------------------------------
# helpers


def uname(prefix: str) -> str:
    return f"ext-{prefix}-{uuid.uuid4().hex[:10]}"


def rabbitmq_version(conn: pika.BlockingConnection) -> Optional[Tuple[int, ...]]:
    """RabbitMQ's version from connection.start, or None for another broker."""
    props = conn._impl.server_properties or {}  # pylint: disable=protected-access
    product = props.get("product")
    if isinstance(product, bytes):
        product = product.decode()
    if product != "RabbitMQ":
        return None
    version = props.get("version", "0")
    if isinstance(version, bytes):
        version = version.decode()
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def require_rabbitmq(conn, minimum: Tuple[int, ...], why: str) -> None:
    """Skip when the broker is a RabbitMQ older than `minimum`.

    The test asserts what current RabbitMQ documents; an older RabbitMQ is
    known to behave differently (`why`)."""
    version = rabbitmq_version(conn)
    if version is not None and version < minimum:
        pytest.skip(f"RabbitMQ {'.'.join(map(str, version))} predates "
                    f"{'.'.join(map(str, minimum))}: {why}")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT,
             conns=()) -> None:
    """Poll predicate (processing I/O on conns) until true or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if conns:
            for c in conns:
                c.process_data_events(time_limit=0.02)
        else:
            time.sleep(0.02)


def get_eventually(ch, queue: str, timeout: float = TIMEOUT, auto_ack: bool = True):
    """basic.get until a message arrives (e.g. one being dead-lettered)."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue=queue, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        if time.monotonic() > deadline:
            raise AssertionError(f"no message arrived in {queue!r} within {timeout}s")
        time.sleep(0.05)


def get_all(ch, queue: str) -> List[bytes]:
    bodies = []
    while True:
        method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def message_count(ch, queue: str) -> int:
    return ch.queue_declare(queue=queue, passive=True).method.message_count


def wait_message_count(ch, queue: str, n: int, timeout: float = TIMEOUT) -> None:
    wait_for(lambda: message_count(ch, queue) == n,
             f"{queue!r} to hold {n} message(s)", timeout)


def expect_channel_close(fn: Callable[[], object], code: int, *needles: str):
    """fn() must get its channel closed with `code`; the reply text must
    contain every needle (case-insensitive). Returns the exception."""
    with pytest.raises(ChannelClosedByBroker) as info:
        fn()
    exc = info.value
    assert exc.reply_code == code, f"expected {code}, got {exc.reply_code} {exc.reply_text!r}"
    for needle in needles:
        assert needle.lower() in exc.reply_text.lower(), (
            f"reply text {exc.reply_text!r} does not mention {needle!r}")
    return exc


def publish_then_sync(ch, *args, **kwargs) -> None:
    """basic.publish, then a synchronous method so that an asynchronous
    channel close caused by the publish is raised here."""
    ch.basic_publish(*args, **kwargs)
    ch.basic_qos(prefetch_count=0)


def x_death(props) -> List[dict]:
    headers = props.headers or {}
    assert "x-death" in headers, f"no x-death header in {headers!r}"
    return headers["x-death"]


class Env:
    """Connections and uniquely named queues/exchanges for one test; deletes
    what it declared at the end (the broker may be shared)."""

    def __init__(self, broker):
        self.broker = broker
        self.queues: List[str] = []
        self.exchanges: List[str] = []

    def connect(self) -> pika.BlockingConnection:
        return self.broker.connect()

    def channel(self):
        conn = self.broker.connect()
        return conn, conn.channel()

    def queue(self, ch, prefix: str = "q", arguments=None, durable: bool = False,
              exclusive: bool = False, auto_delete: bool = False) -> str:
        name = uname(prefix)
        self.queues.append(name)
        ch.queue_declare(queue=name, durable=durable, exclusive=exclusive,
                         auto_delete=auto_delete, arguments=arguments)
        return name

    def exchange(self, ch, prefix: str = "x", exchange_type: str = "direct",
                 arguments=None) -> str:
        name = uname(prefix)
        self.exchanges.append(name)
        ch.exchange_declare(exchange=name, exchange_type=exchange_type,
                            arguments=arguments)
        return name

    def cleanup(self) -> None:
        try:
            conn = self.broker.connect()
        except Exception:  # noqa: BLE001 - broker gone; nothing to clean
            return
        ch = conn.channel()
        for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
            for name in names:
                try:
                    if kind == "queue":
                        ch.queue_delete(queue=name)
                    else:
                        ch.exchange_delete(exchange=name)
                except ChannelClosedByBroker:
                    ch = conn.channel()
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def env(broker):
    e = Env(broker)
    yield e
    broker.close_connections()
    e.cleanup()


class Consumer:
    """Records deliveries of one basic.consume."""

    def __init__(self, conn, ch, queue: str, auto_ack: bool = True, prefetch: int = 0,
                 arguments=None, exclusive: bool = False):
        self.conn = conn
        self.ch = ch
        self.got: List[Tuple[object, object, bytes]] = []
        if prefetch:
            ch.basic_qos(prefetch_count=prefetch)
        self.tag = ch.basic_consume(queue=queue, on_message_callback=self._on,
                                    auto_ack=auto_ack, arguments=arguments,
                                    exclusive=exclusive)

    def _on(self, _ch, method, props, body):
        self.got.append((method, props, body))

    @property
    def bodies(self) -> List[bytes]:
        return [b for _m, _p, b in self.got]

    def wait(self, n: int, conns=(), timeout: float = TIMEOUT) -> None:
        wait_for(lambda: len(self.got) >= n, f"{n} deliveries (have {self.bodies})",
                 timeout, conns=list(conns) or [self.conn])


# --------------------------------------------------------------------------
# per-queue message TTL (x-message-ttl) and per-message TTL (expiration)


def test_queue_message_ttl_expired_message_is_never_delivered(env):
    conn, ch = env.channel()
    q = env.queue(ch, "ttl", arguments={"x-message-ttl": TTL_MS})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"stale")
    time.sleep(PAST_TTL_S)  # the TTL passing is the behaviour under test
    assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)
    wait_message_count(ch, q, 0)

    # A consumer attached now never sees it: a later message is the first
    # (and only) delivery.
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q)
    ch.basic_publish("", q, b"fresh")
    consumer.wait(1)
    assert consumer.bodies == [b"fresh"]


def test_queue_message_ttl_live_message_is_delivered(env):
    conn, ch = env.channel()
    q = env.queue(ch, "ttl-live", arguments={"x-message-ttl": 60_000})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"live")
    assert message_count(ch, q) == 1
    method, _props, body = ch.basic_get(queue=q, auto_ack=True)
    assert body == b"live"


def test_per_message_expiration_is_never_delivered(env):
    conn, ch = env.channel()
    q = env.queue(ch, "exp")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"short-lived",
                     pika.BasicProperties(expiration=str(TTL_MS)))
    ch.basic_publish("", q, b"no-expiry")
    time.sleep(PAST_TTL_S)
    # The expired head is skipped; basic.get returns the next message.
    method, props, body = ch.basic_get(queue=q, auto_ack=True)
    assert body == b"no-expiry"
    assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)


def test_per_message_expiration_not_yet_reached_is_delivered_with_property(env):
    conn, ch = env.channel()
    q = env.queue(ch, "exp-live")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m", pika.BasicProperties(expiration="60000"))
    method, props, body = ch.basic_get(queue=q, auto_ack=True)
    assert body == b"m"
    assert props.expiration == "60000"


def test_expired_message_is_dead_lettered_with_reason_expired(env):
    conn, ch = env.channel()
    dlx = env.exchange(ch, "dlx", "fanout")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = env.queue(ch, "ttl-dl", arguments={"x-message-ttl": TTL_MS,
                                           "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"expires", pika.BasicProperties(headers={"k": "v"}))

    method, props, body = get_eventually(ch, dlq)
    assert body == b"expires"
    assert method.exchange == dlx
    assert method.routing_key == q  # original routing key kept
    assert props.headers["k"] == "v"
    (death,) = x_death(props)
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]
    assert props.headers["x-first-death-reason"] == "expired"
    assert props.headers["x-first-death-queue"] == q
    assert message_count(ch, q) == 0


def test_per_message_expiration_removed_on_dead_lettering(env):
    """The expiration property is removed so the message does not expire
    again downstream; x-death keeps it as original-expiration."""
    conn, ch = env.channel()
    dlx = env.exchange(ch, "dlx", "fanout")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = env.queue(ch, "exp-dl", arguments={"x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m", pika.BasicProperties(expiration=str(TTL_MS)))

    method, props, body = get_eventually(ch, dlq)
    assert body == b"m"
    assert props.expiration is None
    (death,) = x_death(props)
    assert death["reason"] == "expired"
    assert death["original-expiration"] == str(TTL_MS)


def test_message_ttl_zero_delivers_only_to_a_waiting_consumer(env):
    conn, ch = env.channel()
    dlx = env.exchange(ch, "dlx", "fanout")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = env.queue(ch, "ttl0", arguments={"x-message-ttl": 0,
                                         "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()

    # Nobody waiting: expired on arrival (dead-lettered, not kept).
    ch.basic_publish("", q, b"nobody-home")
    method, props, body = get_eventually(ch, dlq)
    assert body == b"nobody-home"
    assert x_death(props)[0]["reason"] == "expired"
    assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)
    assert message_count(ch, q) == 0

    # A consumer with room is waiting: delivered.
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q, auto_ack=False, prefetch=10)
    ch.basic_publish("", q, b"someone-home")
    consumer.wait(1)
    assert consumer.bodies == [b"someone-home"]
    cons_ch.basic_ack(consumer.got[0][0].delivery_tag)
    assert message_count(ch, dlq) == 0


@pytest.mark.parametrize("expiration", ["abc", "-1", "1.5"])
def test_invalid_expiration_property_closes_channel(env, expiration):
    conn, ch = env.channel()
    q = env.queue(ch, "bad-exp")
    expect_channel_close(
        lambda: publish_then_sync(ch, "", q, b"m",
                                  pika.BasicProperties(expiration=expiration)),
        406, "expiration")
    ch2 = conn.channel()
    assert message_count(ch2, q) == 0


def test_lower_of_queue_ttl_and_message_expiration_wins(env):
    conn, ch = env.channel()
    long_queue_ttl = env.queue(ch, "qttl-long", arguments={"x-message-ttl": 60_000})
    short_queue_ttl = env.queue(ch, "qttl-short", arguments={"x-message-ttl": TTL_MS})
    ch.confirm_delivery()
    # message TTL lower than the queue's
    ch.basic_publish("", long_queue_ttl, b"a", pika.BasicProperties(expiration=str(TTL_MS)))
    # queue TTL lower than the message's
    ch.basic_publish("", short_queue_ttl, b"b", pika.BasicProperties(expiration="60000"))
    time.sleep(PAST_TTL_S)
    assert ch.basic_get(queue=long_queue_ttl, auto_ack=True) == (None, None, None)
    assert ch.basic_get(queue=short_queue_ttl, auto_ack=True) == (None, None, None)
    wait_message_count(ch, long_queue_ttl, 0)
    wait_message_count(ch, short_queue_ttl, 0)


# --------------------------------------------------------------------------
# queue TTL (x-expires)


EXPIRES_MS = 300


def _wait_queue_gone(conn, queue: str, timeout: float = TIMEOUT) -> None:
    """Poll with passive declares until 404. A declare, even a passive one,
    counts as use and renews the x-expires lease, so the polls are spaced
    well beyond the idle time."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(3 * EXPIRES_MS / 1000)
        ch = conn.channel()
        try:
            ch.queue_declare(queue=queue, passive=True)
        except ChannelClosedByBroker as exc:
            assert exc.reply_code == 404, exc
            return
        ch.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"queue {queue!r} still exists after {timeout}s")


def test_unused_queue_is_deleted_after_x_expires(env):
    conn, ch = env.channel()
    q = env.queue(ch, "expires", arguments={"x-expires": EXPIRES_MS})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"lost with the queue")
    assert message_count(ch, q) == 1
    _wait_queue_gone(conn, q)


def test_queue_with_consumer_is_not_deleted_by_x_expires(env):
    conn, ch = env.channel()
    q = env.queue(ch, "expires-used", arguments={"x-expires": EXPIRES_MS})
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q)
    # Well past the idle time, with a consumer attached all along.
    deadline = time.monotonic() + 5 * EXPIRES_MS / 1000
    while time.monotonic() < deadline:
        cons_conn.process_data_events(time_limit=0.05)
    ch.queue_declare(queue=q, passive=True)
    # Once the consumer goes, the queue is unused and expires.
    cons_ch.basic_cancel(consumer.tag)
    _wait_queue_gone(conn, q)


# --------------------------------------------------------------------------
# dead-lettering


def _dlx_topology(env, ch, dl_routing_key: Optional[str] = "dead", src_args=None):
    """src-ex --orig-rk--> src queue --(DLX dlx-ex)--> dlq.

    dlq is bound to dlx-ex with `dead` and with `orig-rk`."""
    src_ex = env.exchange(ch, "src-ex", "direct")
    dlx = env.exchange(ch, "dlx", "direct")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx, routing_key="dead")
    ch.queue_bind(dlq, dlx, routing_key="orig-rk")
    args = {"x-dead-letter-exchange": dlx}
    if dl_routing_key is not None:
        args["x-dead-letter-routing-key"] = dl_routing_key
    args.update(src_args or {})
    src = env.queue(ch, "src", arguments=args)
    ch.queue_bind(src, src_ex, routing_key="orig-rk")
    return src_ex, src, dlx, dlq


def test_rejected_message_is_dead_lettered_with_x_death(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(env, ch)
    ch.confirm_delivery()
    before = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    ch.basic_publish(src_ex, "orig-rk", b"bad",
                     pika.BasicProperties(headers={"app": "x"}, message_id="m-1",
                                          content_type="text/plain", expiration="60000"))
    method, _p, _b = ch.basic_get(queue=src, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)

    method, props, body = get_eventually(ch, dlq)
    assert body == b"bad"
    assert method.exchange == dlx
    assert method.routing_key == "dead"  # x-dead-letter-routing-key
    assert props.message_id == "m-1"
    assert props.content_type == "text/plain"
    assert props.headers["app"] == "x"
    # Removed on any dead-lettering, kept in x-death.
    assert props.expiration is None
    (death,) = x_death(props)
    assert death["original-expiration"] == "60000"
    assert death["count"] == 1
    assert death["reason"] == "rejected"
    assert death["queue"] == src
    assert death["exchange"] == src_ex
    assert death["routing-keys"] == ["orig-rk"]
    assert isinstance(death["time"], datetime.datetime)
    # AMQP timestamps have one-second resolution.
    assert death["time"] >= before.replace(microsecond=0) - datetime.timedelta(seconds=1)
    assert props.headers["x-first-death-reason"] == "rejected"
    assert props.headers["x-first-death-queue"] == src
    assert props.headers["x-first-death-exchange"] == src_ex
    assert message_count(ch, src) == 0


def test_nacked_message_without_requeue_is_dead_lettered(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(env, ch)
    ch.confirm_delivery()
    for body in (b"n1", b"n2"):
        ch.basic_publish(src_ex, "orig-rk", body)
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, src, auto_ack=False, prefetch=10)
    consumer.wait(2)
    # One nack for both (multiple=True), requeue=False.
    cons_ch.basic_nack(consumer.got[1][0].delivery_tag, multiple=True, requeue=False)
    bodies, reasons = [], []
    for _ in range(2):
        _m, props, body = get_eventually(ch, dlq)
        bodies.append(body)
        reasons.append(x_death(props)[0]["reason"])
    assert bodies == [b"n1", b"n2"]
    assert reasons == ["rejected", "rejected"]


def test_dead_lettering_keeps_routing_key_without_x_dead_letter_routing_key(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(env, ch, dl_routing_key=None)
    ch.confirm_delivery()
    ch.basic_publish(src_ex, "orig-rk", b"m")
    method, _p, _b = ch.basic_get(queue=src, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get_eventually(ch, dlq)
    assert body == b"m"
    assert method.exchange == dlx
    assert method.routing_key == "orig-rk"


def test_requeued_message_is_not_dead_lettered(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(env, ch)
    ch.confirm_delivery()
    ch.basic_publish(src_ex, "orig-rk", b"again")
    method, _p, _b = ch.basic_get(queue=src, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, props, body = ch.basic_get(queue=src, auto_ack=True)
    assert body == b"again"
    assert method.redelivered is True
    assert not (props.headers or {}).get("x-death")
    assert message_count(ch, dlq) == 0


def _reject_cycle(env, ch):
    """Queues a and b dead-letter into each other through the default
    exchange; returns (a, b)."""
    a = uname("cyc-a")
    b = uname("cyc-b")
    env.queues += [a, b]
    ch.queue_declare(a, arguments={"x-dead-letter-exchange": "",
                                   "x-dead-letter-routing-key": b})
    ch.queue_declare(b, arguments={"x-dead-letter-exchange": "",
                                   "x-dead-letter-routing-key": a})
    return a, b


def _get_and_reject(ch, queue: str):
    method, props, body = get_eventually(ch, queue, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)
    return method, props, body


def test_x_death_count_increments_for_same_queue_and_reason(env):
    conn, ch = env.channel()
    a, b = _reject_cycle(env, ch)
    ch.confirm_delivery()
    ch.basic_publish("", a, b"cycle")

    _get_and_reject(ch, a)                     # a -> b
    _m, props, _b = _get_and_reject(ch, b)     # b -> a
    deaths = x_death(props)
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [(a, "rejected", 1)]

    _m, props, _b = _get_and_reject(ch, a)     # a -> b
    deaths = x_death(props)
    # Most recent first; one entry per (queue, reason).
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
        (b, "rejected", 1), (a, "rejected", 1)]

    method, props, body = get_eventually(ch, b)
    assert body == b"cycle"
    deaths = x_death(props)
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
        (a, "rejected", 2), (b, "rejected", 1)]
    # The entry keeps the exchange and routing keys of its first event.
    by_queue = {d["queue"]: d for d in deaths}
    assert by_queue[a]["exchange"] == ""
    assert by_queue[a]["routing-keys"] == [a]
    assert by_queue[b]["routing-keys"] == [b]
    # The first death is recorded once and never changes.
    assert props.headers["x-first-death-queue"] == a
    assert props.headers["x-first-death-reason"] == "rejected"
    assert props.headers["x-first-death-exchange"] == ""


def test_x_last_death_headers_follow_the_latest_dead_lettering(env):
    conn, ch = env.channel()
    require_rabbitmq(conn, (3, 13), "x-last-death-* headers were added in 3.13")
    a, b = _reject_cycle(env, ch)
    ch.confirm_delivery()
    ch.basic_publish("", a, b"cycle")
    _get_and_reject(ch, a)
    _m, props, _b = _get_and_reject(ch, b)
    assert props.headers["x-last-death-queue"] == a
    assert props.headers["x-last-death-reason"] == "rejected"
    assert props.headers["x-last-death-exchange"] == ""
    method, props, body = get_eventually(ch, a)
    assert props.headers["x-first-death-queue"] == a
    assert props.headers["x-last-death-queue"] == b
    assert props.headers["x-last-death-reason"] == "rejected"
    assert props.headers["x-last-death-exchange"] == ""


def test_max_length_drop_head_dead_letters_with_reason_maxlen(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(env, ch, src_args={"x-max-length": 2})
    ch.confirm_delivery()
    for body in (b"m1", b"m2", b"m3"):
        ch.basic_publish(src_ex, "orig-rk", body)
    method, props, body = get_eventually(ch, dlq)
    assert body == b"m1"
    (death,) = x_death(props)
    assert death["reason"] == "maxlen"
    assert death["queue"] == src
    assert props.headers["x-first-death-reason"] == "maxlen"
    assert get_all(ch, src) == [b"m2", b"m3"]


def test_dead_letter_cycle_without_rejection_is_dropped(env):
    """A queue dead-lettering expired messages back to itself: the message
    would reach the same queue again without any rejection in the cycle, so
    it is dropped instead of looping."""
    conn, ch = env.channel()
    q = env.queue(ch, "selfcycle", arguments={"x-message-ttl": TTL_MS,
                                              "x-dead-letter-exchange": ""})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"loop")
    wait_message_count(ch, q, 0)
    # Were it looping, it would be back within one TTL at most.
    deadline = time.monotonic() + 5 * TTL_MS / 1000
    while time.monotonic() < deadline:
        assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)
        time.sleep(TTL_MS / 4000)


def test_missing_dead_letter_exchange_drops_silently(env):
    conn, ch = env.channel()
    q = env.queue(ch, "nodlx", arguments={"x-dead-letter-exchange": uname("absent")})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m")
    method, _p, _b = ch.basic_get(queue=q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)
    assert message_count(ch, q) == 0  # also: the channel is still open
    assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)


# --------------------------------------------------------------------------
# queue length limits (x-max-length, x-max-length-bytes, x-overflow)


def test_max_length_drops_from_head_by_default(env):
    conn, ch = env.channel()
    q = env.queue(ch, "maxlen", arguments={"x-max-length": 3})
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode())
    assert message_count(ch, q) == 3
    assert get_all(ch, q) == [b"m2", b"m3", b"m4"]


def test_max_length_bytes_drops_from_head(env):
    conn, ch = env.channel()
    # Counts body bytes only.
    q = env.queue(ch, "maxbytes", arguments={"x-max-length-bytes": 10})
    ch.confirm_delivery()
    for body in (b"aaaa", b"bbbb", b"cccc"):
        ch.basic_publish("", q, body)
    assert get_all(ch, q) == [b"bbbb", b"cccc"]


def test_max_length_zero_keeps_nothing(env):
    conn, ch = env.channel()
    q = env.queue(ch, "maxlen0", arguments={"x-max-length": 0})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"gone")
    assert message_count(ch, q) == 0


def test_overflow_reject_publish_nacks_publisher(env):
    conn, ch = env.channel()
    q = env.queue(ch, "rejpub", arguments={"x-max-length": 2,
                                           "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m1")
    ch.basic_publish("", q, b"m2")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"m3")
    assert message_count(ch, q) == 2
    method, _p, body = ch.basic_get(queue=q, auto_ack=True)
    assert body == b"m1"
    ch.basic_publish("", q, b"m4")  # room again: acked
    assert get_all(ch, q) == [b"m2", b"m4"]


def test_overflow_reject_publish_bytes_nacks_publisher(env):
    conn, ch = env.channel()
    q = env.queue(ch, "rejpub-b", arguments={"x-max-length-bytes": 8,
                                             "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"aaaa")
    ch.basic_publish("", q, b"bbbb")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"cccc")
    assert get_all(ch, q) == [b"aaaa", b"bbbb"]


def test_overflow_reject_publish_dlx_nacks_and_dead_letters(env):
    conn, ch = env.channel()
    src_ex, src, dlx, dlq = _dlx_topology(
        env, ch, src_args={"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    ch.basic_publish(src_ex, "orig-rk", b"kept")
    with pytest.raises(NackError):
        ch.basic_publish(src_ex, "orig-rk", b"refused")
    method, props, body = get_eventually(ch, dlq)
    assert body == b"refused"
    (death,) = x_death(props)
    assert death["reason"] == "maxlen"
    assert death["queue"] == src
    assert get_all(ch, src) == [b"kept"]


# --------------------------------------------------------------------------
# priority queues (x-max-priority)


def _publish_with_priorities(ch, q, items):
    for body, priority in items:
        props = pika.BasicProperties(priority=priority) if priority is not None else None
        ch.basic_publish("", q, body, props)


def test_priority_queue_delivers_higher_priorities_first(env):
    conn, ch = env.channel()
    q = env.queue(ch, "prio", arguments={"x-max-priority": 10})
    ch.confirm_delivery()
    _publish_with_priorities(ch, q, [(b"p1", 1), (b"p5-a", 5), (b"p10", 10),
                                     (b"p3", 3), (b"p5-b", 5)])
    assert get_all(ch, q) == [b"p10", b"p5-a", b"p5-b", b"p3", b"p1"]


def test_priority_queue_delivers_to_consumer_in_priority_order(env):
    conn, ch = env.channel()
    q = env.queue(ch, "prio-c", arguments={"x-max-priority": 3})
    ch.confirm_delivery()
    _publish_with_priorities(ch, q, [(b"low", 1), (b"high", 3), (b"mid", 2)])
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q, auto_ack=False, prefetch=1)
    consumer.wait(1)
    for expected in (b"high", b"mid", b"low"):
        n = len(consumer.got)
        assert consumer.got[-1][2] == expected
        cons_ch.basic_ack(consumer.got[-1][0].delivery_tag)
        if expected != b"low":
            consumer.wait(n + 1)


def test_priority_above_maximum_counts_as_maximum(env):
    conn, ch = env.channel()
    q = env.queue(ch, "prio-max", arguments={"x-max-priority": 5})
    ch.confirm_delivery()
    # 255 is treated as 5: FIFO with the earlier priority-5 message.
    _publish_with_priorities(ch, q, [(b"four", 4), (b"five", 5), (b"max", 255)])
    assert get_all(ch, q) == [b"five", b"max", b"four"]


def test_message_without_priority_counts_as_zero(env):
    conn, ch = env.channel()
    q = env.queue(ch, "prio-none", arguments={"x-max-priority": 5})
    ch.confirm_delivery()
    _publish_with_priorities(ch, q, [(b"none", None), (b"zero", 0), (b"one", 1)])
    assert get_all(ch, q) == [b"one", b"none", b"zero"]


def test_priority_is_delivered_unchanged(env):
    conn, ch = env.channel()
    q = env.queue(ch, "prio-prop", arguments={"x-max-priority": 5})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m", pika.BasicProperties(priority=200))
    method, props, body = ch.basic_get(queue=q, auto_ack=True)
    assert props.priority == 200


@pytest.mark.parametrize("value", [0, 1, 255])
def test_x_max_priority_accepted_values(env, value):
    """RabbitMQ checks a non-negative integer up to 255 (the docs recommend
    1..255; 0 is accepted and gives a single level, that is, FIFO)."""
    conn, ch = env.channel()
    q = env.queue(ch, "prio-ok", arguments={"x-max-priority": value})
    ch.confirm_delivery()
    _publish_with_priorities(ch, q, [(b"first", 0), (b"second", 255)])
    expected = [b"first", b"second"] if value == 0 else [b"second", b"first"]
    assert get_all(ch, q) == expected


@pytest.mark.parametrize("value", [256, -1, "abc"])
def test_x_max_priority_invalid_values_are_refused(env, value):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: env.queue(ch, "prio-bad", arguments={"x-max-priority": value}),
        406, "x-max-priority")


# --------------------------------------------------------------------------
# single active consumer


def _sac_setup(env):
    conn, ch = env.channel()
    q = env.queue(ch, "sac", arguments={"x-single-active-consumer": True})
    c1_conn, c1_ch = env.channel()
    c2_conn, c2_ch = env.channel()
    first = Consumer(c1_conn, c1_ch, q, auto_ack=False, prefetch=1)
    second = Consumer(c2_conn, c2_ch, q, auto_ack=False, prefetch=100)
    ch.confirm_delivery()
    for i in range(4):
        ch.basic_publish("", q, f"m{i}".encode())
    # Only the first consumer receives, one at a time (prefetch 1), although
    # the second one has room.
    for i in range(4):
        first.wait(i + 1, conns=[c1_conn, c2_conn])
        assert first.bodies[-1] == f"m{i}".encode()
        assert second.got == []
        c1_ch.basic_ack(first.got[-1][0].delivery_tag)
    return ch, q, first, second


def test_single_active_consumer_gets_everything_then_fails_over_on_cancel(env):
    ch, q, first, second = _sac_setup(env)
    # The active consumer (nothing unacked) cancels: the other one takes over.
    first.ch.basic_cancel(first.tag)
    for i in range(4, 6):
        ch.basic_publish("", q, f"m{i}".encode())
    second.wait(2, conns=[first.conn, second.conn])
    assert second.bodies == [b"m4", b"m5"]
    assert first.bodies == [b"m0", b"m1", b"m2", b"m3"]


def test_single_active_consumer_fails_over_on_cancel_with_unacked_deliveries(env):
    conn = env.connect()
    require_rabbitmq(conn, (4, 0),
                     "RabbitMQ 3.10 classic queues keep the cancelled consumer active "
                     "while it holds unacknowledged deliveries")
    ch, q, first, second = _sac_setup(env)
    for i in range(4, 7):
        ch.basic_publish("", q, f"m{i}".encode())
    first.wait(5, conns=[first.conn, second.conn])  # m4 in flight, unacked
    assert first.bodies[-1] == b"m4"
    assert message_count(ch, q) == 2           # m5, m6 wait for the active one
    second.conn.process_data_events(time_limit=0.1)
    assert second.got == []

    # The active consumer cancels while m4 is still unacked: the other one
    # becomes active and gets the waiting messages.
    first.ch.basic_cancel(first.tag)
    second.wait(2, conns=[first.conn, second.conn])
    assert second.bodies == [b"m5", b"m6"]
    first.ch.basic_ack(first.got[-1][0].delivery_tag)
    assert first.bodies == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_single_active_consumer_fails_over_when_connection_closes(env):
    conn, ch = env.channel()
    q = env.queue(ch, "sac-close", arguments={"x-single-active-consumer": True})
    c1_conn, c1_ch = env.channel()
    c2_conn, c2_ch = env.channel()
    first = Consumer(c1_conn, c1_ch, q, auto_ack=False, prefetch=10)
    second = Consumer(c2_conn, c2_ch, q, auto_ack=False, prefetch=10)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    first.wait(2, conns=[c1_conn, c2_conn])
    assert second.got == []
    c1_conn.close()  # unacked a, b are requeued and go to the new active one
    second.wait(2, conns=[c2_conn])
    assert second.bodies == [b"a", b"b"]
    assert all(m.redelivered for m, _p, _b in second.got)


def test_single_active_consumer_queue_refuses_exclusive_consumer(env):
    conn, ch = env.channel()
    q = env.queue(ch, "sac-excl", arguments={"x-single-active-consumer": True})
    expect_channel_close(
        lambda: ch.basic_consume(q, lambda *a: None, exclusive=True), 403, "exclusive")


# --------------------------------------------------------------------------
# consumer priorities (x-priority on basic.consume)


def test_higher_priority_consumer_gets_messages_while_it_has_room(env):
    conn, ch = env.channel()
    q = env.queue(ch, "cprio")
    lo_conn, lo_ch = env.channel()
    hi_conn, hi_ch = env.channel()
    low = Consumer(lo_conn, lo_ch, q, auto_ack=False, prefetch=100,
                   arguments={"x-priority": 1})
    high = Consumer(hi_conn, hi_ch, q, auto_ack=False, prefetch=2,
                    arguments={"x-priority": 10})
    conns = [lo_conn, hi_conn]
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode())
    high.wait(2, conns=conns)
    low.wait(3, conns=conns)
    # The high-priority consumer takes what its prefetch allows; only then
    # does the low-priority one get messages.
    assert high.bodies == [b"m0", b"m1"]
    assert low.bodies == [b"m2", b"m3", b"m4"]

    # Room again for the high-priority consumer: it gets the next message.
    hi_ch.basic_ack(high.got[0][0].delivery_tag)
    hi_ch.basic_qos(prefetch_count=2)  # a round trip: the ack has been handled
    ch.basic_publish("", q, b"m5")
    high.wait(3, conns=conns)
    assert high.bodies[-1] == b"m5"
    assert low.bodies == [b"m2", b"m3", b"m4"]


def test_consumers_of_equal_priority_share_round_robin(env):
    conn, ch = env.channel()
    q = env.queue(ch, "cprio-eq")
    a_conn, a_ch = env.channel()
    b_conn, b_ch = env.channel()
    c_conn, c_ch = env.channel()
    a = Consumer(a_conn, a_ch, q, arguments={"x-priority": 5})
    b = Consumer(b_conn, b_ch, q, arguments={"x-priority": 5})
    c = Consumer(c_conn, c_ch, q, arguments={"x-priority": 0})
    ch.confirm_delivery()
    for i in range(6):
        ch.basic_publish("", q, f"m{i}".encode())
    wait_for(lambda: len(a.got) + len(b.got) == 6, "6 deliveries to a and b",
             conns=[a_conn, b_conn, c_conn])
    assert a.got and b.got, (a.bodies, b.bodies)
    assert c.got == []


def test_consumer_x_priority_must_be_an_integer(env):
    conn, ch = env.channel()
    q = env.queue(ch, "cprio-bad")
    expect_channel_close(
        lambda: ch.basic_consume(q, lambda *a: None, arguments={"x-priority": "high"}),
        406, "x-priority")


# --------------------------------------------------------------------------
# queue types (x-queue-type) and quorum queues


def test_classic_queue_type_is_accepted(env):
    conn, ch = env.channel()
    q = env.queue(ch, "classic", arguments={"x-queue-type": "classic"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"c")
    assert get_all(ch, q) == [b"c"]


def test_quorum_queue_is_accepted_when_durable(env):
    conn, ch = env.channel()
    q = env.queue(ch, "quorum", durable=True, arguments={"x-queue-type": "quorum"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"q1", pika.BasicProperties(delivery_mode=2))
    ch.basic_publish("", q, b"q2")
    assert message_count(ch, q) == 2
    assert get_all(ch, q) == [b"q1", b"q2"]
    # Redeclaring with the same arguments is fine.
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})


@pytest.mark.parametrize("flags,needle", [
    ({"durable": False}, "durable"),
    ({"durable": True, "exclusive": True}, "exclusive"),
    ({"durable": True, "auto_delete": True}, "auto-delete"),
])
def test_quorum_queue_must_be_durable_and_not_exclusive(env, flags, needle):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: env.queue(ch, "quorum-bad", arguments={"x-queue-type": "quorum"}, **flags),
        406, needle)


def test_unknown_queue_type_is_refused(env):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: env.queue(ch, "qt-bad", durable=True, arguments={"x-queue-type": "bogus"}),
        406, "x-queue-type")


@pytest.mark.warren_only("RabbitMQ implements streams; Warren refuses them")
def test_stream_queue_type_is_refused(env):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: env.queue(ch, "stream", durable=True, arguments={"x-queue-type": "stream"}),
        406, "stream")


def test_quorum_delivery_limit_counts_redeliveries_then_dead_letters(env):
    conn, ch = env.channel()
    dlx = env.exchange(ch, "dlx", "fanout")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = env.queue(ch, "qdl", durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison")

    counts = []
    for _ in range(3):
        method, props, body = get_eventually(ch, q, auto_ack=False)
        assert body == b"poison"
        counts.append((props.headers or {}).get("x-delivery-count"))
        # basic.reject with requeue counts as a failed delivery (RabbitMQ 4.3
        # stopped counting basic.nack requeue=true; reject counts in all).
        ch.basic_reject(method.delivery_tag, requeue=True)
    # First delivery carries no count; each redelivery one more.
    assert counts[0] in (None, 0)
    assert counts[1:] == [1, 2]

    # Returned more times than the limit: dead-lettered.
    method, props, body = get_eventually(ch, dlq)
    assert body == b"poison"
    (death,) = x_death(props)
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == q
    assert message_count(ch, q) == 0


def test_quorum_delivery_limit_without_dlx_drops(env):
    conn, ch = env.channel()
    q = env.queue(ch, "qdl-drop", durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 1})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison")
    for _ in range(2):
        method, _props, _body = get_eventually(ch, q, auto_ack=False)
        ch.basic_reject(method.delivery_tag, requeue=True)
    wait_message_count(ch, q, 0)
    assert ch.basic_get(queue=q, auto_ack=True) == (None, None, None)


def test_quorum_default_delivery_limit_is_20(env):
    conn, ch = env.channel()
    require_rabbitmq(conn, (4, 0), "quorum queues have had a default delivery "
                                   "limit of 20 since 4.0 (none before)")
    dlx = env.exchange(ch, "dlx", "fanout")
    dlq = env.queue(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = env.queue(ch, "qdl-default", durable=True, arguments={
        "x-queue-type": "quorum", "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison")
    for i in range(21):
        method, props, _body = get_eventually(ch, q, auto_ack=False)
        if i:
            assert props.headers["x-delivery-count"] == i
        ch.basic_reject(method.delivery_tag, requeue=True)
    _m, props, body = get_eventually(ch, dlq)
    assert body == b"poison"
    assert x_death(props)[0]["reason"] == "delivery_limit"


def test_delivery_limit_is_refused_on_classic_queue(env):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: env.queue(ch, "classic-dl", arguments={"x-delivery-limit": 3}),
        406, "x-delivery-limit")


# --------------------------------------------------------------------------
# consumer (delivery acknowledgement) timeout, per queue


@pytest.mark.timeout(180)
def test_consumer_timeout_closes_channel_and_requeues(env):
    """x-consumer-timeout: a consumer that does not ack in time gets its
    channel closed with 406 PRECONDITION_FAILED; its deliveries are requeued.

    RabbitMQ 3.12+ (the queue argument's first version) evaluates the
    timeout once a minute, hence the long deadline."""
    conn, ch = env.channel()
    require_rabbitmq(conn, (3, 12), "x-consumer-timeout (per queue) is 3.12+; "
                                    "older versions only have the global consumer_timeout")
    q = env.queue(ch, "ctimeout", arguments={"x-consumer-timeout": 1000})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"slow")
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q, auto_ack=False, prefetch=1)
    consumer.wait(1)
    closed = []
    # BlockingChannel has no close callback of its own; its impl does.
    cons_ch._impl.add_on_close_callback(  # pylint: disable=protected-access
        lambda _ch, reason: closed.append(reason))
    wait_for(lambda: closed, "the consumer's channel to be closed", timeout=150,
             conns=[cons_conn])
    reason = closed[0]
    assert isinstance(reason, ChannelClosedByBroker), reason
    assert reason.reply_code == 406
    assert re.search(r"time(d)? ?out", reason.reply_text, re.I), reason.reply_text
    # The connection survives; the unacked message is back in the queue.
    assert cons_conn.is_open
    method, _props, body = get_eventually(ch, q)
    assert body == b"slow"
    assert method.redelivered is True


def test_consumer_that_acks_in_time_is_not_closed(env):
    conn, ch = env.channel()
    require_rabbitmq(conn, (3, 12), "x-consumer-timeout (per queue) is 3.12+")
    q = env.queue(ch, "ctimeout-ok", arguments={"x-consumer-timeout": 60_000})
    ch.confirm_delivery()
    cons_conn, cons_ch = env.channel()
    consumer = Consumer(cons_conn, cons_ch, q, auto_ack=False, prefetch=1)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    for i in range(3):
        consumer.wait(i + 1)
        cons_ch.basic_ack(consumer.got[-1][0].delivery_tag)
    assert cons_ch.is_open
    assert consumer.bodies == [b"m0", b"m1", b"m2"]


# --------------------------------------------------------------------------
# alternate exchanges


def _ae_topology(env, ch):
    ae = env.exchange(ch, "ae", "fanout")
    ae_q = env.queue(ch, "ae-q")
    ch.queue_bind(ae_q, ae)
    main = env.exchange(ch, "main", "direct", arguments={"alternate-exchange": ae})
    main_q = env.queue(ch, "main-q")
    ch.queue_bind(main_q, main, routing_key="known")
    return main, main_q, ae, ae_q


def test_alternate_exchange_receives_unroutable_messages(env):
    conn, ch = env.channel()
    main, main_q, ae, ae_q = _ae_topology(env, ch)
    ch.confirm_delivery()
    ch.basic_publish(main, "known", b"routed")
    ch.basic_publish(main, "unknown", b"unroutable")
    assert get_all(ch, main_q) == [b"routed"]
    method, _props, body = ch.basic_get(queue=ae_q, auto_ack=True)
    assert body == b"unroutable"
    assert method.exchange == main
    assert method.routing_key == "unknown"


def test_mandatory_publish_routed_via_alternate_exchange_is_not_returned(env):
    conn, ch = env.channel()
    main, main_q, ae, ae_q = _ae_topology(env, ch)
    ch.confirm_delivery()
    # pika raises UnroutableError if the broker returns the message.
    ch.basic_publish(main, "unknown", b"via-ae", mandatory=True)
    assert get_all(ch, ae_q) == [b"via-ae"]
    # Without an alternate exchange the same publish is returned.
    plain = env.exchange(ch, "plain", "direct")
    with pytest.raises(UnroutableError):
        ch.basic_publish(plain, "unknown", b"returned", mandatory=True)


# --------------------------------------------------------------------------
# direct reply-to


REPLY_TO = "amq.rabbitmq.reply-to"


def test_direct_reply_to_round_trip(env):
    conn, ch = env.channel()
    rpc_q = env.queue(ch, "rpc")
    replies = []
    ch.basic_consume(REPLY_TO, lambda _c, m, p, b: replies.append((m, p, b)),
                     auto_ack=True)

    srv_conn, srv_ch = env.channel()
    seen_reply_to = []

    def serve(s_ch, method, props, body):
        seen_reply_to.append(props.reply_to)
        s_ch.basic_publish("", props.reply_to, b"re:" + body,
                           pika.BasicProperties(correlation_id=props.correlation_id))
        s_ch.basic_ack(method.delivery_tag)

    srv_ch.basic_consume(rpc_q, serve)
    for i in range(2):
        ch.basic_publish("", rpc_q, f"req{i}".encode(),
                         pika.BasicProperties(reply_to=REPLY_TO, correlation_id=f"c{i}"))
    wait_for(lambda: len(replies) == 2, "2 replies", conns=[conn, srv_conn])
    assert [(p.correlation_id, b) for _m, p, b in replies] == [("c0", b"re:req0"),
                                                               ("c1", b"re:req1")]
    # The responder saw a per-channel pseudo-queue name, not the literal one.
    assert seen_reply_to[0].startswith(REPLY_TO + ".")
    assert seen_reply_to[0] == seen_reply_to[1]


def _reply_address(env):
    """A requester consuming from amq.rabbitmq.reply-to publishes a request;
    returns (requester connection, responder channel, the rewritten reply-to)."""
    req_conn, req_ch = env.channel()
    rpc_q = env.queue(req_ch, "rpc")
    req_ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=True)
    req_ch.basic_publish("", rpc_q, b"req", pika.BasicProperties(reply_to=REPLY_TO))
    srv_conn, srv_ch = env.channel()
    _m, props, _b = get_eventually(srv_ch, rpc_q)
    return req_conn, srv_conn, srv_ch, props.reply_to


def test_direct_reply_to_address_exists_while_requester_is_connected(env):
    """A responder can check for the requester with a passive declare of the
    reply address: 0 messages and 1 consumer while it is there, 404 after."""
    req_conn, srv_conn, srv_ch, address = _reply_address(env)
    ok = srv_ch.queue_declare(address, passive=True)
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 1
    req_conn.close()
    wait_for(lambda: _passive_declare_code(srv_conn, address) == 404,
             "the reply address to disappear")


def _passive_declare_code(conn, queue: str) -> int:
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except ChannelClosedByBroker as exc:
        return exc.reply_code
    ch.close()
    return 200


def test_direct_reply_to_mandatory_reply_is_not_returned(env):
    """Current documentation: a mandatory publish to an amq.rabbitmq.reply-to.*
    address counts as routed, the requester's presence is not checked, and
    no basic.return is sent (the reply is dropped if the requester is gone)."""
    conn = env.connect()
    require_rabbitmq(conn, (4, 2), "before the 4.2 rewrite a reply to a requester that "
                                   "has gone is returned to a mandatory publisher")
    req_conn, srv_conn, srv_ch, address = _reply_address(env)
    req_conn.close()
    srv_ch.confirm_delivery()
    srv_ch.basic_publish("", address, b"late reply", mandatory=True)


def test_direct_reply_to_consumer_must_be_no_ack(env):
    conn, ch = env.channel()
    expect_channel_close(
        lambda: ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=False),
        406, "reply")


def test_direct_reply_to_allows_one_consumer_per_channel(env):
    conn, ch = env.channel()
    ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=True)
    expect_channel_close(
        lambda: ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=True), 406, "reply")


def test_direct_reply_to_publish_without_reply_consumer_is_refused(env):
    conn, ch = env.channel()
    q = env.queue(ch, "rpc-noconsumer")
    expect_channel_close(
        lambda: publish_then_sync(ch, "", q, b"req", pika.BasicProperties(reply_to=REPLY_TO)),
        406, "reply")


# --------------------------------------------------------------------------
# validated user-id


def test_user_id_must_match_the_connection_user(env, broker):
    user = getattr(broker, "username", "guest")
    conn, ch = env.channel()
    q = env.queue(ch, "uid")
    ch.confirm_delivery()
    ch.basic_publish("", q, b"mine", pika.BasicProperties(user_id=user))
    method, props, body = ch.basic_get(queue=q, auto_ack=True)
    assert body == b"mine"
    assert props.user_id == user

    ch2 = conn.channel()
    expect_channel_close(
        lambda: publish_then_sync(ch2, "", q, b"forged",
                                  pika.BasicProperties(user_id=user + "-someone-else")),
        406, "user_id")
    ch3 = conn.channel()
    assert message_count(ch3, q) == 0


# --------------------------------------------------------------------------
# argument validation and equivalence


@pytest.mark.parametrize("arguments,needle", [
    ({"x-message-ttl": "abc"}, "x-message-ttl"),
    ({"x-message-ttl": -1}, "x-message-ttl"),
    ({"x-expires": 0}, "x-expires"),
    ({"x-expires": -1}, "x-expires"),
    ({"x-expires": "abc"}, "x-expires"),
    ({"x-max-length": -1}, "x-max-length"),
    ({"x-max-length": "abc"}, "x-max-length"),
    ({"x-max-length-bytes": -1}, "x-max-length-bytes"),
    ({"x-overflow": "bogus"}, "x-overflow"),
    ({"x-overflow": 1}, "x-overflow"),
    ({"x-dead-letter-routing-key": "rk"}, "x-dead-letter-routing-key"),
    ({"x-dead-letter-exchange": 5}, "x-dead-letter-exchange"),
    ({"x-single-active-consumer": "yes"}, "x-single-active-consumer"),
    ({"x-single-active-consumer": 1}, "x-single-active-consumer"),
], ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_invalid_queue_argument_is_refused_naming_it(env, arguments, needle):
    conn, ch = env.channel()
    name = uname("badarg")
    env.queues.append(name)
    expect_channel_close(lambda: ch.queue_declare(name, arguments=arguments), 406, needle)
    # Nothing was created.
    ch2 = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as info:
        ch2.queue_declare(name, passive=True)
    assert info.value.reply_code == 404


@pytest.mark.parametrize("arguments", [
    {"x-message-ttl": 0},
    {"x-max-length": 0},
    {"x-max-length-bytes": 0},
    {"x-overflow": "drop-head"},
    {"x-overflow": "reject-publish"},
    {"x-overflow": "reject-publish-dlx"},
    {"x-dead-letter-exchange": "does-not-exist-yet"},
    {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "rk"},
    {"x-single-active-consumer": False},
    {"x-expires": 3_600_000},
    {"x-some-unknown-argument": "kept"},
], ids=lambda v: ",".join(f"{k}={v!r}" for k, v in v.items()))
def test_valid_queue_arguments_are_accepted(env, arguments):
    conn, ch = env.channel()
    q = env.queue(ch, "goodarg", arguments=arguments)
    ch.queue_declare(q, arguments=arguments)  # equivalent redeclaration


@pytest.mark.parametrize("first,second,needle", [
    ({"x-message-ttl": 1000}, {"x-message-ttl": 2000}, "x-message-ttl"),
    ({"x-message-ttl": 1000}, {}, "x-message-ttl"),
    ({}, {"x-message-ttl": 1000}, "x-message-ttl"),
    ({"x-expires": 10_000}, {"x-expires": 20_000}, "x-expires"),
    ({"x-max-length": 10}, {"x-max-length": 11}, "x-max-length"),
    ({"x-max-length-bytes": 10}, {"x-max-length-bytes": 11}, "x-max-length-bytes"),
    ({"x-overflow": "drop-head"}, {"x-overflow": "reject-publish"}, "x-overflow"),
    ({"x-dead-letter-exchange": "a"}, {"x-dead-letter-exchange": "b"},
     "x-dead-letter-exchange"),
    ({"x-dead-letter-exchange": "a", "x-dead-letter-routing-key": "k1"},
     {"x-dead-letter-exchange": "a", "x-dead-letter-routing-key": "k2"},
     "x-dead-letter-routing-key"),
    ({"x-max-priority": 5}, {"x-max-priority": 6}, "x-max-priority"),
    ({"x-single-active-consumer": True}, {"x-single-active-consumer": False},
     "x-single-active-consumer"),
], ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_redeclare_with_different_arguments_is_refused_naming_it(env, first, second, needle):
    conn, ch = env.channel()
    q = env.queue(ch, "redecl", arguments=first)
    expect_channel_close(lambda: ch.queue_declare(q, arguments=second), 406, needle)
    # The queue is unchanged and still there.
    ch2 = conn.channel()
    ch2.queue_declare(q, arguments=first)


def test_redeclare_quorum_queue_as_classic_is_refused(env):
    conn, ch = env.channel()
    q = env.queue(ch, "redecl-qq", durable=True, arguments={"x-queue-type": "quorum"})
    expect_channel_close(
        lambda: ch.queue_declare(q, durable=True, arguments={"x-queue-type": "classic"}),
        406, "x-queue-type")


def test_passive_declare_ignores_arguments(env):
    conn, ch = env.channel()
    q = env.queue(ch, "passive", arguments={"x-message-ttl": 1000})
    ok = ch.queue_declare(q, passive=True, arguments={"x-message-ttl": 5})
    assert ok.method.queue == q


def test_redeclare_with_unknown_argument_changed_is_accepted(env):
    """Only the arguments RabbitMQ knows are compared on redeclaration."""
    conn, ch = env.channel()
    q = env.queue(ch, "redecl-unknown", arguments={"x-custom": 1})
    ch.queue_declare(q, arguments={"x-custom": 2})
    ch.queue_declare(q, arguments={})
