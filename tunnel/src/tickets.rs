//! Session tickets a hub can still read after a restart: the keys are derived from the hub's
//! private key and the current period, so a restarted hub — or a replica with the same
//! identity — resumes an edge's TLS or QUIC session instead of paying for a full handshake.
//!
//! The price: whoever holds the hub's private key can read the tickets of the last two periods
//! (the resumption secret, not the traffic: TLS 1.3 resumption here always adds a fresh key
//! exchange). That key can impersonate the hub anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// How long one key makes tickets; its tickets are read for one period more.
const PERIOD_SECS: u64 = 6 * 3600;
/// Bytes before the sealed ticket: its period, then the nonce.
const HEADER_LEN: usize = 8 + NONCE_LEN;

/// Makes and reads tickets with keys derived from the hub's identity.
pub(crate) struct StableTicketer {
    secret: hkdf::Prk,
    random: SystemRandom,
    /// Tickets read back successfully: sessions resumed.
    resumed: Arc<AtomicU64>,
}

impl std::fmt::Debug for StableTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableTicketer").finish_non_exhaustive()
    }
}

impl StableTicketer {
    /// A ticketer keyed by `identity_key` (the hub's private key, DER), counting the tickets it
    /// reads back in `resumed`.
    pub(crate) fn new(identity_key: &[u8], resumed: Arc<AtomicU64>) -> Self {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"remoteingress session tickets v1");
        Self {
            secret: salt.extract(identity_key),
            random: SystemRandom::new(),
            resumed,
        }
    }

    fn key(&self, period: u64) -> Option<LessSafeKey> {
        let period = period.to_be_bytes();
        let info = [&period[..]];
        let okm = self.secret.expand(&info, &CHACHA20_POLY1305).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }

    fn current_period() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() / PERIOD_SECS)
    }

    /// `plain` sealed with the key of `period`.
    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + plain.len() + 16);
        ticket.extend_from_slice(&period.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        self.key(period)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(period.to_be_bytes()),
                &mut sealed,
            )
            .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    /// The contents of `ticket` if it was sealed by this identity in period `now` or the one
    /// before.
    fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        let (period, rest) = ticket.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let period_number = u64::from_be_bytes(*period);
        if period_number != now && period_number.checked_add(1) != Some(now) {
            return None;
        }
        let mut plain = sealed.to_vec();
        let opened = self
            .key(period_number)?
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(*period),
                &mut plain,
            )
            .ok()?
            .len();
        plain.truncate(opened);
        Some(plain)
    }
}

impl ProducesTickets for StableTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(Self::current_period(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.open(Self::current_period(), cipher)?;
        self.resumed.fetch_add(1, Ordering::Relaxed);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticketer(key: &[u8]) -> StableTicketer {
        StableTicketer::new(key, Arc::default())
    }

    #[test]
    fn a_ticket_is_read_by_any_ticketer_of_the_same_identity_for_two_periods() {
        let sealed = ticketer(b"identity").seal(100, b"session").unwrap();
        let restarted = ticketer(b"identity");
        assert_eq!(
            restarted.open(100, &sealed).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(
            restarted.open(101, &sealed).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(restarted.open(102, &sealed), None, "two periods later");
        assert_eq!(restarted.open(99, &sealed), None, "from the future");
        assert_eq!(ticketer(b"another").open(100, &sealed), None);
    }

    #[test]
    fn a_changed_or_truncated_ticket_is_refused() {
        let ticketer = ticketer(b"identity");
        let sealed = ticketer.seal(7, b"session").unwrap();
        for at in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[at] ^= 1;
            assert_eq!(ticketer.open(7, &changed), None, "byte {at} changed");
            assert_eq!(ticketer.open(7, &sealed[..at]), None, "cut at {at}");
        }
    }
}
