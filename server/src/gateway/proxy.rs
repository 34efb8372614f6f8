//! One gateway request: who is calling (from the tunnel address), what the policy lets it do, which
//! upstream serves the model, then the call with the upstream's key, metered and audited. Streams pass
//! through event by event.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::Gateway;
use super::rules::{CAPABILITY, Claim, Rules, Who};
use super::wire::{self, Api, SseMeter};
use crate::model::{Decision, GATEWAY_TAG, GatewayRequest, NodeId, RunIdentity, UpstreamInfo, UpstreamKind};
use crate::store::GatewayEvent;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GatewayBody = BoxBody<Bytes, BoxError>;

/// The largest request body the gateway reads, and the largest whole response it buffers.
const MAX_REQUEST: usize = 32 << 20;
const MAX_RESPONSE: usize = 64 << 20;
/// Bodies kept in the audit log are cut at this size.
const MAX_LOGGED_BODY: usize = 64 * 1024;
/// What a request reserves for its output when neither it nor its rules name a maximum.
const DEFAULT_OUTPUT_RESERVATION: u64 = 4096;

/// Serves HTTP/1.1 on one tunnel connection.
pub async fn serve_connection(gateway: Arc<Gateway>, stream: agentd::TcpStream, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |req| handle(gateway.clone(), peer, req));
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
        tracing::debug!(%peer, error = %e, "gateway connection ended");
    }
}

fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn json_response(status: u16, body: Vec<u8>) -> Response<GatewayBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// What one request has learned so far; becomes its audit event.
struct Call {
    gateway: Arc<Gateway>,
    start: Instant,
    anthropic: bool,
    record: GatewayRequest,
    node: Option<NodeId>,
    run: Option<RunIdentity>,
    user: Option<crate::model::NodeUser>,
    log_bodies: bool,
    claim: Option<Claim>,
    /// Tokens the claim reserved.
    reserved: u64,
    /// The request went to the upstream (which may bill for it even if the client leaves).
    sent: bool,
    saw_usage: bool,
    /// Recorded and settled; nothing left for `Drop`.
    done: bool,
}

impl Drop for Call {
    /// A request whose client went away (or whose gateway stopped) mid-way is still settled and recorded.
    fn drop(&mut self) {
        if !self.done {
            if self.record.decision == Decision::Allowed {
                self.record.decision = Decision::Failed;
                self.record.message = "the client went away before the response was complete".into();
            }
            self.complete(0);
        }
    }
}

impl Call {
    /// Refuses the request in the caller's API format, naming the rule; records it.
    fn deny(mut self, status: u16, rule: &str, code: &str, message: String) -> Response<GatewayBody> {
        let body = wire::error_body(self.anthropic, status, code, &message);
        self.record.decision = if rule.is_empty() { Decision::Failed } else { Decision::Denied };
        self.record.rule = rule.into();
        self.record.status = status;
        self.record.message = message;
        let mut response = json_response(status, body);
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        let response = self.with_id(response);
        let committed = self.finish(0);
        after_commit(response, committed)
    }

    fn with_id(&self, mut response: Response<GatewayBody>) -> Response<GatewayBody> {
        if let Ok(v) = HeaderValue::from_str(&self.record.request_id) {
            response.headers_mut().insert("x-cordon-request-id", v);
        }
        response
    }

    /// Settles the reservation with the real usage and queues the audit event; the receiver learns
    /// when it is durable.
    fn finish(mut self, ttfb_us: u64) -> oneshot::Receiver<bool> {
        self.complete(ttfb_us)
    }

