//! Optimizer kernels: the parameter update (SGD, Adam, AdamW) with the clip
//! policy's transform of the gradient applied on the fly, and the gradient sums of
//! squares the clip policy needs.
//!
//! Every kernel works on one flat tensor of `len` elements, and its work items are
//! the elements: a call computes elements `start..end` (any split gives the same
//! result for the updates; [`OptimKernel::SumSquares`] returns per-range partials
//! that the caller combines with [`SumSquaresOut::combine`]). The range is a
//! run-time value, so the loops are: an f32x4 loop unrolled four times, an f32x4
//! loop over the leftover whole vectors, and a scalar loop over the tail.
//!
//! The runtime (`runtime/src/optim.rs`) is the reference: its SGD and Adam loops
//! follow `torch.optim` step for step in f32, with the step's scalar factors
//! computed in f64 and cast to f32. The update kernels do the same f32 operations
//! in the same order (no fused multiply-adds, which would round once instead of
//! twice; `sqrt` and `fdiv` are correctly rounded in f32x4 as in f32), so a kernel
//! gives the runtime's results bit for bit given the same scalars. Constant
//! hyper-parameters (momentum, betas, eps, weight decay) are baked into the
//! kernel; the per-step scalars (learning rate factors, the clip's scale and
//! clamp, SGD's first-step flag) come in a small scalars buffer
//! ([`SgdScalars`], [`AdamScalars`]).
//!
//! The clip transform of a gradient element `x` is `clamp(x · scale)`, where
//! `clamp(y) = v if y > v, −v if y < −v, else y` (NaN passes). With `scale = 1`
//! and `v = +∞` it is the identity (bit for bit, NaN aside), so one kernel serves
//! every policy: `norm`/`layer_norm` pass the scale when they fired, `value`
//! passes its clamp.
//!
//! Compiled for f64, the updates run the same operations on f64 (f64x2 vectors;
//! the scalars buffer holds f64 too), and [`OptimKernel::SumSquares`] is a plain
//! scalar loop whose output is read with [`SumSquaresOut::read_f64`].

use super::builder::{Bound, Kb, F32, F32X4};
use super::elementwise::PerVector;
use super::DType;
use super::{Emit, Par};
use crate::ir::Shape;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{
    types, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value,
};

const F64: Type = types::F64;
const F64X2: Type = types::F64X2;
const I8X16: Type = types::I8X16;

/// The optimizer kernels, each over a flat tensor of `len` elements.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimKernel {
    /// [`Par::Reduce`]: `g → out`, with `out[0..2]` the bit pattern of the f64
    /// `Σ g²` (each square exact in f64, accumulated in f64; little-endian, low
    /// word in `out[0]`) and `out[2] = max |g|` (f32; NaN elements ignored, 0 for
    /// an empty range). Read it with [`SumSquaresOut::read`]. The partials of a
    /// split range are *not* added as f32: combine them with
    /// [`SumSquaresOut::combine`]. Buffers: `g [len]`, `out [3]`.
    ///
    /// The sum is taken in 16 f64 partial sums, one per position `j mod 16` in
    /// the blocks of 16 elements from `start` (eight f64x2: lanes 0, 1 of each
    /// f32x4 in one, lanes 2, 3 in the next); the leftover whole vectors add into
    /// the first four; then the eight f64x2 are added as a balanced tree, their
    /// two lanes added, and the tail's sequential sum added last. So it is not the
    /// runtime's sequential sum (`optim::sum_sq`) and differs from it by f64
    /// rounding (usually it is closer to the exact sum).
    ///
    /// In f64: `out[0] = Σ g²` (a sequential sum), `out[1] = 0`, `out[2] = max
    /// |g|`; read it with [`SumSquaresOut::read_f64`].
    SumSquares { len: usize },
    /// [`Par::Items`]: `torch.optim.SGD` (dampening 0) on the clipped gradient.
    /// Buffers: `g [len]`, `s [4]` ([`SgdScalars`]), then read and written `p
    /// [len]` and, when `momentum != 0`, the momentum buffer `b [len]`:
    ///
    /// ```text
    /// g = clamp(g · scale)                 (the clip transform)
    /// g = g + wd · p                       (wd != 0)
    /// b = first ? g : b · momentum + g     (momentum != 0)
    /// d = g + momentum · b                 (nesterov; d = b without; d = g when momentum = 0)
    /// p = p + neg_lr · d
    /// ```
    Sgd {
        len: usize,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// [`Par::Items`]: `torch.optim.Adam` (`decoupled: false`, L2 decay) or
    /// `AdamW` (`decoupled: true`), no amsgrad, on the clipped gradient.
    /// Buffers: `g [len]`, `s [5]` ([`AdamScalars`]), then read and written
    /// `p [len]`, `m [len]`, `v [len]`. With the f32 constants `w1 = 1 − beta1`,
    /// `b2 = beta2`, `w2 = 1 − beta2` (computed in f64, then cast):
    ///
    /// ```text
    /// g = clamp(g · scale)                 (the clip transform)
    /// p = p · decay                        (decoupled, wd != 0)
    /// g = g + wd · p                       (not decoupled, wd != 0)
    /// m = m + w1 · (g − m)                 (|1 − beta1| < 0.5; else g − (g − m) · (1 − w1): torch.lerp)
    /// v = v · b2 + (w2 · g) · g
    /// p = p + (neg_step · m) / (sqrt(v) / bc2_sqrt + eps)
    /// ```
    Adam {
        len: usize,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    },
}

