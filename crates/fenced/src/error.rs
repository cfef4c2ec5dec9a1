//! The one error type of fenced.
//!
//! Every fallible operation returns [`Error`]. Match on [`Error::kind`] to decide what to do; the
//! message (`Display`) says what happened and what the user can do about it, and never contains a
//! password from a URL.

use std::error::Error as StdError;
use std::fmt;

use crate::backend::HolderInfo;
use crate::guard::LostReason;

/// What kind of failure an [`Error`] is.
///
/// New kinds may be added in minor releases; match with a `_` arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The lock is held by another owner: [`try_lock`](crate::Client::try_lock) found it taken, or the
    /// wait timeout of [`lock_with`](crate::Client::lock_with) elapsed. [`Error::holder`] tells who
    /// held it, when the backend knows.
    NotAcquired,
    /// The lock can no longer be assumed held (lease ran out, key deleted or taken over, maximum
    /// hold time passed, session ended). [`Error::lost_reason`] tells which.
    Lost,
    /// An owner-checked operation was attempted by an owner that does not hold the lock.
    NotOwner,
    /// The key is empty, too long, or contains characters the backend cannot store safely.
    InvalidKey,
    /// A URL, option or duration is malformed, out of range or contradictory.
    InvalidConfig,
    /// The backend or operation is not available (for example a cargo feature is off).
    Unsupported,
    /// The backend failed: I/O, protocol, authentication, or an unexpected server reply.
    /// [`Error::is_transient`] says whether retrying may help.
    Backend,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::NotAcquired => "not acquired",
            ErrorKind::Lost => "lock lost",
            ErrorKind::NotOwner => "not the owner",
            ErrorKind::InvalidKey => "invalid key",
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend error",
        }
    }
}

/// The operation during which an [`Error`] happened.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Building a client from a URL or builder.
    Connect,
    /// Validating a key or options before any I/O.
    Validate,
    /// Acquiring a lock.
    Acquire,
    /// Waiting for a held lock to be released.
    Wait,
    /// Extending a lease, by the caller or by the renewal watchdog.
    Extend,
    /// Releasing a lock.
    Release,
    /// An administrative operation (inspection, forced release).
    Admin,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect",
            Operation::Validate => "validate",
            Operation::Acquire => "acquire",
            Operation::Wait => "wait",
            Operation::Extend => "extend",
            Operation::Release => "release",
            Operation::Admin => "admin",
        })
    }
}

type Source = Box<dyn StdError + Send + Sync + 'static>;

/// The error type of every fenced operation.
///
/// ```
/// # async fn demo(client: fenced::Client) {
/// match client.try_lock("order:42").await {
///     Ok(Some(guard)) => { /* critical section */ let _ = guard.release().await; }
///     Ok(None) => println!("someone else is working on order 42"),
///     Err(e) if e.is_transient() => println!("backend hiccup, try later: {e}"),
///     Err(e) => println!("giving up: {e}"),
/// }
/// # }
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    operation: Operation,
    key: Option<String>,
    message: String,
    transient: bool,
    holder: Option<HolderInfo>,
    lost: Option<LostReason>,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a message that says what happened and what to do.
    ///
    /// Backends outside this crate use this (with [`Error::with_source`] and
    /// [`Error::transient`]) to report failures.
    ///
    /// ```
    /// use fenced::{Error, ErrorKind, Operation};
    /// let e = Error::new(ErrorKind::Backend, Operation::Acquire, "server closed the connection; check it is running")
    ///     .transient(true);
    /// assert!(e.is_transient());
    /// ```
    pub fn new(kind: ErrorKind, operation: Operation, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            operation,
            key: None,
            message: message.into(),
            transient: false,
            holder: None,
            lost: None,
            source: None,
        }))
    }

    /// A backend failure with its underlying cause.
    ///
    /// ```
    /// use fenced::{Error, ErrorKind, Operation};
    /// let io = std::io::Error::other("connection reset");
    /// let e = Error::backend(Operation::Release, "lost the connection", io).transient(true);
    /// assert_eq!(e.kind(), ErrorKind::Backend);
    /// ```
    pub fn backend(
        operation: Operation,
        message: impl Into<String>,
        source: impl Into<Source>,
    ) -> Self {
        Error::new(ErrorKind::Backend, operation, message).with_source(source)
    }

    /// Attaches the key the operation was about.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.0.key = Some(key.into());
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// Marks whether retrying the same operation may succeed.
    pub fn transient(mut self, transient: bool) -> Self {
        self.0.transient = transient;
        self
    }

    /// Sets the operation (used by the client to put backend errors in context).
    pub fn with_operation(mut self, operation: Operation) -> Self {
        self.0.operation = operation;
        self
    }

    pub(crate) fn with_holder(mut self, holder: Option<HolderInfo>) -> Self {
        self.0.holder = holder;
        self
    }

    pub(crate) fn lost(operation: Operation, key: &str, reason: LostReason) -> Self {
        let mut e = Error::new(
            ErrorKind::Lost,
            operation,
            format!(
                "{reason}; the critical section may have overlapped with another holder, so reject stale writes \
                 with the fencing token at the resource"
            ),
        )
        .with_key(key);
        e.0.lost = Some(reason);
        e
    }

    pub(crate) fn invalid_config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, Operation::Validate, message)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        self.0.operation
    }

    /// The key the operation was about, if any.
    pub fn key(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// Whether retrying the same operation may succeed (connection reset, timeout, failover).
    pub fn is_transient(&self) -> bool {
        self.0.transient
    }

    /// For [`ErrorKind::NotAcquired`]: who held the lock, when the backend reported it.
    pub fn holder(&self) -> Option<&HolderInfo> {
        self.0.holder.as_ref()
    }

    /// For [`ErrorKind::Lost`]: why the lock was lost.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.0.lost
    }

    /// The human-readable message without the operation, key and source.
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.operation)?;
        if let Some(key) = &self.0.key {
            write!(f, " {key:?}")?;
        }
        write!(f, ": {}", self.0.kind.describe())?;
        if self.0.transient {
            f.write_str(" (transient)")?;
        }
        if !self.0.message.is_empty() {
            write!(f, ": {}", self.0.message)?;
        }
        if let Some(source) = &self.0.source {
            write!(f, " (cause: {source})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("operation", &self.0.operation)
            .field("key", &self.0.key)
            .field("message", &self.0.message)
            .field("transient", &self.0.transient)
            .field("holder", &self.0.holder)
            .field("lost", &self.0.lost)
            .field("source", &self.0.source)
            .finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// A backend error's underlying cause as text already scrubbed of secrets, kept as an error
/// source (the client library's own error may carry the URL with its password).
#[cfg(any(feature = "redis", feature = "etcd", feature = "postgres"))]
#[derive(Debug)]
pub(crate) struct Cause(pub(crate) String);

#[cfg(any(feature = "redis", feature = "etcd", feature = "postgres"))]
impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(any(feature = "redis", feature = "etcd", feature = "postgres"))]
impl StdError for Cause {}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
