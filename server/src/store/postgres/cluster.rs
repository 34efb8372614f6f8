//! What replicas of one deployment share through PostgreSQL besides the records: the committed
//! changes they each publish, their registrations and heartbeats, gateway leases, where each node's
//! relay and netmap streams are, and the secret they present to each other. Times are the database's
//! (`now()`), so the replicas' clocks do not have to agree.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use uuid::Uuid;

use super::{PgStore, db, decode, pool_error};
use crate::error::{Error, Result};
use crate::hub::StoredChange;
use crate::model::{Event, NodeId, TailnetId};
use crate::secret::Secret;

/// A replica whose heartbeat is older than this is taken for dead.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(3);

/// One committed change read back from the database.
pub enum Committed {
    Event(Box<Event>),
    NetMap(TailnetId, Box<StoredChange>),
}

/// A replica as the database knows it.
#[derive(Clone, Debug)]
pub struct ReplicaRow {
    pub id: Uuid,
    pub advertise: String,
    pub stun_address: String,
    pub started_at: SystemTime,
    pub heartbeat_at: SystemTime,
    pub stopped_at: Option<SystemTime>,
    pub alive: bool,
    pub gateways: u32,
    /// The replica that read this.
    pub answering: bool,
}

/// What one lease round did.
#[derive(Debug, Default)]
pub struct LeaseRound {
    /// Every lease this replica holds now.
    pub held: Vec<TailnetId>,
    /// Replicas that stopped heartbeating without a clean stop, whose presence was handed back.
    pub orphaned_nodes: Vec<NodeId>,
    /// How many gateways this replica should host at most (an even share of all).
    pub fair_share: usize,
    /// The live replica with the lowest id (it delivers the webhooks).
    pub leader: Option<Uuid>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgStore {
    /// A connection of its own, listening for committed changes. Each notification arrives on the
    /// receiver with the last revision its commit took (`None` if unreadable); the connection's loss closes
    /// the channel.
    pub async fn listen(&self) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<Option<u64>>)> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await.map_err(db)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures::StreamExt::next(&mut messages).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().parse().ok()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the PostgreSQL connection that listens for changes");
                        return;
                    }
                }
            }
        });
        client.batch_execute("LISTEN cordon_changes").await.map_err(db)?;
        Ok((client, rx))
    }

    /// The changes committed after `after`, at most `limit` revisions of them, from one snapshot; and the
    /// last revision that snapshot holds (every revision up to it is committed: revisions follow commit
    /// order). A revision with neither an event nor a netmap change was pruned.
    pub async fn committed_after(&self, after: u64, limit: u64) -> Result<(u64, Vec<(u64, Committed)>)> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let head = tx.query_one("SELECT revision FROM meta", &[]).await.map_err(db)?.get::<_, i64>(0) as u64;
        let upto = head.min(after.saturating_add(limit));
        if upto <= after {
            return Ok((head.min(after), Vec::new()));
        }
        let range = [&(after as i64) as &(dyn tokio_postgres::types::ToSql + Sync), &(upto as i64)];
        let events = tx
            .query("SELECT record FROM events WHERE revision > $1 AND revision <= $2 ORDER BY revision", &range)
            .await
            .map_err(db)?;
        let changes = tx
            .query(
                "SELECT revision, tailnet_id, record FROM changes WHERE revision > $1 AND revision <= $2 \
                 ORDER BY revision",
                &range,
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut out = Vec::with_capacity(events.len() + changes.len());
        for row in &events {
            let e: Event = decode(row, "event")?;
            out.push((e.revision, Committed::Event(Box::new(e))));
        }
        for row in &changes {
            let revision = row.get::<_, i64>(0) as u64;
            let tailnet = TailnetId(row.get(1));
            let change: StoredChange = row
                .try_get::<_, tokio_postgres::types::Json<StoredChange>>(2)
                .map(|j| j.0)
                .map_err(|e| Error::Corrupt { key: format!("changes.{revision}"), detail: e.to_string() })?;
            out.push((revision, Committed::NetMap(tailnet, Box::new(change))));
        }
        out.sort_by_key(|(r, _)| *r);
        Ok((upto, out))
    }

    /// Deletes netmap changes older than `age` (every live replica has long published them).
    pub async fn prune_changes(&self, age: Duration) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute("DELETE FROM changes WHERE created_at < now() - make_interval(secs => $1)", &[&secs(age)])
            .await
            .map_err(db)
    }

    /// The secret replicas present to each other; the first replica makes it.
    pub async fn mesh_secret(&self) -> Result<Secret> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let fresh = Secret::generate("cordon-mesh-");
        client
            .execute("INSERT INTO cluster (mesh_secret) VALUES ($1) ON CONFLICT DO NOTHING", &[&fresh.expose()])
            .await
            .map_err(db)?;
        let row = client.query_one("SELECT mesh_secret FROM cluster", &[]).await.map_err(db)?;
        Ok(Secret::from_string(row.get(0)))
    }

    pub async fn register_replica(&self, id: Uuid, advertise: &str, stun: &str) -> Result<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                "INSERT INTO replicas (id, advertise, stun_address, started_at, heartbeat_at) \
                 VALUES ($1, $2, $3, now(), now()) ON CONFLICT (id) DO UPDATE SET advertise = excluded.advertise, \
                 stun_address = excluded.stun_address, started_at = now(), heartbeat_at = now(), stopped_at = NULL",
                &[&id, &advertise, &stun],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Every replica that has not stopped, or stopped within the last hour; newest first.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT r.id, r.advertise, r.stun_address, r.started_at, r.heartbeat_at, r.stopped_at, \
                 r.stopped_at IS NULL AND r.heartbeat_at > now() - make_interval(secs => $1), \
                 (SELECT count(*) FROM gateway_leases l WHERE l.replica_id = r.id) \
                 FROM replicas r \
                 WHERE r.heartbeat_at > now() - interval '1 hour' \
                 ORDER BY r.started_at DESC",
                &[&secs(ALIVE_WITHIN)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                id: r.get(0),
                advertise: r.get(1),
                stun_address: r.get(2),
                started_at: r.get(3),
                heartbeat_at: r.get(4),
                stopped_at: r.get(5),
                alive: r.get(6),
                gateways: r.get::<_, i64>(7) as u32,
                answering: false,
            })
            .collect())
    }

    /// One round of a replica's upkeep, in one transaction: its heartbeat (which keeps all its leases),
    /// the leases of tailnets nobody holds or whose replica stopped or died taken up to an even share of
    /// all gateways, and the presence left by replicas that died handed back.
    pub async fn lease_round(&self, id: Uuid) -> Result<LeaseRound> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        let alive = secs(ALIVE_WITHIN);
        let beat = tx.execute("UPDATE replicas SET heartbeat_at = now() WHERE id = $1", &[&id]).await.map_err(db)?;
        if beat == 0 {
            return Err(Error::Unavailable("this replica's registration is gone from the database".into()));
        }
        let counts = tx
            .query_one(
                "SELECT (SELECT count(*) FROM tailnets), (SELECT count(*) FROM replicas \
                 WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)), \
                 (SELECT min(id::text) FROM replicas \
                 WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1))",
                &[&alive],
            )
            .await
            .map_err(db)?;
        let leader = counts.get::<_, Option<String>>(2).and_then(|s| Uuid::parse_str(&s).ok());
        let (tailnets, replicas) = (counts.get::<_, i64>(0) as usize, (counts.get::<_, i64>(1) as usize).max(1));
        let fair_share = tailnets.div_ceil(replicas);
        let mut held: Vec<TailnetId> = tx
            .query("SELECT tailnet_id FROM gateway_leases WHERE replica_id = $1", &[&id])
            .await
            .map_err(db)?
            .iter()
            .map(|r| TailnetId(r.get(0)))
            .collect();
        if held.len() < fair_share {
            let want = (fair_share - held.len()) as i64;
            let taken = tx
                .query(
                    "INSERT INTO gateway_leases (tailnet_id, replica_id) \
                     SELECT t.id, $1 FROM tailnets t LEFT JOIN gateway_leases l ON l.tailnet_id = t.id \
                     LEFT JOIN replicas r ON r.id = l.replica_id \
                     WHERE l.tailnet_id IS NULL OR r.id IS NULL OR r.stopped_at IS NOT NULL \
                     OR r.heartbeat_at < now() - make_interval(secs => $2) ORDER BY t.id LIMIT $3 \
                     ON CONFLICT (tailnet_id) DO UPDATE SET replica_id = excluded.replica_id \
                     WHERE NOT EXISTS (SELECT 1 FROM replicas h WHERE h.id = gateway_leases.replica_id \
                     AND h.stopped_at IS NULL AND h.heartbeat_at > now() - make_interval(secs => $2)) \
                     RETURNING tailnet_id",
                    &[&id, &alive, &want],
                )
                .await
                .map_err(db)?;
            held.extend(taken.iter().map(|r| TailnetId(r.get(0))));
        }
        // A replica that stopped heartbeating holds no streams any more: its nodes are not present.
        let orphaned = tx
            .query(
                "DELETE FROM presence p USING replicas r WHERE p.replica_id = r.id AND r.stopped_at IS NULL \
                 AND r.heartbeat_at < now() - make_interval(secs => $1) RETURNING p.node_id",
                &[&alive],
            )
            .await
            .map_err(db)?;
        tx.execute(
            "DELETE FROM relay_homes h USING replicas r WHERE h.replica_id = r.id \
             AND (r.stopped_at IS NOT NULL OR r.heartbeat_at < now() - make_interval(secs => $1))",
            &[&alive],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(LeaseRound { held, orphaned_nodes: orphaned.iter().map(|r| NodeId(r.get(0))).collect(), fair_share, leader })
    }

    /// Gives leases back (after their gateways stopped), so another replica takes them at once.
    pub async fn release_leases(&self, id: Uuid, tailnets: &[TailnetId]) -> Result<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let ids: Vec<Uuid> = tailnets.iter().map(|t| t.0).collect();
        client
            .execute("DELETE FROM gateway_leases WHERE replica_id = $1 AND tailnet_id = ANY($2)", &[&id, &ids])
            .await
            .map_err(db)?;
        Ok(())
    }

    /// A clean stop: no leases, no streams, marked stopped.
    pub async fn stop_replica(&self, id: Uuid) -> Result<()> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .batch_execute(&format!(
                "BEGIN; DELETE FROM gateway_leases WHERE replica_id = '{id}'; \
                 DELETE FROM relay_homes WHERE replica_id = '{id}'; \
                 DELETE FROM presence WHERE replica_id = '{id}'; \
                 UPDATE replicas SET stopped_at = now() WHERE id = '{id}'; COMMIT"
            ))
            .await
            .map_err(db)
    }

    pub async fn set_relay_home(&self, tailnet: TailnetId, key: &[u8; 32], replica: Uuid) -> Result<()> {
        self.soft_write(
            "INSERT INTO relay_homes (tailnet_id, public_key, replica_id) VALUES ($1, $2, $3) \
             ON CONFLICT (tailnet_id, public_key) DO UPDATE SET replica_id = excluded.replica_id",
            &[&tailnet.0, &key.as_slice(), &replica],
        )
        .await
    }

    pub async fn clear_relay_home(&self, tailnet: TailnetId, key: &[u8; 32], replica: Uuid) -> Result<()> {
        self.soft_write(
            "DELETE FROM relay_homes WHERE tailnet_id = $1 AND public_key = $2 AND replica_id = $3",
            &[&tailnet.0, &key.as_slice(), &replica],
        )
        .await
    }

    /// One write of state that a crash may lose (where streams are: the replicas rebuild it), committed
    /// without waiting for the WAL flush.
    async fn soft_write(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute("SET LOCAL synchronous_commit = off").await.map_err(db)?;
        tx.execute(sql, params).await.map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// The live replica that holds the relay stream of `key` in `tailnet`, with its advertised URL.
    pub async fn relay_home(&self, tailnet: TailnetId, key: &[u8; 32]) -> Result<Option<(Uuid, String)>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                "SELECT r.id, r.advertise FROM relay_homes h JOIN replicas r ON r.id = h.replica_id \
                 WHERE h.tailnet_id = $1 AND h.public_key = $2 AND r.stopped_at IS NULL \
                 AND r.heartbeat_at > now() - make_interval(secs => $3)",
                &[&tailnet.0, &key.as_slice(), &secs(ALIVE_WITHIN)],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Records that `replica` holds a netmap stream of `node` (`present`), or no longer does.
    pub async fn set_presence(&self, node: NodeId, replica: Uuid, present: bool) -> Result<()> {
        if present {
            self.soft_write(
                "INSERT INTO presence (node_id, replica_id, since) VALUES ($1, $2, now()) \
                 ON CONFLICT (node_id) DO UPDATE SET replica_id = excluded.replica_id, since = excluded.since",
                &[&node.0, &replica],
            )
            .await
        } else {
            self.soft_write("DELETE FROM presence WHERE node_id = $1 AND replica_id = $2", &[&node.0, &replica]).await
        }
    }

    /// Which of `nodes` hold a netmap stream on a live replica.
    pub async fn present(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let ids: Vec<Uuid> = nodes.iter().map(|n| n.0).collect();
        let rows = client
            .query(
                "SELECT p.node_id FROM presence p JOIN replicas r ON r.id = p.replica_id \
                 WHERE p.node_id = ANY($1) AND r.stopped_at IS NULL \
                 AND r.heartbeat_at > now() - make_interval(secs => $2)",
                &[&ids, &secs(ALIVE_WITHIN)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| NodeId(r.get(0))).collect())
    }
}
