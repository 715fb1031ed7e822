//! The transport header: the first thing a proxy writes to a peer proxy
//! inside a new mTLS connection, before any application byte. One inbound
//! listener takes every app port of a workload, so the server's proxy
//! learns from it which port the caller meant, and whether HTTP or opaque
//! bytes follow.
//!
//! On the wire: `RMR1`, a big-endian u16 length (at most `MAX_LEN`), then
//! a protobuf `TransportHeader` (proto/remora/transport/v1). A connection
//! that does not start with the magic has no header (a client that is not
//! a Remora proxy): what it sent is replayed to the HTTP server.

use crate::detect::Prefixed;
use bytes::{Bytes, BytesMut};
use prost::Message;
pub use remora_proto::transport::TransportHeader;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: &[u8; 4] = b"RMR1";
/// Largest header accepted: a port and a short protocol name need ~10.
pub const MAX_LEN: usize = 1024;
/// `protocol` of an opaque TCP connection.
pub const OPAQUE: &str = "tcp";

/// The bytes a caller writes.
pub fn encode(h: &TransportHeader) -> Vec<u8> {
    let body = h.encode_to_vec();
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("transport header longer than {MAX_LEN} bytes ({0})")]
    TooLong(usize),
    #[error("transport header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("transport header: port {0} is not 1..65535")]
    BadPort(u32),
    #[error("transport header incomplete: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport header not received within {0:?}")]
    Timeout(Duration),
}

/// Reads the header if the connection starts with one. Returns it (or
/// `None`) and the stream, with any bytes read that were not a header put
/// back in front.
pub async fn read<S: AsyncRead + Unpin>(
    mut io: S,
    timeout: Duration,
) -> Result<(Option<TransportHeader>, Prefixed<S>), HeaderError> {
    let work = async {
        let mut head = BytesMut::with_capacity(6);
        // The magic, or proof that it is not there. A client that sends
        // fewer than 4 bytes and waits is not a proxy: its bytes go on.
        while head.len() < MAGIC.len() {
            let n = io.read_buf(&mut head).await?;
            let k = head.len().min(MAGIC.len());
            if n == 0 || head[..k] != MAGIC[..k] {
                return Ok((None, head.freeze()));
            }
        }
        if head[..MAGIC.len()] != MAGIC[..] {
            return Ok((None, head.freeze()));
        }
        while head.len() < 6 {
            if io.read_buf(&mut head).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        let len = u16::from_be_bytes([head[4], head[5]]) as usize;
        if len > MAX_LEN {
            return Err(HeaderError::TooLong(len));
        }
        // What was read past the length belongs to the header body, then to
        // the application.
        let mut rest = head.split_off(6);
        while rest.len() < len {
            if io.read_buf(&mut rest).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        let after = rest.split_off(len);
        let h = TransportHeader::decode(rest.freeze())?;
        if h.port == 0 || h.port > 65535 {
            return Err(HeaderError::BadPort(h.port));
        }
        Ok::<_, HeaderError>((Some(h), after.freeze()))
    };
    let (h, prefix): (Option<TransportHeader>, Bytes) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HeaderError::Timeout(timeout))??;
    Ok((h, Prefixed::new(prefix, io)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const T: Duration = Duration::from_secs(5);

    async fn feed(bytes: Vec<u8>) -> Result<(Option<TransportHeader>, Vec<u8>), HeaderError> {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&bytes).await.unwrap();
        drop(client);
        let (h, mut rest) = read(server, T).await?;
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await.unwrap();
        Ok((h, after))
    }

    #[tokio::test]
    async fn round_trip_keeps_what_follows() {
        let h = TransportHeader {
            port: 8080,
            protocol: OPAQUE.into(),
        };
        let mut bytes = encode(&h);
        bytes.extend_from_slice(b"app bytes");
        let (got, after) = feed(bytes).await.unwrap();
        assert_eq!(got, Some(h));
        assert_eq!(after, b"app bytes");
    }

    #[tokio::test]
    async fn no_header_replays_everything() {
        let (got, after) = feed(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.unwrap();
        assert_eq!(got, None);
        assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
        let (got, after) = feed(b"RM".to_vec()).await.unwrap();
        assert_eq!((got, after.as_slice()), (None, &b"RM"[..]));
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(feed(long).await, Err(HeaderError::TooLong(2000))));
        let zero = encode(&TransportHeader::default());
        assert!(matches!(feed(zero).await, Err(HeaderError::BadPort(0))));
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(feed(garbage).await, Err(HeaderError::Decode(_))));
        let mut cut = encode(&TransportHeader {
            port: 80,
            protocol: String::new(),
        });
        cut.pop();
        assert!(matches!(feed(cut).await, Err(HeaderError::Io(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_header_times_out() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"RMR1\x00").await.unwrap();
        let r = read(server, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(HeaderError::Timeout(_))));
    }
}
