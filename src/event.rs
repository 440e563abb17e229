//! The event envelope and its CloudEvents 1.0 JSON view.
//!
//! Inside a peer an event is an [`Event`]: typed fields and the payload as bytes. Wherever a
//! person or another program sees it (CLI output, `tail --json`, file sinks, exec stdin, the
//! HTTP API) it is a [`CloudEvent`]: a CloudEvents 1.0 structured-mode JSON object with `topic`
//! and `seq` as extension attributes. The wire encoding between peers lives in [`crate::wire`].

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::topic::{Topic, TopicError};

/// Content type of JSON payloads, the default.
pub const JSON: &str = "application/json";

/// Content type of plain-text payloads.
pub const TEXT: &str = "text/plain";

/// CloudEvents spec version we emit.
pub const SPEC_VERSION: &str = "1.0";

/// Longest event `type`, in bytes.
pub const MAX_TYPE_LEN: usize = 256;

/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 128;

/// Globally unique event id: a UUIDv7, so ids sort roughly by publish time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub uuid::Uuid);

impl EventId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// One event as a peer holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique across the mesh; what handlers and logs use to name an event.
    pub id: EventId,
    /// Where it was published; what handler patterns match.
    pub topic: Topic,
    /// What kind of event it is (CloudEvents `type`); defaults to the topic.
    pub event_type: String,
    /// The publishing peer, as authenticated by the gossipsub signature.
    pub source: PeerId,
    /// The publisher's sequence number, 1 for its first event of an epoch; lets receivers
    /// spot gaps. Local `_mesh.` events have 0.
    pub seq: u64,
    /// The publisher's log epoch: when its event log was created, in microseconds since the
    /// Unix epoch. A publisher whose log was wiped starts a new epoch, so its numbers never
    /// repeat within one `(source, epoch)` stream.
    pub epoch: u64,
    /// When the publisher published it.
    pub time: SystemTime,
    /// Media type of `data`: [`JSON`], [`TEXT`] or anything else (shown as base64).
    pub content_type: String,
    /// The payload, opaque to the mesh.
    pub data: Bytes,
}

/// A payload a publisher hands in, before the node stamps id, seq and time on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Media type of `data`.
    pub content_type: String,
    /// The bytes.
    pub data: Bytes,
}

impl Payload {
    /// A JSON payload from any serde value.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Self {
            content_type: JSON.to_owned(),
            data: serde_json::to_vec(value)?.into(),
        })
    }

    /// A plain-text payload.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            content_type: TEXT.to_owned(),
            data: Bytes::from(text.into()),
        }
    }

    /// What a user typed on the command line: JSON when it parses as JSON, else text.
    pub fn guess(input: &str) -> Self {
        match serde_json::from_str::<serde::de::IgnoredAny>(input) {
            Ok(_) => Self {
                content_type: JSON.to_owned(),
                data: Bytes::copy_from_slice(input.trim().as_bytes()),
            },
            Err(_) => Self::text(input),
        }
    }

    /// Opaque bytes of the given media type.
    pub fn bytes(content_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            content_type: content_type.into(),
            data: data.into(),
        }
    }
}

/// Whether a media type carries JSON (`application/json` or `…+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(JSON) || essence.ends_with("+json")
}

/// Whether a media type carries text that JSON can hold as a string.
pub fn is_text(content_type: &str) -> bool {
    content_type.trim_start().starts_with("text/")
}

impl Event {
    /// Bytes the event takes in memory, roughly: what buffers, caches and queues count.
    pub fn footprint(&self) -> usize {
        self.data.len() + self.topic.as_str().len() + self.event_type.len() + 128
    }

    /// Decodes a JSON payload into `T`.
    pub fn data_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }

    /// The CloudEvents JSON view of this event.
    pub fn to_cloudevent(&self) -> CloudEvent {
        let (data, data_base64) = if is_json(&self.content_type) {
            match std::str::from_utf8(&self.data)
                .ok()
                .and_then(|s| RawValue::from_string(s.to_owned()).ok())
            {
                Some(raw) => (Some(raw), None),
                None => (None, Some(self.base64())),
            }
        } else if is_text(&self.content_type) {
            match std::str::from_utf8(&self.data) {
                Ok(s) => (RawValue::from_string(json_string(s)).ok(), None),
                Err(_) => (None, Some(self.base64())),
            }
        } else {
            (None, Some(self.base64()))
        };
        CloudEvent {
            specversion: SPEC_VERSION.to_owned(),
            id: self.id.to_string(),
            source: peer_string(&self.source).to_string(),
            event_type: self.event_type.clone(),
            time: humantime::format_rfc3339_micros(self.time).to_string(),
            datacontenttype: self.content_type.clone(),
            topic: self.topic.to_string(),
            seq: self.seq,
            data,
            data_base64,
        }
    }

    /// The event as one CloudEvents JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(&self.to_cloudevent()).unwrap_or_else(|e| {
            // Serialising strings and raw JSON cannot fail; say so loudly if it ever does.
            tracing::error!(event = %self.id, error = %e, "could not serialise event");
            String::from("{}")
        })
    }

    fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.data)
    }
}

