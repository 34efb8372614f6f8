//! People's logins: the OAuth 2.0 device authorization grant (RFC 8628), run by the server against a
//! tailnet's login provider with the openidconnect crate, so the client secret never leaves it.
//!
//! `StartLogin` spawns one task per login. The task reads the provider's discovery document (which must
//! name a `device_authorization_endpoint`), asks for a device code, hands the verification URI and user
//! code back, then polls the token endpoint at the interval the IdP sets (`slow_down` adds 5 s) until
//! the person approves or denies, or the code expires. An approved login's ID token is verified
//! (signature, issuer, audience = client id, expiry) and checked against the provider's rules (email
//! domain, groups); then the node is admitted, owned by that person. `WaitLogin` waits for the outcome,
//! which it hands over once. Nothing about the device code, the tokens or the client secret is logged
//! or returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod, CoreDeviceAuthorizationResponse,
    CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalProviderMetadata, ClientId, ClientSecret, DeviceAuthorizationUrl, IssuerUrl, ProviderMetadata,
    RequestTokenError, Scope,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::control_plane::ControlPlane;
use crate::domain::{self, PersonLogin};
use crate::error::{Error, Result};
use crate::model::{LoginProvider, Node, SecretHash, Tailnet, TailnetId};
use crate::reaper::Deadline;
use crate::secret::{SESSION_PREFIX, Secret};

/// How long a finished login's outcome waits for its WaitLogin before it is forgotten.
const OUTCOME_KEPT: Duration = Duration::from_secs(300);
/// The longest a login may wait for the person, whatever the IdP says.
const MAX_LOGIN: Duration = Duration::from_secs(30 * 60);
const MAX_RESPONSE: usize = 1 << 20;
const LOGIN_PREFIX: &str = "cordon-login-";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct DeviceEndpoint {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}

impl AdditionalProviderMetadata for DeviceEndpoint {}

type DeviceProviderMetadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// What the person is shown.
#[derive(Clone, Debug)]
pub struct Started {
    pub login_id: Secret,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_at: SystemTime,
    pub provider: String,
    pub issuer: String,
}

/// A login's outcome: the admitted node and its session, or why not.
type Outcome = std::result::Result<(Node, Tailnet, Secret), Error>;

struct Pending {
    outcome: watch::Sender<Option<Outcome>>,
}

/// How a login task hands the login over: its id, where to say it started, and where its outcome
/// waits for WaitLogin.
struct Handoff {
    login_id: Secret,
    started: oneshot::Sender<Result<Started>>,
    pending: Arc<Pending>,
}

/// What a login asks for, after validation.
#[derive(Clone, Debug)]
pub struct LoginRequest {
    pub tailnet: TailnetId,
    pub wireguard_public_key: [u8; 32],
    pub hostname: String,
    pub requested_tags: Vec<String>,
    pub endpoints: Vec<std::net::SocketAddr>,
}

type HttpClient = Client<crate::gateway::Https, Full<Bytes>>;

pub struct Logins {
    http: HttpClient,
    pending: Mutex<HashMap<SecretHash, Arc<Pending>>>,
    /// Login tasks running now (StartLogin needs no credential: this bounds what callers can start).
    running: Arc<std::sync::atomic::AtomicUsize>,
}

/// The most logins that may wait for their people at once.
const MAX_RUNNING: usize = 1024;

/// Counts a running login task while it lives.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for Logins {
    fn default() -> Self {
        Logins {
            http: Client::builder(TokioExecutor::new()).build(crate::gateway::https_connector()),
            pending: Mutex::default(),
            running: Arc::default(),
        }
    }
}

