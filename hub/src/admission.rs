//! Admission of unauthenticated tunnel connections: one limiter for the whole hub, shared by
//! the TLS and QUIC listeners, with a global cap and a cap per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Slots for connections that have not authenticated yet.
pub(crate) struct Admissions {
    global: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
}

/// Holds one unauthenticated slot (global and per source) until dropped.
pub(crate) struct Admission {
    _global: OwnedSemaphorePermit,
    source: IpAddr,
    admissions: Arc<Admissions>,
}

impl Admissions {
    /// At most `max` connections in all and `max_per_source` from one address.
    pub(crate) fn new(max: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(max)),
            per_source: Mutex::new(HashMap::new()),
            max_per_source,
        })
    }

    /// A slot for a connection from `source`, or `None` when a cap is reached.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Admission> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        let mut counts = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(source).or_default();
        if *count >= self.max_per_source {
            return None;
        }
        *count += 1;
        Some(Admission {
            _global: permit,
            source,
            admissions: self.clone(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self
            .admissions
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_globally_and_per_source_and_frees_on_drop() {
        let admissions = Admissions::new(3, 2);
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let first = admissions.admit(a).expect("first from a");
        let _second = admissions.admit(a).expect("second from a");
        assert!(
            admissions.admit(a).is_none(),
            "third from a is over its cap"
        );
        let _third = admissions.admit(b).expect("b has its own cap");
        assert!(admissions.admit(b).is_none(), "the global cap is reached");
        drop(first);
        assert!(
            admissions.admit(a).is_some(),
            "a dropped slot is free again"
        );
    }
}
