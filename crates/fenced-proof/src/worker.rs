//! A worker process: threads that each loop { acquire, read-modify-write the fenced resource,
//! release } and log every step to the history file.
//!
//! Each thread has its own single-threaded runtime and its own client, so blocking a thread (the
//! [`Directive::Pause`] stand-in for a stop-the-world pause) stops its renewal too, exactly as a
//! paused process would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fenced::{ErrorKind, LockGuard, LockOptions, LostReason};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::history::{LineLog, WorkerEvent, now_ns};
use crate::resource::Directive;

/// What a worker process does (its command line, as `fenced-proof worker` parses it).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The lock server URL.
    #[arg(long)]
    pub url: String,
    /// The one lock key all workers contend on.
    #[arg(long)]
    pub key: String,
    /// The fenced resource.
    #[arg(long)]
    pub resource: SocketAddr,
    /// The history file of this process.
    #[arg(long)]
    pub history: PathBuf,
    /// Id of the first worker thread; the others follow.
    #[arg(long)]
    pub first_worker: u32,
    /// Worker threads in this process.
    #[arg(long)]
    pub threads: u32,
    /// Lease of each grant, in milliseconds.
    #[arg(long = "lease-ms", value_parser = millis)]
    pub lease: Duration,
    /// Length of a usual critical section, in milliseconds.
    #[arg(long = "hold-ms", value_parser = millis)]
    pub hold: Duration,
    /// `CLOCK_MONOTONIC` instant (ns) at which workers stop taking the lock.
    #[arg(long)]
    pub stop_at_ns: u64,
}

fn millis(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_millis)
}

/// Runs the worker threads to the end; returns the process exit code (0, or 1 when the
/// history could not be written or a thread panicked).
pub fn run(args: WorkerArgs) -> i32 {
    let log = match LineLog::create(&args.history) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!(
                "fenced-proof worker: cannot create {}: {e}",
                args.history.display()
            );
            return 1;
        }
    };
    let threads: Vec<_> = (0..args.threads)
        .map(|i| {
            let (args, log) = (args.clone(), log.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(worker(&args, args.first_worker + i, &log));
            })
        })
        .collect();
    let mut code = 0;
    for t in threads {
        if t.join().is_err() {
            code = 1;
        }
    }
    if args.threads > 1 {
        // An in-process store ends with this process: look for a lock left behind now.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let held = rt.block_on(leftover(&args));
        log.push(&WorkerEvent::Leftover {
            worker: args.first_worker,
            ns: now_ns(),
            held,
        });
    }
    code
}

