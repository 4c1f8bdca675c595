//! `loraforge recipe check`: validate a recipe and print it resolved.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

/// `loraforge recipe`'s subcommands.
#[derive(Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe and print it fully resolved (defaults filled in).
    Check {
        file: PathBuf,
        /// Override a key, e.g. --set train.learning_rate=2e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

/// Runs a `loraforge recipe` subcommand.
pub fn run(command: RecipeCommand) -> Result<()> {
    let RecipeCommand::Check { file, overrides } = command;
    let recipe = crate::recipe::load(&file, &overrides)?;
    let resolved = toml::to_string_pretty(&recipe).context("rendering the resolved recipe")?;
    println!("# {} is valid; resolved with defaults:\n", file.display());
    print!("{resolved}");
    match crate::io::hub::resolve_model_here(&recipe.model.path) {
        Some(Ok(_)) => {}
        Some(Err(e)) => eprintln!("warning: model.path: {e:#}"),
        None => eprintln!(
            "warning: model.path {} does not exist yet (fetch it before training)",
            recipe.model.path.display()
        ),
    }
    Ok(())
}
