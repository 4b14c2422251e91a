//! Validated names: the only values dbps ever splices into SQL as identifiers.

use std::fmt;

use crate::error::{MigrateError, Result};

/// A PostgreSQL identifier (schema, database, role, component) that dbps may quote into SQL.
///
/// Valid identifiers match `[a-z][a-z0-9_]*`, are at most [`Identifier::MAX_LEN`] bytes long
/// (PostgreSQL truncates longer names silently, which would make two names collide) and do
/// not start with `pg_`, which PostgreSQL reserves for its own schemas and roles. Because of
/// that alphabet, quoting an identifier can never change the meaning of a statement.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier(String);

impl Identifier {
    /// The longest identifier PostgreSQL keeps without truncating it (`NAMEDATALEN - 1`).
    pub const MAX_LEN: usize = 63;

    /// Validates `value` as an identifier.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidIdentifier`] naming the rule `value` breaks.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        Self::checked("identifier", value.into(), Self::MAX_LEN)
    }

    /// Validates `value` as the identifier of a `what` (used in the error), at most `max` long.
    pub(crate) fn checked(what: &'static str, value: String, max: usize) -> Result<Self> {
        check(&value, max).map_err(|reason| MigrateError::InvalidIdentifier {
            what,
            value: shorten(&value),
            reason,
        })?;
        Ok(Self(value))
    }

    /// The identifier as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier in double quotes, ready to go into a statement.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn quoted(&self) -> String {
        // The alphabet excludes `"`, so no escaping is needed; quoting keeps keywords such as
        // `user` or `order` usable as names.
        format!("\"{}\"", self.0)
    }

    /// This identifier followed by `suffix`, which must itself keep the name valid.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn with_suffix(&self, suffix: &str) -> Self {
        debug_assert!(check(&format!("{}{suffix}", self.0), Self::MAX_LEN).is_ok());
        Self(format!("{}{suffix}", self.0))
    }
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Identifier {
    type Err = MigrateError;

    fn from_str(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Identifier {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The name of a service, from which its database, schema and role names are derived.
///
/// A service name is an [`Identifier`] of at most [`ServiceName::MAX_LEN`] bytes, so that the
/// derived names (`<service>_owner`, `<service>_app`) stay within PostgreSQL's limit. The
/// names of PostgreSQL's own databases (`postgres`, `template0`, `template1`) are refused,
/// since the service's database is named after it.
///
/// ```
/// use dbps_migrate::ServiceName;
///
/// assert_eq!(ServiceName::new("customer").unwrap().as_str(), "customer");
/// assert!(ServiceName::new("Customer").is_err());
/// assert!(ServiceName::new("customer; DROP TABLE x").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(Identifier);

impl ServiceName {
    /// The longest service name: 63 minus the longest suffix dbps appends (`_owner`), with
    /// room to spare.
    pub const MAX_LEN: usize = 48;

    /// Validates `value` as a service name.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidIdentifier`] naming the rule `value` breaks.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let name = Identifier::checked("service name", value.into(), Self::MAX_LEN)?;
        if matches!(name.as_str(), "postgres" | "template0" | "template1") {
            return Err(MigrateError::InvalidIdentifier {
                what: "service name",
                value: shorten(name.as_str()),
                reason: "is the name of a database postgresql keeps for itself".into(),
            });
        }
        Ok(Self(name))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The name as an [`Identifier`].
    pub fn as_identifier(&self) -> &Identifier {
        &self.0
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl std::str::FromStr for ServiceName {
    type Err = MigrateError;

    fn from_str(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        self.0.as_str()
    }
}

impl From<ServiceName> for Identifier {
    fn from(name: ServiceName) -> Self {
        name.0
    }
}

/// A password for a role dbps provisions. Its `Debug` output is redacted and it has no
/// `Display`, so it cannot end up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps `value` as a password.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidPassword`] if `value` is empty or contains a NUL character,
    /// which PostgreSQL cannot store.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        if value.is_empty() {
            return Err(MigrateError::InvalidPassword { reason: "is empty" });
        }
        if value.contains('\0') {
            return Err(MigrateError::InvalidPassword {
                reason: "contains a nul character",
            });
        }
        Ok(Self(value))
    }

    /// The password in the file at `path` (a secrets mount, say): its content without one
    /// trailing line break.
    ///
    /// # Errors
    ///
    /// [`MigrateError::SecretFile`] if the file cannot be read (the message names the
    /// file, never its content), [`MigrateError::InvalidPassword`] as for
    /// [`Password::new`].
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| MigrateError::SecretFile {
            path: path.to_path_buf(),
            source,
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        Self::new(text)
    }

    /// The password itself. Keep it out of logs.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why `value` is not an identifier of at most `max` bytes, if it is not.
fn check(value: &str, max: usize) -> Result<(), String> {
    let mut chars = value.chars();
    match chars.next() {
        None => return Err("is empty".into()),
        Some(first) if !first.is_ascii_lowercase() => {
            return Err("must start with a lowercase ascii letter (a-z)".into());
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("may contain only lowercase ascii letters, digits and underscores".into());
    }
    if value.len() > max {
        return Err(format!("is longer than {max} bytes"));
    }
    if value.starts_with("pg_") {
        return Err("starts with pg_, which postgresql reserves".into());
    }
    Ok(())
}

/// `value` cut to a length that is fine to show in an error message.
fn shorten(value: &str) -> String {
    const SHOWN: usize = 80;
    if value.chars().count() <= SHOWN {
        value.to_owned()
    } else {
        let mut shown: String = value.chars().take(SHOWN).collect();
        shown.push('…');
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_loses_its_trailing_line_break_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("dbps-migrate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("quote.password");
        std::fs::write(&file, "s3cret  \r\n").unwrap();
        assert_eq!(Password::from_file(&file).unwrap().expose_secret(), "s3cret  ");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            Password::from_file(&file),
            Err(MigrateError::InvalidPassword { .. })
        ));
        let missing = dir.join("missing");
        let error = Password::from_file(&missing).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn valid_identifiers_are_accepted() {
        for name in ["a", "customer", "quote_service", "s3", "a_1_b", &"x".repeat(63)] {
            assert_eq!(Identifier::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn invalid_identifiers_are_rejected_with_the_rule() {
        let cases = [
            ("", "is empty"),
            ("Customer", "must start"),
            ("1abc", "must start"),
            ("_abc", "must start"),
            ("cust-omer", "may contain only"),
            ("cust omer", "may contain only"),
            ("a\"; drop table x; --", "may contain only"),
            ("kundé", "may contain only"),
            ("abC", "may contain only"),
            ("pg_catalog", "reserves"),
        ];
        for (name, reason) in cases {
            let error = Identifier::new(name).unwrap_err();
            let MigrateError::InvalidIdentifier { reason: got, .. } = &error else {
                panic!("{name:?}: unexpected error {error:?}");
            };
            assert!(got.contains(reason), "{name:?}: {got}");
        }
        assert!(Identifier::new("x".repeat(64)).is_err());
    }

    #[test]
    fn service_names_are_shorter_and_not_system_databases() {
        assert!(ServiceName::new("s".repeat(48)).is_ok());
        let error = ServiceName::new("s".repeat(49)).unwrap_err();
        assert!(error.to_string().contains("48 bytes"), "{error}");
        for reserved in ["postgres", "template0", "template1"] {
            assert!(ServiceName::new(reserved).is_err(), "{reserved}");
        }
        let error = ServiceName::new("Bad-Name").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid service name \"Bad-Name\": must start with a lowercase ascii letter (a-z)"
        );
    }

    #[test]
    fn quoting_and_suffixes() {
        let name = ServiceName::new("user").unwrap();
        assert_eq!(name.as_identifier().quoted(), "\"user\"");
        assert_eq!(name.as_identifier().with_suffix("_owner").as_str(), "user_owner");
    }

    #[test]
    fn long_rejected_names_are_shortened_in_errors() {
        let error = Identifier::new("X".repeat(1000)).unwrap_err();
        assert!(error.to_string().len() < 200, "{error}");
    }

    #[test]
    fn passwords_are_redacted_and_checked() {
        let password = Password::new("s3cr'et").unwrap();
        assert_eq!(format!("{password:?}"), "Password(<redacted>)");
        assert_eq!(password.expose_secret(), "s3cr'et");
        assert!(Password::new("").is_err());
        assert!(Password::new("a\0b").is_err());
    }
}
