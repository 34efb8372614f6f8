//! The admin and node APIs over real gRPC on loopback: lifecycles, and every validation error.

use cordon_tests::v1 as pb;
use cordon_tests::*;
use tonic::Code;

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "message {:?} should contain {needle:?}", status.message());
}

#[tokio::test]
async fn tailnet_lifecycle() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;

    let mut req = tailnet_request("run-1");
    req.ttl_seconds = 3600;
    req.labels = [("env".to_string(), "ci".to_string())].into();
    let created = admin.create_tailnet(req).await.unwrap().into_inner();
    assert_eq!(created.name, "run-1");
    assert_eq!(created.cidr, "100.64.0.0/10");
    assert_eq!(created.gateway_address, "100.64.0.1");
    assert!(created.expires_at.is_some());
    assert!(created.created_by.starts_with("admin:"));
    uuid_v7(&created.id);

    let got = admin.get_tailnet(pb::GetTailnetRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, created);

    let mut other = tailnet_request("other");
    other.owner = "globex".into();
    other.cidr = "10.9.0.0/24".into();
    let other = admin.create_tailnet(other).await.unwrap().into_inner();
    assert_eq!(other.gateway_address, "10.9.0.1");

    let list = |owner: &str, selector: &str| pb::ListTailnetsRequest {
        owner: owner.into(),
        label_selector: selector.into(),
        ..Default::default()
    };
    let by_owner = admin.list_tailnets(list("globex", "")).await.unwrap().into_inner().tailnets;
    assert_eq!(by_owner.iter().map(|t| &t.id).collect::<Vec<_>>(), [&other.id]);
    let by_label = admin.list_tailnets(list("", "env=ci")).await.unwrap().into_inner().tailnets;
    assert_eq!(by_label.iter().map(|t| &t.id).collect::<Vec<_>>(), [&created.id]);
    let without = admin.list_tailnets(list("", "!env")).await.unwrap().into_inner().tailnets;
    assert_eq!(without.iter().map(|t| &t.id).collect::<Vec<_>>(), [&other.id]);

    let deleted = admin
        .delete_tailnet(pb::DeleteTailnetRequest { id: created.id.clone(), reason: "done".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.nodes_revoked, 0);
    assert_status(
        admin.get_tailnet(pb::GetTailnetRequest { id: created.id.clone() }).await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        admin.delete_tailnet(pb::DeleteTailnetRequest { id: created.id.clone(), reason: String::new() }).await,
        Code::NotFound,
        &created.id,
    );

    // The audit log outlives the tailnet.
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: created.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<_> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, [pb::EventKind::TailnetCreated, pb::EventKind::TailnetDeleted]);
    assert_eq!(events[1].reason, "done");
    assert!(events[1].actor.starts_with("admin:"));
}

fn uuid_v7(id: &str) {
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(&id[14..15], "7", "{id} is not a UUIDv7");
}

