//! The `agentd` binary in userspace mode: port forwards, SOCKS5 and HTTP proxies into the tailnet,
//! `status` and `whois` over its control socket, and a clean exit with code 3 when it is revoked.

use std::process::Stdio;
use std::time::Duration;

use agentd::{Node, NodeConfig};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A peer that answers every connection on `port` with `hello from <name>` and closes.
async fn greeter(node: &Node, port: u16, name: &'static str) {
    let mut listener = node.listen(port).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let body = format!("hello from {name}; you sent {}", request.lines().next().unwrap_or(""));
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
}

async fn agentd(args: &[&str], state: &std::path::Path) -> std::process::Output {
    Command::new(agentd_bin()).args(args).arg("--state-dir").arg(state).output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_proxies_status_and_revocation() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "bin").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let peer_dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(&server.url, peer_dir.path());
    config.auth_key = Some(secret.clone());
    config.hostname = "web".into();
    let peer = Node::start(config).await.unwrap();
    greeter(&peer, 80, "web").await;

    let state = tempfile::tempdir().unwrap();
    let (forward, socks, http) = (free_port(), free_port(), free_port());
    let mut child = Command::new(agentd_bin())
        .args(["up", "--server", &server.url, "--hostname", "laptop"])
        .args(["--forward", &format!("127.0.0.1:{forward}=web:80")])
        .args(["--socks5", &format!("127.0.0.1:{socks}"), "--http-proxy", &format!("127.0.0.1:{http}")])
        .arg("--state-dir")
        .arg(state.path())
        .env("AGENTD_AUTH_KEY", &secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let up = tokio::time::timeout(Duration::from_secs(20), out.next_line()).await.unwrap().unwrap().unwrap();
    assert!(up.contains("up as laptop"), "{up}");
    let mut netmap = peer.netmap();
    tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 1)).await.unwrap().unwrap();

    // The forward, once its listener is up.
    let body = eventually(Duration::from_secs(10), "the forward to answer", || async move {
        let mut s = TcpStream::connect(("127.0.0.1", forward)).await.ok()?;
        s.write_all(b"GET /a HTTP/1.1\r\nhost: web\r\n\r\n").await.ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).await.ok()?;
        Some(r)
    })
    .await;
    assert!(body.ends_with("hello from web; you sent GET /a HTTP/1.1"), "{body}");

    // SOCKS5 with a domain name.
    let mut s = TcpStream::connect(("127.0.0.1", socks)).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut greeting = [0u8; 2];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, [5, 0]);
    s.write_all(&[5, 1, 0, 3, 3, b'w', b'e', b'b', 0, 80]).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 connect succeeded");
    s.write_all(b"GET /socks HTTP/1.1\r\n\r\n").await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.ends_with("you sent GET /socks HTTP/1.1"), "{r}");

    // SOCKS5 with an IPv6 address (address type 4): the peer's address inside the tunnel.
    let web6 = peer.address6().expect("the peer has IPv6");
    let mut s = TcpStream::connect(("127.0.0.1", socks)).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    s.read_exact(&mut greeting).await.unwrap();
    let mut request = vec![5, 1, 0, 4];
    request.extend_from_slice(&web6.octets());
    request.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&request).await.unwrap();
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 connect to {web6} succeeded");
    s.write_all(b"GET /socks6 HTTP/1.1\r\n\r\n").await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.ends_with("you sent GET /socks6 HTTP/1.1"), "{r}");

    // HTTP proxy, absolute URL with a bracketed IPv6 host and no port.
    let mut s = TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    s.write_all(format!("GET http://[{web6}]/six HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.ends_with("you sent GET /six HTTP/1.1"), "{r}");

    // HTTP proxy, absolute URL: the request line reaches the peer in origin form.
    let mut s = TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    s.write_all(b"GET http://web/v1/models HTTP/1.1\r\nhost: web\r\nproxy-connection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.ends_with("you sent GET /v1/models HTTP/1.1"), "{r}");
    // And an unknown host is a 502 that says why.
    let mut s = TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    s.write_all(b"GET http://nowhere/ HTTP/1.1\r\n\r\n").await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 502") && r.contains("unknown host"), "{r}");

    // status and whois over the control socket.
    let status = agentd(&["status", "--json"], state.path()).await;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["hostname"], "laptop");
    assert_eq!(status["peers"][0]["hostname"], "web");
    assert!(status["peers"][0]["path"].as_str().unwrap().starts_with("direct 127.0.0.1:"), "{status}");
    for address in [peer.address().to_string(), web6.to_string()] {
        let whois = agentd(&["whois", &address], state.path()).await;
        let whois: serde_json::Value = serde_json::from_slice(&whois.stdout).unwrap();
        assert_eq!(whois["id"], peer.node_id(), "whois {address}");
    }
    let table = agentd(&["status"], state.path()).await;
    assert!(String::from_utf8_lossy(&table.stdout).contains("PEER"), "{table:?}");

    // Revoked: it takes the tunnels down, says why and exits 3 instead of retrying.
    let laptop = status["node_id"].as_str().unwrap().to_string();
    admin.delete_node(pb::DeleteNodeRequest { id: laptop, reason: "offboarded".into() }).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert_eq!(exit.code(), Some(3));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    assert!(err.contains("revoked") && err.contains("offboarded"), "{err}");
    assert!(!err.contains(&secret), "the auth key never reaches the log");
}

#[tokio::test]
async fn up_errors_are_one_line_with_an_exit_code() {
    let state = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let state = state.path().to_path_buf();
        async move { Command::new(agentd_bin()).args(args).arg("--state-dir").arg(state).output().await.unwrap() }
    };
    let bad_url = run(vec!["up".into(), "--server".into(), "cordon.example".into()]).await;
    assert_eq!(bad_url.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_url.stderr).contains("not a server URL"));
    let down = run(vec!["up".into(), "--server".into(), "http://127.0.0.1:1".into()]).await;
    assert_eq!(down.status.code(), Some(5));
    let server = TestServer::start().await;
    let rejected = run(vec![
        "up".into(),
        "--server".into(),
        server.url.clone(),
        "--auth-key".into(),
        format!("cordon-auth-{}", "z".repeat(43)),
    ])
    .await;
    assert_eq!(rejected.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    assert!(stderr.contains("refused") && !stderr.contains("zzzz"), "{stderr}");
    let no_daemon = run(vec!["status".into()]).await;
    assert_eq!(no_daemon.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_daemon.stderr).contains("no agentd is running"));
}

