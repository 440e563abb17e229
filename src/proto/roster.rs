//! Members heard over the mesh: peers this one is not (or not only) connected to, known from
//! the presence each peer announces on gossipsub (a message without events on
//! [`crate::proto::MESH_TOPIC`], see [`crate::wire::WirePresence`]), which every peer
//! relays. A peer connected to all the members it knows announces rarely ([`QUIET_EVERY`]); one that knows a member it is not connected to announces every
//! [`EVERY`], and so does everyone who hears it, since they then know a member they are not
//! connected to either. An announcement says how often its peer announces, so the others
//! know when its silence means it is gone: after [`MISSED`] announcements plus [`GRACE`].
//!
//! [`Roster`] keeps only what the announcements say, within bounds; [`super::peers::Peers`]
//! joins it with the connections into one membership.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// How often a peer announces itself while it knows a member it is not connected to.
pub const EVERY: Duration = Duration::from_secs(1);

/// How often a peer connected to every member it knows announces itself.
pub const QUIET_EVERY: Duration = Duration::from_secs(30);

/// Announcements a member may miss before it is taken for gone.
pub const MISSED: u32 = 3;

/// Slack on top of the missed announcements: relays and a busy machine delay them.
pub const GRACE: Duration = Duration::from_secs(1);

/// The closest together a peer sends its own announcements (a handler group's done-marks
/// go out with them, at most this often).
pub const MIN_GAP_SENT: Duration = Duration::from_millis(100);

/// Announcements taken from one peer in a burst; past it, one more per [`MIN_GAP_SENT`]. An
/// honest peer never sends faster, and a burst this long absorbs what relays bunch up; the
/// rest of a flood is ignored and not relayed.
pub const BURST: u32 = 20;

/// Most members heard only over the mesh.
pub const MAX_HEARD: usize = 256;

/// Longest agent string taken.
pub const MAX_AGENT: usize = 128;

/// A member whose connection dropped without a goodbye is failed at once; announcements of it
/// that were still on their way (relayed a hop behind) are passed on but not taken for this
/// long, so a
/// killed peer is not brought back to life by its own last words. A member that is alive
/// and still reachable through others is heard again after it.
pub const QUARANTINE: Duration = Duration::from_secs(5);

/// What a peer says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Its announcement number: larger is newer (it starts at the clock, so a restarted
    /// peer's are larger).
    pub seq: u64,
    /// Its agent string (`meshbus/VERSION (NAME)`).
    pub agent: String,
    /// How often it announces itself now: [`EVERY`] or [`QUIET_EVERY`].
    pub every: Duration,
    /// It is shutting down cleanly.
    pub leaving: bool,
}

impl Presence {
    /// Checks what a remote peer said against the bounds above.
    pub fn check(&self) -> Result<(), String> {
        if self.every < EVERY || self.every > QUIET_EVERY {
            return Err(format!(
                "announces every {} ms; {}..={} ms is taken",
                self.every.as_millis(),
                EVERY.as_millis(),
                QUIET_EVERY.as_millis()
            ));
        }
        if self.agent.len() > MAX_AGENT {
            return Err(format!(
                "agent string of {} bytes; at most {MAX_AGENT} are taken",
                self.agent.len()
            ));
        }
        Ok(())
    }

    /// When its member is gone if nothing newer is heard, counted from `heard`.
    fn expires(&self, heard: Instant) -> Instant {
        heard + self.every * MISSED + GRACE
    }
}

/// How long a peer that is gone (left, failed, fell silent) is remembered: its last
/// announcement number and its rate, so late or replayed announcements do not bring it back
/// and leaving does not reset its rate.
pub const KEEP: Duration = Duration::from_secs(60);

/// Most peers remembered as gone ([`KEEP`]); past this, the one remembered longest goes.
pub const MAX_GONE: usize = 256;

/// What [`Roster::heard`] made of an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A member not heard before (or since it was gone).
    New,
    /// A newer announcement of a member already heard.
    Again,
    /// It said it is leaving: it is out of the roster.
    Leaving,
    /// Newer than anything heard of this peer, but not taken: it is in [`QUARANTINE`], or it
    /// is a goodbye of a peer that is not a member here. Passed on: others may need it.
    Held,
    /// Not taken, and not to be passed on: no newer than one already heard.
    Stale,
}

