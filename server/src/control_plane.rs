//! The control plane's state and operations, shared by the admin and node APIs: the store, the clock,
//! the reaper's deadlines, who is online, and the shutdown signal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::clock::Clock;
use crate::domain::{self, Policies, Removed};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::{
    Actor, AuthKey, AuthKeyId, AuthKeySpec, EndReason, Node, NodeId, Registration, Tailnet, TailnetId, TailnetSpec,
};
use crate::model::{
    AdminToken, AdminTokenId, AdminTokenSpec, AdminTrustRule, PolicyProposal, Principal, ProposalId, ProposalState,
    Role,
};
use crate::model::{Credential, PolicyRecord, Presented, RegisterInput, TrustRule, TrustRuleId, TrustRuleSpec};
use crate::model::{Delivery, Event, UpstreamInfo, UpstreamSpec, Webhook, WebhookId};
use crate::oidc::{Oidc, Refusal};
use crate::policy::Policy;
use crate::reaper::{Deadline, Reaper};
use crate::secret::{ADMIN_PREFIX, AUTH_KEY_PREFIX, SESSION_PREFIX, Secret};
use crate::store::{EventFilter, GatewayEvent, GatewayKeys, Snapshot, Store, StoreOptions, StoreUrl};
use crate::validate::LabelRequirement;

/// Limits an operator sets in the server's configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long an ephemeral node may stay without a netmap stream before it is removed.
    pub ephemeral_node_timeout: Duration,
    /// How long a node's registration is valid.
    pub node_lifetime: Duration,
    /// The default and the maximum auth key expiry.
    pub default_auth_key_expiry: Duration,
    pub max_auth_key_expiry: Duration,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// PostgreSQL connections, at most.
    pub max_store_connections: usize,
    /// How long audit events are kept.
    pub audit_retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ephemeral_node_timeout: Duration::from_secs(30),
            node_lifetime: Duration::from_secs(180 * 86_400),
            default_auth_key_expiry: Duration::from_secs(3600),
            max_auth_key_expiry: Duration::from_secs(90 * 86_400),
            cache_bytes: 64 << 20,
            max_store_connections: 32,
            audit_retention: Duration::from_secs(90 * 86_400),
        }
    }
}

/// How long a policy proposal waits for a decision unless the proposer says otherwise.
pub const PROPOSAL_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// What SetPolicy did: a new version, or (on a tailnet that requires approval) a proposal.
#[derive(Debug)]
pub enum PolicyChange {
    Set(PolicyRecord),
    Proposed(PolicyProposal),
}

/// A record found by its own id whose tailnet a scope check needs.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AuthKey(AuthKeyId),
    TrustRule(TrustRuleId),
}

