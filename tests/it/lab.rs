//! Mesh tests on `meshbus-lab`: real binaries on a virtual LAN, with peers killed, restarted,
//! unplugged and plugged back in (needs root; skipped loudly otherwise, unless
//! `MESHBUS_REQUIRE_NETNS=1`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(60);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A lab of its own for one test, taken down when dropped.
struct LabRun {
    prefix: String,
    root: tempfile::TempDir,
}

impl LabRun {
    /// `meshbus-lab up --peers n` with a file handler for `orders.**` on every host.
    fn up(n: usize) -> LabRun {
        let lab = LabRun {
            prefix: format!(
                "mbt{}x{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            root: tempfile::tempdir().unwrap(),
        };
        let n = n.to_string();
        let out = lab.run(&[
            "up",
            "--peers",
            &n,
            "--",
            "--quiet",
            "--on",
            "orders.**=file:{data}/orders.jsonl",
        ]);
        let text = ok(out);
        let formed = text.lines().last().unwrap_or_default();
        assert!(
            formed.starts_with(&format!("mesh of {n} peers formed")),
            "{text}"
        );
        eprintln!("{}: {formed}", lab.prefix);
        lab
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_meshbus-lab"))
            .args(["--prefix", &self.prefix])
            .args(args)
            .env("MESHBUS_LAB_DIR", self.root.path())
            .env("MESHBUS_BIN", bin())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        ok(self.run(args))
    }

    /// `status --json`, by host name.
    fn status(&self) -> BTreeMap<String, Value> {
        let hosts: Vec<Value> = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        hosts
            .into_iter()
            .map(|h| (h["host"].as_str().unwrap().to_owned(), h))
            .collect()
    }

    fn peer_id(&self, host: &str) -> String {
        self.status()[host]["peer_id"].as_str().unwrap().to_owned()
    }

    fn sees(&self, host: &str) -> BTreeSet<String> {
        self.status()[host]["sees"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect()
    }

    fn events_file(&self, host: &str) -> PathBuf {
        self.root
            .path()
            .join(&self.prefix)
            .join(host)
            .join("orders.jsonl")
    }

    /// Publishes from `host`'s CLI; returns the event id.
    fn publish(&self, host: &str, topic: &str) -> String {
        let out: Value = serde_json::from_str(&self.ok(&[
            "exec", host, "--", "meshbus", "publish", topic, "1", "--json",
        ]))
        .unwrap();
        out["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn ids_in(path: &Path) -> Vec<String> {
    events_in(path)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_for_id(path: &Path, id: &str) {
    wait_until(T, &format!("event {id} in {}", path.display()), || {
        ids_in(path).iter().any(|i| i == id)
    });
}

#[test]
fn ten_peers_form_a_full_mesh_by_mdns_alone() {
    if !netns_or_skip("lab-10") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(10);
    let status = lab.status();
    let all: BTreeSet<String> = status
        .values()
        .map(|h| h["peer_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 10);
    for (host, h) in &status {
        let sees: BTreeSet<String> = h["sees"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        let mut others = all.clone();
        others.remove(h["peer_id"].as_str().unwrap());
        assert_eq!(sees, others, "{host} sees every other peer");
    }
}

#[test]
fn a_killed_peer_is_dropped_and_rejoins_with_the_same_id_after_restart() {
    if !netns_or_skip("lab-kill") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(4);
    let victim = lab.peer_id("h3");
    lab.ok(&["kill", "h3"]);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(10),
            &format!("{host} to drop h3"),
            || !lab.sees(host).contains(&victim),
        );
    }
    let during = lab.publish("h0", "orders.during");
    for host in ["h0", "h1", "h2"] {
        wait_for_id(&lab.events_file(host), &during);
    }

    let out = lab.ok(&["restart", "h3"]);
    assert!(out.contains(&victim), "same peer id after restart: {out}");
    assert_eq!(lab.peer_id("h3"), victim);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{host} to see h3 again"),
            || lab.sees(host).contains(&victim),
        );
    }
    let after = lab.publish("h1", "orders.after");
    for host in ["h0", "h1", "h2", "h3"] {
        wait_for_id(&lab.events_file(host), &after);
    }
    assert!(
        !ids_in(&lab.events_file("h3")).contains(&during),
        "h3 was down for that one"
    );
}

#[test]
fn a_cut_host_is_dropped_the_rest_carry_on_and_it_rejoins_on_heal() {
    if !netns_or_skip("lab-cut") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(4);
    let cut = lab.peer_id("h3");
    lab.ok(&["cut", "h3"]);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{host} to drop the cut host"),
            || !lab.sees(host).contains(&cut),
        );
    }
    let during = lab.publish("h0", "orders.during");
    for host in ["h0", "h1", "h2"] {
        wait_for_id(&lab.events_file(host), &during);
    }
    lab.ok(&["heal", "h3"]);
    wait_until(
        Duration::from_secs(30),
        "h3 back in everyone's view",
        || {
            lab.sees("h3").len() == 3
                && ["h0", "h1", "h2"]
                    .iter()
                    .all(|h| lab.sees(h).contains(&cut))
        },
    );
    let after = lab.publish("h2", "orders.after");
    for host in ["h0", "h1", "h2", "h3"] {
        wait_for_id(&lab.events_file(host), &after);
    }
}

#[test]
fn concurrent_publishers_deliver_every_event_exactly_once_everywhere() {
    if !netns_or_skip("lab-publishers") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(5);
    const PER_PUBLISHER: usize = 40;
    let publishers = ["h0", "h2", "h4"];
    let published: BTreeSet<String> = std::thread::scope(|s| {
        let handles: Vec<_> = publishers
            .iter()
            .map(|host| {
                let lab = &lab;
                s.spawn(move || {
                    (0..PER_PUBLISHER)
                        .map(|i| lab.publish(host, &format!("orders.{host}.n{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(published.len(), publishers.len() * PER_PUBLISHER);
    for host in ["h0", "h1", "h2", "h3", "h4"] {
        let path = lab.events_file(host);
        let events = wait_for_events(&path, published.len(), T);
        let ids: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), published.len(), "{host}: no duplicates");
        assert_eq!(
            ids.into_iter().collect::<BTreeSet<_>>(),
            published,
            "{host}: every event"
        );
        // Each publisher's events arrive in its order.
        for publisher in publishers {
            let seqs: Vec<u64> = events
                .iter()
                .filter(|e| {
                    e["topic"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("orders.{publisher}."))
                })
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{host} got {publisher}'s events in order"
            );
        }
    }
}

#[test]
fn a_lab_left_behind_by_a_crash_is_cleaned_by_the_next_up_or_down() {
    if !netns_or_skip("lab-crash") {
        return;
    }
    let _one = one_lab_at_a_time();
    let prefix = format!(
        "mbt{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // What a crash leaves: namespaces and a running process, but no state file.
    let lan = meshbus::netns::VirtualLan::with_prefix(&prefix, 2).unwrap();
    let mut sleeper = lan.command(0, "sleep").arg("600").spawn().unwrap();
    wait_in_netns(&lan.hosts()[0].netns, sleeper.id());
    lan.keep();
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshbus-lab"))
        .args(["--prefix", &prefix, "down"])
        .env("MESHBUS_LAB_DIR", root.path())
        .output()
        .unwrap();
    assert!(ok(out).contains("removed"));
    let listed = meshbus::netns::ip(&["netns", "list"]).unwrap();
    assert!(!listed.contains(&prefix), "{listed}");
    assert!(!sleeper.wait().unwrap().success());
    let out = Command::new(env!("CARGO_BIN_EXE_meshbus-lab"))
        .args(["--prefix", &prefix, "status"])
        .env("MESHBUS_LAB_DIR", root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("meshbus-lab up"));
}

#[test]
fn the_bench_runs_a_small_load_and_reports_every_event_delivered() {
    if !netns_or_skip("lab-bench") {
        return;
    }
    let _one = one_lab_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let prefix = format!(
        "mbt{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_meshbus-lab"))
        .args([
            "--prefix",
            &prefix,
            "bench",
            "--peers",
            "3",
            "--publishers",
            "2",
        ])
        .args(["--events", "2000", "--size", "128", "--json"])
        .env("MESHBUS_LAB_DIR", root.path())
        .env("MESHBUS_BIN", bin())
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&ok(out)).unwrap();
    let peers = report["per_peer"].as_array().unwrap();
    assert_eq!(peers.len(), 3);
    for p in peers {
        assert_eq!(p["expected"], 2000, "{p}");
        assert_eq!(p["delivered"], 2000, "{p}");
        assert!(p["p99_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["peak_rss_kib"].as_u64().unwrap() >= p["idle_rss_kib"].as_u64().unwrap());
    }
    assert!(report["publish_rate"].as_f64().unwrap() > 0.0);
    let listed = meshbus::netns::ip(&["netns", "list"]).unwrap();
    assert!(!listed.contains(&prefix), "the bench took its lab down");
}
