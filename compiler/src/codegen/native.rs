//! Steps that run as Rust code instead of a generated kernel: matrix products
//! (straight onto the GEMM driver), the fused softmax cross-entropy, and plain
//! slice loops for the ops without a kernel (sigmoid, tanh, gelu and their
//! gradients, groupnorm and its gradient, concat, slice, dropout,
//! count_correct, one_hot). Anything else runs through the interpreter's own
//! `eval` on copies of its inputs (slow, but exact: the reference semantics).
//! `cnnc dump --stage=plan` marks them `native …` and `ref interpreter`.
//!
//! The op loops are generic over the element type ([`Elem`]: f32, or f64 for
//! gradient checks; a matrix product in f64 runs on `dgemm`) and do the
//! interpreter's operations in the interpreter's order, so their results are
//! bit-identical to `interp::eval` (`compiler/tests/native_ops.rs`); they
//! allocate nothing. The group-norm sums
//! keep each sum's sequential order and get their speed from running `LANES`
//! (8) independent sums side by side instead.

use super::{gemm, Elem};
use crate::interp::{self, Tensor};
use crate::ir::{self, Act, Op, Shape};
use ndarray::{ArrayD, IxDyn};

#[derive(Clone, Debug, PartialEq)]
pub enum Native {
    /// `c[m,n] = op(a)·op(b)`, `op` = transpose when the flag is set. Buffers: a, b, c.
    MatMul {
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    },
    /// Softmax cross-entropy and its gradient in one pass over the logits:
    /// `(logits[n,k], labels[n]) → (loss[], dlogits[n,k])`, the formulas and
    /// rounding of `softmax_xent` followed by `softmax_xent_grad` (the
    /// probabilities never leave the row being processed).
    SoftmaxXentFused { n: usize, k: usize, smoothing: f64 },
    /// `x → act(x)`, any activation (those with a generated kernel never get
    /// here). Buffers: x, y.
    Act { act: Act },
    /// `(dy, x) → dy·act'(x)`. Buffers: dy, x, dx.
    ActGrad { act: Act },
    /// `(x[n,c,hw], gamma[c], beta[c]) → (y, mean[n,groups], var[n,groups])`.
    GroupNorm {
        n: usize,
        c: usize,
        hw: usize,
        groups: usize,
        eps: f64,
    },
    /// `(dy, x, gamma, mean, var) → (dx, dgamma[c], dbeta[c])`.
    GroupNormGrad {
        n: usize,
        c: usize,
        hw: usize,
        groups: usize,
        eps: f64,
    },
    /// `(a, b, …) → a ‖ b ‖ …` along axis 1; `rows[j]` is the number of
    /// elements of input `j` per image (its channels times the inner size).
    Concat { n: usize, rows: Vec<usize> },
    /// `x[n,c,inner] → x[:, start..start+len, inner]`.
    Slice {
        n: usize,
        c: usize,
        inner: usize,
        start: usize,
        len: usize,
    },
    /// `(x, seed[]) → x·mask/(1-p)`, the mask from [`ir::dropout_keep`].
    Dropout { p: f64, salt: u64 },
    /// `(dy, seed[]) → dy·mask/(1-p)`, the same mask as [`Native::Dropout`].
    DropoutGrad { p: f64, salt: u64 },
    /// `(logits[n,k], labels[n]) → count[]` of rows whose first maximum is the label.
    CountCorrect { n: usize, k: usize },
    /// `classes[n] → [n,classes]` one-hot rows (out-of-range classes give a zero row).
    OneHot { classes: usize },
    /// Any op, by the interpreter. Buffers: the op's inputs, then its outputs.
    Reference {
        op: Op,
        ins: Vec<Shape>,
        outs: Vec<Shape>,
    },
}

