//! `remoteingress operator`: its flags and how they become the operator's options.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use remoteingress_operator::leader::LeaderElection;
use remoteingress_operator::metrics::{Health, OperatorMetrics};
use remoteingress_operator::{HubTransport, OperatorOptions, TargetPolicy};
use tokio_util::sync::CancellationToken;

/// Flags of `remoteingress operator`.
#[derive(Args)]
pub struct OperatorArgs {
    /// Print the CustomResourceDefinitions (YAML) and exit.
    #[arg(long)]
    print_crds: bool,
    /// Serve only the Edges and Services of this namespace (default: all namespaces).
    #[arg(long, env = "REMOTEINGRESS_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the hub Service (default: the operator's own, from POD_NAMESPACE, else
    /// "default").
    #[arg(long, env = "REMOTEINGRESS_HUB_NAMESPACE")]
    hub_namespace: Option<String>,
    /// The hub Service whose EndpointSlices list the hub replicas' admin API.
    #[arg(
        long,
        env = "REMOTEINGRESS_HUB_SERVICE",
        default_value = "remoteingress-admin"
    )]
    hub_service: String,
    /// Name of the admin API port in the hub Service.
    #[arg(
        long = "hub-admin-port-name",
        env = "REMOTEINGRESS_HUB_ADMIN_PORT_NAME",
        default_value = "admin"
    )]
    hub_admin_port: String,
    /// CA certificate (PEM) that the hubs' admin TLS certificate must chain to; the chart
    /// passes its admin TLS Secret's `ca.crt`.
    #[arg(long, env = "REMOTEINGRESS_HUB_CA_FILE")]
    hub_ca_file: Option<PathBuf>,
    /// The name the hubs' admin certificate must carry (default: the hub Service's DNS name,
    /// `<hub-service>.<hub-namespace>.svc`).
    #[arg(long, env = "REMOTEINGRESS_HUB_TLS_SERVER_NAME")]
    hub_tls_server_name: Option<String>,
    /// Reach the hubs' admin API over plain HTTP/2: the admin token and every edge's secret
    /// then cross the pod network in clear. Only for a network you trust.
    #[arg(
        long,
        env = "REMOTEINGRESS_HUB_PLAINTEXT",
        conflicts_with = "hub_ca_file"
    )]
    hub_plaintext: bool,
    /// Bearer token of the hubs' admin API (the chart passes it from the admin token Secret).
    #[arg(long, env = "REMOTEINGRESS_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Seconds between full reconciles and hub report refreshes when nothing changes.
    #[arg(long, env = "REMOTEINGRESS_RESYNC_SECS", default_value_t = 10)]
    resync_secs: u64,
    /// Let Edges name any host in `targetHosts`. By default an Edge may only target Services
    /// of its own namespace, so that no team can expose another's Services, the cloud
    /// metadata address or the hub's own loopback.
    #[arg(long, env = "REMOTEINGRESS_UNRESTRICTED_TARGETS")]
    unrestricted_targets: bool,
    /// Run only while holding a Lease in the hub namespace, so that several replicas can run:
    /// one writes, the others take over within 15 s when it stops.
    #[arg(long, env = "REMOTEINGRESS_LEADER_ELECTION")]
    leader_election: bool,
    /// Address of /metrics, /healthz and /readyz (ready: its watches work, or it stands by).
    #[arg(
        long,
        env = "REMOTEINGRESS_METRICS_ADDR",
        default_value = "0.0.0.0:9464"
    )]
    metrics_addr: std::net::SocketAddr,
    /// Name of that Lease.
    #[arg(
        long,
        env = "REMOTEINGRESS_LEADER_LEASE",
        default_value = "remoteingress-operator"
    )]
    leader_lease: String,
}

/// Runs the operator (or prints the CRDs) until SIGTERM or Ctrl-C.
pub async fn run(args: OperatorArgs) -> Result<()> {
    if args.print_crds {
        print!("{}", remoteingress_operator::crd::crds_yaml()?);
        return Ok(());
    }
    let hub_namespace = args
        .hub_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    let hub_transport = match (args.hub_ca_file, args.hub_plaintext) {
        (Some(path), _) => HubTransport::Tls {
            ca: std::fs::read(&path)
                .with_context(|| format!("reading the hub CA file {}", path.display()))?,
            server_name: args
                .hub_tls_server_name
                .unwrap_or_else(|| format!("{}.{hub_namespace}.svc", args.hub_service)),
        },
        (None, true) => HubTransport::Plaintext,
        (None, false) => anyhow::bail!(
            "the hubs' admin API carries every edge's secret: give --hub-ca-file to reach it \
             over verified TLS (the Helm chart does), or allow plain HTTP with --hub-plaintext"
        ),
    };
    let leader_election = args.leader_election.then(|| LeaderElection {
        namespace: hub_namespace.clone(),
        name: args.leader_lease,
        identity: std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        }),
    });
    let registry = prometheus::Registry::new();
    let metrics = OperatorMetrics::register(&registry)?;
    let health = Health::default();
    let ready = health.clone();
    let options = OperatorOptions {
        metrics,
        health,
        leader_election,
        namespace: args.namespace,
        hub_namespace,
        hub_transport,
        hub_service: args.hub_service,
        hub_admin_port: args.hub_admin_port,
        hub_token: args.admin_token,
        resync: Duration::from_secs(args.resync_secs.max(1)),
        targets: if args.unrestricted_targets {
            TargetPolicy::Any
        } else {
            TargetPolicy::OwnNamespace
        },
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster, or KUBECONFIG)")?;
    let stop = CancellationToken::new();
    let served = remoteingress_controlplane::serve_metrics(
        registry,
        args.metrics_addr,
        std::sync::Arc::new(move || ready.is_ready()),
        stop.clone(),
    )
    .await?;
    println!("metrics on http://{}/metrics", served.local_addr);
    let mut operator = tokio::spawn(remoteingress_operator::run(client, options, stop.clone()));
    tokio::select! {
        signal = crate::shutdown_signal() => {
            signal?;
            stop.cancel();
            (&mut operator).await??;
        }
        finished = &mut operator => finished??,
    }
    Ok(())
}
