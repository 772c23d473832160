//! `remoteingress`: the command line. It parses arguments and wires the library crates together.

mod demo;
mod operator;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use remoteingress_controlplane::{
    serve_edge_status, serve_hub_admin, serve_metrics, AdminOptions, ApiLimits,
};
use remoteingress_edge::{
    BackoffPolicy, Edge, EdgeOptions, FirewallMode, HubAddress, TransportMode,
};
use remoteingress_hub::{random_hub_id, Hub, HubOptions};
use remoteingress_tunnel::{HubIdentity, HubTrust, SessionOptions, DEFAULT_QUIC_MIN_MTU};
use remoteingress_wire::token::{normalize_pin, ConnectionToken};
use tokio_util::sync::CancellationToken;

/// Edge ingress tunnel: an edge on a public machine carries TCP over one TLS tunnel to a hub in
/// a private network, which hands each connection to a local reverse proxy with a PROXY
/// protocol header.
/// mimalloc keeps freed memory for reuse: with the system allocator the tunnel's short-lived
/// frame buffers were returned to the kernel and faulted back in, a quarter of the hub's CPU
/// time under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "remoteingress", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    /// Threads that run the tunnel's tasks; 0 means one per CPU core. 1 runs everything on one
    /// thread: no cross-thread wakeups (lower latency), at most one core per process.
    #[arg(
        long,
        global = true,
        env = "REMOTEINGRESS_WORKER_THREADS",
        default_value_t = 0
    )]
    worker_threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a RUST_LOG-style directive.
    #[arg(
        long,
        global = true,
        env = "REMOTEINGRESS_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    /// Log line format.
    #[arg(long, global = true, env = "REMOTEINGRESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: accept edge tunnels and forward their connections to targets.
    Hub(HubArgs),
    /// Run an edge: connect to the hub and listen on the ports it assigns.
    Edge(EdgeArgs),
    /// Create or inspect connection tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a hub, an edge and a sample target on loopback and show a request going through.
    Demo(demo::DemoArgs),
    /// Run the Kubernetes operator: Edge resources and LoadBalancer Services to hub config.
    Operator(operator::OperatorArgs),
}

#[derive(Args)]
struct TunnelTimers {
    /// Liveness probe interval in ms: an edge PINGs a hub that answers (ours) every interval,
    /// and that hub PINGs it only after an interval without a word (an original edge every
    /// interval); QUIC sends keep-alives. A tunnel silent for two intervals is suspect: the edge
    /// moves new connections off it and dials a replacement.
    #[arg(long, env = "REMOTEINGRESS_LIVENESS_INTERVAL_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    liveness_interval_ms: u64,
    /// Liveness deadline in ms: a peer silent this long is dead and its tunnel closed, its
    /// streams, target sockets and UDP sessions released; data unacknowledged this long fails
    /// the tunnel too. At least twice the interval. An edge whose hub cannot be probed (an
    /// original hub) waits at least 45 s.
    #[arg(long, env = "REMOTEINGRESS_LIVENESS_DEADLINE_MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    liveness_deadline_ms: u64,
    /// Most concurrent streams per tunnel; on the hub, also per edge across its tunnels.
    #[arg(long, env = "REMOTEINGRESS_MAX_STREAMS", default_value_t = 10_000)]
    max_streams: usize,
    /// Memory budget for unconsumed bytes per tunnel, in MiB; on the hub, per edge, shared
    /// out among its tunnels.
    #[arg(long, env = "REMOTEINGRESS_FLOW_BUDGET_MIB", default_value_t = 200)]
    flow_budget_mib: u64,
    /// QUIC: UDP payload bytes the path always carries; packets never shrink below it, so UDP
    /// datagrams that fit keep flowing when loss looks like a path-MTU black hole. The default
    /// fits 1,200-byte datagrams; a path that cannot carry it fails QUIC's handshake.
    #[arg(long, env = "REMOTEINGRESS_QUIC_MIN_MTU", default_value_t = DEFAULT_QUIC_MIN_MTU,
          value_parser = clap::value_parser!(u16).range(1200..=9000))]
    quic_min_mtu: u16,
}

