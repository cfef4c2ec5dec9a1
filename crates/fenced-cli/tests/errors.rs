//! Exit codes for bad input and failing backends: one clear line, the documented code, no lock
//! left behind.

mod common;

use common::{Store, fenced, stderr};
use fenced_testkit::unique_key;

/// Runs `fenced` with `args`; returns (exit code, stderr).
async fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = fenced().args(args).output().await.unwrap();
    (out.status.code(), stderr(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_usage_error_and_takes_no_lock() {
    let store = Store::sqlite();
    let key = unique_key("cli-bad");
    let url = store.url.as_str();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("missing --key", vec!["run", "--url", url, "--", "true"]),
        ("missing command", vec!["run", "--url", url, "--key", &key]),
        (
            "empty key",
            vec!["run", "--url", url, "--key", "", "--", "true"],
        ),
        (
            "negative wait",
            vec![
                "run", "--url", url, "--key", &key, "--wait", "-1", "--", "true",
            ],
        ),
        (
            "zero lease",
            vec![
                "run", "--url", url, "--key", &key, "--lease", "0", "--", "true",
            ],
        ),
        (
            "bad duration",
            vec![
                "run", "--url", url, "--key", &key, "--wait", "soon", "--", "true",
            ],
        ),
        (
            "malformed URL",
            vec!["run", "--url", "redis://[::1", "--key", &key, "--", "true"],
        ),
        (
            "unknown scheme",
            vec![
                "run",
                "--url",
                "gopher://u:secret@host",
                "--key",
                &key,
                "--",
                "true",
            ],
        ),
        (
            "command not found",
            vec![
                "run",
                "--url",
                url,
                "--key",
                &key,
                "--",
                "/nonexistent/command",
            ],
        ),
        (
            "command not in PATH",
            vec![
                "run",
                "--url",
                url,
                "--key",
                &key,
                "--",
                "no-such-command-xyz",
            ],
        ),
        (
            "lock without lease",
            vec!["lock", "--url", url, "--key", &key],
        ),
        (
            "lock on memory://",
            vec!["lock", "--url", "memory://", "--key", &key, "--lease", "1m"],
        ),
        (
            "bad owner id",
            vec!["unlock", "--url", url, "--key", &key, "--owner", "me"],
        ),
        (
            "release without --force",
            vec!["release", "--url", url, &key],
        ),
        ("unknown subcommand", vec!["frobnicate"]),
        (
            "bad --on-lost",
            vec![
                "run",
                "--url",
                url,
                "--key",
                &key,
                "--on-lost",
                "panic",
                "--",
                "true",
            ],
        ),
    ];
    for (what, args) in cases {
        let (code, err) = run(&args).await;
        assert_eq!(code, Some(64), "{what}: {err}");
        assert!(!err.trim().is_empty(), "{what}: no message");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(!err.contains("secret"), "{what}: password printed: {err}");
        // fenced's own messages are one line; argument errors found by the parser add a usage hint.
        if err.starts_with("fenced:") {
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{what}: not one line: {err}"
            );
        } else {
            assert!(err.starts_with("error:"), "{what}: {err}");
        }
    }
    assert!(
        store.client().await.holder(&key).await.unwrap().is_none(),
        "bad input left a lock behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backends_have_their_codes() {
    let key = unique_key("cli-backend");
    // Nothing listens on port 1.
    let (code, err) = run(&[
        "run",
        "--url",
        "redis://127.0.0.1:1/0",
        "--key",
        &key,
        "--",
        "true",
    ])
    .await;
    assert_eq!(code, Some(69), "unreachable: {err}");

    let redis = Store::redis();
    let parsed = url::Url::parse(&redis.url).unwrap();
    let bad = format!(
        "redis://:not-the-password-1234@{}:{}/0",
        parsed.host_str().unwrap(),
        parsed.port().unwrap()
    );
    let (code, err) = run(&["run", "--url", &bad, "--key", &key, "--", "true"]).await;
    assert_eq!(code, Some(77), "wrong password: {err}");
    assert!(!err.contains("not-the-password-1234"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Sentinels that do not answer (nothing listens on ports 1 and 2).
    let (code, err) = run(&[
        "status",
        "--url",
        "redis+sentinel://:not-the-password-1234@127.0.0.1:1,127.0.0.1:2/primary?timeout=1s",
    ])
    .await;
    assert_eq!(code, Some(69), "no Sentinel reachable: {err}");
    assert!(err.contains("no Sentinel"), "{err}");
    assert!(!err.contains("not-the-password-1234"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_status_and_signals_pass_through() {
    let store = Store::sqlite();
    let key = unique_key("cli-status");
    let (code, _) = run(&[
        "run", "--url", &store.url, "--key", &key, "--", "sh", "-c", "exit 42",
    ])
    .await;
    assert_eq!(code, Some(42));
    let (code, _) = run(&[
        "run",
        "--url",
        &store.url,
        "--key",
        &key,
        "--",
        "sh",
        "-c",
        "kill -9 $$",
    ])
    .await;
    assert_eq!(code, Some(128 + 9), "killed by SIGKILL");
    let out = fenced().arg("--help").output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("fenced run --key"), "{help}");
    for sub in ["run", "lock", "unlock", "status", "release", "watch"] {
        let out = fenced().args([sub, "--help"]).output().await.unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "{sub} --help has no example: {help}"
        );
    }
    assert!(store.client().await.holder(&key).await.unwrap().is_none());
}
