//! A test identity provider for people's logins, served over HTTP on loopback: OIDC discovery with a
//! `device_authorization_endpoint`, a JWKS, the device authorization endpoint, and a token endpoint
//! that answers `authorization_pending`, `slow_down`, `access_denied` and `expired_token` as RFC 8628
//! says. The test plays the person: it approves (or denies, or lets expire) a user code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const CLIENT_ID: &str = "cordon-test-client";
pub const CLIENT_SECRET: &str = "idp-client-secret-7f3a9c21e5d04b88";

/// Who approves a login, and what the ID token says about them.
#[derive(Clone, Debug)]
pub struct Person {
    pub subject: String,
    pub email: String,
    pub name: String,
    /// `None`: the ID token has no groups claim.
    pub groups: Option<Vec<String>>,
    /// The token's audience; the client id unless a test forges another.
    pub audience: Option<String>,
}

impl Person {
    pub fn new(subject: &str, email: &str, groups: &[&str]) -> Person {
        Person {
            subject: subject.into(),
            email: email.into(),
            name: email.split('@').next().unwrap_or_default().into(),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            audience: None,
        }
    }
}

#[derive(Clone, Debug)]
enum Decision {
    Pending,
    Approved(Person),
    Denied,
    Expired,
}

#[derive(Debug)]
struct Code {
    user_code: String,
    decision: Decision,
    /// When the token endpoint was polled for this code.
    polls: Vec<Instant>,
    /// How many more polls to answer `slow_down`.
    slow_downs: u32,
}

#[derive(Default)]
struct State {
    codes: HashMap<String, Code>,
    /// Every secret the IdP handed out or received (device codes, tokens, the client secret), for tests
    /// that search logs for them.
    secrets: Vec<String>,
    /// Polls of each new code answered `slow_down` before anything else.
    slow_downs: u32,
    /// Answers to the token endpoint that are not JSON.
    garbage: bool,
    /// Discovery without a device endpoint.
    no_device_endpoint: bool,
    /// Client authentications seen at the token endpoint that carried the right secret.
    authenticated: u32,
}

