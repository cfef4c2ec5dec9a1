//! The named fault scenarios, what each is expected to show per backend (written down before
//! anything runs), and the driver that runs one.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::checker::{Findings, check};
use crate::history::{FaultEvent, LineLog, WorkerEvent, now_ns, read_lines};
use crate::proxy::{Direction, Fault, FaultProxy};
use crate::resource::{Directive, Phase, Resource, Trigger};
use crate::server::{Server, ServerKind, clock_shim, redis_command};

/// The backends the proof suite covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// In-process store; workers are threads of one process.
    Memory,
    /// The embedded SQLite store; workers are processes sharing one file.
    Sqlite,
    /// One Redis server; workers are processes, each behind its own fault proxy.
    Redis,
    /// One etcd node; workers are processes, each behind its own fault proxy.
    Etcd,
    /// One ZooKeeper node; workers are processes, each behind its own fault proxy.
    Zookeeper,
    /// One PostgreSQL server in lease mode (a row whose expiry the database's clock sets);
    /// workers are processes, each behind its own fault proxy.
    PostgresLease,
    /// One PostgreSQL server in session mode (the row plus an advisory lock on the client's
    /// dedicated connection, which the server ends after `session_timeout` of silence).
    PostgresSession,
    /// One MariaDB server in lease mode (a row whose expiry the database's clock sets, a bell
    /// named lock to wake waiters); workers are processes, each behind its own fault proxy.
    MysqlLease,
    /// One MariaDB server in session mode (the row plus a `GET_LOCK` named lock on the client's
    /// dedicated connection, which the server ends after `wait_timeout` of silence).
    MysqlSession,
    /// Redlock over three Redis servers (no persistence); workers are processes, each behind
    /// its own fault proxy to every node.
    Redlock,
    /// A Redis primary with one replica (no persistence), plain locks: replication is
    /// asynchronous, and the replica's link runs [`REPLICATION_LAG`] behind (through a fault
    /// proxy). Workers are processes, each behind its own fault proxy to the primary, which
    /// the failover points at the promoted replica.
    RedisReplicated,
    /// The same primary and replica, with `min_replicas=1`: a grant or extension counts only
    /// once the replica acknowledged it (`WAIT 1`).
    RedisMinReplicas,
}

impl BackendKind {
    /// All of them.
    pub const ALL: [BackendKind; 12] = [
        BackendKind::Memory,
        BackendKind::Sqlite,
        BackendKind::Redis,
        BackendKind::Etcd,
        BackendKind::Zookeeper,
        BackendKind::PostgresLease,
        BackendKind::PostgresSession,
        BackendKind::MysqlLease,
        BackendKind::MysqlSession,
        BackendKind::Redlock,
        BackendKind::RedisReplicated,
        BackendKind::RedisMinReplicas,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Sqlite => "sqlite",
            BackendKind::Redis => "redis",
            BackendKind::Etcd => "etcd",
            BackendKind::Zookeeper => "zookeeper",
            BackendKind::PostgresLease => "postgres-lease",
            BackendKind::PostgresSession => "postgres-session",
            BackendKind::MysqlLease => "mysql-lease",
            BackendKind::MysqlSession => "mysql-session",
            BackendKind::Redlock => "redlock",
            BackendKind::RedisReplicated => "redis-replicated",
            BackendKind::RedisMinReplicas => "redis-min-replicas",
        }
    }

    /// The lease its runs use for a wanted one: etcd session leases are whole seconds, at least
    /// [`ETCD_MIN_SESSION`]; an SQL session timeout is at least [`SQL_MIN_SESSION`] (the
    /// session is that long and a session-mode grant nine tenths of it), and whole seconds on
    /// MySQL (its `wait_timeout`, which the backend rounds up).
    pub fn lease(self, wanted: Duration) -> Duration {
        let whole_seconds = |d: Duration| Duration::from_secs(d.as_secs_f64().ceil() as u64);
        match self {
            BackendKind::Etcd => whole_seconds(wanted.max(ETCD_MIN_SESSION)),
            BackendKind::PostgresSession => wanted.max(SQL_MIN_SESSION),
            BackendKind::MysqlSession => whole_seconds(wanted.max(SQL_MIN_SESSION)),
            _ => wanted,
        }
    }

    /// How many servers it runs on.
    pub fn nodes(self) -> usize {
        match self {
            BackendKind::Redlock => REDLOCK_NODES,
            BackendKind::RedisReplicated | BackendKind::RedisMinReplicas => 2,
            _ => 1,
        }
    }

    /// Whether it runs on a Redis primary with a replica (the failover runs).
    pub fn replicated(self) -> bool {
        matches!(
            self,
            BackendKind::RedisReplicated | BackendKind::RedisMinReplicas
        )
    }

    /// Whether it runs behind a network server.
    pub fn networked(self) -> bool {
        !matches!(self, BackendKind::Memory | BackendKind::Sqlite)
    }
}