/// What the clip policy does to each gradient element: `clamp(x · scale)` to
/// `[−clamp, clamp]` (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradClip {
    pub scale: f32,
    pub clamp: f32,
}

impl GradClip {
    /// The identity: scale 1, clamp +∞.
    pub const NONE: GradClip = GradClip {
        scale: 1.0,
        clamp: f32::INFINITY,
    };
}

/// The per-step scalars of [`OptimKernel::Sgd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdScalars {
    /// `−lr` (f32).
    pub neg_lr: f32,
    /// The optimizer's first step (the momentum buffer starts as the gradient).
    pub first: bool,
    pub clip: GradClip,
}

impl SgdScalars {
    /// The scalars buffer: `[neg_lr, scale, clamp, first as 0/1]`.
    pub fn buffer(&self) -> [f32; 4] {
        [
            self.neg_lr,
            self.clip.scale,
            self.clip.clamp,
            f32::from(u8::from(self.first)),
        ]
    }
}

/// The per-step scalars of [`OptimKernel::Adam`], computed as `torch.optim` does
/// (in f64 from the step number `t` and the learning rate, then cast to f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// `1 − lr · weight_decay` (AdamW's decoupled decay).
    pub decay: f32,
    /// `−lr / (1 − beta1^t)`.
    pub neg_step: f32,
    /// `sqrt(1 − beta2^t)`.
    pub bc2_sqrt: f32,
    pub clip: GradClip,
}

impl AdamScalars {
    /// The scalars buffer: `[decay, neg_step, bc2_sqrt, scale, clamp]`.
    pub fn buffer(&self) -> [f32; 5] {
        [
            self.decay,
            self.neg_step,
            self.bc2_sqrt,
            self.clip.scale,
            self.clip.clamp,
        ]
    }
}

/// The result of [`OptimKernel::SumSquares`] over a range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SumSquaresOut {
    /// `Σ g²` in f64.
    pub sum_sq: f64,
    /// `max |g|` over the non-NaN elements (0 if none).
    pub max_abs: f32,
}

impl SumSquaresOut {
    /// Decodes the kernel's output buffer.
    pub fn read(out: &[f32; 3]) -> SumSquaresOut {
        let bits = u64::from(out[0].to_bits()) | (u64::from(out[1].to_bits()) << 32);
        SumSquaresOut {
            sum_sq: f64::from_bits(bits),
            max_abs: out[2],
        }
    }

    /// Decodes the output buffer of an f64 kernel.
    pub fn read_f64(out: &[f64; 3]) -> SumSquaresOut {
        SumSquaresOut {
            sum_sq: out[0],
            max_abs: out[2] as f32,
        }
    }

