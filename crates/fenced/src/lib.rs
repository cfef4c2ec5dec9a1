#![doc = include_str!("../../../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod backends;
mod client;
mod error;
mod guard;
mod key;
pub mod layers;
mod lease;
pub mod observe;
mod options;
mod token;
mod url;

pub use backend::{
    AcquireRequest, Acquired, Backend, Binding, Capabilities, Confirm, Grant, HolderInfo, LockRef,
    Mode, Safety, SessionState, Watch,
};
pub use client::Client;
pub use error::{Error, ErrorKind, Operation, Result};
pub use guard::{DetachedLock, LockGuard, LockInfo, LostReason, LostSignal};
pub use key::{Key, MAX_KEY_LEN};
pub use observe::MetricNames;
pub use options::{LockOptions, MAX_LABEL_LEN, MAX_LEASE, MAX_WAIT, MIN_LEASE, RetryPolicy, Wait};
pub use token::{FencingToken, OwnerId};
pub use url::{ClientBuilder, connect, default_url, redact};