impl TunnelTimers {
    /// The session options, once the deadline is known to leave a live peer time to answer.
    fn session(&self) -> Result<SessionOptions> {
        let (interval, deadline) = (self.liveness_interval_ms, self.liveness_deadline_ms);
        if deadline < interval.saturating_mul(2) {
            bail!(
                "--liveness-deadline-ms ({deadline}) must be at least twice \
                 --liveness-interval-ms ({interval}): a live peer is heard from about once an \
                 interval, and a tunnel is suspect after two"
            );
        }
        Ok(SessionOptions {
            budget: self.flow_budget_mib * 1024 * 1024,
            max_streams: self.max_streams,
            idle_timeout: Duration::from_millis(self.liveness_deadline_ms),
            ping_interval: Duration::from_millis(self.liveness_interval_ms),
            quic_min_mtu: self.quic_min_mtu,
            ..SessionOptions::default()
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "camelCase")]
enum TransportArg {
    /// One TLS connection with frame multiplexing.
    TcpTls,
    /// QUIC: native streams, datagrams for UDP.
    Quic,
    /// QUIC, falling back to TLS when QUIC does not connect in time.
    QuicWithFallback,
}

#[derive(Clone, Copy, ValueEnum)]
enum FirewallArg {
    /// Never touch nftables.
    Off,
    /// Use nftables when it works here; otherwise warn and tunnel on.
    Auto,
    /// Refuse to start without working nftables.
    Required,
}

#[derive(Args)]
struct ServiceArgs {
    /// Seconds open connections may take to finish after SIGTERM (a second signal stops at
    /// once); on an edge, also how long a tunnel its hub drains may keep its open streams.
    #[arg(long, env = "REMOTEINGRESS_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Shut down as on SIGTERM when standard input ends: for a supervisor holding the other end
    /// of a pipe, so that this process ends with it however the supervisor ends.
    #[arg(long, env = "REMOTEINGRESS_EXIT_ON_STDIN_CLOSE")]
    exit_on_stdin_close: bool,
}

#[derive(Args)]
struct UdpArgs {
    /// Seconds without traffic either way after which a UDP session ends.
    #[arg(
        long,
        env = "REMOTEINGRESS_UDP_IDLE_TIMEOUT_SECS",
        default_value_t = 60
    )]
    udp_idle_timeout_secs: u64,
    /// Most UDP sessions per edge (across its tunnels, on the hub); new ones past it are
    /// dropped and counted.
    #[arg(long, env = "REMOTEINGRESS_UDP_MAX_SESSIONS", default_value_t = 4_096)]
    udp_max_sessions: usize,
}

impl UdpArgs {
    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.udp_idle_timeout_secs.max(1))
    }
}

