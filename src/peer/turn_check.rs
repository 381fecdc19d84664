//! Whether each TURN server works, for `brume status`.
//!
//! The WebRTC stack gathers relayed candidates quietly: a TURN server that
//! refuses the credentials, is down or does not answer simply yields none, and a
//! link comes up over whatever else works. So that users learn why their links
//! are not relayed when they need to be, each TURN server a link would use is
//! checked on its own: an `Allocate` with the link's credentials, released at
//! once. Servers that work are checked again every [`RECHECK_OK`], failing ones
//! every [`RECHECK_FAILED`], and any whose credentials change at once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rtc::stun::message::{CLASS_ERROR_RESPONSE, Getter, METHOD_ALLOCATE, Message};
use rtc::turn::client::{Client, ClientConfig, Event};
use serde::Serialize;
use tokio::net::UdpSocket;

use super::lock;
use super::turn_tcp::{Bridge, TurnUrl};

/// Longest a check waits for the server.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a server that works is checked again.
const RECHECK_OK: Duration = Duration::from_secs(600);
/// How often a server that failed is checked again.
const RECHECK_FAILED: Duration = Duration::from_secs(30);

/// One TURN server's state, as `brume status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayStatus {
    /// Whether the last check could allocate a relayed address.
    pub ok: bool,
    /// Why not, in one line naming the server (`TURN 401 from HOST:PORT (Unauthorized)`).
    pub problem: Option<String>,
    /// When it was last checked, in Unix seconds.
    pub checked_unix: u64,
}

/// A TURN server with the credentials to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentialed {
    pub(crate) url: TurnUrl,
    pub(crate) username: String,
    pub(crate) password: String,
}

impl Credentialed {
    /// How status names the server: `HOST:PORT`, with ` (TCP)` or ` (TLS)` when
    /// it is reached over a stream.
    pub(crate) fn name(&self) -> String {
        if self.url.stream {
            format!("{} ({})", self.url.server, self.url.transport())
        } else {
            self.url.server.clone()
        }
    }
}

