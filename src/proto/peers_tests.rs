//! The peer table's rules, one test each, with time passed in by hand.

use super::*;

fn conn(n: usize) -> ConnectionId {
    ConnectionId::new_unchecked(n)
}

fn addr(port: u16) -> Multiaddr {
    format!("/ip4/10.0.0.1/tcp/{port}").parse().unwrap()
}

fn drain(peers: &mut Peers) -> Vec<PeerAction> {
    std::iter::from_fn(|| peers.poll_action()).collect()
}

/// A table with `peer` connected on connection 1 and identified as a meshbus peer.
fn with_member(now: Instant) -> (Peers, PeerId) {
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.connected(peer, conn(1), addr(1), now);
    peers.identified(peer, PROTOCOL_VERSION, agent(Some("h1")), vec![addr(7421)]);
    drain(&mut peers);
    (peers, peer)
}

#[test]
fn a_meshbus_peer_joins_once_when_first_identified() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.connected(peer, conn(1), addr(1), now);
    assert_eq!(peers.members(), 0, "not a member before identify");
    peers.identified(peer, PROTOCOL_VERSION, agent(Some("h1")), vec![]);
    peers.identified(peer, PROTOCOL_VERSION, agent(Some("h1")), vec![]);
    assert_eq!(
        drain(&mut peers),
        [
            PeerAction::Membership(Membership::Joined {
                peer,
                name: Some("h1".into())
            }),
            PeerAction::Reached(peer)
        ]
    );
    assert_eq!(peers.members(), 1);
}

#[test]
fn a_peer_of_another_protocol_is_disconnected_and_forgotten() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let stranger = PeerId::random();
    peers.discovered([(stranger, addr(1))], now);
    drain(&mut peers);
    peers.connected(stranger, conn(1), addr(1), now);
    peers.identified(stranger, "/other/1", "other".into(), vec![]);
    assert_eq!(drain(&mut peers), [PeerAction::Disconnect(stranger)]);
    assert_eq!(peers.members(), 0);
    peers.closed(stranger, conn(1), now);
    peers.handle_timeout(now + REDIAL_INTERVAL);
    assert!(drain(&mut peers).is_empty(), "a stranger is not redialled");
}

#[test]
fn identify_for_a_peer_no_longer_connected_is_ignored() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    peers.identified(PeerId::random(), PROTOCOL_VERSION, agent(None), vec![]);
    assert!(drain(&mut peers).is_empty());
    assert!(peers.list().is_empty());
}

#[test]
fn a_member_fails_when_its_last_connection_closes_without_a_goodbye() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    peers.connected(peer, conn(2), addr(2), now);
    peers.closed(peer, conn(1), now);
    assert!(drain(&mut peers).is_empty(), "one connection is still open");
    assert!(peers.is_connected(&peer));
    peers.closed(peer, conn(2), now);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Failed { peer })]
    );
    assert!(!peers.is_connected(&peer));
    assert_eq!(peers.members(), 0);
}

#[test]
fn a_member_that_said_goodbye_leaves() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    assert_eq!(peers.member_ids(), [peer]);
    peers.goodbye(peer);
    peers.closed(peer, conn(1), now);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Left { peer })]
    );
    assert!(!peers.is_connected(&peer));
    assert_eq!(peers.members(), 0);
}

#[test]
fn a_peer_that_never_identified_leaves_without_an_event() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.connected(peer, conn(1), addr(1), now);
    peers.closed(peer, conn(1), now);
    assert!(drain(&mut peers).is_empty());
}

#[test]
fn a_connection_silent_past_dead_after_is_closed() {
    let now = Instant::now();
    let (mut peers, _) = with_member(now);
    peers.handle_timeout(now + DEAD_AFTER);
    assert!(
        drain(&mut peers).is_empty(),
        "not yet: silent exactly DEAD_AFTER"
    );
    peers.handle_timeout(now + DEAD_AFTER + PING_INTERVAL);
    assert_eq!(drain(&mut peers), [PeerAction::Close(conn(1))]);
}

