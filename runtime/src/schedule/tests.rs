//! Spec tests with fixed instants: next fires, DST in six zones, start/end, jitter,
//! intervals, and properties checked against a brute-force oracle that reasons from
//! instants (not wall times) so it shares no code with the search.

use super::*;
use chrono::{NaiveDateTime, Offset, TimeZone};
use proptest::prelude::*;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).with_timezone(&Utc)
}

fn cron(expr: &str) -> Spec {
    Spec::cron(expr).build().unwrap()
}

fn cron_in(expr: &str, zone: &str) -> Spec {
    Spec::cron(expr).zone(zone).build().unwrap()
}

/// Nominal times in `(after, until]` as local wall time with offset, for reading.
fn local_fires(spec: &Spec, after: &str, until: &str) -> Vec<String> {
    spec.nominal_times(utc(after), utc(until), 1000)
        .map(|t| t.with_timezone(&spec.zone()).format("%m-%d %H:%M:%S%:z").to_string())
        .collect()
}

fn utc_fires(spec: &Spec, after: &str, until: &str) -> Vec<String> {
    spec.nominal_times(utc(after), utc(until), 1000).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).collect()
}

// ---------------------------------------------------------------- building

#[test]
fn a_spec_defaults_to_utc_no_bounds_no_jitter() {
    let s = cron("0 * * * *");
    assert_eq!(s.zone(), Tz::UTC);
    assert_eq!((s.start(), s.end(), s.max_jitter()), (None, None, Duration::ZERO));
    assert!(matches!(s.timing(), Timing::Cron(c) if c.as_str() == "0 * * * *"));
}

#[test]
fn build_reports_the_first_bad_input() {
    let err = |b: SpecBuilder| b.build().unwrap_err().to_string();
    assert_eq!(err(Spec::cron("61 * * * *")), "invalid cron expression: minute field: 61 is out of range 0-59");
    assert_eq!(err(Spec::cron("0 * * * *").zone("Europe/Pariss")), "unknown time zone \"Europe/Pariss\"");
    assert_eq!(
        err(Spec::cron("0 0 30 2 *").zone("Nowhere")),
        "invalid cron expression: \"0 0 30 2 *\" can never fire (no month it names has that day)"
    );
    assert_eq!(
        err(Spec::cron("0 * * * *").jitter(Duration::from_secs(86_401))),
        "jitter 86401s is too large: the limit is 86400s"
    );
    let (a, b) = (utc("2026-01-02T00:00:00Z"), utc("2026-01-01T00:00:00Z"));
    assert_eq!(
        err(Spec::cron("0 * * * *").start(a).end(b)),
        "start 2026-01-02 00:00:00 UTC is after end 2026-01-01 00:00:00 UTC"
    );
}

#[test]
fn spec_errors_become_invalid_input() {
    let e: crate::Error = Spec::cron("* * *").build().unwrap_err().into();
    assert!(
        matches!(e, crate::Error::InvalidInput(ref m) if m.starts_with("invalid cron expression: it has 3 fields"))
    );
    assert!(e.is_permanent());
}

#[test]
fn intervals_must_be_whole_seconds_between_the_limits() {
    let anchor = utc("2026-01-01T00:00:00Z");
    let err = |every: Duration| Spec::every(every, anchor).build().unwrap_err().to_string();
    assert_eq!(err(Duration::from_millis(999)), "interval 999ms is too short: fires must be at least 1s apart");
    assert_eq!(err(Duration::ZERO), "interval 0ns is too short: fires must be at least 1s apart");
    assert_eq!(err(Duration::from_millis(1500)), "interval 1.5s is not a whole number of seconds");
    assert_eq!(err(MAX_INTERVAL + Duration::from_secs(1)), "interval 315360001s is too long: the limit is 315360000s");
    assert!(Spec::every(MIN_PERIOD, anchor).build().is_ok());
    assert!(Spec::every(MAX_INTERVAL, anchor).build().is_ok());
}

#[test]
fn a_window_without_a_nominal_time_is_rejected() {
    let start = utc("2026-03-01T00:00:00Z");
    let end = utc("2026-04-01T00:00:00Z");
    assert_eq!(
        Spec::cron("0 0 1 1 *").start(start).end(end).build().unwrap_err(),
        SpecError::NoFireInWindow { start, end }
    );
    // Both bounds are inclusive: a window of one instant holding a nominal time is fine.
    assert!(Spec::cron("0 0 1 4 *").start(end).end(end).build().is_ok());
    assert!(Spec::every(Duration::from_secs(3600), start).start(end).end(end).build().is_ok());
    assert!(Spec::every(Duration::from_secs(7200), utc("2026-01-01T01:00:00Z")).start(end).end(end).build().is_err());
}

// ---------------------------------------------------------------- next_after

#[test]
fn next_after_is_strictly_after() {
    let s = cron("*/5 * * * *");
    assert_eq!(s.next_after(utc("2026-01-01T00:00:00Z")), Some(utc("2026-01-01T00:05:00Z")));
    assert_eq!(s.next_after(utc("2026-01-01T00:04:59.999Z")), Some(utc("2026-01-01T00:05:00Z")));
    assert_eq!(s.next_after(utc("2026-01-01T00:05:00.001Z")), Some(utc("2026-01-01T00:10:00Z")));
}