/// The faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The holder is killed (SIGKILL) in the middle of its critical section. Memory: the grant
    /// is dropped without a release and the worker ends.
    Kill,
    /// The holder is stopped (SIGSTOP) right after it checked that its lock is valid and before
    /// its write, for twice the lease, then continued: the "GC pause". Memory: its thread blocks.
    Pause,
    /// 200 ms are added each way on the holder's connection for two leases, during a section that
    /// lasts two leases.
    Latency,
    /// The holder's connection is cut both ways (bytes held, as TCP would retransmit them) for
    /// two leases during a section that lasts three.
    Partition,
    /// Only client→server is cut (requests do not arrive).
    OnewayUp,
    /// Only server→client is cut (the server acts, the answers do not arrive).
    OnewayDown,
    /// The holder's connections are reset (RST) mid-section, and new ones for 200 ms.
    Reset,
    /// The server is killed (SIGKILL) and restarted while the lock is held: Redis without
    /// persistence; etcd and ZooKeeper with their always-synced logs.
    Restart,
    /// The server is killed and restarted with an append-only file synced on every write.
    RestartAof,
    /// Every worker's wall clock jumps +1 h mid-section, and back three leases later, while other
    /// workers hold the lock (libfaketime).
    ClockJump,
    /// Redlock: one node is cut off from every worker (both ways) for two leases mid-section.
    NodePartition,
    /// Redlock: one node's wall clock jumps an hour ahead while a holder holds (its keys
    /// expire there at once), and back three leases later; the node's monotonic clock and the
    /// workers' clocks stay true.
    NodeClockJump,
    /// Redlock: the same jump on two nodes of three, a majority, right after a holder checked
    /// its lock; the holder's write is answered once another worker has read, or after two
    /// leases.
    MajorityClockJump,
    /// Redis with a replica: right after a holder checked its lock (before its write), the
    /// primary is killed, the replica promoted (`REPLICAOF NO ONE`) and the clients' proxies
    /// pointed at it. The holder's write is answered once another worker has read the
    /// resource, or after two leases; then the old primary comes back empty as the new
    /// primary's replica.
    Failover,
}

impl Scenario {
    /// All of them.
    pub const ALL: [Scenario; 14] = [
        Scenario::Kill,
        Scenario::Pause,
        Scenario::Latency,
        Scenario::Partition,
        Scenario::OnewayUp,
        Scenario::OnewayDown,
        Scenario::Reset,
        Scenario::Restart,
        Scenario::RestartAof,
        Scenario::ClockJump,
        Scenario::NodePartition,
        Scenario::NodeClockJump,
        Scenario::MajorityClockJump,
        Scenario::Failover,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Pause => "pause",
            Scenario::Latency => "latency",
            Scenario::Partition => "partition",
            Scenario::OnewayUp => "oneway-up",
            Scenario::OnewayDown => "oneway-down",
            Scenario::Reset => "reset",
            Scenario::Restart => "restart",
            Scenario::RestartAof => "restart-aof",
            Scenario::ClockJump => "clock-jump",
            Scenario::NodePartition => "node-partition",
            Scenario::NodeClockJump => "node-clock-jump",
            Scenario::MajorityClockJump => "majority-clock-jump",
            Scenario::Failover => "failover",
        }
    }

    /// How many servers' wall clocks it moves (the first ones); 0 for the rest.
    pub fn jumped_nodes(self) -> usize {
        match self {
            Scenario::NodeClockJump => 1,
            Scenario::MajorityClockJump => 2,
            _ => 0,
        }
    }

    /// Whether it moves a server's clock (the servers then run with the clock shim).
    pub fn node_clock(self) -> bool {
        self.jumped_nodes() > 0
    }

    /// Whether it means anything on `backend` (network faults need a network).
    pub fn applies_to(self, backend: BackendKind) -> bool {
        // The replicated set-ups are there for the failover; everything else they would show
        // is the single server's.
        if backend.replicated() || self == Scenario::Failover {
            return backend.replicated() && self == Scenario::Failover;
        }
        match self {
            Scenario::Kill | Scenario::Pause | Scenario::ClockJump => true,
            // Only Redis offers a choice of persistence; etcd and ZooKeeper always sync their log.
            Scenario::RestartAof => matches!(backend, BackendKind::Redis | BackendKind::Redlock),
            Scenario::NodePartition | Scenario::NodeClockJump | Scenario::MajorityClockJump => {
                backend == BackendKind::Redlock
            }
            _ => backend.networked(),
        }
    }
}

/// Whether something may, must or must not show in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Must not happen: seeing it fails the run.
    Never,
    /// May happen.
    Possible,
    /// The scenario is built to produce it: not seeing it fails the run (the fault missed).
    Certain,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Never => "never",
            Expect::Possible => "possible",
            Expect::Certain => "certain",
        })
    }
}

/// What a scenario is expected to show on a backend, decided before running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Expectation {
    /// A second holder acting on the resource while the first still acts (interleaved sections).
    pub overlap: Expect,
    /// Two grants certainly valid at the same moment (the server broke a lease).
    pub double_grant: Expect,
    /// Whether every superseded holder must be told before the new holder acts.
    pub lost_timely: bool,
    /// Why.
    pub why: &'static str,
}

