//! `fenced-proof`: runs the proof scenarios.

fn main() {}
