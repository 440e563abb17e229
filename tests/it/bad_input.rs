//! Bad input from users and from remote peers gets a clear answer and breaks nothing.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, SwarmBuilder};
use meshbus::wire::{WireBatch, WireEvent, VERSION};
use prost::Message as _;
use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn publish_with_no_running_peer_names_the_address_it_tried() {
    // Port 1 on loopback: nothing listens there.
    let out = Command::new(bin())
        .args(["publish", "orders.created", "1", "--api", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("no meshbus peer answers at 127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("meshbus up"), "{err}");

    let out = Command::new(bin())
        .args(["peers"])
        .env("MESHBUS_API", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("127.0.0.1:1"),
        "MESHBUS_API is honoured"
    );
}

#[test]
fn invalid_topics_and_patterns_are_refused_naming_the_rule() {
    let a = Peer::local(&[]);
    for (topic, rule) in [
        ("orders..created", "empty segment"),
        ("orders.*", "wildcard"),
        ("orders/created", "`/`"),
        ("_mesh.peer.joined", "reserved"),
    ] {
        let out = a.cli(&["publish", topic, "1"]);
        assert!(!out.status.success(), "{topic} was accepted");
        assert!(
            stderr_of(&out).contains(rule),
            "{topic}: {}",
            stderr_of(&out)
        );
    }
    let out = a.cli(&["tail", "orders.**.x"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("`**` may only be the last segment"));

    let err = up_fails(&["--api", "127.0.0.1:0", "--on", "orders.**.x=log"]);
    assert!(err.contains("`**` may only be the last segment"), "{err}");
    let err = up_fails(&["--api", "127.0.0.1:0", "--on", "orders.*=email:me"]);
    assert!(
        err.contains("expected one of: log, file:PATH, exec:COMMAND"),
        "{err}"
    );
}

#[test]
fn oversized_events_are_refused_naming_the_limit() {
    let a = Peer::local(&["--max-event-size", "1024"]);
    let out = a.cli(&["publish", "blobs.big", &"x".repeat(2000)]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("over the limit of 1024 bytes"), "{err}");
    assert!(err.contains("max_event_size"), "{err}");
    a.cli_ok(&["publish", "blobs.small", &"x".repeat(500)]);
    assert_eq!(a.status()["counters"]["published"], 1);

    let err = up_fails(&["--api", "127.0.0.1:0", "--max-event-size", "99999999"]);
    assert!(
        err.contains("max_event_size 99999999 is out of range"),
        "{err}"
    );
}

#[test]
fn a_second_peer_on_a_busy_api_port_says_so() {
    let a = Peer::local(&[]);
    let api = a.api.unwrap().to_string();
    let err = up_fails(&["--api", &api]);
    assert!(err.contains(&api) && err.contains("--api"), "{err}");
}

fn wire_event(topic: &str, data: &[u8]) -> WireEvent {
    WireEvent {
        id: uuid::Uuid::now_v7().as_bytes().to_vec(),
        topic: topic.into(),
        r#type: String::new(),
        seq: 1,
        time_unix_micros: 0,
        content_type: String::new(),
        data: data.to_vec().into(),
    }
}

fn payload(events: Vec<WireEvent>) -> Vec<u8> {
    let mut out = vec![VERSION];
    WireBatch { events }.encode(&mut out).unwrap();
    out
}

/// A hand-built libp2p peer that speaks gossipsub and publishes whatever bytes it is given.
async fn rogue_publish(target: Multiaddr, payloads: Vec<Vec<u8>>) {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default().build().unwrap();
            gossipsub::Behaviour::<
                gossipsub::IdentityTransform,
                gossipsub::AllowAllSubscriptionFilter,
            >::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)
            .unwrap()
        })
        .unwrap()
        .build();
    let topic = IdentTopic::new(meshbus::node::MESH_TOPIC);
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
    let target = Peer::local(&["--max-event-size", "1024", "--on", &on]);
    let addr: Multiaddr = target.tcp_addr().parse().unwrap();

    let payloads = vec![
        vec![0xff, 1, 2],                // unknown version
        vec![VERSION, 0x0a, 0xff, 0xff], // not protobuf
        payload(vec![
            wire_event("orders..bad", b"1"),         // invalid topic
            wire_event("orders.ok", b"1"),           // the one good event
            wire_event("_mesh.peer.joined", b"{}"),  // spoofed mesh event
            wire_event("orders.big", &[b'1'; 2000]), // over the target's limit
        ]),
    ];
    rogue_publish(addr, payloads).await;

    let counters = tokio::task::spawn_blocking(move || {
        let counters = wait_for(T, "the target to count the bad input", || {
            let c = target.status()["counters"].clone();
            (c["messages_received"] == 3).then_some(c)
        });
        // The peer is not wedged: a normal peer's event still gets through.
        let friend = Peer::local(&["--peer", target.tcp_addr()]);
        wait_until(T, "friend connected", || {
            target.peer_ids().contains(&friend.peer_id)
        });
        friend.cli_ok(&["publish", "orders.after", "1"]);
        (counters, wait_for_events(&file, 2, T), target)
    })
    .await
    .unwrap();
    let (counters, events, _target) = counters;
    assert_eq!(counters["messages_malformed"], 2, "{counters:#}");
    assert_eq!(counters["events_rejected"], 3, "{counters:#}");
    assert_eq!(counters["received"], 1, "{counters:#}");
    let topics: Vec<&str> = events
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["orders.ok", "orders.after"]);
}

#[test]
fn slow_failing_and_chatty_handlers_do_not_hold_up_other_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fast.jsonl");
    let pids = dir.path().join("pids");
    let a = Peer::local(&[
        "--exec-timeout",
        "2",
        "--on",
        &format!("jobs.*=exec:echo $$ >> {}; sleep 60", pids.display()),
        "--on",
        "jobs.*=exec:echo failing >&2; exit 3",
        "--on",
        "jobs.*=exec:head -c 5000000 /dev/zero",
        "--on",
        &format!("jobs.*=file:{}", file.display()),
    ]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let out: Value =
            serde_json::from_str(&a.cli_ok(&["publish", &format!("jobs.n{i}"), "1", "--json"]))
                .unwrap();
        ids.push(out["id"].as_str().unwrap().to_owned());
    }
    // The file handler finishes all three while the hanging one is still at work.
    wait_for_events(&file, 3, T);
    let status = a.status();
    // Had the file row waited behind the hanging one, the hanging one would be done with
    // all three (each takes its full 2 s timeout) before the file row wrote its last.
    let hanging = handler(&status, "exec:echo $$");
    let hung_done = hanging["succeeded"].as_u64().unwrap() + hanging["failed"].as_u64().unwrap();
    assert!(hung_done < 3, "{hanging:#}");

    wait_until(T, "every handler to finish", || {
        let s = a.status();
        handler(&s, "exec:echo $$")["failed"] == 3
            && handler(&s, "exec:echo failing")["failed"] == 3
            && handler(&s, "exec:head")["succeeded"] == 3
    });
    // Timeouts kill the whole process group.
    let groups: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(groups.len(), 3);
    wait_until(T, "hung handlers killed", || {
        groups.iter().all(|g| !group_alive(*g))
    });
    // Failures are logged with the event id.
    for id in &ids {
        let line = a.stderr.wait_for_line(id, T);
        assert!(line.contains("handler failed"), "{line}");
    }
    let logs = a.stderr.all().join("\n");
    assert!(
        logs.contains("exited with exit status: 3") && logs.contains("failing"),
        "{logs}"
    );
    assert!(logs.contains("still running after 2s"), "{logs}");
}
