//! Compiles the .proto contract with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "flotilla/v1/common.proto",
        "flotilla/v1/jobs.proto",
        "flotilla/v1/cluster.proto",
        "flotilla/v1/raft.proto",
        "flotilla/v1/registry.proto",
        "flotilla/v1/inference.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
