//! Federated admission with OIDC tokens: the test serves its own issuer (discovery + JWKS over HTTP,
//! RS256 and ES256 keys, a rotation mid-test) and mints GitHub-Actions-shaped tokens.

use cordon_tests::oidc::{Issuer, sign};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tonic::Code;

const AUDIENCE: &str = "https://cordon.example/acme";

fn oidc_request(token: &str, hostname: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        credential: Some(pb::register_request::Credential::OidcToken(token.into())),
        wireguard_public_key: wireguard_key(),
        hostname: hostname.into(),
        ..Default::default()
    }
}

async fn rule(admin: &mut Admin, tailnet: &str, issuer: &str, repository: &str) -> pb::TrustRule {
    admin
        .create_trust_rule(pb::CreateTrustRuleRequest {
            tailnet_id: tailnet.into(),
            issuer: issuer.into(),
            audience: AUDIENCE.into(),
            claim_conditions: [
                ("repository".to_string(), repository.to_string()),
                ("ref".to_string(), "refs/heads/*".to_string()),
            ]
            .into(),
            tags: vec!["tag:ci".into()],
            max_node_lifetime_seconds: 1800,
            ephemeral: true,
            reason: "CI of acme/api".into(),
            owner_claim: String::new(),
        })
        .await
        .expect("create trust rule")
        .into_inner()
}

async fn refused(nodes: &mut Nodes, token: &str) -> String {
    let status = nodes.register(oidc_request(token, "ci")).await.expect_err("the token must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(!status.message().contains(token), "errors never echo the token");
    assert!(!status.message().contains(token.split('.').nth(2).unwrap_or("~")), "nor its signature");
    status.message().to_string()
}

#[tokio::test]
async fn the_right_run_joins_and_carries_its_identity() {
    let issuer = Issuer::start(&["rsa1", "ec1"]).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "ci").await;
    let rule = rule(&mut admin, &tailnet.id, &issuer.url, "acme/api").await;
    assert_eq!(rule.max_node_lifetime_seconds, 1800);

    let token = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    let joined = nodes.register(oidc_request(&token, "runner")).await.expect("RS256 token accepted").into_inner();
    let node = joined.node.unwrap();
    assert_eq!(node.tags, ["tag:ci"]);
    assert!(node.ephemeral);
    let admission = node.admission.unwrap();
    assert_eq!(admission.trust_rule_id, rule.id);
    let run = admission.run.unwrap();
    assert_eq!(run.issuer, issuer.url);
    assert_eq!(run.subject, "repo:acme/api:ref:refs/heads/main");
    assert_eq!(run.claims["repository"], "acme/api");
    assert_eq!(run.claims["run_id"], "1234567");
    assert_eq!(run.claims["actor"], "octocat");
    assert!(!run.claims.contains_key("event_name"), "only run claims are recorded");
    let lifetime = node.expires_at.unwrap().seconds - node.created_at.unwrap().seconds;
    assert!(lifetime <= 1800, "the node expires no later than the rule's lifetime ({lifetime} s)");

    // ES256 works too, and the identity is in ListNodes, in peers' netmaps and in the audit log.
    let es = sign(&issuer.claims(AUDIENCE, "acme/api"), "ec1", "ec1");
    let second = nodes.register(oidc_request(&es, "runner2")).await.expect("ES256 token accepted").into_inner();
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert!(listed.nodes.iter().all(|n| n.admission.as_ref().unwrap().run.is_some()));
    let mut stream = watch(&mut nodes, &second.session_token).await;
    let Some(pb::net_map::Update::Full(map)) = next_netmap(&mut stream).await.update else { panic!("full map") };
    assert_eq!(map.peers[0].admission.as_ref().unwrap().run.as_ref().unwrap().claims["workflow"], "ci");
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { node_id: node.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events[0].kind(), pb::EventKind::NodeJoined);
    assert_eq!(events[0].run.as_ref().unwrap().claims["repository"], "acme/api");
}

