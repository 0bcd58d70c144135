//! Elementwise kernels: ReLU and leaky ReLU with their backward masks, the n-way
//! add, the bias add with an optional fused ReLU (the linear/conv epilogue), the
//! bias gradient (a reduction over the batch) and the plain copy. Each walks the
//! batch items of its work range; within an item the element count is a constant,
//! covered by a vector loop (f32x4, or f64x2 in f64) unrolled four times, then the
//! remaining vectors and a scalar tail, all emitted straight-line.
//!
//! Every kernel rounds as the interpreter does per element (the same operations
//! in the same order), except the bias gradient, whose sums are taken in another
//! order (f32x4 partial sums, then the lanes).

use super::builder::{Bound, Kb};
use super::{Emit, Par};
use crate::ir::{Act, Graph, Node, Op, Shape};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};

/// The elementwise kernels; every shape includes the batch (axis 0).
#[derive(Clone, Debug, PartialEq)]
pub enum ElemKernel {
    /// `x → max(x, 0)` (NaN → 0). Buffers: `x`, `y`.
    Relu { shape: Shape },
    /// `(dy, x) → dy where x > 0, else 0`. Buffers: `dy`, `x`, `dx`.
    ReluGrad { shape: Shape },
    /// `x → x > 0 ? x : slope·x` (NaN stays NaN). Buffers: `x`, `y`.
    LeakyRelu { shape: Shape, slope: f64 },
    /// `(dy, x) → x > 0 ? dy : dy·slope` (NaN in `x` takes the slope).
    /// Buffers: `dy`, `x`, `dx`.
    LeakyReluGrad { shape: Shape, slope: f64 },
    /// `(x[N,C,…], b[C]) → x + b`, then `max(·, 0)` when `relu` (the fused
    /// linear/conv epilogue; `Op::BiasAdd` is `relu: false`). Buffers: `x`, `b`, `y`.
    BiasAct { shape: Shape, relu: bool },
    /// `dy[N,C,…] → db[C]`, the sum over the batch and the inner axes
    /// ([`Par::Reduce`]: a call writes the partial sum over its items).
    /// Buffers: `dy`, `db`.
    BiasGrad { shape: Shape },
    /// `(x₀, …, xₙ₋₁) → x₀ + x₁ + … + xₙ₋₁` (added left to right), `n ≥ 2` inputs
    /// of one shape. Buffers: the `n` inputs, `y`.
    Add { shape: Shape, n: usize },
    /// `x → x` (`Op::StopGradient`; the planner's copy for a reshape it cannot
    /// alias, with `shape` the input's: the elements are the same).
    /// Buffers: `x`, `y`.
    Copy { shape: Shape },
}

impl ElemKernel {
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<ElemKernel> {
        let shape = g.shape(node.inputs[0]).clone();
        let rank2 = shape.len() >= 2;
        Some(match &node.op {
            Op::Act(Act::Relu) => ElemKernel::Relu { shape },
            Op::ActGrad(Act::Relu) => ElemKernel::ReluGrad { shape },
            Op::Act(Act::LeakyRelu(slope)) => ElemKernel::LeakyRelu {
                shape,
                slope: *slope,
            },
            Op::ActGrad(Act::LeakyRelu(slope)) => ElemKernel::LeakyReluGrad {
                shape,
                slope: *slope,
            },
            Op::BiasAdd if rank2 => ElemKernel::BiasAct { shape, relu: false },
            Op::BiasGrad if rank2 => ElemKernel::BiasGrad { shape },
            Op::Add if node.inputs.len() >= 2 => ElemKernel::Add {
                shape,
                n: node.inputs.len(),
            },
            Op::StopGradient => ElemKernel::Copy { shape },
            _ => return None,
        })
    }

    fn shape(&self) -> &Shape {
        match self {
            ElemKernel::Relu { shape }
            | ElemKernel::ReluGrad { shape }
            | ElemKernel::LeakyRelu { shape, .. }
            | ElemKernel::LeakyReluGrad { shape, .. }
            | ElemKernel::BiasAct { shape, .. }
            | ElemKernel::BiasGrad { shape }
            | ElemKernel::Add { shape, .. }
            | ElemKernel::Copy { shape } => shape,
        }
    }
}

