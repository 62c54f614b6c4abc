//! AMQPS with lapin: TLS 1.2/1.3 with the broker's certificate checked
//! against the test CA, PLAIN over TLS, EXTERNAL with a client certificate
//! (the user is the certificate's CN), and a client certificate from an
//! untrusted CA refused in the handshake. Certificates come from
//! tests/tls/make-certs.sh (openssl).

use std::path::{Path, PathBuf};

use crate::common::*;
use lapin::options::*;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn make_certificates() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/tls/make-certs.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .arg("alice")
        .status()
        .expect("run make-certs.sh (needs openssl)");
    assert!(status.success(), "make-certs.sh failed");
    let path = dir.path().to_owned();
    (dir, path)
}

fn config(certs: &Path) -> String {
    format!(
        r#"
[tls]
cert_file = "{certs}/server.pem"
key_file = "{certs}/server.key"
ca_file = "{certs}/ca.pem"

# alice has no password: she can come in only with her certificate.
[[users]]
name = "alice"

[[permissions]]
user = "alice"
configure = '^alice\.'
write = '.*'
read = '^alice\.'
"#,
        certs = certs.display()
    )
}

fn tls_config(certs: &Path, client: Option<&str>) -> OwnedTLSConfig {
    let read = |name: &str| std::fs::read(certs.join(name)).expect("certificate file");
    OwnedTLSConfig {
        identity: client.map(|name| OwnedIdentity::PKCS8 {
            pem: read(&format!("{name}.pem")),
            key: read(&format!("{name}.key")),
        }),
        cert_chain: Some(String::from_utf8(read("ca.pem")).expect("PEM is text")),
    }
}

async fn connect_tls(url: &str, config: OwnedTLSConfig) -> lapin::Result<Connection> {
    within(
        "TLS connect",
        Connection::connect_with_config(
            url,
            ConnectionProperties::default(),
            config,
            lapin::runtime::default_runtime().expect("tokio runtime"),
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_login_over_tls_round_trips_a_message() {
    let (_dir, certs) = make_certificates();
    let broker = Broker::start_with_config(&config(&certs)).await;
    let port = broker.amqps_port().expect("AMQPS listener logged");
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    let connection = connect_tls(&url, tls_config(&certs, None))
        .await
        .expect("guest over TLS from loopback");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "over-tls".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            "".into(),
            "over-tls".into(),
            BasicPublishOptions::default(),
            b"secret payload",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let got = channel
        .basic_get("over-tls".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"secret payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_takes_the_user_from_the_certificate() {
    let (_dir, certs) = make_certificates();
    let broker = Broker::start_with_config(&config(&certs)).await;
    let port = broker.amqps_port().expect("AMQPS listener logged");
    let url = format!("amqps://localhost:{port}/%2f?auth_mechanism=external");
    let connection = connect_tls(&url, tls_config(&certs, Some("client")))
        .await
        .expect("EXTERNAL login with alice's certificate");
    let channel = connection.create_channel().await.expect("channel");
    // alice's permissions apply: her own prefix only.
    channel
        .queue_declare(
            "alice.q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("alice may declare alice.q");
    let refused = channel
        .queue_declare(
            "bob.q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(refused, 403, "alice declaring bob.q");
    // The connection is alice's.
    broker.wait_for_log("user=alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    let (_dir, certs) = make_certificates();
    let broker = Broker::start_with_config(&config(&certs)).await;
    let port = broker.amqps_port().expect("AMQPS listener logged");
    let url = format!("amqps://localhost:{port}/%2f?auth_mechanism=external");
    let refused = connect_tls(&url, tls_config(&certs, Some("rogue"))).await;
    assert!(refused.is_err(), "a rogue certificate must not log in");
    // Without a certificate EXTERNAL has nothing to go on either.
    let refused = connect_tls(&url, tls_config(&certs, None)).await;
    assert!(refused.is_err(), "EXTERNAL without a certificate must fail");
    // The refusal is logged.
    broker.wait_for_log("TLS handshake failed").await;
    // The listener still serves others.
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    connect_tls(&url, tls_config(&certs, None))
        .await
        .expect("guest still connects");
}
