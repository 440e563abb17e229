//! `/meshbus/answer/1`: how a reply row's answer goes straight back to the peer that asked,
//! not gossiped. One CBOR request (an [`AnswerMsg`]) and one empty CBOR response per stream;
//! the schema is in docs/wire.md.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshbus/answer/1");

/// Largest answer (its JSON text) a reply row may send; a larger one is sent as an error
/// saying so.
pub const MAX_ANSWER: usize = 64 * 1024;

/// Largest answer message read: an answer at its limit, its error and names.
pub const MAX_MESSAGE: u64 = (MAX_ANSWER + 8 * 1024) as u64;

/// Longest error text sent with an answer.
pub const MAX_ERROR: usize = 1024;

/// An answer to a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerMsg {
    /// The query's event id.
    pub query: String,
    /// The row that answered.
    pub handler: String,
    /// The answer as JSON text, when the row succeeded.
    pub answer: Option<String>,
    /// Why the row failed, when it did.
    pub error: Option<String>,
}

/// The (empty) acknowledgement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// The request-response behaviour carrying answers.
pub type Behaviour = libp2p::request_response::cbor::Behaviour<AnswerMsg, Ack>;

/// Builds the behaviour with its size limits.
pub fn behaviour(timeout: std::time::Duration) -> Behaviour {
    use libp2p::request_response::{self, cbor::codec::Codec};
    let codec = Codec::<AnswerMsg, Ack>::default()
        .set_request_size_maximum(MAX_MESSAGE)
        .set_response_size_maximum(1024);
    request_response::Behaviour::with_codec(
        codec,
        [(PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(timeout)
            .with_max_concurrent_streams(64),
    )
}

/// An answer as it is sent: the JSON text within [`MAX_ANSWER`], or an error.
pub fn message(
    query: String,
    handler: String,
    answer: Result<serde_json::Value, String>,
) -> AnswerMsg {
    let (answer, error) = match answer {
        Ok(value) => {
            let text = value.to_string();
            if text.len() > MAX_ANSWER {
                (
                    None,
                    Some(format!(
                        "the answer has {} bytes; at most {MAX_ANSWER} are sent",
                        text.len()
                    )),
                )
            } else {
                (Some(text), None)
            }
        }
        Err(error) => (None, Some(error)),
    };
    let error = error.map(|mut e| {
        crate::event::clip(&mut e, MAX_ERROR);
        e
    });
    AnswerMsg {
        query,
        handler: handler.chars().take(256).collect(),
        answer,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_bounded() {
        let m = message(
            "q".into(),
            "h".into(),
            Ok(serde_json::json!("x".repeat(MAX_ANSWER))),
        );
        assert!(m.answer.is_none());
        assert!(m.error.unwrap().contains("at most 65536"));
        let m = message("q".into(), "h".into(), Err("e".repeat(10_000)));
        assert_eq!(m.error.unwrap().len(), MAX_ERROR);
        let m = message("q".into(), "h".into(), Ok(serde_json::json!({"a": 1})));
        assert_eq!(m.answer.as_deref(), Some(r#"{"a":1}"#));
    }
}
