//! The convolution kernels of training (NCHW, f32, every shape baked in; any
//! stride, padding, dilation and groups): the forward pass with a fused bias and
//! ReLU, the input gradient and the weight gradient as generated packing loops
//! around calls to [`gemm::sgemm`], and the older direct forward convolution.
//!
//! # The GEMM kernels
//!
//! Per batch item `n` of the work range and group `g` (`K = Cg·KH·KW` rows of the
//! im2col matrix, `P = OH·OW` output positions):
//!
//! ```text
//! Forward      col[K, P] = im2col(x[n, g])                  (generated)
//!              y[n, g] (Og×P) = w_g (Og×K) · col            (sgemm)
//!              y[n] = max(y[n] + b, 0)                      (generated, fused)
//!              s[n, o], q[n, o] = batch-norm partials of y  (generated, fused)
//! GradInput    col = w_gᵀ (K×Og) · dy[n, g] (Og×P)          (sgemm)
//!              dx[n, g] = col2im(col)                       (generated)
//! GradWeight   col = im2col(x[n, g])                        (generated)
//!              dw_g (Og×K) (+)= dy[n, g] (Og×P) · colᵀ      (sgemm)
//!          or  dwᵀ_g (K×Og) (+)= col · dy[n, g]ᵀ, and at the end of the call
//!              dw_g = (dwᵀ_g)ᵀ                              (generated)
//! ```
//!
//! A 1×1 convolution with stride 1 and no padding needs no packing: the input
//! plane `x[n, g]` (`Cg × H·W`) is the im2col matrix, and the input gradient is
//! written by sgemm straight into `dx[n, g]`. Transposes are strides of the sgemm
//! operands. `col` lives in the kernel's scratch (one per thread), its rows
//! `ConvGeom::ld` floats apart (`P`, padded when `P` is a multiple of 128: rows
//! 512 bytes apart alias in L1). Very large images are packed a chunk of input
//! channels at a time (`COL_BYTES`), summing the chunks' products in sgemm.
//!
//! im2col walks, for each input channel (a run-time loop) and each kernel tap
//! `(kh, kw)` (unrolled), the rectangle of output positions whose input pixel is
//! inside the image, computed at compile time: the interior has no bounds test,
//! and the padding entries around the rectangles (the same for every item, group
//! and chunk) are zero-filled once per call, before the item loop. With stride 1 a
//! row of a rectangle is a contiguous run of an input row, copied as unaligned
//! f32x4 (the last one overlapping the one before); with a larger stride, as
//! scalars.
//!
//! col2im with stride 1 is a gather: each f32x4 of `dx` sums its taps' entries of
//! `col` in registers and is stored once; rows and columns of `dx` with the same
//! valid taps share one loop, as in the direct kernel. With a larger stride it
//! zero-fills `dx[n, g]` and adds the rectangles back tap by tap (scalars).
//!
//! The weight gradient is a [`Par::Reduce`] kernel: a call overwrites `dw` with
//! the sum over its items (sgemm overwrites for the first item of the range and
//! accumulates after), and with zeros for an empty range. Which of its two
//! products it computes is `ConvGeom::dw_transposed`'s choice.
//!
//! Measured GFLOP/s (one core, batch 64) are in `examples/conv_gflops.rs`'s
//! output; the kernels run at 80-95% of sgemm alone on the same shapes, except
//! where K is tiny (the epilogue and packing weigh more), and [`prefer_direct`]
//! says where the direct kernel would win (nowhere measured).
//!
//! # The direct forward kernel
//!
//! Loop nest, per batch item `n` of the work range and group `g`:
//!
//! ```text
//! for each block of OB output channels (a tail block for the rest)
//!   for each run of output rows with the same valid kernel rows (kh0..kh1)
//!     for oh in run                                    (run-time loop)
//!       for each run of output columns with the same valid kernel columns
//!         tiles of OB × NV accumulators over ow (f32x4 lanes when stride_w = 1,
//!         scalar lanes otherwise), then smaller tiles for the remainder:
//!           acc = 0
//!           for c in 0..C/g                            (run-time loop)
//!             for kh in kh0..kh1, kw in kw0..kw1       (unrolled)
//!               acc[o][v] = fma(x[c, ih, iw + v], splat(w[o, c, kh, kw]), acc[o][v])
//!           store acc
//! ```
//!
//! Padding costs no branch in the hot loop: the valid kernel ranges are computed
//! at compile time per output row and column, and consecutive rows (columns) with
//! equal ranges share one loop, so a 3×3 pad-1 convolution has three row runs
//! (top, interior, bottom) and three column runs.
//!
//! [`gemm::sgemm`]: super::gemm::sgemm

use super::builder::{Bound, Kb};
use super::DType;
use super::{Emit, Par};
use crate::ir::{ConvAttrs, Graph, Node, Op, Shape};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};

/// The convolution kernels. Buffers are listed inputs first, then outputs; the
/// GEMM kernels that pack take one more, their scratch (`KernelSpec::scratch`).
#[derive(Clone, Debug, PartialEq)]
pub enum ConvKernel {
    /// Direct conv2d forward: `(x[N,C,H,W], w[O,C/g,KH,KW]) → y[N,O,OH,OW]`.
    /// Buffers: `x`, `w`, `y`.
    Direct {
        x: Shape,
        w: Shape,
        attrs: ConvAttrs,
    },
    /// conv2d forward by im2col + sgemm, then `+ b[o]` when `bias` and
    /// `max(·, 0)` (NaN → 0) when `relu`, fused while `y[n]` is in cache:
    /// `(x[N,C,H,W], w[O,C/g,KH,KW][, b[O]]) → y[N,O,OH,OW]`. With `stats`, the
    /// epilogue also writes the batch-norm partials of the final `y` (see
    /// [`norm::row_moments`]): `s[n, o] = Σ_p y[n, o, p]` and `q[n, o] = Σ_p
    /// (y[n, o, p] − s[n, o]/(OH·OW))²`, both `[N, O]`, one row per item (so
    /// any split of the batch writes the same values).
    /// Buffers: `x`, `w`, `b` (only when `bias`), `y`, `s`, `q` (only when
    /// `stats`), scratch.
    ///
    /// [`norm::row_moments`]: super::norm::row_moments
    Forward {
        x: Shape,
        w: Shape,
        attrs: ConvAttrs,
        bias: bool,
        relu: bool,
        stats: bool,
    },
    /// The input gradient by sgemm + col2im:
    /// `(dy[N,O,OH,OW], w[O,C/g,KH,KW]) → dx[N,C,H,W]`, `input = [H, W]`.
    /// Buffers: `dy`, `w`, `dx`, scratch.
    GradInput {
        dy: Shape,
        w: Shape,
        attrs: ConvAttrs,
        input: [usize; 2],
    },
    /// The weight gradient by im2col + sgemm, summed over the batch items of the
    /// range ([`Par::Reduce`]): `(x[N,C,H,W], dy[N,O,OH,OW]) → dw[O,C/g,KH,KW]`,
    /// `kernel = [KH, KW]`. Buffers: `x`, `dy`, `dw`, scratch.
    GradWeight {
        x: Shape,
        dy: Shape,
        attrs: ConvAttrs,
        kernel: [usize; 2],
    },
}

impl ConvKernel {
    /// Conv2d and its two gradients, except depthwise convolutions (`groups == C
    /// > 1`: `depthwise.rs`).
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<ConvKernel> {
        let shape = |i: usize| g.shape(node.inputs[i]).clone();
        let depthwise = super::depthwise::is_depthwise;
        Some(match &node.op {
            Op::Conv2d(a) if !depthwise(a, shape(0)[1]) => ConvKernel::Forward {
                x: shape(0),
                w: shape(1),
                attrs: *a,
                bias: false,
                relu: false,
                stats: false,
            },
            // x's channels are w[1]·groups.
            Op::Conv2dGradInput(a, hw) if !depthwise(a, shape(1)[1] * a.groups) => {
                ConvKernel::GradInput {
                    dy: shape(0),
                    w: shape(1),
                    attrs: *a,
                    input: *hw,
                }
            }
            Op::Conv2dGradWeight(a, k) if !depthwise(a, shape(0)[1]) => ConvKernel::GradWeight {
                x: shape(0),
                dy: shape(1),
                attrs: *a,
                kernel: *k,
            },
            _ => return None,
        })
    }