/// The expectations, per backend and scenario.
pub fn expectation(backend: BackendKind, scenario: Scenario) -> Expectation {
    use Expect::*;
    let e = |overlap, double_grant, lost_timely, why| Expectation {
        overlap,
        double_grant,
        lost_timely,
        why,
    };
    // Nothing may go wrong, and a superseded holder must learn it first.
    let safe = |why| e(Never, Never, true, why);
    use BackendKind::{
        MysqlLease, MysqlSession, PostgresLease, PostgresSession, RedisMinReplicas,
        RedisReplicated, Redlock,
    };
    match (scenario, backend) {
        (Scenario::Failover, RedisReplicated) => e(
            Possible,
            Possible,
            false,
            "replication is asynchronous, and here the replica is 150 ms behind: the promoted replica has the lock as it stood 150 ms before the crash (free, or an earlier holder's key that then expires), not the holder's grant, so a waiter can be granted while the holder still holds and acts; the holder's next renewal finds the key gone or another's and tells it, possibly after the new holder acted; the new primary's tokens follow its clock, above the old holder's, so fencing refuses the old holder's write",
        ),
        (Scenario::Failover, RedisMinReplicas) => safe(
            "every grant and extension counted only once the replica acknowledged it (WAIT 1), so the promoted replica has the holder's key with its expiry and no waiter is granted before it ends; the holder's renewals reach the new primary but go unconfirmed until its new replica (the old primary, back empty after the holder's write) acknowledges them, so the holder stops at its deadline, before the key expires",
        ),
        (Scenario::Restart, Redlock) => e(
            Possible,
            Possible,
            false,
            "one node of three crashes and comes back empty at once, breaking the delayed-restart rule: a lock held on a bare majority that included it (the third node still held the previous grant, or answered late) is then held on one node, and another client can assemble a majority with the empty node: two holders; the new token comes from the empty node's counter, which restarts from its clock, so it is above the old holder's and fencing refuses the old holder's writes",
        ),
        (Scenario::NodePartition, Redlock) => safe(
            "one node of three answers no one for two leases: grants, renewals and releases go on with the other two (each step waits at most node_timeout for the silent node)",
        ),
        (Scenario::Latency, Redlock) => safe(
            "200 ms each way on all of the holder's node connections, more than node_timeout (100 ms): its renewals get no confirmations in time, so it stops at its deadline, before the nodes' keys expire",
        ),
        (Scenario::Kill, MysqlLease) => safe(
            "the dead holder's row stays held until its expiry (the database's clock); its bell (a named lock on its connection) is freed as the connection closes, so the waiters look, find the row still held, and their timers wake them at its expiry",
        ),
        (Scenario::Kill, MysqlSession) => safe(
            "the dead holder's connection closes with its process: the server ends the session, which frees its GET_LOCK and its bell at once; a waiter wakes, takes the GET_LOCK and takes over the row of the ended session",
        ),
        (Scenario::Pause, MysqlSession) => e(
            Certain,
            Never,
            false,
            "the stopped holder's dedicated connection falls silent: the server ends it after wait_timeout (session_timeout, one lease, whole seconds; the grant lasted nine tenths of it and the silence began at the last statement, no earlier than the last renewal), which frees the GET_LOCK and the bell; a waiter takes over and acts; the stopped one writes when it resumes and only the fencing token stops that write; it learns of the loss once it runs again",
        ),
        (Scenario::Latency, MysqlSession) => e(
            Never,
            Possible,
            true,
            "200 ms each way makes every round trip (400 ms) longer than the statement timeout (a third of the session): the first renewal or keep-alive times out and the client drops the dedicated connection, reporting the session ended (lost signal) at once; its close reaches the server at least 200 ms later, which frees the lock then, possibly before the grant's deadline (a double grant by the deadline, by design of session mode)",
        ),
        (Scenario::Partition | Scenario::OnewayUp, MysqlSession) => safe(
            "no statement arrives: the client's next renewal or keep-alive (within a third of the grant) times out after a third of the session and the client ends the session itself (lost signal); the server still sees the proxy's connection alive and ends it only after wait_timeout of silence (one session after the last statement that arrived), after the holder's deadline, which then frees the lock",
        ),
        (Scenario::OnewayDown, MysqlSession) => e(
            Never,
            Possible,
            true,
            "statements arrive but their answers do not: the first one to time out (a third of the session) makes the client report the session ended (lost signal) and close the connection; that close does arrive, so the server frees the GET_LOCK then, possibly before the grant's deadline (a double grant by the deadline)",
        ),
        (Scenario::Reset, MysqlSession) => e(
            Never,
            Possible,
            false,
            "the reset ends the dedicated connection: the server frees the GET_LOCK and the bell at once and a waiter takes over within milliseconds, possibly before the grant's deadline (a double grant by the deadline); the holder's client reads nothing on an idle connection, so it sees the reset only at its next statement (a renewal every third of the grant, a keep-alive every third of the session) and may be told after the new holder acted; told well within its section, it never writes",
        ),
        (Scenario::Restart, MysqlLease) => safe(
            "the lock table is InnoDB, which writes and flushes its log at every commit before answering (innodb_flush_log_at_trx_commit=1), so the row survives the crash with its expiry from the database's clock; the holder renews after the restart or stops at its deadline, before the row expires",
        ),
        (Scenario::Restart, MysqlSession) => e(
            Never,
            Possible,
            false,
            "the InnoDB rows survive the crash, but every connection ends and the restarted server (back within a fraction of a second) holds no named locks: a waiter takes the row of the ended session over as soon as it reconnects, possibly before the grant's deadline (a double grant by the deadline); the holder's client sees its broken connection only at its next statement (a renewal every third of the grant), which may come after the new holder acted; told well within its section, it never writes",
        ),
        (Scenario::Kill, PostgresSession) => safe(
            "the dead holder's connection closes with its process: the server ends its session, which frees the advisory lock at once, and the next waiter gets the lock when it next tries",
        ),
        (Scenario::Pause, PostgresSession) => e(
            Certain,
            Never,
            false,
            "the stopped holder's connection falls silent: the server ends it after session_timeout (idle_session_timeout, one lease; the grant lasted nine tenths of it), which frees the advisory lock, and another holder acts; the stopped one writes when it resumes and only the fencing token stops that write; it learns of the loss once it runs again",
        ),
        (Scenario::Pause, PostgresLease | MysqlLease) => e(
            Certain,
            Never,
            false,
            "the row's expiry, set by the database's clock, passes while the holder is stopped: another holder acts, and the stopped one writes when it resumes; only the fencing token stops that write; its lost signal can only fire once it runs again",
        ),
        (Scenario::Latency, PostgresSession) => safe(
            "200 ms each way makes every round trip (400 ms) longer than the statement timeout (a third of the session), so renewals fail and the holder must stop at its deadline; the renewals still arrive, so the server keeps the session and the row until the holder releases",
        ),
        (Scenario::Partition | Scenario::OnewayUp, PostgresSession) => safe(
            "no statement arrives, so the holder's deadline (nine tenths of the session after its last renewal was sent) passes first; the server still sees the proxy's connection alive and ends the silent session only after session_timeout, which then frees the lock",
        ),
        (Scenario::OnewayDown, PostgresSession) => safe(
            "renewals arrive (the session is not silent and the row's lease is extended) but their answers do not; the holder stops at its deadline, and the server keeps the lock until its release arrives or the row's lease ends",
        ),
        (Scenario::Reset, PostgresSession) => e(
            Never,
            Possible,
            true,
            "the reset ends the dedicated connection, and with it the session and its advisory lock: the server frees the lock at once, possibly before the grant's deadline (a double grant by the deadline, by design of session mode); the holder's client sees the same reset and is told (lost signal) before the next holder can act",
        ),
        (Scenario::Restart, PostgresLease) => safe(
            "the lock table is on disk (commits are synced before they are answered), so the lock survives the crash with its expiry from the database's clock; the holder renews after the restart or stops at its deadline, before the row expires",
        ),
        (Scenario::Restart, PostgresSession) => e(
            Never,
            Possible,
            true,
            "the rows survive the crash but every session ends and the restarted server holds no advisory locks, so a session-mode lock is free as soon as the server is back, possibly before the grant's deadline (a double grant by the deadline); the holder's connection breaks with the crash, so it is told before the server is back",
        ),
        (Scenario::Kill, BackendKind::Sqlite) => safe(
            "a dead holder's lock is taken over at once (its process is gone) or when its lease ends",
        ),
        (Scenario::Kill, _) => {
            safe("the lock stays held until its lease ends, then the next waiter gets it")
        }
        (Scenario::Pause, _) => e(
            Certain,
            Never,
            false,
            "a lease cannot outlive a stopped holder: the lease ends, another holder acts, and the stopped one writes when it resumes; only the fencing token stops that write; its lost signal can only fire once it runs again",
        ),
        (Scenario::Latency, _) => safe(
            "200 ms each way on the holder's connection: renewal usually keeps up; a holder that falls behind must learn it before anyone else acts",
        ),
        (Scenario::Partition | Scenario::OnewayUp, _) => safe(
            "renewals do not arrive; the holder's deadline passes before the server's expiry, so it stops first",
        ),
        (Scenario::OnewayDown, _) => safe(
            "renewals arrive but their answers do not; the holder stops at its deadline, and the server keeps the lock until it expires",
        ),
        (Scenario::Reset, _) => safe("the client reconnects and renews before the lease ends"),
        (Scenario::Restart, BackendKind::Etcd | BackendKind::Zookeeper) => safe(
            "the server syncs its log before it answers, so the lock survives a crash; sessions get a fresh timeout after the restart and the clients reconnect within it",
        ),
        (Scenario::Restart, _) => e(
            Possible,
            Possible,
            false,
            "without persistence the restarted server has forgotten the lock: a second holder is possible until the first one's renewal finds the key gone; tokens stay above the old ones (they include the server clock), so fencing rejects the old holder",
        ),
        (Scenario::RestartAof, _) => {
            safe("the lock and its expiry are on disk before the grant is answered")
        }
        (Scenario::ClockJump, _) => safe(
            "fenced measures leases with the monotonic clock, so wall-clock jumps do not matter",
        ),
        (Scenario::NodeClockJump, Redlock) => e(
            Possible,
            Possible,
            false,
            "the jumped node drops its keys at once, as a node restarting empty would: a lock held on all three nodes keeps a majority and its holder's renewals succeed on the other two, but a lock held on a bare majority that included the jumped node (one node answered late, or a competing waiter held it at the grant) is then held on one node, and another client can assemble a majority with the jumped node: two holders; the node's fence counter survives the jump, so tokens keep rising and fencing refuses the old holder's write",
        ),
        (Scenario::MajorityClockJump, Redlock) => e(
            Certain,
            Possible,
            false,
            "two nodes of three drop the holder's keys at once, so the next waiter to try assembles a majority while the holder still acts: two holders, whatever the client does (Redlock assumes clocks that do not jump); the holder's renewals fail from the jump on, so its deadline may have passed before the waiter tries (then the two grants were not both valid at one instant, but the holder still writes late); the counters survive on every node, so the new token is above the old one and fencing refuses the old holder's write",
        ),
        (Scenario::NodePartition | Scenario::NodeClockJump | Scenario::MajorityClockJump, _) => {
            safe("not run: the backend has one server")
        }
        (Scenario::Failover, _) => safe("not run: the backend has no replica"),
    }
}

