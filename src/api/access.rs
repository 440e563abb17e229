//! Who may call the API, what each caller may do, and what a browser may not do to it.
//!
//! Every request carries `Authorization: Bearer TOKEN`. A peer's own token, with full access,
//! is `api.token` in its data directory (mode 0600, made at the first start); the CLI reads
//! it from there itself. The config file may add tokens limited to reading (`peers`,
//! `status`, `handlers`, `tail`) or to publishing on some topic patterns.
//!
//! Browsers are kept out twice over, so that neither DNS rebinding nor a cross-site form can
//! reach a loopback API: a request whose `Host` is not a loopback name is refused when the
//! API listens on loopback, any request a web page sends (it carries `Origin`, or
//! `Sec-Fetch-Site` other than `none`) is refused, and every POST must be
//! `application/json`, which no plain form can send.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use base64::Engine as _;

use super::{AppState, Failure};
use crate::files;
use crate::topic::{Pattern, Topic};

/// File name of the peer's own API token inside its data directory.
pub const TOKEN_FILE: &str = "api.token";

/// Environment variable the CLI takes a token from (before the data directory's).
pub const TOKEN_ENV: &str = "MESHBUS_TOKEN";

/// Shortest token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest a publish request waits for its turn before it is refused.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest token read or accepted.
const MAX_TOKEN_LEN: usize = 256;

/// What a token lets its holder do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// Everything: publish, reload, read.
    Full,
    /// Read only: peers, status, handlers, the event stream.
    Read,
    /// Read, and publish on topics matching these patterns.
    Publish(Vec<Pattern>),
}

impl Scope {
    /// Whether this scope may publish on `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Scope::Full => true,
            Scope::Read => false,
            Scope::Publish(patterns) => Topic::new(topic)
                .map(|t| patterns.iter().any(|p| p.matches(&t)))
                .unwrap_or(false),
        }
    }
}

/// One token: a name for messages, the secret, and its scope.
#[derive(Clone)]
pub struct Token {
    /// Shown in logs and errors instead of the secret.
    pub name: String,
    secret: String,
    /// What it allows.
    pub scope: Scope,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Too short, too long, or not printable.
    #[error("token {name:?}: a token is {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} printable ASCII characters without spaces")]
    Bad {
        /// The token's name.
        name: String,
    },
    /// The token file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

impl Token {
    /// A token named `name` with `secret`.
    pub fn new(name: &str, secret: &str, scope: Scope) -> Result<Token, TokenError> {
        let ok = (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&secret.len())
            && secret.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(TokenError::Bad { name: name.into() });
        }
        Ok(Token {
            name: name.into(),
            secret: secret.into(),
            scope,
        })
    }

    /// A new random full-access token.
    pub fn generate(name: &str) -> Token {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random source works");
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Token {
            name: name.into(),
            secret,
            scope: Scope::Full,
        }
    }

    /// The secret, for a client to send.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The full-access token in `dir` (`api.token`), made there the first time.
    pub fn load_or_create(dir: &Path) -> Result<Token, TokenError> {
        let path = dir.join(TOKEN_FILE);
        let io = |source| TokenError::Io {
            path: path.clone(),
            source,
        };
        match read_token_file(&path) {
            Ok(secret) => Token::new("owner", &secret, Scope::Full),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = Token::generate("owner");
                files::write_private(&path, token.secret.as_bytes()).map_err(io)?;
                Ok(token)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// The token stored in a token file (trimmed), read with a bound.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    Ok(files::read_text_limited(path, MAX_TOKEN_LEN + 2)?
        .trim()
        .to_owned())
}

/// The tokens an API accepts.
#[derive(Clone, Debug)]
pub struct Access {
    tokens: Vec<Token>,
}

impl Access {
    /// Accepts exactly these tokens.
    pub fn new(tokens: Vec<Token>) -> Access {
        Access { tokens }
    }

    /// The token whose secret is `presented`, compared in constant time.
    fn find(&self, presented: &str) -> Option<&Token> {
        self.tokens
            .iter()
            .find(|t| same(t.secret.as_bytes(), presented.as_bytes()))
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a `Host` header names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    matches!(name.to_ascii_lowercase().as_str(), "localhost" | "[::1]")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    Failure(status, message.into()).into_response()
}

/// Checks who is calling and whether they may; then runs the request with its [`Scope`] in
/// the request's extensions (the publish handlers check topics against it).
pub(super) async fn check(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if state.addr.ip().is_loopback() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !loopback_host(host) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("this API listens on loopback and answers only to a loopback Host, not {host:?}"),
            );
        }
    }
    let from_page = headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none");
    if from_page {
        return refuse(StatusCode::FORBIDDEN, "requests from web pages are refused");
    }
    if request.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            });
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a POST must have Content-Type: application/json",
            );
        }
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!("this API needs a token (Authorization: Bearer TOKEN); the peer's own is {TOKEN_FILE} in its data directory, which the CLI reads with --data-dir or {}", crate::config::DATA_DIR_ENV),
        );
    };
    let Some(token) = state.access.find(presented.trim()) else {
        return refuse(StatusCode::UNAUTHORIZED, "unknown token");
    };
    let path = request.uri().path();
    let allowed = match (&token.scope, request.method() == Method::GET) {
        (_, true) | (Scope::Full, false) => true,
        // A query is a publish that waits for answers.
        (Scope::Publish(_), false) => path.starts_with("/v1/publish") || path == "/v1/query",
        (Scope::Read, false) => false,
    };
    if !allowed {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("token {:?} may not {} {path}", token.name, request.method()),
        );
    }
    let token = token.clone();
    let publishing = request.uri().path().starts_with("/v1/publish");
    request.extensions_mut().insert(token);
    if publishing {
        // Held while the body is read and published: bounds the memory bodies take.
        let slot =
            tokio::time::timeout(PUBLISH_WAIT, state.publishing.clone().acquire_owned()).await;
        let Ok(Ok(_slot)) = slot else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many publish requests at once; try again",
            );
        };
        return next.run(request).await;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for ok in [
            "localhost",
            "localhost:7420",
            "127.0.0.1:7420",
            "[::1]:7420",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7420",
            "10.0.0.1:7420",
            "",
            "localhost.evil.example",
            "127.evil.example",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn scopes_limit_publishing_by_pattern() {
        let scope = Scope::Publish(vec![Pattern::new("orders.**").unwrap()]);
        assert!(scope.may_publish("orders.created"));
        assert!(!scope.may_publish("billing.x"));
        assert!(!Scope::Read.may_publish("orders.created"));
        assert!(Scope::Full.may_publish("anything"));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused_and_secrets_stay_out_of_debug() {
        assert!(Token::new("t", "short", Scope::Read).is_err());
        assert!(Token::new("t", "has a space in it ....", Scope::Read).is_err());
        let token = Token::generate("owner");
        assert!(!format!("{token:?}").contains(token.secret()));
        let access = Access::new(vec![token.clone()]);
        assert!(access.find(token.secret()).is_some());
        assert!(access.find(&token.secret()[1..]).is_none());
    }
}
