//! Faults on a lab: a killed peer is dropped and rejoins with its identity after a restart, a
//! cut host is dropped while the rest carry on and rejoins on heal, and neither a dropped
//! `VirtualLan` nor a crashed lab leaves namespaces or processes behind.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

#[test]
fn a_killed_peer_is_dropped_and_rejoins_with_the_same_id_after_restart() {
    if !netns_or_skip("lab-kill") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(4);
    let victim = lab.peer_id("h3");
    lab.ok(&["kill", "h3"]);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(10),
            &format!("{host} to drop h3"),
            || !lab.sees(host).contains(&victim),
        );
    }
    let during = lab.publish("h0", "orders.during");
    for host in ["h0", "h1", "h2"] {
        wait_for_id(&lab.events_file(host), &during);
    }

    let out = lab.ok(&["restart", "h3"]);
    assert!(out.contains(&victim), "same peer id after restart: {out}");
    assert_eq!(lab.peer_id("h3"), victim);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{host} to see h3 again"),
            || lab.sees(host).contains(&victim),
        );
    }
    let after = lab.publish("h1", "orders.after");
    for host in ["h0", "h1", "h2", "h3"] {
        wait_for_id(&lab.events_file(host), &after);
    }
    // What h3 was down for is fetched from the others once it is back.
    wait_for_id(&lab.events_file("h3"), &during);
}

#[test]
fn a_cut_host_is_dropped_the_rest_carry_on_and_it_rejoins_on_heal() {
    if !netns_or_skip("lab-cut") {
        return;
    }
    let _one = one_lab_at_a_time();
    let lab = LabRun::up(4);
    let cut = lab.peer_id("h3");
    lab.ok(&["cut", "h3"]);
    for host in ["h0", "h1", "h2"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{host} to drop the cut host"),
            || !lab.sees(host).contains(&cut),
        );
    }
    let during = lab.publish("h0", "orders.during");
    for host in ["h0", "h1", "h2"] {
        wait_for_id(&lab.events_file(host), &during);
    }
    lab.ok(&["heal", "h3"]);
    wait_until(
        Duration::from_secs(30),
        "h3 back in everyone's view",
        || {
            lab.sees("h3").len() == 3
                && ["h0", "h1", "h2"]
                    .iter()
                    .all(|h| lab.sees(h).contains(&cut))
        },
    );
    let after = lab.publish("h2", "orders.after");
    for host in ["h0", "h1", "h2", "h3"] {
        wait_for_id(&lab.events_file(host), &after);
    }
    wait_for_id(&lab.events_file("h3"), &during);
}

#[test]
fn a_lab_left_behind_by_a_crash_is_cleaned_by_the_next_up_or_down() {
    if !netns_or_skip("lab-crash") {
        return;
    }
    let _one = one_lab_at_a_time();
    let prefix = lab_prefix();
    // What a crash leaves: namespaces and a running process, but no state file.
    let lan = meshbus_lab::netns::VirtualLan::with_prefix(&prefix, 2).unwrap();
    let mut sleeper = lan.command(0, "sleep").arg("600").spawn().unwrap();
    wait_in_netns(&lan.hosts()[0].netns, sleeper.id());
    lan.keep();
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(LAB_BIN)
        .args(["--prefix", &prefix, "down"])
        .env("MESHBUS_LAB_DIR", root.path())
        .output()
        .unwrap();
    assert!(ok(out).contains("removed"));
    let listed = meshbus_lab::netns::ip(&["netns", "list"]).unwrap();
    assert!(!listed.contains(&prefix), "{listed}");
    assert!(!sleeper.wait().unwrap().success());
    let out = Command::new(LAB_BIN)
        .args(["--prefix", &prefix, "status"])
        .env("MESHBUS_LAB_DIR", root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("meshbus-lab up"));
}

#[test]
fn the_lab_leaves_nothing_behind() {
    if !netns_or_skip("lan-cleanup") {
        return;
    }
    let lan = meshbus_lab::VirtualLan::create(2).unwrap();
    let names: Vec<String> = lan
        .hosts()
        .iter()
        .map(|h| h.netns.clone())
        .chain([lan.bridge_netns()])
        .collect();
    let listed = meshbus_lab::netns::ip(&["netns", "list"]).unwrap();
    assert!(names.iter().all(|n| listed.contains(n.as_str())));
    let mut sleeper = lan.command(0, "sleep").arg("600").spawn().unwrap();
    wait_in_netns(&names[0], sleeper.id());
    drop(lan);
    let listed = meshbus_lab::netns::ip(&["netns", "list"]).unwrap();
    for n in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind"
        );
    }
    assert!(
        !sleeper.wait().unwrap().success(),
        "processes inside were killed"
    );
}
