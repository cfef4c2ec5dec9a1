//! `fenced lock` / `fenced unlock`: for shell scripts that cannot wrap a command.

use std::time::Duration;

use fenced::{LockGuard, OwnerId};

use crate::{
    Ui, connect_or_exit, error_code, exit, parse_duration, print_acquire_error, print_error,
    waiting,
};

/// Arguments of `fenced lock`.
#[derive(Debug, clap::Args)]
pub(crate) struct LockArgs {
    /// The lock key.
    #[arg(long)]
    key: String,
    /// How long the lock lasts: nothing renews it after fenced exits.
    #[arg(long, value_parser = parse_duration)]
    lease: Duration,
    /// How long to wait for a held lock: 0 tries once; default: wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// A label for humans shown to waiters and by `fenced status`.
    #[arg(long)]
    label: Option<String>,
    /// Print {"key","owner","token","lease_ms"} as JSON instead of "OWNER TOKEN".
    #[arg(long)]
    json: bool,
}

/// Arguments of `fenced unlock`.
#[derive(Debug, clap::Args)]
pub(crate) struct UnlockArgs {
    /// The lock key.
    #[arg(long)]
    key: String,
    /// The owner id `fenced lock` printed.
    #[arg(long)]
    owner: String,
}

/// Connects for a lock that outlives this process (see [`detached_url`]), or returns the exit
/// code after printing why not.
async fn connect_detached(url: Option<&str>) -> Result<fenced::Client, u8> {
    match detached_url(url) {
        Ok(url) => connect_or_exit(url.as_deref()).await,
        Err(e) => {
            print_error(e);
            Err(exit::USAGE)
        }
    }
}

/// The URL to use for a lock that must outlive this process. The embedded store frees the locks
/// of exited processes at once unless told otherwise.
fn detached_url(url: Option<&str>) -> Result<Option<String>, String> {
    let url = match url {
        Some(url) => url.to_owned(),
        None => fenced::default_url().map_err(|e| e.to_string())?,
    };
    if url.starts_with("memory:") {
        return Err("memory:// locks live inside one process, so `fenced lock` would release the lock as it \
                    exits; use the embedded default or a server URL"
            .to_owned());
    }
    if url.starts_with("sqlite:") && !url.contains("release_on_exit=") {
        let sep = if url.contains('?') { '&' } else { '?' };
        return Ok(Some(format!("{url}{sep}release_on_exit=false")));
    }
    Ok(Some(url))
}

/// An etcd lock lives in the session of the client that took it, which nothing keeps alive
/// after `fenced lock` exits: unless the URL sets `session_ttl`, the session lasts the lease
/// (whole seconds, at least 2 s), so the lock ends with its lease as on the other stores.
fn etcd_session_for(url: &str, lease: Duration) -> String {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("etcd" | "etcds")) || url.contains("session_ttl=") {
        return url.to_owned();
    }
    let secs = (lease.as_secs() + u64::from(lease.subsec_nanos() > 0)).max(2);
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}session_ttl={secs}s")
}

/// What kind of lock dies with the process that took it (its server session is the process's
/// connection): ZooKeeper locks, and the session mode of PostgreSQL and MySQL.
fn dies_with_process(url: &str) -> Option<&'static str> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase())?;
    if scheme == "zk" {
        return Some("zk://");
    }
    let session = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|p| p == "mode=session"));
    match scheme.as_str() {
        "postgres" | "postgresql" if session => Some("PostgreSQL session-mode"),
        "mysql" | "mariadb" if session => Some("MySQL session-mode"),
        _ => None,
    }
}

/// `fenced lock`.
pub(crate) async fn lock(url: Option<&str>, args: LockArgs, ui: Ui) -> u8 {
    let options = crate::base_options(args.lease, args.wait, args.label.as_deref()).renew(false);
    if let Err(e) = options.validate() {
        print_error(&e);
        return error_code(&e);
    }
    if let Some(kind) = url.and_then(dies_with_process) {
        print_error(format!(
            "{kind} locks live as long as the session of the process that took them, so `fenced lock` \
             would lose the lock as it exits; run the command under the lock with `fenced run` instead"
        ));
        return exit::USAGE;
    }
    let url = url.map(|u| etcd_session_for(u, args.lease));
    let client = match connect_detached(url.as_deref()).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let guard = match waiting::with_progress(
        ui,
        &client,
        &args.key,
        client.lock_with(&args.key, &options),
    )
    .await
    {
        Ok(guard) => guard,
        Err(e) => {
            print_acquire_error(&e, &args.key, args.wait);
            return error_code(&e);
        }
    };
    let lock = LockGuard::detach(guard);
    if args.json {
        let value = serde_json::json!({
            "key": lock.key.as_str(),
            "owner": lock.owner.to_string(),
            "token": lock.token.get(),
            "lease_ms": args.lease.as_millis() as u64,
        });
        println!("{value}");
    } else {
        println!("{} {}", lock.owner, lock.token);
    }
    0
}

/// `fenced unlock`.
pub(crate) async fn unlock(url: Option<&str>, args: UnlockArgs, ui: Ui) -> u8 {
    let owner: OwnerId = match args.owner.parse() {
        Ok(owner) => owner,
        Err(e) => {
            print_error(&e);
            return exit::USAGE;
        }
    };
    if let Err(e) = fenced::Key::new(&args.key) {
        print_error(&e);
        return exit::USAGE;
    }
    let client = match connect_detached(url).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.unlock(&args.key, &owner).await {
        Ok(()) => {
            ui.notice(format_args!("released {:?}", args.key));
            0
        }
        Err(e) => {
            print_error(&e);
            error_code(&e)
        }
    }
}
