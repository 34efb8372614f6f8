//! Two userspace `agentd::Node`s and a server in one process, over real WireGuard on loopback UDP.

use std::time::Duration;

use agentd::{Node, NodeConfig};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn join(server: &TestServer, secret: &str, dir: &std::path::Path, hostname: &str) -> Node {
    let mut config = NodeConfig::new(&server.url, dir);
    config.auth_key = Some(secret.to_string());
    config.hostname = hostname.into();
    Node::start(config).await.expect("node starts")
}

/// Waits until `node` has `count` peers in its netmap.
async fn peers(node: &Node, count: usize) {
    let mut netmap = node.netmap();
    tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == count))
        .await
        .expect("netmap converges")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_across_the_tunnel() {
    let server = TestServer::start().await;
    let NodePair { a, b, .. } = node_pair(&server, "data", None).await;

    let mut listener = b.listen(9000).await.unwrap();
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let want = Sha256::digest(&data);
    let receiver = tokio::spawn(async move {
        let (mut stream, peer) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        (got.len(), Sha256::digest(&got), peer)
    });
    let mut stream = a.dial_host("beta", 9000).await.unwrap();
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let (len, got, peer) = tokio::time::timeout(Duration::from_secs(60), receiver).await.unwrap().unwrap();
    assert_eq!(len, data.len());
    assert_eq!(got, want, "checksum of 16 MiB matches");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(a.address()));

    // whois answers from the netmap.
    let who = b.whois(a.address()).unwrap();
    assert_eq!(who.hostname, "alpha");
    assert_eq!(who.id, a.node_id());
    assert_eq!(who.tags, ["tag:ci"]);
    let status = a.status().await;
    let beta = status.peers.iter().find(|p| p.peer.hostname == "beta").unwrap();
    assert!(beta.last_handshake.is_some() && beta.tx_bytes > 16 << 20, "{beta:?}");
}

/// Each node has an IPv6 address in its tailnet's unique local prefix, ending in its IPv4 address;
/// TCP and UDP work over it, and whois knows the caller by either address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_inside_the_tunnel() {
    let server = TestServer::start().await;
    let NodePair { a, b, .. } = node_pair(&server, "six", None).await;
    let (a6, b6) = (a.address6().expect("alpha has IPv6"), b.address6().expect("beta has IPv6"));
    assert_eq!(a6.octets()[0], 0xfd, "a unique local address: {a6}");
    assert_eq!(a6.octets()[..12], b6.octets()[..12], "one prefix per tailnet");
    assert_eq!(a6.octets()[12..], a.address().octets(), "the IPv4 address inside");

    let mut listener = b.listen(9600).await.unwrap();
    let server_side = tokio::spawn(async move {
        let (mut stream, peer) = listener.accept().await.unwrap();
        stream.write_all(b"over six").await.unwrap();
        peer
    });
    let mut stream = a.dial(std::net::SocketAddr::new(b6.into(), 9600)).await.unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "over six");
    let peer = server_side.await.unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V6(a6), "the caller is seen at its IPv6 address");
    assert_eq!(b.whois(peer.ip()).map(|p| p.hostname), Some("alpha".to_string()));

    let (ua, ub) = (a.bind_udp(0).unwrap(), b.bind_udp(5300).unwrap());
    let to = std::net::SocketAddr::new(b6.into(), 5300);
    let (n, from) = eventually(Duration::from_secs(10), "a datagram over IPv6", || async {
        ua.send_to(b"hello six", to).await.ok()?;
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_millis(300), ub.recv_from(&mut buf)).await.ok()?.ok()?;
        Some((n, from))
    })
    .await;
    assert_eq!((n, from.ip()), (9, std::net::IpAddr::V6(a6)));
    assert_eq!(from.port(), ua.local_port());
    assert!(b.bind_udp(5300).is_err(), "a bound UDP port is refused a second time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_can_no_longer_reach_the_other() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let NodePair { a, b, .. } = node_pair(&server, "cut", None).await;
    echo(&b, 7000).await;
    let mut s = a.dial_host("beta", 7000).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    admin.delete_node(pb::DeleteNodeRequest { id: a.node_id().into(), reason: "test".into() }).await.unwrap();
    let mut ended = a.ended();
    tokio::time::timeout(Duration::from_secs(10), ended.wait_for(Option::is_some)).await.unwrap().unwrap();
    assert_eq!(ended.borrow().as_ref().unwrap().reason, pb::stream_ended::Reason::NodeRemoved);
    peers(&b, 0).await;

    // The removed node's tunnels are down, and b no longer has it as a peer: nothing gets through.
    let beta = b.address();
    let attempt = tokio::time::timeout(Duration::from_secs(3), a.dial(std::net::SocketAddr::from((beta, 7000)))).await;
    assert!(!matches!(attempt, Ok(Ok(_))), "a removed node must not connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_identity_and_address() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "restart").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, false, false).await;
    let dir = tempfile::tempdir().unwrap();
    let first = join(&server, &secret, dir.path(), "sensor").await;
    let (id, address) = (first.node_id().to_string(), first.address());
    first.shutdown().await;
    drop(first);

    // The single-use key is spent: the restart must resume the saved session, not register again.
    let mut config = NodeConfig::new(&server.url, dir.path());
    config.hostname = "sensor".into();
    let second = Node::start(config).await.expect("resumes with the saved session and key");
    assert_eq!(second.node_id(), id);
    assert_eq!(second.address(), address);
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id }).await.unwrap().into_inner();
    assert_eq!(listed.nodes.len(), 1);
}

