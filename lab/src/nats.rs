//! The broker reference for the mesh benchmark: the same load through a NATS server on the
//! same lab, so the figures of [`crate::bench`] have something to stand beside.
//!
//! The layout mirrors the mesh bench on the lab's own namespaces, so every message crosses
//! the same bridge: `nats-server` runs on h0 (bound to h0's LAN address), one subscriber
//! process (`meshbus-lab nats-sub`) on every other host, and one publisher process
//! (`meshbus-lab nats-pub`) on h0, where the mesh bench's first publisher runs. Core NATS
//! (no JetStream): at most once, like the mesh's gossip, but with a broker in the middle.
//!
//! Every message is exactly `size` bytes (at least [`STAMP_LEN`]): the first
//! [`STAMP_LEN`] bytes are its publish time (µs since the Unix epoch, little-endian), the
//! rest filler. Latency is that stamp to the subscriber having the message: one machine, one
//! clock. The subscribers subscribe and flush (so the server has every subscription) before
//! the publisher starts, so no message goes out before everyone listens.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::bench::{cpu_secs, BenchConfig, LoadReport};
use crate::{Lab, LabError};

/// The NATS server's binary, looked up on `PATH`.
const SERVER_BIN: &str = "nats-server";

/// What to tell someone whose machine has no [`SERVER_BIN`].
const SERVER_MISSING: &str =
    "nats-server not found; install it (Debian: apt-get install nats-server)";

/// The port the server listens on: NATS's default client port.
const SERVER_PORT: u16 = 4222;

/// The subject everything is published on: the topic of the mesh bench's first publisher.
pub const SUBJECT: &str = "bench.h0";

/// The line a subscriber prints on stdout once the server has its subscription.
pub const READY_LINE: &str = "ready";

/// Bytes of the publish-time stamp at the start of every message (a `u64`).
pub const STAMP_LEN: usize = 8;

/// Time a client gets to reach the server, trying again while the server starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two attempts to reach a server that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Time every subscriber gets to say it is ready, from when the last one was started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A subscriber that gets nothing for this long stops counting (as the mesh bench's stall).
const STALL: Duration = Duration::from_secs(10);

/// How long a subscriber waits for its first message: the other subscribers getting ready,
/// the publisher reaching the server, then the usual [`STALL`].
const FIRST_MESSAGE_TIMEOUT: Duration = READY_TIMEOUT
    .saturating_add(CONNECT_TIMEOUT)
    .saturating_add(STALL);

/// Messages a subscriber's client buffers between its connection and the counting loop. The
/// client's default (65 536) drops messages when full, which would measure the client
/// library's buffer rather than the broker; NATS's own slow-consumer limit on the server
/// still applies.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// One subscriber's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatsSubReport {
    /// Host name.
    pub host: String,
    /// Messages it received.
    pub delivered: u64,
    /// Messages it should have received: every one published.
    pub expected: u64,
    /// delivered / expected.
    pub completeness: f64,
    /// Messages received per second, from the first message's publish to the last receipt.
    pub delivered_per_sec: f64,
    /// Publish to received, median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// CPU seconds (user + system) the subscriber process used while receiving.
    pub cpu_secs: f64,
}

/// The whole NATS run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatsReport {
    /// What `nats-server --version` says.
    pub server: String,
    /// Messages per second the publisher got through to the server (flushed).
    pub publish_rate: f64,
    /// Per subscriber (every host but h0).
    pub per_subscriber: Vec<NatsSubReport>,
    /// CPU seconds (user + system) the server used from the publisher's start to the last
    /// subscriber's report.
    pub server_cpu_secs: f64,
    /// The server's peak resident memory, KiB.
    pub server_peak_rss_kib: u64,
}

/// What a subscriber process reports on stdout (one JSON line, after [`READY_LINE`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubResult {
    /// Messages received (those too short to carry a stamp are not counted).
    pub delivered: u64,
    /// The earliest publish stamp among them, µs since the Unix epoch; 0 if none came.
    pub first_stamp_us: u64,
    /// When the last one arrived, µs since the Unix epoch; 0 if none came.
    pub last_receive_us: u64,
    /// Publish to received, median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// CPU seconds (user + system) this process used from ready until done.
    pub cpu_secs: f64,
}

