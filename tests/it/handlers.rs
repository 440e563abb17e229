//! Handler tables for real: config files, webhooks against a real HTTP server, retries,
//! dead letters, jq filters, concurrency, reload.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

/// A real HTTP server on 127.0.0.1 with a few badly behaved endpoints.
struct Hooks {
    addr: SocketAddr,
    /// Requests per endpoint.
    flaky: Arc<AtomicUsize>,
    limited: Arc<AtomicUsize>,
    ok: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Hooks {
    fn start() -> Hooks {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let flaky = Arc::new(AtomicUsize::new(0));
        let limited = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, l, o, b) = (flaky.clone(), limited.clone(), ok.clone(), bodies.clone());
        let app = axum::Router::new()
            // Fails twice, then succeeds.
            .route(
                "/flaky",
                post(move || {
                    let n = f.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 2 {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        }
                    }
                }),
            )
            // 429 with Retry-After: 1 the first time.
            .route(
                "/limited",
                post(move || {
                    let n = l.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
                        } else {
                            StatusCode::OK.into_response()
                        }
                    }
                }),
            )
            // Never answers.
            .route(
                "/silent",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    StatusCode::OK
                }),
            )
            .route("/gone", post(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/ok",
                post(move |headers: axum::http::HeaderMap, body: String| {
                    o.fetch_add(1, Ordering::SeqCst);
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let ce_id = headers
                        .get("ce-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    b.lock().unwrap().push((format!("{ct} {ce_id}"), body));
                    async { StatusCode::OK }
                }),
            );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        Hooks {
            addr,
            flaky,
            limited,
            ok,
            bodies,
            _runtime: runtime,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

use axum::response::IntoResponse as _;

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn row<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no handler {name}: {status:#}"))
}

#[test]
fn webhooks_retry_honour_retry_after_and_dead_letter_what_never_succeeds() {
    let hooks = Hooks::start();
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let config = write_config(
        dir.path(),
        "meshbus.toml",
        &format!(
            r#"
[[handler]]
name = "flaky"
pattern = "orders.*"
retries = 3
backoff = "50ms"
[handler.http]
url = "{flaky}"

[[handler]]
name = "limited"
pattern = "orders.*"
retries = 2
backoff = "10ms"
[handler.http]
url = "{limited}"

[[handler]]
name = "silent"
pattern = "orders.*"
retries = 1
backoff = "10ms"
dead_letter = "{dead}"
[handler.http]
url = "{silent}"
timeout = "300ms"

[[handler]]
name = "gone"
pattern = "orders.*"
retries = 5
dead_letter = "{dead}"
[handler.http]
url = "{gone}"

[[handler]]
name = "binary"
pattern = "orders.*"
[handler.http]
url = "{ok}"
mode = "binary"
"#,
            flaky = hooks.url("/flaky"),
            limited = hooks.url("/limited"),
            silent = hooks.url("/silent"),
            gone = hooks.url("/gone"),
            ok = hooks.url("/ok"),
            dead = dead.display(),
        ),
    );
    let a = Peer::local(&["--config", &config]);
    let out: Value =
        serde_json::from_str(&a.cli_ok(&["publish", "orders.created", r#"{"id":7}"#, "--json"]))
            .unwrap();
    let id = out["id"].as_str().unwrap().to_owned();

    wait_until(T, "every webhook row to finish", || {
        let s = a.status();
        row(&s, "flaky")["succeeded"] == 1
            && row(&s, "limited")["succeeded"] == 1
            && row(&s, "silent")["dead_lettered"] == 1
            && row(&s, "gone")["dead_lettered"] == 1
            && row(&s, "binary")["succeeded"] == 1
    });
    let s = a.status();
    assert_eq!(row(&s, "flaky")["retried"], 2, "500, 500, then 200");
    assert_eq!(hooks.flaky.load(Ordering::SeqCst), 3);
    assert_eq!(row(&s, "limited")["retried"], 1);
    assert_eq!(hooks.limited.load(Ordering::SeqCst), 2);
    assert!(
        row(&s, "limited")["latency"]["max_us"].as_u64().unwrap() >= 1_000_000,
        "waited the Retry-After second: {:#}",
        row(&s, "limited")
    );
    assert_eq!(row(&s, "silent")["retried"], 1);
    assert_eq!(row(&s, "silent")["failed"], 1);
    assert_eq!(row(&s, "gone")["retried"], 0, "a 404 is not worth retrying");
    assert!(row(&s, "gone")["last_error"]
        .as_str()
        .unwrap()
        .contains("404"));

    let letters = wait_for_events(&dead, 2, T);
    for letter in &letters {
        assert_eq!(letter["event"]["id"], id.as_str());
        assert!(
            letter["error"].as_str().unwrap().contains("POST"),
            "{letter}"
        );
    }
    let silent = letters.iter().find(|l| l["handler"] == "silent").unwrap();
    assert_eq!(silent["attempts"], 2);
    assert!(
        silent["error"].as_str().unwrap().contains("in time"),
        "{silent}"
    );

    let bodies = hooks.bodies.lock().unwrap().clone();
    assert_eq!(hooks.ok.load(Ordering::SeqCst), 1);
    assert_eq!(
        bodies[0].0,
        format!("application/json {id}"),
        "binary mode headers"
    );
    assert_eq!(bodies[0].1, r#"{"id":7}"#, "binary mode body is the data");
}

#[test]
fn exec_rows_retry_until_success_and_dead_letter_missing_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let dead = dir.path().join("dead.jsonl");
    let config = write_config(
        dir.path(),
        "meshbus.toml",
        &format!(
            r#"
[[handler]]
name = "second-time"
pattern = "jobs.*"
retries = 2
backoff = "20ms"
[handler.exec]
command = "test -f {d}/tried || {{ touch {d}/tried; exit 1; }}"

[[handler]]
name = "missing"
pattern = "jobs.*"
retries = 1
backoff = "20ms"
dead_letter = "{dead}"
[handler.exec]
command = ["/no/such/program", "--flag"]

[[handler]]
name = "argv"
pattern = "jobs.*"
[handler.exec]
command = ["sh", "-c", "cat > {d}/argv.json"]
cwd = "{d}"
"#,
            dead = dead.display()
        ),
    );
    let a = Peer::local(&["--config", &config]);
    a.cli_ok(&["publish", "jobs.run", r#"{"n":1}"#]);
    wait_until(T, "rows to finish", || {
        let s = a.status();
        row(&s, "second-time")["succeeded"] == 1
            && row(&s, "missing")["dead_lettered"] == 1
            && row(&s, "argv")["succeeded"] == 1
    });
    let s = a.status();
    assert_eq!(row(&s, "second-time")["retried"], 1);
    assert_eq!(row(&s, "second-time")["failed"], 0);
    assert_eq!(row(&s, "missing")["retried"], 1);
    let letters = wait_for_events(&dead, 1, T);
    assert!(letters[0]["error"]
        .as_str()
        .unwrap()
        .contains("/no/such/program"));
    let stdin: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("argv.json")).unwrap())
            .unwrap();
    assert_eq!(stdin["data"]["n"], 1);
    let text = a.cli_ok(&["handlers"]);
    assert!(
        text.contains("second-time") && text.contains("LAST ERROR"),
        "{text}"
    );
}

#[test]
fn jq_filters_choose_events_and_transforms_shape_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.jsonl");
    let config = write_config(
        dir.path(),
        "meshbus.toml",
        &format!(
            r#"
[[handler]]
name = "big"
pattern = "orders.*"
filter = ".data.amount > 100"
transform = "{{id: .data.id, amount: .data.amount}}"
[handler.file]
path = "{}"
"#,
            out.display()
        ),
    );
    let a = Peer::local(&["--config", &config]);
    for (id, amount) in [(1, Value::from(50)), (2, 150.into()), (3, "lots".into())] {
        let data = serde_json::json!({"id": id, "amount": amount}).to_string();
        a.cli_ok(&["publish", "orders.created", &data]);
    }
    a.cli_ok(&["publish", "orders.created", r#"{"id":4,"amount":101}"#]);
    let got = wait_for_events(&out, 3, T);
    // "lots" > 100 is true in jq (strings sort after numbers): it passes, it is no error.
    assert_eq!(
        got,
        [
            serde_json::json!({"id": 2, "amount": 150}),
            serde_json::json!({"id": 3, "amount": "lots"}),
            serde_json::json!({"id": 4, "amount": 101})
        ]
    );
    let s = a.status();
    assert_eq!(row(&s, "big")["filtered_out"], 1, "amount 50 skipped");
    assert_eq!(row(&s, "big")["matched"], 4);
}

#[test]
fn a_row_runs_up_to_its_concurrency_and_a_sleeping_row_holds_up_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let fast = dir.path().join("fast.jsonl");
    let gate = dir.path().join("gate");
    let config = write_config(
        dir.path(),
        "meshbus.toml",
        &format!(
            r#"
[[handler]]
name = "wide"
pattern = "work.*"
concurrency = 4
[handler.exec]
command = "while [ ! -f {gate} ]; do sleep 0.05; done"

[[handler]]
name = "fast"
pattern = "work.*"
[handler.file]
path = "{fast}"
"#,
            gate = gate.display(),
            fast = fast.display()
        ),
    );
    let a = Peer::local(&["--config", &config]);
    for i in 0..6 {
        a.cli_ok(&["publish", &format!("work.n{i}"), "1"]);
    }
    // The fast row is done while every worker of the wide row is still waiting.
    wait_for_events(&fast, 6, T);
    wait_until(T, "4 in flight, 2 queued", || {
        let s = a.status();
        row(&s, "wide")["in_flight"] == 4 && row(&s, "wide")["queue_depth"] == 2
    });
    let s = a.status();
    assert_eq!(row(&s, "wide")["succeeded"], 0);
    assert!(row(&s, "fast")["latency"]["max_us"].as_u64().unwrap() < 5_000_000);
    std::fs::write(&gate, "").unwrap();
    wait_until(T, "the wide row to finish", || {
        row(&a.status(), "wide")["succeeded"] == 6
    });
}

#[test]
fn reload_swaps_the_table_without_losing_or_repeating_events() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (
        dir.path().join("first.jsonl"),
        dir.path().join("second.jsonl"),
    );
    let table = |path: &Path| {
        format!(
            "[[handler]]\nname = \"sink\"\npattern = \"load.*\"\n[handler.file]\npath = \"{}\"\n",
            path.display()
        )
    };
    let config = write_config(dir.path(), "meshbus.toml", &table(&first));
    let a = Peer::local(&["--config", &config]);
    // Events come from another peer, over the mesh.
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || {
        a.peer_ids() == [b.peer_id.clone()]
    });
    let api = b.api.unwrap();

    // Publish steadily from another thread while the table is swapped under it.
    const N: usize = 300;
    let publisher = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let client = meshbus::client::Client::new(api);
        let mut ids = Vec::new();
        for i in 0..N {
            let request = meshbus::api::PublishRequest {
                topic: "load.item".into(),
                data: Some(serde_json::value::to_raw_value(&i).unwrap()),
                ..Default::default()
            };
            ids.push(runtime.block_on(client.publish(&request)).unwrap().id);
        }
        ids
    });
    wait_until(T, "some events under the first table", || {
        events_in(&first).len() >= 20
    });
    std::fs::write(&config, table(&second)).unwrap();
    let out = a.cli_ok(&["reload"]);
    assert!(out.contains("reloaded: 1 handler(s): sink"), "{out}");
    let ids = publisher.join().unwrap();

    let all = wait_for(T, "every event in one file or the other", || {
        let mut all: Vec<String> = events_in(&first)
            .into_iter()
            .chain(events_in(&second))
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        (all.len() >= N).then(|| {
            all.sort();
            all
        })
    });
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        all, expected,
        "each event handled exactly once across the reload"
    );
    assert!(!events_in(&second).is_empty(), "the new table took over");

    // An invalid file is refused with the reason; the table in force stays.
    std::fs::write(
        &config,
        "[[handler]]\npattern = \"load.*\"\nbogus = 1\n[handler.log]\n",
    )
    .unwrap();
    let out = a.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("meshbus.toml:3") && err.contains("bogus"),
        "{err}"
    );
    let before = events_in(&second).len();
    a.cli_ok(&["publish", "load.after", "1"]);
    wait_for_events(&second, before + 1, T);
}

