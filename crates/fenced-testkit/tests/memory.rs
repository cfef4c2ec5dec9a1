//! The conformance suite on the in-process backend.

fenced_testkit::conformance_tests!(fenced_testkit::Harness::new(
    "memory://conformance",
    env!("CARGO_BIN_EXE_fenced-conformance-worker"),
));
