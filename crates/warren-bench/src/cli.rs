//! Command-line options and the checked run configuration built from them.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::stamp::STAMP_SIZE_BYTES;

/// Largest body `--size` accepts, bytes: RabbitMQ's own ceiling on
/// `max_message_size` (512 MiB) is far past what a benchmark needs; 128 MiB
/// (RabbitMQ 3.x's default limit) still lets one probe large-message paths
/// without a typo allocating gigabytes per in-flight message.
const SIZE_MAX_BYTES: usize = 128 * 1024 * 1024;

/// Largest `--confirm` window: each outstanding publish holds a copy of its
/// body, so the window times the size bounds this tool's memory.
const CONFIRM_WINDOW_MAX: usize = 100_000;

/// Default URL: a local broker on the standard port, default vhost.
const URL_DEFAULT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Most connections `--idle-connections` opens. One client host rarely gets
/// past ~28,000 connections to one broker address anyway (the default
/// ephemeral port range, and lapin's one I/O thread per connection), so this
/// bound only stops a typo from trying for millions.
pub const IDLE_CONNECTIONS_MAX: u32 = 100_000;

/// Default `--idle-hold`, seconds.
const IDLE_HOLD_DEFAULT_S: u64 = 5;

/// Default `--probe-rate`, messages per second: one message a millisecond,
/// so a silence of a few milliseconds already shows.
const PROBE_RATE_DEFAULT_PER_S: u64 = 1_000;

/// Highest `--probe-rate`. The probe measures the broker, so it must stay a
/// light load; past 10,000 msg/s it becomes load of its own, and its
/// resolution (0.1 ms between messages) is already finer than any stall
/// worth reporting.
pub const PROBE_RATE_MAX_PER_S: u64 = 10_000;

/// Default `--stall-timeout`, seconds: ten minutes covers every default
/// disruption on a slow broker (RabbitMQ declares 10,000 durable queues in
/// about a minute) and still ends a hung one.
const STALL_TIMEOUT_DEFAULT_S: u64 = 600;

/// Most messages `--stall unacked-close` may hold: the disruptor keeps every
/// delivery in its client's memory until it closes its channel.
const UNACKED_CLOSE_COUNT_MAX: u64 = 1_000_000;

/// Most queues `--stall declare` may declare: ten times the target,
/// and what is left on the broker if the deletion afterwards fails.
const DECLARE_COUNT_MAX: u64 = 100_000;

/// Most messages `--stall paged-drain` may publish: 10 GiB of 1 KiB bodies
/// on the broker's disk.
const PAGED_DRAIN_COUNT_MAX: u64 = 10_000_000;

/// Most connections `--stall connection-churn` may open. Each closed
/// connection leaves its client port in TIME_WAIT for a minute, and one
/// client host has about 28,000 ephemeral ports to one broker address.
const CONNECTION_CHURN_COUNT_MAX: u64 = 20_000;

/// The options that shape the message load; idle mode sends no messages, so
/// giving one of them with `--idle-connections` is a mistake worth reporting
/// rather than silently ignoring.
const LOAD_OPTIONS: [&str; 15] = [
    "producers",
    "consumers",
    "size",
    "queues",
    "exchange_fanout",
    "persistent",
    "transient",
    "confirm",
    "ack",
    "prefetch",
    "ack_every",
    "rate",
    "duration",
    "prefill",
    "drain_timeout",
];

/// Load generator for AMQP 0-9-1 brokers (Warren or RabbitMQ).
///
/// Publishes stamped messages to `warren-bench-<i>` queues (deleted and
/// declared afresh at start) and reports publish and consume rates, end-to-end
/// latency, confirm latency and, with --broker-pid, the broker's peak memory.
///
/// With --idle-connections it sends no messages: it opens that many
/// connections with one channel each, holds them open, and reports what they
/// cost the broker in memory.
///
/// With --stall it measures whether one client stalls another: a probe
/// publishes and consumes at a fixed rate on a queue of its own while a
/// second client disrupts the broker, and the report gives the probe's
/// latency and longest silence during the disruption.
#[derive(Debug, Parser)]
#[command(name = "warren-bench", version)]
pub struct Args {
    /// Broker URL.
    #[arg(long, env = "WARREN_BENCH_URL", default_value = URL_DEFAULT)]
    pub url: String,

