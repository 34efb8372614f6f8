//! Hosts in network namespaces (root only; each test makes and removes its own): two `agentd` in TUN
//! mode reach each other by ping and TCP, and `agentd` interoperates with Debian's `wireguard-go`
//! configured with `wg` from a node record registered through the Node API. Each runs with TUN
//! offloads on (the default) and forced off (`AGENTD_TUN_OFFLOAD=0`), and moves 8 MiB both ways with a
//! digest, so that segmentation and coalescing are exercised by real kernel TCP. Both tests also run
//! over the tunnel's IPv6 addresses. And a stock `wireguard-go` reaches its tailnet's gateway on the
//! server's UDP port.
//!
//! Topology per test: namespaces A and B, each with a veth to this process's namespace (where the
//! server listens) and a veth between them that carries the WireGuard UDP traffic.

use std::time::Duration;

use base64::Engine as _;
use cordon_tests::netns::{self, Netns};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use tokio::process::Child;

const ECHO_SERVER: &str = "import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((sys.argv[1],int(sys.argv[2])));s.listen(8)\nwhile True:\n c,_=s.accept();d=c.recv(65536);c.sendall(d[::-1]);c.close()\n";
/// Reads the byte count, then that many bytes, and answers with their SHA-256.
const DIGEST_SERVER: &str = "import socket,sys,hashlib\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((sys.argv[1],int(sys.argv[2])));s.listen(8)\nwhile True:\n c,_=s.accept();n=int(c.recv(16).decode());h=hashlib.sha256();g=0\n while g<n:\n  d=c.recv(1<<20)\n  if not d: break\n  h.update(d);g+=len(d)\n c.sendall(h.hexdigest().encode());c.close()\n";
/// Sends a 16-byte count then that many random bytes; prints whether the server's digest matches.
const DIGEST_CLIENT: &str = "import socket,sys,hashlib,os\nn=int(sys.argv[3]);data=os.urandom(n)\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\nc.sendall(str(n).encode().ljust(16));c.sendall(data)\nr=b''\nwhile True:\n d=c.recv(100)\n if not d: break\n r+=d\nprint('match' if r.decode()==hashlib.sha256(data).hexdigest() else 'mismatch')\n";
const BULK: usize = 8 << 20;
const ECHO_CLIENT: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\nc.sendall(sys.argv[3].encode());print(c.recv(65536).decode())\n";

struct Sites {
    a: Netns,
    b: Netns,
    /// The server as seen from A and from B.
    server_from_a: String,
    server_from_b: String,
    /// A's and B's addresses on the link between them.
    a_link: String,
    b_link: String,
}

fn sites(subnet: u8, port: u16) -> Sites {
    let a = Netns::new("a");
    let b = Netns::new("b");
    netns::veth(&a, &format!("10.{subnet}.1.2"), None, &format!("10.{subnet}.1.1"));
    netns::veth(&b, &format!("10.{subnet}.2.2"), None, &format!("10.{subnet}.2.1"));
    netns::veth(&a, &format!("10.{subnet}.0.1"), Some(&b), &format!("10.{subnet}.0.2"));
    Sites {
        a,
        b,
        server_from_a: format!("http://10.{subnet}.1.1:{port}"),
        server_from_b: format!("http://10.{subnet}.2.1:{port}"),
        a_link: format!("10.{subnet}.0.1"),
        b_link: format!("10.{subnet}.0.2"),
    }
}

/// Whether the TUN device runs with offloads.
#[derive(Clone, Copy)]
enum Offload {
    On,
    Off,
}

struct Agent<'a> {
    ns: &'a Netns,
    server: &'a str,
    secret: &'a str,
    state: &'a std::path::Path,
    name: &'a str,
    advertise: &'a str,
}

/// Starts agentd in TUN mode; its log goes to `agentd.log` in its state directory.
fn agentd_tun(agent: Agent<'_>, offload: Offload) -> Child {
    let Agent { ns, server, secret, state, name, advertise } = agent;
    let log = std::fs::File::create(state.join("agentd.log")).expect("agentd log file");
    let tun = netns::unique("cd");
    ns.tokio_command(agentd_bin().to_str().unwrap())
        .args(["up", "--server", server, "--tun", &tun, "--hostname", name, "--listen-port", "51820"])
        .args(["--advertise", &format!("{advertise}:51820")])
        .arg("--state-dir")
        .arg(state)
        .env("AGENTD_AUTH_KEY", secret)
        .env(agentd::tun::OFFLOAD_VAR, if matches!(offload, Offload::On) { "1" } else { "0" })
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn agentd")
}

