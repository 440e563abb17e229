//! The swarm task's side of queries: the queries this peer asked and the answers that come
//! back for them over `/meshbus/answer/1` ([`crate::node::answer`]), and the answers this
//! peer's reply rows send.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use libp2p::request_response;
use libp2p::PeerId;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{now, Actor};
use crate::handlers::Answer;
use crate::node::answer::{self, Ack, AnswerMsg};
use crate::node::QueryAnswer;
use crate::stats;

/// Queries this peer remembers having answered (a peer answers a query once).
const ANSWERED_KEPT: usize = 4096;

/// A query of this peer's, open for answers.
pub(super) struct Open {
    answers: mpsc::Sender<QueryAnswer>,
    started: Instant,
    deadline: Instant,
    /// Peers that answered it.
    from: HashSet<PeerId>,
    /// The group it asked, if any: only its members' answers are taken.
    group: Option<String>,
}

/// Open queries and the queries this peer answered.
#[derive(Default)]
pub(super) struct Queries {
    open: HashMap<String, Open>,
    answered: HashSet<String>,
    answered_order: VecDeque<String>,
}

impl Queries {
    pub(super) fn len(&self) -> usize {
        self.open.len()
    }

    pub(super) fn register(
        &mut self,
        id: String,
        answers: mpsc::Sender<QueryAnswer>,
        deadline: Instant,
        group: Option<String>,
    ) {
        let now = now();
        self.open.insert(
            id,
            Open {
                answers,
                started: now,
                deadline,
                from: HashSet::new(),
                group,
            },
        );
    }

    /// Forgets the queries whose time is up (or whose asker stopped listening).
    pub(super) fn expire(&mut self, now: Instant) {
        self.open
            .retain(|_, q| q.deadline > now && !q.answers.is_closed());
    }

    /// Whether this peer answers `query` (true the first time only).
    fn first_answer(&mut self, query: &str) -> bool {
        if !self.answered.insert(query.to_owned()) {
            return false;
        }
        self.answered_order.push_back(query.to_owned());
        if self.answered_order.len() > ANSWERED_KEPT {
            if let Some(old) = self.answered_order.pop_front() {
                self.answered.remove(&old);
            }
        }
        true
    }
}

impl Actor {
    /// An answer from one of this peer's reply rows: sent to the asker (or, for a query of
    /// this peer's own, taken at once). A second answer to one query is dropped.
    pub(super) fn send_answer(&mut self, answer: Answer) {
        let stats = self.shared.stats.clone();
        if !self.queries.first_answer(&answer.query) {
            if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                debug!(query = %answer.query, handler = %answer.handler, dropped_so_far = n,
                    "another row of this peer answered this query already");
            }
            return;
        }
        let message = answer::message(answer.query, answer.handler, answer.answer);
        stats::bump(&stats.answers_sent);
        let me = self.shared.peer_id;
        if answer.to == me {
            self.take_answer(me, message);
            return;
        }
        if !self.peers.is_direct_member(&answer.to) {
            if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                warn!(asker = %answer.to, dropped_so_far = n,
                    "an answer was dropped: the peer that asked is not connected");
            }
            return;
        }
        self.swarm
            .behaviour_mut()
            .answer
            .send_request(&answer.to, message);
    }

    pub(super) fn on_answer(&mut self, event: request_response::Event<AnswerMsg, Ack>) {
        let stats = self.shared.stats.clone();
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .answer
                        .send_response(channel, Ack {});
                    if !self.peers.is_member(&peer) {
                        if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                            warn!(%peer, dropped_so_far = n,
                                "dropped an answer from a peer that is not a mesh member");
                        }
                        return;
                    }
                    self.take_answer(peer, request);
                }
                request_response::Message::Response { .. } => {}
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                    warn!(asker = %peer, %error, dropped_so_far = n, "an answer could not be sent");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                    warn!(%peer, %error, dropped_so_far = n, "an answer could not be read");
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// An answer for one of this peer's queries, from `peer`.
    fn take_answer(&mut self, peer: PeerId, message: AnswerMsg) {
        let stats = self.shared.stats.clone();
        let now = now();
        let Some(open) = self
            .queries
            .open
            .get_mut(&message.query)
            .filter(|q| q.deadline > now)
        else {
            if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                debug!(%peer, query = %message.query, dropped_so_far = n,
                    "dropped an answer for an unknown or expired query");
            }
            return;
        };
        if let Some(group) = &open.group {
            let member = if peer == self.shared.peer_id {
                self.shared
                    .handlers
                    .groups()
                    .iter()
                    .any(|g| &g.name == group)
            } else {
                self.groups.is_in(&peer, group)
            };
            if !member {
                if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                    warn!(%peer, %group, dropped_so_far = n,
                        "dropped an answer to a group query from a peer not in the group");
                }
                return;
            }
        }
        if !open.from.insert(peer) {
            if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                debug!(%peer, query = %message.query, dropped_so_far = n,
                    "dropped a second answer from one peer");
            }
            return;
        }
        let answer = match (message.answer, message.error) {
            (Some(text), None) => serde_json::from_str(&text).map_err(|e| e.to_string()),
            (_, Some(error)) => Err(error),
            (None, None) => Ok(serde_json::Value::Null),
        };
        let (answer, error) = match answer {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let name = if peer == self.shared.peer_id {
            self.shared.name.clone()
        } else {
            self.peers.name_of(&peer)
        };
        let reply = QueryAnswer {
            peer: peer.to_string(),
            name,
            handler: message.handler,
            latency_ms: now.duration_since(open.started).as_secs_f64() * 1000.0,
            answer,
            error,
        };
        match open.answers.try_send(reply) {
            Ok(()) => stats::bump(&stats.answers_received),
            Err(_) => {
                if let Some(n) = stats::bump_throttled(&stats.answers_dropped) {
                    warn!(%peer, limit = crate::node::MAX_ANSWERS, dropped_so_far = n,
                        "dropped an answer: the query has as many as it takes, or its asker reads too slowly");
                }
            }
        }
    }
}
