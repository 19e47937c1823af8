//! The attempt's outcome, decided: pure functions from how a handler's run ended
//! (and the job's attempt count, the kind's backoff, a drain or a cancel seen while
//! it ran) to the [`Finish`] the executor records. The account actor's attempt task
//! (`account_actor::run_attempt`) only runs the handler, calls these, and records
//! what they return.
//!
//! Rules, each a property tested below:
//! - a retry is scheduled only while attempts are left (`attempt < max_attempts`);
//!   otherwise the failure discards the job;
//! - an attempt that *returned* after its partition began draining does not use up
//!   an attempt (`Interrupted`): it most likely stopped because it was told to. One
//!   that had to be dropped at the drain timeout does count, so a job whose handler
//!   keeps provoking handoffs still runs out of attempts;
//! - a confirmed cancel wins over anything but a completion;
//! - every finish is storable: delays at most [`MAX_DELAY`], error text without NUL
//!   and at most [`MAX_ERROR_BYTES`] (a finish PostgreSQL rejects would be rejected on
//!   every retry).
//!
//! [`MAX_ERROR_BYTES`]: crate::job::MAX_ERROR_BYTES

use crate::handler::{Backoff, Outcome};
use crate::job::{storable_text, MAX_DELAY};
use crate::store::Finish;
use std::time::Duration;

/// How an attempt's handler run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The handler returned an outcome.
    Returned(Outcome),
    /// The handler returned an error (its text).
    Failed(String),
    /// The job cannot be run here: its stored args do not fit the handler, or no
    /// handler is registered for its kind.
    BadArgs(String),
    /// The handler panicked (the message).
    Panicked(String),
    /// The job's timeout passed; the handler was dropped.
    TimedOut,
    /// The handler went longer than its kind's heartbeat timeout without a
    /// heartbeat (hung): dropped.
    HeartbeatTimedOut(Duration),
    /// A confirmed cancel, and the handler did not stop within the grace: dropped.
    CancelledHard,
    /// Still running at the drain timeout of a handoff: dropped.
    DrainTimedOut,
    /// Not run: its attempts were used up before it started (adopted after attempts
    /// whose outcomes were lost).
    Exhausted,
}

impl Ended {
    /// Did the handler's future return (rather than being dropped mid-poll)? Its
    /// transaction's connection is then idle and can be rolled back and reused.
    pub fn returned(&self) -> bool {
        matches!(self, Ended::Returned(_) | Ended::Failed(_) | Ended::BadArgs(_))
    }
}

/// What the decision needs to know about the attempt besides how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFacts {
    /// This attempt's number, 1-based (already counted when it was claimed).
    pub attempt: i32,
    pub max_attempts: i32,
    /// The job's timeout, as stored.
    pub timeout_ms: i32,
    pub cancel_grace: Duration,
    pub drain_timeout: Duration,
    /// Its partition began draining while it ran (the handler was told).
    pub drain_requested: bool,
    /// A cancel request was confirmed in the database while it ran.
    pub cancel_confirmed: bool,
    /// The kind's retry backoff.
    pub backoff: Backoff,
    /// A uniform draw in `[0, 1)` for the backoff's jitter.
    pub jitter_draw: f64,
}

