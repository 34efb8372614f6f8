//! The operators' toolkit: `/metrics` on the server and on agentd, moved by the right amounts by joins,
//! gateway calls (on the server's UDP port); `--log-format json` from both binaries, every line JSON and none
//! holding a secret; and the CLI's newer subcommands end to end with `--json`.

use std::process::{Output, Stdio};
use std::time::Duration;

use cordon_tests::llm::{self, FakeLlm};
use cordon_tests::*;
use serde_json::{Value, json};

const POLICY: &str = r#"{
  "tagOwners": { "tag:ci": [] },
  "grants": [
    { "src": ["tag:ci"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"] }] } }
  ],
  "tests": [ { "src": "tag:ci", "accept": ["gateway:80"], "deny": ["gateway:22"] } ]
}"#;

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

async fn scrape(addr: &str) -> String {
    let client = llm::http_client();
    let (status, headers, body) =
        llm::request(&client, "GET", &format!("http://{addr}/metrics"), None, &[]).await.expect("scrape");
    assert_eq!(status, 200, "{body}");
    let content_type = headers.get("content-type").unwrap().to_str().unwrap();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The sum of the series of `name` whose labels include every `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').map_or((series, ""), |(n, r)| (n, r));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_metrics_count_calls_nodes_relay_and_gateway_requests() {
    let server = TestServer::start_configured(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = eventually(Duration::from_secs(10), "the metrics listener is bound", || async {
        server.control_plane.metrics_address()
    })
    .await
    .to_string();
    let before = scrape(&addr).await;
    assert_eq!(value(&before, "cordon_gateway_requests_total", &[]), 0.0);

    let llm = FakeLlm::start().await;
    let joined = llm::join_with_gateway(&server, &llm, "metered", POLICY, &["tag:ci"]).await;
    let client = llm::http_client();
    let calls = 3;
    for _ in 0..calls {
        let (status, _, body) =
            llm::request(&client, "POST", &format!("{}/v1/chat/completions", joined.base), Some(&chat()), &[])
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let mut admin = server.admin().await;
    let bad = admin.get_tailnet(v1::GetTailnetRequest { id: "not-an-id".into() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let tailnet = joined.tailnet.id.as_str();
    // The audit writer's commit is what releases each response's last byte, so every request counted.
    let after = scrape(&addr).await;
    let allowed = [("tailnet", tailnet), ("api", "chat.completions"), ("decision", "allowed")];
    assert_eq!(value(&after, "cordon_gateway_requests_total", &allowed), f64::from(calls), "{after}");
    let input = [("tailnet", tailnet), ("direction", "input")];
    let output = [("tailnet", tailnet), ("direction", "output")];
    assert_eq!(value(&after, "cordon_gateway_tokens_total", &input), (calls as u64 * llm::INPUT) as f64);
    assert_eq!(value(&after, "cordon_gateway_tokens_total", &output), (calls as u64 * llm::OUTPUT) as f64);
    let chats = [("api", "chat.completions")];
    assert_eq!(value(&after, "cordon_gateway_request_duration_seconds_count", &chats), f64::from(calls));
    assert_eq!(value(&after, "cordon_audit_queue_depth", &[]), 0.0, "{after}");

    let ok = |method: &str| value(&after, "cordon_grpc_requests_total", &[("method", method), ("code", "OK")]);
    assert_eq!(ok("Control/CreateTailnet"), 1.0, "{after}");
    assert_eq!(ok("Control/CreateAuthKey"), 1.0);
    assert_eq!(ok("Node/Register"), 1.0);
    let invalid = [("method", "Control/GetTailnet"), ("code", "INVALID_ARGUMENT")];
    assert_eq!(value(&after, "cordon_grpc_requests_total", &invalid), 1.0);
    assert!(value(&after, "cordon_store_commit_duration_seconds_count", &[]) >= 3.0, "{after}");

    // The gateway is reached on a direct path, through the server's UDP port: its datagrams are counted there.
    let routed = [("result", "routed")];
    assert!(value(&after, "cordon_gateway_udp_datagrams_total", &routed) >= f64::from(calls), "{after}");
    assert_eq!(value(&after, "cordon_tailnets", &[]), 1.0);
    assert_eq!(value(&after, "cordon_nodes", &[("state", "online")]), 1.0, "{after}");
    assert_eq!(value(&after, "cordon_nodes", &[("state", "offline")]), 0.0);
    assert_eq!(value(&after, "cordon_watch_streams", &[("kind", "netmap")]), 1.0);
    assert_eq!(value(&after, "cordon_watch_streams", &[("kind", "relay")]), 1.0);
    assert!(!after.contains(&joined.node.status().await.node_id), "no node id is a label");

    // The node's own counters, as `agentd up --metrics-listen` serves them.
    let node = agentd::metrics::render(None, agentd::metrics::node_sample(&joined.node.status().await));
    let direct_tx = [("path", "direct"), ("direction", "tx")];
    assert!(value(&node, "agentd_wireguard_packets_total", &direct_tx) >= f64::from(calls), "{node}");
    assert!(value(&node, "agentd_wireguard_bytes_total", &[("path", "direct"), ("direction", "rx")]) > 0.0);
    assert!(value(&node, "agentd_handshakes_total", &[]) >= 1.0);
    assert_eq!(value(&node, "agentd_up", &[]), 1.0);

    let (status, _, _) =
        llm::request(&client, "GET", &format!("http://{addr}/other"), None, &[]).await.expect("a 404 answer");
    assert_eq!(status, 404);
    server.stop().await;
}

async fn cordon(server: &TestServer, args: &[&str], stdin: Option<&str>) -> Output {
    let data_dir = server.data_dir.to_str().unwrap();
    let args = [args, &["--server", &server.url, "--data-dir", data_dir]].concat();
    cordon_tests::run_cordon(&args, stdin.unwrap_or("")).await
}

async fn json_of(server: &TestServer, args: &[&str], stdin: Option<&str>) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = cordon(server, &with_json, stdin).await;
    assert!(out.status.success(), "cordon {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cordon {args:?}: {e}: {:?}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reaches_trust_rules_upstreams_nodes_policy_history_and_relay_stats() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let v1_file = dir.path().join("v1.json");
    let v2_file = dir.path().join("v2.json");
    let bad_file = dir.path().join("bad.json");
    std::fs::write(&v1_file, POLICY).unwrap();
    std::fs::write(&v2_file, POLICY.replace("\"openai/gpt-*\"", "\"openai/gpt-4o-mini\"")).unwrap();
    std::fs::write(&bad_file, POLICY.replace("\"deny\": [\"gateway:22\"]", "\"deny\": [\"gateway:80\"]")).unwrap();
    let v1_path = v1_file.to_str().unwrap();
    let t = json_of(&server, &["tailnet", "create", "ops", "--owner", "acme", "--policy", v1_path], None).await;
    let id = t["id"].as_str().unwrap();

    // Trust rules.
    let rule = json_of(
        &server,
        &[
            "trust",
            "create",
            "--tailnet",
            id,
            "--issuer",
            "https://token.example",
            "--audience",
            "cordon",
            "--claim",
            "repository=acme/*",
            "--tag",
            "tag:ci",
            "--max-node-lifetime",
            "2h",
            "--reason",
            "CI",
        ],
        None,
    )
    .await;
    assert_eq!(rule["claim_conditions"]["repository"], "acme/*");
    assert_eq!(rule["max_node_lifetime_seconds"], 7200);
    let rules = json_of(&server, &["trust", "list", "--tailnet", id], None).await;
    assert_eq!(rules[0]["id"], rule["id"]);
    json_of(&server, &["trust", "delete", rule["id"].as_str().unwrap()], None).await;
    assert_eq!(json_of(&server, &["trust", "list", "--tailnet", id], None).await, json!([]));

    // Upstreams: the key comes from standard input and never comes back.
    let key = "sk-cli-upstream-SECRET-4242";
    let set = ["upstream", "set", "--tailnet", id, "openai", "--kind", "openai"];
    let set = [&set[..], &["--base-url", "https://api.openai.example/v1", "--api-key-file", "-"]].concat();
    let out = cordon(&server, &[&set[..], &["--json"]].concat(), Some(&format!("{key}\n"))).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains(key), "{stdout}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["api_key_set"], true);
    let ups = json_of(&server, &["upstream", "list", "--tailnet", id], None).await;
    assert_eq!((ups[0]["name"].as_str(), ups[0]["kind"].as_str()), (Some("openai"), Some("openai")));
    let missing =
        cordon(&server, &[&set[..7], &["--base-url", "https://x.example", "--api-key-file", "/nope"]].concat(), None)
            .await;
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("--api-key-file") && err.lines().count() == 1, "{err}");

    // Node show.
    let secret = json_of(&server, &["key", "create", "--tailnet", id, "--tag", "tag:ci"], None).await["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut nodes = server.nodes().await;
    let node = register(&mut nodes, &secret, "runner").await.node.unwrap();
    let shown = json_of(&server, &["node", "show", &node.id], None).await;
    assert_eq!((shown["hostname"].as_str(), shown["tags"][0].as_str()), (Some("runner"), Some("tag:ci")));
    assert_eq!(shown["addresses"][0], node.addresses[0]);
    let gone = cordon(&server, &["node", "show", "00000000-0000-7000-8000-000000000000"], None).await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"), "{gone:?}");

    // Policy: a dry run stores nothing; history and diff show the versions.
    let tested = json_of(&server, &["policy", "test", "--tailnet", id, v2_file.to_str().unwrap()], None).await;
    assert_eq!((tested["valid"].as_bool(), tested["tests_passed"].as_u64()), (Some(true), Some(1)));
    let failed = cordon(&server, &["policy", "test", bad_file.to_str().unwrap()], None).await;
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && err.contains("tests[0]"), "{err}");
    let history = json_of(&server, &["policy", "history", "--tailnet", id], None).await;
    assert_eq!(history["versions"].as_array().unwrap().len(), 1, "a dry run stores no version: {history}");
    json_of(&server, &["policy", "set", "--tailnet", id, v2_file.to_str().unwrap(), "--reason", "pin model"], None)
        .await;
    let history = json_of(&server, &["policy", "history", "--tailnet", id], None).await;
    assert_eq!(history["current_version"], 2);
    assert_eq!(history["versions"][1]["reason"], "pin model");
    assert_eq!(history["versions"][1]["current"], true);
    let diff = json_of(&server, &["policy", "diff", "--tailnet", id], None).await;
    let text = diff["diff"].as_str().unwrap();
    assert!(
        text.contains("-      \"app\": { \"cordon.dev/cap/ai\": [{ \"models\": [\"openai/gpt-*\"] }] } }"),
        "{text}"
    );
    assert!(
        text.contains("+      \"app\": { \"cordon.dev/cap/ai\": [{ \"models\": [\"openai/gpt-4o-mini\"] }] } }"),
        "{text}"
    );
    let same = json_of(&server, &["policy", "diff", "--tailnet", id, "--file", v2_file.to_str().unwrap()], None).await;
    assert_eq!(same["changed"], false, "{same}");

    // Relay stats and completions.
    let stats = json_of(&server, &["relay", "stats"], None).await;
    assert!(stats["forwarded_frames"].is_u64() && stats["dropped_unknown_peer"].is_u64(), "{stats}");
    let out = tokio::process::Command::new(cordon_bin()).args(["completions", "bash"]).output().await.unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("_cordon") && script.contains("upstream"), "{script}");
    server.stop().await;
}

/// Every line of a log file, parsed; panics naming a line that is not a JSON object with the stable
/// fields.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line:?}\n{text}", path.display()));
            for field in ["timestamp", "level", "target"] {
                assert!(v.get(field).is_some(), "no {field}: {line}");
            }
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_of_both_binaries_parse_and_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server_log = dir.path().join("server.log");
    let mut server = tokio::process::Command::new(cordon_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(test_store(&dir.path().join("data")).await.map(|s| format!("--store={}", store_arg(&s))))
        .env("CORDON_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&server_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(server.stdout.take().unwrap()));
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("serving gRPC on ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("cordon serve exited; see {}", server_log.display());
    })
    .await
    .expect("cordon serve starts");
    let admin_token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap().trim().to_string();
    let run = |args: Vec<String>, stdin: String| {
        let url = url.clone();
        let token = admin_token.clone();
        async move {
            let mut child = tokio::process::Command::new(cordon_bin())
                .args(&args)
                .args(["--server", &url, "--token", &token, "--json"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes()).await.unwrap();
            drop(input);
            let out = child.wait_with_output().await.unwrap();
            assert!(out.status.success(), "cordon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let llm = FakeLlm::start().await;
    let policy = dir.path().join("policy.json");
    std::fs::write(&policy, POLICY).unwrap();
    let t =
        run(s(&["tailnet", "create", "logged", "--owner", "acme", "--policy", policy.to_str().unwrap()]), "".into())
            .await;
    let id = t["id"].as_str().unwrap().to_string();
    let upstream = s(&["upstream", "set", "--tailnet", &id, "openai", "--kind", "openai", "--api-key-file", "-"]);
    run([upstream, s(&["--base-url", &llm.openai_url()])].concat(), llm::KEY.into()).await;
    let key = run(s(&["key", "create", "--tailnet", &id, "--tag", "tag:ci"]), "".into()).await;
    let secret = key["secret"].as_str().unwrap().to_string();
    // An admin token and a webhook secret: neither may reach a log line either.
    let token = run(s(&["token", "create", "logger-bot", "--role", "auditor", "--owner", "acme"]), "".into()).await;
    let token_secret = token["secret"].as_str().unwrap().to_string();
    let webhook_secret = "whsec-logged-0123456789";
    let hook = s(&["webhook", "create", "http://127.0.0.1:9/hook", "--tailnet", &id, "--secret-file", "-"]);
    run(hook, webhook_secret.into()).await;

    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let agent_log = dir.path().join("agentd.log");
    let env = [("AGENTD_LOG", "debug"), ("AGENTD_LOG_FORMAT", "json"), ("AGENTD_METRICS_LISTEN", metrics.as_str())];
    let (mut agent, base) =
        agentd_gateway_forward(&url, &secret, "logger", &dir.path().join("agent"), &agent_log, &env).await;
    let client = llm::http_client();
    let (status, _, body) =
        llm::request(&client, "POST", &format!("{base}/v1/chat/completions"), Some(&chat()), &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let scraped = scrape(&metrics).await;
    assert!(value(&scraped, "agentd_handshakes_total", &[]) >= 1.0, "{scraped}");
    assert!(value(&scraped, "agentd_wireguard_packets_total", &[("direction", "tx")]) >= 1.0, "{scraped}");
    assert_eq!(value(&scraped, "agentd_up", &[]), 1.0);

    let session = std::fs::read_dir(dir.path().join("agent"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .find_map(|text| serde_json::from_str::<Value>(&text).ok()?.get("session_token")?.as_str().map(str::to_string))
        .expect("agentd saved its session");
    for child in [&mut agent, &mut server] {
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits on SIGTERM").unwrap();
    }
    let mut secrets =
        vec![admin_token.clone(), secret.clone(), llm::KEY.to_string(), token_secret, webhook_secret.to_string()];
    secrets.push(session);
    for log in [&server_log, &agent_log] {
        let lines = json_lines(log);
        assert!(lines.len() > 5, "{} has {} lines", log.display(), lines.len());
        assert!(lines.iter().any(|l| l["level"] == "DEBUG"), "debug lines are there to check");
        let text = std::fs::read_to_string(log).unwrap();
        for secret in &secrets {
            let prefix = &secret[..secret.len().min(24)];
            assert!(!text.contains(prefix), "{} holds a secret ({prefix}...)", log.display());
        }
    }
    let server_lines = json_lines(&server_log);
    assert!(
        server_lines.iter().any(|l| l["message"] == "store open" && l["store"].is_string()),
        "fields are at the top level by name"
    );
}
