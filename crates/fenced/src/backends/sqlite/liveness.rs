//! Whether a stored lease is still live: the clock it was written with, the boot it was written
//! in, and (on Linux) whether the process that holds it still exists.
//!
//! Every row records a *clock id* next to its expiry:
//!
//! - on Linux, `boot:<boot id>/time:<time namespace>` with the expiry in milliseconds of
//!   `CLOCK_BOOTTIME` (does not jump with the wall clock, keeps counting during suspend);
//! - elsewhere, or when the boot id cannot be read, `wall` with the expiry in wall-clock
//!   milliseconds since the Unix epoch.
//!
//! Every row also records its expiry in wall-clock milliseconds, used only when the reader's
//! clock id differs from the row's but the boot may be the same (a process in another time
//! namespace, or one that cannot read the boot id).

use std::time::{SystemTime, UNIX_EPOCH};

/// "Now", as one process sees it.
#[derive(Debug, Clone)]
pub(crate) struct Now {
    /// The clock `ms` is measured with (see the module docs).
    pub(crate) clock: &'static str,
    /// Milliseconds of `clock`.
    pub(crate) ms: i64,
    /// Wall-clock milliseconds since the Unix epoch.
    pub(crate) wall_ms: i64,
}

/// The current time.
pub(crate) fn now() -> Now {
    let wall_ms = wall_ms();
    let clock = clock_id();
    let ms = if clock == WALL { wall_ms } else { boot_ms() };
    Now { clock, ms, wall_ms }
}

/// What a row's lease looks like from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Still running, for this many milliseconds.
    Live(i64),
    /// Ran out.
    Expired,
    /// Written during an earlier boot of this machine: every process of that boot is gone.
    OtherBoot,
}

impl Now {
    /// The state of a lease stored with `clock`, `expires_ms` (in that clock) and
    /// `wall_expires_ms`.
    pub(crate) fn lease(&self, clock: &str, expires_ms: i64, wall_expires_ms: i64) -> Lease {
        let left = if clock == self.clock {
            expires_ms.saturating_sub(self.ms)
        } else if self.other_boot(clock) {
            return Lease::OtherBoot;
        } else {
            wall_expires_ms.saturating_sub(self.wall_ms)
        };
        if left > 0 {
            Lease::Live(left)
        } else {
            Lease::Expired
        }
    }

    /// Whether `clock` names a different boot of this machine than ours.
    pub(crate) fn other_boot(&self, clock: &str) -> bool {
        match (boot_of(clock), boot_of(self.clock)) {
            (Some(theirs), Some(ours)) => theirs != ours,
            _ => false,
        }
    }

    /// Whether `clock` names the same boot as ours (known for sure).
    pub(crate) fn same_boot(&self, clock: &str) -> bool {
        match (boot_of(clock), boot_of(self.clock)) {
            (Some(theirs), Some(ours)) => theirs == ours,
            _ => false,
        }
    }
}

const WALL: &str = "wall";

/// `boot:<id>/time:<ns>` → `<id>`.
fn boot_of(clock: &str) -> Option<&str> {
    let rest = clock.strip_prefix("boot:")?;
    Some(rest.split('/').next().unwrap_or(rest)).filter(|id| !id.is_empty())
}

fn wall_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(target_os = "linux")]
fn clock_id() -> &'static str {
    use std::sync::OnceLock;
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && !s.contains('/'));
        match boot {
            Some(boot) => {
                // Time namespaces can offset CLOCK_BOOTTIME; processes in different ones must
                // not compare boot-clock values.
                let time_ns = std::fs::read_link("/proc/self/ns/time")
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("boot:{boot}/{time_ns}")
            }
            None => WALL.to_owned(),
        }
    })
}

#[cfg(not(target_os = "linux"))]
fn clock_id() -> &'static str {
    WALL
}

#[cfg(target_os = "linux")]
fn boot_ms() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec
        .saturating_mul(1000)
        .saturating_add(t.tv_nsec / 1_000_000)
}

#[cfg(not(target_os = "linux"))]
fn boot_ms() -> i64 {
    wall_ms()
}

/// A process, as recorded in a lock row: its pid, its start time (clock ticks after boot, field
/// 22 of `/proc/<pid>/stat`) and its pid namespace (`pid:[<inode>]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessMark {
    pub(crate) pid: i64,
    pub(crate) start: i64,
    pub(crate) pid_ns: String,
}

