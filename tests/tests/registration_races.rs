//! Concurrent registrations: a single-use key admits exactly one node however many race for it, and
//! concurrent nodes never share an address.

use std::collections::HashSet;

use cordon_tests::v1 as pb;
use cordon_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_racers_one_single_use_key_one_winner() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "race").await;
    let (key, secret) = create_key(&mut admin, &tailnet.id, false, false).await;

    let mut racers = Vec::new();
    for i in 0..50 {
        // Separate connections, so the registrations really arrive concurrently.
        let mut nodes = server.nodes().await;
        let secret = secret.clone();
        racers.push(tokio::spawn(async move { nodes.register(register_request(&secret, &format!("r{i}"))).await }));
    }
    let mut winners = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => winners += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unauthenticated);
                assert!(status.message().contains("exhausted"), "{status:?}");
            }
        }
    }
    assert_eq!(winners, 1);
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert_eq!(listed.nodes.len(), 1);
    let keys = admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet.id }).await.unwrap().into_inner();
    let key = keys.keys.into_iter().find(|k| k.id == key.id).unwrap();
    assert_eq!((key.uses, key.state.as_str()), (1, "exhausted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_racers_get_two_hundred_addresses() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "crowd").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    let channels: Vec<_> = futures_channels(&server, 8).await;
    let mut racers = Vec::new();
    for i in 0..200 {
        let mut nodes = pb::node_client::NodeClient::new(channels[i % channels.len()].clone());
        let secret = secret.clone();
        racers.push(tokio::spawn(async move { register(&mut nodes, &secret, &format!("n{i}")).await }));
    }
    let mut addresses = HashSet::new();
    let mut ids = HashSet::new();
    for r in racers {
        let node = r.await.unwrap().node.unwrap();
        assert!(addresses.insert(node.addresses[0].clone()), "address {} handed out twice", node.addresses[0]);
        assert!(ids.insert(node.id));
    }
    assert_eq!(addresses.len(), 200);
    assert!(!addresses.contains("100.64.0.1"), "the gateway address is reserved");
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id }).await.unwrap().into_inner();
    let listed: HashSet<_> = listed.nodes.into_iter().map(|n| n.addresses[0].clone()).collect();
    assert_eq!(listed, addresses);
}

async fn futures_channels(server: &TestServer, n: usize) -> Vec<tonic::transport::Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(server.channel().await);
    }
    out
}
