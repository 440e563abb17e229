//! Peers that leave and peers that lie: a peer stopping on SIGTERM is noticed, and malformed
//! or hostile messages from a hand-built libp2p peer are dropped and counted while the target
//! carries on. (Killed, restarted and unplugged peers on a virtual LAN: `lab/tests/`.)

use std::time::Duration;

use futures::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, SwarmBuilder};
use meshbus::wire::{WireBatch, WireEvent, VERSION};
use prost::Message as _;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_peer_stops_cleanly_on_sigterm_and_the_other_notices() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || a.peer_ids().len() == 1);
    let status = b.stop();
    assert!(status.success(), "exit status {status}");
    wait_until(T, "a sees b gone", || a.peer_ids().is_empty());
}

/// The `_mesh.peer.*` events a peer's file row recorded about `peer`, by topic.
fn membership_of(file: &std::path::Path, peer: &str) -> Vec<String> {
    events_in(file)
        .iter()
        .filter(|e| e["data"]["peer"] == peer)
        .map(|e| e["topic"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn membership_travels_past_direct_connections() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("left.jsonl");
    let on = format!("_mesh.peer.*=file:{}", file.display());
    // A line: left and the two far peers connect only to the middle one.
    let middle = Peer::local(&[]);
    let left = Peer::local(&["--on", &on, "--peer", middle.tcp_addr()]);
    let killed = Peer::local(&["--name", "killed", "--peer", middle.tcp_addr()]);
    let stopped = Peer::local(&["--name", "stopped", "--peer", middle.tcp_addr()]);
    wait_until(T, "left hears of both far peers over the mesh", || {
        let seen = left.peer_ids();
        seen.contains(&killed.peer_id) && seen.contains(&stopped.peer_id)
    });
    assert_eq!(
        left.connected_peer_ids(),
        std::slice::from_ref(&middle.peer_id)
    );
    let peers: Vec<serde_json::Value> =
        serde_json::from_str(&left.cli_ok(&["peers", "--json"])).unwrap();
    let far = peers
        .iter()
        .find(|p| p["peer_id"] == killed.peer_id.as_str())
        .unwrap();
    assert_eq!(far["name"], "killed");
    assert_eq!(far["connected_addrs"], serde_json::json!([]));
    wait_until(T, "left recorded both joins", || {
        membership_of(&file, &killed.peer_id) == ["_mesh.peer.joined"]
            && membership_of(&file, &stopped.peer_id) == ["_mesh.peer.joined"]
    });
    // And the far peers hear of left the same way.
    wait_until(T, "a far peer hears of left", || {
        killed.peer_ids().contains(&left.peer_id)
    });

    // A clean stop is a goodbye that travels too; a kill is found by silence.
    let stopped_id = stopped.peer_id.clone();
    assert!(stopped.stop().success());
    wait_until(T, "left heard the goodbye", || {
        membership_of(&file, &stopped_id) == ["_mesh.peer.joined", "_mesh.peer.left"]
    });
    killed.signal(nix::sys::signal::Signal::SIGKILL);
    wait_until(T, "left found the killed peer failed", || {
        membership_of(&file, &killed.peer_id) == ["_mesh.peer.joined", "_mesh.peer.failed"]
    });
    assert_eq!(left.peer_ids(), std::slice::from_ref(&middle.peer_id));
    assert_eq!(left.status()["counters"]["presence_refused"], 0);
}

fn wire_event(topic: &str, data: &[u8]) -> WireEvent {
    WireEvent {
        id: uuid::Uuid::now_v7().as_bytes().to_vec(),
        topic: topic.into(),
        r#type: String::new(),
        seq: 1,
        epoch: 1,
        time_unix_micros: 0,
        content_type: String::new(),
        data: data.to_vec().into(),
    }
}

fn payload(events: Vec<WireEvent>) -> Vec<u8> {
    let mut out = vec![VERSION];
    WireBatch {
        events,
        presence: None,
    }
    .encode(&mut out)
    .unwrap();
    out
}

/// A hand-built libp2p peer that speaks gossipsub and publishes whatever bytes it is given.
async fn rogue_publish(target: Multiaddr, payloads: Vec<Vec<u8>>) {
    rogue(target, payloads, true).await
}

/// A hand-built gossipsub peer connected to `target` and subscribed with it.
async fn rogue_swarm(
    target: Multiaddr,
    signed: bool,
) -> (
    libp2p::Swarm<
        gossipsub::Behaviour<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>,
    >,
    IdentTopic,
) {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let (authenticity, mode) = if signed {
                (
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossipsub::ValidationMode::Strict,
                )
            } else {
                (
                    gossipsub::MessageAuthenticity::Anonymous,
                    gossipsub::ValidationMode::Anonymous,
                )
            };
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(mode)
                .message_id_fn(|m| {
                    use std::hash::{Hash as _, Hasher as _};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    m.data.hash(&mut h);
                    gossipsub::MessageId::from(h.finish().to_string())
                })
                .max_transmit_size(1 << 20)
                .build()
                .unwrap();
            gossipsub::Behaviour::<
                gossipsub::IdentityTransform,
                gossipsub::AllowAllSubscriptionFilter,
            >::new(authenticity, config)
            .unwrap()
        })
        .unwrap()
        .build();
    let topic = IdentTopic::new(meshbus::proto::MESH_TOPIC);
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    swarm.dial(target).unwrap();
    tokio::time::timeout(T, async {
        loop {
            if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) =
                swarm.select_next_some().await
            {
                break;
            }
        }
    })
    .await
    .expect("the target subscribes to the mesh topic");
    (swarm, topic)
}

