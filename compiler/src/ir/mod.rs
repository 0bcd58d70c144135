//! The graph IR: a small set of tensor ops with static shapes (NCHW, the batch
//! included), in SSA form. Lowering builds the forward graph from a checked model;
//! autodiff appends backward ops to the same graph; the interpreter runs any graph.
//!
//! - `mod.rs`: values, nodes, ops and their shape rules (`Op::infer`);
//! - `lower.rs`: checked model → forward graph (train or eval mode);
//! - `autodiff.rs`: one rule per op, emitting backward ops;
//! - `text.rs`: the text form (printer and parser; they round-trip);
//! - `verify.rs`: the invariants every pass must keep.

pub mod autodiff;
pub mod lower;
pub mod text;
pub mod verify;

use serde::Serialize;

/// Index of a value in `Graph::values`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Vid(pub usize);

pub type Shape = Vec<usize>;

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Role {
    /// Fed by the caller for every run: images, labels, a dropout seed, a class seed.
    Input,
    /// A trainable or frozen parameter (`c1.weight`).
    Param,
    /// State carried between steps but not trained (`bn1.running_mean`).
    Buffer,
    /// Computed by a node.
    Temp,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Value {
    /// Inputs, params and buffers have their external name; temps are `%N`.
    pub name: String,
    pub shape: Shape,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<Vid>,
    pub outputs: Vec<Vid>,
    /// The model layer this node implements (forward) or differentiates
    /// (backward), for diagnostics and profiles.
    pub layer: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    /// In execution order; every input of a node is defined before it.
    pub nodes: Vec<Node>,
    /// Named results, in order: `loss`, `grad:c1.weight`, `update:bn1.running_mean`, …
    pub outputs: Vec<(String, Vid)>,
}

/// Convolution attributes (PyTorch's `conv2d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConvAttrs {
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

/// Pooling window attributes. Average pooling counts padding in the divisor
/// (PyTorch's `count_include_pad=True`); max pooling ignores padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PoolAttrs {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
}

