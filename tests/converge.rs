//! Randomized convergence: seeded random sequences of owner operations, with
//! member restarts, cut links and member-local edits injected. After settling,
//! the member's tree must equal the owner's, except for what the member wrote,
//! which must all still be there with exactly the member's bytes (in place, or
//! as conflict copies).
//!
//! `BRUME_CONVERGE_SEEDS` picks the seeds (`7`, `0..300`, `5,9,12`); the default
//! is what the test suite runs. A failure names its seed: rerun it alone with
//! `BRUME_CONVERGE_SEEDS=<seed>`, and add it to [`REGRESSIONS`] once fixed.

use std::collections::{BTreeMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Hub, Peer, SmallFs, online};

/// Seeds the test suite runs when `BRUME_CONVERGE_SEEDS` is not set.
const DEFAULT_SEEDS: std::ops::Range<u64> = 0..200;
/// Seeds that once failed; always run.
const REGRESSIONS: &[u64] = &[];
/// Owner operations per seed.
const STEPS: usize = 40;
/// Every member write starts with this, and no owner write does.
const MEMBER_MARK: &[u8] = b"member-";

use crate::harness::Rng;

impl Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }

    fn letters(&mut self, len: usize) -> Vec<u8> {
        // Printable, and never starting with MEMBER_MARK.
        (0..len).map(|_| b'A' + self.below(26) as u8).collect()
    }
}

/// What a tree holds at a path.
#[derive(Clone, PartialEq, Eq)]
enum Entry {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Link { target: PathBuf },
}

/// Every entry under `root`, by path relative to it; files with their bytes
/// only if `read` (reading needs the owner for blocks not cached yet).
fn walk(root: &Path, read: bool) -> BTreeMap<PathBuf, Entry> {
    fn go(root: &Path, dir: &Path, read: bool, out: &mut BTreeMap<PathBuf, Entry>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let perm = meta.mode() & 0o7777;
            let entry = if meta.file_type().is_symlink() {
                Entry::Link {
                    target: std::fs::read_link(&path).unwrap_or_default(),
                }
            } else if meta.is_dir() {
                go(root, &path, read, out);
                Entry::Dir { perm }
            } else {
                Entry::File {
                    perm,
                    data: if read {
                        std::fs::read(&path)
                            .unwrap_or_else(|e| format!("<unreadable: {e}>").into_bytes())
                    } else {
                        Vec::new()
                    },
                }
            };
            out.insert(rel, entry);
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, read, &mut out);
    out
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Dir { perm } => write!(f, "dir {perm:o}"),
            Entry::Link { target } => write!(f, "symlink to {}", target.display()),
            Entry::File { perm, data } => write!(
                f,
                "file {perm:o}, {} bytes, {:?}…, blake3 {}",
                data.len(),
                String::from_utf8_lossy(&data[..data.len().min(24)]),
                &blake3::hash(data).to_hex()[..12]
            ),
        }
    }
}

fn is_member_data(e: &Entry) -> bool {
    matches!(e, Entry::File { data, .. } if data.starts_with(MEMBER_MARK))
}

/// Whether `e` is what a member write that failed (a full disk) may have
/// left: its file truncated, and a part of its bytes.
fn is_failed_member_write(e: &Entry, failed: &[Vec<u8>]) -> bool {
    matches!(e, Entry::File { data, .. } if failed.iter().any(|f| f.starts_with(data)))
}

/// Why the member's tree does not (yet) match, or `None` when it does.
fn mismatch(
    owner: &BTreeMap<PathBuf, Entry>,
    member: &BTreeMap<PathBuf, Entry>,
    written: &[Vec<u8>],
    failed: &[Vec<u8>],
) -> Option<String> {
    for (path, want) in owner {
        match member.get(path) {
            None => return Some(format!("{} missing at the member", path.display())),
            // A file the member edited keeps the edit until the owner changes it.
            Some(got)
                if got == want || is_member_data(got) || is_failed_member_write(got, failed) => {}
            Some(got) => {
                return Some(format!(
                    "{} differs: owner {want:?}, member {got:?}",
                    path.display()
                ));
            }
        }
    }
    for (path, got) in member {
        if owner.contains_key(path) {
            continue;
        }
        let ok = match got {
            Entry::File { .. } => is_member_data(got) || is_failed_member_write(got, failed),
            // A directory stays only to hold the member's files.
            Entry::Dir { .. } => member.iter().any(|(p, e)| {
                p.starts_with(path) && (is_member_data(e) || is_failed_member_write(e, failed))
            }),
            Entry::Link { .. } => false,
        };
        if !ok {
            return Some(format!("{} is at the member only: {got:?}", path.display()));
        }
    }
    for data in written {
        let kept = member
            .values()
            .any(|e| matches!(e, Entry::File { data: d, .. } if d == data));
        if !kept {
            return Some(format!(
                "the member's write {:?} is lost",
                String::from_utf8_lossy(&data[..data.len().min(40)])
            ));
        }
    }
    None
}

