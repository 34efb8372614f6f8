//! The harness Cordon's end-to-end tests and benchmarks share: a real server on 127.0.0.1:0 over a
//! temporary sled store, authenticated clients, and helpers to make tailnets, keys and nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cordon_proto::v1 as pb;
use cordon_proto::v1::control_client::ControlClient;
use cordon_proto::v1::node_client::NodeClient;
use cordon_server::store::StoreUrl;
use cordon_server::{ControlPlane, Limits, ServeConfig, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use cordon_proto::v1;

pub mod bench;
pub mod idp;
pub mod llm;
pub mod netns;
pub mod oidc;
pub mod pg;

/// Set (to anything but `0`) where every test must run: a test that would skip fails instead. `.ci/run`
/// sets it, so a green CI means the namespace, PostgreSQL and SDK tests ran.
pub const NO_SKIP_VAR: &str = "CORDON_TEST_NO_SKIP";

/// Whether this process runs as root (effective uid 0), read from `/proc` because `unsafe` is forbidden.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Says why a test is skipped, in a form a person scanning the log will see; panics instead when
/// [`NO_SKIP_VAR`] forbids skipping.
pub fn skip(test: &str, reason: &str) {
    if std::env::var(NO_SKIP_VAR).is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!("{test} cannot run here ({reason}), and {NO_SKIP_VAR} forbids skipping it");
    }
    eprintln!("SKIPPED {test}: {reason}");
    println!("SKIPPED {test}: {reason}");
}

/// Sends `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().expect("tokens are ASCII"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = ControlClient<InterceptedService<Channel, Bearer>>;
pub type Nodes = NodeClient<Channel>;

/// A server running in this process on a loopback port, over its own data directory.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub admin_token: String,
    pub data_dir: PathBuf,
    pub control_plane: Arc<ControlPlane>,
    /// Keeps a temporary data directory alive; `None` when the caller owns the directory.
    _temp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server with default limits over a new temporary directory.
    pub async fn start() -> TestServer {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_in(temp.path(), limits).await;
        server._temp = Some(temp);
        server
    }

    /// A server over `dir`, which may hold a previous server's data.
    pub async fn start_in(dir: &Path, limits: Limits) -> TestServer {
        Self::start_at(dir, limits, "127.0.0.1:0").await
    }

    /// A server on all addresses (for hosts in network namespaces), over a temporary directory.
    pub async fn start_public() -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_at(temp.path(), Limits::default(), "0.0.0.0:0").await;
        server._temp = Some(temp);
        server
    }

    /// A server over a temporary directory with its configuration adjusted by `adjust`.
    pub async fn start_configured(adjust: impl FnOnce(&mut ServeConfig)) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Self::launch(temp.path(), "127.0.0.1:0", adjust).await;
        server._temp = Some(temp);
        server
    }

    /// A server over `dir` listening on `listen` (e.g. the address a stopped server had).
    pub async fn start_at(dir: &Path, limits: Limits, listen: &str) -> TestServer {
        Self::launch(dir, listen, |c| c.limits = limits).await
    }

    /// A server over `dir` on `listen`, configured by `adjust` (a restart of a configured server).
    pub async fn launch(dir: &Path, listen: &str, adjust: impl FnOnce(&mut ServeConfig)) -> TestServer {
        // `CORDON_TEST_LOG=debug` shows the server's and the nodes' logs in a test's output.
        if std::env::var_os("CORDON_TEST_LOG").is_some() {
            let filter = cordon_server::cli::log_filter("CORDON_TEST_LOG");
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let mut config = ServeConfig::for_data_dir(dir);
        config.store = test_store(dir).await;
        adjust(&mut config);
        if listen.starts_with("0.0.0.0") {
            config.stun_listen = Some("0.0.0.0:0".parse().expect("valid"));
        }
        config.shutdown_grace = Duration::from_secs(5);
        let mut server = Server::open(config).await.expect("server opens");
        server.bind_console().await.expect("the console binds");
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let mut addr = listener.local_addr().expect("local addr");
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let admin_token = std::fs::read_to_string(dir.join("admin.token")).expect("admin token").trim().to_string();
        let control_plane = server.control_plane.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            url: format!("http://{addr}"),
            admin_token,
            data_dir: dir.to_path_buf(),
            control_plane,
            _temp: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone()).expect("url").connect().await.expect("connect to test server")
    }

    pub async fn admin(&self) -> Admin {
        self.admin_as(&self.admin_token).await
    }

    /// An admin client that presents `token` (one made with CreateAdminToken, say).
    pub async fn admin_as(&self, token: &str) -> Admin {
        ControlClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    pub async fn nodes(&self) -> Nodes {
        NodeClient::new(self.channel().await)
    }

    /// Signals shutdown and waits for the server to drain.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran cleanly");
        }
    }

    /// Stops and returns the data directory for a restart; the caller keeps `TempDir` alive.
    pub async fn stop_keep_dir(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        self.shutdown().await;
        (self.data_dir.clone(), self._temp.take())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A tailnet request with a unique-enough name and an owner.
pub fn tailnet_request(name: &str) -> pb::CreateTailnetRequest {
    pb::CreateTailnetRequest { name: name.into(), owner: "acme".into(), ..Default::default() }
}

pub async fn create_tailnet(admin: &mut Admin, name: &str) -> pb::Tailnet {
    admin.create_tailnet(tailnet_request(name)).await.expect("create tailnet").into_inner()
}

/// Creates an auth key and returns it with its secret.
pub async fn create_key(admin: &mut Admin, tailnet: &str, reusable: bool, ephemeral: bool) -> (pb::AuthKey, String) {
    let r = admin
        .create_auth_key(pb::CreateAuthKeyRequest {
            tailnet_id: tailnet.into(),
            reusable,
            ephemeral,
            tags: vec!["tag:ci".into()],
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .expect("create auth key")
        .into_inner();
    (r.key.expect("key"), r.secret)
}

/// 32 random bytes standing in for a WireGuard public key.
/// A reusable key of `tailnet` that admits nodes with `tags`; returns its secret.
pub async fn tagged_key(admin: &mut Admin, tailnet: &str, tags: &[&str]) -> String {
    let req = pb::CreateAuthKeyRequest {
        tailnet_id: tailnet.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        reusable: true,
        expires_in_seconds: 600,
        ..Default::default()
    };
    admin.create_auth_key(req).await.expect("create key").into_inner().secret
}

pub fn wireguard_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut k[..]);
    k
}

pub fn register_request(secret: &str, hostname: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        credential: Some(pb::register_request::Credential::AuthKey(secret.into())),
        wireguard_public_key: wireguard_key(),
        hostname: hostname.into(),
        requested_tags: vec![],
        endpoints: vec![],
        tailnet_id: String::new(),
    }
}