/// Runs the NATS side of the comparison on `lab`, whose meshbus peers are already stopped:
/// `nats-server` on h0, a subscriber on every other host, `config.events` messages of
/// `config.size` bytes from one publisher on h0 at `config.rate` (`config.publishers` does
/// not apply: one publisher). Every process it started is gone when it returns, error or
/// not; their logs are beside the lab's peer logs (`nats-server.log`, `hN.nats-sub.log`,
/// `h0.nats-pub.log`).
pub fn run(lab: &Lab, config: &BenchConfig) -> Result<NatsReport, LabError> {
    let server_bin = on_path(SERVER_BIN).ok_or_else(|| LabError::Missing(SERVER_MISSING.into()))?;
    let server = server_version(&server_bin)?;
    let exe = std::env::current_exe().map_err(crate::lab::io(Path::new("meshbus-lab")))?;
    let hosts = &lab.state.hosts;
    let h0 = hosts.first().ok_or_else(|| {
        LabError::Missing("the NATS comparison needs a lab with at least one host".into())
    })?;
    let url = format!("nats://{}:{SERVER_PORT}", h0.addr);
    let expected = config.events as u64;
    let mut procs = Procs::default();

    // The server, on h0's LAN address (the host's own namespace cannot reach it; the
    // subscribers' connecting is the readiness check).
    let server_log = beside(lab, SERVER_BIN);
    let mut cmd = lab.command(0, &server_bin);
    cmd.args(["-a", &h0.addr.to_string(), "-p", &SERVER_PORT.to_string()]);
    let server_at = procs.spawn(cmd, &server_bin, &server_log, false)?;
    // `ip netns exec` replaces itself with the program: this pid is nats-server's.
    let server_pid = procs.pid(server_at);

    // A subscriber on every other host.
    let sub_bin = Path::new("meshbus-lab nats-sub");
    let mut subs = Vec::new();
    for (i, host) in hosts.iter().enumerate().skip(1) {
        let log = beside(lab, &format!("{}.nats-sub", host.name));
        let mut cmd = lab.command(i, &exe);
        cmd.args(["nats-sub", "--server", &url, "--subject", SUBJECT])
            .args(["--events", &expected.to_string()]);
        let at = procs.spawn(cmd, sub_bin, &log, true)?;
        subs.push(Subscriber {
            host: host.name.clone(),
            lines: lines(procs.stdout(at, sub_bin)?),
            log,
        });
    }

    // Nothing is published before every subscriber listens.
    let ready_by = Instant::now() + READY_TIMEOUT;
    for sub in &subs {
        let waited = sub
            .lines
            .recv_timeout(ready_by.saturating_duration_since(Instant::now()));
        let failed = match waited {
            Ok(line) if line.trim() == READY_LINE => continue,
            Ok(line) => sub.failed(format!(
                "NATS subscriber said `{line}` instead of `{READY_LINE}`"
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                sub.failed("NATS subscriber exited before it was ready".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => LabError::Timeout(
                READY_TIMEOUT,
                format!(
                    "the NATS subscriber on {} to be ready (log: {})",
                    sub.host,
                    sub.log.display()
                ),
            ),
        };
        // A server that did not start explains every subscriber's failure.
        return Err(procs
            .exited(server_at)
            .map(|status| LabError::Peer {
                host: h0.name.clone(),
                reason: format!("{SERVER_BIN} exited ({status})"),
                log: server_log.clone(),
            })
            .unwrap_or(failed));
    }
    let server_cpu_before = cpu_secs(server_pid);

    // The publisher, on h0.
    let pub_bin = Path::new("meshbus-lab nats-pub");
    let pub_log = beside(lab, &format!("{}.nats-pub", h0.name));
    let mut cmd = lab.command(0, &exe);
    cmd.args(["nats-pub", "--server", &url, "--subject", SUBJECT])
        .args(["--events", &config.events.to_string()])
        .args(["--size", &config.size.to_string()]);
    if let Some(rate) = config.rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    let pub_at = procs.spawn(cmd, pub_bin, &pub_log, true)?;
    let mut out = String::new();
    procs
        .stdout(pub_at, pub_bin)?
        .read_to_string(&mut out)
        .map_err(crate::lab::io(pub_bin))?;
    let status = procs.wait(pub_at, pub_bin)?;
    let load: LoadReport = serde_json::from_str(&out).map_err(|e| LabError::Peer {
        host: h0.name.clone(),
        reason: format!("the NATS publisher gave no report ({status}): {e}"),
        log: pub_log.clone(),
    })?;

    // Each subscriber ends by itself: it has every message, or none came for STALL.
    let mut per_subscriber = Vec::with_capacity(subs.len());
    for sub in &subs {
        let line = sub
            .lines
            .recv()
            .map_err(|_| sub.failed("NATS subscriber exited without a report".into()))?;
        let result: SubResult = serde_json::from_str(&line)
            .map_err(|e| sub.failed(format!("NATS subscriber's report `{line}`: {e}")))?;
        per_subscriber.push(sub_report(&sub.host, expected, &result));
    }

    let report = NatsReport {
        server,
        publish_rate: load.published as f64 / load.secs.max(1e-9),
        per_subscriber,
        server_cpu_secs: cpu_secs(server_pid) - server_cpu_before,
        server_peak_rss_kib: crate::process::status_kib(server_pid, "VmHWM"),
    };
    // Stops the server (and anything still running) now rather than at the end of scope.
    drop(procs);
    Ok(report)
}

/// A subscriber's figures in the report's units.
fn sub_report(host: &str, expected: u64, r: &SubResult) -> NatsSubReport {
    let took = r.last_receive_us.saturating_sub(r.first_stamp_us) as f64 / 1e6;
    let ms = |us: u64| us as f64 / 1000.0;
    NatsSubReport {
        host: host.to_owned(),
        delivered: r.delivered,
        expected,
        completeness: r.delivered as f64 / expected.max(1) as f64,
        delivered_per_sec: r.delivered as f64 / took.max(1e-9),
        p50_ms: ms(r.p50_us),
        p90_ms: ms(r.p90_us),
        p99_ms: ms(r.p99_us),
        max_ms: ms(r.max_us),
        cpu_secs: r.cpu_secs,
    }
}

/// The publisher: connects to the NATS server at `server` (trying again while it starts),
/// publishes `events` messages of `size` bytes (at least [`STAMP_LEN`]: the publish time,
/// then filler) on `subject`, at `rate` messages per second or as fast as the client takes
/// them, and flushes. The report's `secs` runs from the first publish to the flush done.
pub async fn publish(
    server: &str,
    subject: &str,
    events: usize,
    size: usize,
    rate: Option<f64>,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "the rate must be a positive number of messages per second"
    );
    let client = connect(server, "meshbus-lab nats-pub").await?;
    let subject = async_nats::Subject::from(subject);
    let size = size.max(STAMP_LEN);
    let chunk = match rate {
        Some(r) => crate::bench::paced_chunk(r, crate::bench::CHUNK),
        None => events.max(1),
    };
    let start = Instant::now();
    let mut published = 0usize;
    while published < events {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(published as f64 / r);
            tokio::time::sleep_until(due.into()).await;
        }
        let len = chunk.min(events - published);
        for _ in 0..len {
            let mut payload = vec![b'x'; size];
            let stamp = meshbus::clock::unix_micros(SystemTime::now());
            payload[..STAMP_LEN].copy_from_slice(&stamp.to_le_bytes());
            client
                .publish(subject.clone(), payload.into())
                .await
                .with_context(|| format!("publishing on `{subject}` to {server}"))?;
        }
        published += len;
    }
    client
        .flush()
        .await
        .with_context(|| format!("flushing the last messages to {server}"))?;
    Ok(LoadReport {
        published,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// A subscriber: connects to the NATS server at `server` (trying again while it starts),
/// subscribes to `subject` and flushes, so the server has the subscription; then calls
/// `ready` (the `nats-sub` command prints [`READY_LINE`] there) and counts messages until it
/// has `expected` or nothing came for 10 s (`STALL`; longer for the first). Prints nothing
/// itself.
pub async fn subscribe(
    server: &str,
    subject: &str,
    expected: u64,
    ready: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<SubResult> {
    let client = connect(server, "meshbus-lab nats-sub").await?;
    let mut subscriber = client
        .subscribe(subject.to_owned())
        .await
        .with_context(|| format!("subscribing to `{subject}` at {server}"))?;
    client
        .flush()
        .await
        .with_context(|| format!("flushing the subscription to `{subject}` to {server}"))?;
    ready().context("telling the bench this subscriber is ready")?;
    let me = std::process::id();
    let cpu_before = cpu_secs(me);

    let mut latencies: Vec<u64> = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    let mut first_stamp_us = u64::MAX;
    let mut last_receive_us = 0;
    while (latencies.len() as u64) < expected {
        let patience = if latencies.is_empty() {
            FIRST_MESSAGE_TIMEOUT
        } else {
            STALL
        };
        // Nothing for that long, or the subscription is gone: done.
        let Ok(Some(message)) = tokio::time::timeout(patience, subscriber.next()).await else {
            break;
        };
        let now = meshbus::clock::unix_micros(SystemTime::now());
        let Some(stamp) = message
            .payload
            .get(..STAMP_LEN)
            .and_then(|b| <[u8; STAMP_LEN]>::try_from(b).ok())
            .map(u64::from_le_bytes)
        else {
            continue;
        };
        first_stamp_us = first_stamp_us.min(stamp);
        last_receive_us = now;
        latencies.push(now.saturating_sub(stamp));
    }
    let cpu_used = cpu_secs(me) - cpu_before;

    latencies.sort_unstable();
    Ok(SubResult {
        delivered: latencies.len() as u64,
        first_stamp_us: if latencies.is_empty() {
            0
        } else {
            first_stamp_us
        },
        last_receive_us,
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p99_us: percentile(&latencies, 0.99),
        max_us: latencies.last().copied().unwrap_or(0),
        cpu_secs: cpu_used,
    })
}

/// The nearest-rank `q` quantile of `sorted` (ascending); 0 if it is empty.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(0)
}

/// A client of the server at `server`, named `name`, trying again every [`CONNECT_RETRY`]
/// until [`CONNECT_TIMEOUT`] while the server starts.
async fn connect(server: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let attempt = async_nats::ConnectOptions::new()
            .name(name)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connect(server)
            .await;
        match attempt {
            Ok(client) => return Ok(client),
            // Not listening yet (most likely): the last attempt's error is the one reported.
            Err(_) if Instant::now() + CONNECT_RETRY < deadline => {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot reach the NATS server at {server} within {CONNECT_TIMEOUT:?}"
                )))
            }
        }
    }
}

