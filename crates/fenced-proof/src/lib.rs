//! The fenced proof suite: a loopback TCP fault proxy, a fenced resource, workers that write
//! histories, a checker and the scenarios that produce `SAFETY.md`.

pub mod proxy;