    /// Publishing connections (one channel each).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub producers: usize,

    /// Consuming connections (one channel each).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub consumers: usize,

    /// Message body size in bytes; the first 16 carry the send time and sequence.
    #[arg(long, default_value_t = STAMP_SIZE_BYTES, value_name = "BYTES",
          value_parser = parse_size_bytes)]
    pub size: usize,

    /// Number of queues, named warren-bench-0 ..; producers and consumers are
    /// spread over them round-robin.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub queues: u32,

    /// Publish to a fanout exchange bound to every queue instead of the default
    /// exchange (each message then reaches every queue).
    #[arg(long)]
    pub exchange_fanout: bool,

    /// Persistent messages (delivery_mode 2) and durable queues.
    #[arg(long, conflicts_with = "transient")]
    pub persistent: bool,

    /// Transient messages and non-durable queues (the default).
    #[arg(long)]
    pub transient: bool,

    /// Publisher confirms with at most WINDOW unconfirmed messages per
    /// producer; 0 turns confirms off.
    #[arg(long, default_value_t = 0, value_name = "WINDOW",
          value_parser = parse_confirm_window)]
    pub confirm: usize,

    /// Acknowledgement mode for consumers.
    #[arg(long, value_enum, default_value_t = AckMode::Auto)]
    pub ack: AckMode,

    /// Prefetch (basic.qos) per consumer with --ack manual; 0 means unlimited.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub prefetch: u16,

    /// With --ack manual, acknowledge every N-th message with multiple=true
    /// (1 acknowledges each message on its own).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ack_every: u32,

    /// Total publish rate across all producers, messages per second; 0 is
    /// as fast as the broker allows.
    #[arg(long, default_value_t = 0, value_name = "MSGS_PER_S")]
    pub rate: u64,

    /// Length of the run in seconds (ignored with --prefill).
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,

    /// Prefill mode: publish N messages with no consumer attached, then start
    /// the consumers and drain them all; reports both rates.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill: Option<u64>,

    /// Limit on each prefill phase (publishing, draining) in seconds; a phase
    /// that runs past it is reported as incomplete.
    #[arg(long, default_value_t = 300, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub drain_timeout: u64,

    /// Idle-connections mode: open N connections with one channel each (50 at
    /// a time), hold them for --idle-hold seconds and, with --broker-pid,
    /// report the broker's memory per connection. Sends no messages and
    /// declares nothing, so no load option may be given with it.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(IDLE_CONNECTIONS_MAX)),
          conflicts_with_all = LOAD_OPTIONS)]
    pub idle_connections: Option<u32>,

    /// How long --idle-connections holds every connection open, seconds,
    /// before measuring the broker's memory again.
    #[arg(long, default_value_t = IDLE_HOLD_DEFAULT_S, value_name = "SECONDS",
          requires = "idle_connections",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub idle_hold: u64,

    /// Stall mode: a probe connection publishes --probe-rate stamped
    /// messages a second to a queue of its own and consumes them, from one
    /// second before the disruption until one second after it, while another
    /// client causes DISRUPTION. Reports the probe's latency and longest
    /// silence during the disruption, and how long the disruption took. No
    /// load option may be given with it.
    #[arg(long, value_enum, value_name = "DISRUPTION",
          conflicts_with_all = LOAD_OPTIONS, conflicts_with = "idle_connections")]
    pub stall: Option<Disruption>,

    /// How many messages, queues or connections the --stall disruption
    /// involves (defaults: unacked-close 100000, declare 10000, paged-drain
    /// 200000, connection-churn 1000).
    #[arg(long, value_name = "N", requires = "stall",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_count: Option<u64>,

    /// The --stall probe's publish rate, messages per second.
    #[arg(long, default_value_t = PROBE_RATE_DEFAULT_PER_S, value_name = "MSGS_PER_S",
          requires = "stall",
          value_parser = clap::value_parser!(u64).range(1..=PROBE_RATE_MAX_PER_S))]
    pub probe_rate: u64,

    /// Limit on the --stall disruption, seconds; one that runs past it is
    /// stopped and reported as incomplete.
    #[arg(long, default_value_t = STALL_TIMEOUT_DEFAULT_S, value_name = "SECONDS",
          requires = "stall",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stall_timeout: u64,

    /// PID of the broker process, to sample its resident memory every 100 ms.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// No progress display on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// How consumers acknowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// basic.ack from the consumer, under the prefetch limit.
    Manual,
    /// no_ack consumers: the broker forgets a message once it is sent.
    Auto,
}

