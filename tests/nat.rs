//! Across NATs: two users in different homes, each behind a router doing NAT with
//! nftables, and a "public" network holding `brume server` over TLS (its certificate
//! from a CA made for the test) and coturn, the TURN server. Everything lives in
//! network namespaces the test makes and deletes again, even on panic; the addresses
//! exist only inside them.
//!
//! ```text
//!   a (10.241.1.2) -- ra [NAT] --+                        +-- [NAT] rb -- b (10.241.2.2)
//!                     10.240.0.2 +-- br0 in "pub" (.1) ---+ 10.240.0.3
//!                                    brume server (wss), coturn :3478
//! ```
//!
//! Each case sends a group of a few MiB from alice (in `a`) to bob (in `b`), checks
//! the bytes, and checks the path both sides' status shows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Client, TestCa, brume_bin, in_netns, wait_until};

/// The "internet": the public namespace's bridge.
const WAN: &str = "10.240.0";
/// Where the server and coturn listen.
const PUBLIC: &str = "10.240.0.1";
const TURN_PORT: u16 = 3478;
const SECRET: &str = "a secret shared by brume server and coturn";

/// Runs a command, panicking with its output if it cannot run or fails.
fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` ({e}): these tests need root, iproute2 and nftables")
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

/// What a home router does to its users' traffic.
#[derive(Clone, Copy, PartialEq)]
enum Router {
    /// Plain `masquerade`: a flow keeps its source port (endpoint-independent
    /// mapping), so hole punching works.
    KeepsPorts,
    /// `masquerade random,fully-random`: every flow gets a random port (a
    /// symmetric NAT); the address a STUN server sees is useless to a peer.
    Symmetric,
    /// Plain `masquerade`, and no UDP leaves at all: only TCP goes out.
    NoUdp,
}

/// The namespaces, deleted on drop.
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    fn new(a: Router, b: Router) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut net = Self {
            prefix: format!("brume-n-{}-{n}", std::process::id()),
            made: Vec::new(),
        };
        for who in ["pub", "void", "ra", "rb", "a", "b"] {
            let ns = net.ns(who);
            // Left over from a killed run with this very name.
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
        let public = net.ns("pub");
        run(
            "ip",
            &["-n", &public, "link", "add", "br0", "type", "bridge"],
        );
        run(
            "ip",
            &[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{PUBLIC}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &public, "link", "set", "br0", "up"]);
        // Like a server on the internet, the public side has a default route, to a
        // namespace that silently drops what it gets: what coturn sends to a peer's
        // private address is lost on the way, not refused. (coturn ends a whole
        // allocation when a send to a peer fails, so an unroutable private host
        // candidate would otherwise cost the link its relay.)
        let void = net.ns("void");
        run(
            "ip",
            &[
                "-n", &public, "link", "add", "sink", "type", "veth", "peer", "name", "hole",
                "netns", &void,
            ],
        );
        run(
            "ip",
            &["-n", &public, "addr", "add", "10.250.0.1/30", "dev", "sink"],
        );
        run("ip", &["-n", &public, "link", "set", "sink", "up"]);
        run(
            "ip",
            &["-n", &void, "addr", "add", "10.250.0.2/30", "dev", "hole"],
        );
        run("ip", &["-n", &void, "link", "set", "hole", "up"]);
        run(
            "ip",
            &[
                "-n",
                &public,
                "route",
                "add",
                "default",
                "via",
                "10.250.0.2",
            ],
        );
        net.nft(
            "void",
            "table ip void {\n\
               chain in { type filter hook prerouting priority 0; policy accept;\n\
                 ip daddr != 10.250.0.2 drop\n\
               }\n\
             }",
        );
        for (i, (router, home, kind)) in [("ra", "a", a), ("rb", "b", b)].into_iter().enumerate() {
            let (r, h) = (net.ns(router), net.ns(home));
            // The router's WAN port on the public bridge.
            let port = format!("v-{router}");
            run(
                "ip",
                &[
                    "-n", &public, "link", "add", &port, "type", "veth", "peer", "name", "wan",
                    "netns", &r,
                ],
            );
            run(
                "ip",
                &["-n", &public, "link", "set", &port, "master", "br0"],
            );
            run("ip", &["-n", &public, "link", "set", &port, "up"]);
            let wan = format!("{WAN}.{}/24", i + 2);
            run("ip", &["-n", &r, "addr", "add", &wan, "dev", "wan"]);
            run("ip", &["-n", &r, "link", "set", "wan", "up"]);
            // The home network behind it.
            run(
                "ip",
                &[
                    "-n", &r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                    "netns", &h,
                ],
            );
            let lan = format!("10.241.{}", i + 1);
            run(
                "ip",
                &[
                    "-n",
                    &r,
                    "addr",
                    "add",
                    &format!("{lan}.1/24"),
                    "dev",
                    "lan",
                ],
            );
            run("ip", &["-n", &r, "link", "set", "lan", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &h,
                    "addr",
                    "add",
                    &format!("{lan}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &h, "link", "set", "eth0", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &h,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{lan}.1"),
                ],
            );
            net.exec(
                router,
                "sh",
                &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            );
            net.nat(router, kind);
        }
        // Bytes arriving at coturn, on its port (UDP and TCP) and its relayed
        // addresses: what it relays for a link, and the little that allocations and
        // checks cost. (Nothing else in this namespace takes UDP; the signaling
        // server's TCP port is not counted.) And a port where a TURN server does
        // not answer: what arrives there is dropped.
        net.nft(
            "pub",
            "table inet count {\n\
               counter turn {}\n\
               chain input { type filter hook input priority 0; policy accept;\n\
                 meta l4proto udp counter name turn\n\
                 tcp dport 3478 counter name turn\n\
                 udp dport 3479 drop\n\
               }\n\
             }",
        );
        net
    }

    fn ns(&self, who: &str) -> String {
        format!("{}-{who}", self.prefix)
    }

    fn exec(&self, who: &str, program: &str, args: &[&str]) -> Output {
        let ns = self.ns(who);
        let mut all = vec!["netns", "exec", ns.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Loads an nftables ruleset into `who`'s namespace.
    fn nft(&self, who: &str, rules: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.nft");
        std::fs::write(&file, rules).unwrap();
        self.exec(who, "nft", &["-f", file.to_str().unwrap()]);
    }

    /// (Re)sets `router`'s NAT: its `nat` table is replaced whole.
    fn nat(&self, router: &str, kind: Router) {
        self.nat_with(
            router,
            match kind {
                Router::Symmetric => "masquerade random,fully-random",
                Router::KeepsPorts | Router::NoUdp => "masquerade",
            },
        );
        // A home router's firewall: nothing new comes in from outside. (Without it,
        // a peer's check arriving before our own packet to it leaves a conntrack
        // entry that makes the NAT pick another port for our flow.)
        let udp = if kind == Router::NoUdp {
            "iifname \"lan\" meta l4proto udp drop\n"
        } else {
            ""
        };
        self.nft(
            router,
            &format!(
                "table ip filter {{\n\
                   chain input {{ type filter hook input priority 0; policy accept;\n\
                     iifname \"wan\" ct state new drop\n\
                   }}\n\
                   chain forward {{ type filter hook forward priority 0; policy accept;\n\
                     iifname \"wan\" ct state new drop\n\
                     {udp}\
                   }}\n\
                 }}"
            ),
        );
    }

    /// Sets `router`'s NAT to `statement` for everything leaving its WAN port.
    fn nat_with(&self, router: &str, statement: &str) {
        self.nft(
            router,
            &format!(
                "table ip nat\n\
                 delete table ip nat\n\
                 table ip nat {{\n\
                   chain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
                     oifname \"wan\" {statement}\n\
                   }}\n\
                 }}"
            ),
        );
    }

    /// Bytes that reached coturn's port so far.
    fn turn_bytes(&self) -> u64 {
        let out = self.exec("pub", "nft", &["list", "counter", "inet", "count", "turn"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {text:?}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// coturn in the public namespace, checking TURN REST credentials made from
/// [`SECRET`], on UDP and TCP port 3478.
fn coturn(net: &Net, dir: &Path) -> Proc {
    let mut cmd = Command::new("turnserver");
    cmd.args([
        "-n",
        "-v",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-stdout-log",
    ])
    .arg(format!("--listening-ip={PUBLIC}"))
    .arg(format!("--relay-ip={PUBLIC}"))
    .arg(format!("--listening-port={TURN_PORT}"))
    .args(["--min-port=49152", "--max-port=65535"])
    .args(["--use-auth-secret", "--realm=brume.test"])
    .arg(format!("--static-auth-secret={SECRET}"))
    .arg(format!("--log-file={}", dir.join("turn.log").display()))
    .arg(format!("--pidfile={}", dir.join("turn.pid").display()))
    .arg(format!("--userdb={}", dir.join("turndb").display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    in_netns(&mut cmd, &net.ns("pub"));
    let mut turn = Proc(
        cmd.spawn()
            .expect("turnserver (coturn) is installed by tests/run.sh"),
    );
    wait_until(Duration::from_secs(20), "coturn listening", || {
        if let Ok(Some(status)) = turn.0.try_wait() {
            panic!("turnserver exited: {status}");
        }
        let probe = net.exec("pub", "ss", &["-Htln", &format!("sport = :{TURN_PORT}")]);
        !probe.stdout.is_empty()
    });
    turn
}

/// `brume server` over TLS in the public namespace, handing out coturn.
fn server(net: &Net, dir: &Path, ca: &TestCa, setup: &Setup) -> (Proc, String) {
    use std::io::BufRead;
    let (cert, key) = ca.server_files(&[PUBLIC], (-1, 30));
    std::fs::write(dir.join("turn-secret"), setup.turn_secret).unwrap();
    let mut cmd = Command::new(brume_bin());
    cmd.args(["server", "--listen", &format!("{PUBLIC}:0"), "--db"])
        .arg(dir.join("server.db"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--turn-secret-file")
        .arg(dir.join("turn-secret"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for url in &setup.ice {
        cmd.args(["--ice", url]);
    }
    in_netns(&mut cmd, &net.ns("pub"));
    let mut child = Proc(cmd.spawn().expect("spawn brume server"));
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line);
    let url = line
        .trim()
        .strip_prefix("brume server listening on ")
        .unwrap_or_else(|| panic!("brume server did not start: {line:?}"))
        .to_owned();
    assert!(url.starts_with("wss://"), "{url}");
    (child, url)
}

/// How a case is set up.
struct Setup {
    a: Router,
    b: Router,
    /// The ICE servers `brume server` hands out.
    ice: Vec<String>,
    /// Top-level lines added to both users' `brume.conf`.
    conf: &'static str,
    /// The TURN secret `brume server` makes credentials with (coturn checks
    /// them with [`SECRET`]).
    turn_secret: &'static str,
}

impl Setup {
    fn new(a: Router, b: Router) -> Self {
        Self {
            a,
            b,
            ice: vec![
                format!("stun:{PUBLIC}:{TURN_PORT}"),
                format!("turn:{PUBLIC}:{TURN_PORT}"),
            ],
            conf: "",
            turn_secret: SECRET,
        }
    }
}

/// alice in `a` owns `alice/g`, shared with bob in `b`, who has joined it.
/// Fields drop in order: mounts, processes, then the network.
struct World {
    alice: Client,
    bob: Client,
    _server: Proc,
    _turn: Proc,
    net: Net,
    url: String,
    db: PathBuf,
    _dir: tempfile::TempDir,
    _ca: TestCa,
}

impl World {
    fn new(setup: Setup) -> Self {
        let net = Net::new(setup.a, setup.b);
        let dir = tempfile::Builder::new()
            .prefix("brume-test-nat-")
            .tempdir()
            .unwrap();
        let ca = TestCa::new();
        let turn = coturn(&net, dir.path());
        let (server, url) = server(&net, dir.path(), &ca, &setup);
        let db = dir.path().join("server.db");
        let mut world_clients = Vec::new();
        for (user, home) in [("alice", "a"), ("bob", "b")] {
            let mut c = account(&db, &url, user);
            let text = std::fs::read_to_string(&c.config).unwrap();
            std::fs::write(
                &c.config,
                format!(
                    "server_ca = \"{}\"\n{}{text}",
                    ca.ca_pem().display(),
                    setup.conf
                ),
            )
            .unwrap();
            c.netns = Some(net.ns(home));
            c.mount();
            world_clients.push(c);
        }
        let bob = world_clients.pop().unwrap();
        let alice = world_clients.pop().unwrap();
        let w = Self {
            alice,
            bob,
            _server: server,
            _turn: turn,
            net,
            url,
            db,
            _dir: dir,
            _ca: ca,
        };
        std::fs::create_dir(w.a("")).unwrap();
        std::fs::write(w.a(".members"), "bob\n").unwrap();
        std::fs::create_dir_all(w.b("")).unwrap();
        wait_until(Duration::from_secs(60), "bob to join alice/g", || {
            std::fs::read(w.b(".members")).is_ok_and(|d| d == b"bob\n")
        });
        w
    }

    fn a(&self, rel: &str) -> PathBuf {
        self.alice.mnt.join("alice/g").join(rel)
    }

    fn b(&self, rel: &str) -> PathBuf {
        self.bob.mnt.join("alice/g").join(rel)
    }

    /// Writes a few MiB at alice and waits for bob to hold all of it, the same.
    fn send_group(&self, tag: &str) {
        let mut want = Vec::new();
        for (i, len) in [(0, 3 << 20), (1, 700_000), (2, 5)].into_iter() {
            let name = format!("{tag}-{i}.bin");
            let data = random_bytes(format!("{tag} {i}").as_bytes(), len);
            std::fs::write(self.a(&name), &data).unwrap();
            want.push((name, blake3::hash(&data)));
        }
        for (name, hash) in want {
            let copy = self.b(&name);
            wait_until(
                Duration::from_secs(90),
                &format!("bob to get {name}"),
                || std::fs::read(&copy).is_ok_and(|d| blake3::hash(&d) == hash),
            );
        }
    }

    /// `live.peers.PEER.path` in `c`'s status, once the link to `peer` is up.
    fn path(&self, c: &Client, peer: &str) -> String {
        let mut path = String::new();
        wait_until(
            Duration::from_secs(30),
            &format!("{}'s link to {peer} to show its path", c.user),
            || {
                let s = status_json(c);
                let p = &s["live"]["peers"][peer];
                match (p["state"].as_str(), p["path"].as_str()) {
                    (Some("up"), Some(found)) => {
                        path = found.to_owned();
                        true
                    }
                    _ => false,
                }
            },
        );
        path
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // coturn's side of a failure.
            let log = std::fs::read_dir(self._dir.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("turn"))
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect::<String>();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} lines of coturn's log:\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A new account `user` on the server; its client not yet configured for a namespace.
fn account(db: &Path, url: &str, user: &str) -> Client {
    let out = Command::new(brume_bin())
        .args(["server", "add-user", user, "--db"])
        .arg(db)
        .args(["--url", url])
        .output()
        .expect("brume server add-user");
    assert!(out.status.success(), "add-user {user}: {out:?}");
    let c = Client::new(user);
    std::fs::write(&c.config, &out.stdout).unwrap();
    c
}

fn status_json(c: &Client) -> serde_json::Value {
    let out = c.brume(&["status", "--json"]);
    assert!(out.status.success(), "brume status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn status_text(c: &Client) -> String {
    let out = c.brume(&["status"]);
    assert!(out.status.success(), "brume status: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `live.relays.SERVER` in `c`'s status once `server` has been checked.
fn relay(c: &Client, server: &str) -> serde_json::Value {
    let mut r = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(30),
        &format!("{}'s status to check the TURN server {server}", c.user),
        || {
            r = status_json(c)["live"]["relays"][server].clone();
            !r["checked_unix"].is_null()
        },
    );
    r
}

fn random_bytes(seed: &[u8], len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(seed);
    hasher.finalize_xof().fill(&mut data);
    data
}

/// The line of `c`'s human status about `peer`.
fn peer_line(c: &Client, peer: &str) -> String {
    let text = status_text(c);
    text.lines()
        .find(|l| l.starts_with(&format!("peer {peer}:")))
        .unwrap_or_else(|| panic!("no line for {peer} in {text}"))
        .to_owned()
}

#[test]
fn behind_two_port_keeping_nats_the_link_is_direct_and_coturn_relays_nothing() {
    let w = World::new(Setup::new(Router::KeepsPorts, Router::KeepsPorts));
    let before = w.net.turn_bytes();
    w.send_group("direct");
    let relayed = w.net.turn_bytes() - before;
    assert_eq!(w.path(&w.alice, "bob"), "srflx");
    assert_eq!(w.path(&w.bob, "alice"), "srflx");
    assert!(
        peer_line(&w.bob, "alice").contains("up, direct (srflx)"),
        "{}",
        status_text(&w.bob)
    );
    // Allocations, refreshes and connectivity checks only: far less than the
    // 3.7 MB that crossed.
    assert!(relayed < 200_000, "coturn saw {relayed} bytes");
}

#[test]
fn behind_a_symmetric_nat_the_link_comes_up_relayed() {
    let w = World::new(Setup::new(Router::KeepsPorts, Router::Symmetric));
    let before = w.net.turn_bytes();
    w.send_group("symmetric");
    let relayed = w.net.turn_bytes() - before;
    let paths = [w.path(&w.alice, "bob"), w.path(&w.bob, "alice")];
    // bob's mapping is useless to alice: at least one end goes through the relay.
    assert!(paths.contains(&"relay".to_owned()), "{paths:?}");
    let (who, peer) = if paths[1] == "relay" {
        (&w.bob, "alice")
    } else {
        (&w.alice, "bob")
    };
    let line = peer_line(who, peer);
    assert!(
        line.contains(&format!("up, relayed via {PUBLIC}:{TURN_PORT}")),
        "{line}"
    );
    assert!(relayed > 3 << 20, "coturn saw only {relayed} bytes");
    let turn = relay(who, &format!("{PUBLIC}:{TURN_PORT}"));
    assert_eq!(turn["ok"], true, "{turn}");
}

#[test]
fn with_all_udp_blocked_the_link_is_relayed_over_turn_tcp() {
    let mut setup = Setup::new(Router::KeepsPorts, Router::NoUdp);
    setup
        .ice
        .push(format!("turn:{PUBLIC}:{TURN_PORT}?transport=tcp"));
    let w = World::new(setup);
    w.send_group("tcp");
    assert_eq!(w.path(&w.bob, "alice"), "relay");
    let line = peer_line(&w.bob, "alice");
    assert!(
        line.contains(&format!("up, relayed via {PUBLIC}:{TURN_PORT} (TCP)")),
        "{line}"
    );
    // bob's UDP to coturn is blocked, TCP is not.
    let udp = relay(&w.bob, &format!("{PUBLIC}:{TURN_PORT}"));
    assert!(
        udp["problem"]
            .as_str()
            .is_some_and(|p| p.contains("no answer")),
        "{udp}"
    );
    let tcp = relay(&w.bob, &format!("{PUBLIC}:{TURN_PORT} (TCP)"));
    assert_eq!(tcp["ok"], true, "{tcp}");
}

/// TURN servers that refuse the credentials, do not answer, or are not there:
/// the link comes up over the direct path, nothing waits on them, and status
/// names each problem.
#[test]
fn turn_servers_that_refuse_or_do_not_answer_leave_the_link_direct_and_are_named() {
    let mut setup = Setup::new(Router::KeepsPorts, Router::KeepsPorts);
    // Credentials coturn does not accept.
    setup.turn_secret = "not the secret coturn has";
    // Nothing answers on 3479 (the public side drops what arrives there), nothing
    // listens on 3480.
    setup.ice.push(format!("turn:{PUBLIC}:3479"));
    setup.ice.push(format!("turn:{PUBLIC}:3480?transport=tcp"));
    let started = Instant::now();
    let w = World::new(setup);
    w.send_group("bad-turn");
    println!(
        "nat: joined and synced {:.1?} after start",
        started.elapsed()
    );
    assert_eq!(w.path(&w.bob, "alice"), "srflx");
    let refused = relay(&w.bob, &format!("{PUBLIC}:{TURN_PORT}"));
    assert!(
        refused["problem"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("TURN 401 from {PUBLIC}:{TURN_PORT}"))),
        "{refused}"
    );
    assert_eq!(refused["ok"], false);
    let silent = relay(&w.bob, &format!("{PUBLIC}:3479"));
    assert!(
        silent["problem"]
            .as_str()
            .is_some_and(|p| p.contains(&format!("{PUBLIC}:3479")) && p.contains("no answer")),
        "{silent}"
    );
    let absent = relay(&w.bob, &format!("{PUBLIC}:3480 (TCP)"));
    assert!(
        absent["problem"]
            .as_str()
            .is_some_and(|p| p.contains("refused")),
        "{absent}"
    );
    let text = status_text(&w.bob);
    println!("{text}");
    assert!(
        text.contains(&format!(
            "relay {PUBLIC}:{TURN_PORT}: PROBLEM: TURN 401 from {PUBLIC}:{TURN_PORT}"
        )),
        "{text}"
    );
}

#[test]
fn ice_policy_relay_relays_even_with_direct_paths_open() {
    let mut setup = Setup::new(Router::KeepsPorts, Router::KeepsPorts);
    setup.conf = "ice_policy = \"relay\"\n";
    let w = World::new(setup);
    let before = w.net.turn_bytes();
    w.send_group("policy");
    let relayed = w.net.turn_bytes() - before;
    assert_eq!(w.path(&w.alice, "bob"), "relay");
    assert_eq!(w.path(&w.bob, "alice"), "relay");
    // The group crossed through coturn, to it from one side and from it to the other.
    assert!(relayed > 3 << 20, "coturn saw only {relayed} bytes");
}

#[test]
fn a_client_that_does_not_trust_the_servers_certificate_is_refused_and_says_why() {
    let w = World::new(Setup::new(Router::KeepsPorts, Router::KeepsPorts));
    // carol, in alice's home, has the account but not the CA.
    let mut carol = account(&w.db, &w.url, "carol");
    carol.netns = Some(w.net.ns("a"));
    carol.mount();
    let mut why = String::new();
    wait_until(Duration::from_secs(30), "carol's status to say why", || {
        why = status_json(&carol)["live"]["signal"]["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        !why.is_empty()
    });
    assert!(
        why.contains("certificate") && why.contains(PUBLIC),
        "carol's status: {why}"
    );
    assert_ne!(
        status_json(&carol)["live"]["signal"]["state"].as_str(),
        Some("connected")
    );
    let text = status_text(&carol);
    assert!(text.contains("certificate"), "{text}");
    // And alice, who has the CA, is unaffected.
    w.send_group("trusted");
}

#[test]
fn a_router_whose_mapping_changes_mid_transfer_loses_the_link_not_the_transfer() {
    const SIZE: usize = 48 << 20;
    let w = World::new(Setup::new(Router::KeepsPorts, Router::KeepsPorts));
    assert_eq!(w.path(&w.bob, "alice"), "srflx");
    // Slow what reaches bob so the transfer lasts seconds.
    w.net.exec(
        "rb",
        "tc",
        &[
            "qdisc", "replace", "dev", "lan", "root", "tbf", "rate", "100mbit", "burst", "128kb",
            "latency", "100ms",
        ],
    );
    let connects_before = status_json(&w.bob)["live"]["peers"]["alice"]["connects"]
        .as_u64()
        .unwrap_or(0);
    let data = random_bytes(b"nat remap", SIZE);
    let want = blake3::hash(&data);
    std::fs::write(w.a("big.bin"), &data).unwrap();
    drop(data);
    let copy = w.b("big.bin");
    let blocks = SIZE as u64 / brume::blocks::BLOCK_SIZE;
    let mut at = (0, 0);
    wait_until(
        Duration::from_secs(60),
        "bob to hold part of big.bin",
        || {
            at = cached(&copy).unwrap_or((0, 0));
            at.1 == blocks && at.0 >= blocks / 5
        },
    );
    assert!(
        at.0 < blocks,
        "the transfer ended before the mapping changed"
    );
    // alice's router now maps her flows to other ports, and forgets the old ones:
    // bob's packets to her old mapping are dropped, hers come from a new port.
    w.net.nat_with(
        "ra",
        "meta l4proto udp masquerade to :20000-20999\nmasquerade",
    );
    w.net.exec("ra", "conntrack", &["-F"]);
    let changed = Instant::now();
    wait_until(Duration::from_secs(120), "the transfer to complete", || {
        cached(&copy) == Some((blocks, blocks))
    });
    println!(
        "nat: mapping changed at {}/{blocks} blocks; complete {:.1?} later",
        at.0,
        changed.elapsed()
    );
    assert_eq!(
        blake3::hash(&std::fs::read(&copy).unwrap()),
        want,
        "bob's copy differs from alice's file"
    );
    let p = &status_json(&w.bob)["live"]["peers"]["alice"];
    let connects = p["connects"].as_u64().unwrap_or(0);
    println!("nat: links to alice {connects_before} -> {connects}");
    assert!(
        connects > connects_before,
        "the link never went down: the change tested nothing"
    );
    assert_eq!(w.path(&w.bob, "alice"), "srflx");
    // What bob received beyond the file: what was in flight at the change, not
    // the file again.
    let received = p["bytes_received"].as_u64().unwrap_or(0);
    assert!(
        received < (SIZE as u64) * 3 / 2,
        "bob received {received} bytes for a {SIZE}-byte file"
    );
}

/// The `user.brume.cached` availability of a mirrored file: (blocks here, blocks).
fn cached(p: &Path) -> Option<(u64, u64)> {
    let text = crate::sync::cached_xattr(p)?;
    let (k, n) = text.split_once('/')?;
    Some((k.parse().ok()?, n.parse().ok()?))
}
