//! The API's listener: at most so many connections at once, and a connection this side has
//! written nothing to for a while is closed: an idle keep-alive, a request sent half-way or
//! a byte at a time (the clock runs on what we write, so trickling bytes does not keep a
//! connection), a reader that stopped reading. Connections beyond the bound wait in the kernel's backlog,
//! holding no file descriptor of ours.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// A listener that bounds and times out its connections.
pub struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl Bounded {
    /// At most `connections` at once, each closed after `idle` without traffic.
    pub fn new(inner: TcpListener, connections: usize, idle: Duration) -> Bounded {
        Bounded {
            inner,
            slots: Arc::new(Semaphore::new(connections)),
            idle,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Idle;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Idle, SocketAddr) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Idle::new(stream, permit, self.idle), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails once it has been quiet for its idle time.
pub struct Idle {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Idle {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, idle: Duration) -> Idle {
        let last = Instant::now();
        Idle {
            stream,
            _slot: slot,
            idle,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + idle)),
        }
    }

    /// Called when the stream is not ready: fails once quiet too long. The timer is moved
    /// only when it fires, not on every read or write.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let due = self.last + self.idle;
            if Instant::now() >= due {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "API connection idle",
                ));
            }
            self.timer.as_mut().reset(due);
        }
        Ok(())
    }

    /// Passes on what the stream said; a write restarts the clock, and a read (or a wait)
    /// on a connection quiet too long ends it.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
        wrote: bool,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                if wrote {
                    self.last = Instant::now();
                } else if let Err(e) = self.check(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Idle {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.progress(cx, poll, false)
    }
}

impl AsyncWrite for Idle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(cx, poll, true)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.progress(cx, poll, true)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
