//! Real mDNS on a virtual LAN: one network namespace per host on one bridge (needs root).
//!
//! Without the rights to create namespaces these tests say so loudly and pass as skipped,
//! unless `MESHBUS_REQUIRE_NETNS=1` (as in CI), in which case they fail.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, SystemTime};

use meshbus::netns::VirtualLan;
use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

/// A lab with a `meshbus up` (mDNS on, default ports) on every host.
struct Mesh {
    lan: VirtualLan,
    peers: Vec<Peer>,
    dir: tempfile::TempDir,
    /// When the last peer was started.
    last_start: SystemTime,
}

impl Mesh {
    fn start(n: usize) -> Mesh {
        let lan = VirtualLan::create(n).expect("build the virtual LAN");
        let dir = tempfile::tempdir().unwrap();
        let mut peers = Vec::new();
        let mut last_start = SystemTime::now();
        for i in 0..n {
            let mut cmd = lan.command(i, bin());
            let events = dir.path().join(format!("h{i}.jsonl"));
            let joined = dir.path().join(format!("h{i}.joined.jsonl"));
            cmd.args(["up", "--quiet", "--name", &format!("h{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("h{i}")))
                .arg("--on")
                .arg(format!("orders.*=file:{}", events.display()))
                .arg("--on")
                .arg(format!("_mesh.peer.joined=file:{}", joined.display()));
            last_start = SystemTime::now();
            peers.push(Peer::spawn(cmd));
        }
        Mesh {
            lan,
            peers,
            dir,
            last_start,
        }
    }

    fn events_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{i}.jsonl"))
    }

    /// `meshbus ARGS…` run inside host `i` (talking to its peer on the default API).
    fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.lan.command(i, bin()).args(args).output().unwrap()
    }

    fn peer_ids_seen_by(&self, i: usize) -> Vec<String> {
        peer_ids(&ok(self.cli(i, &["peers", "--json"])))
    }

    /// Waits until every peer lists every other; returns the time from the last start until
    /// the last peer saw its last neighbour (from the peers' own `_mesh.peer.joined` events).
    fn wait_full_mesh(&self) -> Duration {
        let n = self.peers.len();
        for i in 0..n {
            wait_until(T, &format!("h{i} to see {} peers", n - 1), || {
                self.peer_ids_seen_by(i).len() == n - 1
            });
        }
        for i in 0..n {
            let mut ids = self.peer_ids_seen_by(i);
            ids.sort();
            let mut expected: Vec<String> = (0..n)
                .filter(|j| *j != i)
                .map(|j| self.peers[j].peer_id.clone())
                .collect();
            expected.sort();
            assert_eq!(ids, expected, "h{i} sees exactly the other peers");
        }
        (0..n)
            .map(|i| {
                let joined = events_in(&self.dir.path().join(format!("h{i}.joined.jsonl")));
                let mut firsts: Vec<SystemTime> = Vec::new();
                let mut seen = BTreeSet::new();
                for e in &joined {
                    if seen.insert(e["data"]["peer"].as_str().unwrap().to_owned()) {
                        firsts.push(parse_time(&e["time"]));
                    }
                }
                assert_eq!(firsts.len(), n - 1, "h{i} joined events: {joined:#?}");
                firsts.into_iter().max().unwrap()
            })
            .max()
            .unwrap()
            .duration_since(self.last_start)
            .unwrap_or_default()
    }
}

fn parse_time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

/// Publishes one event from every peer's CLI and checks every handler table got all of them,
/// once each. Returns the publish-to-file-handler latency (p50, p99) over all peers, in µs.
fn every_event_everywhere(mesh: &Mesh) -> (u64, u64) {
    let n = mesh.peers.len();
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let out: Value = serde_json::from_str(&ok(mesh.cli(
            i,
            &[
                "publish",
                &format!("orders.from-h{i}"),
                r#"{"n":1}"#,
                "--json",
            ],
        )))
        .unwrap();
        assert_eq!(out["sent_to"], n - 1, "h{i} sent to every other peer");
        ids.insert(out["id"].as_str().unwrap().to_owned());
    }
    let mut p50 = 0;
    let mut p99 = 0;
    for i in 0..n {
        let events = wait_for_events(&mesh.events_file(i), n, T);
        let got: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got.len(), n, "h{i} got each event once: {events:#?}");
        assert_eq!(
            got.into_iter().collect::<BTreeSet<_>>(),
            ids,
            "h{i} got every event"
        );
        let status: Value = serde_json::from_str(&ok(mesh.cli(i, &["status", "--json"]))).unwrap();
        let latency = &handler(&status, "file:")["latency"];
        p50 = p50.max(latency["p50_us"].as_u64().unwrap());
        p99 = p99.max(latency["p99_us"].as_u64().unwrap());
    }
    (p50, p99)
}

fn lan_test(n: usize, test: &str) {
    if !netns_or_skip(test) {
        return;
    }
    let _one_at_a_time = one_lab_at_a_time();
    let mesh = Mesh::start(n);
    let formed = mesh.wait_full_mesh();
    let (p50, p99) = every_event_everywhere(&mesh);
    eprintln!(
        "{test}: {n} peers formed a full mesh {formed:?} after the last start; publish -> file handler: worst peer p50 {p50} us, p99 {p99} us"
    );
    // The mesh carries on when a peer goes away.
    let mut mesh = mesh;
    let gone = mesh.peers.pop().unwrap();
    let gone_id = gone.peer_id.clone();
    drop(gone);
    for i in 0..n - 1 {
        wait_until(T, &format!("h{i} to notice the peer left"), || {
            !mesh.peer_ids_seen_by(i).contains(&gone_id)
        });
    }
    let out: Value =
        serde_json::from_str(&ok(mesh.cli(0, &["publish", "orders.after", "1", "--json"])))
            .unwrap();
    for i in 0..n - 1 {
        let events = wait_for_events(&mesh.events_file(i), n + 1, T);
        assert_eq!(
            events[n]["id"], out["id"],
            "h{i} got the event published after the loss"
        );
    }
}

#[test]
fn three_peers_on_a_lan_discover_each_other_and_every_handler_table_gets_every_event() {
    lan_test(3, "lan-3");
}

#[test]
fn eight_peers_form_a_full_mesh_and_every_peer_gets_every_other_peers_event() {
    lan_test(8, "lan-8");
}

#[test]
fn the_lab_leaves_nothing_behind() {
    if !netns_or_skip("lan-cleanup") {
        return;
    }
    let lan = VirtualLan::create(2).unwrap();
    let names: Vec<String> = lan
        .hosts()
        .iter()
        .map(|h| h.netns.clone())
        .chain([lan.bridge_netns()])
        .collect();
    let listed = meshbus::netns::ip(&["netns", "list"]).unwrap();
    assert!(names.iter().all(|n| listed.contains(n.as_str())));
    let mut sleeper = lan.command(0, "sleep").arg("600").spawn().unwrap();
    wait_in_netns(&names[0], sleeper.id());
    drop(lan);
    let listed = meshbus::netns::ip(&["netns", "list"]).unwrap();
    for n in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind"
        );
    }
    assert!(
        !sleeper.wait().unwrap().success(),
        "processes inside were killed"
    );
}
