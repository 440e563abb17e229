//! Handler groups and queries from the library and the HTTP API: nodes in this process on
//! 127.0.0.1 (the lab tests run the same on a LAN, with the binary).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbus::api::{Access, Client, QueryLine, QueryRequest, Server, Token};
use meshbus::keyring::{Keyring, MeshKey};
use meshbus::node::QueryOptions;
use meshbus::{Action, Config, HandlerSpec, Mesh, Node, Pattern};

const T: Duration = Duration::from_secs(20);

fn config(mesh: &Keyring, peers: Vec<meshbus::Multiaddr>) -> Config {
    Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        mesh: Mesh::Keys(mesh.clone()),
        peers,
        ..Config::default()
    }
}

/// `n` nodes, each dialling the ones before it, all connected.
async fn mesh(n: usize) -> Vec<Node> {
    let key = Keyring::new(MeshKey::generate());
    let mut nodes: Vec<Node> = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let node = Node::start(config(&key, addrs.clone())).await.unwrap();
        addrs.push(
            node.status().await.unwrap().listen_addrs[0]
                .parse()
                .unwrap(),
        );
        nodes.push(node);
    }
    wait(|| async {
        for node in &nodes {
            if node.peers().await.unwrap().len() < n - 1 {
                return false;
            }
        }
        true
    })
    .await;
    nodes
}

