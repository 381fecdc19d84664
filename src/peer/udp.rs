//! The peer link's UDP sockets: a webrtc runtime that asks the kernel for a large
//! receive buffer on every socket a connection binds, and the SCTP receive window that
//! such a buffer can hold.
//!
//! SCTP lets the peer have one receive window of data in flight. When the path is faster
//! than this side reads (loopback, a fast LAN, a busy machine), those datagrams wait in
//! the socket's kernel buffer until the connection's driver reads them, so a window
//! larger than that buffer overflows it. With Linux's default buffer (208 KiB, charged
//! about twice per datagram's payload) and the 8 MiB window the link advertised, every
//! bulk transfer lost datagrams this way, and each loss that SCTP could not repair by fast
//! retransmit stalled the channel for a retransmission timeout of at least one second
//! (webrtc 0.21's `RTO_MIN`): a 512 MiB transfer spent up to half of its 4–9 s in such
//! stalls.
//!
//! So every socket asks for [`WANTED_RECEIVE_BUFFER`] (the kernel grants at most
//! `net.core.rmem_max`, doubled for its bookkeeping, unless the daemon has
//! `CAP_NET_ADMIN`, as when it runs as root), and the window this side advertises
//! is half of what a socket is granted, within [`MIN_WINDOW`]..=[`MAX_WINDOW`]. On a
//! machine whose `rmem_max` is the default, that is a 208 KiB window: enough for loopback
//! and LAN, but a path with a long round trip then carries at most a window per round trip
//! (about 20 MB/s at 10 ms). Raising `net.core.rmem_max` to 8 MiB lifts it to
//! [`MAX_WINDOW`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, info};
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

/// The kernel receive buffer every socket asks for: what [`MAX_WINDOW`] needs once the
/// kernel has doubled it.
const WANTED_RECEIVE_BUFFER: usize = 8 << 20;
/// Largest SCTP receive window: large enough to keep a fast path full.
const MAX_WINDOW: usize = 8 << 20;
/// Smallest SCTP receive window: two of the largest frames (64 KiB each), so that a
/// whole frame always fits.
const MIN_WINDOW: usize = 128 << 10;
const _: () = assert!(MIN_WINDOW >= 2 * super::wire::MAX_FRAME);
/// What a socket is assumed to be granted when the probe fails: Linux's default, doubled.
const DEFAULT_GRANTED: usize = 2 * 212_992;

/// The SCTP receive window of a connection that only relays: the smallest window.
/// coturn gives each relayed address a socket of 64 KiB, and a burst much larger
/// than that, forwarded at loopback speed, overflows it; the losses then cost far
/// more than the smaller window (measured through coturn on loopback: 256 MiB at
/// 97–104 MB/s with this window and no drops, against 5–13 MB/s with a 4 MiB one).
pub(crate) fn relay_window() -> u32 {
    receive_window().min(MIN_WINDOW as u32)
}

/// The SCTP receive window of every connection: half of the receive buffer a socket is
/// granted (each datagram costs the kernel about twice its payload), so the peer can
/// never have more in flight than the socket holds. Probed once per process.
pub(crate) fn receive_window() -> u32 {
    static WINDOW: OnceLock<u32> = OnceLock::new();
    *WINDOW.get_or_init(|| {
        let granted = probe().unwrap_or_else(|err| {
            debug!(cause = %err, "cannot probe the UDP receive buffer; assuming the default");
            DEFAULT_GRANTED
        });
        let window = window_for(granted);
        if (window as usize) < MAX_WINDOW {
            info!(
                granted,
                window,
                "UDP receive buffers are limited by net.core.rmem_max: the peer link's \
                 window is smaller than it could be (raise net.core.rmem_max to {WANTED_RECEIVE_BUFFER} \
                 for fast links with long round trips)"
            );
        }
        window
    })
}

/// The window a socket granted `granted` bytes of receive buffer can hold.
fn window_for(granted: usize) -> u32 {
    let window = (granted / 2).clamp(MIN_WINDOW, MAX_WINDOW);
    // MAX_WINDOW is far below u32::MAX.
    window as u32
}