    /// The result over two adjacent ranges.
    pub fn combine(self, other: SumSquaresOut) -> SumSquaresOut {
        SumSquaresOut {
            sum_sq: self.sum_sq + other.sum_sq,
            max_abs: if other.max_abs > self.max_abs {
                other.max_abs
            } else {
                self.max_abs
            },
        }
    }
}

impl OptimKernel {
    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        match *self {
            OptimKernel::SumSquares { len }
            | OptimKernel::Sgd { len, .. }
            | OptimKernel::Adam { len, .. } => len,
        }
    }

    /// Whether the tensor is empty (such a kernel is refused, as every kernel
    /// with an empty buffer).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Emit for OptimKernel {
    fn inputs(&self) -> Vec<Shape> {
        let t = vec![self.len()];
        match self {
            OptimKernel::SumSquares { .. } => vec![t],
            OptimKernel::Sgd { .. } => vec![t, vec![4]],
            OptimKernel::Adam { .. } => vec![t, vec![5]],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        let t = vec![self.len()];
        match self {
            OptimKernel::SumSquares { .. } => vec![vec![3]],
            OptimKernel::Sgd { momentum, .. } if *momentum != 0.0 => vec![t.clone(), t],
            OptimKernel::Sgd { .. } => vec![t],
            OptimKernel::Adam { .. } => vec![t; 3],
        }
    }

    fn par(&self) -> Par {
        match self {
            OptimKernel::SumSquares { .. } => Par::Reduce,
            _ => Par::Items,
        }
    }

    fn flops_per_item(&self) -> u64 {
        // The clip transform (a multiply; compares are not counted), then the
        // update's arithmetic.
        match *self {
            OptimKernel::SumSquares { .. } => 2,
            OptimKernel::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => {
                let wd = if weight_decay != 0.0 { 2 } else { 0 };
                let mom = match (momentum != 0.0, nesterov) {
                    (false, _) => 0,
                    (true, false) => 2,
                    (true, true) => 4,
                };
                1 + wd + mom + 2
            }
            OptimKernel::Adam { weight_decay, .. } => {
                let wd = if weight_decay != 0.0 { 2 } else { 0 };
                1 + wd + 3 + 4 + 6
            }
        }
    }

    fn emit(&self, kb: &mut Kb) {
        match *self {
            OptimKernel::SumSquares { .. } if kb.dt == DType::F64 => sum_squares_f64(kb),
            OptimKernel::SumSquares { .. } => sum_squares(kb),
            OptimKernel::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => sgd(kb, momentum, nesterov, weight_decay),
            OptimKernel::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
                ..
            } => adam(kb, [beta1, beta2], eps, weight_decay, decoupled),
        }
    }
}

/// Vectors per iteration of the unrolled main loop.
const UNROLL: i64 = 4;

/// Loops over the elements `start..end` of the work range: a vector loop
/// unrolled [`UNROLL`] times, a vector loop over the leftover whole vectors, a
/// scalar loop over the tail. `f(kb, ty, ptrs, byte_offset)` handles one vector
/// or scalar at `byte_offset` from each pointer, already advanced to the element.
/// `ptrs` point at element 0 of their buffers.
fn over_range(kb: &mut Kb, ptrs: &[Value], f: &mut PerVector) {
    let (start, end) = (kb.start, kb.end);
    let [e_block, e_vec] = range_ends(kb);
    let (lanes, e, vt, st) = (kb.lanes() as i64, kb.esz(), kb.vty(), kb.sty());
    let loops = [
        (start, e_block, lanes * UNROLL, vt, UNROLL),
        (e_block, e_vec, lanes, vt, 1),
        (e_vec, end, 1, st, 1),
    ];
    for (from, to, step, ty, n) in loops {
        kb.for_range(Bound::Val(from), Bound::Val(to), step, &[], |kb, i, _| {
            let here: Vec<Value> = ptrs.iter().map(|&p| kb.offset(p, i, e)).collect();
            for u in 0..n {
                f(kb, ty, &here, 16 * u);
            }
            vec![]
        });
    }
}

