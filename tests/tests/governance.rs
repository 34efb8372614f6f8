//! Governance: admin tokens with a role and an owner scope, checked over every admin RPC (each role,
//! on a tailnet of its own owner and of another), token lifecycle through the CLI, `tagOwners` that
//! name tokens and roles, and policy changes that wait for another principal's approval.

use std::time::Duration;

use cordon_tests::v1 as pb;
use cordon_tests::*;
use tonic::Code;

const OWN: &str = "acme";
const OTHER: &str = "globex";

/// What a call touches: a tailnet with a key, a trust rule, a node and a pending policy proposal.
#[derive(Clone)]
struct Ids {
    tailnet: String,
    key: String,
    rule: String,
    node: String,
    proposal: String,
}

async fn make_ids(root: &mut Admin, nodes: &mut Nodes, owner: &str, name: &str) -> Ids {
    let mut req = tailnet_request(name);
    req.owner = owner.into();
    let tailnet = root.create_tailnet(req).await.unwrap().into_inner().id;
    let (key, secret) = create_key(root, &tailnet, true, false).await;
    let rule = root.create_trust_rule(trust_rule(&tailnet)).await.unwrap().into_inner().id;
    let node = register(nodes, &secret, "n").await.node.unwrap().id;
    let proposal = root
        .propose_policy(pb::ProposePolicyRequest {
            tailnet_id: tailnet.clone(),
            policy_json: r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    Ids { tailnet, key: key.id, rule, node, proposal }
}

fn trust_rule(tailnet: &str) -> pb::CreateTrustRuleRequest {
    pb::CreateTrustRuleRequest {
        tailnet_id: tailnet.into(),
        issuer: "https://issuer.example".into(),
        audience: "cordon".into(),
        claim_conditions: [("repository".to_string(), "acme/api".to_string())].into(),
        tags: vec!["tag:ci".into()],
        ..Default::default()
    }
}

/// Every tailnet-bound admin RPC.
#[derive(Clone, Copy, Debug)]
enum Call {
    CreateTailnet,
    GetTailnet,
    ListTailnets,
    DeleteTailnet,
    CreateAuthKey,
    ListAuthKeys,
    RevokeAuthKey,
    SetPolicy,
    GetPolicy,
    ListPolicyVersions,
    TestPolicy,
    CreateTrustRule,
    ListTrustRules,
    DeleteTrustRule,
    ListNodes,
    GetNode,
    DeleteNode,
    ListAuditEvents,
    SetUpstream,
    WatchEvents,
    ProposePolicy,
    ApprovePolicy,
    RejectPolicy,
    ListPolicyProposals,
    SetPolicyApproval,
}

const CALLS: [Call; 25] = [
    Call::CreateTailnet,
    Call::GetTailnet,
    Call::ListTailnets,
    Call::DeleteTailnet,
    Call::CreateAuthKey,
    Call::ListAuthKeys,
    Call::RevokeAuthKey,
    Call::SetPolicy,
    Call::GetPolicy,
    Call::ListPolicyVersions,
    Call::TestPolicy,
    Call::CreateTrustRule,
    Call::ListTrustRules,
    Call::DeleteTrustRule,
    Call::ListNodes,
    Call::GetNode,
    Call::DeleteNode,
    Call::ListAuditEvents,
    Call::SetUpstream,
    Call::WatchEvents,
    Call::ProposePolicy,
    Call::ApprovePolicy,
    Call::RejectPolicy,
    Call::ListPolicyProposals,
    Call::SetPolicyApproval,
];

/// Which roles may make a call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    AnyRole,
    Write,
    Approve,
    Admin,
}

impl Call {
    fn needs(self) -> Needs {
        use Call::*;
        match self {
            CreateTailnet | DeleteTailnet | CreateAuthKey | RevokeAuthKey | SetPolicy | CreateTrustRule
            | DeleteTrustRule | DeleteNode | SetUpstream | ProposePolicy => Needs::Write,
            ApprovePolicy | RejectPolicy => Needs::Approve,
            SetPolicyApproval => Needs::Admin,
            _ => Needs::AnyRole,
        }
    }

    /// Calls that consume what they act on get fresh records each time.
    fn destroys(self) -> bool {
        matches!(
            self,
            Call::DeleteTailnet
                | Call::RevokeAuthKey
                | Call::DeleteTrustRule
                | Call::DeleteNode
                | Call::ApprovePolicy
                | Call::RejectPolicy
        )
    }

    /// Runs the call on `ids` (owned by `owner`); what a read returned is not looked at here.
    async fn run(self, admin: &mut Admin, ids: &Ids, owner: &str) -> Result<(), tonic::Status> {
        let t = ids.tailnet.clone();
        match self {
            Call::CreateTailnet => {
                let mut req = tailnet_request("made");
                req.owner = owner.into();
                admin.create_tailnet(req).await.map(drop)
            }
            Call::GetTailnet => admin.get_tailnet(pb::GetTailnetRequest { id: t }).await.map(drop),
            Call::ListTailnets => {
                let req = pb::ListTailnetsRequest { owner: owner.into(), ..Default::default() };
                let listed = admin.list_tailnets(req).await?.into_inner().tailnets;
                // Another owner's tailnets are invisible to a scoped token: an empty list, as if none.
                match listed.is_empty() {
                    true => Err(tonic::Status::not_found("no tailnet listed")),
                    false => Ok(()),
                }
            }
            Call::DeleteTailnet => {
                admin.delete_tailnet(pb::DeleteTailnetRequest { id: t, reason: "test".into() }).await.map(drop)
            }
            Call::CreateAuthKey => {
                let req = pb::CreateAuthKeyRequest { tailnet_id: t, expires_in_seconds: 60, ..Default::default() };
                admin.create_auth_key(req).await.map(drop)
            }
            Call::ListAuthKeys => admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: t }).await.map(drop),
            Call::RevokeAuthKey => admin
                .revoke_auth_key(pb::RevokeAuthKeyRequest { id: ids.key.clone(), ..Default::default() })
                .await
                .map(drop),
            Call::SetPolicy => {
                let req = pb::SetPolicyRequest {
                    tailnet_id: t,
                    policy_json: r#"{"tagOwners": {"tag:ci": ["role:operator"]}, "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}"#.into(),
                    author: "test".into(),
                    reason: "test".into(),
                };
                admin.set_policy(req).await.map(drop)
            }
            Call::GetPolicy => admin.get_policy(pb::GetPolicyRequest { tailnet_id: t, version: 0 }).await.map(drop),
            Call::ListPolicyVersions => {
                admin.list_policy_versions(pb::ListPolicyVersionsRequest { tailnet_id: t }).await.map(drop)
            }
            Call::TestPolicy => {
                let req = pb::TestPolicyRequest { tailnet_id: t, policy_json: "{}".into() };
                admin.test_policy(req).await.map(drop)
            }
            Call::CreateTrustRule => admin.create_trust_rule(trust_rule(&t)).await.map(drop),
            Call::ListTrustRules => admin.list_trust_rules(pb::ListTrustRulesRequest { tailnet_id: t }).await.map(drop),
            Call::DeleteTrustRule => {
                admin.delete_trust_rule(pb::DeleteTrustRuleRequest { id: ids.rule.clone() }).await.map(drop)
            }
            Call::ListNodes => admin.list_nodes(pb::ListNodesRequest { tailnet_id: t }).await.map(drop),
            Call::GetNode => admin.get_node(pb::GetNodeRequest { id: ids.node.clone() }).await.map(drop),
            Call::DeleteNode => {
                admin.delete_node(pb::DeleteNodeRequest { id: ids.node.clone(), reason: "test".into() }).await.map(drop)
            }
            Call::ListAuditEvents => {
                let req = pb::ListAuditEventsRequest { tailnet_id: t, ..Default::default() };
                admin.list_audit_events(req).await.map(drop)
            }
            Call::SetUpstream => {
                let req = pb::SetUpstreamRequest {
                    tailnet_id: t,
                    name: "openai".into(),
                    kind: "openai".into(),
                    base_url: "http://127.0.0.1:9/v1".into(),
                    api_key: "sk-test".into(),
                };
                admin.set_upstream(req).await.map(drop)
            }
            Call::WatchEvents => {
                let req = pb::WatchEventsRequest { tailnet_id: t, since_revision: 1 };
                admin.watch_events(req).await.map(drop)
            }
            Call::ProposePolicy => {
                let req = pb::ProposePolicyRequest { tailnet_id: t, policy_json: "{}".into(), ..Default::default() };
                admin.propose_policy(req).await.map(drop)
            }
            Call::ApprovePolicy => admin
                .approve_policy(pb::DecidePolicyRequest { id: ids.proposal.clone(), reason: String::new() })
                .await
                .map(drop),
            Call::RejectPolicy => admin
                .reject_policy(pb::DecidePolicyRequest { id: ids.proposal.clone(), reason: String::new() })
                .await
                .map(drop),
            Call::ListPolicyProposals => {
                admin.list_policy_proposals(pb::ListPolicyProposalsRequest { tailnet_id: t }).await.map(drop)
            }
            Call::SetPolicyApproval => {
                let req = pb::SetPolicyApprovalRequest { tailnet_id: t, required: false, reason: String::new() };
                admin.set_policy_approval(req).await.map(drop)
            }
        }
    }
}