/// The receive buffer a fresh socket is granted when it asks for
/// [`WANTED_RECEIVE_BUFFER`], on a throwaway loopback socket.
fn probe() -> io::Result<usize> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    enlarge_receive_buffer(&socket)
}

/// Asks for [`WANTED_RECEIVE_BUFFER`] on `socket`; returns what the kernel granted.
/// With `CAP_NET_ADMIN` (a daemon running as root) the size is forced past
/// `net.core.rmem_max`; otherwise the kernel caps it there.
fn enlarge_receive_buffer(socket: &std::net::UdpSocket) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    let wanted = libc::c_int::try_from(WANTED_RECEIVE_BUFFER).unwrap_or(libc::c_int::MAX);
    let int_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let set = |option| {
        // SAFETY: `fd` is an open socket for the duration of the call, and the
        // option value points to a c_int of the length given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&wanted as *const libc::c_int).cast(),
                int_len,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) != 0 && set(libc::SO_RCVBUF) != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut granted: libc::c_int = 0;
    let mut len = int_len;
    // SAFETY: as above; the kernel writes at most `len` bytes into `granted`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut granted as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(granted).unwrap_or(0))
}

/// webrtc's tokio runtime, except that every UDP socket a connection binds first asks
/// for a large receive buffer (see the module's documentation), and that each
/// datagram its sockets receive is announced on `received` (when set).
#[derive(Debug, Default)]
pub(crate) struct SizedSockets {
    pub(crate) received: Option<Arc<tokio::sync::Notify>>,
    /// Paces what the sockets send to relays.
    pub(crate) pacer: Option<Arc<Pacer>>,
}

/// Most bytes per second sent to one relay address. Measured through coturn on
/// loopback with 16 KB bursts: 64 MB/s gave 58 MB/s, 128 MB/s 85 MB/s, both without
/// a drop; 256 MB/s 89 MB/s, but one run in three overflowed coturn and collapsed.
const RELAY_RATE: f64 = 128e6;
/// Longest burst sent to a relay at once, in time at [`RELAY_RATE`]: 16 KB, a quarter
/// of the 64 KiB socket coturn gives each relayed address (bursts of 32 KB collapsed
/// at 128 MB/s).
const RELAY_BURST: Duration = Duration::from_micros(125);

/// Paces datagrams to TURN relays.
///
/// coturn forwards a burst as fast as it arrives into a relayed address's 64 KiB
/// socket, and what does not fit is lost; webrtc's SCTP then waits a second or more
/// per loss. Datagrams to the addresses a link relays through therefore leave at
/// most [`RELAY_RATE`], in bursts of at most [`RELAY_BURST`]; all others as they come.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    targets: std::sync::Mutex<Vec<SocketAddr>>,
    state: std::sync::Mutex<Paced>,
}

#[derive(Debug, Default)]
struct Paced {
    /// When everything sent so far has left at the paced rate.
    free_at: Option<Instant>,
}

impl Pacer {
    /// Paces datagrams to `addr` from now on.
    pub(crate) fn pace(&self, addr: SocketAddr) {
        let mut targets = super::lock(&self.targets);
        if !targets.contains(&addr) {
            targets.push(addr);
        }
    }

    /// Ready when `len` bytes may leave for `to`, and counts them.
    fn poll_room(
        &self,
        cx: &mut std::task::Context<'_>,
        to: SocketAddr,
        len: usize,
    ) -> std::task::Poll<()> {
        if !super::lock(&self.targets).contains(&to) {
            return std::task::Poll::Ready(());
        }
        let mut st = super::lock(&self.state);
        let now = Instant::now();
        let free_at = st.free_at.unwrap_or(now).max(now);
        if free_at > now + RELAY_BURST {
            fine_timer().wake_at(free_at - RELAY_BURST, cx.waker());
            return std::task::Poll::Pending;
        }
        st.free_at = Some(free_at + Duration::from_secs_f64(len as f64 / RELAY_RATE));
        std::task::Poll::Ready(())
    }
}

