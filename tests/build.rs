//! Generates the gRPC test service (tests/proto/echo.proto) with protox, the
//! pure-Rust protobuf compiler (no protoc needed), and tonic-prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/echo.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
