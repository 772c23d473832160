//! The edge's Prometheus metrics: counters moved where things happen, and a collector that reads
//! the current tunnel at scrape time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Weak;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::EdgeInner;

/// Metrics moved by edge code; all named `remoteingress_*`.
pub(crate) struct EdgeMetrics {
    pub(crate) tunnel_connected: IntGauge,
    pub(crate) tunnel_reconnects: IntCounter,
    pub(crate) client_connections: IntCounterVec,
    pub(crate) udp_dropped: IntCounterVec,
    pub(crate) firewall_rules: IntGauge,
    pub(crate) firewall_applies: IntCounterVec,
    pub(crate) public_ip: prometheus::IntGaugeVec,
}

impl EdgeMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let tunnel_connected = IntGauge::new(
            "remoteingress_tunnel_connected",
            "1 while the tunnel to the hub is up",
        )?;
        let tunnel_reconnects = IntCounter::new(
            "remoteingress_tunnel_reconnects_total",
            "Tunnels re-established after a loss",
        )?;
        let client_connections = IntCounterVec::new(
            Opts::new(
                "remoteingress_client_connections_total",
                "Client TCP connections accepted and UDP sessions opened, by port and protocol",
            ),
            &["port", "protocol"],
        )?;
        registry.register(Box::new(tunnel_connected.clone()))?;
        registry.register(Box::new(tunnel_reconnects.clone()))?;
        registry.register(Box::new(client_connections.clone()))?;
        let udp_dropped = IntCounterVec::new(
            Opts::new(
                "remoteingress_udp_dropped_total",
                "UDP datagrams or sessions dropped, by reason (session_limit, tunnel_down, \
                 queue_full, socket_busy)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(udp_dropped.clone()))?;
        let firewall_rules = IntGauge::new(
            "remoteingress_firewall_rules",
            "nftables rules in force in the remoteingress table",
        )?;
        let firewall_applies = IntCounterVec::new(
            Opts::new(
                "remoteingress_firewall_apply_total",
                "Firewall configurations applied, by result (ok, error)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(firewall_rules.clone()))?;
        registry.register(Box::new(firewall_applies.clone()))?;
        let public_ip = prometheus::IntGaugeVec::new(
            Opts::new(
                "remoteingress_public_ip_info",
                "1, labelled with the public IP learned by STUN",
            ),
            &["ip"],
        )?;
        registry.register(Box::new(public_ip.clone()))?;
        Ok(Self {
            public_ip,
            tunnel_connected,
            tunnel_reconnects,
            client_connections,
            udp_dropped,
            firewall_rules,
            firewall_applies,
        })
    }
}

/// Traffic of ended tunnels, so that counters never go backwards.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl Totals {
    pub(crate) fn of(stats: &remoteingress_tunnel::SessionStats) -> Self {
        Self {
            bytes_in: stats.bytes_in.load(Ordering::Relaxed),
            bytes_out: stats.bytes_out.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(&mut self, other: Totals) {
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }
}

const STREAMS: (&str, &str) = (
    "remoteingress_streams_active",
    "Tunnelled TCP connections open now",
);
const UDP: (&str, &str) = ("remoteingress_udp_sessions_active", "UDP sessions open now");
const BYTES: (&str, &str) = (
    "remoteingress_bytes_total",
    "Payload bytes carried, by direction (in: from the hub, out: to the hub)",
);
const RTT: (&str, &str) = (
    "remoteingress_tunnel_rtt_seconds",
    "Last round trip of the tunnel",
);

/// Reads the current tunnel at scrape time.
pub(crate) struct LiveCollector {
    pub(crate) edge: Weak<EdgeInner>,
    descs: Vec<Desc>,
}

impl LiveCollector {
    pub(crate) fn new(edge: Weak<EdgeInner>) -> Self {
        let descs = [STREAMS, UDP, BYTES, RTT]
            .iter()
            .filter_map(|(name, help)| {
                Desc::new((*name).into(), (*help).into(), vec![], HashMap::new()).ok()
            })
            .collect();
        Self { edge, descs }
    }
}

impl Collector for LiveCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(edge) = self.edge.upgrade() else {
            return Vec::new();
        };
        let build = || -> prometheus::Result<Vec<MetricFamily>> {
            let streams = IntGauge::new(STREAMS.0, STREAMS.1)?;
            let udp = IntGauge::new(UDP.0, UDP.1)?;
            let bytes = IntCounterVec::new(Opts::new(BYTES.0, BYTES.1), &["direction"])?;
            let rtt = prometheus::Gauge::new(RTT.0, RTT.1)?;
            let mut totals = *edge.ended.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(session) = &*edge.session.lock().unwrap_or_else(|p| p.into_inner()) {
                let stats = session.stats();
                totals.add(Totals::of(stats));
                streams.set(session.active_streams() as i64);
                if let Some(measured) = session.rtt() {
                    rtt.set(measured.as_secs_f64());
                }
                udp.set(stats.udp_sessions.load(Ordering::Relaxed) as i64);
            }
            bytes.with_label_values(&["in"]).inc_by(totals.bytes_in);
            bytes.with_label_values(&["out"]).inc_by(totals.bytes_out);
            Ok([
                streams.collect(),
                udp.collect(),
                bytes.collect(),
                rtt.collect(),
            ]
            .concat())
        };
        build().unwrap_or_default()
    }
}
