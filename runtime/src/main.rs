//! The `cnnc` binary: parses the command line, runs the subcommand, exits with its
//! code. A panic is a bug in cnnc: it is reported as an internal error with exit
//! code 3, never as Rust's default panic message and code 101.

use clap::Parser;
use cnnc_runtime::cli::Cli;
use cnnc_runtime::commands::{self, exit};

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
        eprint!("{}", commands::internal_error_text(&msg));
        std::process::exit(exit::INTERNAL);
    }));
    if std::env::var_os("CNNC_TEST_PANIC").is_some() {
        panic!("CNNC_TEST_PANIC is set");
    }
    let cli = Cli::parse();
    std::process::exit(commands::run(cli));
}
