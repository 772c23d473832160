//! Connection tokens: everything an edge needs to reach its hub, in one copy-pasteable string.
//!
//! A token is base64url (no padding) of compact JSON `{"h":host,"p":port,"e":edgeId,"s":secret}`
//! plus, optionally, `"f"`: the hex SHA-256 pin of the hub's certificate, and `"hubs"`: further
//! hub addresses (`host:port`) of the same hub tier. Tokens of the original system (without
//! `f` and `hubs`) decode unchanged.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest token accepted, to bound work on untrusted input.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The contents of a connection token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionToken {
    /// Hub host name or address.
    #[serde(rename = "h")]
    pub hub_host: String,
    /// Hub tunnel port.
    #[serde(rename = "p")]
    pub hub_port: u16,
    /// Edge id.
    #[serde(rename = "e")]
    pub edge_id: String,
    /// Edge secret.
    #[serde(rename = "s")]
    pub secret: String,
    /// SHA-256 of the hub certificate (DER), lowercase hex.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Further hubs of the same tier, `host:port`, besides `hub_host:hub_port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

impl std::fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionToken")
            .field("hub_host", &self.hub_host)
            .field("hub_port", &self.hub_port)
            .field("edge_id", &self.edge_id)
            .field("secret", &"<redacted>")
            .field("pin", &self.pin)
            .field("hubs", &self.hubs)
            .finish()
    }
}

/// Why a token could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    /// Not base64url.
    #[error("token is not base64url: {0}")]
    Base64(String),
    /// Not the expected JSON.
    #[error("token does not hold connection details: {0}")]
    Json(String),
    /// The pin is not 64 hex digits.
    #[error("token pin must be 64 hex digits (SHA-256)")]
    BadPin,
}

/// Checks that `pin` is a SHA-256 in hex and returns it in lowercase.
pub fn normalize_pin(pin: &str) -> Result<String, TokenError> {
    let pin: String = pin.chars().filter(|c| *c != ':').collect();
    if pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(pin.to_ascii_lowercase())
    } else {
        Err(TokenError::BadPin)
    }
}

impl ConnectionToken {
    /// Every hub address the token names, `host:port`, the first hub first, without repeats.
    pub fn hub_addresses(&self) -> Vec<String> {
        let mut addresses = vec![join_host_port(&self.hub_host, self.hub_port)];
        for hub in &self.hubs {
            if !addresses.contains(hub) {
                addresses.push(hub.clone());
            }
        }
        addresses
    }

    /// The token string.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Decodes a token (padding and surrounding whitespace tolerated).
    pub fn decode(token: &str) -> Result<Self, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let bytes = if token.ends_with('=') {
            URL_SAFE.decode(token)
        } else {
            URL_SAFE_NO_PAD.decode(token)
        }
        .map_err(|e| TokenError::Base64(e.to_string()))?;
        let mut decoded: Self =
            serde_json::from_slice(&bytes).map_err(|e| TokenError::Json(e.to_string()))?;
        if let Some(pin) = &decoded.pin {
            decoded.pin = Some(normalize_pin(pin)?);
        }
        Ok(decoded)
    }
}

/// `host:port`, with an IPv6 address in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn example() -> ConnectionToken {
        ConnectionToken {
            hub_host: "hub.example.com".into(),
            hub_port: 8443,
            edge_id: "edge-nyc-01".into(),
            secret: "supersecrettoken1".into(),
            pin: None,
            hubs: Vec::new(),
        }
    }

    #[test]
    fn matches_the_original_systems_token() {
        let token = example().encode();
        assert!(
            token.starts_with("eyJoIjoiaHViLmV4YW1wbGUuY29tIiwi"),
            "{token}"
        );
        assert_eq!(
            token,
            "eyJoIjoiaHViLmV4YW1wbGUuY29tIiwicCI6ODQ0MywiZSI6ImVkZ2UtbnljLTAxIiwicyI6InN1cGVyc2VjcmV0dG9rZW4xIn0"
        );
        assert_eq!(ConnectionToken::decode(&token).unwrap(), example());
    }

    #[test]
    fn carries_a_pin() {
        let token = ConnectionToken {
            pin: Some("AB".repeat(32)),
            ..example()
        };
        let decoded = ConnectionToken::decode(&token.encode()).unwrap();
        assert_eq!(decoded.pin, Some("ab".repeat(32)));
    }

    #[test]
    fn carries_further_hubs() {
        let token = ConnectionToken {
            hubs: vec![
                "hub-b.example.com:8443".into(),
                "hub.example.com:8443".into(),
            ],
            ..example()
        };
        let decoded = ConnectionToken::decode(&token.encode()).unwrap();
        assert_eq!(
            decoded.hub_addresses(),
            ["hub.example.com:8443", "hub-b.example.com:8443"]
        );
        assert_eq!(example().hub_addresses(), ["hub.example.com:8443"]);
        assert_eq!(join_host_port("::1", 8443), "[::1]:8443");
    }

    #[test]
    fn malformed_tokens_are_typed_errors() {
        assert!(matches!(
            ConnectionToken::decode("!!!"),
            Err(TokenError::Base64(_))
        ));
        assert!(matches!(
            ConnectionToken::decode(&URL_SAFE_NO_PAD.encode(b"{\"h\":1}")),
            Err(TokenError::Json(_))
        ));
        let bad_pin = URL_SAFE_NO_PAD.encode(br#"{"h":"a","p":1,"e":"b","s":"c","f":"xyz"}"#);
        assert_eq!(ConnectionToken::decode(&bad_pin), Err(TokenError::BadPin));
        assert_eq!(
            ConnectionToken::decode(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::TooLong)
        );
        let padded = URL_SAFE.encode(serde_json::to_vec(&example()).unwrap());
        assert_eq!(ConnectionToken::decode(&padded).unwrap(), example());
    }

    proptest! {
        #[test]
        fn round_trip(host in "[a-z0-9.-]{1,40}", port in any::<u16>(), id in "[A-Za-z0-9._-]{1,20}",
                      secret in "\\PC{1,40}", pin in proptest::option::of("[0-9a-f]{64}"),
                      hubs in proptest::collection::vec("[a-z0-9.-]{1,20}:[0-9]{1,5}", 0..3)) {
            let token = ConnectionToken { hub_host: host, hub_port: port, edge_id: id, secret, pin, hubs };
            prop_assert_eq!(ConnectionToken::decode(&token.encode()).unwrap(), token);
        }

        #[test]
        fn random_text_never_panics(text in "\\PC{0,300}") {
            let _ = ConnectionToken::decode(&text);
        }
    }
}
