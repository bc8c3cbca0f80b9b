//! Event subjects and subject patterns, as in NATS: a subject is dot-separated tokens
//! (`payments.discount.sent`); a pattern may use `*` for exactly one token and `>` as its
//! last token for one or more remaining tokens. Event types are subjects; triggers and
//! peer filters are patterns.

use std::fmt;

/// Why a subject or pattern is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a valid {what}: {reason}")]
pub struct SubjectError {
    text: String,
    what: &'static str,
    reason: &'static str,
}

/// Longest subject or pattern accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;

fn check_tokens(text: &str, what: &'static str, wildcards: bool) -> Result<(), SubjectError> {
    let fail = |reason| {
        Err(SubjectError {
            text: text.to_owned(),
            what,
            reason,
        })
    };
    if text.is_empty() {
        return fail("it is empty");
    }
    if text.len() > MAX_SUBJECT_BYTES {
        return fail("it is longer than 256 bytes");
    }
    let tokens: Vec<&str> = text.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return fail("tokens between dots must not be empty");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return fail("it must not contain whitespace or control characters");
        }
        let is_wildcard = *token == "*" || *token == ">";
        if !wildcards && (token.contains('*') || token.contains('>')) {
            return fail("`*` and `>` are wildcards, allowed only in patterns");
        }
        if wildcards && !is_wildcard && (token.contains('*') || token.contains('>')) {
            return fail("a wildcard must be a whole token");
        }
        if *token == ">" && index + 1 != tokens.len() {
            return fail("`>` may only be the last token");
        }
    }
    Ok(())
}

/// Checks that `text` is a concrete subject (no wildcards).
pub fn validate_subject(text: &str) -> Result<(), SubjectError> {
    check_tokens(text, "subject", false)
}

/// A parsed subject pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern(String);

impl SubjectPattern {
    pub fn parse(text: &str) -> Result<Self, SubjectError> {
        check_tokens(text, "subject pattern", true)?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the concrete `subject` matches this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        let mut subject_tokens = subject.split('.');
        for token in self.0.split('.') {
            match token {
                ">" => return subject_tokens.next().is_some(),
                "*" => {
                    if subject_tokens.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if subject_tokens.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        subject_tokens.next().is_none()
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, subject: &str) -> bool {
        SubjectPattern::parse(pattern).unwrap().matches(subject)
    }

    #[test]
    fn literal_star_and_tail_wildcards_match_like_nats() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(!matches("a.*", "a"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.b.>", "x.b.y"));
    }

    #[test]
    fn malformed_subjects_and_patterns_are_refused_with_a_reason() {
        for bad in ["", "a..b", ".a", "a.", "a b", "a.>.b", "a*.b", "a.b>"] {
            assert!(
                SubjectPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(validate_subject("a.*").is_err());
        assert!(validate_subject("a.>").is_err());
        validate_subject("payments.discount.sent").unwrap();
        let error = SubjectPattern::parse("a.>.b").unwrap_err();
        assert!(error.to_string().contains("last token"), "{error}");
    }
}