async fn wait<F, Fut>(mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(T, async {
        while !ok().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the condition holds in time");
}

/// Every node sees group `name` with `n` active members.
async fn wait_active(nodes: &[Node], name: &str, n: usize) {
    wait(|| async {
        for node in nodes {
            let groups = node.groups().await.unwrap();
            let Some(g) = groups.iter().find(|g| g.name == name) else {
                return false;
            };
            if g.members.len() != n || !g.members.iter().all(|m| m.active) {
                return false;
            }
        }
        true
    })
    .await;
}

type Handled = Arc<Mutex<BTreeMap<String, Vec<usize>>>>;

/// `n` events on `jobs.run`, ready for `publish_many`.
fn jobs(n: usize) -> Vec<(String, Option<String>, meshbus::Payload)> {
    (0..n)
        .map(|i| {
            let payload = meshbus::Payload::json(&i).unwrap();
            ("jobs.run".to_owned(), None, payload)
        })
        .collect()
}

/// Waits until every member's group row has read `n` events and holds none for another.
async fn settled(members: &[Node], n: u64) {
    wait(|| async {
        for node in members {
            let row = &node.handlers()[0];
            if row.owned + row.not_owned < n || node.groups().await.unwrap()[0].held > 0 {
                return false;
            }
        }
        true
    })
    .await;
}

/// A group row on `node` that records, per event id, which node ran it.
fn group_row(node: &Node, i: usize, group: &str, handled: &Handled) {
    let handled = handled.clone();
    let mut spec = HandlerSpec::new(
        Pattern::new("jobs.**").unwrap(),
        Action::Rust(Arc::new(move |event| {
            let handled = handled.clone();
            Box::pin(async move {
                handled
                    .lock()
                    .unwrap()
                    .entry(event.id.to_string())
                    .or_default()
                    .push(i);
                Ok(())
            })
        })),
    );
    spec.group = Some(group.into());
    node.add_handler(spec).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_group_runs_each_event_once_and_survives_a_member_leaving() {
    let nodes = mesh(3).await;
    let handled: Handled = Default::default();
    for (i, node) in nodes.iter().enumerate() {
        group_row(node, i, "workers", &handled);
    }
    wait_active(&nodes, "workers", 3).await;
    nodes[0].publish_many(jobs(300)).await.unwrap();
    wait(|| async { handled.lock().unwrap().len() == 300 }).await;
    // Settled: every member read all 300 and holds nothing for another.
    settled(&nodes, 300).await;
    {
        let handled = handled.lock().unwrap();
        assert!(handled.values().all(|by| by.len() == 1), "run once each");
        let mut share = [0usize; 3];
        for by in handled.values() {
            share[by[0]] += 1;
        }
        assert!(share.iter().all(|n| (50..=160).contains(n)), "{share:?}");
        for (i, node) in nodes.iter().enumerate() {
            let row = &node.handlers()[0];
            assert_eq!(row.group.as_deref(), Some("workers"));
            assert_eq!(row.owned as usize, share[i]);
            assert_eq!(row.not_owned as usize, 300 - share[i]);
            assert_eq!(row.succeeded as usize, share[i]);
        }
    }
    // The third member leaves; the two left share what comes next, still once each.
    let ran_by_third =
        |h: &BTreeMap<String, Vec<usize>>| h.values().filter(|by| by[0] == 2).count();
    let before = ran_by_third(&handled.lock().unwrap());
    let mut nodes = nodes;
    nodes.pop().unwrap().shutdown().await;
    wait_active(&nodes, "workers", 2).await;
    nodes[1].publish_many(jobs(200)).await.unwrap();
    wait(|| async { handled.lock().unwrap().len() == 500 }).await;
    {
        let handled = handled.lock().unwrap();
        assert!(handled.values().all(|by| by.len() == 1), "run once each");
        assert_eq!(
            ran_by_third(&handled),
            before,
            "the member that left ran nothing more"
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A group whose members are not connected to each other: they hear each other's groups
/// and marks over the mesh, through a peer in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spans_members_that_reach_each_other_only_through_the_mesh() {
    let key = Keyring::new(MeshKey::generate());
    let middle = Node::start(config(&key, vec![])).await.unwrap();
    let addr: meshbus::Multiaddr = middle.status().await.unwrap().listen_addrs[0]
        .parse()
        .unwrap();
    let left = Node::start(config(&key, vec![addr.clone()])).await.unwrap();
    let right = Node::start(config(&key, vec![addr])).await.unwrap();
    let handled: Handled = Default::default();
    group_row(&left, 0, "workers", &handled);
    group_row(&right, 1, "workers", &handled);
    let mut members = vec![left, right];
    wait_active(&members, "workers", 2).await;
    for node in &members {
        let connected: Vec<_> = node
            .peers()
            .await
            .unwrap()
            .into_iter()
            .filter(|p| !p.connected_addrs.is_empty())
            .collect();
        assert_eq!(connected.len(), 1, "only the middle peer is connected");
    }
    middle.publish_many(jobs(200)).await.unwrap();
    wait(|| async { handled.lock().unwrap().len() == 200 }).await;
    // Settled: each read all 200 and holds nothing for the other.
    settled(&members, 200).await;
    let ran_by_left = |h: &Handled| h.lock().unwrap().values().filter(|by| by[0] == 0).count();
    let left_share = ran_by_left(&handled);
    assert!(
        handled.lock().unwrap().values().all(|by| by.len() == 1),
        "run once each"
    );
    assert!((40..=160).contains(&left_share), "{left_share} of 200");
    // The right member leaves (its goodbye travels over the mesh): the left one runs the rest.
    members.pop().unwrap().shutdown().await;
    wait_active(&members, "workers", 1).await;
    middle.publish_many(jobs(50)).await.unwrap();
    wait(|| async { handled.lock().unwrap().len() == 250 }).await;
    assert!(handled.lock().unwrap().values().all(|by| by.len() == 1));
    assert_eq!(
        ran_by_left(&handled),
        left_share + 50,
        "the member left runs every new event"
    );
    members.pop().unwrap().shutdown().await;
    middle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_get_one_answer_per_peer_from_the_library_and_the_api() {
    let nodes = mesh(3).await;
    for (i, node) in nodes.iter().enumerate() {
        node.on_query(Pattern::new("ask.*").unwrap(), move |event| async move {
            let data: serde_json::Value = event.data_json()?;
            Ok(serde_json::json!({ "node": i, "echo": data }))
        })
        .unwrap();
    }
    // A second reply row on node 1: the peer still answers once.
    nodes[1]
        .on_query(Pattern::new("ask.**").unwrap(), |_| async {
            Ok(serde_json::json!("again"))
        })
        .unwrap();
    nodes[2]
        .on_query(Pattern::new("big.*").unwrap(), |_| async {
            Ok(serde_json::json!("x".repeat(100_000)))
        })
        .unwrap();

    // A reply row whose filter fails answers with the reason instead of leaving the asker
    // to wait.
    let mut failing = HandlerSpec::new(
        Pattern::new("fail.*").unwrap(),
        Action::Query(Arc::new(|_| {
            Box::pin(async { Ok(serde_json::json!("ran")) })
        })),
    );
    failing.filter = Some(r#"error("refused by the filter")"#.into());
    failing.reply = true;
    nodes[2].add_handler(failing).unwrap();
    let options = QueryOptions {
        timeout: Duration::from_secs(2),
        group: None,
    };
    let payload = || meshbus::Payload::json(&"hi").unwrap();
    let mut query = nodes[0]
        .query("ask.who", payload(), options.clone())
        .await
        .unwrap();
    assert_eq!(query.asked, 2);
    let mut by = BTreeMap::new();
    while let Some(answer) = query.next().await {
        assert!(
            by.insert(answer.peer.clone(), answer).is_none(),
            "one per peer"
        );
    }
    assert_eq!(by.len(), 3, "{by:?}");
    for (i, node) in nodes.iter().enumerate() {
        let a = &by[&node.peer_id().to_string()];
        if i != 1 {
            assert_eq!(a.answer, Some(serde_json::json!({"node": i, "echo": "hi"})));
        }
        assert!(a.error.is_none());
    }
    let status = nodes[1].status().await.unwrap();
    assert_eq!(status.counters.answers_sent, 1);
    assert_eq!(
        status.counters.answers_dropped, 1,
        "its second row's answer"
    );

    // Too large: the asker learns why.
    let mut big = nodes[0]
        .query("big.one", payload(), options.clone())
        .await
        .unwrap();
    let a = big.next().await.expect("an answer");
    assert!(a.answer.is_none());
    assert!(a.error.unwrap().contains("at most 65536"));

    let mut failed = nodes[0]
        .query("fail.one", payload(), options.clone())
        .await
        .unwrap();
    let a = failed.next().await.expect("an answer");
    assert_eq!(a.peer, nodes[2].peer_id().to_string());
    assert!(
        a.error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the filter")),
        "{a:?}"
    );

    // Over the API, streamed; a group no row is in gets no answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = Token::generate("owner");
    let api = Server::spawn(
        listener,
        nodes[0].handle(),
        Access::new(vec![token.clone()]),
    )
    .unwrap();
    let client = Client::new(api.local_addr()).with_token(Some(token.secret().into()));
    let lines = |request: QueryRequest| {
        let client = client.clone();
        async move {
            use futures::StreamExt as _;
            let stream = client.query(&request).await.unwrap();
            stream.map(Result::unwrap).collect::<Vec<QueryLine>>().await
        }
    };
    let got = lines(QueryRequest {
        topic: "ask.api".into(),
        timeout_ms: Some(1500),
        ..QueryRequest::default()
    })
    .await;
    assert_eq!(got.len(), 4, "three answers and the end: {got:?}");
    assert!(matches!(
        got.last(),
        Some(QueryLine::Done {
            asked: 2,
            answers: 3,
            ..
        })
    ));
    let got = lines(QueryRequest {
        topic: "ask.api".into(),
        timeout_ms: Some(500),
        group: Some("nobody".into()),
        ..QueryRequest::default()
    })
    .await;
    assert!(
        matches!(got[..], [QueryLine::Done { answers: 0, .. }]),
        "{got:?}"
    );
    let bad = client
        .query(&QueryRequest {
            topic: "ask.api".into(),
            group: Some("no good".into()),
            ..QueryRequest::default()
        })
        .await;
    assert!(
        matches!(&bad, Err(meshbus::api::ClientError::Refused { status: 400, message }) if message.contains("group name")),
        "{:?}",
        bad.err()
    );
    api.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A group row whose action blocks until `gate` opens.
fn blocked_row(node: &Node, group: &str, key: Option<&str>, gate: &Arc<tokio::sync::Semaphore>) {
    let gate = gate.clone();
    let mut spec = HandlerSpec::new(
        Pattern::new("jobs.**").unwrap(),
        Action::Rust(Arc::new(move |_| {
            let gate = gate.clone();
            Box::pin(async move {
                gate.acquire().await?.forget();
                Ok(())
            })
        })),
    );
    spec.name = Some("worker".into());
    spec.group = Some(group.into());
    spec.key = key.map(str::to_owned);
    node.set_handlers(vec![spec]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_leaves_its_group_stops_waiting_and_rows_that_differ_are_reported() {
    let nodes = mesh(2).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    for node in &nodes {
        blocked_row(node, "g", None, &gate);
    }
    wait_active(&nodes, "g", 2).await;
    let events: Vec<_> = (0..40)
        .map(|i| {
            (
                "jobs.run".to_owned(),
                None,
                meshbus::Payload::json(&i).unwrap(),
            )
        })
        .collect();
    nodes[0].publish_many(events).await.unwrap();
    // Nothing finishes, so each member holds the other's share and lags.
    wait(|| async {
        let held = nodes[0].groups().await.unwrap()[0].held;
        let row = &nodes[0].handlers()[0];
        held > 0 && row.owned + row.not_owned == 40
    })
    .await;
    assert!(nodes[0].handlers()[0].lag > 0);
    // A reload moves node 0's row to another group: it no longer waits for node 1.
    blocked_row(&nodes[0], "g2", None, &gate);
    gate.add_permits(1000);
    wait(|| async { nodes[0].handlers()[0].lag == 0 }).await;

    // Members whose rows take other events are reported by both.
    blocked_row(&nodes[0], "g", Some(".data"), &gate);
    wait(|| async {
        let mut both = true;
        for node in &nodes {
            let status = node.status().await.unwrap();
            let g = status.groups.iter().find(|g| g.name == "g");
            both &= g.is_some_and(|g| g.conflicting.len() == 1)
                && status.counters.groups_conflicting >= 1;
        }
        both
    })
    .await;
    for node in nodes {
        node.shutdown().await;
    }
}
