//! The userspace network stack: smoltcp at the node's tunnel addresses (IPv4 and IPv6), TCP streams
//! and listeners on it that implement tokio's `AsyncRead`/`AsyncWrite`, and UDP sockets.
//!
//! The stack is shared between the data plane task, which feeds it decrypted packets and polls it, and
//! the streams, which read and write socket buffers directly under a short lock and then wake the data
//! plane. No packet or byte crosses a channel between them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

/// Tunnel MTU: WireGuard over IPv4 leaves 1420 bytes of a 1500-byte path.
pub const MTU: usize = 1420;

/// Socket buffer sizes and listen backlog. Throughput is about buffer / RTT; memory is buffers x
/// sockets, so a node that exists by the thousand (the gateway) uses small ones.
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    /// Bytes per direction per TCP connection.
    pub tcp_buffer: usize,
    /// Listening sockets kept per port, so that connections arriving together are all accepted.
    pub spare_listeners: usize,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig { tcp_buffer: 2048 * 1024, spare_listeners: 4 }
    }
}

/// Segments one poll emits at most.
const EGRESS_BATCH: usize = 512;

/// Connections being opened (SYN received, not yet established) per listening port, at most: the
/// kernel's default backlog (`somaxconn`, 4096 since Linux 5.4) is far above a burst of a few hundred
/// agents connecting at once; past this, SYNs are refused.
const MAX_HALF_OPEN: usize = 1024;

/// Packets between the stack and the tunnel.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

impl Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

struct RxToken(Vec<u8>);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

struct Listening {
    sockets: Vec<SocketHandle>,
    accepted: mpsc::UnboundedSender<SocketHandle>,
}

pub(crate) struct Inner {
    iface: Interface,
    device: Queues,
    sockets: SocketSet<'static>,
    listeners: HashMap<u16, Listening>,
    /// Sockets whose stream was dropped; removed once closed.
    orphans: Vec<Orphan>,
    address: Ipv4Addr,
    next_port: u16,
    /// Ports with a bound UDP socket.
    udp_ports: HashMap<u16, SocketHandle>,
    config: StackConfig,
}

/// The stack of one node.
pub struct Stack {
    inner: Mutex<Inner>,
    /// Wakes the data plane after a stream read or wrote.
    pub(crate) wake: Notify,
    epoch: std::time::Instant,
}

