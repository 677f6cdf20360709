//! Optional thread-CPU-time measurement for criterion's `iter_custom`.
//!
//! On a machine shared with other work (this project's 2-core box often runs 8 builds at
//! once), wall time mostly measures the scheduler: a 4 ns call reads as 90 ns. With
//! `BENCH_CLOCK=cpu` the benches that use [`measure`] time each thread's own CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) instead, which leaves preemption out. It also leaves out
//! most cross-thread contention when the two threads rarely run at once, so two-thread
//! figures taken this way understate contention; the default stays wall time.

use std::time::{Duration, Instant};

/// Whether `BENCH_CLOCK=cpu` is set.
pub fn cpu_clock() -> bool {
    std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "cpu")
}

/// This thread's CPU time so far (`CLOCK_THREAD_CPUTIME_ID`).
#[allow(unsafe_code)]
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` and returns the time it took: this thread's CPU time with `BENCH_CLOCK=cpu`,
/// else wall time.
#[inline]
pub fn measure<F: FnOnce()>(f: F) -> Duration {
    if cpu_clock() {
        let t0 = thread_cpu();
        f();
        thread_cpu().saturating_sub(t0)
    } else {
        let t0 = Instant::now();
        f();
        t0.elapsed()
    }
}

/// The fixed-workload mode callgrind counts by (`RUN_VAR=name N_VAR=n`, e.g.
/// `DISPATCH_RUN`/`DISPATCH_N`, `GATEWAY_RUN`/`GATEWAY_N`): `Some(n)` when `name` is the
/// case asked for (n from `n_var`, else `default_n`), `None` otherwise. The caller runs
/// its workload `n` times and exits the process.
#[allow(dead_code)] // not every bench that loads this module has such a mode
pub fn fixed_run(run_var: &str, n_var: &str, name: &str, default_n: u64) -> Option<u64> {
    if std::env::var(run_var).map_or(true, |v| v != name) {
        return None;
    }
    Some(
        std::env::var(n_var)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default_n),
    )
}
