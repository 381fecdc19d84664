//! The members' block cache: content-addressed blocks under `<data>/cache/`, each
//! named by its BLAKE3 hash. Pinned blocks (those of files kept in full) are never
//! evicted; the others form an LRU bounded by a byte budget. Every block is
//! verified against its hash when it is read from disk, so a corrupted cache file
//! is detected, dropped, and fetched again instead of being served.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::blocks::hash_block;
use crate::ids::BlockHash;

/// Errors of the block cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Data offered for a hash does not hash to it.
    #[error("block {expected} does not match its content (hashes to {actual})")]
    HashMismatch {
        /// The hash it was offered under.
        expected: BlockHash,
        /// What the data hashes to.
        actual: BlockHash,
    },
    /// The cache directory failed (full disk, permissions, …).
    #[error("block cache {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Byte counts for `brume status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheUsage {
    /// Bytes in pinned blocks.
    pub pinned_bytes: u64,
    /// Bytes in evictable blocks.
    pub evictable_bytes: u64,
    /// Number of blocks on disk.
    pub blocks: u64,
    /// Blocks found corrupt and dropped since start.
    pub corrupt_dropped: u64,
}

#[derive(Debug)]
struct State {
    /// Evictable blocks, least recently used first, with their lengths.
    evictable: LruCache<BlockHash, u64>,
    /// Pinned blocks with their lengths and pin counts.
    pinned: HashMap<BlockHash, (u64, u32)>,
    /// Pin counts of blocks not (yet) in the cache, applied when they arrive.
    pending_pins: HashMap<BlockHash, u32>,
    evictable_bytes: u64,
    pinned_bytes: u64,
    corrupt_dropped: u64,
    /// Recently read, verified block contents, bounded by `hot_budget` bytes.
    hot: LruCache<BlockHash, Arc<[u8]>>,
    hot_bytes: u64,
}

/// The block cache of one client.
#[derive(Debug)]
pub struct BlockCache {
    dir: PathBuf,
    budget: u64,
    hot_budget: u64,
    /// All bookkeeping; held for map updates only, never across disk I/O.
    state: Mutex<State>,
}

fn hex(h: &BlockHash) -> String {
    h.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where block `h` lives in the cache directory `dir`.
fn block_path(dir: &Path, h: &BlockHash) -> PathBuf {
    let name = hex(h);
    dir.join(&name[..2]).join(name)
}

/// Block `h` read from the cache directory `dir` without opening the cache
/// (for readers beside a running daemon, such as `brume status`), if it is
/// there and matches its hash.
pub fn read_verified(dir: &Path, h: &BlockHash) -> Option<Vec<u8>> {
    let data = std::fs::read(block_path(dir, h)).ok()?;
    (crate::blocks::hash_block(&data) == *h).then_some(data)
}

/// The hash a cache file is named after: exactly what [`hex`] writes, so that the
/// block is looked up at the path it was found at (`from_str_radix` alone would
/// also take upper case and a `+` sign).
fn parse_hex(s: &str) -> Option<BlockHash> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(BlockHash(out))
}

