//! `Node`: a tailnet member in this process. Many can live in one process (the server hosts one per
//! tailnet for its gateway); each has its own key, UDP socket, WireGuard engine and stack.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use boringtun::x25519::{PublicKey, StaticSecret};
use cordon_proto::v1 as pb;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::control::{self, Client, Ended, Follow};
use crate::dataplane::{self, Command, Local};
use crate::error::Error;
use crate::netmap::{NetMap, Peer};
use crate::stack::{Listener, Stack, StackConfig, TcpStream, UdpSocket as TailnetUdpSocket};
use crate::state::{Session, StateDir};
use crate::tun::Tun;
use crate::wg::{Drops, Engine, Key};

/// How the node meets the operating system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A userspace stack inside the process; no root needed.
    Userspace,
    /// A kernel TUN interface of this name; needs root.
    Tun { name: String },
}

#[derive(Clone)]
pub struct NodeConfig {
    /// `http://host:port` or `https://host:port`.
    pub server: String,
    /// `cordon-auth-...`; needed on first start and whenever the saved session is no longer valid.
    pub auth_key: Option<String>,
    /// An OIDC ID token (a CI job's, say) that a trust rule accepts; used instead of an auth key.
    pub oidc_token: Option<String>,
    /// With `oidc_token`: the tailnet whose trust rules to use.
    pub tailnet_id: Option<String>,
    pub state_dir: PathBuf,
    pub hostname: String,
    pub mode: Mode,
    /// UDP port for WireGuard; 0 picks one.
    pub listen_port: u16,
    /// Endpoints to advertise instead of the one derived from the route to the server.
    pub advertise: Vec<SocketAddr>,
    /// A PEM file with the CA that signed an `https://` server's certificate, trusted besides the
    /// system's store (a private CA).
    pub ca_cert: Option<PathBuf>,
    /// A person logs in (through the tailnet's login provider) when there is no other credential:
    /// this is shown where to approve the login. Needs `tailnet_id`.
    pub login: Option<LoginHandler>,
    /// Log in again even if a saved session is still valid (`agentd login`): the node keeps its key,
    /// id and address.
    pub relogin: bool,
}

/// Where a person approves a login, and the code they enter there.
#[derive(Clone, Debug)]
pub struct LoginPrompt {
    pub verification_uri: String,
    pub user_code: String,
    /// The URI with the code filled in, when the identity provider offers one.
    pub verification_uri_complete: Option<String>,
    pub provider: String,
    pub expires_at: Option<std::time::SystemTime>,
}

/// Shows a [`LoginPrompt`] to the person (the binary prints it, with a QR code on a terminal).
#[derive(Clone)]
pub struct LoginHandler(pub Arc<dyn Fn(&LoginPrompt) + Send + Sync>);

impl std::fmt::Debug for LoginHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginHandler")
    }
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("server", &self.server)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("oidc_token", &self.oidc_token.as_ref().map(|_| "<redacted>"))
            .field("state_dir", &self.state_dir)
            .field("hostname", &self.hostname)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl NodeConfig {
    pub fn new(server: impl Into<String>, state_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            server: server.into(),
            auth_key: None,
            oidc_token: None,
            tailnet_id: None,
            state_dir: state_dir.into(),
            hostname: "node".into(),
            mode: Mode::Userspace,
            listen_port: 0,
            advertise: Vec::new(),
            ca_cert: None,
            login: None,
            relogin: false,
        }
    }
}

/// What `status` reports about one peer.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    pub peer: Peer,
    /// How traffic to the peer travels now (`None` before any).
    pub path: Option<crate::wg::Route>,
    /// Seconds since the last completed handshake.
    pub last_handshake: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Status {
    pub node_id: String,
    pub hostname: String,
    pub address: Ipv4Addr,
    pub address6: Option<Ipv6Addr>,
    pub tailnet: String,
    pub endpoint: SocketAddr,
    pub peers: Vec<PeerStatus>,
    pub drops: Drops,
    /// WireGuard datagrams by path, and handshakes, since the node started.
    pub traffic: crate::wg::Traffic,
    /// How often the netmap and relay streams came back after breaking.
    pub reconnects: (u64, u64),
    /// How many of the netmap stream's comebacks resumed from the node's revision with a delta.
    pub resumed: u64,
    pub ended: Option<Ended>,
}

