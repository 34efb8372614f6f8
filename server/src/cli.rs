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
    /// Create, list and delete trust rules (nodes join with an OIDC token, e.g. a CI job's).
    Trust {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Create, list and revoke admin tokens with a role and an owner scope (admin role only).
    Token {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Alerts to webhooks: create, list, delete, and see their deliveries.
    Webhook {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// Who can reach what, and who granted it (`cordon access report --tailnet ID [--json|--csv]`).
    Access {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// SSO for people: the OIDC identity providers they log in through (`agentd login`).
    LoginProvider {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: LoginProviderCommand,
    },
    /// The people who logged in: list, show, and offboard (which cuts off all their nodes).
    User {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Keyless orchestration: let OIDC ID tokens that match a rule act as admin credentials.
    AdminTrust {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AdminTrustCommand,
    },
    /// Set and list the upstream LLM providers of a tailnet's gateway.
    Upstream {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: UpstreamCommand,
    },
    /// The replicas serving this deployment (several on one PostgreSQL database): each one's URL,
    /// heartbeat and the gateways it runs.
    Replicas {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The relay's counters since the server started.
    Relay {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: RelayCommand,
    },
    /// Print a shell completion script: `cordon completions bash > /etc/bash_completion.d/cordon`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
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
        /// Later policy changes wait for another principal's approval (`cordon policy approve`).
        #[arg(long)]
        require_approval: bool,
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
    /// List every stored version: who wrote it, when, why, and what changed.
    History {
        #[arg(long)]
        tailnet: String,
    },
    /// Show what changed between two versions (default: the previous and the current one), or between
    /// the current version and a file.
    Diff {
        #[arg(long)]
        tailnet: String,
        /// The older version [default: the one before --to].
        #[arg(long)]
        from: Option<u64>,
        /// The newer version [default: the current one].
        #[arg(long, conflicts_with = "file")]
        to: Option<u64>,
        /// Compare the current version with this file instead.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Validate a policy file and run its tests without storing it (a dry run of `policy set`).
    Test {
        /// Also say what would change from this tailnet's current version.
        #[arg(long)]
        tailnet: Option<String>,
        file: PathBuf,
    },
    /// Propose a policy file for another principal to approve (validated and diffed now).
    Propose {
        #[arg(long)]
        tailnet: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, default_value = "")]
        author: String,
        /// How long it waits for a decision, e.g. 2d [default: 7d].
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Approve a proposal (approver or admin role; not its proposer): it becomes the current version.
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reject a proposal.
    Reject {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List a tailnet's proposals, pending and decided.
    Proposals {
        #[arg(long)]
        tailnet: String,
    },
    /// Require approval for this tailnet's policy changes, or stop requiring it (admin role).
    Approval {
        #[arg(long)]
        tailnet: String,
        #[arg(value_enum)]
        required: OnOff,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Let nodes that present an OIDC token from ISSUER for AUDIENCE, whose claims match, join with TAGS.
    Create {
        #[arg(long)]
        tailnet: String,
        /// e.g. https://token.actions.githubusercontent.com
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        audience: String,
        /// claim=pattern, `*` matching any run of characters (repeatable), e.g. repository=acme/api.
        #[arg(long = "claim", value_parser = parse_label)]
        claims: Vec<(String, String)>,
        /// tag:name (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The longest a node it admits may live, e.g. 2h [default: 1h].
        #[arg(long, value_parser = parse_duration)]
        max_node_lifetime: Option<Duration>,
        #[arg(long)]
        ephemeral: bool,
        #[arg(long, default_value = "")]
        reason: String,
        /// A claim whose value owns the nodes the rule admits, e.g. actor (who triggered the run).
        #[arg(long, default_value = "")]
        owner_claim: String,
    },
    /// List a tailnet's trust rules.
    List {
        #[arg(long)]
        tailnet: String,
    },
    /// Delete a trust rule (nodes it admitted stay).
    Delete { id: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token; its secret is printed once.
    Create {
        /// A name for it (lowercase letters, digits, '-'); events and tagOwners say token:<name>.
        name: String,
        #[arg(long, value_enum)]
        role: TokenRole,
        /// Confine it to the tailnets of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// How long it lives, e.g. 30d [default: no expiry].
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List tokens (a scoped admin sees its own scope's).
    List,
    /// Revoke a token at once.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// POST chosen events to URL, signed with the secret read from a file or standard input.
    Create {
        url: String,
        /// Only this tailnet's events [default: every tailnet's].
        #[arg(long)]
        tailnet: Option<String>,
        /// An event name (repeatable), e.g. gateway_blocked [default: all].
        #[arg(long = "event")]
        events: Vec<String>,
        /// A file holding the HMAC secret, or `-` for standard input.
        #[arg(long)]
        secret_file: PathBuf,
        /// How long one event is retried, e.g. 10m [default: 10m].
        #[arg(long, value_parser = parse_duration)]
        retry: Option<Duration>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    List {
        #[arg(long)]
        tailnet: Option<String>,
    },
    Delete {
        id: String,
    },
    /// The newest deliveries of a webhook: delivered or given up on, attempts, status, error.
    Deliveries {
        id: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// For every node: what it may reach and on which ports, its AI gateway rules, how it was admitted
    /// and by whom; for every tag: who may hand it out and what carries it.
    Report {
        #[arg(long)]
        tailnet: String,
        /// One row per node and peer it may reach, as CSV.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum AdminTrustCommand {
    /// Tokens from ISSUER for AUDIENCE whose claims match act with ROLE over OWNER's tailnets.
    Create {
        name: String,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        audience: String,
        /// claim=pattern, `*` matching any run of characters (repeatable), e.g. repository=acme/infra.
        #[arg(long = "claim", value_parser = parse_label)]
        claims: Vec<(String, String)>,
        #[arg(long, value_enum)]
        role: TokenRole,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    List,
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum LoginProviderCommand {
    /// People log in through ISSUER's device authorization grant as CLIENT_ID. The client secret is
    /// read from a file (`-` for standard input), never from an argument.
    Create(Box<CreateProvider>),
    List {
        #[arg(long)]
        tailnet: Option<String>,
    },
    Delete {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(clap::Args)]
struct CreateProvider {
    name: String,
    /// The tailnet whose people log in through it [default: every tailnet without its own].
    #[arg(long)]
    tailnet: Option<String>,
    #[arg(long)]
    issuer: String,
    #[arg(long)]
    client_id: String,
    #[arg(long)]
    client_secret_file: Option<PathBuf>,
    /// Scopes to ask for (repeatable) [default: openid email profile groups].
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The ID token claim with the person's groups [default: groups].
    #[arg(long)]
    groups_claim: Option<String>,
    /// Only these email domains may log in (repeatable).
    #[arg(long = "email-domain")]
    email_domains: Vec<String>,
    /// Only members of these identity-provider groups may log in (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// How long a login lasts, in seconds [default: 7 days].
    #[arg(long)]
    login_lifetime: Option<u64>,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Subcommand)]
enum UserCommand {
    List {
        #[arg(long)]
        tailnet: Option<String>,
    },
    /// A user (by id or email) with their nodes.
    Show { user: String },
    /// Offboard a user (by id or email): their nodes are removed at once, with the reason.
    Delete {
        user: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenRole {
    Admin,
    Operator,
    Auditor,
    Approver,
}

#[derive(Subcommand)]
enum UpstreamCommand {
    /// Add or replace an upstream. The API key is read from a file or standard input, never from an
    /// argument (arguments show in `ps` and shell history).
    Set {
        #[arg(long)]
        tailnet: String,
        /// A DNS label; models are then addressed as NAME/model.
        name: String,
        /// openai, anthropic or openai-compatible.
        #[arg(long)]
        kind: String,
        /// e.g. https://api.openai.com/v1 or https://api.anthropic.com
        #[arg(long)]
        base_url: String,
        /// A file holding the API key, or `-` for standard input.
        #[arg(long)]
        api_key_file: PathBuf,
    },
    /// List a tailnet's upstreams (never their keys).
    List {
        #[arg(long)]
        tailnet: String,
    },
}

#[derive(Subcommand)]
enum RelayCommand {
    /// Frames and bytes forwarded, and frames dropped by reason.
    Stats,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List a tailnet's nodes.
    List {
        #[arg(long)]
        tailnet: String,
    },
    /// Show one node: identity, admission, addresses, endpoints, presence.
    Show { id: String },
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
        Command::Trust { client, command } => trust(&client, command).await,
        Command::Token { client, command } => token(&client, command).await,
        Command::AdminTrust { client, command } => admin_trust(&client, command).await,
        Command::LoginProvider { client, command } => login_provider(&client, command).await,
        Command::User { client, command } => user(&client, command).await,
        Command::Webhook { client, command } => webhook(&client, command).await,
        Command::Access { client, command: AccessCommand::Report { tailnet, csv } } => {
            access_report(&client, tailnet, csv).await
        }
        Command::Upstream { client, command } => upstream(&client, command).await,
        Command::Relay { client, command: RelayCommand::Stats } => relay_stats(&client).await,
        Command::Replicas { client } => replicas(&client).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "cordon",
                &mut std::io::stdout(),
            );
            Ok(())
        }
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
    agentd::cli::init_logging(log_filter("CORDON_LOG"), args.log_format);
    let config = ServeConfig::resolve(args)?;
    let listen = config.listen;
    let tls = config.tls.is_some();
    let mut server = Server::open(config).await?;
    let metrics = server.bind_metrics().await?;
    let console = server.bind_console().await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    let token_path = server.config.data_dir.join(crate::admin::TOKEN_FILE);
    match &server.admin_token_created {
        Some(path) => println!("cordon: wrote a new admin token to {} (mode 0600)", path.display()),
        None => println!("cordon: admin token in {}", token_path.display()),
    }
    if let Some(metrics) = metrics {
        println!("cordon: metrics at http://{metrics}/metrics");
    }
    if let Some(console) = console {
        println!("cordon: console at {scheme}://{console}/");
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

/// A list as a JSON array or a table.
/// What a create prints: the record as one JSON object, or a table of one row.
fn print_one<T>(json: bool, item: &T, to_json: impl Fn(&T) -> Value, headers: &[&str], rows: Vec<Vec<String>>) {
    if json {
        println!("{}", to_json(item));
    } else {
        print_table(headers, rows);
    }
}

fn print_list<T>(json: bool, items: &[T], to_json: impl Fn(&T) -> Value, headers: &[&str], rows: Vec<Vec<String>>) {
    if json {
        println!("{}", Value::Array(items.iter().map(to_json).collect()));
    } else {
        print_table(headers, rows);
    }
}

/// What a delete or revoke prints: `{"id": ID, "<done>": true}`, or the sentence and the id.
fn print_done(json: bool, id: &str, done: &str, sentence: &str) {
    if json {
        println!("{}", json!({"id": id, done: true}));
    } else {
        println!("{sentence} {id}");
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
        TailnetCommand::Create { name, owner, ttl, labels, cidr, policy, require_approval } => {
            let t = admin
                .create_tailnet(pb::CreateTailnetRequest {
                    name,
                    owner,
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
                    labels: labels.into_iter().collect(),
                    cidr: cidr.unwrap_or_default(),
                    upstreams: vec![],
                    require_policy_approval: require_approval,
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

fn policy_json(v: &pb::PolicyVersion) -> Value {
    let mut j = json!({"tailnet_id": v.tailnet_id, "version": v.version, "author": v.author, "reason": v.reason,
        "created_at": time(&v.created_at), "summary": v.summary, "policy_json": v.policy_json});
    if let Some(p) = &v.proposal {
        j["proposal"] = proposal_json(p);
    }
    j
}

fn proposal_json(p: &pb::PolicyProposal) -> Value {
    let state = match pb::ProposalState::try_from(p.state) {
        Ok(pb::ProposalState::Pending) => "pending",
        Ok(pb::ProposalState::Approved) => "approved",
        Ok(pb::ProposalState::Rejected) => "rejected",
        Ok(pb::ProposalState::Expired) => "expired",
        _ => "?",
    };
    json!({"id": p.id, "tailnet_id": p.tailnet_id, "state": state, "author": p.author, "proposed_by": p.proposed_by,
        "reason": p.reason, "created_at": time(&p.created_at), "expires_at": time(&p.expires_at),
        "base_version": p.base_version, "summary": p.summary, "decided_by": p.decided_by,
        "decided_at": p.decided_at.as_ref().map(|_| time(&p.decided_at)), "decision_reason": p.decision_reason,
        "version": p.version, "policy_json": p.policy_json})
}

/// Prints proposals as JSON or a table.
fn print_proposals(json: bool, proposals: &[pb::PolicyProposal]) {
    if json {
        println!("{}", Value::Array(proposals.iter().map(proposal_json).collect()));
        return;
    }
    let rows = proposals
        .iter()
        .map(|p| {
            let j = proposal_json(p);
            ["id", "state", "proposed_by", "decided_by", "summary"]
                .iter()
                .map(|k| j[*k].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .collect();
    print_table(&["ID", "STATE", "PROPOSED BY", "DECIDED BY", "CHANGES"], rows);
}

async fn policy(client: &ClientArgs, command: PolicyCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let version = match command {
        PolicyCommand::Set { tailnet, file, reason, author } => {
            let policy_json = read_text(&file)?;
            admin
                .set_policy(pb::SetPolicyRequest { tailnet_id: tailnet, policy_json, author, reason })
                .await
                .map_err(status)?
                .into_inner()
        }
        PolicyCommand::Get { tailnet, version } => {
            admin.get_policy(pb::GetPolicyRequest { tailnet_id: tailnet, version }).await.map_err(status)?.into_inner()
        }
        PolicyCommand::History { tailnet } => {
            let history = admin
                .list_policy_versions(pb::ListPolicyVersionsRequest { tailnet_id: tailnet })
                .await
                .map_err(status)?
                .into_inner();
            if client.json {
                let versions: Vec<Value> = history
                    .versions
                    .iter()
                    .map(|v| {
                        let mut j = policy_json(v);
                        j["current"] = Value::Bool(v.version == history.current_version);
                        j
                    })
                    .collect();
                println!("{}", json!({"current_version": history.current_version, "versions": versions}));
            } else if history.versions.is_empty() {
                println!("no stored versions: the tailnet runs the default policy (every node may reach every other)");
            } else {
                let rows = history
                    .versions
                    .iter()
                    .map(|v| {
                        let mark = if v.version == history.current_version { "*" } else { "" };
                        vec![
                            format!("{}{mark}", v.version),
                            time(&v.created_at),
                            v.author.clone(),
                            v.reason.clone(),
                            v.summary.clone(),
                        ]
                    })
                    .collect();
                print_table(&["VERSION", "CREATED", "AUTHOR", "REASON", "SUMMARY"], rows);
            }
            return Ok(());
        }
        PolicyCommand::Diff { tailnet, from, to, file } => {
            return policy_diff(client, &mut admin, tailnet, from, to, file).await;
        }
        PolicyCommand::Test { tailnet, file } => {
            let policy_json = read_text(&file)?;
            let r = admin
                .test_policy(pb::TestPolicyRequest { tailnet_id: tailnet.unwrap_or_default(), policy_json })
                .await
                .map_err(status)?
                .into_inner();
            if client.json {
                println!(
                    "{}",
                    json!({"valid": true, "grants": r.grants, "tests_passed": r.tests_passed, "summary": r.summary})
                );
            } else {
                println!("{}: valid, {} grants, {} tests passed", file.display(), r.grants, r.tests_passed);
                if !r.summary.is_empty() {
                    println!("would change: {}", r.summary);
                }
            }
            return Ok(());
        }
        PolicyCommand::Propose { tailnet, file, reason, author, expires_in } => {
            let policy_json = read_text(&file)?;
            let req = pb::ProposePolicyRequest {
                tailnet_id: tailnet,
                policy_json,
                author,
                reason,
                expires_in_seconds: expires_in.map_or(0, |d| d.as_secs()),
            };
            let proposal = admin.propose_policy(req).await.map_err(status)?.into_inner();
            print_proposals(client.json, &[proposal]);
            return Ok(());
        }
        PolicyCommand::Approve { id, reason } => {
            admin.approve_policy(pb::DecidePolicyRequest { id, reason }).await.map_err(status)?.into_inner()
        }
        PolicyCommand::Reject { id, reason } => {
            let proposal = admin.reject_policy(pb::DecidePolicyRequest { id, reason }).await.map_err(status)?;
            print_proposals(client.json, &[proposal.into_inner()]);
            return Ok(());
        }
        PolicyCommand::Proposals { tailnet } => {
            let req = pb::ListPolicyProposalsRequest { tailnet_id: tailnet };
            let proposals = admin.list_policy_proposals(req).await.map_err(status)?.into_inner().proposals;
            print_proposals(client.json, &proposals);
            return Ok(());
        }
        PolicyCommand::Approval { tailnet, required, reason } => {
            let req = pb::SetPolicyApprovalRequest { tailnet_id: tailnet, required: required == OnOff::On, reason };
            let t = admin.set_policy_approval(req).await.map_err(status)?.into_inner();
            if client.json {
                println!("{}", json!({"tailnet_id": t.id, "require_policy_approval": t.require_policy_approval}));
            } else {
                let state = if t.require_policy_approval { "need" } else { "do not need" };
                println!("policy changes of {} {state} approval", t.name);
            }
            return Ok(());
        }
    };
    if client.json {
        println!("{}", policy_json(&version));
    } else if let Some(proposal) = &version.proposal {
        println!("{}", version.summary);
        print_proposals(false, std::slice::from_ref(proposal));
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

/// A unified diff of two policy versions, or of the current version and a file.
async fn policy_diff(
    client: &ClientArgs,
    admin: &mut Admin,
    tailnet: String,
    from: Option<u64>,
    to: Option<u64>,
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut get = async |version: u64| -> anyhow::Result<pb::PolicyVersion> {
        let v = admin
            .get_policy(pb::GetPolicyRequest { tailnet_id: tailnet.clone(), version })
            .await
            .map_err(status)?
            .into_inner();
        Ok(v)
    };
    let (old, new, old_name, new_name) = match file {
        Some(path) => {
            let current = get(from.unwrap_or(0)).await?;
            let name = format!("version {}", current.version);
            (current.policy_json, read_text(&path)?, name, path.display().to_string())
        }
        None => {
            let newer = get(to.unwrap_or(0)).await?;
            if newer.version == 0 {
                bail!("the tailnet runs the default policy: there is no version to compare");
            }
            let older_version = from.unwrap_or(newer.version - 1);
            let old = if older_version == 0 { String::new() } else { get(older_version).await?.policy_json };
            (old, newer.policy_json, format!("version {older_version}"), format!("version {}", newer.version))
        }
    };
    let diff = similar::TextDiff::from_lines(&old, &new);
    let text = diff.unified_diff().context_radius(3).header(&old_name, &new_name).to_string();
    if client.json {
        println!("{}", json!({"from": old_name, "to": new_name, "changed": !text.is_empty(), "diff": text}));
    } else if text.is_empty() {
        println!("no difference between {old_name} and {new_name}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// A file's text, or standard input's for `-`.
fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    if path == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn trust(client: &ClientArgs, command: TrustCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let rule_json = |r: &pb::TrustRule| {
        json!({"id": r.id, "tailnet_id": r.tailnet_id, "issuer": r.issuer, "audience": r.audience,
            "claim_conditions": r.claim_conditions, "tags": r.tags,
            "max_node_lifetime_seconds": r.max_node_lifetime_seconds, "ephemeral": r.ephemeral,
            "reason": r.reason, "owner_claim": r.owner_claim, "created_by": r.created_by,
            "created_at": time(&r.created_at)})
    };
    let rows = |rules: &[pb::TrustRule]| -> Vec<Vec<String>> {
        rules
            .iter()
            .map(|r| {
                let claims: Vec<String> = r.claim_conditions.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    r.id.clone(),
                    r.issuer.clone(),
                    r.audience.clone(),
                    claims.join(","),
                    r.tags.join(","),
                    r.reason.clone(),
                ]
            })
            .collect()
    };
    let headers = ["ID", "ISSUER", "AUDIENCE", "CLAIMS", "TAGS", "REASON"];
    match command {
        TrustCommand::Create {
            tailnet,
            issuer,
            audience,
            claims,
            tags,
            max_node_lifetime,
            ephemeral,
            reason,
            owner_claim,
        } => {
            let rule = admin
                .create_trust_rule(pb::CreateTrustRuleRequest {
                    tailnet_id: tailnet,
                    issuer,
                    audience,
                    claim_conditions: claims.into_iter().collect(),
                    tags,
                    max_node_lifetime_seconds: max_node_lifetime.map_or(0, |d| d.as_secs()),
                    ephemeral,
                    reason,
                    owner_claim,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_one(client.json, &rule, rule_json, &headers, rows(std::slice::from_ref(&rule)));
        }
        TrustCommand::List { tailnet } => {
            let rules = admin
                .list_trust_rules(pb::ListTrustRulesRequest { tailnet_id: tailnet })
                .await
                .map_err(status)?
                .into_inner()
                .rules;
            print_list(client.json, &rules, rule_json, &headers, rows(&rules));
        }
        TrustCommand::Delete { id } => {
            admin.delete_trust_rule(pb::DeleteTrustRuleRequest { id: id.clone() }).await.map_err(status)?;
            print_done(client.json, &id, "deleted", "deleted trust rule");
        }
    }
    Ok(())
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Admin) => "admin",
        Ok(pb::Role::Operator) => "operator",
        Ok(pb::Role::Auditor) => "auditor",
        Ok(pb::Role::Approver) => "approver",
        _ => "?",
    }
}

fn pb_role(role: TokenRole) -> pb::Role {
    match role {
        TokenRole::Admin => pb::Role::Admin,
        TokenRole::Operator => pb::Role::Operator,
        TokenRole::Auditor => pb::Role::Auditor,
        TokenRole::Approver => pb::Role::Approver,
    }
}

async fn webhook(client: &ClientArgs, command: WebhookCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let hook_json = |w: &pb::Webhook| {
        json!({"id": w.id, "tailnet_id": w.tailnet_id, "url": w.url, "events": w.events,
            "retry_seconds": w.retry_seconds, "reason": w.reason, "created_by": w.created_by,
            "created_at": time(&w.created_at), "delivered_revision": w.delivered_revision})
    };
    let rows = |hooks: &[pb::Webhook]| -> Vec<Vec<String>> {
        hooks
            .iter()
            .map(|w| {
                vec![
                    w.id.clone(),
                    w.url.clone(),
                    w.tailnet_id.clone(),
                    w.events.join(","),
                    w.delivered_revision.to_string(),
                ]
            })
            .collect()
    };
    let headers = ["ID", "URL", "TAILNET", "EVENTS", "DELIVERED TO"];
    match command {
        WebhookCommand::Create { url, tailnet, events, secret_file, retry, reason } => {
            let secret = read_text(&secret_file)?.trim().to_string();
            let req = pb::CreateWebhookRequest {
                tailnet_id: tailnet.unwrap_or_default(),
                url,
                events,
                secret,
                retry_seconds: retry.map_or(0, |d| d.as_secs()),
                reason,
            };
            let hook = admin.create_webhook(req).await.map_err(status)?.into_inner();
            print_one(client.json, &hook, hook_json, &headers, rows(std::slice::from_ref(&hook)));
        }
        WebhookCommand::List { tailnet } => {
            let req = pb::ListWebhooksRequest { tailnet_id: tailnet.unwrap_or_default() };
            let hooks = admin.list_webhooks(req).await.map_err(status)?.into_inner().webhooks;
            print_list(client.json, &hooks, hook_json, &headers, rows(&hooks));
        }
        WebhookCommand::Delete { id } => {
            admin.delete_webhook(pb::DeleteWebhookRequest { id: id.clone() }).await.map_err(status)?;
            print_done(client.json, &id, "deleted", "deleted webhook");
        }
        WebhookCommand::Deliveries { id, limit } => {
            let req = pb::ListWebhookDeliveriesRequest { webhook_id: id, limit };
            let deliveries = admin.list_webhook_deliveries(req).await.map_err(status)?.into_inner().deliveries;
            if client.json {
                let list: Vec<Value> = deliveries
                    .iter()
                    .map(|d| {
                        json!({"event_id": d.event_id, "revision": d.revision, "event": d.event,
                            "delivered": d.delivered, "attempts": d.attempts, "status": d.status, "error": d.error,
                            "time": time(&d.time)})
                    })
                    .collect();
                println!("{}", Value::Array(list));
            } else {
                let rows = deliveries
                    .iter()
                    .map(|d| {
                        let state = if d.delivered { "delivered" } else { "failed" };
                        vec![
                            d.revision.to_string(),
                            d.event.clone(),
                            state.into(),
                            d.attempts.to_string(),
                            d.status.to_string(),
                            d.error.clone(),
                        ]
                    })
                    .collect();
                print_table(&["REVISION", "EVENT", "STATE", "ATTEMPTS", "STATUS", "ERROR"], rows);
            }
        }
    }
    Ok(())
}

/// A CSV field, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

async fn access_report(client: &ClientArgs, tailnet: String, csv: bool) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let r = admin.get_access_report(pb::GetAccessReportRequest { tailnet_id: tailnet }).await.map_err(status)?;
    let r = r.into_inner();
    let node_json = |n: &pb::NodeAccess| {
        json!({"node_id": n.node_id, "hostname": n.hostname, "tags": n.tags, "owner": n.owner,
            "admitted_by": n.admitted_by, "admission_created_by": n.admission_created_by,
            "admission_reason": n.admission_reason, "run_claims": n.run_claims, "online": n.online,
            "last_seen": n.last_seen.as_ref().map(|_| time(&n.last_seen)),
            "reach": n.reach.iter().map(|r| json!({"peer_id": r.peer_id, "peer": r.peer_hostname, "ports": r.ports}))
                .collect::<Vec<_>>(),
            "ai_capabilities": serde_json::from_str::<Value>(&n.ai_capabilities_json).unwrap_or(Value::Null)})
    };
    if client.json {
        let tags: Vec<Value> = r
            .tags
            .iter()
            .map(|t| {
                json!({"tag": t.tag, "owners": t.owners, "nodes": t.nodes, "auth_keys": t.auth_keys,
                "trust_rules": t.trust_rules})
            })
            .collect();
        println!(
            "{}",
            json!({"tailnet_id": r.tailnet_id, "tailnet": r.tailnet_name, "owner": r.owner,
                "generated_at": time(&r.generated_at), "policy_version": r.policy_version,
                "policy_author": r.policy_author, "policy_reason": r.policy_reason,
                "policy_set_at": r.policy_set_at.as_ref().map(|_| time(&r.policy_set_at)),
                "policy_approved_by": r.policy_approved_by,
                "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(), "tags": tags})
        );
        return Ok(());
    }
    let header = [
        "tailnet",
        "policy_version",
        "policy_author",
        "policy_approved_by",
        "node_id",
        "hostname",
        "tags",
        "owner",
        "admitted_by",
        "admission_created_by",
        "admission_reason",
        "last_seen",
        "peer",
        "ports",
        "ai_capabilities",
    ];
    let mut rows = Vec::new();
    for n in &r.nodes {
        let reach: Vec<(String, String)> = if n.reach.is_empty() {
            vec![(String::new(), String::new())]
        } else {
            n.reach.iter().map(|r| (r.peer_hostname.clone(), r.ports.join(" "))).collect()
        };
        for (peer, ports) in reach {
            rows.push(vec![
                r.tailnet_name.clone(),
                r.policy_version.to_string(),
                r.policy_author.clone(),
                r.policy_approved_by.clone(),
                n.node_id.clone(),
                n.hostname.clone(),
                n.tags.join(" "),
                n.owner.clone(),
                n.admitted_by.clone(),
                n.admission_created_by.clone(),
                n.admission_reason.clone(),
                n.last_seen.as_ref().map(|_| time(&n.last_seen)).unwrap_or_default(),
                peer,
                ports,
                n.ai_capabilities_json.clone(),
            ]);
        }
    }
    if csv {
        println!("{}", header.join(","));
        for row in rows {
            println!("{}", row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        }
        return Ok(());
    }
    println!(
        "tailnet {} (owner {}), policy v{} by {}{}",
        r.tailnet_name,
        r.owner,
        r.policy_version,
        if r.policy_author.is_empty() {
            "nobody (default: every node may reach every other)"
        } else {
            &r.policy_author
        },
        if r.policy_approved_by.is_empty() { String::new() } else { format!(", approved by {}", r.policy_approved_by) }
    );
    let table = rows
        .into_iter()
        .map(|row| vec![row[5].clone(), row[6].clone(), row[8].clone(), row[12].clone(), row[13].clone()]);
    print_table(&["NODE", "TAGS", "ADMITTED BY", "MAY REACH", "PORTS"], table.collect());
    Ok(())
}

async fn login_provider(client: &ClientArgs, command: LoginProviderCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let provider_json = |p: &pb::LoginProvider| {
        json!({"id": p.id, "name": p.name, "tailnet_id": p.tailnet_id, "issuer": p.issuer,
            "client_id": p.client_id, "has_client_secret": p.has_client_secret, "scopes": p.scopes,
            "groups_claim": p.groups_claim, "allowed_email_domains": p.allowed_email_domains,
            "allowed_groups": p.allowed_groups, "login_lifetime_seconds": p.login_lifetime_seconds,
            "reason": p.reason, "created_by": p.created_by, "created_at": time(&p.created_at)})
    };
    let rows = |providers: &[pb::LoginProvider]| -> Vec<Vec<String>> {
        providers
            .iter()
            .map(|p| {
                let scope = if p.tailnet_id.is_empty() { "(server-wide)".to_string() } else { p.tailnet_id.clone() };
                vec![
                    p.id.clone(),
                    p.name.clone(),
                    scope,
                    p.issuer.clone(),
                    p.client_id.clone(),
                    p.allowed_groups.join(","),
                ]
            })
            .collect()
    };
    let headers = ["ID", "NAME", "TAILNET", "ISSUER", "CLIENT ID", "GROUPS"];
    match command {
        LoginProviderCommand::Create(create) => {
            let CreateProvider {
                name,
                tailnet,
                issuer,
                client_id,
                client_secret_file,
                scopes,
                groups_claim,
                email_domains,
                groups,
                login_lifetime,
                reason,
            } = *create;
            let client_secret = match client_secret_file {
                Some(path) => read_text(&path)?.trim().to_string(),
                None => String::new(),
            };
            let req = pb::CreateLoginProviderRequest {
                name,
                tailnet_id: tailnet.unwrap_or_default(),
                issuer,
                client_id,
                client_secret,
                scopes,
                groups_claim: groups_claim.unwrap_or_default(),
                allowed_email_domains: email_domains,
                allowed_groups: groups,
                login_lifetime_seconds: login_lifetime.unwrap_or_default(),
                reason,
            };
            let provider = admin.create_login_provider(req).await.map_err(status)?.into_inner();
            print_one(client.json, &provider, provider_json, &headers, rows(std::slice::from_ref(&provider)));
        }
        LoginProviderCommand::List { tailnet } => {
            let req = pb::ListLoginProvidersRequest { tailnet_id: tailnet.unwrap_or_default() };
            let providers = admin.list_login_providers(req).await.map_err(status)?.into_inner().providers;
            print_list(client.json, &providers, provider_json, &headers, rows(&providers));
        }
        LoginProviderCommand::Delete { id, reason } => {
            let req = pb::DeleteLoginProviderRequest { id: id.clone(), reason };
            admin.delete_login_provider(req).await.map_err(status)?;
            print_done(client.json, &id, "deleted", "deleted login provider");
        }
    }
    Ok(())
}

async fn user(client: &ClientArgs, command: UserCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let user_json = |u: &pb::User| {
        json!({"id": u.id, "email": u.email, "display_name": u.display_name, "groups": u.groups,
            "issuer": u.issuer, "subject": u.subject, "last_login": time(&u.last_login),
            "created_at": time(&u.created_at), "login_provider_id": u.login_provider_id,
            "nodes": u.nodes.iter().map(|n| json!({"id": n.id, "hostname": n.hostname, "tailnet_id": n.tailnet_id,
                "addresses": n.addresses, "online": n.online})).collect::<Vec<_>>()})
    };
    let rows = |users: &[pb::User]| -> Vec<Vec<String>> {
        users
            .iter()
            .map(|u| {
                vec![u.id.clone(), u.email.clone(), u.display_name.clone(), u.groups.join(","), time(&u.last_login)]
            })
            .collect()
    };
    let headers = ["ID", "EMAIL", "NAME", "GROUPS", "LAST LOGIN"];
    match command {
        UserCommand::List { tailnet } => {
            let req = pb::ListUsersRequest { tailnet_id: tailnet.unwrap_or_default() };
            let users = admin.list_users(req).await.map_err(status)?.into_inner().users;
            print_list(client.json, &users, user_json, &headers, rows(&users));
        }
        UserCommand::Show { user } => {
            let u = admin.get_user(pb::GetUserRequest { id: user }).await.map_err(status)?.into_inner();
            if client.json {
                println!("{}", user_json(&u));
            } else {
                print_table(&headers, rows(std::slice::from_ref(&u)));
                let nodes = u
                    .nodes
                    .iter()
                    .map(|n| vec![n.id.clone(), n.hostname.clone(), n.addresses.join(","), n.online.to_string()]);
                print_table(&["NODE", "HOSTNAME", "ADDRESSES", "ONLINE"], nodes.collect());
            }
        }
        UserCommand::Delete { user, reason } => {
            let req = pb::DeleteUserRequest { id: user.clone(), reason };
            let removed = admin.delete_user(req).await.map_err(status)?.into_inner().nodes_removed;
            if client.json {
                println!("{}", json!({"id": user, "deleted": true, "nodes_removed": removed}));
            } else {
                println!("deleted user {user} and {removed} node(s)");
            }
        }
    }
    Ok(())
}

async fn admin_trust(client: &ClientArgs, command: AdminTrustCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let rule_json = |r: &pb::AdminTrustRule| {
        json!({"id": r.id, "name": r.name, "issuer": r.issuer, "audience": r.audience,
            "claim_conditions": r.claim_conditions, "role": role_name(r.role), "owner_scope": r.owner_scope,
            "reason": r.reason, "created_by": r.created_by, "created_at": time(&r.created_at)})
    };
    let rows = |rules: &[pb::AdminTrustRule]| -> Vec<Vec<String>> {
        rules
            .iter()
            .map(|r| {
                let claims: Vec<String> = r.claim_conditions.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let role = role_name(r.role).to_string();
                vec![r.id.clone(), r.name.clone(), r.issuer.clone(), claims.join(","), role, r.owner_scope.clone()]
            })
            .collect()
    };
    let headers = ["ID", "NAME", "ISSUER", "CLAIMS", "ROLE", "OWNER SCOPE"];
    match command {
        AdminTrustCommand::Create { name, issuer, audience, claims, role, owner, reason } => {
            let req = pb::CreateAdminTrustRuleRequest {
                name,
                issuer,
                audience,
                claim_conditions: claims.into_iter().collect(),
                role: pb_role(role).into(),
                owner_scope: owner.unwrap_or_default(),
                reason,
            };
            let rule = admin.create_admin_trust_rule(req).await.map_err(status)?.into_inner();
            print_one(client.json, &rule, rule_json, &headers, rows(std::slice::from_ref(&rule)));
        }
        AdminTrustCommand::List => {
            let req = pb::ListAdminTrustRulesRequest {};
            let rules = admin.list_admin_trust_rules(req).await.map_err(status)?.into_inner().rules;
            print_list(client.json, &rules, rule_json, &headers, rows(&rules));
        }
        AdminTrustCommand::Delete { id } => {
            admin.delete_admin_trust_rule(pb::DeleteAdminTrustRuleRequest { id: id.clone() }).await.map_err(status)?;
            print_done(client.json, &id, "deleted", "deleted admin trust rule");
        }
    }
    Ok(())
}

async fn token(client: &ClientArgs, command: TokenCommand) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let token_json = |t: &pb::AdminToken| {
        json!({"id": t.id, "name": t.name, "role": role_name(t.role), "owner_scope": t.owner_scope,
            "created_by": t.created_by, "reason": t.reason, "created_at": time(&t.created_at),
            "expires_at": t.expires_at.as_ref().map(|_| time(&t.expires_at)),
            "revoked_at": t.revoked_at.as_ref().map(|_| time(&t.revoked_at))})
    };
    let rows = |tokens: &[pb::AdminToken]| -> Vec<Vec<String>> {
        tokens
            .iter()
            .map(|t| {
                let state = if t.revoked_at.is_some() { "revoked".to_string() } else { time(&t.expires_at) };
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    role_name(t.role).into(),
                    t.owner_scope.clone(),
                    state,
                    t.created_by.clone(),
                ]
            })
            .collect()
    };
    let headers = ["ID", "NAME", "ROLE", "OWNER SCOPE", "EXPIRES", "CREATED BY"];
    match command {
        TokenCommand::Create { name, role, owner, expires_in, reason } => {
            let role = pb_role(role);
            let r = admin
                .create_admin_token(pb::CreateAdminTokenRequest {
                    name,
                    role: role.into(),
                    owner_scope: owner.unwrap_or_default(),
                    expires_in_seconds: expires_in.map_or(0, |d| d.as_secs()),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            let token = r.token.unwrap_or_default();
            if client.json {
                let mut v = token_json(&token);
                v["secret"] = Value::String(r.secret);
                println!("{v}");
            } else {
                print_table(&headers, rows(&[token]));
                println!("\nsecret (shown only now): {}", r.secret);
            }
        }
        TokenCommand::List => {
            let tokens =
                admin.list_admin_tokens(pb::ListAdminTokensRequest {}).await.map_err(status)?.into_inner().tokens;
            print_list(client.json, &tokens, token_json, &headers, rows(&tokens));
        }
        TokenCommand::Revoke { id, reason } => {
            admin.revoke_admin_token(pb::RevokeAdminTokenRequest { id: id.clone(), reason }).await.map_err(status)?;
            print_done(client.json, &id, "revoked", "revoked admin token");
        }
    }
    Ok(())
}

fn upstream_json(u: &pb::UpstreamInfo) -> Value {
    json!({"name": u.name, "kind": u.kind, "base_url": u.base_url, "api_key_set": u.api_key_set,
        "updated_at": time(&u.updated_at)})
}

async fn upstream(client: &ClientArgs, command: UpstreamCommand) -> anyhow::Result<()> {
    let rows = |ups: &[pb::UpstreamInfo]| -> Vec<Vec<String>> {
        ups.iter()
            .map(|u| {
                let key = if u.api_key_set { "set" } else { "missing" };
                vec![u.name.clone(), u.kind.clone(), u.base_url.clone(), key.into(), time(&u.updated_at)]
            })
            .collect()
    };
    let headers = ["NAME", "KIND", "BASE URL", "KEY", "UPDATED"];
    let upstreams = match command {
        UpstreamCommand::Set { tailnet, name, kind, base_url, api_key_file } => {
            // Read the key before connecting, so a wrong path fails without a round trip.
            let api_key = read_text(&api_key_file)
                .with_context(|| "the API key is read from --api-key-file (a file, or - for standard input)")?
                .trim()
                .to_string();
            if api_key.is_empty() {
                bail!("{} holds no API key", api_key_file.display());
            }
            let mut admin = client.connect().await?;
            let info = admin
                .set_upstream(pb::SetUpstreamRequest { tailnet_id: tailnet, name, kind, base_url, api_key })
                .await
                .map_err(status)?
                .into_inner();
            if client.json {
                println!("{}", upstream_json(&info));
                return Ok(());
            }
            vec![info]
        }
        UpstreamCommand::List { tailnet } => {
            let mut admin = client.connect().await?;
            let t = admin.get_tailnet(pb::GetTailnetRequest { id: tailnet }).await.map_err(status)?.into_inner();
            if client.json {
                println!("{}", Value::Array(t.upstreams.iter().map(upstream_json).collect()));
                return Ok(());
            }
            t.upstreams
        }
    };
    print_table(&headers, rows(&upstreams));
    Ok(())
}

async fn replicas(client: &ClientArgs) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let list = admin.list_replicas(pb::ListReplicasRequest {}).await.map_err(status)?.into_inner().replicas;
    let to_json = |r: &pb::Replica| {
        json!({
            "id": r.id, "advertise": r.advertise, "stun_address": r.stun_address, "alive": r.alive,
            "gateways": r.gateways, "answering": r.answering, "started_at": time(&r.started_at),
            "heartbeat_at": time(&r.heartbeat_at), "stopped_at": time(&r.stopped_at),
        })
    };
    let headers = ["ID", "ADVERTISE", "STATE", "GATEWAYS", "HEARTBEAT", "STARTED"];
    let rows = list
        .iter()
        .map(|r| {
            let state = match (r.alive, r.stopped_at.is_some()) {
                (true, _) => {
                    if r.answering {
                        "alive (answered)"
                    } else {
                        "alive"
                    }
                }
                (false, true) => "stopped",
                (false, false) => "lost",
            };
            vec![
                r.id.clone(),
                r.advertise.clone(),
                state.to_string(),
                r.gateways.to_string(),
                time(&r.heartbeat_at),
                time(&r.started_at),
            ]
        })
        .collect();
    print_list(client.json, &list, to_json, &headers, rows);
    Ok(())
}

async fn relay_stats(client: &ClientArgs) -> anyhow::Result<()> {
    let mut admin = client.connect().await?;
    let r = admin.get_relay_stats(pb::GetRelayStatsRequest {}).await.map_err(status)?.into_inner();
    let rows = [
        ("forwarded_frames", r.forwarded_frames),
        ("forwarded_bytes", r.forwarded_bytes),
        ("dropped_unknown_peer", r.dropped_unknown_peer),
        ("dropped_oversize", r.dropped_oversize),
        ("dropped_rate", r.dropped_rate),
        ("dropped_overflow", r.dropped_overflow),
    ];
    if client.json {
        let map: serde_json::Map<String, Value> = rows.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        println!("{}", Value::Object(map));
    } else {
        for (k, v) in rows {
            println!("{k:<22} {v}");
        }
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
        NodeCommand::Show { id } => {
            let n = admin.get_node(pb::GetNodeRequest { id }).await.map_err(status)?.into_inner();
            let mut v = node_json(&n);
            v["endpoints"] = json!(n.endpoints);
            if let Some(a) = &n.admission {
                v["trust_rule_id"] = json!(a.trust_rule_id);
                if let Some(run) = &a.run {
                    v["run"] = json!({"issuer": run.issuer, "subject": run.subject, "claims": run.claims});
                }
            }
            if client.json {
                println!("{v}");
            } else {
                for (k, v) in v.as_object().expect("object") {
                    println!("{k:<22} {}", v.as_str().map_or_else(|| v.to_string(), str::to_string));
                }
            }
        }
        NodeCommand::Delete { id, reason } => {
            admin.delete_node(pb::DeleteNodeRequest { id: id.clone(), reason }).await.map_err(status)?;
            print_done(client.json, &id, "deleted", "deleted node");
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
