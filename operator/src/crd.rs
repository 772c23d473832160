//! The `Edge` custom resource: an edge the hubs admit, in the edges file's JSON shape.

use kube::CustomResource;
use remoteingress_wire::config::PortTargets;
use remoteingress_wire::EdgeConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An edge the hubs admit: its ports, per-port targets, firewall and STUN interval, as in the
/// edges file (`spec: {listenPorts: [80, 443]}` is complete).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "remoteingress.dev",
    version = "v1alpha1",
    kind = "Edge",
    doc = "An edge the remoteingress hubs admit, in the edges file's shape (docs/kubernetes.md).",
    namespaced,
    status = "EdgeStatus",
    shortname = "rie",
    category = "remoteingress",
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Applied","type":"string","jsonPath":".status.conditions[?(@.type==\"ConfigApplied\")].status"}"#,
    printcolumn = r#"{"name":"Public IP","type":"string","jsonPath":".status.publicIp"}"#,
    printcolumn = r#"{"name":"Ports","type":"string","jsonPath":".status.listenPorts"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeSpec {
    /// The edge id the edge presents; the object's name when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,128}$"))]
    pub edge_id: Option<String>,
    /// The Secret holding the edge's shared secret; when omitted the operator creates
    /// `<name>-secret` with a random one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Ports, STUN interval and firewall (`listenPorts`, `listenPortsUdp`, `stunIntervalSecs`,
    /// `firewallConfig`).
    #[serde(flatten)]
    pub config: EdgeConfig,
    /// Per-port targets (`targetPorts`, `targetHosts`).
    #[serde(flatten)]
    pub targets: PortTargets,
}

/// A key of a Secret in the Edge's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key holding the secret; `secret` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What the operator and the hubs report about an Edge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeStatus {
    /// `Connected`, `ConfigApplied` and `Conflict`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The edge id the hubs know it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_id: Option<String>,
    /// The generation of the configuration the hubs push (rises with every change of the
    /// Edge or of a Service exposed through it).
    #[serde(default)]
    pub config_generation: u64,
    /// A digest of that configuration, to tell when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// The generation the edge acknowledged as applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<u64>,
    /// The edge's public address, as it found by STUN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Ids of the hubs it has a tunnel to.
    #[serde(default)]
    pub hubs: Vec<String>,
    /// TCP ports it is told to listen on, its own and those of exposed Services.
    #[serde(default)]
    pub listen_ports: Vec<u16>,
    /// UDP ports it is told to listen on.
    #[serde(default)]
    pub listen_ports_udp: Vec<u16>,
    /// The Secret holding its connection token (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

/// One condition of an Edge, in the Kubernetes shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Connected`, `ConfigApplied` or `Conflict`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word for why.
    pub reason: String,
    /// Details for people.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The Edge's `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRDs as YAML documents, for `deploy/crds/` and the Helm chart.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&Edge::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRDs (`deploy/crds/`, the chart's `crds/`) are what the types generate.
    #[test]
    fn the_committed_crds_are_current() {
        let generated = crds_yaml().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for path in [
            "deploy/crds/edges.remoteingress.dev.yaml",
            "deploy/helm/remoteingress/crds/edges.remoteingress.dev.yaml",
        ] {
            let committed = std::fs::read_to_string(root.join(path)).unwrap_or_default();
            assert!(
                committed == generated,
                "{path} differs from the Edge type: run `cargo run -- operator --print-crds > {path}`"
            );
        }
    }
}
