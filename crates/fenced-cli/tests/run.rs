//! `fenced run` end to end: the real binary against the embedded store and Redis.

mod common;

use std::time::Duration;

use common::{Store, assert_exit, fenced, send, stderr, stdout, until_held};
use fenced::LockOptions;
use fenced_testkit::{unique_key, within};
use rustix::process::Signal;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_the_command_with_the_token_and_propagates_its_exit_code() {
    for store in Store::all() {
        let key = unique_key("cli-run");
        let out = fenced()
            .args(["run", "--url", &store.url, "--key", &key, "--"])
            .args([
                "sh",
                "-c",
                "echo \"$FENCED_KEY $FENCED_TOKEN $FENCED_OWNER\"; exit 7",
            ])
            .output()
            .await
            .unwrap();
        assert_exit(&out, 7, store.name);
        let text = stdout(&out);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{text}");
        assert_eq!(fields[0], key);
        let token: u64 = fields[1].parse().expect("token is a number");
        assert!(fields[2].parse::<fenced::OwnerId>().is_ok());

        // Released after the command: the next run gets a higher token at once.
        let out = fenced()
            .args([
                "run",
                "--url",
                &store.url,
                "--key",
                &key,
                "--wait",
                "0",
                "--",
                "sh",
                "-c",
                "echo $FENCED_TOKEN",
            ])
            .output()
            .await
            .unwrap();
        assert_exit(&out, 0, store.name);
        let next: u64 = stdout(&out).trim().parse().unwrap();
        assert!(next > token, "{}: {next} after {token}", store.name);
        assert!(
            store.client().await.holder(&key).await.unwrap().is_none(),
            "lock left behind"
        );
    }
}

/// Many `fenced run` processes at once increment a counter file with a read-sleep-write body:
/// the count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_keep_exclusion() {
    for store in Store::all() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("counter");
        std::fs::write(&counter, "0").unwrap();
        let key = unique_key("cli-mutex");
        let body = format!(
            "v=$(cat {c}); sleep 0.02; echo $((v + 1)) > {c}.tmp && mv {c}.tmp {c}",
            c = counter.display()
        );
        let processes = 12;
        let mut children = Vec::new();
        for _ in 0..processes {
            children.push(
                fenced()
                    .args([
                        "run", "--url", &store.url, "--key", &key, "--wait", "60s", "--", "sh",
                        "-c", &body,
                    ])
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
        }
        for child in children {
            let out = within(120, "fenced run finishing", child.wait_with_output())
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {:?} {}",
                store.name,
                out.status,
                stderr(&out)
            );
        }
        let count: u64 = std::fs::read_to_string(&counter)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            count, processes,
            "{}: increments were lost, so two commands overlapped",
            store.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_lock_gives_75_and_sigterm_is_forwarded_then_released() {
    for store in Store::all() {
        let key = unique_key("cli-held");
        let marker = tempfile::NamedTempFile::new().unwrap();
        // The command records that it received SIGTERM.
        let script = format!(
            "trap 'echo got-term > {}; exit 3' TERM; while :; do sleep 0.05; done",
            marker.path().display()
        );
        let holder = fenced()
            .args([
                "run",
                "--url",
                &store.url,
                "--key",
                &key,
                "--label",
                "nightly on host-a",
                "--",
            ])
            .args(["sh", "-c", &script])
            .spawn()
            .unwrap();
        let info = until_held(&store.url, &key).await;
        assert_eq!(info.label.as_deref(), Some("nightly on host-a"));

        let out = fenced()
            .args([
                "run", "--url", &store.url, "--key", &key, "--wait", "0", "--", "true",
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(75), "{}", store.name);
        assert!(
            stderr(&out).contains("nightly on host-a"),
            "{}",
            stderr(&out)
        );

        send(&holder, Signal::TERM);
        let out = within(
            30,
            "fenced exiting after SIGTERM",
            holder.wait_with_output(),
        )
        .await
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}: the command's own exit code",
            store.name
        );
        assert_eq!(
            std::fs::read_to_string(marker.path()).unwrap().trim(),
            "got-term"
        );
        assert!(
            store.client().await.holder(&key).await.unwrap().is_none(),
            "lock left behind"
        );
    }
}

