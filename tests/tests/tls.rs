//! `https://` servers are verified: agentd joins a server whose certificate a private CA signed when
//! given that CA (`--ca-cert`), and otherwise refuses in one line that says which check failed: an
//! untrusted certificate, or one for another name. The certificates are made by the test (openssl).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cordon_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn agentd_up(server: &str, state: &Path, key: &str, ca: Option<&Path>) -> tokio::process::Child {
    let mut cmd = Command::new(agentd_bin());
    cmd.args(["up", "--server", server, "--hostname", "tls"]).arg("--state-dir").arg(state).env("AGENTD_AUTH_KEY", key);
    if let Some(ca) = ca {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentd_verifies_the_servers_certificate() {
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        return skip(
            "agentd_verifies_the_servers_certificate",
            "openssl is not installed (scripts/test.sh installs it as root)",
        );
    }
    let certs = tempfile::tempdir().unwrap();
    test_certificates(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("server.pem"), certs.path().join("server.key"));
    let server = TestServer::launch(dir.path(), "127.0.0.1:0", move |c| {
        c.tls = Some(cordon_server::config::Tls { cert, key });
    })
    .await;
    let port = server.addr.port();
    let ca = certs.path().join("ca.pem");

    // The admin API over TLS, trusting the test's CA.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = v1::control_client::ControlClient::with_interceptor(channel, Bearer::new(&server.admin_token));
    let tailnet = create_tailnet(&mut admin, "tls").await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;

    // Without the CA: refused, in one line that says what to do.
    let state = tempfile::tempdir().unwrap();
    let url = format!("https://localhost:{port}");
    let out = agentd_up(&url, state.path(), &secret, None).await.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("not signed by a CA this host trusts") && stderr.contains("--ca-cert"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // With the CA but a name the certificate is not for (it names localhost, not 127.0.0.1).
    let by_ip = format!("https://127.0.0.1:{port}");
    let out = agentd_up(&by_ip, state.path(), &secret, Some(&ca)).await.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("for another name"), "{stderr}");

    // With the CA and the right name: it joins.
    let mut child = agentd_up(&url, state.path(), &secret, Some(&ca)).await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let up = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(up.starts_with("agentd: up as tls"), "{up}");
    let _ = child.kill().await;
}
