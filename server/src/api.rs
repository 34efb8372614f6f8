//! The gRPC surface: the admin (`Control`) and node (`Node`) services, admin authentication, and the
//! conversions between protobuf and domain records.

pub mod control;
pub mod convert;
pub mod mesh;
pub mod node;

use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::admin::AdminTokens;
use crate::model::{Action, Principal};

pub type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Refuses `principal` unless its role may do `action`; `call` names the RPC in the refusal.
fn authorize(principal: Principal, action: Action, call: &str) -> Result<Principal, Status> {
    if !principal.role.allows(action) {
        let needs = match action {
            Action::Read => "any role",
            Action::Write => "the operator or admin role",
            Action::ManageTokens | Action::Govern => "the admin role",
            Action::Approve => "the approver or admin role",
        };
        return Err(Status::permission_denied(format!(
            "{call} needs {needs}; this credential has the {} role",
            principal.role.name()
        )));
    }
    Ok(principal)
}

/// The bearer token of a request, if any.
pub fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

/// Checks `authorization: Bearer <admin token>` and attaches the caller's [`Principal`].
pub fn admin_interceptor(tokens: Arc<AdminTokens>) -> impl tonic::service::Interceptor + Clone {
    move |mut req: Request<()>| {
        let Some(token) = bearer(&req) else {
            return Err(Status::unauthenticated(
                "missing admin token: send 'authorization: Bearer <token>' with the token from <data-dir>/admin.token",
            ));
        };
        // A JWT is checked against the admin trust rules by the call itself (that needs the network).
        if !token.starts_with(crate::secret::ADMIN_PREFIX) && token.split('.').count() == 3 {
            let bearer = crate::admin::OidcBearer(token.to_string());
            req.extensions_mut().insert(bearer);
            return Ok(req);
        }
        let principal = tokens.authenticate(token, std::time::SystemTime::now()).map_err(Status::unauthenticated)?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}
