//! Servers a proof run starts for itself, so it can crash and restart them: Redis, etcd,
//! ZooKeeper, PostgreSQL and MariaDB, each from its Debian package, on free loopback ports with
//! data in the run's directory.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Which server, and how it keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `redis-server`: no persistence, or (with `aof`) an append-only file synced on every write.
    Redis {
        /// Append-only file with `appendfsync always`.
        aof: bool,
    },
    /// A single-node `etcd` (its write-ahead log is always synced).
    Etcd,
    /// A single-node ZooKeeper (its transaction log is always synced).
    Zookeeper,
    /// A PostgreSQL cluster of its own (`initdb` into the run's directory; commits synced, the
    /// defaults), run as the `postgres` user when started as root. A crash kills the
    /// postmaster; its backends end on their own when they see it gone.
    Postgres,
    /// A MariaDB server of its own (`mariadb-install-db` into the run's directory, its own
    /// socket there; InnoDB writes and flushes its log at every commit, the default), with a
    /// user `proof` (no password) that owns the database `proof`. A crash is a kill -9 of
    /// `mariadbd`; it restarts on the same data, with InnoDB's crash recovery.
    Mariadb,
}

/// A throwaway server on loopback.
#[derive(Debug)]
pub struct Server {
    kind: ServerKind,
    dir: PathBuf,
    port: u16,
    /// A second port (etcd's peer port), when the server needs one.
    extra_port: u16,
    child: Option<Child>,
    /// Extra environment of the server process (a [clock shim](clock_shim)).
    env: Vec<(OsString, OsString)>,
}

impl Server {
    /// Starts a server with its data in `dir`.
    pub async fn start(kind: ServerKind, dir: &Path) -> Result<Server, String> {
        Server::start_with_env(kind, dir, Vec::new()).await
    }

    /// Starts a server with its data in `dir` and `env` added to its environment (on every
    /// start, restarts included).
    pub async fn start_with_env(
        kind: ServerKind,
        dir: &Path,
        env: Vec<(OsString, OsString)>,
    ) -> Result<Server, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut last = String::new();
        for _ in 0..3 {
            let mut server = Server {
                kind,
                dir: dir.into(),
                port: free_port().map_err(|e| e.to_string())?,
                extra_port: free_port().map_err(|e| e.to_string())?,
                child: None,
                env: env.clone(),
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL: a crash, no chance to save) and starts it again on the same
    /// ports with the same data directory.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill().await;
        self.spawn().await
    }

    /// Kills the server (SIGKILL) and leaves it down; [`Server::start_again`] brings it back.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts a server that was [killed](Server::kill) again, on the same ports and data.
    pub async fn start_again(&mut self) -> Result<(), String> {
        self.kill().await;
        self.spawn().await
    }

