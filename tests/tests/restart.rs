//! A server restarted on the same data directory has everything it acknowledged: tailnets, keys with
//! their use counts, nodes with their addresses and sessions, the audit log, and pending deadlines.

use std::time::Duration;

use cordon_server::store::StoreUrl;
use cordon_server::{ControlPlane, Limits};
use cordon_tests::v1 as pb;
use cordon_tests::*;

#[tokio::test]
async fn everything_is_there_after_a_restart() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut req = tailnet_request("persist");
    req.ttl_seconds = 86_400;
    req.labels = [("team".to_string(), "ml".to_string())].into();
    let tailnet = admin.create_tailnet(req).await.unwrap().into_inner();
    let (key, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let a = register(&mut nodes, &secret, "a").await;
    let b = register(&mut nodes, &secret, "b").await;
    let events_before = admin.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner();
    let token = server.admin_token.clone();
    let (dir, temp) = server.stop_keep_dir().await;

    let server = TestServer::start_in(&dir, Limits::default()).await;
    assert_eq!(server.admin_token, token, "the admin token is kept");
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let got = admin.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert_eq!((got.name.as_str(), got.expires_at, got.labels), ("persist", tailnet.expires_at, tailnet.labels));
    assert_eq!(got.node_count, 2);
    let keys = admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    let k = keys.into_inner().keys.into_iter().find(|k| k.id == key.id).unwrap();
    assert_eq!(k.uses, 2);

    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    let mut addrs: Vec<_> = listed.nodes.iter().map(|n| n.addresses[0].clone()).collect();
    addrs.sort();
    assert_eq!(addrs, ["100.64.0.2", "100.64.0.3"]);

    let mut stream = watch(&mut nodes, &a.session_token).await;
    let Some(pb::net_map::Update::Full(map)) = next_netmap(&mut stream).await.update else { panic!("full map") };
    assert_eq!(map.peers[0].id, b.node.unwrap().id);

    // The key still works and the next address is fresh.
    let c = register(&mut nodes, &secret, "c").await;
    assert_eq!(c.node.unwrap().addresses[0], "100.64.0.4");
    let events_after = admin.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner();
    assert_eq!(&events_after.events[..events_before.events.len()], &events_before.events[..]);
    assert!(events_after.events.last().unwrap().revision > events_before.events.last().unwrap().revision);
    drop(temp);
}

#[tokio::test(start_paused = true)]
async fn deadlines_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreUrl::Sled(dir.path().join("store"));
    let cp = ControlPlane::open(&store, Limits::default()).await.unwrap();
    let actor = cordon_server::model::Actor("admin:test".into());
    let spec = cordon_server::model::TailnetSpec {
        name: "short".into(),
        owner: "acme".into(),
        ttl_seconds: 300,
        labels: Default::default(),
        cidr: cordon_server::model::Ipv4Cidr::DEFAULT,
        policy: None,
        upstreams: vec![],
        approval_required: false,
    };
    let tailnet = cp.create_tailnet(spec, &actor).await.unwrap();
    cp.begin_shutdown();
    drop(cp);

    // Reopen (sled holds a file lock until the old handle is gone; poll for it).
    let cp = eventually(Duration::from_secs(5), "the store to be reopened", || {
        let store = store.clone();
        async move { ControlPlane::open(&store, Limits::default()).await.ok() }
    })
    .await;
    assert!(cp.get_tailnet(tailnet.id).await.is_ok());
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert!(cp.get_tailnet(tailnet.id).await.is_err(), "the reopened server expired the tailnet on time");
}
