//! Plain-text views of the API's answers, as `meshbus peers`, `status` and `handlers` print
//! them on a terminal.

use std::fmt::Write as _;

use super::types::{HandlerInfo, PeerInfo, Status};

/// One line per peer: id, name, round trip, addresses.
pub fn peers(peers: &[PeerInfo]) -> String {
    if peers.is_empty() {
        return "no peers connected\n".into();
    }
    let mut out = String::new();
    for p in peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.2} ms"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<54} {:<12} {:<10} {}",
            p.peer_id,
            p.name.as_deref().unwrap_or("-"),
            rtt,
            p.connected_addrs.join(" ")
        );
    }
    out
}

/// The peer, its mesh, and what it counted.
pub fn status(s: &Status) -> String {
    let c = &s.counters;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "peer        {} {}",
        s.peer_id,
        s.name.as_deref().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "version     {}   uptime {:.0}s   mdns {}",
        s.version,
        s.uptime_secs,
        if s.mdns { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "peers       {} connected, {} in the gossip mesh",
        s.peers, s.mesh_peers
    );
    for a in &s.listen_addrs {
        let _ = writeln!(out, "listening   {a}");
    }
    let _ = writeln!(
        out,
        "events      {} published, {} received ({} messages, {} not forwarded: every LAN peer heard their publisher)",
        c.published, c.received, c.messages_received, c.messages_not_forwarded
    );
    let l = &s.log;
    let _ = writeln!(
        out,
        "log         offsets {}..={} ({} bytes), epoch {}, {} publishers followed, {} waiting on a gap, {} dropped by retention, {} write errors, {} refused while writes failed",
        l.first, l.head, l.bytes, l.epoch, s.streams, s.buffered, l.pruned, l.write_errors, l.refused
    );
    let _ = writeln!(
        out,
        "dropped     {} malformed messages, {} rejected events, {} duplicates, {} presence announcements refused",
        c.messages_malformed, c.events_rejected, c.events_duplicate, c.presence_refused
    );
    let _ = writeln!(
        out,
        "guard       {} connections refused (no mesh key), {} forbidden events, {} messages throttled, {} peers banned{}",
        c.connections_refused,
        c.events_forbidden,
        c.messages_throttled,
        c.peers_banned,
        if s.banned.is_empty() {
            String::new()
        } else {
            format!(" (now: {})", s.banned.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "repair      {} events repaired, {} fetches ({} failed), {} served, {} lost, {} marks refused",
        c.repaired, c.repair_fetches, c.repair_failed, c.repair_served, c.events_lost, c.marks_refused
    );
    let _ = writeln!(
        out,
        "handlers    {} rows, {} ok, {} failed",
        s.handlers.len(),
        c.handler_succeeded,
        c.handler_failed
    );
    for g in &s.groups {
        let members: Vec<String> = g
            .members
            .iter()
            .map(|m| {
                let short: String = m
                    .peer
                    .chars()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!(
                    "…{short}{}{}",
                    if m.me { " (me)" } else { "" },
                    if m.active { "" } else { " (joining)" }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "group       {}: {} members: {}{}",
            g.name,
            g.members.len(),
            members.join(", "),
            if g.held > 0 {
                format!("; {} events held for their owners", g.held)
            } else {
                String::new()
            }
        );
        if !g.conflicting.is_empty() {
            let _ = writeln!(
                out,
                "            {}: rows differ (pattern, type, filter or key) on {}",
                g.name,
                g.conflicting.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "queries     {} asked ({} open), {} answers received, {} sent, {} dropped; {} group announcements refused, {} conflicting members",
        c.queries, s.open_queries, c.answers_received, c.answers_sent, c.answers_dropped, c.groups_refused, c.groups_conflicting
    );
    out
}

/// One answer to a query: peer, name, handler, latency and the answer (or its error).
pub fn answer(a: &crate::node::QueryAnswer) -> String {
    let answer = match (&a.answer, &a.error) {
        (_, Some(error)) => format!("error: {}", crate::event::printable(error)),
        (Some(value), None) => crate::event::printable(&value.to_string()),
        (None, None) => "null".into(),
    };
    format!(
        "{}  {:<10} {:<12} {:>8.2} ms  {}",
        a.peer,
        a.name.as_deref().unwrap_or("-"),
        a.handler,
        a.latency_ms,
        answer
    )
}

/// Widest action shown in the handler table before it is cut.
const ACTION_WIDTH: usize = 28;

/// The handler table: one row per handler with its counters.
pub fn handlers(rows: &[HandlerInfo]) -> String {
    let mut out = String::new();
    let _ =
        writeln!(
        out,
        "{:<12} {:<16} {:<28} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8}  LAST ERROR",
        "NAME", "PATTERN", "ACTION", "MATCHED", "OK", "FAILED", "RETRY", "DEAD", "BUSY", "QUEUE",
        "LAG", "P99 ms"
    );
    for r in rows {
        let mut action = r.action.clone();
        if action.chars().count() > ACTION_WIDTH {
            action = action.chars().take(ACTION_WIDTH - 1).collect::<String>() + "…";
        }
        if let Some(group) = &r.group {
            action = format!(
                "{action} [group {group}: owned {}, not owned {}, took over {}]",
                r.owned, r.not_owned, r.taken_over
            );
            if r.key_retries > 0 {
                action = format!("{action} [key retried {}]", r.key_retries);
            }
        }
        if r.reply {
            action.push_str(" [reply]");
        }
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:<28} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8.2}  {}",
            r.name,
            r.pattern,
            action,
            r.matched,
            r.succeeded,
            r.failed,
            r.retried,
            r.dead_lettered,
            r.in_flight,
            r.queue_depth,
            r.lag,
            r.latency.p99_us as f64 / 1000.0,
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    out
}
