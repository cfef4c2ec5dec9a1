//! Replica-acknowledged locks (`min_replicas`) on the single-node Redis backend, and the
//! failover they guard against. Each check starts its own primary and replica from the Debian
//! `redis-server`, the replica replicating through the fault proxy, so that a check can hold the
//! replication stream back (a partition), kill the primary, drop what was held (a reset) and
//! promote the replica.
//!
//! What these checks show: with plain locks, a grant that had not reached the replica when the
//! primary died is gone after the failover and a second client gets the lock (expected and
//! documented: replication is asynchronous); with `min_replicas=1` that grant is refused instead,
//! and a grant that was acknowledged survives the failover; and the fencing token of the second
//! holder is above the first's either way (tokens start from the server's clock), so the
//! resource refuses the first holder's late write.
#![cfg(feature = "redis")]

use std::time::Duration;

use fenced::{Client, LockOptions};
use fenced_proof::proxy::{Fault, FaultProxy};
use fenced_testkit::{require_env, unique_key, within};

mod support;
use support::RedisProcess;

/// A primary with one replica whose link (through the proxy) is up.
async fn pair() -> (tempfile::TempDir, RedisProcess, RedisProcess, FaultProxy) {
    let dir = tempfile::tempdir().expect("temp dir");
    let primary = RedisProcess::start(&dir.path().join("primary"), None).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], primary.port).into())
        .await
        .expect("fault proxy");
    let replica = RedisProcess::start(&dir.path().join("replica"), Some(proxy.addr().port())).await;
    within(20, "the replica's link up", async {
        while !replica
            .cli(&["INFO", "replication"])
            .await
            .contains("master_link_status:up")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    (dir, primary, replica, proxy)
}

async fn client(url: &str) -> Client {
    fenced::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// Kills the primary, drops whatever replication the proxy still holds, and promotes the
/// replica, as a failover would.
async fn fail_over(primary: &mut RedisProcess, replica: &RedisProcess, proxy: &FaultProxy) {
    primary.child.kill().await.expect("kill the primary");
    proxy.set(Fault::Reset);
    assert!(
        replica
            .cli(&["REPLICAOF", "NO", "ONE"])
            .await
            .contains("OK")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_lock_can_be_granted_twice_after_a_failover() {
    let (_dir, mut primary, replica, proxy) = pair().await;
    let key = unique_key("failover-plain");
    let first = client(&primary.url("")).await;
    // Replication is held back: the grant reaches the primary only.
    proxy.set(Fault::Partition);
    let a = first
        .lock_with(&key, &LockOptions::new().lease(Duration::from_secs(60)))
        .await
        .expect("granted by the primary alone");
    fail_over(&mut primary, &replica, &proxy).await;
    let second = client(&replica.url("")).await;
    let b = within(20, "the promoted replica granting", async {
        loop {
            match second.try_lock(&key).await {
                Ok(Some(guard)) => return guard,
                Ok(None) => {
                    panic!("the promoted replica still has the lock: the grant was replicated")
                }
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    // Two holders: the documented hazard of asynchronous replication.
    assert!(a.is_valid(), "the first holder cannot know");
    assert!(
        b.token() > a.token(),
        "the second holder's token {} is not above the first's {}: fencing would not stop the stale writer",
        b.token(),
        a.token()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_refuses_an_unreplicated_grant_and_keeps_an_acknowledged_one() {
    let (_dir, mut primary, replica, proxy) = pair().await;
    let key = unique_key("failover-acked");
    let url = primary.url("?min_replicas=1&replica_timeout=300ms");
    let first = client(&url).await;

    // Replication is held back: the grant is not acknowledged, so it is refused and given back.
    proxy.set(Fault::Partition);
    let e = first
        .lock_with(
            &key,
            &LockOptions::new()
                .lease(Duration::from_secs(60))
                .retry(fenced::RetryPolicy::new().max_retries(0)),
        )
        .await
        .expect_err("no replica acknowledged");
    assert!(e.to_string().contains("not acquired (replication)"), "{e}");
    assert!(e.is_transient(), "{e}");
    let plain = client(&primary.url("")).await;
    assert!(
        plain.holder(&key).await.expect("holder").is_none(),
        "the refused grant was left behind"
    );
    proxy.set(Fault::None);

    // With the replica back, the grant is acknowledged, and it survives the failover.
    let a = within(
        20,
        "an acknowledged grant",
        first.lock_with(&key, &LockOptions::new().lease(Duration::from_secs(60))),
    )
    .await
    .expect("acknowledged by the replica");
    fail_over(&mut primary, &replica, &proxy).await;
    let second = client(&replica.url("")).await;
    let holder = second
        .holder(&key)
        .await
        .expect("holder on the promoted replica")
        .expect("the acknowledged grant survived the failover");
    assert_eq!(holder.token, Some(a.token()));
    assert!(
        second.try_lock(&key).await.expect("try_lock").is_none(),
        "granted twice although the grant was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_on_the_shared_replicated_primary() {
    // The primary `scripts/test` starts with two replicas (watched by Sentinels).
    let url = require_env("FENCED_TEST_REDIS_REPLICATED_URL");
    let sep = if url.contains('?') { '&' } else { '?' };
    let client = client(&format!("{url}{sep}min_replicas=2")).await;
    let key = unique_key("acked-two");
    let mut last = None;
    for _ in 0..3 {
        let guard = client.lock(&key).await.expect("two replicas acknowledge");
        assert!(last.is_none_or(|t| guard.token() > t));
        last = Some(guard.token());
        guard.release().await.expect("release");
    }
    let too_many = fenced::connect(&format!("{url}{sep}min_replicas=3&replica_timeout=200ms"))
        .await
        .expect("connect");
    let e = too_many
        .lock_with(
            &key,
            &LockOptions::new().retry(fenced::RetryPolicy::new().max_retries(0)),
        )
        .await
        .expect_err("only two replicas exist");
    let text = e.to_string();
    assert!(text.contains("2 of the 3 replicas"), "{text}");
    assert!(
        !text.contains(&url[8..url.find('@').unwrap_or(8)]),
        "{text}"
    );
    assert!(client.holder(&key).await.expect("holder").is_none());
}

/// With `min_replicas`, an extension the replicas did not acknowledge is not confirmed: the
/// guard keeps its earlier deadline (a failover would bring back the earlier expiry), and an
/// acknowledged one moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_confirms_only_acknowledged_extensions() {
    let (_dir, primary, _replica, proxy) = pair().await;
    let key = unique_key("acked-extend");
    let client = client(&primary.url("?min_replicas=1&replica_timeout=300ms")).await;
    let options = LockOptions::new()
        .lease(Duration::from_secs(60))
        .renew(false);
    let guard = within(
        20,
        "an acknowledged grant",
        client.lock_with(&key, &options),
    )
    .await
    .expect("acknowledged by the replica");
    let deadline = guard.deadline();

    proxy.set(Fault::Partition);
    let e = guard
        .extend(Duration::from_secs(90))
        .await
        .expect_err("the replica did not acknowledge the extension");
    assert!(
        e.to_string()
            .contains("extension not confirmed (replication)"),
        "{e}"
    );
    assert!(e.is_transient(), "{e}");
    assert_eq!(
        guard.deadline(),
        deadline,
        "an unconfirmed extension moved the deadline"
    );
    assert!(guard.is_valid());

    proxy.set(Fault::None);
    within(20, "an acknowledged extension", async {
        while guard.extend(Duration::from_secs(90)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        guard.deadline() > deadline,
        "the acknowledged extension did not move the deadline"
    );
    guard.release().await.expect("release");
}
