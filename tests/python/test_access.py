"""Users, vhosts, permissions and tags through the management API and
`warren ctl`, and what pika clients may then do, against the real binary.

The full method-by-method permission matrix is
crates/warren/tests/permissions.rs; this file covers how operators manage
access and that the HTTP side applies the same rights and tags.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time

import pika
import pytest
from pika.exceptions import (AMQPConnectionError, AuthenticationError, ChannelClosedByBroker,
                             ConnectionClosedByBroker, ProbableAccessDeniedError,
                             ProbableAuthenticationError)

from conftest import start_broker, warren_bin
from test_http_api import Api, assert_error, http_url_of


def ctl(broker, *args: str, user: str = "guest", password: str = "guest",
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Runs `warren ctl` against the broker's HTTP listener."""
    env = dict(os.environ, WARREN_URL=http_url_of(broker), WARREN_USER=user,
               WARREN_PASSWORD=password)
    return subprocess.run([str(warren_bin()), "ctl", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def ctl_ok(broker, *args: str, **kwargs) -> str:
    done = ctl(broker, *args, **kwargs)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def connect(broker, user: str, password: str, vhost: str = "/") -> pika.BlockingConnection:
    return broker.connect(username=user, password=password, vhost=vhost)


def assert_vhost_refused(broker, user: str, password: str, vhost: str) -> None:
    """connection.open refused with 530 NOT_ALLOWED; pika raises it as
    ConnectionClosedByBroker or wraps it in ProbableAccessDeniedError."""
    with pytest.raises(AMQPConnectionError) as excinfo:
        connect(broker, user, password, vhost)
    err = excinfo.value
    if isinstance(err, ConnectionClosedByBroker):
        assert err.reply_code == 530, repr(err)
    else:
        assert isinstance(err, ProbableAccessDeniedError), repr(err)
        assert "530" in str(err), repr(err)


def assert_login_refused(broker, user: str, password: str) -> None:
    """connection.start-ok refused with 403 ACCESS_REFUSED."""
    with pytest.raises((ProbableAuthenticationError, AuthenticationError)) as excinfo:
        connect(broker, user, password)
    if isinstance(excinfo.value, ProbableAuthenticationError):
        assert "403" in str(excinfo.value), repr(excinfo.value)


def test_ctl_manages_users_vhosts_and_permissions(broker):
    ctl_ok(broker, "add-vhost", "tenant-a")
    # The password comes on standard input, so it is not in the process list.
    ctl_ok(broker, "add-user", "svc", "--tags", "management", stdin="s3cret\n")
    ctl_ok(broker, "set-permissions", "-p", "tenant-a", "svc", "^svc\\.", "^(svc\\..*|amq\\.default)$",
           "^svc\\.")

    users = ctl_ok(broker, "list-users")
    assert "svc\tmanagement" in users.splitlines(), users
    assert "tenant-a" in ctl_ok(broker, "list-vhosts")
    perms = ctl_ok(broker, "list-permissions", "-p", "tenant-a").splitlines()
    assert perms[0] == "user\tconfigure\twrite\tread"
    assert "svc\t^svc\\.\t^(svc\\..*|amq\\.default)$\t^svc\\." in perms, perms

    conn = connect(broker, "svc", "s3cret", "tenant-a")
    ch = conn.channel()
    ch.queue_declare("svc.jobs")
    ch.basic_publish("", "svc.jobs", b"job")
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().queue_declare("other.jobs")
    assert refused.value.reply_code == 403
    assert "access to queue 'other.jobs' in vhost 'tenant-a' refused for user 'svc'" in \
        refused.value.reply_text

    # No permissions in "/": connection.open is refused with 530.
    assert_vhost_refused(broker, "svc", "s3cret", "/")

    # Deleting the user closes their connections, as in RabbitMQ.
    ctl_ok(broker, "delete-user", "svc")
    with pytest.raises(ConnectionClosedByBroker) as closed:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
    assert closed.value.reply_code == 320
    assert "svc" not in ctl_ok(broker, "list-users")


def test_ctl_reports_refusals_and_needs_an_administrator(broker):
    done = ctl(broker, "delete-vhost", "no-such-vhost")
    assert done.returncode != 0 and "404" in done.stderr, done.stderr
    done = ctl(broker, "set-permissions", "nobody", ".*", ".*", ".*")
    assert done.returncode != 0 and "no user 'nobody'" in done.stderr, done.stderr
    done = ctl(broker, "set-permissions", "guest", "(", ".*", ".*")
    assert done.returncode != 0 and "invalid configure pattern" in done.stderr, done.stderr
    ctl_ok(broker, "add-user", "watcher", "pw", "--tags", "monitoring")
    done = ctl(broker, "add-vhost", "x", user="watcher", password="pw")
    assert done.returncode != 0 and "Not administrator user" in done.stderr, done.stderr
    done = ctl(broker, "list-users", password="wrong")
    assert done.returncode != 0 and "401" in done.stderr, done.stderr


def test_users_vhosts_and_permissions_survive_a_restart(tmp_path):
    workdir = tmp_path / "node"
    first = start_broker(workdir)
    try:
        ctl_ok(first, "add-vhost", "kept")
        ctl_ok(first, "add-user", "keeper", "pw")
        ctl_ok(first, "set-permissions", "-p", "kept", "keeper", ".*", ".*", ".*")
        ctl_ok(first, "delete-user", "guest", user="guest")
    finally:
        assert first.stop() == 0
        first.finish()
    stored = (workdir / "data" / "access.json").read_text()
    assert "$argon2id$" in stored and '"pw"' not in stored
    second = start_broker(workdir)
    try:
        conn = connect(second, "keeper", "pw", "kept")
        conn.channel().queue_declare("still-here")
        conn.close()
        # The default user does not come back once deleted.
        assert_login_refused(second, "guest", "guest")
    finally:
        second.close_connections()
        assert second.stop() == 0
        second.finish()


def test_deleting_a_vhost_deletes_its_queues_and_closes_its_connections(broker):
    api = Api(http_url_of(broker))
    try:
        assert api.put("/api/vhosts/doomed").status_code == 201
        assert api.put("/api/vhosts/doomed").status_code == 204
        assert api.put("/api/permissions/doomed/guest",
                       json={"configure": ".*", "write": ".*", "read": ".*"}).status_code == 201
        conn = connect(broker, "guest", "guest", "doomed")
        ch = conn.channel()
        ch.queue_declare("inside", durable=True)
        ch.basic_publish("", "inside", b"m", pika.BasicProperties(delivery_mode=2))
        assert [q["name"] for q in api.json("/api/queues/doomed")] == ["inside"]

        assert api.delete("/api/vhosts/doomed").status_code == 204
        with pytest.raises(ConnectionClosedByBroker) as closed:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.05)
        assert closed.value.reply_code == 320
        assert_error(api.get("/api/queues/doomed"), 404)
        assert all(q["vhost"] != "doomed" for q in api.json("/api/queues"))
        # Made again, it is empty and grants nothing to anyone.
        assert api.put("/api/vhosts/doomed").status_code == 201
        assert api.json("/api/vhosts/doomed/permissions") == []
        assert api.json("/api/queues/doomed") == []
        assert not api.server_errors, api.server_errors
    finally:
        api.close()


def test_tags_decide_what_the_management_api_shows(broker):
    admin = Api(http_url_of(broker))
    try:
        admin.put("/api/vhosts/team")
        for name, tags in [("plain", ""), ("manager", "management"), ("watcher", "monitoring")]:
            resp = admin.put(f"/api/users/{name}", json={"password": "pw", "tags": tags})
            assert resp.status_code == 201, resp.text
        for name in ("manager", "watcher"):
            resp = admin.put(f"/api/permissions/team/{name}",
                             json={"configure": ".*", "write": ".*", "read": ".*"})
            assert resp.status_code == 201, resp.text
        conn = connect(broker, "guest", "guest")
        conn.channel().queue_declare("in-root")

        plain = admin.with_auth(("plain", "pw"))
        assert_error(plain.get("/api/overview"), 401, "Not management user")

        manager = admin.with_auth(("manager", "pw"))
        assert manager.json("/api/whoami") == {"name": "manager", "tags": ["management"]}
        assert [v["name"] for v in manager.json("/api/vhosts")] == ["team"]
        assert all(q["vhost"] == "team" for q in manager.json("/api/queues"))
        assert_error(manager.get("/api/queues/%2F"), 401)
        assert_error(manager.get("/api/queues/%2F/in-root"), 401)
        assert manager.json("/api/connections") == [], "sees only its own connections"
        assert_error(manager.get("/api/users"), 401, "Not administrator user")
        assert_error(manager.put("/api/vhosts/mine"), 401, "Not administrator user")
        # Changes in its vhost go through AMQP as the user: allowed there.
        assert manager.put("/api/queues/team/work", json={"durable": True}).status_code == 201
        # And refused where the user has no permissions, by the broker.
        assert_error(manager.put("/api/queues/%2F/sneaky", json={}), 401)

        watcher = admin.with_auth(("watcher", "pw"))
        assert {v["name"] for v in watcher.json("/api/vhosts")} == {"/", "team"}
        assert any(q["name"] == "in-root" for q in watcher.json("/api/queues"))
        assert any(c["user"] == "guest" for c in watcher.json("/api/connections"))
        assert_error(watcher.get("/api/permissions"), 401, "Not administrator user")

        users = {u["name"]: u for u in admin.json("/api/users")}
        assert users["watcher"]["tags"] == ["monitoring"]
        assert users["manager"]["password_hash"].startswith("$argon2id$")
        assert not admin.server_errors, admin.server_errors
    finally:
        admin.close()


def test_permission_refusals_over_http_carry_the_brokers_reason(broker):
    admin = Api(http_url_of(broker))
    try:
        admin.put("/api/users/limited", json={"password": "pw", "tags": "management"})
        admin.put("/api/permissions/%2F/limited",
                  json={"configure": "^limited\\.", "write": "^limited\\.", "read": "^limited\\."})
        limited = admin.with_auth(("limited", "pw"))
        assert limited.put("/api/queues/%2F/limited.q", json={}).status_code == 201
        assert_error(limited.put("/api/queues/%2F/shared.q", json={}), 403,
                     "access to queue 'shared.q' in vhost '/' refused for user 'limited'")
        resp = limited.post("/api/exchanges/%2F/amq.default/publish",
                            json={"routing_key": "limited.q", "payload": "x",
                                  "payload_encoding": "string", "properties": {}})
        assert_error(resp, 403, "exchange 'amq.default'")
        assert not admin.server_errors, admin.server_errors
    finally:
        admin.close()


def test_user_api_validates_its_input(broker):
    api = Api(http_url_of(broker))
    try:
        assert_error(api.put("/api/users/x", json={"password": "a", "password_hash": "b"}), 400)
        assert_error(api.put("/api/users/x", json={"password_hash": "$2b$10$bcrypt"}), 400)
        assert_error(api.put("/api/users/x", json={"hashing_algorithm": "rabbit_password_hashing_sha256",
                                                   "password": "a"}), 400)
        assert_error(api.put("/api/permissions/%2F/nobody",
                             json={"configure": "", "write": "", "read": ""}), 404, "nobody")
        assert_error(api.put("/api/permissions/%2F/guest",
                             json={"configure": "[", "write": "", "read": ""}), 400, "configure")
        assert_error(api.delete("/api/users/nobody"), 404)
        # A hash made by `warren ctl hash-password` logs in.
        phc = ctl_ok(broker, "hash-password", stdin="from-hash\n").strip()
        assert phc.startswith("$argon2id$")
        assert api.put("/api/users/hashed", json={"password_hash": phc, "tags": ["management"]}) \
            .status_code == 201
        assert api.with_auth(("hashed", "from-hash")).json("/api/whoami")["name"] == "hashed"
        assert not api.server_errors, api.server_errors
    finally:
        api.close()


def rabbit_hash(password: str, digest) -> str:
    """RabbitMQ's password hash: base64 of a random 4-byte salt and the
    digest of the salt followed by the password."""
    salt = os.urandom(4)
    return base64.b64encode(salt + digest(salt + password.encode()).digest()).decode()


def test_users_with_rabbitmq_password_hashes_log_in(broker):
    """A user given a hash made the way RabbitMQ makes them (as definitions
    exported from RabbitMQ carry) logs in with that password, and the API
    gives the hash back with its algorithm."""
    api = Api(http_url_of(broker))
    try:
        for name, algorithm, digest in [
            ("moved-sha256", "rabbit_password_hashing_sha256", hashlib.sha256),
            ("moved-sha512", "rabbit_password_hashing_sha512", hashlib.sha512),
            ("moved-md5", "rabbit_password_hashing_md5", hashlib.md5),
        ]:
            hashed = rabbit_hash("from rabbit", digest)
            resp = api.put(f"/api/users/{name}", json={
                "password_hash": hashed, "hashing_algorithm": algorithm, "tags": ""})
            assert resp.status_code == 201, resp.text
            assert api.put(f"/api/permissions/%2F/{name}", json={
                "configure": ".*", "write": ".*", "read": ".*"}).status_code == 201
            connect(broker, name, "from rabbit").close()
            assert_login_refused(broker, name, "not from rabbit")
            shown = api.get(f"/api/users/{name}").json()
            assert (shown["password_hash"], shown["hashing_algorithm"]) == (hashed, algorithm)
        # Without an algorithm, a hash that is no PHC string is RabbitMQ's
        # default, SHA-256.
        hashed = rabbit_hash("default", hashlib.sha256)
        assert api.put("/api/users/moved-default", json={
            "password_hash": hashed, "tags": ""}).status_code == 201
        assert api.get("/api/users/moved-default").json()["hashing_algorithm"] == \
            "rabbit_password_hashing_sha256"
        assert_error(api.put("/api/users/bad-hash", json={
            "password_hash": "short", "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": ""}), 400, "rabbit_password_hashing_sha256")
        assert_error(api.put("/api/users/bad-algorithm", json={
            "password_hash": hashed, "hashing_algorithm": "bcrypt", "tags": ""}), 400, "bcrypt")
    finally:
        api.close()
