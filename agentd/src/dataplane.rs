//! The data plane's IO shell: one task per node that owns the UDP socket and the WireGuard engine and
//! moves packets between them and the local side (the userspace stack or a TUN device).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::filter::PacketFilter;
use crate::stack::Stack;
use crate::tun::Tun;
use crate::udp::Udp;
use crate::wg::{Drops, Engine, Event, Key, PeerConfig, PeerStats, Route, SharedIndices};

/// How many batched reads one wakeup makes before the stack runs.
const RECV_ROUNDS: usize = 8;

/// Where decrypted packets go and outbound packets come from.
pub enum Local {
    Stack(Arc<Stack>),
    Tun(Tun),
}

pub enum Command {
    SetPeers(Vec<PeerConfig>),
    SetFilter(PacketFilter),
    /// The server's STUN reflector, and whether it relays.
    SetPaths {
        stun: Option<SocketAddr>,
        relay: bool,
    },
    Stats(oneshot::Sender<EngineStats>),
    /// A new handshake with this peer now.
    Rehandshake(Key),
}

/// What the engine counted, for `status` and the metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub drops: Drops,
    pub traffic: crate::wg::Traffic,
    pub peers: Vec<(Key, PeerStats)>,
}

/// The data plane's links to the rest of the node: the relay stream's two directions, and where the
/// STUN-discovered (reflexive) endpoint is published.
pub struct Links {
    pub relay_out: mpsc::Sender<(Key, Vec<u8>)>,
    pub relay_in: mpsc::Receiver<(Key, Vec<u8>)>,
    pub reflexive: watch::Sender<Option<SocketAddr>>,
}

/// Where the node's direct WireGuard datagrams go.
pub enum Socket {
    /// A UDP socket of its own (an agentd).
    Own(UdpSocket),
    /// A socket it shares with other nodes of its host process (a server's gateways).
    Shared(SharedSocket),
    /// None: everything travels through the relay links.
    RelayOnly,
}

/// A UDP socket shared by several nodes of one process: each sends on it directly, and the host hands
/// each the datagrams meant for it (by receiver index and handshake MAC1; see [`SharedIndices`]).
pub struct SharedSocket {
    pub socket: Arc<UdpSocket>,
    /// Datagrams for this node and where they came from.
    pub inbound: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    /// The receiver indices of every node on the socket, and this node's number among them.
    pub indices: Arc<SharedIndices>,
    pub owner: u64,
}

/// How often the node asks the STUN reflector where it is (NAT mappings expire).
const STUN_INTERVAL: Duration = Duration::from_secs(20);

