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
        // A person's node whose login expired is nobody's peer until they log in again.
        if !node.admitted() {
            return false;
        }
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
            NetChange::PolicyChanged { policy, updated, .. } => {
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
            NetChange::TailnetGone { .. } | NetChange::Resync => {}
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

#[cfg(test)]
mod tests {
    //! The incremental view and the from-scratch compile must agree: after any sequence of joins,
    //! leaves, tag changes and policy changes, each node's view equals what `Policy::compile` says.

    use std::time::{Duration, SystemTime};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::{Ipv4Cidr, TailnetId};
    use crate::policy::CompileNode;

    const POLICIES: &[&str] = &[
        r#"{ "tagOwners": { "tag:a": [], "tag:b": [], "tag:c": [] },
             "grants": [ { "src": ["tag:a"], "dst": ["tag:b"], "ip": ["tcp:22"] },
                         { "src": ["*"], "dst": ["gateway"], "ip": ["tcp:80"] } ] }"#,
        r#"{ "groups": { "group:eng": ["alice@acme.com"] }, "tagOwners": { "tag:a": [], "tag:b": [] },
             "grants": [ { "src": ["group:eng", "tag:a"], "dst": ["tag:a", "tag:b"], "ip": ["*"] },
                         { "src": ["gateway"], "dst": ["tag:b"], "ip": ["udp:53"] },
                         { "src": ["tag:b"], "dst": ["gateway"], "app": { "x.dev/cap": [1] } } ] }"#,
        r#"{ "tagOwners": { "tag:c": [] },
             "grants": [ { "src": ["tag:c"], "dst": ["*"], "ip": ["tcp:443", "icmp"] },
                         { "src": ["bob@acme.com"], "dst": ["tag:c"], "ip": ["tcp:1-1024"] } ] }"#,
    ];
    const TAGS: &[&str] = &["tag:a", "tag:b", "tag:c"];
    const OWNERS: &[&str] = &["alice@acme.com", "bob@acme.com", "carol@acme.com"];

    fn tailnet() -> Tailnet {
        Tailnet {
            id: TailnetId::generate(),
            name: "t".into(),
            owner: "acme".into(),
            labels: Default::default(),
            cidr: Ipv4Cidr::DEFAULT,
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
            ttl_seconds: 0,
            created_by: String::new(),
            node_count: 0,
            policy_version: 0,
            upstreams: vec![],
            approval_required: false,
        }
    }

    fn node(tailnet: &Tailnet, n: u32, tags: Vec<String>, owner: &str, gateway: bool) -> Node {
        Node {
            id: NodeId::generate(),
            tailnet_id: tailnet.id,
            hostname: format!("n{n}"),
            wireguard_public_key: [n as u8; 32],
            address: Ipv4Addr::from(u32::from(tailnet.cidr.network) + n),
            tags,
            owner: owner.into(),
            auth_key_id: None,
            ephemeral: false,
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            session_hash: [0; 32],
            endpoints: vec![],
            trust_rule_id: None,
            identity: None,
            gateway,
            user: None,
        }
    }

    fn random_tags(rng: &mut StdRng) -> Vec<String> {
        TAGS.iter().filter(|_| rng.random_bool(0.35)).map(|t| t.to_string()).collect()
    }

    /// Every node's view, from scratch.
    fn compiled(policy: &Policy, nodes: &[Node], tailnet: &Tailnet) -> HashMap<String, crate::policy::View> {
        let mut sorted: Vec<&Node> = nodes.iter().collect();
        sorted.sort_by_key(|n| n.address);
        let ids: Vec<String> = sorted.iter().map(|n| n.id.to_string()).collect();
        let input: Vec<CompileNode<'_>> =
            sorted.iter().zip(&ids).map(|(n, id)| CompileNode { subject: n.subject(id), address: n.address }).collect();
        policy.compile(&input, (tailnet.cidr.network, tailnet.cidr.prefix), tailnet.cidr.gateway())
    }

    fn check(views: &HashMap<NodeId, NetView>, policy: &Policy, nodes: &[Node], tailnet: &Tailnet, step: &str) {
        let expected = compiled(policy, nodes, tailnet);
        for (id, view) in views {
            let want = &expected[&id.to_string()];
            let peers: BTreeSet<String> = view.peers().map(|p| p.id.to_string()).collect();
            assert_eq!(peers, want.peers, "{step}: peers of {}", view.me().hostname);
            assert_eq!(view.filter(), want.filter, "{step}: filter of {}", view.me().hostname);
        }
    }

    #[test]
    fn incremental_views_equal_the_from_scratch_compile() {
        for seed in 0..60 {
            let mut rng = StdRng::seed_from_u64(seed);
            let tailnet = tailnet();
            let mut policy = Arc::new(Policy::allow_all());
            let mut next = 2u32;
            let gateway = node(&tailnet, 1, vec![crate::model::GATEWAY_TAG.into()], "acme", true);
            let mut nodes = vec![gateway.clone()];
            let mut views = HashMap::from([(gateway.id, NetView::new(policy.clone(), gateway, vec![], &tailnet))]);
            for step in 0..80 {
                let roll = rng.random_range(0..100);
                let (what, change) = if roll < 40 || nodes.len() < 3 {
                    let owner = OWNERS[rng.random_range(0..OWNERS.len())];
                    let tags: Vec<String> =
                        random_tags(&mut rng).into_iter().filter(|t| policy.tag_defined(t)).collect();
                    let joined = node(&tailnet, next, tags, owner, false);
                    next += 1;
                    let view = NetView::new(policy.clone(), joined.clone(), nodes.clone(), &tailnet);
                    views.insert(joined.id, view);
                    nodes.push(joined.clone());
                    ("join", NetChange::PeerAdded(Arc::new(joined)))
                } else if roll < 60 {
                    let i = rng.random_range(1..nodes.len());
                    let gone = nodes.remove(i);
                    views.remove(&gone.id);
                    let message = String::new();
                    (
                        "leave",
                        NetChange::PeerRemoved { node: gone.id, reason: crate::model::EndReason::NodeRemoved, message },
                    )
                } else if roll < 85 {
                    let i = rng.random_range(1..nodes.len());
                    nodes[i].tags = random_tags(&mut rng).into_iter().filter(|t| policy.tag_defined(t)).collect();
                    ("retag", NetChange::PeerUpdated(Arc::new(nodes[i].clone())))
                } else {
                    let text = POLICIES[rng.random_range(0..POLICIES.len())];
                    policy = Arc::new(Policy::parse(text).unwrap());
                    // As the domain does: tags the policy no longer declares leave their nodes.
                    let mut updated = Vec::new();
                    for n in nodes.iter_mut().filter(|n| !n.gateway) {
                        let before = n.tags.len();
                        n.tags.retain(|t| policy.tag_defined(t));
                        if n.tags.len() != before {
                            updated.push(Arc::new(n.clone()));
                        }
                    }
                    ("policy", NetChange::PolicyChanged { policy: policy.clone(), version: 0, updated })
                };
                for view in views.values_mut() {
                    view.apply(&change);
                }
                check(&views, &policy, &nodes, &tailnet, &format!("seed {seed} step {step} ({what})"));
            }
        }
    }
}
