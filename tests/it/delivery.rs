//! Every event reaches every handler table, exactly once: a line of peers on 127.0.0.1
//! driven through the CLI, and real mDNS on a virtual LAN of network namespaces built by the
//! lab (needs root; without it the LAN tests say so loudly and pass as skipped, unless
//! `MESHBUS_REQUIRE_NETNS=1`, as in CI, in which case they fail).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use meshbus_lab::Lab;
use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

/// How long the LAN tests wait for the mesh and for events.
const LAN_T: Duration = Duration::from_secs(30);

#[test]
fn three_peers_deliver_every_event_to_every_handler_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(format!("{name}.jsonl"));
    let on = |name: &str| format!("orders.*=file:{}", file(name).display());
    let a = Peer::local(&["--name", "a", "--on", &on("a")]);
    let b = Peer::local(&["--name", "b", "--peer", a.tcp_addr(), "--on", &on("b")]);
    // c knows only b: a's events reach it through b's forwarding.
    let c = Peer::local(&["--name", "c", "--peer", b.tcp_addr(), "--on", &on("c")]);
    wait_until(T, "a line a - b - c", || {
        a.peer_ids() == [b.peer_id.clone()]
            && c.peer_ids() == [b.peer_id.clone()]
            && b.peer_ids().len() == 2
    });

    // Topics first used now, long after the handlers were registered.
    let mut ids = BTreeSet::new();
    for (peer, topic) in [
        (&a, "orders.created"),
        (&b, "orders.shipped"),
        (&c, "orders.paid"),
    ] {
        let out: Value =
            serde_json::from_str(&peer.cli_ok(&["publish", topic, r#"{"id":42}"#, "--json"]))
                .unwrap();
        ids.insert(out["id"].as_str().unwrap().to_owned());
    }
    // Not matched by `orders.*`: must not show up.
    a.cli_ok(&["publish", "orders.created.eu", "1"]);
    a.cli_ok(&["publish", "users.created", "1"]);
    let last: Value =
        serde_json::from_str(&a.cli_ok(&["publish", "orders.created", "2", "--json"])).unwrap();
    ids.insert(last["id"].as_str().unwrap().to_owned());

    for name in ["a", "b", "c"] {
        let events = wait_for_events(&file(name), 4, T);
        let got: BTreeSet<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            got, ids,
            "peer {name} got every orders.* event exactly once"
        );
        assert_eq!(events.len(), 4, "peer {name}: {events:#?}");
        for e in &events {
            assert_eq!(e["specversion"], "1.0");
            assert!(e["topic"].as_str().unwrap().starts_with("orders."));
        }
    }
    let from_a: Vec<u64> = events_in(&file("c"))
        .iter()
        .filter(|e| e["source"] == a.peer_id.as_str())
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        from_a,
        [1, 4],
        "a's sequence numbers count every event it published"
    );
}

/// A lab with a `meshbus up` (mDNS on) on every host and a file handler for `orders.*` on
/// every peer, taken down when dropped.
struct LanMesh {
    lab: Lab,
    /// The lab's state, data directories and logs.
    root: tempfile::TempDir,
}

impl LanMesh {
    /// Starts `n` peers and waits for the full mesh; returns the mesh and the time from the
    /// last start until the last peer saw its last neighbour (from the peers' own
    /// `_mesh.peer.joined` events).
    fn start(n: usize) -> (LanMesh, Duration) {
        let root = tempfile::tempdir().unwrap();
        let extra = ["--quiet", "--on", "orders.*=file:{data}/orders.jsonl"];
        let (lab, formed) = Lab::up(
            root.path(),
            &meshbus_lab::netns::unique_prefix(),
            n,
            bin(),
            extra.map(str::to_owned).to_vec(),
            LAN_T,
        )
        .expect("a full mesh on the virtual LAN");
        (LanMesh { lab, root }, formed)
    }

    fn len(&self) -> usize {
        self.lab.state.hosts.len()
    }

    fn peer_id(&self, i: usize) -> String {
        self.lab.state.hosts[i]
            .peer_id
            .clone()
            .expect("a started peer")
    }

    fn events_file(&self, i: usize) -> PathBuf {
        self.lab.data_dir(i).join("orders.jsonl")
    }

    /// `meshbus ARGS…` run inside host `i` (talking to its peer).
    fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.lab.cli(i, args).unwrap()
    }

    fn peer_ids_seen_by(&self, i: usize) -> Vec<String> {
        peer_ids(&ok(self.cli(i, &["peers", "--json"])))
    }

    /// What `Lab::up` waited for, checked here too: every peer lists exactly every other, and
    /// its `_mesh.peer.joined` handler recorded each of them.
    fn assert_full_mesh(&self) {
        let n = self.len();
        for i in 0..n {
            let mut ids = self.peer_ids_seen_by(i);
            ids.sort();
            let mut expected: Vec<String> = (0..n)
                .filter(|j| *j != i)
                .map(|j| self.peer_id(j))
                .collect();
            expected.sort();
            assert_eq!(ids, expected, "h{i} sees exactly the other peers");
            let joined = events_in(&self.lab.joined_file(i));
            let mut seen = BTreeSet::new();
            for e in &joined {
                humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap();
                seen.insert(e["data"]["peer"].as_str().unwrap().to_owned());
            }
            assert_eq!(seen.len(), n - 1, "h{i} joined events: {joined:#?}");
        }
    }
}

impl Drop for LanMesh {
    fn drop(&mut self) {
        let _ = meshbus_lab::down(self.root.path(), &self.lab.state.prefix);
    }
}

/// Publishes one event from every peer's CLI and checks every handler table got all of them,
/// once each. Returns the publish-to-file-handler latency (p50, p99) over all peers, in µs.
fn every_event_everywhere(mesh: &LanMesh) -> (u64, u64) {
    let n = mesh.len();
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
        let events = wait_for_events(&mesh.events_file(i), n, LAN_T);
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
    let (mut mesh, formed) = LanMesh::start(n);
    mesh.assert_full_mesh();
    let (p50, p99) = every_event_everywhere(&mesh);
    eprintln!(
        "{test}: {n} peers formed a full mesh {formed:?} after the last start; publish -> file handler: worst peer p50 {p50} us, p99 {p99} us"
    );
    // The mesh carries on when a peer goes away.
    let gone_id = mesh.peer_id(n - 1);
    mesh.lab.kill(n - 1).unwrap();
    for i in 0..n - 1 {
        wait_until(LAN_T, &format!("h{i} to notice the peer left"), || {
            !mesh.peer_ids_seen_by(i).contains(&gone_id)
        });
    }
    let out: Value =
        serde_json::from_str(&ok(mesh.cli(0, &["publish", "orders.after", "1", "--json"])))
            .unwrap();
    for i in 0..n - 1 {
        let events = wait_for_events(&mesh.events_file(i), n + 1, LAN_T);
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