#[test]
fn next_after_for_many_expressions() {
    let after = "2026-01-15T10:20:30Z"; // a Thursday
    for (expr, want) in [
        ("* * * * *", "2026-01-15T10:21:00Z"),
        ("* * * * * *", "2026-01-15T10:20:31Z"),
        ("*/10 * * * * *", "2026-01-15T10:20:40Z"),
        ("0 * * * *", "2026-01-15T11:00:00Z"),
        ("30 10 * * *", "2026-01-15T10:30:00Z"),
        ("20 10 * * *", "2026-01-16T10:20:00Z"),
        ("0 9 * * MON-FRI", "2026-01-16T09:00:00Z"),
        ("0 9 * * SAT,SUN", "2026-01-17T09:00:00Z"),
        ("0 0 * * 7", "2026-01-18T00:00:00Z"),
        ("0 0 1 * *", "2026-02-01T00:00:00Z"),
        ("0 0 L * *", ""),
        ("0 0 1 1 *", "2027-01-01T00:00:00Z"),
        ("0 0 29 2 *", "2028-02-29T00:00:00Z"),
        ("0 0 31 * *", "2026-01-31T00:00:00Z"),
        ("0 12 13 * FRI", "2026-01-16T12:00:00Z"),
        ("15 14 1-7 * 1", "2026-01-19T14:15:00Z"),
        ("0 0-23/6 * * *", "2026-01-15T12:00:00Z"),
        ("5/20 * * * *", "2026-01-15T10:25:00Z"),
        ("0 0 * JUN *", "2026-06-01T00:00:00Z"),
        ("0 0 1 */3 *", "2026-04-01T00:00:00Z"),
        ("@hourly", "2026-01-15T11:00:00Z"),
        ("@daily", "2026-01-16T00:00:00Z"),
        ("@weekly", "2026-01-18T00:00:00Z"),
        ("@monthly", "2026-02-01T00:00:00Z"),
        ("@yearly", "2027-01-01T00:00:00Z"),
    ] {
        let got = Spec::cron(expr).build().map(|s| s.next_after(utc(after)));
        if want.is_empty() {
            assert!(got.is_err(), "{expr} should not parse");
        } else {
            assert_eq!(got, Ok(Some(utc(want))), "{expr}");
        }
    }
}

#[test]
fn next_after_in_a_zone_reads_wall_time() {
    let s = cron_in("0 9 * * *", "Asia/Kolkata");
    assert_eq!(s.next_after(utc("2026-06-01T00:00:00Z")), Some(utc("2026-06-01T03:30:00Z")));
    let s = cron_in("0 9 * * *", "America/New_York");
    assert_eq!(s.next_after(utc("2026-01-01T00:00:00Z")), Some(utc("2026-01-01T14:00:00Z")));
    assert_eq!(s.next_after(utc("2026-07-01T00:00:00Z")), Some(utc("2026-07-01T13:00:00Z")));
}

