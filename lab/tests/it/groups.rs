//! Handler groups and queries on a real lab: a group handles each event once across its
//! members and shares the work; a key keeps one customer's events on one member, in order; a
//! killed member's events are taken over, with duplicates within the bound; a member joining
//! mid-stream takes a share of the new events; `meshbus query` gets one answer per answering
//! peer, one with `--group`, and says so when none comes. And the bench's `--group` mode.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// The group of the tests' group rows, and those rows' name.
const GROUP: &str = "billing";

/// Time every member gets to show a group's members all active: the join delay (2 s) and a
/// few announcement rounds, on a busy test machine.
const GROUP_FORMS: Duration = Duration::from_secs(30);

/// A config file with no rows, for a host outside every group.
const NO_ROWS: &str = "# no handler rows: this host is in no group\n";

/// One config file per host (`{host}.toml`) and the files their group rows write, in a
/// directory of the test's own, written before the lab starts.
struct Configs {
    dir: tempfile::TempDir,
}

impl Configs {
    fn new() -> Configs {
        Configs {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes (or rewrites) `host`'s config file.
    fn write(&self, host: &str, text: &str) {
        std::fs::write(self.dir.path().join(format!("{host}.toml")), text).unwrap();
    }

    /// A lab of `n` hosts, each `up` with its own config file (all must be written).
    fn up(&self, n: usize) -> LabRun {
        let config = format!("{}/{{host}}.toml", self.dir.path().display());
        LabRun::up_with(n, &["--config", &config])
    }

    /// Where `host`'s group row writes what it handles.
    fn handled_file(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("{host}.{GROUP}.jsonl"))
    }

    /// `host`'s row in the billing group: every `orders.` event it owns, written to its
    /// [`Configs::handled_file`]; owned by `key` when given, else by event id.
    fn billing_row(&self, host: &str, key: Option<&str>) -> String {
        let key = key.map(|k| format!("key = '{k}'\n")).unwrap_or_default();
        format!(
            "[[handler]]\nname = \"{GROUP}\"\npattern = \"orders.**\"\ngroup = \"{GROUP}\"\n{key}\n\
             [handler.file]\npath = '{}'\n",
            self.handled_file(host).display()
        )
    }

    /// What each of `hosts`'s group rows wrote, in the order handled.
    fn handled(&self, hosts: &[&str]) -> BTreeMap<String, Vec<Value>> {
        hosts
            .iter()
            .map(|h| (h.to_string(), events_in(&self.handled_file(h))))
            .collect()
    }

    /// The ids of the events any of `hosts`'s group rows handled.
    fn union(&self, hosts: &[&str]) -> BTreeSet<String> {
        hosts
            .iter()
            .flat_map(|h| events_in(&self.handled_file(h)))
            .map(|e| id(&e))
            .collect()
    }
}

/// A row in no group that matches nothing, so a table that later swaps it for the group row
/// keeps its shape (unnamed rows are named by their place).
const IDLE_ROW: &str =
    "[[handler]]\nname = \"idle\"\npattern = \"idle.**\"\n\n[handler.file]\npath = '/dev/null'\n";

fn id(event: &Value) -> String {
    event["id"].as_str().unwrap().to_owned()
}

/// An event's publish time, µs since the Unix epoch.
fn published_at(event: &Value) -> u64 {
    let time = event["time"].as_str().unwrap();
    meshbus::clock::unix_micros(humantime::parse_rfc3339(time).unwrap())
}

/// The peer ids of `hosts`.
fn peer_ids(lab: &LabRun, hosts: &[&str]) -> BTreeSet<String> {
    let status = lab.status();
    hosts
        .iter()
        .map(|h| status[*h]["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `meshbus ARGS… --json` run inside `host`, parsed; `None` if it failed.
fn meshbus_json(lab: &LabRun, host: &str, args: &[&str]) -> Option<Value> {
    let mut all = vec!["exec", host, "--", "meshbus"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = lab.run(&all);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A host's view of a group, from its `status`.
struct View {
    /// The members by peer id, and whether each is active (owns new events).
    members: BTreeMap<String, bool>,
    /// When this host's own membership became (or becomes) active, µs since the Unix epoch.
    my_since: Option<u64>,
    /// Events this host's row holds for other members.
    held: u64,
}

fn view(lab: &LabRun, host: &str, group: &str) -> Option<View> {
    let status = meshbus_json(lab, host, &["status"])?;
    let seen = status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)?;
    let members = seen["members"].as_array()?;
    Some(View {
        members: members
            .iter()
            .map(|m| {
                (
                    m["peer"].as_str().unwrap_or_default().to_owned(),
                    m["active"] == true,
                )
            })
            .collect(),
        my_since: members
            .iter()
            .find(|m| m["me"] == true)
            .and_then(|m| m["since_unix_us"].as_u64()),
        held: seen["held"].as_u64().unwrap_or(0),
    })
}

/// Waits until each of `hosts` sees exactly `members` in `group`, every one active: an event
/// published earlier could fall to a member that is not deciding yet.
fn wait_active(lab: &LabRun, hosts: &[&str], group: &str, members: &BTreeSet<String>) {
    for host in hosts {
        wait_until(
            GROUP_FORMS,
            &format!(
                "{host} to see all {} members of `{group}` active",
                members.len()
            ),
            || {
                view(lab, host, group).is_some_and(|v| {
                    v.members.keys().eq(members.iter()) && v.members.values().all(|a| *a)
                })
            },
        );
    }
}

/// `host`'s billing row, as `meshbus handlers` shows it.
fn billing_info(lab: &LabRun, host: &str) -> Option<Value> {
    let rows = meshbus_json(lab, host, &["handlers"])?;
    rows.as_array()?
        .iter()
        .find(|r| r["name"] == GROUP)
        .cloned()
}

fn count(row: &Value, counter: &str) -> u64 {
    row[counter].as_u64().unwrap_or(0)
}

/// Waits until the billing group is at rest on each `(host, read)`: the host's row has
/// decided at least `read` events (owned or not) and holds none for another member, so no
/// event is left for anyone to handle.
fn wait_settled(lab: &LabRun, hosts: &[(&str, u64)]) {
    for (host, read) in hosts {
        wait_until(
            T,
            &format!("{host}'s {GROUP} row to have decided {read} events and to hold none"),
            || {
                let (Some(row), Some(v)) = (billing_info(lab, host), view(lab, host, GROUP)) else {
                    return false;
                };
                count(&row, "owned") + count(&row, "not_owned") >= *read && v.held == 0
            },
        );
    }
}

/// The `topic` events that were published, as h0's plain `orders.**` row got them (every
/// host's table has that row, and it gets every event once); waits for `n` of them.
fn published_events(lab: &LabRun, topic: &str, n: usize) -> Vec<Value> {
    let path = lab.events_file("h0");
    wait_for(
        T,
        &format!("{n} `{topic}` events in {}", path.display()),
        || {
            let events: Vec<Value> = events_in(&path)
                .into_iter()
                .filter(|e| e["topic"] == topic)
                .collect();
            (events.len() >= n).then_some(events)
        },
    )
}

fn ids(events: &[Value]) -> BTreeSet<String> {
    events.iter().map(id).collect()
}

/// Every published event was handled by exactly one member, once, and nothing else was.
fn assert_exactly_once(handled: &BTreeMap<String, Vec<Value>>, published: &BTreeSet<String>) {
    let mut by: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (host, events) in handled {
        for e in events {
            by.entry(id(e)).or_default().push(host);
        }
    }
    let again: Vec<_> = by.iter().filter(|(_, hosts)| hosts.len() > 1).collect();
    assert!(
        again.is_empty(),
        "{} events handled more than once, e.g. {:?}",
        again.len(),
        &again[..again.len().min(5)]
    );
    let missing: Vec<_> = published.iter().filter(|i| !by.contains_key(*i)).collect();
    assert!(
        missing.is_empty(),
        "{} events handled by no member, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(by.len(), published.len(), "nothing but what was published");
}

#[test]
fn a_group_handles_each_event_once_and_its_members_share_the_work() {
    if !netns_or_skip("lab-groups-share") {
        return;
    }
    let _one = one_lab_at_a_time();
    let hosts = ["h0", "h1", "h2"];
    let configs = Configs::new();
    for host in hosts {
        configs.write(host, &configs.billing_row(host, None));
    }
    let lab = configs.up(hosts.len());
    wait_active(&lab, &hosts, GROUP, &peer_ids(&lab, &hosts));
    const N: usize = 3000;
    let topic = "orders.shared";
    // Two publishers, about three seconds of load.
    let loads = [
        lab.load("h0", topic, N / 2, 500.0),
        lab.load("h1", topic, N / 2, 500.0),
    ];
    let sent: u64 = loads.into_iter().map(Loader::wait).sum();
    assert_eq!(sent, N as u64);
    let published = ids(&published_events(&lab, topic, N));
    wait_until(T, "every event handled in the group", || {
        configs.union(&hosts).len() >= N
    });
    wait_settled(&lab, &hosts.map(|h| (h, N as u64)));
    let handled = configs.handled(&hosts);
    assert_exactly_once(&handled, &published);
    for host in hosts {
        let share = handled[host].len() as f64 / N as f64;
        eprintln!("{host} handled {:.1}% of the events", share * 100.0);
        assert!(
            (0.20..=0.47).contains(&share),
            "{host} handled {:.1}% of the events",
            share * 100.0
        );
    }
}

#[test]
fn a_key_keeps_each_customers_events_on_one_member_in_publisher_order() {
    if !netns_or_skip("lab-groups-key") {
        return;
    }
    let _one = one_lab_at_a_time();
    let hosts = ["h0", "h1", "h2"];
    let configs = Configs::new();
    for host in hosts {
        configs.write(host, &configs.billing_row(host, Some(".data.customer")));
    }
    let lab = configs.up(hosts.len());
    wait_active(&lab, &hosts, GROUP, &peer_ids(&lab, &hosts));
    const N: usize = 300;
    const CUSTOMERS: usize = 6;
    // One `meshbus publish` per event, in a loop inside h0: event i is for customer
    // c(i mod 6) and says n = i.
    let script = format!(
        r#"for i in $(seq 0 {last}); do '{bin}' publish orders.keyed "{{\"customer\":\"c$((i % {CUSTOMERS}))\",\"n\":$i}}" >/dev/null || exit 1; done"#,
        last = N - 1,
        bin = bin().display(),
    );
    lab.ok(&["exec", "h0", "--", "sh", "-c", &script]);
    let published = ids(&published_events(&lab, "orders.keyed", N));
    wait_until(T, "every event handled in the group", || {
        configs.union(&hosts).len() >= N
    });
    wait_settled(&lab, &hosts.map(|h| (h, N as u64)));
    let handled = configs.handled(&hosts);
    assert_exactly_once(&handled, &published);
    let customer = |e: &Value| e["data"]["customer"].as_str().unwrap().to_owned();
    let mut owners: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (host, events) in &handled {
        // Per customer, (seq, n) in the order this member handled them.
        let mut by_customer: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for e in events {
            owners.entry(customer(e)).or_default().insert(host);
            by_customer
                .entry(customer(e))
                .or_default()
                .push((e["seq"].as_u64().unwrap(), e["data"]["n"].as_u64().unwrap()));
        }
        eprintln!(
            "{host} handled customers {:?}",
            by_customer.keys().collect::<Vec<_>>()
        );
        for (c, got) in &by_customer {
            assert_eq!(got.len(), N / CUSTOMERS, "{host}: every event of {c}");
            assert!(
                got.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
                "{host}: {c}'s events out of publisher order: {got:?}"
            );
        }
    }
    assert_eq!(owners.len(), CUSTOMERS, "every customer's events handled");
    for (c, on) in &owners {
        assert_eq!(on.len(), 1, "{c}'s events were handled on {on:?}");
    }
}

#[test]
fn a_killed_members_events_are_taken_over_with_duplicates_within_the_bound() {
    if !netns_or_skip("lab-groups-kill") {
        return;
    }
    let _one = one_lab_at_a_time();
    // h0 only publishes; h1, h2 and h3 are the group.
    let members = ["h1", "h2", "h3"];
    let survivors = ["h2", "h3"];
    let configs = Configs::new();
    configs.write("h0", NO_ROWS);
    for host in members {
        configs.write(host, &configs.billing_row(host, None));
    }
    let lab = configs.up(4);
    wait_active(&lab, &members, GROUP, &peer_ids(&lab, &members));
    const N: usize = 3000;
    const RATE: f64 = 500.0;
    // What a killed member can have had in flight, or finished before its done-marks reached
    // the others: twice the events of 0.2 s of load.
    let bound = (2.0 * RATE * 0.2) as usize;
    let topic = "orders.takeover";
    // Six seconds of load; h1 dies about a second and a half in.
    let loader = lab.load("h0", topic, N, RATE);
    wait_until(T, "h1 to be handling its share of the load", || {
        events_in(&configs.handled_file("h1")).len() >= 200
    });
    lab.ok(&["kill", "h1"]);
    assert_eq!(loader.wait(), N as u64);
    let published = ids(&published_events(&lab, topic, N));
    wait_until(
        T,
        "every event handled, by h1 before it died or by the survivors",
        || configs.union(&members).is_superset(&published),
    );
    wait_settled(&lab, &survivors.map(|h| (h, N as u64)));
    let handled = configs.handled(&members);
    let union: BTreeSet<String> = handled.values().flatten().map(id).collect();
    assert!(union.is_superset(&published), "every event handled");
    assert_eq!(union.len(), N, "nothing but what was published");
    let lines: usize = handled.values().map(Vec::len).sum();
    let duplicates = lines - union.len();
    let taken_over: u64 = survivors
        .iter()
        .map(|h| billing_info(&lab, h).map_or(0, |r| count(&r, "taken_over")))
        .sum();
    eprintln!(
        "h1 handled {} before it died; h2 {}, h3 {}; {duplicates} duplicate(s) (bound {bound}); \
         the survivors took over {taken_over}",
        handled["h1"].len(),
        handled["h2"].len(),
        handled["h3"].len()
    );
    for host in survivors {
        assert_eq!(
            ids(&handled[host]).len(),
            handled[host].len(),
            "{host} handled an event twice itself"
        );
    }
    assert!(
        duplicates <= bound,
        "{duplicates} events handled twice; the bound is {bound}"
    );
}

#[test]
fn a_member_joining_mid_stream_takes_a_share_of_the_new_events() {
    if !netns_or_skip("lab-groups-join") {
        return;
    }
    let _one = one_lab_at_a_time();
    let hosts = ["h0", "h1", "h2"];
    let first = ["h0", "h1"];
    let configs = Configs::new();
    for host in first {
        configs.write(host, &configs.billing_row(host, None));
    }
    configs.write("h2", IDLE_ROW);
    let lab = configs.up(hosts.len());
    wait_active(&lab, &first, GROUP, &peer_ids(&lab, &first));
    const N: usize = 3000;
    let topic = "orders.joining";
    // Seven and a half seconds of load; h2 joins about a second in.
    let loader = lab.load("h0", topic, N, 400.0);
    wait_until(T, "the load to get going", || {
        configs.union(&first).len() >= 400
    });
    configs.write("h2", &configs.billing_row("h2", None));
    lab.ok(&["exec", "h2", "--", "meshbus", "reload"]);
    wait_active(&lab, &hosts, GROUP, &peer_ids(&lab, &hosts));
    let since = view(&lab, "h2", GROUP)
        .and_then(|v| v.my_since)
        .expect("h2's view shows its own membership");
    assert_eq!(loader.wait(), N as u64);
    let published = published_events(&lab, topic, N);
    let all = ids(&published);
    wait_until(T, "every event handled in the group", || {
        configs.union(&hosts).is_superset(&all)
    });
    wait_settled(&lab, &[("h0", N as u64), ("h1", N as u64), ("h2", 0)]);
    let handled = configs.handled(&hosts);
    assert_exactly_once(&handled, &all);
    let after = published
        .iter()
        .filter(|e| published_at(e) >= since)
        .count();
    let joined = &handled["h2"];
    eprintln!(
        "{after} events published after h2 became active; h2 handled {}",
        joined.len()
    );
    assert!(
        after >= 300,
        "the load ended too soon after h2 joined to tell ({after} events after)"
    );
    assert!(
        joined.iter().all(|e| published_at(e) >= since),
        "h2 handled an event published before it became a member"
    );
    assert!(
        joined.len() as f64 > 0.10 * after as f64,
        "h2 handled {} of the {after} events published after it joined",
        joined.len()
    );
}

/// `host`'s rows answering queries: on `ask.who` (in no group) and on `ask.billing` (in the
/// group `answerers`), each answering `{"host": HOST}`.
fn answering_rows(host: &str) -> String {
    let command =
        format!(r#"command = ["sh", "-c", "cat >/dev/null; echo '{{\"host\":\"{host}\"}}'"]"#);
    format!(
        "[[handler]]\nname = \"whoami\"\npattern = \"ask.who\"\nreply = true\n\n\
         [handler.exec]\n{command}\n\n\
         [[handler]]\nname = \"grouped\"\npattern = \"ask.billing\"\ngroup = \"answerers\"\n\
         reply = true\n\n[handler.exec]\n{command}\n"
    )
}

/// `meshbus query ARGS…` from `host`.
fn query(lab: &LabRun, host: &str, args: &[&str]) -> Output {
    let mut all = vec!["exec", host, "--", "meshbus", "query"];
    all.extend_from_slice(args);
    lab.run(&all)
}

/// The answers a `query --json` printed, one JSON object a line.
fn answers(out: Output) -> Vec<Value> {
    ok(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad answer line {l:?}: {e}")))
        .collect()
}

#[test]
fn a_query_gets_one_answer_per_answering_peer_and_one_with_group() {
    if !netns_or_skip("lab-groups-query") {
        return;
    }
    let _one = one_lab_at_a_time();
    let answerers = ["h1", "h2", "h3", "h4"];
    let configs = Configs::new();
    configs.write("h0", NO_ROWS);
    for host in answerers {
        configs.write(host, &answering_rows(host));
    }
    let lab = configs.up(5);
    let status = lab.status();
    let host_of: BTreeMap<String, String> = answerers
        .iter()
        .map(|h| {
            (
                status[*h]["peer_id"].as_str().unwrap().to_owned(),
                h.to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<String> = host_of.keys().cloned().collect();

    let got = answers(query(&lab, "h0", &["ask.who", "--timeout", "3s", "--json"]));
    assert_eq!(
        got.len(),
        answerers.len(),
        "one answer per answering peer: {got:?}"
    );
    let peers: BTreeSet<String> = got
        .iter()
        .map(|a| a["peer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(peers, expected, "{got:?}");
    for a in &got {
        let host = &host_of[a["peer"].as_str().unwrap()];
        assert_eq!(a["name"], host.as_str(), "{a}");
        assert_eq!(a["handler"], "whoami", "{a}");
        assert_eq!(a["answer"]["host"], host.as_str(), "{a}");
        assert!(a["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{a}");
    }

    wait_active(&lab, &answerers, "answerers", &expected);
    let got = answers(query(
        &lab,
        "h0",
        &[
            "ask.billing",
            "--group",
            "answerers",
            "--timeout",
            "5s",
            "--json",
        ],
    ));
    assert_eq!(got.len(), 1, "one answer from the group: {got:?}");
    let answer = &got[0];
    let peer = answer["peer"].as_str().unwrap();
    assert!(expected.contains(peer), "{answer}");
    assert_eq!(answer["handler"], "grouped", "{answer}");
    assert_eq!(answer["answer"]["host"], host_of[peer].as_str(), "{answer}");
}

#[test]
fn a_query_no_row_answers_ends_at_its_timeout_saying_so() {
    if !netns_or_skip("lab-groups-no-answer") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(5);
    let asked = Instant::now();
    let out = query(&lab, "h0", &["nobody.home", "--timeout", "1s"]);
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no answers from 4 peers"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(took >= Duration::from_secs(1), "ended after {took:?}");
}

#[test]
fn the_bench_in_group_mode_handles_every_event_once_across_the_peers() {
    if !netns_or_skip("lab-groups-bench") {
        return;
    }
    let _one = one_lab_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(LAB_BIN)
        .args(["--prefix", &lab_prefix(), "bench", "--group", "--json"])
        .args(["--peers", "3", "--publishers", "1", "--events", "3000"])
        .args(["--rate", "1500", "--size", "64"])
        .env("MESHBUS_LAB_DIR", root.path())
        .env("MESHBUS_BIN", bin())
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&ok(out)).unwrap();
    let group = &report["group"];
    assert_eq!(group["expected"], 3000, "{group}");
    assert_eq!(group["handled"], 3000, "{group}");
    assert_eq!(group["duplicates"], 0, "{group}");
    assert!(group["handled_per_sec"].as_f64().unwrap() > 0.0, "{group}");
    let split = group["split"].as_array().unwrap();
    assert_eq!(split.len(), 3, "{group}");
    for member in split {
        let share = member["share"].as_f64().unwrap();
        assert!((0.20..=0.47).contains(&share), "{member}");
    }
}
