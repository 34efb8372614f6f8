//! The server's error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything a server operation can fail with. Messages are for the caller: they name the field or
/// the thing and say what to do; none contains a secret.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request is valid but the state it applies to has moved on (a proposal already decided).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// The storage engine failed; the message names the engine and is for the server log only.
    #[error("storage: {0}")]
    Storage(String),
    #[error("storage: corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

impl Error {
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), rule: rule.into() }
    }

    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Error::NotFound { what, id: id.to_string() }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Storage(_) | Error::Corrupt { .. } => {
                tracing::error!(error = %err, "storage failure");
                return Status::internal("storage failure; see the server log");
            }
        };
        Status::new(code, cap_message(err.to_string()))
    }
}

/// Bytes of a status message, at most: fields quote short prefixes of bad values, and this keeps any
/// message that slipped through far below gRPC's 16 KiB metadata limit.
const MAX_STATUS_MESSAGE: usize = 1024;

fn cap_message(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE {
        let mut cut = MAX_STATUS_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
