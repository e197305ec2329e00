//! Bearer tokens: secrets, their hashes, the table the gate reads, and the
//! bootstrap admin token.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, RwLock};

use ring::rand::SecureRandom;
use tracing::{info, warn};

use super::{Identity, Role, Scope};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::{Millis, TokenRecord};
use crate::store::{Store, StoreError, Write};

/// Every secret starts with this, so one found in a file or a log is
/// recognisable.
const SECRET_PREFIX: &str = "muster_";
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;
/// The shortest secret accepted from `MUSTER_BOOTSTRAP_TOKEN`.
const MIN_BOOTSTRAP_LEN: usize = 32;
/// The bootstrap admin token's name.
pub(crate) const BOOTSTRAP_NAME: &str = "admin";
/// The file in the data directory that receives a generated bootstrap
/// secret.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A new secret: the prefix and 256 random bits in hex.
pub fn new_secret() -> Result<String, Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Unavailable("the system's random source failed".into()))?;
    let mut secret = String::with_capacity(SECRET_PREFIX.len() + 2 * SECRET_BYTES);
    secret.push_str(SECRET_PREFIX);
    for byte in bytes {
        secret.push_str(&format!("{byte:02x}"));
    }
    Ok(secret)
}

/// The SHA-256 of a secret: what the store keeps. Secrets are random and
/// long, so a fast hash is enough: there is nothing to guess.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref().to_vec()
}

/// A token as the gate needs it.
#[derive(Debug)]
struct Entry {
    record: TokenRecord,
    identity: Arc<Identity>,
}

#[derive(Debug, Default)]
struct Tables {
    by_name: HashMap<String, Arc<Entry>>,
    by_hash: HashMap<Vec<u8>, Arc<Entry>>,
}

/// Every token, readable by the gate on each call. Changes are made
/// durable by the scheduler's writer first, then applied here.
#[derive(Debug, Default)]
pub(crate) struct TokenTable {
    tables: RwLock<Tables>,
}

impl TokenTable {
    pub(crate) fn new(records: Vec<TokenRecord>) -> Self {
        let table = Self::default();
        for record in records {
            table.put(record);
        }
        table
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts or replaces a token.
    pub(crate) fn put(&self, record: TokenRecord) {
        let identity = Arc::new(Identity { name: record.name.clone(), role: record.role, scope: record.scope.clone() });
        let entry = Arc::new(Entry { record, identity });
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        tables.by_hash.insert(entry.record.secret_hash.clone(), entry.clone());
        tables.by_name.insert(entry.record.name.clone(), entry);
    }

    /// The token named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<TokenRecord> {
        self.read().by_name.get(name).map(|e| e.record.clone())
    }

    /// Every token, by name.
    pub(crate) fn list(&self) -> Vec<TokenRecord> {
        let mut records: Vec<TokenRecord> = self.read().by_name.values().map(|e| e.record.clone()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// The identity holding `secret`, if it is known, live and unexpired.
    pub(crate) fn authenticate(&self, secret: &str, now: Millis) -> Result<Arc<Identity>, Error> {
        let tables = self.read();
        let Some(entry) = tables.by_hash.get(&hash_secret(secret)) else {
            return Err(Error::Unauthenticated("the bearer token is not valid".into()));
        };
        if entry.record.revoked_at.is_some() {
            return Err(Error::Unauthenticated(format!("token '{}' has been revoked", entry.record.name)));
        }
        if entry.record.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::Unauthenticated(format!("token '{}' has expired", entry.record.name)));
        }
        Ok(entry.identity.clone())
    }
}

/// On the first start with authentication on, creates the admin token:
/// from `auth.bootstrap_token` when set, else a new secret written to
/// `<data_dir>/admin.token` (mode 0600). Runs before the scheduler, so the
/// direct store write does not race the writer. Returns every token.
pub(crate) fn bootstrap(config: &ServerConfig, store: &dyn Store, now: Millis) -> Result<Vec<TokenRecord>, Error> {
    let tokens = store.tokens()?;
    if !config.auth_enabled() {
        return Ok(tokens);
    }
    if !tokens.is_empty() {
        if config.auth.bootstrap_token.is_some() {
            warn!("the bootstrap token setting is ignored: the store already has tokens");
        }
        return Ok(tokens);
    }
    let (secret, generated) = match &config.auth.bootstrap_token {
        Some(secret) if secret.len() < MIN_BOOTSTRAP_LEN => {
            return Err(Error::invalid(
                "auth.bootstrap_token",
                format!("must be at least {MIN_BOOTSTRAP_LEN} characters (MUSTER_BOOTSTRAP_TOKEN)"),
            ));
        }
        Some(secret) => (secret.clone(), false),
        None => (new_secret()?, true),
    };
    let record = TokenRecord {
        name: BOOTSTRAP_NAME.to_owned(),
        role: Role::Admin,
        scope: Scope::default(),
        secret_hash: hash_secret(&secret),
        created_at: now,
        expires_at: None,
        revoked_at: None,
        created_by: "bootstrap".to_owned(),
    };
    if generated {
        let path = config.data_dir.join(ADMIN_TOKEN_FILE);
        write_private(&path, &secret).map_err(|e| StoreError::Engine(format!("writing {}: {e}", path.display())))?;
        info!(path = %path.display(), "created the bootstrap admin token");
    } else {
        info!("created the bootstrap admin token from the configured secret");
    }
    store.write(&[Write::Token(record.clone())])?;
    store.flush()?;
    Ok(vec![record])
}

/// Writes `secret` to a file only its owner can read.
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // An existing file keeps its mode on open: tighten it.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        writeln!(file, "{secret}")?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        writeln!(file, "{secret}")?;
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, secret: &str) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role: Role::Viewer,
            scope: Scope::default(),
            secret_hash: hash_secret(secret),
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            created_by: "test".into(),
        }
    }

    #[test]
    fn secrets_are_long_random_and_prefixed() -> Result<(), Error> {
        let (a, b) = (new_secret()?, new_secret()?);
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert_eq!(a.len(), SECRET_PREFIX.len() + 64);
        assert_eq!(hash_secret(&a).len(), 32);
        Ok(())
    }

    #[test]
    fn the_table_refuses_unknown_revoked_and_expired_secrets() {
        let table = TokenTable::new(vec![record("ci", "s1")]);
        assert_eq!(table.authenticate("s1", 10).map(|i| i.name.clone()).ok().as_deref(), Some("ci"));
        assert!(matches!(table.authenticate("nope", 10), Err(Error::Unauthenticated(_))));
        table.put(TokenRecord { expires_at: Some(10), ..record("ci", "s1") });
        assert!(table.authenticate("s1", 9).is_ok());
        assert!(matches!(table.authenticate("s1", 10), Err(Error::Unauthenticated(m)) if m.contains("expired")));
        table.put(TokenRecord { revoked_at: Some(5), ..record("ci", "s1") });
        assert!(matches!(table.authenticate("s1", 1), Err(Error::Unauthenticated(m)) if m.contains("revoked")));
    }
}
