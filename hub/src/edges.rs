//! The edges a hub admits: their credentials, configuration and target-port mapping, with the
//! validation that keeps a bad entry from ever reaching an edge.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use remoteingress_wire::handshake::{validate_edge_id, validate_secret};
use remoteingress_wire::EdgeConfig;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::HubError;

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
    /// Target port per edge port, where they differ.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_map"
    )]
    pub target_ports: BTreeMap<u16, u16>,
}

/// Reads `{"80": 8080}`: map keys are strings in JSON and TOML.
fn port_map<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<u16, u16>, D::Error> {
    BTreeMap::<String, u16>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, value)| match key.parse::<u16>() {
            Ok(port) => Ok((port, value)),
            Err(_) => Err(D::Error::custom(format!(
                "targetPorts key {key:?} is not a port"
            ))),
        })
        .collect()
}

impl std::fmt::Debug for AllowedEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowedEdge")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("config", &self.config)
            .field("target_ports", &self.target_ports)
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
            target_ports: BTreeMap::new(),
        }
    }

    /// The target port for connections the edge accepted on `edge_port`.
    pub fn target_port(&self, edge_port: u16) -> u16 {
        self.target_ports
            .get(&edge_port)
            .copied()
            .unwrap_or(edge_port)
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
        self.config.validate().map_err(|e| HubError::InvalidEdge {
            edge: self.id.clone(),
            message: e.to_string(),
        })?;
        for (from, to) in &self.target_ports {
            if *from == 0 || *to == 0 {
                return Err(invalid(
                    "targetPorts",
                    format!("{from} -> {to}: port 0 is not a usable port"),
                ));
            }
        }
        Ok(())
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

#[derive(Deserialize)]
struct TomlEdges {
    #[serde(default)]
    edges: Vec<AllowedEdge>,
}

/// Reads an edges file: a JSON array of edges, or TOML with `[[edges]]` tables (by extension).
pub fn load_edges_file(path: &Path) -> Result<Vec<AllowedEdge>, HubError> {
    let text = std::fs::read_to_string(path).map_err(|e| HubError::EdgesFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let parsed = if path.extension().is_some_and(|ext| ext == "toml") {
        toml::from_str::<TomlEdges>(&text)
            .map(|file| file.edges)
            .map_err(|e| e.to_string())
    } else {
        serde_json::from_str::<Vec<AllowedEdge>>(&text).map_err(|e| e.to_string())
    };
    let edges = parsed.map_err(|message| HubError::EdgesFile {
        path: path.to_owned(),
        message,
    })?;
    validate_all(&edges)?;
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("edges.json");
        std::fs::write(
            &json,
            r#"[{"id":"e1","secret":"s","listenPorts":[80],"targetPorts":{"80":8080},
                 "firewallConfig":{"blockedIps":["10.0.0.0/8"]}}]"#,
        )
        .unwrap();
        let edges = load_edges_file(&json).unwrap();
        assert_eq!(edges[0].config.listen_ports, vec![80]);
        assert_eq!(edges[0].target_ports, BTreeMap::from([(80, 8080)]));

        let toml = dir.path().join("edges.toml");
        std::fs::write(
            &toml,
            "[[edges]]\nid = \"e1\"\nsecret = \"s\"\nlistenPorts = [80, 443]\n[edges.targetPorts]\n80 = 8080\n",
        )
        .unwrap();
        let edges = load_edges_file(&toml).unwrap();
        assert_eq!(edges[0].config.listen_ports, vec![80, 443]);
        assert_eq!(edges[0].target_ports, BTreeMap::from([(80, 8080)]));
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
