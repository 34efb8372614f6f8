//! The control client: register (or resume a saved session), then follow the netmap stream, reconnecting
//! with jittered backoff until the server says the identity is gone.

use std::sync::Arc;
use std::time::Duration;

use cordon_proto::v1 as pb;
use cordon_proto::v1::node_client::NodeClient;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

use crate::dataplane::Command;
use crate::error::Error;
use crate::netmap::NetMap;
use crate::wg::PeerConfig;

pub type Client = NodeClient<Channel>;
/// The netmap messages of one session: from the server's `WatchNetMap`, or fed in-process (the gateway).
pub type NetMapStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::NetMap, tonic::Status>> + Send>>;

/// Why the node's session ended for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub reason: pb::stream_ended::Reason,
    pub message: String,
}

/// The server's URLs: `--server` takes several, comma-separated (the replicas of one deployment), and a
/// name may resolve to several addresses. Connections go to the one that answered last, else to the next
/// that answers. Each clone keeps its own place in the list.
pub struct Servers {
    urls: Arc<Vec<String>>,
    ca: Option<Arc<Vec<u8>>>,
    current: std::sync::atomic::AtomicUsize,
}

impl Clone for Servers {
    fn clone(&self) -> Self {
        Servers { urls: self.urls.clone(), ca: self.ca.clone(), current: self.index().into() }
    }
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.urls.iter()).finish()
    }
}

impl Servers {
    pub fn new(list: &str, ca_cert: Option<Vec<u8>>) -> Result<Servers, Error> {
        let urls: Vec<String> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if urls.is_empty() {
            return Err(Error::BadServerUrl(list.to_string()));
        }
        if let Some(bad) = urls.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(Error::BadServerUrl(bad.clone()));
        }
        Ok(Servers { urls: Arc::new(urls), ca: ca_cert.map(Arc::new), current: 0.into() })
    }

    /// The first URL given (for the host's route and the STUN host).
    pub fn first(&self) -> &str {
        &self.urls[0]
    }

    fn index(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next connection starts with the following server (the current one just went away).
    pub fn rotate(&self) {
        let next = (self.index() + 1) % self.urls.len();
        self.current.store(next, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connects to the current server, else to each of the others in turn; the error is the last one's.
    pub async fn connect(&self) -> Result<Client, Error> {
        let n = self.urls.len();
        let start = self.index();
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            for (url, name) in targets(&self.urls[at]).await {
                match connect_to(&url, name.as_deref(), self.ca.as_deref().map(Vec::as_slice)).await {
                    Ok(client) => {
                        self.current.store(at, std::sync::atomic::Ordering::Relaxed);
                        return Ok(client);
                    }
                    Err(e) => {
                        tracing::debug!(server = %url, error = %e, "server not reachable; trying the next");
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.expect("at least one server"))
    }
}

/// Where one URL can be dialled: itself, or, when its name resolves to several addresses, each address
/// (with the name kept for TLS).
async fn targets(url: &str) -> Vec<(String, Option<String>)> {
    let host = server_host(url);
    let plain = vec![(url.to_string(), None)];
    if host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return plain;
    }
    let default_port = if url.starts_with("https://") { 443 } else { 80 };
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or("");
    let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(default_port);
    let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await else { return plain };
    let mut addrs: Vec<std::net::SocketAddr> = addrs.collect();
    addrs.dedup();
    if addrs.len() < 2 {
        return plain;
    }
    let scheme = if url.starts_with("https://") { "https" } else { "http" };
    let path = url.split("://").nth(1).and_then(|rest| rest.find('/').map(|i| &rest[i..])).unwrap_or("");
    addrs.into_iter().map(|a| (format!("{scheme}://{a}{path}"), Some(host.clone()))).collect()
}

/// Connects to the server. `https://` servers are verified against the system's trust store, plus
/// `ca_cert` (PEM) for a private CA.
pub async fn connect(server: &str, ca_cert: Option<&[u8]>) -> Result<Client, Error> {
    connect_to(server, None, ca_cert).await
}

/// As [`connect`], dialling `server` but verifying the certificate for `tls_name` when given.
async fn connect_to(server: &str, tls_name: Option<&str>, ca_cert: Option<&[u8]>) -> Result<Client, Error> {
    let bad = || Error::BadServerUrl(server.to_string());
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(bad());
    }
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .map_err(|_| bad())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if server.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = ca_cert {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        if let Some(name) = tls_name {
            tls = tls.domain_name(name);
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Error::Unreachable { server: server.into(), detail: e.to_string() })?;
    } else if ca_cert.is_some() {
        tracing::warn!("--ca-cert is ignored: the server URL is not https://");
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let chain = source_chain(&e);
        match tls_refusal(&chain) {
            Some(why) => {
                tracing::debug!(error = %chain, "TLS handshake refused");
                Error::Untrusted { server: server.into(), detail: why.into() }
            }
            None => Error::Unreachable { server: server.into(), detail: chain },
        }
    })?;
    Ok(NodeClient::new(channel).max_decoding_message_size(64 << 20))
}

/// What a failed TLS handshake says, in words a person can act on.
fn tls_refusal(chain: &str) -> Option<&'static str> {
    // rustls names the failed check in its error, in Debug or Display form.
    let chain = chain.to_lowercase().replace(' ', "");
    if chain.contains("notvalidforname") {
        Some("its certificate is for another name; use the name the certificate was issued for in the URL")
    } else if chain.contains("unknownissuer") || chain.contains("badsignature") {
        Some("its certificate is not signed by a CA this host trusts; give --ca-cert with the CA that signed it")
    } else if chain.contains("expired") || chain.contains("notvalidyet") {
        Some("its certificate is expired or not yet valid; check the server's certificate and this host's clock")
    } else if chain.contains("invalidpeercertificate") {
        Some("its certificate was refused; check it, or give --ca-cert for a private CA")
    } else {
        None
    }
}