#[test]
fn nominal_times_respects_range_and_limit() {
    let s = cron("0 * * * *");
    assert_eq!(
        utc_fires(&s, "2026-01-01T00:00:00Z", "2026-01-01T03:00:00Z"),
        ["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z", "2026-01-01T03:00:00Z"]
    );
    let first_two: Vec<_> = s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2027-01-01T00:00:00Z"), 2).collect();
    assert_eq!(first_two, [utc("2026-01-01T01:00:00Z"), utc("2026-01-01T02:00:00Z")]);
    assert_eq!(s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T00:59:59Z"), 10).count(), 0);
    assert_eq!(s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T05:00:00Z"), 0).count(), 0);
    // A closed range [from, until]: after = from − 1 ns.
    let from = utc("2026-01-01T01:00:00Z");
    assert_eq!(s.nominal_times(from - TimeDelta::nanoseconds(1), from, 10).collect::<Vec<_>>(), [from]);
}

#[test]
fn nominal_times_over_a_year_is_quick() {
    let s = cron_in("0 0 29 2 *", "Europe/Berlin");
    let t: Vec<_> = s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2126-01-01T00:00:00Z"), 100).collect();
    assert_eq!(t.len(), 24, "leap days in 2026..2126, 2100 excluded");
    assert!(t.iter().all(|t| t.with_timezone(&Tz::Europe__Berlin).format("%m-%d %H:%M").to_string() == "02-29 00:00"));
    let every_second = cron("* * * * * *");
    assert_eq!(
        every_second.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T00:00:00Z"), 100_000).count(),
        86_400
    );
}

#[test]
fn is_nominal_says_whether_an_instant_is_a_fire() {
    let s = cron("0 9 * * *");
    assert!(s.is_nominal(utc("2026-01-01T09:00:00Z")));
    assert!(!s.is_nominal(utc("2026-01-01T09:00:01Z")));
    assert!(!s.is_nominal(utc("2026-01-01T09:00:00.5Z")));
}

#[test]
fn the_end_of_the_calendar_is_not_a_panic() {
    assert_eq!(cron("* * * * *").next_after(DateTime::<Utc>::MAX_UTC), None);
    let s = Spec::every(MAX_INTERVAL, utc("2026-01-01T00:00:00Z")).build().unwrap();
    assert_eq!(s.next_after(DateTime::<Utc>::MAX_UTC), None);
    assert!(s.next_after(DateTime::<Utc>::MIN_UTC).is_some());
    assert_eq!(s.fire_at(b"k", DateTime::<Utc>::MAX_UTC), DateTime::<Utc>::MAX_UTC);
}

// ---------------------------------------------------------------- start / end

#[test]
fn start_and_end_bound_nominal_times_inclusively() {
    let s =
        Spec::cron("0 * * * *").start(utc("2026-01-01T02:00:00Z")).end(utc("2026-01-01T04:00:00Z")).build().unwrap();
    assert_eq!(s.next_after(utc("2025-06-01T00:00:00Z")), Some(utc("2026-01-01T02:00:00Z")));
    assert_eq!(s.next_after(utc("2026-01-01T02:00:00Z")), Some(utc("2026-01-01T03:00:00Z")));
    assert_eq!(s.next_after(utc("2026-01-01T03:00:00Z")), Some(utc("2026-01-01T04:00:00Z")));
    assert_eq!(s.next_after(utc("2026-01-01T04:00:00Z")), None);
    assert_eq!(
        utc_fires(&s, "2020-01-01T00:00:00Z", "2030-01-01T00:00:00Z"),
        ["2026-01-01T02:00:00Z", "2026-01-01T03:00:00Z", "2026-01-01T04:00:00Z"]
    );
}

#[test]
fn a_start_between_fires_waits_for_the_next_one() {
    let s = Spec::cron("0 * * * *").start(utc("2026-01-01T02:00:00.001Z")).build().unwrap();
    assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), Some(utc("2026-01-01T03:00:00Z")));
    let s = Spec::every(Duration::from_secs(600), utc("2026-01-01T00:00:00Z"))
        .start(utc("2026-01-01T00:05:00Z"))
        .build()
        .unwrap();
    assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), Some(utc("2026-01-01T00:10:00Z")));
}

// ---------------------------------------------------------------- intervals

#[test]
fn intervals_are_anchored() {
    let s = Spec::every(Duration::from_secs(300), utc("2026-01-01T00:01:00Z")).build().unwrap();
    assert_eq!(s.next_after(utc("2026-01-01T00:01:00Z")), Some(utc("2026-01-01T00:06:00Z")));
    assert_eq!(s.next_after(utc("2026-06-01T12:00:00Z")), Some(utc("2026-06-01T12:01:00Z")));
    // The anchor is a phase: times before it follow it too.
    assert_eq!(s.next_after(utc("2025-12-31T23:00:00Z")), Some(utc("2025-12-31T23:01:00Z")));
    assert_eq!(s.next_after(utc("2025-12-31T23:00:59.999Z")), Some(utc("2025-12-31T23:01:00Z")));
}

#[test]
fn an_anchor_loses_its_fraction_of_a_second() {
    let s = Spec::every(Duration::from_secs(10), utc("2026-01-01T00:00:03.75Z")).build().unwrap();
    assert!(matches!(s.timing(), Timing::Interval { anchor, .. } if *anchor == utc("2026-01-01T00:00:03Z")));
    assert_eq!(s.next_after(utc("2026-01-01T00:00:04Z")), Some(utc("2026-01-01T00:00:13Z")));
}

#[test]
fn intervals_ignore_dst_and_the_zone() {
    let anchor = utc("2026-03-07T12:00:00Z");
    let s = Spec::every(Duration::from_secs(6 * 3600), anchor).zone("America/New_York").build().unwrap();
    assert_eq!(
        local_fires(&s, "2026-03-08T00:00:00Z", "2026-03-09T00:00:00Z"),
        ["03-08 01:00:00-05:00", "03-08 08:00:00-04:00", "03-08 14:00:00-04:00", "03-08 20:00:00-04:00"]
    );
    let got: Vec<_> = s.nominal_times(utc("2026-03-08T00:00:00Z"), utc("2026-03-09T00:00:00Z"), 10).collect();
    assert!(got.windows(2).all(|w| w[1] - w[0] == TimeDelta::hours(6)));
}

// ---------------------------------------------------------------- DST, 2026

/// New York 2026: spring-forward 03-08 02:00 EST → 03:00 EDT; fall-back 11-01 02:00 EDT → 01:00 EST.
#[test]
fn new_york_spring_forward_fires_at_the_end_of_the_gap() {
    let s = cron_in("30 2 * * *", "America/New_York");
    assert_eq!(
        local_fires(&s, "2026-03-06T12:00:00Z", "2026-03-10T00:00:00Z"),
        ["03-07 02:30:00-05:00", "03-08 03:00:00-04:00", "03-09 02:30:00-04:00"]
    );
    let s = cron_in("*/15 1-3 8 3 *", "America/New_York");
    assert_eq!(
        local_fires(&s, "2026-03-08T00:00:00Z", "2026-03-09T00:00:00Z"),
        [
            "03-08 01:00:00-05:00",
            "03-08 01:15:00-05:00",
            "03-08 01:30:00-05:00",
            "03-08 01:45:00-05:00",
            // 02:00, 02:15, 02:30, 02:45 and 03:00 are one instant: one fire.
            "03-08 03:00:00-04:00",
            "03-08 03:15:00-04:00",
            "03-08 03:30:00-04:00",
            "03-08 03:45:00-04:00",
        ]
    );
}

