//! The AI gateway of every tailnet: a userspace node the server runs itself at the tailnet's reserved
//! address, serving the OpenAI and Anthropic HTTP APIs on port 80. It holds no port or interface of its
//! own: its WireGuard datagrams travel on the server's one UDP port (shared by every gateway, see
//! [`crate::port`]) or through the server's relay in memory, and its netmap comes straight from the
//! server's netmap feed. A tailnet's gateway starts when the tailnet is
//! created (or the server starts), and stops when the tailnet goes.

pub mod proxy;
pub mod rules;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agentd::{Hosted, StackConfig};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::control_plane::ControlPlane;
use crate::error::{Error, Result};
use crate::model::TailnetId;
use crate::relay::{Key, Limiter};
use crate::store::{EventFilter, GatewayEvent, GatewayKeys};

/// Gateway connections carry LLM requests, not bulk data: small buffers keep thousands of idle gateways
/// cheap (buffers are only touched as data flows).
const STACK: StackConfig = StackConfig { tcp_buffer: 64 * 1024, spare_listeners: 2 };
/// Audit events written per storage batch at most.
const AUDIT_BATCH: usize = 1024;

pub type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// An HTTP(S) client with the web PKI roots (for upstreams and OIDC issuers).
pub fn https_connector() -> Https {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring provides TLS 1.2 and 1.3")
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// A gateway request's audit event on its way to the store, and who waits for its commit.
pub struct AuditEntry {
    event: GatewayEvent,
    committed: oneshot::Sender<bool>,
}

/// The server's gateways: which run, the client they share for upstream calls, and the audit queue.
pub struct Gateways {
    /// The running gateways, each with what tells it to stop.
    running: Mutex<HashMap<TailnetId, tokio::sync::watch::Sender<bool>>>,
    /// Signalled whenever a gateway's task ends.
    ended: tokio::sync::Notify,
    pub(crate) client: Client<Https, Full<Bytes>>,
    audit: mpsc::UnboundedSender<AuditEntry>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Gateways {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> (Gateways, mpsc::UnboundedReceiver<AuditEntry>) {
        let (audit, rx) = mpsc::unbounded_channel();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https_connector());
        (Gateways { running: Mutex::default(), ended: Default::default(), client, audit, metrics }, rx)
    }

    /// How many gateways run now.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    pub fn is_running(&self, tailnet: TailnetId) -> bool {
        self.running.lock().unwrap().contains_key(&tailnet)
    }

    /// Tells a gateway to stop (its lease went elsewhere).
    pub fn stop(&self, tailnet: TailnetId) {
        if let Some(stop) = self.running.lock().unwrap().get(&tailnet) {
            stop.send_replace(true);
        }
    }

    /// Waits (up to 5 s) until none of `tailnets` runs.
    pub async fn wait_stopped(&self, tailnets: &[TailnetId]) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let ended = self.ended.notified();
                if !tailnets.iter().any(|t| self.is_running(*t)) {
                    return;
                }
                ended.await;
            }
        })
        .await;
    }

    /// Queues a request's audit event; the receiver learns whether it committed. A response waits for
    /// that before its last byte leaves, so an answered request always has its event.
    pub(crate) fn record(&self, event: GatewayEvent) -> oneshot::Receiver<bool> {
        let (committed, rx) = oneshot::channel();
        self.metrics.gateway_request(event.tailnet, &event.request);
        self.metrics.audit_queued();
        if self.audit.send(AuditEntry { event, committed }).is_err() {
            self.metrics.audit_written(1);
        }
        rx
    }
}