impl Emit for ElemKernel {
    fn inputs(&self) -> Vec<Shape> {
        let shape = self.shape().clone();
        match self {
            ElemKernel::Relu { .. }
            | ElemKernel::LeakyRelu { .. }
            | ElemKernel::BiasGrad { .. }
            | ElemKernel::Copy { .. } => vec![shape],
            ElemKernel::ReluGrad { .. } | ElemKernel::LeakyReluGrad { .. } => {
                vec![shape.clone(), shape]
            }
            ElemKernel::BiasAct { .. } => {
                let c = shape[1];
                vec![shape, vec![c]]
            }
            ElemKernel::Add { n, .. } => vec![shape; *n],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        match self {
            ElemKernel::BiasGrad { shape } => vec![vec![shape[1]]],
            _ => vec![self.shape().clone()],
        }
    }

    fn par(&self) -> Par {
        match self {
            ElemKernel::BiasGrad { .. } => Par::Reduce,
            _ => Par::Items,
        }
    }

    fn flops_per_item(&self) -> u64 {
        let item = item(self.shape()) as u64;
        match self {
            ElemKernel::Copy { .. } => 0,
            ElemKernel::BiasAct { relu: true, .. } => 2 * item,
            ElemKernel::Add { n, .. } => (*n as u64 - 1) * item,
            _ => item,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let min_rank = match self {
            ElemKernel::BiasAct { .. } | ElemKernel::BiasGrad { .. } => 2,
            _ => 1,
        };
        if self.shape().len() < min_rank {
            return Err(format!("{self:?} needs a tensor of rank >= {min_rank}"));
        }
        if let ElemKernel::Add { n, .. } = self {
            if *n < 2 {
                return Err(format!("{self:?}: add takes at least 2 inputs"));
            }
        }
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        let shape = self.shape();
        match self {
            ElemKernel::Relu { .. } => relu(kb, item(shape)),
            ElemKernel::ReluGrad { .. } => relu_grad(kb, item(shape)),
            ElemKernel::LeakyRelu { slope, .. } => leaky_relu(kb, item(shape), *slope),
            ElemKernel::LeakyReluGrad { slope, .. } => leaky_relu_grad(kb, item(shape), *slope),
            ElemKernel::BiasAct { relu, .. } => {
                bias_act(kb, shape[1], shape[2..].iter().product(), *relu)
            }
            ElemKernel::BiasGrad { .. } => bias_grad(kb, shape[1], shape[2..].iter().product()),
            ElemKernel::Add { n, .. } => add(kb, item(shape), *n),
            ElemKernel::Copy { .. } => copy(kb, item(shape)),
        }
    }
}

/// Elements per batch item.
fn item(shape: &Shape) -> usize {
    shape[1..].iter().product()
}

/// The body of an elementwise loop: one vector or scalar of the element type
/// (the `Type`) at a byte offset from each buffer pointer.
pub(crate) type PerVector<'f> = dyn FnMut(&mut Kb, Type, &[Value], i64) + 'f;

/// Vectors per iteration of the unrolled main loop.
const UNROLL: usize = 4;

/// Emits `f` over `len` consecutive elements starting at byte pointers
/// `ptrs` (one per buffer, all advancing together): the unrolled vector loop, the
/// leftover vectors, then scalars. `f(kb, ty, ptrs, byte_offset)` handles one
/// vector or scalar at `byte_offset` from each pointer.
pub(crate) fn over_elements(kb: &mut Kb, ptrs: &[Value], len: usize, f: &mut PerVector) {
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let vb = 16;
    let block = lanes * UNROLL;
    let full = len / block;
    if full > 0 {
        let ptrs_owned = ptrs.to_vec();
        kb.for_range(
            Bound::Const(0),
            Bound::Const((full * block) as i64),
            block as i64,
            &[],
            |kb, i, _| {
                let here: Vec<Value> = ptrs_owned.iter().map(|&p| kb.offset(p, i, e)).collect();
                for u in 0..UNROLL {
                    f(kb, vt, &here, vb * u as i64);
                }
                vec![]
            },
        );
    }
    let mut at = full * block;
    while at + lanes <= len {
        f(kb, vt, ptrs, e * at as i64);
        at += lanes;
    }
    while at < len {
        f(kb, st, ptrs, e * at as i64);
        at += 1;
    }
}

/// Vector accumulators a sum of `len` elements uses (the rest is one scalar).
fn sum_vectors(kb: &Kb, len: usize) -> usize {
    (len / kb.lanes()).min(UNROLL)
}

/// Zeroed accumulators for [`sum_elements`] over runs of `len` elements:
/// [`sum_vectors`]`(len)` vectors, then one scalar when `len` is not a multiple
/// of the lanes.
pub(crate) fn sum_init(kb: &mut Kb, len: usize) -> Vec<Value> {
    let (vt, st) = (kb.vty(), kb.sty());
    let zv = kb.zero(vt);
    let zs = kb.zero(st);
    let mut acc = vec![zv; sum_vectors(kb, len)];
    if !len.is_multiple_of(kb.lanes()) {
        acc.push(zs);
    }
    acc
}

/// Adds the `len` consecutive elements at `ptr` (an input) into the
/// accumulators of [`sum_init`]`(len)` and returns them: an unrolled vector
/// loop, the leftover vectors and the scalar tail, straight-line.
pub(crate) fn sum_elements(kb: &mut Kb, ptr: Value, len: usize, acc: &[Value]) -> Vec<Value> {
    let nv = sum_vectors(kb, len);
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let mut acc = acc.to_vec();
    let block = lanes * UNROLL;
    let full = len / block;
    if full > 0 {
        let vecs = acc[..UNROLL].to_vec();
        let out = kb.for_range(
            Bound::Const(0),
            Bound::Const((full * block) as i64),
            block as i64,
            &vecs,
            |kb, i, a| {
                let p = kb.offset(ptr, i, e);
                (0..UNROLL)
                    .map(|u| {
                        let v = kb.load_in(vt, p, 16 * u as i64);
                        kb.b.ins().fadd(a[u], v)
                    })
                    .collect()
            },
        );
        acc[..UNROLL].copy_from_slice(&out);
    }
    let mut at = full * block;
    let mut u = 0;
    while at + lanes <= len {
        let v = kb.load_in(vt, ptr, e * at as i64);
        acc[u] = kb.b.ins().fadd(acc[u], v);
        u += 1;
        at += lanes;
    }
    while at < len {
        let v = kb.load_in(st, ptr, e * at as i64);
        acc[nv] = kb.b.ins().fadd(acc[nv], v);
        at += 1;
    }
    acc
}

/// The total of [`sum_elements`]' accumulators: the vectors added pairwise, the
/// lanes (`extractlane`) pairwise, then the scalar.
pub(crate) fn sum_finish(kb: &mut Kb, len: usize, acc: &[Value]) -> Value {
    let nv = sum_vectors(kb, len);
    let mut total = None;
    if nv > 0 {
        let v = tree(kb, acc[..nv].to_vec());
        let lanes: Vec<Value> = (0..kb.lanes() as u8)
            .map(|l| kb.b.ins().extractlane(v, l))
            .collect();
        total = Some(tree(kb, lanes));
    }
    if nv < acc.len() {
        total = Some(match total {
            Some(t) => kb.b.ins().fadd(t, acc[nv]),
            None => acc[nv],
        });
    }
    let st = kb.sty();
    total.unwrap_or_else(|| kb.zero(st))
}

/// The sum of `v` (non-empty) as a balanced tree of adds.
fn tree(kb: &mut Kb, mut v: Vec<Value>) -> Value {
    while v.len() > 1 {
        v = v
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    kb.b.ins().fadd(p[0], p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    v[0]
}

/// `x > 0 ? a : b` per lane, branch-free (NaN in `x` selects `b`); `ty` is the
/// type of `x`, `a` and `b`.
fn select_positive(kb: &mut Kb, ty: Type, x: Value, a: Value, b: Value) -> Value {
    let zero = kb.zero(ty);
    let gt = kb.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
    if !ty.is_vector() {
        kb.b.ins().select(gt, a, b)
    } else {
        let mask = kb.b.ins().bitcast(ty, MemFlagsData::new(), gt);
        kb.b.ins().bitselect(mask, a, b)
    }
}

/// `y = max(x, 0)` (NaN → 0, as the interpreter) over `[batch, item]` tensors.
/// Buffers: `x`, `y`.
fn relu(kb: &mut Kb, item: usize) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    per_item(kb, item, &[x, y], &mut |kb, ty, p, off| {
        let v = kb.load_in(ty, p[0], off);
        let r = kb.where_positive(ty, v, v);
        kb.store(r, p[1], off);
    });
}

/// `dx = dy where x > 0, else 0`. Buffers: `dy`, `x`, `dx`.
fn relu_grad(kb: &mut Kb, item: usize) {
    let ptrs = [kb.buffer(0), kb.buffer(1), kb.buffer(2)];
    per_item(kb, item, &ptrs, &mut |kb, ty, p, off| {
        let dy = kb.load_in(ty, p[0], off);
        let x = kb.load_in(ty, p[1], off);
        let r = kb.where_positive(ty, x, dy);
        kb.store(r, p[2], off);
    });
}

/// `y = x > 0 ? x : x·slope`. Buffers: `x`, `y`.
fn leaky_relu(kb: &mut Kb, item: usize, slope: f64) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    per_item(kb, item, &[x, y], &mut |kb, ty, p, off| {
        let v = kb.load_in(ty, p[0], off);
        let s = kb.real(ty, slope);
        let scaled = kb.b.ins().fmul(v, s);
        let r = select_positive(kb, ty, v, v, scaled);
        kb.store(r, p[1], off);
    });
}

/// `dx = x > 0 ? dy : dy·slope`. Buffers: `dy`, `x`, `dx`.
fn leaky_relu_grad(kb: &mut Kb, item: usize, slope: f64) {
    let ptrs = [kb.buffer(0), kb.buffer(1), kb.buffer(2)];
    per_item(kb, item, &ptrs, &mut |kb, ty, p, off| {
        let dy = kb.load_in(ty, p[0], off);
        let x = kb.load_in(ty, p[1], off);
        let s = kb.real(ty, slope);
        let scaled = kb.b.ins().fmul(dy, s);
        let r = select_positive(kb, ty, x, dy, scaled);
        kb.store(r, p[2], off);
    });
}

/// `y = x₀ + x₁ + …` (left to right). Buffers: the `n` inputs, `y`.
fn add(kb: &mut Kb, item: usize, n: usize) {
    let ptrs: Vec<Value> = (0..=n).map(|i| kb.buffer(i)).collect();
    per_item(kb, item, &ptrs, &mut |kb, ty, p, off| {
        let mut acc = kb.load_in(ty, p[0], off);
        for &pi in &p[1..n] {
            let v = kb.load_in(ty, pi, off);
            acc = kb.b.ins().fadd(acc, v);
        }
        kb.store(acc, p[n], off);
    });
}

/// `y = x`. Buffers: `x`, `y`.
fn copy(kb: &mut Kb, item: usize) {
    let (x, y) = (kb.buffer(0), kb.buffer(1));
    per_item(kb, item, &[x, y], &mut |kb, ty, p, off| {
        let v = kb.load_in(ty, p[0], off);
        kb.store(v, p[1], off);
    });
}

/// `y[n, c, …] = x[n, c, …] + b[c]`, then `max(·, 0)` when `relu`, over
/// `[batch, channels, inner]`. Buffers: `x`, `b`, `y`.
fn bias_act(kb: &mut Kb, channels: usize, inner: usize, relu: bool) {
    let (x, b, y) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let (start, end) = (kb.start, kb.end);
    let item = (channels * inner) as i64;
    let (e, vt, st) = (kb.esz(), kb.vty(), kb.sty());
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, e * item);
        let yn = kb.offset(y, n, e * item);
        kb.for_range(
            Bound::Const(0),
            Bound::Const(channels as i64),
            1,
            &[],
            |kb, c, _| {
                let xc = kb.offset(xn, c, e * inner as i64);
                let yc = kb.offset(yn, c, e * inner as i64);
                let bc = kb.offset(b, c, e);
                let bias = kb.load_in(st, bc, 0);
                let bias4 = kb.splat(vt, bias);
                over_elements(kb, &[xc, yc], inner, &mut |kb, ty, p, off| {
                    let v = kb.load_in(ty, p[0], off);
                    let bv = if !ty.is_vector() { bias } else { bias4 };
                    let mut r = kb.b.ins().fadd(v, bv);
                    if relu {
                        r = kb.where_positive(ty, r, r);
                    }
                    kb.store(r, p[1], off);
                });
                vec![]
            },
        );
        vec![]
    });
}

