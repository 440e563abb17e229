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
    /// When the last run finished, microseconds since the Unix epoch (0: never).
    last_done: AtomicU64,
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
    /// When the last run finished, microseconds since the Unix epoch (0: never).
    pub last_done_unix_us: u64,
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
                    stats::bump(&self.stats.handler_queue_full);
                    let dropped = row.counters.queue_full.fetch_add(1, Ordering::Relaxed) + 1;
                    // Overload can drop many events a second: log the 1st, 2nd, 4th, 8th, …
                    if dropped.is_power_of_two() {
                        warn!(handler = %row.name, event = %event.id, topic = %event.topic,
                            capacity = self.queue_capacity, dropped_so_far = dropped,
                            "handler queue full; event dropped for this handler");
                    }
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
                last_done_unix_us: r(&row.counters.last_done),
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
            let now = crate::wire::age_micros(std::time::UNIX_EPOCH);
            self.counters.last_done.store(now, Ordering::Relaxed);
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
    use crate::event::EventId;
    use crate::topic::Topic;

    fn event(topic: &str) -> Arc<Event> {
        Arc::new(Event {
            id: EventId::new(),
            topic: Topic::new(topic).unwrap(),
            event_type: topic.into(),
            source: libp2p::PeerId::random(),
            seq: 1,
            time: std::time::SystemTime::now(),
            content_type: crate::event::JSON.into(),
            data: bytes::Bytes::from_static(b"1"),
        })
    }

    #[tokio::test]
    async fn dispatch_selects_the_rows_whose_pattern_matches() {
        let stats = Arc::new(Stats::default());
        let handlers = Handlers::new(stats.clone(), 16, Duration::from_secs(1));
        let (tx, mut rx) = mpsc::channel(64);
        for pattern in ["orders.*", "orders.**", "users.created", "**", "_mesh.**"] {
            let tx = tx.clone();
            let action = Action::Rust(Arc::new(move |e: Arc<Event>| {
                let tx = tx.clone();
                Box::pin(async move {
                    tx.send((pattern, e.topic.to_string())).await?;
                    Ok(())
                })
            }));
            handlers.add(Pattern::new(pattern).unwrap(), action);
        }
        drop(tx);
        for topic in [
            "orders.created",
            "orders.created.eu",
            "users.created",
            "_mesh.peer.left",
        ] {
            handlers.dispatch(&event(topic));
        }
        handlers.shutdown(Duration::from_secs(5)).await;
        let mut got = Vec::new();
        while let Some(pair) = rx.recv().await {
            got.push(pair);
        }
        got.sort();
        let expected: Vec<(&str, String)> = [
            ("**", "orders.created"),
            ("**", "orders.created.eu"),
            ("**", "users.created"),
            ("_mesh.**", "_mesh.peer.left"),
            ("orders.*", "orders.created"),
            ("orders.**", "orders.created"),
            ("orders.**", "orders.created.eu"),
            ("users.created", "users.created"),
        ]
        .into_iter()
        .map(|(p, t)| (p, t.to_owned()))
        .collect();
        assert_eq!(got, expected);
        assert_eq!(stats.snapshot().handler_dispatched, 8);
    }

    #[tokio::test]
    async fn a_full_queue_drops_for_that_row_only() {
        let stats = Arc::new(Stats::default());
        let handlers = Handlers::new(stats.clone(), 2, Duration::from_secs(1));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (started_tx, mut started) = mpsc::channel(16);
        let blocked = gate.clone();
        handlers.add(
            Pattern::all(),
            Action::Rust(Arc::new(move |_| {
                let (gate, started) = (blocked.clone(), started_tx.clone());
                Box::pin(async move {
                    started.send(()).await?;
                    let _permit = gate.acquire().await?;
                    Ok(())
                })
            })),
        );
        let (tx, mut rx) = mpsc::channel(64);
        handlers.add(
            Pattern::all(),
            Action::Rust(Arc::new(move |e: Arc<Event>| {
                let tx = tx.clone();
                Box::pin(async move {
                    tx.send(e.id).await?;
                    Ok(())
                })
            })),
        );
        handlers.dispatch(&event("a.b"));
        started.recv().await.unwrap(); // the slow row holds its first event
        rx.recv().await.unwrap();
        for _ in 1..10 {
            handlers.dispatch(&event("a.b"));
            rx.recv().await.unwrap(); // the fast row keeps up
        }
        let rows = handlers.list();
        assert_eq!(rows[0].matched, 10);
        assert_eq!(
            rows[0].queue_full, 7,
            "one in hand, two queued, seven dropped"
        );
        assert_eq!(rows[1].queue_full, 0);
        assert_eq!(rows[1].succeeded, 10);
        gate.add_permits(100);
        handlers.shutdown(Duration::from_secs(5)).await;
    }

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
