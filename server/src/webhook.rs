//! Alerts to webhooks. One task per webhook follows the audit log (the events table is the outbox):
//! it reads the events after its cursor, POSTs each chosen one as JSON signed with HMAC-SHA256, retries
//! with backoff for the webhook's retry window, records the delivery, and only then moves its cursor, so
//! a restart resumes where it stopped and loses nothing. A slow or dead receiver holds up only its own
//! task.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use crate::control_plane::ControlPlane;
use crate::error::{Error, Result};
use crate::model::{Delivery, Event, Webhook, WebhookId};
use crate::store::EventFilter;

/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between attempts: from the first to the last, doubling.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Addresses a webhook may never reach: link-local (cloud metadata services live at 169.254.169.254),
/// unspecified, multicast and broadcast.
fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| forbidden(IpAddr::V4(v4)))
        }
    }
}

/// Checks a webhook URL when it is created: http(s), a host, and not an address it may never reach.
pub fn check_url(url: &str) -> Result<()> {
    let uri: hyper::Uri = url.parse().map_err(|_| Error::invalid("url", "is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(Error::invalid("url", "must be http:// or https://")),
    }
    let host = uri.host().ok_or_else(|| Error::invalid("url", "has no host"))?;
    // A URL with user:password@ would be stored, listed and logged with its password: refused, unquoted.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(Error::invalid(
            "url",
            "must not carry credentials (user:password@): receivers authenticate deliveries by their signature \
             (the webhook's secret)",
        ));
    }
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
        && forbidden(ip)
    {
        return Err(Error::invalid(
            "url",
            format!("{ip} is a link-local, multicast or unspecified address (cloud metadata services live there)"),
        ));
    }
    Ok(())
}

/// Resolves the URL's host and refuses it if any address is forbidden (a name may point anywhere).
async fn check_target(uri: &hyper::Uri) -> std::result::Result<(), String> {
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?;
    for addr in addrs {
        if forbidden(addr.ip()) {
            return Err(format!("{host} resolves to {}, which webhooks may not reach", addr.ip()));
        }
    }
    Ok(())
}

/// The event as a receiver gets it.
fn body(event: &Event) -> Vec<u8> {
    let time = event.time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serde_json::json!({
        "id": event.id.to_string(),
        "revision": event.revision,
        "event": event.kind.name(),
        "time": crate::time::rfc3339(event.time),
        "time_unix": time,
        "tailnet_id": event.tailnet_id.map(|t| t.to_string()),
        "node_id": event.node_id.map(|n| n.to_string()),
        "actor": event.actor,
        "reason": event.reason,
        "summary": event.summary,
        "run": event.run,
        "gateway": event.gateway,
    })
    .to_string()
    .into_bytes()
}

type HttpClient = Client<crate::gateway::Https, Full<Bytes>>;

/// One attempt: the receiver's status, or why there was none.
async fn attempt(client: &HttpClient, hook: &Webhook, event: &Event) -> std::result::Result<u16, (u16, String)> {
    let uri: hyper::Uri = hook.url.parse().map_err(|_| (0, "the URL does not parse".to_string()))?;
    check_target(&uri).await.map_err(|e| (0, e))?;
    let body = body(event);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let request = hyper::Request::post(uri)
        .header("content-type", "application/json")
        .header("user-agent", "cordon-webhook/1")
        .header("cordon-signature", signature(&hook.secret, now, &body))
        .header("cordon-delivery-id", event.id.to_string())
        .header("cordon-event", event.kind.name())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (0, format!("cannot build the request: {e}")))?;
    let response = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(request))
        .await
        .map_err(|_| (0, format!("no answer in {} s", ATTEMPT_TIMEOUT.as_secs())))?
        .map_err(|e| (0, format!("cannot connect: {e}")))?;
    let status = response.status();
    // Read (a bounded amount of) the answer so the connection can be reused.
    let _ =
        tokio::time::timeout(ATTEMPT_TIMEOUT, http_body_util::Limited::new(response.into_body(), 64 * 1024).collect())
            .await;
    match status.as_u16() {
        s @ 200..=299 => Ok(s),
        s @ 300..=399 => Err((s, format!("answered {s}; redirects are not followed"))),
        s => Err((s, format!("answered {s}"))),
    }
}

/// Which webhooks deliver from this server. Among replicas, one delivers them all (the live one with the
/// lowest id), so that an event is not posted once per replica; another takes over when it goes.
pub struct Runner {
    running: std::sync::Mutex<std::collections::HashSet<WebhookId>>,
    /// Whether this server delivers webhooks now.
    on: tokio::sync::watch::Sender<bool>,
}

impl Default for Runner {
    fn default() -> Self {
        Runner { running: Default::default(), on: tokio::sync::watch::channel(true).0 }
    }
}

impl Runner {
    /// Starts or stops delivering (a replica that became, or stopped being, the one that delivers).
    pub async fn deliver_here(&self, cp: &Arc<ControlPlane>, on: bool) {
        if self.on.send_replace(on) == on || !on {
            return;
        }
        match cp.list_webhooks().await {
            Ok(hooks) => hooks.iter().for_each(|h| spawn(cp, h.id)),
            Err(e) => tracing::warn!(error = %e, "cannot list the webhooks to deliver"),
        }
    }
}

