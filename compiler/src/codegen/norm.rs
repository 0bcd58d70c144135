//! Batch-normalisation kernels: the batch statistics, the normalisation
//! (training and inference, optionally fused with the ReLU after it), its
//! gradients, and the running-statistics update.
//!
//! Every `shape` is the normalised tensor's, `[N, C]` or `[N, C, H, W]`; per-channel
//! buffers are `[C]`; `cnt = N·H·W` is the number of elements per channel over the
//! *whole* batch (also in a kernel that computes only a part of it).
//!
//! # Composing the IR ops (for the planner)
//!
//! `BatchNorm{eps}` `(x, gamma, beta) → (y, mean, var)`, with `s`, `q` two `[C]`
//! temporaries, is four kernels run in order:
//!
//! 1. [`NormKernel::BnSum`] `x → s` (reduce);
//! 2. [`NormKernel::BnSqDev`] `(x, s) → q` (reduce; `s` must be the sum over the
//!    whole batch, so the partials of step 1 are added before it runs);
//! 3. [`NormKernel::BnStats`] `(s, q) → (mean, var)` (once);
//! 4. [`NormKernel::BnApply`] `(x, gamma, beta, mean, var) → y` (items), with
//!    `relu: true` when a sole `Act(Relu)` user is fused (then `y` is its output).
//!
//! When `x` comes from an im2col + GEMM conv (plan rule 5), steps 1-3 are
//! instead the conv epilogue writing per-item partials `s`, `q` (`[N, C]`, see
//! [`row_moments`]) and [`NormKernel::BnCombine`] `(s, q) → (mean, var)` (once):
//! no pass over `x` before the apply.
//!
//! `BatchNormGrad{eps}` `(dy, x, gamma, mean, var) → (dx, dgamma, dbeta)` is two:
//!
//! 1. [`NormKernel::BnGradSums`] `(dy, x, mean, var) → (dgamma, dbeta)` (reduce);
//! 2. [`NormKernel::BnGradApply`] `(dy, x, gamma, mean, var, dgamma, dbeta) → dx`
//!    (items; `dgamma`, `dbeta` are the sums over the whole batch).
//!
//! With an `ActGrad(Relu)` producing the `dy` fused (`relu: true`), both take
//! that op's incoming gradient as `dy` and the ReLU's *output* as an extra last
//! input; `dy` counts where that output is `> 0`. Both kernels read the same
//! `eps` and `relu`, and `mean`, `var` are the forward's batch statistics.
//!
//! `BatchNormInfer` is `BnApply` over the running statistics,
//! `BatchNormInferGrad` is [`NormKernel::BnInferGrad`], `RunningStats` is
//! [`NormKernel::RunningStats`] (all three from [`NormKernel::from_node`]).
//!
//! # Loops
//!
//! Channels outermost (constant bounds), so each channel's constants (mean,
//! `gamma/sqrt(var+eps)`, …) are computed once per call and channel (see
//! [`pin`] for what that takes with Cranelift's egraph); inside, the batch items
//! of the work range, and then the channel's `H·W` contiguous elements as an f32x4
//! loop unrolled ×4 (one accumulator per unrolled vector in reductions), the
//! leftover vectors and a scalar tail, straight-line. A reduction's f32x4
//! accumulators are added and summed horizontally once per channel.
//!
//! When `H·W = 1` (`[N, C]` after a linear layer) the vectors run across
//! channels instead: blocks of 16 channels (one cache line of every buffer per
//! item; measured 3-5× faster than blocks of 4 at `[256, 512]`, whose 2 KiB
//! stride made each block fetch every line again), then one block of the
//! remaining whole vectors and one of the last `C mod 4` channels in f32, with
//! the per-channel constants loaded as vectors.
//!
//! Accuracy: the variance is two-pass (squared deviations from the mean), never
//! `E[x²] − E[x]²` (from partials: each item's deviations from a shift inside
//! the item, plus the between-item term, see [`NormKernel::BnCombine`]); sums accumulate in f32 over 16 lanes (each summing about
//! `cnt/16` terms; `N` terms when `H·W = 1`), which is closer to the exact sums
//! than the interpreter's one sequential f32 sum: at `cnt` = 50 176 and data
//! `2 ± 1`, the mean is off by 1.7e-7 (interpreter: 8.7e-6) from the f64
//! interpreter, so f64 accumulation is not needed (`tests/jit_norm.rs`,
//! `large_batches_are_accurate`).
//!
//! In f64 the same loops run on f64x2 (two channels at a time when `H·W = 1`).

use super::builder::{Bound, Kb, I64};
use super::DType;
use super::{Emit, Par};
use crate::ir::{Graph, Node, Op, Shape};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Type, Value};

/// The batch-norm kernels (see the module doc for how they compose).
#[derive(Clone, Debug, PartialEq)]
pub enum NormKernel {
    /// [`Par::Reduce`]: `x → s[c] = Σ_{n,h,w} x[n,c,h,w]`. Buffers: `x`, `s`.
    BnSum { shape: Shape },
    /// [`Par::Reduce`]: `(x, s) → q[c] = Σ_{n,h,w} (x[n,c,h,w] − s[c]/cnt)²`,
    /// where `s` is [`NormKernel::BnSum`] over the whole batch.
    /// Buffers: `x`, `s`, `q`.
    BnSqDev { shape: Shape },
    /// [`Par::Whole`]: `(s, q) → (mean = s/cnt, var = q/cnt)` (biased variance).
    /// Buffers: `s`, `q`, `mean`, `var` (all `[C]`; `shape` is `x`'s).
    BnStats { shape: Shape },
    /// [`Par::Whole`]: `(s, q) → (mean, var)` from per-item partials `s[n, c] =
    /// Σ_{h,w} x[n,c,h,w]` and `q[n, c] = Σ_{h,w} (x[n,c,h,w] − s[n,c]/(H·W))²`
    /// (each item's squared deviations from its own mean; the conv epilogue
    /// writes them, see [`row_moments`]): `mean = Σ_n s/cnt`, `var = (Σ_n q +
    /// Σ_n (s − H·W·m)²/(H·W))/cnt` with `m = Σ_n s/cnt` (the between-item term
    /// of the two-pass variance). Buffers: `s`, `q` (`[N, C]`), `mean`, `var`.
    BnCombine { shape: Shape },
    /// [`Par::Items`]: `y = (x − mean)·gamma/sqrt(var + eps) + beta`, then
    /// `max(y, 0)` (NaN → 0) when `relu`. Training (batch statistics) and
    /// inference (`BatchNormInfer`: running statistics) alike.
    /// Buffers: `x`, `gamma`, `beta`, `mean`, `var`, `y`.
    BnApply { shape: Shape, eps: f64, relu: bool },
    /// [`Par::Reduce`]: `dgamma[c] = Σ dy'·x̂`, `dbeta[c] = Σ dy'`, with
    /// `x̂ = (x − mean)/sqrt(var + eps)` and `dy' = dy`, or with `relu`,
    /// `dy' = dy where y > 0, else 0` (`y` the ReLU's output).
    /// Buffers: `dy`, `x`, `mean`, `var`, [`y`,] `dgamma`, `dbeta`.
    BnGradSums { shape: Shape, eps: f64, relu: bool },
    /// [`Par::Items`]: `dx = gamma/sqrt(var + eps)·(dy' − dbeta/cnt − x̂·dgamma/cnt)`
    /// (`dy'`, `x̂` as in [`NormKernel::BnGradSums`]; `dgamma`, `dbeta` its sums over
    /// the whole batch). Buffers: `dy`, `x`, `gamma`, `mean`, `var`, `dgamma`,
    /// `dbeta`, [`y`,] `dx`.
    BnGradApply { shape: Shape, eps: f64, relu: bool },
    /// [`Par::Items`]: `dx = dy·gamma/sqrt(running_var + eps)` (`BatchNormInferGrad`).
    /// Buffers: `dy`, `gamma`, `running_var`, `dx`.
    BnInferGrad { shape: Shape, eps: f64 },
    /// [`Par::Whole`]: `rm' = (1 − m)·rm + m·mean`,
    /// `rv' = (1 − m)·rv + m·var·n/(n − 1)` (`n/(n − 1)` is 1 when `n ≤ 1`), with
    /// `m = momentum` and `n = cnt` (`RunningStats`). Buffers: `rm`, `rv`, `mean`,
    /// `var`, `rm'`, `rv'` (all `[c]`).
    RunningStats { c: usize, momentum: f64, n: usize },
}

