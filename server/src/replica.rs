//! Several replicas over one PostgreSQL database. Each registers itself and heartbeats; follows every
//! change committed by any replica (LISTEN/NOTIFY wakes it, the database holds the order) and publishes
//! it to its own watchers; runs the gateways whose leases it holds; and forwards relayed frames to the
//! replica that holds the receiver's relay stream (a mesh, as DERP's: the nodes need not know where
//! their peers are connected, and a stock client's single relay stream reaches every peer).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cordon_proto::v1 as pb;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::admin::AdminTokens;
use crate::control_plane::ControlPlane;
use crate::error::{Error, Result};
use crate::hub::{Change, NetChange, NetMapUpdate, StoredChange};
use crate::model::{EventKind, NodeId, TailnetId};
use crate::reaper::Deadline;
use crate::relay::Key;
use crate::secret::Secret;
use crate::store::postgres::PgStore;
use crate::store::postgres::cluster::Committed;

/// How often a replica heartbeats (which renews all its gateway leases) and takes free leases. Others
/// take its leases once its heartbeat is older than `cluster::ALIVE_WITHIN` (3 s).
pub const LEASE_ROUND: Duration = Duration::from_secs(1);
/// A replica that could not heartbeat for this long stops its gateways: another may hold them soon.
const LEASE_SAFE: Duration = Duration::from_millis(2500);
/// How long a notification waits for this replica to publish the commit it announces before the
/// follower reads it from the database (another replica's).
const OWN_COMMIT: Duration = Duration::from_millis(10);
/// Revisions read per round of the follower, at most.
const CATCH_UP: u64 = 10_000;
/// How long netmap changes stay in the database for replicas that fall behind.
const CHANGES_KEPT: Duration = Duration::from_secs(600);
/// How long a relay home looked up in the database is trusted (a stream that moves is found again
/// within this), and how long that there is none.
const HOME_CACHE: Duration = Duration::from_millis(250);
const NO_HOME_CACHE: Duration = Duration::from_millis(100);
/// Frames waiting for one replica's mesh link, at most (then the newest are dropped, as a network would).
const LINK_QUEUE: usize = 4096;

/// A replica's id and advertised URL.
type ReplicaUrl = (Uuid, String);
/// Where a relay stream is (if anywhere), and when that was read.
type LookedUp = (Option<ReplicaUrl>, Instant);

/// This replica, as the others know it.
pub struct Cluster {
    pub id: Uuid,
    pub advertise: String,
    mesh_secret: Secret,
    /// Gateways whose lease this replica holds.
    held: Mutex<HashSet<TailnetId>>,
    /// Where each relay stream is, as last looked up.
    homes: Mutex<HashMap<(TailnetId, Key), LookedUp>>,
    /// One outgoing link per other replica.
    links: Mutex<HashMap<Uuid, mpsc::Sender<pb::MeshFrame>>>,
    /// PEM of a CA to trust when dialing other replicas over TLS (the server's own certificate).
    ca: Option<Vec<u8>>,
    /// Presence changes, applied in order by one task.
    presence: mpsc::UnboundedSender<(NodeId, bool)>,
    /// The locked file that holds this replica's id (one process per data directory).
    _id_file: std::fs::File,
}