impl Native {
    /// The step for a matrix product `a[.., ..] · b[.., ..]` of IR shapes.
    pub fn matmul(a: &Shape, b: &Shape, ta: bool, tb: bool) -> Native {
        let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
        let n = if tb { b[0] } else { b[1] };
        Native::MatMul { m, n, k, ta, tb }
    }

    /// The native step for an op without a generated kernel: Rust code where
    /// there is some, else the interpreter's `eval`. `ins` and `outs` are the
    /// op's shapes (`Op::infer`'s).
    pub fn for_op(op: &Op, ins: Vec<Shape>, outs: Vec<Shape>) -> Native {
        let x = ins.first().map_or(&[][..], |s| s.as_slice());
        match (op, x) {
            (Op::Act(act), _) => return Native::Act { act: *act },
            (Op::ActGrad(act), _) => return Native::ActGrad { act: *act },
            (Op::GroupNorm { groups, eps }, &[n, c, h, w]) => {
                return Native::GroupNorm {
                    n,
                    c,
                    hw: h * w,
                    groups: *groups,
                    eps: *eps,
                }
            }
            (Op::GroupNormGrad { groups, eps }, &[n, c, h, w]) => {
                return Native::GroupNormGrad {
                    n,
                    c,
                    hw: h * w,
                    groups: *groups,
                    eps: *eps,
                }
            }
            (Op::Concat, &[n, ..]) if ins.iter().all(|s| s.len() >= 2) => {
                let rows = ins.iter().map(|s| s[1..].iter().product()).collect();
                return Native::Concat { n, rows };
            }
            (Op::Slice { start, len }, &[n, c, ref inner @ ..]) => {
                return Native::Slice {
                    n,
                    c,
                    inner: inner.iter().product(),
                    start: *start,
                    len: *len,
                }
            }
            (Op::Dropout { p, salt }, _) => return Native::Dropout { p: *p, salt: *salt },
            (Op::DropoutGrad { p, salt }, _) => return Native::DropoutGrad { p: *p, salt: *salt },
            (Op::CountCorrect, &[n, k]) => return Native::CountCorrect { n, k },
            (Op::OneHot { classes }, _) => return Native::OneHot { classes: *classes },
            _ => {}
        }
        Native::Reference {
            op: op.clone(),
            ins,
            outs,
        }
    }

    /// A short name for plans and profiles.
    pub fn label(&self) -> String {
        match self {
            Native::MatMul { .. } => format!("native gemm ({})", gemm::sgemm_kernel_name()),
            Native::SoftmaxXentFused { .. } => "native softmax_xent".to_string(),
            Native::Act { act } => format!("native {}", act_name(act)),
            Native::ActGrad { act } => format!("native {}_grad", act_name(act)),
            Native::GroupNorm { .. } => "native groupnorm".to_string(),
            Native::GroupNormGrad { .. } => "native groupnorm_grad".to_string(),
            Native::Concat { .. } => "native concat".to_string(),
            Native::Slice { .. } => "native slice".to_string(),
            Native::Dropout { .. } => "native dropout".to_string(),
            Native::DropoutGrad { .. } => "native dropout_grad".to_string(),
            Native::CountCorrect { .. } => "native count_correct".to_string(),
            Native::OneHot { .. } => "native one_hot".to_string(),
            Native::Reference { .. } => "ref interpreter".to_string(),
        }
    }

    /// Floating-point operations of one run.
    pub fn flops(&self) -> u64 {
        match self {
            Native::MatMul { m, n, k, .. } => 2 * (m * n * k) as u64,
            _ => 0,
        }
    }