/// Asserts that agentd's log says its TUN device runs with offloads as asked.
fn assert_offload(state: &std::path::Path, offload: Offload) {
    let log = std::fs::read_to_string(state.join("agentd.log")).unwrap_or_default();
    let want = if matches!(offload, Offload::On) { "offloads on" } else { "offloads off" };
    assert!(log.contains(want), "agentd should run its TUN device with {want}; its log:\n{log}");
}

fn echo_server(ns: &Netns, addr: &str, port: u16) -> Child {
    python_server(ns, ECHO_SERVER, addr, port)
}

fn python_server(ns: &Netns, script: &str, addr: &str, port: u16) -> Child {
    ns.tokio_command("python3")
        .args(["-c", script, addr, &port.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn echo server")
}

/// Sends `text` over TCP from inside `ns` and expects it back reversed; retries until the tunnel is up.
async fn tcp_round_trip(ns: &Netns, addr: &str, port: u16, text: &str) {
    let reply = eventually(Duration::from_secs(20), &format!("TCP to {addr}:{port}"), || async {
        let out =
            ns.tokio_command("python3").args(["-c", ECHO_CLIENT, addr, &port.to_string(), text]).output().await.ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .await;
    assert_eq!(reply, text.chars().rev().collect::<String>());
}

/// Sends [`BULK`] random bytes over TCP from inside `ns` to a digest server; they must arrive intact.
async fn bulk_transfer(ns: &Netns, addr: &str, port: u16, what: &str) {
    let reply = eventually(Duration::from_secs(30), &format!("8 MiB to {addr}:{port}"), || async {
        let out = ns
            .tokio_command("python3")
            .args(["-c", DIGEST_CLIENT, addr, &port.to_string(), &BULK.to_string()])
            .output()
            .await
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .await;
    assert_eq!(reply, "match", "{what}: the bytes that arrived differ from those sent");
}

/// A WireGuard key pair made by `wg` (private, public; base64).
fn wg_keys() -> (String, String) {
    let private = String::from_utf8(netns::run(&["wg", "genkey"]).stdout).unwrap().trim().to_string();
    let mut pubkey = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(pubkey.stdin.as_mut().unwrap(), private.as_bytes()).unwrap();
    let public = String::from_utf8(pubkey.wait_with_output().unwrap().stdout).unwrap().trim().to_string();
    (private, public)
}

/// Debian's wireguard-go running in `ns` with a new interface (its name), once the interface exists;
/// both go when the returned guard drops.
async fn wireguard_go(ns: &Netns) -> (String, (Child, netns::WireguardSocket)) {
    let iface = netns::unique("wg");
    let socket = netns::WireguardSocket::new(&iface);
    let child = ns
        .tokio_command("wireguard-go")
        .args(["-f", &iface])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "wireguard-go's interface", || async {
        let out = ns.tokio_command("ip").args(["link", "show", &iface]).output().await.ok()?;
        out.status.success().then_some(())
    })
    .await;
    (iface, (child, socket))
}

async fn node_named(admin: &mut Admin, tailnet: &str, hostname: &str) -> pb::NodeInfo {
    eventually(Duration::from_secs(20), &format!("{hostname} to register"), || {
        let mut admin = admin.clone();
        async move {
            let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.into() }).await.ok()?.into_inner();
            nodes.nodes.into_iter().find(|n| n.hostname == hostname && n.online)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agentd_in_tun_mode_ping_and_tcp() {
    two_agentd(210, Offload::On, "two_agentd_in_tun_mode_ping_and_tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agentd_in_tun_mode_without_offloads() {
    two_agentd(214, Offload::Off, "two_agentd_in_tun_mode_without_offloads").await;
}

async fn two_agentd(subnet: u8, offload: Offload, test: &str) {
    if let Some(reason) = netns::skip_reason(&["ip", "python3", "ping"]) {
        return netns::skip(test, &reason);
    }
    let server = TestServer::start_public().await;
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, "tun").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let s = sites(subnet, server.addr.port());
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent = |ns, server, state, name, advertise| Agent { ns, server, secret: &secret, state, name, advertise };
    let _agent_a = agentd_tun(agent(&s.a, &s.server_from_a, state_a.path(), "alpha", &s.a_link), offload);
    let _agent_b = agentd_tun(agent(&s.b, &s.server_from_b, state_b.path(), "beta", &s.b_link), offload);
    let a = node_named(&mut admin, &tailnet.id, "alpha").await;
    let b = node_named(&mut admin, &tailnet.id, "beta").await;
    let (a_addr, b_addr) = (a.addresses[0].clone(), b.addresses[0].clone());
    let (a_addr6, b_addr6) = (a.addresses[1].clone(), b.addresses[1].clone());

    eventually(Duration::from_secs(20), "ping over the tunnel", || async {
        let out = s.a.tokio_command("ping").args(["-c", "1", "-W", "1", &b_addr]).output().await.ok()?;
        out.status.success().then_some(())
    })
    .await;
    let _server_b = echo_server(&s.b, &b_addr, 7000);
    tcp_round_trip(&s.a, &b_addr, 7000, "through two agentd").await;
    let _server_a = echo_server(&s.a, &a_addr, 7000);
    tcp_round_trip(&s.b, &a_addr, 7000, "and back again").await;
    let _bulk_b = python_server(&s.b, DIGEST_SERVER, &b_addr, 7100);
    bulk_transfer(&s.a, &b_addr, 7100, "alpha to beta").await;
    let _bulk_a = python_server(&s.a, DIGEST_SERVER, &a_addr, 7100);
    bulk_transfer(&s.b, &a_addr, 7100, "beta to alpha").await;

    // The same over IPv6 inside the tunnel.
    eventually(Duration::from_secs(20), "ping -6 over the tunnel", || async {
        let out = s.a.tokio_command("ping").args(["-6", "-c", "1", "-W", "1", &b_addr6]).output().await.ok()?;
        out.status.success().then_some(())
    })
    .await;
    let _server_b6 = echo_server(&s.b, &b_addr6, 7200);
    tcp_round_trip(&s.a, &b_addr6, 7200, "through two agentd over IPv6").await;
    let _server_a6 = echo_server(&s.a, &a_addr6, 7200);
    tcp_round_trip(&s.b, &a_addr6, 7200, "and back over IPv6").await;
    let _bulk_b6 = python_server(&s.b, DIGEST_SERVER, &b_addr6, 7300);
    bulk_transfer(&s.a, &b_addr6, 7300, "alpha to beta over IPv6").await;
    assert_offload(state_a.path(), offload);
    assert_offload(state_b.path(), offload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentd_interoperates_with_wireguard_go() {
    interop(211, Offload::On, "agentd_interoperates_with_wireguard_go").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentd_interoperates_with_wireguard_go_without_offloads() {
    interop(215, Offload::Off, "agentd_interoperates_with_wireguard_go_without_offloads").await;
}

async fn interop(subnet: u8, offload: Offload, test: &str) {
    if let Some(reason) = netns::skip_reason(&["ip", "python3", "wireguard-go", "wg"]) {
        return netns::skip(test, &reason);
    }
    let server = TestServer::start_public().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let tailnet = create_tailnet(&mut admin, "interop").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let s = sites(subnet, server.addr.port());

    // wireguard-go's identity, registered through the Node API like any node.
    let (private, public) = wg_keys();
    let mut req = register_request(&secret, "wggo");
    req.wireguard_public_key = base64::engine::general_purpose::STANDARD.decode(&public).unwrap();
    req.endpoints = vec![format!("{}:51821", s.b_link)];
    let wg_node = nodes.register(req).await.unwrap().into_inner().node.unwrap();
    let (wg_addr, wg_addr6) = (wg_node.addresses[0].clone(), wg_node.addresses[1].clone());
    let prefix6 = tailnet.cidr6.split_once('/').expect("the tailnet has an IPv6 range").1.to_string();

    let state = tempfile::tempdir().unwrap();
    let agent = Agent {
        ns: &s.a,
        server: &s.server_from_a,
        secret: &secret,
        state: state.path(),
        name: "alpha",
        advertise: &s.a_link,
    };
    let _agent = agentd_tun(agent, offload);
    let agent = node_named(&mut admin, &tailnet.id, "alpha").await;
    let agent_key = base64::engine::general_purpose::STANDARD.encode(&agent.wireguard_public_key);
    let (agent_addr, agent_addr6) = (agent.addresses[0].clone(), agent.addresses[1].clone());

    // wireguard-go in B, configured with wg from the node records.
    let (iface, _wireguard_go) = wireguard_go(&s.b).await;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), &private).unwrap();
    s.b.run(&[
        "wg",
        "set",
        &iface,
        "private-key",
        key_file.path().to_str().unwrap(),
        "listen-port",
        "51821",
        "peer",
        &agent_key,
        "allowed-ips",
        &format!("{agent_addr}/32,{agent_addr6}/128"),
        "endpoint",
        &format!("{}:51820", s.a_link),
    ]);
    s.b.run(&["ip", "addr", "add", &format!("{wg_addr}/10"), "dev", &iface]);
    s.b.run(&["ip", "-6", "addr", "add", &format!("{wg_addr6}/{prefix6}"), "dev", &iface]);
    s.b.run(&["ip", "link", "set", &iface, "mtu", "1420", "up"]);

    // TCP both ways.
    let _server_b = echo_server(&s.b, &wg_addr, 7001);
    tcp_round_trip(&s.a, &wg_addr, 7001, "agentd to wireguard-go").await;
    let _server_a = echo_server(&s.a, &agent_addr, 7002);
    tcp_round_trip(&s.b, &agent_addr, 7002, "wireguard-go to agentd").await;
    let _bulk_b = python_server(&s.b, DIGEST_SERVER, &wg_addr, 7101);
    bulk_transfer(&s.a, &wg_addr, 7101, "agentd to wireguard-go").await;
    let _bulk_a = python_server(&s.a, DIGEST_SERVER, &agent_addr, 7102);
    bulk_transfer(&s.b, &agent_addr, 7102, "wireguard-go to agentd").await;
    // And over the IPv6 addresses inside the tunnel.
    let _server_b6 = echo_server(&s.b, &wg_addr6, 7201);
    tcp_round_trip(&s.a, &wg_addr6, 7201, "agentd to wireguard-go over IPv6").await;
    let _server_a6 = echo_server(&s.a, &agent_addr6, 7202);
    tcp_round_trip(&s.b, &agent_addr6, 7202, "wireguard-go to agentd over IPv6").await;
    let _bulk_b6 = python_server(&s.b, DIGEST_SERVER, &wg_addr6, 7301);
    bulk_transfer(&s.a, &wg_addr6, 7301, "agentd to wireguard-go over IPv6").await;
    assert_offload(state.path(), offload);
    let handshakes = String::from_utf8(s.b.run(&["wg", "show", &iface, "latest-handshakes"]).stdout).unwrap();
    assert!(handshakes.contains(&agent_key), "{handshakes}");
}

/// A stock WireGuard peer reaches its tailnet's gateway, which has no port of its own: wireguard-go in
/// a namespace, registered through the Node API and configured with `wg` from its netmap (the gateway's
/// key, address and endpoint on the server's UDP port), gets the model list its grant allows from
/// `gateway:80`. The gateway recognises it by its tunnel address, so the list is the policy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_reaches_the_gateway_on_the_servers_udp_port() {
    let test = "wireguard_go_reaches_the_gateway_on_the_servers_udp_port";
    if let Some(reason) = netns::skip_reason(&["ip", "python3", "wireguard-go", "wg"]) {
        return netns::skip(test, &reason);
    }
    const POLICY: &str = r#"{ "tagOwners": { "tag:ci": [] },
      "grants": [ { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
                    "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"] }] } } ] }"#;
    let server = TestServer::start_public().await;
    let llm = cordon_tests::llm::FakeLlm::start().await;
    let mut admin = server.admin().await;
    let mut nodes = server.nodes().await;
    let mut create = tailnet_request("stock");
    create.policy_json = POLICY.into();
    create.upstreams = cordon_tests::llm::upstreams(&llm);
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let secret = tagged_key(&mut admin, &tailnet.id, &["tag:ci"]).await;
    let b = Netns::new("b");
    netns::veth(&b, "10.219.2.2", None, "10.219.2.1");

    let (private, public) = wg_keys();
    let mut req = register_request(&secret, "stock");
    req.wireguard_public_key = base64::engine::general_purpose::STANDARD.decode(&public).unwrap();
    req.endpoints = vec!["10.219.2.2:51822".into()];
    let registered = nodes.register(req).await.unwrap().into_inner();
    let me = registered.node.unwrap();
    // The gateway as the node's netmap shows it. A server bound to 0.0.0.0 does not know which of its
    // addresses the node reaches, so the endpoint names the port only: the host is the server's.
    let mut stream = watch(&mut nodes, &registered.session_token).await;
    let Some(pb::net_map::Update::Full(full)) = next_netmap(&mut stream).await.update else {
        panic!("the first netmap is a full one")
    };
    let gateway = full.gateway.expect("the netmap names the gateway");
    let gateway_key = base64::engine::general_purpose::STANDARD.encode(&gateway.wireguard_public_key);
    let udp_port = gateway.endpoints.first().and_then(|e| e.rsplit_once(':')).expect("an endpoint").1.to_string();
    assert!(gateway.endpoints[0].starts_with("0.0.0.0:"), "{:?}", gateway.endpoints);

    let (iface, _wireguard_go) = wireguard_go(&b).await;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), &private).unwrap();
    b.run(&[
        "wg",
        "set",
        &iface,
        "private-key",
        key_file.path().to_str().unwrap(),
        "listen-port",
        "51822",
        "peer",
        &gateway_key,
        "allowed-ips",
        &format!("{}/32", tailnet.gateway_address),
        "endpoint",
        &format!("10.219.2.1:{udp_port}"),
    ]);
    b.run(&["ip", "addr", "add", &format!("{}/10", me.addresses[0]), "dev", &iface]);
    b.run(&["ip", "link", "set", &iface, "mtu", "1420", "up"]);

    let fetch = "import sys,urllib.request\nprint(urllib.request.urlopen(sys.argv[1],timeout=3).read().decode())\n";
    let url = format!("http://{}/v1/models", tailnet.gateway_address);
    let models = eventually(Duration::from_secs(20), "the gateway's model list from wireguard-go", || async {
        let out = b.tokio_command("python3").args(["-c", fetch, &url]).output().await.ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
    })
    .await;
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["openai/gpt-4o-mini".to_string()], "{models}");
    let handshakes = String::from_utf8(b.run(&["wg", "show", &iface, "latest-handshakes"]).stdout).unwrap();
    assert!(handshakes.contains(&gateway_key), "wireguard-go shook hands with the gateway: {handshakes}");
    let port = server.control_plane.port.get().expect("the UDP port").clone();
    assert_eq!(port.local_addr().unwrap().port().to_string(), udp_port);
}

