//! Load benchmark of the signaling server (`cargo bench --bench signal_load`): runs the
//! real `brume server` binary as a child, opens many authenticated idle WebSocket
//! connections and reports the server's resident memory, then relays messages between
//! active pairs and reports throughput and latency. Loopback only.
//!
//! Knobs (environment): `BRUME_BENCH_IDLE` connections (default 10000),
//! `BRUME_BENCH_PAIRS` active pairs among them (default 1000), `BRUME_BENCH_SECS`
//! of relaying (default 10), `BRUME_BENCH_WINDOW` messages in flight per pair (default 4).

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brume::ids::UserName;
use brume::signal::accounts::Accounts;
use brume::signal::protocol::{
    CHALLENGE_HEADER, ClientToServer, IdentityKey, PROTOCOL_VERSION, ServerToClient, hello_proof,
};
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Ws = WebSocketStream<TcpStream>;

/// Kills the server when dropped, even if the benchmark panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Soft open-file limit up to the hard one: the client side holds one socket per
/// connection, and the server (our child) inherits the limit.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// A field of `/proc/<pid>/status` in KiB (VmRSS, VmHWM).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// User + system CPU time of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn user(i: u64) -> UserName {
    UserName::new(&format!("u{i:05}")).expect("valid name")
}

/// One measuring phase of the active pairs.
#[derive(Clone, Copy)]
struct Phase {
    /// 0: closed loop (each message answered by a new one); 1: paced.
    index: usize,
    start: Instant,
    end: Instant,
    /// Paced phase: each active connection sends one message per `period`.
    period: Option<Duration>,
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    delivered: u64,
    latencies_us: Vec<u32>,
}

/// Relayed messages received inside a measuring window, over all connections.
static DELIVERED: AtomicU64 = AtomicU64::new(0);

