"""Policies and operator policies, written from RabbitMQ's documentation
("Policies", "Operator Policies", "Queue Length Limit", "TTL", "Dead
Letter Exchanges", "Alternate Exchanges") and run against both brokers:
Warren, and a private RabbitMQ node with its management plugin (the
session's `rabbitmq_node`; with WARREN_TEST_EXTERNAL_AMQP and
WARREN_TEST_EXTERNAL_HTTP set, that broker instead of Warren):

* at most one policy applies to a queue or an exchange: the matching one
  with the highest priority, whose keys are not merged with a lower one's;
* an operator policy applies beside it, and for a limit both set the lower
  value wins;
* between a queue's own x-argument and a policy, the lower limit wins, and
  the queue's own dead-letter exchange wins;
* a policy applies at once to queues that already exist, and lifts what it
  set when cleared: a lowered max-length drops messages from the head.

RabbitMQ applies a policy to its queues asynchronously and refreshes its
queue views every few seconds, so every check polls until it holds.
"""

from __future__ import annotations

import subprocess
from typing import Any, Dict

import pika
import pytest

from conftest import external_addr, start_broker, warren_bin
from test_http_api import Api, assert_error, describe, eventually, http_url_of, q, uname

# RabbitMQ refreshes its queue views every 5 s; a policy's effect is
# polled for up to three times that.
POLICY_TIMEOUT = 15.0
VHOST = "%2F"


@pytest.fixture(params=["warren", "rabbitmq"])
def any_broker(request):
    """Each test runs on Warren and on RabbitMQ."""
    if request.param == "rabbitmq":
        if external_addr() is not None:
            pytest.skip("the tests already run against an external broker")
        return request.getfixturevalue("rabbitmq_node")
    return request.getfixturevalue("broker")


@pytest.fixture
def api(any_broker):
    client = Api(http_url_of(any_broker))
    created = []
    client.created_policies = created
    yield client
    for path in created:
        client.delete(path)
    client.close()
    assert not client.server_errors, client.server_errors


def set_policy(api: Api, name: str, pattern: str, definition: Dict[str, Any],
               priority: int = 0, apply_to: str = "queues",
               kind: str = "policies") -> None:
    path = f"/api/{kind}/{VHOST}/{q(name)}"
    resp = api.put(path, json={"pattern": pattern, "definition": definition,
                               "priority": priority, "apply-to": apply_to})
    assert resp.status_code in (201, 204), describe(resp)
    api.created_policies.append(path)


def clear_policy(api: Api, name: str, kind: str = "policies") -> None:
    path = f"/api/{kind}/{VHOST}/{q(name)}"
    resp = api.delete(path)
    assert resp.status_code == 204, describe(resp)
    api.created_policies.remove(path)