/// The shortest session TTL etcd accepts; etcd runs use it as their lease when the setup's is
/// shorter.
pub const ETCD_MIN_SESSION: Duration = Duration::from_secs(2);

/// How many Redis servers a Redlock run uses.
pub const REDLOCK_NODES: usize = 3;

/// How far the replica's link lags behind the primary in the failover runs, each way.
pub const REPLICATION_LAG: Duration = Duration::from_millis(150);

/// The shortest `session_timeout` the SQL backends accept.
pub const SQL_MIN_SESSION: Duration = Duration::from_secs(1);

/// Settings shared by every run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `fenced-proof` binary (workers are its `worker` subcommand).
    pub worker_exe: PathBuf,
    /// Where runs keep their files.
    pub out: PathBuf,
    /// Lease of every grant.
    pub lease: Duration,
    /// Length of a usual critical section.
    pub hold: Duration,
    /// Worker processes (threads for memory).
    pub workers: u32,
    /// Seed for the fault's timing and target.
    pub seed: u64,
    /// libfaketime, for the clock scenario.
    pub faketime: Option<PathBuf>,
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Backend.
    pub backend: BackendKind,
    /// Scenario.
    pub scenario: Scenario,
    /// Whether the resource enforced fencing tokens.
    pub fencing: bool,
    /// The lease of the run's grants, in milliseconds.
    pub lease_ms: u64,
    /// Seed.
    pub seed: u64,
    /// What was expected.
    pub expected: Expectation,
    /// What the history shows.
    pub findings: Findings,
    /// Whether a lock was still held once every worker had ended and every lease had run out.
    pub left_held: bool,
    /// Problems with the run itself (fault never triggered, a worker hung or crashed).
    pub run_errors: Vec<String>,
    /// Everything that contradicts the expectation; empty when the run passed.
    pub violations: Vec<String>,
}

