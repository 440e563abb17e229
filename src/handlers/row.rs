//! One row of the table at work: its queue, its workers, retries and the dead-letter file.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::warn;

use super::action::{self, Action, ActionError};
use super::file::FileAction;
use super::group::GroupRow;
use super::Answer;
use crate::event::Event;
use crate::proto::StreamId;
use crate::stats::{self, Histogram, Stats};
use crate::store::Store;
use crate::topic::Pattern;

/// Events the feeder reads from the log at once.
const FEED_BATCH: usize = 256;

/// Most events a worker takes off its queue at once (lets `file` and `log` write them in one
/// go).
const WORKER_BATCH: usize = 256;

/// How a row runs its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowOptions {
    /// Events in flight at once. With 1, events run one at a time in arrival order, which for
    /// one publisher is its publish order.
    pub concurrency: usize,
    /// Events waiting in front of the row (the node's `handler_queue` when `None`); when
    /// full, the row stops reading the log until there is room: it lags, it never drops.
    pub queue: Option<usize>,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub backoff: Duration,
    /// Longest wait between attempts, a webhook's `Retry-After` included.
    pub backoff_max: Duration,
    /// Where an event goes, as one JSON line with its last error, when its attempts are spent.
    pub dead_letter: Option<PathBuf>,
}

impl Default for RowOptions {
    fn default() -> Self {
        Self {
            concurrency: 1,
            queue: None,
            retries: 0,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            dead_letter: None,
        }
    }
}

/// Time jq gets to evaluate a row's filter and transform on a batch of events.
pub const JQ_TIMEOUT: Duration = Duration::from_secs(2);

/// Most events in flight in one row.
pub const MAX_CONCURRENCY: usize = 1024;

/// Longest queue in front of one row.
pub const MAX_QUEUE: usize = 1 << 20;

/// Bytes of events (by [`Event::footprint`]) queued or in flight in one row, whatever its
/// queue's length: 64 of the largest events, or 16 Ki of 1 KiB ones. Past it the row stops
/// reading the log until its worker finishes some, as when its queue is full.
pub const QUEUE_BYTES: usize = 16 << 20;

/// An event in a row's queue: its offset, and its share of [`QUEUE_BYTES`] (given back when
/// the row has finished it).
pub(super) type Queued = (u64, Arc<Event>, OwnedSemaphorePermit);

