//! One node's view of its tailnet under the policy: the peers it may see and the packet filter it
//! enforces, kept current change by change. A join costs each watcher one pass over the grants; only a
//! new policy (or a change to the node itself) recomputes the view, and a view that did not change
//! sends nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::hub::NetChange;
use crate::model::{Node, NodeId, Tailnet};
use crate::policy::{FilterRule, Membership, Policy, Selector, Subject};

/// The inbound rule a grant gives this node, with the sources it currently allows.
#[derive(Clone, Debug, PartialEq)]
struct GrantRule {
    grant: usize,
    any: bool,
    sources: BTreeSet<Ipv4Addr>,
}

/// What a change means for this node.
#[derive(Debug, Default)]
pub struct ViewDelta {
    pub added: Vec<Arc<Node>>,
    pub updated: Vec<Arc<Node>>,
    pub removed: Vec<NodeId>,
    pub me: Option<Arc<Node>>,
    pub filter_changed: bool,
}

impl ViewDelta {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.me.is_none()
            && !self.filter_changed
    }
}

pub struct NetView {
    policy: Arc<Policy>,
    me: Arc<Node>,
    me_id: String,
    others: HashMap<NodeId, (Arc<Node>, String)>,
    visible: BTreeSet<NodeId>,
    rules: Vec<GrantRule>,
    membership: Membership,
    network: (Ipv4Addr, u8),
    gateway: Ipv4Addr,
}

fn subject<'a>(node: &'a Node, id: &'a str) -> Subject<'a> {
    node.subject(id)
}

impl NetView {
    pub fn new(policy: Arc<Policy>, me: Node, peers: Vec<Node>, tailnet: &Tailnet) -> NetView {
        let me_id = me.id.to_string();
        let others = peers.into_iter().map(|p| (p.id, (Arc::new(p.clone()), p.id.to_string()))).collect();
        let mut view = NetView {
            policy,
            me: Arc::new(me),
            me_id,
            others,
            visible: BTreeSet::new(),
            rules: Vec::new(),
            membership: Membership { src: vec![], dst: vec![] },
            network: (tailnet.cidr.network, tailnet.cidr.prefix),
            gateway: tailnet.cidr.gateway(),
        };
        view.recompute();
        view
    }

    pub fn me(&self) -> &Node {
        &self.me
    }

    /// The id of the tailnet's gateway, if this view has seen it.
    pub fn gateway_id(&self) -> Option<NodeId> {
        self.others.values().find(|(n, _)| n.gateway).map(|(n, _)| n.id)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Node> {
        self.visible.iter().filter_map(|id| self.others.get(id).map(|(n, _)| n.as_ref()))
    }

    /// `None` = accept everything (the default policy).
    pub fn filter(&self) -> Option<Vec<FilterRule>> {
        if !self.policy.explicit {
            return None;
        }
        let mut out = Vec::new();
        for rule in &self.rules {
            let grant = &self.policy.grants[rule.grant];
            let mut sources: Vec<(Ipv4Addr, u8)> =
                if rule.any { vec![self.network] } else { rule.sources.iter().map(|a| (*a, 32)).collect() };
            if !rule.any && grant.src.contains(&Selector::Gateway) {
                sources.push((self.gateway, 32));
            }
            if sources.is_empty() {
                continue;
            }
            for ports in &grant.ip {
                out.push(FilterRule { sources: sources.clone(), ports: *ports });
            }
        }
        Some(out)
    }

    fn recompute(&mut self) {
        let me = subject(&self.me, &self.me_id);
        self.membership = self.policy.membership(&me);
        self.rules = self
            .policy
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.ip.is_empty() && g.dst.iter().any(|s| self.policy.matches(s, &me)))
            .map(|(i, g)| GrantRule { grant: i, any: g.src.contains(&Selector::Any), sources: BTreeSet::new() })
            .collect();
        let ids: Vec<NodeId> = self.others.keys().copied().collect();
        self.visible.clear();
        for id in ids {
            self.admit(id);
        }
    }

    /// Adds an already-stored node to the visible set and to the sources of the rules it matches.
    fn admit(&mut self, id: NodeId) -> bool {
        let Some((node, node_id)) = self.others.get(&id) else { return false };
        if !self.policy.explicit {
            self.visible.insert(id);
            return false;
        }
        let them = self.policy.membership_cached(&subject(node, node_id));
        if self.membership.meets(&them) {
            self.visible.insert(id);
        }
        let mut filter_changed = false;
        for rule in &mut self.rules {
            if !rule.any && them.in_src(rule.grant) {
                filter_changed |= rule.sources.insert(node.address);
            }
        }
        filter_changed
    }

    /// Drops a node from the visible set and the rules; returns (was visible, filter changed).
    fn forget(&mut self, id: NodeId) -> (bool, bool) {
        let was_visible = self.visible.remove(&id);
        let mut filter_changed = false;
        if let Some((node, _)) = self.others.remove(&id) {
            for rule in &mut self.rules {
                filter_changed |= rule.sources.remove(&node.address);
            }
        }
        (was_visible, filter_changed)
    }

    fn upsert(&mut self, node: Arc<Node>, delta: &mut ViewDelta) {
        let id = node.id;
        let (was_visible, f1) = self.forget(id);
        self.others.insert(id, (node.clone(), id.to_string()));
        let f2 = self.admit(id);
        let now_visible = self.visible.contains(&id);
        match (was_visible, now_visible) {
            (false, true) => delta.added.push(node),
            (true, true) => delta.updated.push(node),
            (true, false) => delta.removed.push(id),
            (false, false) => {}
        }
        delta.filter_changed |= f1 || f2;
    }

    /// Applies one change. Returns what this node must be told (possibly nothing).
    pub fn apply(&mut self, change: &NetChange) -> ViewDelta {
        let mut delta = ViewDelta::default();
        match change {
            NetChange::PeerAdded(n) | NetChange::PeerUpdated(n) if n.id == self.me.id => {
                let before = (self.visible.clone(), self.filter());
                self.me = n.clone();
                self.recompute();
                self.diff_into(before, &mut delta);
                delta.me = Some(n.clone());
            }
            NetChange::PeerAdded(n) | NetChange::PeerUpdated(n) => self.upsert(n.clone(), &mut delta),
            NetChange::PeerRemoved { node, .. } => {
                let (was_visible, filter_changed) = self.forget(*node);
                if was_visible {
                    delta.removed.push(*node);
                }
                delta.filter_changed |= filter_changed;
            }
            NetChange::PolicyChanged { policy, updated } => {
                let before = (self.visible.clone(), self.filter());
                for n in updated {
                    if n.id == self.me.id {
                        self.me = n.clone();
                        delta.me = Some(n.clone());
                    } else if let Some(entry) = self.others.get_mut(&n.id) {
                        *entry = (n.clone(), n.id.to_string());
                        if before.0.contains(&n.id) {
                            delta.updated.push(n.clone());
                        }
                    }
                }
                self.policy = policy.clone();
                self.recompute();
                self.diff_into(before, &mut delta);
            }
            NetChange::TailnetGone { .. } => {}
        }
        delta
    }

    fn diff_into(&self, (visible, filter): (BTreeSet<NodeId>, Option<Vec<FilterRule>>), delta: &mut ViewDelta) {
        for id in self.visible.difference(&visible) {
            if let Some((n, _)) = self.others.get(id) {
                delta.added.push(n.clone());
            }
        }
        delta.removed.extend(visible.difference(&self.visible).copied());
        delta.updated.retain(|n| self.visible.contains(&n.id) && visible.contains(&n.id));
        delta.filter_changed |= filter != self.filter();
    }
}
