//! The PostgreSQL engine: real tables with indexed columns, migrations embedded in the binary and
//! applied at start, a connection pool, and transactions whose row locks keep the invariants (one
//! writer per tailnet, a single-use key admits one node) and whose revisions follow commit order.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

pub mod cluster;
mod tls;

use super::{Counts, EventFilter, Pending, Placement};
use crate::error::{Error, Result};
use crate::hub::Change;
use crate::model::{
    AuthKey, AuthKeyId, Event, Node, NodeId, PolicyRecord, SecretHash, Tailnet, TailnetId, TrustRule, TrustRuleId,
};
use crate::secret::Secret;

/// The lowest address in `$2..=$3` no node of tailnet `$1` holds: `$2` or one past a held address; the
/// (tailnet, address) index answers both probes.
const FREE_ADDRESS: &str = "SELECT c.a FROM (SELECT $2::bigint AS a UNION ALL \
     SELECT address + 1 FROM nodes WHERE tailnet_id = $1 AND address >= $2) c \
     WHERE c.a <= $3 AND NOT EXISTS (SELECT 1 FROM nodes WHERE tailnet_id = $1 AND address = c.a) \
     ORDER BY c.a LIMIT 1";

/// Schema versions, each with the SQL that reaches it from the one before.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("postgres/0001_initial.sql")),
    (2, include_str!("postgres/0002_admin_tokens.sql")),
    (3, include_str!("postgres/0003_policy_proposals.sql")),
    (4, include_str!("postgres/0004_admin_trust_rules.sql")),
    (5, include_str!("postgres/0005_webhooks.sql")),
    (6, include_str!("postgres/0006_people.sql")),
    (7, include_str!("postgres/0007_oidc_replay.sql")),
    (8, include_str!("postgres/0008_replicas.sql")),
];

/// The oldest server this engine is tested against (`server_version_num`).
const MIN_SERVER_VERSION: i32 = 130_000;

/// Serialises migrations of replicas starting together (an arbitrary constant: "cordon").
const MIGRATION_LOCK: i64 = 0x636f_7264_6f6e;

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            out.replace_range(start..scheme_end + 3 + at, "***");
        }
    }
    if let Some(i) = out.find("password=") {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i + "password=".len()..end, "***");
    }
    out
}

fn db(e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE => {
            Error::Unavailable("the store refused a write that conflicted with another; retry".into())
        }
        _ if e.is_closed() => Error::Unavailable("lost the connection to PostgreSQL; retry".into()),
        // The server's message and SQLSTATE, not its detail (which can quote row values).
        _ => match e.as_db_error() {
            Some(d) => Error::Storage(format!("postgres: {} ({})", d.message(), d.code().code())),
            None => Error::Storage(format!("postgres: {e}")),
        },
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    Error::Unavailable(format!("no PostgreSQL connection available: {e}"))
}

/// One line that says what to do when the first connection fails.
fn connect_error(url: &str, e: deadpool_postgres::PoolError) -> Error {
    use tokio_postgres::error::SqlState;
    let shown = redact(url);
    let deadpool_postgres::PoolError::Backend(e) = e else {
        return Error::Unavailable(format!("cannot connect to PostgreSQL at {shown}: {e}"));
    };
    let detail = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
    if detail.contains("certificate") {
        return Error::Unavailable(format!(
            "cannot connect to PostgreSQL at {shown}: {detail}; give sslrootcert=<the CA that signed the server's \
             certificate> and a host the certificate names, or sslmode=verify-ca to check the CA only"
        ));
    }
    let hint = match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "check the user and password in --store"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => "create the database (createdb) or name another in --store",
        _ => "check that PostgreSQL runs and that --store names its host and port",
    };
    Error::Unavailable(format!("cannot connect to PostgreSQL at {shown}: {detail}; {hint}"))
}

fn decode<T: DeserializeOwned>(row: &Row, what: &str) -> Result<T> {
    row.try_get::<_, Json<T>>(0)
        .map(|j| j.0)
        .map_err(|e| Error::Corrupt { key: what.to_string(), detail: e.to_string() })
}

fn address(a: Ipv4Addr) -> i64 {
    i64::from(u32::from(a))
}

pub struct PgStore {
    pool: Pool,
    hints: Hints,
    /// For connections of their own (LISTEN).
    config: tokio_postgres::Config,
    tls: tls::Tls,
}

