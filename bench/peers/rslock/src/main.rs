//! The rslock crate (Redlock over the one server of a `redis://` URL, or over every node of a
//! `redlock://host:port,host:port,.../db` URL; tokio tasks) under the bench protocol
//! (bench/PROTOCOL.md).
//!
//! Measured window: `--warmup` seconds after the tasks start, then `--duration` seconds. An
//! acquire+release pair counts when it starts and ends inside the window; no new pair starts
//! after it. In `handoff`, grants are written (and counted) inside the window; releases are
//! written for the whole run, so every grant in the window finds the release before it.

use std::process::exit;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rslock::LockManager;
use rustix::time::{clock_gettime, ClockId};

const VERSION: &str = env!("RSLOCK_VERSION");
/// After the window, tasks still waiting in acquire get this long to come out, then the process
/// exits regardless.
const GRACE: Duration = Duration::from_secs(1);

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Latency,
    Throughput,
    Handoff,
}

struct Args {
    url: String,
    mode: Mode,
    concurrency: usize,
    duration: f64,
    prefix: String,
    warmup: f64,
    lease_ms: u64,
    hold_ms: f64,
    events: Option<String>,
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!(
        "usage: rslock-peer --url URL --mode latency|throughput|handoff --concurrency N \
         --duration SECS --prefix PREFIX [--warmup SECS] [--lease-ms MS] [--hold-ms MS] [--events FILE]"
    );
    exit(2)
}

fn parse_args() -> Args {
    let mut url = None;
    let mut mode = None;
    let mut concurrency = 1usize;
    let mut duration = None;
    let mut prefix = None;
    let mut warmup = 1.0f64;
    let mut lease_ms = 10_000u64;
    let mut hold_ms = 1.0f64;
    let mut events = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        fn num<T: std::str::FromStr>(name: &str, v: String) -> T {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {v}")))
        }
        match name.as_str() {
            "--url" => url = Some(value()),
            "--mode" => {
                mode = Some(match value().as_str() {
                    "latency" => Mode::Latency,
                    "throughput" => Mode::Throughput,
                    "handoff" => Mode::Handoff,
                    other => usage(&format!("unknown mode {other}")),
                })
            }
            "--concurrency" => concurrency = num(&name, value()),
            "--duration" => duration = Some(num(&name, value())),
            "--prefix" => prefix = Some(value()),
            "--warmup" => warmup = num(&name, value()),
            "--lease-ms" => lease_ms = num(&name, value()),
            "--hold-ms" => hold_ms = num(&name, value()),
            "--events" => events = Some(value()),
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let mode = mode.unwrap_or_else(|| usage("--mode is required"));
    let a = Args {
        url: url.unwrap_or_else(|| usage("--url is required")),
        mode,
        concurrency: if mode == Mode::Latency { 1 } else { concurrency },
        duration: duration.unwrap_or_else(|| usage("--duration is required")),
        prefix: prefix.unwrap_or_else(|| usage("--prefix is required")),
        warmup,
        lease_ms,
        hold_ms,
        events,
    };
    if a.concurrency == 0 || a.duration <= 0.0 || a.warmup < 0.0 || a.lease_ms == 0 || a.hold_ms < 0.0 {
        usage("--concurrency, --duration and --lease-ms must be positive, --warmup and --hold-ms not negative");
    }
    if !a.url.starts_with("redis://") && !a.url.starts_with("redlock://") {
        usage("only redis:// and redlock://host:port,host:port,.../db URLs are supported");
    }
    if a.mode == Mode::Handoff && a.events.is_none() {
        usage("--mode handoff needs --events FILE");
    }
    a
}

/// The `redis://` URL of each node: the URL itself, or for
/// `redlock://[cred@]h:p,[cred@]h:p,.../db[?params]` one `redis://[cred@]h:p/db` per node (the
/// query, fenced's parameters, is ignored).
fn node_urls(url: &str) -> Vec<String> {
    let Some(rest) = url.strip_prefix("redlock://") else {
        return vec![url.to_string()];
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let (nodes, db) = rest.split_once('/').unwrap_or((rest, ""));
    let db = if db.is_empty() { "0" } else { db };
    nodes
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| format!("redis://{n}/{db}"))
        .collect()
}

/// A client for `url`, after a PING: rslock treats a failed connection like a held lock (it
/// retries), so each server is checked first.
async fn checked_client(url: &str) -> redis::Client {
    let client = match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: bad --url {url}: {e}");
            exit(1)
        }
    };
    let ping: redis::RedisResult<String> = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut con).await
    }
    .await;
    if let Err(e) = ping {
        eprintln!("error: cannot reach {url}: {e}");
        exit(1)
    }
    client
}