/// What the second client of `--stall` does to the broker while the probe
/// runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Disruption {
    /// Publishes N 16 B messages to its own queue, takes them all as
    /// deliveries without a prefetch limit and without acking, then closes
    /// its channel, so the broker requeues all N at once.
    UnackedClose,
    /// Declares N durable queues one after another, each waiting for its
    /// declare-ok (deleted afterwards, outside the measurement).
    Declare,
    /// Fills a durable queue with N persistent 1 KiB messages with confirms,
    /// far more than a broker keeps in memory, then drains it (manual ack,
    /// prefetch 100).
    PagedDrain,
    /// Opens and closes N connections, each opening a channel, a few at a
    /// time.
    ConnectionChurn,
}

impl Disruption {
    /// `--stall-count` when it is not given: the figures of the issue that
    /// asked for the probe.
    pub fn default_count(self) -> u64 {
        match self {
            Self::UnackedClose => 100_000,
            Self::Declare => 10_000,
            Self::PagedDrain => 200_000,
            Self::ConnectionChurn => 1_000,
        }
    }

    /// Largest `--stall-count` (see each constant for why).
    pub fn count_max(self) -> u64 {
        match self {
            Self::UnackedClose => UNACKED_CLOSE_COUNT_MAX,
            Self::Declare => DECLARE_COUNT_MAX,
            Self::PagedDrain => PAGED_DRAIN_COUNT_MAX,
            Self::ConnectionChurn => CONNECTION_CHURN_COUNT_MAX,
        }
    }

    /// What the count counts.
    pub fn unit(self) -> &'static str {
        match self {
            Self::UnackedClose | Self::PagedDrain => "messages",
            Self::Declare => "queues",
            Self::ConnectionChurn => "connections",
        }
    }

    /// The name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnackedClose => "unacked-close",
            Self::Declare => "declare",
            Self::PagedDrain => "paged-drain",
            Self::ConnectionChurn => "connection-churn",
        }
    }
}

/// What a run does: fixed duration, prefill then drain, idle connections,
/// or the stall probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Mode {
    Duration {
        duration_s: u64,
    },
    Prefill {
        count: u64,
        phase_timeout_s: u64,
    },
    /// `connections` idle connections with a channel each, held `hold_s`.
    Idle {
        connections: u32,
        hold_s: u64,
    },
    /// The probe at `probe_rate_per_s` while `disruption` involves `count`
    /// messages, queues or connections, stopped after `timeout_s`.
    Stall {
        disruption: Disruption,
        count: u64,
        probe_rate_per_s: u64,
        timeout_s: u64,
    },
}

/// The run's settings after cross-option checks; also echoed in the report.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    #[serde(skip)]
    pub url: String,
    pub producers: usize,
    pub consumers: usize,
    pub size_bytes: usize,
    pub queues: u32,
    pub exchange_fanout: bool,
    pub persistent: bool,
    pub confirm_window: usize,
    pub ack: AckMode,
    pub prefetch: u16,
    pub ack_every: u32,
    pub rate_per_s: u64,
    pub mode: Mode,
    pub broker_pid: Option<u32>,
    #[serde(skip)]
    pub json: Option<PathBuf>,
    #[serde(skip)]
    pub quiet: bool,
}

