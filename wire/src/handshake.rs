//! The tunnel handshake: the edge's `EDGE <edgeId> <secret>\n` line and the hub's one-line JSON
//! reply (the edge's configuration, or `{"error":"…"}`, with `"retryAfterMs"` when the refusal
//! is temporary: a key an original edge ignores).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::EdgeConfig;
use crate::extension::Extensions;

/// Longest handshake line, newline included.
pub const MAX_LINE_LEN: usize = 4096;
/// Longest edge id.
pub const MAX_EDGE_ID_LEN: usize = 128;
/// Longest handshake reply (it carries the edge's configuration) an edge accepts.
pub const MAX_REPLY_LEN: usize = 1024 * 1024;
/// The reply the hub sends for any authentication failure.
pub const UNAUTHORIZED: &str = "unauthorized";
/// The reply of a hub that serves as many edges as it may: try again later, or another hub.
pub const BUSY: &str = "busy";
/// The longest retry hint an edge honours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why a handshake line or reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The line is longer than [`MAX_LINE_LEN`].
    #[error("handshake line exceeds {MAX_LINE_LEN} bytes")]
    TooLong,
    /// The line is not `EDGE <edgeId> <secret>\n`.
    #[error("handshake line is not of the form `EDGE <edgeId> <secret>`")]
    Malformed,
    /// The edge id has characters outside `[A-Za-z0-9._-]` or a bad length.
    #[error("edge id must be 1-128 characters of A-Z a-z 0-9 . _ -")]
    BadEdgeId,
    /// The secret is empty or has whitespace or control characters.
    #[error("secret must be non-empty printable ASCII without spaces")]
    BadSecret,
    /// The hub refused the edge; a temporary refusal says when to come back.
    #[error("hub refused the edge: {reason}")]
    Rejected {
        /// The hub's reason.
        reason: String,
        /// Come back no sooner than this (at most [`MAX_RETRY_AFTER`]).
        retry_after: Option<Duration>,
    },
    /// The hub's reply is not the expected JSON.
    #[error("hub reply is not valid: {0}")]
    BadReply(String),
}

/// The credentials an edge presents.
#[derive(Clone, PartialEq, Eq)]
pub struct EdgeHello {
    /// Edge id.
    pub edge_id: String,
    /// Shared secret.
    pub secret: String,
}

impl std::fmt::Debug for EdgeHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHello")
            .field("edge_id", &self.edge_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Checks an edge id against `[A-Za-z0-9._-]{1,128}`.
pub fn validate_edge_id(id: &str) -> Result<(), HandshakeError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_EDGE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::BadEdgeId)
    }
}

/// Checks that a secret fits in a handshake line: printable ASCII, no spaces.
pub fn validate_secret(secret: &str) -> Result<(), HandshakeError> {
    let ok = !secret.is_empty()
        && secret.len() < MAX_LINE_LEN - MAX_EDGE_ID_LEN - 8
        && secret.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::BadSecret)
    }
}

impl EdgeHello {
    /// Credentials after checking both parts.
    pub fn new(edge_id: &str, secret: &str) -> Result<Self, HandshakeError> {
        validate_edge_id(edge_id)?;
        validate_secret(secret)?;
        Ok(Self {
            edge_id: edge_id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The wire line, newline included.
    pub fn to_line(&self) -> String {
        format!("EDGE {} {}\n", self.edge_id, self.secret)
    }

    /// Parses one line (with or without its trailing `\n`; a `\r` before it is tolerated).
    pub fn parse(line: &[u8]) -> Result<Self, HandshakeError> {
        if line.len() > MAX_LINE_LEN {
            return Err(HandshakeError::TooLong);
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = std::str::from_utf8(line).map_err(|_| HandshakeError::Malformed)?;
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("EDGE"), Some(id), Some(secret), None) => Self::new(id, secret),
            _ => Err(HandshakeError::Malformed),
        }
    }
}

/// The hub's reply to a successful handshake: the edge's configuration as one JSON line, with
/// the hub's instance id under `"hubId"` and the extensions it offers under `"extensions"`
/// (keys an original edge ignores).
pub fn accept_reply(config: &EdgeConfig, offered: Extensions, hub_id: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Reply<'a> {
        #[serde(flatten)]
        config: &'a EdgeConfig,
        hub_id: &'a str,
        extensions: Vec<&'static str>,
    }
    let reply = Reply {
        config,
        hub_id,
        extensions: offered.names(),
    };
    let mut line = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".to_owned());
    line.push('\n');
    line
}

/// What an edge learns from an accepting reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubReply {
    /// Its configuration.
    pub config: EdgeConfig,
    /// The extensions the hub offers (none from an original hub).
    pub offered: Extensions,
    /// The hub's instance id (none from an original hub): tells apart hubs reached through
    /// one address.
    pub hub_id: Option<String>,
}

/// The hub's reply to a refused handshake.
pub fn error_reply(reason: &str) -> String {
    reply_line(&serde_json::json!({ "error": reason }))
}

/// The hub's reply to a handshake it refuses for now: the edge should come back after
/// `retry_after`.
pub fn retry_reply(reason: &str, retry_after: Duration) -> String {
    let retry_after_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    reply_line(&serde_json::json!({ "error": reason, "retryAfterMs": retry_after_ms }))
}

