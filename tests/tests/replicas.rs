//! Several replicas over one PostgreSQL database: a change made through one reaches the watchers of every
//! other in revision order; nodes on different replicas reach each other through the relay mesh, and
//! frames still never cross tailnets; a single-use key admits one node however the registrations are
//! spread; and when a replica is killed (`kill -9`) with traffic flowing, its nodes move to another, a
//! direct TCP connection survives, netmap streams resume with a delta, and the tailnet's gateway comes
//! back elsewhere with its budgets, advertised at its new replica's UDP port.

use std::path::Path;
use std::time::{Duration, Instant};

use cordon_tests::v1 as pb;
use cordon_tests::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The next message of a netmap stream that is not a full map (skipping nothing else).
async fn next_change(stream: &mut NetMapStream, revision: &mut u64) -> pb::net_map::Update {
    let m = next_netmap(stream).await;
    assert!(m.revision >= *revision, "revisions go forward: {} after {}", m.revision, revision);
    *revision = m.revision;
    m.update.expect("an update")
}

async fn ended_with(stream: &mut NetMapStream, reason: pb::stream_ended::Reason, revision: &mut u64) {
    loop {
        match next_change(stream, revision).await {
            pb::net_map::Update::Ended(e) => {
                assert_eq!(e.reason(), reason, "{e:?}");
                return;
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_the_watchers_of_every_other_in_order() {
    let Some(r) = replicas(3, "replicas_fanout").await else { return };
    let mut admin1 = r[0].admin().await;
    let tailnet = create_tailnet(&mut admin1, "replicated").await;
    let (_, secret) = create_key(&mut admin1, &tailnet.id, true, false).await;

    // Every replica lists the three, each alive, the one asked saying so.
    let mut admin2 = r[1].admin().await;
    let listed = eventually(Duration::from_secs(10), "three live replicas", || {
        let mut admin2 = admin2.clone();
        async move {
            let list = admin2.list_replicas(pb::ListReplicasRequest {}).await.ok()?.into_inner().replicas;
            (list.iter().filter(|x| x.alive).count() == 3).then_some(list)
        }
    })
    .await;
    let answering: Vec<_> = listed.iter().filter(|x| x.answering).map(|x| x.advertise.clone()).collect();
    assert_eq!(answering, vec![r[1].url.clone()], "{listed:?}");
    for server in &r {
        assert!(listed.iter().any(|x| x.advertise == server.url), "{} is listed: {listed:?}", server.url);
    }
    assert_eq!(listed.iter().map(|x| x.gateways).sum::<u32>(), 1, "one gateway, on one replica: {listed:?}");

    // A watches on replica 1, C on replica 2; B registers through replica 3 and watches there.
    let mut n1 = r[0].nodes().await;
    let a = register(&mut n1, &secret, "a").await;
    let mut a_stream = watch(&mut n1, &a.session_token).await;
    let mut a_rev = next_netmap(&mut a_stream).await.revision;
    let mut n2 = r[1].nodes().await;
    let c = register(&mut n2, &secret, "c").await;
    let mut c_stream = watch(&mut n2, &c.session_token).await;
    let mut c_rev = next_netmap(&mut c_stream).await.revision;
    let mut n3 = r[2].nodes().await;
    let b = register(&mut n3, &secret, "b").await;
    let mut b_stream = watch(&mut n3, &b.session_token).await;
    let mut b_rev = next_netmap(&mut b_stream).await.revision;

    // A (replica 1) sees C and B join, in that order.
    let mut joined = Vec::new();
    while joined.len() < 2 {
        if let pb::net_map::Update::Delta(d) = next_change(&mut a_stream, &mut a_rev).await {
            joined.extend(d.peers_added.iter().map(|p| p.hostname.clone()));
        }
    }
    assert_eq!(joined, ["c", "b"], "in revision order");

    // Audit events made through replica 3 reach a WatchEvents stream on replica 2.
    let mut events = admin2
        .watch_events(pb::WatchEventsRequest { tailnet_id: tailnet.id.clone(), since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut admin3 = r[2].admin().await;
    let (key, _) = create_key(&mut admin3, &tailnet.id, false, false).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.message().await.unwrap().expect("the event stream stays open");
            if e.auth_key_id == key.id && e.kind() == pb::EventKind::KeyCreated {
                return e;
            }
        }
    })
    .await
    .expect("the key's event reaches replica 2 within 10 s");
    assert!(seen.revision > 0);

    // A policy set through replica 3 reaches A on replica 1 (a filter that now lets nobody in).
    admin3
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: r#"{"grants": []}"#.into(),
            reason: "lock down".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    loop {
        if let pb::net_map::Update::Delta(d) = next_change(&mut a_stream, &mut a_rev).await
            && d.filter.is_some()
        {
            break;
        }
    }

    // Deleting the tailnet through replica 2 ends every stream, on every replica, with the reason.
    admin2
        .delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id.clone(), reason: "run over".into() })
        .await
        .unwrap();
    let deleted = pb::stream_ended::Reason::TailnetDeleted;
    ended_with(&mut a_stream, deleted, &mut a_rev).await;
    ended_with(&mut b_stream, deleted, &mut b_rev).await;
    ended_with(&mut c_stream, deleted, &mut c_rev).await;
    assert_eq!((a_rev, b_rev), (c_rev, c_rev), "all three end at the deletion's revision");
    let gone = admin1.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_key_admits_one_node_however_registrations_are_spread() {
    let Some(r) = replicas(3, "replicas_key_race").await else { return };
    let mut admin = r[0].admin().await;
    let tailnet = create_tailnet(&mut admin, "race").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, false, false).await;
    let mut clients = Vec::new();
    for server in &r {
        clients.push(server.nodes().await);
    }
    let attempts = (0..50).map(|i| {
        let mut nodes = clients[i % 3].clone();
        let secret = secret.clone();
        tokio::spawn(async move { nodes.register(register_request(&secret, &format!("n{i}"))).await })
    });
    let results = futures::future::join_all(attempts).await;
    let admitted = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(admitted, 1, "exactly one of 50 racing registrations over three replicas");
    for refused in results.iter().filter_map(|r| r.as_ref().unwrap().as_ref().err()) {
        assert_ne!(refused.code(), tonic::Code::Internal, "{refused:?}");
    }
    let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert_eq!(nodes.into_inner().nodes.len(), 1);
}

struct RelayEnd {
    key: Vec<u8>,
    tx: mpsc::Sender<pb::RelayPacket>,
    rx: tonic::Streaming<pb::RelayPacket>,
}

async fn relay_end(server: &TestServer, secret: &str) -> RelayEnd {
    let mut nodes = server.nodes().await;
    let req = register_request(secret, "r");
    let key = req.wireguard_public_key.clone();
    let session = nodes.register(req).await.unwrap().into_inner().session_token;
    let (tx, out) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(out));
    request.metadata_mut().insert("authorization", format!("Bearer {session}").parse().unwrap());
    let rx = nodes.relay(request).await.expect("relay stream opens").into_inner();
    RelayEnd { key, tx, rx }
}

