//! Replicas benchmark: `cargo bench -p cordon-tests --bench replicas` (`-- --quick` for a short run).
//!
//! On a private PostgreSQL (fsync on, or `CORDON_TEST_POSTGRES`), in one run: the fan-out of a
//! registration made through one replica to watchers spread over three replicas, against the same
//! watchers on a single replica (the baseline); registrations per second through three replicas against
//! one; and the time from `kill -9` of the replica that holds every node's stream and every gateway
//! until each node has reconnected elsewhere and each gateway answers again.

use std::time::{Duration, Instant};

use cordon_tests::bench::{Stats, ms};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("CORDON_BENCH_QUICK").is_some();
    println!("Cordon replicas benchmark ({} cores)", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (watchers, rounds, registrations) = if quick { (300, 5, 200) } else { (1000, 10, 600) };

    let Some(single) = replicas(1, "replicas_bench_one").await else { return };
    let Some(three) = replicas(3, "replicas_bench_three").await else { return };
    println!("measuring fan-out to {watchers} watchers ...");
    let one_fan = fan_out(&single, watchers, rounds).await;
    let three_fan = fan_out(&three, watchers, rounds).await;
    println!("measuring registrations ...");
    let one_reg = register_rate(&single, registrations).await;
    let three_reg = register_rate(&three, registrations).await;
    println!("measuring the relay ...");
    let relay_mib = if quick { 32 } else { 128 };
    let relay_one = relay_throughput(&single[0], &single[0], relay_mib).await;
    let relay_mesh = relay_throughput(&three[0], &three[1], relay_mib).await;
    drop((single, three));
    println!("measuring failover after kill -9 ...");
    let (nodes_back, gateways_back, node_count, gateway_count) = failover(if quick { 6 } else { 12 }).await;

    println!();
    let pair = |s: &Stats| format!("p50 {}  p99 {}", ms(s.p50), ms(s.p99));
    println!("{:<44} {:<30} {:<30} ratio", "", "one replica (baseline)", "three replicas");
    println!(
        "{:<44} {:<30} {:<30} p99 {:.2}x",
        format!("fan-out to {watchers} watchers"),
        pair(&one_fan),
        pair(&three_fan),
        three_fan.p99.as_secs_f64() / one_fan.p99.as_secs_f64().max(1e-9)
    );
    println!(
        "{:<44} {:<30} {:<30} {:.2}x",
        "Register, 16 callers",
        format!("{one_reg:.0}/s"),
        format!("{three_reg:.0}/s"),
        three_reg / one_reg.max(1e-9)
    );
    println!(
        "{:<44} {:<30} {:<30} {:.2}x",
        format!("relay, {relay_mib} MiB one way (no direct path)"),
        format!("{relay_one:.2} Gbit/s"),
        format!("{relay_mesh:.2} Gbit/s (across the mesh)"),
        relay_mesh / relay_one.max(1e-9)
    );
    println!(
        "{:<44} every one of {node_count} nodes reconnected after {}, every one of {gateway_count} gateways serving after {}",
        "kill -9 of the replica holding them all",
        ms(nodes_back),
        ms(gateways_back)
    );
    let goal = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!();
    println!("goals: cross-replica fan-out p99 < 100 ms: {}", goal(three_fan.p99 < Duration::from_millis(100)));
    println!("       nodes back within 2 s: {}", goal(nodes_back < Duration::from_secs(2)));
    println!("       gateways back within 5 s: {}", goal(gateways_back < Duration::from_secs(5)));
}

/// Gbit/s of one TCP stream from a node on `from` to a node on `to`, through the relay only.
async fn relay_throughput(from: &TestServer, to: &TestServer, mib: usize) -> f64 {
    let mut admin = from.admin().await;
    let tailnet = create_tailnet(&mut admin, "relay").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |server: &TestServer, dir: &std::path::Path, hostname: &str| {
        let mut config = agentd::NodeConfig::new(&server.url, dir);
        config.auth_key = Some(secret.clone());
        config.hostname = hostname.into();
        config.advertise = vec!["127.0.0.1:9".parse().unwrap()];
        agentd::Node::start(config)
    };
    let a = start(from, dirs.0.path(), "alpha").await.unwrap();
    let b = start(to, dirs.1.path(), "beta").await.unwrap();
    for node in [&a, &b] {
        let mut netmap = node.netmap();
        tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 1)).await.unwrap().unwrap();
    }
    let mut listener = b.listen(9000).await.unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        (total, Instant::now())
    });
    let chunk = vec![7u8; 1 << 20];
    // Warm up the path (the handshake through the relay) before timing.
    let mut s = a.dial_host("beta", 9000).await.unwrap();
    s.write_all(&chunk[..1024]).await.unwrap();
    let started = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let (total, done) = receiver.await.unwrap();
    assert_eq!(total, mib * (1 << 20) + 1024);
    let mut dropped = 0;
    for server in [from, to] {
        let stats = server.admin().await.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap().into_inner();
        dropped += stats.dropped_overflow + stats.dropped_rate + stats.dropped_unknown_peer;
    }
    println!("  (the relay dropped {dropped} frames on the way: full queues, rate or unknown receivers)");
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id, reason: String::new() }).await.unwrap();
    (mib * (1 << 20)) as f64 * 8.0 / (done - started).as_secs_f64() / 1e9
}

