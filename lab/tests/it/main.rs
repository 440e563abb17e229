//! Integration tests of `meshbus-lab`, one binary: the lab binary and library on real
//! namespaces with real `meshbus` peers (needs root; skipped loudly otherwise, unless
//! `MESHBUS_REQUIRE_NETNS=1`).

mod bench;
mod delivery;
mod durability;
mod faults;
mod groups;
mod security;
mod support;
