//! The events a proof run records, one JSON object per line, and the clock they are stamped with.
//!
//! Every process of a run stamps its events with `CLOCK_MONOTONIC` read straight from the kernel
//! (not through libc, so a run that fakes the clock with libfaketime still records true times).
//! All processes run on one machine, so their stamps compare directly.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Nanoseconds of `CLOCK_MONOTONIC`.
///
/// ```
/// let a = fenced_proof::history::now_ns();
/// assert!(fenced_proof::history::now_ns() >= a);
/// ```
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What a worker did, in the order it did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// The worker started (in process `pid`).
    Start {
        /// Worker id, unique in the run.
        worker: u32,
        /// Its process.
        pid: u32,
        /// When.
        ns: u64,
    },
    /// The worker is about to ask for the lock.
    Attempt {
        /// Worker id.
        worker: u32,
        /// When (before the first request to the server).
        ns: u64,
    },
    /// The lock was granted.
    Grant {
        /// Worker id.
        worker: u32,
        /// The worker's grant number (1, 2, …).
        grant: u32,
        /// The fencing token.
        token: u64,
        /// When the grant was received.
        ns: u64,
        /// The guard's deadline at grant time (a lower bound of the server's expiry).
        deadline_ns: u64,
        /// The worker's wall clock at that moment, in ms since the Unix epoch (as libc reports
        /// it, so a faked clock shows here).
        wall_ms: u64,
    },
    /// The lost signal fired (observed by a task of the worker).
    Lost {
        /// Worker id.
        worker: u32,
        /// Grant number.
        grant: u32,
        /// When the worker observed it.
        ns: u64,
        /// The reason the library gave.
        reason: String,
    },
    /// The critical section stopped before its write because the lock was no longer valid.
    Abandon {
        /// Worker id.
        worker: u32,
        /// Grant number.
        grant: u32,
        /// When.
        ns: u64,
    },
    /// A release finished.
    Release {
        /// Worker id.
        worker: u32,
        /// Grant number.
        grant: u32,
        /// When the release was started.
        sent_ns: u64,
        /// When it returned.
        done_ns: u64,
        /// Whether it succeeded.
        ok: bool,
    },
    /// A grant was dropped on purpose without a release (the in-process stand-in for a kill).
    Forget {
        /// Worker id.
        worker: u32,
        /// Grant number.
        grant: u32,
        /// When.
        ns: u64,
    },
    /// Acquiring failed with an error (not a timeout).
    AcquireError {
        /// Worker id.
        worker: u32,
        /// When.
        ns: u64,
        /// The error.
        error: String,
    },
    /// Whether a lock was still held when every worker of an in-process store had ended.
    Leftover {
        /// Worker id of the checking thread.
        worker: u32,
        /// When.
        ns: u64,
        /// Whether the key was still held.
        held: bool,
    },
    /// The worker ended normally.
    Stop {
        /// Worker id.
        worker: u32,
        /// When.
        ns: u64,
    },
}

/// An operation the fenced resource saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Read the value at the start of the critical section.
    Read,
    /// The worker checked its lock and is about to write (no effect on the value).
    Check,
    /// Write the value at the end of the critical section.
    Write,
}

/// One operation attempted on the fenced resource, in the order the resource handled them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceEvent {
    /// When the resource handled it.
    pub ns: u64,
    /// The operation.
    pub op: Op,
    /// Worker id.
    pub worker: u32,
    /// The worker's grant number.
    pub grant: u32,
    /// The fencing token sent with it.
    pub token: u64,
    /// Read: the value returned; write: the value written.
    pub value: u64,
    /// Whether the resource accepted it.
    pub accepted: bool,
}

/// Something the run's driver did to the system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// When.
    pub ns: u64,
    /// What (`kill`, `stop`, `cont`, `partition`, `heal`, …).
    pub kind: String,
    /// The worker it targeted, if any.
    pub worker: Option<u32>,
}

/// Appends JSON lines to a file, one `write` per line, so a killed process loses nothing it
/// logged.
#[derive(Debug)]
pub struct LineLog {
    file: Mutex<File>,
}

impl LineLog {
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> std::io::Result<LineLog> {
        Ok(LineLog {
            file: Mutex::new(File::create(path)?),
        })
    }

    /// Appends one record.
    pub fn push<T: Serialize>(&self, record: &T) {
        let mut line = serde_json::to_vec(record).expect("history records serialize");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // A full disk would make the run's result meaningless; the checker then reports the
        // missing events, so a failed write is not fatal here.
        let _ = file.write_all(&line);
    }
}

/// Reads a JSON-lines file. A last line cut short (the writer was killed mid-write) is ignored;
/// any other bad line is an error.
pub fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Vec<T>> {
    let reader = BufReader::new(File::open(path)?);
    let lines: Vec<String> = reader.lines().collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(lines.len());
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if i == last => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: {e}", path.display(), i + 1),
                ));
            }
        }
    }
    Ok(out)
}
