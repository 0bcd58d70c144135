//! Pooling kernels (max, average, global average) and their gradients, NCHW,
//! every shape baked in. All are [`Par::Items`](super::Par): a call computes the
//! `(item, channel)` planes of its batch items, in one loop over planes.
//!
//! - The common 2×2, stride-2, unpadded window (M1/M2's `maxpool(2)`) works on
//!   four outputs at once: two f32x4 loads per input row, split into the even and
//!   odd columns with `shufps`, combined lane-wise (`maxps`; for the gradient, the
//!   first-maximum masks select `dy` and `punpckldq`/`punpckhdq` put the columns
//!   back),
//!   single outputs left over straight-line.
//! - Any other window: the valid taps of each output row and column are computed
//!   at compile time (conv.rs [`runs`]), so the loops over runs have no bounds
//!   tests; taps are unrolled. The forward pools take f32x4 lanes along the row
//!   when the column stride is 1 (neighbouring outputs read neighbouring inputs),
//!   else scalars. The average gradient at stride 1 is itself an average pooling
//!   (of `dy`, padded by `k - 1 - p`): no scatter. The other gradients zero `dx`'s
//!   plane, then add each window's share with scalar read-modify-writes
//!   (average: `dy/(kh·kw)` to every valid tap; max: `dy` to the window's first
//!   maximum, found with `maxss` and a `select` of its offset).
//!
//! Max pooling ignores padding (windows clipped to the input) and takes the first
//! maximum in row-major window order (`x > best`), as the interpreter does
//! (`interp::argmax_windows`): a NaN first tap stays, later NaNs are skipped.
//! Average pooling counts padding in the divisor (`count_include_pad=True`).
//!
//! In f64 (gradient checks) the same code runs with f64x2 lanes and 8-byte
//! elements, except that the 2×2 window takes scalars only (its shuffles are
//! f32x4's).

use super::builder::{Bound, Kb};
use super::conv::{runs, Run};
use super::elementwise::{over_elements, sum_elements, sum_finish, sum_init};
use super::DType;
use super::Emit;
use crate::ir::{Graph, Node, Op, PoolAttrs, Shape};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{
    types, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value,
};

/// The pool kernels; every shape includes the batch (axis 0), and `x` is the
/// forward input's `[N, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub enum PoolKernel {
    /// `x → y[N,C,OH,OW]`, the maximum of each window. Buffers: `x`, `y`.
    MaxPool { x: Shape, p: PoolAttrs },
    /// `(dy[N,C,OH,OW], x) → dx`: each window's `dy` goes to its first maximum;
    /// overlapping windows add. Buffers: `dy`, `x`, `dx`.
    MaxPoolGrad { x: Shape, p: PoolAttrs },
    /// `x → y[N,C,OH,OW]`, the sum of each window's valid taps over `kh·kw`.
    /// Buffers: `x`, `y`.
    AvgPool { x: Shape, p: PoolAttrs },
    /// `dy[N,C,OH,OW] → dx`: `dy/(kh·kw)` to every valid tap of each window.
    /// Buffers: `dy`, `dx`.
    AvgPoolGrad { x: Shape, p: PoolAttrs },
    /// `x → y[N,C]`, the mean of each plane. Buffers: `x`, `y`.
    GlobalAvgPool { x: Shape },
    /// `dy[N,C] → dx`, every position `dy/(H·W)`. Buffers: `dy`, `dx`.
    GlobalAvgPoolGrad { x: Shape },
}

impl PoolKernel {
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<PoolKernel> {
        let shape = |i: usize| g.shape(node.inputs[i]).clone();
        // x for the forward pools, dy for the gradients.
        let s = shape(0);
        Some(match &node.op {
            Op::MaxPool(p) => PoolKernel::MaxPool { x: s, p: *p },
            Op::MaxPoolGrad(p) => PoolKernel::MaxPoolGrad { x: shape(1), p: *p },
            Op::AvgPool(p) => PoolKernel::AvgPool { x: s, p: *p },
            Op::AvgPoolGrad(p, hw) if s.len() == 4 => PoolKernel::AvgPoolGrad {
                x: vec![s[0], s[1], hw[0], hw[1]],
                p: *p,
            },
            Op::GlobalAvgPool => PoolKernel::GlobalAvgPool { x: s },
            Op::GlobalAvgPoolGrad(hw) if s.len() == 2 => PoolKernel::GlobalAvgPoolGrad {
                x: vec![s[0], s[1], hw[0], hw[1]],
            },
            _ => return None,
        })
    }

