//! The access report: for every node of a tailnet, what it may reach and on which ports, which AI
//! gateway rules apply to it, how it was admitted and by whom; for every tag, who may hand it out and
//! what carries it; and the policy version, author and approver all of it comes from.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::SystemTime;

use crate::control_plane::ControlPlane;
use crate::error::{Error, Result};
use crate::model::{KeyState, Node, ProposalState, RunIdentity, TailnetId};
use crate::policy::{CompileNode, Ports, Proto};

/// The capability the gateway reads.
const AI_CAPABILITY: &str = "cordon.dev/cap/ai";

#[derive(Debug)]
pub struct AccessReport {
    pub tailnet_id: TailnetId,
    pub tailnet_name: String,
    pub owner: String,
    pub generated_at: SystemTime,
    pub policy_version: u64,
    pub policy_author: String,
    pub policy_reason: String,
    pub policy_set_at: Option<SystemTime>,
    pub policy_approved_by: String,
    pub nodes: Vec<NodeAccess>,
    pub tags: Vec<TagAccess>,
}

#[derive(Debug)]
pub struct NodeAccess {
    pub node: Node,
    pub admitted_by: String,
    pub admission_created_by: String,
    pub admission_reason: String,
    pub run: Option<RunIdentity>,
    pub online: bool,
    pub last_seen: Option<SystemTime>,
    pub reach: Vec<Reach>,
    pub ai: Vec<serde_json::Value>,
}

#[derive(Debug)]
pub struct Reach {
    pub peer_id: String,
    pub peer_hostname: String,
    pub ports: Vec<String>,
}

#[derive(Debug, Default)]
pub struct TagAccess {
    pub tag: String,
    pub owners: Vec<String>,
    pub nodes: Vec<String>,
    pub auth_keys: Vec<String>,
    pub trust_rules: Vec<String>,
}

