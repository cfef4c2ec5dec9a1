//! Worker process for the fenced conformance suite.
//!
//! ```text
//! fenced-conformance-worker count <url> <key> <dir> <tasks> <iterations>
//! fenced-conformance-worker hold  <url> <key> <lease-ms>
//! fenced-conformance-worker token <url> <key>
//! ```
//! `count` runs the shared critical section (see `fenced_testkit::critical`) `tasks` ×
//! `iterations` times; `hold` acquires, prints `granted <token>` and sleeps until killed;
//! `token` acquires, prints `token <token>` and releases.

use std::process::ExitCode;
use std::time::Duration;

use fenced::LockOptions;
use fenced_testkit::critical::Section;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fenced-conformance-worker: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .ok_or_else(|| format!("missing argument {i}"))
    };
    let number = |i: usize| -> Result<u64, String> {
        arg(i)?.parse().map_err(|e| format!("argument {i}: {e}"))
    };
    match arg(0)?.as_str() {
        "count" => {
            let client = fenced::connect(&arg(1)?).await.map_err(|e| e.to_string())?;
            let key = arg(2)?;
            let section = Section::new(arg(3)?);
            let (tasks, iterations) = (number(4)?, number(5)?);
            let mut handles = Vec::new();
            for _ in 0..tasks {
                let (client, key, section) = (client.clone(), key.clone(), section.clone());
                handles.push(tokio::spawn(async move {
                    let options = LockOptions::new()
                        .wait(Duration::from_secs(120))
                        .lease(Duration::from_secs(10));
                    for _ in 0..iterations {
                        let guard = client
                            .lock_with(&key, &options)
                            .await
                            .map_err(|e| e.to_string())?;
                        section
                            .enter(guard.token().get(), Duration::from_millis(1))
                            .await?;
                        guard.release().await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                }));
            }
            for h in handles {
                h.await.map_err(|e| e.to_string())??;
            }
            println!("ok");
            Ok(())
        }
        "hold" => {
            let client = fenced::connect(&arg(1)?).await.map_err(|e| e.to_string())?;
            let options = LockOptions::new().lease(Duration::from_millis(number(3)?));
            let guard = client
                .lock_with(arg(2)?, &options)
                .await
                .map_err(|e| e.to_string())?;
            println!("granted {}", guard.token());
            std::future::pending::<()>().await;
            Ok(())
        }
        "token" => {
            let client = fenced::connect(&arg(1)?).await.map_err(|e| e.to_string())?;
            let guard = client.lock(arg(2)?).await.map_err(|e| e.to_string())?;
            println!("token {}", guard.token());
            guard.release().await.map_err(|e| e.to_string())
        }
        other => Err(format!("unknown command {other:?}")),
    }
}
