//! `fenced run`: hold a lock while a command runs.

use std::ffi::OsString;
use std::io::ErrorKind as IoErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use fenced::LockOptions;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::time::Instant;

use crate::{
    Ui, connect_or_exit, error_code, exit, parse_duration, print_acquire_error, print_error,
    termination_signals, waiting,
};

/// Arguments of `fenced run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The lock key (the name of what you protect), e.g. order:42 or nightly-report.
    #[arg(long)]
    pub(crate) key: String,
    /// How long to wait for a held lock: 0 tries once; default: wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) wait: Option<Duration>,
    /// Lease: how long the lock lasts without renewal (renewed every lease/3 while the command runs).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub(crate) lease: Duration,
    /// Do not renew the lease: the lock ends after --lease even if the command still runs.
    #[arg(long)]
    pub(crate) no_renew: bool,
    /// Hard cap on the total hold time; the command is stopped when it passes.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) max_hold: Option<Duration>,
    /// What to do with the command when the lock is lost: term (SIGTERM, then SIGKILL after
    /// --grace), kill (SIGKILL at once), ignore (report it and let the command finish).
    #[arg(long, value_enum, default_value_t = OnLost::Term)]
    pub(crate) on_lost: OnLost,
    /// How long the command gets between SIGTERM and SIGKILL when the lock is lost.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) grace: Duration,
    /// A label for humans shown to waiters and by `fenced status` (default: `<host> pid <pid>`).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) while the command runs.
    #[arg(long)]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// The `lock` label of the metrics (default: the key up to its first `:` or `/`, else
    /// `other`); 1-64 characters of A-Z a-z 0-9 _ . : -
    #[arg(long)]
    pub(crate) metric_name: Option<String>,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub(crate) command: Vec<OsString>,
}

/// What `fenced run` does with the command when the lock is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnLost {
    /// SIGTERM, then SIGKILL after --grace; exit 79.
    Term,
    /// SIGKILL at once; exit 79.
    Kill,
    /// Report it on stderr and let the command finish; exit with its status.
    Ignore,
}

/// Lock options from `fenced run` flags.
fn options(args: &RunArgs) -> LockOptions {
    let mut options =
        crate::base_options(args.lease, args.wait, args.label.as_deref()).renew(!args.no_renew);
    if let Some(max) = args.max_hold {
        options = options.max_hold(max);
    }
    if let Some(name) = &args.metric_name {
        options = options.metric_name(name.clone());
    }
    options
}

/// Finds `program` the way `execvp` would: a path if it contains `/`, else in `$PATH`.
fn resolve(program: &OsString) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let shown = program.to_string_lossy();
    let as_path = Path::new(program);
    if shown.contains('/') {
        return if executable(as_path) {
            Ok(as_path.to_owned())
        } else if as_path.exists() {
            Err(format!("{shown:?} is not an executable file"))
        } else {
            Err(format!("command not found: {shown:?}"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(as_path))
        .find(|p| executable(p))
        .ok_or_else(|| format!("command not found: {shown:?} (not in PATH)"))
}

/// Runs `fenced run` and returns the exit code.
pub(crate) async fn run(url: Option<&str>, args: RunArgs, ui: Ui) -> u8 {
    // A typo in the command must not take (and hold) the lock: check it first.
    if let Err(e) = resolve(&args.command[0]) {
        print_error(format_args!("{e}; the lock was not taken"));
        return exit::USAGE;
    }
    let options = options(&args);
    if let Err(e) = options.validate() {
        print_error(&e);
        return error_code(&e);
    }
    if let Some(addr) = args.metrics_addr {
        if let Err(e) = crate::serve_metrics(addr) {
            print_error(format_args!("cannot serve metrics on {addr}: {e}"));
            return exit::USAGE;
        }
    }
    let client = match connect_or_exit(url).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let (mut sigint, mut sigterm) = match termination_signals() {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let acquire = waiting::with_progress(
        ui,
        &client,
        &args.key,
        client.lock_with(&args.key, &options),
    );
    let guard = tokio::select! {
        acquired = acquire => match acquired {
            Ok(guard) => guard,
            Err(e) => {
                print_acquire_error(&e, &args.key, args.wait);
                return error_code(&e);
            }
        },
        _ = sigint.recv() => {
            print_error(format_args!("interrupted while waiting for {:?}; the command was not run", args.key));
            return 130;
        }
        _ = sigterm.recv() => {
            print_error(format_args!("terminated while waiting for {:?}; the command was not run", args.key));
            return 143;
        }
    };
    tracing::info!(key = %args.key, token = guard.token().get(), "acquired; starting the command");

    let spawned = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("FENCED_KEY", guard.key().as_str())
        .env("FENCED_TOKEN", guard.token().to_string())
        .env("FENCED_OWNER", guard.owner().to_string())
        // Its own process group, so that stopping it also stops what it started.
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                IoErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            print_error(format_args!("cannot run {:?}: {e}", args.command[0]));
            if let Err(e) = guard.release().await {
                print_error(&e);
            }
            return code;
        }
    };
    let pid = child.id().and_then(|id| Pid::from_raw(id as i32));
    // Signals go to the command's whole process group (the command and its children).
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill_process_group(pid, sig);
        }
    };

    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_reason = None;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            reason = &mut lost, if lost_reason.is_none() => {
                lost_reason = Some(reason);
                match args.on_lost {
                    OnLost::Term => {
                        print_error(format_args!(
                            "lock {:?} lost ({reason}); stopping the command: SIGTERM now, SIGKILL in {}",
                            args.key,
                            humantime::format_duration(args.grace)
                        ));
                        send(Signal::TERM);
                        kill_at = Some(Instant::now() + args.grace);
                    }
                    OnLost::Kill => {
                        print_error(format_args!("lock {:?} lost ({reason}); killing the command (SIGKILL)", args.key));
                        send(Signal::KILL);
                    }
                    OnLost::Ignore => {
                        print_error(format_args!(
                            "lock {:?} lost ({reason}); the command keeps running (--on-lost ignore) without mutual exclusion",
                            args.key
                        ));
                    }
                }
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                send(Signal::KILL);
                kill_at = None;
            }
            _ = sigint.recv() => send(Signal::INT),
            _ = sigterm.recv() => send(Signal::TERM),
        }
    };
    let released = guard.release().await;
    let code = match &status {
        Ok(status) => status
            .code()
            .map(|c| c as u8)
            .or_else(|| status.signal().map(|s| 128u8.wrapping_add(s as u8)))
            .unwrap_or(exit::INTERNAL),
        Err(e) => {
            print_error(format_args!("lost track of the command: {e}"));
            exit::INTERNAL
        }
    };
    if lost_reason.is_some() {
        return if args.on_lost == OnLost::Ignore {
            code
        } else {
            exit::LOST
        };
    }
    match released {
        Ok(()) => code,
        Err(e) if e.kind() == fenced::ErrorKind::Lost => {
            print_error(&e);
            if code == 0 && args.on_lost != OnLost::Ignore {
                exit::LOST
            } else {
                code
            }
        }
        Err(e) => {
            ui.notice(format_args!("warning: {e}"));
            code
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
