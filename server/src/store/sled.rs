//! The embedded engine: every record in one sled tree, written in atomic batches by one writer at a
//! time, flushed to disk before a commit returns.
//!
//! Keys are a short prefix and fixed-width binary ids, so a prefix scan lists one tailnet's nodes, keys
//! or addresses in order. A transaction reads the committed state (not its own writes) and builds one
//! batch; the revision counter is stored in the same batch.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OwnedMutexGuard;

use super::{Counts, EventFilter, Pending, Placement};
use crate::error::{Error, Result};
use crate::hub::Change;
use crate::model::{
    AuthKey, AuthKeyId, Event, Node, NodeId, PolicyRecord, SecretHash, Tailnet, TailnetId, TrustRule, TrustRuleId,
};
use crate::secret::Secret;

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
    pub const NODES: &[u8] = b"n/";
    pub fn node(id: NodeId) -> Vec<u8> {
        join(NODES, &[id.as_bytes()])
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
    pub const AUTH_KEYS: &[u8] = b"k/";
    pub fn auth_key(id: AuthKeyId) -> Vec<u8> {
        join(AUTH_KEYS, &[id.as_bytes()])
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
    pub const UPSTREAM_KEYS: &[u8] = b"uk/";
    pub fn upstream_keys(t: TailnetId) -> Vec<u8> {
        join(UPSTREAM_KEYS, &[t.as_bytes()])
    }
    pub fn upstream_key(t: TailnetId, name: &str) -> Vec<u8> {
        join(UPSTREAM_KEYS, &[t.as_bytes(), name.as_bytes()])
    }
    /// The gateway's node id and WireGuard private key (write-only, like upstream keys).
    pub fn gateway(t: TailnetId) -> Vec<u8> {
        join(b"g/", &[t.as_bytes()])
    }
    pub const PROPOSALS: &[u8] = b"pp/";
    pub fn proposal(id: crate::model::ProposalId) -> Vec<u8> {
        join(PROPOSALS, &[id.as_bytes()])
    }
    pub fn tailnet_proposals(t: TailnetId) -> Vec<u8> {
        join(b"tpp/", &[t.as_bytes()])
    }
    pub fn tailnet_proposal(t: TailnetId, p: crate::model::ProposalId) -> Vec<u8> {
        join(b"tpp/", &[t.as_bytes(), p.as_bytes()])
    }
    pub const WEBHOOKS: &[u8] = b"wh/";
    pub fn webhook(id: crate::model::WebhookId) -> Vec<u8> {
        join(WEBHOOKS, &[id.as_bytes()])
    }
    pub fn deliveries(id: crate::model::WebhookId) -> Vec<u8> {
        join(b"whd/", &[id.as_bytes()])
    }
    pub fn delivery(id: crate::model::WebhookId, revision: u64) -> Vec<u8> {
        join(b"whd/", &[id.as_bytes(), &revision.to_be_bytes()])
    }
    /// A used OIDC token id (a hash) to its expiry.
    pub fn token_use(key: &crate::model::SecretHash) -> Vec<u8> {
        join(b"tu/", &[key])
    }
    /// The same, ordered by expiry, for pruning.
    pub const TOKEN_USES_BY_EXPIRY: &[u8] = b"tux/";
    pub fn token_use_expiry(expires: u64, key: &crate::model::SecretHash) -> Vec<u8> {
        join(TOKEN_USES_BY_EXPIRY, &[&expires.to_be_bytes(), key])
    }
    pub const LOGIN_PROVIDERS: &[u8] = b"lp/";
    pub fn login_provider(id: crate::model::LoginProviderId) -> Vec<u8> {
        join(LOGIN_PROVIDERS, &[id.as_bytes()])
    }
    pub const USERS: &[u8] = b"u/";
    pub fn user(id: crate::model::UserId) -> Vec<u8> {
        join(USERS, &[id.as_bytes()])
    }
    /// Issuer and subject (SHA-256 of both, NUL-separated) to user id.
    pub fn user_subject(issuer: &str, subject: &str) -> Vec<u8> {
        use sha2::Digest;
        let digest = sha2::Sha256::new().chain_update(issuer).chain_update([0]).chain_update(subject).finalize();
        join(b"us/", &[digest.as_slice()])
    }
    pub const ADMIN_TRUST_RULES: &[u8] = b"atr/";
    pub fn admin_trust_rule(id: crate::model::AdminTrustRuleId) -> Vec<u8> {
        join(ADMIN_TRUST_RULES, &[id.as_bytes()])
    }
    pub const ADMIN_TOKENS: &[u8] = b"at/";
    pub fn admin_token(id: crate::model::AdminTokenId) -> Vec<u8> {
        join(ADMIN_TOKENS, &[id.as_bytes()])
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
    pub const POLICIES: &[u8] = b"p/";
    pub fn policies(t: TailnetId) -> Vec<u8> {
        join(POLICIES, &[t.as_bytes()])
    }
    pub fn policy(t: TailnetId, version: u64) -> Vec<u8> {
        join(POLICIES, &[t.as_bytes(), &version.to_be_bytes()])
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

fn storage(e: sled::Error) -> Error {
    Error::Storage(format!("sled: {e}"))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Corrupt { key: String::from_utf8_lossy(key).into_owned(), detail: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// What only the writer touches.
struct Writer {
    revision: u64,
    /// Per tailnet, an address below which every node address is taken.
    address_hints: HashMap<TailnetId, u32>,
}

pub struct SledStore {
    db: sled::Db,
    writer: Arc<tokio::sync::Mutex<Writer>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, migrating it to [`SCHEMA_VERSION`].
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore> {
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).open().map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => Error::Unavailable(format!(
                "the sled store in {} is in use by another process (only one cordon serve may open it)",
                dir.display()
            )),
            e => storage(e),
        })?;
        migrate(&db)?;
        let revision = match db.get(key::REVISION).map_err(storage)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::Corrupt { key: "m/revision".into(), detail: "not 8 bytes".into() })?,
            ),
            None => 0,
        };
        let writer = Writer { revision, address_hints: HashMap::new() };
        Ok(SledStore { db, writer: Arc::new(tokio::sync::Mutex::new(writer)) })
    }

    /// The revision of the last committed change (at open, before any writer runs).
    pub fn revision(&self) -> u64 {
        self.writer.try_lock().map(|w| w.revision).unwrap_or(0)
    }

    pub async fn begin(&self, write: bool) -> SledTx {
        let writer = if write { Some(self.writer.clone().lock_owned().await) } else { None };
        SledTx { db: self.db.clone(), writer, batch: sled::Batch::default() }
    }

    /// A reader that holds the writer out, with the revision it sees.
    pub async fn begin_snapshot(&self) -> (u64, SledTx) {
        let writer = self.writer.clone().lock_owned().await;
        (writer.revision, SledTx { db: self.db.clone(), writer: Some(writer), batch: sled::Batch::default() })
    }

    pub async fn flush(&self) -> Result<()> {
        flush(&self.db).await
    }

    pub async fn prune_events(&self, before: SystemTime, limit: usize) -> Result<usize> {
        let mut old = Vec::new();
        for item in self.db.scan_prefix(key::EVENTS) {
            let (k, v) = item.map_err(storage)?;
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
        self.db.apply_batch(batch).map_err(storage)?;
        flush(&self.db).await?;
        Ok(n)
    }

    pub fn counts(&self) -> Result<Counts> {
        let count = |prefix: &[u8]| self.db.scan_prefix(prefix).count() as u64;
        Ok(Counts {
            tailnets: count(key::TAILNETS),
            nodes: count(key::NODES),
            auth_keys: count(key::AUTH_KEYS),
            trust_rules: count(key::TRUST_RULES),
            policy_versions: count(key::POLICIES),
            upstream_keys: count(key::UPSTREAM_KEYS),
            events: count(key::EVENTS),
            admin_tokens: count(key::ADMIN_TOKENS),
        })
    }
}

/// spawn_blocking rather than sled's flush_async, so paused-time tests do not skip ahead.
async fn flush(db: &sled::Db) -> Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| Error::Unavailable(format!("flush task failed: {e}")))?
        .map_err(storage)?;
    Ok(())
}

