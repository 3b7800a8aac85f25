//! Generates the gRPC code and the descriptor set (for server reflection).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keyseal_descriptor.bin"))
        // Messages that carry secret values get a hand-written, masking
        // `Debug` (src/api/redact.rs) instead of prost's derived one.
        .skip_debug(["keyseal.v1.PutRequest", "keyseal.v1.GetResponse"])
        .compile_protos(
            &[
                "proto/keyseal/v1/secrets.proto",
                "proto/keyseal/v1/system.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
