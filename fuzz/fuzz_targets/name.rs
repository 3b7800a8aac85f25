//! Secret name grammar: `SecretName::parse` and `check_prefix` never panic,
//! and an accepted name is exactly the input.
#![no_main]

use keyseal::name::{check_prefix, SecretName, MAX_NAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s: &str = &s;
    match SecretName::parse(s) {
        Ok(n) => {
            assert_eq!(n.as_str(), s);
            assert_eq!(n.to_string(), s);
            assert!(s.len() <= MAX_NAME_LEN);
            assert!(!s.starts_with('/') && !s.ends_with('/') && !s.contains("//"));
            assert!(s.split('/').all(|seg| seg != "." && seg != ".."));
            // A valid name is a valid listing prefix, with or without `/`.
            assert!(check_prefix(s).is_ok());
            if s.len() < MAX_NAME_LEN {
                assert!(check_prefix(&format!("{s}/")).is_ok());
            }
        }
        Err(e) => {
            // The message is built from the rule alone (never the input).
            assert!(e.to_string().len() < 100);
        }
    }
    let _ = check_prefix(s);
});
