//! Helpers for tests that drive real peers and labs, shared by this crate's tests and
//! meshbus's. Unlike the rest of the crate they panic, naming what they waited for, because
//! that is how a test fails.

use std::path::Path;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

/// How often the test helpers re-check a condition.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `check` returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    crate::poll(timeout, POLL, check)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Like [`wait_for`] for a plain condition.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || check().then_some(()))
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// The CloudEvents a file handler wrote so far (none if the file does not exist yet). A last
/// line without its newline is still being written and is left for the next look.
pub fn events_in(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Waits until a file handler has written at least `n` events; returns them.
pub fn wait_for_events(path: &Path, n: usize, timeout: Duration) -> Vec<Value> {
    wait_for(
        timeout,
        &format!("{n} events in {}", path.display()),
        || {
            let events = events_in(path);
            (events.len() >= n).then_some(events)
        },
    )
}

/// One lab at a time, so timings measure the mesh rather than a neighbour's load.
static LAB: Mutex<()> = Mutex::new(());

/// Holds the lab lock (of this test process) until dropped.
pub fn one_lab_at_a_time() -> MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether namespaces can be made here; panics if they cannot but must
/// (`MESHBUS_REQUIRE_NETNS=1`), else says loudly that `test` is skipped.
pub fn netns_or_skip(test: &str) -> bool {
    match crate::netns::available() {
        Ok(()) => true,
        Err(reason) => {
            assert!(
                std::env::var("MESHBUS_REQUIRE_NETNS").as_deref() != Ok("1"),
                "MESHBUS_REQUIRE_NETNS=1 but network namespaces are not available: {reason}"
            );
            eprintln!("\n*** SKIPPED {test}: network namespaces are not available ({reason}); run as root to test the LAN ***\n");
            false
        }
    }
}

/// Waits until process `pid` has entered namespace `netns` (`ip netns exec` returns from
/// spawn before it has switched).
pub fn wait_in_netns(netns: &str, pid: u32) {
    wait_until(
        Duration::from_secs(10),
        &format!("pid {pid} inside {netns}"),
        || {
            crate::netns::ip(&["netns", "pids", netns])
                .map(|pids| pids.split_whitespace().any(|p| p == pid.to_string()))
                .unwrap_or(false)
        },
    );
}