/// An error and its sources, one line: `outer: inner: root`.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A refusal is final for the credential; anything else may pass.
pub fn rejected(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::NotFound
    )
}

/// Opens the netmap stream; `since` is the revision of the map the node holds (0: none), so that the
/// server may start with a delta from there.
pub async fn watch(client: &mut Client, session_token: &str, since: u64) -> Result<NetMapStream, tonic::Status> {
    client
        .watch_net_map(pb::WatchNetMapRequest { session_token: session_token.to_string(), since_revision: since })
        .await
        .map(|r| Box::pin(r.into_inner()) as NetMapStream)
}

/// The first message of a stream: the full map.
pub async fn first_netmap(stream: &mut NetMapStream) -> Result<NetMap, Error> {
    let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .map_err(|_| Error::Protocol("nothing within 30 s".into()))?
        .ok_or_else(|| Error::Protocol("an empty stream".into()))?
        .map_err(|s| Error::Rejected(s.message().to_string()))?;
    match message.update {
        Some(pb::net_map::Update::Full(full)) => NetMap::from_full(message.revision, &full),
        Some(pb::net_map::Update::Ended(e)) if e.reason() == pb::stream_ended::Reason::LoginExpired => {
            Err(Error::LoginExpired(e.message))
        }
        Some(pb::net_map::Update::Ended(e)) => Err(Error::Revoked(e.message)),
        other => Err(Error::Protocol(format!("{other:?}"))),
    }
}

/// Everything the follow loop updates.
pub struct Follow {
    /// `None` for a node fed in-process: when its stream ends, so does the node.
    pub servers: Option<Servers>,
    pub session_token: String,
    pub netmap: watch::Sender<Arc<NetMap>>,
    pub ended: watch::Sender<Option<Ended>>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub shutdown: watch::Receiver<bool>,
    pub server_host: String,
    /// `server_host`'s address once looked up (for peers advertised at "the server's host").
    pub server_ip: std::sync::Mutex<Option<std::net::IpAddr>>,
    pub reconnects: Arc<Reconnects>,
}

