//! `fenced run`: hold a lock while a command runs.

use std::io::ErrorKind as IoErrorKind;
use std::os::unix::process::ExitStatusExt;

use rustix::process::{Pid, Signal, kill_process};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::{RunArgs, connect, error_code, exit, options};

/// Runs `fenced run` and returns the exit code.
pub(crate) async fn run(url: Option<&str>, args: RunArgs) -> u8 {
    let options = options(&args);
    let client = match connect(url).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("fenced: {e}");
            return error_code(&e);
        }
    };
    let (Ok(mut sigint), Ok(mut sigterm)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("fenced: cannot install signal handlers");
        return exit::INTERNAL;
    };
    let guard = tokio::select! {
        acquired = client.lock_with(&args.key, &options) => match acquired {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("fenced: {e}");
                return error_code(&e);
            }
        },
        _ = sigint.recv() => {
            eprintln!("fenced: interrupted while waiting for {:?}; the command was not run", args.key);
            return 130;
        }
        _ = sigterm.recv() => {
            eprintln!("fenced: terminated while waiting for {:?}; the command was not run", args.key);
            return 143;
        }
    };
    tracing::info!(key = %args.key, token = guard.token().get(), "acquired; starting the command");

    let spawned = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("FENCED_KEY", guard.key().as_str())
        .env("FENCED_TOKEN", guard.token().to_string())
        .env("FENCED_OWNER", guard.owner().to_string())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                IoErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            eprintln!("fenced: cannot run {:?}: {e}", args.command[0]);
            if let Err(e) = guard.release().await {
                eprintln!("fenced: {e}");
            }
            return code;
        }
    };
    let pid = child.id().and_then(|id| Pid::from_raw(id as i32));
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill_process(pid, sig);
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
                eprintln!(
                    "fenced: lock {:?} lost ({reason}); stopping the command: SIGTERM now, SIGKILL in {}",
                    args.key,
                    humantime::format_duration(args.grace)
                );
                send(Signal::TERM);
                kill_at = Some(Instant::now() + args.grace);
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
            eprintln!("fenced: lost track of the command: {e}");
            exit::INTERNAL
        }
    };
    if lost_reason.is_some() {
        return exit::LOST;
    }
    match released {
        Ok(()) => code,
        Err(e) if e.kind() == fenced::ErrorKind::Lost => {
            eprintln!("fenced: {e}");
            if code == 0 { exit::LOST } else { code }
        }
        Err(e) => {
            eprintln!("fenced: warning: {e}");
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
