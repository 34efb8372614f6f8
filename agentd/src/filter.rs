//! The node's inbound packet filter. Until the policy issue sends rules, a tailnet allows everything
//! between its nodes ([`PacketFilter::allow_all`]); with rules, anything not allowed is dropped.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// Allows packets from `sources` (address, prefix length) with `protocol` to `ports` (ignored for ICMP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub sources: Vec<(Ipv4Addr, u8)>,
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

fn in_prefix(addr: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    u32::from(addr) & mask == u32::from(net) & mask
}

impl PacketFilter {
    pub fn allow_all() -> Self {
        PacketFilter { rules: None }
    }

    pub fn rules(rules: Vec<Rule>) -> Self {
        PacketFilter { rules: Some(rules) }
    }

    /// Whether an inbound IPv4 packet may reach the local stack.
    pub fn allows_inbound(&self, packet: &[u8]) -> bool {
        let Some(rules) = &self.rules else { return true };
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return false;
        }
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let (protocol, port) = match packet[9] {
            6 | 17 if packet.len() >= header_len + 4 => {
                let port = u16::from_be_bytes([packet[header_len + 2], packet[header_len + 3]]);
                let protocol = if packet[9] == 6 { Protocol::Tcp } else { Protocol::Udp };
                // Replies to connections this node opened come back from the peer's port.
                if protocol == Protocol::Tcp && is_tcp_reply(&packet[header_len..]) {
                    return true;
                }
                (protocol, Some(port))
            }
            1 => (Protocol::Icmp, None),
            _ => (Protocol::Any, None),
        };
        rules.iter().any(|r| {
            r.sources.iter().any(|s| in_prefix(source, *s))
                && (r.protocol == Protocol::Any || r.protocol == protocol)
                && port.is_none_or(|p| r.ports.contains(&p))
        })
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
            sources: vec![(Ipv4Addr::new(100, 64, 0, 0), 24)],
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
}
