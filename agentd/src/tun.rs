//! TUN mode: a real kernel interface with the node's addresses (IPv4, and IPv6 when the tailnet has
//! it); the kernel routes the tailnet's ranges to it. Needs root (CAP_NET_ADMIN).
//!
//! With offloads (the default where the kernel has them; `AGENTD_TUN_OFFLOAD=0` turns them off) the
//! device carries a virtio-net header: the kernel hands over TCP segments of up to 64 KiB (TSO), which
//! [`offload::segment`] cuts to the tunnel's MTU, and takes the tunnel's segments of one flow back
//! coalesced ([`offload::coalesce`]): one read or write per ~45 packets instead of one per packet.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::offload::{self, VNET_HDR_LEN};
use crate::stack::MTU;

/// Set to `0` to run the TUN device without offloads (for a kernel without them, or to compare).
pub const OFFLOAD_VAR: &str = "AGENTD_TUN_OFFLOAD";

pub struct Tun {
    device: tun_rs::AsyncDevice,
    offload: bool,
    buf: Vec<u8>,
    coalesced: Vec<Vec<u8>>,
}

impl Tun {
    /// Creates interface `name` with `address/prefix` (and `ipv6`), up, MTU 1420; with offloads
    /// unless turned off or unsupported. A host with IPv6 turned off keeps the interface IPv4 only.
    pub fn create(name: &str, address: Ipv4Addr, prefix: u8, ipv6: Option<(Ipv6Addr, u8)>) -> io::Result<Tun> {
        let wanted = std::env::var(OFFLOAD_VAR).map_or(true, |v| v != "0");
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .ipv4(address, prefix, None)
                .mtu(MTU as u16)
                .offload(offload)
                .build_async()
        };
        let (device, offload) = match build(wanted) {
            Ok(d) => (d, wanted),
            Err(e) if wanted => {
                tracing::info!(error = %e, "TUN offloads unavailable; reading packet by packet");
                (build(false).map_err(|e| create_error(name, e))?, false)
            }
            Err(e) => return Err(create_error(name, e)),
        };
        if let Some((v6, prefix)) = ipv6
            && let Err(e) = device.add_address_v6(v6, prefix)
        {
            tracing::warn!(interface = name, address = %v6, error = %e, "IPv6 inside the tunnel is unavailable (is IPv6 turned off on this host?); continuing with IPv4");
        }
        tracing::info!(interface = name, "TUN interface up, offloads {}", if offload { "on" } else { "off" });
        Ok(Tun { device, offload, buf: vec![0; VNET_HDR_LEN + 65_535], coalesced: Vec::new() })
    }

    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Reads what the kernel sends next, as tunnel-sized packets appended to `out`.
    pub async fn recv(&mut self, out: &mut Vec<Vec<u8>>) {
        match self.device.recv(&mut self.buf).await {
            Ok(n) if self.offload => {
                if let Err(e) = offload::segment(&self.buf[..n], out) {
                    tracing::trace!(error = ?e, "dropped an offloaded TUN packet that could not be segmented");
                }
            }
            Ok(n) => out.push(self.buf[..n].to_vec()),
            Err(e) => {
                tracing::warn!(error = %e, "reading the TUN interface failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    /// Writes decrypted packets to the kernel, coalesced where offloads allow.
    pub async fn send(&mut self, packets: impl IntoIterator<Item = Vec<u8>>) {
        if !self.offload {
            for packet in packets {
                self.write(&packet).await;
            }
            return;
        }
        let mut batch = std::mem::take(&mut self.coalesced);
        offload::coalesce(packets, &mut batch);
        for packet in batch.drain(..) {
            self.write(&packet).await;
        }
        self.coalesced = batch;
    }

    async fn write(&self, packet: &[u8]) {
        if let Err(e) = self.device.send(packet).await {
            tracing::debug!(error = %e, "writing to the TUN interface failed");
        }
    }
}

fn create_error(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot create TUN interface {name}: {e} (TUN mode needs root)"))
}
