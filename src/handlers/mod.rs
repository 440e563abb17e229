//! The handler table: "pattern → action" rows that decide what happens to each event a peer
//! receives, and the workers that run them.
//!
//! Every row is a reader of the event log ([`crate::store`]) with its own cursor, bounded
//! queue and workers, so a slow, hung or failing handler only delays its own row. When a
//! row's queue is full it stops reading until there is room: it lags (`lag` in `handlers`),
//! it never drops. Its cursor (everything up to it finished) is persisted, so after a restart
//! the row goes on where it stopped; a new row starts at the end of the log. A row runs up to
//! `concurrency` events at once; with 1 (the default) it runs them one at a time in log
//! order, which for each publisher is that publisher's order. A failed run is retried
//! `retries` times with exponential backoff (or the webhook's `Retry-After`); an event whose
//! attempts are spent is counted `failed` and, if the row has one, written to its dead-letter
//! file with its last error.
//!
//! The table can be swapped whole ([`Handlers::replace`], what `meshbus reload` does): events
//! already queued finish under the row they matched. A row that keeps its name keeps its
//! counters and its place in the log, and its new worker starts only when the old one has
//! drained its queue, so order holds across a reload and no event is handled twice. Rows
//! added through the library ([`Handlers::add`]) survive a reload.
//!
//! At shutdown the queues close; workers get [`crate::config::Config::shutdown_grace`] to
//! finish what is queued, then are cancelled (an `exec` child is killed with its process
//! group).

mod action;
mod file;
mod group;
mod http;
mod jq;
mod row;
mod spec;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{warn, Instrument as _};

pub use action::{
    redact_url, Action, ActionError, BoxError, CommandLine, ExecAction, QueryHandler, RustHandler,
};
pub use file::FileAction;
pub use http::{HttpAction, HttpMode, DEFAULT_HTTP_TIMEOUT};
pub use jq::{check as check_jq, check_key, JqError};
pub use row::{RowOptions, MAX_CONCURRENCY, MAX_QUEUE, QUEUE_BYTES};
pub use spec::{HandlerSpec, SpecError};

use group::GroupRow;
use libp2p::PeerId;

use crate::proto::groups::{GroupCounters, GroupView, MAX_GROUPS};
use crate::proto::StreamId;
use crate::stats::{Latency, Stats};
use crate::store::{Store, StoreError};
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
    /// It answers queries.
    reply: bool,
    /// Turned true to stop the row's feeder (its worker then drains the queue and ends).
    stop: Arc<watch::Sender<bool>>,
    counters: Arc<row::RowCounters>,
    /// Turns true when the row's worker has finished (its queue closed and drained).
    done: watch::Receiver<bool>,
    /// Its group, if it is in one.
    group: Option<Arc<GroupRow>>,
    /// The group its previous version was in, announced instead until that version's
    /// worker has finished (so events it still runs are not taken over meanwhile).
    left: Option<Arc<GroupRow>>,
    /// Turns true when this version of the row starts taking events.
    started: Arc<std::sync::atomic::AtomicBool>,
}

/// A reply row's answer to a query, on its way to the asker.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The asker.
    pub to: PeerId,
    /// The query's event id.
    pub query: String,
    /// The row that answered.
    pub handler: String,
    /// The action's output, or why it failed.
    pub answer: Result<serde_json::Value, String>,
}

