//! Peers found by mDNS and when to dial them. mDNS is unauthenticated: any device on the LAN
//! can announce a thousand peers, at addresses of hosts that are not meshbus peers, with
//! records that live for hours. So what it says is bounded here: how many peers are kept
//! ([`MAX_KNOWN_PEERS`]), how many addresses each ([`MAX_ADDRS_PER_PEER`]), how many dials
//! start per round ([`MAX_DIALS_PER_ROUND`]), how often an unreachable one is tried (backing
//! off to [`MAX_BACKOFF`]), and how long one never reached is kept ([`UNREACHED_TTL`],
//! whatever TTL its announcer claimed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// Most peers remembered from mDNS; more are ignored until some are forgotten.
pub const MAX_KNOWN_PEERS: usize = 256;

/// Most addresses remembered or shown per peer.
pub const MAX_ADDRS_PER_PEER: usize = 16;

/// Most dials of discovered peers started per redial round ([`super::peers::REDIAL_INTERVAL`]).
pub const MAX_DIALS_PER_ROUND: usize = 16;

/// Longest wait between dials of a discovered peer that keeps failing (from the second
/// failure in a row, it doubles from the redial interval with each).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A discovered peer never reached within this long is forgotten.
pub const UNREACHED_TTL: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Known {
    addrs: Vec<Multiaddr>,
    /// Dials that failed in a row.
    failures: u32,
    /// Not dialled again before this.
    next: Instant,
    /// When it was found (or last connected).
    since: Instant,
    /// Whether a connection to it ever came up.
    reached: bool,
}

/// What mDNS told this peer, within bounds.
#[derive(Debug, Default)]
pub struct Discovery {
    known: BTreeMap<PeerId, Known>,
}

/// What [`Discovery::found`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Kept (new, or with new addresses).
    Kept,
    /// Ignored: [`MAX_KNOWN_PEERS`] are known already.
    Full,
}

impl Discovery {
    /// mDNS found `peer` at `addrs`.
    pub fn found(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) -> Found {
        if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN_PEERS {
            return Found::Full;
        }
        let known = self.known.entry(peer).or_insert(Known {
            addrs: Vec::new(),
            failures: 0,
            next: now,
            since: now,
            reached: false,
        });
        for addr in addrs {
            if !known.addrs.contains(&addr) && known.addrs.len() < MAX_ADDRS_PER_PEER {
                known.addrs.push(addr);
            }
        }
        Found::Kept
    }

    /// mDNS says `peer` is no longer at `addr`.
    pub fn expired(&mut self, peer: &PeerId, addr: &Multiaddr) {
        if let Some(known) = self.known.get_mut(peer) {
            known.addrs.retain(|a| a != addr);
            if known.addrs.is_empty() {
                self.known.remove(peer);
            }
        }
    }

    /// Forgets `peer` (it is not a meshbus peer).
    pub fn forget(&mut self, peer: &PeerId) {
        self.known.remove(peer);
    }

    /// A connection to `peer` came up.
    pub fn reached(&mut self, peer: &PeerId, now: Instant) {
        if let Some(known) = self.known.get_mut(peer) {
            known.failures = 0;
            known.next = now;
            known.reached = true;
            known.since = now;
        }
    }

    /// A dial of `peer` failed: one never reached waits longer before the next. One that
    /// was reached before (it held the mesh key) keeps being tried every `interval`, so a
    /// healed link comes back within a round.
    pub fn failed(&mut self, peer: &PeerId, now: Instant, interval: Duration) {
        if let Some(known) = self.known.get_mut(peer) {
            if known.reached {
                known.next = known.next.max(now + interval);
                return;
            }
            known.failures = known.failures.saturating_add(1);
            // The first failure waits one interval, as any redial; then it doubles.
            let wait = interval
                .saturating_mul(1 << (known.failures - 1).min(16))
                .min(MAX_BACKOFF);
            known.next = now + wait;
        }
    }

    /// Up to `budget` peers due for a dial at `now` and not `connected`, those waiting
    /// longest first; each is not due again for `interval`. Peers never reached for
    /// [`UNREACHED_TTL`] are forgotten first.
    pub fn due(
        &mut self,
        now: Instant,
        interval: Duration,
        budget: usize,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.known
            .retain(|_, k| k.reached || now.saturating_duration_since(k.since) < UNREACHED_TTL);
        let mut due: Vec<(Instant, PeerId)> = self
            .known
            .iter()
            .filter(|(p, k)| k.next <= now && !connected(p))
            .map(|(p, k)| (k.next, *p))
            .collect();
        due.sort();
        due.truncate(budget);
        due.into_iter()
            .filter_map(|(_, peer)| {
                let known = self.known.get_mut(&peer)?;
                known.next = known.next.max(now + interval);
                Some((peer, known.addrs.clone()))
            })
            .collect()
    }

    /// How many peers are known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether `peer` is one of them.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.known.contains_key(peer)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{i}").parse().unwrap()
    }

    const INTERVAL: Duration = Duration::from_secs(2);

    #[test]
    fn a_spoofed_flood_is_bounded_in_peers_and_dials() {
        let now = Instant::now();
        let mut d = Discovery::default();
        let fakes: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        let full = fakes
            .iter()
            .filter(|p| d.found(**p, vec![addr(1)], now) == Found::Full)
            .count();
        assert_eq!((d.len(), full), (MAX_KNOWN_PEERS, 1000 - MAX_KNOWN_PEERS));
        // Every round dials at most the budget, and every failure backs off.
        let mut dials = 0;
        let mut t = now;
        while t < now + Duration::from_secs(120) {
            let due = d.due(t, INTERVAL, MAX_DIALS_PER_ROUND, |_| false);
            assert!(due.len() <= MAX_DIALS_PER_ROUND);
            dials += due.len();
            for (peer, _) in due {
                d.failed(&peer, t, INTERVAL);
            }
            t += INTERVAL;
        }
        // Without backoff: 256 peers every 2 s for 2 min = 15,360 dials; the budget alone
        // allows 960; backoff leaves fewer.
        assert!(dials <= 60 * MAX_DIALS_PER_ROUND, "{dials}");
        // After the TTL, peers never reached are gone, whatever mDNS claimed.
        d.due(now + UNREACHED_TTL, INTERVAL, 0, |_| false);
        assert!(d.is_empty());
    }

    #[test]
    fn a_reached_peer_is_kept_and_its_backoff_reset() {
        let now = Instant::now();
        let mut d = Discovery::default();
        let peer = PeerId::random();
        d.found(peer, vec![addr(1)], now);
        assert_eq!(d.due(now, INTERVAL, 16, |_| false).len(), 1);
        for i in 0..10 {
            d.failed(&peer, now + INTERVAL * i, INTERVAL);
        }
        assert!(
            d.due(now + Duration::from_secs(30), INTERVAL, 16, |_| false)
                .is_empty(),
            "backing off"
        );
        d.reached(&peer, now + Duration::from_secs(30));
        // Once reached, a failure (a cut link) does not back off.
        let t = now + Duration::from_secs(40);
        d.failed(&peer, t, INTERVAL);
        assert_eq!(d.due(t + INTERVAL, INTERVAL, 16, |_| false).len(), 1);
        let later = now + UNREACHED_TTL * 3;
        assert_eq!(
            d.due(later, INTERVAL, 16, |_| false).len(),
            1,
            "kept and due again"
        );
        assert!(
            d.due(later, INTERVAL, 16, |p| *p == peer).is_empty(),
            "not while connected"
        );
    }
}
