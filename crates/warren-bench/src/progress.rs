//! Live progress on stderr while a run goes: a bar per phase and the current
//! rates, so a stalled broker shows as a stalled bar rather than silence.
//!
//! Nothing is drawn when stderr is not a terminal (CI logs, `2>file`) or with
//! `--quiet`; stdout carries only the summary either way.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stats::Counters;
use crate::stop::Stop;

/// How often the bar's counts and rates are refreshed. Rates are computed
/// over this interval, so shorter makes them jumpy and longer makes them lag.
const REFRESH_INTERVAL_MS: u64 = 500;

/// What a bar's position follows.
#[derive(Clone, Copy, Debug)]
pub enum Track {
    /// Milliseconds since the phase started (a fixed-duration run).
    ElapsedMs,
    /// Messages published so far (prefill).
    Published,
    /// Messages consumed so far (drain).
    Consumed,
}

/// Whether bars are drawn at all.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    visible: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            visible: !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// A bar of `length` units labelled `phase`.
    pub fn bar(&self, phase: &'static str, length: u64) -> ProgressBar {
        let target = if self.visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
        )
        .expect("constant template is valid");
        ProgressBar::with_draw_target(Some(length), target)
            .with_style(style)
            .with_prefix(phase)
    }
}

/// Updates `bar` from `counters` every [`REFRESH_INTERVAL_MS`] until `stop`,
/// then clears it so the summary that follows starts on a clean line.
pub async fn follow(bar: ProgressBar, track: Track, counters: Arc<Counters>, stop: Arc<Stop>) {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(REFRESH_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = (Instant::now(), counters.snapshot());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.triggered() => break,
        }
        let now = Instant::now();
        let snapshot = counters.snapshot();
        let (published, confirmed, consumed) = snapshot;
        let interval_s = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate =
            |current: u64, previous: u64| current.saturating_sub(previous) as f64 / interval_s;
        let (last_published, last_confirmed, last_consumed) = last.1;
        bar.set_message(format!(
            "pub {:>9.0}/s  conf {:>9.0}/s  cons {:>9.0}/s",
            rate(published, last_published),
            rate(confirmed, last_confirmed),
            rate(consumed, last_consumed),
        ));
        bar.set_position(match track {
            Track::ElapsedMs => u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            Track::Published => published,
            Track::Consumed => consumed,
        });
        last = (now, snapshot);
    }
    bar.finish_and_clear();
}
