//! The STUN binding exchange (RFC 5389), just enough for endpoint discovery: a node asks the server's
//! reflector from its WireGuard socket and learns the address and port its NAT maps that socket to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const XOR_MAPPED_ADDRESS: [u8; 2] = [0x00, 0x20];

/// Whether a datagram is STUN rather than WireGuard (STUN carries the magic cookie at bytes 4..8).
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= 20 && packet[0] & 0xc0 == 0 && packet[4..8] == MAGIC
}

pub fn request(transaction: [u8; 12]) -> Vec<u8> {
    let mut p = Vec::with_capacity(20);
    p.extend_from_slice(&BINDING_REQUEST);
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&transaction);
    p
}

/// The transaction id of a binding request.
pub fn parse_request(packet: &[u8]) -> Option<[u8; 12]> {
    (is_stun(packet) && packet[0..2] == BINDING_REQUEST).then(|| packet[8..20].try_into().expect("12 bytes"))
}

/// A binding success response telling the requester it was seen at `addr`.
pub fn response(transaction: [u8; 12], addr: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8, if addr.is_ipv4() { 1 } else { 2 }];
    value.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => value.extend(ip.octets().iter().zip(MAGIC).map(|(a, m)| a ^ m)),
        IpAddr::V6(ip) => {
            let mask: Vec<u8> = MAGIC.iter().chain(&transaction).copied().collect();
            value.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
    let mut p = Vec::with_capacity(20 + 4 + value.len());
    p.extend_from_slice(&BINDING_SUCCESS);
    p.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&transaction);
    p.extend_from_slice(&XOR_MAPPED_ADDRESS);
    p.extend_from_slice(&(value.len() as u16).to_be_bytes());
    p.extend_from_slice(&value);
    p
}

/// The transaction id and mapped address of a binding success response.
pub fn parse_response(packet: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    if !is_stun(packet) || packet[0..2] != BINDING_SUCCESS {
        return None;
    }
    let transaction: [u8; 12] = packet[8..20].try_into().ok()?;
    let mut attrs = packet.get(20..)?;
    while attrs.len() >= 4 {
        let kind = [attrs[0], attrs[1]];
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + len)?;
        if kind == XOR_MAPPED_ADDRESS && value.len() >= 8 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
            let ip = match value[1] {
                1 => {
                    let mut octets = [0u8; 4];
                    for (i, o) in octets.iter_mut().enumerate() {
                        *o = value[4 + i] ^ MAGIC[i];
                    }
                    IpAddr::V4(Ipv4Addr::from(octets))
                }
                2 if value.len() >= 20 => {
                    let mask: Vec<u8> = MAGIC.iter().chain(&transaction).copied().collect();
                    let bytes: Vec<u8> = value[4..20].iter().zip(mask).map(|(a, m)| a ^ m).collect();
                    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?))
                }
                _ => return None,
            };
            return Some((transaction, SocketAddr::new(ip, port)));
        }
        attrs = attrs.get(4 + len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let tx = [7u8; 12];
        let req = request(tx);
        assert!(is_stun(&req));
        assert_eq!(parse_request(&req), Some(tx));
        for addr in ["203.0.113.9:41641", "[2001:db8::1]:3478"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_response(&response(tx, addr)), Some((tx, addr)));
        }
        // WireGuard messages are never mistaken for STUN.
        assert!(!is_stun(&[1, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(parse_response(&[0u8; 19]).is_none());
    }
}
