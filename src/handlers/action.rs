//! What a handler row does with an event: log it, append it to a file, run a command, call a
//! webhook, or call Rust code. One run of one action on one event; retries, concurrency and
//! accounting are the row's business (`row.rs`).

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, info};

use crate::event::Event;

pub use super::file::FileAction;
pub use super::http::HttpAction;

/// Error type Rust handlers return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An async Rust function registered as a handler.
pub type RustHandler =
    Arc<dyn Fn(Arc<Event>) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// An async Rust function that answers queries ([`crate::node::NodeHandle::on_query`]).
pub type QueryHandler = Arc<
    dyn Fn(Arc<Event>) -> BoxFuture<'static, Result<serde_json::Value, BoxError>> + Send + Sync,
>;

/// Most bytes of an `exec` handler's stdout (and of its stderr) kept for the log; the rest is
/// read and thrown away so a chatty command never blocks on a full pipe.
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024;

/// How an `exec` action names its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Run with `sh -c`.
    Shell(String),
    /// Run directly: program and arguments, no shell.
    Argv(Vec<String>),
}

/// A command to run per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecAction {
    /// What to run.
    pub command: CommandLine,
    /// Working directory; the peer's when `None`.
    pub cwd: Option<PathBuf>,
    /// Time limit; the node's `exec_timeout` when `None`.
    pub timeout: Option<Duration>,
}

/// What a row does.
#[derive(Clone)]
#[non_exhaustive]
pub enum Action {
    /// Print a readable line on stdout.
    Log,
    /// Append the event as one CloudEvents JSON line.
    File(FileAction),
    /// Run a command with the event's JSON on stdin and `MESHBUS_*` variables set.
    Exec(ExecAction),
    /// POST the event to a URL.
    Http(HttpAction),
    /// Call Rust code.
    Rust(RustHandler),
    /// Call Rust code that answers queries with a JSON value.
    Query(QueryHandler),
}

impl Action {
    /// Whether the action has an output a query can be answered with.
    pub fn answers(&self) -> bool {
        matches!(self, Action::Exec(_) | Action::Http(_) | Action::Query(_))
    }
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Log => f.write_str("log"),
            Action::File(a) => write!(f, "file:{}", a.path.display()),
            Action::Exec(ExecAction {
                command: CommandLine::Shell(c),
                ..
            }) => write!(f, "exec:{c}"),
            Action::Exec(ExecAction {
                command: CommandLine::Argv(argv),
                ..
            }) => write!(f, "exec:{}", argv.join(" ")),
            Action::Http(h) => f.write_str(&redact_url(&h.url)),
            Action::Rust(_) => f.write_str("rust"),
            Action::Query(_) => f.write_str("rust (answers queries)"),
        }
    }
}

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// Not one of the known actions.
    #[error("unknown action `{0}`; expected one of: log, file:PATH, exec:COMMAND, http:URL")]
    Unknown(String),
    /// `file:` or `exec:` with nothing after it.
    #[error("action `{0}` needs a value after the colon")]
    Empty(String),
    /// Writing the file failed.
    #[error("cannot append to {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// The IO error, as text (one error answers for a whole batch).
        reason: String,
    },
    /// The command could not start.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("command exited with {status}; stderr: {stderr}")]
    Exit {
        /// Exit status.
        status: std::process::ExitStatus,
        /// The start of its stderr.
        stderr: String,
    },
    /// The command ran past its time limit; its process group was killed.
    #[error("command still running after {0:?}; killed it")]
    Timeout(Duration),
    /// Waiting for the command failed.
    #[error("waiting for the command failed: {0}")]
    Wait(std::io::Error),
    /// Writing to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    /// The webhook could not be reached or did not answer in time.
    #[error("POST {url}: {reason}")]
    HttpSend {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The webhook answered with an error status.
    #[error("POST {url}: {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// A jq filter or transform failed on this event.
    #[error("{0}")]
    Jq(String),
    /// A Rust handler returned an error.
    #[error("{0}")]
    Rust(BoxError),
}

