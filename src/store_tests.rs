use super::*;
use crate::event::{EventId, JSON};
use crate::topic::Topic;

fn event(source: PeerId, epoch: u64, seq: u64) -> Arc<Event> {
    Arc::new(Event {
        id: EventId::new(),
        topic: Topic::new("a.b").unwrap(),
        event_type: "a.b".into(),
        source,
        seq,
        epoch,
        time: SystemTime::now(),
        content_type: JSON.into(),
        data: bytes::Bytes::from(format!("{seq}")),
    })
}

async fn append(store: &Store, events: Vec<Arc<Event>>, durable: bool) -> Result<(), StoreError> {
    store.append(events, durable).await.unwrap()
}

/// Appends and waits until the events are in the database (a commit of their own).
async fn append_committed(store: &Store, events: Vec<Arc<Event>>) {
    append(store, events, false).await.unwrap();
    store.flush().await.unwrap().unwrap();
}

fn seqs(read: &[(u64, Arc<Event>)]) -> Vec<u64> {
    read.iter().map(|(_, e)| e.seq).collect()
}

#[tokio::test]
async fn events_are_read_back_in_order_from_memory_and_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (me, other) = (PeerId::random(), PeerId::random());
    let (store, opened) = Store::open(Some(dir.path()), me, Retention::default()).unwrap();
    assert_eq!(opened.own_seq, 0);
    let mine: Vec<_> = (1..=3).map(|s| event(me, opened.epoch, s)).collect();
    append(&store, mine, true).await.unwrap();
    append(&store, (1..=2).map(|s| event(other, 9, s)).collect(), false)
        .await
        .unwrap();
    assert_eq!(store.last(), 5);
    let read = store.read_after(1, 10).unwrap();
    assert_eq!(seqs(&read), [2, 3, 1, 2]);
    assert_eq!(read[0].0, 2);
    store.close().await;
    drop(store);
    let (store, opened) = Store::open(Some(dir.path()), me, Retention::default()).unwrap();
    assert_eq!(opened.own_seq, 3, "numbering goes on after a restart");
    let mut streams = opened.streams.clone();
    streams.sort();
    assert!(streams.contains(&(
        StreamId {
            source: other,
            epoch: 9
        },
        2
    )));
    let read = store.read_after(0, 10).unwrap();
    assert_eq!(seqs(&read), [1, 2, 3, 1, 2], "from the disk this time");
    assert_eq!(read[3].1.source, other);
    store.close().await;
}

#[tokio::test]
async fn own_events_are_stored_only_in_order() {
    let me = PeerId::random();
    let (store, opened) = Store::open(None, me, Retention::default()).unwrap();
    let e = opened.epoch;
    append(&store, vec![event(me, e, 1)], true).await.unwrap();
    let err = append(&store, vec![event(me, e, 3)], true)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfOrder {
                expected: 2,
                got: 3
            }
        ),
        "{err}"
    );
    append(&store, vec![event(me, e, 2)], true).await.unwrap();
    assert_eq!(store.last(), 2);
}

#[tokio::test]
async fn a_fetch_answers_in_bounded_ranges_and_says_where_the_stream_starts() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    append(&store, (1..=10).map(|s| event(src, 4, s)).collect(), false)
        .await
        .unwrap();
    let stream = StreamId {
        source: src,
        epoch: 4,
    };
    let r = store.fetch(stream, 3, 6, 1 << 20).unwrap();
    assert_eq!(r.first, 1);
    let got: Vec<u64> = r
        .events
        .iter()
        .map(|b| wire::decode_event(b, src, 1024).unwrap().seq)
        .collect();
    assert_eq!(got, [3, 4, 5, 6]);
    let small = store.fetch(stream, 1, 10, 1).unwrap();
    assert_eq!(
        small.events.len(),
        1,
        "at least one, then within the byte bound"
    );
    let other = store
        .fetch(
            StreamId {
                source: src,
                epoch: 5,
            },
            1,
            10,
            1 << 20,
        )
        .unwrap();
    assert_eq!((other.first, other.events.len()), (0, 0));
}

