//! Fuzz target `check`: any bytes (invalid UTF-8 replaced by U+FFFD) through the
//! whole front end, `check_text` then both renderings. It fails on a panic and on
//! a broken promise: every error located, every label span inside its own file
//! and on char boundaries, every JSON line valid with the editor fields. The
//! body is `cnnc_tests::check` (`tests/src/lib.rs`); the same checks run in CI
//! on a fixed corpus (`tests/tests/robustness.rs`) and on the saved regressions
//! (`tests/tests/fuzz_bounded.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cnnc_tests::check(data));
