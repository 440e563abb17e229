//! The swarm task's side of ordering and repair: events into the inbox, what is ready into
//! the log, and the `/meshbus/repair/1` requests and answers ([`crate::node::repair`]).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use libp2p::request_response;
use libp2p::PeerId;
use tracing::{debug, warn};

use super::{now, Actor, Asked};
use crate::event::Event;
use crate::node::repair::{self, Request, Response};
use crate::proto::{self, Fetch, Lost, Received, StreamId};
use crate::stats;
use crate::store::StoreError;

/// Most streams one marks answer may add to those followed (the answering peer's own
/// stream aside).
const MAX_INTRODUCED: usize = 64;

impl Actor {
    /// Passes an event to the inbox; true if it is new.
    pub(super) fn take(&mut self, event: Event, from: PeerId, now: Instant) -> bool {
        let stats = &self.shared.stats;
        match self.inbox.receive(event, from, now) {
            Received::Fresh => true,
            Received::Duplicate => {
                stats::bump(&stats.events_duplicate);
                false
            }
            Received::Deferred => {
                stats::bump(&stats.events_deferred);
                false
            }
            Received::TooManyStreams => {
                if let Some(n) = stats::bump_throttled(&stats.events_rejected) {
                    warn!(peer = %from, limit = proto::inbox::MAX_STREAMS, rejected_so_far = n,
                        "dropped an event: this peer follows as many publishers as it may");
                }
                false
            }
        }
    }

    /// Appends what the inbox has ready to the log, and announces what it found lost.
    pub(super) fn flush_inbox(&mut self) {
        let mut ready: Vec<Arc<Event>> = Vec::new();
        while let Some(event) = self.inbox.poll_ready() {
            if self.allowed(&event) {
                ready.push(Arc::new(event));
            } else {
                self.refuse_forbidden(&event);
            }
        }
        if !ready.is_empty() {
            self.peers.busy(now());
            // Not awaited: the writer counts and logs a failed commit, and a crash before the
            // commit loses the marks with the events, so they are fetched again.
            drop(self.store.append(ready, false));
        }
        while let Some(Lost { stream, from, to }) = self.inbox.poll_lost() {
            stats::add(&self.shared.stats.events_lost, to - from + 1);
            warn!(publisher = %stream.source, epoch = stream.epoch, from, to,
                "events lost: no peer holds them any more");
            self.local(
                "_mesh.events.lost",
                serde_json::json!({
                    "publisher": stream.source.to_string(),
                    "epoch": stream.epoch,
                    "from": from,
                    "to": to,
                }),
            );
        }
    }

    /// Asks for the gaps that are due.
    pub(super) fn fetch_due(&mut self, now: Instant) {
        let peers = &self.peers;
        for fetch in self.inbox.poll_fetch(now, |p| peers.is_connected(p)) {
            stats::bump(&self.shared.stats.repair_fetches);
            self.ask(fetch.peer, Asked::Fetch(fetch));
        }
    }

