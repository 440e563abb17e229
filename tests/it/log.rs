//! The event log from the library: handler rows resume after a restart without repeating,
//! `replay` runs them again over recent history (their patterns only), and a row slower than
//! its publisher lags and catches up without dropping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbus::handlers::{Action, HandlerSpec, RowOptions};
use meshbus::{Config, Event, Keypair, Node, Pattern, Payload};

const T: Duration = Duration::from_secs(30);

fn config(dir: &std::path::Path, key: &Keypair) -> Config {
    Config {
        keypair: Some(key.clone()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        data_dir: Some(dir.to_owned()),
        mesh: meshbus::Mesh::Keys(crate::support::MESH.clone()),
        ..Config::default()
    }
}

/// A named row on `pattern` that records the topic and seq of what it handles.
fn recorder(name: &str, pattern: &str, seen: Arc<Mutex<Vec<(String, u64)>>>) -> HandlerSpec {
    let action = Action::Rust(Arc::new(move |e: Arc<Event>| {
        let seen = seen.clone();
        Box::pin(async move {
            seen.lock().unwrap().push((e.topic.to_string(), e.seq));
            Ok(())
        })
    }));
    let mut spec = HandlerSpec::new(Pattern::new(pattern).unwrap(), action);
    spec.name = Some(name.into());
    spec
}

async fn wait_len(seen: &Arc<Mutex<Vec<(String, u64)>>>, n: usize) {
    tokio::time::timeout(T, async {
        while seen.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} events handled; got {:?}", seen.lock().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_resume_after_a_restart_and_replay_runs_them_again_for_their_patterns_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let seen = Arc::new(Mutex::new(Vec::new()));

    let node = Node::start(Config {
        handlers: vec![recorder("orders", "orders.**", seen.clone())],
        ..config(dir.path(), &key)
    })
    .await
    .unwrap();
    for topic in ["orders.a", "users.a", "orders.b", "users.b", "orders.c"] {
        node.publish(topic, None, Payload::text("x")).await.unwrap();
    }
    wait_len(&seen, 3).await;
    node.shutdown().await;
    let first: Vec<(String, u64)> = seen.lock().unwrap().drain(..).collect();
    assert_eq!(
        first,
        [
            ("orders.a".into(), 1),
            ("orders.b".into(), 3),
            ("orders.c".into(), 5)
        ]
    );

    // A restart goes on where the row stopped: nothing again, and numbering goes on.
    let node = Node::start(Config {
        handlers: vec![recorder("orders", "orders.**", seen.clone())],
        ..config(dir.path(), &key)
    })
    .await
    .unwrap();
    let p = node
        .publish("orders.d", None, Payload::text("x"))
        .await
        .unwrap();
    assert_eq!(p.seq, 6, "sequence numbers survive the restart");
    wait_len(&seen, 1).await;
    node.shutdown().await;
    assert_eq!(*seen.lock().unwrap(), [("orders.d".to_owned(), 6)]);
    seen.lock().unwrap().clear();

    // With a replay, the row runs again over the last hour: its four events, in order.
    let node = Node::start(Config {
        handlers: vec![recorder("orders", "orders.**", seen.clone())],
        replay: Some(Duration::from_secs(3600)),
        ..config(dir.path(), &key)
    })
    .await
    .unwrap();
    wait_len(&seen, 4).await;
    let status = node.status().await.unwrap();
    node.shutdown().await;
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, [1, 3, 5, 6]);
    assert_eq!(status.handlers[0].lag, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_slower_than_its_publisher_lags_and_ends_with_every_event_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let slow = Action::Rust(Arc::new(move |e: Arc<Event>| {
        let seen = recorded.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            seen.lock().unwrap().push((e.topic.to_string(), e.seq));
            Ok(())
        })
    }));
    let mut spec = HandlerSpec::new(Pattern::all(), slow);
    spec.name = Some("slow".into());
    spec.options = RowOptions {
        queue: Some(4),
        ..RowOptions::default()
    };
    let node = Node::start(Config {
        handlers: vec![spec],
        ..config(dir.path(), &key)
    })
    .await
    .unwrap();
    let n = 2_000;
    let batch = (0..n)
        .map(|_| ("load.x".to_owned(), None, Payload::text("x")))
        .collect();
    node.publish_many(batch).await.unwrap();
    let behind = node.handlers()[0].lag;
    assert!(
        behind > 4,
        "the row is behind by more than its queue: {behind}"
    );
    wait_len(&seen, n).await;
    let row = node.handlers()[0].clone();
    node.shutdown().await;
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "every event, in order"
    );
    assert_eq!((row.succeeded, row.skipped, row.lag), (n as u64, 0, 0));
}

/// A small tmpfs mounted for a test, unmounted when dropped; `None` (after saying so) where
/// mounting is not allowed, unless `MESHBUS_REQUIRE_NETNS=1` (CI, as root) makes it a failure.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(test: &str, size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            let reason = String::from_utf8_lossy(&out.stderr);
            assert!(
                std::env::var("MESHBUS_REQUIRE_NETNS").as_deref() != Ok("1"),
                "cannot mount a tmpfs for {test}: {reason}"
            );
            eprintln!("\n*** SKIPPED {test}: cannot mount a tmpfs ({reason}); run as root ***\n");
            return None;
        }
        Some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_publish_clearly_and_sends_nothing_it_could_not_store() {
    let Some(disk) = SmallDisk::mount("full-disk", "2m") else {
        return;
    };
    let key = Keypair::generate_ed25519();
    let a = Node::start(config(disk.dir.path(), &key)).await.unwrap();
    let a_addr = a.status().await.unwrap().listen_addrs[0].parse().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let b_dir = tempfile::tempdir().unwrap();
    let b = Node::start(Config {
        peers: vec![a_addr],
        handlers: vec![recorder("all", "big.**", seen.clone())],
        ..config(b_dir.path(), &Keypair::generate_ed25519())
    })
    .await
    .unwrap();
    let big = Payload::text("x".repeat(200 * 1024));
    let mut stored = 0;
    let error = loop {
        match a.publish("big.x", None, big.clone()).await {
            Ok(p) => {
                stored += 1;
                assert_eq!(p.seq, stored);
                assert!(stored < 100, "a 2 MiB disk took 20 MB");
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(error, meshbus::NodeError::NotStored(_)), "{error}");
    assert!(error.to_string().contains("not stored"), "{error}");
    assert!(a.status().await.unwrap().log.write_errors >= 1);
    // The peer stays up, and what it stored reaches the other peer; nothing else does.
    wait_len(&seen, stored as usize).await;
    let again = a.publish("big.y", None, big.clone()).await;
    assert!(again.is_err(), "still full");
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=stored).collect::<Vec<_>>());
    assert!(seen.lock().unwrap().iter().all(|(t, _)| t == "big.x"));
    b.shutdown().await;
    a.shutdown().await;
}
