//! Cron expressions: parsing into per-field sets and the search for the next
//! matching *wall time* (a `NaiveDateTime`, no zone). Mapping wall times to instants
//! (DST) is [`super::zone`]'s job; this module never sees an offset.
//!
//! The search skips by fields (month, then day, hour, minute, second), so finding the
//! next fire of `0 0 29 2 *` from March 2096 (next: February 2104) visits a few dozen
//! days, never every second in between.

use super::SpecError;
use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use std::fmt;

/// Longest cron expression accepted, in bytes (macros included).
pub const MAX_EXPRESSION_LEN: usize = 256;

/// How many calendar years past the starting one the wall-time search looks.
///
/// Any expression that passes [`CronExpr::parse`] matches within this horizon from
/// every starting point: the rarest match is February 29, and leap years are at most
/// eight years apart (2096 → 2104, as 2100 is not a leap year). Every other month/day
/// combination the parser accepts occurs every year; a restricted day of week occurs
/// in every month. So the horizon bounds the work, not the answers.
pub(crate) const SEARCH_HORIZON_YEARS: i32 = 8;

/// One of the six fields of a cron expression, as named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CronField {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl CronField {
    fn bounds(self) -> (u32, u32) {
        match self {
            CronField::Second | CronField::Minute => (0, 59),
            CronField::Hour => (0, 23),
            CronField::DayOfMonth => (1, 31),
            CronField::Month => (1, 12),
            // 7 is accepted as Sunday and folded to 0 after expansion.
            CronField::DayOfWeek => (0, 7),
        }
    }

    fn names(self) -> &'static [&'static str] {
        const MONTHS: &[&str] = &["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
        const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
        match self {
            CronField::Month => MONTHS,
            CronField::DayOfWeek => DAYS,
            _ => &[],
        }
    }

    /// The value a name stands for: `JAN` = 1, `SUN` = 0.
    fn name_value(self, name: &str) -> Option<u32> {
        let first = if self == CronField::Month { 1 } else { 0 };
        self.names().iter().position(|n| n.eq_ignore_ascii_case(name)).map(|i| i as u32 + first)
    }
}

impl fmt::Display for CronField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CronField::Second => "second",
            CronField::Minute => "minute",
            CronField::Hour => "hour",
            CronField::DayOfMonth => "day-of-month",
            CronField::Month => "month",
            CronField::DayOfWeek => "day-of-week",
        })
    }
}

/// A set of values of one field, bit `v` set when `v` matches. 64 bits cover every
/// field (seconds and minutes go up to 59).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits(u64);

impl Bits {
    fn contains(self, v: u32) -> bool {
        v < 64 && self.0 & (1 << v) != 0
    }

    /// The smallest member `>= v`.
    fn at_or_after(self, v: u32) -> Option<u32> {
        if v >= 64 {
            return None;
        }
        let rest = self.0 & (u64::MAX << v);
        (rest != 0).then(|| rest.trailing_zeros())
    }

    fn first(self) -> Option<u32> {
        self.at_or_after(0)
    }

    fn full(lo: u32, hi: u32) -> Bits {
        Bits((lo..=hi).fold(0, |acc, v| acc | (1 << v)))
    }
}

/// A parsed cron expression: five fields (`min hour dom month dow`) or six (with
/// leading seconds), or a macro. Matching is against wall time; see the module
/// documentation of [`crate::schedule`] for the full syntax and rules.
///
/// Equality is by source text (trimmed): `0 9 * * 1` and `0 9 * * MON` fire alike
/// but are different expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr {
    source: String,
    seconds: Bits,
    minutes: Bits,
    hours: Bits,
    days_of_month: Bits,
    months: Bits,
    days_of_week: Bits,
    /// The standard rule: when both day fields are restricted (neither matches every
    /// value), a day matches if *either* does; otherwise both must.
    day_or: bool,
}