/// One HTTP exchange for the openidconnect crate: 10 s at most, no redirects, bodies up to 1 MiB.
async fn send(http: HttpClient, request: openidconnect::HttpRequest) -> std::io::Result<openidconnect::HttpResponse> {
    let (parts, body) = request.into_parts();
    let request = hyper::Request::from_parts(parts, Full::new(Bytes::from(body)));
    let host = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    let response = tokio::time::timeout(Duration::from_secs(10), http.request(request))
        .await
        .map_err(|_| std::io::Error::other(format!("{host} did not answer in 10 s")))?
        .map_err(|e| std::io::Error::other(format!("cannot reach {host}: {}", chain(&e))))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| std::io::Error::other(format!("reading the answer of {host}: {e}")))?
        .to_bytes();
    Ok(openidconnect::http::Response::from_parts(parts, body.to_vec()))
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The provider's discovery document and keys, and its device endpoint.
async fn discover(
    http: &HttpClient,
    provider: &LoginProvider,
) -> Result<(DeviceProviderMetadata, DeviceAuthorizationUrl)> {
    let named =
        |what: String| Error::Unavailable(format!("login provider {} ({}): {what}", provider.name, provider.issuer));
    let issuer = IssuerUrl::new(provider.issuer.clone()).map_err(|_| named("the issuer is not a URL".into()))?;
    let client = |r: openidconnect::HttpRequest| send(http.clone(), r);
    let metadata = DeviceProviderMetadata::discover_async(issuer, &client)
        .await
        .map_err(|e| named(format!("discovery failed: {}", chain(&e))))?;
    let device = metadata.additional_metadata().device_authorization_endpoint.clone().ok_or_else(|| {
        named(
            "its discovery document names no device_authorization_endpoint: the IdP does not offer the device \
             authorization grant (enable it for this client)"
                .into(),
        )
    })?;
    Ok((metadata, device))
}

impl Logins {
    /// Checks that `provider` can run logins: its discovery document is readable and names a device
    /// endpoint. Errors name the provider.
    pub async fn check(&self, provider: &LoginProvider) -> Result<()> {
        discover(&self.http, provider).await.map(|_| ())
    }

    /// The login in progress under `hash`, if any (WaitLogin removes a successful one).
    fn pending(&self, hash: &SecretHash) -> Option<Arc<Pending>> {
        self.pending.lock().unwrap().get(hash).cloned()
    }
}

/// What an ID token says about a person, checked against the provider's rules.
#[derive(Debug)]
struct Person {
    subject: String,
    email: String,
    name: String,
    groups: Vec<String>,
}

fn person(provider: &LoginProvider, subject: String, claims: &HashMap<String, serde_json::Value>) -> Result<Person> {
    let refuse = |why: String| Error::PermissionDenied(format!("login provider {}: {why}", provider.name));
    let email = claims.get("email").and_then(|v| v.as_str()).filter(|e| e.contains('@')).ok_or_else(|| {
        refuse("the ID token has no email claim; ask for the `email` scope or enable it at the IdP".into())
    })?;
    let email = email.to_ascii_lowercase();
    if claims.get("email_verified").and_then(serde_json::Value::as_bool) == Some(false) {
        return Err(refuse(format!("{email} is not verified at the identity provider")));
    }
    let domain = email.rsplit('@').next().unwrap_or_default();
    if !provider.allowed_email_domains.is_empty() && !provider.allowed_email_domains.iter().any(|d| d == domain) {
        return Err(refuse(format!(
            "the email domain {domain} is not allowed (allowed: {})",
            provider.allowed_email_domains.join(", ")
        )));
    }
    let groups = match claims.get(&provider.groups_claim) {
        Some(serde_json::Value::Array(items)) => {
            Some(items.iter().filter_map(|g| g.as_str().map(str::to_string)).collect::<Vec<_>>())
        }
        Some(serde_json::Value::String(one)) => Some(vec![one.clone()]),
        _ => None,
    };
    if !provider.allowed_groups.is_empty() {
        let Some(groups) = &groups else {
            return Err(refuse(format!(
                "the ID token has no {} claim, and only members of [{}] may log in; have the IdP send groups \
                 (a scope or an app setting)",
                provider.groups_claim,
                provider.allowed_groups.join(", ")
            )));
        };
        if !groups.iter().any(|g| provider.allowed_groups.contains(g)) {
            return Err(refuse(format!(
                "{email} is in none of the groups that may log in ([{}])",
                provider.allowed_groups.join(", ")
            )));
        }
    }
    let name = ["name", "preferred_username"]
        .iter()
        .find_map(|c| claims.get(*c).and_then(|v| v.as_str()))
        .unwrap_or(&email)
        .chars()
        .take(128)
        .collect();
    Ok(Person { subject, email, name, groups: groups.unwrap_or_default() })
}

