//! `fenced-bench`: fenced and the raw floors under the bench protocol (`bench/PROTOCOL.md`).
//!
//! ```text
//! fenced-bench --impl fenced|floor --url URL --mode latency|throughput|handoff
//!              --concurrency N --duration SECS --prefix PREFIX
//!              [--warmup SECS] [--lease-ms MS] [--hold-ms MS] [--events FILE]
//! fenced-bench --impl fenced --url URL --mode memory --count N [--lease-ms MS] [--duration SECS]
//! ```
//!
//! `--impl fenced` measures the fenced library as applications use it: one [`fenced::Client`]
//! per process, shared by every task. `--impl floor` measures the bare operations fenced needs,
//! written directly against the same client library without any fenced code (see
//! [`floor`]). `--mode memory` holds many locks at once and reports the memory each one costs
//! (see [`footprint`]). Exactly one JSON object is printed on stdout; logs go to stderr.

mod clock;
mod floor;
mod footprint;
mod locker;
mod run;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which implementation to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Impl {
    /// The fenced library (`fenced::connect`, `Client::lock_with`, `LockGuard::release`).
    Fenced,
    /// The bare operations, written directly with the same client library.
    Floor,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// One task: acquire and release one uncontended key, over and over.
    Latency,
    /// `N` tasks, each over its own 16 keys.
    Throughput,
    /// `N` tasks on one key, each holding it `--hold-ms`; grant and release events to a file.
    Handoff,
    /// Hold `--count` locks on distinct keys with renewal on; report memory per lock.
    Memory,
}

/// The command line (see `bench/PROTOCOL.md`).
#[derive(Debug, Parser)]
#[command(
    name = "fenced-bench",
    version,
    about = "fenced and the raw floors under the bench protocol"
)]
struct Args {
    /// `fenced` or `floor`.
    #[arg(long = "impl", value_enum)]
    implementation: Impl,
    /// The store: `memory://`, `sqlite:///path`, `redis://host:port/db`,
    /// `redlock://host:port,host:port,host:port/db`, `redis+cluster://host:port,host:port`, …
    /// (anything `fenced::connect` takes).
    #[arg(long)]
    url: String,
    /// latency, throughput, handoff or memory.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Concurrent tasks in this process.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Seconds of measurement (in memory mode: the longest time allowed for acquiring and
    /// for the renewal round each).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Every key starts with `PREFIX:`.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The lease in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// How long each grant is held in handoff mode, in milliseconds.
    #[arg(long, default_value_t = 1)]
    hold_ms: u64,
    /// Where handoff mode writes its `grant <ns>` / `release <ns>` lines.
    #[arg(long)]
    events: Option<std::path::PathBuf>,
    /// How many locks memory mode holds.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
}

/// What every measured run gets from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) mode: Mode,
    pub(crate) concurrency: usize,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) prefix: String,
    pub(crate) lease: Duration,
    pub(crate) hold: Duration,
    pub(crate) events: Option<std::path::PathBuf>,
}

fn seconds(value: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("--{name} {value} is not a duration"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("fenced-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<String, String> {
    let plan = Plan {
        mode: args.mode,
        concurrency: args.concurrency.max(1),
        duration: seconds(args.duration, "duration")?,
        warmup: seconds(args.warmup, "warmup")?,
        prefix: args.prefix.clone(),
        lease: Duration::from_millis(args.lease_ms),
        hold: Duration::from_millis(args.hold_ms),
        events: args.events.clone(),
    };
    if plan.mode == Mode::Handoff && plan.events.is_none() {
        return Err("--mode handoff needs --events FILE".to_owned());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let output = runtime.block_on(async {
        match (args.implementation, plan.mode) {
            (Impl::Fenced, Mode::Memory) => {
                footprint::run(
                    &args.url,
                    &plan.prefix,
                    args.count,
                    plan.lease,
                    plan.duration,
                )
                .await
            }
            (Impl::Floor, Mode::Memory) => {
                Err("--mode memory measures fenced only (use --impl fenced)".to_owned())
            }
            (Impl::Fenced, _) => {
                let locker = locker::FencedLocker::connect(&args.url, plan.lease).await?;
                run::measure(locker, &plan).await
            }
            (Impl::Floor, _) => floor::measure(&args.url, &plan).await,
        }
    });
    // Memory mode leaves many locks held: do not wait for their background releases.
    runtime.shutdown_background();
    output.map(|value| value.to_string())
}
