//! The `agentd` command line: `up` runs the daemon (userspace proxies and forwards, or a TUN
//! interface); `status`, `whois` and `down` talk to it over a Unix socket in its state directory.
//!
//! Exit codes: 0 done; 1 a local failure (state directory, sockets); 2 bad usage or URL; 3 the node was
//! revoked (deleted, its key revoked, its tailnet deleted or expired): it does not retry; 4 the server
//! refused the credential (or a person's login was denied, expired or refused); 5 the server could not
//! be reached; 6 the person's login expired: run `agentd login` (the node keeps its id and address).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::error::Error;
use crate::node::{Mode, Node, NodeConfig, Status};
use crate::proxy::Kind;

const SOCKET: &str = "agentd.sock";

/// `println!` that does not panic when stdout is gone (a supervisor that read the first line and
/// closed the pipe): the daemon keeps running and says nothing.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "agentd", version, about = "Join a Cordon tailnet over WireGuard")]
struct Cli {
    /// Where the node keeps its key and session.
    #[arg(long, global = true, env = "AGENTD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How log lines look on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(long, global = true, env = "AGENTD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the tailnet and stay up until stopped or revoked. Without a key or token, and with
    /// --tailnet, a person logs in through the tailnet's login provider.
    Up(Box<UpArgs>),
    /// Log in as a person (SSO through the tailnet's login provider: open the link shown, approve),
    /// then stay up as `up` does. Logging in again keeps the node's id and address.
    Login(Box<UpArgs>),
    /// Show this node and its peers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Who is behind a tailnet address.
    Whois { address: IpAddr },
    /// Stop the running agentd (the node stays registered).
    Down,
}

