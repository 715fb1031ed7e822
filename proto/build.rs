//! Compiles the .proto files with protox (pure Rust: a fresh machine needs no
//! protoc) and generates Rust with prost. Every config message also derives
//! serde, camelCase and strict, so the YAML people write maps one to one onto
//! the wire model.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/remora/config/v1/config.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        .type_attribute(
            ".remora.config.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
