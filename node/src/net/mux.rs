//! The stream muxer on TCP connections: yamux (`/yamux/1.0.0`, the protocol every libp2p
//! peer speaks), driven from the `yamux` crate directly so that its frame size can be set.
//!
//! `libp2p-yamux` fixes the largest data frame a stream sends at the crate's default of
//! 16 KiB, and every frame is a hand-off from the stream's task to the connection's. A
//! 1 MiB chunk was 64 of them on each side. Frames of up to [`SPLIT_SEND_SIZE`] carry the
//! same bytes in far fewer hand-offs; a frame never exceeds the receiver's window (256
//! KiB unless it grew), which the yamux spec bounds frames by, so stock peers take them.

use futures::{AsyncRead, AsyncWrite, future};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Largest data frame a stream sends.
pub const SPLIT_SEND_SIZE: usize = 256 << 10;
/// Inbound streams held for `poll_inbound` when they arrive while the swarm polls the
/// connection for other work; past it, further ones are dropped (reset).
const MAX_PENDING_INBOUND: usize = 64;

/// The yamux upgrade, with Pollen's settings.
#[derive(Clone, Debug)]
pub struct Yamux(yamux::Config);

impl Yamux {
    /// At most `max_streams` streams at once per connection; data frames of up to
    /// [`SPLIT_SEND_SIZE`].
    pub fn new(max_streams: usize) -> Self {
        let mut cfg = yamux::Config::default();
        cfg.set_max_num_streams(max_streams);
        cfg.set_split_send_size(SPLIT_SEND_SIZE);
        Yamux(cfg)
    }
}

impl Yamux {
    /// The muxer over `io` once the upgrade is negotiated: yamux needs no handshake.
    fn start<C>(self, io: C, mode: yamux::Mode) -> future::Ready<std::io::Result<Muxer<C>>>
    where
        C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        future::ready(Ok(Muxer::new(yamux::Connection::new(io, self.0, mode))))
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = std::io::Error;
    type Future = future::Ready<Result<Muxer<C>, std::io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        self.start(io, yamux::Mode::Server)
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = std::io::Error;
    type Future = future::Ready<Result<Muxer<C>, std::io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        self.start(io, yamux::Mode::Client)
    }
}

/// A yamux connection as libp2p's [`StreamMuxer`].
#[derive(Debug)]
pub struct Muxer<C> {
    conn: yamux::Connection<C>,
    /// Streams the peer opened that arrived through [`StreamMuxer::poll`] (which must
    /// drive the connection too) rather than through `poll_inbound`.
    pending: VecDeque<yamux::Stream>,
    /// Who waits in `poll_inbound`.
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C> {
    fn new(conn: yamux::Connection<C>) -> Self {
        Muxer {
            conn,
            pending: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

fn closed_or(r: Option<yamux::Result<yamux::Stream>>) -> yamux::Result<yamux::Stream> {
    r.unwrap_or(Err(yamux::ConnectionError::Closed))
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = yamux::Stream;
    type Error = yamux::ConnectionError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        if let Some(s) = this.pending.pop_front() {
            return Poll::Ready(Ok(s));
        }
        match this.conn.poll_next_inbound(cx) {
            Poll::Ready(r) => Poll::Ready(closed_or(r)),
            Poll::Pending => {
                this.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        self.get_mut().conn.poll_new_outbound(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().conn.poll_close(cx)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        // Driving the connection is what moves every stream's bytes; a new inbound stream
        // it yields is kept for `poll_inbound`.
        let s = match this.conn.poll_next_inbound(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => closed_or(r)?,
        };
        if this.pending.len() < MAX_PENDING_INBOUND {
            this.pending.push_back(s);
        } else {
            tracing::debug!("dropping an inbound yamux stream: {MAX_PENDING_INBOUND} wait");
        }
        if let Some(w) = this.inbound_waker.take() {
            w.wake();
        }
        // Poll again: the connection may have more to do.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use libp2p::tcp::tokio::TcpStream;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(dial, l.accept());
        (TcpStream(a.unwrap()), TcpStream(b.unwrap().0))
    }

    /// Poll a muxer for ever, so its streams move (as the swarm does).
    fn drive<M: StreamMuxer + Unpin + Send + 'static>(mut m: M) {
        tokio::spawn(async move {
            while futures::future::poll_fn(|cx| m.poll_unpin(cx))
                .await
                .is_ok()
            {}
        });
    }

    fn message(seed: u8) -> Vec<u8> {
        (0..(3 << 20) + 7).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Ours dials libp2p's own yamux (what every other libp2p peer runs), opens a stream
    /// and sends 3 MiB, which go in frames larger than libp2p-yamux's 16 KiB; the answer
    /// comes back the same way, in its frames.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exchanges_large_messages_with_libp2p_yamux() {
        let (a, b) = tcp_pair().await;
        let mut ours = Yamux::new(8)
            .upgrade_outbound(a, "/yamux/1.0.0")
            .await
            .unwrap();
        let mut theirs = libp2p::yamux::Config::default()
            .upgrade_inbound(b, "/yamux/1.0.0")
            .await
            .unwrap();
        let mut out = futures::future::poll_fn(|cx| ours.poll_outbound_unpin(cx))
            .await
            .unwrap();
        drive(ours);
        let sent = message(0);
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                out.write_all(&sent).await.unwrap();
                out.flush().await.unwrap();
                out
            })
        };
        let mut inc = futures::future::poll_fn(|cx| theirs.poll_inbound_unpin(cx))
            .await
            .unwrap();
        drive(theirs);
        let mut got = vec![0u8; sent.len()];
        inc.read_exact(&mut got).await.unwrap();
        assert!(got == sent, "the message arrived changed");
        let back = message(0x5a);
        // Written while the other side reads: 3 MiB is more than a window.
        let answer = {
            let back = back.clone();
            tokio::spawn(async move {
                inc.write_all(&back).await.unwrap();
                inc.flush().await.unwrap();
            })
        };
        let mut out = writer.await.unwrap();
        let mut got = vec![0u8; back.len()];
        out.read_exact(&mut got).await.unwrap();
        assert!(got == back, "the answer arrived changed");
        answer.await.unwrap();
    }
}
