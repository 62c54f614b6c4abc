//! Shared harness for Warren's integration tests.
//!
//! * [`Broker`] starts the real `warren` binary on ephemeral ports (see
//!   `docs/test-contract.md`), captures its stderr, and kills it on drop. When
//!   a test panics, the captured broker log is printed so the failure can be
//!   diagnosed.
//! * [`RawConn`] is a raw AMQP 0-9-1 client over a `TcpStream`, using the
//!   `amq-protocol` codec, for tests that must send frames no well-behaved
//!   client would send.
//! * A few lapin helpers (error codes, consumer waits, connection events).

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use amq_protocol::{
    frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame},
    protocol::{AMQPClass, BasicProperties, basic, channel, connection},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use futures_lite::{Stream, StreamExt};
use lapin::options::QueueDeclareOptions;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, Event};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How long to wait for any single expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the broker to report readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker gets to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

const READY_MARKER: &str = "AMQP listener ready addr=";

// AMQP reply codes (AMQP 0-9-1 spec / RabbitMQ).
pub const REPLY_SUCCESS: u16 = 200;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const CONNECTION_FORCED: u16 = 320;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------
// Broker process
// ---------------------------------------------------------------------------

/// A running `warren serve` child process.
pub struct Broker {
    child: Mutex<Option<Child>>,
    pid: u32,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    root: PathBuf,
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters until a final byte in '@'..='~'
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn parse_ready_addr(line: &str) -> Option<SocketAddr> {
    let idx = line.find(READY_MARKER)?;
    let rest = &line[idx + READY_MARKER.len()..];
    let rest = rest.trim_start_matches('"');
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    token.parse().ok()
}

impl Broker {
    /// Start a broker with the default configuration.
    pub async fn start() -> Broker {
        Self::spawn(None).await
    }

    /// Start a broker with the given TOML config file contents.
    pub async fn start_with_config(toml: &str) -> Broker {
        Self::spawn(Some(toml)).await
    }

    /// Start a broker whose data directory is `data_dir`, which the test
    /// owns: it is created if missing and never deleted by the harness, so a
    /// later `start_in` on the same directory sees what this broker stored.
    /// Listens on 127.0.0.1:0 as usual, so each (re)start gets a new port.
    /// `config` is optional TOML config file contents (kept in a separate
    /// harness-owned temporary directory, removed on drop).
    pub async fn start_in(data_dir: &Path, config: Option<&str>) -> Broker {
        Self::spawn_in(config, Some(data_dir)).await
    }

    async fn spawn(config: Option<&str>) -> Broker {
        Self::spawn_in(config, None).await
    }

    /// `data_dir`: `None` makes a fresh `data` directory inside the harness's
    /// temporary root (removed with it); `Some` uses the caller's directory,
    /// which the harness never removes.
    async fn spawn_in(config: Option<&str>, data_dir: Option<&Path>) -> Broker {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let root = std::env::temp_dir().join(format!(
            "warren-it-{}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst),
            nanos
        ));
        std::fs::create_dir_all(&root).expect("create broker temp dir");
        let data_dir = match data_dir {
            Some(dir) => dir.to_path_buf(),
            None => root.join("data"),
        };
        std::fs::create_dir_all(&data_dir).expect("create broker data dir");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.arg("serve")
            .arg("--amqp-listen")
            .arg("127.0.0.1:0")
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            // Used only when the config has a [tls] section.
            .arg("--amqps-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(toml) = config {
            let path = root.join("warren.toml");
            std::fs::write(&path, toml).expect("write broker config");
            cmd.arg("--config").arg(&path);
        }
        let rust_log = std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "info".to_string());
        cmd.env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());

        let mut child = cmd.spawn().expect("spawn warren binary");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Option<SocketAddr>>();