async fn relay_stats(admin: &mut Admin) -> pb::RelayStats {
    admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_different_replicas_reach_each_other_through_the_relay_and_frames_never_cross_tailnets() {
    let Some(r) = replicas(3, "replicas_relay").await else { return };
    let mut admin = r[0].admin().await;
    let tailnet = create_tailnet(&mut admin, "meshed").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    // Two nodes that advertise an endpoint nobody listens on, each connected to another replica.
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |server: &TestServer, dir: &Path, hostname: &str| {
        let mut config = agentd::NodeConfig::new(&server.url, dir);
        config.auth_key = Some(secret.clone());
        config.hostname = hostname.into();
        config.advertise = vec!["127.0.0.1:9".parse().unwrap()];
        agentd::Node::start(config)
    };
    let a = start(&r[0], dirs.0.path(), "alpha").await.expect("alpha joins through replica 1");
    let b = start(&r[1], dirs.1.path(), "beta").await.expect("beta joins through replica 2");
    for node in [&a, &b] {
        let mut netmap = node.netmap();
        tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 1))
            .await
            .expect("each sees the other within 10 s")
            .unwrap();
    }
    let mut listener = b.listen(8000).await.unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return (total, hash.finalize().to_vec());
            }
            total += n;
            hash.update(&buf[..n]);
        }
    });
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let sent = sha2::Sha256::digest(&data).to_vec();
    let started = Instant::now();
    let mut s = a.dial_host("beta", 8000).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let (total, got) = tokio::time::timeout(Duration::from_secs(120), receiver).await.unwrap().unwrap();
    println!("8 MiB between replicas through the relay mesh in {:?}", started.elapsed());
    assert_eq!((total, got), (data.len(), sent), "8 MiB intact (SHA-256)");
    let path = a.status().await.peers.into_iter().find(|p| p.peer.hostname == "beta").and_then(|p| p.path);
    assert!(matches!(path, Some(agentd::wg::Route::Relay(_))), "through the relay: {path:?}");
    let forwarded = relay_stats(&mut admin).await.forwarded_bytes;
    assert!(forwarded > 8 << 20, "replica 1 carried the data onto the mesh: {forwarded} bytes");

    // Frames never cross tailnets, across replicas either: y (another tailnet, on replica 2) sends to x
    // (on replica 1); replica 2 drops it. z (x's tailnet, on replica 3) reaches x.
    let other = create_tailnet(&mut admin, "other").await;
    let (_, other_secret) = create_key(&mut admin, &other.id, true, false).await;
    let mut x = relay_end(&r[0], &secret).await;
    let y = relay_end(&r[1], &other_secret).await;
    let z = relay_end(&r[2], &secret).await;
    let mut admin2 = r[1].admin().await;
    let before = relay_stats(&mut admin2).await.dropped_unknown_peer;
    let packet =
        |to: &[u8], data: &[u8]| pb::RelayPacket { peer_key: to.to_vec(), data: data.to_vec(), frames: vec![] };
    y.tx.send(packet(&x.key, b"cross")).await.unwrap();
    eventually(Duration::from_secs(10), "replica 2 to drop the frame for another tailnet", || {
        let mut admin2 = admin2.clone();
        async move { (relay_stats(&mut admin2).await.dropped_unknown_peer > before).then_some(()) }
    })
    .await;
    // x's relay home may take a moment to be recorded: z sends until x hears it.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            z.tx.send(packet(&x.key, b"same tailnet")).await.unwrap();
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), x.rx.message()).await {
                return m.unwrap().expect("x's relay stream stays open");
            }
        }
    })
    .await
    .expect("z reaches x through the mesh within 10 s");
    assert_eq!((got.peer_key, got.data), (z.key.clone(), b"same tailnet".to_vec()), "x never gets y's frame");
    drop((y, z));
}