/// Forgets a delivery task in the running set when it ends.
struct Running(std::sync::Weak<ControlPlane>, WebhookId);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(cp) = self.0.upgrade() {
            cp.webhooks.running.lock().unwrap().remove(&self.1);
        }
    }
}

/// Starts the webhook's delivery task (at creation, and for every webhook when the server starts), if
/// this server delivers webhooks and it does not run yet.
pub fn spawn(cp: &Arc<ControlPlane>, id: WebhookId) {
    if !*cp.webhooks.on.borrow() || !cp.webhooks.running.lock().unwrap().insert(id) {
        return;
    }
    cp.spawn(run(Arc::downgrade(cp), id));
}

async fn run(weak: std::sync::Weak<ControlPlane>, id: WebhookId) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(crate::gateway::https_connector());
    let Some(strong) = weak.upgrade() else { return };
    let (mut events, shutdown, on) =
        (strong.hub().subscribe_events(), strong.shutdown_signal(), strong.webhooks.on.subscribe());
    // Stops like a shutdown when another replica takes the webhooks over.
    let mut shutdown = stop_signal(shutdown, on);
    drop(strong);
    let _running = Running(weak.clone(), id);
    loop {
        let Some(cp) = weak.upgrade() else { return };
        let Ok(Some(hook)) = cp.webhook(id).await else { return };
        let filter = EventFilter {
            tailnet: hook.tailnet_id,
            after_revision: hook.delivered_revision,
            limit: 100,
            ..Default::default()
        };
        let pending = match cp.list_events(&filter).await {
            Ok((pending, _)) => pending,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "webhook: cannot read the audit log; retrying in 5 s");
                drop(cp);
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if pending.is_empty() {
            drop(cp);
            tokio::select! {
                _ = crate::control_plane::stopped(&mut shutdown) => return,
                // Any new event (or a lag) is a reason to look again; the store has the order.
                received = events.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = received {
                        return;
                    }
                }
            }
            continue;
        }
        for event in pending {
            let chosen = hook.events.is_empty() || hook.events.contains(&event.kind);
            let delivery = if chosen {
                match deliver(&client, &hook, &event, &mut shutdown).await {
                    Some(d) => Some(d),
                    None => return, // shutting down: the cursor stays, the event goes after the restart
                }
            } else {
                None
            };
            if let Some(d) = &delivery {
                cp.metrics.webhook_delivery(d.delivered);
            }
            if let Err(e) = cp.record_delivery(id, event.revision, delivery).await {
                tracing::warn!(webhook = %id, error = %e, "webhook: cannot record a delivery; it will be retried");
                break;
            }
        }
    }
}

/// Delivers one event, retrying with backoff for the webhook's window; `None` when the server stops.
async fn deliver(
    client: &HttpClient,
    hook: &Webhook,
    event: &Event,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<Delivery> {
    let started = tokio::time::Instant::now();
    let window = Duration::from_secs(hook.retry_seconds);
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = tokio::select! {
            _ = crate::control_plane::stopped(shutdown) => return None,
            outcome = attempt(client, hook, event) => outcome,
        };
        let (delivered, status, error) = match outcome {
            Ok(status) => (true, status, String::new()),
            Err((status, error)) => (false, status, error),
        };
        if delivered || started.elapsed() + backoff > window {
            if !delivered {
                tracing::warn!(webhook = %hook.id, url = %hook.url, event = %event.id, %error, attempts, "webhook: giving up on an event");
            }
            return Some(Delivery {
                webhook_id: hook.id,
                event_id: event.id,
                revision: event.revision,
                kind: event.kind,
                delivered,
                attempts,
                status,
                error,
                time: SystemTime::now(),
            });
        }
        tracing::debug!(webhook = %hook.id, %error, attempts, "webhook: delivery failed; retrying");
        tokio::select! {
            _ = crate::control_plane::stopped(shutdown) => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A signal that fires on shutdown or when this server stops delivering webhooks.
fn stop_signal(
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut on: tokio::sync::watch::Receiver<bool>,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::control_plane::stopped(&mut shutdown) => {}
            _ = on.wait_for(|on| !*on) => {}
            _ = tx.closed() => return,
        }
        let _ = tx.send(true);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe", message "what do ya want for nothing?".
        let s = signature("Jefe", 1, b"what do ya want for nothing?");
        assert!(s.starts_with("t=1,v1="));
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature("Jefe", 2, b"what do ya want for nothing?"), "the time is signed");
    }

    #[test]
    fn urls_that_reach_metadata_services_are_refused() {
        assert!(check_url("http://169.254.169.254/latest/meta-data").is_err());
        assert!(check_url("http://[fe80::1]/hook").is_err());
        assert!(check_url("http://0.0.0.0/hook").is_err());
        assert!(check_url("ftp://example.com/hook").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("https://hooks.example.com/cordon").is_ok());
        let e = check_url("https://bot:hunter2@hooks.example.com/cordon").unwrap_err().to_string();
        assert!(e.starts_with("url: must not carry credentials") && !e.contains("hunter2"), "{e}");
        assert!(check_url("http://127.0.0.1:8080/hook").is_ok(), "a receiver on the host itself is allowed");
    }
}