impl NormKernel {
    /// The kernel computing a node alone: `BatchNormInfer`, `BatchNormInferGrad`,
    /// `RunningStats`. `BatchNorm` and `BatchNormGrad` take several kernels (see
    /// the module doc) and give `None`.
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<NormKernel> {
        let shape = g.shape(node.inputs[0]).clone();
        Some(match node.op {
            Op::BatchNormInfer { eps } => NormKernel::BnApply {
                shape,
                eps,
                relu: false,
            },
            Op::BatchNormInferGrad { eps } => NormKernel::BnInferGrad { shape, eps },
            Op::RunningStats { momentum, n } => NormKernel::RunningStats {
                c: shape[0],
                momentum,
                n,
            },
            _ => return None,
        })
    }

    /// The normalised tensor's shape (`None` for `RunningStats`).
    fn shape(&self) -> Option<&Shape> {
        match self {
            NormKernel::BnSum { shape }
            | NormKernel::BnSqDev { shape }
            | NormKernel::BnStats { shape }
            | NormKernel::BnCombine { shape }
            | NormKernel::BnApply { shape, .. }
            | NormKernel::BnGradSums { shape, .. }
            | NormKernel::BnGradApply { shape, .. }
            | NormKernel::BnInferGrad { shape, .. } => Some(shape),
            NormKernel::RunningStats { .. } => None,
        }
    }

    /// Channels.
    fn channels(&self) -> usize {
        match self {
            NormKernel::RunningStats { c, .. } => *c,
            _ => self.shape().expect("a shaped kernel")[1],
        }
    }
}

/// `(channels, elements per channel and item, elements per channel over the
/// batch)` of `[N, C, …]`.
fn layout(shape: &Shape) -> (usize, usize, usize) {
    let inner: usize = shape[2..].iter().product();
    (shape[1], inner, shape[0] * inner)
}

