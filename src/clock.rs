//! The crate's one clock helper: event times are wall-clock microseconds since the Unix
//! epoch, on the wire and in latency figures.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds from the Unix epoch to `time` (zero before the epoch, saturating far after).
pub fn unix_micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Microseconds from `time` to now, zero if `time` is in the future (clock skew).
pub fn age_micros(time: SystemTime) -> u64 {
    unix_micros(SystemTime::now()).saturating_sub(unix_micros(time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn micros_count_from_the_epoch_and_ages_never_go_negative() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(unix_micros(t), 1_700_000_000_123_456);
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(age_micros(SystemTime::now() + Duration::from_secs(60)), 0);
        assert!(age_micros(SystemTime::now() - Duration::from_secs(1)) >= 1_000_000);
    }
}
