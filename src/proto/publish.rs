//! Publishing: stamping events with this peer's sequence numbers and packing them into
//! gossipsub messages.
//!
//! Sequence numbers are contiguous from 1 within a log epoch and go on across restarts: a
//! message is stored in this peer's log before it is sent, and when it cannot be stored its
//! numbers are given back, so receivers never see a gap that is not a loss.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::PeerId;

use crate::config::{GOSSIP_ENVELOPE_OVERHEAD, MAX_MESSAGE_SIZE};
use crate::event::{self, Event, EventId, Payload};
use crate::topic::Topic;

/// Bytes of events gathered into one message when publishers are quicker than the network.
/// One message per event would cost a signature and its check per event; batching only takes
/// what is already queued, so it adds no delay.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Bound on the per-event overhead in a batch beyond [`event::event_size`] (id, seq, time,
/// field tags and lengths).
pub const EVENT_WIRE_OVERHEAD: usize = 64;

/// The most event bytes one message may carry: gossipsub's limit less its envelope.
const MESSAGE_PAYLOAD: usize = MAX_MESSAGE_SIZE - GOSSIP_ENVELOPE_OVERHEAD;

/// An event a publisher handed in, checked but not yet stamped.
#[derive(Debug, Clone)]
pub struct Unstamped {
    /// Where it goes.
    pub topic: Topic,
    /// Its type (the topic unless given).
    pub event_type: String,
    /// Its content.
    pub payload: Payload,
}

impl Unstamped {
    /// Bytes it will take in a batch, as an upper bound.
    pub fn wire_size(&self) -> usize {
        event::event_size(
            self.topic.as_str(),
            &self.event_type,
            &self.payload.content_type,
            &self.payload.data,
        ) + EVENT_WIRE_OVERHEAD
    }
}

/// This peer's side of publishing: the sequence and the packing rule.
#[derive(Debug)]
pub struct Publisher {
    /// Stamped on every event as its `source`.
    me: PeerId,
    /// This peer's log epoch, stamped on every event.
    epoch: u64,
    /// Sequence number of the last event stamped and not given back.
    seq: u64,
    /// Keeps the ids this peer stamps in order within a millisecond, as they are in time.
    ids: uuid::ContextV7,
}

impl Publisher {
    /// A publisher whose next event will be number `last + 1` of `epoch` (its log says
    /// where it stopped).
    pub fn new(me: PeerId, epoch: u64, last: u64) -> Self {
        Self {
            me,
            epoch,
            seq: last,
            ids: uuid::ContextV7::new(),
        }
    }

    /// Sequence number of the last event published.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether a batch of `bytes` gathered so far is big enough to send without taking more.
    pub fn batch_full(bytes: usize) -> bool {
        bytes >= BATCH_BYTES
    }

    /// Takes the events of the next message from the front of `queue` and stamps them (id,
    /// seq, time `now`). A message holds at least one event, and more while the batch is
    /// under [`BATCH_BYTES`] and the whole still fits in a gossipsub message. Empty only if
    /// the queue is.
    pub fn next_message(
        &mut self,
        queue: &mut VecDeque<Unstamped>,
        now: SystemTime,
    ) -> Vec<Arc<Event>> {
        let mut message = Vec::new();
        let mut bytes = 0;
        while let Some(size) = queue.front().map(Unstamped::wire_size) {
            let fits = bytes < BATCH_BYTES && bytes + size <= MESSAGE_PAYLOAD;
            if !message.is_empty() && !fits {
                break;
            }
            let Some(item) = queue.pop_front() else { break };
            bytes += size;
            self.seq += 1;
            message.push(Arc::new(Event {
                id: self.id_at(now),
                topic: item.topic,
                event_type: item.event_type,
                source: self.me,
                seq: self.seq,
                epoch: self.epoch,
                time: now,
                content_type: item.payload.content_type,
                data: item.payload.data,
            }));
        }
        message
    }

    /// A fresh id for an event published at `now`: a UUIDv7, its first 48 bits that time in
    /// milliseconds, then a counter, so a peer's ids sort as it stamped them.
    fn id_at(&self, now: SystemTime) -> EventId {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(&self.ids, since.as_secs(), since.subsec_nanos());
        EventId(uuid::Uuid::new_v7(ts))
    }