impl Emit for NormKernel {
    fn inputs(&self) -> Vec<Shape> {
        let c = vec![self.channels()];
        match self {
            NormKernel::BnSum { shape } => vec![shape.clone()],
            NormKernel::BnSqDev { shape } => vec![shape.clone(), c],
            NormKernel::BnStats { .. } => vec![c.clone(), c],
            NormKernel::BnCombine { shape } => {
                let nc = vec![shape[0], shape[1]];
                vec![nc.clone(), nc]
            }
            NormKernel::BnApply { shape, .. } => {
                vec![shape.clone(), c.clone(), c.clone(), c.clone(), c]
            }
            NormKernel::BnGradSums { shape, relu, .. } => {
                let mut v = vec![shape.clone(), shape.clone(), c.clone(), c];
                if *relu {
                    v.push(shape.clone());
                }
                v
            }
            NormKernel::BnGradApply { shape, relu, .. } => {
                let mut v = vec![shape.clone(), shape.clone()];
                v.extend(std::iter::repeat_n(c, 5));
                if *relu {
                    v.push(shape.clone());
                }
                v
            }
            NormKernel::BnInferGrad { shape, .. } => vec![shape.clone(), c.clone(), c],
            NormKernel::RunningStats { .. } => vec![c; 4],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        let c = vec![self.channels()];
        match self {
            NormKernel::BnSum { .. } | NormKernel::BnSqDev { .. } => vec![c],
            NormKernel::BnStats { .. }
            | NormKernel::BnCombine { .. }
            | NormKernel::BnGradSums { .. }
            | NormKernel::RunningStats { .. } => vec![c.clone(), c],
            NormKernel::BnApply { shape, .. }
            | NormKernel::BnGradApply { shape, .. }
            | NormKernel::BnInferGrad { shape, .. } => vec![shape.clone()],
        }
    }

    fn par(&self) -> Par {
        match self {
            NormKernel::BnSum { .. }
            | NormKernel::BnSqDev { .. }
            | NormKernel::BnGradSums { .. } => Par::Reduce,
            NormKernel::BnStats { .. }
            | NormKernel::BnCombine { .. }
            | NormKernel::RunningStats { .. } => Par::Whole,
            NormKernel::BnApply { .. }
            | NormKernel::BnGradApply { .. }
            | NormKernel::BnInferGrad { .. } => Par::Items,
        }
    }

    /// Per batch item (per call for the `Whole` kernels), not counting the
    /// per-channel constants (a few operations per channel and call).
    fn flops_per_item(&self) -> u64 {
        let c = self.channels() as u64;
        let per_elem = |shape: &Shape, f: u64| f * shape[1..].iter().product::<usize>() as u64;
        let relu = |r: &bool| u64::from(*r);
        match self {
            NormKernel::BnSum { shape } => per_elem(shape, 1),
            // x − mean, then an fma.
            NormKernel::BnSqDev { shape } => per_elem(shape, 3),
            NormKernel::BnStats { .. } => 2 * c,
            // A sum, then a subtraction, an fma and an add per partial.
            NormKernel::BnCombine { shape } => 5 * (shape[0] as u64) * c,
            // x − mean, fma(·, scale, beta), [the max].
            NormKernel::BnApply { shape, relu: r, .. } => per_elem(shape, 3 + relu(r)),
            // [the mask], x − mean, an fma, an add.
            NormKernel::BnGradSums { shape, relu: r, .. } => per_elem(shape, 4 + relu(r)),
            // [the mask], x − mean, two fmas.
            NormKernel::BnGradApply { shape, relu: r, .. } => per_elem(shape, 5 + relu(r)),
            NormKernel::BnInferGrad { shape, .. } => per_elem(shape, 1),
            NormKernel::RunningStats { .. } => 7 * c,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(shape) = self.shape() {
            if shape.len() < 2 {
                return Err(format!("{self:?} needs a tensor [N, C, …] of rank >= 2"));
            }
        }
        if self.channels() == 0 {
            return Err(format!("{self:?} has no channels"));
        }
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        match self {
            NormKernel::BnSum { shape } => {
                let l = Layout::new(shape, &[0], &[], &[1]);
                per_channel(kb, &l, &Sum);
            }
            NormKernel::BnSqDev { shape } => {
                let l = Layout::new(shape, &[0], &[1], &[2]);
                per_channel(kb, &l, &SqDev { cnt: l.cnt });
            }
            NormKernel::BnStats { shape } => stats(kb, shape),
            NormKernel::BnCombine { shape } => combine(kb, shape),
            NormKernel::BnApply { shape, eps, relu } => {
                let l = Layout::new(shape, &[0, 5], &[1, 2, 3, 4], &[]);
                per_channel(
                    kb,
                    &l,
                    &Apply {
                        eps: *eps,
                        relu: *relu,
                    },
                );
            }
            NormKernel::BnGradSums { shape, eps, relu } => {
                // dy, x, [y]; mean, var; dgamma, dbeta.
                let (elems, outs): (&[usize], &[usize]) = if *relu {
                    (&[0, 1, 4], &[5, 6])
                } else {
                    (&[0, 1], &[4, 5])
                };
                let l = Layout::new(shape, elems, &[2, 3], outs);
                per_channel(
                    kb,
                    &l,
                    &GradSums {
                        eps: *eps,
                        relu: *relu,
                    },
                );
            }
            NormKernel::BnGradApply { shape, eps, relu } => {
                // dy, x, dx, [y]; gamma, mean, var, dgamma, dbeta.
                let elems: &[usize] = if *relu { &[0, 1, 8, 7] } else { &[0, 1, 7] };
                let l = Layout::new(shape, elems, &[2, 3, 4, 5, 6], &[]);
                let k = GradApply {
                    eps: *eps,
                    relu: *relu,
                    cnt: l.cnt,
                };
                per_channel(kb, &l, &k);
            }
            NormKernel::BnInferGrad { shape, eps } => {
                let l = Layout::new(shape, &[0, 3], &[1, 2], &[]);
                per_channel(kb, &l, &InferGrad { eps: *eps });
            }
            NormKernel::RunningStats { c, momentum, n } => running_stats(kb, *c, *momentum, *n),
        }
    }
}

// ---------------------------------------------------------------------------
// The per-channel driver.

/// Vectors per iteration of the unrolled f32x4 loop (and the number of f32x4
/// accumulators per sum).
const UNROLL: usize = 4;

/// Which buffers a per-channel kernel reads and writes, by buffer index.
struct Layout {
    c: usize,
    inner: usize,
    cnt: usize,
    /// `[N, C, …]` buffers, read or written element by element, in the order
    /// [`Channelwise::step`] receives their pointers.
    elems: Vec<usize>,
    /// `[C]` inputs, loaded once per channel and given to [`Channelwise::consts`].
    chans: Vec<usize>,
    /// `[C]` outputs of a reduction: one accumulator each.
    sums: Vec<usize>,
}

impl Layout {
    fn new(shape: &Shape, elems: &[usize], chans: &[usize], sums: &[usize]) -> Layout {
        let (c, inner, cnt) = layout(shape);
        Layout {
            c,
            inner,
            cnt,
            elems: elems.to_vec(),
            chans: chans.to_vec(),
            sums: sums.to_vec(),
        }
    }
}

/// A kernel that walks every channel, item and element (see "Loops" in the
/// module doc). Values have type `ty`: a scalar, or a vector (four f32 or two
/// f64 elements of one channel, or one element of as many channels when
/// `H·W = 1`).
trait Channelwise {
    /// The per-channel constants from the values of the `[C]` inputs.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value>;
    /// One vector or scalar at byte offset `off` from each element pointer `p`:
    /// updates the accumulators `acc` (one per output sum) or stores.
    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], acc: &mut [Value]);
    /// The output sums from the accumulators' totals.
    fn finish(&self, _kb: &mut Kb, _ty: Type, _k: &[Value], acc: &[Value]) -> Vec<Value> {
        acc.to_vec()
    }
}

/// Emits the loop nest of `kern` over the layout `l`.
fn per_channel(kb: &mut Kb, l: &Layout, kern: &dyn Channelwise) {
    let elems: Vec<Value> = l.elems.iter().map(|&i| kb.buffer(i)).collect();
    let chans: Vec<Value> = l.chans.iter().map(|&i| kb.buffer(i)).collect();
    let sums: Vec<Value> = l.sums.iter().map(|&i| kb.buffer(i)).collect();
    let bufs = Bufs {
        elems: &elems,
        chans: &chans,
        sums: &sums,
    };
    if l.inner == 1 {
        across_channels(kb, l.c, &bufs, kern);
    } else {
        along_channel(kb, l.c, l.inner, &bufs, kern);
    }
}

/// The buffer pointers of a [`Layout`].
struct Bufs<'a> {
    elems: &'a [Value],
    chans: &'a [Value],
    sums: &'a [Value],
}

/// Accumulators: `vec[u]` (f32x4, one per output sum) for the `u`-th vector of
/// an unrolled block, `scalar` (f32) for the scalar tail.
struct Accs {
    vec: Vec<Vec<Value>>,
    scalar: Vec<Value>,
}

impl Accs {
    fn flatten(&self) -> Vec<Value> {
        let mut v = self.vec.concat();
        v.extend(&self.scalar);
        v
    }

