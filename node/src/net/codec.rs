//! Request-response codecs over the protocol crate's framed messages.
//!
//! Each frame is the 4-byte length and canonical bytes of
//! `alliance_protocol::wire`; the length is checked against the message's
//! cap before a byte of the body is read or allocated, so a peer that sends
//! an oversized or garbage frame costs no memory. A bad request frame is
//! read as [`Inbound::Refused`] rather than an error, because libp2p's
//! request-response drops failed reads silently: this way the actor sees
//! which peer sent it and can drop that peer. A bad response is an I/O
//! error, which the swarm reports with the peer.

use std::io;
use std::marker::PhantomData;

use alliance_protocol::wire::{self, Message};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// A request as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<M> {
    /// A well-formed message.
    Message(M),
    /// A frame over the message's size cap or not a valid message; why.
    Refused(String),
}

impl<M> From<M> for Inbound<M> {
    fn from(m: M) -> Self {
        Self::Message(m)
    }
}

/// A codec for requests `Req` answered by `Resp`.
#[derive(Debug)]
pub struct Codec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Reads one frame of `M`; a bad frame is an `InvalidData` error.
pub(crate) async fn read_frame<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<M> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len =
        wire::frame_len::<M>(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    M::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
        match read_frame(io).await {
            Ok(m) => Ok(Inbound::Message(m)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Inbound::Refused(e.to_string())),
            Err(e) => Err(e),
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
            Inbound::Refused(_) => Err(io::Error::new(
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
        // A stream that ends early is an I/O error, not a refused frame.
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0; 10]);
        assert!(c.read_request(&P, &mut Cursor::new(short)).await.is_err());
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0; 10]);
        assert!(c.read_response(&P, &mut Cursor::new(short)).await.is_err());
    }
}
