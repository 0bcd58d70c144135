//! Elementwise kernels: ReLU forward, the ReLU backward mask, and the bias add
//! over channels. Each walks the batch items of its work range; within an item the
//! element count is a constant, covered by an f32x4 loop unrolled four times, then
//! the remaining vectors and a scalar tail, all emitted straight-line.

use super::builder::{Bound, Kb, F32, F32X4};
use super::Emit;
use crate::ir::{Act, Graph, Node, Op, Shape};
use cranelift_codegen::ir::{InstBuilder, Type, Value};

/// The elementwise kernels; every shape includes the batch (axis 0).
#[derive(Clone, Debug, PartialEq)]
pub enum ElemKernel {
    /// `x → max(x, 0)`. Buffers: `x`, `y`.
    Relu { shape: Shape },
    /// `(dy, x) → dy where x > 0, else 0`. Buffers: `dy`, `x`, `dx`.
    ReluGrad { shape: Shape },
    /// `(x[N,C,…], b[C]) → x + b`. Buffers: `x`, `b`, `y`.
    BiasAdd { shape: Shape },
}

impl ElemKernel {
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<ElemKernel> {
        let shape = g.shape(node.inputs[0]).clone();
        Some(match &node.op {
            Op::Act(Act::Relu) => ElemKernel::Relu { shape },
            Op::ActGrad(Act::Relu) => ElemKernel::ReluGrad { shape },
            Op::BiasAdd if shape.len() >= 2 => ElemKernel::BiasAdd { shape },
            _ => return None,
        })
    }
}

impl Emit for ElemKernel {
    fn inputs(&self) -> Vec<Shape> {
        match self {
            ElemKernel::Relu { shape } => vec![shape.clone()],
            ElemKernel::ReluGrad { shape } => vec![shape.clone(), shape.clone()],
            ElemKernel::BiasAdd { shape } => vec![shape.clone(), vec![shape[1]]],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        match self {
            ElemKernel::Relu { shape }
            | ElemKernel::ReluGrad { shape }
            | ElemKernel::BiasAdd { shape } => vec![shape.clone()],
        }
    }

    fn flops_per_item(&self) -> u64 {
        self.inputs()[0][1..].iter().product::<usize>() as u64
    }

    fn validate(&self) -> Result<(), String> {
        let min_rank = match self {
            ElemKernel::Relu { .. } | ElemKernel::ReluGrad { .. } => 1,
            ElemKernel::BiasAdd { .. } => 2,
        };
        if self.inputs()[0].len() < min_rank {
            return Err(format!("{self:?} needs a tensor of rank >= {min_rank}"));
        }
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        match self {
            ElemKernel::Relu { shape } => relu(kb, item(shape)),
            ElemKernel::ReluGrad { shape } => relu_grad(kb, item(shape)),
            ElemKernel::BiasAdd { shape } => bias_add(kb, shape[1], shape[2..].iter().product()),
        }
    }
}

/// Elements per batch item.
fn item(shape: &Shape) -> usize {
    shape[1..].iter().product()
}

/// The body of an elementwise loop: one f32x4 or f32 (the `Type`) at a byte
/// offset from each buffer pointer.
type PerVector<'f> = dyn FnMut(&mut Kb, Type, &[Value], i64) + 'f;

/// Vectors per iteration of the unrolled main loop.
const UNROLL: usize = 4;

/// Emits `f` over `len` consecutive f32 elements starting at byte pointers
/// `ptrs` (one per buffer, all advancing together): the unrolled vector loop, the
/// leftover vectors, then scalars. `f(kb, ty, ptrs, byte_offset)` handles one
/// f32x4 or f32 at `byte_offset` from each pointer.
fn over_elements(kb: &mut Kb, ptrs: &[Value], len: usize, f: &mut PerVector) {
    let block = 4 * UNROLL;
    let full = len / block;
    if full > 0 {
        let ptrs_owned = ptrs.to_vec();
        kb.for_range(
            Bound::Const(0),
            Bound::Const((full * block) as i64),
            block as i64,
            &[],
            |kb, i, _| {
                let here: Vec<Value> = ptrs_owned.iter().map(|&p| kb.offset(p, i, 4)).collect();
                for u in 0..UNROLL {
                    f(kb, F32X4, &here, 16 * u as i64);
                }
                vec![]
            },
        );
    }
    let mut at = full * block;
    while at + 4 <= len {
        f(kb, F32X4, ptrs, 4 * at as i64);
        at += 4;
    }
    while at < len {
        f(kb, F32, ptrs, 4 * at as i64);
        at += 1;
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

/// `y[n, c, …] = x[n, c, …] + b[c]` over `[batch, channels, inner]`.
/// Buffers: `x`, `b`, `y`.
fn bias_add(kb: &mut Kb, channels: usize, inner: usize) {
    let (x, b, y) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let (start, end) = (kb.start, kb.end);
    let item = (channels * inner) as i64;
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, 4 * item);
        let yn = kb.offset(y, n, 4 * item);
        kb.for_range(
            Bound::Const(0),
            Bound::Const(channels as i64),
            1,
            &[],
            |kb, c, _| {
                let xc = kb.offset(xn, c, 4 * inner as i64);
                let yc = kb.offset(yn, c, 4 * inner as i64);
                let bc = kb.offset(b, c, 4);
                let bias = kb.load_in(F32, bc, 0);
                let bias4 = kb.splat(F32X4, bias);
                over_elements(kb, &[xc, yc], inner, &mut |kb, ty, p, off| {
                    let v = kb.load_in(ty, p[0], off);
                    let bv = if ty == F32 { bias } else { bias4 };
                    let r = kb.b.ins().fadd(v, bv);
                    kb.store(r, p[1], off);
                });
                vec![]
            },
        );
        vec![]
    });
}

/// Runs `f` over the `item` elements of each batch item in the work range; every
/// buffer holds `item` f32 per batch item.
fn per_item(kb: &mut Kb, item: usize, bufs: &[Value], f: &mut PerVector) {
    let (start, end) = (kb.start, kb.end);
    let bufs = bufs.to_vec();
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let here: Vec<Value> = bufs
            .iter()
            .map(|&p| kb.offset(p, n, 4 * item as i64))
            .collect();
        over_elements(kb, &here, item, f);
        vec![]
    });
}