    /// The graph op this kernel computes (bias and ReLU aside).
    fn op(&self) -> Op {
        match self {
            ConvKernel::Direct { attrs, .. } | ConvKernel::Forward { attrs, .. } => {
                Op::Conv2d(*attrs)
            }
            ConvKernel::GradInput { attrs, input, .. } => Op::Conv2dGradInput(*attrs, *input),
            ConvKernel::GradWeight { attrs, kernel, .. } => Op::Conv2dGradWeight(*attrs, *kernel),
        }
    }

    /// The two operands of [`ConvKernel::op`].
    fn operands(&self) -> [&Shape; 2] {
        match self {
            ConvKernel::Direct { x, w, .. } | ConvKernel::Forward { x, w, .. } => [x, w],
            ConvKernel::GradInput { dy, w, .. } => [dy, w],
            ConvKernel::GradWeight { x, dy, .. } => [x, dy],
        }
    }

    /// The shapes of the convolution, whichever direction the kernel computes.
    fn geom(&self) -> ConvGeom {
        let out = self.outputs().remove(0);
        let [a, b] = self.operands();
        // (x, w, y) of the forward convolution.
        let (x, w, y) = match self {
            ConvKernel::Direct { .. } | ConvKernel::Forward { .. } => (a, b, &out),
            ConvKernel::GradInput { .. } => (&out, b, a),
            ConvKernel::GradWeight { .. } => (a, &out, b),
        };
        let attrs = match self {
            ConvKernel::Direct { attrs, .. }
            | ConvKernel::Forward { attrs, .. }
            | ConvKernel::GradInput { attrs, .. }
            | ConvKernel::GradWeight { attrs, .. } => *attrs,
        };
        ConvGeom {
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            oh: y[2],
            ow: y[3],
            a: attrs,
        }
    }
}

/// Whether the direct kernel ([`ConvKernel::Direct`]) beats im2col + sgemm
/// ([`ConvKernel::Forward`]) on this forward convolution (`x`, `w` valid for
/// `attrs`): never, as measured by `examples/conv_gflops.rs` at Cranelift's
/// `opt_level=speed` (one core, batch 64, GFLOP/s direct vs forward): 14 vs 42
/// at M1's 1→16 (K = 9), 15 vs 60 at M2's 3→32, 10-15 vs 64-87 at the other
/// benchmark layers, 6 vs 56 strided (3×3 s2 16→32 @28), 13 vs 44 in groups of
/// 8 channels (g4 32→32 @16), 13 vs 15 and 11 vs 13 in groups of 2 (g16 32→32
/// @16, g32 64→64 @8), 11 vs 17 at 3×3 1→4 @8, 8 vs 40 at 5×5 1→8 @28. (At
/// `opt_level=none` the direct kernel runs about twice as fast and wins the
/// groups of 2 channels by 5-15%.)
pub fn prefer_direct(x: &[usize], w: &[usize], attrs: &ConvAttrs) -> bool {
    let _ = (x, w, attrs);
    false
}

impl Emit for ConvKernel {
    fn inputs(&self) -> Vec<Shape> {
        let [a, b] = self.operands();
        let mut v = vec![a.clone(), b.clone()];
        if let ConvKernel::Forward { w, bias: true, .. } = self {
            v.push(vec![w[0]]);
        }
        v
    }

    fn outputs(&self) -> Vec<Shape> {
        let [a, b] = self.operands();
        let mut v = self.op().infer(&[a, b]).expect("validated when compiled");
        if let ConvKernel::Forward { stats: true, .. } = self {
            let partials = vec![a[0], b[0]];
            v.extend([partials.clone(), partials]);
        }
        v
    }

    fn scratch(&self) -> usize {
        match self {
            ConvKernel::Direct { .. } => 0,
            ConvKernel::GradWeight { .. } => self.geom().dw_scratch(),
            _ => {
                let g = self.geom();
                g.col_scratch()
            }
        }
    }

    fn par(&self) -> Par {
        match self {
            ConvKernel::GradWeight { .. } => Par::Reduce,
            _ => Par::Items,
        }
    }

    fn flops_per_item(&self) -> u64 {
        // Every variant does the forward convolution's multiply-adds.
        let g = self.geom();
        2 * (g.o * g.rows() * g.positions()) as u64
    }

    fn validate(&self) -> Result<(), String> {
        let [a, b] = self.operands();
        if a.len() != 4 || b.len() != 4 {
            return Err(format!(
                "{} needs rank-4 operands, got {a:?}, {b:?}",
                self.op().name()
            ));
        }
        self.op().infer(&[a, b])?;
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        let geo = self.geom();
        match self {
            ConvKernel::Direct { .. } => conv2d(kb, &geo),
            ConvKernel::Forward {
                bias, relu, stats, ..
            } => forward(kb, &geo, *bias, *relu, *stats),
            ConvKernel::GradInput { .. } => grad_input(kb, &geo),
            ConvKernel::GradWeight { .. } => grad_weight(kb, &geo),
        }
    }
}

/// Output channels per register block.
const OB: usize = 4;
/// f32x4 vectors (or scalar lanes) per output channel in a tile; `OB * NV`
/// accumulators stay below the 16 xmm registers with room for operands.
const NV: usize = 2;

/// The shapes of one convolution.
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub a: ConvAttrs,
}

impl ConvGeom {
    fn cg(&self) -> usize {
        self.c / self.a.groups
    }
    fn og(&self) -> usize {
        self.o / self.a.groups
    }
}

/// A run of output positions `o0..o1` whose valid kernel taps are `k0..k1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Run {
    pub o0: usize,
    pub o1: usize,
    pub k0: usize,
    pub k1: usize,
}

/// Splits `0..out` into runs of positions with equal valid tap ranges: tap `k`
/// of position `o` reads input `o*s - p + k*d`, valid when inside `0..input`.
pub(crate) fn runs(out: usize, input: usize, k: usize, s: usize, p: usize, d: usize) -> Vec<Run> {
    let mut v: Vec<Run> = Vec::new();
    for o in 0..out {
        let valid = |t: usize| {
            let i = (o * s + t * d) as i64 - p as i64;
            i >= 0 && i < input as i64
        };
        let k0 = (0..k).find(|&t| valid(t)).unwrap_or(k);
        let k1 = (0..k).rev().find(|&t| valid(t)).map_or(k0, |t| t + 1);
        let k1 = k1.max(k0);
        match v.last_mut() {
            Some(r) if r.k0 == k0 && r.k1 == k1 && r.o1 == o => r.o1 = o + 1,
            _ => v.push(Run {
                o0: o,
                o1: o + 1,
                k0,
                k1,
            }),
        }
    }
    v
}

/// Per-(n, g, output-channel block) pointers a tile works from.
struct Bases {
    /// `x[n, g*Cg, 0, 0]`
    x: Value,
    /// `w[g*Og + ob, 0, 0, 0]`
    w: Value,
    /// `y[n, g*Og + ob, 0, 0]`
    y: Value,
}

