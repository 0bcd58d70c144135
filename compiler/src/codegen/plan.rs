//! The fusion planner: a graph becomes a list of steps (generated kernels or
//! native code) over buffers, and the buffers are laid out in one arena.
//!
//! What a fusion may do:
//! 1. A group computes exactly what its nodes compute (same formula, same
//!    rounding order as far as the kernel allows); it only saves passes over
//!    memory and intermediate buffers.
//! 2. A value disappears into a group only when every use of it is inside the
//!    group and it is not a graph output.
//! 3. `relu_grad(dy, x)` may read `relu(x)` instead of `x`: the mask is the same
//!    (`x > 0` exactly when `relu(x) > 0`, NaN gives 0 in both). This frees the
//!    pre-activation for fusion into its producer.
//! 4. `reshape` and `stop_gradient` are aliases: no step, the same buffer.
//! 5. A reduction over the batch may be split into per-item partials written by
//!    the kernel that produces its operand (in its epilogue, while the item is
//!    in cache) and a small step that combines them; the operand is still
//!    written for its other readers. Only in item order and per item (never per
//!    thread or per work range), so the result does not depend on the thread
//!    count; the formula may be re-associated but not made less accurate (a
//!    variance stays a sum of squared deviations: per item from a shift inside
//!    the item, plus the between-item term; never `E[x²] − E[x]²` over the
//!    batch).
//!
//! Groups formed (anchor ← absorbed):
//! - `conv2d ← bias_add ← relu` (and `conv2d ← relu`): the epilogue of the
//!   im2col + GEMM conv kernel, applied while each image's output is in cache;
//! - `conv2d[ ← bias_add][ ← relu] ⇢ batchnorm` (training; rule 5, shown as
//!   `conv2d+batchnorm_sums`): the first `batchnorm` reading the group's output
//!   takes its batch statistics from per-image, per-channel sums and squared
//!   deviations written by the same epilogue, combined by one small step
//!   (`NormKernel::BnCombine`) instead of two passes over the activation (sum,
//!   squared deviations); the apply step is unchanged. Not after the depthwise
//!   kernels (yet);
//! - `batchnorm ← relu` (train: sum, squared deviations, statistics, apply+relu;
//!   inference: apply+relu);
//! - `batchnorm_grad ← relu_grad` (gradient sums and apply, masked by the relu
//!   output);
//! - `bias_add ← relu`;
//! - `softmax_xent ← softmax_xent_grad` (native: the probabilities stay in the
//!   row being processed).
//!
//! Every other op is one step: its kernel from `KernelSpec::from_node`, a matrix
//! product on the GEMM driver, or native code from [`Native::for_op`] (which
//! falls back to the interpreter's `eval` for an op it does not know).
//!
//! Memory: inputs, parameters, buffers and graph outputs live for the whole run;
//! every other buffer (temporaries, reduction partials, per-thread scratch) from
//! the step that writes it first to the step that reads it last. Buffers are
//! placed first-fit, largest first, at 64-byte aligned offsets, so two buffers
//! share memory only when their lifetimes are disjoint.

use super::conv::{self, ConvKernel};
use super::depthwise::is_depthwise;
use super::elementwise::ElemKernel;
use super::native::Native;
use super::norm::NormKernel;
use super::{KernelSpec, Par};
use crate::ir::{Act, ConvAttrs, Graph, Op, Role, Shape, Vid};
use std::collections::HashMap;
use std::fmt::Write as _;

pub type BufId = usize;

/// A reduction over the batch (`Par::Reduce`) is cut into at most this many
/// chunks of consecutive items, whatever the number of threads: each chunk
/// writes its own partial sums, and the partials are added in chunk order. So
/// the result does not depend on `--threads` (a run is reproducible on any
/// machine), and up to this many threads share the work.
pub const REDUCE_CHUNKS: usize = 8;

/// `(items per chunk, chunks)` of a reduction over `work` items.
pub fn reduce_chunks(work: usize) -> (usize, usize) {
    let size = work.div_ceil(REDUCE_CHUNKS).max(1);
    (size, work.div_ceil(size).max(1))
}

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufRole {
    /// Fed before every run (images, labels, seeds).
    Input,
    /// A parameter (fed before every run).
    Param,
    /// A running statistic (fed before every run).
    Buffer,
    /// Computed by a step.
    Temp,
    /// A chunk's partial sums of a reduction step, or a thread's scratch.
    Private,
}