#[test]
fn new_york_fall_back_fires_each_wall_time_once_at_its_first_occurrence() {
    let s = cron_in("30 1 * * *", "America/New_York");
    assert_eq!(
        local_fires(&s, "2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z"),
        ["10-31 01:30:00-04:00", "11-01 01:30:00-04:00", "11-02 01:30:00-05:00"]
    );
    let s = cron_in("*/15 0-2 1 11 *", "America/New_York");
    assert_eq!(
        local_fires(&s, "2026-11-01T00:00:00Z", "2026-11-02T00:00:00Z"),
        [
            "11-01 00:00:00-04:00",
            "11-01 00:15:00-04:00",
            "11-01 00:30:00-04:00",
            "11-01 00:45:00-04:00",
            "11-01 01:00:00-04:00",
            "11-01 01:15:00-04:00",
            "11-01 01:30:00-04:00",
            "11-01 01:45:00-04:00",
            // 01:00–01:45 EST repeat wall times already fired: skipped.
            "11-01 02:00:00-05:00",
            "11-01 02:15:00-05:00",
            "11-01 02:30:00-05:00",
            "11-01 02:45:00-05:00",
        ]
    );
    let s = cron_in("0 * * * *", "America/New_York");
    assert_eq!(
        utc_fires(&s, "2026-11-01T04:00:00Z", "2026-11-01T08:00:00Z"),
        ["2026-11-01T05:00:00Z", "2026-11-01T07:00:00Z", "2026-11-01T08:00:00Z"]
    );
}

#[test]
fn next_after_inside_the_repeated_hour_skips_to_after_it() {
    // 06:30Z is 01:30 EST, the second pass: 01:45 has already fired (at 05:45Z).
    let s = cron_in("*/15 * * * *", "America/New_York");
    assert_eq!(s.next_after(utc("2026-11-01T06:30:00Z")), Some(utc("2026-11-01T07:00:00Z")));
    // 05:30Z is 01:30 EDT, the first pass.
    assert_eq!(s.next_after(utc("2026-11-01T05:30:00Z")), Some(utc("2026-11-01T05:45:00Z")));
    let s = cron_in("* * * * * *", "America/New_York");
    assert_eq!(s.next_after(utc("2026-11-01T06:00:00Z")), Some(utc("2026-11-01T07:00:00Z")));
}

/// Berlin 2026: 03-29 02:00 CET → 03:00 CEST; 10-25 03:00 CEST → 02:00 CET.
#[test]
fn berlin_both_transitions() {
    let s = cron_in("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        local_fires(&s, "2026-03-27T12:00:00Z", "2026-03-30T12:00:00Z"),
        ["03-28 02:30:00+01:00", "03-29 03:00:00+02:00", "03-30 02:30:00+02:00"]
    );
    assert_eq!(
        local_fires(&s, "2026-10-23T12:00:00Z", "2026-10-26T12:00:00Z"),
        ["10-24 02:30:00+02:00", "10-25 02:30:00+02:00", "10-26 02:30:00+01:00"]
    );
    let s = cron_in("0,30 2-3 * * *", "Europe/Berlin");
    assert_eq!(
        local_fires(&s, "2026-10-24T22:00:00Z", "2026-10-25T03:00:00Z"),
        ["10-25 02:00:00+02:00", "10-25 02:30:00+02:00", "10-25 03:00:00+01:00", "10-25 03:30:00+01:00"]
    );
    assert_eq!(
        local_fires(&s, "2026-03-28T22:00:00Z", "2026-03-29T03:00:00Z"),
        ["03-29 03:00:00+02:00", "03-29 03:30:00+02:00"]
    );
}

/// Sydney 2026 (southern hemisphere): fall-back 04-05 03:00 AEDT → 02:00 AEST;
/// spring-forward 10-04 02:00 AEST → 03:00 AEDT.
#[test]
fn sydney_both_transitions() {
    let s = cron_in("30 2 * * *", "Australia/Sydney");
    assert_eq!(
        local_fires(&s, "2026-04-03T00:00:00Z", "2026-04-06T00:00:00Z"),
        ["04-04 02:30:00+11:00", "04-05 02:30:00+11:00", "04-06 02:30:00+10:00"]
    );
    assert_eq!(
        local_fires(&s, "2026-10-02T00:00:00Z", "2026-10-05T00:00:00Z"),
        ["10-03 02:30:00+10:00", "10-04 03:00:00+11:00", "10-05 02:30:00+11:00"]
    );
    let s = cron_in("*/20 2 * * *", "Australia/Sydney");
    assert_eq!(
        local_fires(&s, "2026-04-04T12:00:00Z", "2026-04-05T12:00:00Z"),
        ["04-05 02:00:00+11:00", "04-05 02:20:00+11:00", "04-05 02:40:00+11:00"]
    );
    assert_eq!(local_fires(&s, "2026-10-03T12:00:00Z", "2026-10-04T12:00:00Z"), ["10-04 03:00:00+11:00"]);
}

