//! Admission of unauthenticated tunnel connections: one limiter for the whole hub, shared by
//! the TLS and QUIC listeners. Under a flood it keeps room for a legitimate edge: a full hub
//! evicts its oldest pending handshake instead of refusing the newest, deadlines shorten while
//! more than half the slots are taken, and each source address has a cap of its own and a
//! budget of failed authentications (a token bucket).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Failure buckets kept at most; past it, full (forgiven) buckets are dropped first.
const MAX_TRACKED_SOURCES: usize = 16_384;

/// The limits of [`Admissions`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdmissionLimits {
    /// Pending handshakes in all.
    pub(crate) max: usize,
    /// Pending handshakes from one address.
    pub(crate) max_per_source: usize,
    /// Time for TLS plus the handshake line while the hub is at most half full.
    pub(crate) deadline: Duration,
    /// Failed authentications one address may have per minute (also its burst).
    pub(crate) failures_per_minute: u32,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address has as many pending handshakes as it may.
    SourceLimit,
    /// Its address failed to authenticate too often lately.
    FailureBudget,
}

/// Slots for connections that have not authenticated yet.
pub(crate) struct Admissions {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Pending handshakes by admission order (oldest first), with their eviction signal.
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, Bucket>,
    next: u64,
}

/// A failure budget: `tokens` left as of `at`.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl State {
    fn forget(&mut self, id: u64) -> Option<IpAddr> {
        let (source, _) = self.pending.remove(&id)?;
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(source)
    }
}

/// Holds one unauthenticated slot until dropped.
pub(crate) struct Admission {
    id: u64,
    admissions: Arc<Admissions>,
    /// Cancelled when a newer connection needed the slot.
    pub(crate) evicted: CancellationToken,
    /// Time left for TLS plus the handshake line.
    pub(crate) deadline: Duration,
}

impl Admissions {
    /// A limiter with `limits`.
    pub(crate) fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most failures one address may have in reserve.
    fn budget(&self) -> f64 {
        f64::from(self.limits.failures_per_minute)
    }

    /// The tokens `bucket` holds at `now`, refilled at the budget per minute.
    fn tokens_at(&self, bucket: &Bucket, now: Instant) -> f64 {
        let earned = now.duration_since(bucket.at).as_secs_f64() * self.budget() / 60.0;
        (bucket.tokens + earned).min(self.budget())
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        bucket.tokens = self.tokens_at(bucket, now);
        bucket.at = now;
    }

    /// A slot for a connection from `source`; when the hub is full the oldest pending
    /// handshake is evicted to make room.
    pub(crate) fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let mut state = self.state();
        if let Some(bucket) = state.failures.get_mut(&source) {
            self.refill(bucket, now);
            if bucket.tokens < 1.0 {
                return Err(Refusal::FailureBudget);
            }
        }
        if state.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
            return Err(Refusal::SourceLimit);
        }
        while state.pending.len() >= self.limits.max.max(1) {
            let Some((&oldest, _)) = state.pending.first_key_value() else {
                break;
            };
            if let Some((_, evict)) = state.pending.get(&oldest) {
                evict.cancel();
            }
            state.forget(oldest);
        }
        let deadline = if state.pending.len() * 2 >= self.limits.max {
            self.limits.deadline / 4
        } else {
            self.limits.deadline
        };
        state.next += 1;
        let id = state.next;
        let evicted = CancellationToken::new();
        state.pending.insert(id, (source, evicted.clone()));
        *state.per_source.entry(source).or_default() += 1;
        Ok(Admission {
            id,
            admissions: self.clone(),
            evicted,
            deadline,
        })
    }

    /// Takes one failed authentication from `source`'s budget.
    pub(crate) fn failed(&self, source: IpAddr, now: Instant) {
        let full = Bucket {
            tokens: self.budget(),
            at: now,
        };
        let mut state = self.state();
        if state.failures.len() >= MAX_TRACKED_SOURCES && !state.failures.contains_key(&source) {
            // Forget addresses whose budget has refilled: they hold nothing against them.
            state
                .failures
                .retain(|_, bucket| self.tokens_at(bucket, now) < self.budget());
            if state.failures.len() >= MAX_TRACKED_SOURCES {
                return;
            }
        }
        let bucket = state.failures.entry(source).or_insert(full);
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admissions.state().forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, max_per_source: usize) -> AdmissionLimits {
        AdmissionLimits {
            max,
            max_per_source,
            deadline: Duration::from_secs(8),
            failures_per_minute: 2,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 3));

    #[test]
    fn caps_per_source_and_frees_on_drop() {
        let admissions = Admissions::new(limits(8, 2));
        let now = Instant::now();
        let first = admissions.admit(A, now).expect("first from A");
        let _second = admissions.admit(A, now).expect("second from A");
        assert_eq!(admissions.admit(A, now).err(), Some(Refusal::SourceLimit));
        assert!(admissions.admit(B, now).is_ok(), "B has its own cap");
        drop(first);
        assert!(admissions.admit(A, now).is_ok(), "a dropped slot is free");
    }

    #[test]
    fn a_full_hub_evicts_its_oldest_handshake_for_the_newest() {
        let admissions = Admissions::new(limits(2, 2));
        let now = Instant::now();
        let oldest = admissions.admit(A, now).unwrap();
        let middle = admissions.admit(B, now).unwrap();
        assert_eq!(
            middle.deadline,
            Duration::from_secs(2),
            "half full: shorter"
        );
        let newest = admissions.admit(C, now).expect("room is made");
        assert!(oldest.evicted.is_cancelled());
        assert!(!middle.evicted.is_cancelled() && !newest.evicted.is_cancelled());
        // The evicted slot's own drop frees nothing twice.
        drop(oldest);
        assert_eq!(admissions.state().pending.len(), 2);
        assert!(admissions.admit(A, now).is_ok(), "A's count was released");
    }

    #[test]
    fn failed_authentications_spend_a_per_source_budget_that_refills() {
        let admissions = Admissions::new(limits(8, 8));
        let now = Instant::now();
        admissions.failed(A, now);
        assert!(
            admissions.admit(A, now).is_ok(),
            "one failure is within budget"
        );
        admissions.failed(A, now);
        assert_eq!(admissions.admit(A, now).err(), Some(Refusal::FailureBudget));
        assert!(
            admissions.admit(B, now).is_ok(),
            "other sources are unaffected"
        );
        let later = now + Duration::from_secs(30);
        assert!(
            admissions.admit(A, later).is_ok(),
            "one token back per 30 s"
        );
    }
}
