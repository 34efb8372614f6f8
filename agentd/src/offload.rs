//! TUN offloads as pure functions: the virtio-net header a TUN device opened with `IFF_VNET_HDR` puts
//! before every packet, segmentation of the large TCP/UDP segments the kernel hands over with TSO/USO
//! into packets that fit the tunnel, and coalescing (GRO) of the tunnel's TCP segments of one flow into
//! large ones for the kernel. No IO here: the TUN shell reads and writes, these functions rewrite bytes.
//!
//! Checksums: a segment the kernel hands over with `NEEDS_CSUM` carries only the pseudo-header sum in
//! its checksum field; every packet that leaves [`segment`] has complete, verifiable checksums. A
//! coalesced packet goes to the kernel with `NEEDS_CSUM` and the pseudo-header sum, as the kernel's own
//! GRO does; its segments were authenticated by WireGuard, so nothing between them can be corrupt.

/// Bytes of the virtio-net header (`struct virtio_net_hdr`, without the mergeable-buffers field).
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Largest IP packet a coalesced segment may grow to.
const MAX_COALESCED: usize = 65_535;

/// The virtio-net header: how a packet was (or is to be) offloaded. Fields in host byte order, as the
/// legacy (non-v1) header that TUN uses on little- and big-endian hosts alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// Why a packet from the TUN device could not be turned into tunnel packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentError {
    Truncated,
    UnsupportedGso(u8),
    BadHeader,
}

