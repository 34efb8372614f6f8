//! Two nodes, each behind its own NAT router (iptables MASQUERADE), with the server on the "internet"
//! between them (root only; the test makes and removes its namespaces). With UDP between the sites
//! blocked, traffic flows through the relay; once UDP passes, the nodes find each other's public
//! endpoints through STUN and move to a direct path, and the test watches the switch.
//!
//! Topology: `wan` holds the server (10.230.9.2 towards this process) and routes between the routers'
//! public sides 10.230.1.2 and 10.230.2.2; each router masquerades its site 10.231.N.0/24.

use std::process::Stdio;
use std::time::Duration;

use cordon_tests::netns::{self, Netns};
use cordon_tests::v1 as pb;
use cordon_tests::*;
use serde_json::Value;

struct Site {
    router: Netns,
    host: Netns,
}

fn site(wan: &Netns, n: u8) -> Site {
    let router = Netns::new(&format!("r{n}"));
    let host = Netns::new(&format!("h{n}"));
    netns::veth(&router, &format!("10.230.{n}.2"), Some(wan), &format!("10.230.{n}.1"));
    netns::veth(&host, &format!("10.231.{n}.2"), Some(&router), &format!("10.231.{n}.1"));
    router.run(&["ip", "route", "add", "default", "via", &format!("10.230.{n}.1")]);
    router.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let site = format!("10.231.{n}.0/24");
    router.run(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", &site, "!", "-d", &site, "-j", "MASQUERADE"]);
    host.run(&["ip", "route", "add", "default", "via", &format!("10.231.{n}.1")]);
    Site { router, host }
}

async fn status(state: &std::path::Path) -> Option<Value> {
    let out = tokio::process::Command::new(agentd_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .await
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

async fn path(state: &std::path::Path) -> Option<String> {
    let s = status(state).await?;
    s["peers"][0]["path"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_first_then_direct_through_two_nats() {
    if let Some(reason) = netns::skip_reason(&["ip", "iptables", "ping", "sysctl"]) {
        return netns::skip("relay_first_then_direct_through_two_nats", &reason);
    }
    let wan = Netns::new("wan");
    netns::veth(&wan, "10.230.9.2", None, "10.230.9.1");
    wan.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let (a, b) = (site(&wan, 1), site(&wan, 2));
    // No UDP between the sites at first: the relay is the only way.
    wan.run(&["iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP"]);

    let data = tempfile::tempdir().unwrap();
    let _server = wan
        .tokio_command(cordon_bin().to_str().unwrap())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:7443",
            "--insecure-plaintext",
            "--stun-listen",
            "0.0.0.0:3478",
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin = eventually(Duration::from_secs(20), "the server to listen", || async {
        let token = std::fs::read_to_string(data.path().join("admin.token")).ok()?;
        let channel = tonic::transport::Channel::from_static("http://10.230.9.2:7443").connect().await.ok()?;
        Some(pb::control_client::ControlClient::with_interceptor(channel, Bearer::new(token.trim())))
    })
    .await;
    let mut admin = admin;
    let tailnet = create_tailnet(&mut admin, "nat").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    let states = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut agents = Vec::new();
    for (site, state, n) in [(&a, &states.0, 1), (&b, &states.1, 2)] {
        agents.push(
            site.host
                .tokio_command(agentd_bin().to_str().unwrap())
                .args(["up", "--server", &format!("http://10.230.{n}.1:7443"), "--tun", &netns::unique("cd")])
                .args(["--hostname", &format!("h{n}"), "--listen-port", "41641", "--state-dir"])
                .arg(state.path())
                .env("AGENTD_AUTH_KEY", &secret)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let peer_b = eventually(Duration::from_secs(20), "both nodes online", || {
        let mut admin = admin.clone();
        let id = tailnet.id.clone();
        async move {
            let nodes = admin.list_nodes(pb::ListNodesRequest { tailnet_id: id }).await.ok()?.into_inner().nodes;
            (nodes.iter().filter(|n| n.online).count() == 2)
                .then(|| nodes.into_iter().find(|n| n.hostname == "h2").unwrap())
        }
    })
    .await;
    let b_addr = peer_b.addresses[0].clone();

    // Through the relay: ping works although no UDP crosses between the sites.
    eventually(Duration::from_secs(20), "ping through the relay", || async {
        let out = a.host.tokio_command("ping").args(["-c", "1", "-W", "1", &b_addr]).output().await.ok()?;
        out.status.success().then_some(())
    })
    .await;
    assert_eq!(path(states.0.path()).await.as_deref(), Some("relay"));
    let relayed = admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.unwrap().into_inner();
    assert!(relayed.forwarded_frames > 0);
    // B's endpoints include what STUN saw: its router's public address.
    let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap().into_inner();
    let h2 = listed.nodes.iter().find(|n| n.hostname == "h2").unwrap();
    assert!(
        h2.endpoints.iter().any(|e| e.starts_with("10.230.2.2:")),
        "reflexive endpoint reported: {:?}",
        h2.endpoints
    );

    // Let UDP through: the probes punch through both NATs and the path turns direct.
    wan.run(&["iptables", "-D", "FORWARD", "-p", "udp", "-j", "DROP"]);
    let direct = eventually(Duration::from_secs(20), "a direct path", || async {
        let _ = a.host.tokio_command("ping").args(["-c", "1", "-W", "1", &b_addr]).output().await;
        path(states.0.path()).await.filter(|p| p.starts_with("direct"))
    })
    .await;
    assert!(direct.starts_with("direct 10.230.2.2:"), "{direct}");
    let out = a.host.tokio_command("ping").args(["-c", "3", "-W", "1", &b_addr]).output().await.unwrap();
    assert!(out.status.success());
    drop(agents);
    let _ = (&a.router, &b.router);
}