#[test]
fn answered_pings_keep_a_connection_open() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    let mut t = now;
    for _ in 0..10 {
        t += PING_INTERVAL;
        peers.ping_answered(peer, conn(1), Duration::from_millis(2), t);
        peers.handle_timeout(t);
    }
    assert!(drain(&mut peers).is_empty());
    assert_eq!(peers.list()[0].rtt_ms, Some(2.0));
}

#[test]
fn a_connection_without_ping_is_never_closed_for_silence() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    peers.ping_unsupported(peer, conn(1));
    peers.handle_timeout(now + DEAD_AFTER * 10);
    assert!(drain(&mut peers).is_empty());
}

#[test]
fn a_failed_ping_closes_the_connection() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    peers.ping_failed(peer, conn(1), "timeout");
    assert_eq!(drain(&mut peers), [PeerAction::Close(conn(1))]);
}

#[test]
fn discovered_peers_are_dialled_with_all_their_addresses_but_not_ourselves() {
    let now = Instant::now();
    let me = PeerId::random();
    let mut peers = Peers::new(me, now);
    let peer = PeerId::random();
    peers.discovered([(peer, addr(1)), (peer, addr(2)), (me, addr(3))], now);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Dial {
            peer,
            addrs: vec![addr(1), addr(2)]
        }]
    );
}

#[test]
fn a_discovered_peer_already_connected_is_not_dialled() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    peers.discovered([(peer, addr(1))], now);
    assert!(drain(&mut peers).is_empty());
}

#[test]
fn known_peers_and_their_addresses_are_bounded() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let many: Vec<(PeerId, Multiaddr)> = (0..MAX_KNOWN_PEERS + 10)
        .map(|_| (PeerId::random(), addr(1)))
        .collect();
    peers.discovered(many, now);
    assert_eq!(
        drain(&mut peers).len(),
        MAX_DIALS_PER_ROUND,
        "the rest wait for later rounds"
    );
    let one = PeerId::random();
    let mut peers = Peers::new(PeerId::random(), now);
    peers.discovered((0..40).map(|p| (one, addr(p))), now);
    let Some(PeerAction::Dial { addrs, .. }) = peers.poll_action() else {
        panic!("expected a dial");
    };
    assert_eq!(addrs.len(), MAX_ADDRS_PER_PEER);
}

#[test]
fn disconnected_known_peers_are_redialled_every_redial_interval() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.discovered([(peer, addr(1))], now);
    drain(&mut peers);
    peers.handle_timeout(now + REDIAL_INTERVAL / 2);
    assert!(drain(&mut peers).is_empty(), "not due yet");
    peers.handle_timeout(now + REDIAL_INTERVAL);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Dial {
            peer,
            addrs: vec![addr(1)]
        }]
    );
    peers.connected(peer, conn(1), addr(1), now + REDIAL_INTERVAL);
    peers.handle_timeout(now + REDIAL_INTERVAL * 2);
    assert!(
        drain(&mut peers).is_empty(),
        "connected peers are not redialled"
    );
}

#[test]
fn expired_addresses_are_not_redialled() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.discovered([(peer, addr(1)), (peer, addr(2))], now);
    drain(&mut peers);
    peers.expired([(peer, addr(1))]);
    peers.handle_timeout(now + REDIAL_INTERVAL);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Dial {
            peer,
            addrs: vec![addr(2)]
        }]
    );
    peers.expired([(peer, addr(2))]);
    peers.handle_timeout(now + REDIAL_INTERVAL * 2);
    assert!(drain(&mut peers).is_empty());
}

