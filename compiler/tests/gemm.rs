//! `codegen::gemm` against a naive f64 reference: edge sizes around the register
//! tile (6×16) and the blocking (KC 256, MC 144, NC 4096), all four transpose
//! combinations plus general strides, overwrite and accumulate, k = 0, both
//! microkernels, the raw C ABI, and random shapes by proptest.
//!
//! Every matrix lives in a slice padded with NaN (between rows and after the end),
//! so a kernel reading a wrong element poisons its result, and C's padding must
//! come back untouched.

use cnnc_compiler::codegen::gemm::{
    dgemm, dgemm_slices, sgemm, sgemm_kernel_name, sgemm_slices, sgemm_slices_with, Microkernel,
    Strided, Update,
};
use proptest::prelude::*;

/// A deterministic generator of values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// How an operand is stored in its slice.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Rows contiguous, `pad` spare elements after each row.
    RowMajor { pad: usize },
    /// Columns contiguous (a transposed row-major matrix), `pad` spare elements
    /// after each column.
    ColMajor { pad: usize },
    /// Neither: element (r, s) at `r*rs + s*cs` with `rs = 2*cols + 1`, `cs = 2`.
    Strided,
}

const LAYOUTS: [Layout; 4] = [
    Layout::RowMajor { pad: 0 },
    Layout::RowMajor { pad: 3 },
    Layout::ColMajor { pad: 5 },
    Layout::Strided,
];

/// NaN elements after the end of each operand's slice.
const TAIL: usize = 7;

/// A rows×cols matrix stored by `layout` in a NaN-padded slice (NaN between the
/// elements and after the end), and its exact values.
struct Operand {
    data: Vec<f32>,
    rs: isize,
    cs: isize,
    values: Vec<f64>, // row-major, rows×cols, as stored (f32-rounded)
    cols: usize,
}

impl Operand {
    fn new(rows: usize, cols: usize, layout: Layout, rng: &mut Rng) -> Operand {
        let (rs, cs) = match layout {
            Layout::RowMajor { pad } => (cols + pad, 1),
            Layout::ColMajor { pad } => (1, rows + pad),
            Layout::Strided => (2 * cols + 1, 2),
        };
        let len = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        };
        let mut data = vec![f32::NAN; len + TAIL];
        let mut values = vec![0.0; rows * cols];
        for r in 0..rows {
            for s in 0..cols {
                let v = rng.next() as f32;
                data[r * rs + s * cs] = v;
                values[r * cols + s] = v as f64;
            }
        }
        // The slice handed over ends at the last element; the NaN tail beyond it
        // poisons any read past the end.
        Operand {
            data,
            rs: rs as isize,
            cs: cs as isize,
            values,
            cols,
        }
    }

    fn view(&self) -> Strided<'_, f32> {
        let len = self.data.len() - TAIL;
        Strided {
            data: &self.data[..len],
            row_stride: self.rs,
            col_stride: self.cs,
        }
    }

    fn at(&self, r: usize, s: usize) -> f64 {
        self.values[r * self.cols + s]
    }
}

/// One gemm to check.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a: Layout,
    b: Layout,
    ldc_pad: usize,
    update: Update,
}

/// Runs `case` on `kernel` and compares with the f64 reference: each element
/// within 1e-5 of Σ|a||b| (+|c₀|), C's padding untouched.
fn check(kernel: Microkernel, case: Case, seed: u64) {
    let Case { m, n, k, .. } = case;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let a = Operand::new(m, k, case.a, &mut rng);
    let b = Operand::new(k, n, case.b, &mut rng);
    let ldc = n + case.ldc_pad;
    let mut c = vec![f32::NAN; m * ldc + 3];
    let mut c0 = vec![0.0f64; m * n];
    if case.update == Update::Accumulate {
        for i in 0..m {
            for j in 0..n {
                let v = rng.next() as f32;
                c[i * ldc + j] = v;
                c0[i * n + j] = v as f64;
            }
        }
    }
    let before = c.clone();
    sgemm_slices_with(
        kernel,
        m,
        n,
        k,
        a.view(),
        b.view(),
        &mut c,
        ldc,
        case.update,
    );
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                assert!(
                    got.to_bits() == before[i * ldc + j].to_bits(),
                    "{kernel:?} {case:?}: C padding ({i}, {j}) overwritten with {got}"
                );
                continue;
            }
            let (mut want, mut bound) = (c0[i * n + j], c0[i * n + j].abs());
            for p in 0..k {
                want += a.at(i, p) * b.at(p, j);
                bound += (a.at(i, p) * b.at(p, j)).abs();
            }
            let err = (got as f64 - want).abs();
            assert!(
                err <= 1e-5 * bound + 1e-30,
                "{kernel:?} {case:?}: C({i}, {j}) = {got}, want {want} \
                 (error {err:e}, bound {bound})"
            );
        }
    }
    assert!(
        c[m * ldc..].iter().all(|x| x.is_nan()),
        "{kernel:?} {case:?}: wrote past C"
    );
}

