//! Receiving in order: every publisher's events reach the log once, in its order, and a gap
//! is fetched from a peer that holds the missing events.
//!
//! Events travel in *streams*, one per publisher and log epoch ([`StreamId`]), numbered
//! from one. For each stream the inbox keeps the highest number below which it holds
//! everything (`high`), a bounded buffer of events that came early, and what it knows other
//! peers hold (from the events they forwarded and from their marks in anti-entropy rounds).
//! An event at `high + 1` is ready, and so are the buffered ones that follow it; one at or below `high`,
//! or already buffered, is a duplicate. When a stream is behind what some peer holds and has
//! made no progress for [`GAP_WAIT`], [`Inbox::poll_fetch`] asks a holder for the missing
//! range, at most [`FETCH_MAX_EVENTS`] at a time, and asks again after [`ASK_TIMEOUT`] if no
//! answer came. A holder that no longer has the start of the range says where its log
//! starts; if the stream's publisher says so, or nobody else holds it, the events before that
//! are lost, and [`Inbox::poll_lost`] names the range so the loss is announced, never silent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::event::Event;

/// How long a stream may be behind without progress before its gap is fetched: long enough
/// for gossip's own reordering to fill it, short enough to repair within a second.
pub const GAP_WAIT: Duration = Duration::from_millis(150);

/// How long a fetch may go unanswered before it is asked again (of the next holder).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Events ahead of a gap kept per stream; later ones are dropped and fetched once the gap
/// is filled.
pub const MAX_BUFFERED: u64 = 65_536;

/// Bytes of events held ahead of gaps, per stream and in all; beyond them an event is
/// deferred (fetched once its gap is filled), so a publisher that never sends one number
/// cannot fill memory.
pub const MAX_BUFFERED_BYTES_PER_STREAM: usize = 64 << 20;
/// See [`MAX_BUFFERED_BYTES_PER_STREAM`].
pub const MAX_BUFFERED_BYTES: usize = 256 << 20;

/// Largest sequence number taken from the network (marks and answers above it are ignored,
/// events refused by the wire rules): far past any real count, and far enough from
/// `u64::MAX` that no arithmetic on it can overflow.
pub const MAX_SEQ: u64 = 1 << 62;

/// Streams (publishers × epochs) one peer follows.
pub const MAX_STREAMS: usize = 4096;

/// Most epochs of one publisher followed at once. A publisher starts a new epoch only when
/// its log is wiped, so more than a few means a peer making up epochs to fill the table.
pub const MAX_EPOCHS_PER_SOURCE: usize = 4;

/// Most events one fetch asks for.
pub const FETCH_MAX_EVENTS: u64 = 4096;

/// Peers remembered per stream as holding its events.
const MAX_HOLDERS: usize = 8;

/// One publisher's numbering: its peer id and log epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// The publisher.
    pub source: PeerId,
    /// Its log epoch.
    pub epoch: u64,
}

impl StreamId {
    /// The stream an event belongs to.
    pub fn of(event: &Event) -> Self {
        Self {
            source: event.source,
            epoch: event.epoch,
        }
    }
}

/// What became of a received event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New: ready now or buffered until the gap before it is filled.
    Fresh,
    /// Held already.
    Duplicate,
    /// Too far ahead of a gap to buffer; it will be fetched later.
    Deferred,
    /// From a stream beyond [`MAX_STREAMS`], or an epoch beyond [`MAX_EPOCHS_PER_SOURCE`].
    TooManyStreams,
}

/// Ask `peer` for events `from..=to` of `stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Who to ask.
    pub peer: PeerId,
    /// Whose events.
    pub stream: StreamId,
    /// First wanted.
    pub from: u64,
    /// Last wanted.
    pub to: u64,
}

/// Events `from..=to` of `stream` that no peer holds any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Whose events.
    pub stream: StreamId,
    /// First lost.
    pub from: u64,
    /// Last lost.
    pub to: u64,
}