    fn x(&self) -> &Shape {
        match self {
            PoolKernel::MaxPool { x, .. }
            | PoolKernel::MaxPoolGrad { x, .. }
            | PoolKernel::AvgPool { x, .. }
            | PoolKernel::AvgPoolGrad { x, .. }
            | PoolKernel::GlobalAvgPool { x }
            | PoolKernel::GlobalAvgPoolGrad { x } => x,
        }
    }

    fn attrs(&self) -> Option<&PoolAttrs> {
        match self {
            PoolKernel::MaxPool { p, .. }
            | PoolKernel::MaxPoolGrad { p, .. }
            | PoolKernel::AvgPool { p, .. }
            | PoolKernel::AvgPoolGrad { p, .. } => Some(p),
            PoolKernel::GlobalAvgPool { .. } | PoolKernel::GlobalAvgPoolGrad { .. } => None,
        }
    }

    /// The windowed pools' output `[N, C, OH, OW]`; `[N, C]` for the global ones.
    fn y(&self) -> Shape {
        let x = self.x();
        match self.attrs() {
            Some(p) => Op::AvgPool(*p)
                .infer(&[x])
                .expect("validated when compiled")
                .remove(0),
            None => vec![x[0], x[1]],
        }
    }

    fn geom(&self) -> Geom {
        let (x, y) = (self.x(), self.y());
        let p = self.attrs().copied().unwrap_or(PoolAttrs {
            kernel: [x[2], x[3]],
            stride: [1, 1],
            pad: [0, 0],
        });
        Geom {
            c: x[1],
            h: x[2],
            w: x[3],
            oh: if y.len() == 4 { y[2] } else { 1 },
            ow: if y.len() == 4 { y[3] } else { 1 },
            kh: p.kernel[0],
            kw: p.kernel[1],
            sh: p.stride[0],
            sw: p.stride[1],
            ph: p.pad[0],
            pw: p.pad[1],
        }
    }
}

impl Emit for PoolKernel {
    fn inputs(&self) -> Vec<Shape> {
        let (x, y) = (self.x().clone(), self.y());
        match self {
            PoolKernel::MaxPool { .. } | PoolKernel::AvgPool { .. } => vec![x],
            PoolKernel::GlobalAvgPool { .. } => vec![x],
            PoolKernel::MaxPoolGrad { .. } => vec![y, x],
            PoolKernel::AvgPoolGrad { .. } | PoolKernel::GlobalAvgPoolGrad { .. } => vec![y],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        match self {
            PoolKernel::MaxPool { .. }
            | PoolKernel::AvgPool { .. }
            | PoolKernel::GlobalAvgPool { .. } => vec![self.y()],
            PoolKernel::MaxPoolGrad { x, .. }
            | PoolKernel::AvgPoolGrad { x, .. }
            | PoolKernel::GlobalAvgPoolGrad { x } => vec![x.clone()],
        }
    }

    fn flops_per_item(&self) -> u64 {
        // One compare or add per window tap (the global pools: one window).
        let g = self.geom();
        (g.c * g.oh * g.ow * g.kh * g.kw) as u64
    }

    fn validate(&self) -> Result<(), String> {
        let x = self.x();
        if x.len() != 4 {
            return Err(format!("{self:?} needs x of rank 4"));
        }
        let Some(p) = self.attrs() else {
            return Ok(());
        };
        if p.kernel.contains(&0) || p.stride.contains(&0) {
            return Err(format!("{self:?}: kernel and stride must be positive"));
        }
        Op::AvgPool(*p).infer(&[x])?;
        if matches!(
            self,
            PoolKernel::MaxPool { .. } | PoolKernel::MaxPoolGrad { .. }
        ) {
            let g = self.geom();
            if g.rows().iter().chain(&g.cols()).any(|r| r.k0 == r.k1) {
                return Err(format!(
                    "{self:?}: a max-pool window lies wholly in the padding (pad must be at most half the kernel)"
                ));
            }
        }
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        let g = self.geom();
        match self {
            PoolKernel::MaxPool { .. } if g.is_2x2() => pool2(kb, &g, Kind::Max),
            PoolKernel::AvgPool { .. } if g.is_2x2() => pool2(kb, &g, Kind::Avg),
            PoolKernel::MaxPool { .. } => pool(kb, &g, Kind::Max),
            PoolKernel::AvgPool { .. } => pool(kb, &g, Kind::Avg),
            PoolKernel::MaxPoolGrad { .. } if g.is_2x2() => pool2_grad(kb, &g, Kind::Max),
            PoolKernel::AvgPoolGrad { .. } if g.is_2x2() => pool2_grad(kb, &g, Kind::Avg),
            PoolKernel::MaxPoolGrad { .. } => pool_grad(kb, &g, Kind::Max),
            // Stride 1: each dx is the average-weighted sum over a window of dy.
            PoolKernel::AvgPoolGrad { .. } => match g.transposed() {
                Some(t) => pool(kb, &t, Kind::Avg),
                None => pool_grad(kb, &g, Kind::Avg),
            },
            PoolKernel::GlobalAvgPool { .. } => global_avg(kb, &g),
            PoolKernel::GlobalAvgPoolGrad { .. } => global_avg_grad(kb, &g),
        }
    }
}

/// Max or average.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Max,
    Avg,
}

