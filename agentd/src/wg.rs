//! The WireGuard core, sans-IO: datagrams, outbound IP packets and `now` go in; datagrams to send,
//! decrypted packets for the local stack and events come out. It never reads a clock or touches a
//! socket, so a test drives it with a fake clock.
//!
//! Each peer has a `boringtun::noise::Tunn` for the cryptography. The WireGuard timers (handshake
//! retransmission, rekey, keepalive, giving up, expiry of a silent peer) live here rather than in
//! `Tunn::update_timers`, whose clock is internal.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
pub use boringtun::x25519::{PublicKey, StaticSecret};

use crate::filter::{PacketFilter, UdpFlows};

pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// With no new session for this long, a peer's keys are dropped.
pub const SILENT_PEER_EXPIRY: Duration = Duration::from_secs(540);
/// Handshakes per second before the shared rate limiter answers with cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The largest datagram the engine produces: an inner packet of up to 65535 bytes plus overhead.
pub const MAX_DATAGRAM: usize = 65_535 + 32;

/// A WireGuard public key.
pub type Key = [u8; 32];

/// What the netmap says about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub key: Key,
    /// The tunnel addresses the peer owns; packets from it must come from one of them.
    pub addresses: Vec<IpAddr>,
    /// Where the peer's WireGuard socket may be reached directly (local and reflexive addresses).
    pub endpoints: Vec<SocketAddr>,
    pub persistent_keepalive: Option<Duration>,
}

/// How a datagram travels: straight to a UDP address, or through the server's relay to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    Relay(Key),
}

/// A datagram to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: Route,
    pub payload: Vec<u8>,
}

/// How long a direct path stays in use without a packet arriving on it.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(6);
/// How often candidate endpoints are probed while no direct path works.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a direct path is kept warm while idle.
pub const DIRECT_KEEPALIVE: Duration = Duration::from_millis(2500);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    HandshakeCompleted {
        peer: Key,
    },
    /// No handshake answer within 90 s; queued packets were dropped.
    HandshakeFailed {
        peer: Key,
    },
    /// Nothing but silence for 540 s: the session keys are gone.
    PeerExpired {
        peer: Key,
    },
}

/// Why inbound traffic was dropped, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    pub malformed: u64,
    pub unknown_peer: u64,
    pub bad_source: u64,
    pub filtered: u64,
    pub replayed: u64,
    pub undecryptable: u64,
    pub no_route: u64,
    pub no_endpoint: u64,
}

/// Datagrams and bytes one way on one kind of path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
}

/// What the engine sent and received (WireGuard datagrams, as on the wire), by path, and the
/// handshakes it completed; counted since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub direct_tx: Flow,
    pub direct_rx: Flow,
    pub relay_tx: Flow,
    pub relay_rx: Flow,
    pub handshakes: u64,
}

impl Flow {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

impl Traffic {
    /// A datagram of `bytes` sent on `route`.
    fn count(&mut self, route: Route, bytes: usize) {
        match route {
            Route::Direct(_) => self.direct_tx.add(bytes),
            Route::Relay(_) => self.relay_tx.add(bytes),
        }
    }

    /// Adds what `other` sent.
    fn add_sent(&mut self, other: &Traffic) {
        self.direct_tx.packets += other.direct_tx.packets;
        self.direct_tx.bytes += other.direct_tx.bytes;
        self.relay_tx.packets += other.relay_tx.packets;
        self.relay_tx.bytes += other.relay_tx.bytes;
    }
}

/// What `status` shows for one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerStats {
    /// The path in use: `Some(Direct)`, `Some(Relay)`, or `None` before any traffic.
    pub path: Option<Route>,
    pub last_handshake: Option<Instant>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

struct Peer {
    tunn: Tunn,
    index: u32,
    config: PeerConfig,
    /// When the current handshake attempt series began, and when its last initiation went out.
    handshake_started: Option<Instant>,
    handshake_sent: Option<Instant>,
    /// When the newest session was established, and whether we initiated it.
    session_at: Option<Instant>,
    initiator: bool,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    last_data_received: Option<Instant>,
    /// The first data packet sent since the peer was last heard from (WireGuard's "no reply" timer).
    unanswered_since: Option<Instant>,
    /// Packets held while no usable session exists (beyond what `Tunn` queues itself).
    queue: VecDeque<Vec<u8>>,
    /// Set when we answered a handshake and wait for the initiator's first data packet.
    responder_pending: Option<Instant>,
    /// The direct path: the address an authenticated packet last came from, when, and when we last
    /// sent on it; and when candidates were last probed.
    direct: Option<SocketAddr>,
    direct_rx: Option<Instant>,
    direct_tx: Option<Instant>,
    last_probe: Option<Instant>,
    relay: bool,
    expired: bool,
    tx_bytes: u64,
    rx_bytes: u64,
    /// What went out to this peer, by path (only `*_tx` is used).
    sent: Traffic,
}

/// Receiver indices shared by the engines behind one UDP socket (a server's gateways): every index is
/// unique across them, so a datagram's receiver index names the engine it is for. Each engine is an
/// owner, numbered by the host.
#[derive(Default)]
pub struct SharedIndices {
    inner: Mutex<IndexTable>,
}

#[derive(Default)]
struct IndexTable {
    next: u32,
    owners: HashMap<u32, u64>,
}

impl SharedIndices {
    /// The engine a WireGuard receiver index belongs to (boringtun's index is ours shifted left by 8).
    pub fn owner(&self, receiver_idx: u32) -> Option<u64> {
        self.inner.lock().unwrap().owners.get(&(receiver_idx >> 8)).copied()
    }

    /// How many indices are taken (one per peer of every engine).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn allocate(&self, owner: u64) -> u32 {
        let mut table = self.inner.lock().unwrap();
        loop {
            let index = table.next.max(1);
            table.next = if index >= (1 << 24) - 1 { 1 } else { index + 1 };
            if let std::collections::hash_map::Entry::Vacant(v) = table.owners.entry(index) {
                v.insert(owner);
                return index;
            }
        }
    }

