//! TURN over TCP and TLS, for networks that let no UDP out.
//!
//! The WebRTC stack speaks TURN over UDP only. For each `turn:HOST:PORT?transport=tcp`
//! or `turns:HOST:PORT` server, a link runs a [`Bridge`]: a UDP socket on loopback that
//! the stack is given as a plain `turn:` server, and, for each local socket that talks
//! to it, one TCP (or TLS) connection to the real server carrying the same messages.
//! On a stream, STUN messages delimit themselves and ChannelData messages are padded
//! to a multiple of four bytes (RFC 8656 §12.5); nothing else changes, so the TURN
//! server sees an ordinary client over TCP and the allocation relays UDP as usual.
//!
//! A bridge lives as long as its link: dropping it closes its connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::lock;

/// Longest wait for the TCP (and TLS) connection to the TURN server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued for one connection while it is being made or is slow; more
/// are dropped, as UDP would drop them (TURN and ICE retransmit).
const QUEUE: usize = 256;
/// The largest message either way: a STUN message or ChannelData carries at
/// most 65,535 bytes after its header.
const MAX_MESSAGE: usize = 4 + 65_535 + 3;

/// A TURN server address as `brume.conf` or the signaling server gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TurnUrl {
    /// `HOST:PORT` (an IPv6 host in brackets).
    pub(crate) server: String,
    /// The host alone, as the TLS server name.
    pub(crate) host: String,
    /// Reached over a stream (TCP or TLS) rather than UDP.
    pub(crate) stream: bool,
    /// Over TLS (`turns:`).
    pub(crate) tls: bool,
}

impl TurnUrl {
    /// Parses `turn:HOST[:PORT][?transport=udp|tcp]` or `turns:HOST[:PORT][?transport=tcp]`;
    /// `None` for anything else (STUN, malformed).
    pub(crate) fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once(':')?;
        let tls = match scheme {
            "turn" => false,
            "turns" => true,
            _ => return None,
        };
        let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
        let transport = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("transport="))
            .unwrap_or(if tls { "tcp" } else { "udp" });
        let stream = match transport {
            "udp" if !tls => false,
            "tcp" => true,
            _ => return None,
        };
        let default_port = if tls { 5349 } else { 3478 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (host.to_owned(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse::<u16>().ok()?),
                None => (hostport.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return None;
        }
        let server = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(Self {
            server,
            host,
            stream,
            tls,
        })
    }

    /// How the server is reached, for status: `TCP`, `TLS` or `UDP`.
    pub(crate) fn transport(&self) -> &'static str {
        match (self.stream, self.tls) {
            (_, true) => "TLS",
            (true, false) => "TCP",
            (false, false) => "UDP",
        }
    }
}

/// A loopback UDP stand-in for a TURN server reached over TCP or TLS.
pub(crate) struct Bridge {
    /// Where the WebRTC stack sends its TURN messages (`127.0.0.1:PORT`).
    pub(crate) local: SocketAddr,
    task: JoinHandle<()>,
    /// The connections' tasks, aborted with the bridge.
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// What its connections saw, for status.
    notes: Notes,
}

/// What a bridge's connections saw, shared with them.
type Notes = Arc<Mutex<Seen>>;

#[derive(Default)]
struct Seen {
    /// The addresses the server allocated through the bridge, as its `Allocate`
    /// answers gave them: how a relayed path is told to go through it.
    relayed: Vec<SocketAddr>,
    /// Why the last connection to the server failed, if it did.
    problem: Option<String>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
        for c in lock(&self.conns).drain(..) {
            c.abort();
        }
    }
}

