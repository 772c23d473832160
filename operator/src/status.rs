//! What the hubs report, folded into each Edge's status and each exposed Service's
//! `status.loadBalancer.ingress`. Pure: reports in, statuses out.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::LoadBalancerIngress;
use remoteingress_controlplane::pb;

use crate::compose::{ComposedEdge, Exposure, ObjectKey, Refused};
use crate::crd::{Condition, EdgeStatus};
use crate::hubs::HubReport;

/// `True`/`False`/`Unknown`, reason and message of one condition.
type Verdict = (&'static str, &'static str, String);

/// A hub's report with its edges and tunnels indexed by edge id, made once a pass so that each
/// Edge's status is a lookup, not a scan of every hub's edges.
pub struct HubView<'a> {
    /// The report.
    pub report: &'a HubReport,
    edges: HashMap<&'a str, &'a pb::EdgeInfo>,
    /// The first tunnel of each edge (an edge may have several to one hub).
    tunnels: HashMap<&'a str, &'a pb::ConnectedEdge>,
}

impl<'a> HubView<'a> {
    /// Indexes `report`.
    pub fn new(report: &'a HubReport) -> Self {
        let mut tunnels = HashMap::new();
        for tunnel in &report.connected {
            tunnels.entry(tunnel.id.as_str()).or_insert(tunnel);
        }
        Self {
            report,
            edges: report.edges.iter().map(|e| (e.id.as_str(), e)).collect(),
            tunnels,
        }
    }
}

/// What an Edge's status is computed from besides its composition.
#[derive(Clone, Copy)]
pub struct Observed<'a> {
    /// The generation of its configuration on the hubs.
    pub generation: u64,
    /// The Edge object's `metadata.generation` this status answers.
    pub object_generation: Option<i64>,
    /// Its current status.
    pub previous: &'a EdgeStatus,
    /// What the hubs report.
    pub reports: &'a [HubView<'a>],
    /// A conflict found outside the composition (its token Secret's name is taken).
    pub token_conflict: Option<&'a Refused>,
    /// Now, RFC 3339.
    pub now: &'a str,
}

/// The status an Edge should have, given its composition and what was observed.
/// Transition times are kept from the previous status where a condition did not change.
pub fn edge_status(composed: &ComposedEdge, observed: &Observed<'_>) -> EdgeStatus {
    let Observed {
        generation,
        previous,
        reports,
        token_conflict,
        ..
    } = *observed;
    let edge = composed.edge.as_ref();
    let id = edge.map(|e| e.id.clone()).ok();
    let on_hubs: Vec<(
        &HubReport,
        Option<&pb::EdgeInfo>,
        Option<&pb::ConnectedEdge>,
    )> = reports
        .iter()
        .filter(|view| !view.report.hub_id.is_empty())
        .map(|view| {
            let id = id.as_deref().unwrap_or_default();
            (
                view.report,
                view.edges.get(id).copied(),
                view.tunnels.get(id).copied(),
            )
        })
        .collect();
    let hubs: Vec<String> = on_hubs
        .iter()
        .filter(|(_, _, tunnel)| tunnel.is_some())
        .map(|(r, _, _)| r.hub_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let public_ip = on_hubs
        .iter()
        .filter_map(|(_, _, tunnel)| tunnel.map(|t| t.public_ip.clone()))
        .find(|ip| !ip.is_empty());

    let connected: Verdict = match (&composed.edge, hubs.is_empty()) {
        (Err(_), _) => (
            "False",
            "NotPushed",
            "the edge is not given to any hub".into(),
        ),
        (Ok(_), false) => (
            "True",
            "TunnelUp",
            format!("tunnels to hub(s) {}", hubs.join(", ")),
        ),
        (Ok(_), true) if reports.iter().all(|v| v.report.unreachable.is_some()) => (
            "Unknown",
            "NoHub",
            "no hub replica is reachable (check the hub admin Service's endpoints)".into(),
        ),
        (Ok(_), true) => (
            "False",
            "NoTunnel",
            "no hub has a tunnel from this edge".into(),
        ),
    };

    let conflict: Verdict = match (&composed.edge, token_conflict) {
        (Err(Refused::Conflict(why)), _) | (_, Some(Refused::Conflict(why))) => {
            ("True", "Conflict", why.clone())
        }
        _ => ("False", "NoConflict", String::new()),
    };

    let refusal = reports.iter().find_map(|v| v.report.refused.clone());
    let mut applied_generation = previous.applied_generation;
    let applied: Verdict = match &composed.edge {
        Err(Refused::Conflict(why)) => ("False", "Conflict", why.clone()),
        Err(Refused::Invalid(why)) => ("False", "Invalid", why.clone()),
        Ok(_) => match refusal {
            Some(error) => ("False", "HubRefused", error),
            None => {
                let tunnels: Vec<&pb::EdgeInfo> = on_hubs
                    .iter()
                    .filter(|(_, _, tunnel)| tunnel.is_some())
                    .filter_map(|(_, info, _)| *info)
                    .collect();
                let rejected = tunnels.iter().find(|i| !i.last_config_error.is_empty());
                let current = |i: &&&pb::EdgeInfo| {
                    i.generation == generation
                        && i.applied_config_version == i.desired_config_version
                };
                if let Some(info) = rejected {
                    ("False", "Rejected", info.last_config_error.clone())
                } else if !tunnels.is_empty() && tunnels.iter().all(|i| current(&i)) {
                    applied_generation = Some(generation);
                    (
                        "True",
                        "Applied",
                        format!("generation {generation} applied"),
                    )
                } else if tunnels.is_empty() {
                    (
                        "Unknown",
                        "NotConnected",
                        format!("generation {generation} waits for the edge to connect"),
                    )
                } else {
                    (
                        "False",
                        "Pending",
                        format!("generation {generation} pushed, not yet acknowledged"),
                    )
                }
            }
        },
    };

    let (listen_ports, listen_ports_udp) = edge
        .map(|e| {
            (
                e.config.listen_ports.clone(),
                e.config.listen_ports_udp.clone(),
            )
        })
        .unwrap_or_default();
    EdgeStatus {
        conditions: [
            ("Connected", connected),
            ("ConfigApplied", applied),
            ("Conflict", conflict),
        ]
        .into_iter()
        .map(|(kind, verdict)| condition(kind, verdict, observed))
        .collect(),
        edge_id: id,
        config_generation: generation,
        config_digest: Some(composed.digest.clone()),
        applied_generation,
        public_ip,
        hubs,
        listen_ports,
        listen_ports_udp,
        token_secret: previous.token_secret.clone(),
    }
}

fn condition(kind: &str, (status, reason, message): Verdict, observed: &Observed<'_>) -> Condition {
    let kept = observed
        .previous
        .conditions
        .iter()
        .find(|c| c.kind == kind && c.status == status)
        .map(|c| c.last_transition_time.clone());
    Condition {
        kind: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: kept.unwrap_or_else(|| observed.now.to_owned()),
        observed_generation: observed.object_generation,
    }
}

/// The ingress points of an exposed Service: the public IPs of the edges that took its ports.
pub fn service_ingress(
    exposure: &Exposure,
    public_ip: impl Fn(&ObjectKey) -> Option<String>,
) -> Vec<LoadBalancerIngress> {
    exposure
        .placements
        .iter()
        .filter(|p| p.refused.is_none())
        .filter_map(|p| public_ip(&p.edge))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip),
            ..LoadBalancerIngress::default()
        })
        .collect()
}
