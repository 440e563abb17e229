//! Topic names and the patterns that handler tables and `tail` match them with.
//!
//! A topic is a dot-separated list of segments, `orders.created`. A pattern may use `*` for
//! exactly one segment and `**` for any number of segments (zero included) at its end.
//! Topics that begin with `_mesh.` are reserved for events the mesh makes about itself; a
//! wildcard in a pattern's first segment does not reach into them, so `**` means "every user
//! event" and `_mesh.**` has to be asked for by name.
//!
//! Matching is plain data work: no allocation, no IO.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest topic or pattern, in bytes. Keeps envelopes small and matching cheap.
pub const MAX_TOPIC_LEN: usize = 256;

/// Most segments in a topic or pattern.
pub const MAX_SEGMENTS: usize = 32;

/// First segment of the topics the mesh reserves for its own events.
pub const RESERVED_PREFIX: &str = "_mesh";

/// Why a topic or pattern was refused. Each message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// Nothing to match.
    #[error("topic is empty; expected dot-separated segments such as `orders.created`")]
    Empty,
    /// Over [`MAX_TOPIC_LEN`] bytes.
    #[error("topic `{0}` is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong(String),
    /// Over [`MAX_SEGMENTS`] segments.
    #[error("topic `{0}` has more than {MAX_SEGMENTS} segments")]
    TooManySegments(String),
    /// `a..b`, `.a` or `a.`.
    #[error("topic `{0}` has an empty segment; segments are separated by single dots")]
    EmptySegment(String),
    /// A character outside the allowed set.
    #[error(
        "topic `{topic}` has `{ch}` in segment `{segment}`; segments use only ASCII letters, digits, `-` and `_`"
    )]
    BadChar {
        /// The whole input.
        topic: String,
        /// The offending segment.
        segment: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// A wildcard in a topic (as opposed to a pattern).
    #[error(
        "topic `{0}` contains a wildcard; `*` and `**` belong in patterns, not in published topics"
    )]
    WildcardInTopic(String),
    /// `**` somewhere other than at the end, or `*` mixed with other characters.
    #[error("pattern `{0}`: `**` may only be the last segment, and `*` must be a whole segment")]
    BadWildcard(String),
    /// Publishing to `_mesh.…` from outside the mesh itself.
    #[error("topic `{0}` is reserved: topics beginning with `_mesh.` carry the mesh's own events")]
    Reserved(String),
}

/// Checks the parts common to topics and patterns; `wild` allows `*`/`**` segments.
fn validate(input: &str, wild: bool) -> Result<(), TopicError> {
    if input.is_empty() {
        return Err(TopicError::Empty);
    }
    if input.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(input.to_owned()));
    }
    let count = input.split('.').count();
    if count > MAX_SEGMENTS {
        return Err(TopicError::TooManySegments(input.to_owned()));
    }
    for (i, segment) in input.split('.').enumerate() {
        if segment.is_empty() {
            return Err(TopicError::EmptySegment(input.to_owned()));
        }
        if segment == "*" || segment == "**" {
            if !wild {
                return Err(TopicError::WildcardInTopic(input.to_owned()));
            }
            if segment == "**" && i + 1 != count {
                return Err(TopicError::BadWildcard(input.to_owned()));
            }
            continue;
        }
        if let Some(ch) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            if ch == '*' {
                return Err(if wild {
                    TopicError::BadWildcard(input.to_owned())
                } else {
                    TopicError::WildcardInTopic(input.to_owned())
                });
            }
            return Err(TopicError::BadChar {
                topic: input.to_owned(),
                segment: segment.to_owned(),
                ch,
            });
        }
    }
    Ok(())
}

/// A concrete topic an event is published on, e.g. `orders.created`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Topic(String);

impl Topic {
    /// Parses a topic, reserved ones included (the mesh's own events use this).
    pub fn new(name: impl Into<String>) -> Result<Self, TopicError> {
        let name = name.into();
        validate(&name, false)?;
        Ok(Self(name))
    }

    /// Parses a topic a user may publish on: like [`Topic::new`] but refuses `_mesh.…`.
    pub fn user(name: impl Into<String>) -> Result<Self, TopicError> {
        let topic = Self::new(name)?;
        if topic.is_reserved() {
            return Err(TopicError::Reserved(topic.0));
        }
        Ok(topic)
    }

