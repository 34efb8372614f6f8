//! The operator's console in a real headless Chromium (Selenium with Debian's chromium-driver): sign-in,
//! every page showing data this test made (a CI run's requests with a blocked tool call, a person's
//! requests, spend), markup in data shown as text, live events, an operator's action. Over plain HTTP
//! from the test: actions without the CSRF token and an auditor's actions are refused, cookies and headers
//! are strict, and no page, asset or header carries a secret. Skips, saying why, where Chromium or
//! Selenium is missing (`scripts/test.sh` installs them when run as root).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cordon_tests::idp::{CLIENT_ID, CLIENT_SECRET, Idp, Person};
use cordon_tests::llm::{self, FakeLlm};
use cordon_tests::{TestServer, tailnet_events, v1 as pb};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const POLICY: &str = r#"{
  "groups": { "group:eng": ["idp:engineering"] },
  "tagOwners": { "tag:ci": [] },
  "grants": [
    { "src": ["tag:ci", "group:eng"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/*"], "tools": { "deny": ["shell.*"] } }] } }
  ]
}"#;
const XSS: &str = r#"<script>window.__xss=1</script>"><img src=x onerror="window.__xss=2">"#;

fn browser_missing() -> Option<String> {
    if !std::path::Path::new("/usr/bin/chromium").exists() || !std::path::Path::new("/usr/bin/chromedriver").exists() {
        return Some("Debian's chromium and chromium-driver are not installed".into());
    }
    let probe = std::process::Command::new("python3").args(["-c", "import selenium"]).output();
    match probe {
        Ok(out) if out.status.success() => None,
        _ => Some("the selenium Python package is not installed".into()),
    }
}

/// One HTTP exchange with the console: status, headers, body.
async fn http(
    method: &str,
    url: &str,
    cookie: Option<&str>,
    body: Option<String>,
    extra: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let client = llm::http_client();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    if body.is_some() {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let response = client.request(req).await.expect("the console answers");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

/// Signs in over HTTP; returns the session cookie (`name=value`) and the Set-Cookie header.
async fn sign_in(base: &str, token: &str) -> (String, String) {
    let (status, headers, body) = http(
        "POST",
        &format!("{base}/login"),
        None,
        Some(format!("token={}", cordon_server::console::enc(token))),
        &[],
    )
    .await;
    assert_eq!(status, 303, "{body}");
    let set = headers.get("set-cookie").expect("a session cookie").to_str().unwrap().to_string();
    (set.split(';').next().unwrap().to_string(), set)
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

async fn token(admin: &mut cordon_tests::Admin, name: &str, role: pb::Role) -> String {
    let req = pb::CreateAdminTokenRequest {
        name: name.into(),
        role: role.into(),
        reason: "console".into(),
        ..Default::default()
    };
    admin.create_admin_token(req).await.unwrap().into_inner().secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_runs_requests_and_spend_and_guards_its_actions() {
    if let Some(why) = browser_missing() {
        return cordon_tests::skip(
            "the_console_shows_runs_requests_and_spend_and_guards_its_actions",
            &format!("{why}; run scripts/test.sh as root"),
        );
    }
    let server = TestServer::start_configured(|c| c.console_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let console = format!("http://{}", server.control_plane.console_address().expect("the console listens"));
    let mut admin = server.admin().await;
    let llm = FakeLlm::start().await;
    let idp = Idp::start().await;
    let issuer = cordon_tests::oidc::Issuer::start(&["rsa1"]).await;

    let mut create = cordon_tests::tailnet_request("console-demo");
    create.owner = "acme".into();
    create.policy_json = POLICY.into();
    create.upstreams = llm::upstreams(&llm);
    create.labels = [("env".to_string(), "prod".to_string())].into();
    let tailnet = admin.create_tailnet(create).await.unwrap().into_inner();
    let key_req = pb::CreateAuthKeyRequest {
        tailnet_id: tailnet.id.clone(),
        tags: vec!["tag:ci".into()],
        expires_in_seconds: 600,
        reason: XSS.into(),
        ..Default::default()
    };
    let key = admin.create_auth_key(key_req).await.unwrap().into_inner();
    admin.create_trust_rule(issuer.ci_rule(&tailnet.id)).await.unwrap();
    let provider = pb::CreateLoginProviderRequest {
        name: "acme-sso".into(),
        tailnet_id: tailnet.id.clone(),
        issuer: idp.url.clone(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        ..Default::default()
    };
    admin.create_login_provider(provider).await.unwrap();

    // A CI run (run_id 1234567) calls the gateway: once allowed, once with a denied tool whose arguments
    // carry markup. A person (alice, logged in through the IdP) calls it once.
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ci = agentd::NodeConfig::new(&server.url, dirs.0.path());
    ci.oidc_token = Some(cordon_tests::oidc::sign(&issuer.claims("cordon", "acme/api"), "rsa1", "rsa1"));
    ci.tailnet_id = Some(tailnet.id.clone());
    ci.hostname = "runner".into();
    let ci = Arc::new(agentd::Node::start(ci).await.expect("the CI run joins"));
    let mut laptop = agentd::NodeConfig::new(&server.url, dirs.1.path());
    laptop.tailnet_id = Some(tailnet.id.clone());
    laptop.hostname = "laptop".into();
    let approver = idp.clone();
    laptop.login = Some(agentd::LoginHandler(Arc::new(move |prompt: &agentd::LoginPrompt| {
        approver.approve(&prompt.user_code, Person::new("00u-alice", "alice@acme.com", &["engineering"]));
    })));
    let laptop = Arc::new(agentd::Node::start(laptop).await.expect("alice logs in"));
    let client = llm::http_client();
    for (node, text) in
        [(&ci, "hello"), (&ci, "tool:shell.exec <script>alert(1)</script>\"><img onerror=alert(2)>"), (&laptop, "hi")]
    {
        let base = format!("http://{}", cordon_tests::forward(node.clone(), "gateway", 80).await);
        let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]});
        let url = format!("{base}/v1/chat/completions");
        cordon_tests::eventually(Duration::from_secs(20), "the gateway answers", || async {
            llm::request(&client, "POST", &url, Some(&body), &[]).await.ok().filter(|r| r.0 != 502)
        })
        .await;
    }

    let auditor = token(&mut admin, "audit-desk", pb::Role::Auditor).await;
    let operator = token(&mut admin, "ops", pb::Role::Operator).await;

    // The browser.
    let out = tempfile::tempdir().unwrap();
    let shots = std::env::var("CORDON_CONSOLE_SCREENSHOTS").ok();
    let shots_dir = shots.clone().map(std::path::PathBuf::from).unwrap_or_else(|| out.path().to_path_buf());
    std::fs::create_dir_all(&shots_dir).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/console_check.py");
    let mut browser = tokio::process::Command::new("python3")
        .args([script, &console, &auditor, &operator, &tailnet.id, "1234567"])
        .arg(&shots_dir)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python3");
    let mut stdin = browser.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut said = String::new();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            said.push_str(&line);
            said.push('\n');
            if line == "READY live" {
                // Something happens while the page is open.
                cordon_tests::create_key(&mut admin, &tailnet.id, false, false).await;
                stdin.write_all(b"go\n").await.unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("the browser checks end within 2 minutes");
    let status = browser.wait().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut browser.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(status.success(), "the browser checks failed:\n{said}\n{stderr}");
    for check in [
        "tailnets",
        "live events without a reload",
        "run: requests",
        "requests and spend",
        "an operator deletes a node",
    ] {
        assert!(said.lines().any(|l| l.starts_with(&format!("ok {check}"))), "{said}");
    }
    let events = tailnet_events(&mut admin, &tailnet.id).await;
    let left = events.iter().find(|e| e.kind() == pb::EventKind::NodeLeft).expect("the operator's delete is audited");
    assert_eq!((left.actor.as_str(), left.reason.as_str()), ("token:ops", "decommissioned laptop"));

    // Over HTTP: the cookie and the headers.
    let (cookie, set_cookie) = sign_in(&console, &auditor).await;
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let (status, headers, page) =
        http("GET", &format!("{console}/tailnets/{}", tailnet.id), Some(&cookie), None, &[]).await;
    assert_eq!(status, 200);
    let csp = headers.get("content-security-policy").unwrap().to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(headers.get("x-frame-options").unwrap(), "DENY");
    assert!(!page.contains("<script>window"), "markup in data is escaped");

    // An auditor cannot act, even with its CSRF token.
    let node = ci.node_id().to_string();
    let form = |csrf: &str| format!("csrf={}&id={node}&reason=test&back=%2F", cordon_server::console::enc(csrf));
    let (status, _, body) =
        http("POST", &format!("{console}/actions/delete-node"), Some(&cookie), Some(form(&csrf_of(&page))), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("operator"), "the refusal names the role it needs: {body}");

    // An operator's action without the CSRF token, with a wrong one, or from another site is refused.
    let (ops_cookie, _) = sign_in(&console, &operator).await;
    let (_, _, ops_page) =
        http("GET", &format!("{console}/tailnets/{}", tailnet.id), Some(&ops_cookie), None, &[]).await;
    let good = csrf_of(&ops_page);
    for (body, extra) in [
        (format!("id={node}&reason=test"), vec![]),
        (form("not-the-token"), vec![]),
        (form(&good), vec![("origin", "http://evil.example")]),
    ] {
        let (status, _, text) =
            http("POST", &format!("{console}/actions/delete-node"), Some(&ops_cookie), Some(body), &extra).await;
        assert_eq!(status, 403, "{text}");
        assert!(text.contains("CSRF"), "{text}");
    }
    assert!(admin.get_node(pb::GetNodeRequest { id: node.clone() }).await.is_ok(), "the node is still there");

    // No page, asset or header carries a secret.
    let secrets = [server.admin_token.as_str(), &auditor, &operator, llm::KEY, &key.secret, CLIENT_SECRET];
    let mut seen = String::new();
    for path in [
        "/".to_string(),
        format!("/tailnets/{}", tailnet.id),
        format!("/run?tailnet={}&run=1234567", tailnet.id),
        format!("/run?tailnet={}&user=alice%40acme.com", tailnet.id),
        format!("/requests?tailnet={}", tailnet.id),
        "/assets/console.css".into(),
        "/assets/console.js".into(),
        "/login".into(),
    ] {
        let (status, headers, body) = http("GET", &format!("{console}{path}"), Some(&ops_cookie), None, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        seen.push_str(&format!("{headers:?}\n{body}\n"));
    }
    for entry in std::fs::read_dir(&shots_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "html") {
            seen.push_str(&std::fs::read_to_string(&path).unwrap());
            if shots.is_some() {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    for secret in secrets {
        assert!(!seen.contains(secret), "a secret ({} characters) is on a console page", secret.len());
    }
    assert!(seen.contains("alice@acme.com") && seen.contains("shell.exec"), "the pages were read");

    // Signed out, the session is gone.
    let (status, headers, _) = http(
        "POST",
        &format!("{console}/logout"),
        Some(&ops_cookie),
        Some(format!("csrf={}", cordon_server::console::enc(&good))),
        &[],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(headers.get("location").unwrap(), "/login");
    let (status, headers, _) = http("GET", &format!("{console}/"), Some(&ops_cookie), None, &[]).await;
    assert_eq!((status, headers.get("location").unwrap().to_str().unwrap()), (303, "/login"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_tls_the_console_cookie_is_secure() {
    for tool in ["openssl", "curl"] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            let why = format!("{tool} is not installed (scripts/test.sh installs it as root)");
            return cordon_tests::skip("behind_tls_the_console_cookie_is_secure", &why);
        }
    }
    let certs = tempfile::tempdir().unwrap();
    cordon_tests::test_certificates(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("server.pem"), certs.path().join("server.key"));
    let server = TestServer::launch(dir.path(), "127.0.0.1:0", move |c| {
        c.tls = Some(cordon_server::config::Tls { cert, key });
        c.console_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let port = server.control_plane.console_address().unwrap().port();
    let out = tokio::process::Command::new("curl")
        .args(["-si", "--cacert"])
        .arg(certs.path().join("ca.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1"), "--data-urlencode"])
        .arg(format!("token={}", server.admin_token))
        .arg(format!("https://localhost:{port}/login"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let cookie = text.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("a session cookie");
    for flag in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(!text.contains(&server.admin_token), "the token is not echoed");
}
