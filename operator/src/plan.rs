//! One pass's decisions, made without I/O from what the caches and the hubs show and what
//! earlier passes did: the edge set to push, and the statuses, Events and connection tokens to
//! write. `Operator` executes a plan; everything here is tested on its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, ObjectReference, Service};
use kube::{Resource, ResourceExt};
use remoteingress_controlplane::{edge_to_proto, pb};

use crate::compose::{self, compose, key_of, ObjectKey, Refused, TargetPolicy};
use crate::crd::{Edge, EdgeStatus};
use crate::hubs::HubReport;
use crate::{secrets, status};

/// What earlier passes did, carried into the next.
#[derive(Debug, Default)]
pub struct Memory {
    /// The configuration last pushed for each Edge.
    pub pushed: HashMap<ObjectKey, pb::Edge>,
    /// The secret digest each Edge's token Secret was last written for.
    pub tokens: HashMap<ObjectKey, String>,
    /// Edges whose token Secret's name is taken by a Secret that is not theirs.
    pub token_conflicts: HashMap<ObjectKey, Refused>,
    /// Events already published (object uid and message), so each is told once.
    pub told: HashSet<(String, String)>,
    /// The Services that had ports on an edge after the last pass.
    exposed: HashSet<ObjectKey>,
    /// The Edges that owned their edge id after the last pass.
    owners: HashSet<ObjectKey>,
}

impl Memory {
    /// Takes the plan's owners and exposures and forgets what concerns objects that are gone.
    pub fn follow(&mut self, plan: &Plan) {
        self.exposed.clone_from(&plan.exposed);
        self.owners.clone_from(&plan.owners);
        let current: HashSet<&ObjectKey> = plan.statuses.iter().map(|s| &s.key).collect();
        self.tokens.retain(|key, _| current.contains(key));
        self.token_conflicts.retain(|key, _| current.contains(key));
        self.told.retain(|(uid, _)| plan.uids.contains(uid));
    }
}

/// What one pass sees.
pub struct Seen<'a> {
    /// The Edges.
    pub edges: &'a [Arc<Edge>],
    /// The Services (those of other classes are ignored).
    pub services: &'a [Arc<Service>],
    /// Each Edge's shared secret, or why it has none.
    pub secrets: &'a HashMap<ObjectKey, Result<String, Refused>>,
    /// What each hub last reported, by admin address.
    pub hubs: &'a BTreeMap<SocketAddr, HubReport>,
    /// Which hosts an Edge may target.
    pub targets: TargetPolicy,
    /// Now, in milliseconds since the epoch.
    pub now_ms: u64,
    /// Now, RFC 3339.
    pub now: &'a str,
}

/// When an Edge's status is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Before the push: it records a new configuration generation, and the Edge's new
    /// configuration is pushed only once it is written.
    First,
    /// After the push: it changed, its generation did not.
    Then,
    /// Not at all: unchanged.
    Unchanged,
}

/// An Edge's status as it should be, and its configuration to push.
#[derive(Debug)]
pub struct PlannedStatus {
    /// The Edge.
    pub key: ObjectKey,
    /// Its status.
    pub status: EdgeStatus,
    /// When it is written.
    pub write: Write,
    /// Its configuration with its generation; `None` when it cannot be composed now.
    configuration: Option<pb::Edge>,
}

/// A warning Event to publish.
#[derive(Debug, PartialEq)]
pub struct Warning {
    /// The object it is about.
    pub object: ObjectReference,
    /// A CamelCase word for why.
    pub reason: &'static str,
    /// What the operator was doing.
    pub action: &'static str,
    /// Details for people.
    pub message: String,
}

impl Warning {
    /// The key under which `Memory::told` remembers it.
    pub fn told(&self) -> (String, String) {
        (
            self.object.uid.clone().unwrap_or_default(),
            self.message.clone(),
        )
    }
}