impl CronExpr {
    /// Parses a cron expression. Errors name the field and the reason.
    pub fn parse(expr: &str) -> Result<CronExpr, SpecError> {
        if expr.len() > MAX_EXPRESSION_LEN {
            return Err(SpecError::ExpressionTooLong { len: expr.len(), max: MAX_EXPRESSION_LEN });
        }
        let source = expr.trim();
        if source.is_empty() {
            return Err(SpecError::EmptyExpression);
        }
        let expanded = if source.starts_with('@') { expand_macro(source)? } else { source };
        let fields: Vec<&str> = expanded.split_ascii_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(SpecError::FieldCount { found: n }),
        };
        let seconds = parse_field(CronField::Second, sec)?;
        let minutes = parse_field(CronField::Minute, rest[0])?;
        let hours = parse_field(CronField::Hour, rest[1])?;
        let days_of_month = parse_field(CronField::DayOfMonth, rest[2])?;
        let months = parse_field(CronField::Month, rest[3])?;
        let mut days_of_week = parse_field(CronField::DayOfWeek, rest[4])?;
        if days_of_week.contains(7) {
            days_of_week = Bits((days_of_week.0 & !(1 << 7)) | 1);
        }
        let dom_restricted = days_of_month != Bits::full(1, 31);
        let dow_restricted = days_of_week != Bits::full(0, 6);
        let cron = CronExpr {
            source: source.to_string(),
            seconds,
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            day_or: dom_restricted && dow_restricted,
        };
        // Only a restricted day of month alone can rule out every day: a restricted
        // day of week (alone or OR-ed) occurs in every month.
        if dom_restricted && !dow_restricted && !cron.some_month_has_a_day() {
            return Err(SpecError::NeverFires { expr: cron.source });
        }
        Ok(cron)
    }

    /// The expression as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn some_month_has_a_day(&self) -> bool {
        (1..=12u32).filter(|&m| self.months.contains(m)).any(|m| {
            // February counts with 29 days: the expression fires in leap years.
            let longest = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m as usize - 1];
            self.days_of_month.first().is_some_and(|d| d <= longest)
        })
    }

    /// Does the date match the month and day fields?
    pub(crate) fn date_matches(&self, date: NaiveDate) -> bool {
        if !self.months.contains(date.month()) {
            return false;
        }
        let dom = self.days_of_month.contains(date.day());
        let dow = self.days_of_week.contains(date.weekday().num_days_from_sunday());
        if self.day_or {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// Does the wall time match every field? (Whole seconds only.) This is the wall-
    /// clock test; which *instant* a matching wall time fires at is the DST rule's.
    pub fn matches(&self, wall: NaiveDateTime) -> bool {
        self.date_matches(wall.date())
            && self.hours.contains(wall.hour())
            && self.minutes.contains(wall.minute())
            && self.seconds.contains(wall.second())
            && wall.nanosecond() == 0
    }

    /// The earliest matching wall time `>= from` (`from` is taken to the whole second,
    /// rounding up), or `None` past the search horizon or the calendar's end.
    pub(crate) fn next_match(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let from = if from.nanosecond() == 0 {
            from
        } else {
            from.with_nanosecond(0)?.checked_add_signed(chrono::TimeDelta::seconds(1))?
        };
        let last_year = from.year().checked_add(SEARCH_HORIZON_YEARS)?;
        let mut date = from.date();
        let (mut h, mut m, mut s) = (from.hour(), from.minute(), from.second());
        // Each pass either returns or moves (date, h, m, s) strictly forward, to the
        // next candidate that the failed field allows; the year bound ends the loop.
        loop {
            if date.year() > last_year {
                return None;
            }
            if !self.months.contains(date.month()) {
                date = match self.months.at_or_after(date.month() + 1) {
                    Some(month) => NaiveDate::from_ymd_opt(date.year(), month, 1)?,
                    None => NaiveDate::from_ymd_opt(date.year().checked_add(1)?, self.months.first()?, 1)?,
                };
                (h, m, s) = (0, 0, 0);
                continue;
            }
            if !self.date_matches(date) {
                date = date.succ_opt()?;
                (h, m, s) = (0, 0, 0);
                continue;
            }
            match self.hours.at_or_after(h) {
                Some(next) if next == h => {}
                Some(next) => (h, m, s) = (next, 0, 0),
                None => {
                    date = date.succ_opt()?;
                    (h, m, s) = (0, 0, 0);
                    continue;
                }
            }
            match self.minutes.at_or_after(m) {
                Some(next) if next == m => {}
                Some(next) => (m, s) = (next, 0),
                None => {
                    (h, m, s) = (h + 1, 0, 0);
                    if h == 24 {
                        date = date.succ_opt()?;
                        h = 0;
                    }
                    continue;
                }
            }
            match self.seconds.at_or_after(s) {
                Some(next) => {
                    return Some(date.and_time(NaiveTime::from_hms_opt(h, m, next)?));
                }
                None => {
                    (m, s) = (m + 1, 0);
                    if m == 60 {
                        (h, m) = (h + 1, 0);
                        if h == 24 {
                            date = date.succ_opt()?;
                            h = 0;
                        }
                    }
                }
            }
        }
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn expand_macro(source: &str) -> Result<&'static str, SpecError> {
    Ok(match source.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return Err(SpecError::UnknownMacro { name: source.to_string() }),
    })
}

fn parse_field(field: CronField, text: &str) -> Result<Bits, SpecError> {
    let err = |reason: String| SpecError::Field { field, reason };
    let (lo, hi) = field.bounds();
    let mut bits = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(err(format!("empty list item in \"{text}\"")));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let (start, end) = if range == "*" {
            (lo, if field == CronField::DayOfWeek { 6 } else { hi })
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (parse_value(field, a)?, parse_value(field, b)?);
            if a > b {
                return Err(err(format!("range {a}-{b} is backwards (its start is after its end)")));
            }
            (a, b)
        } else {
            let a = parse_value(field, range)?;
            // `a/n` means `a-max/n`; a bare value is just itself.
            (a, if step.is_some() { hi } else { a })
        };
        let step = match step {
            None => 1,
            Some(text) => {
                let n: u32 =
                    text.parse().map_err(|_| err(format!("step \"{text}\" is not a positive whole number")))?;
                if n == 0 {
                    return Err(err("step 0 is not allowed".to_string()));
                }
                if n > hi - lo {
                    return Err(err(format!("step {n} is larger than the field's range {lo}-{hi}")));
                }
                n
            }
        };
        for v in (start..=end).step_by(step as usize) {
            bits |= 1 << v;
        }
    }
    Ok(Bits(bits))
}

