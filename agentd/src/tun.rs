//! TUN mode: a real kernel interface with the node's address; the kernel routes the tailnet's range to
//! it. Needs root (CAP_NET_ADMIN).

use std::io;
use std::net::Ipv4Addr;

use crate::stack::MTU;

pub struct Tun {
    device: tun_rs::AsyncDevice,
}

impl Tun {
    /// Creates interface `name` with `address/prefix`, up, MTU 1420.
    pub fn create(name: &str, address: Ipv4Addr, prefix: u8) -> io::Result<Tun> {
        let device =
            tun_rs::DeviceBuilder::new().name(name).ipv4(address, prefix, None).mtu(MTU as u16).build_async().map_err(
                |e| io::Error::new(e.kind(), format!("cannot create TUN interface {name}: {e} (TUN mode needs root)")),
            )?;
        Ok(Tun { device })
    }

    pub async fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        match self.device.recv(buf).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "reading the TUN interface failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                None
            }
        }
    }

    pub async fn send(&self, packet: &[u8]) {
        if let Err(e) = self.device.send(packet).await {
            tracing::debug!(error = %e, "writing to the TUN interface failed");
        }
    }
}
