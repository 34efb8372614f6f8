//! What can stop a node, each with what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a server URL like http://cordon.example:7443")]
    BadServerUrl(String),
    #[error("cannot reach the Cordon server at {server}: {detail}; check the URL and that the server runs")]
    Unreachable { server: String, detail: String },
    #[error("will not trust the Cordon server at {server}: {detail}")]
    Untrusted { server: String, detail: String },
    #[error("the server refused this node: {0}")]
    Rejected(String),
    #[error("no credential: the saved session is no longer valid; give --auth-key or --oidc-token-file to register")]
    SessionInvalid,
    #[error(
        "no credential: this node has not joined yet; give --auth-key (or AGENTD_AUTH_KEY) or --oidc-token-file to register, or --tailnet to log in as a person"
    )]
    NoCredential,
    #[error("this node was revoked: {0}; it will not retry")]
    Revoked(String),
    #[error("login failed: {0}")]
    LoginFailed(String),
    #[error("{0}")]
    LoginExpired(String),
    #[error("state file {path}: {detail}")]
    State { path: PathBuf, detail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("unknown host {0:?}: not a peer name, 'gateway' or an IPv4 address in the netmap")]
    UnknownHost(String),
    #[error("the server sent {0}; expected a full netmap")]
    Protocol(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    /// The process exit code the `agentd` binary uses for this error (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Revoked(_) => 3,
            Error::LoginFailed(_) => 4,
            Error::LoginExpired(_) => 6,
            Error::Rejected(_) | Error::NoCredential | Error::SessionInvalid => 4,
            Error::Unreachable { .. } | Error::Untrusted { .. } => 5,
            Error::BadServerUrl(_) | Error::UnknownHost(_) => 2,
            Error::State { .. } | Error::Io { .. } | Error::Protocol(_) => 1,
        }
    }
}
