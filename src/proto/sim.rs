//! A deterministic simulation of several peers running the IO-free core over a simulated
//! LAN: connections, identify, pings, event messages and repair (marks and fetches) travel
//! with seeded random delay, loss, duplication and reordering; hosts are cut off and plugged
//! back in. Each peer's inbox decides what goes into its log. Virtual time
//! moves from one scheduled thing to the next. A failure names its seed;
//! `MESHBUS_SIM_SEED=N cargo test sim` replays it exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use libp2p::identity::Keypair;
use std::time::{Duration, Instant, SystemTime};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use super::inbox::FETCH_MAX_EVENTS;
use super::peers::{self, DEAD_AFTER, PING_INTERVAL, PROTOCOL_VERSION, REDIAL_INTERVAL};
use super::{Fetch, Inbox, Membership, PeerAction, Peers, Publisher, StreamId, Unstamped};
use crate::event::{Event, Payload};
use crate::topic::Topic;
use crate::wire;

/// How the simulated network and the publishers' send queues behave.
#[derive(Clone, Copy)]
struct Weather {
    /// Share of event messages lost on each link.
    loss: f64,
    /// Share delivered twice.
    duplicate: f64,
    /// Largest one-way delay; each message draws its own, so later ones can overtake.
    max_delay: Duration,
    /// Share of pings that go unanswered.
    ping_loss: f64,
    /// Share of messages the publisher's send queues refuse (gossipsub's "all queues full"):
    /// that message is stored but not sent; peers must fetch it.
    refused: f64,
}

const CALM: Weather = Weather {
    loss: 0.0,
    duplicate: 0.0,
    max_delay: Duration::from_micros(1),
    ping_loss: 0.0,
    refused: 0.0,
};

const STORM: Weather = Weather {
    loss: 0.2,
    duplicate: 0.1,
    max_delay: Duration::from_millis(30),
    ping_loss: 0.3,
    refused: 0.1,
};

/// Something in flight, due at a virtual time.
enum Msg {
    /// A dial from `from` reaches node `to`.
    Dial {
        from: usize,
        to: usize,
        id: ConnectionId,
    },
    /// Identify from `from` arrives at `to` over `to`'s connection.
    Identify { from: usize, to: usize },
    /// The remote side of a connection learns it was closed.
    Closed {
        at: usize,
        peer: usize,
        id: ConnectionId,
    },
    /// An event message from `from` arrives at `to`.
    Events {
        from: usize,
        to: usize,
        payload: Vec<u8>,
    },
    /// `from`'s marks (an anti-entropy answer) arrive at `to`.
    Marks {
        from: usize,
        to: usize,
        marks: Vec<(StreamId, u64)>,
    },
    /// A fetch from `from` arrives at `to`.
    Fetch {
        from: usize,
        to: usize,
        fetch: Fetch,
    },
    /// The answer to a fetch arrives back at `to` from `from`.
    Fetched {
        from: usize,
        to: usize,
        stream: StreamId,
        first: u64,
        events: Vec<Event>,
        asked_to: u64,
    },
}

/// How often each node's anti-entropy round comes ([`Peers::marks_round`] says whom it asks).
const ANTI_ENTROPY: Duration = Duration::from_secs(1);

struct Node {
    id: PeerId,
    peers: Peers,
    publisher: Publisher,
    /// Membership events in order, with when they came.
    membership: Vec<(Duration, Membership)>,
    /// Per source, the sequence numbers of events received, in arrival order.
    received: BTreeMap<PeerId, Vec<u64>>,
    /// The sequence numbers of the events this node's messages carried onto the network.
    sent: Vec<u64>,
    inbox: Inbox,
    /// Its log: per source, the sequence numbers the inbox passed on, in order.
    log: BTreeMap<PeerId, Vec<u64>>,
    /// What it can answer fetches from: its own events and those in its log.
    held: BTreeMap<StreamId, BTreeMap<u64, Event>>,
}

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    start: Instant,
    now: Instant,
    nodes: Vec<Node>,
    /// Whether each host is plugged in.
    up: Vec<bool>,
    /// Each connection: (owner, remote node, remote's id for it).
    conns: BTreeMap<ConnectionId, (usize, usize, ConnectionId)>,
    next_conn: usize,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    msgs: HashMap<u64, Msg>,
    next_msg: u64,
    next_ping: Instant,
    next_marks: Instant,
    weather: Weather,
}

