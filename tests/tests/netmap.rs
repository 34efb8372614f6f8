//! Netmap streams over real gRPC: the full map first, then peer joins, leaves and deletions in
//! revision order; a node's own revocation, its key's, its tailnet's and a server shutdown end the
//! stream with the reason.

use cordon_tests::v1 as pb;
use cordon_tests::*;
use pb::net_map::Update;
use pb::stream_ended::Reason;

fn full(m: pb::NetMap) -> pb::FullNetMap {
    match m.update {
        Some(Update::Full(f)) => f,
        other => panic!("expected a full netmap, got {other:?}"),
    }
}

fn delta(m: &pb::NetMap) -> pb::NetMapDelta {
    match &m.update {
        Some(Update::Delta(d)) => d.clone(),
        other => panic!("expected a delta, got {other:?}"),
    }
}

fn ended(m: pb::NetMap) -> pb::StreamEnded {
    match m.update {
        Some(Update::Ended(e)) => e,
        other => panic!("expected the stream to end, got {other:?}"),
    }
}

/// After an `ended` message the server closes the stream.
async fn assert_closed(stream: &mut NetMapStream) {
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await.expect("closes");
    assert!(matches!(next, Ok(None)), "stream should be closed, got {next:?}");
}

#[tokio::test]
async fn peers_see_joins_leaves_and_deletions_in_order() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "watch").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    let a = register(&mut nodes, &secret, "a").await;
    let b = register(&mut nodes, &secret, "b").await;
    let mut stream = watch(&mut nodes, &a.session_token).await;
    let map = full(next_netmap(&mut stream).await);
    assert_eq!(map.self_.as_ref().unwrap().id, a.node.as_ref().unwrap().id);
    assert_eq!(map.peers.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), [b.node.as_ref().unwrap().id.clone()]);
    assert_eq!(map.gateway_address, "100.64.0.1");
    assert_eq!(map.tailnet_name, "watch");
    assert!(map.self_.unwrap().online);

    let c = register(&mut nodes, &secret, "c").await;
    let d = register(&mut nodes, &secret, "d").await;
    admin
        .delete_node(pb::DeleteNodeRequest { id: b.node.as_ref().unwrap().id.clone(), reason: "gone".into() })
        .await
        .unwrap();
    nodes.leave(pb::LeaveRequest { session_token: c.session_token.clone() }).await.unwrap();

    let mut revisions = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = next_netmap(&mut stream).await;
        revisions.push(m.revision);
        let d = delta(&m);
        for p in d.peers_added {
            seen.push(format!("+{}", p.hostname));
        }
        for id in d.peers_removed {
            seen.push(format!("-{id}"));
        }
    }
    let b_id = b.node.unwrap().id;
    let c_id = c.node.unwrap().id;
    assert_eq!(seen, ["+c".to_string(), "+d".into(), format!("-{b_id}"), format!("-{c_id}")]);
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "revisions increase: {revisions:?}");

    // The other stream of `d` starts with the current map: a and d only.
    let mut d_stream = watch(&mut nodes, &d.session_token).await;
    let d_map = full(next_netmap(&mut d_stream).await);
    assert_eq!(d_map.peers.len(), 1);
    assert_eq!(d_map.peers[0].hostname, "a");
    assert!(d_map.peers[0].online, "a holds a stream");
}

#[tokio::test]
async fn own_deletion_ends_the_stream_with_the_reason() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "revoke").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let a = register(&mut nodes, &secret, "a").await;
    let mut stream = watch(&mut nodes, &a.session_token).await;
    full(next_netmap(&mut stream).await);

    admin.delete_node(pb::DeleteNodeRequest { id: a.node.unwrap().id, reason: "compromised".into() }).await.unwrap();
    let end = ended(next_netmap(&mut stream).await);
    assert_eq!(end.reason(), Reason::NodeRemoved);
    assert!(end.message.contains("compromised"), "{end:?}");
    assert!(!end.retry);
    assert_closed(&mut stream).await;

    let status = nodes
        .watch_net_map(pb::WatchNetMapRequest { session_token: a.session_token, ..Default::default() })
        .await
        .expect_err("a revoked session cannot watch");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn key_revocation_ends_the_streams_of_its_nodes_only() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "keyrev").await;
    let (bad_key, bad) = create_key(&mut admin, &tailnet.id, true, false).await;
    let (_, good) = create_key(&mut admin, &tailnet.id, true, false).await;
    let victim = register(&mut nodes, &bad, "victim").await;
    let survivor = register(&mut nodes, &good, "survivor").await;
    let mut victim_stream = watch(&mut nodes, &victim.session_token).await;
    let mut survivor_stream = watch(&mut nodes, &survivor.session_token).await;
    full(next_netmap(&mut victim_stream).await);
    full(next_netmap(&mut survivor_stream).await);

    admin
        .revoke_auth_key(pb::RevokeAuthKeyRequest {
            id: bad_key.id,
            reason: "leaked in CI log".into(),
            keep_nodes: false,
        })
        .await
        .unwrap();
    let end = ended(next_netmap(&mut victim_stream).await);
    assert_eq!(end.reason(), Reason::KeyRevoked);
    assert!(end.message.contains("leaked in CI log"));
    let removed = delta(&next_netmap(&mut survivor_stream).await);
    assert_eq!(removed.peers_removed, [victim.node.unwrap().id]);
}

