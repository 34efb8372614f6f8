//! The server's Prometheus metrics (`cordon serve --metrics-listen`): live counters and histograms kept
//! by `prometheus-client`, and values read from the control plane at scrape time (tailnets, nodes,
//! relay counters). Served by the same small HTTP server as agentd's ([`agentd::metrics`]).
//!
//! Labels are bounded: gRPC methods are the API's own (an unknown path counts as `other`), codes are
//! gRPC's, gateway series are by tailnet, API, decision and upstream name (each tailnet has at most 16
//! upstreams). No node id is ever a label.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use agentd::metrics::Sample;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::codegen::http;

use crate::control_plane::ControlPlane;
use crate::model::{Decision, GatewayRequest, TailnetId};

/// Histogram buckets for latencies, in seconds: 100 µs to about 13 s.
pub const LATENCY_BUCKETS: [f64; 18] =
    [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The live metrics; one per control plane.
pub struct Metrics {
    registry: Registry,
    grpc_calls: Family<Labels, Counter>,
    grpc_seconds: Histograms,
    watch_streams: Family<Labels, Gauge>,
    gateway_requests: Family<Labels, Counter>,
    gateway_tokens: Family<Labels, Counter>,
    gateway_seconds: Histograms,
    gateway_ttfb_seconds: Histograms,
    gateway_upstream_errors: Family<Labels, Counter>,
    webhook_deliveries: Family<Labels, Counter>,
    audit_queue: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(commits: &crate::store::CommitStats) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            grpc_calls: Family::default(),
            grpc_seconds: Family::new_with_constructor(latency_histogram),
            watch_streams: Family::default(),
            gateway_requests: Family::default(),
            gateway_tokens: Family::default(),
            gateway_seconds: Family::new_with_constructor(latency_histogram),
            gateway_ttfb_seconds: Family::new_with_constructor(latency_histogram),
            gateway_upstream_errors: Family::default(),
            webhook_deliveries: Family::default(),
            audit_queue: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("cordon_grpc_requests", "gRPC calls by method and status code", m.grpc_calls.clone());
        registry.register(
            "cordon_grpc_request_duration_seconds",
            "gRPC call latency by method (streams: until the response starts)",
            m.grpc_seconds.clone(),
        );
        registry.register("cordon_watch_streams", "Open watch streams by kind", m.watch_streams.clone());
        registry.register(
            "cordon_store_commit_duration_seconds",
            "Time to commit a write transaction",
            commits.seconds.clone(),
        );
        registry.register("cordon_store_commits_in_flight", "Write commits under way", commits.in_flight.clone());
        registry.register(
            "cordon_gateway_requests",
            "Gateway requests by tailnet, API and decision",
            m.gateway_requests.clone(),
        );
        registry.register(
            "cordon_gateway_tokens",
            "Tokens through the gateway by tailnet and direction (input, output)",
            m.gateway_tokens.clone(),
        );
        registry.register(
            "cordon_gateway_request_duration_seconds",
            "Gateway request latency by API, until the last byte",
            m.gateway_seconds.clone(),
        );
        registry.register(
            "cordon_gateway_time_to_first_byte_seconds",
            "Gateway time to the first response byte by API",
            m.gateway_ttfb_seconds.clone(),
        );
        registry.register(
            "cordon_gateway_upstream_errors",
            "Upstream calls that failed (unreachable, or a 5xx answer) by tailnet and upstream",
            m.gateway_upstream_errors.clone(),
        );
        registry.register(
            "cordon_webhook_deliveries",
            "Webhook deliveries by result (delivered, or failed after the retry window)",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "cordon_audit_queue_depth",
            "Gateway audit events waiting to be committed",
            m.audit_queue.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one finished gateway request (called as its audit event is queued).
    /// One event's delivery to a webhook ended.
    pub fn webhook_delivery(&self, delivered: bool) {
        let result = if delivered { "delivered" } else { "failed" };
        self.webhook_deliveries.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    pub fn gateway_request(&self, tailnet: TailnetId, r: &GatewayRequest) {
        let tailnet = tailnet.to_string();
        let api = if r.api.is_empty() { "unknown".to_string() } else { r.api.clone() };
        let decision = match r.decision {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Blocked => "blocked",
            Decision::Failed => "failed",
        };
        self.gateway_requests
            .get_or_create(&vec![("tailnet", tailnet.clone()), ("api", api.clone()), ("decision", decision.into())])
            .inc();
        for (direction, n) in [("input", r.input_tokens), ("output", r.output_tokens)] {
            if n > 0 {
                self.gateway_tokens
                    .get_or_create(&vec![("tailnet", tailnet.clone()), ("direction", direction.into())])
                    .inc_by(n);
            }
        }
        self.gateway_seconds.get_or_create(&vec![("api", api.clone())]).observe(r.latency_us as f64 / 1e6);
        self.gateway_ttfb_seconds.get_or_create(&vec![("api", api)]).observe(r.ttfb_us as f64 / 1e6);
        if r.decision == Decision::Failed && !r.upstream.is_empty() && (r.status >= 500 || r.status == 0) {
            self.gateway_upstream_errors
                .get_or_create(&vec![("tailnet", tailnet), ("upstream", r.upstream.clone())])
                .inc();
        }
    }

    pub fn audit_queued(&self) {
        self.audit_queue.inc();
    }

    pub fn audit_written(&self, n: usize) {
        self.audit_queue.dec_by(n as i64);
    }

    /// Counts an open watch stream of `kind` (`netmap`, `events`, `relay`) until the guard drops.
    pub fn watch_stream(self: &Arc<Self>, kind: &'static str) -> StreamGuard {
        let gauge = self.watch_streams.get_or_create(&vec![("kind", kind.to_string())]).clone();
        gauge.inc();
        StreamGuard(gauge)
    }

    /// A scrape: the live metrics, then what the control plane holds now.
    pub async fn render(&self, cp: &ControlPlane) -> String {
        let mut s = Sample::default();
        match cp.store_counts().await {
            Ok(c) => {
                s.gauge("cordon_tailnets", "Live tailnets", vec![], c.tailnets);
                // The gateways are the server's own nodes, one per tailnet.
                let nodes = c.nodes.saturating_sub(c.tailnets);
                // Each running gateway holds a netmap stream of its own.
                let online = (cp.hub().online_nodes().saturating_sub(cp.gateways_running())) as u64;
                let help = "Nodes by state (online: holds a netmap stream)";
                s.gauge("cordon_nodes", help, vec![("state", "online".into())], online);
                s.gauge("cordon_nodes", help, vec![("state", "offline".into())], nodes.saturating_sub(online));
                s.gauge("cordon_audit_events", "Audit events stored", vec![], c.events);
                s.gauge("cordon_store_up", "1 when the store answered this scrape", vec![], 1);
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics: the store did not answer");
                s.gauge("cordon_store_up", "1 when the store answered this scrape", vec![], 0);
            }
        }
        s.gauge("cordon_gateways_running", "Gateways running in this process", vec![], cp.gateways_running() as u64);
        let r = cp.relays.counts();
        let frames = "Relay frames forwarded";
        s.counter("cordon_relay_frames", frames, vec![], r.forwarded_frames);
        s.counter("cordon_relay_bytes", "Relay bytes forwarded", vec![], r.forwarded_bytes);
        let drops = [
            ("unknown_peer", r.dropped_unknown_peer),
            ("oversize", r.dropped_oversize),
            ("rate", r.dropped_rate),
            ("overflow", r.dropped_overflow),
        ];
        for (reason, n) in drops {
            s.counter("cordon_relay_drops", "Relay frames dropped by reason", vec![("reason", reason.into())], n);
        }
        if let Some(port) = cp.port.get() {
            let help = "WireGuard datagrams on the server's UDP port: handed to a gateway, or claimed by none";
            for (result, n) in [("routed", &port.routed), ("unrouted", &port.unrouted)] {
                let n = n.load(std::sync::atomic::Ordering::Relaxed);
                s.counter("cordon_gateway_udp_datagrams", help, vec![("result", result.into())], n);
            }
        }
        agentd::metrics::render(Some(&self.registry), s)
    }

    fn grpc_call(&self, method: &str, code: &str, seconds: f64) {
        self.grpc_calls.get_or_create(&vec![("method", method.to_string()), ("code", code.to_string())]).inc();
        self.grpc_seconds.get_or_create(&vec![("method", method.to_string())]).observe(seconds);
    }
}

/// Decrements its watch-stream gauge when dropped.
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The gRPC method label of a request path: `Control/CreateTailnet` for the API's services, health and
/// reflection by their short names, `other` for anything else (so that random paths add no series).
fn method_label(path: &str) -> String {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return "other".into();
    };
    let short = match service {
        "cordon.v1.Control" => "Control",
        "cordon.v1.Node" => "Node",
        "grpc.health.v1.Health" => "Health",
        "grpc.reflection.v1.ServerReflection" => "Reflection",
        _ => return "other".into(),
    };
    let plausible = !method.is_empty() && method.len() <= 48 && method.bytes().all(|b| b.is_ascii_alphanumeric());
    if plausible { format!("{short}/{method}") } else { "other".into() }
}

/// The gRPC code name of a response's `grpc-status` header (errors arrive trailers-only, so in the
/// headers; a response without one has started successfully).
fn code_label(headers: &http::HeaderMap) -> &'static str {
    let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok())
    else {
        return "OK";
    };
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The tower layer that counts and times every gRPC call.
#[derive(Clone)]
pub struct GrpcLayer(pub Arc<Metrics>);

impl<S> tower_layer::Layer<S> for GrpcLayer {
    type Service = GrpcMetered<S>;

    fn layer(&self, inner: S) -> GrpcMetered<S> {
        GrpcMetered { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for GrpcMetered<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => code_label(response.headers()),
                Err(_) => "TRANSPORT",
            };
            // An unknown method's name came from the caller: it gets no series of its own.
            let method = if code == "UNIMPLEMENTED" { "other" } else { &method };
            metrics.grpc_call(method, code, start.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label("/cordon.v1.Control/CreateTailnet"), "Control/CreateTailnet");
        assert_eq!(method_label("/cordon.v1.Node/Relay"), "Node/Relay");
        assert_eq!(method_label("/evil.Service/X"), "other");
        assert_eq!(method_label("/cordon.v1.Control/a-b"), "other");
        assert_eq!(method_label(&format!("/cordon.v1.Control/{}", "A".repeat(49))), "other");
        assert_eq!(method_label("/"), "other");
    }

    #[test]
    fn codes_come_from_grpc_status() {
        let mut h = http::HeaderMap::new();
        assert_eq!(code_label(&h), "OK");
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(code_label(&h), "NOT_FOUND");
        h.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(code_label(&h), "OK");
    }
}
