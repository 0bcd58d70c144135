//! Lowering: checked model → forward graph, in training or inference mode, and the
//! three graphs the runtime runs: the training step (loss, gradients, running-stat
//! updates), evaluation (loss, correct count, logits) and the input gradient of one
//! class score (saliency).
//!
//! Names: the images are input `x`, labels `labels`, the dropout seed `seed`, the
//! classes to explain `class`; parameters and buffers keep their checkpoint names
//! (`c1.weight`, `bn1.running_mean`). Graph outputs are `loss`, `correct`, `logits`,
//! `grad:<param>`, `update:<buffer>` and `grad:x`.

use super::autodiff::{backward, Seed};
use super::*;
use crate::checked::{CheckedModel, Op as L, ValueId};
use crate::params::{param_specs, ParamKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics, running-stat updates, dropout on.
    Train,
    /// Running statistics, dropout off.
    Infer,
}

/// A forward graph and where its key values are.
pub struct Forward {
    pub graph: Graph,
    pub x: Vid,
    pub logits: Vid,
    /// The graph value of each model value (index = `ValueId`).
    pub values: Vec<Vid>,
}

/// The forward pass of `m` for a batch of `batch` images.
pub fn forward(m: &CheckedModel, mode: Mode, batch: usize, name: &str) -> Forward {
    let mut g = Graph::new(name);
    let dims = |s: &Vec<u64>| -> Shape {
        std::iter::once(batch)
            .chain(s.iter().map(|&d| d as usize))
            .collect()
    };
    let x = g.add_value("x", dims(&m.input), Role::Input);
    let mut params = std::collections::HashMap::new();
    for p in param_specs(m) {
        if p.kind == ParamKind::BatchesTracked {
            continue;
        }
        let role = if p.kind.is_trainable() {
            Role::Param
        } else {
            Role::Buffer
        };
        params.insert(p.name.clone(), g.add_value(&p.name, p.shape.clone(), role));
    }
    let has_dropout = m.layers.iter().any(|l| matches!(l.op, L::Dropout { .. }));
    let seed =
        (mode == Mode::Train && has_dropout).then(|| g.add_value("seed", vec![], Role::Input));
    let mut values = vec![x];
    for (i, l) in m.layers.iter().enumerate() {
        let name = Some(l.name.as_str());
        let p = |suffix: &str| params[&format!("{}.{suffix}", l.name)];
        let ins: Vec<Vid> = l.inputs.iter().map(|v: &ValueId| values[v.0]).collect();
        let x0 = ins[0];
        let y = match &l.op {
            L::Conv {
                stride,
                pad,
                dilation,
                groups,
                bias,
                ..
            } => {
                let attrs = ConvAttrs {
                    stride: hw(stride),
                    pad: hw(pad),
                    dilation: hw(dilation),
                    groups: *groups as usize,
                };
                let y = g.push1(Op::Conv2d(attrs), &[x0, p("weight")], name);
                if *bias {
                    g.push1(Op::BiasAdd, &[y, p("bias")], name)
                } else {
                    y
                }
            }
            L::Linear { bias, .. } => {
                let y = g.push1(
                    Op::MatMul {
                        ta: false,
                        tb: true,
                    },
                    &[x0, p("weight")],
                    name,
                );
                if *bias {
                    g.push1(Op::BiasAdd, &[y, p("bias")], name)
                } else {
                    y
                }
            }
            L::BatchNorm { momentum, eps } => {
                let (gamma, beta) = (p("weight"), p("bias"));
                let (rm, rv) = (p("running_mean"), p("running_var"));
                match mode {
                    Mode::Train => {
                        let o = g.push(Op::BatchNorm { eps: *eps }, &[x0, gamma, beta], name);
                        let shape = g.shape(x0);
                        let n = shape.iter().product::<usize>() / shape[1];
                        let upd = g.push(
                            Op::RunningStats {
                                momentum: *momentum,
                                n,
                            },
                            &[rm, rv, o[1], o[2]],
                            name,
                        );
                        g.outputs
                            .push((format!("update:{}.running_mean", l.name), upd[0]));
                        g.outputs
                            .push((format!("update:{}.running_var", l.name), upd[1]));
                        o[0]
                    }
                    Mode::Infer => g.push1(
                        Op::BatchNormInfer { eps: *eps },
                        &[x0, gamma, beta, rm, rv],
                        name,
                    ),
                }
            }
            L::GroupNorm { groups, eps } => g.push(
                Op::GroupNorm {
                    groups: *groups as usize,
                    eps: *eps,
                },
                &[x0, p("weight"), p("bias")],
                name,
            )[0],
            L::Relu => g.push1(Op::Act(Act::Relu), &[x0], name),
            L::LeakyRelu { slope } => g.push1(Op::Act(Act::LeakyRelu(*slope)), &[x0], name),
            L::Sigmoid => g.push1(Op::Act(Act::Sigmoid), &[x0], name),
            L::Tanh => g.push1(Op::Act(Act::Tanh), &[x0], name),
            L::Gelu => g.push1(Op::Act(Act::Gelu), &[x0], name),
            L::MaxPool {
                kernel,
                stride,
                pad,
            } => g.push1(Op::MaxPool(pool(kernel, stride, pad)), &[x0], name),
            L::AvgPool {
                kernel,
                stride,
                pad,
            } => g.push1(Op::AvgPool(pool(kernel, stride, pad)), &[x0], name),
            L::GlobalAvgPool => g.push1(Op::GlobalAvgPool, &[x0], name),
            L::Flatten => {
                let s = g.shape(x0).clone();
                g.push1(
                    Op::Reshape(vec![s[0], s[1..].iter().product()]),
                    &[x0],
                    name,
                )
            }
            L::Dropout { p } => match (mode, seed) {
                (Mode::Train, Some(seed)) if *p > 0.0 => g.push1(
                    Op::Dropout {
                        p: *p,
                        salt: i as u64,
                    },
                    &[x0, seed],
                    name,
                ),
                _ => x0,
            },
            L::Add => g.push1(Op::Add, &ins, name),
            L::Concat => g.push1(Op::Concat, &ins, name),
            L::Detach => g.push1(Op::StopGradient, &[x0], name),
        };
        values.push(y);
    }
    let logits = *values.last().expect("the input value");
    Forward {
        graph: g,
        x,
        logits,
        values,
    }
}

