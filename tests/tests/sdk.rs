//! The official `openai` and `anthropic` Python SDKs, unmodified, call the gateway through a node that
//! joined the tailnet (a loopback forward to `gateway:80`, as `agentd up --forward` makes). They hold no
//! key; the fake provider sees only the gateway's. Skips, saying why, where the SDKs are not installed
//! (`scripts/test.sh` installs them when run as root).

use cordon_tests::llm::{self, FakeLlm, join_with_gateway};
use cordon_tests::{TestServer, v1 as pb};

const POLICY: &str = r#"{
  "tagOwners": { "tag:agent": [] },
  "grants": [
    { "src": ["tag:agent"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*", "anthropic/claude-sonnet-*"], "tools": { "deny": ["shell.*"] } BUDGET }] } }
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_through_the_gateway() {
    if let Some(why) = llm::sdks_missing() {
        let reason = format!("the openai/anthropic Python SDKs are not installed ({why}); run scripts/test.sh as root");
        return cordon_tests::skip("official_sdks_through_the_gateway", &reason);
    }
    let server = TestServer::start().await;
    let llm = FakeLlm::start().await;
    let joined = join_with_gateway(&server, &llm, "sdk", &POLICY.replace(" BUDGET", ""), &["tag:agent"]).await;
    let out = llm::sdk_script(&joined.base, "basics").await;
    for check in ["openai chat stream", "openai denied tool, streamed", "anthropic stream", "anthropic count tokens"] {
        assert!(out.contains(&format!("ok {check}\n")), "{out}");
    }
    let seen = llm.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for r in &seen {
        let auth = r.headers.get("authorization").or(r.headers.get("x-api-key")).expect("a credential");
        assert!(auth.to_str().unwrap().ends_with(llm::KEY), "only the gateway's key reaches the provider");
        assert!(!format!("{:?}", r.headers).contains("no-key-here"));
    }
    assert!(
        seen.iter().all(|r| r.body.get("model").and_then(|m| m.as_str()) != Some("o1")),
        "denied before the upstream"
    );

    // A budget small enough for one request: the next is refused, and the SDKs do not retry it.
    let mut admin = server.admin().await;
    admin
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: joined.tailnet.id.clone(),
            policy_json: POLICY.replace(" BUDGET", r#", "budget": { "tokens": 90, "per": "day" }"#),
            author: "test".into(),
            reason: "budget".into(),
        })
        .await
        .unwrap();
    let before = llm.seen.lock().unwrap().len();
    let out = llm::sdk_script(&joined.base, "budget").await;
    assert!(out.contains("ok anthropic exhausted budget"), "{out}");
    assert_eq!(llm.seen.lock().unwrap().len(), before + 1, "only the request within the budget reached the provider");

    // A request body over the gateway's limit: a 413 in the caller's format, not a stalled upload (the
    // gateway's side of the connection resets once the answer is delivered).
    let before = llm.seen.lock().unwrap().len();
    let out = llm::sdk_script(&joined.base, "oversized").await;
    assert!(out.contains("ok openai oversized request") && out.contains("ok anthropic oversized request"), "{out}");
    assert_eq!(llm.seen.lock().unwrap().len(), before, "nothing oversized reaches the provider");
}
