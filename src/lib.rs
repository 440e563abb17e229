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
//! // The data directory keeps the event log and the mesh key (made at the first start).
//! let node = Node::start(Config {
//!     data_dir: Some("meshbus-data".into()),
//!     ..Config::default()
//! })
//! .await?;
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
//! - [`event`]: the event envelope, the one validator of events, and their CloudEvents JSON
//!   view (no IO).
//! - [`wire`]: the versioned binary encoding between peers (no IO); see `docs/wire.md`.
//! - [`proto`]: the mesh's rules as IO-free state machines (publishing, receiving, the inbox
//!   that orders, de-duplicates and repairs each publisher's stream, peers and membership,
//!   handler groups and who owns an event, start-up), unit-tested and simulated without a
//!   network.
//! - [`node`]: the task that owns the libp2p swarm and carries out what [`proto`] decides,
//!   the repair protocol (which also carries group announcements), the answer protocol of
//!   queries, and the handle everything else uses.
//! - [`store`]: the event log (redb): every event once, in order, bounded, persistent; and
//!   the handler rows' cursors.
//! - [`handlers`]: the handler table, its rows (cursors over the log, queues, workers,
//!   retries, dead letters, groups, answers to queries) and actions (log, file, exec, http,
//!   Rust), with jq filters and transforms.
//! - [`api`]: the HTTP control API ([`api::serve`]), its JSON types and its client.
//! - [`config`]: settings and defaults, the TOML config file, and [`config::resolve`], which
//!   turns flags, environment, file and defaults into what a peer runs with.
//! - [`identity`]: the peer's key in its data directory, so a restart keeps its peer id.
//! - [`keyring`]: the mesh's keys, without which no one can connect (`node::private` is
//!   how they guard a connection); [`files`]: bounded reads and private writes.
//! - [`stats`]: the counters `status` shows; [`clock`]: event times as Unix microseconds;
//!   [`http_client`]: the outbound HTTP client of webhooks and the API client.

#![deny(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod event;
pub mod files;
pub mod handlers;
pub mod http_client;
pub mod identity;
pub mod keyring;
pub mod node;
pub mod proto;
pub mod stats;
pub mod store;
pub mod topic;
pub mod wire;

pub use config::{Config, Mesh};
pub use event::{CloudEvent, Event, EventId, Payload, Tailed};
pub use handlers::{Action, HandlerSpec};
pub use node::{Node, NodeError, NodeHandle, Published};
pub use topic::{Pattern, Topic};

/// Re-exported so users can build addresses and identities without naming libp2p.
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
