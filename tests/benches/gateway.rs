//! AI gateway benchmark: `cargo bench -p cordon-tests --bench gateway`.
//!
//! One process holds the server, a node that joined the tailnet (reached through a loopback forward, as
//! `agentd up --forward` gives agents), the fake provider and the client, all on this machine's cores.
//! Each figure through the gateway is printed beside the same request sent straight to the fake
//! provider in the same run, and, when `litellm[proxy]` is installed (`CORDON_LITELLM=path/to/litellm`,
//! or `litellm` on PATH), through LiteLLM's proxy to the same provider.
//!
//! Measured: memory per idle gateway; sequential latency (p50/p99); latency at a fixed 500 requests/s;
//! the most requests/s with 32 concurrent clients; streamed time to first byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_tests::bench::{Stats, ms, stats};
use cordon_tests::llm::{self, FakeLlm, HttpClient};
use cordon_tests::*;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

fn request(url: &str, body: &Value) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-cordon-test-UPSTREAM-KEY-7f3a9c")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// One request; its latency to the whole body, or to the first body frame with `first_byte`.
async fn timed(client: &HttpClient, url: &str, body: &Value, first_byte: bool) -> Option<Duration> {
    let t = Instant::now();
    let response = client.request(request(url, body)).await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let mut body = response.into_body();
    if first_byte {
        body.frame().await?.ok()?;
        let at = t.elapsed();
        while body.frame().await.is_some() {}
        return Some(at);
    }
    body.collect().await.ok()?;
    Some(t.elapsed())
}

async fn sequential(client: &HttpClient, url: &str, body: &Value, n: usize, first_byte: bool) -> Stats {
    for _ in 0..n / 10 {
        timed(client, url, body, first_byte).await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(timed(client, url, body, first_byte).await.expect("a 200 answer"));
    }
    stats(samples)
}

/// Requests started at a fixed rate whatever the answers do (open loop); latency of each.
async fn paced(client: &HttpClient, url: &str, body: &Value, rate: u32, duration: Duration) -> (Stats, usize) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move { timed(&client, &url, &body, false).await }));
    }
    let mut samples = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => samples.push(d),
            None => failed += 1,
        }
    }
    (stats(samples), failed)
}

/// The most requests per second `concurrency` clients get, each sending as soon as it has its answer.
async fn throughput(client: &HttpClient, url: &str, body: &Value, concurrency: usize, duration: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body, done) = (client.clone(), url.to_string(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                if timed(&client, &url, &body, false).await.is_some() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

struct Target {
    name: &'static str,
    base: String,
}

/// LiteLLM's proxy in front of the fake provider, if it is installed.
async fn litellm(llm: &FakeLlm, dir: &std::path::Path) -> Option<(tokio::process::Child, String)> {
    let bin = std::env::var("CORDON_LITELLM").unwrap_or_else(|_| "litellm".into());
    let version = std::process::Command::new(&bin).arg("--version").output().ok()?;
    if !version.status.success() {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      \
             api_base: {}\n      api_key: {}\nlitellm_settings:\n  telemetry: false\n",
            llm.openai_url(),
            llm::KEY
        ),
    )
    .ok()?;
    let child = tokio::process::Command::new(&bin)
        .args(["--config", config.to_str()?, "--port", &port.to_string(), "--num_workers", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = llm::http_client();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "warm"}]});
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if timed(&client, &format!("{base}/v1/chat/completions"), &body, false).await.is_some() {
            let v = String::from_utf8_lossy(&version.stdout).trim().to_string();
            println!("LiteLLM proxy up ({v}) on {base}");
            return Some((child, base));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// How long the server's UDP port takes to find the gateway a handshake initiation is for among
/// `gateways` (the worst case: the last one checked), as `Port` does it.
fn initiation_routing(gateways: usize) -> Duration {
    use agentd::wg::{Engine, PeerConfig, StaticSecret, initiation_is_for, mac1_key};
    let keys: Vec<[u8; 32]> =
        (0..gateways).map(|_| Engine::new(StaticSecret::from(rand::random::<[u8; 32]>())).public_key()).collect();
    let mac1_keys: Vec<[u8; 32]> = keys.iter().map(mac1_key).collect();
    let mut client = Engine::new(StaticSecret::from(rand::random::<[u8; 32]>()));
    let target = *keys.last().expect("gateways");
    client.set_peers(vec![PeerConfig {
        key: target,
        addresses: vec![std::net::Ipv4Addr::new(100, 64, 0, 1).into()],
        endpoints: vec!["127.0.0.1:9".parse().unwrap()],
        persistent_keepalive: None,
    }]);
    client.send(&ipv4_packet(), std::time::Instant::now());
    let initiation = client.poll_transmit().expect("an initiation").payload;
    let rounds = 200;
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let found = mac1_keys.iter().position(|k| initiation_is_for(std::hint::black_box(&initiation), k));
        assert_eq!(found, Some(gateways - 1));
    }
    started.elapsed() / rounds
}