#[test]
fn sighup_reloads_too() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("after.jsonl");
    let config = write_config(dir.path(), "meshbus.toml", "");
    let a = Peer::local(&["--config", &config]);
    std::fs::write(
        &config,
        format!(
            "[[handler]]\nname = \"new\"\npattern = \"x.*\"\n[handler.file]\npath = \"{}\"\n",
            out.display()
        ),
    )
    .unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(T, "the new row", || {
        a.status()["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "new")
    });
    a.cli_ok(&["publish", "x.y", "1"]);
    wait_for_events(&out, 1, T);
}

#[test]
fn a_bad_config_file_stops_up_naming_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "broken.toml",
        "[node]\nname = \"x\"\n\n[[handler]]\npattern = \"a.*\"\nretries = \"three\"\n[handler.log]\n",
    );
    let err = up_fails(&["--api", "127.0.0.1:0", "--config", &config]);
    assert!(err.contains("broken.toml:6:"), "{err}");
    assert!(err.contains("three"), "{err}");

    let config = write_config(
        dir.path(),
        "badjq.toml",
        "[[handler]]\nname = \"j\"\npattern = \"a.*\"\nfilter = \".x | nosuch\"\n[handler.log]\n",
    );
    let err = up_fails(&["--api", "127.0.0.1:0", "--config", &config]);
    assert!(
        err.contains("handler `j`") && err.contains("nosuch"),
        "{err}"
    );
}

