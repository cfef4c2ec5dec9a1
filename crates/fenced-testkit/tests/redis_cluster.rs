//! The conformance suite on the Redis Cluster backend (`redis+cluster://`), against the cluster
//! named by `FENCED_TEST_REDIS_CLUSTER_URL` (3 primaries with one replica each; `scripts/test`
//! and `scripts/servers` start it). Without it every check fails, none skips.
//!
//! Besides the suite: locks on many keys land on every primary (checked with `CLUSTER KEYSLOT`
//! and `CLUSTER NODES` on the servers themselves) and `list` finds them all; waiters are woken
//! by sharded pub/sub (`SSUBSCRIBE` on the shard that owns the lock, not a broadcast
//! subscription); `min_replicas` waits for the replica of the lock's own primary; bad URLs fail
//! clearly and never show the password. The shared cluster is never failed over here.
#![cfg(feature = "redis-cluster")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fenced::backends::redis::RedisBackend;
use fenced::{Client, ErrorKind, Key, LockOptions};
use fenced_testkit::{Harness, require_env, unique_key, within};
use tokio::process::Command;

fenced_testkit::conformance_tests!(Harness::from_env(
    "FENCED_TEST_REDIS_CLUSTER_URL",
    env!("CARGO_BIN_EXE_fenced-conformance-worker"),
));

fn cluster_url() -> String {
    require_env("FENCED_TEST_REDIS_CLUSTER_URL")
}

/// The cluster's password and seed ports, read from the test URL.
struct Servers {
    password: String,
    ports: Vec<u16>,
}

impl Servers {
    fn from_url(url: &str) -> Servers {
        let shown = fenced::redact(url);
        let rest = url
            .strip_prefix("redis+cluster://")
            .unwrap_or_else(|| panic!("not a redis+cluster:// URL: {shown}"));
        let (password, hosts) = match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => (
                userinfo.split_once(':').map_or("", |(_, p)| p).to_owned(),
                hosts,
            ),
            None => (String::new(), rest),
        };
        let ports = hosts
            .split(['/', '?'])
            .next()
            .unwrap_or("")
            .split(',')
            .map(|h| {
                h.rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or_else(|| panic!("no port in a seed of {shown}"))
            })
            .collect();
        Servers { password, ports }
    }

    /// One `redis-cli` command to the node on `port` (the password through the environment, so
    /// it is not on the command line); its output, trimmed.
    async fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .env("REDISCLI_AUTH", &self.password)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); scripts/test installs it"));
        assert!(
            out.status.success(),
            "redis-cli {args:?} on port {port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Slot → address (`127.0.0.1:port`) of its primary, from `CLUSTER NODES`.
    async fn slot_owners(&self) -> BTreeMap<u16, String> {
        let nodes = self.cli(self.ports[0], &["CLUSTER", "NODES"]).await;
        let mut owners = BTreeMap::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") {
                continue;
            }
            let address = fields[1].split('@').next().unwrap_or("").to_owned();
            for range in &fields[8..] {
                if range.starts_with('[') {
                    continue; // a slot being migrated
                }
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
                for slot in first..=last {
                    owners.insert(slot, address.clone());
                }
            }
        }
        assert_eq!(
            owners.len(),
            16384,
            "CLUSTER NODES covers every slot:\n{nodes}"
        );
        owners
    }

    async fn keyslot(&self, name: &str) -> u16 {
        let slot = self.cli(self.ports[0], &["CLUSTER", "KEYSLOT", name]).await;
        slot.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {name} answered {slot:?}"))
    }
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

