//! Running Brume for real: the mount helper behind `mount -t brume`, the systemd
//! units, and `brume status --json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{Client, brume_bin, is_mounted};

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/mount.brume")
}

/// Installs the helper as `/sbin/mount.brume` for `mount -t brume`, and removes
/// it again when dropped.
struct InstalledHelper(PathBuf);

impl InstalledHelper {
    fn install() -> Self {
        let dest = PathBuf::from("/sbin/mount.brume");
        assert!(
            !dest.exists(),
            "{} exists already; not overwriting it",
            dest.display()
        );
        std::fs::copy(helper(), &dest).unwrap();
        Self(dest)
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Unmounts `dir` when dropped (the helper's daemon detaches from us).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
        }
    }
}

fn wait_unmounted(dir: &Path) {
    crate::harness::wait_until(std::time::Duration::from_secs(10), "unmount", || {
        !is_mounted(dir)
    });
}

#[test]
fn mount_t_brume_through_the_helper_with_and_without_options() {
    let c = Client::new("alice");
    let _installed = InstalledHelper::install();
    // With -o config=…,data=… and options mount(8)/systemd pass through.
    let _u = Unmount(c.mnt.clone());
    let out = Command::new("mount")
        .args(["-t", "brume", "alice"])
        .arg(&c.mnt)
        .arg("-o")
        .arg(format!(
            "config={},data={},noauto,_netdev,x-systemd.automount",
            c.config.display(),
            c.data.display()
        ))
        .env("BRUME_BIN", brume_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The helper returns once the mount is up.
    assert!(is_mounted(&c.mnt));
    std::fs::create_dir(c.mnt.join("alice/g")).unwrap();
    std::fs::write(c.mnt.join("alice/g/f"), b"via mount -t").unwrap();
    let st = Command::new("umount").arg(&c.mnt).status().unwrap();
    assert!(st.success());
    wait_unmounted(&c.mnt);

    // Without -o: the user's own defaults under its home directory.
    let home = tempfile::tempdir().unwrap();
    let conf_dir = home.path().join(".config/Brume");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(&c.config, conf_dir.join("brume.conf")).unwrap();
    let passwd_user = "brumetest";
    let _ = Command::new("userdel").arg(passwd_user).status();
    let st = Command::new("useradd")
        .args(["-M", "-d"])
        .arg(home.path())
        .arg(passwd_user)
        .status()
        .unwrap();
    assert!(st.success());
    struct DelUser(&'static str);
    impl Drop for DelUser {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(self.0).status();
        }
    }
    let _del = DelUser(passwd_user);
    let out = Command::new("mount")
        .args(["-t", "brume", passwd_user])
        .arg(&c.mnt)
        .env("BRUME_BIN", brume_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&c.mnt));
    assert!(home.path().join(".local/share/brume/catalog.db").exists());
    Command::new("umount").arg(&c.mnt).status().unwrap();
    wait_unmounted(&c.mnt);
}

#[test]
fn mount_helper_errors_are_clear() {
    let c = Client::new("alice");
    let run = |args: &[&str]| {
        let out = Command::new(helper())
            .args(args)
            .env("BRUME_BIN", brume_bin())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let data = c.data.display().to_string();
    let missing = format!("config={}/nope.conf,data={data}", c.dir.path().display());
    let err = run(&["alice", c.mnt.to_str().unwrap(), "-o", &missing]);
    assert!(err.contains("cannot read config"), "{err}");
    let good = format!("config={},data={data}", c.config.display());
    let err = run(&["alice", "/nonexistent/dir", "-o", &good]);
    assert!(err.contains("is not a directory"), "{err}");
    let err = run(&["no-such-user-xyz", c.mnt.to_str().unwrap()]);
    assert!(err.contains("unknown user"), "{err}");
    assert!(!is_mounted(&c.mnt));
}

#[test]
fn systemd_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("services");
    let mut paths = Vec::new();
    for e in std::fs::read_dir(&units).unwrap() {
        let e = e.unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap();
        // Verify the units as shipped, pointing at the binary under test.
        let dest = dir.path().join(e.file_name());
        std::fs::write(&dest, text.replace("/usr/local/bin/brume", brume_bin())).unwrap();
        paths.push(dest);
    }
    assert!(
        paths.len() >= 3,
        "expected the user, server and mount units"
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn status_json_has_the_documented_fields() {
    let (c, g) = Client::with_group(true);
    std::fs::write(g.join("f"), b"12345").unwrap();
    // The catalog is written behind the tree: poll until the change shows.
    let mut v = serde_json::Value::Null;
    crate::harness::wait_until(std::time::Duration::from_secs(5), "status", || {
        let out = c.brume(&["status", "--json"]);
        assert!(out.status.success());
        v = serde_json::from_slice(&out.stdout).unwrap();
        v["groups"][0]["bytes"] == 5
    });
    for key in [
        "user",
        "server",
        "data_dir",
        "mount",
        "groups",
        "catalog_bytes",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    let g0 = &v["groups"][0];
    for key in [
        "owner",
        "name",
        "owned",
        "files",
        "dirs",
        "bytes",
        "members",
        "members_known",
        "last_seq",
    ] {
        assert!(g0.get(key).is_some(), "missing groups[].{key} in {v}");
    }
    assert_eq!(v["user"], "alice");
    // The human form names the group.
    let out = c.brume(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("group alice/g (owner)"));
    // A data directory that does not exist is an error, not an empty status.
    let out = std::process::Command::new(crate::harness::brume_bin())
        .args(["status", "--config"])
        .arg(&c.config)
        .args(["--data", "/nonexistent/brume-data"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/brume-data does not exist"),
        "{out:?}"
    );
}

#[test]
fn status_watch_json_prints_a_document_every_second() {
    use std::io::BufRead;
    let (c, _g) = Client::with_group(true);
    let mut child = Command::new(brume_bin())
        .args(["status", "--watch", "--json", "--config"])
        .arg(&c.config)
        .arg("--data")
        .arg(&c.data)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = crate::harness::KillOnDrop(child.id());
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["user"], "alice");
        assert!(v["mount"]["pid"].is_u64());
    }
    let _ = child.kill();
    let _ = child.wait();
}