#[derive(clap::Args)]
struct UpArgs {
    /// The Cordon server, e.g. http://cordon.example:7443; several replicas comma-separated
    /// (https://r1.example:7443,https://r2.example:7443): agentd fails over between them.
    #[arg(long, env = "AGENTD_SERVER")]
    server: String,
    /// Trust the CA in this PEM file for an https:// server, besides the system's trust store.
    #[arg(long, env = "AGENTD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Auth key (`cordon-auth-...`); needed on first start.
    #[arg(long, env = "AGENTD_AUTH_KEY", hide_env_values = true, conflicts_with = "auth_key_file")]
    auth_key: Option<String>,
    /// Read the auth key from this file.
    #[arg(long, env = "AGENTD_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    /// Join with the OIDC ID token in this file (a CI job's), accepted by a trust rule.
    #[arg(long, env = "AGENTD_OIDC_TOKEN_FILE")]
    oidc_token_file: Option<PathBuf>,
    /// The tailnet to log in to (a person's login), or with --oidc-token-file the tailnet whose trust
    /// rules to use.
    #[arg(long, env = "AGENTD_TAILNET")]
    tailnet: Option<String>,
    /// This node's name in the tailnet [default: the host name].
    #[arg(long)]
    hostname: Option<String>,
    /// Use a kernel TUN interface of this name instead of the userspace stack (needs root).
    #[arg(long)]
    tun: Option<String>,
    /// SOCKS5 proxy into the tailnet (userspace mode), e.g. 127.0.0.1:1055.
    #[arg(long)]
    socks5: Option<SocketAddr>,
    /// HTTP proxy (CONNECT and absolute URLs) into the tailnet, e.g. 127.0.0.1:8081.
    #[arg(long)]
    http_proxy: Option<SocketAddr>,
    /// Forward a local port to a tailnet host: 127.0.0.1:8080=gateway:80 (repeatable).
    #[arg(long = "forward", value_parser = parse_forward)]
    forwards: Vec<(SocketAddr, String, u16)>,
    /// Offer a local service to peers on a tailnet port (userspace mode; the policy decides who may
    /// connect): `9100` (tailnet port 9100 to 127.0.0.1:9100), `2222=127.0.0.1:22`, or with `/udp`
    /// for a UDP service: `5353/udp`, `5353=127.0.0.1:53/udp` (repeatable).
    #[arg(long = "serve", value_parser = parse_serve)]
    serves: Vec<Served>,
    /// UDP port for WireGuard [default: any free port].
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    /// Advertise this endpoint to peers instead of the address that routes to the server.
    #[arg(long)]
    advertise: Vec<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9101 [default: off].
    #[arg(long, env = "AGENTD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

fn parse_forward(s: &str) -> Result<(SocketAddr, String, u16), String> {
    let usage = || format!("{s:?} is not LOCAL=HOST:PORT, e.g. 127.0.0.1:8080=gateway:80");
    let (local, remote) = s.split_once('=').ok_or_else(usage)?;
    let local: SocketAddr = local.parse().map_err(|_| usage())?;
    let (host, port) = remote.rsplit_once(':').ok_or_else(usage)?;
    Ok((local, host.to_string(), port.parse().map_err(|_| usage())?))
}

/// A local service offered to peers: connections (or datagrams) to the node's `port` go to `target`.
#[derive(Clone, Debug)]
struct Served {
    port: u16,
    target: SocketAddr,
    udp: bool,
}

fn parse_serve(s: &str) -> Result<Served, String> {
    let usage =
        || format!("{s:?} is not PORT[=HOST:PORT][/udp], e.g. 9100, 2222=127.0.0.1:22 or 5353=127.0.0.1:53/udp");
    let (spec, udp) = match s.rsplit_once('/') {
        Some((spec, "udp")) => (spec, true),
        Some((spec, "tcp")) => (spec, false),
        Some(_) => return Err(usage()),
        None => (s, false),
    };
    let port_of = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    match spec.split_once('=') {
        None => {
            let port = port_of(spec).ok_or_else(usage)?;
            Ok(Served { port, target: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), udp })
        }
        Some((port, target)) => {
            let port = port_of(port).ok_or_else(usage)?;
            let target =
                std::net::ToSocketAddrs::to_socket_addrs(target).ok().and_then(|mut a| a.next()).ok_or_else(usage)?;
            Ok(Served { port, target, udp })
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("agentd");
    }
    match std::env::var_os("HOME") {
        Some(home) if !nix_is_root() => PathBuf::from(home).join(".local/state/agentd"),
        _ => PathBuf::from("/var/lib/agentd"),
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    init_logging(filter, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(*args, &state_dir, false).await,
            Command::Login(args) => {
                if args.tailnet.is_none() {
                    eprintln!("agentd: login needs --tailnet (or AGENTD_TAILNET): the tailnet to log in to");
                    return 2;
                }
                up(*args, &state_dir, true).await
            }
            Command::Status { json } => client(&state_dir, "status", json).await,
            Command::Whois { address } => client(&state_dir, &format!("whois {address}"), true).await,
            Command::Down => client(&state_dir, "down", false).await,
        }
    });
    std::process::ExitCode::from(code as u8)
}

/// The shape of log lines on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields by
    /// name, at the top level.
    Json,
}

/// Starts logging to stderr (both binaries use this).
pub fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
    }
}

fn fail(e: &Error) -> i32 {
    eprintln!("agentd: {e}");
    e.exit_code()
}

/// Shows where to approve a login: one line, and a QR code of the link when stdout is a terminal.
fn show_login(prompt: &crate::LoginPrompt) {
    say!(
        "agentd: to log in with {}, open {} and enter the code {}",
        prompt.provider,
        prompt.verification_uri,
        prompt.user_code
    );
    let link = prompt.verification_uri_complete.as_deref().unwrap_or(&prompt.verification_uri);
    if std::io::IsTerminal::is_terminal(&std::io::stdout())
        && let Ok(code) = qrcode::QrCode::new(link.as_bytes())
    {
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build();
        say!("{art}");
    }
}