/// Direct conv2d forward. Buffers: `x[N,C,H,W]`, `w[O,C/g,KH,KW]`,
/// `y[N,O,OH,OW]`.
fn conv2d(kb: &mut Kb, geo: &ConvGeom) {
    let e = kb.esz();
    let (x, w, y) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let g = *geo;
    let (cg, og) = (g.cg(), g.og());
    let x_item = (g.c * g.h * g.w) as i64 * e;
    let y_item = (g.o * g.oh * g.ow) as i64 * e;
    let taps = (cg * g.kh * g.kw) as i64 * e;
    let (start, end) = (kb.start, kb.end);
    let rows = runs(g.oh, g.h, g.kh, g.a.stride[0], g.a.pad[0], g.a.dilation[0]);
    let cols = runs(g.ow, g.w, g.kw, g.a.stride[1], g.a.pad[1], g.a.dilation[1]);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, x_item);
        let yn = kb.offset(y, n, y_item);
        kb.for_range(
            Bound::Const(0),
            Bound::Const(g.a.groups as i64),
            1,
            &[],
            |kb, gi, _| {
                let xg = kb.offset(xn, gi, (cg * g.h * g.w) as i64 * e);
                let wg = kb.offset(w, gi, og as i64 * taps);
                let yg = kb.offset(yn, gi, (og * g.oh * g.ow) as i64 * e);
                let full = og / OB * OB;
                let block = |kb: &mut Kb, ob: Value, nb: usize| {
                    let bases = Bases {
                        x: xg,
                        w: kb.offset(wg, ob, taps),
                        y: kb.offset(yg, ob, (g.oh * g.ow) as i64 * e),
                    };
                    channel_block(kb, &g, &bases, nb, &rows, &cols);
                };
                kb.for_range(
                    Bound::Const(0),
                    Bound::Const(full as i64),
                    OB as i64,
                    &[],
                    |kb, ob, _| {
                        block(kb, ob, OB);
                        vec![]
                    },
                );
                if og > full {
                    let ob = kb.iconst(full as i64);
                    block(kb, ob, og - full);
                }
                vec![]
            },
        );
        vec![]
    });
}

/// All outputs of `nb` output channels.
fn channel_block(kb: &mut Kb, g: &ConvGeom, b: &Bases, nb: usize, rows: &[Run], cols: &[Run]) {
    for r in rows {
        kb.for_range(
            Bound::Const(r.o0 as i64),
            Bound::Const(r.o1 as i64),
            1,
            &[],
            |kb, oh, _| {
                for c in cols {
                    column_run(kb, g, b, nb, oh, r, c);
                }
                vec![]
            },
        );
    }
}

/// One run of output columns in row `oh`: full tiles in a loop, then the rest.
fn column_run(kb: &mut Kb, g: &ConvGeom, b: &Bases, nb: usize, oh: Value, r: &Run, c: &Run) {
    let len = c.o1 - c.o0;
    // Lanes per accumulator: 4 when the input columns of 4 neighbouring outputs
    // are contiguous (stride 1), else scalars.
    let (ty, lanes) = if g.a.stride[1] == 1 {
        (kb.vty(), kb.lanes())
    } else {
        (kb.sty(), 1)
    };
    let tile = lanes * NV;
    let full = len / tile * tile;
    kb.for_range(
        Bound::Const(c.o0 as i64),
        Bound::Const((c.o0 + full) as i64),
        tile as i64,
        &[],
        |kb, ow, _| {
            emit_tile(kb, g, b, nb, oh, ow, ty, NV, r, c);
            vec![]
        },
    );
    let mut at = c.o0 + full;
    let vecs = (c.o1 - at) / lanes;
    if vecs > 0 {
        let ow = kb.iconst(at as i64);
        emit_tile(kb, g, b, nb, oh, ow, ty, vecs, r, c);
        at += vecs * lanes;
    }
    if at < c.o1 {
        let ow = kb.iconst(at as i64);
        let st = kb.sty();
        emit_tile(kb, g, b, nb, oh, ow, st, c.o1 - at, r, c);
    }
}

/// `nb × nv` accumulators of type `ty` at output row `oh`, columns from `ow`:
/// the reduction over input channels and the valid taps, then the stores.
#[allow(clippy::too_many_arguments)]
fn emit_tile(
    kb: &mut Kb,
    g: &ConvGeom,
    b: &Bases,
    nb: usize,
    oh: Value,
    ow: Value,
    ty: Type,
    nv: usize,
    r: &Run,
    c: &Run,
) {
    let (e, st) = (kb.esz(), kb.sty());
    let (sh, sw) = (g.a.stride[0] as i64, g.a.stride[1] as i64);
    let (ph, pw) = (g.a.pad[0] as i64, g.a.pad[1] as i64);
    let (dh, dw) = (g.a.dilation[0] as i64, g.a.dilation[1] as i64);
    let (h, w) = (g.h as i64, g.w as i64);
    let (kh, kw) = (g.kh as i64, g.kw as i64);
    let cg = g.cg() as i64;
    // Byte distance between the inputs of neighbouring vectors / scalar lanes.
    let lane_step = if ty.is_vector() { 16 } else { e * sw };
    // x[c=0, oh*sh, ow*sw] (before padding and tap offsets, which are constants).
    let xr = kb.offset(b.x, oh, e * sh * w);
    let xr = kb.offset(xr, ow, e * sw);
    let zero = kb.zero(ty);
    let init = vec![zero; nb * nv];
    let acc = if r.k0 < r.k1 && c.k0 < c.k1 {
        kb.for_range(
            Bound::Const(0),
            Bound::Const(cg),
            1,
            &init,
            |kb, ci, acc| {
                let xc = kb.offset(xr, ci, e * h * w);
                let wc = kb.offset(b.w, ci, e * kh * kw);
                let mut acc = acc.to_vec();
                for tkh in r.k0 as i64..r.k1 as i64 {
                    for tkw in c.k0 as i64..c.k1 as i64 {
                        let xoff = e * ((tkh * dh - ph) * w + tkw * dw - pw);
                        let xs: Vec<Value> = (0..nv as i64)
                            .map(|v| kb.load_in(ty, xc, xoff + v * lane_step))
                            .collect();
                        for o in 0..nb {
                            let woff = e * (o as i64 * cg * kh * kw + tkh * kw + tkw);
                            let ws = kb.load_in(st, wc, woff);
                            let ws = kb.splat(ty, ws);
                            for (v, &xv) in xs.iter().enumerate() {
                                let a = &mut acc[o * nv + v];
                                *a = kb.fma(xv, ws, *a);
                            }
                        }
                    }
                }
                acc
            },
        )
    } else {
        init
    };
    let yr = kb.offset(b.y, oh, e * g.ow as i64);
    let yr = kb.offset(yr, ow, e);
    let plane = e * (g.oh * g.ow) as i64;
    let store_step = if ty.is_vector() { 16 } else { e };
    for o in 0..nb {
        for v in 0..nv {
            kb.store(
                acc[o * nv + v],
                yr,
                o as i64 * plane + v as i64 * store_step,
            );
        }
    }
}