/// Kolkata: +05:30 all year, no DST — the days others shift change nothing.
#[test]
fn kolkata_has_no_transitions_and_a_half_hour_offset() {
    let s = cron_in("30 2 * * *", "Asia/Kolkata");
    for day in ["2026-03-08", "2026-03-29", "2026-04-05", "2026-10-04", "2026-10-25", "2026-11-01"] {
        let after = format!("{day}T00:00:00Z");
        let want = utc(&format!("{day}T21:00:00Z")); // 02:30 +05:30 the next day
        assert_eq!(s.next_after(utc(&after)), Some(want), "{day}");
    }
    let s = cron_in("0 */6 * * *", "Asia/Kolkata");
    assert_eq!(
        utc_fires(&s, "2026-06-01T00:00:00Z", "2026-06-02T00:00:00Z"),
        ["2026-06-01T00:30:00Z", "2026-06-01T06:30:00Z", "2026-06-01T12:30:00Z", "2026-06-01T18:30:00Z"]
    );
}

/// Lord Howe 2026: a 30-minute shift. Fall-back 04-05 02:00 (+11) → 01:30 (+10:30);
/// spring-forward 10-04 02:00 (+10:30) → 02:30 (+11).
#[test]
fn lord_howe_half_hour_shifts() {
    let s = cron_in("*/15 1-2 * * *", "Australia/Lord_Howe");
    assert_eq!(
        local_fires(&s, "2026-04-04T12:00:00Z", "2026-04-05T12:00:00Z"),
        [
            "04-05 01:00:00+11:00",
            "04-05 01:15:00+11:00",
            "04-05 01:30:00+11:00",
            "04-05 01:45:00+11:00",
            // 01:30 and 01:45 at +10:30 repeat: skipped.
            "04-05 02:00:00+10:30",
            "04-05 02:15:00+10:30",
            "04-05 02:30:00+10:30",
            "04-05 02:45:00+10:30",
        ]
    );
    assert_eq!(
        local_fires(&s, "2026-10-03T12:00:00Z", "2026-10-04T12:00:00Z"),
        [
            "10-04 01:00:00+10:30",
            "10-04 01:15:00+10:30",
            "10-04 01:30:00+10:30",
            "10-04 01:45:00+10:30",
            // 02:00 and 02:15 do not exist: they fire once, at 02:30.
            "10-04 02:30:00+11:00",
            "10-04 02:45:00+11:00",
        ]
    );
}

/// Santiago 2026: transitions at midnight. Fall-back 04-05 00:00 (−03) → 04-04 23:00
/// (−04); spring-forward 09-06 00:00 (−04) → 01:00 (−03): midnight does not exist.
#[test]
fn santiago_midnight_transitions() {
    let s = cron_in("@daily", "America/Santiago");
    assert_eq!(
        local_fires(&s, "2026-09-04T12:00:00Z", "2026-09-07T12:00:00Z"),
        ["09-05 00:00:00-04:00", "09-06 01:00:00-03:00", "09-07 00:00:00-03:00"]
    );
    assert_eq!(
        local_fires(&s, "2026-04-03T12:00:00Z", "2026-04-06T12:00:00Z"),
        ["04-04 00:00:00-03:00", "04-05 00:00:00-04:00", "04-06 00:00:00-04:00"]
    );
    let s = cron_in("30 23 * * *", "America/Santiago");
    assert_eq!(
        local_fires(&s, "2026-04-03T12:00:00Z", "2026-04-06T12:00:00Z"),
        ["04-03 23:30:00-03:00", "04-04 23:30:00-03:00", "04-05 23:30:00-04:00"]
    );
}

#[test]
fn utc_has_no_transitions() {
    let s = cron("30 2 * * *");
    assert_eq!(
        utc_fires(&s, "2026-03-07T12:00:00Z", "2026-03-10T12:00:00Z"),
        ["2026-03-08T02:30:00Z", "2026-03-09T02:30:00Z", "2026-03-10T02:30:00Z"]
    );
}

// ---------------------------------------------------------------- DST, every zone, 2026 and 2027

const ZONES: &[&str] = &[
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Sydney",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
];

/// The instants in a year where the zone's UTC offset changes, with the offset
/// before and after (seconds). Scans by the minute, so it is independent of the
/// code under test.
fn transitions(tz: Tz, year: i32) -> Vec<(DateTime<Utc>, i32, i32)> {
    let offset = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
    let mut out = Vec::new();
    let mut t = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
    let end = Utc.with_ymd_and_hms(year + 1, 1, 1, 0, 0, 0).unwrap();
    let mut prev = offset(t);
    while t < end {
        // Hour steps, then the minute within the hour where it changed.
        let next = t + TimeDelta::hours(1);
        if offset(next) != prev {
            let mut m = t;
            while offset(m) == prev {
                m += TimeDelta::minutes(1);
            }
            out.push((m, prev, offset(m)));
            prev = offset(m);
        }
        t = next;
    }
    out
}