#[derive(Clone, Debug)]
pub struct Buf {
    pub name: String,
    pub shape: Shape,
    pub role: BufRole,
    /// Offset in the arena, in f32 elements (a multiple of 16).
    pub offset: usize,
}

impl Buf {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    Jit(KernelSpec),
    Native(Native),
}

#[derive(Clone, Debug)]
pub struct Step {
    /// The ops it computes, `+`-joined (`batchnorm+relu`).
    pub ops: String,
    /// The model layer of its first node.
    pub layer: Option<String>,
    pub kind: StepKind,
    /// Input buffers, then output buffers.
    pub args: Vec<BufId>,
    pub n_in: usize,
    /// For a `Par::Reduce` kernel: the partial outputs of chunks 1.. (chunk 0
    /// writes the real outputs; see [`REDUCE_CHUNKS`]).
    pub partials: Vec<Vec<BufId>>,
    /// One scratch buffer per thread, when the kernel needs scratch.
    pub scratch: Vec<BufId>,
}

/// A planned graph.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub bufs: Vec<Buf>,
    pub steps: Vec<Step>,
    /// Named graph outputs.
    pub outputs: Vec<(String, BufId)>,
    /// Inputs, parameters and buffers by name.
    pub feeds: Vec<(String, BufId)>,
    /// Arena length in f32 elements.
    pub arena_len: usize,
    /// The number of threads the plan was made for.
    pub threads: usize,
}

impl Plan {
    /// Plans `g` for `threads` threads.
    pub fn new(g: &Graph, threads: usize) -> Plan {
        let threads = threads.max(1);
        let mut p = Planner::new(g, threads);
        p.plan();
        let outputs = g
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), p.buf(*v)))
            .collect();
        let mut feeds = Vec::new();
        for (i, v) in g.values.iter().enumerate() {
            if v.role != Role::Temp {
                if let Some(&b) = p.buf_of.get(&Vid(i)) {
                    feeds.push((v.name.clone(), b));
                }
            }
        }
        let mut plan = Plan {
            name: g.name.clone(),
            bufs: p.bufs,
            steps: p.steps,
            outputs,
            feeds,
            arena_len: 0,
            threads,
        };
        plan.layout();
        plan
    }

    pub fn peak_bytes(&self) -> usize {
        4 * self.arena_len
    }

    pub fn buf(&self, name: &str) -> Option<BufId> {
        self.feeds
            .iter()
            .chain(&self.outputs)
            .find(|(n, _)| n == name)
            .map(|(_, b)| *b)
    }

    /// Places every buffer (see the module doc).
    fn layout(&mut self) {
        let n = self.bufs.len();
        let last = self.steps.len();
        // [first, last] step indices of each buffer's life.
        let mut life: Vec<Option<(usize, usize)>> = vec![None; n];
        let outputs: Vec<BufId> = self.outputs.iter().map(|(_, b)| *b).collect();
        for (i, b) in self.bufs.iter().enumerate() {
            if b.role != BufRole::Temp && b.role != BufRole::Private {
                life[i] = Some((0, last));
            }
        }
        for &b in &outputs {
            life[b] = Some((0, last));
        }
        for (si, s) in self.steps.iter().enumerate() {
            let all = s
                .args
                .iter()
                .chain(s.partials.iter().flatten())
                .chain(&s.scratch);
            for &b in all {
                life[b] = Some(match life[b] {
                    None => (si, si),
                    Some((a, z)) => (a.min(si), z.max(si)),
                });
            }
        }
        let mut order: Vec<BufId> = (0..n).filter(|&b| life[b].is_some()).collect();
        order.sort_by_key(|&b| std::cmp::Reverse(self.bufs[b].len()));
        let mut placed: Vec<(usize, usize, (usize, usize))> = Vec::new(); // offset, len, life
        let mut end = 0;
        for b in order {
            let len = self.bufs[b].len().div_ceil(16) * 16;
            let (a, z) = life[b].expect("filtered");
            let mut clashes: Vec<(usize, usize)> = placed
                .iter()
                .filter(|(_, _, (pa, pz))| *pa <= z && a <= *pz)
                .map(|(o, l, _)| (*o, *l))
                .collect();
            clashes.sort();
            let mut at = 0;
            for (o, l) in clashes {
                if at + len <= o {
                    break;
                }
                at = at.max(o + l);
            }
            self.bufs[b].offset = at;
            placed.push((at, len, (a, z)));
            end = end.max(at + len);
        }
        self.arena_len = end;
    }

    /// The plan as text (`cnnc dump --stage=plan`).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan {}: {} steps, arena {:.2} MB, {} thread{}",
            self.name,
            self.steps.len(),
            self.peak_bytes() as f64 / 1e6,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        );
        let name = |b: BufId| -> String {
            let b = &self.bufs[b];
            format!("{}{:?}@{}", b.name, b.shape, b.offset)
        };
        for (i, s) in self.steps.iter().enumerate() {
            let how = match &s.kind {
                StepKind::Jit(k) => format!("jit {:?}", k.par()).to_lowercase(),
                StepKind::Native(n) => n.label(),
            };
            let ins: Vec<String> = s.args[..s.n_in].iter().map(|&b| name(b)).collect();
            let outs: Vec<String> = s.args[s.n_in..].iter().map(|&b| name(b)).collect();
            let _ = writeln!(
                out,
                "  k{i:<3} {:<28} {:<16} {:<22} {} -> {}",
                s.ops,
                s.layer
                    .as_deref()
                    .map_or("".to_string(), |l| format!("@{l}")),
                how,
                ins.join(", "),
                outs.join(", ")
            );
        }
        out
    }
}