    /// The server process's id while it runs (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn command(&self) -> Result<Command, String> {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            ServerKind::Redis { aof } => {
                let mut c = Command::new("redis-server");
                c.args(["--bind", "127.0.0.1", "--port", &port]);
                if aof {
                    c.args([
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                        "--save",
                        "",
                    ]);
                } else {
                    c.args(["--appendonly", "no", "--save", ""]);
                }
                // A replica (the failover runs) syncs at once, not after the default 5 s wait
                // for more replicas.
                c.args(["--repl-diskless-sync-delay", "0"]);
                c.arg("--dir").arg(&self.dir);
                c.args(["--daemonize", "no", "--logfile"])
                    .arg(self.dir.join("server.log"));
                c
            }
            ServerKind::Etcd => {
                let client = format!("http://127.0.0.1:{}", self.port);
                let peer = format!("http://127.0.0.1:{}", self.extra_port);
                let mut c = Command::new("etcd");
                c.args(["--name", "proof", "--data-dir"])
                    .arg(self.dir.join("data"))
                    .args([
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                    ])
                    .args([
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                    ])
                    .args(["--initial-cluster", &format!("proof={peer}")])
                    .args(["--logger", "zap", "--log-outputs", "stderr"]);
                c
            }
            ServerKind::Zookeeper => {
                let cfg = self.dir.join("zoo.cfg");
                let data = self.dir.join("data");
                std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
                std::fs::write(
                    &cfg,
                    format!(
                        "tickTime=200\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\n\
                         clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                         minSessionTimeout=400\nmaxSessionTimeout=60000\n\
                         4lw.commands.whitelist=ruok\n",
                        data.display(),
                        self.port
                    ),
                )
                .map_err(|e| e.to_string())?;
                let mut c = Command::new("java");
                c.args(["-cp", "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"])
                    .arg(format!("-Dzookeeper.log.dir={}", self.dir.display()))
                    .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                    .arg(&cfg);
                c
            }
            ServerKind::Postgres => {
                let mut c = Command::new(pg_bin()?.join("postgres"));
                c.arg("-D")
                    .arg(self.dir.join("data"))
                    .args(["-c", "listen_addresses=127.0.0.1", "-c"])
                    .arg(format!("port={port}"))
                    .args([
                        "-c",
                        "unix_socket_directories=",
                        "-c",
                        "max_connections=100",
                    ]);
                as_postgres_user(&mut c)?;
                c
            }
            ServerKind::Mariadb => {
                let path = |name: &str| self.dir.join(name).display().to_string();
                let mut c = Command::new("mariadbd");
                c.arg("--no-defaults");
                if rustix::process::geteuid().is_root() {
                    c.arg("--user=root");
                }
                c.arg(format!("--datadir={}", path("data")))
                    .arg(format!("--socket={}", path("mariadb.sock")))
                    .arg(format!("--pid-file={}", path("mariadb.pid")))
                    .arg(format!("--log-error={}", path("server.log")))
                    .arg(format!("--init-file={}", path("init.sql")))
                    .args(["--bind-address=127.0.0.1", &format!("--port={port}")])
                    .args(["--skip-name-resolve", "--max-connections=200"])
                    .arg("--innodb-flush-log-at-trx-commit=1");
                c
            }
        };
        let out = std::fs::File::create(self.dir.join("server.out")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Creates the PostgreSQL cluster in `dir/data`, owned by the user the server runs as.
    async fn initdb(&self) -> Result<(), String> {
        let data = self.dir.join("data");
        if data.join("PG_VERSION").exists() {
            return Ok(());
        }
        if let Some((uid, gid)) = postgres_user()? {
            chown(&self.dir, uid, gid)?;
        }
        let mut c = Command::new(pg_bin()?.join("initdb"));
        c.arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("initdb.log")).map_err(|e| e.to_string())?);
        as_postgres_user(&mut c)?;
        let status = c
            .status()
            .await
            .map_err(|e| format!("cannot run initdb: {e}; scripts/proof installs PostgreSQL"))?;
        if !status.success() {
            let log = std::fs::read_to_string(self.dir.join("initdb.log")).unwrap_or_default();
            return Err(format!("initdb failed ({status}): {}", log.trim()));
        }
        Ok(())
    }

    /// Creates the MariaDB data directory (once) and the file of statements the server runs at
    /// every start: the `proof` user and database.
    async fn install_mariadb(&self) -> Result<(), String> {
        std::fs::write(
            self.dir.join("init.sql"),
            "CREATE DATABASE IF NOT EXISTS proof;\n\
             CREATE USER IF NOT EXISTS 'proof'@'127.0.0.1';\n\
             GRANT ALL PRIVILEGES ON proof.* TO 'proof'@'127.0.0.1';\n",
        )
        .map_err(|e| e.to_string())?;
        let done = self.dir.join("installed");
        if done.exists() {
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        let mut c = Command::new("mariadb-install-db");
        c.arg("--no-defaults");
        if rustix::process::geteuid().is_root() {
            c.arg("--user=root");
        }
        c.arg(format!("--datadir={}", self.dir.join("data").display()))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("install.log")).map_err(|e| e.to_string())?,
            );
        let status = c.status().await.map_err(|e| {
            format!("cannot run mariadb-install-db: {e}; scripts/proof installs MariaDB")
        })?;
        if !status.success() {
            let log = std::fs::read_to_string(self.dir.join("install.log")).unwrap_or_default();
            return Err(format!(
                "mariadb-install-db failed ({status}): {}",
                log.trim()
            ));
        }
        std::fs::write(done, b"").map_err(|e| e.to_string())
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let program = match self.kind {
            ServerKind::Redis { .. } => "redis-server (Debian redis-server)",
            ServerKind::Etcd => "etcd (Debian etcd-server)",
            ServerKind::Zookeeper => "ZooKeeper (Debian zookeeper, with java)",
            ServerKind::Postgres => "PostgreSQL (Debian postgresql)",
            ServerKind::Mariadb => "mariadbd (Debian mariadb-server)",
        };
        match self.kind {
            ServerKind::Postgres => self.initdb().await?,
            ServerKind::Mariadb => self.install_mariadb().await?,
            _ => {}
        }
        let child = self
            .command()?
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}; scripts/proof installs it"))?;
        self.child = Some(child);
        for _ in 0..600 {
            if self.ready().await {
                return Ok(());
            }
            // A PostgreSQL restarted after a crash refuses to start while a backend of the
            // killed postmaster still holds the old shared memory; those end within moments.
            if self.kind == ServerKind::Postgres {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(_)) = child.try_wait() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        self.child = Some(self.command()?.spawn().map_err(|e| {
                            format!("cannot start {program}: {e}; scripts/proof installs it")
                        })?);
                        continue;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = if self.kind == ServerKind::Mariadb {
            "server.log"
        } else {
            "server.out"
        };
        let out = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let tail: Vec<&str> = out.lines().rev().take(3).collect();
        Err(format!(
            "{program} did not answer on port {}: {}",
            self.port,
            tail.join(" | ")
        ))
    }

    async fn ready(&self) -> bool {
        let (request, expect): (&[u8], &[u8]) = match self.kind {
            ServerKind::Redis { .. } => (b"PING\r\n", b"+PONG"),
            ServerKind::Etcd => (
                b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                b"HTTP/1.0 200",
            ),
            ServerKind::Zookeeper => (b"ruok", b"imok"),
            // A startup message for the trusted superuser: AuthenticationOk once the server
            // accepts connections (an error while it starts up or recovers).
            ServerKind::Postgres => (&PG_STARTUP, b"R\0\0\0\x08\0\0\0\0"),
            // The server speaks first: a handshake packet (sequence 0, protocol version 10; its
            // three length bytes vary), or an error packet while it cannot take connections.
            ServerKind::Mariadb => (b"", b"???\0\x0a"),
        };
        exchange(self.addr(), request, expect).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // PostgreSQL: an immediate shutdown (SIGQUIT) ends the backends and removes the shared
        // memory, which a SIGKILL of the postmaster would leave behind.
        if self.kind != ServerKind::Postgres {
            return;
        }
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Some(pid) = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
            for _ in 0..200 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The clock shim's C source (see the file's comment).
