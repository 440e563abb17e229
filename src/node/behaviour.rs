//! The libp2p side: which protocols a peer speaks and how they are tuned.

use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, connection_limits, gossipsub, identify, mdns, noise, ping, request_response,
    tcp, yamux, PeerId, Swarm, SwarmBuilder,
};

use crate::config::MAX_MESSAGE_SIZE;
use crate::proto::peers::{PING_INTERVAL, PROTOCOL_VERSION};

use super::private::Guard;
use super::{answer, repair, NodeError};

/// Time a connection gets from its first byte to a working, authenticated, multiplexed
/// link (mesh key, noise, yamux). A silent or half-open connection holds a socket no
/// longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections still in their handshake, each way; more are closed at once, so a flood of
/// silent connections holds at most this many sockets.
pub const MAX_PENDING: u32 = 64;

/// Established connections in all: room for a mesh of this many peers and then some.
pub const MAX_CONNECTIONS: u32 = 512;

/// Established connections to one peer (two peers dialling each other at once make two).
pub const MAX_PER_PEER: u32 = 2;

/// A single ping unanswered this long counts as failed (the core's
/// [`crate::proto::peers::DEAD_AFTER`] closes a silent connection sooner than libp2p would).
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// mDNS record lifetime we announce; a peer that stops answering is forgotten after it.
pub const MDNS_TTL: Duration = Duration::from_secs(60);

/// How often mDNS asks the LAN who is there (besides at start and on new interfaces).
pub const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(15);

/// Connections are kept while both ends are up: the mesh is small and every peer wants
/// every other one, so idleness is no reason to hang up.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// gossipsub's D: how many peers each peer forwards every message to. A publisher sends its
/// own messages straight to every peer (flood publish), and on a LAN every peer is connected
/// to every other, so forwarding mostly repairs what a direct send missed; yet each forwarded
/// copy costs its receiver a full signature check (gossipsub verifies before it looks for
/// duplicates). Two keeps a mesh that is still connected when links fail, at a fraction of
/// the default's (6) cost.
const MESH_N: usize = 2;
/// Below this many mesh peers the heartbeat grafts more.
const MESH_N_LOW: usize = 1;
/// Above this many it prunes.
const MESH_N_HIGH: usize = 4;

/// Largest control part of one gossipsub RPC a peer accepts (IHAVE, IWANT, IDONTWANT, GRAFT,
/// PRUNE and subscriptions together). A stream that sends more is dropped as invalid, and after
/// five such drops gossipsub gives up on the connection for good, without a word.
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Bound on one gossipsub message id on the wire: the author's base58 peer id (at most 52
/// bytes for ed25519 keys) and a decimal u64 sequence number (at most 20), plus protobuf
/// framing.
const MESSAGE_ID_BYTES: usize = 80;

/// Most message ids a peer puts in one IHAVE (and asks for in IWANTs per heartbeat), so that
/// what one peer may send fits what the other accepts, [`MAX_CONTROL_BYTES`], with room for
/// the rest of the RPC. gossipsub's default (5,000) with its default 16 KiB limit let a busy
/// peer's IHAVE (400-odd ids) kill healthy links.
const MAX_IHAVE_IDS: usize = (MAX_CONTROL_BYTES - 4 * 1024) / MESSAGE_ID_BYTES;

/// gossipsub heartbeat: how often the mesh is repaired and gossip is sent.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// A neighbour whose gossipsub score falls below this is disconnected and banned: gossipsub
/// itself stops listening to it at the same point (its graylist threshold). Three invalid
/// messages in a row score -90, still below this after the first second's decay (-73), when
/// the swarm task looks next; two score -40 and fade.
pub const BAN_SCORE: f64 = -60.0;

/// Weight of one invalid message (bad signature, undecodable, forbidden by the ACL) in a
/// neighbour's score; the penalty grows with the square of the count, so the third invalid
/// message within a few seconds crosses [`BAN_SCORE`].
const INVALID_MESSAGE_WEIGHT: f64 = -10.0;

/// Share of a neighbour's invalid-message count kept each second: the count of an honest
/// peer that once sent something odd fades within a minute.
const INVALID_MESSAGE_DECAY: f64 = 0.9;

/// gossipsub peer scoring that counts only what is plainly hostile: invalid messages. The
/// other components (time in mesh, delivery rates, IP colocation) would punish honest peers
/// on a LAN where many share one host, or that are merely slow.
fn peer_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: INVALID_MESSAGE_DECAY,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        behaviour_penalty_weight: 0.0,
        slow_peer_weight: 0.0,
        ..Default::default()
    };
    params.topics.insert(
        gossipsub::IdentTopic::new(crate::proto::MESH_TOPIC).hash(),
        topic,
    );
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -30.0,
        graylist_threshold: BAN_SCORE,
        ..Default::default()
    };
    (params, thresholds)
}

