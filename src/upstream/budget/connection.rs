//! The connection to the budget store: one multiplexed connection, made again after it
//! failed or a command timed out, on a socket that takes no more reply bytes than the
//! commands written could call for. A store (or anything posing as one) that sends an
//! endless reply has its connection closed, instead of growing the gateway's read buffer
//! without bound while the reply never completes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, RedisResult};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Reply bytes each write of commands allows: the gateway's commands are answered in tens
/// of bytes (a script's `NOSCRIPT` error and the retry with its source in a few hundred).
const REPLY_BYTES_PER_WRITE: u64 = 16 * 1024;

/// The most reply bytes allowed ahead of the commands: what one connection may buffer.
const MAX_REPLY_ALLOWANCE: u64 = 1024 * 1024;

pub(super) struct StoreConnection {
    info: ConnectionInfo,
    timeout: Duration,
    /// The live connection, if any; connecting happens under the lock, so one caller
    /// connects and the others wait for it.
    current: Mutex<Option<MultiplexedConnection>>,
}

impl StoreConnection {
    /// Connects lazily, on the first command.
    pub(super) fn new(info: ConnectionInfo, timeout: Duration) -> Self {
        Self {
            info,
            timeout,
            current: Mutex::new(None),
        }
    }

    /// The live connection, connecting first if there is none.
    pub(super) async fn get(&self) -> RedisResult<MultiplexedConnection> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// Drops the connection (and whatever it buffered); the next command connects again.
    pub(super) async fn reset(&self) {
        *self.current.lock().await = None;
    }

    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let ConnectionAddr::Tcp(host, port) = self.info.addr() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the budget store is reached over plain TCP only",
            )
            .into());
        };
        let stream = TcpStream::connect((host.as_str(), *port)).await?;
        stream.set_nodelay(true)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let (connection, driver) = MultiplexedConnection::new_with_config(
            self.info.redis_settings(),
            CappedReplies::new(stream),
            config,
        )
        .await?;
        tokio::spawn(driver);
        Ok(connection)
    }
}

/// A socket whose reads stop with an error once the peer has sent more than the writes
/// allowed (see [`REPLY_BYTES_PER_WRITE`]).
struct CappedReplies<S> {
    inner: S,
    allowance: u64,
}

impl<S> CappedReplies<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            // The handshake's own answers (HELLO, AUTH, SELECT).
            allowance: REPLY_BYTES_PER_WRITE,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CappedReplies<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = (buf.filled().len() - before) as u64;
            if read > this.allowance {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the budget store sent more than the commands asked for",
                )));
            }
            this.allowance -= read;
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CappedReplies<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = result {
            if written > 0 {
                this.allowance = (this.allowance + REPLY_BYTES_PER_WRITE).min(MAX_REPLY_ALLOWANCE);
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reply_larger_than_the_writes_allow_is_an_error_and_nothing_past_it_is_kept() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut capped = CappedReplies::new(near);
        capped.write_all(b"PING\r\n").await.unwrap();
        // Allowed: the handshake's share and one write's.
        let allowed = 2 * REPLY_BYTES_PER_WRITE as usize;
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 4096];
            while far.write_all(&chunk).await.is_ok() {}
        });
        let mut taken = 0usize;
        let mut buf = [0u8; 1024];
        let error = loop {
            match capped.read(&mut buf).await {
                Ok(n) => taken += n,
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(taken <= allowed, "{taken} bytes taken, {allowed} allowed");
        writer.abort();
    }

    #[tokio::test]
    async fn the_allowance_stops_growing_at_its_maximum() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut capped = CappedReplies::new(near);
        for _ in 0..200 {
            capped.write_all(b"x").await.unwrap();
        }
        assert_eq!(capped.allowance, MAX_REPLY_ALLOWANCE);
    }
}
