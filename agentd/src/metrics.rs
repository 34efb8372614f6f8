//! Prometheus metrics over HTTP (`--metrics-listen`): `GET /metrics` answers in the OpenMetrics text
//! format, encoded by `prometheus-client`. Values that live elsewhere (the engine's counters, which only
//! its task touches) are read when a scrape arrives and encoded as a [`Sample`]; nothing is counted
//! twice. `cordon serve` uses the same server and [`Sample`] for its own metrics.
//!
//! No label carries a node id, key or address: label values come from small fixed sets (path kinds,
//! drop reasons, stream kinds), so a scrape's size does not grow with the tailnet.

use std::future::Future;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::node::Status;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Values read at scrape time, grouped into families by name (in the order first given).
#[derive(Debug, Default)]
pub struct Sample {
    families: Vec<SampleFamily>,
}

#[derive(Debug)]
struct SampleFamily {
    name: &'static str,
    help: &'static str,
    counter: bool,
    series: Vec<(Labels, u64)>,
}

impl Sample {
    /// A counter series; `name` without the `_total` suffix (the encoder adds it).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.push(name, help, true, labels, value);
    }

    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.push(name, help, false, labels, value);
    }

    fn push(&mut self, name: &'static str, help: &'static str, counter: bool, labels: Labels, value: u64) {
        // prometheus-client writes label values as given; the exposition format wants these escaped.
        let labels = labels.into_iter().map(|(k, v)| (k, escape(&v))).collect();
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.series.push((labels, value)),
            None => self.families.push(SampleFamily { name, help, counter, series: vec![(labels, value)] }),
        }
    }
}

/// A label value as the text format writes it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Collector for Sample {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let kind = if f.counter { MetricType::Counter } else { MetricType::Gauge };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, value) in &f.series {
                let encode = |series: MetricEncoder<'_>| {
                    if f.counter {
                        ConstCounter::new(*value).encode(series)
                    } else {
                        ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(series)
                    }
                };
                if labels.is_empty() {
                    // Each unlabelled family has one series, and `name{}` reads badly.
                    encode(metric)?;
                    break;
                }
                encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The exposition of `registry` (the live metrics) followed by `sample`, ending with `# EOF`.
pub fn render(registry: Option<&Registry>, sample: Sample) -> String {
    let mut out = String::new();
    let mut scraped = Registry::default();
    scraped.register_collector(Box::new(sample));
    let encoded = registry
        .map_or(Ok(()), |r| prometheus_client::encoding::text::encode_registry(&mut out, r))
        .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &scraped))
        .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out));
    // Writing to a String cannot fail; an encoder error would be a bug in a metric's name.
    encoded.expect("metrics encode into a String");
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `scrape` makes each answer.
pub async fn serve<F, Fut>(listener: TcpListener, scrape: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let scrape = scrape.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, scrape).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
        });
    }
}

async fn answer<F, Fut>(req: Request<hyper::body::Incoming>, scrape: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, scrape().await),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Binds the metrics listener, with an error that names the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics (--metrics-listen)"))
}

/// agentd's metrics, from one [`Status`].
pub fn node_sample(status: &Status) -> Sample {
    let mut s = Sample::default();
    let t = &status.traffic;
    let flows = [
        ("direct", "tx", t.direct_tx),
        ("direct", "rx", t.direct_rx),
        ("relay", "tx", t.relay_tx),
        ("relay", "rx", t.relay_rx),
    ];
    for (path, direction, flow) in flows {
        let labels = || vec![("path", path.to_string()), ("direction", direction.to_string())];
        s.counter("agentd_wireguard_packets", "WireGuard datagrams, by path and direction", labels(), flow.packets);
        s.counter("agentd_wireguard_bytes", "WireGuard datagram bytes, by path and direction", labels(), flow.bytes);
    }
    s.counter("agentd_handshakes", "WireGuard handshakes completed", vec![], t.handshakes);
    let d = &status.drops;
    let drops = [
        ("malformed", d.malformed),
        ("unknown_peer", d.unknown_peer),
        ("bad_source", d.bad_source),
        ("filtered", d.filtered),
        ("replayed", d.replayed),
        ("undecryptable", d.undecryptable),
        ("no_route", d.no_route),
        ("no_endpoint", d.no_endpoint),
    ];
    for (reason, n) in drops {
        s.counter("agentd_drops", "Packets dropped, by reason", vec![("reason", reason.to_string())], n);
    }
    let (netmap, relay) = status.reconnects;
    let reconnects = "Streams to the server that came back after breaking";
    s.counter("agentd_reconnects", reconnects, vec![("stream", "netmap".into())], netmap);
    s.counter("agentd_reconnects", reconnects, vec![("stream", "relay".into())], relay);
    let resumed = "Netmap stream comebacks the server resumed with a delta from the node's revision";
    s.counter("agentd_netmap_resumed", resumed, vec![], status.resumed);
    let by_path = |want: Option<&str>| {
        status
            .peers
            .iter()
            .filter(|p| {
                let kind = p.path.map(|r| match r {
                    crate::wg::Route::Direct(_) => "direct",
                    crate::wg::Route::Relay(_) => "relay",
                });
                kind == want
            })
            .count() as u64
    };
    let peers = "Peers in the netmap, by the path in use (none: no traffic yet)";
    for (label, want) in [("direct", Some("direct")), ("relay", Some("relay")), ("none", None)] {
        s.gauge("agentd_peers", peers, vec![("path", label.to_string())], by_path(want));
    }
    s.gauge("agentd_up", "1 while the node is in its tailnet", vec![], u64::from(status.ended.is_none()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_renders_as_openmetrics_with_one_descriptor_per_family() {
        let mut s = Sample::default();
        s.counter("x_drops", "Drops", vec![("reason", "a".into())], 3);
        s.counter("x_drops", "Drops", vec![("reason", "b\"q".into())], 4);
        s.gauge("x_peers", "Peers", vec![], 2);
        let text = render(None, s);
        assert_eq!(text.matches("# TYPE x_drops counter").count(), 1, "{text}");
        assert!(text.contains("x_drops_total{reason=\"a\"} 3\n"), "{text}");
        assert!(text.contains("x_drops_total{reason=\"b\\\"q\"} 4\n"), "label values are escaped: {text}");
        assert!(text.contains("x_peers 2\n") && !text.contains("{}"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
