//! Cordon's gRPC API, package `cordon.v1`, generated from `proto/cordon/v1/*.proto`.

/// Generated messages and services of `cordon.v1`.
#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cordon.v1");

    /// The encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cordon_descriptor.bin"));
}
