//! A node's settings and their defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::Multiaddr;

/// Where the HTTP control API listens unless told otherwise: loopback only.
pub const DEFAULT_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7420);

/// Environment variable that overrides [`DEFAULT_API`].
pub const API_ENV: &str = "MESHBUS_API";

/// Environment variable naming the data directory (see [`crate::identity`]).
pub const DATA_DIR_ENV: &str = "MESHBUS_DATA_DIR";

/// The port peers listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7421;

/// Default largest event (topic, type, content type and data together), in bytes.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 256 * 1024;

/// Largest gossipsub message, in bytes. An event must fit in one message with its batch
/// framing, so `max_event_size` may be at most this less [`crate::wire::BATCH_OVERHEAD`] and
/// a little for the gossipsub envelope (see [`max_event_size_limit`]).
pub const MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Bytes gossipsub adds around our payload (signature, key, topic, seqno), as a bound.
pub const GOSSIP_ENVELOPE_OVERHEAD: usize = 1024;

/// The largest `max_event_size` a node accepts.
pub const fn max_event_size_limit() -> usize {
    MAX_MESSAGE_SIZE - GOSSIP_ENVELOPE_OVERHEAD - crate::wire::BATCH_OVERHEAD - 64
}

/// Default time an `exec` handler may run before its process group is killed.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Default number of events waiting in front of each handler; past it (or past
/// [`crate::handlers::QUEUE_BYTES`]) the handler stops reading the log until it has
/// room: it lags, it drops nothing. Deep enough to ride out a burst of a few hundred
/// milliseconds at 50,000 events/s.
pub const DEFAULT_HANDLER_QUEUE: usize = 16 * 1024;

/// Default number of events buffered for each `tail` subscriber before it misses some.
pub const DEFAULT_TAIL_BUFFER: usize = 4096;

/// Time handlers get at shutdown to finish queued events before they are cancelled.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything a node needs to start. `Config::default()` is what `meshbus up` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// A human name shown in `peers`, so operators need not read peer ids.
    pub name: Option<String>,
    /// The node's identity; a fresh one when `None`.
    pub keypair: Option<Keypair>,
    /// Addresses to listen on (TCP multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and redial when the connection drops; how peers meet where
    /// multicast does not reach.
    pub peers: Vec<Multiaddr>,
    /// Whether to discover peers by mDNS on the local network.
    pub mdns: bool,
    /// Largest event accepted at publish and from the network; see [`DEFAULT_MAX_EVENT_SIZE`].
    pub max_event_size: usize,
    /// Events waiting in front of each handler; see [`DEFAULT_HANDLER_QUEUE`].
    pub handler_queue: usize,
    /// Time limit of `exec` handlers; see [`DEFAULT_EXEC_TIMEOUT`].
    pub exec_timeout: Duration,
    /// Per-subscriber buffer of `tail`; see [`DEFAULT_TAIL_BUFFER`].
    pub tail_buffer: usize,
    /// Time handlers get to finish at shutdown; see [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// Where the event log lives (`log.redb` inside); in memory when `None`, so nothing
    /// survives a restart.
    pub data_dir: Option<std::path::PathBuf>,
    /// How much of the event log is kept.
    pub retention: crate::store::Retention,
    /// Run the rows of `handlers` again over the events of this last stretch of time in the
    /// log, those they handled before included.
    pub replay: Option<Duration>,
    /// The handler table to start with: its rows are in place before the peer hears of any
    /// event, so they miss none (not even the first `_mesh.peer.joined`).
    pub handlers: Vec<crate::handlers::HandlerSpec>,
    /// Who may connect: by default only peers holding a key of the data directory's keyring.
    pub mesh: Mesh,
    /// Who may publish on which topics (see [`crate::proto::acl`]); open by default.
    pub acl: crate::proto::Acl,
    /// Gossip messages a second one author may send this peer before it is throttled (see
    /// [`crate::proto::limits`]).
    pub max_messages_per_sec: u32,
    /// Gossip bytes a second one author may send this peer before it is throttled.
    pub max_bytes_per_sec: u64,
}

