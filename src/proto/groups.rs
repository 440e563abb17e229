//! Handler groups: among the live peers with a row in a group, which one handles an event.
//!
//! Ownership is rendezvous (highest-random-weight) hashing: every member of the group gets a
//! weight for the event's key, `SipHash-1-3` (keys 0, 0) over the member's peer-id bytes
//! followed by the key's 128-bit digest ([`digest`]), and the heaviest member owns the event. Each member decides
//! alone from its own view; no one coordinates.
//!
//! Views agree because a member's ownership is bound to the publish time, which every peer
//! reads off the event the same way: a member announces `since`, the moment it starts
//! owning events (its row's start plus [`JOIN_DELAY`]), and is a candidate only for events
//! published at or after it. Announcements reach the others within a push round (well inside
//! [`JOIN_DELAY`]), so when an event is published every member already knows who may own it.
//! A member also decides nothing before its own `since`, by which time it has heard everyone.
//! Events published when no member was active yet go to the heaviest of the members whose row
//! had started by then (so read them), or of all members if none had.
//!
//! An event another member owns is *held* until that member's *done-mark* for the event's
//! stream covers it. Each member's marks say, per publisher stream, the highest seq up to
//! which every event it owned is finished (handled, filtered out, or failed for good) and
//! every other event it read is past. When a member fails, or leaves the group, the events
//! held for it are decided again among the rest: the ones that fall to this peer are taken
//! over. Across a failure the promise is at least once: the events the failed member
//! finished after its last marks reached us (at most one push interval's worth) or had in
//! flight are handled again. With no failure each event is handled exactly once.
//!
//! When events are decided again, the marks heard before are dropped, since a member's mark
//! passes events it did not own when it read them and may now have taken over: only marks
//! announced afterwards release anything. What this does not cover: a second member that
//! fails before it has noticed the first failure (so before it took over its share) while the
//! others already released what it held on its marks; two failures that close together can
//! lose such an event.
//!
//! Everything here is IO-free: times are microseconds since the Unix epoch, passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::Hasher as _;
use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::StreamId;

/// How long after its row starts a member begins owning events (and deciding any).
pub const JOIN_DELAY: Duration = Duration::from_secs(2);

/// Most groups one peer may be in (and announce).
pub const MAX_GROUPS: usize = 16;

/// Longest group name.
pub const MAX_NAME: usize = 64;

/// Most done-marks one group's announcement carries; past this they rotate, a window per
/// announcement.
pub const MAX_MARKS: usize = 64;

/// Most members a view lists as conflicting.
pub const MAX_MEMBERS_SHOWN: usize = 256;

/// Most events one row holds for other members; past this its row waits (lags) until
/// marks release some.
pub const MAX_HELD: usize = 64 * 1024;

/// Checks a group name: 1 to [`MAX_NAME`] of `a-z A-Z 0-9 - _ .`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a group name has 1 to {MAX_NAME} characters"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(format!(
            "group name `{}` has {c:?}; use letters, digits, `-`, `_` and `.`",
            name.escape_debug()
        )),
        None => Ok(()),
    }
}

/// An event's ownership key as kept and weighed: SipHash-1-3-128 (keys 0, 0) of the key's
/// bytes, so a held event costs the same whatever its key.
pub type KeyDigest = [u8; 16];

/// The digest of a key.
pub fn digest(key: &[u8]) -> KeyDigest {
    use siphasher::sip128::Hasher128 as _;
    let mut h = siphasher::sip128::SipHasher13::new_with_keys(0, 0);
    h.write(key);
    h.finish128().as_bytes()
}

/// A member's weight for a key's digest: SipHash-1-3 (keys 0, 0) over the member's peer-id
/// bytes followed by the digest.
pub fn weight(member: &PeerId, key: &KeyDigest) -> u64 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    h.write(&member.to_bytes());
    h.write(key);
    h.finish()
}

/// The heaviest of `members` for `key` (ties, which need a hash collision, go to the
/// smaller peer id).
pub fn owner<'a>(key: &KeyDigest, members: impl IntoIterator<Item = &'a PeerId>) -> Option<PeerId> {
    members
        .into_iter()
        .map(|m| (weight(m, key), std::cmp::Reverse(*m)))
        .max()
        .map(|(_, std::cmp::Reverse(m))| m)
}

/// An event a group row has read and not resolved: what deciding it again needs.
#[derive(Debug, Clone)]
pub struct Held<T> {
    /// Its place in this peer's log.
    pub offset: u64,
    /// Its publisher's stream and number there.
    pub stream: StreamId,
    /// Its seq.
    pub seq: u64,
    /// When it was published, µs since the Unix epoch.
    pub time: u64,
    /// Its ownership key's digest.
    pub key: KeyDigest,
    /// What the row keeps with it.
    pub item: T,
}

/// Another member as this peer knows it.
#[derive(Debug, Clone, Default)]
struct Member {
    since: u64,
    marks: HashMap<StreamId, u64>,
}

