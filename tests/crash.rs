//! Crash consistency under `kill -9` at random points during writes.
//!
//! A workload child process (this test binary run again as the ignored test
//! `crash::workload`) loops over random file operations inside a group of a real
//! mount and keeps a ledger outside the mount. Before each operation it appends
//! (and fsyncs) a `B` line saying what the operation leaves behind; only after the
//! operation's fsyncs returned does it append (and fsync) an `A` line. The test
//! kills the daemon with SIGKILL at a random moment, kills the workload, remounts
//! the same data dir and checks:
//!
//! * every acknowledged state is there byte for byte (content of files whose
//!   write and fsync returned; names moved by a rename whose directory fsync
//!   returned; removals whose directory fsync returned);
//! * a name only ever written by write-temp + fsync + rename holds one complete
//!   version, never a partial one;
//! * every file reads back exactly as many bytes as its size says;
//! * `PRAGMA integrity_check` is ok, every directory entry leads to a node, every
//!   file with bytes has its backing object, no object or block row is left without
//!   its file, and each group's change log has no holes.
//!
//! `BRUME_CRASH_POINTS` sets the number of kill points (default 100) and
//! `BRUME_CRASH_SEED` the first seed (default: from the clock); kill point `i`
//! uses seed `first + i` for both the workload and the kill delay.
//! `scripts/crash-soak.sh` runs 1,000 points.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Client, wait_until};

const ENV_DIR: &str = "BRUME_CRASH_WORKLOAD_DIR";
const ENV_LEDGER: &str = "BRUME_CRASH_WORKLOAD_LEDGER";
const ENV_SEED: &str = "BRUME_CRASH_WORKLOAD_SEED";

/// Longest wait between the workload's start and the kill.
const MAX_KILL_DELAY_MS: u64 = 250;
/// Files grow past this only by being rewritten.
const MAX_FILE: usize = 1 << 20;

use crate::harness::Rng;

impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// A file size: often empty or small, sometimes several 256 KiB blocks.
    fn size(&mut self) -> usize {
        match self.below(10) {
            0 => 0,
            1..=5 => self.below(4096) as usize + 1,
            _ => self.below(600_000) as usize + 1,
        }
    }
}

/// What a path holds, as the ledger writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Absent,
    Dir,
    File {
        len: u64,
        hash: String,
    },
    /// Changed in place without an acknowledgement: any content, or none.
    Unknown,
}

impl State {
    fn of(data: &[u8]) -> Self {
        State::File {
            len: data.len() as u64,
            hash: blake3::hash(data).to_hex().to_string(),
        }
    }

    fn encode(&self) -> String {
        match self {
            State::Absent => "-".into(),
            State::Dir => "D".into(),
            State::Unknown => "?".into(),
            State::File { len, hash } => format!("F{len}.{hash}"),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        Some(match s {
            "-" => State::Absent,
            "D" => State::Dir,
            "?" => State::Unknown,
            _ => {
                let (len, hash) = s.strip_prefix('F')?.split_once('.')?;
                State::File {
                    len: len.parse().ok()?,
                    hash: hash.to_owned(),
                }
            }
        })
    }
}

/// How an operation changes a path: all at once (rename, unlink, mkdir) or in
/// place, where a crash may leave any mix of old and new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Atomic,
    InPlace,
}

// ---------------------------------------------------------------------------
// The workload child.

/// An in-place change: bytes written at an offset (past the end: an append or a
/// hole), or a new length.
enum Change {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

/// One file as the workload wrote it.
struct Model {
    data: Vec<u8>,
    /// The last change to it was fsynced and acknowledged.
    durable: bool,
}

struct Workload {
    root: PathBuf,
    ledger: File,
    rng: Rng,
    files: BTreeMap<String, Model>,
    dirs: Vec<String>,
    next_op: u64,
}

/// Joins a directory (relative to the iteration dir, "" for itself) and a name.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent_of(p: &str) -> &str {
    p.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

impl Workload {
    fn line(&mut self, text: &str) {
        self.ledger
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| self.ledger.sync_data())
            .expect("ledger write");
    }