impl ConvGeom {
    /// Rows of the im2col matrix: `Cg·KH·KW`.
    fn rows(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    /// Output positions (columns of the im2col matrix): `OH·OW`.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// The distance between the rows of the im2col matrix in scratch: `OH·OW`,
    /// plus 16 when that is a multiple of 128 floats. Rows 512 bytes apart map to
    /// a few L1 sets only, and sgemm reads a panel's rows together (measured on
    /// M2's 32→32 conv at 32×32: sgemm ran at 53 GFLOP/s with rows 1024 floats
    /// apart, 68 with 1040).
    fn ld(&self) -> usize {
        let p = self.positions();
        if p.is_multiple_of(128) {
            p + 16
        } else {
            p
        }
    }
    /// Whether the weight gradient computes `dwᵀ_g = col · dy_gᵀ` (K×Og, in
    /// scratch, transposed into `dw` at the end of the call) rather than `dw_g =
    /// dy_g · colᵀ` (Og×K). sgemm's 6×16 register tiles waste less of the first
    /// when Og is a multiple of 16 and K is not (M1's 1→16 conv: K = 9), and it
    /// packs the smaller operand, `dyᵀ` (Og×P) instead of `colᵀ` (K×P), when
    /// K > Og. Measured (sgemm alone, batch 64): 1→16 @28 21 → 39 GFLOP/s, 32→32
    /// @32 67 → 87, 64→64 @16 81 → 94; the 1×1 convs of M3 (K ≤ Og) 77 → 67 at
    /// 32→64 @32, so they keep `dw = dy · colᵀ`.
    fn dw_transposed(&self) -> bool {
        let (k, og) = (self.rows(), self.og());
        let (direct, transposed) = (tile_use(og, k), tile_use(k, og));
        if (direct - transposed).abs() > 0.05 {
            transposed > direct
        } else {
            k > og
        }
    }
    /// Scratch floats of the weight gradient: `col`, then `dwᵀ`.
    fn dw_scratch(&self) -> usize {
        let col = self.col_scratch();
        let dwt = if self.dw_transposed() {
            self.o * self.rows()
        } else {
            0
        };
        col + dwt
    }
    /// Input channels per im2col chunk: the im2col matrix of a group is built
    /// and consumed (by sgemm, or by col2im) [`COL_BYTES`] at most at a time,
    /// which bounds the scratch of large images.
    fn chunk(&self) -> usize {
        let per_channel = 4 * self.kh * self.kw * self.ld();
        (COL_BYTES / per_channel).clamp(1, self.cg())
    }
    /// Scratch floats of the im2col matrix (one chunk), 0 when pointwise.
    fn col_scratch(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.chunk() * self.kh * self.kw * self.ld()
        }
    }
    /// 1×1, stride 1, no padding: the input plane is the im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.a.stride == [1, 1] && self.a.pad == [0, 0]
    }
}

/// The most bytes of im2col matrix built before sgemm (or col2im) consumes them
/// (see [`ConvGeom::chunk`]). Not a cache size: chunks that stay in L2 (256 KiB,
/// 512 KiB) were no faster on the benchmark layers, and slower on M2's 32→32
/// conv at 32×32 (1.2 MB of im2col per item; weight gradient 75 → 65 GFLOP/s at
/// 256 KiB), so the benchmark layers are one chunk and chunks only bound the
/// scratch of large images (4 MiB per thread).
const COL_BYTES: usize = 4 << 20;

/// The fraction of sgemm's work that is useful on an `m`×`n` result: its
/// register tiles are 6 rows by 16 columns, or 8 for a last panel of at most 8.
fn tile_use(m: usize, n: usize) -> f64 {
    let rows = m.div_ceil(6) * 6;
    let cols = n / 16 * 16
        + match n % 16 {
            0 => 0,
            1..=8 => 8,
            _ => 16,
        };
    (m * n) as f64 / (rows * cols) as f64
}

/// One kernel tap `(kh, kw)` and the rectangle `oh0..oh1 × ow0..ow1` of output
/// positions whose input pixel it reads lies inside the image.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tap {
    kh: usize,
    kw: usize,
    oh: (usize, usize),
    ow: (usize, usize),
}

impl Tap {
    fn is_empty(&self) -> bool {
        self.oh.0 == self.oh.1 || self.ow.0 == self.ow.1
    }
}

/// The outputs `o0..o1` whose tap `t` reads inside `0..input` (`o0 == o1` when
/// none does): input `o*s - p + t*d`.
fn tap_range(out: usize, input: usize, t: usize, s: usize, p: usize, d: usize) -> (usize, usize) {
    let valid = |o: usize| {
        let i = (o * s + t * d) as i64 - p as i64;
        i >= 0 && i < input as i64
    };
    match (0..out).find(|&o| valid(o)) {
        None => (0, 0),
        Some(o0) => (o0, (o0..out).take_while(|&o| valid(o)).count() + o0),
    }
}

/// The taps of `g` in im2col row order (`kh` major), with their rectangles.
fn taps(g: &ConvGeom) -> Vec<Tap> {
    let mut v = Vec::with_capacity(g.kh * g.kw);
    for kh in 0..g.kh {
        for kw in 0..g.kw {
            v.push(Tap {
                kh,
                kw,
                oh: tap_range(g.oh, g.h, kh, g.a.stride[0], g.a.pad[0], g.a.dilation[0]),
                ow: tap_range(g.ow, g.w, kw, g.a.stride[1], g.a.pad[1], g.a.dilation[1]),
            });
        }
    }
    v
}

/// Spans of at most this many pieces (f32x4 or scalars) are emitted
/// straight-line; longer ones as a loop of [`UNROLL`] pieces per iteration, then
/// the rest straight-line.
const STRAIGHT: usize = 8;
const UNROLL: usize = 4;

/// How a span is cut into pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pieces {
    /// One element at a time (strided data).
    Scalars,
    /// f32x4, then the last `len mod 4` elements one at a time.
    Vectors,
    /// f32x4, the last one ending at the span's end and overlapping the one
    /// before when `len mod 4 != 0` (spans of at least 4 elements whose writes do
    /// not depend on what they overwrite: copies and fills).
    Overlapping,
}

/// Where a piece of a span starts: element `idx + off` of the span, with `idx`
/// a run-time loop index (`None`: 0).
#[derive(Clone, Copy)]
struct At {
    idx: Option<Value>,
    off: i64,
}

impl At {
    /// The address of the piece in a buffer at `ptr` (span element 0, byte offset
    /// `base`) whose elements are `step` floats apart: a pointer and a byte offset.
    fn addr(self, kb: &mut Kb, ptr: Value, base: i64, step: i64) -> (Value, i64) {
        let e = kb.esz();
        let p = match self.idx {
            Some(i) => kb.offset(ptr, i, e * step),
            None => ptr,
        };
        (p, base + e * step * self.off)
    }
}

/// Calls `f(kb, ty, at)` on pieces covering elements `0..len` of a span, of type
/// `ty` F32X4 or F32 as `how` says.
fn span(kb: &mut Kb, len: usize, how: Pieces, f: &mut dyn FnMut(&mut Kb, Type, At)) {
    let st = kb.sty();
    let (ty, lanes) = match how {
        Pieces::Scalars => (st, 1),
        Pieces::Vectors | Pieces::Overlapping => (kb.vty(), kb.lanes()),
    };
    let pieces = len / lanes;
    let mut at = 0;
    if pieces > STRAIGHT {
        let looped = pieces / UNROLL * UNROLL * lanes;
        kb.for_range(
            Bound::Const(0),
            Bound::Const(looped as i64),
            (UNROLL * lanes) as i64,
            &[],
            |kb, i, _| {
                for u in 0..UNROLL {
                    let off = (u * lanes) as i64;
                    f(kb, ty, At { idx: Some(i), off });
                }
                vec![]
            },
        );
        at = looped;
    }
    while at + lanes <= len {
        f(
            kb,
            ty,
            At {
                idx: None,
                off: at as i64,
            },
        );
        at += lanes;
    }
    if at < len && how == Pieces::Overlapping && len >= lanes {
        let off = (len - lanes) as i64;
        f(kb, ty, At { idx: None, off });
        return;
    }
    for e in at..len {
        f(
            kb,
            st,
            At {
                idx: None,
                off: e as i64,
            },
        );
    }
}

/// Stores zeros to `len` floats at `ptr + base` (bytes).
fn zero_span(kb: &mut Kb, ptr: Value, base: i64, len: usize) {
    let (st, vt) = (kb.sty(), kb.vty());
    let (z, zv) = (kb.zero(st), kb.zero(vt));
    span(kb, len, Pieces::Overlapping, &mut |kb, ty, at| {
        let (p, off) = at.addr(kb, ptr, base, 1);
        kb.store(if !ty.is_vector() { z } else { zv }, p, off);
    });
}

