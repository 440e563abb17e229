//! The swarm task's side of handler groups: announcing this peer's groups (with their
//! done-marks) to every member, and passing what the others announce to the group rows
//! ([`crate::proto::groups`] decides; this only carries).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tracing::warn;

use super::{Actor, Asked};
use crate::handlers::Announcement;
use crate::node::repair::{self, GroupAnnounce, Mark, Request};
use crate::proto::groups::{self, GroupView, MemberView};
use crate::proto::StreamId;
use crate::stats;

/// How often a peer in a group announces its marks when they changed.
pub const GROUP_PUSH: Duration = Duration::from_millis(100);

/// How often it announces them anyway.
pub const GROUP_HEARTBEAT: Duration = Duration::from_secs(1);

/// What the other peers announced: their groups, with when each owns from.
#[derive(Debug, Default)]
pub(super) struct Directory {
    peers: BTreeMap<PeerId, (u64, Vec<(String, u64)>)>,
}

impl Directory {
    /// Whether `peer` announced `group`.
    pub(super) fn is_in(&self, peer: &PeerId, group: &str) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|(_, groups)| groups.iter().any(|(name, _)| name == group))
    }
}

impl Actor {
    /// Announces this peer's groups to every member if they changed (or a heartbeat is
    /// due); to one peer only, when it just joined.
    pub(super) fn announce_groups(&mut self, now: Instant, to: Option<PeerId>) {
        let groups = self.shared.handlers.announcements();
        if groups.is_empty() && self.last_announced.is_empty() {
            return;
        }
        let due = now >= self.next_heartbeat;
        if to.is_none() && !due && groups == self.last_announced {
            return;
        }
        if to.is_none() {
            if due {
                self.next_heartbeat = now + GROUP_HEARTBEAT;
            }
            self.last_announced = groups.clone();
        }
        self.group_round += 1;
        let request = Request {
            kind: repair::GROUPS,
            round: self.group_round,
            groups: groups
                .into_iter()
                .take(groups::MAX_GROUPS)
                .map(|a| GroupAnnounce {
                    name: a.name,
                    since: a.since,
                    shape: a.shape,
                    marks: a
                        .marks
                        .into_iter()
                        .take(groups::MAX_MARKS)
                        .map(|(stream, high)| Mark {
                            source: stream.source.to_bytes(),
                            epoch: stream.epoch,
                            high,
                        })
                        .collect(),
                })
                .collect(),
            ..Request::default()
        };
        let peers = match to {
            Some(peer) => vec![peer],
            None => self.peers.direct_member_ids(),
        };
        for peer in peers {
            self.ask_with(peer, Asked::Groups, request.clone());
        }
    }

    /// A peer's announcement: checked, then handed to the group rows. An older one than
    /// the last taken (requests may overtake each other) is ignored.
    pub(super) fn on_groups(&mut self, peer: PeerId, request: Request) -> Result<(), String> {
        if !self.peers.is_member(&peer) {
            // Only identified members leave the mesh with a `left` or `failed` that takes
            // them out of the groups again.
            return Err("announcements are taken from identified mesh members only".into());
        }
        // A member owns events from at most its row's start plus JOIN_DELAY: a `since` past
        // that (and the clock skew allowed) is refused.
        let latest = crate::clock::unix_micros(
            std::time::SystemTime::now() + crate::proto::receive::MAX_CLOCK_SKEW,
        ) + groups::JOIN_DELAY.as_micros() as u64;
        if request.groups.len() > groups::MAX_GROUPS {
            return Err(format!(
                "{} groups announced; at most {} are taken",
                request.groups.len(),
                groups::MAX_GROUPS
            ));
        }
        let mut announced = Vec::with_capacity(request.groups.len());
        for g in request.groups {
            groups::check_name(&g.name)?;
            if g.marks.len() > groups::MAX_MARKS {
                return Err(format!(
                    "{} marks for group `{}`; at most {} are taken",
                    g.marks.len(),
                    g.name,
                    groups::MAX_MARKS
                ));
            }
            let mut marks = Vec::with_capacity(g.marks.len());
            for m in g.marks {
                let source = PeerId::from_bytes(&m.source).map_err(|_| {
                    format!("a mark of group `{}` names no valid publisher", g.name)
                })?;
                marks.push((
                    StreamId {
                        source,
                        epoch: m.epoch,
                    },
                    m.high,
                ));
            }
            if g.since > latest {
                return Err(format!(
                    "group `{}` owns events from {} µs, beyond this peer's clock and its skew limit",
                    g.name, g.since
                ));
            }
            announced.push(Announcement {
                name: g.name,
                since: g.since,
                marks,
                shape: g.shape,
            });
        }
        let known = self.groups.peers.get(&peer).map_or(0, |(round, _)| *round);
        if request.round <= known {
            return Ok(());
        }
        self.groups.peers.insert(
            peer,
            (
                request.round,
                announced
                    .iter()
                    .map(|a| (a.name.clone(), a.since))
                    .collect(),
            ),
        );
        self.shared.handlers.announced(peer, &announced);
        Ok(())
    }

    /// Counts and logs a refused announcement.
    pub(super) fn refuse_groups(&self, peer: PeerId, reason: &str) {
        if let Some(n) = stats::bump_throttled(&self.shared.stats.groups_refused) {
            warn!(%peer, reason, refused_so_far = n, "refused a group announcement");
        }
    }

    /// A member failed or left: its groups are gone from every view.
    pub(super) fn group_member_gone(&mut self, peer: &PeerId) {
        self.groups.peers.remove(peer);
        self.shared.handlers.member_gone(peer);
    }

    /// Every group this peer knows of: its own (with its full view), and those only other
    /// peers are in, from their announcements.
    pub(super) fn group_views(&self) -> Vec<GroupView> {
        let mut views: BTreeMap<String, GroupView> = self
            .shared
            .handlers
            .groups()
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let now = crate::clock::unix_micros(std::time::SystemTime::now());
        for (peer, (_, groups)) in &self.groups.peers {
            for (name, since) in groups {
                let view = views.entry(name.clone()).or_insert_with(|| GroupView {
                    name: name.clone(),
                    members: Vec::new(),
                    held: 0,
                    conflicting: Vec::new(),
                });
                let peer = peer.to_string();
                if view.members.iter().all(|m| m.peer != peer) {
                    view.members.push(MemberView {
                        peer,
                        since_unix_us: *since,
                        active: *since <= now,
                        me: false,
                    });
                }
            }
        }
        let mut views: Vec<GroupView> = views.into_values().collect();
        for v in &mut views {
            v.members.sort_by(|a, b| a.peer.cmp(&b.peer));
        }
        views
    }
}