/// The first start without a key says the node has not joined (not that a saved session went bad), and
/// a state directory agentd cannot write says what to do about it.
#[tokio::test]
async fn first_start_and_unwritable_state_say_what_to_do() {
    let server = TestServer::start().await;
    let state = tempfile::tempdir().unwrap();
    let first = agentd(&["up", "--server", &server.url], state.path()).await;
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("has not joined yet") && stderr.contains("--auth-key"), "{stderr}");
    assert!(!stderr.contains("no longer valid"), "no session was ever saved: {stderr}");

    // sysfs refuses new directories to root and everyone else alike.
    let unwritable = std::path::Path::new("/sys/kernel/agentd-state");
    let out = agentd(&["up", "--server", &server.url], unwritable).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--state-dir"), "names the remedy: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

const SERVE_POLICY: &str = r#"{
  "tagOwners": { "tag:sensor": [], "tag:collector": [], "tag:other": [] },
  "grants": [ { "src": ["tag:collector"], "dst": ["tag:sensor"], "ip": ["tcp:9100", "tcp:2222", "udp:5353"] } ]
}"#;

/// A local service on loopback that answers each connection with `text` and closes.
async fn local_service(text: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(text.as_bytes()).await;
        }
    });
    port
}

/// A local UDP service on loopback that answers each datagram with it in upper case.
async fn local_udp_service() -> u16 {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n].to_ascii_uppercase(), from).await;
        }
    });
    port
}

