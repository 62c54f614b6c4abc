//! Idle-connections mode (`--idle-connections N`): what an open, silent
//! connection with one open channel costs the broker in memory.
//!
//! The run reads the broker's RSS after a short settle and before this tool
//! opens any connection (the baseline), opens N connections with one channel
//! each, [`OPEN_CONCURRENCY`] at a time, holds them for `--idle-hold` seconds,
//! reads the RSS again while they are all still open, and only then closes
//! them. `(after - before) / N` is the cost of one idle connection with a
//! channel in the broker's own memory: its per-connection tasks, read and
//! write buffers, channel state and what the allocator keeps around them
//! (kernel socket buffers are not part of RSS). Small N overstates it: the
//! first connections also pay one-time costs (worker threads touching their
//! stacks, allocator arenas), which a thousand or more spread thin. Measure
//! on a freshly started broker: memory freed by earlier connections stays
//! in the broker's allocator and is reused, so a second run against the
//! same process shows less growth than the first.
//!
//! The client asks for the smallest frame_max AMQP allows, 4096 bytes
//! ([`FRAME_MAX_BYTES`]), unless the URL sets `?frame_max=`: lapin gives
//! every connection a send and a receive buffer of 32 frames each, zeroed up
//! front, so at the broker's usual 128 KiB frame_max this tool would hold
//! 8 MiB per idle connection (8 GiB for a thousand) and spend its time
//! zeroing them; at 4096 it is 256 KiB. An idle connection sends no frames,
//! so the broker does not pay for a larger frame_max up front: Warren only
//! checks frames against it and reads into a 64 KiB buffer that grows only
//! for a larger frame (1000 connections measured the same, within 2%, at
//! 4096 and at 131072).
//!
//! Heartbeats are left as lapin does by default: it proposes none of its own
//! and takes the interval the broker proposes in `connection.tune` (60 s for
//! both Warren and RabbitMQ). Asking for 0 would not turn them off anyway:
//! lapin treats its own 0 as "take the server's value" and answers
//! `connection.tune-ok` with it, and both brokers use what tune-ok says, so
//! heartbeats are only off when the broker proposes 0. Keeping them is also what the measurement should include, since real
//! idle clients heartbeat and the broker keeps a timer per connection for
//! them, and it keeps a long `--idle-hold` from ending with the broker
//! closing the connections for missed heartbeats. The negotiated interval is
//! in the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream;
use indicatif::ProgressBar;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection};
use serde::Serialize;

use crate::cli::Config;
use crate::client::{self, SETUP_TIMEOUT_S, redact_url, within};
use crate::error::BenchError;
use crate::progress::Progress;
use crate::report::{BrokerMemory, ConsumeTotals, PublishTotals, Report, Throughput};
use crate::rss::{self, RssGauge};
use crate::stop::Stop;

/// Connections being opened at once. Opening all N together would put N
/// handshakes in the broker's accept queue at the same moment (RabbitMQ's
/// listen backlog is 128 by default; tokio, under Warren, asks for 1024;
/// the kernel caps both at net.core.somaxconn), and connections that
/// overflow it wait for SYN retransmits, so the opening time would measure
/// the client's retries rather than the broker. 50 in flight keeps the
/// broker busy without flooding it; closing uses the same bound.
pub const OPEN_CONCURRENCY: usize = 50;

/// The client's frame_max in idle mode: AMQP's minimum (see the module
/// comment for why).
pub const FRAME_MAX_BYTES: u32 = 4096;

/// Wait before the baseline RSS read, so a broker that has just started (or
/// just served an earlier run) has finished what it was doing.
pub const SETTLE_MS: u64 = 1_000;

/// Open files this process needs besides its connections: stdio, the tokio
/// runtime's epoll and wake-up descriptors, the `/proc` status reads, the
/// JSON report.
const OPEN_FILES_MARGIN: u64 = 64;

/// How often the hold bar moves.
const HOLD_TICK_MS: u64 = 250;

/// The idle measurement, in the report's `idle` object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IdleReport {
    /// Connections that were open (each with one channel) during the hold.
    pub connections: u32,
    /// Time from the first connect to the last channel open, seconds.
    pub opened_in_s: f64,
    /// Broker RSS after the settle, before any connection (with --broker-pid).
    pub rss_before_bytes: Option<u64>,
    /// Broker RSS with every connection open, after the hold (with --broker-pid).
    pub rss_after_bytes: Option<u64>,
    /// `(rss_after_bytes - rss_before_bytes) / connections`; negative if the
    /// broker gave memory back meanwhile.
    pub bytes_per_connection: Option<f64>,
    /// Heartbeat interval the broker and lapin agreed on, seconds (0: none).
    pub heartbeat_s: u16,
    /// frame_max the broker and lapin agreed on, bytes.
    pub frame_max_bytes: u32,
}