#[derive(Default)]
struct TaskResult {
    lat: Vec<u64>,
    errors: u64,
    grants: u64,
    events: Vec<(u64, bool)>, // (ns, is_grant)
    last_error: Option<String>,
}

#[derive(Clone, Copy)]
struct Window {
    ms: u64,
    me: u64,
}

impl TaskResult {
    fn error(&mut self, w: Window, e: String) {
        if now_ns() >= w.ms {
            self.errors += 1;
        }
        self.last_error = Some(e);
    }
}

fn keys_for(a: &Args, i: usize) -> Vec<String> {
    match a.mode {
        Mode::Latency => vec![format!("{}:lat", a.prefix)],
        Mode::Throughput => (0..16).map(|k| format!("{}:tp:{i}:{k}", a.prefix)).collect(),
        Mode::Handoff => vec![format!("{}:handoff", a.prefix)],
    }
}

/// Uncontended pairs. `lock()` makes up to 3 tries (the library default) and reports
/// `Unavailable` when they all fail, which here only happens when Redis fails.
async fn pair_loop(rl: LockManager, keys: Vec<String>, ttl: Duration, w: Window, r: Arc<Mutex<TaskResult>>) {
    let mut k = 0usize;
    loop {
        let key = &keys[k % keys.len()];
        k += 1;
        let t0 = now_ns();
        if t0 >= w.me {
            return;
        }
        match rl.lock(key.as_bytes(), ttl).await {
            Ok(lock) => {
                rl.unlock(&lock).await;
                let t1 = now_ns();
                if t0 >= w.ms && t1 <= w.me {
                    r.lock().unwrap().lat.push(t1 - t0);
                }
            }
            Err(e) => r.lock().unwrap().error(w, e.to_string()),
        }
    }
}

