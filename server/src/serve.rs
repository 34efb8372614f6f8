//! Running the server in steps: [`Server::open`] (opens the store, binds nothing), [`Server::serve`]
//! on a listener the caller bound (so tests use 127.0.0.1:0), and a drain on the shutdown signal.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cordon_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::admin::AdminTokens;
use crate::api::admin_interceptor;
use crate::api::control::ControlApi;
use crate::api::node::NodeApi;
use crate::config::ServeConfig;
use crate::control_plane::ControlPlane;

/// The largest request the server decodes; bigger ones are refused before they are buffered.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

pub struct Server {
    pub config: ServeConfig,
    pub control_plane: Arc<ControlPlane>,
    pub admin_tokens: Arc<AdminTokens>,
    /// Set when this start wrote a new admin token.
    pub admin_token_created: Option<PathBuf>,
    metrics_listener: Option<TcpListener>,
    console_listener: Option<TcpListener>,
}

impl Server {
    /// Creates the data directory if needed, loads (or makes) the admin token and opens the store.
    pub async fn open(config: ServeConfig) -> anyhow::Result<Server> {
        create_private_dir(&config.data_dir)?;
        let (admin_tokens, admin_token_created) = AdminTokens::load_or_create(&config.data_dir)?;
        let url = config.store_url();
        let opened = ControlPlane::open(&url, config.limits.clone()).await;
        // PostgreSQL's errors name the server already; sled's need the directory.
        let control_plane = match url {
            crate::store::StoreUrl::Sled(_) => opened.with_context(|| format!("cannot open the store {url}"))?,
            crate::store::StoreUrl::Postgres(_) => opened?,
        };
        tracing::info!(store = %url, "store open");
        let admin_tokens = Arc::new(admin_tokens);
        Ok(Server {
            config,
            control_plane,
            admin_tokens,
            admin_token_created,
            metrics_listener: None,
            console_listener: None,
        })
    }

    /// Binds the metrics listener the configuration asks for (else [`Server::serve`] does); returns
    /// its address.
    pub async fn bind_metrics(&mut self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        if self.metrics_listener.is_none()
            && let Some(addr) = self.config.metrics_listen
        {
            self.metrics_listener = Some(agentd::metrics::bind(addr).await?);
        }
        self.metrics_listener.as_ref().map(|l| l.local_addr().context("metrics listener")).transpose()
    }

    /// Binds the console's listener the configuration asks for (else [`Server::serve`] does); returns
    /// its address.
    pub async fn bind_console(&mut self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        if self.console_listener.is_none()
            && let Some(addr) = self.config.console_listen
        {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the console on {addr} (set --console-listen)"))?;
            *self.control_plane.console_address.lock().unwrap() = Some(listener.local_addr()?);
            self.console_listener = Some(listener);
        }
        self.console_listener.as_ref().map(|l| l.local_addr().context("console listener")).transpose()
    }

    /// Serves gRPC on `listener` until `signal` completes, then ends every watch stream with a reason
    /// and waits up to the grace period for in-flight calls.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let cp = self.control_plane.clone();
        crate::gateway::spawn_audit_pruner(&cp, Arc::downgrade(&cp), cp.limits.audit_retention);
        if let Some(addr) = self.config.stun_listen {
            let port = crate::port::Port::bind(addr)
                .await
                .with_context(|| format!("cannot bind the UDP port (STUN, gateways) to {addr} (set --stun-listen)"))?;
            let bound = port.local_addr()?;
            let advertised = if bound.ip().is_unspecified() { format!(":{}", bound.port()) } else { bound.to_string() };
            *cp.stun_address.lock().unwrap() = Some(advertised);
            port.set_endpoints(crate::port::endpoints(bound, self.config.advertise.as_deref()).await);
            tracing::info!(%bound, gateways_at = ?port.endpoints(), "UDP port (STUN reflector, gateways' WireGuard) listening");
            cp.spawn(port.clone().run(cp.shutdown_signal()));
            let _ = cp.port.set(port);
        }
        let bound = listener.local_addr()?;
        let scheme = if self.config.tls.is_some() { "https" } else { "http" };
        let advertise = self.config.advertise.clone().unwrap_or_else(|| format!("{scheme}://{bound}"));
        *cp.advertise.lock().unwrap() = Some(advertise.clone());
        if cp.store.postgres().is_some() {
            // Replicas over one database: gateways go where their leases are.
            if self.config.advertise.is_none() && bound.ip().is_unspecified() {
                tracing::warn!(%advertise, "set --advertise: other replicas cannot dial an unspecified address");
            }
            let stun = cp.stun_address.lock().unwrap().clone().unwrap_or_default();
            let ca = match &self.config.tls {
                Some(tls) => {
                    Some(std::fs::read(&tls.cert).with_context(|| format!("cannot read {}", tls.cert.display()))?)
                }
                None => None,
            };
            crate::replica::Cluster::join(&cp, &self.config.data_dir, advertise, stun, self.admin_tokens.clone(), ca)
                .await?;
        } else {
            let tailnets = cp.all_tailnets().await?;
            for tailnet in &tailnets {
                crate::gateway::start(&cp, tailnet.id);
            }
            if !tailnets.is_empty() {
                tracing::info!(gateways = tailnets.len(), "starting the gateways of live tailnets");
            }
        }
        self.bind_metrics().await?;
        if let Some(listener) = self.metrics_listener.take() {
            let bound = listener.local_addr()?;
            *cp.metrics_address.lock().unwrap() = Some(bound);
            tracing::info!(%bound, "serving metrics at /metrics");
            let weak = Arc::downgrade(&cp);
            let scrape = move || {
                let cp = weak.clone();
                async move {
                    match cp.upgrade() {
                        Some(cp) => cp.render_metrics().await,
                        None => String::from("# EOF\n"),
                    }
                }
            };
            let mut stop = cp.shutdown_signal();
            cp.spawn(agentd::metrics::serve(listener, scrape, async move {
                crate::control_plane::stopped(&mut stop).await
            }));
        }
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<pb::control_server::ControlServer<ControlApi>>().await;
        health_reporter.set_serving::<pb::node_server::NodeServer<NodeApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection service")?;

