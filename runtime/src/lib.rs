//! The `cnnc` command line and the training runtime: argument parsing, diagnostic
//! rendering and the subcommands; data sets, parameters, optimizers, checkpoints,
//! backends and the training loop.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod codes;
pub mod commands;
pub mod data;
pub mod explain;
pub mod health;
pub mod memory;
pub mod nonfinite;
pub mod optim;
pub mod params;
pub mod render;
pub mod train;