fn kernels() -> Vec<Microkernel> {
    [Microkernel::Avx2Fma, Microkernel::Portable]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

fn case(m: usize, n: usize, k: usize, a: Layout, b: Layout, update: Update) -> Case {
    Case {
        m,
        n,
        k,
        a,
        b,
        ldc_pad: 2,
        update,
    }
}

/// Shapes around every tile and block boundary.
const EDGE_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 9),
    (1, 17, 5),
    (5, 1, 7),
    (6, 16, 4),
    (5, 15, 3),
    (7, 17, 10),
    (6, 8, 33),
    (12, 9, 20),
    (13, 24, 2),
    (11, 31, 257),
    (16, 49, 9),
    (16, 10, 64),
    (19, 33, 64),
    (8, 20, 256),
    (2, 40, 300),
    (145, 18, 17),
    (150, 5, 40),
];

#[test]
fn edge_shapes_all_layouts_both_updates() {
    let mut seed = 1;
    for kernel in kernels() {
        for &(m, n, k) in EDGE_SHAPES {
            for a in LAYOUTS {
                for b in LAYOUTS {
                    for update in [Update::Overwrite, Update::Accumulate] {
                        seed += 1;
                        check(kernel, case(m, n, k, a, b, update), seed);
                    }
                }
            }
        }
    }
}

#[test]
fn larger_than_the_blocking() {
    use Layout::*;
    let shapes = [
        // M beyond MC, K beyond KC (twice, partial), a ragged N.
        (150, 21, 520, RowMajor { pad: 0 }, RowMajor { pad: 0 }),
        (150, 21, 520, ColMajor { pad: 1 }, ColMajor { pad: 0 }),
        // N beyond NC = 4096.
        (3, 4113, 5, RowMajor { pad: 0 }, RowMajor { pad: 2 }),
        (7, 4113, 3, ColMajor { pad: 0 }, ColMajor { pad: 1 }),
        // Conv-like: wide N, large M (in-place and packed paths alike).
        (100, 200, 24, RowMajor { pad: 0 }, RowMajor { pad: 0 }),
        (100, 200, 24, Strided, RowMajor { pad: 0 }),
    ];
    for kernel in kernels() {
        for (i, &(m, n, k, a, b)) in shapes.iter().enumerate() {
            for update in [Update::Overwrite, Update::Accumulate] {
                check(kernel, case(m, n, k, a, b, update), 100 + i as u64);
            }
        }
    }
}

#[test]
fn long_k_stays_accurate() {
    // The deepest conv reduction (256×3×3 = 2304): nine KC blocks accumulated.
    for kernel in kernels() {
        for (m, n) in [(13, 17), (6, 49)] {
            let c = case(
                m,
                n,
                2304,
                Layout::RowMajor { pad: 0 },
                Layout::ColMajor { pad: 0 },
                Update::Overwrite,
            );
            check(kernel, c, 7);
        }
    }
}

#[test]
fn k_zero_zeroes_or_keeps_c() {
    for kernel in kernels() {
        for (m, n) in [(1, 1), (7, 17), (13, 40)] {
            let a: [f32; 0] = [];
            let mut c = vec![f32::NAN; m * n];
            let empty = Strided::row_major(&a, 0);
            sgemm_slices_with(kernel, m, n, 0, empty, empty, &mut c, n, Update::Overwrite);
            assert!(c.iter().all(|&x| x == 0.0), "{kernel:?}: k = 0 must zero C");
            c.fill(2.5);
            sgemm_slices_with(kernel, m, n, 0, empty, empty, &mut c, n, Update::Accumulate);
            assert!(c.iter().all(|&x| x == 2.5), "{kernel:?}: k = 0 must keep C");
        }
    }
}

#[test]
fn empty_m_or_n_touches_nothing() {
    let a = [1.0f32; 12];
    let mut c = [f32::NAN; 4];
    sgemm_slices(
        0,
        4,
        3,
        Strided::row_major(&a, 3),
        Strided::row_major(&a, 4),
        &mut c,
        4,
        Update::Overwrite,
    );
    sgemm_slices(
        4,
        0,
        3,
        Strided::row_major(&a, 3),
        Strided::row_major(&a, 0),
        &mut c,
        0,
        Update::Overwrite,
    );
    assert!(c.iter().all(|x| x.is_nan()));
    // The raw ABI with null pointers: nothing is dereferenced.
    unsafe {
        sgemm(
            0,
            5,
            5,
            std::ptr::null(),
            5,
            1,
            std::ptr::null(),
            5,
            1,
            std::ptr::null_mut(),
            5,
            0,
        )
    };
    unsafe {
        dgemm(
            5,
            0,
            5,
            std::ptr::null(),
            5,
            1,
            std::ptr::null(),
            5,
            1,
            std::ptr::null_mut(),
            5,
            0,
        )
    };
}

