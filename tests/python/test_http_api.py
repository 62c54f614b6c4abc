"""The HTTP API of `warren serve` (docs/http-api.md), checked over HTTP
against the real broker, with pika on the AMQP side to make and observe what
the API reports or does.

Each test gets a fresh broker from conftest's `broker` fixture (started with
`--http-listen 127.0.0.1:0`); the HTTP address comes from the broker's log
line `HTTP listener ready addr=HOST:PORT`. Requests go through a
`requests.Session` with HTTP basic auth guest/guest; the WebSocket consumer
is driven with websocket-client; /metrics is parsed with prometheus-client's
text parser.

Everything the broker updates asynchronously (counts seen by the API after
an AMQP action, rates sampled every second, a connection closed by the API)
is waited for by polling with a deadline (`eventually`), never by sleeping.
The only fixed wait is the short receive timeout that checks that a
WebSocket consumer whose prefetch window is full gets nothing more: it
asserts an absence once the API has shown that the window is full.

Every response is also checked for a 5xx status: the `api` fixture fails the
test at teardown if any request it made was answered with one.

RabbitMQ has no WebSocket consumer, plain-HTTP messages, /metrics or
/v2 endpoints, and conftest's external mode runs no Warren of ours, so the
whole module is `warren_only`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote, unquote

import pika
import pytest
import requests
import websocket
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, UnroutableError
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.warren_only("the HTTP API, WebSocket and /metrics are Warren's")

TIMEOUT = 10.0
POLL_INTERVAL_S = 0.05
# The broker samples rates every second over 5 s: allow a few samples.
RATE_TIMEOUT = 20.0
# How long a WebSocket consumer whose prefetch window is full must stay
# without a further message. It asserts an absence, after the API showed the
# window full, so a longer wait only makes the check stricter.
ABSENCE_WAIT_S = 0.5

VHOST = "%2F"


# --------------------------------------------------------------------------
# helpers


def uname(prefix: str) -> str:
    return f"http-{prefix}-{uuid.uuid4().hex[:10]}"


def q(name: str) -> str:
    """A name as one path segment."""
    return quote(name, safe="")


def eventually(check: Callable[[], Any], what: str = "condition",
               timeout: float = TIMEOUT) -> Any:
    """Calls check() until it returns without an AssertionError (and not
    False/None); returns its value. Fails with the last assertion's message
    after `timeout`."""
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


def http_url_of(broker) -> str:
    """http://HOST:PORT of the broker's HTTP listener, which conftest reads
    from its `HTTP listener ready addr=HOST:PORT` log line."""
    if broker.http_url is None:
        pytest.fail("the broker did not log 'HTTP listener ready addr=HOST:PORT'. "
                    f"Its log:\n{broker.log(tail=100)}", pytrace=False)
    return broker.http_url


def describe(resp: requests.Response) -> str:
    return f"{resp.request.method} {resp.request.url} -> {resp.status_code} {resp.text[:500]!r}"


class Api:
    """A requests.Session bound to the broker's HTTP address. Records every
    5xx answer (the `api` fixture fails the test on any)."""

    def __init__(self, base: str, auth: Optional[Tuple[str, str]] = ("guest", "guest"),
                 server_errors: Optional[List[str]] = None):
        self.base = base
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy for 127.0.0.1
        self.session.auth = auth
        self.server_errors: List[str] = [] if server_errors is None else server_errors
        self.session.hooks["response"].append(self._record)
        self._anon: Optional["Api"] = None

    def _record(self, resp, *_args, **_kwargs):
        if resp.status_code >= 500:
            self.server_errors.append(describe(resp))

    def anon(self) -> "Api":
        """A client without credentials (made once)."""
        if self._anon is None:
            self._anon = self.with_auth(None)
        return self._anon

    def with_auth(self, auth: Optional[Tuple[str, str]]) -> "Api":
        """Another client on the same address, with other credentials (or
        none), sharing the 5xx record."""
        return Api(self.base, auth, self.server_errors)

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("allow_redirects", False)
        return self.session.request(method, self.base + path, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def put(self, path: str, **kwargs) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def json(self, path: str) -> Any:
        resp = self.get(path)
        assert resp.status_code == 200, describe(resp)
        assert resp.headers.get("Content-Type", "").startswith("application/json"), \
            (describe(resp), resp.headers.get("Content-Type"))
        return resp.json()

    def queue(self, name: str, vhost: str = VHOST) -> Dict[str, Any]:
        return self.json(f"/api/queues/{vhost}/{q(name)}")

    def queue_matches(self, name: str, timeout: float = TIMEOUT, **expected) -> Dict[str, Any]:
        """Polls GET /api/queues/%2F/NAME until each field equals `expected`."""
        def check():
            info = self.queue(name)
            got = {k: info.get(k) for k in expected}
            assert got == expected, f"{name}: {got} (expected {expected})"
            return info
        return eventually(check, f"queue {name} to show {expected}", timeout)

    def close(self) -> None:
        if self._anon is not None:
            self._anon.close()
        self.session.close()


def assert_error(resp: requests.Response, status: int, *needles: str) -> Dict[str, Any]:
    """The answer is `status` with a JSON body {"error": KIND, "reason": TEXT};
    the reason mentions every needle (case-insensitive)."""
    assert resp.status_code == status, describe(resp)
    assert resp.headers.get("Content-Type", "").startswith("application/json"), \
        (describe(resp), resp.headers.get("Content-Type"))
    body = resp.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("reason"), str) and body["reason"], body
    for needle in needles:
        assert needle.lower() in body["reason"].lower(), (needle, body)
    return body


def by_name(items: List[Dict[str, Any]], name: str, vhost: str = "/") -> Optional[Dict[str, Any]]:
    found = [i for i in items if i.get("name") == name and i.get("vhost") == vhost]
    assert len(found) <= 1, found
    return found[0] if found else None


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def confirmed_channel(conn: pika.BlockingConnection):
    ch = conn.channel()
    ch.confirm_delivery()
    return ch


def publish(ch, routing_key: str, bodies, exchange: str = "",
            properties: Optional[pika.BasicProperties] = None) -> None:
    """Publishes (mandatory) on a confirm channel: each returns once the
    broker confirmed it."""
    for body in bodies:
        if isinstance(body, str):
            body = body.encode()
        ch.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                         properties=properties, mandatory=True)


def local_port(conn: pika.BlockingConnection) -> int:
    """The client-side port of a pika BlockingConnection's socket."""
    sock = conn._impl._transport._sock  # pylint: disable=protected-access
    return sock.getsockname()[1]


def message_count(conn: pika.BlockingConnection, queue: str) -> int:
    ch = conn.channel()
    try:
        return ch.queue_declare(queue=queue, passive=True).method.message_count
    finally:
        if ch.is_open:
            ch.close()


def queue_exists(conn: pika.BlockingConnection, queue: str) -> bool:
    ch = conn.channel()
    try:
        ch.queue_declare(queue=queue, passive=True)
    except ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    ch.close()
    return True


def get_all(ch, queue: str) -> List[Tuple[bytes, bool]]:
    """basic.get (auto-ack) until empty: [(body, redelivered)]."""
    got = []
    while True:
        method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method is None:
            return got
        got.append((body, method.redelivered))


def basic_auth_header(user: str = "guest", password: str = "guest") -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Authorization: Basic {token}"


def ws_url(base: str, path: str) -> str:
    assert base.startswith("http://"), base
    return "ws://" + base[len("http://"):] + path


def ws_recv_json(ws, timeout: float = TIMEOUT) -> Dict[str, Any]:
    """The next text frame, parsed."""
    ws.settimeout(timeout)
    opcode, frame = ws.recv_data_frame()
    assert opcode == websocket.ABNF.OPCODE_TEXT, (opcode, frame)
    return json.loads(frame.data.decode("utf-8"))


def ws_frames_until_close(ws, timeout: float = TIMEOUT) -> Tuple[List[Any], Optional[int]]:
    """Text frames received until the server's close frame; and its code."""
    ws.settimeout(timeout)
    frames: List[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            opcode, frame = ws.recv_data_frame()
        except websocket.WebSocketConnectionClosedException:
            return frames, None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data or b""
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return frames, code
        if opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(frame.data.decode("utf-8")))
    raise AssertionError(f"no close frame within {timeout}s; frames: {frames}")


def metrics(api: Api) -> Dict[Tuple[str, frozenset], float]:
    """GET /metrics (no auth), parsed: {(sample name, labels): value}."""
    resp = api.anon().get("/metrics")
    assert resp.status_code == 200, describe(resp)
    assert resp.headers.get("Content-Type", "").startswith("text/plain"), resp.headers
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_families(api: Api) -> Dict[str, str]:
    """{family name: type} of /metrics."""
    resp = api.anon().get("/metrics")
    assert resp.status_code == 200, describe(resp)
    return {f.name: f.type for f in text_string_to_metric_families(resp.text)}


