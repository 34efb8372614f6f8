//! The AI gateway end to end: a node joins the tailnet over WireGuard, reaches `gateway:80` through a
//! local forward, and calls a fake provider through it. What the provider receives, what the client
//! gets and what the audit log records are checked, for OpenAI and Anthropic shapes, streamed and not.

use std::sync::Arc;
use std::time::Duration;

use cordon_tests::llm::{self, FakeLlm, HttpClient, Joined, Reply, join_with_gateway};
use cordon_tests::{TestServer, eventually, v1 as pb};
use serde_json::{Value, json};

const POLICY: &str = r#"{
  "tagOwners": { "tag:ci": [] },
  "grants": [
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*", "anthropic/claude-*"], "tools": { "deny": ["shell.*"] }, "log_bodies": true }] } }
  ]
}"#;

struct Setup {
    server: TestServer,
    llm: FakeLlm,
    joined: Joined,
    http: HttpClient,
}

async fn setup(policy: &str) -> Setup {
    let server = TestServer::start().await;
    let llm = FakeLlm::start().await;
    let joined = join_with_gateway(&server, &llm, "agents", policy, &["tag:ci"]).await;
    Setup { server, llm, joined, http: llm::http_client() }
}

impl Setup {
    async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        llm::request(&self.http, method, &format!("{}{path}", self.joined.base), body.as_ref(), headers).await
    }

    async fn call(&self, path: &str, body: Value) -> Reply {
        let anthropic = path.starts_with("/v1/messages");
        let headers: &[(&str, &str)] = if anthropic {
            &[("x-api-key", "client-has-no-key"), ("anthropic-version", "2023-06-01"), ("anthropic-beta", "tools-2024")]
        } else {
            &[("authorization", "Bearer client-has-no-key")]
        };
        self.try_call("POST", path, Some(body), headers).await.expect("request through the gateway")
    }

    async fn gateway_events(&self, at_least: usize) -> Vec<pb::Event> {
        self.gateway_events_where(at_least, |_| true).await
    }

    /// Polls until at least `at_least` gateway events are in the audit log and `wanted` holds for them.
    async fn gateway_events_where(&self, at_least: usize, wanted: impl Fn(&[pb::Event]) -> bool) -> Vec<pb::Event> {
        let admin = self.server.admin().await;
        let tailnet = self.joined.tailnet.id.clone();
        let wanted = &wanted;
        eventually(Duration::from_secs(10), "gateway audit events", || {
            let mut admin = admin.clone();
            let tailnet = tailnet.clone();
            async move {
                let events = admin
                    .list_audit_events(pb::ListAuditEventsRequest {
                        tailnet_id: tailnet,
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .events;
                let gw: Vec<_> = events.into_iter().filter(|e| e.gateway.is_some()).collect();
                (gw.len() >= at_least && wanted(&gw)).then_some(gw)
            }
        })
        .await
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})
}

