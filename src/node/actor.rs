//! The task that owns the swarm. It reacts to swarm events and to commands from handles, and
//! nothing else touches the swarm. It never waits on handlers or subscribers: delivery to
//! them is a non-blocking hand-off into bounded queues.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic, PublishError, TopicHash};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent, DEAD_AFTER, PING_INTERVAL, PROTOCOL_VERSION};
use super::{local_event, Command, NodeError, PeerInfo, Published, Shared, MESH_TOPIC};
use crate::config::{GOSSIP_ENVELOPE_OVERHEAD, MAX_MESSAGE_SIZE};
use crate::event::{Event, EventId, Payload};
use crate::stats;
use crate::topic::Topic;
use crate::wire;

/// Bytes of events gathered into one gossipsub message when publishers are quicker than the
/// network. One message per event would cost a signature and its check per event; batching
/// only takes what is already queued, so it adds no delay.
const BATCH_BYTES: usize = 256 * 1024;

/// Bound on the per-event overhead in a batch beyond [`crate::event::event_size`] (id, seq,
/// time, field tags and lengths).
const EVENT_WIRE_OVERHEAD: usize = 64;

/// How often known but disconnected peers (from mDNS or `--peer`) are dialled again.
const REDIAL_INTERVAL: Duration = Duration::from_secs(2);

/// Most peers remembered from mDNS; more are ignored until some expire.
const MAX_KNOWN_PEERS: usize = 1024;

/// Most `--peer` (or dialled) addresses kept and redialled.
const MAX_EXPLICIT_PEERS: usize = 256;

/// Most addresses remembered or shown per peer.
const MAX_ADDRS_PER_PEER: usize = 16;

/// An event a publisher handed in, not yet stamped.
struct Unpublished(Topic, String, Payload);

impl Unpublished {
    /// Bytes it will take in a batch, as an upper bound.
    fn wire_size(&self) -> usize {
        crate::event::event_size(self.0.as_str(), &self.1, &self.2.content_type, &self.2.data)
            + EVENT_WIRE_OVERHEAD
    }
}

type Reply = oneshot::Sender<Result<Published, NodeError>>;

/// What `status` needs from the swarm.
pub(super) struct SwarmStatus {
    pub listen_addrs: Vec<String>,
    pub peers: usize,
    pub mesh_peers: usize,
}

/// A connected peer.
#[derive(Default)]
struct Peer {
    connections: HashMap<ConnectionId, Connection>,
    /// Set once identify says it speaks meshbus.
    identity: Option<Identity>,
    rtt: Option<Duration>,
}

/// One connection to a peer.
struct Connection {
    addr: Multiaddr,
    /// Last sign of life: established, or a ping answered. Connections silent for
    /// [`super::behaviour::DEAD_AFTER`] are closed (an unplugged peer sends no FIN).
    alive_at: Instant,
    /// The other side does not speak ping, so silence proves nothing.
    no_ping: bool,
}

struct Identity {
    agent: String,
    name: Option<String>,
    listen_addrs: Vec<Multiaddr>,
}

/// A `--peer` address and what we know of it.
struct Explicit {
    addr: Multiaddr,
    /// Learned on the first connection, so a redial is skipped while it is connected.
    peer: Option<PeerId>,
    /// The dial in flight, so redials do not pile up.
    dialing: Option<ConnectionId>,
}

