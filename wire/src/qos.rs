//! The tunnel writer's three priority lanes and the elephant-flow classifier.
//!
//! Control frames always go first; data frames next; frames of sustained streams last, but with
//! a guaranteed drain of [`SUSTAINED_MIN_RATE`] so they are never starved. Each lane is bounded.
//! Time is passed in by the caller.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bytes per second the sustained lane gets even while the data lane is busy.
pub const SUSTAINED_MIN_RATE: f64 = 1_000_000.0;
/// How long a stream must be active before it can be classified as sustained.
pub const SUSTAINED_AFTER: Duration = Duration::from_secs(10);
/// Average rate (bytes per second) above which an old enough stream is sustained.
pub const SUSTAINED_RATE: f64 = 2_500_000.0;
/// Most sustained-lane allowance that accumulates while the lane is idle.
const SUSTAINED_BURST: f64 = 64.0 * 1024.0;

/// Which lane a frame is queued on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// PING, PONG, WINDOW_UPDATE*, OPEN, CLOSE*, CONFIG, UDP_OPEN/CLOSE.
    Control,
    /// DATA, DATA_BACK and UDP datagrams of ordinary streams.
    Data,
    /// DATA of streams classified as sustained.
    Sustained,
}

/// Bounds of the lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLimits {
    /// Most frames queued on the control lane.
    pub control_frames: usize,
    /// Most payload bytes queued on the data and the sustained lane, each.
    pub data_bytes: usize,
}

impl Default for LaneLimits {
    fn default() -> Self {
        Self {
            control_frames: 1000,
            data_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug)]
struct Queue<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
        }
    }

    fn push(&mut self, item: T, len: usize) {
        self.bytes += len;
        self.items.push_back((item, len));
    }

    fn pop(&mut self) -> Option<(T, usize)> {
        let (item, len) = self.items.pop_front()?;
        self.bytes -= len;
        Some((item, len))
    }
}

/// Three bounded lanes drained in priority order.
#[derive(Debug)]
pub struct Scheduler<T> {
    limits: LaneLimits,
    control: Queue<T>,
    data: Queue<T>,
    sustained: Queue<T>,
    allowance: f64,
    refilled_at: Option<Instant>,
}

impl<T> Scheduler<T> {
    /// Empty lanes with the given bounds.
    pub fn new(limits: LaneLimits) -> Self {
        Self {
            limits,
            control: Queue::new(),
            data: Queue::new(),
            sustained: Queue::new(),
            allowance: 0.0,
            refilled_at: None,
        }
    }

    /// Queues `item` of `len` payload bytes; gives it back if the lane is full.
    ///
    /// A data lane holding less than its bound takes one more frame of any size, so a single
    /// large frame is never refused forever.
    pub fn push(&mut self, lane: Lane, item: T, len: usize) -> Result<(), T> {
        if self.is_full(lane) {
            return Err(item);
        }
        match lane {
            Lane::Control => &mut self.control,
            Lane::Data => &mut self.data,
            Lane::Sustained => &mut self.sustained,
        }
        .push(item, len);
        Ok(())
    }

    /// True when the lane would refuse another frame.
    pub fn is_full(&self, lane: Lane) -> bool {
        match lane {
            Lane::Control => self.control.items.len() >= self.limits.control_frames,
            Lane::Data => self.data.bytes >= self.limits.data_bytes,
            Lane::Sustained => self.sustained.bytes >= self.limits.data_bytes,
        }
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.control.items.is_empty()
            && self.data.items.is_empty()
            && self.sustained.items.is_empty()
    }

    /// The next frame to write at `now`, and its lane.
    pub fn pop(&mut self, now: Instant) -> Option<(Lane, T)> {
        self.refill(now);
        if let Some((item, _)) = self.control.pop() {
            return Some((Lane::Control, item));
        }
        if self.allowance > 0.0 || self.data.items.is_empty() {
            if let Some((item, len)) = self.sustained.pop() {
                if !self.data.items.is_empty() {
                    self.allowance -= len as f64;
                }
                return Some((Lane::Sustained, item));
            }
        }
        self.data.pop().map(|(item, _)| (Lane::Data, item))
    }

    fn refill(&mut self, now: Instant) {
        let since = self
            .refilled_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.refilled_at = Some(now);
        self.allowance =
            (self.allowance + since.as_secs_f64() * SUSTAINED_MIN_RATE).min(SUSTAINED_BURST);
    }
}

/// Tracks a stream's average rate to decide when it becomes sustained (sticky once reached).
#[derive(Debug, Clone)]
pub struct StreamRate {
    opened_at: Instant,
    bytes: u64,
    sustained: bool,
}