/// `db[c] = Σ_{n in start..end} Σ_i dy[n, c, i]` over `[batch, channels, inner]`.
/// Buffers: `dy`, `db`.
///
/// With `inner > 1` each channel's sum runs over the items with f32x4
/// accumulators along `inner`; with `inner == 1` (`[N, C]`, a linear layer's
/// bias) the accumulators run along the channels instead.
fn bias_grad(kb: &mut Kb, channels: usize, inner: usize) {
    let (dy, db) = (kb.buffer(0), kb.buffer(1));
    let (start, end) = (kb.start, kb.end);
    let e = kb.esz();
    let item = e * (channels * inner) as i64;
    if inner == 1 {
        return column_sums(kb, dy, db, channels);
    }
    kb.for_range(
        Bound::Const(0),
        Bound::Const(channels as i64),
        1,
        &[],
        |kb, c, _| {
            let dyc = kb.offset(dy, c, e * inner as i64);
            let init = sum_init(kb, inner);
            let acc = kb.for_range(Bound::Val(start), Bound::Val(end), 1, &init, |kb, n, a| {
                let p = kb.offset(dyc, n, item);
                sum_elements(kb, p, inner, a)
            });
            let total = sum_finish(kb, inner, &acc);
            let dbc = kb.offset(db, c, e);
            kb.store(total, dbc, 0);
            vec![]
        },
    );
}