#[tokio::test]
async fn tailnet_deletion_cuts_every_node_off() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "teardown").await;
    let other = create_tailnet(&mut admin, "bystander").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let (_, other_secret) = create_key(&mut admin, &other.id, true, false).await;
    let mut streams = Vec::new();
    for i in 0..5 {
        let r = register(&mut nodes, &secret, &format!("n{i}")).await;
        let mut s = watch(&mut nodes, &r.session_token).await;
        full(next_netmap(&mut s).await);
        streams.push((r.session_token, s));
    }
    let bystander = register(&mut nodes, &other_secret, "bystander").await;
    let mut bystander_stream = watch(&mut nodes, &bystander.session_token).await;
    let bystander_map = full(next_netmap(&mut bystander_stream).await);
    assert!(bystander_map.peers.is_empty(), "nodes of other tailnets are never peers");

    let r = admin
        .delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id.clone(), reason: "run finished".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.nodes_revoked, 5);
    assert_eq!(r.keys_deleted, 1);
    for (token, mut s) in streams {
        // Joins of later nodes may come first; then the end. The deletion sends no peer removals.
        let end = loop {
            let m = next_netmap(&mut s).await;
            if let Some(Update::Delta(d)) = &m.update {
                assert!(d.peers_removed.is_empty(), "{d:?}");
                continue;
            }
            break ended(m);
        };
        assert_eq!(end.reason(), Reason::TailnetDeleted);
        assert!(end.message.contains("run finished"));
        assert_closed(&mut s).await;
        let status = nodes
            .watch_net_map(pb::WatchNetMapRequest { session_token: token, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    let status = nodes.register(register_request(&secret, "late")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "the tailnet's keys are gone");

    // The other tailnet's node heard nothing and is still registered.
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: other.id }).await.unwrap().into_inner();
    assert_eq!(listed.nodes.len(), 1);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), bystander_stream.message()).await;
    assert!(quiet.is_err(), "the bystander's stream got {quiet:?}");
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_retryable_reason() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "shutdown").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let a = register(&mut nodes, &secret, "a").await;
    let mut stream = watch(&mut nodes, &a.session_token).await;
    full(next_netmap(&mut stream).await);
    let mut events = admin.watch_events(pb::WatchEventsRequest::default()).await.unwrap().into_inner();

    let stop = tokio::spawn(server.stop());
    let end = ended(next_netmap(&mut stream).await);
    assert_eq!(end.reason(), Reason::ServerShutdown);
    assert!(end.retry);
    let status = events.message().await.expect_err("event stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    tokio::time::timeout(std::time::Duration::from_secs(10), stop).await.expect("drains in time").unwrap();
}

#[tokio::test]
async fn watch_events_streams_and_resumes() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut live = admin.watch_events(pb::WatchEventsRequest::default()).await.unwrap().into_inner();
    let tailnet = create_tailnet(&mut admin, "events").await;
    let (key, secret) = create_key(&mut admin, &tailnet.id, false, false).await;
    let node = register(&mut nodes, &secret, "n").await.node.unwrap();

    let mut kinds = Vec::new();
    let mut revisions = Vec::new();
    for _ in 0..3 {
        let e =
            tokio::time::timeout(std::time::Duration::from_secs(10), live.message()).await.unwrap().unwrap().unwrap();
        kinds.push(e.kind());
        revisions.push(e.revision);
        if e.kind() == pb::EventKind::NodeJoined {
            assert_eq!(e.node_id, node.id);
            assert_eq!(e.auth_key_id, key.id);
            assert_eq!(e.actor, format!("node:{}", node.id));
        } else {
            assert!(e.actor.starts_with("admin:"), "{e:?}");
        }
    }
    assert_eq!(kinds, [pb::EventKind::TailnetCreated, pb::EventKind::KeyCreated, pb::EventKind::NodeJoined]);

    // A watcher that resumes after the first event gets the other two from the store.
    let mut resumed = admin
        .watch_events(pb::WatchEventsRequest { since_revision: revisions[0], tailnet_id: tailnet.id.clone() })
        .await
        .unwrap()
        .into_inner();
    for want in &revisions[1..] {
        let e = resumed.message().await.unwrap().unwrap();
        assert_eq!(e.revision, *want);
    }
    // Filtered by node.
    let by_node = admin
        .list_audit_events(pb::ListAuditEventsRequest { node_id: node.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(by_node.len(), 1);
    assert_eq!(by_node[0].kind(), pb::EventKind::NodeJoined);
}

#[tokio::test]
async fn reported_endpoints_reach_peers() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "endpoints").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let mut req = register_request(&secret, "a");
    req.endpoints = vec!["127.0.0.1:41641".into()];
    let a = nodes.register(req).await.unwrap().into_inner();
    let b = register(&mut nodes, &secret, "b").await;
    let mut stream = watch(&mut nodes, &b.session_token).await;
    let map = full(next_netmap(&mut stream).await);
    assert_eq!(map.peers[0].endpoints, ["127.0.0.1:41641"]);

    nodes
        .report_endpoints(pb::ReportEndpointsRequest {
            session_token: a.session_token.clone(),
            endpoints: vec!["127.0.0.1:5000".into(), "[::1]:5000".into()],
        })
        .await
        .unwrap();
    // On PostgreSQL a change from before the report (b's own join, read back from the change feed) can
    // arrive first as a delta with nothing for b's peers.
    let updated = loop {
        let d = delta(&next_netmap(&mut stream).await);
        if !d.peers_updated.is_empty() {
            break d;
        }
    };
    assert_eq!(updated.peers_updated[0].endpoints, ["127.0.0.1:5000", "[::1]:5000"]);

    for (bad, needle) in [("nope", "endpoints[0]"), ("0.0.0.0:1", "endpoints[0]"), ("127.0.0.1:0", "endpoints[0]")] {
        let status = nodes
            .report_endpoints(pb::ReportEndpointsRequest {
                session_token: a.session_token.clone(),
                endpoints: vec![bad.into()],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(needle), "{status:?}");
    }
}