impl BlockCache {
    /// Opens the cache in `dir`, taking stock of the blocks already there (oldest
    /// first in the LRU). `budget` bounds evictable bytes; `hot_budget` bounds the
    /// verified blocks kept in memory.
    pub fn open(dir: &Path, budget: u64, hot_budget: u64) -> Result<Self, CacheError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir).map_err(io(dir))? {
            let sub = sub.map_err(io(dir))?;
            if !sub.file_type().map_err(io(dir))?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path()).map_err(io(&sub.path()))? {
                let f = f.map_err(io(&sub.path()))?;
                let name = f.file_name();
                let name = name.to_string_lossy();
                match parse_hex(&name) {
                    Some(h) => {
                        let m = f.metadata().map_err(io(&f.path()))?;
                        found.push((m.modified().ok(), h, m.len()));
                    }
                    // Leftover temporary files from an interrupted insert.
                    None => {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let mut state = State {
            evictable: LruCache::unbounded(),
            pinned: HashMap::new(),
            pending_pins: HashMap::new(),
            evictable_bytes: 0,
            pinned_bytes: 0,
            corrupt_dropped: 0,
            hot: LruCache::unbounded(),
            hot_bytes: 0,
        };
        for (_, h, len) in found {
            state.evictable.put(h, len);
            state.evictable_bytes += len;
        }
        let cache = Self {
            dir: dir.to_owned(),
            budget,
            hot_budget,
            state: Mutex::new(state),
        };
        cache.evict();
        Ok(cache)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the maps consistent; a panic elsewhere cannot
        // leave them half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where block `h` lives.
    pub fn path(&self, h: &BlockHash) -> PathBuf {
        block_path(&self.dir, h)
    }

    /// Bytes free for an unprivileged writer on the cache's filesystem, if
    /// the OS tells.
    pub fn free_bytes(&self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes into a zeroed struct we own; `path` is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Whether block `h` is in the cache.
    pub fn contains(&self, h: &BlockHash) -> bool {
        let s = self.state();
        s.pinned.contains_key(h) || s.evictable.contains(h)
    }

    /// Stores a block after checking that `data` hashes to `h`. Written to a
    /// temporary name and renamed, so no partial block stands under a hash.
    pub fn insert(&self, h: &BlockHash, data: &[u8]) -> Result<(), CacheError> {
        let actual = hash_block(data);
        if actual != *h {
            return Err(CacheError::HashMismatch {
                expected: *h,
                actual,
            });
        }
        if self.contains(h) {
            return Ok(());
        }
        let path = self.path(h);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(source) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Io { path, source });
        }
        let len = data.len() as u64;
        {
            let mut s = self.state();
            match s.pending_pins.remove(h) {
                Some(count) => {
                    s.pinned.insert(*h, (len, count));
                    s.pinned_bytes += len;
                }
                None => {
                    s.evictable.put(*h, len);
                    s.evictable_bytes += len;
                }
            }
        }
        self.evict();
        Ok(())
    }

    /// Reads and verifies block `h`. `Ok(None)` if it is not cached or was found
    /// corrupt (then it is dropped, to be fetched again).
    pub fn read(&self, h: &BlockHash) -> Result<Option<Arc<[u8]>>, CacheError> {
        {
            let mut s = self.state();
            if let Some(data) = s.hot.get(h) {
                let data = data.clone();
                s.evictable.get(h);
                return Ok(Some(data));
            }
            if !s.pinned.contains_key(h) && !s.evictable.contains(h) {
                return Ok(None);
            }
            s.evictable.get(h);
        }
        let path = self.path(h);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(block = %h, "cached block vanished; will fetch it again");
                self.forget(h, false);
                return Ok(None);
            }
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        if hash_block(&data) != *h {
            tracing::error!(block = %h, path = %path.display(), "cached block is corrupt; dropping it");
            let _ = std::fs::remove_file(&path);
            self.forget(h, true);
            return Ok(None);
        }
        let data: Arc<[u8]> = data.into();
        let mut s = self.state();
        s.hot_bytes += data.len() as u64;
        s.hot.put(*h, data.clone());
        while s.hot_bytes > self.hot_budget {
            match s.hot.pop_lru() {
                Some((_, d)) => s.hot_bytes -= d.len() as u64,
                None => break,
            }
        }
        Ok(Some(data))
    }

    /// Drops `h` from the bookkeeping (its file is already gone or corrupt). Pins
    /// stay pending so that a refetched copy is pinned again.
    fn forget(&self, h: &BlockHash, corrupt: bool) {
        let mut s = self.state();
        if let Some(len) = s.evictable.pop(h) {
            s.evictable_bytes -= len;
        }
        if let Some((len, count)) = s.pinned.remove(h) {
            s.pinned_bytes -= len;
            s.pending_pins.insert(*h, count);
        }
        if let Some(d) = s.hot.pop(h) {
            s.hot_bytes -= d.len() as u64;
        }
        if corrupt {
            s.corrupt_dropped += 1;
        }
    }

    /// Pins `h` (once more): it will not be evicted until unpinned as often.
    pub fn pin(&self, h: &BlockHash) {
        let mut s = self.state();
        if let Some(len) = s.evictable.pop(h) {
            s.evictable_bytes -= len;
            s.pinned.insert(*h, (len, 1));
            s.pinned_bytes += len;
        } else if let Some(p) = s.pinned.get_mut(h) {
            p.1 += 1;
        } else {
            *s.pending_pins.entry(*h).or_default() += 1;
        }
    }

    /// Releases one pin of `h`; with none left it becomes evictable.
    pub fn unpin(&self, h: &BlockHash) {
        {
            let mut s = self.state();
            if let Some(count) = s.pending_pins.get_mut(h) {
                *count -= 1;
                if *count == 0 {
                    s.pending_pins.remove(h);
                }
                return;
            }
            let Some(p) = s.pinned.get_mut(h) else {
                return;
            };
            p.1 -= 1;
            if p.1 > 0 {
                return;
            }
            let len = p.0;
            s.pinned.remove(h);
            s.pinned_bytes -= len;
            s.evictable.put(*h, len);
            s.evictable_bytes += len;
        }
        self.evict();
    }

    /// Pins every block of `hashes` not pinned yet (cached ones move out of the LRU,
    /// the others are pinned when they arrive); pin counts already there stay as
    /// they are. Costs O(`hashes`), so that what a change brings can be pinned before
    /// its blocks arrive while [`pin_exactly`](Self::pin_exactly), O(all pins), runs
    /// now and then.
    pub fn pin_at_least(&self, hashes: impl IntoIterator<Item = BlockHash>) {
        let mut s = self.state();
        for h in hashes {
            if s.pinned.contains_key(&h) || s.pending_pins.contains_key(&h) {
                continue;
            }
            if let Some(len) = s.evictable.pop(&h) {
                s.evictable_bytes -= len;
                s.pinned.insert(h, (len, 1));
                s.pinned_bytes += len;
            } else {
                s.pending_pins.insert(h, 1);
            }
        }
    }

    /// Makes exactly `wanted` the pinned blocks: those cached move out of the LRU,
    /// those not yet cached are pinned when they arrive, and blocks no longer
    /// wanted become evictable.
    pub fn pin_exactly(&self, wanted: &std::collections::HashSet<BlockHash>) {
        {
            let mut s = self.state();
            let unpin: Vec<BlockHash> = s
                .pinned
                .keys()
                .filter(|h| !wanted.contains(h))
                .copied()
                .collect();
            for h in unpin {
                if let Some((len, _)) = s.pinned.remove(&h) {
                    s.pinned_bytes -= len;
                    s.evictable.put(h, len);
                    s.evictable_bytes += len;
                }
            }
            s.pending_pins.clear();
            for h in wanted {
                if s.pinned.contains_key(h) {
                    continue;
                }
                if let Some(len) = s.evictable.pop(h) {
                    s.evictable_bytes -= len;
                    s.pinned.insert(*h, (len, 1));
                    s.pinned_bytes += len;
                } else {
                    s.pending_pins.insert(*h, 1);
                }
            }
        }
        self.evict();
    }

    /// Removes every block not in `wanted`, pinned or not, from memory and from
    /// disk (after leaving a group: nothing of it is kept). Returns the bytes
    /// freed.
    pub fn keep_only(&self, wanted: &std::collections::HashSet<BlockHash>) -> u64 {
        let drop: Vec<BlockHash> = {
            let mut s = self.state();
            let mut drop: Vec<BlockHash> = s
                .pinned
                .keys()
                .filter(|h| !wanted.contains(h))
                .copied()
                .collect();
            drop.extend(
                s.evictable
                    .iter()
                    .map(|(h, _)| *h)
                    .filter(|h| !wanted.contains(h)),
            );
            s.pending_pins.retain(|h, _| wanted.contains(h));
            drop
        };
        let mut freed = 0;
        for h in drop {
            {
                let mut s = self.state();
                if let Some((len, _)) = s.pinned.remove(&h) {
                    s.pinned_bytes -= len;
                    freed += len;
                } else if let Some(len) = s.evictable.pop(&h) {
                    s.evictable_bytes -= len;
                    freed += len;
                }
                if let Some(d) = s.hot.pop(&h) {
                    s.hot_bytes -= d.len() as u64;
                }
            }
            let _ = std::fs::remove_file(self.path(&h));
        }
        freed
    }

    /// Evicts least recently used blocks until the evictable bytes fit the budget.
    fn evict(&self) {
        loop {
            let victim = {
                let mut s = self.state();
                if s.evictable_bytes <= self.budget {
                    return;
                }
                let Some((h, len)) = s.evictable.pop_lru() else {
                    return;
                };
                s.evictable_bytes -= len;
                if let Some(d) = s.hot.pop(&h) {
                    s.hot_bytes -= d.len() as u64;
                }
                h
            };
            let _ = std::fs::remove_file(self.path(&victim));
        }
    }

    /// Current usage.
    pub fn usage(&self) -> CacheUsage {
        let s = self.state();
        CacheUsage {
            pinned_bytes: s.pinned_bytes,
            evictable_bytes: s.evictable_bytes,
            blocks: (s.pinned.len() + s.evictable.len()) as u64,
            corrupt_dropped: s.corrupt_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn block(n: u8, len: usize) -> (BlockHash, Vec<u8>) {
        let data = vec![n; len];
        (hash_block(&data), data)
    }

    #[test]
    fn refuses_data_that_does_not_match_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let (h, _) = block(1, 100);
        assert!(matches!(
            c.insert(&h, &[2u8; 100]),
            Err(CacheError::HashMismatch { .. })
        ));
        assert!(!c.contains(&h));
    }

    #[test]
    fn corrupted_block_on_disk_is_detected_dropped_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 1 << 20, 0).unwrap();
        let (h, data) = block(7, 4096);
        c.insert(&h, &data).unwrap();
        assert_eq!(&*c.read(&h).unwrap().unwrap(), &data[..]);
        let mut bytes = std::fs::read(c.path(&h)).unwrap();
        bytes[100] ^= 0x40;
        std::fs::write(c.path(&h), bytes).unwrap();
        assert!(c.read(&h).unwrap().is_none());
        assert!(!c.contains(&h));
        assert_eq!(c.usage().corrupt_dropped, 1);
        // Fetched again, it is served again.
        c.insert(&h, &data).unwrap();
        assert_eq!(&*c.read(&h).unwrap().unwrap(), &data[..]);
    }

    #[test]
    fn evicts_least_recently_used_but_never_pinned_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 3000, 1 << 20).unwrap();
        let blocks: Vec<_> = (0..4).map(|i| block(i, 1000)).collect();
        c.pin(&blocks[0].0);
        for (h, d) in &blocks[..3] {
            c.insert(h, d).unwrap();
        }
        // Touch block 1 so block 2 is the least recently used evictable one.
        c.read(&blocks[1].0).unwrap();
        c.insert(&blocks[3].0, &blocks[3].1).unwrap();
        c.insert(&block(9, 1500).0, &block(9, 1500).1).unwrap();
        assert!(c.contains(&blocks[0].0), "pinned block evicted");
        assert!(!c.contains(&blocks[2].0), "LRU block kept");
        assert!(c.usage().evictable_bytes <= 3000);
        assert_eq!(c.usage().pinned_bytes, 1000);
        c.unpin(&blocks[0].0);
        assert_eq!(c.usage().pinned_bytes, 0);
        assert!(c.usage().evictable_bytes <= 3000);
    }

    #[test]
    fn pin_exactly_pins_the_wanted_set_including_blocks_still_to_come() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 1000, 1 << 20).unwrap();
        let (a, da) = block(1, 800);
        let (b, db) = block(2, 800);
        c.insert(&a, &da).unwrap();
        c.pin_exactly(&[a, b].into_iter().collect());
        c.insert(&b, &db).unwrap();
        // Both pinned: nothing evicted although 1600 bytes exceed the budget.
        assert!(c.contains(&a) && c.contains(&b));
        assert_eq!(c.usage().pinned_bytes, 1600);
        c.pin_exactly(&[b].into_iter().collect());
        assert_eq!(c.usage().pinned_bytes, 800);
        assert!(c.usage().evictable_bytes <= 1000);
    }

    #[test]
    fn pin_at_least_adds_pins_that_pin_exactly_later_trims() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 1000, 1 << 20).unwrap();
        let (a, da) = block(1, 800);
        let (b, db) = block(2, 800);
        let (x, dx) = block(3, 800);
        c.insert(&a, &da).unwrap();
        c.pin_exactly(&[a].into_iter().collect());
        // b is pinned before it arrives, a keeps its single pin.
        c.pin_at_least([a, b, b]);
        c.insert(&b, &db).unwrap();
        c.insert(&x, &dx).unwrap();
        c.insert(&block(4, 800).0, &block(4, 800).1).unwrap();
        assert!(
            c.contains(&a) && c.contains(&b),
            "pinned blocks are never evicted"
        );
        assert!(!c.contains(&x), "the unpinned one went first");
        assert_eq!(c.usage().pinned_bytes, 1600);
        // One unpin releases a: pin_at_least did not count it twice.
        c.unpin(&a);
        assert_eq!(c.usage().pinned_bytes, 800);
        // pin_exactly puts the set back to what is wanted.
        c.pin_exactly(&[a].into_iter().collect());
        assert_eq!(c.usage().pinned_bytes, 800);
        assert!(c.contains(&a));
    }

    #[test]
    fn survives_reopen_and_cleans_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let (h, data) = block(3, 2048);
        {
            let c = BlockCache::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            c.insert(&h, &data).unwrap();
            std::fs::write(c.path(&h).with_extension("tmp"), b"partial").unwrap();
        }
        let c = BlockCache::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(&*c.read(&h).unwrap().unwrap(), &data[..]);
        assert!(!c.path(&h).with_extension("tmp").exists());
        assert_eq!(c.usage().blocks, 1);
    }

    #[test]
    fn files_not_named_as_the_cache_names_blocks_are_not_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (h, data) = block(3, 10);
        let name = hex(&h);
        std::fs::create_dir_all(dir.path().join(&name[..2])).unwrap();
        let upper = dir.path().join(&name[..2]).join(name.to_uppercase());
        std::fs::write(&upper, &data).unwrap();
        let c = BlockCache::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert!(!c.contains(&h));
        assert!(!upper.exists());
    }

    proptest! {
        #[test]
        fn only_the_names_blocks_are_stored_under_parse(
            s in prop_oneof![
                "[0-9a-f]{64}",
                prop::collection::vec(
                    prop::sample::select(vec!["00", "9f", "9f", "9f", "aB", "FF", "+f", "+0", "-1"]),
                    32,
                )
                .prop_map(|pairs| pairs.concat()),
                "\\PC{0,70}",
            ],
            h: [u8; 32],
        ) {
            // A file the cache did not write under that name is not taken for a block:
            // its path would differ from the one the block is looked up at.
            match parse_hex(&s) {
                Some(parsed) => prop_assert_eq!(hex(&parsed), s),
                None => prop_assert!(
                    s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                ),
            }
            prop_assert_eq!(parse_hex(&hex(&BlockHash(h))), Some(BlockHash(h)));
        }
    }
}
