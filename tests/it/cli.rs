//! Real peers in the host namespace (no mDNS, explicit `--peer` on 127.0.0.1), driven
//! through the CLI.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

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

#[test]
fn publish_prints_the_event_id_and_how_many_peers_it_reached() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || {
        a.peer_ids() == [b.peer_id.clone()]
    });

    let json: Value =
        serde_json::from_str(&a.cli_ok(&["publish", "orders.created", r#"{"id":42}"#, "--json"]))
            .unwrap();
    assert_eq!(json["sent_to"], 1);
    assert_eq!(json["seq"], 1);
    let id = json["id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");

    let line = a.cli_ok(&["publish", "orders.created", "plain words"]);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 7, "{line}");
    assert_eq!(words[0].len(), 36);
    assert_eq!(&words[1..5], ["sent", "to", "1", "peer"], "{line}");

    let alone = Peer::local(&[]);
    let line = alone.cli_ok(&["publish", "orders.created"]);
    assert!(line.contains("sent to 0 peers"), "{line}");
}

#[test]
fn publish_reads_data_from_stdin_and_takes_json_or_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let a = Peer::local(&["--on", &format!("**=file:{}", path.display())]);
    let api = a.api.unwrap().to_string();
    let mut child = Command::new(bin())
        .args(["publish", "notes.added", "-", "--api", &api])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"from\": \"stdin\"}\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    a.cli_ok(&["publish", "notes.added", "just text", "--type", "note.v1"]);
    let events = wait_for_events(&path, 2, T);
    assert_eq!(events[0]["data"]["from"], "stdin");
    assert_eq!(events[0]["datacontenttype"], "application/json");
    assert_eq!(events[0]["type"], "notes.added");
    assert_eq!(events[1]["data"], "just text");
    assert_eq!(events[1]["datacontenttype"], "text/plain");
    assert_eq!(events[1]["type"], "note.v1");
}

#[test]
fn tail_streams_matching_events_and_exits_after_count() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || {
        b.peer_ids() == [a.peer_id.clone()]
    });
    let api = b.api.unwrap().to_string();
    let tail = |json: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["tail", "orders.*", "--count", "2", "--api", &api]);
        if json {
            cmd.arg("--json");
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (json_tail, line_tail) = (tail(true), tail(false));
    wait_until(T, "both tails subscribed", || {
        b.status()["subscribers"] == 2
    });

    a.cli_ok(&["publish", "users.created", "1"]);
    a.cli_ok(&["publish", "orders.created", r#"{"id":1}"#]);
    b.cli_ok(&["publish", "orders.shipped", "boxed"]);

    let out = ok(json_tail.wait_with_output().unwrap());
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["topic"], "orders.created");
    assert_eq!(events[0]["data"]["id"], 1);
    assert_eq!(events[0]["source"], a.peer_id.as_str());
    assert_eq!(events[1]["topic"], "orders.shipped");
    assert_eq!(events[1]["source"], b.peer_id.as_str());

    let out = ok(line_tail.wait_with_output().unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("orders.created") && lines[0].ends_with(r#"{"id":1}"#),
        "{out}"
    );
    assert!(
        lines[1].contains("orders.shipped") && lines[1].ends_with("boxed"),
        "{out}"
    );
}

#[test]
fn exec_handlers_get_the_event_on_stdin_and_in_their_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let exec = format!(
        "orders.*=exec:cat > {d}/$MESHBUS_EVENT_ID.json && env | grep ^MESHBUS_ | sort > {d}/$MESHBUS_EVENT_ID.env"
    );
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr(), "--on", &exec]);
    wait_until(T, "a and b connected", || a.peer_ids().len() == 1);
    let out: Value = serde_json::from_str(&a.cli_ok(&[
        "publish",
        "orders.created",
        r#"{"id":7}"#,
        "--type",
        "order.v1",
        "--json",
    ]))
    .unwrap();
    let id = out["id"].as_str().unwrap();
    let env_file = dir.path().join(format!("{id}.env"));
    let env = wait_for(T, "the exec handler's output", || {
        std::fs::read_to_string(&env_file)
            .ok()
            .filter(|s| s.contains("MESHBUS_TOPIC"))
    });
    let stdin: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(stdin["id"], id);
    assert_eq!(stdin["data"]["id"], 7);
    for expected in [
        format!("MESHBUS_EVENT_ID={id}"),
        "MESHBUS_EVENT_TYPE=order.v1".to_owned(),
        format!("MESHBUS_SOURCE={}", a.peer_id),
        "MESHBUS_TOPIC=orders.created".to_owned(),
    ] {
        assert!(env.lines().any(|l| l == expected), "{expected} in {env}");
    }
    drop(b);
}