/// How often the node's streams to the server came back after breaking.
#[derive(Debug, Default)]
pub struct Reconnects {
    pub netmap: std::sync::atomic::AtomicU64,
    pub relay: std::sync::atomic::AtomicU64,
    /// Netmap reconnections the server resumed with a delta from the node's revision (the others
    /// started over with a full map).
    pub resumed: std::sync::atomic::AtomicU64,
}

/// The node's side of the relay: its stream's two directions, and what to tell when it comes back.
pub struct RelayLink {
    pub outbound: mpsc::Receiver<(crate::wg::Key, Vec<u8>)>,
    pub inbound: mpsc::Sender<(crate::wg::Key, Vec<u8>)>,
    pub netmap: watch::Receiver<Arc<NetMap>>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub reconnects: Arc<Reconnects>,
}

/// Keeps the node's relay stream open (reconnecting with backoff) and hands the data plane what arrives;
/// what the data plane sends goes into the stream without passing through this task ([`OutboundStream`]).
/// When the stream comes back after a break the server has likely restarted, and with it the tailnet's gateway,
/// which lost its WireGuard sessions: the node starts a new handshake with it at once instead of waiting
/// out WireGuard's 15 s of unanswered data.
pub async fn relay(servers: Servers, session_token: String, link: RelayLink, mut shutdown: watch::Receiver<bool>) {
    let RelayLink { outbound, inbound, netmap, commands, reconnects } = link;
    let outbound = Arc::new(std::sync::Mutex::new(outbound));
    let mut backoff = Duration::from_millis(250);
    let mut connected_before = false;
    loop {
        let connected = tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            c = servers.connect() => c,
        };
        let mut client = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "no server reachable for the relay stream; retrying");
                let wait = backoff.mul_f64(rand::random::<f64>() * 0.5 + 0.75);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        // The request stream ends when its call does (or fails).
        let (request_open, request_closed) = oneshot::channel();
        let mut request = tonic::Request::new(OutboundStream { queue: outbound.clone(), connection: request_closed });
        if let Ok(value) = format!("Bearer {session_token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request.metadata_mut().insert(pb::RELAY_BATCH_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        let call = tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            call = client.relay(request) => call,
        };
        match call {
            Ok(response) => {
                backoff = Duration::from_millis(250);
                if connected_before {
                    reconnects.relay.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(gateway) = &netmap.borrow().gateway_peer {
                        let _ = commands.send(Command::Rehandshake(gateway.key));
                    }
                }
                connected_before = true;
                // Decoded here, beside the data plane rather than on its task.
                let mut frames = response.into_inner();
                loop {
                    tokio::select! {
                        _ = crate::stopped(&mut shutdown) => return,
                        frame = frames.message() => match frame {
                            Ok(Some(p)) => {
                                let single = (!p.peer_key.is_empty()).then_some(pb::RelayFrame { peer_key: p.peer_key, data: p.data });
                                for f in single.into_iter().chain(p.frames) {
                                    if let Ok(key) = <crate::wg::Key>::try_from(f.peer_key.as_slice()) {
                                        let _ = inbound.try_send((key, f.data));
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(error = %status.message(), "relay stream ended; reconnecting");
                                break;
                            }
                        },
                    }
                }
                // The call's request stream ends with it.
                drop(request_open);
                if outbound.lock().unwrap().is_closed() {
                    return;
                }
                // Its server likely went away: start with another.
                servers.rotate();
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => return,
            Err(status) => {
                tracing::debug!(error = %status.message(), "relay stream failed; retrying");
                servers.rotate();
            }
        }
        let wait = backoff.mul_f64(rand::random::<f64>() * 0.5 + 0.75);
        backoff = (backoff * 2).min(Duration::from_secs(30));
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Frames and bytes per relay message, at most: under the server's 256 KiB request limit.
const RELAY_BATCH: usize = 64;
const RELAY_BATCH_BYTES: usize = 192 * 1024;

/// The data plane's queue of frames for the relay, shared by the calls made one after another.
type OutboundQueue = Arc<std::sync::Mutex<mpsc::Receiver<(crate::wg::Key, Vec<u8>)>>>;

/// The request stream of one relay call: it takes the data plane's queued frames as HTTP/2 sends them, so
/// a frame takes no extra task on its way out, and ends when its call does (the stream of a call on its
/// way out must not take frames from the next one).
struct OutboundStream {
    queue: OutboundQueue,
    connection: oneshot::Receiver<()>,
}

impl futures::Stream for OutboundStream {
    type Item = pb::RelayPacket;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if std::future::Future::poll(std::pin::Pin::new(&mut self.connection), cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        let mut frames = self.queue.lock().unwrap();
        // What else is waiting goes in the same message.
        frames.poll_recv(cx).map(|first| first.map(|first| batch(first, &mut frames)))
    }
}

/// One relay message: `first` and whatever else is queued, up to the batch limits.
fn batch(
    first: (crate::wg::Key, Vec<u8>),
    outbound: &mut mpsc::Receiver<(crate::wg::Key, Vec<u8>)>,
) -> pb::RelayPacket {
    let mut bytes = first.1.len();
    let mut frames = vec![pb::RelayFrame { peer_key: first.0.to_vec(), data: first.1 }];
    while frames.len() < RELAY_BATCH && bytes < RELAY_BATCH_BYTES - crate::wg::MAX_DATAGRAM {
        let Ok((key, data)) = outbound.try_recv() else { break };
        bytes += data.len();
        frames.push(pb::RelayFrame { peer_key: key.to_vec(), data });
    }
    pb::RelayPacket { frames, ..Default::default() }
}

/// Follows the netmap until the identity ends or the node shuts down; reconnects in between.
pub async fn follow(mut f: Follow, mut stream: NetMapStream) {
    let mut backoff = Duration::from_millis(250);
    let mut reconnected = false;
    loop {
        // Read until the stream fails or ends.
        loop {
            let message = tokio::select! {
                _ = crate::stopped(&mut f.shutdown) => return,
                m = stream.next() => m,
            };
            match message {
                Some(Ok(m)) => {
                    backoff = Duration::from_millis(250);
                    if std::mem::take(&mut reconnected) && matches!(m.update, Some(pb::net_map::Update::Delta(_))) {
                        f.reconnects.resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Some(ended) = apply(&f, m) {
                        if ended.1 {
                            tracing::info!(reason = ?ended.0.reason, message = %ended.0.message, "server ended the session; will reconnect");
                            break;
                        }
                        tracing::warn!(reason = ?ended.0.reason, message = %ended.0.message, "this node was revoked");
                        f.ended.send_replace(Some(ended.0));
                        return;
                    }
                }
                None => break,
                Some(Err(status)) => {
                    tracing::info!(error = %status.message(), "netmap stream broke; reconnecting");
                    break;
                }
            }
        }
        let Some(servers) = f.servers.as_ref() else {
            let ended =
                Ended { reason: pb::stream_ended::Reason::NodeRemoved, message: "the host stopped this node".into() };
            f.ended.send_replace(Some(ended));
            return;
        };
        // Its server likely went away (a replica stopping or dying): start with another. The first try
        // comes at once, then with jittered exponential backoff.
        servers.rotate();
        let mut first = true;
        stream = loop {
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            let wait = if std::mem::take(&mut first) {
                Duration::from_millis(50).mul_f64(jitter)
            } else {
                backoff.mul_f64(jitter)
            };
            backoff = (backoff * 2).min(Duration::from_secs(30));
            tokio::select! {
                _ = crate::stopped(&mut f.shutdown) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut client = match servers.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, ?wait, "no server reachable");
                    continue;
                }
            };
            let since = f.netmap.borrow().revision;
            match watch(&mut client, &f.session_token, since).await {
                Ok(s) => {
                    f.reconnects.netmap.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    reconnected = true;
                    break s;
                }
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    let ended = Ended {
                        reason: pb::stream_ended::Reason::NodeRemoved,
                        message: format!("the server no longer knows this node ({})", status.message()),
                    };
                    tracing::warn!(message = %ended.message, "this node was revoked");
                    f.ended.send_replace(Some(ended));
                    return;
                }
                Err(status) => {
                    tracing::debug!(error = %status.message(), ?wait, "reconnect failed");
                    servers.rotate();
                }
            }
        };
    }
}

/// Applies one message; returns `(ended, retry)` when it ends the stream.
fn apply(f: &Follow, m: pb::NetMap) -> Option<(Ended, bool)> {
    match m.update {
        Some(pb::net_map::Update::Full(full)) => match NetMap::from_full(m.revision, &full) {
            Ok(map) => publish(f, map),
            Err(e) => tracing::warn!(error = %e, "ignoring a bad netmap"),
        },
        Some(pb::net_map::Update::Delta(delta)) => {
            let mut map = (**f.netmap.borrow()).clone();
            map.apply(m.revision, &delta);
            publish(f, map);
        }
        Some(pb::net_map::Update::Ended(e)) => {
            let retry = e.retry;
            return Some((Ended { reason: e.reason(), message: e.message }, retry));
        }
        None => {}
    }
    None
}

/// The STUN reflector's address: `host:port` from the netmap, the server's host where it names none.
pub fn resolve_stun(stun: &str, server_host: &str) -> Option<std::net::SocketAddr> {
    let (host, port) = stun.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() || host == "0.0.0.0" || host == "::" { server_host } else { host };
    let port: u16 = port.parse().ok()?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok()?.find(|a| a.is_ipv4())
}

/// The host part of a server URL.
pub fn server_host(server: &str) -> String {
    let authority = server.split("://").nth(1).unwrap_or(server).split('/').next().unwrap_or("");
    match authority.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => authority.to_string(),
    }
}

