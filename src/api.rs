//! The HTTP control API a running peer serves (loopback by default), which the CLI uses.
//!
//! | method and path            | body / query                           | answer                    |
//! |----------------------------|----------------------------------------|---------------------------|
//! | `POST /v1/publish`         | [`PublishRequest`] JSON                | [`Published`] JSON        |
//! | `POST /v1/publish/batch`   | JSON array of [`PublishRequest`]       | array of [`Published`]    |
//! | `GET /v1/events?pattern=P` | pattern defaults to `**`               | server-sent events        |
//! | `GET /v1/peers`            |                                        | [`PeerInfo`] JSON array   |
//! | `GET /v1/status`           |                                        | [`Status`] JSON           |
//! | `GET /v1/handlers`         |                                        | [`HandlerInfo`] JSON array|
//! | `POST /v1/reload`          |                                        | names of the new rows     |
//!
//! A batch is checked whole before anything is published (a bad entry refuses the batch and
//! names its index), then published in one go, so the node packs it into few messages. At
//! most [`MAX_BATCH`] entries per request.
//!
//! Errors are `{"error": "…"}` with a 4xx status for bad input (400 invalid, 413 too large)
//! and 503 when the node cannot take the request. `/v1/events` sends each matching event as
//! an SSE `data:` line holding its CloudEvents JSON, and `event: missed` with a count when the
//! subscriber fell behind and events went by unseen.
//!
//! [`Published`]: crate::node::Published
//! [`PeerInfo`]: crate::node::PeerInfo
//! [`Status`]: crate::node::Status
//! [`HandlerInfo`]: crate::handlers::HandlerInfo

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::event::{self, Payload};
use crate::node::{NodeError, NodeHandle, Tailed};
use crate::topic::Pattern;

/// Time the API gets at shutdown to finish requests before they are cut.
const API_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Most events in one `POST /v1/publish/batch`.
pub const MAX_BATCH: usize = 10_000;

/// How often an idle event stream sends a keep-alive comment.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

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

impl PublishRequest {
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

struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Event(event::EventError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Event(_) | NodeError::Dial { .. } => StatusCode::BAD_REQUEST,
            NodeError::InBatch { error, .. } => match **error {
                NodeError::Event(event::EventError::TooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                _ => StatusCode::BAD_REQUEST,
            },
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(status, e.to_string())
    }
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    /// Flips at shutdown so open event streams end and graceful shutdown can finish.
    closing: watch::Receiver<bool>,
}

/// A running API server.
pub struct ApiServer {
    addr: SocketAddr,
    closing: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Binds `addr` and serves the API for `node`.
    pub async fn start(addr: SocketAddr, node: NodeHandle) -> Result<ApiServer, NodeError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| NodeError::Api { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| NodeError::Api { addr, source })?;
        let (closing, closing_rx) = watch::channel(false);
        // Room for a full batch of small events, or one maximal event in base64.
        let body_limit = (node.status().await?.max_event_size * 2 + 64 * 1024).max(32 << 20);
        let app = Router::new()
            .route("/v1/publish", post(publish))
            .route("/v1/publish/batch", post(publish_batch))
            .route("/v1/events", get(events))
            .route("/v1/peers", get(peers))
            .route("/v1/status", get(status))
            .route("/v1/handlers", get(handlers))
            .route("/v1/reload", post(reload))
            .layer(DefaultBodyLimit::max(body_limit))
            .with_state(AppState {
                node,
                closing: closing_rx.clone(),
            });
        let mut shutdown = closing_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|c| *c).await;
            });
            if let Err(e) = serve.await {
                warn!(error = %e, "API server stopped");
            }
        });
        info!(addr = %local, "API listening");
        Ok(ApiServer {
            addr: local,
            closing,
            task,
        })
    }

    /// The bound address (useful when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends event streams, and waits briefly for requests in flight.
    pub async fn shutdown(self) {
        let _ = self.closing.send(true);
        let mut task = self.task;
        if tokio::time::timeout(API_SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn publish(
    State(state): State<AppState>,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::node::Published>, Failure> {
    let Json(request) = body.map_err(|e| json_failure(e, "{\"topic\": …, \"data\": …}"))?;
    let payload = request
        .payload()
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let published = state
        .node
        .publish(&request.topic, request.event_type.as_deref(), payload)
        .await?;
    Ok(Json(published))
}

fn json_failure(e: axum::extract::rejection::JsonRejection, expected: &str) -> Failure {
    let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    Failure(status, format!("{}; expected {expected}", e.body_text()))
}

async fn publish_batch(
    State(state): State<AppState>,
    body: Result<Json<Vec<PublishRequest>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<crate::node::Published>>, Failure> {
    let Json(requests) =
        body.map_err(|e| json_failure(e, "a JSON array of {\"topic\": …, \"data\": …}"))?;
    if requests.len() > MAX_BATCH {
        return Err(Failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} events in one batch; at most {MAX_BATCH}",
                requests.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let payload = request
            .payload()
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("event {i}: {e}")))?;
        events.push((request.topic, request.event_type, payload));
    }
    let out = state.node.publish_many(events).await?;
    Ok(Json(out))
}

#[derive(Deserialize)]
struct EventsQuery {
    pattern: Option<String>,
}

async fn events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, Failure> {
    let pattern = match query.pattern {
        Some(p) => Pattern::new(p).map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?,
        None => Pattern::all(),
    };
    let mut closing = state.closing.clone();
    let stream = state
        .node
        .subscribe(pattern)
        .map(|item| {
            Ok(match item {
                Tailed::Event(event) => sse::Event::default().data(event.to_json_line()),
                Tailed::Missed(n) => sse::Event::default().event("missed").data(n.to_string()),
            })
        })
        .take_until(async move {
            let _ = closing.wait_for(|c| *c).await;
        });
    Ok(Sse::new(stream).keep_alive(sse::KeepAlive::new().interval(SSE_KEEP_ALIVE)))
}

async fn peers(State(state): State<AppState>) -> Result<Json<Vec<crate::node::PeerInfo>>, Failure> {
    Ok(Json(state.node.peers().await?))
}

async fn status(State(state): State<AppState>) -> Result<Json<crate::node::Status>, Failure> {
    Ok(Json(state.node.status().await?))
}

async fn reload(State(state): State<AppState>) -> Result<Json<Vec<String>>, Failure> {
    state
        .node
        .reload()
        .map(Json)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn handlers(State(state): State<AppState>) -> Json<Vec<crate::handlers::HandlerInfo>> {
    Json(state.node.handlers())
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