async fn up(args: UpArgs, state_dir: &Path, relogin: bool) -> i32 {
    let auth_key = match (&args.auth_key, &args.auth_key_file) {
        (Some(k), _) => Some(k.trim().to_string()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(k) => Some(k.trim().to_string()),
            Err(e) => {
                eprintln!("agentd: cannot read the auth key file {}: {e}", path.display());
                return 2;
            }
        },
        (None, None) => None,
    };
    let oidc_token = match &args.oidc_token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!("agentd: cannot read the OIDC token file {}: {e}", path.display());
                return 2;
            }
        },
        None => None,
    };
    let hostname = args.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_lowercase()).unwrap_or_else(|_| "node".into())
    });
    let config = NodeConfig {
        server: args.server.clone(),
        auth_key,
        oidc_token,
        tailnet_id: args.tailnet.clone(),
        state_dir: state_dir.to_path_buf(),
        hostname,
        mode: args.tun.clone().map_or(Mode::Userspace, |name| Mode::Tun { name }),
        listen_port: args.listen_port,
        advertise: args.advertise.clone(),
        ca_cert: args.ca_cert.clone(),
        login: Some(crate::LoginHandler(Arc::new(show_login))),
        relogin,
    };
    let node = match Node::start(config).await {
        Ok(node) => Arc::new(node),
        Err(e) => return fail(&e),
    };
    let status = node.status().await;
    say!(
        "agentd: up as {} ({}) in tailnet {}, node {}",
        status.hostname,
        status.address,
        status.tailnet,
        status.node_id
    );

    let userspace = args.tun.is_none();
    let mut servers = Vec::new();
    if let Some(addr) = args.metrics_listen {
        let listener = match crate::metrics::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("agentd: {e:#}");
                return 1;
            }
        };
        say!("agentd: metrics at http://{}/metrics", listener.local_addr().unwrap_or(addr));
        let scraped = node.clone();
        let scrape = move || {
            let node = scraped.clone();
            async move { crate::metrics::render(None, crate::metrics::node_sample(&node.status().await)) }
        };
        servers.push(tokio::spawn(crate::metrics::serve(listener, scrape, std::future::pending::<()>())));
    }
    if let Some(addr) = args.socks5 {
        match bind(addr, "SOCKS5 proxy").await {
            Ok(l) => servers.push(tokio::spawn(serve_proxy(node.clone(), l, userspace, Kind::Socks5))),
            Err(code) => return code,
        }
    }
    if let Some(addr) = args.http_proxy {
        match bind(addr, "HTTP proxy").await {
            Ok(l) => servers.push(tokio::spawn(serve_proxy(node.clone(), l, userspace, Kind::Http))),
            Err(code) => return code,
        }
    }
    for (local, host, port) in args.forwards {
        match bind(local, "forward").await {
            Ok(l) => {
                say!("agentd: forwarding {local} to {host}:{port}");
                servers.push(tokio::spawn(serve_proxy(node.clone(), l, userspace, Kind::Forward(host, port))));
            }
            Err(code) => return code,
        }
    }
    if !args.serves.is_empty() && !userspace {
        eprintln!("agentd: --serve is for userspace mode; in TUN mode peers reach local services directly");
        return 2;
    }
    for served in &args.serves {
        let (port, target) = (served.port, served.target);
        let server = if served.udp {
            node.bind_udp(port).map(|socket| tokio::spawn(serve_local_udp(socket, target)))
        } else {
            node.listen(port).await.map(|listener| tokio::spawn(serve_local(listener, target)))
        };
        match server {
            Ok(server) => {
                say!("agentd: serving tailnet port {port}/{} from {target}", protocol(served));
                servers.push(server);
            }
            Err(e) => return fail(&e),
        }
    }
    let socket_path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket_path);
    let control = match UnixListener::bind(&socket_path) {
        Ok(l) => l,
        Err(e) => return fail(&Error::io(format!("cannot create {}", socket_path.display()), e)),
    };
    let (down_tx, mut down_rx) = tokio::sync::mpsc::channel::<()>(1);
    servers.push(tokio::spawn(serve_control(node.clone(), control, down_tx, args.serves.clone())));

    let mut ended = node.ended();
    let code = tokio::select! {
        _ = shutdown_signal() => { say!("agentd: stopping"); 0 }
        _ = down_rx.recv() => { say!("agentd: stopping (agentd down)"); 0 }
        why = async { ended.wait_for(Option::is_some).await.ok().and_then(|e| e.clone()) } => match why {
            Some(e) if e.reason == cordon_proto::v1::stream_ended::Reason::LoginExpired => {
                eprintln!("agentd: {}; tunnels are down", e.message);
                6
            }
            why => {
                let why = why.map(|e| e.message).unwrap_or_default();
                eprintln!("agentd: this node was revoked: {why}; tunnels are down, not retrying");
                3
            }
        }
    };
    for s in servers {
        s.abort();
    }
    node.shutdown().await;
    let _ = std::fs::remove_file(&socket_path);
    code
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, i32> {
    TcpListener::bind(addr).await.map_err(|e| fail(&Error::io(format!("cannot listen for the {what} on {addr}"), e)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve_proxy(node: Arc<Node>, listener: TcpListener, userspace: bool, kind: Kind) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let _ = client.set_nodelay(true);
        let node = node.clone();
        let kind = kind.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::proxy::handle(&node, client, userspace, &kind).await {
                tracing::debug!(error = %e, "proxied connection ended");
            }
        });
    }
}

