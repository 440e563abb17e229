//! Counters a node keeps about itself, shown by `meshbus status`.
//!
//! Plain atomics, written by the node's tasks and read by anyone; nothing here blocks.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters. Every field only grows.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events this node published.
    pub published: AtomicU64,
    /// Events received from other peers that passed every check.
    pub received: AtomicU64,
    /// Gossipsub messages received from other peers.
    pub messages_received: AtomicU64,
    /// Of those, messages taken but not forwarded: they came straight from a publisher on
    /// this peer's mDNS LAN, where every peer hears it directly.
    pub messages_not_forwarded: AtomicU64,
    /// Messages dropped whole: unknown version or not decodable.
    pub messages_malformed: AtomicU64,
    /// Single events dropped from otherwise good messages (bad id, topic, size).
    pub events_rejected: AtomicU64,
    /// Events that arrived again (same publisher, epoch and seq): not handled twice.
    pub events_duplicate: AtomicU64,
    /// Events too far ahead of a gap to hold; fetched again once it is filled.
    pub events_deferred: AtomicU64,
    /// Events no peer held any more when this one asked (announced as `_mesh.events.lost`).
    pub events_lost: AtomicU64,
    /// Events that came by repair rather than by gossip.
    pub repaired: AtomicU64,
    /// Fetches this peer asked of others.
    pub repair_fetches: AtomicU64,
    /// Repair requests that failed or timed out (asked again elsewhere).
    pub repair_failed: AtomicU64,
    /// Repair requests this peer answered.
    pub repair_served: AtomicU64,
    /// Marks ignored: an unreadable publisher, or a request's own mark from a non-member or
    /// naming another publisher than the asker.
    pub marks_refused: AtomicU64,
    /// Own messages gossip did not take: events (stored, so peers fetch them) and presence
    /// (the next announcement goes at its time).
    pub gossip_failed: AtomicU64,
    /// Incoming connections closed because they held no key of this mesh.
    pub connections_refused: AtomicU64,
    /// Events refused because their publisher may not publish on their topic (ACL).
    pub events_forbidden: AtomicU64,
    /// Messages ignored because their sender went over its rate limit.
    pub messages_throttled: AtomicU64,
    /// Peers disconnected and banned for flooding or for invalid messages.
    pub peers_banned: AtomicU64,
    /// Group announcements refused (malformed, too many groups or marks).
    pub groups_refused: AtomicU64,
    /// Presence announcements refused: out of bounds, faster than their peer's burst allows,
    /// or past the most members heard over the mesh (an undecodable one is a malformed
    /// message).
    pub presence_refused: AtomicU64,
    /// Group members found whose row takes other events than this peer's row in the group.
    pub groups_conflicting: AtomicU64,
    /// Queries this peer asked.
    pub queries: AtomicU64,
    /// Answers this peer's reply rows sent (or gave its own queries).
    pub answers_sent: AtomicU64,
    /// Answers to this peer's queries taken.
    pub answers_received: AtomicU64,
    /// Answers dropped: for an unknown or expired query, from a non-member, a second one
    /// from one peer, past a query's answer limit, or not deliverable to the asker.
    pub answers_dropped: AtomicU64,
    /// Events handed to handler queues.
    pub handler_dispatched: AtomicU64,
    /// Handler runs that succeeded.
    pub handler_succeeded: AtomicU64,
    /// Handler runs that failed (error, non-zero exit, timeout).
    pub handler_failed: AtomicU64,
    /// Events `tail` subscribers missed because they read too slowly.
    pub tail_missed: AtomicU64,
    /// Time from publish (the publisher's clock) to arrival here, for remote events.
    pub receive_latency: Histogram,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter and returns its new value when that is worth a log line: the 1st,
/// 2nd, 4th, 8th, … A flood of drops then logs a few dozen lines, never one per drop, and
/// each line says how many so far.
pub fn bump_throttled(counter: &AtomicU64) -> Option<u64> {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    n.is_power_of_two().then_some(n)
}