#[tokio::test]
async fn every_failed_check_is_named() {
    let issuer = Issuer::start(&["rsa1"]).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "checks").await;
    rule(&mut admin, &tailnet.id, &issuer.url, "acme/api").await;

    let wrong_audience = sign(&issuer.claims("https://elsewhere", "acme/api"), "rsa1", "rsa1");
    assert!(refused(&mut nodes, &wrong_audience).await.contains("audience"));

    let mut expired = issuer.claims(AUDIENCE, "acme/api");
    expired["exp"] = (expired["iat"].as_u64().unwrap() - 3600).into();
    expired["iat"] = (expired["iat"].as_u64().unwrap() - 4000).into();
    expired["nbf"] = expired["iat"].clone();
    assert!(refused(&mut nodes, &sign(&expired, "rsa1", "rsa1")).await.contains("expired"));

    let mut early = issuer.claims(AUDIENCE, "acme/api");
    early["nbf"] = (early["iat"].as_u64().unwrap() + 3600).into();
    assert!(refused(&mut nodes, &sign(&early, "rsa1", "rsa1")).await.contains("nbf"));

    let other_repo = sign(&issuer.claims(AUDIENCE, "acme/web"), "rsa1", "rsa1");
    let why = refused(&mut nodes, &other_repo).await;
    assert!(why.contains("condition repository") && why.contains("acme/web"), "{why}");

    let mut tag_branch = issuer.claims(AUDIENCE, "acme/api");
    tag_branch["ref"] = "refs/tags/v1".into();
    assert!(refused(&mut nodes, &sign(&tag_branch, "rsa1", "rsa1")).await.contains("condition ref"));

    // Signed with another key that claims to be rsa1.
    let forged = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa2", "rsa1");
    assert!(refused(&mut nodes, &forged).await.contains("signature"));

    let stranger = Issuer::start(&["rsa1"]).await;
    let unknown = sign(&stranger.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    assert!(refused(&mut nodes, &unknown).await.contains("issuer unknown"));

    // A token works once.
    let token = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    nodes.register(oidc_request(&token, "once")).await.expect("first use");
    assert!(refused(&mut nodes, &token).await.contains("replayed"));

    let garbage = nodes.register(oidc_request("not.a-token", "x")).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert!(garbage.message().starts_with("oidc_token:"));
}

#[tokio::test]
async fn keys_rotate_mid_run() {
    let issuer = Issuer::start(&["rsa1"]).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "rotate").await;
    rule(&mut admin, &tailnet.id, &issuer.url, "acme/*").await;
    let before = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    nodes.register(oidc_request(&before, "a")).await.expect("rsa1 accepted; its keys are now cached");

    // The issuer rotates: only rsa2 is published. A token with the new key id makes the server refetch.
    issuer.publish(&["rsa2"]);
    let after = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa2", "rsa2");
    nodes.register(oidc_request(&after, "b")).await.expect("rsa2 accepted after a refetch");
    // The retired key is unknown now, even after a refetch.
    let retired = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    assert!(refused(&mut nodes, &retired).await.contains("signature"));
}

