//! The conformance suite on the single-node Redis backend, against the server named by
//! `FENCED_TEST_REDIS_URL`. The checks that count server commands use the second server named by
//! `FENCED_TEST_REDIS_COUNTING_URL`: Redis counts commands per server (`INFO commandstats`), not
//! per database, and other tests use the main server at the same time. `scripts/test` starts
//! both (and runs the counting checks one at a time); without them every check fails, none skips.
#![cfg(feature = "redis")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fenced_testkit::{Harness, ServerCounter, require_env};

fenced_testkit::conformance_tests!(harness());

fn harness() -> Harness {
    let url = require_env("FENCED_TEST_REDIS_URL");
    let counting_url = require_env("FENCED_TEST_REDIS_COUNTING_URL");
    let stats = Arc::new(Mutex::new(Stats::connect(&counting_url)));
    let counter: ServerCounter = Arc::new(move || {
        let stats = stats.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .commands()
            })
            .await
            .expect("command counter")
        })
    });
    Harness::new(url, env!("CARGO_BIN_EXE_fenced-conformance-worker"))
        .with_server_counter(counting_url, counter)
}

/// Commands that only ever run inside the backend's Lua scripts. Each script call is counted
/// once, as the `EVALSHA` the client sent; the commands it runs inside are not round trips.
const INSIDE_SCRIPTS: [&str; 8] = [
    "hmget", "hset", "incrby", "time", "del", "pexpire", "pttl", "publish",
];

/// One authenticated connection to the counting server, opened before any measurement so that
/// reading the counter adds nothing but its own `INFO` (which is not counted).
struct Stats {
    reader: BufReader<TcpStream>,
}

impl Stats {
    fn connect(url: &str) -> Stats {
        let shown = fenced::redact(url);
        let (user, password, address) = split_url(url)
            .unwrap_or_else(|| panic!("FENCED_TEST_REDIS_COUNTING_URL is not redis://[user:password@]host:port/db: {shown}"));
        let stream = TcpStream::connect(address.as_str())
            .unwrap_or_else(|e| panic!("cannot reach the counting server {shown}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut stats = Stats {
            reader: BufReader::new(stream),
        };
        if let Some(password) = password {
            let reply = match user.as_deref() {
                None | Some("") => stats.command(&["AUTH", &password]),
                Some(user) => stats.command(&["AUTH", user, &password]),
            };
            assert!(
                reply.starts_with(b"+OK"),
                "the counting server {shown} refused the password"
            );
        }
        stats
    }

    /// Sends one command, returns its reply (the body of a bulk string, else the first line).
    fn command(&mut self, args: &[&str]) -> Vec<u8> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let stream = self.reader.get_mut();
        stream
            .write_all(request.as_bytes())
            .expect("write to the counting server");
        let mut first = String::new();
        self.reader
            .read_line(&mut first)
            .expect("read from the counting server");
        match first.strip_prefix('$') {
            Some(len) => {
                let len: usize = len.trim().parse().expect("bulk length");
                let mut body = vec![0; len + 2];
                self.reader.read_exact(&mut body).expect("bulk body");
                body.truncate(len);
                body
            }
            None => first.into_bytes(),
        }
    }

    /// The commands clients sent so far: every `cmdstat_*` `calls` count, without `INFO` (this
    /// counter) and without the commands run inside scripts.
    fn commands(&mut self) -> u64 {
        let info = self.command(&["INFO", "commandstats"]);
        let info = String::from_utf8_lossy(&info);
        let mut total = 0;
        for line in info.lines() {
            let Some((name, stats)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name == "info" || INSIDE_SCRIPTS.contains(&name) {
                continue;
            }
            total += stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected commandstats line {line:?}"));
        }
        total
    }
}

/// `(user, password, host:port)` of a `redis://` URL, percent-decoded.
fn split_url(url: &str) -> Option<(Option<String>, Option<String>, String)> {
    let rest = url.strip_prefix("redis://")?;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, authority),
    };
    let address = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:6379")
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':')) {
        Some(Some((user, password))) => (Some(decode(user)?), Some(decode(password)?)),
        Some(None) => (userinfo.map(decode)?, None),
        None => (None, None),
    };
    Some((user, password, address))
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
