//! Prints the GFLOP/s of the JIT's conv2d forward kernel on one core, on M1's
//! second convolution (batch 64, 16→32 channels, 14×14, 3×3, pad 1), for
//! comparison with what one core sustains (DESIGN.md), at both Cranelift
//! optimisation levels. Run in release:
//! `cargo run --release -p cnnc-compiler --example conv_gflops [-- REPS]`.

use cnnc_compiler::codegen::conv::ConvKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec, OptLevel};
use cnnc_compiler::ir::ConvAttrs;
use std::time::Instant;

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    for opt in [OptLevel::Speed, OptLevel::None] {
        measure(opt, reps);
    }
}

fn measure(opt: OptLevel, reps: usize) {
    let mut jit = Jit::with_opt_level(opt).expect("the host is supported");
    for w in jit.warnings() {
        eprintln!("warning: {w}");
    }
    let spec = KernelSpec::Conv(ConvKernel::Direct {
        x: vec![64, 16, 14, 14],
        w: vec![32, 16, 3, 3],
        attrs: ConvAttrs {
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
    });
    let t = Instant::now();
    let id = jit.compile("conv", spec.clone()).expect("compiles");
    let compile = t.elapsed();
    let len = |s: &Vec<usize>| s.iter().product::<usize>();
    let x: Vec<f32> = (0..len(&spec.inputs()[0]))
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let w: Vec<f32> = (0..len(&spec.inputs()[1]))
        .map(|i| ((i * 104_729) % 1000) as f32 / 5000.0 - 0.1)
        .collect();
    let mut y = vec![0.0f32; len(&spec.outputs()[0])];
    let batch = spec.work();
    for _ in 0..3 {
        jit.run(id, &[&x, &w], &mut [&mut y], 0..batch).unwrap();
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        jit.run(id, &[&x, &w], &mut [&mut y], 0..batch).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let flops = spec.flops_per_item() as f64 * batch as f64;
    let median = times[times.len() / 2];
    println!("isa: {}, opt_level {opt:?}", jit.isa().summary());
    println!("compile: {:.1} ms", compile.as_secs_f64() * 1e3);
    println!(
        "conv2d 64x16x14x14 -> 32, k3 p1: median {:.3} ms, best {:.3} ms, {:.1} GFLOP/s (median), {:.1} GFLOP/s (best)",
        median * 1e3,
        times[0] * 1e3,
        flops / median / 1e9,
        flops / times[0] / 1e9
    );
}
