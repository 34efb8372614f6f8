//! The operator's console: server-rendered HTML over the admin API, in the binary (no build step, no
//! CDN). `cordon serve --console-listen 127.0.0.1:7444` serves it.
//!
//! A person signs in with an admin token (an auditor's is enough to look; acting needs an operator's).
//! The token stays on the server, in the session; the browser holds only a random session id in a
//! cookie that is `HttpOnly`, `SameSite=Strict`, and `Secure` when served over TLS. Every page reads
//! through the same `Control` service the gRPC API serves (in process, with the session's principal), so
//! roles and owner scopes apply exactly as they do there, and a revoked token ends its sessions at once.
//! Every form that acts carries the session's CSRF token and is refused without it, or from another
//! origin. Every value is HTML-escaped; the Content-Security-Policy allows only the console's own
//! stylesheet and script. New audit events arrive over server-sent events.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cordon_proto::v1 as pb;
use cordon_proto::v1::control_server::Control;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;

use crate::admin::AdminTokens;
use crate::api::control::ControlApi;
use crate::model::{Principal, SecretHash};
use crate::secret::Secret;

const COOKIE: &str = "cordon_console";
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const MAX_FORM: usize = 16 * 1024;
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const CSS: &str = include_str!("console/console.css");
const JS: &str = include_str!("console/console.js");

type Body = UnsyncBoxBody<Bytes, std::convert::Infallible>;

struct Session {
    token: Secret,
    csrf: String,
    expires: Instant,
}

pub struct Console {
    api: ControlApi,
    tokens: Arc<AdminTokens>,
    sessions: Mutex<HashMap<SecretHash, Session>>,
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
}

/// HTML-escapes `s` (text and attribute values alike).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query or form value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes `application/x-www-form-urlencoded` text (a query string or a form body).
pub fn form(text: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    match std::str::from_utf8(bytes.get(i + 1..i + 3).unwrap_or(b""))
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, content_type.parse().expect("valid"));
    r
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    r.headers_mut().insert(header::LOCATION, to.parse().unwrap_or_else(|_| "/".parse().expect("valid")));
    r
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(|t| crate::time::rfc3339(UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, 0))).unwrap_or_default()
}

fn seconds(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds)
}

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}

/// A page in the console's frame.
fn page(title: &str, nav: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · Cordon</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <link rel=\"stylesheet\" href=\"/assets/console.css\"><script src=\"/assets/console.js\" defer></script></head>\
         <body><header><a class=\"brand\" href=\"/\">Cordon</a>{nav}</header><main>{body}</main></body></html>",
        title = esc(title)
    )
}

/// The actor a gateway request belongs to, for filters and charts: the person, the CI run, or the node.
fn identity_of(e: &pb::Event) -> String {
    if let Some(u) = &e.user {
        return u.email.clone();
    }
    if let Some(run) = e.run.as_ref().and_then(|r| r.claims.get("run_id")) {
        return format!("run {run}");
    }
    e.gateway.as_ref().map(|g| g.hostname.clone()).unwrap_or_default()
}

fn tokens_of(g: &pb::GatewayRequest) -> u64 {
    g.charged_tokens.max(g.input_tokens + g.output_tokens)
}

impl Console {
    pub fn new(api: ControlApi, tokens: Arc<AdminTokens>, secure: bool) -> Console {
        Console { api, tokens, sessions: Mutex::default(), secure }
    }