    /// Runs the step. `ins` and `outs` have the lengths of the step's shapes (the
    /// planner guarantees it).
    pub fn run<T: Elem>(&self, ins: &[&[T]], outs: &mut [&mut [T]]) {
        match self {
            Native::MatMul { m, n, k, ta, tb } => {
                let (m, n, k) = (*m, *n, *k);
                let (rsa, csa) = if *ta {
                    (1, m as isize)
                } else {
                    (k as isize, 1)
                };
                let (rsb, csb) = if *tb {
                    (1, k as isize)
                } else {
                    (n as isize, 1)
                };
                assert!(ins[0].len() >= m * k && ins[1].len() >= k * n && outs[0].len() >= m * n);
                // SAFETY: the strides address m×k and k×n elements inside the
                // checked slices; c is m×n with row stride n.
                unsafe {
                    T::gemm(
                        m,
                        n,
                        k,
                        ins[0].as_ptr(),
                        rsa,
                        csa,
                        ins[1].as_ptr(),
                        rsb,
                        csb,
                        outs[0].as_mut_ptr(),
                        n as isize,
                        0,
                    )
                }
            }
            Native::SoftmaxXentFused { n, k, smoothing } => {
                softmax_xent_fused(*n, *k, *smoothing, ins[0], ins[1], outs)
            }
            Native::Act { act } => act_forward(act, ins[0], outs[0]),
            Native::ActGrad { act } => act_backward(act, ins[0], ins[1], outs[0]),
            Native::GroupNorm {
                n,
                c,
                hw,
                groups,
                eps,
            } => {
                let g = GroupGeom::new(*n, *c, *hw, *groups, *eps);
                let [y, mean, var] = outs else {
                    panic!("groupnorm has 3 outputs")
                };
                groupnorm(&g, ins[0], ins[1], ins[2], y, mean, var)
            }
            Native::GroupNormGrad {
                n,
                c,
                hw,
                groups,
                eps,
            } => {
                let g = GroupGeom::new(*n, *c, *hw, *groups, *eps);
                let [dx, dgamma, dbeta] = outs else {
                    panic!("groupnorm_grad has 3 outputs")
                };
                let ins = GradIns {
                    dy: ins[0],
                    x: ins[1],
                    gamma: ins[2],
                    mean: ins[3],
                    var: ins[4],
                };
                groupnorm_grad(&g, &ins, dx, dgamma, dbeta)
            }
            Native::Concat { n, rows } => {
                let out = &mut *outs[0];
                assert_eq!(out.len(), n * rows.iter().sum::<usize>());
                let mut at = 0;
                for i in 0..*n {
                    for (x, &row) in ins.iter().zip(rows) {
                        out[at..at + row].copy_from_slice(&x[i * row..(i + 1) * row]);
                        at += row;
                    }
                }
            }
            Native::Slice {
                n,
                c,
                inner,
                start,
                len,
            } => {
                let (x, out) = (ins[0], &mut *outs[0]);
                let row = len * inner;
                for i in 0..*n {
                    let base = (i * c + start) * inner;
                    out[i * row..(i + 1) * row].copy_from_slice(&x[base..base + row]);
                }
            }
            Native::Dropout { p, salt } | Native::DropoutGrad { p, salt } => {
                dropout(*p, *salt, ins[0], ins[1], outs[0])
            }
            Native::CountCorrect { n, k } => {
                let (logits, labels) = (ins[0], ins[1]);
                let correct = (0..*n)
                    .filter(|&i| {
                        let row = &logits[i * k..(i + 1) * k];
                        Some(argmax(row)) == labels[i].to_usize()
                    })
                    .count();
                // The interpreter's `T::c(count as f64)`.
                outs[0][0] = T::c(correct as f64);
            }
            Native::OneHot { classes } => {
                let out = &mut *outs[0];
                out.fill(T::zero());
                for (i, &c) in ins[0].iter().enumerate() {
                    if let Some(c) = c.to_usize().filter(|c| c < classes) {
                        out[i * classes + c] = T::one();
                    }
                }
            }
            Native::Reference {
                op,
                ins: shapes,
                outs: out_shapes,
            } => {
                let tensors: Vec<Tensor<T>> = shapes
                    .iter()
                    .zip(ins)
                    .map(|(s, d)| {
                        ArrayD::from_shape_vec(IxDyn(s), d.to_vec()).expect("planned shape")
                    })
                    .collect();
                let refs: Vec<&Tensor<T>> = tensors.iter().collect();
                let results = interp::eval(op, &refs, out_shapes);
                for (dst, t) in outs.iter_mut().zip(results) {
                    let t = t.as_standard_layout();
                    dst.copy_from_slice(t.as_slice().expect("standard layout"));
                }
            }
        }
    }
}