/// Who may connect to a peer (see [`crate::keyring`] and `node::private`).
#[derive(Clone, Debug, Default)]
pub enum Mesh {
    /// Only peers holding a key of the keyring in [`Config::data_dir`] (`mesh.keys`, made
    /// there with a new key at the first start; a running peer follows changes to it).
    #[default]
    DataDir,
    /// Only peers holding one of these keys.
    Keys(crate::keyring::Keyring),
    /// Anyone who reaches the port. Noise still encrypts and authenticates each connection,
    /// and gossipsub still checks every signature; but any device on the network can join,
    /// read everything and publish.
    Open,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: None,
            keypair: None,
            listen: default_listen(),
            peers: Vec::new(),
            mdns: true,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            handler_queue: DEFAULT_HANDLER_QUEUE,
            exec_timeout: DEFAULT_EXEC_TIMEOUT,
            tail_buffer: DEFAULT_TAIL_BUFFER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            data_dir: None,
            retention: crate::store::Retention::default(),
            replay: None,
            handlers: Vec::new(),
            mesh: Mesh::default(),
            acl: crate::proto::Acl::open(),
            max_messages_per_sec: crate::proto::limits::DEFAULT_MESSAGES_PER_SEC,
            max_bytes_per_sec: crate::proto::limits::DEFAULT_BYTES_PER_SEC,
        }
    }
}

/// All IPv4 interfaces on [`DEFAULT_PORT`], over TCP. (No QUIC: its TLS handshake leaves no
/// place for the mesh key, see `node::private`.)
pub fn default_listen() -> Vec<Multiaddr> {
    [format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}")]
        .iter()
        .map(|a| {
            a.parse()
                .expect("default listen addresses are valid multiaddrs")
        })
        .collect()
}

/// A setting out of its allowed range.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_event_size` out of range.
    #[error(
        "max_event_size {0} is out of range: expected 1 to {limit} bytes",
        limit = max_event_size_limit()
    )]
    MaxEventSize(usize),
    /// A queue or buffer of size zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A listen or peer address meshbus cannot use.
    #[error("{what} address {addr} is not a TCP address (like /ip4/10.0.0.2/tcp/7421); meshbus runs on TCP only, where the mesh key guards every connection")]
    NotTcp {
        /// `listen` or `peer`.
        what: &'static str,
        /// The address.
        addr: Multiaddr,
    },
}

/// Whether `addr` is an IP (or DNS) address with a TCP port and nothing but `/p2p` after.
pub(crate) fn is_tcp(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let host = matches!(
        parts.next(),
        Some(
            Protocol::Ip4(_)
                | Protocol::Ip6(_)
                | Protocol::Dns(_)
                | Protocol::Dns4(_)
                | Protocol::Dns6(_)
        )
    );
    let port = matches!(parts.next(), Some(Protocol::Tcp(_)));
    host && port && parts.all(|p| matches!(p, Protocol::P2p(_)))
}

impl Config {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_event_size == 0 || self.max_event_size > max_event_size_limit() {
            return Err(ConfigError::MaxEventSize(self.max_event_size));
        }
        if self.max_messages_per_sec == 0 {
            return Err(ConfigError::Zero("max_messages_per_sec"));
        }
        if self.max_bytes_per_sec == 0 {
            return Err(ConfigError::Zero("max_bytes_per_sec"));
        }
        if self.handler_queue == 0 {
            return Err(ConfigError::Zero("handler_queue"));
        }
        if self.tail_buffer == 0 {
            return Err(ConfigError::Zero("tail_buffer"));
        }
        if self.retention.max_events == 0 {
            return Err(ConfigError::Zero("log max_events"));
        }
        if self.retention.max_bytes == 0 {
            return Err(ConfigError::Zero("log max_bytes"));
        }
        for (what, addrs) in [("listen", &self.listen), ("peer", &self.peers)] {
            if let Some(addr) = addrs.iter().find(|a| !is_tcp(a)) {
                return Err(ConfigError::NotTcp {
                    what,
                    addr: addr.clone(),
                });
            }
        }
        if self.retention.max_age.is_zero() {
            return Err(ConfigError::Zero("log max_age"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_listen_on_tcp() {
        let c = Config::default();
        c.validate().unwrap();
        let listen: Vec<String> = c.listen.iter().map(|a| a.to_string()).collect();
        assert_eq!(listen, ["/ip4/0.0.0.0/tcp/7421"]);
        let quic = Config {
            listen: vec!["/ip4/0.0.0.0/udp/7421/quic-v1".parse().unwrap()],
            ..Config::default()
        };
        let err = quic.validate().unwrap_err().to_string();
        assert!(err.contains("not a TCP address"), "{err}");
        assert!(c.max_event_size >= 256 * 1024);
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        let c = Config {
            max_event_size: MAX_MESSAGE_SIZE,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_event_size"));
        let c = Config {
            handler_queue: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}

pub mod file;
pub mod resolve;

pub use resolve::{resolve, Flags, Resolved, TableSource};
