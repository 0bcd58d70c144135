//! Symbolic reverse-mode autodiff: walks the graph backwards and, for every node
//! on a path from the seeds to the requested values, emits the backward ops of its
//! rule into the same graph. No tape exists at run time.
//!
//! The rules are one table (`rule`), one arm per op, each with its closed form.
//! Notation: `ȳ` is the gradient flowing into output `y`, `x̄` the one emitted for
//! input `x`. Contributions to a value used several times are summed with `add`.

use super::*;
use std::collections::HashMap;

/// Where backpropagation starts.
pub enum Seed {
    /// A scalar whose gradient is 1 (the loss).
    One(Vid),
    /// A value and its given gradient (e.g. a one-hot row per image on the logits).
    Value(Vid, Vid),
}

/// Emits backward ops for `seeds` and returns the gradient of each `wrt` value
/// (`None` when it does not influence the seeds).
pub fn backward(g: &mut Graph, seeds: &[Seed], wrt: &[Vid]) -> Vec<Option<Vid>> {
    let n_fwd = g.nodes.len();
    // Which values depend on a `wrt` value (through differentiable edges)...
    let mut depends = vec![false; g.values.len()];
    for v in wrt {
        depends[v.0] = true;
    }
    for node in &g.nodes[..n_fwd] {
        if node_blocks_gradient(&node.op) {
            continue;
        }
        if node.inputs.iter().any(|i| depends[i.0]) {
            for o in &node.outputs {
                depends[o.0] = true;
            }
        }
    }
    // ...and which values the seeds depend on.
    let mut reaches = vec![false; g.values.len()];
    for s in seeds {
        let v = match s {
            Seed::One(v) | Seed::Value(v, _) => *v,
        };
        reaches[v.0] = true;
    }
    for node in g.nodes[..n_fwd].iter().rev() {
        if node.outputs.iter().any(|o| reaches[o.0]) {
            for i in &node.inputs {
                reaches[i.0] = true;
            }
        }
    }
    let needed = |v: Vid| depends[v.0] && reaches[v.0];

    let mut contrib: HashMap<Vid, Vec<Vid>> = HashMap::new();
    let mut ones: Vec<Vid> = Vec::new();
    for s in seeds {
        match s {
            Seed::One(v) => ones.push(*v),
            Seed::Value(v, gr) => contrib.entry(*v).or_default().push(*gr),
        }
    }
    for idx in (0..n_fwd).rev() {
        let node = g.nodes[idx].clone();
        if !node.inputs.iter().any(|i| needed(*i)) || node_blocks_gradient(&node.op) {
            continue;
        }
        let out_grads: Vec<Grad> = node
            .outputs
            .iter()
            .map(|o| {
                if ones.contains(o) {
                    Grad::One
                } else {
                    match contrib.remove(o) {
                        Some(c) => Grad::Of(sum(g, c, node.layer.as_deref())),
                        None => Grad::Zero,
                    }
                }
            })
            .collect();
        if out_grads.iter().all(|gr| matches!(gr, Grad::Zero)) {
            continue;
        }
        let want: Vec<bool> = node.inputs.iter().map(|i| needed(*i)).collect();
        let in_grads = rule(g, &node, &out_grads, &want);
        for ((i, gr), w) in node.inputs.iter().zip(in_grads).zip(&want) {
            if let (Some(gr), true) = (gr, w) {
                contrib.entry(*i).or_default().push(gr);
            }
        }
    }
    wrt.iter()
        .map(|v| contrib.remove(v).map(|c| sum(g, c, None)))
        .collect()
}

/// The gradient arriving at one output of a node.
#[derive(Clone, Copy)]
enum Grad {
    /// Nothing flows back through this output.
    Zero,
    /// The seed: a scalar with gradient 1.
    One,
    Of(Vid),
}

impl Grad {
    fn get(self, what: &str) -> Vid {
        match self {
            Grad::Of(v) => v,
            _ => panic!("internal error: autodiff needs the gradient of {what} as a tensor"),
        }
    }
}

/// Ops through which no gradient flows at all.
fn node_blocks_gradient(op: &Op) -> bool {
    matches!(
        op,
        Op::StopGradient | Op::RunningStats { .. } | Op::CountCorrect | Op::OneHot { .. }
    )
}

fn sum(g: &mut Graph, mut c: Vec<Vid>, layer: Option<&str>) -> Vid {
    if c.len() == 1 {
        c.pop().unwrap()
    } else {
        g.push1(Op::Add, &c, layer)
    }
}

