//! An orchestrator provisioning a per-run tailnet: create it with a TTL and a policy, hand out a
//! single-use ephemeral key for the run, and tear it down when the run ends.
//!
//! ```sh
//! cargo run --release -p cordon-server -- serve &            # in ./cordon-data
//! cargo run -p cordon-examples --example provision
//! ```
//! `CORDON_SERVER` (default http://127.0.0.1:7443) and `CORDON_TOKEN` (default: ./cordon-data/admin.token).

use anyhow::Context;
use cordon_proto::v1 as pb;
use cordon_proto::v1::control_client::ControlClient;
use tonic::metadata::MetadataValue;

const POLICY: &str = r#"{
  "tagOwners": { "tag:ci": [] },
  // The run's nodes may reach each other and the gateway; nothing else exists in this tailnet.
  "grants": [ { "src": ["tag:ci"], "dst": ["tag:ci", "gateway"], "ip": ["*"] } ],
}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("CORDON_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7443".into());
    let token = match std::env::var("CORDON_TOKEN") {
        Ok(t) => t,
        Err(_) => std::fs::read_to_string("cordon-data/admin.token")
            .context("read ./cordon-data/admin.token or set CORDON_TOKEN")?,
    };
    let bearer: MetadataValue<_> = format!("Bearer {}", token.trim()).parse()?;
    let channel = tonic::transport::Channel::from_shared(server.clone())?
        .connect()
        .await
        .with_context(|| format!("connect to {server}"))?;
    let mut admin = ControlClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });

    let run = format!("run-{}", std::process::id());
    let tailnet = admin
        .create_tailnet(pb::CreateTailnetRequest {
            name: run.clone(),
            owner: "ci@acme.example".into(),
            ttl_seconds: 3600,
            labels: [("pipeline".to_string(), "example".to_string())].into(),
            policy_json: POLICY.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("tailnet {} ({}), gateway at {}, expires in an hour", tailnet.name, tailnet.id, tailnet.gateway_address);

    let key = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.id.clone(),
            tags: vec!["tag:ci".into()],
            ephemeral: true,
            expires_in_seconds: 600,
            reason: format!("runner for {run}"),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "on the runner:\n  agentd up --server {server} --auth-key {} --forward 127.0.0.1:8080=gateway:80",
        key.secret
    );

    let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await?.into_inner().nodes;
    println!("{} nodes joined so far", nodes.len());

    let deleted = admin
        .delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id.clone(), reason: "run finished".into() })
        .await?
        .into_inner();
    println!(
        "torn down: {} nodes revoked, {} keys deleted; the audit log stays",
        deleted.nodes_revoked, deleted.keys_deleted
    );
    Ok(())
}
