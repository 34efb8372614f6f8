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
/// How many netmap changes (all tailnets) are remembered for nodes that resume a stream: seconds to
/// minutes of changes, enough for a node to move to another replica.
const RECENT: usize = 4096;

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

/// Which nodes a published netmap change touched, for resuming streams; `None` = it touched everything
/// (a policy, the tailnet itself, or changes missed).
struct Touch {
    revision: u64,
    tailnet: TailnetId,
    nodes: Option<Vec<NodeId>>,
}

/// The netmap changes published lately: complete after `complete_after`.
#[derive(Default)]
struct Recent {
    complete_after: u64,
    touches: std::collections::VecDeque<Touch>,
}

pub struct Hub {
    recent: Mutex<Recent>,
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
            recent: Mutex::default(),
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
                self.remember(tailnet, &update);
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

    fn remember(&self, tailnet: TailnetId, update: &NetMapUpdate) {
        let nodes = match &update.change {
            NetChange::PeerAdded(n) | NetChange::PeerUpdated(n) => Some(vec![n.id]),
            NetChange::PeerRemoved { node, .. } => Some(vec![*node]),
            NetChange::TailnetGone { .. } | NetChange::PolicyChanged { .. } | NetChange::Resync => None,
        };
        let mut recent = self.recent.lock().unwrap();
        if recent.touches.len() >= RECENT
            && let Some(oldest) = recent.touches.pop_front()
        {
            recent.complete_after = oldest.revision;
        }
        recent.touches.push_back(Touch { revision: update.revision, tailnet, nodes });
    }

    /// The nodes of `tailnet` that changes after `since` up to `until` touched (added, updated or
    /// removed), if the hub remembers all of them and none touched everything. `until` must be published.
    pub fn touched(&self, tailnet: TailnetId, since: u64, until: u64) -> Option<std::collections::HashSet<NodeId>> {
        let recent = self.recent.lock().unwrap();
        if since < recent.complete_after || until > self.published_revision() {
            return None;
        }
        let mut touched = std::collections::HashSet::new();
        for t in recent.touches.iter().filter(|t| t.tailnet == tailnet && t.revision > since && t.revision <= until) {
            touched.extend(t.nodes.as_ref()?);
        }
        Some(touched)
    }

    /// At start: everything the store holds is durable, so counts as published.
    pub fn set_published(&self, revision: u64) {
        self.forget_recent(revision);
        self.published.store(revision, Ordering::Release);
        self.published_watch.send_replace(revision);
    }

    /// Changes up to `revision` were missed: every netmap watcher reloads its view, and the hub goes on
    /// from there.
    pub fn resync(&self, revision: u64) {
        self.forget_recent(revision);
        self.published.store(revision, Ordering::Release);
        let tailnets = self.tailnets.lock().unwrap();
        for tx in tailnets.values() {
            let _ = tx.send(Arc::new(NetMapUpdate { revision, change: NetChange::Resync }));
        }
        drop(tailnets);
        self.published_watch.send_replace(revision);
    }

    /// Nothing before `revision` is remembered any more.
    fn forget_recent(&self, revision: u64) {
        let mut recent = self.recent.lock().unwrap();
        recent.touches.clear();
        recent.complete_after = revision;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(hub: &Hub, tailnet: TailnetId, revision: u64) -> NodeId {
        let node = NodeId::generate();
        let change = NetChange::PeerRemoved { node, reason: EndReason::NodeRemoved, message: String::new() };
        hub.publish(Change::NetMap { tailnet, update: Arc::new(NetMapUpdate { revision, change }) });
        node
    }

    #[test]
    fn resuming_needs_every_change_since_remembered_and_none_touching_everything() {
        let hub = Hub::default();
        hub.set_published(10);
        let (mine, other) = (TailnetId::generate(), TailnetId::generate());
        let first = removed(&hub, mine, 11);
        removed(&hub, other, 12);
        let third = removed(&hub, mine, 13);
        assert_eq!(hub.touched(mine, 10, 13), Some([first, third].into()), "only this tailnet's");
        assert_eq!(hub.touched(mine, 11, 13), Some([third].into()));
        assert_eq!(hub.touched(mine, 13, 13), Some(Default::default()), "up to date");
        assert_eq!(hub.touched(mine, 9, 13), None, "before the hub started");
        assert_eq!(hub.touched(mine, 11, 14), None, "not yet published");

        let policy = NetChange::PolicyChanged {
            policy: Arc::new(crate::policy::Policy::allow_all()),
            version: 2,
            updated: vec![],
        };
        hub.publish(Change::NetMap { tailnet: mine, update: Arc::new(NetMapUpdate { revision: 14, change: policy }) });
        assert_eq!(hub.touched(mine, 13, 14), None, "a policy touches every view");
        assert!(hub.touched(other, 13, 14).is_some(), "of its own tailnet only");

        // Once the oldest are forgotten, resuming from before them is not possible.
        for revision in 15..15 + RECENT as u64 {
            removed(&hub, other, revision);
        }
        let last = 14 + RECENT as u64;
        assert_eq!(hub.touched(mine, 13, last), None);
        assert!(hub.touched(mine, 15, last).is_some());
        hub.resync(last + 1);
        assert_eq!(hub.touched(mine, last, last + 1), None, "a resync forgets everything before it");
    }
}