fn addr(i: usize) -> Multiaddr {
    format!("/ip4/10.0.0.{}/tcp/7421", i + 1).parse().unwrap()
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let start = Instant::now();
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                // Identities from the seed too, so a run replays exactly.
                let mut secret = [0u8; 32];
                secret[..8].copy_from_slice(&seed.to_le_bytes());
                secret[8] = i as u8 + 1;
                let id = Keypair::ed25519_from_bytes(secret)
                    .unwrap()
                    .public()
                    .to_peer_id();
                Node {
                    id,
                    peers: Peers::new(id, start),
                    publisher: Publisher::new(id, 1, 0),
                    membership: Vec::new(),
                    received: BTreeMap::new(),
                    sent: Vec::new(),
                    inbox: Inbox::new(id),
                    log: BTreeMap::new(),
                    held: BTreeMap::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng: fastrand::Rng::with_seed(seed),
            start,
            now: start,
            nodes,
            up: vec![true; n],
            conns: BTreeMap::new(),
            next_conn: 0,
            queue: BinaryHeap::new(),
            msgs: HashMap::new(),
            next_msg: 0,
            next_ping: start + PING_INTERVAL,
            next_marks: start + ANTI_ENTROPY,
            weather: CALM,
        };
        // mDNS: everyone hears everyone at start.
        let all: Vec<(PeerId, Multiaddr)> = (0..n).map(|i| (sim.nodes[i].id, addr(i))).collect();
        for i in 0..n {
            let now = sim.now;
            sim.nodes[i].peers.discovered(all.clone(), now);
            sim.carry_out(i);
        }
        sim
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn index_of(&self, peer: &PeerId) -> usize {
        self.nodes.iter().position(|n| n.id == *peer).unwrap()
    }

    /// Link delay for control traffic: 0.1 to 2 ms.
    fn control_delay(&mut self) -> Duration {
        Duration::from_micros(self.rng.u64(100..2000))
    }

    fn send(&mut self, after: Duration, msg: Msg) {
        let id = self.next_msg;
        self.next_msg += 1;
        self.msgs.insert(id, msg);
        self.queue.push(Reverse((self.now + after, id)));
    }

    fn connection_id(&mut self) -> ConnectionId {
        self.next_conn += 1;
        ConnectionId::new_unchecked(self.next_conn)
    }

    fn carry_out(&mut self, i: usize) {
        while let Some(action) = self.nodes[i].peers.poll_action() {
            match action {
                PeerAction::Dial { peer, .. } => {
                    let to = self.index_of(&peer);
                    let id = self.connection_id();
                    let delay = self.control_delay();
                    self.send(delay, Msg::Dial { from: i, to, id });
                }
                PeerAction::DialAddress(_) => unreachable!("the simulation uses mDNS only"),
                PeerAction::Close(id) => self.close(i, id),
                PeerAction::Disconnect(peer) => {
                    let ids: Vec<ConnectionId> = self
                        .conns
                        .iter()
                        .filter(|(_, (owner, remote, _))| {
                            *owner == i && self.nodes[*remote].id == peer
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        self.close(i, id);
                    }
                }
                PeerAction::Membership(m) => {
                    let at = self.elapsed();
                    self.nodes[i].peers.busy(self.now);
                    self.nodes[i].membership.push((at, m));
                }
                // A member reached over a connection is asked for its marks at once, as the
                // swarm task does.
                PeerAction::Reached(peer) => {
                    let from = self.index_of(&peer);
                    self.ask_marks(i, from);
                }
                // The simulated LAN is a full mesh of direct connections; its peers never
                // announce themselves (see `Peers::announcing`).
                PeerAction::Announce(_) => {}
            }
        }
    }

    /// Node `i` closes its connection `id`; the other side hears of it if the LAN lets it.
    fn close(&mut self, i: usize, id: ConnectionId) {
        let Some((_, remote, remote_id)) = self.conns.remove(&id) else {
            return;
        };
        let peer = self.nodes[remote].id;
        self.nodes[i].peers.closed(peer, id, self.now);
        let delay = self.control_delay();
        self.send(
            delay,
            Msg::Closed {
                at: remote,
                peer: i,
                id: remote_id,
            },
        );
        self.carry_out(i);
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.up[a] && self.up[b]
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Dial { from, to, id } => {
                if !self.linked(from, to) {
                    self.nodes[from].peers.dial_failed(id, "unreachable");
                    return;
                }
                let remote_id = self.connection_id();
                self.conns.insert(id, (from, to, remote_id));
                self.conns.insert(remote_id, (to, from, id));
                let (a, b) = (self.nodes[from].id, self.nodes[to].id);
                self.nodes[from].peers.connected(b, id, addr(to), self.now);
                self.nodes[to]
                    .peers
                    .connected(a, remote_id, addr(from), self.now);
                for (x, y) in [(from, to), (to, from)] {
                    let delay = self.control_delay();
                    self.send(delay, Msg::Identify { from: x, to: y });
                }
            }
            Msg::Identify { from, to } => {
                if self.linked(from, to) {
                    let peer = self.nodes[from].id;
                    let agent = peers::agent(Some(&format!("h{from}")));
                    self.nodes[to].peers.identified(
                        peer,
                        PROTOCOL_VERSION,
                        agent,
                        vec![addr(from)],
                    );
                    self.carry_out(to);
                }
            }
            Msg::Closed { at, peer, id } => {
                if self.linked(at, peer) && self.conns.remove(&id).is_some() {
                    let peer = self.nodes[peer].id;
                    self.nodes[at].peers.closed(peer, id, self.now);
                    self.carry_out(at);
                }
            }
            Msg::Events { from, to, payload } => {
                if self.linked(from, to) {
                    let source = self.nodes[from].id;
                    let decoded =
                        super::receive(Some(source), payload, 4096, SystemTime::now()).unwrap();
                    assert!(decoded.rejected.is_empty(), "seed {}", self.seed);
                    let got = self.nodes[to].received.entry(source).or_default();
                    got.extend(decoded.events.iter().map(|e| e.seq));
                    for event in decoded.events {
                        self.nodes[to].inbox.receive(event, source, self.now);
                    }
                    self.take_ready(to);
                }
            }
            Msg::Marks { from, to, marks } => {
                if self.linked(from, to) {
                    let peer = self.nodes[from].id;
                    for (stream, high) in marks {
                        self.nodes[to].inbox.learn(stream, high, peer, self.now);
                    }
                    self.fetches(to);
                }
            }
            Msg::Fetch { from, to, fetch } => {
                if self.linked(from, to) {
                    let held = self.nodes[to].held.get(&fetch.stream);
                    let first = held.and_then(|h| h.keys().next().copied()).unwrap_or(0);
                    let events = held
                        .map(|h| {
                            h.range(fetch.from..=fetch.to)
                                .take(FETCH_MAX_EVENTS as usize)
                                .map(|(_, e)| e.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    let delay = self.link_delay();
                    if self.rng.f64() >= self.weather.loss {
                        let answer = Msg::Fetched {
                            from: to,
                            to: from,
                            stream: fetch.stream,
                            first,
                            events,
                            asked_to: fetch.to,
                        };
                        self.send(delay, answer);
                    }
                }
            }
            Msg::Fetched {
                from,
                to,
                stream,
                first,
                events,
                asked_to,
            } => {
                if self.linked(from, to) {
                    let peer = self.nodes[from].id;
                    let more = events.last().is_some_and(|e| e.seq < asked_to);
                    self.nodes[to]
                        .inbox
                        .fetched(stream, peer, first, events, more, self.now);
                    self.take_ready(to);
                    self.fetches(to);
                }
            }
        }
    }

    /// Event-message delay under the current weather.
    fn link_delay(&mut self) -> Duration {
        let max = self.weather.max_delay.as_micros() as u64;
        Duration::from_micros(self.rng.u64(1..=max.max(1)))
    }

    /// Moves what node `i`'s inbox has ready into its log.
    fn take_ready(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        while let Some(event) = node.inbox.poll_ready() {
            node.peers.busy(self.now);
            node.log.entry(event.source).or_default().push(event.seq);
            let stream = StreamId::of(&event);
            node.held
                .entry(stream)
                .or_default()
                .insert(event.seq, event);
        }
        assert!(
            node.inbox.poll_lost().is_none(),
            "seed {}: nothing is ever lost here",
            self.seed
        );
    }

    /// Sends the fetches node `i`'s inbox wants now, through the weather.
    fn fetches(&mut self, i: usize) {
        let connected: Vec<PeerId> = self
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|p| self.nodes[i].peers.is_connected(p))
            .collect();
        let wanted = self.nodes[i]
            .inbox
            .poll_fetch(self.now, |p| connected.contains(p));
        for fetch in wanted {
            let to = self.index_of(&fetch.peer);
            if self.rng.f64() < self.weather.loss {
                continue; // lost: asked again after the timeout
            }
            let delay = self.link_delay();
            self.send(delay, Msg::Fetch { from: i, to, fetch });
        }
    }

    /// Every node asks the members its anti-entropy round picks for their marks.
    fn anti_entropy(&mut self) {
        for asker in 0..self.nodes.len() {
            let node = &mut self.nodes[asker];
            if node.inbox.is_behind() {
                node.peers.busy(self.now);
            }
            for peer in self.nodes[asker].peers.marks_round(self.now) {
                let asked = self.index_of(&peer);
                self.ask_marks(asker, asked);
            }
        }
    }

    /// Node `asker` asks node `asked` for its marks, as the swarm task does: the request
    /// carries how far the asker has published, and the answer every mark of the asked
    /// (here it answers at once).
    fn ask_marks(&mut self, asker: usize, asked: usize) {
        let me = self.nodes[asker].id;
        let own: Vec<(StreamId, u64)> = self.nodes[asker]
            .inbox
            .marks()
            .filter(|(stream, high)| stream.source == me && *high > 0)
            .collect();
        if !own.is_empty() {
            let delay = self.control_delay();
            self.send(
                delay,
                Msg::Marks {
                    from: asker,
                    to: asked,
                    marks: own,
                },
            );
        }
        self.send_marks(asked, asker);
    }

    /// Node `from`'s marks, as they are now, travel to node `to`.
    fn send_marks(&mut self, from: usize, to: usize) {
        let marks: Vec<(StreamId, u64)> = self.nodes[from].inbox.marks().collect();
        let delay = self.control_delay();
        self.send(delay, Msg::Marks { from, to, marks });
    }

    /// Every connection whose two ends can reach each other answers its pings.
    fn pings(&mut self) {
        let live: Vec<(ConnectionId, usize, usize)> = self
            .conns
            .iter()
            .filter(|(_, (a, b, _))| self.linked(*a, *b))
            .map(|(id, (a, b, _))| (*id, *a, *b))
            .collect();
        for (id, a, b) in live {
            if self.rng.f64() < self.weather.ping_loss {
                continue;
            }
            let peer = self.nodes[b].id;
            let rtt = self.control_delay() * 2;
            self.nodes[a].peers.ping_answered(peer, id, rtt, self.now);
        }
    }

    /// Runs virtual time forward by `span`.
    fn run(&mut self, span: Duration) {
        let until = self.now + span;
        loop {
            let timers = self.nodes.iter().map(|n| n.peers.poll_timeout()).min();
            let fetches = self
                .nodes
                .iter()
                .filter_map(|n| n.inbox.poll_timeout())
                .min();
            let next_msg = self.queue.peek().map(|Reverse((at, _))| *at);
            let next = [
                timers,
                fetches,
                next_msg,
                Some(self.next_ping),
                Some(self.next_marks),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            if next_msg == Some(next) {
                let Reverse((_, id)) = self.queue.pop().unwrap();
                let msg = self.msgs.remove(&id).unwrap();
                self.deliver(msg);
            } else if self.next_ping == next {
                self.next_ping = next + PING_INTERVAL;
                self.pings();
            } else if self.next_marks == next {
                self.next_marks = next + ANTI_ENTROPY;
                self.anti_entropy();
            } else if fetches == Some(next) {
                for i in 0..self.nodes.len() {
                    if self.nodes[i]
                        .inbox
                        .poll_timeout()
                        .is_some_and(|t| t <= self.now)
                    {
                        self.fetches(i);
                    }
                }
            } else {
                for i in 0..self.nodes.len() {
                    if self.nodes[i].peers.poll_timeout() <= self.now {
                        self.nodes[i].peers.handle_timeout(self.now);
                        self.carry_out(i);
                    }
                }
            }
        }
    }

    /// Node `i` publishes `n` events, packed as its publisher decides, to every peer it is
    /// connected to, through the weather.
    fn publish(&mut self, i: usize, n: usize) {
        let mut queue: VecDeque<Unstamped> = (0..n)
            .map(|k| Unstamped {
                topic: Topic::user(format!("sim.h{i}")).unwrap(),
                event_type: "sim".into(),
                // 2 KB each, so a round of events spans several messages.
                payload: Payload::text(format!("{k:>2000}")),
            })
            .collect();
        let targets: Vec<usize> = (0..self.nodes.len())
            .filter(|j| *j != i && self.nodes[i].peers.is_connected(&self.nodes[*j].id))
            .collect();
        loop {
            let message = self.nodes[i]
                .publisher
                .next_message(&mut queue, SystemTime::now());
            if message.is_empty() {
                return;
            }
            // Stored first, as a node does: then it may be gossiped.
            let node = &mut self.nodes[i];
            for event in &message {
                let stream = StreamId::of(event);
                node.held
                    .entry(stream)
                    .or_default()
                    .insert(event.seq, (**event).clone());
                node.inbox.published(stream, event.seq, self.now);
            }
            node.peers.busy(self.now);
            if self.rng.f64() < self.weather.refused {
                continue;
            }
            self.nodes[i].sent.extend(message.iter().map(|e| e.seq));
            let payload = wire::encode_batch(message.iter().map(|e| e.as_ref()));
            for &to in &targets {
                let w = self.weather;
                if self.rng.f64() < w.loss {
                    continue;
                }
                let copies = if self.rng.f64() < w.duplicate { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = self.link_delay();
                    let payload = payload.clone();
                    self.send(
                        delay,
                        Msg::Events {
                            from: i,
                            to,
                            payload,
                        },
                    );
                }
            }
        }
    }

    /// Asserts every node has every other as a member, with `why` and the seed on failure.
    fn assert_full_mesh(&self, why: &str) {
        let n = self.nodes.len();
        for (i, node) in self.nodes.iter().enumerate() {
            assert_eq!(
                node.peers.members(),
                n - 1,
                "seed {}: h{i} after {why} at {:?}: {:?}",
                self.seed,
                self.elapsed(),
                node.peers.list()
            );
        }
    }

    /// Every node's log holds every other node's events exactly once, in order.
    fn assert_full_logs(&self, why: &str) {
        for (j, node) in self.nodes.iter().enumerate() {
            for (i, source) in self.nodes.iter().enumerate().filter(|(i, _)| *i != j) {
                let got = node.log.get(&source.id).cloned().unwrap_or_default();
                let want: Vec<u64> = (1..=source.publisher.seq()).collect();
                assert!(
                    got == want,
                    "seed {}: h{j}'s log of h{i} after {why}: {} of {} events, first wrong at {:?}",
                    self.seed,
                    got.len(),
                    want.len(),
                    got.iter().zip(&want).position(|(a, b)| a != b)
                );
            }
        }
    }

    /// Per observer and peer, membership alternates joined, left, joined, …
    fn assert_membership_alternates(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            let mut last: HashMap<PeerId, bool> = HashMap::new();
            for (at, m) in &node.membership {
                let (peer, joined) = match m {
                    Membership::Joined { peer, .. } => (*peer, true),
                    Membership::Left { peer } | Membership::Failed { peer } => (*peer, false),
                };
                let was = last.insert(peer, joined).unwrap_or(false);
                assert_ne!(
                    was, joined,
                    "seed {}: h{i} at {at:?}: {m:?} twice in a row",
                    self.seed
                );
            }
        }
    }
}

#[path = "sim_scenarios.rs"]
mod scenarios;