    /// The `per` scalar totals: each sum's vector accumulators added (a balanced
    /// tree), summed across lanes, plus its scalar accumulator when there is a
    /// scalar tail.
    fn totals(&self, kb: &mut Kb, per: usize) -> Vec<Value> {
        (0..per)
            .map(|j| {
                let vecs: Vec<Value> = self.vec.iter().map(|s| s[j]).collect();
                let mut t = (!vecs.is_empty()).then(|| {
                    let v = tree_sum(kb, &vecs);
                    hsum(kb, v)
                });
                if let Some(&s) = self.scalar.get(j) {
                    t = Some(t.map_or(s, |t| kb.b.ins().fadd(t, s)));
                }
                t.expect("a sum over at least one element")
            })
            .collect()
    }

    /// The inverse of [`Accs::flatten`] for `sets` vector sets of `per` values.
    fn regroup(flat: &[Value], sets: usize, per: usize) -> Accs {
        Accs {
            vec: (0..sets)
                .map(|s| flat[s * per..(s + 1) * per].to_vec())
                .collect(),
            scalar: flat[sets * per..].to_vec(),
        }
    }
}

/// One vector or scalar (the `Type`) at a byte offset from each pointer,
/// updating the accumulators of its type.
type Step<'f> = dyn FnMut(&mut Kb, Type, &[Value], i64, &mut [Value]) + 'f;

/// Emits `f` over `len` consecutive elements from the byte pointers `ptrs`
/// (advancing together): a vector loop unrolled [`UNROLL`] times (vector `u` of a
/// block uses `acc.vec[u]`), the leftover vectors (round-robin over `acc.vec`),
/// then scalars (`acc.scalar`). `acc.vec` must hold `min(UNROLL, len / lanes)`
/// sets.
fn sweep(kb: &mut Kb, ptrs: &[Value], len: usize, mut acc: Accs, f: &mut Step) -> Accs {
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let block = lanes * UNROLL;
    let full = len / block;
    let per = acc.vec.first().map_or(0, Vec::len);
    if full > 0 {
        let flat = acc.vec.concat();
        let out = kb.for_range(
            Bound::Const(0),
            Bound::Const((full * block) as i64),
            block as i64,
            &flat,
            |kb, i, carried| {
                let here: Vec<Value> = ptrs.iter().map(|&p| kb.offset(p, i, e)).collect();
                let mut sets = Accs::regroup(carried, UNROLL, per).vec;
                for (u, set) in sets.iter_mut().enumerate() {
                    f(kb, vt, &here, 16 * u as i64, set);
                }
                sets.concat()
            },
        );
        acc.vec = Accs::regroup(&out, UNROLL, per).vec;
    }
    let mut at = full * block;
    let mut u = 0;
    while at + lanes <= len {
        f(kb, vt, ptrs, e * at as i64, &mut acc.vec[u]);
        u = (u + 1) % acc.vec.len();
        at += lanes;
    }
    while at < len {
        f(kb, st, ptrs, e * at as i64, &mut acc.scalar);
        at += 1;
    }
    acc
}

/// `H·W > 1`: for each channel, its constants, then every item's `inner`
/// contiguous elements in vectors (see [`sweep`]); a reduction's accumulators are
/// added, summed across lanes, finished and stored once per channel.
fn along_channel(kb: &mut Kb, c: usize, inner: usize, bufs: &Bufs, kern: &dyn Channelwise) {
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let per = bufs.sums.len();
    let sets = (inner / lanes).min(UNROLL);
    let tail = usize::from(!inner.is_multiple_of(lanes));
    let item = (c * inner) as i64;
    let (start, end) = (kb.start, kb.end);
    kb.for_range(
        Bound::Const(0),
        Bound::Const(c as i64),
        1,
        &[],
        |kb, ch, _| {
            let vals: Vec<Value> = bufs
                .chans
                .iter()
                .map(|&p| {
                    let at = kb.offset(p, ch, e);
                    kb.load_in(st, at, 0)
                })
                .collect();
            let ks = kern.consts(kb, st, &vals);
            pin(kb, &ks);
            let kv: Vec<Value> = ks.iter().map(|&k| kb.splat(vt, k)).collect();
            let (zv, zs) = (kb.zero(vt), kb.zero(st));
            let init = Accs {
                vec: vec![vec![zv; per]; sets],
                scalar: vec![zs; per * tail],
            };
            let base: Vec<Value> = bufs
                .elems
                .iter()
                .map(|&p| kb.offset(p, ch, e * inner as i64))
                .collect();
            let flat = kb.for_range(
                Bound::Val(start),
                Bound::Val(end),
                1,
                &init.flatten(),
                |kb, n, carried| {
                    let here: Vec<Value> =
                        base.iter().map(|&p| kb.offset(p, n, e * item)).collect();
                    let acc = Accs::regroup(carried, sets, per);
                    let mut step =
                        |kb: &mut Kb, ty: Type, p: &[Value], off: i64, a: &mut [Value]| {
                            let k = if !ty.is_vector() { &ks } else { &kv };
                            kern.step(kb, ty, p, off, k, a);
                        };
                    sweep(kb, &here, inner, acc, &mut step).flatten()
                },
            );
            if per > 0 {
                let acc = Accs::regroup(&flat, sets, per);
                let totals = acc.totals(kb, per);
                let out = kern.finish(kb, st, &ks, &totals);
                for (&v, &p) in out.iter().zip(bufs.sums) {
                    let at = kb.offset(p, ch, e);
                    kb.store(v, at, 0);
                }
            }
            vec![]
        },
    );
}

