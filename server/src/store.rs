//! The one store handle over two storage engines (embedded sled, PostgreSQL), the transaction type the
//! domain core writes through, and the ordered publication of committed changes to the fan-out.
//!
//! Engines hold records and nothing else: every rule about what may be written lives in
//! [`crate::domain`]. A transaction buffers the changes it makes (audit events, netmap changes); at
//! commit the engine numbers them with consecutive revisions in commit order, makes them durable with
//! the records, and the store publishes them to the hub strictly in revision order, none skipped.

pub mod postgres;
pub mod sled;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::hub::{Change, Hub, NetChange, NetMapUpdate};
use crate::model::{
    AdminToken, AuthKey, AuthKeyId, Event, Node, NodeId, PolicyRecord, RunIdentity, SecretHash, Tailnet, TailnetId,
    TrustRule, TrustRuleId,
};
use crate::secret::Secret;

/// Where the records live, as `--store` names it: `sled:<dir>` or `postgres://…`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sled(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    /// Parses `--store`; a bare path means sled.
    pub fn parse(text: &str) -> Result<StoreUrl> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(text.to_string()));
        }
        if let Some(dir) = text.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err(Error::invalid("store", "sled: needs a directory, e.g. sled:./cordon-data/store"));
            }
            return Ok(StoreUrl::Sled(PathBuf::from(dir)));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            // Only the scheme: the rest of a URL may hold a password.
            return Err(Error::invalid(
                "store",
                format!(
                    "{}:// is not a store this build knows; use sled:<dir> or postgres://user@host/db",
                    crate::validate::quote(scheme)
                ),
            ));
        }
        Ok(StoreUrl::Sled(PathBuf::from(text)))
    }
}

/// Never shows a PostgreSQL password.
impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sled(dir) => write!(f, "sled:{}", dir.display()),
            StoreUrl::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache.
    pub cache_bytes: u64,
    /// PostgreSQL connections, at most.
    pub max_connections: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { cache_bytes: 64 << 20, max_connections: 32 }
    }
}

/// A gateway request to record.
#[derive(Debug)]
pub struct GatewayEvent {
    pub tailnet: TailnetId,
    pub node: Option<NodeId>,
    pub run: Option<RunIdentity>,
    pub user: Option<crate::model::NodeUser>,
    pub time: SystemTime,
    pub request: crate::model::GatewayRequest,
}

/// A gateway's WireGuard key pair.
#[derive(Clone)]
pub struct GatewayKeys {
    pub secret: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for GatewayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayKeys").field("secret", &"<redacted>").finish_non_exhaustive()
    }
}

/// Which audit events to list.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub tailnet: Option<TailnetId>,
    pub node: Option<NodeId>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub after_revision: u64,
    pub limit: usize,
}

/// A node's view of its tailnet at one revision.
#[derive(Debug)]
pub struct Snapshot {
    pub revision: u64,
    pub node: Node,
    pub tailnet: Tailnet,
    pub peers: Vec<Node>,
}

/// How many records of each kind a store holds (for `cordon store copy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub tailnets: u64,
    pub nodes: u64,
    pub auth_keys: u64,
    pub trust_rules: u64,
    pub policy_versions: u64,
    pub upstream_keys: u64,
    pub events: u64,
    pub admin_tokens: u64,
}

impl Counts {
    pub fn is_empty(&self) -> bool {
        *self == Counts::default()
    }

