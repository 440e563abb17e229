//! A private mesh: a connection is encrypted under a mesh key (see [`crate::keyring`]) from
//! its first byte, beneath noise, so a device without a key learns nothing and can send
//! nothing a peer will read.
//!
//! The framing is libp2p's private-network one (the `pnet` spec: each side sends a random
//! 24-byte nonce, then everything is a stream cipher's keystream under the key and the
//! sender's nonce), so the key guards TCP before multistream-select and noise begin. The
//! cipher is XChaCha20 rather than pnet's XSalsa20: with large messages XSalsa20 (no AVX2
//! code in its crate) was a fifth of a receiver's CPU, more than noise's own encryption;
//! XChaCha20 runs on AVX2 where the CPU has it (the `guard_keystream` micro-benchmark). `libp2p-pnet` takes one key;
//! a keyring needs the listener to find which of its keys the dialer used. The dialer's
//! first message is always multistream-select's header, so the listener decrypts those 20
//! bytes under each key it holds and keeps the one that yields the header. No key does: the
//! connection is closed before any libp2p protocol runs, counted and logged, naming the
//! address. QUIC has no place under such a layer (its TLS handshake is the transport's own),
//! so a private mesh runs on TCP alone.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use libp2p::Multiaddr;

use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
use chacha20::XChaCha20;
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::keyring::{Keyring, LiveKeyring, MeshKey};
use crate::proto::peers::ip_of;
use crate::stats::{bump_throttled, Stats};

/// Bytes of each side's nonce.
const NONCE: usize = 24;

/// multistream-select's header, as the dialer sends it first (length-prefixed).
const HEADER: &[u8] = b"\x13/multistream/1.0.0\n";

/// Most plaintext encrypted per write call (one buffer of ciphertext in flight).
const WRITE_CHUNK: usize = 16 * 1024;

/// How often an open connection checks that its key is still in the keyring.
pub const KEY_RECHECK: Duration = Duration::from_secs(2);

/// Time an incoming connection gets to prove it holds a mesh key (44 bytes each way): a
/// silent one holds a pending-connection slot no longer.
pub const PRELUDE_TIMEOUT: Duration = Duration::from_secs(2);

/// Incoming connections from one IP address proving their key at once; more are closed at
/// once, so one host cannot take every pending slot.
pub const MAX_PENDING_PER_IP: usize = 8;

/// Why an incoming connection was closed before libp2p saw it.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The socket failed or closed during the exchange.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The dialer encrypted under no key we hold.
    #[error("it does not hold this mesh's key (not invited, or an old key)")]
    NoKey,
    /// The dialer spoke libp2p in the clear.
    #[error("it connected without a mesh key (an --open peer, or not a meshbus peer)")]
    Open,
    /// The dialer did not finish in time.
    #[error("it did not prove it holds a mesh key within {PRELUDE_TIMEOUT:?}")]
    Slow,
    /// Too many connections from one address at once.
    #[error("it has {MAX_PENDING_PER_IP} connections proving their key already")]
    Crowded,
}

/// A connection encrypted under a mesh key: XChaCha20 each way, keyed by the sender's nonce.
pub struct Private<S> {
    inner: S,
    /// The key this connection was made with.
    key: MeshKey,
    /// The keyring it must stay in, and when that was last looked at.
    watch: Option<(Arc<LiveKeyring>, std::time::Instant)>,
    read: XChaCha20,
    write: XChaCha20,
    /// Plaintext already read and decrypted (the header the listener probed with).
    unread: Vec<u8>,
    /// Ciphertext accepted from the caller and not yet written.
    out: Vec<u8>,
    /// How much of `out` is written.
    written: usize,
}

fn cipher(key: &MeshKey, nonce: &[u8; NONCE]) -> XChaCha20 {
    XChaCha20::new(key.bytes().into(), nonce.into())
}

async fn swap_nonces<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut S,
) -> io::Result<([u8; NONCE], [u8; NONCE])> {
    let mut local = [0u8; NONCE];
    getrandom::fill(&mut local).map_err(io::Error::other)?;
    socket.write_all(&local).await?;
    socket.flush().await?;
    let mut remote = [0u8; NONCE];
    socket.read_exact(&mut remote).await?;
    Ok((local, remote))
}

