//! The mesh benchmark: a fresh lab, publishers pushing events through their peers' HTTP API,
//! and what every peer's handler table got, how fast, how late, at what memory and CPU cost.
//!
//! Every peer runs one handler row, `bench.**=file:/dev/null`: each event is matched, queued,
//! turned into its CloudEvents JSON line and written, so the figures include the handler
//! table's real work but no disk. Latency is publish (the publisher's node stamps the time)
//! to that row's write finished on the receiving peer: one machine, one clock.
//!
//! With `--group` ([`BenchConfig::group`]) every peer's `bench.**` row is in one handler
//! group instead ([`GROUP`], from a config file), so each event is handled by one peer rather
//! than by all: the report adds the rate at which the group as a whole finished every event,
//! how the events split over the peers, and the takeovers and duplicates.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use meshbus::handlers::HandlerInfo;
use meshbus::proto::groups::GroupView;

use crate::{Lab, LabError};

/// Events per HTTP request from a load generator.
pub(crate) const CHUNK: usize = 500;

/// With a rate, a load generator sends a chunk this many times a second.
const PACE_STEPS_PER_SEC: f64 = 100.0;

/// Events per step at `rate` events per second, at most `most`.
pub(crate) fn paced_chunk(rate: f64, most: usize) -> usize {
    ((rate / PACE_STEPS_PER_SEC).ceil() as usize).clamp(1, most)
}

/// Bytes of events per HTTP request at most (the API takes at least 32 MiB).
const REQUEST_BYTES: usize = 8 << 20;

/// Requests a load generator keeps in flight.
const IN_FLIGHT: usize = 4;

/// A delivery count that does not move for this long ends the wait.
const STALL: Duration = Duration::from_secs(10);

/// How often the bench looks at each peer's row while the load runs. Each look starts a
/// `meshbus handlers` process inside the host: at 4 looks a second on 5 peers those cost
/// the two cores more than the peers' own work at 1,000 events/s.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The handler group every peer's row is in with `--group`.
pub const GROUP: &str = "bench";

/// The bench's topic pattern: its one row on every peer.
const PATTERN: &str = "bench.**";

/// Time every peer gets to see every member of [`GROUP`] active (the group's join delay
/// plus a few announcement rounds).
const GROUP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Peers in the lab.
    pub peers: usize,
    /// How many of them publish (h0, h1, …).
    pub publishers: usize,
    /// Events in all, split evenly among publishers.
    pub events: usize,
    /// Bytes of data per event.
    pub size: usize,
    /// Events per second offered in all; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Every peer's row in one handler group ([`GROUP`]): each event handled once in the
    /// mesh, not once per peer.
    pub group: bool,
    /// Then run the same load through NATS on the same hosts ([`crate::nats`]) and report
    /// both and their ratio.
    pub compare_nats: bool,
}

/// One peer's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    /// Host name.
    pub host: String,
    /// Events its handler row handled.
    pub delivered: u64,
    /// Events it should have handled: every event, or with `--group` those it owned or
    /// took over.
    pub expected: u64,
    /// delivered / expected.
    pub completeness: f64,
    /// Events handled per second, from the start of the load to its last event.
    pub delivered_per_sec: f64,
    /// Publish to handled, median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// Resident memory when the mesh had formed and nothing was flowing, KiB.
    pub idle_rss_kib: u64,
    /// Peak resident memory over the run, KiB.
    pub peak_rss_kib: u64,
    /// CPU seconds (user + system) used during the load.
    pub cpu_secs: f64,
    /// Events its handler row never got: the log dropped them (retention) before it read
    /// them.
    pub dropped: u64,
    /// Connections on which its gossipsub gave up (see [`GOSSIP_LINK_LOST`]), from its log.
    pub gossip_links_lost: usize,
}

/// What libp2p-gossipsub logs, and nothing else tells, when it stops using a connection for
/// good: after five failed streams it disables itself there while the connection stays up.
pub const GOSSIP_LINK_LOST: [&str; 2] = [
    "maximum number of outbound substream attempts has been exceeded",
    "maximum number of inbound substreams attempts has been exceeded",
];

