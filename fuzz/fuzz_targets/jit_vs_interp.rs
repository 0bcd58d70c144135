//! Fuzz target `jit_vs_interp`: the bytes choose a valid model (convs with
//! stride, padding, dilation and groups, depthwise, norms, pools, branches,
//! residual adds, concats, activations, dropout, a linear head) and which of
//! its graphs to run; the JIT and the reference interpreter run it on the same
//! random inputs and parameters, in f32 and f64, and must agree within a
//! tolerance relative to each output's scale. The body is
//! `cnnc_tests::jit_vs_interp::jit_vs_interp` (`tests/src/jit_vs_interp.rs`,
//! the generator in `tests/src/gen.rs`); CI runs it on a fixed stream of random
//! inputs and on the saved regressions (`tests/tests/fuzz_bounded.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cnnc_tests::jit_vs_interp::jit_vs_interp(data));
