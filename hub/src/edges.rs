//! The edges a hub admits: their credentials, configuration and target-port mapping, with the
//! validation that keeps a bad entry from ever reaching an edge.

use std::collections::HashSet;
use std::path::Path;

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

/// An edges file as an object: the edges and, optionally, the generation of all of them.
#[derive(Deserialize)]
struct EdgesFile {
    #[serde(default)]
    generation: Option<u64>,
    #[serde(default)]
    edges: Vec<AllowedEdge>,
}

/// Reads an edges file: JSON (an array of edges, or `{"generation": N, "edges": [...]}`) or TOML
/// (`generation = N` and `[[edges]]` tables), by extension. An edge without its own
/// `generation` gets the file's, else the file's modification time in milliseconds, so that
/// every hub reading the same file gives its edges the same, rising generation.
pub fn load_edges_file(path: &Path) -> Result<Vec<AllowedEdge>, HubError> {
    let file_error = |message: String| HubError::EdgesFile {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let parsed = if path.extension().is_some_and(|ext| ext == "toml") {
        toml::from_str::<EdgesFile>(&text).map_err(|e| e.to_string())
    } else if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<AllowedEdge>>(&text)
            .map(|edges| EdgesFile {
                generation: None,
                edges,
            })
            .map_err(|e| e.to_string())
    } else {
        serde_json::from_str::<EdgesFile>(&text).map_err(|e| e.to_string())
    };
    let EdgesFile { generation, edges } = parsed.map_err(file_error)?;
    let generation = generation.or_else(|| modified_millis(path));
    let edges: Vec<AllowedEdge> = edges
        .into_iter()
        .map(|mut edge| {
            edge.config.generation = edge.config.generation.or(generation);
            edge
        })
        .collect();
    validate_all(&edges)?;
    Ok(edges)
}

/// The file's modification time in milliseconds since the Unix epoch.
fn modified_millis(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since_epoch.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn per_port_target_hosts_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edges.json");
        std::fs::write(
            &path,
            r#"[{"id":"e1","secret":"s","listenPorts":[80,443],
                 "targetPorts":{"443":8443},"targetHosts":{"443":"10.96.0.7"}}]"#,
        )
        .unwrap();
        let edges = load_edges_file(&path).unwrap();
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
        assert_eq!(edges[0].targets.ports, BTreeMap::from([(80, 8080)]));

        let toml = dir.path().join("edges.toml");
        std::fs::write(
            &toml,
            "[[edges]]\nid = \"e1\"\nsecret = \"s\"\nlistenPorts = [80, 443]\n[edges.targetPorts]\n80 = 8080\n",
        )
        .unwrap();
        let edges = load_edges_file(&toml).unwrap();
        assert_eq!(edges[0].config.listen_ports, vec![80, 443]);
        assert_eq!(edges[0].targets.ports, BTreeMap::from([(80, 8080)]));
    }

    #[test]
    fn generations_come_from_the_edge_the_file_or_its_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("edges.json");
        std::fs::write(
            &json,
            r#"{"generation":7,"edges":[{"id":"e1","secret":"s"},
                                         {"id":"e2","secret":"s","generation":9}]}"#,
        )
        .unwrap();
        let generations: Vec<Option<u64>> = load_edges_file(&json)
            .unwrap()
            .iter()
            .map(|e| e.config.generation)
            .collect();
        assert_eq!(generations, [Some(7), Some(9)]);

        std::fs::write(&json, r#"[{"id":"e1","secret":"s"}]"#).unwrap();
        let by_time = load_edges_file(&json).unwrap()[0].config.generation;
        assert_eq!(by_time, modified_millis(&json));
        assert!(
            by_time.is_some_and(|ms| ms > 1_600_000_000_000),
            "{by_time:?}"
        );

        let toml = dir.path().join("edges.toml");
        std::fs::write(
            &toml,
            "generation = 3\n[[edges]]\nid = \"e1\"\nsecret = \"s\"\n",
        )
        .unwrap();
        assert_eq!(
            load_edges_file(&toml).unwrap()[0].config.generation,
            Some(3)
        );
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