    /// Records what an operation will leave behind before it starts.
    fn begin(&mut self, what: &str, entries: &[(&str, Mode, State)]) -> u64 {
        let k = self.next_op;
        self.next_op += 1;
        let mut text = format!("B {k} {what}");
        for (p, mode, state) in entries {
            let m = if *mode == Mode::Atomic { 'a' } else { 'i' };
            text.push_str(&format!(" {p}:{m}:{}", state.encode()));
        }
        self.line(&text);
        k
    }

    fn ack(&mut self, k: u64) {
        self.line(&format!("A {k}"));
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        File::open(self.path(dir))?.sync_all()
    }

    /// After an acknowledged change, the file must read back as the model says
    /// (a mismatch here is a bug without any crash).
    fn verify(&mut self, p: &str) -> io::Result<()> {
        let got = fs::read(self.path(p))?;
        let want = &self.files[p].data;
        if got != *want {
            let msg = format!(
                "X {p} reads back {} bytes ({}) after its fsync, model has {} ({})",
                got.len(),
                blake3::hash(&got).to_hex(),
                want.len(),
                blake3::hash(want).to_hex()
            );
            self.line(&msg);
            return Err(io::Error::other("read-back mismatch"));
        }
        Ok(())
    }

    fn fsync(&mut self, f: &File) -> io::Result<()> {
        if self.rng.chance(30) {
            f.sync_data()
        } else {
            f.sync_all()
        }
    }

