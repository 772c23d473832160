//! Reading the one-line handshake messages that precede the frames.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The peer closed before sending a whole line.
    #[error("connection closed before the end of the line")]
    Eof,
    /// No newline within the limit.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one `\n`-terminated line of at most `limit` bytes. Returns the line (without `\n`)
/// and any bytes that arrived after it, which belong to what follows.
pub async fn read_line<R: AsyncRead + Unpin>(
    io: &mut R,
    limit: usize,
) -> Result<(Bytes, Bytes), LineError> {
    let mut buf = BytesMut::with_capacity(limit.min(4096));
    loop {
        let searched = buf.len();
        if io.read_buf(&mut buf).await? == 0 {
            return Err(LineError::Eof);
        }
        if let Some(pos) = buf[searched..].iter().position(|&b| b == b'\n') {
            let end = searched + pos;
            if end + 1 > limit {
                return Err(LineError::TooLong(limit));
            }
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            return Ok((line.freeze(), buf.freeze()));
        }
        if buf.len() >= limit {
            return Err(LineError::TooLong(limit));
        }
        buf.reserve(limit.saturating_sub(buf.len()).min(4096));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_line_and_rest() {
        let mut input: &[u8] = b"EDGE a b\n\x00\x00";
        let (line, rest) = read_line(&mut input, 4096).await.unwrap();
        assert_eq!(&line[..], b"EDGE a b");
        assert_eq!(&rest[..], b"\x00\x00");
    }

    #[tokio::test]
    async fn bounded_and_eof() {
        let long = vec![b'x'; 10_000];
        assert!(matches!(
            read_line(&mut &long[..], 4096).await,
            Err(LineError::TooLong(4096))
        ));
        assert!(matches!(
            read_line(&mut &b"no newline"[..], 4096).await,
            Err(LineError::Eof)
        ));
    }
}
