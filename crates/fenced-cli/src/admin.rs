//! `fenced status`, `fenced release --force`, `fenced watch`: looking at and breaking locks
//! without holding them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fenced::HolderInfo;
use serde_json::json;
use tokio::time::Instant;

use crate::{
    connect_or_exit, error_code, exit, parse_duration, print_error, store_name, termination_signals,
};

/// Arguments of `fenced status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Only locks whose key starts with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The longest lease this store's clients use: conditions that matter within it are
    /// reported (e.g. a Redlock node that restarted more recently).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    max_lease: Duration,
}

/// Arguments of `fenced release`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReleaseArgs {
    /// Really break the lock. Another process may enter while the holder still works; its
    /// writes are then only stopped by resources that check fencing tokens.
    #[arg(long)]
    force: bool,
    /// The key of the lock to break.
    key: String,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Arguments of `fenced watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// Only locks whose key starts with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Print one JSON object per event instead of one line of text.
    #[arg(long)]
    json: bool,
    /// How often the held locks are compared.
    #[arg(long, value_parser = parse_duration, default_value = "200ms")]
    interval: Duration,
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
}

fn millis(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| json!(d.as_millis() as u64))
}

fn holder_json(h: &HolderInfo) -> serde_json::Value {
    json!({
        "key": h.key.as_ref().map(|k| k.as_str()),
        "holder": h.label,
        "owner": h.owner.map(|o| o.to_string()),
        "token": h.token.map(|t| t.get()),
        "age_ms": millis(h.age),
        "remaining_ms": millis(h.remaining),
        "waiters": h.waiters,
    })
}

/// `fenced status`.
pub(crate) async fn status(url: Option<&str>, args: StatusArgs) -> u8 {
    let client = match connect_or_exit(url).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let held = match client.list(&args.prefix).await {
        Ok(held) => held,
        Err(e) => {
            print_error(&e);
            return error_code(&e);
        }
    };
    let warnings = match client.warnings(args.max_lease).await {
        Ok(warnings) => warnings,
        Err(e) => {
            print_error(&e);
            return error_code(&e);
        }
    };
    let store = store_name(url);
    if args.json {
        let locks: Vec<_> = held.iter().map(holder_json).collect();
        println!(
            "{}",
            json!({ "store": store, "locks": locks, "warnings": warnings })
        );
        return 0;
    }
    println!("store: {store}");
    for warning in &warnings {
        println!("warning: {warning}");
    }
    if held.is_empty() {
        if args.prefix.is_empty() {
            println!("no locks held");
        } else {
            println!("no locks held under {:?}", args.prefix);
        }
        return 0;
    }
    let rows: Vec<[String; 6]> = held
        .iter()
        .map(|h| {
            [
                h.key
                    .as_ref()
                    .map_or_else(String::new, |k| k.as_str().to_owned()),
                h.label.clone().unwrap_or_else(|| "-".to_owned()),
                h.token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                secs(h.age),
                secs(h.remaining),
                h.waiters.map_or_else(|| "-".to_owned(), |w| w.to_string()),
            ]
        })
        .collect();
    let header = ["KEY", "HOLDER", "TOKEN", "AGE", "REMAINING", "WAITERS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]].map(String::as_str));
    }
    0
}

/// `fenced release --force KEY`.
pub(crate) async fn release(url: Option<&str>, args: ReleaseArgs) -> u8 {
    if !args.force {
        print_error(format_args!(
            "refusing to break {:?} without --force: another process may enter while the holder still works \
             (only resources that check fencing tokens stop its writes)",
            args.key
        ));
        return exit::USAGE;
    }
    let client = match connect_or_exit(url).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.force_release(&args.key).await {
        Ok(broken) => {
            if args.json {
                let value = match &broken {
                    Some(h) => json!({ "key": args.key, "broken": true, "lock": holder_json(h) }),
                    None => json!({ "key": args.key, "broken": false }),
                };
                println!("{value}");
            } else {
                match broken {
                    Some(h) => println!(
                        "broke {:?}: it was held by {} (owner {}, token {}); the fencing counter is kept, so token {} \
                         is never issued again",
                        args.key,
                        h.label.as_deref().unwrap_or("an unknown holder"),
                        h.owner
                            .map_or_else(|| "unknown".to_owned(), |o| o.to_string()),
                        h.token
                            .map_or_else(|| "unknown".to_owned(), |t| t.to_string()),
                        h.token
                            .map_or_else(|| "unknown".to_owned(), |t| t.to_string()),
                    ),
                    None => println!("{:?} was not held; nothing changed", args.key),
                }
            }
            0
        }
        Err(e) => {
            print_error(&e);
            error_code(&e)
        }
    }
}

/// What `watch` remembers of a lock between two looks.
struct Seen {
    info: HolderInfo,
    at: Instant,
}

impl Seen {
    /// Whether the lease seen then could still be running now.
    fn lease_left(&self, now: Instant) -> bool {
        self.info.remaining.is_none_or(|r| self.at + r > now)
    }
}

fn event(json_out: bool, kind: &str, key: &str, info: &HolderInfo) {
    let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    if json_out {
        let mut value = holder_json(info);
        value["time"] = json!(time);
        value["event"] = json!(kind);
        value["key"] = json!(key);
        println!("{value}");
    } else {
        println!(
            "{time} {kind:<8} {key} token={} holder={:?}",
            info.token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            info.label.as_deref().unwrap_or("-"),
        );
    }
}

/// `fenced watch`.
pub(crate) async fn watch(url: Option<&str>, args: WatchArgs) -> u8 {
    if args.interval < Duration::from_millis(10) || args.interval > Duration::from_secs(3600) {
        print_error("--interval must be between 10ms and 1h");
        return exit::USAGE;
    }
    let client = match connect_or_exit(url).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let (mut sigint, mut sigterm) = match termination_signals() {
        Ok(signals) => signals,
        Err(code) => return code,
    };
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut first = true;
    let mut failing = false;
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigint.recv() => return 0,
            _ = sigterm.recv() => return 0,
        }
        let sent = Instant::now();
        let held = match client.list(&args.prefix).await {
            Ok(held) => {
                if failing {
                    print_error("the backend answers again");
                    failing = false;
                }
                held
            }
            Err(e) if e.is_transient() => {
                if !failing {
                    print_error(format_args!("{e}; retrying"));
                    failing = true;
                }
                continue;
            }
            Err(e) => {
                print_error(&e);
                return error_code(&e);
            }
        };
        let now = Instant::now();
        let mut current = BTreeMap::new();
        for info in held {
            let Some(key) = info.key.as_ref().map(|k| k.as_str().to_owned()) else {
                continue;
            };
            match seen.remove(&key) {
                None => event(
                    args.json,
                    if first { "held" } else { "acquired" },
                    &key,
                    &info,
                ),
                Some(before)
                    if before.info.token != info.token || before.info.owner != info.owner =>
                {
                    let kind = if before.lease_left(now) {
                        "lost"
                    } else {
                        "expired"
                    };
                    event(args.json, kind, &key, &before.info);
                    event(args.json, "acquired", &key, &info);
                }
                Some(_) => {}
            }
            current.insert(key, Seen { info, at: sent });
        }
        for (key, before) in std::mem::take(&mut seen) {
            let kind = if before.lease_left(now) {
                "released"
            } else {
                "expired"
            };
            event(args.json, kind, &key, &before.info);
        }
        seen = current;
        first = false;
    }
}