#[test]
fn an_explicit_address_is_dialled_once_until_that_dial_ends() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    assert_eq!(peers.add_explicit(addr(1)), Ok(Some(addr(1))));
    peers.dial_started(&addr(1), conn(7));
    assert_eq!(peers.add_explicit(addr(1)), Ok(None), "a dial is in flight");
    peers.handle_timeout(now + REDIAL_INTERVAL);
    assert!(drain(&mut peers).is_empty());
    peers.dial_failed(conn(7), "refused");
    peers.handle_timeout(now + REDIAL_INTERVAL * 2);
    assert_eq!(drain(&mut peers), [PeerAction::DialAddress(addr(1))]);
}

#[test]
fn an_explicit_peer_is_learned_on_connect_and_redialled_only_when_gone() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let peer = PeerId::random();
    peers.add_explicit(addr(1)).unwrap();
    peers.dial_started(&addr(1), conn(3));
    peers.connected(peer, conn(3), addr(1), now);
    peers.handle_timeout(now + REDIAL_INTERVAL);
    assert!(drain(&mut peers).is_empty(), "connected: no redial");
    peers.closed(peer, conn(3), now);
    peers.handle_timeout(now + REDIAL_INTERVAL * 2);
    assert_eq!(drain(&mut peers), [PeerAction::DialAddress(addr(1))]);
}

#[test]
fn an_explicit_address_with_a_peer_id_is_not_dialled_while_that_peer_is_connected() {
    let now = Instant::now();
    let (mut peers, peer) = with_member(now);
    let with_id = addr(9).with(Protocol::P2p(peer));
    assert_eq!(peers.add_explicit(with_id), Ok(None));
}

#[test]
fn explicit_addresses_are_bounded() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    for port in 0..MAX_EXPLICIT_PEERS as u16 {
        peers.add_explicit(addr(port)).unwrap();
    }
    assert_eq!(peers.add_explicit(addr(60000)), Err(TooManyPeers));
    assert!(
        peers.add_explicit(addr(0)).is_ok(),
        "a known address is still fine"
    );
}

#[test]
fn the_list_shows_members_only_sorted_with_their_names_and_addresses() {
    let now = Instant::now();
    let (mut peers, member) = with_member(now);
    peers.connected(PeerId::random(), conn(9), addr(9), now);
    let list = peers.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].peer_id, member.to_string());
    assert_eq!(list[0].name.as_deref(), Some("h1"));
    assert_eq!(list[0].connected_addrs, [addr(1).to_string()]);
    assert_eq!(list[0].listen_addrs, [addr(7421).to_string()]);
}

#[test]
fn names_come_from_the_agent_suffix() {
    assert_eq!(name_from_agent(&agent(Some("h 1"))).as_deref(), Some("h 1"));
    assert_eq!(name_from_agent(&agent(None)), None);
    assert_eq!(name_from_agent("meshbus/0.1.0 (unclosed"), None);
}

#[test]
fn the_timeout_is_the_earliest_deadline() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    assert_eq!(peers.poll_timeout(), now + PING_INTERVAL);
    peers.handle_timeout(now + PING_INTERVAL);
    assert_eq!(peers.poll_timeout(), now + REDIAL_INTERVAL);
}

#[test]
fn membership_events_name_the_peer_on_reserved_topics() {
    let peer = PeerId::random();
    let joined = Membership::Joined {
        peer,
        name: Some("h1".into()),
    };
    assert_eq!(joined.topic(), "_mesh.peer.joined");
    assert_eq!(joined.data()["peer"], peer.to_string());
    assert_eq!(joined.data()["name"], "h1");
    let left = Membership::Left { peer };
    assert_eq!(left.topic(), "_mesh.peer.left");
    assert_eq!(left.data()["peer"], peer.to_string());
    assert!(crate::topic::Topic::new(left.topic())
        .unwrap()
        .is_reserved());
    let failed = Membership::Failed { peer };
    assert_eq!(failed.topic(), "_mesh.peer.failed");
    assert_eq!(failed.data()["peer"], peer.to_string());
}