#[derive(Clone)]
pub struct Idp {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Idp {
    pub async fn start() -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let idp = Idp { url, state: Arc::default() };
        idp.state.lock().unwrap().secrets.push(CLIENT_SECRET.into());
        let served = idp.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let idp = served.clone();
                tokio::spawn(async move {
                    let Some((method, path, headers, body)) = read_request(&mut conn).await else { return };
                    let (status, body) = idp.answer(&method, &path, &headers, &body);
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                });
            }
        });
        idp
    }

    /// The person approves the login showing `user_code`.
    pub fn approve(&self, user_code: &str, person: Person) {
        self.decide(user_code, Decision::Approved(person));
    }

    pub fn deny(&self, user_code: &str) {
        self.decide(user_code, Decision::Denied);
    }

    /// The code runs out before anyone approves it.
    pub fn expire(&self, user_code: &str) {
        self.decide(user_code, Decision::Expired);
    }

    fn decide(&self, user_code: &str, decision: Decision) {
        let mut state = self.state.lock().unwrap();
        let code = state.codes.values_mut().find(|c| c.user_code == user_code).expect("a user code the IdP issued");
        code.decision = decision;
    }

    /// The next codes get `n` `slow_down` answers first.
    pub fn slow_down(&self, n: u32) {
        self.state.lock().unwrap().slow_downs = n;
    }

    /// The token endpoint answers with something that is not JSON.
    pub fn answer_garbage(&self) {
        self.state.lock().unwrap().garbage = true;
    }

    /// Discovery stops naming a device endpoint.
    pub fn drop_device_endpoint(&self) {
        self.state.lock().unwrap().no_device_endpoint = true;
    }

    /// When the token endpoint was polled for `user_code`.
    pub fn polls(&self, user_code: &str) -> Vec<Instant> {
        let state = self.state.lock().unwrap();
        state.codes.values().find(|c| c.user_code == user_code).map(|c| c.polls.clone()).unwrap_or_default()
    }

    /// Every secret the IdP issued or was given.
    pub fn secrets(&self) -> Vec<String> {
        self.state.lock().unwrap().secrets.clone()
    }

    /// How many token requests authenticated the client with the right secret.
    pub fn authenticated(&self) -> u32 {
        self.state.lock().unwrap().authenticated
    }

    fn answer(&self, method: &str, path: &str, headers: &str, body: &str) -> (&'static str, String) {
        let base = &self.url;
        let mut state = self.state.lock().unwrap();
        match (method, path) {
            ("GET", "/.well-known/openid-configuration") => {
                let mut doc = json!({
                    "issuer": base,
                    "authorization_endpoint": format!("{base}/authorize"),
                    "token_endpoint": format!("{base}/token"),
                    "jwks_uri": format!("{base}/jwks"),
                    "device_authorization_endpoint": format!("{base}/device"),
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"],
                });
                if state.no_device_endpoint {
                    doc.as_object_mut().unwrap().remove("device_authorization_endpoint");
                }
                ("200 OK", doc.to_string())
            }
            ("GET", "/jwks") => ("200 OK", json!({"keys": [crate::oidc::jwk("rsa1")]}).to_string()),
            ("POST", "/device") => {
                let form = cordon_server::console::form(body);
                if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) && !basic_auth(headers).0 {
                    return ("401 Unauthorized", json!({"error": "invalid_client"}).to_string());
                }
                let device_code = format!("device-{}", uuid::Uuid::now_v7().simple());
                let user_code = format!("{:04}-{:04}", rand::random::<u16>() % 10_000, rand::random::<u16>() % 10_000);
                state.secrets.push(device_code.clone());
                let slow_downs = state.slow_downs;
                state.codes.insert(
                    device_code.clone(),
                    Code { user_code: user_code.clone(), decision: Decision::Pending, polls: vec![], slow_downs },
                );
                let answer = json!({
                    "device_code": device_code, "user_code": user_code,
                    "verification_uri": format!("{base}/activate"),
                    "verification_uri_complete": format!("{base}/activate?user_code={user_code}"),
                    "expires_in": 300, "interval": 1,
                });
                ("200 OK", answer.to_string())
            }
            ("POST", "/token") => {
                if state.garbage {
                    return ("200 OK", "<html>this is not JSON</html>".into());
                }
                let form = cordon_server::console::form(body);
                let (basic, secret_ok) = basic_auth(headers);
                let authenticated = secret_ok || form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
                if !authenticated && (basic || form.contains_key("client_secret")) {
                    return ("401 Unauthorized", json!({"error": "invalid_client"}).to_string());
                }
                if authenticated {
                    state.authenticated += 1;
                }
                let device_code = form.get("device_code").cloned().unwrap_or_default();
                let Some(code) = state.codes.get_mut(&device_code) else {
                    return ("400 Bad Request", json!({"error": "invalid_grant"}).to_string());
                };
                code.polls.push(Instant::now());
                if code.slow_downs > 0 {
                    code.slow_downs -= 1;
                    return ("400 Bad Request", json!({"error": "slow_down"}).to_string());
                }
                let error = |e: &str| ("400 Bad Request", json!({"error": e}).to_string());
                match code.decision.clone() {
                    Decision::Pending => error("authorization_pending"),
                    Decision::Denied => error("access_denied"),
                    Decision::Expired => error("expired_token"),
                    Decision::Approved(person) => {
                        let id_token = self.id_token(&person);
                        let access_token = format!("access-{}", uuid::Uuid::now_v7().simple());
                        state.secrets.push(id_token.clone());
                        state.secrets.push(access_token.clone());
                        state.codes.remove(&device_code);
                        let answer = json!({"access_token": access_token, "token_type": "Bearer",
                            "expires_in": 3600, "id_token": id_token});
                        ("200 OK", answer.to_string())
                    }
                }
            }
            _ => ("404 Not Found", "{}".to_string()),
        }
    }

    fn id_token(&self, person: &Person) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let mut claims = json!({
            "iss": self.url, "aud": person.audience.clone().unwrap_or_else(|| CLIENT_ID.into()),
            "sub": person.subject, "email": person.email, "email_verified": true, "name": person.name,
            "iat": now, "nbf": now, "exp": now + 600,
        });
        if let Some(groups) = &person.groups {
            claims["groups"] = json!(groups);
        }
        crate::oidc::sign(&claims, "rsa1", "rsa1")
    }
}

/// (whether the request carried HTTP basic client authentication, whether it was the right one)
fn basic_auth(headers: &str) -> (bool, bool) {
    let Some(value) = headers.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization").then(|| value.trim().to_string())
    }) else {
        return (false, false);
    };
    let Some(encoded) = value.strip_prefix("Basic ") else { return (true, false) };
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default();
    let text = String::from_utf8_lossy(&decoded);
    let (id, secret) = text.split_once(':').unwrap_or_default();
    let form = cordon_server::console::form(&format!("id={id}&secret={secret}"));
    (true, form["id"] == CLIENT_ID && form["secret"] == CLIENT_SECRET)
}

/// One HTTP/1.1 request: method, path, the header block, and the body (by content-length).
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<(String, String, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end + 4..]).into_owned();
    let mut first = head.lines().next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    Some((method, path, head, body))
}