#[derive(Args)]
struct HubArgs {
    /// Address the tunnel listener binds to.
    #[arg(long, env = "REMOTEINGRESS_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// Port edges connect to.
    #[arg(long, env = "REMOTEINGRESS_TUNNEL_PORT", default_value_t = 8443)]
    tunnel_port: u16,
    /// Host tunnelled connections are forwarded to (your reverse proxy).
    #[arg(long, env = "REMOTEINGRESS_TARGET_HOST", default_value = "127.0.0.1")]
    target_host: String,
    /// Directory for the generated certificate (use /var/lib/remoteingress in production).
    #[arg(
        long,
        env = "REMOTEINGRESS_STATE_DIR",
        default_value = "./remoteingress-state"
    )]
    state_dir: PathBuf,
    /// PEM certificate chain of the hub (instead of the generated one).
    #[arg(long, env = "REMOTEINGRESS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the hub.
    #[arg(long, env = "REMOTEINGRESS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// JSON or TOML file of allowed edges, reloaded when its content changes (the kernel tells
    /// at once; a periodic check is the fallback). With --replica or --peer it must name a
    /// `generation`.
    #[arg(long, env = "REMOTEINGRESS_EDGES_FILE")]
    edges_file: Option<PathBuf>,
    /// Seconds between checks of the edges file's content, besides the kernel's notifications.
    #[arg(long, env = "REMOTEINGRESS_EDGES_FILE_CHECK_SECS", default_value_t = 5)]
    edges_file_check_secs: u64,
    /// Do not accept QUIC tunnels (UDP on the tunnel port); TLS only.
    #[arg(long, env = "REMOTEINGRESS_NO_QUIC")]
    no_quic: bool,
    /// Seconds an edge has for TLS and its handshake line.
    #[arg(
        long,
        env = "REMOTEINGRESS_HANDSHAKE_TIMEOUT_SECS",
        default_value_t = 10
    )]
    handshake_timeout_secs: u64,
    /// Tunnel connections that may be authenticating at once. Past it, new connections wait
    /// in the listen backlog; one that has not begun its handshake within 250 ms gives its
    /// slot to the next.
    #[arg(long, env = "REMOTEINGRESS_MAX_UNAUTHENTICATED", default_value_t = 256)]
    max_unauthenticated: usize,
    /// Tunnel connections one address may have authenticating at once.
    #[arg(
        long,
        env = "REMOTEINGRESS_MAX_UNAUTHENTICATED_PER_SOURCE",
        default_value_t = 16
    )]
    max_unauthenticated_per_source: usize,
    /// Failed authentications one address may have per minute before its connections are
    /// refused unread.
    #[arg(
        long,
        env = "REMOTEINGRESS_FAILED_AUTHS_PER_MINUTE",
        default_value_t = 30
    )]
    failed_auths_per_minute: u32,
    /// Most UDP sessions of all edges together (also at most half the open-files limit).
    #[arg(
        long,
        env = "REMOTEINGRESS_UDP_MAX_SESSIONS_TOTAL",
        default_value_t = 16_384
    )]
    udp_max_sessions_total: usize,
    /// Refuse streams and UDP sessions whose client address (as the edge reports it) is
    /// private, shared, link-local or unique-local; unspecified and multicast client addresses
    /// are always refused, loopback ones unless the edge's tunnel comes from loopback too.
    #[arg(long, env = "REMOTEINGRESS_REFUSE_PRIVATE_CLIENTS")]
    refuse_private_clients: bool,
    /// Tunnels one edge may keep to this hub at once (an edge with several keeps them for
    /// draining and spreading load); a newer one past it replaces the oldest.
    #[arg(long, env = "REMOTEINGRESS_MAX_TUNNELS_PER_EDGE", default_value_t = 8)]
    max_tunnels_per_edge: usize,
    /// Connections to targets of all edges together; streams past it are refused (and counted
    /// in remoteingress_opens_refused_total with reason hub_limit).
    #[arg(
        long,
        env = "REMOTEINGRESS_MAX_TARGET_CONNECTIONS",
        default_value_t = 65_536
    )]
    max_target_connections: usize,
    /// Edges this hub serves at once (0: no limit); a new edge past it is refused as busy and
    /// told when to come back (it dials its next hub address then).
    #[arg(long, env = "REMOTEINGRESS_MAX_EDGES", default_value_t = 0)]
    max_edges: usize,
    /// After a restart, readiness waits at most this long for the edges the hub held when it
    /// last drained to come back, so that a rolling restart does not drain the next hub
    /// before them (0: ready as soon as it accepts).
    #[arg(long, env = "REMOTEINGRESS_FLEET_WAIT_SECS", default_value_t = 60)]
    fleet_wait_secs: u64,
    /// Address of the gRPC admin API.
    #[arg(
        long,
        env = "REMOTEINGRESS_ADMIN_ADDR",
        default_value = "127.0.0.1:8444"
    )]
    admin_addr: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "REMOTEINGRESS_METRICS_ADDR",
        default_value = "127.0.0.1:9469"
    )]
    metrics_addr: SocketAddr,
    /// Seconds an admin API call may take before it fails with DEADLINE_EXCEEDED.
    #[arg(
        long,
        env = "REMOTEINGRESS_ADMIN_CALL_TIMEOUT_SECS",
        default_value_t = 30
    )]
    admin_call_timeout_secs: u64,
    /// Admin API calls served at once (more wait).
    #[arg(
        long,
        env = "REMOTEINGRESS_ADMIN_MAX_CONCURRENT_CALLS",
        default_value_t = 64
    )]
    admin_max_concurrent_calls: usize,
    /// WatchEvents streams open at once (more are refused).
    #[arg(long, env = "REMOTEINGRESS_ADMIN_MAX_WATCHERS", default_value_t = 32)]
    admin_max_watchers: usize,
    /// Health and reflection calls served at once, from a pool apart from the API's calls
    /// (more wait), so that unauthenticated probes never take capacity from API clients.
    #[arg(
        long,
        env = "REMOTEINGRESS_ADMIN_MAX_PROBE_CALLS",
        default_value_t = 16
    )]
    admin_max_probe_calls: usize,
    /// Admin API connections open at once (more wait in the listen backlog).
    #[arg(
        long,
        env = "REMOTEINGRESS_ADMIN_MAX_CONNECTIONS",
        default_value_t = 256
    )]
    admin_max_connections: usize,
    /// File holding the admin API's bearer token (or set REMOTEINGRESS_ADMIN_TOKEN).
    #[arg(long, env = "REMOTEINGRESS_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// PEM certificate for TLS on the admin API.
    #[arg(long, env = "REMOTEINGRESS_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the admin API.
    #[arg(long, env = "REMOTEINGRESS_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Host name edges use to reach this hub, put into connection tokens.
    #[arg(long, env = "REMOTEINGRESS_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Port edges use to reach this hub (default: the tunnel port).
    #[arg(long, env = "REMOTEINGRESS_PUBLIC_PORT")]
    public_port: Option<u16>,
    /// This hub instance's id, sent to edges so that they tell hubs behind one address apart
    /// (default: random per start; a pod name suits).
    #[arg(long, env = "REMOTEINGRESS_HUB_ID")]
    hub_id: Option<String>,
    /// The other hubs serving the same edges (HOST:PORT, repeatable or comma-separated), named
    /// in connection tokens too. Implies --replica.
    #[arg(
        long = "peer",
        visible_alias = "peers",
        env = "REMOTEINGRESS_PEERS",
        value_delimiter = ','
    )]
    peers: Vec<String>,
    /// This hub is one of several serving the same edges: admin writes must carry a
    /// generation, and writes that would let the hubs diverge are refused.
    #[arg(long, env = "REMOTEINGRESS_REPLICA")]
    replica: bool,
    #[command(flatten)]
    timers: TunnelTimers,
    #[command(flatten)]
    udp: UdpArgs,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Args)]