/// `H·W = 1` (`[N, C]`): the vectors run across channels. Blocks of
/// [`UNROLL`] vectors (16 f32 channels, one cache line of each buffer per item)
/// in a loop, then one block of the remaining whole vectors and one of the last
/// channels in scalars, straight-line. A block loads its constants as vectors,
/// then walks the items with one accumulator per vector and sum.
fn across_channels(kb: &mut Kb, c: usize, bufs: &Bufs, kern: &dyn Channelwise) {
    let (lanes, e, vt, st) = (kb.lanes(), kb.esz(), kb.vty(), kb.sty());
    let per = bufs.sums.len();
    let item = e * c as i64;
    let (start, end) = (kb.start, kb.end);
    // `w` values of type `ty` from channel `ch` plus `off` bytes.
    let block = |kb: &mut Kb, ty: Type, w: usize, ch: Value, off: i64| {
        let offs: Vec<i64> = (0..w).map(|v| off + ty.bytes() as i64 * v as i64).collect();
        let chans: Vec<Value> = bufs.chans.iter().map(|&p| kb.offset(p, ch, e)).collect();
        let ks: Vec<Vec<Value>> = offs
            .iter()
            .map(|&o| {
                let vals: Vec<Value> = chans.iter().map(|&p| kb.load_in(ty, p, o)).collect();
                kern.consts(kb, ty, &vals)
            })
            .collect();
        pin(kb, &ks.concat());
        let zero = kb.zero(ty);
        let base: Vec<Value> = bufs.elems.iter().map(|&p| kb.offset(p, ch, e)).collect();
        let acc = kb.for_range(
            Bound::Val(start),
            Bound::Val(end),
            1,
            &vec![zero; w * per],
            |kb, n, carried| {
                let here: Vec<Value> = base.iter().map(|&p| kb.offset(p, n, item)).collect();
                let mut sets = Accs::regroup(carried, w, per).vec;
                for ((set, &o), k) in sets.iter_mut().zip(&offs).zip(&ks) {
                    kern.step(kb, ty, &here, o, k, set);
                }
                sets.concat()
            },
        );
        if per > 0 {
            let sums: Vec<Value> = bufs.sums.iter().map(|&p| kb.offset(p, ch, e)).collect();
            for ((set, &o), k) in Accs::regroup(&acc, w, per).vec.iter().zip(&offs).zip(&ks) {
                let out = kern.finish(kb, ty, k, set);
                for (&v, &p) in out.iter().zip(&sums) {
                    kb.store(v, p, o);
                }
            }
        }
    };
    let wide = c / (lanes * UNROLL) * (lanes * UNROLL);
    kb.for_range(
        Bound::Const(0),
        Bound::Const(wide as i64),
        (lanes * UNROLL) as i64,
        &[],
        |kb, ch, _| {
            block(kb, vt, UNROLL, ch, 0);
            vec![]
        },
    );
    let zero = kb.iconst(0);
    let vecs = (c - wide) / lanes;
    if vecs > 0 {
        block(kb, vt, vecs, zero, e * wide as i64);
    }
    let done = wide + lanes * vecs;
    if done < c {
        block(kb, st, c - done, zero, e * done as i64);
    }
}

/// Makes Cranelift compute `values` here, in the current block.
///
/// Cranelift's egraph pass re-places pure instructions from their first use
/// (here, the innermost loop) and hoists them out of loops only as far as their
/// arguments allow; a constant (`f32const`, `iconst`) first used in a loop is
/// placed just outside that loop, so everything computed from it (the
/// per-channel constants, from `eps` or `cnt`) would run once per batch item
/// instead of once per channel. A store is never moved: storing the values to a
/// stack slot nobody reads makes their first use this block (measured: ~10% off
/// `BnGradApply` at `[32, 64, 7, 7]`).
fn pin(kb: &mut Kb, values: &[Value]) {
    if values.is_empty() {
        return;
    }
    let size = 16 * values.len() as u32;
    let slot =
        kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
    for (i, &v) in values.iter().enumerate() {
        kb.b.ins().stack_store(I64, v, slot, 16 * i as i32);
    }
}

/// `v[0] + v[1] + …` as a balanced tree.
fn tree_sum(kb: &mut Kb, v: &[Value]) -> Value {
    match v {
        [x] => *x,
        _ => {
            let (a, b) = v.split_at(v.len() / 2);
            let (a, b) = (tree_sum(kb, a), tree_sum(kb, b));
            kb.b.ins().fadd(a, b)
        }
    }
}

/// The sum of a vector's lanes as a balanced tree, `(l0 + l1) + (l2 + l3)`.
fn hsum(kb: &mut Kb, v: Value) -> Value {
    let l: Vec<Value> = (0..kb.lanes() as u8)
        .map(|i| kb.b.ins().extractlane(v, i))
        .collect();
    tree_sum(kb, &l)
}

/// `1/sqrt(var + eps)`.
fn inv_std(kb: &mut Kb, ty: Type, var: Value, eps: f64) -> Value {
    let e = kb.real(ty, eps);
    let one = kb.real(ty, 1.0);
    let ve = kb.b.ins().fadd(var, e);
    let sd = kb.b.ins().sqrt(ve);
    kb.b.ins().fdiv(one, sd)
}

// ---------------------------------------------------------------------------
// The per-channel kernels.

/// `s = Σ x`. Elements: `x`; sums: `s`.
struct Sum;

impl Channelwise for Sum {
    fn consts(&self, _kb: &mut Kb, _ty: Type, _chan: &[Value]) -> Vec<Value> {
        vec![]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, _k: &[Value], acc: &mut [Value]) {
        let x = kb.load_in(ty, p[0], off);
        acc[0] = kb.b.ins().fadd(acc[0], x);
    }
}

/// `q = Σ (x − s/cnt)²`. Elements: `x`; channels: `s`; sums: `q`.
struct SqDev {
    cnt: usize,
}

impl Channelwise for SqDev {
    /// `[mean]`.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value> {
        let cnt = kb.real(ty, self.cnt as f64);
        vec![kb.b.ins().fdiv(chan[0], cnt)]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], acc: &mut [Value]) {
        let x = kb.load_in(ty, p[0], off);
        let d = kb.b.ins().fsub(x, k[0]);
        acc[0] = kb.fma(d, d, acc[0]);
    }
}

/// `y = (x − mean)·scale + beta`, `scale = gamma/sqrt(var + eps)`, [ReLU].
/// Elements: `x`, `y`; channels: `gamma`, `beta`, `mean`, `var`.
///
/// `(x − mean)·scale + beta` rather than `x·scale + (beta − mean·scale)`: one
/// subtraction more per element, but no cancellation when `|mean|` is large
/// against the spread.
struct Apply {
    eps: f64,
    relu: bool,
}

impl Channelwise for Apply {
    /// `[mean, scale, beta]`.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value> {
        let (gamma, beta, mean, var) = (chan[0], chan[1], chan[2], chan[3]);
        let e = kb.real(ty, self.eps);
        let ve = kb.b.ins().fadd(var, e);
        let sd = kb.b.ins().sqrt(ve);
        let scale = kb.b.ins().fdiv(gamma, sd);
        vec![mean, scale, beta]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], _: &mut [Value]) {
        let x = kb.load_in(ty, p[0], off);
        let d = kb.b.ins().fsub(x, k[0]);
        let mut y = kb.fma(d, k[1], k[2]);
        if self.relu {
            y = kb.where_positive(ty, y, y);
        }
        kb.store(y, p[1], off);
    }
}

/// `dy' = dy` masked by `y > 0` when `relu` (`y` is `p[mask]`).
fn masked_dy(kb: &mut Kb, ty: Type, p: &[Value], off: i64, mask: Option<usize>) -> Value {
    let dy = kb.load_in(ty, p[0], off);
    match mask {
        Some(i) => {
            let y = kb.load_in(ty, p[i], off);
            kb.where_positive(ty, y, dy)
        }
        None => dy,
    }
}

