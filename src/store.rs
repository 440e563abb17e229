//! The event log: every event this peer holds, once, in the order it took them in, kept in
//! redb (`<data dir>/log.redb`, or in memory for a node without a data directory).
//!
//! Each event gets the next *offset* of this log. Events of one publisher are appended in its
//! order (the inbox sees to that), so a reader that follows offsets sees every publisher in
//! order. Handler rows are such readers: each keeps a cursor (the last offset it finished),
//! persisted here, so a restarted peer resumes where it stopped. Repair reads a publisher's
//! events back by `(source, epoch, seq)`.
//!
//! One thread writes. Appends queue up while a commit is on its way to the disk and go into
//! the next one together (group commit): this peer's own events commit with
//! [`redb::Durability::Immediate`] (fsynced before `publish` returns). Events from other
//! peers are *staged*: they take their offsets and are readable (from memory) at once, and
//! go to the database with the next commit, at most [`LINGER`] later, or sooner when anyone
//! waits for the disk ([`Store::flush`], a publish). A redb commit costs about half a
//! millisecond of CPU however little it carries, so one per received message was most of a
//! receiver's work; a crash that loses staged events also loses the marks that say they were
//! held, and they are fetched again. Cursors are written at least every [`FLUSH_EVERY`], and
//! a cursor on disk never points past the events on disk (they go in the same commit or an
//! earlier one). The log keeps at most [`Retention`] events, bytes and age, dropping
//! the oldest first.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use libp2p::PeerId;
use redb::{
    Database, Durability, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _,
    TableDefinition,
};
use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use crate::event::Event;
use crate::proto::StreamId;
use crate::wire;

/// Records of events: the offset of a record's first event → (when this peer stored it, µs
/// since 1970; the source's peer id bytes; how many events; the events as one wire-format
/// batch, [`wire::encode_batch`]). A record holds consecutive events of one stream with
/// consecutive numbers (or local `_mesh.` events of this peer), so one insert stores a whole
/// gossiped message's worth, and its events take consecutive offsets.
const EVENTS: TableDefinition<u64, Record> = TableDefinition::new("events");

/// A record's value: stored at, source, event count, batch.
type Record = (u64, &'static [u8], u64, &'static [u8]);
/// (source, epoch, seq of a record's first event) → the record's offset.
const INDEX: TableDefinition<(&[u8], u64, u64), u64> = TableDefinition::new("index");
/// (source, epoch) → (highest seq held, first seq still held).
const STREAMS: TableDefinition<(&[u8], u64), (u64, u64)> = TableDefinition::new("streams");
/// Handler row name → last offset it finished.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Counters: "epoch", "head", "first", "bytes".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// "format" and "peer": what this log is and whose.
const OWNER: TableDefinition<&str, &[u8]> = TableDefinition::new("owner");

/// What a meshbus log says it is.
const FORMAT: &[u8] = b"meshbus-log-1";

/// Longest a cursor set without [`Store::flush`] waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Newest events also kept in memory, so rows that keep up never read the disk: at most this
/// many, and at most [`CACHE_BYTES`] of them. Staged events stay whatever the bounds (they are
/// readable only from here); [`MAX_STAGED`] and [`MAX_STAGED_BYTES`] bound those.
const CACHE_EVENTS: usize = 64 * 1024;
/// Bytes of cached events (by [`Event::footprint`]) past which the oldest committed ones go.
/// 64 Ki events of 256 bytes fit; of the largest events (256 KiB), the newest 128 do.
const CACHE_BYTES: usize = 32 << 20;

/// Bytes redb may keep in memory (its read cache and write buffer; redb's default is 1 GiB).
/// The newest events are in [`Cache`] already, and the kernel caches the file.
const DB_CACHE_BYTES: usize = 16 << 20;

/// Longest an event from another peer stays staged (readable, not yet in the database).
pub const LINGER: Duration = Duration::from_millis(50);

/// Staged events (or bytes of them) that make a commit at once rather than at [`LINGER`].
const STAGE_EVENTS: usize = 4096;
/// Bytes of staged events (by [`Event::footprint`]) that make a commit at once.
const STAGE_BYTES: usize = 4 << 20;

/// The wait before a failed commit is tried again, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How often the writer looks for events past their age when nothing else is written.
const AGE_CHECK: Duration = Duration::from_secs(1);

/// Most events staged while commits fail; past it, events from other peers are refused
/// (counted in [`LogStatus::refused`] and logged; this peer's log lacks them, other peers
/// still hold them).
const MAX_STAGED: usize = 16 * 1024;
/// Bytes staged past which, while commits fail, events from other peers are refused.
const MAX_STAGED_BYTES: usize = 64 << 20;

/// Most appends gathered into one commit.
const MAX_GROUP: usize = 4096;

/// Reads of one fetch before it gives up ([`StoreError::Moving`]): each is retried only
/// when a commit made the cache drop part of its answer while it read.
const FETCH_TRIES: usize = 4;

/// Most events dropped for retention in one commit (the rest go in the next ones).
const MAX_PRUNE: usize = 16 * 1024;