/// This replica's id, kept in the data directory so that a restart takes its own leases back at once;
/// the file stays locked while the process runs, so two processes cannot share it.
fn replica_id(data_dir: &std::path::Path) -> Result<(Uuid, std::fs::File)> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("replica.id");
    let unavailable = |what: &str, e: std::io::Error| Error::Unavailable(format!("{what} {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| unavailable("cannot open", e))?;
    if let Err(e) = file.try_lock() {
        return Err(Error::Unavailable(format!(
            "{} is locked ({e}): another cordon serve uses this data directory; give each replica its own --data-dir",
            path.display()
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| unavailable("cannot read", e))?;
    if let Ok(id) = Uuid::parse_str(text.trim()) {
        return Ok((id, file));
    }
    let id = Uuid::now_v7();
    file.set_len(0).map_err(|e| unavailable("cannot write", e))?;
    file.rewind().map_err(|e| unavailable("cannot write", e))?;
    writeln!(file, "{id}").and_then(|()| file.sync_all()).map_err(|e| unavailable("cannot write", e))?;
    Ok((id, file))
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.id).field("advertise", &self.advertise).finish_non_exhaustive()
    }
}

impl Cluster {
    /// Registers this replica and starts its follower and its lease rounds.
    pub async fn join(
        cp: &Arc<ControlPlane>,
        data_dir: &std::path::Path,
        advertise: String,
        stun: String,
        admin: Arc<AdminTokens>,
        ca: Option<Vec<u8>>,
    ) -> Result<Arc<Cluster>> {
        let pg = postgres(cp)?;
        let (id, id_file) = replica_id(data_dir)?;
        let mesh_secret = pg.mesh_secret().await?;
        pg.register_replica(id, &advertise, &stun).await?;
        let (presence, presence_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            id,
            advertise,
            mesh_secret,
            held: Mutex::default(),
            homes: Mutex::default(),
            links: Mutex::default(),
            ca,
            presence,
            _id_file: id_file,
        });
        cp.cluster
            .set(cluster.clone())
            .map_err(|_| Error::Unavailable("this server joined its replicas already".into()))?;
        tracing::info!(replica = %id, advertise = %cluster.advertise, "replica registered");
        // Until a lease round says this replica delivers them.
        cp.webhooks.deliver_here(cp, false).await;
        cp.spawn(follow(Arc::downgrade(cp), admin));
        cp.spawn(leases(Arc::downgrade(cp)));
        tokio::spawn(record_presence(Arc::downgrade(cp), id, presence_rx));
        Ok(cluster)
    }

    /// Whether `secret` is the mesh secret (compared as digests).
    pub fn is_mesh_secret(&self, secret: &str) -> bool {
        crate::secret::hash(secret) == self.mesh_secret.hash()
    }

    /// Notes a lease taken outside a round (a tailnet created through this replica).
    pub fn held(&self, tailnet: TailnetId) {
        self.held.lock().unwrap().insert(tailnet);
    }

    /// Records that a node's netmap stream opened here (`true`) or its last one here closed.
    pub fn presence(&self, node: NodeId, present: bool) {
        let _ = self.presence.send((node, present));
    }

    /// Sends a frame to the replica that holds `to`'s relay stream; false if none does.
    pub async fn forward(&self, cp: &ControlPlane, tailnet: TailnetId, from: Key, to: Key, data: Vec<u8>) -> bool {
        let home = {
            let homes = self.homes.lock().unwrap();
            homes
                .get(&(tailnet, to))
                .filter(|(h, at)| at.elapsed() < if h.is_some() { HOME_CACHE } else { NO_HOME_CACHE })
                .map(|(h, _)| h.clone())
        };
        let home = match home {
            Some(home) => home,
            None => {
                let found = match postgres(cp) {
                    Ok(pg) => pg.relay_home(tailnet, &to).await.unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "could not look up a relay home");
                        None
                    }),
                    Err(_) => None,
                };
                let mut homes = self.homes.lock().unwrap();
                if homes.len() > 100_000 {
                    homes.retain(|_, (_, at)| at.elapsed() < HOME_CACHE);
                }
                homes.insert((tailnet, to), (found.clone(), Instant::now()));
                found
            }
        };
        let Some((replica, url)) = home.filter(|(r, _)| *r != self.id) else { return false };
        let link = self.link(cp, replica, &url);
        let frame = pb::MeshFrame {
            tailnet_id: tailnet.0.as_bytes().to_vec(),
            from_key: from.to_vec(),
            to_key: to.to_vec(),
            data,
        };
        link.try_send(frame).is_ok()
    }

    fn link(&self, cp: &ControlPlane, replica: Uuid, url: &str) -> mpsc::Sender<pb::MeshFrame> {
        let mut links = self.links.lock().unwrap();
        if let Some(link) = links.get(&replica).filter(|l| !l.is_closed()) {
            return link.clone();
        }
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        links.insert(replica, tx.clone());
        let secret = self.mesh_secret.expose().to_string();
        cp.spawn(run_link(url.to_string(), secret, self.ca.clone(), rx, cp.shutdown_signal()));
        tx
    }
}

fn postgres(cp: &ControlPlane) -> Result<&PgStore> {
    cp.store.postgres().ok_or_else(|| Error::Unavailable("replicas need the PostgreSQL store".into()))
}

