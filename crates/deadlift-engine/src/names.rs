//! The one validator of each kind of name, so that every layer (the registry, workflow
//! documents, peers, the API) accepts and refuses the same names. Each answers why a
//! name is refused, in words that fit after the field's name.

/// Longest module name or version.
pub const MAX_MODULE_NAME_BYTES: usize = 128;
/// Longest name of a tenant, workflow or peer.
pub const MAX_NAME_BYTES: usize = 64;

/// A module's name or version: 1 to 128 bytes of ASCII letters, digits, `.`, `-`, `_`.
pub fn module_name(name: &str) -> Result<(), String> {
    checked(name, MAX_MODULE_NAME_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
    })
    .map_err(|_| {
        format!(
            "must be 1 to {MAX_MODULE_NAME_BYTES} bytes of ASCII letters, digits, `.`, `-` and `_`"
        )
    })
}

/// A workflow's or a peer's name: 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn resource_name(name: &str) -> Result<(), String> {
    checked(name, MAX_NAME_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    })
}

/// A tenant's name: 1 to 64 bytes of `a-z`, `0-9`, `-`, `_` (it appears in URLs,
/// headers and logs, so nothing that needs escaping or folds case).
pub fn tenant_name(name: &str) -> Result<(), String> {
    checked(name, MAX_NAME_BYTES, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')
    })
    .map_err(|_| format!("must be 1 to {MAX_NAME_BYTES} characters of a-z, 0-9, `-` or `_`"))
}

fn checked(name: &str, max_bytes: usize, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    if name.is_empty() || name.len() > max_bytes {
        return Err(format!("must be 1 to {max_bytes} bytes long"));
    }
    if !name.chars().all(allowed) {
        return Err("may contain only ASCII letters, digits, `-`, `_` and `.`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_name_has_its_own_rules() {
        assert!(module_name("Count.Vowels-1_x").is_ok());
        assert!(module_name(&"m".repeat(128)).is_ok());
        assert!(module_name(&"m".repeat(129)).is_err());
        assert!(resource_name(&"w".repeat(64)).is_ok());
        assert!(resource_name(&"w".repeat(65)).is_err());
        assert!(tenant_name("acme-1_x").is_ok());
        for bad in ["", "Acme", "a.b", "a b", "é", "a/b"] {
            assert!(tenant_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "a b", "a/b", "../x", "é"] {
            assert!(module_name(bad).is_err(), "{bad:?}");
            assert!(resource_name(bad).is_err(), "{bad:?}");
        }
    }
}
