//! The conformance suite on the Redis Sentinel backend (`redis+sentinel://`), against the
//! primary that the Sentinels named by `FENCED_TEST_REDIS_SENTINEL_URL` monitor (a primary with
//! two replicas under three Sentinels; `scripts/test` and `scripts/servers` start them). Without
//! them every check fails, none skips.
//!
//! Besides the suite: bad input fails clearly and never shows a password (no primary name, a name
//! the Sentinels do not know, no Sentinel reachable, a data node or a Sentinel password refused,
//! a data node listed as a Sentinel); the Sentinels' password is theirs (`sentinel_password`) and
//! the data nodes' is theirs; `rediss+sentinel://` talks TLS to a Sentinel and a primary of the
//! check's own; and the client follows its primary through a graceful failover
//! (`SENTINEL FAILOVER`) and a crash (kill -9) of a group the check starts itself — the shared
//! group is never failed over here, other tests use it at the same time.
#![cfg(feature = "redis-sentinel")]

use std::time::Duration;

use fenced::{Client, ErrorKind, LockOptions};
use fenced_testkit::{Harness, require_env, unique_key, within};

mod support;
use support::{RedisProcess, start_sentinel};

fenced_testkit::conformance_tests!(Harness::from_env(
    "FENCED_TEST_REDIS_SENTINEL_URL",
    env!("CARGO_BIN_EXE_fenced-conformance-worker"),
));

/// The name the check's own Sentinels monitor their primary under.
const NAME: &str = "failover-check";

/// A primary with two replicas under three Sentinels, all of the check's own. No passwords.
struct Group {
    /// The data nodes still running (a killed one is removed).
    nodes: Vec<RedisProcess>,
    sentinels: Vec<RedisProcess>,
    dir: tempfile::TempDir,
}

