//! The hub's Prometheus metrics: counters moved where things happen, and a collector that reads
//! live tunnel state (connected edges, streams, bytes) at scrape time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Weak;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::HubInner;

/// Metrics moved by hub code; all named `remoteingress_*`, labelled by edge id at most.
pub(crate) struct HubMetrics {
    pub(crate) edge_connections: IntCounterVec,
    pub(crate) auth_failures: IntCounterVec,
    pub(crate) streams_opened: IntCounterVec,
    pub(crate) target_connect_errors: IntCounterVec,
    pub(crate) opens_refused: IntCounterVec,
    pub(crate) target_connect_duration: Histogram,
    pub(crate) udp_datagrams: IntCounterVec,
    pub(crate) udp_dropped: IntCounterVec,
    pub(crate) config_pushes: IntCounterVec,
    pub(crate) tunnel_rtt: prometheus::GaugeVec,
    pub(crate) config_reloads: IntCounterVec,
    pub(crate) config_reload_ok: IntGauge,
    pub(crate) handshakes: prometheus::IntCounter,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl HubMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let target_connect_duration = Histogram::with_opts(
            HistogramOpts::new(
                "remoteingress_target_connect_duration_seconds",
                "Time to connect to a target",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )?;
        registry.register(Box::new(target_connect_duration.clone()))?;
        let tunnel_rtt = prometheus::GaugeVec::new(
            Opts::new(
                "remoteingress_tunnel_rtt_seconds",
                "Last PING round trip per edge",
            ),
            &["edge"],
        )?;
        registry.register(Box::new(tunnel_rtt.clone()))?;
        let config_reload_ok = IntGauge::new(
            "remoteingress_config_last_reload_successful",
            "1 if the last change of the edges file was applied, 0 if it was rejected (the \
             hub keeps the edges it had)",
        )?;
        registry.register(Box::new(config_reload_ok.clone()))?;
        config_reload_ok.set(1);
        let handshakes = prometheus::IntCounter::new(
            "remoteingress_tunnel_handshakes_total",
            "TLS or QUIC handshakes the hub began (a ClientHello arrived), whatever came of them",
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        Ok(Self {
            edge_connections: counter(
                registry,
                "remoteingress_edge_connections_total",
                "Tunnel connections of configured edges, by result (ok, rejected)",
                &["edge", "result"],
            )?,
            auth_failures: counter(
                registry,
                "remoteingress_auth_failures_total",
                "Tunnel connections that failed to authenticate, by reason",
                &["reason"],
            )?,
            streams_opened: counter(
                registry,
                "remoteingress_streams_opened_total",
                "Tunnelled TCP connections opened",
                &["edge"],
            )?,
            target_connect_errors: counter(
                registry,
                "remoteingress_target_connect_errors_total",
                "Tunnelled connections whose target could not be reached",
                &["edge"],
            )?,
            opens_refused: counter(
                registry,
                "remoteingress_opens_refused_total",
                "Streams and UDP sessions refused: a port the edge is not assigned (reason \
                 not_assigned), a client address no client has (client_address), or a stream past \
                 the edge's limit across its tunnels (edge_limit) or the hub's on connections to \
                 targets (hub_limit)",
                &["edge", "protocol", "reason"],
            )?,
            target_connect_duration,
            udp_datagrams: counter(
                registry,
                "remoteingress_udp_datagrams_total",
                "UDP datagrams carried, by direction (in: from clients, out: to clients)",
                &["edge", "direction"],
            )?,
            udp_dropped: counter(
                registry,
                "remoteingress_udp_dropped_total",
                "UDP datagrams or sessions dropped, by reason",
                &["edge", "reason"],
            )?,
            config_pushes: counter(
                registry,
                "remoteingress_config_pushes_total",
                "Configurations sent to connected edges",
                &["edge"],
            )?,
            tunnel_rtt,
            config_reloads: counter(
                registry,
                "remoteingress_config_reloads_total",
                "Changes of the edges file seen, by result (applied, rejected)",
                &["result"],
            )?,
            config_reload_ok,
            handshakes,
        })
    }
}

/// Per-edge totals of tunnels that have ended, so counters never go backwards.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) flow_stalls: u64,
}

