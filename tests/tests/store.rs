//! Durability across engines: every gateway request a client got an answer to has its audit event
//! after a SIGTERM and after a `kill -9` of a real `cordon serve` (run on sled, and on PostgreSQL with
//! `CORDON_TEST_STORE=postgres`), and `cordon store copy` moves a populated sled installation to
//! PostgreSQL, where nodes keep their addresses and sessions.

use std::collections::HashSet;
use std::time::Duration;

use cordon_tests::llm::{self, FakeLlm};
use cordon_tests::*;
use serde_json::json;

const REQUESTS: usize = 200;

async fn admin_of(server: &ServerProcess, data: &std::path::Path) -> Admin {
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let channel = tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    v1::control_client::ControlClient::with_interceptor(channel, Bearer::new(&token))
}

/// Every gateway request id in the tailnet's audit log.
async fn audited_requests(admin: &mut Admin, tailnet: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(v1::ListAuditEventsRequest {
                tailnet_id: tailnet.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.events.iter().filter_map(|e| e.gateway.as_ref()).map(|g| g.request_id.clone()));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// Answers 200 concurrent requests (a quarter of them streamed) through a real agentd, stops the
/// server with `stop` right after the last answer, restarts it, and checks every answered request in
/// the audit log.
async fn answered_requests_survive(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::spawn(&data, &log).await;
    let mut admin = admin_of(&server, &data).await;
    let llm = FakeLlm::start().await;
    let mut create = tailnet_request("audit");
    create.policy_json = r#"{ "tagOwners": { "tag:ci": [] }, "grants": [ { "src": ["tag:ci"], "dst": ["gateway"],
        "ip": ["tcp:80"], "app": { "cordon.dev/cap/ai": [{ "models": ["*"] }] } } ] }"#
        .into();
    create.upstreams = llm::upstreams(&llm);
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let secret = tagged_key(&mut admin, &tailnet.id, &["tag:ci"]).await;

    let state = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agentd.log");
    let (mut agent, base) = agentd_gateway_forward(&server.url, &secret, "runner", state.path(), &log_path, &[]).await;
    let client = llm::http_client();

    let calls = (0..REQUESTS).map(|i| {
        let (client, url) = (client.clone(), format!("{base}/v1/chat/completions"));
        async move {
            let body = json!({"model": "gpt-4o-mini", "stream": i % 4 == 0,
                "messages": [{"role": "user", "content": format!("request {i}")}]});
            let (status, headers, text) = llm::request(&client, "POST", &url, Some(&body), &[]).await?;
            let done = if i % 4 == 0 { text.contains("[DONE]") } else { text.contains("\"choices\"") };
            match (status, done) {
                (200, true) => Ok(headers["x-cordon-request-id"].to_str().unwrap().to_string()),
                _ => Err(format!("{status}: {text}")),
            }
        }
    });
    let (answered, failed): (Vec<_>, Vec<_>) =
        futures::future::join_all(calls).await.into_iter().partition(Result::is_ok);
    let answered: Vec<String> = answered.into_iter().map(Result::unwrap).collect();
    let failed: Vec<String> = failed.into_iter().map(Result::unwrap_err).collect();
    assert!(
        failed.is_empty(),
        "{} of {REQUESTS} requests failed before the stop: {:?}",
        failed.len(),
        &failed[..3.min(failed.len())]
    );

    let pid = server.child.id().unwrap().to_string();
    if kill {
        server.child.start_kill().unwrap();
    } else {
        let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(status.success());
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), server.child.wait()).await.unwrap().unwrap();
    assert_eq!(exit.success(), !kill, "the server stopped as it was told: {exit}");
    agent.start_kill().unwrap();

    let server = ServerProcess::spawn(&data, &log).await;
    let mut admin = admin_of(&server, &data).await;
    let audited = audited_requests(&mut admin, &tailnet.id).await;
    let missing: Vec<&String> = answered.iter().filter(|id| !audited.contains(*id)).collect();
    assert!(missing.is_empty(), "{} of {REQUESTS} answered requests have no audit event: {missing:?}", missing.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_keep_their_audit_events_through_sigterm() {
    answered_requests_survive(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_keep_their_audit_events_through_kill_9() {
    answered_requests_survive(true).await;
}

/// A sled installation with every kind of record, copied to PostgreSQL: the server on PostgreSQL
/// lists the same tailnets, keys, rules, policy versions and events, serves its nodes their addresses,
/// resumes their sessions, and hands out the next free address to a newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_sled_installation_to_postgres() {
    if on_postgres() {
        // This test sets its engines itself; the sled pass runs it.
        return;
    }
    let Some(target) = pg::database("store_copy").await else { return };
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut create = tailnet_request("moved");
    create.policy_json =
        r#"{ "tagOwners": { "tag:ci": [] }, "grants": [ { "src": ["*"], "dst": ["*"], "ip": ["*"] } ] }"#.into();
    create.upstreams = vec![v1::UpstreamConfig {
        name: "openai".into(),
        kind: "openai".into(),
        base_url: "http://127.0.0.1:9/v1".into(),
        api_key: "sk-moved-key".into(),
    }];
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    admin
        .create_trust_rule(v1::CreateTrustRuleRequest {
            tailnet_id: tailnet.id.clone(),
            issuer: "https://issuer.example".into(),
            audience: "cordon".into(),
            claim_conditions: [("repository".to_string(), "acme/api".to_string())].into(),
            tags: vec!["tag:ci".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let a = register(&mut nodes, &secret, "a").await;
    let b = register(&mut nodes, &secret, "b").await;
    let before_events =
        admin.list_audit_events(v1::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    let (data, _temp) = server.stop_keep_dir().await;

    let out = tokio::process::Command::new(cordon_bin())
        .args(["store", "copy", "--from", &format!("sled:{}", data.join("store").display()), "--to", &target])
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["1 tailnets", "3 nodes", "1 auth keys", "1 trust rules", "1 policy versions", "1 upstream keys"] {
        assert!(
            printed.split('\n').any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == line),
            "{line}: {printed}"
        );
    }
    assert!(printed.contains(&format!("{} audit events", before_events.len())), "{printed}");

    // A second copy into the now populated target is refused, saying why.
    let again = tokio::process::Command::new(cordon_bin())
        .args(["store", "copy", "--from", &format!("sled:{}", data.join("store").display()), "--to", &target])
        .output()
        .await
        .unwrap();
    let refusal = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && refusal.contains("not empty"), "{refusal}");

    let postgres = cordon_server::store::StoreUrl::Postgres(target.clone());
    let server = TestServer::launch(&data, "127.0.0.1:0", |c| c.store = Some(postgres)).await;
    assert_eq!(server.control_plane.store_engine(), "postgres");
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let listed =
        admin.list_nodes(v1::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner().nodes;
    let addresses: Vec<(String, Vec<String>)> = listed.iter().map(|n| (n.id.clone(), n.addresses.clone())).collect();
    for joined in [&a, &b] {
        let node = joined.node.as_ref().unwrap();
        assert!(addresses.contains(&(node.id.clone(), node.addresses.clone())), "{addresses:?}");
    }
    // Old sessions resume.
    let mut stream = watch(&mut nodes, &a.session_token).await;
    let Some(v1::net_map::Update::Full(map)) = next_netmap(&mut stream).await.update else { panic!("a full map") };
    assert_eq!(map.self_.unwrap().id, a.node.unwrap().id);
    let c = register(&mut nodes, &secret, "c").await;
    assert_eq!(c.node.unwrap().addresses[0], "100.64.0.4", "the next free address");
    let after_events =
        admin.list_audit_events(v1::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    assert_eq!(&after_events[..before_events.len()], &before_events[..], "the audit log moved as it was");
    let id = cordon_server::model::TailnetId::parse("id", &tailnet.id).unwrap();
    let key = server.control_plane.upstream_api_key(id, "openai").await.unwrap().unwrap();
    assert_eq!(key.expose(), "sk-moved-key");
    let rules = admin.list_trust_rules(v1::ListTrustRulesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
    assert_eq!(rules.into_inner().rules.len(), 1);
}

/// TLS to PostgreSQL with libpq's `sslmode` meanings, against a cluster that refuses plaintext and
/// serves a certificate for `localhost` signed by a CA the test makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_honours_sslmode() {
    use cordon_server::store::{Store, StoreOptions, StoreUrl};
    if on_postgres() {
        // This test runs its own cluster; the sled pass runs it.
        return;
    }
    if !pg::available() {
        skip("postgres_over_tls_honours_sslmode", "PostgreSQL is not installed (apt-get install postgresql)");
        return;
    }
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        skip("postgres_over_tls_honours_sslmode", "openssl is not installed (scripts/test.sh installs it as root)");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    test_certificates(certs.path());
    let key = certs.path().join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    if is_root() {
        // The server runs as `postgres` and must read its certificate and key.
        let out = std::process::Command::new("chown").args(["-R", "postgres:"]).arg(certs.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let dir = certs.path().display();
    let options =
        ["ssl=on".to_string(), format!("ssl_cert_file={dir}/server.pem"), format!("ssl_key_file={dir}/server.key")];
    let options: Vec<String> = options.iter().flat_map(|o| ["-c".to_string(), o.clone()]).collect();
    let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
    let cluster = pg::Cluster::start_with(&options, Some(hba)).unwrap();
    let url = cluster.database("tls").await.unwrap();
    let localhost = url.replace("127.0.0.1", "localhost");
    let ca = format!("{dir}/ca.pem");
    let open = |url: String| async move {
        Store::open(&StoreUrl::Postgres(url), &StoreOptions::default(), Default::default()).await.map(|_| ())
    };
    let refused = |r: Result<(), cordon_server::error::Error>, what: &str, needle: &str| {
        let err = r.err().unwrap_or_else(|| panic!("{what} was accepted")).to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert!(!err.contains("\n"), "one line: {err}");
    };

    refused(open(format!("{url}?sslmode=disable")).await, "plaintext", "no encryption");
    open(format!("{localhost}?sslmode=verify-full&sslrootcert={ca}"))
        .await
        .expect("verify-full with the CA and its name");
    open(format!("{url}?sslmode=verify-ca&sslrootcert={ca}")).await.expect("verify-ca ignores the name");
    open(format!("{url}?sslmode=require")).await.expect("require encrypts without checking");
    open(url.clone()).await.expect("prefer (the default) encrypts when the server can");
    refused(
        open(format!("{url}?sslmode=verify-full&sslrootcert={ca}")).await,
        "a name the certificate lacks",
        "certificate",
    );
    refused(open(format!("{localhost}?sslmode=verify-full")).await, "a CA the system does not trust", "certificate");
    refused(open(format!("{url}?sslmode=sometimes")).await, "an unknown sslmode", "verify-full");
}

/// Shutdown waits for the tasks the server owns: the reaper and every tailnet's gateway end on their
/// own within the grace period (none is aborted), and nothing is started after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_every_task_the_server_owns() {
    let dir = tempfile::tempdir().unwrap();
    let store = test_store(dir.path()).await.unwrap_or(cordon_server::store::StoreUrl::Sled(dir.path().join("store")));
    let cp = cordon_server::ControlPlane::open(&store, cordon_server::Limits::default()).await.unwrap();
    let actor = cordon_server::model::Actor("admin:test".into());
    let mut tailnets = Vec::new();
    for i in 0..3 {
        let spec = cordon_server::model::TailnetSpec {
            name: format!("t{i}"),
            owner: "acme".into(),
            ttl_seconds: 0,
            labels: Default::default(),
            cidr: cordon_server::model::Ipv4Cidr::DEFAULT,
            policy: None,
            upstreams: vec![],
            approval_required: false,
        };
        tailnets.push(cp.create_tailnet(spec, &actor).await.unwrap().id);
    }
    eventually(Duration::from_secs(10), "the gateways to run", || async {
        tailnets.iter().all(|t| cp.gateway_running(*t)).then_some(())
    })
    .await;
    assert!(cp.running_tasks() >= 4, "the reaper and three gateways: {}", cp.running_tasks());
    let aborted = cp.drain(Duration::from_secs(10)).await;
    assert_eq!(aborted, 0, "every task ended on its own");
    assert_eq!(cp.gateways_running(), 0);
    assert_eq!(cp.running_tasks(), 0);
}

/// A `--store` that cannot work is one line on stderr saying what to do, and `cordon serve` exits.
#[tokio::test]
async fn a_store_that_cannot_be_opened_is_one_line_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cases = [
        (format!("postgres://cordon:hunter2@127.0.0.1:{port}/cordon"), "check that PostgreSQL runs"),
        ("postgres://cordon@127.0.0.1/cordon?sslmode=sometimes".to_string(), "verify-full"),
        ("mysql://cordon@db/cordon".to_string(), "sled:<dir> or postgres://"),
    ];
    for (store, needle) in cases {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(cordon_bin())
                .args(["serve", "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path())
                .args(["--store", &store])
                .output(),
        )
        .await
        .expect("cordon serve gives up by itself")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}: {stderr}");
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
        assert!(last.contains(needle), "{store}: the last line says what to do: {stderr}");
        assert!(!stderr.contains("hunter2"), "the password is not shown: {stderr}");
    }
}
