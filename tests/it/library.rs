//! The library used directly from Rust: nodes in this process, typed events, Rust handlers.

use std::time::Duration;

use futures::StreamExt as _;
use meshbus::keyring::{Keyring, MeshKey};
use meshbus::{Config, Mesh, Node, NodeError, Pattern, Tailed};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreated {
    id: u64,
    customer: String,
}

/// One mesh key for every node of these tests.
static MESH: std::sync::LazyLock<Keyring> =
    std::sync::LazyLock::new(|| Keyring::new(MeshKey::generate()));

fn local_config() -> Config {
    Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        mesh: Mesh::Keys(MESH.clone()),
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
    let row = node
        .on(Pattern::all(), move |event| {
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
    // Published is not yet queued: the row takes events from the log on its own task, and a
    // shutdown stops that first (what it did not take runs after the next start).
    tokio::time::timeout(T, async {
        while node
            .handlers()
            .iter()
            .find(|h| h.name == row)
            .is_none_or(|h| h.matched < 5)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the row takes the five events into its queue");
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
    use meshbus::api::{Access, Client, ClientError, PublishRequest, Server, Token};
    let node = Node::start(local_config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = Token::generate("owner");
    let api = Server::spawn(listener, node.handle(), Access::new(vec![token.clone()])).unwrap();
    let client = Client::new(api.local_addr()).with_token(Some(token.secret().into()));

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

    let addr = api.local_addr();
    api.shutdown().await;
    // A fresh client: a pooled connection the server just closed could fail either way.
    let after = Client::new(addr).status().await;
    assert!(
        matches!(after, Err(ClientError::NotRunning { .. })),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_mesh_key_cannot_connect_and_is_counted() {
    let a = Node::start(local_config()).await.unwrap();
    let a_addr: meshbus::Multiaddr = a.status().await.unwrap().listen_addrs[0].parse().unwrap();
    let outsider = Node::start(Config {
        peers: vec![a_addr.clone()],
        mesh: Mesh::Keys(Keyring::new(MeshKey::generate())),
        ..local_config()
    })
    .await
    .unwrap();
    let open = Node::start(Config {
        peers: vec![a_addr],
        mesh: Mesh::Open,
        ..local_config()
    })
    .await
    .unwrap();
    tokio::time::timeout(T, async {
        while a.status().await.unwrap().counters.connections_refused < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a refuses both the outsider and the open peer");
    assert!(a.peers().await.unwrap().is_empty());
    assert!(outsider.peers().await.unwrap().is_empty());
    assert!(open.peers().await.unwrap().is_empty());
    // A member with the key still gets in.
    let a_addr = a.status().await.unwrap().listen_addrs[0].parse().unwrap();
    let member = Node::start(Config {
        peers: vec![a_addr],
        ..local_config()
    })
    .await
    .unwrap();
    wait_connected(&member, 1).await;
    for node in [a, outsider, open, member] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_asks_who_is_calling_and_refuses_browsers() {
    use meshbus::api::{Access, Client, ClientError, PublishRequest, Scope, Server, Token};
    let node = Node::start(local_config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let owner = Token::generate("owner");
    let reader = Token::new("reader", "read-only-token-0123456789", Scope::Read).unwrap();
    let orders = Token::new(
        "orders",
        "orders-only-token-0123456789",
        Scope::Publish(vec![Pattern::new("orders.**").unwrap()]),
    )
    .unwrap();
    let access = Access::new(vec![owner.clone(), reader.clone(), orders.clone()]);
    let api = Server::spawn(listener, node.handle(), access).unwrap();
    let addr = api.local_addr();
    let as_ = |t: Option<&Token>| Client::new(addr).with_token(t.map(|t| t.secret().to_owned()));
    let refused = |e: ClientError| match e {
        ClientError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    };
    let request = |topic: &str| PublishRequest::new(topic.into(), None, None).unwrap();

    let (code, message) = refused(as_(None).status().await.unwrap_err());
    assert_eq!(code, 401);
    assert!(message.contains("api.token"), "{message}");
    let wrong = Client::new(addr).with_token(Some("not-the-token-0123456789".into()));
    assert_eq!(refused(wrong.status().await.unwrap_err()).0, 401);

    as_(Some(&reader)).status().await.unwrap();
    let (code, message) = refused(
        as_(Some(&reader))
            .publish(&request("orders.x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403, "{message}");
    assert_eq!(
        refused(as_(Some(&reader)).reload().await.unwrap_err()).0,
        403
    );
    as_(Some(&orders))
        .publish(&request("orders.x"))
        .await
        .unwrap();
    let (code, message) = refused(
        as_(Some(&orders))
            .publish(&request("billing.x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403, "{message}");
    assert!(message.contains("billing.x"), "{message}");
    as_(Some(&owner))
        .publish(&request("billing.x"))
        .await
        .unwrap();

    // What a browser sends: a foreign Host (DNS rebinding), an Origin, a form.
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/reload");
    let bearer = format!("Bearer {}", owner.secret());
    let foreign_host = http
        .post(&url)
        .header("host", format!("evil.example:{}", addr.port()))
        .header("authorization", &bearer)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_host.status(), 403);
    let cross_site = http
        .post(&url)
        .header("origin", "http://evil.example")
        .header("authorization", &bearer)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    let form = http
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    api.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_closes_idle_connections_and_bounds_event_streams() {
    use meshbus::api::{Access, Client, ClientError, Limits, Server, Token};
    use tokio::io::AsyncReadExt as _;
    let node = Node::start(local_config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let owner = Token::generate("owner");
    let limits = Limits {
        idle: Duration::from_millis(500),
        streams: 2,
        ..Limits::default()
    };
    let api = Server::spawn_with(
        listener,
        node.handle(),
        Access::new(vec![owner.clone()]),
        limits,
    )
    .unwrap();
    // A connection that never sends a request is closed.
    let mut silent = tokio::net::TcpStream::connect(api.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, silent.read(&mut buf))
        .await
        .expect("closed within the timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Two streams are allowed, the third is refused with a reason.
    let client = Client::new(api.local_addr()).with_token(Some(owner.secret().into()));
    let _one = client.events("**").await.unwrap();
    let _two = client.events("**").await.unwrap();
    match client.events("**").await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status, 503);
            assert!(message.contains("event streams"), "{message}");
        }
        Ok(_) => panic!("a third stream must be refused"),
        Err(e) => panic!("{e}"),
    }
    api.shutdown().await;
    node.shutdown().await;
}
