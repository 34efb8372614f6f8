//! People, not only workloads: a person logs in through the tailnet's OIDC login provider with the
//! device authorization grant (run by the server against a test IdP served here), becomes a user with
//! the IdP's groups, and gets what policy gives those groups at the gateway. Refusals (denied, expired,
//! wrong audience, wrong domain, no groups), bad providers, login expiry and offboarding are covered,
//! on gRPC and through the real `agentd` binary.

use std::time::{Duration, Instant};

use cordon_tests::idp::{CLIENT_ID, CLIENT_SECRET, Idp, Person};
use cordon_tests::{Admin, Nodes, TestServer, v1 as pb, wireguard_key};
use tonic::Code;

const POLICY: &str = r#"{
  "groups": { "group:eng": ["idp:engineering"] },
  "tagOwners": { "tag:ci": [], "tag:build": ["group:eng"] },
  "grants": [
    { "src": ["group:eng"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["anthropic/*", "openai/*"] }] } },
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-4o-mini"], "budget": { "tokens": 100000, "per": "day", "bucket": "run" } }] } },
    { "src": ["autogroup:member"], "dst": ["autogroup:member"], "ip": ["*"] }
  ],
  "tests": [
    { "src": "group:eng", "accept": ["gateway:80"] },
    { "src": "tag:ci", "accept": ["gateway:80"], "deny": ["autogroup:member:22"] }
  ]
}"#;

