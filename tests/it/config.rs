//! Config files: `reload` and SIGHUP swap the handler table without losing or repeating an
//! event, and a bad file is refused naming its file, line and key (at start and on reload).

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(30);

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
    let client = b.client();

    // Publish steadily from another thread while the table is swapped under it.
    const N: usize = 300;
    let publisher = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
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
