//! From Kubernetes objects to the hubs' edge set: each Edge's own spec, plus the ports of the
//! `LoadBalancer` Services exposed through it, with port clashes found and refused. An edge id
//! belongs to the oldest Edge that asks for it, and an Edge's targets stay in its namespace
//! unless the platform allows more. Pure: the objects and secrets in, the composition out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use remoteingress_hub::AllowedEdge;
use remoteingress_wire::config::PortTargets;
use sha2::{Digest, Sha256};

use crate::crd::Edge;

/// The `loadBalancerClass` of Services we expose.
pub const LOAD_BALANCER_CLASS: &str = "remoteingress.dev/edge";
/// Service annotation naming the Edges (comma-separated, in its namespace) that expose it.
pub const EDGES_ANNOTATION: &str = "remoteingress.dev/edges";
/// Service annotation with a label selector (`key=value,…`) choosing the Edges that expose it.
pub const EDGE_SELECTOR_ANNOTATION: &str = "remoteingress.dev/edge-selector";

/// An Edge object's place: namespace and name.
pub type ObjectKey = (String, String);

/// Why an Edge is not pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Another object holds what it asks for (its edge id, the name of a Secret it needs):
    /// nothing of it reaches the hubs.
    Conflict(String),
    /// It cannot be built now (a missing Secret, a bad field, a target it may not use); an
    /// edge that was running keeps its last good configuration.
    Invalid(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Conflict(why) | Refused::Invalid(why) => f.write_str(why),
        }
    }
}

/// Which hosts an Edge may name in `targetHosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPolicy {
    /// Only Services of the Edge's own namespace (`web`, `web.<ns>`, `web.<ns>.svc…`); a bare
    /// name is qualified with the namespace, so the hub never resolves it in its own.
    OwnNamespace,
    /// Any host (the platform team's explicit opt-in).
    Any,
}

/// One Edge as the hubs get it, or why it cannot be pushed.
#[derive(Debug, Clone)]
pub struct ComposedEdge {
    /// The Edge object.
    pub key: ObjectKey,
    /// The edge as pushed (generation not yet set), if it is valid.
    pub edge: Result<AllowedEdge, Refused>,
    /// A digest of everything but the secret, to tell when the configuration changes.
    pub digest: String,
}

/// A Service's ports on one edge, or the clash that kept them off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The Edge object.
    pub edge: ObjectKey,
    /// `None` if the ports were assigned; else why not.
    pub refused: Option<String>,
}

/// A Service of our class and where its ports went.
#[derive(Debug, Clone)]
pub struct Exposure {
    /// The Service.
    pub service: ObjectKey,
    /// Each chosen edge, with or without its ports.
    pub placements: Vec<Placement>,
    /// Why the Service cannot be exposed at all (no cluster IP, no usable port).
    pub problem: Option<String>,
}

/// The whole desired state.
#[derive(Debug, Clone, Default)]
pub struct Composition {
    /// Every Edge object, in name order.
    pub edges: Vec<ComposedEdge>,
    /// Every Service of our class, oldest first.
    pub exposures: Vec<Exposure>,
}

/// True for a Service the operator exposes.
pub fn is_ours(service: &Service) -> bool {
    let spec = service.spec.as_ref();
    spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        && spec.and_then(|s| s.load_balancer_class.as_deref()) == Some(LOAD_BALANCER_CLASS)
}

/// The edge id of an Edge object: its spec's, else its name.
pub fn edge_id(edge: &Edge) -> String {
    edge.spec.edge_id.clone().unwrap_or_else(|| edge.name_any())
}