/// One replica's link to another: a client stream of batched frames, redialled when it breaks. Ends when
/// the queue's senders are gone (the link was replaced) or on shutdown.
async fn run_link(
    url: String,
    secret: String,
    ca: Option<Vec<u8>>,
    mut rx: mpsc::Receiver<pb::MeshFrame>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let channel = match dial(&url, ca.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%url, error = %e, "cannot reach a replica for the relay mesh");
                // Frames meanwhile are dropped: WireGuard retries, and the home lookup moves on.
                while rx.try_recv().is_ok() {}
                tokio::select! {
                    _ = crate::control_plane::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut client = pb::mesh_client::MeshClient::new(channel);
        let (tx, batches) = mpsc::channel::<pb::MeshBatch>(64);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(batches));
        if let Ok(value) = format!("Bearer {secret}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        let call = tokio::spawn(async move { client.forward(request).await });
        loop {
            let first = tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => return,
                f = rx.recv() => f,
            };
            let Some(first) = first else { return };
            let mut bytes = first.data.len();
            let mut frames = vec![first];
            while frames.len() < 64 && bytes < 192 * 1024 {
                let Ok(f) = rx.try_recv() else { break };
                bytes += f.data.len();
                frames.push(f);
            }
            if tx.send(pb::MeshBatch { frames }).await.is_err() {
                break;
            }
        }
        if let Ok(Err(status)) = call.await {
            tracing::debug!(%url, error = %status.message(), "relay mesh link ended");
        }
    }
}

async fn dial(url: &str, ca: Option<&[u8]>) -> std::result::Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint.connect().await.map_err(|e| agentd::control::source_chain(&e))
}