/// Writes queued gateway audit events, all that queued meanwhile in one commit (group commit), and
/// tells each request whether its event is durable. Runs until `finish` fires (after the gateways
/// stopped: it then writes what they queued last and ends) or the control plane goes.
pub fn spawn_audit_writer(
    cp: Weak<ControlPlane>,
    mut rx: mpsc::UnboundedReceiver<AuditEntry>,
    mut finish: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(AUDIT_BATCH);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, AUDIT_BATCH) => n,
                _ = &mut finish => {
                    rx.close();
                    rx.recv_many(&mut batch, AUDIT_BATCH).await
                }
            };
            if n == 0 {
                return;
            }
            let Some(cp) = cp.upgrade() else { return };
            let (events, waiting): (Vec<_>, Vec<_>) = batch.drain(..).map(|e| (e.event, e.committed)).unzip();
            let n = events.len();
            let ok = match cp.record_gateway_requests(events).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, events = n, "could not write gateway audit events");
                    false
                }
            };
            cp.metrics.audit_written(n);
            for w in waiting {
                let _ = w.send(ok);
            }
        }
    })
}

/// Deletes audit events older than the retention, now and then every hour.
pub fn spawn_audit_pruner(owner: &ControlPlane, cp: Weak<ControlPlane>, retention: Duration) {
    owner.spawn(async move {
        loop {
            let Some(strong) = cp.upgrade() else { return };
            let mut shutdown = strong.shutdown_signal();
            if let Some(before) = strong.now().checked_sub(retention) {
                loop {
                    match strong.prune_events(before, 10_000).await {
                        Ok(0) => break,
                        Ok(n) => tracing::info!(events = n, ?retention, "pruned audit events past their retention"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not prune audit events");
                            break;
                        }
                    }
                }
            }
            drop(strong);
            tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    });
}

/// One running gateway, as its request handlers see it.
pub struct Gateway {
    pub(crate) cp: Arc<ControlPlane>,
    pub(crate) tailnet: TailnetId,
    pub(crate) node_id: String,
    pub(crate) node: agentd::Node,
    pub(crate) meters: rules::Meters,
}

/// Forgets a gateway in the running set when its task ends.
struct RunningGuard<'a>(&'a Gateways, TailnetId);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.lock().unwrap().remove(&self.1);
        self.0.ended.notify_waiters();
    }
}

/// Starts `tailnet`'s gateway in the background (a no-op if it runs).
pub fn start(cp: &Arc<ControlPlane>, tailnet: TailnetId) {
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    {
        let mut running = cp.gateways.running.lock().unwrap();
        if running.contains_key(&tailnet) {
            return;
        }
        running.insert(tailnet, stop_tx);
    }
    let owner = cp.clone();
    let cp = cp.clone();
    owner.spawn(async move {
        let guard = RunningGuard(&cp.gateways, tailnet);
        let mut shutdown = cp.shutdown_signal();
        let mut backoff = Duration::from_millis(250);
        // Runs again (after a pause) if it stops while its tailnet lives: a gateway is never left down.
        loop {
            match run(&cp, tailnet, stop.clone()).await {
                Ok(()) => tracing::debug!(%tailnet, "gateway stopped"),
                Err(Error::NotFound { .. }) => break,
                Err(e) => tracing::warn!(%tailnet, error = %e, "gateway stopped"),
            }
            if *shutdown.borrow() || *stop.borrow() || cp.get_tailnet(tailnet).await.is_err() {
                break;
            }
            tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => break,
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        drop(guard);
    });
}

pub(crate) fn fresh_keys() -> GatewayKeys {
    let secret = boringtun::x25519::StaticSecret::from(rand::random::<[u8; 32]>());
    let public = boringtun::x25519::PublicKey::from(&secret).to_bytes();
    GatewayKeys { secret: secret.to_bytes(), public }
}

/// Runs one gateway until its tailnet goes, the server shuts down or `stop` says so.
async fn run(cp: &Arc<ControlPlane>, tailnet: TailnetId, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    let (node_id, secret) = cp.ensure_gateway(tailnet, fresh_keys()).await?;
    let record = cp.get_node(node_id).await?;
    let public = record.wireguard_public_key;
    // Direct paths through this server's UDP port, where it has one; nodes learn where from the
    // gateway's record (it moves with the lease).
    let (socket, _attachment, endpoints) = match cp.port.get() {
        Some(port) => {
            let (socket, attachment) = port.attach(&public);
            (Some(socket), Some(attachment), port.endpoints())
        }
        None => (None, None, Vec::new()),
    };
    if record.endpoints != endpoints {
        cp.set_endpoints(node_id, endpoints).await?;
    }
    let feed = crate::api::node::netmap_feed(cp, record, 0).await?;
    let (relay_out, outbound) = mpsc::channel(1024);
    let (inbound, relay_in) = mpsc::channel(1024);
    let node = agentd::Node::hosted(Hosted {
        secret,
        node_id: node_id.to_string(),
        netmap: Box::pin(tokio_stream::wrappers::ReceiverStream::new(feed)),
        relay_out,
        relay_in,
        socket,
        stack: STACK,
    })
    .await
    .map_err(|e| Error::Unavailable(format!("gateway of tailnet {tailnet}: {e}")))?;
    let mut listener =
        node.listen(80).await.map_err(|e| Error::Unavailable(format!("gateway of tailnet {tailnet}: {e}")))?;
    let mut ended = node.ended();
    let meters = rules::Meters::default();
    restore_meters(cp, tailnet, &meters).await?;
    let gateway = Arc::new(Gateway { cp: cp.clone(), tailnet, node_id: node_id.to_string(), node, meters });
    tracing::debug!(%tailnet, node = %node_id, "gateway up");
    if cp.cluster.get().is_some() {
        // It may have run on another replica a moment ago: the peers' sessions are with that one.
        gateway.node.rehandshake_all();
    }
    let pump = pump(cp, tailnet, public, outbound, inbound);
    tokio::pin!(pump);
    // Aborted when the gateway stops: a connection does not outlive its tunnel.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = ended.wait_for(Option::is_some) => break,
            _ = stop.wait_for(|s| *s) => break,
            () = &mut pump => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(proxy::serve_connection(gateway.clone(), stream, peer));
                }
                Err(_) => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    gateway.node.shutdown().await;
    Ok(())
}