def sample(samples, name: str, **labels) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def http_base(broker) -> str:
    return http_url_of(broker)


@pytest.fixture
def api(http_base):
    client = Api(http_base)
    yield client
    client.close()
    assert not client.server_errors, "server errors:\n" + "\n".join(client.server_errors)


# --------------------------------------------------------------------------
# authentication


@pytest.mark.parametrize("path", ["/api/overview", "/api/queues", "/api/whoami",
                                  f"/api/queues/{VHOST}/some-queue"])
def test_no_credentials_is_401_with_www_authenticate(api, path):
    resp = api.anon().get(path)
    assert_error(resp, 401)
    challenge = resp.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Basic"), resp.headers
    assert 'realm="Warren"' in challenge, challenge


@pytest.mark.parametrize("credentials", [("guest", "wrong-password"), ("nobody", "guest")],
                         ids=["wrong-password", "unknown-user"])
def test_bad_credentials_are_401(api, credentials):
    resp = api.with_auth(credentials).get("/api/overview")
    assert_error(resp, 401)
    assert resp.headers.get("WWW-Authenticate", "").startswith("Basic"), resp.headers
    # Nor can they change anything.
    name = uname("unauth")
    assert_error(api.with_auth(credentials).put(f"/api/queues/{VHOST}/{name}", json={}), 401)
    assert api.get(f"/api/queues/{VHOST}/{name}").status_code == 404


def test_dashboard_and_metrics_need_no_credentials(api):
    anon = api.anon()
    page = anon.get("/")
    assert page.status_code == 200, describe(page)
    assert page.headers.get("Content-Type", "").startswith("text/html"), page.headers
    assert "<html" in page.text.lower()
    resp = anon.get("/metrics")
    assert resp.status_code == 200, describe(resp)
    assert "warren_connections" in resp.text


def test_whoami(api):
    me = api.json("/api/whoami")
    assert me["name"] == "guest"
    assert "administrator" in me["tags"], me


def test_another_user_of_the_configuration_file(broker_factory):
    b = broker_factory(config='[[users]]\nname = "alice"\npassword = "wonderland"\n'
                              'tags = ["management"]\n')
    alice = Api(http_url_of(b), ("alice", "wonderland"))
    try:
        assert alice.json("/api/whoami")["name"] == "alice"
        assert_error(alice.with_auth(("alice", "guest")).get("/api/whoami"), 401)
        assert alice.with_auth(("guest", "guest")).json("/api/whoami")["name"] == "guest"
        assert not alice.server_errors, alice.server_errors
    finally:
        alice.close()


# --------------------------------------------------------------------------
# overview


def test_overview_identifies_warren_and_its_listeners(broker, api, http_base):
    ov = api.json("/api/overview")
    assert ov["product_name"] == "Warren"
    assert ov["rates_mode"] == "basic"
    for key in ("product_version", "management_version", "rabbitmq_version", "node",
                "cluster_name"):
        assert isinstance(ov.get(key), str) and ov[key], (key, ov.get(key))
    for key in ("connections", "channels", "exchanges", "queues", "consumers"):
        assert isinstance(ov["object_totals"][key], int), ov["object_totals"]
    for key in ("messages", "messages_ready", "messages_unacknowledged"):
        assert isinstance(ov["queue_totals"][key], int), ov["queue_totals"]
    for key in ("publish", "deliver_get", "ack", "confirm", "return_unroutable"):
        assert isinstance(ov["message_stats"][key], int), (key, ov["message_stats"])
        assert isinstance(ov["message_stats"][f"{key}_details"]["rate"], (int, float))
    listeners = {(l["protocol"], l["port"]) for l in ov["listeners"]}
    http_port = broker.http_port
    assert ("amqp", broker.port) in listeners, ov["listeners"]
    assert ("http", http_port) in listeners, ov["listeners"]


def test_overview_object_totals_follow_amqp(broker, api):
    # The HTTP side's own AMQP connection (docs: it acts as the user) is
    # open before the baseline; its channels come and go with requests, so
    # channels are compared with /api/channels rather than with a baseline.
    assert api.put(f"/api/queues/{VHOST}/{uname('warmup')}", json={}).status_code == 201
    before = api.json("/api/overview")["object_totals"]
    conn_name = uname("totals-conn")
    conn = broker.connect(client_properties={"connection_name": conn_name})
    ch = conn.channel()
    queue = uname("totals")
    ch.queue_declare(queue=queue)
    ch.exchange_declare(exchange=uname("totals-x"), exchange_type="fanout")
    ch.basic_consume(queue=queue, on_message_callback=lambda *a: None)
    mine = find_connection(api, conn_name)["name"]

    def check():
        totals = api.json("/api/overview")["object_totals"]
        got = {k: totals[k] - before[k] for k in
               ("connections", "queues", "exchanges", "consumers")}
        assert got == {"connections": 1, "queues": 1, "exchanges": 1, "consumers": 1}, \
            (got, totals, before)
        channels = api.json("/api/channels")
        assert [c["number"] for c in channels if c["connection_details"]["name"] == mine] == \
            [ch.channel_number], channels
        assert totals["channels"] == len(channels), (totals, channels)
        return True

    eventually(check, "object_totals to count the new connection, channel, queue, "
                      "exchange and consumer")
    ch.queue_delete(queue)
    eventually(lambda: api.json("/api/overview")["object_totals"]["queues"] == before["queues"],
               "the deleted queue to leave object_totals")


def test_overview_queue_totals_and_publish_count(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("qtotals")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["a", "b", "c"])

    def check():
        ov = api.json("/api/overview")
        assert ov["queue_totals"] == {**ov["queue_totals"], "messages": 3, "messages_ready": 3,
                                      "messages_unacknowledged": 0}, ov["queue_totals"]
        assert ov["message_stats"]["publish"] >= 3, ov["message_stats"]
        return ov

    before = eventually(check, "queue_totals and message_stats.publish to show 3 messages")
    publish(ch, queue, ["d", "e"])
    eventually(lambda: api.json("/api/overview")["message_stats"]["publish"]
               >= before["message_stats"]["publish"] + 2, "message_stats.publish to grow")
    # One consumed without ack: ready and unacked both counted.
    method, _props, _body = ch.basic_get(queue=queue, auto_ack=False)
    assert method is not None

    def unacked():
        totals = api.json("/api/overview")["queue_totals"]
        assert (totals["messages"], totals["messages_ready"],
                totals["messages_unacknowledged"]) == (5, 4, 1), totals
        return True

    eventually(unacked, "queue_totals to count the unacked message")