/// Accepts peers' connections on a tailnet port (the packet filter let their SYN through) and joins
/// each to a new connection to the local target.
async fn serve_local(mut listener: crate::Listener, target: SocketAddr) {
    loop {
        let (mut inbound, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => return,
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(target).await {
                Ok(mut local) => {
                    let _ = local.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut local, 256 * 1024, 256 * 1024)
                        .await;
                }
                // Dropping the tunnel connection unanswered tells the peer, as a refused port would.
                Err(e) => tracing::info!(%peer, %target, error = %e, "served port: the local service is not answering"),
            }
        });
    }
}

/// How long a UDP flow (one peer address and port) keeps its local socket without traffic.
const UDP_FLOW_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Relays datagrams between peers and a local UDP service. Each peer address and port gets its own
/// local socket, as a NAT would give it, so the service's answers go back to the peer that asked; a
/// flow ends after [`UDP_FLOW_IDLE`] without traffic.
async fn serve_local_udp(socket: crate::UdpSocket, target: SocketAddr) {
    let socket = Arc::new(socket);
    let mut flows: std::collections::HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>> = Default::default();
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
        let mut datagram = buf[..n].to_vec();
        if let Some(flow) = flows.get(&peer) {
            match flow.try_send(datagram) {
                Ok(()) => continue,
                // The local service is slower than the peer: drop, as a full socket buffer would.
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => continue,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(d)) => datagram = d,
            }
        }
        flows.retain(|_, f| !f.is_closed());
        let bind: SocketAddr =
            if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { "[::]:0".parse().unwrap() };
        let local = match tokio::net::UdpSocket::bind(bind).await {
            Ok(l) if l.connect(target).await.is_ok() => l,
            _ => {
                tracing::info!(%peer, %target, "served UDP port: cannot open a socket to the local service");
                continue;
            }
        };
        let _ = local.send(&datagram).await;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        flows.insert(peer, tx);
        tokio::spawn(udp_flow(socket.clone(), local, peer, rx));
    }
}

/// One peer's flow: its datagrams to the local service, and the service's answers back to it.
async fn udp_flow(
    tailnet: Arc<crate::UdpSocket>,
    local: tokio::net::UdpSocket,
    peer: SocketAddr,
    mut from_peer: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            datagram = from_peer.recv() => match datagram {
                Some(d) => { let _ = local.send(&d).await; }
                None => return,
            },
            answer = tokio::time::timeout(UDP_FLOW_IDLE, local.recv(&mut buf)) => match answer {
                Ok(Ok(n)) => { let _ = tailnet.send_to(&buf[..n], peer).await; }
                // A refused port (ICMP) ends nothing: the service may come back.
                Ok(Err(_)) => {}
                Err(_) => return,
            },
        }
    }
}

fn protocol(served: &Served) -> &'static str {
    if served.udp { "udp" } else { "tcp" }
}

