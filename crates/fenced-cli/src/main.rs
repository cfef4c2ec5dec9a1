//! `fenced`: distributed locks from the shell.
//!
//! ```text
//! fenced run --key nightly-report -- ./report.sh
//! fenced run --key order:42 --url redis://cache:6379 --wait 10s --lease 30s -- ./refund 42
//! read owner token < <(fenced lock --key deploy --lease 10m); …; fenced unlock --key deploy --owner "$owner"
//! fenced status --prefix order:
//! fenced release --force order:42
//! fenced watch --prefix order: --json
//! ```
//!
//! Exit codes (stable; see [`exit`]):
//!
//! | code | meaning |
//! |---|---|
//! | the command's own | `run`: the command ran under the lock and exited |
//! | 0 | success |
//! | 64 | usage error: bad flag, duration, key, URL or unknown scheme, command not found (checked before locking) |
//! | 69 | backend unreachable or failing |
//! | 70 | internal error |
//! | 75 | not acquired within `--wait` (the lock is held by someone else) |
//! | 76 | `unlock`: this owner id does not hold the lock |
//! | 77 | authentication or permission failure at the backend |
//! | 78 | the backend is not available in this build or this version |
//! | 79 | `run`: the lock was lost while the command ran (the command was stopped) |
//! | 126, 127 | `run`: the command could not be executed after the lock was taken |
//! | 128+N | `run`: the command was killed by signal N |
//!
//! A command may itself exit with one of these numbers; fenced always explains its own exits on
//! stderr, so a code with no fenced message came from the command.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fenced::{Client, ErrorKind, Operation};
use tokio::signal::unix::{Signal, SignalKind, signal};

mod admin;
mod exit;
mod lock;
mod metrics;
mod run;
mod waiting;

/// Distributed locks from the shell. No URL means the embedded lock file of this machine
/// ($XDG_STATE_HOME/fenced/locks.db).
#[derive(Debug, Parser)]
#[command(name = "fenced", version, about, long_about = None)]
#[command(
    after_help = "Examples:\n  fenced run --key nightly-report -- ./report.sh\n  \
    fenced status\n\nExit codes: 64 usage, 69 backend unavailable, 70 internal, 75 not acquired, \
    76 not the owner, 77 auth failure, 78 backend not available, 79 lock lost; run: the command's own code."
)]
pub(crate) struct Cli {
    /// Lock store URL: sqlite:///path/locks.db, redis://[user:pass@]host:6379/0, rediss://…,
    /// memory:// (one process only). Default: $FENCED_URL, else the embedded file.
    #[arg(long, env = "FENCED_URL", global = true, hide_env_values = true)]
    url: Option<String>,

    /// More log output on stderr (-v debug, -vv trace). FENCED_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    verbose: u8,

    /// Only errors on stderr: no progress display, no notices.
    #[arg(short, long, global = true)]
    quiet: bool,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Acquire a lock, run a command while holding it, release it when the command exits.
    ///
    /// The command sees FENCED_KEY, FENCED_TOKEN (the fencing token: pass it to what you write
    /// to) and FENCED_OWNER. The lease is renewed while it runs. If the lock is lost, the command
    /// is stopped (see --on-lost) and fenced exits with 79. SIGINT and SIGTERM sent to fenced are
    /// forwarded to the command; the lock is released after it ends. The command runs in its own
    /// process group, and signals reach the whole group (so its children stop too); commands
    /// that read from the terminal are not supported.
    #[command(
        after_help = "Examples:\n  fenced run --key nightly-report -- ./report.sh\n  \
        fenced run --key order:42 --wait 10s --lease 30s --url redis://127.0.0.1:6379 -- ./refund 42\n  \
        fenced run --key backup --wait 0 --max-hold 2h --metrics-addr 127.0.0.1:9464 -- ./backup.sh"
    )]
    Run(run::RunArgs),
    /// Acquire a lock and exit, leaving it held until its lease ends or `fenced unlock`.
    ///
    /// Prints the owner id and the fencing token ("OWNER TOKEN", or JSON with --json). Nothing
    /// renews the lock after fenced exits, so --lease is required.
    #[command(
        after_help = "Example:\n  read owner token < <(fenced lock --key deploy --lease 10m)\n  \
        ./deploy.sh --fence \"$token\"\n  fenced unlock --key deploy --owner \"$owner\""
    )]
    Lock(lock::LockArgs),
    /// Release a lock taken by `fenced lock`, if (and only if) OWNER still holds it.
    #[command(
        after_help = "Example:\n  fenced unlock --key deploy --owner 3f2a…(the id `fenced lock` printed)"
    )]
    Unlock(lock::UnlockArgs),
    /// Show the held locks: key, holder label, fencing token, age, remaining lease, waiters.
    #[command(after_help = "Examples:\n  fenced status\n  fenced status --prefix order: --json")]
    Status(admin::StatusArgs),
    /// Break a stuck lock whoever holds it (administrative; needs --force).
    ///
    /// Prints what it broke. The fencing counter is kept, so the broken holder's token is never
    /// issued again and resources keep rejecting its writes.
    #[command(after_help = "Example:\n  fenced release --force order:42")]
    Release(admin::ReleaseArgs),
    /// Print lock events (acquired, released, expired, lost) as they happen, until interrupted.
    ///
    /// Events are found by comparing the held locks every --interval: a lock taken and released
    /// between two looks is not seen.
    #[command(after_help = "Examples:\n  fenced watch\n  fenced watch --prefix order: --json")]
    Watch(admin::WatchArgs),
}