/// A snapshot of [`Stats`], as the API and CLI show it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Counters {
    pub published: u64,
    pub received: u64,
    pub messages_received: u64,
    #[serde(default)]
    pub messages_not_forwarded: u64,
    pub messages_malformed: u64,
    pub events_rejected: u64,
    pub events_duplicate: u64,
    pub events_deferred: u64,
    pub events_lost: u64,
    pub repaired: u64,
    pub repair_fetches: u64,
    pub repair_failed: u64,
    pub repair_served: u64,
    #[serde(default)]
    pub marks_refused: u64,
    pub gossip_failed: u64,
    pub connections_refused: u64,
    pub events_forbidden: u64,
    pub messages_throttled: u64,
    pub peers_banned: u64,
    pub groups_refused: u64,
    #[serde(default)]
    pub presence_refused: u64,
    pub groups_conflicting: u64,
    pub queries: u64,
    pub answers_sent: u64,
    pub answers_received: u64,
    pub answers_dropped: u64,
    pub handler_dispatched: u64,
    pub handler_succeeded: u64,
    pub handler_failed: u64,
    pub tail_missed: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> Counters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            published: r(&self.published),
            received: r(&self.received),
            messages_received: r(&self.messages_received),
            messages_not_forwarded: r(&self.messages_not_forwarded),
            messages_malformed: r(&self.messages_malformed),
            events_rejected: r(&self.events_rejected),
            events_duplicate: r(&self.events_duplicate),
            events_deferred: r(&self.events_deferred),
            events_lost: r(&self.events_lost),
            repaired: r(&self.repaired),
            repair_fetches: r(&self.repair_fetches),
            repair_failed: r(&self.repair_failed),
            repair_served: r(&self.repair_served),
            marks_refused: r(&self.marks_refused),
            gossip_failed: r(&self.gossip_failed),
            connections_refused: r(&self.connections_refused),
            events_forbidden: r(&self.events_forbidden),
            messages_throttled: r(&self.messages_throttled),
            peers_banned: r(&self.peers_banned),
            groups_refused: r(&self.groups_refused),
            presence_refused: r(&self.presence_refused),
            groups_conflicting: r(&self.groups_conflicting),
            queries: r(&self.queries),
            answers_sent: r(&self.answers_sent),
            answers_received: r(&self.answers_received),
            answers_dropped: r(&self.answers_dropped),
            handler_dispatched: r(&self.handler_dispatched),
            handler_succeeded: r(&self.handler_succeeded),
            handler_failed: r(&self.handler_failed),
            tail_missed: r(&self.tail_missed),
        }
    }
}

/// Sub-buckets per power of two in [`Histogram`]: 8 gives percentiles within 12.5%.
const SUB_BUCKETS: usize = 8;

/// Powers of two covered: up to 2^40 µs (about 12 days); larger values land in the last.
const POWERS: usize = 40;

/// A latency histogram in microseconds: log-linear buckets of atomics, fixed size, lock-free.
/// Recording is a few instructions, so it can sit on the delivery path.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..POWERS * SUB_BUCKETS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

/// Bucket of a value: values below [`SUB_BUCKETS`] get one each; above, each power of two is
/// split into [`SUB_BUCKETS`] equal parts.
fn bucket_of(v: u64) -> usize {
    if v < SUB_BUCKETS as u64 {
        return v as usize;
    }
    let power = 63 - v.leading_zeros() as usize; // v in [2^power, 2^(power+1))
    let shift = power - SUB_BUCKETS.trailing_zeros() as usize;
    let sub = ((v >> shift) as usize) - SUB_BUCKETS;
    let index = (power - SUB_BUCKETS.trailing_zeros() as usize + 1) * SUB_BUCKETS + sub;
    index.min(POWERS * SUB_BUCKETS - 1)
}

/// Largest value that falls in bucket `i` (what percentiles report: an upper bound).
fn bucket_upper(i: usize) -> u64 {
    if i < SUB_BUCKETS {
        return i as u64;
    }
    let group = i / SUB_BUCKETS - 1;
    let sub = (i % SUB_BUCKETS) as u64;
    let shift = group as u32;
    ((SUB_BUCKETS as u64 + sub + 1) << shift) - 1
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, micros: u64) {
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// Percentiles and the non-empty buckets.
    pub fn summary(&self) -> Latency {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Ordering::Relaxed);
        let percentile = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_upper(i).min(max);
                }
            }
            max
        };
        Latency {
            count: total,
            mean_us: self
                .sum
                .load(Ordering::Relaxed)
                .checked_div(total)
                .unwrap_or(0),
            p50_us: percentile(0.50),
            p90_us: percentile(0.90),
            p99_us: percentile(0.99),
            max_us: max,
            buckets: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (bucket_upper(i), *c))
                .collect(),
        }
    }
}

/// A latency distribution, as `status --json` shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Mean, in microseconds.
    pub mean_us: u64,
    /// Median (upper bound of its bucket, within 12.5%).
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest value.
    pub max_us: u64,
    /// Non-empty buckets as `[upper bound in µs, count]`.
    pub buckets: Vec<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_bound_their_values() {
        let values: Vec<u64> = (0..5000).chain([1 << 20, (1 << 20) + 12345]).collect();
        for pair in values.windows(2) {
            assert!(
                bucket_of(pair[0]) <= bucket_of(pair[1]),
                "buckets grow with values"
            );
        }
        for v in values {
            let upper = bucket_upper(bucket_of(v));
            assert!(upper >= v, "value {v} above its bucket's bound {upper}");
            assert!(
                upper as f64 <= v as f64 * 1.125 + 1.0,
                "bucket of {v} too wide: {upper}"
            );
        }
        assert_eq!(bucket_of(u64::MAX), POWERS * SUB_BUCKETS - 1);
    }

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let h = Histogram::default();
        for v in 1..=1000 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max_us, 1000);
        assert_eq!(s.mean_us, 500);
        assert!((500..=563).contains(&s.p50_us), "p50 {}", s.p50_us);
        assert!((990..=1000).contains(&s.p99_us), "p99 {}", s.p99_us);
        assert_eq!(s.buckets.iter().map(|(_, c)| c).sum::<u64>(), 1000);
        assert_eq!(Histogram::default().summary().p99_us, 0);
    }
}
