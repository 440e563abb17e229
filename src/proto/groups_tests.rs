use std::collections::{BTreeMap, BTreeSet};

use super::*;

const SEC: u64 = 1_000_000;

fn stream() -> StreamId {
    StreamId {
        source: PeerId::random(),
        epoch: 1,
    }
}

/// Event number `seq` of `stream`, published at `time`, keyed by its number (or `key`).
fn event(stream: StreamId, seq: u64, time: u64, key: Option<&str>) -> Held<u64> {
    Held {
        offset: seq,
        stream,
        seq,
        time,
        key: digest(
            key.map_or_else(|| format!("{stream:?}/{seq}"), str::to_owned)
                .as_bytes(),
        ),
        item: seq,
    }
}

/// A member's announcement: who, since when, its marks.
type Said = (PeerId, u64, Vec<(StreamId, u64)>);

/// A group of simulated members that all read the same events and tell each other their
/// marks and joins; what each member ran, in order.
struct Sim {
    members: BTreeMap<PeerId, Group<u64>>,
    ran: BTreeMap<PeerId, Vec<u64>>,
}

impl Sim {
    fn new(n: usize, start: u64) -> Self {
        let mut sim = Sim {
            members: BTreeMap::new(),
            ran: BTreeMap::new(),
        };
        for _ in 0..n {
            sim.join(start);
        }
        sim
    }

    /// A member whose row starts at `now`; everyone hears of everyone.
    fn join(&mut self, now: u64) -> PeerId {
        let me = PeerId::random();
        self.members.insert(me, Group::new("billing", me, now));
        self.ran.insert(me, Vec::new());
        self.gossip();
        me
    }

    /// Every member tells every other its `since` and marks.
    fn gossip(&mut self) {
        let said: Vec<Said> = self
            .members
            .iter_mut()
            .map(|(p, g)| (*p, g.since(), g.marks()))
            .collect();
        for (peer, since, marks) in &said {
            for (other, g) in self.members.iter_mut() {
                if other != peer {
                    g.announced(*peer, *since, marks);
                }
            }
        }
    }

    /// Every member reads `e`; the owner runs it at once.
    fn publish(&mut self, e: &Held<u64>) {
        for (me, g) in self.members.iter_mut() {
            if let Some(mine) = g.decide(e.clone()) {
                self.ran.get_mut(me).unwrap().push(mine.item);
                g.finished(mine.stream, mine.seq);
            }
        }
    }

    /// Runs what fell to each member after a failure.
    fn take_over(&mut self) {
        for (me, g) in self.members.iter_mut() {
            while let Some(e) = g.poll_takeover() {
                self.ran.get_mut(me).unwrap().push(e.item);
                g.finished(e.stream, e.seq);
            }
        }
    }

    fn fail(&mut self, gone: &PeerId) {
        self.members.remove(gone);
        for g in self.members.values_mut() {
            g.failed(gone);
        }
        self.take_over();
    }

    /// How often each event ran, across members.
    fn runs(&self) -> BTreeMap<u64, usize> {
        let mut runs = BTreeMap::new();
        for ran in self.ran.values() {
            for seq in ran {
                *runs.entry(*seq).or_default() += 1;
            }
        }
        runs
    }

    fn held(&self) -> usize {
        self.members.values().map(|g| g.held()).sum()
    }
}

#[test]
fn names_are_checked() {
    assert!(check_name("billing").is_ok());
    assert!(check_name("eu-west_2.billing").is_ok());
    assert!(check_name("").unwrap_err().contains("1 to 64"));
    assert!(check_name(&"a".repeat(65)).is_err());
    assert!(check_name("bill ing").unwrap_err().contains("' '"));
    assert!(check_name("a/b").is_err());
}

#[test]
fn rendezvous_spreads_keys_and_moves_only_the_leavers_share() {
    let members: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
    let keys: Vec<String> = (0..8000).map(|i| format!("key-{i}")).collect();
    let mut share: BTreeMap<PeerId, usize> = BTreeMap::new();
    for k in &keys {
        *share
            .entry(owner(&digest(k.as_bytes()), &members).unwrap())
            .or_default() += 1;
    }
    for n in share.values() {
        assert!((1600..=2400).contains(n), "uneven shares: {share:?}");
    }
    // Without member 0, only its keys move.
    for k in &keys {
        let before = owner(&digest(k.as_bytes()), &members).unwrap();
        let after = owner(&digest(k.as_bytes()), &members[1..]).unwrap();
        if before != members[0] {
            assert_eq!(before, after, "a key moved between members that stayed");
        }
    }
}