    /// Each kind with its count, for people.
    pub fn rows(&self) -> [(&'static str, u64); 8] {
        [
            ("tailnets", self.tailnets),
            ("nodes", self.nodes),
            ("auth keys", self.auth_keys),
            ("trust rules", self.trust_rules),
            ("policy versions", self.policy_versions),
            ("upstream keys", self.upstream_keys),
            ("audit events", self.events),
            ("admin tokens", self.admin_tokens),
        ]
    }
}

/// Where a registering node goes (see [`Tx::placement`]).
#[derive(Debug)]
pub enum Placement {
    Existing(Box<Node>),
    New { address: Option<Ipv4Addr>, hostname_taken: bool },
}

/// A change a transaction made, numbered at commit.
#[derive(Debug)]
pub enum Pending {
    /// An audit event; its revision is filled in at commit.
    Event(Box<Event>),
    NetMap(TailnetId, NetChange),
}

impl Pending {
    /// The change with its revision, as the hub publishes it.
    pub fn numbered(self, revision: u64) -> Change {
        match self {
            Pending::Event(mut e) => {
                e.revision = revision;
                Change::Event(Arc::new(*e))
            }
            Pending::NetMap(tailnet, change) => {
                Change::NetMap { tailnet, update: Arc::new(NetMapUpdate { revision, change }) }
            }
        }
    }
}

enum Engine {
    Sled(sled::SledStore),
    Postgres(Box<postgres::PgStore>),
}

/// Committed changes waiting for the ones before them, so the hub sees revisions in order.
struct Publisher {
    hub: Arc<Hub>,
    waiting: Mutex<BTreeMap<u64, Change>>,
    commits: CommitStats,
    /// Wakes the follower (several replicas): a commit waits for revisions another replica made.
    gap: tokio::sync::Notify,
}

/// How long commits of write transactions take, and how many are under way (the metrics read them).
#[derive(Clone, Debug)]
pub struct CommitStats {
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    pub in_flight: prometheus_client::metrics::gauge::Gauge,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            seconds: prometheus_client::metrics::histogram::Histogram::new(crate::metrics::LATENCY_BUCKETS),
            in_flight: Default::default(),
        }
    }
}

impl Publisher {
    fn publish(&self, changes: Vec<Change>) {
        let mut waiting = self.waiting.lock().unwrap();
        let published = self.hub.published_revision();
        // The same change may come twice (from this replica's commit and from the database); once is enough.
        for c in changes.into_iter().filter(|c| c.revision() > published) {
            waiting.insert(c.revision(), c);
        }
        self.drain(&mut waiting, published + 1);
    }

    /// Publishes the waiting changes from revision `next` on, as long as none is missing.
    fn drain(&self, waiting: &mut BTreeMap<u64, Change>, mut next: u64) {
        while let Some(change) = waiting.remove(&next) {
            self.hub.publish(change);
            next += 1;
        }
    }
}

/// The one handle the server uses for persistent state.
pub struct Store {
    engine: Engine,
    publisher: Arc<Publisher>,
}

impl Store {
    /// Opens (or creates) the store `url` names, migrating it to this build's schema.
    pub async fn open(url: &StoreUrl, options: &StoreOptions, hub: Arc<Hub>) -> Result<Store> {
        let (engine, revision) = match url {
            StoreUrl::Sled(dir) => {
                let s = sled::SledStore::open(dir, options.cache_bytes)?;
                let r = s.revision();
                (Engine::Sled(s), r)
            }
            StoreUrl::Postgres(url) => {
                let s = postgres::PgStore::open(url, options.max_connections).await?;
                let r = s.revision().await?;
                (Engine::Postgres(Box::new(s)), r)
            }
        };
        hub.set_published(revision);
        let publisher =
            Publisher { hub, waiting: Mutex::default(), commits: CommitStats::default(), gap: Default::default() };
        Ok(Store { engine, publisher: Arc::new(publisher) })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.publisher.hub
    }

    pub fn commit_stats(&self) -> &CommitStats {
        &self.publisher.commits
    }