/// [`rogue_publish`], its messages signed or not (unsigned ones break meshbus's rule that
/// every message is signed by its author).
async fn rogue(target: Multiaddr, payloads: Vec<Vec<u8>>, signed: bool) {
    let (mut swarm, topic) = rogue_swarm(target, signed).await;
    for p in payloads {
        swarm.behaviour_mut().publish(topic.clone(), p).unwrap();
    }
    // Keep the connection served while the messages go out; the test waits on the target.
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_from_the_network_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("target.jsonl");
    let on = format!("**=file:{}", file.display());
    let target = Peer::local(&["--open", "--max-event-size", "1024", "--on", &on]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();

    // The good batch first: after three invalid messages the sender is graylisted (and then
    // banned), so nothing it sends later is even looked at.
    let payloads = vec![
        payload(vec![
            wire_event("orders..bad", b"1"),         // invalid topic
            wire_event("orders.ok", b"1"),           // the one good event
            wire_event("_mesh.peer.joined", b"{}"),  // spoofed mesh event
            wire_event("orders.big", &[b'1'; 2000]), // over the target's limit
            WireEvent {
                time_unix_micros: 4_102_444_800_000_000, // 2100, far ahead of any clock
                ..wire_event("orders.future", b"1")
            },
        ]),
        vec![0xff, 1, 2],                // unknown version
        vec![VERSION, 0x0a, 0xff, 0xff], // not protobuf
        payload(vec![]),                 // a batch of no events
    ];
    rogue_publish(addr, payloads).await;

    let counters = tokio::task::spawn_blocking(move || {
        let counters = wait_for(T, "the target to count the bad input", || {
            let c = target.status()["counters"].clone();
            (c["messages_received"] == 4).then_some(c)
        });
        // Three invalid messages in a row: the sender is disconnected and banned.
        wait_until(T, "the rogue banned", || {
            target.status()["counters"]["peers_banned"] == 1 && target.peer_ids().is_empty()
        });
        // The peer is not wedged: a normal peer's event still gets through.
        let friend = Peer::local(&["--open", "--peer", target.tcp_addr()]);
        wait_until(T, "friend connected", || {
            target.peer_ids().contains(&friend.peer_id)
        });
        friend.cli_ok(&["publish", "orders.after", "1"]);
        (counters, wait_for_events(&file, 2, T), target)
    })
    .await
    .unwrap();
    let (counters, events, _target) = counters;
    assert_eq!(counters["messages_malformed"], 3, "{counters:#}");
    assert_eq!(counters["events_rejected"], 4, "{counters:#}");
    assert_eq!(counters["received"], 1, "{counters:#}");
    let topics: Vec<&str> = events
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["orders.ok", "orders.after"]);
}

fn presence(seq: u64, every_ms: u32) -> Vec<u8> {
    presence_with(seq, every_ms, Vec::new())
}

fn presence_with(
    seq: u64,
    every_ms: u32,
    groups: Vec<meshbus::node::repair::GroupAnnounce>,
) -> Vec<u8> {
    let mut out = vec![VERSION];
    WireBatch {
        events: Vec::new(),
        presence: Some(meshbus::wire::WirePresence {
            seq,
            agent: "meshbus/0.0.0 (rogue)".into(),
            every_ms,
            leaving: false,
            groups,
        }),
    }
    .encode(&mut out)
    .unwrap();
    out
}

/// A presence whose groups break a rule is refused whole: its sender does not become a
/// member by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_with_a_bad_group_is_refused_whole() {
    let target = Peer::local(&["--open"]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();
    let bad = meshbus::node::repair::GroupAnnounce {
        name: "no spaces".into(),
        since: 0,
        marks: Vec::new(),
        shape: 0,
    };
    rogue_publish(addr, vec![presence_with(1, 1000, vec![bad])]).await;
    tokio::task::spawn_blocking(move || {
        let counters = wait_for(T, "the target to take the message", || {
            let c = target.status()["counters"].clone();
            (c["messages_received"] == 1).then_some(c)
        });
        assert_eq!(counters["groups_refused"], 1, "{counters:#}");
        assert!(target.peer_ids().is_empty(), "the rogue is no member");
    })
    .await
    .unwrap();
}

