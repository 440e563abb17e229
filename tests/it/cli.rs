//! The command line against real peers in the host namespace (no mDNS, explicit `--peer` on
//! 127.0.0.1): what `publish`, `tail`, `peers`, `status` and `handlers` print, data from
//! stdin, and the error when no peer answers.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn publish_with_no_running_peer_names_the_address_it_tried() {
    // Port 1 on loopback: nothing listens there.
    let out = Command::new(bin())
        .args(["publish", "orders.created", "1", "--api", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("no meshbus peer answers at 127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("meshbus up"), "{err}");

    let out = Command::new(bin())
        .args(["peers"])
        .env("MESHBUS_API", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("127.0.0.1:1"),
        "MESHBUS_API is honoured"
    );
}

#[test]
fn the_cli_reads_the_token_from_the_data_dir_and_without_it_is_refused_clearly() {
    let a = Peer::local(&[]);
    // Its own data dir: the token is found.
    a.cli_ok(&["status"]);
    // Another user's data dir (no token there): 401 and what to do.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = a
        .command(&["publish", "orders.created", "1"])
        .env("MESHBUS_DATA_DIR", elsewhere.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("(401)") && err.contains("api.token"), "{err}");
    // A read-only token from the config reads but cannot publish.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("reader.token");
    std::fs::write(&secret, "reader-secret-0123456789").unwrap();
    let config = write_config(
        dir.path(),
        "tokens.toml",
        &format!(
            "[[token]]\nname = \"dash\"\nsecret_file = \"{}\"\naccess = \"read\"\n",
            secret.display()
        ),
    );
    let b = Peer::local(&["--config", &config]);
    let reader = ["--token", "reader-secret-0123456789"];
    let out = b.command(&["status"]).args(reader).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = b
        .command(&["publish", "orders.created", "1"])
        .args(reader)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("(403)") && err.contains("\"dash\" may not POST"),
        "{err}"
    );
    // A wrong token given outright.
    let out = a
        .command(&["status", "--token", "wrong-token-0123456789"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("unknown token"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn invite_and_join_carry_the_mesh_key_and_keys_rotate_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |args: &[&str]| ok(Command::new(bin()).args(args).output().unwrap());
    let dir = |d: &tempfile::TempDir| d.path().to_str().unwrap().to_owned();
    let line = run(&["invite", "--data-dir", &dir(&a)]);
    assert!(line.starts_with("meshbus-invite-1:"), "{line}");
    // From standard input, so the line is not on a command line.
    let mut join = Command::new(bin())
        .args(["join", "-", "--data-dir", &dir(&b)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut join.stdin.take().unwrap(), line.as_bytes()).unwrap();
    ok(join.wait_with_output().unwrap());
    let list = |d| run(&["keys", "list", "--data-dir", &dir(d)]);
    assert_eq!(list(&a), list(&b), "both hold the same key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(b.path().join("mesh.keys"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let new = run(&["keys", "generate"]);
    let old = list(&a).split_whitespace().next().unwrap().to_owned();
    run(&["keys", "install", new.trim(), "--data-dir", &dir(&a)]);
    run(&["keys", "use", new.trim(), "--data-dir", &dir(&a)]);
    run(&["keys", "remove", &old, "--data-dir", &dir(&a)]);
    let now = list(&a);
    assert_eq!(now.lines().count(), 1, "{now}");
    assert!(!now.contains(&old) && now.contains("primary"), "{now}");
    let out = Command::new(bin())
        .args(["join", "not-an-invitation", "--data-dir", &dir(&a)])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("not an invitation"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn publish_prints_the_event_id_and_how_many_peers_it_reached() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || {
        a.peer_ids() == [b.peer_id.clone()]
    });

    let json: Value =
        serde_json::from_str(&a.cli_ok(&["publish", "orders.created", r#"{"id":42}"#, "--json"]))
            .unwrap();
    assert_eq!(json["sent_to"], 1);
    assert_eq!(json["seq"], 1);
    let id = json["id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");

    let line = a.cli_ok(&["publish", "orders.created", "plain words"]);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 7, "{line}");
    assert_eq!(words[0].len(), 36);
    assert_eq!(&words[1..5], ["sent", "to", "1", "peer"], "{line}");

    let alone = Peer::local(&[]);
    let line = alone.cli_ok(&["publish", "orders.created"]);
    assert!(line.contains("sent to 0 peers"), "{line}");
}

#[test]
fn publish_reads_data_from_stdin_and_takes_json_or_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let a = Peer::local(&["--on", &format!("**=file:{}", path.display())]);
    let mut child = a
        .command(&["publish", "notes.added", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"from\": \"stdin\"}\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    a.cli_ok(&["publish", "notes.added", "just text", "--type", "note.v1"]);
    let events = wait_for_events(&path, 2, T);
    assert_eq!(events[0]["data"]["from"], "stdin");
    assert_eq!(events[0]["datacontenttype"], "application/json");
    assert_eq!(events[0]["type"], "notes.added");
    assert_eq!(events[1]["data"], "just text");
    assert_eq!(events[1]["datacontenttype"], "text/plain");
    assert_eq!(events[1]["type"], "note.v1");
}

#[test]
fn tail_streams_matching_events_and_exits_after_count() {
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr()]);
    wait_until(T, "a and b connected", || {
        b.peer_ids() == [a.peer_id.clone()]
    });
    let tail = |json: bool| {
        let mut cmd = b.command(&["tail", "orders.*", "--count", "2"]);
        if json {
            cmd.arg("--json");
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (json_tail, line_tail) = (tail(true), tail(false));
    wait_until(T, "both tails subscribed", || {
        b.status()["subscribers"] == 2
    });

    a.cli_ok(&["publish", "users.created", "1"]);
    a.cli_ok(&["publish", "orders.created", r#"{"id":1}"#]);
    b.cli_ok(&["publish", "orders.shipped", "boxed"]);

    let out = ok(json_tail.wait_with_output().unwrap());
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["topic"], "orders.created");
    assert_eq!(events[0]["data"]["id"], 1);
    assert_eq!(events[0]["source"], a.peer_id.as_str());
    assert_eq!(events[1]["topic"], "orders.shipped");
    assert_eq!(events[1]["source"], b.peer_id.as_str());

    let out = ok(line_tail.wait_with_output().unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("orders.created") && lines[0].ends_with(r#"{"id":1}"#),
        "{out}"
    );
    assert!(
        lines[1].contains("orders.shipped") && lines[1].ends_with("boxed"),
        "{out}"
    );
}

#[test]
fn peers_status_and_handlers_show_the_mesh() {
    let a = Peer::local(&["--name", "alpha"]);
    let b = Peer::local(&["--name", "beta", "--peer", a.tcp_addr(), "--on", "x.*=log"]);
    wait_until(T, "a and b connected", || {
        a.peer_ids() == [b.peer_id.clone()]
    });

    let peers: Vec<Value> = serde_json::from_str(&a.cli_ok(&["peers", "--json"])).unwrap();
    assert_eq!(peers[0]["name"], "beta");
    assert!(!peers[0]["connected_addrs"].as_array().unwrap().is_empty());
    assert!(peers[0]["listen_addrs"][0]
        .as_str()
        .unwrap()
        .starts_with("/ip4/127.0.0.1/tcp/"));
    let text = a.cli_ok(&["peers"]);
    assert!(text.contains(&b.peer_id) && text.contains("beta"), "{text}");

    b.cli_ok(&["publish", "x.y", "1"]);
    wait_until(T, "a counts the event", || {
        a.status()["counters"]["received"] == 1
    });
    let status = b.status();
    assert_eq!(status["peer_id"], b.peer_id.as_str());
    assert_eq!(status["name"], "beta");
    assert_eq!(status["peers"], 1);
    assert_eq!(status["counters"]["published"], 1);
    assert_eq!(status["mdns"], false);
    wait_until(T, "b's log handler ran", || {
        handler(&b.status(), "log")["succeeded"] == 1
    });
    assert!(b.stdout.wait_for_line("x.y", T).ends_with(" 1"));
    let text = b.cli_ok(&["status"]);
    assert!(text.contains("1 published"), "{text}");
    let rows = b.cli_ok(&["handlers"]);
    assert!(rows.contains("x.*") && rows.contains("log"), "{rows}");
}