    /// Which engine this is, for logs: `sled` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Sled(_) => "sled",
            Engine::Postgres(_) => "postgres",
        }
    }

    /// A transaction that may write. Writers that touch one tailnet run one at a time; nothing they
    /// write is visible to others or to watchers until [`Tx::commit`] returns.
    pub async fn write(&self) -> Result<Tx> {
        let inner = match &self.engine {
            Engine::Sled(s) => Inner::Sled(s.begin(true).await),
            Engine::Postgres(s) => Inner::Postgres(Box::new(s.begin(true).await?)),
        };
        Ok(Tx { inner, pending: vec![], publisher: self.publisher.clone(), writes: true })
    }

    /// Reads of committed state, each on its own (no transaction).
    pub async fn read(&self) -> Result<Tx> {
        let inner = match &self.engine {
            Engine::Sled(s) => Inner::Sled(s.begin(false).await),
            Engine::Postgres(s) => Inner::Postgres(Box::new(s.begin(false).await?)),
        };
        Ok(Tx { inner, pending: vec![], publisher: self.publisher.clone(), writes: false })
    }

    /// What `node` is told, with the revision that state is at: consistent with every change up to
    /// that revision and none after it.
    pub async fn snapshot(&self, node: NodeId) -> Result<Snapshot> {
        let (revision, inner) = match &self.engine {
            Engine::Sled(s) => {
                let (r, tx) = s.begin_snapshot().await;
                (r, Inner::Sled(tx))
            }
            Engine::Postgres(s) => {
                let (r, tx) = s.begin_snapshot().await?;
                (r, Inner::Postgres(Box::new(tx)))
            }
        };
        let mut tx = Tx { inner, pending: vec![], publisher: self.publisher.clone(), writes: false };
        let node = tx.node(node).await?.ok_or_else(|| Error::not_found("node", node))?;
        let tailnet = tx.tailnet(node.tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", node.tailnet_id))?;
        // A person's node whose login expired is nobody's peer until they log in again.
        let peers = tx.nodes_of(tailnet.id).await?.into_iter().filter(|p| p.id != node.id && p.admitted()).collect();
        Ok(Snapshot { revision, node, tailnet, peers })
    }

    /// Makes every applied write durable.
    pub async fn flush(&self) -> Result<()> {
        match &self.engine {
            Engine::Sled(s) => s.flush().await,
            Engine::Postgres(_) => Ok(()),
        }
    }

    /// Deletes audit events older than `before` (oldest first, at most `limit`); returns how many.
    pub async fn prune_events(&self, before: SystemTime, limit: usize) -> Result<usize> {
        match &self.engine {
            Engine::Sled(s) => s.prune_events(before, limit).await,
            Engine::Postgres(s) => s.prune_events(before, limit).await,
        }
    }

    /// How many records of each kind the store holds.
    pub async fn counts(&self) -> Result<Counts> {
        match &self.engine {
            Engine::Sled(s) => s.counts(),
            Engine::Postgres(s) => s.counts().await,
        }
    }

    /// The revision of the last published change.
    pub fn revision(&self) -> u64 {
        self.publisher.hub.published_revision()
    }

    /// The PostgreSQL engine, where replicas meet.
    pub fn postgres(&self) -> Option<&postgres::PgStore> {
        match &self.engine {
            Engine::Postgres(s) => Some(s),
            Engine::Sled(_) => None,
        }
    }

    /// Publishes changes read back from the database (made by any replica), in revision order.
    pub(crate) fn publish_committed(&self, changes: Vec<Change>) {
        self.publisher.publish(changes);
    }

    /// Changes up to `revision` cannot be read any more: watchers reload from the store.
    pub(crate) fn resync(&self, revision: u64) {
        let mut waiting = self.publisher.waiting.lock().unwrap();
        waiting.retain(|r, _| *r > revision);
        self.publisher.hub.resync(revision);
        self.publisher.drain(&mut waiting, revision + 1);
    }

    /// Completes when a commit waits for revisions this replica has not published yet.
    pub(crate) async fn gap(&self) {
        self.publisher.gap.notified().await;
    }
}

pub(crate) enum Inner {
    Sled(sled::SledTx),
    Postgres(Box<postgres::PgTx>),
    /// Committed or moved out.
    Done,
}

/// One transaction: typed reads and writes of records, and the changes to publish after commit.
/// Dropping it without [`Tx::commit`] rolls it back.
pub struct Tx {
    inner: Inner,
    pending: Vec<Pending>,
    publisher: Arc<Publisher>,
    writes: bool,
}

macro_rules! each {
    ($self:ident, $t:ident => $e:expr) => {
        match &mut $self.inner {
            Inner::Sled($t) => $e,
            Inner::Postgres($t) => $e,
            Inner::Done => unreachable!("a transaction is used after commit"),
        }
    };
}

macro_rules! write_op {
    ($self:ident, $t:ident => $e:expr) => {{
        debug_assert!($self.writes, "a write through a read transaction");
        each!($self, $t => $e)
    }};
}

impl Tx {
    // Tailnets
    pub async fn tailnet(&mut self, id: TailnetId) -> Result<Option<Tailnet>> {
        each!(self, t => t.tailnet(id).await)
    }
    /// Tailnets in id order after `after`, of `owner` if given, at most `limit`.
    pub async fn tailnets(
        &mut self,
        owner: Option<&str>,
        after: Option<TailnetId>,
        limit: usize,
    ) -> Result<Vec<Tailnet>> {
        each!(self, t => t.tailnets(owner, after, limit).await)
    }
    pub async fn put_tailnet(&mut self, tailnet: &Tailnet) -> Result<()> {
        write_op!(self, t => t.put_tailnet(tailnet).await)
    }
    /// Deletes the tailnet and every record it owns (nodes, sessions, keys, rules, policy versions,
    /// upstream keys, its gateway, its login providers). Audit events stay.
    pub async fn delete_tailnet(&mut self, id: TailnetId) -> Result<()> {
        write_op!(self, t => t.delete_tailnet(id).await)
    }

