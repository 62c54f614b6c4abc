//! The connection state machine fed raw bytes, before and after login: a
//! real `AmqpServer` (in memory, no data directory) serves each input over
//! an in-memory pipe. Nothing may panic, and every input must end: the
//! connection closes, or the input runs out and the peer hangs up, within
//! a bound.
//!
//! Input: the first byte picks where the bytes start. Even: right after the
//! protocol header, where a client's connection.start-ok goes. Odd: after a
//! complete login as guest to "/" (start-ok, tune-ok, open) and a
//! channel.open on channel 1, so that the bytes reach channel methods,
//! content assembly and the broker.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{FieldTable, LongString};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use warren_amqp::{AmqpConfig, AmqpServer};
use warren_proto::{FrameEncoder, PROTOCOL_HEADER};

/// An input that neither finishes nor gets closed by then is a hang.
const INPUT_TIME_MAX: Duration = Duration::from_secs(5);

struct Harness {
    runtime: Runtime,
    server: AmqpServer,
    login: Vec<u8>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut config = AmqpConfig::default();
        // Inputs accumulate state in one broker; keep it small.
        config.limits.queues_per_vhost_max = 1_000;
        config.heartbeat_s = 0;
        let server = runtime
            .block_on(AmqpServer::bind("127.0.0.1:0".parse().expect("address"), config))
            .expect("server");
        Harness {
            runtime,
            server,
            login: login_bytes(),
        }
    })
}

/// What a client sends after the protocol header to log in as guest and
/// open channel 1.
fn login_bytes() -> Vec<u8> {
    let mut encoder = FrameEncoder::new();
    encoder.method(
        0,
        &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from("\0guest\0guest"),
            locale: "en_US".into(),
        })),
    );
    encoder.method(
        0,
        &AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 0,
        })),
    );
    encoder.method(
        0,
        &AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    );
    encoder.method(
        1,
        &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    );
    encoder.bytes().to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = data.split_first() else {
        return;
    };
    let harness = harness();
    let mut input = PROTOCOL_HEADER.to_vec();
    if mode % 2 == 1 {
        input.extend_from_slice(&harness.login);
    }
    input.extend_from_slice(bytes);
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("address");
    harness.runtime.block_on(async {
        let (mut client, server_end) = tokio::io::duplex(64 * 1024);
        let serve = harness.server.serve_stream(server_end, peer);
        let drive = async move {
            client.write_all(&input).await.ok();
            client.shutdown().await.ok();
            // Drain what the broker answers until it closes.
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.ok();
        };
        let both = async { tokio::join!(serve, drive) };
        tokio::time::timeout(INPUT_TIME_MAX, both)
            .await
            .expect("the connection neither closed nor finished in time");
    });
});
