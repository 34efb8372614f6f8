//! A fake LLM provider for the gateway's tests and benchmarks (there is no internet here). It speaks
//! the OpenAI Chat Completions and Responses APIs and Anthropic's Messages API, streamed and not, and
//! answers in ways a test can choose through the last user message:
//!
//! - `tool:NAME` asks for a call of tool `NAME` with arguments `{"x":1}` (`tool:NAME NOTE`, non-streamed
//!   chat: `{"note": NOTE}`);
//! - `fail-midway` streams a few events and then drops the connection;
//! - anything else is echoed back as the answer.
//!
//! Usage is 10 input tokens (5 cached) and 20 output tokens, always. It records the headers of every
//! request so a test can check which credentials arrived.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const INPUT: u64 = 10;
pub const CACHED: u64 = 5;
pub const OUTPUT: u64 = 20;
/// The key the fake provider accepts.
pub const KEY: &str = "sk-cordon-test-UPSTREAM-KEY-7f3a9c";

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

pub struct FakeLlm {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    pub async fn start() -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let _ = stream.set_nodelay(true);
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(log.clone(), req));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        FakeLlm { addr, seen, task }
    }

    /// The base URL OpenAI SDKs take (with `/v1`).
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The base URL Anthropic SDKs take (without `/v1`).
    pub fn anthropic_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn full(v: Value, status: u16) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).map_err(|never| match never {}).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    r
}

/// A stream of SSE events; with `fail`, the connection breaks after them instead of ending cleanly.
fn sse(events: Vec<String>, fail: bool) -> Response<Body> {
    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        events.into_iter().map(|e| Ok(Frame::data(Bytes::from(e)))).collect();
    if fail {
        frames.push(Err(std::io::Error::other("the fake provider broke the stream")));
    }
    // A little time between events, as a real model takes.
    let stream = futures::stream::iter(frames).then(|f| async move {
        tokio::time::sleep(Duration::from_micros(200)).await;
        f
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert("content-type", "text/event-stream".parse().expect("header"));
    r
}

fn last_user_text(body: &Value) -> String {
    let from_messages =
        body.get("messages").and_then(Value::as_array).and_then(|m| m.last()).map(|m| match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text")?.as_str()).collect(),
            _ => String::new(),
        });
    match (from_messages, body.get("input")) {
        (Some(t), _) => t,
        (None, Some(Value::String(s))) => s.clone(),
        (None, Some(v)) => v.to_string(),
        _ => String::new(),
    }
}

async fn answer(log: Arc<Mutex<Vec<Seen>>>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    log.lock().unwrap().push(Seen { path: path.clone(), headers: headers.clone(), body: body.clone() });
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).or(bearer);
    if key != Some(KEY) {
        // As OpenAI does, the refusal repeats the key it got: the gateway must not pass that on.
        let message = format!("Incorrect API key provided: {}", key.unwrap_or(""));
        return Ok(full(json!({"error": {"message": message, "type": "invalid_request_error"}}), 401));
    }
    let text = last_user_text(&body);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("").to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let tool = text.strip_prefix("tool:").map(str::to_string);
    let fail = text == "fail-midway";
    Ok(match path.as_str() {
        "/v1/models" => full(
            json!({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"},
            {"id": "o1", "object": "model", "created": 0, "owned_by": "fake"},
            {"id": "claude-sonnet-4", "object": "model", "created": 0, "owned_by": "fake"}]}),
            200,
        ),
        "/v1/chat/completions" => chat(&model, &text, tool, stream, fail, &body),
        "/v1/responses" => responses(&model, &text, tool, stream, fail),
        "/v1/messages" => messages(&model, &text, tool, stream, fail),
        "/v1/messages/count_tokens" => full(json!({"input_tokens": INPUT}), 200),
        _ => full(json!({"error": {"message": "no such path", "type": "invalid_request_error"}}), 404),
    })
}

