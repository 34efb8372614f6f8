//! Control-plane benchmark: `cargo bench -p cordon-tests --bench control`.
//!
//! Everything runs in one process against a real server on loopback with a real sled store, and each
//! figure is printed beside a baseline measured in the same run: a bare gRPC round trip (the health
//! check) and a raw sled write + flush.

use std::time::Instant;

use cordon_tests::bench::{Stats, ms, stats};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tokio::sync::mpsc;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("CORDON_BENCH_QUICK").is_some();
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    println!("Cordon control-plane benchmark ({} cores)", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!();

    // Baselines.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut rtt = Vec::new();
    for i in 0..2200 {
        let t = Instant::now();
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        if i >= 200 {
            rtt.push(t.elapsed());
        }
    }
    let rtt = stats(rtt);
    let sled_dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(sled_dir.path()).open().unwrap();
    let mut flushes = Vec::new();
    for i in 0u32..500 {
        let t = Instant::now();
        db.insert(i.to_be_bytes(), &[0u8; 256][..]).unwrap();
        db.flush_async().await.unwrap();
        flushes.push(t.elapsed());
    }
    let flush = stats(flushes);
    println!("baseline  gRPC health check round trip   p50 {}  p99 {}", ms(rtt.p50), ms(rtt.p99));
    println!("baseline  sled insert + flush            p50 {}  p99 {}", ms(flush.p50), ms(flush.p99));
    println!();

    // Tailnet create / delete latency, sequential.
    let n = if quick { 200 } else { 1000 };
    let (mut creates, mut deletes) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let tn = admin.create_tailnet(tailnet_request(&format!("b{i}"))).await.unwrap().into_inner();
        creates.push(t.elapsed());
        let t = Instant::now();
        admin.delete_tailnet(pb::DeleteTailnetRequest { id: tn.id, reason: String::new() }).await.unwrap();
        deletes.push(t.elapsed());
    }
    let sequential_pairs = n as f64 / started.elapsed().as_secs_f64();
    let (create, delete) = (stats(creates), stats(deletes));
    println!(
        "CreateTailnet   p50 {} ({:.1}x gRPC rtt, {:.1}x sled flush)  p99 {}",
        ms(create.p50),
        create.p50.as_secs_f64() / rtt.p50.as_secs_f64(),
        create.p50.as_secs_f64() / flush.p50.as_secs_f64(),
        ms(create.p99)
    );
    println!("DeleteTailnet   p50 {}  p99 {}", ms(delete.p50), ms(delete.p99));

    // Create + delete pairs per second with 16 concurrent callers (writes share flushes).
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut admin = server.admin().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 16 {
                let tn = admin.create_tailnet(tailnet_request(&format!("c{w}-{i}"))).await.unwrap().into_inner();
                admin.delete_tailnet(pb::DeleteTailnetRequest { id: tn.id, reason: String::new() }).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let concurrent_pairs = (n / 16 * 16) as f64 / started.elapsed().as_secs_f64();
    println!("create+delete   {sequential_pairs:.0}/s sequential, {concurrent_pairs:.0}/s with 16 callers");

    // Registrations per second.
    let tailnet = create_tailnet(&mut admin, "regs").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let regs = if quick { 400 } else { 2000 };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut nodes = server.nodes().await;
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..regs / 16 {
                register(&mut nodes, &secret, &format!("w{w}-{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!("Register        {:.0}/s with 16 callers", (regs / 16 * 16) as f64 / started.elapsed().as_secs_f64());
    println!();

    // Fan-out: time from one more Register until every watcher holds the change.
    println!("fan-out: Register -> every watcher of the tailnet has the new peer");
    let sizes: &[usize] = if quick { &[100, 250] } else { &[100, 250, 500, 1000] };
    let mut p99s = Vec::new();
    for &watchers in sizes {
        let s = fan_out(&server, &mut admin, watchers, if quick { 5 } else { 20 }).await;
        println!("  {watchers:>5} watchers   p50 {}  p99 {}", ms(s.p50), ms(s.p99));
        p99s.push((watchers, s.p99));
    }
    if let (Some(first), Some(last)) = (p99s.first(), p99s.last()) {
        let size_ratio = last.0 as f64 / first.0 as f64;
        let time_ratio = last.1.as_secs_f64() / first.1.as_secs_f64();
        println!(
            "  growth: {size_ratio:.0}x the watchers took {time_ratio:.1}x the p99 time (linear would be {size_ratio:.0}x, \
             quadratic {:.0}x)",
            size_ratio * size_ratio
        );
    }
    println!();

    // Memory per idle tailnet.
    let count = if quick { 500 } else { 5000 };
    let before = rss_bytes();
    for i in 0..count {
        admin.create_tailnet(tailnet_request(&format!("idle{i}"))).await.unwrap();
    }
    let after = rss_bytes();
    println!(
        "memory: {count} idle tailnets grew RSS by {:.1} MiB = {:.0} bytes per tailnet (store cache included)",
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / count as f64
    );
}

/// One tailnet with `n` nodes each holding a netmap stream; `rounds` more registrations, each timed
/// until the last watcher has it.
async fn fan_out(server: &TestServer, admin: &mut Admin, n: usize, rounds: usize) -> Stats {
    let tailnet = create_tailnet(admin, &format!("fan{n}")).await;
    let (_, secret) = create_key(admin, &tailnet.id, true, false).await;
    let channels = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(server.channel().await);
        }
        v
    };
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut ready = Vec::new();
    for i in 0..n {
        let mut nodes = pb::node_client::NodeClient::new(channels[i % channels.len()].clone());
        let r = register(&mut nodes, &secret, &format!("n{i}")).await;
        let mut stream = watch(&mut nodes, &r.session_token).await;
        next_netmap(&mut stream).await;
        let seen_tx = seen_tx.clone();
        ready.push(tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let at = Instant::now();
                if let Some(pb::net_map::Update::Delta(d)) = m.update {
                    for p in d.peers_added {
                        let _ = seen_tx.send((p.hostname, at));
                    }
                }
            }
        }));
    }
    // Joins made while the watchers were being set up may still be queued; they are told apart by name.

    let mut samples = Vec::new();
    let mut nodes = pb::node_client::NodeClient::new(channels[0].clone());
    for round in 0..rounds {
        let hostname = format!("late{round}");
        let start = Instant::now();
        register(&mut nodes, &secret, &hostname).await;
        let mut got = 0;
        while got < n {
            let (h, at) = seen_rx.recv().await.unwrap();
            if h == hostname {
                samples.push(at - start);
                got += 1;
            }
        }
    }
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id, reason: String::new() }).await.unwrap();
    for t in ready {
        let _ = t.await;
    }
    stats(samples)
}
