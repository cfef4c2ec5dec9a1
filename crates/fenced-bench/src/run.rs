//! The measured loops of the protocol's `latency`, `throughput` and `handoff` modes, shared by
//! fenced and the floors.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::clock::monotonic_ns;
use crate::locker::Locker;
use crate::stats::Summary;
use crate::{Mode, Plan};

/// Keys per task in throughput mode.
const KEYS_PER_TASK: usize = 16;

/// What one task measured.
#[derive(Debug, Default)]
struct TaskResult {
    /// Acquire+release latencies (ns) completed in the window.
    latencies: Vec<u64>,
    /// Completed pairs (or grants, in handoff mode) in the window.
    ops: u64,
    /// Failed acquires or releases in the window.
    errors: u64,
    /// Handoff events: `(is_grant, monotonic ns)`.
    events: Vec<(bool, u64)>,
    /// The first error message seen, for stderr.
    first_error: Option<String>,
}

impl TaskResult {
    fn error(&mut self, counted: bool, message: String) {
        if counted {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }
}

/// The measurement window of this process.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, at: Instant) -> bool {
        at >= self.start && at < self.end
    }
}

/// Runs `plan` on `locker` and returns the protocol's JSON line.
pub(crate) async fn measure<L: Locker>(locker: L, plan: &Plan) -> Result<Value, String> {
    let locker = Arc::new(locker);
    let begin = Instant::now();
    let window = Window {
        start: begin + plan.warmup,
        end: begin + plan.warmup + plan.duration,
    };
    let concurrency = match plan.mode {
        Mode::Latency => 1,
        _ => plan.concurrency,
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let locker = locker.clone();
        let prefix = plan.prefix.clone();
        let mode = plan.mode;
        let hold = plan.hold;
        tasks.push(tokio::spawn(async move {
            match mode {
                Mode::Latency => pairs(&*locker, vec![format!("{prefix}:lat")], window).await,
                Mode::Throughput => {
                    let keys = (0..KEYS_PER_TASK)
                        .map(|k| format!("{prefix}:tp:{i}:{k}"))
                        .collect();
                    pairs(&*locker, keys, window).await
                }
                Mode::Handoff => handoff(&*locker, format!("{prefix}:handoff"), hold, window).await,
                Mode::Memory => unreachable!("memory mode has its own runner"),
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut events = Vec::new();
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    for task in tasks {
        let r = task.await.map_err(|e| format!("a task failed: {e}"))?;
        latencies.extend(r.latencies);
        events.extend(r.events);
        ops += r.ops;
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    if let Some(message) = &first_error {
        eprintln!("fenced-bench: first error: {message}");
    }
    // A handoff process that got no grant was starved by the others: that is a result.
    if ops == 0 && plan.mode != Mode::Handoff {
        return Err(format!(
            "no operation completed in the measured window ({errors} errors{})",
            first_error.map_or_else(String::new, |m| format!("; first: {m}"))
        ));
    }
    let mut line = json!({
        "impl": locker.name(),
        "version": locker.version(),
        "mode": match plan.mode {
            Mode::Latency => "latency",
            Mode::Throughput => "throughput",
            Mode::Handoff => "handoff",
            Mode::Memory => "memory",
        },
        "concurrency": concurrency,
        "ops": ops,
        "errors": errors,
        "elapsed_s": plan.duration.as_secs_f64(),
        "settings": locker.settings(),
    });
    if plan.mode == Mode::Handoff {
        let path = plan
            .events
            .as_ref()
            .ok_or("--mode handoff needs --events")?;
        write_events(path, &mut events)?;
    } else if let Some(summary) = Summary::of(&mut latencies) {
        line["lat_ns"] = summary.to_json();
    }
    Ok(line)
}

/// Acquire+release pairs over `keys` in turn until the window ends.
async fn pairs<L: Locker>(locker: &L, keys: Vec<String>, window: Window) -> TaskResult {
    let mut result = TaskResult::default();
    let mut next = 0;
    loop {
        let started = Instant::now();
        if started >= window.end {
            return result;
        }
        let key = &keys[next % keys.len()];
        next += 1;
        match locker.acquire(key).await {
            Ok(held) => match locker.release(held).await {
                Ok(()) => {
                    let done = Instant::now();
                    if window.contains(started) && done <= window.end {
                        result.ops += 1;
                        result.latencies.push(nanos(done - started));
                    }
                }
                Err(e) => result.error(window.contains(started), format!("release: {e}")),
            },
            Err(e) => result.error(window.contains(started), format!("acquire: {e}")),
        }
    }
}

/// Acquire with waiting, record the grant, hold, record the release, release; until the window
/// ends. Grants in the window are recorded, and so are the releases of recorded grants and
/// every release in the window (the driver pairs each grant with the latest release before it).
async fn handoff<L: Locker>(locker: &L, key: String, hold: Duration, window: Window) -> TaskResult {
    let mut result = TaskResult::default();
    loop {
        if Instant::now() >= window.end {
            return result;
        }
        match locker.acquire(&key).await {
            Ok(held) => {
                let granted = Instant::now();
                let grant_ns = monotonic_ns();
                let recorded = window.contains(granted);
                if recorded {
                    result.ops += 1;
                    result.events.push((true, grant_ns));
                }
                hold_for(hold).await;
                let release_ns = monotonic_ns();
                if recorded || window.contains(Instant::now()) {
                    result.events.push((false, release_ns));
                }
                if let Err(e) = locker.release(held).await {
                    result.error(recorded, format!("release: {e}"));
                }
            }
            Err(e) => result.error(window.contains(Instant::now()), format!("acquire: {e}")),
        }
    }
}

/// Holds for `hold`. Tokio's timer rounds up to whole milliseconds (a 1 ms sleep takes close
/// to 2 ms), so the hold sleeps on a blocking thread, as precisely as the peers' sleeps.
async fn hold_for(hold: Duration) {
    if hold.is_zero() {
        return;
    }
    if tokio::task::spawn_blocking(move || std::thread::sleep(hold))
        .await
        .is_err()
    {
        tokio::time::sleep(hold).await;
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes `grant <ns>` / `release <ns>` lines in time order.
fn write_events(path: &std::path::Path, events: &mut [(bool, u64)]) -> Result<(), String> {
    events.sort_unstable_by_key(|&(_, ns)| ns);
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot write the events file {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for &(grant, ns) in events.iter() {
        let kind = if grant { "grant" } else { "release" };
        writeln!(out, "{kind} {ns}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    out.flush().map_err(|e| format!("{}: {e}", path.display()))
}
