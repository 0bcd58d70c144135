//! The optimizer kernels against the runtime's formulas, re-stated here in plain
//! Rust (`runtime/src/optim.rs`: `clip`, `sgd`, `adam`), on tensors of 1, 3, 4,
//! 17 and 1000 elements (every loop of the kernels: unrolled blocks, leftover
//! vectors, scalar tail), whole and split into element ranges at odd points.
//!
//! The updates must agree bit for bit over several steps (first and later, SGD
//! with and without momentum, Nesterov, weight decay; Adam and AdamW with both
//! branches of the lerp; every clip transform). The sum of squares must equal,
//! bit for bit, the kernel's documented summation order re-stated in Rust, and the
//! sequential f64 sum within 1e-13 relative; its maximum skips NaN.

mod common;

use cnnc_compiler::codegen::optim::{
    AdamScalars, GradClip, OptimKernel, SgdScalars, SumSquaresOut,
};
use cnnc_compiler::codegen::{Jit, KernelId, KernelSpec, OptLevel, Par};
use common::Rng;
use std::ops::Range;

const LENS: [usize; 5] = [1, 3, 4, 17, 1000];

/// Every test runs at both Cranelift levels (the runtime uses `None`).
fn jits() -> [Jit; 2] {
    [OptLevel::None, OptLevel::Speed].map(|l| Jit::with_opt_level(l).unwrap())
}

/// The clip transforms the update tests run: none, a scale (a norm policy that
/// fired), a clamp at 0.5 (the value policy; the data is in [-1, 1)).
const CLIPS: [GradClip; 3] = [
    GradClip::NONE,
    GradClip {
        scale: 0.37,
        clamp: f32::INFINITY,
    },
    GradClip {
        scale: 1.0,
        clamp: 0.5,
    },
];

fn compile(j: &mut Jit, k: OptimKernel) -> (KernelId, KernelSpec) {
    let spec = KernelSpec::Optim(k);
    let id = j.compile(&format!("{spec:?}"), spec.clone()).unwrap();
    (id, spec)
}

/// Work ranges covering `0..len`: whole, or split at odd points (one empty).
fn ranges(len: usize, split: bool) -> Vec<Range<usize>> {
    if !split {
        return std::iter::once(0..len).collect();
    }
    let a = (len / 3) | 1;
    let a = a.min(len);
    let b = (a + 2 * len / 3 + 5).min(len);
    vec![0..0, 0..a, a..b, b..len]
}

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}: element {i}: kernel {a:e} vs reference {b:e}"
        );
    }
}

// ---- the reference (runtime/src/optim.rs, re-stated) ----

/// The clip policies' loops: `x *= scale` (norm policies), then the value clamp.
fn clip_ref(g: &[f32], c: GradClip) -> Vec<f32> {
    g.iter()
        .map(|&x| {
            let x = if c.scale != 1.0 { x * c.scale } else { x };
            let v = c.clamp;
            if x > v {
                v
            } else if x < -v {
                -v
            } else {
                x
            }
        })
        .collect()
}

/// `optim::sgd`.
#[allow(clippy::too_many_arguments)]
fn sgd_ref(
    p: &mut [f32],
    grad: &[f32],
    buf: &mut [f32],
    first: bool,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
) {
    let (wd, m, neg_lr) = (weight_decay as f32, momentum as f32, -lr as f32);
    for (i, (p, &g)) in p.iter_mut().zip(grad).enumerate() {
        let g = if weight_decay != 0.0 { g + wd * *p } else { g };
        let d = if momentum != 0.0 {
            let b = &mut buf[i];
            *b = if first { g } else { *b * m + g };
            if nesterov {
                g + m * *b
            } else {
                *b
            }
        } else {
            g
        };
        *p += neg_lr * d;
    }
}

/// `optim::adam`'s f64 scalars, cast to f32 (what the runtime passes).
fn adam_scalars(t: u64, lr: f64, [beta1, beta2]: [f64; 2], wd: f64, clip: GradClip) -> AdamScalars {
    let t = t as f64;
    AdamScalars {
        decay: (1.0 - lr * wd) as f32,
        neg_step: -(lr / (1.0 - beta1.powf(t))) as f32,
        bc2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
        clip,
    }
}

/// `optim::adam`'s loop.
#[allow(clippy::too_many_arguments)]
fn adam_ref(
    p: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamScalars,
    [beta1, beta2]: [f64; 2],
    eps: f64,
    weight_decay: f64,
    decoupled: bool,
) {
    let w1 = 1.0 - beta1;
    let w1f = w1 as f32;
    let (b2, w2) = (beta2 as f32, (1.0 - beta2) as f32);
    let (epsf, wd) = (eps as f32, weight_decay as f32);
    for (((p, &g), m), v) in p.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = if decoupled {
            if weight_decay != 0.0 {
                *p *= s.decay;
            }
            g
        } else if weight_decay != 0.0 {
            g + wd * *p
        } else {
            g
        };
        let diff = g - *m;
        *m = if w1.abs() < 0.5 {
            *m + w1f * diff
        } else {
            g - diff * (1.0 - w1f)
        };
        *v = *v * b2 + w2 * g * g;
        let denom = v.sqrt() / s.bc2_sqrt + epsf;
        *p += s.neg_step * *m / denom;
    }
}