/// How much the log keeps. What falls out is gone from this peer: a peer that needs it then
/// must find it elsewhere, or it is lost (and announced). Events go a record at a time (the
/// events of one commit from one publisher), oldest first, so the log may hold up to one
/// record more than the bounds; the newest record stays until it ages out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most events.
    pub max_events: u64,
    /// Most bytes of encoded events.
    pub max_bytes: u64,
    /// Oldest event, by when this peer stored it (not its publish time: history fetched
    /// late is kept as long as anything else).
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_events: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why the log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open the event log {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: redb::DatabaseError,
    },
    /// The file is not this peer's meshbus log; it is left as it is.
    #[error("{} is not this peer's meshbus event log ({reason}); move it away or use another --data-dir", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("event log: {0}")]
    Db(#[from] redb::Error),
    /// A commit failed (the writer logged the cause).
    #[error("event log commit failed: {0}")]
    Commit(String),
    /// A stored event does not decode.
    #[error("event log holds an event that does not decode at offset {offset}: {error}")]
    Corrupt {
        /// Where.
        offset: u64,
        /// Why.
        error: wire::WireError,
    },
    /// This peer's events must be stored in order; an earlier append failed.
    #[error("an earlier publish could not be stored; seq {expected} comes next, not {got}")]
    OutOfOrder {
        /// The next number.
        expected: u64,
        /// The one offered.
        got: u64,
    },
    /// The writer has stopped.
    #[error("the event log is closed")]
    Closed,
    /// Commits kept moving events out of memory while a fetch read them; it may be asked
    /// again.
    #[error("the event log kept changing while it was read; ask again")]
    Moving,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// What the log held when it was opened.
#[derive(Debug, Clone)]
pub struct Opened {
    /// This peer's epoch.
    pub epoch: u64,
    /// The last of its own events stored.
    pub own_seq: u64,
    /// Every stream held and how far.
    pub streams: Vec<(StreamId, u64)>,
}

/// Events answering a repair fetch.
#[derive(Debug, Default)]
pub struct Range {
    /// The first seq of the stream still held (0 if none is).
    pub first: u64,
    /// The events, encoded, in order.
    pub events: Vec<Vec<u8>>,
}

/// Counters of the log, for `status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LogStatus {
    /// The last offset appended.
    pub head: u64,
    /// The oldest offset held.
    pub first: u64,
    /// Bytes of events held.
    pub bytes: u64,
    /// This peer's epoch.
    pub epoch: u64,
    /// Events dropped for retention since start.
    pub pruned: u64,
    /// Commits that failed since start.
    pub write_errors: u64,
    /// Events from other peers refused since start because commits kept failing (they are
    /// not in this peer's log; other peers still hold them).
    #[serde(default)]
    pub refused: u64,
    /// How long commits took (to disk, for those that wait for it).
    #[serde(default)]
    pub commit_latency: crate::stats::Latency,
}

