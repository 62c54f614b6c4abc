//! Crash recovery: confirmed persistent messages on a durable queue survive
//! SIGKILL of the broker.
//!
//! Two publishers (publisher confirms, persistent messages, each body a unique
//! id) and two consumers (manual ack, prefetch) run against a durable queue
//! while the broker is killed with SIGKILL and restarted on the same data
//! directory, over and over. Afterwards the queue is drained and the test
//! checks:
//!
//! 1. nothing confirmed was lost: every id whose publisher confirm was an ack
//!    was delivered at least once;
//! 2. nothing was invented: every delivered id is one a publisher sent
//!    (confirmed, nacked, or unconfirmed when the broker died);
//! 3. every duplicate delivery (an id delivered before) had `redelivered` set.
//!
//! Environment knobs: `WARREN_CRASH_SEED` (u64; printed on every run, so a
//! failure can be replayed) and `WARREN_CRASH_ROUNDS` (default 20). Each
//! broker generation's stderr is written under
//! `$CARGO_TARGET_TMPDIR/crash_recovery-<seed>/`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::common::*;
use futures_lite::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
    options::*, types::FieldTable,
};

const QUEUE: &str = "crash.q";
const PUBLISHERS: usize = 2;
const CONSUMERS: usize = 2;
/// Most publisher confirms a publisher keeps outstanding.
const CONFIRM_WINDOW: usize = 64;
const PREFETCH: u16 = 50;
/// Most messages a publisher sends on one connection (one broker generation).
const MAX_PER_SESSION: usize = 10_000;
const DEFAULT_ROUNDS: u64 = 20;
/// Traffic runs for a random time in this range (ms) before each kill.
const TRAFFIC_MS: (u64, u64) = (100, 600);
/// Time limit on any single client operation against a live broker.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long clients get to reconnect after a restart.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// How long a client task gets to finish after it is told to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long the final drain may take.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// The drain is over when the queue is empty and nothing was delivered for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------

/// xorshift64*: small, seeded, good enough for picking durations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------
// State shared between the driver and the client tasks
// ---------------------------------------------------------------------------

/// Where clients should connect: broker `generation` on `port`, and
/// whether it is up (the driver clears `up` before each SIGKILL, so a client
/// never retries a dead generation's port, which another process could
/// have been given in the meantime).
#[derive(Clone, Copy, Debug)]
struct Target {
    generation: u64,
    port: u16,
    up: bool,
}

#[derive(Debug)]
struct Delivered {
    id: String,
    redelivered: bool,
    /// Broker generation it was delivered by.
    generation: u64,
    /// Consumer index; `usize::MAX` for the final basic.get sweep.
    consumer: usize,
}