        {
            let log = log.clone();
            std::thread::Builder::new()
                .name(format!("warren-stderr-{pid}"))
                .spawn(move || {
                    let mut ready_tx = Some(ready_tx);
                    let mut reader = BufReader::new(stderr);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match reader.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        let line = strip_ansi(&String::from_utf8_lossy(&buf));
                        log.lock().unwrap().push_str(&line);
                        if let Some(addr) = ready_tx.as_ref().and_then(|_| parse_ready_addr(&line))
                        {
                            let _ = ready_tx.take().unwrap().send(Some(addr));
                        }
                    }
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(None);
                    }
                })
                .expect("spawn stderr reader thread");
        }

        let broker_log = || log.lock().unwrap().clone();
        let addr = match tokio::time::timeout(READY_TIMEOUT, ready_rx).await {
            Ok(Ok(Some(addr))) => addr,
            Ok(_) => {
                let _ = child.kill();
                let status = child.wait();
                let _ = std::fs::remove_dir_all(&root);
                panic!(
                    "warren exited ({status:?}) before logging '{READY_MARKER}'; stderr:\n{}",
                    broker_log()
                );
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&root);
                panic!(
                    "warren did not log '{READY_MARKER}' within {READY_TIMEOUT:?}; stderr:\n{}",
                    broker_log()
                );
            }
        };

        Broker {
            child: Mutex::new(Some(child)),
            pid,
            addr,
            log,
            root,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn amqp_url(&self) -> String {
        self.url_for("guest", "guest", "%2f")
    }

    /// An AMQP URI with explicit credentials and (already percent-encoded) vhost.
    pub fn url_for(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/{vhost}", self.port())
    }

    /// The AMQPS listener's port, from its ready line (logged before the
    /// AMQP line `start` waits for); None without `[tls]`.
    pub fn amqps_port(&self) -> Option<u16> {
        self.listener_addr("AMQPS").map(|addr| addr.port())
    }

    /// The HTTP listener's address, from its ready line (logged before the
    /// AMQP line `start` waits for).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener_addr("HTTP")
            .expect("the HTTP listener is logged before the AMQP one")
    }

    /// The address in the ready line of the listener called `name`.
    fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let ready = format!("{name} listener ready addr=");
        let log = self.log();
        let line = log.lines().find(|line| line.contains(&ready))?;
        parse_ready_addr(&line.replace(&ready, READY_MARKER))
    }

    /// Waits until the broker's log contains `needle`: its stderr is read by
    /// another thread, so a line the broker wrote before answering may
    /// arrive here after the answer. Panics with the log after
    /// [`EVENT_TIMEOUT`].
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
                panic!("the log never said {needle:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The broker's stderr captured so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Connect with lapin as guest to vhost "/".
    pub async fn connect(&self) -> Connection {
        let url = self.amqp_url();
        self.connect_url(&url).await
    }

    /// Connect with lapin to the given URI, panicking (with the broker log) on failure.
    pub async fn connect_url(&self, url: &str) -> Connection {
        match self.try_connect_url(url).await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "lapin connect to {url} failed: {e}\nbroker stderr:\n{}",
                self.log()
            ),
        }
    }

    /// Connect with lapin, returning the error instead of panicking (time-limited).
    pub async fn try_connect_url(&self, url: &str) -> lapin::Result<Connection> {
        match tokio::time::timeout(
            EVENT_TIMEOUT,
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(res) => res,
            Err(_) => panic!(
                "lapin connect to {url} did not complete within {EVENT_TIMEOUT:?}\nbroker stderr:\n{}",
                self.log()
            ),
        }
    }

    /// Open a raw TCP connection to the AMQP port.
    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }

    /// Open a raw connection and perform the full handshake as guest on "/".
    pub async fn raw_handshake(&self) -> (RawConn, connection::Tune) {
        let mut raw = self.raw().await;
        let tune = raw
            .handshake(|t| (t.channel_max, t.frame_max, t.heartbeat))
            .await;
        (raw, tune)
    }

    /// Whether the child process is still running.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap();
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Send SIGTERM and wait (bounded) for the process to exit; returns its status.
    pub async fn terminate(&self) -> std::process::ExitStatus {
        self.signal_and_wait("TERM").await
    }

    /// Send SIGKILL (no chance to flush or clean up: a crash) and wait
    /// (bounded) until the process is gone and reaped; returns its status.
    pub async fn kill9(&self) -> std::process::ExitStatus {
        self.signal_and_wait("KILL").await
    }

    async fn signal_and_wait(&self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|error| panic!("run kill -{signal}: {error}"));
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status:?}",
            self.pid
        );
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            {
                let mut guard = self.child.lock().unwrap();
                let child = guard.as_mut().expect("broker child already reaped");
                if let Some(status) = child.try_wait().expect("try_wait on broker") {
                    return status;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "warren did not exit within {SHUTDOWN_TIMEOUT:?} of SIG{signal}; stderr:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Send SIGTERM and assert the broker exits cleanly with status 0.
    pub async fn terminate_and_assert_clean_exit(&self) {
        let status = self.terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "warren did not exit cleanly after SIGTERM: {status:?}; stderr:\n{}",
            self.log()
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut guard| guard.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== warren stderr (addr {}) =====\n{}\n===== end of warren stderr =====",
                self.addr,
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// ---------------------------------------------------------------------------
// lapin helpers
// ---------------------------------------------------------------------------

/// Await `fut` for at most [`EVENT_TIMEOUT`], panicking with `what` otherwise.
/// Resident memory of a process, from /proc.
pub fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(EVENT_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {EVENT_TIMEOUT:?} waiting for {what}"),
    }
}

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn amqp_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Assert that `res` failed with an AMQP error carrying `code`.
#[track_caller]
pub fn assert_amqp_error<T: std::fmt::Debug>(res: lapin::Result<T>, code: u16, what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected AMQP error {code}, got success: {v:?}"),
        Err(e) => assert_eq!(
            amqp_code(&e),
            Some(code),
            "{what}: expected AMQP error {code}, got: {e} ({e:?})"
        ),
    }
}

pub type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Subscribe to a connection's events (must be done before the event happens).
pub fn events(conn: &Connection) -> Events {
    Box::pin(conn.events_listener())
}

/// Wait until the connection reports an error event with the given AMQP code
/// (lapin reports every server-initiated channel close as such an event).
pub async fn expect_error_event(events: &mut Events, code: u16, what: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Event::Error(e))) => {
                if amqp_code(&e) == Some(code) {
                    return;
                }
                seen.push(format!("{e}"));
            }
            Ok(Some(other)) => seen.push(format!("{other:?}")),
            Ok(None) => panic!("{what}: event stream ended before error {code}; saw {seen:?}"),
            Err(_) => panic!(
                "{what}: no error event with code {code} within {EVENT_TIMEOUT:?}; saw {seen:?}"
            ),
        }
    }
}

