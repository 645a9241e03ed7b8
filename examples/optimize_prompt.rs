//! Optimises a prompt through the library instead of the CLI: the settings as a value, the
//! run's events drawn as plain lines, the returned summary read back.
//!
//!     cargo run --release --example optimize_prompt -- [MODEL] [OUT]
//!
//! MODEL defaults to `smollm2-135m` (fetched on first use), OUT to `greater-runs/example`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use greater::app;
use greater::optimize::run::{Event, Start};
use greater::settings::{OptimizeConfig, Size};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "smollm2-135m".into());
    let out =
        std::path::PathBuf::from(args.next().unwrap_or_else(|| "greater-runs/example".into()));
    // The demo's sizes on generated arithmetic; any field of OptimizeConfig may change.
    let settings =
        OptimizeConfig { model, difficulty: 1, ..Size::Demo.apply(OptimizeConfig::default()) };
    let interrupt = Arc::new(AtomicBool::new(false));
    // app::optimize writes summary.md and report.html as the CLI does (optimize::run::run
    // writes the records only).
    let summary =
        app::optimize(Start::New(settings), &out, &interrupt, &mut |event| match &event {
            Event::Info(line) => eprintln!("{line}"),
            Event::Start { budget, .. } => eprintln!("{budget}"),
            Event::Step(record, state) => {
                eprintln!(
                    "step {}: {:?} (best train score {:.3})",
                    record.step, record.prompt, state.best_score
                )
            }
            _ => {}
        })?;
    for e in &summary.evaluations {
        println!(
            "{:<14} {:.3} ({}/{})  {:?}",
            e.label.to_string(),
            e.accuracy,
            e.correct,
            e.n,
            e.prompt
        );
    }
    println!("returned prompt (chosen by {}): {:?}", summary.selected_by, summary.best_prompt);
    Ok(())
}
