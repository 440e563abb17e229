use super::*;
use crate::event::{EventId, JSON};
use crate::topic::Topic;

fn event(source: PeerId, seq: u64) -> Event {
    Event {
        id: EventId::new(),
        topic: Topic::new("a.b").unwrap(),
        event_type: "a.b".into(),
        source,
        seq,
        epoch: 7,
        time: std::time::SystemTime::now(),
        content_type: JSON.into(),
        data: bytes::Bytes::from_static(b"1"),
    }
}

fn stream(source: PeerId) -> StreamId {
    StreamId { source, epoch: 7 }
}

fn ready(inbox: &mut Inbox) -> Vec<u64> {
    std::iter::from_fn(|| inbox.poll_ready())
        .map(|e| e.seq)
        .collect()
}

#[test]
fn events_in_order_are_ready_at_once_and_repeats_are_duplicates() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    for seq in 1..=3 {
        assert_eq!(inbox.receive(event(src, seq), src, now), Received::Fresh);
    }
    assert_eq!(ready(&mut inbox), [1, 2, 3]);
    assert_eq!(inbox.receive(event(src, 2), src, now), Received::Duplicate);
    assert!(ready(&mut inbox).is_empty());
    assert_eq!(inbox.high(&stream(src)), 3);
}

#[test]
fn a_replayed_event_is_a_duplicate_however_late_and_after_a_restart() {
    // The old de-dup window was a cache of message ids that forgot after a minute; the inbox
    // remembers how far each publisher's stream got, for as long as the log does.
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    let captured = event(src, 1);
    assert_eq!(inbox.receive(captured.clone(), src, now), Received::Fresh);
    assert_eq!(ready(&mut inbox), [1]);
    for later in [75, 3600, 30 * 24 * 3600] {
        let at = now + Duration::from_secs(later);
        assert_eq!(
            inbox.receive(captured.clone(), src, at),
            Received::Duplicate,
            "{later} s"
        );
    }
    // A restarted peer restores the stream's high mark from its log.
    let mut restarted = Inbox::new(me);
    restarted.restore(stream(src), 1, now);
    assert_eq!(restarted.receive(captured, src, now), Received::Duplicate);
}

#[test]
fn early_events_wait_for_the_gap_and_come_out_in_order() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    inbox.receive(event(src, 1), src, now);
    inbox.receive(event(src, 4), src, now);
    inbox.receive(event(src, 3), src, now);
    assert_eq!(inbox.receive(event(src, 4), src, now), Received::Duplicate);
    assert_eq!(ready(&mut inbox), [1]);
    assert_eq!(inbox.buffered(), 2);
    inbox.receive(event(src, 2), src, now);
    assert_eq!(ready(&mut inbox), [2, 3, 4]);
    assert_eq!(inbox.buffered(), 0);
}

#[test]
fn a_gap_is_fetched_from_a_holder_only_after_gap_wait() {
    let (me, src, fwd) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.receive(event(src, 1), src, t0);
    inbox.receive(event(src, 5), fwd, t0);
    assert!(
        inbox.poll_fetch(t0, |_| true).is_empty(),
        "gossip may still fill it"
    );
    assert_eq!(inbox.poll_timeout(), Some(t0 + GAP_WAIT));
    let fetches = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!(
        fetches,
        [Fetch {
            peer: fwd,
            stream: stream(src),
            from: 2,
            to: 5
        }]
    );
    // Asked: not again until the answer or the timeout.
    assert!(inbox.poll_fetch(t0 + GAP_WAIT, |_| true).is_empty());
    let events = (2..=4).map(|s| event(src, s)).collect();
    let (fresh, dups) = inbox.fetched(stream(src), fwd, 1, events, false, t0 + GAP_WAIT);
    assert_eq!((fresh, dups), (3, 0));
    assert_eq!(ready(&mut inbox), [1, 2, 3, 4, 5]);
    assert_eq!(inbox.poll_timeout(), None);
}

