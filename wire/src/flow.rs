//! Credit-based flow control per stream, for both directions of the TLS transport.
//!
//! Every stream starts with [`INITIAL_WINDOW`] bytes of credit in each direction, known to both
//! sides. The receiver then raises the credit to its adaptive window ([`window_for`]) with
//! WINDOW_UPDATE frames and keeps topping it up as it writes bytes onward, so it never holds more
//! unconsumed bytes than it granted.

use thiserror::Error;

/// Default memory budget shared by all streams of one tunnel.
pub const DEFAULT_BUDGET: u64 = 200 * 1024 * 1024;
/// Smallest per-stream window.
pub const MIN_WINDOW: u32 = 64 * 1024;
/// Largest per-stream window.
pub const MAX_WINDOW: u32 = 4 * 1024 * 1024;
/// Window of a stream classified as sustained (elephant).
pub const SUSTAINED_WINDOW: u32 = 1024 * 1024;
/// Credit every stream has before any WINDOW_UPDATE.
pub const INITIAL_WINDOW: u32 = MIN_WINDOW;

/// The window each stream gets when `active_streams` share `budget` bytes.
pub fn window_for(budget: u64, active_streams: usize) -> u32 {
    let share = budget / (active_streams.max(1) as u64);
    share.clamp(u64::from(MIN_WINDOW), u64::from(MAX_WINDOW)) as u32
}

/// A flow-control violation by the peer; the tunnel is closed with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FlowError {
    /// A WINDOW_UPDATE granting zero bytes.
    #[error("window update of zero bytes")]
    ZeroIncrement,
    /// A WINDOW_UPDATE that would raise the credit past the largest window.
    #[error("window update raises credit past {MAX_WINDOW} bytes")]
    CreditOverflow,
    /// Data beyond the credit granted.
    #[error("peer sent {len} bytes with only {credit} bytes of credit")]
    WindowExceeded {
        /// Bytes received.
        len: u32,
        /// Credit the peer had.
        credit: u32,
    },
}

/// The sending side's view: how many bytes it may still send on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCredit {
    available: u32,
}

impl Default for SendCredit {
    fn default() -> Self {
        Self {
            available: INITIAL_WINDOW,
        }
    }
}

impl SendCredit {
    /// Bytes that may be sent now.
    pub fn available(&self) -> u32 {
        self.available
    }

    /// Takes up to `wanted` bytes of credit and returns how many were taken.
    pub fn take(&mut self, wanted: usize) -> usize {
        let taken = self
            .available
            .min(u32::try_from(wanted).unwrap_or(u32::MAX));
        self.available -= taken;
        taken as usize
    }

    /// Applies a WINDOW_UPDATE from the receiver.
    pub fn grant(&mut self, increment: u32) -> Result<(), FlowError> {
        if increment == 0 {
            return Err(FlowError::ZeroIncrement);
        }
        match self.available.checked_add(increment) {
            Some(total) if total <= MAX_WINDOW => {
                self.available = total;
                Ok(())
            }
            _ => Err(FlowError::CreditOverflow),
        }
    }
}

/// The receiving side's view: credit granted to the peer and bytes not yet written onward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    peer_credit: u32,
    unconsumed: u32,
}

impl Default for RecvWindow {
    fn default() -> Self {
        Self {
            peer_credit: INITIAL_WINDOW,
            unconsumed: 0,
        }
    }
}

impl RecvWindow {
    /// Bytes received and not yet consumed (buffered on this side).
    pub fn unconsumed(&self) -> u32 {
        self.unconsumed
    }

    /// Accounts for `len` received bytes; an error if the peer had no credit for them.
    pub fn on_data(&mut self, len: u32) -> Result<(), FlowError> {
        if len > self.peer_credit {
            return Err(FlowError::WindowExceeded {
                len,
                credit: self.peer_credit,
            });
        }
        self.peer_credit -= len;
        self.unconsumed += len;
        Ok(())
    }

    /// Accounts for `len` bytes written onward and returns the WINDOW_UPDATE increment to send,
    /// if one is due, to bring the peer's credit back up to `window`.
    pub fn on_consumed(&mut self, len: u32, window: u32) -> Option<u32> {
        debug_assert!(len <= self.unconsumed, "consumed more than received");
        self.unconsumed -= len.min(self.unconsumed);
        self.top_up(window)
    }