fn data(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn named(event: &str, v: Value) -> String {
    format!("event: {event}\ndata: {v}\n\n")
}

fn chat(model: &str, text: &str, tool: Option<String>, stream: bool, fail: bool, body: &Value) -> Response<Body> {
    let usage = json!({"prompt_tokens": INPUT, "completion_tokens": OUTPUT, "total_tokens": INPUT + OUTPUT,
        "prompt_tokens_details": {"cached_tokens": CACHED}});
    let base = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model});
    if !stream {
        let message = match &tool {
            // `tool:NAME NOTE` puts NOTE in the call's arguments.
            Some(name) => {
                let (name, arguments) = match name.split_once(' ') {
                    Some((name, note)) => (name, json!({ "note": note }).to_string()),
                    None => (name.as_str(), "{\"x\":1}".to_string()),
                };
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]})
            }
            None => json!({"role": "assistant", "content": format!("echo: {text}")}),
        };
        let mut v = base;
        v["choices"] =
            json!([{"index": 0, "message": message, "finish_reason": if tool.is_some() {"tool_calls"} else {"stop"}}]);
        v["usage"] = usage;
        return full(v, 200);
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let chunk = |delta: Value, finish: Value| {
        let mut v = base.clone();
        v["object"] = json!("chat.completion.chunk");
        v["choices"] = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
        if include_usage {
            v["usage"] = Value::Null;
        }
        data(v)
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    match &tool {
        Some(name) => {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ));
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":1}"}}]}),
                Value::Null,
            ));
            events.push(chunk(json!({}), json!("tool_calls")));
        }
        None => {
            for word in format!("echo: {text}").split_inclusive(' ') {
                events.push(chunk(json!({"content": word}), Value::Null));
            }
            if fail {
                return sse(events, true);
            }
            events.push(chunk(json!({}), json!("stop")));
        }
    }
    if include_usage {
        let mut v = base.clone();
        v["object"] = json!("chat.completion.chunk");
        v["choices"] = json!([]);
        v["usage"] = usage;
        events.push(data(v));
    }
    events.push("data: [DONE]\n\n".into());
    sse(events, false)
}

fn responses(model: &str, text: &str, tool: Option<String>, stream: bool, fail: bool) -> Response<Body> {
    let usage = json!({"input_tokens": INPUT, "output_tokens": OUTPUT, "total_tokens": INPUT + OUTPUT,
        "input_tokens_details": {"cached_tokens": CACHED}, "output_tokens_details": {"reasoning_tokens": 0}});
    let item = match &tool {
        Some(name) => json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": name,
            "arguments": "{\"x\":1}", "status": "completed"}),
        None => json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": format!("echo: {text}"), "annotations": []}]}),
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_1", "object": "response", "created_at": 1, "model": model, "status": status,
            "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto", "tools": []})
    };
    if !stream {
        return full(response("completed", json!([item]), usage), 200);
    }
    let mut seq = 0;
    let mut ev = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        named(kind, v)
    };
    let mut events = vec![ev("response.created", json!({"response": response("in_progress", json!([]), Value::Null)}))];
    match &tool {
        Some(name) => {
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            events.push(ev("response.output_item.added", json!({"output_index": 0, "item": added})));
            events.push(ev(
                "response.function_call_arguments.delta",
                json!({"output_index": 0, "item_id": "fc_1", "delta": "{\"x\":1}"}),
            ));
            events.push(ev(
                "response.function_call_arguments.done",
                json!({"output_index": 0, "item_id": "fc_1", "arguments": "{\"x\":1}", "name": name}),
            ));
        }
        None => {
            events.push(ev("response.output_text.delta", json!({"output_index": 0, "content_index": 0, "item_id": "msg_1", "delta": format!("echo: {text}"), "logprobs": []})));
            if fail {
                return sse(events, true);
            }
        }
    }
    events.push(ev("response.output_item.done", json!({"output_index": 0, "item": item})));
    events.push(ev("response.completed", json!({"response": response("completed", json!([item]), usage)})));
    sse(events, false)
}

