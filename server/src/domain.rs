//! The domain core: admission, address allocation, tailnet and node lifecycles, tag rules, policy
//! versions and audit events, each written once over [`Tx`] and the same on every storage engine.
//!
//! Each operation runs inside the caller's transaction and records what changed (audit events and
//! netmap changes) in it; the store publishes those after commit. Lock order, for engines that lock
//! rows: auth keys, then the tailnet, then anything in it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::hub::NetChange;
use crate::model::{
    Actor, AdminToken, AdminTokenId, AdminTokenSpec, AdminTrustRule, AdminTrustRuleId, AuthKey, AuthKeyId, AuthKeySpec,
    Credential, Delivery, EndReason, Event, EventKind, KeyState, Node, NodeId, PolicyProposal, PolicyRecord, Principal,
    ProposalId, ProposalState, Registration, RunIdentity, SecretHash, Tailnet, TailnetId, TailnetSpec, TrustRule,
    TrustRuleId, UpstreamInfo, UpstreamSpec, Webhook, WebhookId,
};
use crate::policy::Policy;
use crate::store::{GatewayEvent, GatewayKeys, Placement, Tx};

mod people;
pub use people::*;

/// The fields of an audit event an operation fills in; the id is made here, the revision at commit.
struct Draft<'a> {
    kind: EventKind,
    time: SystemTime,
    tailnet: Option<TailnetId>,
    node: Option<NodeId>,
    auth_key: Option<AuthKeyId>,
    actor: &'a Actor,
    reason: &'a str,
    summary: String,
    run: Option<&'a RunIdentity>,
    user: Option<&'a crate::model::NodeUser>,
    gateway: Option<Box<crate::model::GatewayRequest>>,
}

static SYSTEM: std::sync::LazyLock<Actor> = std::sync::LazyLock::new(|| Actor::system("store"));

impl Draft<'_> {
    fn at(time: SystemTime) -> Self {
        Draft {
            kind: EventKind::NodeJoined,
            time,
            tailnet: None,
            node: None,
            auth_key: None,
            actor: &SYSTEM,
            reason: "",
            summary: String::new(),
            run: None,
            user: None,
            gateway: None,
        }
    }
}

fn record(tx: &mut Tx, d: Draft<'_>) {
    tx.event(Event {
        id: uuid::Uuid::now_v7(),
        revision: 0,
        time: d.time,
        kind: d.kind,
        tailnet_id: d.tailnet,
        node_id: d.node,
        auth_key_id: d.auth_key,
        actor: d.actor.0.clone(),
        reason: d.reason.to_string(),
        summary: d.summary,
        run: d.run.cloned(),
        gateway: d.gateway,
        user: d.user.cloned(),
    });
}

async fn tailnet(tx: &mut Tx, id: TailnetId) -> Result<Tailnet> {
    tx.tailnet(id).await?.ok_or_else(|| Error::not_found("tailnet", id))
}

/// Parsed policies by tailnet, with the version each is; a miss reads the version through `tx`.
pub struct Policies {
    parsed: Mutex<HashMap<TailnetId, (u64, Arc<Policy>)>>,
    allow_all: Arc<Policy>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies { parsed: Mutex::default(), allow_all: Arc::new(Policy::allow_all()) }
    }
}

impl Policies {
    /// The policy `tailnet` runs at the version its record names.
    pub async fn current(&self, tx: &mut Tx, tailnet: &Tailnet) -> Result<Arc<Policy>> {
        if tailnet.policy_version == 0 {
            return Ok(self.allow_all.clone());
        }
        if let Some((version, policy)) = self.parsed.lock().unwrap().get(&tailnet.id)
            && *version == tailnet.policy_version
        {
            return Ok(policy.clone());
        }
        let record = tx
            .policy(tailnet.id, tailnet.policy_version)
            .await?
            .ok_or_else(|| Error::Corrupt { key: format!("policy of {}", tailnet.id), detail: "missing".into() })?;
        let policy = Arc::new(Policy::parse(&record.text).map_err(|e| Error::Corrupt {
            key: format!("policy v{} of {}", record.version, tailnet.id),
            detail: e.to_string(),
        })?);
        self.remember(tailnet.id, record.version, policy.clone());
        Ok(policy)
    }

    /// Version `version` of the tailnet's policy (read and compiled unless it is the one in memory);
    /// `None` if it is not stored (the tailnet is gone).
    pub async fn version(&self, tx: &mut Tx, tailnet: TailnetId, version: u64) -> Result<Option<Arc<Policy>>> {
        if let Some((v, policy)) = self.parsed.lock().unwrap().get(&tailnet)
            && *v == version
        {
            return Ok(Some(policy.clone()));
        }
        let Some(record) = tx.policy(tailnet, version).await? else { return Ok(None) };
        let policy =
            Arc::new(Policy::parse(&record.text).map_err(|e| Error::Corrupt {
                key: format!("policy v{version} of {tailnet}"),
                detail: e.to_string(),
            })?);
        self.remember(tailnet, version, policy.clone());
        Ok(Some(policy))
    }

    pub fn remember(&self, tailnet: TailnetId, version: u64, policy: Arc<Policy>) {
        let mut parsed = self.parsed.lock().unwrap();
        // Never replace a newer version with an older one read late.
        if parsed.get(&tailnet).is_none_or(|(v, _)| *v <= version) {
            parsed.insert(tailnet, (version, policy));
        }
    }

    pub fn forget(&self, tailnet: TailnetId) {
        self.parsed.lock().unwrap().remove(&tailnet);
    }
}

// -----------------------------------------------------------------------------------------------------
// Tailnets