/// A `cordon serve` process over the database `db`.
async fn replica_process(dir: &Path, log: &Path, db: &str) -> ServerProcess {
    ServerProcess::spawn_with(dir, log, &[format!("--store={db}")]).await
}

const BUDGET_POLICY: &str = r#"{
  "tagOwners": { "tag:ci": [] },
  "grants": [
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"], "budget": { "tokens": 150, "per": "day" } }] } },
    { "src": ["tag:ci"], "dst": ["tag:ci"], "ip": ["*"] }
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_moves_its_nodes_and_its_gateway_to_the_others() {
    let Some(db) = pg::database("replicas_failover").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = |i: usize| dir.path().join(format!("r{i}"));
    // The first makes the admin token; the others get a copy.
    let mut r1 = replica_process(&data(1), &dir.path().join("r1.log"), &db).await;
    let token = std::fs::read_to_string(data(1).join("admin.token")).unwrap().trim().to_string();
    for i in [2, 3] {
        std::fs::create_dir(data(i)).unwrap();
        std::fs::write(data(i).join("admin.token"), &token).unwrap();
    }
    let r2 = replica_process(&data(2), &dir.path().join("r2.log"), &db).await;
    let r3 = replica_process(&data(3), &dir.path().join("r3.log"), &db).await;
    let admin_of = |url: &str| {
        let url = url.to_string();
        let token = token.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
            pb::control_client::ControlClient::with_interceptor(channel, Bearer::new(&token))
        }
    };
    let mut admin1 = admin_of(&r1.url).await;
    let mut admin2 = admin_of(&r2.url).await;

    // The tailnet is created through replica 1, which takes its gateway's lease.
    let llm = llm::FakeLlm::start().await;
    let mut create = tailnet_request("failover");
    create.policy_json = BUDGET_POLICY.into();
    create.upstreams = llm::upstreams(&llm);
    let tailnet = admin1.create_tailnet(create).await.unwrap().into_inner();
    let secret = tagged_key(&mut admin1, &tailnet.id, &["tag:ci"]).await;
    let servers = format!("{},{},{}", r1.url, r2.url, r3.url);
    let replicas = admin2.list_replicas(pb::ListReplicasRequest {}).await.unwrap().into_inner().replicas;
    let home = replicas.iter().find(|x| x.advertise == r1.url).expect("replica 1 is listed");
    assert_eq!(home.gateways, 1, "replica 1 runs the gateway: {replicas:?}");
    let udp_of = |r: &pb::Replica| vec![r.stun_address.parse::<std::net::SocketAddr>().expect("a UDP address")];
    let r1_udp = udp_of(home);

    // A real agentd reaches the gateway through replica 1 (the first of its servers) and spends budget.
    let (_agent, base) = agentd_gateway_forward(
        &servers,
        &secret,
        "runner",
        &dir.path().join("agent"),
        &dir.path().join("agentd.log"),
        &[],
    )
    .await;
    let http = llm::http_client();
    let small = |text: &str| serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": text}]});
    let call = |body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{base}/v1/chat/completions");
        async move { llm::request(&http, "POST", &url, Some(&body), &[("authorization", "Bearer none")]).await }
    };
    assert_eq!(call(small("before")).await.expect("a request before the kill").0, 200);

    // Two in-process nodes on a direct path, both through replica 1, with a TCP connection open.
    let node_dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &Path, hostname: &str| {
        let mut config = agentd::NodeConfig::new(&servers, dir);
        config.auth_key = Some(secret.clone());
        config.hostname = hostname.into();
        agentd::Node::start(config)
    };
    let a = start(node_dirs.0.path(), "alpha").await.expect("alpha joins");
    let b = start(node_dirs.1.path(), "beta").await.expect("beta joins");
    for node in [&a, &b] {
        let mut netmap = node.netmap();
        tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() >= 2))
            .await
            .expect("the nodes see each other")
            .unwrap();
    }
    echo(&b, 7000).await;
    let mut conn = a.dial_host("beta", 7000).await.unwrap();
    let mut buf = [0u8; 5];
    conn.write_all(b"hello").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    let path = a.status().await.peers.into_iter().find(|p| p.peer.hostname == "beta").and_then(|p| p.path);
    assert!(matches!(path, Some(agentd::wg::Route::Direct(_))), "a direct path: {path:?}");
    let reconnects_before = a.status().await.reconnects.0;
    let gateway_at = |node: &agentd::Node| node.netmap().borrow().gateway_peer.as_ref().map(|g| g.endpoints.clone());
    assert_eq!(gateway_at(&a), Some(r1_udp), "the gateway is reached at its replica's UDP port");

    // kill -9 the replica that holds the nodes' streams and the gateway.
    r1.child.start_kill().unwrap();
    let killed = Instant::now();
    r1.child.wait().await.unwrap();

    eventually(Duration::from_secs(10), "alpha's netmap stream on another replica", || async {
        (a.status().await.reconnects.0 > reconnects_before).then_some(())
    })
    .await;
    let node_back = killed.elapsed();
    // It resumed from the revision of the map it held: a delta, not the whole map again.
    eventually(Duration::from_secs(5), "alpha's stream resuming on another replica with a delta", || async {
        (a.status().await.resumed == 1).then_some(())
    })
    .await;
    // The direct connection never depended on the server.
    conn.write_all(b"again").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"again");

    let gateway_back = eventually(Duration::from_secs(30), "the gateway answering from another replica", || async {
        match llm::request(&http, "GET", &format!("{base}/v1/models"), None, &[]).await {
            Ok(r) if r.0 == 200 => Some(killed.elapsed()),
            _ => None,
        }
    })
    .await;
    println!("after kill -9: node reconnected in {node_back:?}, gateway serving again in {gateway_back:?}");

    // The 30 tokens used before the kill still count: two more fit (30+72, 60+72 <= 150), a third not.
    assert_eq!(call(small("after 1")).await.unwrap().0, 200);
    assert_eq!(call(small("after 2")).await.unwrap().0, 200);
    let (status, _, body) = call(small("after 3")).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget"), "{body}");

    // Another replica holds the lease now; replica 1 is listed as lost.
    let replicas = eventually(Duration::from_secs(10), "replica 1 listed as lost", || {
        let mut admin2 = admin2.clone();
        let url = r1.url.clone();
        async move {
            let list = admin2.list_replicas(pb::ListReplicasRequest {}).await.ok()?.into_inner().replicas;
            list.iter().any(|x| x.advertise == url && !x.alive).then_some(list)
        }
    })
    .await;
    let hosts: u32 = replicas.iter().filter(|x| x.alive).map(|x| x.gateways).sum();
    assert_eq!(hosts, 1, "one live replica runs the gateway: {replicas:?}");
    // The gateway's record moved with it: nodes reach it at its new replica's UDP port.
    let new_udp = udp_of(replicas.iter().find(|x| x.alive && x.gateways == 1).expect("a holder"));
    eventually(Duration::from_secs(10), "the gateway's record naming its new replica's port", || async {
        (gateway_at(&a) == Some(new_udp.clone())).then_some(())
    })
    .await;
    // Nothing acknowledged is lost: the request answered before the kill is in the audit log.
    // (Replica 2 lists what it has published; the gateway's replica committed the last one a moment ago.)
    let answered = |events: &[pb::Event]| {
        events
            .iter()
            .filter_map(|e| e.gateway.as_ref())
            .filter(|g| g.status == 200 && g.api == "chat.completions")
            .count()
    };
    let events = eventually(Duration::from_secs(10), "three answered requests in the audit log", || {
        let mut admin2 = admin2.clone();
        let tailnet = tailnet.id.clone();
        async move {
            let events = tailnet_events(&mut admin2, &tailnet).await;
            (answered(&events) >= 3).then_some(events)
        }
    })
    .await;
    assert_eq!(answered(&events), 3, "the request before the kill and the two after it");

    // SIGTERM to the replica that runs the gateway now: it hands the lease over before it exits, and the
    // gateway answers from the last one (agentd follows it there too).
    let holder = replicas.iter().find(|x| x.alive && x.gateways == 1).expect("a holder").advertise.clone();
    let (mut stopping, last) = if holder == r2.url { (r2, r3) } else { (r3, r2) };
    let pid = stopping.child.id().expect("running").to_string();
    let term = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(term.success());
    let signalled = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(20), stopping.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "a clean exit on SIGTERM: {exit:?}");
    let mut last_admin = admin_of(&last.url).await;
    let listed = last_admin.list_replicas(pb::ListReplicasRequest {}).await.unwrap().into_inner().replicas;
    let stopped = listed.iter().find(|x| x.advertise == stopping.url).expect("listed");
    assert!(!stopped.alive && stopped.stopped_at.is_some(), "listed as stopped: {stopped:?}");
    let back = eventually(Duration::from_secs(30), "the gateway answering from the last replica", || async {
        match llm::request(&http, "GET", &format!("{base}/v1/models"), None, &[]).await {
            Ok(r) if r.0 == 200 => Some(signalled.elapsed()),
            _ => None,
        }
    })
    .await;
    println!("after SIGTERM: gateway serving again from the last replica in {back:?}");
    let (status, _, body) = call(small("after the drain")).await.unwrap();
    assert_eq!(status, 429, "the budget still holds: {body}");
    drop(last);
}

