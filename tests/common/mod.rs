//! Helpers shared by the end-to-end tests that drive the real `flotilla` binary against a local
//! cluster in a temporary FLOTILLA_HOME (so no test sees the developer's own cluster).

#![allow(dead_code)] // each test file uses a subset

use std::path::Path;
use std::process::{Command, Output};

/// The `flotilla` binary with FLOTILLA_HOME set and every other cluster variable cleared.
pub fn command(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.env("FLOTILLA_HOME", home);
    for name in ["FLOTILLA_COORDINATOR", "FLOTILLA_TOKEN", "FLOTILLA_JOIN_TOKEN"] {
        command.env_remove(name);
    }
    command
}

/// Runs `flotilla ARGS` to completion.
pub fn run(home: &Path, args: &[&str]) -> Output {
    command(home).args(args).output().expect("the flotilla binary runs")
}

/// Stops and deletes the cluster even when an assertion fails.
pub struct Down<'a>(pub &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["down", "--purge"]);
    }
}
