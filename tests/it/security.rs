//! The mesh's rules against its own members: a publisher's events on a topic the ACL does
//! not give it are refused by the first peer that hears them, counted there, and go no
//! further.

use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_forbidden_event_stops_at_the_first_receiver_and_is_counted_there() {
    let dir = tempfile::tempdir().unwrap();
    // The publisher holds no rules (a misconfigured or hostile member)...
    let publisher = Peer::local(&[]);
    // ...the others allow it `orders.**` only.
    let rules = format!(
        "[[acl]]\npeers = [\"{}\"]\npublish = [\"orders.**\"]\n",
        publisher.peer_id
    );
    let config = write_config(dir.path(), "acl.toml", &rules);
    let file = |name: &str| dir.path().join(format!("{name}.jsonl"));
    let on = |name: &str| format!("**=file:{}", file(name).display());
    let relay = Peer::local(&[
        "--config",
        &config,
        "--on",
        &on("relay"),
        "--peer",
        publisher.tcp_addr(),
    ]);
    // The far peer hears the publisher only through the relay.
    let far = Peer::local(&[
        "--config",
        &config,
        "--on",
        &on("far"),
        "--peer",
        relay.tcp_addr(),
    ]);
    wait_until(T, "the relay connected to both", || {
        relay.peer_ids().len() == 2
    });
    assert_eq!(
        far.connected_peer_ids(),
        std::slice::from_ref(&relay.peer_id)
    );

    publisher.cli_ok(&["publish", "billing.charge", "1"]);
    publisher.cli_ok(&["publish", "orders.created", "2"]);
    for name in ["relay", "far"] {
        let events = wait_for_events(&file(name), 1, T);
        let topics: Vec<&str> = events
            .iter()
            .map(|e| e["topic"].as_str().unwrap())
            .collect();
        assert_eq!(topics, ["orders.created"], "{name}");
    }
    let counters = |p: &Peer| p.status()["counters"].clone();
    wait_until(T, "the relay counts the forbidden event", || {
        counters(&relay)["events_forbidden"] == 1
    });
    assert_eq!(
        counters(&far)["events_forbidden"],
        0,
        "it was not forwarded"
    );
    // What the ACL forbids a peer, it is told at once when it tries to publish it itself.
    let out = relay.cli(&["publish", "orders.created", "3"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("(403)") && err.contains("may not publish on orders.created"),
        "{err}"
    );
}

#[test]
fn silent_connections_cannot_exhaust_a_peers_sockets() {
    let peer = Peer::local(&[]);
    let before = peer.open_files();
    let port: u16 = peer.tcp_addr().split('/').nth(4).unwrap().parse().unwrap();
    // Many connections that never say a word (the attack that once ran a peer out of files).
    let silent: Vec<std::net::TcpStream> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(silent.len() >= 300, "{} connected", silent.len());
    // The peer holds at most its pending bound of them and answers its API.
    let holding = peer.open_files();
    assert!(
        holding <= before + meshbus::node::MAX_PENDING as usize + 16,
        "{before} files before, {holding} with {} silent connections",
        silent.len()
    );
    peer.cli_ok(&["status"]);
    // Silent connections are dropped after the handshake timeout.
    wait_until(T, "the silent connections closed", || {
        peer.open_files() <= before + 4
    });
    drop(silent);
    // And a member still gets in.
    let member = Peer::local(&["--peer", peer.tcp_addr()]);
    wait_until(T, "the member connected", || {
        peer.peer_ids() == [member.peer_id.clone()]
    });
}

#[test]
fn many_large_batches_at_once_are_read_a_few_at_a_time() {
    // Ten ~28 MB batches at once. Each ends with a bad topic, so it is read and parsed whole,
    // then refused, and what it leaves behind is only what reading it took: all ten read at
    // once took ten bodies and their parses (10 × 30 MB once took a peer from 98 MB to
    // 441 MB); one at a time, one.
    let peer = Peer::local(&[]);
    let before = rss_mb(peer.pid());
    let data = serde_json::value::to_raw_value(&"x".repeat(4000)).unwrap();
    let mut batch: Vec<meshbus::api::PublishRequest> = (0..7000)
        .map(|_| meshbus::api::PublishRequest {
            topic: "bulk.load".into(),
            data: Some(data.clone()),
            ..Default::default()
        })
        .collect();
    batch.push(meshbus::api::PublishRequest {
        topic: "bad..topic".into(),
        ..Default::default()
    });
    let batch = std::sync::Arc::new(batch);
    let senders: Vec<_> = (0..10)
        .map(|_| {
            let (client, batch) = (peer.client(), batch.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(client.publish_batch(&batch))
            })
        })
        .collect();
    let mut peak = before;
    while senders.iter().any(|s| !s.is_finished()) {
        peak = peak.max(rss_mb(peer.pid()));
        std::thread::sleep(std::time::Duration::from_millis(20)); // sampling, not waiting
    }
    for sender in senders {
        match sender.join().unwrap() {
            Err(meshbus::api::ClientError::Refused {
                status: 400,
                message,
            }) => {
                assert!(message.contains("event 7000"), "{message}")
            }
            other => panic!("expected the batch refused for its last event: {other:?}"),
        }
    }
    eprintln!("ten 28 MB batches at once: {before} MB before, {peak} MB at the peak");
    assert!(
        peak < before + 150,
        "memory rose from {before} MB to {peak} MB with ten batches in flight"
    );
}