/// Receive the next delivery from a consumer within [`EVENT_TIMEOUT`].
pub async fn next_delivery(consumer: &mut lapin::Consumer, what: &str) -> lapin::message::Delivery {
    match tokio::time::timeout(EVENT_TIMEOUT, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: consumer error: {e}"),
        Ok(None) => panic!("{what}: consumer was cancelled"),
        Err(_) => panic!("{what}: no delivery within {EVENT_TIMEOUT:?}"),
    }
}

/// Assert that the consumer yields nothing for `quiet` (used only to check that
/// something the broker must NOT send is not sent; positive events always use
/// [`EVENT_TIMEOUT`]).
pub async fn assert_no_delivery(consumer: &mut lapin::Consumer, quiet: Duration, what: &str) {
    if let Ok(item) = tokio::time::timeout(quiet, consumer.next()).await {
        match item {
            Some(Ok(d)) => panic!(
                "{what}: unexpected delivery tag={} body={:?}",
                d.delivery_tag,
                String::from_utf8_lossy(&d.data)
            ),
            Some(Err(e)) => panic!("{what}: unexpected consumer error {e}"),
            None => panic!("{what}: consumer unexpectedly cancelled"),
        }
    }
}

pub fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

pub fn lstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// String content of a (short or long) string field value.
pub fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Raw AMQP client
// ---------------------------------------------------------------------------

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Why a raw read did not produce a frame.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the socket (EOF or reset).
    Closed,
    /// Nothing complete arrived in time.
    Timeout,
    /// Bytes arrived that are not a valid frame.
    Malformed(String),
}

/// A raw AMQP connection (no client-side protocol logic beyond framing).
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// Encode one frame with amq-protocol's generator.
pub fn encode_frame(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = WriteContext::from(Vec::new());
    let (bytes, _len) = gen_frame(frame)(ctx)
        .unwrap_or_else(|e| panic!("encode {frame:?}: {e:?}"))
        .into_inner();
    bytes
}

pub fn method_frame(channel: u16, class: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(channel, class)
}

pub fn header_frame(channel: u16, body_size: u64) -> AMQPFrame {
    AMQPFrame::Header(
        channel,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: BasicProperties::default(),
        },
    )
}

pub fn publish_method(exchange: &str, routing_key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    }))
}