    /// The message holding `events` (the last one stamped) could not be stored: their
    /// sequence numbers are given back and will be stamped again on the next events.
    pub fn unsent(&mut self, events: &[Arc<Event>]) {
        debug_assert!(events.last().is_none_or(|e| e.seq == self.seq));
        self.seq -= events.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(data_len: usize) -> Unstamped {
        Unstamped {
            topic: Topic::user("orders.created").unwrap(),
            event_type: "orders.created".into(),
            payload: Payload::bytes(event::TEXT, vec![b'x'; data_len]),
        }
    }

    fn queue(sizes: &[usize]) -> VecDeque<Unstamped> {
        sizes.iter().map(|n| item(*n)).collect()
    }

    #[test]
    fn sequence_numbers_start_at_one_and_run_on_across_messages() {
        let mut p = Publisher::new(PeerId::random(), 1, 0);
        let now = SystemTime::now();
        let mut q = queue(&[10, 10, 10]);
        let first = p.next_message(&mut q, now);
        let seqs: Vec<u64> = first.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        let mut q = queue(&[10]);
        assert_eq!(p.next_message(&mut q, now)[0].seq, 4);
        assert_eq!(p.seq(), 4);
    }

    #[test]
    fn events_are_stamped_with_this_peer_the_given_time_and_distinct_ids() {
        let me = PeerId::random();
        let mut p = Publisher::new(me, 1, 0);
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let m = p.next_message(&mut queue(&[1, 1]), now);
        assert!(m.iter().all(|e| e.source == me && e.time == now));
        let later = p.next_message(&mut queue(&[1]), now);
        assert!(
            m[0].id < m[1].id && m[1].id < later[0].id,
            "ids are distinct and sort as stamped, even within one millisecond"
        );
        assert_eq!(m[0].topic.as_str(), "orders.created");
    }

    #[test]
    fn a_message_takes_events_until_the_batch_is_full() {
        let mut p = Publisher::new(PeerId::random(), 1, 0);
        // Each event is 100 KiB: the batch passes BATCH_BYTES with the third.
        let mut q = queue(&[100 * 1024; 5]);
        let m = p.next_message(&mut q, SystemTime::now());
        assert_eq!(m.len(), 3);
        assert_eq!(q.len(), 2);
        let m = p.next_message(&mut q, SystemTime::now());
        assert_eq!(m.len(), 2);
        assert!(q.is_empty());
        assert!(p.next_message(&mut q, SystemTime::now()).is_empty());
    }

    #[test]
    fn a_message_never_exceeds_gossipsubs_limit() {
        let mut p = Publisher::new(PeerId::random(), 1, 0);
        // 200 KiB, then 900 KiB: together over the message limit, so two messages.
        let mut q = queue(&[200 * 1024, 900 * 1024]);
        let m = p.next_message(&mut q, SystemTime::now());
        assert_eq!(m.len(), 1);
        let total: usize = m.iter().map(|e| e.data.len()).sum();
        assert!(total <= MESSAGE_PAYLOAD);
        assert_eq!(p.next_message(&mut q, SystemTime::now()).len(), 1);
    }

    #[test]
    fn an_event_alone_always_makes_a_message() {
        let mut p = Publisher::new(PeerId::random(), 1, 0);
        let mut q = queue(&[BATCH_BYTES * 2]);
        assert_eq!(p.next_message(&mut q, SystemTime::now()).len(), 1);
    }

    #[test]
    fn numbers_of_an_unsent_message_are_given_back() {
        let mut p = Publisher::new(PeerId::random(), 1, 0);
        let sent = p.next_message(&mut queue(&[1]), SystemTime::now());
        let failed = p.next_message(&mut queue(&[1, 1]), SystemTime::now());
        p.unsent(&failed);
        assert_eq!(p.seq(), sent[0].seq);
        let again = p.next_message(&mut queue(&[1]), SystemTime::now());
        assert_eq!(again[0].seq, 2, "no gap after a failed send");
    }

    #[test]
    fn numbering_goes_on_from_where_the_log_stopped() {
        let mut p = Publisher::new(PeerId::random(), 42, 1000);
        let m = p.next_message(&mut queue(&[1]), SystemTime::now());
        assert_eq!((m[0].epoch, m[0].seq), (42, 1001));
    }

    #[test]
    fn batch_full_follows_batch_bytes() {
        assert!(!Publisher::batch_full(BATCH_BYTES - 1));
        assert!(Publisher::batch_full(BATCH_BYTES));
    }
}
