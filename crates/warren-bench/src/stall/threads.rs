//! The probe's threads, and the lower CPU priority of everything else in
//! stall mode.
//!
//! On a small machine the probe shares its CPUs with the disruptor, and a
//! disruptor that publishes as fast as it can takes them: the probe's
//! messages then wait in this process, not in the broker, and the probe
//! would report the load generator's contention as the broker's stall. So
//! the probe runs on threads of its own (a runtime, and the I/O thread lapin
//! starts for each of its connections), and every other thread runs at a
//! lower priority (`DISRUPTOR_NICE`): the probe's threads go first whenever
//! both are ready, and the disruptor still has whatever CPU the probe leaves.
//!
//! On Linux the nice value belongs to a thread and a new thread inherits its
//! creator's. The probe's runtime is therefore started first; then the
//! calling thread lowers its own priority, and the runtime it builds next,
//! the connections it opens and the threads lapin starts for them all
//! inherit it. Raising a priority again would need privileges; lowering
//! one never does.

use std::io;

use tokio::runtime::{Handle, Runtime};

/// How much lower than the probe the rest of the process runs: at nice 10
/// a thread gets about a tenth of the CPU time of one at nice 0 when both
/// want it.
pub const DISRUPTOR_NICE: libc::c_int = 10;

/// The runtime the probe's connections and tasks run on.
pub struct ProbeThreads {
    runtime: Runtime,
}

impl ProbeThreads {
    /// Starts the probe's runtime, then lowers the calling thread's
    /// priority for everything it starts afterwards (see the module
    /// documentation). A priority that cannot be lowered is reported on
    /// stderr and the run goes on without it.
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("warren-bench-probe")
            .enable_all()
            .build()?;
        if let Err(error) = lower_this_thread_priority(DISRUPTOR_NICE) {
            eprintln!(
                "warren-bench: could not lower the disruptor's priority ({error}); the probe \
                 shares the CPU with it on equal terms"
            );
        }
        Ok(Self { runtime })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }
}

/// Sets the calling thread's nice value to `nice`, unless it is already
/// that low a priority.
fn lower_this_thread_priority(nice: libc::c_int) -> io::Result<()> {
    // getpriority may return -1 as a value, so errno tells a failure apart.
    // SAFETY: errno is thread-local; getpriority and setpriority read and
    // change only the calling thread's scheduling attributes (who = 0).
    unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if current == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        if current >= nice {
            return Ok(());
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