struct EdgeArgs {
    /// Connection token from `remoteingress token encode` (or the hub's API).
    #[arg(long, env = "REMOTEINGRESS_TOKEN", hide_env_values = true,
          conflicts_with_all = ["hub_host", "hubs", "edge_id", "secret"])]
    token: Option<String>,
    /// Hub host name or address (one hub; see --hub for several).
    #[arg(long, env = "REMOTEINGRESS_HUB_HOST", conflicts_with = "hubs")]
    hub_host: Option<String>,
    /// Hub tunnel port.
    #[arg(long, env = "REMOTEINGRESS_HUB_PORT", default_value_t = 8443)]
    hub_port: u16,
    /// A hub's HOST:PORT; repeat (or separate with commas) for several hubs.
    #[arg(long = "hub", env = "REMOTEINGRESS_HUBS", value_delimiter = ',')]
    hubs: Vec<String>,
    /// Tunnels to keep up, each to a distinct hub instance (through the --hub list, or
    /// repeatedly through one load-balanced address).
    #[arg(long, env = "REMOTEINGRESS_HUB_CONNECTIONS", default_value_t = 1)]
    hub_connections: usize,
    /// Edge id.
    #[arg(long, env = "REMOTEINGRESS_EDGE_ID")]
    edge_id: Option<String>,
    /// Edge secret.
    #[arg(long, env = "REMOTEINGRESS_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// SHA-256 pin of the hub certificate (overrides the token's). With no pin and no
    /// --ca-file, the hub's certificate must be trusted by the system's trust store for the hub's
    /// host name (SSL_CERT_FILE and SSL_CERT_DIR name another store).
    #[arg(long, env = "REMOTEINGRESS_HUB_PIN")]
    hub_pin: Option<String>,
    /// PEM file of CAs that sign the hub certificate (instead of a pin).
    #[arg(long, env = "REMOTEINGRESS_CA_FILE", conflicts_with = "hub_pin")]
    ca_file: Option<PathBuf>,
    /// Do not verify the hub at all. The secret may reach an impostor; for tests only.
    #[arg(long, env = "REMOTEINGRESS_INSECURE")]
    insecure: bool,
    /// Address the public listeners bind to.
    #[arg(long, env = "REMOTEINGRESS_BIND_ADDRESS", default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// First reconnect delay in milliseconds (doubles up to --reconnect-max-secs).
    #[arg(long, env = "REMOTEINGRESS_RECONNECT_MIN_MS", default_value_t = 1000)]
    reconnect_min_ms: u64,
    /// Largest reconnect delay in seconds.
    #[arg(long, env = "REMOTEINGRESS_RECONNECT_MAX_SECS", default_value_t = 30)]
    reconnect_max_secs: u64,
    /// Client connections allowed at once.
    #[arg(long, env = "REMOTEINGRESS_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Address of the local gRPC status API.
    #[arg(
        long,
        env = "REMOTEINGRESS_STATUS_ADDR",
        default_value = "127.0.0.1:8445"
    )]
    status_addr: SocketAddr,
    /// Tunnel transport: tcpTls, quic, or quicWithFallback (QUIC, else TLS).
    #[arg(long, env = "REMOTEINGRESS_TRANSPORT_MODE", value_enum, default_value_t = TransportArg::TcpTls)]
    transport_mode: TransportArg,
    /// With quicWithFallback: seconds QUIC may take before TLS is tried.
    #[arg(long, env = "REMOTEINGRESS_QUIC_FALLBACK_SECS", default_value_t = 5)]
    quic_fallback_secs: u64,
    /// With quicWithFallback: after falling back to TLS for a hub, seconds its reconnects use
    /// TLS alone (a path that blocks UDP costs the fallback delay once); as often, a QUIC
    /// handshake is tried in the background, and once it succeeds a QUIC tunnel replaces the
    /// TLS one.
    #[arg(
        long,
        env = "REMOTEINGRESS_QUIC_RETRY_AFTER_SECS",
        default_value_t = 300
    )]
    quic_retry_after_secs: u64,
    /// Ms a new client connection's open may go unconfirmed by its hub (or four round trips,
    /// if longer) before it moves to another tunnel with the client's first bytes, and its
    /// tunnel is treated as suspect. Hubs without the `liveness` extension never confirm;
    /// their opens stay where they are.
    #[arg(
        long,
        env = "REMOTEINGRESS_OPEN_CONFIRM_TIMEOUT_MS",
        default_value_t = 1_000
    )]
    open_confirm_timeout_ms: u64,
    /// Apply the hub's firewall configs with nftables: off, auto (when it works here) or
    /// required (refuse to start without it).
    #[arg(long, env = "REMOTEINGRESS_FIREWALL", value_enum, default_value_t = FirewallArg::Auto)]
    firewall: FirewallArg,
    /// STUN server (host:port) for public-IP discovery; repeat for fallbacks.
    #[arg(long = "stun-server", env = "REMOTEINGRESS_STUN_SERVERS", value_delimiter = ',',
          default_value = remoteingress_edge::stun::DEFAULT_SERVER)]
    stun_servers: Vec<String>,
    /// Do not discover the public IP.
    #[arg(long, env = "REMOTEINGRESS_NO_STUN")]
    no_stun: bool,
    /// Command that runs nft, split on spaces (e.g. to run it in another network namespace).
    #[arg(long, env = "REMOTEINGRESS_NFT_COMMAND", default_value = "nft")]
    nft_command: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "REMOTEINGRESS_METRICS_ADDR",
        default_value = "127.0.0.1:9470"
    )]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    timers: TunnelTimers,
    #[command(flatten)]
    udp: UdpArgs,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print the token for an edge.
    Encode(EncodeArgs),
    /// Print a token's contents as JSON.
    Decode {
        /// The token.
        #[arg(env = "REMOTEINGRESS_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Args)]
struct EncodeArgs {
    /// Host name or address edges use to reach the hub.
    #[arg(long, env = "REMOTEINGRESS_HUB_HOST")]
    hub_host: String,
    /// Tunnel port of the hub.
    #[arg(long, env = "REMOTEINGRESS_HUB_PORT", default_value_t = 8443)]
    hub_port: u16,
    /// Edge id ([A-Za-z0-9._-], 1-128 characters).
    #[arg(long, env = "REMOTEINGRESS_EDGE_ID")]
    edge_id: String,
    /// Edge secret.
    #[arg(long, env = "REMOTEINGRESS_SECRET", hide_env_values = true)]
    secret: String,
    /// SHA-256 pin of the hub certificate (64 hex digits), printed by `remoteingress hub`.
    #[arg(long, env = "REMOTEINGRESS_HUB_PIN")]
    pin: Option<String>,
    /// Further hubs of the same tier (HOST:PORT, repeatable or comma-separated).
    #[arg(long = "hub", env = "REMOTEINGRESS_HUBS", value_delimiter = ',')]
    hubs: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log)?;
    match cli.command {
        Command::Token(TokenCommand::Encode(args)) => println!("{}", encode_token(args)?),
        Command::Token(TokenCommand::Decode { token }) => {
            let token = ConnectionToken::decode(&token)?;
            println!("{}", serde_json::to_string_pretty(&token_json(&token))?);
        }
        Command::Hub(args) => run_to_end(cli.worker_threads, run_hub(args))?,
        Command::Edge(args) => run_to_end(cli.worker_threads, run_edge(args))?,
        Command::Demo(args) => run_to_end(cli.worker_threads, demo::run(args))?,
        Command::Operator(args) => run_to_end(cli.worker_threads, operator::run(args))?,
    }
    Ok(())
}