    /// The topic as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is one of the mesh's own topics.
    pub fn is_reserved(&self) -> bool {
        self.0.split('.').next() == Some(RESERVED_PREFIX)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Topic {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<Topic> for String {
    fn from(t: Topic) -> String {
        t.0
    }
}

/// A topic pattern: segments, `*` (one segment) and a trailing `**` (any number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(String);

impl Pattern {
    /// Parses a pattern, naming the broken rule when it is not one.
    pub fn new(pattern: impl Into<String>) -> Result<Self, TopicError> {
        let pattern = pattern.into();
        validate(&pattern, true)?;
        Ok(Self(pattern))
    }

    /// The pattern that matches every user topic.
    pub fn all() -> Self {
        Self("**".to_owned())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` is matched by this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        self.matches_str(topic.as_str())
    }

    /// Like [`Pattern::matches`] on a string already known to be a valid topic.
    pub fn matches_str(&self, topic: &str) -> bool {
        let mut pattern = self.0.split('.');
        let mut topic = topic.split('.');
        let mut first = true;
        loop {
            match (pattern.next(), topic.next()) {
                (Some("**"), Some(t)) => return !(first && t == RESERVED_PREFIX),
                (Some("**"), None) => return true,
                (Some("*"), Some(t)) => {
                    if first && t == RESERVED_PREFIX {
                        return false;
                    }
                }
                (Some(p), Some(t)) => {
                    if p != t {
                        return false;
                    }
                }
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Pattern {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Pattern {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, topic: &str) -> bool {
        Pattern::new(pattern)
            .unwrap()
            .matches(&Topic::new(topic).unwrap())
    }

    #[test]
    fn literal_pattern_matches_only_itself() {
        assert!(matches("orders.created", "orders.created"));
        assert!(!matches("orders.created", "orders.shipped"));
        assert!(!matches("orders.created", "orders.created.eu"));
        assert!(!matches("orders.created", "orders"));
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(matches("orders.*", "orders.created"));
        assert!(matches("orders.*", "orders.shipped"));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "orders.created.eu"));
        assert!(matches("*.created", "users.created"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.b.d"));
    }

    #[test]
    fn double_star_matches_any_tail_including_none() {
        assert!(matches("orders.**", "orders"));
        assert!(matches("orders.**", "orders.created"));
        assert!(matches("orders.**", "orders.created.eu.west"));
        assert!(!matches("orders.**", "users.created"));
        assert!(matches("**", "anything.at.all"));
    }

    #[test]
    fn wildcards_in_first_segment_skip_reserved_topics() {
        assert!(!matches("**", "_mesh.peer.joined"));
        assert!(!matches("*.peer.joined", "_mesh.peer.joined"));
        assert!(matches("_mesh.**", "_mesh.peer.joined"));
        assert!(matches("_mesh.peer.*", "_mesh.peer.left"));
    }

    #[test]
    fn topics_refuse_wildcards_and_bad_characters() {
        assert!(matches!(
            Topic::new("orders.*"),
            Err(TopicError::WildcardInTopic(_))
        ));
        assert!(matches!(Topic::new(""), Err(TopicError::Empty)));
        assert!(matches!(
            Topic::new("orders..x"),
            Err(TopicError::EmptySegment(_))
        ));
        assert!(matches!(
            Topic::new("orders."),
            Err(TopicError::EmptySegment(_))
        ));
        let err = Topic::new("orders/created").unwrap_err();
        assert!(
            err.to_string().contains("`/`"),
            "message names the character: {err}"
        );
        assert!(matches!(
            Topic::new("x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong(_))
        ));
        assert!(matches!(
            Topic::new(vec!["a"; MAX_SEGMENTS + 1].join(".")),
            Err(TopicError::TooManySegments(_))
        ));
    }

    #[test]
    fn patterns_refuse_misplaced_wildcards() {
        assert!(matches!(
            Pattern::new("**.created"),
            Err(TopicError::BadWildcard(_))
        ));
        assert!(matches!(
            Pattern::new("orders.cr*"),
            Err(TopicError::BadWildcard(_))
        ));
        assert!(Pattern::new("*.*.**").is_ok());
    }

    #[test]
    fn user_topics_cannot_be_reserved() {
        assert!(matches!(
            Topic::user("_mesh.peer.joined"),
            Err(TopicError::Reserved(_))
        ));
        assert!(Topic::new("_mesh.peer.joined").unwrap().is_reserved());
        assert!(!Topic::user("mesh.peer").unwrap().is_reserved());
    }

    #[test]
    fn serde_validates() {
        let t: Topic = serde_json::from_str("\"a.b\"").unwrap();
        assert_eq!(t.as_str(), "a.b");
        assert!(serde_json::from_str::<Topic>("\"a..b\"").is_err());
        assert!(serde_json::from_str::<Pattern>("\"**.a\"").is_err());
    }
}
