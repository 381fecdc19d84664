//! `brume server …` and `brume token`: argument types and entry points.

use std::path::PathBuf;

use anyhow::Context as _;

use super::accounts::Accounts;
use super::server::{self, ServerConfig};
use crate::config::Config;
use crate::ids::UserName;

/// `brume server [--listen ADDR] [--db PATH]` and its administrative subcommands.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// Account database [default: ~/.local/share/brume/server.db].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Certificate chain (PEM) to serve wss:// and https:// with; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A STUN or TURN server handed to every client for its peer links
    /// (`stun:HOST:PORT`, `turn:HOST:PORT`, `turn:HOST:PORT?transport=tcp`,
    /// `turns:HOST:PORT`); repeat for several.
    #[arg(long = "ice", value_name = "URL", value_parser = parse_ice)]
    pub ice: Vec<String>,
    /// File holding the secret shared with the TURN server (coturn's
    /// static-auth-secret): TURN URLs are handed out with credentials made from it.
    #[arg(long, value_name = "FILE")]
    pub turn_secret_file: Option<PathBuf>,
    /// Administrative command; without one, the server runs in the foreground.
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
}

/// Administrative commands; they work while the server runs.
#[derive(Debug, clap::Subcommand)]
pub enum ServerCommand {
    /// Creates an account and prints the brume.conf its user installs.
    AddUser {
        /// The new user's name.
        #[arg(value_parser = parse_user)]
        name: UserName,
        /// Account database [default: ~/.local/share/brume/server.db].
        #[arg(long)]
        db: Option<PathBuf>,
        /// The server's WebSocket URL as clients reach it.
        #[arg(long, default_value = "ws://127.0.0.1:8787/")]
        url: String,
        /// Write the brume.conf to this file (mode 0600) instead of standard output.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Revokes a user's tokens: its sessions end within a second, and only its
    /// credential gets it back in.
    RevokeTokens {
        /// The user.
        #[arg(value_parser = parse_user)]
        name: UserName,
        /// Account database [default: ~/.local/share/brume/server.db].
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Forgets a user's identity key, so the next key it presents is registered, and
    /// revokes its tokens (as revoke-tokens).
    ResetKey {
        /// The user.
        #[arg(value_parser = parse_user)]
        name: UserName,
        /// Account database [default: ~/.local/share/brume/server.db].
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

fn parse_ice(url: &str) -> Result<String, String> {
    super::ice::check_url(url)
        .map(|()| url.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_user(name: &str) -> Result<UserName, String> {
    UserName::new(name).map_err(|e| e.to_string())
}

/// `brume token [--config PATH] [--ttl SECONDS]`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Lifetime of the token in seconds.
    #[arg(long)]
    pub ttl: Option<u64>,
}

/// `~/.local/share/brume/server.db`.
pub fn default_server_db() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".local/share/brume/server.db")
}

/// Runs `brume server`.
pub fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let db_or_default =
        |db: Option<PathBuf>| db.or(args.db.clone()).unwrap_or_else(default_server_db);
    match args.command {
        Some(ServerCommand::AddUser {
            ref name,
            ref db,
            ref url,
            ref out,
        }) => {
            let accounts = Accounts::open(&db_or_default(db.clone()))?;
            let credential = accounts.add_user(name)?;
            let config = Config::for_account(url.clone(), name.clone(), credential);
            match out {
                Some(path) => {
                    config.save(path)?;
                    eprintln!("brume.conf of {name} written to {}", path.display());
                }
                None => {
                    // It holds the credential: `add-user NAME > FILE` must not leave it
                    // readable by others, whatever the umask.
                    restrict_stdout_file()?;
                    print!("{}", config.to_toml());
                }
            }
            Ok(())
        }
        Some(ServerCommand::ResetKey { ref name, ref db }) => {
            Accounts::open(&db_or_default(db.clone()))?.reset_key(name)?;
            eprintln!(
                "identity key of {name} reset and its tokens revoked: the next key it presents \
                 will be registered"
            );
            Ok(())
        }
        Some(ServerCommand::RevokeTokens { ref name, ref db }) => {
            Accounts::open(&db_or_default(db.clone()))?.revoke_tokens(name)?;
            eprintln!(
                "tokens of {name} revoked: its sessions end, and it must log in with its credential"
            );
            Ok(())
        }
        None => {
            let tls = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(super::tls::server_config(cert, key)?),
                _ => None,
            };
            let turn_secret = match &args.turn_secret_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("TURN secret file {}", path.display()))?;
                    let secret = text.trim();
                    anyhow::ensure!(
                        !secret.is_empty(),
                        "TURN secret file {} is empty",
                        path.display()
                    );
                    Some(secret.as_bytes().to_vec())
                }
                None => None,
            };
            if turn_secret.is_none() && args.ice.iter().any(|u| u.starts_with("turn")) {
                tracing::warn!(
                    "TURN servers without --turn-secret-file: clients get no credentials for them"
                );
            }
            let mut config = ServerConfig::new(db_or_default(None));
            config.tls = tls;
            config.ice = args.ice.clone();
            config.turn_secret = turn_secret;
            serve(&args.listen, config)
        }
    }
}

fn serve(listen: &str, config: ServerConfig) -> anyhow::Result<()> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let scheme = if config.tls.is_some() { "wss" } else { "ws" };
        // Scripts (and tests) read the actual address from here when given port 0.
        println!("brume server listening on {scheme}://{addr}/");
        if config.tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "listening beyond loopback without TLS: tokens and credentials cross the \
                 network in the clear; give --tls-cert and --tls-key"
            );
        }
        server::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(cause = ?err, "no SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// When standard output is a regular file (a shell redirection), makes it readable and
/// writable by its owner only.
fn restrict_stdout_file() -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    let stdout = std::io::stdout();
    let file = std::fs::File::from(stdout.as_fd().try_clone_to_owned()?);
    let meta = file.metadata()?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .context("cannot make the brume.conf being written private (mode 0600)")?;
    }
    Ok(())
}

/// Every connection is a file descriptor: allow as many as the hard limit does.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the open-file limit");
            }
        }
    }
}

/// Runs `brume token`.
pub fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .unwrap_or_else(crate::config::default_config_path);
    let config = Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let token = runtime.block_on(super::client::fetch_token(
        &config.server_url,
        config.server_ca.as_deref(),
        &config.username,
        &config.credential,
        args.ttl,
    ))?;
    println!("{}", token.token);
    Ok(())
}