const CLOCK_SHIM_C: &str = include_str!("clock_shim.c");

/// Builds the clock shim into `dir` with the machine's C compiler (`$CC`, else `cc`) and returns
/// the library's path. A server started with `LD_PRELOAD` set to it and
/// `FENCED_PROOF_CLOCK_FILE` naming a file sees its wall clock moved by the seconds that file
/// holds (`+3600`), read again every 10 ms; its monotonic clocks stay true. libfaketime does the
/// same for the workers but hangs inside `redis-server` (its jemalloc reads the clock while
/// libfaketime resolves the real functions).
pub fn clock_shim(dir: &Path) -> Result<PathBuf, String> {
    let source = dir.join("clock_shim.c");
    let library = dir.join("libfenced_clock.so");
    std::fs::write(&source, CLOCK_SHIM_C).map_err(|e| format!("{}: {e}", source.display()))?;
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .map_err(|e| {
            format!(
                "cannot run the C compiler {} to build the clock shim: {e} (Debian gcc)",
                cc.to_string_lossy()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "building the clock shim failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(library)
}

/// The PostgreSQL protocol 3.0 startup message for user `postgres`, database `postgres`.
const PG_STARTUP: [u8; 41] = *b"\0\0\0\x29\0\x03\0\0user\0postgres\0database\0postgres\0\0";

/// The directory of the newest installed PostgreSQL's binaries (Debian's layout).
fn pg_bin() -> Result<PathBuf, String> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL is not installed (Debian package `postgresql`); scripts/proof installs it"
                .to_string()
        })?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no /usr/lib/postgresql/*/bin/initdb; install the Debian package `postgresql`".into()
    })
}

/// The `postgres` user's uid and gid when this process is root (PostgreSQL refuses to run as
/// root); `None` otherwise, when the server runs as the current user.
fn postgres_user() -> Result<Option<(u32, u32)>, String> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == "postgres")
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
        })
        .map(Some)
        .ok_or_else(|| {
            "the postgres system user is missing; install the Debian package `postgresql`".into()
        })
}

/// Runs `cmd` as the `postgres` user when this process is root.
fn as_postgres_user(cmd: &mut Command) -> Result<(), String> {
    if let Some((uid, gid)) = postgres_user()? {
        cmd.uid(uid).gid(gid);
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot hand {} to the postgres user: {e}", path.display()))
}

/// Sends `request` (if any) and checks that the answer starts with `expect`, where `?` matches
/// any byte.
async fn exchange(addr: SocketAddr, request: &[u8], expect: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if !request.is_empty() && s.write_all(request).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; expect.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf.iter().zip(expect).all(|(b, e)| b == e || *e == b'?')
    )
}

/// Sends one command to the Redis server at `addr` and returns its reply: a simple string,
/// integer or bulk string as text; an error reply or no answer within 5 s is an error.
pub async fn redis_command(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    let what = || format!("redis {addr} {}", args.join(" "));
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the connection closed before a whole reply".to_string());
            }
            reply.extend_from_slice(&buf[..n]);
            if let Some(done) = resp_reply(&reply) {
                return done;
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(format!("{}: {e}", what())),
        Err(_) => Err(format!("{}: no answer within 5 s", what())),
    }
}

/// One whole RESP reply in `bytes`, if it has all arrived.
fn resp_reply(bytes: &[u8]) -> Option<Result<String, String>> {
    let end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&bytes[1..end]).into_owned();
    match bytes.first()? {
        b'+' | b':' => Some(Ok(line)),
        b'-' => Some(Err(line)),
        b'$' => {
            let Ok(len) = line.parse::<i64>() else {
                return Some(Err(format!("a bad bulk length {line:?}")));
            };
            let Ok(len) = usize::try_from(len) else {
                return Some(Ok(String::new()));
            };
            let body = bytes.get(end + 2..end + 2 + len)?;
            Some(Ok(String::from_utf8_lossy(body).into_owned()))
        }
        _ => Some(Err(format!("an unexpected reply {line:?}"))),
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