#[derive(Debug)]
struct Stream {
    /// Every event numbered up to here has been made ready.
    high: u64,
    /// Events after a gap, by number, and their size.
    buffer: BTreeMap<u64, Event>,
    buffered_bytes: usize,
    /// The highest number some peer is known to hold.
    known: u64,
    /// Peers known to hold events of this stream, and up to which number; most recently
    /// heard of first.
    holders: VecDeque<(PeerId, u64)>,
    /// When `high` last moved, or the stream fell behind.
    progress_at: Instant,
    /// When the fetch in flight was asked, and of whom.
    asked: Option<(Instant, PeerId)>,
    /// Fetch again without waiting (the last answer said there is more).
    ask_now: bool,
    /// No holder was connected when last due: not before this.
    not_before: Option<Instant>,
}

impl Stream {
    fn new(high: u64, now: Instant) -> Self {
        Self {
            high,
            buffer: BTreeMap::new(),
            buffered_bytes: 0,
            known: high,
            holders: VecDeque::new(),
            progress_at: now,
            asked: None,
            ask_now: false,
            not_before: None,
        }
    }

    fn behind(&self) -> bool {
        self.known > self.high
    }

    fn holds(&mut self, peer: PeerId, upto: u64, now: Instant) {
        if !self.behind() && upto > self.high {
            self.progress_at = now;
        }
        self.known = self.known.max(upto);
        if upto > self.high {
            // Someone to ask: no need to wait for the next look.
            self.not_before = None;
        }
        let upto = match self.holders.iter().position(|(p, _)| *p == peer) {
            Some(i) => self.holders.remove(i).map_or(upto, |(_, u)| u.max(upto)),
            None => upto,
        };
        self.holders.push_front((peer, upto));
        self.holders.truncate(MAX_HOLDERS);
    }

    /// Takes the buffered event after `high`, if there is one.
    fn next_buffered(&mut self) -> Option<Event> {
        let event = self.buffer.remove(&(self.high + 1))?;
        self.buffered_bytes -= event.footprint();
        self.high += 1;
        Some(event)
    }

    /// `peer` turned out not to hold more than `high`: ask it last, and not for that.
    fn holds_no_more(&mut self, peer: PeerId) {
        if let Some(i) = self.holders.iter().position(|(p, _)| *p == peer) {
            self.holders.remove(i);
            self.holders.push_back((peer, self.high));
        }
    }

    /// When this stream next wants a fetch, if it is behind.
    fn due(&self) -> Option<Instant> {
        if !self.behind() {
            return None;
        }
        let due = match self.asked {
            Some((at, _)) => at + ASK_TIMEOUT,
            None if self.ask_now => self.progress_at,
            None => self.progress_at + GAP_WAIT,
        };
        Some(self.not_before.map_or(due, |t| due.max(t)))
    }
}

/// Every stream this peer follows.
#[derive(Debug)]
pub struct Inbox {
    me: PeerId,
    streams: BTreeMap<StreamId, Stream>,
    /// Bytes held in every stream's buffer.
    buffered_bytes: usize,
    /// Streams behind what a peer holds.
    behind: BTreeSet<StreamId>,
    ready: VecDeque<Event>,
    lost: VecDeque<Lost>,
}

impl Inbox {
    /// An inbox for peer `me`, following no stream yet.
    pub fn new(me: PeerId) -> Self {
        Self {
            me,
            streams: BTreeMap::new(),
            buffered_bytes: 0,
            behind: BTreeSet::new(),
            ready: VecDeque::new(),
            lost: VecDeque::new(),
        }
    }

    /// Picks up a stream where the log says it stands: everything up to `high` is held.
    pub fn restore(&mut self, stream: StreamId, high: u64, now: Instant) {
        self.streams.insert(stream, Stream::new(high, now));
    }

