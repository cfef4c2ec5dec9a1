//! The fenced resource: a counter that workers read and write inside their critical sections,
//! over a small line protocol on loopback TCP.
//!
//! With fencing on, the resource remembers the highest fencing token it has seen and refuses any
//! read or write that carries a lower one; a read raises the highest token too, so a holder that
//! lost its lock cannot overwrite what a newer holder read. With fencing off it accepts
//! everything. Either way it records every attempt, in the order it handled them.
//!
//! Protocol (one line each way):
//! - `READ <worker> <grant> <token>` → `OK <value> <directive>` or `REJECT <highest>`
//! - `CHECK <worker> <grant> <token>` → `OK 0 <directive>` (the worker checked its lock and
//!   writes next)
//! - `WRITE <worker> <grant> <token> <value>` → `OK` or `REJECT <highest>`
//!
//! The directive tells the worker how to continue (see [`Directive`]); a run's driver sets it
//! through a [`Trigger`] to put a fault exactly inside a critical section.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::history::{LineLog, Op, ResourceEvent, now_ns};

/// How a worker continues after a read or check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Directive {
    /// As usual.
    #[default]
    Continue,
    /// Make this critical section last this many milliseconds (a slow job), checking the lock
    /// as it goes.
    Hold(u64),
    /// Block the worker's thread (its runtime, renewal included) for this many milliseconds:
    /// the in-process stand-in for a stop-the-world pause.
    Pause(u64),
    /// Drop the grant without releasing and end the worker: the in-process stand-in for a kill.
    Forget,
}

impl Directive {
    fn encode(self) -> String {
        match self {
            Directive::Continue => "continue".into(),
            Directive::Hold(ms) => format!("hold:{ms}"),
            Directive::Pause(ms) => format!("pause:{ms}"),
            Directive::Forget => "forget".into(),
        }
    }

    /// Parses the directive part of a reply.
    pub fn decode(s: &str) -> Option<Directive> {
        Some(match s.split_once(':') {
            None if s == "continue" => Directive::Continue,
            None if s == "forget" => Directive::Forget,
            Some(("hold", ms)) => Directive::Hold(ms.parse().ok()?),
            Some(("pause", ms)) => Directive::Pause(ms.parse().ok()?),
            _ => return None,
        })
    }
}

/// Where a [`Trigger`] fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At an accepted read: the worker has started its critical section.
    Read,
    /// At a check: the worker found its lock valid and is about to write.
    Check,
}

/// One fault point: the next accepted `phase` operation (of any worker) is held until the
/// driver answers with the directive to send back (having injected its fault meanwhile).
#[derive(Debug)]
pub struct Trigger {
    /// Where.
    pub phase: Phase,
    /// Receives (worker, grant number, reply sender) when it fires.
    pub fired: oneshot::Sender<Fired>,
}

/// What a fired [`Trigger`] reports: the worker, its grant number, and where to send the
/// directive.
pub type Fired = (u32, u32, oneshot::Sender<Directive>);

#[derive(Debug)]
struct State {
    fencing: bool,
    value: u64,
    highest: u64,
    trigger: Option<Trigger>,
    /// The worker of the latest read (accepted or refused), sent on every read.
    reads: watch::Sender<Option<u32>>,
}

/// The running resource.
#[derive(Debug)]
pub struct Resource {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Resource {
    /// Starts listening on 127.0.0.1; every operation is appended to `log`.
    pub async fn start(fencing: bool, log: Arc<LineLog>) -> std::io::Result<Resource> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            fencing,
            value: 0,
            highest: 0,
            trigger: None,
            reads: watch::Sender::new(None),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, shared.clone(), log.clone()));
            }
        });
        Ok(Resource { addr, state, task })
    }

    /// Where workers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms a trigger (replacing any armed one).
    pub fn arm(&self, trigger: Trigger) {
        self.state.lock().unwrap().trigger = Some(trigger);
    }

    /// Follows reads: the value is the worker of the latest read (accepted or refused), and it
    /// changes at every read, so a driver can wait for another holder to act.
    pub fn reads(&self) -> watch::Receiver<Option<u32>> {
        self.state.lock().unwrap().reads.subscribe()
    }

    /// The counter's value.
    pub fn value(&self) -> u64 {
        self.state.lock().unwrap().value
    }
}

impl Drop for Resource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Step {
    Reply(String),
    Wait(u32, u32, oneshot::Sender<Fired>, u64),
}

async fn serve(stream: TcpStream, state: Arc<Mutex<State>>, log: Arc<LineLog>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match handle(&line, &state, &log) {
            Ok(Step::Reply(r)) => r,
            Ok(Step::Wait(worker, grant, fired, value)) => {
                let (tx, rx) = oneshot::channel();
                let directive = if fired.send((worker, grant, tx)).is_ok() {
                    rx.await.unwrap_or_default()
                } else {
                    Directive::Continue
                };
                format!("OK {value} {}", directive.encode())
            }
            Err(e) => format!("ERR {e}"),
        };
        if write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn handle(line: &str, state: &Mutex<State>, log: &LineLog) -> Result<Step, String> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        parts
            .get(i)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("bad request {line:?}"))
    };
    let op = match parts.first().copied() {
        Some("READ") => Op::Read,
        Some("CHECK") => Op::Check,
        Some("WRITE") => Op::Write,
        _ => return Err(format!("bad request {line:?}")),
    };
    let (worker, grant, token) = (num(1)? as u32, num(2)? as u32, num(3)?);
    let mut s = state.lock().unwrap();
    let fresh = token >= s.highest;
    let accepted = op == Op::Check || fresh || !s.fencing;
    let value = if op == Op::Write { num(4)? } else { s.value };
    if accepted && op != Op::Check {
        s.highest = s.highest.max(token);
        if op == Op::Write {
            s.value = value;
        }
    }
    if op == Op::Read {
        s.reads.send_replace(Some(worker));
    }
    log.push(&ResourceEvent {
        ns: now_ns(),
        op,
        worker,
        grant,
        token,
        value,
        accepted,
    });
    if !accepted {
        return Ok(Step::Reply(format!("REJECT {}", s.highest)));
    }
    let phase = match op {
        Op::Read => Some(Phase::Read),
        Op::Check => Some(Phase::Check),
        Op::Write => None,
    };
    let fires = matches!((&s.trigger, phase), (Some(t), Some(p)) if t.phase == p);
    if fires {
        let trigger = s.trigger.take().expect("checked above");
        return Ok(Step::Wait(worker, grant, trigger.fired, value));
    }
    Ok(Step::Reply(match op {
        Op::Write => "OK".into(),
        _ => format!("OK {value} continue"),
    }))
}