/// What a live stream of events yields: an event (in the library an [`Event`], from the HTTP
/// API its CloudEvents JSON), or word that the reader fell behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tailed<E = std::sync::Arc<Event>> {
    /// An event that matched.
    Event(E),
    /// The reader fell behind and this many events (of any topic) went by unseen.
    Missed(u64),
}

/// An event of the mesh's own (`_mesh.…`, never sent to other peers), stamped now, with
/// JSON data; `None` if `topic` is not a valid topic name.
pub fn local_event(source: PeerId, topic: &str, data: serde_json::Value) -> Option<Event> {
    let topic = Topic::new(topic).ok()?;
    Some(Event {
        id: EventId::new(),
        event_type: topic.to_string(),
        topic,
        source,
        seq: 0,
        epoch: 0,
        time: SystemTime::now(),
        content_type: JSON.to_owned(),
        data: serde_json::to_vec(&data).ok()?.into(),
    })
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
pub fn clip(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The type of a query event; `meshbus.query/GROUP` asks only the rows of that group.
pub const QUERY_TYPE: &str = "meshbus.query";

/// Whether `event` is a query (its rows with `reply` answer it).
pub fn is_query(event: &Event) -> bool {
    query_group(event).is_some()
}

/// `Some(None)` for a query to every reply row, `Some(Some(group))` for a query to one
/// group's, `None` for any other event.
pub fn query_group(event: &Event) -> Option<Option<&str>> {
    let rest = event.event_type.strip_prefix(QUERY_TYPE)?;
    match rest {
        "" => Some(None),
        _ => rest.strip_prefix('/').map(Some),
    }
}

/// Peers whose base58 ids each thread remembers.
const PEER_STRING_CACHE: usize = 32;

/// A peer id in base58, from a small per-thread cache: encoding it is the dearest part of an
/// event's JSON, and a receiver sees the same few sources again and again.
pub fn peer_string(peer: &PeerId) -> std::rc::Rc<str> {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(PeerId, std::rc::Rc<str>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(i) = cache.iter().position(|(p, _)| p == peer) {
            // Move to the front, so the busiest sources are found first.
            cache[..=i].rotate_right(1);
            return cache[0].1.clone();
        }
        let text: std::rc::Rc<str> = peer.to_string().into();
        if cache.len() == PEER_STRING_CACHE {
            cache.pop();
        }
        cache.insert(0, (*peer, text.clone()));
        text
    })
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// An event as CloudEvents 1.0 structured-mode JSON, with `topic` and `seq` extensions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// The event id.
    pub id: String,
    /// The publishing peer's id.
    pub source: String,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// RFC 3339 publish time.
    pub time: String,
    /// Media type of the data.
    pub datacontenttype: String,
    /// Extension: the topic the event was published on.
    pub topic: String,
    /// Extension: the publisher's sequence number.
    pub seq: u64,
    /// JSON data, or a JSON string for text data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Any other data, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

/// Longest payload shown in a one-line summary before it is cut.
const SUMMARY_DATA_CHARS: usize = 1024;

impl CloudEvent {
    /// One readable line: time, topic, source (short), seq, data.
    pub fn summary_line(&self) -> String {
        let short_source = self
            .source
            .get(self.source.len().saturating_sub(6)..)
            .unwrap_or(&self.source);
        let data = match (&self.data, &self.data_base64) {
            (Some(raw), _) => match serde_json::from_str::<String>(raw.get()) {
                Ok(text) => text,
                Err(_) => raw.get().to_owned(),
            },
            (None, Some(b64)) => format!("<{} base64 {b64}>", self.datacontenttype),
            (None, None) => String::new(),
        };
        let mut line = printable(&format!(
            "{} {} …{}#{} {}",
            self.time, self.topic, short_source, self.seq, data
        ));
        if let Some((cut, _)) = line.char_indices().nth(SUMMARY_DATA_CHARS) {
            line.truncate(cut);
            line.push('…');
        }
        line
    }
}

/// `text` safe to print on a terminal: control characters (ESC, BEL, CR, newline, C1…) and
/// the bidirectional overrides that reorder what a reader sees become visible escapes like
/// `\u{1b}`, so event data cannot move the cursor, retitle the window or hide text.
pub fn printable(text: &str) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Why an event breaks the rules: refused at publish, dropped on arrival.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// Topic rules broken.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Payload over the configured limit.
    #[error("event of {size} bytes is over the limit of {limit} bytes (setting `max_event_size`)")]
    TooLarge {
        /// Bytes the event would take.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An over-long or empty `type`.
    #[error("event type must be 1 to {MAX_TYPE_LEN} bytes, got {0}")]
    BadType(usize),
    /// The mesh's ACL does not let this peer publish on the topic.
    #[error("this peer may not publish on {0} (the mesh's [[acl]] rules)")]
    Forbidden(String),
    /// An over-long content type.
    #[error("content type must be at most {MAX_CONTENT_TYPE_LEN} bytes, got {0}")]
    BadContentType(usize),
}

/// The rules every event obeys, checked here alone: at publish (before it leaves this peer)
/// and on arrival from another peer. Its topic is not one of the mesh's own, its type and
/// content type are within bounds, and it is no larger than `max_event_size` (see
/// [`event_size`] for what counts).
pub fn validate(
    topic: &Topic,
    event_type: &str,
    content_type: &str,
    data: &[u8],
    max_event_size: usize,
) -> Result<(), EventError> {
    if topic.is_reserved() {
        return Err(TopicError::Reserved(topic.to_string()).into());
    }
    check_labels(event_type, content_type)?;
    let size = event_size(topic.as_str(), event_type, content_type, data);
    if size > max_event_size {
        return Err(EventError::TooLarge {
            size,
            limit: max_event_size,
        });
    }
    Ok(())
}

/// Checks a type and content type against their limits.
fn check_labels(event_type: &str, content_type: &str) -> Result<(), EventError> {
    if event_type.is_empty() || event_type.len() > MAX_TYPE_LEN {
        return Err(EventError::BadType(event_type.len()));
    }
    if content_type.len() > MAX_CONTENT_TYPE_LEN {
        return Err(EventError::BadContentType(content_type.len()));
    }
    Ok(())
}

/// Bytes an event counts against `max_event_size`: payload plus labels.
pub fn event_size(topic: &str, event_type: &str, content_type: &str, data: &[u8]) -> usize {
    topic.len() + event_type.len() + content_type.len() + data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(content_type: &str, data: &[u8]) -> Event {
        Event {
            id: EventId::new(),
            topic: Topic::new("orders.created").unwrap(),
            event_type: "orders.created".into(),
            source: PeerId::random(),
            seq: 7,
            epoch: 1,
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            content_type: content_type.into(),
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn json_data_is_embedded_as_json() {
        let e = event(JSON, br#"{"id":42}"#);
        let v: serde_json::Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["data"]["id"], 42);
        assert_eq!(v["topic"], "orders.created");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["type"], "orders.created");
        assert_eq!(v["source"], e.source.to_string());
        assert_eq!(v["id"], e.id.to_string());
        assert_eq!(v["time"], "2023-11-14T22:13:20.123000Z");
        assert!(v.get("data_base64").is_none());
    }

    #[test]
    fn text_data_becomes_a_json_string() {
        let e = event(TEXT, b"hello \"mesh\"\n");
        let v: serde_json::Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["data"], "hello \"mesh\"\n");
    }

    #[test]
    fn binary_and_invalid_json_data_become_base64() {
        let e = event("application/octet-stream", &[0, 159, 146, 150]);
        let v: serde_json::Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["data_base64"], "AJ+Slg==");
        let e = event(JSON, b"{not json");
        let v: serde_json::Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["data_base64"], "e25vdCBqc29u");
    }

    #[test]
    fn peer_strings_are_cached_but_always_right() {
        let peers: Vec<PeerId> = (0..PEER_STRING_CACHE * 2)
            .map(|_| PeerId::random())
            .collect();
        for _ in 0..3 {
            for p in &peers {
                assert_eq!(&*peer_string(p), p.to_string());
            }
        }
    }

    #[test]
    fn guess_takes_json_when_it_parses() {
        assert_eq!(Payload::guess(r#"{"id":42}"#).content_type, JSON);
        assert_eq!(Payload::guess("42").content_type, JSON);
        assert_eq!(Payload::guess("hello world").content_type, TEXT);
        assert_eq!(Payload::guess("hello world").data, "hello world");
    }

    #[test]
    fn terminal_escapes_in_data_are_shown_not_obeyed() {
        let e = event(TEXT, b"a\x1b]0;owned\x07b\rc\xe2\x80\xaed");
        let line = e.to_cloudevent().summary_line();
        assert!(
            line.ends_with(r"a\u{1b}]0;owned\u{7}b\u{d}c\u{202e}d"),
            "{line}"
        );
        assert!(!line.chars().any(|c| c.is_control()));
    }

    #[test]
    fn summary_line_is_one_line_and_bounded() {
        let e = event(TEXT, "x\ny".repeat(2000).as_bytes());
        let line = e.to_cloudevent().summary_line();
        assert!(!line.contains('\n'));
        assert!(line.chars().count() <= SUMMARY_DATA_CHARS + 1);
        assert!(line.contains("orders.created"));
        let e = event(JSON, br#"{"id":42}"#);
        assert!(e
            .to_cloudevent()
            .summary_line()
            .ends_with(r#"#7 {"id":42}"#));
    }

    #[test]
    fn cloudevent_round_trips_through_serde() {
        let e = event(JSON, br#"[1,2]"#);
        let ce: CloudEvent = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(ce.data.unwrap().get(), "[1,2]");
        assert_eq!(ce.seq, 7);
    }
}
