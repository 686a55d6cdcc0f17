//! Generates the gRPC code for `proto/` with the protoc binary shipped by
//! `protoc-bin-vendored`, so a build needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; the variable is read by the code generator.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "fleetmq/cluster/v1/raft.proto",
        "fleetmq/cluster/v1/node.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Forwarded payloads stay `Bytes` end to end (no copy into a Vec per message).
        .bytes(".fleetmq.cluster.v1.Message")
        .compile_protos(&files.map(|f| root.join(f)), &[root])?;
    Ok(())
}