/// The dialer's side: encrypts under `key` (the primary).
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    key: MeshKey,
) -> io::Result<Private<S>> {
    let (local, remote) = swap_nonces(&mut socket).await?;
    Ok(Private::new(
        socket,
        key,
        cipher(&key, &remote),
        cipher(&key, &local),
        Vec::new(),
    ))
}

/// The listener's side: finds which of `keys` the dialer used, or refuses it.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    keys: &Keyring,
) -> Result<Private<S>, Refused> {
    let (local, remote) = swap_nonces(&mut socket).await?;
    if remote.starts_with(HEADER) {
        return Err(Refused::Open);
    }
    if remote == local {
        // Our own nonce sent back: both directions would share one keystream.
        return Err(Refused::NoKey);
    }
    let mut probe = [0u8; HEADER.len()];
    socket.read_exact(&mut probe).await?;
    for key in keys.keys() {
        let mut read = cipher(key, &remote);
        let mut plain = probe;
        read.apply_keystream(&mut plain);
        if plain == HEADER {
            return Ok(Private::new(
                socket,
                *key,
                read,
                cipher(key, &local),
                plain.to_vec(),
            ));
        }
    }
    Err(Refused::NoKey)
}

impl<S> Private<S> {
    fn new(inner: S, key: MeshKey, read: XChaCha20, write: XChaCha20, unread: Vec<u8>) -> Self {
        Private {
            inner,
            key,
            watch: None,
            read,
            write,
            unread,
            out: Vec::with_capacity(WRITE_CHUNK),
            written: 0,
        }
    }

    /// Ends the connection (at its next read) once its key is no longer in `keys`, looking
    /// every [`KEY_RECHECK`]: removing a leaked key shuts out whoever holds it, within
    /// seconds, not only at their next dial.
    fn watched(mut self, keys: Arc<LiveKeyring>) -> Self {
        self.watch = Some((keys, std::time::Instant::now()));
        self
    }
}

impl<S: AsyncWrite + Unpin> Private<S> {
    /// Writes out the ciphertext already accepted.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Private<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = buf.len().min(this.unread.len());
            buf[..n].copy_from_slice(&this.unread[..n]);
            this.unread.drain(..n);
            return Poll::Ready(Ok(n));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.read.apply_keystream(&mut buf[..n]);
        if let Some((keys, checked)) = &mut this.watch {
            if checked.elapsed() >= KEY_RECHECK {
                *checked = std::time::Instant::now();
                if !keys.current().keys().contains(&this.key) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("mesh key {} was removed", this.key),
                    )));
                }
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Private<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(WRITE_CHUNK);
        this.out.extend_from_slice(&buf[..n]);
        this.write.apply_keystream(&mut this.out);
        // Start writing now; what does not fit goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

