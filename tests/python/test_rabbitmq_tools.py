"""RabbitMQ's operator tools against Warren: Debian's `rabbitmqadmin` (from
the `rabbitmq-server` package, which scripts/test.sh installs) run command
by command against the broker's HTTP port, and the endpoints Kubernetes
probes, load balancers and KEDA's RabbitMQ scaler call: health checks,
`/api/nodes`, and paginated listings (docs/http-api.md).

The expected answers are RabbitMQ 3.10's, as its management plugin gives
them: pagination's keys and error names, the health checks' bodies and
status codes, and rabbitmqadmin's habit of sending booleans and numbers as
text.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any, List

import pika
import pytest

from test_http_api import Api, assert_error, describe, eventually, http_url_of, uname

pytestmark = pytest.mark.warren_only("drives Warren's HTTP port with RabbitMQ's tools")

RABBITMQADMIN = pathlib.Path("/usr/bin/rabbitmqadmin")
COMMAND_TIMEOUT = 30.0


@pytest.fixture
def api(broker):
    client = Api(http_url_of(broker))
    yield client
    client.close()
    # A failing health check is a 503 by design; any other 5xx is a bug.
    unexpected = [error for error in client.server_errors
                  if not ("/api/health/checks/" in error and "-> 503 " in error)]
    assert not unexpected, unexpected


@pytest.fixture
def admin(broker):
    """Runs rabbitmqadmin against the broker; returns its standard output,
    failing the test on a non-zero exit."""
    if not RABBITMQADMIN.exists():
        pytest.fail(f"{RABBITMQADMIN} is missing: install Debian's rabbitmq-server "
                    "(scripts/test.sh does)", pytrace=False)
    host, port = http_url_of(broker).removeprefix("http://").rsplit(":", 1)

    def run(*args: str) -> str:
        command = ["python3", str(RABBITMQADMIN), "--host", host, "--port", port, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    return run


def raw(admin, *args: str) -> Any:
    return json.loads(admin(*args, "-f", "raw_json"))


def names(items: List[dict]) -> List[str]:
    return [item["name"] for item in items]


def test_rabbitmqadmin_declares_routes_gets_and_deletes(broker, admin, api):
    queue, exchange = uname("adm-q"), uname("adm-e")
    assert "queue declared" in admin("declare", "queue", f"name={queue}", "durable=true",
                                     'arguments={"x-max-length": 10}')
    assert "exchange declared" in admin("declare", "exchange", f"name={exchange}",
                                        "type=topic", "durable=false")
    assert "binding declared" in admin("declare", "binding", f"source={exchange}",
                                       f"destination={queue}", "routing_key=orders.#")

    listed = {item["name"]: item for item in raw(admin, "list", "queues")}
    assert listed[queue]["durable"] is True, listed[queue]
    assert listed[queue]["arguments"] == {"x-max-length": 10}, listed[queue]
    exchanges = {item["name"]: item for item in raw(admin, "list", "exchanges")}
    assert (exchanges[exchange]["type"], exchanges[exchange]["durable"]) == ("topic", False)
    bindings = [b for b in raw(admin, "list", "bindings") if b["source"] == exchange]
    assert [(b["destination"], b["routing_key"]) for b in bindings] == [(queue, "orders.#")]

    assert "Message published" in admin("publish", f"exchange={exchange}",
                                        "routing_key=orders.eu", "payload=first")
    admin("publish", f"exchange={exchange}", "routing_key=orders.us", "payload=second")
    got = raw(admin, "get", f"queue={queue}", "count=1", "ackmode=ack_requeue_true")
    assert [(m["payload"], m["routing_key"]) for m in got] == [("first", "orders.eu")], got
    assert api.queue(queue)["messages"] == 2
    got = raw(admin, "get", f"queue={queue}", "count=2", "ackmode=ack_requeue_false")
    assert [m["payload"] for m in got] == ["first", "second"], got
    assert api.queue(queue)["messages"] == 0

    admin("publish", "routing_key=" + queue, "payload=to purge")
    assert api.queue(queue)["messages"] == 1
    assert "queue purged" in admin("purge", "queue", f"name={queue}")
    assert api.queue(queue)["messages"] == 0

    # `orders.#` is `orders.%23` as a properties key: rabbitmqadmin
    # percent-encodes it once more in the path.
    key = bindings[0]["properties_key"]
    assert key == "orders.%23", bindings
    assert "binding deleted" in admin("delete", "binding", f"source={exchange}",
                                      f"destination={queue}", "destination_type=queue",
                                      f"properties_key={key}")
    assert not [b for b in raw(admin, "list", "bindings") if b["source"] == exchange]

    assert "exchange deleted" in admin("delete", "exchange", f"name={exchange}")
    assert "queue deleted" in admin("delete", "queue", f"name={queue}")
    assert queue not in names(raw(admin, "list", "queues"))


def test_rabbitmqadmin_manages_vhosts_users_and_permissions(broker, admin, api):
    vhost, user = uname("adm-vhost"), uname("adm-user")
    assert "vhost declared" in admin("declare", "vhost", f"name={vhost}")
    assert "user declared" in admin("declare", "user", f"name={user}", "password=s3cret",
                                    "tags=management")
    assert "permission declared" in admin("declare", "permission", f"vhost={vhost}",
                                          f"user={user}", "configure=^amq", "write=.*",
                                          "read=.*")
    assert vhost in names(raw(admin, "list", "vhosts"))
    users = {item["name"]: item for item in raw(admin, "list", "users")}
    assert users[user]["tags"] in (["management"], "management"), users[user]
    permissions = [p for p in raw(admin, "list", "permissions") if p["user"] == user]
    assert [(p["vhost"], p["configure"], p["write"], p["read"]) for p in permissions] == \
        [(vhost, "^amq", ".*", ".*")], permissions

    # The new user can log in to the HTTP API with the password given.
    as_user = api.with_auth((user, "s3cret"))
    assert as_user.get("/api/whoami").json()["name"] == user

    assert "permission deleted" in admin("delete", "permission", f"vhost={vhost}",
                                         f"user={user}")
    assert "user deleted" in admin("delete", "user", f"name={user}")
    assert "vhost deleted" in admin("delete", "vhost", f"name={vhost}")
    assert user not in names(raw(admin, "list", "users"))
    assert vhost not in names(raw(admin, "list", "vhosts"))


def test_rabbitmqadmin_manages_policies_and_moves_definitions(broker, admin, api, tmp_path):
    queue, policy, operator = uname("adm-pq"), uname("adm-policy"), uname("adm-op")
    admin("declare", "queue", f"name={queue}", "durable=true")
    assert "policy declared" in admin("declare", "policy", f"name={policy}",
                                      f"pattern=^{queue}$", "apply-to=queues", "priority=2",
                                      'definition={"max-length": 4}')
    assert "operator_policy declared" in admin("declare", "operator_policy",
                                               f"name={operator}", f"pattern=^{queue}$",
                                               'definition={"max-length": 2}')
    listed = {item["name"]: item for item in raw(admin, "list", "policies")}
    assert listed[policy]["definition"] == {"max-length": 4}, listed
    assert listed[policy]["apply-to"] == "queues" and listed[policy]["priority"] == 2
    assert operator in names(raw(admin, "list", "operator_policies"))
    info = api.json(f"/api/queues/%2F/{queue}")
    assert (info["policy"], info["operator_policy"]) == (policy, operator), info
    assert info["effective_policy_definition"] == {"max-length": 2}, info

    # export writes the definitions to a file; import reads them back.
    exported = tmp_path / "definitions.json"
    assert "Exported definitions" in admin("export", str(exported))
    definitions = json.loads(exported.read_text())
    assert policy in names(definitions["policies"]), definitions["policies"]
    assert queue in names(definitions["queues"]), definitions["queues"]
    assert "operator_policy deleted" in admin("delete", "operator_policy", f"name={operator}")
    assert "policy deleted" in admin("delete", "policy", f"name={policy}")
    assert policy not in names(raw(admin, "list", "policies"))
    assert "Uploaded definitions" in admin("import", str(exported))
    assert policy in names(raw(admin, "list", "policies")), "the import brought it back"
    assert operator in names(raw(admin, "list", "operator_policies"))
    assert "policy deleted" in admin("delete", "policy", f"name={policy}")
    assert "operator_policy deleted" in admin("delete", "operator_policy", f"name={operator}")


def test_rabbitmqadmin_sets_vhost_limits_and_the_broker_enforces_them(broker, admin, api):
    vhost = uname("adm-limited")
    admin("declare", "vhost", f"name={vhost}")
    admin("declare", "permission", f"vhost={vhost}", "user=guest", "configure=.*",
          "write=.*", "read=.*")
    assert "vhost_limit declared" in admin("declare", "vhost_limit", f"vhost={vhost}",
                                           "name=max-queues", "value=1")
    assert "vhost_limit declared" in admin("declare", "vhost_limit", f"vhost={vhost}",
                                           "name=max-connections", "value=1")
    limits = [item for item in raw(admin, "list", "vhost_limits") if item["vhost"] == vhost]
    assert limits == [{"vhost": vhost, "value": {"max-connections": 1, "max-queues": 1}}], limits
    parameters = [item for item in raw(admin, "list", "parameters") if item["vhost"] == vhost]
    assert parameters == [{"vhost": vhost, "component": "vhost-limits", "name": "limits",
                           "value": {"max-connections": 1, "max-queues": 1}}], parameters

    # One queue, then RabbitMQ's refusal; one connection, then the next
    # is refused with 530.
    conn = broker.connect(vhost=vhost)
    ch = conn.channel()
    ch.queue_declare("first")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        ch.queue_declare("second")
    assert refused.value.reply_code == 406, refused.value
    assert "queue limit in virtual host" in refused.value.reply_text, refused.value
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused_connection:
        broker.connect(vhost=vhost)
    assert "connection limit (1) is reached" in repr(refused_connection.value), \
        refused_connection.value

    # Lifted, both are allowed again.
    assert "vhost_limit deleted" in admin("delete", "vhost_limit", f"vhost={vhost}",
                                          "name=max-queues")
    conn.channel().queue_declare("second")
    admin("delete", "vhost_limit", f"vhost={vhost}", "name=max-connections")
    broker.connect(vhost=vhost).close()
    conn.close()
    assert [item for item in raw(admin, "list", "vhost_limits") if item["vhost"] == vhost] == []

    # RabbitMQ's refusals: an unknown limit; a parameter of a plugin it
    # does not have (RabbitMQ without the federation plugin answers alike).
    resp = api.put(f"/api/vhost-limits/{vhost}/max-foo", json={"value": 1})
    assert_error(resp, 400, "Unrecognised terms")
    resp = api.put(f"/api/parameters/federation-upstream/{vhost}/up",
                   json={"value": {"uri": "amqp://localhost"}})
    assert_error(resp, 400, "component federation-upstream not found")
    admin("delete", "vhost", f"name={vhost}")


def test_rabbitmqadmin_lists_nodes_and_closes_a_connection(broker, admin, api):
    (node,) = raw(admin, "list", "nodes")
    for field in ("name", "type", "running", "mem_used", "mem_limit", "mem_alarm",
                  "disk_free", "disk_free_limit", "disk_free_alarm", "fd_used", "fd_total",
                  "uptime", "processors"):
        assert field in node, (field, node)
    assert node["running"] is True and node["mem_used"] > 0 and node["fd_used"] > 0, node
    overview = raw(admin, "show", "overview")
    assert overview[0]["node"] == node["name"], overview

    conn = broker.connect()
    try:
        listed = raw(admin, "list", "connections")
        assert len(listed) == 1, listed
        assert "connection closed" in admin("close", "connection", f"name={listed[0]['name']}")
        # pika raises once the broker's connection.close arrives.
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
            conn.process_data_events(time_limit=COMMAND_TIMEOUT)
    finally:
        if conn.is_open:
            conn.close()


def test_listings_page_sort_and_pick_columns_as_rabbitmq_does(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    prefix = uname("page")
    created = [f"{prefix}-{index:02d}" for index in range(7)]
    for index, name in enumerate(created):
        ch.queue_declare(queue=name)
        for _ in range(index):
            ch.basic_publish(exchange="", routing_key=name, body=b"x")
    api.queue_matches(created[-1], messages=6)

    page = api.json(f"/api/queues/%2F?page=2&page_size=3&name={prefix}&use_regex=false"
                    "&sort=name")
    assert set(page) == {"filtered_count", "item_count", "items", "page", "page_count",
                         "page_size", "total_count"}, page
    assert (page["page"], page["page_size"], page["page_count"], page["filtered_count"],
            page["item_count"]) == (2, 3, 3, 7, 3), page
    assert page["total_count"] >= 7
    assert names(page["items"]) == created[3:6]

    # KEDA's scaler: a regular expression, then `items`.
    keda = api.json(f"/api/queues/%2F?page=1&page_size=100&name=^{prefix.upper()}-0[56]$"
                    "&use_regex=true")
    assert sorted(names(keda["items"])) == created[5:7], keda

    ordered = api.json("/api/queues?sort=messages&sort_reverse=true&columns=name,messages")
    mine = [item for item in ordered if item["name"].startswith(prefix)]
    assert mine == [{"name": name, "messages": count}
                    for count, name in reversed(list(enumerate(created)))], mine

    # Collections RabbitMQ does not page stay lists.
    assert isinstance(api.json("/api/users?page=1"), list)
    assert isinstance(api.json("/api/bindings?page=1"), list)

    for query, error in [("page=0", "invalid_pagination_parameters"),
                         ("page=1&page_size=501", "invalid_pagination_parameters"),
                         ("page=99&page_size=2", "page_out_of_range"),
                         ("page=abc", "bad_request"),
                         ("page=1&name=(&use_regex=true", "bad_request")]:
        resp = api.get(f"/api/queues?{query}")
        body = assert_error(resp, 400)
        assert body["error"] == error, (query, body)
    empty = api.json("/api/queues?page=1&name=no-such-queue-anywhere")
    assert (empty["page_count"], empty["items"]) == (0, []), empty
    conn.close()


def test_health_checks_answer_as_rabbitmq_does(broker, api):
    resp = api.get("/api/health/checks/alarms")
    assert (resp.status_code, resp.json()) == (200, {"status": "ok"}), describe(resp)
    assert api.json("/api/health/checks/local-alarms") == {"status": "ok"}
    assert api.json("/api/health/checks/virtual-hosts") == {"status": "ok"}
    assert api.json("/api/health/checks/node-is-quorum-critical") == \
        {"status": "ok", "reason": "single node cluster"}

    amqp_port = broker.port
    assert api.json(f"/api/health/checks/port-listener/{amqp_port}") == \
        {"status": "ok", "port": amqp_port}
    resp = api.get("/api/health/checks/port-listener/1")
    assert resp.status_code == 503, describe(resp)
    body = resp.json()
    assert (body["status"], body["reason"], body["missing"]) == \
        ("failed", "No active listener", 1), body
    assert amqp_port in body["ports"], body
    assert_error(api.get("/api/health/checks/port-listener/abc"), 400)

    assert api.json("/api/health/checks/protocol-listener/amqp091") == \
        {"status": "ok", "protocol": "amqp"}
    resp = api.get("/api/health/checks/protocol-listener/mqtt")
    assert resp.status_code == 503 and resp.json()["missing"] == "mqtt", describe(resp)

    # Without TLS listeners no certificate can expire (test_tls.py checks
    # one that does).
    for unit in ("days", "weeks", "months", "years"):
        assert api.json(f"/api/health/checks/certificate-expiration/1/{unit}") == \
            {"status": "ok"}
    assert_error(api.get("/api/health/checks/certificate-expiration/1/fortnights"), 400,
                 "Time unit not recognised")

    assert api.json("/api/aliveness-test/%2F") == {"status": "ok"}
    assert api.queue("aliveness-test")["durable"] is False
    assert_error(api.get("/api/aliveness-test/no-such-vhost"), 404)


def test_alarms_fail_the_health_check_while_raised(broker, api):
    # A watermark of one byte raises the memory alarm at once.
    assert api.put("/api/vm-memory-high-watermark", json={"absolute": 1}).status_code == 204

    def alarmed():
        resp = api.get("/api/health/checks/alarms")
        return resp if resp.status_code == 503 else None
    resp = eventually(alarmed, "the memory alarm in the health check")
    body = resp.json()
    assert (body["status"], body["reason"]) == \
        ("failed", "There are alarms in effect in the cluster"), body
    assert [alarm["resource"] for alarm in body["alarms"]] == ["memory"], body
    local = api.get("/api/health/checks/local-alarms")
    assert (local.status_code, local.json()["reason"]) == \
        (503, "There are alarms in effect on the node"), describe(local)

    assert api.put("/api/vm-memory-high-watermark",
                   json={"relative": 0.9}).status_code == 204
    eventually(lambda: api.get("/api/health/checks/alarms").status_code == 200,
               "the alarm cleared")


def test_nodes_extensions_and_cluster_name(broker, api, tmp_path):
    (node,) = api.json("/api/nodes")
    assert api.json(f"/api/nodes/{node['name']}")["name"] == node["name"]
    assert_error(api.get("/api/nodes/rabbit@elsewhere"), 404)
    assert node["disk_free"] > 0 and node["disk_free_limit"] > 0, node
    assert node["fd_total"] >= node["fd_used"] > 0, node
    assert api.json("/api/extensions") == []

    assert api.json("/api/cluster-name") == {"name": node["name"]}
    assert api.put("/api/cluster-name", json={"name": "inference-east"}).status_code == 204
    assert api.json("/api/cluster-name") == {"name": "inference-east"}
    assert api.json("/api/overview")["cluster_name"] == "inference-east"
    assert_error(api.put("/api/cluster-name", json={"name": ""}), 400)


# The metric names RabbitMQ's Grafana dashboard "RabbitMQ-Overview" queries
# (rabbitmq/rabbitmq-server, deps/rabbitmq_prometheus/docker/grafana/
# dashboards/RabbitMQ-Overview.json at 5b09e556da53, every panel's `expr`),
# histogram series under their family's name.
OVERVIEW_DASHBOARD_METRICS = [
    "rabbitmq_build_info", "rabbitmq_channels", "rabbitmq_channels_closed_total",
    "rabbitmq_channels_opened_total", "rabbitmq_connections",
    "rabbitmq_connections_closed_total", "rabbitmq_connections_opened_total",
    "rabbitmq_disk_space_available_bytes", "rabbitmq_disk_space_available_limit_bytes",
    "rabbitmq_erlang_uptime_seconds", "rabbitmq_global_consumers",
    "rabbitmq_global_messages_acknowledged_total", "rabbitmq_global_messages_confirmed_total",
    "rabbitmq_global_messages_delivered_consume_auto_ack_total",
    "rabbitmq_global_messages_delivered_consume_manual_ack_total",
    "rabbitmq_global_messages_delivered_get_auto_ack_total",
    "rabbitmq_global_messages_delivered_get_manual_ack_total",
    "rabbitmq_global_messages_delivered_total", "rabbitmq_global_messages_get_empty_total",
    "rabbitmq_global_messages_received_confirm_total",
    "rabbitmq_global_messages_received_total", "rabbitmq_global_messages_redelivered_total",
    "rabbitmq_global_messages_routed_total",
    "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_unroutable_returned_total", "rabbitmq_global_publishers",
    "rabbitmq_identity_info", "rabbitmq_message_size_bytes", "rabbitmq_process_max_fds",
    "rabbitmq_process_open_fds", "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked", "rabbitmq_queues",
    "rabbitmq_queues_created_total", "rabbitmq_queues_declared_total",
    "rabbitmq_queues_deleted_total", "rabbitmq_resident_memory_limit_bytes",
]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def scrape(api: Api, path: str) -> dict:
    """Sample name -> [(labels, value)] of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    resp = api.session.get(api.base + path, timeout=COMMAND_TIMEOUT)
    assert resp.status_code == 200, describe(resp)
    samples: dict = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_the_overview_dashboards_metrics_are_served_under_rabbitmqs_names(broker, api):
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    queue = uname("metrics-q")
    ch.queue_declare(queue=queue)
    for _ in range(3):
        ch.basic_publish(exchange="", routing_key=queue, body=b"m")
    method, _props, _body = ch.basic_get(queue=queue, auto_ack=False)
    ch.basic_ack(method.delivery_tag)
    api.queue_matches(queue, messages=2)

    # An empty get, a no-ack get, a mandatory message returned and one
    # dropped, a no-ack consumer, a channel closed.
    empty = uname("metrics-empty")
    ch.queue_declare(queue=empty)
    assert ch.basic_get(queue=empty, auto_ack=True) == (None, None, None)
    ch.basic_publish(exchange="", routing_key=queue, body=b"m")
    method, _props, _body = ch.basic_get(queue=queue, auto_ack=True)
    assert method is not None
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(exchange="amq.direct", routing_key="nowhere", body=b"r",
                         mandatory=True)
    ch.basic_publish(exchange="amq.direct", routing_key="nowhere", body=b"d")
    other = conn.channel()
    other.close()
    api.queue_matches(queue, messages=2)

    served = scrape(api, "/metrics")
    missing = [name for name in OVERVIEW_DASHBOARD_METRICS
               if name not in served and f"{name}_bucket" not in served]
    assert not missing, missing
    (identity,) = served["rabbitmq_identity_info"]
    assert identity[0]["rabbitmq_node"] == api.json("/api/overview")["node"], identity
    assert identity[1] == 1
    # Aggregated: one sample without labels; the figures follow the broker.
    assert served["rabbitmq_queue_messages_ready"] == [({}, 2.0)]
    assert served["rabbitmq_queue_messages_unacked"] == [({}, 0.0)]
    assert served["rabbitmq_connections"][0][1] >= 1
    def value(name: str) -> float:
        ((_labels, number),) = served[name]
        return number
    # Published on the confirm channel: 3 + 1 to the queue, 2 unroutable.
    assert value("rabbitmq_global_messages_received_total") == 6
    assert value("rabbitmq_global_messages_received_confirm_total") == 6
    assert value("rabbitmq_global_messages_confirmed_total") == 6
    assert value("rabbitmq_global_messages_routed_total") == 4
    assert value("rabbitmq_global_messages_unroutable_returned_total") == 1
    assert value("rabbitmq_global_messages_unroutable_dropped_total") == 1
    assert value("rabbitmq_global_messages_acknowledged_total") == 1
    assert value("rabbitmq_global_messages_delivered_get_manual_ack_total") == 1
    assert value("rabbitmq_global_messages_delivered_get_auto_ack_total") == 1
    assert value("rabbitmq_global_messages_get_empty_total") == 1
    assert value("rabbitmq_global_messages_delivered_total") == 2
    assert value("rabbitmq_queues_created_total") == 2
    assert value("rabbitmq_queues_declared_total") == 2
    assert value("rabbitmq_channels_opened_total") - value("rabbitmq_channels_closed_total") \
        == value("rabbitmq_channels")
    assert value("rabbitmq_channels_closed_total") >= 1
    assert value("rabbitmq_connections_opened_total") >= 1
    assert served["rabbitmq_process_open_fds"][0][1] > 0
    # One channel published (the one closed never did); six 1-byte bodies.
    assert served["rabbitmq_global_publishers"] == [({"protocol": "amqp091"}, 1.0)]
    assert served["rabbitmq_message_size_bytes_count"] == [({"protocol": "amqp091"}, 6.0)]
    assert served["rabbitmq_message_size_bytes_sum"] == [({"protocol": "amqp091"}, 6.0)]
    buckets = {labels["le"]: number for labels, number in
               served["rabbitmq_message_size_bytes_bucket"]}
    assert float(buckets["100.0"]) == 6 and buckets["+Inf"] == 6, buckets
    assert len(buckets) == 9, "RabbitMQ's eight bounds and +Inf"
    # Warren's own families stay beside them.
    assert "warren_queue_messages_ready" in served

    per_object = scrape(api, "/metrics/per-object")
    assert ({"vhost": "/", "queue": queue}, 2.0) in per_object["rabbitmq_queue_messages_ready"]
    assert "warren_queue_messages_ready" not in per_object

    # /metrics/detailed: only the families and vhosts asked for.
    other_vhost = uname("metrics-vhost")
    assert api.put(f"/api/vhosts/{other_vhost}").status_code == 201
    assert api.put(f"/api/permissions/{other_vhost}/guest",
                   json={"configure": ".*", "write": ".*", "read": ".*"}).status_code in (201, 204)
    assert api.put(f"/api/queues/{other_vhost}/elsewhere", json={}).status_code == 201
    detailed = scrape(api, "/metrics/detailed?family=queue_coarse_metrics&vhost=%2F")
    assert ({"vhost": "/", "queue": queue}, 2.0) in \
        detailed["rabbitmq_detailed_queue_messages_ready"]
    assert {labels["vhost"] for labels, _ in detailed["rabbitmq_detailed_queue_messages"]} \
        == {"/"}, detailed["rabbitmq_detailed_queue_messages"]
    assert "rabbitmq_detailed_queue_consumers" not in detailed
    assert "rabbitmq_queue_messages_ready" not in detailed
    assert "rabbitmq_identity_info" in detailed
    both = scrape(api, f"/metrics/detailed?family=queue_consumer_count&vhost=%2F"
                       f"&vhost={other_vhost}")
    assert {labels["vhost"] for labels, _ in both["rabbitmq_detailed_queue_consumers"]} == \
        {"/", other_vhost}
    assert set(scrape(api, "/metrics/detailed")) == \
        {"rabbitmq_identity_info", "rabbitmq_build_info"}
    conn.close()
    # Closed, the channel is no publisher any more.
    eventually(lambda: scrape(api, "/metrics")["rabbitmq_global_publishers"][0][1] == 0,
               "the publisher gauge to drop")


def test_promtool_accepts_every_metrics_endpoint(broker, api):
    """Prometheus's own checker (Debian's prometheus package, which
    scripts/test.sh installs) on each exposition: it fails on a malformed
    one and reports naming problems."""
    if not pathlib.Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: install Debian's prometheus package "
                    "(scripts/test.sh does)", pytrace=False)
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue=uname("promtool-q"))
    ch.basic_publish(exchange="", routing_key="x", body=b"m")
    for path in ("/metrics", "/metrics/per-object",
                 "/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count"):
        resp = api.session.get(api.base + path, timeout=COMMAND_TIMEOUT)
        assert resp.status_code == 200, describe(resp)
        checked = subprocess.run([PROMTOOL, "check", "metrics"], input=resp.text,
                                 capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        # promtool exits 1 for a malformed exposition and 3 for lint
        # findings only; both are reported.
        assert checked.returncode == 0, (path, checked.returncode, checked.stdout,
                                         checked.stderr)
    conn.close()