/// Broker memory per connection: the RSS growth spread over the connections
/// that caused it, or `None` with no connections to spread it over.
pub fn bytes_per_connection(
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    connections: u32,
) -> Option<f64> {
    if connections == 0 {
        return None;
    }
    // In i128 so a shrinking RSS gives a negative figure, not a wrap-around.
    let growth_bytes = i128::from(rss_after_bytes) - i128::from(rss_before_bytes);
    Some(growth_bytes as f64 / f64::from(connections))
}

/// What to do about the soft open-file limit: nothing (`Ok(None)`), raise it
/// to `Ok(Some(new_soft))`, or give up because even the hard limit is short.
pub fn plan_open_files(soft: u64, hard: u64, needed: u64) -> Result<Option<u64>, u64> {
    if soft >= needed {
        return Ok(None);
    }
    if hard < needed {
        return Err(hard);
    }
    // Raise all the way to the hard limit rather than to `needed`: lapin and
    // the runtime open a few descriptors this count cannot foresee. An
    // unlimited hard limit (not possible for NOFILE on Linux, but on some
    // other Unixes) cannot be the soft value, so ask for what is needed.
    Ok(Some(if hard == u64::MAX { needed } else { hard }))
}

/// Makes sure this process may open `connections` sockets and returns its
/// soft open-file limit afterwards.
///
/// The soft limit is usually 1024 (shells, systemd services) while the hard
/// limit is far higher (524288 on systemd hosts). Each lapin connection holds
/// a socket, so 1000 idle connections already exceed a 1024 soft limit once
/// stdio and the runtime's descriptors are counted. Any process may raise its
/// own soft limit up to the hard limit without privileges, and Rust's
/// standard library does not do it at startup (Go's runtime does), so the
/// tool does it here; only the hard limit needs root to raise.
#[cfg(unix)]
// rlim_t is u64 on 64-bit Linux, where the conversions below are no-ops.
#[allow(clippy::useless_conversion)]
fn raise_open_files_limit(connections: u32) -> Result<u64, BenchError> {
    let needed = u64::from(connections) + OPEN_FILES_MARGIN;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on
    // this stack frame for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(BenchError::OpenFilesLimit {
            operation: "read",
            source: std::io::Error::last_os_error(),
        });
    }
    let soft = u64::from(limit.rlim_cur);
    let hard = u64::from(limit.rlim_max);
    match plan_open_files(soft, hard, needed) {
        Ok(None) => Ok(soft),
        Ok(Some(new_soft)) => {
            // At most the hard limit, which came from an rlim_t.
            limit.rlim_cur = libc::rlim_t::try_from(new_soft).unwrap_or(limit.rlim_max);
            // SAFETY: setrlimit only reads the struct it is given.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                return Err(BenchError::OpenFilesLimit {
                    operation: "raise",
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(new_soft)
        }
        Err(hard) => Err(BenchError::OpenFilesHardLimit {
            connections,
            needed,
            hard,
        }),
    }
}

#[cfg(not(unix))]
fn raise_open_files_limit(_connections: u32) -> Result<u64, BenchError> {
    Ok(u64::MAX)
}

/// One idle connection. The channel is kept (not dropped) until the
/// connection is closed: lapin closes a dropped channel by itself, and that
/// channel.close racing the connection.close fails the latter.
struct IdleConnection {
    role: String,
    connection: Connection,
    _channel: Channel,
}

/// The URI idle connections use: `url` with frame_max [`FRAME_MAX_BYTES`]
/// unless it sets its own.
pub fn idle_uri(url: &str) -> Result<AMQPUri, BenchError> {
    let mut uri: AMQPUri = url.parse().map_err(|reason| BenchError::Url {
        url: redact_url(url),
        reason,
    })?;
    uri.query.frame_max.get_or_insert(FRAME_MAX_BYTES);
    Ok(uri)
}

/// Connects and opens one channel.
async fn open_one(uri: &AMQPUri, index: u32) -> Result<IdleConnection, BenchError> {
    let role = format!("idle {index}");
    let connection = client::connect_uri(uri, &role).await?;
    let channel = within(
        &role,
        "channel.open",
        SETUP_TIMEOUT_S,
        connection.create_channel(),
    )
    .await;
    match channel {
        Ok(channel) => Ok(IdleConnection {
            role,
            connection,
            _channel: channel,
        }),
        Err(error) => {
            let _ = client::close(&connection, &role).await;
            Err(error)
        }
    }
}

