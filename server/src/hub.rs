//! Fan-out of committed changes to the streams that watch them: audit events to WatchEvents, netmap
//! changes to the WatchNetMap streams of one tailnet. Also who is online.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::model::{EndReason, Event, Node, NodeId, TailnetId};

/// How many netmap changes a slow watcher may fall behind before it is resynchronised with a full map.
const TAILNET_CHANNEL: usize = 1024;
/// How many events a slow WatchEvents stream may fall behind before it replays from the store.
const EVENT_CHANNEL: usize = 4096;

/// A change to what the nodes of one tailnet are told.
#[derive(Clone, Debug)]
pub enum NetChange {
    PeerAdded(Arc<Node>),
    PeerUpdated(Arc<Node>),
    PeerRemoved {
        node: NodeId,
        reason: EndReason,
        message: String,
    },
    TailnetGone {
        reason: EndReason,
        message: String,
    },
    /// A new policy; `updated` are nodes whose records it changed (tags it no longer declares).
    PolicyChanged {
        policy: Arc<crate::policy::Policy>,
        version: u64,
        updated: Vec<Arc<Node>>,
    },
    /// Changes were missed (a replica fell further behind than the database keeps them): every watcher
    /// reloads its view from the store.
    Resync,
}

/// A netmap change as the database keeps it, for the replicas that did not make it. A policy travels
/// as its version; the receiver reads and compiles it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredChange {
    PeerAdded { node: Node },
    PeerUpdated { node: Node },
    PeerRemoved { node: NodeId, reason: EndReason, message: String },
    TailnetGone { reason: EndReason, message: String },
    PolicyChanged { version: u64, updated: Vec<Node> },
    Resync,
}

impl NetChange {
    pub fn stored(&self) -> StoredChange {
        match self {
            NetChange::PeerAdded(n) => StoredChange::PeerAdded { node: (**n).clone() },
            NetChange::PeerUpdated(n) => StoredChange::PeerUpdated { node: (**n).clone() },
            NetChange::PeerRemoved { node, reason, message } => {
                StoredChange::PeerRemoved { node: *node, reason: *reason, message: message.clone() }
            }
            NetChange::TailnetGone { reason, message } => {
                StoredChange::TailnetGone { reason: *reason, message: message.clone() }
            }
            NetChange::PolicyChanged { version, updated, .. } => StoredChange::PolicyChanged {
                version: *version,
                updated: updated.iter().map(|n| (**n).clone()).collect(),
            },
            NetChange::Resync => StoredChange::Resync,
        }
    }
}

#[derive(Debug)]
pub struct NetMapUpdate {
    pub revision: u64,
    pub change: NetChange,
}

/// A committed change, published in revision order once it is durable.
#[derive(Debug)]
pub enum Change {
    Event(Arc<Event>),
    NetMap { tailnet: TailnetId, update: Arc<NetMapUpdate> },
}

impl Change {
    pub fn revision(&self) -> u64 {
        match self {
            Change::Event(e) => e.revision,
            Change::NetMap { update, .. } => update.revision,
        }
    }
}

#[derive(Default)]
struct Presence {
    streams: u32,
    last_seen: Option<SystemTime>,
}

pub struct Hub {
    /// The revision of the last published change.
    published: AtomicU64,
    /// The same, for those who wait for a revision to be published.
    published_watch: tokio::sync::watch::Sender<u64>,
    events: broadcast::Sender<Arc<Event>>,
    tailnets: Mutex<HashMap<TailnetId, broadcast::Sender<Arc<NetMapUpdate>>>>,
    presence: Mutex<HashMap<NodeId, Presence>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            published: AtomicU64::new(0),
            published_watch: tokio::sync::watch::channel(0).0,
            events: broadcast::channel(EVENT_CHANNEL).0,
            tailnets: Mutex::default(),
            presence: Mutex::default(),
        }
    }
}

impl Hub {
    pub fn publish(&self, change: Change) {
        let revision = change.revision();
        self.publish_change(change);
        self.published_watch.send_replace(revision);
    }

    fn publish_change(&self, change: Change) {
        self.published.store(change.revision(), Ordering::Release);
        match change {
            Change::Event(event) => {
                let _ = self.events.send(event);
            }
            Change::NetMap { tailnet, update } => {
                let mut tailnets = self.tailnets.lock().unwrap();
                let gone = matches!(update.change, NetChange::TailnetGone { .. });
                if let Some(tx) = tailnets.get(&tailnet)
                    && (tx.send(update).is_err() || gone)
                {
                    tailnets.remove(&tailnet);
                }
            }
        }
    }

    /// At start: everything the store holds is durable, so counts as published.
    pub fn set_published(&self, revision: u64) {
        self.published.store(revision, Ordering::Release);
        self.published_watch.send_replace(revision);
    }

    /// Changes up to `revision` were missed: every netmap watcher reloads its view, and the hub goes on
    /// from there.
    pub fn resync(&self, revision: u64) {
        self.published.store(revision, Ordering::Release);
        let tailnets = self.tailnets.lock().unwrap();
        for tx in tailnets.values() {
            let _ = tx.send(Arc::new(NetMapUpdate { revision, change: NetChange::Resync }));
        }
        drop(tailnets);
        self.published_watch.send_replace(revision);
    }

    /// Completes once `revision` is published.
    pub async fn published_at_least(&self, revision: u64) {
        let mut rx = self.published_watch.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    pub fn published_revision(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    pub fn subscribe_tailnet(&self, tailnet: TailnetId) -> broadcast::Receiver<Arc<NetMapUpdate>> {
        let mut tailnets = self.tailnets.lock().unwrap();
        tailnets.entry(tailnet).or_insert_with(|| broadcast::channel(TAILNET_CHANNEL).0).subscribe()
    }

    /// Records that `node` opened a netmap stream.
    pub fn connect(&self, node: NodeId, now: SystemTime) {
        let mut presence = self.presence.lock().unwrap();
        let p = presence.entry(node).or_default();
        p.streams += 1;
        p.last_seen = Some(now);
    }

    /// Records that one of `node`'s streams ended; returns how many it still holds.
    pub fn disconnect(&self, node: NodeId, now: SystemTime) -> u32 {
        let mut presence = self.presence.lock().unwrap();
        let Some(p) = presence.get_mut(&node) else {
            return 0;
        };
        p.streams = p.streams.saturating_sub(1);
        p.last_seen = Some(now);
        p.streams
    }

    /// Whether the node holds a stream, and when it was last seen connecting or disconnecting.
    pub fn presence(&self, node: NodeId) -> (bool, Option<SystemTime>) {
        let presence = self.presence.lock().unwrap();
        presence.get(&node).map_or((false, None), |p| (p.streams > 0, p.last_seen))
    }

    /// How many nodes hold a netmap stream now.
    pub fn online_nodes(&self) -> usize {
        self.presence.lock().unwrap().values().filter(|p| p.streams > 0).count()
    }

    pub fn forget(&self, node: NodeId) {
        self.presence.lock().unwrap().remove(&node);
    }
}
