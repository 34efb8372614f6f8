//! `cordon serve`'s one configuration: flags, then `CORDON_*` environment variables, then a TOML file,
//! then defaults. Parsing binds nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::control_plane::Limits;
use crate::store::StoreUrl;
use crate::time::parse_duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_DATA_DIR: &str = "./cordon-data";

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Flags of `cordon serve`; each also reads `CORDON_<NAME>`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "CORDON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for gRPC [default: 127.0.0.1:7443].
    #[arg(long, env = "CORDON_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the store and the admin token live [default: ./cordon-data].
    #[arg(long, env = "CORDON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the records live: `sled:<dir>` (embedded) or `postgres://user@host/db` (add
    /// `?sslmode=require` for TLS) [default: sled:<data-dir>/store].
    #[arg(long, env = "CORDON_STORE")]
    pub store: Option<String>,
    /// PostgreSQL connections, at most [default: 32].
    #[arg(long, env = "CORDON_STORE_MAX_CONNECTIONS")]
    pub store_max_connections: Option<usize>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "CORDON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "CORDON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address.
    #[arg(long, env = "CORDON_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// How long an ephemeral node may be disconnected before it is removed [default: 30s].
    #[arg(long, env = "CORDON_EPHEMERAL_NODE_TIMEOUT", value_parser = duration_arg)]
    pub ephemeral_node_timeout: Option<Duration>,
    /// How long a node registration lasts [default: 180d].
    #[arg(long, env = "CORDON_NODE_LIFETIME", value_parser = duration_arg)]
    pub node_lifetime: Option<Duration>,
    /// The longest expiry an auth key may have [default: 90d].
    #[arg(long, env = "CORDON_MAX_AUTH_KEY_EXPIRY", value_parser = duration_arg)]
    pub max_auth_key_expiry: Option<Duration>,
    /// How long shutdown waits for in-flight calls [default: 10s].
    #[arg(long, env = "CORDON_SHUTDOWN_GRACE", value_parser = duration_arg)]
    pub shutdown_grace: Option<Duration>,
    /// sled page cache in MiB [default: 64].
    #[arg(long, env = "CORDON_CACHE_MB")]
    pub cache_mb: Option<u64>,
    /// UDP address of the STUN reflector nodes use to find their public endpoint [default: the listen
    /// address's IP, port 3478].
    #[arg(long, env = "CORDON_STUN_LISTEN")]
    pub stun_listen: Option<SocketAddr>,
    /// How long audit events (gateway requests included) are kept, also after their tailnet is
    /// deleted [default: 90d].
    #[arg(long, env = "CORDON_AUDIT_RETENTION", value_parser = duration_arg)]
    pub audit_retention: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9090 [default: off]. Plain
    /// HTTP without authentication: keep it on loopback or a monitoring network.
    #[arg(long, env = "CORDON_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the operator's console (a web UI; sign in with an admin token) at http://ADDR/, e.g.
    /// 127.0.0.1:7444 [default: off]. With --tls-cert it is served over TLS with the same certificate.
    #[arg(long, env = "CORDON_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// The URL other replicas and nodes reach this one at, e.g. https://r1.example:7443 (PostgreSQL
    /// store only: each replica registers it) [default: the listen address].
    #[arg(long, env = "CORDON_ADVERTISE")]
    pub advertise: Option<String>,
    /// How log lines look on stderr: `text` for people, `json` (one object per line) for collectors.
    /// Not read from the TOML file: logging starts before it is read.
    #[arg(long, env = "CORDON_LOG_FORMAT", value_enum, default_value_t = agentd::cli::LogFormat::Text)]
    pub log_format: agentd::cli::LogFormat,
}

/// The TOML file: the same settings, durations as strings ("30s").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    store_max_connections: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
    ephemeral_node_timeout: Option<String>,
    node_lifetime: Option<String>,
    max_auth_key_expiry: Option<String>,
    shutdown_grace: Option<String>,
    cache_mb: Option<u64>,
    stun_listen: Option<SocketAddr>,
    audit_retention: Option<String>,
    metrics_listen: Option<SocketAddr>,
    console_listen: Option<SocketAddr>,
    advertise: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The resolved configuration of a server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the records live; `None` = sled in `<data_dir>/store`.
    pub store: Option<StoreUrl>,
    pub tls: Option<Tls>,
    pub shutdown_grace: Duration,
    pub limits: Limits,
    /// Where the STUN reflector listens (UDP); `None` runs none.
    pub stun_listen: Option<SocketAddr>,
    /// Where `/metrics` is served (HTTP); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the operator's console is served; `None` serves none.
    pub console_listen: Option<SocketAddr>,
    /// The URL other replicas reach this one at; `None`: the listen address.
    pub advertise: Option<String>,
}