struct Planner<'g> {
    g: &'g Graph,
    threads: usize,
    bufs: Vec<Buf>,
    steps: Vec<Step>,
    /// Canonical value → buffer.
    buf_of: HashMap<Vid, BufId>,
    /// Value → the value it aliases (reshape, stop_gradient).
    aliases: HashMap<Vid, Vid>,
    /// Node indices that read each (canonical) value.
    uses: HashMap<Vid, Vec<usize>>,
    /// Values that are graph outputs.
    is_output: Vec<bool>,
    /// Node → the node whose group absorbed it.
    absorbed: HashMap<usize, usize>,
    /// `batchnorm` node → the conv node whose epilogue writes its partial
    /// statistics (rule 5).
    stats_from: HashMap<usize, usize>,
    /// `batchnorm` node → the partials `(s, q)` its conv writes (set when the
    /// conv is emitted, which comes first).
    partials_of: HashMap<usize, (BufId, BufId)>,
    /// Node inputs after rule 3.
    inputs: Vec<Vec<Vid>>,
    /// Value → the node defining it.
    def: HashMap<Vid, usize>,
}

impl<'g> Planner<'g> {
    fn new(g: &'g Graph, threads: usize) -> Self {
        let mut p = Planner {
            g,
            threads,
            bufs: Vec::new(),
            steps: Vec::new(),
            buf_of: HashMap::new(),
            aliases: HashMap::new(),
            uses: HashMap::new(),
            is_output: vec![false; g.values.len()],
            absorbed: HashMap::new(),
            stats_from: HashMap::new(),
            partials_of: HashMap::new(),
            inputs: Vec::new(),
            def: HashMap::new(),
        };
        for node in &g.nodes {
            if matches!(node.op, Op::Reshape(_) | Op::StopGradient) {
                let src = p.alias(node.inputs[0]);
                p.aliases.insert(node.outputs[0], src);
            }
        }
        for (ni, node) in g.nodes.iter().enumerate() {
            for &o in &node.outputs {
                p.def.insert(o, ni);
            }
        }
        // Rule 3: relu_grad reads the relu output.
        let mut relu_of: HashMap<Vid, Vid> = HashMap::new();
        for node in &g.nodes {
            if node.op == Op::Act(Act::Relu) {
                relu_of.insert(p.alias(node.inputs[0]), node.outputs[0]);
            }
        }
        // Inputs stay the node's own values (a reshape's output keeps its
        // shape); `buf` and `uses` see through aliases.
        for node in &g.nodes {
            let mut ins = node.inputs.clone();
            if node.op == Op::ActGrad(Act::Relu) {
                if let Some(&r) = relu_of.get(&p.alias(ins[1])) {
                    ins[1] = r;
                }
            }
            p.inputs.push(ins);
        }
        for (ni, node) in g.nodes.iter().enumerate() {
            if !is_alias(&node.op) {
                for &v in &p.inputs[ni] {
                    let v = p.alias(v);
                    p.uses.entry(v).or_default().push(ni);
                }
            }
        }
        for (_, v) in &g.outputs {
            let v = p.alias(*v);
            p.is_output[v.0] = true;
        }
        p
    }

