"""TLS with pika and requests: AMQPS (TLS 1.2 and 1.3 only), EXTERNAL
with a client certificate, a certificate from an untrusted CA refused, a
client without a certificate refused when verify_peer is on, HTTPS for
the management API, and RabbitMQ's certificate-expiration health check. Certificates come from tests/tls/make-certs.sh."""

from __future__ import annotations

import re
import ssl
import subprocess

import pika
import pytest
import requests
from pika.exceptions import AMQPConnectionError

from conftest import REPO_ROOT


@pytest.fixture
def certs(tmp_path):
    directory = tmp_path / "certs"
    subprocess.run(["bash", str(REPO_ROOT / "tests/tls/make-certs.sh"), str(directory), "alice"],
                   check=True, capture_output=True)
    return directory


def tls_config(certs, verify_peer: bool = False, https: bool = False) -> str:
    return f'''
[tls]
cert_file = "{certs}/server.pem"
key_file = "{certs}/server.key"
ca_file = "{certs}/ca.pem"
verify_peer = {str(verify_peer).lower()}
https = {str(https).lower()}

[[users]]
name = "alice"
tags = ["management"]

[[permissions]]
user = "alice"
configure = ".*"
write = ".*"
read = ".*"
'''


def amqps_port(broker) -> int:
    match = re.search(r"AMQPS listener ready addr=\S*?:(\d+)", broker.log())
    assert match, broker.log()
    return int(match.group(1))


def client_context(certs, client: str | None = None,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client is not None:
        context.load_cert_chain(str(certs / f"{client}.pem"), str(certs / f"{client}.key"))
    if maximum is not None:
        # Only to offer an old version on purpose; the broker must refuse it.
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def connect(broker, certs, credentials, client=None, maximum=None) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        host="localhost", port=amqps_port(broker), credentials=credentials,
        ssl_options=pika.SSLOptions(client_context(certs, client, maximum), "localhost"),
        connection_attempts=1, socket_timeout=10, stack_timeout=15)
    return pika.BlockingConnection(params)


def test_pika_over_tls_with_a_password(broker_factory, certs):
    b = broker_factory(config=tls_config(certs))
    conn = connect(b, certs, pika.PlainCredentials("guest", "guest"))
    try:
        ch = conn.channel()
        ch.queue_declare("tls-q")
        ch.confirm_delivery()
        ch.basic_publish("", "tls-q", b"over tls")
        method, _props, body = ch.basic_get("tls-q", auto_ack=True)
        assert body == b"over tls"
        version = conn._impl._transport._sock.version()
        assert version in ("TLSv1.2", "TLSv1.3"), version
    finally:
        conn.close()


# pika raises a failed TLS handshake as the ssl module's error itself.
REFUSED = (AMQPConnectionError, ssl.SSLError)


def test_tls_1_1_is_refused(broker_factory, certs):
    b = broker_factory(config=tls_config(certs))
    with pytest.raises(REFUSED):
        connect(b, certs, pika.PlainCredentials("guest", "guest"),
                maximum=ssl.TLSVersion.TLSv1_1)
    b.wait_for_log("TLS handshake failed")


def test_external_logs_in_as_the_certificates_common_name(broker_factory, certs):
    b = broker_factory(config=tls_config(certs))
    conn = connect(b, certs, pika.credentials.ExternalCredentials(), client="client")
    try:
        conn.channel().queue_declare("alice-q")
        b.wait_for_log(r"connection opened.*user=alice")
    finally:
        conn.close()


def test_a_certificate_from_an_untrusted_ca_is_refused(broker_factory, certs):
    b = broker_factory(config=tls_config(certs))
    with pytest.raises(REFUSED):
        connect(b, certs, pika.credentials.ExternalCredentials(), client="rogue")
    b.wait_for_log("TLS handshake failed")
    # Others are unaffected.
    connect(b, certs, pika.PlainCredentials("guest", "guest")).close()


def test_verify_peer_refuses_clients_without_a_certificate(broker_factory, certs):
    b = broker_factory(config=tls_config(certs, verify_peer=True))
    with pytest.raises(REFUSED):
        connect(b, certs, pika.PlainCredentials("guest", "guest"))
    conn = connect(b, certs, pika.PlainCredentials("guest", "guest"), client="client")
    assert conn.is_open
    conn.close()


def test_https_serves_the_management_api(broker_factory, certs):
    b = broker_factory(config=tls_config(certs, https=True))
    match = re.search(r"HTTP listener ready addr=\S*?:(\d+)", b.log())
    assert match, b.log()
    base = f"https://localhost:{match.group(1)}"
    session = requests.Session()
    session.trust_env = False
    me = session.get(f"{base}/api/whoami", auth=("guest", "guest"), verify=str(certs / "ca.pem"),
                     timeout=10)
    assert me.status_code == 200 and me.json()["name"] == "guest", me.text
    with pytest.raises(requests.exceptions.SSLError):
        session.get(f"{base}/api/whoami", auth=("guest", "guest"), timeout=10)  # unknown CA
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"http://localhost:{match.group(1)}/api/whoami", auth=("guest", "guest"),
                    timeout=10)


def test_the_certificate_expiration_check_names_the_listeners(broker_factory, certs):
    """The test certificates are valid for one day: a check for the next
    week fails naming both TLS listeners, a check for no time passes."""
    b = broker_factory(config=tls_config(certs))
    base = b.http_url
    session = requests.Session()
    session.trust_env = False

    def check(path: str) -> requests.Response:
        return session.get(f"{base}/api/health/checks/certificate-expiration/{path}",
                           auth=("guest", "guest"), timeout=10)

    assert check("0/days").json() == {"status": "ok"}
    resp = check("1/weeks")
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["status"] == "failed" and body["reason"] == "Certificates expiring", body
    (listener,) = body["expired"]
    assert listener["protocol"] == "amqp/ssl" and listener["port"] == amqps_port(b), listener
    assert listener["certfile"] == str(certs / "server.pem"), listener
    assert len(listener["certfile_expires_on"]) == 1, listener
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d{1,2}:\d\d:\d\d",
                        listener["certfile_expires_on"][0]), listener
    assert len(listener["cacertfile_expires_on"]) == 1, "the CA expires too"
    resp = check("1/fortnights")
    assert resp.status_code == 400 and resp.json()["reason"] == \
        "Time unit not recognised. Supported units: days, weeks, months, years.", resp.text
    resp = check("x/months")
    assert resp.status_code == 400 and resp.json()["reason"] == "Invalid expiration value.", \
        resp.text