/// A node that reconnects (to this server or another replica) with the revision of the map it holds
/// gets a delta from there instead of a full map: the peers that joined, changed or left meanwhile, its
/// filter and itself. A revision the server cannot resume from (none, one from the future, or one
/// before a policy change) gets a full map.
#[tokio::test]
async fn a_reconnecting_node_resumes_from_its_revision_with_a_delta() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "resume").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let id = |r: &pb::RegisterResponse| r.node.as_ref().unwrap().id.clone();
    let a = register(&mut nodes, &secret, "a").await;
    let b = register(&mut nodes, &secret, "b").await;
    let untouched = register(&mut nodes, &secret, "untouched").await;
    let mut stream = watch(&mut nodes, &a.session_token).await;
    let first = next_netmap(&mut stream).await;
    let since = first.revision;
    assert_eq!(full(first).peers.len(), 2);
    drop(stream);

    // While a is away: c joins, b is deleted, untouched stays as it was.
    let c = register(&mut nodes, &secret, "c").await;
    admin.delete_node(pb::DeleteNodeRequest { id: id(&b), reason: "gone".into() }).await.unwrap();
    let resume = |since: u64| {
        let mut nodes = nodes.clone();
        let token = a.session_token.clone();
        async move {
            let request = pb::WatchNetMapRequest { session_token: token, since_revision: since };
            let mut stream = nodes.watch_net_map(request).await.expect("watch netmap").into_inner();
            next_netmap(&mut stream).await
        }
    };
    let resumed = resume(since).await;
    assert!(resumed.revision > since, "{} after {since}", resumed.revision);
    let d = delta(&resumed);
    assert_eq!(d.peers_updated.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), [id(&c)], "{d:?}");
    assert_eq!(d.peers_removed, [id(&b)], "{d:?}");
    assert!(d.peers_added.is_empty() && !d.gateway_removed, "{d:?}");
    assert_eq!(d.self_.as_ref().map(|n| n.id.clone()), Some(id(&a)));
    assert!(d.filter.is_some(), "the filter comes along: {d:?}");
    assert!(d.paths.is_some(), "and the answering server's paths (STUN address, relay): {d:?}");
    assert!(d.peers_updated.iter().chain(&d.peers_added).all(|p| p.id != id(&untouched)), "nothing unchanged");

    // Up to date already: an empty delta at the same revision.
    let again = resume(resumed.revision).await;
    assert_eq!(again.revision, resumed.revision);
    let d = delta(&again);
    assert!(d.peers_updated.is_empty() && d.peers_removed.is_empty(), "{d:?}");

    // Nothing to resume from, or a revision this server never had: the full map.
    let now = full(resume(0).await);
    assert_eq!(now.peers.len(), 2, "untouched and c");
    full(resume(resumed.revision + 1_000_000).await);

    // A policy change touches every node's view: the full map.
    let policy = r#"{ "grants": [ { "src": ["*"], "dst": ["*"], "ip": ["*"] } ] }"#;
    let set = pb::SetPolicyRequest { tailnet_id: tailnet.id.clone(), policy_json: policy.into(), ..Default::default() };
    admin.set_policy(set).await.unwrap();
    full(resume(resumed.revision).await);
}