    pub(super) fn on_repair(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    stats::bump(&self.shared.stats.repair_served);
                    let response = self.answer(peer, request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .repair
                        .send_response(channel, response);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => match self.asked.remove(&request_id) {
                    Some(Asked::Marks) => self.on_marks(peer, response),
                    Some(Asked::Fetch(fetch)) => self.on_fetched(peer, fetch, response),
                    Some(Asked::Goodbye) | None => {}
                },
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(Asked::Fetch(fetch)) = self.asked.remove(&request_id) {
                    stats::bump(&self.shared.stats.repair_failed);
                    debug!(%peer, %error, "fetch failed; asking again");
                    self.inbox.fetch_failed(fetch.stream, peer, now());
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "a repair request from a peer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Answers a repair request: our marks, events from the log (bounded by
    /// [`proto::inbox::FETCH_MAX_EVENTS`] and [`repair::FETCH_BYTES`]), or a goodbye noted.
    fn answer(&mut self, peer: PeerId, request: Request) -> Response {
        let refuse = |error: String| Response {
            error,
            ..Response::default()
        };
        match request.kind {
            repair::MARKS => {
                // A member tells how far it has published; only that, from it, is taken.
                let own = match request.own {
                    Some(_) if !self.peers.is_member(&peer) => {
                        self.refuse_mark(peer, "an own mark from a peer that is not a member");
                        None
                    }
                    Some(mark) if mark.source != peer.to_bytes() => {
                        self.refuse_mark(peer, "an own mark naming another publisher");
                        None
                    }
                    own => own,
                };
                self.learn_marks(peer, own.into_iter().collect());
                self.our_marks()
            }
            repair::FETCH => {
                let Ok(source) = PeerId::from_bytes(&request.source) else {
                    return refuse("the fetch names no valid publisher".into());
                };
                if request.from == 0 || request.to < request.from {
                    return refuse(format!(
                        "the fetch range {}..={} is empty",
                        request.from, request.to
                    ));
                }
                let stream = StreamId {
                    source,
                    epoch: request.epoch,
                };
                let last = request
                    .from
                    .saturating_add(proto::inbox::FETCH_MAX_EVENTS - 1);
                let to = request.to.min(last);
                match self
                    .store
                    .fetch(stream, request.from, to, repair::FETCH_BYTES)
                {
                    Ok(range) => Response {
                        first: range.first,
                        events: range.events,
                        ..Response::default()
                    },
                    // Busy, not broken: commits kept moving what it read out of memory.
                    // The asker counts the refusal and asks again.
                    Err(error @ StoreError::Moving) => {
                        debug!(%peer, "a fetch refused: the log moved while it was read");
                        refuse(error.to_string())
                    }
                    Err(error) => {
                        crate::store::warn_log_failed("answering a fetch", &error);
                        refuse(format!("cannot read the log: {error}"))
                    }
                }
            }
            repair::GOODBYE => {
                self.peers.goodbye(peer);
                Response::default()
            }
            other => refuse(format!("unknown request kind {other}")),
        }
    }

    /// What this peer holds: its marks, as a marks request is answered.
    fn our_marks(&self) -> Response {
        Response {
            marks: self
                .inbox
                .marks()
                .map(|(stream, high)| repair::Mark {
                    source: stream.source.to_bytes(),
                    epoch: stream.epoch,
                    high,
                })
                .collect(),
            ..Response::default()
        }
    }

    /// A peer's marks: fetch whatever it holds that we do not.
    fn on_marks(&mut self, peer: PeerId, response: Response) {
        self.learn_marks(peer, response.marks);
    }

    /// Marks `peer` sent (in its answer, or of itself in its request): fetch whatever it
    /// holds that we do not.
    fn learn_marks(&mut self, peer: PeerId, marks: Vec<repair::Mark>) {
        let now = now();
        // A peer's marks may introduce streams this one does not follow yet (publishers it
        // never heard), but only so many per answer: marks are not signed.
        let mut introduced = 0;
        for mark in marks.into_iter().take(proto::inbox::MAX_STREAMS) {
            let Ok(source) = PeerId::from_bytes(&mark.source) else {
                self.refuse_mark(peer, "a mark whose publisher is not a peer id");
                continue;
            };
            let stream = StreamId {
                source,
                epoch: mark.epoch,
            };
            if !self.inbox.follows(&stream) && source != peer {
                if introduced >= MAX_INTRODUCED {
                    continue;
                }
                introduced += 1;
            }
            if !self.inbox.learn(stream, mark.high, peer, now) {
                if let Some(n) = stats::bump_throttled(&self.shared.stats.events_rejected) {
                    warn!(%peer, limit = proto::inbox::MAX_STREAMS, rejected_so_far = n,
                        "not following a publisher: as many are followed as allowed");
                }
            }
        }
        self.fetch_due(now);
    }

    /// Counts and logs (throttled) a mark `peer` sent that is ignored, and why.
    fn refuse_mark(&self, peer: PeerId, reason: &str) {
        if let Some(n) = stats::bump_throttled(&self.shared.stats.marks_refused) {
            warn!(%peer, reason, refused_so_far = n, "ignored a repair mark");
        }
    }

    /// Events a peer sent for a fetch: checked like gossiped ones, and that they are of the
    /// stream and range asked for.
    fn on_fetched(&mut self, peer: PeerId, fetch: Fetch, response: Response) {
        let stats = self.shared.stats.clone();
        if !response.error.is_empty() {
            stats::bump(&stats.repair_failed);
            debug!(%peer, error = %response.error, "fetch refused; asking again");
            self.inbox.fetch_failed(fetch.stream, peer, now());
            return;
        }
        let max = self.shared.max_event_size;
        let latest = SystemTime::now() + proto::receive::MAX_CLOCK_SKEW;
        let mut events = Vec::with_capacity(response.events.len());
        for bytes in &response.events {
            match crate::wire::decode_event(bytes, fetch.stream.source, max) {
                Ok(e)
                    if e.epoch == fetch.stream.epoch
                        && (fetch.from..=fetch.to).contains(&e.seq)
                        && e.time <= latest =>
                {
                    events.push(e)
                }
                Ok(e) => {
                    if let Some(n) = stats::bump_throttled(&stats.events_rejected) {
                        warn!(%peer, seq = e.seq, rejected_so_far = n,
                            "dropped a fetched event: not of the range asked for, or ahead of the clock");
                    }
                }
                Err(error) => {
                    if let Some(n) = stats::bump_throttled(&stats.events_rejected) {
                        warn!(%peer, %error, rejected_so_far = n, "dropped a fetched event");
                    }
                }
            }
        }
        let more = events.last().is_some_and(|e| e.seq < fetch.to);
        let now = now();
        let (fresh, _) = self
            .inbox
            .fetched(fetch.stream, peer, response.first, events, more, now);
        stats::add(&stats.repaired, fresh as u64);
        stats::add(&stats.received, fresh as u64);
        self.flush_inbox();
        self.fetch_due(now);
    }
}