/// A known-answer vector (docs/wire.md), computed with an independent SipHash-1-3 written
/// from the paper: a peer in another language must weigh the same.
#[test]
fn the_weight_is_a_fixed_function() {
    let member = libp2p::identity::Keypair::ed25519_from_bytes([1u8; 32])
        .unwrap()
        .public()
        .to_peer_id();
    assert_eq!(
        member.to_string(),
        "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"
    );
    let key = digest(b"customer-42");
    assert_eq!(hex(&key), "515737be8ab9d865845bb1c0307b977c");
    assert_eq!(weight(&member, &key), 9_613_200_854_773_342_037);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_event_runs_exactly_once_without_failures() {
    let mut sim = Sim::new(3, 0);
    let s = stream();
    for seq in 1..=3000 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
        if seq % 50 == 0 {
            sim.gossip();
        }
    }
    sim.gossip();
    let runs = sim.runs();
    assert_eq!(runs.len(), 3000);
    assert!(runs.values().all(|n| *n == 1));
    for ran in sim.ran.values() {
        assert!(
            (600..=1400).contains(&ran.len()),
            "shares {:?}",
            sim.ran.values().map(Vec::len).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        sim.held(),
        0,
        "every held event was released by its owner's mark"
    );
    let owned: u64 = sim.members.values().map(|g| g.counters.owned).sum();
    let not: u64 = sim.members.values().map(|g| g.counters.not_owned).sum();
    assert_eq!((owned, not), (3000, 6000));
}

#[test]
fn a_key_keeps_its_events_on_one_member_in_order() {
    let mut sim = Sim::new(3, 0);
    let s = stream();
    let customers = ["ann", "bob", "cy", "dee", "eve"];
    for seq in 1..=500 {
        let key = customers[seq as usize % customers.len()];
        sim.publish(&event(s, seq, 3 * SEC + seq, Some(key)));
    }
    for c in customers.iter().enumerate() {
        let (i, _) = c;
        let of_key: BTreeSet<&PeerId> = sim
            .ran
            .iter()
            .filter(|(_, ran)| ran.iter().any(|seq| *seq as usize % customers.len() == i))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            of_key.len(),
            1,
            "customer {} ran on {of_key:?}",
            customers[i]
        );
    }
    for ran in sim.ran.values() {
        assert!(ran.windows(2).all(|w| w[0] < w[1]), "out of order");
    }
}

#[test]
fn a_failed_members_unfinished_events_are_taken_over_once() {
    let mut sim = Sim::new(3, 0);
    let s = stream();
    for seq in 1..=300 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
    }
    sim.gossip();
    // Member `f` reads 100 more events but finishes none of them, and dies.
    let f = *sim.members.keys().next().unwrap();
    let mut in_flight = Vec::new();
    for seq in 301..=400 {
        let e = event(s, seq, 3 * SEC + seq, None);
        for (me, g) in sim.members.iter_mut() {
            if let Some(mine) = g.decide(e.clone()) {
                if *me == f {
                    in_flight.push(mine.item);
                } else {
                    sim.ran.get_mut(me).unwrap().push(mine.item);
                    g.finished(mine.stream, mine.seq);
                }
            }
        }
    }
    assert!(!in_flight.is_empty());
    sim.fail(&f);
    let runs = sim.runs();
    assert_eq!(runs.len(), 400, "every event ran");
    assert!(runs.values().all(|n| *n == 1), "no event ran twice");
    for seq in &in_flight {
        assert!(!sim.ran[&f].contains(seq));
    }
    let taken: u64 = sim.members.values().map(|g| g.counters.taken_over).sum();
    assert_eq!(taken as usize, in_flight.len());
    // Events after the failure are shared by the two left.
    for seq in 401..=700 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
    }
    sim.gossip();
    assert!(sim.runs().values().all(|n| *n == 1));
    assert_eq!(sim.held(), 0);
}

#[test]
fn duplicates_after_a_failure_are_what_its_last_marks_did_not_cover() {
    let mut sim = Sim::new(3, 0);
    let s = stream();
    for seq in 1..=200 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
    }
    sim.gossip();
    // More events run everywhere, but the failing member's marks never go out again.
    let f = *sim.members.keys().nth(1).unwrap();
    for seq in 201..=260 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
    }
    let ran_unmarked = sim.ran[&f].iter().filter(|seq| **seq > 200).count();
    sim.fail(&f);
    let twice = sim.runs().values().filter(|n| **n == 2).count();
    assert_eq!(twice, ran_unmarked, "exactly the unmarked ones ran again");
    assert!(sim.runs().values().all(|n| (1..=2).contains(n)));
}

