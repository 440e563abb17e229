//! The task that owns the swarm. It feeds the IO-free core ([`crate::proto`]) what the
//! network and the handles say, and carries out what the core decides. It never waits on
//! handlers or subscribers: they read the event log ([`crate::store`]), which this task
//! appends to.
//!
//! Publishing: a publish waits for the next *round*. A round stamps every publish waiting,
//! stores them in the log (fsynced), and only then gossips them and answers, so an event
//! that was answered is on disk and an event that was sent is never numbered again. While a
//! round is on its way to the disk, the next publishes gather for the next one (group
//! commit).
//!
//! Receiving: gossiped events go through the [`Inbox`], which passes each publisher's events
//! on once and in order; what is ready is appended to the log. Gaps, new members and an
//! anti-entropy round every [`ANTI_ENTROPY`] fetch what is missing ([`repairing`]).

mod asking;
mod grouping;
mod guarding;
mod repairing;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic, PublishError, TopicHash};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::repair::{self, Request};
use super::{Command, NodeError, Published, QueryAnswer, Shared, SwarmStatus};
use crate::event::{local_event, Event};
use crate::handlers::{Announcement, Answer};
use crate::proto::{
    self, Fetch, Inbox, Listening, Membership, PeerAction, Peers, Publisher, StreamId, Unstamped,
};
use crate::stats;
use crate::store::{Opened, Store, StoreError};

/// How often members are asked for their marks (what they hold of every stream), a few
/// at a time ([`crate::proto::peers::MARKS_PER_ROUND`]).
pub const ANTI_ENTROPY: Duration = Duration::from_secs(1);

/// How long a stopping peer waits for its goodbyes to be heard.
const GOODBYE_WAIT: Duration = Duration::from_millis(500);

/// Most events stamped into one round (a larger single batch still goes whole).
const MAX_ROUND_EVENTS: usize = 64 * 1024;

/// Most events waiting for the next round; past this, commands wait in their channel.
const MAX_WAITING_EVENTS: usize = 256 * 1024;

/// The time the core is told, from tokio's clock, which its timer runs on.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Who waits for a publish.
enum Replier {
    One(oneshot::Sender<Result<Published, NodeError>>),
    Many(oneshot::Sender<Result<Vec<Published>, NodeError>>),
    /// A query: registered for answers when stamped; answered with the members asked.
    Query {
        reply: oneshot::Sender<Result<(Published, usize), NodeError>>,
        answers: mpsc::Sender<QueryAnswer>,
        deadline: Instant,
        asked: usize,
    },
}

