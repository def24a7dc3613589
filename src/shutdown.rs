//! The one shutdown signal: a `watch` channel whose value turns `true` once, at stop.
//!
//! Every long-running loop selects on `stopped` next to its work, so a stop reaches all of
//! them at once; a dropped sender counts as a stop, so nothing outlives its node.
use tokio::sync::watch;

/// Resolves once the signal is set (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