/// What a host process hands [`Node::hosted`].
pub struct Hosted {
    /// The node's WireGuard private key.
    pub secret: [u8; 32],
    pub node_id: String,
    /// The netmap messages, a full map first; the node ends when this ends.
    pub netmap: control::NetMapStream,
    /// Datagrams the node sends, by peer key; the host delivers them.
    pub relay_out: mpsc::Sender<(Key, Vec<u8>)>,
    /// Datagrams for the node, by sender key.
    pub relay_in: mpsc::Receiver<(Key, Vec<u8>)>,
    /// A UDP socket shared with the host's other nodes, for direct paths; without one the node is
    /// reachable through the relay only.
    pub socket: Option<dataplane::SharedSocket>,
    pub stack: StackConfig,
}

impl std::fmt::Debug for Hosted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosted").field("node_id", &self.node_id).field("secret", &"<redacted>").finish_non_exhaustive()
    }
}

/// Everything [`Node::launch`] starts from.
struct Parts {
    secret: StaticSecret,
    netmap: NetMap,
    stream: control::NetMapStream,
    socket: dataplane::Socket,
    local: Local,
    links: dataplane::Links,
    server_host: String,
    endpoint: SocketAddr,
}

pub struct Node {
    session: Session,
    servers: Option<control::Servers>,
    state: Option<StateDir>,
    stack: Option<Arc<Stack>>,
    netmap: watch::Receiver<Arc<NetMap>>,
    ended: watch::Receiver<Option<Ended>>,
    commands: mpsc::UnboundedSender<Command>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    endpoint: SocketAddr,
    reconnects: Arc<control::Reconnects>,
}

