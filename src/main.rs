use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use greater::model::catalog;
use greater::model::generate::Sampling;
use greater::runtime::{LanguageModel, OpenOptions};

#[derive(Parser)]
#[command(name = "greater", version, about = "Optimise a local model's task prompt with gradients over reasoning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reply to one prompt with the model's chat template.
    Generate {
        /// Alias (see `greater models`), GGUF file or Hugging Face model folder.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sample at this temperature instead of decoding greedily.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A Jinja chat template file to use instead of the model's own.
        #[arg(long)]
        chat_template: Option<std::path::PathBuf>,
    },
    /// List the model aliases and whether they are cached.
    Models,
}

fn open_options(chat_template: Option<&std::path::Path>) -> Result<OpenOptions> {
    let chat_template = match chat_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read chat template {}: {e}", p.display()))?,
        ),
        None => None,
    };
    Ok(OpenOptions { chat_template })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { model, prompt, system, max_tokens, temperature, top_p, seed, chat_template } => {
            let opts = open_options(chat_template.as_deref())?;
            let lm = LanguageModel::open(&model, &opts, &mut |m| eprintln!("{m}"))?;
            let ids = lm.chat_ids(system.as_deref(), &prompt)?;
            let sampling = temperature.map(|temperature| Sampling { temperature, top_p, seed });
            let reply = lm.complete(&[ids], &lm.generate_config(max_tokens, sampling))?;
            println!("{}", reply[0].trim());
        }
        Command::Models => {
            println!("{:<20} {:<8} {:>10}  path / description", "alias", "cached", "size");
            for e in catalog::CATALOG {
                let cached = e.is_cached();
                println!(
                    "{:<20} {:<8} {:>7.1} MB  {}\n{:<41}{}",
                    e.alias,
                    if cached { "yes" } else { "no" },
                    e.size as f64 / 1e6,
                    e.path().display(),
                    "",
                    e.description
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
