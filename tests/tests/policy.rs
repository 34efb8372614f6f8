//! Policy through the API and on the wire: versions and audit, errors that point at the place, tag
//! ownership, per-node views (a sensor sees only what it may reach), deltas only to nodes whose view
//! changed, and packets dropped by the filter between two real nodes.

use std::time::Duration;

use agentd::{Node, NodeConfig};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use pb::net_map::Update;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const SENSORS: &str = r#"{
  // Sensors report to the collector and nothing else.
  "tagOwners": { "tag:sensor": [], "tag:collector": [], "tag:ci": [] },
  "grants": [
    { "src": ["tag:sensor"], "dst": ["tag:collector"], "ip": ["tcp:9000"] },
  ],
  "tests": [
    { "src": "tag:sensor", "accept": ["tag:collector:9000"], "deny": ["tag:collector:22", "tag:sensor:9000"] },
  ],
}"#;

async fn tailnet_with(admin: &mut Admin, name: &str, policy: &str) -> pb::Tailnet {
    let mut req = tailnet_request(name);
    req.policy_json = policy.into();
    admin.create_tailnet(req).await.expect("create tailnet with policy").into_inner()
}

fn full(m: pb::NetMap) -> pb::FullNetMap {
    match m.update {
        Some(Update::Full(f)) => f,
        other => panic!("expected a full netmap, got {other:?}"),
    }
}

fn delta(m: pb::NetMap) -> pb::NetMapDelta {
    match m.update {
        Some(Update::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

async fn quiet(stream: &mut NetMapStream) {
    let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(next.is_err(), "expected no message, got {next:?}");
}

#[tokio::test]
async fn versions_are_kept_with_author_and_reason() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "versions").await;
    let default = admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 0 }).await.unwrap();
    assert_eq!(default.get_ref().version, 0);
    assert!(default.get_ref().summary.contains("default"));

    let v1 = admin
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: SENSORS.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.version, 1);
    assert!(v1.author.starts_with("admin:"));
    let tighter = SENSORS.replace(r#""tag:ci": []"#, r#""tag:ci": [], "tag:db": []"#);
    let v2 = admin
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: tighter.clone(),
            author: "alice@acme.com".into(),
            reason: "declare tag:db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v2.version, v2.author.as_str(), v2.reason.as_str()), (2, "alice@acme.com", "declare tag:db"));
    assert!(v2.summary.contains("tagOwners changed: tag:db"), "{}", v2.summary);

    let current = admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 0 }).await.unwrap();
    assert_eq!(current.into_inner().policy_json, tighter);
    let first = admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 1 }).await.unwrap();
    assert_eq!(first.into_inner().policy_json, SENSORS);
    let missing =
        admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 9 }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let got = admin.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.policy_version, 2);

    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    let changes: Vec<_> = events.iter().filter(|e| e.kind() == pb::EventKind::PolicyChanged).collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1].reason, "declare tag:db");
    assert!(changes[1].summary.contains("policy v2 by alice@acme.com"), "{}", changes[1].summary);
}

#[tokio::test]
async fn bad_policies_are_refused_with_path_and_position() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "bad").await;
    let set = |text: &str| pb::SetPolicyRequest {
        tailnet_id: tailnet.id.clone(),
        policy_json: text.into(),
        ..Default::default()
    };
    let cases = [
        (
            "{\n  \"grants\": [\n    {\"src\": [\"group:ops\"], \"dst\": [\"*\"], \"ip\": [\"*\"]},\n  ],\n}",
            "grants[0].src[0] (line 3, column 14): group:ops is not defined in groups",
        ),
        ("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"tcp:99999\"]}]}", "grants[0].ip[0]"),
        ("{\"acls\": []}", "acls (line 1, column 2): unknown section"),
        ("{\"grants\": [", "unexpected end"),
        (&SENSORS.replace("\"tag:sensor:9000\"", "\"tag:collector:9000\""), "tests[0].deny[1]"),
    ];
    for (text, needle) in cases {
        let status = admin.set_policy(set(text)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("policy_json: "), "{}", status.message());
        assert!(status.message().contains(needle), "{:?} should contain {needle:?}", status.message());
    }
    let empty = admin.set_policy(set("  ")).await.unwrap_err();
    assert!(empty.message().contains("policy_json: is required"));
    let mut req = tailnet_request("badcreate");
    req.policy_json = "{\"tests\": [{\"src\": \"*\"}]}".into();
    let status = admin.create_tailnet(req).await.unwrap_err();
    assert!(status.message().contains("tests[0].src"), "{}", status.message());
    // Nothing was stored.
    let current = admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 0 }).await.unwrap();
    assert_eq!(current.into_inner().version, 0);
}