impl ActionError {
    /// Whether trying again may help. Everything may, except a webhook's 4xx answer other
    /// than 408 and 429: the request itself is wrong, and would be wrong again.
    pub fn retryable(&self) -> bool {
        match self {
            ActionError::HttpStatus { status, .. } => {
                !(400..500).contains(status) || *status == 408 || *status == 429
            }
            ActionError::Jq(_) => false,
            _ => true,
        }
    }

    /// How long the other side asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ActionError::HttpStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl std::str::FromStr for Action {
    type Err = ActionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "log" {
            return Ok(Action::Log);
        }
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| ActionError::Unknown(s.to_owned()))?;
        if value.is_empty() && matches!(kind, "file" | "exec" | "http" | "https") {
            return Err(ActionError::Empty(s.to_owned()));
        }
        match kind {
            "file" => Ok(Action::File(FileAction::new(value))),
            "exec" => Ok(Action::Exec(ExecAction {
                command: CommandLine::Shell(value.to_owned()),
                cwd: None,
                timeout: None,
            })),
            "http" | "https" => Ok(Action::Http(HttpAction::new(s))),
            // Only the kind: what follows may be a URL with credentials.
            _ => Err(ActionError::Unknown(format!("{kind}:…"))),
        }
    }
}

/// `url` with its secrets hidden (user and password, every query value, the fragment),
/// for display and logs: webhook URLs often carry credentials. (A secret in the path, as
/// some chat webhooks have, is shown: put such URLs only in configs whose readers may see
/// them.)
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "<not a URL>".to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if !parsed.username().is_empty() {
        let _ = parsed.set_username("***");
    }
    parsed.set_fragment(None);
    if parsed.query().is_some() {
        let keys: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(keys.iter().map(|k| (k.as_str(), "***")));
    }
    parsed.to_string()
}

/// Shell words that are not programs on `PATH`.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "[", "alias", "break", "case", "cd", "command", "continue", "echo", "eval", "exec",
    "exit", "export", "false", "for", "if", "kill", "printf", "pwd", "read", "return", "set",
    "shift", "source", "test", "times", "trap", "true", "type", "ulimit", "umask", "unset",
    "until", "wait", "while", "{", "(", "!",
];

/// Whether `program` names an executable file: as a path when it has a `/`, else on `PATH`.
fn find_program(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable = |path: &std::path::Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return if runnable(std::path::Path::new(program)) {
            Ok(())
        } else {
            Err(format!(
                "exec program {program} does not exist or is not executable"
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("exec program `{program}` is not on PATH"))
    }
}

impl Action {
    /// Checks what can be known before the first event, so that a row that would fail on
    /// every event is refused when the table is loaded instead: a file path that is a
    /// directory, an exec program that is not there or a cwd that is not a directory, a
    /// webhook URL without a host or with a header that cannot be sent.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Action::File(a) if a.path.is_dir() => {
                Err(format!("file path {} is a directory", a.path.display()))
            }
            Action::Exec(x) => {
                if let Some(cwd) = &x.cwd {
                    if !cwd.is_dir() {
                        return Err(format!("exec cwd {} is not a directory", cwd.display()));
                    }
                }
                let program = match &x.command {
                    CommandLine::Argv(argv) => argv.first().map(String::as_str),
                    // The first word of a plain command line, unless the shell runs it itself.
                    CommandLine::Shell(line) => line.split_whitespace().next().filter(|w| {
                        !SHELL_WORDS.contains(w)
                            && !w.contains('=')
                            && w.chars()
                                .all(|c| c.is_alphanumeric() || "-_./+".contains(c))
                    }),
                };
                program.map_or(Ok(()), find_program)
            }
            Action::Http(h) => {
                let shown = redact_url(&h.url);
                if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                    return Err(format!("`{shown}` is not an http:// or https:// URL"));
                }
                let url = reqwest::Url::parse(&h.url)
                    .map_err(|e| format!("the webhook URL is not a URL: {e}"))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(format!("`{shown}` has no host"));
                }
                for (name, value) in &h.headers {
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        format!("header name {name:?} is not a valid HTTP header name")
                    })?;
                    reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                        format!(
                            "header {name}: its value is not valid in HTTP (control characters?)"
                        )
                    })?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Prints the event's readable line.