impl Node {
    /// Joins the tailnet: loads or makes the key, resumes the saved session or registers, waits for the
    /// first netmap, and brings the tunnels up.
    pub async fn start(config: NodeConfig) -> Result<Node, Error> {
        let state = StateDir::open(&config.state_dir)?;
        let secret = state.key()?;
        let public = PublicKey::from(&secret).to_bytes();
        let ca_cert = match &config.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| Error::io(format!("cannot read the CA certificate {}", path.display()), e))?,
            ),
            None => None,
        };
        let servers = control::Servers::new(&config.server, ca_cert)?;
        let mut client = servers.connect().await?;

        let socket = StdUdpSocket::bind(("0.0.0.0", config.listen_port))
            .map_err(|e| Error::io(format!("cannot bind UDP port {}", config.listen_port), e))?;
        socket.set_nonblocking(true).map_err(|e| Error::io("UDP socket", e))?;
        let port = socket.local_addr().map_err(|e| Error::io("UDP socket", e))?.port();
        let socket = UdpSocket::from_std(socket).map_err(|e| Error::io("UDP socket", e))?;
        let endpoints = if config.advertise.is_empty() {
            vec![SocketAddr::new(route_source(servers.first()), port)]
        } else {
            config.advertise.clone()
        };
        let endpoint = endpoints[0];

        let (session, mut stream) = resume_or_register(&mut client, &state, &config, public, &endpoints).await?;
        let netmap = control::first_netmap(&mut stream).await?;
        let server_host = control::server_host(servers.first());
        let local = match &config.mode {
            Mode::Userspace => {
                Local::Stack(Stack::new(netmap.address(), netmap.prefix, netmap.address6(), StackConfig::default()))
            }
            Mode::Tun { name } => Local::Tun(
                Tun::create(name, netmap.address(), netmap.prefix, netmap.address6())
                    .map_err(|e| Error::io("TUN", e))?,
            ),
        };
        tracing::info!(node = %session.node_id, address = %netmap.address(), %endpoint, peers = netmap.peers.len(), "joined tailnet {}", netmap.tailnet_name);

        let (relay_out, relay_out_rx) = mpsc::channel(4096);
        let (relay_in_tx, relay_in) = mpsc::channel(4096);
        let (reflexive, reflexive_rx) = watch::channel(None);
        let links = dataplane::Links { relay_out, relay_in, reflexive };
        let socket = dataplane::Socket::Own(socket);
        let parts = Parts { secret, netmap, stream, socket, local, links, server_host, endpoint };
        let node = Node::launch(session, Some(servers.clone()), Some(state), parts);
        let shutdown_rx = node.shutdown.subscribe();
        let link = control::RelayLink {
            outbound: relay_out_rx,
            inbound: relay_in_tx,
            netmap: node.netmap.clone(),
            commands: node.commands.clone(),
            reconnects: node.reconnects.clone(),
        };
        let relay = tokio::spawn(control::relay(
            servers.clone(),
            node.session.session_token.clone(),
            link,
            shutdown_rx.clone(),
        ));
        let reporter = tokio::spawn(report_reflexive(
            servers,
            node.session.session_token.clone(),
            endpoints,
            reflexive_rx,
            shutdown_rx,
        ));
        node.tasks.lock().unwrap().extend([relay, reporter]);
        Ok(node)
    }

    /// A node that a host process runs itself (the server runs each tailnet's gateway this way): no
    /// connection to a server, and at most a UDP socket shared with the host's other nodes. The host
    /// feeds the netmap and carries the relayed WireGuard datagrams over the relay links. The node ends
    /// when its netmap feed ends.
    pub async fn hosted(hosted: Hosted) -> Result<Node, Error> {
        let Hosted { secret, node_id, mut netmap, relay_out, relay_in, socket, stack } = hosted;
        let first = control::first_netmap(&mut netmap).await?;
        let local = Local::Stack(Stack::new(first.address(), first.prefix, first.address6(), stack));
        let (reflexive, _) = watch::channel(None);
        let links = dataplane::Links { relay_out, relay_in, reflexive };
        let parts = Parts {
            secret: StaticSecret::from(secret),
            netmap: first,
            stream: netmap,
            socket: socket.map_or(dataplane::Socket::RelayOnly, dataplane::Socket::Shared),
            local,
            links,
            server_host: String::new(),
            endpoint: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        let session = Session { server: String::new(), node_id, session_token: String::new() };
        Ok(Node::launch(session, None, None, parts))
    }

    /// Starts the data plane and the netmap follower.
    fn launch(session: Session, servers: Option<control::Servers>, state: Option<StateDir>, parts: Parts) -> Node {
        let Parts { secret, netmap, stream, socket, local, links, server_host, endpoint } = parts;
        let mut engine = Engine::new(secret);
        engine.set_relay(netmap.relay);
        if let dataplane::Socket::Shared(shared) = &socket {
            engine.share_indices(shared.indices.clone(), shared.owner);
        }
        let server_ip = std::sync::Mutex::new(None);
        let peers = control::server_endpoints(netmap.peer_configs(), || {
            let ip = control::server_ip(&server_host);
            *server_ip.lock().unwrap() = ip;
            ip
        });
        engine.set_peers(match &socket {
            dataplane::Socket::RelayOnly => dataplane::relay_only(peers),
            _ => peers,
        });
        engine.set_filter(netmap.filter.clone());
        let stun = control::resolve_stun(&netmap.stun, &server_host);
        let stack = match &local {
            Local::Stack(stack) => Some(stack.clone()),
            Local::Tun(_) => None,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let _ = commands.send(Command::SetPaths { stun, relay: netmap.relay });
        let (netmap_tx, netmap_rx) = watch::channel(Arc::new(netmap));
        let (ended_tx, ended_rx) = watch::channel(None);
        let reconnects = Arc::new(control::Reconnects::default());
        let plane = tokio::spawn(dataplane::run(socket, engine, local, commands_rx, links, shutdown_rx.clone()));
        let follow = Follow {
            servers: servers.clone(),
            session_token: session.session_token.clone(),
            netmap: netmap_tx,
            ended: ended_tx,
            commands: commands.clone(),
            shutdown: shutdown_rx,
            server_host,
            server_ip,
            reconnects: reconnects.clone(),
        };
        let follower = tokio::spawn(control::follow(follow, stream));
        let node = Node {
            session,
            servers,
            state,
            stack,
            netmap: netmap_rx,
            ended: ended_rx,
            commands,
            shutdown,
            tasks: Mutex::new(vec![plane, follower]),
            endpoint,
            reconnects,
        };
        node.take_down_when_revoked();
        node
    }

    /// When the server ends the identity, stop the data plane: no tunnel outlives a revoked node.
    fn take_down_when_revoked(&self) {
        let mut ended = self.ended.clone();
        let shutdown = self.shutdown.clone();
        let state_dir = self.state.as_ref().map(|s| s.path().to_path_buf());
        self.tasks.lock().unwrap().push(tokio::spawn(async move {
            if ended.wait_for(Option::is_some).await.is_ok() {
                shutdown.send_replace(true);
                if let Some(Ok(state)) = state_dir.as_deref().map(StateDir::open) {
                    let _ = state.clear_session();
                }
            }
        }));
    }

    pub fn node_id(&self) -> &str {
        &self.session.node_id
    }

    pub fn address(&self) -> Ipv4Addr {
        self.netmap.borrow().address()
    }

    /// The node's IPv6 address, when its tailnet has IPv6.
    pub fn address6(&self) -> Option<Ipv6Addr> {
        self.netmap.borrow().address6().map(|(a, _)| a)
    }

    /// The current netmap, and a way to wait for the next.
    /// Starts a new handshake with every peer now. A host that takes this node's identity over from
    /// another process does this: the peers' sessions are with the old one.
    pub fn rehandshake_all(&self) {
        for peer in self.netmap.borrow().peer_configs() {
            let _ = self.commands.send(Command::Rehandshake(peer.key));
        }
    }

    pub fn netmap(&self) -> watch::Receiver<Arc<NetMap>> {
        self.netmap.clone()
    }

    /// Becomes `Some` when the server ends this node's identity.
    pub fn ended(&self) -> watch::Receiver<Option<Ended>> {
        self.ended.clone()
    }

    fn stack(&self) -> Result<&Arc<Stack>, Error> {
        self.stack.as_ref().ok_or_else(|| {
            Error::io("listen/dial", std::io::Error::other("TUN mode uses the kernel's sockets, not the node's"))
        })
    }

    pub async fn listen(&self, port: u16) -> Result<Listener, Error> {
        self.stack()?.listen(port).map_err(|e| Error::io(format!("listen on port {port}"), e))
    }

    pub async fn dial(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        self.stack()?.dial(addr).await.map_err(|e| Error::io(format!("dial {addr}"), e))
    }

    /// Dials a peer by name (`laptop`, `gateway`) or address.
    pub async fn dial_host(&self, host: &str, port: u16) -> Result<TcpStream, Error> {
        let ip = self.netmap.borrow().resolve(host).ok_or_else(|| Error::UnknownHost(host.to_string()))?;
        self.dial(SocketAddr::new(ip, port)).await
    }

    /// A UDP socket on `port` of the node's tailnet addresses (0: any free port).
    pub fn bind_udp(&self, port: u16) -> Result<TailnetUdpSocket, Error> {
        self.stack()?.bind_udp(port).map_err(|e| Error::io(format!("bind UDP port {port}"), e))
    }

    /// Who is behind a tunnel address (IPv4 or IPv6), from the netmap (no round trip).
    pub fn whois(&self, ip: impl Into<IpAddr>) -> Option<Peer> {
        let ip = ip.into();
        let map = self.netmap.borrow();
        if map.me.addresses.contains(&ip) {
            return Some(map.me.clone());
        }
        map.peer_by_address(ip).cloned()
    }

    pub async fn status(&self) -> Status {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Stats(tx));
        let dataplane::EngineStats { drops, traffic, peers: stats } = rx.await.unwrap_or_default();
        let map = self.netmap.borrow().clone();
        let now = Instant::now();
        let peers = map
            .peers
            .values()
            .map(|p| {
                let s = stats.iter().find(|(k, _)| *k == p.key).map(|(_, s)| s.clone()).unwrap_or_default();
                PeerStatus {
                    peer: p.clone(),
                    path: s.path,
                    last_handshake: s.last_handshake.map(|t| now.duration_since(t).as_secs()),
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                }
            })
            .collect();
        Status {
            node_id: self.session.node_id.clone(),
            hostname: map.me.hostname.clone(),
            address: map.address(),
            address6: map.address6().map(|(a, _)| a),
            tailnet: map.tailnet_name.clone(),
            endpoint: self.endpoint,
            peers,
            drops,
            traffic,
            reconnects: (
                self.reconnects.netmap.load(std::sync::atomic::Ordering::Relaxed),
                self.reconnects.relay.load(std::sync::atomic::Ordering::Relaxed),
            ),
            resumed: self.reconnects.resumed.load(std::sync::atomic::Ordering::Relaxed),
            ended: self.ended.borrow().clone(),
        }
    }

    /// Stops the tunnels and the control stream; the node stays registered and can resume.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Leaves the tailnet for good: the server removes the node at once.
    pub async fn leave(&self) -> Result<(), Error> {
        let (Some(servers), Some(state)) = (self.servers.clone(), self.state.as_ref()) else {
            self.shutdown().await;
            return Ok(());
        };
        let mut client = servers.connect().await?;
        let result = client.leave(pb::LeaveRequest { session_token: self.session.session_token.clone() }).await;
        self.shutdown().await;
        state.clear_session()?;
        result.map(|_| ()).map_err(|s| Error::Rejected(s.message().to_string()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

async fn resume_or_register(
    client: &mut Client,
    state: &StateDir,
    config: &NodeConfig,
    public: [u8; 32],
    endpoints: &[SocketAddr],
) -> Result<(Session, control::NetMapStream), Error> {
    let mut session_invalid = false;
    if let Some(session) = state.session()?
        && session.server == config.server
        && !config.relogin
    {
        match control::watch(client, &session.session_token, 0).await {
            Ok(stream) => {
                report_endpoints(client, &session.session_token, endpoints).await;
                tracing::info!(node = %session.node_id, "resumed saved session");
                return Ok((session, stream));
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                tracing::info!(reason = %status.message(), "saved session is no longer valid; registering anew");
                state.clear_session()?;
                session_invalid = true;
            }
            Err(status) => {
                return Err(Error::Unreachable { server: config.server.clone(), detail: status.message().into() });
            }
        }
    }
    let credential = match (&config.oidc_token, &config.auth_key, &config.login) {
        (Some(token), _, _) => pb::register_request::Credential::OidcToken(token.clone()),
        (None, Some(key), _) => pb::register_request::Credential::AuthKey(key.clone()),
        (None, None, Some(handler)) if config.tailnet_id.is_some() => {
            let response = log_in(client, config, handler, public, endpoints).await?;
            return save_and_watch(client, state, config, response).await;
        }
        (None, None, _) if session_invalid => return Err(Error::SessionInvalid),
        (None, None, _) => return Err(Error::NoCredential),
    };
    let request = pb::RegisterRequest {
        credential: Some(credential),
        tailnet_id: config.tailnet_id.clone().unwrap_or_default(),
        wireguard_public_key: public.to_vec(),
        hostname: config.hostname.clone(),
        requested_tags: vec![],
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
    };
    let response = client.register(request).await.map_err(|s| {
        if control::rejected(&s) {
            Error::Rejected(s.message().to_string())
        } else {
            Error::Unreachable { server: config.server.clone(), detail: s.message().to_string() }
        }
    })?;
    save_and_watch(client, state, config, response.into_inner()).await
}

async fn save_and_watch(
    client: &mut Client,
    state: &StateDir,
    config: &NodeConfig,
    response: pb::RegisterResponse,
) -> Result<(Session, control::NetMapStream), Error> {
    let node_id = response.node.map(|n| n.id).unwrap_or_default();
    let session = Session { server: config.server.clone(), node_id, session_token: response.session_token };
    state.save_session(&session)?;
    let stream = control::watch(client, &session.session_token, 0)
        .await
        .map_err(|s| Error::Rejected(s.message().to_string()))?;
    Ok((session, stream))
}

/// A person's login: the server starts the device authorization grant with the tailnet's login
/// provider, the person approves it in a browser anywhere, and the server admits the node.
async fn log_in(
    client: &mut Client,
    config: &NodeConfig,
    handler: &LoginHandler,
    public: [u8; 32],
    endpoints: &[SocketAddr],
) -> Result<pb::RegisterResponse, Error> {
    let refused = |s: tonic::Status| {
        if control::rejected(&s) || s.code() == tonic::Code::FailedPrecondition {
            Error::LoginFailed(s.message().to_string())
        } else {
            Error::Unreachable { server: config.server.clone(), detail: s.message().to_string() }
        }
    };
    let request = pb::StartLoginRequest {
        tailnet_id: config.tailnet_id.clone().unwrap_or_default(),
        wireguard_public_key: public.to_vec(),
        hostname: config.hostname.clone(),
        requested_tags: vec![],
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
    };
    let started = client.start_login(request).await.map_err(refused)?.into_inner();
    let expires_at = started.expires_at.and_then(|t| {
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
    });
    (handler.0)(&LoginPrompt {
        verification_uri: started.verification_uri,
        user_code: started.user_code,
        verification_uri_complete: Some(started.verification_uri_complete).filter(|u| !u.is_empty()),
        provider: started.provider,
        expires_at,
    });
    // The call waits for the person; a dropped connection is retried until the code expires.
    loop {
        match client.wait_login(pb::WaitLoginRequest { login_id: started.login_id.clone() }).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                if expires_at.is_some_and(|at| at <= std::time::SystemTime::now()) {
                    return Err(Error::LoginFailed("the login code expired; log in again".into()));
                }
                tracing::info!(reason = %s.message(), "waiting for the login again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(s) => return Err(Error::LoginFailed(s.message().to_string())),
        }
    }
}

/// Reports the local endpoints plus the reflexive one STUN found, whenever the latter changes.
async fn report_reflexive(
    servers: control::Servers,
    token: String,
    local: Vec<SocketAddr>,
    mut reflexive: watch::Receiver<Option<SocketAddr>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            changed = reflexive.changed() => if changed.is_err() { return },
        }
        let Some(seen) = *reflexive.borrow_and_update() else { continue };
        let mut endpoints = local.clone();
        if !endpoints.contains(&seen) {
            endpoints.push(seen);
            tracing::info!(endpoint = %seen, "STUN: reachable from outside at");
        }
        // Rare (the reflexive endpoint changed): a connection to whichever replica answers.
        match servers.connect().await {
            Ok(mut client) => report_endpoints(&mut client, &token, &endpoints).await,
            Err(e) => tracing::warn!(error = %e, "could not report endpoints"),
        }
    }
}

async fn report_endpoints(client: &mut Client, token: &str, endpoints: &[SocketAddr]) {
    let request = pb::ReportEndpointsRequest {
        session_token: token.to_string(),
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
    };
    if let Err(status) = client.report_endpoints(request).await {
        tracing::warn!(error = %status.message(), "could not report endpoints");
    }
}

/// The local address this host uses to reach the server: the address peers on the same path can reach.
fn route_source(server: &str) -> IpAddr {
    let host_port = server.split("://").nth(1).unwrap_or(server).split('/').next().unwrap_or("");
    let target = std::net::ToSocketAddrs::to_socket_addrs(host_port).ok().and_then(|mut a| a.find(SocketAddr::is_ipv4));
    let probe = StdUdpSocket::bind("0.0.0.0:0").ok();
    match (target, probe) {
        (Some(target), Some(probe)) if probe.connect(target).is_ok() => {
            probe.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}