impl AttemptFacts {
    /// No attempt is left after this one.
    pub fn exhausted(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// Adopted past its last attempt (each adoption counts one): not to be run.
    pub fn used_up_before_start(&self) -> bool {
        self.attempt > self.max_attempts
    }

    fn backoff_delay(&self) -> Duration {
        self.backoff.delay_with_draw(self.attempt, self.jitter_draw)
    }

    /// A failed attempt: interrupted by a drain (not counted), discarded once no
    /// attempt is left, otherwise retried after `after` or the kind's backoff.
    fn failed(&self, returned: bool, outcome: &'static str, error: String, after: Option<Duration>) -> Finish {
        if self.drain_requested && returned {
            Finish::Interrupted { error: format!("interrupted by a partition handoff ({outcome}: {error})") }
        } else if self.exhausted() {
            Finish::Discard {
                outcome,
                error: format!("{error} (attempt {} of {}: giving up)", self.attempt, self.max_attempts),
            }
        } else {
            Finish::Retry { after: after.unwrap_or_else(|| self.backoff_delay()), outcome, error }
        }
    }
}

/// The finish to record for an attempt that ended as `ended`.
pub fn decide(ended: Ended, facts: &AttemptFacts) -> Finish {
    let returned = ended.returned();
    let finish = match ended {
        Ended::Returned(Outcome::Done) => Finish::Completed,
        Ended::Returned(Outcome::Retry { after }) => {
            facts.failed(returned, "retry", "handler asked to retry".into(), after)
        }
        Ended::Returned(Outcome::Snooze(after)) => Finish::Snooze { after },
        Ended::Returned(Outcome::Discard(reason)) => Finish::Discard { outcome: "discarded", error: reason },
        Ended::BadArgs(msg) => Finish::Discard { outcome: "discarded", error: msg },
        Ended::Failed(e) => facts.failed(returned, "failed", format!("handler error: {e}"), None),
        Ended::Panicked(msg) => facts.failed(returned, "failed", format!("handler panicked: {msg}"), None),
        Ended::TimedOut => facts.failed(returned, "timeout", format!("timed out after {}ms", facts.timeout_ms), None),
        Ended::HeartbeatTimedOut(after) => facts.failed(
            returned,
            "timeout",
            format!(
                "no heartbeat for {after:?} (the kind's heartbeat_timeout): the handler looked hung and was aborted"
            ),
            None,
        ),
        Ended::CancelledHard => Finish::Cancelled {
            error: format!(
                "cancelled while running; handler did not stop within {:?} and was aborted",
                facts.cancel_grace
            ),
        },
        Ended::DrainTimedOut => facts.failed(
            returned,
            "failed",
            format!("still running at the drain timeout ({:?}) of a partition handoff; aborted", facts.drain_timeout),
            Some(Duration::ZERO),
        ),
        Ended::Exhausted => Finish::Discard {
            outcome: "discarded",
            error: format!(
                "attempt {} of {}: attempts used up by attempts whose outcome was lost; giving up",
                facts.attempt, facts.max_attempts
            ),
        },
    };
    let finish = if facts.cancel_confirmed && !matches!(finish, Finish::Completed | Finish::Cancelled { .. }) {
        Finish::Cancelled { error: "cancelled while running".into() }
    } else {
        finish
    };
    storable(finish)
}

/// The handler completed, but inserting its staged follow-up jobs failed: the
/// attempt fails (its transaction is gone).
pub fn follow_ups_failed(facts: &AttemptFacts, count: usize, error: &str) -> Finish {
    storable(facts.failed(true, "failed", format!("enqueueing {count} follow-up job(s) failed: {error}"), None))
}

/// The finish statement failed in a way that may have committed, and the handler's
/// transaction is gone with it: its writes must be redone, so the attempt counts as
/// failed and runs again at once. (A retry past the last attempt is discarded
/// unrun, as [`Ended::Exhausted`].)
pub fn uncommitted(error: &str) -> Finish {
    storable(Finish::Retry {
        after: Duration::ZERO,
        outcome: "failed",
        error: format!("completion could not be committed: {error}"),
    })
}

/// The last outcome tried when none can be recorded: constant, storable text.
pub const UNRECORDABLE: &str = "the attempt's outcome could not be recorded; giving up on the job";

/// The outcome could not be recorded because the statement fails for good (the same
/// statement would fail the same way): the first time, record a plain failure
/// instead (retried, if attempts are left); after that, give up on the job with
/// constant text.
pub fn unrecordable(facts: &AttemptFacts, first: bool, error: &str) -> Finish {
    if first && !facts.exhausted() {
        storable(Finish::Retry {
            after: facts.backoff_delay(),
            outcome: "failed",
            error: format!("the attempt's outcome could not be recorded: {error}"),
        })
    } else {
        Finish::Discard { outcome: "failed", error: UNRECORDABLE.into() }
    }
}

/// The attempt task panicked outside the handler: a failed attempt, retried with the
/// kind's backoff while attempts are left.
pub fn crashed(facts: &AttemptFacts, msg: &str) -> Finish {
    storable(if facts.exhausted() {
        Finish::Discard { outcome: "failed", error: format!("attempt task panicked: {msg} (giving up)") }
    } else {
        Finish::Retry {
            after: facts.backoff_delay(),
            outcome: "failed",
            error: format!("attempt task panicked: {msg}"),
        }
    })
}

/// Make a finish storable: delays at most [`MAX_DELAY`], text without NUL and within
/// the error bound. Idempotent (the store applies it again, as a last line).
pub fn storable(finish: Finish) -> Finish {
    match finish {
        Finish::Completed => Finish::Completed,
        Finish::Retry { after, outcome, error } => {
            Finish::Retry { after: after.min(MAX_DELAY), outcome, error: storable_text(&error) }
        }
        Finish::Snooze { after } => Finish::Snooze { after: after.min(MAX_DELAY) },
        Finish::Discard { outcome, error } => Finish::Discard { outcome, error: storable_text(&error) },
        Finish::Cancelled { error } => Finish::Cancelled { error: storable_text(&error) },
        Finish::Interrupted { error } => Finish::Interrupted { error: storable_text(&error) },
    }
}

/// The attempt's outcome label, as recorded in the attempts table and metrics.
pub fn outcome_label(f: &Finish) -> &'static str {
    match f {
        Finish::Completed => "completed",
        Finish::Retry { outcome, .. } | Finish::Discard { outcome, .. } => outcome,
        Finish::Snooze { .. } => "snoozed",
        Finish::Cancelled { .. } => "cancelled",
        Finish::Interrupted { .. } => "interrupted",
    }
}

