//! Peers: who we are connected to, whether they are alive, whom to dial, and the membership
//! events (`_mesh.peer.joined`, `_mesh.peer.left`) that follow.
//!
//! A member is a peer connected and identified as a meshbus peer, or one heard over the mesh
//! ([`super::roster`]): membership travels, so a peer reached only through others is a
//! member too. Each peer announces its presence: rarely while it is connected to every member
//! it knows, every second while it is not.
//!
//! [`Peers`] is fed what the network said (a connection opened or closed, identify, a ping,
//! an mDNS record) with the time it happened, and answers with [`PeerAction`]s for the swarm
//! task to carry out. Timers are one deadline: [`Peers::poll_timeout`] says when to call
//! [`Peers::handle_timeout`] next.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Identify protocol version: peers that announce anything else are not meshbus peers (or
/// peers of a build this one cannot mix with) and are disconnected. 2 since presence (a
/// batch without events, which a version-1 peer rejects as malformed) replaced the groups
/// request.
pub const PROTOCOL_VERSION: &str = "/meshbus/2";

/// How often a connection is pinged, and how often silent connections are looked for.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// A connection with no answered ping for this long is closed. A peer that was killed (its
/// TCP connections reset at once, QUIC ones fall silent) or unplugged leaves `peers` within
/// this plus [`PING_INTERVAL`]: about 5 s.
pub const DEAD_AFTER: Duration = Duration::from_secs(4);

/// How often known but disconnected peers (from mDNS or `--peer`) are dialled again.
pub const REDIAL_INTERVAL: Duration = Duration::from_secs(2);

/// Most `--peer` (or dialled) addresses kept and redialled.
pub const MAX_EXPLICIT_PEERS: usize = 256;

/// Most members asked for their marks in one anti-entropy round ([`Peers::marks_round`]).
/// Each answer lists every publisher the member follows, so asking every member every round
/// costs the mesh n² requests and n³ marks a round: at 50 idle peers that alone kept both
/// cores of the lab machine busy. Any member that holds an event can tell of it, and a
/// member that (re)joins is asked at once, so a few a round, in turn, find what a full
/// round would, within ⌈members / MARKS_PER_ROUND⌉ rounds while membership holds. Each
/// peer's turn starts after its own id, so peers started together ask different members.
pub const MARKS_PER_ROUND: usize = 4;

/// A peer where no event reached the log, none was published, no member came or went and no
/// gap waited to be filled for this long is quiet: anti-entropy then asks a round only every
/// [`QUIET_MARKS_EVERY`]. Every request opens a stream on its connection, and in an idle
/// 5-peer mesh the rounds were most of what a peer sent. What a busy stretch lost is found in
/// the busy rounds that follow it (a member that joins is asked at once); a quiet round still
/// finds anything left.
pub const QUIET_AFTER: Duration = Duration::from_secs(10);

/// How often a quiet peer asks a round of members for their marks.
pub const QUIET_MARKS_EVERY: Duration = Duration::from_secs(10);

use super::discovery::{Discovery, Found};
pub use super::discovery::{MAX_ADDRS_PER_PEER, MAX_DIALS_PER_ROUND, MAX_KNOWN_PEERS};
use super::roster::{self, Heard, Presence, Refused, Roster};

/// What the swarm task must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Dial a peer known by id at these addresses (unless connected or dialling already).
    Dial {
        /// The peer.
        peer: PeerId,
        /// Where it said it is.
        addrs: Vec<Multiaddr>,
    },
    /// Dial an address whose peer we may not know; report back with
    /// [`Peers::dial_started`] or [`Peers::dial_refused`].
    DialAddress(Multiaddr),
    /// Close one connection.
    Close(ConnectionId),
    /// Close every connection to a peer.
    Disconnect(PeerId),
    /// Tell the local handler table.
    Membership(Membership),
    /// Announce this peer's presence on the mesh (with its handler groups).
    Announce(Presence),
    /// A member is connected and identified now (it may have been heard over the mesh
    /// before): ask it what it holds, over that connection. (It hears our groups with our
    /// presence: see [`Peers::mesh_subscribed`].)
    Reached(PeerId),
}

