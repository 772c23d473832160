//! Applying a configuration from a hub whole or not at all: ports bound, firewall applied,
//! then acknowledged (after the serving lock is released); on any failure the previous configuration stays and the error is reported.
//! With several hubs, only a configuration newer than the running one is applied (see
//! [`crate::offers`]).

use bytes::Bytes;
use remoteingress_tunnel::SessionHandle;
use remoteingress_wire::config::ConfigError;
use remoteingress_wire::frame::FrameType;
use remoteingress_wire::EdgeConfig;
use thiserror::Error;

use crate::firewall::{FirewallError, FirewallState};
use crate::offers::{judge, Disagreement, Offers, Verdict};
use crate::ports::{BindError, PortSet};
use crate::tunnels::TunnelKey;
use crate::udp::UdpPorts;
use crate::{EdgeEvent, EdgeInner};

/// Why a configuration from the hub was not applied.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// Not JSON of the configuration's shape.
    #[error("unreadable configuration: {0}")]
    Unreadable(#[from] serde_json::Error),
    /// A field is out of range or malformed.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A port could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// nftables refused the firewall part.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

/// What the edge serves while at least one tunnel is up: its public listeners, the
/// configuration in force, and what each hub offers.
pub(crate) struct Serving {
    pub(crate) tcp: PortSet,
    pub(crate) udp: UdpPorts,
    /// The configuration in force; `None` until one applied.
    pub(crate) running: Option<EdgeConfig>,
    pub(crate) offers: Offers,
    pub(crate) disagreement: Option<Disagreement>,
}

/// A CONFIG_ACK owed to the hub that sent a configuration. It is sent once the serving lock is
/// released, so that a hub that stops reading its tunnel never holds up the edge's other
/// tunnels.
#[must_use = "an acknowledgement is owed to the hub"]
pub(crate) struct Ack {
    session: SessionHandle,
    /// Nothing to tell a hub that gave no version.
    body: Option<serde_json::Value>,
}

impl Ack {
    /// That `version` is in force, or the `error` that kept it from being applied.
    fn new(session: &SessionHandle, version: Option<u64>, error: Option<&str>) -> Self {
        let body = version.map(|version| match error {
            None => serde_json::json!({ "version": version }),
            Some(error) => serde_json::json!({ "version": version, "error": error }),
        });
        Self {
            session: session.clone(),
            body,
        }
    }

    /// Sends it (call without holding the serving lock).
    pub(crate) async fn send(self) {
        if let Some(body) = self.body {
            acknowledge(&self.session, body).await;
        }
    }
}

/// A configuration offered by `hub` over tunnel `key` (`session`): applied if it is newer than
/// the running one; a disagreement between hubs is reported. Returns the acknowledgement owed.
pub(crate) async fn offer(
    inner: &EdgeInner,
    serving: &mut Serving,
    (key, hub, session): (TunnelKey, &str, &SessionHandle),
    config: &EdgeConfig,
) -> Ack {
    serving.offers.insert(key, hub, config);
    let verdict = judge(serving.running.as_ref(), config);
    let ack = match verdict {
        Verdict::Apply => apply_config(inner, session, serving, config).await,
        Verdict::Unchanged => {
            if let Some(running) = &mut serving.running {
                running.generation = running.generation.max(config.generation);
            }
            Ack::new(session, config.version, None)
        }
        Verdict::Older { .. } | Verdict::Disagrees { .. } => {
            let why = verdict.refusal(config.generation).unwrap_or_default();
            tracing::warn!(%hub, generation = ?config.generation, %why, "configuration not applied");
            Ack::new(session, config.version, Some(&why))
        }
    };
    report_disagreement(inner, serving);
    ack
}

/// Publishes whether live hubs disagree, once per change.
pub(crate) fn report_disagreement(inner: &EdgeInner, serving: &mut Serving) {
    let now = serving.offers.disagreement();
    if now == serving.disagreement {
        return;
    }
    serving.disagreement = now.clone();
    inner
        .metrics
        .config_disagreement
        .set(i64::from(now.is_some()));
    if let Some(disagreement) = &now {
        tracing::error!(generation = disagreement.generation, hubs = ?disagreement.hubs,
            "hubs offer different configurations under one generation; keeping the running one");
        inner.metrics.config_disagreements.inc();
        inner.emit(EdgeEvent::ConfigDisagreement {
            generation: disagreement.generation,
            hubs: disagreement.hubs.clone(),
        });
    }
    inner.update(|s| s.config_disagreement = now);
}

/// Validates and applies a configuration whole, or keeps the previous one; the acknowledgement
/// owed either way.
async fn apply_config(
    inner: &EdgeInner,
    session: &SessionHandle,
    ports: &mut Serving,
    config: &EdgeConfig,
) -> Ack {
    let initial = ports.running.is_none();
    // Firewall entries beyond the edge's own ports (an original hub accepts them) are never
    // applied; the rest of the configuration is.
    let (scoped, left_out) = config.within_edge_scope();
    if !left_out.is_empty() {
        tracing::warn!(entries = ?left_out, "firewall entries that reach beyond the edge's ports were left out");
    }
    // Every new port is bound before anything changes, so a failure leaves the old set whole.
    let bound = async {
        scoped.validate()?;
        let tcp = ports.tcp.bind_new(&config.listen_ports)?;
        let udp = ports.udp.bind_new(&config.listen_ports_udp)?;
        apply_firewall(inner, &scoped).await?;
        Ok::<_, ApplyError>((tcp, udp))
    };
    let (tcp, udp) = match bound.await {
        Ok(bound) => bound,
        Err(error) => return reject(inner, session, config.version, &error),
    };
    ports.tcp.commit(&config.listen_ports, tcp);
    ports.udp.commit(&config.listen_ports_udp, udp);
    ports.running = Some(config.clone());
    inner.stun_interval.send_replace(config.stun_interval_secs);
    let (listen_ports, listen_ports_udp) = (ports.tcp.ports(), ports.udp.ports());
    tracing::info!(tcp = ?listen_ports, udp = ?listen_ports_udp, version = ?config.version,
        generation = ?config.generation, "configuration applied");
    inner
        .metrics
        .config_generation
        .set(config.generation.unwrap_or_default() as i64);
    inner.update(|s| {
        s.listen_ports = listen_ports.clone();
        s.listen_ports_udp = listen_ports_udp.clone();
        s.generation = config.generation;
    });
    inner.emit(if initial {
        EdgeEvent::PortsAssigned {
            listen_ports,
            listen_ports_udp,
        }
    } else {
        EdgeEvent::PortsUpdated {
            listen_ports,
            listen_ports_udp,
        }
    });
    Ack::new(session, config.version, None)
}

/// Applies the firewall part of a configuration, when nftables is in use.
async fn apply_firewall(inner: &EdgeInner, config: &EdgeConfig) -> Result<(), FirewallError> {
    let Some(firewall) = &inner.firewall else {
        return Ok(());
    };
    let result = firewall.apply(config).await;
    let (state, label) = match &result {
        Ok(count) => {
            inner.metrics.firewall_rules.set(*count as i64);
            (FirewallState::Applied(*count), "ok")
        }
        Err(error) => (FirewallState::Error(error.to_string()), "error"),
    };
    inner
        .metrics
        .firewall_applies
        .with_label_values(&[label])
        .inc();
    inner.emit(EdgeEvent::FirewallApplied {
        rules: match &state {
            FirewallState::Applied(count) => *count,
            _ => 0,
        },
        error: result.as_ref().err().map(ToString::to_string),
    });
    inner.update(|s| s.firewall = Some(state));
    result.map(|count| tracing::info!(rules = count, "firewall applied"))
}

/// Reports a configuration that was not applied (logs, status, events); the CONFIG_ACK owed.
pub(crate) fn reject(
    inner: &EdgeInner,
    session: &SessionHandle,
    version: Option<u64>,
    error: &ApplyError,
) -> Ack {
    let error = error.to_string();
    tracing::error!(?version, %error, "configuration rejected; keeping the previous one");
    inner.update(|s| s.last_error = Some(error.clone()));
    inner.emit(EdgeEvent::ConfigRejected {
        version,
        error: error.clone(),
    });
    Ack::new(session, version, Some(&error))
}

/// Sends a CONFIG_ACK (an applied version, an error, or the public IP).
pub(crate) async fn acknowledge(session: &SessionHandle, ack: serde_json::Value) {
    let _ = session
        .send_control(FrameType::ConfigAck, Bytes::from(ack.to_string()))
        .await;
}
