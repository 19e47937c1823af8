//! Time zones: parsing IANA names and the DST rule that maps a wall time to the one
//! instant it fires at (see the module documentation of [`crate::schedule`]).

use super::SpecError;
use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// Longest time zone name accepted, in bytes (the longest IANA name has 32).
pub const MAX_ZONE_NAME_LEN: usize = 64;

/// Parses an IANA time zone name (`Europe/Berlin`, `UTC`; exact case; the tz
/// database's backward links such as `US/Eastern` are accepted).
pub fn parse_zone(name: &str) -> Result<Tz, SpecError> {
    if name.len() > MAX_ZONE_NAME_LEN {
        return Err(SpecError::ZoneNameTooLong { len: name.len(), max: MAX_ZONE_NAME_LEN });
    }
    name.parse::<Tz>().map_err(|_| SpecError::UnknownZone { name: name.to_string() })
}

/// The instant a wall time fires at in `tz`, by the DST rule:
///
/// - a wall time that occurs once fires then;
/// - one that occurs twice (fall-back) fires at its first occurrence;
/// - one that does not occur (spring-forward gap) fires at the first instant after
///   the gap — the transition itself, whose wall time is the end of the gap.
///
/// The map is non-decreasing in `wall`, which [`super::Spec::next_after`] relies on.
/// `None` only at the ends of the calendar.
pub(crate) fn fire_instant(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, second) => Some(first.min(second).with_timezone(&Utc)),
        LocalResult::None => gap_end(tz, wall),
    }
}

/// The first instant whose wall time is past `wall`, for a `wall` inside a gap: found
/// by bisection on whole seconds (transitions fall on whole seconds). Any instant
/// with a wall time near `wall` lies within ±(the largest UTC offset) of `wall` read
/// as UTC, so ±27 hours brackets it; within that bracket the wall time only moves
/// forward (no zone has had a gap and a fall-back within a day of each other).
fn gap_end(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    let bracket = TimeDelta::hours(27);
    let wall_at =
        |secs: i64| DateTime::from_timestamp(secs, 0).map(|t| tz.from_utc_datetime(&t.naive_utc()).naive_local());
    let as_utc = wall.and_utc().timestamp();
    // Invariant: wall_at(lo) < wall <= wall_at(hi).
    let (mut lo, mut hi) = (as_utc - bracket.num_seconds(), as_utc + bracket.num_seconds());
    if wall_at(lo)? >= wall || wall_at(hi)? < wall {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if wall_at(mid)? < wall {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn known_zones_parse_and_unknown_ones_are_named_in_the_error() {
        assert_eq!(parse_zone("Europe/Berlin").unwrap(), Tz::Europe__Berlin);
        assert_eq!(parse_zone("UTC").unwrap(), Tz::UTC);
        assert!(parse_zone("US/Eastern").is_ok());
        assert_eq!(parse_zone("Europe/Pariss").unwrap_err().to_string(), "unknown time zone \"Europe/Pariss\"");
        assert!(parse_zone("").is_err());
        assert!(parse_zone("europe/berlin").is_err(), "names are case-sensitive, as in the tz database");
        let long = "A".repeat(65);
        assert_eq!(parse_zone(&long).unwrap_err().to_string(), "time zone name is 65 bytes long; the limit is 64");
    }

    #[test]
    fn ordinary_wall_times_map_one_to_one() {
        assert_eq!(fire_instant(Tz::America__New_York, wall("2026-07-01 12:00:00")), Some(utc("2026-07-01T16:00:00Z")));
        assert_eq!(fire_instant(Tz::Asia__Kolkata, wall("2026-07-01 05:30:00")), Some(utc("2026-07-01T00:00:00Z")));
    }

    #[test]
    fn gap_wall_times_map_to_the_end_of_the_gap() {
        let ny = Tz::America__New_York;
        for w in ["2026-03-08 02:00:00", "2026-03-08 02:30:00", "2026-03-08 02:59:59"] {
            assert_eq!(fire_instant(ny, wall(w)), Some(utc("2026-03-08T07:00:00Z")), "{w}");
        }
        // Lord Howe's gap is 30 minutes: 02:00 → 02:30.
        let lh = Tz::Australia__Lord_Howe;
        assert_eq!(fire_instant(lh, wall("2026-10-04 02:15:00")), Some(utc("2026-10-03T15:30:00Z")));
    }

    #[test]
    fn repeated_wall_times_map_to_their_first_occurrence() {
        let ny = Tz::America__New_York;
        assert_eq!(fire_instant(ny, wall("2026-11-01 01:30:00")), Some(utc("2026-11-01T05:30:00Z")));
        assert_eq!(fire_instant(ny, wall("2026-11-01 02:00:00")), Some(utc("2026-11-01T07:00:00Z")));
    }

    #[test]
    fn a_skipped_day_maps_to_the_day_after() {
        // Samoa skipped 30 December 2011 (−10 → +14).
        let ws = Tz::Pacific__Apia;
        assert_eq!(fire_instant(ws, wall("2011-12-30 12:00:00")), Some(utc("2011-12-30T10:00:00Z")));
    }
}