#[tokio::test]
async fn tags_must_be_owned_and_removing_one_takes_effect() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = tailnet_with(&mut admin, "tags", SENSORS).await;
    let status = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            tags: vec!["tag:db".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("tags[0]: tag:db is not declared"), "{}", status.message());

    let secret = tagged_key(&mut admin, &tailnet.id, &["tag:ci", "tag:sensor"]).await;
    let node = register(&mut nodes, &secret, "probe").await;
    assert_eq!(node.node.as_ref().unwrap().tags, ["tag:ci", "tag:sensor"]);
    let mut stream = watch(&mut nodes, &node.session_token).await;
    full(next_netmap(&mut stream).await);

    // A policy without tag:ci: the node loses the tag, and hears so.
    let without_ci = SENSORS.replace(r#", "tag:ci": []"#, "");
    admin
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: without_ci,
            ..Default::default()
        })
        .await
        .unwrap();
    let d = delta(next_netmap(&mut stream).await);
    assert_eq!(d.self_.unwrap().tags, ["tag:sensor"]);
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert_eq!(listed.nodes[0].tags, ["tag:sensor"]);
    // A key made before still works, but no longer hands out the tag.
    let later = register(&mut nodes, &secret, "later").await;
    assert_eq!(later.node.unwrap().tags, ["tag:sensor"]);
}

#[tokio::test]
async fn each_node_sees_only_what_it_may_reach() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = tailnet_with(&mut admin, "views", SENSORS).await;
    let sensor_key = tagged_key(&mut admin, &tailnet.id, &["tag:sensor"]).await;
    let collector_key = tagged_key(&mut admin, &tailnet.id, &["tag:collector"]).await;
    let s1 = register(&mut nodes, &sensor_key, "s1").await;
    let s2 = register(&mut nodes, &sensor_key, "s2").await;
    let c = register(&mut nodes, &collector_key, "collector").await;

    let mut s1_stream = watch(&mut nodes, &s1.session_token).await;
    let s1_map = full(next_netmap(&mut s1_stream).await);
    assert_eq!(s1_map.peers.iter().map(|p| p.hostname.as_str()).collect::<Vec<_>>(), ["collector"]);
    assert_eq!(s1_map.filter.as_ref().unwrap().rules.len(), 0, "a sensor accepts nothing");
    assert!(!s1_map.filter.unwrap().allow_all);

    let mut c_stream = watch(&mut nodes, &c.session_token).await;
    let c_map = full(next_netmap(&mut c_stream).await);
    let mut seen: Vec<_> = c_map.peers.iter().map(|p| p.hostname.clone()).collect();
    seen.sort();
    assert_eq!(seen, ["s1", "s2"]);
    let rule = &c_map.filter.unwrap().rules[0];
    assert_eq!((rule.protocol.as_str(), rule.first_port, rule.last_port), ("tcp", 9000, 9000));
    let mut sources = rule.sources.clone();
    sources.sort();
    // Each source in both families: the IPv4 address and the IPv6 one that ends in it.
    let mut want: Vec<String> = [&s1, &s2]
        .iter()
        .flat_map(|s| {
            let addresses = &s.node.as_ref().unwrap().addresses;
            [format!("{}/32", addresses[0]), format!("{}/128", addresses[1])]
        })
        .collect();
    want.sort();
    assert_eq!(sources, want);

    // A third sensor joins: the collector hears of it and accepts it; the other sensors hear nothing.
    let s3 = register(&mut nodes, &sensor_key, "s3").await;
    let d = delta(next_netmap(&mut c_stream).await);
    assert_eq!(d.peers_added[0].hostname, "s3");
    assert_eq!(d.filter.unwrap().rules[0].sources.len(), 6, "three sources in two families");
    quiet(&mut s1_stream).await;

    // A policy that changes only the sensors' filter reaches only the sensors.
    let extra = SENSORS.replace(
        r#"{ "src": ["tag:sensor"], "dst": ["tag:collector"], "ip": ["tcp:9000"] },"#,
        r#"{ "src": ["tag:sensor"], "dst": ["tag:collector"], "ip": ["tcp:9000"] },
    { "src": ["tag:collector"], "dst": ["tag:sensor"], "ip": ["tcp:22"] },"#,
    );
    admin
        .set_policy(pb::SetPolicyRequest { tailnet_id: tailnet.id.clone(), policy_json: extra, ..Default::default() })
        .await
        .unwrap();
    let d = delta(next_netmap(&mut s1_stream).await);
    let rules = d.filter.unwrap().rules;
    assert_eq!(rules[0].first_port, 22);
    assert!(d.peers_added.is_empty() && d.peers_removed.is_empty());
    quiet(&mut c_stream).await;
    let _ = s3;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_drops_what_the_policy_does_not_grant() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = tailnet_with(&mut admin, "drops", SENSORS).await;
    let sensor_key = tagged_key(&mut admin, &tailnet.id, &["tag:sensor"]).await;
    let collector_key = tagged_key(&mut admin, &tailnet.id, &["tag:collector"]).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let start = |key: String, dir: std::path::PathBuf, name: &'static str| {
        let url = server.url.clone();
        async move {
            let mut config = NodeConfig::new(url, dir);
            config.auth_key = Some(key);
            config.hostname = name.into();
            Node::start(config).await.unwrap()
        }
    };
    let collector = start(collector_key, dirs[0].path().into(), "collector").await;
    let sensor = start(sensor_key.clone(), dirs[1].path().into(), "sensor").await;
    let other_sensor = start(sensor_key, dirs[2].path().into(), "sensor2").await;
    let mut netmap = collector.netmap();
    tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 2)).await.unwrap().unwrap();

    for port in [9000, 22] {
        let mut listener = collector.listen(port).await.unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"ok").await;
                let _ = s.shutdown().await;
            }
        });
    }
    let collector6 = collector.address6().expect("the collector has IPv6");
    for target in [None, Some(collector6)] {
        let mut s = match target {
            None => sensor.dial_host("collector", 9000).await,
            Some(v6) => sensor.dial(std::net::SocketAddr::new(v6.into(), 9000)).await,
        }
        .expect("the granted port works, over IPv4 and IPv6");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"ok");
    }

    // Port 22 is not granted: the collector's filter drops the SYNs.
    let before = collector.status().await.drops.filtered;
    let denied = tokio::time::timeout(Duration::from_secs(3), sensor.dial_host("collector", 22)).await;
    assert!(!matches!(denied, Ok(Ok(_))), "an ungranted port must not connect");
    let after = collector.status().await.drops.filtered;
    assert!(after > before, "the collector's filter counted the dropped packets ({before} -> {after})");
    let denied =
        tokio::time::timeout(Duration::from_secs(3), sensor.dial(std::net::SocketAddr::new(collector6.into(), 22)))
            .await;
    assert!(!matches!(denied, Ok(Ok(_))), "an ungranted port must not connect over IPv6 either");
    assert!(collector.status().await.drops.filtered > after, "the IPv6 SYNs were filtered too");

    // Sensors do not see each other at all.
    assert!(sensor.netmap().borrow().resolve("sensor2").is_none());
    let addr = other_sensor.address();
    let unreachable =
        tokio::time::timeout(Duration::from_secs(2), sensor.dial(std::net::SocketAddr::from((addr, 9000)))).await;
    assert!(!matches!(unreachable, Ok(Ok(_))));
}

