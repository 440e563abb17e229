//! A lab: a whole LAN of `meshbus up` peers on one Linux machine (one network namespace per
//! host, see [`crate::netns`]), and the means to break it: kill and restart a peer, cut a host
//! off the LAN and plug it back. `meshbus-lab` is a thin CLI over this.
//!
//! The peers outlive the process that started them. What a later invocation needs (hosts,
//! addresses, pids, data directories) is in `state.json` in the lab's directory,
//! `$MESHBUS_LAB_DIR/PREFIX` (default `/run/meshbus-lab/PREFIX`); each host's data directory
//! (its identity key, so a restart keeps its peer id) and log live beside it.
//!
//! Each peer serves its API on [`PEER_API`] inside its own namespace (each has its own
//! loopback); the lab talks to it there by running the `meshbus` CLI inside the namespace.

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::netns::{self, NetnsError, VirtualLan};
use crate::process::alive;

/// Where labs keep their state unless `MESHBUS_LAB_DIR` says otherwise.
pub const DEFAULT_ROOT: &str = "/run/meshbus-lab";

/// Where every peer serves its HTTP API, inside its host's namespace: each namespace has a
/// loopback of its own, so every host can use the same address.
pub const PEER_API: SocketAddr = meshbus::config::DEFAULT_API;

/// Time a peer gets to answer on its API with its handler table in place.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The mesh's own event the lab records on every host, to time the mesh's formation.
const JOINED_TOPIC: &str = "_mesh.peer.joined";

/// How often a waiting lab re-checks.
const POLL: Duration = Duration::from_millis(20);

/// What went wrong in a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// An `ip` command failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No lab of that prefix.
    #[error("no lab `{0}` is up (no state in {1}); start one with `meshbus-lab up`")]
    NoLab(String, PathBuf),
    /// The state file does not parse.
    #[error("lab state {0} is unreadable: {1}")]
    BadState(PathBuf, String),
    /// No such host.
    #[error("no host `{0}` in this lab; hosts are h0 to h{1}")]
    NoHost(String, usize),
    /// A peer did not come up or stopped.
    #[error("peer on {host}: {reason} (log: {log})")]
    Peer {
        /// The host.
        host: String,
        /// What happened.
        reason: String,
        /// Its log file.
        log: PathBuf,
    },
    /// Waited too long.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The lab's mesh key could not be written.
    #[error("cannot write the lab's mesh key: {0}")]
    MeshKey(#[from] meshbus::keyring::KeyringError),
    /// Something the run needs is not there (a program, a host); the message says what and
    /// how to get it.
    #[error("{0}")]
    Missing(String),
    /// A load generator (or another helper process) failed.
    #[error("{what} failed: {reason}")]
    Tool {
        /// Which.
        what: String,
        /// What it said.
        reason: String,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One host as the state file records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    /// `h0`, `h1`, …
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its LAN address.
    pub addr: Ipv4Addr,
    /// Its peer's pid while running.
    pub pid: Option<u32>,
    /// Its peer id (stable across restarts).
    pub peer_id: Option<String>,
    /// Whether it is unplugged from the LAN.
    pub cut: bool,
    /// When its peer last started.
    pub started: Option<SystemTime>,
}

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Namespace name prefix.
    pub prefix: String,
    /// The `meshbus` binary the peers run.
    pub bin: PathBuf,
    /// Extra `meshbus up` arguments for every peer; `{host}` becomes the host's name and
    /// `{data}` its data directory, e.g. `--on 'orders.*=file:{data}/orders.jsonl'`.
    pub extra_args: Vec<String>,
    /// The hosts.
    pub hosts: Vec<LabHost>,
}

/// An open lab.
pub struct Lab {
    dir: PathBuf,
    /// What the state file holds.
    pub state: LabState,
}

