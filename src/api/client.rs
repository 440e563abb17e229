//! A client for a running peer's HTTP API: what the CLI uses, and what any Rust program can
//! use to talk to a peer it did not start.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use serde::de::DeserializeOwned;

use super::types::{ApiError, HandlerInfo, PeerInfo, PublishRequest, Published, Status};
use crate::event::Tailed;
use crate::http_client::{self, innermost};

/// Time to wait for a peer's answer to a request (not for event streams).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest server-sent event accepted from the stream, as a bound on buffering.
const MAX_SSE_EVENT: usize = 4 * 1024 * 1024;

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing answered at the address.
    #[error("no meshbus peer answers at {addr} ({reason}); start one with `meshbus up`, or point --api or MESHBUS_API at a running peer")]
    NotRunning {
        /// The address tried.
        addr: SocketAddr,
        /// The connection error.
        reason: String,
    },
    /// The peer refused the request.
    #[error("the peer refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The peer's explanation.
        message: String,
    },
    /// Anything else on the way.
    #[error("request to {addr} failed: {reason}")]
    Http {
        /// The address tried.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// A connection to one peer's API.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` with every request.
    token: Option<String>,
}

impl Client {
    /// A client for the API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            http: http_client::build(),
            token: None,
        }
    }

    /// The same client, sending `token` with every request (the peer's `api.token`, or one
    /// from its config).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn error(&self, e: reqwest::Error) -> ClientError {
        let reason = innermost(&e);
        if e.is_connect() {
            ClientError::NotRunning {
                addr: self.addr,
                reason,
            }
        } else {
            ClientError::Http {
                addr: self.addr,
                reason,
            }
        }
    }

    /// The response if the peer took the request; its refusal, with the reason it gave,
    /// if not.
    async fn accepted(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ClientError> {
        let response = response.map_err(|e| self.error(e))?;
        let status = response.status();
        if !status.is_success() {
            let message = match response.json::<ApiError>().await {
                Ok(e) => e.error,
                Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
            };
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(response)
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ClientError> {
        let response = self.accepted(response).await?;
        response.json().await.map_err(|e| self.error(e))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .request(reqwest::Method::GET, path)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        self.answer(response).await
    }

    /// Publishes through the peer.
    pub async fn publish(&self, request: &PublishRequest) -> Result<Published, ClientError> {
        let response = self
            .request(reqwest::Method::POST, "/v1/publish")
            .timeout(REQUEST_TIMEOUT)
            .json(request)
            .send()
            .await;
        self.answer(response).await
    }

    /// Publishes many events in one request (see [`super::MAX_BATCH`]).
    pub async fn publish_batch(
        &self,
        requests: &[PublishRequest],
    ) -> Result<Vec<Published>, ClientError> {
        let response = self
            .request(reqwest::Method::POST, "/v1/publish/batch")
            .timeout(REQUEST_TIMEOUT)
            .json(requests)
            .send()
            .await;
        self.answer(response).await
    }

    /// The peer's connected meshbus peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        self.get("/v1/peers").await
    }

    /// The peer's status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/v1/status").await
    }

    /// Asks the peer to re-read its config's handler table; returns the new rows' names.
    pub async fn reload(&self) -> Result<Vec<String>, ClientError> {
        let response = self
            .request(reqwest::Method::POST, "/v1/reload")
            .json(&serde_json::json!({}))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        self.answer(response).await
    }

    /// The peer's handler table.
    pub async fn handlers(&self) -> Result<Vec<HandlerInfo>, ClientError> {
        self.get("/v1/handlers").await
    }

    /// Handler groups as the peer sees them.
    pub async fn groups(&self) -> Result<Vec<crate::proto::groups::GroupView>, ClientError> {
        self.get("/v1/groups").await
    }

    /// Asks the mesh through the peer: its answers as they come, then the line saying how
    /// the query ended.
    pub async fn query(
        &self,
        request: &super::QueryRequest,
    ) -> Result<impl Stream<Item = Result<super::QueryLine, ClientError>>, ClientError> {
        let response = self
            .request(reqwest::Method::POST, "/v1/query")
            .json(request)
            .send()
            .await;
        let response = self.accepted(response).await?;
        let addr = self.addr;
        let mut buf: Vec<u8> = Vec::new();
        let stream = response.bytes_stream().flat_map(move |chunk| {
            let mut items = Vec::new();
            match chunk {
                Ok(bytes) => {
                    buf.extend_from_slice(&bytes);
                    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=end).collect();
                        items.push(
                            serde_json::from_slice(&line).map_err(|e| ClientError::Http {
                                addr,
                                reason: format!("a query answer line is not valid: {e}"),
                            }),
                        );
                    }
                }
                Err(e) => items.push(Err(ClientError::Http {
                    addr,
                    reason: e.to_string(),
                })),
            }
            if buf.len() > MAX_QUERY_LINE {
                buf.clear();
                items.push(Err(ClientError::Http {
                    addr,
                    reason: format!("a query answer line is over {MAX_QUERY_LINE} bytes"),
                }));
            }
            futures::stream::iter(items)
        });
        Ok(stream)
    }

    /// Events arriving at the peer whose topic matches `pattern`, until the peer stops.
    pub async fn events(
        &self,
        pattern: &str,
    ) -> Result<impl Stream<Item = Result<Tailed<String>, ClientError>>, ClientError> {
        let response = self
            .request(reqwest::Method::GET, "/v1/events")
            .query(&[("pattern", pattern)])
            .send()
            .await;
        let response = self.accepted(response).await?;
        let addr = self.addr;
        let mut parser = SseParser::default();
        let stream = response.bytes_stream().flat_map(move |chunk| {
            let items: Vec<Result<Tailed<String>, ClientError>> = match chunk {
                Ok(bytes) => parser.push(&bytes),
                Err(e) => vec![Err(ClientError::Http {
                    addr,
                    reason: e.to_string(),
                })],
            };
            futures::stream::iter(items)
        });
        Ok(stream)
    }
}

/// Longest answer line read from `POST /v1/query`: an answer at its limit, escaped, with
/// its names.
const MAX_QUERY_LINE: usize = 8 * crate::node::MAX_ANSWER;

/// Splits a server-sent event stream into items; keeps at most one partial event.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<Result<Tailed<String>, ClientError>> {
        self.buf.extend_from_slice(bytes);
        let mut items = Vec::new();
        while let Some(end) = find(&self.buf, b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut kind = "message";
            let mut data = String::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            items.push(Ok(match kind {
                "missed" => Tailed::Missed(data.trim().parse().unwrap_or(0)),
                _ => Tailed::Event(data),
            }));
        }
        if self.buf.len() > MAX_SSE_EVENT {
            self.buf.clear();
            items.push(Ok(Tailed::Missed(1)));
        }
        items
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_chunks_and_kinds() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        let items = p.push(b":1}\n\n: keep-alive\n\nevent: missed\ndata: 3\n\ndata: x");
        let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items,
            [Tailed::Event("{\"a\":1}".into()), Tailed::Missed(3)]
        );
        let items: Vec<_> = p.push(b"\n\n").into_iter().map(Result::unwrap).collect();
        assert_eq!(items, [Tailed::Event("x".into())]);
    }
}
