//! The results of a run: the JSON document (`--json`) and the human summary
//! printed to stdout. Both come from the same [`Report`] so they cannot
//! disagree.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cli::{Config, Disruption, Mode};
use crate::error::BenchError;
use crate::idle::{IdleReport, OPEN_CONCURRENCY};
use crate::stall::{StallReport, StretchReport};
use crate::stats::LatencySummary;

/// Messages counted over a measured span of time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throughput {
    pub messages: u64,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
}

impl Throughput {
    pub fn new(messages: u64, elapsed_s: f64) -> Self {
        let rate_per_s = if elapsed_s > 0.0 {
            messages as f64 / elapsed_s
        } else {
            0.0
        };
        Self {
            messages,
            elapsed_s,
            rate_per_s,
        }
    }
}

/// Publishing side totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PublishTotals {
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    /// Still awaiting a confirm when the producers gave up.
    pub unsettled: u64,
}

/// Consuming side totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConsumeTotals {
    pub consumed: u64,
    pub redelivered: u64,
    pub unstamped: u64,
}

/// The broker's resident memory over the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BrokerMemory {
    pub pid: u32,
    pub peak_rss_bytes: u64,
    pub end_rss_bytes: u64,
    /// RSS when the prefill phase ended (prefill mode only).
    pub after_prefill_rss_bytes: Option<u64>,
    /// Samples that could not be read: the broker may have exited.
    pub failed_samples: u64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    /// Broker URL with the password redacted.
    pub url: String,
    pub config: Config,
    /// Messages still in the queues from an earlier run, deleted at setup.
    pub stale_messages_deleted: u64,
    /// Publishing phase (the prefill in prefill mode).
    pub publish: Throughput,
    pub publish_totals: PublishTotals,
    /// Consuming phase (the drain in prefill mode).
    pub consume: Throughput,
    pub consume_totals: ConsumeTotals,
    /// Deliveries the drain waited for (prefill mode only).
    pub drain_expected: Option<u64>,
    /// Whether the drain received them all before its limit (prefill mode only).
    pub drain_complete: Option<bool>,
    pub end_to_end_latency: Option<LatencySummary>,
    pub confirm_latency: Option<LatencySummary>,
    pub broker_memory: Option<BrokerMemory>,
    /// The idle-connections measurement (idle mode only).
    pub idle: Option<IdleReport>,
    /// The stall probe's measurement (stall mode only).
    pub stall: Option<StallReport>,
    /// Whether the run was cut short by Ctrl-C.
    pub interrupted: bool,
    /// Errors met by any connection, in the order their tasks were joined.
    pub errors: Vec<String>,
}