struct Shared {
    target: Mutex<Target>,
    stop_publishing: AtomicBool,
    stop_consuming: AtomicBool,
    /// Per client (publishers first, then consumers): the generation it is
    /// currently connected to and running on, or `u64::MAX` if none.
    ready: Vec<AtomicU64>,
    /// Every id handed to `basic_publish` (recorded before the call).
    sent: Mutex<HashSet<String>>,
    /// id -> generation whose broker acked its publisher confirm.
    confirmed: Mutex<HashMap<String, u64>>,
    nacked: AtomicU64,
    /// Confirms that were neither ack nor nack (connection died, timeout).
    unconfirmed: AtomicU64,
    /// Every delivery, in the order the consumers saw them.
    deliveries: Mutex<Vec<Delivered>>,
    acks_sent: AtomicU64,
    acks_lost: AtomicU64,
    sessions: AtomicU64,
    session_errors: Mutex<Vec<String>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            target: Mutex::new(Target {
                generation: 0,
                port: 0,
                up: false,
            }),
            stop_publishing: AtomicBool::new(false),
            stop_consuming: AtomicBool::new(false),
            ready: (0..PUBLISHERS + CONSUMERS)
                .map(|_| AtomicU64::new(u64::MAX))
                .collect(),
            sent: Mutex::new(HashSet::new()),
            confirmed: Mutex::new(HashMap::new()),
            nacked: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
            deliveries: Mutex::new(Vec::new()),
            acks_sent: AtomicU64::new(0),
            acks_lost: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            session_errors: Mutex::new(Vec::new()),
        }
    }

    fn target(&self) -> Target {
        *self.target.lock().unwrap()
    }

    fn set_target(&self, t: Target) {
        *self.target.lock().unwrap() = t;
    }

    fn note_error(&self, who: &str, generation: u64, err: &str) {
        let mut errs = self.session_errors.lock().unwrap();
        errs.push(format!("{who} gen {generation}: {err}"));
    }

    /// Wait until there is a live broker to connect to. After a failed
    /// session on generation `failed`, wait for a newer generation (or, if
    /// the broker that failed us is still up, retry it after a second).
    /// Returns `None` once `stop` is set.
    async fn wait_for_broker(
        &self,
        failed: Option<(u64, Instant)>,
        stop: &AtomicBool,
    ) -> Option<Target> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            let t = self.target();
            let fresh = match failed {
                None => true,
                Some((g, at)) => t.generation > g || at.elapsed() > Duration::from_secs(1),
            };
            if t.up && fresh {
                return Some(t);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn connect(port: u16) -> Result<Connection, String> {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    match tokio::time::timeout(
        OP_TIMEOUT,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out".to_string()),
    }
}

async fn op<T>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {OP_TIMEOUT:?}")),
    }
}

/// Resolves once lapin no longer considers `conn` connected.
async fn lost(conn: &Connection) {
    while conn.status().connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`op`], but gives up as soon as the connection is lost: some lapin
/// futures (acks, publishes) are never resolved once the socket is gone. A
/// result that is already there is still taken.
async fn op_on<T>(
    conn: &Connection,
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    tokio::select! {
        biased;
        r = op(what, fut) => r,
        () = lost(conn) => Err(format!("{what}: connection lost")),
    }
}

