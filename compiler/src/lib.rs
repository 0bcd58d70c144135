//! The cnnc compiler's front end: source files and imports, name resolution,
//! argument checking and static shape inference, producing a [`checked::CheckedModel`]
//! (later stages — graph IR, autodiff, fusion, codegen — build on it).
//!
//! The entry point is [`pipeline::check_paths`]: the stages in order, in one screen.

pub mod check;
pub mod checked;
pub mod codegen;
pub mod diag;
pub mod interp;
pub mod ir;
pub mod params;
pub mod pipeline;
pub mod source;
pub mod summary;

pub use diag::{Diag, DiagKind};