#[test]
fn a_member_that_joins_takes_a_share_of_new_events_only() {
    let mut sim = Sim::new(2, 0);
    let s = stream();
    for seq in 1..=300 {
        sim.publish(&event(s, seq, 3 * SEC + seq * 3000, None));
    }
    sim.gossip();
    // The newcomer starts at 4 s: it owns events published from 6 s on.
    let new = sim.join(4 * SEC);
    assert!(!sim.members[&new].ready(5 * SEC));
    assert!(sim.members[&new].ready(6 * SEC));
    for seq in 301..=3000 {
        let time = 3 * SEC + seq * 3000; // up to 12 s
        sim.publish(&event(s, seq, time, None));
        if seq % 20 == 0 {
            sim.gossip();
        }
    }
    sim.gossip();
    assert!(
        sim.runs().values().all(|n| *n == 1),
        "exactly once across the join"
    );
    assert_eq!(sim.runs().len(), 3000);
    let got = &sim.ran[&new];
    assert!(got.iter().all(|seq| 3 * SEC + seq * 3000 >= 6 * SEC));
    assert!(
        got.len() > 400,
        "the newcomer took {} of the 2000 new events",
        got.len()
    );
    assert_eq!(sim.held(), 0);
}

#[test]
fn a_restarted_member_gives_up_the_events_it_held_before() {
    let mut sim = Sim::new(2, 0);
    let s = stream();
    let [a, b]: [PeerId; 2] = sim
        .members
        .keys()
        .copied()
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    // `a` holds events for `b`, which restarts (a later `since`) before marking them.
    let mut held_for_b = 0;
    for seq in 1..=100 {
        let e = event(s, seq, 3 * SEC + seq, None);
        if sim.members.get_mut(&a).unwrap().decide(e).is_none() {
            held_for_b += 1;
        }
    }
    assert!(held_for_b > 0);
    let g = sim.members.get_mut(&a).unwrap();
    g.announced(b, 10 * SEC, &[]);
    let mut taken = 0;
    while g.poll_takeover().is_some() {
        taken += 1;
    }
    assert_eq!(
        taken, held_for_b,
        "b no longer owns events published before its new since"
    );
    assert_eq!(g.held(), 0);
}

#[test]
fn every_member_marks_all_it_read_as_resolved() {
    let mut sim = Sim::new(3, 0);
    let s = stream();
    for seq in 1..=600 {
        sim.publish(&event(s, seq, 3 * SEC + seq, None));
    }
    sim.gossip();
    let marks_everywhere = sim
        .members
        .values_mut()
        .all(|g| g.marks() == vec![(s, 600)]);
    assert!(marks_everywhere, "everything read is resolved everywhere");
}

#[test]
fn marks_are_bounded_and_rotate() {
    let me = PeerId::random();
    let mut g: Group<u64> = Group::new("g", me, 0);
    let streams: Vec<StreamId> = (0..MAX_MARKS + 10).map(|_| stream()).collect();
    for s in &streams {
        g.decide(event(*s, 1, 3 * SEC, None));
    }
    let first: BTreeSet<StreamId> = g.marks().into_iter().map(|(s, _)| s).collect();
    let second: BTreeSet<StreamId> = g.marks().into_iter().map(|(s, _)| s).collect();
    assert_eq!(first.len(), MAX_MARKS);
    assert_eq!(second.len(), MAX_MARKS);
    assert_eq!(
        first.union(&second).count(),
        streams.len(),
        "every stream goes out in turn"
    );
}

#[test]
fn held_events_are_bounded() {
    let me = PeerId::random();
    let other = PeerId::random();
    let mut g: Group<u64> = Group::new("g", me, 0);
    g.announced(other, 0, &[]);
    let s = stream();
    let mut seq = 0;
    while !g.full() {
        seq += 1;
        // Key every event so the other member owns it.
        let key = (0..)
            .map(|i| format!("k{seq}-{i}"))
            .find(|k| owner(&digest(k.as_bytes()), [&me, &other]) == Some(other))
            .unwrap();
        g.decide(event(s, seq, 3 * SEC, Some(&key)));
        assert!(seq as usize <= MAX_HELD);
    }
    assert_eq!(g.held(), MAX_HELD);
    g.announced(other, 0, &[(s, seq)]);
    assert_eq!(g.held(), 0);
    assert_eq!(g.take_released().len(), MAX_HELD);
}

