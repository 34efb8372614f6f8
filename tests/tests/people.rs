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
    let logins: Vec<&pb::Event> = events.iter().filter(|e| e.kind() == pb::EventKind::UserLoggedIn).collect();
    assert_eq!(logins.len(), 2, "{events:#?}");
    let stamped = logins[0].user.as_ref().expect("the event names the person");
    assert_eq!((stamped.email.as_str(), stamped.groups.len()), ("alice@acme.com", 2));
    assert_eq!(logins[0].actor, "user:alice@acme.com");
    assert!(events.iter().any(|e| e.kind() == pb::EventKind::LoginProviderCreated && e.summary.contains("acme-sso")));
    assert!(!format!("{events:?}").contains(CLIENT_SECRET));

    // The tailnet's provider goes with it; the user stays (a person may be in other tailnets), nodeless.
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id.clone(), reason: "done".into() }).await.unwrap();
    let listed = admin.list_login_providers(pb::ListLoginProvidersRequest::default()).await.unwrap().into_inner();
    assert!(listed.providers.is_empty(), "{listed:?}");
    let alice = admin.get_user(pb::GetUserRequest { id: "alice@acme.com".into() }).await.unwrap().into_inner();
    assert!(alice.nodes.is_empty());
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

    type Spoil = Box<dyn Fn(&mut pb::CreateLoginProviderRequest)>;
    let cases: Vec<(&str, Spoil)> = vec![
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
    let e = nodes
        .watch_net_map(pb::WatchNetMapRequest { session_token: laptop.session_token.clone(), ..Default::default() })
        .await;
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
    let e = nodes
        .watch_net_map(pb::WatchNetMapRequest { session_token: phone.session_token.clone(), ..Default::default() })
        .await;
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

// -----------------------------------------------------------------------------------------------------
// The real binaries

type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Starts `agentd login` (or `up`, with `args`) writing its log to `log`.
fn agentd(
    command: &str,
    server: &str,
    state: &std::path::Path,
    log: &std::path::Path,
    args: &[&str],
) -> (tokio::process::Child, Lines) {
    let mut child = tokio::process::Command::new(cordon_tests::agentd_bin())
        .args([command, "--server", server])
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("AGENTD_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agentd");
    let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    (child, lines)
}

/// The first stdout line containing `needle` (within 30 s).
async fn line_with(lines: &mut Lines, needle: &str) -> String {
    let find = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("agentd exited before printing {needle:?}")
    };
    tokio::time::timeout(Duration::from_secs(30), find).await.unwrap_or_else(|_| panic!("no {needle:?} within 30 s"))
}

/// The code agentd told the person to enter.
async fn user_code(lines: &mut Lines) -> String {
    let line = line_with(lines, "enter the code").await;
    line.rsplit(' ').next().unwrap().to_string()
}

