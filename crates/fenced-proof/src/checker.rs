//! The history checker: reads what the workers, the resource and the driver recorded and counts
//! what went wrong. It trusts none of the parts it checks: it recomputes the resource's decisions
//! from the recorded operations and the lock's validity from the recorded grants.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::{FaultEvent, Op, ResourceEvent, WorkerEvent};

/// What a run's history shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    /// Grants recorded.
    pub grants: usize,
    /// Writes the resource accepted.
    pub writes_accepted: usize,
    /// Writes the resource refused (stale token).
    pub writes_rejected: usize,
    /// Critical sections abandoned because the lock was no longer valid.
    pub abandoned: usize,
    /// Pairs of grants whose operations on the resource interleaved (the lock failed to keep
    /// them apart, whether or not fencing then stopped the damage).
    pub overlaps: usize,
    /// Accepted writes whose token was lower than one the resource had already accepted (or
    /// equal to another grant's).
    pub stale_writes_accepted: usize,
    /// Accepted writes that did not build on the last accepted write (an update was lost).
    pub lost_updates: usize,
    /// Grants whose token was not above every token granted before they asked.
    pub token_violations: usize,
    /// Pairs of grants that were both certainly valid at the same moment.
    pub grants_while_held: usize,
    /// Grants that another holder superseded before they were released.
    pub superseded: usize,
    /// …of which the holder learned it (lost signal or `is_valid()` false) before the new holder
    /// touched the resource.
    pub lost_timely: usize,
    /// …of which it learned only after.
    pub lost_late: usize,
    /// …of which it never learned (and was not killed).
    pub lost_never: usize,
    /// Milliseconds from the fault to the next grant to another holder.
    pub recovery_ms: Option<f64>,
    /// Acquire errors the workers saw.
    pub acquire_errors: usize,
    /// Workers that started but were never granted the lock (no fairness between processes).
    pub starved_workers: usize,
    /// The longest time between two consecutive grants, in milliseconds: how long the lock was
    /// unavailable at worst (a stuck queue shows here).
    pub longest_gap_ms: f64,
}

#[derive(Debug, Clone, Default)]
struct Grant {
    worker: u32,
    grant: u32,
    token: u64,
    attempt_ns: u64,
    grant_ns: u64,
    deadline_ns: u64,
    release_sent_ns: Option<u64>,
    lost_ns: Option<u64>,
    abandon_ns: Option<u64>,
    forgotten: bool,
    killed_ns: Option<u64>,
    first_op: Option<u64>,
    last_op: Option<u64>,
}

impl Grant {
    /// Until when the lock was certainly valid on the server.
    fn certainly_valid_until(&self) -> u64 {
        let mut end = self.deadline_ns;
        if let Some(r) = self.release_sent_ns {
            end = end.min(r);
        }
        if let Some(k) = self.killed_ns {
            end = end.min(k);
        }
        end
    }

    /// Whether the holder had given the lock up (released, was killed or dropped it) by `ns`.
    fn gone_by(&self, ns: u64) -> bool {
        self.release_sent_ns.is_some_and(|r| r <= ns) || self.killed_ns.is_some_and(|k| k <= ns)
    }
}

