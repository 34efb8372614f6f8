//! A test OIDC issuer served over HTTP on loopback (discovery and JWKS, with key rotation), and
//! GitHub-Actions-shaped ID tokens signed with the test keys in `tests/fixtures/oidc`.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/oidc");

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A test key: `rsa1`, `rsa2` (RS256) or `ec1` (ES256).
pub fn jwk(kid: &str) -> Value {
    serde_json::from_str(&fixture(&format!("{kid}.jwk.json"))).unwrap()
}

pub struct Issuer {
    pub url: String,
    keys: Arc<Mutex<Vec<Value>>>,
}

impl Issuer {
    /// Serves discovery (without `authorization_endpoint`, like GitHub's) and a JWKS holding `kids`.
    pub async fn start(kids: &[&str]) -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(kids.iter().map(|k| jwk(k)).collect::<Vec<_>>()));
        let (base, served) = (url.clone(), keys.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (base, served) = (base.clone(), served.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (status, body) = match path.as_str() {
                        "/.well-known/openid-configuration" => (
                            "200 OK",
                            json!({"issuer": base, "jwks_uri": format!("{base}/jwks"),
                                "subject_types_supported": ["public"], "response_types_supported": ["id_token"],
                                "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
                            .to_string(),
                        ),
                        "/jwks" => ("200 OK", json!({"keys": *served.lock().unwrap()}).to_string()),
                        _ => ("404 Not Found", "{}".to_string()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                });
            }
        });
        Issuer { url, keys }
    }

    /// Replaces the published keys (a rotation).
    pub fn publish(&self, kids: &[&str]) {
        *self.keys.lock().unwrap() = kids.iter().map(|k| jwk(k)).collect();
    }

    /// A trust rule admitting the CI runs of `acme/api` (audience `cordon`) to `tailnet` as `tag:ci`.
    pub fn ci_rule(&self, tailnet: &str) -> crate::v1::CreateTrustRuleRequest {
        crate::v1::CreateTrustRuleRequest {
            tailnet_id: tailnet.into(),
            issuer: self.url.clone(),
            audience: "cordon".into(),
            claim_conditions: [("repository".to_string(), "acme/api".to_string())].into(),
            tags: vec!["tag:ci".into()],
            max_node_lifetime_seconds: 1800,
            reason: "CI of acme/api".into(),
            ..Default::default()
        }
    }

    /// GitHub-Actions-shaped claims for `repository`, valid for ten minutes.
    pub fn claims(&self, audience: &str, repository: &str) -> Value {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        json!({
            "iss": self.url, "aud": audience, "sub": format!("repo:{repository}:ref:refs/heads/main"),
            "repository": repository, "repository_id": "4242", "repository_owner": repository.split('/').next().unwrap(),
            "workflow": "ci", "run_id": "1234567", "run_attempt": "1", "actor": "octocat", "ref": "refs/heads/main",
            "sha": "0123456789abcdef0123456789abcdef01234567", "event_name": "push",
            "jti": uuid::Uuid::now_v7().to_string(), "iat": now, "nbf": now, "exp": now + 600,
        })
    }
}

/// Signs `claims` with the test key `key`, announcing key id `kid` (they differ for a forgery).
pub fn sign(claims: &Value, key: &str, kid: &str) -> String {
    let pem = fixture(&format!("{key}.pem"));
    let (alg, encoding) = if key.starts_with("ec") {
        (jsonwebtoken::Algorithm::ES256, jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap())
    } else {
        (jsonwebtoken::Algorithm::RS256, jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap())
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}