enum Write {
    Append {
        events: Vec<Arc<Event>>,
        durable: bool,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A cursor changed while none was waiting to be written: write it within
    /// [`FLUSH_EVERY`].
    Cursors,
    Stop(oneshot::Sender<()>),
}

/// Events to append, whether to wait for the disk, and who waits for the commit.
type Append = (
    Vec<Arc<Event>>,
    bool,
    oneshot::Sender<Result<(), StoreError>>,
);

struct Inner {
    db: Database,
    me: PeerId,
    epoch: u64,
    retention: Retention,
    cache: Mutex<Cache>,
    head: watch::Sender<u64>,
    first: AtomicU64,
    bytes: AtomicU64,
    pruned: AtomicU64,
    write_errors: AtomicU64,
    /// The last offset in the database (those after it are staged, in the cache).
    committed: AtomicU64,
    /// Events from other peers refused while commits failed, and how often.
    refused: AtomicU64,
    refusals: AtomicU64,
    commit_latency: crate::stats::Histogram,
    /// Cursors changed since the last commit.
    dirty: Mutex<BTreeMap<String, Option<u64>>>,
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    writes: std_mpsc::Sender<Write>,
}

impl Store {
    /// Opens (or creates) the log of peer `me` in `dir`, or in memory without one, and starts
    /// its writer thread. A file that is not this peer's log is refused, never changed.
    pub fn open(
        dir: Option<&Path>,
        me: PeerId,
        retention: Retention,
    ) -> Result<(Store, Opened), StoreError> {
        let (db, path) = match dir {
            Some(dir) => {
                let path = dir.join("log.redb");
                let db = Database::builder()
                    .set_cache_size(DB_CACHE_BYTES)
                    .create(&path)
                    .map_err(|source| StoreError::Open {
                        path: path.clone(),
                        source,
                    })?;
                (db, path)
            }
            None => {
                let db = Database::builder()
                    .set_cache_size(DB_CACHE_BYTES)
                    .create_with_backend(redb::backends::InMemoryBackend::new())
                    .map_err(|source| StoreError::Open {
                        path: "(memory)".into(),
                        source,
                    })?;
                (db, PathBuf::from("(memory)"))
            }
        };
        let (epoch, head, first, bytes, own_seq, streams) = init(&db, me, &path)?;
        let inner = Arc::new(Inner {
            db,
            me,
            epoch,
            retention,
            cache: Mutex::new(Cache::default()),
            head: watch::channel(head).0,
            first: AtomicU64::new(first),
            bytes: AtomicU64::new(bytes),
            pruned: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            committed: AtomicU64::new(head),
            refused: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            commit_latency: crate::stats::Histogram::default(),
            dirty: Mutex::new(BTreeMap::new()),
        });
        let (writes, rx) = std_mpsc::channel();
        let writer = Writer {
            inner: inner.clone(),
            own_seq,
            committed: head,
            staged: Vec::new(),
            staged_events: 0,
            staged_bytes: 0,
            staged_since: None,
            cursors_since: None,
            retry_at: None,
            backoff: RETRY_FIRST,
        };
        std::thread::Builder::new()
            .name("meshbus-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| db_err(redb::Error::Io(e)))?;
        Ok((
            Store { inner, writes },
            Opened {
                epoch,
                own_seq,
                streams,
            },
        ))
    }

    /// This peer's epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Appends events, in order; the answer comes once they are committed (and on disk, if
    /// `durable`).
    pub fn append(
        &self,
        events: Vec<Arc<Event>>,
        durable: bool,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        if let Err(std_mpsc::SendError(Write::Append { done, .. })) =
            self.writes.send(Write::Append {
                events,
                durable,
                done,
            })
        {
            let _ = done.send(Err(StoreError::Closed));
        }
        rx
    }

    /// The last offset appended.
    pub fn last(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// The last offset appended, watched.
    pub fn head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    /// Up to `max` events after offset `after`, in order. If the log no longer holds
    /// `after + 1`, it starts at the oldest it holds: the caller sees the jump.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Arc<Event>)>, StoreError> {
        {
            let cache = &lock(&self.inner.cache).events;
            if let Some(&(front, _)) = cache.front() {
                if after + 1 >= front {
                    let skip = (after + 1 - front) as usize;
                    return Ok(cache.iter().skip(skip).take(max).cloned().collect());
                }
            }
        }
        let read = self.inner.db.begin_read().map_err(db_err)?;
        let events = read.open_table(EVENTS).map_err(db_err)?;
        let want = after + 1;
        // The record holding `want`, if any, then those after it.
        let start = match events.range(..=want).map_err(db_err)?.next_back() {
            Some(entry) => entry.map_err(db_err)?.0.value(),
            None => want,
        };
        let mut out = Vec::new();
        for entry in events.range(start..).map_err(db_err)? {
            let (offset, value) = entry.map_err(db_err)?;
            let (_, source, _, batch) = value.value();
            let offset = offset.value();
            for (i, event) in decode(offset, source, batch)?.into_iter().enumerate() {
                let at = offset + i as u64;
                if at >= want {
                    out.push((at, Arc::new(event)));
                }
            }
            if out.len() >= max {
                out.truncate(max);
                break;
            }
        }
        Ok(out)
    }

    /// Events `from..=to` of `stream`, at most `max_bytes` of them (at least one), and where
    /// the stream starts in this log.
    pub fn fetch(
        &self,
        stream: StreamId,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Range, StoreError> {
        for _ in 0..FETCH_TRIES {
            if let Some(range) = self.try_fetch(stream, from, to, max_bytes)? {
                return Ok(range);
            }
        }
        Err(StoreError::Moving)
    }

    /// [`Store::fetch`], or `None` if a commit made the cache drop events of the answer
    /// between its two parts (the database's and the cache's).
    fn try_fetch(
        &self,
        stream: StreamId,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Option<Range>, StoreError> {
        let mut range = Range::default();
        let mut bytes = 0;
        // The next seq wanted; what the database lacks may be staged.
        let mut next = from;
        let mut full = false;
        let source = stream.source.to_bytes();
        // Read before the snapshot is taken: whatever is committed after this is newer than
        // it, so it is in the snapshot or in the cache, unless the cache dropped it since
        // (then the answer is read again).
        let committed = self.inner.committed.load(Ordering::Acquire);
        let read = self.inner.db.begin_read().map_err(db_err)?;
        let streams = read.open_table(STREAMS).map_err(db_err)?;
        let held = streams
            .get((source.as_slice(), stream.epoch))
            .map_err(db_err)?
            .map(|g| g.value());
        if let Some((high, first)) = held {
            range.first = first;
            next = from.max(first);
            let end = to.min(high);
            if next <= end {
                let index = read.open_table(INDEX).map_err(db_err)?;
                let events = read.open_table(EVENTS).map_err(db_err)?;
                let key = |seq| (source.as_slice(), stream.epoch, seq);
                // The record holding `next`, then the following records of the stream.
                let from_record = match index.range(key(0)..=key(next)).map_err(db_err)?.next_back()
                {
                    Some(entry) => entry.map_err(db_err)?.0.value().2,
                    None => next,
                };
                'records: for entry in index.range(key(from_record)..=key(end)).map_err(db_err)? {
                    let (_, offset) = entry.map_err(db_err)?;
                    let offset = offset.value();
                    let Some(value) = events.get(offset).map_err(db_err)? else {
                        break;
                    };
                    let (_, source, _, batch) = value.value();
                    for event in decode(offset, source, batch)? {
                        if event.seq < next {
                            continue;
                        }
                        if event.seq > end {
                            break 'records;
                        }
                        let encoded = wire::encode_event(&event);
                        if !range.events.is_empty() && bytes + encoded.len() > max_bytes {
                            full = true;
                            break 'records;
                        }
                        bytes += encoded.len();
                        range.events.push(encoded);
                        next = event.seq + 1;
                    }
                }
            }
        }
        if full || next > to {
            return Ok(Some(range));
        }
        // Staged events (received, not yet committed) are the newest in the cache.
        let cache = lock(&self.inner.cache);
        let whole = match cache.events.front() {
            Some(&(front, _)) => front <= committed + 1,
            None => *self.inner.head.borrow() <= committed,
        };
        if !whole {
            return Ok(None);
        }
        let mut ours: Vec<Arc<Event>> = cache
            .events
            .iter()
            .rev()
            .take_while(|(offset, _)| *offset > committed)
            .map(|(_, e)| e)
            .filter(|e| e.source == stream.source && e.epoch == stream.epoch && e.seq > 0)
            .cloned()
            .collect();
        drop(cache);
        ours.reverse();
        if held.is_none() {
            range.first = ours.first().map_or(0, |e| e.seq);
        }
        for event in ours {
            if event.seq < next {
                continue;
            }
            if event.seq > next || event.seq > to {
                break;
            }
            let encoded = wire::encode_event(&event);
            if !range.events.is_empty() && bytes + encoded.len() > max_bytes {
                break;
            }
            bytes += encoded.len();
            range.events.push(encoded);
            next = event.seq + 1;
        }
        Ok(Some(range))
    }

    /// The first offset whose event was published at or after `since`, for replays.
    pub fn offset_since(&self, since: SystemTime) -> Result<u64, StoreError> {
        let read = self.inner.db.begin_read().map_err(db_err)?;
        let events = read.open_table(EVENTS).map_err(db_err)?;
        for entry in events.iter().map_err(db_err)? {
            let (offset, value) = entry.map_err(db_err)?;
            let (_, source, _, batch) = value.value();
            let offset = offset.value();
            for (i, event) in decode(offset, source, batch)?.into_iter().enumerate() {
                if event.time >= since {
                    return Ok(offset + i as u64);
                }
            }
        }
        Ok(*self.inner.head.borrow() + 1)
    }

    /// Where handler row `name` stopped last time, if it ran before.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        if let Some(pending) = lock(&self.inner.dirty).get(name) {
            return Ok(*pending);
        }
        let read = self.inner.db.begin_read().map_err(db_err)?;
        let cursors = read.open_table(CURSORS).map_err(db_err)?;
        Ok(cursors.get(name).map_err(db_err)?.map(|g| g.value()))
    }