fn provider_request(tailnet: &str, idp: &Idp) -> pb::CreateLoginProviderRequest {
    pb::CreateLoginProviderRequest {
        name: "acme-sso".into(),
        tailnet_id: tailnet.into(),
        issuer: idp.url.clone(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        allowed_email_domains: vec!["acme.com".into()],
        allowed_groups: vec!["engineering".into()],
        reason: "acme's Okta".into(),
        ..Default::default()
    }
}

async fn tailnet_with_provider(admin: &mut Admin, idp: &Idp, name: &str) -> (pb::Tailnet, pb::LoginProvider) {
    let mut create = cordon_tests::tailnet_request(name);
    create.policy_json = POLICY.into();
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let provider = admin.create_login_provider(provider_request(&tailnet.id, idp)).await.unwrap().into_inner();
    (tailnet, provider)
}

async fn start(nodes: &mut Nodes, tailnet: &str, key: &[u8], hostname: &str) -> pb::StartLoginResponse {
    let req = pb::StartLoginRequest {
        tailnet_id: tailnet.into(),
        wireguard_public_key: key.to_vec(),
        hostname: hostname.into(),
        ..Default::default()
    };
    nodes.start_login(req).await.expect("login starts").into_inner()
}

async fn wait(nodes: &mut Nodes, login_id: &str) -> Result<pb::RegisterResponse, tonic::Status> {
    let req = pb::WaitLoginRequest { login_id: login_id.into() };
    tokio::time::timeout(Duration::from_secs(60), nodes.wait_login(req))
        .await
        .expect("the login ends within a minute")
        .map(|r| r.into_inner())
}

/// Logs `person` in on a node with `key`; returns what WaitLogin returned.
async fn log_in(
    nodes: &mut Nodes,
    idp: &Idp,
    tailnet: &str,
    key: &[u8],
    person: Person,
) -> Result<pb::RegisterResponse, tonic::Status> {
    let started = start(nodes, tailnet, key, "laptop").await;
    idp.approve(&started.user_code, person);
    wait(nodes, &started.login_id).await
}

fn alice() -> Person {
    Person::new("00u-alice", "alice@acme.com", &["engineering", "everyone"])
}

/// The message that ends `stream` (within 30 s).
async fn ending(stream: &mut cordon_tests::NetMapStream) -> pb::StreamEnded {
    let end = async {
        while let Some(m) = stream.message().await.expect("stream healthy") {
            if let Some(pb::net_map::Update::Ended(e)) = m.update {
                return e;
            }
        }
        panic!("the stream closed without saying why")
    };
    tokio::time::timeout(Duration::from_secs(30), end).await.expect("the stream ends within 30 s")
}

async fn events(admin: &mut Admin, tailnet: &str) -> Vec<pb::Event> {
    let req = pb::ListAuditEventsRequest { tailnet_id: tailnet.into(), page_size: 1000, ..Default::default() };
    admin.list_audit_events(req).await.unwrap().into_inner().events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_and_logging_in_again_keeps_the_node() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let (tailnet, provider) = tailnet_with_provider(&mut admin, &idp, "people").await;
    assert!(provider.has_client_secret);
    assert_eq!(provider.groups_claim, "groups");
    assert_eq!(provider.scopes, ["openid", "email", "profile", "groups"]);
    assert_eq!(provider.login_lifetime_seconds, 7 * 86_400);
    let listed = admin.list_login_providers(pb::ListLoginProvidersRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.providers.len(), 1);
    assert!(!format!("{listed:?}").contains(CLIENT_SECRET), "the client secret is write-only");

    let key = wireguard_key();
    let started = start(&mut nodes, &tailnet.id, &key, "laptop").await;
    assert!(started.verification_uri.starts_with(&idp.url), "{started:?}");
    assert!(started.verification_uri_complete.contains(&started.user_code));
    assert_eq!(started.provider, "acme-sso");
    assert!(started.login_id.starts_with("cordon-login-"));
    idp.approve(&started.user_code, alice());
    let joined = wait(&mut nodes, &started.login_id).await.expect("approved");
    let node = joined.node.unwrap();
    let user = node.user.clone().expect("a person's node names the person");
    assert_eq!((user.email.as_str(), node.owner.as_str()), ("alice@acme.com", "alice@acme.com"));
    assert_eq!(user.groups, ["engineering", "everyone"]);
    assert!(node.tags.is_empty());
    assert!(idp.authenticated() > 0, "the server authenticated to the token endpoint with the client secret");

    // The session works, and the outcome was handed over once.
    let mut stream = cordon_tests::watch(&mut nodes, &joined.session_token).await;
    let first = cordon_tests::next_netmap(&mut stream).await;
    assert!(matches!(first.update, Some(pb::net_map::Update::Full(_))));
    let again = nodes.wait_login(pb::WaitLoginRequest { login_id: started.login_id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");

    // The user record, by id and by email, with the node.
    let users = admin.list_users(pb::ListUsersRequest::default()).await.unwrap().into_inner().users;
    assert_eq!(users.len(), 1);
    assert_eq!((users[0].email.as_str(), users[0].subject.as_str()), ("alice@acme.com", "00u-alice"));
    let by_email = admin.get_user(pb::GetUserRequest { id: "alice@acme.com".into() }).await.unwrap().into_inner();
    assert_eq!(by_email.id, users[0].id);
    assert_eq!(by_email.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), [node.id.as_str()]);
    let in_tailnet = admin.list_users(pb::ListUsersRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert_eq!(in_tailnet.into_inner().users.len(), 1);

    // Logging in again with the same key keeps the node's id and address; groups are refreshed.
    let mut moved = alice();
    moved.groups = Some(vec!["engineering".into()]);
    let relogged = log_in(&mut nodes, &idp, &tailnet.id, &key, moved).await.expect("approved again");
    let renewed = relogged.node.unwrap();
    assert_eq!((renewed.id.as_str(), &renewed.addresses), (node.id.as_str(), &node.addresses));
    assert_eq!(renewed.user.unwrap().groups, ["engineering"]);
    assert_ne!(relogged.session_token, joined.session_token);

    // Someone else cannot log in with alice's node key.
    let bob = Person::new("00u-bob", "bob@acme.com", &["engineering"]);
    let taken = log_in(&mut nodes, &idp, &tailnet.id, &key, bob).await.unwrap_err();
    assert_eq!(taken.code(), Code::PermissionDenied, "{taken:?}");
    assert!(taken.message().contains("wireguard_public_key"), "{taken:?}");

    let events = events(&mut admin, &tailnet.id).await;
    let logins: Vec<&pb::Event> =
        events.iter().filter(|e| e.kind() == pb::EventKind::UserLoggedIn).collect();
    assert_eq!(logins.len(), 2, "{events:#?}");
    let stamped = logins[0].user.as_ref().expect("the event names the person");
    assert_eq!((stamped.email.as_str(), stamped.groups.len()), ("alice@acme.com", 2));
    assert_eq!(logins[0].actor, "user:alice@acme.com");
    assert!(events.iter().any(|e| e.kind() == pb::EventKind::LoginProviderCreated && e.summary.contains("acme-sso")));
    assert!(!format!("{events:?}").contains(CLIENT_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_say_why_in_one_line() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let (tailnet, _) = tailnet_with_provider(&mut admin, &idp, "refusals").await;

    // Denied at the IdP.
    let started = start(&mut nodes, &tailnet.id, &wireguard_key(), "laptop").await;
    idp.deny(&started.user_code);
    let e = wait(&mut nodes, &started.login_id).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("acme-sso") && e.message().contains("denied"), "{e:?}");

    // The code expired before anyone approved it.
    let started = start(&mut nodes, &tailnet.id, &wireguard_key(), "laptop").await;
    idp.expire(&started.user_code);
    let e = wait(&mut nodes, &started.login_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");

    // An ID token for another client.
    let mut forged = alice();
    forged.audience = Some("someone-else".into());
    let e = log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), forged).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("audience"), "{e:?}");

    // An email domain the provider does not allow.
    let outsider = Person::new("00u-eve", "eve@evil.example", &["engineering"]);
    let e = log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), outsider).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("email domain evil.example is not allowed"), "{e:?}");

    // No groups claim, where only members of a group may log in.
    let mut groupless = alice();
    groupless.groups = None;
    let e = log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), groupless.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("no groups claim"), "{e:?}");

    // In no allowed group.
    let sales = Person::new("00u-sam", "sam@acme.com", &["sales"]);
    let e = log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), sales).await.unwrap_err();
    assert!(e.message().contains("none of the groups"), "{e:?}");

    // Every refusal is in the audit log, naming the person where the IdP said who it was.
    let events = events(&mut admin, &tailnet.id).await;
    let refused: Vec<&pb::Event> = events.iter().filter(|e| e.kind() == pb::EventKind::LoginRefused).collect();
    assert_eq!(refused.len(), 6, "{refused:#?}");
    assert!(refused.iter().any(|e| e.actor == "user:eve@evil.example"));
    assert!(events.iter().all(|e| e.kind() != pb::EventKind::UserLoggedIn));

    // A provider that admits anyone of the domain takes a login without a groups claim: no groups.
    let mut open = cordon_tests::tailnet_request("open");
    open.policy_json = POLICY.into();
    let open = admin.create_tailnet(open).await.unwrap().into_inner();
    let mut req = provider_request(&open.id, &idp);
    req.allowed_groups.clear();
    admin.create_login_provider(req).await.unwrap();
    let joined = log_in(&mut nodes, &idp, &open.id, &wireguard_key(), groupless).await.expect("admitted");
    assert!(joined.node.unwrap().user.unwrap().groups.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_adds_five_seconds_to_the_polling_interval() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let (tailnet, _) = tailnet_with_provider(&mut admin, &idp, "slow").await;
    idp.slow_down(1);
    let started = start(&mut nodes, &tailnet.id, &wireguard_key(), "laptop").await;
    idp.approve(&started.user_code, alice());
    wait(&mut nodes, &started.login_id).await.expect("approved after the slow_down");
    // The IdP forgets an approved code; count the polls through a second login that stays pending.
    idp.slow_down(1);
    let started = start(&mut nodes, &tailnet.id, &wireguard_key(), "laptop").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let polls = loop {
        let polls = idp.polls(&started.user_code);
        if polls.len() >= 3 || Instant::now() > deadline {
            break polls;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(polls.len() >= 3, "the server kept polling: {polls:?}");
    // RFC 8628: after slow_down the interval grows by 5 s, and stays grown (interval 1 s here).
    assert!(polls[1] - polls[0] >= Duration::from_secs(5), "{:?}", polls[1] - polls[0]);
    assert!(polls[2] - polls[1] >= Duration::from_secs(5), "{:?}", polls[2] - polls[1]);
    idp.deny(&started.user_code);
    wait(&mut nodes, &started.login_id).await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_providers_and_bad_input_get_errors_that_name_them() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = cordon_tests::create_tailnet(&mut admin, "bad").await;

    let cases: Vec<(&str, Box<dyn Fn(&mut pb::CreateLoginProviderRequest)>)> = vec![
        ("name", Box::new(|r| r.name = "Acme SSO".into())),
        ("issuer", Box::new(|r| r.issuer = "http://idp.example.com".into())),
        ("client_id", Box::new(|r| r.client_id.clear())),
        ("login_lifetime_seconds", Box::new(|r| r.login_lifetime_seconds = 5)),
        ("allowed_email_domains[0]", Box::new(|r| r.allowed_email_domains = vec!["not a domain".into()])),
        ("groups_claim", Box::new(|r| r.groups_claim = "groups claim".into())),
        ("tailnet_id", Box::new(|r| r.tailnet_id = "nope".into())),
    ];
    for (field, spoil) in cases {
        let mut req = provider_request(&tailnet.id, &idp);
        spoil(&mut req);
        let e = admin.create_login_provider(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {e:?}");
        assert!(!e.message().contains(CLIENT_SECRET));
    }

    // An issuer nobody answers at: refused at creation, naming the provider.
    let mut req = provider_request(&tailnet.id, &idp);
    req.issuer = "http://127.0.0.1:9".into();
    let e = admin.create_login_provider(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("acme-sso") && e.message().contains("http://127.0.0.1:9"), "{e:?}");

    // No provider yet: StartLogin says so.
    let req = pb::StartLoginRequest {
        tailnet_id: tailnet.id.clone(),
        wireguard_public_key: wireguard_key(),
        hostname: "laptop".into(),
        ..Default::default()
    };
    let e = nodes.start_login(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no login provider"), "{e:?}");
    let mut short = req.clone();
    short.wireguard_public_key = vec![1, 2, 3];
    let e = nodes.start_login(short).await.unwrap_err();
    assert!(e.message().starts_with("wireguard_public_key"), "{e:?}");

    // A discovery document that stops naming a device endpoint.
    admin.create_login_provider(provider_request(&tailnet.id, &idp)).await.unwrap();
    idp.drop_device_endpoint();
    let e = nodes.start_login(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("acme-sso") && e.message().contains("device_authorization_endpoint"), "{e:?}");

    // A token endpoint that answers something that is not JSON.
    let garbage = Idp::start().await;
    let other = cordon_tests::create_tailnet(&mut admin, "garbage").await;
    admin.create_login_provider(provider_request(&other.id, &garbage)).await.unwrap();
    garbage.answer_garbage();
    let started = start(&mut nodes, &other.id, &wireguard_key(), "laptop").await;
    let e = wait(&mut nodes, &started.login_id).await.unwrap_err();
    assert!(e.message().contains("acme-sso") && e.message().contains("not valid JSON"), "{e:?}");

    // Same name twice in one tailnet.
    let mut again = provider_request(&other.id, &garbage);
    again.client_secret.clear();
    let e = admin.create_login_provider(again).await.unwrap_err();
    assert!(e.message().starts_with("name") && e.message().contains("already"), "{e:?}");

    // Deleting a provider ends new logins through it.
    let providers =
        admin.list_login_providers(pb::ListLoginProvidersRequest { tailnet_id: other.id.clone() }).await.unwrap();
    for p in providers.into_inner().providers {
        admin.delete_login_provider(pb::DeleteLoginProviderRequest { id: p.id, reason: "moved".into() }).await.unwrap();
    }
    let mut req = req;
    req.tailnet_id = other.id.clone();
    assert_eq!(nodes.start_login(req).await.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_expires_and_offboarding_cuts_every_node() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut create = cordon_tests::tailnet_request("expiry");
    create.policy_json = POLICY.into();
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let mut req = provider_request(&tailnet.id, &idp);
    req.login_lifetime_seconds = 10;
    admin.create_login_provider(req).await.unwrap();

    // Two of alice's devices; one watches the other.
    let (laptop_key, phone_key) = (wireguard_key(), wireguard_key());
    let laptop = log_in(&mut nodes, &idp, &tailnet.id, &laptop_key, alice()).await.unwrap();
    let phone = log_in(&mut nodes, &idp, &tailnet.id, &phone_key, alice()).await.unwrap();
    let laptop_node = laptop.node.clone().unwrap();
    let mut stream = cordon_tests::watch(&mut nodes, &laptop.session_token).await;
    let Some(pb::net_map::Update::Full(full)) = cordon_tests::next_netmap(&mut stream).await.update else {
        panic!("a full netmap first")
    };
    assert_eq!(full.peers.len(), 1, "alice's two devices see each other (autogroup:member)");

    // The login runs out: the stream ends saying so, and the session no longer works.
    let ended = ending(&mut stream).await;
    assert_eq!(ended.reason(), pb::stream_ended::Reason::LoginExpired, "{ended:?}");
    assert!(ended.message.contains("agentd login") && !ended.retry, "{ended:?}");
    let e = nodes.watch_net_map(pb::WatchNetMapRequest { session_token: laptop.session_token.clone() }).await;
    assert_eq!(e.unwrap_err().code(), Code::Unauthenticated);
    let listed = admin.get_node(pb::GetNodeRequest { id: laptop_node.id.clone() }).await.unwrap().into_inner();
    assert_eq!(listed.addresses, laptop_node.addresses, "the node stays, with its address");

    // Logging in again brings the same node back.
    let back = log_in(&mut nodes, &idp, &tailnet.id, &laptop_key, alice()).await.unwrap();
    assert_eq!(back.node.unwrap().id, laptop_node.id);
    let events = events(&mut admin, &tailnet.id).await;
    assert!(events.iter().any(|e| e.kind() == pb::EventKind::LoginExpired && e.node_id == laptop_node.id));

    // Offboarding: every node of hers goes at once, each stream ending with the reason.
    let mut stream = cordon_tests::watch(&mut nodes, &back.session_token).await;
    cordon_tests::next_netmap(&mut stream).await;
    let req = pb::DeleteUserRequest { id: "alice@acme.com".into(), reason: "left the company".into() };
    let removed = admin.delete_user(req).await.unwrap().into_inner();
    assert_eq!(removed.nodes_removed, 2);
    let ended = ending(&mut stream).await;
    assert_eq!(ended.reason(), pb::stream_ended::Reason::UserDeleted);
    assert!(ended.message.contains("left the company"), "{ended:?}");
    let e = nodes.watch_net_map(pb::WatchNetMapRequest { session_token: phone.session_token.clone() }).await;
    assert_eq!(e.unwrap_err().code(), Code::Unauthenticated);
    assert!(admin.list_users(pb::ListUsersRequest::default()).await.unwrap().into_inner().users.is_empty());
    let e = admin.get_user(pb::GetUserRequest { id: "alice@acme.com".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_request_tags_they_own() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let (tailnet, _) = tailnet_with_provider(&mut admin, &idp, "tags").await;
    let mut req = pb::StartLoginRequest {
        tailnet_id: tailnet.id.clone(),
        wireguard_public_key: wireguard_key(),
        hostname: "build-box".into(),
        requested_tags: vec!["tag:build".into()],
        ..Default::default()
    };
    // tag:build is owned by group:eng (idp:engineering): alice may put it on her build box.
    let started = nodes.start_login(req.clone()).await.unwrap().into_inner();
    idp.approve(&started.user_code, alice());
    let node = wait(&mut nodes, &started.login_id).await.unwrap().node.unwrap();
    assert_eq!(node.tags, ["tag:build"]);
    // tag:ci has no owners among people.
    req.requested_tags = vec!["tag:ci".into()];
    req.wireguard_public_key = wireguard_key();
    let started = nodes.start_login(req).await.unwrap().into_inner();
    idp.approve(&started.user_code, alice());
    let e = wait(&mut nodes, &started.login_id).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("requested_tags[0]") && e.message().contains("tag:ci"), "{e:?}");
}
