//! The swarm task's defences against its neighbours: every gossip message is judged before
//! gossipsub may forward it (rate, wire format, ACL), forbidden events are kept out of the
//! log, and neighbours that flood or keep sending invalid messages are banned for a while.

use std::time::{Instant, SystemTime};

use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::PeerId;
use tracing::warn;

use super::{now, Actor};
use crate::event::Event;
use crate::node::behaviour::BAN_SCORE;
use crate::proto::roster::{Heard, Refused};
use crate::proto::{self, limits};
use crate::stats;

/// Publishers whose forbidden events `status` counts one by one (the total counts them all).
pub(super) const MAX_FORBIDDEN_SHOWN: usize = 256;

impl Actor {
    /// Handles a gossip message, then tells gossipsub whether to forward it: only messages
    /// within their sender's rate, that decode, and whose every event the ACL allows, and
    /// only where a peer may not have heard them ([`proto::Peers::forwards`]).
    pub(super) fn on_message(
        &mut self,
        from: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let stats = self.shared.stats.clone();
        stats::bump(&stats.messages_received);
        let at = now();
        // Rates are the author's, not the relay's: an honest peer forwarding a flood is not
        // the one throttled or banned.
        let author = message.source.unwrap_or(from);
        let verdict = if self.banned.contains_key(&author) {
            MessageAcceptance::Ignore
        } else {
            match self.limits.admit(author, message.data.len(), at) {
                limits::Verdict::Admit => match self.judge(from, message, at) {
                    MessageAcceptance::Accept if !self.peers.forwards(&author, &from) => {
                        // Taken, not forwarded: every peer here heard its publisher.
                        stats::bump(&stats.messages_not_forwarded);
                        MessageAcceptance::Ignore
                    }
                    verdict => verdict,
                },
                limits::Verdict::Throttle => {
                    if let Some(n) = stats::bump_throttled(&stats.messages_throttled) {
                        warn!(peer = %author, via = %from, throttled_so_far = n,
                            limit_per_sec = self.limits.messages_per_sec(),
                            "ignoring messages from a peer over its rate");
                    }
                    MessageAcceptance::Ignore
                }
                limits::Verdict::Ban => {
                    self.ban(author, "it kept sending over its rate", at);
                    MessageAcceptance::Ignore
                }
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &from, verdict);
    }

    /// A peer's presence (a message without events): its groups checked first, then taken
    /// into the roster and the groups handed to the group rows; passed on unless it is
    /// stale. What breaks a bound is rejected (it counts against the score of the peer that
    /// passed it on) and counted.
    fn take_presence(
        &mut self,
        author: PeerId,
        from: PeerId,
        presence: crate::wire::Presence,
    ) -> MessageAcceptance {
        let groups = match Self::check_groups(presence.groups) {
            Ok(groups) => groups,
            Err(reason) => {
                self.refuse_groups(author, &reason);
                return MessageAcceptance::Reject;
            }
        };
        let round = presence.presence.seq;
        let refused = match self.peers.heard(author, presence.presence, now()) {
            Ok(Heard::Stale) => return MessageAcceptance::Ignore,
            Ok(Heard::Held | Heard::Leaving) => return MessageAcceptance::Accept,
            Ok(Heard::New | Heard::Again) => {
                self.take_groups(author, round, groups);
                return MessageAcceptance::Accept;
            }
            Err(refused) => refused,
        };
        let stats = self.shared.stats.clone();
        if let Some(n) = stats::bump_throttled(&stats.presence_refused) {
            warn!(peer = %author, via = %from, reason = %refused, refused_so_far = n,
                "refused a peer's presence");
        }
        match refused {
            // This peer is merely full, or the sender too fast (which gossipsub's score does
            // not weigh): ignored, not passed on.
            Refused::Full | Refused::TooFast => MessageAcceptance::Ignore,
            Refused::Bad(_) => MessageAcceptance::Reject,
        }
    }

    /// Takes a message's events (or its author's presence) in; rejects it if it does not
    /// decode or carries a forbidden event.
    fn judge(
        &mut self,
        from: PeerId,
        message: gossipsub::Message,
        at: Instant,
    ) -> MessageAcceptance {
        let stats = self.shared.stats.clone();
        let source = message.source;
        let max = self.shared.max_event_size;
        let decoded = match proto::receive(source, message.data, max, SystemTime::now()) {
            Ok(decoded) => decoded,
            Err(error) => {
                if let Some(n) = stats::bump_throttled(&stats.messages_malformed) {
                    warn!(peer = ?source, via = %from, %error, malformed_so_far = n, "dropped a malformed message");
                }
                return MessageAcceptance::Reject;
            }
        };
        if let (Some(presence), Some(author)) = (decoded.presence, source) {
            return self.take_presence(author, from, presence);
        }
        for error in decoded.rejected {
            if let Some(n) = stats::bump_throttled(&stats.events_rejected) {
                warn!(peer = ?source, %error, rejected_so_far = n, "dropped an event");
            }
        }
        let mut verdict = MessageAcceptance::Accept;
        for event in decoded.events {
            let allowed = self.allowed(&event);
            if !allowed {
                verdict = MessageAcceptance::Reject;
            }
            let time = event.time;
            // A forbidden event still goes to the inbox, which keeps its publisher's numbers in
            // order (and follows at most a few epochs of one publisher); it is counted, once,
            // and dropped on its way to the log.
            if self.take(event, from, at) && allowed {
                stats::bump(&stats.received);
                stats.receive_latency.record(crate::clock::age_micros(time));
            }
        }
        self.flush_inbox();
        verdict
    }

    /// Whether the ACL lets this event's publisher publish on its topic.
    pub(super) fn allowed(&self, event: &Event) -> bool {
        self.shared.acl.may_publish(&event.source, &event.topic)
    }

    /// Counts and logs an event the ACL forbids (throttled), naming its publisher.
    pub(super) fn refuse_forbidden(&mut self, event: &Event) {
        let known = self.forbidden_by.len();
        match self.forbidden_by.get_mut(&event.source) {
            Some(n) => *n += 1,
            None if known < MAX_FORBIDDEN_SHOWN => {
                self.forbidden_by.insert(event.source, 1);
            }
            None => {}
        }
        if let Some(n) = stats::bump_throttled(&self.shared.stats.events_forbidden) {
            warn!(publisher = %event.source, topic = %event.topic, forbidden_so_far = n,
                "refused an event: its publisher may not publish on this topic (acl)");
        }
    }

    /// Disconnects `peer` and refuses it until the ban ends.
    pub(super) fn ban(&mut self, peer: PeerId, why: &str, at: Instant) {
        if self.banned.insert(peer, at + limits::BAN_FOR).is_some() {
            return;
        }
        stats::bump(&self.shared.stats.peers_banned);
        warn!(%peer, reason = why, for_secs = limits::BAN_FOR.as_secs(), "banned a peer");
        self.swarm.behaviour_mut().banned.block_peer(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.limits.forget(&peer);
    }

    /// Once a second: bans neighbours whose gossipsub score says they keep sending invalid
    /// messages (bad signatures included, which gossipsub drops before meshbus sees them),
    /// and lifts bans that have run their time.
    pub(super) fn review_neighbours(&mut self, at: Instant) {
        let low: Vec<PeerId> = self
            .swarm
            .connected_peers()
            .filter(|p| {
                self.swarm
                    .behaviour()
                    .gossipsub
                    .peer_score(p)
                    .is_some_and(|s| s < BAN_SCORE)
            })
            .copied()
            .collect();
        for peer in low {
            self.ban(peer, "it kept sending invalid messages", at);
        }
        let over: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= at)
            .map(|(p, _)| *p)
            .collect();
        for peer in over {
            self.banned.remove(&peer);
            self.swarm.behaviour_mut().banned.unblock_peer(peer);
        }
    }
}
