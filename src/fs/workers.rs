//! Where the FUSE worker threads run. A FUSE request is a round trip: the caller
//! sleeps until a worker has answered. When the worker runs on another CPU, each
//! direction wakes an idle CPU, which on a virtual machine is an inter-processor
//! interrupt and a hypervisor exit. With one worker pinned to each CPU, requests
//! and replies mostly stay on the CPU they were made on (`tar x` ran 1.45x
//! faster on a 2-CPU VM; see BENCHMARKS.md).
//!
//! A pinned worker cannot flee a CPU that other work keeps busy: each request
//! would wait for it. So every worker watches how long it waits to run (the
//! kernel's per-thread run delay); when that grows past a limit per request
//! (`busy_cpu_us` in `brume.conf`, 40 µs by default) it unpins itself, and tries
//! its CPU again [`RETRY_AFTER`] later.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Requests between two looks at the run delay.
const CHECK_EVERY: u32 = 64;
/// Looks in a row that must find the CPU busy before the worker unpins.
const STRIKES: u8 = 2;
/// How long an unpinned worker stays free before trying its CPU again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The CPUs workers are pinned to, one each, in the order they first serve a
/// request; empty when they are left to the scheduler.
#[derive(Debug, Default)]
pub(crate) struct WorkerCpus {
    cpus: Vec<usize>,
    next: AtomicUsize,
    /// Mean wait to run per request above which a pinned worker's CPU counts
    /// as busy with other work, if it does at [`STRIKES`] looks in a row.
    /// (Measured on a 2-CPU VM: 9 µs median and 14 µs p90 on an idle CPU, the
    /// highest 80 µs; 57 µs median on a CPU kept busy by another program.)
    contended: Duration,
}

/// One worker's placement.
#[derive(Debug)]
struct Worker {
    cpu: usize,
    pinned: bool,
    /// Requests since the last look at the run delay.
    served: u32,
    /// Looks in a row that found the CPU busy.
    strikes: u8,
    /// The run delay then (`None`: the kernel does not report it).
    delay: Option<Duration>,
    /// When the worker last changed placement.
    since: Instant,
}

thread_local! {
    /// This thread's placement, once it served a request.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

impl WorkerCpus {
    /// A plan for `workers` threads over the CPUs this process may use: one
    /// worker per CPU, or none pinned if the counts differ (a worker more than
    /// the CPUs would share one; fewer would leave CPUs whose callers always
    /// cross to another).
    pub(crate) fn plan(workers: usize, contended: Duration) -> Self {
        let cpus = allowed_cpus();
        Self {
            cpus: if cpus.len() == workers && workers > 1 {
                cpus
            } else {
                Vec::new()
            },
            next: AtomicUsize::new(0),
            contended,
        }
    }

    /// The CPUs workers go to, in order.
    pub(crate) fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Called by a worker for each request it serves: pins it to the next CPU
    /// of the plan the first time; afterwards, every [`CHECK_EVERY`] requests,
    /// unpins it while its CPU is busy with other work.
    pub(crate) fn settle(&self) {
        if self.cpus.is_empty() {
            return;
        }
        WORKER.with(|w| {
            let mut w = w.borrow_mut();
            let w = w.get_or_insert_with(|| {
                let cpu = self.cpus[self.next.fetch_add(1, Ordering::Relaxed) % self.cpus.len()];
                place(Some(cpu), &self.cpus);
                Worker {
                    cpu,
                    pinned: true,
                    served: 0,
                    strikes: 0,
                    delay: run_delay(),
                    since: Instant::now(),
                }
            });
            w.served += 1;
            if w.served < CHECK_EVERY {
                return;
            }
            let delay = run_delay();
            let waited = match (w.delay, delay) {
                (Some(before), Some(now)) => now.saturating_sub(before) / w.served,
                _ => Duration::ZERO,
            };
            (w.served, w.delay) = (0, delay);
            w.strikes = if waited > self.contended {
                w.strikes + 1
            } else {
                0
            };
            if w.pinned && w.strikes >= STRIKES {
                tracing::debug!(
                    cpu = w.cpu,
                    ?waited,
                    "a FUSE worker's CPU is busy; unpinning it"
                );
                place(None, &self.cpus);
                (w.pinned, w.strikes, w.since) = (false, 0, Instant::now());
            } else if !w.pinned && w.since.elapsed() >= RETRY_AFTER {
                place(Some(w.cpu), &self.cpus);
                (w.pinned, w.strikes, w.since) = (true, 0, Instant::now());
            }
        });
    }
}

/// Pins the calling thread to `cpu`, or lets it run on all of `cpus`.
fn place(cpu: Option<usize>, cpus: &[usize]) {
    let r = match cpu {
        Some(cpu) => set_affinity(&[cpu]),
        None => set_affinity(cpus),
    };
    if let Err(e) = r {
        tracing::debug!(?cpu, error = %e, "could not place a FUSE worker");
    }
}

/// How long the calling thread has waited to run, in all (the kernel's
/// `/proc/thread-self/schedstat`, second field).
fn run_delay() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills in.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Restricts the calling thread to `cpus`.
fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as above; the CPUs come from `allowed_cpus`, below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_pins_one_worker_per_allowed_cpu_or_none() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let plan = WorkerCpus::plan(cpus.len(), Duration::from_micros(40));
        if cpus.len() > 1 {
            assert_eq!(plan.cpus(), &cpus[..]);
        }
        assert!(
            WorkerCpus::plan(cpus.len() + 1, Duration::from_micros(40))
                .cpus()
                .is_empty()
        );
    }

    #[test]
    fn a_settled_worker_runs_on_its_cpu_only() {
        let cpus = allowed_cpus();
        assert!(cpus.len() >= 2, "needs 2 CPUs to pin on; may use {cpus:?}");
        let plan = std::sync::Arc::new(WorkerCpus::plan(cpus.len(), Duration::from_micros(40)));
        let mut seen: Vec<Vec<usize>> = (0..cpus.len())
            .map(|_| {
                let plan = plan.clone();
                std::thread::spawn(move || {
                    plan.settle();
                    plan.settle();
                    allowed_cpus()
                })
                .join()
                .unwrap()
            })
            .collect();
        seen.sort();
        let mut want: Vec<Vec<usize>> = cpus.iter().map(|&c| vec![c]).collect();
        want.sort();
        assert_eq!(seen, want);
    }
}
