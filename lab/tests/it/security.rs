//! The private mesh on a real LAN: a peer with another mesh key is never let in, and the key
//! can change under a running, publishing mesh without losing an event.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// `meshbus ARGS…` on the test's own machine (no network), e.g. for a key.
fn meshbus(args: &[&str]) -> String {
    ok(std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap())
}

/// One of `host`'s peer's counters.
fn counter(lab: &LabRun, host: &str, name: &str) -> u64 {
    let status: Value =
        serde_json::from_str(&lab.ok(&["exec", host, "--", "meshbus", "status", "--json"]))
            .unwrap();
    status["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_peer_with_another_mesh_key_never_gets_in_and_neither_reads_nor_publishes() {
    if !netns_or_skip("lab-security-outsider") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(4);
    // h3 leaves and comes back holding another mesh's key.
    lab.ok(&["stop", "h3"]);
    let elsewhere = tempfile::tempdir().unwrap();
    let dir = elsewhere.path().to_str().unwrap();
    let line = meshbus(&["invite", "--data-dir", dir]);
    lab.ok(&["exec", "h3", "--", "meshbus", "join", line.trim()]);
    lab.ok(&["restart", "h3"]);
    let outsider = lab.peer_id("h3");
    // It keeps knocking (mDNS finds the others), and every knock is refused and counted.
    for host in ["h0", "h1", "h2"] {
        wait_until(T, &format!("{host} to refuse h3"), || {
            counter(&lab, host, "connections_refused") > 0
        });
    }
    let outsider_id = lab.publish("h3", "orders.from-outside");
    let inside_id = lab.publish("h0", "orders.from-inside");
    for host in ["h1", "h2"] {
        wait_for_id(&lab.events_file(host), &inside_id);
    }
    for host in ["h0", "h1", "h2"] {
        let ids = ids_in(&lab.events_file(host));
        assert!(
            !ids.contains(&outsider_id),
            "{host} handled the outsider's event"
        );
        let sees = lab.sees(host);
        assert!(!sees.contains(&outsider), "{host} lists the outsider");
    }
    assert!(
        lab.sees("h3").is_empty(),
        "the outsider is connected to {:?}",
        lab.sees("h3")
    );
    let outside_ids = ids_in(&lab.events_file("h3"));
    assert!(
        !outside_ids.contains(&inside_id),
        "the outsider read a member's event"
    );
    // The members still have each other.
    let members: BTreeSet<String> = ["h0", "h1", "h2"].iter().map(|h| lab.peer_id(h)).collect();
    for host in ["h0", "h1", "h2"] {
        let mut want = members.clone();
        want.remove(&lab.peer_id(host));
        assert_eq!(lab.sees(host), want, "{host}");
    }
}

#[test]
fn the_mesh_key_rotates_under_a_publishing_mesh_without_losing_an_event() {
    if !netns_or_skip("lab-security-rotation") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(3);
    let old = lab.ok(&["exec", "h0", "--", "meshbus", "keys", "list"]);
    let old = old.split_whitespace().next().unwrap().to_owned();
    let new = meshbus(&["keys", "generate"]);
    let new = new.trim();
    const N: usize = 3000;
    let loader = lab.load("h0", "orders.rotating", N, 600.0);
    let hosts = ["h0", "h1", "h2"];
    // Serf's three steps, each on every peer before the next.
    for step in [
        vec!["keys", "install", new],
        vec!["keys", "use", new],
        vec!["keys", "remove", &old],
    ] {
        for host in hosts {
            let mut args = vec!["exec", host, "--", "meshbus"];
            args.extend(step.iter().copied());
            lab.ok(&args);
        }
    }
    // New connections now need the new key: restart a peer mid-load, cleanly (a SIGKILL may
    // repeat the batch its file row was writing, which is not what this test is about).
    lab.ok(&["stop", "h2"]);
    lab.ok(&["restart", "h2"]);
    let published = loader.wait() as usize;
    assert_eq!(published, N);
    let h0 = lab.peer_id("h0");
    for host in hosts {
        wait_until(
            Duration::from_secs(60),
            &format!("{host} to have every event"),
            || seqs(&lab, host, &h0).len() >= N,
        );
        let seqs = seqs(&lab, host, &h0);
        let expected: Vec<u64> = (1..=N as u64).collect();
        assert_eq!(seqs, expected, "{host}: every event once, in order");
    }
    let list = lab.ok(&["exec", "h1", "--", "meshbus", "keys", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(!list.contains(&old), "{list}");
}

/// The seqs of `source`'s `orders.rotating` events in `host`'s file, in file order.
fn seqs(lab: &LabRun, host: &str, source: &str) -> Vec<u64> {
    events_in(&lab.events_file(host))
        .iter()
        .filter(|e: &&Value| e["topic"] == "orders.rotating" && e["source"] == source)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}
