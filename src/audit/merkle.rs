//! RFC 6962 Merkle tree hashing: leaf and node hashes, the right-edge compact
//! range for O(log n) appends, tree heads from any set of stored subtree
//! hashes, inclusion and consistency proofs (RFC 6962 §2.1.1/§2.1.2) and
//! their verification (RFC 9162 §2.1.3.2/§2.1.4.2).
//!
//! Indices here are 0-based leaf indices (audit sequence number minus one).
//! A [`NodeId`] names a *perfect, aligned* subtree: leaves
//! `[index << level, (index + 1) << level)`. Every such subtree that fits in
//! a tree of size n is a node of the RFC 6962 tree of size n, so its hash can
//! be stored once (when it completes) and reused for every later tree size.

use ring::digest::{Context, Digest, SHA256};
use serde::{Deserialize, Serialize};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

// SHA-256 from ring: its assembly is ~1.8x the `sha2` crate's portable
// code on CPUs without SHA extensions, and every audit event costs a leaf
// hash and on average one node hash on the request path.
fn to_hash(d: Digest) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256(0x00 || data): the hash of one leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Context::new(&SHA256);
    h.update(&[0u8]);
    h.update(data);
    to_hash(h.finish())
}

/// SHA-256(0x01 || left || right): the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = 1;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    to_hash(ring::digest::digest(&SHA256, &buf))
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    to_hash(ring::digest::digest(&SHA256, &[]))
}

/// A perfect, aligned subtree: leaves `[index << level, (index + 1) << level)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    pub level: u8,
    pub index: u64,
}

impl NodeId {
    pub fn new(level: u8, index: u64) -> Self {
        NodeId { level, index }
    }

    /// First leaf covered.
    pub fn start(&self) -> u64 {
        self.index << self.level
    }

    /// One past the last leaf covered.
    pub fn end(&self) -> u64 {
        (self.index + 1) << self.level
    }

    /// The storage key: level (1 byte) || index (8 bytes, big-endian).
    pub fn key(&self) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = self.level;
        k[1..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    /// Parses [`NodeId::key`].
    pub fn from_key(k: &[u8]) -> Option<NodeId> {
        if k.len() != 9 {
            return None;
        }
        let index = u64::from_be_bytes(k[1..].try_into().ok()?);
        Some(NodeId { level: k[0], index })
    }
}

/// Why a tree hash or proof could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// A hash needed is not available (e.g. the leaves were pruned).
    #[error("the hash of leaves [{}, {}) is not available (pruned or missing)", .0.start(), .0.end())]
    Missing(NodeId),
    /// Reading stored hashes failed.
    #[error("reading tree hashes: {0}")]
    Storage(String),
    /// Arguments out of range.
    #[error("{0}")]
    Range(String),
}

/// The maximal perfect aligned subtrees covering leaves `[begin, end)`, left
/// to right (at most 2·log2(end − begin) of them). For `begin = 0` this is the
/// compact range of a tree of size `end`: one subtree per set bit of `end`,
/// largest first.
pub fn range_nodes(begin: u64, end: u64) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut p = begin;
    while p < end {
        let align = if p == 0 { 63 } else { p.trailing_zeros() };
        let fit = 63 - (end - p).leading_zeros();
        let level = align.min(fit);
        out.push(NodeId::new(level as u8, p >> level));
        p += 1u64 << level;
    }
    out
}

/// The largest power of two strictly smaller than `n` (n ≥ 2).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Anything that can give the hash of a perfect aligned subtree, if it has
/// it. `Ok(None)` makes the caller compute the hash from the two halves.
pub trait NodeSource {
    fn node(&mut self, id: NodeId) -> Result<Option<Hash>, MerkleError>;
}

impl<F> NodeSource for F
where
    F: FnMut(NodeId) -> Result<Option<Hash>, MerkleError>,
{
    fn node(&mut self, id: NodeId) -> Result<Option<Hash>, MerkleError> {
        self(id)
    }
}

