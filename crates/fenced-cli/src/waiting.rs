//! The progress display while waiting for a lock: only when stderr is a terminal.
//!
//! It shows the elapsed wait and who holds the lock ("waiting for order:42 — held by host-a pid
//! 123 for 3.2s"). The holder is read once a second for the display only; the wait itself is
//! driven by the backend's notifications.

use std::future::Future;
use std::time::Duration;

use fenced::{Client, HolderInfo};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Ui;

/// Runs `acquire`, showing a spinner on a terminal while it is pending.
pub(crate) async fn with_progress<F: Future>(
    ui: Ui,
    client: &Client,
    key: &str,
    acquire: F,
) -> F::Output {
    if ui.quiet || !ui.tty {
        return acquire.await;
    }
    tokio::pin!(acquire);
    // No display at all for locks that are free: only start it after a short moment.
    if let Ok(out) = tokio::time::timeout(Duration::from_millis(150), &mut acquire).await {
        return out;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("waiting for {key}"));
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    let out = loop {
        tokio::select! {
            out = &mut acquire => break out,
            _ = refresh.tick() => {
                if let Ok(holder) = client.holder(key).await {
                    bar.set_message(describe(key, holder.as_ref()));
                }
            }
        }
    };
    bar.finish_and_clear();
    out
}

fn describe(key: &str, holder: Option<&HolderInfo>) -> String {
    let Some(holder) = holder else {
        return format!("waiting for {key}");
    };
    let who = holder.label.as_deref().unwrap_or("another owner");
    match holder.age {
        Some(age) => format!(
            "waiting for {key} — held by {who} for {:.1}s",
            age.as_secs_f64()
        ),
        None => format!("waiting for {key} — held by {who}"),
    }
}