/// A connection token to get from a hub and write to the Edge's token Secret.
#[derive(Debug)]
pub struct TokenWrite {
    /// The Edge.
    pub edge: Arc<Edge>,
    /// The edge id.
    pub edge_id: String,
    /// The edge's shared secret.
    pub secret: String,
}

impl TokenWrite {
    /// The Edge's key.
    pub fn key(&self) -> ObjectKey {
        key_of(self.edge.as_ref())
    }

    /// The digest `Memory::tokens` records once it is written.
    pub fn digest(&self) -> String {
        secrets::digest(&self.secret)
    }
}

/// A Service's `status.loadBalancer.ingress` to write.
#[derive(Debug, PartialEq)]
pub struct IngressWrite {
    /// The Service.
    pub service: ObjectKey,
    /// Its ingress points.
    pub ingress: Vec<LoadBalancerIngress>,
}

/// Everything one pass decided.
#[derive(Debug)]
pub struct Plan {
    /// Every Edge's status, written or not.
    pub statuses: Vec<PlannedStatus>,
    /// Services whose ingress changed.
    pub ingresses: Vec<IngressWrite>,
    /// Warnings not told before.
    pub events: Vec<Warning>,
    /// Connection tokens to write, each made by `token_hub`.
    pub tokens: Vec<TokenWrite>,
    /// A hub that answered its last call: it makes the tokens of the edges it holds.
    pub token_hub: Option<SocketAddr>,
    /// The Services with ports on an edge.
    exposed: HashSet<ObjectKey>,
    /// The Edges that own their edge id (all but those in conflict).
    owners: HashSet<ObjectKey>,
    /// The uids of the Edges and Services seen.
    uids: HashSet<String>,
}

/// The edge set the hubs should hold, and the configuration it holds for each Edge.
#[derive(Debug, PartialEq)]
pub struct Push {
    /// The edges, one per id.
    pub edges: Vec<pb::Edge>,
    /// The configuration pushed for each Edge (`Memory::pushed` from now on).
    pub pushed: HashMap<ObjectKey, pb::Edge>,
}

impl Plan {
    /// The edge set to push once the statuses that record generations are written, given the
    /// Edges whose record failed (`unrecorded`): those keep their last pushed configuration.
    /// `None` if one of them was never pushed: the hubs would drop its edge, so nothing is
    /// pushed this pass. An Edge in conflict has nothing pushed, and no edge id is pushed
    /// twice: a kept configuration gives way to the Edge that owns its id now.
    pub fn push(
        &self,
        unrecorded: &HashSet<ObjectKey>,
        before: &HashMap<ObjectKey, pb::Edge>,
    ) -> Option<Push> {
        let held_back = self.statuses.iter().any(|s| {
            s.configuration.is_some() && unrecorded.contains(&s.key) && !before.contains_key(&s.key)
        });
        if held_back {
            return None;
        }
        let mut pushed: HashMap<ObjectKey, pb::Edge> = before
            .iter()
            .filter(|(key, _)| self.owners.contains(*key))
            .map(|(key, edge)| (key.clone(), edge.clone()))
            .collect();
        let mut by_id = BTreeMap::new();
        let mut fresh = HashSet::new();
        for planned in &self.statuses {
            if let Some(edge) = planned.configuration.as_ref() {
                if !unrecorded.contains(&planned.key) {
                    pushed.insert(planned.key.clone(), edge.clone());
                    by_id.insert(edge.id.clone(), edge.clone());
                    fresh.insert(&planned.key);
                }
            }
        }
        for (key, kept) in &pushed {
            if !fresh.contains(key) {
                by_id.entry(kept.id.clone()).or_insert_with(|| kept.clone());
            }
        }
        Some(Push {
            edges: by_id.into_values().collect(),
            pushed,
        })
    }
}

