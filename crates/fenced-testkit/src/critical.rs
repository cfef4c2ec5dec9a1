//! A read-sleep-write critical section on files, shared by tasks and worker processes.
//!
//! Without mutual exclusion, concurrent increments get lost (the final count is short) and two
//! holders meet inside (the `inside` marker already exists). Every holder also appends its
//! fencing token, so the order of tokens inside the section can be checked.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shared state of one mutual-exclusion run, in a directory.
#[derive(Debug, Clone)]
pub struct Section {
    dir: PathBuf,
}

impl Section {
    /// Uses `dir` (which must exist); call [`Section::init`] once before the run.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Section { dir: dir.into() }
    }

    /// Resets the counter to zero and removes earlier records.
    pub fn init(&self) -> std::io::Result<()> {
        fs::write(self.path("counter"), "0")?;
        let _ = fs::remove_file(self.path("tokens"));
        let _ = fs::remove_file(self.path("overlaps"));
        let _ = fs::remove_file(self.path("inside"));
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs one critical section for the holder of `token`: marks "inside", reads the counter,
    /// sleeps `pause`, writes counter + 1, records the token, unmarks. An overlap is recorded
    /// and returned as an error.
    pub async fn enter(&self, token: u64, pause: Duration) -> Result<(), String> {
        let marker = self.path("inside");
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let msg = format!("overlap: token {token} entered while another holder was inside");
                append(&self.path("overlaps"), &msg);
                return Err(msg);
            }
            Err(e) => return Err(format!("cannot create {}: {e}", marker.display())),
        }
        let value: u64 = fs::read_to_string(self.path("counter"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("counter file corrupt: {e}"))?;
        tokio::time::sleep(pause).await;
        let tmp = self.path(&format!("counter.{token}.tmp"));
        fs::write(&tmp, (value + 1).to_string()).map_err(|e| e.to_string())?;
        fs::rename(&tmp, self.path("counter")).map_err(|e| e.to_string())?;
        append(&self.path("tokens"), &token.to_string());
        fs::remove_file(&marker).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The counter's value.
    pub fn count(&self) -> u64 {
        fs::read_to_string(self.path("counter"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The tokens in the order holders entered.
    pub fn tokens(&self) -> Vec<u64> {
        fs::read_to_string(self.path("tokens"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Recorded overlaps.
    pub fn overlaps(&self) -> Vec<String> {
        fs::read_to_string(self.path("overlaps"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn append(path: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}
