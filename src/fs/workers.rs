//! Where the FUSE worker threads run. A FUSE request is a round trip: the caller
//! sleeps until a worker has answered. When the worker runs on another CPU, each
//! direction wakes an idle CPU, which on a virtual machine is an inter-processor
//! interrupt and a hypervisor exit. With one worker pinned to each CPU, requests
//! and replies mostly stay on the CPU they were made on (`tar x` ran 1.45x
//! faster on a 2-CPU VM; see BENCHMARKS.md).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The CPUs workers are pinned to, one each, in the order they first serve a
/// request; empty when they are left to the scheduler.
#[derive(Debug, Default)]
pub(crate) struct WorkerCpus {
    cpus: Vec<usize>,
    next: AtomicUsize,
}

thread_local! {
    /// Whether this thread has been placed (or found it has nothing to do).
    static SETTLED: Cell<bool> = const { Cell::new(false) };
}

impl WorkerCpus {
    /// A plan for `workers` threads over the CPUs this process may use: one
    /// worker per CPU, or none pinned if the counts differ (a worker more than
    /// the CPUs would share one; fewer would leave CPUs whose callers always
    /// cross to another).
    pub(crate) fn plan(workers: usize) -> Self {
        let cpus = allowed_cpus();
        Self {
            cpus: if cpus.len() == workers && workers > 1 {
                cpus
            } else {
                Vec::new()
            },
            next: AtomicUsize::new(0),
        }
    }

    /// The CPUs workers go to, in order.
    pub(crate) fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Pins the calling worker to the next CPU of the plan the first time it
    /// calls; later calls cost one thread-local read.
    pub(crate) fn settle(&self) {
        if self.cpus.is_empty() || SETTLED.with(|s| s.replace(true)) {
            return;
        }
        let cpu = self.cpus[self.next.fetch_add(1, Ordering::Relaxed) % self.cpus.len()];
        if let Err(e) = pin_to(cpu) {
            tracing::debug!(cpu, error = %e, "could not pin a FUSE worker");
        }
    }
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

/// Restricts the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as above; `cpu` comes from `allowed_cpus`, below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
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
        let plan = WorkerCpus::plan(cpus.len());
        if cpus.len() > 1 {
            assert_eq!(plan.cpus(), &cpus[..]);
        }
        assert!(WorkerCpus::plan(cpus.len() + 1).cpus().is_empty());
    }

    #[test]
    fn a_settled_worker_runs_on_its_cpu_only() {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            return;
        }
        let plan = std::sync::Arc::new(WorkerCpus::plan(cpus.len()));
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