/// A change in who is in the mesh, seen from this peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// A meshbus peer is connected and identified.
    Joined {
        /// The peer.
        peer: PeerId,
        /// The name it was started with, if any.
        name: Option<String>,
    },
    /// It said goodbye (a clean shutdown), and its last connection closed (or, heard only
    /// over the mesh, its goodbye came that way).
    Left {
        /// The peer.
        peer: PeerId,
    },
    /// Its last connection closed without a goodbye: it crashed, was killed or cut off
    /// (found by a reset connection at once, or by [`DEAD_AFTER`] of silence); or, heard
    /// only over the mesh, it fell silent (see [`super::roster`]).
    Failed {
        /// The peer.
        peer: PeerId,
    },
}

impl Membership {
    /// The reserved topic of its local event.
    pub fn topic(&self) -> &'static str {
        match self {
            Membership::Joined { .. } => "_mesh.peer.joined",
            Membership::Left { .. } => "_mesh.peer.left",
            Membership::Failed { .. } => "_mesh.peer.failed",
        }
    }

    /// Its local event's JSON data: the peer, and its name when it joins.
    pub fn data(&self) -> serde_json::Value {
        match self {
            Membership::Joined { peer, name } => {
                serde_json::json!({ "peer": peer.to_string(), "name": name })
            }
            Membership::Left { peer } | Membership::Failed { peer } => {
                serde_json::json!({ "peer": peer.to_string() })
            }
        }
    }
}

/// A refused [`Peers::add_explicit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this node already keeps {MAX_EXPLICIT_PEERS} peer addresses")]
pub struct TooManyPeers;

/// A connected meshbus peer, as `peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: String,
    /// The name it was started with, if any.
    pub name: Option<String>,
    /// Its agent string (`meshbus/VERSION`).
    pub agent: String,
    /// Addresses we are connected to it on; none for a member heard only over the mesh.
    pub connected_addrs: Vec<String>,
    /// Addresses it says it listens on.
    pub listen_addrs: Vec<String>,
    /// Last ping round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// The IP address in `addr`, if it has one.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The subnet an address is in, as a LAN is usually cut: its IPv4 /24 or IPv6 /64. A wider
/// LAN only makes [`Peers::forwards`] forward more than it must.
fn subnet(addr: &Multiaddr) -> Option<(bool, u64)> {
    Some(match ip_of(addr)? {
        IpAddr::V4(ip) => (false, u64::from(u32::from(ip) >> 8)),
        IpAddr::V6(ip) => (true, (u128::from(ip) >> 64) as u64),
    })
}

/// A connected peer.
#[derive(Debug, Default)]
struct Peer {
    connections: BTreeMap<ConnectionId, Connection>,
    /// Set once identify says it speaks meshbus; a peer is a member from then on.
    identity: Option<Identity>,
    rtt: Option<Duration>,
    /// It said goodbye: when its connections close, it left rather than failed.
    leaving: bool,
}

/// One connection to a peer.
#[derive(Debug)]
struct Connection {
    addr: Multiaddr,
    /// The subnet `addr` is in ([`subnet`]), read once: [`Peers::forwards`] looks at it for
    /// every message.
    subnet: Option<(bool, u64)>,
    /// Last sign of life: established, or a ping answered. An unplugged peer sends no FIN,
    /// so silence is how its connections are found dead.
    alive_at: Instant,
    /// The other side does not speak ping, so silence proves nothing.
    no_ping: bool,
}

#[derive(Debug)]
struct Identity {
    agent: String,
    name: Option<String>,
    listen_addrs: Vec<Multiaddr>,
}

/// A `--peer` address and what we know of it.
#[derive(Debug)]
struct Explicit {
    addr: Multiaddr,
    /// Learned on the first connection (or from `/p2p/…`), so a redial is skipped while it
    /// is connected.
    peer: Option<PeerId>,
    /// The dial in flight, so redials do not pile up.
    dialing: Option<ConnectionId>,
}