fn parse_value(field: CronField, text: &str) -> Result<u32, SpecError> {
    let err = |reason: String| SpecError::Field { field, reason };
    let (lo, hi) = field.bounds();
    if text.is_empty() {
        return Err(err("a range is missing a bound".to_string()));
    }
    let v = if text.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than any field needs: out of range, and no u32 overflow.
        if text.len() > 4 {
            return Err(err(format!("{text} is out of range {lo}-{hi}")));
        }
        text.parse::<u32>().expect("at most four ASCII digits")
    } else if let Some(v) = field.name_value(text) {
        v
    } else if field.names().is_empty() {
        return Err(err(format!("\"{text}\" is not a number")));
    } else {
        let names = field.names();
        return Err(err(format!(
            "\"{text}\" is neither a number nor a name ({}-{})",
            names[0],
            names[names.len() - 1]
        )));
    };
    if v < lo || v > hi {
        return Err(err(format!("{v} is out of range {lo}-{hi}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn next(expr: &str, from: &str) -> Option<NaiveDateTime> {
        CronExpr::parse(expr).unwrap().next_match(wall(from))
    }

    fn field_error(expr: &str) -> String {
        CronExpr::parse(expr).unwrap_err().to_string()
    }

    fn set(bits: Bits) -> Vec<u32> {
        (0..64).filter(|&v| bits.contains(v)).collect()
    }

    #[test]
    fn five_fields_fire_at_second_zero() {
        let c = CronExpr::parse("*/15 * * * *").unwrap();
        assert_eq!(set(c.seconds), vec![0]);
        assert_eq!(set(c.minutes), vec![0, 15, 30, 45]);
    }

    #[test]
    fn six_fields_lead_with_seconds() {
        let c = CronExpr::parse("5,10 0 12 * * *").unwrap();
        assert_eq!(set(c.seconds), vec![5, 10]);
        assert_eq!(set(c.minutes), vec![0]);
        assert_eq!(set(c.hours), vec![12]);
    }

    #[test]
    fn lists_ranges_and_steps_expand() {
        let c = CronExpr::parse("1-10/2,30,45-47 * * * *").unwrap();
        assert_eq!(set(c.minutes), vec![1, 3, 5, 7, 9, 30, 45, 46, 47]);
        let c = CronExpr::parse("0 5/6 * * *").unwrap();
        assert_eq!(set(c.hours), vec![5, 11, 17, 23]);
    }

    #[test]
    fn names_are_case_insensitive_and_mix_with_numbers() {
        let c = CronExpr::parse("0 0 * jan,Mar-MAY,12 mon-FRI").unwrap();
        assert_eq!(set(c.months), vec![1, 3, 4, 5, 12]);
        assert_eq!(set(c.days_of_week), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn seven_is_sunday() {
        assert_eq!(set(CronExpr::parse("0 0 * * 7").unwrap().days_of_week), vec![0]);
        assert_eq!(set(CronExpr::parse("0 0 * * 5-7").unwrap().days_of_week), vec![0, 5, 6]);
        assert_eq!(set(CronExpr::parse("0 0 * * SUN").unwrap().days_of_week), vec![0]);
        // 0-7 is every day, so the day-of-week field is unrestricted.
        assert!(!CronExpr::parse("0 0 1 * 0-7").unwrap().day_or);
    }

    #[test]
    fn day_fields_or_only_when_both_restricted() {
        assert!(CronExpr::parse("0 0 1 * MON").unwrap().day_or);
        assert!(!CronExpr::parse("0 0 * * MON").unwrap().day_or);
        assert!(!CronExpr::parse("0 0 1 * *").unwrap().day_or);
        // Restricted means "does not match every value", not "is not written `*`".
        assert!(!CronExpr::parse("0 0 */1 * MON").unwrap().day_or);
        assert!(CronExpr::parse("0 0 */2 * MON").unwrap().day_or);
    }

    #[test]
    fn macros_expand() {
        for (m, e) in [
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@HOURLY", "0 * * * *"),
        ] {
            let a = CronExpr::parse(m).unwrap();
            let b = CronExpr::parse(e).unwrap();
            assert_eq!(
                (a.seconds, a.minutes, a.hours, a.days_of_month, a.months, a.days_of_week),
                (b.seconds, b.minutes, b.hours, b.days_of_month, b.months, b.days_of_week),
                "{m}"
            );
            assert_eq!(a.as_str(), m);
        }
    }

    #[test]
    fn surrounding_and_inner_whitespace_is_ignored() {
        let c = CronExpr::parse("  0   9\t* * 1 ").unwrap();
        assert_eq!(c.as_str(), "0   9\t* * 1");
        assert_eq!(set(c.hours), vec![9]);
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        assert_eq!(field_error("61 * * * *"), "invalid cron expression: minute field: 61 is out of range 0-59");
        assert_eq!(field_error("0 24 * * *"), "invalid cron expression: hour field: 24 is out of range 0-23");
        assert_eq!(field_error("0 0 0 * *"), "invalid cron expression: day-of-month field: 0 is out of range 1-31");
        assert_eq!(field_error("0 0 * 13 *"), "invalid cron expression: month field: 13 is out of range 1-12");
        assert_eq!(field_error("0 0 * * 8"), "invalid cron expression: day-of-week field: 8 is out of range 0-7");
        assert_eq!(field_error("60 0 0 * * *"), "invalid cron expression: second field: 60 is out of range 0-59");
        assert_eq!(
            field_error("0 0 * FOO *"),
            "invalid cron expression: month field: \"FOO\" is neither a number nor a name (JAN-DEC)"
        );
        assert_eq!(
            field_error("0 0 * * MONDAY"),
            "invalid cron expression: day-of-week field: \"MONDAY\" is neither a number nor a name (SUN-SAT)"
        );
        assert_eq!(field_error("x * * * *"), "invalid cron expression: minute field: \"x\" is not a number");
        assert_eq!(field_error("0 JAN * * *"), "invalid cron expression: hour field: \"JAN\" is not a number");
        assert_eq!(
            field_error("0 22-2 * * *"),
            "invalid cron expression: hour field: range 22-2 is backwards (its start is after its end)"
        );
        assert_eq!(field_error("*/0 * * * *"), "invalid cron expression: minute field: step 0 is not allowed");
        assert_eq!(
            field_error("*/60 * * * *"),
            "invalid cron expression: minute field: step 60 is larger than the field's range 0-59"
        );
        assert_eq!(
            field_error("*/x * * * *"),
            "invalid cron expression: minute field: step \"x\" is not a positive whole number"
        );
        assert_eq!(field_error("1,,2 * * * *"), "invalid cron expression: minute field: empty list item in \"1,,2\"");
        assert_eq!(field_error("1- * * * *"), "invalid cron expression: minute field: a range is missing a bound");
        assert_eq!(field_error("-1 * * * *"), "invalid cron expression: minute field: a range is missing a bound");
        assert_eq!(
            field_error("99999999999 * * * *"),
            "invalid cron expression: minute field: 99999999999 is out of range 0-59"
        );
    }

    #[test]
    fn wrong_field_counts_and_empty_input_are_rejected() {
        assert_eq!(
            field_error("* * * *"),
            "invalid cron expression: it has 4 fields; expected 5 (minute hour day-of-month month day-of-week) \
             or 6 (second minute hour day-of-month month day-of-week)"
        );
        assert!(matches!(CronExpr::parse("* * * * * * *"), Err(SpecError::FieldCount { found: 7 })));
        assert_eq!(CronExpr::parse("   "), Err(SpecError::EmptyExpression));
        assert_eq!(field_error(""), "invalid cron expression: it is empty");
    }

    #[test]
    fn unknown_macros_and_reboot_are_rejected() {
        assert_eq!(
            field_error("@reboot"),
            "invalid cron expression: unknown macro \"@reboot\"; expected @yearly, @annually, @monthly, \
             @weekly, @daily, @midnight or @hourly"
        );
        assert!(matches!(CronExpr::parse("@every 5m"), Err(SpecError::UnknownMacro { .. })));
    }

    #[test]
    fn overlong_expressions_are_rejected() {
        let long = format!("{} * * * *", vec!["1"; 200].join(","));
        assert_eq!(CronExpr::parse(&long), Err(SpecError::ExpressionTooLong { len: long.len(), max: 256 }));
    }

    #[test]
    fn expressions_that_can_never_fire_are_rejected() {
        for e in ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30,31 FEB *", "0 0 31 2-2 *"] {
            assert_eq!(
                CronExpr::parse(e).unwrap_err().to_string(),
                format!("invalid cron expression: \"{e}\" can never fire (no month it names has that day)")
            );
        }
        // February 29 fires in leap years; the day of week rescues an impossible day.
        for e in ["0 0 29 2 *", "0 0 31 2,3 *", "0 0 30 2 MON", "0 0 31 4 */2"] {
            assert!(CronExpr::parse(e).is_ok(), "{e}");
        }
    }

    #[test]
    fn never_fires_check_agrees_with_search_for_every_month_and_day() {
        for month in 1..=12 {
            for day in 1..=31 {
                let e = format!("0 0 {day} {month} *");
                let parsed = CronExpr::parse(&e);
                let found = NaiveDate::from_ymd_opt(2024, month, day).is_some();
                assert_eq!(parsed.is_ok(), found, "{e}");
                if let Ok(c) = parsed {
                    assert!(c.next_match(wall("2025-01-01 00:00:00")).is_some(), "{e}");
                }
            }
        }
    }

    #[test]
    fn next_match_is_at_or_after_from() {
        assert_eq!(next("*/5 * * * *", "2026-01-01 00:00:00"), Some(wall("2026-01-01 00:00:00")));
        assert_eq!(next("*/5 * * * *", "2026-01-01 00:00:01"), Some(wall("2026-01-01 00:05:00")));
        assert_eq!(next("*/5 * * * *", "2026-12-31 23:59:00"), Some(wall("2027-01-01 00:00:00")));
        let c = CronExpr::parse("* * * * * *").unwrap();
        let from = wall("2026-01-01 00:00:00") + chrono::TimeDelta::milliseconds(1);
        assert_eq!(c.next_match(from), Some(wall("2026-01-01 00:00:01")));
    }

    #[test]
    fn next_match_skips_by_fields() {
        assert_eq!(next("0 9 * * MON-FRI", "2026-01-02 09:00:01"), Some(wall("2026-01-05 09:00:00")));
        assert_eq!(next("30 2 1 * *", "2026-01-01 02:30:01"), Some(wall("2026-02-01 02:30:00")));
        assert_eq!(next("0 0 1 JAN *", "2026-01-01 00:00:01"), Some(wall("2027-01-01 00:00:00")));
        assert_eq!(next("0 0 31 * *", "2026-02-01 00:00:00"), Some(wall("2026-03-31 00:00:00")));
        assert_eq!(next("15 30 10 4 5 *", "2026-01-01 00:00:00"), Some(wall("2026-05-04 10:30:15")));
        assert_eq!(next("59 59 23 31 12 *", "2026-01-01 00:00:00"), Some(wall("2026-12-31 23:59:59")));
        // Minute and second carry into the hour and the day.
        assert_eq!(next("0 */20 * * * *", "2026-01-01 23:40:01"), Some(wall("2026-01-02 00:00:00")));
        assert_eq!(next("10 * 5 * * *", "2026-01-01 05:59:11"), Some(wall("2026-01-02 05:00:10")));
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        // The 13th or any Friday.
        let c = CronExpr::parse("0 0 13 * FRI").unwrap();
        let mut from = wall("2026-03-01 00:00:00");
        let mut got = Vec::new();
        for _ in 0..5 {
            let w = c.next_match(from).unwrap();
            got.push(w.date().to_string());
            from = w + chrono::TimeDelta::seconds(1);
        }
        assert_eq!(got, ["2026-03-06", "2026-03-13", "2026-03-20", "2026-03-27", "2026-04-03"]);
        // Only one restricted: both must hold (Mondays in January).
        assert_eq!(next("0 0 * 1 MON", "2026-01-06 00:00:00"), Some(wall("2026-01-12 00:00:00")));
    }

    #[test]
    fn february_29_is_found_across_a_non_leap_century() {
        assert_eq!(next("0 0 29 2 *", "2026-01-01 00:00:00"), Some(wall("2028-02-29 00:00:00")));
        assert_eq!(next("0 0 29 2 *", "2096-03-01 00:00:00"), Some(wall("2104-02-29 00:00:00")));
    }

    #[test]
    fn next_match_ends_at_the_calendar_limit() {
        assert_eq!(CronExpr::parse("* * * * *").unwrap().next_match(NaiveDateTime::MAX), None);
        assert_eq!(next("0 0 1 1 *", "2026-01-01 00:00:01"), Some(wall("2027-01-01 00:00:00")));
    }
}