/// Composes the edge set. `secret` gives each Edge's shared secret, or why it has none.
/// An edge id belongs to the oldest Edge asking for it (creation time; of two created in the
/// same second, the one in `owners` — the owners of the previous composition — then the
/// smaller uid); the others are refused as conflicting. Services claim ports oldest first; of two created in the same
/// second, one in `exposed` (exposed by the previous composition) goes first, so a port never
/// moves between them.
pub fn compose(
    edges: &[&Edge],
    services: &[&Service],
    exposed: &HashSet<ObjectKey>,
    owners: &HashSet<ObjectKey>,
    targets: TargetPolicy,
    secret: impl Fn(&Edge) -> Result<String, Refused>,
) -> Composition {
    let mut edges: Vec<&Edge> = edges.to_vec();
    edges.sort_by_key(|e| {
        let key = key_of(*e);
        (
            e.metadata.creation_timestamp.clone(),
            !owners.contains(&key),
            e.uid(),
            key,
        )
    });
    let mut allowed: BTreeMap<ObjectKey, Result<AllowedEdge, Refused>> = BTreeMap::new();
    let mut owner_of: HashMap<String, ObjectKey> = HashMap::new();
    for edge in &edges {
        let key = key_of(*edge);
        let id = edge_id(edge);
        let composed = match owner_of.get(&id) {
            Some(owner) => Err(Refused::Conflict(format!(
                "edge id {id:?} belongs to the older Edge {}/{}",
                owner.0, owner.1
            ))),
            None => {
                owner_of.insert(id.clone(), key.clone());
                own_targets(edge, targets).and_then(|targets| {
                    secret(edge).map(|secret| AllowedEdge {
                        id,
                        secret,
                        config: edge.spec.config.clone(),
                        targets,
                    })
                })
            }
        };
        allowed.insert(key, composed);
    }
    edges.sort_by_key(|e| key_of(*e));

    let mut services: Vec<&Service> = services.iter().copied().filter(|s| is_ours(s)).collect();
    services.sort_by_key(|s| {
        let key = key_of(*s);
        (
            s.metadata.creation_timestamp.clone(),
            !exposed.contains(&key),
            key,
        )
    });
    let mut claims: HashMap<ObjectKey, HashMap<u16, String>> = HashMap::new();
    let mut exposures = Vec::new();
    for service in services {
        exposures.push(expose(service, &edges, &mut allowed, &mut claims));
    }

    let edges = allowed
        .into_iter()
        .map(|(key, edge)| {
            let edge = edge.and_then(|edge| {
                edge.validate()
                    .map_err(|e| Refused::Invalid(e.to_string()))?;
                Ok(edge)
            });
            let digest = digest(&edge);
            ComposedEdge { key, edge, digest }
        })
        .collect();
    Composition { edges, exposures }
}

/// Places one Service's ports on the edges it chooses, refusing an edge where a port is taken.
fn expose(
    service: &Service,
    edges: &[&Edge],
    allowed: &mut BTreeMap<ObjectKey, Result<AllowedEdge, Refused>>,
    claims: &mut HashMap<ObjectKey, HashMap<u16, String>>,
) -> Exposure {
    let key = key_of(service);
    let name = format!("Service {}/{}", key.0, key.1);
    let spec = service.spec.clone().unwrap_or_default();
    let cluster_ip = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None");
    let ports: Vec<(bool, u16)> = spec
        .ports
        .unwrap_or_default()
        .iter()
        .filter_map(|port| {
            let udp = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => false,
                "UDP" => true,
                _ => return None,
            };
            u16::try_from(port.port).ok().map(|p| (udp, p))
        })
        .collect();
    let problem = match (&cluster_ip, ports.is_empty()) {
        (None, _) => Some("the Service has no cluster IP".to_owned()),
        (_, true) => Some("the Service has no TCP or UDP port".to_owned()),
        _ => None,
    };
    let (Some(cluster_ip), None) = (cluster_ip, &problem) else {
        return Exposure {
            service: key,
            placements: Vec::new(),
            problem,
        };
    };
    let mut placements = Vec::new();
    for edge in chosen_edges(service, edges) {
        let edge_key = key_of(edge);
        let Some(Ok(allowed_edge)) = allowed.get_mut(&edge_key) else {
            continue;
        };
        let taken = claims.entry(edge_key.clone()).or_insert_with(|| {
            let config = &allowed_edge.config;
            let own = format!("Edge {}/{}", edge_key.0, edge_key.1);
            config
                .listen_ports
                .iter()
                .chain(&config.listen_ports_udp)
                .map(|port| (*port, own.clone()))
                .collect()
        });
        let clash = ports
            .iter()
            .find_map(|(_, port)| taken.get(port).map(|owner| (*port, owner.clone())));
        if let Some((port, owner)) = clash {
            placements.push(Placement {
                edge: edge_key,
                refused: Some(format!("port {port} is already used by {owner}")),
            });
            continue;
        }
        for (udp, port) in &ports {
            taken.insert(*port, name.clone());
            let config = &mut allowed_edge.config;
            let list = if *udp {
                &mut config.listen_ports_udp
            } else {
                &mut config.listen_ports
            };
            if !list.contains(port) {
                list.push(*port);
            }
            allowed_edge.targets.hosts.insert(*port, cluster_ip.clone());
        }
        placements.push(Placement {
            edge: edge_key,
            refused: None,
        });
    }
    Exposure {
        service: key,
        placements,
        problem: None,
    }
}