#[tokio::test]
async fn retention_drops_the_oldest_and_moves_the_stream_start() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let retention = Retention {
        max_events: 5,
        ..Retention::default()
    };
    let (store, _) = Store::open(None, me, retention).unwrap();
    // One commit each, so one record each.
    for seq in 1..=8 {
        append_committed(&store, vec![event(src, 1, seq)]).await;
    }
    let status = store.status();
    assert_eq!((status.first, status.head, status.pruned), (4, 8, 3));
    let read = store.read_after(0, 100).unwrap();
    assert_eq!(
        read[0].0, 4,
        "a reader behind the log jumps to what is left"
    );
    let r = store
        .fetch(
            StreamId {
                source: src,
                epoch: 1,
            },
            1,
            8,
            1 << 20,
        )
        .unwrap();
    assert_eq!((r.first, r.events.len()), (4, 5));
}

#[tokio::test]
async fn a_record_keeps_its_events_in_order_and_a_read_or_fetch_can_start_inside_it() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    append_committed(&store, (1..=10).map(|s| event(src, 2, s)).collect()).await;
    append_committed(&store, (11..=12).map(|s| event(src, 2, s)).collect()).await;
    // Past the memory cache, from the disk: start in the middle of the first record.
    *store.inner.cache.lock().unwrap() = Cache::default();
    assert_eq!(seqs(&store.read_after(6, 4).unwrap()), [7, 8, 9, 10]);
    assert_eq!(seqs(&store.read_after(9, 10).unwrap()), [10, 11, 12]);
    let r = store
        .fetch(
            StreamId {
                source: src,
                epoch: 2,
            },
            9,
            11,
            1 << 20,
        )
        .unwrap();
    let got: Vec<u64> = r
        .events
        .iter()
        .map(|b| wire::decode_event(b, src, 1024).unwrap().seq)
        .collect();
    assert_eq!(got, [9, 10, 11]);
}

#[tokio::test]
async fn cursors_persist_and_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let me = PeerId::random();
    let (store, _) = Store::open(Some(dir.path()), me, Retention::default()).unwrap();
    store.set_cursor("a", 7);
    store.set_cursor("b", 9);
    store.remove_cursor("b");
    assert_eq!(store.cursor("a").unwrap(), Some(7));
    store.close().await;
    drop(store);
    let (store, _) = Store::open(Some(dir.path()), me, Retention::default()).unwrap();
    assert_eq!(store.cursor("a").unwrap(), Some(7));
    assert_eq!(store.cursor("b").unwrap(), None);
    store.close().await;
}

#[tokio::test]
async fn another_peers_log_or_a_stranger_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(Some(dir.path()), PeerId::random(), Retention::default()).unwrap();
    store.close().await;
    drop(store);
    let err = Store::open(Some(dir.path()), PeerId::random(), Retention::default())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    assert!(
        err.to_string().contains("log.redb"),
        "names the file: {err}"
    );

    let junk = tempfile::tempdir().unwrap();
    let path = junk.path().join("log.redb");
    std::fs::write(&path, b"not a database at all, just some bytes").unwrap();
    let err = Store::open(Some(junk.path()), PeerId::random(), Retention::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("log.redb"),
        "names the file: {err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"not a database at all, just some bytes",
        "never wiped"
    );
}

#[tokio::test]
async fn age_counts_from_when_this_peer_stored_an_event_not_from_its_publish_time() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let retention = Retention {
        max_age: Duration::from_secs(3600),
        ..Retention::default()
    };
    let (store, _) = Store::open(None, me, retention).unwrap();
    let mut old = (*event(src, 1, 1)).clone();
    old.time = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    append(&store, vec![Arc::new(old)], false).await.unwrap();
    assert_eq!(store.status().pruned, 0, "history fetched late is kept");
    assert_eq!(seqs(&store.read_after(0, 10).unwrap()), [1]);
}

