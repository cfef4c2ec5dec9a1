//! `fenced`: run a command while holding a distributed lock.
//!
//! ```text
//! fenced run --key nightly-report -- ./report.sh
//! fenced run --key order:42 --url redis://cache:6379 --wait 10s --lease 30s -- ./refund 42
//! ```
//!
//! Exit codes (stable):
//!
//! | code | meaning |
//! |---|---|
//! | the command's own | the command ran under the lock and exited |
//! | 64 | usage error (bad flag, duration or key) |
//! | 69 | backend unreachable or failing |
//! | 70 | internal error |
//! | 75 | not acquired within `--wait` (the lock is held by someone else) |
//! | 77 | authentication or permission failure at the backend |
//! | 78 | configuration error (bad or unsupported URL) |
//! | 79 | the lock was lost while the command ran (the command was stopped) |
//! | 126, 127 | the command could not be executed / was not found |
//! | 128+N | the command was killed by signal N |
//!
//! A command may itself exit with one of these numbers; check stderr, where fenced always
//! explains its own exits.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fenced::{Client, ErrorKind, LockOptions};

mod exit;
mod run;

/// Distributed locks from the shell. No URL means the embedded lock file of this machine.
#[derive(Debug, Parser)]
#[command(name = "fenced", version, about, long_about = None)]
#[command(after_help = "Example:\n  fenced run --key nightly-report -- ./report.sh")]
struct Cli {
    /// Lock store URL: sqlite:///path/locks.db, redis://host:6379, rediss://…, memory://.
    /// Default: $FENCED_URL, else the embedded file in the user's state directory.
    #[arg(long, env = "FENCED_URL", global = true, hide_env_values = true)]
    url: Option<String>,

    /// Log more (-v: debug, -vv: trace) to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Acquire a lock, run a command while holding it, release it when the command exits.
    ///
    /// The command sees FENCED_KEY, FENCED_TOKEN (the fencing token: pass it to what you write
    /// to) and FENCED_OWNER in its environment. The lease is renewed while it runs. If the lock
    /// is lost, the command gets SIGTERM, then SIGKILL after --grace, and fenced exits with 79.
    /// SIGINT/SIGTERM sent to fenced are forwarded to the command.
    #[command(
        after_help = "Examples:\n  fenced run --key nightly-report -- ./report.sh\n  \
        fenced run --key order:42 --wait 10s --lease 30s --url redis://127.0.0.1:6379 -- ./refund 42"
    )]
    Run(RunArgs),
}

/// Arguments of `fenced run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The lock key (the name of what you protect).
    #[arg(long)]
    key: String,
    /// How long to wait for a held lock: `0` tries once; default: wait forever.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// Lease (time to live without renewal).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    lease: Duration,
    /// Do not renew the lease: the lock ends after --lease even if the command still runs.
    #[arg(long)]
    no_renew: bool,
    /// Hard cap on the total hold time; the command is stopped when it passes.
    #[arg(long, value_parser = parse_duration)]
    max_hold: Option<Duration>,
    /// How long the command gets between SIGTERM and SIGKILL when the lock is lost.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    grace: Duration,
    /// A label for humans shown to other waiters (default: `<host> pid <pid>`).
    #[arg(long)]
    label: Option<String>,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s or 5m)"))
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
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fenced: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(cli.url.as_deref(), args).await,
        }
    });
    // Do not wait for background tasks (a lost release is bounded by its lease).
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "fenced=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FENCED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Connects to `url` (or the embedded default).
async fn connect(url: Option<&str>) -> Result<Client, fenced::Error> {
    let mut builder = Client::builder();
    if let Some(url) = url {
        builder = builder.url(url);
    }
    builder.build().await
}

/// Lock options from `fenced run` flags.
fn options(args: &RunArgs) -> LockOptions {
    let mut options = LockOptions::new().lease(args.lease).renew(!args.no_renew);
    options = match args.wait {
        Some(wait) => options.wait(wait),
        None => options.wait_forever(),
    };
    if let Some(max) = args.max_hold {
        options = options.max_hold(max);
    }
    if let Some(label) = &args.label {
        options = options.label(label.clone());
    }
    options
}

/// How a fenced error maps to an exit code.
fn error_code(e: &fenced::Error) -> u8 {
    match e.kind() {
        ErrorKind::NotAcquired => exit::NOT_ACQUIRED,
        ErrorKind::InvalidKey => exit::USAGE,
        ErrorKind::InvalidConfig if e.operation() == fenced::Operation::Validate => exit::USAGE,
        ErrorKind::InvalidConfig | ErrorKind::Unsupported => exit::CONFIG,
        ErrorKind::Lost => exit::LOST,
        ErrorKind::Backend if !e.is_transient() && looks_like_auth(e) => exit::NO_PERMISSION,
        ErrorKind::Backend => exit::UNAVAILABLE,
        _ => exit::INTERNAL,
    }
}

fn looks_like_auth(e: &fenced::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["auth", "password", "permission", "denied", "noperm"]
        .iter()
        .any(|w| text.contains(w))
}