/// The Edges of the Service's namespace it chooses: those its annotation names, else those its
/// selector annotation matches, else all of them.
fn chosen_edges<'a>(service: &Service, edges: &[&'a Edge]) -> Vec<&'a Edge> {
    let namespace = service.namespace().unwrap_or_default();
    let annotations = service.annotations();
    let named: Option<BTreeSet<&str>> = annotations.get(EDGES_ANNOTATION).map(|names| {
        names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect()
    });
    let selector: Option<Vec<(&str, &str)>> = annotations.get(EDGE_SELECTOR_ANNOTATION).map(|s| {
        s.split(',')
            .filter_map(|term| term.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect()
    });
    edges
        .iter()
        .copied()
        .filter(|edge| edge.namespace().unwrap_or_default() == namespace)
        .filter(|edge| match (&named, &selector) {
            (Some(named), _) => named.contains(edge.name_any().as_str()),
            (None, Some(selector)) => selector
                .iter()
                .all(|(k, v)| edge.labels().get(*k).map(String::as_str) == Some(*v)),
            (None, None) => true,
        })
        .collect()
}

/// The Edge's own targets under `policy`: bare Service names qualified with its namespace,
/// anything outside its namespace refused unless the policy allows any host.
fn own_targets(edge: &Edge, policy: TargetPolicy) -> Result<PortTargets, Refused> {
    let mut targets = edge.spec.targets.clone();
    if policy == TargetPolicy::Any {
        return Ok(targets);
    }
    let namespace = edge.namespace().unwrap_or_default();
    for (port, host) in targets.hosts.iter_mut() {
        let name = host.trim_end_matches('.');
        let labels: Vec<&str> = name.split('.').collect();
        let in_namespace = name.parse::<std::net::IpAddr>().is_err()
            && match labels.as_slice() {
                [_] => true,
                [_, ns] | [_, ns, "svc", ..] => *ns == namespace,
                _ => false,
            };
        if !in_namespace {
            return Err(Refused::Invalid(format!(
                "targetHosts[{port}]: {host} is not a Service of namespace {namespace}; other \
                 targets need the platform's opt-in (operator --unrestricted-targets)"
            )));
        }
        if labels.len() == 1 {
            *host = format!("{name}.{namespace}.svc");
        }
    }
    Ok(targets)
}