impl Stack {
    /// A stack at `address/prefix`, and at `ipv6` (address, prefix) when the tailnet has IPv6.
    pub fn new(
        address: Ipv4Addr,
        prefix: u8,
        ipv6: Option<(std::net::Ipv6Addr, u8)>,
        stack_config: StackConfig,
    ) -> Arc<Stack> {
        let mut device = Queues::default();
        let epoch = std::time::Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            addrs.push(IpCidr::new(IpAddress::Ipv4(address), prefix)).expect("two addresses fit");
            if let Some((v6, prefix)) = ipv6 {
                addrs.push(IpCidr::new(IpAddress::Ipv6(v6), prefix)).expect("two addresses fit");
            }
        });
        Arc::new(Stack {
            inner: Mutex::new(Inner {
                iface,
                device,
                sockets: SocketSet::new(Vec::new()),
                listeners: HashMap::new(),
                orphans: Vec::new(),
                address,
                next_port: 49152 + rand::random::<u16>() % 16_000,
                udp_ports: HashMap::new(),
                config: stack_config,
            }),
            wake: Notify::new(),
            epoch,
        })
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Hands the stack packets that arrived through the tunnel.
    pub(crate) fn deliver(&self, packets: impl IntoIterator<Item = Vec<u8>>) {
        self.inner.lock().unwrap().device.rx.extend(packets);
    }

    /// Runs the stack; returns the packets it wants sent and how long until it needs polling again.
    pub(crate) fn poll(&self, out: &mut Vec<Vec<u8>>) -> Option<Duration> {
        let now = self.now();
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        // One packet at a time, handing connected sockets to their listeners and opening fresh ones in
        // between: smoltcp has no backlog, so a burst of SYNs would otherwise find the spares used up.
        loop {
            match inner.iface.poll_ingress_single(now, &mut inner.device, &mut inner.sockets) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => inner.accept_ready(),
            }
        }
        // smoltcp emits at most one segment per socket per egress pass: keep passing, so one poll hands
        // the tunnel a batch of segments to encrypt and send together. The batch is capped so that the
        // peer starts decrypting the first segments while this node encrypts the next ones, instead of
        // the two taking turns over whole windows (what is left makes `poll_delay` zero).
        while inner.device.tx.len() < EGRESS_BATCH
            && inner.iface.poll_egress(now, &mut inner.device, &mut inner.sockets) == PollResult::SocketStateChanged
        {
        }
        inner.accept_ready();
        inner.reap_orphans();
        out.extend(inner.device.tx.drain(..));
        inner.iface.poll_delay(now, &inner.sockets).map(|d| Duration::from_micros(d.total_micros()))
    }

    pub fn listen(self: &Arc<Self>, port: u16) -> io::Result<Listener> {
        let mut inner = self.inner.lock().unwrap();
        if inner.listeners.contains_key(&port) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("port {port} is already listening")));
        }
        let (accepted, rx) = mpsc::unbounded_channel();
        let mut sockets = Vec::new();
        for _ in 0..inner.config.spare_listeners.max(1) {
            sockets.push(inner.listening_socket(port)?);
        }
        inner.listeners.insert(port, Listening { sockets, accepted });
        Ok(Listener { stack: self.clone(), port, accepted: rx })
    }

    pub async fn dial(self: &Arc<Self>, remote: SocketAddr) -> io::Result<TcpStream> {
        let handle = {
            let mut guard = self.inner.lock().unwrap();
            let inner = &mut *guard;
            let mut socket = new_socket(inner.config.tcp_buffer);
            let local_port = inner.ephemeral_port();
            let remote_ep = IpEndpoint::new(remote.ip().into(), remote.port());
            socket
                .connect(inner.iface.context(), remote_ep, local_port)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("connect to {remote}: {e}")))?;
            inner.sockets.add(socket)
        };
        self.wake.notify_one();
        let stream = TcpStream { stack: self.clone(), handle, peer: remote };
        let established = std::future::poll_fn(|cx| {
            let mut inner = self.inner.lock().unwrap();
            let socket = inner.sockets.get_mut::<tcp::Socket>(handle);
            match socket.state() {
                tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Closing | tcp::State::LastAck => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("{remote} refused"))))
                }
                _ => {
                    socket.register_send_waker(cx.waker());
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(15), established).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {remote} in 15 s"))),
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        self.inner.lock().unwrap().address
    }

    /// Binds a UDP socket to `port` of the node's addresses (0: an ephemeral port).
    pub fn bind_udp(self: &Arc<Self>, port: u16) -> io::Result<UdpSocket> {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let port = if port != 0 {
            port
        } else {
            let mut free = 0;
            for _ in 0..16_000 {
                let candidate = inner.ephemeral_port();
                if !inner.udp_ports.contains_key(&candidate) {
                    free = candidate;
                    break;
                }
            }
            free
        };
        if port == 0 || inner.udp_ports.contains_key(&port) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("UDP port {port} is already bound")));
        }
        let buffer = |packets: usize, bytes: usize| {
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes])
        };
        let mut socket = udp::Socket::new(buffer(UDP_PACKETS, UDP_BYTES), buffer(UDP_PACKETS, UDP_BYTES));
        socket.bind(port).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bind UDP {port}: {e}")))?;
        let handle = inner.sockets.add(socket);
        inner.udp_ports.insert(port, handle);
        Ok(UdpSocket { stack: self.clone(), handle, port })
    }
}

/// Datagrams and bytes a UDP socket queues per direction: what arrives while the reader is busy
/// beyond this is dropped, as a kernel socket's full receive buffer drops.
const UDP_PACKETS: usize = 512;
const UDP_BYTES: usize = 512 * 1024;

