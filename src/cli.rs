//! The command line: argument types and the dispatch of each subcommand into the
//! library. `main` turns the result into an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::fs::{MountOptions, mount};

/// Share a folder directly between people's machines.
#[derive(Debug, Parser)]
#[command(name = "brume", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the Brume filesystem at DIR.
    Mount(MountArgs),
    /// Show the state of the client: mount, groups, catalog.
    Status(StatusArgs),
    /// Run the signaling server, or administer its accounts.
    Server(crate::signal::cli::ServerArgs),
    /// Print a fresh access token.
    Token(crate::signal::cli::TokenArgs),
    /// Start a local server, two users and two mounts, and show a file crossing.
    Demo,
}

/// `brume mount DIR [--config PATH] [--data DIR] [-f]`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// Where to mount.
    pub dir: PathBuf,
    /// Config file (default `~/.config/Brume/brume.conf`, or `$BRUME_CONFIG`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (default `~/.local/share/brume`, or `$BRUME_DATA`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Serve file data through the daemon even where kernel passthrough is possible.
    #[arg(long)]
    pub no_passthrough: bool,
}

/// `brume status [--config PATH] [--data DIR] [--json]`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print JSON (with `--watch`: one JSON document per line).
    #[arg(long)]
    pub json: bool,
    /// Keep printing the status every second until interrupted.
    #[arg(long)]
    pub watch: bool,
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // TLS (wss://) uses ring, which the peer link builds too; libraries that ask
    // for the process's default provider get the same one.
    crate::signal::tls::install_provider();
    // The demo talks to a person on the terminal: only problems are logged there.
    init_logging(if matches!(cli.command, Command::Demo) {
        "warn,rtc_dtls=error,rtc_ice=error,rtc_sctp=error,webrtc=error"
    } else {
        "info"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brume: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // fuser warns about a second unmount after `fusermount3 -u`, which is normal.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("fuser")) {
        filter = filter.add_directive("fuser::session=error".parse().expect("static directive"));
    }
    // The WebRTC stack warns when a connectivity check arrives a moment before
    // the answer that carries its credentials, which is normal on a fast link.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rtc")) {
        filter = filter.add_directive(
            "rtc::peer_connection::handler=error"
                .parse()
                .expect("static directive"),
        );
    }
    // Under systemd (journald on stderr) or when not on a terminal: no colours.
    let ansi = std::env::var_os("JOURNAL_STREAM").is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        // Libraries that log through `log` (fuser, the WebRTC stack) reach the
        // same subscriber.
        if log::set_boxed_logger(Box::new(LogBridge(tracing_log::LogTracer::new()))).is_ok() {
            log::set_max_level(tracing_log::AsLog::as_log(
                &tracing::level_filters::LevelFilter::current(),
            ));
        }
    }
}

/// Forwards `log` records to `tracing`, demoting the one that is no error:
/// fuser's "Failed to send FUSE reply" with `ENOENT`, which means the kernel no
/// longer waits for the answer (the request was interrupted, or the connection
/// aborted by an unmount while the daemon worked on it).
struct LogBridge(tracing_log::LogTracer);

impl LogBridge {
    /// The level `record` is logged at.
    fn level_of(record: &log::Record<'_>) -> log::Level {
        if record.level() <= log::Level::Warn
            && record.target() == "fuser::reply"
            && record.args().to_string().ends_with(&format!(
                "{}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            ))
        {
            log::Level::Debug
        } else {
            record.level()
        }
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = Self::level_of(record);
        if level == record.level() {
            self.0.log(record);
        } else {
            self.0.log(
                &log::Record::builder()
                    .level(level)
                    .target(record.target())
                    .args(*record.args())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            );
        }
    }

    fn flush(&self) {}
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount(args) => run_mount(args),
        Command::Status(args) => crate::status::run(args),
        Command::Server(args) => crate::signal::cli::run_server(args),
        Command::Token(args) => crate::signal::cli::run_token(args),
        Command::Demo => crate::demo::run(&crate::demo::default_root()),
    }
}

/// Loads the config named on the command line or the default one.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<(PathBuf, Config)> {
    let path = path
        .map(Path::to_owned)
        .unwrap_or_else(config::default_config_path);
    let config = Config::load(&path).with_context(
        || "a config is needed: create one with `brume server add-user NAME > brume.conf`",
    )?;
    Ok((path, config))
}

/// Set by SIGINT/SIGTERM once [`stop_on_signals`] has run.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the process, and
/// returns the flag: long-running commands poll it and shut down cleanly.
pub fn stop_on_signals() -> &'static AtomicBool {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &STOP
}

fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    let (config_path, mut config) = load_config(args.config.as_deref())?;
    if args.no_passthrough {
        config.fs.passthrough = false;
    }
    let data_dir = args.data.clone().unwrap_or_else(config::default_data_dir);
    let mountpoint = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("mountpoint {}", args.dir.display()))?;
    if !mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    if !args.foreground {
        return daemonize(&args, &config_path, &data_dir, &mountpoint);
    }
    let stop = stop_on_signals();
    let mut mounted = mount(MountOptions {
        mountpoint: mountpoint.clone(),
        config,
        data_dir,
        network: true,
    })?;
    sd_notify(&format!(
        "READY=1\nSTATUS=mounted at {}",
        mountpoint.display()
    ));
    loop {
        if mounted.wait_timeout(Duration::from_millis(100)) {
            tracing::info!("unmounted");
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            tracing::info!("signal received; unmounting");
            sd_notify("STOPPING=1");
            mounted.unmount()?;
            return Ok(());
        }
    }
}

/// Tells systemd about readiness (`Type=notify`) when started by it.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(cause = ?e, "cannot notify systemd");
    }
}

/// Whether `dir` is currently a mountpoint of a Brume filesystem.
pub fn is_brume_mount(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = dir.to_string_lossy();
    text.lines().any(|l| {
        let mut f = l.split(' ');
        let (_src, target, fstype) = (f.next(), f.next(), f.next());
        target.map(|t| t.replace("\\040", " ")) == Some(want.to_string())
            && fstype.is_some_and(|t| t == "fuse.brume" || t == "fuse")
    })
}

/// Re-runs this command in the foreground as a detached child logging to
/// `<data>/brume.log`, and returns once the mount is up.
fn daemonize(
    args: &MountArgs,
    config_path: &Path,
    data_dir: &Path,
    mountpoint: &Path,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    let log_path = data_dir.join("brume.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("log file {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the brume binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount")
        .arg(mountpoint)
        .arg("--config")
        .arg(config_path)
        .arg("--data")
        .arg(data_dir)
        .arg("-f");
    if args.no_passthrough {
        cmd.arg("--no-passthrough");
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if is_brume_mount(mountpoint) {
            println!(
                "brume mounted at {} (pid {}, log {})",
                mountpoint.display(),
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "the daemon exited ({status}) before mounting; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    bail!(
        "timed out waiting for the mount at {}; see {}",
        mountpoint.display(),
        log_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_the_kernel_no_longer_waits_for_is_logged_at_debug_only() {
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let level = |target: &str, err: &std::io::Error| {
            LogBridge::level_of(
                &log::Record::builder()
                    .level(log::Level::Error)
                    .target(target)
                    .args(format_args!("Failed to send FUSE reply: {err}"))
                    .build(),
            )
        };
        assert_eq!(level("fuser::reply", &enoent), log::Level::Debug);
        assert_eq!(level("fuser::reply", &einval), log::Level::Error);
        assert_eq!(level("fuser::session", &enoent), log::Level::Error);
    }
}
