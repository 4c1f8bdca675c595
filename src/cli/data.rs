//! `loraforge data report`: a recipe's data as training will see it.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

/// `loraforge data`'s subcommands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Counts, token-length percentiles, truncation, padding waste, and a sample with its mask.
    Report {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

/// Runs a `loraforge data` subcommand.
pub fn run(command: DataCommand) -> Result<()> {
    let DataCommand::Report { recipe, overrides } = command;
    let recipe = crate::recipe::load(&recipe, &overrides)?;
    let style = if std::io::stdout().is_terminal() {
        crate::data::report::MaskStyle::Color
    } else {
        crate::data::report::MaskStyle::Brackets
    };
    print!("{}", crate::data::report::report(&recipe, style)?);
    Ok(())
}
