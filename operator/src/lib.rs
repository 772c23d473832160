//! Kubernetes operator: turns `Edge` resources and `LoadBalancer` Services of our class into
//! hub configuration, pushed to every hub replica through the admin API, and writes status back.
//! Kubernetes is the store: the operator keeps nothing of its own but caches.

pub mod compose;
pub mod crd;
mod hubs;
pub mod leader;
pub mod metrics;
mod secrets;
mod status;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use remoteingress_controlplane::{edge_to_proto, pb};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use compose::{compose, key_of, Composition, ObjectKey, Refused};
pub use compose::{TargetPolicy, LOAD_BALANCER_CLASS};
use crd::{Edge, EdgeStatus};
pub use hubs::HubTransport;
use hubs::{BearerToken, DesiredEdges, HubAccess, HubSync, Reports};

/// The field manager and event reporter name.
const MANAGER: &str = "remoteingress-operator";

/// How the operator finds the hubs and what it serves.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// The namespace whose Edges and Services are served; all namespaces when `None`.
    pub namespace: Option<String>,
    /// The namespace of the hub Service.
    pub hub_namespace: String,
    /// The hub Service whose EndpointSlices list the hub replicas' admin API.
    pub hub_service: String,
    /// The name of the admin API port in those EndpointSlices.
    pub hub_admin_port: String,
    /// The hubs' admin bearer token.
    pub hub_token: Option<String>,
    /// How the hubs' admin API is reached: TLS verified by a CA, or plain when allowed.
    pub hub_transport: HubTransport,
    /// How often everything is reconciled and hub reports refreshed without a change.
    pub resync: Duration,
    /// Which hosts an Edge may name in `targetHosts` (by default Services of its namespace).
    pub targets: TargetPolicy,
    /// Run only while holding this Lease (several replicas); `None`: always (one replica).
    pub leader_election: Option<leader::LeaderElection>,
    /// Where passes, failures, hubs and Edges are counted.
    pub metrics: metrics::OperatorMetrics,
    /// What the readiness probe reports.
    pub health: metrics::Health,
}

/// Why the operator stopped.
#[derive(Debug, Error)]
pub enum OperatorError {
    /// An option is unusable.
    #[error("{0}")]
    Config(String),
    /// The Kubernetes API failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// Another replica holds the leader Lease now.
    #[error("lost the leader lease; stopping so that only the new leader writes")]
    LostLeadership,
}

/// Runs the operator until `shutdown` — with leader election, from when it holds the Lease
/// until then, or until it loses the Lease (an error).
pub async fn run(
    client: Client,
    options: OperatorOptions,
    shutdown: CancellationToken,
) -> Result<(), OperatorError> {
    // A stand-by replica is ready: it works, and waits to take over.
    options.health.set(true);
    let stop = match &options.leader_election {
        Some(election) => match election.lead(&client, &shutdown).await {
            Some(leading) => leading,
            None => return Ok(()),
        },
        None => shutdown.clone(),
    };
    options.health.set(false);
    options.metrics.leading(true);
    let access = HubAccess {
        transport: options.hub_transport.clone(),
        token: BearerToken::new(options.hub_token.as_deref())?,
    };
    let wake = Arc::new(Notify::new());
    let edges: Api<Edge> = scoped(&client, options.namespace.as_deref());
    let services: Api<Service> = scoped(&client, options.namespace.as_deref());
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &options.hub_namespace);
    let slice_config = watcher::Config::default().labels(&format!(
        "kubernetes.io/service-name={}",
        options.hub_service
    ));
    let watching = Watching {
        wake: wake.clone(),
        health: options.health.clone(),
        synced: Arc::default(),
        stop: stop.clone(),
    };
    let edge_store = mirror(edges, watcher::Config::default(), &watching);
    let service_store = mirror(services, watcher::Config::default(), &watching);
    let slice_store = mirror(slices, slice_config, &watching);
    let secrets_api: Api<Secret> = scoped(&client, options.namespace.as_deref());
    let secret_config = watcher::Config::default().labels(secrets::SECRET_LABEL);
    let secret_store = mirror(secrets_api, secret_config, &watching);
    for ready in [
        edge_store.wait_until_ready().await,
        service_store.wait_until_ready().await,
        slice_store.wait_until_ready().await,
        secret_store.wait_until_ready().await,
    ] {
        ready.map_err(|e| {
            OperatorError::Config(format!("a watch ended before it was ready: {e}"))
        })?;
    }
    watching
        .synced
        .store(true, std::sync::atomic::Ordering::Relaxed);
    options.health.set(true);
    tracing::info!(namespace = ?options.namespace, hub_service = %options.hub_service, "operator watching");

    let (desired, desired_rx) = watch::channel(DesiredEdges::default());
    let sync = HubSync {
        desired: desired_rx,
        reports: Reports::default(),
        changed: wake.clone(),
        access,
        refresh: options.resync,
    };
    let mut operator = Operator {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        options,
        edge_store,
        service_store,
        slice_store,
        secret_store,
        desired,
        sync,
        hubs: HashMap::new(),
        tokens: HashMap::new(),
        token_conflicts: HashMap::new(),
        told: HashSet::new(),
        pushed: HashMap::new(),
        exposed: HashSet::new(),
        owners: HashSet::new(),
    };
    loop {
        operator.reconcile().await;
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(operator.options.resync) => {}
            () = stop.cancelled() => break,
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for hub in operator.hubs.values() {
        hub.cancel();
    }
    operator.options.metrics.leading(false);
    if shutdown.is_cancelled() {
        if let Some(election) = &operator.options.leader_election {
            election.release(&operator.client).await;
        }
        Ok(())
    } else {
        Err(OperatorError::LostLeadership)
    }
}