/// Converts smoltcp's endpoint to the standard one.
fn socket_addr(ep: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ep.addr), ep.port)
}

fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; buffer]), tcp::SocketBuffer::new(vec![0; buffer]));
    socket.set_nagle_enabled(false);
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
    socket
}

impl Inner {
    fn listening_socket(&mut self, port: u16) -> io::Result<SocketHandle> {
        let mut socket = new_socket(self.config.tcp_buffer);
        // No timer while listening; a connection that never completes its handshake is dropped after 10 s.
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(10)));
        socket.set_keep_alive(None);
        socket.listen(port).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("listen {port}: {e}")))?;
        Ok(self.sockets.add(socket))
    }

    fn ephemeral_port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 65_000 { 49152 } else { self.next_port + 1 };
        self.next_port
    }

    /// Moves listening sockets that received a connection to their listener, and keeps the configured
    /// number of sockets listening (a half-open connection holds its socket until it completes).
    fn accept_ready(&mut self) {
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let listening = self.listeners.get(&port).expect("port listed");
            let (mut ready, mut idle, mut half_open) = (Vec::new(), 0, 0);
            for &handle in &listening.sockets {
                match self.sockets.get::<tcp::Socket>(handle).state() {
                    tcp::State::Listen => idle += 1,
                    tcp::State::SynReceived => half_open += 1,
                    _ => ready.push(handle),
                }
            }
            let mut fresh = Vec::new();
            // A SYN flood stops growing the backlog here; further SYNs are refused until some complete.
            while idle + fresh.len() < self.config.spare_listeners.max(1) && half_open + fresh.len() < MAX_HALF_OPEN {
                match self.listening_socket(port) {
                    Ok(h) => fresh.push(h),
                    Err(_) => break,
                }
            }
            let listening = self.listeners.get_mut(&port).expect("port listed");
            listening.sockets.retain(|h| !ready.contains(h));
            listening.sockets.extend(fresh);
            for handle in ready {
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
                socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
                if self.listeners[&port].accepted.send(handle).is_err() {
                    self.orphans.push(Orphan { handle, discarded: 0, since: std::time::Instant::now() });
                }
            }
        }
    }

    /// Removes closed orphans, and resets those that keep receiving data nobody will read, as a kernel
    /// socket does when data arrives after its close: the peer's send fails at once instead of stalling
    /// on a window that never opens (a client uploading a body the server refused). Before the reset
    /// the orphan lingers: it discards what arrives (so the window stays open) until what it still had to
    /// send is acknowledged, [`LINGER_BYTES`] more arrived and [`LINGER_TIME`] passed, so the peer has the
    /// answer (a 413, say) and the FIN after it before it sees the reset, and has had time to read them (a
    /// smoltcp socket that is reset loses what it received and nobody read yet).
    fn reap_orphans(&mut self) {
        let sockets = &mut self.sockets;
        self.orphans.retain_mut(|orphan| {
            let socket = sockets.get_mut::<tcp::Socket>(orphan.handle);
            if socket.may_recv() && socket.recv_queue() > 0 {
                orphan.discarded += socket.recv(|b| (b.len(), b.len())).unwrap_or(0);
            }
            if orphan.discarded > LINGER_BYTES
                && orphan.since.elapsed() >= LINGER_TIME
                && socket.send_queue() == 0
                && socket.state() != tcp::State::Closed
            {
                socket.abort();
            }
            // An aborted socket keeps its endpoint until its reset has gone out.
            let closed = socket.state() == tcp::State::Closed && socket.remote_endpoint().is_none();
            if closed {
                sockets.remove(orphan.handle);
            }
            !closed
        });
    }
}

/// A socket whose stream was dropped, closing; how many bytes arrived for it since, and when.
struct Orphan {
    handle: SocketHandle,
    discarded: usize,
    since: std::time::Instant,
}

