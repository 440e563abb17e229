//! The mesh's rules as state machines without IO: no tokio, no sockets, no swarm, no files.
//! Each is fed what happened, with the time passed in, and answers with what to do; the
//! swarm task in [`crate::node`] carries that out. So every rule is tested here, without a
//! network, and [`sim`](self) runs several peers through them on a simulated one.
//!
//! - [`publish`]: this peer's sequence numbers and how events are packed into messages.
//! - [`receive`]: which events of a message from another peer are accepted.
//! - [`acl`]: who may publish on which topics; [`limits`]: how much one neighbour may send.
//! - [`inbox`]: every publisher's events once and in order; gaps and what to fetch.
//! - [`peers`]: connections, liveness, redials and membership events; [`discovery`]: what
//!   mDNS says, within bounds; [`roster`]: members heard over the mesh.
//! - [`listen`]: when a starting node is ready.
//! - [`groups`]: which member of a handler group handles an event, and takeover when one
//!   fails.

pub mod acl;
pub mod discovery;
pub mod groups;
pub mod inbox;
pub mod limits;
pub mod listen;
pub mod peers;
pub mod publish;
pub mod receive;
pub mod roster;

#[cfg(test)]
mod sim;

pub use acl::Acl;
pub use inbox::{Fetch, Inbox, Lost, Received, StreamId};
pub use listen::Listening;
pub use peers::{Membership, PeerAction, PeerInfo, Peers};
pub use publish::{Publisher, Unstamped};
pub use receive::{receive, MessageError};

/// The one gossipsub topic every event travels on. Topic names are inside the envelope, so
/// a handler for `orders.*` sees `orders.shipped` even if nobody had used that topic when its
/// peer started, and a peer needs no subscription change to match new topics.
pub const MESH_TOPIC: &str = "meshbus/events/1";
