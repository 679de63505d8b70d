//! The order in which MLX writes tensor data: the iteration order of a libstdc++
//! `std::unordered_map<std::string, array>`.
//!
//! `mx.save_safetensors` (MLX's `save_safetensors` in C++) receives the Python dict as an
//! `unordered_map`, built by inserting the dict's items in order, and writes the tensors' bytes
//! in the map's iteration order. `mx.load` does the reverse: it inserts the header's tensors
//! (sorted by name) into such a map and hands Python a dict in the map's iteration order.
//! Reproducing MLX's files byte for byte therefore means reproducing that order, which is a
//! pure function of the names and their insertion order under libstdc++'s hash table:
//!
//! - `std::hash<std::string>` is `std::_Hash_bytes(data, len, 0xc70f6907)`, a 64-bit
//!   MurmurHash2 variant;
//! - the bucket count starts at 1, becomes 13 on the first insertion and then grows through
//!   `_Prime_rehash_policy`'s primes (max load factor 1, growth factor 2) when full;
//! - a node whose bucket is empty goes to the front of the single linked list; otherwise it goes
//!   first within its bucket; a rehash re-threads the list in the same way.
//!
//! Checked against `mlx[cpu]==0.32.4` on Linux (x86-64) for random name sets of 1 to 700
//! names, covering collisions and rehashes. MLX builds linked against libc++ (macOS) use a
//! different table and so a different data order; readers do not care, only byte comparisons do.

/// `std::_Hash_bytes` as libstdc++ defines it for 64-bit `size_t`, with `std::hash`'s seed.
pub(crate) fn libstdcxx_hash(bytes: &[u8]) -> u64 {
    const MUL: u64 = (0xc6a4_a793 << 32) + 0x5bd1_e995;
    const SEED: u64 = 0xc70f_6907;
    fn shift_mix(v: u64) -> u64 {
        v ^ (v >> 47)
    }
    let mut hash = SEED ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut le = [0u8; 8];
        le.copy_from_slice(w);
        let data = shift_mix(u64::from_le_bytes(le).wrapping_mul(MUL)).wrapping_mul(MUL);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let data = tail
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    shift_mix(shift_mix(hash).wrapping_mul(MUL))
}

/// Bucket counts a libstdc++ `unordered_map` passes through as it grows by single insertions:
/// `_Prime_rehash_policy::_M_next_bkt(2 · previous)`, starting from 13 (read from libstdc++).
#[rustfmt::skip]
const BUCKET_COUNTS: [u64; 52] = [
    13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273, 20753, 42043, 85229, 172933, 351061,
    712697, 1447153, 2938679, 5967347, 12117689, 24607243, 49969847, 101473717, 206062531,
    418451333, 849749479, 1725587117, 3504151727, 8589934583, 25769803693, 68719476731,
    206158430123, 412316860387, 1099511627689, 2199023255531, 4398046511093, 13194139533241,
    26388279066581, 52776558133177, 105553116266399, 211106232532861, 562949953421231,
    1125899906842597, 4503599627370449, 18014398509481951, 36028797018963913, 72057594037927931,
    288230376151711717, 1152921504606846883, 2305843009213693951, 9223372036854775783,
    18446744073709551557,
];

/// What a bucket points at: the node *before* its first node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    /// The bucket is empty.
    Empty,
    /// The list's sentinel (`_M_before_begin`): the bucket's first node heads the list.
    Head,
    /// Node `i`.
    Node(usize),
}

/// A model of libstdc++'s `_Hashtable` for unique keys: only the order of its linked list.
struct Table {
    hashes: Vec<u64>,
    next: Vec<Option<usize>>,
    head: Option<usize>,
    buckets: Vec<Before>,
    count: u64,
    /// Index into [`BUCKET_COUNTS`] of the current bucket count, `None` while it is 1.
    size_index: Option<usize>,
}

impl Table {
    fn bucket_count(&self) -> u64 {
        self.size_index.map_or(1, |i| BUCKET_COUNTS[i])
    }

    fn bucket(&self, node: usize) -> usize {
        // Less than the bucket count, which is at most the length of `buckets` (a usize).
        (self.hashes[node] % self.bucket_count()) as usize
    }

    /// Links `node` right after `before`.
    fn link_after(&mut self, before: Before, node: usize) {
        match before {
            Before::Node(p) => {
                self.next[node] = self.next[p];
                self.next[p] = Some(node);
            }
            Before::Head | Before::Empty => {
                self.next[node] = self.head;
                self.head = Some(node);
            }
        }
    }