/// What a row did with events as a member of its group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCounters {
    /// Events this member owned when it read them.
    pub owned: u64,
    /// Events another member owned (held until its mark covered them).
    pub not_owned: u64,
    /// Events held for a member that failed or left, which fell to this member.
    pub taken_over: u64,
}

/// One member in a view, as `status` and `/v1/groups` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Its peer id.
    pub peer: String,
    /// Owns events published from this time on, µs since the Unix epoch.
    pub since_unix_us: u64,
    /// Whether that time has come.
    pub active: bool,
    /// This peer.
    #[serde(default)]
    pub me: bool,
}

/// One group as this peer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group.
    pub name: String,
    /// Its members, this peer included when it has a row in the group.
    pub members: Vec<MemberView>,
    /// Events this peer's row holds for other members (0 when it has no row).
    #[serde(default)]
    pub held: usize,
    /// Members whose row takes other events than this peer's (pattern, type, filter or key
    /// differ): the group may split events between them.
    #[serde(default)]
    pub conflicting: Vec<String>,
}

/// A group row's membership view and bookkeeping.
#[derive(Debug)]
pub struct Group<T> {
    name: String,
    me: PeerId,
    since: u64,
    members: BTreeMap<PeerId, Member>,
    /// Held events by the member that owns them.
    held: BTreeMap<PeerId, BTreeMap<(StreamId, u64), Held<T>>>,
    held_count: usize,
    /// Per stream, the seqs this member owns and has not finished, and the highest seq read.
    open: HashMap<StreamId, BTreeSet<u64>>,
    read: HashMap<StreamId, u64>,
    takeovers: VecDeque<Held<T>>,
    released: Vec<u64>,
    rotate: usize,
    /// Counters.
    pub counters: GroupCounters,
}

