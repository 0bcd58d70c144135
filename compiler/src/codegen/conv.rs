//! Direct conv2d forward (NCHW, f32) with every shape baked in: any stride,
//! padding, dilation and groups.
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

use super::builder::{Bound, Kb, F32, F32X4};
use super::Emit;
use crate::ir::{ConvAttrs, Graph, Node, Op, Shape};
use cranelift_codegen::ir::{Type, Value};

/// The convolution kernels.
#[derive(Clone, Debug, PartialEq)]
pub enum ConvKernel {
    /// Direct conv2d forward: `(x[N,C,H,W], w[O,C/g,KH,KW]) → y[N,O,OH,OW]`.
    /// Buffers: `x`, `w`, `y`.
    Direct {
        x: Shape,
        w: Shape,
        attrs: ConvAttrs,
    },
}

impl ConvKernel {
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<ConvKernel> {
        let shape = |i: usize| g.shape(node.inputs[i]).clone();
        Some(match &node.op {
            Op::Conv2d(a) => ConvKernel::Direct {
                x: shape(0),
                w: shape(1),
                attrs: *a,
            },
            _ => return None,
        })
    }
}

impl Emit for ConvKernel {
    fn inputs(&self) -> Vec<Shape> {
        match self {
            ConvKernel::Direct { x, w, .. } => vec![x.clone(), w.clone()],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        match self {
            ConvKernel::Direct { x, w, attrs } => Op::Conv2d(*attrs)
                .infer(&[x, w])
                .expect("validated when compiled"),
        }
    }

    fn flops_per_item(&self) -> u64 {
        match self {
            ConvKernel::Direct { w, .. } => {
                let y = &self.outputs()[0];
                2 * (y[1] * y[2] * y[3] * w[1] * w[2] * w[3]) as u64
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            ConvKernel::Direct { x, w, attrs } => {
                if x.len() != 4 || w.len() != 4 {
                    return Err(format!("conv2d needs rank-4 x and w, got {x:?}, {w:?}"));
                }
                Op::Conv2d(*attrs).infer(&[x, w])?;
                Ok(())
            }
        }
    }

    fn emit(&self, kb: &mut Kb) {
        match self {
            ConvKernel::Direct { x, w, attrs } => {
                let y = &self.outputs()[0];
                let geo = ConvGeom {
                    c: x[1],
                    h: x[2],
                    w: x[3],
                    o: w[0],
                    kh: w[2],
                    kw: w[3],
                    oh: y[2],
                    ow: y[3],
                    a: *attrs,
                };
                conv2d(kb, &geo)
            }
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

/// conv2d forward. Buffers: `x[N,C,H,W]`, `w[O,C/g,KH,KW]`, `y[N,O,OH,OW]`.
fn conv2d(kb: &mut Kb, geo: &ConvGeom) {
    let (x, w, y) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let g = *geo;
    let (cg, og) = (g.cg(), g.og());
    let x_item = (g.c * g.h * g.w * 4) as i64;
    let y_item = (g.o * g.oh * g.ow * 4) as i64;
    let taps = (cg * g.kh * g.kw * 4) as i64;
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
                let xg = kb.offset(xn, gi, (cg * g.h * g.w * 4) as i64);
                let wg = kb.offset(w, gi, og as i64 * taps);
                let yg = kb.offset(yn, gi, (og * g.oh * g.ow * 4) as i64);
                let full = og / OB * OB;
                let block = |kb: &mut Kb, ob: Value, nb: usize| {
                    let bases = Bases {
                        x: xg,
                        w: kb.offset(wg, ob, taps),
                        y: kb.offset(yg, ob, (g.oh * g.ow * 4) as i64),
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
        (F32X4, 4)
    } else {
        (F32, 1)
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
        emit_tile(kb, g, b, nb, oh, ow, F32, c.o1 - at, r, c);
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
    let (sh, sw) = (g.a.stride[0] as i64, g.a.stride[1] as i64);
    let (ph, pw) = (g.a.pad[0] as i64, g.a.pad[1] as i64);
    let (dh, dw) = (g.a.dilation[0] as i64, g.a.dilation[1] as i64);
    let (h, w) = (g.h as i64, g.w as i64);
    let (kh, kw) = (g.kh as i64, g.kw as i64);
    let cg = g.cg() as i64;
    // Byte distance between the inputs of neighbouring vectors / scalar lanes.
    let lane_step = if ty == F32X4 { 16 } else { 4 * sw };
    // x[c=0, oh*sh, ow*sw] (before padding and tap offsets, which are constants).
    let xr = kb.offset(b.x, oh, 4 * sh * w);
    let xr = kb.offset(xr, ow, 4 * sw);
    let zero = kb.zero(ty);
    let init = vec![zero; nb * nv];
    let acc = if r.k0 < r.k1 && c.k0 < c.k1 {
        kb.for_range(
            Bound::Const(0),
            Bound::Const(cg),
            1,
            &init,
            |kb, ci, acc| {
                let xc = kb.offset(xr, ci, 4 * h * w);
                let wc = kb.offset(b.w, ci, 4 * kh * kw);
                let mut acc = acc.to_vec();
                for tkh in r.k0 as i64..r.k1 as i64 {
                    for tkw in c.k0 as i64..c.k1 as i64 {
                        let xoff = 4 * ((tkh * dh - ph) * w + tkw * dw - pw);
                        let xs: Vec<Value> = (0..nv as i64)
                            .map(|v| kb.load_in(ty, xc, xoff + v * lane_step))
                            .collect();
                        for o in 0..nb {
                            let woff = 4 * (o as i64 * cg * kh * kw + tkh * kw + tkw);
                            let ws = kb.load_in(F32, wc, woff);
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
    let yr = kb.offset(b.y, oh, 4 * g.ow as i64);
    let yr = kb.offset(yr, ow, 4);
    let plane = 4 * (g.oh * g.ow) as i64;
    let store_step = if ty == F32X4 { 16 } else { 4 };
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
}
