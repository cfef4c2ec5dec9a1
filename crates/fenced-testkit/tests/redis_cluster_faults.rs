//! The Redis Cluster backend while the cluster changes under a held and waited-on lock: a slot
//! migration, a graceful failover (`CLUSTER FAILOVER`) and a killed primary whose replica is
//! promoted automatically. Each check starts a cluster of its own (the shared one stays
//! untouched: other checks run against it at the same time), with `cluster-node-timeout` 1 s.
//!
//! In each, client A holds key K and client B waits for it in a task. After the change: A's
//! renewals and explicit extensions still succeed (the client library follows `MOVED` and `ASK`
//! to the slot's new primary) and its lost signal stays silent; B's sharded subscription is on
//! the slot's new primary (`PUBSUB SHARDNUMSUB` there); A's release wakes B, well before A's
//! 60 s lease would have ended (the fallback for a missed wake-up); B's token is above A's; and
//! `holder` and `list` name A while it holds. With the primary killed (and the shard kept down
//! for longer than B's retries would last), B's wait is not woken into the outage, a third
//! client cannot take the lock that `min_replicas=1` had a replica acknowledge, and with one
//! replica left a grant that needs two is refused and given back.
#![cfg(feature = "redis-cluster")]

use std::time::Duration;

use fenced::backends::redis::{RedisBackend, RedisKeyNames};
use fenced::{Client, Key, LockGuard, LockOptions};
use fenced_testkit::{unique_key, within};
use tokio::task::JoinHandle;

mod support;
use support::RedisCluster;

