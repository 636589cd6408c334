//! One module per subcommand: argument struct + `run`. Shared helpers for reading job specs.

pub mod spec_file;
pub mod validate;