/// Counts what the audit log says this tailnet's callers used in the current windows, so that a restart
/// does not hand out budgets afresh.
async fn restore_meters(cp: &ControlPlane, tailnet: TailnetId, meters: &rules::Meters) -> Result<()> {
    let now = cp.now();
    let mut filter = EventFilter { tailnet: Some(tailnet), limit: 1000, ..Default::default() };
    loop {
        let (events, more) = cp.list_events(&filter).await?;
        for e in &events {
            let (Some(g), Some(node)) = (&e.gateway, e.node_id) else { continue };
            let tokens = g.charged_tokens.max(g.input_tokens.saturating_add(g.output_tokens));
            if tokens == 0 {
                continue;
            }
            let who = rules::Who {
                node: node.to_string(),
                run: e.run.as_ref().map(|r| rules::run_key(&r.issuer, &r.subject, &r.claims)),
                owner: g.owner.clone(),
                user: e.user.as_ref().map(|u| u.id.to_string()),
            };
            meters.restore(&who, tokens, e.time, now);
        }
        match events.last() {
            Some(last) if more => filter.after_revision = last.revision,
            _ => return Ok(()),
        }
    }
}

/// Carries the gateway's datagrams through the relay: what it sends to the peers' mailboxes, what
/// arrives in its own mailbox to it. Ends when the gateway's node stops sending.
async fn pump(
    cp: &Arc<ControlPlane>,
    tailnet: TailnetId,
    me: Key,
    mut outbound: mpsc::Receiver<(Key, Vec<u8>)>,
    inbound: mpsc::Sender<(Key, Vec<u8>)>,
) {
    let (mailbox, _registration) = cp.relays.register(tailnet, me);
    let _home = cp.relay_home(tailnet, me).await;
    let mut limiter = Limiter::default();
    loop {
        tokio::select! {
            frame = outbound.recv() => match frame {
                Some((to, data)) => cp.relay_frame(tailnet, me, &to, data, &mut limiter).await,
                None => return,
            },
            _ = mailbox.ready.notified() => {
                for frame in mailbox.take(256, usize::MAX) {
                    // A full queue drops, as a network would; WireGuard and TCP recover.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = inbound.try_send(frame) {
                        return;
                    }
                }
            }
        }
    }
}
