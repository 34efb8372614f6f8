//! Admin credentials: the bootstrap token written to `<data-dir>/admin.token` on first start (role
//! `admin`, every owner), the tokens made through the API (a role and an optional owner scope, stored as
//! hashes), and how a call proves one.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use anyhow::Context;

use crate::model::{Actor, AdminToken, AdminTrustRule, Principal, Role, SecretHash};
use crate::secret::{self, ADMIN_PREFIX, Secret};

pub const TOKEN_FILE: &str = "admin.token";

/// The admin credentials the server accepts, by hash: the bootstrap ones, and a copy of the stored
/// tokens that every create and revoke updates, so that a call is authenticated without a store read.
#[derive(Debug)]
pub struct AdminTokens {
    tokens: Vec<(SecretHash, Actor)>,
    issued: RwLock<HashMap<SecretHash, AdminToken>>,
    /// The admin trust rules (keyless orchestration), as stored.
    rules: RwLock<Vec<AdminTrustRule>>,
    /// OIDC tokens already verified, by hash, with whom they stand for and until when: an orchestrator
    /// sends the same token with every call of its run.
    sessions: Mutex<HashMap<SecretHash, (Principal, SystemTime)>>,
}

/// An admin call's bearer token that is not a Cordon token but may be an OIDC ID token; the API
/// checks it against the admin trust rules. `Debug` never shows it.
#[derive(Clone)]
pub struct OidcBearer(pub String);

impl std::fmt::Debug for OidcBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OidcBearer(<redacted>)")
    }
}

/// The actor name of a token: `admin:` and the first 8 hex digits of its hash.
fn actor_of(hash: &SecretHash) -> Actor {
    Actor(format!("admin:{}", hex::encode(&hash[..4])))
}

impl AdminTokens {
    /// Reads `<data_dir>/admin.token`, creating it (mode 0600) on first start. Returns the tokens and,
    /// when it was created now, the path it was written to.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<(AdminTokens, Option<PathBuf>)> {
        let path = data_dir.join(TOKEN_FILE);
        let mut created = None;
        let token = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = Secret::generate(ADMIN_PREFIX);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                writeln!(file, "{}", token.expose()).with_context(|| format!("cannot write {}", path.display()))?;
                file.sync_all()?;
                created = Some(path.clone());
                token.into_exposed()
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if !token.starts_with(ADMIN_PREFIX) {
            anyhow::bail!("{} does not hold a cordon admin token; delete it to have a new one made", path.display());
        }
        Ok((AdminTokens::from_tokens([token.as_str()]), created))
    }

    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> AdminTokens {
        let tokens = tokens
            .into_iter()
            .map(|t| {
                let h = secret::hash(t);
                (h, actor_of(&h))
            })
            .collect();
        AdminTokens {
            tokens,
            issued: RwLock::new(HashMap::new()),
            rules: RwLock::new(Vec::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Takes in a stored token (made, revoked, or read at start).
    pub fn remember(&self, token: AdminToken) {
        self.issued.write().unwrap().insert(token.secret_hash, token);
    }

    /// Replaces the admin trust rules (at start, and after each create and delete).
    pub fn set_rules(&self, rules: Vec<AdminTrustRule>) {
        *self.rules.write().unwrap() = rules;
        self.sessions.lock().unwrap().clear();
    }

    /// The admin trust rules for tokens of `issuer`.
    pub fn rules_for(&self, issuer: &str) -> Vec<AdminTrustRule> {
        self.rules.read().unwrap().iter().filter(|r| r.issuer == issuer).cloned().collect()
    }

    /// Who an OIDC token verified before stands for, while it is valid.
    pub fn oidc_session(&self, token: &str, now: SystemTime) -> Option<Principal> {
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, (_, until)| *until > now);
        sessions.get(&secret::hash(token)).map(|(p, _)| p.clone())
    }

    pub fn remember_oidc_session(&self, token: &str, principal: Principal, until: SystemTime) {
        let mut sessions = self.sessions.lock().unwrap();
        // A run makes a handful of tokens; a flood of distinct ones only costs verification again.
        if sessions.len() < 10_000 {
            sessions.insert(secret::hash(token), (principal, until));
        }
    }

    /// Who a bearer token stands for, or why it is refused.
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Result<Principal, &'static str> {
        let h = secret::hash(token);
        // Comparing digests, not tokens, keeps the comparison independent of the secret's bytes.
        if let Some((_, actor)) = self.tokens.iter().find(|(known, _)| *known == h) {
            return Ok(Principal { actor: actor.clone(), role: Role::Admin, scope: None });
        }
        let issued = self.issued.read().unwrap();
        let token = issued.get(&h).ok_or("admin token not recognised by this server")?;
        if token.revoked_at.is_some() {
            return Err("admin token revoked");
        }
        if !token.live(now) {
            return Err("admin token expired; ask an admin for a new one");
        }
        Ok(Principal { actor: token_actor(&token.name), role: token.role, scope: token.owner_scope.clone() })
    }
}

/// How events name a token made through the API.
pub fn token_actor(name: &str) -> Actor {
    Actor(format!("token:{name}"))
}