    /// Row `name` has finished everything up to `offset` (written within [`FLUSH_EVERY`]).
    pub fn set_cursor(&self, name: &str, offset: u64) {
        self.cursor_changed(name, Some(offset));
    }

    /// Writes every cursor set so far to disk; the answer comes once they are there.
    pub fn flush(&self) -> oneshot::Receiver<Result<(), StoreError>> {
        self.append(Vec::new(), true)
    }

    /// Row `name` is gone; forget its cursor.
    pub fn remove_cursor(&self, name: &str) {
        self.cursor_changed(name, None);
    }

    /// Notes a cursor to write; the writer hears of it when it is the first one waiting (it
    /// sleeps until then, rather than looking every [`FLUSH_EVERY`]).
    fn cursor_changed(&self, name: &str, offset: Option<u64>) {
        let mut dirty = lock(&self.inner.dirty);
        let first = dirty.is_empty();
        dirty.insert(name.to_owned(), offset);
        drop(dirty);
        if first {
            // A closed log writes no more cursors; `close` wrote the last ones.
            let _ = self.writes.send(Write::Cursors);
        }
    }

    /// The log's counters.
    pub fn status(&self) -> LogStatus {
        let i = &self.inner;
        LogStatus {
            head: *i.head.borrow(),
            first: i.first.load(Ordering::Relaxed),
            bytes: i.bytes.load(Ordering::Relaxed),
            epoch: i.epoch,
            pruned: i.pruned.load(Ordering::Relaxed),
            write_errors: i.write_errors.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
            commit_latency: i.commit_latency.summary(),
        }
    }

