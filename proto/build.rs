//! Compiles `cordon/v1/*.proto` with protox (pure Rust: no system `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["cordon/v1/cordon.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("cordon_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Messages that carry secrets get a hand-written `Debug` (src/lib.rs) that leaves them out.
    let secret_bearing = [
        ".cordon.v1.UpstreamConfig",
        ".cordon.v1.SetUpstreamRequest",
        ".cordon.v1.CreateAuthKeyResponse",
        ".cordon.v1.CreateAdminTokenResponse",
        ".cordon.v1.CreateWebhookRequest",
        ".cordon.v1.RegisterRequest",
        ".cordon.v1.RegisterRequest.credential",
        ".cordon.v1.RegisterResponse",
        ".cordon.v1.WatchNetMapRequest",
        ".cordon.v1.ReportEndpointsRequest",
        ".cordon.v1.LeaveRequest",
    ];
    tonic_prost_build::configure().skip_debug(secret_bearing).compile_fds(fds)?;
    Ok(())
}
