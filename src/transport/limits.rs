//! How much of a sidecar's listener one source, or everyone together, may hold, kept in two
//! pools so that strangers cannot crowd out the mesh: TLS handshakes in progress, and
//! connections past their handshake (over TLS, only nodes of the mesh get there).
//!
//! - A source is an IPv4 address or an IPv6 /64 (one host's usual allocation: a host cannot
//!   spread over its 2^64 addresses). An IPv4-mapped IPv6 address counts as its IPv4 one.
//! - Handshakes ([`Gate::arrive`]): at most `handshakes` in all and `handshakes_per_source`
//!   per source; a source also connects at most at the stream-open rate. When all places are
//!   taken, a newcomer takes the place of the oldest handshake of the source that holds the
//!   most, if that source holds more than the newcomer's does; otherwise the newcomer is
//!   closed. A peer's handshake takes milliseconds and its source holds one or two, so to
//!   push it out a flood needs as many sources as there are places, each renewing faster
//!   than that. The listener also gives a handshake a short deadline.
//! - Connections ([`Handshake::establish`]): at most `connections` in all and
//!   `connections_per_source` per source, held only once the handshake is done, so
//!   handshakes in progress never take a place from an authenticated peer.
//! - Streams ([`Gate::open`]): each Hello of a replication stream, each snapshot and each
//!   audit request counts against its source's rate, in bursts.
//!
//! A connection turned away is closed at accept, or dropped once its handshake is done (over
//! the connection limits); a stream over the rate is answered `RESOURCE_EXHAUSTED` with when
//! to retry. Every refusal is logged with who, from where and why, once a minute per source
//! and kind ([`Gate::log_refusal`]); turning away because every handshake place is taken is
//! logged once a minute in all, so a flood from many sources cannot fill the log either.
//! The books are bounded: a source leaves them with its last handshake and connection, and
//! the rate books once its bucket is full again.
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The limits, from the node's `[replication]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub connections: usize,
    pub connections_per_source: usize,
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    /// Connections and stream opens per source (each counted apart): the sustained rate per
    /// second and the burst.
    pub opens_per_sec: f64,
    pub open_burst: f64,
}

/// Where a connection comes from, as the limits count it: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(addr: IpAddr) -> Self {
        match addr.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => Self(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (!0u128 << 64)))),
        }
    }

    /// The key of refusals logged once a minute in all, whatever their source.
    const ANYONE: Self = Self(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why a connection or a stream was turned away.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Busy {
    #[error("{from} holds {held} connections, the most one address may (max_connections_per_address)")]
    Address { from: Source, held: usize },
    #[error("this node holds {total} connections, the most it takes (max_connections)")]
    Full { total: usize },
    #[error("{from} has {held} TLS handshakes in progress, the most one address may (max_handshakes_per_address)")]
    Handshakes { from: Source, held: usize },
    #[error(
        "this node has {total} TLS handshakes in progress, the most it takes (max_handshakes), and none of them from an address holding more than {from}"
    )]
    Handshaking { from: Source, total: usize },
    #[error("{from} connects faster than {per_sec}/s (bursts of {burst}; opens_per_address_per_sec)")]
    Connects { from: Source, per_sec: f64, burst: f64 },
    #[error(
        "{from} opens streams faster than {per_sec}/s (bursts of {burst}; opens_per_address_per_sec): retry in {retry_ms} ms"
    )]
    Rate {
        from: Source,
        per_sec: f64,
        burst: f64,
        retry_ms: u64,
    },
}

impl Busy {
    /// What the refusal log is keyed by: the source and the kind, or only the kind for a
    /// refusal every source would meet.
    fn key(&self) -> (Source, &'static str) {
        match self {
            Busy::Address { from, .. } => (*from, "connections"),
            Busy::Full { .. } => (Source::ANYONE, "connections"),
            Busy::Handshakes { from, .. } => (*from, "handshakes"),
            Busy::Handshaking { .. } => (Source::ANYONE, "handshakes"),
            Busy::Connects { from, .. } => (*from, "connects"),
            Busy::Rate { from, .. } => (*from, "streams"),
        }
    }
}

impl Limits {
    /// The limits a node's `[replication]` settings give; bursts of four times the rate.
    pub fn of(config: &crate::config::ReplicationConfig) -> Self {
        let per_sec = f64::from(config.opens_per_address_per_sec);
        Self {
            connections: config.max_connections,
            connections_per_source: config.max_connections_per_address,
            handshakes: config.max_handshakes,
            handshakes_per_source: config.max_handshakes_per_address,
            opens_per_sec: per_sec,
            open_burst: (per_sec * 4.0).max(4.0),
        }
    }
}