    /// Creates or truncates `p` and writes it whole; with `sync`, fsyncs it.
    fn write_new(&mut self, p: &str, sync: bool) -> io::Result<()> {
        let n = self.rng.size();
        let data = self.rng.bytes(n);
        let post = if sync {
            State::of(&data)
        } else {
            State::Unknown
        };
        let k = self.begin("write", &[(p, Mode::InPlace, post)]);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path(p))?;
        // Several writes, as an editor or a copy would do them.
        for chunk in data.chunks(64 * 1024) {
            f.write_all(chunk)?;
        }
        self.files.insert(
            p.to_owned(),
            Model {
                data,
                durable: false,
            },
        );
        if sync {
            self.fsync(&f)?;
            drop(f);
            self.ack(k);
            self.files.get_mut(p).unwrap().durable = true;
            self.verify(p)?;
        }
        Ok(())
    }

    /// Changes an existing file in place (append, overwrite at an offset or
    /// truncate), then fsyncs it.
    fn modify(&mut self, p: &str) -> io::Result<()> {
        let mut data = self.files[p].data.clone();
        let f = OpenOptions::new().write(true).open(self.path(p))?;
        let change = match self.rng.below(3) {
            0 => {
                let n = self.rng.size().max(1);
                let add = self.rng.bytes(n);
                let at = data.len() as u64;
                data.extend_from_slice(&add);
                Change::Write(at, add)
            }
            1 => {
                let off = self.rng.below(data.len() as u64 + 5000) as usize;
                let n = self.rng.below(100_000) as usize + 1;
                let chunk = self.rng.bytes(n);
                if data.len() < off + n {
                    data.resize(off + n, 0);
                }
                data[off..off + n].copy_from_slice(&chunk);
                Change::Write(off as u64, chunk)
            }
            _ => {
                let len = self.rng.below(data.len() as u64 * 2 + 10);
                data.resize(len as usize, 0);
                Change::Truncate(len)
            }
        };
        let k = self.begin("modify", &[(p, Mode::InPlace, State::of(&data))]);
        match change {
            Change::Write(at, bytes) => f.write_all_at(&bytes, at)?,
            Change::Truncate(len) => f.set_len(len)?,
        }
        self.files.insert(
            p.to_owned(),
            Model {
                data,
                durable: false,
            },
        );
        self.fsync(&f)?;
        drop(f);
        self.ack(k);
        self.files.get_mut(p).unwrap().durable = true;
        self.verify(p)
    }

    /// Writes a temp file, fsyncs it, renames it over `p` and fsyncs the directory.
    fn replace(&mut self, p: &str) -> io::Result<()> {
        let tmp = join(parent_of(p), &format!(".tmp{}", self.next_op));
        self.write_new(&tmp, true)?;
        self.rename(&tmp, p)
    }

    /// Renames `from` to `to`; usually fsyncs both directories and acknowledges.
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let m = &self.files[from];
        let post = if m.durable {
            State::of(&m.data)
        } else {
            State::Unknown
        };
        let k = self.begin(
            "rename",
            &[
                (from, Mode::Atomic, State::Absent),
                (to, Mode::Atomic, post),
            ],
        );
        fs::rename(self.path(from), self.path(to))?;
        let m = self.files.remove(from).unwrap();
        self.files.insert(to.to_owned(), m);
        if self.rng.chance(85) {
            self.sync_dir(parent_of(from))?;
            self.sync_dir(parent_of(to))?;
            self.ack(k);
        }
        Ok(())
    }

    fn unlink(&mut self, p: &str) -> io::Result<()> {
        let k = self.begin("unlink", &[(p, Mode::Atomic, State::Absent)]);
        fs::remove_file(self.path(p))?;
        self.files.remove(p);
        if self.rng.chance(85) {
            self.sync_dir(parent_of(p))?;
            self.ack(k);
        }
        Ok(())
    }

    fn mkdir(&mut self) -> io::Result<()> {
        let d = format!("d{}", self.dirs.len() - 1);
        let k = self.begin("mkdir", &[(&d, Mode::Atomic, State::Dir)]);
        fs::create_dir(self.path(&d))?;
        self.dirs.push(d);
        self.sync_dir("")?;
        self.ack(k);
        Ok(())
    }

    fn pick(&mut self, prefix: &str, names: u64) -> String {
        let dir = self.dirs[self.rng.below(self.dirs.len() as u64) as usize].clone();
        join(&dir, &format!("{prefix}{}", self.rng.below(names)))
    }

    /// One random operation. Names `f*` see every kind of change; names `a*` are
    /// only ever replaced whole (temp + fsync + rename), renamed among themselves
    /// or removed, so they must never hold a partial version.
    fn step(&mut self) -> io::Result<()> {
        let roll = self.rng.below(100);
        if roll < 3 && self.dirs.len() < 3 {
            return self.mkdir();
        }
        if roll < 60 {
            let p = self.pick("f", 6);
            let Some(m) = self.files.get(&p) else {
                let sync = self.rng.chance(85);
                return self.write_new(&p, sync);
            };
            let big = m.data.len() > MAX_FILE;
            return match self.rng.below(100) {
                _ if big => self.write_new(&p, true),
                0..=19 => {
                    let sync = self.rng.chance(80);
                    self.write_new(&p, sync)
                }
                20..=79 => self.modify(&p),
                80..=89 => {
                    let q = self.pick("f", 6);
                    if q == p {
                        return Ok(());
                    }
                    self.rename(&p, &q)
                }
                _ => self.unlink(&p),
            };
        }
        let p = self.pick("a", 4);
        if !self.files.contains_key(&p) || self.rng.chance(80) {
            return self.replace(&p);
        }
        if self.rng.chance(50) {
            let q = self.pick("a", 4);
            if q == p {
                return Ok(());
            }
            return self.rename(&p, &q);
        }
        self.unlink(&p)
    }
}

