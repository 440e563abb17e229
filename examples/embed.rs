//! Embedding meshbus in a Rust program: two nodes in one process, a typed event published on
//! one and handled by Rust code on both. Runs anywhere (loopback only, no mDNS):
//!
//! ```text
//! cargo run --example embed
//! ```

use std::time::Duration;

use meshbus::keyring::{Keyring, MeshKey};
use meshbus::{Config, Mesh, Node, Pattern};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderCreated {
    id: u64,
    customer: String,
}

/// Both nodes hold the same mesh key (a `meshbus up` peer keeps its key in its data dir).
fn loopback(mesh: &Keyring) -> Config {
    Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr")],
        mdns: false, // on a real LAN leave this on and drop `peers` below
        mesh: Mesh::Keys(mesh.clone()),
        ..Config::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mesh = Keyring::new(MeshKey::generate());
    let shop = Node::start(Config {
        name: Some("shop".into()),
        ..loopback(&mesh)
    })
    .await?;
    let shop_addr = shop.status().await?.listen_addrs[0].parse()?;
    let warehouse = Node::start(Config {
        name: Some("warehouse".into()),
        peers: vec![shop_addr],
        ..loopback(&mesh)
    })
    .await?;

    let (done, mut finished) = tokio::sync::mpsc::channel(2);
    for (name, node) in [("shop", &shop), ("warehouse", &warehouse)] {
        let done = done.clone();
        node.on(Pattern::new("orders.*")?, move |event| {
            let done = done.clone();
            async move {
                let order: OrderCreated = event.data_json()?;
                println!(
                    "{name}: order {} for {} ({})",
                    order.id, order.customer, event.id
                );
                done.send(()).await?;
                Ok(())
            }
        })?;
    }

    while shop.peers().await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let order = OrderCreated {
        id: 42,
        customer: "ada".into(),
    };
    let published = shop.publish_json("orders.created", &order).await?;
    println!(
        "published {} to {} peer(s)",
        published.id, published.sent_to
    );
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), finished.recv()).await?;
    }
    warehouse.shutdown().await;
    shop.shutdown().await;
    Ok(())
}