/// Why an announcement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It broke a bound of [`Presence::check`].
    #[error("{0}")]
    Bad(String),
    /// [`MAX_HEARD`] members are heard already.
    #[error("{MAX_HEARD} members are heard over the mesh already")]
    Full,
    /// Its peer sent more than [`BURST`] announcements faster than one per
    /// [`MIN_GAP_SENT`]: not taken, and not relayed.
    #[error("announcing faster than once per {} ms", MIN_GAP_SENT.as_millis())]
    TooFast,
}

/// What this peer knows of another from its announcements.
#[derive(Debug)]
struct Record {
    /// The newest announcement number taken or passed on.
    seq: u64,
    /// Announcements it may still send at once, and when that was counted.
    tokens: f64,
    counted: Instant,
    /// Its last presence and when it is gone without a newer one, while it is a member.
    member: Option<(Presence, Instant)>,
    /// Gone: its announcements are not taken before this ([`QUARANTINE`]).
    quarantined: Option<Instant>,
    /// Gone: remembered until this ([`KEEP`]).
    kept: Instant,
}

impl Record {
    fn new(now: Instant) -> Self {
        Self {
            seq: 0,
            tokens: f64::from(BURST),
            counted: now,
            member: None,
            quarantined: None,
            kept: now + KEEP,
        }
    }

    /// Takes one announcement's token at `now`, if there is one.
    fn take_token(&mut self, now: Instant) -> bool {
        let refill =
            now.saturating_duration_since(self.counted).as_secs_f64() / MIN_GAP_SENT.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.counted = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// It is gone at `now`: remembered for [`KEEP`].
    fn gone(&mut self, now: Instant) {
        self.member = None;
        self.kept = now + KEEP;
    }
}

/// The peers heard over the mesh: the members, and those gone but remembered.
#[derive(Debug, Default)]
pub struct Roster {
    records: BTreeMap<PeerId, Record>,
    members: usize,
}

impl Roster {
    /// Takes `peer`'s announcement heard at `now`.
    pub fn heard(
        &mut self,
        peer: PeerId,
        presence: Presence,
        now: Instant,
    ) -> Result<Heard, Refused> {
        presence.check().map_err(Refused::Bad)?;
        let full = self.members >= MAX_HEARD;
        if !self.records.contains_key(&peer) {
            if full && !presence.leaving {
                return Err(Refused::Full);
            }
            self.make_room(now);
        }
        let record = self.records.entry(peer).or_insert(Record::new(now));
        if presence.seq <= record.seq {
            return Ok(Heard::Stale);
        }
        if !record.take_token(now) {
            return Err(Refused::TooFast);
        }
        record.seq = presence.seq;
        let quarantined = record.quarantined.is_some_and(|until| now < until);
        let expires = presence.expires(now);
        Ok(match (record.member.as_mut(), presence.leaving) {
            (Some(_), true) => {
                record.gone(now);
                self.members -= 1;
                Heard::Leaving
            }
            (Some(member), false) => {
                *member = (presence, expires);
                Heard::Again
            }
            (None, true) => Heard::Held,
            (None, false) if quarantined => Heard::Held,
            (None, false) if full => return Err(Refused::Full),
            (None, false) => {
                record.member = Some((presence, expires));
                record.quarantined = None;
                self.members += 1;
                Heard::New
            }
        })
    }

    /// Whether `peer` was heard and is not gone.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.records.get(peer).is_some_and(|r| r.member.is_some())
    }

    /// What `peer` said last, while it is a member.
    pub fn presence(&self, peer: &PeerId) -> Option<&Presence> {
        self.records.get(peer)?.member.as_ref().map(|(p, _)| p)
    }

    /// The members heard, sorted, with what each said last.
    pub fn members(&self) -> impl Iterator<Item = (&PeerId, &Presence)> {
        self.records
            .iter()
            .filter_map(|(p, r)| Some((p, &r.member.as_ref()?.0)))
    }

