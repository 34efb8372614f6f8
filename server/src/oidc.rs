//! Federated admission: OIDC ID tokens (GitHub Actions' and others) checked against trust rules.
//!
//! The issuer's keys come from its discovery document's `jwks_uri` (read directly: GitHub's document
//! has no `authorization_endpoint`, which the openidconnect crate's discovery requires) and are cached;
//! a token whose key id is unknown makes one refetch (key rotation). The openidconnect crate checks the
//! signature (RS256, ES256), `iss`, `aud` and `exp`; this module adds `nbf` and `iat` with a small clock
//! skew, the rule's claim conditions, and a `jti` replay cache. Errors say which check failed and never
//! repeat the token.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openidconnect::core::{
    CoreGenderClaim, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use openidconnect::{AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IdTokenVerifier, IssuerUrl, Nonce};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{RunIdentity, TrustRule};
use crate::validate::quote;

/// Tolerated clock difference between the issuer and this server.
pub const SKEW: Duration = Duration::from_secs(60);
/// The claims of a run that a node's identity records, where present.
const RUN_CLAIMS: [&str; 12] = [
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "workflow",
    "run_id",
    "run_attempt",
    "actor",
    "ref",
    "sha",
    "environment",
    "job_workflow_ref",
];
const MAX_DOCUMENT: usize = 1 << 20;

/// Every claim beyond the standard ones.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct OtherClaims {
    #[serde(flatten)]
    claims: HashMap<String, serde_json::Value>,
}

impl AdditionalClaims for OtherClaims {}

type Token = IdToken<OtherClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

/// Why a token was refused: for every rule (bad signature, expired) or for this rule (audience, a condition).
#[derive(Debug)]
pub enum Refusal {
    Token(String),
    Rule(String),
}

/// What a rule (a node trust rule or an admin one) expects of a token.
#[derive(Clone, Copy, Debug)]
pub struct Expectation<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub conditions: &'a BTreeMap<String, String>,
    /// A claim kept with the run's identity besides the usual ones; empty for none.
    pub owner_claim: &'a str,
}

impl TrustRule {
    pub fn expectation(&self) -> Expectation<'_> {
        Expectation {
            issuer: &self.spec.issuer,
            audience: &self.spec.audience,
            conditions: &self.spec.conditions,
            owner_claim: &self.spec.owner_claim,
        }
    }
}

/// A token whose signature, issuer, audience and times hold.
struct Checked {
    subject: String,
    claims: HashMap<String, serde_json::Value>,
    expires: SystemTime,
}

/// A token a rule accepted.
#[derive(Debug)]
pub struct Verified {
    pub identity: RunIdentity,
    pub jti: Option<String>,
    pub expires: SystemTime,
}

struct IssuerKeys {
    set: CoreJsonWebKeySet,
    /// Key ids we refetched for, and when: an unknown key id refetches at most once a minute.
    refetched_for: HashMap<String, Instant>,
}

use crate::gateway::Https;

pub struct Oidc {
    http: Client<Https, Empty<bytes::Bytes>>,
    keys: tokio::sync::Mutex<HashMap<String, IssuerKeys>>,
}

impl Default for Oidc {
    fn default() -> Self {
        let https = crate::gateway::https_connector();
        Oidc { http: Client::builder(TokioExecutor::new()).build(https), keys: tokio::sync::Mutex::default() }
    }
}

fn segment_json(token: &str, index: usize) -> Option<serde_json::Value> {
    let part = token.split('.').nth(index)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?).ok()
}