/// Lines of host `i`'s log saying a gossip link was lost.
fn gossip_links_lost(lab: &Lab, i: usize) -> usize {
    let log = std::fs::read_to_string(lab.log(i)).unwrap_or_default();
    log.lines()
        .filter(|l| GOSSIP_LINK_LOST.iter().any(|m| l.contains(m)))
        .count()
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// Peers.
    pub peers: usize,
    /// Publishers.
    pub publishers: usize,
    /// Events in all.
    pub events: usize,
    /// Bytes of data per event.
    pub size: usize,
    /// Events per second offered (`None`: unlimited).
    pub rate_offered: Option<f64>,
    /// Mesh formation after the last start, ms.
    pub mesh_formed_ms: f64,
    /// Events per second the publishers got accepted.
    pub publish_rate: f64,
    /// Per peer.
    pub per_peer: Vec<PeerReport>,
    /// With `--group`: how the group as a whole did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupReport>,
    /// With `--compare nats`: the same load through NATS, and the ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Comparison>,
}

/// meshbus against NATS, measured one after the other on the same hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The NATS run.
    pub nats: crate::nats::NatsReport,
    /// meshbus's slowest peer's events/s over NATS's slowest subscriber's: the fan-out
    /// ratio (the goal is at least 0.5).
    pub fan_out_ratio: f64,
    /// meshbus's worst per-peer p50 latency over NATS's worst per-subscriber p50.
    pub p50_ratio: f64,
}

impl Comparison {
    /// Compares `mesh` with `nats`.
    pub fn new(mesh: &BenchReport, nats: crate::nats::NatsReport) -> Self {
        let slowest = |rates: Vec<f64>| rates.into_iter().fold(f64::INFINITY, f64::min);
        let worst = |values: Vec<f64>| values.into_iter().fold(0.0, f64::max);
        let mesh_rate = slowest(mesh.per_peer.iter().map(|p| p.delivered_per_sec).collect());
        let nats_rate = slowest(
            nats.per_subscriber
                .iter()
                .map(|s| s.delivered_per_sec)
                .collect(),
        );
        let mesh_p50 = worst(mesh.per_peer.iter().map(|p| p.p50_ms).collect());
        let nats_p50 = worst(nats.per_subscriber.iter().map(|s| s.p50_ms).collect());
        Self {
            fan_out_ratio: mesh_rate / nats_rate.max(1e-9),
            p50_ratio: mesh_p50 / nats_p50.max(1e-9),
            nats,
        }
    }
}

/// The group as a whole, with `--group`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group's name.
    pub name: String,
    /// Events the group should have handled, each once: every event published.
    pub expected: u64,
    /// Events its members handled, summed.
    pub handled: u64,
    /// Events handled more than once (handled beyond `expected`): none without a failure.
    pub duplicates: u64,
    /// Events members took over from a member that failed or left.
    pub taken_over: u64,
    /// Seconds from the start of the load until the last member finished its last event.
    pub finished_secs: f64,
    /// Events per second the group finished as a whole: the events handled (at most
    /// `expected`) over `finished_secs`.
    pub handled_per_sec: f64,
    /// How the events split over the members.
    pub split: Vec<GroupShare>,
}

/// One member's part of the group's work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupShare {
    /// Host name.
    pub host: String,
    /// Events its group row handled.
    pub handled: u64,
    /// handled / the group's expected.
    pub share: f64,
    /// Events it owned when it read them.
    pub owned: u64,
    /// Events another member owned.
    pub not_owned: u64,
    /// Events of a failed or departed member that fell to it.
    pub taken_over: u64,
}

/// What a load generator reports on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoadReport {
    /// Events accepted by its peer.
    pub published: usize,
    /// Seconds it took.
    pub secs: f64,
}

