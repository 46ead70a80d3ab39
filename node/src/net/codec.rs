//! Request-response codecs over the protocol crate's framed messages.
//!
//! Each frame is the 4-byte length and canonical bytes of
//! `alliance_protocol::wire`; the length is checked against the message's
//! cap before a byte of the body is read. The body is then read as it
//! arrives, each piece counted against the node's [`Budget`] before it is
//! stored, so a peer that declares a large frame holds no memory until it
//! sends the bytes, and all peers together hold at most the budget. A
//! request frame must arrive at [`MIN_RATE`] after a grace of
//! [`FRAME_GRACE`].
//!
//! A bad request frame is read as [`Inbound::Refused`] and one that stops
//! short or stalls as [`Inbound::Unfinished`], rather than as an error,
//! because libp2p's request-response drops failed reads without saying who
//! sent them: this way the actor sees which peer it was and can drop that
//! peer. A bad response is an I/O error, which the swarm reports with the
//! peer.

use std::io;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use alliance_protocol::wire::{self, Message};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of request frames that all peers together may have in flight.
pub const FRAME_BUDGET: usize = 128 * 1024 * 1024;
/// The time a request frame may take before [`MIN_RATE`] applies: its
/// length prefix, and the first of its body, must come within it.
pub const FRAME_GRACE: Duration = Duration::from_secs(10);
/// The least rate, in bytes per second, at which a request frame's body
/// must arrive after [`FRAME_GRACE`]: an 8 MiB report may take 138 s.
pub const MIN_RATE: u64 = 64 * 1024;
/// The budget is counted in pieces of this many bytes.
const PIECE: usize = 64 * 1024;

/// A request as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<M> {
    /// A well-formed message.
    Message(M),
    /// A frame over the message's size cap or not a valid message; why.
    Refused(String),
    /// A frame that ended before its length, or came slower than
    /// [`MIN_RATE`]; how far it got. A peer whose connection breaks sends
    /// the same, so this is held against it less than a refused frame.
    Unfinished(String),
}

impl<M> From<M> for Inbound<M> {
    fn from(m: M) -> Self {
        Self::Message(m)
    }
}

/// The memory all inbound request frames may hold at once, shared by every
/// codec of one node; a frame's reader waits for room.
#[derive(Debug, Clone)]
pub struct Budget(Arc<Semaphore>);

impl Budget {
    /// Room for `bytes` of frames (rounded up to whole pieces).
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.div_ceil(PIECE).max(1))))
    }

    /// Bytes not held by any frame now.
    pub fn available(&self) -> usize {
        self.0.available_permits() * PIECE
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(FRAME_BUDGET)
    }
}

/// A codec for requests `Req` answered by `Resp`.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    budget: Budget,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec whose request frames are counted against `budget`.
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            types: PhantomData,
        }
    }
}

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Self::new(Budget::default())
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.budget.clone())
    }
}

/// Why a frame was not read.
enum Failed {
    /// Too large, or not a valid message.
    Bad(String),
    /// Ended early or came too slowly.
    Short(String),
    /// The stream failed underneath.
    Io(io::Error),
}

/// Reads `len` bytes of body, counting each piece against `budget` (when
/// there is one) before it is stored; the permits go back when the caller
/// drops them. With `idle`, each read must bring bytes within it.
async fn read_body<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    len: usize,
    budget: Option<&Budget>,
    idle: Option<Duration>,
) -> Result<(Vec<u8>, Vec<OwnedSemaphorePermit>), Failed> {
    let mut body = Vec::with_capacity(len.min(PIECE));
    let mut permits = Vec::new();
    let mut filled = 0;
    while filled < len {
        if filled == body.len() {
            if let Some(b) = budget {
                let permit = Arc::clone(&b.0)
                    .acquire_owned()
                    .await
                    .map_err(|_| Failed::Io(io::Error::other("the frame budget is closed")))?;
                permits.push(permit);
            }
            body.resize(len.min(filled + PIECE), 0);
        }
        let read = io.read(&mut body[filled..]);
        let got = match idle {
            Some(idle) => match tokio::time::timeout(idle, read).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Failed::Short(format!(
                        "{filled} of the {len} bytes of a frame came, then nothing for {idle:?}"
                    )));
                }
            },
            None => read.await,
        }
        .map_err(Failed::Io)?;
        if got == 0 {
            return Err(Failed::Short(format!(
                "the stream ended after {filled} of the {len} bytes of a frame"
            )));
        }
        filled += got;
    }
    Ok((body, permits))
}

