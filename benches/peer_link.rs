//! Peer link benchmark on loopback: connection setup time (first offer to authenticated
//! link, first contact included) and bulk throughput of one pair with its memory
//! use, next to raw TCP loopback measured in the same run.
//!
//! `cargo bench --bench peer_link` (env `PEER_BENCH_MIB`, default 512: MiB per
//! throughput run; `PEER_BENCH_SETUPS`, default 20; `PEER_BENCH_PAIRS`, e.g. `2,3,4`:
//! also bulk of that many pairs at once, the same MiB in all; `PEER_BENCH_TURN=1`:
//! also setup and bulk relayed through coturn (`turnserver`, started here on
//! loopback, with credentials the signaling server hands out), next to direct;
//! `RUST_LOG` for logs on stderr).

use std::sync::Arc;
use std::time::{Duration, Instant};

use brume::catalog::Catalog;
use brume::ids::{GroupName, UserName};
use brume::peer::{Lane, PeerEvent, Peers, PeersConfig};
use brume::signal::accounts::Accounts;
use brume::signal::client::{self, ClientConfig};
use brume::signal::server::{self, ServerConfig};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn identity() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("randomness");
    SigningKey::from_bytes(&seed)
}

/// Peak resident memory of this process, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The machine's load averages, as the kernel reports them (1, 5, 15 minutes).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Side {
    peers: Peers,
    events: mpsc::Receiver<PeerEvent>,
    _dir: tempfile::TempDir,
}