    fn complete(&mut self, ttfb_us: u64) -> oneshot::Receiver<bool> {
        self.done = true;
        let gw = self.gateway.clone();
        let now = gw.cp.now();
        if let Some(claim) = self.claim.take() {
            // An upstream call that reported no usage (a client that left early, a provider that does not
            // say) is charged what it reserved rather than nothing.
            let used = self.record.input_tokens.saturating_add(self.record.output_tokens);
            let charged = if self.sent && !self.saw_usage { self.reserved.max(used) } else { used };
            gw.meters.settle(claim, charged, now);
            self.record.charged_tokens = charged;
        }
        self.record.latency_us = self.start.elapsed().as_micros() as u64;
        self.record.ttfb_us = if ttfb_us == 0 { self.record.latency_us } else { ttfb_us };
        if !self.log_bodies {
            self.record.request_body = None;
            self.record.response_body = None;
        }
        let level_blocked = self.record.decision == Decision::Blocked;
        if level_blocked {
            tracing::warn!(tailnet = %gw.tailnet, node = %self.record.hostname, request = %self.record.request_id, "{}", self.record.message);
        }
        gw.cp.gateways.record(GatewayEvent {
            tailnet: gw.tailnet,
            node: self.node,
            run: self.run.take(),
            user: self.user.take(),
            time: now,
            request: std::mem::take(&mut self.record),
        })
    }
}

/// What a client sees when its request's audit event could not be written: the response is cut off
/// rather than completed without a record.
fn audit_failed() -> BoxError {
    "the gateway could not record this request in the audit log; the response is withheld".into()
}

/// A body that holds its bytes back until the request's audit event has committed.
struct AfterCommit {
    committed: Option<oneshot::Receiver<bool>>,
    inner: GatewayBody,
}

fn after_commit(response: Response<GatewayBody>, committed: oneshot::Receiver<bool>) -> Response<GatewayBody> {
    response.map(|inner| AfterCommit { committed: Some(committed), inner }.boxed())
}

