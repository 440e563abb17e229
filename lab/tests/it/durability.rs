//! The delivery promise on a real lab: every event reaches every handler table once and in
//! each publisher's order, through kills, cuts, late starts and a publisher killed right
//! after `publish` returned; and failures are reported within their bound.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Most events a file row writes at once: a peer killed mid-write may write them again.
const FILE_BATCH: usize = 256;

/// What one host's handler table got of `topic`: per publisher, the seqs in the order
/// handled, and how many lines repeated an id already there.
struct Got {
    by_source: BTreeMap<String, Vec<u64>>,
    unique: usize,
    repeats: usize,
}

fn got(lab: &LabRun, host: &str, topic: &str) -> Got {
    let mut seen = BTreeSet::new();
    let mut by_source: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut repeats = 0;
    for e in events_in(&lab.events_file(host)) {
        if e["topic"] != topic {
            continue;
        }
        if !seen.insert(e["id"].as_str().unwrap().to_owned()) {
            repeats += 1;
            continue;
        }
        by_source
            .entry(e["source"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    Got {
        by_source,
        unique: seen.len(),
        repeats,
    }
}

/// Every publisher's events are there in its order, none missing between its first and last.
fn assert_in_order(host: &str, got: &Got) {
    for (source, seqs) in &got.by_source {
        let first = seqs[0];
        let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert!(
            *seqs == expected,
            "{host}: events of {source} are not all there in order: {} events, first {first}, out of place at index {:?}",
            seqs.len(),
            seqs.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
}

#[test]
fn every_event_reaches_every_table_once_in_order_through_a_kill_and_a_cut() {
    if !netns_or_skip("lab-durable-faults") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(5);
    let topic = "orders.load";
    // 10,000 events from three publishers, about four seconds of load.
    let loads =
        [("h0", 3334), ("h1", 3333), ("h2", 3333)].map(|(host, n)| lab.load(host, topic, n, 800.0));
    let total = 10_000;
    let progress = |host: &str| got(&lab, host, topic).unique;
    wait_until(T, "the load to get going", || progress("h0") >= 500);
    lab.ok(&["kill", "h3"]);
    wait_until(T, "more load while h3 is down", || progress("h0") >= 2_500);
    lab.ok(&["cut", "h4"]);
    wait_until(T, "more load while h4 is cut off", || {
        progress("h0") >= 5_000
    });
    lab.ok(&["restart", "h3"]);
    wait_until(T, "more load after h3 is back", || progress("h0") >= 7_000);
    lab.ok(&["heal", "h4"]);
    let published: u64 = loads.into_iter().map(Loader::wait).sum();
    assert_eq!(published, total as u64);
    for host in ["h0", "h1", "h2", "h3", "h4"] {
        wait_until(T, &format!("{host} to have every event"), || {
            progress(host) >= total
        });
        let g = got(&lab, host, topic);
        assert_eq!(
            g.unique, total,
            "{host}: nothing more than what was published"
        );
        assert_eq!(g.by_source.len(), 3, "{host}: three publishers");
        assert_in_order(host, &g);
        if host == "h3" {
            // Killed while writing: the batch in flight may be written again (at least once
            // across a crash, the event id being the key), never more than one batch.
            assert!(
                g.repeats <= FILE_BATCH,
                "{host}: {} repeated lines",
                g.repeats
            );
        } else {
            assert_eq!(g.repeats, 0, "{host}: an event handled twice");
        }
    }
}

#[test]
fn peers_started_after_a_lone_publisher_get_everything_it_published() {
    if !netns_or_skip("lab-durable-late") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(3);
    lab.ok(&["kill", "h1"]);
    lab.ok(&["kill", "h2"]);
    // h1 and h2 come back as new peers: same identity, but no log and no cursor.
    for host in ["h1", "h2"] {
        std::fs::remove_file(lab.data_file(host, "log.redb")).unwrap();
        let _ = std::fs::remove_file(lab.events_file(host));
    }
    wait_until(T, "h0 alone", || lab.sees("h0").is_empty());
    let ids: Vec<String> = (0..20).map(|_| lab.publish("h0", "orders.alone")).collect();
    lab.ok(&["restart", "h1"]);
    lab.ok(&["restart", "h2"]);
    for host in ["h1", "h2"] {
        wait_until(T, &format!("{host} to get all 20"), || {
            got(&lab, host, "orders.alone").unique == ids.len()
        });
        let order: Vec<String> = events_in(&lab.events_file(host))
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(order, ids, "{host}: in publish order, once");
    }
}

#[test]
fn an_event_whose_publisher_was_killed_right_after_publish_still_arrives() {
    if !netns_or_skip("lab-durable-kill-publisher") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(3);
    let publisher = lab.peer_id("h0");
    // Cut h0 so gossip cannot carry the event: only h0's disk has it when it dies.
    lab.ok(&["cut", "h0"]);
    for host in ["h1", "h2"] {
        wait_until(T, &format!("{host} to drop h0"), || {
            !lab.sees(host).contains(&publisher)
        });
    }
    let id = lab.publish("h0", "orders.durable");
    lab.ok(&["kill", "h0"]);
    lab.ok(&["heal", "h0"]);
    for host in ["h1", "h2"] {
        assert!(!ids_in(&lab.events_file(host)).contains(&id));
    }
    lab.ok(&["restart", "h0"]);
    for host in ["h0", "h1", "h2"] {
        wait_for_id(&lab.events_file(host), &id);
        assert_eq!(got(&lab, host, "orders.durable").unique, 1);
    }
}

#[test]
fn a_killed_or_cut_peer_is_reported_failed_and_a_stopped_one_left_within_the_bound() {
    if !netns_or_skip("lab-durable-failed") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up_with(
        4,
        &[
            "--on",
            "_mesh.peer.failed=exec:cat >> {data}/failed.jsonl",
            "--on",
            "_mesh.peer.left=exec:cat >> {data}/left.jsonl",
        ],
    );
    // The bound: a reset connection at once, silence after DEAD_AFTER (4 s) checked every
    // second; plus a moment for the exec handler.
    let bound = Duration::from_secs(6);
    let reported = |host: &str, file: &str, peer: &str| -> bool {
        events_in(&lab.data_file(host, file))
            .iter()
            .any(|e: &Value| e["data"]["peer"] == peer)
    };

    let killed = lab.peer_id("h3");
    let start = Instant::now();
    lab.ok(&["kill", "h3"]);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            bound.saturating_sub(start.elapsed()),
            &format!("{host} to report h3 failed"),
            || reported(host, "failed.jsonl", &killed),
        );
    }

    let cut = lab.peer_id("h2");
    let start = Instant::now();
    lab.ok(&["cut", "h2"]);
    for host in ["h0", "h1"] {
        wait_until(
            bound.saturating_sub(start.elapsed()),
            &format!("{host} to report h2 failed"),
            || reported(host, "failed.jsonl", &cut),
        );
    }
    for host in ["h0", "h1"] {
        assert!(!reported(host, "left.jsonl", &killed) && !reported(host, "left.jsonl", &cut));
    }

    // A clean stop says goodbye: left, not failed.
    let stopped = lab.peer_id("h1");
    lab.ok(&["stop", "h1"]);
    wait_until(bound, "h0 to report h1 left", || {
        reported("h0", "left.jsonl", &stopped)
    });
    assert!(!reported("h0", "failed.jsonl", &stopped));
}

#[test]
fn a_row_slower_than_the_publisher_ends_with_every_event_and_drops_nothing() {
    if !netns_or_skip("lab-durable-slow") {
        return;
    }
    let _one = one_lab_at_a_time();
    let prefix = lab_prefix();
    let root = tempfile::tempdir().unwrap();
    // A row with room for 4 events whose command takes a few milliseconds each. The files
    // live beside the lab's directory (`up` starts that afresh).
    let configs = root.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    for host in ["h0", "h1"] {
        let data = root.path().join(&prefix).join(host);
        let config = format!(
            "[[handler]]\nname = \"slow\"\npattern = \"orders.slow\"\nqueue = 4\n\
             [handler.exec]\ncommand = \"sleep 0.002; cat >> {}/slow.jsonl\"\n",
            data.display()
        );
        std::fs::write(configs.join(format!("{host}.toml")), config).unwrap();
    }
    let config = format!("{}/{{host}}.toml", configs.display());
    let lab = LabRun::up_in(prefix, root, 2, &["--config", &config]);
    let n = 300;
    assert_eq!(lab.load("h0", "orders.slow", n, 5_000.0).wait(), n as u64);
    let slow_row = |host: &str| -> Value {
        let rows: Value =
            serde_json::from_str(&lab.ok(&["exec", host, "--", "meshbus", "handlers", "--json"]))
                .unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "slow")
            .unwrap()
            .clone()
    };
    let behind = slow_row("h0");
    assert!(
        behind["lag"].as_u64().unwrap() > 4,
        "the row is behind by more than its queue when the publisher is done: {behind}"
    );
    for host in ["h0", "h1"] {
        let file = lab.data_file(host, "slow.jsonl");
        let events = wait_for_events(&file, n, T);
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=n as u64).collect::<Vec<_>>(),
            "{host}: every event, in order"
        );
        let slow = slow_row(host);
        assert_eq!(slow["succeeded"], n, "{host}: {slow}");
        assert_eq!(
            (slow["skipped"].as_u64(), slow["failed"].as_u64()),
            (Some(0), Some(0))
        );
    }
}
