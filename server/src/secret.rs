//! Secrets the server hands out once (auth keys, session tokens, the admin token) and the hashes it keeps.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::model::SecretHash;

pub const AUTH_KEY_PREFIX: &str = "cordon-auth-";
pub const SESSION_PREFIX: &str = "cordon-session-";
pub const ADMIN_PREFIX: &str = "cordon-admin-";

/// A secret in the clear. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `prefix` followed by 256 random bits, base64url.
    pub fn generate(prefix: &str) -> Secret {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Secret(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn from_string(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_exposed(self) -> String {
        self.0
    }

    pub fn hash(&self) -> SecretHash {
        hash(&self.0)
    }
}

/// Stored secrets (an IdP client secret) serialize as the plain string: only the store sees them.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

pub fn hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_never_printed() {
        let a = Secret::generate(AUTH_KEY_PREFIX);
        let b = Secret::generate(AUTH_KEY_PREFIX);
        assert_ne!(a, b);
        assert!(a.expose().starts_with(AUTH_KEY_PREFIX));
        assert_eq!(a.expose().len(), AUTH_KEY_PREFIX.len() + 43);
        assert!(!format!("{a:?}").contains(&a.expose()[AUTH_KEY_PREFIX.len()..]));
    }
}
