//! The bodies of the fuzz targets, as plain functions: the cargo-fuzz crate in
//! `fuzz/` calls them on the inputs libFuzzer makes, and `tests/fuzz_bounded.rs`
//! calls them in CI on a fixed stream of generated inputs and on every saved
//! regression (`tests/fuzz/regressions/`). The cross-crate test suites
//! themselves live in `tests/tests/`.
//!
//! | target | body | what it checks |
//! | --- | --- | --- |
//! | `check` | [`check`] | the front end on any bytes ([`frontend::violations`]) |
//! | `pipeline` | [`pipeline::pipeline`] | the front end, then lowering, autodiff, verification, JIT compilation and a run of every checked model |
//! | `jit_vs_interp` | [`jit_vs_interp::jit_vs_interp`] | a valid model made from the bytes ([`gen`]): the JIT equals the interpreter |

pub mod frontend;
pub mod gen;
pub mod jit_vs_interp;
pub mod pipeline;

/// The `check` target: any bytes (invalid UTF-8 replaced by U+FFFD) through
/// `check_text` and both renderings; panics when the front end breaks a
/// promise.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let fe = cnnc_compiler::pipeline::check_text(pipeline::INPUT_NAME, &text);
    let problems = frontend::violations(&fe);
    assert!(
        problems.is_empty(),
        "the front end broke its promises: {problems:#?}"
    );
}