    /// The increment that raises the peer's credit to `window`, if the gap is worth a frame
    /// (a quarter of the window); a smaller `window` than before simply grants less later.
    pub fn top_up(&mut self, window: u32) -> Option<u32> {
        let outstanding = self.peer_credit + self.unconsumed;
        let gap = window.saturating_sub(outstanding);
        if gap == 0 || gap < window / 4 {
            return None;
        }
        self.peer_credit += gap;
        Some(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u32 = 1024;
    const MIB: u32 = 1024 * 1024;

    #[test]
    fn window_shares_the_budget_within_bounds() {
        let w = |n| window_for(DEFAULT_BUDGET, n);
        assert_eq!(w(0), 4 * MIB);
        assert_eq!(w(1), 4 * MIB);
        assert_eq!(w(50), 4 * MIB);
        assert_eq!(w(51), (200 * MIB) / 51);
        assert!(w(51) < 4 * MIB);
        assert_eq!(w(200), MIB);
        assert!(w(201) < MIB);
        assert_eq!(w(3200), 64 * KIB);
        assert_eq!(w(100_000), 64 * KIB);
        for n in 1..=3200usize {
            assert!(u64::from(w(n)) * n as u64 <= DEFAULT_BUDGET, "{n} streams");
        }
    }

    #[test]
    fn receiver_raises_then_tops_up_credit() {
        let mut recv = RecvWindow::default();
        let mut send = SendCredit::default();
        assert_eq!(send.available(), INITIAL_WINDOW);
        let raise = recv.top_up(4 * MIB).unwrap();
        assert_eq!(raise, 4 * MIB - INITIAL_WINDOW);
        send.grant(raise).unwrap();
        assert_eq!(send.available(), 4 * MIB);

        assert_eq!(send.take(5 * MIB as usize), 4 * MIB as usize);
        recv.on_data(4 * MIB).unwrap();
        assert_eq!(recv.unconsumed(), 4 * MIB);
        assert_eq!(
            recv.on_data(1),
            Err(FlowError::WindowExceeded { len: 1, credit: 0 })
        );

        assert_eq!(recv.on_consumed(MIB / 2, 4 * MIB), None, "below a quarter");
        assert_eq!(recv.on_consumed(MIB / 2, 4 * MIB), Some(MIB));
        send.grant(MIB).unwrap();
        assert_eq!(send.available(), MIB);
        assert_eq!(recv.unconsumed(), 3 * MIB);
    }

    #[test]
    fn receiver_never_holds_more_than_its_window() {
        let mut recv = RecvWindow::default();
        let mut send = SendCredit::default();
        let window = 256 * KIB;
        if let Some(raise) = recv.top_up(window) {
            send.grant(raise).unwrap();
        }
        for round in 0..1000u32 {
            let n = send.take((round as usize * 7919) % 100_000 + 1) as u32;
            recv.on_data(n).unwrap();
            assert!(recv.unconsumed() <= window);
            let consumed = recv.unconsumed() / 2;
            if let Some(inc) = recv.on_consumed(consumed, window) {
                send.grant(inc).unwrap();
            }
            assert!(send.available() + recv.unconsumed() <= window);
        }
    }

    #[test]
    fn shrinking_window_grants_less() {
        let mut recv = RecvWindow::default();
        recv.top_up(4 * MIB);
        recv.on_data(4 * MIB).unwrap();
        assert_eq!(recv.on_consumed(4 * MIB, MIB), Some(MIB));
        assert_eq!(recv.on_consumed(0, MIB), None);
    }

    #[test]
    fn bad_updates_are_errors() {
        let mut send = SendCredit::default();
        assert_eq!(send.grant(0), Err(FlowError::ZeroIncrement));
        assert_eq!(send.grant(MAX_WINDOW), Err(FlowError::CreditOverflow));
        assert_eq!(send.grant(u32::MAX), Err(FlowError::CreditOverflow));
        assert_eq!(send.available(), INITIAL_WINDOW);
    }
}
