//! The example programs, run as their users would run them: `tsnet` joins a tailnet in-process with
//! `agentd::Node`, serves HTTP on its tailnet address (telling each caller who it is) and calls the
//! gateway with no key.

use std::process::Stdio;
use std::time::Duration;

use cordon_tests::llm::{self, FakeLlm};
use cordon_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const POLICY: &str = r#"{
  "tagOwners": { "tag:agent": [], "tag:peer": [] },
  "grants": [
    { "src": ["tag:agent"], "dst": ["gateway"], "ip": ["tcp:80"], "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"] }] } },
    { "src": ["tag:peer"], "dst": ["tag:agent"], "ip": ["tcp:80"] }
  ]
}"#;

/// `cargo test` builds the examples beside the test binaries, under `target/<profile>/examples`.
fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join(name);
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p cordon-examples --examples`", bin.display());
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsnet_example_serves_on_the_tailnet_and_calls_the_gateway() {
    let server = TestServer::start().await;
    let llm = FakeLlm::start().await;
    let mut admin = server.admin().await;
    let mut req = tailnet_request("tsnet");
    req.policy_json = POLICY.into();
    req.upstreams = llm::upstreams(&llm);
    let tailnet = admin.create_tailnet(req).await.unwrap().into_inner();

    let mut example = tokio::process::Command::new(example_bin("tsnet"))
        .env("CORDON_SERVER", &server.url)
        .env("CORDON_AUTH_KEY", tagged_key(&mut admin, &tailnet.id, &["tag:agent"]).await)
        .env("CORDON_HOSTNAME", "agent-web")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(example.stdout.take().unwrap()).lines();
    let mut next = async || tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap();
    let serving = next().await.expect("the example says where it serves");
    assert!(serving.starts_with("serving http://") && serving.ends_with("as agent-web"), "{serving}");
    let gateway = next().await.expect("the example reports the gateway's answer");
    assert_eq!(gateway, "gateway: 200 echo: hello from tsnet", "the gateway answered with the upstream's reply");
    {
        let seen = llm.seen.lock().unwrap();
        let call = seen.iter().find(|r| r.path == "/v1/chat/completions").expect("the provider was called");
        assert_eq!(call.headers["authorization"], format!("Bearer {}", llm::KEY), "with the gateway's key");
    }

    // A peer the policy lets in fetches the example's page and is recognised by name.
    let dir = tempfile::tempdir().unwrap();
    let mut config = agentd::NodeConfig::new(&server.url, dir.path());
    config.auth_key = Some(tagged_key(&mut admin, &tailnet.id, &["tag:peer"]).await);
    config.hostname = "visitor".into();
    let visitor = agentd::Node::start(config).await.unwrap();
    visitor.netmap().wait_for(|m| m.resolve("agent-web").is_some()).await.unwrap();
    let mut s = visitor.dial_host("agent-web", 80).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: agent-web\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("hello visitor (tags [\"tag:peer\"])"), "the page names its caller: {page}");
    let _ = example.kill().await;
}
