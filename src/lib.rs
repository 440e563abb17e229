//! meshbus: a peer-to-peer event mesh.
//!
//! Peers on a LAN find each other by mDNS, broadcast events over libp2p gossipsub, and each
//! runs its own handler table: "pattern → action" rows that decide what happens to every event
//! it receives. There is no broker: any peer can publish, any peer can stop.
//!
//! ```no_run
//! use meshbus::{Config, Node, Pattern};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::start(Config::default()).await?;
//! node.on(Pattern::new("orders.*")?, |event| async move {
//!     println!("{} on {}", event.id, event.topic);
//!     Ok(())
//! })?;
//! node.publish_json("orders.created", &serde_json::json!({ "id": 42 })).await?;
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`topic`]: topic names and `*`/`**` patterns (no IO).
//! - [`event`]: the event envelope and its CloudEvents JSON view (no IO).
//! - [`wire`]: the versioned binary encoding between peers (no IO); see `docs/wire.md`.
//! - [`handlers`]: the handler table, its rows (queues, workers, retries, dead letters) and
//!   actions (log, file, exec, http, Rust), with jq filters and transforms.
//! - [`node`]: the actor that owns the libp2p swarm, discovery and broadcast, and its handle.
//! - [`api`]: the HTTP control API a peer serves; [`client`]: the client the CLI uses.
//! - [`config`]: settings, defaults and the TOML config file; [`stats`]: the counters `status`
//!   shows.
//! - [`identity`]: the peer's key in its data directory, so a restart keeps its peer id.

#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod config;
pub mod event;
pub mod handlers;
pub mod identity;
pub mod node;
pub mod stats;
pub mod topic;
pub mod wire;

pub use config::Config;
pub use event::{CloudEvent, Event, EventId, Payload};
pub use handlers::{Action, HandlerSpec};
pub use node::{Node, NodeError, NodeHandle, Published, Tailed};
pub use topic::{Pattern, Topic};

/// Re-exported so users can build addresses and identities without naming libp2p.
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