def ready(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def publish(channel, queue: str, bodies) -> None:
    for body in bodies:
        channel.basic_publish("", queue, body)


def drain(channel, queue: str):
    bodies = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def wait_applied(api: Api, queue: str, **expected) -> Dict[str, Any]:
    """Polls the queue's view until its policy fields are as expected."""
    def check():
        info = api.queue(queue)
        got = {key: info.get(key) for key in expected}
        assert got == expected, f"{queue}: {got} (expected {expected})"
        return info
    return eventually(check, f"{queue} to show {expected}", POLICY_TIMEOUT)


def test_a_policy_applies_to_existing_queues_and_the_lower_length_limit_wins(any_broker, api):
    queue = uname("pol-len")
    policy = uname("pol-len-p")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        channel.queue_declare(queue, arguments={"x-max-length": 3})
        publish(channel, queue, [b"m1", b"m2", b"m3", b"m4", b"m5"])
        eventually(lambda: ready(channel, queue) == 3, "the queue's own limit")

        # A lower limit from a policy drops the oldest messages at once.
        set_policy(api, policy, f"^{queue}$", {"max-length": 2})
        eventually(lambda: ready(channel, queue) == 2, "the policy's lower limit")
        info = wait_applied(api, queue, policy=policy)
        assert info["effective_policy_definition"] == {"max-length": 2}, info
        assert info["arguments"] == {"x-max-length": 3}, "arguments stay the client's"
        assert drain(channel, queue) == [b"m4", b"m5"], "drop-head keeps the newest"

        # A higher limit from a policy leaves the queue's own in force.
        set_policy(api, policy, f"^{queue}$", {"max-length": 10})
        wait_applied(api, queue, effective_policy_definition={"max-length": 10})
        publish(channel, queue, [b"n%d" % i for i in range(6)])
        eventually(lambda: ready(channel, queue) == 3, "the argument's lower limit")

        # Cleared: nothing of the policy is left.
        clear_policy(api, policy)
        wait_applied(api, queue, policy=None, effective_policy_definition={})
    finally:
        channel.queue_delete(queue)
        conn.close()


def test_only_the_highest_priority_policy_applies(any_broker, api):
    queue = uname("pol-prio")
    low, high = uname("pol-low"), uname("pol-high")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        channel.queue_declare(queue)
        set_policy(api, low, f"^{queue}", {"max-length": 1}, priority=1)
        set_policy(api, high, f"^{queue}$", {"max-length-bytes": 1_000_000}, priority=5)
        info = wait_applied(api, queue, policy=high)
        assert info["effective_policy_definition"] == {"max-length-bytes": 1_000_000}, \
            "the lower policy's keys are not merged in"
        publish(channel, queue, [b"a", b"b", b"c"])
        eventually(lambda: ready(channel, queue) == 3, "no max-length from the lower policy")

        # Raising the other policy's priority makes it the one.
        set_policy(api, low, f"^{queue}", {"max-length": 1}, priority=9)
        wait_applied(api, queue, policy=low)
        eventually(lambda: ready(channel, queue) == 1, "its limit, applied at once")
    finally:
        channel.queue_delete(queue)
        conn.close()


def test_an_operator_policy_lowers_what_the_policy_sets(any_broker, api):
    queue = uname("pol-op")
    policy, operator = uname("pol-user"), uname("pol-operator")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        channel.queue_declare(queue)
        set_policy(api, policy, f"^{queue}$",
                   {"max-length": 100, "message-ttl": 60_000}, priority=1)
        set_policy(api, operator, f"^{queue}$", {"max-length": 2, "message-ttl": 120_000},
                   priority=0, kind="operator-policies")
        info = wait_applied(api, queue, policy=policy, operator_policy=operator)
        assert info["effective_policy_definition"] == {"max-length": 2, "message-ttl": 60_000}, \
            "each limit both set takes the lower value"
        publish(channel, queue, [b"1", b"2", b"3", b"4"])
        eventually(lambda: ready(channel, queue) == 2, "the operator's lower max-length")

        # Operator policies take limits only.
        resp = api.put(f"/api/operator-policies/{VHOST}/{q(uname('pol-bad'))}",
                       json={"pattern": ".*", "definition": {"dead-letter-exchange": "x"}})
        assert_error(resp, 400, "not recognised policy settings")
    finally:
        channel.queue_delete(queue)
        conn.close()


def test_dead_lettering_from_a_policy_and_the_queue_argument_wins(any_broker, api):
    source, own = uname("pol-dl-src"), uname("pol-dl-own")
    policy_dlx, own_dlx = uname("pol-dlx"), uname("pol-own-dlx")
    policy_target, own_target = uname("pol-dl-policy-target"), uname("pol-dl-own-target")
    policy = uname("pol-dl")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        for exchange, target in ((policy_dlx, policy_target), (own_dlx, own_target)):
            channel.exchange_declare(exchange, "fanout", auto_delete=False)
            channel.queue_declare(target)
            channel.queue_bind(target, exchange)
        channel.queue_declare(source)
        channel.queue_declare(own, arguments={"x-dead-letter-exchange": own_dlx})
        set_policy(api, policy, f"^({source}|{own})$",
                   {"dead-letter-exchange": policy_dlx, "message-ttl": 50})
        wait_applied(api, source, policy=policy)
        wait_applied(api, own, policy=policy)
        publish(channel, source, [b"from-source"])
        publish(channel, own, [b"from-own"])
        assert eventually(lambda: drain(channel, policy_target) or None, "the policy's DLX") \
            == [b"from-source"]
        assert eventually(lambda: drain(channel, own_target) or None, "the queue's own DLX") \
            == [b"from-own"]
        assert drain(channel, policy_target) == [], "nothing else reached the policy's DLX"
    finally:
        for queue in (source, own, policy_target, own_target):
            channel.queue_delete(queue)
        for exchange in (policy_dlx, own_dlx):
            channel.exchange_delete(exchange)
        conn.close()


def test_an_exchange_policy_sets_an_alternate_exchange(any_broker, api):
    exchange, alternate, caught = uname("pol-ae-x"), uname("pol-ae-alt"), uname("pol-ae-q")
    queues_only, for_exchanges = uname("pol-ae-queues"), uname("pol-ae-exchanges")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        channel.exchange_declare(alternate, "fanout")
        channel.queue_declare(caught)
        channel.queue_bind(caught, alternate)
        channel.exchange_declare(exchange, "direct")
        # Applying to queues only, it leaves the exchange alone.
        set_policy(api, queues_only, f"^{exchange}$", {"alternate-exchange": alternate},
                   apply_to="queues", priority=5)

        def exchange_policy():
            return api.json(f"/api/exchanges/{VHOST}/{q(exchange)}").get("policy")
        set_policy(api, for_exchanges, f"^{exchange}$", {"alternate-exchange": alternate},
                   apply_to="exchanges")
        eventually(lambda: exchange_policy() == for_exchanges, "the exchange's policy")
        channel.basic_publish(exchange, "no-such-key", b"unroutable")
        assert eventually(lambda: drain(channel, caught) or None, "the alternate exchange") \
            == [b"unroutable"]
    finally:
        channel.queue_delete(caught)
        channel.exchange_delete(exchange)
        channel.exchange_delete(alternate)
        conn.close()


def test_a_policy_expires_unused_queues(any_broker, api):
    queue, policy = uname("pol-exp"), uname("pol-exp-p")
    conn = any_broker.connect()
    channel = conn.channel()
    try:
        channel.queue_declare(queue)
        set_policy(api, policy, f"^{queue}$", {"expires": 300})

        def gone():
            return api.get(f"/api/queues/{VHOST}/{q(queue)}").status_code == 404
        eventually(gone, "the unused queue to expire", POLICY_TIMEOUT)
    finally:
        conn.close()


def test_policy_requests_are_validated_as_rabbitmq_does(any_broker, api):
    name = uname("pol-v")
    path = f"/api/policies/{VHOST}/{q(name)}"
    good = {"pattern": "^nothing-matches-this$", "definition": {"max-length": 1}}
    resp = api.put(path, json=good)
    assert resp.status_code == 201, describe(resp)
    api.created_policies.append(path)
    assert api.put(path, json=good).status_code == 204, "an update is 204"
    shown = api.json(path)
    assert shown == {"vhost": "/", "name": name, "pattern": "^nothing-matches-this$",
                     "apply-to": "all", "definition": {"max-length": 1}, "priority": 0}, shown
    assert any(item["name"] == name for item in api.json("/api/policies"))
    assert any(item["name"] == name for item in api.json(f"/api/policies/{VHOST}"))

    for body, needle in [
        ({"pattern": ".*", "definition": {"no-such-key": 1}}, "not recognised policy settings"),
        ({"pattern": ".*", "definition": {"max-length": "ten"}}, "is not a valid maximum length"),
        ({"pattern": ".*", "definition": {}}, "no policy provided"),
        ({"pattern": "[", "definition": {"max-length": 1}}, "pattern"),
        ({"pattern": ".*", "definition": {"max-length": 1}, "apply-to": "bogus"}, "bogus"),
        ({"pattern": ".*", "definition": {"max-length": 1}, "priority": "7"}, "priority"),
        ({"definition": {"max-length": 1}}, "pattern"),
        ({"pattern": ".*"}, "definition"),
    ]:
        assert_error(api.put(f"/api/policies/{VHOST}/{q(uname('pol-bad'))}", json=body),
                     400, needle)
    assert_error(api.put(f"/api/policies/no-such-vhost-{name}/p", json=good), 404)

    assert api.delete(path).status_code == 204
    api.created_policies.remove(path)
    assert api.delete(path).status_code == 404
    assert api.get(path).status_code == 404


@pytest.mark.warren_only("restarts the broker")
def test_policies_survive_a_restart_and_ctl_manages_them(tmp_path):
    workdir = tmp_path / "node"
    first = start_broker(workdir)

    def ctl(broker, *args: str) -> str:
        done = subprocess.run([str(warren_bin()), "ctl", "--url", broker.http_url, *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    try:
        conn = first.connect()
        channel = conn.channel()
        channel.queue_declare("kept", durable=True)
        ctl(first, "set-policy", "--priority", "3", "--apply-to", "queues",
            "cap", "^kept$", '{"max-length": 2}')
        ctl(first, "set-operator-policy", "limit", ".*", '{"message-ttl": 600000}')
        listed = ctl(first, "list-policies")
        assert "cap\t^kept$\tqueues\t" in listed, listed
        assert '"max-length":2' in listed.replace(" ", ""), listed
        assert "limit" in ctl(first, "list-operator-policies")
        props = pika.BasicProperties(delivery_mode=2)
        for body in (b"1", b"2", b"3"):
            channel.basic_publish("", "kept", body, props)
        eventually(lambda: ready(channel, "kept") == 2, "the policy's limit")
        conn.close()
    finally:
        first.close_connections()
        assert first.stop() == 0
        first.finish()

    second = start_broker(workdir)
    try:
        api = Api(second.http_url)
        info = api.queue("kept")
        assert info["policy"] == "cap" and info["operator_policy"] == "limit", info
        assert info["effective_policy_definition"] == {"max-length": 2,
                                                       "message-ttl": 600000}, info
        conn = second.connect()
        channel = conn.channel()
        assert ready(channel, "kept") == 2
        channel.basic_publish("", "kept", b"4", pika.BasicProperties(delivery_mode=2))
        eventually(lambda: ready(channel, "kept") == 2, "the limit, still applied")
        ctl(second, "clear-policy", "cap")
        ctl(second, "clear-operator-policy", "limit")
        assert api.json("/api/policies") == []
        assert api.queue("kept")["policy"] is None
        channel.basic_publish("", "kept", b"5", pika.BasicProperties(delivery_mode=2))
        eventually(lambda: ready(channel, "kept") == 3, "no limit once cleared")
        conn.close()
        api.close()
    finally:
        second.close_connections()
        assert second.stop() == 0
        second.finish()
