//! The `cordon` command line: `serve`, and the admin commands that talk to a running server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cordon_proto::v1 as pb;
use cordon_proto::v1::control_client::ControlClient;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN, ServeArgs, ServeConfig};
use crate::serve::Server;
use crate::store::{Store, StoreUrl};
use crate::time::parse_duration;

#[derive(Parser)]
#[command(name = "cordon", version, about = "Private networks on demand, each with its own AI gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Create, list, show and delete tailnets.
    Tailnet {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TailnetCommand,
    },
    /// Create, list and revoke auth keys.
    Key {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Set and read a tailnet's policy.
    Policy {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List and delete nodes.
    Node {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Follow events as they happen (Ctrl-C to stop).
    Events {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this tailnet's events.
        #[arg(long)]
        tailnet: Option<String>,
        /// Replay stored events after this revision first.
        #[arg(long, default_value_t = 0)]
        since_revision: u64,
    },
    /// Read the audit log.
    Audit {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Move the records of a stopped server from one store to another.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every record (tailnets, nodes and their sessions, keys, trust rules, policy versions,
    /// upstream keys, audit events) into an empty store. Stop the server first.
    Copy {
        /// The store to read, e.g. sled:./cordon-data/store.
        #[arg(long)]
        from: String,
        /// The empty store to write, e.g. postgres://cordon@db.example/cordon.
        #[arg(long)]
        to: String,
    },
}

/// How to reach the server.
#[derive(clap::Args)]
struct ClientArgs {
    /// Server URL (https:// for TLS).
    #[arg(long, global = true, env = "CORDON_SERVER", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    server: String,
    /// Admin token; default: read from <data-dir>/admin.token.
    #[arg(long, global = true, env = "CORDON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's data directory, to read the admin token from.
    #[arg(long, global = true, env = "CORDON_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// CA certificate (PEM) to verify the server's TLS certificate.
    #[arg(long, global = true, env = "CORDON_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum TailnetCommand {
    /// Create a tailnet.
    Create {
        /// DNS label, e.g. run-4711.
        name: String,
        #[arg(long)]
        owner: String,
        /// Time to live (e.g. 2h, 7d); 0 or absent = persistent.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Label key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// IPv4 range; default 100.64.0.0/10.
        #[arg(long)]
        cidr: Option<String>,
        /// A policy file (JSON, comments allowed); default: every node may reach every other.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List tailnets.
    List {
        #[arg(long)]
        owner: Option<String>,
        /// Label selector, e.g. env=prod,!spot.
        #[arg(long, short = 'l')]
        selector: Option<String>,
    },
    /// Show one tailnet.
    Get { id: String },
    /// Delete a tailnet: revokes its nodes and keys, keeps its audit log.
    Delete {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an auth key; prints the secret once.
    Create {
        #[arg(long)]
        tailnet: String,
        /// tag:name (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// Expiry, e.g. 1h (default) or 7d.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Admit at most N nodes (reusable keys).
        #[arg(long, default_value_t = 0)]
        max_uses: u32,
        #[arg(long, default_value = "")]
        reason: String,
        /// Owner of the nodes it admits; default the tailnet's owner.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List a tailnet's keys (never their secrets).
    List {
        #[arg(long)]
        tailnet: String,
    },
    /// Revoke a key and the nodes it admitted.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Keep the nodes the key admitted.
        #[arg(long)]
        keep_nodes: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate and store a new version (JSON, comments allowed).
    Set {
        #[arg(long)]
        tailnet: String,
        /// The policy file.
        file: PathBuf,
        #[arg(long, default_value = "")]
        reason: String,
        /// Who wrote it; default the admin token's actor.
        #[arg(long, default_value = "")]
        author: String,
    },
    /// Print the current version, or `--version N`.
    Get {
        #[arg(long)]
        tailnet: String,
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List a tailnet's nodes.
    List {
        #[arg(long)]
        tailnet: String,
    },
    /// Delete (revoke) a node.
    Delete {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List audit events, oldest first.
    List {
        #[arg(long)]
        tailnet: Option<String>,
        #[arg(long)]
        node: Option<String>,
    },
    /// Write every audit event of a tailnet as JSON lines.
    Export {
        #[arg(long)]
        tailnet: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Store { command: StoreCommand::Copy { from, to } } => store_copy(&from, &to).await,
        Command::Tailnet { client, command } => tailnet(&client, command).await,
        Command::Key { client, command } => key(&client, command).await,
        Command::Node { client, command } => node(&client, command).await,
        Command::Policy { client, command } => policy(&client, command).await,
        Command::Events { client, tailnet, since_revision } => events(&client, tailnet, since_revision).await,
        Command::Audit { client, command } => audit(&client, command).await,
    }
}

async fn store_copy(from: &str, to: &str) -> anyhow::Result<()> {
    let from = StoreUrl::parse(from).context("--from")?;
    let to = StoreUrl::parse(to).context("--to")?;
    if from == to {
        anyhow::bail!("--from and --to name the same store");
    }
    let options = crate::store::StoreOptions::default();
    let hub = || std::sync::Arc::new(crate::hub::Hub::default());
    let source = Store::open(&from, &options, hub()).await.with_context(|| format!("cannot open {from}"))?;
    let target = Store::open(&to, &options, hub()).await.with_context(|| format!("cannot open {to}"))?;
    let copied = crate::domain::copy_store(&source, &target).await?;
    println!("copied {from} to {to}:");
    for (kind, n) in copied.rows() {
        println!("  {n:>8} {kind}");
    }
    Ok(())
}

/// The log filter `var` names (default `info`). The PostgreSQL driver logs every statement's
/// parameters at DEBUG, upstream keys and token hashes among them: it never logs below INFO.
pub fn log_filter(var: &str) -> tracing_subscriber::EnvFilter {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env(var).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    filter.add_directive("tokio_postgres=info".parse().expect("a valid directive"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(log_filter("CORDON_LOG")).with_writer(std::io::stderr).init();
    let config = ServeConfig::resolve(args)?;
    let listen = config.listen;
    let tls = config.tls.is_some();
    let server = Server::open(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    let token_path = server.config.data_dir.join(crate::admin::TOKEN_FILE);
    match &server.admin_token_created {
        Some(path) => println!("cordon: wrote a new admin token to {} (mode 0600)", path.display()),
        None => println!("cordon: admin token in {}", token_path.display()),
    }
    println!("cordon: serving gRPC on {scheme}://{addr} (data in {})", server.config.data_dir.display());
    server.serve(listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

type Admin = ControlClient<InterceptedService<Channel, BearerToken>>;

#[derive(Clone)]
struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

impl ClientArgs {
    async fn connect(&self) -> anyhow::Result<Admin> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = self.data_dir.join(crate::admin::TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("cannot read the admin token from {} (give --token or --data-dir)", path.display())
                    })?
                    .trim()
                    .to_string()
            }
        };
        let header = MetadataValue::try_from(format!("Bearer {token}")).context("the admin token is not ASCII")?;
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .with_context(|| format!("{:?} is not a server URL like http://127.0.0.1:7443", self.server))?
            .connect_timeout(Duration::from_secs(5));
        if self.server.starts_with("https://") {
            // The system's trust store, plus a private CA when given.
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &self.ca_cert {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach cordon at {} (is `cordon serve` running?)", self.server))?;
        Ok(ControlClient::with_interceptor(channel, BearerToken(header)))
    }
}

/// Turns a gRPC status into an error that shows its code and message.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn time(ts: &Option<prost_types::Timestamp>) -> String {
    match ts {
        Some(t) => crate::time::rfc3339(UNIX_EPOCH + Duration::from_secs(t.seconds.max(0) as u64)),
        None => "-".into(),
    }
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn tailnet_json(t: &pb::Tailnet) -> Value {
    json!({
        "id": t.id, "name": t.name, "owner": t.owner, "labels": t.labels, "cidr": t.cidr,
        "gateway_address": t.gateway_address, "created_at": time(&t.created_at),
        "expires_at": t.expires_at.as_ref().map(|_| time(&t.expires_at)), "ttl_seconds": t.ttl_seconds,
        "created_by": t.created_by, "node_count": t.node_count,
    })
}

fn key_json(k: &pb::AuthKey) -> Value {
    json!({
        "id": k.id, "tailnet_id": k.tailnet_id, "tags": k.tags, "reusable": k.reusable, "ephemeral": k.ephemeral,
        "max_uses": k.max_uses, "uses": k.uses, "state": k.state, "created_at": time(&k.created_at),
        "expires_at": time(&k.expires_at), "reason": k.reason, "created_by": k.created_by, "owner": k.owner,
    })
}

fn node_json(n: &pb::NodeInfo) -> Value {
    json!({
        "id": n.id, "tailnet_id": n.tailnet_id, "hostname": n.hostname, "addresses": n.addresses, "tags": n.tags,
        "owner": n.owner, "ephemeral": n.ephemeral, "online": n.online, "created_at": time(&n.created_at),
        "expires_at": time(&n.expires_at), "last_seen": n.last_seen.as_ref().map(|_| time(&n.last_seen)),
        "auth_key_id": n.admission.as_ref().map(|a| a.auth_key_id.clone()),
        "wireguard_public_key": hex::encode(&n.wireguard_public_key),
    })
}

fn event_kind_name(kind: i32) -> String {
    pb::EventKind::try_from(kind)
        .map(|k| k.as_str_name().trim_start_matches("EVENT_KIND_").to_ascii_lowercase().replace('_', "."))
        .unwrap_or_else(|_| kind.to_string())
}

fn event_json(e: &pb::Event) -> Value {
    let mut v = json!({
        "id": e.id, "revision": e.revision, "time": time(&e.time), "kind": event_kind_name(e.kind),
        "tailnet_id": e.tailnet_id, "node_id": e.node_id, "auth_key_id": e.auth_key_id, "actor": e.actor,
        "reason": e.reason, "summary": e.summary,
    });
    if let Some(run) = &e.run {
        v["run"] = json!({"issuer": run.issuer, "subject": run.subject, "claims": run.claims});
    }
    if let Some(g) = &e.gateway {
        let tools: Vec<Value> = g
            .tool_calls
            .iter()
            .map(|t| json!({"name": t.name, "arguments": t.arguments, "blocked": t.blocked}))
            .collect();
        v["gateway"] = json!({
            "request_id": g.request_id, "api": g.api, "model": g.model, "upstream": g.upstream,
            "upstream_model": g.upstream_model, "status": g.status, "decision": g.decision, "rule": g.rule,
            "message": g.message, "stream": g.stream, "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens, "cached_tokens": g.cached_tokens, "tool_calls": tools,
            "latency_us": g.latency_us, "ttfb_us": g.ttfb_us, "hostname": g.hostname, "tags": g.tags,
            "owner": g.owner, "request_body": g.request_body, "response_body": g.response_body,
        });
    }
    v
}

fn tailnet_rows(tailnets: &[pb::Tailnet]) -> Vec<Vec<String>> {
    tailnets
        .iter()
        .map(|t| {
            let labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                t.id.clone(),
                t.name.clone(),
                t.owner.clone(),
                t.cidr.clone(),
                t.node_count.to_string(),
                t.expires_at.as_ref().map_or("never".into(), |_| time(&t.expires_at)),
                labels.join(","),
            ]
        })
        .collect()
}

const TAILNET_HEADERS: [&str; 7] = ["ID", "NAME", "OWNER", "CIDR", "NODES", "EXPIRES", "LABELS"];

async fn tailnet(client: &ClientArgs, command: TailnetCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    match command {
        TailnetCommand::Create { name, owner, ttl, labels, cidr, policy } => {
            let t = admin
                .create_tailnet(pb::CreateTailnetRequest {
                    name,
                    owner,
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
                    labels: labels.into_iter().collect(),
                    cidr: cidr.unwrap_or_default(),
                    upstreams: vec![],
                    policy_json: match &policy {
                        Some(path) => std::fs::read_to_string(path)
                            .with_context(|| format!("cannot read the policy file {}", path.display()))?,
                        None => String::new(),
                    },
                })
                .await
                .map_err(status)?
                .into_inner();
            if client.json {
                println!("{}", tailnet_json(&t));
            } else {
                print_table(&TAILNET_HEADERS, tailnet_rows(&[t]));
            }
        }
        TailnetCommand::List { owner, selector } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_tailnets(pb::ListTailnetsRequest {
                        owner: owner.clone().unwrap_or_default(),
                        label_selector: selector.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.tailnets);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if client.json {
                println!("{}", Value::Array(all.iter().map(tailnet_json).collect()));
            } else {
                print_table(&TAILNET_HEADERS, tailnet_rows(&all));
            }
        }
        TailnetCommand::Get { id } => {
            let t = admin.get_tailnet(pb::GetTailnetRequest { id }).await.map_err(status)?.into_inner();
            if client.json {
                println!("{}", tailnet_json(&t));
            } else {
                let v = tailnet_json(&t);
                for (k, v) in v.as_object().expect("object") {
                    println!("{k:<16} {}", v.as_str().map_or_else(|| v.to_string(), str::to_string));
                }
            }
        }
        TailnetCommand::Delete { id, reason } => {
            let r = admin.delete_tailnet(pb::DeleteTailnetRequest { id: id.clone(), reason }).await.map_err(status)?;
            let r = r.into_inner();
            if client.json {
                println!("{}", json!({"id": id, "nodes_revoked": r.nodes_revoked, "keys_deleted": r.keys_deleted}));
            } else {
                println!("deleted tailnet {id}: {} nodes revoked, {} keys deleted", r.nodes_revoked, r.keys_deleted);
            }
        }
    }
    Ok(())
}

async fn key(client: &ClientArgs, command: KeyCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let key_rows = |keys: &[pb::AuthKey]| -> Vec<Vec<String>> {
        keys.iter()
            .map(|k| {
                let uses =
                    if k.max_uses == 0 { format!("{}/∞", k.uses) } else { format!("{}/{}", k.uses, k.max_uses) };
                vec![
                    k.id.clone(),
                    k.state.clone(),
                    uses,
                    if k.ephemeral { "yes".into() } else { "no".into() },
                    k.tags.join(","),
                    time(&k.expires_at),
                    k.reason.clone(),
                ]
            })
            .collect()
    };
    let headers = ["ID", "STATE", "USES", "EPHEMERAL", "TAGS", "EXPIRES", "REASON"];
    match command {
        KeyCommand::Create { tailnet, tags, reusable, ephemeral, expires, max_uses, reason, owner } => {
            let r = admin
                .create_auth_key(pb::CreateAuthKeyRequest {
                    tailnet_id: tailnet,
                    tags,
                    reusable,
                    ephemeral,
                    expires_in_seconds: expires.map_or(0, |d| d.as_secs()),
                    max_uses,
                    reason,
                    owner: owner.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let Some(k) = r.key else { bail!("the server returned no key") };
            if client.json {
                let mut v = key_json(&k);
                v["secret"] = Value::String(r.secret);
                println!("{v}");
            } else {
                print_table(&headers, key_rows(&[k]));
                println!("\nsecret (shown only now): {}", r.secret);
            }
        }
        KeyCommand::List { tailnet } => {
            let keys = admin
                .list_auth_keys(pb::ListAuthKeysRequest { tailnet_id: tailnet })
                .await
                .map_err(status)?
                .into_inner()
                .keys;
            if client.json {
                println!("{}", Value::Array(keys.iter().map(key_json).collect()));
            } else {
                print_table(&headers, key_rows(&keys));
            }
        }
        KeyCommand::Revoke { id, reason, keep_nodes } => {
            let r = admin
                .revoke_auth_key(pb::RevokeAuthKeyRequest { id: id.clone(), reason, keep_nodes })
                .await
                .map_err(status)?
                .into_inner();
            if client.json {
                println!("{}", json!({"id": id, "nodes_revoked": r.nodes_revoked}));
            } else {
                println!("revoked key {id}: {} nodes revoked", r.nodes_revoked);
            }
        }
    }
    Ok(())
}

async fn policy(client: &ClientArgs, command: PolicyCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let version = match command {
        PolicyCommand::Set { tailnet, file, reason, author } => {
            let policy_json =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            admin
                .set_policy(pb::SetPolicyRequest { tailnet_id: tailnet, policy_json, author, reason })
                .await
                .map_err(status)?
                .into_inner()
        }
        PolicyCommand::Get { tailnet, version } => {
            admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet, version }).await.map_err(status)?.into_inner()
        }
    };
    if client.json {
        println!(
            "{}",
            json!({"tailnet_id": version.tailnet_id, "version": version.version, "author": version.author,
                "reason": version.reason, "created_at": time(&version.created_at), "summary": version.summary,
                "policy_json": version.policy_json})
        );
    } else if version.version == 0 {
        println!("{}", version.summary);
    } else {
        println!(
            "# version {} by {} at {}: {}",
            version.version,
            version.author,
            time(&version.created_at),
            version.summary
        );
        println!("{}", version.policy_json);
    }
    Ok(())
}

async fn node(client: &ClientArgs, command: NodeCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    match command {
        NodeCommand::List { tailnet } => {
            let nodes = admin
                .list_nodes(pb::ListNodesRequest { tailnet_id: tailnet })
                .await
                .map_err(status)?
                .into_inner()
                .nodes;
            if client.json {
                println!("{}", Value::Array(nodes.iter().map(node_json).collect()));
            } else {
                let rows = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.id.clone(),
                            n.hostname.clone(),
                            n.addresses.join(","),
                            if n.online { "online".into() } else { "offline".into() },
                            n.tags.join(","),
                            n.owner.clone(),
                            if n.ephemeral { "yes".into() } else { "no".into() },
                        ]
                    })
                    .collect();
                print_table(&["ID", "HOSTNAME", "ADDRESS", "STATUS", "TAGS", "OWNER", "EPHEMERAL"], rows);
            }
        }
        NodeCommand::Delete { id, reason } => {
            admin.delete_node(pb::DeleteNodeRequest { id: id.clone(), reason }).await.map_err(status)?;
            if client.json {
                println!("{}", json!({"id": id, "deleted": true}));
            } else {
                println!("deleted node {id}");
            }
        }
    }
    Ok(())
}

fn print_event(e: &pb::Event, as_json: bool) {
    if as_json {
        println!("{}", event_json(e));
    } else {
        println!("{}  #{:<6} {:<16} {:<22} {}", time(&e.time), e.revision, event_kind_name(e.kind), e.actor, e.summary);
    }
}

async fn events(client: &ClientArgs, tailnet: Option<String>, since_revision: u64) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let mut stream = admin
        .watch_events(pb::WatchEventsRequest { tailnet_id: tailnet.unwrap_or_default(), since_revision })
        .await
        .map_err(status)?
        .into_inner();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            item = stream.message() => match item.map_err(status)? {
                Some(e) => print_event(&e, client.json),
                None => return Ok(()),
            },
        }
    }
}

async fn audit(client: &ClientArgs, command: AuditCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let (tailnet, node, as_json) = match command {
        AuditCommand::List { tailnet, node } => (tailnet, node, client.json),
        AuditCommand::Export { tailnet } => (Some(tailnet), None, true),
    };
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                tailnet_id: tailnet.clone().unwrap_or_default(),
                node_id: node.clone().unwrap_or_default(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        for e in &page.events {
            print_event(e, as_json);
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}