/// The listener's books.
pub struct Gate {
    limits: Limits,
    inner: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    /// Handshakes in progress per source, oldest first.
    handshaking: HashMap<Source, VecDeque<Waiting>>,
    handshakes: usize,
    /// Numbers handshakes in the order they arrived.
    arrived: u64,
    /// Connections past their handshake per source.
    held: HashMap<Source, usize>,
    total: usize,
    buckets: HashMap<(Source, Opening), Bucket>,
    /// When each (source, kind of refusal) was last logged.
    refusals: HashMap<(Source, String), Instant>,
}

struct Waiting {
    number: u64,
    addr: IpAddr,
    /// Told when this handshake's place is given to a newcomer.
    cut: Arc<Notify>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Opening {
    Connection,
    Stream,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// How often one source's refusal of one kind is logged at most.
const REFUSAL_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// A handshake in progress: its place is given back when it is dropped, taken by a
/// newcomer when it is [`cut`](Handshake::cut), and traded for a [`Permit`] when it is done.
pub struct Handshake {
    gate: Arc<Gate>,
    addr: IpAddr,
    number: u64,
    cut: Arc<Notify>,
}

impl Handshake {
    /// Completes when this handshake's place was given to a newcomer: drop the connection.
    pub async fn cut(&self) {
        self.cut.notified().await;
    }

    /// The handshake is done: the connection takes a place among the established ones, or
    /// is turned away (and logged) if there is none.
    pub fn establish(self, now: Instant) -> Result<Permit, Busy> {
        let from = Source::of(self.addr);
        let gate = self.gate.clone();
        let mut books = gate.inner.lock().expect("gate lock");
        books.leave(from, self.number);
        let held = books.held.get(&from).copied().unwrap_or(0);
        let refused = if books.total >= gate.limits.connections {
            Busy::Full { total: books.total }
        } else if held >= gate.limits.connections_per_source {
            Busy::Address { from, held }
        } else {
            books.total += 1;
            *books.held.entry(from).or_insert(0) += 1;
            return Ok(Permit {
                gate: gate.clone(),
                from,
            });
        };
        books.log(self.addr, &refused, now);
        Err(refused)
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let from = Source::of(self.addr);
        self.gate.inner.lock().expect("gate lock").leave(from, self.number);
    }
}

/// An established connection: its place is given back when the connection ends.
pub struct Permit {
    gate: Arc<Gate>,
    from: Source,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut books = self.gate.inner.lock().expect("gate lock");
        books.total -= 1;
        if let Some(held) = books.held.get_mut(&self.from) {
            *held -= 1;
            if *held == 0 {
                books.held.remove(&self.from);
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

    /// Takes a place for the handshake of a connection `addr` opened at `now` (giving it the
    /// place of another one if every place is taken), or says why there is none (and logs it).
    pub fn arrive(self: &Arc<Self>, addr: IpAddr, now: Instant) -> Result<Handshake, Busy> {
        let from = Source::of(addr);
        let Limits {
            opens_per_sec,
            open_burst,
            ..
        } = self.limits;
        let mut books = self.inner.lock().expect("gate lock");
        let held = books.handshaking.get(&from).map_or(0, VecDeque::len);
        let refused = if books.take(from, Opening::Connection, &self.limits, now).is_err() {
            Some(Busy::Connects {
                from,
                per_sec: opens_per_sec,
                burst: open_burst,
            })
        } else if held >= self.limits.handshakes_per_source {
            Some(Busy::Handshakes { from, held })
        } else if books.handshakes >= self.limits.handshakes {
            books.make_room(addr, held, now).err()
        } else {
            None
        };
        if let Some(busy) = refused {
            books.log(addr, &busy, now);
            return Err(busy);
        }
        books.arrived += 1;
        let number = books.arrived;
        let cut = Arc::new(Notify::new());
        books.handshaking.entry(from).or_default().push_back(Waiting {
            number,
            addr,
            cut: cut.clone(),
        });
        books.handshakes += 1;
        Ok(Handshake {
            gate: self.clone(),
            addr,
            number,
            cut,
        })
    }

    /// Counts a stream opened by `addr` at `now` against its source's rate.
    pub fn open(&self, addr: IpAddr, now: Instant) -> Result<(), Busy> {
        let from = Source::of(addr);
        let mut books = self.inner.lock().expect("gate lock");
        let Err(retry_ms) = books.take(from, Opening::Stream, &self.limits, now) else {
            return Ok(());
        };
        let busy = Busy::Rate {
            from,
            per_sec: self.limits.opens_per_sec,
            burst: self.limits.open_burst,
            retry_ms,
        };
        books.log(addr, &busy, now);
        Err(busy)
    }

    /// Whether a refusal of `addr` for `what` (such as an RPC and the node it claimed) is
    /// logged now: once a minute per source and kind, so a flood cannot fill the log.
    pub fn log_refusal(&self, addr: IpAddr, what: &str, now: Instant) -> bool {
        self.inner
            .lock()
            .expect("gate lock")
            .first_in_a_while((Source::of(addr), what), now)
    }
}

impl Books {
    /// Takes one token of `from`'s bucket for `opening`, or says in how many ms there is one.
    fn take(&mut self, from: Source, opening: Opening, limits: &Limits, now: Instant) -> Result<(), u64> {
        let (per_sec, burst) = (limits.opens_per_sec, limits.open_burst);
        let refill = |b: &Bucket| (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        if self.buckets.len() > 4096 {
            // Full buckets hold nothing worth keeping: a new bucket starts full.
            self.buckets.retain(|_, b| refill(b) < burst);
        }
        let bucket = (self.buckets.entry((from, opening))).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens = refill(bucket);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / per_sec * 1000.0).ceil() as u64)
    }

    /// Every handshake place is taken and `addr`'s source holds `held` of them: gives a
    /// newcomer from there the place of the oldest handshake of the source holding the most,
    /// if it holds more than that.
    fn make_room(&mut self, addr: IpAddr, held: usize, now: Instant) -> Result<(), Busy> {
        let from = Source::of(addr);
        let victim = crowded(self.handshaking.iter().map(|(source, waiting)| {
            let oldest = waiting.front().map_or(u64::MAX, |w| w.number);
            (*source, waiting.len(), oldest)
        }));
        let Some(victim) = victim.filter(|&(_, count)| count > held).map(|(source, _)| source) else {
            return Err(Busy::Handshaking {
                from,
                total: self.handshakes,
            });
        };
        let waiting = self.handshaking.get_mut(&victim).expect("a crowded source");
        let cut = waiting.pop_front().expect("a crowded source holds one");
        if waiting.is_empty() {
            self.handshaking.remove(&victim);
        }
        self.handshakes -= 1;
        cut.cut.notify_one();
        if self.first_in_a_while((Source::ANYONE, "handshake cut"), now) {
            tracing::warn!(
                peer = %cut.addr,
                "dropped the TLS handshake of {} to make room for {addr}: every place is taken (max_handshakes) and {victim} held the most (logged once a minute)",
                cut.addr
            );
        }
        Ok(())
    }

    /// Gives back the place of handshake `number` of `from`, if it still holds it.
    fn leave(&mut self, from: Source, number: u64) {
        let Some(waiting) = self.handshaking.get_mut(&from) else {
            return;
        };
        let Some(at) = waiting.iter().position(|w| w.number == number) else {
            return;
        };
        waiting.remove(at);
        if waiting.is_empty() {
            self.handshaking.remove(&from);
        }
        self.handshakes -= 1;
    }

    fn log(&mut self, addr: IpAddr, busy: &Busy, now: Instant) {
        let key = busy.key();
        if !self.first_in_a_while(key, now) {
            return;
        }
        if key.0 == Source::ANYONE {
            tracing::warn!(peer = %addr, "turned away {addr}: {busy} (logged once a minute)");
        } else {
            tracing::warn!(peer = %addr, "turned away: {busy} (logged once a minute per address and kind)");
        }
    }

    fn first_in_a_while(&mut self, (source, what): (Source, &str), now: Instant) -> bool {
        if self.refusals.len() > 4096 {
            self.refusals
                .retain(|_, at| now.saturating_duration_since(*at) < REFUSAL_LOGGED_EVERY);
        }
        let key = (source, what.to_owned());
        match self.refusals.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < REFUSAL_LOGGED_EVERY => false,
            _ => {
                self.refusals.insert(key, now);
                true
            }
        }
    }
}

/// Of `(source, handshakes held, number of its oldest)`, the source holding the most, the
/// one whose oldest began first among equals; with how many it holds.
fn crowded(sources: impl Iterator<Item = (Source, usize, u64)>) -> Option<(Source, usize)> {
    sources
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(source, held, _)| (source, held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    /// A gate with room for `connections` and `handshakes`, and bursts of `burst` opens.
    fn gate(connections: usize, handshakes: usize, burst: f64) -> Arc<Gate> {
        Gate::new(Limits {
            connections,
            connections_per_source: 2,
            handshakes,
            handshakes_per_source: 3,
            opens_per_sec: 2.0,
            open_burst: burst,
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
        assert_eq!(Source::of(ip("2001:db8:1:2::1")).to_string(), "2001:db8:1:2::/64");
        assert_ne!(Source::of(ip("10.0.0.1")), Source::of(ip("10.0.0.2")));
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1")),
            Source::of(ip("10.0.0.1")),
            "IPv4-mapped"
        );
        assert_ne!(Source::of(ip("::ffff:10.0.0.1")), Source::of(ip("::ffff:10.0.0.2")));
    }

    #[test]
    fn one_ipv6_64_holds_as_few_handshakes_as_one_address() {
        let gate = gate(8, 8, 100.0);
        let t = Instant::now();
        let _held: Vec<_> = (1..=3)
            .map(|host| gate.arrive(ip(&format!("2001:db8::{host}")), t).unwrap())
            .collect();
        let from = Source::of(ip("2001:db8::4"));
        assert_eq!(
            gate.arrive(ip("2001:db8::4"), t).err(),
            Some(Busy::Handshakes { from, held: 3 })
        );
        assert!(gate.arrive(ip("2001:db8:0:1::4"), t).is_ok(), "another /64");
    }

    #[test]
    fn when_every_handshake_place_is_taken_a_newcomer_takes_one_from_the_most_crowded_source() {
        let gate = gate(8, 4, 100.0);
        let t = Instant::now();
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let a1 = gate.arrive(a, t).unwrap();
        let a2 = gate.arrive(a, t).unwrap();
        let _a3 = gate.arrive(a, t).unwrap();
        let b1 = gate.arrive(b, t).unwrap();
        let cut = |h: &Handshake| h.cut().now_or_never().is_some();
        let c1 = gate.arrive(c, t).unwrap();
        assert!(cut(&a1), "a's oldest gives way");
        assert!(!cut(&a2) && !cut(&b1));
        let _b2 = gate.arrive(b, t).unwrap();
        assert!(cut(&a2), "a still holds the most");
        // a, b, c hold 1, 2, 1: a newcomer from b (2) finds no one holding more.
        let from = Source::of(b);
        assert_eq!(gate.arrive(b, t).err(), Some(Busy::Handshaking { from, total: 4 }));
        assert!(!cut(&b1) && !cut(&c1));
        // A finished or abandoned handshake gives its place back.
        drop(c1);
        assert!(gate.arrive(c, t).is_ok());
        drop(a1);
        drop(a2);
    }

    #[test]
    fn connections_are_held_once_their_handshake_is_done_bounded_per_source_and_in_all() {
        let gate = gate(3, 2, 100.0);
        let t = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let first = gate.arrive(a, t).unwrap().establish(t).unwrap();
        let _second = gate.arrive(a, t).unwrap().establish(t).unwrap();
        let from = Source::of(a);
        let third = gate.arrive(a, t).unwrap();
        assert_eq!(third.establish(t).err(), Some(Busy::Address { from, held: 2 }));
        let _fourth = gate.arrive(b, t).unwrap().establish(t).unwrap();
        assert_eq!(
            gate.arrive(b, t).unwrap().establish(t).err(),
            Some(Busy::Full { total: 3 })
        );
        // Established connections take no handshake place.
        let _shaking = [gate.arrive(b, t).unwrap(), gate.arrive(b, t).unwrap()];
        drop(first);
        assert!(
            gate.arrive(a, t).unwrap().establish(t).is_ok(),
            "a closed connection gives its place back"
        );
    }

    #[test]
    fn a_refusal_is_logged_once_a_minute_per_source_and_kind() {
        let gate = gate(3, 3, 100.0);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let t = Instant::now();
        assert!(gate.log_refusal(a, "audit west-1", t));
        assert!(!gate.log_refusal(a, "audit west-1", t + Duration::from_secs(59)));
        assert!(gate.log_refusal(a, "replicate west-1", t), "another kind");
        assert!(gate.log_refusal(b, "audit west-1", t), "another address");
        assert!(gate.log_refusal(a, "audit west-1", t + Duration::from_secs(61)));
        let v6 = ip("2001:db8::1");
        assert!(gate.log_refusal(v6, "handshake timeout", t));
        assert!(
            !gate.log_refusal(ip("2001:db8::2"), "handshake timeout", t),
            "the same /64"
        );
    }

    #[test]
    fn connects_and_stream_opens_refill_at_the_rate_after_a_burst() {
        let gate = gate(8, 8, 3.0);
        let a = ip("10.0.0.1");
        let t = Instant::now();
        for _ in 0..3 {
            gate.open(a, t).unwrap();
        }
        let busy = gate.open(a, t).unwrap_err();
        assert!(busy.to_string().contains("retry in 500 ms"), "{busy}");
        assert!(gate.open(ip("10.0.0.2"), t).is_ok(), "per source");
        assert!(
            gate.open(a, t + Duration::from_millis(500)).is_ok(),
            "one more after 1/rate"
        );
        assert!(gate.open(a, t + Duration::from_millis(600)).is_err());

        for _ in 0..3 {
            drop(gate.arrive(a, t).unwrap());
        }
        let busy = gate.arrive(a, t).err().unwrap();
        assert!(matches!(busy, Busy::Connects { .. }), "{busy}");
        assert!(gate.arrive(a, t + Duration::from_millis(500)).is_ok());
    }
}