/// Reads `iss` without verifying anything, to find the rules that may apply.
pub fn unverified_issuer(token: &str) -> Result<String, Error> {
    if token.split('.').count() != 3 {
        return Err(Error::invalid("oidc_token", "is not a JWT (three dot-separated parts)"));
    }
    segment_json(token, 1)
        .and_then(|claims| claims.get("iss").and_then(|v| v.as_str()).map(str::to_string))
        .ok_or_else(|| Error::invalid("oidc_token", "has no readable iss claim"))
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn claim_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Oidc {
    async fn get_json(&self, url: &str) -> Result<serde_json::Value, String> {
        let uri: hyper::Uri = url.parse().map_err(|_| format!("{url} is not a URL", url = quote(url)))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.http.get(uri))
            .await
            .map_err(|_| format!("{url} did not answer in 10 s"))?
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url} did not return JSON: {e}"))
    }

    async fn fetch_keys(&self, issuer: &str) -> Result<CoreJsonWebKeySet, String> {
        let discovery = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let doc = self.get_json(&discovery).await?;
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("{discovery} has no jwks_uri"))?
            .to_string();
        let jwks = self.get_json(&jwks_uri).await?;
        serde_json::from_value(jwks).map_err(|e| format!("{jwks_uri} is not a JSON Web Key Set: {e}"))
    }

    /// The issuer's keys; refetched when `kid` is not among them (once a minute per key id).
    async fn keys(&self, issuer: &str, kid: Option<&str>) -> Result<CoreJsonWebKeySet, String> {
        let mut cache = self.keys.lock().await;
        let has_kid = |set: &CoreJsonWebKeySet| {
            kid.is_none_or(|kid| {
                set.keys().iter().any(|k| openidconnect::JsonWebKey::key_id(k).is_some_and(|id| id.as_str() == kid))
            })
        };
        if let Some(cached) = cache.get_mut(issuer) {
            if has_kid(&cached.set) {
                return Ok(cached.set.clone());
            }
            let kid = kid.unwrap_or_default().to_string();
            if cached.refetched_for.get(&kid).is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
                return Ok(cached.set.clone());
            }
            cached.refetched_for.insert(kid, Instant::now());
        }
        let set = self.fetch_keys(issuer).await?;
        let refetched_for = cache.remove(issuer).map(|c| c.refetched_for).unwrap_or_default();
        cache.insert(issuer.to_string(), IssuerKeys { set: set.clone(), refetched_for });
        Ok(set)
    }

    /// Checks a person's ID token from a login provider (`audience` is its client id): signature,
    /// issuer, audience, expiry, `nbf` and `iat`. Returns the subject and every claim.
    pub async fn verify_id_token(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<(String, HashMap<String, serde_json::Value>), String> {
        let checked = self.check(token, issuer, audience, now).await.map_err(|r| match r {
            Refusal::Token(m) | Refusal::Rule(m) => m,
        })?;
        Ok((checked.subject, checked.claims))
    }

    /// The checks every token gets, whoever presents it.
    async fn check(&self, token: &str, issuer_url: &str, audience: &str, now: SystemTime) -> Result<Checked, Refusal> {
        let kid = segment_json(token, 0).and_then(|h| h.get("kid").and_then(|k| k.as_str()).map(str::to_string));
        let keys =
            self.keys(issuer_url, kid.as_deref()).await.map_err(|e| Refusal::Token(format!("issuer keys: {e}")))?;
        let parsed = Token::from_str(token).map_err(|_| Refusal::Token("not a valid ID token".into()))?;
        let issuer = IssuerUrl::new(issuer_url.to_string()).map_err(|_| Refusal::Rule("issuer: not a URL".into()))?;
        let checked_at: chrono::DateTime<chrono::Utc> = (now - SKEW).into();
        let latest_iat: chrono::DateTime<chrono::Utc> = (now + SKEW).into();
        let verifier = IdTokenVerifier::new_public_client(ClientId::new(audience.to_string()), issuer, keys)
            .set_allowed_algs([CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256, CoreJwsSigningAlgorithm::EcdsaP256Sha256])
            .set_time_fn(move || checked_at)
            .set_issue_time_verifier_fn(move |iat| {
                if iat > latest_iat { Err("iat: issued in the future".into()) } else { Ok(()) }
            });
        let claims = parsed.claims(&verifier, |_: Option<&Nonce>| Ok(())).map_err(|e| match e {
            ClaimsVerificationError::Expired(_) => Refusal::Token("expired".into()),
            ClaimsVerificationError::InvalidAudience(_) => {
                Refusal::Rule(format!("audience: the token is not for {audience:?}"))
            }
            ClaimsVerificationError::InvalidIssuer(_) => Refusal::Rule("issuer: does not match the rule".into()),
            ClaimsVerificationError::SignatureVerification(e) => Refusal::Token(format!("signature: {e}")),
            other => Refusal::Token(other.to_string()),
        })?;
        let expires: SystemTime = claims.expiration().into();
        let subject = claims.subject().as_str().to_string();
        // The signature holds: the payload as sent is what the issuer signed.
        let raw: HashMap<String, serde_json::Value> = segment_json(token, 1)
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| Refusal::Token("the claims are not a JSON object".into()))?;
        if let Some(nbf) = raw.get("nbf").and_then(serde_json::Value::as_u64)
            && UNIX_EPOCH.checked_add(Duration::from_secs(nbf)).is_none_or(|nbf| nbf > now + SKEW)
        {
            return Err(Refusal::Token("not valid yet (nbf)".into()));
        }
        Ok(Checked { subject, claims: raw, expires })
    }

    /// Checks `token` against what `rule` expects at time `now`.
    pub async fn verify(&self, token: &str, rule: Expectation<'_>, now: SystemTime) -> Result<Verified, Refusal> {
        let Checked { subject, claims: other, expires } = self.check(token, rule.issuer, rule.audience, now).await?;
        let other = &other;
        let value_of = |claim: &str| -> Option<String> {
            if claim == "sub" { Some(subject.clone()) } else { other.get(claim).and_then(claim_string) }
        };
        for (claim, pattern) in rule.conditions {
            match value_of(claim) {
                Some(value) if glob_match(pattern, &value) => {}
                Some(value) => {
                    return Err(Refusal::Rule(format!(
                        "condition {claim}: {value} does not match {pattern:?}",
                        value = quote(value)
                    )));
                }
                None => return Err(Refusal::Rule(format!("condition {claim}: the token has no {claim} claim"))),
            }
        }
        let mut run: BTreeMap<String, String> = RUN_CLAIMS
            .iter()
            .filter_map(|c| other.get(*c).and_then(claim_string).map(|v| (c.to_string(), v)))
            .collect();
        // The claim the rule takes the run's owner from is kept with the run, whatever it is.
        let owner_claim = rule.owner_claim;
        if !owner_claim.is_empty()
            && let Some(value) = value_of(owner_claim)
        {
            run.insert(owner_claim.to_string(), value);
        }
        Ok(Verified {
            identity: RunIdentity { issuer: rule.issuer.to_string(), subject, claims: run },
            jti: other.get("jti").and_then(claim_string),
            expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("refs/heads/*", "refs/heads/main"));
        assert!(glob_match("acme/*", "acme/api"));
        assert!(!glob_match("acme/*", "evil/acme/api"));
        assert!(glob_match("*-deploy-*", "prod-deploy-7"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn issuer_is_read_without_trusting_it() {
        let claims = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://token.actions.githubusercontent.com"}"#);
        assert_eq!(
            unverified_issuer(&format!("e30.{claims}.sig")).unwrap(),
            "https://token.actions.githubusercontent.com"
        );
        assert!(unverified_issuer("not-a-jwt").unwrap_err().to_string().starts_with("oidc_token:"));
    }
}
