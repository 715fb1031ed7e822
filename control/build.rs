//! Compiles the subset of etcd's v3 API that the etcd store uses
//! (`proto/etcd/`) with protox, as the model crate does: pure Rust, so a
//! fresh machine needs no protoc. Clients only.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcd/rpc.proto", "proto/etcd/kv.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
