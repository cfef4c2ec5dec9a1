//! `fenced lock`, `unlock`, `status`, `release --force` and `watch` against real stores.

mod common;

use std::time::Duration;

use common::{Store, assert_exit, fenced, send, stderr, stdout};
use fenced::LockOptions;
use fenced_testkit::{unique_key, within};
use rustix::process::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_status_unlock() {
    for store in Store::all() {
        let key = unique_key("cli-lock");
        // `fenced lock` exits; the lock stays held (the embedded store must not free it as the
        // holder process ends).
        let out = fenced()
            .args([
                "lock",
                "--url",
                &store.url,
                "--key",
                &key,
                "--lease",
                "1m",
                "--label",
                "deploy by ci",
            ])
            .output()
            .await
            .unwrap();
        assert_exit(&out, 0, store.name);
        let text = stdout(&out);
        let (owner, token) = text.trim().split_once(' ').expect("OWNER TOKEN");
        let token: u64 = token.parse().unwrap();
        assert!(owner.parse::<fenced::OwnerId>().is_ok());

        let holder = store
            .client()
            .await
            .holder(&key)
            .await
            .unwrap()
            .expect("still held after fenced lock exited");
        assert_eq!(holder.token.map(|t| t.get()), Some(token));

        let out = fenced()
            .args(["status", "--url", &store.url, "--prefix", &key])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let table = stdout(&out);
        let row = table
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            row.contains("deploy by ci") && row.contains(&token.to_string()),
            "{row}"
        );
        assert!(
            table.lines().next().unwrap().starts_with("store: "),
            "{table}"
        );

        let out = fenced()
            .args(["status", "--url", &store.url, "--prefix", &key, "--json"])
            .output()
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        let locks = value["locks"].as_array().unwrap();
        assert_eq!(locks.len(), 1);
        assert_eq!(locks[0]["key"], key.as_str());
        assert_eq!(locks[0]["token"], token);
        assert_eq!(locks[0]["owner"], owner);
        assert!(locks[0]["remaining_ms"].as_u64().unwrap() > 0);

        let out = fenced()
            .args([
                "lock", "--url", &store.url, "--key", &key, "--lease", "1m", "--wait", "0",
                "--json",
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(75), "{}", store.name);
        assert!(stderr(&out).contains("deploy by ci"));

        let stranger = fenced::OwnerId::random().to_string();
        let out = fenced()
            .args([
                "unlock", "--url", &store.url, "--key", &key, "--owner", &stranger,
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(76), "{}", stderr(&out));
        assert!(
            store.client().await.holder(&key).await.unwrap().is_some(),
            "a stranger's unlock released it"
        );

        let out = fenced()
            .args([
                "unlock", "--url", &store.url, "--key", &key, "--owner", owner,
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(store.client().await.holder(&key).await.unwrap().is_none());

        let out = fenced()
            .args([
                "lock", "--url", &store.url, "--key", &key, "--lease", "1m", "--json",
            ])
            .output()
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        assert!(value["token"].as_u64().unwrap() > token);
        assert_eq!(value["lease_ms"], 60_000);
        store.client().await.force_release(&key).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_needs_force_and_tells_what_it_broke() {
    for store in Store::all() {
        let key = unique_key("cli-force");
        let client = store.client().await;
        let guard = client
            .lock_with(&key, &LockOptions::new().label("stuck job"))
            .await
            .unwrap();

        let out = fenced()
            .args(["release", "--url", &store.url, &key])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(stderr(&out).contains("--force"));
        assert!(
            client.holder(&key).await.unwrap().is_some(),
            "broken without --force"
        );

        let out = fenced()
            .args(["release", "--force", "--url", &store.url, &key])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("stuck job"), "{text}");
        assert!(text.contains(&guard.owner().to_string()), "{text}");
        assert!(text.contains(&guard.token().to_string()), "{text}");

        let next = client
            .try_lock(&key)
            .await
            .unwrap()
            .expect("free after the break");
        assert!(
            next.token() > guard.token(),
            "a broken holder's token was issued again"
        );
        next.release().await.unwrap();
        let out = fenced()
            .args(["release", "--force", "--url", &store.url, &key, "--json"])
            .output()
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(value["broken"], false);
        drop(guard);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_events() {
    for store in Store::all() {
        let prefix = unique_key("cli-watch");
        let client = store.client().await;
        let already = client.lock(format!("{prefix}/already")).await.unwrap();
        let mut watch = fenced()
            .args([
                "watch",
                "--url",
                &store.url,
                "--prefix",
                &prefix,
                "--json",
                "--interval",
                "50ms",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        let mut next_event = async || -> serde_json::Value {
            let line = within(30, "a watch event", lines.next_line())
                .await
                .unwrap()
                .expect("watch ended");
            serde_json::from_str(&line).expect("JSON event")
        };
        let e = next_event().await;
        assert_eq!(
            (e["event"].as_str(), e["token"].as_u64()),
            (Some("held"), Some(already.token().get()))
        );

        let key = format!("{prefix}/job");
        let guard = client.lock(&key).await.unwrap();
        let e = next_event().await;
        assert_eq!(
            (e["event"].as_str(), e["key"].as_str()),
            (Some("acquired"), Some(key.as_str()))
        );
        assert_eq!(e["token"].as_u64(), Some(guard.token().get()));
        guard.release().await.unwrap();
        let e = next_event().await;
        assert_eq!(
            (e["event"].as_str(), e["key"].as_str()),
            (Some("released"), Some(key.as_str()))
        );

        let short = client
            .lock_with(
                &key,
                &LockOptions::new()
                    .lease(Duration::from_millis(1500))
                    .renew(false),
            )
            .await
            .unwrap();
        let e = next_event().await;
        assert_eq!(e["event"].as_str(), Some("acquired"));
        let detached = fenced::LockGuard::detach(short);
        let e = next_event().await;
        assert_eq!(
            (e["event"].as_str(), e["token"].as_u64()),
            (Some("expired"), Some(detached.token.get()))
        );

        send(&watch, Signal::INT);
        let status = within(10, "watch exiting on SIGINT", watch.wait())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0));
        already.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_never_prints_the_password() {
    let store = Store::redis();
    let password = url::Url::parse(&store.url)
        .unwrap()
        .password()
        .expect("the test server has a password")
        .to_owned();
    for json in [false, true] {
        let mut cmd = fenced();
        cmd.env("FENCED_URL", &store.url)
            .args(["status", "--prefix", "nothing-here:"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains(&password), "password printed: {all}");
        assert!(all.contains("***"), "{all}");
    }
}

/// `fenced status` on Redlock names the nodes that started within `--max-lease` (the
/// delayed-restart rule) and says nothing when none did; other stores print no warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_about_young_redlock_nodes() {
    let store = Store::redlock();
    // Every node of the test run started less than a day ago, and more than a millisecond ago.
    let out = fenced()
        .args(["status", "--url", &store.url, "--max-lease", "24h"])
        .args(["--prefix", "nothing-here:"])
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0, store.name);
    let text = stdout(&out);
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 3, "{text}");
    for (n, warning) in warnings.iter().enumerate() {
        assert!(
            warning.contains(&format!("Redlock node {} ", n + 1))
                && warning.contains("delayed-restart rule"),
            "{warning}"
        );
    }
    // The nodes are named without their password.
    let password = store
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .expect("the test nodes have a password");
    assert!(!text.contains(password), "password printed: {text}");
    let out = fenced()
        .args([
            "status",
            "--url",
            &store.url,
            "--max-lease",
            "1ms",
            "--json",
        ])
        .args(["--prefix", "nothing-here:"])
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0, store.name);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(value["warnings"], serde_json::json!([]), "{value}");

    let other = Store::redis();
    let out = fenced()
        .args([
            "status",
            "--url",
            &other.url,
            "--max-lease",
            "24h",
            "--json",
        ])
        .args(["--prefix", "nothing-here:"])
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0, other.name);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(value["warnings"], serde_json::json!([]), "{value}");
}