async fn exit_code(child: &mut tokio::process::Child) -> i32 {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("agentd exits").unwrap();
    status.code().expect("an exit code")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn gateway_answers(base: &str) {
    let client = cordon_tests::llm::http_client();
    let url = format!("{base}/v1/models");
    cordon_tests::eventually(Duration::from_secs(20), "the gateway answers through agentd", || async {
        cordon_tests::llm::request(&client, "GET", &url, None, &[]).await.ok().filter(|r| r.0 == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_on_her_laptop_and_a_ci_run_are_told_apart_at_the_gateway() {
    if let Some(why) = cordon_tests::llm::sdks_missing() {
        let reason = format!("the openai/anthropic Python SDKs are not installed ({why}); run scripts/test.sh as root");
        return cordon_tests::skip("alice_on_her_laptop_and_a_ci_run_are_told_apart_at_the_gateway", &reason);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server_log = dir.path().join("server.log");
    let mut server = cordon_tests::ServerProcess::spawn(&data, &server_log).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let channel = tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut admin = pb::control_client::ControlClient::with_interceptor(channel, cordon_tests::Bearer::new(&token));
    let idp = Idp::start().await;
    let issuer = cordon_tests::oidc::Issuer::start(&["rsa1"]).await;
    let llm = cordon_tests::llm::FakeLlm::start().await;

    let mut create = cordon_tests::tailnet_request("scene");
    create.policy_json = POLICY.into();
    create.upstreams = cordon_tests::llm::upstreams(&llm);
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    admin.create_login_provider(provider_request(&tailnet.id, &idp)).await.unwrap();
    admin.create_trust_rule(issuer.ci_rule(&tailnet.id)).await.unwrap();

    // Alice logs in on her laptop: agentd shows where to approve, she approves at the IdP.
    let alice_state = dir.path().join("alice");
    let alice_port = free_port();
    let forward = format!("127.0.0.1:{alice_port}=gateway:80");
    let alice_log = dir.path().join("alice.log");
    let login_args = ["--tailnet", &tailnet.id, "--hostname", "laptop", "--forward", &forward];
    let (mut laptop, mut out) = agentd("login", &server.url, &alice_state, &alice_log, &login_args);
    let code = user_code(&mut out).await;
    idp.approve(&code, alice());
    line_with(&mut out, "agentd: up as laptop").await;
    let alice_base = format!("http://127.0.0.1:{alice_port}");
    gateway_answers(&alice_base).await;

    // A CI run joins with its OIDC token, as tag:ci.
    let ci_state = dir.path().join("ci");
    let token_file = dir.path().join("ci.jwt");
    std::fs::write(&token_file, cordon_tests::oidc::sign(&issuer.claims("cordon", "acme/api"), "rsa1", "rsa1"))
        .unwrap();
    let ci_port = free_port();
    let forward = format!("127.0.0.1:{ci_port}=gateway:80");
    let ci_args = [
        "--tailnet",
        &tailnet.id,
        "--hostname",
        "ci-runner",
        "--forward",
        &forward,
        "--oidc-token-file",
        token_file.to_str().unwrap(),
    ];
    let (mut runner, mut ci_out) = agentd("up", &server.url, &ci_state, &dir.path().join("ci.log"), &ci_args);
    line_with(&mut ci_out, "agentd: up as ci-runner").await;
    let ci_base = format!("http://127.0.0.1:{ci_port}");
    gateway_answers(&ci_base).await;

    // Both through the official SDKs: alice may use Anthropic, the CI run may not.
    let said = cordon_tests::llm::sdk_script(&alice_base, "person").await;
    assert!(said.contains("ok person anthropic") && said.contains("ok person openai"), "{said}");
    let said = cordon_tests::llm::sdk_script(&ci_base, "ci").await;
    assert!(said.contains("ok ci openai") && said.contains("ok ci denied anthropic"), "{said}");

    // The audit log tells them apart: a person with her groups, a run with its tags and claims.
    let events = events(&mut admin, &tailnet.id).await;
    let requests: Vec<(&pb::Event, &pb::GatewayRequest)> =
        events.iter().filter_map(|e| e.gateway.as_ref().map(|g| (e, g))).filter(|(_, g)| g.api != "models").collect();
    let alices: Vec<_> =
        requests.iter().filter(|(e, _)| e.user.as_ref().is_some_and(|u| u.email == "alice@acme.com")).collect();
    let runs: Vec<_> = requests.iter().filter(|(e, _)| e.run.is_some()).collect();
    assert_eq!(alices.len() + runs.len(), requests.len(), "every request is a person's or a run's");
    assert!(alices.iter().all(|(e, _)| e.user.as_ref().unwrap().groups.contains(&"engineering".to_string())));
    assert!(alices.iter().any(|(_, g)| g.model == "claude-sonnet-4" && g.decision == "allowed"), "{alices:#?}");
    assert!(runs.iter().all(|(e, g)| e.user.is_none() && g.tags == ["tag:ci"]));
    assert!(
        runs.iter()
            .all(|(e, _)| e.run.as_ref().unwrap().claims.get("repository").map(String::as_str) == Some("acme/api"))
    );
    let denied =
        runs.iter().find(|(_, g)| g.model == "claude-sonnet-4").expect("the CI run's Anthropic call is logged");
    assert_eq!((denied.1.decision.as_str(), denied.1.rule.as_str()), ("denied", "models"));

    // whois names the person behind the laptop (asked on the laptop: the CI run may not see it).
    let user = admin.get_user(pb::GetUserRequest { id: "alice@acme.com".into() }).await.unwrap().into_inner();
    let laptop_ip = user.nodes[0].addresses[0].clone();
    let whois = tokio::process::Command::new(cordon_tests::agentd_bin())
        .args(["whois", &laptop_ip, "--state-dir"])
        .arg(&alice_state)
        .output()
        .await
        .unwrap();
    let whois: serde_json::Value = serde_json::from_slice(&whois.stdout).expect("whois prints JSON");
    assert_eq!(whois["user"]["email"], "alice@acme.com", "{whois}");
    assert_eq!(whois["user"]["groups"][0], "engineering", "{whois}");

    // Offboarding: deleting alice cuts her laptop off; agentd says so and exits.
    let cut = Instant::now();
    let req = pb::DeleteUserRequest { id: "alice@acme.com".into(), reason: "offboarded".into() };
    admin.delete_user(req).await.unwrap();
    assert_eq!(exit_code(&mut laptop).await, 3, "revoked: it does not retry");
    println!("alice's agentd exited {:?} after DeleteUser", cut.elapsed());
    let log = std::fs::read_to_string(&alice_log).unwrap();
    assert!(log.contains("offboarded"), "agentd says why");

    // The IdP no longer lists her in engineering: logging in again is refused, in one line.
    let (mut again, mut out) = agentd("login", &server.url, &alice_state, &alice_log, &login_args);
    let code = user_code(&mut out).await;
    idp.approve(&code, Person::new("00u-alice", "alice@acme.com", &["everyone"]));
    assert_eq!(exit_code(&mut again).await, 4);
    let log = std::fs::read_to_string(&alice_log).unwrap();
    let refusal: Vec<&str> = log.lines().filter(|l| l.starts_with("agentd: login failed")).collect();
    assert_eq!(refusal.len(), 1, "{log}");
    assert!(refusal[0].contains("none of the groups"), "{log}");

    // Nothing about the ID tokens, device codes, access tokens or the client secret reached a log.
    runner.start_kill().unwrap();
    runner.wait().await.unwrap();
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let logs = [&server_log, &alice_log, &dir.path().join("ci.log")]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    assert!(logs.lines().count() > 50, "debug logs were written");
    let secrets = idp.secrets();
    assert!(secrets.len() >= 7, "client secret, device codes, ID and access tokens: {}", secrets.len());
    for secret in secrets {
        assert!(!logs.contains(&secret), "an IdP secret ({} characters) is in a debug log", secret.len());
    }
    let session = std::fs::read_to_string(ci_state.join("session.json")).unwrap_or_default();
    if let Some(token) = serde_json::from_str::<serde_json::Value>(&session)
        .ok()
        .and_then(|s| s["session_token"].as_str().map(str::to_string))
    {
        assert!(!logs.contains(&token));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_login_stops_agentd_until_the_person_logs_in_again() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut create = cordon_tests::tailnet_request("expiring");
    create.policy_json = POLICY.into();
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let mut req = provider_request(&tailnet.id, &idp);
    req.login_lifetime_seconds = 10;
    admin.create_login_provider(req).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (state, log) = (dir.path().join("state"), dir.path().join("agentd.log"));
    let args = ["--tailnet", &tailnet.id, "--hostname", "laptop"];
    let (mut agent, mut out) = agentd("login", &server.url, &state, &log, &args);
    let code = user_code(&mut out).await;
    idp.approve(&code, alice());
    let up = line_with(&mut out, "agentd: up as laptop").await;
    assert_eq!(exit_code(&mut agent).await, 6, "the documented code for an expired login");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.lines().any(|l| l.starts_with("agentd: ") && l.contains("run `agentd login`")), "{said}");

    // `agentd login` again: the same node, at the same address.
    let (mut agent, mut out) = agentd("login", &server.url, &state, &log, &args);
    let code = user_code(&mut out).await;
    idp.approve(&code, alice());
    let again = line_with(&mut out, "agentd: up as laptop").await;
    let address = |line: &str| line.split(['(', ')']).nth(1).map(str::to_string);
    assert_eq!(address(&again), address(&up), "{up} / {again}");
    let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await;
    let nodes = nodes.unwrap().into_inner().nodes;
    assert_eq!(nodes.iter().filter(|n| n.user.is_some()).count(), 1, "one node, logged in twice: {nodes:#?}");
    agent.start_kill().unwrap();
}

/// `cordon ARGS --json`, against `server`, with `stdin`.
async fn cordon_json(server: &TestServer, args: &[&str], stdin: &str) -> serde_json::Value {
    let args = [args, &["--json", "--server", &server.url, "--token", &server.admin_token]].concat();
    let out = cordon_tests::run_cordon(&args, stdin).await;
    assert!(out.status.success(), "cordon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(CLIENT_SECRET));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cordon {args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_login_providers_and_offboards_users() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut create = cordon_tests::tailnet_request("cli");
    create.policy_json = POLICY.into();
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let args = [
        "login-provider",
        "create",
        "acme-sso",
        "--tailnet",
        &tailnet.id,
        "--issuer",
        &idp.url,
        "--client-id",
        CLIENT_ID,
        "--client-secret-file",
        "-",
        "--group",
        "engineering",
        "--email-domain",
        "acme.com",
        "--reason",
        "okta",
    ];
    let provider = cordon_json(&server, &args, CLIENT_SECRET).await;
    assert_eq!(provider["has_client_secret"], true);
    assert_eq!(provider["allowed_groups"][0], "engineering");
    let listed = cordon_json(&server, &["login-provider", "list", "--tailnet", &tailnet.id], "").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);

    log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), alice()).await.unwrap();
    let users = cordon_json(&server, &["user", "list"], "").await;
    assert_eq!(users[0]["email"], "alice@acme.com");
    let shown = cordon_json(&server, &["user", "show", "alice@acme.com"], "").await;
    assert_eq!(shown["nodes"][0]["hostname"], "laptop");
    let deleted = cordon_json(&server, &["user", "delete", "alice@acme.com", "--reason", "offboarded"], "").await;
    assert_eq!(deleted["nodes_removed"], 1);
    let id = provider["id"].as_str().unwrap();
    let gone = cordon_json(&server, &["login-provider", "delete", id, "--reason", "moved"], "").await;
    assert_eq!(gone["deleted"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_owner_scopes_govern_providers_and_users() {
    let server = TestServer::start().await;
    let idp = Idp::start().await;
    let mut root = server.admin().await;
    let mut nodes = server.nodes().await;
    let token = |name: &'static str, role: pb::Role, scope: &'static str| {
        let req = pb::CreateAdminTokenRequest {
            name: name.into(),
            role: role.into(),
            owner_scope: scope.into(),
            reason: "test".into(),
            ..Default::default()
        };
        let mut root = root.clone();
        async move { root.create_admin_token(req).await.unwrap().into_inner().secret }
    };
    let (acme_admin, acme_auditor, acme_operator, globex_admin) = (
        token("acme-admin", pb::Role::Admin, "acme").await,
        token("acme-auditor", pb::Role::Auditor, "acme").await,
        token("acme-operator", pb::Role::Operator, "acme").await,
        token("globex-admin", pb::Role::Admin, "globex").await,
    );
    let (mut acme_admin, mut acme_auditor, mut acme_operator, mut globex_admin) = (
        server.admin_as(&acme_admin).await,
        server.admin_as(&acme_auditor).await,
        server.admin_as(&acme_operator).await,
        server.admin_as(&globex_admin).await,
    );
    let mut create = cordon_tests::tailnet_request("acme");
    create.owner = "acme".into();
    create.policy_json = POLICY.into();
    let tailnet = root.create_tailnet(create).await.unwrap().into_inner();

    // Only admins make providers, and a scoped admin only for its owner's tailnets.
    let e = acme_auditor.create_login_provider(provider_request(&tailnet.id, &idp)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = globex_admin.create_login_provider(provider_request(&tailnet.id, &idp)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "another owner's tailnet does not exist for it: {e:?}");
    let e = acme_admin.create_login_provider(provider_request("", &idp)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "server-wide needs an unscoped credential: {e:?}");
    let provider = acme_admin.create_login_provider(provider_request(&tailnet.id, &idp)).await.unwrap().into_inner();
    assert_eq!(provider.created_by, "token:acme-admin");
    let seen = |list: pb::ListLoginProvidersResponse| list.providers.len();
    let req = pb::ListLoginProvidersRequest::default();
    assert_eq!(seen(acme_auditor.list_login_providers(req.clone()).await.unwrap().into_inner()), 1);
    assert_eq!(seen(globex_admin.list_login_providers(req).await.unwrap().into_inner()), 0);

    log_in(&mut nodes, &idp, &tailnet.id, &wireguard_key(), alice()).await.unwrap();
    let users = |list: pb::ListUsersResponse| list.users.len();
    let req = pb::ListUsersRequest::default();
    assert_eq!(users(acme_auditor.list_users(req.clone()).await.unwrap().into_inner()), 1);
    assert_eq!(users(globex_admin.list_users(req).await.unwrap().into_inner()), 0);
    let get = pb::GetUserRequest { id: "alice@acme.com".into() };
    assert_eq!(globex_admin.get_user(get.clone()).await.unwrap_err().code(), Code::NotFound);
    let delete = pb::DeleteUserRequest { id: "alice@acme.com".into(), reason: "offboarded".into() };
    assert_eq!(acme_auditor.delete_user(delete.clone()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(globex_admin.delete_user(delete.clone()).await.unwrap_err().code(), Code::NotFound);
    let removed = acme_operator.delete_user(delete).await.unwrap().into_inner();
    assert_eq!(removed.nodes_removed, 1);
    let events = events(&mut root, &tailnet.id).await;
    let left = events.iter().find(|e| e.kind() == pb::EventKind::NodeLeft).expect("the node left");
    assert_eq!((left.actor.as_str(), left.reason.as_str()), ("token:acme-operator", "offboarded"));
}