#[test]
fn anti_entropy_asks_every_member_of_a_small_mesh_each_round_and_a_large_one_in_turn() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    peers.busy(now);
    let mut members: Vec<(PeerId, ConnectionId)> = Vec::new();
    let join = |peers: &mut Peers, i: usize| {
        let peer = PeerId::random();
        peers.connected(peer, conn(i), addr(i as u16), now);
        peers.identified(peer, PROTOCOL_VERSION, agent(None), vec![]);
        drain(peers);
        (peer, conn(i))
    };
    let ids = |members: &[(PeerId, ConnectionId)]| {
        let mut ids: Vec<PeerId> = members.iter().map(|(p, _)| *p).collect();
        ids.sort();
        ids
    };
    for i in 0..MARKS_PER_ROUND {
        members.push(join(&mut peers, i));
    }
    for _ in 0..3 {
        assert_eq!(
            peers.marks_round(now),
            ids(&members),
            "a small mesh: all, every round"
        );
    }

    // More members than a round asks: each round asks MARKS_PER_ROUND distinct members, and
    // every member is asked within the rounds it takes to go round.
    for i in MARKS_PER_ROUND..(MARKS_PER_ROUND * 5 / 2) {
        members.push(join(&mut peers, i));
    }
    let rounds = members.len().div_ceil(MARKS_PER_ROUND);
    let asked_within = |peers: &mut Peers, rounds: usize| {
        let mut asked: Vec<PeerId> = Vec::new();
        for _ in 0..rounds {
            let round = peers.marks_round(now);
            let mut distinct = round.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), MARKS_PER_ROUND, "{round:?}");
            asked.extend(round);
        }
        asked.sort();
        asked.dedup();
        asked
    };
    assert_eq!(asked_within(&mut peers, rounds), ids(&members));

    // A member that leaves drops out of the turn, also when it was the last one asked.
    let last = *peers.marks_round(now).last().unwrap();
    let at = members.iter().position(|(p, _)| *p == last).unwrap();
    let (gone, id) = members.remove(at);
    peers.closed(gone, id, now);
    drain(&mut peers);
    let rounds = members.len().div_ceil(MARKS_PER_ROUND);
    assert_eq!(asked_within(&mut peers, rounds), ids(&members));
}

#[test]
fn each_peer_starts_its_marks_turn_after_its_own_id() {
    let now = Instant::now();
    let mut ids: Vec<PeerId> = (0..3 * MARKS_PER_ROUND).map(|_| PeerId::random()).collect();
    ids.sort();
    let table = |me: PeerId| {
        let mut peers = Peers::new(me, now);
        for (i, peer) in ids.iter().enumerate().filter(|(_, p)| **p != me) {
            peers.connected(*peer, conn(i), addr(i as u16), now);
            peers.identified(*peer, PROTOCOL_VERSION, agent(None), vec![]);
        }
        drain(&mut peers);
        peers
    };
    let (a, b) = (ids[0], ids[MARKS_PER_ROUND]);
    let first_a = table(a).marks_round(now);
    let first_b = table(b).marks_round(now);
    assert_eq!(first_a[0], ids[1]);
    assert_eq!(first_b[0], ids[MARKS_PER_ROUND + 1]);
    assert!(
        first_a.iter().all(|p| !first_b.contains(p)),
        "{first_a:?} {first_b:?}"
    );
}