#[tokio::test]
async fn list_tailnets_paginates() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(create_tailnet(&mut admin, &format!("t{i}")).await.id);
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_tailnets(pb::ListTailnetsRequest { page_size: 3, page_token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tailnets.len() <= 3);
        seen.extend(page.tailnets.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, made, "every tailnet once, in creation order");
    assert_status(
        admin.list_tailnets(pb::ListTailnetsRequest { page_token: "garbage".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "page_token",
    );
}

#[tokio::test]
async fn auth_keys_and_nodes_lifecycle() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "keys").await;

    let (key, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    assert!(secret.starts_with("cordon-auth-"));
    assert!(secret.len() >= "cordon-auth-".len() + 43, "at least 256 bits of randomness");
    assert_eq!(key.state, "valid");
    let expiry = key.expires_at.unwrap().seconds - key.created_at.unwrap().seconds;
    assert_eq!(expiry, 3600, "default expiry is one hour");

    let a = register(&mut nodes, &secret, "Laptop").await;
    let b = register(&mut nodes, &secret, "laptop").await;
    let a_node = a.node.unwrap();
    let b_node = b.node.unwrap();
    assert_eq!(a_node.hostname, "laptop");
    assert_eq!(b_node.hostname, "laptop-1", "hostnames are made unique");
    assert_eq!(a_node.addresses[0], "100.64.0.2");
    assert_eq!(b_node.addresses[0], "100.64.0.3");
    assert_eq!(a_node.tags, ["tag:ci"]);
    assert_eq!(a_node.owner, "acme");
    assert!(a.session_token.starts_with("cordon-session-"));
    uuid_v7(&a_node.id);

    let keys = admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    let listed = format!("{:?}", keys.get_ref());
    assert!(!listed.contains(&secret[12..]), "ListAuthKeys never shows a secret");
    assert_eq!(keys.into_inner().keys[0].uses, 2);

    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    assert_eq!(listed.nodes.len(), 2);
    assert!(!format!("{listed:?}").contains(&a.session_token[15..]), "no session token in ListNodes");

    // Leave frees the address; the next node gets it back.
    nodes.leave(pb::LeaveRequest { session_token: a.session_token.clone() }).await.unwrap();
    let c = register(&mut nodes, &secret, "ci").await.node.unwrap();
    assert_eq!(c.addresses[0], "100.64.0.2", "freed addresses are reused");
    assert_status(
        nodes.leave(pb::LeaveRequest { session_token: a.session_token.clone() }).await,
        Code::Unauthenticated,
        "session_token",
    );

    admin.delete_node(pb::DeleteNodeRequest { id: b_node.id.clone(), reason: "decommissioned".into() }).await.unwrap();
    assert_status(
        admin.delete_node(pb::DeleteNodeRequest { id: b_node.id.clone(), reason: String::new() }).await,
        Code::NotFound,
        "node",
    );

    // Revoking the key revokes the nodes it admitted, and the key admits no more.
    let revoked = admin
        .revoke_auth_key(pb::RevokeAuthKeyRequest { id: key.id.clone(), reason: "leaked".into(), keep_nodes: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.nodes_revoked, 1);
    assert_status(nodes.register(register_request(&secret, "x")).await, Code::Unauthenticated, "revoked");
    let keys = admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert_eq!(keys.into_inner().keys[0].state, "revoked");
    let left = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert!(left.into_inner().nodes.is_empty());
    let _ = c;
}

#[tokio::test]
async fn same_wireguard_key_reauthenticates_the_same_node() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "reauth").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let req = register_request(&secret, "box");
    let first = nodes.register(req.clone()).await.unwrap().into_inner();
    let second = nodes.register(req).await.unwrap().into_inner();
    assert_eq!(first.node.as_ref().unwrap().id, second.node.as_ref().unwrap().id);
    assert_eq!(first.node.unwrap().addresses, second.node.unwrap().addresses);
    assert_status(
        nodes.leave(pb::LeaveRequest { session_token: first.session_token }).await,
        Code::Unauthenticated,
        "session",
    );
}

