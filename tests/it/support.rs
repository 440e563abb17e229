//! Starting real `meshbus` processes and waiting on what they do.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often conditions are re-checked while waiting.
const POLL: Duration = Duration::from_millis(10);

/// The binary under test: `MESHBUS_BIN` (e.g. a release build) or the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("MESHBUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshbus")))
}

/// Waits until `check` returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Like [`wait_for`] for a plain condition.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || check().then_some(()))
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
}

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
        peer._data = Some(data);
        peer
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
        let api = self.api.expect("a host-namespace peer").to_string();
        Command::new(bin())
            .args(args)
            .args(["--api", &api])
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

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Peer ids in a `peers --json` answer.
pub fn peer_ids(json: &str) -> Vec<String> {
    let peers: Vec<Value> = serde_json::from_str(json).unwrap();
    peers
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The CloudEvents a file handler wrote so far (none if the file does not exist yet). A last
/// line without its newline is still being written and is left for the next look.
pub fn events_in(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Waits until a file handler has written at least `n` events; returns them.
pub fn wait_for_events(path: &Path, n: usize, timeout: Duration) -> Vec<Value> {
    wait_for(
        timeout,
        &format!("{n} events in {}", path.display()),
        || {
            let events = events_in(path);
            (events.len() >= n).then_some(events)
        },
    )
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

/// One lab at a time, so timings measure the mesh rather than a neighbour's load.
static LAB: Mutex<()> = Mutex::new(());

/// Holds the lab lock until dropped.
pub fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether namespaces can be made here; panics if they cannot but must
/// (`MESHBUS_REQUIRE_NETNS=1`), else says loudly that `test` is skipped.
pub fn netns_or_skip(test: &str) -> bool {
    match meshbus::netns::available() {
        Ok(()) => true,
        Err(reason) => {
            assert!(
                std::env::var("MESHBUS_REQUIRE_NETNS").as_deref() != Ok("1"),
                "MESHBUS_REQUIRE_NETNS=1 but network namespaces are not available: {reason}"
            );
            eprintln!("\n*** SKIPPED {test}: network namespaces are not available ({reason}); run as root to test the LAN ***\n");
            false
        }
    }
}

/// Waits until process `pid` has entered namespace `netns` (`ip netns exec` returns from
/// spawn before it has switched).
pub fn wait_in_netns(netns: &str, pid: u32) {
    wait_until(
        Duration::from_secs(10),
        &format!("pid {pid} inside {netns}"),
        || {
            meshbus::netns::ip(&["netns", "pids", netns])
                .map(|pids| pids.split_whitespace().any(|p| p == pid.to_string()))
                .unwrap_or(false)
        },
    );
}

/// Runs `meshbus up --no-mdns --listen 127.0.0.1 ARGS…` with a data directory of its own,
/// which must refuse to start; returns what it said on stderr.
pub fn up_fails(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
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
        meshbus::lab::stat_fields(pid)
            .is_some_and(|f| f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string())
    })
}
