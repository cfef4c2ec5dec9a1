//! The documented exit codes of `fenced` (see the crate docs for the table).

/// Usage error: bad flag, duration or key (sysexits `EX_USAGE`).
pub(crate) const USAGE: u8 = 64;
/// The backend is unreachable or failing (`EX_UNAVAILABLE`).
pub(crate) const UNAVAILABLE: u8 = 69;
/// A bug or an unexpected condition in fenced (`EX_SOFTWARE`).
pub(crate) const INTERNAL: u8 = 70;
/// Not acquired within `--wait` (`EX_TEMPFAIL`: try again later).
pub(crate) const NOT_ACQUIRED: u8 = 75;
/// Authentication or permission failure at the backend (`EX_NOPERM`).
pub(crate) const NO_PERMISSION: u8 = 77;
/// Bad or unsupported URL (`EX_CONFIG`).
pub(crate) const CONFIG: u8 = 78;
/// The lock was lost while the command ran.
pub(crate) const LOST: u8 = 79;
/// The command could not be executed.
pub(crate) const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub(crate) const NOT_FOUND: u8 = 127;