async fn backend(url: &str) -> RedisBackend {
    match RedisBackend::connect(url).await {
        Ok(backend) => backend,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_spread_over_every_primary_and_list_finds_them() {
    let url = cluster_url();
    let servers = Servers::from_url(&url);
    let backend = backend(&url).await;
    assert!(backend.is_cluster());
    let client = Client::new(backend.clone());
    let prefix = unique_key("spread");
    let options = LockOptions::new().lease(Duration::from_secs(60));
    let mut guards = Vec::new();
    for n in 0..48 {
        let key = format!("{prefix}:{n}");
        guards.push((
            key.clone(),
            client.lock_with(&key, &options).await.expect("acquire"),
        ));
    }

    let owners = servers.slot_owners().await;
    let mut used = BTreeSet::new();
    for (key, guard) in &guards {
        let names = backend.key_names(&Key::new(key.as_str()).unwrap());
        let slot = servers.keyslot(&names.lock).await;
        // All names of one lock share the slot (one hash tag).
        assert_eq!(servers.keyslot(&names.fence).await, slot, "{key}");
        assert_eq!(servers.keyslot(&names.channel).await, slot, "{key}");
        let owner = &owners[&slot];
        // The grant is stored on that slot's primary, with the guard's token.
        let token = servers
            .cli(port_of(owner), &["HGET", &names.lock, "token"])
            .await;
        assert_eq!(token, guard.token().get().to_string(), "{key} on {owner}");
        used.insert(owner.clone());
    }
    let primaries: BTreeSet<&String> = owners.values().collect();
    assert_eq!(primaries.len(), 3, "three primaries: {primaries:?}");
    assert_eq!(
        used.len(),
        3,
        "48 keys should land on all three primaries, landed on {used:?}"
    );

    // `list` scans every primary.
    let listed = client.list(&prefix).await.expect("list");
    let listed: BTreeSet<String> = listed
        .iter()
        .map(|info| info.key.as_ref().expect("key").as_str().to_owned())
        .collect();
    let expected: BTreeSet<String> = guards.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(listed, expected);

    for (_, guard) in guards {
        guard.release().await.expect("release");
    }
    assert!(client.list(&prefix).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_through_the_locks_own_shard() {
    let url = cluster_url();
    let servers = Servers::from_url(&url);
    let key = unique_key("wake");
    let holder_client = fenced_testkit::connect(&url).await;
    let holder = holder_client
        .lock_with(&key, &LockOptions::new().lease(Duration::from_secs(60)))
        .await
        .expect("acquire");

    let waiting = backend(&url).await;
    let client = Client::new(waiting.clone());
    let granted = Arc::new(AtomicU64::new(0));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for n in 0..8u64 {
        let (client, key, granted, order) =
            (client.clone(), key.clone(), granted.clone(), order.clone());
        handles.push(tokio::spawn(async move {
            let options = LockOptions::new()
                .wait(Duration::from_secs(120))
                .lease(Duration::from_secs(30));
            let guard = client.lock_with(&key, &options).await.expect("waiter");
            granted.fetch_add(1, Ordering::SeqCst);
            order.lock().unwrap().push((n, guard.token()));
            guard.release().await.expect("waiter release");
        }));
    }
    // One sharded subscription for all eight local waiters, on the lock's own primary, and no
    // classic (broadcast) subscription.
    let names = waiting.key_names(&Key::new(key.as_str()).unwrap());
    let owner = servers.slot_owners().await[&servers.keyslot(&names.lock).await].clone();
    within(30, "the waiters' subscription", async {
        while waiting.subscribed_channels() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(waiting.subscribed_channels(), 1);
    let shard = servers
        .cli(
            port_of(&owner),
            &["PUBSUB", "SHARDNUMSUB", names.channel.as_str()],
        )
        .await;
    assert_eq!(
        shard.lines().nth(1),
        Some("1"),
        "SHARDNUMSUB on {owner}: {shard}"
    );
    let classic = servers
        .cli(
            port_of(&owner),
            &["PUBSUB", "NUMSUB", names.channel.as_str()],
        )
        .await;
    assert_eq!(classic.lines().nth(1), Some("0"), "NUMSUB: {classic}");
    assert_eq!(granted.load(Ordering::SeqCst), 0);

    let holder_token = holder.token();
    holder.release().await.expect("release");
    within(60, "every waiter granted in turn", async {
        for handle in handles {
            handle.await.expect("waiter task");
        }
    })
    .await;
    assert_eq!(granted.load(Ordering::SeqCst), 8);
    let order = order.lock().unwrap().clone();
    let mut last = holder_token;
    for (_, token) in &order {
        assert!(
            *token > last,
            "tokens increase grant after grant: {order:?}"
        );
        last = *token;
    }
    // The last waiter gone, the subscription is dropped.
    within(30, "the subscription dropped", async {
        while waiting.subscribed_channels() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_wakes_a_waiter_on_another_client() {
    let url = cluster_url();
    let key = unique_key("force");
    let holder_client = fenced_testkit::connect(&url).await;
    let holder = holder_client
        .lock_with(&key, &LockOptions::new().lease(Duration::from_secs(60)))
        .await
        .expect("acquire");
    let waiting = backend(&url).await;
    let client = Client::new(waiting.clone());
    let waiter = {
        let key = key.clone();
        tokio::spawn(async move {
            client
                .lock_with(
                    &key,
                    &LockOptions::new()
                        .wait(Duration::from_secs(120))
                        .lease(Duration::from_secs(30)),
                )
                .await
                .expect("waiter")
        })
    };
    within(30, "the waiter's subscription", async {
        while waiting.subscribed_channels() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let admin = fenced_testkit::connect(&url).await;
    let broken = admin
        .force_release(&key)
        .await
        .expect("force release")
        .expect("a holder");
    assert_eq!(broken.token, Some(holder.token()));
    assert_eq!(broken.waiters, Some(1), "SHARDNUMSUB counts the waiter");
    let guard = within(60, "the waiter granted", waiter)
        .await
        .expect("task");
    assert!(guard.token() > holder.token());
    guard.release().await.expect("release");
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_waits_for_the_replica_of_the_locks_primary() {
    let url = cluster_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    // Every primary has one replica.
    let one =
        fenced_testkit::connect(&format!("{url}{sep}min_replicas=1&replica_timeout=5s")).await;
    for n in 0..6 {
        let key = unique_key(&format!("replicated-{n}"));
        let guard = one.lock(&key).await.expect("one replica acknowledges");
        guard.release().await.expect("release");
    }
    // Two cannot be had: the grant is given back, and the key is free again.
    let two =
        fenced_testkit::connect(&format!("{url}{sep}min_replicas=2&replica_timeout=100ms")).await;
    let key = unique_key("replicated-two");
    let e = two.try_lock(&key).await.unwrap_err();
    assert!(e.to_string().contains("not acquired (replication)"), "{e}");
    assert!(e.is_transient(), "{e}");
    assert!(one.holder(&key).await.expect("holder").is_none());
}

#[tokio::test]
async fn bad_urls_fail_clearly_without_the_password() {
    let url = cluster_url();
    let servers = Servers::from_url(&url);

    // Nothing listens on these ports.
    let e = fenced::connect("redis+cluster://:hunter2@127.0.0.1:1,127.0.0.1:2?timeout=1s")
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert_eq!(e.kind(), ErrorKind::Backend, "{text}");
    assert!(e.is_transient(), "{text}");
    assert!(
        text.contains("redis+cluster://:***@127.0.0.1:1,127.0.0.1:2"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // A wrong password.
    let wrong = format!(
        "redis+cluster://:hunter2@127.0.0.1:{}?timeout=2s",
        servers.ports[0]
    );
    let e = fenced::connect(&wrong).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(text.contains("password"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // Malformed lists and parameters: invalid configuration, no I/O.
    for (bad, says) in [
        ("redis+cluster://:hunter2@h:1,h:1", "twice"),
        ("redis+cluster://:hunter2@h:1,,h:2", "empty host"),
        ("redis+cluster://:hunter2@h:1/3", "only database 0"),
        (
            "redis+cluster://:hunter2@h:1?min_replicas=x",
            "number of replicas",
        ),
        (
            "redis+cluster://:hunter2@h:1?colour=red",
            "unknown parameter",
        ),
    ] {
        let e = fenced::connect(bad).await.unwrap_err();
        let text = format!("{e} {e:?}");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {text}");
        assert!(text.contains(says), "{bad}: {text}");
        assert!(!text.contains("hunter2"), "{bad}: {text}");
    }
}