/// Closes every connection, [`OPEN_CONCURRENCY`] at a time; returns one line
/// for the report if any close failed.
async fn close_all(open: &[IdleConnection]) -> Option<String> {
    let results: Vec<Result<(), BenchError>> = stream::iter(open)
        .map(|idle| client::close(&idle.connection, &idle.role))
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let mut failures = results.into_iter().filter_map(Result::err);
    let first = failures.next()?;
    let others = failures.count();
    Some(if others == 0 {
        first.with_causes()
    } else {
        format!(
            "{} and {others} more connections failed to close",
            first.with_causes()
        )
    })
}

/// Runs idle mode: `connections` connections held for `hold_s` seconds.
pub async fn run(config: &Config, connections: u32, hold_s: u64) -> Result<Report, BenchError> {
    let progress = Progress::new(config.quiet);
    let uri = idle_uri(&config.url)?;
    let open_files_max = raise_open_files_limit(connections)?;
    // Fail on a wrong PID before opening anything, not after.
    if let Some(pid) = config.broker_pid {
        rss::read_rss_bytes(pid)?;
    }

    let interrupt = Arc::new(Stop::default());
    let interrupt_watch = tokio::spawn({
        let interrupt = Arc::clone(&interrupt);
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupt.trigger();
            }
        }
    });

    let rss_before_bytes = match config.broker_pid {
        Some(pid) => {
            tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
            Some(rss::read_rss_bytes(pid)?)
        }
        None => None,
    };
    let gauge = Arc::new(RssGauge::default());
    if let Some(rss_bytes) = rss_before_bytes {
        gauge.record(rss_bytes);
    }
    let sampler_stop = Arc::new(Stop::default());
    let sampler = config.broker_pid.map(|pid| {
        tokio::spawn(rss::sample(
            pid,
            Arc::clone(&gauge),
            Arc::clone(&sampler_stop),
        ))
    });

    // Open them all, OPEN_CONCURRENCY at a time, stopping at the first
    // failure: a count short of N would measure something else.
    let open_bar = progress.bar("open", u64::from(connections));
    let open_start = Instant::now();
    let mut open: Vec<IdleConnection> = Vec::with_capacity(connections as usize);
    let mut failure = None;
    {
        let uri = &uri;
        let mut opening = stream::iter(0..connections)
            .map(|index| open_one(uri, index))
            .buffer_unordered(OPEN_CONCURRENCY);
        loop {
            tokio::select! {
                next = opening.next() => match next {
                    Some(Ok(idle)) => {
                        open.push(idle);
                        open_bar.inc(1);
                    }
                    Some(Err(error)) => {
                        failure = Some(error);
                        break;
                    }
                    None => break,
                },
                () = interrupt.triggered() => break,
            }
        }
        // Dropping the stream abandons the handshakes still in flight.
    }
    let opened_in_s = open_start.elapsed().as_secs_f64();
    open_bar.finish_and_clear();
    let opened = u32::try_from(open.len()).expect("at most `connections` (a u32) opened");

    if let Some(source) = failure {
        sampler_stop.trigger();
        interrupt_watch.abort();
        // Leave the broker tidy; the open failure is the error worth telling.
        let _ = close_all(&open).await;
        if let Some(handle) = sampler {
            let _ = handle.await;
        }
        return Err(BenchError::IdleOpen {
            opened,
            requested: connections,
            open_files_max,
            source: Box::new(source),
        });
    }

    if !interrupt.is_triggered() {
        hold(
            Duration::from_secs(hold_s),
            progress.bar("hold", hold_s * 1000),
            &interrupt,
        )
        .await;
    }

    // Measure while every connection is still open.
    let rss_after_bytes = config.broker_pid.map(|pid| {
        rss::read_rss_bytes(pid)
            .inspect(|&rss_bytes| gauge.record(rss_bytes))
            .unwrap_or_else(|_| gauge.current_bytes())
    });
    sampler_stop.trigger();
    let failed_samples = match sampler {
        Some(handle) => handle.await.unwrap_or(0),
        None => 0,
    };

    let mut errors = Vec::new();
    let dropped = open
        .iter()
        .filter(|idle| !idle.connection.status().connected())
        .count();
    if dropped > 0 {
        errors.push(format!(
            "{dropped} of {opened} idle connections were closed before the end of the \
             hold (by the broker, or for missed heartbeats); the RSS after counts fewer \
             connections than reported"
        ));
    }
    let (heartbeat_s, frame_max_bytes) = open.first().map_or((0, 0), |idle| {
        let negotiated = idle.connection.configuration();
        (negotiated.heartbeat(), negotiated.frame_max())
    });
    if let Some(error) = close_all(&open).await {
        errors.push(error);
    }
    drop(open);
    interrupt_watch.abort();

    let bytes_per_connection = match (rss_before_bytes, rss_after_bytes) {
        (Some(before), Some(after)) => bytes_per_connection(before, after, opened),
        _ => None,
    };
    Ok(Report {
        tool: "warren-bench",
        version: env!("CARGO_PKG_VERSION"),
        url: redact_url(&config.url),
        config: config.clone(),
        stale_messages_deleted: 0,
        publish: Throughput::new(0, 0.0),
        publish_totals: PublishTotals::default(),
        consume: Throughput::new(0, 0.0),
        consume_totals: ConsumeTotals::default(),
        drain_expected: None,
        drain_complete: None,
        end_to_end_latency: None,
        confirm_latency: None,
        broker_memory: config.broker_pid.map(|pid| BrokerMemory {
            pid,
            peak_rss_bytes: gauge.peak_bytes(),
            end_rss_bytes: rss_after_bytes.unwrap_or(0),
            after_prefill_rss_bytes: None,
            failed_samples,
        }),
        idle: Some(IdleReport {
            connections: opened,
            opened_in_s,
            rss_before_bytes,
            rss_after_bytes,
            bytes_per_connection,
            heartbeat_s,
            frame_max_bytes,
        }),
        stall: None,
        interrupted: interrupt.is_triggered(),
        errors,
    })
}