const ROLES: [(pb::Role, &str); 4] = [
    (pb::Role::Admin, "admin"),
    (pb::Role::Operator, "operator"),
    (pb::Role::Auditor, "auditor"),
    (pb::Role::Approver, "approver"),
];

async fn token(root: &mut Admin, name: &str, role: pb::Role, owner_scope: &str) -> String {
    let req = pb::CreateAdminTokenRequest {
        name: name.into(),
        role: role.into(),
        owner_scope: owner_scope.into(),
        reason: "test".into(),
        ..Default::default()
    };
    root.create_admin_token(req).await.expect("create admin token").into_inner().secret
}

/// What a token of `role` scoped to OWN gets for `call` on a tailnet of OWN (`own`) or of OTHER.
fn expected(role: &str, call: Call, own: bool) -> Code {
    let may = match call.needs() {
        Needs::AnyRole => true,
        Needs::Write => matches!(role, "admin" | "operator"),
        Needs::Approve => matches!(role, "admin" | "approver"),
        Needs::Admin => role == "admin",
    };
    match (may, own, call) {
        (false, _, _) => Code::PermissionDenied,
        (true, true, _) => Code::Ok,
        (true, false, Call::CreateTailnet) => Code::PermissionDenied,
        (true, false, _) => Code::NotFound,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_its_own_and_another_owners_tailnets() {
    let server = TestServer::start().await;
    let mut root = server.admin().await;
    let mut nodes = server.nodes().await;
    let own = make_ids(&mut root, &mut nodes, OWN, "own").await;
    let other = make_ids(&mut root, &mut nodes, OTHER, "other").await;
    let mut checked = 0;
    for (role, name) in ROLES {
        let secret = token(&mut root, &format!("{name}-acme"), role, OWN).await;
        let mut admin = server.admin_as(&secret).await;
        for call in CALLS {
            for (is_own, shared, owner) in [(true, &own, OWN), (false, &other, OTHER)] {
                let ids = if call.destroys() {
                    make_ids(&mut root, &mut nodes, owner, "fresh").await
                } else {
                    shared.clone()
                };
                let got = match call.run(&mut admin, &ids, owner).await {
                    Ok(()) => Code::Ok,
                    Err(status) => {
                        assert!(!status.message().is_empty(), "{name} {call:?}: a refusal says why");
                        status.code()
                    }
                };
                let want = expected(name, call, is_own);
                assert_eq!(got, want, "{name} token scoped to {OWN}: {call:?} on {owner}'s tailnet");
                checked += 1;
            }
        }
        // Relay counters span every tenant: a scoped token may not read them.
        let relay = admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap_err();
        assert_eq!(relay.code(), Code::PermissionDenied, "{name}");
        // A scoped token reads events one tailnet at a time.
        let all = admin.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap_err();
        assert_eq!(all.code(), Code::InvalidArgument, "{name}");
        assert!(all.message().contains("tailnet_id"), "{}", all.message());
    }
    assert_eq!(checked, 4 * CALLS.len() * 2);

    // Unscoped tokens of each role reach every owner's tailnets as far as their role goes.
    for (role, name) in ROLES {
        let secret = token(&mut root, &format!("{name}-all"), role, "").await;
        let mut admin = server.admin_as(&secret).await;
        for call in [Call::GetTailnet, Call::ListNodes, Call::SetUpstream, Call::CreateAuthKey] {
            let got = call.run(&mut admin, &other, OTHER).await.map_or_else(|s| s.code(), |()| Code::Ok);
            assert_eq!(got, expected(name, call, true), "unscoped {name}: {call:?}");
        }
        let relay = admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.map(drop);
        assert!(relay.is_ok(), "unscoped {name} reads relay stats: {relay:?}");
    }

    // Only the admin role manages tokens; a scoped admin makes tokens of its own scope only and sees
    // only those.
    let scoped_admin = server.admin_as(&token(&mut root, "acme-admin", pb::Role::Admin, OWN).await).await;
    for (role, name) in ROLES.into_iter().skip(1) {
        let mut admin = server.admin_as(&token(&mut root, &format!("{name}-tokens"), role, "").await).await;
        let refused = admin.list_admin_tokens(pb::ListAdminTokensRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{name} lists tokens");
        assert!(refused.message().contains("admin role"), "{}", refused.message());
    }
    let mut scoped_admin = scoped_admin;
    let req = |scope: &str| pb::CreateAdminTokenRequest {
        name: format!("made-{}", if scope.is_empty() { "all" } else { scope }),
        role: pb::Role::Operator.into(),
        owner_scope: scope.into(),
        ..Default::default()
    };
    for scope in ["", OTHER] {
        let refused = scoped_admin.create_admin_token(req(scope)).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "a scoped admin makes a token for {scope:?}");
    }
    scoped_admin.create_admin_token(req(OWN)).await.expect("a scoped admin makes a token of its scope");
    let visible = scoped_admin.list_admin_tokens(pb::ListAdminTokensRequest {}).await.unwrap().into_inner().tokens;
    assert!(!visible.is_empty() && visible.iter().all(|t| t.owner_scope == OWN), "{visible:?}");
    let unscoped = root.list_admin_tokens(pb::ListAdminTokensRequest {}).await.unwrap().into_inner().tokens;
    let foreign = unscoped.iter().find(|t| t.owner_scope.is_empty()).unwrap();
    let refused = scoped_admin
        .revoke_admin_token(pb::RevokeAdminTokenRequest { id: foreign.id.clone(), reason: String::new() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "a scoped admin cannot revoke another scope's token");
}

async fn cordon(server: &TestServer, token: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(cordon_bin())
        .args(args)
        .args(["--server", &server.url, "--token", token, "--json"])
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_through_the_cli_act_under_their_name_until_revoked_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), Default::default()).await;
    let root = server.admin_token.clone();
    let out = cordon(&server, &root, &["token", "create", "ci-bot", "--role", "operator", "--owner", OWN]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = made["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("cordon-admin-"));
    assert_eq!((made["role"].as_str(), made["owner_scope"].as_str()), (Some("operator"), Some(OWN)));
    let listed = cordon(&server, &root, &["token", "list"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains("ci-bot") && !listed.contains(&secret), "the list never shows a secret: {listed}");
    let again = cordon(&server, &root, &["token", "create", "ci-bot", "--role", "auditor"]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("name"), "a live name is not reused");

    // The token acts under its name: events say token:ci-bot.
    let mut bot = server.admin_as(&secret).await;
    let mut req = tailnet_request("bot-made");
    req.owner = OWN.into();
    let tailnet = bot.create_tailnet(req).await.unwrap().into_inner();
    let events = bot
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events[0].actor, "token:ci-bot", "{events:?}");

    // It survives a restart (stored, as a hash), then is refused at once when revoked.
    server.stop().await;
    let server = TestServer::start_in(dir.path(), Default::default()).await;
    let mut bot = server.admin_as(&secret).await;
    bot.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.expect("the token works after a restart");
    let id = made["id"].as_str().unwrap();
    let revoked = cordon(&server, &root, &["token", "revoke", id, "--reason", "rotated"]).await;
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let refused = bot.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("revoked"), "{}", refused.message());
    let mut root_client = server.admin().await;
    let events = root_client.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner();
    let kinds: Vec<i32> = events.events.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&(pb::EventKind::AdminTokenCreated as i32)), "{kinds:?}");
    let revocation = events.events.iter().find(|e| e.kind == pb::EventKind::AdminTokenRevoked as i32).unwrap();
    assert_eq!(revocation.reason, "rotated");
    assert!(!format!("{events:?}").contains(&secret), "no event shows the secret");

    // An expiring token is refused once its time is up.
    let short = root_client
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "brief".into(),
            role: pb::Role::Auditor.into(),
            expires_in_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let brief = server.admin_as(&short).await;
    let refusal = eventually(Duration::from_secs(10), "the token to expire", || {
        let mut brief = brief.clone();
        async move { brief.list_tailnets(pb::ListTailnetsRequest::default()).await.err() }
    })
    .await;
    assert_eq!(refusal.code(), Code::Unauthenticated);
    assert!(refusal.message().contains("expired"), "{}", refusal.message());

    // Bad input names the field.
    let bad = root_client
        .create_admin_token(pb::CreateAdminTokenRequest { name: "Not A Name".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("name"), "{}", bad.message());
    let bad = root_client
        .create_admin_token(pb::CreateAdminTokenRequest { name: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("role"), "{}", bad.message());
}

const OWNED_TAGS: &str = r#"{
  "tagOwners": {
    "tag:ci": ["token:ci-bot"],
    "tag:ops": ["role:operator"],
    "tag:prod": []
  },
  "grants": [ { "src": ["*"], "dst": ["*"], "ip": ["*"] } ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_handed_out_only_by_their_owners() {
    let server = TestServer::start().await;
    let mut root = server.admin().await;
    let mut req = tailnet_request("tags");
    req.policy_json = OWNED_TAGS.into();
    let tailnet = root.create_tailnet(req).await.unwrap().into_inner().id;
    let ci_bot = server.admin_as(&token(&mut root, "ci-bot", pb::Role::Operator, OWN).await).await;
    let other_bot = server.admin_as(&token(&mut root, "other-bot", pb::Role::Operator, OWN).await).await;
    let key = |tags: &[&str]| pb::CreateAuthKeyRequest {
        tailnet_id: tailnet.clone(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        expires_in_seconds: 60,
        ..Default::default()
    };
    let rule = |tag: &str| {
        let mut r = trust_rule(&tailnet);
        r.tags = vec![tag.into()];
        r
    };
    for (mut client, name, allowed) in
        [(ci_bot, "ci-bot", vec!["tag:ci", "tag:ops"]), (other_bot, "other-bot", vec!["tag:ops"])]
    {
        for tag in ["tag:ci", "tag:ops", "tag:prod"] {
            let by_key = client.create_auth_key(key(&[tag])).await;
            let by_rule = client.create_trust_rule(rule(tag)).await;
            if allowed.contains(&tag) {
                assert!(by_key.is_ok() && by_rule.is_ok(), "{name} hands out {tag}: {by_key:?} {by_rule:?}");
            } else {
                for refused in [by_key.map(drop).unwrap_err(), by_rule.map(drop).unwrap_err()] {
                    assert_eq!(refused.code(), Code::PermissionDenied, "{name} hands out {tag}");
                    assert!(refused.message().contains(tag), "the refusal names the tag: {}", refused.message());
                }
            }
        }
        // A tag among several that the caller does not own refuses the whole key.
        assert!(client.create_auth_key(key(&["tag:ops", "tag:prod"])).await.is_err());
    }
    // The admin role hands out any declared tag; an undeclared one is refused for everybody.
    root.create_auth_key(key(&["tag:prod", "tag:ci"])).await.expect("admins hand out any declared tag");
    let undeclared = root.create_auth_key(key(&["tag:nope"])).await.unwrap_err();
    assert_eq!(undeclared.code(), Code::InvalidArgument);

    // tagOwners entries are checked when the policy is set.
    let bad = root
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.clone(),
            policy_json: r#"{"tagOwners": {"tag:x": ["role:root"]}}"#.into(),
            author: "t".into(),
            reason: "t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("role:root") && bad.message().contains("not a role"), "{}", bad.message());
}

const LOCKDOWN: &str = r#"{ "tagOwners": { "tag:ci": [] }, "grants": [] }"#;

/// The next netmap message of a stream.
async fn next_netmap(stream: &mut tonic::Streaming<pb::NetMap>) -> pb::NetMap {
    tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("a netmap message").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_wait_for_another_principals_approval() {
    let server = TestServer::start().await;
    let mut root = server.admin().await;
    let mut ops = server.admin_as(&token(&mut root, "ops", pb::Role::Operator, OWN).await).await;
    let rev_secret = token(&mut root, "rev", pb::Role::Approver, OWN).await;
    let mut rev = server.admin_as(&rev_secret).await;
    let mut req = tailnet_request("governed");
    req.require_policy_approval = true;
    let tailnet = ops.create_tailnet(req).await.unwrap().into_inner();
    assert!(tailnet.require_policy_approval);
    let (_, secret) = create_key(&mut root, &tailnet.id, true, false).await;
    let mut nodes = server.nodes().await;
    let joined = register(&mut nodes, &secret, "worker").await;
    let mut stream = nodes
        .watch_net_map(pb::WatchNetMapRequest { session_token: joined.session_token, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let first = next_netmap(&mut stream).await;
    assert!(matches!(first.update, Some(pb::net_map::Update::Full(ref f)) if f.filter.as_ref().unwrap().allow_all));

    // SetPolicy by an operator stores a proposal: validated, diffed, and not in force.
    let set = ops
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: LOCKDOWN.into(),
            author: "alice".into(),
            reason: "lock down CI".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.version, 0, "no version yet");
    let proposal = set.proposal.expect("a proposal");
    assert_eq!(proposal.state, pb::ProposalState::Pending as i32);
    assert_eq!((proposal.proposed_by.as_str(), proposal.base_version), ("token:ops", 0));
    assert!(!proposal.summary.is_empty(), "the diff against the current version is shown");
    let current = root.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.id.clone(), version: 0 }).await.unwrap();
    assert_eq!(current.into_inner().version, 0, "the default policy is still in force");
    let bad = ops
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: r#"{"grants": [{"src": ["tag:nope"], "dst": ["*"], "ip": ["*"]}]}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "a proposal is validated like a version");

    // Who may decide: not an operator, not its proposer.
    let decide = |id: &str| pb::DecidePolicyRequest { id: id.into(), reason: "reviewed".into() };
    let refused = ops.approve_policy(decide(&proposal.id)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "an operator cannot approve");
    assert!(refused.message().contains("approver"), "{}", refused.message());
    let own = root
        .propose_policy(pb::ProposePolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: "{}".into(),
            reason: "mine".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let refused = root.approve_policy(decide(&own.id)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "the proposer cannot approve its own proposal");
    assert!(refused.message().contains("another principal"), "{}", refused.message());

    // The approver approves: only now the netmaps change.
    let version = rev.approve_policy(decide(&proposal.id)).await.unwrap().into_inner();
    assert_eq!((version.version, version.author.as_str()), (1, "alice"));
    let next = next_netmap(&mut stream).await;
    match next.update {
        Some(pb::net_map::Update::Delta(d)) => {
            assert!(!d.filter.expect("the filter changed").allow_all, "the approved policy is in force")
        }
        other => panic!("expected the approved policy's delta first, got {other:?}"),
    }
    // A proposal made against an older version is stale; rejecting it is still possible.
    let stale = rev.approve_policy(decide(&own.id)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("propose again"), "{}", stale.message());
    let rejected = rev.reject_policy(decide(&own.id)).await.unwrap().into_inner();
    assert_eq!((rejected.state, rejected.decided_by.as_str()), (pb::ProposalState::Rejected as i32, "token:rev"));
    let again = rev.approve_policy(decide(&own.id)).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "a decided proposal stays decided");

    // Proposals expire undecided.
    let brief = ops
        .propose_policy(pb::ProposePolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: "{}".into(),
            reason: "soon gone".into(),
            expires_in_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let list = |mut admin: Admin, tailnet: String| async move {
        let req = pb::ListPolicyProposalsRequest { tailnet_id: tailnet };
        admin.list_policy_proposals(req).await.unwrap().into_inner().proposals
    };
    eventually(Duration::from_secs(10), "the proposal to expire", || {
        let (admin, id, tailnet) = (rev.clone(), brief.id.clone(), tailnet.id.clone());
        async move {
            let proposals = list(admin, tailnet).await;
            proposals.iter().any(|p| p.id == id && p.state == pb::ProposalState::Expired as i32).then_some(())
        }
    })
    .await;
    assert_eq!(rev.approve_policy(decide(&brief.id)).await.unwrap_err().code(), Code::FailedPrecondition);
    let states: Vec<i32> = list(ops.clone(), tailnet.id.clone()).await.iter().map(|p| p.state).collect();
    assert_eq!(states.len(), 3, "{states:?}");

    // Every step is in the audit log with who and why.
    let events = root
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    let find = |kind: pb::EventKind| events.iter().filter(move |e| e.kind == kind as i32);
    assert_eq!(find(pb::EventKind::PolicyProposed).count(), 3);
    let approved = find(pb::EventKind::PolicyApproved).next().unwrap();
    assert_eq!((approved.actor.as_str(), approved.reason.as_str()), ("token:rev", "reviewed"));
    let changed = find(pb::EventKind::PolicyChanged).next().unwrap();
    assert!(changed.summary.contains("v1 by alice"), "{}", changed.summary);
    assert_eq!(find(pb::EventKind::PolicyRejected).count(), 1);
    assert_eq!(find(pb::EventKind::PolicyProposalExpired).count(), 1);

    // Only an admin turns the requirement off; then SetPolicy applies at once.
    let off = |required| pb::SetPolicyApprovalRequest { tailnet_id: tailnet.id.clone(), required, reason: "t".into() };
    assert_eq!(ops.set_policy_approval(off(false)).await.unwrap_err().code(), Code::PermissionDenied);
    assert!(!root.set_policy_approval(off(false)).await.unwrap().into_inner().require_policy_approval);
    let direct = ops
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((direct.version, direct.proposal.is_none()), (2, true));

    // The CLI: propose with the operator, approve with the approver.
    root.set_policy_approval(off(true)).await.unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), LOCKDOWN).unwrap();
    let ops_secret = token(&mut root, "ops-cli", pb::Role::Operator, OWN).await;
    let path = file.path().to_str().unwrap();
    let out =
        cordon(&server, &ops_secret, &["policy", "propose", "--tailnet", &tailnet.id, path, "--reason", "cli"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proposed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = proposed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(proposed[0]["state"], "pending");
    let out = cordon(&server, &rev_secret, &["policy", "approve", &id, "--reason", "ok"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let approved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(approved["version"], 3);
    let out = cordon(&server, &rev_secret, &["policy", "proposals", "--tailnet", &tailnet.id]).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().iter().filter(|p| p["state"] == "approved").count(), 2);
}

/// Keyless orchestration: a CI job's OIDC ID token, accepted by an admin trust rule, is an admin
/// credential with the rule's role and scope, for every call of the run; each failing check is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrators_oidc_token_is_an_admin_credential_through_an_admin_trust_rule() {
    use cordon_tests::oidc::{Issuer, sign};
    const AUDIENCE: &str = "https://cordon.example/admin";
    let issuer = Issuer::start(&["rsa1"]).await;
    let server = TestServer::start().await;
    let mut root = server.admin().await;
    let rule = root
        .create_admin_trust_rule(pb::CreateAdminTrustRuleRequest {
            name: "orchestrator".into(),
            issuer: issuer.url.clone(),
            audience: AUDIENCE.into(),
            claim_conditions: [("repository".to_string(), "acme/infra".to_string())].into(),
            role: pb::Role::Operator.into(),
            owner_scope: OWN.into(),
            reason: "CI provisions run tailnets".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rule.role, rule.owner_scope.as_str()), (pb::Role::Operator as i32, OWN));

    // One token, several calls of the run.
    let token = sign(&issuer.claims(AUDIENCE, "acme/infra"), "rsa1", "rsa1");
    let mut ci = server.admin_as(&token).await;
    let mut req = tailnet_request("run-1");
    req.owner = OWN.into();
    let tailnet = ci.create_tailnet(req).await.expect("the run's token creates a tailnet").into_inner();
    ci.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.expect("and reads it again");
    let events = ci
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events[0].actor, "oidc:orchestrator:repo:acme/infra:ref:refs/heads/main", "events name the run");
    // Within the rule's role and scope only.
    let mut other = tailnet_request("elsewhere");
    other.owner = OTHER.into();
    assert_eq!(ci.create_tailnet(other).await.unwrap_err().code(), Code::PermissionDenied);
    let tokens = ci.list_admin_tokens(pb::ListAdminTokensRequest {}).await.unwrap_err();
    assert_eq!(tokens.code(), Code::PermissionDenied, "an operator rule cannot manage tokens");

    // Each failing check, named, never echoing the token.
    let mut claims = issuer.claims(AUDIENCE, "acme/web");
    let cases = [
        (sign(&claims, "rsa1", "rsa1"), "condition repository"),
        (sign(&issuer.claims("https://other.example", "acme/infra"), "rsa1", "rsa1"), "audience"),
        (
            {
                claims = issuer.claims(AUDIENCE, "acme/infra");
                claims["exp"] = serde_json::json!(1_000_000_000);
                sign(&claims, "rsa1", "rsa1")
            },
            "expired",
        ),
        ("not.a.token".to_string(), "not recognised"),
        ("garbage".to_string(), "not recognised"),
    ];
    for (bad, why) in cases {
        let refused = server.admin_as(&bad).await.list_tailnets(pb::ListTailnetsRequest::default()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{why}");
        assert!(refused.message().contains(why), "{why}: {}", refused.message());
        assert!(!refused.message().contains(&bad), "the refusal never repeats the token");
    }

    // Deleting the rule ends the run's access at once, even for a token that worked.
    root.delete_admin_trust_rule(pb::DeleteAdminTrustRuleRequest { id: rule.id.clone() }).await.unwrap();
    let refused = ci.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let listed = root.list_admin_trust_rules(pb::ListAdminTrustRulesRequest {}).await.unwrap().into_inner();
    assert!(listed.rules.is_empty());
    let all = root.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    for kind in [pb::EventKind::AdminTrustRuleCreated, pb::EventKind::AdminTrustRuleDeleted] {
        assert!(all.iter().any(|e| e.kind == kind as i32), "{kind:?} is an audit event");
    }
    assert!(!format!("{all:?}").contains(&token), "no event holds the token");
}

const REPORTED: &str = r#"{
  "tagOwners": { "tag:ci": ["role:operator"], "tag:db": [], "tag:sensor": [] },
  "grants": [
    { "src": ["tag:ci"], "dst": ["tag:db"], "ip": ["tcp:5432"] },
    { "src": ["tag:sensor"], "dst": ["tag:db"], "ip": ["udp:53", "icmp"] },
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [ { "models": ["openai/gpt-4o-mini"], "rpm": 30 } ] } }
  ]
}"#;

/// The access report of a known policy: what each node may reach, its gateway rules, how it was admitted,
/// who may hand out each tag, and which policy version (and author) it all comes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_report_says_who_can_reach_what_and_who_granted_it() {
    let server = TestServer::start().await;
    let mut root = server.admin().await;
    let mut req = tailnet_request("audited");
    req.policy_json = REPORTED.into();
    let tailnet = root.create_tailnet(req).await.unwrap().into_inner();
    let nodes = server.nodes().await;
    let join = |tags: &[&str], host: &'static str| {
        let (mut root, tailnet) = (root.clone(), tailnet.id.clone());
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        let mut nodes = nodes.clone();
        async move {
            let key = pb::CreateAuthKeyRequest {
                tailnet_id: tailnet,
                tags,
                reusable: true,
                expires_in_seconds: 600,
                reason: format!("admit {host}"),
                ..Default::default()
            };
            let secret = root.create_auth_key(key).await.unwrap().into_inner().secret;
            register(&mut nodes, &secret, host).await.node.unwrap()
        }
    };
    let ci = join(&["tag:ci"], "ci").await;
    let db = join(&["tag:db"], "db").await;
    let sensor = join(&["tag:sensor"], "sensor").await;

    let auditor = token(&mut root, "auditor", pb::Role::Auditor, OWN).await;
    let mut auditor = server.admin_as(&auditor).await;
    let report = auditor
        .get_access_report(pb::GetAccessReportRequest { tailnet_id: tailnet.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.policy_version, 1);
    assert!(report.policy_author.starts_with("admin:"), "{}", report.policy_author);
    let node = |id: &str| report.nodes.iter().find(|n| n.node_id == id).unwrap();
    let reach = |n: &pb::NodeAccess| -> Vec<(String, Vec<String>)> {
        n.reach.iter().map(|r| (r.peer_hostname.clone(), r.ports.clone())).collect()
    };
    let ci_reach =
        [("gateway".to_string(), vec!["tcp:80".to_string()]), ("db".to_string(), vec!["tcp:5432".to_string()])];
    assert_eq!(reach(node(&ci.id)), ci_reach, "ci reaches the gateway on 80 and db on 5432, nothing else");
    assert_eq!(reach(node(&sensor.id)), [("db".to_string(), vec!["icmp".to_string(), "udp:53".to_string()])]);
    assert!(reach(node(&db.id)).is_empty(), "nothing is granted to db");
    let ci_ai: serde_json::Value = serde_json::from_str(&node(&ci.id).ai_capabilities_json).unwrap();
    assert_eq!(ci_ai[0]["models"][0], "openai/gpt-4o-mini");
    assert_eq!(node(&db.id).ai_capabilities_json, "[]", "db may not use the gateway");
    let admitted = node(&ci.id);
    assert!(admitted.admitted_by.starts_with("auth key "), "{}", admitted.admitted_by);
    assert_eq!(admitted.admission_reason, "admit ci");
    assert!(admitted.admission_created_by.starts_with("admin:"));
    let tag = |name: &str| report.tags.iter().find(|t| t.tag == name).unwrap();
    assert_eq!(
        (tag("tag:ci").owners.clone(), tag("tag:ci").nodes.clone()),
        (vec!["role:operator".to_string()], vec!["ci".to_string()])
    );
    assert_eq!(tag("tag:ci").auth_keys.len(), 1);
    assert!(tag("tag:db").owners.is_empty(), "only admins hand out tag:db");

    // The CLI: JSON and CSV.
    let out = cordon(&server, &server.admin_token, &["access", "report", "--tailnet", &tailnet.id]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    let csv = tokio::process::Command::new(cordon_bin())
        .args(["access", "report", "--tailnet", &tailnet.id, "--csv", "--server", &server.url, "--token"])
        .arg(&server.admin_token)
        .output()
        .await
        .unwrap();
    let csv = String::from_utf8(csv.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("tailnet,policy_version,"), "{csv}");
    assert!(lines.iter().any(|l| l.contains(",ci,") && l.contains(",db,tcp:5432,")), "{csv}");
    // Another owner's auditor sees nothing of it.
    let mut other = server.admin_as(&token(&mut root, "other-auditor", pb::Role::Auditor, OTHER).await).await;
    let refused = other.get_access_report(pb::GetAccessReportRequest { tailnet_id: tailnet.id.clone() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::NotFound);
}