/// `n` watchers spread over `servers`; `rounds` registrations through the first, each timed until the
/// last watcher has it.
async fn fan_out(servers: &[TestServer], n: usize, rounds: usize) -> Stats {
    let mut admin = servers[0].admin().await;
    let mut channels = Vec::new();
    for s in servers {
        for _ in 0..4 {
            channels.push(s.channel().await);
        }
    }
    cordon_tests::bench::fan_out(&mut admin, &channels, n, rounds).await
}

/// Registrations per second by 16 callers, each through the replicas in turn, into one tailnet.
async fn register_rate(servers: &[TestServer], total: usize) -> f64 {
    let mut admin = servers[0].admin().await;
    let tailnet = create_tailnet(&mut admin, "reg").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let mut clients = Vec::new();
    for s in servers {
        clients.push(s.nodes().await);
    }
    let start = Instant::now();
    let callers = (0..16).map(|c| {
        let clients = clients.clone();
        let secret = secret.clone();
        tokio::spawn(async move {
            for i in (c..total).step_by(16) {
                let mut nodes = clients[i % clients.len()].clone();
                nodes.register(register_request(&secret, &format!("r{i}"))).await.expect("register");
            }
        })
    });
    futures::future::join_all(callers).await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id, reason: String::new() }).await.unwrap();
    rate
}

/// Three `cordon serve` processes; `nodes` in-process agentd nodes in three tailnets whose gateways run
/// on the first replica, all connected to it. Kills it and returns how long until every node reconnected
/// and every gateway answered again.
async fn failover(nodes: usize) -> (Duration, Duration, usize, usize) {
    let db = pg::database("replicas_bench_failover").await.expect("PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let data = |i: usize| dir.path().join(format!("r{i}"));
    let mut r1 = ServerProcess::spawn_with(&data(1), &dir.path().join("r1.log"), &[format!("--store={db}")]).await;
    let token = std::fs::read_to_string(data(1).join("admin.token")).unwrap().trim().to_string();
    for i in [2, 3] {
        std::fs::create_dir(data(i)).unwrap();
        std::fs::write(data(i).join("admin.token"), &token).unwrap();
    }
    let r2 = ServerProcess::spawn_with(&data(2), &dir.path().join("r2.log"), &[format!("--store={db}")]).await;
    let r3 = ServerProcess::spawn_with(&data(3), &dir.path().join("r3.log"), &[format!("--store={db}")]).await;
    let servers = format!("{},{},{}", r1.url, r2.url, r3.url);
    let channel = tonic::transport::Endpoint::from_shared(r1.url.clone()).unwrap().connect().await.unwrap();
    let mut admin = pb::control_client::ControlClient::with_interceptor(channel, Bearer::new(&token));
    let llm = llm::FakeLlm::start().await;
    let mut joined = Vec::new();
    let dirs: Vec<_> = (0..nodes).map(|_| tempfile::tempdir().unwrap()).collect();
    let tailnets = 3;
    for t in 0..tailnets {
        let mut create = tailnet_request(&format!("failover{t}"));
        create.upstreams = llm::upstreams(&llm);
        create.policy_json = r#"{"tagOwners": {"tag:ci": []}, "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"],
            "app": {"cordon.dev/cap/ai": [{"models": ["openai/gpt-*"]}]}}]}"#
            .into();
        let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
        let secret = tagged_key(&mut admin, &tailnet.id, &["tag:ci"]).await;
        for (i, dir) in dirs.iter().enumerate().filter(|(i, _)| i % tailnets == t) {
            let mut config = agentd::NodeConfig::new(&servers, dir.path());
            config.auth_key = Some(secret.clone());
            config.hostname = format!("n{i}");
            joined.push((t, agentd::Node::start(config).await.expect("node joins")));
        }
    }
    // One node per tailnet asks its gateway.
    let askers: Vec<&agentd::Node> =
        (0..tailnets).filter_map(|t| joined.iter().find(|(x, _)| *x == t)).map(|(_, n)| n).collect();
    for node in &askers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gateway_answers(node).await {
            assert!(Instant::now() < deadline, "a gateway answers before the kill");
        }
    }
    let before: Vec<u64> = futures::future::join_all(joined.iter().map(|(_, n)| n.status()))
        .await
        .iter()
        .map(|s| s.reconnects.0)
        .collect();

    r1.child.start_kill().unwrap();
    let killed = Instant::now();
    let mut nodes_back = None;
    let mut gateways = vec![None; askers.len()];
    let gateway_checks = async {
        let mut pending: Vec<usize> = (0..askers.len()).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                if gateway_answers(askers[i]).await {
                    gateways[i] = Some(killed.elapsed());
                } else {
                    still.push(i);
                }
            }
            pending = still;
            assert!(killed.elapsed() < Duration::from_secs(60), "gateways back within 60 s");
        }
    };
    let node_checks = async {
        loop {
            let now: Vec<u64> = futures::future::join_all(joined.iter().map(|(_, n)| n.status()))
                .await
                .iter()
                .map(|s| s.reconnects.0)
                .collect();
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                nodes_back = Some(killed.elapsed());
                return;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "nodes back within 60 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(gateway_checks, node_checks);
    let gateways_back = gateways.into_iter().map(Option::unwrap).max().unwrap();
    drop((r2, r3));
    (nodes_back.unwrap(), gateways_back, joined.len(), askers.len())
}

/// Whether `gateway:80` answers `GET /v1/models` through `node` within a second.
async fn gateway_answers(node: &agentd::Node) -> bool {
    let attempt = async {
        let mut s = node.dial_host("gateway", 80).await.ok()?;
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(Duration::from_secs(1), attempt).await {
        Ok(Some(ok)) => ok,
        _ => false,
    }
}