/// The im2col entries that are padding, for `channels` input channels:
/// zero-filled once per call, before any [`im2col`], which never writes them
/// (they are the same for every item, group and channel chunk, and the scratch
/// holding `col` is private to the call).
fn im2col_padding(kb: &mut Kb, g: &ConvGeom, col: Value, channels: usize) {
    let e = kb.esz();
    let (ld, ow) = (g.ld(), g.ow);
    let taps = taps(g);
    kb.for_range(
        Bound::Const(0),
        Bound::Const(channels as i64),
        1,
        &[],
        |kb, ci, _| {
            let cc = kb.offset(col, ci, e * (taps.len() * ld) as i64);
            for (r, t) in taps.iter().enumerate() {
                let row = e * (r * ld) as i64;
                if t.is_empty() {
                    zero_span(kb, cc, row, g.positions());
                    continue;
                }
                let ((oh0, oh1), (ow0, ow1)) = (t.oh, t.ow);
                zero_span(kb, cc, row, oh0 * ow);
                zero_span(kb, cc, row + e * (oh1 * ow) as i64, (g.oh - oh1) * ow);
                if ow0 == 0 && ow1 == ow {
                    continue;
                }
                kb.for_range(
                    Bound::Const(oh0 as i64),
                    Bound::Const(oh1 as i64),
                    1,
                    &[],
                    |kb, oh, _| {
                        let cr = kb.offset(cc, oh, e * ow as i64);
                        zero_span(kb, cr, row, ow0);
                        zero_span(kb, cr, row + e * ow1 as i64, ow - ow1);
                        vec![]
                    },
                );
            }
            vec![]
        },
    );
}

/// The walk shared by im2col and col2im: for each of `channels` planes, each
/// tap `(kh, kw)` and each output row, the run of output columns whose input
/// pixels lie inside the image; `f(kb, ty, at, (x_row, x_base), (col_row,
/// col_base))` handles one piece of it (an f32x4 or an f32, see [`span`]), with
/// the pixel at `at.addr(kb, x_row, x_base, stride_w)` and the col entry at
/// `at.addr(kb, col_row, col_base, 1)`.
type TapPiece<'f> = dyn FnMut(&mut Kb, Type, At, (Value, i64), (Value, i64)) + 'f;

fn for_each_tap_span(
    kb: &mut Kb,
    g: &ConvGeom,
    xg: Value,
    col: Value,
    channels: usize,
    how: Pieces,
    f: &mut TapPiece,
) {
    let e = kb.esz();
    let (h, w, ld) = (g.h as i64, g.w as i64, g.ld());
    let (sh, sw) = (g.a.stride[0] as i64, g.a.stride[1] as i64);
    let taps = taps(g);
    kb.for_range(
        Bound::Const(0),
        Bound::Const(channels as i64),
        1,
        &[],
        |kb, ci, _| {
            let xc = kb.offset(xg, ci, e * h * w);
            let cc = kb.offset(col, ci, e * (taps.len() * ld) as i64);
            for (r, t) in taps.iter().enumerate() {
                if t.is_empty() {
                    continue;
                }
                let row = e * (r * ld) as i64;
                let ((oh0, oh1), (ow0, ow1)) = (t.oh, t.ow);
                // x[c, ih, iw] for output (oh, ow): ih = oh·sh + dh_off,
                // iw = ow·sw + dw_off.
                let dh_off = (t.kh * g.a.dilation[0]) as i64 - g.a.pad[0] as i64;
                let dw_off = (t.kw * g.a.dilation[1]) as i64 - g.a.pad[1] as i64;
                kb.for_range(
                    Bound::Const(oh0 as i64),
                    Bound::Const(oh1 as i64),
                    1,
                    &[],
                    |kb, oh, _| {
                        let cr = kb.offset(cc, oh, e * g.ow as i64);
                        let xr = kb.offset(xc, oh, e * sh * w);
                        let c_base = row + e * ow0 as i64;
                        let x_base = e * (dh_off * w + ow0 as i64 * sw + dw_off);
                        span(kb, ow1 - ow0, how, &mut |kb, ty, at| {
                            f(kb, ty, at, (xr, x_base), (cr, c_base))
                        });
                        vec![]
                    },
                );
            }
            vec![]
        },
    );
}

/// im2col of `channels` input planes `x[c, H, W]` (from `xg`) into
/// `col[channels·KH·KW, OH·OW]` (at `col`, rows [`ConvGeom::ld`] floats apart):
/// row `(c, kh, kw)`, column `(oh, ow)` holds `x[c, oh·sh - ph + kh·dh, ow·sw -
/// pw + kw·dw]`. Only the entries inside the image are written: the padding is
/// [`im2col_padding`]'s.
fn im2col(kb: &mut Kb, g: &ConvGeom, xg: Value, col: Value, channels: usize) {
    let sw = g.a.stride[1] as i64;
    let how = if sw == 1 {
        Pieces::Overlapping
    } else {
        Pieces::Scalars
    };
    for_each_tap_span(kb, g, xg, col, channels, how, &mut |kb, ty, at, x, c| {
        let (xp, xo) = at.addr(kb, x.0, x.1, sw);
        let v = kb.load_in(ty, xp, xo);
        let (cp, co) = at.addr(kb, c.0, c.1, 1);
        kb.store(v, cp, co);
    });
}

/// The runs of input positions `0..input` that receive the same taps from a
/// stride-1 window: position `i` gets tap `t` from output `i + p - t·d` when that
/// lies in `0..out`; the taps of a position form a range `k0..k1` (empty when
/// `k0 == k1`).
fn gather_runs(input: usize, out: usize, k: usize, p: usize, d: usize) -> Vec<Run> {
    let mut v: Vec<Run> = Vec::new();
    for i in 0..input {
        let valid = |t: usize| {
            let o = (i + p) as i64 - (t * d) as i64;
            o >= 0 && o < out as i64
        };
        let k0 = (0..k).find(|&t| valid(t)).unwrap_or(0);
        let k1 = (k0..k).take_while(|&t| valid(t)).count() + k0;
        match v.last_mut() {
            Some(r) if r.k0 == k0 && r.k1 == k1 => r.o1 = i + 1,
            _ => v.push(Run {
                o0: i,
                o1: i + 1,
                k0,
                k1,
            }),
        }
    }
    v
}

/// col2im for stride 1 as a gather: each f32x4 (or scalar) of `channels`
/// input-gradient planes `dx[c, H, W]` (from `xg`) is the sum of its taps'
/// entries of `col[channels·KH·KW, OH·OW]` (at `col`), added in registers and
/// stored once. Rows
/// (columns) of dx with the same taps share one loop (one span), as in the
/// direct forward kernel, so there is no bounds test and no zero-fill pass.
fn col2im_gather(kb: &mut Kb, g: &ConvGeom, col: Value, xg: Value, channels: usize) {
    let e = kb.esz();
    let (w, ow, ld) = (g.w as i64, g.ow as i64, g.ld());
    let (ph, pw) = (g.a.pad[0] as i64, g.a.pad[1] as i64);
    let (dh, dw) = (g.a.dilation[0] as i64, g.a.dilation[1] as i64);
    let rows = gather_runs(g.h, g.oh, g.kh, g.a.pad[0], g.a.dilation[0]);
    let cols = gather_runs(g.w, g.ow, g.kw, g.a.pad[1], g.a.dilation[1]);
    let taps = (g.kh * g.kw * ld) as i64;
    kb.for_range(
        Bound::Const(0),
        Bound::Const(channels as i64),
        1,
        &[],
        |kb, ci, _| {
            let xc = kb.offset(xg, ci, e * (g.h * g.w) as i64);
            let cc = kb.offset(col, ci, e * taps);
            for r in &rows {
                kb.for_range(
                    Bound::Const(r.o0 as i64),
                    Bound::Const(r.o1 as i64),
                    1,
                    &[],
                    |kb, ih, _| {
                        let xr = kb.offset(xc, ih, e * w);
                        // col[(kh, kw), oh, ow] with oh = ih + ph - kh·dh: the
                        // row ih of col, moved by constants per tap.
                        let cr = kb.offset(cc, ih, e * ow);
                        for c in &cols {
                            let x_base = e * c.o0 as i64;
                            span(kb, c.o1 - c.o0, Pieces::Vectors, &mut |kb, ty, at| {
                                let mut sum = None;
                                for kh in r.k0..r.k1 {
                                    for kw in c.k0..c.k1 {
                                        let tap = (kh * g.kw + kw) as i64;
                                        let oh = ph - kh as i64 * dh;
                                        let owf = c.o0 as i64 + pw - kw as i64 * dw;
                                        let base = e * (tap * ld as i64 + oh * ow + owf);
                                        let (p, off) = at.addr(kb, cr, base, 1);
                                        let v = kb.load_out(ty, p, off);
                                        sum = Some(match sum {
                                            None => v,
                                            Some(s) => kb.b.ins().fadd(s, v),
                                        });
                                    }
                                }
                                let sum = match sum {
                                    Some(s) => s,
                                    None => kb.zero(ty),
                                };
                                let (p, off) = at.addr(kb, xr, x_base, 1);
                                kb.store(sum, p, off);
                            });
                        }
                        vec![]
                    },
                );
            }
            vec![]
        },
    );
}