/// A webhook receiver that counts what it gets, by delivery id.
async fn counting_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        seen.lock().unwrap().push(event["id"].as_str().unwrap_or_default().to_string());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_delivers_each_webhook_event_and_every_replica_shows_every_node_online() {
    let Some(r) = replicas(2, "replicas_webhooks").await else { return };
    let mut admin1 = r[0].admin().await;
    let mut admin2 = r[1].admin().await;
    let tailnet = create_tailnet(&mut admin1, "hooked").await;
    let (url, got) = counting_receiver().await;
    let hook = admin2
        .create_webhook(pb::CreateWebhookRequest {
            tailnet_id: tailnet.id.clone(),
            url,
            events: vec!["key_created".into()],
            secret: "whsec-0123456789abcdef".into(),
            retry_seconds: 0,
            reason: "alerts".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let reader = admin1.clone();
    let delivered = |n: usize| {
        let admin1 = reader.clone();
        let id = hook.id.clone();
        async move {
            eventually(Duration::from_secs(20), "webhook deliveries recorded", || {
                let mut admin1 = admin1.clone();
                let id = id.clone();
                async move {
                    let list = admin1
                        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest { webhook_id: id, limit: 100 })
                        .await
                        .ok()?
                        .into_inner()
                        .deliveries;
                    (list.iter().filter(|d| d.delivered).count() >= n).then_some(())
                }
            })
            .await
        }
    };
    // Keys made through each replica: each event is posted once, by one of them.
    create_key(&mut admin1, &tailnet.id, true, false).await;
    delivered(1).await;
    create_key(&mut admin2, &tailnet.id, true, false).await;
    delivered(2).await;
    let ids = got.lock().unwrap().clone();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (2, 2), "two events, each posted once: {ids:?}");

    // A node watching on replica 2 is online as replica 1 sees it.
    let (_, secret) = create_key(&mut admin1, &tailnet.id, true, false).await;
    let mut nodes = r[1].nodes().await;
    let n = register(&mut nodes, &secret, "watcher").await;
    let _stream = watch(&mut nodes, &n.session_token).await;
    let id = n.node.unwrap().id;
    eventually(Duration::from_secs(10), "the node online through replica 1", || {
        let mut admin1 = admin1.clone();
        let id = id.clone();
        async move { admin1.get_node(pb::GetNodeRequest { id }).await.ok()?.into_inner().online.then_some(()) }
    })
    .await;
}

/// A node's netmap stream that moves to another replica resumes there from the revision of the map it
/// held: the peers changed since come as a delta, not the whole map again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netmap_stream_resumes_on_another_replica_from_its_revision() {
    let Some(servers) = replicas(2, "replicas_resume").await else { return };
    let mut admin = servers[0].admin().await;
    let tailnet = create_tailnet(&mut admin, "resume").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let mut nodes1 = servers[0].nodes().await;
    let mut nodes2 = servers[1].nodes().await;
    let a = register(&mut nodes1, &secret, "a").await;
    let mut stream = watch(&mut nodes1, &a.session_token).await;
    let first = next_netmap(&mut stream).await;
    drop(stream);
    let b = register(&mut nodes1, &secret, "b").await;
    let request = pb::WatchNetMapRequest { session_token: a.session_token.clone(), since_revision: first.revision };
    let mut resumed = nodes2.watch_net_map(request).await.unwrap().into_inner();
    let message = next_netmap(&mut resumed).await;
    let Some(pb::net_map::Update::Delta(delta)) = message.update else {
        panic!("a delta from revision {}, got {message:?}", first.revision)
    };
    let ids: Vec<String> = delta.peers_updated.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids, [b.node.unwrap().id], "{delta:?}");
}