    /// Writes what is pending (cursors included, to disk) and stops the writer.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Write::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The events of the record at `offset`.
fn decode(offset: u64, source: &[u8], batch: &[u8]) -> Result<Vec<Event>, StoreError> {
    let source = PeerId::from_bytes(source).map_err(|e| StoreError::Corrupt {
        offset,
        error: wire::WireError::Decode(e.to_string()),
    })?;
    wire::decode_stored_batch(batch, source).map_err(|error| StoreError::Corrupt { offset, error })
}

type Init = (u64, u64, u64, u64, u64, Vec<(StreamId, u64)>);

/// Checks the log is ours (or makes it so, if new) and reads where it stands.
fn init(db: &Database, me: PeerId, path: &Path) -> Result<Init, StoreError> {
    let foreign = |reason: String| StoreError::Foreign {
        path: path.to_owned(),
        reason,
    };
    let txn = db.begin_write().map_err(db_err)?;
    let me_bytes = me.to_bytes();
    {
        let mut owner = txn.open_table(OWNER).map_err(db_err)?;
        let format = owner
            .get("format")
            .map_err(db_err)?
            .map(|g| g.value().to_vec());
        match format {
            None => {
                if owner.len().map_err(db_err)? > 0 {
                    return Err(foreign("no format mark".into()));
                }
                owner.insert("format", FORMAT).map_err(db_err)?;
                owner.insert("peer", me_bytes.as_slice()).map_err(db_err)?;
            }
            Some(f) if f != FORMAT => {
                return Err(foreign(format!(
                    "format `{}`, expected `{}`",
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                )))
            }
            Some(_) => {
                let peer = owner
                    .get("peer")
                    .map_err(db_err)?
                    .map(|g| g.value().to_vec());
                if peer.as_deref() != Some(me_bytes.as_slice()) {
                    let theirs = peer
                        .and_then(|p| PeerId::from_bytes(&p).ok())
                        .map_or_else(|| "no peer".into(), |p| p.to_string());
                    return Err(foreign(format!(
                        "it belongs to peer {theirs}, this is {me}"
                    )));
                }
            }
        }
        let mut meta = txn.open_table(META).map_err(db_err)?;
        if meta.get("epoch").map_err(db_err)?.is_none() {
            let now = crate::clock::unix_micros(SystemTime::now()).max(1);
            meta.insert("epoch", now).map_err(db_err)?;
        }
        txn.open_table(EVENTS).map_err(db_err)?;
        txn.open_table(INDEX).map_err(db_err)?;
        txn.open_table(STREAMS).map_err(db_err)?;
        txn.open_table(CURSORS).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    let read = db.begin_read().map_err(db_err)?;
    let meta = read.open_table(META).map_err(db_err)?;
    let get = |key: &str| -> Result<u64, StoreError> {
        Ok(meta.get(key).map_err(db_err)?.map_or(0, |g| g.value()))
    };
    let (epoch, head, bytes) = (get("epoch")?, get("head")?, get("bytes")?);
    let first = get("first")?.max(1);
    let mut own_seq = 0;
    let mut streams = Vec::new();
    for entry in read
        .open_table(STREAMS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (key, value) = entry.map_err(db_err)?;
        let (source, stream_epoch) = key.value();
        let Ok(source) = PeerId::from_bytes(source) else {
            return Err(foreign("a stream with an unreadable peer id".into()));
        };
        let (high, _) = value.value();
        if source == me && stream_epoch == epoch {
            own_seq = high;
        }
        streams.push((
            StreamId {
                source,
                epoch: stream_epoch,
            },
            high,
        ));
    }
    Ok((epoch, head, first, bytes, own_seq, streams))
}

/// The writer thread's state: what is staged, and where the database stands.
struct Writer {
    inner: Arc<Inner>,
    /// The last of this peer's own events stored.
    own_seq: u64,
    /// The last offset in the database (staged events follow it).
    committed: u64,
    /// Events from other peers, readable and not yet in the database, in offset order.
    staged: Vec<Vec<Arc<Event>>>,
    staged_events: usize,
    staged_bytes: usize,
    /// When the oldest staged event was staged.
    staged_since: Option<Instant>,
    /// When a cursor changed with none waiting to be written.
    cursors_since: Option<Instant>,
    /// After a failed commit: no commit for what is staged before this.
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Write>) {
        let mut stop = None;
        // Age is checked once a second (it costs a read); count and bytes at every commit.
        let mut age_checked = Instant::now();
        while stop.is_none() {
            let now = Instant::now();
            // Staged events wait at most LINGER, cursors FLUSH_EVERY; with nothing waiting,
            // sleep until the age check.
            let mut wait = match (self.staged_since, self.cursors_since) {
                (Some(since), _) => (since + LINGER).saturating_duration_since(now),
                (None, Some(since)) => (since + FLUSH_EVERY).saturating_duration_since(now),
                (None, None) => (age_checked + AGE_CHECK).saturating_duration_since(now),
            };
            if let Some(retry_at) = self.retry_at {
                wait = wait.max(retry_at.saturating_duration_since(now));
            }
            let mut group = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(w) => group.push(w),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without `close`: write what is pending anyway.
                    if self.staged_since.is_some() || !lock(&self.inner.dirty).is_empty() {
                        let cursors = std::mem::take(&mut *lock(&self.inner.dirty));
                        self.commit(Vec::new(), cursors, true);
                    }
                    break;
                }
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::with_capacity(group.len());
            for w in group {
                match w {
                    Write::Append {
                        events,
                        durable,
                        done,
                    } => appends.push((events, durable, done)),
                    Write::Cursors => {
                        self.cursors_since.get_or_insert_with(Instant::now);
                    }
                    Write::Stop(reply) => stop = Some(reply),
                }
            }
            // Events from other peers are staged unless something in this group waits for
            // the disk, or one append is large (a repaired gap): then everything goes in one
            // commit, in the order it came.
            let now_wanted = stop.is_some()
                || appends
                    .iter()
                    .any(|(events, durable, _)| *durable || events.len() >= STAGE_EVENTS);
            if !now_wanted {
                for (events, _, done) in appends.drain(..) {
                    let _ = done.send(self.stage(events));
                    if self.full() && self.retry_at.is_none() {
                        self.commit(Vec::new(), BTreeMap::new(), false);
                    }
                }
            }
            let retry_due = self.retry_at.is_none_or(|at| Instant::now() >= at);
            let due = retry_due
                && (self
                    .staged_since
                    .is_some_and(|since| since.elapsed() >= LINGER)
                    || self.full());
            if self.cursors_since.is_some() && lock(&self.inner.dirty).is_empty() {
                // An earlier commit wrote them already (the wake came after it took them).
                self.cursors_since = None;
            }
            let cursors_due = self.staged_since.is_none()
                && self
                    .cursors_since
                    .is_some_and(|since| since.elapsed() >= FLUSH_EVERY);
            let age_due = age_checked.elapsed() >= AGE_CHECK && {
                age_checked = Instant::now();
                self.inner.prune_due()
            };
            if !(now_wanted || due || cursors_due || age_due) {
                continue;
            }
            let cursors = std::mem::take(&mut *lock(&self.inner.dirty));
            // Written now; a failed commit puts them back and waits again.
            self.cursors_since = None;
            self.commit(appends, cursors, stop.is_some());
        }
        // Let go of the database before saying so, so it can be opened again at once.
        drop(self);
        if let Some(reply) = stop {
            let _ = reply.send(());
        }
    }

