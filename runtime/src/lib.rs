//! The `cnnc` command line: argument parsing, diagnostic rendering, and the
//! subcommands. (The training runtime joins this crate in a later stage.)

pub mod render;