/// Per tailnet, an address below which this process saw every address taken: where the search for a
/// free one starts, so a dense tailnet does not rescan every node. Only a shortcut: the database
/// decides what is free (a deletion through another replica is found once this process restarts).
type Hints = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<TailnetId, u32>>>;

impl PgStore {
    /// Connects, checks the server version and applies any migrations this build has and the
    /// database lacks.
    pub async fn open(url: &str, max_connections: usize) -> Result<PgStore> {
        let (driver_url, ssl_mode, root) = tls::split_url(url)?;
        let config = tokio_postgres::Config::from_str(&driver_url).map_err(|e| {
            Error::invalid(
                "store",
                format!("{} is not a PostgreSQL URL ({e}); e.g. postgres://cordon@db.example/cordon", redact(url)),
            )
        })?;
        let tls = tls::connector(ssl_mode, root.as_deref())?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::invalid("store", format!("connection pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| connect_error(url, e))?;
        let version: i32 =
            client.query_one("SELECT current_setting('server_version_num')::int", &[]).await.map_err(db)?.get(0);
        if version < MIN_SERVER_VERSION {
            return Err(Error::Unavailable(format!(
                "PostgreSQL {}.{} is too old: Cordon needs 13 or newer",
                version / 10_000,
                version % 10_000
            )));
        }
        migrate(&mut client).await?;
        Ok(PgStore { pool, hints: Hints::default(), config, tls })
    }

    pub async fn revision(&self) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client.query_one("SELECT revision FROM meta", &[]).await.map_err(db)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub async fn begin(&self, write: bool) -> Result<PgTx> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // BEGIN goes out with the first statement, in one round trip.
        Ok(PgTx {
            client: Some(client),
            open: write,
            write,
            unbegun: write,
            queued: Vec::new(),
            hints: self.hints.clone(),
            locked_tailnet: None,
        })
    }

    /// A read-only transaction on one snapshot, with the revision that snapshot is at.
    pub async fn begin_snapshot(&self) -> Result<(u64, PgTx)> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(db)?;
        let tx = PgTx {
            client: Some(client),
            open: true,
            write: false,
            unbegun: false,
            queued: Vec::new(),
            hints: self.hints.clone(),
            locked_tailnet: None,
        };
        let row = tx.client().query_one("SELECT revision FROM meta", &[]).await.map_err(db)?;
        Ok((row.get::<_, i64>(0) as u64, tx))
    }

    pub async fn prune_events(&self, before: SystemTime, limit: usize) -> Result<usize> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client
            .execute(
                "DELETE FROM events WHERE revision IN \
                 (SELECT revision FROM events WHERE time < $1 ORDER BY revision LIMIT $2)",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(db)?;
        Ok(n as usize)
    }

    pub async fn counts(&self) -> Result<Counts> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM tailnets), (SELECT count(*) FROM nodes), \
                 (SELECT count(*) FROM auth_keys), (SELECT count(*) FROM trust_rules), \
                 (SELECT count(*) FROM policy_versions), (SELECT count(*) FROM upstream_keys), \
                 (SELECT count(*) FROM events), (SELECT count(*) FROM admin_tokens)",
                &[],
            )
            .await
            .map_err(db)?;
        let n = |i| row.get::<_, i64>(i) as u64;
        Ok(Counts {
            tailnets: n(0),
            nodes: n(1),
            auth_keys: n(2),
            trust_rules: n(3),
            policy_versions: n(4),
            upstream_keys: n(5),
            admin_tokens: n(7),
            events: n(6),
        })
    }
}

