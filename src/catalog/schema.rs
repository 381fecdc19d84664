//! The catalog's SQL schema and its migrations. `user_version` holds the schema
//! version; each migration moves it up by one inside a transaction.

use rusqlite::Connection;

/// The schema version this code reads and writes.
pub(crate) const VERSION: i64 = 2;

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

/// Version 2: the epoch of each group's log (see `GroupRow::epoch`; groups
/// from before have none, 0, until loaded), and the log position each member
/// of an owned group said it applied (what the log keeps for it).
const V2: &str = r#"
ALTER TABLE groups ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE acks (
    group_id  INTEGER NOT NULL,
    user      TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (group_id, user)
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
    if found < 2 {
        let tx = conn.transaction()?;
        tx.execute_batch(V2)?;
        tx.pragma_update(None, "user_version", 2)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_catalog_is_brought_up_to_date_keeping_its_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO groups (id, owner, name, root, owned, next_seq) \
                 VALUES (1, 'alice', 'g', 5, 1, 7)",
                [],
            )
            .unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        prepare(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
        let (next, epoch): (i64, i64) = conn
            .query_row("SELECT next_seq, epoch FROM groups WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((next, epoch), (7, 0));
        let acks: i64 = conn
            .query_row("SELECT COUNT(*) FROM acks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(acks, 0);
        // Prepared again, nothing changes.
        prepare(&mut conn).unwrap();
    }
}