async fn declare_durable(ch: &Channel) -> Result<lapin::Queue, String> {
    op(
        "queue_declare crash.q durable",
        ch.queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

// ---------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------

/// Wait for one publisher confirm (at most `limit`, and not past the loss of
/// the connection; an already-settled one is taken even then) and record
/// it. Returns an error description when it is neither ack nor nack.
async fn settle(
    shared: &Shared,
    conn: &Connection,
    generation: u64,
    id: String,
    confirm: PublisherConfirm,
    limit: Duration,
) -> Result<(), String> {
    let outcome = tokio::select! {
        biased;
        r = tokio::time::timeout(limit, confirm) => match r {
            Ok(r) => r.map_err(|e| format!("confirm of {id}: {e}")),
            Err(_) => Err(format!("confirm of {id}: no answer within {limit:?}")),
        },
        () = lost(conn) => Err(format!("confirm of {id}: connection lost")),
    };
    match outcome {
        Ok(Confirmation::Ack(_)) => {
            shared.confirmed.lock().unwrap().insert(id, generation);
            Ok(())
        }
        Ok(Confirmation::Nack(_)) => {
            shared.nacked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Ok(Confirmation::NotRequested) => {
            panic!("publisher confirm for {id} says confirms were not requested (test bug)")
        }
        Err(e) => {
            shared.unconfirmed.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// One connection's worth of publishing. `Ok` when stopped on request.
async fn publish_session(
    p: usize,
    t: Target,
    shared: &Shared,
    next: &mut u64,
) -> Result<(), String> {
    let conn = connect(t.port).await?;
    let ch = op("create_channel", conn.create_channel()).await?;
    op(
        "confirm_select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    declare_durable(&ch).await?;
    shared.ready[p].store(t.generation, Ordering::SeqCst);

    let mut window: VecDeque<(String, PublisherConfirm)> = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut published = 0usize;
    let result = loop {
        if shared.stop_publishing.load(Ordering::SeqCst) {
            break Ok(());
        }
        if published >= MAX_PER_SESSION {
            // Enough for one broker generation (keeps the total bounded when
            // a round runs long): settle everything, then wait for the
            // crash or the stop.
            let mut settled = Ok(());
            while let Some((id, confirm)) = window.pop_front() {
                settled = settle(shared, &conn, t.generation, id, confirm, OP_TIMEOUT).await;
                if settled.is_err() {
                    break;
                }
            }
            if let Err(e) = settled {
                break Err(e);
            }
            while !shared.stop_publishing.load(Ordering::SeqCst) && conn.status().connected() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if shared.stop_publishing.load(Ordering::SeqCst) {
                break Ok(());
            }
            break Err("connection lost (while idle after the per-session cap)".to_string());
        }
        if window.len() >= CONFIRM_WINDOW {
            let (id, confirm) = window.pop_front().unwrap();
            if let Err(e) = settle(shared, &conn, t.generation, id, confirm, OP_TIMEOUT).await {
                break Err(e);
            }
        }
        let id = format!("p{p}-{next}");
        *next += 1;
        published += 1;
        // Recorded before the call: once basic_publish is called, the message
        // may reach the broker whatever the call reports.
        shared.sent.lock().unwrap().insert(id.clone());
        let publish = ch.basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            id.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        );
        match op_on(&conn, "basic_publish", publish).await {
            Ok(confirm) => window.push_back((id, confirm)),
            Err(e) => {
                shared.unconfirmed.fetch_add(1, Ordering::Relaxed);
                break Err(e);
            }
        }
    };
    shared.ready[p].store(u64::MAX, Ordering::SeqCst);

    // Settle what is still outstanding. After a clean stop the broker is up
    // and answers; after a failure lapin has already failed the pending
    // confirms (or the broker is wedged), so only take what is settled.
    let deadline = Instant::now()
        + if result.is_ok() {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(200)
        };
    for (id, confirm) in window.drain(..) {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = settle(shared, &conn, t.generation, id, confirm, left).await;
    }
    if result.is_ok() {
        let _ = tokio::time::timeout(OP_TIMEOUT, conn.close(200, "bye".into())).await;
    }
    result
}

async fn publisher(p: usize, shared: Arc<Shared>) {
    let mut next = 0u64;
    let mut failed = None;
    while let Some(t) = shared
        .wait_for_broker(failed, &shared.stop_publishing)
        .await
    {
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        match publish_session(p, t, &shared, &mut next).await {
            Ok(()) => break,
            Err(e) => {
                shared.note_error(&format!("publisher {p}"), t.generation, &e);
                failed = Some((t.generation, Instant::now()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Consumer
// ---------------------------------------------------------------------------

/// One connection's worth of consuming. `Ok` when stopped on request.
async fn consume_session(c: usize, t: Target, shared: &Shared) -> Result<(), String> {
    let slot = PUBLISHERS + c;
    let conn = connect(t.port).await?;
    let ch = op("create_channel", conn.create_channel()).await?;
    op(
        "basic_qos",
        ch.basic_qos(PREFETCH, BasicQosOptions::default()),
    )
    .await?;
    declare_durable(&ch).await?;
    let mut consumer = op(
        "basic_consume",
        ch.basic_consume(
            QUEUE.into(),
            format!("c{c}-gen{}", t.generation).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    shared.ready[slot].store(t.generation, Ordering::SeqCst);

    let result = loop {
        if shared.stop_consuming.load(Ordering::SeqCst) {
            break Ok(());
        }
        let delivery = match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
        {
            Err(_) => continue,
            Ok(None) => break Err("consumer stream ended".to_string()),
            Ok(Some(Err(e))) => break Err(format!("consumer: {e}")),
            Ok(Some(Ok(d))) => d,
        };
        shared.deliveries.lock().unwrap().push(Delivered {
            id: String::from_utf8_lossy(&delivery.data).into_owned(),
            redelivered: delivery.redelivered,
            generation: t.generation,
            consumer: c,
        });
        // The acker belongs to this channel; if the broker died, the ack
        // fails (or is never processed) and the message may come back
        // redelivered, which is allowed. It is never sent on a later
        // connection, where its delivery tag would mean something else.
        match op_on(
            &conn,
            "basic_ack",
            delivery.acker.ack(BasicAckOptions::default()),
        )
        .await
        {
            Ok(_) => shared.acks_sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => shared.acks_lost.fetch_add(1, Ordering::Relaxed),
        };
    };
    shared.ready[slot].store(u64::MAX, Ordering::SeqCst);
    if result.is_ok() {
        // connection.close is answered after the broker has handled every
        // ack sent before it; unacked deliveries go back to the queue.
        op("connection close", conn.close(200, "bye".into())).await?;
    }
    result
}

async fn consumer(c: usize, shared: Arc<Shared>) {
    let mut failed = None;
    while let Some(t) = shared.wait_for_broker(failed, &shared.stop_consuming).await {
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        match consume_session(c, t, &shared).await {
            Ok(()) => break,
            Err(e) => {
                shared.note_error(&format!("consumer {c}"), t.generation, &e);
                failed = Some((t.generation, Instant::now()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
    )
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn save_log(dir: &Path, generation: u64, broker: &Broker) -> PathBuf {
    let path = dir.join(format!("gen-{generation:02}.log"));
    let _ = std::fs::write(&path, broker.log());
    path
}

/// Wait until every client runs on `generation`; returns the clients that do not.
async fn wait_ready(
    shared: &Shared,
    generation: u64,
    clients: std::ops::Range<usize>,
) -> Vec<usize> {
    let deadline = Instant::now() + RECONNECT_DEADLINE;
    loop {
        let missing: Vec<usize> = clients
            .clone()
            .filter(|&i| shared.ready[i].load(Ordering::SeqCst) != generation)
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn client_name(i: usize) -> String {
    if i < PUBLISHERS {
        format!("publisher {i}")
    } else {
        format!("consumer {}", i - PUBLISHERS)
    }
}

async fn passive_count(ch: &Channel) -> u32 {
    let q = within(
        "passive queue_declare crash.q",
        ch.queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive queue_declare crash.q");
    q.message_count()
}

/// The fields of the broker's "durable state recovered" log line (if it
/// logs one), without the data directory, for the per-round progress line.
fn recovery_note(log: &str) -> String {
    const MARKER: &str = "durable state recovered";
    let Some(line) = log.lines().find(|l| l.contains(MARKER)) else {
        return String::new();
    };
    let fields = line
        .split_whitespace()
        .filter(|w| w.contains('=') && !w.starts_with("data_dir="))
        .collect::<Vec<_>>()
        .join(" ");
    format!("; recovered: {fields}")
}

/// Lines of a log that look like warnings or errors.
fn interesting_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_messages_survive_sigkill() {
    let started = Instant::now();
    let seed = env_u64("WARREN_CRASH_SEED")
        .unwrap_or_else(|| (now_nanos() as u64) ^ u64::from(std::process::id()));
    let rounds = env_u64("WARREN_CRASH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    println!("crash_recovery: seed {seed} (replay with WARREN_CRASH_SEED={seed}), {rounds} rounds");
    let mut rng = Rng::new(seed);

    let data_dir = std::env::temp_dir().join(format!(
        "warren-crash-recovery-{}-{}",
        std::process::id(),
        now_nanos()
    ));
    std::fs::create_dir_all(&data_dir).expect("create data dir");
    let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("crash_recovery-{seed}"));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir).expect("create log dir");
    println!(
        "crash_recovery: data dir {}, broker logs in {}",
        data_dir.display(),
        log_dir.display()
    );

    let shared = Arc::new(Shared::new());
    let mut broker = Broker::start_in(&data_dir, None).await;
    let mut generation = 0u64;
    shared.set_target(Target {
        generation,
        port: broker.port(),
        up: true,
    });

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        publishers.push(tokio::spawn(publisher(p, shared.clone())));
    }
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        consumers.push(tokio::spawn(consumer(c, shared.clone())));
    }
    let missing = wait_ready(&shared, generation, 0..PUBLISHERS + CONSUMERS).await;
    assert!(
        missing.is_empty(),
        "clients {:?} could not connect to the first broker within {RECONNECT_DEADLINE:?}; errors: {:?}\nbroker stderr:\n{}",
        missing.iter().map(|&i| client_name(i)).collect::<Vec<_>>(),
        shared.session_errors.lock().unwrap(),
        broker.log()
    );

    let mut restart_times = Vec::new();
    for round in 1..=rounds {
        let traffic = rng.range(TRAFFIC_MS.0, TRAFFIC_MS.1);
        tokio::time::sleep(Duration::from_millis(traffic)).await;

        shared.set_target(Target {
            up: false,
            ..shared.target()
        });
        let status = broker.kill9().await;
        assert!(
            status.code().is_none(),
            "round {round}: broker had already exited ({status:?}) before SIGKILL; stderr:\n{}",
            broker.log()
        );
        // Let the stderr reader take the last lines before saving them.
        tokio::time::sleep(Duration::from_millis(20)).await;
        save_log(&log_dir, generation, &broker);

        let t0 = Instant::now();
        broker = Broker::start_in(&data_dir, None).await;
        let restart = t0.elapsed();
        restart_times.push(restart);
        generation += 1;
        shared.set_target(Target {
            generation,
            port: broker.port(),
            up: true,
        });
        let missing = wait_ready(&shared, generation, 0..PUBLISHERS + CONSUMERS).await;
        let (sent, confirmed, delivered) = (
            shared.sent.lock().unwrap().len(),
            shared.confirmed.lock().unwrap().len(),
            shared.deliveries.lock().unwrap().len(),
        );
        println!(
            "round {round:2}: traffic {traffic:3} ms, SIGKILL, restart {:4} ms, reconnect {:4} ms; sent {sent}, confirmed {confirmed}, delivered {delivered}{}{}",
            restart.as_millis(),
            (t0.elapsed() - restart).as_millis(),
            recovery_note(&broker.log()),
            if missing.is_empty() {
                String::new()
            } else {
                format!(
                    "; NOT reconnected: {:?}",
                    missing.iter().map(|&i| client_name(i)).collect::<Vec<_>>()
                )
            }
        );
    }

    // Stop publishing; outstanding confirms from the last generation settle.
    shared.stop_publishing.store(true, Ordering::SeqCst);
    for (p, h) in publishers.into_iter().enumerate() {
        match tokio::time::timeout(STOP_DEADLINE, h).await {
            Ok(res) => res.unwrap_or_else(|e| panic!("publisher {p} task: {e}")),
            Err(_) => panic!("publisher {p} did not stop within {STOP_DEADLINE:?}"),
        }
    }

    // Drain: consumers run until the queue is empty and they have been quiet.
    let monitor = broker.connect().await;
    let mon = within("create_channel", monitor.create_channel())
        .await
        .expect("monitor channel");
    let drain_start = Instant::now();
    let mut last_len = usize::MAX;
    let mut quiet_since = Instant::now();
    let drained = loop {
        let ready = passive_count(&mon).await;
        let len = shared.deliveries.lock().unwrap().len();
        if len != last_len {
            last_len = len;
            quiet_since = Instant::now();
        }
        if ready == 0 && quiet_since.elapsed() >= DRAIN_QUIET {
            break true;
        }
        if drain_start.elapsed() >= DRAIN_DEADLINE {
            println!("drain: deadline {DRAIN_DEADLINE:?} passed with {ready} messages ready");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shared.stop_consuming.store(true, Ordering::SeqCst);
    for (c, h) in consumers.into_iter().enumerate() {
        match tokio::time::timeout(STOP_DEADLINE, h).await {
            Ok(res) => res.unwrap_or_else(|e| panic!("consumer {c} task: {e}")),
            Err(_) => panic!("consumer {c} did not stop within {STOP_DEADLINE:?}"),
        }
    }

    // The consumers closed their connections, so anything still unacked is
    // back in the queue: take it with basic.get (recorded like deliveries).
    let mut swept = 0u64;
    let sweep_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < sweep_deadline {
        let got = within(
            "basic_get",
            mon.basic_get(QUEUE.into(), BasicGetOptions::default()),
        )
        .await
        .expect("basic_get crash.q");
        let Some(msg) = got else { break };
        shared.deliveries.lock().unwrap().push(Delivered {
            id: String::from_utf8_lossy(&msg.delivery.data).into_owned(),
            redelivered: msg.delivery.redelivered,
            generation,
            consumer: usize::MAX,
        });
        within(
            "basic_ack",
            msg.delivery.acker.ack(BasicAckOptions::default()),
        )
        .await
        .expect("basic_ack of basic.get message");
        swept += 1;
    }
    let final_ready = passive_count(&mon).await;
    let _ = within("monitor close", monitor.close(200, "bye".into())).await;
    let broker_alive = broker.is_running();

    // ---------------------------------------------------------------------
    // Verdict
    // ---------------------------------------------------------------------
    let sent = shared.sent.lock().unwrap().clone();
    let confirmed = shared.confirmed.lock().unwrap().clone();
    let mut deliveries = std::mem::take(&mut *shared.deliveries.lock().unwrap());
    // Judge duplicates in broker order. Within one generation the recording
    // order is the delivery order (a message comes back only after the
    // connection it went to is gone, and a consumer records everything it
    // took before it drops its connection). Across generations it need not
    // be: a consumer may still be working through what it received from a
    // dead broker while another one already gets the redeliveries from the
    // new one. The sort is stable.
    deliveries.sort_by_key(|d| d.generation);

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = 0u64;
    let mut redelivered_flags = 0u64;
    let mut bad_duplicates = Vec::new();
    let mut unknown = Vec::new();
    for (i, d) in deliveries.iter().enumerate() {
        if d.redelivered {
            redelivered_flags += 1;
        }
        if !sent.contains(&d.id) {
            unknown.push(format!(
                "{:?} (delivery #{i}, gen {}, consumer {})",
                d.id, d.generation, d.consumer
            ));
        }
        if let Some(&first) = seen.get(d.id.as_str()) {
            duplicates += 1;
            if !d.redelivered {
                let f = &deliveries[first];
                bad_duplicates.push(format!(
                    "{} delivered again without redelivered: delivery #{i} (gen {}, consumer {}); first delivery #{first} (gen {}, consumer {}, redelivered {})",
                    d.id, d.generation, d.consumer, f.generation, f.consumer, f.redelivered
                ));
            }
        } else {
            seen.insert(&d.id, i);
        }
    }
    let mut lost: Vec<(&String, u64)> = confirmed
        .iter()
        .filter(|(id, _)| !seen.contains_key(id.as_str()))
        .map(|(id, g)| (id, *g))
        .collect();
    lost.sort_by_key(|(id, g)| (*g, (*id).clone()));
    let maybe_published = sent.len() - confirmed.len();
    let maybe_delivered = seen
        .keys()
        .filter(|id| !confirmed.contains_key(**id) && sent.contains(**id))
        .count();

    let avg_restart =
        restart_times.iter().sum::<Duration>().as_millis() / restart_times.len().max(1) as u128;
    let max_restart = restart_times
        .iter()
        .max()
        .copied()
        .unwrap_or_default()
        .as_millis();
    println!("crash_recovery results (seed {seed}):");
    println!(
        "  restarts (SIGKILL)      {rounds}  (restart avg {avg_restart} ms, max {max_restart} ms)"
    );
    println!("  published (sent)        {}", sent.len());
    println!("  confirmed (ack)         {}", confirmed.len());
    println!(
        "  nacked                  {}",
        shared.nacked.load(Ordering::Relaxed)
    );
    println!(
        "  unconfirmed at crash    {}",
        shared.unconfirmed.load(Ordering::Relaxed)
    );
    println!(
        "  maybe published         {maybe_published}  (of which delivered: {maybe_delivered})"
    );
    println!(
        "  deliveries              {}  (swept by basic.get: {swept})",
        deliveries.len()
    );
    println!("  distinct ids delivered  {}", seen.len());
    println!(
        "  duplicates              {duplicates}  (deliveries with redelivered set: {redelivered_flags})"
    );
    println!(
        "  acks sent / lost        {} / {}",
        shared.acks_sent.load(Ordering::Relaxed),
        shared.acks_lost.load(Ordering::Relaxed)
    );
    println!(
        "  client sessions         {}  (ended by error: {})",
        shared.sessions.load(Ordering::Relaxed),
        shared.session_errors.lock().unwrap().len()
    );
    println!("  drained                 {drained}, final ready count {final_ready}");
    println!("  LOST confirmed          {}", lost.len());
    println!("  unknown ids delivered   {}", unknown.len());
    println!("  duplicates w/o redelivered {}", bad_duplicates.len());
    println!(
        "  elapsed                 {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let final_log_path = save_log(&log_dir, generation, &broker);
    let mut failures = Vec::new();
    if !lost.is_empty() {
        let mut by_gen: Vec<(u64, usize)> = Vec::new();
        for (_, g) in &lost {
            match by_gen.last_mut() {
                Some((lg, n)) if lg == g => *n += 1,
                _ => by_gen.push((*g, 1)),
            }
        }
        failures.push(format!(
            "1. {} confirmed messages were never delivered (lost). Lost per generation that confirmed them: {by_gen:?}. First ones: {:?}",
            lost.len(),
            lost.iter().take(20).map(|(id, g)| format!("{id} (gen {g})")).collect::<Vec<_>>()
        ));
    }
    if !unknown.is_empty() {
        failures.push(format!(
            "2. {} deliveries carry ids no publisher sent. First ones: {:?}",
            unknown.len(),
            &unknown[..unknown.len().min(20)]
        ));
    }
    if !bad_duplicates.is_empty() {
        failures.push(format!(
            "3. {} duplicate deliveries had redelivered == false. First ones: {:?}",
            bad_duplicates.len(),
            &bad_duplicates[..bad_duplicates.len().min(20)]
        ));
    }
    if final_ready != 0 {
        failures.push(format!(
            "queue not empty after the drain: {final_ready} messages ready"
        ));
    }
    if !broker_alive {
        failures.push("the last broker exited on its own".to_string());
    }

    if failures.is_empty() {
        drop(broker); // kills it before its data directory goes
        let _ = std::fs::remove_dir_all(&data_dir);
        let _ = std::fs::remove_dir_all(&log_dir);
        return;
    }

    let errors = shared.session_errors.lock().unwrap();
    let mut diag = String::new();
    diag.push_str(&format!(
        "client session errors (first 20 of {}):\n",
        errors.len()
    ));
    for e in errors.iter().take(20) {
        diag.push_str(&format!("  {e}\n"));
    }
    for g in 0..=generation {
        let path = log_dir.join(format!("gen-{g:02}.log"));
        if let Ok(log) = std::fs::read_to_string(&path) {
            let lines = interesting_lines(&log);
            if !lines.is_empty() {
                diag.push_str(&format!(
                    "broker gen {g} warnings/errors ({}):\n",
                    path.display()
                ));
                for l in lines.iter().take(20) {
                    diag.push_str(&format!("  {l}\n"));
                }
            }
        }
    }
    let final_log = broker.log();
    let tail: Vec<&str> = final_log.lines().rev().take(30).collect();
    diag.push_str(&format!(
        "last broker (gen {generation}) log tail ({}):\n",
        final_log_path.display()
    ));
    for l in tail.iter().rev() {
        diag.push_str(&format!("  {l}\n"));
    }
    panic!(
        "crash recovery failed (seed {seed}, replay with WARREN_CRASH_SEED={seed}; data dir kept at {}, broker logs in {}):\n{}\n{diag}",
        data_dir.display(),
        log_dir.display(),
        failures.join("\n")
    );
}
