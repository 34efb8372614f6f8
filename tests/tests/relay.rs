//! The relay and path selection: frames only between live nodes of one tailnet, a stalled reader that
//! blocks nobody, traffic through the relay when no direct path works, and the move to a direct path
//! when one does.

use std::time::Duration;

use agentd::Node;
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct RelayEnd {
    key: Vec<u8>,
    tx: mpsc::Sender<pb::RelayPacket>,
    rx: tonic::Streaming<pb::RelayPacket>,
}

/// Registers a node and opens its relay stream.
async fn relay_end(server: &TestServer, secret: &str) -> RelayEnd {
    relay_end_with(server, secret, false).await
}

/// As [`relay_end`]; with `batches`, the stream asks for its frames in batches.
async fn relay_end_with(server: &TestServer, secret: &str, batches: bool) -> RelayEnd {
    let mut nodes = server.nodes().await;
    let req = register_request(secret, "r");
    let key = req.wireguard_public_key.clone();
    let session = nodes.register(req).await.unwrap().into_inner().session_token;
    let (tx, out) = mpsc::channel(4096);
    let mut request = tonic::Request::new(ReceiverStream::new(out));
    request.metadata_mut().insert("authorization", format!("Bearer {session}").parse().unwrap());
    if batches {
        request.metadata_mut().insert(pb::RELAY_BATCH_HEADER, "1".parse().unwrap());
    }
    let rx = nodes.relay(request).await.expect("relay stream opens").into_inner();
    RelayEnd { key, tx, rx }
}

/// Tailnets `a` and `b`, with a reusable key for each; returns `a` and both keys.
async fn two_tailnets(admin: &mut Admin) -> (pb::Tailnet, String, String) {
    let a = create_tailnet(admin, "a").await;
    let b = create_tailnet(admin, "b").await;
    let (_, a_key) = create_key(admin, &a.id, true, false).await;
    let (_, b_key) = create_key(admin, &b.id, true, false).await;
    (a, a_key, b_key)
}

async fn stats(admin: &mut Admin) -> pb::RelayStats {
    admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_cross_only_within_a_tailnet() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let (a, a_key, b_key) = two_tailnets(&mut admin).await;
    let a1 = relay_end(&server, &a_key).await;
    let mut a2 = relay_end(&server, &a_key).await;
    let mut b1 = relay_end(&server, &b_key).await;

    // a1 -> b1 (another tailnet), a1 -> a random key, and an oversized frame: all dropped.
    a1.tx.send(pb::RelayPacket { peer_key: b1.key.clone(), data: b"cross".to_vec(), frames: vec![] }).await.unwrap();
    a1.tx.send(pb::RelayPacket { peer_key: vec![9; 32], data: b"nobody".to_vec(), frames: vec![] }).await.unwrap();
    a1.tx.send(pb::RelayPacket { peer_key: a2.key.clone(), data: vec![0; 70_000], frames: vec![] }).await.unwrap();
    // a1 -> a2 (same tailnet) arrives, marked as from a1.
    a1.tx.send(pb::RelayPacket { peer_key: a2.key.clone(), data: b"hello".to_vec(), frames: vec![] }).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), a2.rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((got.peer_key.as_slice(), got.data.as_slice()), (a1.key.as_slice(), &b"hello"[..]));
    let s = eventually(Duration::from_secs(5), "drops to be counted", || {
        let mut admin = admin.clone();
        async move {
            let s = stats(&mut admin).await;
            (s.dropped_unknown_peer >= 2 && s.dropped_oversize >= 1).then_some(s)
        }
    })
    .await;
    assert_eq!(s.forwarded_frames, 1);
    let silent = tokio::time::timeout(Duration::from_millis(300), b1.rx.message()).await;
    assert!(silent.is_err(), "the other tailnet's node received {silent:?}");

    // A node removed from the tailnet stops relaying at once.
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: a.id.clone() }).await.unwrap().into_inner();
    for n in listed.nodes.iter().filter(|n| n.wireguard_public_key == a2.key) {
        admin.delete_node(pb::DeleteNodeRequest { id: n.id.clone(), reason: "gone".into() }).await.unwrap();
    }
    let end = tokio::time::timeout(Duration::from_secs(10), a2.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "the removed node's relay stream ends: {end:?}");
}