impl RunReport {
    /// Whether the run held up to its expectation.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs one scenario on one backend.
pub async fn run(
    setup: &Setup,
    backend: BackendKind,
    scenario: Scenario,
    fencing: bool,
) -> RunReport {
    let name = format!(
        "{}-{}-{}",
        backend.name(),
        scenario.name(),
        if fencing { "fenced" } else { "unfenced" }
    );
    let dir = setup.out.join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = RunReport {
        backend,
        scenario,
        fencing,
        lease_ms: 0,
        seed: setup.seed,
        expected: expectation(backend, scenario),
        findings: Findings::default(),
        left_held: false,
        run_errors: Vec::new(),
        violations: Vec::new(),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        report
            .run_errors
            .push(format!("cannot create {}: {e}", dir.display()));
        report.violations = report.run_errors.clone();
        return report;
    }
    match drive(setup, backend, scenario, fencing, &dir, &mut report).await {
        Ok(()) => {}
        Err(e) => report.run_errors.push(e),
    }
    report.violations = judge(&report);
    let _ = std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    );
    report
}

/// The expectation against the findings.
fn judge(r: &RunReport) -> Vec<String> {
    let f = &r.findings;
    let mut v = r.run_errors.clone();
    let mut must = |ok: bool, what: String| {
        if !ok {
            v.push(what);
        }
    };
    must(
        f.grants >= 5,
        format!(
            "only {} grants: the run did not exercise the lock",
            f.grants
        ),
    );
    must(
        f.token_violations == 0,
        format!(
            "{} grants with a token not above earlier grants",
            f.token_violations
        ),
    );
    // Liveness: every fault heals within two leases, and a lease, or a session, ends within
    // one more; a longer wait for the next grant means the lock got stuck.
    let limit = 4.0 * r.lease_ms as f64;
    must(
        f.longest_gap_ms <= limit,
        format!(
            "the lock was not granted for {:.0} ms (more than {limit:.0} ms): stuck",
            f.longest_gap_ms
        ),
    );
    must(
        !r.left_held,
        "a lock was left held after every worker ended and every lease ran out".into(),
    );
    if r.fencing {
        must(
            f.stale_writes_accepted == 0,
            format!(
                "{} stale writes accepted with fencing on",
                f.stale_writes_accepted
            ),
        );
        must(
            f.lost_updates == 0,
            format!("{} lost updates with fencing on", f.lost_updates),
        );
    }
    let e = r.expected;
    match e.overlap {
        Expect::Never => must(
            f.overlaps == 0,
            format!(
                "{} overlapping critical sections; expected none",
                f.overlaps
            ),
        ),
        Expect::Certain => must(
            f.overlaps > 0,
            "no overlapping critical sections although the scenario forces one: the fault missed"
                .into(),
        ),
        Expect::Possible => {}
    }
    match e.double_grant {
        Expect::Never => must(
            f.grants_while_held == 0,
            format!(
                "{} grants while another grant was certainly valid",
                f.grants_while_held
            ),
        ),
        Expect::Certain => must(
            f.grants_while_held > 0,
            "no double grant although the scenario forces one".into(),
        ),
        Expect::Possible => {}
    }
    if e.lost_timely {
        must(
            f.lost_late == 0 && f.lost_never == 0,
            format!(
                "lost signal late {} and never {} times",
                f.lost_late, f.lost_never
            ),
        );
    }
    v
}

/// Everything a run starts, stopped when dropped.
struct Running {
    children: Vec<(u32, Child)>,
    /// The servers (one, Redlock's nodes, or a primary and its replica).
    servers: Vec<Server>,
    /// Per worker process, one proxy per server the clients use.
    proxies: Vec<Vec<FaultProxy>>,
    /// The replica's link to the primary, in the replicated set-ups.
    replication: Option<FaultProxy>,
}

