//! Masking `Debug` for the protobuf messages that carry secret values, so a
//! stray `{:?}` in a log line can never print one.

use std::fmt;

use super::pb::{GetResponse, PutRequest};

impl fmt::Debug for PutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutRequest")
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .field("cas", &self.cas)
            .field("labels", &self.labels)
            .field("set_labels", &self.set_labels)
            .field("rotate_after_secs", &self.rotate_after_secs)
            .field("expires_at", &self.expires_at)
            .field("max_versions", &self.max_versions)
            .finish()
    }
}

impl fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResponse")
            .field("name", &self.name)
            .field("version", &self.version)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl fmt::Debug for super::pb::AuditHashRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditHashRequest")
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish()
    }
}

impl fmt::Debug for super::pb::MintTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintTokenRequest")
            .field("key_name", &self.key_name)
            .field("api_key", &format_args!("<redacted>"))
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl fmt::Debug for super::pb::MintTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintTokenResponse")
            .field("token", &format_args!("<redacted>"))
            .field("expires_at", &self.expires_at)
            .field("kid", &self.kid)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_values() {
        let p = PutRequest {
            name: "a".into(),
            value: b"hunter2".to_vec(),
            ..Default::default()
        };
        let g = GetResponse {
            name: "a".into(),
            version: 1,
            value: b"hunter2".to_vec(),
            created_at: 0,
        };
        for s in [format!("{p:?}"), format!("{g:?}")] {
            assert!(!s.contains("hunter2") && !s.contains("104, 117"), "{s}");
            assert!(s.contains("7 bytes redacted"), "{s}");
        }
    }
}