#[tokio::test]
async fn start_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let bad_url = Node::start(NodeConfig::new("cordon.example", dir.path())).await.err().unwrap();
    assert!(bad_url.to_string().contains("not a server URL"), "{bad_url}");
    let unreachable = Node::start(NodeConfig::new("http://127.0.0.1:1", dir.path())).await.err().unwrap();
    assert!(unreachable.to_string().contains("cannot reach"), "{unreachable}");

    let server = TestServer::start().await;
    let mut config = NodeConfig::new(&server.url, dir.path());
    config.auth_key = Some(format!("cordon-auth-{}", "x".repeat(43)));
    let rejected = Node::start(config).await.err().unwrap();
    assert!(rejected.to_string().contains("unknown key"), "{rejected}");
    assert_eq!(rejected.exit_code(), 4);

    std::fs::write(dir.path().join("wireguard.key"), "not a key").unwrap();
    let corrupt = Node::start(NodeConfig::new(&server.url, dir.path())).await.err().unwrap();
    assert!(corrupt.to_string().contains("wireguard.key") && corrupt.to_string().contains("move it away"), "{corrupt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_keeps_tunnels_up_and_nodes_reconnect() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let NodePair { a, b, secret, .. } = node_pair(&server, "restart", None).await;
    echo(&b, 7100).await;
    let mut conn = a.dial_host("beta", 7100).await.unwrap();

    // The server goes away: the established connection keeps working through the tunnel.
    let (dir, temp) = server.stop_keep_dir().await;
    for round in 0..3u8 {
        conn.write_all(&[round]).await.unwrap();
        let mut echo = [0u8; 1];
        conn.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [round]);
    }

    // It comes back on the same address; both nodes reconnect and hear of a newcomer.
    let server = TestServer::start_at(&dir, cordon_server::Limits::default(), &addr.to_string()).await;
    let c_dir = tempfile::tempdir().unwrap();
    let _c = join(&server, &secret, c_dir.path(), "gamma").await;
    peers(&a, 2).await;
    peers(&b, 2).await;
    assert!(a.ended().borrow().is_none() && b.ended().borrow().is_none(), "a restart is not a revocation");
    conn.write_all(b"z").await.unwrap();
    let mut echo = [0u8; 1];
    conn.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"z");
    drop(temp);
}