/// `dgamma = inv·Σ dy'·(x − mean)`, `dbeta = Σ dy'` (`inv = 1/sqrt(var + eps)`
/// applied once per channel). Elements: `dy`, `x`, [`y`]; channels: `mean`,
/// `var`; sums: `dgamma`, `dbeta`.
struct GradSums {
    eps: f64,
    relu: bool,
}

impl Channelwise for GradSums {
    /// `[mean, inv]`.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value> {
        vec![chan[0], inv_std(kb, ty, chan[1], self.eps)]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], acc: &mut [Value]) {
        let dy = masked_dy(kb, ty, p, off, self.relu.then_some(2));
        let x = kb.load_in(ty, p[1], off);
        let d = kb.b.ins().fsub(x, k[0]);
        acc[0] = kb.fma(dy, d, acc[0]);
        acc[1] = kb.b.ins().fadd(acc[1], dy);
    }

    fn finish(&self, kb: &mut Kb, _ty: Type, k: &[Value], acc: &[Value]) -> Vec<Value> {
        vec![kb.b.ins().fmul(acc[0], k[1]), acc[1]]
    }
}

/// `dx = a·dy' + b·(x − mean) + c` with, per channel, `inv = 1/sqrt(var + eps)`,
/// `a = gamma·inv`, `b = −a·inv·dgamma/cnt`, `c = −a·dbeta/cnt`: the formula of
/// [`NormKernel::BnGradApply`] expanded. Elements: `dy`, `x`, `dx`, [`y`];
/// channels: `gamma`, `mean`, `var`, `dgamma`, `dbeta`.
struct GradApply {
    eps: f64,
    relu: bool,
    cnt: usize,
}

impl Channelwise for GradApply {
    /// `[mean, a, b, c]`.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value> {
        let (gamma, mean, var, dgamma, dbeta) = (chan[0], chan[1], chan[2], chan[3], chan[4]);
        let inv = inv_std(kb, ty, var, self.eps);
        let cnt = kb.real(ty, self.cnt as f64);
        let a = kb.b.ins().fmul(gamma, inv);
        let ai = kb.b.ins().fmul(a, inv);
        let dg = kb.b.ins().fdiv(dgamma, cnt);
        let db = kb.b.ins().fdiv(dbeta, cnt);
        let b = kb.b.ins().fmul(ai, dg);
        let c = kb.b.ins().fmul(a, db);
        let (b, c) = (kb.b.ins().fneg(b), kb.b.ins().fneg(c));
        vec![mean, a, b, c]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], _: &mut [Value]) {
        let dy = masked_dy(kb, ty, p, off, self.relu.then_some(3));
        let x = kb.load_in(ty, p[1], off);
        let d = kb.b.ins().fsub(x, k[0]);
        let t = kb.fma(k[2], d, k[3]);
        let dx = kb.fma(k[1], dy, t);
        kb.store(dx, p[2], off);
    }
}

/// `dx = dy·gamma/sqrt(var + eps)`. Elements: `dy`, `dx`; channels: `gamma`, `var`.
struct InferGrad {
    eps: f64,
}

impl Channelwise for InferGrad {
    /// `[gamma/sqrt(var + eps)]`.
    fn consts(&self, kb: &mut Kb, ty: Type, chan: &[Value]) -> Vec<Value> {
        let inv = inv_std(kb, ty, chan[1], self.eps);
        vec![kb.b.ins().fmul(chan[0], inv)]
    }

    fn step(&self, kb: &mut Kb, ty: Type, p: &[Value], off: i64, k: &[Value], _: &mut [Value]) {
        let dy = kb.load_in(ty, p[0], off);
        let dx = kb.b.ins().fmul(dy, k[0]);
        kb.store(dx, p[1], off);
    }
}

// ---------------------------------------------------------------------------
// The once-per-call kernels over `[C]` vectors.

/// The outputs at one position from the inputs' values there (of type `ty`).
type PerChannel<'f> = dyn FnMut(&mut Kb, Type, &[Value]) -> Vec<Value> + 'f;

/// Runs `f(kb, ty, values at this position of every buffer in `ins`)` over `c`
/// elements and stores its results to the buffers `outs`.
fn over_channels(kb: &mut Kb, c: usize, ins: &[usize], outs: &[usize], f: &mut PerChannel) {
    let ptrs: Vec<Value> = ins.iter().chain(outs).map(|&i| kb.buffer(i)).collect();
    let n_in = ins.len();
    let acc = Accs {
        vec: vec![vec![]; (c / kb.lanes()).min(UNROLL)],
        scalar: vec![],
    };
    let mut step = |kb: &mut Kb, ty: Type, p: &[Value], off: i64, _: &mut [Value]| {
        let vals: Vec<Value> = p[..n_in].iter().map(|&q| kb.load_in(ty, q, off)).collect();
        let out = f(kb, ty, &vals);
        for (&v, &q) in out.iter().zip(&p[n_in..]) {
            kb.store(v, q, off);
        }
    };
    sweep(kb, &ptrs, c, acc, &mut step);
}

/// `mean = s/cnt`, `var = q/cnt`. Buffers: `s`, `q`, `mean`, `var`.
fn stats(kb: &mut Kb, shape: &Shape) {
    let (c, _, cnt) = layout(shape);
    over_channels(kb, c, &[0, 1], &[2, 3], &mut |kb, ty, v| {
        let n = kb.real(ty, cnt as f64);
        vec![kb.b.ins().fdiv(v[0], n), kb.b.ins().fdiv(v[1], n)]
    });
}

