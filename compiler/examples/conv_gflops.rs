//! Prints the single-core GFLOP/s of the JIT's convolution kernels on the conv
//! layers of the benchmark networks at batch 64: the direct forward kernel (at
//! both Cranelift optimisation levels) and the GEMM kernels (im2col + sgemm
//! forward, sgemm + col2im input gradient, im2col + sgemm weight gradient), each
//! the median of several timed calls over the whole batch, by wall time and by
//! on-CPU time (the latter is robust to other processes sharing the core). Run in
//! release:
//! `cargo run --release -p cnnc-compiler --example conv_gflops [-- RUNS [FILTER]]`
//! (FILTER: only layers whose name contains it).

use cnnc_compiler::codegen::conv::ConvKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec, OptLevel};
use cnnc_compiler::ir::ConvAttrs;
use std::time::Instant;

/// One conv layer: `c → o` channels on `hw × hw` inputs, a `k × k` kernel.
struct Layer {
    name: &'static str,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    pad: usize,
    stride: usize,
    groups: usize,
}

const BATCH: usize = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(11);
    let filter = args.next().unwrap_or_default();
    let l = |name, c, o, hw, k, pad| Layer {
        name,
        c,
        o,
        hw,
        k,
        pad,
        stride: 1,
        groups: 1,
    };
    let layers = [
        l("M1 1→16 @28", 1, 16, 28, 3, 1),
        l("M1 16→32 @14", 16, 32, 14, 3, 1),
        l("M1 32→64 @7", 32, 64, 7, 3, 1),
        l("M2 3→32 @32", 3, 32, 32, 3, 1),
        l("M2 32→32 @32", 32, 32, 32, 3, 1),
        l("M2 32→64 @16", 32, 64, 16, 3, 1),
        l("M2 64→64 @16", 64, 64, 16, 3, 1),
        l("M2 64→128 @8", 64, 128, 8, 3, 1),
        l("M3 1×1 32→64 @32", 32, 64, 32, 1, 0),
        l("M3 1×1 64→128 @16", 64, 128, 16, 1, 0),
        l("M3 1×1 128→128 @16", 128, 128, 16, 1, 0),
        l("M3 1×1 128→256 @8", 128, 256, 8, 1, 0),
        // Other shapes, for `conv::prefer_direct`: strided, grouped, tiny.
        Layer {
            stride: 2,
            ..l("3×3 s2 16→32 @28", 16, 32, 28, 3, 1)
        },
        Layer {
            groups: 4,
            ..l("3×3 g4 32→32 @16", 32, 32, 16, 3, 1)
        },
        Layer {
            groups: 16,
            ..l("3×3 g16 32→32 @16", 32, 32, 16, 3, 1)
        },
        Layer {
            groups: 32,
            ..l("3×3 g32 64→64 @8", 64, 64, 8, 3, 1)
        },
        l("3×3 1→4 @8", 1, 4, 8, 3, 1),
        l("5×5 1→8 @28", 1, 8, 28, 5, 2),
    ];
    let mut speed = Jit::new().expect("the host is supported");
    let mut none = Jit::with_opt_level(OptLevel::None).expect("the host is supported");
    for w in speed.warnings() {
        eprintln!("warning: {w}");
    }
    println!("isa: {}", speed.isa().summary());
    println!(
        "batch {BATCH}, one core, median of {runs} calls: GFLOP/s by wall time (by on-CPU time)"
    );
    println!(
        "{:<20} {:>13} {:>13} {:>13} {:>13} {:>13} {:>13}",
        "layer",
        "direct speed",
        "direct none",
        "forward",
        "+bias+relu",
        "grad input",
        "grad weight"
    );
    for layer in layers.iter().filter(|l| l.name.contains(&filter)) {
        let attrs = ConvAttrs {
            stride: [layer.stride; 2],
            pad: [layer.pad; 2],
            dilation: [1, 1],
            groups: layer.groups,
        };
        let x = vec![BATCH, layer.c, layer.hw, layer.hw];
        let w = vec![layer.o, layer.c / layer.groups, layer.k, layer.k];
        let direct = KernelSpec::Conv(ConvKernel::Direct {
            x: x.clone(),
            w: w.clone(),
            attrs,
        });
        let forward = |bias, relu| {
            KernelSpec::Conv(ConvKernel::Forward {
                x: x.clone(),
                w: w.clone(),
                attrs,
                bias,
                relu,
                stats: false,
            })
        };
        let y = forward(false, false).outputs()[0].clone();
        let grad_input = KernelSpec::Conv(ConvKernel::GradInput {
            dy: y.clone(),
            w: w.clone(),
            attrs,
            input: [layer.hw; 2],
        });
        let grad_weight = KernelSpec::Conv(ConvKernel::GradWeight {
            x: x.clone(),
            dy: y,
            attrs,
            kernel: [layer.k; 2],
        });
        let cells = [
            measure(&mut speed, direct.clone(), runs),
            measure(&mut none, direct, runs),
            measure(&mut speed, forward(false, false), runs),
            measure(&mut speed, forward(true, true), runs),
            measure(&mut speed, grad_input, runs),
            measure(&mut speed, grad_weight, runs),
        ];
        print!("{:<20}", layer.name);
        for (wall, cpu) in cells {
            let cell = match cpu {
                Some(c) => format!("{wall:.1} ({c:.1})"),
                None => format!("{wall:.1}"),
            };
            print!(" {cell:>13}");
        }
        println!();
    }
}

/// Compiles `spec` and returns its median GFLOP/s over `runs` calls on the whole
/// batch, by wall time and by on-CPU time.
fn measure(jit: &mut Jit, spec: KernelSpec, runs: usize) -> (f64, Option<f64>) {
    let id = jit.compile("conv", spec.clone()).expect("compiles");
    let len = |s: &Vec<usize>| s.iter().product::<usize>();
    let inputs: Vec<Vec<f32>> = spec
        .inputs()
        .iter()
        .enumerate()
        .map(|(b, s)| {
            (0..len(s))
                .map(|i| ((i * 7919 + b * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = spec.outputs().iter().map(|s| vec![0.0; len(s)]).collect();
    let ins: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
    let batch = spec.work();
    let call = |outputs: &mut Vec<Vec<f32>>| {
        let mut outs: Vec<&mut [f32]> = outputs.iter_mut().map(|v| v.as_mut_slice()).collect();
        jit.run(id, &ins, &mut outs, 0..batch).unwrap();
    };
    for _ in 0..2 {
        call(&mut outputs);
    }
    let flops = spec.flops_per_item() as f64 * batch as f64;
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        call(&mut outputs);
        wall.push(flops / t.elapsed().as_secs_f64() / 1e9);
        if let (Some(c0), Some(c1)) = (c, cpu_seconds()) {
            cpu.push(flops / (c1 - c0).max(1e-9) / 1e9);
        }
    }
    let cpu = (!cpu.is_empty()).then(|| median(cpu));
    (median(wall), cpu)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// This thread's time on a CPU so far, in seconds: `clock_gettime` with
/// `CLOCK_THREAD_CPUTIME_ID` (64-bit Linux only; the C library std links).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn cpu_seconds() -> Option<f64> {
    use std::ffi::{c_int, c_long};
    #[repr(C)]
    struct Timespec {
        sec: c_long,
        nsec: c_long,
    }
    extern "C" {
        fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
    }
    const CLOCK_THREAD_CPUTIME_ID: c_int = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    let ok = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    ok.then_some(ts.sec as f64 + ts.nsec as f64 * 1e-9)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn cpu_seconds() -> Option<f64> {
    None
}
