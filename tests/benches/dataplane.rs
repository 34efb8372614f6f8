//! Data-plane benchmark: `cargo bench -p cordon-tests --bench dataplane` (as root for the namespace
//! parts; they are skipped with a message otherwise).
//!
//! In one run:
//! - iperf3 TCP throughput over the bare veth pair between two namespaces, over two `agentd` in TUN
//!   mode on that pair, and over two `wireguard-go` peers on the same pair;
//! - the same over the tunnel's IPv6 addresses (TUN mode), against IPv4;
//! - userspace mode: bytes through an in-process forward (local TCP → node → WireGuard → node) against
//!   the same transfer over bare loopback TCP;
//! - the `agentd` binary in userspace mode both ways: a peer dialing its `--serve` port (inbound) against
//!   its `--forward` to that peer (outbound);
//! - time from starting `agentd up` to the first byte received from a peer through its forward;
//! - idle RSS of the `agentd` process and of one in-process `Node`.

use std::time::{Duration, Instant};

use agentd::{Node, NodeConfig};
use cordon_tests::bench::{Better, Figures};
use cordon_tests::netns::{self, Netns};
use cordon_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const IPERF_SECONDS: &str = "5";

fn gbit(bits_per_second: f64) -> String {
    format!("{:.2} Gbit/s", bits_per_second / 1e9)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench --bench dataplane -- relay userspace` runs only those sections.
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |section: &str| wanted.is_empty() || wanted.iter().any(|w| w == section);
    let mut figures =
        Figures::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/dataplane.baseline"));
    println!("Cordon data-plane benchmark ({} cores)\n", std::thread::available_parallelism().map_or(1, |n| n.get()));
    if run("tun") {
        match netns::skip_reason(&["ip", "iperf3", "wireguard-go", "wg"]) {
            Some(reason) => println!("SKIPPED iperf3 over veth / agentd TUN / wireguard-go: {reason}\n"),
            None => namespaces(&mut figures).await,
        }
    }
    if run("userspace") {
        userspace(&mut figures).await;
    }
    if run("serve") {
        serve(&mut figures).await;
    }
    if run("relay") {
        relay(&mut figures).await;
    }
    if run("first-byte") {
        first_byte().await;
    }
    if run("memory") {
        idle_memory().await;
    }
    figures.report();
}

/// Runs iperf3 from A to `target` (a server started in B on that address) and returns bits/s.
async fn iperf(a: &Netns, b: &Netns, target: &str) -> f64 {
    let mut server = b
        .tokio_command("iperf3")
        .args(["-s", "-B", target])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bits = eventually(Duration::from_secs(60), "iperf3 to run", || async {
        let client = a.tokio_command("iperf3").args(["-c", target, "-t", IPERF_SECONDS, "-J"]).output();
        let out = tokio::time::timeout(Duration::from_secs(30), client).await.ok()?.ok()?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        json["end"]["sum_received"]["bits_per_second"].as_f64()
    })
    .await;
    let _ = server.kill().await;
    bits
}

/// The TUN part runs the `agentd` binary beside this benchmark, which `cargo bench` does not build:
/// build it here so that a stale binary is never what gets measured.
fn build_agentd() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--locked", "-p", "agentd", "--bin", "agentd"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the release agentd failed");
}

async fn namespaces(figures: &mut Figures) {
    build_agentd();
    let server = TestServer::start_public().await;
    let port = server.addr.port();
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "bench").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let a = Netns::new("ba");
    let b = Netns::new("bb");
    netns::veth(&a, "10.212.1.2", None, "10.212.1.1");
    netns::veth(&b, "10.212.2.2", None, "10.212.2.1");
    netns::veth(&a, "10.212.0.1", Some(&b), "10.212.0.2");

    let bare = iperf(&a, &b, "10.212.0.2").await;
    println!("iperf3 TCP, bare veth pair            {}", gbit(bare));

    // Two agentd in TUN mode.
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut agents = Vec::new();
    for (ns, state, name, server_ip, link) in
        [(&a, &state_a, "alpha", "10.212.1.1", "10.212.0.1"), (&b, &state_b, "beta", "10.212.2.1", "10.212.0.2")]
    {
        agents.push(
            ns.tokio_command(agentd_bin().to_str().unwrap())
                .args(["up", "--server", &format!("http://{server_ip}:{port}"), "--tun", &netns::unique("cd")])
                .args(["--hostname", name, "--listen-port", "51820", "--advertise", &format!("{link}:51820")])
                .arg("--state-dir")
                .arg(state.path())
                .env("AGENTD_AUTH_KEY", &secret)
                .env("AGENTD_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let beta = eventually(Duration::from_secs(20), "both agentd to join", || {
        let mut admin = admin.clone();
        let tailnet = tailnet.id.clone();
        async move {
            let nodes =
                admin.list_nodes(cordon_tests::v1::ListNodesRequest { tailnet_id: tailnet }).await.ok()?.into_inner();
            (nodes.nodes.iter().filter(|n| n.online).count() == 2)
                .then(|| nodes.nodes.into_iter().find(|n| n.hostname == "beta").unwrap())
        }
    })
    .await;
    let agentd_tun = iperf(&a, &b, &beta.addresses[0]).await;
    let agentd_tun6 = iperf(&a, &b, &beta.addresses[1]).await;
    let agentd_rss = agents.iter().filter_map(|c| c.id()).filter_map(rss_of).max().unwrap_or(0);
    drop(agents);

    // Two wireguard-go peers on the same pair.
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = String::from_utf8(netns::run(&["wg", "genkey"]).stdout).unwrap().trim().to_string();
            let public = x25519_public(&private);
            (private, public)
        })
        .collect();
    let mut wg = Vec::new();
    let mut sockets = Vec::new();
    for (i, (ns, peer_link, addr)) in
        [(&a, "10.212.0.2", "10.98.0.1"), (&b, "10.212.0.1", "10.98.0.2")].into_iter().enumerate()
    {
        let iface = netns::unique("wg");
        sockets.push(netns::WireguardSocket::new(&iface));
        wg.push(
            ns.tokio_command("wireguard-go")
                .args(["-f", &iface])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        eventually(Duration::from_secs(10), "wireguard-go interface", || async {
            ns.tokio_command("ip").args(["link", "show", &iface]).output().await.ok()?.status.success().then_some(())
        })
        .await;
        let key_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(key_file.path(), &keys[i].0).unwrap();
        let peer = &keys[1 - i].1;
        ns.run(&["wg", "set", &iface, "private-key", key_file.path().to_str().unwrap(), "listen-port", "51830"]);
        ns.run(&[
            "wg",
            "set",
            &iface,
            "peer",
            peer,
            "allowed-ips",
            "10.98.0.0/24",
            "endpoint",
            &format!("{peer_link}:51830"),
        ]);
        ns.run(&["ip", "addr", "add", &format!("{addr}/24"), "dev", &iface]);
        ns.run(&["ip", "link", "set", &iface, "mtu", "1420", "up"]);
    }
    let wireguard_go = iperf(&a, &b, "10.98.0.2").await;
    drop(wg);
    drop(sockets);

    println!(
        "iperf3 TCP, two agentd (TUN)          {}  = {:.2}x wireguard-go, {:.3}x bare veth",
        gbit(agentd_tun),
        agentd_tun / wireguard_go,
        agentd_tun / bare
    );
    println!("iperf3 TCP, two agentd (TUN) over IPv6 {}  = {:.2}x IPv4", gbit(agentd_tun6), agentd_tun6 / agentd_tun);
    println!("iperf3 TCP, two wireguard-go          {}  = {:.3}x bare veth", gbit(wireguard_go), wireguard_go / bare);
    figures.record("tun6_gbit", agentd_tun6 / 1e9, Better::Higher);
    figures.record("tun_gbit", agentd_tun / 1e9, Better::Higher);
    figures.record("tun_vs_wireguard_go", agentd_tun / wireguard_go, Better::Higher);
    println!("agentd (TUN) RSS after the transfer   {:.1} MiB\n", agentd_rss as f64 / (1 << 20) as f64);
}

/// The public key of a base64 WireGuard private key, via `wg pubkey`.
fn x25519_public(private: &str) -> String {
    let mut child = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), private.as_bytes()).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap().trim().to_string()
}

fn rss_of(pid: u32) -> Option<u64> {
    // `ip netns exec` execs the program, so the child's pid is agentd's.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn start_node(server: &TestServer, secret: &str, dir: &std::path::Path, name: &str) -> Node {
    let mut config = NodeConfig::new(&server.url, dir);
    config.auth_key = Some(secret.to_string());
    config.hostname = name.into();
    Node::start(config).await.unwrap()
}

/// Pushes `total` bytes into `addr` and returns the rate the receiver saw, in bits/s.
async fn push(addr: std::net::SocketAddr, total: usize, done: tokio::sync::oneshot::Receiver<Instant>) -> f64 {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    push_into(stream, total, done).await
}

/// Pushes `total` bytes into `stream`, closes it, and returns the rate the receiver saw, in bits/s.
async fn push_into(
    mut stream: impl AsyncWriteExt + Unpin,
    total: usize,
    done: tokio::sync::oneshot::Receiver<Instant>,
) -> f64 {
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        stream.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    stream.shutdown().await.unwrap();
    let end = done.await.unwrap();
    (total * 8) as f64 / end.duration_since(start).as_secs_f64()
}

/// Counts bytes until EOF, then reports when it finished.
async fn sink(mut stream: impl AsyncReadExt + Unpin, total: usize, done: tokio::sync::oneshot::Sender<Instant>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert_eq!(got, total, "all bytes arrived");
    let _ = done.send(Instant::now());
}

async fn userspace(figures: &mut Figures) {
    let total = 512 << 20;
    // Baseline: bare loopback TCP.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        sink(s, total, tx).await;
    });
    let loopback = push(addr, total, rx).await;

    // Through a forward: local TCP -> node A -> WireGuard over loopback UDP -> node B -> sink.
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "userspace").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = std::sync::Arc::new(start_node(&server, &secret, dirs.0.path(), "alpha").await);
    let b = start_node(&server, &secret, dirs.1.path(), "beta").await;
    let mut netmap = a.netmap();
    netmap.wait_for(|m| m.peers.len() == 1).await.unwrap();
    let mut tunnel_listener = b.listen(5201).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = tunnel_listener.accept().await.unwrap();
        sink(s, total, tx).await;
    });
    let forward = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward_addr = forward.local_addr().unwrap();
    let node = a.clone();
    tokio::spawn(async move {
        let (client, _) = forward.accept().await.unwrap();
        agentd::proxy::handle(&node, client, true, &agentd::proxy::Kind::Forward("beta".into(), 5201)).await.unwrap();
    });
    let through = push(forward_addr, total, rx).await;
    println!("userspace: 512 MiB over bare loopback TCP          {}", gbit(loopback));
    println!(
        "userspace: 512 MiB through a forward and the tunnel {}  = {:.3}x loopback",
        gbit(through),
        through / loopback
    );
    figures.record("userspace_forward_gbit", through / 1e9, Better::Higher);
}

/// The `agentd` binary (release, userspace mode) against an in-process peer, both ways: the peer dials
/// agentd's `--serve` port, which agentd joins to a local sink (inbound); a local client pushes into
/// agentd's `--forward`, which agentd carries to the peer's sink (outbound).
async fn serve(figures: &mut Figures) {
    build_agentd();
    let total = 512 << 20;
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "serve").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let peer = start_node(&server, &secret, dirs.0.path(), "peer").await;

    // A local sink for inbound bytes, and the peer's sink for outbound ones.
    let local_sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = local_sink.local_addr().unwrap().port();
    let (inbound_tx, inbound_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = local_sink.accept().await.unwrap();
        sink(s, total, inbound_tx).await;
    });
    let mut peer_sink = peer.listen(5203).await.unwrap();
    let (outbound_tx, outbound_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = peer_sink.accept().await.unwrap();
        sink(s, total, outbound_tx).await;
    });

    let forward_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _agentd = tokio::process::Command::new(agentd_bin())
        .args(["up", "--server", &server.url, "--hostname", "edge"])
        .args(["--serve", &format!("5204=127.0.0.1:{sink_port}")])
        .args(["--forward", &format!("127.0.0.1:{forward_port}=peer:5203")])
        .arg("--state-dir")
        .arg(dirs.1.path())
        .env("AGENTD_AUTH_KEY", &secret)
        .env("AGENTD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    peer.netmap().wait_for(|m| m.resolve("edge").is_some()).await.unwrap();

    let stream = eventually(Duration::from_secs(20), "agentd's served port", || async {
        peer.dial_host("edge", 5204).await.ok()
    })
    .await;
    let inbound = push_into(stream, total, inbound_rx).await;
    let outbound = push(std::net::SocketAddr::from(([127, 0, 0, 1], forward_port)), total, outbound_rx).await;
    println!(
        "serve: 512 MiB into agentd's --serve port (inbound) {}  = {:.2}x outbound",
        gbit(inbound),
        inbound / outbound
    );
    println!("serve: 512 MiB out through agentd's --forward       {}", gbit(outbound));
    figures.record("serve_inbound_gbit", inbound / 1e9, Better::Higher);
    figures.record("forward_outbound_gbit", outbound / 1e9, Better::Higher);
}

/// Median round trip of a 64-byte message over `stream`.
async fn rtt(stream: &mut agentd::TcpStream, rounds: usize) -> Duration {
    let mut samples = Vec::with_capacity(rounds);
    let mut buf = [0u8; 64];
    for _ in 0..rounds {
        let start = Instant::now();
        stream.write_all(&buf).await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    samples[rounds / 2]
}

/// Throughput and round trip through the server's relay against a direct path, and join-to-direct time.
async fn relay(figures: &mut Figures) {
    let total = 256 << 20;
    let mut results = Vec::new();
    for relayed in [false, true] {
        // Without STUN and with endpoints nobody listens on, only the relay connects the nodes.
        let server = if relayed {
            TestServer::start_configured(|c| c.stun_listen = None).await
        } else {
            TestServer::start().await
        };
        let mut admin = server.admin().await;
        let tailnet = create_tailnet(&mut admin, "relay").await;
        let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let start = |name: &'static str, dir: std::path::PathBuf| {
            let (url, secret) = (server.url.clone(), secret.clone());
            async move {
                let mut config = NodeConfig::new(url, dir);
                config.auth_key = Some(secret);
                config.hostname = name.into();
                if relayed {
                    config.advertise = vec!["127.0.0.1:9".parse().unwrap()];
                }
                Node::start(config).await.unwrap()
            }
        };
        let a = start("alpha", dirs.0.path().into()).await;
        // From here: beta joins, alpha hears of it and connects, and the path settles.
        let joined = Instant::now();
        let b = start("beta", dirs.1.path().into()).await;
        a.netmap().wait_for(|m| m.peers.len() == 1).await.unwrap();
        echo(&b, 7).await;
        let mut stream = a.dial_host("beta", 7).await.unwrap();
        if !relayed {
            loop {
                let _ = rtt(&mut stream, 1).await;
                let path = a.status().await.peers[0].path;
                if matches!(path, Some(agentd::wg::Route::Direct(_))) {
                    break;
                }
            }
        }
        let to_direct = joined.elapsed();
        let round_trip = rtt(&mut stream, 2000).await;
        let mut sink_listener = b.listen(5202).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = sink_listener.accept().await.unwrap();
            sink(s, total, tx).await;
        });
        let forward = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let forward_addr = forward.local_addr().unwrap();
        let a = std::sync::Arc::new(a);
        let node = a.clone();
        tokio::spawn(async move {
            let (client, _) = forward.accept().await.unwrap();
            agentd::proxy::handle(&node, client, true, &agentd::proxy::Kind::Forward("beta".into(), 5202))
                .await
                .unwrap();
        });
        let rate = push(forward_addr, total, rx).await;
        let path = a.status().await.peers[0].path;
        assert_eq!(matches!(path, Some(agentd::wg::Route::Relay(_))), relayed, "the transfer took the path meant");
        if relayed {
            let stats = admin.get_relay_stats(cordon_proto::v1::GetRelayStatsRequest {}).await.unwrap().into_inner();
            println!(
                "relay: the server forwarded {} frames and dropped {} (receiver's queue full) and {} (over the rate)",
                stats.forwarded_frames, stats.dropped_overflow, stats.dropped_rate
            );
        }
        results.push((rate, round_trip, to_direct));
    }
    let (direct, relayed) = (results[0], results[1]);
    println!(
        "relay: 256 MiB through the server's relay  {}  = {:.2}x direct ({}) (goal >= 0.5 Gbit/s)",
        gbit(relayed.0),
        relayed.0 / direct.0,
        gbit(direct.0)
    );
    println!(
        "relay: 64-byte round trip median          {:.0} us relayed vs {:.0} us direct (+{:.0} us)",
        relayed.1.as_secs_f64() * 1e6,
        direct.1.as_secs_f64() * 1e6,
        (relayed.1.as_secs_f64() - direct.1.as_secs_f64()) * 1e6
    );
    println!("relay: join -> direct path (start, connect, probe) {:.1} ms (goal < 2 s)", direct.2.as_secs_f64() * 1e3);
    figures.record("direct_gbit", direct.0 / 1e9, Better::Higher);
    figures.record("relay_gbit", relayed.0 / 1e9, Better::Higher);
    figures.record("relay_vs_direct", relayed.0 / direct.0, Better::Higher);
    figures.record("rtt_direct_us", direct.1.as_secs_f64() * 1e6, Better::Lower);
    figures.record("rtt_relay_us", relayed.1.as_secs_f64() * 1e6, Better::Lower);
}

async fn first_byte() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "firstbyte").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dir = tempfile::tempdir().unwrap();
    let peer = start_node(&server, &secret, dir.path(), "peer").await;
    let mut listener = peer.listen(80).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"x").await;
                let _ = s.shutdown().await;
            });
        }
    });

    // In-process: Node::start, dial, first byte.
    let mut in_process = Vec::new();
    for i in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let node = start_node(&server, &secret, dir.path(), &format!("n{i}")).await;
        let mut s = node.dial_host("peer", 80).await.unwrap();
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        in_process.push(start.elapsed());
        node.shutdown().await;
    }
    in_process.sort();

    // The agentd binary: spawn `agentd up --forward`, poll the forward until the peer's byte arrives.
    let mut runs = Vec::new();
    let mut agentd_rss = 0;
    for _ in 0..5 {
        let state = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let start = Instant::now();
        let mut child = tokio::process::Command::new(agentd_bin())
            .args([
                "up",
                "--server",
                &server.url,
                "--hostname",
                "probe",
                "--forward",
                &format!("127.0.0.1:{port}=peer:80"),
            ])
            .arg("--state-dir")
            .arg(state.path())
            .env("AGENTD_AUTH_KEY", &secret)
            .env("AGENTD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut byte = [0u8; 1];
                if s.read_exact(&mut byte).await.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            assert!(start.elapsed() < Duration::from_secs(20), "agentd did not come up");
        }
        runs.push(start.elapsed());
        // Idle RSS: let it settle, then read it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        agentd_rss = agentd_rss.max(child.id().and_then(rss_of).unwrap_or(0));
        let _ = child.kill().await;
    }
    runs.sort();
    println!(
        "first byte from a peer: agentd up -> forward      median {:.1} ms (min {:.1}, max {:.1}) over 5 runs",
        runs[2].as_secs_f64() * 1e3,
        runs[0].as_secs_f64() * 1e3,
        runs[4].as_secs_f64() * 1e3
    );
    println!(
        "first byte from a peer: in-process Node::start     median {:.1} ms (min {:.1}, max {:.1})",
        in_process[2].as_secs_f64() * 1e3,
        in_process[0].as_secs_f64() * 1e3,
        in_process[4].as_secs_f64() * 1e3
    );
    println!("idle RSS of agentd (userspace, one forward)       {:.1} MiB", agentd_rss as f64 / (1 << 20) as f64);
}

async fn idle_memory() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "memory").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs: Vec<_> = (0..50).map(|_| tempfile::tempdir().unwrap()).collect();
    let before = rss_bytes();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(start_node(&server, &secret, d.path(), &format!("m{i}")).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes();
    println!(
        "idle in-process Node: 50 nodes (a 50-peer tailnet) grew RSS by {:.1} MiB = {:.0} KiB each",
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / 50.0 / 1024.0
    );
}
