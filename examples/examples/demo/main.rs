//! Cordon in one process, in a few seconds: a server on a temporary directory, an ephemeral tailnet
//! with an AI gateway, a node that joins it over WireGuard, one chat request through the gateway, the
//! audit event it left, and the teardown.
//!
//! ```sh
//! cargo run -p cordon-examples --example demo
//! ```
//! With `OPENAI_API_KEY` (and optionally `OPENAI_BASE_URL`, `DEMO_MODEL`) or `ANTHROPIC_API_KEY` (and
//! `ANTHROPIC_BASE_URL`) set, the gateway calls that provider; otherwise a local echo provider that
//! lives with this example answers. The node never sees the key.

mod echo;

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cordon_proto::v1 as pb;
use cordon_proto::v1::control_client::ControlClient;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const POLICY: &str = r#"{
  "tagOwners": { "tag:demo": [] },
  "grants": [
    // The demo node may reach the gateway's port 80 and use any model, within a token budget.
    { "src": ["tag:demo"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "rpm": 60, "budget": { "bucket": "node", "tokens": 100000, "per": "day" } }] } }
  ]
}"#;

/// The upstream to use: a real provider from the environment, or the local echo provider.
async fn upstream() -> anyhow::Result<(pb::UpstreamConfig, String, &'static str)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(key) = env("OPENAI_API_KEY") {
        let base_url = env("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into());
        let model = env("DEMO_MODEL").unwrap_or_else(|| "gpt-4o-mini".into());
        let config = pb::UpstreamConfig { name: "openai".into(), kind: "openai".into(), base_url, api_key: key };
        return Ok((config, model, "/v1/chat/completions"));
    }
    if let Some(key) = env("ANTHROPIC_API_KEY") {
        let base_url = env("ANTHROPIC_BASE_URL").unwrap_or_else(|| "https://api.anthropic.com".into());
        let model = env("DEMO_MODEL").unwrap_or_else(|| "claude-3-5-haiku-latest".into());
        let config = pb::UpstreamConfig { name: "anthropic".into(), kind: "anthropic".into(), base_url, api_key: key };
        return Ok((config, model, "/v1/messages"));
    }
    let addr = echo::start().await?;
    let config = pb::UpstreamConfig {
        name: "echo".into(),
        kind: "openai-compatible".into(),
        base_url: format!("http://{addr}/v1"),
        api_key: "not-a-real-key".into(),
    };
    Ok((config, "echo-1".into(), "/v1/chat/completions"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;

    // 1. A server with its embedded sled store, on a loopback port.
    let server = cordon_server::Server::open(cordon_server::ServeConfig::for_data_dir(dir.path())).await?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?.trim().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    println!("1. server up at {url} (data in {})", dir.path().display());

    // 2. An ephemeral tailnet (10 minutes) whose gateway holds the upstream key.
    let channel = tonic::transport::Channel::from_shared(url.clone())?.connect().await?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let mut admin = ControlClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    let (upstream, model, path) = upstream().await?;
    println!("2. upstream {} ({}) at {}", upstream.name, upstream.kind, upstream.base_url);
    let tailnet = admin
        .create_tailnet(pb::CreateTailnetRequest {
            name: "demo".into(),
            owner: "newcomer@example.com".into(),
            ttl_seconds: 600,
            policy_json: POLICY.into(),
            upstreams: vec![upstream],
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("   tailnet {} ({}), gateway at {}", tailnet.name, tailnet.id, tailnet.gateway_address);

    // 3. A node joins with a single-use key, over WireGuard, in this process.
    let key = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            tags: vec!["tag:demo".into()],
            ephemeral: true,
            expires_in_seconds: 600,
            reason: "demo".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let state = tempfile::tempdir()?;
    let mut config = agentd::NodeConfig::new(&url, state.path());
    config.auth_key = Some(key.secret);
    config.hostname = "laptop".into();
    let node = agentd::Node::start(config).await.context("join the tailnet")?;
    println!("3. node laptop joined at {}", node.address());

    // 4. A chat request to http://gateway/... through the tunnel, with no API key.
    let body = if path == "/v1/messages" {
        json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello to Cordon."}]})
    } else {
        json!({"model": model, "messages": [{"role": "user", "content": "Say hello to Cordon."}]})
    };
    let (status, reply) = post(&node, path, &body).await?;
    let text =
        reply["choices"][0]["message"]["content"].as_str().or(reply["content"][0]["text"].as_str()).unwrap_or("");
    println!(
        "4. POST http://gateway{path} -> {status}: {}",
        if text.is_empty() { reply.to_string() } else { text.to_string() }
    );

    // 5. The audit event the gateway wrote.
    let event = loop {
        let events = admin
            .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
            .await?
            .into_inner()
            .events;
        if let Some(e) = events.into_iter().rev().find(|e| e.gateway.is_some()) {
            break e;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "no audit event after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let g = event.gateway.unwrap_or_default();
    println!("5. audit: {}", event.summary);
    println!(
        "   node {} tags {:?} model {} via {} -> {} {} | {} in / {} out tokens | {:.1} ms",
        g.hostname,
        g.tags,
        g.model,
        g.upstream,
        g.status,
        g.decision,
        g.input_tokens,
        g.output_tokens,
        g.latency_us as f64 / 1000.0
    );

    // 6. Tear down: the tailnet, its nodes and gateway go; the audit log stays.
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id, reason: "demo done".into() }).await?;
    node.shutdown().await;
    let _ = stop.send(());
    serving.await??;
    println!("6. tailnet deleted, server stopped; {:.1} s in all", started.elapsed().as_secs_f64());
    Ok(())
}

/// One HTTP/1.1 request over a tunnel connection to the gateway's port 80.
async fn post(node: &agentd::Node, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    // The gateway starts with the tailnet; give it a moment to come up.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match node.dial_host("gateway", 80).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e).context("reach the gateway"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header("host", "gateway")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}
