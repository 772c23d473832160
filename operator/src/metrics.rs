//! The operator's Prometheus metrics and its health: how long and how well passes go, which
//! hubs answer, the Edges by condition, whether this replica leads, whether its watches work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::crd::EdgeStatus;
use crate::hubs::HubReport;

/// The operator's metrics, all named `remoteingress_operator_*`.
#[derive(Clone)]
pub struct OperatorMetrics {
    reconcile: Histogram,
    errors: IntCounterVec,
    hubs: IntGaugeVec,
    edges: IntGaugeVec,
    leader: IntGauge,
}

impl std::fmt::Debug for OperatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorMetrics").finish_non_exhaustive()
    }
}

impl OperatorMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reconcile = Histogram::with_opts(
            HistogramOpts::new(
                "remoteingress_operator_reconcile_duration_seconds",
                "Time of one pass over every Edge and Service",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "remoteingress_operator_errors_total",
                "Failures, by what failed (secrets: the pass was retried; generation, status, \
                 token: that object was retried)",
            ),
            &["stage"],
        )?;
        let hubs = IntGaugeVec::new(
            Opts::new(
                "remoteingress_operator_hubs",
                "Hub replicas by state (reachable, unreachable, refused: it refused the last push)",
            ),
            &["state"],
        )?;
        let edges = IntGaugeVec::new(
            Opts::new(
                "remoteingress_operator_edges",
                "Edges by condition and status",
            ),
            &["condition", "status"],
        )?;
        let leader = IntGauge::new(
            "remoteingress_operator_leader",
            "1 while this replica leads (holds the Lease, or runs without leader election)",
        )?;
        registry.register(Box::new(reconcile.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(hubs.clone()))?;
        registry.register(Box::new(edges.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            reconcile,
            errors,
            hubs,
            edges,
            leader,
        })
    }

    /// Times a pass.
    pub(crate) fn pass(&self) -> prometheus::HistogramTimer {
        self.reconcile.start_timer()
    }

    /// Counts a failure at `stage`.
    pub(crate) fn failed(&self, stage: &str) {
        self.errors.with_label_values(&[stage]).inc();
    }

    /// Whether this replica leads.
    pub(crate) fn leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The hubs' states from their reports.
    pub(crate) fn hubs<'a>(&self, reports: impl Iterator<Item = &'a HubReport> + Clone) {
        let count = |state: fn(&HubReport) -> bool| reports.clone().filter(|r| state(r)).count();
        for (state, n) in [
            ("reachable", count(|r| r.unreachable.is_none())),
            ("unreachable", count(|r| r.unreachable.is_some())),
            ("refused", count(|r| r.refused.is_some())),
        ] {
            self.hubs.with_label_values(&[state]).set(n as i64);
        }
    }

    /// The Edges by condition, from their statuses.
    pub(crate) fn edges<'a>(&self, statuses: impl Iterator<Item = &'a EdgeStatus>) {
        self.edges.reset();
        for status in statuses {
            for condition in &status.conditions {
                self.edges
                    .with_label_values(&[&condition.kind, &condition.status])
                    .inc();
            }
        }
    }
}

/// Whether the operator's watches work: set once every cache is filled, cleared by a watch
/// error, set again by the next event. What its readiness probe reports.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    /// True while every watch works.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}
