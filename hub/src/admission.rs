//! Admission of unauthenticated tunnel connections: one limiter for the whole hub, shared by
//! the TLS and QUIC listeners.
//!
//! A legitimate storm (a fleet reconnecting to a restarted hub) and a flood must both be met
//! without thrashing: a handshake the hub has begun paying for (its ClientHello arrived) is
//! never thrown away for a newer connection; when every slot is taken the listeners stop
//! accepting, so new connections wait in the kernel's backlog instead of being reset. Only a
//! connection that has sent nothing for [`IDLE_GRACE`] — it cost nothing, and a slowloris looks
//! like that — gives its slot up to a new one. Deadlines shorten while more than half the slots
//! are taken, and each source address has a cap of its own and a budget of failed
//! authentications (a token bucket).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Failure buckets kept at most; past it, full (forgiven) buckets are dropped first.
const MAX_TRACKED_SOURCES: usize = 16_384;

/// How long a connection that has not begun its TLS or QUIC handshake keeps its slot when a
/// newer one needs it. A real edge's ClientHello is in the socket before the hub accepts it.
pub(crate) const IDLE_GRACE: Duration = Duration::from_millis(250);

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
    /// Every slot holds a handshake in progress (the other listener took the last one).
    Full,
}

/// Slots for connections that have not authenticated yet.
pub(crate) struct Admissions {
    limits: AdmissionLimits,
    state: Mutex<State>,
    /// Woken whenever a slot is freed.
    freed: Notify,
}