/// What a peer's transport consults on every connection: the keys in force and where to
/// count refusals.
#[derive(Clone)]
pub struct Guard {
    /// The keyring (re-read when its file changes).
    pub keys: Arc<LiveKeyring>,
    /// Where `connections_refused` is counted.
    pub stats: Arc<Stats>,
    /// Incoming connections proving their key, per IP address.
    pub pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One of an address's [`MAX_PENDING_PER_IP`] slots, given back when dropped.
struct Slot {
    pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: Option<IpAddr>,
}

impl Slot {
    fn claim(pending: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: Option<IpAddr>) -> Option<Slot> {
        if let Some(ip) = ip {
            let mut map = pending.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= MAX_PENDING_PER_IP {
                return None;
            }
            *n += 1;
        }
        Some(Slot {
            pending: pending.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

impl Guard {
    /// Guards an incoming connection from `from`: refusals are counted and logged (the 1st,
    /// 2nd, 4th, … so a scan cannot flood the log), naming the address and the reason.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        socket: S,
        from: Multiaddr,
    ) -> io::Result<Private<S>> {
        let keys = self.keys.current();
        let outcome = match Slot::claim(&self.pending, ip_of(&from)) {
            None => Err(Refused::Crowded),
            Some(_slot) => tokio::time::timeout(PRELUDE_TIMEOUT, accept(socket, &keys))
                .await
                .unwrap_or(Err(Refused::Slow))
                .map(|p| p.watched(self.keys.clone())),
        };
        outcome.map_err(|reason| {
            if let Some(n) = bump_throttled(&self.stats.connections_refused) {
                tracing::warn!(%from, %reason, refused = n, "refused a connection: not a member of this mesh");
            }
            io::Error::new(io::ErrorKind::PermissionDenied, reason.to_string())
        })
    }

    /// Guards a connection this peer opens, under the primary key.
    pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        socket: S,
    ) -> io::Result<Private<S>> {
        let key = self.keys.current().primary();
        Ok(dial(socket, key).await?.watched(self.keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt as _};

    /// Two ends of an in-memory socket.
    fn pair() -> (
        Compat<tokio::io::DuplexStream>,
        Compat<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (a.compat(), b.compat())
    }

    async fn talk(dial_key: MeshKey, ring: Keyring) -> Result<Vec<u8>, Refused> {
        let (a, b) = pair();
        let dialer = async move {
            let mut s = dial(a, dial_key).await.unwrap();
            // What multistream-select sends first, then a payload bigger than one chunk.
            let mut msg = HEADER.to_vec();
            msg.extend((0..40_000u32).map(|i| i as u8));
            let _ = s.write_all(&msg).await;
            let _ = s.flush().await;
            s
        };
        let listener = async move {
            let mut s = accept(b, &ring).await?;
            let mut got = vec![0u8; HEADER.len() + 40_000];
            s.read_exact(&mut got).await?;
            Ok::<_, Refused>(got)
        };
        let (_kept, got) = tokio::join!(dialer, listener);
        got
    }

    #[tokio::test]
    async fn a_dialer_with_any_key_of_the_ring_gets_through_and_bytes_survive() {
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let mut ring = Keyring::new(old);
        ring.install(new).unwrap();
        for key in [old, new] {
            let got = talk(key, ring.clone()).await.unwrap();
            assert_eq!(&got[..HEADER.len()], HEADER);
            assert!(got[HEADER.len()..]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == i as u8));
        }
    }

    #[tokio::test]
    async fn a_connection_ends_once_its_key_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let mut ring = Keyring::new(old);
        ring.install(new).unwrap();
        ring.save(dir.path()).unwrap();
        let live = Arc::new(LiveKeyring::watching(dir.path(), ring.clone()));
        let (a, b) = pair();
        let dialer = async {
            let mut s = dial(a, old).await.unwrap();
            s.write_all(HEADER).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            s.flush().await.unwrap();
            s
        };
        let (mut dialer, listener) = tokio::join!(dialer, async {
            accept(b, &ring).await.map(|p| p.watched(live.clone()))
        });
        let mut listener = listener.unwrap();
        let mut buf = vec![0u8; HEADER.len() + 4];
        listener.read_exact(&mut buf).await.unwrap();
        // The old key goes: after the next check, the connection made with it ends.
        ring.make_primary(&new.encode()).unwrap();
        ring.remove(&old.encode()).unwrap();
        ring.save(dir.path()).unwrap();
        let ended = tokio::time::timeout(KEY_RECHECK * 5, async {
            loop {
                dialer.write_all(b"more").await.unwrap();
                dialer.flush().await.unwrap();
                if let Err(e) = listener.read(&mut buf).await {
                    return e;
                }
            }
        })
        .await
        .expect("the connection ends within a few checks");
        assert_eq!(ended.kind(), io::ErrorKind::PermissionDenied, "{ended}");
    }

    #[tokio::test]
    async fn a_dialer_without_a_key_is_refused() {
        let ring = Keyring::new(MeshKey::generate());
        let err = talk(MeshKey::generate(), ring).await.unwrap_err();
        assert!(matches!(err, Refused::NoKey), "{err}");
    }

    #[tokio::test]
    async fn a_dialer_in_the_clear_is_named_as_such() {
        let ring = Keyring::new(MeshKey::generate());
        let mut clear = HEADER.to_vec();
        clear.extend_from_slice(b"\x07/noise\n");
        let (mut a, b) = pair();
        a.write_all(&clear).await.unwrap();
        let err = accept(b, &ring).await.err().unwrap();
        assert!(matches!(err, Refused::Open), "{err}");
    }
}
