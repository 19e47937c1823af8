//! Schedule timing, pure: when a periodic schedule fires. A [`Spec`] is a cron
//! expression or a fixed interval, a time zone, optional start and end, and jitter;
//! it answers "the next nominal time after `t`" ([`Spec::next_after`]), "the nominal
//! times in a range" ([`Spec::nominal_times`], for catch-up and backfill) and "when
//! exactly to fire this nominal time" ([`Spec::fire_at`]). Nothing here reads the
//! clock or touches the database: `now` is always an argument.
//!
//! A **nominal time** is the UTC instant a fire belongs to, always a whole second; it
//! is the fire's identity (the uniqueness key is (schedule, nominal time)). Jitter
//! moves when a fire *happens*, never its nominal time.
//!
//! # Cron syntax
//!
//! Five fields `minute hour day-of-month month day-of-week`, or six with a leading
//! `second` field (five fields fire at second 0). Fields are separated by ASCII
//! whitespace. Each field is a comma-separated list of items:
//!
//! | item | meaning |
//! |---|---|
//! | `*` | every value |
//! | `5` | one value |
//! | `1-10` | an inclusive range (start ≤ end; no wrap-around like `22-2`) |
//! | `*/15`, `1-10/2` | every n-th value of the range, from its start |
//! | `5/15` | `5-max/15` |
//!
//! Ranges: second and minute 0–59, hour 0–23, day-of-month 1–31, month 1–12 or
//! `JAN`–`DEC`, day-of-week 0–7 or `SUN`–`SAT` (0 and 7 are both Sunday). Names are
//! case-insensitive. A step must be between 1 and the width of the field's range.
//! Macros: `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//! `@hourly`; `@reboot` and others are rejected. Quartz extensions (`?`, `L`, `W`, `#`,
//! a year field) are not supported and rejected as such.
//!
//! **Day of month and day of week.** When both are *restricted*, a day matches if
//! either matches (`0 0 13 * FRI` = every 13th and every Friday); otherwise both must
//! (in effect, the restricted one). A field is restricted when it does not match every
//! value: `*`, `*/1`, `1-31` and `0-7` are not restricted, `*/2` is. (Vixie cron
//! decides by whether the text starts with `*`, so it ANDs `*/2` with a day of week;
//! the semantic rule has no such surprise.)
//!
//! # Time zones and DST
//!
//! Each spec has an IANA zone (default UTC). Cron fields are matched against **wall
//! time** in that zone, and **each matching wall time fires once**:
//!
//! - **Spring-forward** (a wall time that does not exist that day): it fires at the
//!   first instant after the gap, the transition itself. `30 2 * * *` in New York on
//!   2026-03-08 fires at 03:00 EDT. Several skipped wall times (`*/15` during the gap)
//!   fall on that same instant and fire **once**, together with a wall time at the end
//!   of the gap (03:00) if it also matches.
//! - **Fall-back** (a wall time that occurs twice): it fires at its **first**
//!   occurrence only. So `*/15 * * * *` in New York on 2026-11-01 fires at 01:00,
//!   01:15, 01:30, 01:45 EDT and next at 02:00 EST, 75 real minutes later; the
//!   repeated 01:00–01:45 EST are not fired. `0 * * * *` fires 01:00 EDT, then
//!   02:00 EST (two real hours). Schedules that need evenly spaced real time should use
//!   an interval.
//!
//! Nominal times are therefore strictly increasing with their wall times, never
//! duplicated, and no matching wall time is lost. **Intervals** are exact durations in
//! UTC: `anchor + k·every` for every integer `k`, unaffected by DST or the zone.
//!
//! # Start, end, jitter
//!
//! `start` and `end` bound nominal times, both inclusive: no nominal time before
//! `start` or after `end`. Jitter delays a fire by a deterministic offset in
//! `[0, max_jitter)`, at millisecond resolution, computed from a stable hash of the
//! schedule's key and the nominal time (see `jitter.rs`), so every node computes the
//! same fire instant. The offset is also kept under the gap to the next nominal time,
//! so jittered fires happen in nominal order, each before the next nominal time.
//!
//! # Limits
//!
//! | what | limit |
//! |---|---|
//! | cron expression | [`MAX_EXPRESSION_LEN`] bytes |
//! | zone name | [`MAX_ZONE_NAME_LEN`] bytes |
//! | frequency | nominal times at least [`MIN_PERIOD`] apart (1 s: cron's resolution; intervals ≥ 1 s) |
//! | interval | whole seconds, [`MIN_PERIOD`] ..= [`MAX_INTERVAL`] |
//! | jitter | ≤ [`MAX_JITTER`] |
//! | never fires | rejected: a cron expression whose day of month exists in none of its months (`0 0 30 2 *`); a spec with no nominal time between start and end |
//!
//! A valid cron expression matches within eight years of any instant (February 29
//! across a non-leap century year is the rarest), so the search is bounded without
//! losing answers. Interval anchors are truncated to the whole second so that every
//! nominal time is a whole second.
//!
//! # Module layout
//!
//! - `mod.rs` — [`Spec`], its builder, [`SpecError`], the limits.
//! - [`cron`] — the cron parser and the wall-time search.
//! - [`zone`] — zone names and the wall time → instant map (the DST rule).
//! - `jitter` — the stable hash behind [`Spec::fire_at`].