/// Creates a tailnet with its gateway node, its upstreams' keys and its first policy.
pub async fn create_tailnet(
    tx: &mut Tx,
    spec: TailnetSpec,
    gateway: GatewayKeys,
    actor: &Actor,
    now: SystemTime,
) -> Result<Tailnet> {
    let tailnet = Tailnet {
        id: TailnetId::generate(),
        name: spec.name,
        owner: spec.owner,
        labels: spec.labels,
        cidr: spec.cidr,
        created_at: now,
        expires_at: (spec.ttl_seconds > 0).then(|| now + Duration::from_secs(spec.ttl_seconds)),
        ttl_seconds: spec.ttl_seconds,
        created_by: actor.0.clone(),
        approval_required: spec.approval_required,
        node_count: 0,
        policy_version: u64::from(spec.policy.is_some()),
        upstreams: spec
            .upstreams
            .iter()
            .map(|u| UpstreamInfo { name: u.name.clone(), kind: u.kind, base_url: u.base_url.clone(), updated_at: now })
            .collect(),
    };
    tx.put_tailnet(&tailnet).await?;
    put_gateway(tx, &tailnet, &gateway, now).await?;
    for u in &spec.upstreams {
        tx.put_upstream_key(tailnet.id, &u.name, &u.api_key).await?;
    }
    if let Some((text, policy)) = &spec.policy {
        let record = PolicyRecord {
            tailnet_id: tailnet.id,
            version: 1,
            text: text.clone(),
            author: actor.0.clone(),
            reason: "set at creation".into(),
            created_at: now,
            summary: policy.diff_summary(&Policy::allow_all()),
        };
        tx.put_policy(&record).await?;
    }
    record(
        tx,
        Draft {
            kind: EventKind::TailnetCreated,
            tailnet: Some(tailnet.id),
            actor,
            summary: format!("tailnet {} ({}) created for {}", tailnet.name, tailnet.cidr, tailnet.owner),
            ..Draft::at(now)
        },
    );
    Ok(tailnet)
}

/// What one tailnet deletion removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub nodes: Vec<NodeId>,
    pub keys: u32,
}

/// Deletes a tailnet with its nodes and keys; the audit log stays. `expired` deletes only a tailnet
/// whose TTL has run out, and records it as expired.
pub async fn delete_tailnet(
    tx: &mut Tx,
    id: TailnetId,
    reason: &str,
    actor: &Actor,
    expired: bool,
    now: SystemTime,
) -> Result<Removed> {
    // Keys first: admission locks a key before its tailnet.
    let keys = tx.auth_keys_of(id).await?;
    let tailnet = tailnet(tx, id).await?;
    if expired && tailnet.expires_at.is_none_or(|at| at > now) {
        return Ok(Removed::default());
    }
    let (kind, end, what) = if expired {
        (EventKind::TailnetExpired, EndReason::TailnetExpired, "expired")
    } else {
        (EventKind::TailnetDeleted, EndReason::TailnetDeleted, "deleted")
    };
    let mut removed = Removed { keys: keys.len() as u32, ..Removed::default() };
    for node in tx.nodes_of(id).await? {
        if node.gateway {
            continue;
        }
        record(
            tx,
            Draft {
                kind: EventKind::NodeLeft,
                tailnet: Some(id),
                node: Some(node.id),
                actor,
                reason,
                summary: format!("node {} removed: tailnet {what}", node.hostname),
                run: node.identity.as_ref(),
                user: node.user.as_ref(),
                ..Draft::at(now)
            },
        );
        removed.nodes.push(node.id);
    }
    tx.delete_tailnet(id).await?;
    record(
        tx,
        Draft {
            kind,
            tailnet: Some(id),
            actor,
            reason,
            summary: format!(
                "tailnet {} {what}: {} nodes revoked, {} keys deleted",
                tailnet.name,
                removed.nodes.len(),
                removed.keys
            ),
            ..Draft::at(now)
        },
    );
    let message = if reason.is_empty() { format!("tailnet {what}") } else { format!("tailnet {what}: {reason}") };
    tx.netmap(id, NetChange::TailnetGone { reason: end, message });
    Ok(removed)
}

// -----------------------------------------------------------------------------------------------------
// Policy

/// Stores `policy` as the tailnet's next version; strips tags the policy no longer declares from the
/// nodes that carry them; tells every watcher.
#[allow(clippy::too_many_arguments)]
pub async fn set_policy(
    tx: &mut Tx,
    tailnet_id: TailnetId,
    text: String,
    policy: Arc<Policy>,
    previous: &Policy,
    author: String,
    reason: String,
    actor: &Actor,
    now: SystemTime,
) -> Result<PolicyRecord> {
    let mut t = tailnet(tx, tailnet_id).await?;
    t.policy_version += 1;
    let record_ = PolicyRecord {
        tailnet_id,
        version: t.policy_version,
        text,
        author,
        reason,
        created_at: now,
        summary: policy.diff_summary(previous),
    };
    tx.put_policy(&record_).await?;
    tx.put_tailnet(&t).await?;
    let mut updated = Vec::new();
    for node in tx.nodes_of(tailnet_id).await? {
        let mut changed = node.clone();
        changed.tags.retain(|t| policy.tag_defined(t));
        if changed.tags.len() != node.tags.len() {
            tx.put_node(&changed, Some(&node)).await?;
            updated.push(Arc::new(changed));
        }
    }
    let stripped =
        if updated.is_empty() { String::new() } else { format!("; tags removed from {} nodes", updated.len()) };
    record(
        tx,
        Draft {
            kind: EventKind::PolicyChanged,
            tailnet: Some(tailnet_id),
            actor,
            reason: &record_.reason,
            summary: format!("policy v{} by {}: {}{stripped}", record_.version, record_.author, record_.summary),
            ..Draft::at(now)
        },
    );
    tx.netmap(tailnet_id, NetChange::PolicyChanged { policy, version: record_.version, updated });
    Ok(record_)
}