/// The sizes of one pooling (the global pools: one window of the whole plane).
#[derive(Clone, Copy, Debug)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
}

impl Geom {
    /// The 2×2 stride-2 unpadded window.
    fn is_2x2(&self) -> bool {
        (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (2, 2, 2, 2, 0, 0)
    }
    /// Output rows with equal valid kernel rows.
    fn rows(&self) -> Vec<Run> {
        runs(self.oh, self.h, self.kh, self.sh, self.ph, 1)
    }
    /// Output columns with equal valid kernel columns.
    fn cols(&self) -> Vec<Run> {
        runs(self.ow, self.w, self.kw, self.sw, self.pw, 1)
    }
    /// `1/(kh·kw)`, the average's factor (padding counted), rounded to `dt`.
    fn inv_taps(&self, dt: DType) -> f64 {
        match dt {
            DType::F32 => (1.0 / (self.kh * self.kw) as f32) as f64,
            DType::F64 => 1.0 / (self.kh * self.kw) as f64,
        }
    }
    /// For stride 1 (and padding below the kernel): the pooling whose output is
    /// this one's input gradient. Input position `i` lies in the windows
    /// `o = i + p - k` for the kernel taps `k` with `0 <= o < out`, so `dx` is a
    /// sum over a `kh × kw` window of `dy` padded by `k - 1 - p`: an average
    /// pooling of `dy` (the divisor is the same `kh·kw`).
    fn transposed(&self) -> Option<Geom> {
        let ok = self.sh == 1 && self.sw == 1 && self.ph < self.kh && self.pw < self.kw;
        ok.then(|| Geom {
            h: self.oh,
            w: self.ow,
            oh: self.h,
            ow: self.w,
            ph: self.kh - 1 - self.ph,
            pw: self.kw - 1 - self.pw,
            ..*self
        })
    }
    fn plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
}

// ---- building blocks (free functions over `kb.b`) ----

/// Runs `f(kb, ptrs)` for every `(item, channel)` plane of the work range:
/// `bufs[i] = (pointer, elements per plane)`, and `ptrs[i]` points at the plane.
fn per_plane(kb: &mut Kb, c: usize, bufs: &[(Value, usize)], f: &mut dyn FnMut(&mut Kb, &[Value])) {
    let start = kb.b.ins().imul_imm_s(kb.start, c as i64);
    let end = kb.b.ins().imul_imm_s(kb.end, c as i64);
    let e = kb.esz();
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, q, _| {
        let ptrs: Vec<Value> = bufs
            .iter()
            .map(|&(p, len)| kb.offset(p, q, e * len as i64))
            .collect();
        f(kb, &ptrs);
        vec![]
    });
}

