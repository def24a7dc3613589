//! Live figures of one node: counters, capture-to-apply lag, per-peer replication state.
//!
//! Everything here is cheap to update from hot paths (atomics; one short mutex for the lag
//! histogram and the peer table) and is read by `weft demo`, `weft bench`, the periodic status
//! log line and tests. Lag is measured from the application's commit (stamped by the capture
//! trigger) to the remote apply commit, on the wall clocks of the two machines. The transport
//! reports into these figures through its `PeerObserver` port, implemented here.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use prometheus_client::metrics::family::Family;

use crate::event::NodeId;
use crate::store::ApplyReport;
use crate::transport::PeerObserver;

#[derive(Default, Debug, Clone, serde::Serialize)]
pub struct PeerState {
    pub connected: bool,
    /// Highest own seq sent and acknowledged on the current connection.
    pub sent: u64,
    pub acked: u64,
    pub reconnects: u64,
    /// Origins relayed to this peer because their direct link to it is down.
    pub relaying: Vec<NodeId>,
    /// How far ahead of this node's clock the peer's was at its last heartbeat (negative:
    /// behind), the network's delay included.
    pub clock_ahead_ms: i64,
}

/// Labels of the exported metrics: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

fn lag_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 1 ms to about 65 s, doubling.
    prometheus_client::metrics::histogram::Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