// -----------------------------------------------------------------------------------------------------
// Policy change control

/// Turns the requirement for approved policy changes on or off.
pub async fn set_policy_approval(
    tx: &mut Tx,
    tailnet_id: TailnetId,
    required: bool,
    reason: &str,
    actor: &Actor,
    now: SystemTime,
) -> Result<Tailnet> {
    let mut t = tailnet(tx, tailnet_id).await?;
    if t.approval_required != required {
        t.approval_required = required;
        tx.put_tailnet(&t).await?;
        record(
            tx,
            Draft {
                kind: EventKind::PolicyApprovalSet,
                tailnet: Some(tailnet_id),
                actor,
                reason,
                summary: format!("policy changes {} approval", if required { "now need" } else { "no longer need" }),
                ..Draft::at(now)
            },
        );
    }
    Ok(t)
}

/// Stores a validated document as a proposal against the current version.
pub async fn propose_policy(tx: &mut Tx, proposal: PolicyProposal, actor: &Actor) -> Result<PolicyProposal> {
    tailnet(tx, proposal.tailnet_id).await?;
    tx.put_proposal(&proposal).await?;
    record(
        tx,
        Draft {
            kind: EventKind::PolicyProposed,
            tailnet: Some(proposal.tailnet_id),
            actor,
            reason: &proposal.reason,
            summary: format!(
                "policy proposal {} by {} against v{}: {}",
                proposal.id, proposal.author, proposal.base_version, proposal.summary
            ),
            ..Draft::at(proposal.created_at)
        },
    );
    Ok(proposal)
}

/// A pending proposal that `by` may decide: not expired (an expired one is marked so), not its own.
pub async fn pending_proposal(tx: &mut Tx, id: ProposalId, by: &Actor, now: SystemTime) -> Result<PolicyProposal> {
    let proposal = tx.proposal(id).await?.ok_or_else(|| Error::not_found("policy proposal", id))?;
    if proposal.state != ProposalState::Pending {
        return Err(Error::FailedPrecondition(format!("policy proposal {id} is {} already", proposal.state.name())));
    }
    if proposal.expires_at <= now {
        return Err(Error::FailedPrecondition(format!(
            "policy proposal {id} expired at {}; propose it again",
            crate::time::rfc3339(proposal.expires_at)
        )));
    }
    if proposal.proposed_by == by.0 {
        return Err(Error::PermissionDenied(format!(
            "policy proposal {id} was proposed by {}; another principal must decide it",
            proposal.proposed_by
        )));
    }
    Ok(proposal)
}

/// Records the decision on a pending proposal (see [`pending_proposal`]).
pub async fn decide_proposal(
    tx: &mut Tx,
    mut proposal: PolicyProposal,
    state: ProposalState,
    version: u64,
    reason: &str,
    by: &Actor,
    now: SystemTime,
) -> Result<PolicyProposal> {
    proposal.state = state;
    proposal.decided_by = Some(by.0.clone());
    proposal.decided_at = Some(now);
    proposal.decision_reason = reason.to_string();
    proposal.version = version;
    tx.put_proposal(&proposal).await?;
    let (kind, summary) = match state {
        ProposalState::Approved => {
            (EventKind::PolicyApproved, format!("policy proposal {} approved as v{version}", proposal.id))
        }
        ProposalState::Rejected => (EventKind::PolicyRejected, format!("policy proposal {} rejected", proposal.id)),
        ProposalState::Expired | ProposalState::Pending => {
            (EventKind::PolicyProposalExpired, format!("policy proposal {} expired undecided", proposal.id))
        }
    };
    record(tx, Draft { kind, tailnet: Some(proposal.tailnet_id), actor: by, reason, summary, ..Draft::at(now) });
    Ok(proposal)
}

/// Marks a proposal expired if it is still pending past its expiry.
pub async fn expire_proposal(tx: &mut Tx, id: ProposalId, now: SystemTime) -> Result<()> {
    match tx.proposal(id).await? {
        Some(p) if p.state == ProposalState::Pending && p.expires_at <= now => {
            decide_proposal(tx, p, ProposalState::Expired, 0, "", &SYSTEM, now).await.map(drop)
        }
        _ => Ok(()),
    }
}

// -----------------------------------------------------------------------------------------------------
// Auth keys

pub async fn create_auth_key(
    tx: &mut Tx,
    spec: AuthKeySpec,
    secret_hash: SecretHash,
    expires_at: SystemTime,
    actor: &Actor,
    now: SystemTime,
) -> Result<AuthKey> {
    let tailnet = tailnet(tx, spec.tailnet_id).await?;
    let auth_key = AuthKey {
        id: AuthKeyId::generate(),
        tailnet_id: tailnet.id,
        secret_hash,
        tags: spec.tags,
        reusable: spec.reusable,
        ephemeral: spec.ephemeral,
        max_uses: if !spec.reusable && spec.max_uses == 0 { 1 } else { spec.max_uses },
        uses: 0,
        created_at: now,
        expires_at,
        revoked_at: None,
        reason: spec.reason,
        created_by: actor.0.clone(),
        owner: spec.owner.unwrap_or_else(|| tailnet.owner.clone()),
    };
    tx.put_auth_key(&auth_key).await?;
    let uses = match auth_key.max_uses {
        0 => "unlimited uses".to_string(),
        1 => "single-use".to_string(),
        n => format!("{n} uses"),
    };
    record(
        tx,
        Draft {
            kind: EventKind::KeyCreated,
            tailnet: Some(tailnet.id),
            auth_key: Some(auth_key.id),
            actor,
            reason: &auth_key.reason,
            summary: format!(
                "auth key created: {uses}{}, tags [{}]",
                if auth_key.ephemeral { ", ephemeral" } else { "" },
                auth_key.tags.join(", ")
            ),
            ..Draft::at(now)
        },
    );
    Ok(auth_key)
}