/// Bytes an orphan takes in (and discards) before it resets the connection.
const LINGER_BYTES: usize = 256 * 1024;
/// And how long it lingers at least.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_millis(250);

/// Accepts TCP connections on one port of the node's address.
pub struct Listener {
    stack: Arc<Stack>,
    port: u16,
    accepted: mpsc::UnboundedReceiver<SocketHandle>,
}

impl Listener {
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let handle = self
            .accepted
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the node shut down"))?;
        let peer = {
            let inner = self.stack.inner.lock().unwrap();
            inner.sockets.get::<tcp::Socket>(handle).remote_endpoint()
        };
        let peer = peer.map_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), socket_addr);
        Ok((TcpStream { stack: self.stack.clone(), handle, peer }, peer))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut inner = self.stack.inner.lock().unwrap();
        if let Some(listening) = inner.listeners.remove(&self.port) {
            for handle in listening.sockets {
                inner.sockets.remove(handle);
            }
        }
    }
}

/// A TCP connection through the tunnel.
pub struct TcpStream {
    stack: Arc<Stack>,
    handle: SocketHandle,
    peer: SocketAddr,
}

impl TcpStream {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.stack.inner.lock().unwrap();
        let socket = inner.sockets.get_mut::<tcp::Socket>(self.handle);
        if socket.can_recv() {
            let n = socket
                .recv_slice(buf.initialize_unfilled())
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))?;
            buf.advance(n);
            drop(inner);
            // A read opens the window: let the data plane tell the peer.
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(()));
        }
        if !socket.may_recv() {
            return match socket.state() {
                tcp::State::Closed if socket.remote_endpoint().is_none() => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")))
                }
                _ => Poll::Ready(Ok(())),
            };
        }
        socket.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.stack.inner.lock().unwrap();
        let socket = inner.sockets.get_mut::<tcp::Socket>(self.handle);
        if !socket.may_send() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")));
        }
        if socket.can_send() {
            let n = socket.send_slice(data).map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
            drop(inner);
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        socket.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stack.inner.lock().unwrap().sockets.get_mut::<tcp::Socket>(self.handle).close();
        self.stack.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut inner = self.stack.inner.lock().unwrap();
        inner.sockets.get_mut::<tcp::Socket>(self.handle).close();
        inner.orphans.push(Orphan { handle: self.handle, discarded: 0, since: std::time::Instant::now() });
        drop(inner);
        self.stack.wake.notify_one();
    }
}

/// A UDP socket on the node's addresses.
pub struct UdpSocket {
    stack: Arc<Stack>,
    handle: SocketHandle,
    port: u16,
}

impl UdpSocket {
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// The next datagram: its length (at most `buf`'s; the rest is cut, as a kernel socket cuts) and
    /// who sent it.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        std::future::poll_fn(|cx| {
            let mut inner = self.stack.inner.lock().unwrap();
            let socket = inner.sockets.get_mut::<udp::Socket>(self.handle);
            match socket.recv() {
                Ok((data, meta)) => {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    Poll::Ready(Ok((n, socket_addr(meta.endpoint))))
                }
                // `recv` fails only when nothing is queued.
                Err(_) => {
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues one datagram to `to`; waits while the send queue is full.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        if data.len() > UDP_BYTES / 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {} byte datagram is too large", data.len()),
            ));
        }
        let remote = IpEndpoint::new(to.ip().into(), to.port());
        std::future::poll_fn(|cx| {
            let mut inner = self.stack.inner.lock().unwrap();
            let socket = inner.sockets.get_mut::<udp::Socket>(self.handle);
            match socket.send_slice(data, remote) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(udp::SendError::BufferFull) => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                Err(udp::SendError::Unaddressable) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot send to {to}"))))
                }
            }
        })
        .await?;
        self.stack.wake.notify_one();
        Ok(())
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let mut inner = self.stack.inner.lock().unwrap();
        inner.udp_ports.remove(&self.port);
        inner.sockets.remove(self.handle);
    }
}
