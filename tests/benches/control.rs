//! Control-plane benchmark: `cargo bench -p cordon-tests --bench control` (`-- --quick` for a short run).
//!
//! The same measurements run twice in one process, against a real server on loopback over the sled
//! engine and over PostgreSQL (a private cluster with fsync on, or `CORDON_TEST_POSTGRES`), and are
//! printed side by side, each engine beside its own baseline measured in the same run: a bare gRPC
//! round trip (the health check), a raw sled insert + flush, a raw PostgreSQL one-row commit. The sled
//! figures are then compared with `tests/benches/control.baseline`.

use std::time::Instant;

use cordon_server::store::StoreUrl;
use cordon_tests::bench::{Better, Figures, Stats, ms, stats};
use cordon_tests::v1 as pb;
use cordon_tests::*;

/// What one engine measured.
struct Run {
    engine: &'static str,
    rtt: Stats,
    commit: Stats,
    create: Stats,
    delete: Stats,
    pairs_sequential: f64,
    pairs_concurrent: f64,
    registrations: f64,
    registrations_spread: f64,
    fan_out: Vec<(usize, Stats)>,
    memory_per_tailnet: Option<f64>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("CORDON_BENCH_QUICK").is_some();
    println!("Cordon control-plane benchmark ({} cores)", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!();

    let sled_dir = tempfile::tempdir().unwrap();
    let server = TestServer::launch(sled_dir.path(), "127.0.0.1:0", |c| c.store = None).await;
    let sled = measure("sled", &server, sled_commit().await, quick).await;
    server.stop().await;

    let postgres = match pg::database("control_bench").await {
        Some(url) => {
            let dir = tempfile::tempdir().unwrap();
            let store = StoreUrl::Postgres(url.clone());
            let server = TestServer::launch(dir.path(), "127.0.0.1:0", |c| c.store = Some(store)).await;
            let run = measure("postgres", &server, postgres_commit(&url).await, quick).await;
            server.stop().await;
            Some(run)
        }
        None => None,
    };

    let runs: Vec<&Run> = std::iter::once(&sled).chain(postgres.as_ref()).collect();
    print_table(&runs);

    let mut figures = Figures::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/control.baseline"));
    for run in &runs {
        let e = run.engine;
        figures.record(&format!("{e}_create_tailnet_p50_ms"), run.create.p50.as_secs_f64() * 1e3, Better::Lower);
        figures.record(&format!("{e}_register_per_s"), run.registrations, Better::Higher);
        if let Some((_, s)) = run.fan_out.last() {
            figures.record(&format!("{e}_fan_out_largest_p99_ms"), s.p99.as_secs_f64() * 1e3, Better::Lower);
        }
    }
    figures.report();
}

fn print_table(runs: &[&Run]) {
    let header: Vec<String> = runs.iter().map(|r| format!("{:<34}", r.engine)).collect();
    println!("{:<30} {}", "", header.join(" "));
    let row = |name: &str, cell: &dyn Fn(&Run) -> String| {
        let cells: Vec<String> = runs.iter().map(|r| format!("{:<34}", cell(r))).collect();
        println!("{name:<30} {}", cells.join(" "));
    };
    let pair = |s: &Stats| format!("p50 {}  p99 {}", ms(s.p50), ms(s.p99));
    row("baseline: gRPC round trip", &|r| pair(&r.rtt));
    row("baseline: raw durable commit", &|r| pair(&r.commit));
    row("CreateTailnet", &|r| pair(&r.create));
    row("  vs raw commit (p50)", &|r| {
        format!("{:.1}x", r.create.p50.as_secs_f64() / r.commit.p50.as_secs_f64().max(1e-9))
    });
    row("DeleteTailnet", &|r| pair(&r.delete));
    row("create+delete, sequential", &|r| format!("{:.0}/s", r.pairs_sequential));
    row("create+delete, 16 callers", &|r| format!("{:.0}/s", r.pairs_concurrent));
    row("Register, 16 callers, 1 tailnet", &|r| format!("{:.0}/s", r.registrations));
    row("Register, 16 callers, 16 tailnets", &|r| format!("{:.0}/s", r.registrations_spread));
    for i in 0..runs[0].fan_out.len() {
        let n = runs[0].fan_out[i].0;
        row(&format!("fan-out to {n} watchers"), &|r| r.fan_out.get(i).map(|(_, s)| pair(s)).unwrap_or_default());
    }
    row("RSS per idle tailnet", &|r| r.memory_per_tailnet.map(|b| format!("{b:.0} bytes")).unwrap_or("-".into()));
    println!();
}

/// A raw sled insert + flush, the floor of any durable sled write.
async fn sled_commit() -> Stats {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let mut samples = Vec::new();
    for i in 0u32..500 {
        let t = Instant::now();
        db.insert(i.to_be_bytes(), &[0u8; 256][..]).unwrap();
        db.flush_async().await.unwrap();
        samples.push(t.elapsed());
    }
    stats(samples)
}

/// A raw one-row INSERT committed on its own, the floor of any durable PostgreSQL write.
async fn postgres_commit(url: &str) -> Stats {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("CREATE TABLE bench_floor (id integer PRIMARY KEY, v bytea)").await.unwrap();
    let insert = client.prepare("INSERT INTO bench_floor (id, v) VALUES ($1, $2)").await.unwrap();
    let mut samples = Vec::new();
    for i in 0i32..500 {
        let t = Instant::now();
        client.execute(&insert, &[&i, &vec![0u8; 256]]).await.unwrap();
        samples.push(t.elapsed());
    }
    client.batch_execute("DROP TABLE bench_floor").await.unwrap();
    stats(samples)
}

async fn measure(engine: &'static str, server: &TestServer, commit: Stats, quick: bool) -> Run {
    println!("measuring {engine} ...");
    let mut admin = server.admin().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut rtt = Vec::new();
    for i in 0..2200 {
        let t = Instant::now();
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        if i >= 200 {
            rtt.push(t.elapsed());
        }
    }

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
    let pairs_sequential = n as f64 / started.elapsed().as_secs_f64();

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
    let pairs_concurrent = (n / 16 * 16) as f64 / started.elapsed().as_secs_f64();

    // Registrations per second, 16 callers into one tailnet.
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
    let registrations = (regs / 16 * 16) as f64 / started.elapsed().as_secs_f64();

    // The same, each caller with its own tailnet and key: what one tailnet's serialisation costs.
    let mut secrets = Vec::new();
    for w in 0..16 {
        let tailnet = create_tailnet(&mut admin, &format!("regs{w}")).await;
        secrets.push(create_key(&mut admin, &tailnet.id, true, false).await.1);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, secret) in secrets.into_iter().enumerate() {
        let mut nodes = server.nodes().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..regs / 16 {
                register(&mut nodes, &secret, &format!("v{w}-{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let registrations_spread = (regs / 16 * 16) as f64 / started.elapsed().as_secs_f64();

    // Fan-out: time from one more Register until every watcher holds the change.
    let sizes: &[usize] = if quick { &[100, 250] } else { &[100, 250, 500, 1000] };
    let mut fan_out = Vec::new();
    for &watchers in sizes {
        fan_out.push((watchers, fan_out_to(server, &mut admin, watchers, if quick { 5 } else { 20 }).await));
    }

    // Memory per idle tailnet (sled: the page cache is in this process; PostgreSQL's is not).
    let memory_per_tailnet = if engine == "sled" {
        let count = if quick { 500 } else { 5000 };
        let before = rss_bytes();
        for i in 0..count {
            admin.create_tailnet(tailnet_request(&format!("idle{i}"))).await.unwrap();
        }
        Some(rss_bytes().saturating_sub(before) as f64 / count as f64)
    } else {
        None
    };
    Run {
        engine,
        rtt: stats(rtt),
        commit,
        create: stats(creates),
        delete: stats(deletes),
        pairs_sequential,
        pairs_concurrent,
        registrations,
        registrations_spread,
        fan_out,
        memory_per_tailnet,
    }
}

/// One tailnet with `n` nodes each holding a netmap stream over one of 8 connections; `rounds` more
/// registrations, each timed until the last watcher has it.
async fn fan_out_to(server: &TestServer, admin: &mut Admin, n: usize, rounds: usize) -> Stats {
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(server.channel().await);
    }
    cordon_tests::bench::fan_out(admin, &channels, n, rounds).await
}
