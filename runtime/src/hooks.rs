//! In-process hooks on attempts, for an application's own metrics or tracing: told
//! when a handler is about to run and when its attempt's outcome is settled.
//!
//! ```ignore
//! let node = Node::builder(config)
//!     .on_attempt_start(|a: &AttemptInfo| tracing::debug!(job = a.job_id, "start"))
//!     .on_attempt_finish(|a: &AttemptInfo, o: &AttemptOutcome, took: Duration| {
//!         my_metrics.record(&a.kind, o.label(), took)
//!     })
//!     .register(Charge)?
//!     .start(pool)
//!     .await?;
//! ```
//!
//! Hooks run inline on the attempt's task, so they must be cheap (count, record,
//! send on a channel); they can never break an attempt: a hook that panics is caught,
//! logged and counted (`warden_hook_panics_total`), and the attempt goes on.
//!
//! For every `start` there is exactly one `finish`, after the outcome is recorded (or
//! known to be unrecordable), with the time the handler ran (not the wait for an
//! execution slot). Jobs that never reach a handler (no handler for their kind,
//! attempts used up before they started, given back unrun on a drain) call neither.
//! The one exception is a panic in Warden's own attempt code after the handler
//! returned (a bug, recorded as a failed attempt): its `finish` is not called.

use crate::store::Finish;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// The attempt a hook is told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptInfo {
    pub job_id: i64,
    pub account: String,
    pub kind: String,
    /// 1-based.
    pub attempt: i32,
    pub max_attempts: i32,
    pub partition: u32,
    /// The lease epoch the attempt ran under.
    pub epoch: i64,
}

/// How an attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// The job is complete.
    Completed,
    /// Failed (`outcome`: `failed`, `timeout` or `retry`); runs again after `after`.
    Retry {
        outcome: &'static str,
        after: Duration,
        error: String,
    },
    /// Runs again after `after`, without using up an attempt.
    Snoozed {
        after: Duration,
    },
    /// Given up (`outcome`: `discarded`, or `failed`/`timeout` when attempts ran out).
    Discarded {
        outcome: &'static str,
        error: String,
    },
    Cancelled {
        error: String,
    },
    /// Stopped by a partition handoff; runs again on the next owner, not counted.
    Interrupted {
        error: String,
    },
    /// Nothing was recorded: the lease was lost while it ran (the next owner's rescue
    /// resets the job), or no outcome could be stored (it is adopted later).
    NotRecorded,
}

impl AttemptOutcome {
    /// The outcome as the attempts table and metrics name it (`not_recorded` for
    /// [`AttemptOutcome::NotRecorded`]).
    pub fn label(&self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Retry { outcome, .. } | AttemptOutcome::Discarded { outcome, .. } => outcome,
            AttemptOutcome::Snoozed { .. } => "snoozed",
            AttemptOutcome::Cancelled { .. } => "cancelled",
            AttemptOutcome::Interrupted { .. } => "interrupted",
            AttemptOutcome::NotRecorded => "not_recorded",
        }
    }
}

impl From<&Finish> for AttemptOutcome {
    fn from(f: &Finish) -> Self {
        match f {
            Finish::Completed => AttemptOutcome::Completed,
            Finish::Retry { after, outcome, error } => {
                AttemptOutcome::Retry { outcome, after: *after, error: error.clone() }
            }
            Finish::Snooze { after } => AttemptOutcome::Snoozed { after: *after },
            Finish::Discard { outcome, error } => AttemptOutcome::Discarded { outcome, error: error.clone() },
            Finish::Cancelled { error } => AttemptOutcome::Cancelled { error: error.clone() },
            Finish::Interrupted { error } => AttemptOutcome::Interrupted { error: error.clone() },
        }
    }
}

/// Told that a handler is about to run.
pub type OnAttemptStart = Arc<dyn Fn(&AttemptInfo) + Send + Sync>;
/// Told how an attempt ended, and how long its handler ran.
pub type OnAttemptFinish = Arc<dyn Fn(&AttemptInfo, &AttemptOutcome, Duration) + Send + Sync>;

/// The hooks of a node (see [`crate::NodeBuilder::on_attempt_start`]).
#[derive(Clone, Default)]
pub struct Hooks {
    start: Vec<OnAttemptStart>,
    finish: Vec<OnAttemptFinish>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").field("start", &self.start.len()).field("finish", &self.finish.len()).finish()
    }
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.start.is_empty() && self.finish.is_empty()
    }

    pub fn add_start(&mut self, hook: OnAttemptStart) {
        self.start.push(hook);
    }

    pub fn add_finish(&mut self, hook: OnAttemptFinish) {
        self.finish.push(hook);
    }

    pub(crate) fn started(&self, info: &AttemptInfo) {
        for h in &self.start {
            guarded("start", || h(info));
        }
    }

    pub(crate) fn finished(&self, info: &AttemptInfo, outcome: &AttemptOutcome, took: Duration) {
        for h in &self.finish {
            guarded("finish", || h(info, outcome, took));
        }
    }
}

/// Run a hook; a panic in it is logged and counted, never passed on.
fn guarded(which: &'static str, hook: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(hook)) {
        let msg = crate::attempt::panic_message(&panic);
        tracing::error!(hook = which, panic = %msg, "an attempt hook panicked; ignored");
        metrics::counter!("warden_hook_panics_total", "hook" => which).increment(1);
    }
}

/// The outcome a hook is told, from what was recorded (`None`: nothing was).
pub(crate) fn outcome_of(recorded: Option<&Finish>) -> AttemptOutcome {
    recorded.map_or(AttemptOutcome::NotRecorded, AttemptOutcome::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::outcome_label;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_panicking_hook_is_contained_and_the_others_still_run() {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut hooks = Hooks::default();
        hooks.add_start(Arc::new(|_| panic!("hook bug")));
        let r = ran.clone();
        hooks.add_start(Arc::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        let info = AttemptInfo {
            job_id: 1,
            account: "a".into(),
            kind: "k".into(),
            attempt: 1,
            max_attempts: 3,
            partition: 0,
            epoch: 1,
        };
        hooks.started(&info);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn labels_match_the_attempts_table() {
        for f in [
            Finish::Completed,
            Finish::Snooze { after: Duration::ZERO },
            Finish::Retry { after: Duration::ZERO, outcome: "timeout", error: String::new() },
            Finish::Discard { outcome: "discarded", error: String::new() },
            Finish::Cancelled { error: String::new() },
            Finish::Interrupted { error: String::new() },
        ] {
            assert_eq!(AttemptOutcome::from(&f).label(), outcome_label(&f));
        }
        assert_eq!(outcome_of(None), AttemptOutcome::NotRecorded);
    }
}
