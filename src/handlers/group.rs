//! A group row's shared state: its [`Group`] view (fed by the swarm task with what the other
//! members announce) and what its feeder and workers need to take part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::Notify;

use super::jq::KeyJq;
use crate::event::Event;
use crate::proto::groups::{Group, GroupView, Held};
use crate::proto::StreamId;

/// One group row's membership view and bookkeeping.
pub(crate) struct GroupRow {
    /// The group's name.
    pub name: String,
    pub state: Mutex<Group<Job>>,
    /// Wakes the row's feeder: events were released or fell to this member.
    pub notify: Notify,
    pub key: Option<Arc<KeyJq>>,
    /// Events whose key expression failed, by offset, with the error: they went to the
    /// owner of their event id, which dead-letters them.
    pub key_errors: Mutex<HashMap<u64, String>>,
}

/// What a group row keeps with an event it holds: the event and its key's error, if any.
pub(crate) type Job = (Arc<Event>, Option<String>);

impl GroupRow {
    pub fn new(name: String, me: PeerId, key: Option<Arc<KeyJq>>) -> Self {
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        Self {
            state: Mutex::new(Group::new(name.clone(), me, now)),
            name,
            notify: Notify::new(),
            key,
            key_errors: Mutex::new(HashMap::new()),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, Group<Job>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key of each event (the event id's text by default). A key expression that fails
    /// falls back to the event id, with the error for the owner to dead-letter.
    pub async fn keys(&self, events: &[(u64, Arc<Event>)]) -> Vec<(Vec<u8>, Option<String>)> {
        let by_id = |e: &Event| e.id.to_string().into_bytes();
        let Some(key) = &self.key else {
            return events.iter().map(|(_, e)| (by_id(e), None)).collect();
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
            Ok(Err(join)) => vec![Err(format!("jq key failed: {join}")); events.len()],
            Err(_) => vec![
                Err(format!(
                    "jq key did not finish within {:?}",
                    super::row::JQ_TIMEOUT
                ));
                events.len()
            ],
        };
        events
            .iter()
            .zip(results)
            .map(|((_, event), result)| match result {
                Ok(key) => (key, None),
                Err(error) => (by_id(event), Some(error)),
            })
            .collect()
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
        (key, error): (Vec<u8>, Option<String>),
    ) -> Option<Arc<Event>> {
        let held = Held {
            offset,
            stream: StreamId::of(&event),
            seq: event.seq,
            time: crate::clock::unix_micros(event.time),
            key,
            item: (event, error),
        };
        let mine = self.state().decide(held)?;
        Some(self.run(mine))
    }

    /// An event this member runs: its key error, if any, is kept for the worker.
    pub fn run(&self, held: Held<Job>) -> Arc<Event> {
        let (event, error) = held.item;
        if let Some(error) = error {
            self.key_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(held.offset, error);
        }
        event
    }

    pub fn view(&self) -> GroupView {
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        self.state().view(now)
    }
}