fn is_closed_err(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
    )
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = within("raw TCP connect", TcpStream::connect(addr))
            .await
            .expect("raw TCP connect");
        stream.set_nodelay(true).ok();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Write bytes; a failure because the peer already closed is ignored (the
    /// following read will report `Closed`).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        match self.stream.write_all(bytes).await {
            Ok(()) => {}
            Err(e) if is_closed_err(&e) => {}
            Err(e) => panic!("raw write failed: {e}"),
        }
    }

    pub async fn send_frame(&mut self, frame: &AMQPFrame) {
        let bytes = encode_frame(frame);
        self.send_bytes(&bytes).await;
    }

    pub async fn send_method(&mut self, channel: u16, class: AMQPClass) {
        self.send_frame(&AMQPFrame::Method(channel, class)).await;
    }

    /// Read more bytes into the buffer; Ok(false) on EOF.
    async fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Ok(Err(e)) if is_closed_err(&e) => Err(ReadError::Closed),
            Ok(Err(e)) => Err(ReadError::Malformed(format!("io error: {e}"))),
        }
    }

    async fn fill_to(&mut self, n: usize, deadline: Instant) -> Result<(), ReadError> {
        while self.buf.len() < n {
            self.fill(deadline).await?;
        }
        Ok(())
    }

    /// Read exactly `n` raw bytes.
    pub async fn read_exact_bytes(
        &mut self,
        n: usize,
        within: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        let deadline = Instant::now() + within;
        self.fill_to(n, deadline).await?;
        Ok(self.buf.drain(..n).collect())
    }

    /// Read everything until the peer closes (or the time runs out).
    pub async fn read_to_close(&mut self, within: Duration) -> Result<Vec<u8>, ReadError> {
        let deadline = Instant::now() + within;
        loop {
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(ReadError::Closed) => return Ok(std::mem::take(&mut self.buf)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Read one frame (heartbeats included) within `within`.
    pub async fn read_frame_within(&mut self, within: Duration) -> Result<AMQPFrame, ReadError> {
        let deadline = Instant::now() + within;
        self.fill_to(1, deadline).await?;
        if self.buf[0] == b'A' {
            // A protocol header (server refusing our version).
            self.fill_to(8, deadline).await?;
            let bytes: Vec<u8> = self.buf.drain(..8).collect();
            return match parse_frame(bytes.as_slice()) {
                Ok((_, frame)) => Ok(frame),
                Err(e) => Err(ReadError::Malformed(format!("{e:?}: {bytes:?}"))),
            };
        }
        self.fill_to(7, deadline).await?;
        let size =
            u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]) as usize;
        let total = 7 + size + 1;
        self.fill_to(total, deadline).await?;
        let bytes: Vec<u8> = self.buf.drain(..total).collect();
        if bytes[total - 1] != 0xCE {
            return Err(ReadError::Malformed(format!(
                "bad frame end byte {:#x}",
                bytes[total - 1]
            )));
        }
        match parse_frame(bytes.as_slice()) {
            Ok(([], frame)) => Ok(frame),
            Ok((rest, _)) => Err(ReadError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            ))),
            Err(e) => Err(ReadError::Malformed(format!("{e:?}"))),
        }
    }

    pub async fn read_frame(&mut self) -> Result<AMQPFrame, ReadError> {
        self.read_frame_within(EVENT_TIMEOUT).await
    }

    /// Read the next non-heartbeat frame, panicking on error.
    pub async fn expect_frame(&mut self, what: &str) -> AMQPFrame {
        loop {
            match self.read_frame().await {
                Ok(AMQPFrame::Heartbeat) => continue,
                Ok(f) => return f,
                Err(e) => panic!("{what}: expected a frame, got {e:?}"),
            }
        }
    }

    /// Read the next non-heartbeat frame, which must be a method; return it.
    pub async fn expect_method(&mut self, what: &str) -> (u16, AMQPClass) {
        match self.expect_frame(what).await {
            AMQPFrame::Method(ch, m) => (ch, m),
            other => panic!("{what}: expected a method frame, got {other:?}"),
        }
    }

    /// Full client handshake as guest/guest on vhost "/". `tune_ok` maps the
    /// server's Tune to the (channel_max, frame_max, heartbeat) we answer with.
    pub async fn handshake(
        &mut self,
        tune_ok: impl FnOnce(&connection::Tune) -> (u16, u32, u16),
    ) -> connection::Tune {
        self.handshake_as("guest", "guest", "/", tune_ok).await
    }

    pub async fn handshake_as(
        &mut self,
        user: &str,
        password: &str,
        vhost: &str,
        tune_ok: impl FnOnce(&connection::Tune) -> (u16, u32, u16),
    ) -> connection::Tune {
        let _start = self.start().await;
        self.start_ok(user, password).await;
        let tune = match self.expect_method("connection.tune").await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        let (channel_max, frame_max, heartbeat) = tune_ok(&tune);
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        )
        .await;
        match self.expect_method("connection.open-ok").await {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        tune
    }

    /// Send the protocol header and read connection.start.
    pub async fn start(&mut self) -> connection::Start {
        self.send_bytes(PROTOCOL_HEADER).await;
        match self.expect_method("connection.start").await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    pub async fn start_ok(&mut self, user: &str, password: &str) {
        let mut caps = FieldTable::default();
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        let mut props = FieldTable::default();
        props.insert("product".into(), lstr("warren-raw-test"));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let response: LongString = format!("\0{user}\0{password}").into_bytes().into();
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: ShortString::from("PLAIN"),
                response,
                locale: "en_US".into(),
            })),
        )
        .await;
    }

    pub async fn open_channel(&mut self, id: u16) {
        self.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.expect_method("channel.open-ok").await {
            (ch, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if ch == id => {}
            other => panic!("expected channel.open-ok on {id}, got {other:?}"),
        }
    }

    /// Wait for connection.close (skipping other frames), assert its reply code,
    /// answer close-ok and assert the server then closes the socket.
    pub async fn expect_connection_close(&mut self, code: u16, what: &str) -> connection::Close {
        let mut skipped = Vec::new();
        let close = loop {
            match self.read_frame().await {
                Ok(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) => {
                    break c;
                }
                Ok(other) => skipped.push(format!("{other:?}")),
                Err(e) => panic!(
                    "{what}: expected connection.close {code}, got {e:?} (frames before: {skipped:?})"
                ),
            }
        };
        assert_eq!(
            close.reply_code, code,
            "{what}: connection.close reply code (text: {:?})",
            close.reply_text
        );
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        self.expect_socket_closed(what).await;
        close
    }

    /// Wait for channel.close on `ch` (skipping other frames) and assert its code;
    /// answers channel.close-ok.
    pub async fn expect_channel_close(&mut self, ch: u16, code: u16, what: &str) -> channel::Close {
        let mut skipped = Vec::new();
        let close = loop {
            match self.read_frame().await {
                Ok(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::Close(close))))
                    if c == ch =>
                {
                    break close;
                }
                Ok(other) => skipped.push(format!("{other:?}")),
                Err(e) => panic!(
                    "{what}: expected channel.close {code}, got {e:?} (frames before: {skipped:?})"
                ),
            }
        };
        assert_eq!(
            close.reply_code, code,
            "{what}: channel.close reply code (text: {:?})",
            close.reply_text
        );
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        )
        .await;
        close
    }

    /// Assert the server closes the socket (skipping any frames) within the timeout.
    pub async fn expect_socket_closed(&mut self, what: &str) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame_within(left).await {
                Err(ReadError::Closed) => return,
                Err(ReadError::Timeout) => {
                    panic!("{what}: server did not close the socket within {EVENT_TIMEOUT:?}")
                }
                Err(ReadError::Malformed(_)) | Ok(_) => continue,
            }
        }
    }
}

