//! The store: every record in one sled tree, written in atomic batches by one writer at a time, flushed
//! to disk before a write is acknowledged, and published to watchers in revision order once durable.
//!
//! Keys are a short prefix and fixed-width binary ids, so a prefix scan lists one tailnet's nodes, keys or
//! addresses in order. Every change takes the next revision; the revision is stored in the same batch.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::hub::{Change, Hub, NetChange, NetMapUpdate};
use crate::model::{
    Actor, AuthKey, AuthKeyId, AuthKeySpec, Credential, EndReason, Event, EventKind, KeyState, Node, NodeId,
    PolicyRecord, Registration, RunIdentity, SecretHash, Tailnet, TailnetId, TailnetSpec, TrustRule, TrustRuleId,
    UpstreamInfo, UpstreamSpec,
};
use crate::validate::LabelRequirement;

/// The layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

mod key {
    use super::*;

    pub const SCHEMA: &[u8] = b"m/schema";
    pub const REVISION: &[u8] = b"m/revision";

    fn join(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut k = prefix.to_vec();
        for p in parts {
            k.extend_from_slice(p);
        }
        k
    }

    pub const TAILNETS: &[u8] = b"t/";
    pub fn tailnet(id: TailnetId) -> Vec<u8> {
        join(TAILNETS, &[id.as_bytes()])
    }
    pub fn node(id: NodeId) -> Vec<u8> {
        join(b"n/", &[id.as_bytes()])
    }
    pub fn tailnet_nodes(t: TailnetId) -> Vec<u8> {
        join(b"tn/", &[t.as_bytes()])
    }
    pub fn tailnet_node(t: TailnetId, n: NodeId) -> Vec<u8> {
        join(b"tn/", &[t.as_bytes(), n.as_bytes()])
    }
    pub fn addresses(t: TailnetId) -> Vec<u8> {
        join(b"a/", &[t.as_bytes()])
    }
    pub fn address(t: TailnetId, a: Ipv4Addr) -> Vec<u8> {
        join(b"a/", &[t.as_bytes(), &a.octets()])
    }
    pub fn hostname(t: TailnetId, h: &str) -> Vec<u8> {
        join(b"h/", &[t.as_bytes(), h.as_bytes()])
    }
    pub fn wireguard_key(t: TailnetId, k: &[u8; 32]) -> Vec<u8> {
        join(b"w/", &[t.as_bytes(), k])
    }
    pub fn session(h: &SecretHash) -> Vec<u8> {
        join(b"s/", &[h])
    }
    pub fn auth_key(id: AuthKeyId) -> Vec<u8> {
        join(b"k/", &[id.as_bytes()])
    }
    pub fn auth_key_secret(h: &SecretHash) -> Vec<u8> {
        join(b"ks/", &[h])
    }
    pub fn tailnet_keys(t: TailnetId) -> Vec<u8> {
        join(b"tk/", &[t.as_bytes()])
    }
    pub fn tailnet_key(t: TailnetId, k: AuthKeyId) -> Vec<u8> {
        join(b"tk/", &[t.as_bytes(), k.as_bytes()])
    }
    pub fn upstream_keys(t: TailnetId) -> Vec<u8> {
        join(b"uk/", &[t.as_bytes()])
    }
    pub fn upstream_key(t: TailnetId, name: &str) -> Vec<u8> {
        join(b"uk/", &[t.as_bytes(), name.as_bytes()])
    }
    /// The gateway's node id and WireGuard private key (write-only, like upstream keys).
    pub fn gateway(t: TailnetId) -> Vec<u8> {
        join(b"g/", &[t.as_bytes()])
    }
    pub const TRUST_RULES: &[u8] = b"r/";
    pub fn trust_rule(id: TrustRuleId) -> Vec<u8> {
        join(TRUST_RULES, &[id.as_bytes()])
    }
    pub fn tailnet_rules(t: TailnetId) -> Vec<u8> {
        join(b"tr/", &[t.as_bytes()])
    }
    pub fn tailnet_rule(t: TailnetId, r: TrustRuleId) -> Vec<u8> {
        join(b"tr/", &[t.as_bytes(), r.as_bytes()])
    }
    pub fn policies(t: TailnetId) -> Vec<u8> {
        join(b"p/", &[t.as_bytes()])
    }
    pub fn policy(t: TailnetId, version: u64) -> Vec<u8> {
        join(b"p/", &[t.as_bytes(), &version.to_be_bytes()])
    }
    pub const EVENTS: &[u8] = b"e/";
    pub fn event(rev: u64) -> Vec<u8> {
        join(EVENTS, &[&rev.to_be_bytes()])
    }
    pub fn tailnet_events(t: TailnetId) -> Vec<u8> {
        join(b"te/", &[t.as_bytes()])
    }
    pub fn tailnet_event(t: TailnetId, rev: u64) -> Vec<u8> {
        join(b"te/", &[t.as_bytes(), &rev.to_be_bytes()])
    }
    pub fn node_events(n: NodeId) -> Vec<u8> {
        join(b"ne/", &[n.as_bytes()])
    }
    pub fn node_event(n: NodeId, rev: u64) -> Vec<u8> {
        join(b"ne/", &[n.as_bytes(), &rev.to_be_bytes()])
    }

    /// The id in the last 16 bytes of an index key.
    pub fn trailing_uuid(k: &[u8]) -> uuid::Uuid {
        let b: [u8; 16] = k[k.len() - 16..].try_into().expect("index keys end with a 16-byte id");
        uuid::Uuid::from_bytes(b)
    }