/// Publishes every change any replica commits, in revision order: woken by NOTIFY, by a commit that
/// waits for revisions it has not seen, or once a second in case a notification was lost.
async fn follow(cp: Weak<ControlPlane>, admin: Arc<AdminTokens>) {
    let mut last_prune = Instant::now();
    loop {
        let Some(strong) = cp.upgrade() else { return };
        let mut shutdown = strong.shutdown_signal();
        let pg = match postgres(&strong) {
            Ok(pg) => pg,
            Err(_) => return,
        };
        let listened = pg.listen().await;
        drop(strong);
        let (_client, mut notes) = match listened {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for changes from other replicas; retrying");
                tokio::select! {
                    _ = crate::control_plane::stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut read = true;
        loop {
            let Some(cp) = cp.upgrade() else { return };
            if read && let Err(e) = catch_up(&cp, &admin).await {
                tracing::warn!(error = %e, "could not read changes from other replicas");
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                if let Ok(pg) = postgres(&cp)
                    && let Err(e) = pg.prune_changes(CHANGES_KEPT).await
                {
                    tracing::debug!(error = %e, "could not prune old netmap changes");
                }
            }
            let gap = async { cp.store.gap().await };
            let published = cp.store.revision();
            read = tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => return,
                // The notification names the last revision its commit took: one this replica made (and
                // published) needs no read.
                n = notes.recv() => match n {
                    Some(Some(r)) if r <= published => false,
                    // Most likely this replica's own commit, published a moment after its notification.
                    Some(Some(r)) => tokio::time::timeout(OWN_COMMIT, cp.store.hub().published_at_least(r)).await.is_err(),
                    Some(None) => true,
                    None => break,
                },
                _ = gap => true,
                _ = tokio::time::sleep(Duration::from_secs(1)) => true,
            };
        }
    }
}

/// Reads and publishes what was committed after the last published revision.
async fn catch_up(cp: &Arc<ControlPlane>, admin: &AdminTokens) -> Result<()> {
    let pg = postgres(cp)?;
    loop {
        let after = cp.store.revision();
        let (upto, rows) = pg.committed_after(after, CATCH_UP).await?;
        if upto <= after {
            return Ok(());
        }
        let complete = rows.len() as u64 == upto - after;
        let mut changes = Vec::with_capacity(rows.len());
        let mut effects = Vec::new();
        for (revision, row) in rows {
            match row {
                Committed::Event(e) => {
                    effects.push(Effect::Event(e.kind, e.tailnet_id));
                    changes.push(Change::Event(Arc::new(*e)));
                }
                Committed::NetMap(tailnet, stored) => {
                    let change = net_change(cp, tailnet, *stored, &mut effects).await?;
                    changes.push(Change::NetMap { tailnet, update: Arc::new(NetMapUpdate { revision, change }) });
                }
            }
        }
        if complete {
            cp.store.publish_committed(changes);
        } else {
            tracing::warn!(
                after,
                upto,
                "changes from other replicas were pruned before this one read them; resending full netmaps"
            );
            cp.store.resync(upto);
        }
        for effect in effects {
            apply(cp, admin, effect).await;
        }
        if upto - after < CATCH_UP {
            return Ok(());
        }
    }
}

/// What a change made elsewhere means for this replica besides its watchers.
enum Effect {
    Event(EventKind, Option<TailnetId>),
    Node(Box<crate::model::Node>),
    NodeGone(crate::model::NodeId),
    TailnetGone(TailnetId),
}

async fn net_change(
    cp: &ControlPlane,
    tailnet: TailnetId,
    stored: StoredChange,
    effects: &mut Vec<Effect>,
) -> Result<NetChange> {
    Ok(match stored {
        StoredChange::PeerAdded { node } => {
            effects.push(Effect::Node(Box::new(node.clone())));
            NetChange::PeerAdded(Arc::new(node))
        }
        StoredChange::PeerUpdated { node } => {
            effects.push(Effect::Node(Box::new(node.clone())));
            NetChange::PeerUpdated(Arc::new(node))
        }
        StoredChange::PeerRemoved { node, reason, message } => {
            effects.push(Effect::NodeGone(node));
            NetChange::PeerRemoved { node, reason, message }
        }
        StoredChange::TailnetGone { reason, message } => {
            effects.push(Effect::TailnetGone(tailnet));
            NetChange::TailnetGone { reason, message }
        }
        StoredChange::PolicyChanged { version, updated } => {
            let mut tx = cp.store.read().await?;
            match cp.policies.version(&mut tx, tailnet, version).await? {
                Some(policy) => {
                    NetChange::PolicyChanged { policy, version, updated: updated.into_iter().map(Arc::new).collect() }
                }
                // Deleted since: what follows ends the tailnet's streams anyway.
                None => NetChange::Resync,
            }
        }
        StoredChange::Resync => NetChange::Resync,
    })
}

async fn apply(cp: &Arc<ControlPlane>, admin: &AdminTokens, effect: Effect) {
    let result: Result<()> = async {
        match effect {
            Effect::Node(node) if !node.gateway => {
                cp.reaper.schedule(node.expires_at, Deadline::NodeExpiry(node.id));
                if let Some(user) = node.user.as_ref().filter(|u| !u.logged_out) {
                    cp.reaper.schedule(user.login_expires_at, Deadline::LoginExpiry(node.id));
                }
            }
            Effect::Node(_) => {}
            Effect::NodeGone(node) => cp.hub().forget(node),
            Effect::TailnetGone(tailnet) => cp.policies.forget(tailnet),
            Effect::Event(EventKind::TailnetCreated, Some(tailnet)) => {
                if let Some(at) = cp.get_tailnet(tailnet).await?.expires_at {
                    cp.reaper.schedule(at, Deadline::TailnetTtl(tailnet));
                }
            }
            Effect::Event(EventKind::PolicyProposed, Some(tailnet)) => {
                for p in cp.list_proposals(tailnet).await? {
                    cp.reaper.schedule(p.expires_at, Deadline::ProposalExpiry(p.id));
                }
            }
            Effect::Event(EventKind::AdminTokenCreated | EventKind::AdminTokenRevoked, _) => {
                for token in cp.list_admin_tokens(None).await? {
                    admin.remember(token);
                }
            }
            Effect::Event(EventKind::WebhookCreated, _) => {
                for hook in cp.list_webhooks().await? {
                    crate::webhook::spawn(cp, hook.id);
                }
            }
            Effect::Event(EventKind::AdminTrustRuleCreated | EventKind::AdminTrustRuleDeleted, _) => {
                admin.set_rules(cp.list_admin_trust_rules(None).await?);
            }
            Effect::Event(..) => {}
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "could not act on a change from another replica"),
    }
}

/// Heartbeats, renews this replica's gateway leases, takes free ones up to an even share, gives back
/// what is over it, and runs exactly the gateways it holds.
async fn leases(cp: Weak<ControlPlane>) {
    let mut renewed = Instant::now();
    loop {
        let Some(strong) = cp.upgrade() else { return };
        let mut shutdown = strong.shutdown_signal();
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = round(&strong, &mut renewed).await {
            tracing::warn!(error = %e, "gateway lease round failed");
            if renewed.elapsed() > LEASE_SAFE {
                // Another replica may hold these leases by now: two gateways with one key must not run.
                let cluster = strong.cluster.get().expect("joined");
                let held: Vec<TailnetId> = cluster.held.lock().unwrap().drain().collect();
                for tailnet in held {
                    tracing::warn!(%tailnet, "stopping a gateway whose lease could not be renewed");
                    strong.gateways.stop(tailnet);
                }
            }
        }
        drop(strong);
        tokio::select! {
            _ = crate::control_plane::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(LEASE_ROUND) => {}
        }
    }
}

async fn round(cp: &Arc<ControlPlane>, renewed: &mut Instant) -> Result<()> {
    let cluster = cp.cluster.get().expect("joined").clone();
    let pg = postgres(cp)?;
    let started = Instant::now();
    let round = pg.lease_round(cluster.id).await?;
    *renewed = started;
    cp.webhooks.deliver_here(cp, round.leader == Some(cluster.id)).await;
    for node in round.orphaned_nodes {
        // Its replica died: it gets the whole idle timeout to come back through another.
        cp.schedule_idle(node);
    }
    let held: HashSet<TailnetId> = round.held.iter().copied().collect();
    let (stop, excess) = {
        let mut mine = cluster.held.lock().unwrap();
        let stop: Vec<_> = mine.difference(&held).copied().collect();
        *mine = held.clone();
        // Over an even share by more than one: give some back for replicas that joined.
        let excess = held.len().saturating_sub(round.fair_share + 1).min(16);
        let excess: Vec<_> = if excess > 0 {
            let mut sorted: Vec<_> = held.iter().copied().collect();
            sorted.sort();
            sorted.into_iter().rev().take(excess).collect()
        } else {
            Vec::new()
        };
        for t in &excess {
            mine.remove(t);
        }
        (stop, excess)
    };
    for tailnet in stop.iter().chain(&excess) {
        cp.gateways.stop(*tailnet);
    }
    if !excess.is_empty() {
        cp.gateways.wait_stopped(&excess).await;
        pg.release_leases(cluster.id, &excess).await?;
        tracing::info!(gateways = excess.len(), "gave gateway leases back to even out the replicas");
    }
    // Every gateway this replica holds runs (a no-op for those that do).
    let run: Vec<TailnetId> = cluster.held.lock().unwrap().iter().copied().collect();
    for tailnet in run {
        crate::gateway::start(cp, tailnet);
    }
    Ok(())
}

/// A clean stop: the gateways are stopped already; their leases, this replica's streams and its
/// registration go, so the others take over at once.
pub async fn leave(cp: &ControlPlane) {
    let (Some(cluster), Some(pg)) = (cp.cluster.get(), cp.store.postgres()) else { return };
    match pg.stop_replica(cluster.id).await {
        Ok(()) => tracing::info!(replica = %cluster.id, "replica stopped; its leases are free"),
        Err(e) => tracing::warn!(error = %e, "could not give the leases back; they expire in a few seconds"),
    }
}

/// This replica holds a relay stream: frames for its key that reach other replicas come here.
pub struct Home {
    cp: Weak<ControlPlane>,
    tailnet: TailnetId,
    key: Key,
}

impl Home {
    pub async fn claim(cp: &Arc<ControlPlane>, tailnet: TailnetId, key: Key) -> Option<Home> {
        let cluster = cp.cluster.get()?;
        let pg = cp.store.postgres()?;
        if let Err(e) = pg.set_relay_home(tailnet, &key, cluster.id).await {
            tracing::warn!(%tailnet, error = %e, "could not record where a relay stream is; peers on other replicas may not reach it");
        }
        Some(Home { cp: Arc::downgrade(cp), tailnet, key })
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let (cp, tailnet, key) = (self.cp.clone(), self.tailnet, self.key);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let Some(cp) = cp.upgrade() else { return };
            let (Some(cluster), Some(pg)) = (cp.cluster.get(), cp.store.postgres()) else { return };
            if let Err(e) = pg.clear_relay_home(tailnet, &key, cluster.id).await {
                tracing::debug!(%tailnet, error = %e, "could not clear a relay home");
            }
        });
    }
}

/// Applies presence changes in the order they happened (a disconnect never overtakes its connect).
async fn record_presence(cp: Weak<ControlPlane>, replica: Uuid, mut rx: mpsc::UnboundedReceiver<(NodeId, bool)>) {
    while let Some((node, present)) = rx.recv().await {
        let Some(cp) = cp.upgrade() else { return };
        let Some(pg) = cp.store.postgres() else { return };
        if let Err(e) = pg.set_presence(node, replica, present).await {
            tracing::debug!(%node, error = %e, "could not record presence");
        }
    }
}