    // Policy proposals (decided ones stay, for the record)
    pub async fn proposal(&mut self, id: crate::model::ProposalId) -> Result<Option<crate::model::PolicyProposal>> {
        each!(self, t => t.proposal(id).await)
    }
    pub async fn proposals_of(&mut self, tailnet: TailnetId) -> Result<Vec<crate::model::PolicyProposal>> {
        each!(self, t => t.proposals_of(tailnet).await)
    }
    /// Pending proposals of every tailnet (their expiry is scheduled at start).
    pub async fn pending_proposals(&mut self) -> Result<Vec<crate::model::PolicyProposal>> {
        each!(self, t => t.pending_proposals().await)
    }
    pub async fn put_proposal(&mut self, proposal: &crate::model::PolicyProposal) -> Result<()> {
        write_op!(self, t => t.put_proposal(proposal).await)
    }

    // Webhooks and their deliveries
    pub async fn webhooks(&mut self) -> Result<Vec<crate::model::Webhook>> {
        each!(self, t => t.webhooks().await)
    }
    pub async fn put_webhook(&mut self, webhook: &crate::model::Webhook) -> Result<()> {
        write_op!(self, t => t.put_webhook(webhook).await)
    }
    /// Deletes the webhook and its deliveries.
    pub async fn delete_webhook(&mut self, id: crate::model::WebhookId) -> Result<()> {
        write_op!(self, t => t.delete_webhook(id).await)
    }
    /// The newest `limit` deliveries, oldest first.
    pub async fn deliveries_of(
        &mut self,
        id: crate::model::WebhookId,
        limit: usize,
    ) -> Result<Vec<crate::model::Delivery>> {
        each!(self, t => t.deliveries_of(id, limit).await)
    }
    pub async fn put_delivery(&mut self, delivery: &crate::model::Delivery) -> Result<()> {
        write_op!(self, t => t.put_delivery(delivery).await)
    }

    // People: login providers and users
    pub async fn login_providers(&mut self) -> Result<Vec<crate::model::LoginProvider>> {
        each!(self, t => t.login_providers().await)
    }
    pub async fn put_login_provider(&mut self, p: &crate::model::LoginProvider) -> Result<()> {
        write_op!(self, t => t.put_login_provider(p).await)
    }
    pub async fn delete_login_provider(&mut self, id: crate::model::LoginProviderId) -> Result<()> {
        write_op!(self, t => t.delete_login_provider(id).await)
    }
    pub async fn users(&mut self) -> Result<Vec<crate::model::User>> {
        each!(self, t => t.users().await)
    }
    pub async fn user(&mut self, id: crate::model::UserId) -> Result<Option<crate::model::User>> {
        each!(self, t => t.user(id).await)
    }
    pub async fn user_by_subject(&mut self, issuer: &str, subject: &str) -> Result<Option<crate::model::User>> {
        each!(self, t => t.user_by_subject(issuer, subject).await)
    }
    pub async fn put_user(&mut self, u: &crate::model::User) -> Result<()> {
        write_op!(self, t => t.put_user(u).await)
    }
    pub async fn delete_user(&mut self, id: crate::model::UserId) -> Result<()> {
        write_op!(self, t => t.delete_user(id).await)
    }

    /// Among replicas (PostgreSQL): `replica` takes the lease of the tailnet's gateway with this
    /// transaction. The embedded store has one server and no leases.
    pub fn take_gateway_lease(&mut self, tailnet: TailnetId, replica: uuid::Uuid) {
        debug_assert!(self.writes, "a lease through a read transaction");
        if let Inner::Postgres(t) = &mut self.inner {
            t.take_gateway_lease(tailnet, replica);
        }
    }

    // OIDC token ids used for admission
    /// Records the use of a token id until `expires`; false if it was used before and has not expired.
    pub async fn use_token(&mut self, key: &SecretHash, expires: SystemTime, now: SystemTime) -> Result<bool> {
        write_op!(self, t => t.use_token(key, expires, now).await)
    }

