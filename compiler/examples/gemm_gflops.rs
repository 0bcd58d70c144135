//! Prints the single-core GFLOP/s of `codegen::gemm::sgemm` on the shapes the
//! convolution and linear kernels call it with (median of several timed runs,
//! each long enough to be measured reliably). Run in release:
//! `cargo run --release -p cnnc-compiler --example gemm_gflops [-- RUNS]`.

use cnnc_compiler::codegen::gemm::{sgemm, sgemm_kernel_name};
use std::hint::black_box;
use std::time::Instant;

/// How B is stored: as k×n row-major, or transposed (n×k row-major, as grad-weight
/// reads colᵀ).
#[derive(Clone, Copy)]
enum BLayout {
    Normal,
    Transposed,
}

/// How A is stored: as m×k row-major, or transposed (k×m row-major, as grad-input
/// reads Wᵀ).
#[derive(Clone, Copy)]
enum ALayout {
    Normal,
    Transposed,
}

struct Shape {
    what: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: ALayout,
    b: BLayout,
    accumulate: bool,
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let shape = |what, m, n, k, a, b, accumulate| Shape {
        what,
        m,
        n,
        k,
        a,
        b,
        accumulate,
    };
    use ALayout as A;
    use BLayout as B;
    let shapes = [
        shape(
            "conv fwd 1→16 28×28",
            16,
            784,
            9,
            A::Normal,
            B::Normal,
            false,
        ),
        shape(
            "conv fwd 16→32 14×14",
            32,
            196,
            144,
            A::Normal,
            B::Normal,
            false,
        ),
        shape(
            "conv fwd 32→64 7×7",
            64,
            49,
            288,
            A::Normal,
            B::Normal,
            false,
        ),
        shape(
            "conv dW 16→32 (B=colᵀ)",
            32,
            144,
            196,
            A::Normal,
            B::Transposed,
            true,
        ),
        shape(
            "conv dX 16→32 (A=Wᵀ)",
            144,
            196,
            32,
            A::Transposed,
            B::Normal,
            false,
        ),
        shape(
            "conv fwd 128→128 14×14",
            128,
            196,
            1152,
            A::Normal,
            B::Normal,
            false,
        ),
        shape(
            "conv fwd 256→256 7×7",
            256,
            49,
            2304,
            A::Normal,
            B::Normal,
            false,
        ),
        shape(
            "linear 64→10 (B=Wᵀ)",
            64,
            10,
            64,
            A::Normal,
            B::Transposed,
            false,
        ),
        shape("square 512", 512, 512, 512, A::Normal, B::Normal, false),
    ];
    println!("kernel: {}", sgemm_kernel_name());
    println!(
        "{:<26} {:>5} {:>5} {:>5}  {:>9}  {:>8}",
        "shape", "M", "N", "K", "time", "GFLOP/s"
    );
    for s in &shapes {
        let (secs, gflops) = measure(s, runs);
        println!(
            "{:<26} {:>5} {:>5} {:>5}  {:>7.2}µs  {:>8.1}",
            s.what,
            s.m,
            s.n,
            s.k,
            secs * 1e6,
            gflops
        );
    }
}

/// The median time of one call and its GFLOP/s.
fn measure(s: &Shape, runs: usize) -> (f64, f64) {
    let (m, n, k) = (s.m, s.n, s.k);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut c = vec![0.0f32; m * n];
    let (rsa, csa) = match s.a {
        ALayout::Normal => (k as isize, 1),
        ALayout::Transposed => (1, m as isize),
    };
    let (rsb, csb) = match s.b {
        BLayout::Normal => (n as isize, 1),
        BLayout::Transposed => (1, k as isize),
    };
    let flops = 2.0 * (m * n * k) as f64;
    let mut call = || unsafe {
        sgemm(
            m,
            n,
            k,
            black_box(a.as_ptr()),
            rsa,
            csa,
            black_box(b.as_ptr()),
            rsb,
            csb,
            black_box(c.as_mut_ptr()),
            n as isize,
            u32::from(s.accumulate),
        )
    };
    // Calls per timed run: about 2 ms of work at 50 GFLOP/s.
    let reps = ((2e-3 * 50e9 / flops) as usize).max(1);
    for _ in 0..reps {
        call();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                call();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    (median, flops / median / 1e9)
}