/// [`NormKernel::BnCombine`]: per channel (vectors across channels, as
/// [`over_channels`]), `S = Σ_n s[n]` in item order, then `Q = Σ_n q[n]` and
/// `D = Σ_n (s[n] − S/N)²`; `mean = S/cnt`, `var = (Q + D/(H·W))/cnt`.
/// (`s[n]/(H·W) − mean` is item `n`'s mean minus the batch mean, and
/// `(s[n] − S/N)²/(H·W) = H·W·(s[n]/(H·W) − mean)²`.) Buffers: `s`, `q`,
/// `mean`, `var`.
fn combine(kb: &mut Kb, shape: &Shape) {
    let (c, inner, cnt) = layout(shape);
    let items = shape[0] as i64;
    let row = kb.esz() * c as i64;
    let ptrs: Vec<Value> = (0..4).map(|i| kb.buffer(i)).collect();
    let acc = Accs {
        vec: vec![vec![]; (c / kb.lanes()).min(UNROLL)],
        scalar: vec![],
    };
    let mut step = |kb: &mut Kb, ty: Type, p: &[Value], off: i64, _: &mut [Value]| {
        let zero = kb.zero(ty);
        let each = |kb: &mut Kb, buf: Value, n: Value| {
            let at = kb.offset(buf, n, row);
            kb.load_in(ty, at, off)
        };
        let total = kb.for_range(
            Bound::Const(0),
            Bound::Const(items),
            1,
            &[zero],
            |kb, n, a| {
                let s = each(kb, p[0], n);
                vec![kb.b.ins().fadd(a[0], s)]
            },
        )[0];
        let nk = kb.real(ty, items as f64);
        let shift = kb.b.ins().fdiv(total, nk);
        let qd = kb.for_range(
            Bound::Const(0),
            Bound::Const(items),
            1,
            &[zero, zero],
            |kb, n, a| {
                let s = each(kb, p[0], n);
                let q = each(kb, p[1], n);
                let d = kb.b.ins().fsub(s, shift);
                vec![kb.b.ins().fadd(a[0], q), kb.fma(d, d, a[1])]
            },
        );
        let hw = kb.real(ty, inner as f64);
        let between = kb.b.ins().fdiv(qd[1], hw);
        let sq = kb.b.ins().fadd(qd[0], between);
        let n = kb.real(ty, cnt as f64);
        let mean = kb.b.ins().fdiv(total, n);
        let var = kb.b.ins().fdiv(sq, n);
        kb.store(mean, p[2], off);
        kb.store(var, p[3], off);
    };
    sweep(kb, &ptrs, c, acc, &mut step);
}

/// The partial statistics of one item and channel, for a kernel that has just
/// written its `len` contiguous elements at `row` (the conv epilogue,
/// `conv.rs`, while the row is in cache): `(s, q)` with `s = Σ x` and `q = Σ (x −
/// s/len)²`, in one pass over the row ([`UNROLL`] pairs of vector accumulators
/// and a scalar pair for the tail, as [`sweep`]) of sums shifted by `k`, the
/// mean of the row's first vector (its first element when the row is shorter):
/// with `d = x − k`, `S = Σ d` and `Q = Σ d²`, `s = S + len·k` and `q = Q −
/// S²/len` (at least 0). The shift keeps the cancellation in `Q − S²/len` to
/// that of a sample of the row: the relative rounding error of `q` is about
/// `ε·(1 + (mean − k)²/var)`, and `k` averages a few elements of the row
/// (never `E[x²] − E[x]²`, whose error grows with `mean²/var`).
/// [`NormKernel::BnCombine`] turns the partials of every item into the batch
/// statistics. The loads are not `readonly`: the caller wrote the row.
///
/// This generated version serves f64 kernels; f32 kernels call
/// [`row_moments_f32`] once per item, the same computation on 256-bit vectors.
/// Measured on M3's five fused convolutions (batch 64, one core): this code in
/// f32x4 added 2.0-2.4 ms to a step (two passes, sum then deviations, about
/// as much), the native one 1.4-1.8 ms; the passes over the activation it
/// replaces took about 5 ms.
pub(super) fn row_moments(kb: &mut Kb, row: Value, len: usize) -> (Value, Value) {
    let (lanes, vt, st) = (kb.lanes(), kb.vty(), kb.sty());
    let shift = if len >= lanes {
        let first = kb.load_out(vt, row, 0);
        let sum = hsum(kb, first);
        let inv = kb.real(st, 1.0 / lanes as f64);
        kb.b.ins().fmul(sum, inv)
    } else {
        kb.load_out(st, row, 0)
    };
    let shift_v = kb.splat(vt, shift);
    let (zv, zs) = (kb.zero(vt), kb.zero(st));
    let init = Accs {
        vec: vec![vec![zv; 2]; (len / lanes).min(UNROLL)],
        scalar: if len.is_multiple_of(lanes) {
            vec![]
        } else {
            vec![zs; 2]
        },
    };
    let acc = sweep(kb, &[row], len, init, &mut |kb, ty, p, off, a| {
        let x = kb.load_out(ty, p[0], off);
        let k = if ty.is_vector() { shift_v } else { shift };
        let d = kb.b.ins().fsub(x, k);
        a[0] = kb.b.ins().fadd(a[0], d);
        a[1] = kb.fma(d, d, a[1]);
    });
    let t = acc.totals(kb, 2);
    let (sum_d, sq_d) = (t[0], t[1]);
    let n = kb.real(st, len as f64);
    let s = kb.fma(n, shift, sum_d);
    let mean_d = kb.b.ins().fdiv(sum_d, n);
    let between = kb.b.ins().fmul(sum_d, mean_d);
    let q = kb.b.ins().fsub(sq_d, between);
    let q = kb.b.ins().fmax(q, zs);
    (s, q)
}

/// [`row_moments`] for `rows` rows of `len` contiguous f32 at `y` (one batch
/// item of a conv output): `s[r] = Σ x`, `q[r] = Σ (x − s[r]/len)²` of row `r`,
/// from sums shifted by the mean of the row's first `min(len, 8)` elements,
/// accumulated in 8 lanes (4 × 8 with AVX2+FMA, chosen as [`sgemm`] chooses its
/// microkernel; a portable loop otherwise) and added in a fixed order, so the
/// result does not depend on how the batch is split. The conv epilogue calls it
/// once per item, after the item's bias and ReLU.
///
/// # Safety
/// `y` must be valid for `rows·len` reads, `s` and `q` for `rows` writes.
///
/// [`sgemm`]: super::gemm::sgemm
pub unsafe extern "C" fn row_moments_f32(
    y: *const f32,
    rows: usize,
    len: usize,
    s: *mut f32,
    q: *mut f32,
) {
    if rows == 0 || len == 0 {
        return;
    }
    // SAFETY: the caller's contract.
    let (y, s, q) = unsafe {
        (
            std::slice::from_raw_parts(y, rows * len),
            std::slice::from_raw_parts_mut(s, rows),
            std::slice::from_raw_parts_mut(q, rows),
        )
    };
    match super::gemm::Microkernel::detected() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detected() checked AVX2 and FMA.
        super::gemm::Microkernel::Avx2Fma => unsafe { moments_avx2::rows(y, len, s, q) },
        _ => moments_portable(y, len, s, q),
    }
}

/// The shift of a row for [`row_moments_f32`]: the mean of its first
/// `min(len, 8)` elements.
fn moments_shift(row: &[f32]) -> f32 {
    let m = row.len().min(8);
    row[..m].iter().sum::<f32>() / m as f32
}

/// `(s, q)` from the shifted sums `S = Σ d`, `Q = Σ d²` of `len` elements, `d =
/// x − k`; `q` is clamped at 0 (a NaN stays NaN).
fn moments_finish(sum_d: f32, sq_d: f32, len: usize, k: f32) -> (f32, f32) {
    let n = len as f32;
    let q = sq_d - sum_d * (sum_d / n);
    (n * k + sum_d, if q < 0.0 { 0.0 } else { q })
}

