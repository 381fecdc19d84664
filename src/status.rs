//! `brume status`: what the client reports about its mount, groups and catalog.
//! Works whether or not the daemon runs: it reads the catalog read-only and the
//! mount state file the daemon keeps in the data directory.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::catalog::{self, GroupSummary};
use crate::cli::{StatusArgs, is_brume_mount, load_config};
use crate::config;
use crate::fs::mount_state;

/// Name of the file in the data dir where a running daemon keeps its network
/// state for `brume status`.
pub const LIVE_FILE: &str = "live.json";

/// What a running daemon reports about the network, refreshed every second.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LiveStatus {
    /// When it was written (Unix seconds).
    pub updated_unix: u64,
    /// The signaling connection: state, last error (with its code), connects.
    pub signal: serde_json::Value,
    /// Every peer link by user: state, last error, byte counters, key fingerprint.
    pub peers: serde_json::Value,
    /// Each TURN server the links would relay through, by `HOST:PORT` (with
    /// ` (TCP)` or ` (TLS)`): whether it works, and why not.
    #[serde(default)]
    pub relays: std::collections::BTreeMap<String, serde_json::Value>,
    /// Each joined group (`owner/name`): applied log position and any problem
    /// (`ENOTMEMBER`, `ENODEST`, …).
    pub groups: std::collections::BTreeMap<String, crate::sync::engine::MemberGroupStatus>,
    /// Block cache use.
    pub cache: crate::blocks::cache::CacheUsage,
    /// Owned groups the mass-delete guard holds, with the reason.
    #[serde(default)]
    pub held: std::collections::BTreeMap<String, String>,
    /// Owned groups whose `.members` names users the signaling server does
    /// not know (`EBADDEST`), with those users.
    #[serde(default)]
    pub unknown_members: std::collections::BTreeMap<String, Vec<String>>,
}

/// Everything `brume status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The account.
    pub user: String,
    /// The signaling server URL.
    pub server: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The mount, if the daemon is running.
    pub mount: Option<MountStatus>,
    /// Groups known to the catalog.
    pub groups: Vec<GroupSummary>,
    /// Bytes used by the catalog files.
    pub catalog_bytes: u64,
    /// Network state from the running daemon, if it runs.
    pub live: Option<LiveStatus>,
}

/// A running mount.
#[derive(Debug, Serialize)]
pub struct MountStatus {
    /// Where.
    pub mountpoint: PathBuf,
    /// The daemon's pid.
    pub pid: u32,
}

