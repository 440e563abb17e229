//! Every peer of a lab finds every other by mDNS alone, and concurrent publishers' events reach
//! every handler table exactly once, each publisher's in its order.

use std::collections::BTreeSet;

use crate::support::*;

#[test]
fn ten_peers_form_a_full_mesh_by_mdns_alone() {
    if !netns_or_skip("lab-10") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(10);
    let status = lab.status();
    let all: BTreeSet<String> = status
        .values()
        .map(|h| h["peer_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 10);
    for (host, h) in &status {
        let sees: BTreeSet<String> = h["sees"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        let mut others = all.clone();
        others.remove(h["peer_id"].as_str().unwrap());
        assert_eq!(sees, others, "{host} sees every other peer");
    }
}

#[test]
fn concurrent_publishers_deliver_every_event_exactly_once_everywhere() {
    if !netns_or_skip("lab-publishers") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(5);
    const PER_PUBLISHER: usize = 40;
    let publishers = ["h0", "h2", "h4"];
    let published: BTreeSet<String> = std::thread::scope(|s| {
        let handles: Vec<_> = publishers
            .iter()
            .map(|host| {
                let lab = &lab;
                s.spawn(move || {
                    (0..PER_PUBLISHER)
                        .map(|i| lab.publish(host, &format!("orders.{host}.n{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(published.len(), publishers.len() * PER_PUBLISHER);
    for host in ["h0", "h1", "h2", "h3", "h4"] {
        let path = lab.events_file(host);
        let events = wait_for_events(&path, published.len(), T);
        let ids: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), published.len(), "{host}: no duplicates");
        assert_eq!(
            ids.into_iter().collect::<BTreeSet<_>>(),
            published,
            "{host}: every event"
        );
        // Each publisher's events arrive in its order.
        for publisher in publishers {
            let seqs: Vec<u64> = events
                .iter()
                .filter(|e| {
                    e["topic"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("orders.{publisher}."))
                })
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{host} got {publisher}'s events in order"
            );
        }
    }
}
