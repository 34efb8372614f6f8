//! The node's state directory: its WireGuard private key (made on first run) and its session, both
//! mode 0600 and written atomically (temp file, fsync, rename), so a crash or a full disk never leaves a
//! half-written file behind.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::StaticSecret;
use serde::{Deserialize, Serialize};

use crate::error::Error;

const KEY_FILE: &str = "wireguard.key";
const SESSION_FILE: &str = "session.json";

/// What a node remembers between runs besides its key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub server: String,
    pub node_id: String,
    pub session_token: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("server", &self.server).field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// What to do about a state directory that cannot be used.
fn hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => " (the disk is full: free space)",
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => {
            " (this user cannot write there: choose another directory with --state-dir or AGENTD_STATE_DIR, or make it writable)"
        }
        _ => "",
    }
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::State {
            path: dir.to_path_buf(),
            detail: format!("cannot create it: {e}{}", hint(&e)),
        })?;
        Ok(StateDir { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The node's private key, made and stored on first run.
    pub fn key(&self) -> Result<StaticSecret, Error> {
        let path = self.dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let corrupt = |detail: &str| Error::State {
                    path: path.clone(),
                    detail: format!("{detail}; move it away to make a new identity (the node will register anew)"),
                };
                let bytes = STANDARD.decode(text.trim()).map_err(|_| corrupt("is not base64"))?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| corrupt("does not hold a 32-byte key"))?;
                let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "key file is readable by others; chmod 600 it");
                }
                Ok(StaticSecret::from(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = StaticSecret::from(rand::random::<[u8; 32]>());
                self.write_atomic(KEY_FILE, STANDARD.encode(secret.to_bytes()).as_bytes())?;
                Ok(secret)
            }
            Err(e) => Err(Error::State { path, detail: format!("cannot read it: {e}{}", hint(&e)) }),
        }
    }

    pub fn session(&self) -> Result<Option<Session>, Error> {
        let path = self.dir.join(SESSION_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(session) => Ok(Some(session)),
                Err(_) => {
                    tracing::warn!(path = %path.display(), "session file is unreadable; registering anew");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::State { path, detail: format!("cannot read it: {e}") }),
        }
    }

    pub fn save_session(&self, session: &Session) -> Result<(), Error> {
        self.write_atomic(SESSION_FILE, &serde_json::to_vec(session).expect("serializes"))
    }

    pub fn clear_session(&self) -> Result<(), Error> {
        match std::fs::remove_file(self.dir.join(SESSION_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::State { path: self.dir.join(SESSION_FILE), detail: format!("cannot remove it: {e}") })
            }
            _ => Ok(()),
        }
    }

    fn write_atomic(&self, name: &str, contents: &[u8]) -> Result<(), Error> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let fail = |e: std::io::Error| {
            let _ = std::fs::remove_file(&tmp);
            Error::State { path: path.clone(), detail: format!("cannot write it: {e}{}", hint(&e)) }
        };
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(fail)?;
        file.write_all(contents).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        Ok(())
    }
}