/// When the account's actor should look again after this finish (retry, snooze).
pub fn wake_in(f: &Finish) -> Option<Duration> {
    match f {
        Finish::Retry { after, .. } | Finish::Snooze { after } => Some(*after),
        _ => None,
    }
}

/// Does recording this finish use up one of the job's attempts? (Snoozes and
/// interruptions give theirs back; a completion or discard ends the job.)
pub fn uses_an_attempt(f: &Finish) -> bool {
    matches!(f, Finish::Retry { .. })
}

/// A panic's message, if it has one.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::MAX_ERROR_BYTES;
    use proptest::prelude::*;

    fn facts() -> AttemptFacts {
        AttemptFacts {
            attempt: 1,
            max_attempts: 3,
            timeout_ms: 1000,
            cancel_grace: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            drain_requested: false,
            cancel_confirmed: false,
            backoff: Backoff { base: Duration::from_millis(100), max: Duration::from_secs(10), jitter: 0.0 },
            jitter_draw: 0.5,
        }
    }

    #[test]
    fn the_outcomes_as_recorded_today() {
        let f = facts();
        assert_eq!(decide(Ended::Returned(Outcome::Done), &f), Finish::Completed);
        assert_eq!(
            decide(Ended::Failed("boom".into()), &f),
            Finish::Retry { after: Duration::from_millis(100), outcome: "failed", error: "handler error: boom".into() }
        );
        let last = AttemptFacts { attempt: 3, ..f.clone() };
        assert_eq!(
            decide(Ended::TimedOut, &last),
            Finish::Discard { outcome: "timeout", error: "timed out after 1000ms (attempt 3 of 3: giving up)".into() }
        );
        let draining = AttemptFacts { drain_requested: true, ..f.clone() };
        assert_eq!(
            decide(Ended::Failed("stopped".into()), &draining),
            Finish::Interrupted { error: "interrupted by a partition handoff (failed: handler error: stopped)".into() }
        );
        assert_eq!(
            decide(Ended::DrainTimedOut, &draining),
            Finish::Retry {
                after: Duration::ZERO,
                outcome: "failed",
                error: "still running at the drain timeout (10s) of a partition handoff; aborted".into()
            }
        );
        let cancelled = AttemptFacts { cancel_confirmed: true, ..f.clone() };
        assert_eq!(
            decide(Ended::Failed("x".into()), &cancelled),
            Finish::Cancelled { error: "cancelled while running".into() }
        );
        assert_eq!(decide(Ended::Returned(Outcome::Done), &cancelled), Finish::Completed);
        assert_eq!(
            decide(Ended::Returned(Outcome::Retry { after: Some(Duration::from_secs(7)) }), &f),
            Finish::Retry { after: Duration::from_secs(7), outcome: "retry", error: "handler asked to retry".into() }
        );
        assert_eq!(unrecordable(&f, false, "e"), Finish::Discard { outcome: "failed", error: UNRECORDABLE.into() });
        assert_eq!(
            decide(Ended::HeartbeatTimedOut(Duration::from_secs(30)), &f),
            Finish::Retry {
                after: Duration::from_millis(100),
                outcome: "timeout",
                error: "no heartbeat for 30s (the kind's heartbeat_timeout): the handler looked hung and was aborted"
                    .into()
            }
        );
        // A hung handler aborted during a drain still counts: it did not stop when told.
        assert!(matches!(
            decide(Ended::HeartbeatTimedOut(Duration::from_secs(1)), &draining),
            Finish::Retry { outcome: "timeout", .. }
        ));
    }

    fn arb_outcome() -> impl Strategy<Value = Outcome> {
        let delay = prop_oneof![
            (0u64..100_000).prop_map(Duration::from_millis),
            Just(Duration::MAX),
            Just(MAX_DELAY + Duration::from_secs(1)),
        ];
        prop_oneof![
            Just(Outcome::Done),
            prop::option::of(delay.clone()).prop_map(|after| Outcome::Retry { after }),
            delay.prop_map(Outcome::Snooze),
            arb_text().prop_map(Outcome::Discard),
        ]
    }

    /// Text with NULs, multi-byte characters, and sometimes far past the bound.
    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z\u{0}é🦀 ]{0,40}", ("[a-zé\u{0}]{1,3}", 1000usize..3000).prop_map(|(s, n)| s.repeat(n)),]
    }

    fn arb_ended() -> impl Strategy<Value = Ended> {
        prop_oneof![
            arb_outcome().prop_map(Ended::Returned),
            arb_text().prop_map(Ended::Failed),
            arb_text().prop_map(Ended::BadArgs),
            arb_text().prop_map(Ended::Panicked),
            Just(Ended::TimedOut),
            (1u64..100_000).prop_map(|ms| Ended::HeartbeatTimedOut(Duration::from_millis(ms))),
            Just(Ended::CancelledHard),
            Just(Ended::DrainTimedOut),
            Just(Ended::Exhausted),
        ]
    }

    fn arb_facts() -> impl Strategy<Value = AttemptFacts> {
        (1i32..=1000, 1i32..=1000, any::<bool>(), any::<bool>(), 0.0f64..1.0, 0.0f64..=1.0, 0u64..100_000).prop_map(
            |(max, a, drain, cancel, draw, jitter, base_ms)| AttemptFacts {
                attempt: a.min(max),
                max_attempts: max,
                timeout_ms: 60_000,
                cancel_grace: Duration::from_secs(5),
                drain_timeout: Duration::from_secs(10),
                drain_requested: drain,
                cancel_confirmed: cancel,
                backoff: Backoff {
                    base: Duration::from_millis(base_ms),
                    max: Duration::from_secs(86_400 * 365 * 20),
                    jitter,
                },
                jitter_draw: draw,
            },
        )
    }

    fn texts(f: &Finish) -> Option<&str> {
        match f {
            Finish::Retry { error, .. }
            | Finish::Discard { error, .. }
            | Finish::Cancelled { error }
            | Finish::Interrupted { error } => Some(error),
            Finish::Completed | Finish::Snooze { .. } => None,
        }
    }

    fn assert_storable(f: &Finish) -> Result<(), TestCaseError> {
        if let Some(d) = wake_in(f) {
            prop_assert!(d <= MAX_DELAY, "delay {d:?} past 3,650 days");
        }
        if let Some(t) = texts(f) {
            prop_assert!(!t.contains('\0'), "NUL in error text");
            prop_assert!(t.len() <= MAX_ERROR_BYTES, "error text of {} bytes", t.len());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn a_retry_is_scheduled_only_while_attempts_are_left(ended in arb_ended(), f in arb_facts()) {
            let finish = decide(ended, &f);
            if f.exhausted() {
                prop_assert!(!uses_an_attempt(&finish), "{finish:?} after attempt {} of {}", f.attempt, f.max_attempts);
            }
            prop_assert!(!(f.exhausted() && uses_an_attempt(&follow_ups_failed(&f, 1, "e"))));
            prop_assert!(!(f.exhausted() && uses_an_attempt(&crashed(&f, "p"))));
            prop_assert!(!(f.exhausted() && uses_an_attempt(&unrecordable(&f, true, "e"))));
        }

        #[test]
        fn a_failure_with_attempts_left_is_retried(
            ended in arb_ended().prop_filter("a failure", |e| matches!(e, Ended::Failed(_) | Ended::Panicked(_) | Ended::TimedOut | Ended::HeartbeatTimedOut(_))),
            mut f in arb_facts(),
        ) {
            f.cancel_confirmed = false;
            f.drain_requested = false;
            let finish = decide(ended, &f);
            prop_assert_eq!(uses_an_attempt(&finish), !f.exhausted(), "{:?}", finish);
        }

        #[test]
        fn a_return_after_a_drain_began_never_uses_an_attempt(ended in arb_ended(), mut f in arb_facts()) {
            f.drain_requested = true;
            let returned = ended.returned();
            let finish = decide(ended, &f);
            if returned {
                prop_assert!(!uses_an_attempt(&finish), "{finish:?}");
            }
        }

        #[test]
        fn a_handler_dropped_at_the_drain_timeout_counts_and_reruns_at_once(mut f in arb_facts()) {
            f.cancel_confirmed = false;
            match decide(Ended::DrainTimedOut, &f) {
                Finish::Retry { after, .. } => prop_assert_eq!(after, Duration::ZERO),
                Finish::Discard { .. } => prop_assert!(f.exhausted()),
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn a_confirmed_cancel_wins_over_all_but_a_completion(ended in arb_ended(), mut f in arb_facts()) {
            f.cancel_confirmed = true;
            let done = ended == Ended::Returned(Outcome::Done);
            let finish = decide(ended, &f);
            if done {
                prop_assert_eq!(finish, Finish::Completed);
            } else {
                prop_assert!(matches!(finish, Finish::Cancelled { .. }), "{finish:?}");
            }
        }

        #[test]
        fn every_finish_is_storable(ended in arb_ended(), f in arb_facts(), e in arb_text()) {
            assert_storable(&decide(ended, &f))?;
            assert_storable(&follow_ups_failed(&f, 3, &e))?;
            assert_storable(&uncommitted(&e))?;
            assert_storable(&unrecordable(&f, true, &e))?;
            assert_storable(&crashed(&f, &e))?;
        }

        #[test]
        fn storable_is_idempotent(ended in arb_ended(), f in arb_facts()) {
            let once = decide(ended, &f);
            prop_assert_eq!(storable(once.clone()), once);
        }

        #[test]
        fn the_kinds_backoff_is_used_unless_the_handler_names_a_delay(
            after in prop::option::of(0u64..1_000_000), mut f in arb_facts(),
        ) {
            f.cancel_confirmed = false;
            f.drain_requested = false;
            f.max_attempts = f.max_attempts.max(2);
            f.attempt = f.attempt.min(f.max_attempts - 1);
            let finish = decide(Ended::Returned(Outcome::Retry { after: after.map(Duration::from_millis) }), &f);
            let expect = after.map(Duration::from_millis).unwrap_or_else(|| f.backoff.delay_with_draw(f.attempt, f.jitter_draw));
            prop_assert_eq!(wake_in(&finish), Some(expect.min(MAX_DELAY)));
        }

        #[test]
        fn exhausted_jobs_are_discarded_unrun(f in arb_facts()) {
            let finish = decide(Ended::Exhausted, &f);
            let discarded = matches!(finish, Finish::Discard { outcome: "discarded", .. });
            let cancelled = matches!(finish, Finish::Cancelled { .. });
            prop_assert!(discarded || (f.cancel_confirmed && cancelled), "{:?}", finish);
        }
    }
}
