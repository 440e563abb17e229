//! meshbus-lab: a whole LAN of `meshbus` peers on one Linux machine, and the means to break
//! it. Needs root and iproute2's `ip`.
//!
//! Every host is a network namespace joined by a veth pair to a bridge in a namespace of its
//! own, so mDNS stays inside the lab; a `meshbus up` runs on each host with its API on
//! [`PEER_API`] inside the namespace. A [`Lab`] outlives the process that started it (its
//! state is a file), so the `meshbus-lab` binary can start one, break it (kill, restart, cut,
//! heal) and take it down in separate invocations. The tests of meshbus use the same pieces.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # fn demo() -> Result<(), meshbus_lab::LabError> {
//! let root = meshbus_lab::root();
//! let (mut lab, formed) = meshbus_lab::Lab::up(
//!     &root,
//!     "demo",
//!     3,
//!     meshbus_lab::meshbus_bin(),
//!     vec!["--quiet".into()],
//!     Duration::from_secs(30),
//! )?;
//! println!("full mesh {formed:?} after the last start");
//! lab.cut(2)?;
//! lab.heal(2)?;
//! lab.wait_full_mesh(Duration::from_secs(30))?;
//! meshbus_lab::down(&root, "demo")?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`netns`]: the virtual LAN itself: namespaces, veth pairs, a bridge; cut and heal a
//!   link; remove whatever a lab left behind.
//! - `lab.rs`: [`Lab`], a lasting LAN with a running peer on every host, its state file
//!   ([`LabState`]), faults, and waiting for the full mesh.
//! - [`process`]: what `/proc` says about the peers (alive, scheduler fields).
//! - [`bench`]: the mesh benchmark on a fresh lab (every peer handling every event, or a
//!   handler group sharing them), and its load generator.
//! - [`testing`]: helpers for tests that drive peers and labs (waiting, reading what file
//!   handlers wrote, skipping where namespaces cannot be made).
//! - `main.rs`: the `meshbus-lab` binary, a thin CLI over all of this.

#![deny(missing_docs)]

pub mod bench;
mod lab;
pub mod nats;
pub mod netns;
pub mod process;
pub mod testing;

pub use lab::{
    down, meshbus_bin, poll, root, Lab, LabError, LabHost, LabState, DEFAULT_ROOT, PEER_API,
};
pub use netns::VirtualLan;