/// `for i in from..to` (compile-time bounds) calling `f(kb, i)`: a loop, or for
/// a single iteration the body once with `i` a constant.
fn for_const(kb: &mut Kb, from: usize, to: usize, f: &mut dyn FnMut(&mut Kb, Value)) {
    if to == from + 1 {
        let i = kb.iconst(from as i64);
        f(kb, i);
    } else {
        kb.for_range(
            Bound::Const(from as i64),
            Bound::Const(to as i64),
            1,
            &[],
            |kb, i, _| {
                f(kb, i);
                vec![]
            },
        );
    }
}

/// One group of outputs along a row: `f(kb, ty, col, dcol)` handles one vector
/// (four f32 or two f64 outputs) or one scalar at output column `col + dcol`,
/// where `col` is a run-time value (`None`: 0) and `dcol` a constant.
type PerGroup<'f> = dyn FnMut(&mut Kb, Type, Option<Value>, usize) + 'f;

/// Covers output columns `o0..o1` of a row: groups of four (`vector`) or single
/// outputs, a few per iteration of a loop, then the leftover groups and single
/// outputs straight-line.
fn over_columns(kb: &mut Kb, o0: usize, o1: usize, vector: bool, f: &mut PerGroup) {
    let (ty, lanes, unroll) = if vector {
        (kb.vty(), kb.lanes(), 2)
    } else {
        (kb.sty(), 1, 4)
    };
    let step = lanes * unroll;
    let full = (o1 - o0) / step * step;
    if full == step {
        for u in 0..unroll {
            f(kb, ty, None, o0 + u * lanes);
        }
    } else if full > step {
        kb.for_range(
            Bound::Const(o0 as i64),
            Bound::Const((o0 + full) as i64),
            step as i64,
            &[],
            |kb, col, _| {
                for u in 0..unroll {
                    f(kb, ty, Some(col), u * lanes);
                }
                vec![]
            },
        );
    }
    let mut at = o0 + full;
    while at + lanes <= o1 {
        f(kb, ty, None, at);
        at += lanes;
    }
    let st = kb.sty();
    while at < o1 {
        f(kb, st, None, at);
        at += 1;
    }
}

/// `base + col * scale` bytes (`base` when `col` is `None`).
fn at(kb: &mut Kb, base: Value, col: Option<Value>, scale: i64) -> Value {
    match col {
        Some(c) => kb.offset(base, c, scale),
        None => base,
    }
}

/// `mask ? a : b` per lane; `mask` is an `fcmp` (or a combination of them) on
/// values of type `ty`.
fn pick(kb: &mut Kb, ty: Type, mask: Value, a: Value, b: Value) -> Value {
    if !ty.is_vector() {
        kb.b.ins().select(mask, a, b)
    } else {
        let m = kb.b.ins().bitcast(ty, MemFlagsData::new(), mask);
        kb.b.ins().bitselect(m, a, b)
    }
}

/// `best < v` per lane: whether `v` replaces the maximum so far (never for NaN).
fn beats(kb: &mut Kb, best: Value, v: Value) -> Value {
    kb.b.ins().fcmp(FloatCC::LessThan, best, v)
}

/// `best < v ? v : best`, the first-maximum update (the form Cranelift lowers
/// to `maxss`/`maxps`).
fn max_first(kb: &mut Kb, ty: Type, best: Value, v: Value) -> Value {
    let gt = beats(kb, best, v);
    pick(kb, ty, gt, v, best)
}

