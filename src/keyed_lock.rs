//! One async lock per key (an attempt's writes, an attempt's log file), made on first use
//! and dropped once nobody holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Below this many entries the map is left alone.
const PRUNE_FROM: usize = 1024;

type Lock = Arc<tokio::sync::Mutex<()>>;

struct Map<K> {
    locks: HashMap<K, Lock>,
    /// The size at which unheld locks are dropped next: twice what the last pass kept
    /// (at least [`PRUNE_FROM`]). With more keys held at once than a fixed bound, a
    /// fixed bound would have every call walk the whole map.
    prune_at: usize,
}

pub struct KeyedLocks<K> {
    map: std::sync::Mutex<Map<K>>,
}

impl<K: Eq + Hash> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self {
            map: std::sync::Mutex::new(Map {
                locks: HashMap::new(),
                prune_at: PRUNE_FROM,
            }),
        }
    }
}

impl<K: Eq + Hash> KeyedLocks<K> {
    /// The lock of `key`; lock it to have it (`lock().await` or `lock_owned().await`).
    pub fn of(&self, key: K) -> Lock {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.locks.len() >= map.prune_at {
            // Held or waited for: someone besides the map has the Arc.
            map.locks.retain(|_, l| Arc::strong_count(l) > 1);
            map.prune_at = (map.locks.len() * 2).max(PRUNE_FROM);
        }
        map.locks.entry(key).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .locks
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_one_lock_and_unheld_locks_are_dropped_as_the_map_grows() {
        let locks = KeyedLocks::default();
        let a = locks.of(0u32);
        let held = a.clone().lock_owned().await;
        assert!(Arc::ptr_eq(&a, &locks.of(0)), "the same key, the same lock");
        assert!(a.try_lock().is_err(), "held");
        drop(a);
        for k in 1..PRUNE_FROM as u32 {
            locks.of(k);
        }
        assert_eq!(locks.len(), PRUNE_FROM);
        // The next call drops every lock nobody holds; key 0's is held.
        locks.of(5000);
        assert_eq!(locks.len(), 2);
        drop(held);
    }

    #[tokio::test]
    async fn with_more_keys_held_than_the_bound_the_map_is_not_walked_on_every_call() {
        let locks = KeyedLocks::default();
        let held: Vec<_> = (0..PRUNE_FROM as u32 + 10).map(|k| locks.of(k)).collect();
        // All held when the map reached the bound: that pass kept every one and moved
        // the bound to twice what it kept; calls below it walk nothing.
        let bound = locks.map.lock().unwrap().prune_at;
        assert_eq!(bound, 2 * PRUNE_FROM);
        locks.of(100_000);
        locks.of(100_001);
        assert_eq!(locks.len(), PRUNE_FROM + 12);
        assert_eq!(locks.map.lock().unwrap().prune_at, bound);
        drop(held);
        // Grown to the new bound, the next call drops what nobody holds any more.
        for k in 200_000..200_000 + bound as u32 {
            locks.of(k);
        }
        assert!(locks.len() <= PRUNE_FROM, "{}", locks.len());
    }
}
