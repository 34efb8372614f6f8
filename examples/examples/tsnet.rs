//! A program that is a tailnet member itself, with no agentd beside it and no root (the way Tailscale's
//! tsnet is used): it joins with `agentd::Node`, serves HTTP on its tailnet address, tells each caller who
//! it is from the netmap alone, and calls the tailnet's AI gateway, which holds the only API key.
//!
//! ```sh
//! CORDON_SERVER=http://127.0.0.1:7443 CORDON_AUTH_KEY=cordon-auth-... \
//!   cargo run -p cordon-examples --example tsnet
//! ```
//! `CORDON_HOSTNAME` (default `tsnet`), `CORDON_MODEL` (default `gpt-4o-mini`) and `CORDON_STATE_DIR`
//! (default a temporary directory) are optional. It runs until Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let server = env("CORDON_SERVER").context("set CORDON_SERVER to the Cordon server's URL")?;
    let key = env("CORDON_AUTH_KEY").context("set CORDON_AUTH_KEY to an auth key of the tailnet")?;
    let hostname = env("CORDON_HOSTNAME").unwrap_or_else(|| "tsnet".into());
    let model = env("CORDON_MODEL").unwrap_or_else(|| "gpt-4o-mini".into());
    let temp = tempfile::tempdir()?;
    let state = env("CORDON_STATE_DIR").map_or_else(|| temp.path().to_path_buf(), Into::into);

    let mut config = agentd::NodeConfig::new(server, state);
    config.auth_key = Some(key);
    config.hostname = hostname.clone();
    let node = Arc::new(agentd::Node::start(config).await.context("join the tailnet")?);

    // HTTP on the tailnet: port 80 of this program's own tailnet address.
    let mut listener = node.listen(80).await?;
    println!("serving http://{}:80 as {hostname}", node.address());
    let web = node.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let node = web.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    // Who is calling, from the netmap: no round trip, no credential.
                    let caller = node.whois(peer.ip());
                    let text = match caller {
                        Some(p) => format!("hello {} (tags {:?}) from {}\n", p.hostname, p.tags, node.node_id()),
                        None => format!("hello stranger at {peer}\n"),
                    };
                    async move { Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });

    // One call to the gateway, with no API key: the gateway knows this node by its tunnel address.
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello from tsnet"}]});
    let (status, reply) = chat(&node, &body).await?;
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    println!("gateway: {status} {}", if text.is_empty() { reply.to_string() } else { text });

    tokio::signal::ctrl_c().await?;
    node.shutdown().await;
    Ok(())
}

/// POST /v1/chat/completions to the gateway over the tunnel (it may still be starting: retry briefly).
async fn chat(node: &agentd::Node, body: &Value) -> anyhow::Result<(u16, Value)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match node.dial_host("gateway", 80).await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => return Err(e).context("reach the gateway"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/v1/chat/completions")
        .header("host", "gateway")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}