    // Admin trust rules
    pub async fn admin_trust_rules(&mut self) -> Result<Vec<crate::model::AdminTrustRule>> {
        each!(self, t => t.admin_trust_rules().await)
    }
    pub async fn put_admin_trust_rule(&mut self, rule: &crate::model::AdminTrustRule) -> Result<()> {
        write_op!(self, t => t.put_admin_trust_rule(rule).await)
    }
    pub async fn delete_admin_trust_rule(&mut self, id: crate::model::AdminTrustRuleId) -> Result<()> {
        write_op!(self, t => t.delete_admin_trust_rule(id).await)
    }

    // Admin tokens (revoked ones stay, for the record)
    pub async fn admin_tokens(&mut self) -> Result<Vec<AdminToken>> {
        each!(self, t => t.admin_tokens().await)
    }
    pub async fn put_admin_token(&mut self, token: &AdminToken) -> Result<()> {
        write_op!(self, t => t.put_admin_token(token).await)
    }

    // Nodes
    pub async fn node(&mut self, id: NodeId) -> Result<Option<Node>> {
        each!(self, t => t.node(id).await)
    }
    pub async fn nodes_of(&mut self, tailnet: TailnetId) -> Result<Vec<Node>> {
        each!(self, t => t.nodes_of(tailnet).await)
    }
    pub async fn all_nodes(&mut self) -> Result<Vec<Node>> {
        each!(self, t => t.all_nodes().await)
    }
    pub async fn node_by_session(&mut self, hash: &SecretHash) -> Result<Option<Node>> {
        each!(self, t => t.node_by_session(hash).await)
    }
    pub async fn hostname_taken(&mut self, tailnet: TailnetId, hostname: &str) -> Result<bool> {
        each!(self, t => t.hostname_taken(tailnet, hostname).await)
    }
    /// Where a registering node goes: the node that holds `key` in the tailnet already (if any);
    /// otherwise the lowest free address in `first..=last` and whether `hostname` is taken.
    pub async fn placement(
        &mut self,
        tailnet: TailnetId,
        key: &[u8; 32],
        hostname: &str,
        first: u32,
        last: u32,
    ) -> Result<Placement> {
        each!(self, t => t.placement(tailnet, key, hostname, first, last).await)
    }
    /// Writes a node with its session; `replaced` is the record it replaces, if any.
    pub async fn put_node(&mut self, node: &Node, replaced: Option<&Node>) -> Result<()> {
        write_op!(self, t => t.put_node(node, replaced).await)
    }
    pub async fn delete_node(&mut self, node: &Node) -> Result<()> {
        write_op!(self, t => t.delete_node(node).await)
    }

    // Auth keys
    pub async fn auth_key(&mut self, id: AuthKeyId) -> Result<Option<AuthKey>> {
        each!(self, t => t.auth_key(id).await)
    }
    pub async fn auth_key_by_secret(&mut self, hash: &SecretHash) -> Result<Option<AuthKey>> {
        each!(self, t => t.auth_key_by_secret(hash).await)
    }
    pub async fn auth_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<AuthKey>> {
        each!(self, t => t.auth_keys_of(tailnet).await)
    }
    pub async fn put_auth_key(&mut self, key: &AuthKey) -> Result<()> {
        write_op!(self, t => t.put_auth_key(key).await)
    }

    // Trust rules
    pub async fn trust_rule(&mut self, id: TrustRuleId) -> Result<Option<TrustRule>> {
        each!(self, t => t.trust_rule(id).await)
    }
    pub async fn trust_rules_of(&mut self, tailnet: TailnetId) -> Result<Vec<TrustRule>> {
        each!(self, t => t.trust_rules_of(tailnet).await)
    }
    /// Every rule trusting `issuer`.
    pub async fn trust_rules_for(&mut self, issuer: &str) -> Result<Vec<TrustRule>> {
        each!(self, t => t.trust_rules_for(issuer).await)
    }
    pub async fn put_trust_rule(&mut self, rule: &TrustRule) -> Result<()> {
        write_op!(self, t => t.put_trust_rule(rule).await)
    }
    pub async fn delete_trust_rule(&mut self, rule: &TrustRule) -> Result<()> {
        write_op!(self, t => t.delete_trust_rule(rule).await)
    }

