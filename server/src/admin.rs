//! Admin credentials: the bootstrap token written to `<data-dir>/admin.token` on first start (role
//! `admin`, every owner), the tokens made through the API (a role and an optional owner scope, stored as
//! hashes), and how a call proves one.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use anyhow::Context;

use crate::model::{Actor, AdminToken, Principal, Role, SecretHash};
use crate::secret::{self, ADMIN_PREFIX, Secret};

pub const TOKEN_FILE: &str = "admin.token";

/// The admin credentials the server accepts, by hash: the bootstrap ones, and a copy of the stored
/// tokens that every create and revoke updates, so that a call is authenticated without a store read.
#[derive(Debug)]
pub struct AdminTokens {
    tokens: Vec<(SecretHash, Actor)>,
    issued: RwLock<HashMap<SecretHash, AdminToken>>,
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
        AdminTokens { tokens, issued: RwLock::new(HashMap::new()) }
    }

    /// Takes in a stored token (made, revoked, or read at start).
    pub fn remember(&self, token: AdminToken) {
        self.issued.write().unwrap().insert(token.secret_hash, token);
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