/// Parses a human duration: `500ms`, `30s`, `5m`, `1h 30m`, `0`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s or 5m)"))
}

/// Process-wide output settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ui {
    /// Only errors on stderr.
    pub(crate) quiet: bool,
    /// stderr is a terminal (progress display allowed).
    pub(crate) tty: bool,
}

impl Ui {
    /// Prints a fenced notice on stderr unless quiet.
    pub(crate) fn notice(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("fenced: {message}");
        }
    }
}

/// Prints an error on stderr (always, one line).
pub(crate) fn print_error(message: impl std::fmt::Display) {
    let text = message.to_string().replace('\n', " ");
    eprintln!("fenced: {text}");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(&cli);
    let ui = Ui {
        quiet: cli.quiet,
        tty: std::io::stderr().is_terminal(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_error(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let url = cli.url.clone();
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(url.as_deref(), args, ui).await,
            Command::Lock(args) => lock::lock(url.as_deref(), args, ui).await,
            Command::Unlock(args) => lock::unlock(url.as_deref(), args, ui).await,
            Command::Status(args) => admin::status(url.as_deref(), args).await,
            Command::Release(args) => admin::release(url.as_deref(), args).await,
            Command::Watch(args) => admin::watch(url.as_deref(), args).await,
        }
    });
    // Do not wait long for background tasks: a release that did not make it is bounded by its
    // lease.
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}

fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "fenced=debug,fenced_cli=debug,info",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FENCED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Connects to `url` (or the embedded default).
pub(crate) async fn connect(url: Option<&str>) -> Result<Client, fenced::Error> {
    let mut builder = Client::builder();
    if let Some(url) = url {
        builder = builder.url(url);
    }
    builder.build().await
}

/// Lock options shared by `run` and `lock`: the lease, the wait (`None` = forever) and the label.
pub(crate) fn base_options(
    lease: Duration,
    wait: Option<Duration>,
    label: Option<&str>,
) -> fenced::LockOptions {
    let mut options = fenced::LockOptions::new().lease(lease);
    options = match wait {
        Some(wait) => options.wait(wait),
        None => options.wait_forever(),
    };
    match label {
        Some(label) => options.label(label),
        None => options,
    }
}

/// SIGINT and SIGTERM streams, or the exit code after printing why they are unavailable.
pub(crate) fn termination_signals() -> Result<(Signal, Signal), u8> {
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(int), Ok(term)) => Ok((int, term)),
        _ => {
            print_error("cannot install signal handlers");
            Err(exit::INTERNAL)
        }
    }
}

/// Connects, or prints the error and returns the exit code.
pub(crate) async fn connect_or_exit(url: Option<&str>) -> Result<Client, u8> {
    connect(url).await.map_err(|e| {
        print_error(&e);
        error_code(&e)
    })
}

/// Prints an acquisition failure; "not acquired" gets a message for shell users.
pub(crate) fn print_acquire_error(e: &fenced::Error, key: &str, wait: Option<Duration>) {
    if e.kind() != ErrorKind::NotAcquired {
        return print_error(e);
    }
    let who = e
        .holder()
        .map_or_else(|| "held by another owner".to_owned(), ToString::to_string);
    match wait {
        Some(w) if w.is_zero() => print_error(format_args!(
            "{key:?} is {who}; not acquired (--wait 0 tries once)"
        )),
        Some(w) => print_error(format_args!(
            "{key:?} is {who}; not acquired within --wait {}",
            humantime::format_duration(w)
        )),
        None => print_error(format_args!("{key:?} is {who}; not acquired")),
    }
}

/// How a fenced error maps to an exit code.
pub(crate) fn error_code(e: &fenced::Error) -> u8 {
    match e.kind() {
        ErrorKind::NotAcquired => exit::NOT_ACQUIRED,
        ErrorKind::NotOwner => exit::NOT_OWNER,
        ErrorKind::InvalidKey | ErrorKind::InvalidConfig => exit::USAGE,
        ErrorKind::Unsupported if e.operation() == Operation::Connect => exit::CONFIG,
        ErrorKind::Unsupported => exit::USAGE,
        ErrorKind::Lost => exit::LOST,
        ErrorKind::Backend if !e.is_transient() && looks_like_auth(e) => exit::NO_PERMISSION,
        ErrorKind::Backend => exit::UNAVAILABLE,
        _ => exit::INTERNAL,
    }
}

fn looks_like_auth(e: &fenced::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    [
        "auth",
        "password",
        "permission",
        "denied",
        "noperm",
        "wrongpass",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// Serves Prometheus metrics on `addr` for the rest of the process.
pub(crate) fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    metrics::serve(addr)
}

/// `fenced::redact` for a URL that may be absent (the embedded default).
pub(crate) fn store_name(url: Option<&str>) -> String {
    match url {
        Some(url) => fenced::redact(url),
        None => fenced::default_url().unwrap_or_else(|_| "the embedded default".to_owned()),
    }
}