/// Lanes `idx` of the eight lanes of `a ‖ b` (0–3 from `a`, 4–7 from `b`): one
/// `shuffle` on the bytes.
fn shuffle32(kb: &mut Kb, a: Value, b: Value, idx: [u8; 4]) -> Value {
    let le = MemFlagsData::new().with_endianness(Endianness::Little);
    let ab = kb.b.ins().bitcast(types::I8X16, le, a);
    let bb = kb.b.ins().bitcast(types::I8X16, le, b);
    let bytes: Vec<u8> = idx
        .iter()
        .flat_map(|&l| (0..4).map(move |k| 4 * l + k))
        .collect();
    let mask = kb.b.func.dfg.immediates.push(ConstantData::from(bytes));
    let r = kb.b.ins().shuffle(ab, bb, mask);
    kb.b.ins().bitcast(types::F32X4, le, r)
}

/// Stores `len` zeros from `ptr`.
fn zero_fill(kb: &mut Kb, ptr: Value, len: usize) {
    let (vt, st) = (kb.vty(), kb.sty());
    let z4 = kb.zero(vt);
    let z1 = kb.zero(st);
    over_elements(kb, &[ptr], len, &mut |kb, ty, p, off| {
        kb.store(if !ty.is_vector() { z1 } else { z4 }, p[0], off);
    });
}

// ---- the 2×2 stride-2 window ----

/// The four taps of the windows at output column `col + dcol` of the row pair
/// at `xr` (`w` input columns), row-major: one value each, or for f32x4 the
/// four neighbouring windows' taps (even and odd columns of two loads per row;
/// f32 only: in f64 the 2×2 kernels take scalars).
fn taps2(
    kb: &mut Kb,
    ty: Type,
    xr: Value,
    col: Option<Value>,
    dcol: usize,
    w: usize,
) -> [Value; 4] {
    let e = kb.esz();
    let xc = at(kb, xr, col, 2 * e);
    let (base, row) = (2 * e * dcol as i64, e * w as i64);
    if !ty.is_vector() {
        [0, e, row, row + e].map(|o| kb.load_in(ty, xc, base + o))
    } else {
        let a0 = kb.load_in(ty, xc, base);
        let b0 = kb.load_in(ty, xc, base + 16);
        let a1 = kb.load_in(ty, xc, base + row);
        let b1 = kb.load_in(ty, xc, base + row + 16);
        [
            shuffle32(kb, a0, b0, [0, 2, 4, 6]),
            shuffle32(kb, a0, b0, [1, 3, 5, 7]),
            shuffle32(kb, a1, b1, [0, 2, 4, 6]),
            shuffle32(kb, a1, b1, [1, 3, 5, 7]),
        ]
    }
}

/// 2×2 stride-2 max or average pooling. Buffers: `x`, `y`.
fn pool2(kb: &mut Kb, g: &Geom, kind: Kind) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    let g = *g;
    let e = kb.esz();
    let vector = kb.dt == DType::F32;
    per_plane(
        kb,
        g.c,
        &[(x, g.plane()), (y, g.out_plane())],
        &mut |kb, p| {
            let (xp, yp) = (p[0], p[1]);
            for_const(kb, 0, g.oh, &mut |kb, i| {
                let xr = kb.offset(xp, i, 2 * e * g.w as i64);
                let yr = kb.offset(yp, i, e * g.ow as i64);
                over_columns(kb, 0, g.ow, vector, &mut |kb, ty, col, dcol| {
                    let t = taps2(kb, ty, xr, col, dcol, g.w);
                    let r = match kind {
                        Kind::Max => {
                            let m = max_first(kb, ty, t[0], t[1]);
                            let m = max_first(kb, ty, m, t[2]);
                            max_first(kb, ty, m, t[3])
                        }
                        Kind::Avg => {
                            let a = kb.b.ins().fadd(t[0], t[1]);
                            let b = kb.b.ins().fadd(t[2], t[3]);
                            let s = kb.b.ins().fadd(a, b);
                            let k = kb.real(ty, 0.25);
                            kb.b.ins().fmul(s, k)
                        }
                    };
                    let yc = at(kb, yr, col, e);
                    kb.store(r, yc, e * dcol as i64);
                });
            });
        },
    );
}

