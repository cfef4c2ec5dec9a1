//! Lock keys: validated once, before any I/O.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Operation, Result};

/// The longest key any backend accepts, in bytes of UTF-8. A backend may accept less; see
/// [`Capabilities::max_key_len`](crate::Capabilities::max_key_len).
pub const MAX_KEY_LEN: usize = 512;

/// A validated lock key: 1 to [`MAX_KEY_LEN`] bytes of UTF-8 without control characters.
///
/// Keys name the thing being protected (`"order:42"`, `"job/nightly-report"`). Any printable
/// Unicode is allowed, including `/`, `:`, `{`, `}` and spaces; each backend escapes what it
/// must, so every valid key round-trips.
///
/// ```
/// use fenced::Key;
/// let key = Key::new("order:42")?;
/// assert_eq!(key.as_str(), "order:42");
/// assert!(Key::new("").is_err());
/// assert!(Key::new("bad\nkey").is_err());
/// # Ok::<(), fenced::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Validates `key`. Fails with [`ErrorKind::InvalidKey`] when it is empty, longer than
    /// [`MAX_KEY_LEN`] bytes, or contains a control character (including NUL, tab and newline).
    pub fn new(key: impl AsRef<str>) -> Result<Key> {
        let key = key.as_ref();
        let invalid = |why: String| {
            Err(Error::new(ErrorKind::InvalidKey, Operation::Validate, why).with_key(shorten(key)))
        };
        if key.is_empty() {
            return invalid(
                "the key is empty; name the resource you protect, e.g. \"order:42\"".into(),
            );
        }
        if key.len() > MAX_KEY_LEN {
            return invalid(format!(
                "the key is {} bytes long, the limit is {MAX_KEY_LEN}; hash long names into a shorter key",
                key.len()
            ));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return invalid(format!(
                "the key contains the control character {c:?}; use printable characters only"
            ));
        }
        Ok(Key(Arc::from(key)))
    }

    /// The key as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn shorten(key: &str) -> String {
    if key.len() <= 80 {
        return key.to_owned();
    }
    let mut end = 77;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &key[..end])
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(value: &str) -> Result<Key> {
        Key::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert!(Key::new("a".repeat(MAX_KEY_LEN)).is_ok());
        let e = Key::new("a".repeat(MAX_KEY_LEN + 1)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        assert!(e.key().unwrap().ends_with("..."));
        assert!(Key::new("tab\there").is_err());
        assert!(Key::new("nul\0").is_err());
        assert!(Key::new("{weird}/key with spaces:ü").is_ok());
    }
}