fn frame(to: &[u8], data: &[u8]) -> pb::RelayFrame {
    pb::RelayFrame { peer_key: to.to_vec(), data: data.to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_frames_cross_only_within_a_tailnet_and_a_bad_message_ends_the_stream_saying_why() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let (_, a_key, b_key) = two_tailnets(&mut admin).await;
    let mut a1 = relay_end(&server, &a_key).await;
    let mut a2 = relay_end_with(&server, &a_key, true).await;
    let mut b1 = relay_end_with(&server, &b_key, true).await;

    // One message, four frames: to the other tailnet, to a2 twice, to nobody.
    let frames = vec![frame(&b1.key, b"cross"), frame(&a2.key, b"one"), frame(&a2.key, b"two"), frame(&[7; 32], b"x")];
    a1.tx.send(pb::RelayPacket { frames, ..Default::default() }).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(10), a2.rx.message()).await.unwrap().unwrap().unwrap();
        assert!(m.peer_key.is_empty() && m.data.is_empty(), "a batching stream gets batches: {m:?}");
        got.extend(m.frames);
    }
    assert_eq!(got, vec![frame(&a1.key, b"one"), frame(&a1.key, b"two")], "in order, marked as from a1");
    let s = stats(&mut admin).await;
    assert_eq!((s.forwarded_frames, s.dropped_unknown_peer), (2, 2));
    let silent = tokio::time::timeout(Duration::from_millis(300), b1.rx.message()).await;
    assert!(silent.is_err(), "the other tailnet's node received {silent:?}");

    // A message over the server's request limit ends the stream with a status that says why.
    a1.tx.send(pb::RelayPacket { peer_key: a2.key.clone(), data: vec![0; 300 * 1024], frames: vec![] }).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), a1.rx.message()).await.unwrap();
    let status = end.expect_err("the stream ends with an error status, not OK");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert!(status.message().contains("relay stream ended"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_blocks_nobody() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let t = create_tailnet(&mut admin, "stall").await;
    let (_, secret) = create_key(&mut admin, &t.id, true, false).await;
    let stalled = relay_end(&server, &secret).await; // never reads
    let flooder = relay_end(&server, &secret).await;
    let sender = relay_end(&server, &secret).await;
    let mut reader = relay_end(&server, &secret).await;

    for i in 0..5_000u32 {
        flooder
            .tx
            .send(pb::RelayPacket { peer_key: stalled.key.clone(), data: vec![(i % 251) as u8; 1200], frames: vec![] })
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        sender
            .tx
            .send(pb::RelayPacket { peer_key: reader.key.clone(), data: i.to_be_bytes().to_vec(), frames: vec![] })
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        let got = tokio::time::timeout(Duration::from_secs(10), reader.rx.message())
            .await
            .expect("not blocked")
            .unwrap()
            .unwrap();
        assert_eq!(got.data, i.to_be_bytes(), "in order");
    }
    let s = eventually(Duration::from_secs(10), "every frame to be handled", || {
        let mut admin = admin.clone();
        async move {
            let s = stats(&mut admin).await;
            (s.forwarded_frames >= 5_100).then_some(s)
        }
    })
    .await;
    // The stalled node's queue (and the stream buffers behind it) hold a few thousand frames at most.
    assert!(s.dropped_overflow > 500, "oldest frames dropped: {s:?}");
}

async fn path_to(node: &Node, hostname: &str) -> Option<agentd::wg::Route> {
    node.status().await.peers.into_iter().find(|p| p.peer.hostname == hostname).and_then(|p| p.path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_through_the_relay_when_no_direct_path_exists() {
    // No STUN reflector, and both advertise endpoints nobody listens on: only the relay connects them.
    let server = TestServer::start_configured(|c| c.stun_listen = None).await;
    let mut admin = server.admin().await;
    let NodePair { a, b, .. } = node_pair(&server, "relayonly", Some("127.0.0.1:9")).await;

    let mut listener = b.listen(8000).await.unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31) as u8).collect();
    let expected = data.clone();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut s = a.dial_host("beta", 8000).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), receiver).await.unwrap().unwrap();
    assert!(got == expected, "1 MiB through the relay, intact");
    assert!(matches!(path_to(&a, "beta").await, Some(agentd::wg::Route::Relay(_))));
    let s = stats(&mut admin).await;
    assert!(s.forwarded_bytes > 1 << 20, "the bytes went through the relay: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_move_to_a_direct_path_when_one_works() {
    let server = TestServer::start().await;
    let NodePair { a, b, .. } = node_pair(&server, "direct", None).await;
    let mut listener = b.listen(8001).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"hi").await;
        }
    });
    let mut s = a.dial_host("beta", 8001).await.unwrap();
    let mut hi = [0u8; 2];
    s.read_exact(&mut hi).await.unwrap();
    let path = eventually(Duration::from_secs(5), "a direct path", || async {
        match path_to(&a, "beta").await {
            Some(agentd::wg::Route::Direct(addr)) => Some(addr),
            _ => None,
        }
    })
    .await;
    assert_eq!(path.port(), b.status().await.endpoint.port(), "straight to beta's socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_streams_come_back_after_a_server_restart() {
    let server = TestServer::start_configured(|c| c.stun_listen = None).await;
    let addr = server.addr;
    let NodePair { a, b, .. } = node_pair(&server, "relayrestart", Some("127.0.0.1:9")).await;
    echo(&b, 8002).await;
    let mut conn = a.dial_host("beta", 8002).await.unwrap();
    conn.write_all(b"1").await.unwrap();
    let mut echo = [0u8; 1];
    conn.read_exact(&mut echo).await.unwrap();

    let (dir, temp) = server.stop_keep_dir().await;
    let _server = TestServer::launch(&dir, &addr.to_string(), |c| c.stun_listen = None).await;
    // The nodes reconnect their relay streams; the same TCP connection carries on through them.
    let echoed = tokio::time::timeout(Duration::from_secs(30), async {
        conn.write_all(b"2").await.unwrap();
        conn.read_exact(&mut echo).await.unwrap();
        echo
    })
    .await
    .expect("traffic resumes through the re-established relay");
    assert_eq!(&echoed, b"2");
    assert!(matches!(path_to(&a, "beta").await, Some(agentd::wg::Route::Relay(_))));
    drop(temp);
}