def test_overview_publish_rate_is_positive_while_publishing(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    queue = uname("rate")
    # Bounded: the queue keeps the newest 100.
    ch.queue_declare(queue=queue, arguments={"x-max-length": 100})
    deadline = time.monotonic() + RATE_TIMEOUT
    published = 0
    while True:
        for _ in range(20):
            ch.basic_publish(exchange="", routing_key=queue, body=b"tick")
            published += 1
        conn.process_data_events(time_limit=0)
        stats = api.json("/api/overview")["message_stats"]
        if stats["publish_details"]["rate"] > 0:
            break
        assert time.monotonic() < deadline, (
            f"publish_details.rate still {stats['publish_details']} after {RATE_TIMEOUT}s "
            f"and {published} publishes")
        time.sleep(POLL_INTERVAL_S)
    assert stats["publish"] > 0, stats
    queue_stats = api.queue(queue)["message_stats"]
    assert queue_stats["publish"] > 0, queue_stats


# --------------------------------------------------------------------------
# vhosts


def test_vhosts_list_counts_messages(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("vh")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["1", "2"])

    def check():
        vhosts = api.json("/api/vhosts")
        root = [v for v in vhosts if v["name"] == "/"]
        assert len(root) == 1, vhosts
        assert (root[0]["messages"], root[0]["messages_ready"],
                root[0]["messages_unacknowledged"]) == (2, 2, 0), root
        return True

    eventually(check, "/api/vhosts to count 2 messages in /")
    one = api.json(f"/api/vhosts/{VHOST}")
    if isinstance(one, list):  # the doc shows a list for both forms
        assert len(one) == 1, one
        one = one[0]
    assert one["name"] == "/"
    assert_error(api.get("/api/vhosts/no-such-vhost"), 404)


def test_queues_and_exchanges_are_listed_by_vhost(broker_factory):
    b = broker_factory(config='[[vhosts]]\nname = "ml"\n\n[[permissions]]\nuser = "guest"\n'
                              'vhost = "ml"\nconfigure = ".*"\nwrite = ".*"\nread = ".*"\n')
    api = Api(http_url_of(b))
    try:
        root_q, ml_q = uname("root"), uname("ml")
        b.connect().channel().queue_declare(queue=root_q)
        b.connect(vhost="ml").channel().queue_declare(queue=ml_q)
        names = {v["name"] for v in api.json("/api/vhosts")}
        assert {"/", "ml"} <= names, names

        in_root = api.json(f"/api/queues/{VHOST}")
        in_ml = api.json("/api/queues/ml")
        assert [x["name"] for x in in_root if x["name"] in (root_q, ml_q)] == [root_q]
        assert [x["name"] for x in in_ml if x["name"] in (root_q, ml_q)] == [ml_q]
        assert {x["vhost"] for x in in_root} == {"/"}
        assert {x["vhost"] for x in in_ml} == {"ml"}
        everywhere = api.json("/api/queues")
        assert by_name(everywhere, root_q, "/") is not None
        assert by_name(everywhere, ml_q, "ml") is not None
        assert api.queue(ml_q, "ml")["vhost"] == "ml"
        assert_error(api.get(f"/api/queues/ml/{q(root_q)}"), 404)

        assert {x["vhost"] for x in api.json("/api/exchanges/ml")} == {"ml"}
        assert by_name(api.json("/api/exchanges/ml"), "amq.direct", "ml") is not None
        # A queue made over HTTP lands in the vhost of the path.
        made = uname("made")
        assert api.put(f"/api/queues/ml/{made}", json={}).status_code == 201
        assert queue_exists(b.connect(vhost="ml"), made)
        assert not queue_exists(b.connect(), made)
        assert not api.server_errors, api.server_errors
    finally:
        api.close()


@pytest.mark.parametrize("path", ["/api/queues/no-such-vhost",
                                  "/api/queues/no-such-vhost/q",
                                  "/api/exchanges/no-such-vhost",
                                  "/api/bindings/no-such-vhost",
                                  "/api/consumers/no-such-vhost"])
def test_unknown_vhost_is_404(api, path):
    assert_error(api.get(path), 404)


def test_put_queue_in_unknown_vhost_is_404(api):
    assert_error(api.put("/api/queues/no-such-vhost/q", json={}), 404)


# --------------------------------------------------------------------------
# queues: reading


def test_queue_list_shows_how_queues_were_declared(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    classic, quorum, transient, exclusive = (uname("classic"), uname("quorum"),
                                             uname("transient"), uname("exclusive"))
    declared = {
        classic: dict(durable=True, auto_delete=False, exclusive=False,
                      arguments={"x-max-length": 10, "x-message-ttl": 60000}),
        quorum: dict(durable=True, auto_delete=False, exclusive=False,
                     arguments={"x-queue-type": "quorum"}),
        transient: dict(durable=False, auto_delete=True, exclusive=False, arguments={}),
        exclusive: dict(durable=False, auto_delete=False, exclusive=True, arguments={}),
    }
    for name, props in declared.items():
        ch.queue_declare(queue=name, **props)
    listed = api.json("/api/queues")
    root = api.json(f"/api/queues/{VHOST}")
    for name, props in declared.items():
        for source in (listed, root):
            info = by_name(source, name)
            assert info is not None, (name, [x["name"] for x in source])
            expected_type = "quorum" if name == quorum else "classic"
            got = {k: info[k] for k in ("vhost", "type", "durable", "auto_delete", "exclusive",
                                        "arguments", "state")}
            assert got == {"vhost": "/", "type": expected_type, "state": "running",
                           **props}, (name, info)
            assert isinstance(info["node"], str) and info["node"], info
            assert (info["messages"], info["messages_ready"],
                    info["messages_unacknowledged"], info["consumers"]) == (0, 0, 0, 0), info
            for key in ("publish", "deliver_get", "ack"):
                assert info["message_stats"][key] == 0, info["message_stats"]


def test_queue_counts_and_consumer_details(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("counts")
    ch.queue_declare(queue=queue)
    body = b"twelve bytes"
    publish(ch, queue, [body] * 5)
    api.queue_matches(queue, messages=5, messages_ready=5, messages_unacknowledged=0,
                      consumers=0, message_bytes_ready=5 * len(body))

    consumer_ch = conn.channel()
    consumer_ch.basic_qos(prefetch_count=2)
    received = []
    tag = consumer_ch.basic_consume(queue=queue, auto_ack=False, consumer_tag="counts-tag",
                                    on_message_callback=lambda c, m, p, b: received.append(m))
    assert tag == "counts-tag"
    deadline = time.monotonic() + TIMEOUT
    while len(received) < 2:
        assert time.monotonic() < deadline, f"only {len(received)} deliveries"
        conn.process_data_events(time_limit=0.05)

    info = api.queue_matches(queue, messages=5, messages_ready=3, messages_unacknowledged=2,
                             consumers=1, message_bytes_ready=3 * len(body))
    details = info["consumer_details"]
    assert len(details) == 1, details
    c = details[0]
    assert c["consumer_tag"] == "counts-tag"
    assert c["queue"] == {"name": queue, "vhost": "/"}
    assert c["ack_required"] is True
    assert c["prefetch_count"] == 2
    assert c["exclusive"] is False
    assert c["channel_details"]["number"] == consumer_ch.channel_number
    assert c["channel_details"]["user"] == "guest"

    # Acking moves them out; the two next ones are delivered.
    consumer_ch.basic_ack(delivery_tag=received[1].delivery_tag, multiple=True)
    api.queue_matches(queue, messages=3, messages_ready=1, messages_unacknowledged=2)


def test_queue_message_stats(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("stats")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["1", "2", "3", "4"])
    method, _props, _body = ch.basic_get(queue=queue, auto_ack=False)
    assert method is not None
    ch.basic_ack(method.delivery_tag)

    def check():
        stats = api.queue(queue)["message_stats"]
        got = {k: stats[k] for k in ("publish", "get", "deliver_get", "ack", "deliver")}
        assert got == {"publish": 4, "get": 1, "deliver_get": 1, "ack": 1, "deliver": 0}, stats
        return True

    eventually(check, "the queue's message_stats to count 4 publishes, 1 get and 1 ack")


def test_unknown_queue_is_404(api):
    assert_error(api.get(f"/api/queues/{VHOST}/{uname('missing')}"), 404)
    assert_error(api.get(f"/api/queues/{VHOST}/{uname('missing')}/bindings"), 404)


def test_queue_names_are_percent_decoded(broker, api):
    name = f"with space/and%percent-{uuid.uuid4().hex[:6]}"
    resp = api.put(f"/api/queues/{VHOST}/{q(name)}", json={"durable": False})
    assert resp.status_code == 201, describe(resp)
    assert queue_exists(broker.connect(), name)
    assert api.queue(name)["name"] == name
    assert by_name(api.json("/api/queues"), name) is not None
    assert api.delete(f"/api/queues/{VHOST}/{q(name)}").status_code == 204
    assert not queue_exists(broker.connect(), name)


# --------------------------------------------------------------------------
# queues: changing


def test_put_queue_201_then_204_then_inequivalent_400(broker, api):
    name = uname("put")
    path = f"/api/queues/{VHOST}/{name}"
    body = {"durable": True, "auto_delete": False, "arguments": {"x-max-length": 10}}
    resp = api.put(path, json=body)
    assert resp.status_code == 201, describe(resp)
    resp = api.put(path, json=body)
    assert resp.status_code == 204, describe(resp)
    assert_error(api.put(path, json={**body, "arguments": {"x-max-length": 11}}), 400,
                 "x-max-length")
    assert_error(api.put(path, json={**body, "durable": False}), 400, "durable")

    info = api.queue(name)
    assert (info["durable"], info["auto_delete"], info["arguments"]) == \
        (True, False, {"x-max-length": 10}), info
    conn = broker.connect()
    assert conn.channel().queue_declare(queue=name, passive=True).method.message_count == 0
    # The same declaration over AMQP is equivalent; another is not.
    conn.channel().queue_declare(queue=name, durable=True, arguments={"x-max-length": 10})
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().queue_declare(queue=name, durable=True, arguments={"x-max-length": 9})
    assert refused.value.reply_code == 406


def test_put_queue_with_defaults_and_quorum_type(api):
    plain, quorum = uname("plain"), uname("quorum")
    assert api.put(f"/api/queues/{VHOST}/{plain}", json={}).status_code == 201
    info = api.queue(plain)
    assert info["type"] == "classic" and info["exclusive"] is False, info
    resp = api.put(f"/api/queues/{VHOST}/{quorum}",
                   json={"durable": True, "arguments": {"x-queue-type": "quorum"}})
    assert resp.status_code == 201, describe(resp)
    assert api.queue(quorum)["type"] == "quorum"


@pytest.mark.parametrize("body,needle", [
    ('{"durable": tru', None),
    ("[1, 2, 3]", None),
    ('{"durable": "yes"}', None),
    ('{"arguments": {"x-max-length": -1}}', "x-max-length"),
    ('{"arguments": {"x-overflow": "explode"}}', "x-overflow"),
    ('{"arguments": {"x-queue-type": "stream-ish"}}', "x-queue-type"),
], ids=["malformed-json", "not-an-object", "bad-field", "negative-max-length",
        "bad-overflow", "bad-queue-type"])
def test_put_queue_with_a_bad_body_is_400_and_declares_nothing(api, body, needle):
    name = uname("bad")
    resp = api.put(f"/api/queues/{VHOST}/{name}", data=body,
                   headers={"Content-Type": "application/json"})
    assert_error(resp, 400, *([needle] if needle else []))
    assert_error(api.get(f"/api/queues/{VHOST}/{name}"), 404)


def test_put_on_an_exclusive_queue_of_another_connection_is_409(broker, api):
    conn = broker.connect()
    name = uname("locked")
    conn.channel().queue_declare(queue=name, exclusive=True)
    assert_error(api.put(f"/api/queues/{VHOST}/{name}", json={}), 409)
    # Still the pika connection's.
    assert api.queue(name)["exclusive"] is True
    conn.channel().queue_declare(queue=name, exclusive=True)


def test_delete_queue_204_then_404(broker, api):
    name = uname("del")
    path = f"/api/queues/{VHOST}/{name}"
    assert api.put(path, json={}).status_code == 201
    resp = api.delete(path)
    assert resp.status_code == 204, describe(resp)
    assert_error(api.get(path), 404)
    assert_error(api.delete(path), 404)
    assert not queue_exists(broker.connect(), name)


def test_delete_if_empty_refuses_a_queue_with_messages(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    name = uname("ifempty")
    ch.queue_declare(queue=name)
    publish(ch, name, ["keep me"])
    path = f"/api/queues/{VHOST}/{name}"
    assert_error(api.delete(path, params={"if-empty": "true"}), 400)
    assert message_count(conn, name) == 1
    assert api.queue(name)["messages"] == 1
    assert api.delete(path).status_code == 204
    assert not queue_exists(conn, name)


def test_delete_if_unused_refuses_a_queue_with_consumers(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    name = uname("ifunused")
    ch.queue_declare(queue=name)
    ch.basic_consume(queue=name, on_message_callback=lambda *a: None)
    path = f"/api/queues/{VHOST}/{name}"
    assert_error(api.delete(path, params={"if-unused": "true"}), 400)
    assert queue_exists(conn, name)


def test_purge_empties_the_queue(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    name = uname("purge")
    ch.queue_declare(queue=name)
    publish(ch, name, ["1", "2", "3"])
    api.queue_matches(name, messages_ready=3)
    resp = api.delete(f"/api/queues/{VHOST}/{name}/contents")
    assert resp.status_code == 204, describe(resp)
    assert message_count(conn, name) == 0
    method, _props, _body = ch.basic_get(queue=name, auto_ack=True)
    assert method is None
    api.queue_matches(name, messages=0, messages_ready=0)
    assert_error(api.delete(f"/api/queues/{VHOST}/{uname('missing')}/contents"), 404)


# --------------------------------------------------------------------------
# exchanges


def test_exchange_list_has_the_builtin_exchanges(api):
    exchanges = api.json(f"/api/exchanges/{VHOST}")
    expected = {"": "direct", "amq.direct": "direct", "amq.fanout": "fanout",
                "amq.topic": "topic", "amq.headers": "headers"}
    for name, kind in expected.items():
        info = by_name(exchanges, name)
        assert info is not None, (name, [e["name"] for e in exchanges])
        assert (info["type"], info["durable"], info["auto_delete"], info["internal"]) == \
            (kind, True, False, False), info
        assert info["arguments"] == {}, info
    assert by_name(api.json("/api/exchanges"), "amq.topic") is not None
    default = api.json(f"/api/exchanges/{VHOST}/amq.default")
    assert (default["name"], default["type"]) == ("", "direct"), default
    direct = api.json(f"/api/exchanges/{VHOST}/amq.direct")
    assert (direct["name"], direct["vhost"], direct["type"]) == ("amq.direct", "/", "direct")


def test_exchange_declared_over_amqp_shows_its_properties(broker, api):
    ch = broker.connect().channel()
    name = uname("x")
    ch.exchange_declare(exchange=name, exchange_type="topic", durable=False, auto_delete=True,
                        arguments={"alternate-exchange": "somewhere"})
    info = api.json(f"/api/exchanges/{VHOST}/{name}")
    assert {k: info[k] for k in ("name", "vhost", "type", "durable", "auto_delete", "internal",
                                 "arguments")} == {
        "name": name, "vhost": "/", "type": "topic", "durable": False, "auto_delete": True,
        "internal": False, "arguments": {"alternate-exchange": "somewhere"}}, info


def test_put_exchange_201_then_204_then_inequivalent_400(broker, api):
    name = uname("putx")
    path = f"/api/exchanges/{VHOST}/{name}"
    body = {"type": "fanout", "durable": True, "auto_delete": False, "internal": False,
            "arguments": {}}
    resp = api.put(path, json=body)
    assert resp.status_code == 201, describe(resp)
    assert api.put(path, json=body).status_code == 204
    assert_error(api.put(path, json={**body, "type": "direct"}), 400)
    info = api.json(path)
    assert (info["type"], info["durable"]) == ("fanout", True), info
    conn = broker.connect()
    conn.channel().exchange_declare(exchange=name, passive=True)
    conn.channel().exchange_declare(exchange=name, exchange_type="fanout", durable=True)


@pytest.mark.parametrize("body", [{"type": "nonsense"}, {"type": 7}, '{"type": '],
                         ids=["unknown-type", "type-not-a-string", "malformed-json"])
def test_put_exchange_with_a_bad_body_is_400(broker, api, body):
    name = uname("badx")
    path = f"/api/exchanges/{VHOST}/{name}"
    if isinstance(body, str):
        resp = api.put(path, data=body, headers={"Content-Type": "application/json"})
    else:
        resp = api.put(path, json=body)
    assert_error(resp, 400)
    assert_error(api.get(path), 404)


def test_delete_exchange_204_then_404(broker, api):
    name = uname("delx")
    path = f"/api/exchanges/{VHOST}/{name}"
    assert api.put(path, json={"type": "direct"}).status_code == 201
    resp = api.delete(path)
    assert resp.status_code == 204, describe(resp)
    assert_error(api.get(path), 404)
    assert_error(api.delete(path), 404)
    with pytest.raises(ChannelClosedByBroker) as missing:
        broker.connect().channel().exchange_declare(exchange=name, passive=True)
    assert missing.value.reply_code == 404


def test_delete_exchange_if_unused_refuses_a_bound_exchange(broker, api):
    ch = broker.connect().channel()
    name, queue = uname("boundx"), uname("boundq")
    ch.exchange_declare(exchange=name, exchange_type="direct")
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange=name, routing_key="k")
    assert_error(api.delete(f"/api/exchanges/{VHOST}/{name}", params={"if-unused": "true"}), 400)
    assert api.json(f"/api/exchanges/{VHOST}/{name}")["name"] == name


def test_unknown_exchange_is_404(api):
    assert_error(api.get(f"/api/exchanges/{VHOST}/{uname('nox')}"), 404)
    assert_error(api.get(f"/api/exchanges/{VHOST}/{uname('nox')}/bindings/source"), 404)


def test_exchange_message_stats_count_publishes(broker, api):
    ch = confirmed_channel(broker.connect())
    queue = uname("xstats")
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange="amq.fanout")
    publish(ch, "", ["1", "2"], exchange="amq.fanout")

    def check():
        stats = api.json(f"/api/exchanges/{VHOST}/amq.fanout")["message_stats"]
        assert stats["publish_in"] == 2 and stats["publish_out"] == 2, stats
        assert isinstance(stats["publish_in_details"]["rate"], (int, float)), stats
        return True

    eventually(check, "amq.fanout's publish_in/publish_out to count 2")


# --------------------------------------------------------------------------
# bindings


def last_segment(location: str) -> str:
    return unquote(location.rstrip("/").rsplit("/", 1)[-1])


def test_binding_exchange_to_queue(broker, api):
    exchange, queue = uname("bx"), uname("bq")
    assert api.put(f"/api/exchanges/{VHOST}/{exchange}", json={"type": "direct"}).status_code == 201
    assert api.put(f"/api/queues/{VHOST}/{queue}", json={}).status_code == 201
    path = f"/api/bindings/{VHOST}/e/{exchange}/q/{queue}"
    resp = api.post(path, json={"routing_key": "k1", "arguments": {}})
    assert resp.status_code == 201, describe(resp)
    location = resp.headers.get("Location")
    assert location, resp.headers

    listed = api.json(path)
    assert len(listed) == 1, listed
    binding = listed[0]
    assert {k: binding[k] for k in ("source", "vhost", "destination", "destination_type",
                                    "routing_key", "arguments")} == {
        "source": exchange, "vhost": "/", "destination": queue, "destination_type": "queue",
        "routing_key": "k1", "arguments": {}}, binding
    key = binding["properties_key"]
    assert isinstance(key, str) and key, binding
    assert last_segment(location) == key, (location, key)

    in_vhost = [b for b in api.json(f"/api/bindings/{VHOST}") if b["source"] == exchange]
    assert in_vhost == [binding], in_vhost
    assert [b for b in api.json("/api/bindings") if b["source"] == exchange] == [binding]
    assert api.json(f"/api/exchanges/{VHOST}/{exchange}/bindings/source") == [binding]
    assert api.json(f"/api/exchanges/{VHOST}/{exchange}/bindings/destination") == []
    of_queue = api.json(f"/api/queues/{VHOST}/{queue}/bindings")
    assert len(of_queue) == 2, of_queue
    implicit = [b for b in of_queue if b["source"] == ""]
    assert len(implicit) == 1, of_queue
    assert (implicit[0]["routing_key"], implicit[0]["destination"],
            implicit[0]["destination_type"]) == (queue, queue, "queue"), implicit
    assert binding in of_queue

    # Routing follows the binding.
    conn = broker.connect()
    ch = confirmed_channel(conn)
    publish(ch, "k1", ["via binding"], exchange=exchange)
    method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"via binding"
    with pytest.raises(UnroutableError):
        publish(ch, "k2", ["nowhere"], exchange=exchange)

    resp = api.delete(f"{path}/{q(key)}")
    assert resp.status_code == 204, describe(resp)
    assert api.json(path) == []
    assert_error(api.delete(f"{path}/{q(key)}"), 404)
    with pytest.raises(UnroutableError):
        publish(ch, "k1", ["unbound"], exchange=exchange)
    assert message_count(conn, queue) == 0


def test_bindings_with_arguments_have_their_own_properties_key(broker, api):
    exchange, queue = uname("hx"), uname("hq")
    ch = confirmed_channel(broker.connect())
    ch.exchange_declare(exchange=exchange, exchange_type="headers")
    ch.queue_declare(queue=queue)
    path = f"/api/bindings/{VHOST}/e/{exchange}/q/{queue}"
    first = api.post(path, json={"routing_key": "", "arguments": {"x-match": "all", "a": "1"}})
    second = api.post(path, json={"routing_key": "", "arguments": {"x-match": "all", "b": "2"}})
    assert first.status_code == 201 and second.status_code == 201, (describe(first),
                                                                    describe(second))
    listed = api.json(path)
    assert len(listed) == 2, listed
    keys = {json.dumps(b["arguments"], sort_keys=True): b["properties_key"] for b in listed}
    key_a = keys[json.dumps({"x-match": "all", "a": "1"}, sort_keys=True)]
    key_b = keys[json.dumps({"x-match": "all", "b": "2"}, sort_keys=True)]
    assert key_a != key_b
    assert last_segment(first.headers["Location"]) == key_a
    assert last_segment(second.headers["Location"]) == key_b

    assert api.delete(f"{path}/{q(key_a)}").status_code == 204
    assert [b["properties_key"] for b in api.json(path)] == [key_b]
    with pytest.raises(UnroutableError):
        publish(ch, "", ["a"], exchange=exchange,
                properties=pika.BasicProperties(headers={"a": "1"}))
    publish(ch, "", ["b"], exchange=exchange, properties=pika.BasicProperties(headers={"b": "2"}))
    method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"b"


def test_binding_exchange_to_exchange(broker, api):
    source, destination, queue = uname("src"), uname("dst"), uname("e2e")
    assert api.put(f"/api/exchanges/{VHOST}/{source}", json={"type": "topic"}).status_code == 201
    assert api.put(f"/api/exchanges/{VHOST}/{destination}",
                   json={"type": "fanout"}).status_code == 201
    conn = broker.connect()
    ch = confirmed_channel(conn)
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange=destination)

    path = f"/api/bindings/{VHOST}/e/{source}/e/{destination}"
    resp = api.post(path, json={"routing_key": "a.*", "arguments": {}})
    assert resp.status_code == 201, describe(resp)
    listed = api.json(path)
    assert len(listed) == 1, listed
    binding = listed[0]
    assert (binding["source"], binding["destination"], binding["destination_type"],
            binding["routing_key"]) == (source, destination, "exchange", "a.*"), binding
    assert last_segment(resp.headers["Location"]) == binding["properties_key"]
    assert binding in api.json(f"/api/exchanges/{VHOST}/{destination}/bindings/destination")
    assert api.json(f"/api/exchanges/{VHOST}/{source}/bindings/source") == [binding]

    publish(ch, "a.b", ["through two exchanges"], exchange=source)
    method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"through two exchanges"
    with pytest.raises(UnroutableError):
        publish(ch, "b.c", ["no match"], exchange=source)

    resp = api.delete(f"{path}/{q(binding['properties_key'])}")
    assert resp.status_code == 204, describe(resp)
    assert api.json(path) == []
    with pytest.raises(UnroutableError):
        publish(ch, "a.b", ["unbound"], exchange=source)


def test_binding_to_a_missing_queue_or_exchange_is_404(broker, api):
    queue = uname("bq")
    assert api.put(f"/api/queues/{VHOST}/{queue}", json={}).status_code == 201
    assert_error(api.post(f"/api/bindings/{VHOST}/e/amq.direct/q/{uname('missing')}",
                          json={"routing_key": "k"}), 404)
    assert_error(api.post(f"/api/bindings/{VHOST}/e/{uname('missing')}/q/{queue}",
                          json={"routing_key": "k"}), 404)
    assert_error(api.delete(f"/api/bindings/{VHOST}/e/amq.direct/q/{queue}/no-such-key"), 404)


# --------------------------------------------------------------------------
# publish and get


def test_publish_to_the_default_exchange(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    queue = uname("pub")
    ch.queue_declare(queue=queue)
    resp = api.post(f"/api/exchanges/{VHOST}/amq.default/publish", json={
        "routing_key": queue,
        "payload": "hello over http",
        "payload_encoding": "string",
        "properties": {"content_type": "text/plain", "delivery_mode": 2,
                       "headers": {"h1": "v1", "n": 5}, "correlation_id": "corr-7",
                       "message_id": "msg-7", "priority": 4},
    })
    assert resp.status_code == 200, describe(resp)
    assert resp.json() == {"routed": True}
    # Answered after the broker confirmed it: the message is there now.
    method, props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None, "the published message is not in the queue"
    assert body == b"hello over http"
    assert (method.exchange, method.routing_key) == ("", queue)
    assert props.content_type == "text/plain"
    assert props.delivery_mode == 2
    assert {k: text(v) for k, v in (props.headers or {}).items()} == {"h1": "v1", "n": 5}
    assert (props.correlation_id, props.message_id, props.priority) == ("corr-7", "msg-7", 4)


def test_publish_base64_payload(broker, api):
    ch = broker.connect().channel()
    queue = uname("pub64")
    ch.queue_declare(queue=queue)
    payload = bytes(range(256))
    resp = api.post(f"/api/exchanges/{VHOST}/amq.default/publish", json={
        "routing_key": queue, "payload": base64.b64encode(payload).decode(),
        "payload_encoding": "base64", "properties": {}})
    assert resp.status_code == 200, describe(resp)
    assert resp.json() == {"routed": True}
    method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == payload


def test_publish_to_a_named_exchange(broker, api):
    ch = broker.connect().channel()
    queue = uname("pubx")
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange="amq.topic", routing_key="sensors.#")
    resp = api.post(f"/api/exchanges/{VHOST}/amq.topic/publish", json={
        "routing_key": "sensors.kitchen.temp", "payload": "21.5", "payload_encoding": "string",
        "properties": {}})
    assert resp.status_code == 200, describe(resp)
    assert resp.json() == {"routed": True}
    method, _props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"21.5"
    assert method.routing_key == "sensors.kitchen.temp"


def test_publish_unroutable_is_routed_false(api):
    resp = api.post(f"/api/exchanges/{VHOST}/amq.default/publish", json={
        "routing_key": uname("nobody"), "payload": "lost", "payload_encoding": "string",
        "properties": {}})
    assert resp.status_code == 200, describe(resp)
    assert resp.json() == {"routed": False}


def test_publish_to_an_unknown_exchange_is_404(api):
    assert_error(api.post(f"/api/exchanges/{VHOST}/{uname('nox')}/publish", json={
        "routing_key": "k", "payload": "x", "payload_encoding": "string", "properties": {}}), 404)


@pytest.mark.parametrize("extra", [{"payload_encoding": "rot13"},
                                   {"payload_encoding": "base64", "payload": "%%% not base64"},
                                   {"properties": {"delivery_mode": "very"}}],
                         ids=["unknown-encoding", "bad-base64", "bad-property"])
def test_publish_with_a_bad_body_is_400_and_publishes_nothing(broker, api, extra):
    conn = broker.connect()
    queue = uname("pubbad")
    conn.channel().queue_declare(queue=queue)
    body = {"routing_key": queue, "payload": "x", "payload_encoding": "string",
            "properties": {}, **extra}
    assert_error(api.post(f"/api/exchanges/{VHOST}/amq.default/publish", json=body), 400)
    assert message_count(conn, queue) == 0


def get_messages(api: Api, queue: str, **body) -> List[Dict[str, Any]]:
    resp = api.post(f"/api/queues/{VHOST}/{q(queue)}/get", json=body)
    assert resp.status_code == 200, describe(resp)
    got = resp.json()
    assert isinstance(got, list), got
    return got


def test_get_with_requeue_returns_the_first_messages_and_keeps_them(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("get")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["m1", "m2", "m3"],
            properties=pika.BasicProperties(content_type="text/plain", headers={"k": "v"}))
    got = get_messages(api, queue, count=2, ackmode="ack_requeue_true", encoding="auto",
                       truncate=50000)
    assert [m["payload"] for m in got] == ["m1", "m2"], got
    for m in got:
        assert (m["payload_encoding"], m["payload_bytes"], m["redelivered"], m["exchange"],
                m["routing_key"]) == ("string", 2, False, "", queue), m
        assert m["properties"]["content_type"] == "text/plain", m
        assert m["properties"]["headers"] == {"k": "v"}, m
    assert [m["message_count"] for m in got] == [2, 1], got
    api.queue_matches(queue, messages=3, messages_ready=3, messages_unacknowledged=0)
    # Back at their places, marked redelivered.
    assert get_all(ch, queue) == [(b"m1", True), (b"m2", True), (b"m3", False)]


def test_get_with_ack_removes_the_messages(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("getack")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["m1", "m2", "m3"])
    got = get_messages(api, queue, count=2, ackmode="ack_requeue_false", encoding="auto")
    assert [m["payload"] for m in got] == ["m1", "m2"], got
    api.queue_matches(queue, messages=1, messages_ready=1, messages_unacknowledged=0)
    assert get_all(ch, queue) == [(b"m3", False)]


def test_get_reject_requeue_false_drops_and_count_beyond_the_queue(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("getrej")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["only"])
    got = get_messages(api, queue, count=5, ackmode="reject_requeue_false", encoding="auto")
    assert [m["payload"] for m in got] == ["only"], got
    assert got[0]["message_count"] == 0
    api.queue_matches(queue, messages=0)
    assert get_messages(api, queue, count=3, ackmode="ack_requeue_true", encoding="auto") == []


def test_get_encodes_binary_payloads_in_base64(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("getbin")
    ch.queue_declare(queue=queue)
    binary = b"\x00\xff\xfe binary \x80"
    publish(ch, queue, [binary, b"plain text"])
    got = get_messages(api, queue, count=2, ackmode="ack_requeue_true", encoding="auto")
    assert got[0]["payload_encoding"] == "base64", got
    assert base64.b64decode(got[0]["payload"]) == binary
    assert got[0]["payload_bytes"] == len(binary)
    assert (got[1]["payload_encoding"], got[1]["payload"]) == ("string", "plain text"), got
    forced = get_messages(api, queue, count=2, ackmode="ack_requeue_true", encoding="base64")
    assert [(m["payload_encoding"], base64.b64decode(m["payload"])) for m in forced] == \
        [("base64", binary), ("base64", b"plain text")], forced


def test_get_truncates_the_payload_but_reports_its_size(broker, api):
    ch = confirmed_channel(broker.connect())
    queue = uname("gettrunc")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["abcdefgh"])
    got = get_messages(api, queue, count=1, ackmode="ack_requeue_true", encoding="auto",
                       truncate=3)
    assert (got[0]["payload"], got[0]["payload_bytes"]) == ("abc", 8), got


def test_get_from_an_unknown_queue_is_404(api):
    assert_error(api.post(f"/api/queues/{VHOST}/{uname('missing')}/get",
                          json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}),
                 404)


def test_get_with_a_bad_ackmode_is_400(broker, api):
    ch = confirmed_channel(broker.connect())
    queue = uname("getbad")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["stays"])
    assert_error(api.post(f"/api/queues/{VHOST}/{queue}/get",
                          json={"count": 1, "ackmode": "eat_it", "encoding": "auto"}), 400)
    assert_error(api.post(f"/api/queues/{VHOST}/{queue}/get",
                          json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "rot13"}),
                 400)
    api.queue_matches(queue, messages=1, messages_ready=1, messages_unacknowledged=0)