/// Collects the status of the client whose data lives in `data_dir`.
pub fn collect(user: &str, server: &str, data_dir: &Path) -> anyhow::Result<Status> {
    let db = data_dir.join("catalog.db");
    let mut summary = if db.exists() {
        catalog::summarize(&db)?
    } else {
        catalog::Summary::default()
    };
    // A joined group's members, as the owner's `.members` mirrored here lists them.
    let cache = data_dir.join("cache");
    for g in summary.groups.iter_mut().filter(|g| !g.owned) {
        let blocks: Option<Vec<Vec<u8>>> = g
            .members_file
            .iter()
            .map(|h| crate::blocks::cache::read_verified(&cache, h))
            .collect();
        if let Some(blocks) = blocks.filter(|b| !b.is_empty()) {
            g.members = crate::fs::tree::parse_members(&blocks.concat());
            g.members_known = true;
        }
    }
    let mount = mount_state(data_dir).and_then(|s| {
        let alive = Path::new(&format!("/proc/{}", s.pid)).exists();
        (alive && is_brume_mount(&s.mountpoint)).then_some(MountStatus {
            mountpoint: s.mountpoint,
            pid: s.pid,
        })
    });
    let live = mount.as_ref().and_then(|_| {
        let text = std::fs::read(data_dir.join(LIVE_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    });
    Ok(Status {
        live,
        user: user.to_owned(),
        server: server.to_owned(),
        data_dir: data_dir.to_owned(),
        mount,
        groups: summary.groups,
        catalog_bytes: summary.catalog_bytes,
    })
}

/// Runs `brume status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let (_, config) = load_config(args.config.as_deref())?;
    let data_dir = args.data.unwrap_or_else(config::default_data_dir);
    if !data_dir.is_dir() {
        anyhow::bail!(
            "data directory {} does not exist (give the one `brume mount` uses with --data)",
            data_dir.display()
        );
    }
    loop {
        let status = collect(config.username.as_str(), &config.server_url, &data_dir)?;
        match (args.json, args.watch) {
            (true, true) => println!("{}", serde_json::to_string(&status)?),
            (true, false) => println!("{}", serde_json::to_string_pretty(&status)?),
            (false, true) => {
                // Redraw in place on a terminal; append otherwise (logs, pipes).
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", render(&status));
                println!();
            }
            (false, false) => print!("{}", render(&status)),
        }
        if !args.watch {
            return Ok(());
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// The human-readable form.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "user:    {}", s.user);
    let _ = writeln!(out, "server:  {}", s.server);
    match &s.mount {
        Some(m) => {
            let _ = writeln!(out, "mount:   {} (pid {})", m.mountpoint.display(), m.pid);
        }
        None => {
            let _ = writeln!(out, "mount:   not mounted");
        }
    }
    let _ = writeln!(out, "data:    {}", s.data_dir.display());
    let _ = writeln!(out, "catalog: {} bytes", s.catalog_bytes);
    if s.groups.is_empty() {
        let _ = writeln!(out, "groups:  none");
    }
    for g in &s.groups {
        let role = if g.owned { "owner" } else { "member" };
        let _ = writeln!(
            out,
            "group {}/{} ({role}): {} files, {} dirs, {} bytes, log at {}, {}{}",
            g.owner,
            g.name,
            g.files,
            g.dirs,
            g.bytes,
            g.last_seq,
            members_text(g, s.live.as_ref()),
            match g.conflicts {
                _ if g.owned => String::new(),
                0 => ", no conflict copies".to_string(),
                1 => ", 1 conflict copy made".to_string(),
                n => format!(", {n} conflict copies made"),
            }
        );
    }
    if let Some(live) = &s.live {
        let sig = &live.signal;
        let _ = writeln!(
            out,
            "signal:  {}{}",
            sig["state"].as_str().unwrap_or("?"),
            problem(&sig["last_error"])
        );
        if let Some(peers) = live.peers.as_object() {
            for (user, p) in peers {
                // A problem the link has recovered from is history, not news.
                let state = p["state"].as_str().unwrap_or("?");
                let state = match (state, p["path"].as_str(), p["relay"].as_str()) {
                    ("up", Some("relay"), Some(relay)) => format!("up, relayed via {relay}"),
                    ("up", Some("relay"), None) => "up, relayed".to_owned(),
                    ("up", Some(path), _) => format!("up, direct ({path})"),
                    (state, ..) => state.to_owned(),
                };
                let _ = writeln!(
                    out,
                    "peer {user}: {state}, sent {} B, received {} B, key {}{}",
                    p["bytes_sent"],
                    p["bytes_received"],
                    p["key_fingerprint"].as_str().unwrap_or("not yet seen"),
                    if state.starts_with("up") {
                        String::new()
                    } else {
                        problem(&p["last_error"])
                    }
                );
                if let Some(changed) = p["key_changed"].as_array() {
                    let _ = writeln!(
                        out,
                        "  KEY CHANGED: pinned {} but presented {}: refused",
                        changed.first().and_then(|v| v.as_str()).unwrap_or("?"),
                        changed.get(1).and_then(|v| v.as_str()).unwrap_or("?")
                    );
                }
            }
        }
        for (server, r) in &live.relays {
            let state = match r["problem"].as_str() {
                _ if r["ok"].as_bool() == Some(true) => "works".to_owned(),
                Some(problem) => format!("PROBLEM: {problem}"),
                None => "not checked yet".to_owned(),
            };
            let _ = writeln!(out, "relay {server}: {state}");
        }
        for (group, why) in &live.held {
            let _ = writeln!(out, "HELD {}/{group}: {why}", s.user);
        }
        for (group, g) in &live.groups {
            let syncing = g.full_copy && g.bytes_done < g.bytes_total;
            let state = match &g.problem {
                Some(p) => format!("problem: {p}"),
                None if g.applied == 0 => match &g.waiting_for {
                    Some(why) => format!("waiting for the owner ({why})"),
                    None => "waiting for the owner".to_string(),
                },
                None if syncing => format!(
                    "syncing, {} of {} files, {} of {} bytes",
                    g.files_done, g.files_total, g.bytes_done, g.bytes_total
                ),
                None if !g.full_copy => format!(
                    "synced, {} files, {} bytes, {} of them here (the rest comes when read)",
                    g.files_total, g.bytes_total, g.bytes_done
                ),
                None => format!("synced, {} files, {} bytes", g.files_total, g.bytes_total),
            };
            let _ = writeln!(
                out,
                "joined {group}: {state}, at the owner's log position {}",
                g.applied
            );
            if g.problem.is_none() && syncing {
                let _ = writeln!(out, "  {}", progress_line(g));
            }
        }
        let _ = writeln!(
            out,
            "cache:   {} blocks, {} B pinned, {} B evictable, {} corrupt blocks dropped",
            live.cache.blocks,
            live.cache.pinned_bytes,
            live.cache.evictable_bytes,
            live.cache.corrupt_dropped
        );
    }
    out
}

/// `members: bob, carol` for a group: for a joined group, as its owner lists them;
/// for an owned one, with the names the signaling server does not know.
fn members_text(g: &GroupSummary, live: Option<&LiveStatus>) -> String {
    let list = if g.members.is_empty() {
        "none".to_string()
    } else {
        g.members.join(", ")
    };
    let unknown = live
        .and_then(|l| l.unknown_members.get(&g.name))
        .filter(|u| g.owned && !u.is_empty())
        .map(|u| format!(" (EBADDEST: unknown to the server: {})", u.join(", ")))
        .unwrap_or_default();
    match (g.owned, g.members_known) {
        (true, _) => format!("members: {list}{unknown}"),
        (false, true) => format!("members (as {} lists them): {list}", g.owner),
        (false, false) => format!(
            "members: as {} lists them in .members, not received yet",
            g.owner
        ),
    }
}

/// `[#######.............]  35%  12.4 MB/s  ETA 0:41` for a syncing group.
pub fn progress_line(g: &crate::sync::engine::MemberGroupStatus) -> String {
    const WIDTH: u64 = 30;
    let total = g.bytes_total.max(1);
    let done = g.bytes_done.min(total);
    let filled = (done * WIDTH / total) as usize;
    let eta = match g.eta_secs {
        Some(s) => format!("ETA {}:{:02}", s / 60, s % 60),
        None => "ETA --:--".to_string(),
    };
    format!(
        "[{}{}] {:>3}%  {}/s  {eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        done * 100 / total,
        human_bytes(g.rate)
    )
}

/// `512 B`, `12.4 kB`, `3.1 MB`, `1.2 GB`: decimal units, as rates are quoted.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// ` (last problem: CODE message)` for a `last_error` value, or nothing.
fn problem(v: &serde_json::Value) -> String {
    if v.is_null() {
        return String::new();
    }
    let code = v["code"]
        .as_str()
        .map(|c| format!("{c} "))
        .unwrap_or_default();
    format!(
        " (last problem: {code}{})",
        v["message"].as_str().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::engine::MemberGroupStatus;

    #[test]
    fn the_progress_line_shows_share_rate_and_eta() {
        let g = MemberGroupStatus {
            bytes_total: 200_000_000,
            bytes_done: 70_000_000,
            rate: 12_400_000,
            eta_secs: Some(101),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&g),
            "[##########....................]  35%  12.4 MB/s  ETA 1:41"
        );
        let starting = MemberGroupStatus {
            bytes_total: 5,
            ..Default::default()
        };
        assert_eq!(
            progress_line(&starting),
            "[..............................]   0%  0 B/s  ETA --:--"
        );
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(2_000_000_000), "2.0 GB");
    }

    fn with_live(peers: serde_json::Value, group: MemberGroupStatus) -> Status {
        Status {
            user: "bob".into(),
            server: "ws://s/".into(),
            data_dir: "/d".into(),
            mount: None,
            groups: Vec::new(),
            catalog_bytes: 0,
            live: Some(LiveStatus {
                updated_unix: 0,
                signal: serde_json::json!({"state": "connected"}),
                peers,
                relays: Default::default(),
                groups: [("alice/g".to_string(), group)].into(),
                cache: Default::default(),
                held: Default::default(),
                unknown_members: Default::default(),
            }),
        }
    }

    #[test]
    fn each_turn_server_says_whether_it_works_and_why_not() {
        let mut s = with_live(serde_json::json!({}), MemberGroupStatus::default());
        let live = s.live.as_mut().unwrap();
        live.relays.insert(
            "192.0.2.7:3478".into(),
            serde_json::json!({"ok": true, "problem": null, "checked_unix": 1}),
        );
        live.relays.insert(
            "192.0.2.8:443 (TLS)".into(),
            serde_json::json!({"ok": false, "problem": "TURN 401 from 192.0.2.8:443 (TLS) (Unauthorized)", "checked_unix": 1}),
        );
        let text = render(&s);
        assert!(text.contains("relay 192.0.2.7:3478: works\n"), "{text}");
        assert!(
            text.contains("relay 192.0.2.8:443 (TLS): PROBLEM: TURN 401 from 192.0.2.8:443 (TLS) (Unauthorized)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_group_kept_on_demand_is_synced_and_a_recovered_peer_shows_no_old_problem() {
        let problem = serde_json::json!({"code": "ENODEST", "message": "alice is not connected"});
        let peers = serde_json::json!({
            "alice": {"state": "up", "bytes_sent": 1, "bytes_received": 2, "last_error": problem,
                      "path": "relay", "relay": "192.0.2.7:49160"},
            "dave": {"state": "up", "bytes_sent": 1, "bytes_received": 2, "path": "srflx"},
            "carol": {"state": "backoff", "bytes_sent": 0, "bytes_received": 0, "last_error": problem},
        });
        let on_demand = MemberGroupStatus {
            applied: 7,
            files_total: 3,
            bytes_total: 1000,
            bytes_done: 10,
            full_copy: false,
            ..Default::default()
        };
        let text = render(&with_live(peers.clone(), on_demand.clone()));
        assert!(
            text.contains("joined alice/g: synced, 3 files, 1000 bytes, 10 of them here"),
            "{text}"
        );
        assert!(!text.contains('%'), "no progress bar: {text}");
        let alice = text.lines().find(|l| l.starts_with("peer alice")).unwrap();
        assert!(!alice.contains("problem"), "{alice}");
        assert!(
            alice.starts_with("peer alice: up, relayed via 192.0.2.7:49160,"),
            "{alice}"
        );
        let dave = text.lines().find(|l| l.starts_with("peer dave")).unwrap();
        assert!(dave.starts_with("peer dave: up, direct (srflx),"), "{dave}");
        let carol = text.lines().find(|l| l.starts_with("peer carol")).unwrap();
        assert!(carol.contains("last problem: ENODEST"), "{carol}");
        // The same group kept in full is still syncing.
        let full = MemberGroupStatus {
            full_copy: true,
            ..on_demand
        };
        let text = render(&with_live(peers, full));
        assert!(
            text.contains("joined alice/g: syncing, 0 of 3 files"),
            "{text}"
        );
    }
}