/// The label-smoothed target of class `j` (the interpreter's `target`).
fn target<T: Elem>(is_label: bool, smoothing: f64, k: usize) -> T {
    T::c((if is_label { 1.0 - smoothing } else { 0.0 }) + smoothing / k as f64)
}

/// See [`Native::SoftmaxXentFused`]; the same operations, in the same order,
/// as the interpreter's two ops, so the results are identical.
fn softmax_xent_fused<T: Elem>(
    n: usize,
    k: usize,
    smoothing: f64,
    logits: &[T],
    labels: &[T],
    outs: &mut [&mut [T]],
) {
    let mut loss = T::zero();
    let inv_n = T::c(n as f64);
    for i in 0..n {
        let row = &logits[i * k..(i + 1) * k];
        let max = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
        let sum = row.iter().fold(T::zero(), |a, &z| a + (z - max).exp());
        let lse = max + sum.ln();
        // The interpreter reads labels with `to_usize`: negative or NaN → 0
        // (`as usize`: too large saturates).
        let label = if labels[i] >= T::zero() {
            labels[i].to_usize().unwrap_or(usize::MAX)
        } else {
            0
        };
        for j in 0..k {
            let t: T = target(j == label, smoothing, k);
            loss -= t * (row[j] - lse);
            let p = (row[j] - lse).exp();
            outs[1][i * k + j] = (p - t) / inv_n;
        }
    }
    outs[0][0] = loss / inv_n;
}

/// The activation's name in the text form.
fn act_name(a: &Act) -> &'static str {
    match a {
        Act::Relu => "relu",
        Act::LeakyRelu(_) => "leaky_relu",
        Act::Sigmoid => "sigmoid",
        Act::Tanh => "tanh",
        Act::Gelu => "gelu",
    }
}

/// The interpreter's constants are `T::c(x)` (for f32, `x as f32` from an f64).
fn sqrt_2<T: Elem>() -> T {
    T::c(std::f64::consts::SQRT_2)
}

fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// The exact (erf) form, with the interpreter's `erf` (libm's `erff` in f32).
fn gelu<T: Elem>(x: T) -> T {
    T::c(0.5) * x * (T::one() + (x / sqrt_2()).erf())
}

/// `y = f(x)`; one loop per activation, so each is a straight loop over slices.
fn map<T: Elem>(x: &[T], y: &mut [T], f: impl Fn(T) -> T) {
    assert_eq!(x.len(), y.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y = f(x);
    }
}

/// `dx = dy·f(x)`.
fn map_grad<T: Elem>(dy: &[T], x: &[T], dx: &mut [T], f: impl Fn(T) -> T) {
    assert!(dy.len() == dx.len() && x.len() == dx.len());
    for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
        *dx = dy * f(x);
    }
}

/// The interpreter's `act`.
fn act_forward<T: Elem>(a: &Act, x: &[T], y: &mut [T]) {
    let zero = T::zero();
    match *a {
        Act::Relu => map(x, y, |v| v.max(zero)),
        Act::LeakyRelu(s) => {
            let s = T::c(s);
            map(x, y, |v| if v > zero { v } else { v * s })
        }
        Act::Sigmoid => map(x, y, sigmoid),
        Act::Tanh => map(x, y, T::tanh),
        Act::Gelu => map(x, y, gelu),
    }
}

