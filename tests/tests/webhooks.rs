//! Alerts to webhooks: a receiver served by the test gets chosen events as signed JSON; one that is down
//! for a while, across a server restart mid-backoff, then gets every event exactly once and in order;
//! deliveries that failed are listed with why; URLs that reach link-local metadata addresses are refused
//! and redirects are not followed; the secret is never shown again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cordon_tests::v1 as pb;
use cordon_tests::*;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use tonic::Code;

const SECRET: &str = "whsec-0123456789abcdef";

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    Down,
    Redirect,
}

#[derive(Clone)]
struct Received {
    delivery_id: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let receiver = Receiver { url, mode: Arc::new(Mutex::new(mode)), got: Arc::default() };
        let state = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let header = |n: &str| {
                                req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                            };
                            let (delivery_id, signature) = (header("cordon-delivery-id"), header("cordon-signature"));
                            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let mode = *state.mode.lock().unwrap();
                            let answered = match mode {
                                Mode::Up => 200,
                                Mode::Down => 503,
                                Mode::Redirect => 302,
                            };
                            state.got.lock().unwrap().push(Received { delivery_id, signature, body, answered });
                            let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = hyper::StatusCode::from_u16(answered).unwrap();
                            if mode == Mode::Redirect {
                                response.headers_mut().insert("location", "http://169.254.169.254/".parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        receiver
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Checks `cordon-signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn signed(r: &Received) -> bool {
    let Some((t, v1)) = r.signature.strip_prefix("t=").and_then(|s| s.split_once(",v1=")) else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
}

fn webhook_request(tailnet: &str, url: &str, events: &[&str]) -> pb::CreateWebhookRequest {
    pb::CreateWebhookRequest {
        tailnet_id: tailnet.into(),
        url: url.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        secret: SECRET.into(),
        retry_seconds: 0,
        reason: "alerts to the on-call channel".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_across_a_restart_gets_every_chosen_event_once_signed_and_in_order() {
    let receiver = Receiver::start(Mode::Down).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), Default::default()).await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "alerted").await;
    let hook = admin
        .create_webhook(webhook_request(&tailnet.id, &receiver.url, &["key_created", "node_joined"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hook.events, ["key_created", "node_joined"]);

    // Four chosen events (three keys, one join) and some that are not chosen (the policy change).
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    for _ in 0..2 {
        create_key(&mut admin, &tailnet.id, true, false).await;
    }
    admin
        .set_policy(pb::SetPolicyRequest {
            tailnet_id: tailnet.id.clone(),
            policy_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut nodes = server.nodes().await;
    register(&mut nodes, &secret, "worker").await;

    // The receiver is down: the first event is being retried when the server stops.
    eventually(Duration::from_secs(10), "a first attempt", || async { (!receiver.got().is_empty()).then_some(()) })
        .await;
    server.stop().await;
    let server = TestServer::start_in(dir.path(), Default::default()).await;
    receiver.set(Mode::Up);
    let delivered = eventually(Duration::from_secs(30), "four delivered events", || async {
        let ok: Vec<Received> = receiver.got().into_iter().filter(|r| r.answered == 200).collect();
        (ok.len() >= 4).then_some(ok)
    })
    .await;
    assert_eq!(delivered.len(), 4, "each chosen event once, none of the others");
    let mut revisions = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for r in &delivered {
        assert!(signed(r), "a valid signature");
        let event: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(event["id"], r.delivery_id.as_str(), "the delivery id is the event id");
        assert!(ids.insert(r.delivery_id.clone()), "delivered twice: {}", r.delivery_id);
        assert_eq!(event["tailnet_id"], tailnet.id.as_str());
        revisions.push(event["revision"].as_u64().unwrap());
    }
    let kinds: Vec<String> = delivered
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["key_created", "key_created", "key_created", "node_joined"]);
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "in revision order: {revisions:?}");
    let refused: Vec<_> = receiver.got().into_iter().filter(|r| r.answered != 200).collect();
    assert!(refused.iter().all(|r| r.delivery_id == delivered[0].delivery_id), "only the first waited");

    // The deliveries are listed, through the API and the CLI. The server records a delivery after the
    // receiver answered it, so the last one may land a moment after the receiver saw it.
    let mut admin = server.admin().await;
    let listed = eventually(Duration::from_secs(10), "four recorded deliveries", || {
        let (mut admin, id) = (admin.clone(), hook.id.clone());
        async move {
            let req = pb::ListWebhookDeliveriesRequest { webhook_id: id, limit: 0 };
            let listed = admin.list_webhook_deliveries(req).await.ok()?.into_inner().deliveries;
            (listed.len() >= 4).then_some(listed)
        }
    })
    .await;
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|d| d.delivered && d.status == 200), "{listed:?}");
    // (Attempts count from the restart: the ones before it were not recorded, only the cursor was.)
    let out = tokio::process::Command::new(cordon_bin())
        .args(["webhook", "deliveries", &hook.id, "--json", "--server", &server.url, "--token", &server.admin_token])
        .output()
        .await
        .unwrap();
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli.as_array().unwrap().len(), 4, "{}", String::from_utf8_lossy(&out.stderr));

    // The secret never comes back.
    let rendered = server.control_plane.render_metrics().await;
    let metrics: Vec<&str> = rendered.lines().filter(|l| l.starts_with("cordon_webhook_deliveries_total")).collect();
    assert!(metrics.iter().any(|l| l.contains("result=\"delivered\"") && l.ends_with(" 4")), "{metrics:?}");

    let hooks = admin.list_webhooks(pb::ListWebhooksRequest::default()).await.unwrap().into_inner();
    let events = admin.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner();
    for shown in [format!("{hooks:?}"), format!("{events:?}")] {
        assert!(!shown.contains(SECRET), "the webhook secret is write-only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_say_why_and_unsafe_targets_are_refused() {
    let redirecting = Receiver::start(Mode::Redirect).await;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "hooks").await;
    let mut req = webhook_request(&tailnet.id, &redirecting.url, &["key_created"]);
    req.retry_seconds = 1;
    let hook = admin.create_webhook(req).await.unwrap().into_inner();
    create_key(&mut admin, &tailnet.id, true, false).await;
    let failed = eventually(Duration::from_secs(20), "a failed delivery", || {
        let (mut admin, id) = (admin.clone(), hook.id.clone());
        async move {
            let req = pb::ListWebhookDeliveriesRequest { webhook_id: id, limit: 10 };
            admin.list_webhook_deliveries(req).await.ok()?.into_inner().deliveries.into_iter().next()
        }
    })
    .await;
    assert!(!failed.delivered);
    assert_eq!(failed.status, 302);
    assert!(failed.error.contains("redirects are not followed"), "{}", failed.error);
    assert!(redirecting.got().len() >= 2, "it was retried before it was given up on");

    // Other events keep flowing after a failed one: a slow receiver delays only itself.
    redirecting.set(Mode::Up);
    create_key(&mut admin, &tailnet.id, true, false).await;
    eventually(Duration::from_secs(20), "the next event delivered", || async {
        redirecting.got().iter().any(|r| r.answered == 200).then_some(())
    })
    .await;

    let bad = |url: &str, events: &[&str], secret: &str| {
        let mut req = webhook_request(&tailnet.id, url, events);
        req.secret = secret.into();
        req
    };
    let cases = [
        (bad("http://169.254.169.254/latest/meta-data", &[], SECRET), "url"),
        (bad("http://[fe80::1]/hook", &[], SECRET), "url"),
        (bad("ftp://hooks.example/x", &[], SECRET), "url"),
        (bad(&redirecting.url, &["node_exploded"], SECRET), "events[0]"),
        (bad(&redirecting.url, &[], "short"), "secret"),
    ];
    for (req, field) in cases {
        let refused = admin.create_webhook(req).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        assert!(refused.message().starts_with(field), "{field}: {}", refused.message());
    }
    // An auditor may read webhooks but not make them; a webhook for every tailnet needs an unscoped token.
    let auditor = admin
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "auditor".into(),
            role: pb::Role::Auditor.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut auditor = server.admin_as(&auditor).await;
    assert!(auditor.list_webhooks(pb::ListWebhooksRequest::default()).await.is_ok());
    let refused = auditor.create_webhook(webhook_request(&tailnet.id, &redirecting.url, &[])).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    admin.delete_webhook(pb::DeleteWebhookRequest { id: hook.id.clone() }).await.unwrap();
    let gone = admin.list_webhook_deliveries(pb::ListWebhookDeliveriesRequest { webhook_id: hook.id, limit: 0 }).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
}