/// 2×2 stride-2 max or average pooling backward. The windows do not overlap, so
/// every covered `dx` is stored once (the first maximum gets `dy`, the other
/// taps 0; or `dy/4` each); the last column and row when `W` or `H` is odd get
/// zeros. Buffers: max `dy`, `x`, `dx`; average `dy`, `dx`.
fn pool2_grad(kb: &mut Kb, g: &Geom, kind: Kind) {
    let g = *g;
    let dy = kb.buffer(0);
    let (x, dx) = match kind {
        Kind::Max => (Some(kb.buffer(1)), kb.buffer(2)),
        Kind::Avg => (None, kb.buffer(1)),
    };
    let mut bufs = vec![(dy, g.out_plane()), (dx, g.plane())];
    if let Some(x) = x {
        bufs.push((x, g.plane()));
    }
    let e = kb.esz();
    let vector = kb.dt == DType::F32;
    let row = e * g.w as i64;
    per_plane(kb, g.c, &bufs, &mut |kb, p| {
        let (dyp, dxp) = (p[0], p[1]);
        let xp = p.get(2).copied();
        for_const(kb, 0, g.oh, &mut |kb, i| {
            let dyr = kb.offset(dyp, i, e * g.ow as i64);
            let dxr = kb.offset(dxp, i, 2 * row);
            let xr = xp.map(|xp| kb.offset(xp, i, 2 * row));
            over_columns(kb, 0, g.ow, vector, &mut |kb, ty, col, dcol| {
                let dyc = at(kb, dyr, col, e);
                let d = kb.load_in(ty, dyc, e * dcol as i64);
                let parts = match (kind, xr) {
                    (Kind::Max, Some(xr)) => {
                        let t = taps2(kb, ty, xr, col, dcol, g.w);
                        first_max_shares(kb, ty, &t, d)
                    }
                    _ => {
                        let k = kb.real(ty, 0.25);
                        let s = kb.b.ins().fmul(d, k);
                        [s; 4]
                    }
                };
                let dxc = at(kb, dxr, col, 2 * e);
                let base = 2 * e * dcol as i64;
                if !ty.is_vector() {
                    for (v, o) in parts.into_iter().zip([0, e, row, row + e]) {
                        kb.store(v, dxc, base + o);
                    }
                } else {
                    for (r, pair) in [(0, [parts[0], parts[1]]), (row, [parts[2], parts[3]])] {
                        let lo = shuffle32(kb, pair[0], pair[1], [0, 4, 1, 5]);
                        let hi = shuffle32(kb, pair[0], pair[1], [2, 6, 3, 7]);
                        kb.store(lo, dxc, base + r);
                        kb.store(hi, dxc, base + r + 16);
                    }
                }
            });
            if g.w % 2 == 1 {
                let st = kb.sty();
                let z = kb.zero(st);
                let last = e * (g.w as i64 - 1);
                kb.store(z, dxr, last);
                kb.store(z, dxr, last + row);
            }
        });
        if g.h % 2 == 1 {
            let lastrow = kb.b.ins().iadd_imm_s(dxp, (g.h as i64 - 1) * row);
            zero_fill(kb, lastrow, g.w);
        }
    });
}

/// `d` split over the taps `t` (row-major) of a window: all of it to the first
/// maximum, 0 to the others. Tap `k` wins when it beats the maximum of the taps
/// before it and no later tap beats the running maximum.
fn first_max_shares(kb: &mut Kb, ty: Type, t: &[Value; 4], d: Value) -> [Value; 4] {
    let mut best = t[0];
    let mut beat = Vec::with_capacity(3);
    for &v in &t[1..] {
        let gt = beats(kb, best, v);
        best = pick(kb, ty, gt, v, best);
        beat.push(gt);
    }
    // `d` where the mask is set (`set`) or clear (`!set`), else 0: one `and`
    // (`andn`) for vectors.
    let only = |kb: &mut Kb, mask: Value, set: bool| {
        if !ty.is_vector() {
            let zero = kb.zero(ty);
            let (a, b) = if set { (d, zero) } else { (zero, d) };
            kb.b.ins().select(mask, a, b)
        } else {
            let m = kb.b.ins().bitcast(ty, MemFlagsData::new(), mask);
            if set {
                kb.b.ins().band(d, m)
            } else {
                kb.b.ins().band_not(d, m)
            }
        }
    };
    let mut shares = [d; 4];
    // Walk back from the last tap: `later` = some later tap won.
    let mut later = beat[2];
    shares[3] = only(kb, beat[2], true);
    for k in (1..3).rev() {
        let wins = kb.b.ins().band_not(beat[k - 1], later);
        shares[k] = only(kb, wins, true);
        later = kb.b.ins().bor(later, beat[k - 1]);
    }
    shares[0] = only(kb, later, false);
    shares
}