fn seeds() -> Vec<u64> {
    let spec = std::env::var("BRUME_CONVERGE_SEEDS").unwrap_or_default();
    let mut out: Vec<u64> = if spec.trim().is_empty() {
        DEFAULT_SEEDS.chain(REGRESSIONS.iter().copied()).collect()
    } else {
        spec.split(',')
            .flat_map(|part| match part.trim().split_once("..") {
                Some((a, b)) => (a.parse().unwrap()..b.parse().unwrap()).collect::<Vec<u64>>(),
                None => vec![part.trim().parse().unwrap()],
            })
            .collect()
    };
    out.dedup();
    out
}

/// Directories and files under `root` (relative), from the owner's side.
fn listing(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut dirs = vec![PathBuf::new()];
    let mut files = Vec::new();
    for (path, e) in walk(root, false) {
        match e {
            Entry::Dir { .. } => dirs.push(path),
            Entry::File { .. } if path.as_os_str() != ".members" => files.push(path),
            _ => {}
        }
    }
    (dirs, files)
}

const NAMES: &[&str] = &["a", "b", "c", "d", "e", "f"];

/// One random owner operation in the group at `root`. Failures (a rename onto a
/// directory, an rmdir of a full one) are part of the game and ignored.
fn owner_step(rng: &mut Rng, root: &Path) -> String {
    let (dirs, files) = listing(root);
    let dir = rng.pick(&dirs).unwrap().clone();
    let name = *rng.pick(NAMES).unwrap();
    let file = rng.pick(&files).cloned();
    let at = |p: &Path| root.join(p);
    match rng.below(1000) / 10 {
        // Now and then a sparse file whose block list is too long to travel
        // in its node (over 256 MiB), with a few bytes in it.
        0 if rng.chance(10) => {
            let len = (256 << 20) + rng.below(64 << 20);
            let p = dir.join(name);
            if let Ok(f) = std::fs::File::create(at(&p)) {
                let _ = f.set_len(len);
                use std::os::unix::fs::FileExt;
                for _ in 0..3 {
                    let _ = f.write_all_at(&rng.letters(100), rng.below(len - 100));
                }
            }
            format!("write sparse {} ({len} bytes)", p.display())
        }
        0..=24 => {
            let len = if rng.chance(15) {
                rng.below(700_000) as usize
            } else {
                rng.below(5_000) as usize
            };
            let p = dir.join(name);
            let _ = std::fs::write(at(&p), rng.letters(len));
            format!("write {} ({len} bytes)", p.display())
        }
        25..=39 if file.is_some() => {
            let p = file.unwrap();
            let size = std::fs::metadata(at(&p)).map(|m| m.len()).unwrap_or(0);
            let off = rng.below(size + 1_000);
            let len = 1 + rng.below(5_000) as usize;
            let data = rng.letters(len);
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(at(&p)) {
                let _ = f
                    .seek(SeekFrom::Start(off))
                    .and_then(|_| f.write_all(&data));
            }
            format!("pwrite {} at {off} ({} bytes)", p.display(), data.len())
        }
        40..=47 if file.is_some() => {
            let p = file.unwrap();
            let size = std::fs::metadata(at(&p)).map(|m| m.len()).unwrap_or(0);
            let len = rng.below(size * 3 / 2 + 10);
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(at(&p)) {
                let _ = f.set_len(len);
            }
            format!("truncate {} to {len}", p.display())
        }
        48..=59 if file.is_some() => {
            let p = file.unwrap();
            let to = dir.join(name);
            let _ = std::fs::rename(at(&p), at(&to));
            format!("rename {} -> {}", p.display(), to.display())
        }
        60..=65 if dirs.len() > 1 => {
            let from = rng.pick(&dirs[1..]).unwrap().clone();
            let to = dir.join(format!("d{name}"));
            let _ = std::fs::rename(at(&from), at(&to));
            format!("rename dir {} -> {}", from.display(), to.display())
        }
        66..=73 if file.is_some() => {
            let p = file.unwrap();
            let _ = std::fs::remove_file(at(&p));
            format!("unlink {}", p.display())
        }
        74..=81 => {
            let p = dir.join(format!("d{name}"));
            let _ = std::fs::create_dir(at(&p));
            format!("mkdir {}", p.display())
        }
        82..=86 if dirs.len() > 1 => {
            let p = rng.pick(&dirs[1..]).unwrap().clone();
            let _ = std::fs::remove_dir(at(&p));
            format!("rmdir {}", p.display())
        }
        87..=93 => {
            let all: Vec<PathBuf> = files.iter().chain(&dirs[1..]).cloned().collect();
            let Some(p) = rng.pick(&all).cloned() else {
                return "chmod (nothing)".into();
            };
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o700, 0o640]).unwrap();
            let _ = std::fs::set_permissions(at(&p), std::fs::Permissions::from_mode(mode));
            format!("chmod {} {mode:o}", p.display())
        }
        94..=96 if file.is_some() => {
            let p = file.unwrap();
            let to = dir.join(format!("h{name}"));
            let _ = std::fs::hard_link(at(&p), at(&to));
            format!("hard link {} -> {}", p.display(), to.display())
        }
        _ => {
            let p = dir.join(format!("l{name}"));
            let target = format!("{}/t{}", rng.pick(NAMES).unwrap(), rng.below(9));
            let _ = std::fs::remove_file(at(&p));
            let _ = std::os::unix::fs::symlink(&target, at(&p));
            format!("symlink {} -> {target}", p.display())
        }
    }
}

