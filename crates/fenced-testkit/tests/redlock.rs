//! The conformance suite on Redlock over three and over five independent Redis nodes (the nodes
//! named by `FENCED_TEST_REDLOCK_URL`, which `scripts/test` starts), and Redlock's own faults on
//! nodes these tests start for themselves, so that they can kill, restart, stop and partition
//! them: one node down, two of three down, a node restarted empty while a lock is held, a node
//! behind a partition.
#![cfg(feature = "redlock")]

use std::time::Duration;

use fenced::backends::redlock::RedlockBackend;
use fenced::{Client, ErrorKind, LockOptions};
use fenced_proof::proxy::{Fault, FaultProxy};
use fenced_proof::server::{Server, ServerKind};
use fenced_testkit::{Harness, require_env, unique_key, within};

/// The first `n` nodes of `FENCED_TEST_REDLOCK_URL` as a Redlock URL. The node timeout is
/// generous: the suite runs many tests at once on a small machine, and a slow answer there is
/// not what these checks are about.
fn url_of(n: usize) -> String {
    let url = require_env("FENCED_TEST_REDLOCK_URL");
    let (scheme, rest) = url.split_once("://").expect("a redlock:// URL");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let nodes: Vec<&str> = authority.split(',').collect();
    assert!(
        nodes.len() >= n,
        "FENCED_TEST_REDLOCK_URL names {} nodes, these checks need {n}",
        nodes.len()
    );
    let sep = if tail.contains('?') { '&' } else { '?' };
    format!(
        "{scheme}://{}{tail}{sep}node_timeout=1s",
        nodes[..n].join(",")
    )
}

