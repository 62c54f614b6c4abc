//! The probe of stall mode: a consumer on a queue of its own whose every
//! delivery is judged against the stretches of the run (the settle before,
//! the disruption and each of its phases, the settle after), and the
//! timeline those stretches begin and end on.
//!
//! Two figures per stretch. The end-to-end latency of every probe message
//! that was in flight during it: sent before the stretch ended and received
//! after it began. And the longest silence: the largest gap between two
//! consecutive deliveries that overlaps the stretch. The silence catches a
//! broker that stops serving everyone even while no probe message happens
//! to be in flight; a gap that begins before a stretch or ends after it
//! still counts for it, since the probe heard nothing during it.
//!
//! Times are wall-clock nanoseconds since the Unix epoch, the clock of the
//! stamps (`stamp.rs`), so send times, receive times and the marks of the
//! timeline compare directly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;

use crate::client::{self, SETUP_TIMEOUT_S, within};
use crate::error::BenchError;
use crate::stamp::{Stamp, now_unix_ns};
use crate::stats::{self, Counters, LatencySummary};
use crate::stop::Stop;

const ROLE: &str = "probe consumer";

/// The instants a run's stretches begin and end at. Each is set once, by
/// the task that reaches it, and read by the probe on every delivery.
#[derive(Debug)]
pub struct Timeline {
    /// Unix nanoseconds; 0 while the mark is not reached.
    marks: Vec<AtomicU64>,
}

impl Timeline {
    /// A timeline of `marks` marks, none reached yet.
    pub fn new(marks: usize) -> Self {
        Self {
            marks: (0..marks).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets mark `index` to now unless it is already set, and returns its
    /// value. Marks a phase that never began (the disruption stopped early)
    /// at the moment its end is known, so that no stretch stays open.
    pub fn mark(&self, index: usize) -> u64 {
        // 0 means "not reached", so a clock before 1970 reads as 1 ns.
        let now = now_unix_ns().max(1);
        match self.marks[index].compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now,
            Err(earlier) => earlier,
        }
    }

    /// Mark `index`, or `None` while it is not reached.
    pub fn get(&self, index: usize) -> Option<u64> {
        match self.marks[index].load(Ordering::Acquire) {
            0 => None,
            mark => Some(mark),
        }
    }

    /// Seconds from mark `start` to mark `end`; 0 unless both are reached.
    pub fn seconds(&self, start: usize, end: usize) -> f64 {
        match (self.get(start), self.get(end)) {
            (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1e9,
            _ => 0.0,
        }
    }
}

/// A stretch of the run between two marks of the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    pub name: &'static str,
    pub start: usize,
    pub end: usize,
}

/// Whether the interval from `from_ns` to `to_ns` overlaps the stretch from
/// `start` to `end`. A stretch not yet begun overlaps nothing; one not yet
/// ended has no end so far.
fn overlaps(from_ns: u64, to_ns: u64, start: Option<u64>, end: Option<u64>) -> bool {
    let Some(start) = start else {
        return false;
    };
    to_ns > start && end.is_none_or(|end| from_ns < end)
}

/// What the probe saw during one stretch.
#[derive(Debug)]
struct StretchTally {
    /// Latency of the messages in flight during the stretch.
    latency: Histogram<u64>,
    /// Longest gap between deliveries that overlaps the stretch.
    longest_silence_ns: u64,
}

/// The probe's figures for one stretch, in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StretchReport {
    pub name: &'static str,
    /// Length of the stretch, seconds.
    pub elapsed_s: f64,
    /// Probe messages in flight during the stretch (sent before its end,
    /// received after its start).
    pub deliveries: u64,
    /// Their end-to-end latency; `None` when there were none.
    pub latency: Option<LatencySummary>,
    /// Largest gap between consecutive probe deliveries that overlaps the
    /// stretch, microseconds.
    pub longest_silence_us: u64,
}