/// The IPv4 address of `server_host` (blocking: a name is looked up).
pub fn server_ip(server_host: &str) -> Option<std::net::IpAddr> {
    resolve_stun(&format!("{server_host}:0"), server_host).map(|a| a.ip())
}

/// Peer endpoints with an unspecified address (`0.0.0.0:port`) mean "the server's host": a server that
/// does not know which of its addresses nodes reach puts its gateway's UDP port so. They are given the
/// host the node reaches the server at, or dropped when it does not resolve.
/// `server` is asked at most once, and only when some peer has such an endpoint.
pub fn server_endpoints(
    mut peers: Vec<PeerConfig>,
    server: impl FnOnce() -> Option<std::net::IpAddr>,
) -> Vec<PeerConfig> {
    let mut server = Some(server);
    let mut ip = None;
    for peer in &mut peers {
        if !peer.endpoints.iter().any(|e| e.ip().is_unspecified()) {
            continue;
        }
        if let Some(resolve) = server.take() {
            ip = resolve();
        }
        peer.endpoints = peer
            .endpoints
            .iter()
            .filter_map(|e| match (e.ip().is_unspecified(), ip) {
                (false, _) => Some(*e),
                (true, Some(ip)) => Some(std::net::SocketAddr::new(ip, e.port())),
                (true, None) => None,
            })
            .collect();
    }
    peers
}