/// What the member does on its own: a write (kept, whatever the owner does) or
/// a delete of one of the owner's files (restored at the next sync).
fn member_step(
    rng: &mut Rng,
    root: &Path,
    tag: &str,
    written: &mut Vec<Vec<u8>>,
    failed: &mut Vec<Vec<u8>>,
    touched: &mut HashSet<PathBuf>,
) -> String {
    let (dirs, files) = listing(root);
    // Never overwrite or delete what the member already wrote (a conflict copy,
    // a member file, or an edit the owner has not replaced yet).
    // A file that is not a clean mirror has no `user.brume.cached`; asking
    // needs none of its blocks, so it is quick with the owner away too.
    let theirs =
        |p: &Path| touched.contains(p) || crate::sync::cached_xattr(&root.join(p)).is_none();
    if rng.chance(25) {
        let files: Vec<_> = files.into_iter().filter(|p| !theirs(p)).collect();
        let Some(p) = rng.pick(&files).cloned() else {
            return "member delete (nothing)".into();
        };
        let _ = std::fs::remove_file(root.join(&p));
        return format!("member delete {}", p.display());
    }
    let p = if rng.chance(50) {
        let files: Vec<_> = files.into_iter().filter(|p| !theirs(p)).collect();
        match rng.pick(&files) {
            Some(p) => p.clone(),
            None => return "member edit (nothing)".into(),
        }
    } else {
        rng.pick(&dirs).unwrap().join(rng.pick(NAMES).unwrap())
    };
    if theirs(&p) || root.join(&p).is_dir() {
        return format!("member write {} (skipped)", p.display());
    }
    let mut data = format!("member-{tag}-{}-", written.len()).into_bytes();
    let len = rng.below(3_000) as usize;
    data.extend(rng.letters(len));
    touched.insert(p.clone());
    match std::fs::write(root.join(&p), &data) {
        Ok(()) => {
            written.push(data);
            format!("member write {}", p.display())
        }
        Err(e) => {
            failed.push(data);
            format!("member write {}: {e}", p.display())
        }
    }
}

/// What the seeds did, to show that they exercised something.
#[derive(Debug, Default)]
struct Tally {
    member_writes: usize,
    conflict_copies: usize,
    cuts: usize,
    restarts: usize,
    removals: usize,
    full_disks: usize,
    operating: Duration,
    settling: Duration,
}

/// The size of bob's data filesystem, and how much room a full period leaves.
const ROOMY: &str = "4g";
const FULL_MARGIN: u64 = 256 << 10;