/// The one's-complement sum of `data` added to `initial`, folded to 16 bits (not complemented).
pub fn checksum_add(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        sum += u16::from_be_bytes([rest[i], rest[i + 1]]) as u64;
        i += 2;
    }
    if i < rest.len() {
        sum += (rest[i] as u64) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum of an IPv4 or IPv6 packet for a transport segment of `len` bytes.
fn pseudo_header_sum(packet: &[u8], protocol: u8, len: usize) -> u32 {
    let addresses = if packet[0] >> 4 == 4 { &packet[12..20] } else { &packet[8..40] };
    checksum_add(protocol as u32 + len as u32, addresses) as u32
}

/// Writes the complete transport checksum of `packet` (IPv4 or IPv6, TCP or UDP at `l4`).
fn fill_transport_checksum(packet: &mut [u8], l4: usize, protocol: u8) {
    let field = l4 + if protocol == TCP { 16 } else { 6 };
    packet[field..field + 2].copy_from_slice(&[0, 0]);
    let sum = checksum_add(pseudo_header_sum(packet, protocol, packet.len() - l4), &packet[l4..]);
    let mut value = !sum;
    if protocol == UDP && value == 0 {
        value = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
}

fn fill_ipv4_checksum(packet: &mut [u8]) {
    let ihl = ((packet[0] & 0x0f) as usize) * 4;
    packet[10..12].copy_from_slice(&[0, 0]);
    let sum = !checksum_add(0, &packet[..ihl]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The IP header length and transport protocol of an IPv4 or IPv6 packet (IPv6 without extension
/// headers, which TSO does not produce).
fn ip_header(packet: &[u8]) -> Result<(usize, u8), SegmentError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = ((packet[0] & 0x0f) as usize) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Err(SegmentError::BadHeader);
            }
            Ok((ihl, packet[9]))
        }
        Some(6) if packet.len() >= 40 => Ok((40, packet[6])),
        _ => Err(SegmentError::Truncated),
    }
}

fn set_ip_length(packet: &mut [u8], ip_len: usize) {
    if packet[0] >> 4 == 4 {
        let len = packet.len() as u16;
        packet[2..4].copy_from_slice(&len.to_be_bytes());
    } else {
        let len = (packet.len() - ip_len) as u16;
        packet[4..6].copy_from_slice(&len.to_be_bytes());
    }
}

/// Turns one read from an offloading TUN device (`VnetHdr` then the packet) into packets of at most
/// the tunnel's MTU, each with complete checksums, appended to `out`.
pub fn segment(read: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), SegmentError> {
    let hdr = VnetHdr::parse(read).ok_or(SegmentError::Truncated)?;
    let packet = &read[VNET_HDR_LEN..];
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        let mut p = packet.to_vec();
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let (start, offset) = (hdr.csum_start as usize, hdr.csum_offset as usize);
            if start + offset + 2 > p.len() {
                return Err(SegmentError::BadHeader);
            }
            // The field holds the pseudo-header sum: summing it in with the rest completes it.
            let sum = !checksum_add(0, &p[start..]);
            p[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
        }
        out.push(p);
        return Ok(());
    }
    let (ip_len, protocol) = ip_header(packet)?;
    let l4_header = match (gso, protocol) {
        (GSO_TCPV4 | GSO_TCPV6, TCP) => {
            let off = packet.get(ip_len + 12).ok_or(SegmentError::Truncated)?;
            ((off >> 4) as usize) * 4
        }
        (GSO_UDP_L4, UDP) => 8,
        (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _) => return Err(SegmentError::BadHeader),
        (other, _) => return Err(SegmentError::UnsupportedGso(other)),
    };
    let headers = ip_len + l4_header;
    let mss = hdr.gso_size as usize;
    if l4_header < 8 || packet.len() < headers || mss == 0 {
        return Err(SegmentError::BadHeader);
    }
    let payload = &packet[headers..];
    let count = payload.len().div_ceil(mss).max(1);
    let ipv4 = packet[0] >> 4 == 4;
    let first_id = if ipv4 { u16::from_be_bytes([packet[4], packet[5]]) } else { 0 };
    let first_seq =
        u32::from_be_bytes([packet[ip_len + 4], packet[ip_len + 5], packet[ip_len + 6], packet[ip_len + 7]]);
    for (i, chunk) in payload.chunks(mss).enumerate().chain((payload.is_empty()).then_some((0, &[][..]))) {
        let mut p = Vec::with_capacity(headers + chunk.len());
        p.extend_from_slice(&packet[..headers]);
        p.extend_from_slice(chunk);
        set_ip_length(&mut p, ip_len);
        if ipv4 {
            p[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
            fill_ipv4_checksum(&mut p);
        }
        let l4 = ip_len;
        if protocol == TCP {
            let seq = first_seq.wrapping_add((i * mss) as u32);
            p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            // FIN and PSH belong to the last segment, CWR to the first, as the kernel segments.
            let mut flags = p[l4 + 13];
            if i + 1 != count {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                flags &= !TCP_CWR;
            }
            p[l4 + 13] = flags;
        } else {
            let len = (p.len() - l4) as u16;
            p[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
        }
        fill_transport_checksum(&mut p, l4, protocol);
        out.push(p);
    }
    Ok(())
}

/// A TCP segment's place in a flow, for coalescing.
struct TcpView {
    ip_len: usize,
    tcp_len: usize,
    seq: u32,
    flags: u8,
}

fn tcp_view(p: &[u8]) -> Option<TcpView> {
    let (ip_len, protocol) = ip_header(p).ok()?;
    if protocol != TCP || p.len() < ip_len + 20 {
        return None;
    }
    if p[0] >> 4 == 4 {
        // Fragments and packets whose length disagrees with the header are left alone.
        let total = u16::from_be_bytes([p[2], p[3]]) as usize;
        let frag = u16::from_be_bytes([p[6], p[7]]);
        if total != p.len() || frag & 0x3fff != 0 {
            return None;
        }
    } else if u16::from_be_bytes([p[4], p[5]]) as usize + 40 != p.len() {
        return None;
    }
    let tcp_len = ((p[ip_len + 12] >> 4) as usize) * 4;
    if tcp_len < 20 || p.len() < ip_len + tcp_len {
        return None;
    }
    let seq = u32::from_be_bytes([p[ip_len + 4], p[ip_len + 5], p[ip_len + 6], p[ip_len + 7]]);
    Some(TcpView { ip_len, tcp_len, seq, flags: p[ip_len + 13] })
}

/// Whether `next` continues `head` (a run of `segments` segments of `mss` payload bytes each so far)
/// in one flow: same addresses, ports, acknowledgement, window, options and IP fields, the next
/// sequence number, and no flag but ACK (PSH may end the run).
fn continues(head: &[u8], h: &TcpView, mss: usize, next: &[u8], n: &TcpView) -> bool {
    let payload = next.len() - n.ip_len - n.tcp_len;
    if n.ip_len != h.ip_len || n.tcp_len != h.tcp_len || payload == 0 || payload > mss {
        return false;
    }
    if head.len() + payload > MAX_COALESCED {
        return false;
    }
    let ip = h.ip_len;
    let same_ip = if head[0] >> 4 == 4 {
        // Version/IHL, TOS, flags (DF), TTL, protocol, addresses; not the id, length or checksum.
        head[0..2] == next[0..2] && head[6] == next[6] && head[8..10] == next[8..10] && head[12..ip] == next[12..ip]
    } else {
        head[0..4] == next[0..4] && head[6..40] == next[6..40]
    };
    let head_payload = head.len() - ip - h.tcp_len;
    same_ip
        // Ports, then acknowledgement number, then window and urgent pointer, then options.
        && head[ip..ip + 4] == next[ip..ip + 4]
        && head[ip + 8..ip + 12] == next[ip + 8..ip + 12]
        && head[ip + 14..ip + 16] == next[ip + 14..ip + 16]
        && head[ip + 20..ip + h.tcp_len] == next[ip + 20..ip + n.tcp_len]
        && n.seq == h.seq.wrapping_add(head_payload as u32)
        && h.flags == 0x10
        && (n.flags == 0x10 || n.flags == 0x10 | TCP_PSH)
}

/// Coalesces `packets` (decrypted, in arrival order) into what to write to an offloading TUN device:
/// each item is a `VnetHdr` followed by a packet. Consecutive full-sized segments of one TCP flow
/// become one large segment (the last may be shorter, or carry PSH); everything else passes as it was.
pub fn coalesce(packets: impl IntoIterator<Item = Vec<u8>>, out: &mut Vec<Vec<u8>>) {
    // The run being built: its buffer (header space first), its view and segment size, and how many.
    let mut run: Option<(Vec<u8>, TcpView, usize, usize)> = None;
    for packet in packets {
        let view = tcp_view(&packet);
        if let (Some((buf, h, mss, count)), Some(n)) = (run.as_mut(), view.as_ref())
            && continues(&buf[VNET_HDR_LEN..], h, *mss, &packet, n)
        {
            let payload = &packet[n.ip_len + n.tcp_len..];
            let short = payload.len() < *mss;
            buf.extend_from_slice(payload);
            *count += 1;
            if n.flags & TCP_PSH != 0 {
                let at = VNET_HDR_LEN + h.ip_len + 13;
                buf[at] |= TCP_PSH;
                h.flags |= TCP_PSH;
            }
            // A short segment or PSH ends the run: nothing may follow it in one large segment.
            if short || n.flags & TCP_PSH != 0 {
                out.push(finish(run.take().expect("a run is open")));
            }
            continue;
        }
        if let Some(r) = run.take() {
            out.push(finish(r));
        }
        match view {
            Some(v) if v.flags == 0x10 && packet.len() > v.ip_len + v.tcp_len => {
                let mss = packet.len() - v.ip_len - v.tcp_len;
                let mut buf = Vec::with_capacity(VNET_HDR_LEN + MAX_COALESCED);
                buf.extend_from_slice(&[0; VNET_HDR_LEN]);
                buf.extend_from_slice(&packet);
                run = Some((buf, v, mss, 1));
            }
            _ => {
                let mut buf = Vec::with_capacity(VNET_HDR_LEN + packet.len());
                buf.extend_from_slice(&[0; VNET_HDR_LEN]);
                buf.extend_from_slice(&packet);
                out.push(buf);
            }
        }
    }
    if let Some(r) = run {
        out.push(finish(r));
    }
}

/// Closes a run: one segment passes unchanged; several become one with a GSO header.
fn finish((mut buf, view, mss, count): (Vec<u8>, TcpView, usize, usize)) -> Vec<u8> {
    if count == 1 {
        return buf;
    }
    let ipv4 = buf[VNET_HDR_LEN] >> 4 == 4;
    let p = &mut buf[VNET_HDR_LEN..];
    set_ip_length(p, view.ip_len);
    if ipv4 {
        fill_ipv4_checksum(p);
    }
    let l4 = view.ip_len;
    let sum = checksum_add(pseudo_header_sum(p, TCP, p.len() - l4), &[]);
    p[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if ipv4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: (view.ip_len + view.tcp_len) as u16,
        gso_size: mss as u16,
        csum_start: view.ip_len as u16,
        csum_offset: 16,
    };
    hdr.write(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid IPv4 TCP packet with `payload`, `options` in the IP header and the given flags.
    fn tcp4(seq: u32, flags: u8, payload: &[u8], ip_options: &[u8]) -> Vec<u8> {
        let ihl = 20 + ip_options.len();
        let mut p = vec![0u8; ihl + 20];
        p[0] = 0x40 | (ihl / 4) as u8;
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[20..ihl].copy_from_slice(ip_options);
        let t = ihl;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p.extend_from_slice(payload);
        set_ip_length(&mut p, ihl);
        fill_ipv4_checksum(&mut p);
        fill_transport_checksum(&mut p, ihl, TCP);
        p
    }

    fn tcp6(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0x7a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0x7a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[40..42].copy_from_slice(&40000u16.to_be_bytes());
        p[42..44].copy_from_slice(&5201u16.to_be_bytes());
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        p.extend_from_slice(payload);
        set_ip_length(&mut p, 40);
        fill_transport_checksum(&mut p, 40, TCP);
        p
    }

    /// Whether the IPv4 header checksum (if any) and the transport checksum verify.
    fn checksums_ok(p: &[u8]) -> bool {
        let (ip_len, protocol) = ip_header(p).unwrap();
        let ip_ok = p[0] >> 4 != 4 || checksum_add(0, &p[..ip_len]) == 0xffff;
        let l4_ok = checksum_add(pseudo_header_sum(p, protocol, p.len() - ip_len), &p[ip_len..]) == 0xffff;
        ip_ok && l4_ok
    }

    /// What the kernel hands over with TSO: one large segment whose checksum field holds the
    /// pseudo-header sum.
    fn tso_read(packet: &[u8], mss: u16) -> Vec<u8> {
        let (ip_len, protocol) = ip_header(packet).unwrap();
        let l4_header = if protocol == TCP { ((packet[ip_len + 12] >> 4) as usize) * 4 } else { 8 };
        let mut p = packet.to_vec();
        let field = ip_len + if protocol == TCP { 16 } else { 6 };
        let sum = checksum_add(pseudo_header_sum(&p, protocol, p.len() - ip_len), &[]);
        p[field..field + 2].copy_from_slice(&sum.to_be_bytes());
        let gso_type = match (packet[0] >> 4, protocol) {
            (4, TCP) => GSO_TCPV4,
            (6, TCP) => GSO_TCPV6,
            _ => GSO_UDP_L4,
        };
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (ip_len + l4_header) as u16,
            gso_size: mss,
            csum_start: ip_len as u16,
            csum_offset: if protocol == TCP { 16 } else { 6 },
        };
        let mut read = vec![0; VNET_HDR_LEN];
        hdr.write(&mut read);
        read.extend_from_slice(&p);
        read
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn checksum_matches_the_rfc_1071_example() {
        // RFC 1071's example bytes sum to ddf2.
        assert_eq!(checksum_add(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
        // An odd length pads with a zero byte.
        assert_eq!(checksum_add(0, &[0x01, 0x02, 0x03]), 0x0402);
    }

    #[test]
    fn tso_segments_carry_their_share_of_bytes_and_valid_checksums() {
        let data = payload(4000); // 1380 + 1380 + 1240: an odd last segment
        let big = tcp4(1000, 0x10 | TCP_PSH | TCP_FIN, &data, &[]);
        let mut out = Vec::new();
        segment(&tso_read(&big, 1380), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for (i, p) in out.iter().enumerate() {
            assert!(checksums_ok(p), "segment {i} checksums");
            assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len(), "IPv4 total length");
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            assert_eq!(seq, 1000 + (i as u32) * 1380);
            let last = i == 2;
            assert_eq!(p[33] & (TCP_PSH | TCP_FIN) != 0, last, "PSH/FIN on the last segment only");
            assert_eq!(p[33] & 0x10, 0x10, "ACK on every segment");
            joined.extend_from_slice(&p[40..]);
        }
        assert_eq!(out[2].len(), 40 + 1240);
        assert_eq!(joined, data);
        // IP ids count up from the first.
        assert_eq!(u16::from_be_bytes([out[1][4], out[1][5]]), 1);
    }

    #[test]
    fn tso_keeps_ipv4_options_in_every_segment() {
        let options = [0x94, 0x04, 0x00, 0x00]; // router alert
        let data = payload(3001);
        let big = tcp4(5, 0x10, &data, &options);
        let mut out = Vec::new();
        segment(&tso_read(&big, 1000), &mut out).unwrap();
        assert_eq!(out.len(), 4);
        for p in &out {
            assert_eq!(p[0] & 0x0f, 6, "IHL counts the options");
            assert_eq!(&p[20..24], &options);
            assert!(checksums_ok(p));
        }
        assert_eq!(out[3].len(), 24 + 20 + 1);
    }

    #[test]
    fn tso_over_ipv6_and_uso_segment_too() {
        let data = payload(2500);
        let mut out = Vec::new();
        segment(&tso_read(&tcp6(9, 0x10, &data), 1200), &mut out).unwrap();
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![1260, 1260, 160]);
        assert!(out.iter().all(|p| checksums_ok(p)));
        assert_eq!(u16::from_be_bytes([out[2][4], out[2][5]]), 120, "IPv6 payload length");

        // A UDP datagram train (USO): each segment is its own datagram with its own length.
        let mut udp = tcp4(0, 0, &[], &[]);
        udp.truncate(20);
        udp[9] = UDP;
        udp.extend_from_slice(&[0x13, 0x88, 0x13, 0x89, 0, 0, 0, 0]);
        udp.extend_from_slice(&payload(1000));
        set_ip_length(&mut udp, 20);
        fill_ipv4_checksum(&mut udp);
        out.clear();
        segment(&tso_read(&udp, 400), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        for p in &out {
            assert!(checksums_ok(p));
            assert_eq!(u16::from_be_bytes([p[24], p[25]]) as usize, p.len() - 20, "UDP length");
        }
    }

    #[test]
    fn a_plain_packet_gets_its_checksum_completed() {
        let small = tcp4(1, 0x18, b"hello", &[]);
        let mut out = Vec::new();
        // Without offload: passes as it is.
        let mut read = vec![0; VNET_HDR_LEN];
        read.extend_from_slice(&small);
        segment(&read, &mut out).unwrap();
        assert_eq!(out[0], small);
        // With NEEDS_CSUM and no GSO: the partial sum is completed.
        let mut partial = tso_read(&small, 0);
        partial[1] = GSO_NONE;
        out.clear();
        segment(&partial, &mut out).unwrap();
        assert_eq!(out[0], small);
        // Garbage is an error, not a panic.
        assert_eq!(segment(&[0; 4], &mut out), Err(SegmentError::Truncated));
        let mut bad = tso_read(&small, 100);
        bad[1] = 3; // GSO_UDP (UFO), which TUN never sends us
        assert_eq!(segment(&bad, &mut out), Err(SegmentError::UnsupportedGso(3)));
    }

    #[test]
    fn coalescing_undoes_segmentation() {
        let data = payload(5000);
        let big = tcp4(700, 0x10 | TCP_PSH, &data, &[]);
        let mut segments = Vec::new();
        segment(&tso_read(&big, 1380), &mut segments).unwrap();
        let mut out = Vec::new();
        coalesce(segments, &mut out);
        assert_eq!(out.len(), 1, "one flow, in order: one large segment");
        let hdr = VnetHdr::parse(&out[0]).unwrap();
        assert_eq!((hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset), (GSO_TCPV4, 1380, 20, 16));
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        let p = &out[0][VNET_HDR_LEN..];
        assert_eq!(&p[40..], &data[..]);
        assert_eq!(p[33], 0x10 | TCP_PSH, "the last segment's PSH survives");
        // What the kernel will do with it: complete the checksum from the pseudo-header sum.
        let mut back = Vec::new();
        segment(&out[0], &mut back).unwrap();
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|p| checksums_ok(p)));
    }

    #[test]
    fn coalescing_stops_at_gaps_other_flows_and_flags() {
        let full = payload(1000);
        let a1 = tcp4(0, 0x10, &full, &[]);
        let a2 = tcp4(1000, 0x10, &full, &[]);
        let gap = tcp4(3000, 0x10, &full, &[]); // 2000..3000 missing
        let mut other = tcp4(1000, 0x10, &full, &[]);
        other[35] = 81; // another destination port
        fill_transport_checksum(&mut other, 20, TCP);
        let fin = tcp4(4000, 0x11, &full, &[]);
        let short = tcp4(2000, 0x10, &full[..10], &[]);
        let after_short = tcp4(2010, 0x10, &full, &[]);
        let mut out = Vec::new();
        coalesce([a1.clone(), a2, short, after_short, gap, other.clone(), fin.clone()], &mut out);
        let counts: Vec<usize> = out.iter().map(|b| b.len() - VNET_HDR_LEN).collect();
        // a1+a2+short end at the short one; the rest stand alone.
        assert_eq!(counts, vec![40 + 2010, 40 + 1000, 40 + 1000, 40 + 1000, 40 + 1000]);
        assert_eq!(VnetHdr::parse(&out[1]).unwrap(), VnetHdr::default(), "a lone segment has no GSO header");
        assert_eq!(&out[4][VNET_HDR_LEN..], &fin[..], "FIN is never coalesced");
        assert_eq!(&out[3][VNET_HDR_LEN..], &other[..]);
    }

    #[test]
    fn coalesced_segments_stay_under_64_kib() {
        let full = payload(1380);
        let segments: Vec<Vec<u8>> = (0..100).map(|i| tcp4(i * 1380, 0x10, &full, &[])).collect();
        let mut out = Vec::new();
        coalesce(segments, &mut out);
        assert!(out.len() >= 3);
        assert!(out.iter().all(|b| b.len() - VNET_HDR_LEN <= MAX_COALESCED));
        let total: usize = out.iter().map(|b| b.len() - VNET_HDR_LEN - 40).sum();
        assert_eq!(total, 100 * 1380);
    }

    #[test]
    fn ipv6_segments_coalesce() {
        let full = payload(1200);
        let mut out = Vec::new();
        coalesce([tcp6(0, 0x10, &full), tcp6(1200, 0x10, &full)], &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(VnetHdr::parse(&out[0]).unwrap().gso_type, GSO_TCPV6);
        assert_eq!(u16::from_be_bytes([out[0][VNET_HDR_LEN + 4], out[0][VNET_HDR_LEN + 5]]), 2420);
    }
}
