//! Property tests: the name grammar, and seal/open round trips through the
//! envelope on a real SoftHSM2 token.

use std::sync::Arc;
use std::time::Duration;

use keyseal::envelope::{Binding, DekCache, Envelope, EnvelopeError};
use keyseal::name::{SecretName, MAX_NAME_LEN};
use keyseal::root::pkcs11::Pkcs11Root;
use keyseal::root::RootOfTrust;
use keyseal::testkit_hsm::SoftHsm;
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,20}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

proptest! {
    #[test]
    fn valid_names_parse_and_round_trip(segs in proptest::collection::vec(segment(), 1..8)) {
        let s = segs.join("/");
        prop_assume!(s.len() <= MAX_NAME_LEN);
        let n = SecretName::parse(&s).unwrap();
        prop_assert_eq!(n.as_str(), s.as_str());
    }

    #[test]
    fn any_string_either_parses_to_itself_or_is_refused(s in "\\PC{0,300}|[a-z/.]{0,40}") {
        match SecretName::parse(&s) {
            Ok(n) => {
                prop_assert_eq!(n.as_str(), s.as_str());
                prop_assert!(s.len() <= MAX_NAME_LEN);
                prop_assert!(!s.starts_with('/') && !s.ends_with('/') && !s.contains("//"));
                prop_assert!(s.split('/').all(|seg| seg != "." && seg != ".."));
                prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)));
            }
            Err(e) => {
                // the message never echoes the input
                let msg = e.to_string();
                prop_assert!(s.len() < 3 || !msg.contains(s.as_str()));
            }
        }
    }
}

#[test]
fn seal_open_round_trips_on_softhsm() {
    let hsm = SoftHsm::new().unwrap();
    let root = Arc::new(Pkcs11Root::open(&hsm.config()).unwrap());
    root.create_version(1).unwrap();
    let env = Envelope::new(root, 1, DekCache::new(0, Duration::ZERO));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..4096),
                "[a-z/]{1,30}",
                1u64..u64::MAX,
                any::<u8>(),
            ),
            |(value, name, version, flip)| {
                let b = Binding::new("secret", &name, version);
                let sealed = env.seal(&b, &value).unwrap();
                let opened = env.open(&b, &sealed).unwrap();
                prop_assert_eq!(opened.as_slice(), value.as_slice());
                // another location never opens it
                let other = Binding::new("secret", &name, version ^ 1);
                prop_assert!(matches!(
                    env.open(&other, &sealed),
                    Err(EnvelopeError::Root(_)) | Err(EnvelopeError::Integrity)
                ));
                // a flipped ciphertext byte never opens
                let mut t = sealed.clone();
                let i = flip as usize % t.ciphertext.len();
                t.ciphertext[i] ^= 0x40;
                prop_assert!(env.open(&b, &t).is_err());
                Ok(())
            },
        )
        .unwrap();
}