fn status_json(s: &Status, serves: &[Served]) -> serde_json::Value {
    json!({
        "serving": serves.iter().map(|v| json!({"port": v.port, "target": v.target.to_string(), "protocol": protocol(v)})).collect::<Vec<_>>(),
        "node_id": s.node_id, "hostname": s.hostname, "address": s.address.to_string(),
        "address6": s.address6.map(|a| a.to_string()), "tailnet": s.tailnet,
        "endpoint": s.endpoint.to_string(),
        "peers": s.peers.iter().map(|p| json!({
            "id": p.peer.id, "hostname": p.peer.hostname,
            "addresses": p.peer.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tags": p.peer.tags, "owner": p.peer.owner, "online": p.peer.online,
            "path": match p.path {
                Some(crate::wg::Route::Direct(addr)) => format!("direct {addr}"),
                Some(crate::wg::Route::Relay(_)) => "relay".to_string(),
                None => "none".to_string(),
            },
            "last_handshake_seconds_ago": p.last_handshake, "tx_bytes": p.tx_bytes, "rx_bytes": p.rx_bytes,
        })).collect::<Vec<_>>(),
        "dropped": {
            "malformed": s.drops.malformed, "unknown_peer": s.drops.unknown_peer, "bad_source": s.drops.bad_source,
            "filtered": s.drops.filtered, "replayed": s.drops.replayed, "undecryptable": s.drops.undecryptable,
        },
    })
}

async fn serve_control(
    node: Arc<Node>,
    listener: UnixListener,
    down: tokio::sync::mpsc::Sender<()>,
    serves: Vec<Served>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let node = node.clone();
        let down = down.clone();
        let serves = serves.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim().split_once(' ').unwrap_or((line.trim(), "")) {
                ("status", _) => status_json(&node.status().await, &serves),
                ("whois", ip) => match ip.parse::<IpAddr>().ok().and_then(|ip| node.whois(ip)) {
                    Some(p) => json!({"id": p.id, "hostname": p.hostname, "tags": p.tags, "owner": p.owner,
                        "addresses": p.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "run": p.run.as_ref().map(|r| json!({"issuer": r.issuer, "subject": r.subject, "claims": r.claims})),
                        "user": p.user.as_ref().map(|u| json!({"id": u.id, "email": u.email, "name": u.display_name, "groups": u.groups}))}),
                    None => json!({"error": format!("no node has address {ip}")}),
                },
                ("down", _) => {
                    let _ = down.send(()).await;
                    json!({"ok": true})
                }
                (other, _) => json!({"error": format!("unknown command {other:?}")}),
            };
            let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
        });
    }
}

async fn client(state_dir: &Path, command: &str, raw_json: bool) -> i32 {
    let path = state_dir.join(SOCKET);
    let mut stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(_) => {
            eprintln!(
                "agentd: no agentd is running with state directory {} (start one with `agentd up`)",
                state_dir.display()
            );
            return 1;
        }
    };
    if stream.write_all(format!("{command}\n").as_bytes()).await.is_err() {
        return 1;
    }
    let mut reply = String::new();
    if stream.read_to_string(&mut reply).await.is_err() {
        return 1;
    }
    let value: serde_json::Value = serde_json::from_str(reply.trim()).unwrap_or_default();
    if let Some(err) = value.get("error") {
        eprintln!("agentd: {}", err.as_str().unwrap_or_default());
        return 1;
    }
    if raw_json || command != "status" {
        if command != "down" {
            say!("{value:#}");
        }
        return 0;
    }
    say!(
        "{} {} in {} (node {}, endpoint {})",
        value["hostname"],
        value["address"],
        value["tailnet"],
        value["node_id"],
        value["endpoint"]
    );
    say!("{:<20} {:<15} {:<28} {:>10} {:>12} {:>12}", "PEER", "ADDRESS", "PATH", "HANDSHAKE", "TX", "RX");
    for p in value["peers"].as_array().into_iter().flatten() {
        let handshake = p["last_handshake_seconds_ago"].as_u64().map_or("-".into(), |s| format!("{s}s ago"));
        say!(
            "{:<20} {:<15} {:<28} {:>10} {:>12} {:>12}",
            p["hostname"].as_str().unwrap_or(""),
            p["addresses"][0].as_str().unwrap_or(""),
            p["path"].as_str().unwrap_or(""),
            handshake,
            p["tx_bytes"],
            p["rx_bytes"]
        );
    }
    for v in value["serving"].as_array().into_iter().flatten() {
        say!(
            "serving tailnet port {} from {} ({})",
            v["port"],
            v["target"].as_str().unwrap_or(""),
            v["protocol"].as_str().unwrap_or("")
        );
    }
    0
}
