//! How much of a sidecar's listener one address, or everyone together, may hold: open
//! connections (in all, and per address) and the rate at which an address opens streams
//! (each Hello of a replication stream, each snapshot and each audit request).
//!
//! A connection over the limit is closed as soon as it is accepted, before its TLS handshake
//! costs anything; a stream open over the rate is answered `RESOURCE_EXHAUSTED` with the
//! limit and when to retry. Each is logged once per address and kind until that address is
//! back under its limit, so a flood cannot fill the log either. Honest meshes stay far
//! below the defaults: a node holds one connection per peer and opens a stream per
//! reconnect, with a backoff that starts at 50 ms. The books are bounded too: an address
//! leaves the connection book with its last connection and the rate book once its bucket is
//! full again.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The limits, from the node's `[replication]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub connections: usize,
    pub connections_per_address: usize,
    /// Stream opens per address: the sustained rate per second and the burst.
    pub opens_per_sec: f64,
    pub open_burst: f64,
}

/// The listener's books: who holds how many connections, and each address's open bucket.
pub struct Gate {
    limits: Limits,
    inner: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    total: usize,
    held: HashMap<IpAddr, usize>,
    buckets: HashMap<IpAddr, Bucket>,
    /// Addresses whose refusal was logged and that have not been admitted since.
    logged: HashMap<IpAddr, [bool; 2]>,
    /// Requests refused after the connection was admitted (a peer claiming another node,
    /// another mesh): when each (address, what) was last logged.
    refusals: HashMap<(IpAddr, String), Instant>,
}

/// How often one address's refusal of one kind is logged at most.
const REFUSAL_LOGGED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why a connection or a stream was turned away.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Busy {
    #[error("{addr} holds {held} connections, the most one address may (max_connections_per_address)")]
    Address { addr: IpAddr, held: usize },
    #[error("this node holds {total} connections, the most it takes (max_connections)")]
    Full { total: usize },
    #[error(
        "{addr} opens streams faster than {per_sec}/s (bursts of {burst}; opens_per_address_per_sec): retry in {retry_ms} ms"
    )]
    Rate {
        addr: IpAddr,
        per_sec: f64,
        burst: f64,
        retry_ms: u64,
    },
}

impl Limits {
    /// The limits a node's `[replication]` settings give; bursts of four times the rate.
    pub fn of(config: &crate::config::ReplicationConfig) -> Self {
        let per_sec = f64::from(config.opens_per_address_per_sec);
        Self {
            connections: config.max_connections,
            connections_per_address: config.max_connections_per_address,
            opens_per_sec: per_sec,
            open_burst: (per_sec * 4.0).max(4.0),
        }
    }
}

impl Busy {
    fn kind(&self) -> usize {
        match self {
            Busy::Address { .. } | Busy::Full { .. } => 0,
            Busy::Rate { .. } => 1,
        }
    }
}

/// A held connection: its place in the books is given back when the connection ends.
pub struct Permit {
    gate: Arc<Gate>,
    addr: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut books = self.gate.inner.lock().expect("gate lock");
        books.total -= 1;
        if let Some(held) = books.held.get_mut(&self.addr) {
            *held -= 1;
            if *held == 0 {
                books.held.remove(&self.addr);
            }
        }
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Books::default()),
        })
    }

    /// Takes a place for a new connection from `addr`, or says why there is none.
    pub fn connect(self: &Arc<Self>, addr: IpAddr) -> Result<Permit, Busy> {
        let mut books = self.inner.lock().expect("gate lock");
        let held = books.held.get(&addr).copied().unwrap_or(0);
        let refused = if books.total >= self.limits.connections {
            Some(Busy::Full { total: books.total })
        } else if held >= self.limits.connections_per_address {
            Some(Busy::Address { addr, held })
        } else {
            None
        };
        if let Some(busy) = refused {
            log_once(&mut books, addr, &busy);
            return Err(busy);
        }
        books.total += 1;
        *books.held.entry(addr).or_insert(0) += 1;
        clear_logged(&mut books, addr, 0);
        Ok(Permit {
            gate: self.clone(),
            addr,
        })
    }

    /// Counts a stream opened by `addr` at `now` against its rate.
    pub fn open(&self, addr: IpAddr, now: Instant) -> Result<(), Busy> {
        let Limits {
            opens_per_sec,
            open_burst,
            ..
        } = self.limits;
        let mut books = self.inner.lock().expect("gate lock");
        if books.buckets.len() > 4096 {
            // Full buckets hold nothing worth keeping: a new bucket starts full.
            books
                .buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * opens_per_sec < open_burst);
        }
        let bucket = books.buckets.entry(addr).or_insert(Bucket {
            tokens: open_burst,
            at: now,
        });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * opens_per_sec).min(open_burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            clear_logged(&mut books, addr, 1);
            return Ok(());
        }
        let retry_ms = ((1.0 - bucket.tokens) / opens_per_sec * 1000.0).ceil() as u64;
        let busy = Busy::Rate {
            addr,
            per_sec: opens_per_sec,
            burst: open_burst,
            retry_ms,
        };
        log_once(&mut books, addr, &busy);
        Err(busy)
    }
}

