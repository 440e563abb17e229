//! Driving the `meshbus-lab` binary against labs of its own, and finding the `meshbus`
//! binary its peers run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

/// Waiting with a timeout, reading what file handlers wrote, and the namespace checks: shared
/// with meshbus's tests.
pub use meshbus_lab::testing::*;

/// How long the lab tests wait for an event or a view of the mesh.
pub const T: Duration = Duration::from_secs(60);

/// The lab binary under test.
pub const LAB_BIN: &str = env!("CARGO_BIN_EXE_meshbus-lab");

/// The `meshbus` binary the lab's peers run: `MESHBUS_BIN` (e.g. a release build), else the
/// one cargo built beside `meshbus-lab` (it is built for meshbus's own integration tests, so
/// `cargo test` at the workspace root builds both).
pub fn bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESHBUS_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(LAB_BIN).with_file_name("meshbus");
    assert!(
        bin.is_file(),
        "no meshbus binary at {}: run `cargo test` at the workspace root (it builds both \
         binaries), `cargo build --bin meshbus` first, or set MESHBUS_BIN",
        bin.display()
    );
    bin
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name for a test's lab: `mbt…`, so no lab the library names itself (`mb…`, e.g. a
/// `VirtualLan` of another test) contains it; the tests look for it in `ip netns list`.
pub fn lab_prefix() -> String {
    format!(
        "mbt{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A lab of its own for one test, taken down when dropped.
pub struct LabRun {
    pub prefix: String,
    pub root: tempfile::TempDir,
}

impl LabRun {
    /// `meshbus-lab up --peers n` with a file handler for `orders.**` on every host.
    pub fn up(n: usize) -> LabRun {
        Self::up_with(n, &[])
    }

    /// Like [`LabRun::up`], with more `meshbus up` arguments for every peer.
    pub fn up_with(n: usize, extra: &[&str]) -> LabRun {
        Self::up_in(lab_prefix(), tempfile::tempdir().unwrap(), n, extra)
    }

    /// Like [`LabRun::up_with`], in a lab directory prepared by the caller.
    pub fn up_in(prefix: String, root: tempfile::TempDir, n: usize, extra: &[&str]) -> LabRun {
        let lab = LabRun { prefix, root };
        let n = n.to_string();
        let mut args = vec![
            "up",
            "--peers",
            &n,
            "--",
            "--quiet",
            "--on",
            "orders.**=file:{data}/orders.jsonl",
        ];
        args.extend_from_slice(extra);
        let out = lab.run(&args);
        let text = ok(out);
        let formed = text.lines().last().unwrap_or_default();
        assert!(
            formed.starts_with(&format!("mesh of {n} peers formed")),
            "{text}"
        );
        eprintln!("{}: {formed}", lab.prefix);
        lab
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(LAB_BIN)
            .args(["--prefix", &self.prefix])
            .args(args)
            .env("MESHBUS_LAB_DIR", self.root.path())
            .env("MESHBUS_BIN", bin())
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        ok(self.run(args))
    }

    /// `status --json`, by host name.
    pub fn status(&self) -> BTreeMap<String, Value> {
        let hosts: Vec<Value> = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        hosts
            .into_iter()
            .map(|h| (h["host"].as_str().unwrap().to_owned(), h))
            .collect()
    }

    pub fn peer_id(&self, host: &str) -> String {
        self.status()[host]["peer_id"].as_str().unwrap().to_owned()
    }

    pub fn sees(&self, host: &str) -> BTreeSet<String> {
        self.status()[host]["sees"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect()
    }

    pub fn events_file(&self, host: &str) -> PathBuf {
        self.data_file(host, "orders.jsonl")
    }

    /// A file in `host`'s data directory.
    pub fn data_file(&self, host: &str, name: &str) -> PathBuf {
        self.root.path().join(&self.prefix).join(host).join(name)
    }

    /// Starts `meshbus-lab bench-load` inside `host`: `events` events on `topic` at `rate`
    /// per second through its peer's API. Wait for it with [`Loader::wait`].
    pub fn load(&self, host: &str, topic: &str, events: usize, rate: f64) -> Loader {
        let child = Command::new(LAB_BIN)
            .args([
                "--prefix",
                &self.prefix,
                "exec",
                host,
                "--",
                LAB_BIN,
                "bench-load",
            ])
            .args([
                "--events",
                &events.to_string(),
                "--size",
                "64",
                "--topic",
                topic,
            ])
            .args(["--rate", &rate.to_string()])
            .env("MESHBUS_LAB_DIR", self.root.path())
            .env("MESHBUS_BIN", bin())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Loader { child }
    }

    /// Publishes from `host`'s CLI; returns the event id.
    pub fn publish(&self, host: &str, topic: &str) -> String {
        let out: Value = serde_json::from_str(&self.ok(&[
            "exec", host, "--", "meshbus", "publish", topic, "1", "--json",
        ]))
        .unwrap();
        out["id"].as_str().unwrap().to_owned()
    }
}

/// A load running inside a host.
pub struct Loader {
    child: std::process::Child,
}

impl Loader {
    /// Waits for the load to finish; returns how many events were published.
    pub fn wait(self) -> u64 {
        let out = self.child.wait_with_output().unwrap();
        let text = ok(out);
        let report: Value = serde_json::from_str(text.trim()).unwrap();
        report["published"].as_u64().unwrap()
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

pub fn ids_in(path: &Path) -> Vec<String> {
    events_in(path)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

pub fn wait_for_id(path: &Path, id: &str) {
    wait_until(T, &format!("event {id} in {}", path.display()), || {
        ids_in(path).iter().any(|i| i == id)
    });
}
