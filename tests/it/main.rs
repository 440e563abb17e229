//! Integration tests, one binary: real `meshbus` processes, real sockets, real namespaces.
//! Grouped by behaviour; the tests that drive `meshbus-lab` itself are in `lab/tests/`.

mod api;
mod cli;
mod config;
mod delivery;
mod faults;
mod fuzz;
mod groups;
mod handlers;
mod library;
mod log;
mod retries;
mod security;
mod support;
