//! Kubernetes operator: turns `Edge` resources and `LoadBalancer` Services of our class into
//! hub configuration, pushed to every hub replica through the admin API, and writes status back.
//! Kubernetes is the store: the operator keeps nothing of its own but caches.

pub mod compose;
pub mod crd;
mod hubs;
pub mod leader;
pub mod metrics;
mod plan;
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
use kube::{Api, Client, Resource};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use compose::ObjectKey;
pub use compose::{TargetPolicy, LOAD_BALANCER_CLASS};
use crd::Edge;
pub use hubs::HubTransport;
use hubs::{BearerToken, DesiredEdges, HubAccess, HubSync, Reports};
use plan::{IngressWrite, Memory, Plan, PlannedStatus, Seen, TokenWrite, Warning, Write};

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
        memory: Memory::default(),
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

/// Writes an object's status by server-side apply, as the operator's field manager: fields it
/// wrote before and leaves out now are removed.
async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
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
    /// What earlier passes did.
    memory: Memory,
}

/// How many writes of one kind a pass has in flight at once.
const CONCURRENT_WRITES: usize = 16;

impl Operator {
    /// One pass: reads the Secrets, plans (`plan::plan`) and executes the plan: statuses that
    /// record new generations, the push, the other statuses, tokens, Services and Events.
    /// A pass that cannot read the Secrets pushes nothing (the hubs keep what they have) and is
    /// retried at the next wake-up or resync. Hub tasks start only after the first complete
    /// push, so a hub never gets a set that is not the whole truth.
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
        let hubs = self
            .sync
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.options.metrics.hubs(hubs.values());
        let now = k8s_openapi::chrono::Utc::now();
        let plan = plan::plan(
            &Seen {
                edges: &edges,
                services: &services,
                secrets: &secrets,
                hubs: &hubs,
                targets: self.options.targets,
                now_ms: u64::try_from(now.timestamp_millis()).unwrap_or(0),
                now: &now.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
            },
            &self.memory,
        );
        self.memory.follow(&plan);
        let unrecorded = self.write_statuses(&plan, Write::First).await;
        let Some(push) = plan.push(&unrecorded, &self.memory.pushed) else {
            return;
        };
        self.memory.pushed = push.pushed;
        let edges = push.edges;
        self.desired.send_if_modified(|current| {
            let changed = current.as_slice() != edges.as_slice();
            if changed {
                *current = Arc::new(edges);
            }
            changed
        });
        self.follow_hubs();
        self.write_statuses(&plan, Write::Then).await;
        self.write_tokens(plan.tokens, plan.token_hub).await;
        self.options
            .metrics
            .edges(plan.statuses.iter().map(|s| &s.status));
        self.write_ingresses(&plan.ingresses).await;
        for warning in plan.events {
            self.tell(warning).await;
        }
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

    /// Writes the planned statuses due at `when`, a few at a time; returns the Edges whose
    /// status could not be written.
    async fn write_statuses(&self, plan: &Plan, when: Write) -> HashSet<ObjectKey> {
        let mut writes = Vec::new();
        for planned in plan.statuses.iter().filter(|s| s.write == when) {
            writes.push(self.write_status(planned));
        }
        let results: Vec<_> = futures::stream::iter(writes)
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        let mut failed = HashSet::new();
        for (key, error) in results.into_iter().filter_map(Result::err) {
            self.options.metrics.failed("status");
            tracing::warn!(edge = %key.1, %error, "writing the status; retrying next pass");
            failed.insert(key);
        }
        failed
    }

    async fn write_status(&self, planned: &PlannedStatus) -> Result<(), (ObjectKey, kube::Error)> {
        let api = self.edge_api(&planned.key);
        apply_status(&api, &planned.key.1, serde_json::json!(planned.status))
            .await
            .map_err(|error| (planned.key.clone(), error))
    }

    /// Writes each planned connection token into its Edge's Secret, a few at a time.
    async fn write_tokens(&mut self, tokens: Vec<TokenWrite>, hub: Option<SocketAddr>) {
        let Some(hub) = hub.filter(|_| !tokens.is_empty()) else {
            return;
        };
        // One connection to the hub for all of the pass's tokens.
        let admin = match hubs::connect(hub, &self.sync.access).await {
            Ok(admin) => admin,
            Err(error) => {
                self.options.metrics.failed("token");
                tracing::warn!(%hub, %error, "connecting to the hub for connection tokens");
                return;
            }
        };
        let (client, store) = (&self.client, &self.secret_store);
        let mut writes = Vec::new();
        for token in tokens {
            let admin = admin.clone();
            writes.push(async move {
                let written = secrets::write_token(client, store, admin, &token).await;
                (token, written)
            });
        }
        let results: Vec<_> = futures::stream::iter(writes)
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        for (token, written) in results {
            match written {
                Ok(()) => {
                    self.memory.tokens.insert(token.key(), token.digest());
                    self.memory.token_conflicts.remove(&token.key());
                }
                Err(secrets::TokenError::Foreign(conflict)) => {
                    self.memory.token_conflicts.insert(token.key(), conflict);
                }
                Err(secrets::TokenError::Failed(error)) => {
                    self.options.metrics.failed("token");
                    tracing::warn!(edge = %token.edge_id, %error, "writing the connection token");
                }
            }
        }
    }

    /// Sets exposed Services' ingress to their edges' public IPs.
    async fn write_ingresses(&self, ingresses: &[IngressWrite]) {
        for write in ingresses {
            let api: Api<Service> = Api::namespaced(self.client.clone(), &write.service.0);
            let status = serde_json::json!({"loadBalancer": {"ingress": write.ingress}});
            if let Err(error) = apply_status(&api, &write.service.1, status).await {
                self.options.metrics.failed("service");
                tracing::warn!(service = %write.service.1, %error, "writing the load balancer status");
            }
        }
    }

    /// Publishes a warning Event (each is told once).
    async fn tell(&mut self, warning: Warning) {
        self.memory.told.insert(warning.told());
        tracing::warn!(object = ?warning.object.name, reason = warning.reason, message = %warning.message, "warning event");
        let event = Event {
            type_: EventType::Warning,
            reason: warning.reason.into(),
            note: Some(warning.message),
            action: warning.action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &warning.object).await {
            tracing::warn!(%error, "publishing an event");
        }
    }

    fn edge_api(&self, key: &ObjectKey) -> Api<Edge> {
        Api::namespaced(self.client.clone(), &key.0)
    }
}