async fn backend(url: &str) -> RedisBackend {
    match RedisBackend::connect(url).await {
        Ok(backend) => backend,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// A's lock: a long lease (a waiter that missed the release would sleep until it ends),
/// renewed often (so that renewals across the change are seen soon).
fn holding() -> LockOptions {
    LockOptions::new()
        .lease(Duration::from_secs(60))
        .renew_every(Duration::from_secs(1))
}

/// How long a check waits for B after A's release: far less than A's lease.
const WAKE_BOUND: u64 = 20;

/// How long a killed primary's shard stays down before its replicas may fail over: longer than
/// B's attempts would last had it been woken into the outage (4 attempts, the default retry
/// policy, each ended by the 2 s timeout at the latest).
const OUTAGE: Duration = Duration::from_secs(8);

/// The names of `key` and their slot, checked to be one slot (one hash tag).
async fn names_and_slot(
    cluster: &RedisCluster,
    backend: &RedisBackend,
    key: &str,
) -> (RedisKeyNames, u16) {
    let names = backend.key_names(&Key::new(key).expect("key"));
    let slot = cluster.keyslot(&names.lock).await;
    assert_eq!(cluster.keyslot(&names.fence).await, slot, "{names:?}");
    assert_eq!(cluster.keyslot(&names.channel).await, slot, "{names:?}");
    (names, slot)
}

/// Client B: a backend of its own and a task waiting for `key` (up to 120 s).
async fn waiter(url: &str, key: &str) -> (RedisBackend, JoinHandle<LockGuard>) {
    let backend = backend(url).await;
    let client = Client::new(backend.clone());
    let key = key.to_owned();
    let task = tokio::spawn(async move {
        let options = LockOptions::new()
            .wait(Duration::from_secs(120))
            .lease(Duration::from_secs(30));
        client.lock_with(&key, &options).await.expect("B's wait")
    });
    (backend, task)
}

/// Waits until `n` clients are subscribed to `channel` on the node on `port`, while B still
/// waits.
async fn subscribers(
    cluster: &RedisCluster,
    waiter: &JoinHandle<LockGuard>,
    port: u16,
    channel: &str,
    n: u64,
    what: &str,
) {
    within(30, what, async {
        while cluster.shard_subscribers(port, channel).await != n {
            assert!(!waiter.is_finished(), "B's wait ended before {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Waits for the renewal watchdog to extend the lease once more (the deadline moves on only
/// when the server confirmed an extension).
async fn renewed(guard: &LockGuard, what: &str) {
    let before = guard.deadline();
    within(30, what, async {
        while guard.deadline() <= before {
            assert!(!guard.is_lost(), "lost: {:?}", guard.lost_signal().reason());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// `holder` and `list` of a fresh client name `guard` (and one waiting client).
async fn status_names(url: &str, key: &str, guard: &LockGuard) {
    let admin = fenced_testkit::connect(url).await;
    let holder = admin
        .holder(key)
        .await
        .expect("holder")
        .expect("the lock is held");
    assert_eq!(holder.token, Some(guard.token()));
    assert_eq!(holder.owner, Some(guard.owner()));
    assert_eq!(holder.waiters, Some(1), "SHARDNUMSUB on the new primary");
    let listed = admin.list(key).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key.as_ref().map(Key::as_str), Some(key));
    assert_eq!(listed[0].token, Some(guard.token()));
}

/// A releases; B must be granted by the release's wake-up, with a higher token.
async fn release_wakes(url: &str, key: &str, guard: LockGuard, waiter: JoinHandle<LockGuard>) {
    assert!(!waiter.is_finished(), "B was granted while A held the lock");
    let a = guard.token();
    guard.release().await.expect("A's release");
    let b = within(
        WAKE_BOUND,
        "B granted after A's release (A's lease had about 60 s left)",
        waiter,
    )
    .await
    .expect("B's task");
    assert!(b.token() > a, "B's token {} after A's {}", b.token(), a);
    let admin = fenced_testkit::connect(url).await;
    let holder = admin.holder(key).await.expect("holder").expect("B holds");
    assert_eq!(holder.token, Some(b.token()));
    b.release().await.expect("B's release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_while_held_and_waited_on() {
    let cluster = RedisCluster::start(3, 0).await;
    let url = cluster.url("");
    let key = unique_key("migrate");
    let a_backend = backend(&url).await;
    let (names, slot) = names_and_slot(&cluster, &a_backend, &key).await;
    let from = cluster.owner(slot).await;
    let to = cluster
        .primaries()
        .await
        .into_iter()
        .find(|p| *p != from)
        .expect("another primary");

    let a = Client::new(a_backend);
    let guard = a.lock_with(&key, &holding()).await.expect("A acquires");
    let lost = guard.lost_signal();
    let (b_backend, waiter) = waiter(&url, &key).await;
    subscribers(
        &cluster,
        &waiter,
        from,
        &names.channel,
        1,
        "B subscribed on K's primary",
    )
    .await;

    cluster.begin_migration(slot, from, to).await;
    let mut moved = cluster.move_keys(slot, from, to).await;
    moved.sort();
    assert_eq!(
        moved,
        [names.fence.clone(), names.lock.clone()],
        "the lock hash and the token counter moved"
    );
    // Half-way: the keys are on `to`, the slot is still `from`'s (`ASK`).
    guard
        .extend(Duration::from_secs(60))
        .await
        .expect("A extends while the slot migrates");
    cluster.finish_migration(slot, from, to).await;
    assert_eq!(
        cluster
            .cli(from, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .await,
        "0"
    );
    assert_eq!(
        cluster.cli(to, &["HGET", &names.lock, "token"]).await,
        guard.token().get().to_string(),
        "A's grant is on the new primary"
    );

    // B's subscription followed the slot.
    subscribers(
        &cluster,
        &waiter,
        to,
        &names.channel,
        1,
        "B subscribed on the new primary",
    )
    .await;
    assert_eq!(cluster.shard_subscribers(from, &names.channel).await, 0);
    assert_eq!(b_backend.subscribed_channels(), 1);

    guard
        .extend(Duration::from_secs(60))
        .await
        .expect("A extends after the move");
    renewed(&guard, "a renewal after the move").await;
    assert!(guard.is_valid());
    assert!(!lost.is_lost(), "{:?}", lost.reason());
    status_names(&url, &key, &guard).await;

    release_wakes(&url, &key, guard, waiter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_failover_while_held_and_waited_on() {
    let cluster = RedisCluster::start(3, 1).await;
    let url = cluster.url("");
    let key = unique_key("failover");
    let a_backend = backend(&url).await;
    let (names, slot) = names_and_slot(&cluster, &a_backend, &key).await;
    let primary = cluster.owner(slot).await;
    let replica = cluster.replica_of(primary).await;

    let a = Client::new(a_backend);
    let guard = a.lock_with(&key, &holding()).await.expect("A acquires");
    let lost = guard.lost_signal();
    let (b_backend, waiter) = waiter(&url, &key).await;
    subscribers(
        &cluster,
        &waiter,
        primary,
        &names.channel,
        1,
        "B subscribed on K's primary",
    )
    .await;

    assert_eq!(cluster.cli(replica, &["CLUSTER", "FAILOVER"]).await, "OK");
    cluster
        .wait_owner(slot, replica, "the replica promoted by CLUSTER FAILOVER")
        .await;

    subscribers(
        &cluster,
        &waiter,
        replica,
        &names.channel,
        1,
        "B subscribed on the new primary",
    )
    .await;
    assert_eq!(b_backend.subscribed_channels(), 1);
    renewed(&guard, "a renewal after the failover").await;
    guard
        .extend(Duration::from_secs(60))
        .await
        .expect("A extends after the failover");
    assert!(guard.is_valid());
    assert!(!lost.is_lost(), "{:?}", lost.reason());
    status_names(&url, &key, &guard).await;

    release_wakes(&url, &key, guard, waiter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_replica_promoted_lock_survives() {
    // Two replicas each: after the failover, the promoted replica still has one to acknowledge
    // A's extensions (with min_replicas, they are WAITed for too).
    let mut cluster = RedisCluster::start(3, 2).await;
    let url = cluster.url("");
    let key = unique_key("killed");
    let a_backend = backend(&cluster.url("?min_replicas=1&replica_timeout=500ms")).await;
    let (names, slot) = names_and_slot(&cluster, &a_backend, &key).await;
    let primary = cluster.owner(slot).await;
    let replicas = cluster.replicas_of(primary).await;
    assert_eq!(replicas.len(), 2, "{replicas:?}");

    let a = Client::new(a_backend);
    // Granted once a replica acknowledged it (WAIT).
    let guard = a.lock_with(&key, &holding()).await.expect("A acquires");
    let lost = guard.lost_signal();
    let (b_backend, waiter) = waiter(&url, &key).await;
    subscribers(
        &cluster,
        &waiter,
        primary,
        &names.channel,
        1,
        "B subscribed on K's primary",
    )
    .await;

    // The shard stays down for a while before a replica may take over (see OUTAGE).
    for replica in &replicas {
        let set = ["CONFIG", "SET", "cluster-replica-no-failover", "yes"];
        assert_eq!(cluster.cli(*replica, &set).await, "OK");
    }
    cluster.kill(primary).await;
    within(30, "the cluster marking the primary failed", async {
        while !cluster
            .cli(replicas[0], &["CLUSTER", "INFO"])
            .await
            .contains("cluster_state:fail")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(OUTAGE).await;
    for replica in &replicas {
        let set = ["CONFIG", "SET", "cluster-replica-no-failover", "no"];
        assert_eq!(cluster.cli(*replica, &set).await, "OK");
    }
    let promoted = within(30, "a replica promoted automatically", async {
        loop {
            let owner = cluster.owner(slot).await;
            if owner != primary {
                return owner;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        replicas.contains(&promoted),
        "{promoted} is not one of {replicas:?}"
    );
    assert_eq!(
        cluster.cli(promoted, &["HGET", &names.lock, "token"]).await,
        guard.token().get().to_string(),
        "A's acknowledged grant is on the promoted replica"
    );

    // A third client cannot take the lock while A's lease runs.
    let third = fenced_testkit::connect(&url).await;
    let taken = within(30, "an answer about K from the promoted replica", async {
        loop {
            match third.try_lock(&key).await {
                Ok(taken) => return taken,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(taken.is_none(), "granted twice after the failover");

    // Through the new primary, once its remaining replica follows it.
    within(30, "A's extension through the new primary", async {
        loop {
            match guard.extend(Duration::from_secs(60)).await {
                Ok(()) => return,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("A's extension: {e}"),
            }
        }
    })
    .await;
    renewed(&guard, "a renewal after the failover").await;
    assert!(guard.is_valid());
    assert!(!lost.is_lost(), "{:?}", lost.reason());

    subscribers(
        &cluster,
        &waiter,
        promoted,
        &names.channel,
        1,
        "B subscribed on the promoted replica",
    )
    .await;
    assert_eq!(b_backend.subscribed_channels(), 1);
    status_names(&url, &key, &guard).await;

    // B's wait outlived the outage (it was not woken into it), and the release wakes it.
    release_wakes(&url, &key, guard, waiter).await;

    // One replica is left: a grant that must reach two is refused and given back, also when
    // replica_timeout is longer than timeout (the WAIT is shortened to fit in it).
    let two =
        fenced_testkit::connect(&cluster.url("?min_replicas=2&replica_timeout=3s&timeout=1s"))
            .await;
    let e = two
        .lock_with(&key, &LockOptions::new().retry(fenced::RetryPolicy::none()))
        .await
        .expect_err("only one replica can acknowledge");
    assert!(
        e.to_string()
            .contains("not acquired (replication): 1 of the 2"),
        "{e}"
    );
    assert!(e.is_transient(), "{e}");
    assert!(
        third.holder(&key).await.expect("holder").is_none(),
        "the refused grant was left behind"
    );
}