/// Every stretch's figures, updated on each delivery.
#[derive(Debug)]
pub struct ProbeTally {
    stretches: Vec<Stretch>,
    tallies: Vec<StretchTally>,
    /// When the last delivery arrived (at first: when the probe subscribed).
    last_ns: u64,
    /// Deliveries without a stamp: not published by the probe.
    unstamped: u64,
}

impl ProbeTally {
    /// Tallies for `stretches`, counting silence from `started_ns`.
    pub fn new(stretches: Vec<Stretch>, started_ns: u64) -> Self {
        let tallies = stretches
            .iter()
            .map(|_| StretchTally {
                latency: stats::latency_histogram(),
                longest_silence_ns: 0,
            })
            .collect();
        Self {
            stretches,
            tallies,
            last_ns: started_ns,
            unstamped: 0,
        }
    }

    /// Books one delivery received at `received_ns` that was sent at
    /// `sent_ns` (`None`: it carried no stamp).
    pub fn record(&mut self, timeline: &Timeline, sent_ns: Option<u64>, received_ns: u64) {
        for (stretch, tally) in self.stretches.iter().zip(&mut self.tallies) {
            let start = timeline.get(stretch.start);
            let end = timeline.get(stretch.end);
            if overlaps(self.last_ns, received_ns, start, end) {
                let silence_ns = received_ns.saturating_sub(self.last_ns);
                tally.longest_silence_ns = tally.longest_silence_ns.max(silence_ns);
            }
            if let Some(sent_ns) = sent_ns
                && overlaps(sent_ns, received_ns, start, end)
            {
                stats::record_latency_ns(&mut tally.latency, received_ns.saturating_sub(sent_ns));
            }
        }
        if sent_ns.is_none() {
            self.unstamped += 1;
        }
        self.last_ns = received_ns;
    }

    /// Closes the silence since the last delivery at `end_ns`, when the
    /// probe stops: a broker that never answered again is silent until then.
    pub fn finish(&mut self, timeline: &Timeline, end_ns: u64) {
        for (stretch, tally) in self.stretches.iter().zip(&mut self.tallies) {
            let start = timeline.get(stretch.start);
            let end = timeline.get(stretch.end);
            if overlaps(self.last_ns, end_ns, start, end) {
                let silence_ns = end_ns.saturating_sub(self.last_ns);
                tally.longest_silence_ns = tally.longest_silence_ns.max(silence_ns);
            }
        }
        self.last_ns = end_ns;
    }

    /// The figures of the stretch called `name`.
    ///
    /// # Panics
    /// If there is no such stretch: the names are the run's own constants.
    pub fn report(&self, timeline: &Timeline, name: &str) -> StretchReport {
        let (stretch, tally) = self
            .stretches
            .iter()
            .zip(&self.tallies)
            .find(|(stretch, _)| stretch.name == name)
            .unwrap_or_else(|| panic!("no probe stretch called {name}"));
        StretchReport {
            name: stretch.name,
            elapsed_s: timeline.seconds(stretch.start, stretch.end),
            deliveries: tally.latency.len(),
            latency: LatencySummary::of(&tally.latency),
            longest_silence_us: tally.longest_silence_ns / 1_000,
        }
    }

    /// Deliveries that carried no stamp.
    pub fn unstamped(&self) -> u64 {
        self.unstamped
    }
}

/// The probe's consumer, subscribed with automatic acks: it never holds a
/// message, so nothing of its own can slow the broker's deliveries to it.
pub struct ProbeConsumer {
    connection: Connection,
    /// Kept until the connection closes: lapin closes a dropped channel by
    /// itself, and that close racing the connection's fails the latter.
    _channel: Channel,
    deliveries: lapin::Consumer,
}

/// What the probe's consumer brings back.
#[derive(Debug)]
pub struct ProbeOutcome {
    pub tally: ProbeTally,
    pub error: Option<BenchError>,
}