/// MTH(D[lo:hi]) of RFC 6962, taking any perfect aligned subtree hash the
/// source has and recursing into the halves otherwise. With a source that
/// has every complete subtree, this reads O(log n) hashes.
pub fn subtree_hash(src: &mut dyn NodeSource, lo: u64, hi: u64) -> Result<Hash, MerkleError> {
    if hi <= lo {
        return if lo == 0 && hi == 0 {
            Ok(empty_root())
        } else {
            Err(MerkleError::Range(format!("empty leaf range [{lo}, {hi})")))
        };
    }
    let n = hi - lo;
    if n.is_power_of_two() && lo % n == 0 {
        let id = NodeId::new(n.trailing_zeros() as u8, lo >> n.trailing_zeros());
        if let Some(h) = src.node(id)? {
            return Ok(h);
        }
        if n == 1 {
            return Err(MerkleError::Missing(id));
        }
    }
    let k = if n.is_power_of_two() {
        n / 2
    } else {
        split_point(n)
    };
    let left = subtree_hash(src, lo, lo + k)?;
    let right = subtree_hash(src, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// The root hash of the tree of size `size`.
pub fn root_hash(src: &mut dyn NodeSource, size: u64) -> Result<Hash, MerkleError> {
    subtree_hash(src, 0, size)
}

/// The audit path of leaf `index` in the tree of size `size` (RFC 6962
/// §2.1.1 PATH), leaf-side first.
pub fn inclusion_proof(
    src: &mut dyn NodeSource,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, MerkleError> {
    if index >= size {
        return Err(MerkleError::Range(format!(
            "leaf index {index} is outside a tree of size {size}"
        )));
    }
    let mut out = Vec::new();
    path(src, index, 0, size, &mut out)?;
    Ok(out)
}

fn path(
    src: &mut dyn NodeSource,
    m: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<Hash>,
) -> Result<(), MerkleError> {
    let n = hi - lo;
    if n <= 1 {
        return Ok(());
    }
    let k = split_point(n);
    if m < k {
        path(src, m, lo, lo + k, out)?;
        out.push(subtree_hash(src, lo + k, hi)?);
    } else {
        path(src, m - k, lo + k, hi, out)?;
        out.push(subtree_hash(src, lo, lo + k)?);
    }
    Ok(())
}

/// The consistency proof between tree sizes `old` and `new` (RFC 6962
/// §2.1.2 PROOF). Empty when `old` is 0 or equal to `new`.
pub fn consistency_proof(
    src: &mut dyn NodeSource,
    old: u64,
    new: u64,
) -> Result<Vec<Hash>, MerkleError> {
    if old > new {
        return Err(MerkleError::Range(format!(
            "cannot prove consistency from size {old} to the smaller size {new}"
        )));
    }
    let mut out = Vec::new();
    if old == 0 || old == new {
        return Ok(out);
    }
    subproof(src, old, 0, new, true, &mut out)?;
    Ok(out)
}

fn subproof(
    src: &mut dyn NodeSource,
    m: u64,
    lo: u64,
    hi: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Result<(), MerkleError> {
    let n = hi - lo;
    if m == n {
        if !complete {
            out.push(subtree_hash(src, lo, hi)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(src, m, lo, lo + k, complete, out)?;
        out.push(subtree_hash(src, lo + k, hi)?);
    } else {
        subproof(src, m - k, lo + k, hi, false, out)?;
        out.push(subtree_hash(src, lo, lo + k)?);
    }
    Ok(())
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Checks a consistency proof between `(old, old_root)` and
/// `(new, new_root)` (RFC 9162 §2.1.4.2). Size 0 is consistent with
/// anything (empty proof); equal sizes need equal roots and an empty proof.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old > new {
        return false;
    }
    if old == 0 {
        return proof.is_empty();
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *old_root && sr == *new_root && snode == 0
}

/// The right edge of a tree: the hashes of the maximal perfect subtrees
/// covering `[0, size)`, largest (leftmost) first — one per set bit of
/// `size`. Appending a leaf and computing the root are O(log n).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactRange {
    size: u64,
    hashes: Vec<Hash>,
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds from stored hashes; `hashes` must hold one hash per set bit
    /// of `size`, largest subtree first.
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Self, MerkleError> {
        if hashes.len() != size.count_ones() as usize {
            return Err(MerkleError::Range(format!(
                "a compact range of size {size} has {} hashes, not {}",
                size.count_ones(),
                hashes.len()
            )));
        }
        Ok(CompactRange { size, hashes })
    }

    /// Reads the compact range of a tree of size `size` from a source.
    pub fn load(src: &mut dyn NodeSource, size: u64) -> Result<Self, MerkleError> {
        let mut hashes = Vec::new();
        for id in range_nodes(0, size) {
            hashes.push(subtree_hash(src, id.start(), id.end())?);
        }
        Ok(CompactRange { size, hashes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtrees and their hashes, largest first.
    pub fn nodes(&self) -> Vec<(NodeId, Hash)> {
        range_nodes(0, self.size)
            .into_iter()
            .zip(self.hashes.iter().copied())
            .collect()
    }

    /// Appends a leaf hash. `completed` is called for every perfect subtree
    /// of level ≥ 1 the append completes (so it can be stored).
    pub fn append(&mut self, leaf: Hash, completed: impl FnMut(NodeId, &Hash)) {
        // A leaf is a level-0 subtree and every size is a multiple of 1.
        let _ = self.append_subtree(0, leaf, completed);
    }

    /// Appends the hash of a whole perfect subtree of 2^`level` leaves; the
    /// size must be a multiple of 2^`level` (the subtree is aligned).
    pub fn append_subtree(
        &mut self,
        level: u8,
        hash: Hash,
        mut completed: impl FnMut(NodeId, &Hash),
    ) -> Result<(), MerkleError> {
        if level >= 63 || self.size % (1u64 << level) != 0 {
            return Err(MerkleError::Range(format!(
                "a subtree of 2^{level} leaves cannot follow {} leaves",
                self.size
            )));
        }
        let mut h = hash;
        let mut lvl = level;
        while (self.size >> lvl) & 1 == 1 {
            let Some(left) = self.hashes.pop() else {
                break;
            };
            h = node_hash(&left, &h);
            lvl += 1;
            completed(NodeId::new(lvl, self.size >> lvl), &h);
        }
        self.hashes.push(h);
        self.size += 1u64 << level;
        Ok(())
    }

    /// The root hash (RFC 6962 MTH of all leaves so far).
    pub fn root(&self) -> Hash {
        let mut it = self.hashes.iter().rev();
        let Some(last) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, h| node_hash(h, &acc))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    /// MTH straight from RFC 6962, over a slice.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    fn leaf_source(d: &[Hash]) -> impl FnMut(NodeId) -> Result<Option<Hash>, MerkleError> + '_ {
        move |id: NodeId| Ok((id.level == 0).then(|| d[id.index as usize]))
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rfc6962_reference_vectors() {
        // Leaves and roots of the certificate-transparency-go test data
        // (merkle testdata: inputs 0x"", 0x00, 0x10, ...).
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let d: Vec<Hash> = inputs.iter().map(|b| leaf_hash(b)).collect();
        let mut cr = CompactRange::new();
        for (i, l) in d.iter().enumerate() {
            cr.append(*l, |_, _| {});
            assert_eq!(hex::encode(cr.root()), roots[i], "size {}", i + 1);
            assert_eq!(cr.root(), mth(&d[..=i]));
        }
    }

    #[test]
    fn compact_range_stores_every_complete_subtree() {
        let d = leaves(77);
        let mut cr = CompactRange::new();
        let mut nodes: HashMap<NodeId, Hash> = HashMap::new();
        for (i, l) in d.iter().enumerate() {
            nodes.insert(NodeId::new(0, i as u64), *l);
            cr.append(*l, |id, h| {
                nodes.insert(id, *h);
            });
            assert_eq!(cr.nodes().len(), (i + 1).count_ones() as usize);
        }
        for (id, h) in &nodes {
            assert_eq!(*h, mth(&d[id.start() as usize..id.end() as usize]));
        }
        // Every complete perfect subtree was reported.
        for level in 0..7u8 {
            let count = 77u64 >> level;
            for index in 0..count {
                assert!(nodes.contains_key(&NodeId::new(level, index)));
            }
        }
        let mut src = |id: NodeId| Ok(nodes.get(&id).copied());
        for n in 0..=77u64 {
            assert_eq!(root_hash(&mut src, n).unwrap(), mth(&d[..n as usize]));
        }
        let loaded = CompactRange::load(&mut src, 77).unwrap();
        assert_eq!(loaded, cr);
    }

    #[test]
    fn range_nodes_are_maximal_and_cover() {
        for begin in 0..40u64 {
            for end in begin..70u64 {
                let ns = range_nodes(begin, end);
                let mut p = begin;
                for id in &ns {
                    assert_eq!(id.start(), p);
                    p = id.end();
                    // Maximal: the parent does not fit in [begin, end).
                    let parent = NodeId::new(id.level + 1, id.index / 2);
                    assert!(parent.start() < begin || parent.end() > end);
                }
                assert_eq!(p, end);
            }
        }
    }

    #[test]
    fn proofs_verify_for_all_small_trees() {
        let d = leaves(40);
        for n in 1..=40u64 {
            let root = mth(&d[..n as usize]);
            for i in 0..n {
                let p = inclusion_proof(&mut leaf_source(&d), i, n).unwrap();
                assert!(verify_inclusion(i, n, &d[i as usize], &p, &root));
                // Wrong leaf, index or root fails.
                let other = d[((i + 1) % n) as usize];
                if n > 1 {
                    assert!(!verify_inclusion(i, n, &other, &p, &root));
                    assert!(!verify_inclusion((i + 1) % n, n, &d[i as usize], &p, &root));
                }
            }
            for m in 0..=n {
                let old = mth(&d[..m as usize]);
                let p = consistency_proof(&mut leaf_source(&d), m, n).unwrap();
                assert!(verify_consistency(m, n, &old, &root, &p), "{m} -> {n}");
                if m > 0 && m < n {
                    let bad = mth(&d[1..=m as usize]);
                    assert!(!verify_consistency(m, n, &bad, &root, &p));
                    assert!(!verify_consistency(m, n, &old, &bad, &p));
                    assert!(!verify_consistency(m, n, &old, &root, &p[1..]));
                }
            }
        }
    }

    #[test]
    fn prefix_and_suffix_nodes_rebuild_the_root() {
        let d = leaves(24);
        for n in 1..=24u64 {
            for a in 0..n {
                for b in a + 1..=n {
                    let mut have: HashMap<NodeId, Hash> = HashMap::new();
                    for id in range_nodes(0, a).into_iter().chain(range_nodes(b, n)) {
                        have.insert(id, mth(&d[id.start() as usize..id.end() as usize]));
                    }
                    let mut src = |id: NodeId| {
                        if id.level == 0 && id.index >= a && id.index < b {
                            return Ok(Some(d[id.index as usize]));
                        }
                        Ok(have.get(&id).copied())
                    };
                    assert_eq!(root_hash(&mut src, n).unwrap(), mth(&d[..n as usize]));
                    // Any intermediate size within the range, from the prefix alone.
                    for m in a..=b {
                        assert_eq!(root_hash(&mut src, m).unwrap(), mth(&d[..m as usize]));
                    }
                }
            }
        }
    }

    #[test]
    fn prefix_leaves_and_suffix_fold_into_the_root() {
        let d = leaves(33);
        for n in 1..=33u64 {
            for a in 0..n {
                for b in a..=n {
                    let mut cr = CompactRange::from_parts(
                        a,
                        range_nodes(0, a)
                            .iter()
                            .map(|id| mth(&d[id.start() as usize..id.end() as usize]))
                            .collect(),
                    )
                    .unwrap();
                    for l in &d[a as usize..b as usize] {
                        cr.append(*l, |_, _| {});
                    }
                    assert_eq!(cr.root(), mth(&d[..b as usize]));
                    for id in range_nodes(b, n) {
                        let h = mth(&d[id.start() as usize..id.end() as usize]);
                        cr.append_subtree(id.level, h, |_, _| {}).unwrap();
                    }
                    assert_eq!(cr.root(), mth(&d[..n as usize]), "{a} {b} {n}");
                }
            }
        }
        let mut cr = CompactRange::new();
        cr.append([0; 32], |_, _| {});
        assert!(cr.append_subtree(1, [0; 32], |_, _| {}).is_err());
    }

    #[test]
    fn missing_hash_is_reported() {
        let mut src = |_id: NodeId| Ok(None);
        assert!(matches!(
            root_hash(&mut src, 3),
            Err(MerkleError::Missing(NodeId { level: 0, .. }))
        ));
    }
}
