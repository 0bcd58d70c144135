//! Shared by the tests that drive the `cnnc` binary: running it, reading its
//! output, and a fresh scratch folder per test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `cnnc ARGS` without colour, in the test's working directory.
pub fn cnnc(args: &[&str]) -> Output {
    command(args).output().expect("cnnc runs")
}

/// `cnnc ARGS` without colour, in `cwd` (where a default `runs/` would go).
pub fn cnnc_in(cwd: &Path, args: &[&str]) -> Output {
    command(args).current_dir(cwd).output().expect("cnnc runs")
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnnc"));
    c.args(args).env("NO_COLOR", "1");
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An empty folder `cnnc-<suite>-<pid>-<test>` in the system's temp dir.
pub fn fresh_dir(suite: &str, test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnnc-{suite}-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
