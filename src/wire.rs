//! The wire format: how events travel between peers inside gossipsub messages.
//!
//! Every gossipsub message a meshbus peer publishes on [`crate::proto::MESH_TOPIC`] carries a
//! *batch* of one or more events from the message's signed author, or, with no events, the
//! author's *presence* ([`WirePresence`]: membership that travels over the mesh, see
//! [`crate::proto::roster`]). The payload is:
//!
//! ```text
//! byte 0      format version, currently 0x01
//! bytes 1..   a Protocol Buffers (proto3) message `Batch`, schema in docs/wire.proto
//! ```
//!
//! The event's `source` is not in the payload: it is the gossipsub message's `from` field,
//! which strict signature validation authenticates, so a peer cannot publish in another's
//! name. An empty `type` means "same as the topic"; an empty `content_type` means
//! `application/json`. A decoder in any language needs only a protobuf library; see
//! `docs/wire.md` for the full description and a worked example.
//!
//! A receiver drops (and counts) a payload with an unknown version or that does not parse,
//! and any single event in it that breaks a rule (bad id, bad topic, over the size limit).

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use libp2p::PeerId;
use prost::Message as _;

use crate::event::{self, Event, EventError, EventId, JSON};
use crate::node::repair::GroupAnnounce;
use crate::topic::Topic;

/// The format version this build writes and reads.
pub const VERSION: u8 = 1;

/// Latest publish time accepted: 9999-12-31T23:59:59.999999Z, the last RFC 3339 can write.
pub const MAX_TIME_MICROS: u64 = 253_402_300_799_999_999;

/// Bytes a batch adds around its events (version byte and protobuf framing), as a bound.
pub const BATCH_OVERHEAD: usize = 16;

/// One event on the wire (`meshbus.wire.v1.Event`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEvent {
    /// 16-byte UUID.
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// Dot-separated topic.
    #[prost(string, tag = "2")]
    pub topic: String,
    /// Event type; empty means the topic.
    #[prost(string, tag = "3")]
    pub r#type: String,
    /// Publisher's sequence number.
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    /// Publish time, microseconds since the Unix epoch.
    #[prost(int64, tag = "5")]
    pub time_unix_micros: i64,
    /// Media type; empty means `application/json`.
    #[prost(string, tag = "6")]
    pub content_type: String,
    /// Payload.
    #[prost(bytes = "bytes", tag = "7")]
    pub data: Bytes,
    /// The publisher's log epoch; `seq` counts within it.
    #[prost(uint64, tag = "8")]
    pub epoch: u64,
}

/// Several events from one author (`meshbus.wire.v1.Batch`), or its presence.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireBatch {
    /// In publish order.
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<WireEvent>,
    /// The author's presence; only in a batch without events.
    #[prost(message, optional, tag = "2")]
    pub presence: Option<WirePresence>,
}

/// Why a payload or an event in it was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Zero bytes.
    #[error("empty payload; expected a version byte and a batch")]
    Empty,
    /// A batch without events and without a presence: no peer sends one.
    #[error("batch holds no events and no presence; expected one or the other")]
    NoEvents,
    /// A batch with events and a presence: no peer sends one.
    #[error("batch holds events and a presence; expected one or the other")]
    Both,
    /// A format version this build does not know.
    #[error("wire format version {0} is not supported; this peer reads version {VERSION}")]
    Version(u8),
    /// Protobuf did not parse.
    #[error("batch does not decode as protobuf: {0}")]
    Decode(String),
    /// The id is not 16 bytes.
    #[error("event id has {0} bytes; expected 16")]
    BadId(usize),
    /// Topic rules broken.
    #[error("event has an invalid topic: {0}")]
    BadTopic(String),
    /// The event breaks one of the rules of [`crate::event::validate`].
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// Timed further ahead of the receiver's clock than its skew bound allows
    /// ([`crate::proto::receive::MAX_CLOCK_SKEW`]).
    #[error("event time is {ahead_ms} ms ahead of this peer's clock; at most 60 s is accepted")]
    AheadOfClock {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// A sequence number of 0 (local events only) or past [`crate::proto::inbox::MAX_SEQ`].
    #[error("event seq {0} is out of range; expected 1 to 2^62")]
    BadSeq(u64),
    /// A publish time before 1970 or after 9999 (RFC 3339 cannot write it).
    #[error("event time {0} µs since 1970 is out of range; expected 0 to {MAX_TIME_MICROS}")]
    BadTime(i64),
}

