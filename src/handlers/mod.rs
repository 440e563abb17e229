//! The handler table: "pattern → action" rows that decide what happens to each event a peer
//! receives, and the workers that run them.
//!
//! Every row has its own bounded queue and workers, so a slow, hung or failing handler only
//! delays its own row: dispatch never waits. When a row's queue is full the *new* event is
//! dropped for that row (others still get it), counted (`queue_full`) and logged. A row runs
//! up to `concurrency` events at once; with 1 (the default) it runs them one at a time in
//! arrival order, which for one publisher is that publisher's order. A failed run is retried
//! `retries` times with exponential backoff (or the webhook's `Retry-After`); an event whose
//! attempts are spent is counted `failed` and, if the row has one, written to its dead-letter
//! file with its last error.
//!
//! The table can be swapped whole ([`Handlers::replace`], what `meshbus reload` does): events
//! already queued finish under the row they matched, new events see the new table, and no event
//! is dispatched to both. A row that keeps its name keeps its counters, and its new worker
//! starts only when the old one has drained its queue, so order holds across a reload. Rows
//! added through the library ([`Handlers::add`]) survive a reload.
//!
//! At shutdown the queues close; workers get [`crate::config::Config::shutdown_grace`] to
//! finish what is queued, then are cancelled (an `exec` child is killed with its process
//! group).

mod action;
mod file;
mod http;
mod jq;
mod row;
mod spec;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{warn, Instrument as _};

pub use action::{Action, ActionError, BoxError, CommandLine, ExecAction, RustHandler};
pub use file::FileAction;
pub use http::{HttpAction, HttpMode, DEFAULT_HTTP_TIMEOUT};
pub use jq::JqError;
pub use row::{RowOptions, MAX_CONCURRENCY, MAX_QUEUE};
pub use spec::{HandlerSpec, SpecError};

use crate::event::Event;
use crate::stats::{self, Latency, Stats};
use crate::topic::Pattern;

/// Where a row came from: config rows are replaced by a reload, library rows stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Config,
    Library,
}

/// One row of the table as dispatch sees it.
#[derive(Clone)]
struct Row {
    name: String,
    pattern: Pattern,
    event_type: Option<Pattern>,
    /// The action as text, for listings.
    action: String,
    origin: Origin,
    /// Front of the row's bounded queue.
    queue: mpsc::Sender<Arc<Event>>,
    counters: Arc<row::RowCounters>,
    /// Turns true when the row's worker has finished (its queue closed and drained).
    done: watch::Receiver<bool>,
}

/// A row and its counters, as `meshbus handlers`, `status` and the API show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandlerInfo {
    /// The row's name.
    pub name: String,
    /// Its topic pattern.
    pub pattern: String,
    /// Its event-type pattern, if any.
    #[serde(default)]
    pub event_type: Option<String>,
    /// Its action, as text.
    pub action: String,
    /// Events whose topic (and type) matched.
    pub matched: u64,
    /// Events the filter skipped.
    #[serde(default)]
    pub filtered_out: u64,
    /// Events handled successfully.
    pub succeeded: u64,
    /// Events whose attempts were all spent without success.
    pub failed: u64,
    /// Retries made.
    #[serde(default)]
    pub retried: u64,
    /// Events written to the dead-letter file.
    #[serde(default)]
    pub dead_lettered: u64,
    /// Events being handled now.
    #[serde(default)]
    pub in_flight: u64,
    /// Events waiting in the row's queue.
    #[serde(default)]
    pub queue_depth: u64,
    /// Events dropped because the row's queue was full.
    pub queue_full: u64,
    /// Time from publish to this row's action finished.
    pub latency: Latency,
    /// When the last run finished, microseconds since the Unix epoch (0: never).
    pub last_done_unix_us: u64,
    /// The last failure, if any.
    #[serde(default)]
    pub last_error: Option<String>,
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

/// Why a table could not be built; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// A jq filter or transform does not compile.
    #[error("handler `{name}`: {error}")]
    Jq {
        /// The row.
        name: String,
        /// What is wrong.
        error: JqError,
    },
    /// Two rows with one name.
    #[error("two handlers are named `{0}`; names must be unique")]
    DuplicateName(String),
}

impl Handlers {
    /// An empty table whose rows get `exec_timeout`, and `queue_capacity` slots unless their
    /// options say otherwise.
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

    /// Builds a row and starts its workers. Must be called inside a Tokio runtime. A row
    /// that replaces `previous` (same name, at a reload) keeps its counters and starts taking
    /// events only once the previous worker has finished its queue: order holds and no two
    /// workers of one row ever run at once.
    fn start_row(
        &self,
        spec: HandlerSpec,
        name: String,
        origin: Origin,
        previous: Option<&Row>,
    ) -> Result<Row, TableError> {
        let jq = jq::RowJq::compile(spec.filter.as_deref(), spec.transform.as_deref())
            .map_err(|error| TableError::Jq {
                name: name.clone(),
                error,
            })?
            .map(Arc::new);
        let options = spec.options;
        let capacity = options
            .queue
            .unwrap_or(self.queue_capacity)
            .clamp(1, row::MAX_QUEUE);
        let (queue, rx) = mpsc::channel(capacity);
        let counters = previous.map(|p| p.counters.clone()).unwrap_or_default();
        let (done_tx, done) = watch::channel(false);
        let row = Row {
            name: name.clone(),
            pattern: spec.pattern,
            event_type: spec.event_type,
            action: spec.action.to_string(),
            origin,
            queue,
            counters: counters.clone(),
            done,
        };
        let worker = row::Worker {
            name: name.clone(),
            action: spec.action,
            options,
            exec_timeout: self.exec_timeout,
            counters,
            stats: self.stats.clone(),
            jq,
        };
        let previous = previous.map(|p| p.done.clone());
        let span = tracing::info_span!("handler", name = %name);
        let run = async move {
            if let Some(mut previous) = previous {
                // An error means that worker is gone already: nothing to wait for.
                let _ = previous.wait_for(|done| *done).await;
            }
            worker.run(rx).await;
            let _ = done_tx.send(true);
        };
        let mut workers = lock(&self.workers);
        // Forget workers that have finished (rows replaced by earlier reloads).
        while workers.try_join_next().is_some() {}
        workers.spawn(run.instrument(span));
        Ok(row)
    }

