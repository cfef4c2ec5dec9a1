//! The conformance suite on the single-node Redis backend, against the server named by
//! `FENCED_TEST_REDIS_URL` (`scripts/test` starts it; without it every check fails, it never
//! skips).
//!
//! The checks that count server commands get a private `redis-server` of their own: Redis counts
//! commands per server (`INFO commandstats`), not per database, and other tests run against the
//! shared server at the same time. The private server lives as long as the harness and dies with
//! this process even if it is killed (it is stopped when its stdin pipe closes).
#![cfg(feature = "redis")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fenced_testkit::{Harness, ServerCounter, require_env};

fenced_testkit::conformance_tests!(harness());

fn harness() -> Harness {
    let url = require_env("FENCED_TEST_REDIS_URL");
    let private = Arc::new(PrivateRedis::start());
    let counting_url = format!("redis://127.0.0.1:{}/0", private.port);
    let counter: ServerCounter = Arc::new(move || {
        let private = private.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || private.commands())
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

/// A throwaway `redis-server` on a free loopback port, without persistence or password.
struct PrivateRedis {
    port: u16,
    shell: Child,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let mut problem = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            // The shell starts the server and stops it as soon as its stdin closes, which happens
            // when this process drops the harness or dies.
            let script = format!(
                "redis-server --bind 127.0.0.1 --port {port} --save '' --appendonly no --dir '{}' \
                 --logfile redis.log --daemonize no & pid=$!; read _; kill $pid; wait $pid",
                dir.path().display()
            );
            let shell = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh");
            let mut server = PrivateRedis { port, shell, dir };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if server.ping() {
                    return server;
                }
                if let Ok(Some(_)) = server.shell.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            problem = std::fs::read_to_string(server.dir.path().join("redis.log"))
                .unwrap_or_else(|_| "no log (is redis-server installed?)".to_owned());
        }
        panic!(
            "could not start a private redis-server for the command-counting checks ({problem}); \
             scripts/test installs redis-server"
        )
    }

    /// One inline command, its raw reply.
    fn query(&self, command: &str) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\r\n").as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        match first.as_bytes().first() {
            Some(b'$') => {
                let len: usize = first[1..].trim().parse().map_err(std::io::Error::other)?;
                let mut body = vec![0; len];
                reader.read_exact(&mut body)?;
                Ok(body)
            }
            _ => Ok(first.into_bytes()),
        }
    }

    fn ping(&self) -> bool {
        self.query("PING").is_ok_and(|r| r.starts_with(b"+PONG"))
    }

    /// The commands clients sent so far: every `cmdstat_*` `calls` count, without the `INFO`
    /// calls of this counter and without the commands run inside scripts.
    fn commands(&self) -> u64 {
        let info = self
            .query("INFO commandstats")
            .expect("INFO commandstats on the private server");
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
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected commandstats line {line:?}"));
            total += calls;
        }
        total
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        // Closing stdin makes the shell stop the server; then reap the shell.
        drop(self.shell.stdin.take());
        let _ = self.shell.wait();
    }
}