        for token in cp.list_admin_tokens(None).await? {
            self.admin_tokens.remember(token);
        }
        self.admin_tokens.set_rules(cp.list_admin_trust_rules(None).await?);
        for hook in cp.list_webhooks().await? {
            crate::webhook::spawn(&cp, hook.id);
        }
        self.bind_console().await?;
        if let Some(listener) = self.console_listener.take() {
            let bound = listener.local_addr()?;
            let tls = match &self.config.tls {
                Some(tls) => Some(console_tls(tls)?),
                None => None,
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(%bound, "serving the console at {scheme}://{bound}/");
            let api = ControlApi::new(cp.clone(), self.admin_tokens.clone());
            let console = Arc::new(crate::console::Console::new(api, self.admin_tokens.clone(), tls.is_some()));
            let mut stop = cp.shutdown_signal();
            cp.spawn(console.serve(listener, tls, async move { crate::control_plane::stopped(&mut stop).await }));
        }
        let control = pb::control_server::ControlServer::new(ControlApi::new(cp.clone(), self.admin_tokens.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let control = InterceptedService::new(control, admin_interceptor(self.admin_tokens.clone()));
        let node =
            pb::node_server::NodeServer::new(NodeApi::new(cp.clone())).max_decoding_message_size(MAX_REQUEST_BYTES);

        let mut builder = tonic::transport::Server::builder()
            .layer(crate::metrics::GrpcLayer(cp.metrics.clone()))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_frame_size(Some(64 * 1024));
        if let Some(tls) = &self.config.tls {
            let cert = std::fs::read(&tls.cert).with_context(|| format!("cannot read {}", tls.cert.display()))?;
            let key = std::fs::read(&tls.key).with_context(|| format!("cannot read {}", tls.key.display()))?;
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .context("TLS certificate or key")?;
        }
        let mesh = pb::mesh_server::MeshServer::new(crate::api::mesh::MeshApi::new(cp.clone()))
            .max_decoding_message_size(1 << 20);
        let router = builder
            .add_service(health)
            .add_service(reflection)
            .add_service(control)
            .add_service(node)
            .add_service(mesh);

        let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let drain_cp = cp.clone();
        let shutdown = async move {
            signal.await;
            tracing::info!("shutting down: ending watch streams and draining calls");
            health_reporter.set_not_serving::<pb::node_server::NodeServer<NodeApi>>().await;
            drain_cp.begin_shutdown();
            let _ = fired_tx.send(());
        };
        // tonic applies its own TCP_NODELAY only to listeners it binds; without it, Nagle's algorithm
        // holds small netmap deltas back for a delayed ACK (~40 ms).
        let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
            if let Ok(conn) = &conn {
                let _ = conn.set_nodelay(true);
            }
            conn
        });
        let serve = router.serve_with_incoming_shutdown(incoming, shutdown);
        let grace = self.config.shutdown_grace;
        let deadline = async move {
            if fired_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = serve => result.context("gRPC server")?,
            _ = deadline => tracing::warn!(?grace, "grace period over; dropping the calls still in flight"),
        }
        cp.drain(grace).await;
        crate::replica::leave(&cp).await;
        cp.flush().await.context("final flush")?;
        Ok(())
    }
}

/// The console's TLS acceptor, with the gRPC listener's certificate and key.
fn console_tls(tls: &crate::config::Tls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the certificate {}", tls.cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("cannot read the key {}", tls.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the console's TLS certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}
