//! The library used directly from Rust: nodes in this process, typed events, Rust handlers.

use std::time::Duration;

use futures::StreamExt as _;
use meshbus::{Config, Node, NodeError, Pattern, Tailed};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreated {
    id: u64,
    customer: String,
}

fn local_config() -> Config {
    Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        ..Config::default()
    }
}

async fn wait_connected(node: &Node, n: usize) {
    tokio::time::timeout(T, async {
        while node.peers().await.unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("peers connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_events_reach_rust_handlers_and_subscribers_on_every_node() {
    let a = Node::start(local_config()).await.unwrap();
    let a_addr = a.status().await.unwrap().listen_addrs[0].parse().unwrap();
    let b = Node::start(Config {
        peers: vec![a_addr],
        ..local_config()
    })
    .await
    .unwrap();

    let (tx, mut got) = mpsc::channel(16);
    for (name, node) in [("a", &a), ("b", &b)] {
        let tx = tx.clone();
        node.on_json(
            Pattern::new("orders.*").unwrap(),
            move |event, order: OrderCreated| {
                let tx = tx.clone();
                async move {
                    tx.send((name, event.topic.to_string(), order)).await?;
                    Ok(())
                }
            },
        )
        .unwrap();
    }
    let mut on_b = b.subscribe(Pattern::new("orders.**").unwrap());
    wait_connected(&a, 1).await;

    let order = OrderCreated {
        id: 42,
        customer: "ada".into(),
    };
    let published = a.publish_json("orders.created", &order).await.unwrap();
    assert_eq!(published.sent_to, 1);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let got = tokio::time::timeout(T, got.recv()).await.unwrap().unwrap();
        seen.push(got);
    }
    seen.sort_by_key(|s| s.0);
    assert_eq!(
        seen,
        [
            ("a", "orders.created".to_owned(), order.clone()),
            ("b", "orders.created".to_owned(), order.clone())
        ]
    );
    match tokio::time::timeout(T, on_b.next()).await.unwrap().unwrap() {
        Tailed::Event(event) => {
            assert_eq!(event.id.to_string(), published.id);
            assert_eq!(event.source, a.peer_id());
            assert_eq!(event.data_json::<OrderCreated>().unwrap(), order);
        }
        other => panic!("expected an event, got {other:?}"),
    }

    // A handler that panics is a counted failure too, and its row keeps working.
    b.on(Pattern::new("boom.*").unwrap(), |event| async move {
        assert!(event.seq == 0, "handler panics on purpose");
        Ok(())
    })
    .unwrap();

    // A handler that fails is counted, not fatal.
    b.on(Pattern::new("bad.*").unwrap(), |_| async {
        Err("no thanks".into())
    })
    .unwrap();
    a.publish_json("bad.thing", &1).await.unwrap();
    a.publish_json("boom.one", &1).await.unwrap();
    a.publish_json("boom.two", &2).await.unwrap();
    tokio::time::timeout(T, async {
        while b.status().await.unwrap().counters.handler_failed < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the failure is counted");

    let handle = b.handle();
    b.shutdown().await;
    assert!(matches!(
        handle.publish_json("orders.created", &order).await,
        Err(NodeError::Stopped)
    ));
    tokio::time::timeout(T, async {
        while !a.peers().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a sees b leave");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_queued_handlers_finish_within_the_grace() {
    let node = Node::start(local_config()).await.unwrap();
    let (tx, mut done) = mpsc::channel(64);
    node.on(Pattern::all(), move |event| {
        let tx = tx.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(event.seq).await?;
            Ok(())
        }
    })
    .unwrap();
    for i in 0..5 {
        node.publish_json("work.item", &i).await.unwrap();
    }
    node.shutdown().await;
    let mut finished = Vec::new();
    while let Ok(seq) = done.try_recv() {
        finished.push(seq);
    }
    assert_eq!(
        finished,
        [1, 2, 3, 4, 5],
        "queued events ran, in order, before shutdown returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_serves_the_api_on_port_0_and_errors_map_to_statuses() {
    use meshbus::api::{Client, ClientError, PublishRequest, Server};
    let node = Node::start(local_config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = Server::spawn(listener, node.handle()).unwrap();
    let client = Client::new(api.local_addr());

    let status = client.status().await.unwrap();
    assert_eq!(status.peer_id, node.peer_id().to_string());
    assert_eq!(status.api, Some(api.local_addr().to_string()));

    let mut events = node.subscribe(Pattern::new("orders.*").unwrap());
    let payload = meshbus::Payload::guess(r#"{"id":7}"#);
    let request = PublishRequest::new("orders.created".into(), None, Some(&payload)).unwrap();
    let published = client.publish(&request).await.unwrap();
    let Some(Tailed::Event(event)) = tokio::time::timeout(T, events.next()).await.unwrap() else {
        panic!("the published event reaches a subscriber");
    };
    assert_eq!(event.id.to_string(), published.id);

    let refused = |e: ClientError| match e {
        ClientError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    };
    let (code, message) = refused(client.reload().await.unwrap_err());
    assert_eq!(
        code, 400,
        "nothing to reload is the caller's mistake: {message}"
    );

    let handle = node.handle();
    node.shutdown().await;
    let (code, _) = refused(client.status().await.unwrap_err());
    assert_eq!(code, 503, "a stopped node cannot answer");
    let (code, message) = refused(client.reload().await.unwrap_err());
    assert_eq!(code, 503, "a reload on a stopped node: {message}");
    assert!(matches!(handle.reload(), Err(NodeError::Stopped)));

    api.shutdown().await;
    assert!(matches!(
        client.status().await,
        Err(ClientError::NotRunning { .. })
    ));
}