/// Wakes tasks at instants finer than tokio's timers, which round up to the next
/// millisecond: a pacer waking once per millisecond could send at most one burst per
/// millisecond. One thread for the process, asleep while nothing waits.
#[derive(Debug, Default)]
struct FineTimer {
    waiting: std::sync::Mutex<Vec<(Instant, std::task::Waker)>>,
    changed: std::sync::Condvar,
}

fn fine_timer() -> &'static FineTimer {
    static TIMER: OnceLock<&'static FineTimer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static FineTimer = Box::leak(Box::default());
        let spawned = std::thread::Builder::new()
            .name("brume-pacer".into())
            .spawn(move || timer.run());
        if let Err(err) = spawned {
            // Without the thread nothing wakes the waiting sends: fail loudly.
            panic!("cannot start the pacing timer thread: {err}");
        }
        timer
    })
}

impl FineTimer {
    fn wake_at(&self, at: Instant, waker: &std::task::Waker) {
        let mut waiting = super::lock(&self.waiting);
        match waiting.iter_mut().find(|(_, w)| w.will_wake(waker)) {
            Some(entry) => entry.0 = entry.0.min(at),
            None => waiting.push((at, waker.clone())),
        }
        drop(waiting);
        self.changed.notify_one();
    }

    fn run(&self) {
        // The kernel may otherwise let a timed wait overrun by its default slack of
        // 50 µs, a tenth of a burst.
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only the
        // calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut waiting = super::lock(&self.waiting);
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            waiting.retain(|(at, w)| {
                if *at <= now {
                    due.push(w.clone());
                    false
                } else {
                    true
                }
            });
            if !due.is_empty() {
                drop(waiting);
                due.into_iter().for_each(std::task::Waker::wake);
                waiting = super::lock(&self.waiting);
                continue;
            }
            waiting = match waiting.iter().map(|(at, _)| *at).min() {
                Some(next) => {
                    self.changed
                        .wait_timeout(waiting, next - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(waiting)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            };
        }
    }
}

impl Runtime for SizedSockets {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        // Without it the socket still works, with the default buffer and losses as
        // described above; the window was sized from the same request.
        if let Err(err) = enlarge_receive_buffer(&socket) {
            debug!(cause = %err, "cannot enlarge a UDP receive buffer");
        }
        let inner = TokioRuntime.wrap_udp_socket(socket)?;
        Ok(Arc::new(WholeGsoSends(
            inner,
            self.received.clone(),
            self.pacer.clone(),
        )))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        TokioRuntime.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        TokioRuntime.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        TokioRuntime.resolve_host(host)
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        TokioRuntime.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        TokioRuntime.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.yield_now()
    }

    fn name(&self) -> &'static str {
        TokioRuntime.name()
    }
}

/// Most datagrams in one GSO send. webrtc 0.21 batches up to 64 datagrams as long as
/// they add up to at most 65,535 bytes, but the kernel refuses (`EMSGSIZE`) a UDP
/// send of more than 65,507 bytes over IPv4: a batch of 54 datagrams of 1,213 bytes
/// or more was lost whole, and when its retransmissions were batched the same way,
/// the association stalled until SCTP gave up. 44 datagrams of up to 1,488 bytes
/// (a 1,500-byte MTU's worth) always fit.
const MAX_GSO_SEGMENTS: usize = 65_507 / 1_488;

/// A socket that never offers more GSO segments than [`MAX_GSO_SEGMENTS`], and
/// announces what it receives.
#[derive(Debug)]
struct WholeGsoSends(
    Arc<dyn AsyncUdpSocket>,
    Option<Arc<tokio::sync::Notify>>,
    Option<Arc<Pacer>>,
);