async fn drive(
    setup: &Setup,
    backend: BackendKind,
    scenario: Scenario,
    fencing: bool,
    dir: &Path,
    report: &mut RunReport,
) -> Result<(), String> {
    let lease = backend.lease(setup.lease);
    let ms = |d: Duration| d.as_millis() as u64;
    let key = format!("proof:{}", scenario.name());
    report.lease_ms = lease.as_millis() as u64;
    let resource_log =
        Arc::new(LineLog::create(&dir.join("resource.jsonl")).map_err(|e| e.to_string())?);
    let fault_log = LineLog::create(&dir.join("faults.jsonl")).map_err(|e| e.to_string())?;
    let resource = Resource::start(fencing, resource_log)
        .await
        .map_err(|e| e.to_string())?;
    let mut running = Running {
        children: Vec::new(),
        servers: Vec::new(),
        proxies: Vec::new(),
        replication: None,
    };

    // The backend, and the URL each worker process uses.
    let (processes, threads) = match backend {
        BackendKind::Memory => (1, setup.workers),
        _ => (setup.workers, 1),
    };
    let mut urls = Vec::new();
    let mut direct_url = match backend {
        BackendKind::Memory => format!("memory://proof-{}", scenario.name()),
        BackendKind::Sqlite => format!("sqlite://{}", dir.join("locks.db").display()),
        _ => {
            let kind = match backend {
                BackendKind::Redis
                | BackendKind::Redlock
                | BackendKind::RedisReplicated
                | BackendKind::RedisMinReplicas => ServerKind::Redis {
                    aof: scenario == Scenario::RestartAof,
                },
                BackendKind::Etcd => ServerKind::Etcd,
                BackendKind::PostgresLease | BackendKind::PostgresSession => ServerKind::Postgres,
                BackendKind::MysqlLease | BackendKind::MysqlSession => ServerKind::Mariadb,
                _ => ServerKind::Zookeeper,
            };
            // SQL session mode: the server ends a connection silent for one lease; a statement
            // may take a third of it (the longest the backends allow).
            let session = format!(
                "mode=session&session_timeout={}ms&timeout={}ms",
                ms(lease),
                ms(lease) / 3
            );
            // The node clock scenarios: every node runs with the clock shim, reading its
            // offset from a file of its own.
            let shim = if scenario.node_clock() {
                Some(clock_shim(dir)?)
            } else {
                None
            };
            for n in 0..backend.nodes() {
                let name = if backend.nodes() > 1 {
                    format!("server-{n}")
                } else {
                    "server".to_owned()
                };
                let mut env = Vec::new();
                if let Some(shim) = &shim {
                    let file = node_clock_file(dir, n);
                    std::fs::write(&file, "0\n").map_err(|e| format!("{}: {e}", file.display()))?;
                    env.push(("LD_PRELOAD".into(), shim.into()));
                    env.push(("FENCED_PROOF_CLOCK_FILE".into(), file.into()));
                }
                running
                    .servers
                    .push(Server::start_with_env(kind, &dir.join(name), env).await?);
            }
            if backend.replicated() {
                running.replication =
                    Some(replicate(&running.servers[0], &running.servers[1]).await?);
            }
            let url_one = |addr: SocketAddr| match backend {
                BackendKind::Redis | BackendKind::RedisReplicated => format!("redis://{addr}/0"),
                BackendKind::RedisMinReplicas => format!("redis://{addr}/0?min_replicas=1"),
                // Sessions end after one lease without keep-alives, like a Redis lease.
                BackendKind::Etcd => format!("etcd://{addr}?session_ttl={}s", lease.as_secs()),
                BackendKind::PostgresLease => format!("postgres://postgres@{addr}/postgres"),
                BackendKind::PostgresSession => {
                    format!("postgres://postgres@{addr}/postgres?{session}")
                }
                BackendKind::MysqlLease => format!("mysql://proof@{addr}/proof"),
                BackendKind::MysqlSession => format!("mysql://proof@{addr}/proof?{session}"),
                _ => format!("zk://{addr}?session_timeout={}ms", ms(lease)),
            };
            let url = |addrs: &[SocketAddr]| match backend {
                BackendKind::Redlock => {
                    let nodes: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                    format!("redlock://{}/0", nodes.join(","))
                }
                _ => url_one(addrs[0]),
            };
            let mut server_addrs: Vec<SocketAddr> =
                running.servers.iter().map(Server::addr).collect();
            // Clients know the primary only.
            if backend.replicated() {
                server_addrs.truncate(1);
            }
            for _ in 0..processes {
                let mut mine = Vec::new();
                for addr in &server_addrs {
                    mine.push(
                        FaultProxy::start(*addr)
                            .await
                            .map_err(|e| format!("fault proxy: {e}"))?,
                    );
                }
                let addrs: Vec<SocketAddr> = mine.iter().map(FaultProxy::addr).collect();
                urls.push(url(&addrs));
                running.proxies.push(mine);
            }
            url(&server_addrs)
        }
    };
    if urls.is_empty() {
        urls = vec![direct_url.clone(); processes as usize];
    }

    // Clock faking for the clock scenario: every worker reads its offset from this file.
    let clock_file = dir.join("faketime");
    if scenario == Scenario::ClockJump {
        if setup.faketime.is_none() {
            return Err("libfaketime is not installed (Debian package `faketime`); scripts/proof installs it".into());
        }
        std::fs::write(&clock_file, "+0\n").map_err(|e| e.to_string())?;
    }

    let mut rng =
        rand::rngs::StdRng::seed_from_u64(setup.seed ^ (scenario as u64) << 8 ^ backend as u64);
    let started = now_ns();
    let fault_at = Duration::from_millis(1000 + rng.random_range(0..500));
    let total = fault_at + lease * 6 + Duration::from_millis(500);
    let stop_at_ns = started + total.as_nanos() as u64;

    for p in 0..processes {
        let mut cmd = Command::new(&setup.worker_exe);
        cmd.arg("worker")
            .args(["--url", &urls[p as usize], "--key", &key])
            .args(["--resource", &resource.addr().to_string()])
            .arg("--history")
            .arg(dir.join(format!("worker-{p}.jsonl")))
            .args([
                "--first-worker",
                &(p * threads).to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .args([
                "--lease-ms",
                &ms(lease).to_string(),
                "--hold-ms",
                &ms(setup.hold).to_string(),
            ])
            .args(["--stop-at-ns", &stop_at_ns.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join(format!("worker-{p}.stderr")))
                    .map_err(|e| e.to_string())?,
            )
            .kill_on_drop(true);
        if scenario == Scenario::ClockJump {
            cmd.env(
                "LD_PRELOAD",
                setup.faketime.as_ref().expect("checked above"),
            )
            .env("FAKETIME_TIMESTAMP_FILE", &clock_file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        running.children.push((p, child));
    }

    // The fault, at a seeded moment, on whichever worker next reaches the fault point.
    tokio::time::sleep(fault_at).await;
    let phase = if matches!(
        scenario,
        Scenario::Pause | Scenario::Failover | Scenario::MajorityClockJump
    ) {
        Phase::Check
    } else {
        Phase::Read
    };
    let mut reads = resource.reads();
    let (fired_tx, fired_rx) = oneshot::channel();
    resource.arm(Trigger {
        phase,
        fired: fired_tx,
    });
    let window =
        Duration::from_nanos(stop_at_ns.saturating_sub(now_ns())).saturating_sub(lease * 4);
    let mut target_process = usize::MAX;
    match tokio::time::timeout(window, fired_rx).await {
        Ok(Ok((target, _grant, reply))) => {
            target_process = (target / threads) as usize;
            let fault = |kind: &str| FaultEvent {
                ns: now_ns(),
                kind: kind.into(),
                worker: Some(target),
            };
            let pid = running.children[target_process].1.id();
            let in_process = backend == BackendKind::Memory;
            // Every proxy of the target worker (one per server).
            let proxies = running.proxies.get(target_process).map(Vec::as_slice);
            let proxy = |fault: Fault| {
                for p in proxies.expect("networked runs have proxies") {
                    p.set(fault);
                }
            };
            let directive = match scenario {
                Scenario::Kill if in_process => {
                    fault_log.push(&fault("kill"));
                    Directive::Forget
                }
                Scenario::Kill => {
                    fault_log.push(&fault("kill"));
                    signal(pid, rustix::process::Signal::KILL);
                    Directive::Continue
                }
                Scenario::Pause if in_process => {
                    fault_log.push(&fault("stop"));
                    Directive::Pause(ms(lease * 2))
                }
                Scenario::Pause => {
                    fault_log.push(&fault("stop"));
                    signal(pid, rustix::process::Signal::STOP);
                    // The signal is delivered asynchronously: answer only once every thread of
                    // the worker has stopped, or its write could slip out before the pause.
                    stopped(pid).await;
                    Directive::Continue
                }
                Scenario::Latency => {
                    fault_log.push(&fault("latency"));
                    proxy(Fault::Latency(Duration::from_millis(200)));
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::Partition | Scenario::OnewayUp | Scenario::OnewayDown => {
                    fault_log.push(&fault(scenario.name()));
                    proxy(match scenario {
                        Scenario::Partition => Fault::Partition,
                        Scenario::OnewayUp => Fault::OneWay(Direction::Up),
                        _ => Fault::OneWay(Direction::Down),
                    });
                    Directive::Hold(ms(lease * 3))
                }
                Scenario::Reset => {
                    fault_log.push(&fault("reset"));
                    proxy(Fault::Reset);
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::Restart | Scenario::RestartAof => {
                    fault_log.push(&fault("restart"));
                    running
                        .servers
                        .first_mut()
                        .expect("networked runs have a server")
                        .restart()
                        .await?;
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::NodePartition => {
                    fault_log.push(&fault("node-partition"));
                    for mine in &running.proxies {
                        mine[0].set(Fault::Partition);
                    }
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::ClockJump => {
                    fault_log.push(&fault("clock+1h"));
                    std::fs::write(&clock_file, "+3600\n").map_err(|e| e.to_string())?;
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::NodeClockJump => {
                    fault_log.push(&fault("node-clock+1h"));
                    jump_node_clocks(dir, &running.servers[..scenario.jumped_nodes()], 3600)
                        .await?;
                    Directive::Hold(ms(lease * 2))
                }
                Scenario::MajorityClockJump => {
                    fault_log.push(&fault("majority-clock+1h"));
                    reads.mark_unchanged();
                    jump_node_clocks(dir, &running.servers[..scenario.jumped_nodes()], 3600)
                        .await?;
                    second_reader(&mut reads, target, lease * 2).await;
                    Directive::Continue
                }
                Scenario::Failover => {
                    fault_log.push(&fault("failover"));
                    reads.mark_unchanged();
                    fail_over(
                        &mut running.servers,
                        &running.proxies,
                        running.replication.as_ref(),
                    )
                    .await?;
                    direct_url = format!("redis://{}/0", running.servers[1].addr());
                    second_reader(&mut reads, target, lease * 2).await;
                    Directive::Continue
                }
            };
            let _ = reply.send(directive);
            // The heal.
            match scenario {
                Scenario::Pause if !in_process => {
                    tokio::time::sleep(lease * 2).await;
                    signal(pid, rustix::process::Signal::CONT);
                    fault_log.push(&fault("cont"));
                }
                Scenario::Latency
                | Scenario::Partition
                | Scenario::OnewayUp
                | Scenario::OnewayDown => {
                    tokio::time::sleep(lease * 2).await;
                    proxy(Fault::None);
                    fault_log.push(&fault("heal"));
                }
                Scenario::Reset => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    proxy(Fault::None);
                    fault_log.push(&fault("heal"));
                }
                Scenario::NodePartition => {
                    tokio::time::sleep(lease * 2).await;
                    for mine in &running.proxies {
                        mine[0].set(Fault::None);
                    }
                    fault_log.push(&fault("heal"));
                }
                Scenario::ClockJump => {
                    tokio::time::sleep(lease * 3).await;
                    std::fs::write(&clock_file, "+0\n").map_err(|e| e.to_string())?;
                    fault_log.push(&fault("heal"));
                }
                Scenario::Failover => {
                    reattach(&mut running.servers).await?;
                    fault_log.push(&fault("heal"));
                }
                Scenario::NodeClockJump | Scenario::MajorityClockJump => {
                    tokio::time::sleep(lease * 3).await;
                    jump_node_clocks(dir, &running.servers[..scenario.jumped_nodes()], 0).await?;
                    fault_log.push(&fault("heal"));
                }
                _ => {}
            }
        }
        _ => report.run_errors.push(
            "the fault never triggered: no worker reached its critical section in time".into(),
        ),
    }

    // The end: every worker stops by itself at stop_at; a hung one is killed and reported.
    let limit = Duration::from_nanos(stop_at_ns.saturating_sub(now_ns()))
        + lease * 3
        + Duration::from_secs(10);
    let killed_one = scenario == Scenario::Kill && backend != BackendKind::Memory;
    for (p, child) in &mut running.children {
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(_)) if killed_one && *p as usize == target_process => {}
            Ok(Ok(status)) => report.run_errors.push(format!(
                "worker process {p} ended with {status} (see worker-{p}.stderr)"
            )),
            Ok(Err(e)) => report.run_errors.push(format!("worker process {p}: {e}")),
            Err(_) => {
                let _ = child.start_kill();
                report
                    .run_errors
                    .push(format!("worker process {p} hung and was killed"));
            }
        }
    }

    // Histories.
    let mut workers: Vec<WorkerEvent> = Vec::new();
    for p in 0..processes {
        let path = dir.join(format!("worker-{p}.jsonl"));
        workers.extend(read_lines(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    report.left_held = match backend {
        BackendKind::Memory => workers
            .iter()
            .any(|e| matches!(e, WorkerEvent::Leftover { held: true, .. })),
        _ => left_held(&direct_url, &key, lease).await,
    };
    if scenario == Scenario::ClockJump && !clock_jumped(&workers) {
        report.run_errors.push(
            "the clock jump did not reach the workers (their wall clocks never moved by an hour)"
                .into(),
        );
    }
    let resource_events = read_lines(&dir.join("resource.jsonl")).map_err(|e| e.to_string())?;
    let faults = read_lines(&dir.join("faults.jsonl")).map_err(|e| e.to_string())?;
    report.findings = check(&workers, &resource_events, &faults);
    drop(running);
    Ok(())
}

/// Waits until a worker other than `target` reads the resource (a second holder acted), or
/// `limit` passed, whichever comes first.
async fn second_reader(reads: &mut watch::Receiver<Option<u32>>, target: u32, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        while reads.changed().await.is_ok() {
            if *reads.borrow_and_update() != Some(target) {
                break;
            }
        }
    })
    .await;
}

/// The offset file of node `n`'s clock shim.
fn node_clock_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("server-{n}.clock"))
}

/// Sets the wall clock of the first `servers.len()` nodes to `offset` seconds from true time,
/// and checks that each node's `TIME` shows it (the shim loaded) within a second.
async fn jump_node_clocks(dir: &Path, servers: &[Server], offset: i64) -> Result<(), String> {
    for n in 0..servers.len() {
        let file = node_clock_file(dir, n);
        std::fs::write(&file, format!("{offset:+}\n"))
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    for server in servers {
        let mut seen = 0;
        for _ in 0..100 {
            let time = redis_command(
                server.addr(),
                &["EVAL", "return tonumber(redis.call('TIME')[1])", "0"],
            )
            .await?;
            let true_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| e.to_string())?
                .as_secs() as i64;
            seen = time
                .parse::<i64>()
                .map_err(|e| format!("TIME {time:?}: {e}"))?
                - true_now;
            if (seen - offset).abs() <= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if (seen - offset).abs() > 2 {
            return Err(format!(
                "the node {} shows its clock {seen:+} s from true time, not {offset:+} s: the clock shim did not take",
                server.addr()
            ));
        }
    }
    Ok(())
}

/// Makes `replica` replicate `primary` through a fault proxy that delays every chunk by
/// [`REPLICATION_LAG`], and waits until the link is up.
async fn replicate(primary: &Server, replica: &Server) -> Result<FaultProxy, String> {
    let link = FaultProxy::start(primary.addr())
        .await
        .map_err(|e| format!("fault proxy: {e}"))?;
    link.set(Fault::Latency(REPLICATION_LAG));
    let port = link.addr().port().to_string();
    redis_command(replica.addr(), &["REPLICAOF", "127.0.0.1", &port]).await?;
    link_up(replica).await?;
    Ok(link)
}

/// Waits (up to 10 s) until `replica` reports its link to its primary up.
async fn link_up(replica: &Server) -> Result<(), String> {
    for _ in 0..200 {
        let info = redis_command(replica.addr(), &["INFO", "replication"]).await?;
        if info.contains("master_link_status:up") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "the replica {} did not reach its primary within 10 s",
        replica.addr()
    ))
}

/// The failover: the replica's link is cut (what it has not received yet is lost), the primary
/// (`servers[0]`) is killed, the replica (`servers[1]`) promoted and every client proxy pointed
/// at it.
async fn fail_over(
    servers: &mut [Server],
    proxies: &[Vec<FaultProxy>],
    link: Option<&FaultProxy>,
) -> Result<(), String> {
    if let Some(link) = link {
        link.set(Fault::Reset);
    }
    servers[0].kill().await;
    let promoted = servers[1].addr();
    redis_command(promoted, &["REPLICAOF", "NO", "ONE"]).await?;
    for mine in proxies {
        mine[0].set_upstream(promoted);
    }
    Ok(())
}

/// After [`fail_over`]: the old primary comes back empty as the new primary's replica, as a
/// Sentinel would re-attach it.
async fn reattach(servers: &mut [Server]) -> Result<(), String> {
    servers[0].start_again().await?;
    let port = servers[1].addr().port().to_string();
    redis_command(servers[0].addr(), &["REPLICAOF", "127.0.0.1", &port]).await?;
    link_up(&servers[0]).await
}

/// Whether some worker's wall clock moved by about an hour against the monotonic clock.
fn clock_jumped(workers: &[WorkerEvent]) -> bool {
    let offsets: Vec<i128> = workers
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Grant { ns, wall_ms, .. } => {
                Some(*wall_ms as i128 * 1_000_000 - *ns as i128)
            }
            _ => None,
        })
        .collect();
    let (Some(lo), Some(hi)) = (offsets.iter().min(), offsets.iter().max()) else {
        return false;
    };
    hi - lo > 3_000 * 1_000_000_000
}

/// Waits (up to a few seconds) until every thread of process `pid` is stopped.
async fn stopped(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let all_stopped = || -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
            })
        })
    };
    for _ in 0..500 {
        if all_stopped() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn signal(pid: Option<u32>, sig: rustix::process::Signal) {
    if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Whether `key` is still held once any lease still running has ended.
async fn left_held(url: &str, key: &str, lease: Duration) -> bool {
    let Ok(client) = fenced::connect(url).await else {
        return true;
    };
    match client.holder(key).await {
        Ok(None) => false,
        Ok(Some(h)) => {
            // A session-bound lock of an exited worker lasts until the server expires its
            // session, which it checks only every few ticks: allow two leases.
            let wait = h.remaining.unwrap_or(lease).min(lease) * 2 + Duration::from_millis(200);
            tokio::time::sleep(wait).await;
            !matches!(client.holder(key).await, Ok(None))
        }
        Err(_) => true,
    }
}

/// The libfaketime library, where Debian puts it.
pub fn find_faketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}
