//! Fuzz target `pipeline`: any bytes through every stage: the front end, then
//! for a file that checks clean, every graph of its model lowered, through
//! autodiff, verified, and (for a small model) the training and evaluation
//! graphs compiled by the JIT and run once on zeros. Fails on a panic, a
//! verifier error, a refused compile, a non-finite output or a broken
//! front-end promise. The body is `cnnc_tests::pipeline::pipeline`
//! (`tests/src/pipeline.rs`); CI runs it on a fixed stream of mutated examples
//! and on the saved regressions (`tests/tests/fuzz_bounded.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cnnc_tests::pipeline::pipeline(data);
});