impl Replier {
    fn fail(self, error: NodeError) {
        match self {
            Replier::One(reply) => drop(reply.send(Err(error))),
            Replier::Many(reply) => drop(reply.send(Err(error))),
            Replier::Query { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    fn succeed(self, published: Vec<Published>) {
        match self {
            Replier::One(reply) => {
                if let Some(p) = published.into_iter().next() {
                    let _ = reply.send(Ok(p));
                }
            }
            Replier::Many(reply) => drop(reply.send(Ok(published))),
            Replier::Query { reply, asked, .. } => {
                if let Some(p) = published.into_iter().next() {
                    let _ = reply.send(Ok((p, asked)));
                }
            }
        }
    }
}

/// Publishes being stored: their messages, and who waits for how many of their events.
struct Round {
    messages: Vec<Vec<Arc<Event>>>,
    waiters: Vec<(Replier, usize)>,
}

/// A repair request of ours in flight.
enum Asked {
    Marks,
    Fetch(Fetch),
    Goodbye,
}

type Storing = oneshot::Receiver<Result<(), StoreError>>;

/// Waits for the round being stored, if any.
async fn stored(storing: &mut Option<Storing>) -> Result<(), StoreError> {
    match storing {
        Some(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
        None => std::future::pending().await,
    }
}

pub(super) struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    topic: IdentTopic,
    topic_hash: TopicHash,
    publisher: Publisher,
    /// This peer's own stream.
    own: StreamId,
    peers: Peers,
    inbox: Inbox,
    store: Store,
    listening: Listening,
    listen_waiters: Vec<oneshot::Sender<Result<Vec<Multiaddr>, NodeError>>>,
    /// Publishes waiting for the next round, and how many events they hold.
    waiting: VecDeque<(Vec<Unstamped>, Replier)>,
    waiting_events: usize,
    /// The round on its way to the disk.
    round: Option<Round>,
    storing: Option<Storing>,
    asked: HashMap<OutboundRequestId, Asked>,
    next_anti_entropy: Instant,
    /// Each neighbour's gossip rate.
    limits: proto::limits::RateLimits,
    /// Banned peers and when their ban ends.
    banned: HashMap<PeerId, Instant>,
    /// Events the ACL refused, per publisher (at most [`guarding::MAX_FORBIDDEN_SHOWN`]).
    forbidden_by: std::collections::BTreeMap<PeerId, u64>,
    /// Answers of this peer's reply rows.
    answers: mpsc::Receiver<Answer>,
    /// Queries of ours open for answers, and those we answered.
    queries: asking::Queries,
    /// The groups other peers announced.
    groups: grouping::Directory,
    /// The groups this peer last announced, and when it looks for a change next.
    last_announced: Vec<Announcement>,
    next_group_push: Instant,
}

impl Actor {
    pub(super) fn new(
        mut swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        answers: mpsc::Receiver<Answer>,
        shared: Arc<Shared>,
        opened: &Opened,
        peers: Vec<Multiaddr>,
        listen_expected: usize,
    ) -> Result<Self, NodeError> {
        let topic = IdentTopic::new(proto::MESH_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(NodeError::Subscribe)?;
        let me = shared.peer_id;
        let start = now();
        let mut peers_table = Peers::new(me, start);
        // Announcement numbers start at the clock, so a restarted peer's are larger.
        peers_table.announcing(
            proto::peers::agent(shared.name.as_deref()),
            crate::clock::unix_micros(SystemTime::now()),
        );
        let mut inbox = Inbox::new(me);
        for (stream, high) in &opened.streams {
            inbox.restore(*stream, *high, start);
        }
        let own = StreamId {
            source: me,
            epoch: opened.epoch,
        };
        inbox.published(own, opened.own_seq, start);
        let limits = proto::limits::RateLimits::new(shared.rate.0, shared.rate.1);
        let mut actor = Self {
            swarm,
            commands,
            topic_hash: topic.hash(),
            topic,
            publisher: Publisher::new(me, opened.epoch, opened.own_seq),
            own,
            peers: peers_table,
            inbox,
            store: shared.store.clone(),
            shared,
            listening: Listening::new(listen_expected),
            listen_waiters: Vec::new(),
            waiting: VecDeque::new(),
            waiting_events: 0,
            round: None,
            storing: None,
            asked: HashMap::new(),
            next_anti_entropy: start + ANTI_ENTROPY,
            limits,
            banned: HashMap::new(),
            forbidden_by: Default::default(),
            answers,
            queries: Default::default(),
            groups: Default::default(),
            last_announced: Vec::new(),
            next_group_push: start + grouping::GROUP_PUSH,
        };
        for addr in peers {
            actor.add_explicit(addr)?;
        }
        Ok(actor)
    }

    /// When the core's next timer is due.
    fn deadline(&self) -> Instant {
        let mut at = self.peers.poll_timeout().min(self.next_anti_entropy);
        if self.pushing() {
            at = at.min(self.next_group_push);
        }
        self.inbox.poll_timeout().map_or(at, |fetch| at.min(fetch))
    }

    /// Whether group announcements or open queries want the timer every
    /// [`grouping::GROUP_PUSH`]. Without them a peer wakes for its timers about once a
    /// second, not ten times (an idle peer's wake-ups are most of its CPU).
    fn pushing(&self) -> bool {
        !self.last_announced.is_empty()
            || self.queries.len() > 0
            || self.shared.handlers.has_groups()
    }

    pub(super) async fn run(mut self) {
        let timer = tokio::time::sleep_until(self.deadline().into());
        tokio::pin!(timer);
        let shutdown_reply = loop {
            self.carry_out();
            let deadline = self.deadline().into();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let room = self.waiting_events < MAX_WAITING_EVENTS;
            let command = tokio::select! {
                event = self.swarm.select_next_some() => {
                    self.on_swarm_event(event);
                    continue;
                }
                result = stored(&mut self.storing) => {
                    self.storing = None;
                    self.on_stored(result);
                    continue;
                }
                Some(answer) = self.answers.recv() => {
                    self.send_answer(answer);
                    continue;
                }
                // A row in a group may have come: the deadline is looked at again.
                () = self.shared.handlers.changed() => continue,
                command = self.commands.recv(), if room => match command {
                    Some(command) => command,
                    None => break None,
                },
                _ = &mut timer => {
                    self.on_timer(now());
                    continue;
                }
            };
            if let Command::Shutdown { reply } = command {
                break Some(reply);
            }
            self.on_command(command);
        };
        info!("shutting down");
        self.finish_round().await;
        self.say_goodbye().await;
        drop(self.swarm);
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    fn on_timer(&mut self, now: Instant) {
        self.peers.handle_timeout(now);
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + ANTI_ENTROPY;
            self.review_neighbours(now);
            // A peer with a gap to fill is busy until it is whole, also while no event of
            // the gap arrives.
            if self.inbox.is_behind() {
                self.peers.busy(now);
            }
            for peer in self.peers.marks_round(now) {
                self.ask(peer, Asked::Marks);
            }
        }
        if now >= self.next_group_push {
            self.next_group_push = now + grouping::GROUP_PUSH;
            self.groups_changed(now);
            self.queries.expire(now);
        }
        self.fetch_due(now);
    }

    /// Carries out what the peer table decided.
    ///
    /// Dials come from a fresh port, not the listening one: two peers that found each other
    /// at the same moment and dialled from their listening ports would cross SYNs into one
    /// TCP connection on which both act as dialer, and its handshake fails.
    fn carry_out(&mut self) {
        while let Some(action) = self.peers.poll_action() {
            match action {
                PeerAction::Dial { peer, addrs } => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .allocate_new_port()
                        .build();
                    if let Err(error) = self.swarm.dial(opts) {
                        debug!(%peer, %error, "dial not started");
                    }
                }
                PeerAction::DialAddress(addr) => {
                    if let Err(error) = self.dial_address(&addr) {
                        self.peers.dial_refused(&addr, &error.to_string());
                    }
                }
                PeerAction::Close(connection) => {
                    self.swarm.close_connection(connection);
                }
                PeerAction::Disconnect(peer) => {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                PeerAction::Membership(change) => self.membership(change),
                PeerAction::Announce(presence) => self.announce(&presence),
                PeerAction::Reached(peer) => self.ask(peer, Asked::Marks),
            }
        }
    }

    fn dial_address(&mut self, addr: &Multiaddr) -> Result<(), NodeError> {
        let opts = DialOpts::unknown_peer_id()
            .address(addr.clone())
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        self.swarm.dial(opts).map_err(|e| NodeError::Dial {
            addr: addr.clone(),
            source: Box::new(e),
        })?;
        self.peers.dial_started(addr, id);
        Ok(())
    }

    fn add_explicit(&mut self, addr: Multiaddr) -> Result<(), NodeError> {
        match self.peers.add_explicit(addr.clone()) {
            Ok(Some(addr)) => self.dial_address(&addr),
            Ok(None) => Ok(()),
            Err(e) => Err(NodeError::Dial {
                addr,
                source: Box::new(e),
            }),
        }
    }

    /// Delivers a membership change locally as a `_mesh.peer.…` event; they never travel.
    /// (A member reached over a connection is asked at once what it holds:
    /// [`PeerAction::Reached`].)
    fn membership(&mut self, change: Membership) {
        self.peers.busy(now());
        if let Membership::Left { peer } | Membership::Failed { peer } = &change {
            self.group_member_gone(peer);
        }
        self.local(change.topic(), change.data());
    }

    /// Publishes this peer's presence, with its handler groups and their done-marks. With
    /// nobody subscribed yet it goes out again when someone is ([`Peers::mesh_subscribed`]).
    fn announce(&mut self, presence: &proto::roster::Presence) {
        let payload = crate::wire::encode_presence(presence, self.group_announcements());
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), payload)
        {
            Ok(_) => self.peers.announce_sent(),
            Err(PublishError::NoPeersSubscribedToTopic) => {
                debug!("presence not announced: no peer to send it to yet");
            }
            Err(error) => {
                if let Some(n) = stats::bump_throttled(&self.shared.stats.gossip_failed) {
                    warn!(%error, failed_so_far = n,
                        "gossip did not take this peer's presence; the next goes at its time");
                }
            }
        }
    }

    /// Appends a `_mesh.` event of this peer's own to its log (never sent).
    fn local(&self, topic: &str, data: serde_json::Value) {
        if let Some(event) = local_event(self.shared.peer_id, topic, data) {
            drop(self.store.append(vec![Arc::new(event)], false));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { event, reply } => self.enqueue(vec![event], Replier::One(reply)),
            Command::PublishMany { events, reply } => self.enqueue(events, Replier::Many(reply)),
            Command::Query {
                event,
                answers,
                deadline,
                reply,
            } => {
                self.queries.expire(now());
                if self.queries.len() >= super::MAX_OPEN_QUERIES {
                    let _ = reply.send(Err(NodeError::TooManyQueries(super::MAX_OPEN_QUERIES)));
                    return;
                }
                stats::bump(&self.shared.stats.queries);
                // Answers come straight back over a connection: the members connected now
                // are the ones that can answer.
                let asked = self.peers.direct_member_ids().len();
                self.enqueue(
                    vec![event],
                    Replier::Query {
                        reply,
                        answers,
                        deadline,
                        asked,
                    },
                );
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peers.list());
            }
            Command::Status { reply } => {
                let _ = reply.send(SwarmStatus {
                    listen_addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
                    peers: self.peers.members(),
                    mesh_peers: self
                        .swarm
                        .behaviour()
                        .gossipsub
                        .mesh_peers(&self.topic_hash)
                        .count(),
                    streams: self.inbox.len(),
                    buffered: self.inbox.buffered(),
                    forbidden_by: self
                        .forbidden_by
                        .iter()
                        .map(|(p, n)| (p.to_string(), *n))
                        .collect(),
                    banned: self.banned.keys().map(|p| p.to_string()).collect(),
                    groups: self.group_views(),
                    open_queries: self.queries.len(),
                });
            }
            Command::Dial { addr, reply } => {
                let _ = reply.send(self.add_explicit(addr));
            }
            Command::WaitListening { reply } => {
                self.listen_waiters.push(reply);
                self.answer_listen_waiters();
            }
            Command::Shutdown { .. } => unreachable!("handled by the loop"),
        }
    }

    /// Queues publishes for the next round, and starts it if none is being stored.
    fn enqueue(&mut self, events: Vec<Unstamped>, replier: Replier) {
        if events.is_empty() {
            replier.succeed(Vec::new());
            return;
        }
        self.waiting_events += events.len();
        self.waiting.push_back((events, replier));
        if self.storing.is_none() {
            self.start_round();
        }
    }

    /// Stamps what is waiting (up to [`MAX_ROUND_EVENTS`], whole publishes only) into
    /// messages and hands them to the log; they are gossiped once stored.
    fn start_round(&mut self) {
        let mut items = VecDeque::new();
        let mut waiters = Vec::new();
        while let Some((events, _)) = self.waiting.front() {
            if !items.is_empty() && items.len() + events.len() > MAX_ROUND_EVENTS {
                break;
            }
            let Some((events, replier)) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_events -= events.len();
            waiters.push((replier, events.len()));
            items.extend(events);
        }
        let mut messages = Vec::new();
        loop {
            let message = self.publisher.next_message(&mut items, SystemTime::now());
            if message.is_empty() {
                break;
            }
            messages.push(message);
        }
        if messages.is_empty() {
            return;
        }
        let all: Vec<Arc<Event>> = messages.iter().flatten().cloned().collect();
        // A query is open for answers from the moment it has an id, before anyone sees it.
        let mut at = 0;
        for (replier, n) in &waiters {
            if let (
                Replier::Query {
                    answers, deadline, ..
                },
                Some(event),
            ) = (replier, all.get(at))
            {
                let group = crate::event::query_group(event)
                    .flatten()
                    .map(str::to_owned);
                self.queries
                    .register(event.id.to_string(), answers.clone(), *deadline, group);
            }
            at += n;
        }
        self.storing = Some(self.store.append(all, true));
        self.round = Some(Round { messages, waiters });
    }

    /// The round is stored (or not): gossip it and answer, then start the next.
    fn on_stored(&mut self, result: Result<(), StoreError>) {
        let Some(round) = self.round.take() else {
            return;
        };
        match result {
            Err(error) => {
                let all: Vec<Arc<Event>> = round.messages.iter().flatten().cloned().collect();
                self.publisher.unsent(&all);
                warn!(events = all.len(), %error, "publish failed: the events could not be stored");
                let error = Arc::new(error);
                for (replier, _) in round.waiters {
                    replier.fail(NodeError::NotStored(error.clone()));
                }
            }
            Ok(()) => {
                let mut published = VecDeque::new();
                for message in round.messages {
                    let sent_to = self.gossip(&message);
                    stats::add(&self.shared.stats.published, message.len() as u64);
                    if let Some(last) = message.last() {
                        self.inbox.published(self.own, last.seq, now());
                        self.peers.busy(now());
                    }
                    for event in message {
                        debug!(event = %event.id, topic = %event.topic, seq = event.seq, sent_to, "published");
                        published.push_back(Published {
                            id: event.id.to_string(),
                            seq: event.seq,
                            sent_to,
                        });
                    }
                }
                for (replier, n) in round.waiters {
                    replier.succeed(published.drain(..n.min(published.len())).collect());
                }
            }
        }
        if !self.waiting.is_empty() {
            self.start_round();
        }
    }

    /// Gossips a stored message; returns the peers it went to directly. A message gossip
    /// does not take is counted, not lost: it is in the log, and peers fetch it.
    fn gossip(&mut self, message: &[Arc<Event>]) -> usize {
        let payload = crate::wire::encode_batch(message.iter().map(|e| e.as_ref()));
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        match gossip.publish(self.topic.clone(), payload) {
            Ok(_) => gossip
                .all_peers()
                .filter(|(_, topics)| topics.contains(&&self.topic_hash))
                .count(),
            Err(PublishError::NoPeersSubscribedToTopic) => 0,
            Err(error) => {
                if let Some(n) = stats::bump_throttled(&self.shared.stats.gossip_failed) {
                    warn!(events = message.len(), %error, failed_so_far = n,
                        "gossip did not take a stored message; peers will fetch it");
                }
                0
            }
        }
    }

    /// Lets the round on its way to the disk finish and answers its publishers; those
    /// still waiting are told the node stopped.
    async fn finish_round(&mut self) {
        if self.storing.is_some() {
            let result = stored(&mut self.storing).await;
            self.storing = None;
            let waiting = std::mem::take(&mut self.waiting);
            self.on_stored(result);
            self.waiting = waiting;
        }
        for (_, replier) in self.waiting.drain(..) {
            replier.fail(NodeError::Stopped);
        }
    }

    /// Tells every member this peer is leaving and waits (at most [`GOODBYE_WAIT`]) for them
    /// to hear it, so they report `_mesh.peer.left` rather than `_mesh.peer.failed`.
    async fn say_goodbye(&mut self) {
        self.asked.clear();
        // Members heard only over the mesh hear it there.
        if let Some(farewell) = self.peers.farewell() {
            self.announce(&farewell);
        }
        for peer in self.peers.direct_member_ids() {
            self.ask(peer, Asked::Goodbye);
        }
        let deadline = tokio::time::sleep(GOODBYE_WAIT);
        tokio::pin!(deadline);
        while !self.asked.is_empty() {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(BehaviourEvent::Repair(
                        request_response::Event::Message {
                            message: request_response::Message::Response { request_id, .. },
                            ..
                        }
                        | request_response::Event::OutboundFailure { request_id, .. },
                    )) = event
                    {
                        self.asked.remove(&request_id);
                    }
                }
                _ = &mut deadline => break,
            }
        }
    }

    /// Sends a repair request.
    fn ask(&mut self, peer: PeerId, what: Asked) {
        let request = match &what {
            Asked::Marks => Request {
                kind: repair::MARKS,
                own: Some(self.inbox.high(&self.own))
                    .filter(|high| *high > 0)
                    .map(|high| repair::Mark {
                        source: self.own.source.to_bytes(),
                        epoch: self.own.epoch,
                        high,
                    }),
                ..Request::default()
            },
            Asked::Fetch(f) => Request {
                kind: repair::FETCH,
                source: f.stream.source.to_bytes(),
                epoch: f.stream.epoch,
                from: f.from,
                to: f.to,
                ..Request::default()
            },
            Asked::Goodbye => Request {
                kind: repair::GOODBYE,
                ..Request::default()
            },
        };
        self.ask_with(peer, what, request);
    }

    fn ask_with(&mut self, peer: PeerId, what: Asked, request: Request) {
        let id = self
            .swarm
            .behaviour_mut()
            .repair
            .send_request(&peer, request);
        self.asked.insert(id, what);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => match event {
                mdns::Event::Discovered(found) => self.peers.discovered(found, now()),
                mdns::Event::Expired(gone) => self.peers.expired(gone),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.peers.identified(
                    peer_id,
                    &info.protocol_version,
                    info.agent_version,
                    info.listen_addrs,
                );
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => self.on_ping(event),
            SwarmEvent::Behaviour(BehaviourEvent::Repair(event)) => self.on_repair(event),
            SwarmEvent::Behaviour(BehaviourEvent::Answer(event)) => self.on_answer(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                self.peers.connected(peer_id, connection_id, addr, now());
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if !self.swarm.is_connected(&peer_id) {
                    self.limits.forget(&peer_id);
                }
                self.peers.closed(peer_id, connection_id, now());
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                debug!(peer = ?peer_id, %error, "dial failed");
                self.peers.dial_failed(connection_id, &error.to_string());
                if let Some(peer) = peer_id {
                    self.peers.peer_dial_failed(peer, now());
                }
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                self.listening.ready(listener_id);
                self.answer_listen_waiters();
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(?addresses, ?reason, "listener closed");
                self.listening.closed(reason.err().map(|e| e.to_string()));
                self.answer_listen_waiters();
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(%error, "listener error");
            }
            _ => {}
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        match event.result {
            Ok(rtt) => self
                .peers
                .ping_answered(event.peer, event.connection, rtt, now()),
            Err(ping::Failure::Unsupported) => {
                self.peers.ping_unsupported(event.peer, event.connection)
            }
            Err(error) => self
                .peers
                .ping_failed(event.peer, event.connection, &error.to_string()),
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => self.on_message(propagation_source, message_id, message),
            gossipsub::Event::Subscribed { topic, .. } if topic == self.topic_hash => {
                self.peers.mesh_subscribed(now());
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                debug!(peer = %peer_id, "peer does not speak gossipsub");
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                warn!(peer = %peer_id, ?failed_messages, "peer is too slow; messages to it were dropped");
            }
            _ => {}
        }
    }

    fn listen_addrs(&self) -> Vec<Multiaddr> {
        let me: PeerId = self.shared.peer_id;
        self.swarm
            .listeners()
            .map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a))
            .collect()
    }

    fn answer_listen_waiters(&mut self) {
        let Some(outcome) = self.listening.outcome() else {
            return;
        };
        let addrs = self.listen_addrs();
        for waiter in self.listen_waiters.drain(..) {
            let _ = waiter.send(match &outcome {
                Ok(()) => Ok(addrs.clone()),
                Err(reason) => Err(NodeError::Listener(reason.clone())),
            });
        }
    }
}
