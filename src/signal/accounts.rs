//! The server's account store: one SQLite database with users, their credential
//! hashes and identity keys, and the token-signing secret. [`Accounts`] is the
//! synchronous store (used directly by `brume server add-user`); [`AccountStore`] is
//! the async handle the running server uses, backed by one thread that owns the
//! connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::protocol::IdentityKey;
use super::token::TokenKey;
use crate::ids::UserName;

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

/// Errors of the account store.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// The database could not be opened or queried.
    #[error("account database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The database file or its folder could not be created.
    #[error("cannot create account database {path}: {source}")]
    Create {
        /// The database file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The database was written by a newer Brume.
    #[error("account database {path} has schema version {found}, this server knows {known}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// `add-user` for a name that is taken.
    #[error("user {name} already exists")]
    UserExists {
        /// The name.
        name: UserName,
    },
    /// An operation on a user that does not exist.
    #[error("unknown user {name}")]
    UnknownUser {
        /// The name.
        name: UserName,
    },
    /// The store's thread has stopped.
    #[error("account store stopped")]
    Stopped,
    /// The system's random number generator failed.
    #[error("no randomness available: {reason}")]
    Random {
        /// What failed.
        reason: String,
    },
}

/// Outcome of presenting an identity key for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The user had no key; this one is now registered.
    Registered,
    /// The key is the registered one.
    Matches,
    /// The user has another key; refused until an administrator resets it.
    Differs,
    /// Another account has registered this key; refused.
    Taken,
}

/// A revocation of an account's tokens, as the running server picks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Its position in the log of revocations.
    pub seq: i64,
    /// The account.
    pub name: UserName,
    /// Tokens of an older generation than this are refused.
    pub token_gen: u64,
}

/// Fills `buf` from the OS's random number generator.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), AccountsError> {
    getrandom::fill(buf).map_err(|e| AccountsError::Random {
        reason: e.to_string(),
    })
}

fn credential_hash(credential: &str) -> [u8; 32] {
    // Credentials are 256 random bits, so a fast hash is enough: there is nothing to
    // brute-force. Keyed so the stored hash is useless outside this context.
    blake3::keyed_hash(b"brume-signal-credential-hash-v1!", credential.as_bytes()).into()
}

/// The synchronous account store; owns one SQLite connection.
pub struct Accounts {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("path", &self.path)
            .finish()
    }
}

