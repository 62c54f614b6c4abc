"""Definitions (`GET`/`POST /api/definitions`) between Warren and a real
RabbitMQ node with its management plugin (scripts/rabbitmq.sh; Debian's
rabbitmq-server package, which scripts/test.sh installs):

* objects made in RabbitMQ (a vhost with a limit, a user with a password,
  permissions, a policy, an operator policy, classic and quorum queues with arguments,
  exchanges with an alternate exchange, queue and exchange bindings) are
  exported by RabbitMQ, imported into Warren, and appear there with the
  same properties; the user logs in to Warren with the same password
  (RabbitMQ's salted SHA-256 hash is accepted), and the policies apply;
* objects made in Warren are exported by Warren and imported into
  RabbitMQ, where they appear with the same properties;
* an import leaves existing queues and exchanges as they are and replaces
  policies, as RabbitMQ's does, and a second import of the same file
  changes nothing;
* `load_definitions` in the configuration applies a file at start.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from typing import Any, Dict, List
from urllib.parse import quote

import pika
import pytest
import requests

from conftest import REPO_ROOT, start_broker
from test_http_api import Api, describe, eventually

pytestmark = [
    pytest.mark.warren_only("starts Warren and a RabbitMQ node of its own"),
    pytest.mark.timeout(300),
]

# RabbitMQ refreshes queue views every 5 s.
VIEW_TIMEOUT_S = 20.0

VHOST = "defs-rabbit"
USER, PASSWORD = "defs-user", "defs-secret"


def q(name: str) -> str:
    return quote(name, safe="")


@pytest.fixture(scope="module")
def rabbitmq(rabbitmq_node):
    """The session's RabbitMQ node: its AMQP address and an Api on its
    management port."""
    api = Api(rabbitmq_node.http_url)
    yield f"{rabbitmq_node.host}:{rabbitmq_node.port}", api
    api.close()


@pytest.fixture
def warren(tmp_path):
    broker = start_broker(tmp_path / "warren")
    api = Api(broker.http_url)
    yield broker, api
    api.close()
    broker.close_connections()
    assert broker.stop() == 0
    broker.finish()


def ok(resp: requests.Response, *statuses: int) -> requests.Response:
    assert resp.status_code in (statuses or (200, 201, 204)), describe(resp)
    return resp


def make_objects(api: Api, vhost: str, user: str, password: str) -> None:
    """The same objects, through the management API both brokers share."""
    v = q(vhost)
    ok(api.put(f"/api/vhosts/{v}"))
    ok(api.put(f"/api/users/{q(user)}", json={"password": password, "tags": "monitoring"}))
    ok(api.put(f"/api/permissions/{v}/{q(user)}",
               json={"configure": "^defs-", "write": ".*", "read": ".*"}))
    ok(api.put(f"/api/permissions/{v}/guest",
               json={"configure": ".*", "write": ".*", "read": ".*"}))
    ok(api.put(f"/api/vhost-limits/{v}/max-queues", json={"value": 50}))
    ok(api.put(f"/api/policies/{v}/defs-cap",
               json={"pattern": "^defs-capped", "apply-to": "queues", "priority": 3,
                     "definition": {"max-length": 5, "dead-letter-exchange": "defs-dlx"}}))
    ok(api.put(f"/api/operator-policies/{v}/defs-op",
               json={"pattern": ".*", "apply-to": "queues", "priority": 0,
                     "definition": {"message-ttl": 600000}}))
    for name, body in {
        "defs-topic": {"type": "topic", "durable": True},
        "defs-dlx": {"type": "fanout", "durable": True},
        "defs-with-ae": {"type": "direct", "durable": True,
                         "arguments": {"alternate-exchange": "defs-dlx"}},
    }.items():
        ok(api.put(f"/api/exchanges/{v}/{name}", json=body))
    for name, body in {
        "defs-capped-orders": {"durable": True, "arguments": {"x-message-ttl": 120000}},
        "defs-quorum": {"durable": True,
                        "arguments": {"x-queue-type": "quorum", "x-delivery-limit": 4}},
        "defs-transient": {"durable": False, "auto_delete": False},
    }.items():
        ok(api.put(f"/api/queues/{v}/{name}", json=body))
    ok(api.post(f"/api/bindings/{v}/e/defs-topic/q/defs-capped-orders",
                json={"routing_key": "orders.#"}))
    ok(api.post(f"/api/bindings/{v}/e/defs-topic/e/defs-dlx",
                json={"routing_key": "dead.*", "arguments": {"x-tag": "kept"}}))


def objects(api: Api, vhost: str) -> Dict[str, Any]:
    """What both brokers should agree on, read through the API."""
    v = q(vhost)
    queues = {item["name"]: {key: item[key] for key in ("durable", "auto_delete", "arguments")}
              for item in api.json(f"/api/queues/{v}")}
    exchanges = {item["name"]: {key: item[key] for key in
                                ("type", "durable", "auto_delete", "internal", "arguments")}
                 for item in api.json(f"/api/exchanges/{v}")
                 if item["name"] and not item["name"].startswith("amq.")}
    bindings = sorted(
        (item["source"], item["destination"], item["destination_type"], item["routing_key"],
         json.dumps(item["arguments"], sort_keys=True))
        for item in api.json(f"/api/bindings/{v}") if item["source"])
    policies = {item["name"]: item for item in api.json(f"/api/policies/{v}")}
    operator = {item["name"]: item for item in api.json(f"/api/operator-policies/{v}")}
    permissions = sorted((item["user"], item["configure"], item["write"], item["read"])
                         for item in api.json(f"/api/vhosts/{v}/permissions"))
    limits = api.json(f"/api/vhost-limits/{v}")
    return {"queues": queues, "exchanges": exchanges, "bindings": bindings,
            "policies": policies, "operator_policies": operator, "permissions": permissions,
            "limits": limits}


def login(addr_host: str, addr_port: int, vhost: str, user: str, password: str) -> None:
    params = pika.ConnectionParameters(host=addr_host, port=addr_port, virtual_host=vhost,
                                       credentials=pika.PlainCredentials(user, password),
                                       connection_attempts=1, socket_timeout=10)
    conn = pika.BlockingConnection(params)
    conn.close()


def test_a_rabbitmq_export_imports_into_warren(rabbitmq, warren):
    rabbit_addr, rabbit = rabbitmq
    broker, api = warren
    make_objects(rabbit, VHOST, USER, PASSWORD)
    exported = rabbit.json("/api/definitions")
    assert any(user["name"] == USER and user["hashing_algorithm"] ==
               "rabbit_password_hashing_sha256" for user in exported["users"]), exported["users"]

    ok(api.post("/api/definitions", json=exported), 204)
    expected = objects(rabbit, VHOST)
    assert objects(api, VHOST) == expected
    assert set(expected["queues"]) == {"defs-capped-orders", "defs-quorum", "defs-transient"}

    # The policies apply in Warren as they do in RabbitMQ.
    info = api.queue("defs-capped-orders", vhost=q(VHOST))
    assert info["policy"] == "defs-cap" and info["operator_policy"] == "defs-op", info
    assert info["effective_policy_definition"] == {
        "max-length": 5, "dead-letter-exchange": "defs-dlx", "message-ttl": 600000}, info

    # The user logs in with the password RabbitMQ hashed.
    login(broker.host, broker.port, VHOST, USER, PASSWORD)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        login(broker.host, broker.port, VHOST, USER, "not-" + PASSWORD)

    # A second import changes nothing.
    ok(api.post("/api/definitions", json=exported), 204)
    assert objects(api, VHOST) == expected


def test_a_warren_export_imports_into_rabbitmq(rabbitmq, warren):
    rabbit_addr, rabbit = rabbitmq
    broker, api = warren
    vhost = "defs-warren"
    make_objects(api, vhost, "defs-warren-user", "warren-secret")
    made = objects(api, vhost)

    # One vhost's definitions, into RabbitMQ's vhost of that name.
    exported = api.json(f"/api/definitions/{q(vhost)}")
    assert "users" not in exported and all("vhost" not in item for item in exported["queues"])
    ok(rabbit.put(f"/api/vhosts/{q(vhost)}"))
    ok(rabbit.put(f"/api/users/defs-warren-user",
                  json={"password": "warren-secret", "tags": "monitoring"}))
    for user, configure in (("defs-warren-user", "^defs-"), ("guest", ".*")):
        ok(rabbit.put(f"/api/permissions/{q(vhost)}/{user}",
                      json={"configure": configure, "write": ".*", "read": ".*"}))
    ok(rabbit.post(f"/api/definitions/{q(vhost)}", json=exported), 204)

    def same():
        assert objects(rabbit, vhost) == made
        return True
    eventually(same, "RabbitMQ to hold what Warren exported", VIEW_TIMEOUT_S)

    # The whole export too: RabbitMQ takes every section (the users' Argon2id
    # hashes included, which only Warren can check: a user moving to RabbitMQ
    # is given a password there).
    whole = api.json("/api/definitions")
    assert {user["name"] for user in whole["users"]} >= {"guest", "defs-warren-user"}
    whole["users"] = [user for user in whole["users"] if user["name"] != "guest"]
    ok(rabbit.post("/api/definitions", json=whole), 204)
    eventually(same, "RabbitMQ to hold it still", VIEW_TIMEOUT_S)


def test_import_keeps_existing_queues_and_replaces_policies(warren):
    broker, api = warren
    ok(api.put("/api/queues/%2F/defs-existing", json={"durable": True, "arguments": {}}))
    ok(api.put("/api/policies/%2F/defs-replaced",
               json={"pattern": "^x$", "definition": {"max-length": 1}}))
    definitions = {
        "queues": [
            {"name": "defs-existing", "vhost": "/", "durable": False, "auto_delete": True,
             "arguments": {"x-max-length": 3}},
            {"name": "defs-new", "vhost": "/", "durable": True, "auto_delete": False,
             "arguments": {"x-max-length": 3}},
        ],
        "policies": [{"vhost": "/", "name": "defs-replaced", "pattern": "^defs-new$",
                      "apply-to": "queues", "definition": {"expires": 3600000},
                      "priority": 1}],
        "bindings": [{"source": "no-such-exchange", "vhost": "/", "destination": "defs-new",
                      "destination_type": "queue", "routing_key": "k", "arguments": {}}],
    }
    ok(api.post("/api/definitions", json=definitions), 204)
    existing = api.queue("defs-existing")
    assert existing["durable"] is True and existing["arguments"] == {}, existing
    created = api.queue("defs-new")
    assert created["arguments"] == {"x-max-length": 3} and created["policy"] == "defs-replaced"
    assert api.json("/api/policies/%2F/defs-replaced")["definition"] == {"expires": 3600000}

    # RabbitMQ's refusals.
    resp = api.post("/api/definitions", json=[])
    assert resp.status_code == 400 and "failed_to_parse_json" in resp.text, describe(resp)
    resp = api.post("/api/definitions", json={"users": [{"name": "no-tags", "password": "x"}]})
    assert resp.status_code == 400 and "tags_not_present" in resp.text, describe(resp)
    bad = {"queues": [{"name": "defs-bad", "vhost": "/", "durable": True,
                       "arguments": {"x-max-length": "ten"}}]}
    resp = api.post("/api/definitions", json=bad)
    assert resp.status_code == 400 and "x-max-length" in resp.text, describe(resp)
    assert api.post("/api/definitions/no-such-vhost", json={}).status_code == 404
    assert api.get("/api/definitions/no-such-vhost").status_code == 404


def test_load_definitions_applies_a_file_at_start(tmp_path):
    definitions = {
        "users": [{"name": "loaded", "password_hash": "", "tags": ["management"]}],
        "vhosts": [{"name": "loaded-vhost"}],
        "permissions": [{"user": "guest", "vhost": "loaded-vhost",
                         "configure": ".*", "write": ".*", "read": ".*"}],
        "policies": [{"vhost": "loaded-vhost", "name": "cap", "pattern": ".*",
                      "definition": {"max-length": 7}, "priority": 0, "apply-to": "queues"}],
        "queues": [{"name": "loaded-queue", "vhost": "loaded-vhost", "durable": True,
                    "auto_delete": False, "arguments": {}}],
    }
    path = tmp_path / "definitions.json"
    path.write_text(json.dumps(definitions))
    broker = start_broker(tmp_path / "node", f'load_definitions = "{path}"\n')
    try:
        api = Api(broker.http_url)
        info = api.queue("loaded-queue", vhost="loaded-vhost")
        assert info["policy"] == "cap" and info["durable"] is True, info
        assert api.json("/api/users/loaded")["tags"] == ["management"]
        api.close()
    finally:
        broker.close_connections()
        assert broker.stop() == 0
        broker.finish()