/// The workload child. Not a test on its own: the crash test runs it with the
/// environment that says where to work.
#[test]
#[ignore = "child process of kill9_at_random_points_keeps_every_acknowledged_version"]
fn workload() {
    let (Some(dir), Some(ledger), Some(seed)) = (
        std::env::var_os(ENV_DIR),
        std::env::var_os(ENV_LEDGER),
        std::env::var(ENV_SEED).ok().and_then(|s| s.parse().ok()),
    ) else {
        panic!(
            "crash::workload runs only as the child of the crash test ({ENV_DIR}, {ENV_LEDGER} and {ENV_SEED} unset)"
        );
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let ledger = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)
        .expect("open ledger");
    let mut w = Workload {
        root: PathBuf::from(dir),
        ledger,
        rng: Rng(seed),
        files: BTreeMap::new(),
        dirs: vec![String::new()],
        next_op: 0,
    };
    w.line("S");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Runs until killed; the first error means the daemon is gone.
    while Instant::now() < deadline {
        if w.step().is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// The test.

/// What the ledger allows each path to hold after a crash.
#[derive(Default)]
struct Expect {
    /// Every state the path may be found in.
    allowed: BTreeMap<String, Vec<State>>,
    /// Ledger lines that touched each path, for failure reports.
    history: HashMap<String, Vec<String>>,
    begun: u64,
    acked: u64,
    /// Read-back mismatches the workload saw before any crash.
    mismatches: Vec<String>,
}

fn replay(ledger: &str) -> Result<Expect, String> {
    let mut e = Expect::default();
    let mut ops: HashMap<u64, Vec<(String, State)>> = HashMap::new();
    // Until a rename is acknowledged, its old name may still name the inode:
    // for each path, the other names its inode may be found under.
    let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
    // A line cut short by the kill has no newline: ignore it.
    let complete = match ledger.rfind('\n') {
        Some(i) => &ledger[..=i],
        None => "",
    };
    for line in complete.lines() {
        let mut words = line.split(' ');
        match words.next() {
            Some("S") => {}
            Some("B") => {
                let k: u64 = words
                    .next()
                    .and_then(|k| k.parse().ok())
                    .ok_or(format!("bad ledger line {line:?}"))?;
                let what = words.next().ok_or(format!("bad ledger line {line:?}"))?;
                let mut entries = Vec::new();
                for w in words {
                    let mut parts = w.splitn(3, ':');
                    let (Some(p), Some(m), Some(s)) = (parts.next(), parts.next(), parts.next())
                    else {
                        return Err(format!("bad ledger entry {w:?}"));
                    };
                    let state = State::decode(s).ok_or(format!("bad state {s:?}"))?;
                    let allowed = e
                        .allowed
                        .entry(p.to_owned())
                        .or_insert_with(|| vec![State::Absent]);
                    if m == "i" && !allowed.contains(&State::Unknown) {
                        allowed.push(State::Unknown);
                    }
                    if !allowed.contains(&state) {
                        allowed.push(state.clone());
                    }
                    if m == "i" {
                        // The change lands in the inode, whichever name a crash
                        // leaves it under.
                        for other in aliases.get(p).into_iter().flatten() {
                            let allowed = e.allowed.entry(other.clone()).or_default();
                            if !allowed.contains(&State::Unknown) {
                                allowed.push(State::Unknown);
                            }
                        }
                    }
                    e.history
                        .entry(p.to_owned())
                        .or_default()
                        .push(line.to_owned());
                    entries.push((p.to_owned(), state));
                }
                if let ("rename", [(from, _), (to, _)]) = (what, &entries[..]) {
                    let mut names = aliases.remove(from).unwrap_or_default();
                    names.push(from.clone());
                    aliases.insert(to.clone(), names);
                }
                ops.insert(k, entries);
                e.begun += 1;
            }
            Some("A") => {
                let k: u64 = words
                    .next()
                    .and_then(|k| k.parse().ok())
                    .ok_or(format!("bad ledger line {line:?}"))?;
                let entries = ops.get(&k).ok_or(format!("ack of unknown op {k}"))?;
                if let [_, (to, _)] = &entries[..] {
                    aliases.remove(to);
                }
                for (p, state) in entries {
                    e.allowed.insert(p.clone(), vec![state.clone()]);
                    e.history
                        .entry(p.clone())
                        .or_default()
                        .push(line.to_owned());
                }
                e.acked += 1;
            }
            Some("X") => e.mismatches.push(line.to_owned()),
            _ => return Err(format!("bad ledger line {line:?}")),
        }
    }
    Ok(e)
}

/// What `p` holds through the mount. A file must read back exactly its size.
fn observe(p: &Path) -> Result<State, String> {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::Absent),
        Err(e) => return Err(format!("stat {}: {e}", p.display())),
    };
    if meta.is_dir() {
        return Ok(State::Dir);
    }
    if !meta.is_file() {
        return Err(format!("{} is neither file nor directory", p.display()));
    }
    let data = fs::read(p).map_err(|e| format!("read {}: {e}", p.display()))?;
    if data.len() as u64 != meta.len() {
        return Err(format!(
            "{} has size {} but reads back {} bytes",
            p.display(),
            meta.len(),
            data.len()
        ));
    }
    Ok(State::of(&data))
}

