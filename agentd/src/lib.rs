//! agentd: the Cordon node runtime. A [`Node`] joins its tailnet over WireGuard (boringtun), in this
//! process with a userspace TCP/IP stack or through a kernel TUN interface.
//!
//! - [`wg`]: the sans-IO WireGuard core (peers, timers, routing by receiver index).
//! - [`stack`]: the smoltcp stack and its TCP streams.
//! - [`dataplane`]: the IO shell that runs both on one UDP socket.
//! - [`control`]: registration and the netmap stream.

pub mod cli;
pub mod control;
pub mod dataplane;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod netmap;
pub mod node;
pub mod offload;
pub mod proxy;
pub mod stack;
pub mod state;
pub mod stun;
pub mod tun;
pub mod udp;
pub mod wg;

pub use error::Error;
pub use netmap::{NetMap, Peer};
pub use node::{Hosted, LoginHandler, LoginPrompt, Mode, Node, NodeConfig, PeerStatus, Status};
pub use stack::{Listener, StackConfig, TcpStream, UdpSocket};

/// Completes when the flag turns true (or its sender is gone).
pub(crate) async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}