/// Merge-patches an object's status subresource with `status`.
async fn patch_status<K>(
    api: &Api<K>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

/// What every watch shares: whom a change wakes, where its health goes, when it stops.
struct Watching {
    wake: Arc<Notify>,
    health: metrics::Health,
    /// Set once every cache is filled; until then no event makes the operator ready.
    synced: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
}

/// A cache of `api`'s objects, kept current by a watch; each change wakes the operator, and a
/// watch error makes it unready until the next event.
fn mirror<K>(api: Api<K>, config: watcher::Config, watching: &Watching) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let wake = watching.wake.clone();
    let health = watching.health.clone();
    let stop = watching.stop.clone();
    let synced = watching.synced.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(_)) => {
                        if synced.load(std::sync::atomic::Ordering::Relaxed) {
                            health.set(true);
                        }
                        wake.notify_one();
                    }
                    Some(Err(error)) => {
                        health.set(false);
                        tracing::warn!(%error, "watch");
                    }
                    None => break,
                },
                () = stop.cancelled() => break,
            }
        }
    });
    store
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

struct Operator {
    client: Client,
    options: OperatorOptions,
    recorder: Recorder,
    edge_store: Store<Edge>,
    service_store: Store<Service>,
    slice_store: Store<EndpointSlice>,
    /// The Secrets labelled for the operator.
    secret_store: Store<Secret>,
    desired: watch::Sender<DesiredEdges>,
    sync: HubSync,
    /// A task per hub admin address.
    hubs: HashMap<SocketAddr, CancellationToken>,
    /// The secret digest each Edge's token Secret was last written for.
    tokens: HashMap<ObjectKey, String>,
    /// Edges whose token Secret's name is taken by a Secret that is not theirs.
    token_conflicts: HashMap<ObjectKey, Refused>,
    /// Events already published (object uid and message), so each is told once.
    told: HashSet<(String, String)>,
    /// The configuration last pushed for each Edge.
    pushed: HashMap<ObjectKey, pb::Edge>,
    /// The Services that had ports on an edge after the last pass.
    exposed: HashSet<ObjectKey>,
    /// The Edges that owned their edge id after the last pass.
    owners: HashSet<ObjectKey>,
}

