//! The STUN reflector: answers binding requests with the address and port they came from, so a node
//! behind NAT learns the public endpoint of its WireGuard socket.

use tokio::net::UdpSocket;
use tokio::sync::watch;

pub async fn reflect(socket: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = tokio::select! {
            _ = crate::control_plane::stopped(&mut shutdown) => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        if let Some(transaction) = agentd::stun::parse_request(&buf[..n]) {
            let _ = socket.send_to(&agentd::stun::response(transaction, from), from).await;
        }
    }
}