/// Revokes a key and, unless `keep_nodes`, the nodes it admitted; returns those nodes.
pub async fn revoke_auth_key(
    tx: &mut Tx,
    id: AuthKeyId,
    reason: &str,
    keep_nodes: bool,
    actor: &Actor,
    now: SystemTime,
) -> Result<Vec<NodeId>> {
    let mut auth_key = tx.auth_key(id).await?.ok_or_else(|| Error::not_found("auth key", id))?;
    if auth_key.revoked_at.is_none() {
        auth_key.revoked_at = Some(now);
        tx.put_auth_key(&auth_key).await?;
        record(
            tx,
            Draft {
                kind: EventKind::KeyRevoked,
                tailnet: Some(auth_key.tailnet_id),
                auth_key: Some(id),
                actor,
                reason,
                summary: "auth key revoked".into(),
                ..Draft::at(now)
            },
        );
    }
    let mut revoked = Vec::new();
    if !keep_nodes {
        let mut t = tailnet(tx, auth_key.tailnet_id).await?;
        for node in tx.nodes_of(t.id).await? {
            if node.auth_key_id == Some(id) {
                remove(tx, &mut t, &node, EndReason::KeyRevoked, "its auth key was revoked", reason, actor, now)
                    .await?;
                revoked.push(node.id);
            }
        }
        tx.put_tailnet(&t).await?;
    }
    Ok(revoked)
}

// -----------------------------------------------------------------------------------------------------
// Nodes

/// What a checked credential admits.
struct Admitted {
    field: &'static str,
    tailnet: TailnetId,
    tags: Vec<String>,
    owner: Option<String>,
    ephemeral: bool,
    lifetime: Option<Duration>,
    auth_key: Option<AuthKeyId>,
}

/// Checks a credential; for an auth key, also counts the use (the key's row is locked until commit,
/// so a single-use key admits one node however many race for it).
async fn admit(tx: &mut Tx, credential: &Credential, now: SystemTime) -> Result<Admitted> {
    match credential {
        Credential::AuthKey(hash) => {
            let unknown = || Error::Unauthenticated("auth_key: unknown key; create one with CreateAuthKey".into());
            let mut auth_key = tx.auth_key_by_secret(hash).await?.ok_or_else(unknown)?;
            match auth_key.state(now) {
                KeyState::Valid => {}
                KeyState::Expired => {
                    return Err(Error::Unauthenticated(format!(
                        "auth_key: expired at {}; create a new key",
                        crate::time::rfc3339(auth_key.expires_at)
                    )));
                }
                KeyState::Revoked => {
                    return Err(Error::Unauthenticated("auth_key: revoked; create a new key".into()));
                }
                KeyState::Exhausted => {
                    return Err(Error::Unauthenticated(format!(
                        "auth_key: exhausted: it admitted {} of {} nodes; create a new key",
                        auth_key.uses, auth_key.max_uses
                    )));
                }
            }
            auth_key.uses += 1;
            tx.put_auth_key(&auth_key).await?;
            Ok(Admitted {
                field: "auth key",
                tailnet: auth_key.tailnet_id,
                tags: auth_key.tags,
                owner: Some(auth_key.owner),
                ephemeral: auth_key.ephemeral,
                lifetime: None,
                auth_key: Some(auth_key.id),
            })
        }
        Credential::Federated { rule, identity, token_use } => {
            if let Some((key, expires)) = token_use
                && !tx.use_token(key, *expires, now).await?
            {
                return Err(Error::Unauthenticated(
                    "oidc_token: replayed: this token (jti) was used before; request a fresh one".into(),
                ));
            }
            let rule = tx
                .trust_rule(*rule)
                .await?
                .ok_or_else(|| Error::Unauthenticated("oidc_token: the trust rule was deleted".into()))?;
            // The run's owner: the person the rule's owner claim names (who triggered the run).
            let owner = match rule.spec.owner_claim.as_str() {
                "" => None,
                claim => match identity.claims.get(claim).filter(|v| !v.is_empty() && v.len() <= 128) {
                    Some(value) => Some(value.clone()),
                    None => {
                        return Err(Error::Unauthenticated(format!(
                            "oidc_token: the trust rule takes the owner from claim {claim}, which the token lacks"
                        )));
                    }
                },
            };
            Ok(Admitted {
                field: "trust rule",
                tailnet: rule.spec.tailnet_id,
                tags: rule.spec.tags,
                owner,
                ephemeral: rule.spec.ephemeral,
                lifetime: Some(Duration::from_secs(rule.spec.max_node_lifetime_seconds)),
                auth_key: None,
            })
        }
    }
}