    fn alias(&self, v: Vid) -> Vid {
        let mut v = v;
        while let Some(&a) = self.aliases.get(&v) {
            v = a;
        }
        v
    }

    /// The only node reading `v`, when `v` is not a graph output.
    fn sole_use(&self, v: Vid) -> Option<usize> {
        if self.is_output[v.0] {
            return None;
        }
        match self.uses.get(&v).map(|u| u.as_slice()) {
            Some([only]) => Some(*only),
            _ => None,
        }
    }

    fn buf(&mut self, v: Vid) -> BufId {
        let v = self.alias(v);
        if let Some(&b) = self.buf_of.get(&v) {
            return b;
        }
        let val = &self.g.values[v.0];
        let role = match val.role {
            Role::Input => BufRole::Input,
            Role::Param => BufRole::Param,
            Role::Buffer => BufRole::Buffer,
            Role::Temp => BufRole::Temp,
        };
        let b = self.new_buf(val.name.clone(), val.shape.clone(), role);
        self.buf_of.insert(v, b);
        b
    }

    fn new_buf(&mut self, name: String, shape: Shape, role: BufRole) -> BufId {
        self.bufs.push(Buf {
            name,
            shape,
            role,
            offset: 0,
        });
        self.bufs.len() - 1
    }

    fn temp(&mut self, name: &str, shape: Shape) -> BufId {
        let name = format!("%{name}{}", self.bufs.len());
        self.new_buf(name, shape, BufRole::Temp)
    }

    fn push(
        &mut self,
        ops: &str,
        layer: Option<String>,
        kind: StepKind,
        ins: Vec<BufId>,
        outs: Vec<BufId>,
    ) {
        let n_in = ins.len();
        let mut args = ins;
        args.extend(outs);
        let mut step = Step {
            ops: ops.to_string(),
            layer,
            kind,
            args,
            n_in,
            partials: Vec::new(),
            scratch: Vec::new(),
        };
        if let StepKind::Jit(k) = &step.kind {
            if k.par() == Par::Reduce {
                let (_, chunks) = reduce_chunks(k.work());
                for c in 1..chunks {
                    let mut mine = Vec::new();
                    for &o in &step.args[n_in..] {
                        let shape = self.bufs[o].shape.clone();
                        let name = format!("{}.part{c}", self.bufs[o].name);
                        mine.push(self.new_buf(name, shape, BufRole::Private));
                    }
                    step.partials.push(mine);
                }
            }
            let scratch = k.scratch();
            if scratch > 0 {
                for t in 0..self.threads {
                    let name = format!("scratch{}.{t}", self.steps.len());
                    let b = self.new_buf(name, vec![scratch], BufRole::Private);
                    step.scratch.push(b);
                }
            }
        }
        self.steps.push(step);
    }

    fn plan(&mut self) {
        self.find_groups();
        for ni in 0..self.g.nodes.len() {
            if self.absorbed.contains_key(&ni) || is_alias(&self.g.nodes[ni].op) {
                continue;
            }
            self.emit(ni);
        }
    }