    /// The members heard, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &PeerId> {
        self.members().map(|(p, _)| p)
    }

    /// Takes out the members silent past their time at `now` (and returns them), and forgets
    /// the peers gone for longer than [`KEEP`].
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        self.records
            .retain(|_, r| r.member.is_some() || now < r.kept);
        let mut gone = Vec::new();
        for (peer, r) in &mut self.records {
            if r.member
                .as_ref()
                .is_some_and(|(_, expires)| now >= *expires)
            {
                r.gone(now);
                gone.push(*peer);
            }
        }
        self.members -= gone.len();
        gone
    }

    /// `peer`'s connection dropped: it is no member by its announcements either. Without a
    /// goodbye (`failed`) it is quarantined from `now` ([`QUARANTINE`]).
    pub fn forget(&mut self, peer: &PeerId, failed: bool, now: Instant) {
        if !self.records.contains_key(peer) {
            if !failed {
                return;
            }
            self.make_room(now);
        }
        let record = self.records.entry(*peer).or_insert(Record::new(now));
        if record.member.is_some() {
            self.members -= 1;
        }
        record.gone(now);
        if failed {
            record.quarantined = Some(now + QUARANTINE);
        }
    }

    /// Room for one more record: past [`MAX_GONE`] peers remembered as gone, the one
    /// remembered longest goes first.
    fn make_room(&mut self, now: Instant) {
        self.records
            .retain(|_, r| r.member.is_some() || now < r.kept);
        if self.records.len() - self.members >= MAX_GONE {
            let oldest = self
                .records
                .iter()
                .filter(|(_, r)| r.member.is_none())
                .min_by_key(|(_, r)| r.kept)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.records.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(seq: u64, every: Duration) -> Presence {
        Presence {
            seq,
            agent: "meshbus/0.1.0 (b)".into(),
            every,
            leaving: false,
        }
    }

    #[test]
    fn a_member_is_gone_after_its_missed_announcements() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        assert_eq!(r.heard(b, presence(1, EVERY), t), Ok(Heard::New));
        let due = EVERY * MISSED + GRACE;
        assert!(r.expire(t + due - Duration::from_millis(1)).is_empty());
        assert_eq!(r.heard(b, presence(2, EVERY), t + EVERY), Ok(Heard::Again));
        // The newer announcement moved its time on.
        assert!(r.expire(t + due).is_empty());
        assert_eq!(r.expire(t + EVERY + due), vec![b]);
        assert!(!r.contains(&b));
    }

    #[test]
    fn a_quiet_member_is_given_its_own_interval() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        r.heard(b, presence(1, QUIET_EVERY), t).unwrap();
        assert!(r.expire(t + QUIET_EVERY * 2).is_empty());
        assert_eq!(r.expire(t + QUIET_EVERY * MISSED + GRACE), vec![b]);
    }

    #[test]
    fn older_announcements_are_stale() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        r.heard(b, presence(5, EVERY), t).unwrap();
        assert_eq!(r.heard(b, presence(5, EVERY), t + EVERY), Ok(Heard::Stale));
        assert_eq!(r.heard(b, presence(4, EVERY), t + EVERY), Ok(Heard::Stale));
        assert_eq!(r.heard(b, presence(6, EVERY), t + EVERY), Ok(Heard::Again));
    }

    #[test]
    fn a_flood_is_cut_to_one_announcement_per_gap_after_a_burst() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        // A burst, all at once (relays bunch an honest peer's announcements up)...
        for seq in 1..=u64::from(BURST) {
            let heard = r
                .heard(b, presence(seq, EVERY), t)
                .expect("within the burst");
            assert_ne!(heard, Heard::Stale, "{seq}");
        }
        // ...then no more until a token comes back.
        let next = u64::from(BURST) + 1;
        assert_eq!(r.heard(b, presence(next, EVERY), t), Err(Refused::TooFast));
        let half = t + MIN_GAP_SENT / 2;
        assert_eq!(
            r.heard(b, presence(next, EVERY), half),
            Err(Refused::TooFast)
        );
        let gap = t + MIN_GAP_SENT;
        assert_eq!(r.heard(b, presence(next, EVERY), gap), Ok(Heard::Again));
        // An honest peer's pace never runs out.
        let mut at = gap;
        for seq in next + 1..next + 100 {
            at += MIN_GAP_SENT;
            assert_eq!(r.heard(b, presence(seq, EVERY), at), Ok(Heard::Again));
        }
    }

    #[test]
    fn a_goodbye_takes_the_member_out() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        r.heard(b, presence(1, EVERY), t).unwrap();
        let bye = Presence {
            leaving: true,
            ..presence(2, EVERY)
        };
        // Even straight after the last announcement: a goodbye is never held back.
        assert_eq!(r.heard(b, bye.clone(), t), Ok(Heard::Leaving));
        assert!(!r.contains(&b));
        // One heard again over another path changes nothing, nor does a late, older one.
        assert_eq!(r.heard(b, bye, t + EVERY), Ok(Heard::Stale));
        assert_eq!(r.heard(b, presence(1, EVERY), t + EVERY), Ok(Heard::Stale));
        // A newer one is the peer back (restarted).
        assert_eq!(r.heard(b, presence(3, EVERY), t + EVERY), Ok(Heard::New));
    }

    #[test]
    fn leaving_and_coming_back_does_not_reset_a_peers_rate() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        let mut refused = 0;
        for seq in 1..=100u64 {
            let p = Presence {
                leaving: seq % 2 == 0,
                ..presence(seq, EVERY)
            };
            if r.heard(b, p, t) == Err(Refused::TooFast) {
                refused += 1;
            }
        }
        assert_eq!(refused, 100 - BURST);
    }

    #[test]
    fn a_gone_peer_is_remembered_for_a_while() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        r.heard(b, presence(5, EVERY), t).unwrap();
        let silent = t + EVERY * MISSED + GRACE;
        assert_eq!(r.expire(silent), vec![b]);
        // A late copy of an announcement taken before does not bring it back...
        assert_eq!(r.heard(b, presence(5, EVERY), silent), Ok(Heard::Stale));
        // ...until it is forgotten.
        r.expire(silent + KEEP);
        assert_eq!(
            r.heard(b, presence(5, EVERY), silent + KEEP),
            Ok(Heard::New)
        );
    }

    #[test]
    fn a_failed_member_is_not_revived_by_stale_words() {
        let mut r = Roster::default();
        let t = Instant::now();
        let b = PeerId::random();
        r.heard(b, presence(1, EVERY), t).unwrap();
        r.forget(&b, true, t);
        assert!(!r.contains(&b));
        let late = t + QUARANTINE - Duration::from_millis(1);
        assert_eq!(r.heard(b, presence(1, EVERY), late), Ok(Heard::Stale));
        // Newer words are passed on (others may hear it only this way), not taken.
        assert_eq!(r.heard(b, presence(2, EVERY), late), Ok(Heard::Held));
        assert!(!r.contains(&b));
        assert_eq!(
            r.heard(b, presence(3, EVERY), t + QUARANTINE),
            Ok(Heard::New)
        );
        // A peer that left cleanly is not quarantined.
        let c = PeerId::random();
        r.heard(c, presence(1, EVERY), t).unwrap();
        r.forget(&c, false, t);
        assert_eq!(r.heard(c, presence(2, EVERY), t), Ok(Heard::New));
    }

    #[test]
    fn bounds_are_checked() {
        let mut r = Roster::default();
        let t = Instant::now();
        let fast = presence(1, Duration::from_millis(10));
        assert!(matches!(
            r.heard(PeerId::random(), fast, t),
            Err(Refused::Bad(e)) if e.contains("every 10 ms")
        ));
        let slow = presence(1, Duration::from_secs(3600));
        assert!(r.heard(PeerId::random(), slow, t).is_err());
        let long = Presence {
            agent: "x".repeat(MAX_AGENT + 1),
            ..presence(1, EVERY)
        };
        assert!(
            matches!(r.heard(PeerId::random(), long, t), Err(Refused::Bad(e)) if e.contains("agent"))
        );
        for _ in 0..MAX_HEARD {
            r.heard(PeerId::random(), presence(1, EVERY), t).unwrap();
        }
        assert_eq!(
            r.heard(PeerId::random(), presence(1, EVERY), t),
            Err(Refused::Full)
        );
        // Peers remembered as gone stay bounded too.
        for _ in 0..MAX_GONE * 2 {
            r.forget(&PeerId::random(), true, t);
        }
        assert!(r.records.len() - r.members <= MAX_GONE);
        assert_eq!(r.members, MAX_HEARD);
    }
}
