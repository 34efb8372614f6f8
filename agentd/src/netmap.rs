//! The node's view of its tailnet, kept current from the server's full maps and deltas.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cordon_proto::v1 as pb;

use crate::error::Error;
use crate::filter::{PacketFilter, Protocol, Rule};
use crate::wg::{Key, PeerConfig};

/// One node of the tailnet as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub hostname: String,
    pub key: Key,
    /// Its IPv4 address, then its IPv6 one.
    pub addresses: Vec<IpAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub tags: Vec<String>,
    pub owner: String,
    pub online: bool,
    /// For a node admitted by an OIDC token: issuer, subject and the run's claims.
    pub run: Option<RunIdentity>,
    /// For a node a person logged in: who, with their identity-provider groups.
    pub user: Option<PeerUser>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUser {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunIdentity {
    pub issuer: String,
    pub subject: String,
    pub claims: BTreeMap<String, String>,
}

impl Peer {
    fn from_proto(n: &pb::NodeInfo) -> Option<Peer> {
        Some(Peer {
            id: n.id.clone(),
            hostname: n.hostname.clone(),
            key: n.wireguard_public_key.as_slice().try_into().ok()?,
            addresses: n.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            endpoints: n.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
            tags: n.tags.clone(),
            owner: n.owner.clone(),
            online: n.online,
            run: n.admission.as_ref().and_then(|a| a.run.as_ref()).map(|r| RunIdentity {
                issuer: r.issuer.clone(),
                subject: r.subject.clone(),
                claims: r.claims.clone().into_iter().collect(),
            }),
            user: n.user.as_ref().map(|u| PeerUser {
                id: u.id.clone(),
                email: u.email.clone(),
                display_name: u.display_name.clone(),
                groups: u.groups.clone(),
            }),
        })
    }
}

#[derive(Clone, Debug)]
pub struct NetMap {
    pub revision: u64,
    pub me: Peer,
    pub peers: BTreeMap<String, Peer>,
    /// The tailnet's AI gateway, a peer the server runs (kept apart from `peers`).
    pub gateway_peer: Option<Peer>,
    pub tailnet_id: String,
    pub tailnet_name: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
    /// The tailnet's IPv6 range, when the server gives one.
    pub network6: Option<(Ipv6Addr, u8)>,
    pub gateway: Ipv4Addr,
    /// What this node accepts from its peers.
    pub filter: PacketFilter,
    /// The server's STUN reflector (`host:port`, host possibly empty = the server's), and whether it relays.
    pub stun: String,
    pub relay: bool,
}

/// The netmap's filter in the engine's terms; anything malformed is left out (so denied).
fn filter_from(proto: Option<&pb::PacketFilter>) -> PacketFilter {
    let Some(f) = proto else { return PacketFilter::allow_all() };
    if f.allow_all {
        return PacketFilter::allow_all();
    }
    let rules = f
        .rules
        .iter()
        .map(|r| Rule {
            sources: r
                .sources
                .iter()
                .filter_map(|s| {
                    let (a, p) = s.split_once('/')?;
                    let address: IpAddr = a.parse().ok()?;
                    let bits = if address.is_ipv4() { 32 } else { 128 };
                    Some((address, p.parse().ok().filter(|p| *p <= bits)?))
                })
                .collect(),
            protocol: match r.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "icmp" => Protocol::Icmp,
                _ => Protocol::Any,
            },
            ports: (r.first_port.min(65535) as u16)..=(r.last_port.min(65535) as u16),
        })
        .collect();
    PacketFilter::rules(rules)
}

impl NetMap {
    pub fn from_full(revision: u64, full: &pb::FullNetMap) -> Result<NetMap, Error> {
        let me =
            full.self_.as_ref().and_then(Peer::from_proto).ok_or_else(|| Error::Protocol("no self node".into()))?;
        let (network, prefix) = full
            .cidr
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
            .filter(|(_, p): &(Ipv4Addr, u8)| *p <= 32)
            .ok_or_else(|| Error::Protocol(format!("a bad range {:?}", full.cidr)))?;
        let network6 = full
            .cidr6
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok().filter(|p: &u8| *p <= 128)?)));
        let gateway = full.gateway_address.parse().map_err(|_| Error::Protocol("a bad gateway address".into()))?;
        let peers = full.peers.iter().filter_map(Peer::from_proto).map(|p| (p.id.clone(), p)).collect();
        Ok(NetMap {
            revision,
            me,
            peers,
            gateway_peer: full.gateway.as_ref().and_then(Peer::from_proto),
            tailnet_id: full.tailnet_id.clone(),
            tailnet_name: full.tailnet_name.clone(),
            network,
            prefix,
            network6,
            gateway,
            filter: filter_from(full.filter.as_ref()),
            stun: full.paths.as_ref().map(|p| p.stun_address.clone()).unwrap_or_default(),
            relay: full.paths.as_ref().is_some_and(|p| p.relay),
        })
    }

    pub fn apply(&mut self, revision: u64, delta: &pb::NetMapDelta) {
        self.revision = revision;
        for p in delta.peers_added.iter().chain(&delta.peers_updated).filter_map(Peer::from_proto) {
            self.peers.insert(p.id.clone(), p);
        }
        for id in &delta.peers_removed {
            self.peers.remove(id);
        }
        if let Some(me) = delta.self_.as_ref().and_then(Peer::from_proto) {
            self.me = me;
        }
        if let Some(filter) = &delta.filter {
            self.filter = filter_from(Some(filter));
        }
        if delta.gateway_removed {
            self.gateway_peer = None;
        }
        if let Some(gateway) = delta.gateway.as_ref().and_then(Peer::from_proto) {
            self.gateway_peer = Some(gateway);
        }
        if let Some(paths) = &delta.paths {
            self.stun = paths.stun_address.clone();
            self.relay = paths.relay;
        }
    }

    /// This node's IPv4 address.
    pub fn address(&self) -> Ipv4Addr {
        self.me
            .addresses
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// This node's IPv6 address, with the tailnet's IPv6 prefix length.
    pub fn address6(&self) -> Option<(Ipv6Addr, u8)> {
        let (_, prefix) = self.network6?;
        self.me.addresses.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some((*v6, prefix)),
            IpAddr::V4(_) => None,
        })
    }

    /// What the WireGuard engine should have: one entry per peer.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers
            .values()
            .chain(&self.gateway_peer)
            .map(|p| PeerConfig {
                key: p.key,
                addresses: p.addresses.clone(),
                endpoints: p.endpoints.clone(),
                persistent_keepalive: None,
            })
            .collect()
    }

    /// A peer name (`laptop`, `laptop.<tailnet>`), `gateway`, or an address (IPv6 in brackets or not).
    /// Names resolve to IPv4 addresses.
    pub fn resolve(&self, host: &str) -> Option<IpAddr> {
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = literal.parse() {
            return Some(ip);
        }
        let name = host.strip_suffix(&format!(".{}", self.tailnet_name)).unwrap_or(host);
        if name == "gateway" {
            return Some(IpAddr::V4(self.gateway));
        }
        if name == self.me.hostname {
            return Some(IpAddr::V4(self.address()));
        }
        self.peers.values().find(|p| p.hostname == name).and_then(|p| p.addresses.first().copied())
    }

    pub fn peer_by_address(&self, ip: IpAddr) -> Option<&Peer> {
        self.peers.values().chain(&self.gateway_peer).find(|p| p.addresses.contains(&ip))
    }
}
