//! Compiles the .proto files with protox (pure Rust: a fresh machine needs no
//! protoc). The config model gets prost types with serde derived on them,
//! camelCase and strict, so the YAML people write maps one to one onto the
//! wire model; the control-plane services get tonic clients and servers.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/remora/config/v1/config.proto",
        "proto/remora/control/v1/control.proto",
        "proto/remora/transport/v1/transport.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .type_attribute(
            ".remora.config.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        )
        .bytes(".remora.control.v1.Snapshot.config")
        .compile_fds(fds)?;
    Ok(())
}
