//! The `http` action: POST the event to a webhook as a CloudEvent.

use std::sync::OnceLock;
use std::time::Duration;

use super::action::ActionError;
use crate::event::Event;

/// Default time a webhook gets to answer.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the event is put in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// The whole CloudEvents JSON as the body (`application/cloudevents+json`).
    #[default]
    Structured,
    /// The data as the body, the attributes as `ce-*` headers.
    Binary,
}

/// POST each event to a URL; 2xx is success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAction {
    /// Where to.
    pub url: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Structured or binary CloudEvents.
    pub mode: HttpMode,
    /// Time limit per request.
    pub timeout: Duration,
}

impl HttpAction {
    /// Structured mode, no extra headers, the default timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            headers: Vec::new(),
            mode: HttpMode::Structured,
            timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }

    /// Sends one event; `json` is its CloudEvents JSON (after any transform). Returns the
    /// response body when `keep_body` (a reply row's answer), at most
    /// [`crate::node::MAX_ANSWER`] bytes of it.
    pub(super) async fn post(
        &self,
        event: &Event,
        json: &str,
        keep_body: bool,
    ) -> Result<Vec<u8>, ActionError> {
        let client = CLIENT.get_or_init(crate::http_client::build);
        let mut request = client.post(&self.url).timeout(self.timeout);
        request = match self.mode {
            HttpMode::Structured => request
                .header("content-type", "application/cloudevents+json")
                .body(json.to_owned()),
            HttpMode::Binary => request
                .header("content-type", &event.content_type)
                .header("ce-specversion", crate::event::SPEC_VERSION)
                .header("ce-id", event.id.to_string())
                .header("ce-source", &*crate::event::peer_string(&event.source))
                .header("ce-type", &event.event_type)
                .header(
                    "ce-time",
                    humantime::format_rfc3339_micros(event.time).to_string(),
                )
                .header("ce-topic", event.topic.as_str())
                .header("ce-seq", event.seq.to_string())
                .body(event.data.clone()),
        };
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| ActionError::HttpSend {
            url: super::action::redact_url(&self.url),
            reason: innermost(&e),
        })?;
        let status = response.status();
        if status.is_success() {
            if !keep_body {
                return Ok(Vec::new());
            }
            let mut body = Vec::new();
            let mut response = response;
            while let Ok(Some(chunk)) = response.chunk().await {
                let room = (crate::node::MAX_ANSWER + 1).saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room <= chunk.len() {
                    break;
                }
            }
            return Ok(body);
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        Err(ActionError::HttpStatus {
            url: super::action::redact_url(&self.url),
            status: status.as_u16(),
            retry_after,
        })
    }
}

static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

/// Longest `Retry-After` honoured; a server asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let wait = match value.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate_until(value)?,
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

fn httpdate_until(value: &str) -> Option<Duration> {
    let at = humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT": reorder into RFC 3339.
        let parts: Vec<&str> = value.split_whitespace().collect();
        let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
            return None;
        };
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = MONTHS.iter().position(|m| m == month)? + 1;
        humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z")).ok()
    })?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn innermost(e: &reqwest::Error) -> String {
    let reason = crate::http_client::innermost(e);
    if e.is_timeout() {
        format!("no answer in time ({reason})")
    } else {
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
