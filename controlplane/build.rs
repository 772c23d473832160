//! Compiles proto/remoteingress/v1 with protox (no protoc needed) into tonic code and a
//! descriptor set for server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "remoteingress/v1/config.proto",
        "remoteingress/v1/hub.proto",
        "remoteingress/v1/edge.proto",
    ];
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(files, ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("remoteingress_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