    fn release(&self, indices: impl IntoIterator<Item = u32>) {
        let mut table = self.inner.lock().unwrap();
        for index in indices {
            table.owners.remove(&index);
        }
    }
}

/// Whether a handshake initiation is addressed to `mac1_key`'s owner: its MAC1 is keyed with
/// HASH("mac1----" ‖ responder's public key), so a socket shared by several engines can tell whose it
/// is without any private key. `mac1_key` comes from [`mac1_key`].
pub fn initiation_is_for(datagram: &[u8], mac1_key: &[u8; 32]) -> bool {
    use blake2::digest::{FixedOutput, Mac};
    const MAC1_AT: usize = 116;
    if datagram.len() != 148 || message_type(datagram) != HANDSHAKE_INIT {
        return false;
    }
    let mut mac = blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(mac1_key).expect("32-byte key");
    mac.update(&datagram[..MAC1_AT]);
    mac.finalize_fixed().as_slice() == &datagram[MAC1_AT..MAC1_AT + 16]
}

/// The key that MAC1 of initiations to `public` is computed with.
pub fn mac1_key(public: &Key) -> [u8; 32] {
    use blake2::Digest;
    let mut hash = blake2::Blake2s256::new();
    hash.update(b"mac1----");
    hash.update(public);
    hash.finalize().into()
}

/// The receiver index of a handshake response, cookie reply or data message (`None` for anything
/// else): what routes it to its engine and peer. A response carries the responder's own index first and
/// the receiver's after it; a cookie reply and a data message start with the receiver's.
pub fn receiver_index(datagram: &[u8]) -> Option<u32> {
    if datagram.len() < 32 || datagram[1..4] != [0, 0, 0] {
        return None;
    }
    let at = match message_type(datagram) {
        HANDSHAKE_RESPONSE => 8,
        COOKIE_REPLY | DATA => 4,
        _ => return None,
    };
    Some(u32::from_le_bytes(datagram[at..at + 4].try_into().expect("four bytes")))
}

pub struct Engine {
    secret: StaticSecret,
    /// Indices from a space shared with other engines behind one socket, as this owner.
    shared: Option<(Arc<SharedIndices>, u64)>,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    rate_reset_at: Option<Instant>,
    peers: HashMap<Key, Peer>,
    by_index: HashMap<u32, Key>,
    by_address: HashMap<IpAddr, Key>,
    next_index: u32,
    filter: PacketFilter,
    /// UDP flows opened from here, whose answers pass the filter.
    udp_flows: UdpFlows,
    transmits: VecDeque<Transmit>,
    to_local: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    drops: Drops,
    traffic: Traffic,
    buf: Vec<u8>,
    /// Whether the server relays for this node.
    relay: bool,
    /// The latest `now` the engine was given (for status, which has no clock of its own).
    now_hint: Instant,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some((space, _)) = &self.shared {
            space.release(self.by_index.keys().copied());
        }
    }
}

fn message_type(datagram: &[u8]) -> u8 {
    datagram.first().copied().unwrap_or(0)
}

const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const COOKIE_REPLY: u8 = 3;
const DATA: u8 = 4;
const MAX_QUEUE: usize = 256;

impl Engine {
    pub fn new(secret: StaticSecret) -> Engine {
        let public = PublicKey::from(&secret);
        Engine {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            rate_reset_at: None,
            shared: None,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            by_address: HashMap::new(),
            next_index: 1,
            filter: PacketFilter::default(),
            udp_flows: UdpFlows::default(),
            transmits: VecDeque::new(),
            to_local: VecDeque::new(),
            events: VecDeque::new(),
            drops: Drops::default(),
            traffic: Traffic::default(),
            buf: vec![0; MAX_DATAGRAM],
            relay: false,
            now_hint: Instant::now(),
        }
    }

    /// Takes receiver indices from `space` as `owner` (before any peer is set): several engines then
    /// share one socket. The indices go back when peers go or the engine is dropped.
    pub fn share_indices(&mut self, space: Arc<SharedIndices>, owner: u64) {
        debug_assert!(self.peers.is_empty(), "indices are chosen when peers are added");
        self.shared = Some((space, owner));
    }

    /// Whether datagrams may go through the server's relay when no direct path works.
    pub fn set_relay(&mut self, relay: bool) {
        self.relay = relay;
        for peer in self.peers.values_mut() {
            peer.relay = relay;
        }
    }

    pub fn public_key(&self) -> Key {
        self.public.to_bytes()
    }

    /// What went out and came in, by path (what went out is counted as it is queued for sending).
    pub fn traffic(&self) -> Traffic {
        let mut t = self.traffic;
        for peer in self.peers.values() {
            t.add_sent(&peer.sent);
        }
        t
    }

    pub fn drops(&self) -> Drops {
        self.drops
    }

    pub fn set_filter(&mut self, filter: PacketFilter) {
        self.filter = filter;
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.peers.keys().copied().collect()
    }

    pub fn peer_stats(&self, key: &Key) -> Option<PeerStats> {
        self.peers.get(key).map(|p| PeerStats {
            path: p.route(self.relay, self.now_hint),
            last_handshake: p.session_at,
            tx_bytes: p.tx_bytes,
            rx_bytes: p.rx_bytes,
        })
    }

    /// Starts a new handshake with `key` now (unless one is under way), for when the peer has likely lost
    /// the session: the server that hosts it restarted.
    pub fn rehandshake(&mut self, key: &Key, now: Instant) {
        self.now_hint = now;
        if let Some(peer) = self.peers.get_mut(key)
            && peer.handshake_started.is_none()
        {
            peer.start_handshake(now, &mut self.buf, &mut self.transmits, &mut self.drops);
        }
    }

