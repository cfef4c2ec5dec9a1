//! The fast subset of the proof suite, run by the normal test suite: one scenario per backend
//! that must show the fault doing its damage or being contained, with fencing on. The full set is
//! `scripts/proof`, which writes SAFETY.md.

use std::path::PathBuf;
use std::time::Duration;

use fenced_proof::scenario::{self, BackendKind, RunReport, Scenario, Setup};

fn setup(name: &str) -> (Setup, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix(name)
        .tempdir()
        .expect("a temporary directory");
    let setup = Setup {
        worker_exe: PathBuf::from(env!("CARGO_BIN_EXE_fenced-proof")),
        out: dir.path().into(),
        lease: Duration::from_secs(1),
        hold: Duration::from_millis(50),
        workers: 3,
        seed: 7,
        faketime: scenario::find_faketime(),
    };
    (setup, dir)
}

async fn run(backend: BackendKind, scenario: Scenario) -> RunReport {
    let (setup, _dir) = setup(scenario.name());
    let report = scenario::run(&setup, backend, scenario, true).await;
    assert!(
        report.passed(),
        "{} {}: {:?}\nfindings: {:?}",
        backend.name(),
        scenario.name(),
        report.violations,
        report.findings
    );
    report
}

/// A holder stopped after its last check writes when it resumes; fencing refuses that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pause_stale_write_is_refused() {
    let r = run(BackendKind::Redis, Scenario::Pause).await;
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// A partitioned holder learns it lost the lock before the next holder acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partition_holder_stops_first() {
    let r = run(BackendKind::Redis, Scenario::Partition).await;
    assert!(r.findings.lost_timely >= 1, "{:?}", r.findings);
}

/// A killed holder's lock is taken over; nobody overlaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill_is_taken_over() {
    let r = run(BackendKind::Sqlite, Scenario::Kill).await;
    assert!(r.findings.recovery_ms.is_some(), "{:?}", r.findings);
}

/// A blocked thread's stale write is refused on the in-process store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pause_stale_write_is_refused() {
    let r = run(BackendKind::Memory, Scenario::Pause).await;
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// A partitioned etcd holder learns it lost its session before the next holder acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_partition_holder_stops_first() {
    let r = run(BackendKind::Etcd, Scenario::Partition).await;
    assert!(r.findings.lost_timely >= 1, "{:?}", r.findings);
}

/// A ZooKeeper holder stopped past its session writes when it resumes; fencing (the creation
/// zxid) refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_pause_stale_write_is_refused() {
    let r = run(BackendKind::Zookeeper, Scenario::Pause).await;
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// A PostgreSQL session-mode holder stopped past its session: the server ends the silent
/// connection (idle_session_timeout), which frees the advisory lock; the holder writes when it
/// resumes and fencing (the row's sequence token) refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_session_pause_stale_write_is_refused() {
    let r = run(BackendKind::PostgresSession, Scenario::Pause).await;
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// A MySQL session-mode holder stopped past its session: the server ends the silent connection
/// (wait_timeout), which frees its GET_LOCK; the holder writes when it resumes and fencing (the
/// row's counter) refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_session_pause_stale_write_is_refused() {
    let r = run(BackendKind::MysqlSession, Scenario::Pause).await;
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// Redlock with one node cut off from every client: the other two keep granting, and nobody
/// overlaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_node_partition_keeps_granting() {
    let r = run(BackendKind::Redlock, Scenario::NodePartition).await;
    assert!(r.passed(), "{:?}", r.violations);
    assert!(r.findings.grants >= 5, "{:?}", r.findings);
}

/// A failover to a replica that had not received the latest grant (plain locks): a second
/// holder is granted while the first is about to write, and fencing refuses that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failover_plain_second_holder_is_fenced_off() {
    let r = run(BackendKind::RedisReplicated, Scenario::Failover).await;
    assert!(r.findings.overlaps >= 1, "{:?}", r.findings);
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}

/// The same failover with `min_replicas=1`: the promoted replica has the holder's lock, nobody
/// else is granted while it holds, and the holder's write is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failover_min_replicas_keeps_one_holder() {
    let r = run(BackendKind::RedisMinReplicas, Scenario::Failover).await;
    assert_eq!(r.findings.overlaps, 0, "{:?}", r.findings);
    assert_eq!(r.findings.writes_rejected, 0, "{:?}", r.findings);
    assert!(r.findings.grants >= 5, "{:?}", r.findings);
}

/// Redlock with one node's wall clock an hour ahead while a lock is held (the node drops its
/// keys at once): the run stays within its expectation, the run itself checks that the node's
/// `TIME` moved, and tokens keep rising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_node_clock_jump_keeps_tokens_rising() {
    let r = run(BackendKind::Redlock, Scenario::NodeClockJump).await;
    assert_eq!(r.findings.token_violations, 0, "{:?}", r.findings);
    assert_eq!(r.findings.stale_writes_accepted, 0, "{:?}", r.findings);
}

/// Redlock with two nodes' wall clocks an hour ahead: a second holder assembles a majority
/// while the first is about to write, and the fencing token refuses that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_majority_clock_jump_second_holder_is_fenced_off() {
    let r = run(BackendKind::Redlock, Scenario::MajorityClockJump).await;
    assert!(r.findings.overlaps >= 1, "{:?}", r.findings);
    assert!(r.findings.writes_rejected >= 1, "{:?}", r.findings);
}
