//! `/meshbus/repair/1`: the request-response protocol peers use to compare what they hold
//! (marks), fetch the events they miss, and say goodbye. Each message is a Protocol Buffers
//! message after a 4-byte big-endian length, one request and one response per stream; the
//! schema is in docs/wire.md.

use std::io;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshbus/repair/1");

/// Largest request a peer reads: a group announcement with every group and mark a peer
/// may send ([`crate::proto::groups`]) fits.
pub const MAX_REQUEST: usize = 128 * 1024;

/// Events' bytes in one fetch answer; a single larger event is sent alone.
pub const FETCH_BYTES: usize = 1024 * 1024;

/// Largest response a peer reads: a full fetch answer with one largest event past it, or the
/// marks of every stream a peer follows.
pub const MAX_RESPONSE: usize = 2 * FETCH_BYTES + 64 * 1024;

/// What is asked (`meshbus.repair.v1.Request`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// 1: marks, 2: fetch, 3: goodbye.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// Fetch: the publisher's peer id (its bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub source: Vec<u8>,
    /// Fetch: the publisher's epoch.
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    /// Fetch: the first seq wanted.
    #[prost(uint64, tag = "4")]
    pub from: u64,
    /// Fetch: the last seq wanted.
    #[prost(uint64, tag = "5")]
    pub to: u64,
    /// Marks: how far the asker has published (its own stream), so the asked peer learns of
    /// events it missed from a publisher that asks. A mark naming any other publisher is
    /// ignored.
    #[prost(message, optional, tag = "8")]
    pub own: Option<Mark>,
}

/// One group a peer is in (`meshbus.repair.v1.GroupAnnounce`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupAnnounce {
    /// The group's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The sender owns events published from this time, µs since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub since: u64,
    /// Its done-marks: per stream, everything it owned up to `high` is finished.
    #[prost(message, repeated, tag = "3")]
    pub marks: Vec<Mark>,
    /// A digest of what its row takes (pattern, type, filter, key): members whose rows
    /// differ would split events, so a difference is reported.
    #[prost(uint64, tag = "4")]
    pub shape: u64,
}

/// Request kinds.
pub const MARKS: u32 = 1;
/// Request kinds.
pub const FETCH: u32 = 2;
/// Request kinds.
pub const GOODBYE: u32 = 3;

/// One stream a peer holds up to `high` (`meshbus.repair.v1.Mark`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mark {
    /// The publisher's peer id.
    #[prost(bytes = "vec", tag = "1")]
    pub source: Vec<u8>,
    /// Its epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// Every event up to this seq is held.
    #[prost(uint64, tag = "3")]
    pub high: u64,
}

/// The answer (`meshbus.repair.v1.Response`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// Marks: every stream the answering peer follows.
    #[prost(message, repeated, tag = "1")]
    pub marks: Vec<Mark>,
    /// Fetch: the first seq of the stream still held (0: none).
    #[prost(uint64, tag = "2")]
    pub first: u64,
    /// Fetch: the events, each a `meshbus.wire.v1.Event`, in order from the first wanted.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub events: Vec<Vec<u8>>,
    /// Set when the request was refused, saying why.
    #[prost(string, tag = "4")]
    pub error: String,
}

/// Reads and writes length-prefixed protobuf messages.
#[derive(Debug, Clone, Default)]
pub struct Codec;

async fn read_message<T, M>(io: &mut T, max: usize) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: prost::Message + Default,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("repair message of {len} bytes; at most {max} are read"),
        ));
    }
    let mut buf = vec![0; len];
    io.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_message<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: prost::Message,
{
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "repair message too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, MAX_REQUEST).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, MAX_RESPONSE).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &res).await
    }
}