impl Body for AfterCommit {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(committed) = self.committed.as_mut() {
            let ok = ready!(Pin::new(committed).poll(cx)).unwrap_or(false);
            self.committed = None;
            if !ok {
                return Poll::Ready(Some(Err(audit_failed())));
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.committed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn logged(bytes: &[u8]) -> Option<String> {
    let cut = &bytes[..bytes.len().min(MAX_LOGGED_BODY)];
    Some(String::from_utf8_lossy(cut).into_owned())
}

/// Which API a request calls.
fn api_of(method: &Method, path: &str) -> Option<Api> {
    Some(match (method, path.trim_end_matches('/')) {
        (&Method::POST, "/v1/chat/completions") => Api::Chat,
        (&Method::POST, "/v1/responses") => Api::Responses,
        (&Method::POST, "/v1/messages") => Api::Messages,
        (&Method::POST, "/v1/messages/count_tokens") => Api::CountTokens,
        (&Method::GET, "/v1/models") => Api::Models,
        _ => return None,
    })
}

async fn handle(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let start = Instant::now();
    let anthropic = req.headers().contains_key("anthropic-version") || req.uri().path().starts_with("/v1/messages");
    let Some(api) = api_of(req.method(), req.uri().path()) else {
        let message = format!(
            "{} {} is not an API of this gateway; it serves POST /v1/chat/completions, /v1/responses, \
             /v1/messages, /v1/messages/count_tokens and GET /v1/models",
            req.method(),
            req.uri().path()
        );
        return Ok(json_response(404, wire::error_body(anthropic, 404, "unknown_url", &message)));
    };
    let mut call = Call {
        gateway: gateway.clone(),
        start,
        anthropic: anthropic || api.anthropic(),
        record: GatewayRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            api: api.name().into(),
            ..GatewayRequest::default()
        },
        node: None,
        run: None,
        user: None,
        log_bodies: false,
        claim: None,
        reserved: 0,
        sent: false,
        saw_usage: false,
        done: false,
    };
    let caller = gateway.node.whois(peer.ip()).filter(|p| p.id != gateway.node_id);
    let Some(caller) = caller else {
        let message = format!("{} is not a node of this tailnet", peer.ip());
        return Ok(call.deny(403, "identity", "unknown_node", message));
    };
    call.record.hostname = caller.hostname.clone();
    call.record.tags = caller.tags.clone();
    call.record.owner = caller.owner.clone();
    call.node = NodeId::parse("node", &caller.id).ok();
    call.run = caller.run.as_ref().map(|r| RunIdentity {
        issuer: r.issuer.clone(),
        subject: r.subject.clone(),
        claims: r.claims.clone(),
    });
    call.user = caller.user.as_ref().and_then(|u| {
        Some(crate::model::NodeUser {
            id: crate::model::UserId::parse("user", &u.id).ok()?,
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            groups: u.groups.clone(),
            login_expires_at: std::time::UNIX_EPOCH,
            logged_out: false,
        })
    });

    let cp = &gateway.cp;
    let read = async {
        let t = cp.get_tailnet(gateway.tailnet).await?;
        Ok::<_, crate::error::Error>((cp.policy(&t).await?, t))
    };
    let (tailnet, policy) = match read.await {
        Ok((policy, t)) => (t, policy),
        Err(e) => return Ok(call.deny(503, "", "unavailable", format!("the gateway cannot read its tailnet: {e}"))),
    };
    let rules = if policy.explicit {
        let src = crate::policy::Subject {
            id: &caller.id,
            tags: &caller.tags,
            owner: &caller.owner,
            gateway: false,
            groups: caller.user.as_ref().map(|u| u.groups.as_slice()),
        };
        let gw_tags = [GATEWAY_TAG.to_string()];
        let dst = crate::policy::Subject {
            id: &gateway.node_id,
            tags: &gw_tags,
            owner: &tailnet.owner,
            gateway: true,
            groups: None,
        };
        Rules::merge(&policy.capabilities_cached(&src, &dst, CAPABILITY))
    } else {
        // The default policy lets everyone do everything; so does the gateway.
        Some(Rules::default())
    };
    let Some(rules) = rules else {
        let message = format!(
            "node {} ({}) has no grant with the {CAPABILITY} capability towards the gateway",
            caller.hostname, caller.id
        );
        return Ok(call.deny(403, "grant", "no_grant", message));
    };
    call.log_bodies = rules.log_bodies;
    let who = Who {
        node: caller.id.clone(),
        run: caller.run.as_ref().map(|r| super::rules::run_key(&r.issuer, &r.subject, &r.claims)),
        owner: caller.owner.clone(),
        user: caller.user.as_ref().map(|u| u.id.clone()),
    };

    if api == Api::Models {
        return Ok(models(call, &tailnet.upstreams, &rules, req.headers()).await);
    }

    let (parts, body) = req.into_parts();
    let too_large = || {
        format!(
            "the request body is larger than the gateway's limit of {} MiB; send less per request",
            MAX_REQUEST >> 20
        )
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST as u64) {
        return Ok(call.deny(413, "", "request_too_large", too_large()));
    }
    let bytes = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Ok(call.deny(413, "", "request_too_large", too_large()));
        }
        Err(e) => return Ok(call.deny(400, "", "invalid_body", format!("could not read the request body: {e}"))),
    };
    if call.log_bodies {
        call.record.request_body = logged(&bytes);
    }
    let mut body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Ok(call.deny(400, "", "invalid_body", "the body must be a JSON object".into())),
        Err(e) => return Ok(call.deny(400, "", "invalid_body", format!("the body is not JSON: {e}"))),
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_string) else {
        return Ok(call.deny(400, "", "invalid_body", "model: is required".into()));
    };
    call.record.model = model.clone();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    call.record.stream = stream;

    let (upstream, upstream_model) = match route(&tailnet.upstreams, api, &model) {
        Ok(r) => r,
        Err(message) => return Ok(call.deny(404, "", "model_not_found", message)),
    };
    call.record.upstream = upstream.name.clone();
    call.record.upstream_model = upstream_model.clone();
    let full_name = format!("{}/{}", upstream.name, upstream_model);
    if !rules.allows_model(&full_name) {
        let message = format!(
            "node {} may not use model {full_name} (rule models: {})",
            caller.hostname,
            rules.models.as_ref().map(|m| m.join(", ")).unwrap_or_default()
        );
        return Ok(call.deny(403, "models", "model_not_allowed", message));
    }
    let mut changed = model != upstream_model;
    if changed {
        body["model"] = Value::String(upstream_model.clone());
    }

    // The output this request may produce: what it asks for, within the rule.
    let output_field = match (api, upstream.kind) {
        (Api::Chat, UpstreamKind::OpenAi) => "max_completion_tokens",
        (Api::Chat, _) | (Api::Messages, _) => "max_tokens",
        (Api::Responses, _) => "max_output_tokens",
        _ => "",
    };
    // Every output limit the request names counts (an upstream may read any of them).
    let mut asked: Option<u64> = None;
    for field in ["max_completion_tokens", "max_tokens", "max_output_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) => asked = Some(asked.map_or(n, |a| a.max(n))),
                None => {
                    return Ok(call.deny(400, "", "invalid_body", format!("{field}: must be a non-negative integer")));
                }
            },
        }
    }
    if let (Some(limit), Some(asked)) = (rules.max_tokens, asked)
        && asked > limit
    {
        let message = format!(
            "the request asks for up to {asked} output tokens; this node may ask for {limit} (rule max_tokens)"
        );
        return Ok(call.deny(403, "max_tokens", "max_tokens_exceeded", message));
    }
    if let (Some(limit), None, false) = (rules.max_tokens, asked, output_field.is_empty()) {
        body[output_field] = json!(limit);
        changed = true;
    }
    let hide_usage = api == Api::Chat
        && stream
        && body.pointer("/stream_options/include_usage").and_then(Value::as_bool) != Some(true);
    if hide_usage {
        match body.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(options) => {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            None => body["stream_options"] = json!({"include_usage": true}),
        }
        changed = true;
    }

    if api != Api::CountTokens {
        let output = asked.or(rules.max_tokens).unwrap_or(DEFAULT_OUTPUT_RESERVATION);
        let reserve = (bytes.len() as u64 / 4).saturating_add(1).saturating_add(output);
        match gateway.meters.admit(&rules, &who, reserve, cp.now()) {
            Ok(claim) => {
                call.claim = Some(claim);
                call.reserved = reserve;
            }
            Err(d) => return Ok(call.deny(d.status, d.rule, "limit_reached", d.message)),
        }
    }

    let key = match cp.upstream_api_key(tailnet.id, &upstream.name).await {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Ok(call.deny(
                502,
                "",
                "upstream_unconfigured",
                format!("upstream {} has no API key", upstream.name),
            ));
        }
        Err(e) => return Ok(call.deny(503, "", "unavailable", format!("cannot read upstream {}: {e}", upstream.name))),
    };
    let payload = if changed { Bytes::from(serde_json::to_vec(&body).expect("JSON serializes")) } else { bytes };
    let request = match upstream_request(&upstream, api, &parts.headers, key.expose(), payload) {
        Ok(r) => r,
        Err(message) => return Ok(call.deny(502, "", "upstream_unconfigured", message)),
    };
    call.sent = true;
    let response = match gateway.cp.gateways.client.request(request).await {
        Ok(r) => r,
        Err(e) => {
            let message =
                format!("upstream {} could not be reached: {}", upstream.name, agentd::control::source_chain(&e));
            let mut response = call.deny(502, "", "upstream_unreachable", message);
            response.headers_mut().remove("x-should-retry");
            return Ok(response);
        }
    };
    let status = response.status();
    call.record.status = status.as_u16();
    call.record.decision = if status.is_success() { Decision::Allowed } else { Decision::Failed };
    let (parts, upstream_body) = response.into_parts();
    let mut out = Response::builder().status(status);
    for name in ["content-type", "retry-after", "retry-after-ms", "x-should-retry", "x-request-id", "request-id"] {
        if let Some(v) = parts.headers.get(name) {
            out = out.header(name, v);
        }
    }
    if stream && status.is_success() {
        let meter = SseMeter::new(api, hide_usage, rules.tools_deny.clone());
        // The id goes out before the call moves into the body: a streamed response carries it too.
        if let Ok(id) = HeaderValue::from_str(&call.record.request_id) {
            out = out.header("x-cordon-request-id", id);
        }
        let body = Metered {
            upstream: upstream_body,
            meter,
            call: Some(call),
            first_byte: None,
            logged: Vec::new(),
            key,
            committed: None,
            held: None,
        };
        let response = out.body(body.boxed()).expect("valid response parts");
        return Ok(response);
    }
    let bytes = match Limited::new(upstream_body, MAX_RESPONSE).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let message = format!("upstream {} failed mid-response: {e}", upstream.name);
            let mut response = call.deny(502, "", "upstream_failed", message);
            response.headers_mut().remove("x-should-retry");
            return Ok(response);
        }
    };
    let bytes = redact(bytes, key.expose());
    if call.log_bodies {
        call.record.response_body = logged(&bytes);
    }
    if status.is_success()
        && let Ok(value) = serde_json::from_slice::<Value>(&bytes)
    {
        let observed = wire::observe(api, &value);
        call.saw_usage = observed.saw_usage || api == Api::CountTokens;
        call.record.input_tokens = observed.usage.input;
        call.record.output_tokens = observed.usage.output;
        call.record.cached_tokens = observed.usage.cached;
        if api == Api::CountTokens {
            call.record.input_tokens = value.get("input_tokens").and_then(Value::as_u64).unwrap_or(0);
        }
        call.record.tool_calls = observed.tool_calls;
        let denied = call.record.tool_calls.iter().position(|t| rules.denied_tool(&t.name).is_some());
        if let Some(i) = denied {
            call.record.tool_calls[i].blocked = true;
            let tool = call.record.tool_calls[i].name.clone();
            let glob = rules.denied_tool(&tool).unwrap_or_default().to_string();
            let message = wire::denied_tool_message(&tool, &glob);
            let body = wire::error_body(call.anthropic, 403, "tool_denied", &message);
            call.record.decision = Decision::Blocked;
            call.record.rule = "tools".into();
            call.record.status = 403;
            call.record.message = message;
            let mut response = json_response(403, body);
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
            let response = call.with_id(response);
            let committed = call.finish(0);
            return Ok(after_commit(response, committed));
        }
    }
    let response = call.with_id(out.body(full(bytes)).expect("valid response parts"));
    let committed = call.finish(0);
    Ok(after_commit(response, committed))
}

