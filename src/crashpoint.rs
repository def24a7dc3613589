//! Crash points for the crash tests: `WEFT_CRASHPOINT=NAME:N` aborts the process (no unwinding,
//! no destructors, no flushing: what a `kill -9` does) the Nth time execution reaches the
//! point named NAME. Unset, a crash point costs one relaxed atomic load.
//!
//! Points: `after-drain` (events committed to the log, not yet sent) and `after-apply`
//! (a batch committed, not yet acknowledged), `after-snapshot-page` (a joining node installed
//! a chunk of its snapshot); `capture-panics` panics the capture task
//! instead (`panic_point`). A few points are not crashes but lost replies
//! (`reply_lost`): `pg-drain-reply-lost` (`sqlite-drain-reply-lost`) makes a PostgreSQL
//! (SQLite) drain report an error after its commit succeeded, as when the server goes away
//! while answering.
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn armed() -> &'static Option<(String, u64)> {
    ARMED.get_or_init(|| {
        let spec = std::env::var("WEFT_CRASHPOINT").ok()?;
        let (name, count) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
        Some((name.to_owned(), count.parse().unwrap_or(1)))
    })
}

pub fn hit(name: &str) {
    if let Some((armed, count)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *count
    {
        eprintln!("weft: crash point {name} reached; aborting");
        std::process::abort();
    }
}

/// Like `hit`, but the task panics instead of the process aborting: for the test of what a
/// panic in one task does to the sidecar (point `capture-panics`, in the capture loop).
pub fn panic_point(name: &str) {
    if let Some((armed, count)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *count
    {
        panic!("crash point {name} reached");
    }
}

/// Whether to pretend, this time, that the reply to a commit was lost (see the module doc).
pub fn reply_lost(name: &str) -> bool {
    if let Some((armed, count)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *count
    {
        eprintln!("weft: failpoint {name} reached; reporting the commit as failed");
        return true;
    }
    false
}
