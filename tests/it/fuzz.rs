//! Property tests with a mutation corpus, in place of cargo-fuzz (no nightly toolchain
//! here): every parser that takes input from a peer, a user, a file or a browser is fed
//! mutated seeds and arbitrary bytes, and must answer with a value or an error, never a
//! panic. Seeds live in `tests/corpus/`; an input that ever crashed one is kept there.

use std::path::Path;

use futures::io::Cursor;
use libp2p::request_response::Codec as _;
use libp2p::{PeerId, StreamProtocol};
use meshbus::config::file::ConfigFile;
use meshbus::event::{Event, EventId, JSON};
use meshbus::{Pattern, Topic};
use proptest::prelude::*;

const CASES: u32 = 2048;

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/corpus")
            .join(name),
    )
    .unwrap()
}

fn corpus_files(prefix: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    seeds
}

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Repeat(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ];
    proptest::collection::vec(edit, 1..12)
}

/// `seed` with `edits` applied (positions taken modulo its length).
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for edit in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *edit {
            Edit::Replace(i, b) if !out.is_empty() => {
                let i = at(i, out.len());
                out[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = at(i, out.len() + 1);
                out.insert(i, b);
            }
            Edit::Delete(i) if !out.is_empty() => {
                let i = at(i, out.len());
                out.remove(i);
            }
            Edit::Truncate(i) => out.truncate(at(i, out.len() + 1)),
            Edit::Repeat(i, n) if !out.is_empty() => {
                let i = at(i, out.len());
                let chunk: Vec<u8> = out[i..].iter().take(8).copied().collect();
                for _ in 0..n {
                    out.splice(i..i, chunk.iter().copied());
                }
            }
            _ => {}
        }
    }
    out
}

fn sample_batch() -> Vec<u8> {
    let event = |topic: &str, seq, data: &'static [u8]| Event {
        id: EventId::new(),
        topic: Topic::new(topic).unwrap(),
        event_type: topic.into(),
        source: PeerId::random(),
        seq,
        epoch: 1,
        time: std::time::SystemTime::now(),
        content_type: JSON.into(),
        data: bytes::Bytes::from_static(data),
    };
    let events = [
        event("orders.created", 1, b"{\"id\":1}"),
        event("a.b", 2, b"\"x\""),
    ];
    meshbus::wire::encode_batch(events.iter())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_wire_decoder_survives_mutated_batches(edits in edits(), raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        let seed = sample_batch();
        for input in [mutate(&seed, &edits), raw] {
            let _ = meshbus::wire::decode_batch(input.clone(), PeerId::random(), 1024);
            let _ = meshbus::proto::receive(Some(PeerId::random()), input, 1024, std::time::SystemTime::now());
        }
    }

    #[test]
    fn the_repair_codec_survives_mutated_messages(edits in edits()) {
        let protocol = StreamProtocol::new("/meshbus/repair/1");
        let mut codec = meshbus::node::repair::Codec;
        let request = meshbus::node::repair::Request { kind: 2, source: PeerId::random().to_bytes(), epoch: 1, from: 1, to: 9, ..Default::default() };
        let response = meshbus::node::repair::Response { marks: vec![], first: 1, events: vec![sample_batch()], error: String::new() };
        let frame = |body: Vec<u8>| {
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend(body);
            out
        };
        use prost::Message as _;
        let req = mutate(&frame(request.encode_to_vec()), &edits);
        let res = mutate(&frame(response.encode_to_vec()), &edits);
        futures::executor::block_on(async {
            let _ = codec.read_request(&protocol, &mut Cursor::new(req)).await;
            let _ = codec.read_response(&protocol, &mut Cursor::new(res)).await;
        });
    }

    #[test]
    fn topics_and_patterns_parse_or_refuse(edits in edits(), text in "\\PC{0,80}") {
        let seeds = String::from_utf8(corpus("topics.txt")).unwrap();
        for seed in seeds.lines() {
            let input = String::from_utf8_lossy(&mutate(seed.as_bytes(), &edits)).into_owned();
            for s in [input.as_str(), text.as_str()] {
                let topic = Topic::new(s);
                let pattern = Pattern::new(s);
                if let (Ok(t), Ok(p)) = (topic, pattern) {
                    prop_assert!(p.matches(&t), "a topic is a pattern matching itself: {s:?}");
                }
            }
        }
    }

    #[test]
    fn the_config_loader_answers_every_file_with_a_value_or_a_line(edits in edits()) {
        let mut seeds = corpus_files("config-");
        seeds.push(std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/meshbus.toml")).unwrap());
        for seed in seeds {
            let text = String::from_utf8_lossy(&mutate(&seed, &edits)).into_owned();
            if let Err(e) = ConfigFile::parse(Path::new("fuzz.toml"), &text) {
                prop_assert!(e.line <= text.lines().count() + 1, "{e}");
            }
        }
    }

    #[test]
    fn api_requests_parse_or_refuse(edits in edits()) {
        for seed in corpus_files("request-") {
            let body = mutate(&seed, &edits);
            if let Ok(one) = serde_json::from_slice::<meshbus::api::PublishRequest>(&body) {
                let _ = one.payload();
            }
            if let Ok(many) = serde_json::from_slice::<Vec<meshbus::api::PublishRequest>>(&body) {
                for r in many {
                    let _ = r.payload();
                }
            }
        }
    }

    #[test]
    fn keyrings_invitations_and_the_key_handshake_refuse_garbage(edits in edits(), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
        use meshbus::keyring::{Keyring, MeshKey};
        let key = MeshKey::generate();
        let ring = Keyring::new(key);
        let file = mutate(ring.to_file().as_bytes(), &edits);
        let _ = Keyring::from_file(&String::from_utf8_lossy(&file), Path::new("mesh.keys"));
        let invite = mutate(key.invite().as_bytes(), &edits);
        let _ = MeshKey::from_invite(&String::from_utf8_lossy(&invite));
        // A listener fed a dialer's garbage refuses it, without a panic.
        futures::executor::block_on(async {
            let socket = Duplex { input: Cursor::new(raw), output: Vec::new() };
            prop_assert!(meshbus::node::private::accept(socket, &ring).await.is_err());
            Ok(())
        })?;
    }
}

/// Reads from a buffer and swallows writes: one side of a connection, for the handshake.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl futures::AsyncRead for Duplex {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl futures::AsyncWrite for Duplex {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.output.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