/// The upstream and the model name it knows: `name/model` picks upstream `name`; a bare model goes to
/// the first upstream that serves the API.
fn route(upstreams: &[UpstreamInfo], api: Api, model: &str) -> Result<(UpstreamInfo, String), String> {
    if let Some((prefix, rest)) = model.split_once('/')
        && let Some(u) = upstreams.iter().find(|u| u.name == prefix)
    {
        if !api.serves(u.kind) {
            return Err(format!(
                "model {model} names upstream {} ({}), which does not serve the {} API",
                u.name,
                u.kind,
                api.name()
            ));
        }
        return Ok((u.clone(), rest.to_string()));
    }
    match upstreams.iter().find(|u| api.serves(u.kind)) {
        Some(u) => Ok((u.clone(), model.to_string())),
        None => Err(format!(
            "no upstream of this tailnet serves the {} API (upstreams: {}); add one with SetUpstream",
            api.name(),
            if upstreams.is_empty() {
                "none".to_string()
            } else {
                upstreams.iter().map(|u| format!("{} ({})", u.name, u.kind)).collect::<Vec<_>>().join(", ")
            }
        )),
    }
}

/// The request to the upstream: the caller's own credentials are dropped, the upstream's key added.
fn upstream_request(
    upstream: &UpstreamInfo,
    api: Api,
    client_headers: &HeaderMap,
    key: &str,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let uri = format!("{}{}", upstream.base_url.trim_end_matches('/'), api.upstream_path(upstream.kind));
    let method = if api == Api::Models { Method::GET } else { Method::POST };
    let mut request = Request::builder()
        .method(method)
        .uri(&uri)
        .body(Full::new(body))
        .map_err(|_| format!("upstream {}: {uri:?} is not a usable URL", upstream.name))?;
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::USER_AGENT, HeaderValue::from_static("cordon-gateway"));
    if let Some(accept) = client_headers.get(header::ACCEPT) {
        headers.insert(header::ACCEPT, accept.clone());
    }
    let secret = |prefix: &str| {
        let mut v = HeaderValue::from_str(&format!("{prefix}{key}"))
            .map_err(|_| format!("upstream {}: its API key is not a valid header value", upstream.name))?;
        v.set_sensitive(true);
        Ok::<_, String>(v)
    };
    if upstream.kind == UpstreamKind::Anthropic {
        let version =
            client_headers.get("anthropic-version").cloned().unwrap_or(HeaderValue::from_static("2023-06-01"));
        headers.insert(HeaderName::from_static("anthropic-version"), version);
        if let Some(beta) = client_headers.get("anthropic-beta") {
            headers.insert(HeaderName::from_static("anthropic-beta"), beta.clone());
        }
        headers.insert(HeaderName::from_static("x-api-key"), secret("")?);
    } else {
        if let Some(beta) = client_headers.get("openai-beta") {
            headers.insert(HeaderName::from_static("openai-beta"), beta.clone());
        }
        headers.insert(header::AUTHORIZATION, secret("Bearer ")?);
    }
    Ok(request)
}