// ---- any window ----

/// Max or average pooling over any window. Buffers: `x`, `y`.
fn pool(kb: &mut Kb, g: &Geom, kind: Kind) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    let g = *g;
    let (rows, cols) = (g.rows(), g.cols());
    let (w, sw, ph, pw) = (g.w as i64, g.sw as i64, g.ph as i64, g.pw as i64);
    let e = kb.esz();
    let inv_taps = g.inv_taps(kb.dt);
    per_plane(
        kb,
        g.c,
        &[(x, g.plane()), (y, g.out_plane())],
        &mut |kb, p| {
            let (xp, yp) = (p[0], p[1]);
            for r in &rows {
                for_const(kb, r.o0, r.o1, &mut |kb, oh| {
                    let xr = kb.offset(xp, oh, e * g.sh as i64 * w);
                    let yr = kb.offset(yp, oh, e * g.ow as i64);
                    for c in &cols {
                        over_columns(kb, c.o0, c.o1, g.sw == 1, &mut |kb, ty, col, dcol| {
                            let xc = at(kb, xr, col, e * sw);
                            let mut acc: Option<Value> = None;
                            for ky in r.k0 as i64..r.k1 as i64 {
                                for kx in c.k0 as i64..c.k1 as i64 {
                                    let off = e * ((ky - ph) * w + dcol as i64 * sw + kx - pw);
                                    let v = kb.load_in(ty, xc, off);
                                    acc = Some(match (acc, kind) {
                                        (None, _) => v,
                                        (Some(a), Kind::Max) => max_first(kb, ty, a, v),
                                        (Some(a), Kind::Avg) => kb.b.ins().fadd(a, v),
                                    });
                                }
                            }
                            let out = match (acc, kind) {
                                (Some(a), Kind::Max) => a,
                                (Some(a), Kind::Avg) => {
                                    let k = kb.real(ty, inv_taps);
                                    kb.b.ins().fmul(a, k)
                                }
                                // A window wholly in the padding (average only).
                                (None, _) => kb.zero(ty),
                            };
                            let yc = at(kb, yr, col, e);
                            kb.store(out, yc, e * dcol as i64);
                        });
                    }
                });
            }
        },
    );
}

