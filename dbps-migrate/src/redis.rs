//! A service's ACL user on a shared Redis: its own key prefix and the commands dbps uses.
//!
//! Redis has one key space per database and, by default, one all-powerful user: any
//! service could read or overwrite another's cache entries, sessions or rate-limit
//! counters. [`RedisAccess`] provisions (`ACL SETUSER … reset …`, so the user is exactly
//! what is declared, whatever it was before) a user that:
//!
//! - may touch only keys starting with its prefix (`<service>:` by default, which is how
//!   dbps-cache's `RedisCache`, `RedisLimiter` and `RedisSessionStore` name theirs when
//!   given the service's name as their namespace);
//! - may run only [`DEFAULT_COMMANDS`] (what dbps-cache sends, its Lua scripts' calls
//!   included, and what the client sends on connect), or the list given;
//! - has no Pub/Sub channels.
//!
//! Anything else is refused with `NOPERM`. [`RedisAccess::revoke`] deletes the user.
//!
//! ```no_run
//! # async fn example(admin: redis::Client) -> Result<(), dbps_migrate::MigrateError> {
//! use dbps_migrate::redis::RedisAccess;
//! use dbps_migrate::{Password, ServiceName};
//!
//! let password = Password::new(std::env::var("QUOTE_REDIS_PASSWORD").unwrap_or_default())?;
//! RedisAccess::new(ServiceName::new("quote")?).provision(&admin, &password).await?;
//! # Ok(()) }
//! ```

use std::fmt;

use crate::{MigrateError, Password, Result, ServiceName};

/// The commands a dbps service sends: `GET`, `SET`, `DEL` (the cache and the session
/// store), `EVALSHA`, `EVAL` and `SCRIPT LOAD` (the cache's and the limiter's scripts),
/// `INCR`, `PEXPIRE` and `TIME` (called inside those scripts) and `PING`. (The client's
/// `CLIENT SETINFO` on connect is left out: Redis before 7.2 does not know it, and the
/// client goes on when it is refused.)
pub const DEFAULT_COMMANDS: &[&str] = &[
    "get",
    "set",
    "del",
    "evalsha",
    "eval",
    "script|load",
    "incr",
    "pexpire",
    "time",
    "ping",
];

/// A service's ACL user on a shared Redis (see the [module](self)).
#[derive(Clone)]
pub struct RedisAccess {
    service: ServiceName,
    user: String,
    key_prefix: String,
    commands: Vec<String>,
}

impl fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAccess")
            .field("service", &self.service)
            .field("user", &self.user)
            .field("key_prefix", &self.key_prefix)
            .field("commands", &self.commands)
            .finish()
    }
}

impl RedisAccess {
    /// The user `<service>`, keys under `<service>:`, [`DEFAULT_COMMANDS`].
    pub fn new(service: ServiceName) -> Self {
        Self {
            user: service.as_str().to_owned(),
            key_prefix: format!("{service}:"),
            commands: DEFAULT_COMMANDS.iter().map(|c| (*c).to_owned()).collect(),
            service,
        }
    }

    /// The user name (default: the service name).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// The key prefix (default `<service>:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Allows one more command (`"hget"`, or a subcommand as `"client|setinfo"`).
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.commands.push(command.into());
        self
    }

    /// The user name.
    pub fn user_name(&self) -> &str {
        &self.user
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: &str, reason: &'static str| MigrateError::InvalidIdentifier {
            what,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let plain = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic() && b != b'*');
        if !plain(&self.user) {
            return Err(bad(
                "redis user",
                &self.user,
                "must be printable ascii without spaces or '*'",
            ));
        }
        // A key pattern: glob characters would widen it.
        if !plain(&self.key_prefix) || self.key_prefix.contains(['?', '[', ']', '\\']) {
            return Err(bad(
                "key prefix",
                &self.key_prefix,
                "must be non-empty printable ascii without glob characters",
            ));
        }
        for command in &self.commands {
            if !command
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'|' || b == b'-' || b == b'_')
            {
                return Err(bad("redis command", command, "must be a command name"));
            }
        }
        Ok(())
    }

    /// The `ACL SETUSER` arguments, the password last (so that it is easy to leave out).
    fn rules(&self) -> Vec<String> {
        let mut rules = vec![
            self.user.clone(),
            String::from("reset"),
            String::from("on"),
            format!("~{}*", self.key_prefix),
            String::from("resetchannels"),
            String::from("-@all"),
        ];
        rules.extend(self.commands.iter().map(|command| format!("+{command}")));
        rules
    }

    /// Creates or replaces the user, through `admin` (a client whose user may run `ACL`).
    /// Idempotent: the user ends up exactly as declared, with `password` as its only one.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidIdentifier`] for a bad name, prefix or command (before any
    /// connection); [`MigrateError::Redis`] if Redis refuses (an unknown command name, an
    /// admin without `ACL` rights) or cannot be reached.
    pub async fn provision(&self, admin: &redis::Client, password: &Password) -> Result<()> {
        self.validate()?;
        let action = format!("provision the ACL user {}", self.user);
        let mut connection = connect(admin, &action).await?;
        let mut command = redis::cmd("ACL");
        command.arg("SETUSER");
        for rule in self.rules() {
            command.arg(rule);
        }
        command.arg(format!(">{}", password.expose_secret()));
        command
            .query_async::<()>(&mut connection)
            .await
            .map_err(|source| MigrateError::Redis { action, source })?;
        tracing::info!(service = %self.service, user = %self.user, prefix = %self.key_prefix, "redis ACL user provisioned");
        Ok(())
    }

    /// Deletes the user; its open connections are closed by Redis. Returns whether it
    /// existed.
    ///
    /// # Errors
    ///
    /// [`MigrateError::Redis`] as for [`RedisAccess::provision`].
    pub async fn revoke(&self, admin: &redis::Client) -> Result<bool> {
        let action = format!("delete the ACL user {}", self.user);
        let mut connection = connect(admin, &action).await?;
        let deleted: u64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.user)
            .query_async(&mut connection)
            .await
            .map_err(|source| MigrateError::Redis { action, source })?;
        tracing::info!(service = %self.service, user = %self.user, existed = deleted > 0, "redis ACL user revoked");
        Ok(deleted > 0)
    }
}

/// A connection of `admin`, its failure an error of `action`.
async fn connect(admin: &redis::Client, action: &str) -> Result<redis::aio::MultiplexedConnection> {
    admin
        .get_multiplexed_async_connection()
        .await
        .map_err(|source| MigrateError::Redis {
            action: action.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_reset_to_its_prefix_and_commands() {
        let access = RedisAccess::new(ServiceName::new("quote").unwrap()).command("hget");
        let rules = access.rules().join(" ");
        assert!(
            rules.starts_with("quote reset on ~quote:* resetchannels -@all +get +set"),
            "{rules}"
        );
        assert!(rules.ends_with("+hget"), "{rules}");
    }

    #[test]
    fn a_glob_in_the_prefix_is_refused() {
        let access = RedisAccess::new(ServiceName::new("quote").unwrap()).key_prefix("quote*");
        assert!(access.validate().is_err());
        let access = RedisAccess::new(ServiceName::new("quote").unwrap()).key_prefix("q[a-z]");
        assert!(access.validate().is_err());
    }
}
