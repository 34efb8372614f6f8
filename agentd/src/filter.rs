//! The node's inbound packet filter. Until the policy issue sends rules, a tailnet allows everything
//! between its nodes ([`PacketFilter::allow_all`]); with rules, anything not allowed is dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// Allows packets from `sources` (address, prefix length; IPv4 or IPv6) with `protocol` to `ports`
/// (ignored for ICMP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub sources: Vec<(IpAddr, u8)>,
    pub protocol: Protocol,
    pub ports: RangeInclusive<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketFilter {
    /// `None` allows everything.
    rules: Option<Vec<Rule>>,
}

impl Default for PacketFilter {
    fn default() -> Self {
        Self::allow_all()
    }
}

fn in_prefix(addr: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// An IP packet's source, protocol number and where its transport header starts. IPv6 extension
/// headers are not walked: a packet that has them is judged by its first next-header (so it matches
/// only rules for any protocol).
fn ip_header(packet: &[u8]) -> Option<(IpAddr, u8, usize)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            Some((IpAddr::V4(source), packet[9], usize::from(packet[0] & 0x0f) * 4))
        }
        6 if packet.len() >= 40 => {
            let source: [u8; 16] = packet[8..24].try_into().ok()?;
            Some((IpAddr::V6(Ipv6Addr::from(source)), packet[6], 40))
        }
        _ => None,
    }
}

impl PacketFilter {
    /// Whether the filter lets everything through (no policy rules).
    pub fn allows_all(&self) -> bool {
        self.rules.is_none()
    }

    pub fn allow_all() -> Self {
        PacketFilter { rules: None }
    }

    pub fn rules(rules: Vec<Rule>) -> Self {
        PacketFilter { rules: Some(rules) }
    }

    /// Whether an inbound IP packet may reach the local stack.
    pub fn allows_inbound(&self, packet: &[u8]) -> bool {
        let Some(rules) = &self.rules else { return true };
        let Some((source, next, header_len)) = ip_header(packet) else { return false };
        let (protocol, port) = match next {
            6 | 17 if packet.len() >= header_len + 4 => {
                let port = u16::from_be_bytes([packet[header_len + 2], packet[header_len + 3]]);
                let protocol = if next == 6 { Protocol::Tcp } else { Protocol::Udp };
                // Replies to connections this node opened come back from the peer's port.
                if protocol == Protocol::Tcp && is_tcp_reply(&packet[header_len..]) {
                    return true;
                }
                (protocol, Some(port))
            }
            1 | 58 => (Protocol::Icmp, None),
            _ => (Protocol::Any, None),
        };
        rules.iter().any(|r| {
            r.sources.iter().any(|s| in_prefix(source, *s))
                && (r.protocol == Protocol::Any || r.protocol == protocol)
                && port.is_none_or(|p| r.ports.contains(&p))
        })
    }
}

/// UDP flows this node opened, so that their answers pass a filter that would not let the peer start
/// one (TCP answers pass by their flags; UDP has none). Like a stateful firewall's table: an entry
/// lives [`UDP_FLOW_TIMEOUT`] past the last datagram sent on it.
#[derive(Debug, Default)]
pub struct UdpFlows {
    /// (peer address, peer port, local port) -> when the entry expires.
    flows: HashMap<(IpAddr, u16, u16), Instant>,
}

const UDP_FLOW_TIMEOUT: Duration = Duration::from_secs(120);
/// Entries kept at most; a node opening more flows than this at once sees some answers filtered.
const UDP_FLOWS_MAX: usize = 16_384;

/// A UDP packet's (source, source port, destination, destination port).
fn udp_ends(packet: &[u8]) -> Option<(IpAddr, u16, IpAddr, u16)> {
    let (source, next, header_len) = ip_header(packet)?;
    if next != 17 || packet.len() < header_len + 4 {
        return None;
    }
    let destination = match source {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19])),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?)),
    };
    let port = |i: usize| u16::from_be_bytes([packet[header_len + i], packet[header_len + i + 1]]);
    Some((source, port(0), destination, port(2)))
}

impl UdpFlows {
    /// Notes an outbound packet (anything but UDP is ignored).
    pub fn note_outbound(&mut self, packet: &[u8], now: Instant) {
        let Some((_, local_port, peer, peer_port)) = udp_ends(packet) else { return };
        if self.flows.len() >= UDP_FLOWS_MAX && !self.flows.contains_key(&(peer, peer_port, local_port)) {
            self.flows.retain(|_, expires| *expires > now);
            if self.flows.len() >= UDP_FLOWS_MAX {
                return;
            }
        }
        self.flows.insert((peer, peer_port, local_port), now + UDP_FLOW_TIMEOUT);
    }