impl Totals {
    pub(crate) fn of(stats: &remoteingress_tunnel::SessionStats) -> Self {
        Self {
            bytes_in: stats.bytes_in.load(Ordering::Relaxed),
            bytes_out: stats.bytes_out.load(Ordering::Relaxed),
            flow_stalls: stats.flow_stalls.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(&mut self, other: Totals) {
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.flow_stalls += other.flow_stalls;
    }
}

/// Reads live tunnel state at scrape time.
pub(crate) struct LiveCollector {
    pub(crate) hub: Weak<HubInner>,
    descs: Vec<Desc>,
}

const EDGES_CONNECTED: (&str, &str) = ("remoteingress_edges_connected", "Edges whose tunnel is up");
const STREAMS_ACTIVE: (&str, &str) = (
    "remoteingress_streams_active",
    "Tunnelled TCP connections open now",
);
const UDP_ACTIVE: (&str, &str) = ("remoteingress_udp_sessions_active", "UDP sessions open now");
const BYTES: (&str, &str) = (
    "remoteingress_tunnel_bytes_total",
    "Payload bytes carried, by direction (in: from the edge, out: to the edge)",
);
const STALLS: (&str, &str) = (
    "remoteingress_flow_control_stalls_total",
    "Times a stream waited for credit from the edge",
);
const RESUMED: (&str, &str) = (
    "remoteingress_tunnel_handshakes_resumed_total",
    "Handshakes that resumed an earlier session from its ticket instead of a full handshake",
);

impl LiveCollector {
    pub(crate) fn new(hub: Weak<HubInner>) -> Self {
        let descs = [
            EDGES_CONNECTED,
            STREAMS_ACTIVE,
            UDP_ACTIVE,
            BYTES,
            STALLS,
            RESUMED,
        ]
        .iter()
        .filter_map(|(name, help)| {
            Desc::new((*name).into(), (*help).into(), vec![], HashMap::new()).ok()
        })
        .collect();
        Self { hub, descs }
    }
}

impl Collector for LiveCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(hub) = self.hub.upgrade() else {
            return Vec::new();
        };
        let build = || -> prometheus::Result<Vec<MetricFamily>> {
            let connected = IntGauge::new(EDGES_CONNECTED.0, EDGES_CONNECTED.1)?;
            let streams =
                IntGaugeVec::new(Opts::new(STREAMS_ACTIVE.0, STREAMS_ACTIVE.1), &["edge"])?;
            let udp = IntGaugeVec::new(Opts::new(UDP_ACTIVE.0, UDP_ACTIVE.1), &["edge"])?;
            let bytes = IntCounterVec::new(Opts::new(BYTES.0, BYTES.1), &["edge", "direction"])?;
            let stalls = IntCounterVec::new(Opts::new(STALLS.0, STALLS.1), &["edge"])?;
            let resumed = prometheus::IntCounter::new(RESUMED.0, RESUMED.1)?;
            resumed.inc_by(hub.resumed.load(Ordering::Relaxed));
            let registry = hub.registry();
            connected.set(registry.connected_edge_count() as i64);
            for (edge, live, totals) in registry.traffic() {
                if let Some(live) = live {
                    streams.with_label_values(&[&edge]).set(live.streams as i64);
                    udp.with_label_values(&[&edge])
                        .set(live.udp_sessions as i64);
                }
                bytes
                    .with_label_values(&[&edge, "in"])
                    .inc_by(totals.bytes_in);
                bytes
                    .with_label_values(&[&edge, "out"])
                    .inc_by(totals.bytes_out);
                stalls
                    .with_label_values(&[&edge])
                    .inc_by(totals.flow_stalls);
            }
            Ok([
                connected.collect(),
                streams.collect(),
                udp.collect(),
                bytes.collect(),
                stalls.collect(),
                resumed.collect(),
            ]
            .concat())
        };
        build().unwrap_or_default()
    }
}

/// What is open right now on one edge's tunnels.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Live {
    pub(crate) streams: usize,
    pub(crate) udp_sessions: u64,
}