impl ControlPlane {
    /// Starts a person's login with the tailnet's login provider; returns what they are shown.
    pub async fn start_login(self: &Arc<Self>, request: LoginRequest) -> Result<Started> {
        let provider = {
            let mut tx = self.store.read().await?;
            domain::login_provider_for(&mut tx, request.tailnet).await?
        };
        let running = &self.logins.running;
        if running.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= MAX_RUNNING {
            running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::ResourceExhausted(format!(
                "{MAX_RUNNING} logins are waiting for their people already; try again in a few minutes"
            )));
        }
        let counted = Running(running.clone());
        let login_id = Secret::generate(LOGIN_PREFIX);
        let (outcome, _) = watch::channel(None);
        let pending = Arc::new(Pending { outcome });
        let (started_tx, started_rx) = oneshot::channel();
        let cp = self.clone();
        let hash = login_id.hash();
        let id = login_id.clone();
        tokio::spawn(async move {
            let mut shutdown = cp.shutdown_signal();
            let mut who = String::new();
            let handoff = Handoff { login_id: id, started: started_tx, pending: pending.clone() };
            let run = cp.run_login(provider, request.clone(), handoff, &mut who);
            let result = tokio::select! {
                result = run => result,
                _ = crate::control_plane::stopped(&mut shutdown) => {
                    Err(Error::Unavailable("the server is shutting down; log in again".into()))
                }
            };
            if let Err(e) = &result {
                tracing::info!(tailnet = %request.tailnet, error = %e, "login failed");
                let mut tx = match cp.store.write().await {
                    Ok(tx) => tx,
                    Err(_) => return,
                };
                domain::record_login_refused(&mut tx, request.tailnet, &who, &e.to_string(), cp.clock.now());
                if let Err(e) = tx.commit().await {
                    tracing::warn!(error = %e, "could not record a refused login");
                }
            }
            pending.outcome.send_replace(Some(result));
            drop(counted);
            tokio::time::sleep(OUTCOME_KEPT).await;
            cp.logins.pending.lock().unwrap().remove(&hash);
        });
        started_rx.await.map_err(|_| Error::Unavailable("the login ended before it started; try again".into()))?
    }

    /// The login task: device code, then polling, then admission.
    async fn run_login(
        &self,
        provider: LoginProvider,
        request: LoginRequest,
        handoff: Handoff,
        who: &mut String,
    ) -> Outcome {
        let Handoff { login_id, started, pending } = handoff;
        let hash = login_id.hash();
        let http = self.logins.http.clone();
        let client_fn = |r: openidconnect::HttpRequest| send(http.clone(), r);
        let begun = async {
            let (metadata, device) = discover(&http, &provider).await?;
            let client = CoreClient::from_provider_metadata(
                metadata,
                ClientId::new(provider.client_id.clone()),
                provider.client_secret.as_ref().map(|s| ClientSecret::new(s.expose().to_string())),
            )
            .set_device_authorization_url(device);
            let scopes = provider.scopes.iter().filter(|s| *s != "openid").map(|s| Scope::new(s.clone()));
            let details: CoreDeviceAuthorizationResponse =
                client.exchange_device_code().add_scopes(scopes).request_async(&client_fn).await.map_err(|e| {
                    Error::Unavailable(format!(
                        "login provider {}: the device authorization request failed: {}",
                        provider.name,
                        token_error(&e)
                    ))
                })?;
            Ok::<_, Error>((client, details))
        };
        let (client, details) = match begun.await {
            Ok(r) => r,
            Err(e) => {
                let _ = started.send(Err(e.clone()));
                return Err(e);
            }
        };
        let lifetime = details.expires_in().min(MAX_LOGIN);
        let shown = Started {
            login_id,
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details.verification_uri_complete().map(|u| u.secret().to_string()),
            user_code: details.user_code().secret().to_string(),
            expires_at: self.clock.now() + lifetime,
            provider: provider.name.clone(),
            issuer: provider.issuer.clone(),
        };
        self.logins.pending.lock().unwrap().insert(hash, pending.clone());
        if started.send(Ok(shown)).is_err() {
            return Err(Error::Unavailable("the caller left before the login started".into()));
        }
        tracing::info!(tailnet = %request.tailnet, provider = %provider.name, "login started; waiting for the person");

        let poll = client
            .exchange_device_access_token(&details)
            .map_err(|e| Error::Unavailable(format!("login provider {}: {}", provider.name, chain(&e))))?;
        let token = poll.request_async(&client_fn, tokio::time::sleep, Some(lifetime)).await.map_err(|e| match &e {
            RequestTokenError::ServerResponse(r) => match r.error() {
                openidconnect::DeviceCodeErrorResponseType::AccessDenied => {
                    Error::PermissionDenied(format!("login provider {}: the login was denied", provider.name))
                }
                openidconnect::DeviceCodeErrorResponseType::ExpiredToken => Error::Unauthenticated(format!(
                    "login provider {}: the code expired before anyone approved it; log in again",
                    provider.name
                )),
                _ => Error::Unavailable(format!("login provider {}: {}", provider.name, token_error(&e))),
            },
            _ => Error::Unavailable(format!("login provider {}: {}", provider.name, token_error(&e))),
        })?;
        let id_token = token.extra_fields().id_token().map(ToString::to_string).ok_or_else(|| {
            Error::Unavailable(format!(
                "login provider {}: the token response has no id_token (is `openid` among the client's scopes?)",
                provider.name
            ))
        })?;
        let now = self.clock.now();
        let (subject, claims) =
            self.oidc.verify_id_token(&id_token, &provider.issuer, &provider.client_id, now).await.map_err(|e| {
                Error::Unauthenticated(format!("login provider {}: the ID token was refused: {e}", provider.name))
            })?;
        let person = match person(&provider, subject, &claims) {
            Ok(p) => p,
            Err(e) => {
                // Name who was refused in the audit log.
                if let Some(email) = claims.get("email").and_then(|v| v.as_str()) {
                    *who = email.to_string();
                }
                return Err(e);
            }
        };
        let session = Secret::generate(SESSION_PREFIX);
        let login = PersonLogin {
            tailnet: request.tailnet,
            provider: provider.id,
            login_lifetime: Duration::from_secs(provider.login_lifetime_seconds),
            issuer: provider.issuer.clone(),
            subject: person.subject,
            email: person.email,
            display_name: person.name,
            groups: person.groups,
            wireguard_public_key: request.wireguard_public_key,
            hostname: request.hostname,
            requested_tags: request.requested_tags,
            endpoints: request.endpoints,
        };
        let mut tx = self.store.write().await?;
        let (node, tailnet, user) =
            domain::log_in(&mut tx, login, session.hash(), self.limits.node_lifetime, &self.policies, now).await?;
        tx.commit().await?;
        self.reaper.schedule(node.expires_at, Deadline::NodeExpiry(node.id));
        if let Some(u) = &node.user {
            self.reaper.schedule(u.login_expires_at, Deadline::LoginExpiry(node.id));
        }
        tracing::info!(node = %node.id, tailnet = %tailnet.id, user = %user.id, address = %node.address, "person logged in");
        Ok((node, tailnet, session))
    }

    /// Waits for a login's outcome; a successful one is handed over once.
    pub async fn wait_login(&self, login_id: &str) -> Result<(Node, Tailnet, Secret)> {
        let hash = crate::secret::hash(login_id);
        let pending = self.logins.pending(&hash).ok_or_else(|| Error::NotFound {
            what: "login",
            id: "(login_id): none in progress with this id (it finished, or the server restarted); log in again".into(),
        })?;
        let mut rx = pending.outcome.subscribe();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Unavailable("the login ended; log in again".into()))?
            .clone()
            .expect("waited for it");
        if outcome.is_ok() {
            self.logins.pending.lock().unwrap().remove(&hash);
        }
        outcome
    }

    /// Ends the login of a person's node whose login expired (a no-op otherwise).
    pub(crate) async fn expire_login(&self, id: crate::model::NodeId) -> Result<()> {
        let mut tx = self.store.write().await?;
        let ended = domain::expire_login(&mut tx, id, self.clock.now()).await?;
        tx.commit().await?;
        if ended.is_some() {
            self.hub().forget(id);
            tracing::info!(node = %id, "a person's login expired");
        }
        Ok(())
    }
}