#[test]
fn a_quiet_peer_asks_for_marks_every_quiet_round_and_a_busy_one_every_round() {
    let start = Instant::now();
    let (mut peers, member) = with_member(start);
    // The swarm task's rounds, one a second from `from` to `to`: the seconds that asked.
    let asking = |peers: &mut Peers, from: u64, to: u64| -> Vec<u64> {
        (from..to)
            .filter(|s| {
                let round = peers.marks_round(start + Duration::from_secs(*s));
                assert!(round.is_empty() || round == [member], "{round:?}");
                !round.is_empty()
            })
            .collect()
    };
    let quiet = QUIET_AFTER.as_secs();
    let every = QUIET_MARKS_EVERY.as_secs();
    assert!(every > 1, "a quiet round must be rarer than a busy one");

    // Busy from the start: every round asks until the peer has been quiet for QUIET_AFTER.
    peers.busy(start);
    assert_eq!(asking(&mut peers, 1, quiet), (1..quiet).collect::<Vec<_>>());
    // Quiet: a round every QUIET_MARKS_EVERY after the last busy one.
    let until = quiet + 3 * every;
    let want: Vec<u64> = (1..=3).map(|k| quiet - 1 + k * every).collect();
    assert_eq!(asking(&mut peers, quiet, until), want);

    // Events move again: the very next round asks, and every one after it.
    peers.busy(start + Duration::from_secs(until));
    assert_eq!(
        asking(&mut peers, until + 1, until + 5),
        (until + 1..until + 5).collect::<Vec<_>>()
    );
}

#[test]
fn only_what_a_lan_peer_may_have_missed_is_forwarded() {
    let now = Instant::now();
    let (mut peers, lan) = with_member(now);
    let other = PeerId::random();
    peers.connected(other, conn(2), addr(2), now);
    peers.identified(other, PROTOCOL_VERSION, agent(Some("h2")), vec![addr(7422)]);
    // Both met by `--peer` or by accepting them: a chain is possible, everything goes on.
    assert!(peers.forwards(&lan, &lan));
    peers.discovered([(lan, addr(1)), (other, addr(2))], now);
    // Both on the LAN: straight from its publisher, every member heard it too.
    assert!(!peers.forwards(&lan, &lan));
    assert!(!peers.forwards(&other, &other));
    // Over a hop, or from a publisher beyond the LAN: it goes on.
    assert!(peers.forwards(&lan, &other));
    let remote = PeerId::random();
    assert!(peers.forwards(&remote, &remote));
    // A member beyond the LAN (this peer bridges to it): everything goes on.
    peers.connected(remote, conn(3), addr(3), now);
    peers.identified(
        remote,
        PROTOCOL_VERSION,
        agent(Some("far")),
        vec![addr(7423)],
    );
    assert!(peers.forwards(&lan, &lan));
    peers.closed(remote, conn(3), now);
    assert!(!peers.forwards(&lan, &lan));
    // A member found by mDNS on another network of this host (a container's): it may not
    // hear the LAN's publishers, so everything goes on.
    let container = PeerId::random();
    let elsewhere: Multiaddr = "/ip4/172.17.0.2/tcp/7421".parse().unwrap();
    peers.discovered([(container, elsewhere.clone())], now);
    peers.connected(container, conn(4), elsewhere.clone(), now);
    peers.identified(
        container,
        PROTOCOL_VERSION,
        agent(Some("c")),
        vec![elsewhere],
    );
    assert!(peers.forwards(&lan, &lan));
}

fn presence(seq: u64, every: Duration) -> Presence {
    Presence {
        seq,
        agent: agent(Some("far")),
        every,
        leaving: false,
    }
}