/// col2im: zero-fills `channels` input-gradient planes `dx[c, H, W]` (from
/// `xg`) and adds every entry of `col[channels·KH·KW, OH·OW]` (at `col`) back to
/// the pixel its im2col entry was read from (padding entries are dropped), one
/// tap at a time (any stride).
fn col2im(kb: &mut Kb, g: &ConvGeom, col: Value, xg: Value, channels: usize) {
    let sw = g.a.stride[1] as i64;
    let how = if sw == 1 {
        Pieces::Vectors
    } else {
        Pieces::Scalars
    };
    zero_span(kb, xg, 0, channels * g.h * g.w);
    for_each_tap_span(kb, g, xg, col, channels, how, &mut |kb, ty, at, x, c| {
        let (cp, co) = at.addr(kb, c.0, c.1, 1);
        let v = kb.load_out(ty, cp, co);
        let (xp, xo) = at.addr(kb, x.0, x.1, sw);
        let old = kb.load_out(ty, xp, xo);
        let sum = kb.b.ins().fadd(old, v);
        kb.store(sum, xp, xo);
    });
}

/// An sgemm operand at `ptr`: element `(i, j)` at float offset `i·rs + j·cs`.
struct Mat {
    ptr: Value,
    rs: usize,
    cs: usize,
}

/// Emits a call of [`super::gemm::sgemm`]: `C (m×n, row stride ldc) = A·B`, or
/// `+=` when `accumulate` (an `I32`) is not 0.
#[allow(clippy::too_many_arguments)]
fn call_sgemm(
    kb: &mut Kb,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: Value,
    ldc: usize,
    accumulate: Value,
) {
    debug_assert_eq!(kb.b.func.dfg.value_type(accumulate), types::I32);
    // Checked mode: the spans the GEMM reads and writes (last element + 1).
    if m > 0 && n > 0 && k > 0 {
        let e = kb.esz();
        kb.check_span(a.ptr, e * ((m - 1) * a.rs + (k - 1) * a.cs + 1) as i64);
        kb.check_span(b.ptr, e * ((k - 1) * b.rs + (n - 1) * b.cs + 1) as i64);
        kb.check_span(c, e * ((m - 1) * ldc + n) as i64);
    }
    let sizes = |kb: &mut Kb, v: &[usize]| -> Vec<Value> {
        v.iter().map(|&x| kb.iconst(x as i64)).collect()
    };
    let mut args = sizes(kb, &[m, n, k]);
    args.push(a.ptr);
    args.extend(sizes(kb, &[a.rs, a.cs]));
    args.push(b.ptr);
    args.extend(sizes(kb, &[b.rs, b.cs]));
    args.push(c);
    args.extend(sizes(kb, &[ldc]));
    args.push(accumulate);
    let gemm = match kb.dt {
        DType::F32 => super::gemm::sgemm as *const () as usize,
        DType::F64 => super::gemm::dgemm as *const () as usize,
    };
    kb.call_native(gemm, &args);
}

/// Per-item and per-group pointer steps of the kernels' loops.
struct Steps {
    /// Bytes of one batch item of x (`C·H·W`) and y (`O·OH·OW`).
    x_item: i64,
    y_item: i64,
    /// Bytes of one group's block of an item of x, of y, and of w.
    x_group: i64,
    y_group: i64,
    w_group: i64,
}

impl Steps {
    fn new(g: &ConvGeom, e: i64) -> Steps {
        let (x_plane, y_plane) = (g.h * g.w, g.positions());
        Steps {
            x_item: e * (g.c * x_plane) as i64,
            y_item: e * (g.o * y_plane) as i64,
            x_group: e * (g.cg() * x_plane) as i64,
            y_group: e * (g.og() * y_plane) as i64,
            w_group: e * (g.og() * g.rows()) as i64,
        }
    }
}

/// Loops over the batch items `n` of the work range and the groups `g`:
/// `body(kb, n, x[n, g], y[n, g], w_g)` per group, for pointers `x`, `y`, `w` in
/// the forward convolution's roles (`dx`, `dy`, `dw` in the gradients'), then
/// `after(kb, n, y[n])` per item.
fn items_and_groups(
    kb: &mut Kb,
    g: &ConvGeom,
    [x, y, w]: [Value; 3],
    body: &mut dyn FnMut(&mut Kb, Value, Value, Value, Value),
    after: &mut dyn FnMut(&mut Kb, Value, Value),
) {
    let s = Steps::new(g, kb.esz());
    let (start, end) = (kb.start, kb.end);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, s.x_item);
        let yn = kb.offset(y, n, s.y_item);
        kb.for_range(
            Bound::Const(0),
            Bound::Const(g.a.groups as i64),
            1,
            &[],
            |kb, gi, _| {
                let xg = kb.offset(xn, gi, s.x_group);
                let yg = kb.offset(yn, gi, s.y_group);
                let wg = kb.offset(w, gi, s.w_group);
                body(kb, n, xg, yg, wg);
                vec![]
            },
        );
        after(kb, n, yn);
        vec![]
    });
}

/// Calls `f(kb, c0, channels)` for the channel chunks of a group (see
/// [`ConvGeom::chunk`]): chunks of [`ConvGeom::chunk`] channels in a run-time loop
/// (`c0`, the first channel, is a loop value), then the remaining channels. A
/// pointwise convolution is one chunk of every channel (it packs nothing).
fn channel_chunks(kb: &mut Kb, g: &ConvGeom, f: &mut dyn FnMut(&mut Kb, Value, usize)) {
    let cg = g.cg();
    let cc = if g.pointwise() { cg } else { g.chunk() };
    let full = cg / cc * cc;
    kb.for_range(
        Bound::Const(0),
        Bound::Const(full as i64),
        cc as i64,
        &[],
        |kb, c0, _| {
            f(kb, c0, cc);
            vec![]
        },
    );
    if full < cg {
        let c0 = kb.iconst(full as i64);
        f(kb, c0, cg - full);
    }
}

