//! `kill -9` of a real `cordon serve` process while registrations race: after a restart on the same
//! data directory every acknowledged registration is there, with its address and a working session, no
//! address is held twice, and no half-written registration is visible. Also: no secret in the log.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cordon_tests::v1 as pb;
use cordon_tests::*;

async fn connect(url: &str, token: &str) -> (Admin, Nodes) {
    let channel = tonic::transport::Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    (
        pb::control_client::ControlClient::with_interceptor(channel.clone(), Bearer::new(token)),
        pb::node_client::NodeClient::new(channel),
    )
}

#[derive(Clone, Debug)]
struct Acked {
    id: String,
    address: String,
    session: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_registrations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::spawn(&data, &log).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let (mut admin, _) = connect(&server.url, &token).await;
    let tailnet = create_tailnet(&mut admin, "crash").await;
    let (key, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut secrets = vec![secret.clone()];
    for round in 0..3 {
        // Eight registration loops, each on its own connection, until the server dies under them.
        let mut loops = Vec::new();
        for w in 0..8 {
            let (_, mut nodes) = connect(&server.url, &token).await;
            let acked = acked.clone();
            let secret = secret.clone();
            loops.push(tokio::spawn(async move {
                for i in 0.. {
                    match nodes.register(register_request(&secret, &format!("r{round}w{w}n{i}"))).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            let node = r.node.unwrap();
                            acked.lock().unwrap().push(Acked {
                                id: node.id,
                                address: node.addresses[0].clone(),
                                session: r.session_token,
                            });
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        let target = (round + 1) * 120;
        eventually(Duration::from_secs(60), "registrations to be acknowledged", || {
            let n = acked.lock().unwrap().len();
            async move { (n >= target).then_some(()) }
        })
        .await;
        server.child.start_kill().unwrap(); // SIGKILL
        server.child.wait().await.unwrap();
        for l in loops {
            l.await.unwrap();
        }

        server = ServerProcess::spawn(&data, &log).await;
        let (mut admin, mut nodes) = connect(&server.url, &token).await;
        let listed = admin.list_nodes(pb::ListNodesRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
        let listed = listed.into_inner().nodes;
        let addresses: HashSet<_> = listed.iter().map(|n| n.addresses[0].clone()).collect();
        assert_eq!(addresses.len(), listed.len(), "no address is held twice");
        let acked = acked.lock().unwrap().clone();
        for a in &acked {
            let node = listed.iter().find(|n| n.id == a.id);
            let node = node.unwrap_or_else(|| panic!("acknowledged node {} lost after kill -9", a.id));
            assert_eq!(node.addresses[0], a.address);
        }
        // No half-state: the key's use count matches the nodes it admitted, acknowledged or not.
        let keys = admin.list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet.id.clone() }).await.unwrap();
        let uses = keys.into_inner().keys.iter().find(|k| k.id == key.id).unwrap().uses;
        assert_eq!(uses as usize, listed.len(), "key uses and nodes agree");
        // Sessions of acknowledged nodes still work.
        for a in acked.iter().step_by(17) {
            let mut stream = watch(&mut nodes, &a.session).await;
            let map = next_netmap(&mut stream).await;
            let Some(pb::net_map::Update::Full(full)) = map.update else { panic!("expected a full map") };
            assert_eq!(full.self_.unwrap().id, a.id);
            assert_eq!(full.peers.len(), listed.len() - 1);
        }
        secrets.extend(acked.iter().map(|a| a.session.clone()));
    }
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();

    let log_text = std::fs::read_to_string(&server.log).unwrap();
    assert!(log_text.contains("node registered"), "the log was captured");
    for s in &secrets {
        assert!(!log_text.contains(s.as_str()), "a secret reached the server log");
    }
    assert!(!log_text.contains(&token), "the admin token reached the server log");
}