/// Waits `duration` (or until Ctrl-C), moving `bar` along.
async fn hold(duration: Duration, bar: ProgressBar, interrupt: &Stop) {
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    let mut ticker = tokio::time::interval(Duration::from_millis(HOLD_TICK_MS));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            () = interrupt.triggered() => break,
            _ = ticker.tick() => {
                bar.set_position(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
            }
        }
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_spread_over_the_connections() {
        // 1000 connections that cost the broker 40 MiB: 41,943.04 B each.
        let before = 20 * 1024 * 1024;
        let after = 60 * 1024 * 1024;
        let per = bytes_per_connection(before, after, 1000).expect("connections");
        assert!((per - 41_943.04).abs() < 1e-6, "{per}");
        assert_eq!(bytes_per_connection(100, 100, 7), Some(0.0));
    }

    #[test]
    fn shrinking_rss_gives_a_negative_figure() {
        assert_eq!(bytes_per_connection(10_000, 8_000, 4), Some(-500.0));
        // Extremes neither wrap nor overflow.
        assert_eq!(
            bytes_per_connection(u64::MAX, 0, 1),
            Some(-(u64::MAX as f64))
        );
    }

    #[test]
    fn no_connections_no_figure() {
        assert_eq!(bytes_per_connection(1, 2, 0), None);
    }

    #[test]
    fn open_files_limit_is_raised_to_the_hard_limit_only_when_short() {
        assert_eq!(plan_open_files(20_000, 20_000, 1_064), Ok(None));
        assert_eq!(plan_open_files(1_024, 524_288, 1_064), Ok(Some(524_288)));
        assert_eq!(plan_open_files(1_024, 1_064, 1_064), Ok(Some(1_064)));
        assert_eq!(plan_open_files(1_024, 4_096, 100_064), Err(4_096));
        assert_eq!(plan_open_files(1_024, u64::MAX, 5_000), Ok(Some(5_000)));
    }

    #[cfg(unix)]
    #[test]
    fn our_own_limit_covers_a_small_run() {
        let soft = raise_open_files_limit(10).expect("limits readable");
        assert!(soft >= 10 + OPEN_FILES_MARGIN, "{soft}");
    }

    #[test]
    fn idle_connections_ask_for_the_smallest_frame_max_unless_told() {
        let uri = idle_uri("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(uri.query.frame_max, Some(FRAME_MAX_BYTES));
        assert_eq!(uri.vhost, "/");
        let uri =
            idle_uri("amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=131072").expect("valid");
        assert_eq!(uri.query.frame_max, Some(131_072));
        let err = idle_uri("http://guest:secret@host/").expect_err("not amqp");
        let text = err.to_string();
        assert!(text.contains("invalid broker URL"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn idle_report_has_the_documented_shape() {
        let report = IdleReport {
            connections: 20,
            opened_in_s: 0.5,
            rss_before_bytes: Some(1_000),
            rss_after_bytes: Some(3_000),
            bytes_per_connection: Some(100.0),
            heartbeat_s: 60,
            frame_max_bytes: 4096,
        };
        assert_eq!(
            serde_json::to_value(&report).expect("serializable"),
            serde_json::json!({
                "connections": 20,
                "opened_in_s": 0.5,
                "rss_before_bytes": 1000,
                "rss_after_bytes": 3000,
                "bytes_per_connection": 100.0,
                "heartbeat_s": 60,
                "frame_max_bytes": 4096,
            })
        );
    }
}