    /// Serves the console on `listener` until `stop` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        tokio::pin!(stop);
        loop {
            let (conn, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "console: accept failed");
                        continue;
                    }
                },
                _ = &mut stop => return,
            };
            let console = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let console = console.clone();
                    async move { Ok::<_, std::convert::Infallible>(console.handle(req).await) }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(conn).await {
                            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service).await;
                    }
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let mut response = self.route(req).await;
        let h = response.headers_mut();
        h.insert("content-security-policy", CSP.parse().expect("valid"));
        h.insert("x-content-type-options", "nosniff".parse().expect("valid"));
        h.insert("x-frame-options", "DENY".parse().expect("valid"));
        h.insert("referrer-policy", "same-origin".parse().expect("valid"));
        if !h.contains_key(header::CACHE_CONTROL) {
            h.insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
        }
        response
    }

    fn session(&self, req: &Request<Incoming>) -> Option<(Principal, String)> {
        let cookies = req.headers().get_all(header::COOKIE);
        let id = cookies.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })?;
        let hash = crate::secret::hash(&id);
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, s| s.expires > Instant::now());
        let session = sessions.get(&hash)?;
        // The token is checked on every request: a revoked or expired one ends the session.
        match self.tokens.authenticate(session.token.expose(), SystemTime::now()) {
            Ok(p) => Some((p, session.csrf.clone())),
            Err(_) => {
                sessions.remove(&hash);
                None
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = form(req.uri().query().unwrap_or(""));
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/assets/console.css") => asset("text/css; charset=utf-8", CSS),
            (Method::GET, "/assets/console.js") => asset("text/javascript; charset=utf-8", JS),
            (Method::GET, "/login") => full(StatusCode::OK, "text/html; charset=utf-8", login_page("")),
            (Method::POST, "/login") => self.sign_in(req).await,
            _ => {
                let Some((p, csrf)) = self.session(&req) else {
                    return redirect("/login");
                };
                let html = |status, body: String| full(status, "text/html; charset=utf-8", body);
                let result = match (req.method().clone(), path.as_str()) {
                    (Method::GET, "/") => self.tailnets(&p, &query).await,
                    (Method::GET, "/requests") => self.requests(&p, &query).await,
                    (Method::GET, "/run") => self.run(&p, &query).await,
                    (Method::GET, "/events") => return self.events(&p, &query).await,
                    (Method::GET, p_) if p_.starts_with("/tailnets/") => {
                        self.tailnet(&p, &csrf, &path["/tailnets/".len()..]).await
                    }
                    (Method::POST, "/logout") => return self.sign_out(req, &csrf).await,
                    (Method::POST, a) if a.starts_with("/actions/") => {
                        return self.act(req, &p, &csrf, &path["/actions/".len()..]).await;
                    }
                    _ => Err(Failure(StatusCode::NOT_FOUND, "no such page".into())),
                };
                match result {
                    Ok(body) => html(StatusCode::OK, page_with(&p, &csrf, &body)),
                    Err(Failure(status, message)) => html(
                        status,
                        page_with(
                            &p,
                            &csrf,
                            &format!("<h1>{}</h1><p class=\"error\">{}</p>", status.as_u16(), esc(&message)),
                        ),
                    ),
                }
            }
        }
    }

    async fn sign_in(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(fields) = read_form(req).await else {
            return full(
                StatusCode::BAD_REQUEST,
                "text/html; charset=utf-8",
                login_page("The form could not be read."),
            );
        };
        let token = fields.get("token").map(|t| t.trim().to_string()).unwrap_or_default();
        let principal = match self.tokens.authenticate(&token, SystemTime::now()) {
            Ok(p) => p,
            Err(_) => {
                // Never repeat what was typed: it may be some other secret.
                let message = "That is not a valid admin token (cordon-admin-…). Use one from `cordon token create` or <data-dir>/admin.token.";
                return full(StatusCode::UNAUTHORIZED, "text/html; charset=utf-8", login_page(message));
            }
        };
        let id = Secret::generate("");
        let csrf = Secret::generate("").into_exposed();
        let session = Session { token: Secret::from_string(token), csrf, expires: Instant::now() + SESSION_LIFETIME };
        self.sessions.lock().unwrap().insert(id.hash(), session);
        tracing::info!(actor = %principal.actor.0, role = principal.role.name(), "console: signed in");
        let mut r = redirect("/");
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            id.expose(),
            SESSION_LIFETIME.as_secs(),
            if self.secure { "; Secure" } else { "" }
        );
        r.headers_mut().insert(header::SET_COOKIE, cookie.parse().expect("valid"));
        r
    }

    async fn sign_out(&self, req: Request<Incoming>, csrf: &str) -> Response<Body> {
        let cookie = req.headers().get(header::COOKIE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if checked_form(req, csrf).await.is_err() {
            return full(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", "missing or wrong CSRF token");
        }
        if let Some(id) =
            cookie.split(';').find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_string))
        {
            self.sessions.lock().unwrap().remove(&crate::secret::hash(&id));
        }
        let mut r = redirect("/login");
        r.headers_mut().insert(header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0").parse().expect("valid"));
        r
    }

    // ---------------------------------------------------------------------------------------------
    // Pages

    async fn tailnets(&self, p: &Principal, query: &HashMap<String, String>) -> Result<String, Failure> {
        let owner = query.get("owner").cloned().unwrap_or_default();
        let label = query.get("label").cloned().unwrap_or_default();
        let req = pb::ListTailnetsRequest {
            owner: owner.clone(),
            label_selector: label.clone(),
            page_size: 200,
            ..Default::default()
        };
        let list = self.api.list_tailnets(as_(p, req)).await.map_err(Failure::from)?.into_inner();
        let mut rows = String::new();
        let midnight = now_seconds() - now_seconds() % 86_400;
        for t in &list.tailnets {
            let nodes = self.nodes(p, &t.id).await.unwrap_or_default();
            let online = nodes.iter().filter(|n| n.online).count();
            let events = self.audit(p, &t.id, Some(midnight)).await.unwrap_or_default();
            let spend: u64 = events.iter().filter_map(|e| e.gateway.as_ref()).map(tokens_of).sum();
            let labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))).collect();
            let ttl = match &t.expires_at {
                Some(at) => format!(
                    "<span class=\"countdown\" data-expires=\"{}\">{}</span>",
                    at.seconds,
                    esc(&time(&t.expires_at))
                ),
                None => "persistent".into(),
            };
            let _ = write!(
                rows,
                "<tr><td><a href=\"/tailnets/{id}\">{name}</a></td><td>{owner}</td><td>{labels}</td><td>{ttl}</td>\
                 <td>{online} / {total}</td><td>{gateway}</td><td class=\"num\">{spend}</td></tr>",
                id = esc(&t.id),
                name = esc(&t.name),
                owner = esc(&t.owner),
                labels = labels.join(", "),
                total = nodes.len(),
                gateway = if t.upstreams.is_empty() {
                    "running, no upstream".to_string()
                } else {
                    format!("running, {} upstream(s)", t.upstreams.len())
                },
            );
        }
        Ok(format!(
            "<h1>Tailnets</h1>\
             <form class=\"filters\" method=\"get\" action=\"/\"><label>Owner <input name=\"owner\" value=\"{owner}\"></label>\
             <label>Labels <input name=\"label\" value=\"{label}\" placeholder=\"env=prod\"></label><button>Filter</button></form>\
             <table id=\"tailnets\"><thead><tr><th>Name</th><th>Owner</th><th>Labels</th><th>Expires</th><th>Nodes online</th>\
             <th>Gateway</th><th>Tokens today</th></tr></thead><tbody>{rows}</tbody></table>",
            owner = esc(&owner),
            label = esc(&label),
        ))
    }

    async fn tailnet(&self, p: &Principal, csrf: &str, id: &str) -> Result<String, Failure> {
        let t = self
            .api
            .get_tailnet(as_(p, pb::GetTailnetRequest { id: id.into() }))
            .await
            .map_err(Failure::from)?
            .into_inner();
        let nodes = self.nodes(p, &t.id).await?;
        let operator = p.role.allows(crate::model::Action::Write);
        let action = |what: &str, id: &str, label: &str| {
            if !operator {
                return String::new();
            }
            format!(
                "<form class=\"act\" method=\"post\" action=\"/actions/{what}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"id\" value=\"{id}\"><input type=\"hidden\" name=\"back\" value=\"/tailnets/{tailnet}\">\
                 <input name=\"reason\" required placeholder=\"reason\"><button>{label}</button></form>",
                csrf = esc(csrf),
                id = esc(id),
                tailnet = esc(&t.id),
            )
        };
        let keys = self
            .api
            .list_auth_keys(as_(p, pb::ListAuthKeysRequest { tailnet_id: t.id.clone() }))
            .await
            .map_err(Failure::from)?
            .into_inner()
            .keys;
        let rules = self
            .api
            .list_trust_rules(as_(p, pb::ListTrustRulesRequest { tailnet_id: t.id.clone() }))
            .await
            .map_err(Failure::from)?
            .into_inner()
            .rules;
        let made_by: HashMap<&str, &str> = keys
            .iter()
            .map(|k| (k.id.as_str(), k.created_by.as_str()))
            .chain(rules.iter().map(|r| (r.id.as_str(), r.created_by.as_str())))
            .collect();
        let by = |id: &str| made_by.get(id).map(|who| format!(", made by {}", esc(who))).unwrap_or_default();
        let mut node_rows = String::new();
        for n in &nodes {
            let identity = match (&n.user, n.admission.as_ref().and_then(|a| a.run.as_ref())) {
                (Some(u), _) => format!("person {} ({})", esc(&u.email), esc(&u.groups.join(", "))),
                (None, Some(run)) => {
                    let claims: Vec<String> =
                        run.claims.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))).collect();
                    let link = run
                        .claims
                        .get("run_id")
                        .map(|r| {
                            format!(" <a href=\"/run?tailnet={}&amp;run={}\">run</a>", esc(&enc(&t.id)), esc(&enc(r)))
                        })
                        .unwrap_or_default();
                    format!("CI run {}{link}", claims.join(" "))
                }
                _ => format!("owner {}", esc(&n.owner)),
            };
            let admitted = match n.admission.as_ref() {
                Some(a) if !a.auth_key_id.is_empty() => {
                    format!("auth key {}{}", esc(&a.auth_key_id), by(&a.auth_key_id))
                }
                Some(a) if !a.trust_rule_id.is_empty() => {
                    format!("trust rule {}{}", esc(&a.trust_rule_id), by(&a.trust_rule_id))
                }
                _ if n.user.is_some() => "SSO login".into(),
                _ => String::new(),
            };
            let _ = write!(
                node_rows,
                "<tr><td>{host}</td><td>{addr}</td><td>{tags}</td><td>{identity}</td><td>{admitted}</td><td>{online}</td><td>{path}</td><td>{act}</td></tr>",
                host = esc(&n.hostname),
                addr = esc(n.addresses.first().map(String::as_str).unwrap_or("")),
                tags = esc(&n.tags.join(", ")),
                online = if n.online { "online" } else { "offline" },
                path = if n.endpoints.is_empty() {
                    "relay only (no endpoints)".to_string()
                } else {
                    format!("direct possible ({} endpoint(s)), relay", n.endpoints.len())
                },
                act = action("delete-node", &n.id, "Delete node"),
            );
        }
        let versions = self
            .api
            .list_policy_versions(as_(p, pb::ListPolicyVersionsRequest { tailnet_id: t.id.clone() }))
            .await
            .map_err(Failure::from)?
            .into_inner()
            .versions;
        let mut versions = versions;
        versions.sort_by_key(|v| v.version);
        let mut policy_rows = String::new();
        let mut previous = String::new();
        let mut shown = Vec::new();
        for v in &versions {
            let diff =
                similar::TextDiff::from_lines(&previous, &v.policy_json).unified_diff().context_radius(2).to_string();
            shown.push(format!(
                "<tr><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}<details><summary>diff</summary><pre>{}</pre></details></td></tr>",
                v.version,
                esc(&time(&v.created_at)),
                esc(&v.author),
                esc(&v.reason),
                esc(&v.summary),
                esc(&diff)
            ));
            previous = v.policy_json.clone();
        }
        for row in shown.iter().rev() {
            policy_rows.push_str(row);
        }
        let mut key_rows = String::new();
        for k in &keys {
            let _ = write!(
                key_rows,
                "<tr><td>{id}</td><td>{tags}</td><td>{state}</td><td>{uses}</td><td>{by}</td><td>{reason}</td><td>{act}</td></tr>",
                id = esc(&k.id),
                tags = esc(&k.tags.join(", ")),
                state = esc(&k.state),
                uses = k.uses,
                by = esc(&k.created_by),
                reason = esc(&k.reason),
                act = if k.state == "valid" { action("revoke-key", &k.id, "Revoke key") } else { String::new() },
            );
        }
        let mut upstream_rows = String::new();
        for u in &t.upstreams {
            let _ = write!(
                upstream_rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&u.name),
                esc(&u.kind),
                esc(&u.base_url),
                if u.api_key_set { "key set (write-only)" } else { "no key" }
            );
        }
        Ok(format!(
            "<h1>Tailnet {name}</h1><p class=\"meta\">owner {owner} · {cidr} · gateway {gw} · policy v{pv} · created by {by}</p>\
             <p><a href=\"/requests?tailnet={qid}\">Requests and spend</a> · <span class=\"live\" data-tailnet=\"{id}\">live events below</span></p>\
             <h2>Nodes</h2><table id=\"nodes\"><thead><tr><th>Host</th><th>Address</th><th>Tags</th><th>Identity</th><th>Admitted by</th>\
             <th>State</th><th>Paths</th><th></th></tr></thead><tbody>{node_rows}</tbody></table>\
             <h2>Policy versions</h2><table id=\"policy\"><thead><tr><th>Version</th><th>Time</th><th>Author</th><th>Reason</th>\
             <th>Change</th></tr></thead><tbody>{policy_rows}</tbody></table>\
             <h2>Auth keys</h2><table id=\"keys\"><thead><tr><th>Key</th><th>Tags</th><th>State</th><th>Uses</th><th>Created by</th><th>Reason</th><th></th></tr></thead>\
             <tbody>{key_rows}</tbody></table>\
             <h2>Upstreams</h2><table id=\"upstreams\"><thead><tr><th>Name</th><th>Kind</th><th>Base URL</th><th>Key</th></tr></thead><tbody>{upstream_rows}</tbody></table>\
             <h2>Live</h2><table id=\"live\" data-tailnet=\"{id}\"><thead><tr><th>Time</th><th>Kind</th><th>Actor</th><th>Summary</th></tr></thead><tbody></tbody></table>\
             {delete}",
            name = esc(&t.name),
            owner = esc(&t.owner),
            cidr = esc(&t.cidr),
            gw = esc(&t.gateway_address),
            pv = t.policy_version,
            by = esc(&t.created_by),
            id = esc(&t.id),
            qid = esc(&enc(&t.id)),
            delete = if operator {
                format!("<h2>Delete this tailnet</h2>{}", action("delete-tailnet", &t.id, "Delete tailnet"))
            } else {
                String::new()
            },
        ))
    }

    /// Everything one CI run (`run`, its `run_id` claim) or one person (`user`, their email) did.
    async fn run(&self, p: &Principal, query: &HashMap<String, String>) -> Result<String, Failure> {
        let tailnet = query.get("tailnet").cloned().unwrap_or_default();
        let run = query.get("run").cloned().unwrap_or_default();
        let user = query.get("user").cloned().unwrap_or_default();
        let events = self.audit(p, &tailnet, None).await?;
        let mine = |e: &pb::Event| {
            (!run.is_empty() && e.run.as_ref().and_then(|r| r.claims.get("run_id")) == Some(&run))
                || (!user.is_empty() && e.user.as_ref().is_some_and(|u| u.email == user))
        };
        let events: Vec<&pb::Event> = events.iter().filter(|e| mine(e)).collect();
        let title = if run.is_empty() { format!("Person {user}") } else { format!("CI run {run}") };
        let mut nodes: BTreeMap<String, String> = BTreeMap::new();
        let mut timeline = String::new();
        let (mut spent, mut blocked) = (0u64, 0usize);
        for e in &events {
            if !e.node_id.is_empty() {
                let who = e.gateway.as_ref().map(|g| g.hostname.clone()).unwrap_or_else(|| e.summary.clone());
                nodes.entry(e.node_id.clone()).or_insert(who);
            }
            match &e.gateway {
                Some(g) => {
                    spent += tokens_of(g);
                    let mut tools = String::new();
                    for t in &g.tool_calls {
                        blocked += usize::from(t.blocked);
                        let _ = write!(
                            tools,
                            "<li class=\"{class}\">{name} <code>{args}</code>{mark}</li>",
                            class = if t.blocked { "blocked" } else { "tool" },
                            name = esc(&t.name),
                            args = esc(&t.arguments),
                            mark = if t.blocked { " <strong>blocked</strong>" } else { "" },
                        );
                    }
                    let _ = write!(
                        timeline,
                        "<tr class=\"{decision}\"><td>{time}</td><td>{host}</td><td>{api} {model}</td><td>{decision}{rule}</td>\
                         <td class=\"num\">{tokens}</td><td class=\"num\">{ms:.1} ms</td><td><ul>{tools}</ul></td></tr>",
                        time = esc(&time(&e.time)),
                        host = esc(&g.hostname),
                        api = esc(&g.api),
                        model = esc(&g.model),
                        decision = esc(&g.decision),
                        rule = if g.rule.is_empty() { String::new() } else { format!(" ({})", esc(&g.rule)) },
                        tokens = tokens_of(g),
                        ms = g.latency_us as f64 / 1000.0,
                    );
                }
                None => {
                    let _ = write!(
                        timeline,
                        "<tr class=\"event\"><td>{}</td><td colspan=\"6\">{}: {}</td></tr>",
                        esc(&time(&e.time)),
                        esc(&kind_name(e.kind())),
                        esc(&e.summary)
                    );
                }
            }
        }
        let node_list: String =
            nodes.iter().map(|(id, host)| format!("<li>{} <code>{}</code></li>", esc(host), esc(id))).collect();
        Ok(format!(
            "<h1>{title}</h1><p class=\"meta\">{n} events · {spent} tokens · {blocked} blocked tool call(s)</p>\
             <h2>Nodes</h2><ul id=\"run-nodes\">{node_list}</ul><h2>Timeline</h2>\
             <table id=\"timeline\"><thead><tr><th>Time</th><th>Node</th><th>Request</th><th>Decision</th><th>Tokens</th>\
             <th>Latency</th><th>Tool calls</th></tr></thead><tbody>{timeline}</tbody></table>",
            title = esc(&title),
            n = events.len(),
        ))
    }

    async fn requests(&self, p: &Principal, query: &HashMap<String, String>) -> Result<String, Failure> {
        let get = |k: &str| query.get(k).cloned().unwrap_or_default();
        let (tailnet, identity, model, decision) = (get("tailnet"), get("identity"), get("model"), get("decision"));
        let hours: i64 =
            query.get("hours").and_then(|h| h.parse().ok()).filter(|h| (1..=24 * 30).contains(h)).unwrap_or(24);
        let since = now_seconds() - hours * 3600;
        let events = self.audit(p, &tailnet, Some(since)).await?;
        let requests: Vec<(&pb::Event, &pb::GatewayRequest)> = events
            .iter()
            .filter_map(|e| e.gateway.as_ref().map(|g| (e, g)))
            .filter(|(e, g)| {
                (identity.is_empty() || identity_of(e) == identity)
                    && (model.is_empty() || g.model == model)
                    && (decision.is_empty() || g.decision == decision)
            })
            .collect();
        let mut rows = String::new();
        for (e, g) in requests.iter().rev().take(500) {
            let who = identity_of(e);
            let link = match (&e.user, e.run.as_ref().and_then(|r| r.claims.get("run_id"))) {
                (Some(u), _) => format!(
                    "<a href=\"/run?tailnet={}&amp;user={}\">{}</a>",
                    esc(&enc(&tailnet)),
                    esc(&enc(&u.email)),
                    esc(&who)
                ),
                (None, Some(r)) => format!(
                    "<a href=\"/run?tailnet={}&amp;run={}\">{}</a>",
                    esc(&enc(&tailnet)),
                    esc(&enc(r)),
                    esc(&who)
                ),
                _ => esc(&who),
            };
            let tools: Vec<String> = g
                .tool_calls
                .iter()
                .map(|t| format!("{}{}", esc(&t.name), if t.blocked { " (blocked)" } else { "" }))
                .collect();
            let _ = write!(
                rows,
                "<tr class=\"{decision}\"><td>{time}</td><td>{link}</td><td>{model}</td><td>{decision}{rule}</td><td class=\"num\">{tokens}</td>\
                 <td class=\"num\">{ms:.1} ms</td><td>{tools}</td></tr>",
                time = esc(&time(&e.time)),
                model = esc(&g.model),
                decision = esc(&g.decision),
                rule = if g.rule.is_empty() { String::new() } else { format!(" ({})", esc(&g.rule)) },
                tokens = tokens_of(g),
                ms = g.latency_us as f64 / 1000.0,
                tools = tools.join(", "),
            );
        }
        let by_identity = chart("Tokens per identity", &requests, since, hours, |e, _| identity_of(e), tokens_of);
        let by_model = chart("Tokens per model", &requests, since, hours, |_, g| g.model.clone(), tokens_of);
        let refusals = chart(
            "Denied and blocked requests",
            &requests
                .iter()
                .filter(|(_, g)| g.decision == "denied" || g.decision == "blocked")
                .copied()
                .collect::<Vec<_>>(),
            since,
            hours,
            |_, g| g.decision.clone(),
            |_| 1,
        );
        let total: u64 = requests.iter().map(|(_, g)| tokens_of(g)).sum();
        Ok(format!(
            "<h1>Requests and spend</h1>\
             <form class=\"filters\" method=\"get\" action=\"/requests\"><input type=\"hidden\" name=\"tailnet\" value=\"{tailnet}\">\
             <label>Identity <input name=\"identity\" value=\"{identity}\"></label><label>Model <input name=\"model\" value=\"{model}\"></label>\
             <label>Decision <select name=\"decision\">{options}</select></label><label>Hours <input name=\"hours\" value=\"{hours}\" size=\"4\"></label>\
             <button>Filter</button></form>\
             <p class=\"meta\" id=\"spend\">{n} requests · {total} tokens in the last {hours} h</p>\
             <div class=\"charts\">{by_identity}{by_model}{refusals}</div>\
             <table id=\"requests\"><thead><tr><th>Time</th><th>Identity</th><th>Model</th><th>Decision</th><th>Tokens</th><th>Latency</th>\
             <th>Tool calls</th></tr></thead><tbody>{rows}</tbody></table>",
            tailnet = esc(&tailnet),
            identity = esc(&identity),
            model = esc(&model),
            n = requests.len(),
            options = ["", "allowed", "denied", "blocked", "failed"]
                .iter()
                .map(|d| format!(
                    "<option value=\"{d}\"{}>{}</option>",
                    if *d == decision { " selected" } else { "" },
                    if d.is_empty() { "any" } else { d }
                ))
                .collect::<String>(),
        ))
    }

    /// New audit events as server-sent events (`event: audit`, JSON data), from now on.
    async fn events(&self, p: &Principal, query: &HashMap<String, String>) -> Response<Body> {
        let tailnet = query.get("tailnet").cloned().unwrap_or_default();
        // Revision 0: from now on (the page shows what came before).
        let req = pb::WatchEventsRequest { tailnet_id: tailnet, since_revision: 0 };
        let stream = match self.api.watch_events(as_(p, req)).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                return full(StatusCode::FORBIDDEN, "text/plain; charset=utf-8", status.message().to_string());
            }
        };
        let frames = stream.map(|e| {
            let text = match e {
                Ok(e) => {
                    let data = serde_json::json!({
                        "time": time(&e.time), "kind": kind_name(e.kind()), "actor": e.actor, "summary": e.summary,
                    });
                    format!("event: audit\ndata: {data}\n\n")
                }
                Err(status) => format!("event: end\ndata: {}\n\n", serde_json::json!(status.message())),
            };
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(text)))
        });
        let hello = futures::stream::once(async { Ok(Frame::data(Bytes::from_static(b": connected\n\n"))) });
        let body = BodyExt::boxed_unsync(StreamBody::new(hello.chain(frames)));
        let mut r = Response::new(body);
        r.headers_mut().insert(header::CONTENT_TYPE, "text/event-stream".parse().expect("valid"));
        r
    }

    /// Deletes a node, revokes a key or deletes a tailnet, with the reason given, as the session's
    /// principal (an auditor is refused by the API), then goes back to where the form was.
    async fn act(&self, req: Request<Incoming>, p: &Principal, csrf: &str, what: &str) -> Response<Body> {
        // Browsers say where a form came from (Sec-Fetch-Site, Origin); the CSRF token is checked too.
        let header = |name| req.headers().get(name).and_then(|v: &hyper::header::HeaderValue| v.to_str().ok());
        let site_ok = header("sec-fetch-site").is_none_or(|s| s == "same-origin");
        let origin_ok = match (header("origin"), header("host")) {
            (None | Some("null"), _) => true,
            (Some(origin), Some(host)) => origin.split("://").nth(1) == Some(host),
            (Some(_), None) => false,
        };
        let same_origin = site_ok && origin_ok;
        let fields = match checked_form(req, csrf).await {
            Ok(f) if same_origin => f,
            _ => {
                let body = page(
                    "Refused",
                    "",
                    "<h1>403</h1><p class=\"error\">This action lacks the console's CSRF token (or came from another site): reload the page and try again.</p>",
                );
                return full(StatusCode::FORBIDDEN, "text/html; charset=utf-8", body);
            }
        };
        let id = fields.get("id").cloned().unwrap_or_default();
        let reason = fields.get("reason").cloned().unwrap_or_default();
        let back = fields
            .get("back")
            .filter(|b| b.starts_with('/') && !b.starts_with("//"))
            .cloned()
            .unwrap_or_else(|| "/".into());
        let result = match what {
            "delete-node" => self.api.delete_node(as_(p, pb::DeleteNodeRequest { id, reason })).await.map(|_| back),
            "revoke-key" => self
                .api
                .revoke_auth_key(as_(p, pb::RevokeAuthKeyRequest { id, reason, ..Default::default() }))
                .await
                .map(|_| back),
            "delete-tailnet" => {
                self.api.delete_tailnet(as_(p, pb::DeleteTailnetRequest { id, reason })).await.map(|_| "/".to_string())
            }
            _ => return full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "no such action"),
        };
        match result {
            Ok(to) => redirect(&to),
            Err(status) => {
                let Failure(code, message) = Failure::from(status);
                full(
                    code,
                    "text/html; charset=utf-8",
                    page("Refused", "", &format!("<h1>{}</h1><p class=\"error\">{}</p>", code.as_u16(), esc(&message))),
                )
            }
        }
    }

    async fn nodes(&self, p: &Principal, tailnet: &str) -> Result<Vec<pb::NodeInfo>, Failure> {
        let req = pb::ListNodesRequest { tailnet_id: tailnet.into() };
        Ok(self.api.list_nodes(as_(p, req)).await.map_err(Failure::from)?.into_inner().nodes)
    }

    /// The audit events of `tailnet` (every one the principal may read when empty), oldest first.
    async fn audit(&self, p: &Principal, tailnet: &str, since: Option<i64>) -> Result<Vec<pb::Event>, Failure> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = pb::ListAuditEventsRequest {
                tailnet_id: tailnet.into(),
                since: since.map(|s| prost_types::Timestamp { seconds: s, nanos: 0 }),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            };
            let page = self.api.list_audit_events(as_(p, req)).await.map_err(Failure::from)?.into_inner();
            out.extend(page.events);
            if page.next_page_token.is_empty() || out.len() >= 20_000 {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }
}