/// Runs until `shutdown` turns true. Without a socket every packet travels through the relay links.
pub async fn run(
    socket: Socket,
    mut engine: Engine,
    local: Local,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut links: Links,
    mut shutdown: watch::Receiver<bool>,
) {
    let (own, shared) = match socket {
        Socket::Own(socket) => (Some(socket), None),
        Socket::Shared(shared) => (None, Some(shared)),
        Socket::RelayOnly => (None, None),
    };
    let mut udp = match own.map(Udp::new).transpose() {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the UDP socket");
            return;
        }
    };
    let (shared_out, mut shared_in) = match shared {
        Some(s) => (Some(s.socket), Some(s.inbound)),
        None => (None, None),
    };
    let relay_only = udp.is_none() && shared_out.is_none();
    let (stack, mut tun) = match local {
        Local::Stack(stack) => (Some(stack), None),
        Local::Tun(tun) => (None, Some(tun)),
    };
    let mut outbound: Vec<Vec<u8>> = Vec::new();
    let mut direct: VecDeque<(SocketAddr, Vec<u8>)> = VecDeque::new();
    let mut next_tick = Instant::now() + Duration::from_millis(100);
    let mut stun: Option<SocketAddr> = None;
    let mut next_stun = Instant::now();
    let transaction: [u8; 12] = rand::random();
    let mut relay_open = true;
    loop {
        let now = Instant::now();
        // The stack first: what it wants to send goes through the engine.
        let stack_delay = stack.as_ref().and_then(|stack| stack.poll(&mut outbound));
        for packet in outbound.drain(..) {
            engine.send(&packet, now.into_std());
        }
        for t in engine.transmits().drain(..) {
            match t.dst {
                Route::Direct(addr) => direct.push_back((addr, t.payload)),
                // A full relay queue drops: WireGuard and TCP above it recover.
                Route::Relay(key) => {
                    let _ = links.relay_out.try_send((key, t.payload));
                }
            }
        }
        if let Some(udp) = udp.as_mut() {
            udp.send_all(&mut direct).await;
            if let Some(server) = stun
                && now >= next_stun
            {
                udp.send_one(server, &crate::stun::request(transaction)).await;
                next_stun = now + STUN_INTERVAL;
            }
        } else if let Some(socket) = &shared_out {
            for (dst, payload) in direct.drain(..) {
                if let Err(e) = socket.send_to(&payload, dst).await {
                    tracing::trace!(%dst, error = %e, "send failed");
                }
            }
        } else {
            direct.clear();
        }
        while let Some(event) = engine.poll_event() {
            match event {
                Event::HandshakeCompleted { peer } => tracing::debug!(peer = %short(&peer), "handshake completed"),
                Event::HandshakeFailed { peer } => tracing::info!(peer = %short(&peer), "no handshake answer for 90 s"),
                Event::PeerExpired { peer } => tracing::debug!(peer = %short(&peer), "silent peer expired"),
            }
        }
        let deadline = stack_delay.map_or(next_tick, |d| next_tick.min(now + d));
        tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => return,
            command = commands.recv() => match command {
                Some(Command::SetPeers(peers)) if relay_only => engine.set_peers(self::relay_only(peers)),
                Some(Command::SetPeers(peers)) => engine.set_peers(peers),
                Some(Command::SetFilter(filter)) => engine.set_filter(filter),
                Some(Command::SetPaths { stun: server, relay }) => {
                    engine.set_relay(relay);
                    if server != stun {
                        stun = server;
                        next_stun = Instant::now();
                    }
                }
                Some(Command::Rehandshake(key)) => engine.rehandshake(&key, Instant::now().into_std()),
                Some(Command::Stats(reply)) => {
                    let peers = engine_peers(&engine);
                    let _ = reply.send(EngineStats { drops: engine.drops(), traffic: engine.traffic(), peers });
                }
                None => return,
            },
            Some(udp) = readable(udp.as_mut()) => {
                let now = Instant::now().into_std();
                let reflexive = &links.reflexive;
                for _ in 0..RECV_ROUNDS {
                    let got = udp.try_recv(|from, datagram| {
                        if crate::stun::is_stun(datagram) {
                            if let Some((tx, addr)) = crate::stun::parse_response(datagram)
                                && tx == transaction && *reflexive.borrow() != Some(addr) {
                                    reflexive.send_replace(Some(addr));
                                }
                        } else {
                            engine.receive(from, datagram, now);
                        }
                    });
                    if got == 0 {
                        break;
                    }
                }
                deliver(stack.as_deref(), tun.as_mut(), &mut engine).await;
            }
            Some((from, datagram)) = recv_shared(shared_in.as_mut()) => {
                let now = Instant::now().into_std();
                engine.receive(from, &datagram, now);
                if let Some(inbound) = shared_in.as_mut() {
                    while let Ok((from, datagram)) = inbound.try_recv() {
                        engine.receive(from, &datagram, now);
                    }
                }
                deliver(stack.as_deref(), tun.as_mut(), &mut engine).await;
            }
            relayed = links.relay_in.recv(), if relay_open => {
                let now = Instant::now().into_std();
                match relayed {
                    Some((_, datagram)) => {
                        engine.receive_relayed(&datagram, now);
                        while let Ok((_, datagram)) = links.relay_in.try_recv() {
                            engine.receive_relayed(&datagram, now);
                        }
                    }
                    None => relay_open = false,
                }
                deliver(stack.as_deref(), tun.as_mut(), &mut engine).await;
            }
            () = read_tun(tun.as_mut(), &mut outbound) => {
                let now = Instant::now().into_std();
                for packet in outbound.drain(..) {
                    engine.send(&packet, now);
                }
            }
            _ = wake(stack.as_deref()) => {}
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if now >= next_tick {
                    engine.handle_timeout(now.into_std());
                    next_tick = now + Duration::from_millis(100);
                }
            }
        }
    }
}

/// Peers as a node without a socket sees them: reachable through the relay only, so nothing is
/// probed or sent to their endpoints.
pub fn relay_only(mut peers: Vec<PeerConfig>) -> Vec<PeerConfig> {
    for p in &mut peers {
        p.endpoints.clear();
    }
    peers
}

/// The socket once it is readable; never without one.
async fn readable(udp: Option<&mut Udp>) -> Option<&mut Udp> {
    match udp {
        Some(u) => u.readable().await.ok().map(|()| u),
        None => std::future::pending().await,
    }
}

/// The next datagram the host hands over on a shared socket; never without one.
async fn recv_shared(inbound: Option<&mut mpsc::Receiver<(SocketAddr, Vec<u8>)>>) -> Option<(SocketAddr, Vec<u8>)> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn engine_peers(engine: &Engine) -> Vec<(Key, PeerStats)> {
    engine.peer_keys().into_iter().filter_map(|k| engine.peer_stats(&k).map(|s| (k, s))).collect()
}

async fn deliver(stack: Option<&Stack>, tun: Option<&mut Tun>, engine: &mut Engine) {
    if let Some(stack) = stack {
        stack.deliver(std::iter::from_fn(|| engine.poll_local()));
    } else if let Some(tun) = tun {
        tun.send(std::iter::from_fn(|| engine.poll_local())).await;
    }
}

/// The next packets from the TUN device; never without one.
async fn read_tun(tun: Option<&mut Tun>, out: &mut Vec<Vec<u8>>) {
    match tun {
        Some(tun) => tun.recv(out).await,
        None => std::future::pending().await,
    }
}

async fn wake(stack: Option<&Stack>) {
    match stack {
        Some(stack) => stack.wake.notified().await,
        None => std::future::pending().await,
    }
}

pub fn short(key: &Key) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)[..8].to_string()
}