impl ProbeConsumer {
    /// Connects and subscribes to `queue`.
    pub async fn subscribe(url: &str, queue: &str) -> Result<Self, BenchError> {
        let connection = client::connect(url, ROLE).await?;
        let channel = within(
            ROLE,
            "channel.open",
            SETUP_TIMEOUT_S,
            connection.create_channel(),
        )
        .await?;
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let deliveries = within(
            ROLE,
            "basic.consume",
            SETUP_TIMEOUT_S,
            channel.basic_consume(
                queue.into(),
                "warren-bench-probe".into(),
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Self {
            connection,
            _channel: channel,
            deliveries,
        })
    }

    /// Receives until `stop`, booking each delivery into `tally` and
    /// counting it in `counters.consumed`; triggers `first` at the first one.
    pub async fn run(
        self,
        timeline: Arc<Timeline>,
        mut tally: ProbeTally,
        first: Arc<Stop>,
        counters: Arc<Counters>,
        stop: Arc<Stop>,
    ) -> ProbeOutcome {
        let Self {
            connection,
            _channel,
            mut deliveries,
        } = self;
        let stopped = stop.triggered();
        tokio::pin!(stopped);
        let receiving: Result<(), BenchError> = async {
            loop {
                tokio::select! {
                    biased;
                    () = &mut stopped => return Ok(()),
                    next = deliveries.next() => {
                        let delivery = match next {
                            Some(Ok(delivery)) => delivery,
                            Some(Err(source)) => {
                                return Err(BenchError::amqp(ROLE, "basic.deliver", source));
                            }
                            None => {
                                return Err(BenchError::Cancelled {
                                    role: ROLE.to_owned(),
                                });
                            }
                        };
                        let received_ns = now_unix_ns();
                        let sent_ns = Stamp::decode(&delivery.data).map(|stamp| stamp.sent_unix_ns);
                        tally.record(&timeline, sent_ns, received_ns);
                        counters.consumed.fetch_add(1, Ordering::Relaxed);
                        first.trigger();
                    }
                }
            }
        }
        .await;
        tally.finish(&timeline, now_unix_ns());
        drop(deliveries);
        let closing = client::close(&connection, ROLE).await;
        ProbeOutcome {
            tally,
            error: receiving.err().or(closing.err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A timeline whose marks are set to these values (0: not reached).
    fn timeline(marks: &[u64]) -> Timeline {
        let timeline = Timeline::new(marks.len());
        for (mark, &value) in timeline.marks.iter().zip(marks) {
            mark.store(value, Ordering::Relaxed);
        }
        timeline
    }

    fn stretches() -> Vec<Stretch> {
        vec![
            Stretch {
                name: "before",
                start: 0,
                end: 1,
            },
            Stretch {
                name: "during",
                start: 1,
                end: 2,
            },
            Stretch {
                name: "after",
                start: 2,
                end: 3,
            },
        ]
    }

    #[test]
    fn overlap_needs_a_begun_stretch_and_an_interval_that_meets_it() {
        assert!(!overlaps(0, 10, None, None));
        assert!(overlaps(0, 10, Some(5), None));
        assert!(overlaps(0, 10, Some(5), Some(20)));
        assert!(overlaps(12, 30, Some(5), Some(20)));
        // Touching an end is not overlapping it.
        assert!(!overlaps(0, 5, Some(5), Some(20)));
        assert!(!overlaps(20, 30, Some(5), Some(20)));
    }

    #[test]
    fn a_silence_counts_for_every_stretch_it_overlaps() {
        // before 1000..2000 ms, during 2000..3000 ms, after 3000..4000 ms.
        let timeline = timeline(&[1000 * MS, 2000 * MS, 3000 * MS, 4000 * MS]);
        let mut tally = ProbeTally::new(stretches(), 900 * MS);
        for at_ms in (1000..1990).step_by(1) {
            tally.record(&timeline, Some((at_ms - 1) * MS), at_ms * MS);
        }
        // Nothing from 1989 ms until 2500 ms: a 511 ms silence across the
        // start of the disruption.
        tally.record(&timeline, Some(2499 * MS), 2500 * MS);
        for at_ms in 2501..4000 {
            tally.record(&timeline, Some((at_ms - 1) * MS), at_ms * MS);
        }
        tally.finish(&timeline, 4000 * MS);
        let before = tally.report(&timeline, "before");
        let during = tally.report(&timeline, "during");
        let after = tally.report(&timeline, "after");
        assert_eq!(before.longest_silence_us, 511_000);
        assert_eq!(during.longest_silence_us, 511_000);
        assert_eq!(after.longest_silence_us, 1_000);
        assert_eq!(during.elapsed_s, 1.0);
        // Every message takes 1 ms. In flight during the disruption: the one
        // received at 2500 ms and those received from 2501 ms to 3000 ms
        // (the one received at 3001 ms was sent as it ended).
        assert_eq!(during.latency.as_ref().map(|l| l.max_us), Some(1_000));
        assert_eq!(during.deliveries, 1 + 500);
        // The first, received as "before" began, was not in flight during it.
        assert_eq!(before.deliveries, 989);
        assert_eq!(tally.unstamped(), 0);
    }

    #[test]
    fn a_message_in_flight_across_a_stretch_counts_its_latency_there() {
        let timeline = timeline(&[1000 * MS, 2000 * MS, 3000 * MS, 4000 * MS]);
        let mut tally = ProbeTally::new(stretches(), 900 * MS);
        tally.record(&timeline, Some(1500 * MS), 1501 * MS);
        // Sent before the disruption, received after it: stuck throughout.
        tally.record(&timeline, Some(1900 * MS), 3100 * MS);
        let before = tally.report(&timeline, "before");
        let during = tally.report(&timeline, "during");
        let after = tally.report(&timeline, "after");
        assert_eq!(before.deliveries, 2);
        assert_eq!(during.deliveries, 1);
        assert_eq!(after.deliveries, 1);
        // 1.2 s, within the histogram's 0.1% resolution.
        let max_us = during.latency.as_ref().map_or(0, |l| l.max_us);
        assert!((1_199_000..=1_201_200).contains(&max_us), "{max_us}");
        assert_eq!(during.longest_silence_us, 1_599_000);
    }

    #[test]
    fn a_probe_that_never_hears_again_is_silent_until_it_stops() {
        let timeline = timeline(&[1000 * MS, 2000 * MS, 3000 * MS, 4000 * MS]);
        let mut tally = ProbeTally::new(stretches(), 900 * MS);
        tally.record(&timeline, Some(1499 * MS), 1500 * MS);
        tally.finish(&timeline, 4500 * MS);
        assert_eq!(
            tally.report(&timeline, "during").longest_silence_us,
            3_000_000
        );
        assert_eq!(tally.report(&timeline, "during").latency, None);
    }

    #[test]
    fn stretches_not_begun_see_nothing_and_open_ones_see_everything_since() {
        // Only "before" has begun, and it has not ended.
        let timeline = timeline(&[1000 * MS, 0, 0, 0]);
        let mut tally = ProbeTally::new(stretches(), 900 * MS);
        tally.record(&timeline, None, 1100 * MS);
        tally.record(&timeline, Some(5000 * MS), 5001 * MS);
        assert_eq!(tally.report(&timeline, "during").deliveries, 0);
        assert_eq!(tally.report(&timeline, "during").longest_silence_us, 0);
        let before = tally.report(&timeline, "before");
        assert_eq!(before.deliveries, 1);
        assert_eq!(before.longest_silence_us, 3_901_000);
        assert_eq!(before.elapsed_s, 0.0);
        assert_eq!(tally.unstamped(), 1);
    }

    #[test]
    fn a_mark_is_set_once() {
        let timeline = Timeline::new(2);
        assert_eq!(timeline.get(0), None);
        let first = timeline.mark(0);
        assert_eq!(timeline.mark(0), first);
        assert_eq!(timeline.get(0), Some(first));
        assert_eq!(timeline.seconds(0, 1), 0.0);
    }
}
