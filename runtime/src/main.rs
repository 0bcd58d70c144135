//! The `cnnc` binary: parses the command line, runs the subcommand, exits with its
//! code. A panic is a bug in cnnc: it is reported as an internal error with exit
//! code 3, never as Rust's default panic message and code 101.

use clap::Parser;
use cnnc_runtime::cli::Cli;
use cnnc_runtime::commands::{self, exit};
use std::sync::Mutex;

/// The message of the last panic, kept by the hook for the report in `main`
/// (a panic caught on purpose, e.g. by the diagnostic renderer, prints nothing).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic with a non-text payload".to_string());
        let msg = match info.location() {
            Some(at) => format!("{msg} (at {}:{})", at.file(), at.line()),
            None => msg,
        };
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(msg);
        }
    }));
    let code = std::panic::catch_unwind(|| {
        if std::env::var_os("CNNC_TEST_PANIC").is_some() {
            panic!("CNNC_TEST_PANIC is set");
        }
        commands::run(Cli::parse())
    })
    .unwrap_or_else(|_| {
        let msg = LAST_PANIC
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .unwrap_or_else(|| "unknown panic".into());
        eprint!("{}", commands::internal_error_text(&msg));
        exit::INTERNAL
    });
    std::process::exit(code);
}