# --------------------------------------------------------------------------
# messages over plain HTTP


def test_post_message_to_a_queue(broker, api):
    ch = broker.connect().channel()
    queue = uname("msg")
    ch.queue_declare(queue=queue, durable=True)
    body = b"\x00raw bytes \xff as they are"
    resp = api.post(f"/api/queues/{VHOST}/{queue}/messages", data=body, headers={
        "Content-Type": "application/octet-stream", "X-Correlation-Id": "corr-1",
        "X-Message-Id": "mid-1", "X-Reply-To": "replies", "X-Priority": "3",
        "X-Expiration": "60000"})
    assert resp.status_code == 202, describe(resp)
    assert resp.json() == {"routed": True}
    method, props, got = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None, "the message is not in the queue"
    assert got == body
    assert props.content_type == "application/octet-stream"
    assert props.delivery_mode == 2
    assert (props.correlation_id, props.message_id, props.reply_to, props.priority,
            props.expiration) == ("corr-1", "mid-1", "replies", 3, "60000")


def test_post_transient_message(broker, api):
    ch = broker.connect().channel()
    queue = uname("msgt")
    ch.queue_declare(queue=queue)
    resp = api.post(f"/api/queues/{VHOST}/{queue}/messages", params={"persistent": "false"},
                    data=b'{"k": 1}', headers={"Content-Type": "application/json"})
    assert resp.status_code == 202, describe(resp)
    method, props, got = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and got == b'{"k": 1}'
    assert props.content_type == "application/json"
    assert props.delivery_mode in (None, 1), props