/// A minimal IPv4 packet to the gateway address, to make the engine start a handshake.
fn ipv4_packet() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 2]);
    p[16..20].copy_from_slice(&[100, 64, 0, 1]);
    p
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("CORDON_BENCH_QUICK").is_some();
    let scale = if quick { 10 } else { 1 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("Cordon AI gateway benchmark ({cores} cores; server, node, fake provider and client in one process)");
    println!();

    // Memory per idle gateway: tailnets with a gateway each and nothing else.
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let idle = 1000 / scale;
    let before = rss_bytes();
    for i in 0..idle {
        admin.create_tailnet(tailnet_request(&format!("idle{i}"))).await.unwrap();
    }
    let cp = server.control_plane.clone();
    eventually(Duration::from_secs(60), "every gateway running", || async {
        (cp.gateways_running() >= idle).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_gateway = (rss_bytes().saturating_sub(before)) / idle as u64;
    println!(
        "idle gateways: {idle} tailnets, each with a running gateway: {:.1} KiB RSS per tailnet (gateway, its node, its records; goal < 256 KiB)",
        per_gateway as f64 / 1024.0
    );
    let routing = initiation_routing(idle);
    println!(
        "the server's UDP port routes a handshake initiation among {idle} gateways in {:.1} µs (one MAC1 per gateway); other datagrams by index",
        routing.as_secs_f64() * 1e6
    );
    println!();

    let llm = FakeLlm::start().await;
    let joined = llm::join_with_gateway(&server, &llm, "bench", "", &[]).await;
    // The same through a server without a UDP port: the gateway is reached through the relay.
    let relay_server = TestServer::start_configured(|c| c.stun_listen = None).await;
    let relayed = llm::join_with_gateway(&relay_server, &llm, "bench", "", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut targets = vec![
        Target { name: "direct to the provider", base: format!("http://{}", llm.addr) },
        Target { name: "through the Cordon gateway", base: joined.base.clone() },
        Target { name: "  the same, relayed", base: relayed.base.clone() },
    ];
    let lite = litellm(&llm, dir.path()).await;
    match &lite {
        Some((_, base)) => targets.push(Target { name: "through LiteLLM's proxy", base: base.clone() }),
        None => println!("LiteLLM: not installed (pip install 'litellm[proxy]==1.77.7'); its rows are skipped"),
    }
    let client = llm::http_client();
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let n = 2000 / scale;
    let secs = Duration::from_secs(if quick { 1 } else { 5 });

    println!();
    println!(
        "{:<30} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11} {:>11}",
        "", "seq p50", "seq p99", "500/s p50", "500/s p99", "req/s (32 c)", "TTFB p50", "TTFB p99"
    );
    let mut rows = Vec::new();
    for t in &targets {
        let url = format!("{}/v1/chat/completions", t.base);
        let seq = sequential(&client, &url, &chat, n, false).await;
        let (at_rate, failed) = paced(&client, &url, &chat, 500, secs).await;
        let rps = throughput(&client, &url, &chat, 32, secs).await;
        let ttfb = sequential(&client, &url, &streamed, n / 2, true).await;
        println!(
            "{:<30} {:>11} {:>11} {:>11} {:>11} {:>13.0} {:>11} {:>11}{}",
            t.name,
            ms(seq.p50),
            ms(seq.p99),
            ms(at_rate.p50),
            ms(at_rate.p99),
            rps,
            ms(ttfb.p50),
            ms(ttfb.p99),
            if failed > 0 { format!("  ({failed} failed at 500/s)") } else { String::new() }
        );
        rows.push((seq, at_rate, rps, ttfb));
    }
    println!();
    for (name, node) in [("gateway", &joined.node), ("relayed gateway", &relayed.node)] {
        let t = node.status().await.traffic;
        println!(
            "{name}: the node's datagrams went {} direct / {} relayed out, {} / {} in",
            t.direct_tx.packets, t.relay_tx.packets, t.direct_rx.packets, t.relay_rx.packets
        );
    }
    let (direct, gateway) = (&rows[0], &rows[1]);
    println!(
        "Cordon adds: sequential p50 +{} p99 +{}; at 500 req/s p50 +{} p99 +{} (goal < 1 ms); streamed TTFB p50 +{}",
        ms(gateway.0.p50.saturating_sub(direct.0.p50)),
        ms(gateway.0.p99.saturating_sub(direct.0.p99)),
        ms(gateway.1.p50.saturating_sub(direct.1.p50)),
        ms(gateway.1.p99.saturating_sub(direct.1.p99)),
        ms(gateway.3.p50.saturating_sub(direct.3.p50)),
    );
    println!(
        "throughput: {:.0} req/s through Cordon = {:.2}x direct (goal >= 5,000 req/s on 2 cores)",
        gateway.2,
        gateway.2 / direct.2
    );
    println!(
        "relayed: {:.0} req/s = {:.2}x the direct path; sequential p50 +{} over it",
        rows[2].2,
        rows[2].2 / gateway.2,
        ms(rows[2].0.p50.saturating_sub(gateway.0.p50))
    );
    if let Some(lite) = rows.get(3) {
        println!(
            "LiteLLM adds: sequential p50 +{} p99 +{}; at 500 req/s p99 +{}; {:.0} req/s = {:.2}x direct; Cordon/LiteLLM throughput {:.1}x",
            ms(lite.0.p50.saturating_sub(direct.0.p50)),
            ms(lite.0.p99.saturating_sub(direct.0.p99)),
            ms(lite.1.p99.saturating_sub(direct.1.p99)),
            lite.2,
            lite.2 / direct.2,
            gateway.2 / lite.2
        );
    }
    drop(lite);
}
