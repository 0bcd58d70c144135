//! Prints the time of the JIT's depthwise kernels (forward, input gradient,
//! weight gradient) on one core for M3's four depthwise layers (batch 64, 3×3,
//! pad 1), with the bytes they must move and the GFLOP/s. Run in release:
//! `cargo run --release -p cnnc-compiler --example depthwise_speed [-- REPS]`.
//! The times measured on one Zen 3 core are in `src/codegen/depthwise.rs`
//! ("Speed").

use cnnc_compiler::codegen::depthwise::DepthwiseKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec};
use cnnc_compiler::ir::ConvAttrs;
use std::time::Instant;

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut jit = Jit::new().expect("the host is supported");
    for w in jit.warnings() {
        eprintln!("warning: {w}");
    }
    println!("isa: {}", jit.isa().summary());
    for (name, c, hw, s) in [
        ("dw1", 32, 32, 1),
        ("dw2", 64, 32, 2),
        ("dw3", 128, 16, 1),
        ("dw4", 128, 16, 2),
    ] {
        let attrs = ConvAttrs {
            stride: [s, s],
            pad: [1, 1],
            dilation: [1, 1],
            groups: c,
        };
        let x = vec![64, c, hw, hw];
        println!("{name}: x {x:?}, 3x3, stride {s}, pad 1");
        let w = vec![c, 1, 3, 3];
        let o = hw.div_ceil(s);
        let y = vec![64, c, o, o];
        let specs = [
            (
                "forward",
                DepthwiseKernel::Forward {
                    x: x.clone(),
                    w: w.clone(),
                    attrs,
                },
            ),
            (
                "grad_input",
                DepthwiseKernel::GradInput {
                    dy: y.clone(),
                    w: w.clone(),
                    attrs,
                    input: [hw, hw],
                },
            ),
            (
                "grad_weight",
                DepthwiseKernel::GradWeight {
                    x: x.clone(),
                    dy: y.clone(),
                    attrs,
                    kernel: [3, 3],
                },
            ),
        ];
        for (what, k) in specs {
            let spec = KernelSpec::Depthwise(k);
            measure(&mut jit, &format!("{name}.{what}"), spec, reps);
        }
    }
}

fn measure(jit: &mut Jit, label: &str, spec: KernelSpec, reps: usize) {
    let t = Instant::now();
    let id = jit.compile(label, spec.clone()).expect("compiles");
    let compile = t.elapsed().as_secs_f64();
    let len = |s: &Vec<usize>| s.iter().product::<usize>();
    let ins: Vec<Vec<f32>> = spec
        .inputs()
        .iter()
        .map(|s| {
            (0..len(s))
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = spec.outputs().iter().map(|s| vec![0.0; len(s)]).collect();
    let bytes: usize = spec
        .inputs()
        .iter()
        .chain(&spec.outputs())
        .map(len)
        .sum::<usize>()
        * 4;
    let batch = spec.work();
    let run = |outs: &mut Vec<Vec<f32>>| {
        let i: Vec<&[f32]> = ins.iter().map(|v| v.as_slice()).collect();
        let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        let t = Instant::now();
        jit.run(id, &i, &mut o, 0..batch).unwrap();
        t.elapsed().as_secs_f64()
    };
    for _ in 0..3 {
        run(&mut outs);
    }
    let mut times: Vec<f64> = (0..reps).map(|_| run(&mut outs)).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = spec.flops_per_item() as f64 * batch as f64;
    println!(
        "  {label:<16} median {:7.3} ms  best {:7.3} ms  {:5.1} GB/s  {:5.1} GFLOP/s  (compile {:.1} ms)",
        median * 1e3,
        times[0] * 1e3,
        bytes as f64 / median / 1e9,
        flops / median / 1e9,
        compile * 1e3
    );
}