fn error_of(body: &str) -> Value {
    serde_json::from_str::<Value>(body).expect("a JSON error")["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_through_the_gateway_with_the_upstream_key() {
    let s = setup(POLICY).await;

    let (status, headers, body) = s.call("/v1/chat/completions", chat("hello")).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello");
    assert!(headers.contains_key("x-cordon-request-id"));
    {
        let seen = s.llm.seen.lock().unwrap();
        let last = seen.iter().rfind(|r| r.path == "/v1/chat/completions").unwrap();
        assert_eq!(
            last.headers["authorization"],
            format!("Bearer {}", llm::KEY),
            "the upstream gets the gateway's key"
        );
        assert!(
            seen.iter().all(|r| !format!("{:?}", r.headers).contains("client-has-no-key")),
            "client credentials are dropped"
        );
    }

    // Streamed, without asking for usage: the gateway asks for it, meters it, and hides it.
    let mut streamed = chat("one two three");
    streamed["stream"] = json!(true);
    let (status, stream_headers, body) = s.call("/v1/chat/completions", streamed.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("three") && body.trim_end().ends_with("data: [DONE]"), "{body}");
    // A streamed response carries its request id too, and it names the stream's audit event.
    let stream_id = stream_headers["x-cordon-request-id"].to_str().unwrap().to_string();
    let has_stream =
        |events: &[pb::Event]| events.iter().any(|e| e.gateway.as_ref().is_some_and(|g| g.request_id == stream_id));
    s.gateway_events_where(2, has_stream).await;
    assert!(!body.contains("prompt_tokens"), "the usage chunk the client did not ask for is hidden: {body}");
    {
        let seen = s.llm.seen.lock().unwrap();
        assert_eq!(seen.last().unwrap().body["stream_options"]["include_usage"], true);
    }
    // Asking for usage gets it.
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, _, body) = s.call("/v1/chat/completions", streamed).await;
    assert!(body.contains("\"prompt_tokens\":10"), "{body}");

    // A model the policy does not allow.
    let (status, headers, body) = s.call("/v1/chat/completions", json!({"model": "o1", "messages": []})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    let e = error_of(&body);
    assert_eq!(e["code"], "model_not_allowed");
    assert!(e["message"].as_str().unwrap().contains("rule models"), "{e}");

    // Unknown path: 404 in the API's format.
    let (status, _, body) = s.try_call("POST", "/v1/embeddings", Some(json!({})), &[]).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(error_of(&body)["code"], "unknown_url");

    let events = s.gateway_events(5).await;
    let ok = events.iter().find(|e| e.gateway.as_ref().unwrap().stream).unwrap().gateway.clone().unwrap();
    assert_eq!((ok.input_tokens, ok.output_tokens, ok.cached_tokens), (llm::INPUT, llm::OUTPUT, llm::CACHED));
    assert_eq!((ok.decision.as_str(), ok.upstream.as_str(), ok.hostname.as_str()), ("allowed", "openai", "runner"));
    assert_eq!(ok.tags, vec!["tag:ci".to_string()]);
    assert!(ok.ttfb_us > 0 && ok.ttfb_us <= ok.latency_us, "{ok:?}");
    assert!(ok.request_body.contains("one two three"), "log_bodies keeps the request");
    let denied = events.iter().find(|e| e.gateway.as_ref().unwrap().decision == "denied").unwrap();
    assert_eq!(denied.gateway.as_ref().unwrap().rule, "models");
    assert!(!events.iter().any(|e| e.summary.contains(llm::KEY)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_tool_calls_are_blocked_streamed_or_not_and_raise_an_alert() {
    let s = setup(POLICY).await;
    let mut watch = s.server.admin().await;
    let mut alerts = watch
        .watch_events(pb::WatchEventsRequest { tailnet_id: s.joined.tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // An allowed tool passes.
    let (status, _, body) = s.call("/v1/chat/completions", chat("tool:get_weather")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("get_weather"));

    // Non-streamed: an error instead of the body.
    let (status, headers, body) = s.call("/v1/chat/completions", chat("tool:shell.exec")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(error_of(&body)["code"], "tool_denied");

    // Streamed: the stream ends with an error event before the call reaches the client.
    let mut streamed = chat("tool:shell.exec");
    streamed["stream"] = json!(true);
    let (status, _, body) = s.call("/v1/chat/completions", streamed).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("tool_denied") && !body.contains("\"name\":\"shell.exec\"") && !body.contains("[DONE]"),
        "{body}"
    );

    // Anthropic, streamed: tool_use blocks are checked as they start.
    let (status, _, body) = s
        .call(
            "/v1/messages",
            json!({"model": "claude-sonnet-4", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "tool:shell.rm"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        body.contains("event: error") && body.contains("permission_error") && !body.contains("shell.rm\""),
        "{body}"
    );

    // Responses API, not streamed.
    let (status, _, body) = s.call("/v1/responses", json!({"model": "gpt-4o-mini", "input": "tool:shell.exec"})).await;
    assert_eq!(status, 403, "{body}");

    let mut blocked = 0;
    while blocked < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), alerts.message()).await.unwrap().unwrap().unwrap();
        if event.kind() == pb::EventKind::GatewayBlocked {
            let g = event.gateway.unwrap();
            assert_eq!(g.rule, "tools");
            assert!(g.tool_calls.iter().any(|t| t.blocked && t.name.starts_with("shell.")), "{g:?}");
            blocked += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_usage_and_a_stream_that_fails_midway() {
    let s = setup(POLICY).await;
    let body = |stream: bool, text: &str| json!({"model": "claude-sonnet-4", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": text}]});
    let (status, _, reply) = s.call("/v1/messages", body(false, "hi")).await;
    assert_eq!(status, 200, "{reply}");
    {
        let seen = s.llm.seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(last.headers["x-api-key"], llm::KEY);
        assert_eq!(last.headers["anthropic-version"], "2023-06-01");
        assert_eq!(last.headers["anthropic-beta"], "tools-2024");
        assert!(last.headers.get("authorization").is_none());
    }
    let (status, _, reply) = s.call("/v1/messages", body(true, "hi")).await;
    assert_eq!(status, 200);
    assert!(reply.contains("message_stop"));
    // The fake breaks this stream after its first events: what was seen is still recorded.
    let failed = s
        .try_call("POST", "/v1/messages", Some(body(true, "fail-midway")), &[("anthropic-version", "2023-06-01")])
        .await;
    assert!(failed.is_err() || failed.as_ref().unwrap().2.contains("message_start"), "{failed:?}");
    let (status, _, reply) = s
        .call(
            "/v1/messages/count_tokens",
            json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!((status, reply.contains("input_tokens")), (200, true));

    let events = s.gateway_events(5).await;
    let msgs: Vec<_> = events.iter().filter_map(|e| e.gateway.clone()).filter(|g| g.api == "messages").collect();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    for g in &msgs[..2] {
        // Input = uncached + cache reads; output from the last cumulative message_delta, not the sum.
        assert_eq!((g.input_tokens, g.output_tokens, g.cached_tokens), (llm::INPUT, llm::OUTPUT, llm::CACHED), "{g:?}");
    }
    let broken = &msgs[2];
    assert_eq!(broken.decision, "failed", "{broken:?}");
    assert_eq!(broken.input_tokens, llm::INPUT, "the input tokens of message_start are kept: {broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_grant_is_403_and_models_lists_only_what_the_caller_may_use() {
    let policy = r#"{ "tagOwners": { "tag:ci": [] },
      "grants": [ { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"] } ] }"#;
    // The packet filter lets the node in, but no grant gives it the AI capability.
    let server = TestServer::start().await;
    let llm = FakeLlm::start().await;
    let joined = join_with_gateway(&server, &llm, "nogrant", policy, &["tag:ci"]).await;
    let url = format!("{}/v1/chat/completions", joined.base);
    let (status, _, body) = llm::request(&llm::http_client(), "POST", &url, Some(&chat("hi")), &[]).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_of(&body)["code"], "no_grant", "{body}");
    assert!(llm.seen.lock().unwrap().is_empty(), "nothing reached the upstream");

    // With a grant naming models, /v1/models lists just those.
    let s = setup(&POLICY.replace(r#""openai/gpt-*", "anthropic/claude-*""#, r#""openai/gpt-*""#)).await;
    let (status, _, body) = s.try_call("GET", "/v1/models", None, &[]).await.unwrap();
    assert_eq!(status, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["openai/gpt-4o-mini".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_overshoot_a_budget_by_at_most_one_reservation() {
    let budget = 2_000;
    let policy = POLICY.replace(
        r#""log_bodies": true"#,
        &format!(r#""budget": {{ "bucket": "node", "tokens": {budget}, "per": "day" }}"#),
    );
    let s = Arc::new(setup(&policy).await);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]});
    let reservation = (body.to_string().len() / 4 + 1 + 200) as u64;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move { s.call("/v1/chat/completions", body).await }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        if status == 429 {
            assert_eq!(headers["x-should-retry"], "false");
            assert!(error_of(&body)["message"].as_str().unwrap().contains("budget"), "{body}");
        }
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(ok > 0 && ok < 50, "some requests fit the budget, not all: {statuses:?}");
    // Every request's event (the setup's models call has one too).
    let events: Vec<_> = s
        .gateway_events(51)
        .await
        .into_iter()
        .filter(|e| e.gateway.as_ref().unwrap().api == "chat.completions")
        .collect();
    assert_eq!(events.len(), 50);
    let used: u64 = events.iter().filter_map(|e| e.gateway.as_ref()).map(|g| g.input_tokens + g.output_tokens).sum();
    assert_eq!(used, ok * (llm::INPUT + llm::OUTPUT));
    assert!(used <= budget + reservation, "used {used} tokens of a {budget} budget");
    let denied = events.iter().filter_map(|e| e.gateway.as_ref()).filter(|g| g.rule == "budget").count() as u64;
    assert_eq!(denied, 50 - ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_stops_with_its_tailnet_and_comes_back_after_a_restart_with_its_budgets() {
    // A budget of 150 tokens a day; each request reserves about 72 and uses 30.
    let s = setup(&POLICY.replace(r#""log_bodies": true"#, r#""budget": { "tokens": 150, "per": "day" }"#)).await;
    let small =
        |text: &str| json!({"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": text}]});
    assert_eq!(s.call("/v1/chat/completions", small("before")).await.0, 200);
    let tailnet: cordon_server::model::TailnetId =
        cordon_server::model::TailnetId::parse("id", &s.joined.tailnet.id).unwrap();
    assert!(s.server.control_plane.gateway_running(tailnet));
    let mut admin = s.server.admin().await;
    let gw = s.joined.node.netmap().borrow().gateway_peer.clone().expect("the node sees the gateway");
    assert_eq!((gw.hostname.as_str(), gw.tags.clone()), ("gateway", vec!["tag:gateway".to_string()]));
    assert_eq!(gw.addresses[0], std::net::Ipv4Addr::new(100, 64, 0, 1));
    assert!(gw.addresses[1].is_ipv6(), "and an IPv6 address: {:?}", gw.addresses);
    for address in &gw.addresses {
        assert_eq!(s.joined.node.whois(*address).map(|p| p.id), Some(gw.id.clone()));
    }
    let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: s.joined.tailnet.id.clone() }).await.unwrap();
    assert_eq!(nodes.into_inner().nodes.len(), 1, "ListNodes shows the machines admitted, not the gateway");
    let refused =
        admin.delete_node(pb::DeleteNodeRequest { id: gw.id.clone(), reason: String::new() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Restart: the gateway of the live tailnet comes back, and the node's requests work again.
    let Setup { server, llm, joined, http } = s;
    let addr = server.addr;
    let (dir, temp) = server.stop_keep_dir().await;
    let server = TestServer::start_at(&dir, cordon_server::Limits::default(), &addr.to_string()).await;
    let s = Setup { server, llm, joined, http };
    eventually(Duration::from_secs(30), "the gateway answers after a restart", || async {
        s.try_call("GET", "/v1/models", None, &[]).await.ok().filter(|r| r.0 == 200).map(|_| ())
    })
    .await;
    // The 30 tokens used before the restart still count: two more fit (30+72, 60+72 <= 150), the third
    // (90+72) does not. Without them a third would fit (60+72).
    assert_eq!(s.call("/v1/chat/completions", small("after 1")).await.0, 200);
    assert_eq!(s.call("/v1/chat/completions", small("after 2")).await.0, 200);
    let (status, _, body) = s.call("/v1/chat/completions", small("after 3")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget"), "{body}");

    let mut admin = s.server.admin().await;
    admin
        .delete_tailnet(pb::DeleteTailnetRequest { id: s.joined.tailnet.id.clone(), reason: "done".into() })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the gateway stops", || async {
        (!s.server.control_plane.gateway_running(tailnet)).then_some(())
    })
    .await;
    // The node is cut off too: nothing is left to answer it.
    let mut ended = s.joined.node.ended();
    tokio::time::timeout(Duration::from_secs(10), ended.wait_for(Option::is_some)).await.unwrap().unwrap();
    // The audit log outlives the tailnet.
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: s.joined.tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.iter().any(|e| e.gateway.is_some()));
    drop(temp);
}

/// A gateway has no port of its own, yet nodes reach it on a direct path: every gateway of a server
/// shares the server's one UDP port (its STUN reflector's), which hands each WireGuard datagram to its
/// gateway. Two tailnets' gateways on one port each answer their own node directly; a server without a
/// UDP port still serves its gateway through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_the_servers_udp_port_for_direct_paths_and_the_relay_remains() {
    let server = TestServer::start().await;
    let llm = FakeLlm::start().await;
    let one = join_with_gateway(&server, &llm, "one", POLICY, &["tag:ci"]).await;
    let two = join_with_gateway(&server, &llm, "two", POLICY, &["tag:ci"]).await;
    let port = server.control_plane.port.get().expect("the server has a UDP port").local_addr().unwrap();
    let http = llm::http_client();
    let big = "x".repeat(256 * 1024);
    for joined in [&one, &two] {
        let gateway = joined.node.netmap().borrow().gateway_peer.clone().expect("the netmap names the gateway");
        assert_eq!(gateway.endpoints, vec![port], "the gateway is advertised at the server's UDP port");
        // Probing finds the direct path within a second or so of the first handshake.
        eventually(Duration::from_secs(10), "a direct path to the gateway", || async {
            let t = joined.node.status().await.traffic;
            (t.direct_rx.packets > 0 && t.direct_tx.packets > 0).then_some(())
        })
        .await;
        let before = joined.node.status().await.traffic;
        let url = format!("{}/v1/chat/completions", joined.base);
        let auth = [("authorization", "Bearer client-has-no-key")];
        let (status, _, body) = llm::request(&http, "POST", &url, Some(&chat(&big)), &auth).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let after = joined.node.status().await.traffic;
        let direct = after.direct_tx.bytes - before.direct_tx.bytes;
        let relayed = after.relay_tx.bytes - before.relay_tx.bytes;
        assert!(direct > 256 * 1024, "the request went on the direct path: {direct} bytes direct, {relayed} relayed");
        assert!(relayed < 16 * 1024, "and not through the relay: {direct} bytes direct, {relayed} relayed");
    }
    let seen = llm.seen.lock().unwrap().len();
    assert!(seen >= 2, "both gateways called the provider ({seen} requests seen)");
    let udp = server.control_plane.port.get().unwrap();
    let routed = udp.routed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(routed > 2 * 256 * 1024 / 1500, "the port handed the datagrams to their gateways ({routed})");

    // No UDP port: the gateway is advertised nowhere and answers through the relay.
    let relayed = TestServer::start_configured(|c| c.stun_listen = None).await;
    let joined = join_with_gateway(&relayed, &llm, "relayed", POLICY, &["tag:ci"]).await;
    assert!(relayed.control_plane.port.get().is_none());
    let gateway = joined.node.netmap().borrow().gateway_peer.clone().expect("the netmap names the gateway");
    assert!(gateway.endpoints.is_empty(), "{:?}", gateway.endpoints);
    let url = format!("{}/v1/chat/completions", joined.base);
    let auth = [("authorization", "Bearer client-has-no-key")];
    let (status, _, body) = llm::request(&http, "POST", &url, Some(&chat("hi")), &auth).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let t = joined.node.status().await.traffic;
    assert_eq!(t.direct_rx.packets, 0, "nothing came on a direct path: {t:?}");
    assert!(t.relay_rx.packets > 0, "{t:?}");
}