/// This process, or `None` when its liveness cannot be checked by others (not Linux, or `/proc`
/// does not show this process under its own pid, as when `/proc` belongs to another pid
/// namespace).
#[cfg(target_os = "linux")]
pub(crate) fn this_process() -> Option<ProcessMark> {
    use std::sync::Mutex;
    static CACHE: Mutex<Option<ProcessMark>> = Mutex::new(None);
    let pid = i64::from(std::process::id());
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The pid changes after fork(): recompute then.
    if let Some(mark) = cache.as_ref().filter(|m| m.pid == pid) {
        return Some(mark.clone());
    }
    let proc_pid: i64 = std::fs::read_link("/proc/self")
        .ok()?
        .to_str()?
        .parse()
        .ok()?;
    if proc_pid != pid {
        return None;
    }
    let stat = read_stat(pid)?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .ok()?
        .to_string_lossy()
        .into_owned();
    let mark = ProcessMark {
        pid,
        start: stat.start,
        pid_ns,
    };
    *cache = Some(mark.clone());
    Some(mark)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn this_process() -> Option<ProcessMark> {
    None
}

/// Whether the process recorded in `mark` is certainly gone. Only meaningful for a mark written
/// during this boot in this process's pid namespace (the caller checks both). Answers `false`
/// whenever in doubt.
#[cfg(target_os = "linux")]
pub(crate) fn process_gone(mark: &ProcessMark) -> bool {
    use rustix::io::Errno;
    let Some(pid) = i32::try_from(mark.pid)
        .ok()
        .filter(|p| *p > 0)
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // kill(pid, 0) tells "no such process" apart from "exists but not ours" even where /proc
    // hides other users' processes (hidepid).
    if let Err(Errno::SRCH) = rustix::process::test_kill_process(pid) {
        return true;
    }
    match read_stat(mark.pid) {
        // The pid was reused by a newer process, or the process has exited and is a zombie
        // waiting for its parent.
        Some(stat) => stat.start != mark.start || matches!(stat.state, 'Z' | 'X' | 'x'),
        // Exists for kill() but /proc does not show it (hidepid), or it exited just now: the
        // next attempt will know.
        None => false,
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn process_gone(_mark: &ProcessMark) -> bool {
    false
}

/// The mark of another process of this pid namespace (for tests that fake a holder).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn mark_of(pid: u32) -> Option<ProcessMark> {
    let me = this_process()?;
    let stat = read_stat(i64::from(pid))?;
    Some(ProcessMark {
        pid: i64::from(pid),
        start: stat.start,
        pid_ns: me.pid_ns,
    })
}

#[cfg(target_os = "linux")]
struct Stat {
    state: char,
    start: i64,
}

/// Fields 3 (state) and 22 (start time) of `/proc/<pid>/stat`.
#[cfg(target_os = "linux")]
fn read_stat(pid: i64) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

#[cfg(target_os = "linux")]
fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 come before the start time.
    let start = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids() {
        assert_eq!(boot_of("boot:abc/time:[1]"), Some("abc"));
        assert_eq!(boot_of("boot:abc/"), Some("abc"));
        assert_eq!(boot_of("wall"), None);
        assert_eq!(boot_of("boot:"), None);
    }

    #[test]
    fn leases_across_clocks() {
        let now = Now {
            clock: "boot:a/time:[1]",
            ms: 1_000,
            wall_ms: 50_000,
        };
        assert_eq!(now.lease("boot:a/time:[1]", 1_500, 0), Lease::Live(500));
        assert_eq!(now.lease("boot:a/time:[1]", 1_000, 99_999), Lease::Expired);
        assert_eq!(
            now.lease("boot:b/time:[1]", 9_999, 99_999),
            Lease::OtherBoot
        );
        // Same boot, another time namespace: the wall clock decides.
        assert_eq!(now.lease("boot:a/time:[2]", 0, 50_100), Lease::Live(100));
        assert_eq!(now.lease("wall", 0, 49_000), Lease::Expired);
        assert!(now.same_boot("boot:a/time:[2]"));
        assert!(!now.same_boot("wall"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stat_parsing() {
        let line = "42 (we ird) name)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start, 777);
        assert!(parse_stat("garbage").is_none());
        let me = this_process().expect("/proc works in tests");
        assert_eq!(me.pid, i64::from(std::process::id()));
        assert!(me.pid_ns.starts_with("pid:["));
        assert!(!process_gone(&me));
        let mut other = me.clone();
        other.start += 1;
        assert!(
            process_gone(&other),
            "a different start time means a reused pid"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn boot_clock_is_used_on_linux() {
        let now = now();
        assert!(now.clock.starts_with("boot:"), "{}", now.clock);
        assert!(now.ms > 0 && now.ms < now.wall_ms);
    }
}