impl Accounts {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, AccountsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let create = |source| AccountsError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(create)?;
        }
        // Create the file ourselves so it is never readable by others: it holds the
        // token secret. SQLite gives its -wal and -shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(create)?;
        let db = |source| AccountsError::Db {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        // The server and `add-user` may use the database at the same time.
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        if found > SCHEMA_VERSION {
            return Err(AccountsError::Schema {
                path: path.to_owned(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS users (
                 name TEXT PRIMARY KEY,
                 credential_hash BLOB NOT NULL,
                 identity_key BLOB,
                 created_at INTEGER NOT NULL
             );
             COMMIT;",
        )
        .map_err(db)?;
        // Version 2: per-account token generations (tokens minted before a revocation
        // are refused), the revocations a running server picks up, and a lookup of
        // keys by value (one key per account).
        let mut conn = conn;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        if version < 2 {
            tx.execute_batch(
                "ALTER TABLE users ADD COLUMN token_gen INTEGER NOT NULL DEFAULT 0;
                 CREATE TABLE IF NOT EXISTS revocations (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     name TEXT NOT NULL,
                     token_gen INTEGER NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS users_by_identity_key ON users (identity_key);
                 PRAGMA user_version = 2;",
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        let accounts = Self {
            conn,
            path: path.to_owned(),
        };
        accounts.ensure_secret()?;
        Ok(accounts)
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> AccountsError + '_ {
        |source| AccountsError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn ensure_secret(&self) -> Result<(), AccountsError> {
        let mut secret = [0u8; 32];
        random_bytes(&mut secret)?;
        // Another process may race us here; the first secret wins and both read it.
        self.conn
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('token_secret', ?1)",
                params![&secret[..]],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// The key that signs and verifies access tokens.
    pub fn token_key(&self) -> Result<TokenKey, AccountsError> {
        let secret: Vec<u8> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'token_secret'",
                [],
                |r| r.get(0),
            )
            .map_err(self.db())?;
        Ok(TokenKey::from_secret(&secret))
    }

    /// Creates a user and returns its new long-lived credential.
    pub fn add_user(&self, name: &UserName) -> Result<String, AccountsError> {
        let mut raw = [0u8; 32];
        random_bytes(&mut raw)?;
        let credential = URL_SAFE_NO_PAD.encode(raw);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO users (name, credential_hash, created_at) VALUES (?1, ?2, ?3)",
                params![name.as_str(), &credential_hash(&credential)[..], now as i64],
            )
            .map_err(self.db())?;
        if inserted == 0 {
            return Err(AccountsError::UserExists { name: name.clone() });
        }
        Ok(credential)
    }

    /// Whether `credential` is `name`'s credential (false for unknown users).
    pub fn check_credential(
        &self,
        name: &UserName,
        credential: &str,
    ) -> Result<bool, AccountsError> {
        Ok(self.credential_generation(name, credential)?.is_some())
    }

    /// The generation tokens for `name` are minted with, if `credential` is its
    /// credential (`None` for a wrong one or an unknown user).
    pub fn credential_generation(
        &self,
        name: &UserName,
        credential: &str,
    ) -> Result<Option<u64>, AccountsError> {
        let stored: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT credential_hash, token_gen FROM users WHERE name = ?1",
                params![name.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.db())?;
        let Some((hash, token_gen)) = stored else {
            return Ok(None);
        };
        Ok(match <[u8; 32]>::try_from(hash) {
            // blake3::Hash compares in constant time.
            Ok(stored)
                if blake3::Hash::from(stored)
                    == blake3::Hash::from(credential_hash(credential)) =>
            {
                Some(u64::try_from(token_gen).unwrap_or(0))
            }
            _ => None,
        })
    }

    /// Refuses every token `name` holds from now on (they must be fetched again with
    /// the credential), and logs the revocation for the running server, which ends
    /// the account's sessions. Returns the new generation.
    pub fn revoke_tokens(&self, name: &UserName) -> Result<u64, AccountsError> {
        let token_gen: Option<i64> = self
            .conn
            .query_row(
                "UPDATE users SET token_gen = token_gen + 1 WHERE name = ?1 RETURNING token_gen",
                params![name.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        let Some(token_gen) = token_gen else {
            return Err(AccountsError::UnknownUser { name: name.clone() });
        };
        self.conn
            .execute(
                "INSERT INTO revocations (name, token_gen) VALUES (?1, ?2)",
                params![name.as_str(), token_gen],
            )
            .map_err(self.db())?;
        Ok(u64::try_from(token_gen).unwrap_or(0))
    }

    /// Revocations logged after `seq`, oldest first.
    pub fn revocations_since(&self, seq: i64) -> Result<Vec<Revocation>, AccountsError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, name, token_gen FROM revocations WHERE seq > ?1 ORDER BY seq LIMIT 1000",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![seq], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, name, token_gen) = row.map_err(self.db())?;
            // Names were checked when the account was made.
            if let Ok(name) = UserName::new(&name) {
                out.push(Revocation {
                    seq,
                    name,
                    token_gen: u64::try_from(token_gen).unwrap_or(0),
                });
            }
        }
        Ok(out)
    }

    /// Every account whose tokens were ever revoked, with its generation, and the
    /// position of the latest revocation: what a starting server needs.
    pub fn token_generations(&self) -> Result<(i64, Vec<(UserName, u64)>), AccountsError> {
        let last: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |r| {
                r.get(0)
            })
            .map_err(self.db())?;
        let mut stmt = self
            .conn
            .prepare("SELECT name, token_gen FROM users WHERE token_gen > 0")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, token_gen) = row.map_err(self.db())?;
            if let Ok(name) = UserName::new(&name) {
                out.push((name, u64::try_from(token_gen).unwrap_or(0)));
            }
        }
        Ok((last, out))
    }

    /// Whether the user exists.
    pub fn user_exists(&self, name: &UserName) -> Result<bool, AccountsError> {
        self.conn
            .query_row(
                "SELECT 1 FROM users WHERE name = ?1",
                params![name.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(self.db())
    }

    /// The user's registered identity key, if any.
    pub fn identity_key(&self, name: &UserName) -> Result<Option<IdentityKey>, AccountsError> {
        let row: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT identity_key FROM users WHERE name = ?1",
                params![name.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        match row {
            None => Err(AccountsError::UnknownUser { name: name.clone() }),
            Some(key) => Ok(key
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(IdentityKey)),
        }
    }

    /// Registers `key` for a user that has none, or compares it with the registered one.
    pub fn check_key(&self, name: &UserName, key: &IdentityKey) -> Result<KeyCheck, AccountsError> {
        let taken = self
            .conn
            .query_row(
                "SELECT 1 FROM users WHERE identity_key = ?2 AND name != ?1",
                params![name.as_str(), &key.0[..]],
                |_| Ok(()),
            )
            .optional()
            .map_err(self.db())?;
        if taken.is_some() {
            return Ok(KeyCheck::Taken);
        }
        let registered = self
            .conn
            .execute(
                "UPDATE users SET identity_key = ?2 WHERE name = ?1 AND identity_key IS NULL",
                params![name.as_str(), &key.0[..]],
            )
            .map_err(self.db())?;
        if registered == 1 {
            return Ok(KeyCheck::Registered);
        }
        match self.identity_key(name)? {
            Some(existing) if existing == *key => Ok(KeyCheck::Matches),
            _ => Ok(KeyCheck::Differs),
        }
    }

    /// Forgets a user's identity key so the next one it presents is registered, and
    /// revokes its tokens (see [`Accounts::revoke_tokens`]): whoever used the old key
    /// is disconnected, and only a holder of the credential gets back in.
    pub fn reset_key(&self, name: &UserName) -> Result<(), AccountsError> {
        let changed = self
            .conn
            .execute(
                "UPDATE users SET identity_key = NULL WHERE name = ?1",
                params![name.as_str()],
            )
            .map_err(self.db())?;
        if changed == 0 {
            return Err(AccountsError::UnknownUser { name: name.clone() });
        }
        self.revoke_tokens(name)?;
        Ok(())
    }
}

/// One request to the store's thread, with where to send the answer.
enum Request {
    CheckCredential {
        name: UserName,
        credential: String,
        reply: oneshot::Sender<Result<Option<u64>, AccountsError>>,
    },
    Revocations {
        since: i64,
        reply: oneshot::Sender<Result<Vec<Revocation>, AccountsError>>,
    },
    UserExists {
        name: UserName,
        reply: oneshot::Sender<Result<bool, AccountsError>>,
    },
    IdentityKey {
        name: UserName,
        reply: oneshot::Sender<Result<Option<IdentityKey>, AccountsError>>,
    },
    CheckKey {
        name: UserName,
        key: IdentityKey,
        reply: oneshot::Sender<Result<KeyCheck, AccountsError>>,
    },
}

/// Async handle to the account store for the running server. Cloneable; the store's
/// thread ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct AccountStore {
    /// Requests to the thread that owns the SQLite connection. Bounded: callers wait
    /// when the database is the bottleneck instead of queueing without limit.
    requests: mpsc::Sender<Request>,
}

impl AccountStore {
    /// Moves `accounts` onto its own thread, so SQLite never blocks the async workers.
    pub fn spawn(accounts: Accounts) -> Result<Self, AccountsError> {
        let (requests, mut rx) = mpsc::channel::<Request>(256);
        let path = accounts.path.clone();
        // The one thread that owns the connection; it ends when every handle is gone.
        std::thread::Builder::new()
            .name("brume-accounts".into())
            .spawn(move || {
                while let Some(request) = rx.blocking_recv() {
                    // A requester that gave up (its connection closed) is not an error.
                    match request {
                        Request::CheckCredential {
                            name,
                            credential,
                            reply,
                        } => {
                            let _ = reply.send(accounts.credential_generation(&name, &credential));
                        }
                        Request::Revocations { since, reply } => {
                            let _ = reply.send(accounts.revocations_since(since));
                        }
                        Request::UserExists { name, reply } => {
                            let _ = reply.send(accounts.user_exists(&name));
                        }
                        Request::IdentityKey { name, reply } => {
                            let _ = reply.send(accounts.identity_key(&name));
                        }
                        Request::CheckKey { name, key, reply } => {
                            let _ = reply.send(accounts.check_key(&name, &key));
                        }
                    }
                }
            })
            .map_err(|source| AccountsError::Create { path, source })?;
        Ok(Self { requests })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, AccountsError>>) -> Request,
    ) -> Result<T, AccountsError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| AccountsError::Stopped)?;
        answer.await.map_err(|_| AccountsError::Stopped)?
    }

    /// See [`Accounts::credential_generation`].
    pub async fn credential_generation(
        &self,
        name: UserName,
        credential: String,
    ) -> Result<Option<u64>, AccountsError> {
        self.ask(|reply| Request::CheckCredential {
            name,
            credential,
            reply,
        })
        .await
    }

    /// See [`Accounts::revocations_since`].
    pub async fn revocations_since(&self, since: i64) -> Result<Vec<Revocation>, AccountsError> {
        self.ask(|reply| Request::Revocations { since, reply })
            .await
    }

    /// See [`Accounts::user_exists`].
    pub async fn user_exists(&self, name: UserName) -> Result<bool, AccountsError> {
        self.ask(|reply| Request::UserExists { name, reply }).await
    }

    /// See [`Accounts::identity_key`].
    pub async fn identity_key(&self, name: UserName) -> Result<Option<IdentityKey>, AccountsError> {
        self.ask(|reply| Request::IdentityKey { name, reply }).await
    }

    /// See [`Accounts::check_key`].
    pub async fn check_key(
        &self,
        name: UserName,
        key: IdentityKey,
    ) -> Result<KeyCheck, AccountsError> {
        self.ask(|reply| Request::CheckKey { name, key, reply })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_credentials_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/server.db");
        let accounts = Accounts::open(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let alice = UserName::new("alice").unwrap();
        let cred = accounts.add_user(&alice).unwrap();
        assert!(matches!(
            accounts.add_user(&alice),
            Err(AccountsError::UserExists { .. })
        ));
        assert!(accounts.check_credential(&alice, &cred).unwrap());
        assert!(!accounts.check_credential(&alice, "nope").unwrap());
        let bob = UserName::new("bob").unwrap();
        assert!(!accounts.check_credential(&bob, &cred).unwrap());
        assert!(!accounts.user_exists(&bob).unwrap());

        let k1 = IdentityKey([1; 32]);
        let k2 = IdentityKey([2; 32]);
        assert_eq!(accounts.identity_key(&alice).unwrap(), None);
        assert_eq!(
            accounts.check_key(&alice, &k1).unwrap(),
            KeyCheck::Registered
        );
        assert_eq!(accounts.check_key(&alice, &k1).unwrap(), KeyCheck::Matches);
        assert_eq!(accounts.check_key(&alice, &k2).unwrap(), KeyCheck::Differs);
        // Another account cannot register alice's key.
        accounts.add_user(&bob).unwrap();
        assert_eq!(accounts.check_key(&bob, &k1).unwrap(), KeyCheck::Taken);
        assert_eq!(accounts.identity_key(&bob).unwrap(), None);
        assert_eq!(accounts.token_generations().unwrap(), (0, Vec::new()));
        accounts.reset_key(&alice).unwrap();
        assert_eq!(
            accounts.check_key(&alice, &k2).unwrap(),
            KeyCheck::Registered
        );
        // The reset revoked alice's tokens: generation 1, logged once.
        assert_eq!(
            accounts.credential_generation(&alice, &cred).unwrap(),
            Some(1)
        );
        assert_eq!(accounts.revoke_tokens(&alice).unwrap(), 2);
        let logged = accounts.revocations_since(0).unwrap();
        assert_eq!(
            logged.iter().map(|r| r.token_gen).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(
            accounts
                .revocations_since(logged[1].seq)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            accounts.token_generations().unwrap(),
            (logged[1].seq, vec![(alice.clone(), 2)])
        );
        let nobody = UserName::new("nobody").unwrap();
        assert!(matches!(
            accounts.revoke_tokens(&nobody),
            Err(AccountsError::UnknownUser { .. })
        ));
        assert!(matches!(
            accounts.reset_key(&nobody),
            Err(AccountsError::UnknownUser { .. })
        ));

        // A second handle (another process in real life) shares the secret.
        let again = Accounts::open(&path).unwrap();
        let token = accounts.token_key().unwrap().mint(&alice, 10, 20).unwrap();
        assert!(again.token_key().unwrap().verify(&token, 15).is_ok());
    }

    #[test]
    fn a_version_1_database_is_upgraded_with_its_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                 CREATE TABLE users (
                     name TEXT PRIMARY KEY,
                     credential_hash BLOB NOT NULL,
                     identity_key BLOB,
                     created_at INTEGER NOT NULL
                 );
                 PRAGMA user_version = 1;",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO users VALUES ('alice', ?1, NULL, 0)",
                params![&credential_hash("old")[..]],
            )
            .unwrap();
        }
        let accounts = Accounts::open(&path).unwrap();
        let alice = UserName::new("alice").unwrap();
        assert_eq!(
            accounts.credential_generation(&alice, "old").unwrap(),
            Some(0)
        );
        assert_eq!(accounts.revoke_tokens(&alice).unwrap(), 1);
        drop(accounts);
        // Opening again does not migrate twice.
        let accounts = Accounts::open(&path).unwrap();
        assert_eq!(
            accounts.credential_generation(&alice, "old").unwrap(),
            Some(1)
        );
    }
}
