//! The catalog's SQL schema and its migrations. `user_version` holds the schema
//! version; each migration moves it up by one inside a transaction.

use rusqlite::Connection;

/// The schema version this code reads and writes.
pub(crate) const VERSION: i64 = 1;

const V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Groups this client owns or has joined.
CREATE TABLE groups (
    id        INTEGER PRIMARY KEY,
    owner     TEXT NOT NULL,
    name      TEXT NOT NULL,
    root      INTEGER NOT NULL,
    owned     INTEGER NOT NULL,
    -- Owned groups: the first log position. Joined groups: the owner's log
    -- position applied so far.
    next_seq  INTEGER NOT NULL,
    UNIQUE (owner, name)
);
-- Members of owned groups, as parsed from `.members`.
CREATE TABLE members (
    group_id  INTEGER NOT NULL,
    user      TEXT NOT NULL,
    PRIMARY KEY (group_id, user)
) WITHOUT ROWID;
-- The namespace: one row per inode.
CREATE TABLE nodes (
    ino       INTEGER PRIMARY KEY,
    group_id  INTEGER,
    kind      INTEGER NOT NULL,
    perm      INTEGER NOT NULL,
    uid       INTEGER NOT NULL,
    gid       INTEGER NOT NULL,
    nlink     INTEGER NOT NULL,
    rdev      INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    atime_s   INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    mtime_s   INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_s   INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    target    BLOB,
    -- In joined groups: the owner's inode number, the owner's version held, and
    -- whether the member changed the node locally.
    remote_id      INTEGER,
    remote_version INTEGER,
    local_edit     INTEGER
);
CREATE TABLE dirents (
    parent    INTEGER NOT NULL,
    name      BLOB NOT NULL,
    ino       INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX dirents_by_ino ON dirents (ino);
CREATE TABLE xattrs (
    ino       INTEGER NOT NULL,
    name      BLOB NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
-- Per-group change log; seq is strictly increasing per group.
CREATE TABLE changes (
    group_id   INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    op         TEXT NOT NULL,
    ino        INTEGER NOT NULL,
    parent     INTEGER,
    name       BLOB,
    new_parent INTEGER,
    new_name   BLOB,
    ranges     TEXT,
    at_ns      INTEGER NOT NULL,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;
-- Other users' ed25519 identity keys, pinned on first contact.
CREATE TABLE peer_keys (
    user       TEXT PRIMARY KEY,
    key        BLOB NOT NULL,
    first_seen INTEGER NOT NULL
);
-- BLAKE3 of each block of each regular file, filled off the FUSE hot path.
CREATE TABLE blocks (
    ino       INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    hash      BLOB NOT NULL,
    len       INTEGER NOT NULL,
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
"#;

/// Errors opening or migrating the schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database was written by a newer Brume.
    #[error("catalog schema version {found} is newer than this brume understands ({VERSION})")]
    TooNew {
        /// The version found on disk.
        found: i64,
    },
    /// SQLite failed.
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// Sets the connection's pragmas and brings the schema up to [`VERSION`].
pub(crate) fn prepare(conn: &mut Connection) -> Result<(), SchemaError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Everything an fsync acknowledges goes through a FULL commit (see the actor);
    // the schema itself is written durably.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > VERSION {
        return Err(SchemaError::TooNew { found });
    }
    if found < 1 {
        let tx = conn.transaction()?;
        tx.execute_batch(V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    Ok(())
}
