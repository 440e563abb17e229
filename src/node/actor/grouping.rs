//! The swarm task's side of handler groups: this peer's groups (with their done-marks) go out
//! with its presence, which every member hears ([`crate::proto::roster`]), and what the
//! others announce is passed to the group rows ([`crate::proto::groups`] decides; this only
//! carries).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tracing::warn;

use super::Actor;
use crate::handlers::Announcement;
use crate::node::repair::{GroupAnnounce, Mark};
use crate::proto::groups::{self, GroupView, MemberView};
use crate::proto::StreamId;
use crate::stats;

/// How often a peer in a group looks whether its marks changed, and announces them if they
/// did (a peer in a group announces itself every second anyway).
pub const GROUP_PUSH: Duration = Duration::from_millis(100);

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
    /// This peer's groups as its presence carries them; remembered as the last announced.
    pub(super) fn group_announcements(&mut self) -> Vec<GroupAnnounce> {
        let groups = self.shared.handlers.announcements();
        self.peers.set_in_groups(!groups.is_empty());
        self.last_announced = groups.clone();
        groups
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
            .collect()
    }

    /// Announces this peer soon if its groups or their marks changed since it last did.
    pub(super) fn groups_changed(&mut self, now: Instant) {
        let groups = self.shared.handlers.announcements();
        if groups != self.last_announced {
            self.peers.set_in_groups(!groups.is_empty());
            self.peers.announce_soon(now);
        }
    }

    /// A member's groups as its presence carries them, checked before anything of the
    /// presence is taken: a presence with a group that breaks a rule is refused whole.
    pub(super) fn check_groups(announced: Vec<GroupAnnounce>) -> Result<Vec<Announcement>, String> {
        // A member owns events from at most its row's start plus JOIN_DELAY: a `since` past
        // that (and the clock skew allowed) is refused.
        let latest = crate::clock::unix_micros(
            std::time::SystemTime::now() + crate::proto::receive::MAX_CLOCK_SKEW,
        ) + groups::JOIN_DELAY.as_micros() as u64;
        if announced.len() > groups::MAX_GROUPS {
            return Err(format!(
                "{} groups announced; at most {} are taken",
                announced.len(),
                groups::MAX_GROUPS
            ));
        }
        let mut taken = Vec::with_capacity(announced.len());
        for g in announced {
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
            taken.push(Announcement {
                name: g.name,
                since: g.since,
                marks,
                shape: g.shape,
            });
        }
        Ok(taken)
    }

    /// A member's checked groups, from its presence numbered `round`, handed to the group
    /// rows. An older one than the last taken is ignored.
    pub(super) fn take_groups(&mut self, peer: PeerId, round: u64, taken: Vec<Announcement>) {
        if taken.is_empty() && !self.groups.peers.contains_key(&peer) {
            // Most members are in no group: nothing to tell the rows.
            return;
        }
        let known = self.groups.peers.get(&peer).map_or(0, |(round, _)| *round);
        if round <= known {
            return;
        }
        self.groups.peers.insert(
            peer,
            (
                round,
                taken.iter().map(|a| (a.name.clone(), a.since)).collect(),
            ),
        );
        self.shared.handlers.announced(peer, &taken);
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