#[tokio::test]
async fn auth_key_failures_say_which() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "keyfail").await;

    let (_, single) = create_key(&mut admin, &tailnet.id, false, false).await;
    register(&mut nodes, &single, "one").await;
    assert_status(nodes.register(register_request(&single, "two")).await, Code::Unauthenticated, "exhausted");

    let limited = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            reusable: true,
            max_uses: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    register(&mut nodes, &limited.secret, "a").await;
    register(&mut nodes, &limited.secret, "b").await;
    assert_status(nodes.register(register_request(&limited.secret, "c")).await, Code::Unauthenticated, "2 of 2");

    let unknown = format!("cordon-auth-{}", "A".repeat(43));
    assert_status(nodes.register(register_request(&unknown, "x")).await, Code::Unauthenticated, "unknown key");

    let (key, revoked) = create_key(&mut admin, &tailnet.id, true, false).await;
    admin.revoke_auth_key(pb::RevokeAuthKeyRequest { id: key.id, ..Default::default() }).await.unwrap();
    let status = nodes.register(register_request(&revoked, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"));
    assert!(!status.message().contains(&revoked[12..]), "errors never echo the secret");

    // Requested tags must be among the key's.
    let mut req = register_request(&limited.secret, "x");
    req.requested_tags = vec!["tag:admin".into()];
    let (_, reusable) = create_key(&mut admin, &tailnet.id, true, false).await;
    req.credential = Some(pb::register_request::Credential::AuthKey(reusable));
    assert_status(nodes.register(req).await, Code::PermissionDenied, "requested_tags[0]");
}

#[tokio::test]
async fn expired_key_is_refused_with_its_expiry() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "expiry").await;
    let r = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            expires_in_seconds: 1,
            reusable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.key.unwrap().expires_at.is_some());
    // Poll with a deadline rather than sleeping a guessed time.
    eventually(std::time::Duration::from_secs(5), "the key to expire", || {
        let mut nodes = nodes.clone();
        let secret = r.secret.clone();
        async move {
            match nodes.register(register_request(&secret, "late")).await {
                Err(s) if s.code() == Code::Unauthenticated && s.message().contains("auth_key: expired at") => Some(()),
                Err(s) => panic!("unexpected error {s:?}"),
                Ok(_) => None,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn admin_calls_need_the_admin_token() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut anonymous = pb::control_client::ControlClient::new(channel.clone());
    assert_status(anonymous.create_tailnet(tailnet_request("x")).await, Code::Unauthenticated, "admin token");
    let mut wrong = pb::control_client::ControlClient::with_interceptor(channel, Bearer::new("cordon-admin-nope"));
    assert_status(
        wrong.list_tailnets(pb::ListTailnetsRequest::default()).await,
        Code::Unauthenticated,
        "not recognised",
    );
}

#[tokio::test]
async fn every_bad_field_is_named() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "valid").await;

    let bad_tailnets: Vec<(pb::CreateTailnetRequest, &str)> = vec![
        (pb::CreateTailnetRequest { owner: "a".into(), ..Default::default() }, "name: is required"),
        (pb::CreateTailnetRequest { name: "Has Caps".into(), owner: "a".into(), ..Default::default() }, "name:"),
        (pb::CreateTailnetRequest { name: "-x".into(), owner: "a".into(), ..Default::default() }, "name:"),
        (pb::CreateTailnetRequest { name: "x".repeat(64), owner: "a".into(), ..Default::default() }, "name:"),
        (pb::CreateTailnetRequest { name: "x".into(), ..Default::default() }, "owner: is required"),
        (pb::CreateTailnetRequest { name: "x".into(), owner: "a b".into(), ..Default::default() }, "owner:"),
        (
            pb::CreateTailnetRequest { name: "x".into(), owner: "a".into(), ttl_seconds: 59, ..Default::default() },
            "ttl_seconds:",
        ),
        (
            pb::CreateTailnetRequest {
                name: "x".into(),
                owner: "a".into(),
                ttl_seconds: 30 * 86400 + 1,
                ..Default::default()
            },
            "ttl_seconds:",
        ),
        (
            pb::CreateTailnetRequest {
                name: "x".into(),
                owner: "a".into(),
                labels: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            },
            "labels: has 33 labels",
        ),
        (
            pb::CreateTailnetRequest {
                name: "x".into(),
                owner: "a".into(),
                labels: [("bad key".into(), "v".into())].into(),
                ..Default::default()
            },
            "labels[\"bad key\"]",
        ),
        (
            pb::CreateTailnetRequest {
                name: "x".into(),
                owner: "a".into(),
                cidr: "10.0.0.1/24".into(),
                ..Default::default()
            },
            "cidr:",
        ),
        (
            pb::CreateTailnetRequest {
                name: "x".into(),
                owner: "a".into(),
                cidr: "10.0.0.0/31".into(),
                ..Default::default()
            },
            "cidr:",
        ),
    ];
    for (req, needle) in bad_tailnets {
        assert_status(admin.create_tailnet(req).await, Code::InvalidArgument, needle);
    }
    assert_status(admin.get_tailnet(pb::GetTailnetRequest { id: "nope".into() }).await, Code::InvalidArgument, "id:");
    assert_status(
        admin.get_tailnet(pb::GetTailnetRequest { id: String::new() }).await,
        Code::InvalidArgument,
        "id: is required",
    );
    assert_status(admin.get_tailnet(pb::GetTailnetRequest { id: uuid_string() }).await, Code::NotFound, "tailnet");
    assert_status(
        admin.list_tailnets(pb::ListTailnetsRequest { page_size: 1001, ..Default::default() }).await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        admin.list_tailnets(pb::ListTailnetsRequest { label_selector: "a=b=c!".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "label_selector",
    );
    assert_status(
        admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id.clone(), reason: "x".repeat(513) }).await,
        Code::InvalidArgument,
        "reason:",
    );

    let key = |f: fn(&mut pb::CreateAuthKeyRequest)| {
        let mut r = pb::CreateAuthKeyRequest { tailnet_id: tailnet.id.clone(), ..Default::default() };
        f(&mut r);
        r
    };
    let bad_keys: Vec<(pb::CreateAuthKeyRequest, Code, &str)> = vec![
        (key(|r| r.tailnet_id = String::new()), Code::InvalidArgument, "tailnet_id: is required"),
        (key(|r| r.tailnet_id = "x".into()), Code::InvalidArgument, "tailnet_id:"),
        (key(|r| r.tailnet_id = uuid_string()), Code::NotFound, "tailnet"),
        (key(|r| r.tags = vec!["ci".into()]), Code::InvalidArgument, "tags[0]"),
        (key(|r| r.tags = vec!["tag:Bad!".into()]), Code::InvalidArgument, "tags[0]"),
        (key(|r| r.max_uses = 5), Code::InvalidArgument, "max_uses"),
        (key(|r| r.expires_in_seconds = 91 * 86400), Code::InvalidArgument, "expires_in_seconds"),
        (key(|r| r.reason = "\u{7}".into()), Code::InvalidArgument, "reason"),
        (key(|r| r.owner = "has space".into()), Code::InvalidArgument, "owner"),
    ];
    for (req, code, needle) in bad_keys {
        assert_status(admin.create_auth_key(req).await, code, needle);
    }
    assert_status(
        admin.revoke_auth_key(pb::RevokeAuthKeyRequest { id: uuid_string(), ..Default::default() }).await,
        Code::NotFound,
        "auth key",
    );
    assert_status(
        admin.list_nodes(pb::ListNodesRequest { tailnet_id: uuid_string() }).await,
        Code::NotFound,
        "tailnet",
    );
    assert_status(
        admin.delete_node(pb::DeleteNodeRequest { id: "1".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "id:",
    );
    assert_status(
        admin
            .list_audit_events(pb::ListAuditEventsRequest {
                since: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
                until: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "until",
    );

    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let reg = |f: fn(&mut pb::RegisterRequest)| {
        let mut r = register_request(&secret, "ok");
        f(&mut r);
        r
    };
    let bad_regs: Vec<(pb::RegisterRequest, &str)> = vec![
        (reg(|r| r.credential = None), "credential: is required"),
        (reg(|r| r.credential = Some(pb::register_request::Credential::AuthKey("sk-live-123".into()))), "auth_key:"),
        (reg(|r| r.wireguard_public_key = vec![1; 31]), "wireguard_public_key: is 31 bytes"),
        (reg(|r| r.wireguard_public_key = vec![0; 32]), "wireguard_public_key: is all zeros"),
        (reg(|r| r.hostname = "no_underscores".into()), "hostname:"),
        (reg(|r| r.requested_tags = vec!["ci".into()]), "requested_tags[0]"),
    ];
    for (req, needle) in bad_regs {
        let status = nodes.register(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{:?} should contain {needle:?}", status.message());
        assert!(!status.message().contains("sk-live-123"), "a pasted secret is never echoed");
    }
    assert_status(
        nodes.watch_net_map(pb::WatchNetMapRequest { session_token: String::new(), ..Default::default() }).await,
        Code::Unauthenticated,
        "session_token",
    );
}

fn uuid_string() -> String {
    "01900000-0000-7000-8000-000000000000".into()
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut req = tailnet_request("big");
    req.labels = [("k".to_string(), "v".repeat(1 << 20))].into();
    let status = admin.create_tailnet(req).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert_ne!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("message length too large")
            || status.code() == Code::OutOfRange
            || status.code() == Code::ResourceExhausted,
        "{status:?}"
    );
    // The server is still fine.
    create_tailnet(&mut admin, "after").await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "cordon.v1.Control", "cordon.v1.Node"] {
        let r =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service:?}");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in ["cordon.v1.Control", "cordon.v1.Node", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
    }
}

#[tokio::test]
async fn audit_events_past_their_retention_are_pruned_and_the_rest_kept() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let old = create_tailnet(&mut admin, "old").await;
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: old.id.clone(), reason: "done".into() }).await.unwrap();
    let kept = create_tailnet(&mut admin, "kept").await;
    let list = |tailnet: String| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    assert_eq!(list(old.id.clone()).await.len(), 2, "created and deleted");
    // Retention cuts at the time of the kept tailnet's first event: everything before it goes.
    let first_kept = list(kept.id.clone()).await[0].time.unwrap();
    let cutoff = std::time::UNIX_EPOCH + std::time::Duration::new(first_kept.seconds as u64, first_kept.nanos as u32);
    let pruned = server.control_plane.prune_events(cutoff, 10_000).await.unwrap();
    assert_eq!(pruned, 2);
    assert!(list(old.id.clone()).await.is_empty(), "the deleted tailnet's events are past retention");
    assert_eq!(list(kept.id.clone()).await.len(), 1);
    assert_eq!(list(String::new()).await.len(), 1, "the global index is pruned too");
}