#[test]
fn a_mark_ahead_of_us_fetches_and_a_short_answer_goes_on_at_once() {
    let (me, src, peer) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    assert!(inbox.learn(stream(src), 10_000, peer, t0));
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!((f[0].from, f[0].to), (1, FETCH_MAX_EVENTS));
    let events = (1..=100).map(|s| event(src, s)).collect();
    inbox.fetched(stream(src), peer, 1, events, true, t0 + GAP_WAIT);
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!(f[0].from, 101, "the rest is asked for without waiting");
}

#[test]
fn what_the_publisher_no_longer_holds_is_reported_lost() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.learn(stream(src), 50, src, t0);
    inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    let events = (41..=50).map(|s| event(src, s)).collect();
    inbox.fetched(stream(src), src, 41, events, false, t0);
    assert_eq!(
        inbox.poll_lost(),
        Some(Lost {
            stream: stream(src),
            from: 1,
            to: 40
        })
    );
    assert_eq!(ready(&mut inbox), (41..=50).collect::<Vec<_>>());
}

#[test]
fn a_forwarder_without_the_start_is_not_taken_at_its_word_while_others_hold_it() {
    let (me, src, a, b) = (
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
    );
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.learn(stream(src), 20, b, t0);
    inbox.learn(stream(src), 20, a, t0);
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!(f[0].peer, a);
    inbox.fetched(stream(src), a, 11, Vec::new(), false, t0);
    assert_eq!(inbox.poll_lost(), None);
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!((f[0].peer, f[0].from), (b, 1));
}

#[test]
fn an_unanswered_fetch_is_asked_again_of_another_holder() {
    let (me, src, a, b) = (
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
    );
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.learn(stream(src), 5, b, t0);
    inbox.learn(stream(src), 5, a, t0);
    assert_eq!(inbox.poll_fetch(t0 + GAP_WAIT, |_| true)[0].peer, a);
    assert!(inbox
        .poll_fetch(t0 + GAP_WAIT + ASK_TIMEOUT / 2, |_| true)
        .is_empty());
    let again = inbox.poll_fetch(t0 + GAP_WAIT + ASK_TIMEOUT, |_| true);
    assert_eq!(again[0].peer, b);
    // A failure is asked again of the next holder after a short wait, and a holder that is
    // not connected is never asked.
    let t1 = t0 + GAP_WAIT + ASK_TIMEOUT;
    inbox.fetch_failed(stream(src), b, t1);
    assert!(
        inbox.poll_fetch(t1, |_| true).is_empty(),
        "no storm of retries"
    );
    let t2 = t1 + GAP_WAIT;
    let next = inbox.poll_fetch(t2, |p| *p == a);
    assert_eq!(next[0].peer, a);
    // With no holder connected, the stream waits a while rather than being due at once.
    inbox.fetch_failed(stream(src), a, t2);
    let t3 = t2 + GAP_WAIT;
    assert!(inbox.poll_fetch(t3, |_| false).is_empty());
    assert_eq!(inbox.poll_timeout(), Some(t3 + GAP_WAIT));
}

#[test]
fn a_loss_never_covers_what_is_buffered_nor_more_than_the_holder_claimed() {
    let (me, src, fwd) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.receive(event(src, 1), src, t0);
    for seq in 12..=20 {
        inbox.receive(event(src, seq), fwd, t0);
    }
    assert_eq!(ready(&mut inbox), [1]);
    inbox.learn(stream(src), 20, src, t0);
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |p| *p == src);
    assert_eq!((f[0].peer, f[0].from), (src, 2));
    // The publisher's log starts at 16: 2..=11 are gone, 12..=20 are here.
    inbox.fetched(stream(src), src, 16, Vec::new(), false, t0 + GAP_WAIT);
    assert_eq!(
        inbox.poll_lost(),
        Some(Lost {
            stream: stream(src),
            from: 2,
            to: 11
        })
    );
    assert_eq!(ready(&mut inbox), (12..=20).collect::<Vec<_>>());

    // A holder answering `first = u64::MAX` can claim no more than it said it held.
    let other = PeerId::random();
    inbox.learn(
        StreamId {
            source: other,
            epoch: 7,
        },
        30,
        other,
        t0,
    );
    inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    inbox.fetched(
        StreamId {
            source: other,
            epoch: 7,
        },
        other,
        u64::MAX,
        Vec::new(),
        false,
        t0,
    );
    assert_eq!(inbox.poll_lost().map(|l| (l.from, l.to)), Some((1, 30)));
    assert_eq!(
        inbox.high(&StreamId {
            source: other,
            epoch: 7
        }),
        30
    );
}