impl RowOptions {
    /// The wait before retry number `attempt` (1 for the first retry).
    pub fn backoff_for(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

/// A row's counters, shared by its workers and the listing.
#[derive(Debug, Default)]
pub(super) struct RowCounters {
    pub matched: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub in_flight: AtomicU64,
    pub queued: AtomicU64,
    /// Events the log dropped (retention) before this row read them.
    pub skipped: AtomicU64,
    pub filtered_out: AtomicU64,
    /// Batches whose group key expression did not finish in time, read again.
    pub key_retries: AtomicU64,
    /// How far the row has read and which of those are unfinished.
    pub progress: Mutex<Progress>,
    /// Publish (the publisher's clock) to this row's action finished.
    pub latency: Histogram,
    /// When the last run finished, microseconds since the Unix epoch (0: never).
    pub last_done: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// A row's place in the log: the last offset read, and the matching ones read but not yet
/// finished. Everything up to [`Progress::done`] is finished: that is the persisted cursor.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub fed: u64,
    pub pending: BTreeSet<u64>,
}

impl Progress {
    pub fn done(&self) -> u64 {
        self.pending.first().map_or(self.fed, |first| first - 1)
    }

    /// These offsets need no more from the row; returns the new [`Progress::done`].
    pub fn resolve(&mut self, offsets: impl IntoIterator<Item = u64>) -> u64 {
        for offset in offsets {
            self.pending.remove(&offset);
        }
        self.done()
    }
}

impl RowCounters {
    pub(super) fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads the log from the row's cursor and queues the events that match. It waits when the
/// queue is full, so a slow row lags behind the log instead of dropping events.
pub(super) struct Feeder {
    pub name: String,
    pub pattern: Pattern,
    pub event_type: Option<Pattern>,
    pub counters: Arc<RowCounters>,
    pub stats: Arc<Stats>,
    pub store: Store,
    /// The row's group, if it is in one.
    pub group: Option<Arc<GroupRow>>,
    /// The row answers queries.
    pub reply: bool,
    /// [`QUEUE_BYTES`], less what is queued or in flight.
    pub room: Arc<Semaphore>,
}

/// What a group row's feeder does next.
enum Turn {
    Go,
    Wait(Duration),
    Stop,
}

impl Feeder {
    fn matches(&self, event: &Event) -> bool {
        self.pattern.matches(&event.topic)
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| t.matches_str(&event.event_type))
            && self.addressed(event)
    }

    /// A reply row takes a query addressed to a group only if it is in that group (the same
    /// on every member: matching must not depend on the peer or the moment).
    fn addressed(&self, event: &Event) -> bool {
        match crate::event::query_group(event) {
            Some(Some(group)) if self.reply => self.group.as_ref().is_some_and(|g| g.name == group),
            _ => true,
        }
    }

    /// Queues an event for the row's worker, waiting for room (a slot and its bytes); false
    /// if the row stopped first (then it is not queued).
    async fn offer(
        &self,
        queue: &mpsc::Sender<Queued>,
        stop: &mut watch::Receiver<bool>,
        offset: u64,
        event: Arc<Event>,
    ) -> bool {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let bytes = u32::try_from(event.footprint().min(QUEUE_BYTES)).unwrap_or(u32::MAX);
        let send = async {
            let Ok(room) = self.room.clone().acquire_many_owned(bytes).await else {
                return false;
            };
            queue.send((offset, event, room)).await.is_ok()
        };
        let sent = tokio::select! {
            sent = send => sent,
            _ = stop.changed() => false,
        };
        if sent {
            stats::bump(&self.stats.handler_dispatched);
        } else {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }

    /// A group row's housekeeping before it reads on: forget the held events their owners
    /// finished, queue those that fell to this member, and wait until it may decide.
    async fn group_turn(
        &self,
        group: &GroupRow,
        queue: &mpsc::Sender<Queued>,
        stop: &mut watch::Receiver<bool>,
    ) -> Turn {
        let released = group.state().take_released();
        if !released.is_empty() {
            let done = self.counters.progress().resolve(released);
            self.store.set_cursor(&self.name, done);
        }
        loop {
            let Some(held) = group.state().poll_takeover() else {
                break;
            };
            // Held events keep only their place: read the event from the log again.
            let event = match self.store.read_after(held.offset - 1, 1) {
                Ok(found) => found
                    .into_iter()
                    .next()
                    .filter(|(offset, _)| *offset == held.offset),
                Err(error) => {
                    crate::store::warn_log_failed(&self.name, &error);
                    group.state().untake(held);
                    return Turn::Wait(crate::store::FLUSH_EVERY * 10);
                }
            };
            let Some((offset, event)) = event else {
                // The log dropped it (retention) before it fell to this member.
                if let Some(n) = stats::bump_throttled(&self.counters.skipped) {
                    warn!(handler = %self.name, offset = held.offset, skipped_so_far = n,
                        "an event taken over from a failed member was dropped by the log first");
                }
                group.state().finished(held.stream, held.seq);
                let done = self.counters.progress().resolve([held.offset]);
                self.store.set_cursor(&self.name, done);
                continue;
            };
            group.run(&held);
            if !self.offer(queue, stop, offset, event).await {
                group.key_error(offset);
                group.state().untake(held);
                return Turn::Stop;
            }
        }
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        let state = group.state();
        if !state.ready(now) {
            return Turn::Wait(Duration::from_micros(state.since() - now));
        }
        if state.full() {
            return Turn::Wait(Duration::from_millis(100));
        }
        Turn::Go
    }

    /// Feeds until `stop` turns true; what it read and did not queue is read again by the
    /// row's next feeder (after a reload).
    pub(super) async fn run(self, queue: mpsc::Sender<Queued>, mut stop: watch::Receiver<bool>) {
        let mut head = self.store.head();
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            if let Some(group) = &self.group {
                match self.group_turn(group, &queue, &mut stop).await {
                    Turn::Go => {}
                    Turn::Stop => return,
                    Turn::Wait(wait) => {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = group.notify.notified() => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
            head.borrow_and_update();
            let fed = self.counters.progress().fed;
            let batch = match self.store.read_after(fed, FEED_BATCH) {
                Ok(batch) => batch,
                Err(error) => {
                    crate::store::warn_log_failed(&self.name, &error);
                    tokio::select! {
                        _ = tokio::time::sleep(crate::store::FLUSH_EVERY * 10) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            let Some(&(first, _)) = batch.first() else {
                let woken = async {
                    match &self.group {
                        Some(group) => group.notify.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { return },
                    _ = stop.changed() => {}
                    _ = woken => {}
                }
                continue;
            };
            if first > fed + 1 {
                let n = first - fed - 1;
                stats::add(&self.counters.skipped, n);
                warn!(handler = %self.name, events = n, from = fed + 1, to = first - 1,
                    "the log dropped events (retention) before this handler read them");
            }
            let batch: Vec<(u64, Arc<Event>)> = match &self.group {
                Some(_) => {
                    // Only the events it matches take part in the group.
                    let last = batch.last().map(|(o, _)| *o);
                    let matching: Vec<_> =
                        batch.into_iter().filter(|(_, e)| self.matches(e)).collect();
                    if matching.is_empty() {
                        if let Some(last) = last {
                            self.counters.progress().fed = last;
                        }
                    }
                    matching
                }
                None => batch,
            };
            let mut keys = match &self.group {
                Some(group) => match group.keys(&batch).await {
                    Ok(keys) => keys.into_iter(),
                    Err(error) => {
                        // Nothing of the batch is decided: it is read again.
                        if let Some(n) = stats::bump_throttled(&self.counters.key_retries) {
                            warn!(handler = %self.name, %error, retries_so_far = n,
                                "the group key expression did not finish; the batch is tried again");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                },
                None => Vec::new().into_iter(),
            };
            for (offset, event) in batch {
                if self.group.is_none() && !self.matches(&event) {
                    self.counters.progress().fed = offset;
                    continue;
                }
                stats::bump(&self.counters.matched);
                {
                    let mut p = self.counters.progress();
                    p.fed = offset;
                    p.pending.insert(offset);
                }
                let event = match (&self.group, keys.next()) {
                    (Some(group), Some(key)) => match group.decide(offset, event, key) {
                        Some(event) => event,
                        // Held for its owner: the cursor stays before it until released.
                        None => continue,
                    },
                    _ => event,
                };
                if !self.offer(&queue, &mut stop, offset, event).await {
                    // Not queued: the next feeder of this row starts with it.
                    let mut p = self.counters.progress();
                    p.pending.remove(&offset);
                    p.fed = offset - 1;
                    return;
                }
            }
            let done = self.counters.progress().done();
            self.store.set_cursor(&self.name, done);
        }
    }
}

/// What a worker needs besides its queue.
pub(super) struct Worker {
    pub name: String,
    pub action: Action,
    pub options: RowOptions,
    pub exec_timeout: Duration,
    pub counters: Arc<RowCounters>,
    pub stats: Arc<Stats>,
    pub jq: Option<Arc<super::jq::RowJq>>,
    pub store: Store,
    /// The row's group, if it is in one.
    pub group: Option<Arc<GroupRow>>,
    /// Where a reply row's answers go (to the swarm task), if it answers.
    pub answers: Option<mpsc::Sender<Answer>>,
}

impl Worker {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(
            this.options.concurrency.clamp(1, MAX_CONCURRENCY),
        ));
        let mut running = JoinSet::new();
        let mut batch = Vec::with_capacity(WORKER_BATCH);
        loop {
            // Take work off the queue only when it can start: what waits, waits in the queue
            // (where `queue_depth` sees it), not in this task.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let limit = if this.batches() { WORKER_BATCH } else { 1 };
            if rx.recv_many(&mut batch, limit).await == 0 {
                break;
            }
            let mut offsets = Vec::with_capacity(batch.len());
            let mut events = Vec::with_capacity(batch.len());
            let mut room = Vec::with_capacity(batch.len());
            for (offset, event, bytes) in batch.drain(..) {
                offsets.push(offset);
                events.push(event);
                room.push(bytes);
            }
            this.counters
                .queued
                .fetch_sub(offsets.len() as u64, Ordering::Relaxed);
            // A group row tells its group what it finished, by stream and seq.
            let streams: Vec<(StreamId, u64)> = match &this.group {
                Some(_) => events.iter().map(|e| (StreamId::of(e), e.seq)).collect(),
                None => Vec::new(),
            };
            let events = this.select(&offsets, events).await;
            if events.is_empty() {
                this.finished(&offsets, &streams).await;
                continue;
            }
            let worker = this.clone();
            running.spawn(async move {
                worker.attempt_all(events).await;
                worker.finished(&offsets, &streams).await;
                drop((permit, room));
            });
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    }

    /// These events are done with (handled, failed or filtered out): the row's cursor moves
    /// past them once everything before them is done too, and is on disk before the row
    /// takes more, so a crash repeats at most what was in flight.
    async fn finished(&self, offsets: &[u64], streams: &[(StreamId, u64)]) {
        if let Some(group) = &self.group {
            let mut state = group.state();
            for (stream, seq) in streams {
                state.finished(*stream, *seq);
            }
        }
        let done = self.counters.progress().resolve(offsets.iter().copied());
        self.store.set_cursor(&self.name, done);
        match self.store.flush().await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => crate::store::warn_log_failed(&self.name, &error),
            Err(_) => {} // the log is closing; its last commit writes the cursor
        }
    }

    /// `file` and `log` write a batch at once; the others run event by event.
    fn batches(&self) -> bool {
        matches!(self.action, Action::File(_) | Action::Log)
    }

    /// Applies the row's jq filter and transform; returns each kept event with what the
    /// action gets (its JSON line, or the transform's output).
    async fn select(&self, offsets: &[u64], events: Vec<Arc<Event>>) -> Vec<(Arc<Event>, String)> {
        // An event whose group key failed is this row's failure for it (dead-lettered).
        let events = match &self.group {
            Some(group) if group.key.is_some() => {
                let mut kept = Vec::with_capacity(events.len());
                for (offset, event) in offsets.iter().zip(events) {
                    match group.key_error(*offset) {
                        Some(error) => self.fail_early(&event, ActionError::Jq(error)).await,
                        None => kept.push(event),
                    }
                }
                kept
            }
            _ => events,
        };
        // A reply row does not run a query older than the longest a query waits (found after
        // downtime or a `--replay`): nobody listens for its answer. It counts as filtered out.
        let events = if self.answers.is_some() {
            let max = crate::node::MAX_QUERY_TIMEOUT.as_micros() as u64;
            let (stale, fresh): (Vec<_>, Vec<_>) = events
                .into_iter()
                .partition(|e| crate::event::is_query(e) && crate::clock::age_micros(e.time) > max);
            stats::add(&self.counters.filtered_out, stale.len() as u64);
            fresh
        } else {
            events
        };
        let Some(jq) = &self.jq else {
            // Only the actions that send the JSON pay for it.
            return events
                .into_iter()
                .map(|event| {
                    let line = match self.action {
                        Action::File(_) | Action::Exec(_) | Action::Http(_) => event.to_json_line(),
                        Action::Log | Action::Rust(_) | Action::Query(_) => String::new(),
                    };
                    (event, line)
                })
                .collect();
        };
        // jq runs user code that may take long or never end: off the async threads, and
        // given up on after JQ_TIMEOUT (the evaluation itself cannot be stopped; see README).
        let (jq, batch) = (jq.clone(), events.clone());
        let evaluated = tokio::time::timeout(
            JQ_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                batch
                    .iter()
                    .map(|event| jq.apply(event))
                    .collect::<Vec<_>>()
            }),
        )
        .await;
        let results = match evaluated {
            Ok(Ok(results)) => results,
            Ok(Err(join)) => vec![Err(format!("jq evaluation failed: {join}")); events.len()],
            Err(_) => vec![Err(format!("jq did not finish within {JQ_TIMEOUT:?}")); events.len()],
        };
        let mut kept = Vec::with_capacity(events.len());
        for (event, result) in events.into_iter().zip(results) {
            match result {
                Ok(Some(input)) => kept.push((event, input)),
                Ok(None) => stats::bump(&self.counters.filtered_out),
                // A filter that fails on an event is a failure of this row for it.
                Err(error) => self.fail_early(&event, ActionError::Jq(error)).await,
            }
        }
        kept
    }

    /// Runs the action on the events, retrying with backoff; records the outcome of each.
    async fn attempt_all(&self, events: Vec<(Arc<Event>, String)>) {
        self.counters
            .in_flight
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut attempt = 0;
        let result = loop {
            let result = self.attempt(&events).await;
            match &result {
                Err(e) if e.retryable() && attempt < self.options.retries => {
                    attempt += 1;
                    stats::add(&self.counters.retried, events.len() as u64);
                    let wait = e
                        .retry_after()
                        .unwrap_or_else(|| self.options.backoff_for(attempt))
                        .min(self.options.backoff_max);
                    tracing::debug!(handler = %self.name, attempt, ?wait, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                }
                _ => break result,
            }
        };
        let (answer, error) = match result {
            Ok(answer) => (answer.map(Ok), None),
            Err(e) => (Some(Err(e.to_string())), Some(e.to_string())),
        };
        if let (Some(answer), [(event, _)]) = (answer, &events[..]) {
            self.answer(event, answer);
        }
        for (event, _) in &events {
            self.finish(event, error.clone(), attempt + 1).await;
        }
        self.counters
            .in_flight
            .fetch_sub(events.len() as u64, Ordering::Relaxed);
    }

    /// Runs the action once on the events. A reply row (which runs one event at a time)
    /// returns the action's output as its answer.
    async fn attempt(
        &self,
        events: &[(Arc<Event>, String)],
    ) -> Result<Option<serde_json::Value>, ActionError> {
        let reply = self.answers.is_some();
        match &self.action {
            Action::Log => {
                let events: Vec<Arc<Event>> = events.iter().map(|(e, _)| e.clone()).collect();
                action::log(&events).await.map(|()| None)
            }
            Action::File(file) => {
                let mut lines = Vec::with_capacity(events.len() * 384);
                for (_, input) in events {
                    lines.extend_from_slice(input.as_bytes());
                    lines.push(b'\n');
                }
                file.append(lines).await.map(|()| None)
            }
            Action::Exec(exec) => {
                let mut out = String::new();
                for (event, input) in events {
                    let mut line = input.clone();
                    line.push('\n');
                    out = action::exec(exec, self.exec_timeout, event, &line).await?;
                }
                Ok(reply.then(|| answer_from(out.as_bytes())))
            }
            Action::Http(http) => {
                let mut body = Vec::new();
                for (event, input) in events {
                    body = http.post(event, input, reply).await?;
                }
                Ok(reply.then(|| answer_from(&body)))
            }
            Action::Query(f) => {
                let mut answer = serde_json::Value::Null;
                for (event, _) in events {
                    answer = caught(f(event.clone())).await?;
                }
                Ok(Some(answer))
            }
            Action::Rust(f) => {
                for (event, _) in events {
                    caught(f(event.clone())).await?;
                }
                Ok(None)
            }
        }
    }

    /// A reply row's answer to a query goes to the swarm task, which sends it to the asker.
    fn answer(&self, event: &Event, answer: Result<serde_json::Value, String>) {
        let Some(answers) = &self.answers else {
            return;
        };
        if !crate::event::is_query(event) {
            return;
        }
        let answer = Answer {
            to: event.source,
            query: event.id.to_string(),
            handler: self.name.clone(),
            answer,
        };
        if answers.try_send(answer).is_err() {
            if let Some(n) = stats::bump_throttled(&self.stats.answers_dropped) {
                warn!(handler = %self.name, dropped_so_far = n,
                    "an answer was dropped: the swarm task is not taking them");
            }
        }
    }

    /// An event that failed before its action ran (its key or filter): a failure of the
    /// row, and for a query, an answer saying why, so the asker need not wait it out.
    async fn fail_early(&self, event: &Arc<Event>, error: ActionError) {
        let error = error.to_string();
        self.answer(event, Err(error.clone()));
        self.finish(event, Some(error), 1).await;
    }

    /// Counts an event's outcome; a failure is logged and, if the row has one, written to
    /// the dead-letter file.
    async fn finish(&self, event: &Arc<Event>, error: Option<String>, attempts: u32) {
        self.counters
            .latency
            .record(crate::clock::age_micros(event.time));
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        self.counters.last_done.store(now, Ordering::Relaxed);
        let Some(error) = error else {
            stats::bump(&self.counters.succeeded);
            stats::bump(&self.stats.handler_succeeded);
            return;
        };
        stats::bump(&self.counters.failed);
        stats::bump(&self.stats.handler_failed);
        warn!(handler = %self.name, event = %event.id, topic = %event.topic, attempts,
            error = %error, "handler failed");
        *self
            .counters
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        let Some(path) = &self.options.dead_letter else {
            return;
        };
        let record = serde_json::json!({
            "handler": self.name,
            "error": error,
            "attempts": attempts,
            "failed_at": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "event": event.to_cloudevent(),
        });
        let mut line = record.to_string();
        line.push('\n');
        match FileAction::new(path).append(line.into_bytes()).await {
            Ok(()) => stats::bump(&self.counters.dead_lettered),
            Err(e) => {
                warn!(handler = %self.name, event = %event.id, error = %e, "cannot write the dead letter")
            }
        }
    }
}

/// Runs Rust handler code; a panic is a failed run of the row, not a dead worker.
async fn caught<T>(
    run: impl std::future::Future<Output = Result<T, action::BoxError>>,
) -> Result<T, ActionError> {
    use futures::FutureExt as _;
    std::panic::AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ActionError::Rust(format!("handler panicked: {what}").into())
        })?
        .map_err(ActionError::Rust)
}

/// An action's output as an answer: JSON if it parses, else the text; nothing is `null`.
pub(super) fn answer_from(out: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(out);
    let text = text.trim();
    if text.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_json_or_text() {
        assert_eq!(answer_from(b"{\"a\":1}\n"), serde_json::json!({"a": 1}));
        assert_eq!(answer_from(b"h1\n"), serde_json::json!("h1"));
        assert_eq!(answer_from(b"  "), serde_json::Value::Null);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = RowOptions {
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            ..RowOptions::default()
        };
        let waits: Vec<u128> = (1..=5).map(|a| o.backoff_for(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
    }
}
