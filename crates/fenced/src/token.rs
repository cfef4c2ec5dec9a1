//! Owner ids and fencing tokens.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Operation};

/// A fencing token: strictly increasing per key across all grants, processes and client restarts.
///
/// Pass it to the resource you protect and let the resource reject any write whose token is lower
/// than the highest it has seen. That stops a former holder that was paused past its lease.
///
/// ```
/// use fenced::FencingToken;
/// let older = FencingToken::new(7);
/// let newer = FencingToken::new(8);
/// assert!(newer > older);
/// assert_eq!(newer.get(), 8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token (as stored by a backend).
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The identity of one grant's owner: 128 random bits from a cryptographically secure generator,
/// unguessable, new for every acquisition (never tied to a thread or task).
///
/// Shown as 32 lowercase hex digits.
///
/// ```
/// use fenced::OwnerId;
/// let id = OwnerId::random();
/// let parsed: OwnerId = id.to_string().parse()?;
/// assert_eq!(id, parsed);
/// # Ok::<(), fenced::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(u128);

impl OwnerId {
    /// A fresh random owner id.
    pub fn random() -> Self {
        OwnerId(rand::random::<u128>())
    }

    /// The raw 128 bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerId({self})")
    }
}

impl FromStr for OwnerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(v) = u128::from_str_radix(s, 16) {
                return Ok(OwnerId(v));
            }
        }
        Err(Error::new(
            ErrorKind::InvalidConfig,
            Operation::Validate,
            format!("{s:?} is not an owner id; owner ids are 32 hex digits as printed by fenced"),
        ))
    }
}