/// Replaces any copy of the key in an upstream body (some providers echo part of a bad key).
fn redact(bytes: Bytes, key: &str) -> Bytes {
    let k = key.as_bytes();
    if k.len() < 8 || !bytes.windows(k.len()).any(|w| w == k) {
        return bytes;
    }
    let text = String::from_utf8_lossy(&bytes).replace(key, "<redacted>");
    Bytes::from(text)
}

fn redact_str(text: &str, key: &str) -> String {
    if key.len() < 8 { text.to_string() } else { text.replace(key, "<redacted>") }
}

/// `GET /v1/models`: each upstream's models as `upstream/model`, only those the caller may use.
async fn models(
    mut call: Call,
    upstreams: &[UpstreamInfo],
    rules: &Rules,
    client: &HeaderMap,
) -> Response<GatewayBody> {
    let gateway = call.gateway.clone();
    let mut ids: Vec<(String, String)> = Vec::new();
    for u in upstreams {
        let Ok(Some(key)) = gateway.cp.upstream_api_key(gateway.tailnet, &u.name).await else { continue };
        let Ok(request) = upstream_request(u, Api::Models, client, key.expose(), Bytes::new()) else { continue };
        let listed = async {
            let response = gateway.cp.gateways.client.request(request).await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let body = Limited::new(response.into_body(), MAX_RESPONSE).collect().await.ok()?.to_bytes();
            serde_json::from_slice::<Value>(&body).ok()
        };
        match listed.await {
            Some(v) => {
                for m in v.get("data").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(id) = m.get("id").and_then(Value::as_str) {
                        ids.push((format!("{}/{id}", u.name), u.name.clone()));
                    }
                }
            }
            None => tracing::debug!(upstream = %u.name, "could not list the upstream's models"),
        }
    }
    ids.retain(|(id, _)| rules.allows_model(id));
    let body = if call.anthropic {
        let data: Vec<Value> = ids
            .iter()
            .map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": ids.first().map(|i| &i.0), "last_id": ids.last().map(|i| &i.0)})
    } else {
        let data: Vec<Value> = ids
            .iter()
            .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
            .collect();
        json!({"object": "list", "data": data})
    };
    call.record.status = 200;
    call.record.decision = Decision::Allowed;
    let response = call.with_id(json_response(200, serde_json::to_vec(&body).expect("JSON serializes")));
    let committed = call.finish(0);
    after_commit(response, committed)
}