/// Contended: `acquire()` loops until granted (the library's waiting acquire).
async fn handoff_loop(rl: LockManager, key: String, ttl: Duration, hold: Duration, w: Window, r: Arc<Mutex<TaskResult>>) {
    while now_ns() < w.me {
        let guard = match rl.acquire(key.as_bytes(), ttl).await {
            Ok(g) => g,
            Err(e) => {
                r.lock().unwrap().error(w, e.to_string());
                continue;
            }
        };
        let g = now_ns();
        if g <= w.me {
            if g >= w.ms {
                let mut r = r.lock().unwrap();
                r.events.push((g, true));
                r.grants += 1;
            }
            if !hold.is_zero() {
                // Tokio's timer has millisecond granularity (a 1 ms sleep lasts about 2 ms); hold
                // on a blocking thread so every implementation holds for the same time.
                let _ = tokio::task::spawn_blocking(move || std::thread::sleep(hold)).await;
            }
        }
        r.lock().unwrap().events.push((now_ns(), false));
        guard.release().await;
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[tokio::main]
async fn main() {
    let a = parse_args();
    let mut clients = Vec::new();
    for url in node_urls(&a.url) {
        clients.push(checked_client(&url).await);
    }
    let nodes = clients.len();
    let rl = LockManager::from_clients(clients);
    let ttl = Duration::from_millis(a.lease_ms);
    let hold = Duration::from_secs_f64(a.hold_ms / 1000.0);

    let servers = if nodes == 1 {
        "with the one server, one tokio task per client (multi-thread runtime), all tasks sharing \
         the manager's one multiplexed connection"
            .to_string()
    } else {
        format!(
            "over {nodes} nodes (quorum {}), one tokio task per client (multi-thread runtime), all \
             tasks sharing the manager's one multiplexed connection per node",
            nodes / 2 + 1
        )
    };
    let settings = format!(
        "rslock LockManager {servers}; handoff waits with acquire(), \
         which loops lock() forever, each lock() making up to 3 tries of SET NX PX with a random \
         0-200 ms sleep between tries and none between lock() calls (library defaults: retry count 3, \
         retry delay 200 ms); a failed try also runs the unlock script; latency/throughput use lock() \
         (same first try; it reports Unavailable after 3 failed tries); TTL {} ms from --lease-ms; \
         the library does not report Redis errors on lock/unlock (a failed SET counts as 'held')",
        a.lease_ms
    );

    let n = a.concurrency;
    let results: Vec<Arc<Mutex<TaskResult>>> = (0..n).map(|_| Arc::default()).collect();
    let start = now_ns();
    let ms = start + (a.warmup * 1e9) as u64;
    let w = Window { ms, me: ms + (a.duration * 1e9) as u64 };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in results.iter().enumerate() {
        let keys = keys_for(&a, i);
        let (rl, r) = (rl.clone(), r.clone());
        if a.mode == Mode::Handoff {
            tasks.spawn(handoff_loop(rl, keys[0].clone(), ttl, hold, w, r));
        } else {
            tasks.spawn(pair_loop(rl, keys, ttl, w, r));
        }
    }
    let left = Duration::from_nanos(w.me.saturating_sub(now_ns())) + GRACE;
    let incomplete = tokio::time::timeout(left, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err();

    let mut lat = Vec::new();
    let (mut errors, mut grants) = (0u64, 0u64);
    let mut events = Vec::new();
    let mut last_error = None;
    for r in &results {
        let mut r = r.lock().unwrap();
        lat.append(&mut r.lat);
        errors += r.errors;
        grants += r.grants;
        events.append(&mut r.events);
        if last_error.is_none() {
            last_error = r.last_error.take();
        }
    }
    lat.sort_unstable();
    let mode = match a.mode {
        Mode::Latency => "latency",
        Mode::Throughput => "throughput",
        Mode::Handoff => "handoff",
    };
    let ops = if a.mode == Mode::Handoff { grants } else { lat.len() as u64 };
    let mut out = format!(
        "{{\"impl\": \"rslock\", \"version\": {}, \"mode\": \"{mode}\", \"concurrency\": {n}, \
         \"ops\": {ops}, \"errors\": {errors}, \"elapsed_s\": {}",
        json_str(VERSION),
        (w.me - w.ms) as f64 / 1e9
    );
    if a.mode != Mode::Handoff {
        let mean = if lat.is_empty() { 0 } else { lat.iter().sum::<u64>() / lat.len() as u64 };
        out += &format!(
            ", \"lat_ns\": {{\"p50\": {}, \"p99\": {}, \"max\": {}, \"mean\": {mean}}}",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0)
        );
    }
    out += &format!(", \"settings\": {}}}", json_str(&settings));

    let mut code = 0;
    if let Some(path) = &a.events {
        events.sort_unstable();
        let text: String = events
            .iter()
            .map(|(ns, grant)| format!("{} {ns}\n", if *grant { "grant" } else { "release" }))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: cannot write events file {path}: {e}");
            code = 1;
        }
    }
    // In a hand-off run, a process the lock never reached is a result (starvation), not a failure.
    if ops == 0 && (a.mode != Mode::Handoff || errors > 0) {
        eprintln!(
            "error: no operation completed in the measured window{}",
            last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
        );
        code = 1;
    }
    if incomplete {
        eprintln!("note: some tasks were still waiting in acquire after the grace period; exiting anyway");
    }
    println!("{out}");
    // Tasks still waiting in acquire must not keep the process alive.
    exit(code)
}
