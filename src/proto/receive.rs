//! Receiving: which events of a message from another peer are delivered.
//!
//! A message must have a signed author (its events' `source`) and decode as a batch of the
//! wire format; then each event in it is delivered or dropped on its own (see
//! [`crate::wire::decode_batch`] and [`crate::event::validate`]).

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

/// The events of a message from `source`, and why any of them were dropped; or why the
/// whole message was.
pub fn receive(
    source: Option<PeerId>,
    payload: impl Into<Bytes> + AsRef<[u8]>,
    max_event_size: usize,
) -> Result<Decoded, MessageError> {
    let source = source.ok_or(MessageError::Unsigned)?;
    Ok(wire::decode_batch(payload, source, max_event_size)?)
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
        let decoded = receive(Some(author), payload, 1024).unwrap();
        assert_eq!(decoded.events[0].source, author);
    }

    #[test]
    fn an_unsigned_message_is_dropped_whole() {
        let payload = wire::encode_batch([&event("a.b", PeerId::random())]);
        assert_eq!(
            receive(None, payload, 1024).unwrap_err(),
            MessageError::Unsigned
        );
    }

    #[test]
    fn a_bad_event_is_dropped_alone_and_a_bad_payload_whole() {
        let me = PeerId::random();
        let payload = wire::encode_batch([&event("a.b", me), &event("_mesh.x", me)]);
        let decoded = receive(Some(me), payload, 1024).unwrap();
        assert_eq!((decoded.events.len(), decoded.rejected.len()), (1, 1));
        assert!(matches!(
            receive(Some(me), vec![9u8, 1, 2], 1024),
            Err(MessageError::Wire(WireError::Version(9)))
        ));
    }
}
