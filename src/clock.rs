//! The node's hybrid logical clock.
//!
//! Guarantees: timestamps from `now` strictly increase, also across restarts when the caller
//! restores the last persisted value with `Clock::restore` (stores persist `last()` in the same
//! transaction as the events stamped with it). `observe` folds a remote timestamp in, unless it
//! lies further ahead of physical time than `max_skew`: such a timestamp is counted, logged
//! and ignored, so one bad peer clock cannot drag the mesh into the future.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hlc_gen::{HlcGenerator, HlcTimestamp};

use crate::event::Hlc;

pub struct Clock {
    // Drift checks are ours (see `observe`), so the generator runs with its own check off.
    generator: HlcGenerator,
    max_skew_ms: i64,
    skew_reports: AtomicU64,
    /// The last stamp given to a local change (`stamp_commit`): stamps strictly increase.
    last_stamp: AtomicU64,
}

/// A remote timestamp that was too far ahead to adopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkewReport {
    pub remote: Hlc,
    pub ahead_ms: i64,
}

impl Clock {
    pub fn new(max_skew: Duration) -> Self {
        Self {
            generator: HlcGenerator::new(0),
            max_skew_ms: max_skew.as_millis().min(i64::MAX as u128) as i64,
            skew_reports: AtomicU64::new(0),
            last_stamp: AtomicU64::new(0),
        }
    }

    /// Continues from a persisted timestamp: every later `now` is greater than `last`, even if
    /// the wall clock went backwards while the node was down.
    pub fn restore(max_skew: Duration, last: Hlc) -> Self {
        let clock = Self::new(max_skew);
        if let Ok(ts) = HlcTimestamp::try_from(last.0) {
            // Our own persisted value is trusted: no skew check. A value whose logical counter
            // is used up cannot be adopted as it is: adopt the next millisecond instead.
            let (physical, _) = ts.parts();
            let adopted = clock.generator.update(&ts).is_ok()
                || HlcTimestamp::from_parts(physical + 1, 0).is_ok_and(|next| clock.generator.update(&next).is_ok());
            if !adopted {
                tracing::error!(
                    hlc = last.0,
                    "the persisted clock cannot be adopted; timestamps may repeat it"
                );
            }
        }
        clock.last_stamp.store(last.0, Ordering::Relaxed);
        clock
    }

    /// A fresh timestamp for a local event. When the logical counter of the current
    /// millisecond is used up (over 4 million timestamps in one ms, or a clock that ran ahead
    /// and is being caught up by the wall clock), the physical part moves on by one ms: the
    /// standard HLC carry. It never fails and never goes backwards.
    pub fn now(&self) -> Hlc {
        loop {
            if let Some(ts) = self.generator.next_timestamp() {
                return Hlc(ts.as_u64());
            }
            let (physical, _) = self.generator.timestamp().parts();
            if let Ok(next) = HlcTimestamp::from_parts(physical + 1, 0) {
                let _ = self.generator.update(&next);
            }
        }
    }

    /// The timestamp of a local change the application committed at `committed_at_micros`
    /// (the capture trigger's stamp): that instant, so last-writer-wins orders writes by when
    /// they were made, not by when a drain got to them (a write made while the sidecar was
    /// down must not win over a later one elsewhere). Never ahead of `now` (a database clock
    /// ahead of this host's counts only up to this clock, which the skew policy bounds), and
    /// always after this node's previous stamp, so its own changes keep their order.
    pub fn stamp_commit(&self, committed_at_micros: i64) -> Hlc {
        let now = self.now();
        let committed = HlcTimestamp::from_parts(committed_at_micros.div_euclid(1000), 0)
            .map(|ts| Hlc(ts.as_u64()))
            .unwrap_or(now);
        let mut stamp = committed.min(now);
        let previous = self.last_stamp.load(Ordering::Relaxed);
        if stamp.0 <= previous {
            stamp = Hlc(previous + 1);
        }
        self.last_stamp.fetch_max(stamp.0, Ordering::Relaxed);
        stamp
    }

    /// The timestamp of a local change whose commit time is unknown (a row captured again
    /// after its table was rebuilt without weft's triggers): just after `recorded`, the
    /// row's version this node holds. It wins over that version and over whatever it had
    /// beaten, and loses to every later write this node had not seen yet, as an unknown
    /// instant must not be taken for "now".
    pub fn stamp_after(&self, recorded: Hlc) -> Hlc {
        let stamp = Hlc(recorded.0.saturating_add(1));
        self.last_stamp.fetch_max(stamp.0, Ordering::Relaxed);
        stamp
    }

