//! The conformance suite on the PostgreSQL backend in both modes, against the server named by
//! `FENCED_TEST_PG_URL`, plus PostgreSQL's own checks. `scripts/test` starts the server; without
//! it every check fails, none skips.
#![cfg(feature = "postgres")]

use fenced_testkit::{Harness, require_env};

fn url() -> String {
    require_env("FENCED_TEST_PG_URL")
}

/// The session-mode URL (a short session timeout keeps the crash checks quick).
fn session_url() -> String {
    format!("{}?mode=session&session_timeout=3s&timeout=1s", url())
}

mod lease {
    fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
        super::url(),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

mod session {
    fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
        super::session_url(),
        env!("CARGO_BIN_EXE_fenced-conformance-worker")
    ));
}

#[allow(dead_code)]
fn harness() -> Harness {
    Harness::new(url(), env!("CARGO_BIN_EXE_fenced-conformance-worker"))
}