async fn connect(addr: SocketAddr, token: &str, who: &UserName, key: &SigningKey) -> Ws {
    let mut request = format!("ws://{addr}/").into_client_request().expect("url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let mut last_err = None;
    for _ in 0..5 {
        let tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(err) => {
                last_err = Some(err.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        match tokio_tungstenite::client_async_with_config(request.clone(), tcp, Some(config)).await
        {
            Ok((mut ws, response)) => {
                let challenge = response.headers()[CHALLENGE_HEADER]
                    .to_str()
                    .expect("challenge");
                let hello = ClientToServer::Hello {
                    version: PROTOCOL_VERSION,
                    identity_key: IdentityKey::from(key.verifying_key()),
                    proof: Some(hello_proof(key, challenge, who)),
                };
                ws.send(Message::text(hello.encode().expect("hello")))
                    .await
                    .expect("send hello");
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            match ServerToClient::decode(&t).expect("decode") {
                                ServerToClient::Welcome { .. } => return ws,
                                other => panic!("expected welcome, got {other:?}"),
                            }
                        }
                        Some(Ok(_)) => continue,
                        other => panic!("no welcome: {other:?}"),
                    }
                }
            }
            Err(err) => {
                last_err = Some(err.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("cannot connect: {last_err:?}");
}

fn relay_frame(to: &UserName, pad: &str) -> Message {
    let t = epoch().elapsed().as_nanos() as u64;
    let message = ClientToServer::Relay {
        to: to.clone(),
        // About the size of an ICE candidate.
        payload: serde_json::json!({"t": t, "candidate": pad}),
    };
    Message::text(message.encode().expect("encode"))
}

/// One connection: idle, or (with a partner) in each phase either answers every
/// relayed message with a new one (closed loop) or sends at a fixed pace, measuring
/// one-way latency of what it receives.
async fn drive(
    mut ws: Ws,
    partner: Option<UserName>,
    starts: bool,
    window: u64,
    mut phases: watch::Receiver<Option<Phase>>,
    mut stop: watch::Receiver<bool>,
) -> [Tally; 2] {
    let pad = "x".repeat(160);
    let mut tallies = [Tally::default(), Tally::default()];
    let mut phase: Option<Phase> = None;
    // Ticks only in a paced phase; otherwise a far-away placeholder.
    let mut pace = tokio::time::interval(Duration::from_secs(3600));
    pace.tick().await;
    loop {
        let paced = phase.is_some_and(|p| p.period.is_some() && Instant::now() < p.end);
        tokio::select! {
            _ = stop.changed() => break,
            changed = phases.changed() => {
                if changed.is_err() { break; }
                phase = *phases.borrow_and_update();
                let (Some(p), Some(partner)) = (phase, &partner) else { continue };
                match p.period {
                    None if starts => {
                        for _ in 0..window {
                            ws.send(relay_frame(partner, &pad)).await.expect("send");
                        }
                    }
                    None => {}
                    Some(period) => {
                        // Spread the connections' sends evenly over the period.
                        let offset = period.mul_f64(pseudo_random_fraction(partner));
                        pace = tokio::time::interval_at((p.start + offset).into(), period);
                    }
                }
            }
            _ = pace.tick(), if paced => {
                if let Some(partner) = &partner {
                    ws.send(relay_frame(partner, &pad)).await.expect("send");
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let now = Instant::now();
                    let Ok(ServerToClient::Relay { from, payload }) = ServerToClient::decode(&text) else {
                        panic!("unexpected message: {text}");
                    };
                    let sent = payload["t"].as_u64().expect("timestamp");
                    let Some(p) = phase else { continue };
                    if now >= p.start && now < p.end {
                        let latency = (now - epoch()).as_nanos() as u64 - sent;
                        let tally = &mut tallies[p.index];
                        tally.delivered += 1;
                        DELIVERED.fetch_add(1, Ordering::Relaxed);
                        tally.latencies_us.push((latency / 1000).min(u64::from(u32::MAX)) as u32);
                    }
                    if p.period.is_none() && now < p.end {
                        ws.send(relay_frame(&from, &pad)).await.expect("send");
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("connection failed: {err}"),
                None => panic!("server closed a connection"),
            },
        }
    }
    let _ = ws.close(None).await;
    tallies
}

/// A fraction in [0, 1) that differs between users.
fn pseudo_random_fraction(user: &UserName) -> f64 {
    let hash = blake3::hash(user.as_str().as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn report(name: &str, secs: u64, tally: &mut Tally) {
    tally.latencies_us.sort_unstable();
    let l = &tally.latencies_us;
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "{name}: {:.0} messages/s relayed ({} delivered in {secs} s); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        tally.delivered as f64 / secs as f64,
        tally.delivered,
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}

fn main() {
    let idle = env_or("BRUME_BENCH_IDLE", 10_000);
    let pairs = env_or("BRUME_BENCH_PAIRS", 1_000);
    let secs = env_or("BRUME_BENCH_SECS", 10);
    let window = env_or("BRUME_BENCH_WINDOW", 1);
    let rate = env_or("BRUME_BENCH_RATE", 20_000);
    let total = idle.max(2 * pairs);
    let nofile = raise_nofile();
    assert!(
        nofile > total + 100,
        "open-file limit {nofile} too low for {total} connections"
    );
    epoch();

    // Other work on the machine skews every figure: record how busy it was.
    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} cores; load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg().trim()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("server.db");
    let setup = Instant::now();
    let (key, users) = {
        let accounts = Accounts::open(&db).expect("db");
        let users: Vec<UserName> = (0..total).map(user).collect();
        for u in &users {
            accounts.add_user(u).expect("add user");
        }
        (accounts.token_key().expect("key"), users)
    };
    eprintln!("{total} accounts created in {:.1?}", setup.elapsed());

    let bin = env!("CARGO_BIN_EXE_brume");
    let mut server = ChildGuard(
        Command::new(bin)
            .args(["server", "--listen", "127.0.0.1:0", "--db"])
            .arg(&db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start brume server"),
    );
    let pid = server.0.id();
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read address");
    let addr: SocketAddr = line
        .trim()
        .trim_start_matches("brume server listening on ws://")
        .trim_end_matches('/')
        .parse()
        .expect("server address");
    let rss_start = proc_status_kib(pid, "VmRSS:");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let (phase_tx, phase_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Bounds concurrent handshakes so the accept queue never overflows.
        let handshakes = std::sync::Arc::new(Semaphore::new(256));
        let connected = Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1024);
        for (i, u) in users.iter().enumerate() {
            let i = i as u64;
            let token = key.mint(u, now, now + 3600).expect("token");
            let identity = SigningKey::from_bytes(blake3::hash(u.as_str().as_bytes()).as_bytes());
            let who = u.clone();
            let partner = if i < pairs {
                Some(user(i + pairs))
            } else if i < 2 * pairs {
                Some(user(i - pairs))
            } else {
                None
            };
            let handshakes = handshakes.clone();
            let (phase_rx, stop_rx, ready_tx) = (phase_rx.clone(), stop_rx.clone(), ready_tx.clone());
            // One task per connection, like one client each.
            tasks.push(tokio::spawn(async move {
                let permit = handshakes.acquire_owned().await.expect("semaphore");
                let ws = connect(addr, &token, &who, &identity).await;
                drop(permit);
                let _ = ready_tx.send(()).await;
                drive(ws, partner, i < pairs, window, phase_rx, stop_rx).await
            }));
        }
        drop(ready_tx);
        for _ in 0..total {
            ready_rx.recv().await.expect("all connections");
        }
        let connect_time = connected.elapsed();
        // Let allocations settle (freed handshake buffers) before sampling memory.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_idle = proc_status_kib(pid, "VmRSS:");
        println!("## idle connections");
        println!("connections: {total} (authenticated, hello/welcome done) in {connect_time:.1?}");
        println!(
            "server RSS: {:.1} MiB with {total} connections (empty server: {:.1} MiB, {:.1} KiB per connection)",
            rss_idle as f64 / 1024.0,
            rss_start as f64 / 1024.0,
            (rss_idle - rss_start.min(rss_idle)) as f64 / total as f64
        );

        println!("## relay between {pairs} active pairs ({} idle connections alongside)", total - 2 * pairs);
        let mut cpu = [0.0; 2];
        for (index, cpu) in cpu.iter_mut().enumerate() {
            let cpu_before = cpu_secs(pid);
            let start = Instant::now() + Duration::from_millis(500);
            let end = start + Duration::from_secs(secs);
            let period = (index == 1).then(|| Duration::from_secs_f64(2.0 * pairs as f64 / rate as f64));
            phase_tx.send_replace(Some(Phase { index, start, end, period }));
            tokio::time::sleep_until((end + Duration::from_millis(500)).into()).await;
            *cpu = (cpu_secs(pid) - cpu_before) / (secs as f64 + 1.0) * 100.0;
        }
        let rss_peak = proc_status_kib(pid, "VmHWM:");
        stop_tx.send_replace(true);
        let mut tallies = [Tally::default(), Tally::default()];
        for task in tasks {
            let [a, b] = task.await.expect("connection task");
            for (total, part) in tallies.iter_mut().zip([a, b]) {
                total.delivered += part.delivered;
                total.latencies_us.extend(part.latencies_us);
            }
        }
        assert_eq!(
            tallies[0].delivered + tallies[1].delivered,
            DELIVERED.load(Ordering::Relaxed)
        );
        report(
            &format!("closed loop, {window} in flight per pair"),
            secs,
            &mut tallies[0],
        );
        report(&format!("paced at {rate} messages/s"), secs, &mut tallies[1]);
        println!(
            "server CPU (% of one core): {:.0} closed loop, {:.0} paced; server peak RSS {:.1} MiB",
            cpu[0],
            cpu[1],
            rss_peak as f64 / 1024.0
        );
    });
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let status = server.0.wait().expect("server exit");
    println!(
        "server exited: {status}; load average at end: {}",
        loadavg().trim()
    );
}
