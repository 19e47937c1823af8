//! How much of this node's capacity is in use: the scaling signal.
//!
//! Warden's autoscaling rule is *scale on host saturation, not on queue length*: a
//! backlog of one account can only ever use one execution slot, so a deep queue says
//! nothing about whether another node would help. What does say it:
//!
//! - **slot saturation** — busy execution slots / slots, time-averaged over the last
//!   [`WINDOW`]. Slots are [`crate::ExecConfig::max_concurrent_attempts`] (the host's
//!   default is 32), else `max_actors`, the only other bound on concurrent handlers.
//!   A handler holds its slot from the moment it starts until it returns.
//! - **CPU** — this process's CPU time over the same window / the cores it may use
//!   (`available_parallelism`, which honours cgroup quotas).
//! - **runnable accounts** — accounts waiting for a slot: those in this node's
//!   partitions whose next job is due and unclaimed, plus those claimed here and
//!   waiting for one of its slots; summed over the nodes it is the cluster-wide
//!   "runnable accounts waiting for a slot".
//!
//! [`SlotMeter`] counts busy slots exactly (an integral of busy slots over time,
//! updated on every start and end), so a window's average is not a sample. The node
//! samples it every [`TICK`] and sets the gauges:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `warden_execution_slots` | gauge | slots |
//! | `warden_execution_slots_busy` | gauge | handlers running now |
//! | `warden_execution_busy_seconds_total` | counter | ∫ busy slots dt (`rate()` = mean busy slots) |
//! | `warden_saturation` | gauge 0..1 | busy / slots, mean over [`WINDOW`] |
//! | `warden_process_cpu_ratio` | gauge 0..1 | process CPU / cores, mean over [`WINDOW`] |
//! | `warden_runnable_accounts` | gauge | runnable accounts waiting in this node's partitions |

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The averaging window of the saturation and CPU gauges: long enough to smooth a
/// burst of short jobs, short enough that a controller scraping every 15 s sees the
/// current load.
pub const WINDOW: Duration = Duration::from_secs(10);

/// How often the gauges are updated.
pub const TICK: Duration = Duration::from_secs(1);

/// How often the runnable-accounts gauge is counted (one query over the node's
/// partitions' due jobs).
pub const RUNNABLE_EVERY: Duration = Duration::from_secs(5);

/// The runnable-accounts count stops at this many (a bounded query).
pub const RUNNABLE_CAP: i64 = 100_000;

/// The longest the runnable-accounts count may be spaced out (see [`runnable_interval`]).
pub const RUNNABLE_EVERY_MAX: Duration = Duration::from_secs(60);

/// When to count runnable accounts next, given how long the last count took: every
/// [`RUNNABLE_EVERY`], but never more than ~5% of the time busy counting. The count
/// groups every due job of the node's partitions, so its cost grows with the backlog
/// (measured on PostgreSQL 15, 2 cores: 200k due jobs over 5k accounts ≈ 0.1–0.3 s,
/// 2M over 50k ≈ 0.7–1.2 s), exactly when the database has the least to spare.
pub fn runnable_interval(took: Duration) -> Duration {
    (took * 20).clamp(RUNNABLE_EVERY, RUNNABLE_EVERY_MAX)
}

/// Exact busy-slot accounting for one node.
#[derive(Debug)]
pub struct SlotMeter {
    slots: usize,
    inner: Mutex<MeterInner>,
}

#[derive(Debug)]
struct MeterInner {
    busy: usize,
    /// Claimed attempts waiting for a slot.
    waiting: usize,
    /// ∫ busy dt up to `since`, in slot-seconds.
    integral: f64,
    since: Instant,
}

impl MeterInner {
    fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.since).as_secs_f64();
        self.integral += self.busy as f64 * dt;
        self.since = now;
    }
}

/// Holds one busy slot until dropped.
#[derive(Debug)]
pub struct Busy<'a>(&'a SlotMeter);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut m = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.advance(Instant::now());
        m.busy = m.busy.saturating_sub(1);
    }
}

/// Counts one attempt waiting for a slot until dropped.
#[derive(Debug)]
pub struct Waiting<'a>(&'a SlotMeter);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut m = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.waiting = m.waiting.saturating_sub(1);
    }
}

impl SlotMeter {
    /// A meter for a node with `slots` execution slots (at least 1).
    pub fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            inner: Mutex::new(MeterInner { busy: 0, waiting: 0, integral: 0.0, since: Instant::now() }),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// A handler starts: busy until the guard drops.
    pub fn start(&self) -> Busy<'_> {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.advance(Instant::now());
        m.busy += 1;
        Busy(self)
    }

    /// A claimed attempt starts waiting for a slot: counted until the guard drops.
    pub fn wait(&self) -> Waiting<'_> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).waiting += 1;
        Waiting(self)
    }

    /// Claimed attempts waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).waiting
    }

    /// Handlers running now.
    pub fn busy(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).busy
    }

    /// ∫ busy slots dt since the meter was made, in slot-seconds, up to `now`.
    pub fn busy_seconds(&self, now: Instant) -> f64 {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.advance(now);
        m.integral
    }
}