/// A request to the admin API as `p`.
fn as_<T>(p: &Principal, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(p.clone());
    r
}

fn kind_name(kind: pb::EventKind) -> String {
    kind.as_str_name().trim_start_matches("EVENT_KIND_").to_ascii_lowercase()
}

fn asset(content_type: &str, text: &'static str) -> Response<Body> {
    let mut r = full(StatusCode::OK, content_type, text);
    r.headers_mut().insert(header::CACHE_CONTROL, "max-age=300".parse().expect("valid"));
    r
}

fn login_page(message: &str) -> String {
    let error = if message.is_empty() { String::new() } else { format!("<p class=\"error\">{}</p>", esc(message)) };
    page(
        "Sign in",
        "",
        &format!(
            "<h1>Sign in</h1>{error}<form method=\"post\" action=\"/login\" class=\"login\">\
             <label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"off\" required></label>\
             <button>Sign in</button></form><p class=\"meta\">An auditor's token is enough to look; acting needs an operator's.</p>"
        ),
    )
}

/// A page with the signed-in navigation.
fn page_with(p: &Principal, csrf: &str, body: &str) -> String {
    let nav = format!(
        "<nav><a href=\"/\">Tailnets</a><a href=\"/requests\">Requests</a></nav>\
         <span class=\"who\">{actor} ({role}{scope})</span>\
         <form method=\"post\" action=\"/logout\" class=\"logout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button>Sign out</button></form>",
        actor = esc(&p.actor.0),
        role = p.role.name(),
        scope = p.scope.as_ref().map(|s| format!(", owner {}", esc(s))).unwrap_or_default(),
        csrf = esc(csrf),
    );
    page("Console", &nav, body)
}