/// The peer table and its rules. Its maps are ordered, so the same inputs give the same
/// actions in the same order (a simulation replays exactly from its seed).
#[derive(Debug)]
pub struct Peers {
    me: PeerId,
    peers: BTreeMap<PeerId, Peer>,
    /// Peers learned by mDNS, for dialling (and redialling when a connection drops).
    known: Discovery,
    /// Dials of discovered peers started in this redial round.
    round_dials: usize,
    /// Discoveries ignored because [`MAX_KNOWN_PEERS`] were known (for throttled logs).
    ignored_discoveries: u64,
    explicit: Vec<Explicit>,
    next_liveness: Instant,
    next_redial: Instant,
    /// The member asked last in the anti-entropy turn ([`Peers::marks_round`]); this peer
    /// before the first turn, so it starts after this peer's id.
    marks_after: PeerId,
    /// When the last anti-entropy round asked anyone.
    marks_at: Option<Instant>,
    /// When events last moved or membership last changed ([`Peers::busy`]).
    busy_at: Option<Instant>,
    /// Members heard over the mesh.
    roster: Roster,
    /// This peer's presence, once [`Peers::announcing`] said what it is.
    presence: Option<Presence>,
    /// When this peer announces itself next, and when it last did.
    next_announce: Instant,
    announced_at: Option<Instant>,
    /// Whether an announcement reached anyone yet.
    heard_once: bool,
    /// This peer has a row in a handler group: its announcements carry the group's
    /// done-marks, so it announces every [`roster::EVERY`] at least.
    in_groups: bool,
    actions: VecDeque<PeerAction>,
}

impl Peers {
    /// An empty table for peer `me`, its timers counted from `now`.
    pub fn new(me: PeerId, now: Instant) -> Self {
        Self {
            me,
            peers: BTreeMap::new(),
            known: Discovery::default(),
            round_dials: 0,
            ignored_discoveries: 0,
            explicit: Vec::new(),
            next_liveness: now + PING_INTERVAL,
            next_redial: now + REDIAL_INTERVAL,
            // Each peer starts its turn after its own id, so peers started together do not
            // all ask the same members in the same round.
            marks_after: me,
            marks_at: None,
            busy_at: None,
            roster: Roster::default(),
            presence: None,
            next_announce: now,
            announced_at: None,
            heard_once: false,
            in_groups: false,
            actions: VecDeque::new(),
        }
    }

    /// Makes this peer announce its presence, as `agent`, its announcements numbered from
    /// `first_seq` (the clock, so a restarted peer's are larger). Without it (a simulation)
    /// it never does.
    pub fn announcing(&mut self, agent: String, first_seq: u64) {
        self.presence = Some(Presence {
            seq: first_seq,
            agent,
            every: roster::QUIET_EVERY,
            leaving: false,
        });
    }

    /// Announces this peer soon (its groups changed, say): at once, but not closer than
    /// [`roster::MIN_GAP_SENT`] to the last announcement.
    pub fn announce_soon(&mut self, now: Instant) {
        let earliest = self
            .announced_at
            .map_or(now, |at| (at + roster::MIN_GAP_SENT).max(now));
        self.next_announce = self.next_announce.min(earliest);
    }

    /// Whether this peer has a row in a handler group (see [`Peers::announce_soon`]).
    pub fn set_in_groups(&mut self, in_groups: bool) {
        self.in_groups = in_groups;
    }

    /// A peer subscribed to the mesh topic. Until an announcement of ours reached someone,
    /// this is when the next one can: a starting peer says it is here as soon as anyone
    /// listens. A peer in a handler group tells a newcomer its groups at once too.
    pub fn mesh_subscribed(&mut self, now: Instant) {
        if !self.heard_once || self.in_groups {
            self.announce_soon(now);
        }
    }

    /// Our announcement went out to at least one peer.
    pub fn announce_sent(&mut self) {
        self.heard_once = true;
    }

    /// This peer's goodbye for the mesh: its presence, leaving.
    pub fn farewell(&mut self) -> Option<Presence> {
        let presence = self.presence.as_mut()?;
        presence.seq += 1;
        presence.leaving = true;
        Some(presence.clone())
    }

    /// Whether this peer is connected to every member it knows: then it announces only
    /// every [`roster::QUIET_EVERY`].
    fn connected_to_all(&self) -> bool {
        self.roster.ids().all(|p| self.is_connected(p))
    }

    fn announce(&mut self, now: Instant) {
        let every = if self.connected_to_all() && !self.in_groups {
            roster::QUIET_EVERY
        } else {
            roster::EVERY
        };
        let Some(presence) = self.presence.as_mut() else {
            return;
        };
        presence.seq += 1;
        presence.every = every;
        let presence = presence.clone();
        self.announced_at = Some(now);
        self.next_announce = now + every;
        self.actions.push_back(PeerAction::Announce(presence));
    }

