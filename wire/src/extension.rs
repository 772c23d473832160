//! Our protocol extensions beyond the original frame protocol. The hub announces the ones it
//! has in its handshake reply; an edge answers with an EXTENSIONS frame naming those it uses;
//! neither side sends an extension's frames to a peer that has not confirmed it.

use thiserror::Error;

/// Name of the RESET extension (RESET frames, 0x10, either direction).
pub const RESET: &str = "reset";
/// Name of the DRAIN extension (DRAIN frames, 0x11, hub to edge).
pub const DRAIN: &str = "drain";
/// Name of the LIVENESS extension: the hub answers the edge's PINGs (so the edge learns within
/// seconds that a hub went silent) and confirms every OPEN with an OPENED frame (0x13; on QUIC a
/// control message naming the stream), so the edge may retry an unconfirmed open elsewhere.
pub const LIVENESS: &str = "liveness";

/// A set of extensions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RESET: abort a stream at once, both directions.
    pub reset: bool,
    /// DRAIN: the hub asks the edge to open no new streams on this tunnel.
    pub drain: bool,
    /// LIVENESS: the edge probes the hub too, and the hub confirms every open.
    pub liveness: bool,
}

/// Why an EXTENSIONS payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("EXTENSIONS payload is not a JSON list of names: {0}")]
pub struct ExtensionsError(String);

impl Extensions {
    /// Every extension this build implements.
    pub const ALL: Extensions = Extensions {
        reset: true,
        drain: true,
        liveness: true,
    };
    /// None: the original protocol.
    pub const NONE: Extensions = Extensions {
        reset: false,
        drain: false,
        liveness: false,
    };

    /// The extensions named in `names`; names this build does not know are ignored.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut extensions = Self::NONE;
        for name in names {
            match name {
                RESET => extensions.reset = true,
                DRAIN => extensions.drain = true,
                LIVENESS => extensions.liveness = true,
                _ => {}
            }
        }
        extensions
    }

    /// The names of the extensions in the set.
    pub fn names(self) -> Vec<&'static str> {
        [
            (self.reset, RESET),
            (self.drain, DRAIN),
            (self.liveness, LIVENESS),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// The extensions in both sets.
    pub fn intersect(self, other: Extensions) -> Self {
        Self {
            reset: self.reset && other.reset,
            drain: self.drain && other.drain,
            liveness: self.liveness && other.liveness,
        }
    }

    /// True if the set is empty.
    pub fn is_empty(self) -> bool {
        self == Self::NONE
    }

    /// The payload of an EXTENSIONS frame naming this set.
    pub fn to_payload(self) -> Vec<u8> {
        serde_json::to_vec(&self.names()).unwrap_or_default()
    }

    /// Reads an EXTENSIONS frame's payload.
    pub fn parse(payload: &[u8]) -> Result<Self, ExtensionsError> {
        let names: Vec<String> =
            serde_json::from_slice(payload).map_err(|e| ExtensionsError(e.to_string()))?;
        Ok(Self::from_names(names.iter().map(String::as_str)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_unknown_names() {
        assert_eq!(
            Extensions::ALL.to_payload(),
            b"[\"reset\",\"drain\",\"liveness\"]"
        );
        assert_eq!(Extensions::NONE.to_payload(), b"[]");
        assert_eq!(
            Extensions::parse(b"[\"drain\",\"teleport\",\"liveness\",\"reset\"]"),
            Ok(Extensions::ALL)
        );
        assert_eq!(
            Extensions::parse(b"[\"drain\"]").map(|e| (e.reset, e.drain)),
            Ok((false, true))
        );
        assert_eq!(Extensions::parse(b"[]"), Ok(Extensions::NONE));
        assert!(Extensions::parse(b"{\"reset\":true}").is_err());
        assert!(Extensions::parse(b"").is_err());
        assert_eq!(
            Extensions::ALL.intersect(Extensions::NONE),
            Extensions::NONE
        );
        assert!(Extensions::NONE.is_empty());
    }
}