    /// The greatest timestamp issued or observed so far (what a store persists).
    pub fn last(&self) -> Hlc {
        Hlc(self.generator.timestamp().as_u64())
    }

    /// Folds in a timestamp received from a peer.
    pub fn observe(&self, remote: Hlc, physical_now_ms: i64) -> Result<(), SkewReport> {
        let ahead_ms = remote.physical_ms().saturating_sub(physical_now_ms);
        if ahead_ms > self.max_skew_ms {
            self.skew_reports.fetch_add(1, Ordering::Relaxed);
            return Err(SkewReport { remote, ahead_ms });
        }
        if let Ok(ts) = HlcTimestamp::try_from(remote.0) {
            let _ = self.generator.update(&ts);
        }
        Ok(())
    }

    /// `observe` against the wall clock now.
    pub fn observe_now(&self, remote: Hlc) -> Result<(), SkewReport> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.observe(remote, now_ms)
    }

    /// How many remote timestamps were refused for skew since start.
    pub fn skew_reports(&self) -> u64 {
        self.skew_reports.load(Ordering::Relaxed)
    }
}

/// Wall-clock now in µs since the Unix epoch (lag figures and audit times; never ordering).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn a_commit_is_stamped_at_its_time_but_never_ahead_of_the_clock_nor_behind_the_last() {
        let clock = Clock::new(Duration::from_millis(500));
        let an_hour_ago = now_micros() - 3_600_000_000;
        let stamped = clock.stamp_commit(an_hour_ago);
        assert_eq!(stamped.physical_ms(), an_hour_ago / 1000);
        let same_ms = clock.stamp_commit(an_hour_ago);
        assert!(same_ms > stamped, "a node's own stamps strictly increase");
        let ahead = clock.stamp_commit(now_micros() + 3_600_000_000);
        assert!(ahead <= clock.last(), "a database clock ahead is capped at this clock");
        assert!(ahead.physical_ms() <= wall_ms() + 1);
        let restored = Clock::restore(Duration::from_millis(500), ahead);
        assert!(restored.stamp_commit(an_hour_ago) > ahead, "and across a restart");
    }

    #[test]
    fn a_used_up_logical_counter_carries_into_the_next_millisecond_instead_of_panicking() {
        // A clock persisted an hour ahead (then corrected by NTP) with its counter at the top:
        // the next timestamps must still come, in order.
        let top = (1u64 << 22) - 2;
        let ahead = Hlc(hlc_gen::HlcTimestamp::from_parts(wall_ms() + 3_600_000, top)
            .unwrap()
            .as_u64());
        let clock = Clock::restore(Duration::from_millis(500), ahead);
        let mut last = ahead;
        for _ in 0..5 {
            let next = clock.now();
            assert!(next > last, "{next} after {last}");
            last = next;
        }
        assert_eq!(last.physical_ms(), ahead.physical_ms() + 1, "carried one millisecond");
    }

    #[test]
    fn timestamps_strictly_increase() {
        let clock = Clock::new(Duration::from_millis(500));
        let mut last = clock.now();
        for _ in 0..10_000 {
            let next = clock.now();
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn restore_of_a_clock_whose_logical_counter_is_used_up_never_goes_backwards() {
        let physical = wall_ms() + 3_600_000;
        let full = (0..=(1u64 << 24))
            .rev()
            .find_map(|logical| hlc_gen::HlcTimestamp::from_parts(physical, logical).ok())
            .unwrap();
        let last = Hlc(full.as_u64());
        let clock = Clock::restore(Duration::from_millis(500), last);
        assert!(clock.now() > last);
    }

    #[test]
    fn restore_never_goes_backwards() {
        let ahead = Hlc(hlc_gen::HlcTimestamp::from_parts(wall_ms() + 3_600_000, 7)
            .unwrap()
            .as_u64());
        let clock = Clock::restore(Duration::from_millis(500), ahead);
        assert!(clock.now() > ahead);
    }

    #[test]
    fn observe_adopts_near_timestamps_and_refuses_far_ones() {
        let clock = Clock::new(Duration::from_millis(500));
        let now = wall_ms();
        let near = Hlc(hlc_gen::HlcTimestamp::from_parts(now + 200, 3).unwrap().as_u64());
        clock.observe(near, now).unwrap();
        assert!(clock.now() > near);

        let far = Hlc(hlc_gen::HlcTimestamp::from_parts(now + 60_000, 0).unwrap().as_u64());
        let report = clock.observe(far, now).unwrap_err();
        assert!(report.ahead_ms >= 60_000);
        assert_eq!(clock.skew_reports(), 1);
        assert!(clock.now() < far, "a refused timestamp must not be adopted");
    }
}
