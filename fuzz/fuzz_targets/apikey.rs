//! API keys: `ApiKeyToken::parse` (structure and checksum) and
//! `find_tokens` (secret scanning) never panic; an accepted key is the
//! input, and every token found sits where it is reported.
#![no_main]

use keyseal::apikeys::{check_prefix, find_tokens, last4_of, ApiKeyToken, DEFAULT_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = last4_of(&text);
    for cand in text.split_whitespace().chain(std::iter::once(&*text)) {
        if let Ok(t) = ApiKeyToken::parse(cand) {
            assert_eq!(t.expose(), cand);
            let masked = t.masked();
            assert!(masked.ends_with(t.last4()));
            assert!(!masked.contains(&cand[t.prefix().len() + t.env().len() + 2..]));
            assert!(!format!("{t:?}").contains(cand));
            assert_eq!(ApiKeyToken::parse(t.expose()).ok(), Some(t.clone()));
        }
    }
    // The prefix to scan for: the first word when it is a valid prefix.
    let first = text.split(['_', ' ', '\n']).next().unwrap_or("");
    let prefixes = [
        DEFAULT_PREFIX,
        if check_prefix(first) { first } else { "sk" },
    ];
    for prefix in prefixes {
        for f in find_tokens(&text, prefix) {
            let line = text.lines().nth(f.line - 1).expect("reported line exists");
            let at = &line[f.column - 1..];
            assert!(at.starts_with(&format!("{prefix}_")));
            if let Ok(t) = &f.token {
                assert!(at.starts_with(t.expose()));
                assert_eq!(t.prefix(), prefix);
            }
        }
    }
});