/// After a misbehaving client, check that the broker still serves a normal
/// lapin client (it survived and still routes messages).
pub async fn assert_broker_alive(broker: &Broker) {
    assert!(
        broker.is_running(),
        "broker process exited; stderr:\n{}",
        broker.log()
    );
    let conn = broker.connect().await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    let q = within(
        "queue_declare",
        ch.queue_declare("".into(), Default::default(), FieldTable::default()),
    )
    .await
    .expect("queue_declare on a fresh connection");
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            q.name().clone(),
            Default::default(),
            b"alive",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    // basic.get right after publish on the same channel: the broker handles a
    // channel's commands in order, so the message is already enqueued.
    let got = within(
        "basic_get",
        ch.basic_get(q.name().clone(), Default::default()),
    )
    .await
    .expect("basic_get");
    let got = got.expect("message published on a fresh connection is gettable");
    assert_eq!(got.delivery.data, b"alive");
    let _ = within("close", conn.close(200, "bye".into())).await;
}

// ----- lapin helpers shared by the feature tests -----

pub async fn new_channel(conn: &Connection) -> Channel {
    within("create_channel", conn.create_channel())
        .await
        .expect("create_channel")
}

/// Declares a plain (non-durable) queue.
pub async fn declare(ch: &Channel, name: &str) {
    within(
        "queue_declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare {name}: {e}"));
}

pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    within(
        "passive declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
    .message_count()
}