/// Admits a node with an auth key or a trust rule's verdict, or re-authenticates the node that
/// already has this WireGuard key in the tailnet. A tag the tailnet's policy stopped declaring after
/// the key or rule was made is not handed out.
pub async fn register(
    tx: &mut Tx,
    reg: Registration,
    session_hash: SecretHash,
    node_lifetime: Duration,
    policies: &Policies,
    now: SystemTime,
) -> Result<(Node, Tailnet)> {
    let admission = admit(tx, &reg.credential, now).await?;
    let mut tailnet = tx
        .tailnet(admission.tailnet)
        .await?
        .ok_or_else(|| Error::Unauthenticated(format!("{}: its tailnet no longer exists", admission.field)))?;
    let tags = if reg.requested_tags.is_empty() {
        admission.tags.clone()
    } else {
        for (i, t) in reg.requested_tags.iter().enumerate() {
            if !admission.tags.contains(t) {
                return Err(Error::PermissionDenied(format!(
                    "requested_tags[{i}]: {t} is not granted by the {} (it grants [{}])",
                    admission.field,
                    admission.tags.join(", ")
                )));
            }
        }
        reg.requested_tags.clone()
    };
    let policy = policies.current(tx, &tailnet).await?;
    let tags: Vec<String> = tags.into_iter().filter(|t| policy.tag_defined(t)).collect();
    let owner = admission.owner.clone().unwrap_or_else(|| tailnet.owner.clone());
    let expires_at = now + admission.lifetime.map_or(node_lifetime, |l| l.min(node_lifetime));
    let (auth_key_id, trust_rule_id, identity) = match &reg.credential {
        Credential::AuthKey(_) => (admission.auth_key, None, None),
        Credential::Federated { rule, identity, .. } => (None, Some(*rule), Some(identity.clone())),
    };

    let (first, last) = (tailnet.cidr.first_node_address(), tailnet.cidr.last_node_address());
    let placement = tx.placement(tailnet.id, &reg.wireguard_public_key, &reg.hostname, first, last).await?;
    let (node, change, summary) = match placement {
        Placement::Existing(old) => {
            let mut node = (*old).clone();
            node.session_hash = session_hash;
            node.tags = tags;
            node.auth_key_id = auth_key_id;
            node.trust_rule_id = trust_rule_id;
            node.identity = identity;
            node.ephemeral = admission.ephemeral;
            node.owner = owner;
            node.expires_at = expires_at;
            node.endpoints = reg.endpoints.clone();
            tx.put_node(&node, Some(&old)).await?;
            let summary = format!("node {} re-authenticated at {}", node.hostname, node.address);
            (node.clone(), NetChange::PeerUpdated(Arc::new(node)), summary)
        }
        Placement::New { address, hostname_taken } => {
            let (address, hostname) = new_place(tx, &tailnet, address, hostname_taken, &reg.hostname).await?;
            let node = Node {
                id: NodeId::generate(),
                tailnet_id: tailnet.id,
                hostname,
                wireguard_public_key: reg.wireguard_public_key,
                address,
                tags,
                owner,
                auth_key_id,
                ephemeral: admission.ephemeral,
                created_at: now,
                expires_at,
                session_hash,
                endpoints: reg.endpoints.clone(),
                trust_rule_id,
                identity,
                gateway: false,
                user: None,
            };
            tx.put_node(&node, None).await?;
            tailnet.node_count += 1;
            tx.put_tailnet(&tailnet).await?;
            let summary = format!("node {} joined at {}", node.hostname, node.address);
            (node.clone(), NetChange::PeerAdded(Arc::new(node)), summary)
        }
    };
    let summary = match &node.identity {
        Some(run) => format!("{summary} via trust rule ({} {}), owned by {}", run.issuer, run.subject, node.owner),
        None => summary,
    };
    record(
        tx,
        Draft {
            kind: EventKind::NodeJoined,
            tailnet: Some(tailnet.id),
            node: Some(node.id),
            auth_key: node.auth_key_id,
            actor: &Actor::node(node.id),
            summary,
            run: node.identity.as_ref(),
            user: node.user.as_ref(),
            ..Draft::at(now)
        },
    );
    tx.netmap(tailnet.id, change);
    Ok((node, tailnet))
}

/// A new node's address (the one placement found, if any) and hostname (`wanted`, made unique).
async fn new_place(
    tx: &mut Tx,
    tailnet: &Tailnet,
    address: Option<std::net::Ipv4Addr>,
    hostname_taken: bool,
    wanted: &str,
) -> Result<(std::net::Ipv4Addr, String)> {
    let address = address.ok_or_else(|| {
        Error::ResourceExhausted(format!("tailnet {} has no free address left in {}", tailnet.id, tailnet.cidr))
    })?;
    let hostname = if hostname_taken { unique_hostname(tx, tailnet.id, wanted).await? } else { wanted.to_string() };
    Ok((address, hostname))
}

/// `wanted`, or `wanted-N` with the smallest N that is free in the tailnet.
async fn unique_hostname(tx: &mut Tx, tailnet: TailnetId, wanted: &str) -> Result<String> {
    if !tx.hostname_taken(tailnet, wanted).await? {
        return Ok(wanted.to_string());
    }
    for n in 1.. {
        let suffix = format!("-{n}");
        let base = &wanted[..wanted.len().min(63 - suffix.len())];
        let candidate = format!("{base}{suffix}");
        if !tx.hostname_taken(tailnet, &candidate).await? {
            return Ok(candidate);
        }
    }
    unreachable!("some suffix is free")
}

/// Replaces the node's endpoints and tells its peers.
pub async fn set_endpoints(tx: &mut Tx, id: NodeId, endpoints: Vec<std::net::SocketAddr>) -> Result<()> {
    let node = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    tailnet(tx, node.tailnet_id).await?;
    // Again under the tailnet's lock, which every writer of its nodes holds.
    let old = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    if old.endpoints == endpoints {
        return Ok(());
    }
    let mut node = old.clone();
    node.endpoints = endpoints;
    tx.put_node(&node, Some(&old)).await?;
    tx.netmap(node.tailnet_id, NetChange::PeerUpdated(Arc::new(node)));
    Ok(())
}

/// Removes a node at once if `only_if` holds for it; `None` when it does not.
#[allow(clippy::too_many_arguments)]
pub async fn remove_node(
    tx: &mut Tx,
    id: NodeId,
    end: EndReason,
    why: &str,
    reason: &str,
    actor: &Actor,
    only_if: impl FnOnce(&Node) -> bool,
    now: SystemTime,
) -> Result<Option<Node>> {
    let found = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    let mut t = tailnet(tx, found.tailnet_id).await?;
    let node = tx.node(id).await?.ok_or_else(|| Error::not_found("node", id))?;
    if !only_if(&node) {
        return Ok(None);
    }
    remove(tx, &mut t, &node, end, why, reason, actor, now).await?;
    tx.put_tailnet(&t).await?;
    Ok(Some(node))
}