fn announcements(peers: &mut Peers) -> Vec<Presence> {
    drain(peers)
        .into_iter()
        .filter_map(|a| match a {
            PeerAction::Announce(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn a_member_heard_over_the_mesh_joins_and_fails_when_it_falls_silent() {
    let now = Instant::now();
    let (mut peers, near) = with_member(now);
    let far = PeerId::random();
    peers.discovered([(near, addr(1))], now);
    drain(&mut peers);
    assert!(
        !peers.forwards(&near, &near),
        "one mDNS LAN, all connected: what comes from its publisher stays"
    );
    assert_eq!(
        peers.heard(far, presence(1, roster::EVERY), now),
        Ok(Heard::New)
    );
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Joined {
            peer: far,
            name: Some("far".into())
        })],
        "no request goes to a member that is not connected"
    );
    assert!(peers.is_member(&far) && !peers.is_direct_member(&far));
    assert_eq!(peers.members(), 2);
    assert_eq!(peers.direct_member_ids(), [near]);
    assert_eq!(peers.name_of(&far).as_deref(), Some("far"));
    let shown = peers.list();
    let far_shown = shown.iter().find(|p| p.peer_id == far.to_string()).unwrap();
    assert!(far_shown.connected_addrs.is_empty());
    assert_eq!(far_shown.name.as_deref(), Some("far"));
    // What comes straight from its publisher goes on: `far` hears `near` through us.
    assert!(peers.forwards(&near, &near));

    // Heard again in time, it stays; silent past its missed announcements, it failed.
    let again = now + roster::EVERY;
    assert_eq!(
        peers.heard(far, presence(2, roster::EVERY), again),
        Ok(Heard::Again)
    );
    assert_eq!(
        peers.heard(far, presence(2, roster::EVERY), again),
        Ok(Heard::Stale)
    );
    let expiry = again + roster::EVERY * roster::MISSED + roster::GRACE;
    peers.handle_timeout(expiry - Duration::from_millis(1));
    assert!(!drain(&mut peers)
        .iter()
        .any(|a| matches!(a, PeerAction::Membership(_))));
    // The liveness tick after the expiry finds it.
    peers.handle_timeout(expiry + PING_INTERVAL);
    assert!(drain(&mut peers).contains(&PeerAction::Membership(Membership::Failed { peer: far })));
    assert_eq!(peers.member_ids(), [near]);
}

#[test]
fn a_member_heard_over_the_mesh_leaves_with_its_goodbye() {
    let now = Instant::now();
    let (mut peers, near) = with_member(now);
    let far = PeerId::random();
    peers.heard(far, presence(1, roster::EVERY), now).unwrap();
    drain(&mut peers);
    let bye = Presence {
        leaving: true,
        ..presence(2, roster::EVERY)
    };
    assert_eq!(peers.heard(far, bye, now), Ok(Heard::Leaving));
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Left { peer: far })]
    );
    // A connected member's goodbye over the mesh waits for its connection to close.
    let bye = Presence {
        leaving: true,
        ..presence(3, roster::EVERY)
    };
    peers.heard(near, presence(1, roster::EVERY), now).unwrap();
    peers.heard(near, bye, now).unwrap();
    assert!(drain(&mut peers).is_empty());
    peers.closed(near, conn(1), now);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Left { peer: near })]
    );
}

#[test]
fn a_member_reached_after_it_was_heard_joins_once() {
    let now = Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let far = PeerId::random();
    peers.heard(far, presence(1, roster::EVERY), now).unwrap();
    drain(&mut peers);
    peers.connected(far, conn(1), addr(1), now);
    peers.identified(far, PROTOCOL_VERSION, agent(Some("far")), vec![]);
    assert_eq!(drain(&mut peers), [PeerAction::Reached(far)]);
    assert_eq!(peers.members(), 1);
    assert_eq!(peers.direct_member_ids(), [far]);
    assert_eq!(peers.list().len(), 1);
}