/// One rule per op: the gradients of the inputs (where `want`) from those of the
/// outputs.
fn rule(g: &mut Graph, node: &Node, out: &[Grad], want: &[bool]) -> Vec<Option<Vid>> {
    let l = node.layer.as_deref();
    let i = &node.inputs;
    let o = &node.outputs;
    let dy = || out[0].get("the output");
    match &node.op {
        // y = x ⋆ w  ⇒  x̄ = ȳ ⋆ᵀ w (transposed convolution), w̄ = x ⋆ ȳ (correlation
        // of the input with the output gradient).
        Op::Conv2d(a) => {
            let x = g.shape(i[0]).clone();
            let w = g.shape(i[1]).clone();
            let dx =
                want[0].then(|| g.push1(Op::Conv2dGradInput(*a, [x[2], x[3]]), &[dy(), i[1]], l));
            let dw =
                want[1].then(|| g.push1(Op::Conv2dGradWeight(*a, [w[2], w[3]]), &[i[0], dy()], l));
            vec![dx, dw]
        }
        // y = x + b[c]  ⇒  x̄ = ȳ, b̄[c] = Σ_{n,h,w} ȳ[n,c,h,w].
        Op::BiasAdd => vec![
            Some(dy()),
            want[1].then(|| g.push1(Op::BiasGrad, &[dy()], l)),
        ],
        // C = op(A)·op(B)  ⇒  Ā' = C̄·op(B)ᵀ, B̄' = op(A)ᵀ·C̄, transposed back when the
        // operand was used transposed.
        Op::MatMul { ta, tb } => {
            let (ta, tb) = (*ta, *tb);
            let dc = dy();
            let da = want[0].then(|| {
                if !ta {
                    g.push1(Op::MatMul { ta: false, tb: !tb }, &[dc, i[1]], l)
                } else {
                    g.push1(Op::MatMul { ta: tb, tb: true }, &[i[1], dc], l)
                }
            });
            let db = want[1].then(|| {
                if !tb {
                    g.push1(Op::MatMul { ta: !ta, tb: false }, &[i[0], dc], l)
                } else {
                    g.push1(Op::MatMul { ta: true, tb: ta }, &[dc, i[0]], l)
                }
            });
            vec![da, db]
        }
        // y = γ·x̂ + β, x̂ = (x-μ)/σ over the batch  ⇒
        // x̄ = γ/σ·(ȳ - mean(ȳ) - x̂·mean(ȳ·x̂)), γ̄ = Σ ȳ·x̂, β̄ = Σ ȳ
        // (the statistics' own outputs carry no gradient: they only feed running stats).
        Op::BatchNorm { eps } => {
            let r = g.push(
                Op::BatchNormGrad { eps: *eps },
                &[dy(), i[0], i[1], o[1], o[2]],
                l,
            );
            vec![Some(r[0]), Some(r[1]), Some(r[2])]
        }
        // y = γ·(x-r_μ)/sqrt(r_σ²+ε) + β with fixed statistics  ⇒  x̄ = ȳ·γ/sqrt(r_σ²+ε).
        // Only the input gradient exists (inference graphs explain, they do not train).
        Op::BatchNormInfer { eps } => {
            assert!(
                !want[1] && !want[2],
                "internal error: parameter gradients through inference-mode batchnorm"
            );
            let dx = want[0]
                .then(|| g.push1(Op::BatchNormInferGrad { eps: *eps }, &[dy(), i[1], i[4]], l));
            vec![dx, None, None, None, None]
        }
        // As batchnorm, with statistics per (image, group).
        Op::GroupNorm { groups, eps } => {
            let r = g.push(
                Op::GroupNormGrad {
                    groups: *groups,
                    eps: *eps,
                },
                &[dy(), i[0], i[1], o[1], o[2]],
                l,
            );
            vec![Some(r[0]), Some(r[1]), Some(r[2])]
        }
        // y = f(x)  ⇒  x̄ = ȳ·f'(x).
        Op::Act(a) => vec![Some(g.push1(Op::ActGrad(*a), &[dy(), i[0]], l))],
        // y = max over the window  ⇒  x̄ = ȳ routed to the window's first maximum.
        Op::MaxPool(p) => vec![Some(g.push1(Op::MaxPoolGrad(*p), &[dy(), i[0]], l))],
        // y = Σ window / k²  ⇒  x̄ = Σ over windows containing x of ȳ / k².
        Op::AvgPool(p) => {
            let x = g.shape(i[0]).clone();
            vec![Some(g.push1(Op::AvgPoolGrad(*p, [x[2], x[3]]), &[dy()], l))]
        }
        // y[n,c] = mean_{h,w} x  ⇒  x̄[n,c,h,w] = ȳ[n,c]/(H·W).
        Op::GlobalAvgPool => {
            let x = g.shape(i[0]).clone();
            vec![Some(g.push1(
                Op::GlobalAvgPoolGrad([x[2], x[3]]),
                &[dy()],
                l,
            ))]
        }
        // Same elements  ⇒  x̄ = ȳ reshaped back.
        Op::Reshape(_) => {
            let x = g.shape(i[0]).clone();
            vec![Some(g.push1(Op::Reshape(x), &[dy()], l))]
        }
        // y = Σ xₖ  ⇒  x̄ₖ = ȳ.
        Op::Add => i.iter().map(|_| Some(dy())).collect(),
        // y = x₁ ‖ x₂ ‖ …  ⇒  x̄ₖ = ȳ[:, offsetₖ .. offsetₖ + Cₖ].
        Op::Concat => {
            let mut start = 0;
            let d = dy();
            i.iter()
                .zip(want)
                .map(|(x, w)| {
                    let len = g.shape(*x)[1];
                    let r = w.then(|| g.push1(Op::Slice { start, len }, &[d], l));
                    start += len;
                    r
                })
                .collect()
        }
        // y = x·m/(1-p)  ⇒  x̄ = ȳ·m/(1-p), the same mask m.
        Op::Dropout { p, salt } => vec![
            Some(g.push1(Op::DropoutGrad { p: *p, salt: *salt }, &[dy(), i[1]], l)),
            None,
        ],
        // L = mean_n -Σ_k t[n,k]·log softmax(z)[n,k]  ⇒  z̄ = (softmax(z) - t)/N
        // (only as the seed: the loss is the value whose gradient is 1).
        Op::SoftmaxXent { smoothing } => {
            assert!(
                matches!(out[0], Grad::One),
                "internal error: the loss must be a seed"
            );
            vec![
                Some(g.push1(
                    Op::SoftmaxXentGrad {
                        smoothing: *smoothing,
                    },
                    &[o[1], i[1]],
                    l,
                )),
                None,
            ]
        }
        op => panic!("internal error: no gradient rule for {}", op.name()),
    }
}