/// One group this peer is in, as it announces it to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The group.
    pub name: String,
    /// When this member owns events from, µs since the Unix epoch.
    pub since: u64,
    /// Its done-marks.
    pub marks: Vec<(StreamId, u64)>,
    /// A digest of what its row takes: pattern, type, filter and key.
    pub shape: u64,
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
    /// Events in the log this row has not finished yet (of any topic): how far it lags.
    #[serde(default)]
    pub lag: u64,
    /// Events the log dropped (retention) before this row read them.
    #[serde(default)]
    pub skipped: u64,
    /// The row's handler group, if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Group rows: events this member owned when it read them.
    #[serde(default)]
    pub owned: u64,
    /// Group rows: events another member owned, so this one skipped them.
    #[serde(default)]
    pub not_owned: u64,
    /// Group rows: events of a failed or departed member that fell to this one.
    #[serde(default)]
    pub taken_over: u64,
    /// Group rows: batches read again because the key expression did not finish in time.
    #[serde(default)]
    pub key_retries: u64,
    /// Reply rows: the row answers queries.
    #[serde(default)]
    pub reply: bool,
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
    store: Store,
    /// A replay: rows built before [`Handlers::end_replay`] start no later than this offset.
    replay_from: Mutex<Option<u64>>,
    /// This peer (a group member's identity) and where reply rows send their answers.
    peer: Mutex<Option<(PeerId, mpsc::Sender<Answer>)>>,
    /// Rows came or went: the swarm task looks again whether it has groups to announce.
    table_changed: Notify,
    /// Whether a row is in a handler group or leaving one (set with the rows, read by the
    /// swarm task on every turn without the lock).
    grouped: AtomicBool,
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
    /// The row's action would fail on every event.
    #[error("handler `{name}`: {reason}")]
    Action {
        /// The row.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Two rows with one name.
    #[error("two handlers are named `{0}`; names must be unique")]
    DuplicateName(String),
    /// Two rows in one group, or a bad group setting.
    #[error("handler `{name}`: {reason}")]
    Group {
        /// The row.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The row's cursor could not be read from the log.
    #[error("handler `{name}`: {error}")]
    Store {
        /// The row.
        name: String,
        /// What failed.
        error: StoreError,
    },
}

impl Handlers {
    /// An empty table over the log `store`, whose rows get `exec_timeout`, and
    /// `queue_capacity` slots unless their options say otherwise. With `replay_from`, rows
    /// built until [`Handlers::end_replay`] start reading no later than that offset.
    pub fn new(
        stats: Arc<Stats>,
        queue_capacity: usize,
        exec_timeout: Duration,
        store: Store,
        replay_from: Option<u64>,
    ) -> Self {
        Self {
            rows: RwLock::new(Arc::new(Vec::new())),
            workers: Mutex::new(JoinSet::new()),
            stats,
            queue_capacity,
            exec_timeout,
            next_id: AtomicU64::new(1),
            store,
            replay_from: Mutex::new(replay_from),
            table_changed: Notify::new(),
            grouped: AtomicBool::new(false),
            peer: Mutex::new(None),
        }
    }

    /// Tells the table who this peer is (for its groups) and where answers go. Rows built
    /// before this can be in no group and answer no query.
    pub fn connect(&self, me: PeerId, answers: mpsc::Sender<Answer>) {
        *lock(&self.peer) = Some((me, answers));
    }

    /// Rows built from now on start where they stopped, or at the end of the log: the
    /// replay was for the table a node starts with.
    pub fn end_replay(&self) {
        *lock(&self.replay_from) = None;
    }

    /// Where a new row named `name` starts: after its persisted cursor, or at the end of the
    /// log if it never ran (either way no earlier than a replay asks).
    fn start_cursor(&self, name: &str) -> Result<u64, TableError> {
        let saved = self.store.cursor(name).map_err(|error| TableError::Store {
            name: name.to_owned(),
            error,
        })?;
        let cursor = saved.unwrap_or_else(|| self.store.last());
        Ok(match *lock(&self.replay_from) {
            Some(from) => cursor.min(from.saturating_sub(1)),
            None => cursor,
        })
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
        // The cursor first: a group row's start (and so its `since`) must come after it, so
        // every event published after the start is one this row reads.
        let start = match previous {
            Some(_) => None,
            None => Some(self.start_cursor(&name)?),
        };
        let shape = group::shape(&spec);
        let options = spec.options;
        let peer = lock(&self.peer).clone();
        let group = match (&spec.group, &peer) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(TableError::Group {
                    name,
                    reason: "a group row needs a running node".into(),
                })
            }
            (Some(g), Some((me, _))) => Some(match previous.and_then(|p| p.group.clone()) {
                Some(same) if &same.name == g && same.shape == shape => same,
                _ => {
                    let key = spec
                        .key
                        .as_deref()
                        .map(jq::KeyJq::compile)
                        .transpose()
                        .map_err(|error| TableError::Jq {
                            name: name.clone(),
                            error,
                        })?
                        .map(Arc::new);
                    Arc::new(GroupRow::new(g.clone(), *me, key, shape))
                }
            }),
        };
        let answers = match (spec.reply, peer) {
            (true, Some((_, answers))) => Some(answers),
            _ => None,
        };
        let capacity = options
            .queue
            .unwrap_or(self.queue_capacity)
            .clamp(1, row::MAX_QUEUE);
        let (queue, rx) = mpsc::channel(capacity);
        let counters: Arc<row::RowCounters> =
            previous.map(|p| p.counters.clone()).unwrap_or_default();
        let (done_tx, done) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let row = Row {
            name: name.clone(),
            pattern: spec.pattern.clone(),
            event_type: spec.event_type.clone(),
            action: spec.action.to_string(),
            origin,
            reply: spec.reply,
            stop: Arc::new(stop),
            counters: counters.clone(),
            done,
            group: group.clone(),
            left: None,
            started: Arc::new(std::sync::atomic::AtomicBool::new(previous.is_none())),
        };
        let feeder = row::Feeder {
            name: name.clone(),
            pattern: spec.pattern,
            event_type: spec.event_type,
            counters: counters.clone(),
            stats: self.stats.clone(),
            store: self.store.clone(),
            group: group.clone(),
            reply: spec.reply,
            room: Arc::new(Semaphore::new(row::QUEUE_BYTES)),
        };
        let worker = row::Worker {
            name: name.clone(),
            action: spec.action,
            options,
            exec_timeout: self.exec_timeout,
            counters: counters.clone(),
            stats: self.stats.clone(),
            jq,
            store: self.store.clone(),
            group,
            answers,
        };
        // A row that leaves its group (a reload dropped or changed it) stops waiting for the
        // events it held for the others: they are theirs.
        let left = previous
            .and_then(|p| p.group.clone())
            .filter(|old| !row.group.as_ref().is_some_and(|new| Arc::ptr_eq(old, new)));
        let mut row = row;
        row.left = left.clone();
        let started = row.started.clone();
        let previous = previous.map(|p| p.done.clone());
        let span = tracing::info_span!("handler", name = %name);
        let run = async move {
            if let Some(mut previous) = previous {
                // An error means that worker is gone already: nothing to wait for.
                let _ = previous.wait_for(|done| *done).await;
            }
            if let Some(old) = left {
                let offsets = old.state().abandon();
                counters.progress().resolve(offsets);
            }
            started.store(true, Ordering::Relaxed);
            if let Some(start) = start {
                counters.progress().fed = start;
            }
            tokio::join!(feeder.run(queue, stop_rx), worker.run(rx));
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
        spec.check_group().map_err(|reason| TableError::Group {
            name: name.clone(),
            reason,
        })?;
        if let Some(g) = &spec.group {
            let rows = read(&self.rows).clone();
            if rows.iter().filter(|r| r.group.is_some()).count() >= MAX_GROUPS {
                return Err(TableError::Group {
                    name,
                    reason: format!("a peer is in at most {MAX_GROUPS} groups"),
                });
            }
            if let Some(other) = rows.iter().find(|r| in_group(r, g)) {
                return Err(TableError::Group {
                    name,
                    reason: format!(
                        "row `{}` is in group `{g}` already; a peer has one row per group",
                        other.name
                    ),
                });
            }
        }
        let row = self.start_row(spec, name, Origin::Library, None)?;
        let name = row.name.clone();
        let mut rows = write(&self.rows);
        let mut next: Vec<Row> = rows.iter().cloned().collect();
        next.push(row);
        self.set_rows(&mut rows, next);
        Ok(name)
    }

    /// Replaces every config row with `specs` at once (library rows stay). If any spec is
    /// refused, nothing changes. Events already queued finish under the row they matched.
    pub fn replace(&self, specs: Vec<HandlerSpec>) -> Result<Vec<String>, TableError> {
        let mut seen = std::collections::HashSet::new();
        let mut groups = std::collections::HashMap::new();
        let library = read(&self.rows).clone();
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name.clone().unwrap_or_else(|| format!("h{}", i + 1));
            spec.check_group().map_err(|reason| TableError::Group {
                name: name.clone(),
                reason,
            })?;
            if let Some(g) = &spec.group {
                let taken = groups.insert(g.clone(), name.clone()).or_else(|| {
                    library
                        .iter()
                        .find(|r| r.origin == Origin::Library && in_group(r, g))
                        .map(|r| r.name.clone())
                });
                if let Some(other) = taken {
                    return Err(TableError::Group {
                        name,
                        reason: format!(
                            "row `{other}` is in group `{g}` already; a peer has one row per group"
                        ),
                    });
                }
            }
        }
        let library_groups = library
            .iter()
            .filter(|r| r.origin == Origin::Library && r.group.is_some())
            .count();
        if groups.len() + library_groups > MAX_GROUPS {
            return Err(TableError::Group {
                name: groups.values().last().cloned().unwrap_or_default(),
                reason: format!("a peer is in at most {MAX_GROUPS} groups"),
            });
        }
        for spec in &specs {
            if let Some(name) = &spec.name {
                if !seen.insert(name.clone()) {
                    return Err(TableError::DuplicateName(name.clone()));
                }
            }
            spec.action.check().map_err(|reason| TableError::Action {
                name: spec
                    .name
                    .clone()
                    .unwrap_or_else(|| spec.pattern.to_string()),
                reason,
            })?;
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
        let names: Vec<String> = new_rows.iter().map(|r| r.name.clone()).collect();
        let mut rows = write(&self.rows);
        let mut next: Vec<Row> = rows
            .iter()
            .filter(|r| r.origin == Origin::Library)
            .cloned()
            .collect();
        for old in rows.iter().filter(|r| r.origin == Origin::Config) {
            let _ = old.stop.send(true);
            if !names.contains(&old.name) {
                // Forget its cursor once its worker is done writing it.
                let (store, name, mut done) =
                    (self.store.clone(), old.name.clone(), old.done.clone());
                tokio::spawn(async move {
                    let _ = done.wait_for(|done| *done).await;
                    store.remove_cursor(&name);
                });
            }
        }
        next.extend(new_rows);
        self.set_rows(&mut rows, next);
        Ok(names)
    }

    /// The table is `next` from now on; the swarm task hears of it.
    fn set_rows(&self, rows: &mut Arc<Vec<Row>>, next: Vec<Row>) {
        let grouped = next
            .iter()
            .any(|row| row.group.is_some() || row.left.is_some());
        self.grouped.store(grouped, Ordering::Relaxed);
        *rows = Arc::new(next);
        self.table_changed.notify_one();
    }

    /// The rows and their counters.
    pub fn list(&self) -> Vec<HandlerInfo> {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let head = self.store.last();
        read(&self.rows)
            .iter()
            .map(|row| {
                let group = row
                    .group
                    .as_ref()
                    .map(|g| (g.name.clone(), g.state().counters));
                let (
                    group,
                    GroupCounters {
                        owned,
                        not_owned,
                        taken_over,
                    },
                ) = match group {
                    Some((name, counters)) => (Some(name), counters),
                    None => (None, GroupCounters::default()),
                };
                HandlerInfo {
                    name: row.name.clone(),
                    group,
                    owned,
                    not_owned,
                    taken_over,
                    key_retries: r(&row.counters.key_retries),
                    reply: row.reply,
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
                    queue_depth: r(&row.counters.queued),
                    lag: head.saturating_sub(row.counters.progress().done()),
                    skipped: r(&row.counters.skipped),
                    latency: row.counters.latency.summary(),
                    last_done_unix_us: r(&row.counters.last_done),
                    last_error: row
                        .counters
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect()
    }

    /// Waits until rows come or go (at once if they did since the last wait).
    pub async fn changed(&self) {
        self.table_changed.notified().await;
    }

    /// Whether any row is in a handler group (or leaving one).
    pub fn has_groups(&self) -> bool {
        self.grouped.load(Ordering::Relaxed)
    }

    /// The groups this peer's rows are in, as announced to the other peers.
    pub fn announcements(&self) -> Vec<Announcement> {
        let announce = |g: &GroupRow| {
            let mut state = g.state();
            Announcement {
                name: g.name.clone(),
                since: state.since(),
                marks: state.marks(),
                shape: g.shape,
            }
        };
        let mut out: Vec<Announcement> = Vec::new();
        for row in read(&self.rows).iter() {
            // Until a reloaded row's new version starts, its old group is what it is in.
            let old = row
                .left
                .as_ref()
                .filter(|_| !row.started.load(Ordering::Relaxed));
            if let Some(old) = old {
                out.push(announce(old));
            }
            if let Some(g) = &row.group {
                if old.is_none_or(|old| old.name != g.name) {
                    out.push(announce(g));
                }
            }
        }
        out
    }

    /// What `peer` announced: for each group of ours, its `since` and marks; a group of
    /// ours it no longer lists, it left.
    pub fn announced(&self, peer: PeerId, groups: &[Announcement]) {
        for row in read(&self.rows).iter() {
            let Some(g) = &row.group else { continue };
            {
                let mut state = g.state();
                match groups.iter().find(|a| a.name == g.name) {
                    Some(a) => {
                        g.check_shape(peer, a.shape, &self.stats);
                        state.announced(peer, a.since, &a.marks)
                    }
                    None if state.has_member(&peer) => {
                        g.forget(&peer);
                        state.failed(&peer)
                    }
                    None => continue,
                }
            }
            g.notify.notify_one();
        }
    }

    /// `peer` failed or left the mesh: what it owned and had not finished is decided again.
    pub fn member_gone(&self, peer: &PeerId) {
        for row in read(&self.rows).iter() {
            let Some(g) = &row.group else { continue };
            g.forget(peer);
            let was = {
                let mut state = g.state();
                let was = state.has_member(peer);
                state.failed(peer);
                was
            };
            if was {
                g.notify.notify_one();
            }
        }
    }

    /// This peer's own groups as it sees them.
    pub fn groups(&self) -> Vec<GroupView> {
        read(&self.rows)
            .iter()
            .filter_map(|row| row.group.as_ref())
            .map(|g| g.view())
            .collect()
    }

    /// Stops every row reading the log, lets workers finish what is queued for up to
    /// `grace`, then cancels the rest (their cursors stay before what they did not finish).
    pub async fn shutdown(&self, grace: Duration) {
        let rows = std::mem::take(&mut *write(&self.rows));
        self.grouped.store(false, Ordering::Relaxed);
        for row in rows.iter() {
            let _ = row.stop.send(true);
        }
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

fn in_group(row: &Row, group: &str) -> bool {
    row.group.as_ref().is_some_and(|g| g.name == group)
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
    use crate::event::{Event, EventId};
    use crate::topic::Topic;

    fn event(topic: &str) -> Arc<Event> {
        Arc::new(Event {
            id: EventId::new(),
            topic: Topic::new(topic).unwrap(),
            event_type: topic.into(),
            source: libp2p::PeerId::random(),
            seq: 1,
            epoch: 1,
            time: std::time::SystemTime::now(),
            content_type: crate::event::JSON.into(),
            data: bytes::Bytes::from_static(b"1"),
        })
    }

    /// A table over a fresh in-memory log.
    fn table(queue: usize) -> (Handlers, Store, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let (store, _) = Store::open(None, libp2p::PeerId::random(), Default::default()).unwrap();
        let handlers = Handlers::new(
            stats.clone(),
            queue,
            Duration::from_secs(1),
            store.clone(),
            None,
        );
        (handlers, store, stats)
    }

    async fn append(store: &Store, events: Vec<Arc<Event>>) {
        store.append(events, false).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn rows_get_the_events_whose_pattern_matches() {
        let (handlers, store, stats) = table(16);
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
        let topics = [
            "orders.created",
            "orders.created.eu",
            "users.created",
            "_mesh.peer.left",
        ];
        append(&store, topics.iter().map(|t| event(t)).collect()).await;
        let mut got = Vec::new();
        while got.len() < 8 {
            got.push(rx.recv().await.unwrap());
        }
        handlers.shutdown(Duration::from_secs(5)).await;
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
    async fn a_slow_row_lags_and_catches_up_without_dropping() {
        let (handlers, store, _) = table(2);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (started_tx, mut started) = mpsc::channel(16);
        let blocked = gate.clone();
        add(
            &handlers,
            Action::Rust(Arc::new(move |_| {
                let (gate, started) = (blocked.clone(), started_tx.clone());
                Box::pin(async move {
                    started.send(()).await?;
                    gate.acquire().await?.forget();
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
        let events: Vec<Arc<Event>> = (0..10).map(|_| event("a.b")).collect();
        append(&store, events.clone()).await;
        started.recv().await.unwrap(); // the slow row holds its first event
        for e in &events {
            assert_eq!(
                rx.recv().await.unwrap(),
                e.id,
                "the fast row keeps up, in order"
            );
        }
        let rows = handlers.list();
        assert_eq!(rows[0].lag, 10, "nothing finished, nothing dropped");
        assert_eq!(rows[1].lag, 0);
        gate.add_permits(10);
        for _ in 1..10 {
            started.recv().await.unwrap();
        }
        handlers.shutdown(Duration::from_secs(5)).await;
        assert!(handlers.list().is_empty());
    }

    /// With the clock paused, a sleep ends only once every task is waiting: the row's
    /// feeder has queued all it may. The clock then runs again, so the rest has timeouts.
    #[tokio::test(start_paused = true)]
    async fn a_row_holds_at_most_its_queue_bytes_of_events_and_still_takes_every_one() {
        let (handlers, store, _) = table(1024);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (tx, mut rx) = mpsc::channel(64);
        let blocked = gate.clone();
        add(
            &handlers,
            Action::Rust(Arc::new(move |e: Arc<Event>| {
                let (gate, tx) = (blocked.clone(), tx.clone());
                Box::pin(async move {
                    tx.send(e.id).await?;
                    gate.acquire().await?.forget();
                    Ok(())
                })
            })),
        );
        // 40 events of 1 MiB: the queue has slots for all of them, but bytes for 15.
        let events: Vec<Arc<Event>> = (0..40)
            .map(|_| {
                let mut e = (*event("a.b")).clone();
                e.data = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                Arc::new(e)
            })
            .collect();
        let fit = QUEUE_BYTES / events[0].footprint();
        assert_eq!(fit, 15);
        append(&store, events.clone()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rx.try_recv().ok(), Some(events[0].id));
        let row = handlers.list()[0].clone();
        // One runs, the rest of what fits waits in the queue, and the feeder waits for room
        // with the next one (counted as queued).
        assert_eq!((row.in_flight, row.queue_depth), (1, fit as u64));
        assert_eq!(row.lag, 40, "nothing finished, nothing dropped");
        tokio::time::resume();
        gate.add_permits(40);
        for e in &events[1..] {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            assert_eq!(got, Ok(Some(e.id)), "every event, in order");
        }
        handlers.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn the_table_says_whether_a_row_is_in_a_group_and_wakes_the_swarm_task_when_rows_change()
    {
        let (handlers, _store, _) = table(16);
        handlers.connect(libp2p::PeerId::random(), mpsc::channel(1).0);
        let noop = || Action::Rust(Arc::new(|_| Box::pin(async { Ok(()) })));
        let changed = || async {
            tokio::time::timeout(Duration::from_secs(5), handlers.changed())
                .await
                .expect("the table said it changed")
        };
        add(&handlers, noop());
        changed().await;
        assert!(!handlers.has_groups());
        let mut spec = HandlerSpec::new(Pattern::all(), noop());
        spec.group = Some("workers".into());
        handlers.add(spec).unwrap();
        changed().await;
        assert!(handlers.has_groups());
        handlers.replace(Vec::new()).unwrap();
        assert!(handlers.has_groups(), "library rows stay");
        handlers.shutdown(Duration::from_secs(5)).await;
        assert!(!handlers.has_groups());
    }

    #[tokio::test]
    async fn a_row_resumes_after_its_persisted_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let me = libp2p::PeerId::random();
        let first: Vec<Arc<Event>> = (0..3).map(|_| event("a.b")).collect();
        let second: Vec<Arc<Event>> = (0..2).map(|_| event("a.b")).collect();
        let run = || {
            let (store, _) = Store::open(Some(dir.path()), me, Default::default()).unwrap();
            let stats = Arc::new(Stats::default());
            let handlers = Handlers::new(stats, 16, Duration::from_secs(1), store.clone(), None);
            let (tx, rx) = mpsc::channel(64);
            let mut spec = HandlerSpec::new(
                Pattern::all(),
                Action::Rust(Arc::new(move |e: Arc<Event>| {
                    let tx = tx.clone();
                    Box::pin(async move {
                        tx.send(e.id).await?;
                        Ok(())
                    })
                })),
            );
            spec.name = Some("keeper".into());
            handlers.add(spec).unwrap();
            (store, handlers, rx)
        };
        // First run: the row starts at the end of an empty log and handles three events.
        let (store, handlers, mut rx) = run();
        append(&store, first.clone()).await;
        for e in &first {
            assert_eq!(rx.recv().await.unwrap(), e.id);
        }
        handlers.shutdown(Duration::from_secs(5)).await;
        append(&store, second.clone()).await; // arrives while the row is down
        store.close().await;
        drop((store, handlers));
        // Second run: it goes on with what it missed, and nothing again.
        let (store, handlers, mut rx) = run();
        for e in &second {
            assert_eq!(rx.recv().await.unwrap(), e.id);
        }
        handlers.shutdown(Duration::from_secs(5)).await;
        assert!(rx.try_recv().is_err(), "no event is handled twice");
        store.close().await;
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