/// How long blocking work may go on once a command has finished.
const BLOCKING_WORK_GRACE: Duration = Duration::from_secs(2);

/// Runs `command` on a new runtime, then stops the runtime without waiting on a blocking read
/// that never ends by itself (standard input, kept open by a supervisor, under
/// `--exit-on-stdin-close`): blocking work gets `BLOCKING_WORK_GRACE` to finish.
fn run_to_end(
    worker_threads: usize,
    command: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let runtime = runtime(worker_threads)?;
    let result = runtime.block_on(command);
    runtime.shutdown_timeout(BLOCKING_WORK_GRACE);
    result
}

fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(args: &LogArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .context("invalid --log-level")?;
    // Colour codes only for a person at a terminal, never into a file, a pipe or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn encode_token(args: EncodeArgs) -> Result<String> {
    remoteingress_wire::handshake::EdgeHello::new(&args.edge_id, &args.secret)
        .context("invalid edge credentials")?;
    let token = ConnectionToken {
        hub_host: args.hub_host,
        hub_port: args.hub_port,
        edge_id: args.edge_id,
        secret: args.secret,
        pin: args.pin.as_deref().map(normalize_pin).transpose()?,
        hubs: args
            .hubs
            .iter()
            .map(|hub| Ok(HubAddress::parse(hub)?.to_string()))
            .collect::<Result<_>>()?,
    };
    Ok(token.encode())
}

