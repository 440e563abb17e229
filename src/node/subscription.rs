//! `tail`: a live stream of the events a node sees, filtered by a pattern.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use crate::event::{Event, Tailed};
use crate::stats::{self, Stats};
use crate::topic::Pattern;

/// Events matching a pattern, as they arrive. Dropping it unsubscribes. A reader that falls
/// more than the tail buffer behind is told how many events it missed, and they are counted
/// (`tail_missed`).
pub struct Subscription {
    pattern: Pattern,
    inner: BroadcastStream<Arc<Event>>,
    stats: Arc<Stats>,
}

impl Subscription {
    pub(super) fn new(
        pattern: Pattern,
        receiver: broadcast::Receiver<Arc<Event>>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            pattern,
            inner: BroadcastStream::new(receiver),
            stats,
        }
    }
}

impl Stream for Subscription {
    type Item = Tailed;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Tailed>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    if self.pattern.matches(&event.topic) {
                        return Poll::Ready(Some(Tailed::Event(event)));
                    }
                }
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    stats::add(&self.stats.tail_missed, n);
                    return Poll::Ready(Some(Tailed::Missed(n)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