impl StreamRate {
    /// A stream opened at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            opened_at: now,
            bytes: 0,
            sustained: false,
        }
    }

    /// Counts bytes carried; returns whether the stream is sustained as of `now`.
    pub fn record(&mut self, now: Instant, bytes: usize) -> bool {
        self.bytes += bytes as u64;
        if !self.sustained {
            let age = now.saturating_duration_since(self.opened_at);
            self.sustained =
                age > SUSTAINED_AFTER && self.bytes as f64 / age.as_secs_f64() > SUSTAINED_RATE;
        }
        self.sustained
    }

    /// Whether the stream has been classified as sustained.
    pub fn is_sustained(&self) -> bool {
        self.sustained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_always_first() {
        let now = Instant::now();
        let mut scheduler = Scheduler::new(LaneLimits::default());
        scheduler.push(Lane::Sustained, "s", 10).unwrap();
        scheduler.push(Lane::Data, "d1", 10).unwrap();
        scheduler.push(Lane::Control, "c1", 0).unwrap();
        scheduler.push(Lane::Data, "d2", 10).unwrap();
        scheduler.push(Lane::Control, "c2", 0).unwrap();
        assert_eq!(scheduler.pop(now), Some((Lane::Control, "c1")));
        assert_eq!(scheduler.pop(now), Some((Lane::Control, "c2")));
        assert_eq!(scheduler.pop(now), Some((Lane::Data, "d1")));
        scheduler.push(Lane::Control, "c3", 0).unwrap();
        assert_eq!(scheduler.pop(now), Some((Lane::Control, "c3")));
        assert_eq!(scheduler.pop(now), Some((Lane::Data, "d2")));
        assert_eq!(scheduler.pop(now), Some((Lane::Sustained, "s")));
        assert_eq!(scheduler.pop(now), None);
        assert!(scheduler.is_empty());
    }

    #[test]
    fn sustained_gets_its_guaranteed_rate_under_data_load() {
        const FRAME: usize = 16 * 1024;
        let start = Instant::now();
        let mut now = start;
        let mut scheduler = Scheduler::new(LaneLimits::default());
        let mut sent = [0usize; 2];
        let per_frame = Duration::from_secs_f64(FRAME as f64 / 100_000_000.0);
        while now - start < Duration::from_secs(10) {
            while !scheduler.is_full(Lane::Data) {
                scheduler.push(Lane::Data, 0, FRAME).unwrap();
            }
            while !scheduler.is_full(Lane::Sustained) {
                scheduler.push(Lane::Sustained, 1, FRAME).unwrap();
            }
            let (_, which) = scheduler.pop(now).unwrap();
            sent[which] += FRAME;
            now += per_frame;
        }
        let sustained_rate = sent[1] as f64 / 10.0;
        assert!(
            sustained_rate >= 0.95 * SUSTAINED_MIN_RATE,
            "{sustained_rate}"
        );
        assert!(
            sustained_rate <= 1.2 * SUSTAINED_MIN_RATE,
            "{sustained_rate}"
        );
        assert!(sent[0] > 90 * sent[1], "data keeps priority: {sent:?}");
    }

    #[test]
    fn lanes_are_bounded() {
        let mut scheduler = Scheduler::new(LaneLimits {
            control_frames: 2,
            data_bytes: 100,
        });
        scheduler.push(Lane::Control, 1, 0).unwrap();
        scheduler.push(Lane::Control, 2, 0).unwrap();
        assert_eq!(scheduler.push(Lane::Control, 3, 0), Err(3));
        scheduler.push(Lane::Data, 4, 99).unwrap();
        scheduler.push(Lane::Data, 5, 1000).unwrap();
        assert_eq!(scheduler.push(Lane::Data, 6, 1), Err(6));
        assert!(scheduler.is_full(Lane::Data));
        assert!(!scheduler.is_full(Lane::Sustained));
    }

    #[test]
    fn sustained_only_after_ten_seconds_above_the_rate() {
        let start = Instant::now();
        let at = |secs: f64| start + Duration::from_secs_f64(secs);

        let mut fast_but_young = StreamRate::new(start);
        assert!(!fast_but_young.record(at(9.9), 1_000_000_000));

        let mut old_and_fast = StreamRate::new(start);
        old_and_fast.record(at(5.0), 15_000_000);
        assert!(
            !old_and_fast.record(at(10.0), 15_000_000),
            "exactly 10 s is not more"
        );
        assert!(old_and_fast.record(at(10.1), 1));
        assert!(old_and_fast.record(at(100.0), 0), "sticky once classified");
        assert!(old_and_fast.is_sustained());

        let mut old_and_slow = StreamRate::new(start);
        assert!(!old_and_slow.record(at(20.0), 49_000_000));
    }
}