/// The token's contents with readable key names.
fn token_json(token: &ConnectionToken) -> serde_json::Value {
    serde_json::json!({
        "hubHost": token.hub_host,
        "hubPort": token.hub_port,
        "edgeId": token.edge_id,
        "secret": token.secret,
        "pin": token.pin,
        "hubs": token.hub_addresses(),
    })
}

async fn run_hub(args: HubArgs) -> Result<()> {
    for peer in &args.peers {
        HubAddress::parse(peer).context("--peer")?;
    }
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => HubIdentity::from_pem_files(cert, key)?,
        _ => HubIdentity::load_or_generate(&args.state_dir)?,
    };
    let admin_token = admin_token(args.admin_token_file.as_deref())?;
    let options = HubOptions {
        listen_addr: SocketAddr::new(args.listen_address, args.tunnel_port),
        state_file: args
            .edges_file
            .is_none()
            .then(|| args.state_dir.join("edges.json")),
        target_host: args.target_host,
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
        max_unauthenticated: args.max_unauthenticated,
        max_unauthenticated_per_source: args.max_unauthenticated_per_source,
        failed_auths_per_minute: args.failed_auths_per_minute,
        session: args.timers.session()?,
        udp_idle_timeout: args.udp.idle_timeout(),
        udp_max_sessions: args.udp.udp_max_sessions,
        udp_max_sessions_total: args.udp_max_sessions_total,
        refuse_private_clients: args.refuse_private_clients,
        max_tunnels_per_edge: args.max_tunnels_per_edge.max(1),
        max_target_connections: args.max_target_connections,
        max_edges: args.max_edges,
        fleet_record: Some(args.state_dir.join("fleet.json")),
        fleet_wait: Duration::from_secs(args.fleet_wait_secs),
        registry: prometheus::Registry::new(),
        quic: !args.no_quic,
        hub_id: args.hub_id.unwrap_or_else(random_hub_id),
        replica: args.replica || !args.peers.is_empty(),
        ..HubOptions::default()
    };
    let registry = options.registry.clone();
    let hub = Hub::start(options, &identity).await?;
    println!("hub listening on {}", hub.local_addr());
    println!("certificate pin (sha256): {}", hub.pin());
    println!("hub id: {}", hub.status().hub_id);
    let edges_file_mode = args.edges_file.is_some();
    if let Some(path) = args.edges_file {
        let check = Duration::from_secs(args.edges_file_check_secs.max(1));
        hub.watch_edges_file(path, check).await?;
    }
    let stop = CancellationToken::new();
    let admin = AdminOptions {
        addr: args.admin_addr,
        token: admin_token,
        tls: args.admin_tls_cert.zip(args.admin_tls_key),
        public_host: args.public_host,
        public_port: args.public_port.unwrap_or(hub.local_addr().port()),
        peers: args.peers,
        edges_file_mode,
        limits: ApiLimits {
            call_timeout: Duration::from_secs(args.admin_call_timeout_secs.max(1)),
            max_concurrent_calls: args.admin_max_concurrent_calls.max(1),
            max_watchers: args.admin_max_watchers,
            max_probe_calls: args.admin_max_probe_calls.max(1),
            max_connections: args.admin_max_connections.max(1),
        },
        registry: registry.clone(),
    };
    let served = serve_hub_admin(hub.clone(), admin, stop.clone()).await?;
    println!("admin API on {}", served.local_addr);
    let ready = hub.clone();
    let draining = hub.clone();
    let service = Service {
        registry,
        metrics_addr: args.metrics_addr,
        ready: Arc::new(move || ready.is_ready()),
        grace: args.service.grace(),
        exit_on_stdin_close: args.service.exit_on_stdin_close,
        stop: stop.clone(),
    };
    service
        .run(
            || {
                let hub = hub.clone();
                tokio::spawn(async move { hub.drain().await });
            },
            move || draining.drain_pending(),
        )
        .await?;
    hub.shutdown().await;
    let _ = served.task.await;
    Ok(())
}