fn run_seed(
    seed: u64,
    hub: &Arc<Hub>,
    alice: &Peer,
    bob: &mut Peer,
    disk: &SmallFs,
    tally: &mut Tally,
) -> Result<(), String> {
    let t0 = Instant::now();
    let mut rng = Rng(seed);
    let group = format!("s{seed}");
    let owner_root = alice.path(&format!("alice/{group}"));
    let member_root = bob.path(&format!("alice/{group}"));
    std::fs::create_dir(&owner_root).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::write(owner_root.join(".members"), b"bob\n").unwrap();
    std::fs::create_dir_all(&member_root).map_err(|e| format!("join: {e}"))?;

    let mut log = Vec::new();
    let mut written = Vec::new();
    let mut failed = Vec::new();
    let mut touched = HashSet::new();
    let mut offline_for = 0;
    let mut removed_for = 0;
    let mut full_for = 0;
    for step in 0..STEPS {
        log.push(owner_step(&mut rng, &owner_root));
        // `.members`: rewritten in place with the same content, or bob
        // removed for a few steps (by a temp file renamed over it, as `sed -i`
        // does) and listed again.
        if removed_for > 0 {
            removed_for -= 1;
            if removed_for == 0 {
                std::fs::write(owner_root.join(".members"), b"bob\n").unwrap();
                log.push("bob listed again".into());
            }
        } else if rng.chance(3) {
            std::fs::write(owner_root.join(".members"), b"bob\n").unwrap();
            log.push(".members rewritten".into());
        } else if rng.chance(2) {
            removed_for = 1 + rng.below(4);
            let tmp = owner_root.join(".members.tmp");
            std::fs::write(&tmp, b"carol\n").unwrap();
            std::fs::rename(&tmp, owner_root.join(".members")).unwrap();
            log.push(format!("bob removed for {removed_for} steps"));
            tally.removals += 1;
        }
        // bob's disk fills up for a few steps: nothing fits but a little.
        if full_for > 0 {
            full_for -= 1;
            if full_for == 0 {
                disk.resize(ROOMY);
                log.push("bob's disk has room again".into());
            }
        } else if rng.chance(3) {
            full_for = 1 + rng.below(5);
            // Blocks keep arriving while it shrinks: leave a little more room
            // if they took what was left.
            let shrunk =
                (0..8).any(|i| disk.try_resize(&format!("{}", disk.used() + (FULL_MARGIN << i))));
            assert!(shrunk, "cannot shrink bob's disk");
            log.push(format!("bob's disk full for {full_for} steps"));
            tally.full_disks += 1;
        }
        if offline_for > 0 {
            offline_for -= 1;
            if offline_for == 0 {
                hub.set_offline("bob", false);
                online(hub, bob, "alice");
                log.push("link back".into());
            }
        }
        if rng.chance(12) {
            let tag = format!("{seed}.{step}");
            log.push(member_step(
                &mut rng,
                &member_root,
                &tag,
                &mut written,
                &mut failed,
                &mut touched,
            ));
        }
        if offline_for == 0 && rng.chance(4) {
            offline_for = 1 + rng.below(6);
            hub.set_offline("bob", true);
            log.push(format!("link cut for {offline_for} steps"));
            tally.cuts += 1;
        }
        // (Not while his disk is full: a mount needs room for its catalog.)
        if full_for == 0 && rng.chance(3) {
            bob.unmount(hub);
            bob.mount(hub);
            if offline_for == 0 {
                online(hub, bob, "alice");
            }
            log.push("member restarted".into());
            tally.restarts += 1;
        }
    }
    // Settle: bob is listed, has room, the link is up and he has resynchronized.
    if removed_for > 0 {
        std::fs::write(owner_root.join(".members"), b"bob\n").unwrap();
    }
    if full_for > 0 {
        disk.resize(ROOMY);
    }
    let t1 = Instant::now();
    tally.operating += t1 - t0;
    hub.set_offline("bob", false);
    online(hub, bob, "alice");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owner = walk(&owner_root, true);
        let member = walk(&member_root, true);
        match mismatch(&owner, &member, &written, &failed) {
            None => {
                tally.member_writes += written.len();
                tally.conflict_copies += member
                    .keys()
                    .filter(|p| p.to_string_lossy().contains("-conflict-"))
                    .count();
                break;
            }
            Some(why) if Instant::now() > deadline => {
                return Err(format!(
                    "seed {seed} did not converge: {why}\noperations:\n  {}\nowner: {owner:#?}\nmember: {member:#?}",
                    log.join("\n  ")
                ));
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    tally.settling += t1.elapsed();
    // Leave and delete the group, so that the next seed starts clean.
    // A late message from the owner may add an entry while `rm -r` runs, as it
    // may for a person: try again, as they would.
    let mut tries = 0;
    while let Err(e) = std::fs::remove_dir_all(&member_root) {
        tries += 1;
        if tries == 20 {
            return Err(format!("seed {seed}: leave: {e}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_dir_all(&owner_root).map_err(|e| format!("rm group: {e}"))?;
    Ok(())
}

#[test]
fn random_owner_operations_converge_at_the_member() {
    crate::harness::log_to_test_output();
    let seeds = seeds();
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    // bob's data directory is a filesystem of its own, which can fill up.
    let mut disk = None;
    let mut bob = Peer::start_prepared(&hub, "bob", 1 << 30, true, |data| {
        disk = Some(SmallFs::mount(data, ROOMY));
    });
    let disk = disk.unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, &hub, &alice, &mut bob, &disk, &mut tally) {
            panic!("{e}\nrerun with BRUME_CONVERGE_SEEDS={seed}");
        }
    }
    eprintln!(
        "{} seeds converged in {:.1} s: {tally:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    // Seeds that never had the member write anything, or never cut the link,
    // would prove little.
    if seeds.len() >= 20 {
        assert!(
            tally.member_writes > 0 && tally.conflict_copies > 0,
            "{tally:?}"
        );
        assert!(tally.cuts > 0 && tally.restarts > 0, "{tally:?}");
        assert!(tally.removals > 0 && tally.full_disks > 0, "{tally:?}");
    }
    bob.unmount(&hub);
    drop(disk);
}