/// Removes a node, records why, and tells its peers (and its own stream, which ends). The caller
/// stores `tailnet`, whose node count this lowers.
#[allow(clippy::too_many_arguments)]
async fn remove(
    tx: &mut Tx,
    tailnet: &mut Tailnet,
    node: &Node,
    end: EndReason,
    why: &str,
    reason: &str,
    actor: &Actor,
    now: SystemTime,
) -> Result<()> {
    tx.delete_node(node).await?;
    tailnet.node_count = tailnet.node_count.saturating_sub(1);
    record(
        tx,
        Draft {
            kind: EventKind::NodeLeft,
            tailnet: Some(node.tailnet_id),
            node: Some(node.id),
            auth_key: node.auth_key_id,
            actor,
            reason,
            summary: format!("node {} ({}) removed: {why}", node.hostname, node.address),
            run: node.identity.as_ref(),
            user: node.user.as_ref(),
            ..Draft::at(now)
        },
    );
    let message = if reason.is_empty() { why.to_string() } else { format!("{why}: {reason}") };
    tx.netmap(node.tailnet_id, NetChange::PeerRemoved { node: node.id, reason: end, message });
    Ok(())
}

// -----------------------------------------------------------------------------------------------------
// Gateways

/// Writes the gateway's node (at the reserved address) and its key; returns its id.
async fn put_gateway(tx: &mut Tx, tailnet: &Tailnet, keys: &GatewayKeys, now: SystemTime) -> Result<NodeId> {
    let node = Node {
        id: NodeId::generate(),
        tailnet_id: tailnet.id,
        hostname: crate::model::GATEWAY_HOSTNAME.into(),
        wireguard_public_key: keys.public,
        address: tailnet.cidr.gateway(),
        tags: vec![crate::model::GATEWAY_TAG.into()],
        owner: tailnet.owner.clone(),
        auth_key_id: None,
        ephemeral: false,
        created_at: now,
        // It lives as long as its tailnet.
        expires_at: now + Duration::from_secs(100 * 365 * 86_400),
        session_hash: [0; 32],
        endpoints: vec![],
        trust_rule_id: None,
        identity: None,
        gateway: true,
        user: None,
    };
    tx.put_node(&node, None).await?;
    tx.put_gateway(tailnet.id, node.id, &keys.secret).await?;
    let id = node.id;
    tx.netmap(tailnet.id, NetChange::PeerAdded(Arc::new(node)));
    Ok(id)
}

/// The gateway of `tailnet`: its node id and private key. Adds one (with `keys`) to a tailnet made
/// before gateways existed.
pub async fn ensure_gateway(tx: &mut Tx, tailnet_id: TailnetId, keys: GatewayKeys) -> Result<(NodeId, [u8; 32])> {
    let t = tailnet(tx, tailnet_id).await?;
    if let Some(found) = tx.gateway(tailnet_id).await? {
        return Ok(found);
    }
    let id = put_gateway(tx, &t, &keys, SystemTime::now()).await?;
    Ok((id, keys.secret))
}

// -----------------------------------------------------------------------------------------------------
// Upstreams

/// Adds or replaces an upstream of the tailnet's gateway; the key is stored apart from the tailnet
/// record and only the gateway reads it.
pub async fn set_upstream(
    tx: &mut Tx,
    tailnet_id: TailnetId,
    spec: UpstreamSpec,
    actor: &Actor,
    now: SystemTime,
) -> Result<UpstreamInfo> {
    let mut t = tailnet(tx, tailnet_id).await?;
    let info =
        UpstreamInfo { name: spec.name.clone(), kind: spec.kind, base_url: spec.base_url.clone(), updated_at: now };
    let replaced = t.upstreams.iter().any(|u| u.name == info.name);
    t.upstreams.retain(|u| u.name != info.name);
    if t.upstreams.len() >= 16 {
        return Err(Error::invalid("name", "a tailnet has at most 16 upstreams"));
    }
    t.upstreams.push(info.clone());
    tx.put_tailnet(&t).await?;
    tx.put_upstream_key(tailnet_id, &spec.name, &spec.api_key).await?;
    record(
        tx,
        Draft {
            kind: EventKind::UpstreamSet,
            tailnet: Some(tailnet_id),
            actor,
            summary: format!(
                "upstream {} {} ({}, {}); API key set",
                info.name,
                if replaced { "replaced" } else { "added" },
                info.kind,
                info.base_url
            ),
            ..Draft::at(now)
        },
    );
    Ok(info)
}

// -----------------------------------------------------------------------------------------------------
// Trust rules

pub async fn create_trust_rule(tx: &mut Tx, rule: TrustRule, actor: &Actor) -> Result<TrustRule> {
    tailnet(tx, rule.spec.tailnet_id).await?;
    tx.put_trust_rule(&rule).await?;
    let conditions: Vec<String> = rule.spec.conditions.iter().map(|(k, v)| format!("{k}={v}")).collect();
    record(
        tx,
        Draft {
            kind: EventKind::TrustRuleCreated,
            tailnet: Some(rule.spec.tailnet_id),
            actor,
            reason: &rule.spec.reason,
            summary: format!(
                "trust rule for {} (aud {}) where [{}] grants [{}]",
                rule.spec.issuer,
                rule.spec.audience,
                conditions.join(", "),
                rule.spec.tags.join(", ")
            ),
            ..Draft::at(rule.created_at)
        },
    );
    Ok(rule)
}