async fn run_edge(args: EdgeArgs) -> Result<()> {
    let (hubs, edge_id, secret, token_pin) = match args.token {
        Some(token) => {
            let token = ConnectionToken::decode(&token)?;
            let hubs = token
                .hub_addresses()
                .iter()
                .map(|hub| HubAddress::parse(hub))
                .collect::<Result<Vec<_>, _>>()?;
            (hubs, token.edge_id, token.secret, token.pin)
        }
        None => {
            let hubs = match args.hub_host {
                Some(host) => vec![HubAddress::new(&host, args.hub_port)],
                None => args
                    .hubs
                    .iter()
                    .map(|hub| HubAddress::parse(hub))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            match (hubs.is_empty(), args.edge_id, args.secret) {
                (false, Some(id), Some(secret)) => (hubs, id, secret, None),
                _ => bail!("give --token, or --hub-host (or --hub) with --edge-id and --secret"),
            }
        }
    };
    let trust = match (args.ca_file, args.hub_pin.or(token_pin), args.insecure) {
        (Some(ca), _, _) => HubTrust::CaFile(ca),
        (None, Some(pin), _) => HubTrust::Pin(pin),
        (None, None, true) => HubTrust::Insecure,
        (None, None, false) => HubTrust::System,
    };
    let mut options = EdgeOptions::new(&hubs[0].host, hubs[0].port, &edge_id, &secret, trust);
    options.hubs = hubs;
    options.hub_connections = args.hub_connections.max(1);
    options.drain_grace = args.service.grace();
    options.bind_address = args.bind_address;
    options.max_connections = args.max_connections;
    options.backoff = BackoffPolicy {
        min: Duration::from_millis(args.reconnect_min_ms.max(1)),
        max: Duration::from_secs(args.reconnect_max_secs.max(1)),
        ..BackoffPolicy::default()
    };
    options.session = args.timers.session()?;
    options.open_confirm_timeout = Duration::from_millis(args.open_confirm_timeout_ms);
    options.udp_idle_timeout = args.udp.idle_timeout();
    options.udp_max_sessions = args.udp.udp_max_sessions;
    options.firewall = match args.firewall {
        FirewallArg::Off => FirewallMode::Off,
        FirewallArg::Auto => FirewallMode::Auto,
        FirewallArg::Required => FirewallMode::Required,
    };
    options.nft_command = args
        .nft_command
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    options.stun_servers = if args.no_stun {
        Vec::new()
    } else {
        args.stun_servers
    };
    options.transport = match args.transport_mode {
        TransportArg::TcpTls => TransportMode::TcpTls,
        TransportArg::Quic => TransportMode::Quic,
        TransportArg::QuicWithFallback => TransportMode::QuicWithFallback,
    };
    options.quic_fallback_after = Duration::from_secs(args.quic_fallback_secs.max(1));
    options.quic_retry_after = Duration::from_secs(args.quic_retry_after_secs);
    let registry = options.registry.clone();
    let edge = Edge::start(options).await?;
    let stop = CancellationToken::new();
    let served = serve_edge_status(edge.clone(), args.status_addr, stop.clone()).await?;
    println!("status API on {}", served.local_addr);
    let ready = edge.clone();
    let draining = edge.clone();
    let service = Service {
        registry,
        metrics_addr: args.metrics_addr,
        ready: Arc::new(move || ready.is_ready()),
        grace: args.service.grace(),
        exit_on_stdin_close: args.service.exit_on_stdin_close,
        stop: stop.clone(),
    };
    service
        .run(
            || edge.stop_accepting(),
            move || draining.status().active_streams,
        )
        .await?;
    edge.shutdown().await;
    let _ = served.task.await;
    Ok(())
}

/// The admin token from its file, else from REMOTEINGRESS_ADMIN_TOKEN.
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    let token = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token file {}", path.display()))?,
        ),
        None => std::env::var("REMOTEINGRESS_ADMIN_TOKEN").ok(),
    };
    match token.map(|t| t.trim().to_owned()) {
        Some(token) if token.is_empty() => bail!("the admin token is empty"),
        token => Ok(token),
    }
}