/// The signature the code generator calls through.
type SgemmFn = unsafe extern "C" fn(
    usize,
    usize,
    usize,
    *const f32,
    isize,
    isize,
    *const f32,
    isize,
    isize,
    *mut f32,
    isize,
    u32,
) -> ();

#[test]
fn c_abi_transposes_by_strides() {
    // conv grad-input: col[K, P] = W[O, K]ᵀ · dY[O, P], with W and dY row-major.
    let (o, kk, p) = (5, 11, 23);
    let mut rng = Rng(99);
    let w: Vec<f32> = (0..o * kk).map(|_| rng.next() as f32).collect();
    let dy: Vec<f32> = (0..o * p).map(|_| rng.next() as f32).collect();
    let mut col = vec![0.0f32; kk * p];
    let f: SgemmFn = sgemm;
    unsafe {
        f(
            kk,
            p,
            o,
            w.as_ptr(),
            1,
            kk as isize,
            dy.as_ptr(),
            p as isize,
            1,
            col.as_mut_ptr(),
            p as isize,
            0,
        )
    };
    for r in 0..kk {
        for s in 0..p {
            let want: f64 = (0..o)
                .map(|q| w[q * kk + r] as f64 * dy[q * p + s] as f64)
                .sum();
            assert!((col[r * p + s] as f64 - want).abs() < 1e-5, "col({r}, {s})");
        }
    }
}

#[test]
fn dgemm_matches_the_reference() {
    let mut rng = Rng(5);
    for &(m, n, k) in EDGE_SHAPES {
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<f64> = (0..m * k).map(|_| rng.next()).collect();
            let b: Vec<f64> = (0..k * n).map(|_| rng.next()).collect();
            let c0: Vec<f64> = (0..m * n).map(|_| rng.next()).collect();
            // A stored m×k (or k×m when transposed), B k×n (or n×k).
            let av = if a_t {
                Strided::col_major(&a, m)
            } else {
                Strided::row_major(&a, k)
            };
            let bv = if b_t {
                Strided::col_major(&b, k)
            } else {
                Strided::row_major(&b, n)
            };
            let a_at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
            let b_at = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
            for update in [Update::Overwrite, Update::Accumulate] {
                let mut c = c0.clone();
                dgemm_slices(m, n, k, av, bv, &mut c, n, update);
                for i in 0..m {
                    for j in 0..n {
                        let mut want = if update == Update::Accumulate {
                            c0[i * n + j]
                        } else {
                            0.0
                        };
                        for p in 0..k {
                            want += a_at(i, p) * b_at(p, j);
                        }
                        let err = (c[i * n + j] - want).abs();
                        assert!(
                            err <= 1e-12 * (1.0 + want.abs()),
                            "({m},{n},{k}) a_t {a_t} b_t {b_t}: ({i},{j}) error {err:e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn kernel_name_matches_the_cpu() {
    let name = sgemm_kernel_name();
    #[cfg(target_arch = "x86_64")]
    {
        let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        assert_eq!(name, if simd { "avx2+fma 6x16" } else { "portable" });
    }
    #[cfg(not(target_arch = "x86_64"))]
    assert_eq!(name, "portable");
}

#[test]
fn threads_use_their_own_buffers() {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..6 {
                    let c = case(
                        20 + t + i,
                        30 + 7 * i,
                        40 + t,
                        Layout::RowMajor { pad: 0 },
                        Layout::RowMajor { pad: 1 },
                        Update::Overwrite,
                    );
                    check(Microkernel::detected(), c, (t * 10 + i) as u64);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
#[should_panic(expected = "reaches elements")]
fn short_slice_is_rejected() {
    let a = [0.0f32; 11]; // 3×4 needs 12
    let b = [0.0f32; 8];
    let mut c = [0.0f32; 6];
    sgemm_slices(
        3,
        2,
        4,
        Strided::row_major(&a, 4),
        Strided::row_major(&b, 2),
        &mut c,
        2,
        Update::Overwrite,
    );
}

#[test]
#[should_panic(expected = "rows of C overlap")]
fn overlapping_c_rows_are_rejected() {
    let a = [0.0f32; 12];
    let b = [0.0f32; 8];
    let mut c = [0.0f32; 8];
    sgemm_slices(
        3,
        2,
        4,
        Strided::row_major(&a, 4),
        Strided::row_major(&b, 2),
        &mut c,
        1,
        Update::Overwrite,
    );
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        (0usize..3).prop_map(|pad| Layout::RowMajor { pad }),
        (0usize..3).prop_map(|pad| Layout::ColMajor { pad }),
        Just(Layout::Strided),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_shapes_match_the_reference(
        m in 1usize..40,
        n in 1usize..60,
        k in 0usize..300,
        a in layout(),
        b in layout(),
        ldc_pad in 0usize..3,
        accumulate in any::<bool>(),
        portable in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kernel = if portable { Microkernel::Portable } else { Microkernel::detected() };
        let update = if accumulate { Update::Accumulate } else { Update::Overwrite };
        check(kernel, Case { m, n, k, a, b, ldc_pad, update }, seed);
    }
}