#[test]
fn a_member_lost_without_a_goodbye_is_not_revived_by_its_last_words() {
    let now = Instant::now();
    let (mut peers, near) = with_member(now);
    peers.announcing(agent(Some("me")), 1);
    peers.handle_timeout(now);
    assert_eq!(announcements(&mut peers).len(), 1);
    peers.heard(near, presence(1, roster::EVERY), now).unwrap();
    peers.closed(near, conn(1), now);
    assert_eq!(
        drain(&mut peers),
        [PeerAction::Membership(Membership::Failed { peer: near })],
        "failed at once, whatever was heard of it over the mesh"
    );
    // An announcement still on its way is not taken (a newer one is passed on)...
    let late = now + roster::QUARANTINE - Duration::from_millis(1);
    assert_eq!(
        peers.heard(near, presence(1, roster::EVERY), late),
        Ok(Heard::Stale)
    );
    assert_eq!(
        peers.heard(near, presence(2, roster::EVERY), late),
        Ok(Heard::Held)
    );
    assert!(!peers.is_member(&near));
    // ...and this peer says it is here once the quarantine is over (not only at its next
    // quiet round), so that a peer still reachable through others hears of it again.
    peers.handle_timeout(now + roster::QUARANTINE);
    assert_eq!(announcements(&mut peers).len(), 1);
    // ...but a peer still reachable through others is heard again after the quarantine.
    let after = now + roster::QUARANTINE;
    assert_eq!(
        peers.heard(near, presence(3, roster::EVERY), after),
        Ok(Heard::New)
    );
    assert!(
        drain(&mut peers).contains(&PeerAction::Membership(Membership::Joined {
            peer: near,
            name: Some("far".into())
        }))
    );
}

#[test]
fn a_peer_announces_rarely_while_connected_to_every_member_it_knows() {
    let now = Instant::now();
    let (mut peers, near) = with_member(now);
    peers.announcing(agent(Some("me")), 100);
    // Nobody listens yet: the first announcement goes out when someone subscribes.
    peers.handle_timeout(now);
    let first = announcements(&mut peers);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].seq, 101);
    assert_eq!(first[0].every, roster::QUIET_EVERY);
    let soon = now + Duration::from_millis(10);
    peers.mesh_subscribed(soon);
    assert_eq!(peers.poll_timeout(), now + roster::MIN_GAP_SENT);
    peers.handle_timeout(now + roster::MIN_GAP_SENT);
    assert_eq!(announcements(&mut peers).len(), 1);
    peers.announce_sent();
    let later = now + roster::MIN_GAP_SENT * 2;
    peers.mesh_subscribed(later);
    assert_eq!(
        peers.poll_timeout(),
        now + PING_INTERVAL,
        "once heard, a subscription is no reason to announce"
    );
    // Connected to the one member it knows: quiet.
    peers
        .heard(near, presence(1, roster::EVERY), later)
        .unwrap();
    peers.handle_timeout(now + roster::MIN_GAP_SENT + roster::QUIET_EVERY);
    let quiet = announcements(&mut peers);
    assert_eq!(quiet.len(), 1);
    assert_eq!(quiet[0].every, roster::QUIET_EVERY);

    // A member it is not connected to: it announces soon, then every second.
    let t = now + roster::QUIET_EVERY * 2;
    peers
        .heard(PeerId::random(), presence(1, roster::EVERY), t)
        .unwrap();
    drain(&mut peers);
    assert!(peers.poll_timeout() <= t);
    peers.handle_timeout(t);
    let busy = announcements(&mut peers);
    assert_eq!(busy.len(), 1);
    assert_eq!(busy[0].every, roster::EVERY);
    assert_eq!(peers.poll_timeout(), t + roster::EVERY);

    // Its goodbye is its presence, leaving, numbered after the last.
    let bye = peers.farewell().unwrap();
    assert!(bye.leaving);
    assert_eq!(bye.seq, busy[0].seq + 1);
}

#[test]
fn marks_are_asked_of_connected_members_only() {
    let now = Instant::now();
    let (mut peers, near) = with_member(now);
    peers
        .heard(PeerId::random(), presence(1, roster::EVERY), now)
        .unwrap();
    peers.busy(now);
    assert_eq!(peers.marks_round(now), [near]);
}

#[test]
fn own_announcements_are_not_taken() {
    let now = Instant::now();
    let me = PeerId::random();
    let mut peers = Peers::new(me, now);
    assert_eq!(
        peers.heard(me, presence(1, roster::EVERY), now),
        Ok(Heard::Stale)
    );
    assert_eq!(peers.members(), 0);
}
