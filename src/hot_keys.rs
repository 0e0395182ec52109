//! Which keys are hot: the most contended keys of a locker, in constant memory.
//!
//! A space-saving sketch (Metwally, Agrawal and El Abbadi, "Efficient computation of
//! frequent and top-k elements in data streams", 2005) of `capacity` counters. A key
//! already counted is incremented; a new key takes a free counter, or else replaces the
//! key with the smallest count `m` and starts at `m + 1`, remembering `m` as its possible
//! overcount. After `n` contended acquisitions:
//!
//! - every key contended more than `n / capacity` times holds a counter;
//! - a key's reported `count` is at least its true count and at most `count − overcount`
//!   more, and `overcount ≤ n / capacity`.
//!
//! Only contended acquisitions are counted, so the uncontended path never touches it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use crate::key::LockKey;

/// The number of keys a locker tracks by default: the top ten, as the metrics export.
pub(crate) const DEFAULT_HOT_KEYS: usize = 10;

/// One of the most contended keys of a locker: see [`Locker::hot_keys`](crate::Locker::hot_keys).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotKey {
    /// The key, with the locker's prefix.
    pub key: LockKey,
    /// How many acquisitions of it met contention (a wait or a refusal), since the locker
    /// was made: an upper bound, at most `overcount` above the true number.
    pub count: u64,
    /// How much of `count` may belong to keys this one replaced in the sketch: the true
    /// count lies in `count − overcount ..= count`.
    pub overcount: u64,
}

/// A space-saving sketch of `capacity` counters (see the module docs).
#[derive(Debug)]
pub(crate) struct SpaceSaving {
    capacity: usize,
    slots: Vec<HotKey>,
    /// Where each counted key's slot is.
    index: HashMap<LockKey, usize>,
    /// How many acquisitions were counted.
    total: u64,
}

/// What one count changed, for the metrics.
pub(crate) struct Counted {
    /// The key's reported count now.
    pub(crate) count: u64,
    /// The key it replaced in the sketch, if any.
    pub(crate) evicted: Option<LockKey>,
}

impl SpaceSaving {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            slots: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
            total: 0,
        }
    }

    /// Counts one contended acquisition of `key`. `None` when the capacity is 0.
    pub(crate) fn count(&mut self, key: &LockKey) -> Option<Counted> {
        if self.capacity == 0 {
            return None;
        }
        self.total += 1;
        if let Some(&at) = self.index.get(key) {
            let slot = &mut self.slots[at];
            slot.count += 1;
            return Some(Counted {
                count: slot.count,
                evicted: None,
            });
        }
        if self.slots.len() < self.capacity {
            self.index.insert(key.clone(), self.slots.len());
            self.slots.push(HotKey {
                key: key.clone(),
                count: 1,
                overcount: 0,
            });
            return Some(Counted {
                count: 1,
                evicted: None,
            });
        }
        // The smallest counter gives way; O(capacity), on the contended path only.
        let (at, smallest) = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, slot)| slot.count)
            .map(|(at, slot)| (at, slot.count))?;
        let replaced = std::mem::replace(
            &mut self.slots[at],
            HotKey {
                key: key.clone(),
                count: smallest + 1,
                overcount: smallest,
            },
        );
        self.index.remove(&replaced.key);
        self.index.insert(key.clone(), at);
        Some(Counted {
            count: smallest + 1,
            evicted: Some(replaced.key),
        })
    }

    /// The counted keys, the largest count first.
    pub(crate) fn top(&self) -> Vec<HotKey> {
        let mut top = self.slots.clone();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        top
    }

    /// How many acquisitions were counted.
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.total
    }
}

/// A locker's sketch, shared by its clones and the layers made from it.
#[derive(Debug)]
pub(crate) struct HotKeys(Mutex<SpaceSaving>);

