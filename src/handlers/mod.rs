//! The handler table: "pattern → action" rows that decide what happens to each event a peer
//! receives, and the workers that run them.
//!
//! Every row has its own bounded queue and its own worker task, so a slow or hung handler
//! only delays its own row: dispatch never waits (a full queue drops the event *for that row*,
//! counts it and logs it). A row runs one event at a time, in arrival order, which for one
//! publisher is that publisher's order.
//!
//! At shutdown the queues close; workers get [`crate::config::Config::shutdown_grace`] to
//! finish what is queued, then are cancelled (an `exec` child is killed with its process
//! group).

mod action;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{warn, Instrument as _};

pub use action::{Action, ActionError, BoxError, RustHandler};

use crate::event::Event;
use crate::stats::{self, Histogram, Latency, Stats};
use crate::topic::{Pattern, TopicError};

/// Most events a worker takes off its queue at once (lets `file` write them in one go).
const WORKER_BATCH: usize = 256;

/// A row as given on the command line: `PATTERN=ACTION`.
#[derive(Debug, Clone)]
pub struct HandlerSpec {
    /// Which topics the row takes.
    pub pattern: Pattern,
    /// What it does with them.
    pub action: Action,
}

/// Why a `PATTERN=ACTION` row was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// No `=`.
    #[error("handler `{0}` has no `=`; expected PATTERN=ACTION, e.g. `orders.*=log`")]
    NoEquals(String),
    /// The pattern part is not a pattern.
    #[error("handler `{spec}`: {source}")]
    Pattern {
        /// The whole row.
        spec: String,
        /// What is wrong with the pattern.
        source: TopicError,
    },
    /// The action part is not an action.
    #[error("handler `{spec}`: {source}")]
    Action {
        /// The whole row.
        spec: String,
        /// What is wrong with the action.
        source: ActionError,
    },
}

impl std::str::FromStr for HandlerSpec {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (pattern, action) = spec
            .split_once('=')
            .ok_or_else(|| SpecError::NoEquals(spec.to_owned()))?;
        Ok(Self {
            pattern: Pattern::new(pattern).map_err(|source| SpecError::Pattern {
                spec: spec.to_owned(),
                source,
            })?,
            action: action.parse().map_err(|source| SpecError::Action {
                spec: spec.to_owned(),
                source,
            })?,
        })
    }
}

/// A row's own counters.
#[derive(Debug, Default)]
struct RowCounters {
    matched: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    queue_full: AtomicU64,
    /// Publish (the publisher's clock) to this row's action finished.
    latency: Histogram,
}

/// One row of the table as dispatch sees it.
struct Row {
    /// Stable name for logs and listings (`h1`, `h2`, … in registration order).
    name: String,
    pattern: Pattern,
    /// The action as text, for listings.
    action: String,
    /// Front of the row's bounded queue.
    queue: mpsc::Sender<Arc<Event>>,
    counters: Arc<RowCounters>,
}

/// A row and its counters, as `status` and the API show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandlerInfo {
    /// The row's name.
    pub name: String,
    /// Its topic pattern.
    pub pattern: String,
    /// Its action, as text.
    pub action: String,
    /// Events that matched the pattern.
    pub matched: u64,
    /// Runs that succeeded.
    pub succeeded: u64,
    /// Runs that failed.
    pub failed: u64,
    /// Events dropped because the row's queue was full.
    pub queue_full: u64,
    /// Time from publish to this row's action finished.
    pub latency: Latency,
}

/// The live table: rows, their queues and workers.
pub struct Handlers {
    /// Copy-on-write so dispatch takes the read lock only long enough to clone an `Arc`.
    rows: RwLock<Arc<Vec<Row>>>,
    workers: Mutex<JoinSet<()>>,
    stats: Arc<Stats>,
    queue_capacity: usize,
    exec_timeout: Duration,
    next_id: AtomicU64,
}

impl Handlers {
    /// An empty table whose rows get `queue_capacity` slots and `exec_timeout`.
    pub fn new(stats: Arc<Stats>, queue_capacity: usize, exec_timeout: Duration) -> Self {
        Self {
            rows: RwLock::new(Arc::new(Vec::new())),
            workers: Mutex::new(JoinSet::new()),
            stats,
            queue_capacity,
            exec_timeout,
            next_id: AtomicU64::new(1),
        }
    }

