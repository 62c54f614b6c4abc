//! Broker memory sampling: the resident set size from `/proc/PID/status`.
//!
//! RSS is read from the kernel's status text (`VmRSS`) rather than through a
//! process-inspection crate because that line is all this tool needs, and it
//! is the same number `ps` and `top` show. The sampler runs beside the load
//! and keeps the peak; a broker that grows without bound under steady load is
//! one of the things this benchmark is for.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::BenchError;
use crate::stop::Stop;

/// How often the sampler reads the status file. Short enough to catch a
/// transient peak during a 10 s run, long enough to cost the host nothing.
pub const SAMPLE_INTERVAL_MS: u64 = 100;

/// Pulls the `VmRSS` value out of a `/proc/PID/status` text, in bytes.
///
/// Returns `None` when the line is missing (kernel threads and zombies have
/// none) or malformed. The kernel always reports the value in kB (KiB).
pub fn parse_vm_rss_bytes(status_text: &str) -> Option<u64> {
    let line = status_text
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let mut fields = line.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    // Any other unit means a format this parser does not know; guessing
    // would report a wrong peak, so report none.
    if fields.next() != Some("kB") {
        return None;
    }
    value.checked_mul(1024)
}

/// Shared view of the broker's RSS, written by the sampler task.
#[derive(Debug, Default)]
pub struct RssGauge {
    /// Highest RSS seen so far, bytes; 0 before the first sample.
    peak_bytes: AtomicU64,
    /// Most recent RSS sample, bytes; 0 before the first sample.
    current_bytes: AtomicU64,
}

impl RssGauge {
    /// Records one sample.
    pub fn record(&self, rss_bytes: u64) {
        self.current_bytes.store(rss_bytes, Ordering::Relaxed);
        self.peak_bytes.fetch_max(rss_bytes, Ordering::Relaxed);
    }

    /// Highest RSS seen so far, bytes.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    /// Latest RSS sample, bytes.
    pub fn current_bytes(&self) -> u64 {
        self.current_bytes.load(Ordering::Relaxed)
    }
}

/// Reads the RSS of process `pid` once.
pub fn read_rss_bytes(pid: u32) -> Result<u64, BenchError> {
    let path = status_path(pid);
    let text = std::fs::read_to_string(&path).map_err(|source| BenchError::RssRead {
        path: path.clone(),
        source,
    })?;
    parse_vm_rss_bytes(&text).ok_or(BenchError::RssMissing { path })
}

fn status_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/status"))
}

/// Samples `pid` every [`SAMPLE_INTERVAL_MS`] into `gauge` until `stop`. Returns the number of failed reads, which
/// the report shows: a broker that died mid-run must not look like a flat RSS.
pub async fn sample(pid: u32, gauge: Arc<RssGauge>, stop: Arc<Stop>) -> u64 {
    let mut ticker = tokio::time::interval(Duration::from_millis(SAMPLE_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failed_reads = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.triggered() => break,
        }
        match read_rss_bytes(pid) {
            Ok(rss_bytes) => gauge.record(rss_bytes),
            Err(_) => failed_reads += 1,
        }
    }
    // One last sample so the end-of-run value is fresh.
    match read_rss_bytes(pid) {
        Ok(rss_bytes) => gauge.record(rss_bytes),
        Err(_) => failed_reads += 1,
    }
    failed_reads
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from a real `/proc/PID/status` on Linux 6.1.
    const STATUS_SAMPLE: &str = "\
Name:\twarren
Umask:\t0022
State:\tS (sleeping)
Tgid:\t12345
Pid:\t12345
VmPeak:\t  1234568 kB
VmSize:\t  1234564 kB
VmLck:\t       0 kB
VmHWM:\t   98304 kB
VmRSS:\t   81920 kB
RssAnon:\t   65536 kB
RssFile:\t   16384 kB
Threads:\t5
";

    #[test]
    fn parses_vm_rss_in_kib() {
        assert_eq!(parse_vm_rss_bytes(STATUS_SAMPLE), Some(81_920 * 1024));
    }

    #[test]
    fn does_not_confuse_rss_with_its_neighbours() {
        // RssAnon and VmHWM come near VmRSS; only the VmRSS line counts.
        let text = "VmHWM:\t 5 kB\nRssAnon:\t 7 kB\nVmRSS:\t 3 kB\n";
        assert_eq!(parse_vm_rss_bytes(text), Some(3 * 1024));
    }

    #[test]
    fn missing_or_malformed_line_is_none() {
        // Kernel threads have no Vm* lines at all.
        assert_eq!(parse_vm_rss_bytes("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(parse_vm_rss_bytes("VmRSS:\t lots kB\n"), None);
        assert_eq!(parse_vm_rss_bytes("VmRSS:\t 12 GB\n"), None);
        assert_eq!(parse_vm_rss_bytes("VmRSS:\n"), None);
    }

    #[test]
    fn gauge_keeps_the_peak_and_the_latest() {
        let gauge = RssGauge::default();
        for rss_bytes in [10, 30, 20] {
            gauge.record(rss_bytes);
        }
        assert_eq!(gauge.peak_bytes(), 30);
        assert_eq!(gauge.current_bytes(), 20);
    }

    #[test]
    fn reads_our_own_rss() {
        let rss_bytes = read_rss_bytes(std::process::id()).expect("own status");
        // A running test binary holds at least a megabyte.
        assert!(rss_bytes > 1024 * 1024, "{rss_bytes}");
    }
}
