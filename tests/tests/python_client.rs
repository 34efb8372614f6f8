//! The Python client example (`examples/python`): `generate.sh` makes the stubs from `proto/`, and
//! `provision.py` provisions a tailnet with an upstream, a policy and a key, watches its events and tears
//! it down, against a real server. Skips, saying why, where grpcio and grpcio-tools are not installed
//! (`scripts/test.sh` installs them when run as root).

use std::path::Path;
use std::process::{Output, Stdio};

use cordon_tests::{TestServer, v1 as pb};
use tonic::Code;

const EXAMPLE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python");
const UPSTREAM_KEY: &str = "sk-provision-test-SECRET123";

fn grpc_missing() -> Option<String> {
    let probe = std::process::Command::new("python3").args(["-c", "import grpc, grpc_tools"]).output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string()),
        Err(e) => Some(format!("python3: {e}")),
    }
}

/// Runs `program` with `args`, away from any proxy (gRPC's core honours the proxy variables).
async fn run(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("CORDON_TOKEN")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("grpc_proxy")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of the line `<label> <value>`, which must be there once.
fn field<'a>(stdout: &'a str, label: &str) -> &'a str {
    let values: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix(label)?.strip_prefix(' ')).collect();
    assert_eq!(values.len(), 1, "one `{label} ...` line expected:\n{stdout}");
    values[0]
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write a file for the script");
    path.to_str().expect("a UTF-8 temp path").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_provisions_watches_and_tears_down() {
    if let Some(why) = grpc_missing() {
        let reason = format!("grpcio and grpcio-tools are not installed ({why}); run scripts/test.sh as root");
        return cordon_tests::skip("python_client_provisions_watches_and_tears_down", &reason);
    }
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = write(dir.path(), "admin.token", &format!("{}\n", server.admin_token));
    let key_file = write(dir.path(), "upstream.key", &format!("{UPSTREAM_KEY}\n"));
    let stubs = dir.path().join("stubs");
    let stubs = stubs.to_str().expect("a UTF-8 temp path");

    let generated = run("bash", &[&format!("{EXAMPLE_DIR}/generate.sh"), stubs]).await;
    assert!(generated.status.success(), "generate.sh failed:\n{}", text(&generated.stderr));
    assert!(Path::new(stubs).join("cordon/v1/cordon_pb2_grpc.py").exists(), "generate.sh wrote the gRPC stubs");

    let provision = format!("{EXAMPLE_DIR}/provision.py");
    let out = run(
        "python3",
        &[
            &provision,
            "--server",
            &server.url,
            "--token-file",
            &token_file,
            "--stubs",
            stubs,
            "--upstream-url",
            "https://api.openai.com/v1",
            "--upstream-key-file",
            &key_file,
        ],
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "provision.py failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains(UPSTREAM_KEY) && !stderr.contains(UPSTREAM_KEY), "the upstream key is never shown");
    assert!(!stdout.contains("cordon-auth-"), "the auth key's secret is not printed:\n{stdout}");
    let tailnet_id = field(&stdout, "tailnet").to_string();
    let key_id = field(&stdout, "key").to_string();
    for kind in ["EVENT_KIND_TAILNET_CREATED", "EVENT_KIND_KEY_CREATED", "EVENT_KIND_TAILNET_DELETED"] {
        assert!(stdout.lines().any(|l| l == format!("event {kind}")), "no `event {kind}` line:\n{stdout}");
    }
    assert_eq!(stdout.lines().last(), Some("done"), "`done` comes last:\n{stdout}");

    // What the script did, seen from the server: the tailnet is gone, its audit log stays.
    let mut admin = server.admin().await;
    let gone = admin.get_tailnet(pb::GetTailnetRequest { id: tailnet_id.clone() }).await;
    assert_eq!(gone.map(|_| ()).unwrap_err().code(), Code::NotFound, "the script deleted the tailnet");
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest { tailnet_id: tailnet_id.clone(), ..Default::default() })
        .await
        .expect("list the audit log")
        .into_inner()
        .events;
    let kinds: Vec<_> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, [pb::EventKind::TailnetCreated, pb::EventKind::KeyCreated, pb::EventKind::TailnetDeleted]);
    assert_eq!(events[1].auth_key_id, key_id, "the key the script printed is the one it created");
    assert_eq!(events[2].reason, "provision example done");
    assert!(events.iter().all(|e| e.actor.starts_with("admin:")), "{events:?}");
    assert!(!format!("{events:?}").contains(UPSTREAM_KEY), "no event shows the upstream key");
}