/// A member that floods the mesh with its presence, or says what no peer says, is counted
/// and not believed; it cannot make the target relay the flood or take a bound it breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_presence_and_presence_out_of_bounds_are_refused_and_counted() {
    let target = Peer::local(&["--open"]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();
    // One good presence, then 99 more at once (over the burst of 20), then one that
    // announces every 5 ms.
    let mut payloads: Vec<Vec<u8>> = (1..=100).map(|seq| presence(seq, 1000)).collect();
    payloads.push(presence(101, 5));
    rogue_publish(addr, payloads).await;
    tokio::task::spawn_blocking(move || {
        let counters = wait_for(T, "the target to take all 101 messages", || {
            let c = target.status()["counters"].clone();
            (c["messages_received"] == 101).then_some(c)
        });
        // The first and the burst after it are taken; the rest of the flood and the
        // out-of-bounds one are refused (the flood merely ignored: the sender is not banned
        // for being fast).
        let refused = counters["presence_refused"].as_u64().unwrap();
        assert!((70..=81).contains(&refused), "{counters:#}");
        assert_eq!(counters["peers_banned"], 0, "{counters:#}");
        // It is a member, known by the name in its presence.
        let peers: Vec<serde_json::Value> =
            serde_json::from_str(&target.cli_ok(&["peers", "--json"])).unwrap();
        assert!(peers.iter().any(|p| p["name"] == "rogue"), "{peers:#?}");
        // Logged a few times, not once per message.
        let warnings = target
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains("refused a peer's presence"))
            .count();
        assert!((1..=10).contains(&warnings), "{warnings}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unsigned_messages_gets_its_sender_banned_with_a_few_log_lines() {
    let target = Peer::local(&["--open"]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();
    let payloads = (0..5000u32)
        .map(|i| payload(vec![wire_event("orders.x", i.to_string().as_bytes())]))
        .collect();
    rogue(addr, payloads, false).await;
    tokio::task::spawn_blocking(move || {
        wait_until(T, "the sender banned", || {
            target.status()["counters"]["peers_banned"] == 1
        });
        let counters = target.status()["counters"].clone();
        assert_eq!(counters["received"], 0, "{counters:#}");
        let warnings = target
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains("WARN"))
            .count();
        assert!(
            warnings < 30,
            "{warnings} WARN lines: {:#?}",
            target.stderr.all()
        );
        // The ban is logged once, naming the peer and why.
        let bans: Vec<String> = target
            .stderr
            .all()
            .into_iter()
            .filter(|l| l.contains("banned a peer"))
            .collect();
        assert_eq!(bans.len(), 1, "{bans:#?}");
        assert!(bans[0].contains("invalid messages"), "{}", bans[0]);
    })
    .await
    .unwrap();
}

/// Publishes valid one-event messages at `target` as fast as it can for `how_long`; returns
/// how many gossipsub took.
async fn flood(target: Multiaddr, how_long: Duration) -> u64 {
    let (mut swarm, topic) = rogue_swarm(target, true).await;
    let until = tokio::time::Instant::now() + how_long;
    let (mut seq, mut sent) = (1u64, 0u64);
    while tokio::time::Instant::now() < until {
        for _ in 0..200 {
            let event = WireEvent {
                seq,
                ..wire_event("orders.flood", b"1")
            };
            if swarm
                .behaviour_mut()
                .publish(topic.clone(), payload(vec![event]))
                .is_ok()
            {
                sent += 1;
            }
            seq += 1;
        }
        let _ = tokio::time::timeout(Duration::from_millis(2), async {
            loop {
                swarm.select_next_some().await;
            }
        })
        .await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_member_is_throttled_then_banned_and_the_target_stays_responsive() {
    // A limit this test's flooder outruns several times over on any machine.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "limits.toml",
        "[node]\nmax_messages_per_sec = 500\n",
    );
    let target = Peer::local(&["--open", "--config", &config]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();
    let before = rss_mb(target.pid());
    let flooding = tokio::spawn(flood(addr, Duration::from_secs(8)));
    let (target, slowest) = tokio::task::spawn_blocking(move || {
        // While the flood lasts, ask for status again and again.
        let mut slowest = Duration::ZERO;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(7) {
            let asked = std::time::Instant::now();
            target.cli_ok(&["status", "--json"]);
            slowest = slowest.max(asked.elapsed());
        }
        (target, slowest)
    })
    .await
    .unwrap();
    let sent = flooding.await.unwrap();
    eprintln!("flood: {sent} messages in 8 s; slowest status {slowest:?}");
    assert!(
        sent > 8 * 2 * 500,
        "the flood did not outrun the limit: {sent} messages"
    );
    tokio::task::spawn_blocking(move || {
        wait_until(T, "the flooder banned", || {
            let c = target.status()["counters"].clone();
            c["messages_throttled"].as_u64().unwrap_or(0) > 0 && c["peers_banned"] == 1
        });
        let throttle_lines = target
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains("over its rate"))
            .count();
        assert!(
            throttle_lines < 30,
            "{throttle_lines} lines about the flood"
        );
        let after = rss_mb(target.pid());
        assert!(
            after < before + 200,
            "memory grew from {before} MB to {after} MB"
        );
        // A status takes a CLI process start and an HTTP round trip; under the flood it
        // must still come back well within a second.
        assert!(
            slowest < Duration::from_secs(1),
            "slowest status {slowest:?}"
        );
    })
    .await
    .unwrap();
}
