//! The upstream API key never leaves the gateway: a real `cordon serve` (debug logging) and a real
//! `agentd up --forward` (debug logging) carry requests that succeed, are denied, are blocked, stream,
//! and fail at the upstream with a provider that repeats the key it got; then every log line, every
//! response, the audit log, the event stream and `cordon audit export` are searched for both keys.

use std::time::Duration;

use cordon_tests::llm::{self, FakeLlm};
use cordon_tests::*;
use serde_json::json;

const WRONG_KEY: &str = "sk-cordon-test-WRONG-KEY-a81f2b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_keys_appear_in_no_log_response_or_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server_log = dir.path().join("server.log");
    let mut server = ServerProcess::spawn(&data, &server_log).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let channel = tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let mut admin = v1::control_client::ControlClient::with_interceptor(channel, Bearer::new(&token));
    let llm = FakeLlm::start().await;
    let mut create = tailnet_request("secrets");
    create.policy_json = r#"{ "tagOwners": { "tag:ci": [] }, "grants": [ { "src": ["tag:ci"], "dst": ["gateway"],
        "ip": ["tcp:80"], "app": { "cordon.dev/cap/ai": [{ "tools": { "deny": ["shell.*"] }, "models": ["openai/*", "anthropic/*", "wrong/*"], "log_bodies": true }] } } ] }"#.into();
    create.upstreams = llm::upstreams(&llm);
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    // An upstream whose key the provider refuses, repeating it in the error.
    admin
        .set_upstream(v1::SetUpstreamRequest {
            tailnet_id: tailnet.id.clone(),
            name: "wrong".into(),
            kind: "openai-compatible".into(),
            base_url: llm.openai_url(),
            api_key: WRONG_KEY.into(),
        })
        .await
        .unwrap();
    let key = admin
        .create_auth_key(v1::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            tags: vec!["tag:ci".into()],
            expires_in_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let state = tempfile::tempdir().unwrap();
    let agentd_log = dir.path().join("agentd.log");
    let env = [("AGENTD_LOG", "debug")];
    let (mut agent, base) =
        agentd_gateway_forward(&server.url, &key.secret, "ci-runner", state.path(), &agentd_log, &env).await;
    let client = llm::http_client();
    let chat = |model: &str, text: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]});
    let calls = [
        ("/v1/chat/completions", chat("gpt-4o-mini", "hi", false)),
        ("/v1/chat/completions", chat("gpt-4o-mini", "hi", true)),
        ("/v1/chat/completions", chat("gpt-4o-mini", "tool:shell.exec", false)),
        ("/v1/chat/completions", chat("gpt-4o-mini", "fail-midway", true)),
        ("/v1/chat/completions", chat("wrong/gpt-4o-mini", "hi", false)),
        ("/v1/responses", json!({"model": "wrong/x", "input": "hi"})),
        (
            "/v1/messages",
            json!({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    let mut responses = String::new();
    for (path, body) in &calls {
        let reply =
            llm::request(&client, "POST", &format!("{base}{path}"), Some(body), &[("authorization", "Bearer x")]).await;
        responses.push_str(&format!("{reply:?}\n"));
    }
    assert!(
        responses.contains("Incorrect API key provided: <redacted>"),
        "the provider's refusal came back redacted: {responses}"
    );
    assert!(responses.contains("tool_denied"));

    // Everything the operator can see.
    let export = eventually(Duration::from_secs(10), "the audit export", || async {
        let out = tokio::process::Command::new(cordon_bin())
            .args(["audit", "export", "--tailnet", &tailnet.id, "--server", &server.url])
            .env("CORDON_TOKEN", &token)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.matches("\"gateway\":").count() >= calls.len()).then_some(text)
    })
    .await;
    assert!(export.contains("\"decision\":\"blocked\""), "{export}");
    let mut watched = String::new();
    let mut stream = admin
        .watch_events(v1::WatchEventsRequest { tailnet_id: tailnet.id.clone(), since_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    // The replay holds what the export listed.
    for _ in 0..export.lines().count() {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        watched.push_str(&format!("{e:?}\n"));
    }
    let tailnet_debug =
        format!("{:?}", admin.get_tailnet(v1::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap());

    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&server_log).unwrap() + &std::fs::read_to_string(&agentd_log).unwrap();
    assert!(logs.lines().count() > 20, "debug logs were written");
    for (what, text) in [
        ("logs", &logs),
        ("responses", &responses),
        ("export", &export),
        ("events", &watched),
        ("tailnet", &tailnet_debug),
    ] {
        for secret in [llm::KEY, WRONG_KEY] {
            assert!(!text.contains(secret), "an upstream key is in the {what}");
        }
    }
    assert!(watched.contains("decision: \"blocked\""), "the event stream was read: {watched}");
}