/// One frame of `M`, its body within `budget`; with `timed`, the prefix
/// must come within [`FRAME_GRACE`], no read may wait longer than that,
/// and the whole frame must come within [`frame_deadline`] of its length.
async fn read_checked<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    budget: Option<&Budget>,
    timed: bool,
) -> Result<M, Failed> {
    let start = tokio::time::Instant::now();
    let until = |limit: Duration| async move {
        if timed {
            tokio::time::sleep_until(start + limit).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let read = tokio::select! {
            r = io.read(&mut prefix[got..]) => r,
            () = until(FRAME_GRACE) => {
                return Err(Failed::Short(format!(
                    "no length prefix came within {FRAME_GRACE:?}"
                )));
            }
        };
        match read {
            Ok(0) => {
                return Err(Failed::Short(format!(
                    "the stream ended after {got} of the 4 bytes of a length prefix"
                )));
            }
            Ok(n) => got += n,
            Err(e) => return Err(Failed::Io(e)),
        }
    }
    let len = wire::frame_len::<M>(prefix).map_err(|e| Failed::Bad(e.to_string()))?;
    let deadline = frame_deadline(len);
    let idle = timed.then_some(FRAME_GRACE);
    let (body, _permits) = tokio::select! {
        r = read_body(io, len, budget, idle) => r.map_err(|f| match f {
            Failed::Short(why) => Failed::Short(format!("{why} ({})", M::NAME)),
            other => other,
        })?,
        () = until(deadline) => {
            return Err(Failed::Short(format!(
                "a {len}-byte {} frame did not arrive within {deadline:?}",
                M::NAME
            )));
        }
    };
    M::decode(&body).map_err(|e| Failed::Bad(e.to_string()))
}

impl From<Failed> for io::Error {
    fn from(f: Failed) -> Self {
        match f {
            Failed::Bad(why) => io::Error::new(io::ErrorKind::InvalidData, why),
            Failed::Short(why) => io::Error::new(io::ErrorKind::UnexpectedEof, why),
            Failed::Io(e) => e,
        }
    }
}

/// How long a frame of `len` bytes may take to arrive.
pub fn frame_deadline(len: usize) -> Duration {
    // In milliseconds, so that a frame shorter than a second's worth at
    // MIN_RATE still gets more than the idle grace: the two timers never
    // race for the same instant.
    FRAME_GRACE + Duration::from_millis((len as u64).saturating_mul(1000) / MIN_RATE + 1)
}

/// Reads one frame of `M`; a bad frame is an `InvalidData` error, a short
/// one `UnexpectedEof`.
pub(crate) async fn read_frame<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<M> {
    Ok(read_checked(io, None, false).await?)
}

/// Writes one frame of `M`, leaving the stream open.
pub(crate) async fn write_frame<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: &M,
) -> io::Result<()> {
    let frame =
        wire::encode_frame(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&frame).await
}

async fn write<M: Message, T: AsyncWrite + Unpin + Send>(io: &mut T, msg: &M) -> io::Result<()> {
    write_frame(io, msg).await?;
    io.close().await
}

