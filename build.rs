//! Generates the gRPC code and the descriptor set (for server reflection).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keyseal_descriptor.bin"))
        // Messages that carry secret values get a hand-written, masking
        // `Debug` (src/api/redact.rs) instead of prost's derived one.
        .skip_debug(["keyseal.v1.PutRequest", "keyseal.v1.GetResponse"])
        // API-key messages that carry a full key (src/api/apikeys_svc.rs).
        .skip_debug([
            "keyseal.v1.IssueApiKeyResponse",
            "keyseal.v1.RotateApiKeyResponse",
            "keyseal.v1.VerifyApiKeyRequest",
        ])
        // Carries a target credential's value (src/api/proxy_svc.rs).
        .skip_debug(["keyseal.v1.PutCredentialRequest"])
        // Carries an upstream client private key (src/api/proxy_svc.rs).
        .skip_debug(["keyseal.v1.PutTargetRequest"])
        .skip_debug(["keyseal.v1.AuditHashRequest"])
        .skip_debug([
            "keyseal.v1.MintTokenRequest",
            "keyseal.v1.MintTokenResponse",
        ])
        .compile_protos(
            &[
                "proto/keyseal/v1/secrets.proto",
                "proto/keyseal/v1/system.proto",
                "proto/keyseal/v1/keys.proto",
                "proto/keyseal/v1/audit.proto",
                "proto/keyseal/v1/apikeys.proto",
                "proto/keyseal/v1/proxy.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