    /// Everything up to `high` of each stream followed; what anti-entropy tells peers.
    pub fn marks(&self) -> impl Iterator<Item = (StreamId, u64)> + '_ {
        self.streams.iter().map(|(id, s)| (*id, s.high))
    }

    /// Whether `stream` is followed.
    pub fn follows(&self, stream: &StreamId) -> bool {
        self.streams.contains_key(stream)
    }

    /// Streams followed.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream is followed.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Events held and not yet ready (waiting for a gap before them), in every stream.
    pub fn buffered(&self) -> usize {
        self.streams.values().map(|s| s.buffer.len()).sum()
    }

    /// This peer published up to `seq` of its own `stream`, which it never fetches.
    pub fn published(&mut self, stream: StreamId, seq: u64, now: Instant) {
        let s = self
            .streams
            .entry(stream)
            .or_insert_with(|| Stream::new(0, now));
        s.high = s.high.max(seq);
        s.known = s.high;
    }

    /// An event arrived from `from` (who forwarded it, or answered a fetch).
    pub fn receive(&mut self, event: Event, from: PeerId, now: Instant) -> Received {
        let id = StreamId::of(&event);
        if id.source == self.me {
            return Received::Duplicate;
        }
        let seq = event.seq;
        let Some(s) = followed(&mut self.streams, id, now) else {
            return Received::TooManyStreams;
        };
        s.holds(from, seq, now);
        let outcome = if seq <= s.high || s.buffer.contains_key(&seq) {
            Received::Duplicate
        } else if seq == s.high + 1 {
            s.high = seq;
            self.ready.push_back(event);
            drain(s, &mut self.ready, &mut self.buffered_bytes);
            s.progress_at = now;
            Received::Fresh
        } else if seq - s.high > MAX_BUFFERED
            || s.buffered_bytes + event.footprint() > MAX_BUFFERED_BYTES_PER_STREAM
            || self.buffered_bytes + event.footprint() > MAX_BUFFERED_BYTES
        {
            Received::Deferred
        } else {
            s.buffered_bytes += event.footprint();
            self.buffered_bytes += event.footprint();
            s.buffer.insert(seq, event);
            Received::Fresh
        };
        self.update(id);
        outcome
    }

    /// `peer` holds everything of `stream` up to `high` (its mark in an anti-entropy round).
    /// Returns false if the stream is one too many to follow.
    pub fn learn(&mut self, stream: StreamId, high: u64, peer: PeerId, now: Instant) -> bool {
        if stream.source == self.me || high == 0 || high > MAX_SEQ {
            return true;
        }
        let Some(s) = followed(&mut self.streams, stream, now) else {
            return false;
        };
        if high > s.high {
            s.holds(peer, high, now);
        }
        self.update(stream);
        true
    }

    /// `peer` answered a fetch of `stream`: its log starts at `first` (0: it holds none of
    /// it), and it sent `events` (checked by the caller to be of this stream). `more` says
    /// it stopped short of what was asked. An answer that fills nothing makes the stream
    /// ask others, or wait [`GAP_WAIT`]. Returns how each event fared, as (fresh,
    /// duplicates).
    pub fn fetched(
        &mut self,
        stream: StreamId,
        peer: PeerId,
        first: u64,
        events: Vec<Event>,
        more: bool,
        now: Instant,
    ) -> (usize, usize) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return (0, events.len());
        };
        s.asked = None;
        s.ask_now = more;
        // A holder cannot say more is gone than it claimed to hold.
        let claimed = s
            .holders
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(s.high, |(_, upto)| *upto);
        // The publisher holding none of its own stream any more (its log was wiped) is a
        // loss of all it had been known to hold.
        let first = if first == 0 && peer == stream.source && events.is_empty() {
            claimed + 1
        } else {
            first
        };
        let first = first.min(claimed + 1).min(MAX_SEQ);
        if first > s.high + 1 {
            let high = s.high;
            let others = s.holders.iter().any(|(p, upto)| *p != peer && *upto > high);
            if peer == stream.source || !others {
                // Nobody has the start any more: say what is lost (not what this peer holds
                // in its buffer) and go on from there.
                let end = s.buffer.keys().next().map_or(first, |b| first.min(*b));
                self.lost.push_back(Lost {
                    stream,
                    from: s.high + 1,
                    to: end - 1,
                });
                s.high = end - 1;
                drain(s, &mut self.ready, &mut self.buffered_bytes);
                s.progress_at = now;
                s.ask_now = true;
            } else {
                // Someone else may have it: ask them next.
                s.holds_no_more(peer);
                s.ask_now = true;
            }
        }
        let high = s.high;
        let (mut fresh, mut dups) = (0, 0);
        for event in events {
            match self.receive(event, peer, now) {
                Received::Fresh => fresh += 1,
                _ => dups += 1,
            }
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.high == high {
                // No progress: that peer has less than it seemed. Ask others, or wait.
                s.holds_no_more(peer);
                s.ask_now = false;
                s.not_before = Some(now + GAP_WAIT);
            }
        }
        self.update(stream);
        (fresh, dups)
    }

    /// A fetch of `stream` failed (no answer, refused, connection gone): ask again, of the
    /// next holder, after [`GAP_WAIT`].
    pub fn fetch_failed(&mut self, stream: StreamId, peer: PeerId, now: Instant) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.asked.is_some_and(|(_, p)| p == peer) {
                s.asked = None;
                s.ask_now = true;
                s.not_before = Some(now + GAP_WAIT);
                if let Some(i) = s.holders.iter().position(|(p, _)| *p == peer) {
                    let holder = s.holders.remove(i);
                    s.holders.extend(holder);
                }
            }
        }
    }

    fn update(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(Stream::behind) {
            self.behind.insert(id);
        } else {
            self.behind.remove(&id);
        }
    }

    /// The next event ready for the log, in its publisher's order.
    pub fn poll_ready(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// The next range found lost.
    pub fn poll_lost(&mut self) -> Option<Lost> {
        self.lost.pop_front()
    }

    /// Whether some stream is behind what a peer holds (a gap still to fill).
    pub fn is_behind(&self) -> bool {
        !self.behind.is_empty()
    }

    /// When [`Inbox::poll_fetch`] next has something to ask.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.behind
            .iter()
            .filter_map(|id| self.streams.get(id)?.due())
            .min()
    }

    /// The fetches due at `now`, each of a holder for which `connected` is true.
    pub fn poll_fetch(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool) -> Vec<Fetch> {
        let mut out = Vec::new();
        for id in &self.behind {
            let Some(s) = self.streams.get_mut(id) else {
                continue;
            };
            if s.due().is_none_or(|due| due > now) {
                continue;
            }
            let previous = s.asked.map(|(_, p)| p);
            // A connected holder of the next event, other than the one that did not answer
            // if there is one.
            let high = s.high;
            let useful = |(p, upto): &&(PeerId, u64)| *upto > high && connected(p);
            let Some(&(peer, upto)) = s
                .holders
                .iter()
                .filter(useful)
                .find(|(p, _)| Some(*p) != previous)
                .or_else(|| s.holders.iter().find(useful))
            else {
                // Nobody to ask: look again in a while, not in a busy loop.
                s.not_before = Some(now + GAP_WAIT);
                continue;
            };
            s.not_before = None;
            let from = s.high + 1;
            out.push(Fetch {
                peer,
                stream: *id,
                from,
                to: upto.min(s.high + FETCH_MAX_EVENTS),
            });
            s.asked = Some((now, peer));
            s.ask_now = false;
        }
        out
    }

    /// Where `stream` stands: everything up to this number is held.
    pub fn high(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.high)
    }
}

/// Makes ready the buffered events that now follow `s.high`, and takes their bytes off the
/// inbox's total.
fn drain(s: &mut Stream, ready: &mut VecDeque<Event>, total: &mut usize) {
    let before = s.buffered_bytes;
    while let Some(next) = s.next_buffered() {
        ready.push_back(next);
    }
    *total -= before - s.buffered_bytes;
}

/// The stream `id`, followed from now on if it is new and there is room.
fn followed(
    streams: &mut BTreeMap<StreamId, Stream>,
    id: StreamId,
    now: Instant,
) -> Option<&mut Stream> {
    if !streams.contains_key(&id) {
        let of_source = StreamId {
            source: id.source,
            epoch: 0,
        }..=StreamId {
            source: id.source,
            epoch: u64::MAX,
        };
        if streams.len() >= MAX_STREAMS || streams.range(of_source).count() >= MAX_EPOCHS_PER_SOURCE
        {
            return None;
        }
    }
    Some(streams.entry(id).or_insert_with(|| Stream::new(0, now)))
}

#[cfg(test)]
#[path = "inbox_tests.rs"]
mod tests;
