//! Who may publish what: the mesh's topic ACL.
//!
//! Every receiver enforces it on every event, whoever relayed it, before the event is
//! stored, handled or forwarded: gossipsub asks meshbus to validate each message before it
//! passes it on, so a forbidden event stops at the first peer that hears it. A publisher
//! checks its own events against the same rules, so its user gets an error instead of an
//! event that every other peer drops. Every peer should hold the same rules; a peer with
//! looser rules would still not get a forbidden event past a stricter one.
//!
//! No rules means every member may publish on every topic (a member is whoever holds the
//! mesh key). With rules, a publisher may publish on a topic when some rule names it (or
//! `*`) and has a pattern matching the topic.

use libp2p::PeerId;

use crate::topic::{Pattern, Topic};

/// Whom a rule is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Every member.
    Any,
    /// One peer.
    Peer(PeerId),
}

/// One rule: these publishers may publish on topics matching these patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Whom it is about.
    pub who: Vec<Who>,
    /// What they may publish.
    pub publish: Vec<Pattern>,
}

/// The mesh's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    /// Every member may publish everything.
    pub fn open() -> Acl {
        Acl::default()
    }

    /// These rules.
    pub fn new(rules: Vec<Rule>) -> Acl {
        Acl { rules }
    }

    /// Whether there are rules at all.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `source` may publish on `topic`.
    pub fn may_publish(&self, source: &PeerId, topic: &Topic) -> bool {
        self.is_open()
            || self.rules.iter().any(|rule| {
                rule.who.iter().any(|w| match w {
                    Who::Any => true,
                    Who::Peer(p) => p == source,
                }) && rule.publish.iter().any(|p| p.matches(topic))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_allow_named_publishers_their_patterns_only() {
        let (orders, other) = (PeerId::random(), PeerId::random());
        let acl = Acl::new(vec![
            Rule {
                who: vec![Who::Peer(orders)],
                publish: vec![Pattern::new("orders.**").unwrap()],
            },
            Rule {
                who: vec![Who::Any],
                publish: vec![Pattern::new("chat.*").unwrap()],
            },
        ]);
        let t = |s: &str| Topic::new(s).unwrap();
        assert!(acl.may_publish(&orders, &t("orders.created")));
        assert!(!acl.may_publish(&orders, &t("billing.x")));
        assert!(acl.may_publish(&orders, &t("chat.hello")));
        assert!(!acl.may_publish(&other, &t("orders.created")));
        assert!(acl.may_publish(&other, &t("chat.hello")));
        assert!(Acl::open().may_publish(&other, &t("anything.at.all")));
    }
}