/// A 100 KB bad value gets INVALID_ARGUMENT naming its field with a short prefix of the value (not a
/// status message past gRPC's metadata limit, which clients see as RESOURCE_EXHAUSTED); control
/// characters in identifier-like fields are refused.
#[tokio::test]
async fn long_and_control_character_values_get_short_errors_naming_the_field() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "long").await;
    let long = "x".repeat(100_000);
    let check = |result: Result<(), tonic::Status>, field: &str| {
        let status = result.expect_err("call should fail");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {:?}", status.code());
        assert!(
            status.message().starts_with(field),
            "names {field}: {:?}",
            &status.message()[..80.min(status.message().len())]
        );
        assert!(status.message().len() < 300, "{field}: a {} byte message", status.message().len());
    };
    let mut req = tailnet_request("t");
    req.cidr = long.clone();
    check(admin.create_tailnet(req).await.map(drop), "cidr");
    let list = pb::ListTailnetsRequest { label_selector: format!("{long}=1"), ..Default::default() };
    check(admin.list_tailnets(list).await.map(drop), "label_selector");
    let upstream = |kind: &str, base_url: &str| pb::SetUpstreamRequest {
        tailnet_id: tailnet.id.clone(),
        name: "u".into(),
        kind: kind.into(),
        base_url: base_url.into(),
        api_key: "sk-test".into(),
    };
    check(admin.set_upstream(upstream(&long, "https://api.example")).await.map(drop), "kind");
    check(admin.set_upstream(upstream("openai", &format!("https://{long}"))).await.map(drop), "base_url");
    check(admin.set_upstream(upstream("openai", "https://api.example/\u{1b}[2J")).await.map(drop), "base_url");
    let rule = |issuer: &str, audience: &str, pattern: &str| pb::CreateTrustRuleRequest {
        tailnet_id: tailnet.id.clone(),
        issuer: issuer.into(),
        audience: audience.into(),
        claim_conditions: [("repository".to_string(), pattern.to_string())].into(),
        tags: vec![],
        ..Default::default()
    };
    let issuer = "https://token.actions.githubusercontent.com";
    check(admin.create_trust_rule(rule(&format!("https://{long}"), "aud", "a/b")).await.map(drop), "issuer");
    for audience in ["aud\0", "aud\u{1b}x", "aud\r\nInjected: yes"] {
        check(admin.create_trust_rule(rule(issuer, audience, "a/b")).await.map(drop), "audience");
    }
    check(admin.create_trust_rule(rule(issuer, "aud", "a/b\n")).await.map(drop), "claim_conditions[\"repository\"]");
}
