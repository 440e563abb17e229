//! Receiving: which events of a message from another peer are delivered.
//!
//! A message must have a signed author (its events' `source`) and decode as a batch of the
//! wire format; then each event in it is delivered or dropped on its own (see
//! [`crate::wire::decode_batch`] and [`crate::event::validate`]), and so is an event timed
//! more than [`MAX_CLOCK_SKEW`] after the receiver's `now`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use libp2p::PeerId;

use crate::wire::{self, Decoded, WireError};

/// Why a whole message was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// No authenticated author: its events could claim any source.
    #[error("message has no signed source")]
    Unsigned,
    /// The payload is not a batch this peer reads.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// How far ahead of a receiver's clock an event's time may be. Peers on a LAN keep their
/// clocks within far less; an event from further ahead is dropped and counted, so a wrong
/// clock (or a forged time) shows in `status` instead of in latency figures and logs.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The events of a message from `source` received at `now`, and why any of them were
/// dropped; or why the whole message was.
pub fn receive(
    source: Option<PeerId>,
    payload: impl Into<Bytes> + AsRef<[u8]>,
    max_event_size: usize,
    now: SystemTime,
) -> Result<Decoded, MessageError> {
    let source = source.ok_or(MessageError::Unsigned)?;
    let mut decoded = wire::decode_batch(payload, source, max_event_size)?;
    let latest = now + MAX_CLOCK_SKEW;
    decoded
        .events
        .retain(|event| match event.time.duration_since(now) {
            Ok(ahead) if event.time > latest => {
                decoded.rejected.push(WireError::AheadOfClock {
                    ahead_ms: u64::try_from(ahead.as_millis()).unwrap_or(u64::MAX),
                });
                false
            }
            _ => true,
        });
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventId, JSON};
    use crate::topic::Topic;

    fn event(topic: &str, source: PeerId) -> Event {
        Event {
            id: EventId::new(),
            topic: Topic::new(topic).unwrap(),
            event_type: topic.into(),
            source,
            seq: 1,
            epoch: 1,
            time: std::time::SystemTime::now(),
            content_type: JSON.into(),
            data: Bytes::from_static(b"1"),
        }
    }

    #[test]
    fn events_take_the_signed_author_as_their_source() {
        let author = PeerId::random();
        let claimed = PeerId::random();
        let payload = wire::encode_batch([&event("a.b", claimed)]);
        let decoded = receive(Some(author), payload, 1024, SystemTime::now()).unwrap();
        assert_eq!(decoded.events[0].source, author);
    }

    #[test]
    fn events_timed_beyond_the_skew_bound_are_dropped_alone() {
        let me = PeerId::random();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |t: SystemTime| Event {
            time: t,
            ..event("a.b", me)
        };
        let payload = wire::encode_batch([
            &at(now - Duration::from_secs(3600)),
            &at(now + MAX_CLOCK_SKEW),
            &at(now + MAX_CLOCK_SKEW + Duration::from_millis(1)),
            &at(now + Duration::from_secs(100 * 365 * 24 * 3600)),
        ]);
        let decoded = receive(Some(me), payload, 1024, now).unwrap();
        assert_eq!(
            decoded.events.len(),
            2,
            "old events and the bound itself are fine"
        );
        assert_eq!(
            decoded.rejected[0],
            WireError::AheadOfClock { ahead_ms: 60_001 }
        );
        assert_eq!(decoded.rejected.len(), 2);
    }

    #[test]
    fn an_unsigned_message_is_dropped_whole() {
        let payload = wire::encode_batch([&event("a.b", PeerId::random())]);
        assert_eq!(
            receive(None, payload, 1024, SystemTime::now()).unwrap_err(),
            MessageError::Unsigned
        );
    }

    #[test]
    fn a_bad_event_is_dropped_alone_and_a_bad_payload_whole() {
        let me = PeerId::random();
        let payload = wire::encode_batch([&event("a.b", me), &event("_mesh.x", me)]);
        let decoded = receive(Some(me), payload, 1024, SystemTime::now()).unwrap();
        assert_eq!((decoded.events.len(), decoded.rejected.len()), (1, 1));
        assert!(matches!(
            receive(Some(me), vec![9u8, 1, 2], 1024, SystemTime::now()),
            Err(MessageError::Wire(WireError::Version(9)))
        ));
    }
}