impl Config {
    /// Checks the options against each other; the error text is for the user.
    pub fn from_args(args: Args) -> Result<Self, String> {
        if let Some(connections) = args.idle_connections {
            // Clap has already refused every load option next to
            // --idle-connections; what it set are the defaults, so the
            // config says what idle mode really does: no producers, no
            // consumers, no queues, no messages.
            return Ok(Self {
                url: args.url,
                producers: 0,
                consumers: 0,
                size_bytes: 0,
                queues: 0,
                exchange_fanout: false,
                persistent: false,
                confirm_window: 0,
                ack: args.ack,
                prefetch: args.prefetch,
                ack_every: args.ack_every,
                rate_per_s: 0,
                mode: Mode::Idle {
                    connections,
                    hold_s: args.idle_hold,
                },
                broker_pid: args.broker_pid,
                json: args.json,
                quiet: args.quiet,
            });
        }
        if let Some(disruption) = args.stall {
            let count = args
                .stall_count
                .unwrap_or_else(|| disruption.default_count());
            if count > disruption.count_max() {
                return Err(format!(
                    "--stall-count for --stall {} must be at most {} {}",
                    disruption.name(),
                    disruption.count_max(),
                    disruption.unit()
                ));
            }
            // As in idle mode, clap has refused every load option; the
            // config says that no load of that kind runs.
            return Ok(Self {
                url: args.url,
                producers: 0,
                consumers: 0,
                size_bytes: 0,
                queues: 0,
                exchange_fanout: false,
                persistent: false,
                confirm_window: 0,
                ack: args.ack,
                prefetch: args.prefetch,
                ack_every: args.ack_every,
                rate_per_s: 0,
                mode: Mode::Stall {
                    disruption,
                    count,
                    probe_rate_per_s: args.probe_rate,
                    timeout_s: args.stall_timeout,
                },
                broker_pid: args.broker_pid,
                json: args.json,
                quiet: args.quiet,
            });
        }
        if args.producers == 0 {
            return Err("--producers must be at least 1".into());
        }
        if args.prefill.is_some() && args.consumers == 0 {
            return Err("--prefill needs at least one consumer to drain the queues".into());
        }
        // In prefill mode a queue nobody consumes would never drain; fanout
        // or not, every queue receives messages.
        if args.prefill.is_some() && args.consumers < args.queues as usize {
            return Err(format!(
                "--prefill with {} queues needs at least {} consumers so every queue drains",
                args.queues, args.queues
            ));
        }
        // A consumer waiting for N messages before acking while the broker
        // waits for an ack before sending more would stall forever.
        if args.ack == AckMode::Manual
            && args.prefetch != 0
            && args.ack_every > u32::from(args.prefetch)
        {
            return Err(format!(
                "--ack-every {} exceeds --prefetch {}: consumers would stall waiting",
                args.ack_every, args.prefetch
            ));
        }
        let mode = match args.prefill {
            Some(count) => Mode::Prefill {
                count,
                phase_timeout_s: args.drain_timeout,
            },
            None => Mode::Duration {
                duration_s: args.duration,
            },
        };
        Ok(Self {
            url: args.url,
            producers: args.producers,
            consumers: args.consumers,
            size_bytes: args.size,
            queues: args.queues,
            exchange_fanout: args.exchange_fanout,
            persistent: args.persistent,
            confirm_window: args.confirm,
            ack: args.ack,
            prefetch: args.prefetch,
            ack_every: args.ack_every,
            rate_per_s: args.rate,
            mode,
            broker_pid: args.broker_pid,
            json: args.json,
            quiet: args.quiet,
        })
    }

    /// Copies of each published message that reach some queue: one per queue
    /// with the fanout exchange, one otherwise.
    pub fn copies_per_message(&self) -> u64 {
        if self.exchange_fanout {
            u64::from(self.queues)
        } else {
            1
        }
    }
}

/// Name of the bench queue with this index.
pub fn queue_name(index: u32) -> String {
    format!("warren-bench-{index}")
}

/// Name of the fanout exchange used with `--exchange-fanout`.
pub const FANOUT_EXCHANGE: &str = "warren-bench-fanout";

fn parse_size_bytes(text: &str) -> Result<usize, String> {
    let size_bytes: usize = text.parse().map_err(|e| format!("{e}"))?;
    if !(STAMP_SIZE_BYTES..=SIZE_MAX_BYTES).contains(&size_bytes) {
        return Err(format!(
            "must be {STAMP_SIZE_BYTES}..={SIZE_MAX_BYTES} bytes (the first {STAMP_SIZE_BYTES} hold the latency stamp)"
        ));
    }
    Ok(size_bytes)
}