    /// `_M_rehash_aux` for unique keys.
    fn rehash(&mut self, size_index: usize) -> Option<()> {
        self.size_index = Some(size_index);
        let count = usize::try_from(self.bucket_count()).ok()?;
        self.buckets = vec![Before::Empty; count];
        let mut p = self.head.take();
        let mut begin_bucket = 0;
        while let Some(node) = p {
            p = self.next[node];
            let b = self.bucket(node);
            match self.buckets[b] {
                Before::Empty => {
                    self.link_after(Before::Head, node);
                    self.buckets[b] = Before::Head;
                    if self.next[node].is_some() {
                        self.buckets[begin_bucket] = Before::Node(node);
                    }
                    begin_bucket = b;
                }
                before => self.link_after(before, node),
            }
        }
        Some(())
    }

    /// `_M_insert_unique_node`: grow if full, then `_M_insert_bucket_begin`.
    fn insert(&mut self, node: usize) -> Option<()> {
        let capacity = self.size_index.map_or(0, |i| BUCKET_COUNTS[i]);
        if self.count + 1 > capacity {
            let next = self.size_index.map_or(0, |i| i + 1);
            if next >= BUCKET_COUNTS.len() {
                return None;
            }
            self.rehash(next)?;
        }
        let b = self.bucket(node);
        match self.buckets[b] {
            Before::Empty => {
                self.link_after(Before::Head, node);
                if let Some(old_first) = self.next[node] {
                    let ob = self.bucket(old_first);
                    self.buckets[ob] = Before::Node(node);
                }
                self.buckets[b] = Before::Head;
            }
            before => self.link_after(before, node),
        }
        self.count += 1;
        Some(())
    }
}

/// The iteration order of a libstdc++ `std::unordered_map<std::string, _>` into which `names`
/// were inserted in the given order, as indices into `names`.
///
/// This is the order in which `mx.save_safetensors` writes the data of a dict whose keys are
/// `names` (in dict order), and `mx.load` returns a file's tensors in the order
/// `unordered_map_order(sorted names)`. Duplicate names keep their first occurrence, as
/// `emplace` does. Returns `None` only for more names than a 64-bit table can hold.
pub fn unordered_map_order<S: AsRef<str>>(names: &[S]) -> Option<Vec<usize>> {
    let mut table = Table {
        hashes: names
            .iter()
            .map(|n| libstdcxx_hash(n.as_ref().as_bytes()))
            .collect(),
        next: vec![None; names.len()],
        head: None,
        buckets: vec![Before::Empty],
        count: 0,
        size_index: None,
    };
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        if seen.insert(name.as_ref()) {
            table.insert(i)?;
        }
    }
    let mut order = Vec::with_capacity(names.len());
    let mut p = table.head;
    while let Some(node) = p {
        order.push(node);
        p = table.next[node];
    }
    Some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_libstdcxx() {
        // Printed by `std::hash<std::string>{}(s)` compiled with GCC 12 on x86-64.
        for (s, h) in [
            ("", 0x553e93901e462a6e_u64),
            ("a", 0x454ddee488c1ed6b),
            ("z.weight", 0xf7746d883207b856),
            ("12345678", 0x8c5b90a33a04dca5),
            ("model.layers.0.mlp.gate_proj.weight", 0xe128fd3f57c98350),
        ] {
            assert_eq!(libstdcxx_hash(s.as_bytes()), h, "{s:?}");
        }
    }

    #[test]
    fn order_matches_mlx() {
        // mx.save_safetensors of {"z.weight", "a.bias", "m.scales", "b.q"} (in that dict order)
        // writes the data of b.q, m.scales, a.bias, z.weight.
        let names = ["z.weight", "a.bias", "m.scales", "b.q"];
        assert_eq!(unordered_map_order(&names), Some(vec![3, 2, 1, 0]));
        assert_eq!(unordered_map_order::<&str>(&[]), Some(vec![]));
    }

    #[test]
    fn order_is_a_permutation_across_rehashes() {
        let names: Vec<String> = (0..3000).map(|i| format!("layers.{i}.weight")).collect();
        let mut order = unordered_map_order(&names).unwrap_or_default();
        order.sort_unstable();
        assert_eq!(order, (0..3000).collect::<Vec<_>>());
    }
}