    /// A peer's announcement came over the mesh at `now`. What the roster made of it says
    /// whether it is passed on (all but [`Heard::Stale`]) and whether the groups it carries
    /// are taken ([`Heard::New`] and [`Heard::Again`]).
    pub fn heard(
        &mut self,
        peer: PeerId,
        presence: Presence,
        now: Instant,
    ) -> Result<Heard, Refused> {
        if peer == self.me {
            return Ok(Heard::Stale);
        }
        let direct = self.is_direct_member(&peer);
        let name = name_from_agent(&presence.agent);
        let heard = self.roster.heard(peer, presence, now)?;
        match heard {
            Heard::Stale | Heard::Held | Heard::Again => {}
            Heard::New => {
                if !direct {
                    info!(%peer, ?name, "peer joined (heard over the mesh)");
                    self.actions
                        .push_back(PeerAction::Membership(Membership::Joined { peer, name }));
                    self.busy(now);
                }
                if !self.is_connected(&peer) {
                    // A member we are not connected to: from now on we announce often, so
                    // it and everyone like it keep knowing we are alive.
                    self.announce_soon(now);
                }
            }
            Heard::Leaving => match self.peers.get_mut(&peer) {
                Some(p) if p.identity.is_some() => p.leaving = true,
                _ => {
                    info!(%peer, "peer left (heard over the mesh)");
                    self.actions
                        .push_back(PeerAction::Membership(Membership::Left { peer }));
                    self.busy(now);
                }
            },
        }
        Ok(heard)
    }

    /// The next thing for the swarm task to do, oldest first.
    pub fn poll_action(&mut self) -> Option<PeerAction> {
        self.actions.pop_front()
    }