/// Runs the benchmark on a fresh lab named `prefix`, and takes the lab down after.
pub fn run(root: &Path, prefix: &str, config: &BenchConfig) -> Result<BenchReport, LabError> {
    let mut extra = vec!["--quiet".to_owned()];
    // Beside the lab's directory, which `Lab::up` clears first.
    let group_config = root.join(format!("{prefix}.bench-group.toml"));
    if config.group {
        std::fs::create_dir_all(root).map_err(crate::lab::io(root))?;
        std::fs::write(&group_config, group_row()).map_err(crate::lab::io(&group_config))?;
        extra.push("--config".to_owned());
        extra.push(group_config.to_string_lossy().into_owned());
    } else {
        extra.push("--on".to_owned());
        extra.push(format!("{PATTERN}=file:/dev/null"));
    }
    let up = Lab::up(
        root,
        prefix,
        config.peers,
        crate::meshbus_bin(),
        extra,
        Duration::from_secs(60),
    );
    let result = up.and_then(|(mut lab, formed)| {
        let ready = if config.group {
            wait_for_group(&lab)
        } else {
            Ok(())
        };
        let result = ready
            .and_then(|()| measure(&lab, formed, config))
            .and_then(|report| compare(&mut lab, config, report));
        crate::down(root, prefix)?;
        result
    });
    if config.group {
        let _ = std::fs::remove_file(&group_config);
    }
    result
}

/// With `--compare nats`: stops the meshbus peers (so NATS gets the same idle hosts) and
/// runs the same load through NATS.
fn compare(
    lab: &mut Lab,
    config: &BenchConfig,
    mut report: BenchReport,
) -> Result<BenchReport, LabError> {
    if !config.compare_nats {
        return Ok(report);
    }
    for i in 0..lab.state.hosts.len() {
        lab.stop(i)?;
    }
    let nats = crate::nats::run(lab, config)?;
    report.compare = Some(Comparison::new(&report, nats));
    Ok(report)
}

/// The config file of `--group` mode: the bench's row, in [`GROUP`].
fn group_row() -> String {
    format!(
        "[[handler]]\nname = \"bench-group\"\npattern = \"{PATTERN}\"\ngroup = \"{GROUP}\"\n\n\
         [handler.file]\npath = \"/dev/null\"\n"
    )
}

/// Waits until every peer sees every peer as an active member of [`GROUP`]: an event
/// published earlier could fall to a member that is not deciding yet, and the figures would
/// measure the join rather than the group.
fn wait_for_group(lab: &Lab) -> Result<(), LabError> {
    let everyone: BTreeSet<String> = lab
        .state
        .hosts
        .iter()
        .filter_map(|h| h.peer_id.clone())
        .collect();
    for (i, host) in lab.state.hosts.iter().enumerate() {
        let formed = crate::poll(GROUP_TIMEOUT, Duration::from_millis(100), || {
            let view = group_view(lab, i)?;
            let active: BTreeSet<String> = view
                .members
                .iter()
                .filter(|m| m.active)
                .map(|m| m.peer.clone())
                .collect();
            (view.members.len() == everyone.len() && active == everyone).then_some(())
        });
        formed.ok_or_else(|| {
            LabError::Timeout(
                GROUP_TIMEOUT,
                format!("{} to see every peer active in group `{GROUP}`", host.name),
            )
        })?;
    }
    Ok(())
}

/// Host `i`'s view of [`GROUP`], from its `status`.
fn group_view(lab: &Lab, i: usize) -> Option<GroupView> {
    let out = lab.cli(i, &["status", "--json"]).ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let groups: Vec<GroupView> = serde_json::from_value(status.get("groups")?.clone()).ok()?;
    groups.into_iter().find(|g| g.name == GROUP)
}