impl<T> Group<T> {
    /// The view of a row that starts now (µs since the Unix epoch).
    pub fn new(name: impl Into<String>, me: PeerId, now: u64) -> Self {
        Self {
            name: name.into(),
            me,
            since: now + JOIN_DELAY.as_micros() as u64,
            members: BTreeMap::new(),
            held: BTreeMap::new(),
            held_count: 0,
            open: HashMap::new(),
            read: HashMap::new(),
            takeovers: VecDeque::new(),
            released: Vec::new(),
            rotate: 0,
            counters: GroupCounters::default(),
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When this member starts owning events.
    pub fn since(&self) -> u64 {
        self.since
    }

    /// Whether the row may decide events: its own `since` has come.
    pub fn ready(&self, now: u64) -> bool {
        now >= self.since
    }

    /// Whether the row holds as many events as it may.
    pub fn full(&self) -> bool {
        self.held_count >= MAX_HELD
    }

    /// Events held for others.
    pub fn held(&self) -> usize {
        self.held_count
    }

    /// Whether `peer` is a member in this view.
    pub fn has_member(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer)
    }

    /// Who owns an event published at `time` with `key`: the heaviest member active then;
    /// if none was, the heaviest of those whose row had started (so read it); if none had,
    /// the heaviest of all.
    fn owner_of(&self, time: u64, key: &KeyDigest) -> PeerId {
        let delay = JOIN_DELAY.as_micros() as u64;
        let all = || {
            std::iter::once((&self.me, self.since))
                .chain(self.members.iter().map(|(p, m)| (p, m.since)))
        };
        owner(
            key,
            all().filter(|(_, since)| *since <= time).map(|(p, _)| p),
        )
        .or_else(|| {
            owner(
                key,
                all()
                    .filter(|(_, since)| since.saturating_sub(delay) < time)
                    .map(|(p, _)| p),
            )
        })
        .or_else(|| owner(key, all().map(|(p, _)| p)))
        .unwrap_or(self.me)
    }

    /// Decides an event the row read: returns it if this member owns it (the row runs it
    /// and calls [`Group::finished`]), or holds it for its owner.
    pub fn decide(&mut self, event: Held<T>) -> Option<Held<T>> {
        let read = self.read.entry(event.stream).or_default();
        *read = (*read).max(event.seq);
        let owner = self.owner_of(event.time, &event.key);
        if owner == self.me {
            self.counters.owned += 1;
            self.own(&event);
            return Some(event);
        }
        self.counters.not_owned += 1;
        self.hold(owner, event);
        None
    }

    fn covered(&self, owner: &PeerId, stream: &StreamId, seq: u64) -> bool {
        self.members
            .get(owner)
            .and_then(|m| m.marks.get(stream))
            .is_some_and(|&mark| mark >= seq)
    }

    fn hold(&mut self, owner: PeerId, event: Held<T>) {
        if self.covered(&owner, &event.stream, event.seq) {
            self.release(event);
            return;
        }
        self.held_count += 1;
        self.held
            .entry(owner)
            .or_default()
            .insert((event.stream, event.seq), event);
    }

    fn release(&mut self, event: Held<T>) {
        self.released.push(event.offset);
    }

    fn own(&mut self, event: &Held<T>) {
        self.open.entry(event.stream).or_default().insert(event.seq);
    }

    /// An event this member ran (or filtered out, or failed for good) is finished.
    pub fn finished(&mut self, stream: StreamId, seq: u64) {
        if let Some(open) = self.open.get_mut(&stream) {
            open.remove(&seq);
            if open.is_empty() {
                self.open.remove(&stream);
            }
        }
    }

    /// What another peer announced for this group: when it owns from, and its marks (which
    /// replace those it sent before: a takeover lowers them). Releases the events held for
    /// it that the marks cover; if its `since` moved (it restarted), the events held for it
    /// are decided again. Announcements must be passed in the order they were made.
    pub fn announced(&mut self, peer: PeerId, since: u64, marks: &[(StreamId, u64)]) {
        if peer == self.me {
            return;
        }
        let member = self.members.entry(peer).or_default();
        let moved = member.since != since && member.since != 0;
        member.since = since;
        for (stream, high) in marks {
            member.marks.insert(*stream, *high);
        }
        if let Some(held) = self.held.get_mut(&peer) {
            let mut covered = Vec::new();
            for (stream, high) in marks {
                covered.extend(held.range((*stream, 0)..=(*stream, *high)).map(|(k, _)| *k));
            }
            let mut gone = Vec::with_capacity(covered.len());
            for k in covered {
                if let Some(event) = held.remove(&k) {
                    gone.push(event);
                }
            }
            if held.is_empty() {
                self.held.remove(&peer);
            }
            self.held_count -= gone.len();
            for event in gone {
                self.release(event);
            }
        }
        if moved {
            self.reassign(peer);
        }
    }

    /// A member failed, left the mesh, or left the group: the events held for it are
    /// decided again without it.
    pub fn failed(&mut self, peer: &PeerId) {
        if self.members.remove(peer).is_some() {
            self.reassign(*peer);
        }
    }

    fn reassign(&mut self, peer: PeerId) {
        let Some(held) = self.held.remove(&peer) else {
            return;
        };
        // Marks sent before the others heard of this could cover events they now take over
        // (a member's mark passes events it did not own when it read them): only marks
        // announced from now on release anything.
        for member in self.members.values_mut() {
            member.marks.clear();
        }
        self.held_count -= held.len();
        for (_, event) in held {
            let owner = self.owner_of(event.time, &event.key);
            if owner == self.me {
                self.counters.taken_over += 1;
                self.own(&event);
                self.takeovers.push_back(event);
            } else {
                self.hold(owner, event);
            }
        }
    }

    /// The row leaves the group (a reload dropped or changed it): the offsets of the events
    /// it holds for others or was to take over, which it no longer waits for.
    pub fn abandon(&mut self) -> Vec<u64> {
        let mut offsets: Vec<u64> = self
            .held
            .values()
            .flat_map(|h| h.values().map(|e| e.offset))
            .chain(self.takeovers.iter().map(|e| e.offset))
            .collect();
        offsets.append(&mut self.released);
        self.held.clear();
        self.held_count = 0;
        self.takeovers.clear();
        offsets
    }

    /// The next held event that fell to this member; the row runs it.
    pub fn poll_takeover(&mut self) -> Option<Held<T>> {
        self.takeovers.pop_front()
    }

    /// Puts back a takeover the row could not queue (it is stopping); the next feeder of
    /// the row takes it.
    pub fn untake(&mut self, event: Held<T>) {
        self.takeovers.push_front(event);
    }

    /// Offsets of held events released since the last call: their owners resolved them.
    pub fn take_released(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.released)
    }

    /// This member's done-marks: per stream, the highest seq up to which everything it
    /// owned is finished. At most [`MAX_MARKS`], a rotating window when there are more.
    pub fn marks(&mut self) -> Vec<(StreamId, u64)> {
        let mut all: Vec<(StreamId, u64)> = self
            .read
            .iter()
            .map(|(stream, read)| {
                let done = self
                    .open
                    .get(stream)
                    .and_then(|open| open.first())
                    .map_or(*read, |first| first - 1);
                (*stream, done)
            })
            .collect();
        if all.len() <= MAX_MARKS {
            return all;
        }
        all.sort_unstable_by_key(|(s, _)| *s);
        self.rotate = (self.rotate + MAX_MARKS) % all.len();
        all.rotate_left(self.rotate);
        all.truncate(MAX_MARKS);
        all
    }

    /// The view for `status`, at `now`.
    pub fn view(&self, now: u64) -> GroupView {
        let mut members: Vec<MemberView> = std::iter::once((&self.me, self.since, true))
            .chain(self.members.iter().map(|(p, m)| (p, m.since, false)))
            .map(|(peer, since, me)| MemberView {
                peer: peer.to_string(),
                since_unix_us: since,
                active: since <= now,
                me,
            })
            .collect();
        members.sort_by(|a, b| a.peer.cmp(&b.peer));
        GroupView {
            name: self.name.clone(),
            members,
            held: self.held_count,
            conflicting: Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "groups_tests.rs"]
mod tests;