pub async fn delete_trust_rule(tx: &mut Tx, id: TrustRuleId, actor: &Actor, now: SystemTime) -> Result<()> {
    let rule = tx.trust_rule(id).await?.ok_or_else(|| Error::not_found("trust rule", id))?;
    tx.delete_trust_rule(&rule).await?;
    record(
        tx,
        Draft {
            kind: EventKind::TrustRuleDeleted,
            tailnet: Some(rule.spec.tailnet_id),
            actor,
            summary: format!("trust rule for {} deleted", rule.spec.issuer),
            ..Draft::at(now)
        },
    );
    Ok(())
}

// -----------------------------------------------------------------------------------------------------
// Admin tokens

/// Makes an admin token. A scoped caller makes tokens of its own scope only; names are unique among
/// live tokens (events and `tagOwners` name tokens by name).
pub async fn create_admin_token(
    tx: &mut Tx,
    spec: AdminTokenSpec,
    secret_hash: SecretHash,
    by: &Principal,
    now: SystemTime,
) -> Result<AdminToken> {
    if let Some(scope) = &by.scope
        && spec.owner_scope.as_ref() != Some(scope)
    {
        return Err(Error::PermissionDenied(format!(
            "owner_scope: a token scoped to {} makes tokens of that scope only",
            crate::validate::quote(scope)
        )));
    }
    if tx.admin_tokens().await?.iter().any(|t| t.live(now) && t.name == spec.name) {
        return Err(Error::invalid(
            "name",
            format!("a live token is named {}; revoke it or choose another name", crate::validate::quote(&spec.name)),
        ));
    }
    let token = AdminToken {
        id: AdminTokenId::generate(),
        name: spec.name,
        role: spec.role,
        owner_scope: spec.owner_scope,
        secret_hash,
        created_by: by.actor.0.clone(),
        reason: spec.reason,
        created_at: now,
        expires_at: (spec.expires_in_seconds > 0).then(|| now + Duration::from_secs(spec.expires_in_seconds)),
        revoked_at: None,
    };
    tx.put_admin_token(&token).await?;
    record(
        tx,
        Draft {
            kind: EventKind::AdminTokenCreated,
            actor: &by.actor,
            reason: &token.reason,
            summary: format!(
                "admin token {} created: role {}, {}",
                token.name,
                token.role.name(),
                token.owner_scope.as_deref().map_or("every owner".to_string(), |s| format!("owner {s}"))
            ),
            ..Draft::at(now)
        },
    );
    Ok(token)
}

/// Stores an admin trust rule. As with tokens, a scoped caller makes rules of its own scope only, and
/// names are unique.
pub async fn create_admin_trust_rule(tx: &mut Tx, rule: AdminTrustRule, by: &Principal) -> Result<AdminTrustRule> {
    if let Some(scope) = &by.scope
        && rule.owner_scope.as_ref() != Some(scope)
    {
        return Err(Error::PermissionDenied(format!(
            "owner_scope: a credential scoped to {} makes rules of that scope only",
            crate::validate::quote(scope)
        )));
    }
    if tx.admin_trust_rules().await?.iter().any(|r| r.name == rule.name) {
        return Err(Error::invalid(
            "name",
            format!("an admin trust rule is named {} already", crate::validate::quote(&rule.name)),
        ));
    }
    tx.put_admin_trust_rule(&rule).await?;
    let conditions: Vec<String> = rule.conditions.iter().map(|(k, v)| format!("{k}={v}")).collect();
    record(
        tx,
        Draft {
            kind: EventKind::AdminTrustRuleCreated,
            actor: &by.actor,
            reason: &rule.reason,
            summary: format!(
                "admin trust rule {} for {} (aud {}) where [{}]: role {}, {}",
                rule.name,
                rule.issuer,
                rule.audience,
                conditions.join(", "),
                rule.role.name(),
                rule.owner_scope.as_deref().map_or("every owner".to_string(), |s| format!("owner {s}"))
            ),
            ..Draft::at(rule.created_at)
        },
    );
    Ok(rule)
}

/// The admin trust rules a caller may see.
pub async fn admin_trust_rules(tx: &mut Tx, by: &Principal) -> Result<Vec<AdminTrustRule>> {
    let mut rules = tx.admin_trust_rules().await?;
    rules.retain(|r| by.scope.is_none() || r.owner_scope == by.scope);
    Ok(rules)
}

pub async fn delete_admin_trust_rule(
    tx: &mut Tx,
    id: AdminTrustRuleId,
    by: &Principal,
    now: SystemTime,
) -> Result<AdminTrustRule> {
    let rule = admin_trust_rules(tx, by)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| Error::not_found("admin trust rule", id))?;
    tx.delete_admin_trust_rule(id).await?;
    record(
        tx,
        Draft {
            kind: EventKind::AdminTrustRuleDeleted,
            actor: &by.actor,
            summary: format!("admin trust rule {} deleted", rule.name),
            ..Draft::at(now)
        },
    );
    Ok(rule)
}

/// Stores a webhook whose cursor starts at `after` (it delivers events from then on).
pub async fn create_webhook(tx: &mut Tx, hook: Webhook, actor: &Actor) -> Result<Webhook> {
    if let Some(t) = hook.tailnet_id {
        tailnet(tx, t).await?;
    }
    tx.put_webhook(&hook).await?;
    let events = if hook.events.is_empty() {
        "every event".to_string()
    } else {
        hook.events.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    };
    record(
        tx,
        Draft {
            kind: EventKind::WebhookCreated,
            tailnet: hook.tailnet_id,
            actor,
            reason: &hook.reason,
            summary: format!("webhook to {} for {events}", hook.url),
            ..Draft::at(hook.created_at)
        },
    );
    Ok(hook)
}

