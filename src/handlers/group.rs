//! A group row's shared state: its [`Group`] view (fed by the swarm task with what the other
//! members announce) and what its feeder and workers need to take part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::Notify;

use super::jq::KeyJq;
use crate::event::Event;
use crate::proto::groups::{self, Group, GroupView, Held, KeyDigest};
use crate::proto::StreamId;

/// One group row's membership view and bookkeeping.
pub(crate) struct GroupRow {
    /// The group's name.
    pub name: String,
    pub state: Mutex<Group<Job>>,
    /// Wakes the row's feeder: events were released or fell to this member.
    pub notify: Notify,
    pub key: Option<Arc<KeyJq>>,
    /// A digest of what the row takes ([`shape`]); a reload that changes it makes a new
    /// group row.
    pub shape: u64,
    /// Members whose rows take something else (another shape), as reported.
    pub conflicting: Mutex<std::collections::BTreeSet<PeerId>>,
    /// Events whose key expression failed, by offset, with the error: they went to the
    /// owner of their event id, which dead-letters them.
    pub key_errors: Mutex<HashMap<u64, String>>,
}

/// What a group row keeps with an event it holds besides its place: its key's error, if
/// any (the event itself is read from the log again if it falls to this member).
pub(crate) type Job = Option<String>;

/// Longest key error kept with a held event.
const MAX_KEY_ERROR: usize = 256;

impl GroupRow {
    pub fn new(name: String, me: PeerId, key: Option<Arc<KeyJq>>, shape: u64) -> Self {
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        Self {
            state: Mutex::new(Group::new(name.clone(), me, now)),
            name,
            notify: Notify::new(),
            key,
            shape,
            conflicting: Default::default(),
            key_errors: Mutex::new(HashMap::new()),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, Group<Job>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key of each event (the event id's text by default). A key expression that fails
    /// falls back to the event id, with the error for the owner to dead-letter: every member
    /// fails the same way. One that did not finish in time (or panicked) is `Err`: that
    /// depends on this peer's load, so the batch is not decided now but tried again.
    pub async fn keys(
        &self,
        events: &[(u64, Arc<Event>)],
    ) -> Result<Vec<(KeyDigest, Option<String>)>, String> {
        let by_id = |e: &Event| groups::digest(e.id.to_string().as_bytes());
        let Some(key) = &self.key else {
            return Ok(events.iter().map(|(_, e)| (by_id(e), None)).collect());
        };
        // jq is user code: off the async threads, given up on after the row's jq time limit.
        let (key, batch) = (key.clone(), events.to_vec());
        let evaluated = tokio::time::timeout(
            super::row::JQ_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                batch.iter().map(|(_, e)| key.apply(e)).collect::<Vec<_>>()
            }),
        )
        .await;
        let results = match evaluated {
            Ok(Ok(results)) => results,
            Ok(Err(join)) => return Err(format!("jq key failed: {join}")),
            Err(_) => {
                return Err(format!(
                    "jq key did not finish within {:?}",
                    super::row::JQ_TIMEOUT
                ))
            }
        };
        Ok(events
            .iter()
            .zip(results)
            .map(|((_, event), result)| match result {
                Ok(key) => (groups::digest(&key), None),
                Err(mut error) => {
                    crate::event::clip(&mut error, MAX_KEY_ERROR);
                    (by_id(event), Some(error))
                }
            })
            .collect())
    }

    /// Takes the key error of the event at `offset`, if its key failed.
    pub fn key_error(&self, offset: u64) -> Option<String> {
        let mut errors = self.key_errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            return None;
        }
        errors.remove(&offset)
    }

    /// Decides an event the row read: `Some` if this member runs it.
    pub fn decide(
        &self,
        offset: u64,
        event: Arc<Event>,
        (key, error): (KeyDigest, Option<String>),
    ) -> Option<Arc<Event>> {
        let held = Held {
            offset,
            stream: StreamId::of(&event),
            seq: event.seq,
            time: crate::clock::unix_micros(event.time),
            key,
            item: error,
        };
        let mine = self.state().decide(held)?;
        self.run(&mine);
        Some(event)
    }

    /// An event this member runs: its key error, if any, is kept for the worker.
    pub fn run(&self, held: &Held<Job>) {
        if let Some(error) = held.item.clone() {
            self.key_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(held.offset, error);
        }
    }

    pub fn view(&self) -> GroupView {
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        let mut view = self.state().view(now);
        view.conflicting = self
            .conflicting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| p.to_string())
            .collect();
        view
    }

    /// `peer` left the group or the mesh: it conflicts no more.
    pub fn forget(&self, peer: &PeerId) {
        self.conflicting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    /// Notes whether `peer`'s row takes what this one takes; a new difference is counted
    /// and logged, naming the peer.
    pub fn check_shape(&self, peer: PeerId, shape: u64, stats: &crate::stats::Stats) {
        let mut conflicting = self.conflicting.lock().unwrap_or_else(|p| p.into_inner());
        if shape == self.shape {
            conflicting.remove(&peer);
            return;
        }
        if conflicting.len() < groups::MAX_MEMBERS_SHOWN && conflicting.insert(peer) {
            crate::stats::bump(&stats.groups_conflicting);
            tracing::warn!(group = %self.name, %peer,
                "a member's row in this group takes other events (its pattern, type, filter or key differs): events may be handled twice or not at all; give every member the same row");
        }
    }
}

/// A digest of what a group row takes: its pattern, type, filter and key, each as written.
pub(super) fn shape(spec: &super::HandlerSpec) -> u64 {
    use std::hash::Hasher as _;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    for part in [
        Some(spec.pattern.as_str()),
        spec.event_type.as_ref().map(|t| t.as_str()),
        spec.filter.as_deref(),
        spec.key.as_deref(),
    ] {
        let part = part.unwrap_or("");
        h.write(&(part.len() as u64).to_le_bytes());
        h.write(part.as_bytes());
    }
    h.finish()
}