/// coturn on loopback, checking TURN REST credentials made from `secret`;
/// killed on drop.
struct Coturn {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Coturn {
    fn start(secret: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new("turnserver")
            .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "--no-stdout-log"])
            .args(["--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
            .arg(format!("--listening-port={port}"))
            .args(["--min-port=49152", "--max-port=65535"])
            .args([
                "--use-auth-secret",
                "--realm=brume.bench",
                "--allow-loopback-peers",
            ])
            .arg(format!("--static-auth-secret={secret}"))
            .arg(format!(
                "--log-file={}",
                dir.path().join("turn.log").display()
            ))
            .arg(format!(
                "--pidfile={}",
                dir.path().join("turn.pid").display()
            ))
            .arg(format!("--userdb={}", dir.path().join("turndb").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("turnserver (Debian package coturn)");
        let turn = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "coturn did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        turn
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client; `relay_only`: its links use relayed candidates only.
async fn client_with(url: &str, accounts: &Accounts, name: &str, relay_only: bool) -> Side {
    let user = UserName::new(name).expect("name");
    let credential = accounts.add_user(&user).expect("add user");
    let key = identity();
    let (signal, events) = client::connect(ClientConfig {
        server_url: url.to_owned(),
        server_ca: None,
        username: user.clone(),
        credential,
        identity: key.clone(),
        token_ttl: 600,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    });
    signal.connected().await.expect("signaling up");
    let dir = tempfile::tempdir().expect("tempdir");
    let (catalog, _, thread) = Catalog::open(&dir.path().join("catalog.db")).expect("catalog");
    // The catalog thread lives until the process ends.
    std::mem::forget(thread);
    let (peers, events) = Peers::start(
        PeersConfig {
            me: user,
            identity: key,
            ice_servers: vec![],
            relay_only,
            turn_tls: None,
            udp_addrs: vec!["127.0.0.1:0".into()],
            setup_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        },
        Arc::new(signal),
        events,
        catalog,
        Arc::new(|_: &GroupName, _: &UserName| true),
    );
    Side {
        peers,
        events,
        _dir: dir,
    }
}

/// Waits for a link to come up.
async fn up(events: &mut mpsc::Receiver<PeerEvent>) {
    while let Some(event) = events.recv().await {
        if let PeerEvent::Up { .. } = event {
            return;
        }
    }
    panic!("events closed before the link came up");
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

async fn tcp_loopback(bytes: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The receiving end: reads everything and reports when done.
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < bytes {
            let r = s.read(&mut buf).await.expect("read");
            if r == 0 {
                break;
            }
            n += r;
        }
        n
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.expect("write");
        sent += chunk.len();
    }
    let got = reader.await.expect("reader");
    assert_eq!(got, bytes);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// The kernel's count of UDP datagrams dropped for want of receive buffer, for the
/// whole machine (other programs' sockets included).
fn udp_receive_buffer_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What one bulk run measured.
struct Bulk {
    secs: f64,
    /// The longest time a receiver waited for its next message: a lost datagram that
    /// SCTP had to time out shows as a second or more.
    longest_gap: Duration,
    drops: u64,
    rss_before: f64,
    max_rss: f64,
}

/// Fresh `pairs` sender/receiver pairs, all linked first, then each sender pushes its
/// share of `mib` MiB as 1 MiB messages on the bulk lane as fast as backpressure allows;
/// timed until every receiver has its share.
async fn bulk(
    url: &str,
    accounts: &Accounts,
    tag: &str,
    pairs: usize,
    mib: usize,
    relay_only: bool,
) -> Bulk {
    let mut linked = Vec::new();
    for k in 0..pairs {
        let a = client_with(url, accounts, &format!("{tag}-sender{k}"), relay_only).await;
        let b = client_with(url, accounts, &format!("{tag}-receiver{k}"), relay_only).await;
        let to = UserName::new(&format!("{tag}-receiver{k}")).expect("name");
        a.peers.connect(&to).await.expect("connect");
        linked.push((a, b, to));
    }
    let share = (mib << 20) / pairs;
    let rss_before = rss_mib();
    let drops_before = udp_receive_buffer_errors();
    let start = Instant::now();
    let mut runs = Vec::new();
    for (a, mut b, to) in linked {
        let peers = a.peers.clone();
        // Pushes this pair's share.
        let sender = tokio::spawn(async move {
            let msg = vec![0x5au8; 1 << 20];
            let mut sent = 0;
            while sent < share {
                peers.send(&to, Lane::Bulk, &msg).await.expect("send");
                sent += msg.len();
            }
        });
        // Receives it; returns the longest wait and the largest RSS seen.
        runs.push(tokio::spawn(async move {
            let (mut got, mut last) = (0usize, Instant::now());
            let (mut longest, mut max_rss) = (Duration::ZERO, rss_before);
            while got < share {
                match b.events.recv().await {
                    Some(PeerEvent::Message { payload, .. }) => {
                        got += payload.len();
                        longest = longest.max(last.elapsed());
                        last = Instant::now();
                        if got % (64 << 20) < (1 << 20) {
                            max_rss = max_rss.max(rss_mib());
                        }
                    }
                    Some(_) => {}
                    None => panic!("events closed"),
                }
            }
            sender.await.expect("sender");
            (a, b, longest, max_rss)
        }));
    }
    let mut done = Vec::new();
    for run in runs {
        done.push(run.await.expect("pair"));
    }
    let secs = start.elapsed().as_secs_f64();
    let drops = udp_receive_buffer_errors().saturating_sub(drops_before);
    let (mut longest_gap, mut max_rss) = (Duration::ZERO, rss_before);
    for (a, b, longest, rss) in done {
        longest_gap = longest_gap.max(longest);
        max_rss = max_rss.max(rss);
        a.peers.shutdown().await;
        b.peers.shutdown().await;
    }
    Bulk {
        secs,
        longest_gap,
        drops,
        rss_before,
        max_rss,
    }
}

/// Setup time of `n` fresh pairs, one after the other: `connect()` until both ends
/// are authenticated (first contact: key lookup and pin included), in ms.
async fn setup_times(url: &str, accounts: &Accounts, n: usize, relay_only: bool) -> Vec<f64> {
    let tag = if relay_only { "r" } else { "d" };
    let mut times = Vec::new();
    for i in 0..n {
        let a = client_with(url, accounts, &format!("{tag}a{i}"), relay_only).await;
        let mut b = client_with(url, accounts, &format!("{tag}b{i}"), relay_only).await;
        let bname = UserName::new(&format!("{tag}b{i}")).expect("name");
        let start = Instant::now();
        a.peers.connect(&bname).await.expect("connect");
        // Until both ends are authenticated: the answerer verifies last.
        up(&mut b.events).await;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        a.peers.shutdown().await;
        b.peers.shutdown().await;
    }
    times
}

fn report_setup(what: &str, times: &mut [f64]) {
    let (min, max) = (
        times.iter().cloned().fold(f64::MAX, f64::min),
        times.iter().cloned().fold(0.0, f64::max),
    );
    let all: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    println!(
        "{what} (connect() until both ends authenticated, offer included): median {:.1} ms, p90 {:.1} ms, min {min:.1} ms, max {max:.1} ms; all (ms): {}",
        quantile(times, 0.5),
        quantile(times, 0.9),
        all.join(" ")
    );
}

fn main() {
    // Logs to stderr, filtered by RUST_LOG (default: warnings), so a failed setup
    // says why.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let mib = env("PEER_BENCH_MIB", 512);
    let setups = env("PEER_BENCH_SETUPS", 20).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("server.db");
    let accounts = Accounts::open(&db).expect("accounts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let turn = (env("PEER_BENCH_TURN", 0) != 0).then(|| Coturn::start("bench secret"));
    let mut config = ServerConfig::new(db);
    if let Some(turn) = &turn {
        config.ice = vec![format!("turn:127.0.0.1:{}", turn.port)];
        config.turn_secret = Some(b"bench secret".to_vec());
    }
    // The signaling server, for the whole run.
    let server = tokio::spawn(server::run(listener, config, async {
        let _ = stopped.await;
    }));
    println!(
        "machine: {} cores, load {}; payload {mib} MiB; {setups} setups",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );

    let mut direct_setup = setup_times(&url, &accounts, setups, false).await;
    report_setup("setup", &mut direct_setup);
    let mut relayed_setup = Vec::new();
    if turn.is_some() {
        relayed_setup = setup_times(&url, &accounts, setups, true).await;
        report_setup("setup relayed through coturn", &mut relayed_setup);
    }

    // Bulk throughput of one pair.
    let one = bulk(&url, &accounts, "bulk", 1, mib, false).await;
    println!(
        "bulk: {mib} MiB in {:.2} s = {:.1} MB/s; RSS {:.0} MiB before, max {:.0} MiB during, peak {:.0} MiB; longest wait for a message {:.0} ms; UDP receive-buffer drops (whole machine) {}",
        one.secs,
        (mib << 20) as f64 / one.secs / 1e6,
        one.rss_before,
        one.max_rss,
        peak_rss_mib(),
        one.longest_gap.as_secs_f64() * 1e3,
        one.drops
    );
    // Several pairs at once: as many associations as striping one pair's bulk lane
    // over that many would use, without anything shared between them: the most such
    // striping could give.
    for pairs in std::env::var("PEER_BENCH_PAIRS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        let run = bulk(&url, &accounts, &format!("pairs{pairs}"), pairs, mib, false).await;
        println!(
            "bulk, {pairs} pairs at once: {mib} MiB in all in {:.2} s = {:.1} MB/s; peak RSS {:.0} MiB; longest wait for a message {:.0} ms; UDP receive-buffer drops (whole machine) {}",
            run.secs,
            (mib << 20) as f64 / run.secs / 1e6,
            peak_rss_mib(),
            run.longest_gap.as_secs_f64() * 1e3,
            run.drops
        );
    }

    if turn.is_some() {
        let relayed = bulk(&url, &accounts, "relayed", 1, mib, true).await;
        let (direct_rate, relayed_rate) = (
            (mib << 20) as f64 / one.secs / 1e6,
            (mib << 20) as f64 / relayed.secs / 1e6,
        );
        println!(
            "bulk relayed through coturn: {mib} MiB in {:.2} s = {relayed_rate:.1} MB/s = {:.2}x direct; longest wait for a message {:.0} ms; UDP receive-buffer drops (whole machine) {}",
            relayed.secs,
            relayed_rate / direct_rate,
            relayed.longest_gap.as_secs_f64() * 1e3,
            relayed.drops
        );
        println!(
            "setup medians: direct {:.1} ms, relayed {:.1} ms",
            quantile(&mut direct_setup, 0.5),
            quantile(&mut relayed_setup, 0.5)
        );
    }

    let tcp = tcp_loopback(1 << 30).await;
    println!("raw TCP loopback: 1024 MiB at {tcp:.0} MB/s");
    println!("load at the end: {}", load());
    drop(stop);
    let _ = server.await;
}