pub async fn delete_webhook(tx: &mut Tx, hook: &Webhook, actor: &Actor, now: SystemTime) -> Result<()> {
    tx.delete_webhook(hook.id).await?;
    record(
        tx,
        Draft {
            kind: EventKind::WebhookDeleted,
            tailnet: hook.tailnet_id,
            actor,
            summary: format!("webhook to {} deleted", hook.url),
            ..Draft::at(now)
        },
    );
    Ok(())
}

/// Moves a webhook's cursor past `revision`, with the delivery of that event if it was one it chose.
pub async fn record_delivery(tx: &mut Tx, id: WebhookId, revision: u64, delivery: Option<Delivery>) -> Result<()> {
    let mut hook =
        tx.webhooks().await?.into_iter().find(|w| w.id == id).ok_or_else(|| Error::not_found("webhook", id))?;
    hook.delivered_revision = hook.delivered_revision.max(revision);
    tx.put_webhook(&hook).await?;
    if let Some(d) = delivery {
        tx.put_delivery(&d).await?;
    }
    Ok(())
}

/// The tokens a caller may see: all of them, or those of its own scope.
pub async fn admin_tokens(tx: &mut Tx, by: &Principal) -> Result<Vec<AdminToken>> {
    let mut tokens = tx.admin_tokens().await?;
    tokens.retain(|t| by.scope.is_none() || t.owner_scope == by.scope);
    Ok(tokens)
}

/// Revokes a token at once; revoking one already revoked changes nothing.
pub async fn revoke_admin_token(
    tx: &mut Tx,
    id: AdminTokenId,
    reason: &str,
    by: &Principal,
    now: SystemTime,
) -> Result<AdminToken> {
    let mut token = admin_tokens(tx, by)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Error::not_found("admin token", id))?;
    if token.revoked_at.is_some() {
        return Ok(token);
    }
    token.revoked_at = Some(now);
    tx.put_admin_token(&token).await?;
    record(
        tx,
        Draft {
            kind: EventKind::AdminTokenRevoked,
            actor: &by.actor,
            reason,
            summary: format!("admin token {} revoked", token.name),
            ..Draft::at(now)
        },
    );
    Ok(token)
}

// -----------------------------------------------------------------------------------------------------
// Audit

/// Records gateway requests, one audit event each.
pub fn record_gateway_requests(tx: &mut Tx, requests: Vec<GatewayEvent>) {
    let actor = Actor::system("gateway");
    for r in requests {
        let g = &r.request;
        let summary = format!(
            "{} {} {} {} -> {} ({} in / {} out tokens){}",
            g.hostname,
            g.api,
            g.model,
            g.decision,
            g.status,
            g.input_tokens,
            g.output_tokens,
            if g.rule.is_empty() { String::new() } else { format!(", rule {}", g.rule) }
        );
        let blocked = g.decision == crate::model::Decision::Blocked;
        let kind = if blocked { EventKind::GatewayBlocked } else { EventKind::GatewayRequest };
        record(
            tx,
            Draft {
                kind,
                tailnet: Some(r.tailnet),
                node: r.node,
                actor: &actor,
                summary,
                run: r.run.as_ref(),
                user: r.user.as_ref(),
                gateway: Some(Box::new(r.request)),
                ..Draft::at(r.time)
            },
        );
    }
}

// -----------------------------------------------------------------------------------------------------
// Moving an installation

/// Copies every record of `source` into `target`, which must be empty, in one transaction; revisions
/// and ids stay as they were, so nodes keep their addresses and sessions and event streams resume.
/// Returns what the target then holds. The server must be stopped.
pub async fn copy_store(source: &crate::store::Store, target: &crate::store::Store) -> Result<crate::store::Counts> {
    let before = target.counts().await?;
    if !before.is_empty() {
        return Err(Error::invalid(
            "to",
            format!(
                "the target store is not empty ({}); copy only into a new store",
                before
                    .rows()
                    .iter()
                    .filter(|r| r.1 > 0)
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let mut from = source.read().await?;
    let mut to = target.write().await?;
    for token in from.admin_tokens().await? {
        to.put_admin_token(&token).await?;
    }
    for rule in from.admin_trust_rules().await? {
        to.put_admin_trust_rule(&rule).await?;
    }
    for hook in from.webhooks().await? {
        to.put_webhook(&hook).await?;
    }
    let mut after = None;
    loop {
        let page = from.tailnets(None, after, 256).await?;
        for t in &page {
            to.put_tailnet(t).await?;
            for node in from.nodes_of(t.id).await? {
                to.put_node(&node, None).await?;
            }
            if let Some((node, secret)) = from.gateway(t.id).await? {
                to.put_gateway(t.id, node, &secret).await?;
            }
            for key in from.auth_keys_of(t.id).await? {
                to.put_auth_key(&key).await?;
            }
            for rule in from.trust_rules_of(t.id).await? {
                to.put_trust_rule(&rule).await?;
            }
            for policy in from.policies_of(t.id).await? {
                to.put_policy(&policy).await?;
            }
            for proposal in from.proposals_of(t.id).await? {
                to.put_proposal(&proposal).await?;
            }
            for (name, key) in from.upstream_keys_of(t.id).await? {
                to.put_upstream_key(t.id, &name, &key).await?;
            }
        }
        after = page.last().map(|t| t.id);
        if page.len() < 256 {
            break;
        }
    }
    for provider in from.login_providers().await? {
        to.put_login_provider(&provider).await?;
    }
    for user in from.users().await? {
        to.put_user(&user).await?;
    }
    let mut filter = crate::store::EventFilter { limit: 1000, ..Default::default() };
    loop {
        let (events, more) = from.events(&filter).await?;
        to.put_events(&events).await?;
        if let Some(last) = events.last() {
            filter.after_revision = last.revision;
        }
        if !more {
            break;
        }
    }
    to.set_revision(source.revision()).await?;
    to.commit().await?;
    target.counts().await
}