impl AsyncUdpSocket for WholeGsoSends {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn poll_send(
        &self,
        cx: &mut std::task::Context<'_>,
        transmit: &Transmit<'_>,
    ) -> std::task::Poll<io::Result<usize>> {
        if let Some(pacer) = &self.2
            && pacer
                .poll_room(cx, transmit.destination, transmit.contents.len())
                .is_pending()
        {
            return std::task::Poll::Pending;
        }
        self.0.poll_send(cx, transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> std::task::Poll<io::Result<usize>> {
        let got = self.0.poll_recv(cx, bufs, meta);
        if let (Some(received), std::task::Poll::Ready(Ok(n))) = (&self.1, &got)
            && *n > 0
        {
            received.notify_one();
        }
        got
    }

    fn max_gso_segments(&self) -> usize {
        self.0.max_gso_segments().min(MAX_GSO_SEGMENTS)
    }

    fn max_gro_segments(&self) -> usize {
        self.0.max_gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_relay_addresses_are_paced_and_their_bursts_are_bounded() {
        let pacer = Pacer::default();
        let relay: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let peer: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        pacer.pace(relay);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..10_000 {
            assert!(pacer.poll_room(&mut cx, peer, 1200).is_ready());
        }
        let mut sent = 0usize;
        let started = Instant::now();
        while pacer.poll_room(&mut cx, relay, 1200).is_ready() {
            sent += 1200;
            assert!(sent < 1 << 20, "the relay is not paced");
        }
        // One burst's worth leaves at once (a little more as the clock moves).
        let burst = RELAY_RATE * RELAY_BURST.as_secs_f64();
        let moved = RELAY_RATE * started.elapsed().as_secs_f64();
        assert!(
            sent as f64 >= burst && sent as f64 <= burst + moved + 1_200.0,
            "{sent} bytes in the first burst"
        );
        // Other destinations are not held back by it.
        assert!(pacer.poll_room(&mut cx, peer, 1200).is_ready());
    }

    #[tokio::test]
    async fn paced_sends_are_woken_and_keep_to_the_rate() {
        let pacer = Pacer::default();
        let relay: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        pacer.pace(relay);
        let total = 4 << 20;
        let started = Instant::now();
        for _ in 0..total / 1200 {
            std::future::poll_fn(|cx| pacer.poll_room(cx, relay, 1200)).await;
        }
        // Everything beyond the first burst waited for the rate; nothing hung.
        let least = (total as f64 - RELAY_RATE * RELAY_BURST.as_secs_f64()) / RELAY_RATE;
        let took = started.elapsed().as_secs_f64();
        assert!(took >= least * 0.99, "{total} bytes in {took} s");
    }

    #[test]
    fn the_largest_gso_send_offered_is_one_the_kernel_takes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let to = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            from.set_nonblocking(true).unwrap();
            let socket = SizedSockets::default().wrap_udp_socket(from).unwrap();
            let segments = socket.max_gso_segments();
            if segments <= 1 {
                eprintln!("skipped: no UDP GSO here");
                return;
            }
            // Full-MTU datagrams, as many as offered: the kernel must take them.
            let contents = vec![7u8; segments * 1_488];
            let transmit = Transmit {
                destination: to.local_addr().unwrap(),
                ecn: None,
                contents: &contents,
                segment_size: Some(1_488),
                src_ip: None,
            };
            let sent = std::future::poll_fn(|cx| socket.poll_send(cx, &transmit)).await;
            assert_eq!(sent.unwrap(), contents.len());
        });
    }

    #[test]
    fn the_window_is_half_the_granted_buffer_within_bounds() {
        // Linux's default buffer, doubled by the kernel.
        assert_eq!(window_for(2 * 212_992), 212_992);
        assert_eq!(window_for(2 * MAX_WINDOW), MAX_WINDOW as u32);
        assert_eq!(window_for(usize::MAX), MAX_WINDOW as u32);
        assert_eq!(window_for(0), MIN_WINDOW as u32);
    }

    #[test]
    fn the_window_fits_in_what_a_socket_is_granted() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let granted = enlarge_receive_buffer(&socket).unwrap();
        // At least what the kernel grants without asking, at most what was asked for
        // (doubled by the kernel).
        assert!(granted >= 4096, "{granted}");
        assert!(granted <= 2 * WANTED_RECEIVE_BUFFER, "{granted}");
        let window = receive_window() as usize;
        assert!(
            window == MIN_WINDOW || 2 * window <= granted,
            "{window} / {granted}"
        );
    }
}