/// Checks one run: the workers' events (each worker's in its own order), the resource's
/// operations in the order it handled them, and the driver's faults (kills name the worker).
pub fn check(
    workers: &[WorkerEvent],
    resource: &[ResourceEvent],
    faults: &[FaultEvent],
) -> Findings {
    let mut f = Findings::default();
    let mut grants: BTreeMap<(u32, u32), Grant> = BTreeMap::new();
    let mut last_attempt: BTreeMap<u32, u64> = BTreeMap::new();
    for e in workers {
        match e {
            WorkerEvent::Attempt { worker, ns } => {
                last_attempt.insert(*worker, *ns);
            }
            WorkerEvent::Grant {
                worker,
                grant,
                token,
                ns,
                deadline_ns,
                ..
            } => {
                grants.insert(
                    (*worker, *grant),
                    Grant {
                        worker: *worker,
                        grant: *grant,
                        token: *token,
                        attempt_ns: last_attempt.get(worker).copied().unwrap_or(0),
                        grant_ns: *ns,
                        deadline_ns: *deadline_ns,
                        ..Grant::default()
                    },
                );
            }
            WorkerEvent::Lost {
                worker, grant, ns, ..
            } => {
                if let Some(g) = grants.get_mut(&(*worker, *grant)) {
                    g.lost_ns = Some(*ns);
                }
            }
            WorkerEvent::Abandon { worker, grant, ns } => {
                f.abandoned += 1;
                if let Some(g) = grants.get_mut(&(*worker, *grant)) {
                    g.abandon_ns = Some(*ns);
                }
            }
            WorkerEvent::Release {
                worker,
                grant,
                sent_ns,
                ..
            } => {
                if let Some(g) = grants.get_mut(&(*worker, *grant)) {
                    g.release_sent_ns = Some(*sent_ns);
                }
            }
            WorkerEvent::Forget { worker, grant, .. } => {
                if let Some(g) = grants.get_mut(&(*worker, *grant)) {
                    g.forgotten = true;
                }
            }
            WorkerEvent::AcquireError { .. } => f.acquire_errors += 1,
            WorkerEvent::Start { .. } | WorkerEvent::Leftover { .. } | WorkerEvent::Stop { .. } => {
            }
        }
    }
    // A kill ends the grant its worker held at that moment.
    for k in faults.iter().filter(|k| k.kind == "kill") {
        for g in grants.values_mut() {
            if Some(g.worker) == k.worker && g.grant_ns <= k.ns && !g.gone_by(k.ns) {
                g.killed_ns = Some(k.ns);
            }
        }
    }
    f.grants = grants.len();
    f.starved_workers = workers
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Start { worker, .. } => Some(*worker),
            _ => None,
        })
        .filter(|w| !grants.keys().any(|(gw, _)| gw == w))
        .count();

    // The resource, replayed.
    let mut highest: Option<(u64, (u32, u32))> = None;
    let mut value = 0u64;
    for r in resource {
        if let Some(g) = grants.get_mut(&(r.worker, r.grant)) {
            g.first_op.get_or_insert(r.ns);
            g.last_op = Some(r.ns);
        }
        if r.op == Op::Write {
            if r.accepted {
                f.writes_accepted += 1;
            } else {
                f.writes_rejected += 1;
            }
        }
        if !r.accepted || r.op == Op::Check {
            continue;
        }
        let me = (r.worker, r.grant);
        let stale = match highest {
            Some((t, owner)) => r.token < t || (r.token == t && owner != me),
            None => false,
        };
        if r.op == Op::Write {
            if stale {
                f.stale_writes_accepted += 1;
            }
            if r.value != value + 1 {
                f.lost_updates += 1;
            }
            value = r.value;
        }
        if highest.is_none_or(|(t, _)| r.token > t) {
            highest = Some((r.token, me));
        }
    }

    let list: Vec<&Grant> = grants.values().collect();
    let mut times: Vec<u64> = list.iter().map(|g| g.grant_ns).collect();
    times.sort_unstable();
    // Workers still waiting when the run ended count as a gap up to the end.
    let end = workers
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Stop { ns, .. } => Some(*ns),
            _ => None,
        })
        .max();
    if let (Some(end), Some(&last)) = (end, times.last()) {
        if end > last {
            times.push(end);
        }
    }
    f.longest_gap_ms = times
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e6)
        .fold(0.0, f64::max);
    // Interleaved critical sections, as the resource saw them.
    let spans: Vec<(u64, u64)> = list
        .iter()
        .filter_map(|g| Some((g.first_op?, g.last_op?)))
        .collect();
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.0 <= b.1 && b.0 <= a.1 {
                f.overlaps += 1;
            }
        }
    }
    for b in &list {
        // Tokens: above every token granted before this grant was asked for.
        let earlier_max = list
            .iter()
            .filter(|a| a.grant_ns < b.attempt_ns)
            .map(|a| a.token)
            .max();
        let duplicate = list
            .iter()
            .any(|a| a.token == b.token && (a.worker, a.grant) != (b.worker, b.grant));
        if earlier_max.is_some_and(|m| m >= b.token) || duplicate {
            f.token_violations += 1;
        }
        // Two grants certainly valid at once.
        for a in &list {
            if (a.worker, a.grant) != (b.worker, b.grant)
                && a.grant_ns <= b.grant_ns
                && b.grant_ns < a.certainly_valid_until()
            {
                f.grants_while_held += 1;
            }
        }
    }
    // Superseded holders: did they learn they had lost the lock (the lost signal, or
    // `is_valid()` turning false) before the new holder acted?
    for a in &list {
        let next = list
            .iter()
            .filter(|b| b.grant_ns > a.grant_ns && (b.worker, b.grant) != (a.worker, a.grant))
            .min_by_key(|b| b.grant_ns);
        let Some(b) = next else { continue };
        let learned = match (a.lost_ns, a.abandon_ns) {
            (Some(l), Some(x)) => Some(l.min(x)),
            (l, x) => l.or(x),
        };
        // Superseded: still holding when the next grant came, or it learned it lost the lock.
        if a.forgotten || (a.gone_by(b.grant_ns) && learned.is_none()) {
            continue;
        }
        f.superseded += 1;
        let touched = b.first_op.unwrap_or(b.grant_ns);
        match learned {
            Some(l) if l <= touched => f.lost_timely += 1,
            Some(_) => f.lost_late += 1,
            None if a.killed_ns.is_some() => {}
            None => f.lost_never += 1,
        }
    }
    // Recovery: from the first fault to the first grant to someone else after it.
    if let Some(fault) = faults.iter().find(|e| e.kind != "heal" && e.kind != "cont") {
        let active = list
            .iter()
            .filter(|g| g.grant_ns <= fault.ns && !g.gone_by(fault.ns))
            .map(|g| (g.worker, g.grant))
            .max();
        f.recovery_ms = list
            .iter()
            .filter(|g| g.grant_ns > fault.ns && Some((g.worker, g.grant)) != active)
            .map(|g| (g.grant_ns - fault.ns) as f64 / 1e6)
            .reduce(f64::min);
    }
    f
}