/// The ends of [`over_range`]'s first two loops: `start` plus the whole blocks
/// of `lanes·UNROLL` elements, and `start` plus the whole vectors.
fn range_ends(kb: &mut Kb) -> [Value; 2] {
    let (start, end) = (kb.start, kb.end);
    let lanes = kb.lanes() as i64;
    let n = kb.b.ins().isub(end, start);
    let blocks = kb.b.ins().band_imm_s(n, !(lanes * UNROLL - 1));
    let vecs = kb.b.ins().band_imm_s(n, !(lanes - 1));
    [kb.b.ins().iadd(start, blocks), kb.b.ins().iadd(start, vecs)]
}

/// A run-time scalar from buffer `s` (element `i`), as a scalar and a vector.
fn scalar(kb: &mut Kb, s: Value, i: i64) -> [Value; 2] {
    let (e, st, vt) = (kb.esz(), kb.sty(), kb.vty());
    let x = kb.load_in(st, s, e * i);
    [x, kb.splat(vt, x)]
}

/// A compile-time constant (for f32, `k as f32`), as a scalar and a vector.
fn constant(kb: &mut Kb, k: f64) -> [Value; 2] {
    let (st, vt) = (kb.sty(), kb.vty());
    let x = kb.real(st, k);
    [x, kb.splat(vt, x)]
}

/// The scalar or vector member of a pair from [`scalar`] or [`constant`].
fn pick(ty: Type, pair: [Value; 2]) -> Value {
    if !ty.is_vector() {
        pair[0]
    } else {
        pair[1]
    }
}

/// `cond ? a : b` per lane, where `cond` is an `fcmp` result of type `ty`'s
/// comparison (an `i8` for a scalar, an `I32X4` for `F32X4`).
fn select(kb: &mut Kb, ty: Type, cond: Value, a: Value, b: Value) -> Value {
    if !ty.is_vector() {
        kb.b.ins().select(cond, a, b)
    } else {
        let mask = kb.b.ins().bitcast(ty, MemFlagsData::new(), cond);
        kb.b.ins().bitselect(mask, a, b)
    }
}

/// `max(m, x)` per lane that never picks a NaN `x` (`m < x ? x : m`; written so
/// that x64 lowers the f32x4 form to one `maxps`, whose NaN rule is the same).
fn max_skip_nan(kb: &mut Kb, ty: Type, m: Value, x: Value) -> Value {
    let lt = kb.b.ins().fcmp(FloatCC::LessThan, m, x);
    select(kb, ty, lt, x, m)
}

/// The clip transform `clamp(x · scale)` (see the module doc), with the scale,
/// the clamp `v` and `−v` as pairs from [`scalar`].
fn clip(
    kb: &mut Kb,
    ty: Type,
    x: Value,
    scale: [Value; 2],
    v: [Value; 2],
    neg_v: [Value; 2],
) -> Value {
    let (scale, v, neg_v) = (pick(ty, scale), pick(ty, v), pick(ty, neg_v));
    let y = kb.b.ins().fmul(x, scale);
    let below = kb.b.ins().fcmp(FloatCC::LessThan, y, neg_v);
    let y2 = select(kb, ty, below, neg_v, y);
    let above = kb.b.ins().fcmp(FloatCC::GreaterThan, y, v);
    select(kb, ty, above, v, y2)
}

/// The clip's scale, clamp and negated clamp from scalars `at` and `at + 1` of
/// buffer `s`.
fn clip_scalars(kb: &mut Kb, s: Value, at: i64) -> [[Value; 2]; 3] {
    let scale = scalar(kb, s, at);
    let v = scalar(kb, s, at + 1);
    let nv = kb.b.ins().fneg(v[0]);
    let vt = kb.vty();
    let neg_v = [nv, kb.splat(vt, nv)];
    [scale, v, neg_v]
}

/// f32x4 maxima of [`sum_squares`]' main loop (the unrolled vectors take turns;
/// more would not fit the 16 registers beside the sums).
const MAXIMA: usize = 2;