pub async fn register(nodes: &mut Nodes, secret: &str, hostname: &str) -> pb::RegisterResponse {
    nodes.register(register_request(secret, hostname)).await.expect("register").into_inner()
}

/// A node's netmap stream.
pub type NetMapStream = tonic::Streaming<pb::NetMap>;

pub async fn watch(nodes: &mut Nodes, session_token: &str) -> NetMapStream {
    nodes
        .watch_net_map(pb::WatchNetMapRequest { session_token: session_token.into(), ..Default::default() })
        .await
        .expect("watch netmap")
        .into_inner()
}

/// The next netmap message, failing the test if none arrives within 10 seconds.
pub async fn next_netmap(stream: &mut NetMapStream) -> pb::NetMap {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a netmap message within 10 s")
        .expect("stream healthy")
        .expect("stream still open")
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the `cordon` binary is: `$CORDON_BIN`, or in this test's target directory.
pub fn cordon_bin() -> PathBuf {
    workspace_bin("cordon", "CORDON_BIN")
}

/// Where the `agentd` binary is: `$AGENTD_BIN`, or in this test's target directory.
/// Runs the `cordon` binary with `args`, writing `stdin` to it; returns what it did. `CORDON_TOKEN` is
/// removed so that only the credential in `args` counts.
pub async fn run_cordon(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = tokio::process::Command::new(cordon_bin())
        .args(args)
        .env_remove("CORDON_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cordon");
    let mut input = child.stdin.take().expect("piped stdin");
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes()).await.expect("write cordon's stdin");
    drop(input);
    child.wait_with_output().await.expect("cordon exits")
}

pub fn agentd_bin() -> PathBuf {
    workspace_bin("agentd", "AGENTD_BIN")
}

fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// Reads the resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Two in-process agentd nodes, `alpha` and `beta`, in a new tailnet of `server`, each knowing the other.
pub struct NodePair {
    pub a: agentd::Node,
    pub b: agentd::Node,
    pub tailnet: pb::Tailnet,
    pub secret: String,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Starts a [`NodePair`]; with `advertise`, both claim that endpoint instead of their real one.
pub async fn node_pair(server: &TestServer, name: &str, advertise: Option<&str>) -> NodePair {
    let mut admin = server.admin().await;
    let tailnet = create_tailnet(&mut admin, name).await;
    let (_, secret) = create_key(&mut admin, &tailnet.id, true, false).await;
    let dirs = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
    let start = |dir: &Path, hostname: &str| {
        let mut config = agentd::NodeConfig::new(&server.url, dir);
        config.auth_key = Some(secret.clone());
        config.hostname = hostname.into();
        config.advertise = advertise.map(|a| vec![a.parse().expect("an ip:port")]).unwrap_or_default();
        agentd::Node::start(config)
    };
    let a = start(dirs.0.path(), "alpha").await.expect("alpha starts");
    let b = start(dirs.1.path(), "beta").await.expect("beta starts");
    for node in [&a, &b] {
        let mut netmap = node.netmap();
        tokio::time::timeout(Duration::from_secs(10), netmap.wait_for(|m| m.peers.len() == 1))
            .await
            .expect("the nodes see each other within 10 s")
            .expect("netmap watch");
    }
    NodePair { a, b, tailnet, secret, _dirs: dirs }
}

/// Echoes whatever arrives on `port` of `node`.
pub async fn echo(node: &agentd::Node, port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut listener = node.listen(port).await.expect("listen");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Forwards a loopback port to `host:port` on the tailnet through `node` (what `agentd up --forward`
/// does), so that ordinary clients (SDKs, HTTP libraries) reach the tailnet. Returns the local address.
pub async fn forward(node: Arc<agentd::Node>, host: &str, port: u16) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let host = host.to_string();
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let node = node.clone();
            let host = host.clone();
            tokio::spawn(async move {
                let _ = local.set_nodelay(true);
                if let Ok(mut remote) = node.dial_host(&host, port).await {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
            });
        }
    });
    addr
}