fn measure(lab: &Lab, formed: Duration, config: &BenchConfig) -> Result<BenchReport, LabError> {
    let n = config.peers;
    let pids: Vec<u32> = lab.state.hosts.iter().map(|h| h.pid.unwrap_or(0)).collect();
    let idle_rss: Vec<u64> = pids
        .iter()
        .map(|p| crate::process::status_kib(*p, "VmRSS"))
        .collect();
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let per_publisher = config.events / config.publishers.max(1);
    let expected = (per_publisher * config.publishers) as u64;

    let loaders: Vec<std::process::Child> = (0..config.publishers)
        .map(|p| {
            let exe = std::env::current_exe().map_err(crate::lab::io(Path::new("meshbus-lab")))?;
            let mut cmd = lab.command(p, exe);
            cmd.args(["bench-load", "--events", &per_publisher.to_string()])
                .args(["--size", &config.size.to_string()])
                .args(["--topic", &format!("bench.h{p}")])
                .stdout(Stdio::piped());
            if let Some(rate) = config.rate {
                cmd.args(["--rate", &(rate / config.publishers as f64).to_string()]);
            }
            cmd.spawn()
                .map_err(crate::lab::io(Path::new("meshbus-lab bench-load")))
        })
        .collect::<Result<_, _>>()?;

    // Follow every peer until it has everything or stops making progress.
    let start_unix_us = meshbus::clock::unix_micros(std::time::SystemTime::now());
    let done: Vec<Option<HandlerInfo>> = if config.group {
        follow_group(lab, expected)
    } else {
        std::thread::scope(|s| {
            let watchers: Vec<_> = (0..n)
                .map(|i| s.spawn(move || follow(lab, i, expected)))
                .collect();
            watchers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        })
    };
    let mut published = 0;
    let mut publish_secs: f64 = 0.0;
    for loader in loaders {
        let out = loader
            .wait_with_output()
            .map_err(crate::lab::io(Path::new("meshbus-lab bench-load")))?;
        let report = serde_json::from_slice::<LoadReport>(&out.stdout)
            .ok()
            .filter(|_| out.status.success())
            .ok_or_else(|| LabError::Tool {
                what: "the load generator (meshbus-lab bench-load)".into(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })?;
        published += report.published;
        publish_secs = publish_secs.max(report.secs);
    }

    let rows: Vec<HandlerInfo> = done
        .into_iter()
        .map(|row| {
            row.unwrap_or_else(|| HandlerInfo {
                last_done_unix_us: start_unix_us,
                ..HandlerInfo::default()
            })
        })
        .collect();
    let per_peer = (0..n)
        .map(|i| {
            let row = &rows[i];
            let delivered = row.succeeded + row.failed;
            let expected = if config.group {
                row.owned + row.taken_over
            } else {
                expected
            };
            let took = row.last_done_unix_us.saturating_sub(start_unix_us) as f64 / 1e6;
            let latency = &row.latency;
            let ms = |us: u64| us as f64 / 1000.0;
            PeerReport {
                host: lab.state.hosts[i].name.clone(),
                delivered,
                expected,
                completeness: delivered as f64 / expected.max(1) as f64,
                delivered_per_sec: delivered as f64 / took.max(1e-9),
                dropped: row.skipped,
                p50_ms: ms(latency.p50_us),
                p90_ms: ms(latency.p90_us),
                p99_ms: ms(latency.p99_us),
                max_ms: ms(latency.max_us),
                idle_rss_kib: idle_rss[i],
                peak_rss_kib: crate::process::status_kib(pids[i], "VmHWM"),
                cpu_secs: cpu_secs(pids[i]) - cpu_before[i],
                gossip_links_lost: gossip_links_lost(lab, i),
            }
        })
        .collect();
    Ok(BenchReport {
        peers: n,
        publishers: config.publishers,
        events: config.events,
        size: config.size,
        rate_offered: config.rate,
        mesh_formed_ms: formed.as_secs_f64() * 1000.0,
        publish_rate: published as f64 / publish_secs.max(1e-9),
        per_peer,
        group: config
            .group
            .then(|| group_report(lab, &rows, expected, start_unix_us)),
        compare: None,
    })
}

/// The group's figures from its members' rows.
fn group_report(lab: &Lab, rows: &[HandlerInfo], expected: u64, start_unix_us: u64) -> GroupReport {
    let handled: u64 = rows.iter().map(|r| r.succeeded + r.failed).sum();
    let finished_us = rows
        .iter()
        .map(|r| r.last_done_unix_us)
        .max()
        .unwrap_or(start_unix_us)
        .saturating_sub(start_unix_us);
    let finished_secs = finished_us as f64 / 1e6;
    GroupReport {
        name: GROUP.to_owned(),
        expected,
        handled,
        duplicates: handled.saturating_sub(expected),
        taken_over: rows.iter().map(|r| r.taken_over).sum(),
        finished_secs,
        handled_per_sec: handled.min(expected) as f64 / finished_secs.max(1e-9),
        split: rows
            .iter()
            .zip(&lab.state.hosts)
            .map(|(r, h)| GroupShare {
                host: h.name.clone(),
                handled: r.succeeded + r.failed,
                share: (r.succeeded + r.failed) as f64 / expected.max(1) as f64,
                owned: r.owned,
                not_owned: r.not_owned,
                taken_over: r.taken_over,
            })
            .collect(),
    }
}

/// Polls host `i`'s handler row until it has handled `expected` events or stalls.
fn follow(lab: &Lab, i: usize, expected: u64) -> Option<HandlerInfo> {
    let mut last: Option<HandlerInfo> = None;
    let mut changed_at = Instant::now();
    loop {
        if let Some(row) = row(lab, i) {
            let handled = row.succeeded + row.failed;
            if last
                .as_ref()
                .is_none_or(|l| l.succeeded + l.failed != handled)
            {
                changed_at = Instant::now();
            }
            let complete = handled >= expected;
            last = Some(row);
            if complete {
                return last;
            }
        }
        if changed_at.elapsed() > STALL {
            return last;
        }
        // Each look runs `meshbus handlers` inside the host: keep it rare, it costs CPU (the
        // rates come from the row's own last-done time, not from when it was looked at).
        std::thread::sleep(LOOK_EVERY);
    }
}

/// Polls every peer's group row until together they have handled `expected` events or
/// their sum stalls; returns each peer's row as last seen.
fn follow_group(lab: &Lab, expected: u64) -> Vec<Option<HandlerInfo>> {
    let n = lab.state.hosts.len();
    let mut last: Vec<Option<HandlerInfo>> = vec![None; n];
    let mut last_sum = 0;
    let mut changed_at = Instant::now();
    loop {
        let looks: Vec<Option<HandlerInfo>> = std::thread::scope(|s| {
            let looks: Vec<_> = (0..n).map(|i| s.spawn(move || row(lab, i))).collect();
            looks
                .into_iter()
                .map(|l| l.join().unwrap_or_default())
                .collect()
        });
        for (slot, look) in last.iter_mut().zip(looks) {
            if look.is_some() {
                *slot = look;
            }
        }
        let sum: u64 = last.iter().flatten().map(|r| r.succeeded + r.failed).sum();
        if sum != last_sum {
            changed_at = Instant::now();
            last_sum = sum;
        }
        if sum >= expected || changed_at.elapsed() > STALL {
            return last;
        }
        // As in `follow`: each look runs `meshbus handlers` inside every host.
        std::thread::sleep(LOOK_EVERY);
    }
}

fn row(lab: &Lab, i: usize) -> Option<HandlerInfo> {
    let out = lab.cli(i, &["handlers", "--json"]).ok()?;
    let rows: Vec<HandlerInfo> = serde_json::from_slice(&out.stdout).ok()?;
    rows.into_iter().find(|r| r.pattern == PATTERN)
}

/// CPU seconds (user + system) process `pid` has used so far; 0 if `/proc` does not say.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    crate::process::stat_fields(pid)
        .and_then(|fields| {
            // After the command: state(0) … utime(11) stime(12).
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

/// The load generator: publishes `events` events of `size` data bytes on `topic` through the
/// peer at `api` (with its API `token`), in batches, at `rate` events per second or as fast
/// as the peer takes them.
pub async fn load(
    api: std::net::SocketAddr,
    token: Option<String>,
    topic: &str,
    events: usize,
    size: usize,
    rate: Option<f64>,
) -> Result<LoadReport, meshbus::api::ClientError> {
    use futures::StreamExt as _;
    let client = meshbus::api::Client::new(api).with_token(token);
    // A JSON string of exactly `size` bytes: quotes plus filler.
    let data = serde_json::value::RawValue::from_string(format!(
        "\"{}\"",
        "x".repeat(size.saturating_sub(2))
    ))
    .expect("a quoted run of x is JSON");
    // Within the peer's request body limit however large the events.
    let most = (REQUEST_BYTES / (size + 64)).clamp(1, CHUNK);
    let chunk = rate.map_or(most, |r| paced_chunk(r, most));
    let request = meshbus::api::PublishRequest {
        topic: topic.to_owned(),
        data: Some(data),
        ..Default::default()
    };
    let start = Instant::now();
    let chunks: Vec<usize> = (0..events)
        .step_by(chunk)
        .map(|from| chunk.min(events - from))
        .collect();
    let mut sent = 0usize;
    let results = futures::stream::iter(chunks.into_iter().map(|len| {
        let due = rate.map(|r| start + Duration::from_secs_f64(sent as f64 / r));
        sent += len;
        let batch = vec![request.clone(); len];
        let client = client.clone();
        async move {
            if let Some(due) = due {
                tokio::time::sleep_until(due.into()).await;
            }
            client.publish_batch(&batch).await.map(|p| p.len())
        }
    }))
    .buffered(if rate.is_some() { 1 } else { IN_FLIGHT })
    .collect::<Vec<_>>()
    .await;
    let mut published = 0;
    for r in results {
        published += r?;
    }
    Ok(LoadReport {
        published,
        secs: start.elapsed().as_secs_f64(),
    })
}

impl BenchReport {
    /// The table `meshbus-lab bench` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "meshbus-lab bench: {} peers, {} publisher(s), {} events of {} bytes, rate {}\n",
            self.peers,
            self.publishers,
            self.events,
            self.size,
            self.rate_offered
                .map(|r| format!("{r:.0}/s"))
                .unwrap_or_else(|| "unlimited".into())
        );
        out += &format!(
            "mesh formed {:.1} ms after the last start; publishers achieved {:.0} events/s\n",
            self.mesh_formed_ms, self.publish_rate
        );
        out += "host  delivered  complete  dropped   events/s   p50 ms   p90 ms   p99 ms   max ms  idle RSS  peak RSS  CPU s  links lost\n";
        for p in &self.per_peer {
            out += &format!(
                "{:<5} {:>9} {:>8.2}% {:>8} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.1}M {:>8.1}M {:>6.2} {:>11}\n",
                p.host,
                p.delivered,
                p.completeness * 100.0,
                p.dropped,
                p.delivered_per_sec,
                p.p50_ms,
                p.p90_ms,
                p.p99_ms,
                p.max_ms,
                p.idle_rss_kib as f64 / 1024.0,
                p.peak_rss_kib as f64 / 1024.0,
                p.cpu_secs,
                p.gossip_links_lost
            );
        }
        if let Some(g) = &self.group {
            out += &format!(
                "group `{}` as a whole: {} of {} events handled in {:.2} s, {:.0} events/s; {} duplicate(s), {} taken over\n",
                g.name,
                g.handled,
                g.expected,
                g.finished_secs,
                g.handled_per_sec,
                g.duplicates,
                g.taken_over
            );
            out += "host    handled    share     owned  not owned  taken over\n";
            for m in &g.split {
                out += &format!(
                    "{:<5} {:>9} {:>7.2}% {:>9} {:>10} {:>11}\n",
                    m.host,
                    m.handled,
                    m.share * 100.0,
                    m.owned,
                    m.not_owned,
                    m.taken_over
                );
            }
        }
        if let Some(c) = &self.compare {
            out += "\n";
            out += &c.nats.table();
            out += &format!(
                "meshbus / NATS: fan-out (slowest peer / slowest subscriber) {:.2}x; p50 (worst / worst) {:.1}x\n",
                c.fan_out_ratio, c.p50_ratio
            );
        }
        out
    }
}

/// What a scale curve varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// Peers in the lab.
    Peers,
    /// Bytes of data per event.
    Size,
}