mod three {
    use super::*;
    fenced_testkit::conformance_tests!(Harness::new(
        url_of(3),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

mod five {
    use super::*;
    fenced_testkit::conformance_tests!(Harness::new(
        url_of(5),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

/// Nodes of our own: no persistence, so a restart comes back empty.
struct Nodes {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Nodes {
    async fn start(n: usize) -> Nodes {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut servers = Vec::new();
        for i in 0..n {
            let server = Server::start(
                ServerKind::Redis { aof: false },
                &dir.path().join(format!("node{i}")),
            )
            .await
            .unwrap_or_else(|e| panic!("redis-server for a Redlock node did not start: {e}"));
            servers.push(server);
        }
        Nodes { servers, _dir: dir }
    }

    fn url(&self, query: &str) -> String {
        let nodes: Vec<String> = self.servers.iter().map(|s| s.addr().to_string()).collect();
        format!("redlock://{}?node_timeout=200ms{query}", nodes.join(","))
    }
}

async fn client(url: &str) -> Client {
    fenced::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_down_still_grants_with_increasing_tokens() {
    let mut nodes = Nodes::start(3).await;
    let url = nodes.url("");
    let client = client(&url).await;
    let key = unique_key("redlock-one-down");
    let first = client.lock(&key).await.expect("all nodes up");
    let t1 = first.token();
    first.release().await.expect("release");

    nodes.servers[2].kill().await;
    let mut last = t1;
    for _ in 0..3 {
        let guard = client.lock(&key).await.expect("two of three nodes grant");
        assert!(guard.token() > last, "{} after {last}", guard.token());
        last = guard.token();
        guard.release().await.expect("release with one node down");
    }
    // A client that connects while the node is down works too.
    let late = self::client(&url).await;
    let guard = late.lock(&key).await.expect("late client");
    assert!(guard.token() > last);
    last = guard.token();
    guard.release().await.expect("release");

    // The node comes back (empty): its counter starts from its clock, tokens keep increasing.
    nodes.servers[2].start_again().await.expect("node back");
    for _ in 0..5 {
        let guard = client.lock(&key).await.expect("acquire");
        assert!(guard.token() > last, "{} after {last}", guard.token());
        last = guard.token();
        guard.release().await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_down_is_a_clear_error_and_takes_nothing() {
    let mut nodes = Nodes::start(3).await;
    let url = nodes.url("");
    let client = client(&url).await;
    let key = unique_key("redlock-two-down");
    nodes.servers[1].kill().await;
    nodes.servers[2].kill().await;
    let e = client
        .lock_with(&key, &LockOptions::new().wait(Duration::from_millis(500)))
        .await
        .expect_err("one node of three cannot grant");
    assert_ne!(e.kind(), ErrorKind::NotAcquired, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("of the 3 Redlock nodes") && text.contains("2 must"),
        "{text}"
    );
    // Nothing was left on the node that answered.
    let single = fenced::connect(&format!(
        "redis://{}/0?prefix=fenced-redlock",
        nodes.servers[0].addr()
    ))
    .await
    .expect("the live node");
    assert!(single.holder(&key).await.expect("holder").is_none());
    // A new client cannot connect either, and says why.
    let e = fenced::connect(&url).await.expect_err("no majority");
    assert!(e.to_string().contains("only 1 of the 3"), "{e}");
}

/// The documented failure: a node restarted empty while a lock is held lets a second client
/// assemble a majority. Two holders at once are possible, and the fencing token is what keeps
/// the first one's late write out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarted_empty_can_grant_twice_and_fencing_rejects_the_stale_writer() {
    let mut nodes = Nodes::start(3).await;
    let url = nodes.url("");
    let a = client(&url).await;
    let b = client(&url).await;
    let key = unique_key("redlock-restart-empty");
    // Node 3 is down while A takes the lock on nodes 1 and 2.
    nodes.servers[2].kill().await;
    let options = LockOptions::new().lease(Duration::from_secs(30));
    let held_by_a = a
        .lock_with(&key, &options)
        .await
        .expect("A on nodes 1 and 2");
    // Node 1 crashes and comes back empty; node 3 comes back (empty, it was down).
    nodes.servers[0].restart().await.expect("node 1 back");
    nodes.servers[2].start_again().await.expect("node 3 back");
    // B gets a majority (nodes 1 and 3) although A's lease has not ended.
    let held_by_b = within(
        30,
        "B granted on the restarted nodes",
        b.lock_with(&key, &options.clone().wait(Duration::from_secs(20))),
    )
    .await
    .expect("B granted while A still holds: the documented delayed-restart hazard");
    assert!(
        held_by_a.is_valid(),
        "A cannot know: its nodes said nothing"
    );
    // The resource keeps the highest token it saw: B writes first, A's late write is refused.
    let mut highest = 0u64;
    let mut write = |token: u64| {
        if token < highest {
            return false;
        }
        highest = token;
        true
    };
    assert!(write(held_by_b.token().get()), "B's write");
    assert!(
        !write(held_by_a.token().get()),
        "A's token {} is not below B's {}: fencing would not stop the stale writer",
        held_by_a.token(),
        held_by_b.token()
    );
    // The restarted nodes are young: a startup check can see it.
    let backend = RedlockBackend::connect(&url).await.expect("backend");
    let young: Vec<usize> = backend
        .young_nodes(Duration::from_secs(3600))
        .await
        .into_iter()
        .map(|(node, _)| node)
        .collect();
    assert!(young.contains(&1) && young.contains(&3), "{young:?}");
    held_by_b.release().await.expect("B releases");
}

/// A node behind a partition answers nothing: grants and renewals go on with the other two,
/// and when the partition heals the node's leftover key does not get in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_does_not_stop_the_lock() {
    let nodes = Nodes::start(3).await;
    let proxy = FaultProxy::start(nodes.servers[2].addr())
        .await
        .expect("fault proxy");
    let url = format!(
        "redlock://{},{},{}?node_timeout=200ms",
        nodes.servers[0].addr(),
        nodes.servers[1].addr(),
        proxy.addr()
    );
    let client = client(&url).await;
    let key = unique_key("redlock-partition");
    let options = LockOptions::new().lease(Duration::from_secs(2));
    let guard = client.lock_with(&key, &options).await.expect("all nodes");
    proxy.set(Fault::Partition);
    // Renewals keep the lock past several leases with one node silent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(guard.is_valid(), "lost with two of three nodes renewing");
    let t1 = guard.token();
    guard.release().await.expect("release with one node silent");
    let next = client
        .lock_with(&key, &options)
        .await
        .expect("grant during the partition");
    assert!(next.token() > t1);
    let t2 = next.token();
    next.release().await.expect("release");
    proxy.set(Fault::None);
    let after = client
        .lock_with(&key, &options.clone().wait(Duration::from_secs(10)))
        .await
        .expect("grant after healing");
    assert!(after.token() > t2);
    after.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_at_connect_without_showing_it() {
    let url = require_env("FENCED_TEST_REDLOCK_URL");
    let (_, rest) = url.split_once('@').expect("the test nodes have a password");
    let bad = format!("redlock://:not-the-password@{rest}");
    let e = fenced::connect(&bad).await.expect_err("wrong password");
    let text = format!("{e} {e:?}");
    assert!(
        text.contains("rejected the user name or password"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(!e.is_transient(), "{text}");
}