async fn migrate(client: &mut Object) -> Result<()> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS cordon_schema (version integer NOT NULL)").await.map_err(db)?;
    let stored: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM cordon_schema", &[]).await.map_err(db)?.get(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if stored > latest {
        return Err(Error::Unavailable(format!(
            "the database has Cordon schema version {stored}, newer than this build's {latest}; run a newer cordon"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > stored) {
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute("INSERT INTO cordon_schema (version) VALUES ($1)", &[version]).await.map_err(db)?;
        tracing::info!(version, "applied PostgreSQL schema migration");
    }
    tx.commit().await.map_err(db)
}

/// A pooled connection inside a transaction (writes, snapshots) or not (single reads). Dropped
/// without commit, it rolls back before the connection returns to the pool.
pub struct PgTx {
    client: Option<Object>,
    open: bool,
    write: bool,
    /// A writer whose BEGIN has not been sent yet.
    unbegun: bool,
    /// Writes not sent yet: they go out together at commit, pipelined, in order. Like the sled engine,
    /// a transaction's reads see the state before it, never its own writes.
    queued: Vec<(&'static str, Vec<Param>)>,
    hints: Hints,
    /// The tailnet row locked together with an auth key, so reading it again costs no round trip.
    locked_tailnet: Option<Tailnet>,
}

/// A statement parameter owned by the queue.
type Param = Box<dyn ToSql + Sync + Send>;

macro_rules! params {
    ($($p:expr),* $(,)?) => { vec![$(Box::new($p) as Param),*] };
}

/// A record as the `record` column holds it.
fn record<T: serde::Serialize>(value: &T) -> Json<serde_json::Value> {
    Json(serde_json::to_value(value).expect("records serialize"))
}

impl Drop for PgTx {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        // Nothing sent (or nothing left open): the connection goes back to the pool as it is.
        if !self.open || self.unbegun {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(Object::take(client));
                    }
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

impl PgTx {
    fn client(&self) -> &Object {
        self.client.as_ref().expect("a live transaction")
    }

    async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let begin = std::mem::take(&mut self.unbegun);
        let client = self.client();
        let statement = client.prepare_cached(sql).await.map_err(db)?;
        if begin {
            let (_, rows) = futures::future::try_join(client.batch_execute("BEGIN"), client.query(&statement, params))
                .await
                .map_err(db)?;
            return Ok(rows);
        }
        client.query(&statement, params).await.map_err(db)
    }

    /// Queues a write for commit.
    fn queue(&mut self, sql: &'static str, params: Vec<Param>) {
        debug_assert!(self.write, "a write through a read transaction");
        self.queued.push((sql, params));
    }

    /// Sends BEGIN (if not yet sent), the queued writes, then `then`, all pipelined in this order;
    /// returns what `then` returned.
    async fn send_queued(&mut self, then: Option<(&'static str, Vec<Param>)>) -> Result<Option<Vec<Row>>> {
        let begin = std::mem::take(&mut self.unbegun);
        let queued = std::mem::take(&mut self.queued);
        let client = self.client();
        // Prepared first (cached after the first use), so the executions leave in queue order.
        let mut statements = Vec::with_capacity(queued.len());
        for (sql, _) in queued.iter().chain(then.iter()) {
            statements.push(client.prepare_cached(sql).await.map_err(db)?);
        }
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> = queued
            .iter()
            .chain(then.iter())
            .map(|(_, params)| params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
            .collect();
        let writes = statements[..queued.len()].iter().zip(&refs).map(|(st, p)| client.execute(st, p));
        let begin = async {
            if begin {
                client.batch_execute("BEGIN").await?;
            }
            Ok(())
        };
        let last = async {
            match then {
                Some(_) => client.query(&statements[queued.len()], &refs[queued.len()]).await.map(Some),
                None => Ok(None),
            }
        };
        let (_, _, rows) =
            futures::future::try_join3(begin, futures::future::try_join_all(writes), last).await.map_err(db)?;
        Ok(rows)
    }

    async fn one<T: DeserializeOwned>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        what: &str,
    ) -> Result<Option<T>> {
        self.query(sql, params).await?.first().map(|r| decode(r, what)).transpose()
    }

    async fn many<T: DeserializeOwned>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<T>> {
        self.query(sql, params).await?.iter().map(|r| decode(r, what)).collect()
    }

    /// `FOR UPDATE` in a writer: the row stays locked until commit.
    fn lock(&self) -> &'static str {
        if self.write { " FOR UPDATE" } else { "" }
    }

    pub async fn tailnet(&mut self, id: TailnetId) -> Result<Option<Tailnet>> {
        if let Some(t) = self.locked_tailnet.as_ref().filter(|t| t.id == id) {
            return Ok(Some(t.clone()));
        }
        let sql = format!("SELECT record FROM tailnets WHERE id = $1{}", self.lock());
        self.one(&sql, &[&id.0], "tailnet").await
    }

    pub async fn tailnets(
        &mut self,
        owner: Option<&str>,
        after: Option<TailnetId>,
        limit: usize,
    ) -> Result<Vec<Tailnet>> {
        let after = after.map(|a| a.0);
        self.many(
            "SELECT record FROM tailnets WHERE ($1::text IS NULL OR owner = $1) AND ($2::uuid IS NULL OR id > $2) \
             ORDER BY id LIMIT $3",
            &[&owner, &after, &(limit as i64)],
            "tailnet",
        )
        .await
    }

    pub async fn put_tailnet(&mut self, t: &Tailnet) -> Result<()> {
        self.queue(
            "INSERT INTO tailnets (id, name, owner, created_at, expires_at, record) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, owner = excluded.owner, \
             expires_at = excluded.expires_at, record = excluded.record",
            params![t.id.0, t.name.clone(), t.owner.clone(), t.created_at, t.expires_at, record(t)],
        );
        Ok(())
    }

    pub async fn delete_tailnet(&mut self, id: TailnetId) -> Result<()> {
        // Nodes, sessions, keys, rules, policy versions, upstream keys and the gateway cascade.
        self.queue("DELETE FROM tailnets WHERE id = $1", params![id.0]);
        self.hints.lock().unwrap().remove(&id);
        Ok(())
    }

    pub async fn node(&mut self, id: NodeId) -> Result<Option<Node>> {
        self.one("SELECT record FROM nodes WHERE id = $1", &[&id.0], "node").await
    }

    pub async fn nodes_of(&mut self, tailnet: TailnetId) -> Result<Vec<Node>> {
        self.many("SELECT record FROM nodes WHERE tailnet_id = $1 ORDER BY id", &[&tailnet.0], "node").await
    }

    pub async fn all_nodes(&mut self) -> Result<Vec<Node>> {
        self.many("SELECT record FROM nodes ORDER BY id", &[], "node").await
    }

    pub async fn node_by_session(&mut self, hash: &SecretHash) -> Result<Option<Node>> {
        let hash: &[u8] = hash;
        self.one(
            "SELECT n.record FROM sessions s JOIN nodes n ON n.id = s.node_id WHERE s.token_hash = $1",
            &[&hash],
            "node",
        )
        .await
    }

    pub async fn hostname_taken(&mut self, tailnet: TailnetId, hostname: &str) -> Result<bool> {
        let rows =
            self.query("SELECT 1 FROM nodes WHERE tailnet_id = $1 AND hostname = $2", &[&tailnet.0, &hostname]).await?;
        Ok(!rows.is_empty())
    }

    pub async fn placement(
        &mut self,
        tailnet: TailnetId,
        key: &[u8; 32],
        hostname: &str,
        first: u32,
        last: u32,
    ) -> Result<Placement> {
        let begin = std::mem::take(&mut self.unbegun);
        let first = self.hints.lock().unwrap().get(&tailnet).map_or(first, |h| (*h).max(first));
        let client = self.client();
        let by_key = client
            .prepare_cached("SELECT record FROM nodes WHERE tailnet_id = $1 AND wireguard_key = $2")
            .await
            .map_err(db)?;
        let free = client.prepare_cached(FREE_ADDRESS).await.map_err(db)?;
        let taken =
            client.prepare_cached("SELECT 1 FROM nodes WHERE tailnet_id = $1 AND hostname = $2").await.map_err(db)?;
        let key: &[u8] = key;
        let (first, last) = (i64::from(first), i64::from(last));
        let begin = async {
            if begin {
                client.batch_execute("BEGIN").await?;
            }
            Ok(())
        };
        // Three independent reads, pipelined: one round trip.
        let (_, existing, free, taken) = futures::future::try_join4(
            begin,
            client.query(&by_key, &[&tailnet.0, &key]),
            client.query(&free, &[&tailnet.0, &first, &last]),
            client.query(&taken, &[&tailnet.0, &hostname]),
        )
        .await
        .map_err(db)?;
        if let Some(row) = existing.first() {
            return Ok(Placement::Existing(Box::new(decode(row, "node")?)));
        }
        let address = free.first().map(|r| r.get::<_, i64>(0) as u32);
        if let Some(a) = address {
            self.hints.lock().unwrap().insert(tailnet, a + 1);
        }
        Ok(Placement::New { address: address.map(Ipv4Addr::from), hostname_taken: !taken.is_empty() })
    }

    pub async fn put_node(&mut self, n: &Node, _replaced: Option<&Node>) -> Result<()> {
        self.queue(
            "INSERT INTO nodes (id, tailnet_id, address, hostname, wireguard_key, expires_at, record) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET address = excluded.address, \
             hostname = excluded.hostname, wireguard_key = excluded.wireguard_key, \
             expires_at = excluded.expires_at, record = excluded.record",
            params![
                n.id.0,
                n.tailnet_id.0,
                address(n.address),
                n.hostname.clone(),
                n.wireguard_public_key.to_vec(),
                n.expires_at,
                record(n)
            ],
        );
        if n.session_hash != [0; 32] {
            self.queue(
                "INSERT INTO sessions (token_hash, node_id) VALUES ($1, $2) \
                 ON CONFLICT (node_id) DO UPDATE SET token_hash = excluded.token_hash",
                params![n.session_hash.to_vec(), n.id.0],
            );
        }
        Ok(())
    }

    pub async fn delete_node(&mut self, n: &Node) -> Result<()> {
        self.queue("DELETE FROM nodes WHERE id = $1", params![n.id.0]);
        if let Some(hint) = self.hints.lock().unwrap().get_mut(&n.tailnet_id) {
            *hint = (*hint).min(u32::from(n.address));
        }
        Ok(())
    }

    pub async fn auth_key(&mut self, id: AuthKeyId) -> Result<Option<AuthKey>> {
        let sql = format!("SELECT record FROM auth_keys WHERE id = $1{}", self.lock());
        self.one(&sql, &[&id.0], "auth key").await
    }

    pub async fn auth_key_by_secret(&mut self, hash: &SecretHash) -> Result<Option<AuthKey>> {
        let hash: &[u8] = hash;
        if !self.write {
            return self.one("SELECT record FROM auth_keys WHERE secret_hash = $1", &[&hash], "auth key").await;
        }
        // A writer that admits with the key goes on to its tailnet: both rows locked in one round trip,
        // the key's first (the lock order every writer keeps).
        let rows = self
            .query(
                "SELECT k.record, t.record FROM auth_keys k JOIN tailnets t ON t.id = k.tailnet_id \
                 WHERE k.secret_hash = $1 FOR UPDATE OF k, t",
                &[&hash],
            )
            .await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let corrupt = |e: tokio_postgres::Error| Error::Corrupt { key: "auth key".into(), detail: e.to_string() };
        let key: Json<AuthKey> = row.try_get(0).map_err(corrupt)?;
        let tailnet: Json<Tailnet> = row.try_get(1).map_err(corrupt)?;
        self.locked_tailnet = Some(tailnet.0);
        Ok(Some(key.0))
    }

    pub async fn auth_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<AuthKey>> {
        let sql = format!("SELECT record FROM auth_keys WHERE tailnet_id = $1 ORDER BY id{}", self.lock());
        self.many(&sql, &[&tailnet.0], "auth key").await
    }

    pub async fn put_auth_key(&mut self, k: &AuthKey) -> Result<()> {
        self.queue(
            "INSERT INTO auth_keys (id, tailnet_id, secret_hash, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            params![k.id.0, k.tailnet_id.0, k.secret_hash.to_vec(), record(k)],
        );
        Ok(())
    }

    pub async fn admin_tokens(&mut self) -> Result<Vec<crate::model::AdminToken>> {
        self.many("SELECT record FROM admin_tokens ORDER BY id", &[], "admin token").await
    }

    pub async fn put_admin_token(&mut self, t: &crate::model::AdminToken) -> Result<()> {
        self.queue(
            "INSERT INTO admin_tokens (id, name, secret_hash, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            params![t.id.0, t.name.clone(), t.secret_hash.to_vec(), record(t)],
        );
        Ok(())
    }

    pub async fn webhooks(&mut self) -> Result<Vec<crate::model::Webhook>> {
        self.many("SELECT record FROM webhooks ORDER BY id", &[], "webhook").await
    }

    pub async fn put_webhook(&mut self, w: &crate::model::Webhook) -> Result<()> {
        self.queue(
            "INSERT INTO webhooks (id, record) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            params![w.id.0, record(w)],
        );
        Ok(())
    }

    pub async fn delete_webhook(&mut self, id: crate::model::WebhookId) -> Result<()> {
        self.queue("DELETE FROM webhooks WHERE id = $1", params![id.0]);
        Ok(())
    }

    pub async fn deliveries_of(
        &mut self,
        id: crate::model::WebhookId,
        limit: usize,
    ) -> Result<Vec<crate::model::Delivery>> {
        let mut newest: Vec<crate::model::Delivery> = self
            .many(
                "SELECT record FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY revision DESC LIMIT $2",
                &[&id.0, &(limit as i64)],
                "webhook delivery",
            )
            .await?;
        newest.reverse();
        Ok(newest)
    }

    pub async fn put_delivery(&mut self, d: &crate::model::Delivery) -> Result<()> {
        self.queue(
            "INSERT INTO webhook_deliveries (webhook_id, revision, record) VALUES ($1, $2, $3) \
             ON CONFLICT (webhook_id, revision) DO UPDATE SET record = excluded.record",
            params![d.webhook_id.0, d.revision as i64, record(d)],
        );
        Ok(())
    }

    pub async fn admin_trust_rules(&mut self) -> Result<Vec<crate::model::AdminTrustRule>> {
        self.many("SELECT record FROM admin_trust_rules ORDER BY id", &[], "admin trust rule").await
    }

    pub async fn put_admin_trust_rule(&mut self, r: &crate::model::AdminTrustRule) -> Result<()> {
        self.queue(
            "INSERT INTO admin_trust_rules (id, issuer, record) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET issuer = excluded.issuer, record = excluded.record",
            params![r.id.0, r.issuer.clone(), record(r)],
        );
        Ok(())
    }

    pub async fn delete_admin_trust_rule(&mut self, id: crate::model::AdminTrustRuleId) -> Result<()> {
        self.queue("DELETE FROM admin_trust_rules WHERE id = $1", params![id.0]);
        Ok(())
    }

    pub async fn use_token(
        &mut self,
        key: &crate::model::SecretHash,
        expires: SystemTime,
        now: SystemTime,
    ) -> Result<bool> {
        // A concurrent use on another replica holds the row's lock until it commits; then this one sees it.
        let rows = self
            .query(
                "INSERT INTO oidc_token_uses (key_hash, expires_at) VALUES ($1, $2) \
                 ON CONFLICT (key_hash) DO UPDATE SET expires_at = excluded.expires_at \
                 WHERE oidc_token_uses.expires_at <= $3 RETURNING 1",
                &[&key.as_slice(), &expires, &now],
            )
            .await?;
        self.queue(
            "DELETE FROM oidc_token_uses WHERE key_hash IN \
             (SELECT key_hash FROM oidc_token_uses WHERE expires_at <= $1 LIMIT 64)",
            params![now],
        );
        Ok(!rows.is_empty())
    }

    pub fn take_gateway_lease(&mut self, tailnet: TailnetId, replica: uuid::Uuid) {
        self.queue("INSERT INTO gateway_leases (tailnet_id, replica_id) VALUES ($1, $2)", params![tailnet.0, replica]);
    }

    pub async fn login_providers(&mut self) -> Result<Vec<crate::model::LoginProvider>> {
        self.many("SELECT record FROM login_providers ORDER BY id", &[], "login provider").await
    }

    pub async fn put_login_provider(&mut self, p: &crate::model::LoginProvider) -> Result<()> {
        self.queue(
            "INSERT INTO login_providers (id, tailnet_id, name, issuer, record) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, issuer = excluded.issuer, record = excluded.record",
            params![p.id.0, p.tailnet_id.map(|t| t.0), p.name.clone(), p.issuer.clone(), record(p)],
        );
        Ok(())
    }

    pub async fn delete_login_provider(&mut self, id: crate::model::LoginProviderId) -> Result<()> {
        self.queue("DELETE FROM login_providers WHERE id = $1", params![id.0]);
        Ok(())
    }

    pub async fn users(&mut self) -> Result<Vec<crate::model::User>> {
        self.many("SELECT record FROM users ORDER BY id", &[], "user").await
    }

    pub async fn user(&mut self, id: crate::model::UserId) -> Result<Option<crate::model::User>> {
        self.one("SELECT record FROM users WHERE id = $1", &[&id.0], "user").await
    }

    pub async fn user_by_subject(&mut self, issuer: &str, subject: &str) -> Result<Option<crate::model::User>> {
        self.one("SELECT record FROM users WHERE issuer = $1 AND subject = $2", &[&issuer, &subject], "user").await
    }

    pub async fn put_user(&mut self, u: &crate::model::User) -> Result<()> {
        self.queue(
            "INSERT INTO users (id, issuer, subject, email, last_login, record) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET email = excluded.email, last_login = excluded.last_login, \
             record = excluded.record",
            params![u.id.0, u.issuer.clone(), u.subject.clone(), u.email.clone(), u.last_login, record(u)],
        );
        Ok(())
    }

    pub async fn delete_user(&mut self, id: crate::model::UserId) -> Result<()> {
        self.queue("DELETE FROM users WHERE id = $1", params![id.0]);
        Ok(())
    }

    pub async fn proposal(&mut self, id: crate::model::ProposalId) -> Result<Option<crate::model::PolicyProposal>> {
        self.one("SELECT record FROM policy_proposals WHERE id = $1", &[&id.0], "policy proposal").await
    }

    pub async fn proposals_of(&mut self, tailnet: TailnetId) -> Result<Vec<crate::model::PolicyProposal>> {
        self.many(
            "SELECT record FROM policy_proposals WHERE tailnet_id = $1 ORDER BY id",
            &[&tailnet.0],
            "policy proposal",
        )
        .await
    }

    pub async fn pending_proposals(&mut self) -> Result<Vec<crate::model::PolicyProposal>> {
        self.many("SELECT record FROM policy_proposals WHERE state = 'pending' ORDER BY id", &[], "policy proposal")
            .await
    }

    pub async fn put_proposal(&mut self, p: &crate::model::PolicyProposal) -> Result<()> {
        self.queue(
            "INSERT INTO policy_proposals (id, tailnet_id, state, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record",
            params![p.id.0, p.tailnet_id.0, p.state.name().to_string(), record(p)],
        );
        Ok(())
    }

    pub async fn trust_rule(&mut self, id: TrustRuleId) -> Result<Option<TrustRule>> {
        self.one("SELECT record FROM trust_rules WHERE id = $1", &[&id.0], "trust rule").await
    }

    pub async fn trust_rules_of(&mut self, tailnet: TailnetId) -> Result<Vec<TrustRule>> {
        self.many("SELECT record FROM trust_rules WHERE tailnet_id = $1 ORDER BY id", &[&tailnet.0], "trust rule").await
    }

    pub async fn trust_rules_for(&mut self, issuer: &str) -> Result<Vec<TrustRule>> {
        self.many("SELECT record FROM trust_rules WHERE issuer = $1 ORDER BY id", &[&issuer], "trust rule").await
    }

    pub async fn put_trust_rule(&mut self, r: &TrustRule) -> Result<()> {
        self.queue(
            "INSERT INTO trust_rules (id, tailnet_id, issuer, record) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET issuer = excluded.issuer, record = excluded.record",
            params![r.id.0, r.spec.tailnet_id.0, r.spec.issuer.clone(), record(r)],
        );
        Ok(())
    }

    pub async fn delete_trust_rule(&mut self, r: &TrustRule) -> Result<()> {
        self.queue("DELETE FROM trust_rules WHERE id = $1", params![r.id.0]);
        Ok(())
    }

    pub async fn policy(&mut self, tailnet: TailnetId, version: u64) -> Result<Option<PolicyRecord>> {
        self.one(
            "SELECT record FROM policy_versions WHERE tailnet_id = $1 AND version = $2",
            &[&tailnet.0, &(version as i64)],
            "policy version",
        )
        .await
    }

    pub async fn policies_of(&mut self, tailnet: TailnetId) -> Result<Vec<PolicyRecord>> {
        self.many(
            "SELECT record FROM policy_versions WHERE tailnet_id = $1 ORDER BY version",
            &[&tailnet.0],
            "policy version",
        )
        .await
    }

    pub async fn put_policy(&mut self, p: &PolicyRecord) -> Result<()> {
        self.queue(
            "INSERT INTO policy_versions (tailnet_id, version, author, created_at, record) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tailnet_id, version) DO UPDATE SET record = excluded.record",
            params![p.tailnet_id.0, p.version as i64, p.author.clone(), p.created_at, record(p)],
        );
        Ok(())
    }

    pub async fn gateway(&mut self, tailnet: TailnetId) -> Result<Option<(NodeId, [u8; 32])>> {
        let rows = self.query("SELECT node_id, private_key FROM gateways WHERE tailnet_id = $1", &[&tailnet.0]).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let key: Vec<u8> = row.get(1);
        let key: [u8; 32] = key.try_into().map_err(|_| Error::Corrupt {
            key: format!("gateways.private_key of {tailnet}"),
            detail: "not 32 bytes".into(),
        })?;
        Ok(Some((NodeId(row.get(0)), key)))
    }

    pub async fn put_gateway(&mut self, tailnet: TailnetId, node: NodeId, secret: &[u8; 32]) -> Result<()> {
        self.queue(
            "INSERT INTO gateways (tailnet_id, node_id, private_key) VALUES ($1, $2, $3) \
             ON CONFLICT (tailnet_id) DO UPDATE SET node_id = excluded.node_id, private_key = excluded.private_key",
            params![tailnet.0, node.0, secret.to_vec()],
        );
        Ok(())
    }

    pub async fn upstream_key(&mut self, tailnet: TailnetId, name: &str) -> Result<Option<Secret>> {
        let rows = self
            .query("SELECT api_key FROM upstream_keys WHERE tailnet_id = $1 AND name = $2", &[&tailnet.0, &name])
            .await?;
        Ok(rows.first().map(|r| Secret::from_string(r.get(0))))
    }

    pub async fn upstream_keys_of(&mut self, tailnet: TailnetId) -> Result<Vec<(String, Secret)>> {
        let rows = self
            .query("SELECT name, api_key FROM upstream_keys WHERE tailnet_id = $1 ORDER BY name", &[&tailnet.0])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), Secret::from_string(r.get(1)))).collect())
    }

    pub async fn put_upstream_key(&mut self, tailnet: TailnetId, name: &str, key: &Secret) -> Result<()> {
        self.queue(
            "INSERT INTO upstream_keys (tailnet_id, name, api_key) VALUES ($1, $2, $3) \
             ON CONFLICT (tailnet_id, name) DO UPDATE SET api_key = excluded.api_key",
            params![tailnet.0, name.to_string(), key.expose().to_string()],
        );
        Ok(())
    }

    pub async fn events(&mut self, filter: &EventFilter, published: u64) -> Result<(Vec<Event>, bool)> {
        let tailnet = filter.tailnet.map(|t| t.0);
        let node = filter.node.map(|n| n.0);
        let limit = filter.limit as i64 + 1;
        let mut events: Vec<Event> = self
            .many(
                "SELECT record FROM events WHERE revision > $1 AND revision <= $2 \
                 AND ($3::uuid IS NULL OR tailnet_id = $3) AND ($4::uuid IS NULL OR node_id = $4) \
                 AND ($5::timestamptz IS NULL OR time >= $5) AND ($6::timestamptz IS NULL OR time < $6) \
                 ORDER BY revision LIMIT $7",
                &[
                    &(filter.after_revision.min(i64::MAX as u64) as i64),
                    &(published as i64),
                    &tailnet,
                    &node,
                    &filter.since,
                    &filter.until,
                    &limit,
                ],
                "event",
            )
            .await?;
        let more = events.len() > filter.limit;
        events.truncate(filter.limit);
        Ok((events, more))
    }

    const INSERT_EVENT: &'static str = "INSERT INTO events (revision, id, time, kind, tailnet_id, node_id, actor, \
         summary, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

    fn queue_event(&mut self, e: &Event) {
        self.queue(
            Self::INSERT_EVENT,
            params![
                e.revision as i64,
                e.id,
                e.time,
                format!("{:?}", e.kind),
                e.tailnet_id.map(|t| t.0),
                e.node_id.map(|n| n.0),
                e.actor.clone(),
                e.summary.clone(),
                record(e)
            ],
        );
    }

    pub async fn put_events(&mut self, events: &[Event]) -> Result<()> {
        for e in events {
            self.queue_event(e);
        }
        Ok(())
    }

    pub async fn set_revision(&mut self, revision: u64) -> Result<()> {
        self.queue("UPDATE meta SET revision = $1", params![revision as i64]);
        Ok(())
    }

    /// Sends the queued writes and takes the next revisions (the meta row stays locked until commit,
    /// so revisions follow commit order), then writes the events and commits: two round trips and the
    /// WAL flush. Returns the numbered changes.
    pub async fn commit(mut self, pending: Vec<Pending>) -> Result<Vec<Change>> {
        let mut changes = Vec::with_capacity(pending.len());
        let n = pending.len() as i64;
        let take = (n > 0).then(|| ("UPDATE meta SET revision = revision + $1 RETURNING revision", params![n]));
        let rows = self.send_queued(take).await?;
        if let Some(rows) = rows {
            let last = rows
                .first()
                .map(|r| r.get::<_, i64>(0))
                .ok_or_else(|| Error::Corrupt { key: "meta".into(), detail: "the revision row is missing".into() })?;
            let mut revision = (last - n) as u64;
            for p in pending {
                revision += 1;
                changes.push(p.numbered(revision));
            }
            for c in &changes {
                match c {
                    Change::Event(e) => self.queue_event(e),
                    Change::NetMap { tailnet, update } => self.queue(
                        "INSERT INTO changes (revision, tailnet_id, record) VALUES ($1, $2, $3)",
                        params![update.revision as i64, tailnet.0, record(&update.change.stored())],
                    ),
                }
            }
            // Delivered at commit; other replicas then read what they have not published.
            self.queue("SELECT pg_notify('cordon_changes', $1)", params![last.to_string()]);
        }
        self.send_queued(Some(("COMMIT", Vec::new()))).await?;
        self.open = false;
        Ok(changes)
    }
}