/// `reply` as one line of JSON.
fn reply_line(reply: &serde_json::Value) -> String {
    let mut line = reply.to_string();
    line.push('\n');
    line
}

impl HandshakeError {
    /// When a refused edge may come back, if the hub said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HandshakeError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Interprets the hub's reply line on the edge.
pub fn parse_reply(line: &[u8]) -> Result<HubReply, HandshakeError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        error: Option<String>,
        retry_after_ms: Option<u64>,
        #[serde(default)]
        extensions: Vec<String>,
        hub_id: Option<String>,
    }
    let bad = |e: serde_json::Error| HandshakeError::BadReply(e.to_string());
    let envelope = serde_json::from_slice::<Envelope>(line).map_err(bad)?;
    if let Some(reason) = envelope.error {
        return Err(HandshakeError::Rejected {
            reason,
            retry_after: envelope
                .retry_after_ms
                .map(|ms| Duration::from_millis(ms).min(MAX_RETRY_AFTER)),
        });
    }
    Ok(HubReply {
        config: serde_json::from_slice(line).map_err(bad)?,
        offered: Extensions::from_names(envelope.extensions.iter().map(String::as_str)),
        hub_id: envelope.hub_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builds_and_parses_the_line() {
        let hello = EdgeHello::new("edge-nyc-01", "s3cr3t").unwrap();
        assert_eq!(hello.to_line(), "EDGE edge-nyc-01 s3cr3t\n");
        assert_eq!(
            EdgeHello::parse(b"EDGE edge-nyc-01 s3cr3t\n").unwrap(),
            hello
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE edge-nyc-01 s3cr3t\r\n").unwrap(),
            hello
        );
    }

    #[test]
    fn rejects_bad_lines() {
        assert_eq!(
            EdgeHello::parse(b"HELLO a b\n"),
            Err(HandshakeError::Malformed)
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE a\n"),
            Err(HandshakeError::Malformed)
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE a b c\n"),
            Err(HandshakeError::Malformed)
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE a/b c\n"),
            Err(HandshakeError::BadEdgeId)
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE  c\n"),
            Err(HandshakeError::BadEdgeId)
        );
        assert_eq!(
            EdgeHello::parse(b"EDGE a \x01\n"),
            Err(HandshakeError::BadSecret)
        );
        let long_id = format!("EDGE {} s\n", "a".repeat(129));
        assert_eq!(
            EdgeHello::parse(long_id.as_bytes()),
            Err(HandshakeError::BadEdgeId)
        );
        let huge = vec![b'a'; MAX_LINE_LEN + 1];
        assert_eq!(EdgeHello::parse(&huge), Err(HandshakeError::TooLong));
        assert_eq!(
            EdgeHello::parse(b"EDGE \xff\xfe s\n"),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn replies() {
        let config = EdgeConfig {
            listen_ports: vec![80],
            ..EdgeConfig::default()
        };
        let line = accept_reply(&config, Extensions::ALL, "hub-a");
        assert!(line.ends_with('\n'));
        assert!(
            line.contains("\"hubId\":\"hub-a\",\"extensions\":[\"reset\",\"drain\",\"liveness\"]"),
            "{line}"
        );
        assert_eq!(
            parse_reply(line.as_bytes()).unwrap(),
            HubReply {
                config: config.clone(),
                offered: Extensions::ALL,
                hub_id: Some("hub-a".into()),
            }
        );
        // An original hub's reply: the configuration alone.
        let original = serde_json::to_string(&config).unwrap();
        let reply = parse_reply(original.as_bytes()).unwrap();
        assert_eq!((reply.offered, reply.hub_id), (Extensions::NONE, None));
        assert_eq!(error_reply(UNAUTHORIZED), "{\"error\":\"unauthorized\"}\n");
        assert_eq!(
            parse_reply(error_reply(UNAUTHORIZED).as_bytes()),
            Err(HandshakeError::Rejected {
                reason: "unauthorized".into(),
                retry_after: None
            })
        );
        let busy = retry_reply(BUSY, Duration::from_millis(2500));
        assert_eq!(busy, "{\"error\":\"busy\",\"retryAfterMs\":2500}\n");
        assert_eq!(
            parse_reply(busy.as_bytes()).unwrap_err().retry_after(),
            Some(Duration::from_millis(2500))
        );
        let forever = retry_reply(BUSY, Duration::from_secs(86_400));
        assert_eq!(
            parse_reply(forever.as_bytes()).unwrap_err().retry_after(),
            Some(MAX_RETRY_AFTER),
            "a hint is bounded"
        );
        assert!(matches!(
            parse_reply(b"nope"),
            Err(HandshakeError::BadReply(_))
        ));
    }

    proptest! {
        #[test]
        fn line_round_trip(id in "[A-Za-z0-9._-]{1,128}", secret in "[!-~]{1,200}") {
            let hello = EdgeHello::new(&id, &secret).unwrap();
            prop_assert_eq!(EdgeHello::parse(hello.to_line().as_bytes()).unwrap(), hello);
        }

        #[test]
        fn random_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = EdgeHello::parse(&bytes);
            let _ = parse_reply(&bytes);
        }
    }
}