/// A streamed response on its way to the client: passed through event by event by the meter, which
/// counts usage and tool calls and can cut the stream. The call is recorded when the stream's final
/// event arrives (or the stream fails, or the client goes away); the final event leaves only once that
/// record has committed.
struct Metered {
    upstream: Incoming,
    meter: SseMeter,
    call: Option<Call>,
    first_byte: Option<u64>,
    logged: Vec<u8>,
    /// To redact from what passes (a provider might echo it).
    key: crate::secret::Secret,
    /// The commit of the call's audit event, which the final bytes wait for.
    committed: Option<oneshot::Receiver<bool>>,
    held: Option<Bytes>,
}

impl Metered {
    fn complete(&mut self, failure: Option<String>) -> Option<oneshot::Receiver<bool>> {
        let mut call = self.call.take()?;
        let observed = &self.meter.observed;
        call.saw_usage = observed.saw_usage;
        call.record.input_tokens = observed.usage.input;
        call.record.output_tokens = observed.usage.output;
        call.record.cached_tokens = observed.usage.cached;
        call.record.tool_calls = self.meter.tool_calls();
        if let Some((tool, glob)) = &self.meter.blocked {
            call.record.decision = Decision::Blocked;
            call.record.rule = "tools".into();
            call.record.message = wire::denied_tool_message(tool, glob);
        } else if let Some(why) = failure.or_else(|| observed.error.clone()) {
            call.record.decision = Decision::Failed;
            call.record.message = redact_str(&why, self.key.expose());
        }
        if call.log_bodies {
            call.record.response_body = logged(&self.logged);
        }
        Some(call.finish(self.first_byte.unwrap_or(0)))
    }

