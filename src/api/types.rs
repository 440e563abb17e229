//! What the HTTP API takes and answers, as JSON: the request and error types defined here,
//! and the node's own answer types re-exported, so a client needs this module alone.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::handlers::HandlerInfo;
pub use crate::node::{PeerInfo, Published, Status};

use crate::event::{self, Payload};

/// A publish request: a CloudEvents-like JSON object.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PublishRequest {
    /// Topic to publish on.
    pub topic: String,
    /// Event type; defaults to the topic.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Media type; `application/json` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// The data: any JSON for JSON content, a string for `text/*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Binary data, base64-encoded, instead of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

/// `POST /v1/query`: a query and how long to wait for answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryRequest {
    /// Topic to ask on.
    pub topic: String,
    /// Media type; `application/json` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// The query's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// How long to wait for answers, in milliseconds (2,000 unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Ask only this group's reply rows (one answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl QueryRequest {
    /// The query's payload, read like a publish's.
    pub fn payload(&self) -> Result<Payload, String> {
        PublishRequest {
            topic: self.topic.clone(),
            datacontenttype: self.datacontenttype.clone(),
            data: self.data.clone(),
            ..PublishRequest::default()
        }
        .payload()
    }
}

/// One line of `POST /v1/query`'s streamed answer (newline-delimited JSON): an answer, or
/// the last line, which says how the query ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum QueryLine {
    /// How it ended.
    Done {
        /// Always true.
        done: bool,
        /// The query event's id.
        id: String,
        /// Mesh members connected when it was asked.
        asked: usize,
        /// Answers that came.
        answers: usize,
    },
    /// A peer's answer.
    Answer(crate::node::QueryAnswer),
}

impl PublishRequest {
    /// A request for `payload` (JSON, text, or other bytes as base64), or for `null` data.
    pub fn new(
        topic: String,
        event_type: Option<String>,
        payload: Option<&Payload>,
    ) -> Result<Self, serde_json::Error> {
        let mut request = PublishRequest {
            topic,
            event_type,
            ..PublishRequest::default()
        };
        let Some(payload) = payload else {
            return Ok(request);
        };
        request.datacontenttype = Some(payload.content_type.clone());
        if event::is_json(&payload.content_type) {
            match std::str::from_utf8(&payload.data) {
                Ok(text) => request.data = Some(RawValue::from_string(text.to_owned())?),
                Err(_) => request.data_base64 = Some(base64(&payload.data)),
            }
        } else if event::is_text(&payload.content_type) {
            let text = String::from_utf8_lossy(&payload.data);
            request.data = Some(serde_json::value::to_raw_value(&text)?);
        } else {
            request.data_base64 = Some(base64(&payload.data));
        }
        Ok(request)
    }

    /// The payload this request describes, or why it describes none.
    pub fn payload(&self) -> Result<Payload, String> {
        if let Some(b64) = &self.data_base64 {
            if self.data.is_some() {
                return Err("give either `data` or `data_base64`, not both".into());
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("`data_base64` is not valid base64: {e}"))?;
            let ct = self
                .datacontenttype
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into());
            return Ok(Payload::bytes(ct, bytes));
        }
        let raw = self.data.as_ref().map(|d| d.get()).unwrap_or("null");
        match &self.datacontenttype {
            Some(ct) if event::is_text(ct) => {
                let text: String = serde_json::from_str(raw).map_err(|_| {
                    format!("datacontenttype `{ct}` needs `data` to be a JSON string")
                })?;
                Ok(Payload::bytes(ct.clone(), text))
            }
            Some(ct) if !event::is_json(ct) => Err(format!(
                "datacontenttype `{ct}` is neither JSON nor text: send the bytes as `data_base64`"
            )),
            ct => Ok(Payload::bytes(
                ct.clone().unwrap_or_else(|| event::JSON.into()),
                raw.as_bytes().to_vec(),
            )),
        }
    }
}

/// The answer to a failed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> PublishRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn payloads_follow_the_content_type() {
        let p = req(r#"{"topic":"a","data":{"id":42}}"#).payload().unwrap();
        assert_eq!(p.content_type, event::JSON);
        assert_eq!(p.data, r#"{"id":42}"#);
        let p = req(r#"{"topic":"a","datacontenttype":"text/plain","data":"hi"}"#)
            .payload()
            .unwrap();
        assert_eq!(p.data, "hi");
        let p = req(r#"{"topic":"a","data_base64":"AAE=","datacontenttype":"image/png"}"#)
            .payload()
            .unwrap();
        assert_eq!(p.data.as_ref(), &[0, 1]);
        assert_eq!(req(r#"{"topic":"a"}"#).payload().unwrap().data, "null");
    }

    #[test]
    fn requests_made_from_payloads_give_the_same_payloads_back() {
        for payload in [
            Payload::guess(r#"{"id":42}"#),
            Payload::guess("hello world"),
            Payload::bytes("image/png", vec![0u8, 159, 146]),
        ] {
            let request = PublishRequest::new("a".into(), None, Some(&payload)).unwrap();
            assert_eq!(request.payload().unwrap(), payload);
        }
        let empty = PublishRequest::new("a".into(), None, None).unwrap();
        assert_eq!(empty.payload().unwrap().data, "null");
    }

    #[test]
    fn inconsistent_payloads_are_refused_with_a_reason() {
        let e = req(r#"{"topic":"a","datacontenttype":"text/plain","data":5}"#)
            .payload()
            .unwrap_err();
        assert!(e.contains("JSON string"), "{e}");
        let e = req(r#"{"topic":"a","data_base64":"!!"}"#)
            .payload()
            .unwrap_err();
        assert!(e.contains("base64"), "{e}");
        let e = req(r#"{"topic":"a","datacontenttype":"image/png","data":1}"#)
            .payload()
            .unwrap_err();
        assert!(e.contains("data_base64"), "{e}");
    }
}
