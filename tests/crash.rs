//! Crash consistency under `kill -9`: the daemon is killed with SIGKILL while
//! files change, the same data dir is remounted, and what acknowledged writes
//! left must be there, the catalog sound and in step with the object store.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;

use crate::harness::Client;

/// The catalog is sound and agrees with the object store.
fn check_catalog(c: &Client) -> Result<(), String> {
    let db = c.db();
    let sql = |e: rusqlite::Error| format!("catalog query: {e}");
    // One read transaction: one consistent view even if the daemon writes.
    db.execute_batch("BEGIN").map_err(sql)?;
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql)?;
    if ok != "ok" {
        return Err(format!("integrity_check: {ok}"));
    }
    let list = |q: &str| -> Result<Vec<String>, String> {
        let mut stmt = db.prepare(q).map_err(sql)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(rows)
    };
    let problems = [
        (
            "directory entries without their node",
            "SELECT d.parent || '/' || CAST(d.name AS TEXT) || ' -> ' || d.ino FROM dirents d \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = d.ino)",
        ),
        (
            "directory entries in something that is not a directory",
            "SELECT d.parent || '/' || CAST(d.name AS TEXT) FROM dirents d \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = d.parent AND n.kind = 2)",
        ),
        (
            "nodes no entry reaches",
            "SELECT n.ino FROM nodes n WHERE n.ino != 1 \
             AND NOT EXISTS (SELECT 1 FROM dirents d WHERE d.ino = n.ino)",
        ),
        (
            "files whose link count is not their number of entries",
            "SELECT n.ino || ' nlink ' || n.nlink FROM nodes n WHERE n.kind = 1 \
             AND n.nlink != (SELECT COUNT(*) FROM dirents d WHERE d.ino = n.ino)",
        ),
        (
            "block rows of no file",
            "SELECT DISTINCT b.ino FROM blocks b \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.ino = b.ino AND n.kind = 1)",
        ),
        (
            "change logs with holes",
            "SELECT group_id || ': ' || COUNT(*) || ' entries in ' || MIN(seq) || '..' || MAX(seq) \
             FROM changes GROUP BY group_id HAVING COUNT(*) != MAX(seq) - MIN(seq) + 1",
        ),
        (
            "nodes whose version is past their group's log",
            "SELECT n.ino || ' v' || n.version FROM nodes n JOIN groups g ON g.id = n.group_id \
             WHERE g.owned AND n.version > (SELECT COALESCE(MAX(seq), 0) FROM changes c \
             WHERE c.group_id = g.id)",
        ),
    ];
    for (what, q) in problems {
        let rows = list(q)?;
        if !rows.is_empty() {
            return Err(format!("{what}: {rows:?}"));
        }
    }
    let mut stmt = db
        .prepare(
            "SELECT ino, CASE WHEN remote_id IS NULL OR local_edit THEN size ELSE 0 END \
                  FROM nodes WHERE kind = 1",
        )
        .map_err(sql)?;
    let files: HashMap<u64, u64> = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    let objects = c.data.join("objects");
    let mut present = HashSet::new();
    for dir in fs::read_dir(&objects).map_err(|e| format!("list objects: {e}"))? {
        let dir = dir.map_err(|e| e.to_string())?.path();
        for f in fs::read_dir(&dir).map_err(|e| format!("list {}: {e}", dir.display()))? {
            let f = f.map_err(|e| e.to_string())?;
            let name = f.file_name().to_string_lossy().into_owned();
            let ino: u64 = name
                .parse()
                .map_err(|_| format!("stray object {}", f.path().display()))?;
            if !files.contains_key(&ino) {
                return Err(format!("object {ino} has no file node (left by the crash)"));
            }
            present.insert(ino);
        }
    }
    // A file with bytes must have its object; an empty one may have none (it is
    // recreated empty when opened), nor may a member's unedited mirror (its
    // bytes are in the block cache; counted as size 0 above).
    for (ino, size) in &files {
        if *size > 0 && !present.contains(ino) {
            return Err(format!(
                "file node {ino} of size {size} has no backing object {}",
                objects.join(format!("{:02x}/{ino}", ino & 0xff)).display()
            ));
        }
    }
    db.execute_batch("COMMIT").map_err(sql)?;
    Ok(())
}

/// A file replaced by a rename or removed, with the daemon killed right after the
/// call returns (inside the catalog's group-commit window): the name must hold
/// the old bytes or the new ones, or be gone, and the catalog must still match
/// the object store.
#[test]
fn kill9_right_after_rename_over_or_unlink_keeps_the_name_whole() {
    let (mut c, g) = Client::with_group(true);
    let old = b"old version, fsynced\n".repeat(500);
    let new = b"new version, fsynced\n".repeat(700);
    for round in 0..10 {
        let (target, gone) = (g.join(format!("t{round}")), g.join(format!("u{round}")));
        for p in [&target, &gone] {
            let mut f = File::create(p).unwrap();
            f.write_all(&old).unwrap();
            f.sync_all().unwrap();
        }
        let tmp = g.join(format!(".t{round}.tmp"));
        let mut f = File::create(&tmp).unwrap();
        f.write_all(&new).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::rename(&tmp, &target).unwrap();
        fs::remove_file(&gone).unwrap();
        c.kill9();
        c.mount();
        let t = fs::read(&target).unwrap();
        assert!(
            t == old || t == new,
            "round {round}: {} holds {} bytes, neither version",
            target.display(),
            t.len()
        );
        if let Ok(u) = fs::read(&gone) {
            assert_eq!(u, old, "round {round}: {} is torn", gone.display());
        }
        check_catalog(&c).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// A file truncated (by an `O_TRUNC` open) or appended to without fsync, with the
/// daemon killed right after: once remounted its size must match the bytes it
/// reads back, with or without kernel passthrough.
#[test]
fn kill9_right_after_truncate_or_append_keeps_size_and_bytes_in_step() {
    let (mut c, g) = Client::with_group(true);
    let body = b"fsynced bytes\n".repeat(1000);
    for round in 0..6 {
        let (cut, grown) = (
            g.join(format!("cut{round}")),
            g.join(format!("grown{round}")),
        );
        for p in [&cut, &grown] {
            let mut f = File::create(p).unwrap();
            f.write_all(&body).unwrap();
            f.sync_all().unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&grown).unwrap();
        f.write_all(b"appended, never fsynced\n").unwrap();
        let held = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&cut)
            .unwrap();
        c.kill9();
        drop((f, held));
        c.passthrough = round % 2 == 1;
        c.mount();
        for p in [&cut, &grown] {
            let size = fs::metadata(p).unwrap().len();
            let data = fs::read(p).unwrap();
            assert_eq!(
                data.len() as u64,
                size,
                "round {round}: {} says {size} bytes, reads {}",
                p.display(),
                data.len()
            );
            assert!(body.starts_with(&data) || data.starts_with(&body));
        }
        check_catalog(&c).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}
