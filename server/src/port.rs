//! The server's UDP port: the STUN reflector, and the WireGuard socket of every gateway this server
//! runs, so that nodes (and stock WireGuard peers) reach a gateway on a direct path and a tailnet still
//! costs no port. STUN messages are answered here. A WireGuard handshake initiation goes to the gateway
//! whose public key its MAC1 is keyed with (one keyed hash per gateway, no private key involved); every
//! other WireGuard message to the gateway that owns its receiver index, from an index space the
//! gateways' engines share. Gateways send on the socket themselves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use agentd::dataplane::SharedSocket;
use agentd::wg::{self, Key, SharedIndices};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// Datagrams waiting for one gateway at most; more are dropped, as a network would.
const INBOUND_QUEUE: usize = 1024;
/// Datagrams read per wakeup beyond the first, at most (the task yields between rounds).
const DRAIN: usize = 63;

pub struct Port {
    socket: Arc<UdpSocket>,
    indices: Arc<SharedIndices>,
    gateways: RwLock<HashMap<u64, Attached>>,
    next_owner: AtomicU64,
    /// Where nodes reach this port, as the gateways' node records say.
    endpoints: Mutex<Vec<SocketAddr>>,
    /// WireGuard datagrams handed to a gateway, and those no gateway here claimed (or whose gateway's
    /// queue was full).
    pub routed: AtomicU64,
    pub unrouted: AtomicU64,
}

struct Attached {
    mac1_key: [u8; 32],
    inbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

/// A gateway's place on the port; dropping it takes the gateway off.
pub struct Attachment {
    port: Arc<Port>,
    owner: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.port.gateways.write().unwrap().remove(&self.owner);
    }
}

impl Port {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Arc<Port>> {
        let socket = UdpSocket::bind(addr).await?;
        let bound = socket.local_addr()?;
        Ok(Arc::new(Port {
            socket: Arc::new(socket),
            indices: Arc::default(),
            gateways: RwLock::default(),
            next_owner: AtomicU64::new(1),
            endpoints: Mutex::new(vec![bound]),
            routed: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
        }))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Where nodes reach the port (see [`endpoints`]).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.lock().unwrap().clone()
    }

    pub fn set_endpoints(&self, endpoints: Vec<SocketAddr>) {
        *self.endpoints.lock().unwrap() = endpoints;
    }

    /// Puts the gateway with WireGuard key `public` on the port: what its node needs to use the socket,
    /// and what keeps it there.
    pub fn attach(self: &Arc<Self>, public: &Key) -> (SharedSocket, Attachment) {
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
        let attached = Attached { mac1_key: wg::mac1_key(public), inbound: inbound_tx };
        self.gateways.write().unwrap().insert(owner, attached);
        let shared = SharedSocket { socket: self.socket.clone(), inbound, indices: self.indices.clone(), owner };
        (shared, Attachment { port: self.clone(), owner })
    }

    /// Receives until `shutdown`: answers STUN, hands WireGuard datagrams to their gateways.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, from) = tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => return,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(_) => continue,
                },
            };
            self.handle(&buf[..n], from).await;
            // Some more of what is waiting without going back to the scheduler for each.
            for _ in 0..DRAIN {
                let Ok((n, from)) = self.socket.try_recv_from(&mut buf) else { break };
                self.handle(&buf[..n], from).await;
            }
        }
    }

    async fn handle(&self, datagram: &[u8], from: SocketAddr) {
        // WireGuard first: a receiver index can look like STUN's magic cookie, and a binding request (the
        // only STUN message answered) starts with 0x00, never with a WireGuard type and three zero bytes.
        let wireguard = datagram.len() >= 4 && (1..=4).contains(&datagram[0]) && datagram[1..4] == [0, 0, 0];
        if !wireguard {
            if let Some(transaction) = agentd::stun::parse_request(datagram) {
                let _ = self.socket.send_to(&agentd::stun::response(transaction, from), from).await;
            }
            return;
        }
        let gateways = self.gateways.read().unwrap();
        let target = match wg::receiver_index(datagram) {
            Some(index) => self.indices.owner(index).and_then(|owner| gateways.get(&owner)),
            None => gateways.values().find(|g| wg::initiation_is_for(datagram, &g.mac1_key)),
        };
        // A full queue drops, as a network would; WireGuard and TCP recover.
        let delivered = target.is_some_and(|g| g.inbound.try_send((from, datagram.to_vec())).is_ok());
        let counter = if delivered { &self.routed } else { &self.unrouted };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The endpoints a gateway's node record advertises for a port bound to `bound`: that address when it
/// names one; else the host of the server's advertised URL (resolved); else `0.0.0.0:port`, which
/// agentd reads as "the host I reach the server at" (right for a single server).
pub async fn endpoints(bound: SocketAddr, advertise: Option<&str>) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let port = bound.port();
    if let Some(url) = advertise {
        let host = agentd::control::server_host(url);
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return vec![SocketAddr::new(ip, port)];
        }
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(found) => {
                let mut found: Vec<SocketAddr> = found.collect();
                found.sort_by_key(|a| a.is_ipv6());
                found.dedup();
                if !found.is_empty() {
                    return found;
                }
            }
            Err(e) => {
                tracing::warn!(%host, error = %e, "cannot resolve the advertised host for the gateways' UDP endpoint")
            }
        }
    }
    vec![SocketAddr::new(bound.ip(), port)]
}