/// `((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))`.
fn sum8(v: [f32; 8]) -> f32 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

/// [`row_moments_f32`] in plain Rust (8 lanes, separate multiply and add).
fn moments_portable(y: &[f32], len: usize, s: &mut [f32], q: &mut [f32]) {
    for ((row, s), q) in y.chunks_exact(len).zip(s).zip(q) {
        let k = moments_shift(row);
        let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                let d = c[l] - k;
                a[l] += d;
                b[l] += d * d;
            }
        }
        let (mut sd, mut sq) = (sum8(a), sum8(b));
        for &x in tail {
            let d = x - k;
            sd += d;
            sq += d * d;
        }
        (*s, *q) = moments_finish(sd, sq, len, k);
    }
}

#[cfg(target_arch = "x86_64")]
mod moments_avx2 {
    use super::{moments_finish, moments_shift, sum8};
    use std::arch::x86_64::*;

    /// [`super::row_moments_f32`] on 256-bit vectors: four pairs of
    /// accumulators over blocks of 32 elements, then 8 at a time (round robin),
    /// then scalars.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(y: &[f32], len: usize, s: &mut [f32], q: &mut [f32]) {
        for ((row, s), q) in y.chunks_exact(len).zip(s).zip(q) {
            let k = moments_shift(row);
            let kv = _mm256_set1_ps(k);
            let mut sa = [_mm256_setzero_ps(); 4];
            let mut qa = [_mm256_setzero_ps(); 4];
            let p = row.as_ptr();
            let mut i = 0;
            while i + 32 <= len {
                for u in 0..4 {
                    // SAFETY: i + 8u + 8 <= len.
                    let x = unsafe { _mm256_loadu_ps(p.add(i + 8 * u)) };
                    let d = _mm256_sub_ps(x, kv);
                    sa[u] = _mm256_add_ps(sa[u], d);
                    qa[u] = _mm256_fmadd_ps(d, d, qa[u]);
                }
                i += 32;
            }
            let mut u = 0;
            while i + 8 <= len {
                // SAFETY: i + 8 <= len.
                let x = unsafe { _mm256_loadu_ps(p.add(i)) };
                let d = _mm256_sub_ps(x, kv);
                sa[u] = _mm256_add_ps(sa[u], d);
                qa[u] = _mm256_fmadd_ps(d, d, qa[u]);
                u += 1;
                i += 8;
            }
            let total = |a: [__m256; 4]| {
                let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                let mut l = [0f32; 8];
                // SAFETY: l holds 8 floats.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
                sum8(l)
            };
            let (mut sd, mut sq) = (total(sa), total(qa));
            for &x in &row[i..] {
                let d = x - k;
                sd += d;
                sq = d.mul_add(d, sq);
            }
            (*s, *q) = moments_finish(sd, sq, len, k);
        }
    }
}

/// The running-statistics update, rounded as the interpreter (momentum in the
/// element type, `(1 − m)·r + (m·b)·unbias`, no fma). Buffers: `rm`, `rv`,
/// `mean`, `var`, `rm'`, `rv'`.
fn running_stats(kb: &mut Kb, c: usize, momentum: f64, n: usize) {
    let unbias = if n > 1 {
        n as f64 / (n as f64 - 1.0)
    } else {
        1.0
    };
    // m, 1 − m (computed in the element type) and the unbias factor.
    let (m, keep, unbias) = match kb.dt {
        DType::F32 => {
            let m = momentum as f32;
            (m as f64, (1.0 - m) as f64, unbias)
        }
        DType::F64 => (momentum, 1.0 - momentum, unbias),
    };
    over_channels(kb, c, &[0, 1, 2, 3], &[4, 5], &mut |kb, ty, v| {
        let (rm, rv, bm, bv) = (v[0], v[1], v[2], v[3]);
        let km = kb.real(ty, m);
        let keep = kb.real(ty, keep);
        let ku = kb.real(ty, unbias);
        let a = kb.b.ins().fmul(keep, rm);
        let b = kb.b.ins().fmul(km, bm);
        let new_m = kb.b.ins().fadd(a, b);
        let a = kb.b.ins().fmul(keep, rv);
        let b = kb.b.ins().fmul(km, bv);
        let b = kb.b.ins().fmul(b, ku);
        let new_v = kb.b.ins().fadd(a, b);
        vec![new_m, new_v]
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(Σ x, Σ (x − mean)²)` in f64.
    fn exact(row: &[f32]) -> (f64, f64) {
        let s: f64 = row.iter().map(|&x| x as f64).sum();
        let m = s / row.len() as f64;
        (s, row.iter().map(|&x| (x as f64 - m).powi(2)).sum())
    }

    /// Both native versions of the per-row statistics (only one of them runs
    /// in the JIT on a given machine) against f64, on every tail length and
    /// off-centre rows (`3 ± 0.5`, a large mean against the spread).
    #[test]
    fn native_row_moments_match_f64() {
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for len in [1, 2, 3, 7, 8, 9, 31, 32, 33, 40, 64, 100, 1024] {
            for offset in [0.0, 3.0] {
                let rows = 3;
                let y: Vec<f32> = (0..rows * len).map(|_| next() - 0.5 + offset).collect();
                let (mut s, mut q) = (vec![0f32; rows], vec![0f32; rows]);
                moments_portable(&y, len, &mut s, &mut q);
                let mut got = vec![(s, q)];
                #[cfg(target_arch = "x86_64")]
                if super::super::gemm::Microkernel::Avx2Fma.is_available() {
                    let (mut s, mut q) = (vec![0f32; rows], vec![0f32; rows]);
                    // SAFETY: AVX2 and FMA are available.
                    unsafe { moments_avx2::rows(&y, len, &mut s, &mut q) };
                    got.push((s, q));
                }
                for (s, q) in &got {
                    for (r, row) in y.chunks(len).enumerate() {
                        let (es, eq) = exact(row);
                        let abs: f64 = row.iter().map(|&x| (x as f64).abs()).sum();
                        let sq: f64 = row.iter().map(|&x| (x as f64).powi(2)).sum();
                        assert!(
                            (s[r] as f64 - es).abs() <= 1e-6 * abs,
                            "len {len}: s {} vs {es}",
                            s[r]
                        );
                        assert!(
                            (q[r] as f64 - eq).abs() <= 1e-6 * sq,
                            "len {len}: q {} vs {eq}",
                            q[r]
                        );
                    }
                }
            }
        }
    }
}