/// conv2d forward by im2col + sgemm with the fused epilogue. Buffers: `x`, `w`,
/// `b` (when `bias`), `y`, `s`, `q` (when `stats`), scratch (unless pointwise).
/// Per group, `y_g = Σ over channel chunks of w_g[:, chunk] · col(chunk)`.
fn forward(kb: &mut Kb, g: &ConvGeom, bias: bool, relu: bool, stats: bool) {
    let e = kb.esz();
    let (x, w) = (kb.buffer(0), kb.buffer(1));
    let b = bias.then(|| kb.buffer(2));
    let y = kb.buffer(2 + bias as usize);
    let sq = stats.then(|| (kb.buffer(3 + bias as usize), kb.buffer(4 + bias as usize)));
    let col = (!g.pointwise()).then(|| kb.buffer(3 + bias as usize + 2 * stats as usize));
    let (k, p, ld, taps) = (g.rows(), g.positions(), g.ld(), g.kh * g.kw);
    let plane = e * (g.h * g.w) as i64;
    if let Some(col) = col {
        im2col_padding(kb, g, col, g.chunk());
    }
    items_and_groups(
        kb,
        g,
        [x, y, w],
        &mut |kb, _, xg, yg, wg| {
            channel_chunks(kb, g, &mut |kb, c0, channels| {
                let xc = kb.offset(xg, c0, plane);
                let bm = match col {
                    None => Mat {
                        ptr: xc,
                        rs: g.h * g.w,
                        cs: 1,
                    },
                    Some(col) => {
                        im2col(kb, g, xc, col, channels);
                        Mat {
                            ptr: col,
                            rs: ld,
                            cs: 1,
                        }
                    }
                };
                // Columns c0·KH·KW.. of w_g.
                let a = Mat {
                    ptr: kb.offset(wg, c0, e * taps as i64),
                    rs: k,
                    cs: 1,
                };
                // The first chunk overwrites y_g, the others add to it.
                let later = kb.b.ins().icmp_imm_s(IntCC::NotEqual, c0, 0);
                let accumulate = kb.b.ins().uextend(types::I32, later);
                call_sgemm(kb, g.og(), p, channels * taps, a, bm, yg, p, accumulate);
            });
        },
        &mut |kb, n, yn| {
            if bias || relu || stats {
                let sq = sq.map(|(s, q)| {
                    let row = e * g.o as i64;
                    (kb.offset(s, n, row), kb.offset(q, n, row))
                });
                epilogue(kb, g, yn, b, relu, sq);
            }
        },
    );
}

/// `y[n] = y[n] + b[o]` (when `b`), then `max(·, 0)` with NaN → 0 (when `relu`),
/// in place over one item `y[O, OH, OW]` at `yn`, a channel at a time; with
/// `stats = Some((s, q))` (item `n`'s rows of the partials), then the channel's
/// sum and squared deviations of the result ([`norm::row_moments`]), stored to
/// `s[o]`, `q[o]` while the channel is in L1.
///
/// [`norm::row_moments`]: super::norm::row_moments
fn epilogue(
    kb: &mut Kb,
    g: &ConvGeom,
    yn: Value,
    b: Option<Value>,
    relu: bool,
    stats: Option<(Value, Value)>,
) {
    let (e, st, vt) = (kb.esz(), kb.sty(), kb.vty());
    let p = g.positions();
    // f32: the statistics of the whole item in one native call, after the
    // channel loop; f64: generated, per channel.
    let (native, stats) = match kb.dt {
        DType::F32 => (stats, None),
        DType::F64 => (None, stats),
    };
    // relu(v) is idempotent, so a last vector may overlap the one before.
    let how = if b.is_some() {
        Pieces::Vectors
    } else {
        Pieces::Overlapping
    };
    let per_channel = b.is_some() || relu || stats.is_some();
    let channels = if per_channel { g.o as i64 } else { 0 };
    kb.for_range(
        Bound::Const(0),
        Bound::Const(channels),
        1,
        &[],
        |kb, o, _| {
            let bias = b.map(|b| {
                let bp = kb.offset(b, o, e);
                let bs = kb.load_in(st, bp, 0);
                (bs, kb.splat(vt, bs))
            });
            let yo = kb.offset(yn, o, e * p as i64);
            if b.is_some() || relu {
                span(kb, p, how, &mut |kb, ty, at| {
                    let (yp, off) = at.addr(kb, yo, 0, 1);
                    let mut v = kb.load_out(ty, yp, off);
                    if let Some((bs, bv)) = bias {
                        v = kb.b.ins().fadd(v, if !ty.is_vector() { bs } else { bv });
                    }
                    if relu {
                        v = positive_part(kb, ty, v);
                    }
                    kb.store(v, yp, off);
                });
            }
            if let Some((s, q)) = stats {
                let (sum, sqdev) = super::norm::row_moments(kb, yo, p);
                let (sp, qp) = (kb.offset(s, o, e), kb.offset(q, o, e));
                kb.store(sum, sp, 0);
                kb.store(sqdev, qp, 0);
            }
            vec![]
        },
    );
    if let Some((s, q)) = native {
        // Checked mode: the spans the native call reads and writes.
        kb.check_span(yn, e * (g.o * p) as i64);
        kb.check_span(s, e * g.o as i64);
        kb.check_span(q, e * g.o as i64);
        let (rows, len) = (kb.iconst(g.o as i64), kb.iconst(p as i64));
        let f = super::norm::row_moments_f32 as *const () as usize;
        kb.call_native(f, &[yn, rows, len, s, q]);
    }
}

/// `v` where `v > 0`, else `+0.0` (NaN → 0), as [`Kb::where_positive`] computes
/// it, but for f32x4 as `bitselect(0 < v, v, 0)`: the pattern Cranelift's x64
/// backend lowers to one `maxps v, 0` (which returns its second operand when
/// either is NaN). `where_positive`'s compare and `and` overwrite the zero
/// operand, which lives in a spill slot (the egraph hoists it above the item
/// loop, across the sgemm calls), so it was reloaded for every vector: 25% of
/// the time of M1's 1→16 conv with bias and ReLU, 14% with this.
fn positive_part(kb: &mut Kb, ty: Type, v: Value) -> Value {
    let zero = kb.zero(ty);
    let mask = kb.b.ins().fcmp(FloatCC::LessThan, zero, v);
    if !ty.is_vector() {
        kb.b.ins().select(mask, v, zero)
    } else {
        let mask = kb.b.ins().bitcast(ty, MemFlagsData::new(), mask);
        kb.b.ins().bitselect(mask, v, zero)
    }
}

/// conv2d's input gradient by sgemm + col2im. Buffers: `dy`, `w`, `dx`, scratch
/// (unless pointwise). Per group and channel chunk, `col = w_g[:, chunk]ᵀ ·
/// dy[n, g]`, then col2im into those channels of `dx[n, g]`.
fn grad_input(kb: &mut Kb, g: &ConvGeom) {
    let e = kb.esz();
    let (dy, w, dx) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let col = (!g.pointwise()).then(|| kb.buffer(3));
    let overwrite = kb.b.ins().iconst(types::I32, 0);
    let (k, p, taps) = (g.rows(), g.positions(), g.kh * g.kw);
    let plane = e * (g.h * g.w) as i64;
    items_and_groups(
        kb,
        g,
        [dx, dy, w],
        &mut |kb, _, dxg, dyg, wg| {
            channel_chunks(kb, g, &mut |kb, c0, channels| {
                // A = w_g[:, chunk]ᵀ: A(i, o) = w_g[o·K + c0·KH·KW + i].
                let a = Mat {
                    ptr: kb.offset(wg, c0, e * taps as i64),
                    rs: 1,
                    cs: k,
                };
                let b = Mat {
                    ptr: dyg,
                    rs: p,
                    cs: 1,
                };
                let dxc = kb.offset(dxg, c0, plane);
                let m = channels * taps;
                match col {
                    None => call_sgemm(kb, m, p, g.og(), a, b, dxc, p, overwrite),
                    Some(col) => {
                        call_sgemm(kb, m, p, g.og(), a, b, col, g.ld(), overwrite);
                        if g.a.stride == [1, 1] {
                            col2im_gather(kb, g, col, dxc, channels);
                        } else {
                            col2im(kb, g, col, dxc, channels);
                        }
                    }
                }
            });
        },
        &mut |_, _, _| {},
    );
}