fn messages(model: &str, text: &str, tool: Option<String>, stream: bool, fail: bool) -> Response<Body> {
    let content = match &tool {
        Some(name) => json!([{"type": "tool_use", "id": "toolu_1", "name": name, "input": {"x": 1}}]),
        None => json!([{"type": "text", "text": format!("echo: {text}")}]),
    };
    let stop = if tool.is_some() { "tool_use" } else { "end_turn" };
    if !stream {
        return full(
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": INPUT - CACHED, "cache_read_input_tokens": CACHED, "cache_creation_input_tokens": 0, "output_tokens": OUTPUT}}),
            200,
        );
    }
    let mut events = vec![named(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": INPUT - CACHED, "cache_read_input_tokens": CACHED, "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
    )];
    events.push(named("ping", json!({"type": "ping"})));
    match &tool {
        Some(name) => {
            events.push(named(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}}),
            ));
            events.push(named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{\"x\": 1}"}}),
            ));
        }
        None => {
            events.push(named(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": format!("echo: {text}")}}),
            ));
            if fail {
                return sse(events, true);
            }
        }
    }
    events.push(named("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(named(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": OUTPUT / 2}}),
    ));
    events.push(named(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": OUTPUT}}),
    ));
    events.push(named("message_stop", json!({"type": "message_stop"})));
    sse(events, false)
}

/// The fake provider as a tailnet's two upstreams: `openai` (kind openai) and `anthropic`.
pub fn upstreams(llm: &FakeLlm) -> Vec<crate::v1::UpstreamConfig> {
    let upstream = |name: &str, base_url: String| crate::v1::UpstreamConfig {
        name: name.into(),
        kind: name.into(),
        base_url,
        api_key: KEY.into(),
    };
    vec![upstream("openai", llm.openai_url()), upstream("anthropic", llm.anthropic_url())]
}

pub type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, http_body_util::Full<Bytes>>;

pub fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Status, headers and body of one HTTP exchange.
pub type Reply = (u16, hyper::HeaderMap, String);

pub async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = hyper::Request::builder().method(method).uri(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = req.body(http_body_util::Full::new(body)).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&bytes).into_owned()))
}

/// A node that joined a tailnet served by the fake provider, with a loopback forward to `gateway:80`.
pub struct Joined {
    pub tailnet: crate::v1::Tailnet,
    pub node: Arc<agentd::Node>,
    /// `http://127.0.0.1:PORT`, forwarded to the gateway.
    pub base: String,
    _dir: tempfile::TempDir,
}

/// Creates tailnet `name` with `policy` and the fake provider's upstreams, joins a node `runner` with
/// `tags`, and waits until the gateway answers through the tunnel.
pub async fn join_with_gateway(
    server: &crate::TestServer,
    llm: &FakeLlm,
    name: &str,
    policy: &str,
    tags: &[&str],
) -> Joined {
    let mut admin = server.admin().await;
    let mut create = crate::tailnet_request(name);
    create.policy_json = policy.into();
    create.upstreams = upstreams(llm);
    let tailnet = admin.create_tailnet(create).await.expect("create tailnet").into_inner();
    let key = admin
        .create_auth_key(crate::v1::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            reusable: true,
            expires_in_seconds: 600,
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = agentd::NodeConfig::new(&server.url, dir.path());
    config.auth_key = Some(key.secret);
    config.hostname = "runner".into();
    let node = Arc::new(agentd::Node::start(config).await.expect("node joins"));
    let local = crate::forward(node.clone(), "gateway", 80).await;
    let joined = Joined { tailnet, node, base: format!("http://{local}"), _dir: dir };
    let client = http_client();
    let url = format!("{}/v1/models", joined.base);
    crate::eventually(Duration::from_secs(20), "the gateway answers", || async {
        request(&client, "GET", &url, None, &[]).await.ok().filter(|r| r.0 != 502).map(|_| ())
    })
    .await;
    joined
}

/// Why the official `openai` and `anthropic` Python SDKs cannot be used here, if they cannot.
pub fn sdks_missing() -> Option<String> {
    let probe = std::process::Command::new("python3").args(["-c", "import openai, anthropic"]).output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string()),
        Err(e) => Some(format!("python3: {e}")),
    }
}

/// Runs `phase` of `tests/python/sdk_clients.py` (the official SDKs) against the gateway at `base`;
/// returns what it printed, failing the test if it failed.
pub async fn sdk_script(base: &str, phase: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sdk_clients.py");
    let out = tokio::process::Command::new("python3")
        .args([script, base, phase])
        // The SDKs honour proxy variables and do not exempt loopback.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the SDK script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}