impl Operator {
    /// One pass: desired set, hubs, statuses, tokens, Services.
    /// A pass that cannot read the Secrets pushes nothing (the hubs keep what they have) and is
    /// retried at the next wake-up or resync; an Edge whose generation cannot be recorded keeps
    /// its last pushed configuration while the others go on (an Edge that has none yet holds
    /// the push back). Hub tasks start only after the
    /// first complete push, so a hub never gets a set that is not the whole truth.
    async fn reconcile(&mut self) {
        let _timer = self.options.metrics.pass();
        let edges = self.edge_store.state();
        let services = self.service_store.state();
        let secrets = match secrets::edge_secrets(&self.client, &edges, &self.secret_store).await {
            Ok(secrets) => secrets,
            Err(error) => {
                self.options.metrics.failed("secrets");
                tracing::warn!(%error, "reading the edges' Secrets; retrying");
                return;
            }
        };
        let composition = compose(
            &edges.iter().map(|e| e.as_ref()).collect::<Vec<_>>(),
            &services.iter().map(|s| s.as_ref()).collect::<Vec<_>>(),
            &self.exposed,
            &self.owners,
            self.options.targets,
            |edge| {
                secrets
                    .get(&key_of(edge))
                    .cloned()
                    .unwrap_or_else(|| Err(Refused::Invalid("no secret".into())))
            },
        );
        self.exposed = composition
            .exposures
            .iter()
            .filter(|e| e.placements.iter().any(|p| p.refused.is_none()))
            .map(|e| e.service.clone())
            .collect();
        self.owners = composition
            .edges
            .iter()
            .filter(|c| !matches!(c.edge, Err(Refused::Conflict(_))))
            .map(|c| c.key.clone())
            .collect();
        let objects: HashMap<ObjectKey, &Edge> = edges
            .iter()
            .map(|e| (key_of(e.as_ref()), e.as_ref()))
            .collect();
        let reports: Vec<hubs::HubReport> = self
            .sync
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        self.options.metrics.hubs(&reports);
        let generations = self.generations(&objects, &composition, &reports).await;
        // An Edge with neither a generation now nor a configuration pushed before would be
        // missing from the set, and the hubs would drop its edge: push nothing this pass.
        let incomplete = composition.edges.iter().any(|c| {
            c.edge.is_ok() && !generations.contains_key(&c.key) && !self.pushed.contains_key(&c.key)
        });
        if incomplete {
            return;
        }
        self.push(&composition, &generations);
        self.follow_hubs();
        let uids: HashSet<String> = edges
            .iter()
            .filter_map(|e| e.uid())
            .chain(services.iter().filter_map(|s| s.uid()))
            .collect();
        self.told.retain(|(uid, _)| uids.contains(uid));
        self.write_tokens(&objects, &composition, &secrets).await;
        let statuses = self
            .write_edge_statuses(&objects, &composition, &generations, &reports)
            .await;
        self.options.metrics.edges(statuses.values());
        self.write_service_statuses(&services, &composition, &statuses)
            .await;
    }

    /// Starts a task for each ready hub endpoint and stops those of vanished ones.
    fn follow_hubs(&mut self) {
        let mut current = BTreeSet::new();
        for slice in self.slice_store.state() {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(self.options.hub_admin_port.as_str()))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            let Some(port) = port else { continue };
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        current.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        self.hubs.retain(|addr, stop| {
            let keep = current.contains(addr);
            if !keep {
                tracing::info!(hub = %addr, "hub endpoint gone");
                stop.cancel();
            }
            keep
        });
        for addr in current {
            if self.hubs.contains_key(&addr) {
                continue;
            }
            tracing::info!(hub = %addr, "hub endpoint found");
            let stop = CancellationToken::new();
            tokio::spawn(self.sync.clone().run(addr, stop.clone()));
            self.hubs.insert(addr, stop);
        }
    }