/// conv2d's weight gradient by im2col + sgemm, summed over the items of the
/// range. Buffers: `x`, `dy`, `dw`, scratch: `col` (unless pointwise), then `dwᵀ`
/// (when [`ConvGeom::dw_transposed`]). Per item, group and channel chunk, the
/// chunk's columns of `dw_g` (rows of `dwᵀ_g`) (+)= `dy[n, g] · col(chunk)ᵀ`.
fn grad_weight(kb: &mut Kb, g: &ConvGeom) {
    let e = kb.esz();
    let (x, dy, dw) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let scratch = (g.dw_scratch() > 0).then(|| kb.buffer(3));
    let col = (!g.pointwise()).then(|| scratch.expect("im2col needs scratch"));
    // dwᵀ[g] (K×Og) for every group, after col.
    let dwt = g.dw_transposed().then(|| {
        let s = scratch.expect("dwᵀ lives in scratch");
        kb.b.ins().iadd_imm_s(s, e * g.col_scratch() as i64)
    });
    let (k, p, og, taps) = (g.rows(), g.positions(), g.og(), g.kh * g.kw);
    let plane = e * (g.h * g.w) as i64;
    let (start, end) = (kb.start, kb.end);
    let (work, empty, done) = (
        kb.b.create_block(),
        kb.b.create_block(),
        kb.b.create_block(),
    );
    let some = kb.b.ins().icmp(IntCC::SignedLessThan, start, end);
    kb.b.ins().brif(some, work, &[], empty, &[]);

    kb.b.switch_to_block(empty);
    zero_span(kb, dw, 0, g.o * k);
    kb.b.ins().jump(done, &[]);

    kb.b.switch_to_block(work);
    if let Some(col) = col {
        im2col_padding(kb, g, col, g.chunk());
    }
    items_and_groups(
        kb,
        g,
        [x, dy, dwt.unwrap_or(dw)],
        &mut |kb, n, xg, dyg, cg| {
            // Overwrite for the first item of the range, accumulate after.
            let later = kb.b.ins().icmp(IntCC::NotEqual, n, start);
            let accumulate = kb.b.ins().uextend(types::I32, later);
            channel_chunks(kb, g, &mut |kb, c0, channels| {
                let xc = kb.offset(xg, c0, plane);
                // The chunk's rows of the im2col matrix: x's planes (pointwise)
                // or col.
                let (cols, ld) = match col {
                    None => (xc, g.h * g.w),
                    Some(col) => {
                        im2col(kb, g, xc, col, channels);
                        (col, g.ld())
                    }
                };
                let n_rows = channels * taps;
                if dwt.is_some() {
                    // Rows c0·KH·KW.. of dwᵀ_g (K×Og) (+)= col (·×P) · dy_gᵀ.
                    let c = kb.offset(cg, c0, e * (taps * og) as i64);
                    let a = Mat {
                        ptr: cols,
                        rs: ld,
                        cs: 1,
                    };
                    let b = Mat {
                        ptr: dyg,
                        rs: 1,
                        cs: p,
                    };
                    call_sgemm(kb, n_rows, og, p, a, b, c, og, accumulate);
                } else {
                    // Columns c0·KH·KW.. of dw_g (Og×K) (+)= dy_g · colᵀ.
                    let c = kb.offset(cg, c0, e * taps as i64);
                    let a = Mat {
                        ptr: dyg,
                        rs: p,
                        cs: 1,
                    };
                    let b = Mat {
                        ptr: cols,
                        rs: 1,
                        cs: ld,
                    };
                    call_sgemm(kb, og, n_rows, p, a, b, c, k, accumulate);
                }
            });
        },
        &mut |_, _, _| {},
    );
    if let Some(t) = dwt {
        // dw[g·Og + o, j] = dwᵀ[g][j, o], a row of dw at a time.
        let groups = Bound::Const(g.a.groups as i64);
        kb.for_range(Bound::Const(0), groups, 1, &[], |kb, gi, _| {
            let tg = kb.offset(t, gi, e * (k * og) as i64);
            let dwg = kb.offset(dw, gi, e * (og * k) as i64);
            kb.for_range(
                Bound::Const(0),
                Bound::Const(og as i64),
                1,
                &[],
                |kb, o, _| {
                    let src = kb.offset(tg, o, e);
                    let dst = kb.offset(dwg, o, e * k as i64);
                    span(kb, k, Pieces::Scalars, &mut |kb, ty, at| {
                        let (sp, so) = at.addr(kb, src, 0, og as i64);
                        let v = kb.load_out(ty, sp, so);
                        let (dp, doff) = at.addr(kb, dst, 0, 1);
                        kb.store(v, dp, doff);
                    });
                    vec![]
                },
            );
            vec![]
        });
    }
    kb.b.ins().jump(done, &[]);
    kb.b.switch_to_block(done);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_a_padded_3x3() {
        let r = runs(5, 5, 3, 1, 1, 1);
        assert_eq!(
            r,
            vec![
                Run {
                    o0: 0,
                    o1: 1,
                    k0: 1,
                    k1: 3
                },
                Run {
                    o0: 1,
                    o1: 4,
                    k0: 0,
                    k1: 3
                },
                Run {
                    o0: 4,
                    o1: 5,
                    k0: 0,
                    k1: 2
                },
            ]
        );
    }

    #[test]
    fn runs_cover_every_position_once() {
        for (n, k, s, p, d) in [(7, 3, 2, 2, 2), (1, 3, 1, 2, 1), (9, 5, 3, 0, 1)] {
            let out = crate::ir::window_out(n, k, s, p, d).unwrap();
            let r = runs(out, n, k, s, p, d);
            assert_eq!(r.first().unwrap().o0, 0);
            assert_eq!(r.last().unwrap().o1, out);
            for pair in r.windows(2) {
                assert_eq!(pair[0].o1, pair[1].o0);
            }
        }
    }

    fn same3(c: usize, o: usize, hw: usize, k: usize) -> ConvGeom {
        ConvGeom {
            c,
            h: hw,
            w: hw,
            o,
            kh: k,
            kw: k,
            oh: hw,
            ow: hw,
            a: ConvAttrs {
                stride: [1, 1],
                pad: [k / 2; 2],
                dilation: [1, 1],
                groups: 1,
            },
        }
    }

    #[test]
    fn weight_gradient_orientation() {
        // K = 9 < Og = 16, but the transposed result fills sgemm's tiles.
        assert!(same3(1, 16, 28, 3).dw_transposed());
        assert!(same3(3, 32, 32, 3).dw_transposed());
        assert!(same3(64, 64, 16, 3).dw_transposed());
        // Pointwise with K <= Og: dw = dy · colᵀ.
        assert!(!same3(32, 64, 32, 1).dw_transposed());
        assert!(!same3(128, 128, 16, 1).dw_transposed());
        assert_eq!(same3(32, 64, 32, 1).dw_scratch(), 0);
    }

    #[test]
    fn tap_ranges() {
        // 5 outputs of a 3-tap, pad-1 window over 5 inputs.
        assert_eq!(tap_range(5, 5, 0, 1, 1, 1), (1, 5));
        assert_eq!(tap_range(5, 5, 1, 1, 1, 1), (0, 5));
        assert_eq!(tap_range(5, 5, 2, 1, 1, 1), (0, 4));
        // Padding wider than the reach: no output reads inside.
        assert_eq!(tap_range(5, 1, 0, 1, 2, 1), (2, 3));
        assert_eq!(tap_range(3, 1, 0, 1, 2, 1), (2, 3));
        assert_eq!(tap_range(2, 1, 0, 1, 2, 1), (0, 0));
        // Stride 2, dilation 2.
        assert_eq!(tap_range(4, 7, 2, 2, 1, 2), (0, 2));
    }

    #[test]
    fn im2col_rows_avoid_512_byte_strides() {
        assert_eq!(same3(32, 32, 32, 3).ld(), 1040);
        assert_eq!(same3(16, 32, 14, 3).ld(), 196);
    }
}
