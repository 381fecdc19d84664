//! Rate and count limits that keep one client from costing others: token buckets
//! (per session, per address, per account), counts of open connections per address
//! and per account, and a log of refusals that says how many there were instead of
//! writing one line each.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::lock;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

/// A token bucket: `burst` at once, then `rate` per second.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(super) fn new(now: Instant, burst: f64) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }

    /// `None` if one unit may be taken now, else when the next one may.
    pub(super) fn ready_at(&mut self, now: Instant, rate: f64, burst: f64) -> Option<Instant> {
        self.refill(now, rate, burst);
        (self.tokens < 1.0).then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }

    pub(super) fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// Whether the bucket is full at `now` (and so carries no state worth keeping).
    fn is_full(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        self.tokens >= burst
    }
}

/// Token buckets by key (an address, an account), kept only while they are not full:
/// memory stays proportional to the clients that were limited recently.
#[derive(Debug)]
pub(super) struct Keyed<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
    rate: f64,
    burst: f64,
}

/// Most buckets kept; beyond it, full ones are dropped, and if none is, the key is
/// refused (a flood from more addresses than this is refused until buckets refill).
const MAX_BUCKETS: usize = 100_000;

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// `burst` at once per key, then `rate` per second.
    pub(super) fn new(rate: f64, burst: f64) -> Self {
        Self {
            buckets: Mutex::default(),
            rate: rate.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
        }
    }

    /// Takes one unit for `key`: `Ok` if it may go on, else `Err(wait)` with the time
    /// until it may.
    pub(super) fn take(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(key) && buckets.len() >= MAX_BUCKETS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| !b.is_full(now, rate, burst));
            if buckets.len() >= MAX_BUCKETS {
                return Err(Duration::from_secs(1));
            }
        }
        let bucket = buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::new(now, self.burst));
        match bucket.ready_at(now, self.rate, self.burst) {
            None => {
                bucket.take();
                Ok(())
            }
            Some(at) => Err(at - now),
        }
    }

    /// Drops the buckets that have refilled.
    pub(super) fn prune(&self) {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        lock(&self.buckets).retain(|_, b| !b.is_full(now, rate, burst));
    }
}

/// Counts of what is open per key (connections per address, sessions per account),
/// each within a maximum.
#[derive(Debug)]
pub(super) struct Counted<K: Hash + Eq> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    max: usize,
}

/// One counted item; uncounted when dropped.
#[derive(Debug)]
pub(super) struct CountGuard<K: Hash + Eq> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Counted<K> {
    pub(super) fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max: max.max(1),
        }
    }

    /// Counts one more for `key`, unless it has its maximum open already.
    pub(super) fn open(&self, key: &K) -> Option<CountGuard<K>> {
        let mut open = lock(&self.open);
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            open: self.open.clone(),
            key: key.clone(),
        })
    }
}

impl<K: Hash + Eq> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The key limits use for a client address: the address itself for IPv4, its /64
/// for IPv6 (one subscriber usually has a whole /64).
pub(super) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// How often [`Tally`] writes its line, at most.
const TALLY_EVERY: Duration = Duration::from_secs(10);

/// Refusals of one kind, logged as one line per [`TALLY_EVERY`] with their number
/// and the latest example, instead of one line each: a flood of bad requests cannot
/// flood the log. The first refusal after a quiet spell is logged at once.
#[derive(Debug)]
pub(super) struct Tally {
    what: &'static str,
    state: Mutex<TallyState>,
}

#[derive(Debug, Default)]
struct TallyState {
    /// Refusals since the last line.
    count: u64,
    /// Of those, refused by a rate limit.
    limited: u64,
    /// When the last line was written.
    logged: Option<Instant>,
}

impl Tally {
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::default(),
        }
    }

    /// Counts one refusal; `reason` and `client` describe it (escaped by the caller
    /// if they came from outside).
    pub(super) fn refused(&self, reason: &str, client: &str, limited: bool) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        st.count += 1;
        st.limited += u64::from(limited);
        if st.logged.is_some_and(|at| now - at < TALLY_EVERY) {
            return;
        }
        let (count, limited) = (st.count, st.limited);
        *st = TallyState {
            logged: Some(now),
            ..TallyState::default()
        };
        drop(st);
        info!(
            count,
            rate_limited = limited,
            latest = reason,
            client,
            "{} refused (count since the last such line)",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let (rate, burst) = (4.0, 3.0);
        let mut bucket = Bucket::new(start, burst);
        for _ in 0..3 {
            assert_eq!(bucket.ready_at(start, rate, burst), None);
            bucket.take();
        }
        let next = bucket.ready_at(start, rate, burst).expect("throttled");
        assert_eq!(next - start, Duration::from_millis(250));
        assert_eq!(bucket.ready_at(next, rate, burst), None);
        bucket.take();
        // A long pause refills only up to the burst.
        let later = next + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.ready_at(later, rate, burst), None);
            bucket.take();
        }
        assert!(bucket.ready_at(later, rate, burst).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_buckets_limit_each_key_alone_and_are_forgotten_when_full() {
        let keyed = Keyed::new(1.0, 2.0);
        assert!(keyed.take(&"a").is_ok());
        assert!(keyed.take(&"a").is_ok());
        let wait = keyed.take(&"a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        // Another key is not held back.
        assert!(keyed.take(&"b").is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        keyed.prune();
        assert!(lock(&keyed.buckets).is_empty());
        assert!(keyed.take(&"a").is_ok());
    }

    #[test]
    fn counted_keeps_each_key_within_its_maximum() {
        let counted = Counted::new(2);
        let a1 = counted.open(&1).unwrap();
        let _a2 = counted.open(&1).unwrap();
        assert!(counted.open(&1).is_none());
        assert!(counted.open(&2).is_some());
        drop(a1);
        assert!(counted.open(&1).is_some());
    }

    #[test]
    fn ipv6_addresses_share_a_key_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