fn parse_confirm_window(text: &str) -> Result<usize, String> {
    let window: usize = text.parse().map_err(|e| format!("{e}"))?;
    if window > CONFIRM_WINDOW_MAX {
        return Err(format!("must be at most {CONFIRM_WINDOW_MAX}"));
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let args =
            Args::try_parse_from(std::iter::once("warren-bench").chain(extra.iter().copied()))
                .map_err(|e| e.to_string())?;
        Config::from_args(args)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = parse(&[]).expect("defaults are valid");
        assert_eq!(config.url, URL_DEFAULT);
        assert_eq!(
            (config.producers, config.consumers, config.queues),
            (1, 1, 1)
        );
        assert_eq!(config.size_bytes, 16);
        assert_eq!(config.ack, AckMode::Auto);
        assert_eq!(config.prefetch, 100);
        assert_eq!(config.mode, Mode::Duration { duration_s: 10 });
        assert!(!config.persistent);
    }

    #[test]
    fn rejects_sizes_that_cannot_hold_the_stamp() {
        assert!(parse(&["--size", "15"]).is_err());
        assert!(parse(&["--size", "16"]).is_ok());
    }

    #[test]
    fn rejects_ack_every_beyond_prefetch() {
        let err = parse(&["--ack", "manual", "--prefetch", "10", "--ack-every", "11"])
            .expect_err("would stall");
        assert!(err.contains("stall"), "{err}");
        assert!(parse(&["--ack", "manual", "--prefetch", "10", "--ack-every", "10"]).is_ok());
    }

    #[test]
    fn prefill_needs_a_consumer_per_queue() {
        assert!(parse(&["--prefill", "10", "--queues", "3", "--consumers", "2"]).is_err());
        let config = parse(&["--prefill", "10", "--queues", "3", "--consumers", "3"]).expect("ok");
        assert_eq!(
            config.mode,
            Mode::Prefill {
                count: 10,
                phase_timeout_s: 300
            }
        );
    }

    #[test]
    fn persistent_and_transient_conflict() {
        assert!(parse(&["--persistent", "--transient"]).is_err());
    }

    #[test]
    fn idle_mode_defaults_to_a_five_second_hold() {
        let config = parse(&["--idle-connections", "1000"]).expect("valid");
        assert_eq!(
            config.mode,
            Mode::Idle {
                connections: 1000,
                hold_s: 5
            }
        );
        // The echoed config must not claim a load that idle mode never runs.
        assert_eq!(
            (config.producers, config.consumers, config.queues),
            (0, 0, 0)
        );
        assert_eq!((config.size_bytes, config.confirm_window), (0, 0));
    }

    #[test]
    fn idle_mode_takes_hold_pid_json_and_url() {
        let config = parse(&[
            "--idle-connections",
            "20",
            "--idle-hold",
            "0",
            "--broker-pid",
            "42",
            "--json",
            "/tmp/out.json",
            "--url",
            "amqp://u:p@h:1/%2f",
            "--quiet",
        ])
        .expect("valid");
        assert_eq!(
            config.mode,
            Mode::Idle {
                connections: 20,
                hold_s: 0
            }
        );
        assert_eq!(config.broker_pid, Some(42));
        assert_eq!(config.url, "amqp://u:p@h:1/%2f");
    }

    #[test]
    fn idle_connection_count_is_bounded() {
        assert!(parse(&["--idle-connections", "0"]).is_err());
        assert!(parse(&["--idle-connections", "1"]).is_ok());
        assert!(parse(&["--idle-connections", "100000"]).is_ok());
        let err = parse(&["--idle-connections", "100001"]).expect_err("too many");
        assert!(err.contains("100000"), "{err}");
        assert!(parse(&["--idle-connections", "-5"]).is_err());
    }

    #[test]
    fn idle_hold_needs_idle_mode() {
        let err = parse(&["--idle-hold", "3"]).expect_err("hold without idle");
        assert!(err.contains("--idle-connections"), "{err}");
        assert!(parse(&["--idle-connections", "5", "--idle-hold", "86401"]).is_err());
    }

    #[test]
    fn idle_mode_refuses_every_load_option() {
        for extra in [
            &["--producers", "2"][..],
            &["--consumers", "2"],
            &["--size", "1024"],
            &["--queues", "2"],
            &["--exchange-fanout"],
            &["--persistent"],
            &["--transient"],
            &["--confirm", "10"],
            &["--ack", "manual"],
            &["--prefetch", "5"],
            &["--ack-every", "2"],
            &["--rate", "100"],
            &["--duration", "3"],
            &["--prefill", "10"],
            &["--drain-timeout", "3"],
        ] {
            let mut argv = vec!["--idle-connections", "10"];
            argv.extend_from_slice(extra);
            let err = parse(&argv).expect_err("load option in idle mode");
            assert!(err.contains("cannot be used with"), "{extra:?}: {err}");
        }
    }

    #[test]
    fn idle_mode_serializes_its_marker() {
        let config = parse(&["--idle-connections", "7", "--idle-hold", "2"]).expect("valid");
        let json = serde_json::to_value(&config).expect("serializable");
        assert_eq!(
            json["mode"],
            serde_json::json!({"kind": "idle", "connections": 7, "hold_s": 2})
        );
        assert_eq!(json["producers"], 0);
    }

    #[test]
    fn stall_mode_takes_each_disruption_with_its_default_count() {
        for (name, count) in [
            ("unacked-close", 100_000),
            ("declare", 10_000),
            ("paged-drain", 200_000),
            ("connection-churn", 1_000),
        ] {
            let config = parse(&["--stall", name]).expect("valid");
            let Mode::Stall {
                disruption,
                count: chosen,
                probe_rate_per_s,
                timeout_s,
            } = config.mode
            else {
                panic!("{name}: not stall mode: {:?}", config.mode);
            };
            assert_eq!(disruption.name(), name);
            assert_eq!(chosen, count, "{name}");
            assert_eq!((probe_rate_per_s, timeout_s), (1_000, 600));
            assert_eq!(
                (config.producers, config.consumers, config.queues),
                (0, 0, 0)
            );
        }
    }

    #[test]
    fn stall_count_is_bounded_per_disruption() {
        assert!(parse(&["--stall", "declare", "--stall-count", "0"]).is_err());
        assert!(parse(&["--stall", "declare", "--stall-count", "100000"]).is_ok());
        let err =
            parse(&["--stall", "declare", "--stall-count", "100001"]).expect_err("too many queues");
        assert!(err.contains("at most 100000 queues"), "{err}");
        let err = parse(&["--stall", "connection-churn", "--stall-count", "20001"])
            .expect_err("too many connections");
        assert!(err.contains("at most 20000 connections"), "{err}");
        assert!(parse(&["--stall", "unacked-close", "--stall-count", "1000001"]).is_err());
        assert!(parse(&["--stall", "paged-drain", "--stall-count", "10000000"]).is_ok());
    }

    #[test]
    fn probe_rate_is_bounded() {
        assert!(parse(&["--stall", "declare", "--probe-rate", "0"]).is_err());
        assert!(parse(&["--stall", "declare", "--probe-rate", "10000"]).is_ok());
        assert!(parse(&["--stall", "declare", "--probe-rate", "10001"]).is_err());
    }

    #[test]
    fn stall_options_need_stall_mode() {
        for extra in [
            &["--stall-count", "5"][..],
            &["--probe-rate", "500"],
            &["--stall-timeout", "30"],
        ] {
            let err = parse(extra).expect_err("stall option without --stall");
            assert!(err.contains("--stall"), "{extra:?}: {err}");
        }
    }

    #[test]
    fn stall_mode_refuses_load_options_and_idle_mode() {
        for extra in [
            &["--producers", "2"][..],
            &["--size", "1024"],
            &["--rate", "100"],
            &["--prefill", "10"],
            &["--idle-connections", "10"],
        ] {
            let mut argv = vec!["--stall", "declare"];
            argv.extend_from_slice(extra);
            let err = parse(&argv).expect_err("load option in stall mode");
            assert!(err.contains("cannot be used with"), "{extra:?}: {err}");
        }
    }

    #[test]
    fn stall_mode_serializes_its_settings() {
        let config = parse(&[
            "--stall",
            "paged-drain",
            "--stall-count",
            "5000",
            "--probe-rate",
            "200",
        ])
        .expect("valid");
        let json = serde_json::to_value(&config).expect("serializable");
        assert_eq!(
            json["mode"],
            serde_json::json!({
                "kind": "stall",
                "disruption": "paged-drain",
                "count": 5000,
                "probe_rate_per_s": 200,
                "timeout_s": 600,
            })
        );
    }
}