/// The interpreter's `act_grad`, times `dy`.
fn act_backward<T: Elem>(a: &Act, dy: &[T], x: &[T], dx: &mut [T]) {
    let (zero, one) = (T::zero(), T::one());
    match *a {
        Act::Relu => map_grad(dy, x, dx, |v| if v > zero { one } else { zero }),
        Act::LeakyRelu(s) => {
            let s = T::c(s);
            map_grad(dy, x, dx, |v| if v > zero { one } else { s })
        }
        Act::Sigmoid => map_grad(dy, x, dx, |v| {
            let s = sigmoid(v);
            s * (one - s)
        }),
        Act::Tanh => map_grad(dy, x, dx, |v| {
            let t = v.tanh();
            one - t * t
        }),
        // d/dx x·Φ(x) = Φ(x) + x·φ(x)
        Act::Gelu => {
            let sqrt_2pi = T::c((2.0 * std::f64::consts::PI).sqrt());
            let (half, two) = (T::c(0.5), T::c(2.0));
            map_grad(dy, x, dx, |v| {
                let cdf = half * (one + (v / sqrt_2()).erf());
                let pdf = (-v * v / two).exp() / sqrt_2pi;
                cdf + v * pdf
            })
        }
    }
}

/// Index of the first maximum (the interpreter's `argmax`).
fn argmax<T: Elem>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = j;
        }
    }
    best
}

/// See [`Native::Dropout`]. The seed is the interpreter's `to_u64` of the seed
/// tensor's value (0 when it is not in (-1, 2^64)); the element index is the
/// flat index into `x`.
fn dropout<T: Elem>(p: f64, salt: u64, x: &[T], seed: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len());
    let s = seed.first().copied().unwrap_or(T::zero());
    let seed = s.to_u64().unwrap_or(0);
    let scale = T::c(1.0 / (1.0 - p));
    for (i, (y, &v)) in y.iter_mut().zip(x).enumerate() {
        *y = if ir::dropout_keep(seed, salt, i as u64, p) {
            v * scale
        } else {
            T::zero()
        };
    }
}

/// How many independent sequential sums the group-norm loops run side by side:
/// each sum keeps the interpreter's order (so the result is bit-identical), the
/// lanes only hide the latency of the additions.
const LANES: usize = 8;

/// The layout of a group norm: `n` images of `c` channels of `hw` pixels, in
/// `groups` groups of `cg` channels; a group of one image is a contiguous
/// chunk of `per` elements, chunk `ng = image·groups + group`.
struct GroupGeom<T> {
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    cg: usize,
    per: usize,
    /// `per` as the interpreter's T (`T::c(per as f64)`).
    per_f: T,
    eps: T,
}

impl<T: Elem> GroupGeom<T> {
    fn new(n: usize, c: usize, hw: usize, groups: usize, eps: f64) -> GroupGeom<T> {
        let cg = c / groups;
        GroupGeom {
            n,
            c,
            hw,
            groups,
            cg,
            per: cg * hw,
            per_f: T::c((cg * hw) as f64),
            eps: T::c(eps),
        }
    }

    fn chunks(&self) -> usize {
        self.n * self.groups
    }

    /// The channel of row `cc` of chunk `ng`.
    fn channel(&self, ng: usize, cc: usize) -> usize {
        (ng % self.groups) * self.cg + cc
    }

    /// `1/sqrt(var + eps)`, as the interpreter.
    fn inv_std(&self, var: T) -> T {
        T::one() / (var + self.eps).sqrt()
    }

    /// Calls `f(first, lanes)` for blocks of `LANES` consecutive indices of
    /// `0..count`, then for the leftovers one by one.
    fn blocks(count: usize, mut f: impl FnMut(usize, usize)) {
        let mut at = 0;
        while at + LANES <= count {
            f(at, LANES);
            at += LANES;
        }
        while at < count {
            f(at, 1);
            at += 1;
        }
    }
}