impl Bridge {
    /// Starts a bridge to the stream-reached TURN server `url`; `tls` is how
    /// a `turns:` server's certificate is checked.
    pub(crate) async fn start(
        url: TurnUrl,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(("127.0.0.1", 0)).await?);
        let local = socket.local_addr()?;
        let conns = Arc::new(Mutex::new(Vec::new()));
        let notes = Notes::default();
        let task = tokio::spawn(serve(socket, url, tls, conns.clone(), notes.clone()));
        Ok(Self {
            local,
            task,
            conns,
            notes,
        })
    }

    /// Whether the server allocated `addr` through this bridge.
    pub(crate) fn allocated(&self, addr: SocketAddr) -> bool {
        lock(&self.notes).relayed.contains(&addr)
    }

    /// Why the last connection to the server failed, if it did.
    pub(crate) fn problem(&self) -> Option<String> {
        lock(&self.notes).problem.clone()
    }

    /// The `turn:` URL the WebRTC stack is given instead of the real one.
    pub(crate) fn stand_in(&self) -> String {
        format!("turn:{}?transport=udp", self.local)
    }
}

/// Reads datagrams from the stack and hands each to the connection of its
/// sender, made on its first datagram.
async fn serve(
    socket: Arc<UdpSocket>,
    url: TurnUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    notes: Notes,
) {
    let mut senders: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here; the socket lives on.
                debug!(cause = %e, "TURN bridge receive");
                continue;
            }
        };
        senders.retain(|_, tx| !tx.is_closed());
        let tx = senders.entry(from).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let task = tokio::spawn(connection(
                socket.clone(),
                from,
                url.clone(),
                tls.clone(),
                rx,
                notes.clone(),
            ));
            let mut conns = lock(&conns);
            conns.retain(|c| !c.is_finished());
            conns.push(task);
            tx
        });
        // A full queue drops the datagram, as a congested UDP path would.
        let _ = tx.try_send(buf[..n].to_vec());
    }
}