#[test]
fn buffers_are_bounded_in_bytes_too() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    let big = |seq| {
        let mut e = event(src, seq);
        e.data = bytes::Bytes::from(vec![b'1'; 1 << 20]);
        e
    };
    let fits = MAX_BUFFERED_BYTES_PER_STREAM / ((1 << 20) + 256);
    for seq in 2..2 + fits as u64 {
        assert_eq!(inbox.receive(big(seq), src, now), Received::Fresh);
    }
    assert_eq!(
        inbox.receive(big(2 + fits as u64 + 1), src, now),
        Received::Deferred
    );
}

#[test]
fn own_events_are_never_fetched_or_taken_from_others() {
    let me = PeerId::random();
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    inbox.published(stream(me), 3, now);
    assert_eq!(
        inbox.receive(event(me, 4), PeerId::random(), now),
        Received::Duplicate
    );
    inbox.learn(stream(me), 9, PeerId::random(), now);
    assert!(inbox.poll_fetch(now + ASK_TIMEOUT, |_| true).is_empty());
    assert_eq!(inbox.marks().collect::<Vec<_>>(), [(stream(me), 3)]);
}

#[test]
fn streams_and_buffers_are_bounded() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    assert_eq!(
        inbox.receive(event(src, MAX_BUFFERED + 2), src, now),
        Received::Deferred
    );
    assert_eq!(inbox.buffered(), 0);
    for _ in 1..MAX_STREAMS {
        inbox.receive(event(PeerId::random(), 1), src, now);
    }
    assert_eq!(inbox.len(), MAX_STREAMS);
    assert_eq!(
        inbox.receive(event(PeerId::random(), 1), src, now),
        Received::TooManyStreams
    );
    assert!(!inbox.learn(stream(PeerId::random()), 3, src, now));
}

#[test]
fn an_answer_that_fills_nothing_asks_elsewhere_or_waits_instead_of_asking_again_at_once() {
    let (me, src, a) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let t0 = Instant::now();
    inbox.receive(event(src, 1), src, t0);
    inbox.learn(stream(src), 9, a, t0);
    let f = inbox.poll_fetch(t0 + GAP_WAIT, |_| true);
    assert_eq!((f[0].peer, f[0].from, f[0].to), (a, 2, 9));
    // `a` holds none of it after all.
    let t1 = t0 + GAP_WAIT;
    inbox.fetched(stream(src), a, 0, Vec::new(), false, t1);
    assert!(inbox.poll_fetch(t1, |_| true).is_empty(), "no busy loop");
    assert_eq!(
        inbox.poll_timeout(),
        Some(t1 + GAP_WAIT),
        "it looks again later"
    );
    assert!(
        inbox.poll_fetch(t1 + GAP_WAIT, |_| true).is_empty(),
        "and does not ask `a` again"
    );
    // Someone who does hold it is asked, for what it holds.
    inbox.learn(stream(src), 5, src, t1);
    let f = inbox.poll_fetch(t1 + GAP_WAIT, |_| true);
    assert_eq!((f[0].peer, f[0].from, f[0].to), (src, 2, 5));
}

#[test]
fn a_publisher_cannot_fill_the_table_with_made_up_epochs() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let mut inbox = Inbox::new(me);
    let now = Instant::now();
    let mut outcomes = Vec::new();
    for epoch in 1..=(MAX_EPOCHS_PER_SOURCE as u64 + 100) {
        let e = Event {
            epoch,
            ..event(src, 1)
        };
        outcomes.push(inbox.receive(e, src, now));
    }
    let fresh = outcomes.iter().filter(|o| **o == Received::Fresh).count();
    assert_eq!(fresh, MAX_EPOCHS_PER_SOURCE);
    assert_eq!(inbox.len(), MAX_EPOCHS_PER_SOURCE);
    // Another publisher is still followed.
    let other = PeerId::random();
    assert_eq!(inbox.receive(event(other, 1), other, now), Received::Fresh);
}