/// The TURN servers among `servers` (as the stack is given them), with their
/// credentials.
pub(crate) fn turn_servers(
    servers: &[rtc::peer_connection::configuration::RTCIceServer],
) -> Vec<Credentialed> {
    let mut out = Vec::new();
    for s in servers {
        for url in &s.urls {
            if let Some(url) = TurnUrl::parse(url) {
                let c = Credentialed {
                    url,
                    username: s.username.clone(),
                    password: s.credential.clone(),
                };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Each TURN server's state, by [`Credentialed::name`].
pub(crate) type Relays = Arc<std::sync::Mutex<BTreeMap<String, RelayStatus>>>;

/// Checks every server `servers()` returns, again and again, into `status`,
/// until `servers()` returns `None`.
pub(crate) async fn watch(
    servers: impl Fn() -> Option<Vec<Credentialed>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    status: Relays,
) {
    // By server: the credentials last checked with, and when the next check is due.
    let mut checked: HashMap<String, (Credentialed, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // `None`: the peer links are gone.
        let Some(now_servers) = servers() else {
            return;
        };
        let names: Vec<String> = now_servers.iter().map(Credentialed::name).collect();
        checked.retain(|name, _| names.contains(name));
        lock(&status).retain(|name, _| names.contains(name));
        for server in now_servers {
            let name = server.name();
            let due = checked
                .get(&name)
                .is_none_or(|(last, at)| *last != server || Instant::now() >= *at);
            if !due {
                continue;
            }
            let result = check(&server, tls.clone()).await;
            let again = if result.is_ok() {
                RECHECK_OK
            } else {
                RECHECK_FAILED
            };
            // Logged when it changes: a server that stays down is checked every 30 s.
            let before = lock(&status).get(&name).map(|r| r.problem.clone());
            match (&result, before) {
                (Err(problem), Some(Some(was))) if *problem == was => {
                    tracing::debug!(%problem, "TURN server check failed again")
                }
                (Err(problem), _) => tracing::warn!(%problem, "TURN server check failed"),
                (Ok(()), Some(Some(_))) => {
                    tracing::info!(server = %name, "TURN server works again")
                }
                (Ok(()), _) => tracing::debug!(server = %name, "TURN server works"),
            }
            checked.insert(name.clone(), (server, Instant::now() + again));
            let entry = RelayStatus {
                ok: result.is_ok(),
                problem: result.err(),
                checked_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            lock(&status).insert(name, entry);
        }
    }
}

/// Allocates a relayed address on `server` and releases it; the problem in one
/// line if that fails.
pub(crate) async fn check(
    server: &Credentialed,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(), String> {
    let name = server.name();
    // A server reached over a stream is checked through a bridge, as links use it.
    let bridge = if server.url.stream {
        Some(
            Bridge::start(server.url.clone(), tls)
                .await
                .map_err(|e| format!("TURN server {name}: cannot bridge to it: {e}"))?,
        )
    } else {
        None
    };
    let target = match &bridge {
        Some(b) => b.local,
        None => tokio::net::lookup_host(&server.url.server)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| format!("TURN server {name}: cannot resolve {}", server.url.host))?,
    };
    let outcome = tokio::time::timeout(CHECK_TIMEOUT, allocate(target, server)).await;
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Refusal::Code(code, reason))) => Err(format!("TURN {code} from {name} ({reason})")),
        Ok(Err(Refusal::Other(why))) => Err(format!("TURN server {name}: {why}")),
        Err(_) => {
            let why = bridge
                .as_ref()
                .and_then(Bridge::problem)
                .unwrap_or_else(|| format!("no answer in {} s", CHECK_TIMEOUT.as_secs()));
            Err(format!("TURN server {name}: {why}"))
        }
    }
}

/// Why an allocation failed.
enum Refusal {
    /// The server's error response: its code and reason phrase.
    Code(u16, String),
    /// Anything else.
    Other(String),
}

/// Allocates on the server at `target` and releases the allocation.
async fn allocate(target: SocketAddr, server: &Credentialed) -> Result<(), Refusal> {
    let other = |e: &dyn std::fmt::Display| Refusal::Other(e.to_string());
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await.map_err(|e| other(&e))?;
    let local = socket.local_addr().map_err(|e| other(&e))?;
    let crypto = rtc::crypto::default_provider().map_err(|e| other(&e))?;
    let mut client = Client::new(
        ClientConfig {
            stun_serv_addr: String::new(),
            turn_serv_addr: target.to_string(),
            local_addr: local,
            transport_protocol: TransportProtocol::UDP,
            username: server.username.clone(),
            password: server.password.clone(),
            realm: String::new(),
            software: String::new(),
            rto_in_ms: 0,
            allocation_refresh_interval_cap: None,
        },
        crypto,
    )
    .map_err(|e| other(&e))?;
    client.allocate(Instant::now()).map_err(|e| other(&e))?;
    // The server's last error answer: the challenge first, then a refusal.
    let mut refused = None;
    let mut buf = vec![0u8; 2048];
    loop {
        flush(&mut client, &socket).await;
        while let Some(event) = client.poll_event() {
            match event {
                Event::AllocateResponse(_, relayed) => {
                    // Released at once; the answer does not matter.
                    if let Ok(mut relay) = client.relay(relayed) {
                        let _ = relay.close(Instant::now());
                    }
                    flush(&mut client, &socket).await;
                    return Ok(());
                }
                Event::AllocateError(_, e) => {
                    return Err(refused.unwrap_or_else(|| Refusal::Other(e.to_string())));
                }
                Event::TransactionTimeout(_) => {
                    return Err(Refusal::Other(format!(
                        "no answer in {} s",
                        CHECK_TIMEOUT.as_secs()
                    )));
                }
                _ => {}
            }
        }
        let wake = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + CHECK_TIMEOUT);
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else {
                    // An ICMP error from an earlier send; the check times out if
                    // nothing else arrives.
                    continue;
                };
                if let Some(code) = error_code(&buf[..n]) {
                    refused = Some(code);
                }
                let _ = client.handle_read(TaggedBytesMut {
                    now: Instant::now(),
                    transport: TransportContext {
                        local_addr: local,
                        peer_addr: from,
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: BytesMut::from(&buf[..n]),
                });
            }
            () = tokio::time::sleep_until(wake.into()) => {
                let _ = client.handle_timeout(Instant::now());
            }
        }
    }
}

/// Sends what the client has queued.
async fn flush(client: &mut Client, socket: &UdpSocket) {
    while let Some(out) = client.poll_write() {
        let _ = socket.send_to(&out.message, out.transport.peer_addr).await;
    }
}

/// The error code and reason of an `Allocate` error answer; `None` for any
/// other message.
fn error_code(msg: &[u8]) -> Option<Refusal> {
    let mut m = Message::new();
    m.unmarshal_binary(msg).ok()?;
    if m.typ.method != METHOD_ALLOCATE || m.typ.class != CLASS_ERROR_RESPONSE {
        return None;
    }
    let mut code = rtc::stun::error_code::ErrorCodeAttribute::default();
    code.get_from(&m).ok()?;
    Some(Refusal::Code(
        code.code.0,
        String::from_utf8_lossy(&code.reason).trim().to_owned(),
    ))
}