/// `n` servers in this process over one new PostgreSQL database (replicas of one deployment), without
/// STUN, so that nodes advertising an unreachable endpoint meet only through the relay. `None` after a
/// skip when PostgreSQL is missing.
pub async fn replicas(n: usize, test: &str) -> Option<Vec<TestServer>> {
    let db = pg::database(test).await?;
    let mut out = Vec::new();
    for _ in 0..n {
        let db = db.clone();
        out.push(
            TestServer::start_configured(move |c| {
                c.store = Some(StoreUrl::Postgres(db));
                c.stun_listen = None;
            })
            .await,
        );
    }
    Some(out)
}

/// The first thousand audit events of a tailnet.
pub async fn tailnet_events(admin: &mut Admin, tailnet: &str) -> Vec<pb::Event> {
    let request = pb::ListAuditEventsRequest { tailnet_id: tailnet.into(), page_size: 1000, ..Default::default() };
    admin.list_audit_events(request).await.expect("list audit events").into_inner().events
}

/// Which engine test servers use: `CORDON_TEST_STORE=postgres` runs them on PostgreSQL, otherwise on
/// sled in their data directory.
pub const STORE_VAR: &str = "CORDON_TEST_STORE";

/// Whether this run's test servers use PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var(STORE_VAR).is_ok_and(|v| v == "postgres")
}

/// The store of a test server over `dir`: `None` (sled in `dir`) or, with `CORDON_TEST_STORE=postgres`,
/// a PostgreSQL database of its own, remembered in `dir` so a restart over `dir` finds the same data.
pub async fn test_store(dir: &Path) -> Option<StoreUrl> {
    if !on_postgres() {
        return None;
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).expect("create the data directory");
    let marker = dir.join("test-postgres.url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return Some(StoreUrl::Postgres(url));
    }
    let url = pg::database("test_server")
        .await
        .unwrap_or_else(|| panic!("{STORE_VAR}=postgres, but PostgreSQL is not available"));
    std::fs::write(&marker, &url).expect("write the test store marker");
    Some(StoreUrl::Postgres(url))
}

/// `store` as `--store` takes it.
pub fn store_arg(store: &StoreUrl) -> String {
    match store {
        StoreUrl::Sled(dir) => format!("sled:{}", dir.display()),
        StoreUrl::Postgres(url) => url.clone(),
    }
}

/// A real `cordon serve` process on an OS-chosen loopback port, logging at debug level to a file.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub url: String,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `cordon serve` and waits for it to say where it listens.
    pub async fn spawn(data_dir: &Path, log: &Path) -> ServerProcess {
        let store = test_store(data_dir).await.map(|s| format!("--store={}", store_arg(&s)));
        Self::spawn_with(data_dir, log, store.as_slice()).await
    }

    /// As [`ServerProcess::spawn`], with more arguments (another `--store`, say).
    pub async fn spawn_with(data_dir: &Path, log: &Path, args: &[String]) -> ServerProcess {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = tokio::process::Command::new(cordon_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("CORDON_LOG", "debug")
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cordon serve");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("serving gRPC on ").nth(1) {
                    return rest.split_whitespace().next().unwrap().to_string();
                }
            }
            panic!("cordon serve exited before listening; see {}", log.display());
        })
        .await
        .expect("cordon serve starts within 30 s");
        ServerProcess { child, url, log: log.to_path_buf() }
    }
}

/// A CA, and a server certificate it signs for `localhost` only, in `dir`.
pub fn test_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Cordon test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
}

/// A real `agentd up` process joined with `secret` and forwarding a loopback port to `gateway:80`,
/// logging to `log` (with `env` added); returns it and `http://127.0.0.1:PORT` once the gateway answers
/// through it.
pub async fn agentd_gateway_forward(
    server: &str,
    secret: &str,
    hostname: &str,
    state: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut agent = tokio::process::Command::new(agentd_bin())
        .args(["up", "--server", server, "--hostname", hostname])
        .args(["--forward", &format!("127.0.0.1:{port}=gateway:80")])
        .arg("--state-dir")
        .arg(state)
        .env("AGENTD_AUTH_KEY", secret)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(agent.stdout.take().unwrap()));
    tokio::time::timeout(Duration::from_secs(20), out.next_line()).await.unwrap().unwrap();
    let client = llm::http_client();
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(20), "the gateway answers through agentd", || async {
        llm::request(&client, "GET", &format!("{base}/v1/models"), None, &[]).await.ok().filter(|r| r.0 == 200)
    })
    .await;
    (agent, base)
}
