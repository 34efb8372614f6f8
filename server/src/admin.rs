//! Admin tokens: the one written to `<data-dir>/admin.token` on first start, and how calls prove it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::model::{Actor, SecretHash};
use crate::secret::{self, ADMIN_PREFIX, Secret};

pub const TOKEN_FILE: &str = "admin.token";

/// The admin tokens the server accepts, by hash.
#[derive(Clone, Debug)]
pub struct AdminTokens {
    tokens: Vec<(SecretHash, Actor)>,
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
        AdminTokens { tokens }
    }

    /// The actor a bearer token stands for, if it is an admin token.
    pub fn authenticate(&self, token: &str) -> Option<Actor> {
        let h = secret::hash(token);
        // Comparing digests, not tokens, keeps the comparison independent of the secret's bytes.
        self.tokens.iter().find(|(known, _)| *known == h).map(|(_, actor)| actor.clone())
    }
}