impl Report {
    /// Writes the report as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| BenchError::JsonWrite {
            path: path.to_owned(),
            source,
        })
    }

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let config = &self.config;
        let mode = match config.mode {
            Mode::Duration { duration_s } => format!("{duration_s} s run"),
            Mode::Prefill { count, .. } => format!("prefill {count} then drain"),
            Mode::Idle {
                connections,
                hold_s,
            } => return self.render_idle(connections, hold_s),
            Mode::Stall { .. } => return self.render_stall(),
        };
        let mut out = String::new();
        let exchange = if config.exchange_fanout {
            "fanout exchange"
        } else {
            "default exchange"
        };
        let confirms = if config.confirm_window > 0 {
            format!("confirms window {}", config.confirm_window)
        } else {
            "no confirms".to_owned()
        };
        let ack = match config.ack {
            crate::cli::AckMode::Auto => "auto ack".to_owned(),
            crate::cli::AckMode::Manual => format!(
                "manual ack (prefetch {}, every {})",
                config.prefetch, config.ack_every
            ),
        };
        let rate = if config.rate_per_s > 0 {
            format!("rate {} msg/s", config.rate_per_s)
        } else {
            "unlimited rate".to_owned()
        };
        let _ = writeln!(out, "warren-bench {} against {}", self.version, self.url);
        let _ = writeln!(
            out,
            "  {mode}: {} producers, {} consumers, {} queues via {exchange}, {} B {} messages",
            config.producers,
            config.consumers,
            config.queues,
            config.size_bytes,
            if config.persistent {
                "persistent"
            } else {
                "transient"
            },
        );
        let _ = writeln!(out, "  {confirms}, {ack}, {rate}");
        if self.stale_messages_deleted > 0 {
            let _ = writeln!(
                out,
                "  deleted {} messages left in the queues by an earlier run",
                self.stale_messages_deleted
            );
        }
        let _ = writeln!(out);

        let (publish_label, consume_label) = match config.mode {
            Mode::Duration { .. } | Mode::Idle { .. } | Mode::Stall { .. } => {
                ("publish", "consume")
            }
            Mode::Prefill { .. } => ("prefill", "drain"),
        };
        let totals = &self.publish_totals;
        let _ = writeln!(
            out,
            "  {publish_label:<8} {:>12} msg/s  ({} messages in {:.2} s; confirmed {}, nacked {}, unsettled {})",
            format_rate(self.publish.rate_per_s),
            self.publish.messages,
            self.publish.elapsed_s,
            totals.confirmed,
            totals.nacked,
            totals.unsettled,
        );
        let consumed = &self.consume_totals;
        let mut consume_line = format!(
            "  {consume_label:<8} {:>12} msg/s  ({} messages in {:.2} s",
            format_rate(self.consume.rate_per_s),
            self.consume.messages,
            self.consume.elapsed_s,
        );
        if consumed.redelivered > 0 {
            let _ = write!(consume_line, "; {} redelivered", consumed.redelivered);
        }
        if consumed.unstamped > 0 {
            let _ = write!(consume_line, "; {} without a stamp", consumed.unstamped);
        }
        if let (Some(expected), Some(complete)) = (self.drain_expected, self.drain_complete) {
            let verdict = if complete { "complete" } else { "INCOMPLETE" };
            let _ = write!(consume_line, "; expected {expected}, {verdict}");
        }
        consume_line.push(')');
        let _ = writeln!(out, "{consume_line}");
        let _ = writeln!(out);

        match &self.end_to_end_latency {
            Some(latency) => {
                let _ = writeln!(
                    out,
                    "  end-to-end latency  p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                    format_us(latency.p50_us),
                    format_us(latency.p99_us),
                    format_us(latency.p999_us),
                    format_us(latency.max_us),
                    latency.samples,
                );
            }
            None => {
                let _ = writeln!(out, "  end-to-end latency  no messages consumed");
            }
        }
        if config.confirm_window > 0 {
            match &self.confirm_latency {
                Some(latency) => {
                    let _ = writeln!(
                        out,
                        "  confirm latency     p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                        format_us(latency.p50_us),
                        format_us(latency.p99_us),
                        format_us(latency.p999_us),
                        format_us(latency.max_us),
                        latency.samples,
                    );
                }
                None => {
                    let _ = writeln!(out, "  confirm latency     no confirms received");
                }
            }
        }
        self.render_memory(&mut out);
        self.render_tail(&mut out);
        out
    }

    /// The summary of an idle-connections run.
    fn render_idle(&self, requested: u32, hold_s: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "warren-bench {} against {}", self.version, self.url);
        let _ = writeln!(
            out,
            "  idle connections: {requested} connections with one channel each, \
             opened {OPEN_CONCURRENCY} at a time, held {hold_s} s; no messages"
        );
        let _ = writeln!(out);
        if let Some(idle) = &self.idle {
            let rate = if idle.opened_in_s > 0.0 {
                f64::from(idle.connections) / idle.opened_in_s
            } else {
                0.0
            };
            let heartbeat = match idle.heartbeat_s {
                0 => "no heartbeats".to_owned(),
                seconds => format!("heartbeat {seconds} s"),
            };
            let _ = writeln!(
                out,
                "  opened   {} connections in {:.2} s ({} conn/s; {heartbeat}, frame_max {})",
                idle.connections,
                idle.opened_in_s,
                format_rate(rate),
                idle.frame_max_bytes,
            );
            if let (Some(before), Some(after), Some(memory)) = (
                idle.rss_before_bytes,
                idle.rss_after_bytes,
                &self.broker_memory,
            ) {
                let mut line = format!(
                    "  broker RSS (pid {})  before {}  after {}  growth {}  (peak {})",
                    memory.pid,
                    format_bytes(before),
                    format_bytes(after),
                    format_signed_bytes(i128::from(after) - i128::from(before)),
                    format_bytes(memory.peak_rss_bytes),
                );
                if memory.failed_samples > 0 {
                    let _ = write!(line, "  ({} samples failed)", memory.failed_samples);
                }
                let _ = writeln!(out, "{line}");
            }
            match idle.bytes_per_connection {
                Some(per) => {
                    let _ = writeln!(
                        out,
                        "  per idle connection with a channel  {} B  ({})",
                        format_signed_rate(per),
                        format_signed_bytes(per.round() as i128),
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  per idle connection: give --broker-pid to measure the broker's memory"
                    );
                }
            }
        }
        self.render_tail(&mut out);
        out
    }

    /// The summary of a stall-probe run.
    fn render_stall(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "warren-bench {} against {}", self.version, self.url);
        let Some(stall) = &self.stall else {
            self.render_tail(&mut out);
            return out;
        };
        let name = stall.disruption.name();
        let _ = writeln!(
            out,
            "  stall probe: {name} with {} {}; probe {} msg/s of {} B on a queue of its own \
             (auto ack), settle {:.0} s before and after",
            format_rate(stall.count as f64),
            stall.unit,
            format_rate(stall.probe.rate_per_s as f64),
            crate::stamp::STAMP_SIZE_BYTES,
            stall.settle_s,
        );
        let _ = writeln!(out);
        let verb = match stall.disruption {
            Disruption::UnackedClose => "requeued",
            Disruption::Declare => "declared",
            Disruption::PagedDrain => "drained",
            Disruption::ConnectionChurn => "opened and closed",
        };
        let phases: Vec<String> = stall
            .phases
            .iter()
            .map(|phase| format!("{} {:.2} s", phase.name, phase.elapsed_s))
            .collect();
        let _ = writeln!(
            out,
            "  disruption  {} of {} {} {verb} in {:.2} s{}  ({})",
            format_rate(stall.completed as f64),
            format_rate(stall.count as f64),
            stall.unit,
            stall.disruption_s,
            if stall.complete { "" } else { ", INCOMPLETE" },
            phases.join(", "),
        );
        let _ = writeln!(
            out,
            "  probe       published {}, received {}",
            format_rate(stall.probe.published as f64),
            format_rate(stall.probe.received as f64),
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<18} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>16}",
            "probe", "time", "in flight", "p50", "p99", "p99.9", "max", "longest silence"
        );
        let row = |out: &mut String, label: String, stretch: &StretchReport| {
            let (p50, p99, p999, max) = match &stretch.latency {
                Some(latency) => (
                    format_us(latency.p50_us),
                    format_us(latency.p99_us),
                    format_us(latency.p999_us),
                    format_us(latency.max_us),
                ),
                None => Default::default(),
            };
            let _ = writeln!(
                out,
                "  {label:<18} {:>8} {:>9} {p50:>9} {p99:>9} {p999:>9} {max:>9} {:>16}",
                format!("{:.2} s", stretch.elapsed_s),
                format_rate(stretch.deliveries as f64),
                format_us(stretch.longest_silence_us),
            );
        };
        row(&mut out, "before".to_owned(), &stall.before);
        row(&mut out, name.to_owned(), &stall.window);
        if stall.phases.len() > 1 {
            for phase in &stall.phases {
                row(&mut out, format!("  {}", phase.name), phase);
            }
        }
        row(&mut out, "after".to_owned(), &stall.after);
        self.render_memory(&mut out);
        self.render_tail(&mut out);
        out
    }

    /// The broker RSS line (with --broker-pid).
    fn render_memory(&self, out: &mut String) {
        if let Some(memory) = &self.broker_memory {
            let mut line = format!(
                "  broker RSS (pid {})  peak {}  end {}",
                memory.pid,
                format_bytes(memory.peak_rss_bytes),
                format_bytes(memory.end_rss_bytes),
            );
            if let Some(after_prefill) = memory.after_prefill_rss_bytes {
                let _ = write!(line, "  after prefill {}", format_bytes(after_prefill));
            }
            if memory.failed_samples > 0 {
                let _ = write!(line, "  ({} samples failed)", memory.failed_samples);
            }
            let _ = writeln!(out, "{line}");
        }
    }

    /// The Ctrl-C notice and the errors, if any.
    fn render_tail(&self, out: &mut String) {
        if self.interrupted {
            let _ = writeln!(
                out,
                "\n  interrupted by Ctrl-C: numbers cover a partial run"
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\n  errors:");
            for error in &self.errors {
                let _ = writeln!(out, "    {error}");
            }
        }
    }
}