impl Gate {
    /// Whether a request of `addr` refused for `what` (an RPC and the node it claimed) is
    /// logged now: once a minute per address and kind, so a flood cannot fill the log.
    pub fn log_refusal(&self, addr: IpAddr, what: &str, now: Instant) -> bool {
        let mut books = self.inner.lock().expect("gate lock");
        if books.refusals.len() > 4096 {
            books
                .refusals
                .retain(|_, at| now.duration_since(*at) < REFUSAL_LOGGED_EVERY);
        }
        let key = (addr, what.to_owned());
        match books.refusals.get(&key) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOGGED_EVERY => false,
            _ => {
                books.refusals.insert(key, now);
                true
            }
        }
    }
}

fn log_once(books: &mut Books, addr: IpAddr, busy: &Busy) {
    if books.logged.len() > 4096 {
        books.logged.clear();
    }
    let seen = books.logged.entry(addr).or_default();
    if !std::mem::replace(&mut seen[busy.kind()], true) {
        tracing::warn!(peer = %addr, "turned away: {busy} (logged once until it is admitted again)");
    }
}

fn clear_logged(books: &mut Books, addr: IpAddr, kind: usize) {
    if let Some(seen) = books.logged.get_mut(&addr) {
        seen[kind] = false;
        if seen == &[false, false] {
            books.logged.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate() -> Arc<Gate> {
        Gate::new(Limits {
            connections: 3,
            connections_per_address: 2,
            opens_per_sec: 2.0,
            open_burst: 3.0,
        })
    }

    #[test]
    fn connections_are_bounded_per_address_and_in_all_and_given_back() {
        let gate = gate();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = gate.connect(a).unwrap();
        let _second = gate.connect(a).unwrap();
        assert_eq!(gate.connect(a).err(), Some(Busy::Address { addr: a, held: 2 }));
        let _third = gate.connect(b).unwrap();
        assert_eq!(gate.connect(b).err(), Some(Busy::Full { total: 3 }));
        drop(first);
        assert!(gate.connect(a).is_ok(), "a closed connection gives its place back");
    }

    #[test]
    fn a_refusal_is_logged_once_a_minute_per_address_and_kind() {
        let gate = gate();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        assert!(gate.log_refusal(a, "audit west-1", t));
        assert!(!gate.log_refusal(a, "audit west-1", t + Duration::from_secs(59)));
        assert!(gate.log_refusal(a, "replicate west-1", t), "another kind");
        assert!(gate.log_refusal(b, "audit west-1", t), "another address");
        assert!(gate.log_refusal(a, "audit west-1", t + Duration::from_secs(61)));
    }

    #[test]
    fn stream_opens_refill_at_the_rate_after_a_burst() {
        let gate = gate();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            gate.open(a, t).unwrap();
        }
        let busy = gate.open(a, t).unwrap_err();
        assert!(busy.to_string().contains("retry in 500 ms"), "{busy}");
        assert!(gate.open("10.0.0.2".parse().unwrap(), t).is_ok(), "per address");
        assert!(
            gate.open(a, t + Duration::from_millis(500)).is_ok(),
            "one more after 1/rate"
        );
        assert!(gate.open(a, t + Duration::from_millis(600)).is_err());
    }
}
