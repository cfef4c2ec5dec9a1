//! The conformance suite on the embedded SQLite backend. All checks, and the worker processes
//! they start, share one lock file under Cargo's target directory (every check uses keys of its
//! own), as the services of one machine would.

fn url() -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("conformance-sqlite")
        .join("locks.db");
    let mut url = String::from("sqlite://");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => url.push_str("%25"),
            ' ' => url.push_str("%20"),
            '#' => url.push_str("%23"),
            '?' => url.push_str("%3F"),
            c => url.push(c),
        }
    }
    url
}

fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
    url(),
    env!("CARGO_BIN_EXE_fenced-conformance-worker"),
));
