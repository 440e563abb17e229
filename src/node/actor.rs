//! The task that owns the swarm. It feeds the IO-free core ([`crate::proto`]) what the
//! network and the handles say, and carries out what the core decides. It never waits on
//! handlers or subscribers: delivery to them is a non-blocking hand-off into bounded queues.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic, PublishError, TopicHash};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::{Command, NodeError, Published, Shared, SwarmStatus};
use crate::event::{local_event, Event};
use crate::proto::{self, Listening, Membership, PeerAction, Peers, Publisher, Unstamped};
use crate::stats;

type Reply = oneshot::Sender<Result<Published, NodeError>>;

/// The time the core is told, from tokio's clock, which its timer runs on.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Why a message of events could not be published.
struct Unpublished {
    /// Events of the batch published before the failure.
    published: Vec<Published>,
    /// The failure, shared by every publish the message carried.
    error: Arc<PublishError>,
}

pub(super) struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    topic: IdentTopic,
    topic_hash: TopicHash,
    publisher: Publisher,
    peers: Peers,
    listening: Listening,
    listen_waiters: Vec<oneshot::Sender<Result<Vec<Multiaddr>, NodeError>>>,
    /// A command taken off the queue while gathering a batch, handled next.
    deferred: Option<Command>,
}

impl Actor {
    pub(super) fn new(
        mut swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
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
        let mut actor = Self {
            swarm,
            commands,
            shared,
            topic_hash: topic.hash(),
            topic,
            publisher: Publisher::new(me),
            peers: Peers::new(me, now()),
            listening: Listening::new(listen_expected),
            listen_waiters: Vec::new(),
            deferred: None,
        };
        for addr in peers {
            actor.add_explicit(addr)?;
        }
        Ok(actor)
    }

    pub(super) async fn run(mut self) {
        let timer = tokio::time::sleep_until(self.peers.poll_timeout().into());
        tokio::pin!(timer);
        let shutdown_reply = loop {
            self.carry_out();
            let deadline = self.peers.poll_timeout().into();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let command = match self.deferred.take() {
                Some(command) => command,
                None => {
                    tokio::select! {
                        event = self.swarm.select_next_some() => {
                            self.on_swarm_event(event);
                            continue;
                        }
                        command = self.commands.recv() => match command {
                            Some(command) => command,
                            None => break None,
                        },
                        _ = &mut timer => {
                            self.peers.handle_timeout(now());
                            continue;
                        }
                    }
                }
            };
            if let Command::Shutdown { reply } = command {
                break Some(reply);
            }
            self.on_command(command);
        };
        info!("shutting down");
        drop(self.swarm);
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Carries out what the peer table decided.
    fn carry_out(&mut self) {
        while let Some(action) = self.peers.poll_action() {
            match action {
                PeerAction::Dial { peer, addrs } => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
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
            }
        }
    }

    fn dial_address(&mut self, addr: &Multiaddr) -> Result<(), NodeError> {
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
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
    fn membership(&self, change: Membership) {
        if let Some(event) = local_event(self.shared.peer_id, change.topic(), change.data()) {
            self.deliver(Arc::new(event));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { event, reply } => self.publish_queued(event, reply),
            Command::PublishMany { events, reply } => {
                let total = events.len();
                let result = self.publish(events.into()).map_err(|u| NodeError::Partly {
                    published: u.published.len(),
                    total,
                    source: Box::new(NodeError::from(&u.error)),
                });
                let _ = reply.send(result);
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

    /// Publishes this command's event and any other single publishes already queued, so
    /// that they share messages, then answers each.
    fn publish_queued(&mut self, first: Unstamped, reply: Reply) {
        let mut bytes = first.wire_size();
        let mut items = VecDeque::from([first]);
        let mut replies = vec![reply];
        while !Publisher::batch_full(bytes) {
            match self.commands.try_recv() {
                Ok(Command::Publish { event, reply }) => {
                    bytes += event.wire_size();
                    items.push_back(event);
                    replies.push(reply);
                }
                Ok(other) => {
                    self.deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let (published, error) = match self.publish(items) {
            Ok(published) => (published, None),
            Err(u) => (u.published, Some(u.error)),
        };
        let mut replies = replies.into_iter();
        for (p, reply) in published.into_iter().zip(replies.by_ref()) {
            let _ = reply.send(Ok(p));
        }
        if let Some(error) = error {
            for reply in replies {
                let _ = reply.send(Err(NodeError::from(&error)));
            }
        }
    }

    /// Stamps and publishes events in as few messages as fit, and delivers them locally, in
    /// order. If a message fails, its events and those after it are not published, and their
    /// sequence numbers are given back so receivers see no gap.
    fn publish(&mut self, mut items: VecDeque<Unstamped>) -> Result<Vec<Published>, Unpublished> {
        let mut published = Vec::with_capacity(items.len());
        loop {
            let message = self.publisher.next_message(&mut items, SystemTime::now());
            if message.is_empty() {
                return Ok(published);
            }
            let payload = crate::wire::encode_batch(message.iter().map(|e| e.as_ref()));
            let gossip = &mut self.swarm.behaviour_mut().gossipsub;
            let sent_to = match gossip.publish(self.topic.clone(), payload) {
                Ok(_) => gossip
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&self.topic_hash))
                    .count(),
                Err(PublishError::NoPeersSubscribedToTopic) => 0,
                Err(e) => {
                    self.publisher.unsent(&message);
                    let error = Arc::new(e);
                    warn!(events = message.len(), %error, "publish failed");
                    return Err(Unpublished { published, error });
                }
            };
            stats::add(&self.shared.stats.published, message.len() as u64);
            for event in message {
                debug!(event = %event.id, topic = %event.topic, seq = event.seq, sent_to, "published");
                published.push(Published {
                    id: event.id.to_string(),
                    seq: event.seq,
                    sent_to,
                });
                self.deliver(event);
            }
        }
    }

    /// Hands an event to the local handler table and `tail` subscribers. Never waits.
    fn deliver(&self, event: Arc<Event>) {
        self.shared.handlers.dispatch(&event);
        let _ = self.shared.tail.send(event);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => match event {
                mdns::Event::Discovered(found) => self.peers.discovered(found),
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
                self.peers.closed(peer_id, connection_id);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                debug!(peer = ?peer_id, %error, "dial failed");
                self.peers.dial_failed(connection_id, &error.to_string());
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
            gossipsub::Event::Message { message, .. } => {
                let stats = &self.shared.stats;
                stats::bump(&stats.messages_received);
                let source = message.source;
                let max = self.shared.max_event_size;
                match proto::receive(source, message.data, max, SystemTime::now()) {
                    Ok(decoded) => {
                        for error in decoded.rejected {
                            if let Some(n) = stats::bump_throttled(&stats.events_rejected) {
                                warn!(peer = ?source, %error, rejected_so_far = n, "dropped an event");
                            }
                        }
                        stats::add(&stats.received, decoded.events.len() as u64);
                        for event in decoded.events {
                            stats
                                .receive_latency
                                .record(crate::clock::age_micros(event.time));
                            self.deliver(Arc::new(event));
                        }
                    }
                    Err(error) => {
                        if let Some(n) = stats::bump_throttled(&stats.messages_malformed) {
                            warn!(peer = ?source, %error, malformed_so_far = n, "dropped a malformed message");
                        }
                    }
                }
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