fn to_wire(event: &Event) -> WireEvent {
    let micros = i64::try_from(crate::clock::unix_micros(event.time)).unwrap_or(i64::MAX);
    WireEvent {
        id: event.id.0.as_bytes().to_vec(),
        topic: event.topic.as_str().to_owned(),
        r#type: if event.event_type == event.topic.as_str() {
            String::new()
        } else {
            event.event_type.clone()
        },
        seq: event.seq,
        time_unix_micros: micros,
        content_type: if event.content_type == JSON {
            String::new()
        } else {
            event.content_type.clone()
        },
        data: event.data.clone(),
        epoch: event.epoch,
    }
}

/// Encodes events (all from this peer) into one payload.
pub fn encode_batch<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u8> {
    framed(&WireBatch {
        events: events.into_iter().map(to_wire).collect(),
        presence: None,
    })
}

/// The version byte, then `batch`.
fn framed(batch: &WireBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + batch.encoded_len());
    out.push(VERSION);
    // Encoding into a Vec only fails for lack of capacity, which Vec grows.
    batch
        .encode(&mut out)
        .expect("encoding into a Vec cannot run out of space");
    out
}

/// Encodes one event alone (a `meshbus.wire.v1.Event`, no version byte): how repair sends
/// them.
pub fn encode_event(event: &Event) -> Vec<u8> {
    to_wire(event).encode_to_vec()
}

/// Decodes one event encoded by [`encode_event`] whose publisher is `source`, checking it
/// like an event of a gossiped batch.
pub fn decode_event(
    bytes: &[u8],
    source: PeerId,
    max_event_size: usize,
) -> Result<Event, WireError> {
    let wire = WireEvent::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    from_wire(wire, source, max_event_size)
}

/// Decodes a batch this peer stored itself ([`encode_batch`]) of events whose publisher is
/// `source`: its own `_mesh.` events included, so only the encoding is checked.
pub fn decode_stored_batch(payload: &[u8], source: PeerId) -> Result<Vec<Event>, WireError> {
    let (&version, body) = payload.split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let batch = WireBatch::decode(body).map_err(|e| WireError::Decode(e.to_string()))?;
    batch
        .events
        .into_iter()
        .map(|wire| fields(wire, source))
        .collect()
}

/// The outcome of decoding one payload: the good events and why the others were dropped;
/// or the author's presence.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Valid events, in the order they were published.
    pub events: Vec<Event>,
    /// One entry per dropped event.
    pub rejected: Vec<WireError>,
    /// The author's presence (then there are no events).
    pub presence: Option<Presence>,
}

/// A peer's presence as it came: what it says of itself, and its handler groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    /// Its membership part; [`crate::proto::roster::Presence::check`] checks its bounds.
    pub presence: crate::proto::roster::Presence,
    /// Every handler group it is in, with its done-marks (checked where they are taken).
    pub groups: Vec<GroupAnnounce>,
}

/// Decodes a payload authored by `source`, checking each event against `max_event_size`.
pub fn decode_batch(
    payload: impl Into<Bytes> + AsRef<[u8]>,
    source: PeerId,
    max_event_size: usize,
) -> Result<Decoded, WireError> {
    let (&version, _) = payload.as_ref().split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let body = payload.into().slice(1..);
    let batch = WireBatch::decode(body).map_err(|e| WireError::Decode(e.to_string()))?;
    match (batch.events.is_empty(), batch.presence) {
        (true, None) => return Err(WireError::NoEvents),
        (false, Some(_)) => return Err(WireError::Both),
        (true, Some(p)) => {
            return Ok(Decoded {
                presence: Some(from_wire_presence(p)),
                ..Decoded::default()
            })
        }
        (false, None) => {}
    }
    let mut decoded = Decoded::default();
    for wire in batch.events {
        match from_wire(wire, source, max_event_size) {
            Ok(mut event) => {
                // Its own copy: a slice of the payload would keep all of it (up to 1 MiB,
                // padding and rejected or duplicate siblings included) alive as long as
                // this one event is held, where every bound counts the event's own bytes.
                event.data = Bytes::copy_from_slice(&event.data);
                decoded.events.push(event)
            }
            Err(e) => decoded.rejected.push(e),
        }
    }
    Ok(decoded)
}