/// `Σ x²` in the order [`OptimKernel::SumSquares`] documents for one range:
/// 16 lane sums over the blocks of 16 (as 8 pairs), the leftover vectors into
/// lanes 0..4, the pairs added as a balanced tree, their two lanes, the tail.
fn lane_order_sum(g: &[f32]) -> f64 {
    let sq = |x: f32| f64::from(x) * f64::from(x);
    let mut acc = [[0.0f64; 2]; 8];
    let blocks = g.len() / 16 * 16;
    let vecs = g.len() / 4 * 4;
    for (j, &x) in g[..blocks].iter().enumerate() {
        let (u, l) = (j % 16 / 4, j % 4);
        acc[2 * u + l / 2][l % 2] += sq(x);
    }
    for (j, &x) in g[blocks..vecs].iter().enumerate() {
        let l = j % 4;
        acc[l / 2][l % 2] += sq(x);
    }
    let mut tail = 0.0;
    for &x in &g[vecs..] {
        tail += sq(x);
    }
    let add = |a: [f64; 2], b: [f64; 2]| [a[0] + b[0], a[1] + b[1]];
    let t = add(
        add(add(acc[0], acc[1]), add(acc[2], acc[3])),
        add(add(acc[4], acc[5]), add(acc[6], acc[7])),
    );
    (t[0] + t[1]) + tail
}

// ---- running the kernels ----

fn sum_squares(j: &Jit, id: KernelId, g: &[f32], split: bool) -> SumSquaresOut {
    let mut total: Option<SumSquaresOut> = None;
    for r in ranges(g.len(), split) {
        let mut out = [f32::NAN; 3];
        j.run(id, &[g], &mut [&mut out], r).unwrap();
        let part = SumSquaresOut::read(&out);
        total = Some(match total {
            Some(t) => t.combine(part),
            None => part,
        });
    }
    total.unwrap()
}

#[test]
fn sum_squares_matches_its_order_and_the_sequential_sum() {
    for mut j in jits() {
        let mut rng = Rng(7);
        let lens = (1..=40).chain([64, 1000, 1037, 4099]);
        for len in lens {
            let (id, spec) = compile(&mut j, OptimKernel::SumSquares { len });
            assert_eq!(spec.par(), Par::Reduce);
            assert_eq!(spec.work(), len);
            // Magnitudes from 2^-8 to 2^8, so that every f64 addition rounds.
            let g: Vec<f32> = rng
                .data(len)
                .iter()
                .map(|x| x * (rng.int(0, 16) as f32 - 8.0).exp2())
                .collect();
            let whole = sum_squares(&j, id, &g, false);
            assert_eq!(
                whole.sum_sq.to_bits(),
                lane_order_sum(&g).to_bits(),
                "len {len}: the documented order"
            );
            let seq: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            for (what, got) in [("whole", whole), ("split", sum_squares(&j, id, &g, true))] {
                assert!(
                    (got.sum_sq - seq).abs() <= 1e-13 * seq,
                    "len {len} {what}: {} vs sequential {seq}",
                    got.sum_sq
                );
                let max = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert_eq!(got.max_abs, max, "len {len} {what}: max |g|");
            }
        }
    }
}

#[test]
fn sum_squares_max_skips_nan_and_keeps_infinities() {
    for mut j in jits() {
        for len in [1, 5, 40] {
            let (id, _) = compile(&mut j, OptimKernel::SumSquares { len });
            let mut g = vec![0.5f32; len];
            g[len - 1] = f32::NAN;
            let o = sum_squares(&j, id, &g, false);
            assert!(o.sum_sq.is_nan(), "len {len}: NaN in the sum");
            let want = if len == 1 { 0.0 } else { 0.5 };
            assert_eq!(o.max_abs, want, "len {len}: NaN never the maximum");
            g[0] = f32::NEG_INFINITY;
            let o = sum_squares(&j, id, &g, true);
            assert_eq!(o.max_abs, f32::INFINITY, "len {len}: |−∞|");
        }
    }
}

/// Runs an update kernel over `ranges(len, split)`: `ins` are `g` and the
/// scalars, `outs` the parameter and state tensors (read and written).
fn update(j: &Jit, id: KernelId, ins: &[&[f32]], outs: &mut [Vec<f32>], split: bool) {
    let len = ins[0].len();
    for r in ranges(len, split) {
        let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        j.run(id, ins, &mut o, r).unwrap();
    }
}