#[test]
fn peers_status_and_handlers_show_the_mesh() {
    let a = Peer::local(&["--name", "alpha"]);
    let b = Peer::local(&["--name", "beta", "--peer", a.tcp_addr(), "--on", "x.*=log"]);
    wait_until(T, "a and b connected", || {
        a.peer_ids() == [b.peer_id.clone()]
    });

    let peers: Vec<Value> = serde_json::from_str(&a.cli_ok(&["peers", "--json"])).unwrap();
    assert_eq!(peers[0]["name"], "beta");
    assert!(!peers[0]["connected_addrs"].as_array().unwrap().is_empty());
    assert!(peers[0]["listen_addrs"][0]
        .as_str()
        .unwrap()
        .starts_with("/ip4/127.0.0.1/tcp/"));
    let text = a.cli_ok(&["peers"]);
    assert!(text.contains(&b.peer_id) && text.contains("beta"), "{text}");

    b.cli_ok(&["publish", "x.y", "1"]);
    wait_until(T, "a counts the event", || {
        a.status()["counters"]["received"] == 1
    });
    let status = b.status();
    assert_eq!(status["peer_id"], b.peer_id.as_str());
    assert_eq!(status["name"], "beta");
    assert_eq!(status["peers"], 1);
    assert_eq!(status["counters"]["published"], 1);
    assert_eq!(status["mdns"], false);
    wait_until(T, "b's log handler ran", || {
        handler(&b.status(), "log")["succeeded"] == 1
    });
    assert!(b.stdout.wait_for_line("x.y", T).ends_with(" 1"));
    let text = b.cli_ok(&["status"]);
    assert!(text.contains("1 published"), "{text}");
    let rows = b.cli_ok(&["handlers"]);
    assert!(rows.contains("x.*") && rows.contains("log"), "{rows}");
}

#[test]
fn a_peer_stops_cleanly_on_sigterm_and_the_other_notices() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || a.peer_ids().len() == 1);
    let status = b.stop();
    assert!(status.success(), "exit status {status}");
    wait_until(T, "a sees b gone", || a.peer_ids().is_empty());
}

#[test]
fn batch_publish_checks_every_entry_first_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let a = Peer::local(&["--on", &format!("batch.*=file:{}", path.display())]);
    let client = meshbus::client::Client::new(a.api.unwrap());
    let request = |topic: &str, n: u32| meshbus::api::PublishRequest {
        topic: topic.into(),
        data: Some(serde_json::value::to_raw_value(&n).unwrap()),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bad = vec![request("batch.a", 1), request("batch..b", 2)];
    let err = runtime.block_on(client.publish_batch(&bad)).unwrap_err();
    assert!(
        err.to_string().contains("event 1") && err.to_string().contains("empty segment"),
        "{err}"
    );
    assert_eq!(
        a.status()["counters"]["published"],
        0,
        "nothing of a bad batch is published"
    );

    let good: Vec<_> = (0..300).map(|n| request("batch.n", n)).collect();
    let published = runtime.block_on(client.publish_batch(&good)).unwrap();
    let seqs: Vec<u64> = published.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    let events = wait_for_events(&path, 300, T);
    let data: Vec<u64> = events.iter().map(|e| e["data"].as_u64().unwrap()).collect();
    assert_eq!(
        data,
        (0..300).collect::<Vec<_>>(),
        "handled in publish order"
    );
}
