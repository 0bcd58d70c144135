//! The `cnnc` command line: argument parsing, diagnostic rendering, and the
//! subcommands. (The training runtime joins this crate in a later stage.)

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod codes;
pub mod commands;
pub mod data;
pub mod optim;
pub mod params;
pub mod render;
pub mod train;
