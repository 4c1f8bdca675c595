//! The recipe: one TOML file that describes a whole run. `schema` holds the types and defaults,
//! `load` reads files (with `extends` and `--set` overrides) and reports mistakes precisely.

mod load;
mod schema;

pub use load::{RecipeError, load, load_str};
pub use schema::*;