/// Why a page could not be shown.
struct Failure(StatusCode, String);

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(code, s.message().to_string())
    }
}

async fn read_form(req: Request<Incoming>) -> Option<HashMap<String, String>> {
    let body = Limited::new(req.into_body(), MAX_FORM).collect().await.ok()?.to_bytes();
    Some(form(std::str::from_utf8(&body).ok()?))
}

/// The form of a POST, if it carries the session's CSRF token.
async fn checked_form(req: Request<Incoming>, csrf: &str) -> Result<HashMap<String, String>, ()> {
    let fields = read_form(req).await.ok_or(())?;
    let given = fields.get("csrf").map(String::as_str).unwrap_or("");
    // Compared as hashes: the time taken says nothing about how much of the token matched.
    if given.is_empty() || crate::secret::hash(given) != crate::secret::hash(csrf) {
        return Err(());
    }
    Ok(fields)
}

const COLORS: [&str; 8] = ["#2b6cb0", "#c05621", "#2f855a", "#b83280", "#6b46c1", "#b7791f", "#2c7a7b", "#718096"];

/// A stacked bar chart of `value` per hour-sized (or larger) bucket, one colour per `series`, drawn as
/// SVG on the server.
fn chart(
    title: &str,
    requests: &[(&pb::Event, &pb::GatewayRequest)],
    since: i64,
    hours: i64,
    series: impl Fn(&pb::Event, &pb::GatewayRequest) -> String,
    value: impl Fn(&pb::GatewayRequest) -> u64,
) -> String {
    let buckets = hours.clamp(1, 48) as usize;
    let width = (hours * 3600) as f64 / buckets as f64;
    let mut totals: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (e, g) in requests {
        let at = seconds(&e.time);
        let i = (((at - since).max(0) as f64) / width) as usize;
        let row = totals.entry(series(e, g)).or_insert_with(|| vec![0; buckets]);
        row[i.min(buckets - 1)] += value(g);
    }
    // The eight largest series; the rest as one.
    let mut ranked: Vec<(String, Vec<u64>)> = totals.into_iter().collect();
    ranked.sort_by_key(|(_, v)| std::cmp::Reverse(v.iter().sum::<u64>()));
    if ranked.len() > 8 {
        let rest: Vec<(String, Vec<u64>)> = ranked.split_off(7);
        let mut other = vec![0; buckets];
        for (_, v) in rest {
            for (o, x) in other.iter_mut().zip(v) {
                *o += x;
            }
        }
        ranked.push(("other".into(), other));
    }
    let peak = (0..buckets).map(|i| ranked.iter().map(|(_, v)| v[i]).sum::<u64>()).max().unwrap_or(0).max(1);
    let (w, h, bar) = (480.0, 160.0, 480.0 / buckets as f64);
    let mut svg = format!(
        "<figure class=\"chart\"><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h2}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        esc(title),
        h2 = h + 20.0
    );
    for i in 0..buckets {
        let mut y = h;
        for (k, (_, v)) in ranked.iter().enumerate() {
            if v[i] == 0 {
                continue;
            }
            let height = v[i] as f64 / peak as f64 * (h - 10.0);
            y -= height;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{height:.1}\" fill=\"{c}\"></rect>",
                x = i as f64 * bar + 1.0,
                bw = (bar - 2.0).max(1.0),
                c = COLORS[k % COLORS.len()]
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{}\" class=\"axis\">{} h ago</text><text x=\"{w}\" y=\"{}\" text-anchor=\"end\" class=\"axis\">now · peak {peak}</text></svg><ul class=\"legend\">",
        h + 16.0,
        hours,
        h + 16.0
    );
    for (k, (name, v)) in ranked.iter().enumerate() {
        let _ = write!(
            svg,
            "<li><span class=\"swatch c{}\"></span>{} <span class=\"num\">{}</span></li>",
            k % COLORS.len(),
            esc(name),
            v.iter().sum::<u64>()
        );
    }
    svg.push_str("</ul></figure>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(esc("<script>alert(1)</script>"), "&lt;script&gt;alert(1)&lt;/script&gt;");
        assert_eq!(esc("\"><img src=x onerror=alert(2)>"), "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;");
        assert_eq!(esc("a'b&c"), "a&#39;b&amp;c");
    }

    #[test]
    fn forms_decode() {
        let f = form("token=cordon-admin-a%2Bb&reason=two+words&empty=&flag");
        assert_eq!(f["token"], "cordon-admin-a+b");
        assert_eq!(f["reason"], "two words");
        assert_eq!(f["empty"], "");
        assert_eq!(f["flag"], "");
        assert_eq!(form("x=%zz%4")["x"], "%zz%4");
        assert_eq!(enc("a b/&"), "a%20b%2F%26");
    }
}