pub mod cron;
mod jitter;
pub mod zone;

#[cfg(test)]
mod tests;

pub use cron::{CronExpr, CronField, MAX_EXPRESSION_LEN};
pub use zone::{parse_zone, MAX_ZONE_NAME_LEN};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
pub use chrono_tz::Tz;
use std::time::Duration;

/// The shortest time between two nominal times: intervals must be at least this, and
/// cron's finest field (seconds) cannot fire more often.
pub const MIN_PERIOD: Duration = Duration::from_secs(1);

/// The longest interval accepted (ten years of 365 days).
pub const MAX_INTERVAL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The largest jitter accepted.
pub const MAX_JITTER: Duration = Duration::from_secs(86_400);

/// Why a schedule's timing was rejected. Every message is fit to show to the person
/// who wrote the input; it converts into [`crate::Error::InvalidInput`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid cron expression: it is empty")]
    EmptyExpression,
    #[error("invalid cron expression: it is {len} bytes long; the limit is {max}")]
    ExpressionTooLong { len: usize, max: usize },
    #[error(
        "invalid cron expression: it has {found} fields; expected 5 (minute hour day-of-month month \
         day-of-week) or 6 (second minute hour day-of-month month day-of-week)"
    )]
    FieldCount { found: usize },
    /// One field is malformed; `reason` says how (`61 is out of range 0-59`).
    #[error("invalid cron expression: {field} field: {reason}")]
    Field { field: CronField, reason: String },
    #[error(
        "invalid cron expression: unknown macro \"{name}\"; expected @yearly, @annually, @monthly, \
         @weekly, @daily, @midnight or @hourly"
    )]
    UnknownMacro { name: String },
    #[error("invalid cron expression: \"{expr}\" can never fire (no month it names has that day)")]
    NeverFires { expr: String },
    #[error("unknown time zone \"{name}\"")]
    UnknownZone { name: String },
    #[error("time zone name is {len} bytes long; the limit is {max}")]
    ZoneNameTooLong { len: usize, max: usize },
    #[error("interval {every:?} is too short: fires must be at least {MIN_PERIOD:?} apart")]
    IntervalTooShort { every: Duration },
    #[error("interval {every:?} is too long: the limit is {MAX_INTERVAL:?}")]
    IntervalTooLong { every: Duration },
    #[error("interval {every:?} is not a whole number of seconds")]
    IntervalNotWholeSeconds { every: Duration },
    #[error("jitter {jitter:?} is too large: the limit is {MAX_JITTER:?}")]
    JitterTooLarge { jitter: Duration },
    #[error("start {start} is after end {end}")]
    StartAfterEnd { start: DateTime<Utc>, end: DateTime<Utc> },
    #[error("the schedule never fires between start {start} and end {end}")]
    NoFireInWindow { start: DateTime<Utc>, end: DateTime<Utc> },
}

impl From<SpecError> for crate::Error {
    fn from(e: SpecError) -> Self {
        crate::Error::invalid(e.to_string())
    }
}

/// What a schedule's nominal times follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// Wall-clock times matching a cron expression, in the spec's zone.
    Cron(CronExpr),
    /// `anchor + k·every` for every integer `k`: exact UTC durations. `every` is whole
    /// seconds and `anchor` a whole second.
    Interval { every: Duration, anchor: DateTime<Utc> },
}

