//! The gRPC surface: the admin (`Control`) and node (`Node`) services, admin authentication, and the
//! conversions between protobuf and domain records.

pub mod control;
pub mod convert;
pub mod node;

use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::admin::AdminTokens;
use crate::model::Actor;

pub type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The admin actor that the interceptor attached to the request.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    req.extensions().get::<Actor>().cloned().ok_or_else(|| Status::unauthenticated("missing admin token"))
}

/// The bearer token of a request, if any.
pub fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

/// Checks `authorization: Bearer <admin token>` and attaches the admin's [`Actor`].
pub fn admin_interceptor(tokens: Arc<AdminTokens>) -> impl tonic::service::Interceptor + Clone {
    move |mut req: Request<()>| {
        let Some(token) = bearer(&req) else {
            return Err(Status::unauthenticated(
                "missing admin token: send 'authorization: Bearer <token>' with the token from <data-dir>/admin.token",
            ));
        };
        let actor = tokens
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("admin token not recognised by this server"))?;
        req.extensions_mut().insert(actor);
        Ok(req)
    }
}
