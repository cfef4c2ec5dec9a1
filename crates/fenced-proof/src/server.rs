//! Servers a proof run starts for itself (so it can crash and restart them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A throwaway `redis-server` on loopback, with its data in one directory.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    aof: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server with data in `dir`: no persistence, or (with `aof`) an append-only file
    /// synced on every write.
    pub async fn start(dir: &Path, aof: bool) -> Result<RedisServer, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port().map_err(|e| e.to_string())?;
            let mut server = RedisServer {
                dir: dir.into(),
                port,
                aof,
                child: None,
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL: a crash, no chance to save) and starts it again on the same
    /// port with the same data directory.
    pub async fn restart(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let persistence: &[&str] = if self.aof {
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]
        } else {
            &["--appendonly", "no", "--save", ""]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(persistence)
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--logfile"])
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start redis-server ({e}); scripts/proof and scripts/test install it"
                )
            })?;
        self.child = Some(child);
        for _ in 0..200 {
            if ping(self.addr()).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        Err(format!(
            "redis-server did not answer on port {}: {}",
            self.port,
            tail.join(" | ")
        ))
    }
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await, Ok(Ok(_)) if &buf == b"+PONG\r\n")
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