/// A schedule's timing, validated: build one with [`Spec::cron`] or [`Spec::every`],
/// then [`SpecBuilder::build`].
///
/// ```
/// use warden_runtime::schedule::Spec;
/// use chrono::{TimeZone, Utc};
///
/// let spec = Spec::cron("30 2 * * *").zone("America/New_York").build().unwrap();
/// let after = Utc.with_ymd_and_hms(2026, 3, 7, 12, 0, 0).unwrap();
/// // 02:30 does not exist on 2026-03-08 in New York: it fires at 03:00 EDT.
/// assert_eq!(spec.next_after(after), Some(Utc.with_ymd_and_hms(2026, 3, 8, 7, 0, 0).unwrap()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    timing: Timing,
    zone: Tz,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    max_jitter: Duration,
}

/// The unvalidated parts of a [`Spec`]; [`SpecBuilder::build`] checks them all, in
/// the order cron or interval, zone, jitter, start/end.
#[derive(Debug, Clone)]
#[must_use = "call build() to validate the spec"]
pub struct SpecBuilder {
    timing: TimingInput,
    zone: Option<String>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    max_jitter: Duration,
}

#[derive(Debug, Clone)]
enum TimingInput {
    Cron(String),
    Interval { every: Duration, anchor: DateTime<Utc> },
}

impl SpecBuilder {
    /// The IANA zone cron fields are read in (default `UTC`). Intervals ignore it.
    pub fn zone(mut self, name: impl Into<String>) -> Self {
        self.zone = Some(name.into());
        self
    }

    /// No nominal time before `start` (inclusive bound).
    pub fn start(mut self, start: DateTime<Utc>) -> Self {
        self.start = Some(start);
        self
    }

    /// No nominal time after `end` (inclusive bound).
    pub fn end(mut self, end: DateTime<Utc>) -> Self {
        self.end = Some(end);
        self
    }

    /// Delay each fire by a deterministic offset in `[0, max_jitter)`.
    pub fn jitter(mut self, max_jitter: Duration) -> Self {
        self.max_jitter = max_jitter;
        self
    }

    pub fn build(self) -> Result<Spec, SpecError> {
        let timing = match self.timing {
            TimingInput::Cron(expr) => Timing::Cron(CronExpr::parse(&expr)?),
            TimingInput::Interval { every, anchor } => {
                if every < MIN_PERIOD {
                    return Err(SpecError::IntervalTooShort { every });
                }
                if every > MAX_INTERVAL {
                    return Err(SpecError::IntervalTooLong { every });
                }
                if every.subsec_nanos() != 0 {
                    return Err(SpecError::IntervalNotWholeSeconds { every });
                }
                Timing::Interval { every, anchor: anchor.trunc_subsecs(0) }
            }
        };
        let zone = match &self.zone {
            Some(name) => parse_zone(name)?,
            None => Tz::UTC,
        };
        if self.max_jitter > MAX_JITTER {
            return Err(SpecError::JitterTooLarge { jitter: self.max_jitter });
        }
        let spec = Spec { timing, zone, start: self.start, end: self.end, max_jitter: self.max_jitter };
        if let (Some(start), Some(end)) = (spec.start, spec.end) {
            if start > end {
                return Err(SpecError::StartAfterEnd { start, end });
            }
            // next_after already applies both bounds.
            if spec.next_after(start - TimeDelta::nanoseconds(1)).is_none() {
                return Err(SpecError::NoFireInWindow { start, end });
            }
        }
        Ok(spec)
    }
}

impl Spec {
    /// A cron schedule; see the module documentation for the syntax.
    pub fn cron(expr: impl Into<String>) -> SpecBuilder {
        SpecBuilder::new(TimingInput::Cron(expr.into()))
    }

    /// A fixed interval: nominal times `anchor + k·every` for every integer `k` (bound
    /// them with `start`/`end`). The anchor's fraction of a second is dropped.
    pub fn every(every: Duration, anchor: DateTime<Utc>) -> SpecBuilder {
        SpecBuilder::new(TimingInput::Interval { every, anchor })
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    pub fn zone(&self) -> Tz {
        self.zone
    }

    pub fn start(&self) -> Option<DateTime<Utc>> {
        self.start
    }

    pub fn end(&self) -> Option<DateTime<Utc>> {
        self.end
    }

    pub fn max_jitter(&self) -> Duration {
        self.max_jitter
    }

    /// The first nominal time strictly after `after`, within `start`/`end`; `None`
    /// once past `end` (or at the end of the calendar).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let after = match self.start {
            // "After start − 1 ns" is "at or after start": nominal times are whole
            // seconds, so nothing is lost below a nanosecond.
            Some(start) if after < start => start.checked_sub_signed(TimeDelta::nanoseconds(1))?,
            _ => after,
        };
        let next = match &self.timing {
            Timing::Cron(cron) => next_cron(cron, self.zone, after)?,
            Timing::Interval { every, anchor } => next_interval(*every, *anchor, after)?,
        };
        match self.end {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The nominal times `t` with `after < t <= until`, in increasing order, at most
    /// `limit` of them. Lazy: each step is one [`Spec::next_after`]. For a closed range
    /// `[from, until]` pass `after = from − 1 ns`.
    pub fn nominal_times(&self, after: DateTime<Utc>, until: DateTime<Utc>, limit: usize) -> NominalTimes<'_> {
        NominalTimes { spec: self, cursor: after, until, remaining: limit }
    }