fn hw(v: &[u64; 2]) -> [usize; 2] {
    [v[0] as usize, v[1] as usize]
}

fn pool(k: &[u64; 2], s: &[u64; 2], p: &[u64; 2]) -> PoolAttrs {
    PoolAttrs {
        kernel: hw(k),
        stride: hw(s),
        pad: hw(p),
    }
}

/// The training forward pass and its loss, before autodiff: outputs `loss`,
/// `correct` and the running-stat updates.
pub fn loss_graph(m: &CheckedModel, batch: usize, smoothing: f64) -> Graph {
    let f = forward(m, Mode::Train, batch, "train");
    let mut g = f.graph;
    let labels = g.add_value("labels", vec![batch], Role::Input);
    let lp = g.push(
        Op::SoftmaxXent { smoothing },
        &[f.logits, labels],
        Some("loss"),
    );
    let correct = g.push1(Op::CountCorrect, &[f.logits, labels], Some("loss"));
    let mut outputs = vec![
        ("loss".to_string(), lp[0]),
        ("correct".to_string(), correct),
    ];
    outputs.append(&mut g.outputs);
    g.outputs = outputs;
    verify::debug_verify(&g, "lowering");
    g
}

/// The training step: [`loss_graph`] plus the gradient of every trainable
/// parameter (`grad:<name>`, after `loss` and `correct`).
pub fn train_graph(m: &CheckedModel, batch: usize, smoothing: f64) -> Graph {
    let mut g = loss_graph(m, batch, smoothing);
    let loss = g.output("loss").expect("loss_graph has a loss");
    let frozen: Vec<String> = param_specs(m)
        .into_iter()
        .filter(|p| !p.trainable)
        .map(|p| p.name)
        .collect();
    let wrt: Vec<Vid> = g
        .with_role(Role::Param)
        .filter(|v| !frozen.contains(&g.values[v.0].name))
        .collect();
    let grads = backward(&mut g, &[Seed::One(loss)], &wrt);
    let mut grad_outputs = Vec::new();
    for (p, gr) in wrt.iter().zip(grads) {
        // A parameter that does not influence the loss (e.g. behind `detach`) gets
        // no gradient output; the runtime treats it as zero.
        if let Some(gr) = gr {
            grad_outputs.push((format!("grad:{}", g.values[p.0].name), gr));
        }
    }
    g.outputs.splice(2..2, grad_outputs);
    verify::debug_verify(&g, "autodiff");
    g
}