/// Sends `text` from a UDP socket of `node` to `to` until an answer comes; the answer.
async fn udp_ask(node: &Node, to: std::net::SocketAddr, text: &str) -> String {
    let socket = node.bind_udp(0).unwrap();
    eventually(Duration::from_secs(10), &format!("a UDP answer from {to}"), || async {
        socket.send_to(text.as_bytes(), to).await.ok()?;
        let mut buf = [0u8; 2048];
        let (n, from) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await.ok()?.ok()?;
        assert_eq!(from, to, "the answer comes from the served address");
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await
}

/// An edge node without root offers local services to the peer the policy lets in, and to nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_offers_local_services_to_the_peers_the_policy_lets_in() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut req = tailnet_request("serve");
    req.policy_json = SERVE_POLICY.into();
    let tailnet = admin.create_tailnet(req).await.unwrap().into_inner();
    let metrics = local_service("metrics 42\n").await;
    let ssh = local_service("SSH-2.0-test\n").await;
    let dns = local_udp_service().await;

    // The sensor: the real binary, userspace mode, serving two TCP ports and a UDP one.
    let state = tempfile::tempdir().unwrap();
    let mut sensor = Command::new(agentd_bin())
        .args(["up", "--server", &server.url, "--hostname", "sensor"])
        .args(["--serve", &format!("9100=127.0.0.1:{metrics}"), "--serve", &format!("2222=127.0.0.1:{ssh}")])
        .args(["--serve", &format!("5353=127.0.0.1:{dns}/udp")])
        .arg("--state-dir")
        .arg(state.path())
        .env("AGENTD_AUTH_KEY", tagged_key(&mut admin, &tailnet.id, &["tag:sensor"]).await)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sensor.stdout.take().unwrap()).lines();
    let mut served = 0;
    while served < 3 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
        served += usize::from(line.starts_with("agentd: serving tailnet port"));
    }

    let peer = |tag: &'static str, dir: std::path::PathBuf| {
        let (url, id) = (server.url.clone(), tailnet.id.clone());
        let mut admin = admin.clone();
        async move {
            let mut config = NodeConfig::new(url, dir);
            config.auth_key = Some(tagged_key(&mut admin, &id, &[tag]).await);
            config.hostname = tag.trim_start_matches("tag:").into();
            Node::start(config).await.unwrap()
        }
    };
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let collector = peer("tag:collector", dirs.0.path().into()).await;
    let other = peer("tag:other", dirs.1.path().into()).await;
    collector.netmap().wait_for(|m| m.resolve("sensor").is_some()).await.unwrap();

    for (port, want) in [(9100, "metrics 42\n"), (2222, "SSH-2.0-test\n")] {
        let mut s = collector.dial_host("sensor", port).await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, want, "tailnet port {port}");
    }
    // Over IPv6 too, and UDP over both.
    let record = collector.netmap().borrow().peers.values().find(|p| p.hostname == "sensor").unwrap().clone();
    let (sensor_ip, sensor_ip6) = (record.addresses[0], record.addresses[1]);
    assert!(sensor_ip.is_ipv4() && sensor_ip6.is_ipv6(), "{:?}", record.addresses);
    let mut s = collector.dial(std::net::SocketAddr::new(sensor_ip6, 9100)).await.unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "metrics 42\n", "tailnet port 9100 over IPv6");
    for ip in [sensor_ip, sensor_ip6] {
        assert_eq!(udp_ask(&collector, std::net::SocketAddr::new(ip, 5353), "query").await, "QUERY");
    }

    // The other node is not granted the ports: its SYN is filtered before the sensor's stack sees it,
    // over either family, and so are its datagrams.
    for ip in [sensor_ip, sensor_ip6] {
        let refused =
            tokio::time::timeout(Duration::from_secs(2), other.dial(std::net::SocketAddr::new(ip, 9100))).await;
        assert!(!matches!(refused, Ok(Ok(_))), "an ungranted peer connected to a served port at {ip}");
    }
    let socket = other.bind_udp(0).unwrap();
    socket.send_to(b"query", std::net::SocketAddr::new(sensor_ip, 5353)).await.unwrap();
    let mut buf = [0u8; 64];
    let answer = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await;
    assert!(answer.is_err(), "an ungranted peer got a UDP answer");

    let status = agentd(&["status", "--json"], state.path()).await;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let ports: Vec<u64> = status["serving"].as_array().unwrap().iter().map(|v| v["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, vec![9100, 2222, 5353]);
    assert_eq!(status["serving"][1]["target"], format!("127.0.0.1:{ssh}"));
    assert_eq!(status["serving"][2]["protocol"], "udp");
    assert!(status["address6"].as_str().is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()), "{status}");
    let bad = agentd(&["up", "--server", &server.url, "--serve", "0"], state.path()).await;
    assert_eq!(bad.status.code(), Some(2), "a bad --serve is a usage error");
    let bad = agentd(&["up", "--server", &server.url, "--serve", "53/sctp"], state.path()).await;
    assert_eq!(bad.status.code(), Some(2), "an unknown protocol is a usage error");
    let _ = sensor.kill().await;
}