def test_post_message_to_a_missing_queue_is_404(api):
    assert_error(api.post(f"/api/queues/{VHOST}/{uname('missing')}/messages", data=b"x",
                          headers={"Content-Type": "text/plain"}), 404)


def test_post_message_to_a_full_queue_is_429(broker, api):
    conn = broker.connect()
    queue = uname("full")
    conn.channel().queue_declare(queue=queue, arguments={"x-max-length": 1,
                                                         "x-overflow": "reject-publish"})
    path = f"/api/queues/{VHOST}/{queue}/messages"
    first = api.post(path, data=b"first", headers={"Content-Type": "text/plain"})
    assert first.status_code == 202, describe(first)
    second = api.post(path, data=b"second", headers={"Content-Type": "text/plain"})
    assert_error(second, 429)
    retry_after = second.headers.get("Retry-After", "")
    assert retry_after.isdigit(), second.headers
    assert message_count(conn, queue) == 1
    method, _props, body = conn.channel().basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"first"


def test_post_message_to_an_exchange_with_a_routing_key(broker, api):
    ch = broker.connect().channel()
    queue = uname("msgx")
    ch.queue_declare(queue=queue)
    ch.queue_bind(queue=queue, exchange="amq.direct", routing_key="rk-1")
    resp = api.post(f"/api/exchanges/{VHOST}/amq.direct/messages", params={"routing_key": "rk-1"},
                    data=b"via exchange", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 202, describe(resp)
    assert resp.json() == {"routed": True}
    method, props, body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None and body == b"via exchange"
    assert (method.exchange, method.routing_key) == ("amq.direct", "rk-1")
    assert props.content_type == "text/plain"
    assert_error(api.post(f"/api/exchanges/{VHOST}/{uname('nox')}/messages",
                          params={"routing_key": "k"}, data=b"x"), 404)


# --------------------------------------------------------------------------
# connections, channels, consumers


def find_connection(api: Api, connection_name: str) -> Dict[str, Any]:
    def check():
        found = [c for c in api.json("/api/connections")
                 if text((c.get("client_properties") or {}).get("connection_name"))
                 == connection_name]
        assert len(found) == 1, found
        return found[0]
    return eventually(check, f"connection {connection_name!r} in /api/connections")


def test_connections_list_pika_connection(broker, api):
    before_ms = time.time() * 1000
    conn_name = uname("conn")
    conn = broker.connect(client_properties={"connection_name": conn_name})
    conn.channel()
    conn.channel()
    port = local_port(conn)
    info = find_connection(api, conn_name)
    assert info["name"] == f"127.0.0.1:{port} -> 127.0.0.1:{broker.port}", info
    assert {k: info[k] for k in ("user", "vhost", "protocol", "state", "peer_host", "peer_port",
                                 "host", "port")} == {
        "user": "guest", "vhost": "/", "protocol": "AMQP 0-9-1", "state": "running",
        "peer_host": "127.0.0.1", "peer_port": port, "host": "127.0.0.1",
        "port": broker.port}, info
    eventually(lambda: find_connection(api, conn_name)["channels"] == 2, "channels == 2")
    for key in ("channel_max", "frame_max", "timeout"):
        assert isinstance(info[key], int), (key, info)
    assert info["frame_max"] > 0 and info["channel_max"] > 0, info
    assert before_ms - 5000 <= info["connected_at"] <= time.time() * 1000 + 5000, info
    assert isinstance(info["node"], str) and info["node"]

    one = api.json(f"/api/connections/{q(info['name'])}")
    assert (one["name"], one["peer_port"]) == (info["name"], port), one
    assert_error(api.get(f"/api/connections/{q('127.0.0.1:1 -> 127.0.0.1:2')}"), 404)


def test_channels_show_prefetch_and_confirm_mode(broker, api):
    conn_name = uname("chan")
    conn = broker.connect(client_properties={"connection_name": conn_name})
    qos_ch = conn.channel()
    qos_ch.basic_qos(prefetch_count=7)
    confirm_ch = conn.channel()
    confirm_ch.confirm_delivery()
    connection = find_connection(api, conn_name)

    def check():
        mine = {c["number"]: c for c in api.json("/api/channels")
                if c["connection_details"]["name"] == connection["name"]}
        assert set(mine) == {qos_ch.channel_number, confirm_ch.channel_number}, mine
        return mine

    mine = eventually(check, "both channels in /api/channels")
    qos, confirm = mine[qos_ch.channel_number], mine[confirm_ch.channel_number]
    assert (qos["prefetch_count"], qos["confirm"], qos["transactional"]) == (7, False, False), qos
    assert (confirm["prefetch_count"], confirm["confirm"]) == (0, True), confirm
    for c in (qos, confirm):
        assert c["name"] == f"{connection['name']} ({c['number']})", c
        assert (c["user"], c["vhost"], c["consumer_count"], c["messages_unacknowledged"]) == \
            ("guest", "/", 0, 0), c
        assert c["connection_details"]["peer_port"] == local_port(conn), c
        assert c["connection_details"]["peer_host"] == "127.0.0.1", c


def test_consumers_list(broker, api):
    conn_name = uname("cons")
    conn = broker.connect(client_properties={"connection_name": conn_name})
    ch = conn.channel()
    queue = uname("consq")
    ch.queue_declare(queue=queue)
    ch.basic_qos(prefetch_count=3)
    ch.basic_consume(queue=queue, on_message_callback=lambda *a: None, auto_ack=False,
                     consumer_tag="manual-tag")
    noack_ch = conn.channel()
    noack_ch.basic_consume(queue=queue, on_message_callback=lambda *a: None, auto_ack=True,
                           consumer_tag="noack-tag")
    connection = find_connection(api, conn_name)

    def check(path):
        mine = {c["consumer_tag"]: c for c in api.json(path) if c["queue"]["name"] == queue}
        assert set(mine) == {"manual-tag", "noack-tag"}, mine
        return mine

    for path in ("/api/consumers", f"/api/consumers/{VHOST}"):
        mine = eventually(lambda: check(path), f"both consumers in {path}")
        manual, noack = mine["manual-tag"], mine["noack-tag"]
        assert manual["queue"] == {"name": queue, "vhost": "/"}
        assert (manual["ack_required"], manual["prefetch_count"], manual["exclusive"],
                manual["active"]) == (True, 3, False, True), manual
        assert noack["ack_required"] is False, noack
        details = manual["channel_details"]
        assert (details["connection_name"], details["number"], details["user"],
                details["peer_port"]) == (connection["name"], ch.channel_number, "guest",
                                          local_port(conn)), details
        assert noack["channel_details"]["number"] == noack_ch.channel_number
    ch.basic_cancel("manual-tag")
    eventually(lambda: [c["consumer_tag"] for c in api.json("/api/consumers")
                        if c["queue"]["name"] == queue] == ["noack-tag"],
               "the cancelled consumer to leave /api/consumers")


def test_delete_connection_closes_it_with_320(broker, api):
    conn_name = uname("kill")
    conn = broker.connect(client_properties={"connection_name": conn_name})
    conn.channel()
    info = find_connection(api, conn_name)
    resp = api.delete(f"/api/connections/{q(info['name'])}")
    assert resp.status_code == 204, describe(resp)

    deadline = time.monotonic() + TIMEOUT
    with pytest.raises(ConnectionClosedByBroker) as closed:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
    assert closed.value.reply_code == 320, closed.value

    def gone():
        assert api.get(f"/api/connections/{q(info['name'])}").status_code == 404
        assert all(text((c.get("client_properties") or {}).get("connection_name")) != conn_name
                   for c in api.json("/api/connections"))
        return True

    eventually(gone, "the closed connection to leave /api/connections")
    assert_error(api.delete(f"/api/connections/{q(info['name'])}"), 404)


# --------------------------------------------------------------------------
# WebSocket consumer


def ws_connect(http_base: str, queue: str, query: str = "", auth: Optional[str] = None):
    return websocket.create_connection(
        ws_url(http_base, f"/api/queues/{VHOST}/{q(queue)}/consume{query}"),
        header=[auth or basic_auth_header()], timeout=TIMEOUT)


def test_websocket_consumer_prefetch_ack_and_requeue_on_close(broker, api, http_base):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("ws")
    ch.queue_declare(queue=queue)
    bodies = [f"m{i}" for i in range(5)]
    publish(ch, queue, bodies, properties=pika.BasicProperties(content_type="text/plain"))

    ws = ws_connect(http_base, queue, "?prefetch=2")
    try:
        first, second = ws_recv_json(ws), ws_recv_json(ws)
        assert [first["payload"], second["payload"]] == ["m0", "m1"], (first, second)
        for frame in (first, second):
            assert (frame["redelivered"], frame["exchange"], frame["routing_key"],
                    frame["payload_encoding"]) == (False, "", queue, "string"), frame
            assert frame["properties"]["content_type"] == "text/plain", frame
            assert isinstance(frame["delivery_tag"], int), frame
        assert first["delivery_tag"] != second["delivery_tag"]

        # The window is full: the broker shows two unacked, and nothing more
        # comes until an ack.
        api.queue_matches(queue, messages_ready=3, messages_unacknowledged=2, consumers=1)
        ws.settimeout(ABSENCE_WAIT_S)
        with pytest.raises(websocket.WebSocketTimeoutException):
            extra = ws.recv_data_frame()
            pytest.fail(f"a third message arrived past prefetch=2: {extra!r}")

        ws.send(json.dumps({"ack": first["delivery_tag"]}))
        third = ws_recv_json(ws)
        assert third["payload"] == "m2", third
        api.queue_matches(queue, messages_ready=2, messages_unacknowledged=2, consumers=1)
    finally:
        ws.close()

    # m1 and m2 were not acked: back in the queue, redelivered; m0 is gone.
    api.queue_matches(queue, messages_ready=4, messages_unacknowledged=0, consumers=0)
    assert get_all(ch, queue) == [(b"m1", True), (b"m2", True), (b"m3", False), (b"m4", False)]


def test_http_sessions_are_direct_connections_not_amqp_clients(broker, api, http_base):
    """The HTTP side reaches the broker in process, as RabbitMQ's management
    plugin does with direct connections: a WebSocket consumer's session is
    listed as a direct connection of the requesting user on the HTTP port,
    not as an AMQP client on the AMQP listener, and goes with the socket."""
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("wsdirect")
    ch.queue_declare(queue=queue)
    http_port = int(http_base.rsplit(":", 1)[1].rstrip("/"))

    def direct_sessions():
        resp = api.get("/api/connections")
        assert resp.status_code == 200, describe(resp)
        return [c for c in resp.json() if c["type"] == "direct"]

    ws = ws_connect(http_base, queue)
    try:
        sessions = eventually(lambda: direct_sessions() or None, "a direct session listed")
        assert len(sessions) == 1, sessions
        session = sessions[0]
        assert session["protocol"] == "Direct 0-9-1", session
        assert session["user"] == "guest", session
        assert session["port"] == http_port, session
        assert session["port"] != broker.port, session
        assert session["client_properties"]["connection_name"] == "HTTP API (guest)", session
        network = [c for c in api.get("/api/connections").json() if c["type"] == "network"]
        assert [c["port"] for c in network] == [broker.port], network
    finally:
        ws.close()
    eventually(lambda: not direct_sessions(), "the direct session closed with the socket")


def test_paged_out_messages_are_read_back_ahead_of_a_consumer(broker, api):
    """A queue keeps 2,048 messages in memory and pages the rest out. Once a
    consumer has taken the ones in memory, the broker reads the next
    paged-out ones back ahead of it, off its lock: they wait in memory
    (`messages_ready_ram`) before the consumer asks for them, and they all
    arrive, in order."""
    resident_max = 2048
    total = resident_max + 1000
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("paged")
    ch.queue_declare(queue=queue)
    publish(ch, queue, [f"m{i}" for i in range(total)])
    info = api.queue_matches(queue, messages_ready=total)
    assert info["messages_ready_ram"] == resident_max, info
    assert info["messages_paged_out"] == total - resident_max, info

    # Take the messages in memory and a few more, then stop consuming.
    taken = resident_max + 10
    ch.basic_qos(prefetch_count=50)
    bodies = []
    for method, _props, body in ch.consume(queue, inactivity_timeout=TIMEOUT):
        assert method is not None, f"no delivery after {len(bodies)}"
        bodies.append(body.decode())
        ch.basic_ack(method.delivery_tag)
        if len(bodies) == taken:
            break
    ch.cancel()
    assert bodies == [f"m{i}" for i in range(taken)]

    def read_ahead():
        info = api.queue(queue)
        # Without read-ahead nothing but what came back from the prefetch
        # window would be in memory.
        assert info["messages_ready_ram"] > 50, info
        return info
    eventually(read_ahead, "paged-out messages read back ahead of the consumer")
    rest = get_all(ch, queue)
    assert [body.decode() for body, _ in rest] == [f"m{i}" for i in range(taken, total)]


def test_websocket_nack_reject_and_multiple_ack(broker, api, http_base):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("wsnack")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["a", "b"])
    ws = ws_connect(http_base, queue)
    try:
        a, b = ws_recv_json(ws), ws_recv_json(ws)
        assert [a["payload"], b["payload"]] == ["a", "b"]
        ws.send(json.dumps({"nack": a["delivery_tag"], "requeue": True}))
        again = ws_recv_json(ws)
        assert (again["payload"], again["redelivered"]) == ("a", True), again
        ws.send(json.dumps({"reject": b["delivery_tag"], "requeue": False}))
        api.queue_matches(queue, messages=1, messages_unacknowledged=1)

        publish(ch, queue, ["c", "d"])
        c, d = ws_recv_json(ws), ws_recv_json(ws)
        assert [c["payload"], d["payload"]] == ["c", "d"]
        ws.send(json.dumps({"ack": d["delivery_tag"], "multiple": True}))
        api.queue_matches(queue, messages=0, messages_ready=0, messages_unacknowledged=0)
    finally:
        ws.close()
    assert get_all(ch, queue) == []