/// A token endpoint's error, without the response body.
fn token_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse + 'static>(
    e: &RequestTokenError<RE, T>,
) -> String {
    match e {
        RequestTokenError::ServerResponse(r) => format!("the IdP answered {r}"),
        RequestTokenError::Request(e) => chain(e),
        RequestTokenError::Parse(e, _) => format!("the IdP's answer is not valid JSON of the expected shape: {e}"),
        RequestTokenError::Other(m) => m.clone(),
    }
}

// -----------------------------------------------------------------------------------------------------
// Login providers and users

impl ControlPlane {
    /// Creates a login provider after checking that its issuer runs the device flow.
    pub async fn create_login_provider(
        &self,
        provider: LoginProvider,
        actor: &crate::model::Actor,
    ) -> Result<LoginProvider> {
        self.logins.check(&provider).await.map_err(|e| match e {
            Error::Unavailable(m) => Error::invalid("issuer", m),
            other => other,
        })?;
        let mut tx = self.store.write().await?;
        let provider = domain::create_login_provider(&mut tx, provider, actor).await?;
        tx.commit().await?;
        tracing::info!(provider = %provider.id, name = %provider.name, issuer = %provider.issuer, "login provider created");
        Ok(provider)
    }

    pub async fn login_providers(&self) -> Result<Vec<LoginProvider>> {
        self.store.read().await?.login_providers().await
    }