#[tokio::test]
async fn events_from_other_peers_are_readable_at_once_and_reach_the_disk_within_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(Some(dir.path()), me, Retention::default()).unwrap();
    let mut head = store.head();
    append(&store, (1..=3).map(|s| event(src, 1, s)).collect(), false)
        .await
        .unwrap();
    // Staged: readable, with their offsets, before any commit.
    assert_eq!(*head.borrow_and_update(), 3);
    assert_eq!(seqs(&store.read_after(0, 10).unwrap()), [1, 2, 3]);
    // Committed within the linger without anyone asking: readable from the database.
    let committed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            *store.inner.cache.lock().unwrap() = Cache::default();
            if seqs(&store.read_after(0, 10).unwrap()) == [1, 2, 3] {
                break;
            }
            tokio::time::sleep(LINGER / 5).await;
        }
    });
    committed
        .await
        .expect("staged events committed within the linger");
    // A cursor goes to disk with (or after) the events it covers: reopened, both are there.
    append(&store, (4..=5).map(|s| event(src, 1, s)).collect(), false)
        .await
        .unwrap();
    store.set_cursor("row", 5);
    store.flush().await.unwrap().unwrap();
    drop(store);
    // The writer thread lets go of the database once the last handle is gone.
    let reopened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match Store::open(Some(dir.path()), me, Retention::default()) {
                Ok(opened) => break opened,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    let (store, opened) = reopened.await.expect("the log reopens");
    assert_eq!(store.cursor("row").unwrap(), Some(5));
    assert_eq!(store.last(), 5);
    assert_eq!(opened.streams.len(), 1);
    assert_eq!(seqs(&store.read_after(0, 10).unwrap()), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_publish_commits_the_staged_events_before_it_in_offset_order() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    append(&store, vec![event(src, 1, 1)], false).await.unwrap();
    append(&store, vec![event(me, store.epoch(), 1)], true)
        .await
        .unwrap();
    append(&store, vec![event(src, 1, 2)], false).await.unwrap();
    *store.inner.cache.lock().unwrap() = Cache::default();
    // The durable publish carried the staged event with it, in the order they came.
    let read = store.read_after(0, 10).unwrap();
    let order: Vec<(u64, bool)> = read.iter().map(|(o, e)| (*o, e.source == me)).collect();
    assert_eq!(order[..2], [(1, false), (2, true)]);
}

#[tokio::test]
async fn a_large_repair_is_stored_whole_and_many_appends_at_once_are_all_taken() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    // A gap filled at once: one append larger than anything staged.
    let gap: Vec<Arc<Event>> = (1..=20_000).map(|s| event(src, 1, s)).collect();
    append(&store, gap, false).await.unwrap();
    // Many appends queued together (fetch answers arriving while a commit is on its way).
    let pending: Vec<_> = (0..8u64)
        .map(|i| {
            let from = 20_001 + i * 4000;
            store.append(
                (from..from + 4000).map(|s| event(src, 1, s)).collect(),
                false,
            )
        })
        .collect();
    for rx in pending {
        rx.await.unwrap().expect("taken, not refused");
    }
    store.flush().await.unwrap().unwrap();
    assert_eq!(store.last(), 52_000);
    assert_eq!(store.status().refused, 0);
    *store.inner.cache.lock().unwrap() = Cache::default();
    let read = store.read_after(0, 60_000).unwrap();
    assert_eq!(read.len(), 52_000);
    assert!(read
        .iter()
        .enumerate()
        .all(|(i, (o, e))| *o == i as u64 + 1 && e.seq == *o));
}

