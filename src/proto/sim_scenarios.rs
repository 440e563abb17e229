//! The scenarios the simulation runs, each over many seeds.

use std::time::Duration;

use super::*;
use crate::proto::peers::{MARKS_PER_ROUND, QUIET_AFTER, QUIET_MARKS_EVERY};

fn seeds() -> Vec<u64> {
    match std::env::var("MESHBUS_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("MESHBUS_SIM_SEED is a number")],
        Err(_) => (1..=24).collect(),
    }
}

#[test]
fn peers_converge_through_calm_storm_cut_and_heal() {
    for seed in seeds() {
        calm_storm_cut_and_heal(seed, 5);
    }
}

/// More members than one anti-entropy round asks: what the storm and the cut lost is still
/// found, from the members asked in turn and from the one that joins again.
#[test]
fn a_mesh_larger_than_a_marks_round_converges_too() {
    for seed in seeds().into_iter().take(6) {
        calm_storm_cut_and_heal(seed, 3 * MARKS_PER_ROUND);
    }
}

/// A peer that misses a burst while its connections hold (a cut shorter than the liveness
/// bound) and sees nothing else move is quiet, and asks only every QUIET_MARKS_EVERY; yet it
/// gets the burst within a round of the heal, because the publisher, busy, asks it for its
/// marks and its request says how far it has published.
#[test]
fn a_quiet_peer_that_missed_a_burst_hears_of_it_from_the_publishers_next_round() {
    const EVENTS: usize = 50;
    for seed in seeds() {
        let n = 5;
        let mut sim = Sim::new(seed, n);
        sim.run(Duration::from_secs(1));
        sim.assert_full_mesh("start");
        // Nothing moves until every peer is quiet.
        sim.run(QUIET_AFTER + ANTI_ENTROPY);
        let cut = sim.rng.usize(0..n);
        let publisher = (cut + 1 + sim.rng.usize(0..n - 1)) % n;
        sim.up[cut] = false;
        sim.publish(publisher, EVENTS);
        sim.run(Duration::from_millis(100));
        sim.up[cut] = true;
        sim.run(Duration::from_millis(100));
        let source = sim.nodes[publisher].id;
        assert!(
            sim.nodes[cut].log.get(&source).is_none_or(Vec::is_empty),
            "seed {seed}: h{cut} got the burst through the cut"
        );
        for (i, node) in sim.nodes.iter().enumerate() {
            assert_eq!(
                node.membership.len(),
                n - 1,
                "seed {seed}: h{i}: nobody left"
            );
        }
        assert!(QUIET_MARKS_EVERY > ANTI_ENTROPY * 2);
        sim.run(ANTI_ENTROPY + Duration::from_millis(500));
        sim.assert_full_logs("the publisher's next round");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let seed = seeds()[0];
    let (a, b) = (
        calm_storm_cut_and_heal(seed, 5),
        calm_storm_cut_and_heal(seed, 5),
    );
    for (x, y) in a.nodes.iter().zip(&b.nodes) {
        assert_eq!(x.membership, y.membership, "seed {seed}");
        assert_eq!(x.received, y.received, "seed {seed}");
        assert_eq!(x.sent, y.sent, "seed {seed}");
        assert_eq!(x.log, y.log, "seed {seed}");
    }
}

/// `n` peers meet, publish in calm and in a storm, lose one host and get it back; returns
/// the simulation for a closer look.
fn calm_storm_cut_and_heal(seed: u64, n: usize) -> Sim {
    const EVENTS: usize = 300;
    let mut sim = Sim::new(seed, n);
    sim.run(Duration::from_secs(1));
    sim.assert_full_mesh("start");
    for node in &sim.nodes {
        assert_eq!(
            node.membership.len(),
            n - 1,
            "seed {seed}: one join per peer"
        );
    }

    // Calm: every event reaches every peer once, in its publisher's order.
    for i in 0..n {
        sim.publish(i, EVENTS);
    }
    sim.run(Duration::from_millis(100));
    for (j, node) in sim.nodes.iter().enumerate() {
        for (i, source) in sim.nodes.iter().enumerate().filter(|(i, _)| *i != j) {
            let got = node.received.get(&source.id).cloned().unwrap_or_default();
            let want: Vec<u64> = (1..=EVENTS as u64).collect();
            assert_eq!(got, want, "seed {seed}: h{j} from h{i}");
        }
    }

    sim.assert_full_logs("calm");

    // Storm: loss, duplicates, reordering, lost pings, refused sends. Nothing is invented or
    // misattributed: what went out is within 1..=seq, each number once (a refused message
    // is stored, not sent, and peers fetch it).
    sim.weather = STORM;
    for _ in 0..4 {
        for i in 0..n {
            sim.publish(i, EVENTS / 2);
        }
        sim.run(Duration::from_millis(500));
    }
    for (i, node) in sim.nodes.iter().enumerate() {
        let mut sent = node.sent.clone();
        sent.sort_unstable();
        sent.dedup();
        assert_eq!(
            sent.len(),
            node.sent.len(),
            "seed {seed}: h{i} sent a number twice"
        );
        assert!(
            sent.iter().all(|s| (1..=node.publisher.seq()).contains(s)),
            "seed {seed}"
        );
        for (source, seqs) in &node.received {
            let top = sim.nodes[sim.index_of(source)].publisher.seq();
            assert!(seqs.iter().all(|s| (1..=top).contains(s)), "seed {seed}");
        }
    }
    // Pings were lost too, so some connections may have been closed for silence; the
    // redials mend them once the weather is calm.
    sim.weather = CALM;
    sim.run(REDIAL_INTERVAL + DEAD_AFTER);
    sim.assert_full_mesh("the storm");
    // Whatever the storm lost, duplicated or reordered, every log converged to the full one.
    sim.assert_full_logs("the storm");

    // Cut one host: within the liveness bound every side has let go of the other.
    let cut = sim.rng.usize(0..n);
    let cut_at = sim.elapsed();
    sim.up[cut] = false;
    let bound = DEAD_AFTER + PING_INTERVAL * 2;
    // Past the bound, so a late leave would be seen (and its time checked) too.
    sim.run(bound * 2);
    for (i, node) in sim.nodes.iter().enumerate() {
        let expected = if i == cut { 0 } else { n - 2 };
        assert_eq!(
            node.peers.members(),
            expected,
            "seed {seed}: h{i} after cut h{cut}"
        );
        let lefts = node
            .membership
            .iter()
            .filter(|(at, m)| *at >= cut_at && matches!(m, Membership::Failed { .. }));
        for (at, _) in lefts {
            assert!(*at - cut_at <= bound, "seed {seed}: h{i} left late: {at:?}");
        }
    }

    // Publishing goes on on both sides of the cut.
    for i in 0..n {
        sim.publish(i, EVENTS / 3);
    }
    sim.run(Duration::from_millis(100));

    // Heal: mDNS addresses are redialled and the mesh is whole again, and within the next
    // anti-entropy round every log holds what the other side published meanwhile.
    sim.up[cut] = true;
    sim.run(REDIAL_INTERVAL + Duration::from_millis(100));
    sim.assert_full_mesh("heal");
    sim.assert_membership_alternates();
    sim.run(ANTI_ENTROPY + Duration::from_millis(500));
    sim.assert_full_logs("the heal");
    sim
}