/// Whether the key is still held once every lease that could still be running has ended.
async fn leftover(args: &WorkerArgs) -> bool {
    let Ok(client) = fenced::connect(&args.url).await else {
        return true;
    };
    match client.holder(&args.key).await {
        Ok(Some(h)) => {
            let wait =
                h.remaining.unwrap_or(args.lease).min(args.lease) + Duration::from_millis(50);
            tokio::time::sleep(wait).await;
            !matches!(client.holder(&args.key).await, Ok(None))
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

struct Conn {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Conn {
    async fn call(&mut self, request: String) -> std::io::Result<String> {
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        self.lines
            .next_line()
            .await?
            .ok_or_else(|| std::io::Error::other("the resource closed the connection"))
    }
}

/// `OK <value> <directive>` → (value, directive); `None` for a rejection.
fn parse_ok(reply: &str) -> Option<(u64, Directive)> {
    let mut parts = reply.split_whitespace();
    (parts.next()? == "OK").then_some(())?;
    let value = parts.next()?.parse().ok()?;
    Some((value, Directive::decode(parts.next()?)?))
}

/// Blocks this worker's thread: its runtime, renewal task included, does not run meanwhile.
fn block_thread(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

async fn worker(args: &WorkerArgs, id: u32, log: &Arc<LineLog>) {
    log.push(&WorkerEvent::Start {
        worker: id,
        pid: std::process::id(),
        ns: now_ns(),
    });
    // A server that has just (re)started may refuse for a moment: retry transient errors.
    let client = loop {
        match fenced::connect(&args.url).await {
            Ok(c) => break c,
            Err(e) => {
                log.push(&WorkerEvent::AcquireError {
                    worker: id,
                    ns: now_ns(),
                    error: e.to_string(),
                });
                if !e.is_transient() || now_ns() >= args.stop_at_ns {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut conn = match TcpStream::connect(args.resource).await {
        Ok(s) => {
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            Conn {
                lines: BufReader::new(r).lines(),
                write: w,
            }
        }
        Err(e) => {
            eprintln!("worker {id}: cannot reach the resource: {e}");
            return;
        }
    };
    let mut grant = 0u32;
    loop {
        let now = now_ns();
        if now >= args.stop_at_ns {
            break;
        }
        log.push(&WorkerEvent::Attempt {
            worker: id,
            ns: now,
        });
        let options = LockOptions::new()
            .lease(args.lease)
            .wait(Duration::from_nanos(args.stop_at_ns - now));
        let guard = match client.lock_with(&args.key, &options).await {
            Ok(g) => g,
            Err(e) if e.kind() == ErrorKind::NotAcquired => break,
            Err(e) => {
                log.push(&WorkerEvent::AcquireError {
                    worker: id,
                    ns: now_ns(),
                    error: e.to_string(),
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        grant += 1;
        let ns = now_ns();
        log.push(&WorkerEvent::Grant {
            worker: id,
            grant,
            token: guard.token().get(),
            ns,
            deadline_ns: ns + guard.remaining().as_nanos() as u64,
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        let signal = guard.lost_signal();
        let lost_log = log.clone();
        tokio::spawn(async move {
            let reason = signal.wait().await;
            if !matches!(reason, LostReason::Released | LostReason::Detached) {
                lost_log.push(&WorkerEvent::Lost {
                    worker: id,
                    grant,
                    ns: now_ns(),
                    reason: reason.to_string(),
                });
            }
        });
        match critical_section(args, id, grant, &guard, &mut conn, log).await {
            Ok(true) => {}
            Ok(false) => {
                log.push(&WorkerEvent::Forget {
                    worker: id,
                    grant,
                    ns: now_ns(),
                });
                std::mem::forget(guard);
                return;
            }
            Err(e) => {
                eprintln!("worker {id}: resource error: {e}");
                return;
            }
        }
        let sent_ns = now_ns();
        let ok = guard.release().await.is_ok();
        log.push(&WorkerEvent::Release {
            worker: id,
            grant,
            sent_ns,
            done_ns: now_ns(),
            ok,
        });
    }
    log.push(&WorkerEvent::Stop {
        worker: id,
        ns: now_ns(),
    });
}

/// Read, work (checking the lock), check, write. `Ok(false)`: the grant is to be forgotten.
async fn critical_section(
    args: &WorkerArgs,
    id: u32,
    grant: u32,
    guard: &LockGuard,
    conn: &mut Conn,
    log: &LineLog,
) -> std::io::Result<bool> {
    let token = guard.token().get();
    let reply = conn.call(format!("READ {id} {grant} {token}")).await?;
    let Some((value, directive)) = parse_ok(&reply) else {
        return Ok(true);
    };
    let mut section = args.hold;
    match directive {
        Directive::Forget => return Ok(false),
        Directive::Pause(ms) => block_thread(ms),
        Directive::Hold(ms) => section = Duration::from_millis(ms),
        Directive::Continue => {}
    }
    let end = Instant::now() + section;
    let mut valid = guard.is_valid();
    while valid && Instant::now() < end {
        let step = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(step.min(Duration::from_millis(10))).await;
        valid = guard.is_valid();
    }
    if !valid {
        log.push(&WorkerEvent::Abandon {
            worker: id,
            grant,
            ns: now_ns(),
        });
        return Ok(true);
    }
    let reply = conn.call(format!("CHECK {id} {grant} {token}")).await?;
    match parse_ok(&reply).map(|(_, d)| d) {
        Some(Directive::Forget) => return Ok(false),
        Some(Directive::Pause(ms)) => block_thread(ms),
        _ => {}
    }
    conn.call(format!("WRITE {id} {grant} {token} {}", value + 1))
        .await?;
    Ok(true)
}