    /// When [`Peers::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Instant {
        let at = self.next_liveness.min(self.next_redial);
        if self.presence.is_some() {
            at.min(self.next_announce)
        } else {
            at
        }
    }

    /// Runs what is due at `now`: closes connections silent for [`DEAD_AFTER`] (libp2p's
    /// ping reports only the second failure in a row and its timeouts stack up, so an
    /// unplugged peer would otherwise linger for tens of seconds), and redials known peers
    /// that are not connected.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_liveness {
            self.next_liveness = now + PING_INTERVAL;
            for (peer, p) in &self.peers {
                for (id, c) in &p.connections {
                    if !c.no_ping && now.saturating_duration_since(c.alive_at) > DEAD_AFTER {
                        debug!(%peer, "no sign of life; closing the connection");
                        self.actions.push_back(PeerAction::Close(*id));
                    }
                }
            }
            for peer in self.roster.expire(now) {
                if !self.is_direct_member(&peer) {
                    warn!(%peer, "peer failed: no longer heard over the mesh");
                    self.actions
                        .push_back(PeerAction::Membership(Membership::Failed { peer }));
                    self.busy(now);
                }
            }
        }
        if self.presence.is_some() && now >= self.next_announce {
            self.announce(now);
        }
        if now >= self.next_redial {
            self.next_redial = now + REDIAL_INTERVAL;
            self.round_dials = 0;
            self.dial_known(now);
            for i in 0..self.explicit.len() {
                self.dial_explicit(i);
            }
        }
    }

    /// Whether any connection to `peer` is open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| !p.connections.is_empty())
    }

    /// The name a connected member was started with, if any.
    pub fn name_of(&self, peer: &PeerId) -> Option<String> {
        match self.peers.get(peer).and_then(|p| p.identity.as_ref()) {
            Some(i) => i.name.clone(),
            None => name_from_agent(&self.roster.presence(peer)?.agent),
        }
    }

    /// Whether `peer` is a member: connected and identified as a meshbus peer, or heard
    /// over the mesh.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.is_direct_member(peer) || self.roster.contains(peer)
    }

    /// Whether `peer` is connected and identified as a meshbus peer.
    pub fn is_direct_member(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.identity.is_some())
    }

    /// Whether a gossip message that came from `via`, published by `publisher`, should go on
    /// from here (gossipsub forwards it to its mesh): not when it came straight from its
    /// publisher, and the publisher and every member were found by mDNS and are connected
    /// from one subnet (see [`subnet`]). Every peer of an mDNS LAN connects to every other it
    /// discovers, so each heard the publisher as directly, and a forwarded copy would only be
    /// checked in full (signature first) before gossipsub finds it a duplicate. What came
    /// over a hop or from a publisher met by `--peer` goes on, and so does everything at a
    /// peer with a member it is not connected to, or with a member beyond that subnet: a
    /// bridge, or a host with containers on a second network (mDNS finds peers on every
    /// interface).
    pub fn forwards(&self, publisher: &PeerId, via: &PeerId) -> bool {
        if publisher != via || !self.known.contains(publisher) || !self.connected_to_all() {
            return true;
        }
        let lan = self
            .peers
            .get(publisher)
            .and_then(|p| p.connections.values().next())
            .and_then(|c| c.subnet);
        let Some(lan) = lan else {
            return true;
        };
        self.peers
            .iter()
            .filter(|(_, p)| p.identity.is_some())
            .any(|(id, p)| {
                !self.known.contains(id) || p.connections.values().any(|c| c.subnet != Some(lan))
            })
    }

    /// The members: connected and identified, or heard over the mesh.
    pub fn members(&self) -> usize {
        let direct = self.peers.values().filter(|p| p.identity.is_some()).count();
        direct
            + self
                .roster
                .ids()
                .filter(|p| !self.is_direct_member(p))
                .count()
    }

    /// The members' ids, sorted.
    pub fn member_ids(&self) -> Vec<PeerId> {
        let mut ids = self.direct_member_ids();
        ids.extend(self.roster.ids().filter(|p| !self.is_direct_member(p)));
        ids.sort();
        ids
    }

    /// The members connected and identified, sorted: those a request can go to.
    pub fn direct_member_ids(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.identity.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Events reached the log, this peer published, a member came or went, or a gap waits to
    /// be filled, at `now`: anti-entropy goes at full pace for [`QUIET_AFTER`].
    pub fn busy(&mut self, now: Instant) {
        self.busy_at = Some(now);
    }

    /// The members to ask for their marks in the anti-entropy round due at `now`: every
    /// member when there are at most [`MARKS_PER_ROUND`], else the next [`MARKS_PER_ROUND`]
    /// in peer id order after the one asked last, wrapping around, so each is asked in turn.
    /// A quiet peer ([`QUIET_AFTER`]) asks nobody until [`QUIET_MARKS_EVERY`] has passed
    /// since its last round.
    pub fn marks_round(&mut self, now: Instant) -> Vec<PeerId> {
        let quiet = self
            .busy_at
            .is_none_or(|at| now.saturating_duration_since(at) >= QUIET_AFTER);
        let recent = self
            .marks_at
            .is_some_and(|at| now.saturating_duration_since(at) < QUIET_MARKS_EVERY);
        if quiet && recent {
            return Vec::new();
        }
        self.marks_at = Some(now);
        // Marks are asked over a connection; what a member further away holds reaches the
        // ones in between.
        let members = self.direct_member_ids();
        if members.len() <= MARKS_PER_ROUND {
            return members;
        }
        let start = members.partition_point(|p| *p <= self.marks_after);
        let picked: Vec<PeerId> = (0..MARKS_PER_ROUND)
            .map(|k| members[(start + k) % members.len()])
            .collect();
        if let Some(last) = picked.last() {
            self.marks_after = *last;
        }
        picked
    }

    /// `peer` said goodbye: it is shutting down cleanly.
    pub fn goodbye(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.leaving = true;
        }
    }

    /// The members, sorted by peer id.
    pub fn list(&self) -> Vec<PeerInfo> {
        let mut list: Vec<PeerInfo> = self
            .peers
            .iter()
            .filter_map(|(id, peer)| {
                let identity = peer.identity.as_ref()?;
                Some(PeerInfo {
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
            })
            .collect();
        for (id, presence) in self.roster.members() {
            if !self.is_direct_member(id) {
                list.push(PeerInfo {
                    peer_id: id.to_string(),
                    name: name_from_agent(&presence.agent),
                    agent: presence.agent.clone(),
                    connected_addrs: Vec::new(),
                    listen_addrs: Vec::new(),
                    rtt_ms: None,
                });
            }
        }
        list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        list
    }

    /// A connection opened (either way). A dial of a `--peer` address learns its peer.
    pub fn connected(&mut self, peer: PeerId, id: ConnectionId, addr: Multiaddr, now: Instant) {
        debug!(%peer, %addr, "connected");
        for explicit in &mut self.explicit {
            if explicit.dialing == Some(id) {
                explicit.dialing = None;
                explicit.peer = Some(peer);
            }
        }
        let connection = Connection {
            subnet: subnet(&addr),
            addr,
            alive_at: now,
            no_ping: false,
        };
        let entry = self.peers.entry(peer).or_default();
        entry.connections.insert(id, connection);
        self.known.reached(&peer, now);
    }

    /// A connection closed at `now`. When it was the last of an identified peer, a member
    /// has left or failed, whatever was heard of it over the mesh: what is still on its way
    /// from a peer that failed is not taken for a while ([`roster::QUARANTINE`]).
    pub fn closed(&mut self, peer: PeerId, id: ConnectionId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.connections.remove(&id);
        if !p.connections.is_empty() {
            return;
        }
        if let Some(p) = self.peers.remove(&peer) {
            if p.identity.is_some() {
                self.roster.forget(&peer, !p.leaving, now);
                if !p.leaving {
                    // Alive and reachable through others, it hears us after its quarantine
                    // of us ends, and we of it: say so then, not only at the next round.
                    self.next_announce = self.next_announce.min(now + roster::QUARANTINE);
                }
                let change = if p.leaving {
                    info!(%peer, "peer left");
                    Membership::Left { peer }
                } else {
                    warn!(%peer, "peer failed: lost without a goodbye");
                    Membership::Failed { peer }
                };
                self.actions.push_back(PeerAction::Membership(change));
            }
        }
    }

    /// Identify told us who is on the other end. Anything but a meshbus peer is
    /// disconnected and forgotten; a meshbus peer's first identify makes it a member.
    pub fn identified(
        &mut self,
        peer: PeerId,
        protocol_version: &str,
        agent: String,
        mut listen_addrs: Vec<Multiaddr>,
    ) {
        if protocol_version != PROTOCOL_VERSION {
            info!(%peer, protocol = %protocol_version, "not a meshbus peer; disconnecting");
            self.known.forget(&peer);
            self.actions.push_back(PeerAction::Disconnect(peer));
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let joined = p.identity.is_none();
        let name = name_from_agent(&agent);
        listen_addrs.truncate(MAX_ADDRS_PER_PEER);
        p.identity = Some(Identity {
            agent,
            name: name.clone(),
            listen_addrs,
        });
        if joined && self.roster.contains(&peer) {
            debug!(%peer, ?name, "connected to a member heard over the mesh");
            self.actions.push_back(PeerAction::Reached(peer));
        } else if joined {
            info!(%peer, ?name, "peer joined");
            self.actions
                .push_back(PeerAction::Membership(Membership::Joined { peer, name }));
            self.actions.push_back(PeerAction::Reached(peer));
        }
    }

    /// A ping on connection `id` came back after `rtt`.
    pub fn ping_answered(&mut self, peer: PeerId, id: ConnectionId, rtt: Duration, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.rtt = Some(rtt);
            if let Some(c) = p.connections.get_mut(&id) {
                c.alive_at = now;
            }
        }
    }

    /// The other side does not speak ping: odd but not dead, so liveness on this connection
    /// rests on TCP or QUIC alone.
    pub fn ping_unsupported(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(c) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.connections.get_mut(&id))
        {
            c.no_ping = true;
        }
    }

    /// libp2p gave up pinging connection `id`: it is closed.
    pub fn ping_failed(&mut self, peer: PeerId, id: ConnectionId, error: &str) {
        debug!(%peer, %error, "ping failed; closing the connection");
        self.actions.push_back(PeerAction::Close(id));
    }

    /// mDNS found peers at these addresses: remember them (within the bounds of
    /// [`super::discovery`]) and dial those not connected, within this round's budget.
    pub fn discovered(
        &mut self,
        found: impl IntoIterator<Item = (PeerId, Multiaddr)>,
        now: Instant,
    ) {
        let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for (peer, addr) in found {
            if peer != self.me {
                by_peer.entry(peer).or_default().push(addr);
            }
        }
        for (peer, addrs) in by_peer {
            debug!(%peer, ?addrs, "discovered by mDNS");
            if self.known.found(peer, addrs, now) == Found::Full {
                self.ignored_discoveries += 1;
                if self.ignored_discoveries.is_power_of_two() {
                    warn!(%peer, limit = MAX_KNOWN_PEERS, ignored_so_far = self.ignored_discoveries,
                        "too many peers discovered by mDNS; ignoring this one");
                }
            }
        }
        self.dial_known(now);
    }

    /// mDNS records expired: those addresses are no longer redialled.
    pub fn expired(&mut self, gone: impl IntoIterator<Item = (PeerId, Multiaddr)>) {
        for (peer, addr) in gone {
            self.known.expired(&peer, &addr);
        }
    }

    /// A dial of a discovered `peer` failed: it is tried again later and later.
    pub fn peer_dial_failed(&mut self, peer: PeerId, now: Instant) {
        self.known.failed(&peer, now, REDIAL_INTERVAL);
    }

    /// Remembers an address to dial now and redial whenever its peer is not connected.
    /// Returns the address if it is to be dialled now (see [`PeerAction::DialAddress`]).
    pub fn add_explicit(&mut self, addr: Multiaddr) -> Result<Option<Multiaddr>, TooManyPeers> {
        let index = match self.explicit.iter().position(|e| e.addr == addr) {
            Some(i) => i,
            None => {
                if self.explicit.len() >= MAX_EXPLICIT_PEERS {
                    return Err(TooManyPeers);
                }
                let peer = addr.iter().find_map(|p| match p {
                    Protocol::P2p(peer) => Some(peer),
                    _ => None,
                });
                self.explicit.push(Explicit {
                    addr,
                    peer,
                    dialing: None,
                });
                self.explicit.len() - 1
            }
        };
        Ok(self
            .should_dial_explicit(index)
            .then(|| self.explicit[index].addr.clone()))
    }

    /// A dial of `addr` asked for by [`PeerAction::DialAddress`] is under way as `id`.
    pub fn dial_started(&mut self, addr: &Multiaddr, id: ConnectionId) {
        if let Some(e) = self.explicit.iter_mut().find(|e| &e.addr == addr) {
            e.dialing = Some(id);
        }
    }

    /// A dial of `addr` could not even start; it is tried again at the next redial.
    pub fn dial_refused(&mut self, addr: &Multiaddr, error: &str) {
        debug!(%addr, %error, "dial not started");
    }

    /// An outgoing connection attempt failed.
    pub fn dial_failed(&mut self, id: ConnectionId, error: &str) {
        for explicit in &mut self.explicit {
            if explicit.dialing == Some(id) {
                explicit.dialing = None;
                warn!(addr = %explicit.addr, %error, "cannot reach peer; will retry");
            }
        }
    }

    /// Dials the discovered peers that are due, within this round's budget.
    fn dial_known(&mut self, now: Instant) {
        let budget = MAX_DIALS_PER_ROUND.saturating_sub(self.round_dials);
        let peers = &self.peers;
        let due = self.known.due(now, REDIAL_INTERVAL, budget, |p| {
            peers.get(p).is_some_and(|p| !p.connections.is_empty())
        });
        self.round_dials += due.len();
        for (peer, addrs) in due {
            self.actions.push_back(PeerAction::Dial { peer, addrs });
        }
    }

    fn should_dial_explicit(&self, index: usize) -> bool {
        let e = &self.explicit[index];
        e.dialing.is_none() && !e.peer.is_some_and(|p| self.is_connected(&p))
    }

    fn dial_explicit(&mut self, index: usize) {
        if self.should_dial_explicit(index) {
            let addr = self.explicit[index].addr.clone();
            self.actions.push_back(PeerAction::DialAddress(addr));
        }
    }
}

/// The name in an agent string `meshbus/VERSION (NAME)`.
pub fn name_from_agent(agent: &str) -> Option<String> {
    agent
        .split_once(" (")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map(str::to_owned)
}

/// The agent string a peer announces: `meshbus/VERSION`, with ` (NAME)` if it has one.
pub fn agent(name: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match name {
        Some(name) => format!("meshbus/{version} ({name})"),
        None => format!("meshbus/{version}"),
    }
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