def test_websocket_binary_payload_is_base64(broker, http_base):
    ch = confirmed_channel(broker.connect())
    queue = uname("wsbin")
    ch.queue_declare(queue=queue)
    binary = b"\xff\x00\xfe"
    publish(ch, queue, [binary])
    ws = ws_connect(http_base, queue)
    try:
        frame = ws_recv_json(ws)
        assert frame["payload_encoding"] == "base64", frame
        assert base64.b64decode(frame["payload"]) == binary
        ws.send(json.dumps({"ack": frame["delivery_tag"]}))
    finally:
        ws.close()


@pytest.mark.parametrize("bad_frame", ["this is not json", '{"dance": 1}'],
                         ids=["not-json", "unknown-command"])
def test_websocket_bad_frame_gets_an_error_and_close_1008(broker, api, http_base, bad_frame):
    queue = uname("wsbad")
    broker.connect().channel().queue_declare(queue=queue)
    ws = ws_connect(http_base, queue)
    try:
        api.queue_matches(queue, consumers=1)
        ws.send(bad_frame)
        frames, code = ws_frames_until_close(ws)
    finally:
        ws.close()
    errors = [f for f in frames if isinstance(f, dict) and "error" in f]
    assert errors, frames
    assert code == 1008, (code, frames)
    api.queue_matches(queue, consumers=0)