/// The interpreter's `groupnorm`: per chunk, the sequential sum, its mean, the
/// sequential sum of squared deviations, the biased variance; then
/// `y = (x - mean)·inv·γ + β`.
fn groupnorm<T: Elem>(
    g: &GroupGeom<T>,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    var: &mut [T],
) {
    let (per, hw) = (g.per, g.hw);
    assert!(x.len() == g.chunks() * per && y.len() == x.len());
    assert!(gamma.len() == g.c && beta.len() == g.c);
    assert!(mean.len() == g.chunks() && var.len() == g.chunks());
    GroupGeom::<T>::blocks(g.chunks(), |ng0, lanes| {
        let (mean, var) = (&mut mean[ng0..ng0 + lanes], &mut var[ng0..ng0 + lanes]);
        if lanes == LANES {
            chunk_stats::<T, LANES>(g, x, ng0, mean, var)
        } else {
            chunk_stats::<T, 1>(g, x, ng0, mean, var)
        }
    });
    for ng in 0..g.chunks() {
        let (m, inv) = (mean[ng], g.inv_std(var[ng]));
        for cc in 0..g.cg {
            let k = g.channel(ng, cc);
            let (gk, bk) = (gamma[k], beta[k]);
            let at = ng * per + cc * hw;
            for (y, &x) in y[at..at + hw].iter_mut().zip(&x[at..at + hw]) {
                *y = (x - m) * inv * gk + bk;
            }
        }
    }
}

/// Mean and variance of chunks `ng0..ng0+L`, each summed in order.
// One index walks `L` chunks side by side: a range loop says it most plainly.
#[allow(clippy::needless_range_loop)]
fn chunk_stats<T: Elem, const L: usize>(
    g: &GroupGeom<T>,
    x: &[T],
    ng0: usize,
    mean: &mut [T],
    var: &mut [T],
) {
    let per = g.per;
    let rows: [&[T]; L] = std::array::from_fn(|l| &x[(ng0 + l) * per..(ng0 + l + 1) * per]);
    let mut s = [T::zero(); L];
    for i in 0..per {
        for l in 0..L {
            s[l] += rows[l][i];
        }
    }
    let m = s.map(|s| s / g.per_f);
    let mut q = [T::zero(); L];
    for i in 0..per {
        for l in 0..L {
            let d = rows[l][i] - m[l];
            q[l] += d * d;
        }
    }
    mean.copy_from_slice(&m);
    var.copy_from_slice(&q.map(|q| q / g.per_f));
}

/// The inputs of [`groupnorm_grad`].
struct GradIns<'a, T> {
    dy: &'a [T],
    x: &'a [T],
    gamma: &'a [T],
    mean: &'a [T],
    var: &'a [T],
}

/// The interpreter's `groupnorm_grad`: per chunk,
/// `dx = inv/M · (M·d - Σd - x̂·Σ(d·x̂))` with `d = ȳ·γ[c]`, the sums in order;
/// `γ̄[c] = Σ ȳ·x̂` and `β̄[c] = Σ ȳ` over the images, then pixels, in order.
fn groupnorm_grad<T: Elem>(
    g: &GroupGeom<T>,
    a: &GradIns<T>,
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let (per, c) = (g.per, g.c);
    let len = g.chunks() * per;
    assert!(a.dy.len() == len && a.x.len() == len && dx.len() == len);
    assert!(a.gamma.len() == c && dgamma.len() == c && dbeta.len() == c);
    assert!(a.mean.len() == g.chunks() && a.var.len() == g.chunks());
    // Σd and Σ(d·x̂) per chunk, then dx of those chunks.
    GroupGeom::<T>::blocks(g.chunks(), |ng0, lanes| {
        if lanes == LANES {
            chunk_grad::<T, LANES>(g, a, ng0, dx)
        } else {
            chunk_grad::<T, 1>(g, a, ng0, dx)
        }
    });
    // γ̄ and β̄ per channel.
    GroupGeom::<T>::blocks(c, |k0, lanes| {
        let (dgamma, dbeta) = (&mut dgamma[k0..k0 + lanes], &mut dbeta[k0..k0 + lanes]);
        if lanes == LANES {
            channel_grad_sums::<T, LANES>(g, a, k0, dgamma, dbeta)
        } else {
            channel_grad_sums::<T, 1>(g, a, k0, dgamma, dbeta)
        }
    });
}

