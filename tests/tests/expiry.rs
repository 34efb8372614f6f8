//! Tailnet TTLs, node expiry and idle ephemeral nodes under paused tokio time: the API handlers are
//! called in-process, so no real time passes and no socket wakes the clock.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cordon_server::api::control::ControlApi;
use cordon_server::api::node::NodeApi;
use cordon_server::model::{Actor, Principal, Role};
use cordon_server::store::StoreUrl;
use cordon_server::{ControlPlane, Limits};
use cordon_tests::v1 as pb;
use cordon_tests::v1::control_server::Control;
use cordon_tests::v1::node_server::Node;
use futures::StreamExt;
use tonic::Request;

struct InProcess {
    _dir: tempfile::TempDir,
    cp: Arc<ControlPlane>,
    control: ControlApi,
    node: NodeApi,
}

async fn start(limits: Limits) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::open(&StoreUrl::Sled(dir.path().join("store")), limits).await.unwrap();
    let tokens = std::sync::Arc::new(cordon_server::admin::AdminTokens::from_tokens([]));
    InProcess { control: ControlApi::new(cp.clone(), tokens), node: NodeApi::new(cp.clone()), cp, _dir: dir }
}

fn admin<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.extensions_mut().insert(Principal { actor: Actor("admin:test".into()), role: Role::Admin, scope: None });
    r
}

impl InProcess {
    async fn tailnet(&self, ttl_seconds: u64) -> pb::Tailnet {
        let req =
            pb::CreateTailnetRequest { name: "t".into(), owner: "acme".into(), ttl_seconds, ..Default::default() };
        self.control.create_tailnet(admin(req)).await.unwrap().into_inner()
    }

    async fn key(&self, tailnet: &str, ephemeral: bool) -> String {
        let req = pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.into(),
            reusable: true,
            ephemeral,
            expires_in_seconds: 30 * 86400,
            ..Default::default()
        };
        self.control.create_auth_key(admin(req)).await.unwrap().into_inner().secret
    }

    async fn register(&self, secret: &str) -> pb::RegisterResponse {
        let req = cordon_tests::register_request(secret, "n");
        self.node.register(Request::new(req)).await.unwrap().into_inner()
    }

    async fn node_ids(&self, tailnet: &str) -> Vec<String> {
        let req = pb::ListNodesRequest { tailnet_id: tailnet.into() };
        self.control.list_nodes(admin(req)).await.unwrap().into_inner().nodes.into_iter().map(|n| n.id).collect()
    }

    async fn exists(&self, tailnet: &str) -> bool {
        match self.control.get_tailnet(admin(pb::GetTailnetRequest { id: tailnet.into() })).await {
            Ok(_) => true,
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => panic!("{s:?}"),
        }
    }
}

fn seconds(ts: &Option<prost_types::Timestamp>) -> f64 {
    let ts = ts.as_ref().unwrap();
    ts.seconds as f64 + f64::from(ts.nanos) / 1e9
}

#[tokio::test(start_paused = true)]
async fn tailnet_expires_at_its_ttl_to_the_second() {
    let s = start(Limits::default()).await;
    let tailnet = s.tailnet(120).await;
    let secret = s.key(&tailnet.id, false).await;
    let member = s.register(&secret).await;
    let mut netmap = s
        .node
        .watch_net_map(Request::new(pb::WatchNetMapRequest {
            session_token: member.session_token,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(netmap.next().await.unwrap().unwrap().update, Some(pb::net_map::Update::Full(_))));
    let mut events = s.control.watch_events(admin(pb::WatchEventsRequest::default())).await.unwrap().into_inner();

    tokio::time::sleep(Duration::from_millis(119_500)).await;
    assert!(s.exists(&tailnet.id).await, "still there half a second before its TTL");

    let expired = loop {
        let e = events.next().await.unwrap().unwrap();
        if e.kind() == pb::EventKind::TailnetExpired {
            break e;
        }
    };
    assert_eq!(expired.actor, "system:reaper");
    let late = seconds(&expired.time) - seconds(&tailnet.created_at);
    assert!((120.0..121.0).contains(&late), "expired {late} s after creation, TTL 120 s");
    assert!(!s.exists(&tailnet.id).await);

    let end = netmap.next().await.unwrap().unwrap();
    let Some(pb::net_map::Update::Ended(end)) = end.update else { panic!("expected the end, got {end:?}") };
    assert_eq!(end.reason(), pb::stream_ended::Reason::TailnetExpired);
    assert!(netmap.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn idle_ephemeral_nodes_are_removed_after_the_timeout() {
    let s = start(Limits::default()).await;
    let tailnet = s.tailnet(0).await;
    let ephemeral = s.key(&tailnet.id, true).await;
    let durable = s.key(&tailnet.id, false).await;

    let never_connected = s.register(&ephemeral).await.node.unwrap().id;
    let streaming = s.register(&ephemeral).await;
    let streaming_id = streaming.node.as_ref().unwrap().id.clone();
    let kept = s.register(&durable).await.node.unwrap().id;
    let netmap = s
        .node
        .watch_net_map(Request::new(pb::WatchNetMapRequest {
            session_token: streaming.session_token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();

    tokio::time::sleep(Duration::from_secs(31)).await;
    let ids = s.node_ids(&tailnet.id).await;
    assert!(!ids.contains(&never_connected), "an ephemeral node that never connected goes after 30 s");
    assert!(ids.contains(&streaming_id), "a connected ephemeral node stays");

    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(s.node_ids(&tailnet.id).await.contains(&streaming_id), "it stays as long as it is connected");

    drop(netmap);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(s.node_ids(&tailnet.id).await.contains(&streaming_id), "29 s after disconnecting it is still there");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = s.node_ids(&tailnet.id).await;
    assert_eq!(ids, [kept], "31 s after disconnecting it is gone; the non-ephemeral node stays");

    let events = s
        .control
        .list_audit_events(admin(pb::ListAuditEventsRequest { node_id: streaming_id, ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let left = events.last().unwrap();
    assert_eq!(left.kind(), pb::EventKind::NodeLeft);
    assert!(left.summary.contains("ephemeral node inactive"), "{left:?}");
}

#[tokio::test(start_paused = true)]
async fn expired_nodes_are_cut_off() {
    let s = start(Limits { node_lifetime: Duration::from_secs(3600), ..Limits::default() }).await;
    let tailnet = s.tailnet(0).await;
    let secret = s.key(&tailnet.id, false).await;
    let r = s.register(&secret).await;
    let expires = seconds(&r.node.as_ref().unwrap().expires_at);
    let mut netmap = s
        .node
        .watch_net_map(Request::new(pb::WatchNetMapRequest {
            session_token: r.session_token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    netmap.next().await.unwrap().unwrap();

    let end = netmap.next().await.unwrap().unwrap();
    let Some(pb::net_map::Update::Ended(end)) = end.update else { panic!("expected the end, got {end:?}") };
    assert_eq!(end.reason(), pb::stream_ended::Reason::NodeExpired);
    let now = s.cp.now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((expires..expires + 1.0).contains(&now), "cut off at {now}, expiry {expires}");
    assert!(s.node_ids(&tailnet.id).await.is_empty());
}