fn migrate(db: &sled::Db) -> Result<()> {
    let stored = match db.get(key::SCHEMA).map_err(storage)? {
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
        db.insert(key::SCHEMA, &version.to_be_bytes()).map_err(storage)?;
    }
    db.flush().map_err(storage)?;
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

/// A sled transaction: reads of the committed tree, and (for a writer) the batch it builds while it
/// holds the one writer lock.
pub struct SledTx {
    db: sled::Db,
    writer: Option<OwnedMutexGuard<Writer>>,
    batch: sled::Batch,
}

impl SledTx {
    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>> {
        self.db.get(k).map_err(storage)?.map(|v| decode(k, &v)).transpose()
    }

    fn has(&self, k: &[u8]) -> Result<bool> {
        self.db.contains_key(k).map_err(storage)
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

    /// The records an index prefix points at, by the id in each index key's last 16 bytes.
    fn indexed<T: DeserializeOwned>(&self, index: Vec<u8>, record: impl Fn(uuid::Uuid) -> Vec<u8>) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(index) {
            let (k, _) = item.map_err(storage)?;
            if let Some(r) = self.get(&record(key::trailing_uuid(&k)))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn all<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.db.scan_prefix(prefix).map(|item| item.map_err(storage).and_then(|(k, v)| decode(&k, &v))).collect()
    }

    fn hints(&mut self) -> &mut HashMap<TailnetId, u32> {
        &mut self.writer.as_mut().expect("a writer").address_hints
    }

    pub async fn tailnet(&mut self, id: TailnetId) -> Result<Option<Tailnet>> {
        self.get(&key::tailnet(id))
    }

    pub async fn tailnets(
        &mut self,
        owner: Option<&str>,
        after: Option<TailnetId>,
        limit: usize,
    ) -> Result<Vec<Tailnet>> {
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
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(key::TAILNETS) || out.len() == limit {
                break;
            }
            let t: Tailnet = decode(&k, &v)?;
            if owner.is_none_or(|o| o == t.owner) {
                out.push(t);
            }
        }
        Ok(out)
    }

    pub async fn put_tailnet(&mut self, tailnet: &Tailnet) -> Result<()> {
        self.put(&key::tailnet(tailnet.id), tailnet);
        Ok(())
    }

    pub async fn delete_tailnet(&mut self, id: TailnetId) -> Result<()> {
        for node in self.nodes_of(id).await? {
            self.delete_node(&node).await?;
        }
        for item in self.db.scan_prefix(key::tailnet_keys(id)) {
            let (k, _) = item.map_err(storage)?;
            let key_id = AuthKeyId(key::trailing_uuid(&k));
            if let Some(auth_key) = self.get::<AuthKey>(&key::auth_key(key_id))? {
                self.del(&key::auth_key_secret(&auth_key.secret_hash));
            }
            self.del(&key::auth_key(key_id));
            self.del(&k);
        }
        for prefix in [key::policies(id), key::upstream_keys(id)] {
            for item in self.db.scan_prefix(prefix) {
                let (k, _) = item.map_err(storage)?;
                self.del(&k);
            }
        }
        for provider in self.all::<crate::model::LoginProvider>(key::LOGIN_PROVIDERS)? {
            if provider.tailnet_id == Some(id) {
                self.del(&key::login_provider(provider.id));
            }
        }
        for item in self.db.scan_prefix(key::tailnet_rules(id)) {
            let (k, _) = item.map_err(storage)?;
            self.del(&key::trust_rule(TrustRuleId(key::trailing_uuid(&k))));
            self.del(&k);
        }
        for item in self.db.scan_prefix(key::tailnet_proposals(id)) {
            let (k, _) = item.map_err(storage)?;
            self.del(&key::proposal(crate::model::ProposalId(key::trailing_uuid(&k))));
            self.del(&k);
        }
        self.del(&key::gateway(id));
        self.del(&key::tailnet(id));
        if let Some(w) = self.writer.as_mut() {
            w.address_hints.remove(&id);
        }
        Ok(())
    }

    pub async fn node(&mut self, id: NodeId) -> Result<Option<Node>> {
        self.get(&key::node(id))
    }

    pub async fn nodes_of(&mut self, tailnet: TailnetId) -> Result<Vec<Node>> {
        self.indexed(key::tailnet_nodes(tailnet), |id| key::node(NodeId(id)))
    }

    pub async fn proposal(&mut self, id: crate::model::ProposalId) -> Result<Option<crate::model::PolicyProposal>> {
        self.get(&key::proposal(id))
    }

    pub async fn proposals_of(&mut self, tailnet: TailnetId) -> Result<Vec<crate::model::PolicyProposal>> {
        self.indexed(key::tailnet_proposals(tailnet), |id| key::proposal(crate::model::ProposalId(id)))
    }

    pub async fn pending_proposals(&mut self) -> Result<Vec<crate::model::PolicyProposal>> {
        let all: Vec<crate::model::PolicyProposal> = self.all(key::PROPOSALS)?;
        Ok(all.into_iter().filter(|p| p.state == crate::model::ProposalState::Pending).collect())
    }

    pub async fn put_proposal(&mut self, p: &crate::model::PolicyProposal) -> Result<()> {
        self.put(&key::proposal(p.id), p);
        self.put_raw(&key::tailnet_proposal(p.tailnet_id, p.id), &[]);
        Ok(())
    }

    pub async fn webhooks(&mut self) -> Result<Vec<crate::model::Webhook>> {
        self.all(key::WEBHOOKS)
    }

    pub async fn put_webhook(&mut self, w: &crate::model::Webhook) -> Result<()> {
        self.put(&key::webhook(w.id), w);
        Ok(())
    }

    pub async fn delete_webhook(&mut self, id: crate::model::WebhookId) -> Result<()> {
        self.del(&key::webhook(id));
        for item in self.db.scan_prefix(key::deliveries(id)) {
            let (k, _) = item.map_err(storage)?;
            self.del(&k);
        }
        Ok(())
    }

    pub async fn deliveries_of(
        &mut self,
        id: crate::model::WebhookId,
        limit: usize,
    ) -> Result<Vec<crate::model::Delivery>> {
        let mut newest = Vec::new();
        for item in self.db.scan_prefix(key::deliveries(id)).rev().take(limit) {
            let (k, v) = item.map_err(storage)?;
            newest.push(decode(&k, &v)?);
        }
        newest.reverse();
        Ok(newest)
    }

    pub async fn put_delivery(&mut self, d: &crate::model::Delivery) -> Result<()> {
        self.put(&key::delivery(d.webhook_id, d.revision), d);
        Ok(())
    }

    pub async fn use_token(
        &mut self,
        key: &crate::model::SecretHash,
        expires: std::time::SystemTime,
        now: std::time::SystemTime,
    ) -> Result<bool> {
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        // Forget up to 64 uses whose tokens have expired (oldest first).
        for item in self.db.scan_prefix(key::TOKEN_USES_BY_EXPIRY).take(64) {
            let (k, _) = item.map_err(storage)?;
            let at = u64::from_be_bytes(k[4..12].try_into().expect("expiry keys hold 8 bytes of time"));
            if at > secs(now) {
                break;
            }
            let used: crate::model::SecretHash = k[12..].try_into().expect("expiry keys end with a hash");
            self.del(&key::token_use(&used));
            self.del(&k);
        }
        if let Some(until) = self.db.get(key::token_use(key)).map_err(storage)?
            && u64::from_be_bytes(until.as_ref().try_into().unwrap_or([0; 8])) > secs(now)
        {
            return Ok(false);
        }
        self.put_raw(&key::token_use(key), &secs(expires).to_be_bytes());
        self.put_raw(&key::token_use_expiry(secs(expires), key), &[]);
        Ok(true)
    }

    pub async fn login_providers(&mut self) -> Result<Vec<crate::model::LoginProvider>> {
        self.all(key::LOGIN_PROVIDERS)
    }

    pub async fn put_login_provider(&mut self, p: &crate::model::LoginProvider) -> Result<()> {
        self.put(&key::login_provider(p.id), p);
        Ok(())
    }

    pub async fn delete_login_provider(&mut self, id: crate::model::LoginProviderId) -> Result<()> {
        self.del(&key::login_provider(id));
        Ok(())
    }

    pub async fn users(&mut self) -> Result<Vec<crate::model::User>> {
        self.all(key::USERS)
    }

    pub async fn user(&mut self, id: crate::model::UserId) -> Result<Option<crate::model::User>> {
        self.get(&key::user(id))
    }

    pub async fn user_by_subject(&mut self, issuer: &str, subject: &str) -> Result<Option<crate::model::User>> {
        match self.db.get(key::user_subject(issuer, subject)).map_err(storage)? {
            Some(id) => match <[u8; 16]>::try_from(id.as_ref()) {
                Ok(id) => self.get(&key::user(crate::model::UserId(uuid::Uuid::from_bytes(id)))),
                Err(_) => Err(Error::Corrupt { key: "us/".into(), detail: "a user index entry is not an id".into() }),
            },
            None => Ok(None),
        }
    }

    pub async fn put_user(&mut self, u: &crate::model::User) -> Result<()> {
        self.put(&key::user(u.id), u);
        self.put_raw(&key::user_subject(&u.issuer, &u.subject), u.id.as_bytes());
        Ok(())
    }

    pub async fn delete_user(&mut self, id: crate::model::UserId) -> Result<()> {
        if let Some(u) = self.get::<crate::model::User>(&key::user(id))? {
            self.del(&key::user_subject(&u.issuer, &u.subject));
        }
        self.del(&key::user(id));
        Ok(())
    }

    pub async fn admin_trust_rules(&mut self) -> Result<Vec<crate::model::AdminTrustRule>> {
        self.all(key::ADMIN_TRUST_RULES)
    }

    pub async fn put_admin_trust_rule(&mut self, rule: &crate::model::AdminTrustRule) -> Result<()> {
        self.put(&key::admin_trust_rule(rule.id), rule);
        Ok(())
    }

    pub async fn delete_admin_trust_rule(&mut self, id: crate::model::AdminTrustRuleId) -> Result<()> {
        self.del(&key::admin_trust_rule(id));
        Ok(())
    }

    pub async fn admin_tokens(&mut self) -> Result<Vec<crate::model::AdminToken>> {
        self.all(key::ADMIN_TOKENS)
    }

    pub async fn put_admin_token(&mut self, token: &crate::model::AdminToken) -> Result<()> {
        self.put(&key::admin_token(token.id), token);
        Ok(())
    }

    pub async fn all_nodes(&mut self) -> Result<Vec<Node>> {
        self.all(key::NODES)
    }

    async fn node_by_wireguard_key(&mut self, tailnet: TailnetId, k: &[u8; 32]) -> Result<Option<Node>> {
        match self.db.get(key::wireguard_key(tailnet, k)).map_err(storage)? {
            Some(id) => self.get(&key::node(NodeId(key::trailing_uuid(&id)))),
            None => Ok(None),
        }
    }

    pub async fn node_by_session(&mut self, hash: &SecretHash) -> Result<Option<Node>> {
        match self.db.get(key::session(hash)).map_err(storage)? {
            Some(id) => self.get(&key::node(NodeId(key::trailing_uuid(&id)))),
            None => Ok(None),
        }
    }

    pub async fn hostname_taken(&mut self, tailnet: TailnetId, hostname: &str) -> Result<bool> {
        self.has(&key::hostname(tailnet, hostname))
    }

    async fn free_address(&mut self, tailnet: TailnetId, first: u32, last: u32) -> Result<Option<Ipv4Addr>> {
        let mut want = self.hints().get(&tailnet).map_or(first, |h| (*h).max(first));
        let prefix = key::addresses(tailnet);
        for item in self.db.range(key::address(tailnet, Ipv4Addr::from(want))..) {
            let (k, _) = item.map_err(storage)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let held = u32::from_be_bytes(k[k.len() - 4..].try_into().expect("address keys end with 4 bytes"));
            if held != want {
                break;
            }
            want = want.saturating_add(1);
        }
        if want > last || want == u32::MAX {
            return Ok(None);
        }
        // The transaction does not see its own batch: the next allocation starts past this one.
        self.hints().insert(tailnet, want + 1);
        Ok(Some(Ipv4Addr::from(want)))
    }

    pub async fn placement(
        &mut self,
        tailnet: TailnetId,
        key: &[u8; 32],
        hostname: &str,
        first: u32,
        last: u32,
    ) -> Result<Placement> {
        if let Some(node) = self.node_by_wireguard_key(tailnet, key).await? {
            return Ok(Placement::Existing(Box::new(node)));
        }
        let address = self.free_address(tailnet, first, last).await?;
        Ok(Placement::New { address, hostname_taken: self.hostname_taken(tailnet, hostname).await? })
    }

    pub async fn put_node(&mut self, node: &Node, replaced: Option<&Node>) -> Result<()> {
        if let Some(old) = replaced {
            if old.session_hash != node.session_hash {
                self.del(&key::session(&old.session_hash));
            }
            if old.hostname != node.hostname {
                self.del(&key::hostname(old.tailnet_id, &old.hostname));
            }
            if old.address != node.address {
                self.del(&key::address(old.tailnet_id, old.address));
            }
        }
        let id = node.id.as_bytes();
        self.put_raw(&key::tailnet_node(node.tailnet_id, node.id), &[]);
        self.put_raw(&key::address(node.tailnet_id, node.address), id);
        self.put_raw(&key::hostname(node.tailnet_id, &node.hostname), id);
        self.put_raw(&key::wireguard_key(node.tailnet_id, &node.wireguard_public_key), id);
        if node.session_hash != [0; 32] {
            self.put_raw(&key::session(&node.session_hash), id);
        }
        self.put(&key::node(node.id), node);
        Ok(())
    }

    pub async fn delete_node(&mut self, node: &Node) -> Result<()> {
        self.del(&key::node(node.id));
        self.del(&key::tailnet_node(node.tailnet_id, node.id));
        self.del(&key::address(node.tailnet_id, node.address));
        self.del(&key::hostname(node.tailnet_id, &node.hostname));
        self.del(&key::wireguard_key(node.tailnet_id, &node.wireguard_public_key));
        self.del(&key::session(&node.session_hash));
        if let Some(w) = self.writer.as_mut()
            && let Some(hint) = w.address_hints.get_mut(&node.tailnet_id)
        {
            *hint = (*hint).min(u32::from(node.address));
        }
        Ok(())
    }

    pub async fn auth_key(&mut self, id: AuthKeyId) -> Result<Option<AuthKey>> {
        self.get(&key::auth_key(id))
    }

    pub async fn auth_key_by_secret(&mut self, hash: &SecretHash) -> Result<Option<AuthKey>> {
        let Some(id) = self.db.get(key::auth_key_secret(hash)).map_err(storage)? else { return Ok(None) };
        let Ok(id) = uuid::Uuid::from_slice(&id) else { return Ok(None) };
        self.get(&key::auth_key(AuthKeyId(id)))
    }

    pub async fn auth_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<AuthKey>> {
        self.indexed(key::tailnet_keys(tailnet), |id| key::auth_key(AuthKeyId(id)))
    }

    pub async fn put_auth_key(&mut self, k: &AuthKey) -> Result<()> {
        self.put(&key::auth_key(k.id), k);
        self.put_raw(&key::auth_key_secret(&k.secret_hash), k.id.as_bytes());
        self.put_raw(&key::tailnet_key(k.tailnet_id, k.id), &[]);
        Ok(())
    }

    pub async fn trust_rule(&mut self, id: TrustRuleId) -> Result<Option<TrustRule>> {
        self.get(&key::trust_rule(id))
    }

    pub async fn trust_rules_of(&mut self, tailnet: TailnetId) -> Result<Vec<TrustRule>> {
        self.indexed(key::tailnet_rules(tailnet), |id| key::trust_rule(TrustRuleId(id)))
    }

    pub async fn trust_rules_for(&mut self, issuer: &str) -> Result<Vec<TrustRule>> {
        let mut rules: Vec<TrustRule> = self.all(key::TRUST_RULES)?;
        rules.retain(|r| r.spec.issuer == issuer);
        Ok(rules)
    }

    pub async fn put_trust_rule(&mut self, rule: &TrustRule) -> Result<()> {
        self.put(&key::trust_rule(rule.id), rule);
        self.put_raw(&key::tailnet_rule(rule.spec.tailnet_id, rule.id), &[]);
        Ok(())
    }

    pub async fn delete_trust_rule(&mut self, rule: &TrustRule) -> Result<()> {
        self.del(&key::trust_rule(rule.id));
        self.del(&key::tailnet_rule(rule.spec.tailnet_id, rule.id));
        Ok(())
    }

    pub async fn policy(&mut self, tailnet: TailnetId, version: u64) -> Result<Option<PolicyRecord>> {
        self.get(&key::policy(tailnet, version))
    }

    pub async fn policies_of(&mut self, tailnet: TailnetId) -> Result<Vec<PolicyRecord>> {
        self.all(&key::policies(tailnet))
    }

    pub async fn put_policy(&mut self, record: &PolicyRecord) -> Result<()> {
        self.put(&key::policy(record.tailnet_id, record.version), record);
        Ok(())
    }

    pub async fn gateway(&mut self, tailnet: TailnetId) -> Result<Option<(NodeId, [u8; 32])>> {
        let k = key::gateway(tailnet);
        let Some(v) = self.db.get(&k).map_err(storage)? else { return Ok(None) };
        if v.len() != 48 {
            return Err(Error::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                detail: "not 48 bytes".into(),
            });
        }
        let id = NodeId(uuid::Uuid::from_bytes(v[..16].try_into().expect("16 bytes")));
        Ok(Some((id, v[16..].try_into().expect("32 bytes"))))
    }

    pub async fn put_gateway(&mut self, tailnet: TailnetId, node: NodeId, secret: &[u8; 32]) -> Result<()> {
        let mut value = node.as_bytes().to_vec();
        value.extend_from_slice(secret);
        self.put_raw(&key::gateway(tailnet), &value);
        Ok(())
    }

    pub async fn upstream_key(&mut self, tailnet: TailnetId, name: &str) -> Result<Option<Secret>> {
        Ok(self
            .db
            .get(key::upstream_key(tailnet, name))
            .map_err(storage)?
            .map(|v| Secret::from_string(String::from_utf8_lossy(&v).into_owned())))
    }

    pub async fn upstream_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<(String, Secret)>> {
        let prefix = key::upstream_keys(tailnet);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, v) = item.map_err(storage)?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name, Secret::from_string(String::from_utf8_lossy(&v).into_owned())));
        }
        Ok(out)
    }

    pub async fn put_upstream_key(&mut self, tailnet: TailnetId, name: &str, k: &Secret) -> Result<()> {
        self.put_raw(&key::upstream_key(tailnet, name), k.expose().as_bytes());
        Ok(())
    }

    pub async fn events(&mut self, filter: &EventFilter, published: u64) -> Result<(Vec<Event>, bool)> {
        let prefix = match (filter.node, filter.tailnet) {
            (Some(n), _) => key::node_events(n),
            (None, Some(t)) => key::tailnet_events(t),
            (None, None) => key::EVENTS.to_vec(),
        };
        let Some(first) = filter.after_revision.checked_add(1) else { return Ok((vec![], false)) };
        let mut start = prefix.clone();
        start.extend_from_slice(&first.to_be_bytes());
        let mut out = Vec::new();
        for item in self.db.range(start..) {
            let (k, v) = item.map_err(storage)?;
            // Only what is published (durable): an applied but unflushed event could vanish in a crash
            // and its revision be reused, and a client resuming from it would skip the replacement.
            if !k.starts_with(&prefix) || key::trailing_revision(&k) > published {
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

    fn put_event(&mut self, event: &Event) {
        self.put(&key::event(event.revision), event);
        if let Some(t) = event.tailnet_id {
            self.put_raw(&key::tailnet_event(t, event.revision), &[]);
        }
        if let Some(n) = event.node_id {
            self.put_raw(&key::node_event(n, event.revision), &[]);
        }
    }

    pub async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        for e in events {
            self.put_event(e);
        }
        Ok(())
    }

    pub async fn set_revision(&mut self, revision: u64) -> Result<()> {
        self.writer.as_mut().expect("a writer").revision = revision;
        Ok(())
    }

    /// Numbers the changes, applies the batch with the revision, releases the writer, then flushes;
    /// returns the numbered changes once they are durable.
    pub async fn commit(mut self, pending: Vec<Pending>) -> Result<Vec<Change>> {
        let Some(mut writer) = self.writer.take() else { return Ok(vec![]) };
        let mut revision = writer.revision;
        let mut changes = Vec::with_capacity(pending.len());
        for p in pending {
            revision += 1;
            let change = p.numbered(revision);
            if let Change::Event(e) = &change {
                self.put_event(e);
            }
            changes.push(change);
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.insert(key::REVISION, &revision.to_be_bytes());
        self.db.apply_batch(batch).map_err(storage)?;
        writer.revision = revision;
        drop(writer);
        // Outside the lock: writers that applied meanwhile share this flush (group commit).
        flush(&self.db).await?;
        Ok(changes)
    }
}
