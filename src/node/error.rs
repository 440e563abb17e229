//! What can go wrong in a node, one variant per cause, so the API can map each to its HTTP
//! status in one place.

use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;

use crate::config::file::ConfigFileError;
use crate::config::ConfigError;
use crate::event::EventError;

/// Why a node could not start or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A setting out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The event was refused before it left this peer.
    #[error(transparent)]
    Event(#[from] EventError),
    /// Setting up transports or protocols failed.
    #[error("cannot set up the network ({what}): {source}")]
    Setup {
        /// Which part.
        what: &'static str,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The mesh topic could not be joined.
    #[error("cannot set up the network: cannot subscribe to the mesh topic: {0}")]
    Subscribe(#[from] libp2p::gossipsub::SubscriptionError),
    /// A listen address could not be used.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What went wrong.
        source: libp2p::TransportError<std::io::Error>,
    },
    /// A listener failed while starting.
    #[error("cannot set up the network: a listener failed: {0}")]
    Listener(String),
    /// The listeners did not report their addresses in time.
    #[error("cannot set up the network: listeners did not report an address within {0:?}")]
    ListenTimeout(Duration),
    /// A peer address could not be dialled.
    #[error("cannot dial {addr}: {source}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The event could not be stored in this peer's log, so it was not sent either.
    #[error("could not publish: the event was not stored: {0}")]
    NotStored(Arc<crate::store::StoreError>),
    /// The mesh keys could not be read or made.
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
    /// A private mesh (the default) with nowhere to keep its key.
    #[error("a private mesh needs its key: give the node a data_dir (the key is kept there), Mesh::Keys, or choose Mesh::Open")]
    NoMeshKey,
    /// The event log could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A value could not be encoded as JSON data.
    #[error("cannot encode the data as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The actor is gone: the node was shut down.
    #[error("the node has shut down")]
    Stopped,
    /// The handler table was refused.
    #[error(transparent)]
    Table(#[from] crate::handlers::TableError),
    /// Reloading found a problem; the old table stays.
    #[error("reload refused, the old handler table stays: {0}")]
    Reload(#[source] ConfigFileError),
    /// Nothing to reload from.
    #[error("this node has no config to reload (it was not started with --config)")]
    NoReloadSource,
    /// A query that cannot be asked.
    #[error("query refused: {0}")]
    BadQuery(String),
    /// As many queries are open as one peer may have.
    #[error("query refused: {0} queries are open already; wait for one to end")]
    TooManyQueries(usize),
    /// One event of a batch was refused, so none was published.
    #[error("event {index}: {error}")]
    InBatch {
        /// Its position in the batch, from 0.
        index: usize,
        /// Why.
        error: Box<NodeError>,
    },
}
