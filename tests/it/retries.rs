//! Handler failures: webhooks against a real HTTP server and exec commands are retried with
//! backoff (honouring `Retry-After`), dead-lettered when their attempts are spent, and
//! counted, as are unwritable files, refused connections and failing jq filters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse as _;
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
    // A program that is there when the table loads (a missing one is refused at load) and
    // gone by the time the event comes.
    let gone = dir.path().join("gone.sh");
    std::fs::write(&gone, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&gone, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
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
command = ["{gone}", "--flag"]

[[handler]]
name = "argv"
pattern = "jobs.*"
[handler.exec]
command = ["sh", "-c", "cat > {d}/argv.json"]
cwd = "{d}"
"#,
            dead = dead.display(),
            gone = gone.display()
        ),
    );
    let a = Peer::local(&["--config", &config]);
    std::fs::remove_file(&gone).unwrap();
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
    assert!(letters[0]["error"].as_str().unwrap().contains("gone.sh"));
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