impl<Req, Resp> libp2p::request_response::Codec for Codec<Req, Resp>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Inbound<Req>;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Inbound<Req>> {
        match read_checked::<Req, T>(io, Some(&self.budget), true).await {
            Ok(m) => Ok(Inbound::Message(m)),
            Err(Failed::Bad(why)) => Ok(Inbound::Refused(why)),
            Err(Failed::Short(why)) => Ok(Inbound::Unfinished(why)),
            Err(Failed::Io(e)) => Err(e),
        }
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        read_frame(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound<Req>,
    ) -> io::Result<()> {
        match req {
            Inbound::Message(m) => write(io, &m).await,
            Inbound::Refused(_) | Inbound::Unfinished(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a refused request cannot be sent",
            )),
        }
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()> {
        write(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alliance_protocol::wire::{Ack, Hello};
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    const P: StreamProtocol = StreamProtocol::new("/test/1");

    #[tokio::test]
    async fn round_trip() {
        let mut c = Codec::<Ack, Ack>::default();
        let mut buf = Cursor::new(Vec::new());
        c.write_request(&P, &mut buf, Ack::Refused("no".into()).into())
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        assert_eq!(
            c.read_request(&P, &mut r).await.unwrap(),
            Inbound::Message(Ack::Refused("no".into()))
        );
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_from_its_prefix() {
        let mut c = Codec::<Hello, Hello>::default();
        // Declares 1 GiB but carries 8 bytes: refused without reading on.
        let mut frame = (1u32 << 30).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let Inbound::Refused(why) = c.read_request(&P, &mut Cursor::new(frame)).await.unwrap()
        else {
            panic!("an oversized frame was accepted");
        };
        assert!(why.contains("more than the limit"), "{why}");
        // A response of that size is an error.
        let mut frame = (1u32 << 30).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let err = c
            .read_response(&P, &mut Cursor::new(frame))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let mut c = Codec::<Hello, Hello>::default();
        let mut garbage = 16u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(
            c.read_response(&P, &mut Cursor::new(garbage))
                .await
                .is_err()
        );
        let mut garbage = 16u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(matches!(
            c.read_request(&P, &mut Cursor::new(garbage)).await,
            Ok(Inbound::Refused(_))
        ));
        // A request that ends early is unfinished, not refused; a
        // response that does is an I/O error.
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0; 10]);
        let Inbound::Unfinished(why) = c.read_request(&P, &mut Cursor::new(short)).await.unwrap()
        else {
            panic!("a truncated frame was not unfinished");
        };
        assert!(why.contains("after 10 of the 100 bytes"), "{why}");
        let got = c.read_request(&P, &mut Cursor::new(vec![0, 0])).await;
        assert!(
            matches!(&got, Ok(Inbound::Unfinished(w)) if w.contains("2 of the 4 bytes")),
            "{got:?}"
        );
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0; 10]);
        assert!(c.read_response(&P, &mut Cursor::new(short)).await.is_err());
    }

    /// Gives `head`, then never anything more.
    struct Stall(Vec<u8>);

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            if self.0.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_is_unfinished_after_its_deadline() {
        let mut c = Codec::<Hello, Hello>::default();
        let start = tokio::time::Instant::now();
        let got = c.read_request(&P, &mut Stall(vec![])).await.unwrap();
        assert!(
            matches!(&got, Inbound::Unfinished(w) if w.contains("no length prefix")),
            "{got:?}"
        );
        assert_eq!(start.elapsed(), FRAME_GRACE);
        // Part of a body, then nothing: cut after the same grace.
        let len = 20 * 1024u32;
        let mut head = len.to_be_bytes().to_vec();
        head.extend_from_slice(&[0; 100]);
        let start = tokio::time::Instant::now();
        let got = c.read_request(&P, &mut Stall(head)).await.unwrap();
        assert!(
            matches!(&got, Inbound::Unfinished(w) if w.contains("100 of the 20480 bytes of a frame came, then nothing for 10s")),
            "{got:?}"
        );
        assert_eq!(start.elapsed(), FRAME_GRACE);
    }

    #[tokio::test]
    async fn a_frame_holds_the_budget_only_for_the_bytes_that_came() {
        let budget = Budget::new(4 * PIECE);
        let mut c = Codec::<wire::Reports, Ack>::new(budget.clone());
        // Declares 8 MiB, sends 100 bytes and stalls: one piece held.
        let mut head = (8u32 << 20).to_be_bytes().to_vec();
        head.extend_from_slice(&[0; 100]);
        let mut stalled = Stall(head);
        let p = P;
        let mut read = Box::pin(c.read_request(&p, &mut stalled));
        let polled = futures::poll!(&mut read);
        assert!(polled.is_pending());
        assert_eq!(budget.available(), 3 * PIECE);
        // The rest of the budget is still there for others; once the
        // stalled frame is dropped, all of it.
        let mut other = Codec::<Ack, Ack>::new(budget.clone());
        let mut buf = Cursor::new(Vec::new());
        other
            .write_request(&P, &mut buf, Ack::Refused("no".into()).into())
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        assert!(matches!(
            other.read_request(&P, &mut r).await.unwrap(),
            Inbound::Message(_)
        ));
        drop(read);
        assert_eq!(budget.available(), 4 * PIECE);
    }
}