    /// Brings the peer set to `wanted`: adds and removes peers, and updates the addresses and endpoints
    /// of the others without touching their sessions.
    pub fn set_peers(&mut self, wanted: Vec<PeerConfig>) {
        let wanted: HashMap<Key, PeerConfig> = wanted.into_iter().map(|p| (p.key, p)).collect();
        let gone: Vec<Key> = self.peers.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
        for key in gone {
            if let Some(peer) = self.peers.remove(&key) {
                self.by_index.remove(&peer.index);
                if let Some((space, _)) = &self.shared {
                    space.release([peer.index]);
                }
                // What went to it stays counted.
                self.traffic.add_sent(&peer.sent);
            }
        }
        for (key, config) in wanted {
            match self.peers.get_mut(&key) {
                Some(peer) => {
                    // The peer stopped advertising the address we reached it at (a server's gateway moved
                    // to another replica): that path is gone; the relay carries on until a new one answers.
                    if let Some(direct) = peer.direct
                        && peer.config.endpoints.contains(&direct)
                        && !config.endpoints.contains(&direct)
                    {
                        peer.direct = None;
                        peer.direct_rx = None;
                    }
                    peer.config = config;
                }
                None => {
                    let index = self.allocate_index();
                    let tunn = Tunn::new(
                        self.secret.clone(),
                        PublicKey::from(key),
                        None,
                        None,
                        index,
                        Some(self.rate_limiter.clone()),
                    );
                    self.by_index.insert(index, key);
                    let mut peer = Peer::new(tunn, index, config);
                    peer.relay = self.relay;
                    self.peers.insert(key, peer);
                }
            }
        }
        self.by_address =
            self.peers.iter().flat_map(|(k, p)| p.config.addresses.iter().map(move |a| (*a, *k))).collect();
    }

    /// Indices are unique per engine (or per shared space) and below 2^24 (boringtun shifts them left by 8).
    fn allocate_index(&mut self) -> u32 {
        if let Some((space, owner)) = &self.shared {
            return space.allocate(*owner);
        }
        loop {
            let index = self.next_index;
            self.next_index = if self.next_index >= (1 << 24) - 1 { 1 } else { self.next_index + 1 };
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    /// An IP packet from the local stack, to the peer that owns its destination.
    pub fn send(&mut self, packet: &[u8], now: Instant) {
        self.now_hint = now;
        let Some(dst) = ip_destination(packet) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(key) = self.by_address.get(&dst).copied() else {
            self.drops.no_route += 1;
            return;
        };
        if !self.filter.allows_all() {
            self.udp_flows.note_outbound(packet, now);
        }
        let peer = self.peers.get_mut(&key).expect("indexed peers exist");
        peer.send(packet, now, &mut self.buf, &mut self.transmits, &mut self.drops);
    }

    /// A datagram from the network.
    pub fn receive(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.receive_from(Some(from), datagram, now);
    }

    /// A datagram the server relayed.
    pub fn receive_relayed(&mut self, datagram: &[u8], now: Instant) {
        self.receive_from(None, datagram, now);
    }

    /// `from` is the UDP source, or `None` for the relay.
    fn receive_from(&mut self, from: Option<SocketAddr>, datagram: &[u8], now: Instant) {
        self.now_hint = now;
        let receiver_idx = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                self.drops.malformed += 1;
                return;
            }
            Ok(Packet::HandshakeInit(init)) => match parse_handshake_anon(&self.secret, &self.public, &init) {
                Ok(half) => return self.receive_for(half.peer_static_public, from, datagram, now),
                Err(_) => {
                    self.drops.undecryptable += 1;
                    return;
                }
            },
            // Everything else names our receiver index, which routes it to its peer.
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
            Ok(Packet::PacketData(p)) => p.receiver_idx,
        };
        match self.by_index.get(&(receiver_idx >> 8)) {
            Some(key) => self.receive_for(*key, from, datagram, now),
            None => self.drops.unknown_peer += 1,
        }
    }

    /// A datagram routed to the peer with public key `key`.
    fn receive_for(&mut self, key: Key, from: Option<SocketAddr>, datagram: &[u8], now: Instant) {
        let Some(peer) = self.peers.get_mut(&key) else {
            self.drops.unknown_peer += 1;
            return;
        };
        let kind = message_type(datagram);
        let mut delivered = Vec::new();
        // Answers go back the way the datagram came.
        let back = match from {
            Some(addr) => Route::Direct(addr),
            None => Route::Relay(key),
        };
        let result = peer.tunn.decapsulate(from.map(|f| f.ip()), datagram, &mut self.buf);
        let ok = match result {
            TunnResult::Done => true,
            TunnResult::WriteToNetwork(out) => {
                peer.sent.count(back, out.len());
                self.transmits.push_back(Transmit { dst: back, payload: out.to_vec() });
                // Flush what Tunn queued while it had no session.
                while let TunnResult::WriteToNetwork(out) = peer.tunn.decapsulate(None, &[], &mut self.buf) {
                    peer.sent.count(back, out.len());
                    self.transmits.push_back(Transmit { dst: back, payload: out.to_vec() });
                }
                true
            }
            TunnResult::WriteToTunnelV4(packet, source) => {
                if peer.config.addresses.contains(&IpAddr::V4(source)) {
                    delivered.push(packet.to_vec());
                } else {
                    self.drops.bad_source += 1;
                }
                true
            }
            TunnResult::WriteToTunnelV6(packet, source) => {
                if peer.config.addresses.contains(&IpAddr::V6(source)) {
                    delivered.push(packet.to_vec());
                } else {
                    self.drops.bad_source += 1;
                }
                true
            }
            TunnResult::Err(WireGuardError::DuplicateCounter) => {
                self.drops.replayed += 1;
                false
            }
            TunnResult::Err(_) => {
                self.drops.undecryptable += 1;
                false
            }
        };
        if !ok {
            return;
        }
        // An authenticated packet straight from the peer: that address is a working direct path (and
        // where the peer is now: WireGuard roaming).
        if let Some(addr) = from {
            peer.direct = Some(addr);
            peer.direct_rx = Some(now);
        }
        peer.last_received = Some(now);
        peer.unanswered_since = None;
        peer.rx_bytes += datagram.len() as u64;
        match from {
            Some(_) => self.traffic.direct_rx.add(datagram.len()),
            None => self.traffic.relay_rx.add(datagram.len()),
        }
        peer.expired = false;
        if !delivered.is_empty() {
            peer.last_data_received = Some(now);
        }
        match kind {
            HANDSHAKE_RESPONSE => {
                peer.session_at = Some(now);
                peer.initiator = true;
                peer.handshake_started = None;
                peer.handshake_sent = None;
                peer.last_sent = Some(now);
                self.events.push_back(Event::HandshakeCompleted { peer: key });
                self.traffic.handshakes += 1;
                peer.flush_queue(now, &mut self.buf, &mut self.transmits, &mut self.drops);
                peer.probe(now, &mut self.buf, &mut self.transmits);
            }
            HANDSHAKE_INIT => {
                // The new session becomes current when the initiator's first data packet arrives.
                peer.responder_pending = Some(now);
                peer.handshake_started = None;
                peer.handshake_sent = None;
                peer.last_sent = Some(now);
            }
            DATA if peer.responder_pending.is_some() => {
                peer.responder_pending = None;
                peer.session_at = Some(now);
                peer.initiator = false;
                self.events.push_back(Event::HandshakeCompleted { peer: key });
                self.traffic.handshakes += 1;
                peer.flush_queue(now, &mut self.buf, &mut self.transmits, &mut self.drops);
                peer.probe(now, &mut self.buf, &mut self.transmits);
            }
            _ => {}
        }
        for packet in delivered {
            if self.filter.allows_inbound(&packet) || self.udp_flows.is_answer(&packet, now) {
                self.to_local.push_back(packet);
            } else {
                self.drops.filtered += 1;
            }
        }
    }