/// One point of a scale curve: a whole bench run, summed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Peers.
    pub peers: usize,
    /// Bytes of data per event.
    pub size: usize,
    /// Mesh formation after the last start, ms (`None`: it did not form, see `error`).
    pub mesh_formed_ms: Option<f64>,
    /// Events per second the publisher got accepted.
    pub publish_rate: f64,
    /// The slowest peer's events/s.
    pub slowest_per_sec: f64,
    /// The slowest peer's data bytes/s (events/s × size).
    pub slowest_bytes_per_sec: f64,
    /// The least complete peer's delivered / expected.
    pub min_completeness: f64,
    /// The worst peer's p50 and p99, ms.
    pub worst_p50_ms: f64,
    /// See `worst_p50_ms`.
    pub worst_p99_ms: f64,
    /// CPU per delivered event, mean over the peers, µs.
    pub cpu_us_per_event: f64,
    /// Peak resident memory, largest over the peers, MiB.
    pub peak_rss_mib: f64,
    /// Why the run failed, if it did (the curve goes on with the next point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CurvePoint {
    fn new(config: &BenchConfig, result: Result<BenchReport, LabError>) -> Self {
        let mut point = CurvePoint {
            peers: config.peers,
            size: config.size,
            mesh_formed_ms: None,
            publish_rate: 0.0,
            slowest_per_sec: 0.0,
            slowest_bytes_per_sec: 0.0,
            min_completeness: 0.0,
            worst_p50_ms: 0.0,
            worst_p99_ms: 0.0,
            cpu_us_per_event: 0.0,
            peak_rss_mib: 0.0,
            error: None,
        };
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                point.error = Some(e.to_string());
                return point;
            }
        };
        let peers = &report.per_peer;
        let min = |f: fn(&PeerReport) -> f64| peers.iter().map(f).fold(f64::INFINITY, f64::min);
        let max = |f: fn(&PeerReport) -> f64| peers.iter().map(f).fold(0.0, f64::max);
        let delivered: u64 = peers.iter().map(|p| p.delivered).sum();
        let cpu: f64 = peers.iter().map(|p| p.cpu_secs).sum();
        point.mesh_formed_ms = Some(report.mesh_formed_ms);
        point.publish_rate = report.publish_rate;
        point.slowest_per_sec = min(|p| p.delivered_per_sec);
        point.slowest_bytes_per_sec = point.slowest_per_sec * config.size as f64;
        point.min_completeness = min(|p| p.completeness);
        point.worst_p50_ms = max(|p| p.p50_ms);
        point.worst_p99_ms = max(|p| p.p99_ms);
        point.cpu_us_per_event = cpu * 1e6 / delivered.max(1) as f64;
        point.peak_rss_mib = max(|p| p.peak_rss_kib as f64) / 1024.0;
        point
    }
}

