//! Upstream providers of a tailnet's gateway: validated, listed without their keys, audited without
//! their keys; the key is write-only and kept for the gateway alone.

use cordon_tests::v1 as pb;
use cordon_tests::*;
use tonic::Code;

const KEY: &str = "sk-test-UPSTREAM-KEY-0123456789";

#[tokio::test]
async fn upstream_keys_are_write_only() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut req = tailnet_request("gw");
    req.upstreams = vec![pb::UpstreamConfig {
        name: "openai".into(),
        kind: "openai".into(),
        base_url: "https://api.openai.com/v1/".into(),
        api_key: KEY.into(),
    }];
    let tailnet = admin.create_tailnet(req).await.unwrap().into_inner();
    assert_eq!(tailnet.upstreams.len(), 1);
    assert_eq!(tailnet.upstreams[0].base_url, "https://api.openai.com/v1");
    assert!(tailnet.upstreams[0].api_key_set);

    let set = admin
        .set_upstream(pb::SetUpstreamRequest {
            tailnet_id: tailnet.id.clone(),
            name: "claude".into(),
            kind: "anthropic".into(),
            base_url: "https://api.anthropic.com".into(),
            api_key: format!("{KEY}-2"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.kind, "anthropic");

    let got = admin.get_tailnet(pb::GetTailnetRequest { id: tailnet.id.clone() }).await.unwrap().into_inner();
    let listed = admin.list_tailnets(pb::ListTailnetsRequest::default()).await.unwrap().into_inner();
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.upstreams.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["openai", "claude"]);
    assert!(events.events.iter().any(|e| e.kind() == pb::EventKind::UpstreamSet));
    for text in [format!("{got:?}"), format!("{listed:?}"), format!("{events:?}"), format!("{set:?}")] {
        assert!(!text.contains("UPSTREAM-KEY"), "an upstream key leaked: {text}");
    }
    // The gateway (in this process) can read it.
    let id = cordon_server::model::TailnetId::parse("id", &tailnet.id).unwrap();
    let stored = server.control_plane.upstream_api_key(id, "claude").await.unwrap().unwrap();
    assert_eq!(stored.expose(), format!("{KEY}-2"));
}

#[tokio::test]
async fn bad_upstreams_are_refused_without_echoing_the_key() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "gwbad").await;
    let base = || pb::SetUpstreamRequest {
        tailnet_id: tailnet.id.clone(),
        name: "openai".into(),
        kind: "openai".into(),
        base_url: "https://api.openai.com/v1".into(),
        api_key: KEY.into(),
    };
    let cases = [
        (pb::SetUpstreamRequest { name: "Open AI".into(), ..base() }, "name:"),
        (pb::SetUpstreamRequest { kind: "bard".into(), ..base() }, "kind:"),
        (pb::SetUpstreamRequest { base_url: "api.openai.com".into(), ..base() }, "base_url:"),
        (pb::SetUpstreamRequest { api_key: String::new(), ..base() }, "api_key: is required"),
        (pb::SetUpstreamRequest { api_key: format!("{KEY} with spaces"), ..base() }, "api_key:"),
    ];
    for (req, needle) in cases {
        let status = admin.set_upstream(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(needle), "{:?} should contain {needle:?}", status.message());
        assert!(!status.message().contains("UPSTREAM-KEY"), "the key is never echoed");
    }
    let mut dup = tailnet_request("gwdup");
    let up = pb::UpstreamConfig {
        name: "a".into(),
        kind: "openai".into(),
        base_url: "http://127.0.0.1:1".into(),
        api_key: KEY.into(),
    };
    dup.upstreams = vec![up.clone(), up];
    let status = admin.create_tailnet(dup).await.unwrap_err();
    assert!(status.message().contains("upstreams[1].name"), "{}", status.message());
}
