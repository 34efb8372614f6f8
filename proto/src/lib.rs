//! Cordon's gRPC API, package `cordon.v1`, generated from `proto/cordon/v1/*.proto`.

/// Generated messages and services of `cordon.v1`.
#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cordon.v1");

    /// The encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cordon_descriptor.bin"));

    /// The request header (value `1`) with which a node's `Node.Relay` stream asks for its frames in
    /// batches (`RelayPacket.frames`).
    pub const RELAY_BATCH_HEADER: &str = "cordon-relay-batch";
}

/// `Debug` for the messages that carry secrets (auth keys, OIDC tokens, session tokens, upstream API keys):
/// the build skips prost's derived impl for them, and these print every field but the secret.
mod redacted {
    use std::fmt;

    use super::v1::*;

    fn hidden(secret: &str) -> &'static str {
        if secret.is_empty() { "" } else { "<redacted>" }
    }

    macro_rules! redacted_debug {
        ($ty:ident { $($field:ident),* } secret { $($secret:ident),* }) => {
            impl fmt::Debug for $ty {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    let mut d = f.debug_struct(stringify!($ty));
                    $(d.field(stringify!($field), &self.$field);)*
                    $(d.field(stringify!($secret), &hidden(&self.$secret));)*
                    d.finish()
                }
            }
        };
    }

    redacted_debug!(UpstreamConfig { name, kind, base_url } secret { api_key });
    redacted_debug!(SetUpstreamRequest { tailnet_id, name, kind, base_url } secret { api_key });
    redacted_debug!(CreateAuthKeyResponse { key } secret { secret });
    redacted_debug!(CreateAdminTokenResponse { token } secret { secret });
    redacted_debug!(CreateWebhookRequest { tailnet_id, url, events, retry_seconds, reason } secret { secret });
    redacted_debug!(RegisterResponse { node, tailnet } secret { session_token });
    redacted_debug!(WatchNetMapRequest {} secret { session_token });
    redacted_debug!(ReportEndpointsRequest { endpoints } secret { session_token });
    redacted_debug!(LeaveRequest {} secret { session_token });
    redacted_debug!(RegisterRequest { credential, wireguard_public_key, tailnet_id, hostname, requested_tags, endpoints } secret {});

    impl fmt::Debug for register_request::Credential {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                register_request::Credential::AuthKey(_) => f.write_str("AuthKey(<redacted>)"),
                register_request::Credential::OidcToken(_) => f.write_str("OidcToken(<redacted>)"),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn secrets_do_not_print() {
            let printed = [
                format!(
                    "{:?}",
                    SetUpstreamRequest { api_key: "sk-SECRET".into(), name: "openai".into(), ..Default::default() }
                ),
                format!(
                    "{:?}",
                    CreateTailnetRequest {
                        upstreams: vec![UpstreamConfig { api_key: "sk-SECRET".into(), ..Default::default() }],
                        ..Default::default()
                    }
                ),
                format!("{:?}", CreateAuthKeyResponse { secret: "cordon-auth-SECRET".into(), key: None }),
                format!("{:?}", CreateAdminTokenResponse { secret: "cordon-admin-SECRET".into(), token: None }),
                format!(
                    "{:?}",
                    RegisterRequest {
                        credential: Some(register_request::Credential::OidcToken("eyJSECRET".into())),
                        hostname: "laptop".into(),
                        ..Default::default()
                    }
                ),
                format!(
                    "{:?}",
                    RegisterResponse { session_token: "cordon-session-SECRET".into(), ..Default::default() }
                ),
                format!("{:?}", LeaveRequest { session_token: "cordon-session-SECRET".into() }),
            ];
            for p in printed {
                assert!(!p.contains("SECRET"), "{p}");
                assert!(p.contains("<redacted>"), "{p}");
            }
        }
    }
}