/// Max or average pooling backward over any window (average: when the stride
/// is not 1, see [`Geom::transposed`]): `dx`'s plane is zeroed, then each window
/// adds its share, in output order, one scalar read-modify-write per tap.
/// Average: `dy/(kh·kw)` to every valid tap. Max: `dy` to the first maximum,
/// whose byte offset is carried by `select`s next to the running maximum.
/// Buffers: max `dy`, `x`, `dx`; average `dy`, `dx`.
fn pool_grad(kb: &mut Kb, g: &Geom, kind: Kind) {
    let g = *g;
    let dy = kb.buffer(0);
    let (x, dx) = match kind {
        Kind::Max => (Some(kb.buffer(1)), kb.buffer(2)),
        Kind::Avg => (None, kb.buffer(1)),
    };
    let mut bufs = vec![(dy, g.out_plane()), (dx, g.plane())];
    if let Some(x) = x {
        bufs.push((x, g.plane()));
    }
    let (rows, cols) = (g.rows(), g.cols());
    let (w, sw, ph, pw) = (g.w as i64, g.sw as i64, g.ph as i64, g.pw as i64);
    let (e, st) = (kb.esz(), kb.sty());
    let inv_taps = g.inv_taps(kb.dt);
    let in_row = e * g.sh as i64 * w;
    per_plane(kb, g.c, &bufs, &mut |kb, p| {
        let (dyp, dxp) = (p[0], p[1]);
        let xp = p.get(2).copied();
        zero_fill(kb, dxp, g.plane());
        for r in &rows {
            for_const(kb, r.o0, r.o1, &mut |kb, oh| {
                let dyr = kb.offset(dyp, oh, e * g.ow as i64);
                let dxr = kb.offset(dxp, oh, in_row);
                let xr = xp.map(|xp| kb.offset(xp, oh, in_row));
                for c in &cols {
                    // Scalars: f32x4 read-modify-writes of overlapping windows
                    // load what the previous tap stored one lane over, which the
                    // store buffer cannot forward (~3.5× slower than scalars on a
                    // 3×3 stride-(2,1) average, batch 64×16×28×28).
                    over_columns(kb, c.o0, c.o1, false, &mut |kb, ty, col, dcol| {
                        let dyc = at(kb, dyr, col, e);
                        let d = kb.load_in(ty, dyc, e * dcol as i64);
                        let dxc = at(kb, dxr, col, e * sw);
                        let offs: Vec<i64> = (r.k0 as i64..r.k1 as i64)
                            .flat_map(|ky| {
                                (c.k0 as i64..c.k1 as i64)
                                    .map(move |kx| e * ((ky - ph) * w + dcol as i64 * sw + kx - pw))
                            })
                            .collect();
                        match (kind, xr) {
                            (Kind::Max, Some(xr)) => {
                                let xc = at(kb, xr, col, e * sw);
                                let mut best = kb.load_in(st, xc, offs[0]);
                                let mut best_off = kb.iconst(offs[0]);
                                for &o in &offs[1..] {
                                    let v = kb.load_in(st, xc, o);
                                    let gt = beats(kb, best, v);
                                    best = pick(kb, st, gt, v, best);
                                    let here = kb.iconst(o);
                                    best_off = kb.b.ins().select(gt, here, best_off);
                                }
                                let addr = kb.b.ins().iadd(dxc, best_off);
                                let old = kb.load_out(st, addr, 0);
                                let new = kb.b.ins().fadd(old, d);
                                kb.store(new, addr, 0);
                            }
                            _ => {
                                if offs.is_empty() {
                                    return;
                                }
                                let k = kb.real(ty, inv_taps);
                                let share = kb.b.ins().fmul(d, k);
                                for &o in &offs {
                                    let old = kb.load_out(ty, dxc, o);
                                    let new = kb.b.ins().fadd(old, share);
                                    kb.store(new, dxc, o);
                                }
                            }
                        }
                    });
                }
            });
        }
    });
}

// ---- global average ----

/// `y[n, c] = Σ x[n, c, ·, ·] / (H·W)`. Buffers: `x`, `y`.
fn global_avg(kb: &mut Kb, g: &Geom) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    let hw = g.plane();
    per_plane(kb, g.c, &[(x, hw), (y, 1)], &mut |kb, p| {
        let acc = sum_init(kb, hw);
        let acc = sum_elements(kb, p[0], hw, &acc);
        let total = sum_finish(kb, hw, &acc);
        let st = kb.sty();
        let n = kb.real(st, hw as f64);
        let mean = kb.b.ins().fdiv(total, n);
        kb.store(mean, p[1], 0);
    });
}

/// `dx[n, c, ·, ·] = dy[n, c] / (H·W)`. Buffers: `dy`, `dx`.
fn global_avg_grad(kb: &mut Kb, g: &Geom) {
    let (dy, dx) = (kb.buffer(0), kb.buffer(1));
    let hw = g.plane();
    let (vt, st) = (kb.vty(), kb.sty());
    per_plane(kb, g.c, &[(dy, 1), (dx, hw)], &mut |kb, p| {
        let d = kb.load_in(st, p[0], 0);
        let n = kb.real(st, hw as f64);
        let v = kb.b.ins().fdiv(d, n);
        let v4 = kb.splat(vt, v);
        over_elements(kb, &[p[1]], hw, &mut |kb, ty, q, off| {
            kb.store(if !ty.is_vector() { v } else { v4 }, q[0], off);
        });
    });
}