/// `tcp:5432`, `udp:53-54`, `icmp`, `*`.
fn ports_text(p: &Ports) -> String {
    let proto = match p.proto {
        Proto::Icmp => return "icmp".into(),
        Proto::Any if p.first == 0 && p.last == u16::MAX => return "*".into(),
        Proto::Any => "*",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    match (p.first, p.last) {
        (0, u16::MAX) => format!("{proto}:*"),
        (a, b) if a == b => format!("{proto}:{a}"),
        (a, b) => format!("{proto}:{a}-{b}"),
    }
}

fn in_prefix(addr: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

pub async fn report(cp: &ControlPlane, tailnet_id: TailnetId) -> Result<AccessReport> {
    let tailnet = cp.get_tailnet(tailnet_id).await?;
    let policy = cp.policy(&tailnet).await?;
    let (record, proposals) = match tailnet.policy_version {
        0 => (None, Vec::new()),
        v => (cp.get_policy(tailnet_id, v).await?, cp.list_proposals(tailnet_id).await?),
    };
    let approved_by = proposals
        .iter()
        .find(|p| p.state == ProposalState::Approved && p.version == tailnet.policy_version)
        .and_then(|p| p.decided_by.clone())
        .unwrap_or_default();
    let mut nodes = cp.list_nodes(tailnet_id).await?;
    nodes.sort_by_key(|n| n.address);
    let keys = cp.list_auth_keys(tailnet_id).await?;
    let rules = cp.list_trust_rules(tailnet_id).await?;

    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    let input: Vec<CompileNode<'_>> =
        nodes.iter().zip(&ids).map(|(n, id)| CompileNode { subject: n.subject(id), address: n.address }).collect();
    let views = policy.compile(&input, (tailnet.cidr.network, tailnet.cidr.prefix), tailnet.cidr.gateway());
    let gateway = nodes.iter().zip(&ids).find(|(n, _)| n.gateway);

    let now = cp.now();
    let mut out = Vec::new();
    for (me, my_id) in nodes.iter().zip(&ids).filter(|(n, _)| !n.gateway) {
        // What `me` may reach: every other node whose inbound filter lets `me`'s address in.
        let mut reach = Vec::new();
        for (peer, peer_id) in nodes.iter().zip(&ids).filter(|(n, _)| n.id != me.id) {
            let view = views.get(peer_id).ok_or_else(|| Error::Storage(format!("no view compiled for {peer_id}")))?;
            let ports: Vec<String> = match &view.filter {
                None => vec!["*".into()],
                Some(rules) => rules
                    .iter()
                    .filter(|r| r.sources.iter().any(|s| in_prefix(me.address, *s)))
                    .map(|r| ports_text(&r.ports))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            if !ports.is_empty() {
                let peer_hostname = peer.hostname.clone();
                reach.push(Reach { peer_id: peer_id.clone(), peer_hostname, ports });
            }
        }
        let ai = match gateway {
            Some((g, g_id)) => policy.capabilities(&me.subject(my_id), &g.subject(g_id), AI_CAPABILITY),
            None => Vec::new(),
        };
        let (admitted_by, admission_created_by, admission_reason) = match (me.auth_key_id, me.trust_rule_id) {
            (Some(k), _) => match keys.iter().find(|key| key.id == k) {
                Some(key) => (format!("auth key {k}"), key.created_by.clone(), key.reason.clone()),
                None => (format!("auth key {k} (deleted)"), String::new(), String::new()),
            },
            (None, Some(r)) => match rules.iter().find(|rule| rule.id == r) {
                Some(rule) => (format!("trust rule {r}"), rule.created_by.clone(), rule.spec.reason.clone()),
                None => (format!("trust rule {r} (deleted)"), String::new(), String::new()),
            },
            (None, None) => ("unknown".into(), String::new(), String::new()),
        };
        let (online, last_seen) = cp.hub().presence(me.id);
        out.push(NodeAccess {
            node: me.clone(),
            admitted_by,
            admission_created_by,
            admission_reason,
            run: me.identity.clone(),
            online,
            last_seen,
            reach,
            ai,
        });
    }

    let mut tags: BTreeMap<String, TagAccess> = BTreeMap::new();
    fn tag<'a>(tags: &'a mut BTreeMap<String, TagAccess>, name: &str) -> &'a mut TagAccess {
        tags.entry(name.to_string()).or_insert_with(|| TagAccess { tag: name.to_string(), ..Default::default() })
    }
    for (name, owners) in &policy.tag_owners {
        tag(&mut tags, name).owners = owners.clone();
    }
    for n in nodes.iter().filter(|n| !n.gateway) {
        for t in &n.tags {
            tag(&mut tags, t).nodes.push(n.hostname.clone());
        }
    }
    for k in keys.iter().filter(|k| k.state(now) == KeyState::Valid) {
        for t in &k.tags {
            tag(&mut tags, t).auth_keys.push(k.id.to_string());
        }
    }
    for r in &rules {
        for t in &r.spec.tags {
            tag(&mut tags, t).trust_rules.push(r.id.to_string());
        }
    }

    Ok(AccessReport {
        tailnet_id,
        tailnet_name: tailnet.name,
        owner: tailnet.owner,
        generated_at: now,
        policy_version: tailnet.policy_version,
        policy_author: record.as_ref().map(|r| r.author.clone()).unwrap_or_default(),
        policy_reason: record.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
        policy_set_at: record.as_ref().map(|r| r.created_at),
        policy_approved_by: approved_by,
        nodes: out,
        tags: tags.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_as_people_write_them() {
        let p = |proto, first, last| ports_text(&Ports { proto, first, last });
        assert_eq!(p(Proto::Tcp, 5432, 5432), "tcp:5432");
        assert_eq!(p(Proto::Udp, 53, 54), "udp:53-54");
        assert_eq!(p(Proto::Icmp, 0, 0), "icmp");
        assert_eq!(p(Proto::Any, 0, u16::MAX), "*");
        assert_eq!(p(Proto::Tcp, 0, u16::MAX), "tcp:*");
    }
}