    /// Cursors a commit did not write wait for the next one.
    fn put_back(&mut self, cursors: BTreeMap<String, Option<u64>>) {
        if !cursors.is_empty() {
            self.inner.put_back(cursors);
            self.cursors_since.get_or_insert_with(Instant::now);
        }
    }

    /// Whether enough is staged to commit now rather than at [`LINGER`].
    fn full(&self) -> bool {
        self.staged_events >= STAGE_EVENTS || self.staged_bytes >= STAGE_BYTES
    }

    /// Makes events from another peer readable now, with their offsets; the next commit
    /// writes them. Refused (counted, logged) only while commits fail and [`MAX_STAGED`]
    /// events or [`MAX_STAGED_BYTES`] are waiting.
    fn stage(&mut self, events: Vec<Arc<Event>>) -> Result<(), StoreError> {
        let over =
            self.staged_events + events.len() > MAX_STAGED || self.staged_bytes > MAX_STAGED_BYTES;
        if self.retry_at.is_some() && over {
            return Err(self.refuse(events.len()));
        }
        self.stage_anyway(events);
        Ok(())
    }

    /// Counts and logs (throttled) `n` events refused, and says why.
    fn refuse(&self, n: usize) -> StoreError {
        let inner = &self.inner;
        inner.refused.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(count) = crate::stats::bump_throttled(&inner.refusals) {
            error!(
                events = n,
                staged = self.staged_events,
                refusals_so_far = count,
                "event log: commits keep failing; events from other peers refused"
            );
        }
        StoreError::Commit(format!(
            "{} events wait for a commit that keeps failing; refused until it succeeds",
            self.staged_events
        ))
    }

    /// Stages `events` whatever is waiting: those a failed commit carried, which this log
    /// already took (refusing them now would lose them).
    fn stage_anyway(&mut self, events: Vec<Arc<Event>>) {
        if events.is_empty() {
            return;
        }
        let inner = &self.inner;
        let mut head = *inner.head.borrow();
        let mut cache = lock(&inner.cache);
        for event in &events {
            head += 1;
            self.staged_bytes += event.footprint();
            cache.push(head, event.clone());
        }
        cache.trim(inner.first.load(Ordering::Relaxed), self.committed);
        drop(cache);
        self.staged_events += events.len();
        self.staged_since.get_or_insert_with(Instant::now);
        self.staged.push(events);
        inner.head.send_replace(head);
    }