    /// Is `t` one of this spec's nominal times?
    pub fn is_nominal(&self, t: DateTime<Utc>) -> bool {
        t.checked_sub_signed(TimeDelta::nanoseconds(1)).and_then(|before| self.next_after(before)) == Some(t)
    }

    /// The jitter offset of the fire at `nominal` for the schedule identified by `key`
    /// (any stable bytes, e.g. the account and schedule name): in
    /// `[0, max_jitter)` and below the gap to the next nominal time. Deterministic.
    pub fn jitter_offset(&self, key: &[u8], nominal: DateTime<Utc>) -> Duration {
        if self.max_jitter.is_zero() {
            return Duration::ZERO;
        }
        let gap = self.next_after(nominal).and_then(|next| (next - nominal).to_std().ok());
        let cap = gap.map_or(self.max_jitter, |gap| gap.min(self.max_jitter));
        jitter::offset(key, nominal, cap)
    }

    /// The instant to fire `nominal` at: `nominal + jitter_offset(key, nominal)`.
    /// `end` bounds the nominal time, not this instant.
    pub fn fire_at(&self, key: &[u8], nominal: DateTime<Utc>) -> DateTime<Utc> {
        let offset = self.jitter_offset(key, nominal);
        // Below MAX_JITTER (a day), so this only fails at the end of the calendar.
        nominal.checked_add_signed(TimeDelta::from_std(offset).unwrap_or_default()).unwrap_or(nominal)
    }
}

impl SpecBuilder {
    fn new(timing: TimingInput) -> Self {
        SpecBuilder { timing, zone: None, start: None, end: None, max_jitter: Duration::ZERO }
    }
}

/// Iterator over nominal times in a range; see [`Spec::nominal_times`].
#[derive(Debug, Clone)]
pub struct NominalTimes<'a> {
    spec: &'a Spec,
    cursor: DateTime<Utc>,
    until: DateTime<Utc>,
    remaining: usize,
}

impl Iterator for NominalTimes<'_> {
    type Item = DateTime<Utc>;

    fn next(&mut self) -> Option<DateTime<Utc>> {
        if self.remaining == 0 {
            return None;
        }
        let next = self.spec.next_after(self.cursor).filter(|&t| t <= self.until);
        match next {
            Some(t) => {
                self.cursor = t;
                self.remaining -= 1;
            }
            None => self.remaining = 0,
        }
        next
    }
}

/// The first fire of `cron` in `tz` strictly after `after`. Wall times below
/// `after`'s own wall time fire at or before `after` (the wall time → instant map is
/// non-decreasing), so the search starts there and skips the few matches that still
/// fire at or before `after`: after a fall-back, the rest of the repeated hour, whose
/// first occurrences are already past.
fn next_cron(cron: &CronExpr, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut from = after.with_timezone(&tz).naive_local();
    loop {
        let wall = cron.next_match(from)?;
        let at = zone::fire_instant(tz, wall)?;
        if at > after {
            return Some(at);
        }
        from = wall.checked_add_signed(TimeDelta::seconds(1))?;
    }
}

/// The first `anchor + k·every` strictly after `after`. Whole seconds throughout: a
/// whole-second `t` is after `after` exactly when it is after `after`'s whole second.
fn next_interval(every: Duration, anchor: DateTime<Utc>, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let every = i64::try_from(every.as_secs()).ok()?;
    let since_anchor = after.timestamp().checked_sub(anchor.timestamp())?;
    let k = since_anchor.div_euclid(every).checked_add(1)?;
    let secs = anchor.timestamp().checked_add(k.checked_mul(every)?)?;
    DateTime::from_timestamp(secs, 0)
}
