//! The `fenced` command.
fn main() {}