pub(super) async fn log(events: &[Arc<Event>]) -> Result<(), ActionError> {
    let mut out = String::new();
    for event in events {
        out.push_str(&event.to_cloudevent().summary_line());
        out.push('\n');
    }
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(out.as_bytes())
        .await
        .map_err(ActionError::Stdout)?;
    stdout.flush().await.map_err(ActionError::Stdout)
}

/// Runs the command once for `event`, with `input` (its JSON line) on stdin; returns its
/// stdout (the first [`EXEC_OUTPUT_LIMIT`] bytes).
pub(super) async fn exec(
    action: &ExecAction,
    default_timeout: Duration,
    event: &Event,
    input: &str,
) -> Result<String, ActionError> {
    let timeout = action.timeout.unwrap_or(default_timeout);
    let (mut cmd, shown) = match &action.command {
        CommandLine::Shell(line) => {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c").arg(line);
            (cmd, format!("sh -c {line}"))
        }
        CommandLine::Argv(argv) => {
            let (program, args) = argv.split_first().ok_or_else(|| ActionError::Spawn {
                command: String::new(),
                source: std::io::Error::other("empty command"),
            })?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            (cmd, argv.join(" "))
        }
    };
    if let Some(cwd) = &action.cwd {
        cmd.current_dir(cwd);
    }
    cmd.env("MESHBUS_TOPIC", event.topic.as_str())
        .env("MESHBUS_EVENT_ID", event.id.to_string())
        .env("MESHBUS_EVENT_TYPE", &event.event_type)
        .env("MESHBUS_SOURCE", &*crate::event::peer_string(&event.source))
        .env("MESHBUS_SEQ", event.seq.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ActionError::Spawn {
        command: shown,
        source,
    })?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    // If this future is dropped (shutdown cancels a handler), the whole group goes too.
    let mut group = KillGroupOnDrop(pid);
    let (mut stdin, stdout, stderr) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let run = async {
        let feed = async {
            if let Some(stdin) = stdin.as_mut() {
                // A command that does not read its input closes the pipe: that is fine.
                let _ = stdin.write_all(input.as_bytes()).await;
            }
            drop(stdin.take());
        };
        let (_, out, err, status) = tokio::join!(
            feed,
            read_bounded(stdout),
            read_bounded(stderr),
            child.wait()
        );
        (out, err, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((out, err, status)) => {
            group.0 = None;
            let status = status.map_err(ActionError::Wait)?;
            if !out.is_empty() && !crate::event::is_query(event) {
                info!(event = %event.id, output = %out.trim_end(), "handler output");
            }
            if status.success() {
                if !err.is_empty() {
                    debug!(event = %event.id, stderr = %err.trim_end(), "handler stderr");
                }
                Ok(out)
            } else {
                Err(ActionError::Exit {
                    status,
                    stderr: err.trim_end().to_owned(),
                })
            }
        }
        Err(_) => {
            // The whole group: `sh -c` may have started children that hold the pipes.
            drop(group);
            let _ = child.wait().await;
            Err(ActionError::Timeout(timeout))
        }
    }
}

/// SIGKILLs a process group when dropped, unless disarmed (set to `None`).
struct KillGroupOnDrop(Option<i32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads a pipe to its end, keeping the first [`EXEC_OUTPUT_LIMIT`] bytes.
async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_print_back() {
        for s in [
            "log",
            "file:/tmp/x.jsonl",
            "exec:echo hi: there",
            "http://127.0.0.1:9/x",
        ] {
            assert_eq!(s.parse::<Action>().unwrap().to_string(), s);
        }
        assert!(matches!(
            "file:".parse::<Action>(),
            Err(ActionError::Empty(_))
        ));
        assert!(matches!(
            "mail:x".parse::<Action>(),
            Err(ActionError::Unknown(_))
        ));
        assert!(matches!(
            "loud".parse::<Action>(),
            Err(ActionError::Unknown(_))
        ));
    }

    #[test]
    fn only_some_failures_are_worth_retrying() {
        let status = |s| ActionError::HttpStatus {
            url: "u".into(),
            status: s,
            retry_after: None,
        };
        assert!(status(500).retryable());
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(400).retryable());
        assert!(!status(404).retryable());
        assert!(ActionError::Timeout(Duration::from_secs(1)).retryable());
    }
}
