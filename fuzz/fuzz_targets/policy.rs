//! The policy file: `Policy::parse` never panics; name globs (`Glob`)
//! parse and match any string without panicking.
#![no_main]

use keyseal::policy::{Glob, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Policy::parse(text) {
        let _ = p.rule_count();
        let _ = p.credential("app.service", "db");
    }
    // Globs: every line is a pattern, matched against every line.
    let lines: Vec<&str> = text.lines().take(16).collect();
    for pat in &lines {
        if let Ok(g) = Glob::parse(pat) {
            assert_eq!(g.as_str(), *pat);
            for name in &lines {
                let _ = g.matches(name);
            }
            // A pattern without wildcards matches itself.
            if !pat.contains(['*', '?']) {
                assert!(g.matches(pat));
            }
        }
    }
});