#[tokio::test]
async fn capabilities_merge_across_grants() {
    let policy = r#"{
  "tagOwners": { "tag:ci": [] },
  "grants": [
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"], "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"], "rpm": 60 }] } },
    { "src": ["*"], "dst": ["gateway"], "app": { "cordon.dev/cap/ai": [{ "tpm": 100000 }], "example.com/cap/other": [1] } },
    { "src": ["group:nobody"], "dst": ["gateway"], "app": { "cordon.dev/cap/ai": [{ "rpm": 1 }] } },
  ],
  "groups": { "group:nobody": [] },
}"#;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = tailnet_with(&mut admin, "caps", policy).await;
    let secret = tagged_key(&mut admin, &tailnet.id, &["tag:ci"]).await;
    let joined = register(&mut nodes, &secret, "ci").await.node.unwrap();
    let cp = &server.control_plane;
    let node = cp.get_node(cordon_server::model::NodeId::parse("id", &joined.id).unwrap()).await.unwrap();
    let gateway = cordon_server::policy::Subject { id: "", tags: &[], owner: "", gateway: true, groups: None };
    let caps = cp.capabilities(&node, &gateway, "cordon.dev/cap/ai").await.unwrap();
    assert_eq!(*caps, [serde_json::json!({"models": ["openai/gpt-*"], "rpm": 60}), serde_json::json!({"tpm": 100000})]);
    assert_eq!(*cp.capabilities(&node, &gateway, "example.com/cap/other").await.unwrap(), [serde_json::json!(1)]);
    assert!(cp.capabilities(&node, &gateway, "cordon.dev/cap/none").await.unwrap().is_empty());
}