/// Every path under `root`, relative to it, sorted.
pub(crate) fn walk(root: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = fs::read_dir(&dir).map_err(|e| format!("list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("list {}: {e}", dir.display()))?;
            let name = join(&rel, &entry.file_name().to_string_lossy());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(name.clone());
            }
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Checks the remounted iteration dir against the ledger; returns what it holds.
fn check_tree(root: &Path, e: &Expect) -> Result<BTreeMap<String, State>, String> {
    if let Some(m) = e.mismatches.first() {
        return Err(format!("the workload read back wrong data: {m}"));
    }
    let mut seen = BTreeMap::new();
    for (p, allowed) in &e.allowed {
        let history = || e.history.get(p).cloned().unwrap_or_default().join("\n  ");
        let got = observe(&root.join(p))
            .map_err(|err| format!("{err}\nledger lines for {p}:\n  {}", history()))?;
        if !allowed.contains(&State::Unknown) && !allowed.contains(&got) {
            return Err(format!(
                "{p}: found {got:?}, allowed {allowed:?}\nledger lines for it:\n  {}",
                history()
            ));
        }
        seen.insert(p.clone(), got);
    }
    for p in walk(root)? {
        if !e.allowed.contains_key(&p) {
            return Err(format!("{p}: present, but the workload never made it"));
        }
    }
    Ok(seen)
}

/// Checks that an earlier iteration's dir still holds what it held.
fn check_settled(root: &Path, settled: &BTreeMap<String, State>) -> Result<(), String> {
    for (p, want) in settled {
        let got = observe(&root.join(p))?;
        if got != *want {
            return Err(format!(
                "{}: was {want:?}, now {got:?}",
                root.join(p).display()
            ));
        }
    }
    Ok(())
}

/// The catalog is sound and agrees with the object store.
fn check_catalog(c: &Client) -> Result<(), String> {
    let db = c.db();
    let sql = |e: rusqlite::Error| format!("catalog query: {e}");
    // One read transaction: one consistent view even if the daemon writes.
    db.execute_batch("BEGIN").map_err(sql)?;
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql)?;
    if ok != "ok" {
        return Err(format!("integrity_check: {ok}"));
    }
    let list = |q: &str| -> Result<Vec<String>, String> {
        let mut stmt = db.prepare(q).map_err(sql)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(rows)
    };
    let problems = [
        (
            "directory entries without their node",
            "SELECT d.parent || '/' || CAST(d.name AS TEXT) || ' -> ' || d.ino FROM dirents d \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = d.ino)",
        ),
        (
            "directory entries in something that is not a directory",
            "SELECT d.parent || '/' || CAST(d.name AS TEXT) FROM dirents d \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = d.parent AND n.kind = 2)",
        ),
        (
            "nodes no entry reaches",
            "SELECT n.ino FROM nodes n WHERE n.ino != 1 \
             AND NOT EXISTS (SELECT 1 FROM dirents d WHERE d.ino = n.ino)",
        ),
        (
            "files whose link count is not their number of entries",
            "SELECT n.ino || ' nlink ' || n.nlink FROM nodes n WHERE n.kind = 1 \
             AND n.nlink != (SELECT COUNT(*) FROM dirents d WHERE d.ino = n.ino)",
        ),
        (
            "block rows of no file",
            "SELECT DISTINCT b.ino FROM blocks b \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = b.ino AND n.kind = 1)",
        ),
        (
            "change logs with holes",
            "SELECT group_id || ': ' || COUNT(*) || ' entries in ' || MIN(seq) || '..' || MAX(seq) \
             FROM changes GROUP BY group_id HAVING COUNT(*) != MAX(seq) - MIN(seq) + 1",
        ),
        (
            "nodes whose version is past their group's log",
            "SELECT n.ino || ' v' || n.version FROM nodes n JOIN groups g ON g.id = n.group_id \
             WHERE g.owned AND n.version > (SELECT COALESCE(MAX(seq), 0) FROM changes c \
             WHERE c.group_id = g.id)",
        ),
    ];
    for (what, q) in problems {
        let rows = list(q)?;
        if !rows.is_empty() {
            return Err(format!("{what}: {rows:?}"));
        }
    }
    let mut stmt = db
        .prepare(
            "SELECT ino, CASE WHEN remote_id IS NULL OR local_edit THEN size ELSE 0 END \
                  FROM nodes WHERE kind = 1",
        )
        .map_err(sql)?;
    let files: HashMap<u64, u64> = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    let objects = c.data.join("objects");
    let mut present = HashSet::new();
    for dir in fs::read_dir(&objects).map_err(|e| format!("list objects: {e}"))? {
        let dir = dir.map_err(|e| e.to_string())?.path();
        for f in fs::read_dir(&dir).map_err(|e| format!("list {}: {e}", dir.display()))? {
            let f = f.map_err(|e| e.to_string())?;
            let name = f.file_name().to_string_lossy().into_owned();
            let ino: u64 = name
                .parse()
                .map_err(|_| format!("stray object {}", f.path().display()))?;
            if !files.contains_key(&ino) {
                return Err(format!("object {ino} has no file node (left by the crash)"));
            }
            present.insert(ino);
        }
    }
    // A file with bytes must have its object; an empty one may have none (it is
    // recreated empty when opened), nor may a member's unedited mirror (its
    // bytes are in the block cache; counted as size 0 above).
    for (ino, size) in &files {
        if *size > 0 && !present.contains(ino) {
            return Err(format!(
                "file node {ino} of size {size} has no backing object {}",
                objects.join(format!("{:02x}/{ino}", ino & 0xff)).display()
            ));
        }
    }
    db.execute_batch("COMMIT").map_err(sql)?;
    Ok(())
}

/// The workload child, killed and reaped when dropped.
struct WorkloadChild(Child);

impl WorkloadChild {
    fn spawn(dir: &Path, ledger: &Path, seed: u64, stderr: &Path) -> Self {
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args([
                "crash::workload",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_DIR, dir)
            .env(ENV_LEDGER, ledger)
            .env(ENV_SEED, seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(stderr).expect("workload stderr"))
            .spawn()
            .expect("spawn workload");
        Self(child)
    }

    fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for WorkloadChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Says which kill point failed when the test panics.
struct Point {
    first: u64,
    points: u64,
    i: u64,
}

impl Drop for Point {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "crash: FAILED at kill point {} (seed {}); rerun with BRUME_CRASH_SEED={} BRUME_CRASH_POINTS={}",
                self.i,
                self.first + self.i,
                self.first,
                self.points
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[test]
fn kill9_at_random_points_keeps_every_acknowledged_version() {
    let points = env_u64("BRUME_CRASH_POINTS").unwrap_or(100);
    let first = env_u64("BRUME_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
            % 1_000_000_000
    });
    eprintln!(
        "crash: {points} kill points, seeds {first}..={}",
        first + points.saturating_sub(1)
    );
    assert!(points > 0, "BRUME_CRASH_POINTS must be at least 1");
    let started = Instant::now();
    let (mut c, g) = Client::with_group(true);
    let mut settled: Vec<(PathBuf, BTreeMap<String, State>)> = Vec::new();
    let (mut begun, mut acked, mut with_ack) = (0u64, 0u64, 0u64);
    for i in 0..points {
        let point = Point { first, points, i };
        let seed = first + i;
        let fail = |msg: String| -> ! {
            panic!("kill point {i} (seed {seed}): {msg}");
        };
        let dir = g.join(format!("it{i}"));
        fs::create_dir(&dir).unwrap();
        File::open(&g).unwrap().sync_all().unwrap();
        let ledger = c.dir.path().join(format!("ledger-{i}"));
        let stderr = c.dir.path().join(format!("workload-{i}.err"));
        let mut child = WorkloadChild::spawn(&dir, &ledger, seed, &stderr);
        wait_until(Duration::from_secs(30), "the workload to start", || {
            fs::metadata(&ledger).is_ok_and(|m| m.len() > 0) || child.exited()
        });
        // The kill point itself: a random moment into the workload.
        let delay = Rng(seed ^ 0x6b69_6c6c).below(MAX_KILL_DELAY_MS + 1);
        std::thread::sleep(Duration::from_millis(delay));
        if child.exited() {
            fail(format!(
                "the workload stopped before the kill: {}",
                fs::read_to_string(&stderr).unwrap_or_default()
            ));
        }
        c.kill9();
        drop(child);
        // Alternate between kernel passthrough and writes through the daemon.
        c.passthrough = i % 2 == 1;
        c.mount();
        let text = fs::read_to_string(&ledger).unwrap();
        let expect = replay(&text).unwrap_or_else(|e| fail(e));
        let seen = check_tree(&dir, &expect).unwrap_or_else(|e| fail(e));
        check_catalog(&c).unwrap_or_else(|e| fail(e));
        if let Some((root, s)) = settled.last() {
            check_settled(root, s).unwrap_or_else(|e| fail(e));
        }
        begun += expect.begun;
        acked += expect.acked;
        with_ack += u64::from(expect.acked > 0);
        settled.push((dir, seen));
        drop(point);
    }
    // After a clean unmount and mount, every iteration still holds what it held.
    let last = first + points - 1;
    let fail = |e: String| -> ! { panic!("after the final remount (seeds {first}..={last}): {e}") };
    c.remount();
    for (root, s) in &settled {
        check_settled(root, s).unwrap_or_else(|e| fail(e));
    }
    check_catalog(&c).unwrap_or_else(|e| fail(e));
    eprintln!(
        "crash: {points} kill points passed in {:.0?}: {begun} operations begun, {acked} acknowledged, \
         {with_ack} points with at least one acknowledgement (seeds {first}..={last})",
        started.elapsed(),
    );
    assert!(acked > 0, "the workload never got an fsync acknowledged");
}

/// A file replaced by a rename or removed, with the daemon killed right after the
/// call returns (inside the catalog's group-commit window): the name must hold
/// the old bytes or the new ones, or be gone, and the catalog must still match
/// the object store.
#[test]
fn kill9_right_after_rename_over_or_unlink_keeps_the_name_whole() {
    let (mut c, g) = Client::with_group(true);
    let old = b"old version, fsynced\n".repeat(500);
    let new = b"new version, fsynced\n".repeat(700);
    for round in 0..10 {
        let (target, gone) = (g.join(format!("t{round}")), g.join(format!("u{round}")));
        for p in [&target, &gone] {
            let mut f = File::create(p).unwrap();
            f.write_all(&old).unwrap();
            f.sync_all().unwrap();
        }
        let tmp = g.join(format!(".t{round}.tmp"));
        let mut f = File::create(&tmp).unwrap();
        f.write_all(&new).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::rename(&tmp, &target).unwrap();
        fs::remove_file(&gone).unwrap();
        c.kill9();
        c.mount();
        let t = fs::read(&target).unwrap();
        assert!(
            t == old || t == new,
            "round {round}: {} holds {} bytes, neither version",
            target.display(),
            t.len()
        );
        if let Ok(u) = fs::read(&gone) {
            assert_eq!(u, old, "round {round}: {} is torn", gone.display());
        }
        check_catalog(&c).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// A file truncated (by an `O_TRUNC` open) or appended to without fsync, with the
/// daemon killed right after: once remounted its size must match the bytes it
/// reads back, with or without kernel passthrough.
#[test]
fn kill9_right_after_truncate_or_append_keeps_size_and_bytes_in_step() {
    let (mut c, g) = Client::with_group(true);
    let body = b"fsynced bytes\n".repeat(1000);
    for round in 0..6 {
        let (cut, grown) = (
            g.join(format!("cut{round}")),
            g.join(format!("grown{round}")),
        );
        for p in [&cut, &grown] {
            let mut f = File::create(p).unwrap();
            f.write_all(&body).unwrap();
            f.sync_all().unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&grown).unwrap();
        f.write_all(b"appended, never fsynced\n").unwrap();
        let held = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&cut)
            .unwrap();
        c.kill9();
        drop((f, held));
        c.passthrough = round % 2 == 1;
        c.mount();
        for p in [&cut, &grown] {
            let size = fs::metadata(p).unwrap().len();
            let data = fs::read(p).unwrap();
            assert_eq!(
                data.len() as u64,
                size,
                "round {round}: {} says {size} bytes, reads {}",
                p.display(),
                data.len()
            );
            assert!(body.starts_with(&data) || data.starts_with(&body));
        }
        check_catalog(&c).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}
