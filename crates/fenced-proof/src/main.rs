//! `fenced-proof`: runs the proof scenarios and writes `SAFETY.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fenced_proof::report::{Context, safety_md};
use fenced_proof::scenario::{self, BackendKind, Scenario, Setup, expectation};
use fenced_proof::worker::{self, WorkerArgs};

#[derive(Parser)]
#[command(
    name = "fenced-proof",
    about = "Fault-injection runs with a fenced resource and a history checker"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fencing {
    On,
    Off,
    Both,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs scenarios (all of them by default) and reports what the histories show.
    Run {
        /// Backends to run (repeatable; default all).
        #[arg(long = "backend")]
        backends: Vec<BackendKind>,
        /// Scenarios to run (repeatable; default all that apply).
        #[arg(long = "scenario")]
        scenarios: Vec<Scenario>,
        /// Whether the resource enforces fencing tokens.
        #[arg(long, value_enum, default_value = "both")]
        fencing: Fencing,
        /// Seed for the fault's timing and target.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Lease of every grant.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        lease: Duration,
        /// Worker processes per run (threads for memory).
        #[arg(long, default_value_t = 4)]
        workers: u32,
        /// Where runs keep their histories.
        #[arg(long, default_value = "target/proof")]
        out: PathBuf,
        /// Write SAFETY.md here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Lines describing the machine, for the report (repeatable).
        #[arg(long = "machine")]
        machine: Vec<String>,
    },
    /// Prints the scenarios and what each is expected to show.
    List,
    /// One worker process (started by `run`).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Worker(args) => ExitCode::from(worker::run(args) as u8),
        Cmd::List => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            for b in BackendKind::ALL {
                for s in Scenario::ALL.iter().filter(|s| s.applies_to(b)) {
                    let e = expectation(b, *s);
                    // A closed pipe (`| head`) ends the listing quietly.
                    let _ = writeln!(
                        out,
                        "{:7} {:12} overlap {:8} double grant {:8} {}",
                        b.name(),
                        s.name(),
                        e.overlap,
                        e.double_grant,
                        e.why
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Run {
            backends,
            scenarios,
            fencing,
            seed,
            lease,
            workers,
            out,
            report,
            machine,
        } => {
            let backends = if backends.is_empty() {
                BackendKind::ALL.to_vec()
            } else {
                backends
            };
            let scenarios = if scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                scenarios
            };
            let fencings: &[bool] = match fencing {
                Fencing::On => &[true],
                Fencing::Off => &[false],
                Fencing::Both => &[true, false],
            };
            let worker_exe = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("fenced-proof: cannot find its own binary: {e}");
                    return ExitCode::from(70);
                }
            };
            // Workers and servers get paths from here; they must not depend on the directory.
            let out = match std::path::absolute(&out) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("fenced-proof: bad --out {}: {e}", out.display());
                    return ExitCode::from(64);
                }
            };
            let setup = Setup {
                worker_exe,
                out,
                lease,
                hold: Duration::from_millis(50),
                workers,
                seed,
                faketime: scenario::find_faketime(),
            };
            let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
            let mut runs = Vec::new();
            for b in &backends {
                for s in scenarios.iter().filter(|s| s.applies_to(*b)) {
                    for f in fencings {
                        let r = rt.block_on(scenario::run(&setup, *b, *s, *f));
                        let fd = &r.findings;
                        eprintln!(
                            "{:7} {:12} fencing {:3}: {:4} grants, {} overlaps, {} stale accepted, {} rejected, {} lost updates, lost() {}/{}/{} → {}",
                            b.name(),
                            s.name(),
                            if *f { "on" } else { "off" },
                            fd.grants,
                            fd.overlaps,
                            fd.stale_writes_accepted,
                            fd.writes_rejected,
                            fd.lost_updates,
                            fd.lost_timely,
                            fd.lost_late,
                            fd.lost_never,
                            if r.passed() {
                                "as expected".to_string()
                            } else {
                                format!("UNEXPECTED: {}", r.violations.join("; "))
                            }
                        );
                        runs.push(r);
                    }
                }
            }
            if let Some(path) = report {
                let ctx = Context {
                    command: "scripts/proof".into(),
                    machine,
                    lease_ms: lease.as_millis() as u64,
                    workers,
                    seed,
                };
                if let Err(e) = std::fs::write(&path, safety_md(&ctx, &runs)) {
                    eprintln!("fenced-proof: cannot write {}: {e}", path.display());
                    return ExitCode::from(73);
                }
            }
            if runs.iter().all(|r| r.passed()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
