//! Saturating conversions from protobuf timestamps and float seconds
//! (protobuf durations use [`from_proto_duration`](crate::task::from_proto_duration)).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts an optional protobuf timestamp; absent stays `None`.
pub(crate) fn system_time(timestamp: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    timestamp.map(from_timestamp)
}

/// Converts a protobuf timestamp, saturating at the earliest or latest time
/// the platform can represent. Nanoseconds outside `0..1e9` (which a valid
/// timestamp never has) are clamped into that range.
pub(crate) fn from_timestamp(timestamp: prost_types::Timestamp) -> SystemTime {
    let nanos = timestamp.nanos.clamp(0, 999_999_999).unsigned_abs();
    if timestamp.seconds >= 0 {
        let offset = Duration::new(timestamp.seconds.unsigned_abs(), nanos);
        saturating(offset, |d| UNIX_EPOCH.checked_add(d))
    } else {
        // seconds <= -1 and nanos < 1 s, so the offset is positive.
        let offset =
            Duration::from_secs(timestamp.seconds.unsigned_abs()).saturating_sub(Duration::from_nanos(nanos.into()));
        saturating(offset, |d| UNIX_EPOCH.checked_sub(d))
    }
}

/// `shift(offset)`, or when that is out of range the furthest whole second
/// in the same direction that is not.
fn saturating(offset: Duration, shift: impl Fn(Duration) -> Option<SystemTime>) -> SystemTime {
    if let Some(time) = shift(offset) {
        return time;
    }
    let (mut low, mut high) = (0u64, offset.as_secs());
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if shift(Duration::from_secs(middle)).is_some() {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    shift(Duration::from_secs(low)).unwrap_or(UNIX_EPOCH)
}

/// Converts seconds as a float; negative and NaN read as zero, too large
/// saturates.
pub(crate) fn from_seconds(seconds: f64) -> Duration {
    if seconds.is_nan() || seconds <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> SystemTime {
        from_timestamp(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn timestamps_convert_both_sides_of_the_epoch() {
        assert_eq!(at(0, 0), UNIX_EPOCH);
        assert_eq!(at(1_700_000_000, 5), UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        assert_eq!(at(-2, 500_000_000), UNIX_EPOCH - Duration::from_millis(1_500));
        assert_eq!(system_time(None), None);
    }

    #[test]
    fn out_of_range_timestamps_saturate_instead_of_panicking() {
        let latest = at(i64::MAX, 999_999_999);
        let earliest = at(i64::MIN, 0);
        assert!(latest > at(253_402_300_799, 0));
        assert!(earliest < at(-62_135_596_800, 0));
        assert_eq!(at(5, -7), at(5, 0), "invalid nanos are clamped");
    }

    #[test]
    fn float_seconds_clamp_negative_values_to_zero() {
        assert_eq!(from_seconds(1.5), Duration::from_millis(1_500));
        assert_eq!(from_seconds(-1.0), Duration::ZERO);
        assert_eq!(from_seconds(f64::NAN), Duration::ZERO);
        assert_eq!(from_seconds(f64::INFINITY), Duration::MAX);
    }
}