#[test]
fn sgd_matches_the_runtime_bit_for_bit() {
    for mut j in jits() {
        let mut rng = Rng(11);
        let variants = [
            (0.0, false, 0.0),
            (0.0, false, 0.1),
            (0.9, false, 0.0),
            (0.9, false, 0.1),
            (0.9, true, 0.0),
            (0.9, true, 0.1),
        ];
        let mut cases = 0;
        for len in LENS {
            for (momentum, nesterov, weight_decay) in variants {
                let (id, spec) = compile(
                    &mut j,
                    OptimKernel::Sgd {
                        len,
                        momentum,
                        nesterov,
                        weight_decay,
                    },
                );
                assert_eq!(spec.outputs().len(), 1 + usize::from(momentum != 0.0));
                for clip in CLIPS {
                    let p0 = rng.data(len);
                    let mut want_p = p0.clone();
                    // The buffer starts non-zero: the first step must ignore it.
                    let b0 = rng.data(len);
                    let mut want_b = b0.clone();
                    let mut got: Vec<Vec<f32>> = vec![p0; spec.outputs().len()];
                    if got.len() == 2 {
                        got[1] = b0;
                    }
                    for (t, lr) in [0.1f32, 0.05, 0.07].into_iter().enumerate() {
                        let g = rng.data(len);
                        let first = t == 0;
                        let s = SgdScalars {
                            neg_lr: -lr,
                            first,
                            clip,
                        };
                        update(&j, id, &[&g, &s.buffer()], &mut got, t == 1);
                        let lr = f64::from(lr);
                        let cg = clip_ref(&g, clip);
                        sgd_ref(
                            &mut want_p,
                            &cg,
                            &mut want_b,
                            first,
                            lr,
                            momentum,
                            nesterov,
                            weight_decay,
                        );
                        let what = format!(
                        "len {len} momentum {momentum} nesterov {nesterov} wd {weight_decay} {clip:?} step {}",
                        t + 1
                    );
                        same_bits(&got[0], &want_p, &format!("{what}: p"));
                        if momentum != 0.0 {
                            same_bits(&got[1], &want_b, &format!("{what}: buf"));
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, LENS.len() * variants.len() * CLIPS.len() * 3);
    }
}

#[test]
fn adam_and_adamw_match_the_runtime_bit_for_bit() {
    for mut j in jits() {
        let mut rng = Rng(13);
        // beta1 = 0.3 takes the other branch of torch.lerp (|1 − beta1| ≥ 0.5).
        let betas = [[0.9, 0.999], [0.3, 0.99]];
        for len in LENS {
            for betas in betas {
                for decoupled in [false, true] {
                    for weight_decay in [0.0, 0.1] {
                        let eps = 1e-8;
                        let k = OptimKernel::Adam {
                            len,
                            beta1: betas[0],
                            beta2: betas[1],
                            eps,
                            weight_decay,
                            decoupled,
                        };
                        let (id, _) = compile(&mut j, k);
                        for clip in CLIPS {
                            let p0 = rng.data(len);
                            let (mut p, mut m, mut v) =
                                (p0.clone(), vec![0.0; len], vec![0.0; len]);
                            let mut got = vec![p0, vec![0.0; len], vec![0.0; len]];
                            for t in 1..=4u64 {
                                let g = rng.data(len);
                                let lr = [0.01f32, 0.02, 0.005, 0.01][t as usize - 1];
                                let s = adam_scalars(t, f64::from(lr), betas, weight_decay, clip);
                                update(&j, id, &[&g, &s.buffer()], &mut got, t == 2);
                                let cg = clip_ref(&g, clip);
                                adam_ref(
                                    &mut p,
                                    &cg,
                                    &mut m,
                                    &mut v,
                                    &s,
                                    betas,
                                    eps,
                                    weight_decay,
                                    decoupled,
                                );
                                let what = format!(
                                "len {len} betas {betas:?} decoupled {decoupled} wd {weight_decay} {clip:?} step {t}"
                            );
                                same_bits(&got[0], &p, &format!("{what}: p"));
                                same_bits(&got[1], &m, &format!("{what}: m"));
                                same_bits(&got[2], &v, &format!("{what}: v"));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_clip_transform_is_exact_at_its_edges() {
    // `clamp(x · 1)` with clamp +∞ is the identity, −0 and ±∞ included; the
    // clamp keeps values equal to ±v and NaN.
    for mut j in jits() {
        let g = [
            -0.0f32,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.5,
            -0.5,
            0.75,
            f32::NAN,
            -3.0,
        ];
        let len = g.len();
        let (id, _) = compile(
            &mut j,
            OptimKernel::Sgd {
                len,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
        );
        for clip in CLIPS {
            // p = 0 + (−1)·g' with lr 1: p holds −g' (exact).
            let mut got = vec![vec![0.0; len]];
            let s = SgdScalars {
                neg_lr: -1.0,
                first: true,
                clip,
            };
            update(&j, id, &[&g, &s.buffer()], &mut got, false);
            let want: Vec<f32> = clip_ref(&g, clip).iter().map(|x| 0.0 + -1.0 * x).collect();
            for (i, (a, b)) in got[0].iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{clip:?} element {i}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn empty_tensors_are_refused() {
    for mut j in jits() {
        let spec = KernelSpec::Optim(OptimKernel::SumSquares { len: 0 });
        assert!(j.compile("empty", spec).is_err());
    }
}
