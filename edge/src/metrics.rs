//! The edge's Prometheus metrics: counters moved where things happen, and a collector that reads
//! the current tunnel at scrape time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Weak;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::tunnels::hub_name;
use crate::{EdgeInner, TunnelState};

/// Metrics moved by edge code; all named `remoteingress_*`.
pub(crate) struct EdgeMetrics {
    pub(crate) tunnel_connected: IntGauge,
    pub(crate) tunnel_reconnects: IntCounter,
    pub(crate) tunnels_suspect: IntCounter,
    pub(crate) opens_retried: IntCounter,
    pub(crate) client_connections: IntCounterVec,
    pub(crate) udp_dropped: IntCounterVec,
    pub(crate) firewall_rules: IntGauge,
    pub(crate) firewall_applies: IntCounterVec,
    pub(crate) public_ip: prometheus::IntGaugeVec,
    pub(crate) config_generation: IntGauge,
    pub(crate) config_disagreement: IntGauge,
    pub(crate) config_disagreements: IntCounter,
}

impl EdgeMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let tunnel_connected = IntGauge::new(
            "remoteingress_tunnel_connected",
            "1 while at least one tunnel to a hub is up",
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
        let tunnels_suspect = IntCounter::new(
            "remoteingress_tunnels_suspect_total",
            "Tunnels whose hub went silent or left an open unconfirmed; each was replaced",
        )?;
        let opens_retried = IntCounter::new(
            "remoteingress_opens_retried_total",
            "Client connections moved to another tunnel, first bytes included, because their \
             open was not confirmed in time",
        )?;
        registry.register(Box::new(tunnels_suspect.clone()))?;
        registry.register(Box::new(opens_retried.clone()))?;
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
        let config_generation = IntGauge::new(
            "remoteingress_config_generation",
            "Generation of the configuration in force",
        )?;
        let config_disagreement = IntGauge::new(
            "remoteingress_config_disagreement",
            "1 while hubs offer different configurations under one generation",
        )?;
        let config_disagreements = IntCounter::new(
            "remoteingress_config_disagreements_total",
            "Times hubs were found offering different configurations under one generation",
        )?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(config_disagreement.clone()))?;
        registry.register(Box::new(config_disagreements.clone()))?;
        Ok(Self {
            config_generation,
            config_disagreement,
            config_disagreements,
            public_ip,
            tunnel_connected,
            tunnel_reconnects,
            tunnels_suspect,
            opens_retried,
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
    "Last round trip of each tunnel, by hub instance",
);
const TUNNEL_STREAMS: (&str, &str) = (
    "remoteingress_tunnel_streams_active",
    "Tunnelled TCP connections open now on each tunnel, by hub instance",
);
const TUNNELS: (&str, &str) = (
    "remoteingress_tunnels",
    "Tunnels up, by state (active, draining, suspect)",
);

/// Reads the current tunnel at scrape time.
pub(crate) struct LiveCollector {
    pub(crate) edge: Weak<EdgeInner>,
    descs: Vec<Desc>,
}

impl LiveCollector {
    pub(crate) fn new(edge: Weak<EdgeInner>) -> Self {
        let descs = [STREAMS, UDP, BYTES, RTT, TUNNEL_STREAMS, TUNNELS]
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
            let rtt = prometheus::GaugeVec::new(Opts::new(RTT.0, RTT.1), &["hub"])?;
            let tunnel_streams =
                IntGaugeVec::new(Opts::new(TUNNEL_STREAMS.0, TUNNEL_STREAMS.1), &["hub"])?;
            let tunnels = IntGaugeVec::new(Opts::new(TUNNELS.0, TUNNELS.1), &["state"])?;
            for state in [
                TunnelState::Active,
                TunnelState::Draining,
                TunnelState::Suspect,
            ] {
                tunnels.with_label_values(&[state.as_str()]).set(0);
            }
            let mut totals = *edge.ended.lock().unwrap_or_else(|p| p.into_inner());
            for session in edge.tunnels.sessions() {
                totals.add(Totals::of(session.stats()));
            }
            for tunnel in edge.tunnels.statuses() {
                let hub = hub_name(tunnel.hub_id.as_deref(), &tunnel.address).to_owned();
                streams.add(tunnel.active_streams as i64);
                udp.add(tunnel.active_udp_sessions as i64);
                tunnel_streams
                    .with_label_values(&[&hub])
                    .set(tunnel.active_streams as i64);
                tunnels.with_label_values(&[tunnel.state.as_str()]).inc();
                if let Some(measured) = tunnel.rtt {
                    rtt.with_label_values(&[&hub]).set(measured.as_secs_f64());
                }
            }
            bytes.with_label_values(&["in"]).inc_by(totals.bytes_in);
            bytes.with_label_values(&["out"]).inc_by(totals.bytes_out);
            Ok([
                streams.collect(),
                udp.collect(),
                bytes.collect(),
                rtt.collect(),
                tunnel_streams.collect(),
                tunnels.collect(),
            ]
            .concat())
        };
        build().unwrap_or_default()
    }
}