/// Steals the lock behind a running `fenced run` and returns its output.
async fn steal_behind(store: &Store, on_lost: &str, command: &[&str]) -> std::process::Output {
    let key = unique_key("cli-lost");
    let child = fenced()
        .args([
            "run",
            "--url",
            &store.url,
            "--key",
            &key,
            "--lease",
            "1s",
            "--grace",
            "5s",
            "--on-lost",
            on_lost,
            "--",
        ])
        .args(command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    until_held(&store.url, &key).await;
    let admin = store.client().await;
    admin.force_release(&key).await.unwrap();
    let thief = admin
        .lock_with(&key, &LockOptions::new().wait(Duration::from_secs(10)))
        .await
        .unwrap();
    let out = within(
        30,
        "fenced noticing the lost lock",
        child.wait_with_output(),
    )
    .await
    .unwrap();
    thief
        .release()
        .await
        .expect("the new holder's lock was untouched");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lock_stops_the_command_with_79() {
    for store in Store::all() {
        let out = steal_behind(&store, "term", &["sleep", "60"]).await;
        assert_exit(&out, 79, store.name);
        assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
        assert!(stderr(&out).contains("SIGTERM"), "{}", stderr(&out));

        // A command that ignores SIGTERM is killed with kill.
        let out = steal_behind(&store, "kill", &["sh", "-c", "trap '' TERM; sleep 60"]).await;
        assert_exit(&out, 79, store.name);

        // ignore: reported, and the command finishes with its own status.
        let out = steal_behind(&store, "ignore", &["sh", "-c", "sleep 2; echo finished"]).await;
        assert_exit(&out, 0, store.name);
        assert!(stdout(&out).contains("finished"));
        assert!(
            stderr(&out).contains("--on-lost ignore"),
            "{}",
            stderr(&out)
        );
    }
}

/// The progress display shows under a terminal and not in a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinner_under_a_terminal_only() {
    let store = Store::sqlite();
    let key = unique_key("cli-spinner");
    let client = store.client().await;
    let guard = client
        .lock_with(&key, &LockOptions::new().label("spinner test holder"))
        .await
        .unwrap();
    let cmdline = format!(
        "{} run --url {} --key {} --wait 2500ms -- true",
        env!("CARGO_BIN_EXE_fenced"),
        store.url,
        key
    );
    // `script` gives the command a pseudo-terminal and copies what it printed.
    let out = Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env_remove("FENCED_URL")
        .output()
        .await
        .expect("script(1) from util-linux");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(75), "{seen}");
    assert!(
        seen.contains(&format!("waiting for {key}")),
        "no progress display under a terminal: {seen:?}"
    );
    assert!(seen.contains("held by spinner test holder for"), "{seen:?}");

    let out = fenced()
        .args([
            "run", "--url", &store.url, "--key", &key, "--wait", "1500ms", "--", "true",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(
        !stderr(&out).contains("waiting for"),
        "progress display in a pipe: {}",
        stderr(&out)
    );
    guard.release().await.unwrap();
}

/// `--metrics-addr` serves the documented series while the command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_documented_series() {
    let store = Store::sqlite();
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let key = unique_key("cli-metrics");
    let fetch = format!(
        "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    );
    let addr = format!("127.0.0.1:{port}");
    let out = fenced()
        .args([
            "run",
            "--url",
            &store.url,
            "--key",
            &key,
            "--metrics-addr",
            &addr,
            "--metric-name",
            "nightly",
            "--",
        ])
        .args(["python3", "-c", &fetch])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for series in ["fenced_acquire_duration_seconds_bucket", "fenced_holders{"] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    assert!(text.contains("lock=\"nightly\""), "{text}");
    assert!(text.contains("outcome=\"acquired\""), "{text}");
    assert!(!text.contains(&key), "the raw key is a label: {text}");
}