    /// Runs the timers; call every ~100 ms (see [`Engine::next_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now_hint = now;
        if self.rate_reset_at.is_none_or(|at| now >= at) {
            self.rate_limiter.reset_count();
            self.rate_reset_at = Some(now + Duration::from_secs(1));
        }
        for (key, peer) in self.peers.iter_mut() {
            let event = peer.handle_timeout(*key, now, &mut self.buf, &mut self.transmits, &mut self.drops);
            if let Some(Event::PeerExpired { .. }) = event {
                // Drop the session keys by replacing the tunnel; the next packet starts a fresh handshake.
                let public = PublicKey::from(*key);
                let limiter = Some(self.rate_limiter.clone());
                peer.tunn = Tunn::new(self.secret.clone(), public, None, None, peer.index, limiter);
            }
            if let Some(event) = event {
                self.events.push_back(event);
            }
        }
    }

    /// When `handle_timeout` should next run.
    pub fn next_timeout(&self, now: Instant) -> Instant {
        now + Duration::from_millis(100)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Everything waiting to be sent, in order (the IO shell sends it in batches).
    pub fn transmits(&mut self) -> &mut VecDeque<Transmit> {
        &mut self.transmits
    }

    /// The next decrypted packet for the local stack.
    pub fn poll_local(&mut self) -> Option<Vec<u8>> {
        self.to_local.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

impl Peer {
    fn new(tunn: Tunn, index: u32, config: PeerConfig) -> Peer {
        Peer {
            tunn,
            index,
            config,
            handshake_started: None,
            handshake_sent: None,
            session_at: None,
            initiator: false,
            last_sent: None,
            last_received: None,
            last_data_received: None,
            unanswered_since: None,
            queue: VecDeque::new(),
            responder_pending: None,
            direct: None,
            direct_rx: None,
            direct_tx: None,
            last_probe: None,
            relay: false,
            expired: false,
            tx_bytes: 0,
            rx_bytes: 0,
            sent: Traffic::default(),
        }
    }

    fn session_usable(&self, now: Instant) -> bool {
        self.session_at.is_some_and(|at| now.duration_since(at) < REJECT_AFTER_TIME)
    }

    /// The path to use now: a direct path heard from recently, else the relay, else the first candidate.
    fn route(&self, relay: bool, now: Instant) -> Option<Route> {
        if let (Some(addr), Some(at)) = (self.direct, self.direct_rx)
            && now.saturating_duration_since(at) < DIRECT_TIMEOUT
        {
            return Some(Route::Direct(addr));
        }
        if relay {
            return Some(Route::Relay(self.config.key));
        }
        self.direct.or(self.config.endpoints.first().copied()).map(Route::Direct)
    }

    fn push(&mut self, payload: &[u8], now: Instant, out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        match self.route(self.relay, now) {
            Some(dst) => self.push_to(dst, payload, now, out),
            None => drops.no_endpoint += 1,
        }
    }

    /// A handshake initiation goes every way the peer might be reached until a direct path is known: the
    /// relay and each candidate endpoint (a peer without a relay stream, such as stock WireGuard, answers on
    /// the direct one). Copies are harmless: the responder refuses a replayed initiation.
    fn push_handshake(&mut self, payload: &[u8], now: Instant, out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        if self.direct_alive(now) || !self.relay {
            self.push(payload, now, out, drops);
            return;
        }
        self.push_to(Route::Relay(self.config.key), payload, now, out);
        for target in self.config.endpoints.clone() {
            self.push_to(Route::Direct(target), payload, now, out);
        }
    }

    fn push_to(&mut self, dst: Route, payload: &[u8], now: Instant, out: &mut VecDeque<Transmit>) {
        self.last_sent = Some(now);
        if let Route::Direct(_) = dst {
            self.direct_tx = Some(now);
        }
        self.tx_bytes += payload.len() as u64;
        self.sent.count(dst, payload.len());
        out.push_back(Transmit { dst, payload: payload.to_vec() });
    }

    /// Sends a keepalive straight to every candidate endpoint (and the last direct address): the first
    /// that reaches the peer becomes the direct path on its side, and its answers make it ours.
    fn probe(&mut self, now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>) {
        if !self.relay || !self.session_usable(now) {
            return;
        }
        self.last_probe = Some(now);
        let mut targets = self.config.endpoints.clone();
        if let Some(d) = self.direct
            && !targets.contains(&d)
        {
            targets.push(d);
        }
        // Probes are not traffic: they must not hold back the passive keepalive the peer waits for.
        let last_sent = self.last_sent;
        for target in targets {
            if let TunnResult::WriteToNetwork(datagram) = self.tunn.encapsulate(&[], buf) {
                let datagram = datagram.to_vec();
                self.push_to(Route::Direct(target), &datagram, now, out);
            }
        }
        self.last_sent = last_sent;
    }

    fn direct_alive(&self, now: Instant) -> bool {
        self.direct_rx.is_some_and(|at| now.saturating_duration_since(at) < DIRECT_TIMEOUT)
    }

    fn send(&mut self, packet: &[u8], now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        if !self.session_usable(now) {
            if self.queue.len() >= MAX_QUEUE {
                self.queue.pop_front();
            }
            self.queue.push_back(packet.to_vec());
            let answering = self.responder_pending.is_some_and(|at| now.duration_since(at) < REKEY_TIMEOUT);
            if self.handshake_started.is_none() && !answering {
                self.start_handshake(now, buf, out, drops);
            }
            return;
        }
        match self.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(datagram) => {
                let is_handshake = message_type(datagram) == HANDSHAKE_INIT;
                let datagram = datagram.to_vec();
                if is_handshake {
                    self.push_handshake(&datagram, now, out, drops);
                } else {
                    self.push(&datagram, now, out, drops);
                    self.unanswered_since.get_or_insert(now);
                }
                if is_handshake {
                    self.handshake_started.get_or_insert(now);
                    self.handshake_sent = Some(now);
                }
            }
            TunnResult::Done => {}
            _ => drops.undecryptable += 1,
        }
        // Rekey ahead of expiry while traffic flows: the initiator after 120 s, the responder later.
        let age = self.session_at.map(|at| now.duration_since(at)).unwrap_or_default();
        let due = if self.initiator { REKEY_AFTER_TIME } else { REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT };
        if age >= due && self.handshake_started.is_none() {
            self.start_handshake(now, buf, out, drops);
        }
    }

    fn start_handshake(&mut self, now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        self.handshake_started = Some(now);
        self.send_initiation(now, buf, out, drops);
    }

    fn send_initiation(&mut self, now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        if let TunnResult::WriteToNetwork(datagram) = self.tunn.format_handshake_initiation(buf, true) {
            let datagram = datagram.to_vec();
            self.push_handshake(&datagram, now, out, drops);
        }
        self.handshake_sent = Some(now);
    }

    fn flush_queue(&mut self, now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        while let Some(packet) = self.queue.pop_front() {
            self.send(&packet, now, buf, out, drops);
        }
    }

    fn handle_timeout(
        &mut self,
        key: Key,
        now: Instant,
        buf: &mut [u8],
        out: &mut VecDeque<Transmit>,
        drops: &mut Drops,
    ) -> Option<Event> {
        if let (Some(started), Some(sent)) = (self.handshake_started, self.handshake_sent) {
            if now.duration_since(started) >= REKEY_ATTEMPT_TIME {
                self.handshake_started = None;
                self.handshake_sent = None;
                self.queue.clear();
                return Some(Event::HandshakeFailed { peer: key });
            }
            if now.duration_since(sent) >= REKEY_TIMEOUT {
                self.send_initiation(now, buf, out, drops);
            }
            return None;
        }
        let last_session = self.session_at?;
        if !self.expired && now.duration_since(last_session) >= SILENT_PEER_EXPIRY {
            self.expired = true;
            self.session_at = None;
            return Some(Event::PeerExpired { peer: key });
        }
        // Data went out and nothing came back for 15 s: the peer may have lost the session (a restart);
        // a new handshake finds out.
        if self.unanswered_since.is_some_and(|at| now.duration_since(at) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT) {
            self.unanswered_since = None;
            self.start_handshake(now, buf, out, drops);
            return None;
        }
        if !self.session_usable(now) {
            return None;
        }
        // Path upkeep: probe candidates while there is no direct path; keep a direct path warm.
        if self.relay && !self.config.endpoints.is_empty() {
            if !self.direct_alive(now) {
                if self.last_probe.is_none_or(|at| now.duration_since(at) >= PROBE_INTERVAL) {
                    self.probe(now, buf, out);
                }
            } else if self.direct_tx.is_none_or(|at| now.duration_since(at) >= DIRECT_KEEPALIVE) {
                self.keepalive(now, buf, out, drops);
            }
        }
        // Passive keepalive: we received data and have sent nothing since, for 10 s.
        if let Some(received) = self.last_data_received {
            let sent_since = self.last_sent.is_some_and(|s| s > received);
            if !sent_since && now.duration_since(received) >= KEEPALIVE_TIMEOUT {
                self.keepalive(now, buf, out, drops);
                return None;
            }
        }
        if let Some(interval) = self.config.persistent_keepalive
            && self.last_sent.is_none_or(|s| now.duration_since(s) >= interval)
        {
            self.keepalive(now, buf, out, drops);
        }
        None
    }

    fn keepalive(&mut self, now: Instant, buf: &mut [u8], out: &mut VecDeque<Transmit>, drops: &mut Drops) {
        if let TunnResult::WriteToNetwork(datagram) = self.tunn.encapsulate(&[], buf) {
            let datagram = datagram.to_vec();
            self.push(&datagram, now, out, drops);
        }
    }
}

/// The destination of an IPv4 or IPv6 packet.
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))),
        6 if packet.len() >= 40 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! The core on a simulated network under a fake clock: no sockets, no sleeping.

    use super::*;

    const A_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const B_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);

    fn endpoint(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A minimal IPv4 packet from `src` to `dst` carrying `payload`.
    fn packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    struct Pair {
        a: Engine,
        b: Engine,
        now: Instant,
    }

    fn pair() -> Pair {
        let a_secret = StaticSecret::from([1u8; 32]);
        let b_secret = StaticSecret::from([2u8; 32]);
        let mut a = Engine::new(a_secret);
        let mut b = Engine::new(b_secret);
        let a_key = a.public_key();
        let b_key = b.public_key();
        a.set_peers(vec![PeerConfig {
            key: b_key,
            addresses: vec![B_ADDR.into()],
            endpoints: vec![endpoint(2)],
            persistent_keepalive: None,
        }]);
        b.set_peers(vec![PeerConfig {
            key: a_key,
            addresses: vec![A_ADDR.into()],
            endpoints: vec![endpoint(1)],
            persistent_keepalive: None,
        }]);
        Pair { a, b, now: Instant::now() }
    }

    impl Pair {
        /// Delivers everything in flight both ways until the network is quiet; returns datagrams moved.
        fn settle(&mut self) -> usize {
            let mut moved = 0;
            loop {
                let mut any = false;
                while let Some(t) = self.a.poll_transmit() {
                    assert_eq!(t.dst, Route::Direct(endpoint(2)));
                    self.b.receive(endpoint(1), &t.payload, self.now);
                    any = true;
                    moved += 1;
                }
                while let Some(t) = self.b.poll_transmit() {
                    assert_eq!(t.dst, Route::Direct(endpoint(1)));
                    self.a.receive(endpoint(2), &t.payload, self.now);
                    any = true;
                    moved += 1;
                }
                if !any {
                    return moved;
                }
            }
        }

        fn advance(&mut self, by: Duration) {
            // Tick like the IO shell does, every 100 ms.
            let end = self.now + by;
            while self.now < end {
                self.now = (self.now + Duration::from_millis(100)).min(end);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
            }
        }

        fn events(engine: &mut Engine) -> Vec<Event> {
            std::iter::from_fn(|| engine.poll_event()).collect()
        }
    }

    /// A minimal IPv6 packet from `src` to `dst` carrying `payload` (UDP as next header).
    fn packet6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ipv6_packets_route_by_destination_and_are_checked_by_source() {
        let mut p = pair();
        let (a6, b6): (Ipv6Addr, Ipv6Addr) = ("fd00::6440:2".parse().unwrap(), "fd00::6440:3".parse().unwrap());
        let (a_key, b_key) = (p.a.public_key(), p.b.public_key());
        let config = |key, v4: Ipv4Addr, v6: Ipv6Addr, port| PeerConfig {
            key,
            addresses: vec![v4.into(), v6.into()],
            endpoints: vec![endpoint(port)],
            persistent_keepalive: None,
        };
        p.a.set_peers(vec![config(b_key, B_ADDR, b6, 2)]);
        p.b.set_peers(vec![config(a_key, A_ADDR, a6, 1)]);
        p.a.send(&packet6(a6, b6, b"six"), p.now);
        p.settle();
        assert_eq!(&p.b.poll_local().expect("an IPv6 packet arrives")[40..], b"six");
        p.a.send(&packet6("fd00::6440:99".parse().unwrap(), b6, b"spoof"), p.now);
        p.settle();
        assert!(p.b.poll_local().is_none());
        assert_eq!(p.b.drops().bad_source, 1);
        p.a.send(&packet6(a6, "fd00::6440:77".parse().unwrap(), b"nobody"), p.now);
        assert_eq!(p.a.drops().no_route, 1);
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"hello"), p.now);
        let first = p.a.poll_transmit().expect("a handshake initiation");
        assert_eq!(first.payload[0], HANDSHAKE_INIT);
        p.b.receive(endpoint(1), &first.payload, p.now);
        p.settle();
        assert_eq!(Pair::events(&mut p.a), [Event::HandshakeCompleted { peer: p.b.public_key() }]);
        let delivered = p.b.poll_local().expect("the queued packet arrives after the handshake");
        assert_eq!(&delivered[20..], b"hello");
        assert_eq!(Pair::events(&mut p.b), [Event::HandshakeCompleted { peer: p.a.public_key() }]);

        p.b.send(&packet(B_ADDR, A_ADDR, b"world"), p.now);
        p.settle();
        assert_eq!(&p.a.poll_local().unwrap()[20..], b"world");

        // Every datagram one side sent, the other received, all on the direct path.
        let (a, b) = (p.a.traffic(), p.b.traffic());
        assert_eq!((a.handshakes, b.handshakes), (1, 1));
        assert!(a.direct_tx.packets >= 2, "{a:?}");
        assert_eq!(a.direct_tx, b.direct_rx);
        assert_eq!(b.direct_tx, a.direct_rx);
        assert_eq!((a.relay_tx, a.relay_rx), (Flow::default(), Flow::default()));
        p.a.set_peers(vec![]);
        assert_eq!(p.a.traffic().direct_tx, a.direct_tx, "a removed peer's traffic stays counted");
    }

    #[test]
    fn rekey_after_two_minutes_of_traffic() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        Pair::events(&mut p.a);
        Pair::events(&mut p.b);
        while p.b.poll_local().is_some() {}
        // B's passive keepalive tells A its data arrived.
        p.advance(KEEPALIVE_TIMEOUT + Duration::from_secs(1));
        p.settle();

        p.advance(REKEY_AFTER_TIME - KEEPALIVE_TIMEOUT - Duration::from_secs(2));
        p.a.send(&packet(A_ADDR, B_ADDR, b"before"), p.now);
        p.settle();
        assert!(Pair::events(&mut p.a).is_empty(), "no rekey before 120 s");

        p.advance(Duration::from_secs(2));
        p.a.send(&packet(A_ADDR, B_ADDR, b"after"), p.now);
        p.settle();
        assert_eq!(Pair::events(&mut p.a), [Event::HandshakeCompleted { peer: p.b.public_key() }], "rekeyed");
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| p.b.poll_local()).collect();
        assert_eq!(got.iter().map(|g| &g[20..]).collect::<Vec<_>>(), [&b"before"[..], b"after"]);
    }

    #[test]
    fn a_peer_that_lost_the_session_gets_a_new_handshake_after_15_s_without_reply() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        Pair::events(&mut p.a);
        // B restarts with the same key and no session: A's data goes unanswered.
        let a_key = p.a.public_key();
        p.b = Engine::new(StaticSecret::from([2u8; 32]));
        p.b.set_peers(vec![PeerConfig {
            key: a_key,
            addresses: vec![A_ADDR.into()],
            endpoints: vec![endpoint(1)],
            persistent_keepalive: None,
        }]);
        p.a.send(&packet(A_ADDR, B_ADDR, b"lost"), p.now);
        p.settle();
        assert!(p.b.poll_local().is_none(), "B cannot read the old session");
        p.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - Duration::from_millis(200));
        assert!(std::iter::from_fn(|| p.a.poll_transmit()).all(|t| t.payload[0] != HANDSHAKE_INIT));
        p.advance(Duration::from_millis(300));
        let init = p.a.poll_transmit().expect("a new handshake");
        assert_eq!(init.payload[0], HANDSHAKE_INIT);
        p.b.receive(endpoint(1), &init.payload, p.now);
        p.settle();
        p.a.send(&packet(A_ADDR, B_ADDR, b"again"), p.now);
        p.settle();
        assert_eq!(&p.b.poll_local().expect("delivered over the new session")[20..], b"again");
    }

    #[test]
    fn passive_keepalive_ten_seconds_after_receiving() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        p.b.poll_local();
        p.advance(Duration::from_secs(9));
        assert!(p.b.poll_transmit().is_none(), "nothing to send yet");
        p.advance(Duration::from_secs(2));
        let keepalive = p.b.poll_transmit().expect("a keepalive after 10 s");
        assert_eq!(keepalive.payload[0], 4, "a data message");
        assert_eq!(keepalive.payload.len(), 32, "with an empty payload");
        p.a.receive(endpoint(2), &keepalive.payload, p.now);
        assert!(p.a.poll_local().is_none(), "keepalives are not delivered");
    }

    #[test]
    fn a_silent_peer_expires_and_a_dead_one_gives_up() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        Pair::events(&mut p.a);
        p.advance(KEEPALIVE_TIMEOUT + Duration::from_secs(1));
        p.settle();
        p.advance(SILENT_PEER_EXPIRY - KEEPALIVE_TIMEOUT - Duration::from_secs(2));
        p.settle();
        assert!(Pair::events(&mut p.a).is_empty());
        p.advance(Duration::from_secs(2));
        assert_eq!(Pair::events(&mut p.a), [Event::PeerExpired { peer: p.b.public_key() }]);

        // After expiry a new packet starts a fresh handshake; with B gone it is retried every 5 s and
        // abandoned after 90 s.
        p.a.send(&packet(A_ADDR, B_ADDR, b"y"), p.now);
        let mut initiations = 0;
        let start = p.now;
        while p.now.duration_since(start) < REKEY_ATTEMPT_TIME + Duration::from_secs(1) {
            while let Some(t) = p.a.poll_transmit() {
                assert_eq!(t.payload[0], HANDSHAKE_INIT);
                initiations += 1;
            }
            p.advance(Duration::from_secs(1));
        }
        assert!((17..=19).contains(&initiations), "{initiations} initiations in 90 s");
        assert_eq!(Pair::events(&mut p.a), [Event::HandshakeFailed { peer: p.b.public_key() }]);
    }

    #[test]
    fn bad_datagrams_are_dropped_and_counted() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        p.b.poll_local();

        p.b.receive(endpoint(9), &[1, 2, 3], p.now);
        p.b.receive(endpoint(9), &[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0], p.now);
        assert_eq!(p.b.drops().malformed, 2, "{:?}", p.b.drops());

        // A replayed data packet is refused.
        p.a.send(&packet(A_ADDR, B_ADDR, b"once"), p.now);
        let datagram = p.a.poll_transmit().unwrap().payload;
        p.b.receive(endpoint(1), &datagram, p.now);
        p.b.receive(endpoint(1), &datagram, p.now);
        assert_eq!(std::iter::from_fn(|| p.b.poll_local()).count(), 1);
        assert_eq!(p.b.drops().replayed, 1);

        // A peer may only send from its own addresses.
        p.a.send(&packet(Ipv4Addr::new(100, 64, 0, 99), B_ADDR, b"spoof"), p.now);
        p.settle();
        assert!(p.b.poll_local().is_none());
        assert_eq!(p.b.drops().bad_source, 1);

        // A handshake from a key that is not a peer gets nowhere.
        let mut stranger = Engine::new(StaticSecret::from([3u8; 32]));
        stranger.set_peers(vec![PeerConfig {
            key: p.b.public_key(),
            addresses: vec![B_ADDR.into()],
            endpoints: vec![endpoint(2)],
            persistent_keepalive: None,
        }]);
        stranger.send(&packet(A_ADDR, B_ADDR, b"let me in"), p.now);
        let init = stranger.poll_transmit().unwrap();
        p.b.receive(endpoint(7), &init.payload, p.now);
        assert!(p.b.poll_transmit().is_none());
        assert_eq!(p.b.drops().unknown_peer, 1);
    }

    #[test]
    fn engines_sharing_a_socket_are_told_apart_by_mac1_and_receiver_index() {
        const G1: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
        const G2: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
        let shared_socket = endpoint(9);
        let space = Arc::new(SharedIndices::default());
        // Others on the socket took the first indices: the gateways' differ from the client's own.
        for _ in 0..4 {
            space.allocate(99);
        }
        let mut client = Engine::new(StaticSecret::from([3u8; 32]));
        let mut gateways: Vec<Engine> = (0..2u8).map(|i| Engine::new(StaticSecret::from([4 + i; 32]))).collect();
        for (owner, g) in gateways.iter_mut().enumerate() {
            g.share_indices(space.clone(), owner as u64);
            g.set_peers(vec![PeerConfig {
                key: client.public_key(),
                addresses: vec![A_ADDR.into()],
                endpoints: vec![endpoint(1)],
                persistent_keepalive: None,
            }]);
        }
        let peer = |g: &Engine, address: Ipv4Addr| PeerConfig {
            key: g.public_key(),
            addresses: vec![address.into()],
            endpoints: vec![shared_socket],
            persistent_keepalive: None,
        };
        client.set_peers(vec![peer(&gateways[0], G1), peer(&gateways[1], G2)]);
        assert_eq!(space.len(), 6, "one index per gateway peer, from one space");
        let keys: Vec<[u8; 32]> = gateways.iter().map(|g| mac1_key(&g.public_key())).collect();
        let now = Instant::now();
        client.send(&packet(A_ADDR, G1, b"to one"), now);
        client.send(&packet(A_ADDR, G2, b"to two"), now);
        let mut routed = [0usize; 2];
        loop {
            let mut any = false;
            while let Some(t) = client.poll_transmit() {
                assert_eq!(t.dst, Route::Direct(shared_socket));
                // What the host of the shared socket does: initiations by MAC1, the rest by index.
                let owner = match receiver_index(&t.payload) {
                    Some(index) => space.owner(index).expect("an index of the space") as usize,
                    None => {
                        let matching: Vec<usize> =
                            (0..2).filter(|i| initiation_is_for(&t.payload, &keys[*i])).collect();
                        assert_eq!(matching.len(), 1, "an initiation's MAC1 names exactly one gateway");
                        matching[0]
                    }
                };
                routed[owner] += 1;
                gateways[owner].receive(endpoint(1), &t.payload, now);
                any = true;
            }
            for g in &mut gateways {
                while let Some(t) = g.poll_transmit() {
                    client.receive(shared_socket, &t.payload, now);
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        assert!(routed.iter().all(|n| *n >= 2), "each got its initiation and data: {routed:?}");
        // The other way: each gateway starts a handshake (as after a takeover); the client's responses
        // and data come back through the demultiplexer by the index the response names as receiver.
        for g in &mut gateways {
            g.rehandshake(&client.public_key(), now);
        }
        for (owner, g) in gateways.iter_mut().enumerate() {
            let init = g.poll_transmit().expect("an initiation");
            client.receive(endpoint(10 + owner as u16), &init.payload, now);
        }
        let mut responses = 0;
        while let Some(t) = client.poll_transmit() {
            let index = receiver_index(&t.payload).expect("a response names its receiver");
            let owner = space.owner(index).expect("an index of the space") as usize;
            responses += 1;
            gateways[owner].receive(endpoint(1), &t.payload, now);
        }
        assert_eq!(responses, 2);
        let handshakes: Vec<u64> = gateways.iter().map(|g| g.traffic().handshakes).collect();
        assert_eq!(handshakes, [2, 2], "each completed the one it started (after the client's)");
        let delivered: Vec<Vec<u8>> = gateways.iter_mut().map(|g| g.poll_local().expect("delivered")).collect();
        assert!(delivered[0].ends_with(b"to one") && delivered[1].ends_with(b"to two"));
        assert!(!initiation_is_for(&[1u8; 148], &keys[0]), "a forged MAC1 matches nobody");
        let message = |kind: u8| {
            let mut m = vec![kind, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            m.resize(32, 0);
            m
        };
        assert_eq!(receiver_index(&message(4)), Some(0x0403_0201), "data: the receiver comes first");
        assert_eq!(receiver_index(&message(3)), Some(0x0403_0201), "a cookie reply: the same");
        assert_eq!(receiver_index(&message(2)), Some(0x0807_0605), "a response: after the sender's index");
        assert_eq!(receiver_index(&message(1)), None, "an initiation names no receiver");
        assert_eq!(receiver_index(&message(4)[..8]), None, "too short to be WireGuard");
        drop(gateways.pop());
        assert_eq!(space.len(), 5, "a dropped engine gives its indices back");
    }

    #[test]
    fn a_peer_that_stops_advertising_its_direct_address_loses_that_path() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        let b = |endpoints| PeerConfig {
            key: p.b.public_key(),
            addresses: vec![B_ADDR.into()],
            endpoints,
            persistent_keepalive: None,
        };
        let moved = b(vec![endpoint(7)]);
        p.a.set_relay(true);
        p.a.set_peers(vec![moved]);
        p.a.send(&packet(A_ADDR, B_ADDR, b"after the move"), p.now);
        let t = p.a.poll_transmit().unwrap();
        assert_eq!(t.dst, Route::Relay(p.b.public_key()), "the old address is no longer used");
    }

    #[test]
    fn removing_a_peer_keeps_the_others_sessions() {
        let mut p = pair();
        p.a.send(&packet(A_ADDR, B_ADDR, b"x"), p.now);
        p.settle();
        let b_key = p.b.public_key();
        let c = PeerConfig {
            key: [9u8; 32],
            addresses: vec![Ipv4Addr::new(100, 64, 0, 4).into()],
            endpoints: vec![endpoint(3)],
            persistent_keepalive: None,
        };
        let b = PeerConfig {
            key: b_key,
            addresses: vec![B_ADDR.into()],
            endpoints: vec![endpoint(2)],
            persistent_keepalive: None,
        };
        p.a.set_peers(vec![b.clone(), c]);
        p.a.set_peers(vec![b]);
        p.a.send(&packet(A_ADDR, B_ADDR, b"still"), p.now);
        let t = p.a.poll_transmit().unwrap();
        assert_eq!(t.payload[0], 4, "the existing session carries it: no new handshake");
    }
}