    /// Writes what is staged, then `appends`, and `cursors`, in one transaction.
    fn commit(
        &mut self,
        appends: Vec<Append>,
        cursors: BTreeMap<String, Option<u64>>,
        stopping: bool,
    ) {
        let inner = self.inner.clone();
        if !stopping && self.retry_at.is_some_and(|at| Instant::now() < at) {
            // Writes are failing and the next try is not due: whoever waits for the disk
            // hears so now; the rest waits for that try.
            self.put_back(cursors);
            for (events, durable, done) in appends {
                let result = if durable {
                    Err(StoreError::Commit(
                        "the event log's last commit failed; the next try is not due yet".into(),
                    ))
                } else {
                    self.stage(events)
                };
                let _ = done.send(result);
            }
            return;
        }
        let mut seq = self.own_seq;
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for (events, durable, done) in appends {
            // Own events must follow on from the last stored: never store past a gap.
            let own = events.first().filter(|e| e.source == inner.me && e.seq > 0);
            match own {
                Some(e) if e.seq != seq + 1 => refused.push((
                    done,
                    StoreError::OutOfOrder {
                        expected: seq + 1,
                        got: e.seq,
                    },
                )),
                _ => {
                    if let Some(last) = events.last().filter(|e| e.source == inner.me && e.seq > 0)
                    {
                        seq = last.seq;
                    }
                    accepted.push((events, durable, done));
                }
            }
        }
        for (done, error) in refused {
            let _ = done.send(Err(error));
        }
        let durable = stopping || !cursors.is_empty() || accepted.iter().any(|(_, d, _)| *d);
        let batches: Vec<&[Arc<Event>]> = self
            .staged
            .iter()
            .map(Vec::as_slice)
            .chain(accepted.iter().map(|(events, _, _)| events.as_slice()))
            .collect();
        let mut head = self.committed;
        let started = Instant::now();
        let written = inner.write(&batches, &cursors, durable, &mut head);
        inner
            .commit_latency
            .record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        match written {
            Ok(()) => {
                self.own_seq = seq;
                self.committed = head;
                inner.committed.store(head, Ordering::Release);
                self.retry_at = None;
                self.backoff = RETRY_FIRST;
                self.staged.clear();
                self.staged_events = 0;
                self.staged_bytes = 0;
                self.staged_since = None;
                // Staged events are in the cache already; the appended ones follow them.
                let mut cache = lock(&inner.cache);
                let mut offset = *inner.head.borrow();
                for (events, _, _) in &accepted {
                    for event in events {
                        offset += 1;
                        cache.push(offset, event.clone());
                    }
                }
                cache.trim(inner.first.load(Ordering::Relaxed), head);
                drop(cache);
                inner.head.send_replace(head);
                for (_, _, done) in accepted {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                if let Some(n) = crate::stats::bump_throttled(&inner.write_errors) {
                    error!(error = %e, failed_so_far = n, retry_in = ?self.backoff, "event log commit failed");
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                // Staged events stay staged, and cursors not written stay pending, for the
                // next commit: a cursor must not reach the disk before its events.
                self.put_back(cursors);
                // Events from other peers wait for the next commit; whoever waited for the
                // disk hears of the failure.
                for (events, durable, done) in accepted {
                    let result = if durable {
                        Err(StoreError::Commit(e.to_string()))
                    } else {
                        self.stage_anyway(events);
                        Ok(())
                    };
                    let _ = done.send(result);
                }
            }
        }
    }
}

/// The newest events, by offset, and how many bytes they take.
#[derive(Default)]
struct Cache {
    events: VecDeque<(u64, Arc<Event>)>,
    bytes: usize,
}

impl Cache {
    fn push(&mut self, offset: u64, event: Arc<Event>) {
        self.bytes += event.footprint();
        self.events.push_back((offset, event));
    }

    /// Drops the events before `first` (gone from the log), then the oldest past
    /// [`CACHE_EVENTS`] or [`CACHE_BYTES`] that are in the database (up to `committed`).
    fn trim(&mut self, first: u64, committed: u64) {
        while let Some((offset, event)) = self.events.front() {
            let over = self.events.len() > CACHE_EVENTS || self.bytes > CACHE_BYTES;
            if *offset >= first && !(over && *offset <= committed) {
                break;
            }
            self.bytes -= event.footprint();
            self.events.pop_front();
        }
    }
}

impl Inner {
    /// Cursors a commit did not write wait for the next one, unless set again since.
    fn put_back(&self, cursors: BTreeMap<String, Option<u64>>) {
        let mut dirty = lock(&self.dirty);
        for (name, offset) in cursors {
            dirty.entry(name).or_insert(offset);
        }
    }

    /// Whether the oldest event has aged out.
    fn prune_due(&self) -> bool {
        let first = self.first.load(Ordering::Relaxed);
        if first > *self.head.borrow() {
            return false;
        }
        let stored_at = || -> Result<Option<u64>, StoreError> {
            let read = self.db.begin_read().map_err(db_err)?;
            let events = read.open_table(EVENTS).map_err(db_err)?;
            Ok(events.get(first).map_err(db_err)?.map(|v| v.value().0))
        };
        match stored_at() {
            Ok(Some(at)) => at < self.age_cutoff(),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Events stored before this (µs since 1970) are past `max_age`.
    fn age_cutoff(&self) -> u64 {
        crate::clock::unix_micros(SystemTime::now())
            .saturating_sub(u64::try_from(self.retention.max_age.as_micros()).unwrap_or(u64::MAX))
    }

    fn write(
        &self,
        batches: &[&[Arc<Event>]],
        cursors: &BTreeMap<String, Option<u64>>,
        durable: bool,
        head: &mut u64,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| db_err(redb::Error::Corrupted(e.to_string())))?;
        let mut bytes = self.bytes.load(Ordering::Relaxed);
        let mut first = self.first.load(Ordering::Relaxed);
        let pruned_now;
        {
            let mut events = txn.open_table(EVENTS).map_err(db_err)?;
            let mut index = txn.open_table(INDEX).map_err(db_err)?;
            let mut streams = txn.open_table(STREAMS).map_err(db_err)?;
            let now = crate::clock::unix_micros(SystemTime::now());
            // Per stream, the highest seq appended and the first (if the stream is new);
            // written once per commit, not per event.
            let mut touched: BTreeMap<(Vec<u8>, u64), (u64, u64)> = BTreeMap::new();
            // Consecutive events of one stream with consecutive numbers make one record.
            let mut records: Vec<Vec<&Event>> = Vec::new();
            for event in batches.iter().flat_map(|batch| batch.iter()) {
                let joins = records.last().and_then(|r| r.last()).is_some_and(|last| {
                    last.source == event.source
                        && last.epoch == event.epoch
                        && ((last.seq == 0 && event.seq == 0)
                            || (last.seq > 0 && event.seq == last.seq + 1))
                });
                match records.last_mut() {
                    Some(record) if joins => record.push(event),
                    _ => records.push(vec![event]),
                }
            }
            for record in records {
                let head_event = record[0];
                let offset = *head + 1;
                *head += record.len() as u64;
                let source = head_event.source.to_bytes();
                let batch = wire::encode_batch(record.iter().copied());
                bytes += batch.len() as u64;
                let count = record.len() as u64;
                events
                    .insert(offset, (now, source.as_slice(), count, batch.as_slice()))
                    .map_err(db_err)?;
                if head_event.seq > 0 {
                    let (epoch, first_seq) = (head_event.epoch, head_event.seq);
                    let last_seq = first_seq + count - 1;
                    index
                        .insert((source.as_slice(), epoch, first_seq), offset)
                        .map_err(db_err)?;
                    touched
                        .entry((source, epoch))
                        .and_modify(|(high, _)| *high = (*high).max(last_seq))
                        .or_insert((last_seq, first_seq));
                }
            }
            for ((source, epoch), (high, low)) in touched {
                let key = (source.as_slice(), epoch);
                let (old_high, first) = streams
                    .get(key)
                    .map_err(db_err)?
                    .map_or((0, low), |g| g.value());
                streams
                    .insert(key, (old_high.max(high), first))
                    .map_err(db_err)?;
            }
            // Retention: drop the oldest while over any bound.
            let mut held = (*head + 1).saturating_sub(first);
            let cutoff = self.age_cutoff();
            let mut pruned = 0;
            while first <= *head && pruned < MAX_PRUNE {
                let Some(value) = events.get(first).map_err(db_err)? else {
                    first += 1;
                    continue;
                };
                let (stored_at, source, count, batch) = value.value();
                // Whole records go; the newest stays unless it has aged out.
                let newest = first + count > *head;
                let over = (!newest
                    && (held > self.retention.max_events || bytes > self.retention.max_bytes))
                    || stored_at < cutoff;
                if !over {
                    break;
                }
                let record = decode(first, source, batch)?;
                let len = batch.len() as u64;
                let source = source.to_vec();
                drop(value);
                events.remove(first).map_err(db_err)?;
                if let (Some(head_event), Some(last)) = (record.first(), record.last()) {
                    if head_event.seq > 0 {
                        let epoch = head_event.epoch;
                        index
                            .remove((source.as_slice(), epoch, head_event.seq))
                            .map_err(db_err)?;
                        let key = (source.as_slice(), epoch);
                        let high = streams.get(key).map_err(db_err)?.map(|g| g.value().0);
                        if let Some(high) = high {
                            streams.insert(key, (high, last.seq + 1)).map_err(db_err)?;
                        }
                    }
                }
                bytes = bytes.saturating_sub(len);
                held = held.saturating_sub(count);
                first += count.max(1);
                pruned += count as usize;
            }
            pruned_now = pruned;
            let mut table = txn.open_table(CURSORS).map_err(db_err)?;
            for (name, offset) in cursors {
                match offset {
                    Some(o) => table.insert(name.as_str(), *o).map_err(db_err)?,
                    None => table.remove(name.as_str()).map_err(db_err)?,
                };
            }
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert("head", *head).map_err(db_err)?;
            meta.insert("first", first).map_err(db_err)?;
            meta.insert("bytes", bytes).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        if pruned_now > 0 {
            self.pruned.fetch_add(pruned_now as u64, Ordering::Relaxed);
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        self.first.store(first, Ordering::Relaxed);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Failures of the log met by its readers (handler rows, `tail`), since start.
static USE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Logs (throttled) that `what` could not use the log.
pub(crate) fn warn_log_failed(what: &str, error: &StoreError) {
    if let Some(n) = crate::stats::bump_throttled(&USE_ERRORS) {
        warn!(%error, failed_so_far = n, "{what}: the event log failed");
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