    /// Decides which nodes join which group (see the module doc).
    fn find_groups(&mut self) {
        let g = self.g;
        for (ni, node) in g.nodes.iter().enumerate() {
            if self.absorbed.contains_key(&ni) {
                continue;
            }
            match &node.op {
                Op::Conv2d(a) if self.gemm_conv(ni, a) => {
                    // conv2d ← bias_add ← relu, conv2d ← relu
                    let mut out = node.outputs[0];
                    if let Some(u) = self.sole_use(out) {
                        if g.nodes[u].op == Op::BiasAdd && self.alias(self.inputs[u][0]) == out {
                            self.absorbed.insert(u, ni);
                            out = g.nodes[u].outputs[0];
                        }
                    }
                    if let Some(u) = self.sole_use(out) {
                        if g.nodes[u].op == Op::Act(Act::Relu) {
                            self.absorbed.insert(u, ni);
                            out = g.nodes[u].outputs[0];
                        }
                    }
                    // Rule 5: the first training batchnorm of the group's
                    // output takes its statistics from the epilogue.
                    let bn = self.uses.get(&out).and_then(|uses| {
                        uses.iter().copied().find(|&u| {
                            matches!(g.nodes[u].op, Op::BatchNorm { .. })
                                && self.alias(self.inputs[u][0]) == out
                                && g.shape(self.inputs[u][0]) == g.shape(out)
                        })
                    });
                    if let Some(bn) = bn {
                        self.stats_from.insert(bn, ni);
                    }
                }
                Op::SoftmaxXent { smoothing } => {
                    if let Some(u) = self.sole_use(node.outputs[1]) {
                        let grad = &g.nodes[u];
                        let same = grad.op
                            == (Op::SoftmaxXentGrad {
                                smoothing: *smoothing,
                            })
                            && self.alias(self.inputs[u][0]) == node.outputs[1]
                            && self.alias(self.inputs[u][1]) == self.alias(self.inputs[ni][1]);
                        if same {
                            self.absorbed.insert(u, ni);
                        }
                    }
                }
                Op::BatchNorm { .. } | Op::BatchNormInfer { .. } | Op::BiasAdd => {
                    if let Some(u) = self.sole_use(node.outputs[0]) {
                        if g.nodes[u].op == Op::Act(Act::Relu) {
                            self.absorbed.insert(u, ni);
                        }
                    }
                }
                Op::ActGrad(Act::Relu) => {
                    if let Some(u) = self.sole_use(node.outputs[0]) {
                        let bn_dy = matches!(g.nodes[u].op, Op::BatchNormGrad { .. })
                            && self.alias(self.inputs[u][0]) == node.outputs[0];
                        if bn_dy {
                            self.absorbed.insert(ni, u);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether conv node `ni` runs as im2col + GEMM (which fuses its epilogue):
    /// not depthwise, and not a shape where the direct kernel is faster.
    fn gemm_conv(&self, ni: usize, a: &ConvAttrs) -> bool {
        let node = &self.g.nodes[ni];
        let (x, w) = (self.g.shape(node.inputs[0]), self.g.shape(node.inputs[1]));
        !is_depthwise(a, x[1]) && !conv::prefer_direct(x, w, a)
    }

    /// The node of `absorbed` whose group anchor is `ni` and whose op is `op`.
    fn partner(&self, ni: usize, op: &Op) -> Option<usize> {
        self.absorbed
            .iter()
            .find(|(&k, &v)| v == ni && self.g.nodes[k].op == *op)
            .map(|(&k, _)| k)
    }

    fn emit(&mut self, ni: usize) {
        let g = self.g;
        let node = &g.nodes[ni];
        let layer = node.layer.clone();
        let ins: Vec<Vid> = self.inputs[ni].clone();
        let shape = |v: Vid| g.shape(v).clone();
        match &node.op {
            Op::BatchNorm { eps } => {
                let relu = self.partner(ni, &Op::Act(Act::Relu));
                let x_shape = shape(ins[0]);
                let c = x_shape[1];
                let x = self.buf(ins[0]);
                let (gamma, beta) = (self.buf(ins[1]), self.buf(ins[2]));
                let y = match relu {
                    Some(r) => self.buf(g.nodes[r].outputs[0]),
                    None => self.buf(node.outputs[0]),
                };
                let mean = self.buf(node.outputs[1]);
                let var = self.buf(node.outputs[2]);
                let ops = if relu.is_some() {
                    "batchnorm+relu"
                } else {
                    "batchnorm"
                };
                let k = |n| StepKind::Jit(KernelSpec::Norm(n));
                if let Some(&(s, q)) = self.partials_of.get(&ni) {
                    // Rule 5: the conv wrote per-item partials.
                    self.push(
                        ops,
                        layer.clone(),
                        k(NormKernel::BnCombine {
                            shape: x_shape.clone(),
                        }),
                        vec![s, q],
                        vec![mean, var],
                    );
                } else {
                    let s = self.temp("bn_sum", vec![c]);
                    let q = self.temp("bn_sqdev", vec![c]);
                    self.push(
                        ops,
                        layer.clone(),
                        k(NormKernel::BnSum {
                            shape: x_shape.clone(),
                        }),
                        vec![x],
                        vec![s],
                    );
                    self.push(
                        ops,
                        layer.clone(),
                        k(NormKernel::BnSqDev {
                            shape: x_shape.clone(),
                        }),
                        vec![x, s],
                        vec![q],
                    );
                    self.push(
                        ops,
                        layer.clone(),
                        k(NormKernel::BnStats {
                            shape: x_shape.clone(),
                        }),
                        vec![s, q],
                        vec![mean, var],
                    );
                }
                self.push(
                    ops,
                    layer,
                    k(NormKernel::BnApply {
                        shape: x_shape,
                        eps: *eps,
                        relu: relu.is_some(),
                    }),
                    vec![x, gamma, beta, mean, var],
                    vec![y],
                );
            }
            Op::Conv2d(a) if self.gemm_conv(ni, a) => {
                let bias = self.partner(ni, &Op::BiasAdd);
                let relu = self.partner(ni, &Op::Act(Act::Relu));
                let mut args = vec![self.buf(ins[0]), self.buf(ins[1])];
                let mut ops = "conv2d".to_string();
                let mut last = node.outputs[0];
                if let Some(b) = bias {
                    args.push(self.buf(self.inputs[b][1]));
                    ops.push_str("+bias_add");
                    last = g.nodes[b].outputs[0];
                }
                if let Some(r) = relu {
                    ops.push_str("+relu");
                    last = g.nodes[r].outputs[0];
                }
                let mut outs = vec![self.buf(last)];
                let bn = self
                    .stats_from
                    .iter()
                    .find(|(_, &conv)| conv == ni)
                    .map(|(&bn, _)| bn);
                if let Some(bn) = bn {
                    let nc = shape(last)[..2].to_vec();
                    let s = self.temp("bn_sums", nc.clone());
                    let q = self.temp("bn_sqdevs", nc);
                    outs.extend([s, q]);
                    self.partials_of.insert(bn, (s, q));
                    ops.push_str("+batchnorm_sums");
                }
                let kind = StepKind::Jit(KernelSpec::Conv(ConvKernel::Forward {
                    x: shape(ins[0]),
                    w: shape(ins[1]),
                    attrs: *a,
                    bias: bias.is_some(),
                    relu: relu.is_some(),
                    stats: bn.is_some(),
                }));
                self.push(&ops, layer, kind, args, outs);
            }
            Op::Conv2d(a) if !is_depthwise(a, shape(ins[0])[1]) => {
                // The direct kernel (faster on this shape); bias and relu separate.
                let kind = StepKind::Jit(KernelSpec::Conv(ConvKernel::Direct {
                    x: shape(ins[0]),
                    w: shape(ins[1]),
                    attrs: *a,
                }));
                let args = vec![self.buf(ins[0]), self.buf(ins[1])];
                let y = self.buf(node.outputs[0]);
                self.push("conv2d", layer, kind, args, vec![y]);
            }
            Op::SoftmaxXent { smoothing }
                if self
                    .partner(
                        ni,
                        &Op::SoftmaxXentGrad {
                            smoothing: *smoothing,
                        },
                    )
                    .is_some() =>
            {
                let grad = self
                    .partner(
                        ni,
                        &Op::SoftmaxXentGrad {
                            smoothing: *smoothing,
                        },
                    )
                    .expect("checked");
                let s = shape(ins[0]);
                let kind = StepKind::Native(Native::SoftmaxXentFused {
                    n: s[0],
                    k: s[1],
                    smoothing: *smoothing,
                });
                let args = vec![self.buf(ins[0]), self.buf(ins[1])];
                let outs = vec![
                    self.buf(node.outputs[0]),
                    self.buf(g.nodes[grad].outputs[0]),
                ];
                self.push("softmax_xent+softmax_xent_grad", layer, kind, args, outs);
            }
            Op::BatchNormInfer { eps } => {
                let relu = self.partner(ni, &Op::Act(Act::Relu));
                let args: Vec<BufId> = ins.iter().map(|&v| self.buf(v)).collect();
                let y = match relu {
                    Some(r) => self.buf(g.nodes[r].outputs[0]),
                    None => self.buf(node.outputs[0]),
                };
                let ops = if relu.is_some() {
                    "batchnorm_infer+relu"
                } else {
                    "batchnorm_infer"
                };
                let kind = StepKind::Jit(KernelSpec::Norm(NormKernel::BnApply {
                    shape: shape(ins[0]),
                    eps: *eps,
                    relu: relu.is_some(),
                }));
                self.push(ops, layer, kind, args, vec![y]);
            }
            Op::BatchNormGrad { eps } => {
                let mask = self.partner(ni, &Op::ActGrad(Act::Relu));
                let x_shape = shape(ins[1]);
                // With the relu_grad absorbed: dy is its dy, and its mask input
                // (the relu output, by rule 3) comes last.
                let (dy, relu_out) = match mask {
                    Some(m) => {
                        let mi = self.inputs[m].clone();
                        (self.buf(mi[0]), Some(self.buf(mi[1])))
                    }
                    None => (self.buf(ins[0]), None),
                };
                let (x, gamma, mean, var) = (
                    self.buf(ins[1]),
                    self.buf(ins[2]),
                    self.buf(ins[3]),
                    self.buf(ins[4]),
                );
                let dx = self.buf(node.outputs[0]);
                let dgamma = self.buf(node.outputs[1]);
                let dbeta = self.buf(node.outputs[2]);
                let relu = relu_out.is_some();
                let ops = if relu {
                    "relu_grad+batchnorm_grad"
                } else {
                    "batchnorm_grad"
                };
                let mut sums_in = vec![dy, x, mean, var];
                let mut apply_in = vec![dy, x, gamma, mean, var, dgamma, dbeta];
                if let Some(r) = relu_out {
                    sums_in.push(r);
                    apply_in.push(r);
                }
                let k = |n| StepKind::Jit(KernelSpec::Norm(n));
                self.push(
                    ops,
                    layer.clone(),
                    k(NormKernel::BnGradSums {
                        shape: x_shape.clone(),
                        eps: *eps,
                        relu,
                    }),
                    sums_in,
                    vec![dgamma, dbeta],
                );
                self.push(
                    ops,
                    layer,
                    k(NormKernel::BnGradApply {
                        shape: x_shape,
                        eps: *eps,
                        relu,
                    }),
                    apply_in,
                    vec![dx],
                );
            }
            Op::BiasAdd if self.partner(ni, &Op::Act(Act::Relu)).is_some() => {
                let r = self.partner(ni, &Op::Act(Act::Relu)).expect("checked");
                let x = self.buf(ins[0]);
                let b = self.buf(ins[1]);
                let y = self.buf(g.nodes[r].outputs[0]);
                let kind = StepKind::Jit(KernelSpec::Elem(ElemKernel::BiasAct {
                    shape: shape(ins[0]),
                    relu: true,
                }));
                self.push("bias_add+relu", layer, kind, vec![x, b], vec![y]);
            }
            Op::MatMul { ta, tb } => {
                let kind =
                    StepKind::Native(Native::matmul(&shape(ins[0]), &shape(ins[1]), *ta, *tb));
                let args: Vec<BufId> = ins.iter().map(|&v| self.buf(v)).collect();
                let outs = vec![self.buf(node.outputs[0])];
                self.push("matmul", layer, kind, args, outs);
            }
            op => {
                let mut one = node.clone();
                one.inputs = ins.clone();
                let kind = match KernelSpec::from_node(g, &one) {
                    Some(k) => StepKind::Jit(k),
                    None => StepKind::Native(Native::for_op(
                        op,
                        ins.iter().map(|&v| shape(v)).collect(),
                        node.outputs.iter().map(|&v| shape(v)).collect(),
                    )),
                };
                let args: Vec<BufId> = ins.iter().map(|&v| self.buf(v)).collect();
                let outs: Vec<BufId> = node.outputs.iter().map(|&v| self.buf(v)).collect();
                self.push(op.name(), layer, kind, args, outs);
            }
        }
    }
}

fn is_alias(op: &Op) -> bool {
    matches!(op, Op::Reshape(_) | Op::StopGradient)
}