impl Group {
    async fn start() -> Group {
        let dir = tempfile::tempdir().expect("temp dir");
        // Replicas sync at once (no diskless sync delay), so that a demoted primary catches up
        // quickly.
        let quick = ["--repl-diskless-sync-delay", "0"];
        let primary = RedisProcess::start_with(&dir.path().join("primary"), &quick).await;
        let port = primary.port.to_string();
        let mut nodes = vec![primary];
        for n in 0..2 {
            let replica = dir.path().join(format!("replica-{n}"));
            let args = [&quick[..], &["--replicaof", "127.0.0.1", &port]].concat();
            nodes.push(RedisProcess::start_with(&replica, &args).await);
        }
        let port = nodes[0].port;
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let sentinel = dir.path().join(format!("sentinel-{n}"));
            sentinels.push(start_sentinel(&sentinel, NAME, port, &[]).await);
        }
        let group = Group {
            nodes,
            sentinels,
            dir,
        };
        group.settled(port, 2).await;
        group
    }

    /// `redis+sentinel://` with every Sentinel, then `query`.
    fn url(&self, query: &str) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{NAME}{query}", hosts.join(","))
    }

    /// The running data node on `port`.
    fn node(&self, port: u16) -> &RedisProcess {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no running node on port {port}"))
    }

    /// The primary's port as the Sentinel `sentinel` names it.
    async fn named_by(&self, sentinel: usize) -> Option<u16> {
        let answer = self.sentinels[sentinel]
            .cli(&["SENTINEL", "get-master-addr-by-name", NAME])
            .await;
        answer.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// Waits until every Sentinel names `primary`, with no failover in progress (flags `master`
    /// only), and sees every other Sentinel and at least `replicas` replicas, and the primary has
    /// that many replicas whose link is up.
    async fn settled(&self, primary: u16, replicas: usize) {
        self.within("the Sentinels agreeing on the primary", async {
            loop {
                let mut agreed = true;
                for (n, sentinel) in self.sentinels.iter().enumerate() {
                    let master = sentinel.cli(&["SENTINEL", "master", NAME]).await;
                    agreed &= self.named_by(n).await == Some(primary)
                        && text_field(&master, "flags") == Some("master")
                        && field(&master, "num-other-sentinels") == Some(2)
                        && field(&master, "num-slaves") >= Some(replicas as u64);
                }
                let info = self.node(primary).cli(&["INFO", "replication"]).await;
                agreed &= info.contains("role:master")
                    && info.matches("state=online").count() >= replicas;
                if agreed {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// Waits until a majority of the Sentinels name the same primary other than `old`, and it
    /// answers as one; its port.
    async fn moved_from(&self, old: u16) -> u16 {
        self.within("the Sentinels naming a new primary", async {
            loop {
                let mut named = Vec::new();
                for n in 0..self.sentinels.len() {
                    named.extend(self.named_by(n).await.filter(|p| *p != old));
                }
                for port in &named {
                    if named.iter().filter(|p| *p == port).count() * 2 > self.sentinels.len()
                        && self.nodes.iter().any(|n| n.port == *port)
                        && self.node(*port).cli(&["ROLE"]).await.starts_with("master")
                    {
                        return *port;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Awaits `fut` for at most 25 s; on timeout, panics with the end of every Sentinel's log
    /// (what they saw and did) next to `what`.
    async fn within<F: std::future::Future>(&self, what: &str, fut: F) -> F::Output {
        if let Ok(out) = tokio::time::timeout(Duration::from_secs(25), fut).await {
            return out;
        }
        let mut logs = String::new();
        for n in 0..self.sentinels.len() {
            let path = self.dir.path().join(format!("sentinel-{n}/sentinel.log"));
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            logs.push_str(&format!("\n--- sentinel {n} ---\n{tail}"));
        }
        panic!("{what} did not happen within 25s; the Sentinels' logs end with:{logs}");
    }

    /// Kills the data node on `port` (SIGKILL) and forgets it.
    async fn kill(&mut self, port: u16) {
        support::kill_node(&mut self.nodes, port).await;
    }
}

/// The number after `name` in redis-cli's flat output of a field/value reply.
fn field(flat: &str, name: &str) -> Option<u64> {
    text_field(flat, name)?.parse().ok()
}

/// The line after `name` in redis-cli's flat output of a field/value reply.
fn text_field<'a>(flat: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = flat.lines().map(str::trim);
    lines.find(|l| *l == name)?;
    lines.next()
}

async fn client(url: &str) -> Client {
    fenced::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", fenced::redact(url)))
}

/// The credentials (`:PASSWORD@`, or nothing) and the Sentinels (`h:p,h:p,…`) of a
/// `redis+sentinel://[:PASSWORD@]S1,S2,S3/name` URL.
fn rest_of(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("redis+sentinel://")
        .expect("a redis+sentinel:// URL");
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((credentials, rest)) => (format!("{credentials}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, _) = rest.split_once('/').expect("a primary name");
    (credentials, hosts.to_owned())
}

/// The token of the lock hash of `key` on a data node, if it holds one.
async fn token_on(node: &RedisProcess, key: &str) -> Option<u64> {
    let lock = format!("fenced:{{{key}}}:lock");
    node.cli(&["HGET", &lock, "token"])
        .await
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_primary_through_a_graceful_failover_and_a_crash() {
    let mut group = Group::start().await;
    let first = group.nodes[0].port;
    let url = group.url("?min_replicas=1");
    let key = unique_key("sentinel-failover");
    let channel = format!("fenced:{{{key}}}:released");
    let a = client(&url).await;
    let b = client(&url).await;

    // A holds the lock (acknowledged by a replica); B waits for it, subscribed on the primary.
    let held = LockOptions::new().lease(Duration::from_secs(60));
    let guard = a.lock_with(&key, &held).await.expect("A's grant");
    let waiting = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move {
            let options = LockOptions::new()
                .lease(Duration::from_secs(60))
                .wait(Duration::from_secs(50));
            b.lock_with(&key, &options).await
        })
    };
    within(10, "B subscribed on the first primary", async {
        while !group
            .node(first)
            .cli(&["PUBSUB", "NUMSUB", &channel])
            .await
            .ends_with("1\n")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A graceful failover: the lock was replicated, so it survives on the new primary.
    let answer = group.sentinels[0]
        .cli(&["SENTINEL", "FAILOVER", NAME])
        .await;
    assert_eq!(answer.trim(), "OK", "SENTINEL FAILOVER");
    let second = group.moved_from(first).await;
    assert_eq!(
        token_on(group.node(second), &key).await,
        Some(guard.token().get()),
        "A's grant is not on the new primary"
    );

    // B's waiter follows: its backend subscribes again on the new primary.
    within(10, "B subscribed on the new primary", async {
        while !group
            .node(second)
            .cli(&["PUBSUB", "NUMSUB", &channel])
            .await
            .ends_with("1\n")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A extends on the new primary: the lease it asks for (90 s, above the 60 s granted) shows
    // up there. The old primary stays writable until the Sentinels demote it, so an extension
    // that reached it instead would leave the new primary's lease at most 60 s.
    within(10, "A's extension reaching the new primary", async {
        loop {
            // A command caught by the move fails as transient; the next one goes to the new
            // primary.
            match guard.extend(Duration::from_secs(90)).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => {}
                Err(e) => panic!("extend: {e}"),
            }
            let lock = format!("fenced:{{{key}}}:lock");
            let pttl: i64 = group
                .node(second)
                .cli(&["PTTL", &lock])
                .await
                .trim()
                .parse()
                .unwrap_or(-2);
            if pttl > 60_000 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(guard.is_valid(), "A lost its lock in the failover");
    assert!(
        !waiting.is_finished(),
        "B was granted while A held the lock"
    );

    // A releases on the new primary; B is woken there and granted with a higher token. Its wait
    // would otherwise last until A's lease (90 s) ends.
    let a_token = guard.token();
    guard.release().await.expect("A's release");
    let b_guard = within(20, "B granted after A's release", waiting)
        .await
        .expect("B's task")
        .expect("B's grant");
    assert!(
        b_guard.token() > a_token,
        "B's token {} is not above A's {a_token}",
        b_guard.token()
    );
    assert_eq!(
        token_on(group.node(second), &key).await,
        Some(b_guard.token().get()),
        "B's grant is not on the new primary"
    );
    let b_token = b_guard.token();
    b_guard.release().await.expect("B's release");

    // The new primary crashes: the Sentinels promote another replica and both clients follow.
    // First the old primary becomes a replica of the new one, as the Sentinels would make it
    // some seconds later (until then it is a second writable primary, and the Sentinels could
    // hand the role back to it).
    let demoted = group
        .node(first)
        .cli(&["REPLICAOF", "127.0.0.1", &second.to_string()])
        .await;
    assert_eq!(demoted.trim(), "OK", "REPLICAOF on the old primary");
    group.settled(second, 2).await;
    group.kill(second).await;
    let third = group.moved_from(second).await;
    for (name, client) in [("A", &a), ("B", &b)] {
        let next = unique_key("sentinel-after-crash");
        let guard = group
            .within("a grant on the next primary", async {
                loop {
                    match client.try_lock(&next).await {
                        Ok(Some(guard)) => return guard,
                        Ok(None) => panic!("{name}: {next} is held by nobody, but was not granted"),
                        Err(e) if e.is_transient() => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("{name}: {e}"),
                    }
                }
            })
            .await;
        assert_eq!(
            token_on(group.node(third), &next).await,
            Some(guard.token().get()),
            "{name}'s grant is not on the primary the Sentinels name"
        );
        guard.release().await.expect("release on the next primary");
    }
    // And the first key again: its token is still above every earlier one.
    let again = within(10, "the first key granted again", a.lock_with(&key, &held))
        .await
        .expect("the first key on the next primary");
    assert!(
        again.token() > b_token,
        "the token {} after the crash is not above B's {b_token}",
        again.token()
    );
    again.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_clear_and_never_shows_a_password() {
    let shared = require_env("FENCED_TEST_REDIS_SENTINEL_URL");
    let (_, hosts) = rest_of(&shared);

    let expect = |url: String, kind: ErrorKind, says: &'static str| async move {
        let e = fenced::connect(&url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{} connected", fenced::redact(&url)));
        let text = format!("{e} {e:?}");
        assert_eq!(e.kind(), kind, "{}: {text}", fenced::redact(&url));
        assert!(text.contains(says), "{}: {text}", fenced::redact(&url));
        assert!(!text.contains("hunter2"), "{text}");
        e
    };

    // A name the Sentinels do not monitor.
    let e = expect(
        format!("redis+sentinel://:hunter2@{hosts}/no-such-primary"),
        ErrorKind::InvalidConfig,
        "monitors a primary named \"no-such-primary\"",
    )
    .await;
    assert!(!e.is_transient());
    // No primary name at all (no I/O).
    expect(
        format!("redis+sentinel://:hunter2@{hosts}"),
        ErrorKind::InvalidConfig,
        "names no primary",
    )
    .await;
    // No Sentinel reachable (nothing listens on ports 1 and 2): transient.
    let e = expect(
        "redis+sentinel://:hunter2@127.0.0.1:1,127.0.0.1:2/fenced?timeout=1s".to_owned(),
        ErrorKind::Backend,
        "no Sentinel",
    )
    .await;
    assert!(e.is_transient(), "{e}");
    // The data nodes refuse the password.
    let e = expect(
        format!("redis+sentinel://:hunter2@{hosts}/fenced"),
        ErrorKind::Backend,
        "password",
    )
    .await;
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.to_string().matches("rejected").count(), 1, "{e}");
    // The Sentinels take no password.
    let e = expect(
        format!("redis+sentinel://:hunter2@{hosts}/fenced?sentinel_password=hunter2"),
        ErrorKind::Backend,
        "sentinel_password",
    )
    .await;
    assert!(!e.is_transient(), "{e}");
    // A data node listed as a Sentinel.
    let dir = tempfile::tempdir().expect("temp dir");
    let plain = RedisProcess::start(dir.path(), None).await;
    expect(
        format!("redis+sentinel://:hunter2@127.0.0.1:{}/fenced", plain.port),
        ErrorKind::InvalidConfig,
        "is not a Sentinel",
    )
    .await;

    // A Sentinel that accepts connections but never answers, listed first, delays nothing:
    // the Sentinels are asked at once and the first primary found wins.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let silent_port = silent.local_addr().expect("address").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let (credentials, _) = rest_of(&shared);
    let url =
        format!("redis+sentinel://{credentials}127.0.0.1:{silent_port},{hosts}/fenced?timeout=2s");
    let client = within(
        10,
        "connecting past a silent Sentinel",
        fenced::connect(&url),
    )
    .await
    .unwrap_or_else(|e| panic!("a silent first Sentinel stopped the connection: {e}"));
    let key = unique_key("sentinel-silent");
    client
        .lock(&key)
        .await
        .expect("grant")
        .release()
        .await
        .expect("release");
    held.abort();

    // Both passwords are hidden by redaction.
    let shown = fenced::redact("redis+sentinel://:hunter2@h1,h2/m?sentinel_password=hunter2");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_credentials_are_their_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The data node takes one password, the Sentinel another (each set once it answers).
    let primary = RedisProcess::start(&dir.path().join("primary"), None).await;
    let set = primary
        .cli(&["CONFIG", "SET", "requirepass", "data-pw"])
        .await;
    assert_eq!(set.trim(), "OK", "requirepass on the data node");
    let auth_pass = format!("sentinel auth-pass {NAME} data-pw");
    let sentinel = start_sentinel(
        &dir.path().join("sentinel"),
        NAME,
        primary.port,
        &[&auth_pass],
    )
    .await;
    let set = sentinel
        .cli(&["ACL", "SETUSER", "default", "resetpass", ">sentinel-pw"])
        .await;
    assert_eq!(set.trim(), "OK", "a password on the Sentinel");
    let base = format!(
        "redis+sentinel://:data-pw@127.0.0.1:{}/{NAME}",
        sentinel.port
    );
    let client = client(&format!("{base}?sentinel_password=sentinel-pw")).await;
    // The backend's +switch-master subscription got in with the Sentinel's password too.
    within(10, "the backend subscribed on the Sentinel", async {
        while !sentinel
            .cli(&["-a", "sentinel-pw", "--no-auth-warning", "CLIENT", "LIST"])
            .await
            .contains("sub=1")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let key = unique_key("sentinel-credentials");
    client
        .lock(&key)
        .await
        .expect("a grant through a Sentinel with a password")
        .release()
        .await
        .expect("release");

    // Without the Sentinel's password: the error says where the password goes.
    let e = fenced::connect(&base)
        .await
        .expect_err("connected without the Sentinel's password");
    let text = e.to_string();
    assert!(text.contains("sentinel_password"), "{text}");
    assert!(
        !text.contains("data-pw") && !text.contains("sentinel-pw"),
        "{text}"
    );
    // A wrong one: refused, and not shown.
    let e = fenced::connect(&format!("{base}?sentinel_password=not-it-4321"))
        .await
        .expect_err("connected with a wrong Sentinel password");
    let text = format!("{e} {e:?}");
    assert!(
        text.contains("refused sentinel_user/sentinel_password"),
        "{text}"
    );
    assert!(
        !text.contains("not-it-4321") && !text.contains("data-pw"),
        "{text}"
    );
}

/// A throwaway CA and a certificate for localhost/127.0.0.1 in `dir` (`ca.crt`, `server.crt`,
/// `server.key`), made with the `openssl` command.
async fn tls_material(dir: &std::path::Path) {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("san.ext");
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=fenced-test-CA",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 \
         -extfile san.ext",
    ] {
        let out = tokio::process::Command::new("openssl")
            .current_dir(dir)
            .args(args.split_whitespace())
            .output()
            .await
            .expect("openssl (Debian openssl)");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_sentinels_and_the_primary() {
    let dir = tempfile::tempdir().expect("temp dir");
    tls_material(dir.path()).await;
    let file = |name: &str| {
        dir.path()
            .join(name)
            .to_str()
            .expect("UTF-8 temp dir")
            .to_owned()
    };
    let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    // A primary that also listens with TLS (its plain port only answers the helpers' redis-cli).
    let tls_port = fenced_proof::server::free_port()
        .expect("free port")
        .to_string();
    let primary = RedisProcess::start_with(
        &dir.path().join("primary"),
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    // A Sentinel that answers with TLS too and watches the primary's TLS port.
    let sentinel_tls = fenced_proof::server::free_port().expect("free port");
    let lines = [
        format!("tls-port {sentinel_tls}"),
        format!("tls-cert-file {cert}"),
        format!("tls-key-file {key}"),
        format!("tls-ca-cert-file {ca}"),
        "tls-auth-clients no".to_owned(),
        "tls-replication yes".to_owned(),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let tls_primary: u16 = tls_port.parse().expect("port");
    let sentinel = start_sentinel(&dir.path().join("sentinel"), NAME, tls_primary, &lines).await;
    within(10, "the Sentinel naming the primary", async {
        while !sentinel
            .cli(&["SENTINEL", "master", NAME])
            .await
            .contains("master")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let url = format!("rediss+sentinel://127.0.0.1:{sentinel_tls}/{NAME}?tls_ca={ca}");
    let client = client(&url).await;
    let key = unique_key("sentinel-tls");
    let guard = client.lock(&key).await.expect("a grant over TLS");
    assert_eq!(token_on(&primary, &key).await, Some(guard.token().get()));
    guard.release().await.expect("release");

    // Without the CA, the Sentinel's certificate is not trusted: a clear error, no connection.
    let e = fenced::connect(&format!(
        "rediss+sentinel://127.0.0.1:{sentinel_tls}/{NAME}"
    ))
    .await
    .expect_err("connected without trusting the CA");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("tls_ca"), "{e}");
    // And plain text to the TLS port fails too.
    let e = fenced::connect(&format!(
        "redis+sentinel://127.0.0.1:{sentinel_tls}/{NAME}?timeout=1s"
    ))
    .await
    .expect_err("connected in plain text to a TLS port");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
}
