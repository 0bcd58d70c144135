//! Prints the single-core GFLOP/s of `codegen::gemm::sgemm` on the shapes the
//! convolution and linear kernels call it with: the median of several timed runs
//! (each about 2 ms of calls), by wall clock and, on Linux, by the thread's time
//! on a CPU, which other processes sharing the cores do not inflate. Run in
//! release:
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
        "{:<26} {:>5} {:>5} {:>5}  {:>10}  {:>8}  {:>8}",
        "shape", "M", "N", "K", "time", "GFLOP/s", "(on-CPU)"
    );
    for s in &shapes {
        let t = measure(s, runs);
        let cpu = match t.cpu_gflops {
            Some(g) => format!("{g:.1}"),
            None => "-".into(),
        };
        println!(
            "{:<26} {:>5} {:>5} {:>5}  {:>8.2}µs  {:>8.1}  {:>8}",
            s.what,
            s.m,
            s.n,
            s.k,
            t.secs * 1e6,
            t.gflops,
            cpu
        );
    }
}

/// One shape's result: the median wall time of a call and its GFLOP/s, and the
/// median GFLOP/s by on-CPU time when the platform reports it.
struct Timing {
    secs: f64,
    gflops: f64,
    cpu_gflops: Option<f64>,
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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn measure(s: &Shape, runs: usize) -> Timing {
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
    let mut wall = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let c0 = cpu_seconds();
        let t = Instant::now();
        for _ in 0..reps {
            call();
        }
        wall.push(t.elapsed().as_secs_f64() / reps as f64);
        if let (Some(c0), Some(c1)) = (c0, cpu_seconds()) {
            cpu.push((c1 - c0) / reps as f64);
        }
    }
    let secs = median(wall);
    Timing {
        secs,
        gflops: flops / secs / 1e9,
        cpu_gflops: (cpu.len() == runs).then(|| flops / median(cpu) / 1e9),
    }
}
