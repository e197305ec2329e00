//! Compiles `muster/v1/*.proto` with protox (no `protoc` needed) and writes
//! the encoded descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["muster/v1/task.proto", "muster/v1/agent.proto", "muster/v1/fleet.proto", "muster/v1/admin.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("muster_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // `build_transport(false)`: the generated `connect` constructor would clash
    // with the `AgentService.Connect` RPC; clients are built from a `Channel`.
    tonic_prost_build::configure()
        .build_transport(false)
        .type_attribute(".", "#[allow(clippy::all, missing_docs)]")
        .compile_fds(fds)?;
    Ok(())
}
