//! Starting real `meshbus` processes and waiting on what they do.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// Waiting with a timeout, reading what file handlers wrote, and the namespace checks: shared
/// with the lab's own tests.
pub use meshbus_lab::testing::*;

/// The binary under test: `MESHBUS_BIN` (e.g. a release build) or the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("MESHBUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshbus")))
}

/// Lines a child wrote, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn follow(&self, pipe: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }

    /// Everything so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The first line containing `needle`, waiting for it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        wait_for(timeout, &format!("a line containing {needle:?}"), || {
            self.all().into_iter().find(|l| l.contains(needle))
        })
    }
}

/// A running `meshbus up`, killed when dropped.
pub struct Peer {
    child: Child,
    /// Its API address (host-namespace peers only).
    pub api: Option<SocketAddr>,
    /// Its peer id.
    pub peer_id: String,
    /// Its listen addresses, with `/p2p/…`.
    pub listen: Vec<String>,
    /// What it printed on stdout.
    pub stdout: Lines,
    /// What it printed on stderr (logs and the start banner).
    pub stderr: Lines,
    /// Its data directory, when the test made one for it.
    _data: Option<tempfile::TempDir>,
    /// Its data directory's path (for the API token), when known.
    pub data_dir: Option<PathBuf>,
}

/// The mesh key every test peer of this process shares (each data directory gets a copy
/// before its peer starts), so peers of one test connect as members.
pub static MESH: std::sync::LazyLock<meshbus::keyring::Keyring> = std::sync::LazyLock::new(|| {
    meshbus::keyring::Keyring::new(meshbus::keyring::MeshKey::generate())
});

impl Peer {
    /// Starts `meshbus up` from `command` and waits for its start banner.
    pub fn spawn(mut command: Command) -> Peer {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start meshbus up");
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.follow(child.stdout.take().unwrap());
        stderr.follow(child.stderr.take().unwrap());
        let mut peer = Peer {
            child,
            api: None,
            peer_id: String::new(),
            listen: Vec::new(),
            stdout,
            stderr,
            _data: None,
            data_dir: None,
        };
        let banner = wait_for(Duration::from_secs(20), "the peer's start banner", || {
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!("meshbus up exited with {status}: {:#?}", peer.stderr.all());
            }
            let lines = peer.stderr.all();
            let up = lines.iter().position(|l| l.starts_with("meshbus: peer "))?;
            // The banner is written in one go; the listen lines follow the api line.
            lines
                .iter()
                .skip(up)
                .any(|l| l.starts_with("meshbus: listening on "))
                .then_some(lines)
        });
        for line in banner {
            if let Some(rest) = line.strip_prefix("meshbus: peer ") {
                peer.peer_id = rest.split_whitespace().next().unwrap().to_owned();
            } else if let Some(rest) = line.strip_prefix("meshbus: api http://") {
                peer.api = Some(rest.trim().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("meshbus: listening on ") {
                peer.listen.push(rest.trim().to_owned());
            }
        }
        peer
    }

    /// A peer in the host namespace: no mDNS, loopback only, ports picked by the kernel.
    pub fn local(args: &[&str]) -> Peer {
        let data = tempfile::tempdir().unwrap();
        MESH.save(data.path()).unwrap();
        let mut command = Command::new(bin());
        command.env("MESHBUS_DATA_DIR", data.path()).args([
            "up",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
            "--quiet",
        ]);
        command.args(args);
        let mut peer = Peer::spawn(command);
        peer.data_dir = Some(data.path().to_owned());
        peer._data = Some(data);
        peer
    }

    /// Its full-access API token (from its data directory).
    pub fn token(&self) -> String {
        let dir = self
            .data_dir
            .as_ref()
            .expect("a peer whose data dir the test made");
        std::fs::read_to_string(dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// An API client for it, with its token.
    pub fn client(&self) -> meshbus::api::Client {
        meshbus::api::Client::new(self.api.expect("a host-namespace peer"))
            .with_token(Some(self.token()))
    }

    /// `meshbus ARGS… --api ITS_API`, with its data directory (so its token) in the
    /// environment, to run as the test likes.
    pub fn command(&self, args: &[&str]) -> Command {
        let api = self.api.expect("a host-namespace peer").to_string();
        let mut command = Command::new(bin());
        command.args(args).args(["--api", &api]);
        if let Some(dir) = &self.data_dir {
            command.env("MESHBUS_DATA_DIR", dir);
        }
        command
    }

    /// Its TCP listen address.
    pub fn tcp_addr(&self) -> &str {
        self.listen
            .iter()
            .find(|a| a.contains("/tcp/"))
            .expect("a TCP address")
    }

    /// Runs `meshbus ARGS… --api ITS_API` and returns what it did.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run meshbus")
    }

    /// Runs a CLI command that must succeed and returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        ok(self.cli(args))
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["status", "--json"])).unwrap()
    }

    /// Peer ids from `peers --json`.
    pub fn peer_ids(&self) -> Vec<String> {
        peer_ids(&self.cli_ok(&["peers", "--json"]))
    }

    /// The members it is connected to (not those it only heard of over the mesh).
    pub fn connected_peer_ids(&self) -> Vec<String> {
        let peers: Vec<Value> = serde_json::from_str(&self.cli_ok(&["peers", "--json"])).unwrap();
        peers
            .iter()
            .filter(|p| {
                p["connected_addrs"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
            .map(|p| p["peer_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many files it has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        wait_for(Duration::from_secs(15), "the peer to exit", || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peer ids in a `peers --json` answer.
pub fn peer_ids(json: &str) -> Vec<String> {
    let peers: Vec<Value> = serde_json::from_str(json).unwrap();
    peers
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The handler row with this action in a `status --json`.
pub fn handler<'a>(status: &'a Value, action_prefix: &str) -> &'a Value {
    status["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["action"].as_str().unwrap().starts_with(action_prefix))
        .unwrap_or_else(|| panic!("no handler {action_prefix} in {status:#}"))
}

/// Runs `meshbus up --no-mdns --listen 127.0.0.1 ARGS…` with a data directory of its own,
/// which must refuse to start; returns what it said on stderr.
pub fn up_fails(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    MESH.save(data.path()).unwrap();
    let mut child = Command::new(bin())
        .env("MESHBUS_DATA_DIR", data.path())
        .args(["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(20), "meshbus up to give up", || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "meshbus up {args:?} should have failed: {err}"
    );
    err
}

/// Whether any live (not zombie) process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            return false;
        };
        // Fields after the command: state, ppid, pgrp, …
        meshbus_lab::process::stat_fields(pid)
            .is_some_and(|f| f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string())
    })
}

/// What a command said on stderr.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a config file `name` in `dir`; returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The handler row named `name` in a `status --json`.
pub fn row<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no handler {name}: {status:#}"))
}

/// Resident memory of process `pid`, in MB.
pub fn rss_mb(pid: u32) -> u64 {
    let kib = meshbus_lab::process::status_kib(pid, "VmRSS");
    assert!(kib > 0, "no VmRSS for process {pid}");
    kib / 1024
}
