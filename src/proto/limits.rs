//! How much one peer may make this one spend: a token bucket per author (the peer that
//! signed the messages, whoever relays them) for messages and bytes per second. An author
//! over its rate has its messages ignored (not handled, not
//! forwarded; the events come again by repair once it slows down); one that goes over it
//! again and again, with no second's break, for [`BAN_AFTER`] is disconnected and banned for
//! [`BAN_FOR`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Gossip messages per second one author may send, sustained; a second's worth may come at
/// once. A busy publisher packs many events into each message, so an honest one sends far
/// fewer even at full speed.
pub const DEFAULT_MESSAGES_PER_SEC: u32 = 5_000;

/// Bytes per second one author may send in gossip messages, sustained: about what a gigabit
/// link carries.
pub const DEFAULT_BYTES_PER_SEC: u64 = 96 * 1024 * 1024;

/// A neighbour throttled at least once a second for this long is banned.
pub const BAN_AFTER: Duration = Duration::from_secs(5);

/// How long a ban lasts.
pub const BAN_FOR: Duration = Duration::from_secs(300);

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate.
    Admit,
    /// Over it: ignore the message.
    Throttle,
    /// Over it for too long: disconnect and ban the neighbour.
    Ban,
}

#[derive(Debug)]
struct Bucket {
    messages: f64,
    bytes: f64,
    at: Instant,
    /// When the current run of throttling began, and when it last throttled.
    streak: Option<(Instant, Instant)>,
}

/// The buckets of the authors this peer hears from.
#[derive(Debug)]
pub struct RateLimits {
    peers: HashMap<PeerId, Bucket>,
    messages_per_sec: f64,
    bytes_per_sec: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(DEFAULT_MESSAGES_PER_SEC, DEFAULT_BYTES_PER_SEC)
    }
}

impl RateLimits {
    /// Each author may send `messages_per_sec` messages and `bytes_per_sec` bytes a second.
    pub fn new(messages_per_sec: u32, bytes_per_sec: u64) -> RateLimits {
        RateLimits {
            peers: HashMap::new(),
            messages_per_sec: f64::from(messages_per_sec.max(1)),
            bytes_per_sec: bytes_per_sec.max(1) as f64,
        }
    }

    /// The message rate allowed, for messages.
    pub fn messages_per_sec(&self) -> f64 {
        self.messages_per_sec
    }

    /// Accounts for a message of `bytes` from `peer` at `now`.
    pub fn admit(&mut self, peer: PeerId, bytes: usize, now: Instant) -> Verdict {
        let bucket = self.peers.entry(peer).or_insert(Bucket {
            messages: self.messages_per_sec,
            bytes: self.bytes_per_sec,
            at: now,
            streak: None,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.at = now;
        bucket.messages =
            (bucket.messages + elapsed * self.messages_per_sec).min(self.messages_per_sec);
        bucket.bytes = (bucket.bytes + elapsed * self.bytes_per_sec).min(self.bytes_per_sec);
        let bytes = bytes as f64;
        if bucket.messages >= 1.0 && bucket.bytes >= bytes {
            bucket.messages -= 1.0;
            bucket.bytes -= bytes;
            return Verdict::Admit;
        }
        let began = match bucket.streak {
            Some((began, last))
                if now.saturating_duration_since(last) <= Duration::from_secs(1) =>
            {
                began
            }
            _ => now,
        };
        bucket.streak = Some((began, now));
        if now.saturating_duration_since(began) >= BAN_AFTER {
            bucket.streak = None;
            Verdict::Ban
        } else {
            Verdict::Throttle
        }
    }

    /// Forgets a neighbour that disconnected.
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_throttled_then_banned_and_a_pause_refills() {
        let (peer, start) = (PeerId::random(), Instant::now());
        let mut limits = RateLimits::default();
        let burst = DEFAULT_MESSAGES_PER_SEC as usize;
        for _ in 0..burst {
            assert_eq!(limits.admit(peer, 100, start), Verdict::Admit);
        }
        assert_eq!(limits.admit(peer, 100, start), Verdict::Throttle);
        // A pause of a tenth of a second refills a tenth of the bucket.
        let later = start + Duration::from_millis(100);
        for _ in 0..burst / 10 {
            assert_eq!(limits.admit(peer, 100, later), Verdict::Admit);
        }
        // Twice the rate, steadily: throttled, and banned after BAN_AFTER.
        let first = later + Duration::from_millis(10);
        let mut t = first;
        let banned_at = loop {
            let verdicts: Vec<Verdict> = (0..2 * burst / 100)
                .map(|_| limits.admit(peer, 100, t))
                .collect();
            assert!(
                verdicts.contains(&Verdict::Admit),
                "the refill still gets through"
            );
            if verdicts.contains(&Verdict::Ban) {
                break t;
            }
            assert!(t < later + 2 * BAN_AFTER, "never banned");
            t += Duration::from_millis(10);
        };
        let took = banned_at - start; // the run began with the first throttle, at start
        assert!(
            took >= BAN_AFTER && took < BAN_AFTER + Duration::from_millis(50),
            "{took:?}"
        );
        // One that went over once, then paused for more than a second, starts afresh.
        let other = PeerId::random();
        for _ in 0..=burst {
            limits.admit(other, 100, start);
        }
        let after_pause = start + BAN_AFTER + Duration::from_secs(2);
        for _ in 0..=burst {
            assert_ne!(limits.admit(other, 100, after_pause), Verdict::Ban);
        }
    }

    #[test]
    fn bytes_are_limited_too() {
        let (peer, now) = (PeerId::random(), Instant::now());
        let mut limits = RateLimits::default();
        let big = DEFAULT_BYTES_PER_SEC as usize / 2;
        assert_eq!(limits.admit(peer, big, now), Verdict::Admit);
        assert_eq!(limits.admit(peer, big, now), Verdict::Admit);
        assert_eq!(limits.admit(peer, big, now), Verdict::Throttle);
        limits.forget(&peer);
        assert_eq!(limits.admit(peer, big, now), Verdict::Admit);
    }
}
