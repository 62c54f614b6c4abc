//! Resource alarms, as RabbitMQ has them: while free disk space is under
//! its limit, or the broker's resident memory over its high watermark,
//! connections that publish get `connection.blocked` and are not read;
//! consumers keep draining. `connection.unblocked` follows once every
//! alarm has cleared.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    pub disk: bool,
    pub memory: bool,
}

impl Alarms {
    pub fn any(self) -> bool {
        self.disk || self.memory
    }

    /// The reason `connection.blocked` gives, in RabbitMQ's words.
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            _ => "low on disk",
        }
    }
}

/// The memory alarm's threshold: a fraction of the memory the broker may
/// use (the machine's, or its cgroup's limit when lower), or a number of
/// bytes (RabbitMQ's `vm_memory_high_watermark.relative` and `.absolute`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryWatermark {
    Relative(f64),
    Absolute(u64),
}

impl Default for MemoryWatermark {
    /// RabbitMQ's default.
    fn default() -> Self {
        MemoryWatermark::Relative(0.4)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WatermarkError {
    #[error("a relative memory watermark must be above 0 and at most 1, not {0}")]
    Relative(f64),
    #[error("an absolute memory watermark must be at least 1 byte")]
    Absolute,
}

impl MemoryWatermark {
    pub fn validated(self) -> Result<Self, WatermarkError> {
        match self {
            MemoryWatermark::Relative(fraction) if !(fraction > 0.0 && fraction <= 1.0) => {
                Err(WatermarkError::Relative(fraction))
            }
            MemoryWatermark::Absolute(0) => Err(WatermarkError::Absolute),
            valid => Ok(valid),
        }
    }
}

/// The broker's resident memory against its watermark, sampled by
/// `watch_memory` and read by the management API and metrics.
#[derive(Debug)]
pub struct MemoryMonitor {
    watermark: Mutex<MemoryWatermark>,
    /// What the broker may use at most: the machine's memory, or the
    /// cgroup's limit when that is lower.
    available_bytes: u64,
    used_bytes: AtomicU64,
    alarm: AtomicBool,
    /// Wakes the watcher when the watermark changes, so that a new limit
    /// takes effect at once.
    changed: Notify,
}

impl MemoryMonitor {
    pub fn new(watermark: MemoryWatermark) -> Self {
        Self {
            watermark: Mutex::new(watermark),
            available_bytes: available_memory_bytes(),
            used_bytes: AtomicU64::new(resident_bytes().unwrap_or(0)),
            alarm: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub fn watermark(&self) -> MemoryWatermark {
        *self.watermark.lock()
    }

    /// Changes the watermark at run time (as `rabbitmqctl
    /// set_vm_memory_high_watermark` does); the alarm follows within a
    /// moment.
    pub fn set_watermark(&self, watermark: MemoryWatermark) -> Result<(), WatermarkError> {
        *self.watermark.lock() = watermark.validated()?;
        self.changed.notify_one();
        Ok(())
    }

    /// Resident bytes above which the alarm is raised.
    pub fn limit_bytes(&self) -> u64 {
        match self.watermark() {
            MemoryWatermark::Relative(fraction) => (self.available_bytes as f64 * fraction) as u64,
            MemoryWatermark::Absolute(bytes) => bytes,
        }
    }

    /// The machine's (or cgroup's) memory the relative watermark is a
    /// fraction of.
    pub fn available_bytes(&self) -> u64 {
        self.available_bytes
    }

    /// Resident memory at the last sample.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub fn alarm(&self) -> bool {
        self.alarm.load(Ordering::Relaxed)
    }

    /// Samples resident memory; returns whether it is over the limit.
    fn sample(&self) -> bool {
        if let Some(used) = resident_bytes() {
            self.used_bytes.store(used, Ordering::Relaxed);
        }
        let over = self.used_bytes() > self.limit_bytes();
        self.alarm.store(over, Ordering::Relaxed);
        over
    }
}

/// Samples memory every `interval` (and whenever the watermark changes),
/// raising and clearing the memory alarm.
pub async fn watch_memory(
    monitor: Arc<MemoryMonitor>,
    interval: Duration,
    alarms: watch::Sender<Alarms>,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = monitor.changed.notified() => {}
        }
        let over = monitor.sample();
        if over == alarms.borrow().memory {
            continue;
        }
        if over {
            warn!(
                used_bytes = monitor.used_bytes(),
                limit_bytes = monitor.limit_bytes(),
                "memory is over the high watermark; blocking publishers"
            );
        } else {
            info!(
                used_bytes = monitor.used_bytes(),
                limit_bytes = monitor.limit_bytes(),
                "memory is back under the high watermark; unblocking publishers"
            );
        }
        alarms.send_modify(|alarms| alarms.memory = over);
    }
}

/// The process's resident set, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the running system.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

/// The memory the broker may use: the machine's total, or the limit of
/// its cgroup (v2, then v1) when that is lower, as RabbitMQ reads it.
fn available_memory_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            meminfo
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kib| kib * 1024);
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    match (total, cgroup) {
        (Some(total), Some(cgroup)) => total.min(cgroup),
        (Some(total), None) => total,
        (None, Some(cgroup)) => cgroup,
        // Neither is readable (not Linux): a relative watermark then never
        // fires, and an absolute one still does.
        (None, None) => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_out_of_range_are_refused() {
        assert_eq!(
            MemoryWatermark::Relative(0.0).validated(),
            Err(WatermarkError::Relative(0.0))
        );
        assert!(MemoryWatermark::Relative(1.5).validated().is_err());
        assert!(MemoryWatermark::Relative(f64::NAN).validated().is_err());
        assert_eq!(
            MemoryWatermark::Absolute(0).validated(),
            Err(WatermarkError::Absolute)
        );
        assert!(MemoryWatermark::Relative(0.4).validated().is_ok());
    }

    #[test]
    fn the_limit_follows_the_watermark_and_the_alarm_the_limit() {
        let monitor = MemoryMonitor::new(MemoryWatermark::Absolute(1));
        assert!(monitor.sample(), "a process uses more than one byte");
        assert!(monitor.used_bytes() > 1024 * 1024);
        monitor
            .set_watermark(MemoryWatermark::Absolute(u64::MAX / 2))
            .unwrap();
        assert!(!monitor.sample());
        monitor
            .set_watermark(MemoryWatermark::Relative(0.5))
            .unwrap();
        assert_eq!(monitor.limit_bytes(), monitor.available_bytes() / 2);
    }

    #[test]
    fn the_reason_names_every_alarm_raised() {
        let both = Alarms {
            disk: true,
            memory: true,
        };
        assert_eq!(both.reason(), "low on memory and disk");
        assert_eq!(
            Alarms {
                disk: true,
                memory: false
            }
            .reason(),
            "low on disk"
        );
        assert_eq!(
            Alarms {
                disk: false,
                memory: true
            }
            .reason(),
            "low on memory"
        );
        assert!(!Alarms::default().any());
    }
}
