//! The client's `brume.conf`: which signaling server to use, who I am, my long-lived
//! credential, ICE servers and cache limits. TOML on disk, one struct in memory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::UserName;

/// Environment variable that overrides the default config path.
pub const CONFIG_ENV: &str = "BRUME_CONFIG";
/// Environment variable that overrides the default data directory.
pub const DATA_ENV: &str = "BRUME_DATA";

/// Errors reading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a `brume.conf`.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file could not be written.
    #[error("cannot write config {path}: {source}")]
    Write {
        /// The config path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// One `brume.conf`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// WebSocket URL of the signaling server, e.g. `ws://127.0.0.1:8787/` or
    /// `wss://signal.example.org/`.
    pub server_url: String,
    /// A PEM bundle of certificates to trust for a `wss://` server, beyond the
    /// OS's (a private CA, a self-signed server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ca: Option<PathBuf>,
    /// The account this client acts as.
    pub username: UserName,
    /// Long-lived account credential, exchanged for short-lived access tokens.
    pub credential: String,
    /// STUN/TURN servers for the peer link, beyond those the signaling server
    /// hands out; with none at all, host candidates only.
    #[serde(default)]
    pub ice_servers: Vec<String>,
    /// Which ICE candidates the peer link uses: `"all"`, or `"relay"` (TURN
    /// relays only, so that peers never learn this machine's addresses).
    #[serde(default, skip_serializing_if = "IcePolicy::is_all")]
    pub ice_policy: IcePolicy,
    /// Local addresses the peer link's UDP sockets bind (its host candidates):
    /// every interface by default; `["127.0.0.1:0"]` keeps it on loopback.
    #[serde(default = "every_interface")]
    pub udp_addrs: Vec<std::net::SocketAddr>,
    /// Block cache limits.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Filesystem tuning.
    #[serde(default)]
    pub fs: FsConfig,
}

/// Which ICE candidates the peer link uses.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IcePolicy {
    /// Host, server-reflexive and relayed candidates: the most direct path.
    #[default]
    All,
    /// Relayed candidates only.
    Relay,
}

impl IcePolicy {
    fn is_all(&self) -> bool {
        *self == IcePolicy::All
    }
}

/// Limits of the members' block cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct CacheConfig {
    /// Byte budget for evictable cached blocks.
    pub max_bytes: u64,
    /// Keep every joined group's current content in full (pinned); when false,
    /// all of it is evictable and fetched again on demand.
    pub full_copy: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 30,
            full_copy: true,
        }
    }
}

/// How the filesystem runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct FsConfig {
    /// Use kernel FUSE passthrough for file data when the daemon has the privilege.
    pub passthrough: bool,
    /// FUSE worker threads; 0 picks one per CPU (at most 4). More threads than
    /// CPUs only add context switches.
    pub threads: usize,
    /// Pin each worker thread to a CPU of its own when there are exactly as
    /// many workers as CPUs: requests and replies then mostly stay on one CPU.
    pub pin_threads: bool,
    /// Mean wait to run per request, in microseconds, above which a pinned
    /// worker's CPU counts as busy with other work and the worker leaves it
    /// for a while.
    pub busy_cpu_us: u64,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            passthrough: true,
            threads: 0,
            pin_threads: true,
            busy_cpu_us: 40,
        }
    }
}

/// The peer link's default local addresses: every IPv4 and IPv6 interface.
fn every_interface() -> Vec<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    ]
}

impl Config {
    /// The config of a new account: default ICE, cache and filesystem settings.
    pub fn for_account(server_url: String, username: UserName, credential: String) -> Self {
        Self {
            server_url,
            server_ca: None,
            username,
            credential,
            ice_servers: Vec::new(),
            ice_policy: IcePolicy::All,
            udp_addrs: every_interface(),
            cache: CacheConfig::default(),
            fs: FsConfig::default(),
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        // A relative `server_ca` is relative to the config file.
        if let (Some(ca), Some(dir)) = (&config.server_ca, path.parent())
            && ca.is_relative()
        {
            config.server_ca = Some(dir.join(ca));
        }
        Ok(config)
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The TOML text of this config, as `brume server add-user` prints it.
    pub fn to_toml(&self) -> String {
        // Serializing a struct of strings, vectors and integers cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Writes the config with mode 0600 (it holds a credential).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?;
            // `mode` applies only to a new file: an existing one is made private too,
            // before the credential is written into it.
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(self.to_toml().as_bytes())?;
            f.sync_all()
        };
        write().map_err(|source| ConfigError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

/// `~/.config/Brume/brume.conf`, or `$BRUME_CONFIG`.
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os(CONFIG_ENV) {
        return PathBuf::from(p);
    }
    home().join(".config/Brume/brume.conf")
}

/// `~/.local/share/brume`, or `$BRUME_DATA`.
pub fn default_data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(DATA_ENV) {
        return PathBuf::from(p);
    }
    home().join(".local/share/brume")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() {
        let c = Config {
            server_url: "ws://127.0.0.1:8787/".into(),
            server_ca: Some("/etc/brume/ca.pem".into()),
            username: UserName::new("alice").unwrap(),
            credential: "secret".into(),
            ice_servers: vec!["stun:127.0.0.1:3478".into()],
            ice_policy: IcePolicy::Relay,
            udp_addrs: vec!["127.0.0.1:0".parse().unwrap()],
            cache: CacheConfig {
                max_bytes: 1 << 20,
                full_copy: false,
            },
            fs: FsConfig::default(),
        };
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn rejects_bad_username_and_unknown_keys() {
        let bad = "server_url = \"ws://x/\"\nusername = \"../x\"\ncredential = \"c\"\n";
        assert!(Config::parse(bad).is_err());
        let unknown = "server_url = \"ws://x/\"\nusername = \"bob\"\ncredential = \"c\"\nfoo = 1\n";
        assert!(Config::parse(unknown).is_err());
    }
}