#[tokio::test]
async fn a_cursor_reaches_the_database_without_a_flush_and_so_does_its_removal() {
    let (store, _) = Store::open(None, PeerId::random(), Retention::default()).unwrap();
    // What the database holds, not the cursors still waiting in memory.
    let on_disk = |store: &Store| {
        let read = store.inner.db.begin_read().unwrap();
        match read.open_table(CURSORS) {
            Ok(table) => table.get("row").unwrap().map(|g| g.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => panic!("{e}"),
        }
    };
    let written = |want: Option<u64>| {
        let store = store.clone();
        async move {
            // The idle writer sleeps until its next age check; the first cursor waiting
            // wakes it, and it writes within FLUSH_EVERY.
            tokio::time::timeout(Duration::from_secs(5), async {
                while on_disk(&store) != want {
                    tokio::time::sleep(FLUSH_EVERY / 5).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("cursor {want:?} never written"));
        }
    };
    store.set_cursor("row", 3);
    written(Some(3)).await;
    store.set_cursor("row", 4);
    written(Some(4)).await;
    store.remove_cursor("row");
    written(None).await;
}

/// An event of `source` carrying `size` bytes of data.
fn sized(source: PeerId, epoch: u64, seq: u64, size: usize) -> Arc<Event> {
    let mut e = (*event(source, epoch, seq)).clone();
    e.data = bytes::Bytes::from(vec![b'x'; size]);
    Arc::new(e)
}

#[test]
fn the_memory_cache_keeps_its_byte_bound_but_never_drops_a_staged_event() {
    let src = PeerId::random();
    let mib = |seq| sized(src, 1, seq, 1 << 20);
    let mut cache = Cache::default();
    // 64 events of 1 MiB, the first 40 in the database: committed ones go, oldest first,
    // until the rest fit (31 events of 1 MiB and a little).
    for offset in 1..=64 {
        cache.push(offset, mib(offset));
        cache.trim(1, 40);
    }
    assert!(cache.bytes <= CACHE_BYTES);
    assert_eq!(cache.events.front().map(|(o, _)| *o), Some(34));
    assert_eq!(cache.events.len(), 31);
    // 36 more staged (nothing past 64 in the database): all stay, over the bound.
    for offset in 65..=100 {
        cache.push(offset, mib(offset));
        cache.trim(1, 64);
    }
    assert_eq!(cache.events.front().map(|(o, _)| *o), Some(65));
    assert_eq!(cache.events.len(), 36);
    assert_eq!(cache.bytes, 36 * mib(0).footprint());
    // Retention dropped up to 69: those go, staged or not.
    cache.trim(70, 64);
    assert_eq!(cache.events.front().map(|(o, _)| *o), Some(70));
    assert_eq!(cache.bytes, 31 * mib(0).footprint());
    // Small events: the count bound.
    let mut cache = Cache::default();
    for offset in 1..=(CACHE_EVENTS as u64 + 10) {
        cache.push(offset, event(src, 1, offset));
    }
    cache.trim(1, 5);
    assert_eq!(
        cache.events.front().map(|(o, _)| *o),
        Some(6),
        "staged ones stay"
    );
    cache.trim(1, u64::MAX);
    assert_eq!(cache.events.len(), CACHE_EVENTS);
    assert_eq!(cache.events.front().map(|(o, _)| *o), Some(11));
}

#[tokio::test]
async fn large_events_past_the_memory_cache_are_read_back_from_the_database_in_order() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    // 48 MiB in 8 commits: more than the cache keeps.
    for from in (1..=192u64).step_by(24) {
        append_committed(
            &store,
            (from..from + 24)
                .map(|s| sized(src, 1, s, 256 << 10))
                .collect(),
        )
        .await;
    }
    {
        let cache = store.inner.cache.lock().unwrap();
        assert!(cache.bytes <= CACHE_BYTES, "{} bytes cached", cache.bytes);
        assert!(cache.events.front().is_some_and(|(o, _)| *o > 1));
    }
    let read = store.read_after(0, 1000).unwrap();
    assert_eq!(read.len(), 192);
    assert!(read
        .iter()
        .enumerate()
        .all(|(i, (o, e))| *o == i as u64 + 1 && e.seq == *o && e.data.len() == 256 << 10));
}

#[tokio::test]
async fn a_fetch_whose_cache_part_was_dropped_while_it_read_says_so_instead_of_answering_short() {
    let (me, src) = (PeerId::random(), PeerId::random());
    let (store, _) = Store::open(None, me, Retention::default()).unwrap();
    append_committed(&store, (1..=10).map(|s| event(src, 1, s)).collect()).await;
    let stream = StreamId {
        source: src,
        epoch: 1,
    };
    assert_eq!(
        store.fetch(stream, 1, 20, 1 << 20).unwrap().events.len(),
        10
    );
    // As a fetch sees it when commits moved offsets 3.. into the database and the cache
    // dropped them after it read how far the database went (2), but before it read the
    // cache: the cache starts at 6, so offsets 3 to 5 are in neither part it read.
    store.inner.committed.store(2, Ordering::Release);
    lock(&store.inner.cache).trim(6, 10);
    assert!(matches!(
        store.fetch(stream, 1, 20, 1 << 20),
        Err(StoreError::Moving)
    ));
    // Once the parts meet again, it answers.
    store.inner.committed.store(10, Ordering::Release);
    assert_eq!(
        store.fetch(stream, 1, 20, 1 << 20).unwrap().events.len(),
        10
    );
}
