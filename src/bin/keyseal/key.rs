//! `keyseal key ...`: named signing keys held in the root device.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Subcommand;
use keyseal::api::pb;
use keyseal::exit;

use super::{client, json_out, table, ts, Failure, Res};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a key inside the root device (never extractable).
    Create {
        name: String,
        /// ecdsa-p256 (default), ed25519 (PKCS#11 tokens that support it), rsa-pss-3072.
        #[arg(long, default_value = "ecdsa-p256")]
        alg: String,
    },
    /// List keys.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a key's versions and states.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a public key: PEM SPKI (default) or JWK.
    Pubkey {
        name: String,
        /// Default: the signing version.
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        jwk: bool,
    },
    /// Sign a message (stdin or --in) or a SHA-256 digest (--digest HEX); the
    /// raw signature goes to stdout or --out.
    Sign {
        name: String,
        #[arg(long = "in")]
        input: Option<PathBuf>,
        /// A prehashed SHA-256 digest, hex (ECDSA and RSA-PSS keys).
        #[arg(long, conflicts_with = "input")]
        digest: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a signature (file) over a message (stdin or --in) or a digest; exit 0 when valid, 65 when not.
    Verify {
        name: String,
        #[arg(long)]
        signature: PathBuf,
        #[arg(long = "in")]
        input: Option<PathBuf>,
        #[arg(long, conflicts_with = "input")]
        digest: Option<String>,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Add a new version that signs from now on; old versions keep verifying.
    Rotate { name: String },
    /// Disable a version: it no longer verifies.
    Disable {
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Re-enable a disabled version.
    Enable {
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Destroy a key and every version on the device (cannot be undone).
    Destroy {
        name: String,
        /// Required: confirms destruction.
        #[arg(long)]
        yes: bool,
    },
    /// Exchange an API key (read from stdin, never argv) for a short-lived
    /// JWT signed by key NAME; prints the token.
    Token {
        name: String,
        /// Lifetime in seconds (default 900, at most 86400).
        #[arg(long)]
        ttl: Option<u32>,
    },
    /// Print the JWKS (enabled versions) that token verifiers load.
    Jwks {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn read_input(input: Option<PathBuf>) -> Result<Vec<u8>, Failure> {
    match input {
        Some(p) => std::fs::read(&p).map_err(|e| {
            Failure::new(
                exit::DATA,
                format!("cannot read {}: {e}", p.display()),
                None,
            )
        }),
        None => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .map_err(|e| Failure::new(exit::DATA, format!("cannot read stdin: {e}"), None))?;
            Ok(b)
        }
    }
}

fn digest_bytes(hex_digest: &str) -> Result<Vec<u8>, Failure> {
    let d = hex::decode(hex_digest.trim())
        .map_err(|_| Failure::new(exit::USAGE, "--digest must be hex", None))?;
    if d.len() != 32 {
        return Err(Failure::new(
            exit::USAGE,
            "--digest must be a SHA-256 digest (64 hex digits)",
            None,
        ));
    }
    Ok(d)
}

fn info_json(k: &pb::KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": k.name, "algorithm": k.algorithm, "current_version": k.current_version,
        "created_at": k.created_at, "created_by": k.created_by,
        "versions": k.versions.iter().map(|v| serde_json::json!({
            "version": v.version, "state": v.state, "created_at": v.created_at,
            "public_key_pem": v.public_key_pem,
            "jwk": serde_json::from_str::<serde_json::Value>(&v.jwk).unwrap_or(serde_json::Value::Null),
        })).collect::<Vec<_>>(),
    })
}

fn write_out(out: Option<PathBuf>, bytes: &[u8]) -> Res {
    match out {
        Some(p) => std::fs::write(&p, bytes).map_err(|e| {
            Failure::new(exit::IO, format!("cannot write {}: {e}", p.display()), None)
        }),
        None => {
            let mut o = std::io::stdout().lock();
            o.write_all(bytes)
                .and_then(|_| o.flush())
                .map_err(|e| Failure::new(exit::IO, format!("cannot write stdout: {e}"), None))
        }
    }
}

pub async fn run(socket: &std::path::Path, c: Cmd) -> Res {
    let mut cl = client(socket).await?;
    let k = &mut cl.keys;
    match c {
        Cmd::Create { name, alg } => {
            let r = k
                .create(pb::CreateKeyRequest {
                    name,
                    algorithm: alg,
                })
                .await?
                .into_inner();
            eprintln!(
                "created key {} ({}) version {}",
                r.name, r.algorithm, r.current_version
            );
            Ok(())
        }
        Cmd::Ls { prefix, json } => {
            let r = k.list(pb::ListKeysRequest { prefix }).await?.into_inner();
            if json {
                return json_out(&serde_json::Value::Array(
                    r.keys.iter().map(info_json).collect(),
                ));
            }
            table(
                &["NAME", "ALGORITHM", "VERSION", "VERSIONS", "CREATED"],
                r.keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.algorithm.clone(),
                            format!("v{}", k.current_version),
                            k.versions.len().to_string(),
                            ts(k.created_at),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Cmd::Show { name, json } => {
            let r = k.get(pb::KeyNameRequest { name }).await?.into_inner();
            if json {
                return json_out(&info_json(&r));
            }
            println!(
                "{} ({}), signing version v{}",
                r.name, r.algorithm, r.current_version
            );
            table(
                &["VERSION", "STATE", "CREATED"],
                r.versions
                    .iter()
                    .map(|v| vec![format!("v{}", v.version), v.state.clone(), ts(v.created_at)])
                    .collect(),
            );
            Ok(())
        }
        Cmd::Pubkey { name, version, jwk } => {
            let r = k.get(pb::KeyNameRequest { name }).await?.into_inner();
            let want = version.unwrap_or(r.current_version);
            let v = r
                .versions
                .iter()
                .find(|v| v.version == want)
                .ok_or_else(|| Failure::new(exit::NOT_FOUND, format!("no version {want}"), None))?;
            if jwk {
                println!("{}", v.jwk);
            } else {
                print!("{}", v.public_key_pem);
            }
            Ok(())
        }
        Cmd::Sign {
            name,
            input,
            digest,
            out,
        } => {
            let (input, hash) = match digest {
                Some(d) => (
                    pb::sign_request::Input::Digest(digest_bytes(&d)?),
                    "sha256".to_owned(),
                ),
                None => (
                    pb::sign_request::Input::Message(read_input(input)?),
                    String::new(),
                ),
            };
            let r = k
                .sign(pb::SignRequest {
                    name,
                    input: Some(input),
                    hash,
                })
                .await?
                .into_inner();
            eprintln!("signed with {}", r.kid);
            write_out(out, &r.signature)
        }
        Cmd::Verify {
            name,
            signature,
            input,
            digest,
            version,
        } => {
            let sig = std::fs::read(&signature).map_err(|e| {
                Failure::new(
                    exit::DATA,
                    format!("cannot read {}: {e}", signature.display()),
                    None,
                )
            })?;
            let (input, hash) = match digest {
                Some(d) => (
                    pb::verify_request::Input::Digest(digest_bytes(&d)?),
                    "sha256".to_owned(),
                ),
                None => (
                    pb::verify_request::Input::Message(read_input(input)?),
                    String::new(),
                ),
            };
            let r = k
                .verify(pb::VerifyRequest {
                    name,
                    input: Some(input),
                    hash,
                    signature: sig,
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            if r.valid {
                println!("valid (version {})", r.version);
                Ok(())
            } else {
                Err(Failure::new(exit::DATA, "signature is NOT valid", None))
            }
        }
        Cmd::Rotate { name } => {
            let r = k.rotate(pb::KeyNameRequest { name }).await?.into_inner();
            eprintln!("{} now signs with version {}", r.name, r.current_version);
            Ok(())
        }
        Cmd::Disable { name, version } => {
            k.disable_version(pb::KeyVersionRequest {
                name: name.clone(),
                version,
            })
            .await?;
            eprintln!("{name} version {version} disabled");
            Ok(())
        }
        Cmd::Enable { name, version } => {
            k.enable_version(pb::KeyVersionRequest {
                name: name.clone(),
                version,
            })
            .await?;
            eprintln!("{name} version {version} enabled");
            Ok(())
        }
        Cmd::Destroy { name, yes } => {
            if !yes {
                return Err(Failure::new(
                    exit::USAGE,
                    "destroying a key cannot be undone",
                    Some("add --yes to confirm"),
                ));
            }
            k.destroy(pb::KeyNameRequest { name: name.clone() }).await?;
            eprintln!("destroyed key {name}");
            Ok(())
        }
        Cmd::Token { name, ttl } => {
            let mut key = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut key).map_err(|e| {
                Failure::new(
                    exit::DATA,
                    format!("cannot read the API key from stdin: {e}"),
                    None,
                )
            })?;
            let r = k
                .mint_token(pb::MintTokenRequest {
                    key_name: name,
                    api_key: key.trim().to_owned(),
                    ttl_secs: ttl.unwrap_or(0),
                })
                .await?
                .into_inner();
            eprintln!(
                "token signed with {}, expires at {}",
                r.kid,
                super::ts(r.expires_at)
            );
            println!("{}", r.token);
            Ok(())
        }
        Cmd::Jwks { names } => {
            let r = k.jwks(pb::JwksRequest { names }).await?.into_inner();
            let v: serde_json::Value = serde_json::from_str(&r.jwks).map_err(|e| {
                Failure::new(exit::FAILURE, format!("bad JWKS from daemon: {e}"), None)
            })?;
            json_out(&v)
        }
    }
}