    /// Each Edge's config generation: its status's, raised (and recorded first) when the
    /// composed configuration changed; an Edge whose new generation cannot be recorded now is
    /// left out of this pass (it keeps its last pushed configuration), the others go on. A raised generation is above the status's, above any
    /// the hubs report for the edge id and at least the time in milliseconds, so it never goes
    /// backwards for an edge id: not when its Edge is recreated, nor when its status is lost.
    async fn generations(
        &self,
        objects: &HashMap<ObjectKey, &Edge>,
        composition: &Composition,
        reports: &[hubs::HubReport],
    ) -> HashMap<ObjectKey, u64> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let mut generations = HashMap::new();
        for composed in &composition.edges {
            let Some(edge) = objects.get(&composed.key) else {
                continue;
            };
            let status = edge.status.clone().unwrap_or_default();
            let mut generation = status.config_generation;
            if status.config_digest.as_deref() != Some(composed.digest.as_str()) || generation == 0
            {
                let id = compose::edge_id(edge);
                let reported = reports
                    .iter()
                    .flat_map(|r| &r.edges)
                    .filter(|e| e.id == id)
                    .map(|e| e.generation)
                    .max()
                    .unwrap_or(0);
                let next = (generation.max(reported) + 1).max(now_ms);
                let status =
                    serde_json::json!({"configGeneration": next, "configDigest": composed.digest});
                match patch_status(&self.edge_api(&composed.key), &composed.key.1, status).await {
                    Ok(_) => generation = next,
                    Err(error) => {
                        // This Edge alone waits for the next pass, keeping what it has.
                        self.options.metrics.failed("generation");
                        tracing::warn!(edge = %composed.key.1, %error, "recording the config generation; retrying");
                        continue;
                    }
                }
            }
            generations.insert(composed.key.clone(), generation);
        }
        generations
    }

    /// Publishes the desired edge set (valid edges with a recorded generation).
    /// An Edge that cannot be composed now (its Secret deleted, an update the hub would
    /// refuse) keeps its last pushed configuration, so its edge stays up.
    /// An Edge in conflict has nothing pushed at all, and no edge id is ever pushed twice: an
    /// Edge's kept configuration gives way to the Edge that owns its id now.
    fn push(&mut self, composition: &Composition, generations: &HashMap<ObjectKey, u64>) {
        self.pushed.retain(|key, _| {
            composition
                .edges
                .iter()
                .any(|c| &c.key == key && !matches!(c.edge, Err(Refused::Conflict(_))))
        });
        let mut by_id: std::collections::BTreeMap<String, pb::Edge> = Default::default();
        let mut fresh_keys = HashSet::new();
        for composed in &composition.edges {
            let fresh = composed
                .edge
                .clone()
                .ok()
                .zip(generations.get(&composed.key));
            if let Some((edge, generation)) = fresh {
                let mut edge = edge_to_proto(edge);
                edge.generation = Some(*generation);
                self.pushed.insert(composed.key.clone(), edge.clone());
                fresh_keys.insert(composed.key.clone());
                by_id.insert(edge.id.clone(), edge);
            }
        }
        for (key, kept) in &self.pushed {
            if !fresh_keys.contains(key) {
                by_id.entry(kept.id.clone()).or_insert_with(|| kept.clone());
            }
        }
        let edges: Vec<pb::Edge> = by_id.into_values().collect();
        self.desired.send_if_modified(|current| {
            let changed = current.as_slice() != edges.as_slice();
            if changed {
                *current = Arc::new(edges);
            }
            changed
        });
    }

    async fn write_edge_statuses(
        &mut self,
        objects: &HashMap<ObjectKey, &Edge>,
        composition: &Composition,
        generations: &HashMap<ObjectKey, u64>,
        reports: &[hubs::HubReport],
    ) -> HashMap<ObjectKey, EdgeStatus> {
        let now = k8s_openapi::chrono::Utc::now()
            .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
        let mut statuses = HashMap::new();
        for composed in &composition.edges {
            let (Some(edge), Some(generation)) =
                (objects.get(&composed.key), generations.get(&composed.key))
            else {
                continue;
            };
            let previous = edge.status.clone().unwrap_or_default();
            let token_conflict = self.token_conflicts.get(&composed.key).cloned();
            let observed = status::Observed {
                generation: *generation,
                object_generation: edge.metadata.generation,
                previous: &previous,
                reports,
                token_conflict: token_conflict.as_ref(),
                now: &now,
            };
            let mut status = status::edge_status(composed, &observed);
            if composed.edge.is_ok() && token_conflict.is_none() {
                status.token_secret = Some(secrets::token_secret_name(&composed.key.1));
            }
            if status != previous {
                let written = patch_status(
                    &self.edge_api(&composed.key),
                    &composed.key.1,
                    serde_json::json!(status),
                )
                .await;
                if let Err(error) = written {
                    self.options.metrics.failed("status");
                    tracing::warn!(edge = %composed.key.1, %error, "writing status");
                }
            }
            let conflicts = [composed.edge.as_ref().err(), token_conflict.as_ref()];
            for conflict in conflicts.into_iter().flatten() {
                if let Refused::Conflict(why) = conflict {
                    self.tell(*edge, "Conflict", "Compose", why.clone()).await;
                }
            }
            statuses.insert(composed.key.clone(), status);
        }
        statuses
    }

    /// Writes each pushed edge's connection token into its Secret, made by a hub that has it.
    async fn write_tokens(
        &mut self,
        objects: &HashMap<ObjectKey, &Edge>,
        composition: &Composition,
        secrets: &HashMap<ObjectKey, Result<String, Refused>>,
    ) {
        let Some((addr, known)) = self.ready_hub() else {
            return;
        };
        for composed in &composition.edges {
            let (Ok(edge), Some(Ok(secret))) = (&composed.edge, secrets.get(&composed.key)) else {
                continue;
            };
            let Some(object) = objects.get(&composed.key) else {
                continue;
            };
            let digest = secrets::digest(secret);
            if !known.contains(&edge.id) || self.tokens.get(&composed.key) == Some(&digest) {
                continue;
            }
            match secrets::write_token(
                &self.client,
                addr,
                &self.sync.access,
                object,
                &edge.id,
                secret,
            )
            .await
            {
                Ok(()) => {
                    self.tokens.insert(composed.key.clone(), digest);
                    self.token_conflicts.remove(&composed.key);
                }
                Err(secrets::TokenError::Foreign(conflict)) => {
                    self.token_conflicts.insert(composed.key.clone(), conflict);
                }
                Err(secrets::TokenError::Failed(error)) => {
                    self.options.metrics.failed("token");
                    tracing::warn!(edge = %edge.id, %error, "writing the connection token")
                }
            }
        }
        let current = |key: &ObjectKey| composition.edges.iter().any(|c| &c.key == key);
        self.tokens.retain(|key, _| current(key));
        self.token_conflicts.retain(|key, _| current(key));
    }

    /// A hub that answered its last call, with the edge ids it holds.
    fn ready_hub(&self) -> Option<(SocketAddr, HashSet<String>)> {
        let reports = self.sync.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports
            .iter()
            .find(|(_, r)| r.unreachable.is_none() && r.refused.is_none())
            .map(|(addr, r)| (*addr, r.edges.iter().map(|e| e.id.clone()).collect()))
    }

    /// Sets each exposed Service's ingress to its edges' public IPs and tells it of refusals.
    async fn write_service_statuses(
        &mut self,
        services: &[Arc<Service>],
        composition: &Composition,
        statuses: &HashMap<ObjectKey, EdgeStatus>,
    ) {
        for exposure in &composition.exposures {
            let Some(service) = services
                .iter()
                .find(|s| key_of(s.as_ref()) == exposure.service)
            else {
                continue;
            };
            let ingress = status::service_ingress(exposure, |edge| {
                statuses.get(edge).and_then(|s| s.public_ip.clone())
            });
            let current = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default();
            let ips = |ingress: &[k8s_openapi::api::core::v1::LoadBalancerIngress]| {
                ingress.iter().map(|i| i.ip.clone()).collect::<Vec<_>>()
            };
            if ips(&current) != ips(&ingress) {
                let api: Api<Service> = Api::namespaced(self.client.clone(), &exposure.service.0);
                let status = serde_json::json!({"loadBalancer": {"ingress": ingress}});
                if let Err(error) = patch_status(&api, &exposure.service.1, status).await {
                    tracing::warn!(service = %exposure.service.1, %error, "writing the load balancer status");
                }
            }
            let problems = exposure
                .problem
                .iter()
                .map(|problem| ("NotExposed", problem.clone()))
                .chain(exposure.placements.iter().filter_map(|p| {
                    let why = p.refused.as_ref()?;
                    Some((
                        "PortClash",
                        format!("not exposed on Edge {}: {why}", p.edge.1),
                    ))
                }));
            for (reason, message) in problems.collect::<Vec<_>>() {
                self.tell(service.as_ref(), reason, "Expose", message).await;
            }
        }
    }

    /// Publishes a warning Event on `object`, once per message.
    async fn tell<K>(&mut self, object: &K, reason: &str, action: &str, message: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let uid = object.meta().uid.clone().unwrap_or_default();
        if !self.told.insert((uid, message.clone())) {
            return;
        }
        let name = object.meta().name.clone().unwrap_or_default();
        tracing::warn!(object = %name, reason, %message, "warning event");
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(message),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, "publishing an event");
        }
    }

    fn edge_api(&self, key: &ObjectKey) -> Api<Edge> {
        Api::namespaced(self.client.clone(), &key.0)
    }
}
