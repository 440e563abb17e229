//! Integration tests, one binary: real `meshbus` processes, real sockets, real namespaces.

mod bad_input;
mod cli;
mod handlers;
mod lab;
mod lan;
mod library;
mod support;