pub struct ControlPlane {
    pub(crate) store: Store,
    pub(crate) clock: Clock,
    pub(crate) limits: Limits,
    pub(crate) reaper: Reaper,
    shutdown: watch::Sender<bool>,
    pub(crate) policies: Policies,
    pub(crate) oidc: Oidc,
    /// People's logins in progress.
    pub(crate) logins: crate::login::Logins,
    pub(crate) relays: crate::relay::Relays,
    /// The STUN reflector's address as nodes should dial it, if one runs.
    pub(crate) stun_address: Mutex<Option<String>>,
    /// The UDP port (STUN, and the gateways' WireGuard), once bound.
    pub port: std::sync::OnceLock<Arc<crate::port::Port>>,
    pub(crate) gateways: crate::gateway::Gateways,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Where `/metrics` is served, once it is.
    pub(crate) metrics_address: Mutex<Option<std::net::SocketAddr>>,
    /// Where the console is served, once it is.
    pub(crate) console_address: Mutex<Option<std::net::SocketAddr>>,
    /// Which webhooks deliver from here.
    pub(crate) webhooks: crate::webhook::Runner,
    /// The URL this server is reached at (`--advertise`, or its listen address), once it serves.
    pub(crate) advertise: Mutex<Option<String>>,
    started_at: SystemTime,
    /// This replica among the others on one PostgreSQL database, once it joined them.
    pub(crate) cluster: std::sync::OnceLock<Arc<crate::replica::Cluster>>,
    /// The long-lived tasks the server owns (reaper, audit pruner, gateways, STUN): each ends on
    /// shutdown, and [`ControlPlane::drain`] waits for them. `None` once drained.
    tasks: Mutex<Option<tokio::task::JoinSet<()>>>,
    /// The audit writer, which drains after the gateways: its handle, and what tells it to finish.
    audit_writer: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl ControlPlane {
    /// Opens the store and starts the reaper with every deadline the store holds.
    pub async fn open(store: &StoreUrl, limits: Limits) -> Result<Arc<ControlPlane>> {
        let options = StoreOptions { cache_bytes: limits.cache_bytes, max_connections: limits.max_store_connections };
        let store = Store::open(store, &options, Arc::new(Hub::default())).await?;
        let clock = Clock::new();
        let (shutdown, _) = watch::channel(false);
        let (reaper, reaper_rx) = Reaper::channel();
        let metrics = Arc::new(crate::metrics::Metrics::new(store.commit_stats()));
        let (gateways, audit_rx) = crate::gateway::Gateways::new(metrics.clone());
        let cp = Arc::new(ControlPlane {
            store,
            clock,
            limits,
            reaper,
            shutdown,
            policies: Policies::default(),
            oidc: Oidc::default(),
            logins: crate::login::Logins::default(),
            relays: crate::relay::Relays::default(),
            stun_address: Mutex::default(),
            port: std::sync::OnceLock::new(),
            gateways,
            metrics,
            metrics_address: Mutex::default(),
            console_address: Mutex::default(),
            cluster: std::sync::OnceLock::new(),
            webhooks: Default::default(),
            advertise: Mutex::default(),
            started_at: clock.now(),
            tasks: Mutex::new(Some(tokio::task::JoinSet::new())),
            audit_writer: Mutex::default(),
        });
        crate::reaper::spawn(&cp, Arc::downgrade(&cp), reaper_rx, clock, cp.shutdown.subscribe());
        let (finish, finished) = tokio::sync::oneshot::channel();
        let writer = crate::gateway::spawn_audit_writer(Arc::downgrade(&cp), audit_rx, finished);
        *cp.audit_writer.lock().unwrap() = Some((finish, writer));

        let now = clock.now();
        for tailnet in cp.all_tailnets().await? {
            if let Some(at) = tailnet.expires_at {
                cp.reaper.schedule(at, Deadline::TailnetTtl(tailnet.id));
            }
        }
        for proposal in cp.store.read().await?.pending_proposals().await? {
            cp.reaper.schedule(proposal.expires_at, Deadline::ProposalExpiry(proposal.id));
        }
        for node in cp.store.read().await?.all_nodes().await?.into_iter().filter(|n| !n.gateway) {
            cp.reaper.schedule(node.expires_at, Deadline::NodeExpiry(node.id));
            if let Some(user) = node.user.as_ref().filter(|u| !u.logged_out) {
                cp.reaper.schedule(user.login_expires_at, Deadline::LoginExpiry(node.id));
            }
            if node.ephemeral {
                // No node holds a stream after a restart: each gets the full timeout to come back.
                cp.reaper.schedule(now + cp.limits.ephemeral_node_timeout, Deadline::EphemeralIdle(node.id));
            }
        }
        Ok(cp)
    }

    pub fn hub(&self) -> &Hub {
        self.store.hub()
    }

    /// Tells every stream to end and every background task to stop.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Runs `task` as one the server owns; after [`ControlPlane::drain`] it is not started.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(set) = self.tasks.lock().unwrap().as_mut() {
            // Forget the ones that ended (gateways of deleted tailnets).
            while set.try_join_next().is_some() {}
            set.spawn(task);
        }
    }

    /// How many owned tasks run now (the audit writer not counted).
    pub fn running_tasks(&self) -> usize {
        let mut tasks = self.tasks.lock().unwrap();
        let Some(set) = tasks.as_mut() else { return 0 };
        while set.try_join_next().is_some() {}
        set.len()
    }

    /// Stops the server's tasks: signals shutdown, waits up to `grace` for every owned task to end
    /// (aborting the rest), then lets the audit writer commit what the stopped gateways queued last
    /// and waits for it. Returns how many tasks had to be aborted.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.begin_shutdown();
        let mut aborted = 0;
        let tasks = self.tasks.lock().unwrap().take();
        if let Some(mut tasks) = tasks {
            let deadline = tokio::time::sleep(grace);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    next = tasks.join_next() => if next.is_none() { break },
                    _ = &mut deadline => {
                        tracing::warn!(tasks = tasks.len(), ?grace, "tasks still running after the grace period; stopping them");
                        aborted = tasks.len();
                        tasks.shutdown().await;
                        break;
                    }
                }
            }
        }
        let writer = self.audit_writer.lock().unwrap().take();
        if let Some((finish, writer)) = writer {
            let _ = finish.send(());
            let _ = writer.await;
        }
        tracing::info!(aborted, "every task of the server has ended");
        aborted
    }

    /// Creates a tailnet and starts its gateway.
    pub async fn create_tailnet(self: &Arc<Self>, spec: TailnetSpec, actor: &Actor) -> Result<Tailnet> {
        let keys = crate::gateway::fresh_keys();
        let mut tx = self.store.write().await?;
        let tailnet = domain::create_tailnet(&mut tx, spec, keys, actor, self.clock.now()).await?;
        // Among replicas, the one that creates a tailnet runs its gateway first (a lease round evens out).
        if let Some(cluster) = self.cluster.get() {
            tx.take_gateway_lease(tailnet.id, cluster.id);
        }
        tx.commit().await?;
        if let Some(cluster) = self.cluster.get() {
            cluster.held(tailnet.id);
        }
        crate::gateway::start(self, tailnet.id);
        if let Some(at) = tailnet.expires_at {
            self.reaper.schedule(at, Deadline::TailnetTtl(tailnet.id));
        }
        tracing::info!(tailnet = %tailnet.id, name = %tailnet.name, owner = %tailnet.owner, actor = %actor.0, "tailnet created");
        Ok(tailnet)
    }

    pub async fn delete_tailnet(&self, id: TailnetId, reason: &str, actor: &Actor) -> Result<Removed> {
        let mut tx = self.store.write().await?;
        let removed = domain::delete_tailnet(&mut tx, id, reason, actor, false, self.clock.now()).await?;
        tx.commit().await?;
        self.forget_nodes(&removed.nodes);
        self.policies.forget(id);
        tracing::info!(tailnet = %id, nodes = removed.nodes.len(), actor = %actor.0, "tailnet deleted");
        Ok(removed)
    }

    pub(crate) async fn expire_tailnet(&self, id: TailnetId) -> Result<()> {
        let mut tx = self.store.write().await?;
        let reaper = Actor::system("reaper");
        let removed = domain::delete_tailnet(&mut tx, id, "ttl ran out", &reaper, true, self.clock.now()).await?;
        tx.commit().await?;
        if !removed.nodes.is_empty() || removed.keys > 0 {
            tracing::info!(tailnet = %id, nodes = removed.nodes.len(), "tailnet expired");
        }
        self.forget_nodes(&removed.nodes);
        self.policies.forget(id);
        Ok(())
    }

    /// Relays one frame: to `to`'s stream on this replica, or through the mesh to the replica that holds
    /// it; otherwise it is dropped and counted.
    pub(crate) async fn relay_frame(
        &self,
        tailnet: TailnetId,
        from: crate::relay::Key,
        to: &[u8],
        data: Vec<u8>,
        limiter: &mut crate::relay::Limiter,
    ) {
        if let Err(Some((to, data))) = self.relays.forward(tailnet, from, to, data, limiter) {
            let bytes = data.len();
            match self.cluster.get() {
                Some(cluster) if cluster.forward(self, tailnet, from, to, data).await => {
                    self.relays.forwarded_elsewhere(bytes)
                }
                _ => self.relays.dropped_unknown(),
            }
        }
    }

    /// Among replicas: records that this one holds `key`'s relay stream, until the guard drops.
    pub(crate) async fn relay_home(
        self: &Arc<Self>,
        tailnet: TailnetId,
        key: crate::relay::Key,
    ) -> Option<crate::replica::Home> {
        crate::replica::Home::claim(self, tailnet, key).await
    }

    /// The replicas serving this deployment; on the embedded store, this server alone.
    pub async fn replicas(&self) -> Result<Vec<crate::store::postgres::cluster::ReplicaRow>> {
        if let (Some(cluster), Some(pg)) = (self.cluster.get(), self.store.postgres()) {
            let mut rows = pg.replicas().await?;
            for r in &mut rows {
                r.answering = r.id == cluster.id;
            }
            return Ok(rows);
        }
        let now = self.clock.now();
        Ok(vec![crate::store::postgres::cluster::ReplicaRow {
            id: uuid::Uuid::nil(),
            advertise: self.advertise.lock().unwrap().clone().unwrap_or_default(),
            stun_address: self.stun_address.lock().unwrap().clone().unwrap_or_default(),
            started_at: self.started_at,
            heartbeat_at: now,
            stopped_at: None,
            alive: true,
            gateways: self.gateways.running() as u32,
            answering: true,
        }])
    }

    /// Among replicas: which of `nodes` hold a netmap stream on another live replica (this one's are in
    /// the hub).
    pub async fn online_elsewhere(&self, nodes: &[NodeId]) -> Result<std::collections::HashSet<NodeId>> {
        match (self.cluster.get(), self.store.postgres()) {
            (Some(_), Some(pg)) if !nodes.is_empty() => Ok(pg.present(nodes).await?.into_iter().collect()),
            _ => Ok(Default::default()),
        }
    }

    /// Gives a node whose stream went (with its replica) the idle timeout to come back, if ephemeral.
    pub(crate) fn schedule_idle(&self, node: NodeId) {
        let at = self.clock.now() + self.limits.ephemeral_node_timeout;
        self.reaper.schedule(at, Deadline::EphemeralIdle(node));
    }

    fn forget_nodes(&self, nodes: &[NodeId]) {
        for n in nodes {
            self.hub().forget(*n);
        }
    }

    /// The policy a tailnet runs now.
    pub async fn policy(&self, tailnet: &Tailnet) -> Result<Arc<Policy>> {
        let mut tx = self.store.read().await?;
        self.policies.current(&mut tx, tailnet).await
    }

    /// Validates and stores a new policy version.
    /// Makes `text` the tailnet's policy, or, on a tailnet that requires approval, stores it as a
    /// proposal for another principal to approve.
    pub async fn set_policy(
        &self,
        tailnet_id: TailnetId,
        text: String,
        author: String,
        reason: String,
        actor: &Actor,
    ) -> Result<PolicyChange> {
        if self.get_tailnet(tailnet_id).await?.approval_required {
            let proposal = self.propose_policy(tailnet_id, text, author, reason, PROPOSAL_LIFETIME, actor).await?;
            return Ok(PolicyChange::Proposed(proposal));
        }
        let policy = Arc::new(parse_policy(&text)?);
        let author = if author.is_empty() { actor.0.clone() } else { author };
        let mut tx = self.store.write().await?;
        let tailnet = tx.tailnet(tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
        let previous = self.policies.current(&mut tx, &tailnet).await?;
        let now = self.clock.now();
        let record =
            domain::set_policy(&mut tx, tailnet_id, text, policy.clone(), &previous, author, reason, actor, now)
                .await?;
        tx.commit().await?;
        self.policies.remember(tailnet_id, record.version, policy);
        tracing::info!(tailnet = %tailnet_id, version = record.version, actor = %actor.0, "policy set");
        Ok(PolicyChange::Set(record))
    }

    /// Proposes a policy document (validated, its tests run) on any tailnet; on one that does not
    /// require approval it still waits for one.
    pub async fn propose_policy(
        &self,
        tailnet_id: TailnetId,
        text: String,
        author: String,
        reason: String,
        lifetime: Duration,
        actor: &Actor,
    ) -> Result<PolicyProposal> {
        let policy = parse_policy(&text)?;
        let mut tx = self.store.write().await?;
        let tailnet = tx.tailnet(tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
        let previous = self.policies.current(&mut tx, &tailnet).await?;
        let now = self.clock.now();
        let proposal = PolicyProposal {
            id: ProposalId::generate(),
            tailnet_id,
            text,
            author: if author.is_empty() { actor.0.clone() } else { author },
            proposed_by: actor.0.clone(),
            reason,
            created_at: now,
            expires_at: now + lifetime,
            base_version: tailnet.policy_version,
            summary: policy.diff_summary(&previous),
            state: ProposalState::Pending,
            decided_by: None,
            decided_at: None,
            decision_reason: String::new(),
            version: 0,
        };
        let proposal = domain::propose_policy(&mut tx, proposal, actor).await?;
        tx.commit().await?;
        self.reaper.schedule(proposal.expires_at, Deadline::ProposalExpiry(proposal.id));
        tracing::info!(tailnet = %proposal.tailnet_id, proposal = %proposal.id, actor = %actor.0, "policy proposed");
        Ok(proposal)
    }

    /// The proposal's tailnet (for scope checks).
    pub async fn proposal(&self, id: ProposalId) -> Result<PolicyProposal> {
        self.store.read().await?.proposal(id).await?.ok_or_else(|| Error::not_found("policy proposal", id))
    }

    pub async fn list_proposals(&self, tailnet_id: TailnetId) -> Result<Vec<PolicyProposal>> {
        let mut tx = self.store.read().await?;
        tx.tailnet(tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
        tx.proposals_of(tailnet_id).await
    }

    /// Approves a pending proposal of someone else's: its document becomes the next version, if the
    /// version it was diffed against is current still.
    pub async fn approve_policy(&self, id: ProposalId, reason: &str, by: &Actor) -> Result<PolicyRecord> {
        let now = self.clock.now();
        let mut tx = self.store.write().await?;
        let proposal = domain::pending_proposal(&mut tx, id, by, now).await?;
        let tailnet =
            tx.tailnet(proposal.tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", proposal.tailnet_id))?;
        if tailnet.policy_version != proposal.base_version {
            return Err(Error::FailedPrecondition(format!(
                "the policy changed since this proposal (v{} is current, it was made against v{}); propose again",
                tailnet.policy_version, proposal.base_version
            )));
        }
        let policy = Arc::new(parse_policy(&proposal.text)?);
        let previous = self.policies.current(&mut tx, &tailnet).await?;
        let record = domain::set_policy(
            &mut tx,
            tailnet.id,
            proposal.text.clone(),
            policy.clone(),
            &previous,
            proposal.author.clone(),
            proposal.reason.clone(),
            by,
            now,
        )
        .await?;
        domain::decide_proposal(&mut tx, proposal, ProposalState::Approved, record.version, reason, by, now).await?;
        tx.commit().await?;
        self.policies.remember(tailnet.id, record.version, policy);
        tracing::info!(tailnet = %tailnet.id, version = record.version, proposal = %id, actor = %by.0, "policy approved");
        Ok(record)
    }

    pub async fn reject_policy(&self, id: ProposalId, reason: &str, by: &Actor) -> Result<PolicyProposal> {
        let now = self.clock.now();
        let mut tx = self.store.write().await?;
        let proposal = domain::pending_proposal(&mut tx, id, by, now).await?;
        let proposal = domain::decide_proposal(&mut tx, proposal, ProposalState::Rejected, 0, reason, by, now).await?;
        tx.commit().await?;
        Ok(proposal)
    }

    /// Marks a proposal expired at its deadline (the reaper calls this).
    pub async fn expire_proposal(&self, id: ProposalId) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::expire_proposal(&mut tx, id, self.clock.now()).await?;
        tx.commit().await
    }

    pub async fn set_policy_approval(
        &self,
        tailnet_id: TailnetId,
        required: bool,
        reason: &str,
        actor: &Actor,
    ) -> Result<Tailnet> {
        let mut tx = self.store.write().await?;
        let tailnet =
            domain::set_policy_approval(&mut tx, tailnet_id, required, reason, actor, self.clock.now()).await?;
        tx.commit().await?;
        Ok(tailnet)
    }

    /// The values of capability `name` that `node` has towards `dst` under its tailnet's policy.
    pub async fn capabilities(
        &self,
        node: &Node,
        dst: &crate::policy::Subject<'_>,
        name: &str,
    ) -> Result<Vec<serde_json::Value>> {
        let tailnet = self.get_tailnet(node.tailnet_id).await?;
        let policy = self.policy(&tailnet).await?;
        let id = node.id.to_string();
        let src = node.subject(&id);
        Ok(policy.capabilities(&src, dst, name))
    }

    /// Refuses tags the tailnet's policy does not declare in `tagOwners`, and tags whose owners do not
    /// include the caller (`token:<name>` or `role:<role>`; the admin role may hand out any declared
    /// tag, as Tailscale's admins may). Without a policy every tag may be handed out.
    async fn require_tag_owners(&self, tailnet: TailnetId, tags: &[String], by: &Principal) -> Result<()> {
        let policy = self.policy(&self.get_tailnet(tailnet).await?).await?;
        if let Some((i, tag)) = tags.iter().enumerate().find(|(_, t)| !policy.tag_defined(t)) {
            return Err(Error::invalid(
                format!("tags[{i}]"),
                format!("{tag} is not declared in the tailnet policy's tagOwners"),
            ));
        }
        if by.role == Role::Admin || !policy.explicit {
            return Ok(());
        }
        let names = by.owner_names();
        for tag in tags {
            let owners = policy.tag_owners.get(tag).map(Vec::as_slice).unwrap_or_default();
            if !owners.iter().any(|o| names.contains(o)) {
                return Err(Error::PermissionDenied(format!(
                    "{tag}: its tagOwners in the tailnet policy do not include {} (owners: [{}])",
                    names.join(" or "),
                    owners.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Creates an auth key; the secret is returned here and never again.
    pub async fn create_auth_key(&self, spec: AuthKeySpec, by: &Principal) -> Result<(AuthKey, Secret)> {
        self.require_tag_owners(spec.tailnet_id, &spec.tags, by).await?;
        let actor = &by.actor;
        let expires_in = match spec.expires_in_seconds {
            0 => self.limits.default_auth_key_expiry,
            s => Duration::from_secs(s),
        };
        if expires_in > self.limits.max_auth_key_expiry {
            return Err(Error::invalid(
                "expires_in_seconds",
                format!(
                    "{} is more than this server's maximum of {} seconds",
                    expires_in.as_secs(),
                    self.limits.max_auth_key_expiry.as_secs()
                ),
            ));
        }
        let secret = Secret::generate(AUTH_KEY_PREFIX);
        let now = self.clock.now();
        let mut tx = self.store.write().await?;
        let key = domain::create_auth_key(&mut tx, spec, secret.hash(), now + expires_in, actor, now).await?;
        tx.commit().await?;
        tracing::info!(key = %key.id, tailnet = %key.tailnet_id, actor = %actor.0, "auth key created");
        Ok((key, secret))
    }

    pub async fn revoke_auth_key(
        &self,
        id: AuthKeyId,
        reason: &str,
        keep_nodes: bool,
        actor: &Actor,
    ) -> Result<Vec<NodeId>> {
        let mut tx = self.store.write().await?;
        let nodes = domain::revoke_auth_key(&mut tx, id, reason, keep_nodes, actor, self.clock.now()).await?;
        tx.commit().await?;
        self.forget_nodes(&nodes);
        tracing::info!(key = %id, nodes = nodes.len(), actor = %actor.0, "auth key revoked");
        Ok(nodes)
    }

    /// Admits a node; returns it with its tailnet and a new session token.
    pub async fn register(&self, input: RegisterInput) -> Result<(Node, Tailnet, Secret)> {
        let credential = match input.presented {
            Presented::AuthKey(hash) => Credential::AuthKey(hash),
            Presented::OidcToken { token, tailnet } => {
                let (rule, identity, token_use) = self.verify_oidc(token.expose(), tailnet).await?;
                Credential::Federated { rule, identity, token_use }
            }
        };
        let reg = Registration {
            credential,
            wireguard_public_key: input.wireguard_public_key,
            hostname: input.hostname,
            requested_tags: input.requested_tags,
            endpoints: input.endpoints,
        };
        let session = Secret::generate(SESSION_PREFIX);
        let now = self.clock.now();
        let mut tx = self.store.write().await?;
        let lifetime = self.limits.node_lifetime;
        let (node, tailnet) = domain::register(&mut tx, reg, session.hash(), lifetime, &self.policies, now).await?;
        tx.commit().await?;
        self.reaper.schedule(node.expires_at, Deadline::NodeExpiry(node.id));
        if node.ephemeral {
            self.reaper.schedule(now + self.limits.ephemeral_node_timeout, Deadline::EphemeralIdle(node.id));
        }
        tracing::info!(node = %node.id, tailnet = %tailnet.id, address = %node.address, "node registered");
        Ok((node, tailnet, session))
    }

    /// Finds the trust rule that accepts `token` (newest first, or only `tailnet`'s).
    async fn verify_oidc(
        &self,
        token: &str,
        tailnet: Option<TailnetId>,
    ) -> Result<(TrustRuleId, crate::model::RunIdentity, Option<(crate::model::SecretHash, SystemTime)>)> {
        let issuer = crate::oidc::unverified_issuer(token)?;
        let mut rules: Vec<TrustRule> = self
            .store
            .read()
            .await?
            .trust_rules_for(&issuer)
            .await?
            .into_iter()
            .filter(|r| tailnet.is_none_or(|t| r.spec.tailnet_id == t))
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.id));
        if rules.is_empty() {
            return Err(Error::Unauthenticated(format!(
                "oidc_token: issuer unknown: no trust rule{} trusts {issuer}",
                tailnet.map(|t| format!(" of tailnet {t}")).unwrap_or_default()
            )));
        }
        let now = self.clock.now();
        let mut refusal = String::new();
        for rule in rules {
            match self.oidc.verify(token, rule.expectation(), now).await {
                Ok(verified) => {
                    // Checked and recorded in the store with the admission, so that every replica sees it.
                    let token_use = verified.jti.as_ref().map(|jti| {
                        let key = crate::secret::hash(&format!("{}\0{jti}", rule.spec.issuer));
                        (key, verified.expires + crate::oidc::SKEW)
                    });
                    tracing::info!(rule = %rule.id, issuer = %rule.spec.issuer, subject = %verified.identity.subject, "OIDC token accepted");
                    return Ok((rule.id, verified.identity, token_use));
                }
                Err(Refusal::Token(why)) => return Err(Error::Unauthenticated(format!("oidc_token: {why}"))),
                Err(Refusal::Rule(why)) => refusal = why,
            }
        }
        Err(Error::Unauthenticated(format!("oidc_token: {refusal}")))
    }

    /// Who an OIDC ID token stands for as an admin credential: the first of `rules` (those of its issuer)
    /// that accepts it, and until when. No replay check: an orchestrator sends the same token with every
    /// call of its run, until the token expires.
    pub async fn verify_admin_oidc(&self, token: &str, rules: Vec<AdminTrustRule>) -> Result<(Principal, SystemTime)> {
        if rules.is_empty() {
            return Err(Error::Unauthenticated(
                "admin token not recognised: neither a cordon-admin- token nor an ID token an admin trust rule accepts"
                    .into(),
            ));
        }
        let now = self.clock.now();
        let mut refusal = String::new();
        for rule in rules {
            let expect = crate::oidc::Expectation {
                issuer: &rule.issuer,
                audience: &rule.audience,
                conditions: &rule.conditions,
                owner_claim: "",
            };
            match self.oidc.verify(token, expect, now).await {
                Ok(verified) => {
                    let actor = Actor(format!("oidc:{}:{}", rule.name, verified.identity.subject));
                    tracing::info!(rule = %rule.name, actor = %actor.0, "admin OIDC token accepted");
                    let principal = Principal { actor, role: rule.role, scope: rule.owner_scope.clone() };
                    return Ok((principal, verified.expires));
                }
                Err(Refusal::Token(why)) => return Err(Error::Unauthenticated(format!("admin OIDC token: {why}"))),
                Err(Refusal::Rule(why)) => refusal = why,
            }
        }
        Err(Error::Unauthenticated(format!("admin OIDC token: {refusal}")))
    }

    /// Stores a webhook and starts its delivery task; it delivers the events committed from now on.
    pub async fn create_webhook(self: &Arc<Self>, mut hook: Webhook, actor: &Actor) -> Result<Webhook> {
        hook.delivered_revision = self.hub().published_revision();
        let mut tx = self.store.write().await?;
        let hook = domain::create_webhook(&mut tx, hook, actor).await?;
        tx.commit().await?;
        crate::webhook::spawn(self, hook.id);
        tracing::info!(webhook = %hook.id, url = %hook.url, "webhook created");
        Ok(hook)
    }

    pub async fn webhook(&self, id: WebhookId) -> Result<Option<Webhook>> {
        Ok(self.store.read().await?.webhooks().await?.into_iter().find(|w| w.id == id))
    }

    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>> {
        self.store.read().await?.webhooks().await
    }

    pub async fn delete_webhook(&self, hook: &Webhook, actor: &Actor) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::delete_webhook(&mut tx, hook, actor, self.clock.now()).await?;
        tx.commit().await
    }

    pub async fn record_delivery(&self, id: WebhookId, revision: u64, delivery: Option<Delivery>) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::record_delivery(&mut tx, id, revision, delivery).await?;
        tx.commit().await
    }

    pub async fn deliveries(&self, id: WebhookId, limit: usize) -> Result<Vec<Delivery>> {
        self.store.read().await?.deliveries_of(id, limit).await
    }

    pub async fn create_admin_trust_rule(&self, rule: AdminTrustRule, by: &Principal) -> Result<AdminTrustRule> {
        let mut tx = self.store.write().await?;
        let rule = domain::create_admin_trust_rule(&mut tx, rule, by).await?;
        tx.commit().await?;
        tracing::info!(rule = %rule.name, issuer = %rule.issuer, role = rule.role.name(), "admin trust rule created");
        Ok(rule)
    }

    /// The admin trust rules `by` may see; `None`: all of them.
    pub async fn list_admin_trust_rules(&self, by: Option<&Principal>) -> Result<Vec<AdminTrustRule>> {
        let mut tx = self.store.read().await?;
        match by {
            Some(by) => domain::admin_trust_rules(&mut tx, by).await,
            None => tx.admin_trust_rules().await,
        }
    }

    pub async fn delete_admin_trust_rule(&self, id: crate::model::AdminTrustRuleId, by: &Principal) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::delete_admin_trust_rule(&mut tx, id, by, self.clock.now()).await?;
        tx.commit().await
    }

    pub async fn create_trust_rule(&self, spec: TrustRuleSpec, by: &Principal) -> Result<TrustRule> {
        self.require_tag_owners(spec.tailnet_id, &spec.tags, by).await?;
        let actor = &by.actor;
        let rule =
            TrustRule { id: TrustRuleId::generate(), spec, created_by: actor.0.clone(), created_at: self.clock.now() };
        let mut tx = self.store.write().await?;
        let rule = domain::create_trust_rule(&mut tx, rule, actor).await?;
        tx.commit().await?;
        tracing::info!(rule = %rule.id, tailnet = %rule.spec.tailnet_id, issuer = %rule.spec.issuer, "trust rule created");
        Ok(rule)
    }

    pub async fn delete_trust_rule(&self, id: TrustRuleId, actor: &Actor) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::delete_trust_rule(&mut tx, id, actor, self.clock.now()).await?;
        tx.commit().await
    }

    /// Makes an admin token; the secret is returned here and never again.
    pub async fn create_admin_token(&self, spec: AdminTokenSpec, by: &Principal) -> Result<(AdminToken, Secret)> {
        let secret = Secret::generate(ADMIN_PREFIX);
        let mut tx = self.store.write().await?;
        let token = domain::create_admin_token(&mut tx, spec, secret.hash(), by, self.clock.now()).await?;
        tx.commit().await?;
        tracing::info!(token = %token.name, role = token.role.name(), "admin token created");
        Ok((token, secret))
    }

    /// The admin tokens `by` may see (all, for a caller with no owner scope); `None`: every token.
    pub async fn list_admin_tokens(&self, by: Option<&Principal>) -> Result<Vec<AdminToken>> {
        let mut tx = self.store.read().await?;
        match by {
            Some(by) => domain::admin_tokens(&mut tx, by).await,
            None => tx.admin_tokens().await,
        }
    }

    pub async fn revoke_admin_token(&self, id: AdminTokenId, reason: &str, by: &Principal) -> Result<AdminToken> {
        let mut tx = self.store.write().await?;
        let token = domain::revoke_admin_token(&mut tx, id, reason, by, self.clock.now()).await?;
        tx.commit().await?;
        tracing::info!(token = %token.name, "admin token revoked");
        Ok(token)
    }

    /// The live node a session token belongs to.
    pub async fn authenticate_session(&self, token: &str) -> Result<Node> {
        if token.is_empty() {
            return Err(Error::Unauthenticated("session_token: missing; call Register first".into()));
        }
        let node = self.store.read().await?.node_by_session(&crate::secret::hash(token)).await?.ok_or_else(|| {
            Error::Unauthenticated("session_token: unknown or revoked session; register again".into())
        })?;
        if node.expires_at <= self.clock.now() {
            return Err(Error::Unauthenticated("session_token: the node has expired; register again".into()));
        }
        Ok(node)
    }

    pub async fn remove_node(
        &self,
        id: NodeId,
        end: EndReason,
        why: &str,
        reason: &str,
        actor: &Actor,
    ) -> Result<Node> {
        let mut gateway = false;
        let not_gateway = |n: &Node| {
            gateway = n.gateway;
            !n.gateway
        };
        let mut tx = self.store.write().await?;
        let node = domain::remove_node(&mut tx, id, end, why, reason, actor, not_gateway, self.clock.now()).await?;
        tx.commit().await?;
        let Some(node) = node else {
            debug_assert!(gateway);
            return Err(Error::PermissionDenied(format!(
                "id: node {id} is its tailnet's gateway, which lives as long as the tailnet; delete the tailnet instead"
            )));
        };
        self.hub().forget(id);
        tracing::info!(node = %id, tailnet = %node.tailnet_id, %why, "node removed");
        Ok(node)
    }

    /// Removes a node whose expiry has passed (no-op otherwise).
    pub(crate) async fn expire_node(&self, id: NodeId) -> Result<()> {
        let now = self.clock.now();
        let reaper = Actor::system("reaper");
        let mut tx = self.store.write().await?;
        let expired = |n: &Node| n.expires_at <= now;
        let removed =
            domain::remove_node(&mut tx, id, EndReason::NodeExpired, "node expired", "", &reaper, expired, now).await?;
        tx.commit().await?;
        if removed.is_some() {
            self.hub().forget(id);
        }
        Ok(())
    }

    /// Removes an ephemeral node that has held no stream for the configured timeout (no-op otherwise).
    pub(crate) async fn reap_idle_ephemeral(&self, id: NodeId) -> Result<()> {
        let now = self.clock.now();
        let (online, last_seen) = self.hub().presence(id);
        if online || last_seen.is_some_and(|t| t + self.limits.ephemeral_node_timeout > now) {
            return Ok(());
        }
        // Among replicas: its stream may be on another one.
        if let Some(pg) = self.store.postgres().filter(|_| self.cluster.get().is_some())
            && !pg.present(&[id]).await?.is_empty()
        {
            return Ok(());
        }
        let reaper = Actor::system("reaper");
        let why = "ephemeral node inactive";
        let mut tx = self.store.write().await?;
        let ephemeral = |n: &Node| n.ephemeral;
        let removed =
            domain::remove_node(&mut tx, id, EndReason::NodeRemoved, why, "", &reaper, ephemeral, now).await?;
        tx.commit().await?;
        if removed.is_some() {
            self.hub().forget(id);
            tracing::info!(node = %id, "idle ephemeral node removed");
        }
        Ok(())
    }

    /// Marks the node online until the guard drops (among replicas, in the database too).
    pub fn connect(self: &Arc<Self>, node: &Node) -> Presence {
        self.hub().connect(node.id, self.clock.now());
        // A gateway is the server's own: where it runs is its lease.
        let shared = !node.gateway;
        if shared {
            self.share_presence(node.id, true);
        }
        Presence { cp: self.clone(), node: node.id, ephemeral: node.ephemeral, shared }
    }

    fn share_presence(&self, node: NodeId, present: bool) {
        if let Some(cluster) = self.cluster.get() {
            cluster.presence(node, present);
        }
    }

    /// The server's clock (paused in tests).
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Whether `tailnet`'s gateway runs now.
    pub fn gateway_running(&self, tailnet: TailnetId) -> bool {
        self.gateways.is_running(tailnet)
    }

    /// How many gateways run now.
    pub fn gateways_running(&self) -> usize {
        self.gateways.running()
    }

    /// Which storage engine holds the records: `sled` or `postgres`.
    /// How many records of each kind the store holds (the metrics' tailnet and node gauges).
    pub async fn store_counts(&self) -> Result<crate::store::Counts> {
        self.store.counts().await
    }

    /// Where `/metrics` is served (after [`crate::serve::Server::serve`] bound it), for tests and logs.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        *self.metrics_address.lock().unwrap()
    }

    /// Where the operator's console listens, if it does.
    pub fn console_address(&self) -> Option<std::net::SocketAddr> {
        *self.console_address.lock().unwrap()
    }

    /// The Prometheus exposition of this server's metrics now.
    pub async fn render_metrics(&self) -> String {
        self.metrics.render(self).await
    }

    pub fn store_engine(&self) -> &'static str {
        self.store.engine()
    }

    // -------------------------------------------------------------------------------------------------
    // Reads and small writes the APIs and the gateway call

    pub async fn get_tailnet(&self, id: TailnetId) -> Result<Tailnet> {
        self.store.read().await?.tailnet(id).await?.ok_or_else(|| Error::not_found("tailnet", id))
    }

    /// Every tailnet (for the reaper and the gateways at start).
    pub async fn all_tailnets(&self) -> Result<Vec<Tailnet>> {
        let mut tx = self.store.read().await?;
        let mut out: Vec<Tailnet> = Vec::new();
        loop {
            let page = tx.tailnets(None, out.last().map(|t| t.id), 1000).await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Tailnets in creation order after `after`, filtered; returns the page and whether more follow.
    pub async fn list_tailnets(
        &self,
        owner: Option<&str>,
        selector: &[LabelRequirement],
        mut after: Option<TailnetId>,
        limit: usize,
    ) -> Result<(Vec<Tailnet>, bool)> {
        let mut tx = self.store.read().await?;
        let mut out = Vec::new();
        loop {
            let page = tx.tailnets(owner, after, 256).await?;
            let done = page.len() < 256;
            after = page.last().map(|t| t.id);
            for t in page {
                if !selector.iter().all(|r| r.matches(&t.labels)) {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(t);
            }
            if done {
                return Ok((out, false));
            }
        }
    }

    /// The tailnet an auth key or trust rule belongs to (for scope checks).
    pub async fn tailnet_of(&self, target: Target) -> Result<TailnetId> {
        let mut tx = self.store.read().await?;
        match target {
            Target::AuthKey(id) => {
                tx.auth_key(id).await?.map(|k| k.tailnet_id).ok_or_else(|| Error::not_found("auth key", id))
            }
            Target::TrustRule(id) => {
                tx.trust_rule(id).await?.map(|r| r.spec.tailnet_id).ok_or_else(|| Error::not_found("trust rule", id))
            }
        }
    }

    pub async fn list_auth_keys(&self, tailnet: TailnetId) -> Result<Vec<AuthKey>> {
        let mut tx = self.store.read().await?;
        tx.tailnet(tailnet).await?.ok_or_else(|| Error::not_found("tailnet", tailnet))?;
        tx.auth_keys_of(tailnet).await
    }

    pub async fn list_trust_rules(&self, tailnet: TailnetId) -> Result<Vec<TrustRule>> {
        let mut tx = self.store.read().await?;
        tx.tailnet(tailnet).await?.ok_or_else(|| Error::not_found("tailnet", tailnet))?;
        tx.trust_rules_of(tailnet).await
    }

    /// The nodes of a tailnet, its gateway included.
    pub async fn list_nodes(&self, tailnet: TailnetId) -> Result<Vec<Node>> {
        let mut tx = self.store.read().await?;
        tx.tailnet(tailnet).await?.ok_or_else(|| Error::not_found("tailnet", tailnet))?;
        tx.nodes_of(tailnet).await
    }

    pub async fn get_node(&self, id: NodeId) -> Result<Node> {
        self.store.read().await?.node(id).await?.ok_or_else(|| Error::not_found("node", id))
    }

    /// A version of the tailnet's policy; 0 = the current one. `None` while it runs the default policy.
    pub async fn get_policy(&self, tailnet_id: TailnetId, version: u64) -> Result<Option<PolicyRecord>> {
        let mut tx = self.store.read().await?;
        let tailnet = tx.tailnet(tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
        let version = if version == 0 { tailnet.policy_version } else { version };
        if version == 0 {
            return Ok(None);
        }
        tx.policy(tailnet_id, version)
            .await?
            .map(Some)
            .ok_or_else(|| Error::not_found("policy version", format!("{version} of tailnet {tailnet_id}")))
    }

    /// Every stored policy version of a tailnet, oldest first, and the version in force.
    pub async fn policy_history(&self, tailnet_id: TailnetId) -> Result<(Vec<PolicyRecord>, u64)> {
        let mut tx = self.store.read().await?;
        let tailnet = tx.tailnet(tailnet_id).await?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
        let mut versions = tx.policies_of(tailnet_id).await?;
        versions.sort_by_key(|r| r.version);
        Ok((versions, tailnet.policy_version))
    }

    /// Validates `text` and runs its tests as [`ControlPlane::set_policy`] would, storing nothing; with a
    /// tailnet, also says what would change from its current version.
    pub async fn test_policy(&self, tailnet_id: Option<TailnetId>, text: &str) -> Result<(Policy, String)> {
        let policy = parse_policy(text)?;
        let summary = match tailnet_id {
            None => String::new(),
            Some(id) => {
                let tailnet = self.get_tailnet(id).await?;
                policy.diff_summary(&*self.policy(&tailnet).await?)
            }
        };
        Ok((policy, summary))
    }

    /// Audit events in revision order, filtered, and whether more follow.
    pub async fn list_events(&self, filter: &EventFilter) -> Result<(Vec<Event>, bool)> {
        self.store.read().await?.events(filter).await
    }

    pub async fn set_upstream(&self, tailnet: TailnetId, spec: UpstreamSpec, actor: &Actor) -> Result<UpstreamInfo> {
        let mut tx = self.store.write().await?;
        let info = domain::set_upstream(&mut tx, tailnet, spec, actor, self.clock.now()).await?;
        tx.commit().await?;
        Ok(info)
    }

    /// The API key of an upstream, for the gateway that calls it.
    pub async fn upstream_api_key(&self, tailnet: TailnetId, name: &str) -> Result<Option<Secret>> {
        self.store.read().await?.upstream_key(tailnet, name).await
    }

    pub async fn set_endpoints(&self, node: NodeId, endpoints: Vec<std::net::SocketAddr>) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::set_endpoints(&mut tx, node, endpoints).await?;
        tx.commit().await
    }

    /// What `node` is told at the current revision.
    pub async fn snapshot(&self, node: NodeId) -> Result<Snapshot> {
        self.store.snapshot(node).await
    }

    /// The gateway of `tailnet`, added if the tailnet predates gateways.
    pub(crate) async fn ensure_gateway(&self, tailnet: TailnetId, keys: GatewayKeys) -> Result<(NodeId, [u8; 32])> {
        if let Some(found) = self.store.read().await?.gateway(tailnet).await? {
            return Ok(found);
        }
        let mut tx = self.store.write().await?;
        let found = domain::ensure_gateway(&mut tx, tailnet, keys).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// Appends gateway request events in one durable commit.
    pub(crate) async fn record_gateway_requests(&self, requests: Vec<GatewayEvent>) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::record_gateway_requests(&mut tx, requests);
        tx.commit().await
    }

    pub async fn prune_events(&self, before: SystemTime, limit: usize) -> Result<usize> {
        self.store.prune_events(before, limit).await
    }

    /// Makes every applied write durable.
    pub async fn flush(&self) -> Result<()> {
        self.store.flush().await
    }
}

/// A node's open netmap stream. Dropping it marks the stream closed and, for an ephemeral node whose
/// last stream this was, starts its idle timeout.
pub struct Presence {
    cp: Arc<ControlPlane>,
    node: NodeId,
    ephemeral: bool,
    /// Recorded in the database too (among replicas).
    shared: bool,
}

impl Drop for Presence {
    fn drop(&mut self) {
        let now = self.cp.clock.now();
        let remaining = self.cp.hub().disconnect(self.node, now);
        if remaining == 0 && self.shared {
            self.cp.share_presence(self.node, false);
        }
        if remaining == 0 && self.ephemeral {
            self.cp.reaper.schedule(now + self.cp.limits.ephemeral_node_timeout, Deadline::EphemeralIdle(self.node));
        }
    }
}

/// Parses a policy document; a refusal is `INVALID_ARGUMENT` on `policy_json` with the path and position.
pub fn parse_policy(text: &str) -> Result<Policy> {
    if text.len() > 128 * 1024 {
        return Err(Error::invalid("policy_json", "is larger than 128 KiB"));
    }
    let policy = Policy::parse(text).map_err(|e| Error::invalid("policy_json", e.to_string()))?;
    let cap = crate::gateway::rules::CAPABILITY;
    for (i, grant) in policy.grants.iter().enumerate() {
        for (j, value) in grant.app.get(cap).into_iter().flatten().enumerate() {
            crate::gateway::rules::check(value)
                .map_err(|e| Error::invalid("policy_json", format!("grants[{i}].app[\"{cap}\"][{j}].{e}")))?;
        }
    }
    Ok(policy)
}

/// Completes when shutdown begins (or the control plane is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