/// Decides one pass. An Edge whose composed configuration changed (or that never had a
/// generation) gets a new generation above its status's, above any the hubs report for its
/// edge id and at least the time in milliseconds, so that it never goes backwards for an edge
/// id: not when its Edge is recreated, nor when its status is lost.
pub fn plan(seen: &Seen<'_>, memory: &Memory) -> Plan {
    let edges: Vec<&Edge> = seen.edges.iter().map(AsRef::as_ref).collect();
    let services: Vec<&Service> = seen.services.iter().map(AsRef::as_ref).collect();
    let composition = compose(
        &edges,
        &services,
        &memory.exposed,
        &memory.owners,
        seen.targets,
        |edge| {
            seen.secrets
                .get(&key_of(edge))
                .cloned()
                .unwrap_or_else(|| Err(Refused::Invalid("no secret".into())))
        },
    );
    let reports: Vec<status::HubView> = seen.hubs.values().map(status::HubView::new).collect();
    // The highest generation any hub holds for each edge id.
    let mut reported: HashMap<&str, u64> = HashMap::new();
    for info in seen.hubs.values().flat_map(|r| &r.edges) {
        let highest = reported.entry(info.id.as_str()).or_default();
        *highest = (*highest).max(info.generation);
    }
    let objects: HashMap<ObjectKey, &Arc<Edge>> =
        seen.edges.iter().map(|e| (key_of(e.as_ref()), e)).collect();
    let mut events = Vec::new();
    let mut warn = |object: ObjectReference, reason, action, message: String| {
        let warning = Warning {
            object,
            reason,
            action,
            message,
        };
        if !memory.told.contains(&warning.told()) && !events.contains(&warning) {
            events.push(warning);
        }
    };

    let mut statuses = Vec::new();
    for composed in &composition.edges {
        let Some(edge) = objects.get(&composed.key) else {
            continue;
        };
        let previous = edge.status.clone().unwrap_or_default();
        let changed = previous.config_digest.as_deref() != Some(composed.digest.as_str())
            || previous.config_generation == 0;
        let generation = if changed {
            let held = reported
                .get(compose::edge_id(edge).as_str())
                .copied()
                .unwrap_or(0);
            (previous.config_generation.max(held) + 1).max(seen.now_ms)
        } else {
            previous.config_generation
        };
        let token_conflict = memory.token_conflicts.get(&composed.key);
        let observed = status::Observed {
            generation,
            object_generation: edge.metadata.generation,
            previous: &previous,
            reports: &reports,
            token_conflict,
            now: seen.now,
        };
        let mut status = status::edge_status(composed, &observed);
        if composed.edge.is_ok() && token_conflict.is_none() {
            status.token_secret = Some(secrets::token_secret_name(&composed.key.1));
        }
        for conflict in [composed.edge.as_ref().err(), token_conflict]
            .into_iter()
            .flatten()
        {
            if let Refused::Conflict(why) = conflict {
                warn(edge.object_ref(&()), "Conflict", "Compose", why.clone());
            }
        }
        let write = if changed {
            Write::First
        } else if status != previous {
            Write::Then
        } else {
            Write::Unchanged
        };
        let configuration = composed.edge.clone().ok().map(|allowed| pb::Edge {
            generation: Some(generation),
            ..edge_to_proto(allowed)
        });
        statuses.push(PlannedStatus {
            key: composed.key.clone(),
            status,
            write,
            configuration,
        });
    }

    let public_ips: HashMap<&ObjectKey, &String> = statuses
        .iter()
        .filter_map(|s| Some((&s.key, s.status.public_ip.as_ref()?)))
        .collect();
    let services_by_key: HashMap<ObjectKey, &Service> =
        services.iter().map(|s| (key_of(*s), *s)).collect();
    let mut ingresses = Vec::new();
    for exposure in &composition.exposures {
        let Some(service) = services_by_key.get(&exposure.service) else {
            continue;
        };
        let ingress = status::service_ingress(exposure, |edge| {
            public_ips.get(edge).map(|ip| (*ip).clone())
        });
        let current = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        let ips = |ingress: &[LoadBalancerIngress]| {
            ingress.iter().map(|i| i.ip.clone()).collect::<Vec<_>>()
        };
        if ips(&current) != ips(&ingress) {
            ingresses.push(IngressWrite {
                service: exposure.service.clone(),
                ingress,
            });
        }
        let refusals = exposure.placements.iter().filter_map(|p| {
            let why = p.refused.as_ref()?;
            Some((
                "PortClash",
                format!("not exposed on Edge {}: {why}", p.edge.1),
            ))
        });
        let problems = exposure
            .problem
            .iter()
            .map(|problem| ("NotExposed", problem.clone()))
            .chain(refusals);
        for (reason, message) in problems {
            warn(service.object_ref(&()), reason, "Expose", message);
        }
    }

    let ready_hub = seen
        .hubs
        .iter()
        .find(|(_, r)| r.unreachable.is_none() && r.refused.is_none());
    let mut tokens = Vec::new();
    if let Some((_, report)) = ready_hub {
        let held: HashSet<&str> = report.edges.iter().map(|e| e.id.as_str()).collect();
        for composed in &composition.edges {
            let (Ok(allowed), Some(Ok(secret)), Some(edge)) = (
                &composed.edge,
                seen.secrets.get(&composed.key),
                objects.get(&composed.key),
            ) else {
                continue;
            };
            let written = memory.tokens.get(&composed.key) == Some(&secrets::digest(secret));
            if held.contains(allowed.id.as_str()) && !written {
                tokens.push(TokenWrite {
                    edge: Arc::clone(edge),
                    edge_id: allowed.id.clone(),
                    secret: secret.clone(),
                });
            }
        }
    }

    let exposed = composition
        .exposures
        .iter()
        .filter(|e| e.placements.iter().any(|p| p.refused.is_none()))
        .map(|e| e.service.clone())
        .collect();
    let owners = composition
        .edges
        .iter()
        .filter(|c| !matches!(c.edge, Err(Refused::Conflict(_))))
        .map(|c| c.key.clone())
        .collect();
    let uids = edges
        .iter()
        .filter_map(|e| e.uid())
        .chain(services.iter().filter_map(|s| s.uid()))
        .collect();
    Plan {
        statuses,
        ingresses,
        events,
        tokens,
        token_hub: ready_hub.map(|(hub, _)| *hub),
        exposed,
        owners,
        uids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EdgeSpec;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    const NOW_MS: u64 = 1_800_000_000_000;
    const HUB: &str = "10.0.0.1:9000";

    fn edge(namespace: &str, name: &str, age: i64, spec: serde_json::Value) -> Arc<Edge> {
        let spec: EdgeSpec = serde_json::from_value(spec).unwrap();
        let mut edge = Edge::new(name, spec);
        edge.metadata.namespace = Some(namespace.into());
        edge.metadata.uid = Some(format!("uid-{namespace}-{name}"));
        edge.metadata.creation_timestamp = Some(Time(
            k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_000 + age, 0).unwrap(),
        ));
        Arc::new(edge)
    }

    fn web_service() -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("team".into()),
                uid: Some("uid-web".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(compose::LOAD_BALANCER_CLASS.into()),
                cluster_ip: Some("10.96.0.7".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    /// A hub that answers and holds `edges` (id, generation), with tunnels from those given
    /// a public IP.
    fn hub(edges: &[(&str, u64)], tunnels: &[(&str, &str)]) -> BTreeMap<SocketAddr, HubReport> {
        let report = HubReport {
            hub_id: "hub-0".into(),
            edges: edges
                .iter()
                .map(|(id, generation)| pb::EdgeInfo {
                    id: (*id).into(),
                    generation: *generation,
                    ..pb::EdgeInfo::default()
                })
                .collect(),
            connected: tunnels
                .iter()
                .map(|(id, ip)| pb::ConnectedEdge {
                    id: (*id).into(),
                    public_ip: (*ip).into(),
                    ..pb::ConnectedEdge::default()
                })
                .collect(),
            ..HubReport::default()
        };
        BTreeMap::from([(HUB.parse().unwrap(), report)])
    }

    struct World {
        edges: Vec<Arc<Edge>>,
        services: Vec<Arc<Service>>,
        secrets: HashMap<ObjectKey, Result<String, Refused>>,
        hubs: BTreeMap<SocketAddr, HubReport>,
    }

    impl World {
        fn new(edges: Vec<Arc<Edge>>) -> Self {
            let secrets = edges
                .iter()
                .map(|e| (key_of(e.as_ref()), Ok("s3cret".to_owned())))
                .collect();
            Self {
                edges,
                services: Vec::new(),
                secrets,
                hubs: BTreeMap::new(),
            }
        }

        fn plan(&self, memory: &Memory) -> Plan {
            plan(
                &Seen {
                    edges: &self.edges,
                    services: &self.services,
                    secrets: &self.secrets,
                    hubs: &self.hubs,
                    targets: TargetPolicy::OwnNamespace,
                    now_ms: NOW_MS,
                    now: "2027-01-15T08:00:00Z",
                },
                memory,
            )
        }

        /// Gives each Edge the status the plan wants, as if every write succeeded.
        fn written(&mut self, plan: &Plan) {
            for edge in &mut self.edges {
                let key = key_of(edge.as_ref());
                if let Some(planned) = plan.statuses.iter().find(|s| s.key == key) {
                    Arc::make_mut(edge).status = Some(planned.status.clone());
                }
            }
        }
    }

    fn key(namespace: &str, name: &str) -> ObjectKey {
        (namespace.into(), name.into())
    }

    fn planned<'a>(plan: &'a Plan, name: &str) -> &'a PlannedStatus {
        plan.statuses.iter().find(|s| s.key.1 == name).unwrap()
    }

    #[test]
    fn a_new_edge_records_its_generation_before_its_configuration_is_pushed() {
        let world = World::new(vec![edge(
            "team",
            "a",
            0,
            serde_json::json!({"listenPorts": [80]}),
        )]);
        let plan = world.plan(&Memory::default());
        let a = planned(&plan, "a");
        assert_eq!(a.write, Write::First);
        assert_eq!(a.status.config_generation, NOW_MS);

        let push = plan.push(&HashSet::new(), &HashMap::new()).unwrap();
        assert_eq!(push.edges.len(), 1);
        assert_eq!(push.edges[0].generation, Some(NOW_MS));
        assert_eq!(push.pushed[&key("team", "a")], push.edges[0]);

        let unrecorded = HashSet::from([key("team", "a")]);
        assert_eq!(
            plan.push(&unrecorded, &HashMap::new()),
            None,
            "an edge never pushed whose generation is not recorded holds the push back"
        );
    }

    #[test]
    fn an_unchanged_edge_keeps_its_generation_and_writes_nothing() {
        let mut world = World::new(vec![edge(
            "team",
            "a",
            0,
            serde_json::json!({"listenPorts": [80]}),
        )]);
        let first = world.plan(&Memory::default());
        world.written(&first);
        let again = world.plan(&Memory::default());
        let a = planned(&again, "a");
        assert_eq!(a.write, Write::Unchanged);
        assert_eq!(a.status.config_generation, NOW_MS);

        world.hubs = hub(&[("a", NOW_MS)], &[("a", "203.0.113.9")]);
        let connected = world.plan(&Memory::default());
        let a = planned(&connected, "a");
        assert_eq!(
            a.write,
            Write::Then,
            "the status changed, not the configuration"
        );
        assert_eq!(a.status.public_ip.as_deref(), Some("203.0.113.9"));
    }

    #[test]
    fn generations_rise_above_what_the_hubs_hold_when_an_edge_is_recreated() {
        let mut world = World::new(vec![edge("team", "a", 0, serde_json::json!({}))]);
        world.hubs = hub(&[("a", NOW_MS + 500)], &[]);
        let plan = world.plan(&Memory::default());
        assert_eq!(planned(&plan, "a").status.config_generation, NOW_MS + 501);
    }

    #[test]
    fn an_edge_whose_record_failed_keeps_its_last_pushed_configuration() {
        let mut world = World::new(vec![edge(
            "team",
            "a",
            0,
            serde_json::json!({"listenPorts": [80]}),
        )]);
        let first = world.plan(&Memory::default());
        let pushed = first.push(&HashSet::new(), &HashMap::new()).unwrap().pushed;
        world.written(&first);
        Arc::make_mut(&mut world.edges[0]).spec.config.listen_ports = vec![81];
        let changed = world.plan(&Memory::default());
        assert_eq!(planned(&changed, "a").write, Write::First);

        let unrecorded = HashSet::from([key("team", "a")]);
        let push = changed.push(&unrecorded, &pushed).unwrap();
        assert_eq!(push.edges[0].listen_ports, vec![80], "the last pushed");
        let push = changed.push(&HashSet::new(), &pushed).unwrap();
        assert_eq!(push.edges[0].listen_ports, vec![81]);
    }

    #[test]
    fn a_younger_edge_claiming_a_taken_id_is_left_out_and_told_once() {
        let older = edge("zz", "first", 0, serde_json::json!({"edgeId": "shared"}));
        let younger = edge("aa", "second", 5, serde_json::json!({"edgeId": "shared"}));
        let world = World::new(vec![younger, older]);
        let mut memory = Memory::default();
        let plan = world.plan(&memory);
        let push = plan.push(&HashSet::new(), &HashMap::new()).unwrap();
        assert_eq!(push.edges.len(), 1);
        assert!(push.pushed.contains_key(&key("zz", "first")));
        assert_eq!(plan.events.len(), 1);
        assert_eq!(plan.events[0].reason, "Conflict");
        assert_eq!(plan.events[0].object.name.as_deref(), Some("second"));
        let conflict = planned(&plan, "second")
            .status
            .conditions
            .iter()
            .find(|c| c.kind == "Conflict")
            .unwrap();
        assert_eq!(conflict.status, "True");

        memory.follow(&plan);
        for warning in &plan.events {
            memory.told.insert(warning.told());
        }
        assert!(world.plan(&memory).events.is_empty(), "told once");
    }

    #[test]
    fn tokens_are_written_once_per_secret_when_a_hub_holds_the_edge() {
        let mut world = World::new(vec![edge("team", "a", 0, serde_json::json!({}))]);
        let mut memory = Memory::default();
        assert!(world.plan(&memory).tokens.is_empty(), "no hub has it yet");

        world.hubs = hub(&[("a", NOW_MS)], &[]);
        let plan = world.plan(&memory);
        assert_eq!(plan.tokens.len(), 1);
        let token = &plan.tokens[0];
        assert_eq!(plan.token_hub, Some(HUB.parse().unwrap()));
        assert_eq!(
            (token.edge_id.as_str(), token.secret.as_str()),
            ("a", "s3cret")
        );
        memory.tokens.insert(token.key(), token.digest());
        assert!(
            world.plan(&memory).tokens.is_empty(),
            "written for this secret"
        );

        world.secrets.insert(key("team", "a"), Ok("rotated".into()));
        assert_eq!(
            world.plan(&memory).tokens.len(),
            1,
            "a new secret, a new token"
        );
    }

    #[test]
    fn a_service_gets_the_public_ips_of_the_edges_that_took_its_ports() {
        let mut world = World::new(vec![edge("team", "a", 0, serde_json::json!({}))]);
        world.services = vec![web_service()];
        let plan = world.plan(&Memory::default());
        assert!(plan.ingresses.is_empty(), "no public IP known yet");
        assert_eq!(
            planned(&plan, "a")
                .configuration
                .as_ref()
                .unwrap()
                .listen_ports,
            vec![80]
        );

        world.hubs = hub(&[("a", NOW_MS)], &[("a", "203.0.113.9")]);
        let plan = world.plan(&Memory::default());
        assert_eq!(plan.ingresses.len(), 1);
        assert_eq!(plan.ingresses[0].service, key("team", "web"));
        assert_eq!(
            plan.ingresses[0].ingress[0].ip.as_deref(),
            Some("203.0.113.9")
        );
    }
}
