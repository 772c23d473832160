//! The edges a hub admits: their credentials, configuration and target-port mapping, with the
//! validation that keeps a bad entry from ever reaching an edge.

use std::collections::HashSet;

use remoteingress_wire::handshake::{validate_edge_id, validate_secret};
use remoteingress_wire::EdgeConfig;
use serde::{Deserialize, Serialize};

use crate::HubError;
use remoteingress_wire::config::PortTargets;

/// One edge the hub admits.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedEdge {
    /// Edge id.
    pub id: String,
    /// Shared secret.
    pub secret: String,
    /// Ports, STUN interval and firewall config sent to the edge.
    #[serde(flatten)]
    pub config: EdgeConfig,
    /// Where its connections go, per edge port, where not to the same port of the target host.
    #[serde(flatten)]
    pub targets: PortTargets,
}

impl std::fmt::Debug for AllowedEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowedEdge")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("config", &self.config)
            .field("targets", &self.targets)
            .finish()
    }
}

impl AllowedEdge {
    /// An edge with only credentials and TCP ports.
    pub fn new(id: &str, secret: &str, listen_ports: Vec<u16>) -> Self {
        Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            config: EdgeConfig {
                listen_ports,
                ..EdgeConfig::default()
            },
            targets: PortTargets::default(),
        }
    }

    /// Checks id, secret, configuration and port mapping; the error names the edge and field.
    pub fn validate(&self) -> Result<(), HubError> {
        let invalid = |field: &str, message: String| HubError::InvalidEdge {
            edge: self.id.clone(),
            message: format!("{field}: {message}"),
        };
        validate_edge_id(&self.id).map_err(|e| invalid("id", e.to_string()))?;
        validate_secret(&self.secret).map_err(|e| invalid("secret", e.to_string()))?;
        // The configuration's problems name their own fields (`listenPorts[0]: …`).
        let problems = |e: remoteingress_wire::config::ConfigError| HubError::InvalidEdge {
            edge: self.id.clone(),
            message: e.to_string(),
        };
        self.config.validate().map_err(problems)?;
        self.targets.validate().map_err(problems)
    }
}

/// Validates a whole set: every edge, and no id twice.
pub fn validate_all(edges: &[AllowedEdge]) -> Result<(), HubError> {
    let mut seen = HashSet::new();
    for edge in edges {
        edge.validate()?;
        if !seen.insert(edge.id.as_str()) {
            return Err(HubError::InvalidEdge {
                edge: edge.id.clone(),
                message: "id: listed twice".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_port_target_hosts_are_read_and_checked() {
        let edges: Vec<AllowedEdge> = serde_json::from_str(
            r#"[{"id":"e1","secret":"s","listenPorts":[80,443],
                 "targetPorts":{"443":8443},"targetHosts":{"443":"10.96.0.7"}}]"#,
        )
        .unwrap();
        validate_all(&edges).unwrap();
        assert_eq!(edges[0].targets.host(443), Some("10.96.0.7"));
        assert_eq!(edges[0].targets.port(443), 8443);
        assert_eq!(edges[0].targets.host(80), None);

        for host in ["", "a b", "x:y", "bad..name"] {
            let mut edge = edges[0].clone();
            edge.targets.hosts.insert(80, host.into());
            let error = edge.validate().unwrap_err().to_string();
            assert!(error.contains("targetHosts[80]"), "{host:?}: {error}");
        }
    }

    #[test]
    fn errors_name_the_edge_and_field() {
        let mut edge = AllowedEdge::new("e1", "s", vec![80, 80]);
        let err = validate_all(std::slice::from_ref(&edge))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("e1") && err.contains("listenPorts[1]"),
            "{err}"
        );
        edge.config.listen_ports = vec![80];
        let twice = validate_all(&[edge.clone(), edge.clone()])
            .unwrap_err()
            .to_string();
        assert!(twice.contains("listed twice"), "{twice}");
        edge.secret = "has space".into();
        assert!(edge.validate().unwrap_err().to_string().contains("secret"));
    }
}