/// What hub and edge do alike once started: serve metrics, wait for a signal, drain.
struct Service {
    registry: prometheus::Registry,
    metrics_addr: SocketAddr,
    ready: remoteingress_controlplane::Readiness,
    grace: Duration,
    exit_on_stdin_close: bool,
    stop: CancellationToken,
}

impl Service {
    /// Serves `/metrics` until a signal, then stops accepting and drains open connections.
    async fn run(self, stop_accepting: impl FnOnce(), active: impl Fn() -> usize) -> Result<()> {
        let metrics = serve_metrics(
            self.registry,
            self.metrics_addr,
            self.ready,
            self.stop.clone(),
        )
        .await?;
        println!("metrics on http://{}/metrics", metrics.local_addr);
        tokio::select! {
            result = shutdown_signal() => result?,
            () = stdin_closed(), if self.exit_on_stdin_close => {
                tracing::info!("standard input closed: shutting down");
            }
        }
        stop_accepting();
        drain(self.grace, active).await?;
        self.stop.cancel();
        let _ = metrics.task.await;
        Ok(())
    }
}

impl ServiceArgs {
    fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Waits until `active()` is zero, the grace period is over, or a second signal arrives.
async fn drain(grace: Duration, active: impl Fn() -> usize) -> Result<()> {
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    let second_signal = shutdown_signal();
    tokio::pin!(second_signal);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    tracing::info!(
        open = active(),
        grace_secs = grace.as_secs(),
        "draining open connections"
    );
    loop {
        let open = active();
        if open == 0 {
            return Ok(());
        }
        tokio::select! {
            () = &mut deadline => {
                tracing::warn!(open, "grace period over; closing the remaining connections");
                return Ok(());
            }
            result = &mut second_signal => return result,
            _ = poll.tick() => {}
        }
    }
}

/// Resolves once standard input reaches its end (or cannot be read).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut discard = [0u8; 256];
    while let Ok(1..) = stdin.read(&mut discard).await {}
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The liveness timers of `remoteingress edge` given `flags`.
    fn timers(flags: &[&str]) -> TunnelTimers {
        let args = [&["remoteingress", "edge"], flags].concat();
        match Cli::parse_from(args).command {
            Command::Edge(edge) => edge.timers,
            _ => unreachable!("parsed as an edge"),
        }
    }

    #[test]
    fn a_liveness_deadline_shorter_than_two_intervals_is_refused() {
        assert!(timers(&[]).session().is_ok(), "the defaults");
        let error = timers(&["--liveness-interval-ms", "5000"])
            .session()
            .unwrap_err();
        assert!(error.to_string().contains("at least twice"), "{error}");
        let session = timers(&[
            "--liveness-interval-ms",
            "500",
            "--liveness-deadline-ms",
            "1000",
        ])
        .session()
        .unwrap();
        assert_eq!(session.ping_interval, Duration::from_millis(500));
        assert_eq!(session.idle_timeout, Duration::from_secs(1));
    }
}