/// Two `agentd` in TUN mode, in namespaces that cannot exchange UDP, each connected to a different
/// replica of one PostgreSQL-backed deployment: they still reach each other through the relay mesh
/// (replica 1 forwards to replica 2), and 8 MiB arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentd_on_two_replicas_with_udp_blocked_meet_through_the_relay_mesh() {
    let test = "agentd_on_two_replicas_with_udp_blocked_meet_through_the_relay_mesh";
    if let Some(reason) = netns::skip_reason(&["ip", "python3", "iptables"]) {
        return netns::skip(test, &reason);
    }
    let Some(db) = cordon_tests::pg::database(test).await else { return };
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let replica = |dir: std::path::PathBuf| {
        let db = db.clone();
        async move {
            TestServer::launch(&dir, "0.0.0.0:0", move |c| {
                c.store = Some(cordon_server::store::StoreUrl::Postgres(db));
                c.stun_listen = None;
            })
            .await
        }
    };
    let r1 = replica(dirs.0.path().to_path_buf()).await;
    let r2 = replica(dirs.1.path().to_path_buf()).await;
    let mut admin = r1.admin().await;
    let tailnet = create_tailnet(&mut admin, "meshns").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    // A and B reach the host (where the replicas listen) and nothing else; UDP between them is dropped
    // even if the host forwards.
    let a = Netns::new("a");
    let b = Netns::new("b");
    netns::veth(&a, "10.223.1.2", None, "10.223.1.1");
    netns::veth(&b, "10.223.2.2", None, "10.223.2.1");
    a.run(&["ip", "route", "add", "10.223.2.0/24", "via", "10.223.1.1"]);
    b.run(&["ip", "route", "add", "10.223.1.0/24", "via", "10.223.2.1"]);
    a.run(&["iptables", "-A", "OUTPUT", "-p", "udp", "-d", "10.223.2.0/24", "-j", "DROP"]);
    b.run(&["iptables", "-A", "OUTPUT", "-p", "udp", "-d", "10.223.1.0/24", "-j", "DROP"]);

    let server_a = format!("http://10.223.1.1:{}", r1.addr.port());
    let server_b = format!("http://10.223.2.1:{}", r2.addr.port());
    let states = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent = |ns, server, state, name, advertise| Agent { ns, server, secret: &secret, state, name, advertise };
    let _alpha = agentd_tun(agent(&a, &server_a, states.0.path(), "alpha", "10.223.1.2"), Offload::On);
    let _beta = agentd_tun(agent(&b, &server_b, states.1.path(), "beta", "10.223.2.2"), Offload::On);
    node_named(&mut admin, &tailnet.id, "alpha").await;
    let beta = node_named(&mut admin, &tailnet.id, "beta").await;
    let beta_addr = beta.addresses[0].clone();

    let _digest = python_server(&b, DIGEST_SERVER, &beta_addr, 7401);
    bulk_transfer(&a, &beta_addr, 7401, "alpha (replica 1) to beta (replica 2)").await;
    let forwarded = admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap().into_inner().forwarded_bytes;
    assert!(forwarded > 8 << 20, "replica 1 carried the data onto the mesh: {forwarded} bytes");
}
