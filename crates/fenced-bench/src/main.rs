//! `fenced-bench`: fenced and the raw floors under the bench protocol (bench/PROTOCOL.md).

fn main() {}