    /// Adds a row and starts its worker. Must be called inside a Tokio runtime.
    pub fn add(&self, pattern: Pattern, action: Action) -> String {
        let name = format!("h{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (queue, rx) = mpsc::channel(self.queue_capacity);
        let counters = Arc::new(RowCounters::default());
        let row = Row {
            name: name.clone(),
            pattern,
            action: action.to_string(),
            queue,
            counters: counters.clone(),
        };
        let worker = Worker {
            runner: action::Runner::new(action, self.exec_timeout),
            counters,
            stats: self.stats.clone(),
        };
        let span = tracing::info_span!("handler", name = %name);
        lock(&self.workers).spawn(worker.run(rx).instrument(span));
        let mut rows = write(&self.rows);
        let mut next = Vec::with_capacity(rows.len() + 1);
        next.extend(rows.iter().map(Row::clone_handle));
        next.push(row);
        *rows = Arc::new(next);
        name
    }

    /// Queues `event` for every row whose pattern matches its topic. Never waits.
    pub fn dispatch(&self, event: &Arc<Event>) {
        let rows = read(&self.rows).clone();
        for row in rows.iter() {
            if !row.pattern.matches(&event.topic) {
                continue;
            }
            stats::bump(&row.counters.matched);
            match row.queue.try_send(event.clone()) {
                Ok(()) => stats::bump(&self.stats.handler_dispatched),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats::bump(&row.counters.queue_full);
                    stats::bump(&self.stats.handler_queue_full);
                    warn!(handler = %row.name, event = %event.id, topic = %event.topic,
                        capacity = self.queue_capacity, "handler queue full; event dropped for this handler");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    warn!(handler = %row.name, event = %event.id, "handler stopped; event dropped");
                }
            }
        }
    }

    /// The rows and their counters.
    pub fn list(&self) -> Vec<HandlerInfo> {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        read(&self.rows)
            .iter()
            .map(|row| HandlerInfo {
                name: row.name.clone(),
                pattern: row.pattern.to_string(),
                action: row.action.clone(),
                matched: r(&row.counters.matched),
                succeeded: r(&row.counters.succeeded),
                failed: r(&row.counters.failed),
                queue_full: r(&row.counters.queue_full),
                latency: row.counters.latency.summary(),
            })
            .collect()
    }

    /// Closes every queue, lets workers finish for up to `grace`, then cancels the rest.
    pub async fn shutdown(&self, grace: Duration) {
        *write(&self.rows) = Arc::new(Vec::new());
        let mut workers = std::mem::take(&mut *lock(&self.workers));
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = workers.len(),
                "handlers still busy after the shutdown grace; cancelling them"
            );
            workers.shutdown().await;
        }
    }
}

impl Row {
    fn clone_handle(&self) -> Row {
        Row {
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            action: self.action.clone(),
            queue: self.queue.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// The task behind one row.
struct Worker {
    runner: action::Runner,
    counters: Arc<RowCounters>,
    stats: Arc<Stats>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Arc<Event>>) {
        let mut batch = Vec::with_capacity(WORKER_BATCH);
        while rx.recv_many(&mut batch, WORKER_BATCH).await > 0 {
            for (event, result) in self.runner.run(&batch).await {
                self.counters
                    .latency
                    .record(crate::wire::age_micros(event.time));
                match result {
                    Ok(()) => {
                        stats::bump(&self.counters.succeeded);
                        stats::bump(&self.stats.handler_succeeded);
                    }
                    Err(error) => {
                        stats::bump(&self.counters.failed);
                        stats::bump(&self.stats.handler_failed);
                        warn!(event = %event.id, topic = %event.topic, error = %error, "handler failed");
                    }
                }
            }
            batch.clear();
        }
    }
}

/// Poison only follows a panic elsewhere; the data (plain rows) stays usable, so go on.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_name_the_rule() {
        let spec: HandlerSpec = "orders.*=exec:cat > /dev/null".parse().unwrap();
        assert_eq!(spec.pattern.as_str(), "orders.*");
        assert!(matches!(spec.action, Action::Exec(ref c) if c == "cat > /dev/null"));
        let err = "orders.*".parse::<HandlerSpec>().unwrap_err();
        assert!(err.to_string().contains("PATTERN=ACTION"), "{err}");
        let err = "**.x=log".parse::<HandlerSpec>().unwrap_err();
        assert!(
            err.to_string().contains("`**` may only be the last"),
            "{err}"
        );
        let err = "a=mail:me".parse::<HandlerSpec>().unwrap_err();
        assert!(
            err.to_string().contains("log, file:PATH, exec:COMMAND"),
            "{err}"
        );
    }
}
