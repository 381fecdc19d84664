//! Network faults with real processes: a real `brume server` and two real
//! `brume mount -f` daemons (alice owns `alice/g`, shared with bob, who joins with
//! `mkdir -p`), each in a network namespace of its own. The namespaces hang off a
//! bridge in a third one, where the server listens, so every packet stays inside
//! namespaces the test made and deletes again (even on panic): nothing is sent to the
//! machine's own interfaces or beyond.
//!
//! * The link to bob is cut mid-transfer (the bridge's port to bob goes down), held cut, restored:
//!   the transfer resumes, the bytes match, and little is sent twice.
//! * The daemons run with skewed wall clocks (libfaketime): tokens, ordering,
//!   versions and conflict copies are unaffected.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::{Client, brume_bin, in_netns, wait_until};

/// The hub's bridge address, where the server listens; the users get .2, .3, …
/// The subnet exists only inside the namespaces below.
const SUBNET: &str = "10.231.0";

/// Runs a command, panicking with its output if it cannot run or fails.
fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` ({e}): these tests need root and iproute2 (ip, tc)")
        });
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Network namespaces for a hub and some users, deleted on drop.
///
/// The hub holds a bridge `br0` with `SUBNET.1`; each user's namespace holds `eth0`
/// with `SUBNET.(2+i)`, the far end of a veth pair whose near end `v-USER` is a port
/// of the bridge. IPv6 is off everywhere so the links carry IPv4 host candidates
/// only. The veths are created directly inside the namespaces, never in this one.
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    fn new(users: &[&str]) -> Self {
        // Unique per test, as tests of this process may run side by side.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut net = Self {
            prefix: format!("brume-t-{}-{n}", std::process::id()),
            made: Vec::new(),
        };
        for who in std::iter::once("hub").chain(users.iter().copied()) {
            let ns = net.ns(who);
            // A namespace left over from a killed run with this very name.
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            run("ip", &["netns", "add", &ns]);
            net.made.push(ns.clone());
            net.exec(
                who,
                "sh",
                &[
                    "-c",
                    "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
                     echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
                ],
            );
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        let hub = net.ns("hub");
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{SUBNET}.1/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        for (i, who) in users.iter().enumerate() {
            let ns = net.ns(who);
            let port = format!("v-{who}");
            run(
                "ip",
                &[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            );
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0"]);
            run("ip", &["-n", &hub, "link", "set", &port, "up"]);
            let addr = format!("{SUBNET}.{}/24", i + 2);
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// The name of `who`'s namespace.
    fn ns(&self, who: &str) -> String {
        format!("{}-{who}", self.prefix)
    }

    /// Runs `program` inside `who`'s namespace.
    fn exec(&self, who: &str, program: &str, args: &[&str]) -> Output {
        let ns = self.ns(who);
        let mut all = vec!["netns", "exec", ns.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Sets the root qdisc of `dev` in `who`'s namespace (`tbf …`), or removes it.
    fn qdisc(&self, who: &str, dev: &str, qdisc: Option<&[&str]>) {
        match qdisc {
            Some(args) => {
                let mut all = vec!["qdisc", "replace", "dev", dev, "root"];
                all.extend_from_slice(args);
                self.exec(who, "tc", &all);
            }
            None => {
                self.exec(who, "tc", &["qdisc", "del", "dev", dev, "root"]);
            }
        }
    }

    /// Takes `dev` in `who`'s namespace down (nothing crosses it) or up again.
    fn link(&self, who: &str, dev: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        run("ip", &["-n", &self.ns(who), "link", "set", dev, state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veths and bridge with it.
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A real `brume server` process, killed on drop.
struct Server {
    child: Child,
    url: String,
    db: PathBuf,
}

impl Server {
    /// Starts `brume server` inside `ns`, listening on the hub's bridge address.
    fn start(ns: &str, db: &Path) -> Self {
        use std::io::BufRead;
        let mut cmd = Command::new(brume_bin());
        cmd.args(["server", "--listen", &format!("{SUBNET}.1:0"), "--db"])
            .arg(db)
            // Plain on a namespace's private address on purpose: not its warning
            // that tokens cross the network in the clear.
            .env("RUST_LOG", "warn,brume::signal::cli=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        in_netns(&mut cmd, ns);
        let mut child = cmd.spawn().expect("spawn brume server");
        let mut line = String::new();
        let read = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let url = line
            .trim()
            .strip_prefix("brume server listening on ")
            .map(str::to_owned);
        let mut server = Self {
            child,
            url: String::new(),
            db: db.to_owned(),
        };
        match (read, url) {
            (Ok(_), Some(url)) => server.url = url,
            (r, _) => panic!("brume server did not start: {r:?}, first line {line:?}"),
        }
        server
    }

    /// A client for a new account `user`, its daemon to run in namespace `ns`.
    fn client(&self, user: &str, ns: String, env: Vec<(String, String)>) -> Client {
        let out = Command::new(brume_bin())
            .args(["server", "add-user", user, "--db"])
            .arg(&self.db)
            .args(["--url", &self.url])
            .output()
            .expect("brume server add-user");
        assert!(out.status.success(), "add-user {user}: {out:?}");
        let mut c = Client::new(user);
        std::fs::write(&c.config, &out.stdout).unwrap();
        c.netns = Some(ns);
        c.env = env;
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server, alice and bob, each in a namespace; alice owns `alice/g`, shared with
/// bob, who has joined it. Fields drop in order: mounts, then server, then network.
struct World {
    alice: Client,
    bob: Client,
    _server: Server,
    net: Net,
    _dir: tempfile::TempDir,
}

impl World {
    fn new(alice_env: Vec<(String, String)>, bob_env: Vec<(String, String)>) -> Self {
        let net = Net::new(&["alice", "bob"]);
        let dir = tempfile::Builder::new()
            .prefix("brume-test-net-")
            .tempdir()
            .unwrap();
        let server = Server::start(&net.ns("hub"), &dir.path().join("server.db"));
        let mut alice = server.client("alice", net.ns("alice"), alice_env);
        let mut bob = server.client("bob", net.ns("bob"), bob_env);
        alice.mount();
        bob.mount();
        let world = Self {
            alice,
            bob,
            _server: server,
            net,
            _dir: dir,
        };
        std::fs::create_dir(world.a("")).unwrap();
        std::fs::write(world.a(".members"), "bob\n").unwrap();
        std::fs::create_dir_all(world.b("")).unwrap();
        wait_until(Duration::from_secs(60), "bob to join alice/g", || {
            std::fs::read(world.b(".members")).is_ok_and(|d| d == b"bob\n")
        });
        world
    }

    /// A path in alice's group, as alice sees it.
    fn a(&self, rel: &str) -> PathBuf {
        self.alice.mnt.join("alice/g").join(rel)
    }

    /// The same path in bob's copy.
    fn b(&self, rel: &str) -> PathBuf {
        self.bob.mnt.join("alice/g").join(rel)
    }
}

/// `brume status --json` of a client.
fn status(c: &Client) -> serde_json::Value {
    let out = c.brume(&["status", "--json"]);
    assert!(out.status.success(), "brume status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// A per-peer byte counter (`bytes_sent`, `bytes_received`) of `c`'s link to
/// `peer`, once it has settled: the same in two status files the daemon wrote at
/// different times (it rewrites them every second).
fn settled_counter(c: &Client, peer: &str, field: &str) -> u64 {
    let mut last: Option<(u64, u64)> = None;
    let mut value = 0;
    wait_until(
        Duration::from_secs(30),
        &format!("{}'s {field} for {peer} to settle", c.user),
        || {
            let s = status(c);
            let Some(live) = s.get("live").filter(|l| !l.is_null()) else {
                return false;
            };
            let at = live["updated_unix"].as_u64().unwrap_or(0);
            let v = live["peers"][peer][field].as_u64().unwrap_or(0);
            let done = matches!(last, Some((t, prev)) if t != at && prev == v);
            if last.is_none_or(|(t, _)| t != at) {
                last = Some((at, v));
            }
            value = v;
            done
        },
    );
    value
}

/// The `user.brume.cached` availability of a mirrored file: (blocks here, blocks).
fn cached(p: &Path) -> Option<(u64, u64)> {
    let text = crate::sync::cached_xattr(p)?;
    let (k, n) = text.split_once('/')?;
    Some((k.parse().ok()?, n.parse().ok()?))
}

/// `len` pseudo-random bytes (BLAKE3's output stream of `seed`).
fn random_bytes(seed: &[u8], len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(seed);
    hasher.finalize_xof().fill(&mut data);
    data
}

/// alice writes a 64 MiB file; while bob's copy is part-way, his link is cut (all
/// packets lost both ways) for `cut_for`, then restored. The transfer must resume
/// and finish with the right bytes, sending at most about one block per request
/// that was in flight beyond the file's size.
fn cut_mid_transfer(cut_for: Duration, new_link: bool) {
    const SIZE: usize = 64 << 20;
    // This kernel may lack netem: a token bucket slows the link, and the cut takes
    // the bridge's port to bob down (his `eth0` loses its carrier, as if unplugged).
    const RATE: &[&str] = &[
        "tbf", "rate", "100mbit", "burst", "128kb", "latency", "100ms",
    ];
    let w = World::new(Vec::new(), Vec::new());
    // What reaches bob is slowed to 100 Mbit/s so the transfer lasts seconds.
    w.net.qdisc("hub", "v-bob", Some(RATE));
    let sent_before = settled_counter(&w.alice, "bob", "bytes_sent");
    let received_before = settled_counter(&w.bob, "alice", "bytes_received");
    let connects_before = status(&w.bob)["live"]["peers"]["alice"]["connects"]
        .as_u64()
        .unwrap_or(0);

    let data = random_bytes(b"netfault cut", SIZE);
    let want = blake3::hash(&data);
    std::fs::write(w.a("big.bin"), &data).unwrap();
    drop(data);
    let started = Instant::now();
    let copy = w.b("big.bin");
    let blocks = SIZE as u64 / brume::blocks::BLOCK_SIZE;

    // Cut once bob has some but not all of it.
    let mut at_cut = (0, 0);
    wait_until(
        Duration::from_secs(60),
        "bob to hold part of big.bin",
        || {
            at_cut = cached(&copy).unwrap_or((0, 0));
            at_cut.1 == blocks && at_cut.0 >= blocks / 4
        },
    );
    assert!(
        at_cut.0 < blocks,
        "the transfer finished before the link could be cut ({:?})",
        started.elapsed()
    );
    let cut = Instant::now();
    w.net.link("hub", "v-bob", false);
    // Progress stops: no new block for a whole second.
    let mut seen = (at_cut.0, Instant::now());
    wait_until(
        Duration::from_secs(15),
        "progress to stop while cut",
        || {
            let k = cached(&copy).map_or(0, |c| c.0);
            if k != seen.0 {
                seen = (k, Instant::now());
            }
            seen.1.elapsed() >= Duration::from_secs(1)
        },
    );
    let stalled_at = seen.0;
    assert!(stalled_at < blocks, "bob got everything through a cut link");
    // The fault's own length: keep the link cut for the rest of `cut_for`.
    if let Some(rest) = cut_for.checked_sub(cut.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(
        cached(&copy).map(|c| c.0),
        Some(stalled_at),
        "blocks arrived through a cut link"
    );
    let held = cut.elapsed();
    w.net.link("hub", "v-bob", true);
    let restored = Instant::now();

    wait_until(Duration::from_secs(90), "the transfer to resume", || {
        cached(&copy).is_some_and(|c| c.0 > stalled_at)
    });
    let resumed = restored.elapsed();
    wait_until(Duration::from_secs(180), "the transfer to complete", || {
        cached(&copy) == Some((blocks, blocks))
    });
    let completed = restored.elapsed();
    let got = blake3::hash(&std::fs::read(&copy).unwrap());
    assert_eq!(got, want, "bob's copy differs from alice's file");

    let sent = settled_counter(&w.alice, "bob", "bytes_sent") - sent_before;
    let received = settled_counter(&w.bob, "alice", "bytes_received") - received_before;
    let connects = status(&w.bob)["live"]["peers"]["alice"]["connects"]
        .as_u64()
        .unwrap_or(0);
    let in_flight = brume::sync::engine::EngineConfig::default().fill_parallelism as u64;
    let block = brume::blocks::BLOCK_SIZE;
    // Framing and message headers: well under 1 KiB per 256 KiB block.
    let overhead = blocks * 1024 + (64 << 10);
    let size = SIZE as u64;
    println!(
        "netfault: {size} bytes ({blocks} blocks); cut at {}/{blocks} after {:.1?}, \
         stalled at {stalled_at}, held cut {held:.1?}; resumed {resumed:.1?} and completed \
         {completed:.1?} after restoring; links to alice {connects_before} -> {connects}",
        at_cut.0,
        cut.duration_since(started),
    );
    let beyond = |n: u64| {
        let extra = n as i64 - size as i64;
        format!(
            "{extra} beyond the file ({:.2} blocks)",
            extra as f64 / block as f64
        )
    };
    println!(
        "netfault: alice sent {sent} bytes, {}; bob received {received}, {}; \
         bound: {in_flight} requests in flight x {block} + {overhead} framing",
        beyond(sent),
        beyond(received),
    );
    assert!(
        received >= size,
        "bob received less than the file: {received}"
    );
    if new_link {
        assert!(
            connects > connects_before,
            "the link to alice was never set up again ({connects} connects)"
        );
    } else {
        assert_eq!(
            connects, connects_before,
            "a short cut should not cost the link"
        );
    }
    let bound = size + in_flight * block + overhead;
    assert!(
        received <= bound && sent <= bound,
        "too much sent again: alice sent {sent}, bob received {received}, for {size} bytes \
         (at most {bound})"
    );
}

/// A cut shorter than ICE's failure timeout (6 s): the same link carries on.
#[test]
fn a_short_cut_mid_transfer_resumes_without_sending_it_again() {
    cut_mid_transfer(Duration::from_secs(3), false);
}

/// A cut longer than ICE's failure timeout: the link dies and a new one is set up
/// through the signaling server once the network is back.
#[test]
fn a_long_cut_mid_transfer_resumes_on_a_new_link() {
    cut_mid_transfer(Duration::from_secs(10), true);
}

/// The libfaketime library `faketime` installs (Debian: the `faketime` package).
fn libfaketime() -> PathBuf {
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("faketime/libfaketimeMT.so.1"))
    .find(|p| p.exists());
    found.expect("libfaketime is missing: `apt-get install faketime` (tests/run.sh does)")
}

/// Environment that runs a daemon with its wall clock moved by `offset` (libfaketime
/// syntax: `+3d`, `-2y`). Its monotonic clock, which timers use, stays true.
fn skewed(offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Days from now to `t` (negative: in the past).
fn days_from_now(t: SystemTime) -> f64 {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64() / 86400.0,
        Err(e) => -e.duration().as_secs_f64() / 86400.0,
    }
}

/// Waits until `path` reads `want`.
fn read_when(path: &Path, want: &[u8]) {
    wait_until(
        Duration::from_secs(30),
        &format!(
            "{} to read {:?}",
            path.display(),
            String::from_utf8_lossy(want)
        ),
        || std::fs::read(path).is_ok_and(|d| d == want),
    );
}

/// Names under `dir`, relative to it, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// alice's change log of `alice/g`: (seq, op, ino, at_ns), in log order.
fn owner_log(alice: &Client) -> Vec<(i64, String, i64, i64)> {
    let db = alice.db();
    let mut st = db
        .prepare(
            "SELECT c.seq, c.op, c.ino, c.at_ns FROM changes c JOIN groups g ON g.id = c.group_id
             WHERE g.owner = 'alice' AND g.name = 'g' AND g.owned = 1 ORDER BY c.seq",
        )
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Versions of `alice/g`'s regular files: owner's inode -> version, as alice has
/// them (`owner` true) or as bob holds them (`remote_version` by `remote_id`).
fn file_versions(c: &Client, owner: bool) -> std::collections::BTreeMap<i64, i64> {
    let sql = if owner {
        "SELECT n.ino, n.version FROM nodes n JOIN groups g ON g.id = n.group_id
         WHERE g.owner = 'alice' AND g.name = 'g' AND g.owned = 1 AND n.kind = ?1"
    } else {
        "SELECT n.remote_id, n.remote_version FROM nodes n JOIN groups g ON g.id = n.group_id
         WHERE g.owner = 'alice' AND g.name = 'g' AND g.owned = 0 AND n.kind = ?1
           AND n.remote_id IS NOT NULL"
    };
    let db = c.db();
    let mut st = db.prepare(sql).unwrap();
    st.query_map([brume::catalog::NodeKind::File as i64], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// alice's clock runs two years slow and bob's three days fast (libfaketime).
/// Tokens are minted and checked by the server alone, so both connect; versions are
/// log positions, not times, so owner changes arrive in order, a member edit meets
/// an owner change in exactly the conflict copy SPEC §3 names, and every version
/// and log position is what it would be with true clocks.
#[test]
fn skewed_clocks_change_no_order_version_or_conflict() {
    let mut w = World::new(skewed("-2y"), skewed("+3d"));

    // The skew is real: each daemon stamps what it creates with its own clock
    // (directories: a file's data writes may go straight to the kernel, which
    // stamps them with the true time).
    std::fs::create_dir(w.a("probe")).unwrap();
    let mtime = |p: PathBuf| days_from_now(std::fs::metadata(p).unwrap().modified().unwrap());
    let alice_days = mtime(w.a("probe"));
    std::fs::create_dir(w.bob.mnt.join("bob/mine")).unwrap();
    let bob_days = mtime(w.bob.mnt.join("bob/mine"));
    println!("netfault: alice's clock {alice_days:+.2} days, bob's {bob_days:+.2} days");
    assert!(
        (-735.0..-725.0).contains(&alice_days),
        "alice's clock is not 2 years slow"
    );
    assert!(
        (2.9..3.1).contains(&bob_days),
        "bob's clock is not 3 days fast"
    );

    // Order: 40 versions of one file, while bob keeps reading his copy; what he
    // sees never goes back, and ends at the last.
    std::fs::write(w.a("first.txt"), "1").unwrap();
    read_when(&w.b("first.txt"), b"1");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let reader = {
        let (path, stop, seen) = (w.b("counter.txt"), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            // Failed reads (other than not there yet) and the slowest read.
            let (mut errors, mut slowest) = (Vec::new(), Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let r = std::fs::read_to_string(&path);
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(text) => {
                        if let Ok(n) = text.trim().parse() {
                            let mut seen = seen.lock().unwrap();
                            if seen.last() != Some(&n) {
                                seen.push(n);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (errors, slowest)
        })
    };
    // Bursts of rewrites, each ended by a checkpoint that waits for bob to read
    // its last version: however loaded the machine, bob reads at least those
    // five versions, so an order that goes back would show.
    for i in 1..=40 {
        std::fs::write(w.a("counter.txt"), format!("{i}\n")).unwrap();
        if i % 8 == 0 {
            wait_until(
                Duration::from_secs(30),
                &format!("bob to read version {i}"),
                || seen.lock().unwrap().last() == Some(&i),
            );
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (errors, slowest) = reader.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    println!("netfault: bob saw counter.txt go through {seen:?}; slowest read {slowest:?}");
    // A file being rewritten reads as one version or another: never an error
    // (a read that waited out the read timeout fails with EIO).
    assert!(errors.is_empty(), "bob's reads failed: {errors:?}");
    assert!(
        seen.windows(2).all(|p| p[0] < p[1]),
        "bob saw owner versions out of order: {seen:?}"
    );
    for checkpoint in [8, 16, 24, 32, 40] {
        assert!(
            seen.contains(&checkpoint),
            "bob never read version {checkpoint}: {seen:?}"
        );
    }
    // Renames over a name that is then reused: applied out of order, these end
    // differently.
    std::fs::rename(w.a("counter.txt"), w.a("moved.txt")).unwrap();
    std::fs::write(w.a("counter.txt"), "new\n").unwrap();
    std::fs::create_dir(w.a("d")).unwrap();
    std::fs::rename(w.a("moved.txt"), w.a("d/moved.txt")).unwrap();
    read_when(&w.b("counter.txt"), b"new\n");
    read_when(&w.b("d/moved.txt"), b"40\n");
    assert!(!w.b("moved.txt").exists());

    // update/change: bob's edit meets alice's change.
    std::fs::write(w.a("c.txt"), "owner v1").unwrap();
    read_when(&w.b("c.txt"), b"owner v1");
    std::fs::write(w.b("c.txt"), "bob's edit").unwrap();
    std::fs::write(w.a("c.txt"), "owner v2").unwrap();
    read_when(&w.b("c.txt"), b"owner v2");
    read_when(&w.b("c.txt-conflict-update-change"), b"bob's edit");
    // sync/change: bob edits, goes offline, alice changes it, bob comes back.
    std::fs::write(w.a("s.txt"), "owner s1").unwrap();
    read_when(&w.b("s.txt"), b"owner s1");
    std::fs::write(w.b("s.txt"), "bob's s").unwrap();
    w.bob.unmount();
    std::fs::write(w.a("s.txt"), "owner s2").unwrap();
    w.bob.mount();
    read_when(&w.b("s.txt"), b"owner s2");
    read_when(&w.b("s.txt-conflict-sync"), b"bob's s");
    let conflicts: Vec<String> = tree(&w.b(""))
        .into_iter()
        .filter(|n| n.contains("-conflict-"))
        .collect();
    assert_eq!(
        conflicts,
        ["c.txt-conflict-update-change", "s.txt-conflict-sync"],
        "conflict copies"
    );
    assert_eq!(
        std::fs::read(w.a("c.txt")).unwrap(),
        b"owner v2",
        "a member edit reached the owner"
    );

    // Versions are log positions: the log runs 1, 2, 3, … with no gap, each file's
    // version is the position of its last change, and bob holds exactly those.
    let log = owner_log(&w.alice);
    let first = log.first().expect("a change log").0;
    for (i, (seq, ..)) in log.iter().enumerate() {
        assert_eq!(
            *seq,
            first + i as i64,
            "gap or disorder in the log: {log:?}"
        );
    }
    // The log's timestamps are alice's (two years back), yet they order nothing.
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let day_ns = 86_400_000_000_000i64;
    assert!(
        log.iter()
            .all(|c| (now_ns - c.3) / day_ns >= 725 && (now_ns - c.3) / day_ns <= 735),
        "change times are not alice's skewed clock's"
    );
    let owner = file_versions(&w.alice, true);
    for (ino, version) in &owner {
        let last = log.iter().filter(|c| c.2 == *ino).map(|c| c.0).max();
        assert_eq!(Some(*version), last, "version of inode {ino}: {log:?}");
    }
    wait_until(
        Duration::from_secs(30),
        "bob's catalog to hold alice's versions",
        || {
            let held = file_versions(&w.bob, false);
            held == owner
        },
    );
    let last = log.last().unwrap().0;
    wait_until(
        Duration::from_secs(30),
        "bob's applied log position",
        || status(&w.bob)["live"]["groups"]["alice/g"]["applied"].as_i64() == Some(last),
    );
    println!(
        "netfault: alice's log {first}..={last}, {} files at their versions on both sides",
        owner.len()
    );
    // And no token trouble on either side.
    for c in [&w.alice, &w.bob] {
        let s = status(c);
        let signal = &s["live"]["signal"];
        println!("netfault: {}'s signaling: {signal}", c.user);
        assert!(signal["last_error"].is_null(), "{}: {signal}", c.user);
    }
}

/// Checks a member's data dir after a crash: the catalog is intact and every
/// block file in the cache holds exactly the bytes its name says.
fn check_member_store(c: &Client, point: usize, seed: u64) {
    let ok: String = c
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "point {point} (seed {seed}): catalog damaged");
    let cache = c.data.join("cache");
    for dir in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        if !dir.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.len() != 64 {
                continue; // leftovers (`.tmp`) are swept at mount
            }
            let data = std::fs::read(f.path()).unwrap();
            assert_eq!(
                blake3::hash(&data).to_hex().as_str(),
                name,
                "point {point} (seed {seed}): cached block {name} holds other bytes"
            );
        }
    }
}

/// kill -9 of a member at random points while the owner's changes stream in,
/// `BRUME_MEMBER_CRASH_POINTS` times (default 8): after each restart the catalog
/// is intact, every cached block is right, the member catches up and its copy
/// equals the owner's, byte for byte.
#[test]
fn a_member_killed_during_sync_recovers_and_catches_up() {
    let points: usize = std::env::var("BRUME_MEMBER_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("BRUME_MEMBER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut w = World::new(Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    for point in 0..points {
        let s = seed.wrapping_add(point as u64);
        let mut rng = s.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        // A burst of owner changes: new files of up to 3 MB, rewrites, removals.
        for i in 0..(4 + next(8)) {
            let name = format!("f{}", next(12));
            match next(5) {
                0 => {
                    let _ = std::fs::remove_file(w.a(&name));
                }
                _ => {
                    let len = next(3_000_000) as usize;
                    let data = random_bytes(format!("{s}.{i}").as_bytes(), len);
                    std::fs::write(w.a(&name), data).unwrap();
                }
            }
        }
        // Killed somewhere in the middle of receiving them.
        std::thread::sleep(Duration::from_millis(next(400)));
        w.bob.kill9();
        check_member_store(&w.bob, point, s);
        w.bob.mount();
        check_member_store(&w.bob, point, s);
        // Caught up: the same names and bytes as the owner.
        let want: Vec<(String, Vec<u8>)> = tree(&w.a(""))
            .into_iter()
            .filter(|p| w.a(p).is_file())
            .map(|p| {
                let data = std::fs::read(w.a(&p)).unwrap();
                (p, data)
            })
            .collect();
        let caught_up = || {
            tree(&w.b("")) == tree(&w.a(""))
                && want
                    .iter()
                    .all(|(p, d)| std::fs::read(w.b(p)).is_ok_and(|got| got == *d))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !caught_up() {
            if std::time::Instant::now() > deadline {
                let differs: Vec<String> = want
                    .iter()
                    .filter(|(p, d)| !std::fs::read(w.b(p)).is_ok_and(|got| got == *d))
                    .map(|(p, d)| {
                        let got = std::fs::read(w.b(p));
                        format!(
                            "{p}: owner {} bytes, member {:?}, cached {:?}",
                            d.len(),
                            got.map(|g| g.len()),
                            cached(&w.b(p))
                        )
                    })
                    .collect();
                panic!(
                    "point {point} (seed {s}): bob did not catch up in 60 s\nowner {:?}\nmember {:?}\ndiffering: {differs:#?}\nbob's status: {}",
                    tree(&w.a("")),
                    tree(&w.b("")),
                    status(&w.bob)["live"]["groups"]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "{points} member kill points (seeds {seed}..{}) in {:.0} s",
        seed + points as u64,
        started.elapsed().as_secs_f64()
    );
}

/// When a daemon unmounts cleanly it closes its links, so its peers see it
/// gone at once, not when their connection times out.
#[test]
fn a_clean_unmount_closes_the_links_so_peers_see_it_at_once() {
    let log = vec![(
        "RUST_LOG".to_owned(),
        "error,brume::sync::network=info".to_owned(),
    )];
    let mut w = World::new(Vec::new(), log);
    std::fs::write(w.a("f"), "x").unwrap();
    read_when(&w.b("f"), b"x");
    wait_until(Duration::from_secs(30), "bob's link to alice up", || {
        status(&w.bob)["live"]["peers"]["alice"]["state"] == "up"
    });
    w.alice.unmount();
    wait_until(Duration::from_secs(30), "bob's link to alice down", || {
        status(&w.bob)["live"]["peers"]["alice"]["state"] != "up"
    });
    let log = w.bob.log_text();
    let down: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("peer link down"))
        .collect();
    println!("netfault: {down:?}");
    // Closed by alice, not timed out by bob.
    assert!(
        down.len() == 1 && !down[0].contains("failed") && !down[0].contains("disconnected"),
        "the link was not closed by alice: {down:?}"
    );
}

/// Joining a group of a user the server does not know says so (`EBADDEST`) as
/// soon as the server has, not once the request to that owner gives up (after
/// the 20 s connect timeout), and never as "waiting for the owner".
#[test]
fn joining_a_group_of_an_unknown_user_says_ebaddest() {
    let w = World::new(Vec::new(), Vec::new());
    std::fs::create_dir_all(w.bob.mnt.join("nobody/g")).unwrap();
    let mut seen = serde_json::Value::Null;
    // Polls for 10 s, half the connect timeout.
    let ok = (0..200).any(|_| {
        seen = status(&w.bob)["live"]["groups"]["nobody/g"].clone();
        if seen["problem"]
            .as_str()
            .is_some_and(|p| p.contains("EBADDEST"))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
        false
    });
    let out = w.bob.brume(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(ok, "bob's status of nobody/g: {seen}\n{text}");
    assert!(
        text.contains("joined nobody/g: problem: EBADDEST"),
        "{text}"
    );
}

/// A `.members` naming a user the signaling server does not know is flagged
/// to the owner (a typo would otherwise share with nobody, silently).
#[test]
fn unknown_users_in_members_are_flagged_to_the_owner() {
    let w = World::new(Vec::new(), Vec::new());
    std::fs::write(w.a(".members"), "bob\nbobb\n").unwrap();
    let mut text = String::new();
    wait_until(Duration::from_secs(30), "the owner told of bobb", || {
        text = String::from_utf8_lossy(&w.alice.brume(&["status"]).stdout).into_owned();
        text.contains("unknown to the server: bobb")
    });
    assert!(
        text.contains("members: bob, bobb (EBADDEST: unknown to the server: bobb)"),
        "{text}"
    );
    assert_eq!(
        status(&w.alice)["live"]["unknown_members"]["g"],
        serde_json::json!(["bobb"])
    );
}