    pub async fn delete_login_provider(
        &self,
        provider: &LoginProvider,
        reason: &str,
        actor: &crate::model::Actor,
    ) -> Result<()> {
        let mut tx = self.store.write().await?;
        domain::delete_login_provider(&mut tx, provider, reason, actor, self.clock.now()).await?;
        tx.commit().await
    }

    pub async fn users(&self) -> Result<Vec<crate::model::User>> {
        self.store.read().await?.users().await
    }

    /// A user by id or email, with their nodes.
    pub async fn user(&self, id_or_email: &str) -> Result<(crate::model::User, Vec<Node>)> {
        let mut tx = self.store.read().await?;
        let user = match crate::model::UserId::parse("id", id_or_email) {
            Ok(id) => tx.user(id).await?,
            Err(_) if id_or_email.contains('@') => {
                let email = id_or_email.to_ascii_lowercase();
                tx.users().await?.into_iter().find(|u| u.email == email)
            }
            Err(e) => return Err(e),
        };
        let user = user.ok_or_else(|| Error::not_found("user", crate::validate::quote(id_or_email)))?;
        let nodes = domain::nodes_of_user(&mut tx, &user).await?;
        Ok((user, nodes))
    }

    /// Offboards a person: their nodes are cut off at once, with the reason.
    pub async fn delete_user(
        &self,
        id: crate::model::UserId,
        reason: &str,
        actor: &crate::model::Actor,
    ) -> Result<usize> {
        let mut tx = self.store.write().await?;
        let (user, nodes) = domain::delete_user(&mut tx, id, reason, actor, self.clock.now()).await?;
        tx.commit().await?;
        for n in &nodes {
            self.hub().forget(*n);
        }
        tracing::info!(user = %user.id, nodes = nodes.len(), "user deleted");
        Ok(nodes.len())
    }
}