/// The oracle: the nominal times of a five-field `cron` in `tz` within `(after,
/// until]`, found by walking *instants* minute by minute. An instant fires when its
/// wall time matches and occurs there for the first time, or when it ends a gap that
/// holds a matching wall time.
fn oracle(expr: &CronExpr, tz: Tz, after: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let offset = |t: DateTime<Utc>| {
        TimeDelta::seconds(tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc().into())
    };
    let wall = |t: DateTime<Utc>| t.naive_utc() + offset(t);
    let mut out = Vec::new();
    let mut t = after.trunc_subsecs(0) - TimeDelta::seconds(after.timestamp().rem_euclid(60));
    while t <= until {
        if t > after {
            let w = wall(t);
            let before = offset(t - TimeDelta::minutes(1));
            let now = offset(t);
            // Fall-back within the last three hours: did this wall time occur earlier?
            let earlier =
                offset(t - TimeDelta::hours(3)) > now && (1..=180).any(|m| wall(t - TimeDelta::minutes(m)) == w);
            let first_time = expr.matches(w) && !earlier;
            // Spring-forward at t: the skipped wall times are [w − jump, w).
            let ends_gap = now > before && {
                let jump = (now - before).num_minutes();
                (1..=jump).any(|m| expr.matches(w - TimeDelta::minutes(m)))
            };
            if first_time || ends_gap {
                out.push(t);
            }
        }
        t += TimeDelta::minutes(1);
    }
    out
}