#[test]
fn unwritable_files_refused_connections_and_failing_filters_are_counted_failures() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    // A port nothing listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = write_config(
        dir.path(),
        "meshbus.toml",
        &format!(
            r#"
[[handler]]
name = "nowhere"
pattern = "x.*"
retries = 1
backoff = "10ms"
dead_letter = "{dead}"
[handler.file]
path = "{dir}/no/such/dir/events.jsonl"

[[handler]]
name = "refused"
pattern = "x.*"
retries = 2
backoff = "10ms"
dead_letter = "{dead}"
[handler.http]
url = "http://{closed}/hook"

[[handler]]
name = "badjq"
pattern = "x.*"
filter = ".data | ascii_downcase"
[handler.log]
"#,
            dead = dead.display(),
            dir = dir.path().display(),
        ),
    );
    let a = Peer::local(&["--config", &config]);
    a.cli_ok(&["publish", "x.y", "42"]);
    wait_until(T, "every row to give up", || {
        let s = a.status();
        row(&s, "nowhere")["dead_lettered"] == 1
            && row(&s, "refused")["dead_lettered"] == 1
            && row(&s, "badjq")["failed"] == 1
    });
    let s = a.status();
    assert_eq!(row(&s, "nowhere")["retried"], 1);
    assert_eq!(row(&s, "refused")["retried"], 2);
    assert!(row(&s, "refused")["last_error"]
        .as_str()
        .unwrap()
        .contains("POST"));
    assert!(row(&s, "badjq")["last_error"]
        .as_str()
        .unwrap()
        .contains("jq"));
    assert_eq!(wait_for_events(&dead, 2, T).len(), 2);
    // The peer carries on.
    a.cli_ok(&["publish", "x.z", "1"]);
    wait_until(T, "the next event handled too", || {
        row(&a.status(), "badjq")["matched"] == 2
    });
}

#[test]
fn shutdown_kills_a_running_exec_handler_with_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pid");
    let a = Peer::local(&[
        "--on",
        &format!("x.*=exec:echo $$ > {}; sleep 600", pids.display()),
    ]);
    a.cli_ok(&["publish", "x.y", "1"]);
    let group: i32 = wait_for(T, "the handler to start", || {
        std::fs::read_to_string(&pids).ok()?.trim().parse().ok()
    });
    assert!(group_alive(group));
    let status = a.stop();
    assert!(status.success(), "{status}");
    wait_until(T, "the handler's group to be gone", || !group_alive(group));
}