    /// Whether an inbound packet answers a flow this node opened.
    pub fn is_answer(&self, packet: &[u8], now: Instant) -> bool {
        let Some((peer, peer_port, _, local_port)) = udp_ends(packet) else { return false };
        self.flows.get(&(peer, peer_port, local_port)).is_some_and(|expires| *expires > now)
    }
}

/// A TCP segment with ACK or RST set belongs to an existing connection: one that no local socket knows
/// is answered with a reset (or ignored) by the stack, so it cannot open anything. Resets must pass: a
/// peer that lost a connection (a restarted gateway) says so with a bare RST, and dropping it would leave
/// the local end retrying into the void.
fn is_tcp_reply(tcp: &[u8]) -> bool {
    tcp.len() >= 14 && tcp[13] & 0x14 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_packet(src: [u8; 4], dst_port: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[22..24].copy_from_slice(&dst_port.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn rules_allow_only_what_they_name() {
        let f = PacketFilter::rules(vec![Rule {
            sources: vec![(Ipv4Addr::new(100, 64, 0, 0).into(), 24)],
            protocol: Protocol::Tcp,
            ports: 80..=80,
        }]);
        assert!(f.allows_inbound(&tcp_packet([100, 64, 0, 9], 80, 0x02)));
        assert!(!f.allows_inbound(&tcp_packet([100, 64, 0, 9], 22, 0x02)));
        assert!(!f.allows_inbound(&tcp_packet([100, 64, 1, 9], 80, 0x02)));
        assert!(f.allows_inbound(&tcp_packet([100, 64, 1, 9], 22, 0x10)), "replies pass");
        assert!(f.allows_inbound(&tcp_packet([100, 64, 1, 9], 22, 0x04)), "and resets");
        assert!(!f.allows_inbound(&tcp_packet([100, 64, 1, 9], 22, 0x01)), "a bare FIN does not");
        assert!(!f.allows_inbound(&[0u8; 3]));
        assert!(PacketFilter::allow_all().allows_inbound(&tcp_packet([1, 2, 3, 4], 1, 0x02)));
    }

    fn udp_packet(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&dst_port.to_be_bytes());
        p
    }

    #[test]
    fn udp_answers_pass_only_for_flows_this_node_opened() {
        let (me, peer) = ([100, 64, 0, 2], [100, 64, 0, 3]);
        let mut flows = UdpFlows::default();
        let now = Instant::now();
        assert!(!flows.is_answer(&udp_packet(peer, 53, me, 40000), now));
        flows.note_outbound(&udp_packet(me, 40000, peer, 53), now);
        assert!(flows.is_answer(&udp_packet(peer, 53, me, 40000), now));
        assert!(!flows.is_answer(&udp_packet(peer, 54, me, 40000), now), "another peer port");
        assert!(!flows.is_answer(&udp_packet(peer, 53, me, 40001), now), "another local port");
        assert!(!flows.is_answer(&udp_packet([100, 64, 0, 4], 53, me, 40000), now), "another peer");
        assert!(!flows.is_answer(&udp_packet(peer, 53, me, 40000), now + UDP_FLOW_TIMEOUT), "expired");
        assert!(!flows.is_answer(&tcp_packet(peer, 40000, 0x02), now), "not UDP");
    }

    fn tcp6_packet(src: Ipv6Addr, dst_port: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = 6;
        p[8..24].copy_from_slice(&src.octets());
        p[42..44].copy_from_slice(&dst_port.to_be_bytes());
        p[53] = flags;
        p
    }

    #[test]
    fn ipv6_sources_match_only_ipv6_rules() {
        let net: Ipv6Addr = "fd00:1:2::6440:0".parse().unwrap();
        let f = PacketFilter::rules(vec![
            Rule { sources: vec![(net.into(), 120)], protocol: Protocol::Tcp, ports: 80..=80 },
            Rule { sources: vec![(Ipv4Addr::new(0, 0, 0, 0).into(), 0)], protocol: Protocol::Any, ports: 0..=65535 },
        ]);
        let inside: Ipv6Addr = "fd00:1:2::6440:9".parse().unwrap();
        let outside: Ipv6Addr = "fd00:1:2::6440:109".parse().unwrap();
        assert!(f.allows_inbound(&tcp6_packet(inside, 80, 0x02)));
        assert!(!f.allows_inbound(&tcp6_packet(inside, 22, 0x02)));
        assert!(!f.allows_inbound(&tcp6_packet(outside, 80, 0x02)), "an IPv4 rule for 0.0.0.0/0 is not an IPv6 one");
        assert!(f.allows_inbound(&tcp6_packet(outside, 22, 0x10)), "replies pass");
        assert!(!f.allows_inbound(&tcp6_packet(inside, 80, 0x02)[..39]));
    }
}