    /// Adds a row that stays across reloads; returns its name.
    pub fn add(&self, spec: HandlerSpec) -> Result<String, TableError> {
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("lib{}", self.next_id.fetch_add(1, Ordering::Relaxed)));
        let row = self.start_row(spec, name, Origin::Library, None)?;
        let name = row.name.clone();
        let mut rows = write(&self.rows);
        let mut next: Vec<Row> = rows.iter().cloned().collect();
        next.push(row);
        *rows = Arc::new(next);
        Ok(name)
    }

    /// Replaces every config row with `specs` at once (library rows stay). If any spec is
    /// refused, nothing changes. Events already queued finish under the row they matched.
    pub fn replace(&self, specs: Vec<HandlerSpec>) -> Result<Vec<String>, TableError> {
        let mut seen = std::collections::HashSet::new();
        for spec in &specs {
            if let Some(name) = &spec.name {
                if !seen.insert(name.clone()) {
                    return Err(TableError::DuplicateName(name.clone()));
                }
            }
            // Compile first so that a bad row changes nothing.
            jq::RowJq::compile(spec.filter.as_deref(), spec.transform.as_deref()).map_err(
                |error| TableError::Jq {
                    name: spec.name.clone().unwrap_or_default(),
                    error,
                },
            )?;
        }
        let current = read(&self.rows).clone();
        let mut new_rows = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            // Unnamed rows are named by their place, so a reload that keeps the table's shape
            // keeps their names, counters and order.
            let name = spec.name.clone().unwrap_or_else(|| format!("h{}", i + 1));
            let previous = current
                .iter()
                .find(|r| r.origin == Origin::Config && r.name == name);
            new_rows.push(self.start_row(spec, name, Origin::Config, previous)?);
        }
        let names = new_rows.iter().map(|r| r.name.clone()).collect();
        let mut rows = write(&self.rows);
        let mut next: Vec<Row> = rows
            .iter()
            .filter(|r| r.origin == Origin::Library)
            .cloned()
            .collect();
        next.extend(new_rows);
        *rows = Arc::new(next);
        Ok(names)
    }

    /// Queues `event` for every row whose pattern matches. Never waits.
    pub fn dispatch(&self, event: &Arc<Event>) {
        let rows = read(&self.rows).clone();
        for row in rows.iter() {
            if !row.pattern.matches(&event.topic) {
                continue;
            }
            if let Some(t) = &row.event_type {
                if !t.matches_str(&event.event_type) {
                    continue;
                }
            }
            stats::bump(&row.counters.matched);
            match row.queue.try_send(event.clone()) {
                Ok(()) => stats::bump(&self.stats.handler_dispatched),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats::bump(&self.stats.handler_queue_full);
                    if let Some(dropped) = stats::bump_throttled(&row.counters.queue_full) {
                        warn!(handler = %row.name, event = %event.id, topic = %event.topic,
                            capacity = row.queue.max_capacity(), dropped_so_far = dropped,
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
                event_type: row.event_type.as_ref().map(|t| t.to_string()),
                action: row.action.clone(),
                matched: r(&row.counters.matched),
                filtered_out: r(&row.counters.filtered_out),
                succeeded: r(&row.counters.succeeded),
                failed: r(&row.counters.failed),
                retried: r(&row.counters.retried),
                dead_lettered: r(&row.counters.dead_lettered),
                in_flight: r(&row.counters.in_flight),
                queue_depth: (row.queue.max_capacity() - row.queue.capacity()) as u64,
                queue_full: r(&row.counters.queue_full),
                latency: row.counters.latency.summary(),
                last_done_unix_us: r(&row.counters.last_done),
                last_error: row
                    .counters
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
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
            handlers
                .add(HandlerSpec::new(Pattern::new(pattern).unwrap(), action))
                .unwrap();
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
        add(
            &handlers,
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
        add(
            &handlers,
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

    fn add(handlers: &Handlers, action: Action) {
        handlers
            .add(HandlerSpec::new(Pattern::all(), action))
            .unwrap();
    }

    #[test]
    fn specs_parse_and_errors_name_the_rule() {
        let spec: HandlerSpec = "orders.*=exec:cat > /dev/null".parse().unwrap();
        assert_eq!(spec.pattern.as_str(), "orders.*");
        assert_eq!(spec.action.to_string(), "exec:cat > /dev/null");
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