#[test]
fn every_zone_matches_the_oracle_around_every_transition_in_2026_and_2027() {
    let exprs =
        ["*/15 * * * *", "0 * * * *", "30 * * * *", "*/7 0-4 * * *", "0,30 2 * * *", "0 0 * * *", "45 23 * * *"];
    let mut checked = 0;
    for zone in ZONES {
        let tz = parse_zone(zone).unwrap();
        let ts: Vec<_> = [2026, 2027].into_iter().flat_map(|y| transitions(tz, y)).collect();
        let no_dst = matches!(*zone, "UTC" | "Asia/Kolkata");
        assert_eq!(ts.is_empty(), no_dst, "{zone}: {ts:?}");
        // Zones without DST: check the days the others shift anyway.
        let centres: Vec<DateTime<Utc>> = if no_dst {
            vec![utc("2026-03-08T07:00:00Z"), utc("2027-10-31T01:00:00Z")]
        } else {
            assert_eq!(ts.len(), 4, "{zone}: two transitions a year");
            ts.iter().map(|t| t.0).collect()
        };
        for centre in centres {
            let (after, until) = (centre - TimeDelta::hours(26), centre + TimeDelta::hours(26));
            for e in exprs {
                let spec = cron_in(e, zone);
                let Timing::Cron(expr) = spec.timing() else { unreachable!() };
                let got: Vec<_> = spec.nominal_times(after, until, 10_000).collect();
                assert_eq!(got, oracle(expr, tz, after, until), "{zone} {e} around {centre}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 5 * 4 * 7 + 2 * 2 * 7);
}

#[test]
fn transitions_found_are_the_expected_ones() {
    let show = |zone: &str, year| {
        transitions(parse_zone(zone).unwrap(), year)
            .into_iter()
            .map(|(t, a, b)| format!("{} {:+}→{:+}", t.format("%m-%dT%H:%MZ"), a / 60, b / 60))
            .collect::<Vec<_>>()
    };
    assert_eq!(show("America/New_York", 2026), ["03-08T07:00Z -300→-240", "11-01T06:00Z -240→-300"]);
    assert_eq!(show("Europe/Berlin", 2027), ["03-28T01:00Z +60→+120", "10-31T01:00Z +120→+60"]);
    assert_eq!(show("Australia/Sydney", 2027), ["04-03T16:00Z +660→+600", "10-02T16:00Z +600→+660"]);
    assert_eq!(show("Australia/Lord_Howe", 2026), ["04-04T15:00Z +660→+630", "10-03T15:30Z +630→+660"]);
    assert_eq!(show("America/Santiago", 2027), ["04-04T03:00Z -180→-240", "09-05T04:00Z -240→-180"]);
    assert!(show("Asia/Kolkata", 2027).is_empty());
}

/// The rule, stated per transition for 2027: a wall time in the gap fires once at
/// the transition; a wall time in the repeated span fires once at its first occurrence.
#[test]
fn dst_rule_holds_at_every_2027_transition() {
    for zone in ZONES {
        let tz = parse_zone(zone).unwrap();
        for (at, before, after) in transitions(tz, 2027) {
            let jump = TimeDelta::seconds((after - before).into());
            let wall_before = (at - TimeDelta::seconds(1)).naive_utc() + TimeDelta::seconds(before.into());
            let wall_after = at.naive_utc() + TimeDelta::seconds(after.into());
            // A daily fire at a wall time in the middle of the skipped or repeated span.
            let mid: NaiveDateTime = if jump > TimeDelta::zero() {
                wall_before + TimeDelta::seconds(1) + jump / 2
            } else {
                wall_after + (-jump) / 2
            };
            let expr = format!("{} {} * * *", chrono::Timelike::minute(&mid), chrono::Timelike::hour(&mid));
            let spec = cron_in(&expr, zone);
            let fires: Vec<_> = spec.nominal_times(at - TimeDelta::hours(6), at + TimeDelta::hours(6), 10).collect();
            if jump > TimeDelta::zero() {
                assert_eq!(fires, [at], "{zone} {expr}: spring-forward fires at the transition");
            } else {
                let first = at + jump / 2; // before the transition, at the old offset
                assert_eq!(fires, [first], "{zone} {expr}: fall-back fires at the first occurrence");
            }
        }
    }
}

// ---------------------------------------------------------------- jitter

#[test]
fn jitter_is_deterministic_and_bounded() {
    let max = Duration::from_secs(30);
    let s = Spec::cron("*/5 * * * *").jitter(max).build().unwrap();
    let twin = Spec::cron("*/5 * * * *").jitter(max).build().unwrap();
    let mut distinct = std::collections::BTreeSet::new();
    for t in s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T00:00:00Z"), 1000) {
        let at = s.fire_at(b"acct-7/report", t);
        assert_eq!(at, twin.fire_at(b"acct-7/report", t), "every node computes the same instant");
        assert!(at >= t && at < t + TimeDelta::seconds(30), "{t} → {at}");
        assert_eq!((at - t).num_microseconds().unwrap() % 1000, 0, "millisecond resolution");
        distinct.insert(at - t);
    }
    assert!(distinct.len() > 250, "offsets vary from fire to fire: {}", distinct.len());
}

#[test]
fn jitter_never_moves_the_nominal_time() {
    let s = Spec::cron("0 * * * *").jitter(Duration::from_secs(600)).build().unwrap();
    let t = utc("2026-01-01T05:00:00Z");
    assert!(s.is_nominal(t));
    assert!(s.fire_at(b"x", t) > t, "a fire this late would need a 1 in 600,000 hash");
    assert_eq!(s.next_after(t), Some(utc("2026-01-01T06:00:00Z")));
}

#[test]
fn jitter_stays_below_the_gap_to_the_next_nominal_time() {
    // Jitter up to an hour on a schedule firing every 10 s: each fire still happens
    // before the next nominal time, so fires stay in nominal order.
    let s = Spec::cron("*/10 * * * * *").jitter(Duration::from_secs(3600)).build().unwrap();
    let times: Vec<_> = s.nominal_times(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T01:00:00Z"), 1000).collect();
    for w in times.windows(2) {
        let at = s.fire_at(b"k", w[0]);
        assert!(at >= w[0] && at < w[1], "{} fires at {at}", w[0]);
    }
    // The last nominal time before `end` has no next one: the full jitter applies.
    let end = utc("2026-01-01T00:00:00Z");
    let s = Spec::cron("*/10 * * * * *").end(end).jitter(Duration::from_secs(3600)).build().unwrap();
    let offsets: Vec<_> = (0..50).map(|i| s.jitter_offset(format!("k{i}").as_bytes(), end)).collect();
    assert!(offsets.iter().all(|o| *o < Duration::from_secs(3600)));
    assert!(offsets.iter().any(|o| *o > Duration::from_secs(10)));
}

#[test]
fn no_jitter_fires_on_the_nominal_time() {
    let s = cron("0 * * * *");
    let t = utc("2026-01-01T05:00:00Z");
    assert_eq!(s.fire_at(b"any", t), t);
    assert_eq!(s.jitter_offset(b"any", t), Duration::ZERO);
}

#[test]
fn different_schedules_spread_the_same_nominal_time() {
    let s = Spec::cron("0 0 * * *").jitter(Duration::from_secs(60)).build().unwrap();
    let t = utc("2026-01-01T00:00:00Z");
    let offsets: std::collections::BTreeSet<_> =
        (0..100).map(|i| s.jitter_offset(format!("acct-{i}/nightly").as_bytes(), t)).collect();
    assert!(offsets.len() > 90, "{}", offsets.len());
}

// ---------------------------------------------------------------- properties

fn field_strategy(lo: u32, hi: u32) -> impl Strategy<Value = String> {
    let value = lo..=hi;
    prop_oneof![
        3 => Just("*".to_string()),
        2 => (1..=(hi - lo).max(1)).prop_map(|s| format!("*/{s}")),
        2 => value.clone().prop_map(|v| v.to_string()),
        2 => (value.clone(), value.clone(), 1..=4u32).prop_map(|(a, b, s)| {
            let (a, b) = (a.min(b), a.max(b));
            format!("{a}-{b}/{s}")
        }),
        1 => proptest::collection::vec(value, 1..4).prop_map(|vs| {
            vs.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        }),
    ]
}

/// Five-field expressions, dense enough in the day fields to fire within two days.
fn five_field_strategy() -> impl Strategy<Value = String> {
    let day = prop_oneof![4 => Just("*".to_string()), 1 => field_strategy(1, 31)];
    let dow = prop_oneof![4 => Just("*".to_string()), 1 => field_strategy(0, 7)];
    (field_strategy(0, 59), field_strategy(0, 23), day, dow)
        .prop_map(|(m, h, dom, dow)| format!("{m} {h} {dom} * {dow}"))
}

fn zone_strategy() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(ZONES)
}

/// An instant near one of the 2026/2027 transitions (or anywhere in those years).
fn instant_strategy() -> impl Strategy<Value = DateTime<Utc>> {
    const NEAR: &[&str] = &[
        "2026-03-08T07:00:00Z",
        "2026-11-01T06:00:00Z",
        "2026-03-29T01:00:00Z",
        "2026-10-25T01:00:00Z",
        "2026-04-04T16:00:00Z",
        "2026-10-03T16:00:00Z",
        "2026-04-04T15:00:00Z",
        "2026-10-03T15:30:00Z",
        "2026-04-05T03:00:00Z",
        "2026-09-06T04:00:00Z",
        "2027-03-14T07:00:00Z",
        "2027-11-07T06:00:00Z",
    ];
    prop_oneof![
        3 => (proptest::sample::select(NEAR), -30 * 3600..30 * 3600i64)
            .prop_map(|(c, d)| utc(c) + TimeDelta::seconds(d)),
        1 => (1_767_225_600..1_830_297_600i64).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Against the oracle: every nominal time matches, none is missed, none repeats.
    #[test]
    fn cron_nominal_times_equal_the_oracle(expr in five_field_strategy(), zone in zone_strategy(),
                                           after in instant_strategy()) {
        let spec = cron_in(&expr, zone);
        let Timing::Cron(cron) = spec.timing() else { unreachable!() };
        let until = after + TimeDelta::hours(36);
        let got: Vec<_> = spec.nominal_times(after, until, 100_000).collect();
        prop_assert_eq!(got, oracle(cron, spec.zone(), after, until), "{} in {}", expr, zone);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any spec (seconds cron, interval, with bounds): nominal times strictly
    /// increase, each is a nominal time within the bounds, and next_after(x) is the
    /// first one after x.
    #[test]
    fn nominal_times_are_increasing_and_agree_with_next_after(
        sec in field_strategy(0, 59),
        five in five_field_strategy(),
        every in 1..100_000u64,
        use_interval in any::<bool>(),
        zone in zone_strategy(),
        after in instant_strategy(),
        bounds in proptest::option::of((0..86_400i64, 0..10 * 86_400i64)),
        probes in proptest::collection::vec(0..1_000_000i64, 8),
    ) {
        let mut b = if use_interval {
            Spec::every(Duration::from_secs(every), after - TimeDelta::seconds(every as i64 / 3))
        } else {
            Spec::cron(format!("{sec} {five}"))
        };
        b = b.zone(zone);
        if let Some((s, len)) = bounds {
            b = b.start(after + TimeDelta::seconds(s)).end(after + TimeDelta::seconds(s + len));
        }
        let Ok(spec) = b.build() else {
            // Only a window without a fire may be rejected.
            prop_assert!(bounds.is_some());
            return Ok(());
        };
        let until = after + TimeDelta::days(3);
        let got: Vec<_> = spec.nominal_times(after, until, 300).collect();
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        for &t in &got {
            prop_assert!(t > after && t <= until);
            prop_assert_eq!(t.timestamp_subsec_nanos(), 0);
            prop_assert!(spec.is_nominal(t));
            prop_assert!(spec.start().is_none_or(|s| t >= s) && spec.end().is_none_or(|e| t <= e));
            match spec.timing() {
                Timing::Cron(c) => {
                    let wall = t.with_timezone(&spec.zone()).naive_local();
                    let offset = |x: DateTime<Utc>| spec.zone().offset_from_utc_datetime(&x.naive_utc()).fix();
                    // Either the wall time matches, or t ends a gap (the offset changes at t).
                    let ends_gap = offset(t - TimeDelta::seconds(1)) != offset(t);
                    prop_assert!(c.matches(wall) || ends_gap, "{} does not match at {}", c, wall);
                }
                Timing::Interval { every, anchor } => {
                    prop_assert_eq!((t - *anchor).num_seconds().rem_euclid(every.as_secs() as i64), 0);
                }
            }
        }
        // next_after(x) is the first element > x, for probes inside the listed span.
        if let (Some(&first), Some(&last)) = (got.first(), got.last()) {
            prop_assert_eq!(spec.next_after(after), Some(first));
            let span = (last - after).num_milliseconds().max(1);
            for p in probes {
                let x = after + TimeDelta::milliseconds(p % span);
                let want = got.iter().copied().find(|&t| t > x);
                if x < last {
                    prop_assert_eq!(spec.next_after(x), want, "probe {}", x);
                }
            }
        } else if got.len() < 300 {
            prop_assert!(spec.next_after(after).is_none_or(|t| t > until));
        }
    }
}
