//! What a handler row does with an event: log it, append it to a file, run a command, or
//! call Rust code.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, info};

use crate::event::Event;

/// Error type Rust handlers return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An async Rust function registered as a handler.
pub type RustHandler =
    Arc<dyn Fn(Arc<Event>) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// Most bytes of an `exec` handler's stdout (and of its stderr) kept for the log; the rest is
/// read and thrown away so a chatty command never blocks on a full pipe.
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024;

/// What a row does.
#[derive(Clone)]
#[non_exhaustive]
pub enum Action {
    /// Print a readable line on stdout.
    Log,
    /// Append the event as one CloudEvents JSON line.
    File(PathBuf),
    /// Run `sh -c COMMAND` with the event's JSON on stdin and `MESHBUS_*` variables set.
    Exec(String),
    /// Call Rust code.
    Rust(RustHandler),
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
            Action::File(p) => write!(f, "file:{}", p.display()),
            Action::Exec(c) => write!(f, "exec:{c}"),
            Action::Rust(_) => f.write_str("rust"),
        }
    }
}

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// Not one of the known actions.
    #[error("unknown action `{0}`; expected one of: log, file:PATH, exec:COMMAND")]
    Unknown(String),
    /// `file:` or `exec:` with nothing after it.
    #[error("action `{0}` needs a value after the colon")]
    Empty(String),
    /// Writing the file failed.
    #[error("cannot append to {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The command could not start.
    #[error("cannot start `sh -c {command}`: {source}")]
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
    /// A Rust handler returned an error.
    #[error("{0}")]
    Rust(BoxError),
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
        if value.is_empty() && matches!(kind, "file" | "exec") {
            return Err(ActionError::Empty(s.to_owned()));
        }
        match kind {
            "file" => Ok(Action::File(PathBuf::from(value))),
            "exec" => Ok(Action::Exec(value.to_owned())),
            _ => Err(ActionError::Unknown(s.to_owned())),
        }
    }
}

/// Runs one row's action; owns what the action keeps between events.
pub(super) struct Runner {
    action: Action,
    exec_timeout: Duration,
}

impl Runner {
    pub(super) fn new(action: Action, exec_timeout: Duration) -> Self {
        Self {
            action,
            exec_timeout,
        }
    }

    /// Runs the action on each event in order; a file action writes them in one go.
    pub(super) async fn run<'a>(
        &mut self,
        events: &'a [Arc<Event>],
    ) -> Vec<(&'a Arc<Event>, Result<(), ActionError>)> {
        if let Action::File(path) = &self.action {
            let result = append(path, events).await;
            return events
                .iter()
                .map(|e| {
                    let r = match &result {
                        Ok(()) => Ok(()),
                        Err(err) => Err(ActionError::File {
                            path: path.clone(),
                            source: std::io::Error::new(err.kind(), err.to_string()),
                        }),
                    };
                    (e, r)
                })
                .collect();
        }
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let result = match &self.action {
                Action::Log => log(event).await,
                Action::Exec(command) => exec(command, event, self.exec_timeout).await,
                Action::Rust(f) => f(event.clone()).await.map_err(ActionError::Rust),
                Action::File(_) => unreachable!("handled above"),
            };
            out.push((event, result));
        }
        out
    }
}

async fn log(event: &Event) -> Result<(), ActionError> {
    let mut line = event.to_cloudevent().summary_line();
    line.push('\n');
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(line.as_bytes())
        .await
        .map_err(ActionError::Stdout)?;
    stdout.flush().await.map_err(ActionError::Stdout)
}

async fn append(path: &Path, events: &[Arc<Event>]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(events.len() * 256);
    for e in events {
        buf.extend_from_slice(e.to_json_line().as_bytes());
        buf.push(b'\n');
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    file.write_all(&buf).await?;
    file.flush().await
}

async fn exec(command: &str, event: &Event, timeout: Duration) -> Result<(), ActionError> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("MESHBUS_TOPIC", event.topic.as_str())
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
        command: command.to_owned(),
        source,
    })?;
    let pid = child.id();
    let input = {
        let mut line = event.to_json_line();
        line.push('\n');
        line
    };
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
            let status = status.map_err(ActionError::Wait)?;
            if !out.is_empty() {
                info!(event = %event.id, output = %out.trim_end(), "handler output");
            }
            if status.success() {
                if !err.is_empty() {
                    debug!(event = %event.id, stderr = %err.trim_end(), "handler stderr");
                }
                Ok(())
            } else {
                Err(ActionError::Exit {
                    status,
                    stderr: err.trim_end().to_owned(),
                })
            }
        }
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The whole group: `sh -c` may have started children that hold the pipes.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Err(ActionError::Timeout(timeout))
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
        for s in ["log", "file:/tmp/x.jsonl", "exec:echo hi: there"] {
            assert_eq!(s.parse::<Action>().unwrap().to_string(), s);
        }
        assert!(matches!(
            "file:".parse::<Action>(),
            Err(ActionError::Empty(_))
        ));
        assert!(matches!(
            "http:x".parse::<Action>(),
            Err(ActionError::Unknown(_))
        ));
        assert!(matches!(
            "loud".parse::<Action>(),
            Err(ActionError::Unknown(_))
        ));
    }
}