pub struct Metrics {
    pub captured: AtomicU64,
    pub applied: AtomicU64,
    pub stale: AtomicU64,
    pub conflicts: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates: AtomicU64,
    pub looped: AtomicU64,
    pub skew_reports: AtomicU64,
    pub gaps: AtomicU64,
    /// Peers found needing events this node's log no longer holds (they need a re-seed).
    pub behind_log: AtomicU64,
    /// Log entries dropped by the retention limits before every peer had them.
    pub log_trimmed_unacked: AtomicU64,
    /// Snapshot rows installed while joining.
    pub joined_rows: AtomicU64,
    /// Values of columns this region's tables lack, left out of applied events
    /// (`unknown_columns = "drop"`).
    pub unknown_columns_dropped: AtomicU64,
    /// Events processed past a frontier (applied, stale, conflicting or dead-lettered).
    pub processed: AtomicU64,
    /// Background audits run, and what the last one found (rows differing for good, rows
    /// that kept changing).
    pub audits: AtomicU64,
    pub audit_differing: AtomicU64,
    pub audit_unsettled: AtomicU64,
    /// Tombstones purged below the causal stability horizon.
    pub tombstones_purged: AtomicU64,
    /// Batches refused from peers (forged origins, paths, versions, clocks).
    pub refused_batches: AtomicU64,
    lag_micros: Mutex<Histogram<u64>>,
    /// Capture-to-apply lag in seconds per origin (label `origin`), for `/metrics`.
    pub lag_by_origin: Family<Labels, prometheus_client::metrics::histogram::Histogram>,
    /// The lag of the newest event applied from each origin and when it was applied (µs),
    /// for `/readyz`.
    newest_lag: Mutex<BTreeMap<NodeId, (i64, i64)>>,
    /// The worst lag (µs) per origin in each of the last windows of `LAG_WINDOW_MICROS`,
    /// oldest first, by window start: the console's lag chart.
    lag_windows: Mutex<std::collections::VecDeque<(i64, BTreeMap<NodeId, i64>)>>,
    peers: Mutex<BTreeMap<NodeId, PeerState>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            captured: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            looped: AtomicU64::new(0),
            skew_reports: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            behind_log: AtomicU64::new(0),
            log_trimmed_unacked: AtomicU64::new(0),
            joined_rows: AtomicU64::new(0),
            unknown_columns_dropped: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            audits: AtomicU64::new(0),
            audit_differing: AtomicU64::new(0),
            audit_unsettled: AtomicU64::new(0),
            tombstones_purged: AtomicU64::new(0),
            refused_batches: AtomicU64::new(0),
            lag_micros: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")),
            lag_by_origin: Family::new_with_constructor(lag_histogram),
            newest_lag: Mutex::new(BTreeMap::new()),
            lag_windows: Mutex::new(std::collections::VecDeque::new()),
            peers: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The console's lag chart: windows of 5 s, the last 10 minutes of them.
const LAG_WINDOW_MICROS: i64 = 5_000_000;
const LAG_WINDOWS: usize = 120;

/// Lag percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Lag {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Metrics {
    pub fn record_apply(&self, report: &ApplyReport, now_micros: i64) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.captured, report.drained.events);
        add(&self.applied, report.applied);
        add(&self.stale, report.stale);
        add(&self.conflicts, report.conflicts);
        add(&self.dead_lettered, report.dead_lettered);
        add(&self.unknown_columns_dropped, report.columns_dropped);
        add(&self.duplicates, report.duplicates);
        add(&self.looped, report.looped);
        add(&self.skew_reports, report.skew.len() as u64);
        add(&self.gaps, u64::from(report.gap.is_some()));
        add(&self.processed, report.committed_at.len() as u64);
        let mut lag = self.lag_micros.lock().expect("lag histogram lock");
        for &at in &report.committed_at {
            let _ = lag.record((now_micros - at).max(1) as u64);
        }
        drop(lag);
        let mut at = report.committed_at.iter();
        let mut newest = self.newest_lag.lock().expect("newest lag lock");
        let mut worst = BTreeMap::new();
        for (origin, n) in &report.committed_by {
            let histogram = self.lag_by_origin.get_or_create(&vec![("origin", origin.clone())]);
            let mut last = None;
            for &committed in at.by_ref().take(*n) {
                let lag = (now_micros - committed).max(0);
                histogram.observe(lag as f64 / 1e6);
                let w = worst.entry(origin).or_insert(0);
                *w = lag.max(*w);
                last = Some(committed);
            }
            if let Some(committed) = last {
                newest.insert(origin.clone(), (now_micros - committed, now_micros));
            }
        }
        drop(newest);
        if !worst.is_empty() {
            self.note_worst_lags(worst, now_micros);
        }
    }

    /// Folds a run's worst lag per origin into the current window.
    fn note_worst_lags(&self, worst: BTreeMap<&NodeId, i64>, now_micros: i64) {
        let start = now_micros - now_micros.rem_euclid(LAG_WINDOW_MICROS);
        let mut windows = self.lag_windows.lock().expect("lag windows lock");
        if windows.back().is_none_or(|(at, _)| *at != start) {
            windows.push_back((start, BTreeMap::new()));
            while windows.len() > LAG_WINDOWS {
                windows.pop_front();
            }
        }
        if let Some((_, current)) = windows.back_mut() {
            for (origin, lag) in worst {
                let w = current.entry(origin.clone()).or_insert(0);
                *w = lag.max(*w);
            }
        }
    }

    /// The worst lag (µs) per origin in each recent window, oldest first, by window start.
    pub fn lag_window(&self) -> Vec<(i64, BTreeMap<NodeId, i64>)> {
        self.lag_windows
            .lock()
            .expect("lag windows lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The lag (µs) of the newest event applied from each origin.
    pub fn newest_lags(&self) -> BTreeMap<NodeId, i64> {
        let newest = self.newest_lag.lock().expect("newest lag lock");
        newest.iter().map(|(origin, (lag, _))| (origin.clone(), *lag)).collect()
    }

    /// The origins whose events this node is applying late: an event applied within the
    /// last `max` was older than `max` when it landed (a catch-up). An origin that sends
    /// nothing, or whose link is down, is not late: what arrived has been applied.
    pub fn applying_late(&self, max: std::time::Duration, now_micros: i64) -> Vec<(NodeId, std::time::Duration)> {
        let max_micros = max.as_micros().min(i64::MAX as u128) as i64;
        let newest = self.newest_lag.lock().expect("newest lag lock");
        (newest.iter())
            .filter(|(_, (lag, at))| *lag > max_micros && now_micros - at <= max_micros)
            .map(|(origin, &(lag, _))| (origin.clone(), std::time::Duration::from_micros(lag.max(0) as u64)))
            .collect()
    }

    pub fn lag(&self) -> Lag {
        let h = self.lag_micros.lock().expect("lag histogram lock");
        let ms = |v: u64| v as f64 / 1000.0;
        Lag {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// Forgets lag samples (benchmarks measure a steady state after warm-up).
    pub fn reset_lag(&self) {
        self.lag_micros.lock().expect("lag histogram lock").reset();
    }

    pub fn update_peer(&self, peer: &str, update: impl FnOnce(&mut PeerState)) {
        let mut peers = self.peers.lock().expect("peer table lock");
        update(peers.entry(peer.to_owned()).or_default());
    }

    pub fn peers(&self) -> BTreeMap<NodeId, PeerState> {
        self.peers.lock().expect("peer table lock").clone()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl PeerObserver for Metrics {
    fn joined_rows(&self, rows: u64) {
        self.joined_rows.fetch_add(rows, Ordering::Relaxed);
    }

    fn refused(&self) {
        self.refused_batches.fetch_add(1, Ordering::Relaxed);
    }

    fn behind_log(&self, _peer: &str) {
        self.behind_log.fetch_add(1, Ordering::Relaxed);
    }

    fn peer_connected(&self, peer: &str, own_sent: u64) {
        self.update_peer(peer, |p| {
            p.connected = true;
            p.sent = own_sent;
            p.acked = own_sent;
        });
    }

    fn peer_lost(&self, peer: &str) {
        self.update_peer(peer, |p| {
            p.connected = false;
            p.reconnects += 1;
        });
    }

    fn sent(&self, peer: &str, own_seq: u64) {
        self.update_peer(peer, |p| p.sent = own_seq);
    }

    fn acked(&self, peer: &str, own_seq: u64) {
        self.update_peer(peer, |p| p.acked = p.acked.max(own_seq));
    }

    fn relaying(&self, peer: &str, origins: &[NodeId]) {
        self.update_peer(peer, |p| p.relaying = origins.to_vec());
    }

    fn applied(&self, report: &ApplyReport, now_micros: i64) {
        self.record_apply(report, now_micros);
    }

    fn clock_offset(&self, peer: &str, ahead_ms: i64, refused: bool) {
        if refused {
            self.skew_reports.fetch_add(1, Ordering::Relaxed);
        }
        self.update_peer(peer, |p| p.clock_ahead_ms = ahead_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_node_is_late_while_it_applies_old_events_and_not_once_they_are_applied() {
        let metrics = Metrics::default();
        let report = |committed: i64| ApplyReport {
            committed_at: vec![committed],
            committed_by: vec![("east-1".to_owned(), 1)],
            ..ApplyReport::default()
        };
        let s = 1_000_000;
        metrics.record_apply(&report(100 * s), 160 * s);
        let late = metrics.applying_late(Duration::from_secs(30), 165 * s);
        assert_eq!(late, [("east-1".to_owned(), Duration::from_secs(60))]);
        assert!(
            metrics.applying_late(Duration::from_secs(30), 191 * s).is_empty(),
            "nothing applied late in the last 30 s: caught up, or nothing sent"
        );
        metrics.record_apply(&report(165 * s), 166 * s);
        assert!(metrics.applying_late(Duration::from_secs(30), 167 * s).is_empty());
        assert_eq!(
            Metrics::get(&metrics.processed),
            2,
            "the lag figures count each event once"
        );
    }
}
