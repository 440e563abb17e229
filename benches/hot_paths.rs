//! Micro-benchmarks of the IO-free hot paths: `cargo bench --bench hot_paths`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshbus::event::{Event, EventId, JSON};
use meshbus::{wire, Pattern, PeerId, Topic};

fn main() {
    divan::main();
}

fn events(n: usize, size: usize) -> Vec<Event> {
    let source = PeerId::random();
    (0..n)
        .map(|i| Event {
            id: EventId::new(),
            topic: Topic::new("orders.created").unwrap(),
            event_type: "orders.created".into(),
            source,
            seq: i as u64 + 1,
            epoch: 1,
            time: SystemTime::now() - Duration::from_millis(1),
            content_type: JSON.into(),
            data: Bytes::from(format!("\"{}\"", "x".repeat(size - 2))),
        })
        .collect()
}

/// Encoding a gossipsub payload of `n` 256-byte events.
#[divan::bench(args = [1, 100, 250])]
fn encode_batch(bencher: divan::Bencher, n: usize) {
    let events = events(n, 256);
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench(|| wire::encode_batch(divan::black_box(&events)));
}

/// Decoding (and checking) a payload of `n` 256-byte events.
#[divan::bench(args = [1, 100, 250])]
fn decode_batch(bencher: divan::Bencher, n: usize) {
    let events = events(n, 256);
    let source = events[0].source;
    let payload = bytes::Bytes::from(wire::encode_batch(&events));
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench(|| {
            wire::decode_batch(divan::black_box(payload.clone()), source, 256 * 1024).unwrap()
        });
}

/// The CloudEvents JSON line a file or exec handler writes.
#[divan::bench]
fn cloudevent_json_line(bencher: divan::Bencher) {
    let event = &events(1, 256)[0];
    bencher.bench(|| divan::black_box(event).to_json_line());
}

/// A table of 1,000 patterns of the shapes people write, and topics to match against it.
fn table() -> Vec<Pattern> {
    (0..1000)
        .map(|i| match i % 4 {
            0 => format!("svc{i}.orders.created"),
            1 => format!("svc{i}.*.created"),
            2 => format!("svc{i}.**"),
            _ => format!("*.svc{i}.events"),
        })
        .map(|p| Pattern::new(p).unwrap())
        .collect()
}

/// Matching one topic against every row of a 1,000-pattern table (what dispatch does).
#[divan::bench]
fn match_topic_against_1000_patterns(bencher: divan::Bencher) {
    let table = table();
    let topic = Topic::new("svc502.orders.created").unwrap();
    bencher.bench(|| {
        table
            .iter()
            .filter(|p| p.matches(divan::black_box(&topic)))
            .count()
    });
}

/// The log taking one received message of 10 events (a file-backed log): staging makes them
/// readable at once, and the commits that write them are shared (within `store::LINGER`).
/// Before staging, every call cost its own redb commit.
#[divan::bench(sample_count = 20, sample_size = 50)]
fn log_append_received_message(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (store, _) = meshbus::store::Store::open(
        Some(dir.path()),
        PeerId::random(),
        meshbus::store::Retention::default(),
    )
    .unwrap();
    let mut seq = 0u64;
    let template = events(10, 256);
    bencher.bench_local(|| {
        let message: Vec<std::sync::Arc<Event>> = template
            .iter()
            .map(|e| {
                seq += 1;
                std::sync::Arc::new(Event { seq, ..e.clone() })
            })
            .collect();
        runtime
            .block_on(store.append(message, false))
            .unwrap()
            .unwrap();
    });
}

/// The mesh guard's keystream over one 64 KiB write (every byte a peer sends or receives):
/// XChaCha20, as used, and XSalsa20, the `pnet` spec's cipher it replaced.
#[divan::bench(types = [chacha20::XChaCha20, salsa20::XSalsa20])]
fn guard_keystream<C: chacha20::cipher::KeyIvInit + chacha20::cipher::StreamCipher>(
    bencher: divan::Bencher,
) {
    let mut cipher =
        C::new_from_slices(&[7u8; 32], &[9u8; 24]).expect("32-byte key, 24-byte nonce");
    let mut buffer = vec![0u8; 64 * 1024];
    bencher
        .counter(divan::counter::BytesCount::new(buffer.len()))
        .bench_local(|| cipher.apply_keystream(divan::black_box(&mut buffer)));
}

/// Whether a message straight from a LAN publisher goes on from here, at a peer with `n`
/// members all found by mDNS on one subnet (the worst case: every member is looked at).
#[divan::bench(args = [4, 50, 250])]
fn forwarding_decision(bencher: divan::Bencher, n: usize) {
    use meshbus::proto::peers::{agent, PROTOCOL_VERSION};
    use meshbus::proto::Peers;
    let now = std::time::Instant::now();
    let mut peers = Peers::new(PeerId::random(), now);
    let members: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
    for (i, peer) in members.iter().enumerate() {
        let addr: libp2p::Multiaddr = format!("/ip4/10.0.0.{}/tcp/7421", i % 250 + 1)
            .parse()
            .unwrap();
        peers.discovered([(*peer, addr.clone())], now);
        peers.connected(
            *peer,
            libp2p::swarm::ConnectionId::new_unchecked(i),
            addr.clone(),
            now,
        );
        peers.identified(*peer, PROTOCOL_VERSION, agent(None), vec![addr]);
    }
    let publisher = members[0];
    assert!(!peers.forwards(&publisher, &publisher));
    bencher.bench_local(|| peers.forwards(&publisher, &publisher));
}

/// One received message of 10 events through a `file` row, from the log taking it to the
/// row having written it: the row's read of the log, its queue, the JSON lines and the
/// append (one, or two when the row wakes before the log has handed it all ten). The row's
/// cursor commit after it overlaps the next message, as on a peer. A multi-thread runtime
/// as a peer runs, and an in-memory log, so no fsync is measured. The wait for the row
/// spins, reading the row's counters through `Handlers::list`.
#[divan::bench(sample_count = 20, sample_size = 20)]
fn file_row_message(bencher: divan::Bencher) {
    use meshbus::handlers::{Action, FileAction, HandlerSpec, Handlers};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (store, _) =
        meshbus::store::Store::open(None, PeerId::random(), Default::default()).unwrap();
    let handlers = Handlers::new(
        Arc::default(),
        1024,
        Duration::from_secs(1),
        store.clone(),
        None,
    );
    let file = Action::File(FileAction::new(dir.path().join("out.jsonl")));
    runtime
        .block_on(async {
            handlers.add(HandlerSpec::new(Pattern::new("orders.**").unwrap(), file))
        })
        .unwrap();
    let mut seq = 0u64;
    let template = events(10, 256);
    bencher.bench_local(|| {
        let message: Vec<Arc<Event>> = template
            .iter()
            .map(|e| {
                seq += 1;
                Arc::new(Event { seq, ..e.clone() })
            })
            .collect();
        runtime
            .block_on(store.append(message, false))
            .unwrap()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let row = &handlers.list()[0];
            assert_eq!(row.failed, 0, "the file row failed: {:?}", row.last_error);
            if row.succeeded >= seq {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the file row is stuck"
            );
            std::thread::yield_now();
        }
    });
}