fn from_wire(wire: WireEvent, source: PeerId, max_event_size: usize) -> Result<Event, WireError> {
    if wire.seq == 0 || wire.seq > crate::proto::inbox::MAX_SEQ {
        return Err(WireError::BadSeq(wire.seq));
    }
    let event = fields(wire, source)?;
    event::validate(
        &event.topic,
        &event.event_type,
        &event.content_type,
        &event.data,
        max_event_size,
    )?;
    Ok(event)
}

/// The event an encoded one stands for, defaults filled in; checks only what the encoding
/// itself needs (id length, topic syntax, time range). [`from_wire`] adds the event rules.
fn fields(wire: WireEvent, source: PeerId) -> Result<Event, WireError> {
    let id = uuid::Uuid::from_slice(&wire.id).map_err(|_| WireError::BadId(wire.id.len()))?;
    let topic = Topic::new(wire.topic).map_err(|e| WireError::BadTopic(e.to_string()))?;
    let event_type = if wire.r#type.is_empty() {
        topic.as_str().to_owned()
    } else {
        wire.r#type
    };
    let content_type = if wire.content_type.is_empty() {
        JSON.to_owned()
    } else {
        wire.content_type
    };
    let micros = u64::try_from(wire.time_unix_micros)
        .ok()
        .filter(|m| *m <= MAX_TIME_MICROS)
        .ok_or(WireError::BadTime(wire.time_unix_micros))?;
    Ok(Event {
        id: EventId(id),
        topic,
        event_type,
        source,
        seq: wire.seq,
        epoch: wire.epoch,
        time: UNIX_EPOCH + Duration::from_micros(micros),
        content_type,
        data: wire.data,
    })
}

/// A peer's presence (`meshbus.wire.v1.Presence`), in a batch without events.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WirePresence {
    /// Announcement number: larger is newer.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Agent string, `meshbus/VERSION (NAME)`.
    #[prost(string, tag = "2")]
    pub agent: String,
    /// How often the peer announces itself now, in milliseconds.
    #[prost(uint32, tag = "3")]
    pub every_ms: u32,
    /// It is shutting down cleanly.
    #[prost(bool, tag = "4")]
    pub leaving: bool,
    /// Every handler group it is in, with its done-marks.
    #[prost(message, repeated, tag = "5")]
    pub groups: Vec<GroupAnnounce>,
}

/// Encodes this peer's presence and its groups into one payload.
pub fn encode_presence(
    presence: &crate::proto::roster::Presence,
    groups: Vec<GroupAnnounce>,
) -> Vec<u8> {
    framed(&WireBatch {
        events: Vec::new(),
        presence: Some(WirePresence {
            seq: presence.seq,
            agent: presence.agent.clone(),
            every_ms: u32::try_from(presence.every.as_millis()).unwrap_or(u32::MAX),
            leaving: presence.leaving,
            groups,
        }),
    })
}