/// One pending handshake.
struct Pending {
    source: IpAddr,
    since: Instant,
    /// The peer has begun its handshake: the hub is paying for it.
    started: bool,
    /// Cancelled when a newer connection needed the slot.
    evict: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Pending handshakes by admission order (oldest first).
    pending: BTreeMap<u64, Pending>,
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

/// What a full hub can do for a new connection.
enum Room {
    Free,
    /// The oldest idle connection may be evicted from this instant on.
    After(Instant),
    /// Every slot holds a handshake in progress.
    None,
}

impl State {
    fn forget(&mut self, id: u64) -> Option<IpAddr> {
        let pending = self.pending.remove(&id)?;
        if let Some(count) = self.per_source.get_mut(&pending.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&pending.source);
            }
        }
        Some(pending.source)
    }

    /// Makes room for one more connection under `max` at `now` if it can.
    fn make_room(&mut self, max: usize, now: Instant) -> Room {
        if self.pending.len() < max {
            return Room::Free;
        }
        let idle = self
            .pending
            .iter()
            .find(|(_, pending)| !pending.started)
            .map(|(&id, pending)| (id, pending.since + IDLE_GRACE));
        match idle {
            Some((id, evictable)) if evictable <= now => {
                if let Some(pending) = self.pending.get(&id) {
                    pending.evict.cancel();
                }
                self.forget(id);
                Room::Free
            }
            Some((_, evictable)) => Room::After(evictable),
            None => Room::None,
        }
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

impl Admission {
    /// The peer has begun its handshake (its ClientHello arrived): from now on its slot is
    /// never given to a newer connection.
    pub(crate) fn started(&self) {
        if let Some(pending) = self.admissions.state().pending.get_mut(&self.id) {
            pending.started = true;
        }
    }
}

impl Admissions {
    /// A limiter with `limits`.
    pub(crate) fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max(&self) -> usize {
        self.limits.max.max(1)
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

    /// Waits until a new connection can be admitted: a slot is free, or an idle connection
    /// has had its grace and is evicted. Listeners call it before accepting, so that while
    /// every handshake in progress is worth finishing, new connections wait in the backlog.
    pub(crate) async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let room = self.state().make_room(self.max(), Instant::now());
            match room {
                Room::Free => return,
                Room::After(at) => {
                    tokio::select! {
                        () = freed => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Room::None => freed.await,
            }
        }
    }

    /// A slot for a connection from `source`; a QUIC connection has begun its handshake
    /// already (`started`), a TCP connection has not.
    pub(crate) fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        started: bool,
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
        if !matches!(state.make_room(self.max(), now), Room::Free) {
            return Err(Refusal::Full);
        }
        let deadline = if state.pending.len() * 2 >= self.limits.max {
            self.limits.deadline / 4
        } else {
            self.limits.deadline
        };
        state.next += 1;
        let id = state.next;
        let evicted = CancellationToken::new();
        state.pending.insert(
            id,
            Pending {
                source,
                since: now,
                started,
                evict: evicted.clone(),
            },
        );
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
        let freed = self.admissions.state().forget(self.id).is_some();
        if freed {
            self.admissions.freed.notify_waiters();
        }
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
        let first = admissions.admit(A, false, now).expect("first from A");
        let _second = admissions.admit(A, false, now).expect("second from A");
        assert_eq!(
            admissions.admit(A, false, now).err(),
            Some(Refusal::SourceLimit)
        );
        assert!(admissions.admit(B, false, now).is_ok(), "B has its own cap");
        drop(first);
        assert!(
            admissions.admit(A, false, now).is_ok(),
            "a dropped slot is free"
        );
    }

    #[test]
    fn a_full_hub_gives_only_an_idle_connections_slot_away_and_only_after_its_grace() {
        let admissions = Admissions::new(limits(2, 2));
        let now = Instant::now();
        let idle = admissions.admit(A, false, now).unwrap();
        let started = admissions.admit(B, false, now).unwrap();
        started.started();
        assert_eq!(
            started.deadline,
            Duration::from_secs(2),
            "half full: shorter"
        );
        assert_eq!(
            admissions.admit(C, false, now).err(),
            Some(Refusal::Full),
            "the idle connection is still in its grace"
        );
        let later = now + IDLE_GRACE;
        let newest = admissions.admit(C, false, later).expect("room is made");
        assert!(idle.evicted.is_cancelled());
        assert!(!started.evicted.is_cancelled() && !newest.evicted.is_cancelled());
        // The evicted slot's own drop frees nothing twice.
        drop(idle);
        assert_eq!(admissions.state().pending.len(), 2);
        assert!(
            admissions.admit(A, false, later + IDLE_GRACE).is_ok(),
            "A's count was released"
        );
    }

    #[test]
    fn a_handshake_in_progress_is_never_thrown_away_for_a_newer_connection() {
        let admissions = Admissions::new(limits(2, 2));
        let now = Instant::now();
        let quic = admissions.admit(A, true, now).unwrap();
        let tls = admissions.admit(B, false, now).unwrap();
        tls.started();
        let much_later = now + Duration::from_secs(3600);
        assert_eq!(
            admissions.admit(C, true, much_later).err(),
            Some(Refusal::Full)
        );
        assert!(!quic.evicted.is_cancelled() && !tls.evicted.is_cancelled());
    }

    #[tokio::test]
    async fn a_listener_waits_for_room_until_a_handshake_ends() {
        let admissions = Admissions::new(limits(1, 1));
        let held = admissions.admit(A, true, Instant::now()).unwrap();
        let waiting = admissions.clone();
        let listener = tokio::spawn(async move { waiting.room().await });
        // The listener has looked and gone to sleep: only the end of the handshake wakes it.
        let asleep = tokio::time::timeout(Duration::from_millis(50), async {
            while !listener.is_finished() {
                tokio::task::yield_now().await;
            }
        });
        assert!(asleep.await.is_err(), "no room while the handshake goes on");
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), listener)
            .await
            .expect("the end of the handshake wakes the listener")
            .unwrap();
    }

    #[test]
    fn failed_authentications_spend_a_per_source_budget_that_refills() {
        let admissions = Admissions::new(limits(8, 8));
        let now = Instant::now();
        admissions.failed(A, now);
        assert!(
            admissions.admit(A, false, now).is_ok(),
            "one failure is within budget"
        );
        admissions.failed(A, now);
        assert_eq!(
            admissions.admit(A, false, now).err(),
            Some(Refusal::FailureBudget)
        );
        assert!(
            admissions.admit(B, false, now).is_ok(),
            "other sources are unaffected"
        );
        let later = now + Duration::from_secs(30);
        assert!(
            admissions.admit(A, false, later).is_ok(),
            "one token back per 30 s"
        );
    }
}