/// A node's saturation figures at one moment (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Saturation {
    pub slots: usize,
    pub busy: usize,
    /// Busy / slots, mean over the last [`WINDOW`] (or since start, if shorter).
    pub saturation: f64,
    /// Process CPU / cores, mean over the same window; `None` where `/proc` is absent.
    pub cpu: Option<f64>,
    /// Runnable accounts waiting for a slot: due and unclaimed in this node's
    /// partitions (at the last count) plus claimed here and waiting for a slot.
    pub runnable_accounts: Option<i64>,
}

/// One sample of the cumulative figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    busy_seconds: f64,
    cpu_seconds: Option<f64>,
}

/// Turns cumulative samples into window means. Pure but for the clock it is given.
#[derive(Debug)]
pub struct Window {
    samples: VecDeque<Sample>,
    window: Duration,
    cores: f64,
}

impl Window {
    pub fn new(window: Duration, cores: usize) -> Self {
        Self { samples: VecDeque::new(), window, cores: cores.max(1) as f64 }
    }

    /// Add a sample; returns (slot saturation, CPU ratio) over the window: from the
    /// oldest sample still inside it (the first sample gives zeros).
    pub fn push(
        &mut self,
        at: Instant,
        busy_seconds: f64,
        cpu_seconds: Option<f64>,
        slots: usize,
    ) -> (f64, Option<f64>) {
        self.samples.push_back(Sample { at, busy_seconds, cpu_seconds });
        // Keep one sample at or before the window's start, so the mean covers it all.
        while self.samples.len() > 2 && at.saturating_duration_since(self.samples[1].at) >= self.window {
            self.samples.pop_front();
        }
        let first = self.samples[0];
        let dt = at.saturating_duration_since(first.at).as_secs_f64();
        if dt <= 0.0 {
            return (0.0, cpu_seconds.map(|_| 0.0));
        }
        let saturation = ((busy_seconds - first.busy_seconds) / (dt * slots.max(1) as f64)).clamp(0.0, 1.0);
        let cpu = match (cpu_seconds, first.cpu_seconds) {
            (Some(now), Some(then)) => Some(((now - then) / (dt * self.cores)).clamp(0.0, 1.0)),
            _ => None,
        };
        (saturation, cpu)
    }
}

/// This process's CPU time (user + system) in seconds, from `/proc/self/stat`
/// (fields 14 and 15, in USER_HZ = 100 ticks per second, the Linux userspace ABI).
/// `None` where `/proc` is not mounted or unreadable.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_seconds(&stat)
}

/// Fields after the command name, which is in parentheses and may itself contain
/// spaces and parentheses: split after the *last* `)`.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Cores this process may use (cgroup quota honoured), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_integrates_busy_slots_exactly() {
        let meter = SlotMeter::new(4);
        let t0 = Instant::now();
        let a = meter.start();
        let b = meter.start();
        assert_eq!(meter.busy(), 2);
        std::thread::sleep(Duration::from_millis(50));
        drop(a);
        assert_eq!(meter.busy(), 1);
        drop(b);
        assert_eq!(meter.busy(), 0);
        let total = meter.busy_seconds(Instant::now());
        // Two slots for ~50 ms each: ≥ 0.1 slot-seconds, and not more than the
        // elapsed wall time × 2.
        assert!(total >= 0.1, "{total}");
        assert!(total <= 2.0 * t0.elapsed().as_secs_f64(), "{total}");
        // Idle time adds nothing.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(meter.busy_seconds(Instant::now()), total);
    }

    #[test]
    fn the_window_averages_over_its_length_and_forgets_older_load() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = Window::new(Duration::from_secs(10), 2);
        assert_eq!(w.push(s(0), 0.0, Some(0.0), 4), (0.0, Some(0.0)));
        // 10 s with all 4 slots busy and one core of two in use.
        let mut out = (0.0, None);
        for i in 1..=10 {
            out = w.push(s(i), 4.0 * i as f64, Some(i as f64), 4);
        }
        assert!((out.0 - 1.0).abs() < 1e-9, "{out:?}");
        assert!((out.1.unwrap() - 0.5).abs() < 1e-9, "{out:?}");
        // Then 10 s idle: the window forgets the busy period entirely.
        for i in 11..=20 {
            out = w.push(s(i), 40.0, Some(10.0), 4);
        }
        assert_eq!(out, (0.0, Some(0.0)));
        // Half the slots busy for 5 s of the window: 0.25.
        for i in 21..=25 {
            out = w.push(s(i), 40.0 + 2.0 * (i - 20) as f64, Some(10.0), 4);
        }
        assert!((out.0 - 0.25).abs() < 1e-9, "{out:?}");
        assert_eq!(w.samples.len(), 11);
    }

    #[test]
    fn a_slow_count_is_spaced_out() {
        assert_eq!(runnable_interval(Duration::from_millis(10)), RUNNABLE_EVERY);
        // A 2M-job backlog's count (~1 s) runs at most every 20 s, not every 5 s.
        assert_eq!(runnable_interval(Duration::from_secs(1)), Duration::from_secs(20));
        // One that timed out (5 s): once a minute.
        assert_eq!(runnable_interval(RUNNABLE_EVERY), RUNNABLE_EVERY_MAX);
    }

    #[test]
    fn cpu_time_is_read_after_the_last_parenthesis() {
        // A command name with spaces and parentheses, as the kernel prints it.
        let stat = "1234 (my (odd) node) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert_eq!(parse_cpu_seconds("garbage"), None);
        assert!(process_cpu_seconds().is_some(), "this test runs on Linux with /proc");
    }
}
