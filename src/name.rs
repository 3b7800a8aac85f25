//! Secret names: a strict grammar, parsed once into [`SecretName`].
//!
//! A name is one or more `/`-separated segments; each segment is 1..=128
//! characters of `[A-Za-z0-9._-]` and is not `.` or `..`. The whole name is
//! at most [`MAX_NAME_LEN`] bytes. No leading or trailing `/`, no `//`.

use std::fmt;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest accepted segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 128;

/// Why a name was refused. The message states the rule that was broken and
/// never echoes the input (it may be attacker-controlled).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    #[error("name segment {0} is '.' or '..'")]
    DotSegment(usize),
    #[error("name segment {0} is longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong(usize),
    #[error("name has a character outside [A-Za-z0-9._-/] at byte {0}")]
    BadChar(usize),
}

/// A valid secret name. Can only be built through [`SecretName::parse`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl SecretName {
    /// Parses `s` against the grammar.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if let Some(pos) = s.bytes().position(|b| !(allowed(b) || b == b'/')) {
            return Err(NameError::BadChar(pos));
        }
        for (i, seg) in s.split('/').enumerate() {
            if seg.is_empty() {
                return Err(NameError::EmptySegment);
            }
            if seg == "." || seg == ".." {
                return Err(NameError::DotSegment(i + 1));
            }
            if seg.len() > MAX_SEGMENT_LEN {
                return Err(NameError::SegmentTooLong(i + 1));
            }
        }
        Ok(SecretName(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretName({})", self.0)
    }
}

/// Checks a listing prefix: empty, or a name, or a name followed by `/`.
pub fn check_prefix(prefix: &str) -> Result<(), NameError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    SecretName::parse(body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["a", "app/db/password", "A-b_c.d/e", "x/.hidden", "a..b"] {
            assert!(SecretName::parse(ok).is_ok(), "{ok}");
        }
        let bad = [
            ("", NameError::Empty),
            ("/a", NameError::EmptySegment),
            ("a/", NameError::EmptySegment),
            ("a//b", NameError::EmptySegment),
            ("a/./b", NameError::DotSegment(2)),
            ("..", NameError::DotSegment(1)),
            ("a b", NameError::BadChar(1)),
            ("a\0b", NameError::BadChar(1)),
            ("é", NameError::BadChar(0)),
        ];
        for (s, e) in bad {
            assert_eq!(SecretName::parse(s), Err(e), "{s:?}");
        }
        assert_eq!(SecretName::parse(&"a".repeat(257)), Err(NameError::TooLong));
        assert_eq!(
            SecretName::parse(&"a".repeat(129)),
            Err(NameError::SegmentTooLong(1))
        );
    }
}