    /// The revision in the last 8 bytes of an event key.
    pub fn trailing_revision(k: &[u8]) -> u64 {
        u64::from_be_bytes(k[k.len() - 8..].try_into().expect("event keys end with a revision"))
    }
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Corrupt { key: String::from_utf8_lossy(key).into_owned(), detail: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// A gateway request to record.
#[derive(Debug)]
pub struct GatewayEvent {
    pub tailnet: TailnetId,
    pub node: Option<NodeId>,
    pub run: Option<RunIdentity>,
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

/// What one tailnet deletion removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub nodes: Vec<NodeId>,
    pub keys: u32,
}

struct Writer {
    revision: u64,
    /// Per tailnet, an address below which every node address is taken.
    address_hints: HashMap<TailnetId, u32>,
}

/// The one handle the server uses for persistent state.
pub struct Store {
    db: sled::Db,
    writer: Mutex<Writer>,
    /// Applied changes not yet published, in revision order.
    pending: Arc<Mutex<VecDeque<Change>>>,
    hub: Arc<Hub>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, migrating it to [`SCHEMA_VERSION`].
    pub fn open(dir: &Path, cache_bytes: u64, hub: Arc<Hub>) -> Result<Store> {
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).open()?;
        migrate(&db)?;
        let revision = match db.get(key::REVISION)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::Corrupt { key: "m/revision".into(), detail: "not 8 bytes".into() })?,
            ),
            None => 0,
        };
        hub.set_published(revision);
        Ok(Store {
            db,
            writer: Mutex::new(Writer { revision, address_hints: HashMap::new() }),
            pending: Arc::default(),
            hub,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Runs `f` as the only writer; applies what it wrote as one atomic batch. Returns the revision
    /// the store is at afterwards. Nothing is durable or visible to watchers until [`Store::commit`].
    fn write<T>(&self, f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>) -> Result<(T, u64)> {
        let mut writer = self.writer.lock().unwrap();
        let writer = &mut *writer;
        let mut ctx = WriteCtx {
            db: &self.db,
            batch: sled::Batch::default(),
            revision: writer.revision,
            changes: vec![],
            address_hints: &mut writer.address_hints,
        };
        let out = f(&mut ctx)?;
        let WriteCtx { mut batch, revision, changes, .. } = ctx;
        batch.insert(key::REVISION, &revision.to_be_bytes());
        self.db.apply_batch(batch)?;
        writer.revision = revision;
        self.pending.lock().unwrap().extend(changes);
        Ok((out, revision))
    }

    /// Makes everything up to `revision` durable, then publishes it in order.
    async fn commit(&self, revision: u64) -> Result<()> {
        let (db, pending, hub) = (self.db.clone(), self.pending.clone(), self.hub.clone());
        // A task of its own, so that a caller who gives up (a cancelled RPC) cannot leave an applied change
        // unpublished; spawn_blocking rather than sled's flush_async so paused-time tests do not skip ahead.
        let publish = tokio::spawn(async move {
            tokio::task::spawn_blocking(move || db.flush())
                .await
                .map_err(|e| Error::Unavailable(format!("flush task failed: {e}")))??;
            let mut pending = pending.lock().unwrap();
            while pending.front().is_some_and(|c| c.revision() <= revision) {
                hub.publish(pending.pop_front().expect("front exists"));
            }
            Ok::<(), Error>(())
        });
        publish.await.map_err(|e| Error::Unavailable(format!("commit task failed: {e}")))?
    }

    /// Makes every applied write durable.
    pub async fn flush(&self) -> Result<()> {
        let revision = self.revision();
        self.commit(revision).await
    }

    async fn write_durable<T>(&self, f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>) -> Result<T> {
        let (out, revision) = self.write(f)?;
        self.commit(revision).await?;
        Ok(out)
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        self.db.get(k)?.map(|v| decode(k, &v)).transpose()
    }

    // -------------------------------------------------------------------------------------------------
    // Tailnets

    /// Creates a tailnet with its gateway node (private key `gateway_secret`, public `gateway_public`).
    pub async fn create_tailnet(
        &self,
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
            node_count: 0,
            policy_version: u64::from(spec.policy.is_some()),
            upstreams: spec
                .upstreams
                .iter()
                .map(|u| UpstreamInfo {
                    name: u.name.clone(),
                    kind: u.kind.clone(),
                    base_url: u.base_url.clone(),
                    updated_at: now,
                })
                .collect(),
        };
        self.write_durable(|w| {
            w.put_gateway(&tailnet, &gateway, now);
            w.put(&key::tailnet(tailnet.id), &tailnet);
            for u in &spec.upstreams {
                w.put_raw(&key::upstream_key(tailnet.id, &u.name), u.api_key.expose().as_bytes());
            }
            if let Some((text, policy)) = &spec.policy {
                let record = PolicyRecord {
                    tailnet_id: tailnet.id,
                    version: 1,
                    text: text.clone(),
                    author: actor.0.clone(),
                    reason: "set at creation".into(),
                    created_at: now,
                    summary: policy.diff_summary(&crate::policy::Policy::allow_all()),
                };
                w.put(&key::policy(tailnet.id, 1), &record);
            }
            w.event(EventDraft {
                kind: EventKind::TailnetCreated,
                tailnet: Some(tailnet.id),
                actor,
                summary: format!("tailnet {} ({}) created for {}", tailnet.name, tailnet.cidr, tailnet.owner),
                ..EventDraft::at(now)
            });
            Ok(())
        })
        .await?;
        Ok(tailnet)
    }

    pub fn get_tailnet(&self, id: TailnetId) -> Result<Tailnet> {
        self.get(&key::tailnet(id))?.ok_or_else(|| Error::not_found("tailnet", id))
    }

    /// Tailnets in creation order after `after`, filtered; returns the page and whether more follow.
    pub fn list_tailnets(
        &self,
        owner: Option<&str>,
        selector: &[LabelRequirement],
        after: Option<TailnetId>,
        limit: usize,
    ) -> Result<(Vec<Tailnet>, bool)> {
        let start = after.map_or_else(
            || key::TAILNETS.to_vec(),
            |id| {
                let mut k = key::tailnet(id);
                k.push(0);
                k
            },
        );
        let mut out = Vec::new();
        for item in self.db.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(key::TAILNETS) {
                break;
            }
            let t: Tailnet = decode(&k, &v)?;
            if owner.is_some_and(|o| o != t.owner) || !selector.iter().all(|r| r.matches(&t.labels)) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(t);
        }
        Ok((out, false))
    }

    /// Deletes a tailnet with its nodes and keys; the audit log stays. `expired` picks the event kind.
    pub async fn delete_tailnet(
        &self,
        id: TailnetId,
        reason: &str,
        actor: &Actor,
        expired: bool,
        now: SystemTime,
    ) -> Result<Removed> {
        self.write_durable(|w| {
            let tailnet: Tailnet = w.get(&key::tailnet(id))?.ok_or_else(|| Error::not_found("tailnet", id))?;
            if expired && tailnet.expires_at.is_none_or(|at| at > now) {
                return Ok(Removed::default());
            }
            let (kind, end, what) = if expired {
                (EventKind::TailnetExpired, EndReason::TailnetExpired, "expired")
            } else {
                (EventKind::TailnetDeleted, EndReason::TailnetDeleted, "deleted")
            };
            let mut removed = Removed::default();
            for node in w.tailnet_nodes(id)? {
                w.remove_node_records(&node);
                if node.gateway {
                    continue;
                }
                w.event(EventDraft {
                    kind: EventKind::NodeLeft,
                    tailnet: Some(id),
                    node: Some(node.id),
                    actor,
                    reason,
                    summary: format!("node {} removed: tailnet {what}", node.hostname),
                    run: node.identity.as_ref(),
                    ..EventDraft::at(now)
                });
                removed.nodes.push(node.id);
            }
            for item in w.db.scan_prefix(key::tailnet_keys(id)) {
                let (k, _) = item?;
                let key_id = AuthKeyId(key::trailing_uuid(&k));
                if let Some(auth_key) = w.get::<AuthKey>(&key::auth_key(key_id))? {
                    w.del(&key::auth_key_secret(&auth_key.secret_hash));
                }
                w.del(&key::auth_key(key_id));
                w.del(&k);
                removed.keys += 1;
            }
            for item in w.db.scan_prefix(key::policies(id)) {
                let (k, _) = item?;
                w.del(&k);
            }
            for item in w.db.scan_prefix(key::upstream_keys(id)) {
                let (k, _) = item?;
                w.del(&k);
            }
            w.del(&key::gateway(id));
            for item in w.db.scan_prefix(key::tailnet_rules(id)) {
                let (k, _) = item?;
                w.del(&key::trust_rule(TrustRuleId(key::trailing_uuid(&k))));
                w.del(&k);
            }
            w.del(&key::tailnet(id));
            w.address_hints.remove(&id);
            w.event(EventDraft {
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
                ..EventDraft::at(now)
            });
            let message =
                if reason.is_empty() { format!("tailnet {what}") } else { format!("tailnet {what}: {reason}") };
            w.netmap(id, NetChange::TailnetGone { reason: end, message });
            Ok(removed)
        })
        .await
    }

    // -------------------------------------------------------------------------------------------------
    // Policy

    /// Stores `policy` as the tailnet's next version; strips tags the policy no longer declares from the
    /// nodes that carry them; tells every watcher.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_policy(
        &self,
        tailnet_id: TailnetId,
        text: String,
        policy: Arc<crate::policy::Policy>,
        previous: &crate::policy::Policy,
        author: String,
        reason: String,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<PolicyRecord> {
        self.write_durable(|w| {
            let mut tailnet: Tailnet =
                w.get(&key::tailnet(tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
            tailnet.policy_version += 1;
            let record = PolicyRecord {
                tailnet_id,
                version: tailnet.policy_version,
                text,
                author,
                reason,
                created_at: now,
                summary: policy.diff_summary(previous),
            };
            w.put(&key::policy(tailnet_id, record.version), &record);
            w.put(&key::tailnet(tailnet_id), &tailnet);
            let mut updated = Vec::new();
            for mut node in w.tailnet_nodes(tailnet_id)? {
                let before = node.tags.len();
                node.tags.retain(|t| policy.tag_defined(t));
                if node.tags.len() != before {
                    w.put(&key::node(node.id), &node);
                    updated.push(Arc::new(node));
                }
            }
            let stripped =
                if updated.is_empty() { String::new() } else { format!("; tags removed from {} nodes", updated.len()) };
            w.event(EventDraft {
                kind: EventKind::PolicyChanged,
                tailnet: Some(tailnet_id),
                actor,
                reason: &record.reason,
                summary: format!("policy v{} by {}: {}{stripped}", record.version, record.author, record.summary),
                ..EventDraft::at(now)
            });
            w.netmap(tailnet_id, NetChange::PolicyChanged { policy, updated });
            Ok(record)
        })
        .await
    }

    /// A version of the tailnet's policy; 0 = the current one. `None` while it runs the default policy.
    pub fn get_policy(&self, tailnet_id: TailnetId, version: u64) -> Result<Option<PolicyRecord>> {
        let tailnet = self.get_tailnet(tailnet_id)?;
        let version = if version == 0 { tailnet.policy_version } else { version };
        if version == 0 {
            return Ok(None);
        }
        self.get(&key::policy(tailnet_id, version))?
            .map(Some)
            .ok_or_else(|| Error::not_found("policy version", format!("{version} of tailnet {tailnet_id}")))
    }

    // -------------------------------------------------------------------------------------------------
    // Auth keys

    pub async fn create_auth_key(
        &self,
        spec: AuthKeySpec,
        secret_hash: SecretHash,
        expires_at: SystemTime,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<AuthKey> {
        self.write_durable(|w| {
            let tailnet: Tailnet =
                w.get(&key::tailnet(spec.tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", spec.tailnet_id))?;
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
            w.put(&key::auth_key(auth_key.id), &auth_key);
            w.put_raw(&key::auth_key_secret(&secret_hash), auth_key.id.as_bytes());
            w.put_raw(&key::tailnet_key(tailnet.id, auth_key.id), &[]);
            let uses = match auth_key.max_uses {
                0 => "unlimited uses".to_string(),
                1 => "single-use".to_string(),
                n => format!("{n} uses"),
            };
            w.event(EventDraft {
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
                ..EventDraft::at(now)
            });
            Ok(auth_key)
        })
        .await
    }

    pub fn list_auth_keys(&self, tailnet: TailnetId) -> Result<Vec<AuthKey>> {
        self.get_tailnet(tailnet)?;
        let mut out = Vec::new();
        for item in self.db.scan_prefix(key::tailnet_keys(tailnet)) {
            let (k, _) = item?;
            if let Some(auth_key) = self.get(&key::auth_key(AuthKeyId(key::trailing_uuid(&k))))? {
                out.push(auth_key);
            }
        }
        Ok(out)
    }

    /// Revokes a key and, unless `keep_nodes`, the nodes it admitted; returns those nodes.
    pub async fn revoke_auth_key(
        &self,
        id: AuthKeyId,
        reason: &str,
        keep_nodes: bool,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<Vec<NodeId>> {
        self.write_durable(|w| {
            let mut auth_key: AuthKey = w.get(&key::auth_key(id))?.ok_or_else(|| Error::not_found("auth key", id))?;
            if auth_key.revoked_at.is_none() {
                auth_key.revoked_at = Some(now);
                w.put(&key::auth_key(id), &auth_key);
                w.event(EventDraft {
                    kind: EventKind::KeyRevoked,
                    tailnet: Some(auth_key.tailnet_id),
                    auth_key: Some(id),
                    actor,
                    reason,
                    summary: "auth key revoked".into(),
                    ..EventDraft::at(now)
                });
            }
            let mut revoked = Vec::new();
            if !keep_nodes {
                let mut tailnet: Tailnet = w
                    .get(&key::tailnet(auth_key.tailnet_id))?
                    .ok_or_else(|| Error::not_found("tailnet", auth_key.tailnet_id))?;
                for node in w.tailnet_nodes(auth_key.tailnet_id)? {
                    if node.auth_key_id == Some(id) {
                        w.remove_node(
                            &mut tailnet,
                            &node,
                            EndReason::KeyRevoked,
                            "its auth key was revoked",
                            reason,
                            actor,
                            now,
                        );
                        revoked.push(node.id);
                    }
                }
                w.put(&key::tailnet(tailnet.id), &tailnet);
            }
            Ok(revoked)
        })
        .await
    }

    // -------------------------------------------------------------------------------------------------
    // Nodes

    /// Admits a node with an auth key or a trust rule's verdict, or re-authenticates the node that
    /// already has this WireGuard key in the tailnet. Uses an auth key once.
    pub async fn register(
        &self,
        reg: Registration,
        session_hash: SecretHash,
        node_lifetime: Duration,
        policy_of: impl FnOnce(&Tailnet) -> Result<Arc<crate::policy::Policy>>,
        now: SystemTime,
    ) -> Result<(Node, Tailnet)> {
        self.write_durable(|w| {
            let admission = w.admit(&reg.credential, now)?;
            let mut tailnet: Tailnet = w
                .get(&key::tailnet(admission.tailnet))?
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
            // A tag the policy stopped declaring after the key or rule was made is not handed out.
            let policy = policy_of(&tailnet)?;
            let tags: Vec<String> = tags.into_iter().filter(|t| policy.tag_defined(t)).collect();
            let owner = admission.owner.clone().unwrap_or_else(|| tailnet.owner.clone());
            let expires_at = now + admission.lifetime.map_or(node_lifetime, |l| l.min(node_lifetime));
            let (auth_key_id, trust_rule_id, identity) = match &reg.credential {
                Credential::AuthKey(_) => (admission.auth_key, None, None),
                Credential::Federated { rule, identity } => (None, Some(*rule), Some(identity.clone())),
            };

            let existing = match w.db.get(key::wireguard_key(tailnet.id, &reg.wireguard_public_key))? {
                Some(id) => w.get::<Node>(&key::node(NodeId(key::trailing_uuid(&id))))?,
                None => None,
            };
            let (node, change, summary) = match existing {
                Some(mut node) => {
                    w.del(&key::session(&node.session_hash));
                    node.session_hash = session_hash;
                    node.tags = tags;
                    node.auth_key_id = auth_key_id;
                    node.trust_rule_id = trust_rule_id;
                    node.identity = identity;
                    node.ephemeral = admission.ephemeral;
                    node.owner = owner;
                    node.expires_at = expires_at;
                    node.endpoints = reg.endpoints.clone();
                    let summary = format!("node {} re-authenticated at {}", node.hostname, node.address);
                    (node.clone(), NetChange::PeerUpdated(Arc::new(node)), summary)
                }
                None => {
                    let node = Node {
                        id: NodeId::generate(),
                        tailnet_id: tailnet.id,
                        hostname: w.unique_hostname(tailnet.id, &reg.hostname)?,
                        wireguard_public_key: reg.wireguard_public_key,
                        address: w.free_address(&tailnet)?,
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
                    };
                    w.put_raw(&key::tailnet_node(tailnet.id, node.id), &[]);
                    w.put_raw(&key::address(tailnet.id, node.address), node.id.as_bytes());
                    w.put_raw(&key::hostname(tailnet.id, &node.hostname), node.id.as_bytes());
                    w.put_raw(&key::wireguard_key(tailnet.id, &node.wireguard_public_key), node.id.as_bytes());
                    tailnet.node_count += 1;
                    w.put(&key::tailnet(tailnet.id), &tailnet);
                    let summary = format!("node {} joined at {}", node.hostname, node.address);
                    (node.clone(), NetChange::PeerAdded(Arc::new(node)), summary)
                }
            };
            w.put(&key::node(node.id), &node);
            w.put_raw(&key::session(&session_hash), node.id.as_bytes());
            let summary = match &node.identity {
                Some(run) => format!("{summary} via trust rule ({} {})", run.issuer, run.subject),
                None => summary,
            };
            w.event(EventDraft {
                kind: EventKind::NodeJoined,
                tailnet: Some(tailnet.id),
                node: Some(node.id),
                auth_key: node.auth_key_id,
                actor: &Actor::node(node.id),
                summary,
                run: node.identity.as_ref(),
                ..EventDraft::at(now)
            });
            w.netmap(tailnet.id, change);
            Ok((node, tailnet))
        })
        .await
    }

    // -------------------------------------------------------------------------------------------------
    // Gateways

    /// The gateway of `tailnet`: its node id and private key. Adds one (with `keys`) to a tailnet made
    /// before gateways existed.
    pub async fn ensure_gateway(&self, tailnet_id: TailnetId, keys: GatewayKeys) -> Result<(NodeId, [u8; 32])> {
        if let Some(found) = self.gateway(tailnet_id)? {
            return Ok(found);
        }
        self.write_durable(|w| {
            let tailnet: Tailnet =
                w.get(&key::tailnet(tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
            if let Some(found) = ReadCtx(w.db).gateway(tailnet_id)? {
                return Ok(found);
            }
            let id = w.put_gateway(&tailnet, &keys, SystemTime::now());
            Ok((id, keys.secret))
        })
        .await
    }

    pub fn gateway(&self, tailnet: TailnetId) -> Result<Option<(NodeId, [u8; 32])>> {
        ReadCtx(&self.db).gateway(tailnet)
    }

    // -------------------------------------------------------------------------------------------------
    // Upstreams

    /// Adds or replaces an upstream of the tailnet's gateway; the key is stored apart from the tailnet
    /// record and only [`Store::upstream_api_key`] reads it.
    pub async fn set_upstream(
        &self,
        tailnet_id: TailnetId,
        spec: UpstreamSpec,
        actor: &Actor,
        now: SystemTime,
    ) -> Result<UpstreamInfo> {
        self.write_durable(|w| {
            let mut tailnet: Tailnet =
                w.get(&key::tailnet(tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", tailnet_id))?;
            let info = UpstreamInfo {
                name: spec.name.clone(),
                kind: spec.kind.clone(),
                base_url: spec.base_url.clone(),
                updated_at: now,
            };
            let replaced = tailnet.upstreams.iter().any(|u| u.name == info.name);
            tailnet.upstreams.retain(|u| u.name != info.name);
            if tailnet.upstreams.len() >= 16 {
                return Err(Error::invalid("name", "a tailnet has at most 16 upstreams"));
            }
            tailnet.upstreams.push(info.clone());
            w.put(&key::tailnet(tailnet_id), &tailnet);
            w.put_raw(&key::upstream_key(tailnet_id, &spec.name), spec.api_key.expose().as_bytes());
            w.event(EventDraft {
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
                ..EventDraft::at(now)
            });
            Ok(info)
        })
        .await
    }

    /// The API key of an upstream, for the gateway that calls it.
    pub fn upstream_api_key(&self, tailnet: TailnetId, name: &str) -> Result<Option<crate::secret::Secret>> {
        Ok(self
            .db
            .get(key::upstream_key(tailnet, name))?
            .map(|v| crate::secret::Secret::from_string(String::from_utf8_lossy(&v).into_owned())))
    }

    // -------------------------------------------------------------------------------------------------
    // Trust rules

    pub async fn create_trust_rule(&self, rule: TrustRule, actor: &Actor) -> Result<TrustRule> {
        self.write_durable(|w| {
            w.get::<Tailnet>(&key::tailnet(rule.spec.tailnet_id))?
                .ok_or_else(|| Error::not_found("tailnet", rule.spec.tailnet_id))?;
            w.put(&key::trust_rule(rule.id), &rule);
            w.put_raw(&key::tailnet_rule(rule.spec.tailnet_id, rule.id), &[]);
            let conditions: Vec<String> = rule.spec.conditions.iter().map(|(k, v)| format!("{k}={v}")).collect();
            w.event(EventDraft {
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
                ..EventDraft::at(rule.created_at)
            });
            Ok(rule)
        })
        .await
    }

    pub fn list_trust_rules(&self, tailnet: TailnetId) -> Result<Vec<TrustRule>> {
        self.get_tailnet(tailnet)?;
        let mut out = Vec::new();
        for item in self.db.scan_prefix(key::tailnet_rules(tailnet)) {
            let (k, _) = item?;
            if let Some(rule) = self.get(&key::trust_rule(TrustRuleId(key::trailing_uuid(&k))))? {
                out.push(rule);
            }
        }
        Ok(out)
    }

    /// Every rule trusting `issuer`, newest first.
    pub fn trust_rules_for(&self, issuer: &str) -> Result<Vec<TrustRule>> {
        let mut rules: Vec<TrustRule> = self
            .db
            .scan_prefix(key::TRUST_RULES)
            .map(|item| item.map_err(Error::from).and_then(|(k, v)| decode::<TrustRule>(&k, &v)))
            .filter(|r| r.as_ref().map_or(true, |r| r.spec.issuer == issuer))
            .collect::<Result<_>>()?;
        rules.sort_by_key(|r| std::cmp::Reverse(r.id));
        Ok(rules)
    }

    pub async fn delete_trust_rule(&self, id: TrustRuleId, actor: &Actor, now: SystemTime) -> Result<()> {
        self.write_durable(|w| {
            let rule: TrustRule = w.get(&key::trust_rule(id))?.ok_or_else(|| Error::not_found("trust rule", id))?;
            w.del(&key::trust_rule(id));
            w.del(&key::tailnet_rule(rule.spec.tailnet_id, id));
            w.event(EventDraft {
                kind: EventKind::TrustRuleDeleted,
                tailnet: Some(rule.spec.tailnet_id),
                actor,
                summary: format!("trust rule for {} deleted", rule.spec.issuer),
                ..EventDraft::at(now)
            });
            Ok(())
        })
        .await
    }

    /// Replaces the node's endpoints and tells its peers.
    pub async fn set_endpoints(&self, id: NodeId, endpoints: Vec<std::net::SocketAddr>) -> Result<()> {
        self.write_durable(|w| {
            let mut node: Node = w.get(&key::node(id))?.ok_or_else(|| Error::not_found("node", id))?;
            if node.endpoints == endpoints {
                return Ok(());
            }
            node.endpoints = endpoints;
            w.put(&key::node(id), &node);
            w.netmap(node.tailnet_id, NetChange::PeerUpdated(Arc::new(node)));
            Ok(())
        })
        .await
    }

    pub fn get_node(&self, id: NodeId) -> Result<Node> {
        self.get(&key::node(id))?.ok_or_else(|| Error::not_found("node", id))
    }

    pub fn node_by_session(&self, session_hash: &SecretHash) -> Result<Option<Node>> {
        match self.db.get(key::session(session_hash))? {
            Some(id) => self.get(&key::node(NodeId(key::trailing_uuid(&id)))),
            None => Ok(None),
        }
    }

    pub fn list_nodes(&self, tailnet: TailnetId) -> Result<Vec<Node>> {
        self.get_tailnet(tailnet)?;
        ReadCtx(&self.db).tailnet_nodes(tailnet)
    }

    /// Every node of every tailnet (for the reaper at start).
    pub fn all_nodes(&self) -> Result<Vec<Node>> {
        self.db.scan_prefix(b"n/").map(|item| item.map_err(Error::from).and_then(|(k, v)| decode(&k, &v))).collect()
    }

    /// Every tailnet (for the reaper at start).
    pub fn all_tailnets(&self) -> Result<Vec<Tailnet>> {
        self.db
            .scan_prefix(key::TAILNETS)
            .map(|item| item.map_err(Error::from).and_then(|(k, v)| decode(&k, &v)))
            .collect()
    }

    /// Removes a node at once, if `only_if` holds for it.
    #[allow(clippy::too_many_arguments)]
    pub async fn remove_node(
        &self,
        id: NodeId,
        end: EndReason,
        why: &str,
        reason: &str,
        actor: &Actor,
        only_if: impl FnOnce(&Node) -> bool,
        now: SystemTime,
    ) -> Result<Option<Node>> {
        self.write_durable(|w| {
            let node: Node = w.get(&key::node(id))?.ok_or_else(|| Error::not_found("node", id))?;
            if !only_if(&node) {
                return Ok(None);
            }
            let mut tailnet: Tailnet =
                w.get(&key::tailnet(node.tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", node.tailnet_id))?;
            w.remove_node(&mut tailnet, &node, end, why, reason, actor, now);
            w.put(&key::tailnet(tailnet.id), &tailnet);
            Ok(Some(node))
        })
        .await
    }

    /// What `node` is told at the current revision.
    pub fn snapshot(&self, node: NodeId) -> Result<Snapshot> {
        // Under the writer lock, so that the revision matches exactly what the scan saw.
        let writer = self.writer.lock().unwrap();
        let read = ReadCtx(&self.db);
        let node: Node = read.get(&key::node(node))?.ok_or_else(|| Error::not_found("node", node))?;
        let tailnet: Tailnet =
            read.get(&key::tailnet(node.tailnet_id))?.ok_or_else(|| Error::not_found("tailnet", node.tailnet_id))?;
        let peers = read.tailnet_nodes(tailnet.id)?.into_iter().filter(|p| p.id != node.id).collect();
        Ok(Snapshot { revision: writer.revision, node, tailnet, peers })
    }

    // -------------------------------------------------------------------------------------------------
    // Events

    /// Audit events in revision order, filtered.
    pub fn list_events(&self, filter: &EventFilter) -> Result<(Vec<Event>, bool)> {
        let prefix = match (filter.node, filter.tailnet) {
            (Some(n), _) => key::node_events(n),
            (None, Some(t)) => key::tailnet_events(t),
            (None, None) => key::EVENTS.to_vec(),
        };
        let Some(first) = filter.after_revision.checked_add(1) else { return Ok((vec![], false)) };
        // Only what is durable: an applied but unflushed event could vanish in a crash and its revision
        // be reused, and a client resuming from it would skip the replacement.
        let published = self.hub.published_revision();
        let mut start = prefix.clone();
        start.extend_from_slice(&first.to_be_bytes());
        let mut out = Vec::new();
        for item in self.db.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if key::trailing_revision(&k) > published {
                break;
            }
            let event: Event = if prefix == key::EVENTS {
                decode(&k, &v)?
            } else {
                match self.get(&key::event(key::trailing_revision(&k)))? {
                    Some(e) => e,
                    None => continue,
                }
            };
            if filter.tailnet.is_some() && event.tailnet_id != filter.tailnet {
                continue;
            }
            if filter.since.is_some_and(|s| event.time < s) {
                continue;
            }
            if filter.until.is_some_and(|u| event.time >= u) {
                // Revisions grow with time, so nothing later can match.
                break;
            }
            if out.len() == filter.limit {
                return Ok((out, true));
            }
            out.push(event);
        }
        Ok((out, false))
    }

    /// Appends gateway request events in one durable batch.
    pub async fn append_gateway_events(&self, records: Vec<GatewayEvent>) -> Result<()> {
        self.write_durable(|w| {
            for r in records {
                let actor = Actor::system("gateway");
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
                let kind = if g.decision == "blocked" { EventKind::GatewayBlocked } else { EventKind::GatewayRequest };
                w.event(EventDraft {
                    kind,
                    tailnet: Some(r.tailnet),
                    node: r.node,
                    actor: &actor,
                    summary,
                    run: r.run.as_ref(),
                    gateway: Some(Box::new(r.request)),
                    ..EventDraft::at(r.time)
                });
            }
            Ok(())
        })
        .await
    }

    /// Deletes audit events older than `before` (oldest first, at most `limit`); returns how many.
    pub async fn prune_events(&self, before: SystemTime, limit: usize) -> Result<usize> {
        let mut old = Vec::new();
        for item in self.db.scan_prefix(key::EVENTS) {
            let (k, v) = item?;
            let event: Event = decode(&k, &v)?;
            if event.time >= before || old.len() == limit {
                break;
            }
            old.push(event);
        }
        if old.is_empty() {
            return Ok(0);
        }
        let n = old.len();
        // No revision of its own: pruning changes nothing a watcher follows.
        let mut batch = sled::Batch::default();
        for e in old {
            batch.remove(key::event(e.revision));
            if let Some(t) = e.tailnet_id {
                batch.remove(key::tailnet_event(t, e.revision));
            }
            if let Some(node) = e.node_id {
                batch.remove(key::node_event(node, e.revision));
            }
        }
        self.db.apply_batch(batch)?;
        self.flush().await?;
        Ok(n)
    }

    /// The revision of the last applied change.
    pub fn revision(&self) -> u64 {
        self.writer.lock().unwrap().revision
    }
}

fn migrate(db: &sled::Db) -> Result<()> {
    let stored = match db.get(key::SCHEMA)? {
        Some(v) => u32::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| Error::Corrupt { key: "m/schema".into(), detail: "not 4 bytes".into() })?,
        ),
        None => 0,
    };
    if stored > SCHEMA_VERSION {
        return Err(Error::Corrupt {
            key: "m/schema".into(),
            detail: format!(
                "the data directory has schema version {stored}, newer than this build's {SCHEMA_VERSION}; \
                 run a newer cordon"
            ),
        });
    }
    let mut version = stored;
    while version < SCHEMA_VERSION {
        migrate_step(db, version)?;
        version += 1;
        db.insert(key::SCHEMA, &version.to_be_bytes())?;
    }
    db.flush()?;
    Ok(())
}

/// Upgrades the layout from `from` to `from + 1`.
fn migrate_step(_db: &sled::Db, from: u32) -> Result<()> {
    match from {
        // 0 -> 1: a new data directory; nothing to convert.
        0 => Ok(()),
        _ => unreachable!("no step from schema {from}"),
    }
}

/// Reads shared by the writer and by snapshot reads.
struct ReadCtx<'a>(&'a sled::Db);

impl ReadCtx<'_> {
    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        self.0.get(k)?.map(|v| decode(k, &v)).transpose()
    }

    fn gateway(&self, tailnet: TailnetId) -> Result<Option<(NodeId, [u8; 32])>> {
        let k = key::gateway(tailnet);
        let Some(v) = self.0.get(&k)? else { return Ok(None) };
        if v.len() != 48 {
            return Err(Error::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                detail: "not 48 bytes".into(),
            });
        }
        let id = NodeId(uuid::Uuid::from_bytes(v[..16].try_into().expect("16 bytes")));
        Ok(Some((id, v[16..].try_into().expect("32 bytes"))))
    }

    fn tailnet_nodes(&self, tailnet: TailnetId) -> Result<Vec<Node>> {
        let mut out = Vec::new();
        for item in self.0.scan_prefix(key::tailnet_nodes(tailnet)) {
            let (k, _) = item?;
            if let Some(node) = self.get(&key::node(NodeId(key::trailing_uuid(&k))))? {
                out.push(node);
            }
        }
        Ok(out)
    }
}

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

/// The fields of an event the writer fills in (id, revision).
struct EventDraft<'a> {
    kind: EventKind,
    time: SystemTime,
    tailnet: Option<TailnetId>,
    node: Option<NodeId>,
    auth_key: Option<AuthKeyId>,
    actor: &'a Actor,
    reason: &'a str,
    summary: String,
    run: Option<&'a RunIdentity>,
    gateway: Option<Box<crate::model::GatewayRequest>>,
}

static SYSTEM: std::sync::LazyLock<Actor> = std::sync::LazyLock::new(|| Actor::system("store"));

impl EventDraft<'_> {
    fn at(time: SystemTime) -> Self {
        EventDraft {
            kind: EventKind::NodeJoined,
            time,
            tailnet: None,
            node: None,
            auth_key: None,
            actor: &SYSTEM,
            reason: "",
            summary: String::new(),
            run: None,
            gateway: None,
        }
    }
}

/// What a write sees: reads of the applied state, and the batch it is building.
struct WriteCtx<'a> {
    db: &'a sled::Db,
    batch: sled::Batch,
    revision: u64,
    changes: Vec<Change>,
    address_hints: &'a mut HashMap<TailnetId, u32>,
}

impl WriteCtx<'_> {
    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        ReadCtx(self.db).get(k)
    }

    fn tailnet_nodes(&self, tailnet: TailnetId) -> Result<Vec<Node>> {
        ReadCtx(self.db).tailnet_nodes(tailnet)
    }

    fn put<T: Serialize>(&mut self, k: &[u8], value: &T) {
        self.batch.insert(k, encode(value));
    }

    fn put_raw(&mut self, k: &[u8], value: &[u8]) {
        self.batch.insert(k, value);
    }

    fn del(&mut self, k: &[u8]) {
        self.batch.remove(k);
    }

    fn event(&mut self, draft: EventDraft<'_>) {
        self.revision += 1;
        let event = Event {
            id: uuid::Uuid::now_v7(),
            revision: self.revision,
            time: draft.time,
            kind: draft.kind,
            tailnet_id: draft.tailnet,
            node_id: draft.node,
            auth_key_id: draft.auth_key,
            actor: draft.actor.0.clone(),
            reason: draft.reason.to_string(),
            summary: draft.summary,
            run: draft.run.cloned(),
            gateway: draft.gateway,
        };
        self.put(&key::event(event.revision), &event);
        if let Some(t) = event.tailnet_id {
            self.put_raw(&key::tailnet_event(t, event.revision), &[]);
        }
        if let Some(n) = event.node_id {
            self.put_raw(&key::node_event(n, event.revision), &[]);
        }
        self.changes.push(Change::Event(Arc::new(event)));
    }

    fn netmap(&mut self, tailnet: TailnetId, change: NetChange) {
        self.revision += 1;
        let update = Arc::new(NetMapUpdate { revision: self.revision, change });
        self.changes.push(Change::NetMap { tailnet, update });
    }

    fn remove_node_records(&mut self, node: &Node) {
        self.del(&key::node(node.id));
        self.del(&key::tailnet_node(node.tailnet_id, node.id));
        self.del(&key::address(node.tailnet_id, node.address));
        self.del(&key::hostname(node.tailnet_id, &node.hostname));
        self.del(&key::wireguard_key(node.tailnet_id, &node.wireguard_public_key));
        self.del(&key::session(&node.session_hash));
    }

    /// Removes a node, records why, and tells its peers (and its own stream, which ends). The caller
    /// stores `tailnet`, whose node count this lowers.
    #[allow(clippy::too_many_arguments)]
    fn remove_node(
        &mut self,
        tailnet: &mut Tailnet,
        node: &Node,
        end: EndReason,
        why: &str,
        reason: &str,
        actor: &Actor,
        now: SystemTime,
    ) {
        self.remove_node_records(node);
        tailnet.node_count = tailnet.node_count.saturating_sub(1);
        if let Some(hint) = self.address_hints.get_mut(&node.tailnet_id) {
            *hint = (*hint).min(u32::from(node.address));
        }
        self.event(EventDraft {
            kind: EventKind::NodeLeft,
            tailnet: Some(node.tailnet_id),
            node: Some(node.id),
            auth_key: node.auth_key_id,
            actor,
            reason,
            summary: format!("node {} ({}) removed: {why}", node.hostname, node.address),
            run: node.identity.as_ref(),
            ..EventDraft::at(now)
        });
        let message = if reason.is_empty() { why.to_string() } else { format!("{why}: {reason}") };
        self.netmap(node.tailnet_id, NetChange::PeerRemoved { node: node.id, reason: end, message });
    }

    /// Checks a credential; for an auth key, also counts the use.
    fn admit(&mut self, credential: &Credential, now: SystemTime) -> Result<Admitted> {
        match credential {
            Credential::AuthKey(hash) => {
                let unknown = || Error::Unauthenticated("auth_key: unknown key; create one with CreateAuthKey".into());
                let key_id = self.db.get(key::auth_key_secret(hash))?.ok_or_else(unknown)?;
                let key_id = AuthKeyId(uuid::Uuid::from_slice(&key_id).map_err(|_| unknown())?);
                let mut auth_key: AuthKey = self.get(&key::auth_key(key_id))?.ok_or_else(unknown)?;
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
                self.put(&key::auth_key(auth_key.id), &auth_key);
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
            Credential::Federated { rule, .. } => {
                let rule: TrustRule = self
                    .get(&key::trust_rule(*rule))?
                    .ok_or_else(|| Error::Unauthenticated("oidc_token: the trust rule was deleted".into()))?;
                Ok(Admitted {
                    field: "trust rule",
                    tailnet: rule.spec.tailnet_id,
                    tags: rule.spec.tags,
                    owner: None,
                    ephemeral: rule.spec.ephemeral,
                    lifetime: Some(Duration::from_secs(rule.spec.max_node_lifetime_seconds)),
                    auth_key: None,
                })
            }
        }
    }

    /// The lowest address of the range that no node holds.
    /// Writes the gateway's node (at the reserved address) and its key; returns its id.
    fn put_gateway(&mut self, tailnet: &Tailnet, keys: &GatewayKeys, now: SystemTime) -> NodeId {
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
        };
        let mut value = node.id.as_bytes().to_vec();
        value.extend_from_slice(&keys.secret);
        self.put_raw(&key::gateway(tailnet.id), &value);
        self.put_raw(&key::tailnet_node(tailnet.id, node.id), &[]);
        self.put_raw(&key::address(tailnet.id, node.address), node.id.as_bytes());
        self.put_raw(&key::hostname(tailnet.id, &node.hostname), node.id.as_bytes());
        self.put_raw(&key::wireguard_key(tailnet.id, &node.wireguard_public_key), node.id.as_bytes());
        self.put(&key::node(node.id), &node);
        let id = node.id;
        self.netmap(tailnet.id, NetChange::PeerAdded(Arc::new(node)));
        id
    }

    fn free_address(&mut self, tailnet: &Tailnet) -> Result<Ipv4Addr> {
        let first = tailnet.cidr.first_node_address();
        let mut want = self.address_hints.get(&tailnet.id).map_or(first, |h| (*h).max(first));
        let prefix = key::addresses(tailnet.id);
        for item in self.db.range(key::address(tailnet.id, Ipv4Addr::from(want))..) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let held = u32::from_be_bytes(k[k.len() - 4..].try_into().expect("address keys end with 4 bytes"));
            if held != want {
                break;
            }
            want = want.saturating_add(1);
        }
        if want > tailnet.cidr.last_node_address() || want == u32::MAX {
            return Err(Error::ResourceExhausted(format!(
                "tailnet {} has no free address left in {}",
                tailnet.id, tailnet.cidr
            )));
        }
        self.address_hints.insert(tailnet.id, want + 1);
        Ok(Ipv4Addr::from(want))
    }

    /// `wanted`, or `wanted-N` with the smallest N that is free in the tailnet.
    fn unique_hostname(&self, tailnet: TailnetId, wanted: &str) -> Result<String> {
        if self.db.get(key::hostname(tailnet, wanted))?.is_none() {
            return Ok(wanted.to_string());
        }
        for n in 1.. {
            let suffix = format!("-{n}");
            let base = &wanted[..wanted.len().min(63 - suffix.len())];
            let candidate = format!("{base}{suffix}");
            if self.db.get(key::hostname(tailnet, &candidate))?.is_none() {
                return Ok(candidate);
            }
        }
        unreachable!("some suffix is free")
    }
}