/// Evaluation: forward in inference mode, mean loss, correct count and logits.
pub fn eval_graph(m: &CheckedModel, batch: usize) -> Graph {
    let f = forward(m, Mode::Infer, batch, "eval");
    let mut g = f.graph;
    let labels = g.add_value("labels", vec![batch], Role::Input);
    let lp = g.push(
        Op::SoftmaxXent { smoothing: 0.0 },
        &[f.logits, labels],
        Some("loss"),
    );
    let correct = g.push1(Op::CountCorrect, &[f.logits, labels], Some("loss"));
    g.outputs = vec![
        ("loss".into(), lp[0]),
        ("correct".into(), correct),
        ("logits".into(), f.logits),
    ];
    verify::debug_verify(&g, "lowering");
    g
}

/// The gradient of one class score per image with respect to the input, in
/// inference mode: `grad:x = ∂ logits[n, class[n]] / ∂ x[n]` (and the logits).
pub fn input_grad_graph(m: &CheckedModel, batch: usize) -> Graph {
    let f = forward(m, Mode::Infer, batch, "input_grad");
    let mut g = f.graph;
    let classes = g.shape(f.logits)[1];
    let class = g.add_value("class", vec![batch], Role::Input);
    let seed = g.push1(Op::OneHot { classes }, &[class], Some("seed"));
    let grads = backward(&mut g, &[Seed::Value(f.logits, seed)], &[f.x]);
    g.outputs = vec![("logits".into(), f.logits)];
    // Logits that do not depend on the input (a `detach` right after it) have a
    // zero input gradient: no output, the runtime fills zeros.
    if let Some(gx) = grads[0] {
        g.outputs.push(("grad:x".into(), gx));
    }
    verify::debug_verify(&g, "lowering and autodiff");
    g
}

/// A forward pass in inference mode that also returns one inner value:
/// outputs `logits` and `features` (the graph value of model value `target`).
/// CAM weighs `features` (the input of `global_avg_pool`) by the final linear
/// layer's weights; the runtime does that small product.
pub fn features_graph(m: &CheckedModel, batch: usize, target: ValueId) -> Graph {
    let f = forward(m, Mode::Infer, batch, "features");
    let mut g = f.graph;
    g.outputs = vec![
        ("logits".into(), f.logits),
        ("features".into(), f.values[target.0]),
    ];
    verify::debug_verify(&g, "lowering");
    g
}

/// Grad-CAM's graph, in inference mode: the feature map `target` and the
/// gradient of one class score per image with respect to it: outputs `logits`,
/// `features` and `grad:features` (absent when the scores do not depend on the
/// map, e.g. behind a `detach`: the runtime reads zeros).
pub fn feature_grad_graph(m: &CheckedModel, batch: usize, target: ValueId) -> Graph {
    let f = forward(m, Mode::Infer, batch, "feature_grad");
    let mut g = f.graph;
    let classes = g.shape(f.logits)[1];
    let class = g.add_value("class", vec![batch], Role::Input);
    let seed = g.push1(Op::OneHot { classes }, &[class], Some("seed"));
    let a = f.values[target.0];
    let grads = backward(&mut g, &[Seed::Value(f.logits, seed)], &[a]);
    g.outputs = vec![("logits".into(), f.logits), ("features".into(), a)];
    if let Some(ga) = grads[0] {
        g.outputs.push(("grad:features".into(), ga));
    }
    verify::debug_verify(&g, "lowering and autodiff");
    g
}

/// Where CAM reads from, for a target the check stage accepted: the value fed to
/// `global_avg_pool` (the target after its position-wise layers) and the final
/// linear layer whose weights give the class weights. `None` for a target that
/// is not a CAM target.
pub fn cam_parts(m: &CheckedModel, target: ValueId) -> Option<(ValueId, &crate::checked::Layer)> {
    let mut v = target;
    loop {
        let mut users = m.users(v);
        let (next, user) = users.next()?;
        if users.next().is_some() {
            return None;
        }
        if matches!(user.op, L::GlobalAvgPool) {
            let (_, linear) = m.users(next).next()?;
            return matches!(linear.op, L::Linear { .. }).then_some((v, linear));
        }
        v = next;
    }
}