    /// Redacts what goes out and notes it (first byte, logged body).
    fn prepare(&mut self, out: Vec<u8>) -> Bytes {
        // Events pass whole, so a key inside one is within this chunk.
        let out = redact(Bytes::from(out), self.key.expose());
        if self.first_byte.is_none()
            && let Some(call) = &self.call
        {
            self.first_byte = Some(call.start.elapsed().as_micros() as u64);
        }
        if self.call.as_ref().is_some_and(|c| c.log_bodies) && self.logged.len() < MAX_LOGGED_BODY {
            self.logged.extend_from_slice(&out);
        }
        out
    }

    /// Records the call and holds `out` (the final bytes) until the record commits.
    fn hold_until_recorded(&mut self, out: Bytes) {
        self.committed = self.complete(None);
        if !out.is_empty() {
            self.held = Some(out);
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(committed) = this.committed.as_mut() {
                let ok = ready!(Pin::new(committed).poll(cx)).unwrap_or(false);
                this.committed = None;
                if !ok {
                    this.held = None;
                    return Poll::Ready(Some(Err(audit_failed())));
                }
            }
            if let Some(out) = this.held.take() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if this.call.is_none() {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.upstream).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let mut out = Vec::new();
                    this.meter.feed(&data, &mut out);
                    let last = this.meter.blocked.is_some() || this.meter.ended;
                    if out.is_empty() && !last {
                        continue;
                    }
                    let out = this.prepare(out);
                    if last {
                        this.hold_until_recorded(out);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(e)) => {
                    this.complete(Some(format!("the upstream stream failed: {e}")));
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    let mut out = Vec::new();
                    this.meter.finish(&mut out);
                    let out = this.prepare(out);
                    this.hold_until_recorded(out);
                }
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if self.call.is_some() {
            self.complete(Some("the client went away before the stream ended".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, kind: &str) -> UpstreamInfo {
        UpstreamInfo {
            name: name.into(),
            kind: UpstreamKind::parse(kind).unwrap(),
            base_url: "http://127.0.0.1:9/v1".into(),
            updated_at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn models_route_by_prefix_or_to_the_default_for_the_api() {
        let ups = [upstream("openai", "openai"), upstream("claude", "anthropic")];
        assert_eq!(route(&ups, Api::Chat, "gpt-4o").unwrap().1, "gpt-4o");
        assert_eq!(route(&ups, Api::Messages, "claude/claude-x").unwrap(), (ups[1].clone(), "claude-x".into()));
        assert_eq!(route(&ups, Api::Messages, "claude-x").unwrap().0.name, "claude");
        assert!(route(&ups, Api::Chat, "claude/claude-x").unwrap_err().contains("does not serve"));
        assert!(route(&[], Api::Chat, "gpt").unwrap_err().contains("SetUpstream"));
    }

    #[test]
    fn the_client_credentials_never_reach_the_upstream() {
        let mut client = HeaderMap::new();
        client.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer client-token"));
        client.insert("x-api-key", HeaderValue::from_static("client-key"));
        client.insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        let r =
            upstream_request(&upstream("a", "anthropic"), Api::Messages, &client, "sk-upstream", Bytes::new()).unwrap();
        assert_eq!(r.headers()["x-api-key"], "sk-upstream");
        assert!(r.headers()["x-api-key"].is_sensitive());
        assert_eq!(r.headers()["anthropic-version"], "2024-01-01");
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(r.uri(), "http://127.0.0.1:9/v1/v1/messages");
        let r = upstream_request(&upstream("o", "openai"), Api::Chat, &client, "sk-upstream", Bytes::new()).unwrap();
        assert_eq!(r.headers()[header::AUTHORIZATION], "Bearer sk-upstream");
        assert!(r.headers().get("x-api-key").is_none());
    }

    #[test]
    fn keys_in_upstream_bodies_are_redacted() {
        let b = redact(Bytes::from_static(b"{\"error\":\"bad key sk-secret-123\"}"), "sk-secret-123");
        assert_eq!(&b[..], b"{\"error\":\"bad key <redacted>\"}");
    }
}
