//! Byte streams over channels: a file (or any `AsyncRead`) to a runner in two lines, and the
//! `AsyncRead` / `AsyncWrite` ends a task plugs into a child process's pipes.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::{Receiver, Sender, channel};
use crate::error::Error;

/// Chunks read from a stream, and how many wait in the channel.
const READ_CHUNK: usize = 128 * 1024;
const CHUNKS_IN_FLIGHT: usize = 8;

/// Streams everything `reader` yields, in chunks, into a new channel and returns its receiver:
/// pass it to a task, and the task reads the stream on its runner (with [`into_reader`], say).
/// A read error ends the channel with that error, on both sides.
///
/// Reading happens in a task spawned here, at the pace the receiver takes the chunks; it stops
/// when the receiver goes away.
///
/// # Panics
/// Outside a Tokio runtime.
pub fn stream_reader<R>(reader: R) -> Receiver<Bytes>
where
    R: AsyncRead + Send + 'static,
{
    let (tx, rx) = channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        let mut reader = std::pin::pin!(reader);
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            match reader.read_buf(&mut buf).await {
                Ok(0) => return,
                Ok(_) => {
                    if tx.send(buf.split().freeze()).await.is_err() {
                        return;
                    }
                }
                Err(e) => return tx.link.end(Error::io("reading the stream", e)),
            }
        }
    });
    rx
}

/// Reads a channel of byte chunks as an `AsyncRead`: `tokio::io::copy(&mut into_reader(rx),
/// &mut child_stdin)`. The end of the channel is the end of the stream, or an error if the
/// channel ended with one (its sender failed, its call was cancelled...).
pub fn into_reader(rx: Receiver<Bytes>) -> ChannelReader {
    ChannelReader {
        rx,
        chunk: Bytes::new(),
    }
}

/// Writes to a channel of byte chunks as an `AsyncWrite`, one chunk per write: `tokio::io::copy(
/// &mut child_stdout, &mut into_writer(tx))`. Shutting it down closes this sender.
pub fn into_writer(tx: Sender<Bytes>) -> ChannelWriter {
    ChannelWriter { tx }
}

/// The `AsyncRead` of [`into_reader`].
#[derive(Debug)]
pub struct ChannelReader {
    rx: Receiver<Bytes>,
    chunk: Bytes,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.chunk.is_empty() {
            match ready!(Pin::new(&mut this.rx).poll_next(cx)) {
                Some(chunk) => this.chunk = chunk,
                None => {
                    return Poll::Ready(match this.rx.error() {
                        Some(e) => Err(std::io::Error::other(e)),
                        None => Ok(()),
                    });
                }
            }
        }
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The `AsyncWrite` of [`into_writer`].
#[derive(Debug)]
pub struct ChannelWriter {
    tx: Sender<Bytes>,
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut tx = Pin::new(&mut self.get_mut().tx);
        ready!(tx.as_mut().poll_ready(cx)).map_err(std::io::Error::other)?;
        tx.start_send(Bytes::copy_from_slice(buf))
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tx)
            .poll_close(cx)
            .map_err(std::io::Error::other)
    }
}
