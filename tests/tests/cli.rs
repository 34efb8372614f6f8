//! The `cordon` command line against a running server: tables, `--json`, the admin token read from
//! the data directory, and errors a person can act on.

use std::process::Output;

use cordon_tests::*;
use serde_json::Value;

async fn cordon(server: &TestServer, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(cordon_bin());
    cmd.args(args).arg("--server").arg(&server.url).arg("--data-dir").arg(&server.data_dir);
    cmd.env_remove("CORDON_TOKEN");
    cmd.output().await.expect("run cordon")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "cordon failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[tokio::test]
async fn cli_round_trip() {
    let server = TestServer::start().await;
    let created: Value = serde_json::from_str(&stdout(
        &cordon(
            &server,
            &["tailnet", "create", "run-7", "--owner", "acme", "--ttl", "2h", "--label", "env=ci", "--json"],
        )
        .await,
    ))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["ttl_seconds"], 7200);

    let table = stdout(&cordon(&server, &["tailnet", "list"]).await);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("EXPIRES"), "{table}");
    assert!(table.contains("run-7") && table.contains("env=ci"), "{table}");

    let key: Value = serde_json::from_str(&stdout(
        &cordon(&server, &["key", "create", "--tailnet", &id, "--tag", "tag:ci", "--reusable", "--json"]).await,
    ))
    .unwrap();
    let secret = key["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("cordon-auth-"));
    let keys = stdout(&cordon(&server, &["key", "list", "--tailnet", &id]).await);
    assert!(keys.contains("valid") && !keys.contains(&secret), "{keys}");

    let mut nodes = server.nodes().await;
    let node = register(&mut nodes, &secret, "worker").await.node.unwrap();
    let listed: Value =
        serde_json::from_str(&stdout(&cordon(&server, &["node", "list", "--tailnet", &id, "--json"]).await)).unwrap();
    assert_eq!(listed[0]["hostname"], "worker");
    assert_eq!(listed[0]["addresses"][0], "100.64.0.2");
    stdout(&cordon(&server, &["node", "delete", &node.id, "--reason", "done"]).await);

    let export = stdout(&cordon(&server, &["audit", "export", "--tailnet", &id]).await);
    let kinds: Vec<String> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["tailnet.created", "key.created", "node.joined", "node.left"]);

    let deleted = stdout(&cordon(&server, &["tailnet", "delete", &id]).await);
    assert!(deleted.contains("deleted tailnet"), "{deleted}");

    let bad = cordon(&server, &["tailnet", "create", "Bad_Name", "--owner", "acme"]).await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("InvalidArgument") && err.contains("name:"), "{err}");

    let mut cmd = tokio::process::Command::new(cordon_bin());
    let down = cmd.args(["tailnet", "list", "--server", "http://127.0.0.1:1", "--token", "x"]).output().await.unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is `cordon serve` running?"));
}