/// [`OptimKernel::SumSquares`]. Accumulators: eight f64x2 (lanes `0, 1` and
/// `2, 3` of each of the four unrolled f32x4) and [`MAXIMA`] f32x4 maxima in the
/// main loop; the leftover vectors add into the first two f64x2 and the first
/// maximum; the tail into one f64 and one f32.
fn sum_squares(kb: &mut Kb) {
    let (g, out) = (kb.buffer(0), kb.buffer(1));
    let (start, end) = (kb.start, kb.end);
    let [e_block, e_vec] = range_ends(kb);
    let zd = kb.b.ins().f64const(0.0);
    let zd2 = kb.b.ins().splat(F64X2, zd);
    let zf = kb.zero(F32);
    let zf4 = kb.zero(F32X4);
    // |x| as a mask of the sign bits, made once (`fabs` on f32x4 rebuilds it).
    let bits = kb.b.ins().iconst(types::I32, 0x7fff_ffff);
    let bits = kb.b.ins().splat(types::I32X4, bits);
    let abs_mask = kb.b.ins().bitcast(F32X4, MemFlagsData::new(), bits);
    let nu = UNROLL as usize;
    let little = MemFlagsData::new().with_endianness(Endianness::Little);
    let mask: Vec<u8> = (8..16).chain(8..16).collect();
    let high_half = kb.b.func.dfg.immediates.push(ConstantData::from(mask));
    // One f32x4 at byte `off` of `p`: its squares into `sums[0]` (lanes 0, 1) and
    // `sums[1]` (lanes 2, 3), its magnitudes into `max`.
    let vector = |kb: &mut Kb, p: Value, off: i64, sums: [Value; 2], max: Value| {
        let v = kb.load_in(F32X4, p, off);
        let lo = kb.b.ins().fvpromote_low(v);
        // Lanes 2, 3 moved down (bytes 8..16 twice: one `pshufd`).
        let bytes = kb.b.ins().bitcast(I8X16, little, v);
        let high = kb.b.ins().shuffle(bytes, bytes, high_half);
        let high = kb.b.ins().bitcast(F32X4, little, high);
        let hi = kb.b.ins().fvpromote_low(high);
        let lo2 = kb.b.ins().fmul(lo, lo);
        let hi2 = kb.b.ins().fmul(hi, hi);
        let s0 = kb.b.ins().fadd(sums[0], lo2);
        let s1 = kb.b.ins().fadd(sums[1], hi2);
        let a = kb.b.ins().band(v, abs_mask);
        let m = max_skip_nan(kb, F32X4, max, a);
        (s0, s1, m)
    };
    let mut init = vec![zd2; 2 * nu];
    init.extend([zf4; MAXIMA]);
    let mut acc = kb.for_range(
        Bound::Val(start),
        Bound::Val(e_block),
        4 * UNROLL,
        &init,
        |kb, i, a| {
            let p = kb.offset(g, i, 4);
            let mut next = a.to_vec();
            for u in 0..nu {
                let (s0, s1, m) = vector(
                    kb,
                    p,
                    16 * u as i64,
                    [a[2 * u], a[2 * u + 1]],
                    next[2 * nu + u % MAXIMA],
                );
                next[2 * u] = s0;
                next[2 * u + 1] = s1;
                next[2 * nu + u % MAXIMA] = m;
            }
            next
        },
    );
    let vec_init = [acc[0], acc[1], acc[2 * nu]];
    let after = kb.for_range(
        Bound::Val(e_block),
        Bound::Val(e_vec),
        4,
        &vec_init,
        |kb, i, a| {
            let p = kb.offset(g, i, 4);
            let (s0, s1, m) = vector(kb, p, 0, [a[0], a[1]], a[2]);
            vec![s0, s1, m]
        },
    );
    (acc[0], acc[1], acc[2 * nu]) = (after[0], after[1], after[2]);
    let tail = kb.for_range(
        Bound::Val(e_vec),
        Bound::Val(end),
        1,
        &[zd, zf],
        |kb, i, a| {
            let p = kb.offset(g, i, 4);
            let x = kb.load_in(F32, p, 0);
            let d = kb.b.ins().fpromote(F64, x);
            let d2 = kb.b.ins().fmul(d, d);
            let s = kb.b.ins().fadd(a[0], d2);
            let ax = kb.b.ins().fabs(x);
            let m = max_skip_nan(kb, F32, a[1], ax);
            vec![s, m]
        },
    );
    // Σ: the f64x2 sums pairwise, then the two lanes, then the tail.
    let sums = tree(kb, &acc[..2 * nu], &mut |kb, a, b| kb.b.ins().fadd(a, b));
    let l0 = kb.b.ins().extractlane(sums, 0);
    let l1 = kb.b.ins().extractlane(sums, 1);
    let lanes = kb.b.ins().fadd(l0, l1);
    let total = kb.b.ins().fadd(lanes, tail[0]);
    kb.store(total, out, 0);
    // max: the f32x4 maxima pairwise, then the lanes, then the tail.
    let maxv = tree(kb, &acc[2 * nu..], &mut |kb, a, b| {
        max_skip_nan(kb, F32X4, a, b)
    });
    let lanes: Vec<Value> = (0..4u8).map(|l| kb.b.ins().extractlane(maxv, l)).collect();
    let maxl = tree(kb, &lanes, &mut |kb, a, b| max_skip_nan(kb, F32, a, b));
    let max = max_skip_nan(kb, F32, maxl, tail[1]);
    kb.store(max, out, 8);
}