/// One local socket's connection to the server: datagrams out as stream
/// messages, stream messages back as datagrams.
async fn connection(
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    url: TurnUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    rx: mpsc::Receiver<Vec<u8>>,
    notes: Notes,
) {
    // At debug: status names the problem once per check, and links retry.
    let failed = |why: String| {
        debug!(server = %url.server, transport = url.transport(), problem = %why, "TURN bridge");
        lock(&notes).problem = Some(why);
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&url.server)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return failed(format!("cannot connect: {e}")),
        Err(_) => {
            return failed(format!(
                "no answer to connect in {} s",
                CONNECT_TIMEOUT.as_secs()
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        lock(&notes).problem = None;
        return pump(tcp, socket, peer, rx, notes).await;
    }
    let config = match tls {
        Some(c) => c,
        None => match crate::signal::tls::client_config(None) {
            Ok(c) => c,
            Err(e) => return failed(format!("no TLS configuration: {e}")),
        },
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(url.host.clone()) else {
        return failed(format!("{} is not a TLS server name", url.host));
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            lock(&notes).problem = None;
            pump(stream, socket, peer, rx, notes).await
        }
        // A certificate problem reads as one: rustls says "invalid peer certificate: …".
        Ok(Err(e)) => failed(format!("TLS failed: {e}")),
        Err(_) => failed(format!("no TLS answer in {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// Moves messages both ways until either side ends.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    notes: Notes,
) {
    let (mut read, mut write) = tokio::io::split(stream);
    let outbound = async {
        while let Some(mut msg) = rx.recv().await {
            pad(&mut msg);
            if write.write_all(&msg).await.is_err() {
                return;
            }
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match next_message(&mut read, &mut buf).await {
                Ok(Some(n)) => {
                    if let Some(addr) = allocated_address(&buf[..n]) {
                        lock(&notes).relayed.push(addr);
                    }
                    let _ = socket.send_to(&buf[..n], peer).await;
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(cause = %e, "TURN stream ended");
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = outbound => {}
        () = inbound => {}
    }
}

/// The relayed address in a successful `Allocate` answer; `None` for any
/// other message.
fn allocated_address(msg: &[u8]) -> Option<SocketAddr> {
    use rtc::stun::message::{CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE, Message};
    // The message type is in the first two bytes: skip everything else unparsed.
    let typ = u16::from_be_bytes([*msg.first()?, *msg.get(1)?]);
    if typ != 0x0103 {
        return None;
    }
    let mut m = Message::new();
    m.unmarshal_binary(msg).ok()?;
    if m.typ.method != METHOD_ALLOCATE || m.typ.class != CLASS_SUCCESS_RESPONSE {
        return None;
    }
    let mut relayed = rtc::turn::proto::relayaddr::RelayedAddress::default();
    relayed.get_from(&m).ok()?;
    Some(SocketAddr::new(relayed.ip, relayed.port))
}

/// Whether a message is ChannelData (its first two bits are `01`).
fn is_channel_data(msg: &[u8]) -> bool {
    msg.first().is_some_and(|b| b >> 6 == 0b01)
}

/// Pads ChannelData to a multiple of four bytes, as a stream requires.
fn pad(msg: &mut Vec<u8>) {
    if is_channel_data(msg) {
        msg.resize(msg.len().div_ceil(4) * 4, 0);
    }
}

/// Reads the next message of the stream into `buf`; its length without padding,
/// or `None` at the stream's clean end.
async fn next_message<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut header = [0u8; 4];
    match read.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (len, padded) = framing(header)?;
    buf[..4].copy_from_slice(&header);
    read.read_exact(&mut buf[4..padded]).await?;
    Ok(Some(len))
}

/// From a message's first four bytes: its length without and with padding.
fn framing(header: [u8; 4]) -> std::io::Result<(usize, usize)> {
    let body = usize::from(u16::from_be_bytes([header[2], header[3]]));
    match header[0] >> 6 {
        // STUN: a 20-byte header; the body is a multiple of four already.
        0b00 => Ok((20 + body, 20 + body)),
        0b01 => Ok((4 + body, (4 + body).div_ceil(4) * 4)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "neither STUN nor ChannelData from the TURN server",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_say_how_the_server_is_reached() {
        let tcp = TurnUrl::parse("turn:10.0.0.1:3478?transport=tcp").unwrap();
        assert_eq!(tcp.server, "10.0.0.1:3478");
        assert!(tcp.stream && !tcp.tls);
        assert_eq!(tcp.transport(), "TCP");
        let udp = TurnUrl::parse("turn:relay.example").unwrap();
        assert_eq!(udp.server, "relay.example:3478");
        assert!(!udp.stream);
        let tls = TurnUrl::parse("turns:[2001:db8::1]?transport=tcp").unwrap();
        assert_eq!(tls.server, "[2001:db8::1]:5349");
        assert_eq!(tls.host, "2001:db8::1");
        assert!(tls.stream && tls.tls);
        for bad in [
            "stun:10.0.0.1:3478",
            "turn:",
            "turn:h:notaport",
            "turns:h?transport=udp",
            "turn:h?transport=sctp",
        ] {
            assert_eq!(TurnUrl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn channel_data_is_padded_and_stun_is_not() {
        let mut cd = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5];
        pad(&mut cd);
        assert_eq!(cd.len(), 12);
        assert_eq!(framing([0x40, 0x00, 0x00, 0x05]).unwrap(), (9, 12));
        let mut stun = vec![0u8; 28];
        stun[3] = 8;
        pad(&mut stun);
        assert_eq!(stun.len(), 28);
        assert_eq!(framing([0x00, 0x01, 0x00, 0x08]).unwrap(), (28, 28));
        assert!(framing([0x80, 0, 0, 0]).is_err());
    }

    #[tokio::test]
    async fn a_stream_of_messages_comes_back_as_the_datagrams_they_were() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut cd = vec![0x40, 0x01, 0x00, 0x03, 7, 8, 9];
        pad(&mut cd);
        let stun = {
            let mut m = vec![0u8; 24];
            m[1] = 1;
            m[3] = 4;
            m
        };
        a.write_all(&cd).await.unwrap();
        a.write_all(&stun).await.unwrap();
        drop(a);
        let mut buf = vec![0u8; MAX_MESSAGE];
        assert_eq!(next_message(&mut b, &mut buf).await.unwrap(), Some(7));
        assert_eq!(&buf[..7], &[0x40, 0x01, 0x00, 0x03, 7, 8, 9]);
        assert_eq!(next_message(&mut b, &mut buf).await.unwrap(), Some(24));
        assert_eq!(&buf[..24], &stun[..]);
        assert_eq!(next_message(&mut b, &mut buf).await.unwrap(), None);
    }
}