/// Elementwise activations.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Act {
    Relu,
    LeakyRelu(f64),
    Sigmoid,
    Tanh,
    /// The exact (erf) form, PyTorch's default.
    Gelu,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Op {
    /// `(x[N,C,H,W], w[O,C/g,kh,kw]) → y[N,O,H',W']`
    Conv2d(ConvAttrs),
    /// `(dy[N,O,H',W'], w) → dx[N,C,H,W]`; carries the input's spatial size.
    Conv2dGradInput(ConvAttrs, [usize; 2]),
    /// `(x, dy) → dw[O,C/g,kh,kw]`; carries the kernel size.
    Conv2dGradWeight(ConvAttrs, [usize; 2]),
    /// `(x[N,C,…], b[C]) → x + b` broadcast over every axis but 1.
    BiasAdd,
    /// `dy[N,C,…] → db[C]`: the sum over every axis but 1.
    BiasGrad,
    /// `(a, b) → op(a)·op(b)` for 2-D tensors, op = transpose when the flag is set.
    MatMul { ta: bool, tb: bool },
    /// Training mode: `(x, gamma, beta) → (y, mean[C], var[C])`, batch statistics
    /// over N (and H, W), biased variance.
    BatchNorm { eps: f64 },
    /// Inference mode: `(x, gamma, beta, running_mean, running_var) → y`.
    BatchNormInfer { eps: f64 },
    /// `(dy, x, gamma, mean, var) → (dx, dgamma, dbeta)`.
    BatchNormGrad { eps: f64 },
    /// Inference mode, input gradient only: `(dy, gamma, running_var) → dy·gamma/sqrt(var+eps)`.
    BatchNormInferGrad { eps: f64 },
    /// `(running_mean, running_var, mean, var) → (running_mean', running_var')`:
    /// `r' = (1-momentum)·r + momentum·batch`, the variance made unbiased with
    /// `n = numel / C` (as PyTorch).
    RunningStats { momentum: f64, n: usize },
    /// `(x[N,C,H,W], gamma, beta) → (y, mean[N,G], var[N,G])`.
    GroupNorm { groups: usize, eps: f64 },
    /// `(dy, x, gamma, mean, var) → (dx, dgamma, dbeta)`.
    GroupNormGrad { groups: usize, eps: f64 },
    /// `x → act(x)`.
    Act(Act),
    /// `(dy, x) → dy · act'(x)`.
    ActGrad(Act),
    /// `x → max over each window`.
    MaxPool(PoolAttrs),
    /// `(dy, x) → dx`: each window's gradient goes to its first maximum.
    MaxPoolGrad(PoolAttrs),
    /// `x → mean over each window`.
    AvgPool(PoolAttrs),
    /// `dy → dx`; carries the input's spatial size.
    AvgPoolGrad(PoolAttrs, [usize; 2]),
    /// `x[N,C,H,W] → [N,C]`.
    GlobalAvgPool,
    /// `dy[N,C] → [N,C,H,W]`, each position `dy/(H·W)`.
    GlobalAvgPoolGrad([usize; 2]),
    /// Same elements, new shape.
    Reshape(Shape),
    /// `(a, b, …) → a + b + …`, all of one shape.
    Add,
    /// `(a, b, …) → a ‖ b ‖ …` along axis 1.
    Concat,
    /// `x → x[:, start..start+len]` along axis 1.
    Slice { start: usize, len: usize },
    /// `(x, seed[]) → x · mask / (1-p)`, the mask drawn from (seed, salt, index).
    Dropout { p: f64, salt: u64 },
    /// `(dy, seed[]) → dy · mask / (1-p)`, the same mask.
    DropoutGrad { p: f64, salt: u64 },
    /// Identity whose gradient is zero (`detach`).
    StopGradient,
    /// `(logits[N,K], labels[N]) → (loss[], probs[N,K])`: mean cross-entropy with
    /// label smoothing.
    SoftmaxXent { smoothing: f64 },
    /// `(probs, labels) → dlogits = (probs - target) / N`.
    SoftmaxXentGrad { smoothing: f64 },
    /// `(logits[N,K], labels[N]) → count[]` of rows whose first maximum is the label.
    CountCorrect,
    /// `classes[N] → [N,K]` one-hot rows: the seed for gradients of class scores.
    OneHot { classes: usize },
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv2d(_) => "conv2d",
            Op::Conv2dGradInput(..) => "conv2d_grad_input",
            Op::Conv2dGradWeight(..) => "conv2d_grad_weight",
            Op::BiasAdd => "bias_add",
            Op::BiasGrad => "bias_grad",
            Op::MatMul { .. } => "matmul",
            Op::BatchNorm { .. } => "batchnorm",
            Op::BatchNormInfer { .. } => "batchnorm_infer",
            Op::BatchNormGrad { .. } => "batchnorm_grad",
            Op::BatchNormInferGrad { .. } => "batchnorm_infer_grad",
            Op::RunningStats { .. } => "running_stats",
            Op::GroupNorm { .. } => "groupnorm",
            Op::GroupNormGrad { .. } => "groupnorm_grad",
            Op::Act(_) => "act",
            Op::ActGrad(_) => "act_grad",
            Op::MaxPool(_) => "maxpool",
            Op::MaxPoolGrad(_) => "maxpool_grad",
            Op::AvgPool(_) => "avgpool",
            Op::AvgPoolGrad(..) => "avgpool_grad",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::GlobalAvgPoolGrad(_) => "global_avg_pool_grad",
            Op::Reshape(_) => "reshape",
            Op::Add => "add",
            Op::Concat => "concat",
            Op::Slice { .. } => "slice",
            Op::Dropout { .. } => "dropout",
            Op::DropoutGrad { .. } => "dropout_grad",
            Op::StopGradient => "stop_gradient",
            Op::SoftmaxXent { .. } => "softmax_xent",
            Op::SoftmaxXentGrad { .. } => "softmax_xent_grad",
            Op::CountCorrect => "count_correct",
            Op::OneHot { .. } => "one_hot",
        }
    }

    /// Output shapes from input shapes, or why the inputs do not fit the op.
    pub fn infer(&self, ins: &[&Shape]) -> Result<Vec<Shape>, String> {
        let arity = |n: usize| -> Result<(), String> {
            if ins.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "{} takes {n} inputs, got {}",
                    self.name(),
                    ins.len()
                ))
            }
        };
        let rank = |i: usize, r: usize| -> Result<(), String> {
            if ins[i].len() == r {
                Ok(())
            } else {
                Err(format!(
                    "input {i} of {} must have rank {r}, got {:?}",
                    self.name(),
                    ins[i]
                ))
            }
        };
        let same = |a: usize, b: usize| -> Result<(), String> {
            if ins[a] == ins[b] {
                Ok(())
            } else {
                Err(format!(
                    "inputs {a} and {b} of {} differ: {:?} vs {:?}",
                    self.name(),
                    ins[a],
                    ins[b]
                ))
            }
        };
        let channels = |i: usize, c: usize| -> Result<(), String> {
            if ins[i] == &vec![c] {
                Ok(())
            } else {
                Err(format!(
                    "input {i} of {} must be [{c}], got {:?}",
                    self.name(),
                    ins[i]
                ))
            }
        };
        Ok(match self {
            Op::Conv2d(a) => {
                arity(2)?;
                rank(0, 4)?;
                rank(1, 4)?;
                let (x, w) = (ins[0], ins[1]);
                if x[1] != w[1] * a.groups || w[0] % a.groups != 0 {
                    return Err(format!(
                        "conv2d: input {x:?} and weight {w:?} do not match groups {}",
                        a.groups
                    ));
                }
                let h = window_out(x[2], w[2], a.stride[0], a.pad[0], a.dilation[0])?;
                let wd = window_out(x[3], w[3], a.stride[1], a.pad[1], a.dilation[1])?;
                vec![vec![x[0], w[0], h, wd]]
            }
            Op::Conv2dGradInput(a, hw) => {
                arity(2)?;
                rank(0, 4)?;
                rank(1, 4)?;
                let (dy, w) = (ins[0], ins[1]);
                let x = vec![dy[0], w[1] * a.groups, hw[0], hw[1]];
                let expect = Op::Conv2d(*a).infer(&[&x, w])?;
                if &expect[0] != dy {
                    return Err(format!(
                        "conv2d_grad_input: dy {dy:?} does not match {:?}",
                        expect[0]
                    ));
                }
                vec![x]
            }
            Op::Conv2dGradWeight(a, k) => {
                arity(2)?;
                rank(0, 4)?;
                rank(1, 4)?;
                let (x, dy) = (ins[0], ins[1]);
                let w = vec![dy[1], x[1] / a.groups, k[0], k[1]];
                let expect = Op::Conv2d(*a).infer(&[x, &w])?;
                if &expect[0] != dy {
                    return Err(format!(
                        "conv2d_grad_weight: dy {dy:?} does not match {:?}",
                        expect[0]
                    ));
                }
                vec![w]
            }
            Op::BiasAdd => {
                arity(2)?;
                if ins[0].len() < 2 {
                    return Err("bias_add needs rank >= 2".into());
                }
                channels(1, ins[0][1])?;
                vec![ins[0].clone()]
            }
            Op::BiasGrad => {
                arity(1)?;
                if ins[0].len() < 2 {
                    return Err("bias_grad needs rank >= 2".into());
                }
                vec![vec![ins[0][1]]]
            }
            Op::MatMul { ta, tb } => {
                arity(2)?;
                rank(0, 2)?;
                rank(1, 2)?;
                let (m, k1) = if *ta {
                    (ins[0][1], ins[0][0])
                } else {
                    (ins[0][0], ins[0][1])
                };
                let (k2, n) = if *tb {
                    (ins[1][1], ins[1][0])
                } else {
                    (ins[1][0], ins[1][1])
                };
                if k1 != k2 {
                    return Err(format!("matmul: inner sizes differ ({k1} vs {k2})"));
                }
                vec![vec![m, n]]
            }
            Op::BatchNorm { .. } => {
                arity(3)?;
                let c = norm_channels(ins[0])?;
                channels(1, c)?;
                channels(2, c)?;
                vec![ins[0].clone(), vec![c], vec![c]]
            }
            Op::BatchNormInfer { .. } => {
                arity(5)?;
                let c = norm_channels(ins[0])?;
                for i in 1..5 {
                    channels(i, c)?;
                }
                vec![ins[0].clone()]
            }
            Op::BatchNormGrad { .. } => {
                arity(5)?;
                same(0, 1)?;
                let c = norm_channels(ins[0])?;
                for i in 2..5 {
                    channels(i, c)?;
                }
                vec![ins[0].clone(), vec![c], vec![c]]
            }
            Op::BatchNormInferGrad { .. } => {
                arity(3)?;
                let c = norm_channels(ins[0])?;
                channels(1, c)?;
                channels(2, c)?;
                vec![ins[0].clone()]
            }
            Op::RunningStats { .. } => {
                arity(4)?;
                rank(0, 1)?;
                for i in 1..4 {
                    same(0, i)?;
                }
                vec![ins[0].clone(), ins[0].clone()]
            }
            Op::GroupNorm { groups, .. } => {
                arity(3)?;
                rank(0, 4)?;
                let c = ins[0][1];
                if !c.is_multiple_of(*groups) {
                    return Err(format!(
                        "groupnorm: {groups} groups do not divide {c} channels"
                    ));
                }
                channels(1, c)?;
                channels(2, c)?;
                vec![
                    ins[0].clone(),
                    vec![ins[0][0], *groups],
                    vec![ins[0][0], *groups],
                ]
            }
            Op::GroupNormGrad { groups, .. } => {
                arity(5)?;
                same(0, 1)?;
                rank(0, 4)?;
                let c = ins[0][1];
                channels(2, c)?;
                let stats = vec![ins[0][0], *groups];
                if ins[3] != &stats || ins[4] != &stats {
                    return Err(format!("groupnorm_grad: statistics must be {stats:?}"));
                }
                vec![ins[0].clone(), vec![c], vec![c]]
            }
            Op::Act(_) | Op::StopGradient => {
                arity(1)?;
                vec![ins[0].clone()]
            }
            Op::ActGrad(_) => {
                arity(2)?;
                same(0, 1)?;
                vec![ins[0].clone()]
            }
            Op::MaxPool(p) | Op::AvgPool(p) => {
                arity(1)?;
                rank(0, 4)?;
                vec![pool_out(ins[0], p)?]
            }
            Op::MaxPoolGrad(p) => {
                arity(2)?;
                rank(1, 4)?;
                let y = pool_out(ins[1], p)?;
                if ins[0] != &y {
                    return Err(format!(
                        "maxpool_grad: dy {:?} does not match {y:?}",
                        ins[0]
                    ));
                }
                vec![ins[1].clone()]
            }
            Op::AvgPoolGrad(p, hw) => {
                arity(1)?;
                rank(0, 4)?;
                let x = vec![ins[0][0], ins[0][1], hw[0], hw[1]];
                let y = pool_out(&x, p)?;
                if ins[0] != &y {
                    return Err(format!(
                        "avgpool_grad: dy {:?} does not match {y:?}",
                        ins[0]
                    ));
                }
                vec![x]
            }
            Op::GlobalAvgPool => {
                arity(1)?;
                rank(0, 4)?;
                vec![vec![ins[0][0], ins[0][1]]]
            }
            Op::GlobalAvgPoolGrad(hw) => {
                arity(1)?;
                rank(0, 2)?;
                vec![vec![ins[0][0], ins[0][1], hw[0], hw[1]]]
            }
            Op::Reshape(s) => {
                arity(1)?;
                if s.iter().product::<usize>() != ins[0].iter().product::<usize>() {
                    return Err(format!("reshape: {:?} and {s:?} differ in size", ins[0]));
                }
                vec![s.clone()]
            }
            Op::Add => {
                if ins.len() < 2 {
                    return Err("add takes at least 2 inputs".into());
                }
                for i in 1..ins.len() {
                    same(0, i)?;
                }
                vec![ins[0].clone()]
            }
            Op::Concat => {
                if ins.is_empty() {
                    return Err("concat takes at least 1 input".into());
                }
                let mut out = ins[0].clone();
                for s in &ins[1..] {
                    if s.len() != out.len() || s[0] != out[0] || s[2..] != out[2..] {
                        return Err(format!("concat: {s:?} does not fit {out:?}"));
                    }
                    out[1] += s[1];
                }
                vec![out]
            }
            Op::Slice { start, len } => {
                arity(1)?;
                if ins[0].len() < 2 || start + len > ins[0][1] {
                    return Err(format!("slice {start}+{len} out of {:?}", ins[0]));
                }
                let mut out = ins[0].clone();
                out[1] = *len;
                vec![out]
            }
            Op::Dropout { .. } | Op::DropoutGrad { .. } => {
                arity(2)?;
                rank(1, 0)?;
                vec![ins[0].clone()]
            }
            Op::SoftmaxXent { .. } => {
                arity(2)?;
                rank(0, 2)?;
                if ins[1] != &vec![ins[0][0]] {
                    return Err(format!(
                        "softmax_xent: labels {:?} for logits {:?}",
                        ins[1], ins[0]
                    ));
                }
                vec![vec![], ins[0].clone()]
            }
            Op::SoftmaxXentGrad { .. } => {
                arity(2)?;
                rank(0, 2)?;
                if ins[1] != &vec![ins[0][0]] {
                    return Err(format!(
                        "softmax_xent_grad: labels {:?} for probs {:?}",
                        ins[1], ins[0]
                    ));
                }
                vec![ins[0].clone()]
            }
            Op::CountCorrect => {
                arity(2)?;
                rank(0, 2)?;
                if ins[1] != &vec![ins[0][0]] {
                    return Err(format!(
                        "count_correct: labels {:?} for logits {:?}",
                        ins[1], ins[0]
                    ));
                }
                vec![vec![]]
            }
            Op::OneHot { classes } => {
                arity(1)?;
                rank(0, 1)?;
                vec![vec![ins[0][0], *classes]]
            }
        })
    }
}