impl HotKeys {
    pub(crate) fn new(capacity: usize) -> Self {
        Self(Mutex::new(SpaceSaving::new(capacity)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut SpaceSaving) -> T) -> T {
        // Every change is complete before anything can panic: a poisoned sketch is whole.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a contended acquisition of `key` and exports the change: the key's gauge
    /// set to its count, the key it replaced (if any) set to 0.
    pub(crate) fn contended(&self, class: &Arc<str>, key: &LockKey) {
        let Some(counted) = self.with(|sketch| sketch.count(key)) else {
            return;
        };
        crate::observe::hot_key(class, key, counted.count);
        if let Some(evicted) = counted.evicted {
            crate::observe::hot_key(class, &evicted, 0);
        }
    }

    pub(crate) fn top(&self) -> Vec<HotKey> {
        self.with(|sketch| sketch.top())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> LockKey {
        LockKey::from(format!("k{n}"))
    }

    /// Streams of heavy keys among many light ones, in random order: every key counted
    /// more than n / capacity times is reported, and every reported count brackets the
    /// true one.
    #[test]
    fn a_key_counted_more_than_n_over_k_times_is_always_reported() {
        for seed in 0..50 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let capacity = rng.usize(2..=16);
            let mut stream = Vec::new();
            for heavy in 0..rng.u64(1..=capacity as u64) {
                stream.extend(std::iter::repeat_n(heavy, rng.usize(50..400)));
            }
            for _ in 0..rng.usize(500..3000) {
                stream.push(rng.u64(1000..1_000_000));
            }
            rng.shuffle(&mut stream);

            let mut sketch = SpaceSaving::new(capacity);
            let mut truth: HashMap<u64, u64> = HashMap::new();
            for &n in &stream {
                sketch.count(&key(n));
                *truth.entry(n).or_default() += 1;
            }
            let total = stream.len() as u64;
            assert_eq!(sketch.total(), total);
            let top = sketch.top();
            assert_eq!(top.len(), capacity.min(truth.len()));
            for (n, &count) in &truth {
                let reported = top.iter().find(|hot| hot.key == key(*n));
                if count * capacity as u64 > total {
                    assert!(
                        reported.is_some(),
                        "seed {seed}: {n} counted {count} of {total} times (k = {capacity}) is missing"
                    );
                }
                if let Some(hot) = reported {
                    assert!(hot.count >= count && hot.count - hot.overcount <= count);
                    assert!(hot.overcount * capacity as u64 <= total);
                }
            }
            assert!(top.windows(2).all(|pair| pair[0].count >= pair[1].count));
        }
    }

    /// What a count costs, with no metrics recorder installed: `cargo test --release --lib
    /// --all-features what_a_count_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn what_a_count_costs() {
        const N: u32 = 1_000_000;
        let class: Arc<str> = Arc::from("bench");
        for (what, keys) in [("one hot key", 1), ("10 keys", 10), ("distinct keys", N)] {
            let hot_keys = HotKeys::new(DEFAULT_HOT_KEYS);
            let keys: Vec<LockKey> = (0..keys.min(100_000))
                .map(|n| LockKey::from(format!("sku:{n}")))
                .collect();
            let started = std::time::Instant::now();
            for n in 0..N as usize {
                hot_keys.contended(&class, std::hint::black_box(&keys[n % keys.len()]));
            }
            let per = started.elapsed() / N;
            println!("HotKeys::contended, {what}: {per:?} a count");
        }
        let advice = crate::ttl_advice::TtlAdvice::default();
        let ttl = std::time::Duration::from_secs(10);
        let started = std::time::Instant::now();
        for n in 0..N {
            let hold = std::time::Duration::from_micros(u64::from(n % 5000));
            std::hint::black_box(advice.hold(hold, ttl, Some(ttl / 3)));
        }
        println!("TtlAdvice::hold: {:?} a hold", started.elapsed() / N);
    }

    #[test]
    fn memory_stays_at_the_capacity_and_small_streams_are_exact() {
        let mut sketch = SpaceSaving::new(10);
        for n in 0..100_000 {
            sketch.count(&key(n));
        }
        assert_eq!((sketch.slots.len(), sketch.index.len()), (10, 10));

        let mut sketch = SpaceSaving::new(10);
        for (n, times) in [(1, 5), (2, 3), (3, 9)] {
            for _ in 0..times {
                sketch.count(&key(n));
            }
        }
        let top: Vec<_> = sketch
            .top()
            .into_iter()
            .map(|hot| (hot.key, hot.count, hot.overcount))
            .collect();
        assert_eq!(top, [(key(3), 9, 0), (key(1), 5, 0), (key(2), 3, 0)]);
        assert!(SpaceSaving::new(0).count(&key(1)).is_none());
    }
}
