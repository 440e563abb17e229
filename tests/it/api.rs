//! The HTTP API: what it refuses (invalid topics and patterns, oversized events, a whole
//! batch with one bad entry, a port in use) and how it says so, and batch publishes in order.

use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

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

#[test]
fn batch_publish_checks_every_entry_first_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let a = Peer::local(&["--on", &format!("batch.*=file:{}", path.display())]);
    let client = a.client();
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