/// `[N, C, …]` → C, for norms over rank-2 or rank-4 inputs.
fn norm_channels(s: &Shape) -> Result<usize, String> {
    match s.len() {
        2 | 4 => Ok(s[1]),
        _ => Err(format!(
            "norm input must be [N, C] or [N, C, H, W], got {s:?}"
        )),
    }
}

/// `floor((n + 2p - d(k-1) - 1)/s) + 1`, which must be positive.
pub fn window_out(n: usize, k: usize, s: usize, p: usize, d: usize) -> Result<usize, String> {
    let reach = (n + 2 * p) as i64 - (d * (k - 1)) as i64 - 1;
    if reach < 0 || s == 0 {
        return Err(format!(
            "window {k} (dilation {d}, stride {s}, pad {p}) does not fit {n}"
        ));
    }
    Ok(reach as usize / s + 1)
}

fn pool_out(x: &Shape, p: &PoolAttrs) -> Result<Shape, String> {
    let h = window_out(x[2], p.kernel[0], p.stride[0], p.pad[0], 1)?;
    let w = window_out(x[3], p.kernel[1], p.stride[1], p.pad[1], 1)?;
    Ok(vec![x[0], x[1], h, w])
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn shape(&self, v: Vid) -> &Shape {
        &self.values[v.0].shape
    }

    /// Adds an input, parameter or buffer.
    pub fn add_value(&mut self, name: impl Into<String>, shape: Shape, role: Role) -> Vid {
        self.values.push(Value {
            name: name.into(),
            shape,
            role,
        });
        Vid(self.values.len() - 1)
    }

    /// Appends a node, inferring its output shapes. Panics on a shape mismatch:
    /// lowering and autodiff only build graphs the checker has proven consistent,
    /// so a mismatch is a bug in cnnc.
    pub fn push(&mut self, op: Op, inputs: &[Vid], layer: Option<&str>) -> Vec<Vid> {
        let shapes: Vec<&Shape> = inputs.iter().map(|v| self.shape(*v)).collect();
        let outs = op
            .infer(&shapes)
            .unwrap_or_else(|e| panic!("internal error: building {}: {e}", op.name()));
        let outputs: Vec<Vid> = outs
            .into_iter()
            .map(|shape| {
                let id = self.values.len();
                self.values.push(Value {
                    name: format!("%{id}"),
                    shape,
                    role: Role::Temp,
                });
                Vid(id)
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            layer: layer.map(String::from),
        });
        outputs
    }

    /// Appends a one-output node.
    pub fn push1(&mut self, op: Op, inputs: &[Vid], layer: Option<&str>) -> Vid {
        self.push(op, inputs, layer)[0]
    }

    pub fn output(&self, name: &str) -> Option<Vid> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    pub fn value_by_name(&self, name: &str) -> Option<Vid> {
        self.values.iter().position(|v| v.name == name).map(Vid)
    }

    /// Values with the given role, in order.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = Vid> + '_ {
        self.values
            .iter()
            .enumerate()
            .filter(move |(_, v)| v.role == role)
            .map(|(i, _)| Vid(i))
    }
}

/// Whether dropout keeps element `index`: a counter-based draw from
/// (seed, salt, index), so the forward and backward ops (and every backend)
/// agree on the mask without storing it.
pub fn dropout_keep(seed: u64, salt: u64, index: u64, p: f64) -> bool {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(salt.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(index);
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    u >= p
}