/// The protocols every meshbus peer runs.
/// How long a repair request may take before it counts as failed and is asked elsewhere.
pub const REPAIR_TIMEOUT: Duration = crate::proto::inbox::ASK_TIMEOUT;

/// Repair streams open at once per connection, each way.
const REPAIR_STREAMS: usize = 16;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Bounds on connections: pending, established, per peer.
    pub limits: connection_limits::Behaviour,
    /// Peers disconnected for misbehaving, refused until their ban ends.
    pub banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Event broadcast.
    pub gossipsub: gossipsub::Behaviour,
    /// LAN discovery; off with `--no-mdns`.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Who is on the other end (and whether it speaks meshbus).
    pub identify: identify::Behaviour,
    /// Liveness and round-trip times.
    pub ping: ping::Behaviour,
    /// Marks, fetches, goodbyes and group announcements ([`repair`]).
    pub repair: request_response::Behaviour<repair::Codec>,
    /// Answers to queries, straight to the asker ([`answer`]).
    pub answer: answer::Behaviour,
}

/// TCP, guarded by the mesh key unless the mesh is open, then noise and yamux.
fn transport(
    keypair: &Keypair,
    guard: Option<Guard>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NodeError> {
    let noise = noise::Config::new(keypair).map_err(|e| NodeError::Setup {
        what: "noise",
        source: e.into(),
    })?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let transport = match guard {
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        Some(guard) => tcp
            .and_then(
                move |socket, point: ConnectedPoint| -> BoxFuture<'static, _> {
                    let guard = guard.clone();
                    match point {
                        ConnectedPoint::Dialer { .. } => guard.dial(socket).boxed(),
                        ConnectedPoint::Listener { send_back_addr, .. } => {
                            guard.accept(socket, send_back_addr).boxed()
                        }
                    }
                },
            )
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
    };
    Ok(transport)
}

/// Builds the swarm: TCP (guarded by the mesh keys when `guard` is given, then noise and
/// yamux), strictly signed gossipsub.
pub fn build_swarm(
    keypair: Keypair,
    mdns_on: bool,
    agent: String,
    guard: Option<Guard>,
) -> Result<Swarm<Behaviour>, NodeError> {
    let setup = |what: &'static str| {
        move |e: Box<dyn std::error::Error + Send + Sync>| NodeError::Setup { what, source: e }
    };
    let transport = transport(&keypair, guard)?;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| setup("tcp")(e.into()))?
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(MAX_MESSAGE_SIZE)
                .heartbeat_interval(HEARTBEAT)
                // Tell mesh peers at once not to echo our own messages back: on a LAN every
                // peer hears the publisher directly, and each echo costs a signature check.
                .idontwant_on_publish(true)
                .mesh_n(MESH_N)
                .mesh_n_low(MESH_N_LOW)
                .mesh_n_high(MESH_N_HIGH)
                .mesh_outbound_min(1)
                .max_control_message_size(MAX_CONTROL_BYTES)
                .max_control_messages_sent(MAX_IHAVE_IDS)
                // meshbus looks at every message (decodes it, checks the ACL and the
                // sender's rate) before gossipsub may forward it.
                .validate_messages()
                .build()?;
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let (params, thresholds) = peer_scoring();
            gossipsub.with_peer_score(params, thresholds)?;
            let mdns = if mdns_on {
                let config = mdns::Config {
                    ttl: MDNS_TTL,
                    query_interval: MDNS_QUERY_INTERVAL,
                    ..Default::default()
                };
                Some(mdns::tokio::Behaviour::new(
                    config,
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            let identify = identify::Behaviour::new(
                identify::Config::new(PROTOCOL_VERSION.to_owned(), key.public())
                    .with_agent_version(agent),
            );
            let ping = ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(PING_INTERVAL)
                    .with_timeout(PING_TIMEOUT),
            );
            let repair = request_response::Behaviour::with_codec(
                repair::Codec,
                [(repair::PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(REPAIR_TIMEOUT)
                    .with_max_concurrent_streams(REPAIR_STREAMS),
            );
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(MAX_PENDING))
                .with_max_pending_outgoing(Some(MAX_PENDING))
                .with_max_established(Some(MAX_CONNECTIONS))
                .with_max_established_per_peer(Some(MAX_PER_PEER));
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                banned: allow_block_list::Behaviour::default(),
                gossipsub,
                mdns: mdns.into(),
                identify,
                ping,
                repair,
                answer: answer::behaviour(REPAIR_TIMEOUT),
            })
        })
        .map_err(|e| setup("protocols")(e.into()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}