/// Runs one bench per value of `axis` (the rest of `base` fixed), each on a fresh lab, and
/// sums each up; a point that fails is reported as such and the curve goes on.
pub fn curve(
    root: &Path,
    prefix: &str,
    base: &BenchConfig,
    axis: Axis,
    values: &[usize],
) -> Vec<CurvePoint> {
    values
        .iter()
        .map(|&value| {
            let mut config = base.clone();
            match axis {
                Axis::Peers => config.peers = value,
                Axis::Size => config.size = value,
            }
            let result = run(root, prefix, &config);
            let point = CurvePoint::new(&config, result);
            eprintln!("{}", curve_row(&point));
            point
        })
        .collect()
}

/// The header of [`curve_row`]s.
pub const CURVE_HEADER: &str = "peers     size  mesh ms  publish/s  slowest/s  slowest MB/s  complete  p50 ms   p99 ms  CPU µs/ev/peer  peak RSS";

/// One line of a scale curve's table.
pub fn curve_row(p: &CurvePoint) -> String {
    if let Some(error) = &p.error {
        return format!("{:>5} {:>8}  failed: {error}", p.peers, p.size);
    }
    format!(
        "{:>5} {:>8} {:>8.0} {:>10.0} {:>10.0} {:>13.2} {:>8.2}% {:>7.2} {:>8.2} {:>15.1} {:>8.1}M",
        p.peers,
        p.size,
        p.mesh_formed_ms.unwrap_or(f64::NAN),
        p.publish_rate,
        p.slowest_per_sec,
        p.slowest_bytes_per_sec / 1e6,
        p.min_completeness * 100.0,
        p.worst_p50_ms,
        p.worst_p99_ms,
        p.cpu_us_per_event,
        p.peak_rss_mib
    )
}
