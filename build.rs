//! Compiles the gRPC protos with protox, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    // The error detail messages are compiled only into the descriptor set
    // served by reflection; tonic-types provides their Rust types.
    let file_descriptors = protox::compile(
        [
            "proto/stvault/v1/vault.proto",
            "proto/stvault/v1/admin.proto",
            "proto/google/rpc/error_details.proto",
        ],
        ["proto"],
    )?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("stvault_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;

    let mut stvault_only = file_descriptors.clone();
    stvault_only
        .file
        .retain(|file| file.package() != "google.rpc");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(stvault_only)?;
    Ok(())
}