/// Random runs: members join (announcing a `since` 2 s ahead), run what they own with a
/// delay, announce their marks now and then, and fail with work in flight. Every event a
/// surviving member read runs at least once; with no failure, exactly once.
#[test]
fn random_joins_and_failures_lose_nothing() {
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut members: BTreeMap<PeerId, (Group<u64>, Vec<Held<u64>>)> = BTreeMap::new();
        let mut ran: BTreeMap<u64, usize> = BTreeMap::new();
        let mut now = 0;
        let join = |members: &mut BTreeMap<PeerId, (Group<u64>, Vec<Held<u64>>)>,
                    now: u64,
                    rng: &mut fastrand::Rng| {
            let mut secret = [0u8; 32];
            rng.fill(&mut secret);
            let me = libp2p::identity::Keypair::ed25519_from_bytes(secret)
                .unwrap()
                .public()
                .to_peer_id();
            let mut g = Group::new("g", me, now);
            for (p, (other, _)) in members.iter_mut() {
                g.announced(*p, other.since(), &other.marks());
                other.announced(me, g.since(), &[]);
            }
            members.insert(me, (g, Vec::new()));
        };
        for _ in 0..3 {
            join(&mut members, now, &mut rng);
        }
        now = 3 * SEC;
        let s = StreamId {
            source: libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32])
                .unwrap()
                .public()
                .to_peer_id(),
            epoch: 1,
        };
        let mut failures = 0;
        // Who read each event: a member that joins later never reads it (its row starts at
        // the end of the log), so an event all of whose readers failed is gone with them.
        let mut readers: BTreeMap<u64, Vec<PeerId>> = BTreeMap::new();
        for seq in 1..=400u64 {
            now += 10_000;
            let e = event(s, seq, now, None);
            readers.insert(seq, members.keys().copied().collect::<Vec<_>>());
            for (g, queue) in members.values_mut() {
                if let Some(mine) = g.decide(e.clone()) {
                    queue.push(mine);
                }
            }
            // Each member finishes some of its queue.
            for (g, queue) in members.values_mut() {
                while let Some(t) = g.poll_takeover() {
                    queue.push(t);
                }
                let n = rng.usize(0..=queue.len());
                for done in queue.drain(..n) {
                    *ran.entry(done.item).or_default() += 1;
                    g.finished(done.stream, done.seq);
                }
            }
            match rng.u8(0..100) {
                0..=29 => {
                    // One member's marks reach the others.
                    let ids: Vec<PeerId> = members.keys().copied().collect();
                    let from = ids[rng.usize(0..ids.len())];
                    let (since, marks) = {
                        let (g, _) = members.get_mut(&from).unwrap();
                        (g.since(), g.marks())
                    };
                    for (p, (g, _)) in members.iter_mut() {
                        if *p != from {
                            g.announced(from, since, &marks);
                        }
                    }
                }
                30..=31 if members.len() > 1 => {
                    let ids: Vec<PeerId> = members.keys().copied().collect();
                    let gone = ids[rng.usize(0..ids.len())];
                    members.remove(&gone); // its queue is lost with it
                    failures += 1;
                    for (g, _) in members.values_mut() {
                        g.failed(&gone);
                    }
                }
                32..=33 if members.len() < 6 => join(&mut members, now, &mut rng),
                _ => {}
            }
        }
        // Quiet: everyone finishes and announces until nothing moves.
        for _ in 0..4 {
            for (g, queue) in members.values_mut() {
                while let Some(t) = g.poll_takeover() {
                    queue.push(t);
                }
                for done in queue.drain(..) {
                    *ran.entry(done.item).or_default() += 1;
                    g.finished(done.stream, done.seq);
                }
            }
            let said: Vec<Said> = members
                .iter_mut()
                .map(|(p, (g, _))| (*p, g.since(), g.marks()))
                .collect();
            for (from, since, marks) in &said {
                for (p, (g, _)) in members.iter_mut() {
                    if p != from {
                        g.announced(*from, *since, marks);
                    }
                }
            }
        }
        let missing: Vec<u64> = (1..=400)
            .filter(|seq| !ran.contains_key(seq))
            .filter(|seq| readers[seq].iter().any(|r| members.contains_key(r)))
            .collect();
        assert!(missing.is_empty(), "seed {seed}: never ran {missing:?}");
        if failures == 0 {
            assert!(
                ran.values().all(|n| *n == 1),
                "seed {seed}: ran twice with no failure"
            );
        }
        assert!(
            members.values().all(|(g, _)| g.held() == 0),
            "seed {seed}: events still held"
        );
    }
}
