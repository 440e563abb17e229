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
//! | `GET /v1/groups`           |                                        | [`GroupView`] JSON array  |
//! | `POST /v1/query`           | [`QueryRequest`] JSON                  | [`QueryLine`] JSON lines  |
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
//! Whoever owns a node serves its API: [`serve`] takes a bound listener, the node's handle
//! and a shutdown future (so tests bind port 0); [`Server`] runs it as a task. [`types`] holds
//! what goes over the wire and [`client`] talks to it from Rust.
//!
//! [`Published`]: types::Published
//! [`PeerInfo`]: types::PeerInfo
//! [`Status`]: types::Status
//! [`HandlerInfo`]: types::HandlerInfo
//! [`PublishRequest`]: types::PublishRequest
//! [`QueryRequest`]: types::QueryRequest
//! [`QueryLine`]: types::QueryLine
//!
//! `/v1/query` publishes a query and streams the answers as they arrive, one JSON object per
//! line, until its `timeout_ms` (or, with a `group`, the first answer); its last line is
//! `{"done": true, "id": …, "asked": N, "answers": k}`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::{info, warn};

use crate::event::{EventError, Tailed};
use crate::node::{NodeError, NodeHandle};
use crate::topic::Pattern;

pub mod access;
pub mod client;
pub mod listener;
pub mod types;
pub mod view;

pub use access::{Access, Scope, Token};
pub use client::{Client, ClientError};
pub use types::{ApiError, PublishRequest, QueryLine, QueryRequest};

use crate::node::QueryOptions;
use crate::proto::groups::GroupView;
use types::{HandlerInfo, PeerInfo, Published, Status};

/// Time the API gets at shutdown to finish requests before they are cut.
pub const API_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Most events in one `POST /v1/publish/batch`.
pub const MAX_BATCH: usize = 10_000;

/// How often an idle event stream sends a keep-alive comment.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Smallest request body accepted whatever `max_event_size` is: room for a full batch of
/// small events.
const MIN_BODY_LIMIT: usize = 32 << 20;

/// Bounds on what the API's callers may hold at once.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub connections: usize,
    /// A connection with no traffic either way for this long is closed (event streams send a
    /// keep-alive every 15 s, so only a stuck one is).
    pub idle: Duration,
    /// `/v1/events` streams open at once; more are refused (each costs the node a copy of
    /// every event).
    pub streams: usize,
    /// Publish requests read and run at once; more wait before their body is read, so
    /// memory is bounded by this many request bodies (and their parse). Publishing itself
    /// goes one round at a time in the node, so one costs little speed.
    pub publishing: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 256,
            idle: Duration::from_secs(60),
            streams: 64,
            publishing: 1,
        }
    }
}

/// A refused request: its status and the reason.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// Every node error's HTTP status, in one place: the caller's mistakes are 4xx, a node
/// that cannot take the request now is 503.
fn status_of(e: &NodeError) -> StatusCode {
    match e {
        NodeError::Event(EventError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        NodeError::Event(EventError::Forbidden(_)) => StatusCode::FORBIDDEN,
        NodeError::InBatch { error, .. } => status_of(error),
        NodeError::NotStored(_) => StatusCode::INSUFFICIENT_STORAGE,
        NodeError::Event(_)
        | NodeError::Dial { .. }
        | NodeError::Encode(_)
        | NodeError::Table(_)
        | NodeError::Reload(_)
        | NodeError::BadQuery(_)
        | NodeError::NoReloadSource => StatusCode::BAD_REQUEST,
        NodeError::TooManyQueries(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Self {
        Failure(status_of(&e), e.to_string())
    }
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    /// Where we listen, for `status` (and whether `Host` must be loopback).
    addr: SocketAddr,
    /// Who may call.
    access: Arc<Access>,
    /// Room for more event streams.
    streams: Arc<Semaphore>,
    /// Room for more publish requests.
    publishing: Arc<Semaphore>,
    /// The bound on `streams`, for the message.
    max_streams: usize,
    /// Flips at shutdown so open event streams end and graceful shutdown can finish.
    closing: watch::Receiver<bool>,
}

/// Serves the API for `node` on `listener` to holders of `access`'s tokens, within
/// `limits`, until `shutdown` completes; then stops accepting, ends event streams, and
/// returns once requests in flight are done.
pub async fn serve(
    listener: TcpListener,
    node: NodeHandle,
    access: Access,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let (closing, closing_rx) = watch::channel(false);
    // Room for a full batch of small events, or one maximal event in base64.
    let body_limit = (node.max_event_size() * 2 + 64 * 1024).max(MIN_BODY_LIMIT);
    let state = AppState {
        node,
        addr,
        access: Arc::new(access),
        streams: Arc::new(Semaphore::new(limits.streams)),
        publishing: Arc::new(Semaphore::new(limits.publishing)),
        max_streams: limits.streams,
        closing: closing_rx,
    };
    let app = Router::new()
        .route("/v1/publish", post(publish))
        .route("/v1/publish/batch", post(publish_batch))
        .route("/v1/events", get(events))
        .route("/v1/peers", get(peers))
        .route("/v1/status", get(status))
        .route("/v1/handlers", get(handlers))
        .route("/v1/groups", get(groups))
        .route("/v1/query", post(query))
        .route("/v1/reload", post(reload))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::check,
        ))
        .with_state(state);
    info!(%addr, "API listening");
    let listener = listener::Bounded::new(listener, limits.connections, limits.idle);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = closing.send(true);
        })
        .await
}