pub(super) struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    topic: IdentTopic,
    topic_hash: TopicHash,
    /// Sequence number of the last event this peer published.
    seq: u64,
    peers: HashMap<PeerId, Peer>,
    /// Addresses learned by mDNS, for redialling peers whose connection dropped.
    known: HashMap<PeerId, Vec<Multiaddr>>,
    explicit: Vec<Explicit>,
    listen_expected: usize,
    listen_ready: HashSet<libp2p::core::transport::ListenerId>,
    listen_failed: Option<String>,
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
        let topic = IdentTopic::new(MESH_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| NodeError::Transport(format!("cannot subscribe to {MESH_TOPIC}: {e}")))?;
        let mut actor = Self {
            swarm,
            commands,
            shared,
            topic_hash: topic.hash(),
            topic,
            seq: 0,
            peers: HashMap::new(),
            known: HashMap::new(),
            explicit: Vec::new(),
            listen_expected,
            listen_ready: HashSet::new(),
            listen_failed: None,
            listen_waiters: Vec::new(),
            deferred: None,
        };
        for addr in peers {
            actor.add_explicit(addr)?;
        }
        Ok(actor)
    }

    pub(super) async fn run(mut self) {
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = tokio::time::interval(PING_INTERVAL);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown_reply = loop {
            let command = match self.deferred.take() {
                Some(command) => command,
                None => tokio::select! {
                    event = self.swarm.select_next_some() => {
                        self.on_swarm_event(event);
                        continue;
                    }
                    command = self.commands.recv() => match command {
                        Some(command) => command,
                        None => break None,
                    },
                    _ = redial.tick() => {
                        self.redial();
                        continue;
                    }
                    _ = liveness.tick() => {
                        self.close_silent_connections();
                        continue;
                    }
                },
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

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish {
                topic,
                event_type,
                payload,
                reply,
            } => self.publish_queued(Unpublished(topic, event_type, payload), reply),
            Command::PublishMany { events, reply } => {
                let items: Vec<Unpublished> = events
                    .into_iter()
                    .map(|(topic, event_type, payload)| Unpublished(topic, event_type, payload))
                    .collect();
                let total = items.len();
                let result = match self.publish_events(items) {
                    (published, None) => Ok(published),
                    (published, Some(reason)) => Err(NodeError::Publish(format!(
                        "{reason}; the first {} of the {total} events were published",
                        published.len()
                    ))),
                };
                let _ = reply.send(result);
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peer_list());
            }
            Command::Status { reply } => {
                let _ = reply.send(SwarmStatus {
                    listen_addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
                    peers: self.identified().count(),
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
    fn publish_queued(&mut self, first: Unpublished, reply: Reply) {
        let mut items = vec![first];
        let mut replies = vec![Some(reply)];
        let mut bytes = items[0].wire_size();
        while bytes < BATCH_BYTES {
            match self.commands.try_recv() {
                Ok(Command::Publish {
                    topic,
                    event_type,
                    payload,
                    reply,
                }) => {
                    let item = Unpublished(topic, event_type, payload);
                    bytes += item.wire_size();
                    items.push(item);
                    replies.push(Some(reply));
                }
                Ok(other) => {
                    self.deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let (published, failure) = self.publish_events(items);
        let sent = published.len();
        for (p, reply) in published
            .into_iter()
            .zip(replies.iter_mut().map(Option::take))
        {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(p));
            }
        }
        if let Some(reason) = failure {
            for reply in replies.into_iter().skip(sent).flatten() {
                let _ = reply.send(Err(NodeError::Publish(reason.clone())));
            }
        }
    }

    /// Stamps events (id, seq, time), publishes them in as few messages as fit, and delivers
    /// them locally, in order. Returns what was published and, if a message failed, why: the
    /// events of that message and after are not published, and their sequence numbers are
    /// given back so receivers see no gap.
    fn publish_events(&mut self, items: Vec<Unpublished>) -> (Vec<Published>, Option<String>) {
        let mut published = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut message = Vec::new();
            let mut bytes = 0;
            while let Some(item) = items.next_if(|item| {
                message.is_empty()
                    || (bytes < BATCH_BYTES
                        && bytes + item.wire_size() <= MAX_MESSAGE_SIZE - GOSSIP_ENVELOPE_OVERHEAD)
            }) {
                bytes += item.wire_size();
                let Unpublished(topic, event_type, payload) = item;
                self.seq += 1;
                message.push(Arc::new(Event {
                    id: EventId::new(),
                    topic,
                    event_type,
                    source: self.shared.peer_id,
                    seq: self.seq,
                    time: SystemTime::now(),
                    content_type: payload.content_type,
                    data: payload.data,
                }));
            }
            let payload = wire::encode_batch(message.iter().map(|e| e.as_ref()));
            let gossip = &mut self.swarm.behaviour_mut().gossipsub;
            let sent_to = match gossip.publish(self.topic.clone(), payload) {
                Ok(_) => gossip
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&self.topic_hash))
                    .count(),
                Err(PublishError::NoPeersSubscribedToTopic) => 0,
                Err(e) => {
                    self.seq -= message.len() as u64;
                    let reason = match e {
                        PublishError::AllQueuesFull(n) => format!(
                            "the send queues to all {n} peers are full; the mesh is saturated, try again"
                        ),
                        other => other.to_string(),
                    };
                    warn!(events = message.len(), %reason, "publish failed");
                    return (published, Some(reason));
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
        (published, None)
    }

    /// Hands an event to the local handler table and `tail` subscribers. Never waits.
    fn deliver(&self, event: Arc<Event>) {
        self.shared.handlers.dispatch(&event);
        let _ = self.shared.tail.send(event);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.on_mdns(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.on_identify(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => self.on_ping(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                debug!(peer = %peer_id, %addr, "connected");
                for explicit in &mut self.explicit {
                    if explicit.dialing == Some(connection_id) {
                        explicit.dialing = None;
                        explicit.peer = Some(peer_id);
                    }
                }
                self.peers.entry(peer_id).or_default().connections.insert(
                    connection_id,
                    Connection {
                        addr,
                        alive_at: Instant::now(),
                        no_ping: false,
                    },
                );
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if let Some(peer) = self.peers.get_mut(&peer_id) {
                    peer.connections.remove(&connection_id);
                }
                if num_established == 0 {
                    if let Some(peer) = self.peers.remove(&peer_id) {
                        if peer.identity.is_some() {
                            info!(peer = %peer_id, "peer left");
                            self.mesh_event(
                                "_mesh.peer.left",
                                serde_json::json!({ "peer": peer_id.to_string() }),
                            );
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                for explicit in &mut self.explicit {
                    if explicit.dialing == Some(connection_id) {
                        explicit.dialing = None;
                        warn!(addr = %explicit.addr, %error, "cannot reach peer; will retry");
                    }
                }
                debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                self.listen_ready.insert(listener_id);
                self.answer_listen_waiters();
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(?addresses, ?reason, "listener closed");
                if let Err(e) = reason {
                    self.listen_failed.get_or_insert(e.to_string());
                }
                self.answer_listen_waiters();
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(%error, "listener error");
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message { message, .. } => {
                let stats = &self.shared.stats;
                stats::bump(&stats.messages_received);
                let Some(source) = message.source else {
                    // Strict validation refuses unsigned messages, so this cannot happen; drop
                    // and count it all the same.
                    self.malformed(None, "message has no signed source".to_owned());
                    return;
                };
                match wire::decode_batch(message.data, source, self.shared.max_event_size) {
                    Ok(decoded) => {
                        for error in decoded.rejected {
                            let n = bump_count(&stats.events_rejected);
                            if n.is_power_of_two() {
                                warn!(peer = %source, %error, rejected_so_far = n, "dropped an event");
                            }
                        }
                        stats::add(&stats.received, decoded.events.len() as u64);
                        for event in decoded.events {
                            stats.receive_latency.record(wire::age_micros(event.time));
                            self.deliver(Arc::new(event));
                        }
                    }
                    Err(error) => self.malformed(Some(source), error.to_string()),
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

    /// Counts a dropped message and logs it, with exponentially fewer lines for a flood.
    fn malformed(&self, source: Option<PeerId>, reason: String) {
        let n = bump_count(&self.shared.stats.messages_malformed);
        if n.is_power_of_two() {
            warn!(peer = ?source, %reason, malformed_so_far = n, "dropped a malformed message");
        }
    }

    fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(found) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if peer != self.shared.peer_id {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    debug!(%peer, ?addrs, "discovered by mDNS");
                    if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN_PEERS {
                        warn!(%peer, limit = MAX_KNOWN_PEERS, "too many peers known; ignoring this one");
                        continue;
                    }
                    let known = self.known.entry(peer).or_default();
                    for addr in addrs {
                        if !known.contains(&addr) && known.len() < MAX_ADDRS_PER_PEER {
                            known.push(addr);
                        }
                    }
                    self.dial_known(peer);
                }
            }
            mdns::Event::Expired(gone) => {
                for (peer, addr) in gone {
                    if let Some(addrs) = self.known.get_mut(&peer) {
                        addrs.retain(|a| a != &addr);
                        if addrs.is_empty() {
                            self.known.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        if info.protocol_version != PROTOCOL_VERSION {
            info!(peer = %peer_id, protocol = %info.protocol_version, "not a meshbus peer; disconnecting");
            self.known.remove(&peer_id);
            let _ = self.swarm.disconnect_peer_id(peer_id);
            return;
        }
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            return;
        };
        let joined = peer.identity.is_none();
        let name = info
            .agent_version
            .split_once(" (")
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .map(str::to_owned);
        let mut listen_addrs = info.listen_addrs;
        listen_addrs.truncate(MAX_ADDRS_PER_PEER);
        peer.identity = Some(Identity {
            agent: info.agent_version,
            name: name.clone(),
            listen_addrs,
        });
        if joined {
            info!(peer = %peer_id, name = ?name, "peer joined");
            self.mesh_event(
                "_mesh.peer.joined",
                serde_json::json!({ "peer": peer_id.to_string(), "name": name }),
            );
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        match event.result {
            Ok(rtt) => {
                if let Some(peer) = self.peers.get_mut(&event.peer) {
                    peer.rtt = Some(rtt);
                    if let Some(conn) = peer.connections.get_mut(&event.connection) {
                        conn.alive_at = Instant::now();
                    }
                }
            }
            // A peer without ping is odd but not dead; liveness then rests on TCP/QUIC.
            Err(ping::Failure::Unsupported) => {
                if let Some(conn) = self
                    .peers
                    .get_mut(&event.peer)
                    .and_then(|p| p.connections.get_mut(&event.connection))
                {
                    conn.no_ping = true;
                }
            }
            Err(error) => {
                debug!(peer = %event.peer, %error, "ping failed; closing the connection");
                self.swarm.close_connection(event.connection);
            }
        }
    }

    /// Delivers one of the mesh's own events (`_mesh.…`) locally; they never travel.
    fn mesh_event(&self, topic: &str, data: serde_json::Value) {
        if let Some(event) = local_event(self.shared.peer_id, topic, data) {
            self.deliver(Arc::new(event));
        }
    }

    fn dial_known(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let Some(addrs) = self.known.get(&peer) else {
            return;
        };
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs.clone())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(error) = self.swarm.dial(opts) {
            debug!(%peer, %error, "dial not started");
        }
    }

    fn add_explicit(&mut self, addr: Multiaddr) -> Result<(), NodeError> {
        if !self.explicit.iter().any(|e| e.addr == addr) {
            if self.explicit.len() >= MAX_EXPLICIT_PEERS {
                return Err(NodeError::Dial {
                    addr,
                    reason: format!("this node already keeps {MAX_EXPLICIT_PEERS} peer addresses"),
                });
            }
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            self.explicit.push(Explicit {
                addr: addr.clone(),
                peer,
                dialing: None,
            });
        }
        let index = self.explicit.iter().position(|e| e.addr == addr);
        match index {
            Some(i) => self.dial_explicit(i),
            None => Ok(()),
        }
    }

    fn dial_explicit(&mut self, index: usize) -> Result<(), NodeError> {
        let explicit = &self.explicit[index];
        if explicit.dialing.is_some() {
            return Ok(());
        }
        if let Some(peer) = explicit.peer {
            if self.swarm.is_connected(&peer) {
                return Ok(());
            }
        }
        let opts = DialOpts::unknown_peer_id()
            .address(explicit.addr.clone())
            .build();
        let id = opts.connection_id();
        let addr = explicit.addr.clone();
        self.swarm.dial(opts).map_err(|e| NodeError::Dial {
            addr,
            reason: e.to_string(),
        })?;
        self.explicit[index].dialing = Some(id);
        Ok(())
    }

    /// Closes connections whose peer has not answered a ping for [`DEAD_AFTER`]: libp2p's
    /// ping reports only the second failure in a row and its timeouts stack up, so a peer
    /// whose cable was pulled would otherwise linger in `peers` for tens of seconds.
    fn close_silent_connections(&mut self) {
        let silent: Vec<(PeerId, ConnectionId)> = self
            .peers
            .iter()
            .flat_map(|(peer, p)| {
                p.connections
                    .iter()
                    .filter(|(_, c)| !c.no_ping && c.alive_at.elapsed() > DEAD_AFTER)
                    .map(|(id, _)| (*peer, *id))
            })
            .collect();
        for (peer, connection) in silent {
            debug!(%peer, "no sign of life; closing the connection");
            self.swarm.close_connection(connection);
        }
    }

    fn redial(&mut self) {
        let known: Vec<PeerId> = self.known.keys().copied().collect();
        for peer in known {
            self.dial_known(peer);
        }
        for i in 0..self.explicit.len() {
            if let Err(error) = self.dial_explicit(i) {
                debug!(%error, "redial failed");
            }
        }
    }

    fn identified(&self) -> impl Iterator<Item = (&PeerId, &Peer, &Identity)> {
        self.peers
            .iter()
            .filter_map(|(id, p)| p.identity.as_ref().map(|i| (id, p, i)))
    }

    fn peer_list(&self) -> Vec<PeerInfo> {
        let mut list: Vec<PeerInfo> = self
            .identified()
            .map(|(id, peer, identity)| PeerInfo {
                peer_id: id.to_string(),
                name: identity.name.clone(),
                agent: identity.agent.clone(),
                connected_addrs: peer
                    .connections
                    .values()
                    .map(|c| c.addr.to_string())
                    .collect(),
                listen_addrs: identity
                    .listen_addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                rtt_ms: peer.rtt.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect();
        list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        list
    }

    fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm
            .listeners()
            .map(|a| {
                a.clone()
                    .with_p2p(self.shared.peer_id)
                    .unwrap_or_else(|a| a)
            })
            .collect()
    }

    fn answer_listen_waiters(&mut self) {
        let result = if let Some(reason) = &self.listen_failed {
            Err(NodeError::Transport(format!("a listener failed: {reason}")))
        } else if self.listen_ready.len() >= self.listen_expected {
            Ok(self.listen_addrs())
        } else {
            return;
        };
        for waiter in self.listen_waiters.drain(..) {
            let _ = waiter.send(match &result {
                Ok(addrs) => Ok(addrs.clone()),
                Err(e) => Err(NodeError::Transport(e.to_string())),
            });
        }
    }
}

/// Bumps a counter and returns its new value.
fn bump_count(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}
