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
        key: key
            .map_or_else(|| format!("{stream:?}/{seq}"), str::to_owned)
            .into_bytes(),
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
            .entry(owner(k.as_bytes(), &members).unwrap())
            .or_default() += 1;
    }
    for n in share.values() {
        assert!((1600..=2400).contains(n), "uneven shares: {share:?}");
    }
    // Without member 0, only its keys move.
    for k in &keys {
        let before = owner(k.as_bytes(), &members).unwrap();
        let after = owner(k.as_bytes(), &members[1..]).unwrap();
        if before != members[0] {
            assert_eq!(before, after, "a key moved between members that stayed");
        }
    }
    // The weight is a fixed function: another build (or language) agrees.
    assert_eq!(weight(&members[0], b"k"), weight(&members[0], b"k"));
    assert_ne!(weight(&members[0], b"k"), weight(&members[1], b"k"));
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
            .find(|k| owner(k.as_bytes(), [&me, &other]) == Some(other))
            .unwrap();
        g.decide(event(s, seq, 3 * SEC, Some(&key)));
        assert!(seq as usize <= MAX_HELD);
    }
    assert_eq!(g.held(), MAX_HELD);
    g.announced(other, 0, &[(s, seq)]);
    assert_eq!(g.held(), 0);
    assert_eq!(g.take_released().len(), MAX_HELD);
}
