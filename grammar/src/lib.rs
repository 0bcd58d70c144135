//! The `.cnn` language: grammar (`cnn.pest`), typed AST with byte spans, and the
//! parser that turns source text into an AST plus every syntax error found.
//!
//! pest types never leave this crate: callers see [`ast`] and [`SyntaxError`].

pub mod ast;
mod error;
mod parse;
pub mod pretty;

pub use error::SyntaxError;
pub use parse::{parse, Parsed};
