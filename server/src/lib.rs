//! Cordon's control plane: the admin and node gRPC APIs over a domain core and two storage engines
//! (sled, PostgreSQL), the reaper of expiring tailnets and nodes, and the `cordon` command line.

pub mod access;
pub mod admin;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod control_plane;
pub mod domain;
pub mod error;
pub mod gateway;
pub mod hub;
pub mod login;
pub mod metrics;
pub mod model;
pub mod netview;
pub mod oidc;
pub mod policy;
pub mod port;
pub mod reaper;
pub mod relay;
pub mod replica;
pub mod secret;
pub mod serve;
pub mod store;
pub mod time;
pub mod validate;
pub mod webhook;

pub use config::ServeConfig;
pub use control_plane::{ControlPlane, Limits};
pub use serve::Server;