#[tokio::test]
async fn trust_rules_are_validated_listed_and_deleted() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "rules").await;
    let base = || pb::CreateTrustRuleRequest {
        tailnet_id: tailnet.id.clone(),
        issuer: "https://token.actions.githubusercontent.com".into(),
        audience: AUDIENCE.into(),
        claim_conditions: [("repository".to_string(), "acme/api".to_string())].into(),
        tags: vec!["tag:ci".into()],
        ..Default::default()
    };
    let cases: Vec<(pb::CreateTrustRuleRequest, &str)> = vec![
        (pb::CreateTrustRuleRequest { issuer: "http://issuer.example".into(), ..base() }, "issuer:"),
        (pb::CreateTrustRuleRequest { issuer: "ftp://x".into(), ..base() }, "issuer:"),
        (pb::CreateTrustRuleRequest { audience: String::new(), ..base() }, "audience:"),
        (pb::CreateTrustRuleRequest { claim_conditions: Default::default(), ..base() }, "claim_conditions:"),
        (
            pb::CreateTrustRuleRequest {
                claim_conditions: [("bad claim".to_string(), "x".to_string())].into(),
                ..base()
            },
            "claim_conditions[\"bad claim\"]",
        ),
        (pb::CreateTrustRuleRequest { tags: vec!["ci".into()], ..base() }, "tags[0]"),
        (pb::CreateTrustRuleRequest { max_node_lifetime_seconds: 10, ..base() }, "max_node_lifetime_seconds"),
    ];
    for (req, needle) in cases {
        let status = admin.create_trust_rule(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(needle), "{:?} should contain {needle:?}", status.message());
    }
    let created = admin.create_trust_rule(base()).await.unwrap().into_inner();
    assert_eq!(created.max_node_lifetime_seconds, 3600, "default lifetime is an hour");
    let listed = admin.list_trust_rules(pb::ListTrustRulesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert_eq!(listed.into_inner().rules.len(), 1);
    admin.delete_trust_rule(pb::DeleteTrustRuleRequest { id: created.id.clone() }).await.unwrap();
    let gone = admin.delete_trust_rule(pb::DeleteTrustRuleRequest { id: created.id }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agentd_node_joins_with_a_token_and_whois_shows_its_run() {
    let issuer = Issuer::start(&["rsa1"]).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "whois").await;
    rule(&mut admin, &tailnet.id, &issuer.url, "acme/api").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let mut ci = agentd::NodeConfig::new(&server.url, dirs.0.path());
    ci.oidc_token = Some(sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1"));
    ci.tailnet_id = Some(tailnet.id.clone());
    ci.hostname = "runner".into();
    let ci = agentd::Node::start(ci).await.expect("joins with the OIDC token");
    let mut laptop = agentd::NodeConfig::new(&server.url, dirs.1.path());
    laptop.auth_key = Some(secret);
    laptop.hostname = "laptop".into();
    let laptop = agentd::Node::start(laptop).await.unwrap();
    let mut netmap = laptop.netmap();
    tokio::time::timeout(std::time::Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 1))
        .await
        .unwrap()
        .unwrap();

    let who = laptop.whois(ci.address()).expect("the runner is a peer");
    let run = who.run.expect("with its run identity");
    assert_eq!(run.claims["repository"], "acme/api");
    assert_eq!(run.claims["run_id"], "1234567");
    assert_eq!(run.subject, "repo:acme/api:ref:refs/heads/main");
}

/// A rule that names an owner claim makes each run's node owned by the person in that claim (GitHub's
/// `actor`: who triggered the run); a token without the claim is refused, naming it.
#[tokio::test]
async fn the_owner_claim_makes_the_person_who_triggered_the_run_its_owner() {
    let issuer = Issuer::start(&["rsa1"]).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "runs").await;
    let mut req = pb::CreateTrustRuleRequest {
        tailnet_id: tailnet.id.clone(),
        issuer: issuer.url.clone(),
        audience: AUDIENCE.into(),
        claim_conditions: [("repository".to_string(), "acme/api".to_string())].into(),
        tags: vec!["tag:ci".into()],
        owner_claim: "actor".into(),
        ..Default::default()
    };
    let rule = admin.create_trust_rule(req.clone()).await.unwrap().into_inner();
    assert_eq!(rule.owner_claim, "actor");

    let token = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    let node = nodes.register(oidc_request(&token, "runner")).await.unwrap().into_inner().node.unwrap();
    assert_eq!(node.owner, "octocat", "the run is owned by the person who triggered it");
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { node_id: node.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events[0].summary.contains("owned by octocat"), "{}", events[0].summary);

    let mut claims = issuer.claims(AUDIENCE, "acme/api");
    claims.as_object_mut().unwrap().remove("actor");
    let message = refused(&mut nodes, &sign(&claims, "rsa1", "rsa1")).await;
    assert!(message.contains("claim actor"), "{message}");

    req.owner_claim = "not a claim".into();
    let bad = admin.create_trust_rule(req).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("owner_claim"), "{}", bad.message());
}

/// Two servers over one PostgreSQL database, as replicas run: a token used through one is refused by the
/// other, and of 20 registrations racing with one token across both exactly one is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_used_once_across_replicas() {
    let Some(url) = cordon_tests::pg::database("oidc_replicas").await else { return };
    let store = cordon_server::store::StoreUrl::Postgres(url);
    let (one, two) = (store.clone(), store);
    let a = TestServer::start_configured(move |c| c.store = Some(one)).await;
    let b = TestServer::start_configured(move |c| c.store = Some(two)).await;
    let issuer = Issuer::start(&["rsa1"]).await;
    let mut admin = a.admin().await;
    let tailnet = create_tailnet(&mut admin, "replicas").await;
    rule(&mut admin, &tailnet.id, &issuer.url, "acme/api").await;

    let token = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    a.nodes().await.register(oidc_request(&token, "first")).await.expect("first use, through replica a");
    let replayed = b.nodes().await.register(oidc_request(&token, "again")).await.unwrap_err();
    assert_eq!(replayed.code(), Code::Unauthenticated);
    assert!(replayed.message().contains("replayed"), "{replayed:?}");

    let token = sign(&issuer.claims(AUDIENCE, "acme/api"), "rsa1", "rsa1");
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..20 {
        let nodes = if i % 2 == 0 { a.nodes().await } else { b.nodes().await };
        let request = oidc_request(&token, &format!("racer-{i}"));
        racers.spawn(async move { nodes.clone().register(request).await.map(|_| ()).map_err(|s| s.code()) });
    }
    let outcomes = racers.join_all().await;
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.as_ref().err().is_none_or(|c| *c == Code::Unauthenticated)), "{outcomes:?}");
}