/// The namespace and name of an object.
pub fn key_of(object: &impl ResourceExt) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// A digest of the edge without its secret (or of its error).
fn digest(edge: &Result<AllowedEdge, Refused>) -> String {
    let text = match edge {
        Ok(edge) => serde_json::to_string(&AllowedEdge {
            secret: String::new(),
            ..edge.clone()
        })
        .unwrap_or_default(),
        Err(error) => error.to_string(),
    };
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EdgeSpec;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn edge(name: &str, ports: &[u16]) -> Edge {
        let mut spec: EdgeSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        spec.config.listen_ports = ports.to_vec();
        let mut edge = Edge::new(name, spec);
        edge.metadata.namespace = Some("ns".into());
        edge
    }

    fn service(
        name: &str,
        age: i64,
        ports: &[(&str, i32)],
        annotations: &[(&str, &str)],
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                creation_timestamp: Some(Time(
                    k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_000 + age, 0).unwrap(),
                )),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(LOAD_BALANCER_CLASS.into()),
                cluster_ip: Some(format!("10.96.0.{age}")),
                ports: Some(
                    ports
                        .iter()
                        .map(|(protocol, port)| ServicePort {
                            port: *port,
                            protocol: Some(protocol.to_string()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn secret(_: &Edge) -> Result<String, Refused> {
        Ok("s".into())
    }

    const OWN: TargetPolicy = TargetPolicy::OwnNamespace;

    fn allowed(composition: &Composition, name: &str) -> AllowedEdge {
        composition
            .edges
            .iter()
            .find(|e| e.key.1 == name)
            .and_then(|e| e.edge.clone().ok())
            .unwrap()
    }

    #[test]
    fn a_service_adds_its_ports_with_its_cluster_ip_to_every_edge_of_its_namespace() {
        let (a, b) = (edge("a", &[22]), edge("b", &[]));
        let web = service("web", 5, &[("TCP", 80), ("UDP", 53)], &[]);
        let composition = compose(
            &[&a, &b],
            &[&web],
            &HashSet::new(),
            &HashSet::new(),
            OWN,
            secret,
        );
        for name in ["a", "b"] {
            let edge = allowed(&composition, name);
            assert!(edge.config.listen_ports.contains(&80));
            assert_eq!(edge.config.listen_ports_udp, vec![53]);
            assert_eq!(edge.targets.host(80), Some("10.96.0.5"));
            assert_eq!(edge.targets.port(80), 80);
        }
        assert_eq!(composition.exposures[0].placements.len(), 2);
    }

    #[test]
    fn annotations_choose_the_edges() {
        let (a, mut b) = (edge("a", &[]), edge("b", &[]));
        b.metadata.labels = Some([("tier".to_owned(), "public".to_owned())].into());
        let named = service("named", 1, &[("TCP", 80)], &[(EDGES_ANNOTATION, "a")]);
        let selected = service(
            "selected",
            2,
            &[("TCP", 81)],
            &[(EDGE_SELECTOR_ANNOTATION, "tier=public")],
        );
        let composition = compose(
            &[&a, &b],
            &[&named, &selected],
            &HashSet::new(),
            &HashSet::new(),
            OWN,
            secret,
        );
        assert_eq!(allowed(&composition, "a").config.listen_ports, vec![80]);
        assert_eq!(allowed(&composition, "b").config.listen_ports, vec![81]);
    }

    #[test]
    fn the_younger_of_two_clashing_services_is_refused_on_that_edge_only() {
        let (a, b) = (edge("a", &[443]), edge("b", &[]));
        let old = service("old", 1, &[("TCP", 80)], &[]);
        let young = service("young", 2, &[("TCP", 80)], &[(EDGES_ANNOTATION, "a,b")]);
        let own = service("own", 3, &[("TCP", 443)], &[(EDGES_ANNOTATION, "a")]);
        let composition = compose(
            &[&a, &b],
            &[&young, &own, &old],
            &HashSet::new(),
            &HashSet::new(),
            OWN,
            secret,
        );
        let refused: Vec<_> = composition
            .exposures
            .iter()
            .flat_map(|e| {
                e.placements
                    .iter()
                    .map(move |p| (e.service.1.as_str(), p.edge.1.as_str(), p.refused.clone()))
            })
            .filter(|(_, _, refused)| refused.is_some())
            .collect();
        assert_eq!(
            refused,
            vec![
                (
                    "young",
                    "a",
                    Some("port 80 is already used by Service ns/old".into())
                ),
                (
                    "young",
                    "b",
                    Some("port 80 is already used by Service ns/old".into())
                ),
                (
                    "own",
                    "a",
                    Some("port 443 is already used by Edge ns/a".into())
                ),
            ]
        );
        assert_eq!(
            allowed(&composition, "a").targets.host(80),
            Some("10.96.0.1")
        );
    }

    #[test]
    fn of_two_services_of_the_same_second_the_exposed_one_keeps_its_port() {
        let a = edge("a", &[]);
        let (b_first, a_second) = (
            service("b-first", 1, &[("TCP", 80)], &[]),
            service("a-second", 1, &[("TCP", 80)], &[]),
        );
        let exposed = HashSet::from([("ns".to_owned(), "b-first".to_owned())]);
        let composition = compose(
            &[&a],
            &[&a_second, &b_first],
            &exposed,
            &HashSet::new(),
            OWN,
            secret,
        );
        let refused: Vec<_> = composition
            .exposures
            .iter()
            .filter(|e| e.placements.iter().any(|p| p.refused.is_some()))
            .map(|e| e.service.1.as_str())
            .collect();
        assert_eq!(refused, vec!["a-second"]);
    }

    #[test]
    fn a_duplicate_edge_id_and_an_invalid_edge_are_reported_not_pushed() {
        let a = edge("a", &[80]);
        let mut twin = edge("twin", &[81]);
        twin.spec.edge_id = Some("a".into());
        let mut bad = edge("bad", &[]);
        bad.spec.targets.hosts.insert(80, "not a host".into());
        let composition = compose(
            &[&twin, &a, &bad],
            &[],
            &HashSet::new(),
            &HashSet::new(),
            OWN,
            secret,
        );
        let errors: Vec<_> = composition
            .edges
            .iter()
            .map(|e| {
                (
                    e.key.1.as_str(),
                    e.edge.as_ref().err().map(Refused::to_string),
                )
            })
            .collect();
        assert_eq!(errors[0], ("a", None));
        assert!(
            errors[1].1.as_ref().unwrap().contains("targetHosts[80]"),
            "{errors:?}"
        );
        assert!(
            errors[2]
                .1
                .as_ref()
                .unwrap()
                .contains("belongs to the older Edge ns/a"),
            "{errors:?}"
        );
    }

    #[test]
    fn the_digest_changes_with_the_config_not_with_the_secret() {
        let a = edge("a", &[80]);
        let first = compose(&[&a], &[], &HashSet::new(), &HashSet::new(), OWN, secret).edges[0]
            .digest
            .clone();
        let other_secret = compose(&[&a], &[], &HashSet::new(), &HashSet::new(), OWN, |_| {
            Ok("t".into())
        })
        .edges[0]
            .digest
            .clone();
        let b = edge("a", &[81]);
        let changed = compose(&[&b], &[], &HashSet::new(), &HashSet::new(), OWN, secret).edges[0]
            .digest
            .clone();
        assert_eq!(first, other_secret);
        assert_ne!(first, changed);
    }

    fn created(mut edge: Edge, namespace: &str, at: i64, uid: &str) -> Edge {
        edge.metadata.namespace = Some(namespace.into());
        edge.metadata.creation_timestamp = Some(Time(
            k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_000 + at, 0).unwrap(),
        ));
        edge.metadata.uid = Some(uid.into());
        edge
    }

    #[test]
    fn an_edge_id_belongs_to_the_oldest_edge_whatever_the_names() {
        let mut first = created(edge("first", &[80]), "zz", 1, "u-2");
        first.spec.edge_id = Some("shared".into());
        let mut second = created(edge("second", &[81]), "aa", 2, "u-1");
        second.spec.edge_id = Some("shared".into());
        let mut same_second = created(edge("same-second", &[82]), "aa", 1, "u-3");
        same_second.spec.edge_id = Some("shared".into());
        let composition = compose(
            &[&second, &same_second, &first],
            &[],
            &HashSet::new(),
            &HashSet::new(),
            OWN,
            secret,
        );
        let owner: Vec<_> = composition
            .edges
            .iter()
            .filter(|e| e.edge.is_ok())
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(owner, vec![("zz".to_owned(), "first".to_owned())]);
        // Of two of the same second, the owner so far keeps the id.
        let owners = HashSet::from([("aa".to_owned(), "same-second".to_owned())]);
        let kept = compose(
            &[&first, &same_second],
            &[],
            &HashSet::new(),
            &owners,
            OWN,
            secret,
        );
        assert!(kept
            .edges
            .iter()
            .any(|e| e.key.1 == "same-second" && e.edge.is_ok()));
        for loser in ["second", "same-second"] {
            let refused = composition.edges.iter().find(|e| e.key.1 == loser).unwrap();
            assert!(
                matches!(&refused.edge, Err(Refused::Conflict(why)) if why.contains("zz/first")),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn targets_stay_in_the_edges_namespace_unless_the_platform_allows_more() {
        let with_target = |host: &str| {
            let mut edge = edge("a", &[80]);
            edge.spec.targets.hosts.insert(80, host.into());
            edge
        };
        for (host, pushed) in [
            ("web", "web.ns.svc"),
            ("web.ns", "web.ns"),
            ("web.ns.svc", "web.ns.svc"),
            ("web.ns.svc.cluster.local", "web.ns.svc.cluster.local"),
        ] {
            let edge = with_target(host);
            let composition = compose(&[&edge], &[], &HashSet::new(), &HashSet::new(), OWN, secret);
            assert_eq!(
                allowed(&composition, "a").targets.host(80),
                Some(pushed),
                "{host}"
            );
        }
        for host in [
            "db.other",
            "db.other.svc",
            "169.254.169.254",
            "127.0.0.1",
            "example.com",
        ] {
            let edge = with_target(host);
            let composition = compose(&[&edge], &[], &HashSet::new(), &HashSet::new(), OWN, secret);
            assert!(
                matches!(&composition.edges[0].edge, Err(Refused::Invalid(why)) if why.contains("not a Service of namespace ns")),
                "{host}: {:?}",
                composition.edges[0].edge
            );
            let any = compose(
                &[&edge],
                &[],
                &HashSet::new(),
                &HashSet::new(),
                TargetPolicy::Any,
                secret,
            );
            assert_eq!(allowed(&any, "a").targets.host(80), Some(host), "{host}");
        }
    }
}
