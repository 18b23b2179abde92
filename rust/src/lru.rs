//! The key table of the limiter and the token budget: string keys in least-recently-used order, with
//! their counters, in one slab.
//!
//! A general insertion-ordered map (hashlink's `LinkedHashMap`) allocates a
//! node, a key and a value per key and frees them on eviction, and removing
//! the oldest key means hashing it again, which reads its cold key bytes.
//! When a limiter is full, every new caller evicts one, so those misses
//! are most of the cost of a check. Here slots live in one `Vec`, linked by
//! index, each with its hash; the index table stores slot numbers and rehashes
//! from the stored hashes. An evicted slot is reused by the next insertion
//! with its key and counter buffers, which are still warm.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::window::Counter;

const NIL: u32 = u32::MAX;

struct Slot {
    key: String,
    hash: u64,
    counters: Vec<Counter>,
    /// The instant from which every bucket of this key has expired.
    expires_ms: i64,
    prev: u32,
    next: u32,
}

pub struct Keys {
    table: HashTable<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
    hasher: DefaultHashBuilder,
}

impl Keys {
    pub fn new() -> Self {
        Self {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            hasher: DefaultHashBuilder::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The slot holding `key` (whose hash is `hash`).
    pub fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| slots[i as usize].key == key)
            .copied()
    }

    pub fn counters(&self, slot: u32) -> &[Counter] {
        &self.slots[slot as usize].counters
    }

    /// The least recently used key's slot and expiry.
    pub fn front(&self) -> Option<(u32, i64)> {
        (self.head != NIL).then(|| (self.head, self.slots[self.head as usize].expires_ms))
    }

    /// Marks `slot` as the most recently used.
    pub fn touch(&mut self, slot: u32) {
        if self.tail != slot {
            self.unlink(slot);
            self.link_back(slot);
        }
    }

    /// Replaces `slot`'s counters, keeps the later expiry, and marks it the
    /// most recently used.
    pub fn update(&mut self, slot: u32, counters: &[Counter], expires_ms: i64) {
        let s = &mut self.slots[slot as usize];
        s.counters.copy_from_slice(counters);
        s.expires_ms = s.expires_ms.max(expires_ms);
        self.touch(slot);
    }

    /// Adds a key that is not in the table (the caller has looked), as the
    /// most recently used.
    pub fn insert(&mut self, hash: u64, key: &str, counters: &[Counter], expires_ms: i64) {
        let slot = if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.key.clear();
            s.key.push_str(key);
            s.counters.clear();
            s.counters.extend_from_slice(counters);
            s.hash = hash;
            s.expires_ms = expires_ms;
            slot
        } else {
            let slot = u32::try_from(self.slots.len()).expect("fewer than 2**32 - 1 keys");
            assert!(slot != NIL, "fewer than 2**32 - 1 keys");
            self.slots.push(Slot {
                key: key.to_owned(),
                hash,
                counters: counters.to_vec(),
                expires_ms,
                prev: NIL,
                next: NIL,
            });
            slot
        };
        let slots = &self.slots;
        self.table
            .insert_unique(hash, slot, |&i| slots[i as usize].hash);
        self.link_back(slot);
        self.len += 1;
    }

    /// Writes `counters` for `key`, found at `slot` (if anywhere, after
    /// `drop_expired`), as the most recently used; a new key evicts the least
    /// recently used one when `max_keys` are held.
    pub fn put(
        &mut self,
        hash: u64,
        slot: Option<u32>,
        key: &str,
        counters: &[Counter],
        expires_ms: i64,
        max_keys: usize,
    ) {
        if let Some(slot) = slot {
            self.update(slot, counters, expires_ms);
            return;
        }
        if self.len >= max_keys {
            self.pop_front();
        }
        self.insert(hash, key, counters, expires_ms);
    }

    /// Forgets keys from the least recently used end while their every bucket
    /// has expired: amortised O(1) per call.
    pub fn drop_expired(&mut self, now_ms: i64) {
        while let Some((_, expires_ms)) = self.front() {
            if now_ms < expires_ms {
                break;
            }
            self.pop_front();
        }
    }

    /// Forgets the least recently used key.
    pub fn pop_front(&mut self) {
        let slot = self.head;
        if slot == NIL {
            return;
        }
        let hash = self.slots[slot as usize].hash;
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == slot) {
            entry.remove();
        }
        self.unlink(slot);
        self.free.push(slot);
        self.len -= 1;
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn link_back(&mut self, slot: u32) {
        let tail = self.tail;
        {
            let s = &mut self.slots[slot as usize];
            s.prev = tail;
            s.next = NIL;
        }
        if tail == NIL {
            self.head = slot;
        } else {
            self.slots[tail as usize].next = slot;
        }
        self.tail = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u64) -> [Counter; 1] {
        [Counter {
            bucket: 0,
            prev: 0,
            cur: n,
        }]
    }

    fn order(keys: &Keys) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = keys.head;
        while at != NIL {
            out.push(keys.slots[at as usize].key.clone());
            at = keys.slots[at as usize].next;
        }
        out
    }

    fn add(keys: &mut Keys, key: &str, n: u64) {
        let h = keys.hash(key);
        assert!(keys.find(h, key).is_none());
        keys.insert(h, key, &c(n), 0);
    }

    #[test]
    fn keeps_least_recently_used_order_and_reuses_slots() {
        let mut keys = Keys::new();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            add(&mut keys, k, u64::try_from(i).unwrap());
        }
        assert_eq!(order(&keys), ["a", "b", "c"]);
        let b = keys.find(keys.hash("b"), "b").unwrap();
        keys.touch(b);
        assert_eq!(order(&keys), ["a", "c", "b"]);
        keys.pop_front();
        assert_eq!(order(&keys), ["c", "b"]);
        assert!(keys.find(keys.hash("a"), "a").is_none());
        assert_eq!(keys.len(), 2);
        add(&mut keys, "a-much-longer-key-than-before", 7);
        assert_eq!(keys.slots.len(), 3, "the freed slot is reused");
        let slot = keys
            .find(
                keys.hash("a-much-longer-key-than-before"),
                "a-much-longer-key-than-before",
            )
            .unwrap();
        assert_eq!(keys.counters(slot)[0].cur, 7);
        assert_eq!(order(&keys), ["c", "b", "a-much-longer-key-than-before"]);
        keys.update(b, &c(9), 5);
        assert_eq!(order(&keys), ["c", "a-much-longer-key-than-before", "b"]);
        assert_eq!(keys.counters(b)[0].cur, 9);
        while keys.len() > 0 {
            keys.pop_front();
        }
        assert_eq!(keys.front(), None);
        keys.pop_front(); // empty: nothing happens
        add(&mut keys, "z", 1);
        assert_eq!(order(&keys), ["z"]);
    }

    #[test]
    fn many_keys_survive_growth_and_churn() {
        let mut keys = Keys::new();
        for i in 0..5_000u64 {
            add(&mut keys, &format!("k{i}"), i);
            if keys.len() > 1_000 {
                keys.pop_front();
            }
        }
        assert_eq!(keys.len(), 1_000);
        for i in 0..5_000u64 {
            let k = format!("k{i}");
            let found = keys.find(keys.hash(&k), &k);
            assert_eq!(found.is_some(), i >= 4_000, "{k}");
            if let Some(slot) = found {
                assert_eq!(keys.counters(slot)[0].cur, i);
            }
        }
        assert_eq!(order(&keys).first().map(String::as_str), Some("k4000"));
    }
}