/// Where `program` is on `PATH`, if it is there and executable.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What `nats-server --version` says, trimmed.
fn server_version(bin: &Path) -> Result<String, LabError> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(crate::lab::io(bin))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A log file `{name}.log` beside the lab's peer logs.
fn beside(lab: &Lab, name: &str) -> PathBuf {
    lab.log(0).with_file_name(format!("{name}.log"))
}

/// The lines a child prints on stdout, as they come, read by a thread of their own so the
/// waiting side can time out; the channel closes when the child's stdout does.
fn lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A subscriber process as `run` follows it.
struct Subscriber {
    /// Its host's name.
    host: String,
    /// Its stdout, line by line.
    lines: mpsc::Receiver<String>,
    /// Its stderr.
    log: PathBuf,
}

impl Subscriber {
    /// The error for this subscriber having failed as `reason` says.
    fn failed(&self, reason: String) -> LabError {
        LabError::Peer {
            host: self.host.clone(),
            reason,
            log: self.log.clone(),
        }
    }
}

/// The processes a run started. Dropping it kills and reaps every one still there, so an
/// error on the way out leaves nothing running.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    /// Spawns `cmd` (stdin null, stdout and stderr to `log`, or stdout piped if
    /// `piped_stdout`) and keeps it; returns its index. `what` names it in errors.
    fn spawn(
        &mut self,
        mut cmd: Command,
        what: &Path,
        log: &Path,
        piped_stdout: bool,
    ) -> Result<usize, LabError> {
        let err = File::create(log).map_err(crate::lab::io(log))?;
        let out = if piped_stdout {
            Stdio::piped()
        } else {
            err.try_clone().map_err(crate::lab::io(log))?.into()
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(crate::lab::io(what))?;
        self.0.push(child);
        Ok(self.0.len() - 1)
    }

    /// Process `at`'s pid.
    fn pid(&self, at: usize) -> u32 {
        self.0[at].id()
    }

    /// Process `at`'s piped stdout (once).
    fn stdout(&mut self, at: usize, what: &Path) -> Result<ChildStdout, LabError> {
        self.0[at]
            .stdout
            .take()
            .ok_or_else(|| crate::lab::io(what)(std::io::Error::other("its stdout is not piped")))
    }

    /// Waits for process `at` to end.
    fn wait(&mut self, at: usize, what: &Path) -> Result<std::process::ExitStatus, LabError> {
        self.0[at].wait().map_err(crate::lab::io(what))
    }

    /// How process `at` ended, if it has.
    fn exited(&mut self, at: usize) -> Option<std::process::ExitStatus> {
        self.0[at].try_wait().ok().flatten()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // Fails only for one that has already been reaped: nothing left to stop.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NatsReport {
    /// The table `meshbus-lab bench` prints for the NATS side.
    pub fn table(&self) -> String {
        let mut out = format!(
            "NATS ({}): publisher achieved {:.0} messages/s; server CPU {:.2} s, peak RSS {:.1}M\n",
            self.server,
            self.publish_rate,
            self.server_cpu_secs,
            self.server_peak_rss_kib as f64 / 1024.0
        );
        out += "host  delivered  complete   events/s   p50 ms   p90 ms   p99 ms   max ms  CPU s\n";
        for s in &self.per_subscriber {
            out += &format!(
                "{:<5} {:>9} {:>8.2}% {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6.2}\n",
                s.host,
                s.delivered,
                s.completeness * 100.0,
                s.delivered_per_sec,
                s.p50_ms,
                s.p90_ms,
                s.p99_ms,
                s.max_ms,
                s.cpu_secs
            );
        }
        out
    }
}
