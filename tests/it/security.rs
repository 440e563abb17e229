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
    assert_eq!(far.peer_ids(), std::slice::from_ref(&relay.peer_id));

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