/// A rate with thousands separators and no decimals: "123,456".
pub fn format_rate(rate_per_s: f64) -> String {
    let whole = rate_per_s.max(0.0).round() as u64;
    let digits = whole.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A signed figure with thousands separators and no decimals: "-1,234".
pub fn format_signed_rate(value: f64) -> String {
    let magnitude = format_rate(value.abs());
    if value.round() < 0.0 {
        format!("-{magnitude}")
    } else {
        magnitude
    }
}

/// A byte difference in KiB or MiB with its sign: "+33.3 MiB", "-2.0 KiB".
pub fn format_signed_bytes(bytes: i128) -> String {
    let sign = if bytes < 0 { '-' } else { '+' };
    let magnitude = u64::try_from(bytes.unsigned_abs()).unwrap_or(u64::MAX);
    format!("{sign}{}", format_bytes(magnitude))
}

/// A latency in the unit that keeps three significant digits readable.
pub fn format_us(latency_us: u64) -> String {
    if latency_us < 1_000 {
        format!("{latency_us} µs")
    } else if latency_us < 1_000_000 {
        format!("{:.2} ms", latency_us as f64 / 1e3)
    } else {
        format!("{:.2} s", latency_us as f64 / 1e6)
    }
}

/// A byte count in MiB (or KiB when small).
pub fn format_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes < 1024 * 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_get_thousands_separators() {
        assert_eq!(format_rate(0.0), "0");
        assert_eq!(format_rate(999.4), "999");
        assert_eq!(format_rate(1000.0), "1,000");
        assert_eq!(format_rate(1_234_567.8), "1,234,568");
    }

    #[test]
    fn latencies_pick_a_readable_unit() {
        assert_eq!(format_us(850), "850 µs");
        assert_eq!(format_us(1_250), "1.25 ms");
        assert_eq!(format_us(2_500_000), "2.50 s");
    }

    #[test]
    fn throughput_divides_by_elapsed_time() {
        let throughput = Throughput::new(50_000, 2.0);
        assert_eq!(throughput.rate_per_s, 25_000.0);
        assert_eq!(Throughput::new(5, 0.0).rate_per_s, 0.0);
    }

    fn idle_report(broker_pid: Option<u32>) -> Report {
        use clap::Parser as _;
        let mut argv = vec!["warren-bench", "--idle-connections", "20"];
        let pid_text = broker_pid.map(|pid| pid.to_string());
        if let Some(pid) = &pid_text {
            argv.extend(["--broker-pid", pid.as_str()]);
        }
        let config = Config::from_args(crate::cli::Args::try_parse_from(argv).expect("args"))
            .expect("valid");
        let rss = broker_pid.map(|_| (10_911_744u64, 11_550_720u64));
        Report {
            tool: "warren-bench",
            version: "0.1.0",
            url: "amqp://guest:***@127.0.0.1:5672/%2f".into(),
            config,
            stale_messages_deleted: 0,
            publish: Throughput::new(0, 0.0),
            publish_totals: PublishTotals::default(),
            consume: Throughput::new(0, 0.0),
            consume_totals: ConsumeTotals::default(),
            drain_expected: None,
            drain_complete: None,
            end_to_end_latency: None,
            confirm_latency: None,
            broker_memory: broker_pid.map(|pid| BrokerMemory {
                pid,
                peak_rss_bytes: 11_600_000,
                end_rss_bytes: 11_550_720,
                after_prefill_rss_bytes: None,
                failed_samples: 0,
            }),
            idle: Some(IdleReport {
                connections: 20,
                opened_in_s: 0.5,
                rss_before_bytes: rss.map(|(before, _)| before),
                rss_after_bytes: rss.map(|(_, after)| after),
                bytes_per_connection: rss.and_then(|(before, after)| {
                    crate::idle::bytes_per_connection(before, after, 20)
                }),
                heartbeat_s: 60,
                frame_max_bytes: 4096,
            }),
            stall: None,
            interrupted: false,
            errors: Vec::new(),
        }
    }

    #[test]
    fn idle_summary_shows_the_per_connection_cost() {
        let text = idle_report(Some(4242)).render();
        assert!(
            text.contains("20 connections with one channel each"),
            "{text}"
        );
        assert!(
            text.contains(
                "opened   20 connections in 0.50 s (40 conn/s; heartbeat 60 s, frame_max 4096)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "broker RSS (pid 4242)  before 10.4 MiB  after 11.0 MiB  growth +624.0 KiB"
            ),
            "{text}"
        );
        assert!(
            text.contains("per idle connection with a channel  31,949 B  (+31.2 KiB)"),
            "{text}"
        );
        // Nothing about messages: idle mode sends none.
        assert!(!text.contains("msg/s"), "{text}");
        assert!(!text.contains("latency"), "{text}");
    }

    #[test]
    fn idle_summary_without_a_pid_says_how_to_get_the_figure() {
        let text = idle_report(None).render();
        assert!(text.contains("give --broker-pid"), "{text}");
        assert!(!text.contains("broker RSS"), "{text}");
    }

    #[test]
    fn idle_json_has_the_idle_object_and_the_mode_marker() {
        let json = serde_json::to_value(idle_report(Some(1))).expect("serializable");
        assert_eq!(json["config"]["mode"]["kind"], "idle");
        let idle = &json["idle"];
        for key in [
            "connections",
            "opened_in_s",
            "rss_before_bytes",
            "rss_after_bytes",
            "bytes_per_connection",
        ] {
            assert!(idle[key].is_number(), "{key}: {idle}");
        }
        assert_eq!(idle["bytes_per_connection"], 31_948.8);
        assert_eq!(json["publish"]["rate_per_s"], 0.0);
    }

    #[test]
    fn signed_figures_keep_their_sign() {
        assert_eq!(format_signed_rate(31_948.8), "31,949");
        assert_eq!(format_signed_rate(-1_234.4), "-1,234");
        assert_eq!(format_signed_rate(-0.2), "0");
        assert_eq!(format_signed_bytes(2048), "+2.0 KiB");
        assert_eq!(format_signed_bytes(-3 * 1024 * 1024), "-3.0 MiB");
    }

    #[test]
    fn bytes_in_mib() {
        assert_eq!(format_bytes(81_920 * 1024), "80.0 MiB");
        assert_eq!(format_bytes(2048), "2.0 KiB");
    }

    fn stretch(name: &'static str, elapsed_s: f64, max_us: u64, silence_us: u64) -> StretchReport {
        let mut histogram = crate::stats::latency_histogram();
        crate::stats::record_latency_ns(&mut histogram, 200_000);
        crate::stats::record_latency_ns(&mut histogram, max_us * 1_000);
        StretchReport {
            name,
            elapsed_s,
            deliveries: histogram.len(),
            latency: LatencySummary::of(&histogram),
            longest_silence_us: silence_us,
        }
    }

    fn stall_report() -> Report {
        use clap::Parser as _;
        let argv = [
            "warren-bench",
            "--stall",
            "unacked-close",
            "--broker-pid",
            "7",
        ];
        let config = Config::from_args(crate::cli::Args::try_parse_from(argv).expect("args"))
            .expect("valid");
        Report {
            tool: "warren-bench",
            version: "0.1.0",
            url: "amqp://guest:***@127.0.0.1:5672/%2f".into(),
            config,
            stale_messages_deleted: 0,
            publish: Throughput::new(3_000, 3.0),
            publish_totals: PublishTotals::default(),
            consume: Throughput::new(3_000, 3.0),
            consume_totals: ConsumeTotals::default(),
            drain_expected: None,
            drain_complete: None,
            end_to_end_latency: None,
            confirm_latency: None,
            broker_memory: None,
            idle: None,
            stall: Some(StallReport {
                disruption: Disruption::UnackedClose,
                count: 100_000,
                unit: "messages",
                completed: 100_000,
                complete: true,
                disruption_s: 1.5,
                settle_s: 1.0,
                probe: crate::stall::ProbeTotals {
                    rate_per_s: 1_000,
                    published: 3_500,
                    received: 3_500,
                },
                window: stretch("window", 1.5, 2_500_000, 2_400_000),
                before: stretch("before", 1.0, 300, 1_100),
                phases: vec![
                    stretch("publish", 0.5, 900, 1_500),
                    stretch("deliver", 0.5, 950, 1_600),
                    stretch("requeue", 0.5, 2_500_000, 2_400_000),
                ],
                after: stretch("after", 1.0, 400, 1_200),
            }),
            interrupted: false,
            errors: Vec::new(),
        }
    }

    #[test]
    fn stall_summary_has_a_row_per_stretch() {
        let text = stall_report().render();
        assert!(
            text.contains("100,000 of 100,000 messages requeued in 1.50 s  (publish 0.50 s"),
            "{text}"
        );
        assert!(text.contains("published 3,500, received 3,500"), "{text}");
        for label in ["before", "unacked-close", "  publish", "  requeue", "after"] {
            assert!(text.contains(&format!("  {label} ")), "{label}: {text}");
        }
        assert!(text.contains("2.40 s"), "the requeue's silence: {text}");
        // Nothing of the throughput modes.
        assert!(!text.contains("msg/s  ("), "{text}");
    }

    #[test]
    fn stall_json_has_what_the_comparison_reads() {
        let json = serde_json::to_value(stall_report()).expect("serializable");
        let stall = &json["stall"];
        assert_eq!(stall["disruption"], "unacked-close");
        assert_eq!(stall["disruption_s"], 1.5);
        assert_eq!(stall["window"]["longest_silence_us"], 2_400_000);
        assert!(stall["window"]["latency"]["p999_us"].is_number(), "{stall}");
        assert!(stall["window"]["latency"]["max_us"].is_number(), "{stall}");
        assert_eq!(stall["phases"][2]["name"], "requeue");
        assert_eq!(json["config"]["mode"]["kind"], "stall");
    }
}