/// [`OptimKernel::SumSquares`] in f64: one sequential sum of squares and one
/// maximum of magnitudes over the range (see the variant's doc).
fn sum_squares_f64(kb: &mut Kb) {
    let (g, out) = (kb.buffer(0), kb.buffer(1));
    let (start, end) = (kb.start, kb.end);
    let zero = kb.b.ins().f64const(0.0);
    let acc = kb.for_range(
        Bound::Val(start),
        Bound::Val(end),
        1,
        &[zero, zero],
        |kb, i, a| {
            let p = kb.offset(g, i, 8);
            let x = kb.load_in(F64, p, 0);
            let s = kb.fma(x, x, a[0]);
            let ax = kb.b.ins().fabs(x);
            let m = max_skip_nan(kb, F64, a[1], ax);
            vec![s, m]
        },
    );
    kb.store(acc[0], out, 0);
    kb.store(zero, out, 8);
    kb.store(acc[1], out, 16);
}

/// `v[0] ∘ v[1] ∘ …` as a balanced tree of `op` (`v` non-empty).
fn tree(kb: &mut Kb, v: &[Value], op: &mut dyn FnMut(&mut Kb, Value, Value) -> Value) -> Value {
    match v {
        [x] => *x,
        _ => {
            let (a, b) = v.split_at(v.len() / 2);
            let (a, b) = (tree(kb, a, op), tree(kb, b, op));
            op(kb, a, b)
        }
    }
}

/// [`OptimKernel::Sgd`] (see its doc for the buffers and formulas).
fn sgd(kb: &mut Kb, momentum: f64, nesterov: bool, weight_decay: f64) {
    let (g, s, p) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let has_buf = momentum != 0.0;
    let buf = has_buf.then(|| kb.buffer(3));
    let neg_lr = scalar(kb, s, 0);
    let [scale, v, neg_v] = clip_scalars(kb, s, 1);
    // The first-step flag as a select condition of each type, out of the loops.
    let first = scalar(kb, s, 3);
    let (st, vt) = (kb.sty(), kb.vty());
    let zero = [kb.zero(st), kb.zero(vt)];
    let is_first = [0, 1].map(|t| kb.b.ins().fcmp(FloatCC::NotEqual, first[t], zero[t]));
    let wd = constant(kb, weight_decay);
    let m = constant(kb, momentum);
    let mut ptrs = vec![g, p];
    ptrs.extend(buf);
    over_range(kb, &ptrs, &mut |kb, ty, q, off| {
        let raw = kb.load_in(ty, q[0], off);
        let mut g = clip(kb, ty, raw, scale, v, neg_v);
        let mut p = kb.load_out(ty, q[1], off);
        if weight_decay != 0.0 {
            let d = kb.b.ins().fmul(pick(ty, wd), p);
            g = kb.b.ins().fadd(g, d);
        }
        let d = if has_buf {
            let b = kb.load_out(ty, q[2], off);
            let bm = kb.b.ins().fmul(b, pick(ty, m));
            let later = kb.b.ins().fadd(bm, g);
            let b = select(kb, ty, pick(ty, is_first), g, later);
            kb.store(b, q[2], off);
            if nesterov {
                let mb = kb.b.ins().fmul(pick(ty, m), b);
                kb.b.ins().fadd(g, mb)
            } else {
                b
            }
        } else {
            g
        };
        let step = kb.b.ins().fmul(pick(ty, neg_lr), d);
        p = kb.b.ins().fadd(p, step);
        kb.store(p, q[1], off);
    });
}