fn from_wire_presence(wire: WirePresence) -> Presence {
    Presence {
        presence: crate::proto::roster::Presence {
            seq: wire.seq,
            agent: wire.agent,
            every: Duration::from_millis(u64::from(wire.every_ms)),
            leaving: wire.leaving,
        },
        groups: wire.groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TEXT;

    /// What one side may send, the other accepts: the largest presence a peer makes (every
    /// group it may be in, each with all its marks, the longest names) fits in a gossipsub
    /// message with room for its envelope.
    #[test]
    fn the_largest_presence_fits_a_message() {
        use crate::node::repair::Mark;
        use crate::proto::groups::{MAX_GROUPS, MAX_MARKS, MAX_NAME};
        let mark = Mark {
            source: PeerId::random().to_bytes(),
            epoch: u64::MAX,
            high: u64::MAX,
        };
        let groups = (0..MAX_GROUPS)
            .map(|_| GroupAnnounce {
                name: "g".repeat(MAX_NAME),
                since: u64::MAX,
                marks: vec![mark.clone(); MAX_MARKS],
                shape: u64::MAX,
            })
            .collect();
        let presence = crate::proto::roster::Presence {
            seq: u64::MAX,
            agent: "a".repeat(crate::proto::roster::MAX_AGENT),
            every: crate::proto::roster::QUIET_EVERY,
            leaving: false,
        };
        let len = encode_presence(&presence, groups).len();
        // The envelope: signature, key, author, seqno and topic, well under 1 KiB.
        assert!(len + 1024 <= crate::config::MAX_MESSAGE_SIZE, "{len} bytes");
    }

    #[test]
    fn a_presence_decodes_as_it_was_encoded() {
        let me = PeerId::random();
        let presence = crate::proto::roster::Presence {
            seq: 1_764_000_000_000_001,
            agent: "meshbus/0.1.0 (h1)".into(),
            every: std::time::Duration::from_secs(1),
            leaving: true,
        };
        let groups = vec![GroupAnnounce {
            name: "billing".into(),
            since: 7,
            marks: Vec::new(),
            shape: 9,
        }];
        let bytes = encode_presence(&presence, groups.clone());
        assert_eq!(bytes[0], VERSION);
        let decoded = decode_batch(bytes, me, 1024).unwrap();
        assert!(decoded.events.is_empty());
        assert_eq!(decoded.presence, Some(Presence { presence, groups }));
        // Events and a presence together are not a message any peer sends.
        let both = WireBatch {
            events: vec![to_wire(&event(1, "a.b", "a.b", JSON, b"1", me))],
            presence: Some(WirePresence::default()),
        };
        let mut payload = vec![VERSION];
        both.encode(&mut payload).unwrap();
        assert_eq!(
            decode_batch(payload, me, 1024).unwrap_err(),
            WireError::Both
        );
    }

    fn event(seq: u64, topic: &str, ty: &str, ct: &str, data: &[u8], source: PeerId) -> Event {
        Event {
            id: EventId::new(),
            topic: Topic::new(topic).unwrap(),
            event_type: ty.into(),
            source,
            seq,
            epoch: 3,
            time: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            content_type: ct.into(),
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn batch_round_trips() {
        let me = PeerId::random();
        let events = vec![
            event(
                1,
                "orders.created",
                "orders.created",
                JSON,
                br#"{"id":1}"#,
                me,
            ),
            event(2, "orders.shipped", "shipping.v2", TEXT, b"box 7", me),
            event(3, "blobs", "blobs", "image/png", &[0, 1, 2, 255], me),
        ];
        let payload = encode_batch(&events);
        assert_eq!(payload[0], VERSION);
        let decoded = decode_batch(payload, me, 1 << 20).unwrap();
        assert!(decoded.rejected.is_empty());
        assert_eq!(decoded.events, events);
    }

    #[test]
    fn defaults_are_not_sent() {
        let me = PeerId::random();
        let short = encode_batch(&[event(1, "a", "a", JSON, b"1", me)]);
        let long = encode_batch(&[event(1, "a", "b", TEXT, b"1", me)]);
        assert!(short.len() + "b".len() + TEXT.len() <= long.len());
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        let me = PeerId::random();
        assert_eq!(
            decode_batch(Vec::new(), me, 1024).unwrap_err(),
            WireError::Empty
        );
        assert_eq!(
            decode_batch(vec![9, 1, 2], me, 1024).unwrap_err(),
            WireError::Version(9)
        );
        assert_eq!(
            decode_batch(vec![VERSION], me, 1024).unwrap_err(),
            WireError::NoEvents,
            "an empty batch is malformed, not silently nothing"
        );
        assert!(matches!(
            decode_batch(vec![VERSION, 0x0a, 0xff], me, 1024),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn bad_events_are_dropped_one_by_one() {
        let me = PeerId::random();
        let good = to_wire(&event(1, "a.b", "a.b", JSON, b"1", me));
        let mut bad_id = good.clone();
        bad_id.id = vec![1, 2, 3];
        let mut bad_topic = good.clone();
        bad_topic.topic = "a..b".into();
        let mut reserved = good.clone();
        reserved.topic = "_mesh.peer.joined".into();
        let mut big = good.clone();
        big.data = Bytes::from(vec![b'1'; 2000]);
        let mut far = good.clone();
        far.time_unix_micros = MAX_TIME_MICROS as i64 + 1;
        let mut early = good.clone();
        early.time_unix_micros = -1;
        let mut zero = good.clone();
        zero.seq = 0;
        let mut huge = good.clone();
        huge.seq = u64::MAX;
        let batch = WireBatch {
            events: vec![
                bad_id, good, bad_topic, reserved, big, far, early, zero, huge,
            ],
            presence: None,
        };
        let mut payload = vec![VERSION];
        batch.encode(&mut payload).unwrap();
        let decoded = decode_batch(payload, me, 1024).unwrap();
        assert_eq!(decoded.events.len(), 1);
        assert_eq!(decoded.rejected.len(), 8);
        assert_eq!(decoded.rejected[0], WireError::BadId(3));
        assert!(matches!(decoded.rejected[1], WireError::BadTopic(_)));
        assert!(matches!(
            decoded.rejected[2],
            WireError::Invalid(EventError::Topic(crate::topic::TopicError::Reserved(_)))
        ));
        assert!(matches!(
            decoded.rejected[3],
            WireError::Invalid(EventError::TooLarge { .. })
        ));
        assert!(matches!(decoded.rejected[4], WireError::BadTime(_)));
        assert!(matches!(decoded.rejected[5], WireError::BadTime(-1)));
        assert_eq!(decoded.rejected[6], WireError::BadSeq(0));
        assert_eq!(decoded.rejected[7], WireError::BadSeq(u64::MAX));
    }

    #[test]
    fn the_latest_accepted_time_still_formats() {
        let me = PeerId::random();
        let mut e = event(1, "a", "a", JSON, b"1", me);
        e.time = UNIX_EPOCH + Duration::from_micros(MAX_TIME_MICROS);
        let decoded = decode_batch(encode_batch([&e]), me, 1024).unwrap();
        let line = decoded.events[0].to_json_line();
        assert!(line.contains("9999-12-31T23:59:59.999999Z"), "{line}");
    }

    #[test]
    fn hand_written_protobuf_decodes() {
        // What another language would produce: version byte, then field 1 (events) holding
        // id (16 bytes), topic "t", seq 5, data "1"; no type, content type or time.
        let mut ev = vec![0x0a, 16];
        ev.extend_from_slice(&[7; 16]);
        ev.extend_from_slice(&[0x12, 1, b't', 0x20, 5, 0x3a, 1, b'1']);
        let mut payload = vec![VERSION, 0x0a, ev.len() as u8];
        payload.extend_from_slice(&ev);
        let me = PeerId::random();
        let decoded = decode_batch(payload, me, 1024).unwrap();
        let e = &decoded.events[0];
        assert_eq!(e.topic.as_str(), "t");
        assert_eq!(e.event_type, "t");
        assert_eq!(e.content_type, JSON);
        assert_eq!(e.seq, 5);
        assert_eq!(e.data, "1");
        assert_eq!(e.source, me);
    }

    #[test]
    fn documented_example_is_what_we_send() {
        // The payload shown in docs/wire.md, byte for byte.
        let doc = "01 0a 38 0a 10 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 12 0e 6f 72 \
                   64 65 72 73 2e 63 72 65 61 74 65 64 20 01 28 80 80 f9 c0 c1 c4 82 03 3a 09 \
                   7b 22 69 64 22 3a 34 32 7d";
        let expected: Vec<u8> = doc
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        let event = Event {
            id: EventId(uuid::Uuid::from_bytes(std::array::from_fn(|i| i as u8 + 1))),
            topic: Topic::new("orders.created").unwrap(),
            event_type: "orders.created".into(),
            source: PeerId::random(),
            seq: 1,
            epoch: 0,
            time: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000),
            content_type: JSON.into(),
            data: Bytes::from_static(br#"{"id":42}"#),
        };
        assert_eq!(encode_batch([&event]), expected);
    }
}
