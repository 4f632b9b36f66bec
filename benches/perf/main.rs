//! The benchmark behind README "Performance": each figure of tasuki printed next to the
//! baseline it is judged against, both measured in this run on this machine, with the
//! target and whether it was met. Run by `benches/run.sh` (which sets up Docker and
//! RabbitMQ); `--quick` shortens every load, names pick sections, `--list` names them.
//! Load goes to 127.0.0.1 only and every phase is bounded in time.

mod common;
mod load;
mod report;

mod accepts;
mod control;
mod e2e;
mod logs;
mod store;
mod waiters;

use std::process::ExitCode;

use common::Bench;
use report::Report;

type SectionFn =
    for<'a> fn(&'a Bench, &'a mut Report) -> futures::future::BoxFuture<'a, anyhow::Result<()>>;

/// Every section, in the order they run.
const SECTIONS: &[(&str, &str, SectionFn)] = &[
    (
        "e2e",
        "end to end against the raw engine (?wait, tasuki run --wait)",
        |b, r| Box::pin(e2e::run(b, r)),
    ),
    (
        "accepts",
        "durable accepts at 64 clients, embedded and AMQP",
        |b, r| Box::pin(accepts::run(b, r)),
    ),
    (
        "logs",
        "100 MiB of output: durable and fast log modes against docker run",
        |b, r| Box::pin(logs::run(b, r)),
    ),
    (
        "control",
        "control-plane capacity: simulated workers on a no-op runtime",
        |b, r| Box::pin(control::run(b, r)),
    ),
    (
        "waiters",
        "1000 ?wait holds and 1000 log follows: memory and wake-up",
        |b, r| Box::pin(waiters::run(b, r)),
    ),
    (
        "store",
        "a store of 1,000,000 runs: reads, start-up, prune under load",
        |b, r| Box::pin(store::run(b, r)),
    ),
];

#[tokio::main]
async fn main() -> ExitCode {
    let mut quick = false;
    let mut wanted = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            // cargo bench passes `--bench` to harness-less targets.
            "--bench" => {}
            "--list" => {
                for (name, what, _) in SECTIONS {
                    println!("{name:10} {what}");
                }
                return ExitCode::SUCCESS;
            }
            name if SECTIONS.iter().any(|(n, _, _)| *n == name) => wanted.push(arg),
            other => {
                eprintln!("perf: unknown argument {other:?} (sections: see --list; --quick)");
                return ExitCode::from(2);
            }
        }
    }
    let bench = match Bench::new(quick) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("perf: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("perf: {}", bench.machine());
    let mut report = Report::new(bench.machine());
    let mut failed = false;
    for (name, _, section) in SECTIONS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        eprintln!("perf: section {name}");
        let started = std::time::Instant::now();
        if let Err(e) = section(&bench, &mut report).await {
            eprintln!("perf: section {name} failed: {e:#}");
            report.failed(name, &format!("{e:#}"));
            failed = true;
        }
        eprintln!("perf: section {name} took {:.0?}", started.elapsed());
    }
    report.print();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