/// [`OptimKernel::Adam`] (see its doc for the buffers and formulas).
fn adam(kb: &mut Kb, [beta1, beta2]: [f64; 2], eps: f64, weight_decay: f64, decoupled: bool) {
    let (g, s) = (kb.buffer(0), kb.buffer(1));
    let (p, m, v) = (kb.buffer(2), kb.buffer(3), kb.buffer(4));
    let decay = scalar(kb, s, 0);
    let neg_step = scalar(kb, s, 1);
    let bc2_sqrt = scalar(kb, s, 2);
    let [scale, clamp, neg_clamp] = clip_scalars(kb, s, 3);
    // The constants exactly as the runtime computes them (in f32: `1 − w1`
    // from the f32 `w1`).
    let w1 = 1.0 - beta1;
    let lerp_low = w1.abs() < 0.5;
    let one_minus = match kb.dt {
        DType::F32 => (1.0 - w1 as f32) as f64,
        DType::F64 => 1.0 - w1,
    };
    let w1c = constant(kb, w1);
    let one_minus_w1 = constant(kb, one_minus);
    let b2 = constant(kb, beta2);
    let w2 = constant(kb, 1.0 - beta2);
    let epsc = constant(kb, eps);
    let wd = constant(kb, weight_decay);
    over_range(kb, &[g, p, m, v], &mut |kb, ty, q, off| {
        let raw = kb.load_in(ty, q[0], off);
        let mut g = clip(kb, ty, raw, scale, clamp, neg_clamp);
        let mut pv = kb.load_out(ty, q[1], off);
        if weight_decay != 0.0 {
            if decoupled {
                pv = kb.b.ins().fmul(pv, pick(ty, decay));
            } else {
                let d = kb.b.ins().fmul(pick(ty, wd), pv);
                g = kb.b.ins().fadd(g, d);
            }
        }
        let mv = kb.load_out(ty, q[2], off);
        let diff = kb.b.ins().fsub(g, mv);
        let mv = if lerp_low {
            let t = kb.b.ins().fmul(pick(ty, w1c), diff);
            kb.b.ins().fadd(mv, t)
        } else {
            let t = kb.b.ins().fmul(diff, pick(ty, one_minus_w1));
            kb.b.ins().fsub(g, t)
        };
        kb.store(mv, q[2], off);
        let vv = kb.load_out(ty, q[3], off);
        let vb = kb.b.ins().fmul(vv, pick(ty, b2));
        let wg = kb.b.ins().fmul(pick(ty, w2), g);
        let wgg = kb.b.ins().fmul(wg, g);
        let vv = kb.b.ins().fadd(vb, wgg);
        kb.store(vv, q[3], off);
        let root = kb.b.ins().sqrt(vv);
        let scaled = kb.b.ins().fdiv(root, pick(ty, bc2_sqrt));
        let denom = kb.b.ins().fadd(scaled, pick(ty, epsc));
        let num = kb.b.ins().fmul(pick(ty, neg_step), mv);
        let step = kb.b.ins().fdiv(num, denom);
        pv = kb.b.ins().fadd(pv, step);
        kb.store(pv, q[1], off);
    });
}