impl ServeConfig {
    /// A configuration for tests and examples: loopback on an OS-chosen port, defaults otherwise.
    pub fn for_data_dir(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().expect("valid"),
            data_dir: data_dir.to_path_buf(),
            store: None,
            tls: None,
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
            stun_listen: Some("127.0.0.1:0".parse().expect("valid")),
            metrics_listen: None,
            console_listen: None,
            advertise: None,
        }
    }

    /// The store this configuration names.
    pub fn store_url(&self) -> StoreUrl {
        self.store.clone().unwrap_or_else(|| StoreUrl::Sled(self.data_dir.join("store")))
    }

    pub fn resolve(args: ServeArgs) -> anyhow::Result<ServeConfig> {
        let file: FileConfig = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let file_duration = |name: &str, v: &Option<String>| -> anyhow::Result<Option<Duration>> {
            v.as_deref().map(|s| parse_duration(s).map_err(|e| anyhow::anyhow!("config file: {name}: {e}"))).transpose()
        };
        let defaults = Limits::default();
        let limits = Limits {
            ephemeral_node_timeout: args
                .ephemeral_node_timeout
                .or(file_duration("ephemeral_node_timeout", &file.ephemeral_node_timeout)?)
                .unwrap_or(defaults.ephemeral_node_timeout),
            node_lifetime: args
                .node_lifetime
                .or(file_duration("node_lifetime", &file.node_lifetime)?)
                .unwrap_or(defaults.node_lifetime),
            max_auth_key_expiry: args
                .max_auth_key_expiry
                .or(file_duration("max_auth_key_expiry", &file.max_auth_key_expiry)?)
                .unwrap_or(defaults.max_auth_key_expiry),
            cache_bytes: args.cache_mb.or(file.cache_mb).map_or(defaults.cache_bytes, |mb| mb << 20),
            max_store_connections: args
                .store_max_connections
                .or(file.store_max_connections)
                .unwrap_or(defaults.max_store_connections)
                .max(1),
            audit_retention: args
                .audit_retention
                .or(file_duration("audit_retention", &file.audit_retention)?)
                .unwrap_or(defaults.audit_retention),
            ..defaults
        };
        if limits.max_auth_key_expiry < limits.default_auth_key_expiry {
            bail!("max_auth_key_expiry must be at least the default auth key expiry (1h)");
        }
        let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(Tls { cert, key }),
            (None, None) => None,
            _ => bail!("TLS needs both tls_cert and tls_key"),
        };
        let listen = args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid"));
        let insecure = args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
        if tls.is_none() && !listen.ip().is_loopback() && !insecure {
            bail!(
                "refusing to serve plaintext gRPC on {listen}, which is not a loopback address: give --tls-cert \
                 and --tls-key, or --insecure-plaintext if something else encrypts the traffic"
            );
        }
        let console_listen = args.console_listen.or(file.console_listen);
        if let Some(console) = console_listen
            && tls.is_none()
            && !console.ip().is_loopback()
            && !insecure
        {
            bail!(
                "refusing to serve the console over plain HTTP on {console}, which is not a loopback address:                  give --tls-cert and --tls-key, or --insecure-plaintext if something else encrypts the traffic"
            );
        }
        let advertise = args.advertise.or(file.advertise);
        if let Some(url) = &advertise
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!(
                "--advertise: {} is not a URL; give http://host:port or https://host:port",
                crate::validate::quote(url)
            );
        }
        let store =
            args.store.or(file.store).map(|s| StoreUrl::parse(&s).map_err(|e| anyhow::anyhow!("--{e}"))).transpose()?;
        Ok(ServeConfig {
            listen,
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            store,
            tls,
            shutdown_grace: args
                .shutdown_grace
                .or(file_duration("shutdown_grace", &file.shutdown_grace)?)
                .unwrap_or(Duration::from_secs(10)),
            limits,
            stun_listen: Some(args.stun_listen.or(file.stun_listen).unwrap_or(SocketAddr::new(listen.ip(), 3478))),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            console_listen,
            advertise,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_plaintext_off_loopback() {
        let args = ServeArgs { listen: Some("0.0.0.0:7443".parse().unwrap()), ..Default::default() };
        let err = ServeConfig::resolve(args.clone()).unwrap_err().to_string();
        assert!(err.contains("--insecure-plaintext"), "{err}");
        assert!(ServeConfig::resolve(ServeArgs { insecure_plaintext: true, ..args }).is_ok());
        let console = ServeArgs { console_listen: Some("0.0.0.0:7444".parse().unwrap()), ..Default::default() };
        let err = ServeConfig::resolve(console.clone()).unwrap_err().to_string();
        assert!(err.contains("console") && err.contains("--insecure-plaintext"), "{err}");
        let local = ServeArgs { console_listen: Some("127.0.0.1:7444".parse().unwrap()), ..Default::default() };
        assert!(ServeConfig::resolve(local).unwrap().console_listen.is_some());
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cordon.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nephemeral_node_timeout = \"2m\"\ndata_dir = \"/x\"\n")
            .unwrap();
        let args = ServeArgs { config: Some(path.clone()), data_dir: Some("/y".into()), ..Default::default() };
        let cfg = ServeConfig::resolve(args).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.data_dir, PathBuf::from("/y"));
        assert_eq!(cfg.limits.ephemeral_node_timeout, Duration::from_secs(120));

        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let err =
            format!("{:#}", ServeConfig::resolve(ServeArgs { config: Some(path), ..Default::default() }).unwrap_err());
        assert!(err.contains("listn"), "{err}");
    }
}
