//! Start-up: a node is ready once every listener it asked for has an address, and failed if
//! any of them closed with an error first.

use std::collections::HashSet;

use libp2p::core::transport::ListenerId;

/// What the listeners have reported so far.
#[derive(Debug)]
pub struct Listening {
    /// How many listen addresses were asked for.
    expected: usize,
    /// Listeners that reported an address.
    ready: HashSet<ListenerId>,
    /// The first listener error, which fails start-up.
    failed: Option<String>,
}

impl Listening {
    /// Waiting for `expected` listeners.
    pub fn new(expected: usize) -> Self {
        Self {
            expected,
            ready: HashSet::new(),
            failed: None,
        }
    }

    /// Listener `id` has an address.
    pub fn ready(&mut self, id: ListenerId) {
        self.ready.insert(id);
    }

    /// A listener closed; `error` says why if it was not asked to.
    pub fn closed(&mut self, error: Option<String>) {
        if let Some(error) = error {
            self.failed.get_or_insert(error);
        }
    }

    /// `None` while waiting; then `Ok` once all are ready, or the first error.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        if let Some(reason) = &self.failed {
            Some(Err(reason.clone()))
        } else {
            (self.ready.len() >= self.expected).then_some(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_listener_has_an_address() {
        let mut l = Listening::new(2);
        assert_eq!(l.outcome(), None);
        let a = ListenerId::next();
        l.ready(a);
        l.ready(a);
        assert_eq!(
            l.outcome(),
            None,
            "one listener reporting twice is still one"
        );
        l.ready(ListenerId::next());
        assert_eq!(l.outcome(), Some(Ok(())));
    }

    #[test]
    fn the_first_listener_error_fails_start_up() {
        let mut l = Listening::new(2);
        l.closed(None);
        assert_eq!(l.outcome(), None, "a clean close is no failure");
        l.closed(Some("address in use".into()));
        l.closed(Some("later".into()));
        l.ready(ListenerId::next());
        l.ready(ListenerId::next());
        assert_eq!(l.outcome(), Some(Err("address in use".into())));
    }
}