    // Policy versions
    pub async fn policy(&mut self, tailnet: TailnetId, version: u64) -> Result<Option<PolicyRecord>> {
        each!(self, t => t.policy(tailnet, version).await)
    }
    pub async fn policies_of(&mut self, tailnet: TailnetId) -> Result<Vec<PolicyRecord>> {
        each!(self, t => t.policies_of(tailnet).await)
    }
    pub async fn put_policy(&mut self, record: &PolicyRecord) -> Result<()> {
        write_op!(self, t => t.put_policy(record).await)
    }

    // Gateways and upstream keys (both write-only outside the server)
    pub async fn gateway(&mut self, tailnet: TailnetId) -> Result<Option<(NodeId, [u8; 32])>> {
        each!(self, t => t.gateway(tailnet).await)
    }
    pub async fn put_gateway(&mut self, tailnet: TailnetId, node: NodeId, secret: &[u8; 32]) -> Result<()> {
        write_op!(self, t => t.put_gateway(tailnet, node, secret).await)
    }
    pub async fn upstream_key(&mut self, tailnet: TailnetId, name: &str) -> Result<Option<Secret>> {
        each!(self, t => t.upstream_key(tailnet, name).await)
    }
    /// Every upstream key of a tailnet, by name (for `cordon store copy`).
    pub async fn upstream_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<(String, Secret)>> {
        each!(self, t => t.upstream_keys_of(tailnet).await)
    }
    pub async fn put_upstream_key(&mut self, tailnet: TailnetId, name: &str, key: &Secret) -> Result<()> {
        write_op!(self, t => t.put_upstream_key(tailnet, name, key).await)
    }

    // Audit events
    /// Published audit events in revision order, filtered; and whether more follow.
    pub async fn events(&mut self, filter: &EventFilter) -> Result<(Vec<Event>, bool)> {
        let published = self.publisher.hub.published_revision();
        each!(self, t => t.events(filter, published).await)
    }
    /// Writes events as they are, revisions included (for `cordon store copy`).
    pub async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        write_op!(self, t => t.put_events(events).await)
    }
    /// Sets the revision counter (for `cordon store copy`).
    pub async fn set_revision(&mut self, revision: u64) -> Result<()> {
        write_op!(self, t => t.set_revision(revision).await)
    }

    /// Records an audit event, numbered at commit.
    pub fn event(&mut self, event: Event) {
        debug_assert!(self.writes, "an event through a read transaction");
        self.pending.push(Pending::Event(Box::new(event)));
    }

    /// Records a change to what the tailnet's nodes are told, numbered at commit.
    pub fn netmap(&mut self, tailnet: TailnetId, change: NetChange) {
        debug_assert!(self.writes, "a netmap change through a read transaction");
        self.pending.push(Pending::NetMap(tailnet, change));
    }

    /// Makes the transaction durable and publishes its changes in revision order. Runs to the end
    /// even if the caller stops waiting, so a committed change is never left unpublished.
    pub async fn commit(mut self) -> Result<()> {
        let inner = std::mem::replace(&mut self.inner, Inner::Done);
        let pending = std::mem::take(&mut self.pending);
        let publisher = self.publisher.clone();
        let timed = self.writes;
        let task = tokio::spawn(async move {
            let start = std::time::Instant::now();
            let stats = &publisher.commits;
            if timed {
                stats.in_flight.inc();
            }
            let changes = match inner {
                Inner::Sled(t) => t.commit(pending).await,
                Inner::Postgres(t) => t.commit(pending).await,
                Inner::Done => unreachable!("committed twice"),
            };
            if timed {
                stats.in_flight.dec();
                stats.seconds.observe(start.elapsed().as_secs_f64());
            }
            let changes = changes?;
            let last = changes.last().map(Change::revision);
            publisher.publish(changes);
            // Read your writes: the caller returns once its changes are published. Only revisions another
            // replica took in between hold them back; the follower reads those from the database.
            if let Some(last) = last
                && publisher.hub.published_revision() < last
            {
                let published = publisher.hub.published_at_least(last);
                tokio::pin!(published);
                if tokio::time::timeout(std::time::Duration::from_millis(20), &mut published).await.is_err() {
                    publisher.gap.notify_one();
                    if tokio::time::timeout(std::time::Duration::from_secs(5), published).await.is_err() {
                        tracing::warn!(revision = last, "a committed change is not published after 5 s");
                    }
                }
            }
            Ok::<(), Error>(())
        });
        task.await.map_err(|e| Error::Unavailable(format!("commit task failed: {e}")))?
    }
}
