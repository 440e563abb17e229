//! Handler tables for real: jq filters and transforms, a row's concurrency, rows that hang,
//! fail or chat without holding up the others, exec handlers' stdin and environment, and
//! exec process groups killed at shutdown.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

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
fn slow_failing_and_chatty_handlers_do_not_hold_up_other_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fast.jsonl");
    let pids = dir.path().join("pids");
    let a = Peer::local(&[
        "--exec-timeout",
        "2",
        "--on",
        &format!("jobs.*=exec:echo $$ >> {}; sleep 60", pids.display()),
        "--on",
        "jobs.*=exec:echo failing >&2; exit 3",
        "--on",
        "jobs.*=exec:head -c 5000000 /dev/zero",
        "--on",
        &format!("jobs.*=file:{}", file.display()),
    ]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let out: Value =
            serde_json::from_str(&a.cli_ok(&["publish", &format!("jobs.n{i}"), "1", "--json"]))
                .unwrap();
        ids.push(out["id"].as_str().unwrap().to_owned());
    }
    // The file handler finishes all three while the hanging one is still at work.
    wait_for_events(&file, 3, T);
    let status = a.status();
    // Had the file row waited behind the hanging one, the hanging one would be done with
    // all three (each takes its full 2 s timeout) before the file row wrote its last.
    let hanging = handler(&status, "exec:echo $$");
    let hung_done = hanging["succeeded"].as_u64().unwrap() + hanging["failed"].as_u64().unwrap();
    assert!(hung_done < 3, "{hanging:#}");

    wait_until(T, "every handler to finish", || {
        let s = a.status();
        handler(&s, "exec:echo $$")["failed"] == 3
            && handler(&s, "exec:echo failing")["failed"] == 3
            && handler(&s, "exec:head")["succeeded"] == 3
    });
    // Timeouts kill the whole process group.
    let groups: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(groups.len(), 3);
    wait_until(T, "hung handlers killed", || {
        groups.iter().all(|g| !group_alive(*g))
    });
    // Failures are logged with the event id.
    for id in &ids {
        let line = a.stderr.wait_for_line(id, T);
        assert!(line.contains("handler failed"), "{line}");
    }
    let logs = a.stderr.all().join("\n");
    assert!(
        logs.contains("exited with exit status: 3") && logs.contains("failing"),
        "{logs}"
    );
    assert!(logs.contains("still running after 2s"), "{logs}");
}

#[test]
fn exec_handlers_get_the_event_on_stdin_and_in_their_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let exec = format!(
        "orders.*=exec:cat > {d}/$MESHBUS_EVENT_ID.json && env | grep ^MESHBUS_ | sort > {d}/$MESHBUS_EVENT_ID.env"
    );
    let a = Peer::local(&[]);
    let b = Peer::local(&["--peer", a.tcp_addr(), "--on", &exec]);
    wait_until(T, "a and b connected", || a.peer_ids().len() == 1);
    let out: Value = serde_json::from_str(&a.cli_ok(&[
        "publish",
        "orders.created",
        r#"{"id":7}"#,
        "--type",
        "order.v1",
        "--json",
    ]))
    .unwrap();
    let id = out["id"].as_str().unwrap();
    let env_file = dir.path().join(format!("{id}.env"));
    let env = wait_for(T, "the exec handler's output", || {
        std::fs::read_to_string(&env_file)
            .ok()
            .filter(|s| s.contains("MESHBUS_TOPIC"))
    });
    let stdin: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(stdin["id"], id);
    assert_eq!(stdin["data"]["id"], 7);
    for expected in [
        format!("MESHBUS_EVENT_ID={id}"),
        "MESHBUS_EVENT_TYPE=order.v1".to_owned(),
        format!("MESHBUS_SOURCE={}", a.peer_id),
        "MESHBUS_TOPIC=orders.created".to_owned(),
    ] {
        assert!(env.lines().any(|l| l == expected), "{expected} in {env}");
    }
    drop(b);
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