/// `$MESHBUS_LAB_DIR` or [`DEFAULT_ROOT`].
pub fn root() -> PathBuf {
    std::env::var_os("MESHBUS_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The `meshbus` binary: `$MESHBUS_BIN`, else the one beside this executable.
pub fn meshbus_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESHBUS_BIN") {
        return PathBuf::from(bin);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("meshbus")))
        .unwrap_or_else(|| PathBuf::from("meshbus"))
}

/// Stops every peer of lab `prefix`, removes its namespaces and its state, whatever shape it
/// is in. Returns whether there was anything to remove.
pub fn down(root: &Path, prefix: &str) -> Result<bool, LabError> {
    let dir = root.join(prefix);
    let removed = netns::remove_lab(prefix);
    let had_state = dir.exists();
    if had_state {
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(removed > 0 || had_state)
}

impl Lab {
    /// Starts a fresh lab of `peers` hosts (cleaning any leftover of the same prefix) and
    /// waits for the full mesh. Returns the lab and the formation time: from the last peer's
    /// start until every peer had every other, by the peers' own `_mesh.peer.joined` events.
    pub fn up(
        root: &Path,
        prefix: &str,
        peers: usize,
        bin: PathBuf,
        extra_args: Vec<String>,
        timeout: Duration,
    ) -> Result<(Lab, Duration), LabError> {
        down(root, prefix)?;
        let dir = root.join(prefix);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lan = VirtualLan::with_prefix(prefix, peers)?;
        let hosts = lan.keep();
        let mut lab = Lab {
            dir,
            state: LabState {
                prefix: prefix.to_owned(),
                bin,
                extra_args,
                hosts: hosts
                    .into_iter()
                    .enumerate()
                    .map(|(i, h)| LabHost {
                        name: format!("h{i}"),
                        netns: h.netns,
                        addr: h.addr,
                        pid: None,
                        peer_id: None,
                        cut: false,
                        started: None,
                    })
                    .collect(),
            },
        };
        lab.save()?;
        // One mesh key for the whole lab, in every host's data directory.
        let mesh = meshbus::keyring::Keyring::new(meshbus::keyring::MeshKey::generate());
        for i in 0..peers {
            mesh.save(&lab.data_dir(i))?;
        }
        let result = (|| {
            for i in 0..peers {
                lab.start(i)?;
            }
            lab.wait_full_mesh(timeout)
        })();
        match result {
            Ok(formed) => Ok((lab, formed)),
            Err(e) => {
                let _ = down(root, prefix);
                Err(e)
            }
        }
    }

    /// Opens the lab `prefix` that an earlier `up` started.
    pub fn open(root: &Path, prefix: &str) -> Result<Lab, LabError> {
        let dir = root.join(prefix);
        let path = dir.join("state.json");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NoLab(prefix.to_owned(), path))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let state =
            serde_json::from_str(&text).map_err(|e| LabError::BadState(path, e.to_string()))?;
        Ok(Lab { dir, state })
    }

    fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(&self.state)
            .map_err(|e| LabError::BadState(path.clone(), e.to_string()))?;
        fs::write(&tmp, text).map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// The index of host `h3` (or `3`).
    pub fn host(&self, name: &str) -> Result<usize, LabError> {
        let n = self.state.hosts.len();
        name.strip_prefix('h')
            .unwrap_or(name)
            .parse::<usize>()
            .ok()
            .filter(|i| *i < n)
            .ok_or_else(|| LabError::NoHost(name.to_owned(), n.saturating_sub(1)))
    }

    /// Host `i`'s data directory (its identity key lives here).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.state.hosts[i].name)
    }

    /// Host `i`'s peer log.
    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.state.hosts[i].name))
    }

    /// Host `i`'s `_mesh.peer.joined` events, as CloudEvents JSON lines: the lab gives every
    /// peer a file handler for them.
    pub fn joined_file(&self, i: usize) -> PathBuf {
        self.data_dir(i).join("joined.jsonl")
    }

    /// Starts host `i`'s peer (again), detached, and waits until it answers on its API with
    /// its handler table in place.
    pub fn start(&mut self, i: usize) -> Result<(), LabError> {
        let data_dir = self.data_dir(i);
        fs::create_dir_all(&data_dir).map_err(io(&data_dir))?;
        let log_path = self.log(i);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let err = log.try_clone().map_err(io(&log_path))?;
        let host = &self.state.hosts[i];
        let mut cmd = netns::exec(&host.netns, &self.state.bin);
        cmd.args(["up", "--name", &host.name, "--data-dir"])
            .arg(&data_dir)
            .args(["--api", &PEER_API.to_string()])
            .arg("--on")
            .arg(format!(
                "{JOINED_TOPIC}=file:{}",
                self.joined_file(i).display()
            ))
            .args(self.state.extra_args.iter().map(|a| {
                a.replace("{host}", &host.name)
                    .replace("{data}", &data_dir.to_string_lossy())
            }))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = SystemTime::now();
        let child = cmd.spawn().map_err(|e| LabError::Peer {
            host: host.name.clone(),
            reason: format!("cannot start {}: {e}", self.state.bin.display()),
            log: log_path.clone(),
        })?;
        let pid = child.id();
        // The peer outlives this process; it is stopped by pid (kill, down).
        drop(child);
        // Up means: its API answers and its handler table holds the lab's row (`up` installs
        // the table after the API is served).
        let started_up = poll(START_TIMEOUT, POLL, || {
            let status = self
                .status(i)
                .filter(|s| s.handlers.iter().any(|h| h.pattern == JOINED_TOPIC));
            match status {
                Some(status) => Some(Ok(status.peer_id)),
                None if !alive(pid) => Some(Err(LabError::Peer {
                    host: self.state.hosts[i].name.clone(),
                    reason: "exited at start".into(),
                    log: log_path.clone(),
                })),
                None => None,
            }
        });
        let peer_id = started_up.unwrap_or_else(|| {
            Err(LabError::Timeout(
                START_TIMEOUT,
                format!(
                    "{} to answer on its API (log: {})",
                    self.state.hosts[i].name,
                    log_path.display()
                ),
            ))
        })?;
        let host = &mut self.state.hosts[i];
        host.pid = Some(pid);
        host.peer_id = Some(peer_id);
        host.started = Some(started);
        self.save()
    }

    /// SIGKILLs host `i`'s peer and waits until it is gone.
    pub fn kill(&mut self, i: usize) -> Result<(), LabError> {
        self.signal(i, nix::sys::signal::Signal::SIGKILL)
    }

    /// Stops host `i`'s peer cleanly (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self, i: usize) -> Result<(), LabError> {
        self.signal(i, nix::sys::signal::Signal::SIGTERM)
    }

    fn signal(&mut self, i: usize, signal: nix::sys::signal::Signal) -> Result<(), LabError> {
        if let Some(pid) = self.state.hosts[i].pid.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
            wait(Duration::from_secs(15), "the peer to end", || !alive(pid))?;
        }
        self.save()
    }

    /// Kills host `i`'s peer if running and starts it again with the same identity.
    pub fn restart(&mut self, i: usize) -> Result<(), LabError> {
        self.kill(i)?;
        self.start(i)
    }

    /// Unplugs host `i` from the LAN; its peer keeps running.
    pub fn cut(&mut self, i: usize) -> Result<(), LabError> {
        netns::cut(&self.state.prefix, i)?;
        self.state.hosts[i].cut = true;
        self.save()
    }

    /// Plugs host `i` back in.
    pub fn heal(&mut self, i: usize) -> Result<(), LabError> {
        netns::heal(&self.state.prefix, i)?;
        self.state.hosts[i].cut = false;
        self.save()
    }

    /// A command that runs `program` inside host `i`, with `MESHBUS_API` naming that host's
    /// peer and `MESHBUS_DATA_DIR` its data directory (so `meshbus` commands talk to it, with
    /// its token, whatever this process's environment says).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = netns::exec(&self.state.hosts[i].netns, program);
        cmd.env(meshbus::config::API_ENV, PEER_API.to_string())
            .env(meshbus::config::DATA_DIR_ENV, self.data_dir(i));
        cmd
    }

    /// Host `i`'s peer's `status`, if it answers.
    pub fn status(&self, i: usize) -> Option<meshbus::node::Status> {
        let out = self.cli(i, &["status", "--json"]).ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Runs `meshbus ARGS…` inside host `i` (it talks to that host's peer).
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<Output, LabError> {
        let mut cmd = self.command(i, &self.state.bin);
        cmd.args(args).stdin(Stdio::null());
        cmd.output().map_err(io(&self.state.bin))
    }

    /// The peer ids host `i`'s peer is connected to (empty if it does not answer).
    pub fn peers_seen(&self, i: usize) -> Vec<String> {
        let Ok(out) = self.cli(i, &["peers", "--json"]) else {
            return Vec::new();
        };
        let Ok(peers) = serde_json::from_slice::<Vec<meshbus::node::PeerInfo>>(&out.stdout) else {
            return Vec::new();
        };
        peers.into_iter().map(|p| p.peer_id).collect()
    }

    /// Hosts whose peer is running and plugged in.
    pub fn live(&self) -> Vec<usize> {
        (0..self.state.hosts.len())
            .filter(|i| {
                let h = &self.state.hosts[*i];
                !h.cut && h.pid.is_some_and(alive)
            })
            .collect()
    }

    /// Waits until every live host sees exactly every other live host. Returns the time
    /// from the latest peer start until the last of them had joined everywhere.
    pub fn wait_full_mesh(&self, timeout: Duration) -> Result<Duration, LabError> {
        let live = self.live();
        let ids: BTreeSet<String> = live
            .iter()
            .filter_map(|i| self.state.hosts[*i].peer_id.clone())
            .collect();
        for &i in &live {
            let mut expected = ids.clone();
            if let Some(me) = &self.state.hosts[i].peer_id {
                expected.remove(me);
            }
            wait(
                timeout,
                &format!("{} to see every live peer", self.state.hosts[i].name),
                || self.peers_seen(i).into_iter().collect::<BTreeSet<_>>() == expected,
            )?;
        }
        let since = live
            .iter()
            .filter_map(|i| self.state.hosts[*i].started)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut formed = since;
        for &i in &live {
            for (peer, at) in self.joins(i, since) {
                if ids.contains(&peer) {
                    formed = formed.max(at);
                }
            }
        }
        Ok(formed.duration_since(since).unwrap_or_default())
    }

    /// First `_mesh.peer.joined` time per peer seen by host `i` at or after `since`.
    fn joins(&self, i: usize, since: SystemTime) -> Vec<(String, SystemTime)> {
        let text = fs::read_to_string(self.joined_file(i)).unwrap_or_default();
        let mut firsts: Vec<(String, SystemTime)> = Vec::new();
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<meshbus::CloudEvent>(line) else {
                continue;
            };
            let Ok(at) = humantime::parse_rfc3339(&event.time) else {
                continue;
            };
            let Some(peer) = event
                .data
                .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
                .and_then(|d| d["peer"].as_str().map(str::to_owned))
            else {
                continue;
            };
            if at >= since && !firsts.iter().any(|(p, _)| *p == peer) {
                firsts.push((peer, at));
            }
        }
        firsts
    }
}

/// Calls `check` every `every` until it returns `Some`, and returns that; `None` once
/// `timeout` has passed. The one polling loop of the lab and of the tests built on it.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

fn wait(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<(), LabError> {
    poll(timeout, POLL, || check().then_some(()))
        .ok_or_else(|| LabError::Timeout(timeout, what.to_owned()))
}
