//! The fenced backend conformance suite and test helpers.
//!
//! Every backend's tests call the same suite ([`suite`]) through [`conformance_tests!`], against a
//! real store named by a URL. Parts that need several OS processes run the
//! `fenced-conformance-worker` binary of this crate; parts that a backend's
//! [`Capabilities`](fenced::Capabilities) rule out (cross-process checks on an in-process store)
//! are not registered for it, so no backend fakes a feature.
//!
//! ```no_run
//! // crates/fenced-testkit/tests/memory.rs
//! fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
//!     "memory://conformance",
//!     env!("CARGO_BIN_EXE_fenced-conformance-worker"),
//! ));
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fenced::Client;

pub mod critical;
pub mod suite;

/// Reads a backend's own command counter (for example Redis `INFO commandstats`): the number of
/// commands the server has executed so far.
pub type ServerCounter = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = u64> + Send>> + Send + Sync>;

/// How the suite reaches one backend.
#[derive(Clone)]
pub struct Harness {
    url: String,
    worker: PathBuf,
    counting: Option<(String, ServerCounter)>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("url", &fenced::redact(&self.url))
            .field("worker", &self.worker)
            .field("server_counter", &self.counting.is_some())
            .finish()
    }
}

impl Harness {
    /// A harness for the store at `url`; `worker` is the path of the `fenced-conformance-worker`
    /// binary (`env!("CARGO_BIN_EXE_fenced-conformance-worker")` in this crate's tests).
    pub fn new(url: impl Into<String>, worker: impl Into<PathBuf>) -> Self {
        Harness {
            url: url.into(),
            worker: worker.into(),
            counting: None,
        }
    }

    /// A harness whose URL comes from the environment variable `var`. Panics with a clear
    /// message when it is unset: the server was not started, and the test must fail, not skip.
    pub fn from_env(var: &str, worker: impl Into<PathBuf>) -> Self {
        Harness::new(require_env(var), worker)
    }

    /// Adds a server-side command counter for the checks that count commands. `url` must name a
    /// server (or database) that only the counting checks use, so that other tests running in
    /// parallel do not disturb the count.
    pub fn with_server_counter(mut self, url: impl Into<String>, counter: ServerCounter) -> Self {
        self.counting = Some((url.into(), counter));
        self
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The worker binary.
    pub fn worker(&self) -> &std::path::Path {
        &self.worker
    }

    pub(crate) fn counting(&self) -> Option<&(String, ServerCounter)> {
        self.counting.as_ref()
    }

    /// A new client for the store (a new connection, as another service instance would have).
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

/// Connects or panics with the (redacted) URL and the error.
pub async fn connect(url: &str) -> Client {
    match fenced::connect(url).await {
        Ok(client) => client,
        Err(e) => panic!("cannot connect to {}: {e}", fenced::redact(url)),
    }
}

/// The value of the environment variable `var`, or a panic explaining how to start the servers.
pub fn require_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set, so the server this test needs was not started. Run the suite with \
             `scripts/test` (it installs and starts the servers), or start them with `scripts/servers` \
             and export the variables it prints."
        ),
    }
}

/// A key no other test uses: `conformance:<name>:<random>`.
pub fn unique_key(name: &str) -> String {
    format!("conformance:{name}:{:016x}", rand::random::<u64>())
}

/// Awaits `fut`, panicking with `what` if it takes longer than `secs` seconds. A guard against
/// hanging tests, not a timing assertion.
pub async fn within<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not happen within {secs}s"),
    }
}

/// Generates one `#[tokio::test]` per conformance check for the harness expression given.
/// Checks that need several OS processes are generated only for backends whose safety level
/// reaches beyond one process (they check this at run time through the capabilities).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@tests $harness;
            basics,
            mutual_exclusion,
            fencing_tokens_increase,
            crashed_holder_expires,
            renewal_keeps_lock,
            lost_on_delete_cancels_work,
            lost_on_takeover,
            max_hold_is_a_hard_cap,
            non_owner_release_rejected,
            deadline_counts_from_grant,
            cancel_safety,
            cancelled_acquisitions_leave_nothing,
            waiting_is_notification_driven,
            bad_input_no_io,
            list_shows_holders,
            waiters_show_while_clients_wait
        );
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness: $crate::Harness = $harness;
                $crate::suite::$name(&harness).await;
            }
        )*
    };
}
