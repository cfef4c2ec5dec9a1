//! The documented exit codes of `fenced` (the table is in the crate docs and the README).
//!
//! They follow sysexits(3) where a meaning fits; 76 and 79 are fenced's own. A command run by
//! `fenced run` may exit with the same numbers; fenced explains every exit of its own on stderr.

/// Usage error: bad flag, duration, key or URL, unknown scheme, command not found (`EX_USAGE`).
pub(crate) const USAGE: u8 = 64;
/// The backend is unreachable or failing (`EX_UNAVAILABLE`).
pub(crate) const UNAVAILABLE: u8 = 69;
/// A bug or an unexpected condition in fenced (`EX_SOFTWARE`).
pub(crate) const INTERNAL: u8 = 70;
/// Not acquired within `--wait` (`EX_TEMPFAIL`: try again later).
pub(crate) const NOT_ACQUIRED: u8 = 75;
/// `unlock`: the owner id does not hold the lock.
pub(crate) const NOT_OWNER: u8 = 76;
/// Authentication or permission failure at the backend (`EX_NOPERM`).
pub(crate) const NO_PERMISSION: u8 = 77;
/// The backend is not available in this build or version (`EX_CONFIG`).
pub(crate) const CONFIG: u8 = 78;
/// The lock was lost while the command ran.
pub(crate) const LOST: u8 = 79;
/// The command could not be executed after the lock was taken.
pub(crate) const CANNOT_EXECUTE: u8 = 126;
/// The command vanished between the check and the start.
pub(crate) const NOT_FOUND: u8 = 127;