def test_websocket_needs_credentials(broker, http_base):
    queue = uname("wsauth")
    broker.connect().channel().queue_declare(queue=queue)
    url = ws_url(http_base, f"/api/queues/{VHOST}/{queue}/consume")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=TIMEOUT)
    assert refused.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, header=[basic_auth_header("guest", "nope")],
                                    timeout=TIMEOUT)
    assert refused.value.status_code == 401


def test_websocket_on_an_unknown_queue_is_404(http_base):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws_connect(http_base, uname("missing"))
    assert refused.value.status_code == 404


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("path", ["/api/no-such-thing", "/api/queues/%2F/q/what/is/this",
                                  "/api/overview/extra"])
def test_unknown_path_is_404(api, path):
    assert_error(api.get(path), 404)


@pytest.mark.parametrize("method,path", [("PATCH", f"/api/queues/{VHOST}/x"),
                                         ("POST", "/api/overview"),
                                         ("DELETE", "/api/overview"),
                                         ("PUT", "/api/queues"),
                                         ("GET", f"/api/exchanges/{VHOST}/amq.direct/publish")])
def test_wrong_method_is_405(api, method, path):
    assert_error(api.request(method, path), 405)


def test_every_read_endpoint_answers_json(broker, api):
    conn = broker.connect(client_properties={"connection_name": uname("sweep")})
    ch = conn.channel()
    queue = uname("sweep")
    ch.queue_declare(queue=queue)
    ch.basic_consume(queue=queue, on_message_callback=lambda *a: None)
    lists = ["/api/queues", f"/api/queues/{VHOST}", "/api/exchanges", f"/api/exchanges/{VHOST}",
             "/api/bindings", f"/api/bindings/{VHOST}", "/api/connections", "/api/channels",
             "/api/consumers", f"/api/consumers/{VHOST}", "/api/vhosts", "/api/models",
             f"/api/queues/{VHOST}/{queue}/bindings",
             f"/api/exchanges/{VHOST}/amq.direct/bindings/source",
             f"/api/exchanges/{VHOST}/amq.direct/bindings/destination",
             f"/api/bindings/{VHOST}/e/amq.direct/q/{queue}"]
    for path in lists:
        assert isinstance(api.json(path), list), path
    for path in ("/api/overview", "/api/whoami", f"/api/queues/{VHOST}/{queue}",
                 f"/api/exchanges/{VHOST}/amq.direct"):
        assert isinstance(api.json(path), dict), path
    # No model configured.
    assert api.json("/api/models") == []