/// `dx` of chunks `ng0..ng0+L`: first `Σd` and `Σ(d·x̂)` of each chunk, summed
/// in order, then one pass per chunk.
fn chunk_grad<T: Elem, const L: usize>(g: &GroupGeom<T>, a: &GradIns<T>, ng0: usize, dx: &mut [T]) {
    let (hw, per) = (g.hw, g.per);
    let m: [T; L] = std::array::from_fn(|l| a.mean[ng0 + l]);
    let inv: [T; L] = std::array::from_fn(|l| g.inv_std(a.var[ng0 + l]));
    let mut sum_d = [T::zero(); L];
    let mut sum_dx = [T::zero(); L];
    for cc in 0..g.cg {
        let gk: [T; L] = std::array::from_fn(|l| a.gamma[g.channel(ng0 + l, cc)]);
        let at = |l: usize| (ng0 + l) * per + cc * hw;
        let dy: [&[T]; L] = std::array::from_fn(|l| &a.dy[at(l)..at(l) + hw]);
        let x: [&[T]; L] = std::array::from_fn(|l| &a.x[at(l)..at(l) + hw]);
        for p in 0..hw {
            for l in 0..L {
                let xhat = (x[l][p] - m[l]) * inv[l];
                let d = dy[l][p] * gk[l];
                sum_d[l] += d;
                sum_dx[l] += d * xhat;
            }
        }
    }
    let big_m = g.per_f;
    for l in 0..L {
        let ng = ng0 + l;
        let (m, inv, sum_d, sum_dx) = (m[l], inv[l], sum_d[l], sum_dx[l]);
        let scale = inv / big_m;
        for cc in 0..g.cg {
            let gk = a.gamma[g.channel(ng, cc)];
            let at = ng * per + cc * hw;
            let rows = dx[at..at + hw]
                .iter_mut()
                .zip(&a.dy[at..at + hw])
                .zip(&a.x[at..at + hw]);
            for ((dx, &dy), &x) in rows {
                let xhat = (x - m) * inv;
                let d = dy * gk;
                *dx = scale * (big_m * d - sum_d - xhat * sum_dx);
            }
        }
    }
}

/// `γ̄` and `β̄` of channels `k0..k0+L`, each summed over images, then pixels,
/// in order.
fn channel_grad_sums<T: Elem, const L: usize>(
    g: &GroupGeom<T>,
    a: &GradIns<T>,
    k0: usize,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let hw = g.hw;
    let mut dg = [T::zero(); L];
    let mut db = [T::zero(); L];
    for i in 0..g.n {
        let ng = |l: usize| i * g.groups + (k0 + l) / g.cg;
        let m: [T; L] = std::array::from_fn(|l| a.mean[ng(l)]);
        let inv: [T; L] = std::array::from_fn(|l| g.inv_std(a.var[ng(l)]));
        let at = |l: usize| (i * g.c + k0 + l) * hw;
        let dy: [&[T]; L] = std::array::from_fn(|l| &a.dy[at(l)..at(l) + hw]);
        let x: [&[T]; L] = std::array::from_fn(|l| &a.x[at(l)..at(l) + hw]);
        for p in 0..hw {
            for l in 0..L {
                let xhat = (x[l][p] - m[l]) * inv[l];
                dg[l] += dy[l][p] * xhat;
                db[l] += dy[l][p];
            }
        }
    }
    dgamma.copy_from_slice(&dg);
    dbeta.copy_from_slice(&db);
}