/// The API served in a task of its own, for an owner that wants to stop it later.
pub struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves the API for `node` on `listener` to holders of `access`'s tokens, in a new
    /// task, with the default [`Limits`].
    pub fn spawn(
        listener: TcpListener,
        node: NodeHandle,
        access: Access,
    ) -> std::io::Result<Server> {
        Server::spawn_with(listener, node, access, Limits::default())
    }

    /// [`Server::spawn`] with other limits.
    pub fn spawn_with(
        listener: TcpListener,
        node: NodeHandle,
        access: Access,
        limits: Limits,
    ) -> std::io::Result<Server> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = serve(listener, node, access, limits, shutdown).await {
                warn!(error = %e, "API server stopped");
            }
        });
        Ok(Server { addr, stop, task })
    }

    /// The bound address (useful when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends event streams, and waits up to [`API_SHUTDOWN_GRACE`] for
    /// requests in flight.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(API_SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Refuses a topic the caller's token may not publish on.
fn may_publish(token: &Token, topic: &str) -> Result<(), Failure> {
    if token.scope.may_publish(topic) {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::FORBIDDEN,
            format!("token {:?} may not publish on {topic:?}", token.name),
        ))
    }
}

async fn publish(
    State(state): State<AppState>,
    Extension(token): Extension<Token>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<Published>, Failure> {
    let Json(request) = body.map_err(|e| json_failure(e, "{\"topic\": …, \"data\": …}"))?;
    may_publish(&token, &request.topic)?;
    let payload = request
        .payload()
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let published = state
        .node
        .publish(&request.topic, request.event_type.as_deref(), payload)
        .await?;
    Ok(Json(published))
}

fn json_failure(e: JsonRejection, expected: &str) -> Failure {
    let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    Failure(status, format!("{}; expected {expected}", e.body_text()))
}

async fn publish_batch(
    State(state): State<AppState>,
    Extension(token): Extension<Token>,
    body: Result<Json<Vec<PublishRequest>>, JsonRejection>,
) -> Result<Json<Vec<Published>>, Failure> {
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
        may_publish(&token, &request.topic)
            .map_err(|Failure(s, e)| Failure(s, format!("event {i}: {e}")))?;
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
    let slot = state.streams.clone().try_acquire_owned().map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} event streams are open already, the most this peer serves; close one",
                state.max_streams
            ),
        )
    })?;
    let mut closing = state.closing.clone();
    let stream = state
        .node
        .subscribe(pattern)
        .map(move |item| {
            let _slot = &slot;
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

async fn peers(State(state): State<AppState>) -> Result<Json<Vec<PeerInfo>>, Failure> {
    Ok(Json(state.node.peers().await?))
}

async fn status(State(state): State<AppState>) -> Result<Json<Status>, Failure> {
    let mut status = state.node.status().await?;
    status.api = Some(state.addr.to_string());
    Ok(Json(status))
}

async fn reload(State(state): State<AppState>) -> Result<Json<Vec<String>>, Failure> {
    Ok(Json(state.node.reload()?))
}

async fn handlers(State(state): State<AppState>) -> Json<Vec<HandlerInfo>> {
    Json(state.node.handlers())
}

async fn groups(State(state): State<AppState>) -> Result<Json<Vec<GroupView>>, Failure> {
    Ok(Json(state.node.groups().await?))
}

/// Asks the mesh and streams the answers as they come, one JSON object per line, then a
/// last line `{"done": true, …}`. With a group, it ends at the first answer.
async fn query(
    State(state): State<AppState>,
    Extension(token): Extension<Token>,
    body: Result<Json<QueryRequest>, JsonRejection>,
) -> Result<Response, Failure> {
    let Json(request) = body.map_err(|e| json_failure(e, "{\"topic\": …, \"data\": …}"))?;
    may_publish(&token, &request.topic)?;
    let payload = request
        .payload()
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let timeout = Duration::from_millis(request.timeout_ms.unwrap_or(2_000));
    let one = request.group.is_some();
    let slot = state.streams.clone().try_acquire_owned().map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} streams are open already, the most this peer serves; close one",
                state.max_streams
            ),
        )
    })?;
    let options = QueryOptions {
        timeout,
        group: request.group,
    };
    let mut asked = state.node.query(&request.topic, payload, options).await?;
    let lines = async_stream_lines(move |tx| async move {
        let _slot = slot;
        let mut n = 0;
        loop {
            // A caller that went away frees its stream and its query at once.
            let answer = tokio::select! {
                answer = asked.next() => answer,
                _ = tx.closed() => return,
            };
            let Some(answer) = answer else { break };
            n += 1;
            if tx.send(QueryLine::Answer(answer)).await.is_err() || one {
                break;
            }
        }
        let _ = tx
            .send(QueryLine::Done {
                done: true,
                id: asked.id.clone(),
                asked: asked.asked,
                answers: n,
            })
            .await;
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// A stream of JSON lines that `produce` sends.
fn async_stream_lines<F, Fut>(produce: F) -> impl Stream<Item = Result<String, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<QueryLine>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(|line| {
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        Ok(text)
    })
}