# --------------------------------------------------------------------------
# metrics


def test_metrics(broker, api):
    conn = broker.connect()
    ch = confirmed_channel(conn)
    queue = uname("metrics")
    ch.queue_declare(queue=queue)
    publish(ch, queue, ["1", "2", "3"])

    def queue_metrics(**expected):
        def check():
            samples = metrics(api)
            got = {name: sample(samples, f"warren_queue_{name}", vhost="/", queue=queue)
                   for name in expected}
            assert got == expected, got
            return samples
        return eventually(check, f"/metrics to show {expected} for {queue}")

    samples = queue_metrics(messages_ready=3.0, messages_unacked=0.0, consumers=0.0,
                            messages_published_total=3.0, messages_delivered_total=0.0,
                            messages_acked_total=0.0)
    for name in ("warren_connections", "warren_channels", "warren_queues"):
        assert (sample(samples, name) or 0) >= 1, (name, sample(samples, name))
    for name in ("warren_process_resident_memory_bytes", "warren_disk_free_bytes"):
        assert (sample(samples, name) or 0) > 0, name
    assert sample(samples, "warren_store_bytes") is not None
    assert sample(samples, "warren_fsync_seconds_count") is not None
    types = metric_families(api)
    assert types.get("warren_fsync_seconds") == "histogram", types
    assert types.get("warren_queue_messages_ready") == "gauge", types
    # prometheus-client names a counter's family without `_total`.
    assert types.get("warren_queue_messages_published") == "counter", types

    # One delivered and held unacked, then acked.
    consumer = conn.channel()
    consumer.basic_qos(prefetch_count=1)
    held = []
    consumer.basic_consume(queue=queue, auto_ack=False, consumer_tag="metrics-consumer",
                           on_message_callback=lambda c, m, p, b: held.append(m))
    deadline = time.monotonic() + TIMEOUT
    while not held:
        assert time.monotonic() < deadline, "no delivery"
        conn.process_data_events(time_limit=0.05)
    consumer.basic_cancel("metrics-consumer")
    queue_metrics(messages_ready=2.0, messages_unacked=1.0, consumers=0.0,
                  messages_delivered_total=1.0, messages_acked_total=0.0)
    consumer.basic_ack(held[0].delivery_tag)
    queue_metrics(messages_ready=2.0, messages_unacked=0.0, messages_delivered_total=1.0,
                  messages_acked_total=1.0)

    # The connection count follows connections.
    open_now = sample(metrics(api), "warren_connections")
    assert open_now is not None and open_now >= 1, open_now
    conn.close()
    eventually(lambda: sample(metrics(api), "warren_connections") == open_now - 1,
               "warren_connections to drop by one after the connection closed")