/// `db[c] = Σ_{n in start..end} dy[n, c]` for `dy[N, C]`: blocks of `UNROLL`
/// vector columns in a loop, then the leftover vectors and the scalar columns,
/// each block summing down the rows.
fn column_sums(kb: &mut Kb, dy: Value, db: Value, channels: usize) {
    let (start, end) = (kb.start, kb.end);
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let row = e * channels as i64;
    // Sums `nv` columns of type `ty` starting at byte `col` of `base`.
    let block = |kb: &mut Kb, base_dy: Value, base_db: Value, col: i64, ty: Type, nv: usize| {
        let step = if ty.is_vector() { 16 } else { e };
        let z = kb.zero(ty);
        let init = vec![z; nv];
        let acc = kb.for_range(Bound::Val(start), Bound::Val(end), 1, &init, |kb, n, a| {
            let p = kb.offset(base_dy, n, row);
            (0..nv)
                .map(|v| {
                    let x = kb.load_in(ty, p, col + v as i64 * step);
                    kb.b.ins().fadd(a[v], x)
                })
                .collect()
        });
        for (v, &a) in acc.iter().enumerate() {
            kb.store(a, base_db, col + v as i64 * step);
        }
    };
    let cols = lanes * UNROLL;
    let full = channels / cols * cols;
    kb.for_range(
        Bound::Const(0),
        Bound::Const(full as i64),
        cols as i64,
        &[],
        |kb, c, _| {
            let pdy = kb.offset(dy, c, e);
            let pdb = kb.offset(db, c, e);
            block(kb, pdy, pdb, 0, vt, UNROLL);
            vec![]
        },
    );
    let vecs = (channels - full) / lanes;
    if vecs > 0 {
        block(kb, dy, db, e * full as i64, vt, vecs);
    }
    let at = full + lanes * vecs;
    if at < channels {
        block(kb, dy, db, e * at as i64, st, channels - at);
    }
}

/// Runs `f` over the `item` elements of each batch item in the work range; every
/// buffer holds `item` elements per batch item.
fn per_item(kb: &mut Kb, item: usize, bufs: &[Value], f: &mut PerVector) {
    let (start, end) = (kb.start, kb.end);
    let e = kb.esz();
    let bufs = bufs.to_vec();
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let here: Vec<Value> = bufs
            .iter()
            .map(|&p| kb.offset(p, n, e * item as i64))
            .collect();
        over_elements(kb, &here, item, f);
        vec![]
    });
}