fn publish(f: &Follow, map: NetMap) {
    // Looked up once and kept: a netmap message must not wait on DNS, and a failed lookup keeps the last.
    let server = || {
        let mut known = f.server_ip.lock().unwrap();
        if known.is_none() {
            *known = server_ip(&f.server_host);
        }
        *known
    };
    let _ = f.commands.send(Command::SetPeers(server_endpoints(map.peer_configs(), server)));
    {
        let current = f.netmap.borrow();
        if current.stun != map.stun || current.relay != map.relay {
            let stun = resolve_stun(&map.stun, &f.server_host);
            let _ = f.commands.send(Command::SetPaths { stun, relay: map.relay });
        }
    }
    if f.netmap.borrow().filter != map.filter {
        let _ = f.commands.send(Command::SetFilter(map.filter.clone()));
    }
    f.netmap.send_replace(Arc::new(map));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(queue: &OutboundQueue) -> (OutboundStream, oneshot::Sender<()>) {
        let (open, closed) = oneshot::channel();
        (OutboundStream { queue: queue.clone(), connection: closed }, open)
    }

    #[tokio::test]
    async fn a_relay_request_stream_sends_the_queued_frames_in_batches_and_ends_with_its_connection() {
        let (tx, rx) = mpsc::channel(16);
        let queue = Arc::new(std::sync::Mutex::new(rx));
        let (mut old, old_connection) = outbound(&queue);
        tx.send(([1; 32], vec![1; 100])).await.unwrap();
        tx.send(([2; 32], vec![2; 200])).await.unwrap();
        let packet = old.next().await.unwrap();
        let frames: Vec<_> = packet.frames.iter().map(|f| (f.peer_key[0], f.data.len())).collect();
        assert_eq!(frames, [(1, 100), (2, 200)], "what waited goes in one message, in order");

        // Waiting for a frame, the stream is woken by it (HTTP/2 polls it from its own task).
        let waiting = tokio::spawn(async move {
            let packet = old.next().await;
            (old, packet)
        });
        tokio::task::yield_now().await;
        tx.send(([3; 32], vec![3; 10])).await.unwrap();
        let (mut old, packet) = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        assert_eq!(packet.unwrap().frames[0].peer_key, vec![3; 32]);

        // A reconnect: the stream of the call that ended ends too, even while it waits, and leaves the
        // frames to the next.
        let waiting = tokio::spawn(async move { old.next().await });
        tokio::task::yield_now().await;
        drop(old_connection);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap().is_none());
        let (mut new, _connection) = outbound(&queue);
        tx.send(([4; 32], vec![4; 10])).await.unwrap();
        assert_eq!(new.next().await.unwrap().frames[0].peer_key, vec![4; 32]);
        drop(tx);
        assert!(new.next().await.is_none(), "ends when the data plane does");
    }

    #[test]
    fn servers_are_a_comma_separated_list_of_urls_tried_in_turn() {
        let servers = Servers::new(" http://r1.example:7443 , https://r2.example:7443,", None).unwrap();
        assert_eq!(servers.first(), "http://r1.example:7443");
        assert_eq!(servers.index(), 0);
        servers.rotate();
        assert_eq!(servers.index(), 1);
        let copy = servers.clone();
        servers.rotate();
        assert_eq!((servers.index(), copy.index()), (0, 1), "each clone keeps its own place");
        for bad in ["", " , ", "r1.example:7443", "http://ok:1,ftp://r2"] {
            assert!(matches!(Servers::new(bad, None), Err(Error::BadServerUrl(_))), "{bad:?}");
        }
    }

    #[test]
    fn an_unspecified_endpoint_means_the_servers_host() {
        let peer = |endpoints: &[&str]| PeerConfig {
            key: [1; 32],
            addresses: vec![],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            persistent_keepalive: None,
        };
        let peers = vec![peer(&["0.0.0.0:3478", "192.0.2.7:3478"]), peer(&["198.51.100.1:41641"])];
        let resolved = server_endpoints(peers.clone(), || Some([203, 0, 113, 5].into()));
        assert_eq!(resolved[0].endpoints, peer(&["203.0.113.5:3478", "192.0.2.7:3478"]).endpoints);
        assert_eq!(resolved[1], peers[1], "a peer without one is left as it is");
        // A hosted node knows no server host: the endpoint is dropped rather than dialled at 0.0.0.0.
        assert_eq!(server_endpoints(peers.clone(), || None)[0].endpoints, peer(&["192.0.2.7:3478"]).endpoints);
        let asked = std::cell::Cell::new(0);
        server_endpoints(vec![peers[1].clone()], || {
            asked.set(asked.get() + 1);
            None
        });
        assert_eq!(asked.get(), 0, "no lookup without such an endpoint");
        assert_eq!(server_ip("198.51.100.9"), Some([198, 51, 100, 9].into()));
    }

    #[tokio::test]
    async fn an_ip_address_or_localhost_is_dialled_as_given() {
        for url in ["http://127.0.0.1:7443", "https://[::1]:7443", "http://localhost:7443"] {
            assert_eq!(targets(url).await, vec![(url.to_string(), None)]);
        }
    }
}
