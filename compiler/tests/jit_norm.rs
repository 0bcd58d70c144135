//! The batch-norm kernels against the reference interpreter. `BatchNorm` and
//! `BatchNormGrad` are composed from their kernels by hand, as the planner does
//! (sum, squared deviations, statistics, apply; gradient sums, gradient apply),
//! with and without the fused ReLU, over the whole batch and split into work
//! ranges (partial sums added; one range empty); the single-node kernels go
//! through `common::check`. Tolerances: 1e-4 forward, 5e-4 backward, relative
//! above magnitude 1.

mod common;

use cnnc_compiler::codegen::norm::NormKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec, Par};
use cnnc_compiler::interp::{eval, Tensor};
use cnnc_compiler::ir::*;
use common::{check, oracle, Rng};
use ndarray::{ArrayD, IxDyn};
use std::ops::Range;

const FWD_TOL: f32 = 1e-4;
const BWD_TOL: f32 = 5e-4;

/// Compiles `spec` and runs it over `0..work`, whole or split in three (the
/// first part empty), adding the partial outputs of a `Par::Reduce` kernel.
/// Outputs start as NaN, so every element must be written.
fn run(j: &mut Jit, spec: NormKernel, ins: &[&[f32]], split: bool) -> Vec<Vec<f32>> {
    let spec = KernelSpec::Norm(spec);
    let id = j.compile(&format!("{spec:?}"), spec.clone()).unwrap();
    let w = spec.work();
    let ranges: Vec<Range<usize>> = if split {
        vec![0..0, 0..w / 2, w / 2..w]
    } else {
        std::iter::once(0..w).collect()
    };
    let fresh = || -> Vec<Vec<f32>> {
        spec.outputs()
            .iter()
            .map(|s| vec![f32::NAN; s.iter().product()])
            .collect()
    };
    let mut outs = fresh();
    for (i, r) in ranges.into_iter().enumerate() {
        if spec.par() == Par::Reduce && i > 0 {
            let mut part = fresh();
            let mut o: Vec<&mut [f32]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
            j.run(id, ins, &mut o, r).unwrap();
            for (acc, p) in outs.iter_mut().zip(&part) {
                acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        } else {
            let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
            j.run(id, ins, &mut o, r).unwrap();
        }
    }
    outs
}

/// `|got − want| ≤ tol·max(1, |want|)` for every element.
fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1.0),
            "{what}: element {i}: jit {a} vs interpreter {b}"
        );
    }
}

/// The shapes the tests sweep: rank 2 and 4, batch 1 included, odd spatial
/// sizes, 1 to 70 channels.
fn shapes(rng: &mut Rng) -> Vec<Shape> {
    let mut v = vec![
        vec![1, 1],
        vec![1, 70],
        vec![5, 3],
        vec![16, 37],
        vec![1, 1, 1, 1],
        vec![3, 9, 1, 1],
        vec![1, 5, 3, 5],
        vec![2, 7, 7, 7],
        vec![1, 70, 7, 7],
        vec![2, 3, 28, 28],
        vec![1, 1, 28, 28],
    ];
    for _ in 0..4 {
        let (h, w) = [(1, 1), (3, 5), (7, 7), (28, 28), (2, 2)][rng.int(0, 4)];
        v.push(vec![rng.int(1, 4), rng.int(1, 70), h, w]);
        v.push(vec![rng.int(1, 9), rng.int(1, 70)]);
    }
    v
}

fn numel(s: &Shape) -> usize {
    s.iter().product()
}

/// `U[-1, 1)·scale + offset`, with some exact `offset`s.
fn data(rng: &mut Rng, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    rng.data(n)
        .into_iter()
        .map(|v| v * scale + offset)
        .collect()
}

/// `BatchNorm` as the planner composes it: `(y, mean, var)`.
fn forward(
    j: &mut Jit,
    shape: &Shape,
    [x, gamma, beta]: [&[f32]; 3],
    eps: f64,
    relu: bool,
    split: bool,
) -> [Vec<f32>; 3] {
    let s = run(
        j,
        NormKernel::BnSum {
            shape: shape.clone(),
        },
        &[x],
        split,
    )
    .remove(0);
    let q = run(
        j,
        NormKernel::BnSqDev {
            shape: shape.clone(),
        },
        &[x, &s],
        split,
    )
    .remove(0);
    let mut st = run(
        j,
        NormKernel::BnStats {
            shape: shape.clone(),
        },
        &[&s, &q],
        split,
    );
    let (mean, var) = (st.remove(0), st.remove(0));
    let apply = NormKernel::BnApply {
        shape: shape.clone(),
        eps,
        relu,
    };
    let y = run(j, apply, &[x, gamma, beta, &mean, &var], split).remove(0);
    [y, mean, var]
}

/// `BatchNormGrad` as the planner composes it: `(dx, dgamma, dbeta)`. With
/// `relu_out`, `dy` is masked by it (the fused `ActGrad(Relu)`).
fn backward(
    j: &mut Jit,
    shape: &Shape,
    [dy, x, gamma, mean, var]: [&[f32]; 5],
    relu_out: Option<&[f32]>,
    eps: f64,
    split: bool,
) -> [Vec<f32>; 3] {
    let relu = relu_out.is_some();
    let mut ins = vec![dy, x, mean, var];
    ins.extend(relu_out);
    let sums = NormKernel::BnGradSums {
        shape: shape.clone(),
        eps,
        relu,
    };
    let mut s = run(j, sums, &ins, split);
    let (dgamma, dbeta) = (s.remove(0), s.remove(0));
    let mut ins = vec![dy, x, gamma, mean, var, &dgamma, &dbeta];
    ins.extend(relu_out);
    let apply = NormKernel::BnGradApply {
        shape: shape.clone(),
        eps,
        relu,
    };
    let dx = run(j, apply, &ins, split).remove(0);
    [dx, dgamma, dbeta]
}

/// One forward case, both with and without the fused ReLU, whole and split.
fn forward_case(j: &mut Jit, shape: &Shape, x: &[f32], rng: &mut Rng, eps: f64) {
    let c = shape[1];
    let gamma = data(rng, c, 1.0, 0.0);
    let beta = data(rng, c, 1.0, 0.0);
    let t = |s: &Shape, d: &[f32]| (s.clone(), d.to_vec());
    let want = oracle(
        Op::BatchNorm { eps },
        &[t(shape, x), t(&vec![c], &gamma), t(&vec![c], &beta)],
    );
    let want_relu = oracle(Op::Act(Act::Relu), &[t(shape, &want[0])]).remove(0);
    for relu in [false, true] {
        for split in [false, true] {
            let what = format!("batchnorm {shape:?} relu={relu} split={split}");
            let got = forward(j, shape, [x, &gamma, &beta], eps, relu, split);
            let y = if relu { &want_relu } else { &want[0] };
            close(&got[0], y, FWD_TOL, &format!("{what}: y"));
            close(&got[1], &want[1], FWD_TOL, &format!("{what}: mean"));
            close(&got[2], &want[2], FWD_TOL, &format!("{what}: var"));
        }
    }
}

#[test]
fn batchnorm_forward_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_b401);
    let mut j = Jit::new().unwrap();
    for (i, shape) in shapes(&mut rng).iter().enumerate() {
        // Every third case off-centre: x ~ 3 ± 0.5 (two-pass variance).
        let (scale, offset) = if i % 3 == 2 { (0.5, 3.0) } else { (1.0, 0.0) };
        let x = data(&mut rng, numel(shape), scale, offset);
        let eps = if i % 2 == 0 { 1e-5 } else { 1e-2 };
        forward_case(&mut j, shape, &x, &mut rng, eps);
    }
}

#[test]
fn batchnorm_backward_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_b402);
    let mut j = Jit::new().unwrap();
    let eps = 1e-3;
    for shape in shapes(&mut rng) {
        let c = shape[1];
        let x = rng.data(numel(&shape));
        let dy = rng.data(numel(&shape));
        let gamma = data(&mut rng, c, 1.0, 0.0);
        let beta = data(&mut rng, c, 1.0, 0.0);
        let t = |s: &Shape, d: &[f32]| (s.clone(), d.to_vec());
        let cs = vec![c];
        let fwd = oracle(
            Op::BatchNorm { eps },
            &[t(&shape, &x), t(&cs, &gamma), t(&cs, &beta)],
        );
        let (pre, mean, var) = (&fwd[0], &fwd[1], &fwd[2]);
        let relu_out = oracle(Op::Act(Act::Relu), &[t(&shape, pre)]).remove(0);
        for relu in [false, true] {
            let dy_in = if relu {
                oracle(Op::ActGrad(Act::Relu), &[t(&shape, &dy), t(&shape, pre)]).remove(0)
            } else {
                dy.clone()
            };
            let want = oracle(
                Op::BatchNormGrad { eps },
                &[
                    t(&shape, &dy_in),
                    t(&shape, &x),
                    t(&cs, &gamma),
                    t(&cs, mean),
                    t(&cs, var),
                ],
            );
            for split in [false, true] {
                let what = format!("batchnorm_grad {shape:?} relu={relu} split={split}");
                let mask = relu.then_some(relu_out.as_slice());
                let got = backward(
                    &mut j,
                    &shape,
                    [&dy, &x, &gamma, mean, var],
                    mask,
                    eps,
                    split,
                );
                for (k, name) in ["dx", "dgamma", "dbeta"].iter().enumerate() {
                    close(&got[k], &want[k], BWD_TOL, &format!("{what}: {name}"));
                }
            }
        }
    }
}

#[test]
fn inference_and_running_stats_match_the_interpreter() {
    let mut rng = Rng(0x5eed_b403);
    let mut j = Jit::new().unwrap();
    for shape in shapes(&mut rng) {
        let c = shape[1];
        let cs = vec![c];
        let x = (shape.clone(), data(&mut rng, numel(&shape), 2.0, 0.5));
        let gamma = (cs.clone(), rng.data(c));
        let beta = (cs.clone(), rng.data(c));
        let rm = (cs.clone(), rng.data(c));
        let rv = (cs.clone(), data(&mut rng, c, 0.5, 0.6));
        let eps = 1e-5;
        let ins = [x.clone(), gamma.clone(), beta, rm.clone(), rv.clone()];
        check(
            &mut j,
            Op::BatchNormInfer { eps },
            &ins,
            FWD_TOL,
            &format!("batchnorm_infer {shape:?}"),
        );
        let dy = (shape.clone(), rng.data(numel(&shape)));
        check(
            &mut j,
            Op::BatchNormInferGrad { eps },
            &[dy, gamma, rv.clone()],
            FWD_TOL,
            &format!("batchnorm_infer_grad {shape:?}"),
        );
        let n = numel(&shape) / c;
        let (bm, bv) = (
            (cs.clone(), rng.data(c)),
            (cs.clone(), data(&mut rng, c, 0.5, 0.6)),
        );
        check(
            &mut j,
            Op::RunningStats { momentum: 0.1, n },
            &[rm, rv, bm, bv],
            1e-6,
            &format!("running_stats c={c} n={n}"),
        );
    }
}

/// The largest statistics promised (`N·H·W` ≈ 50 000 per channel), off-centre
/// data: the kernels match the f32 interpreter, and the f64 interpreter within
/// 1e-5 (forward) and 1e-5 relative (gradient sums), printed next to the f32
/// interpreter's own error.
#[test]
fn large_batches_are_accurate() {
    let mut rng = Rng(0x5eed_b404);
    let mut j = Jit::new().unwrap();
    let shape = vec![64, 2, 28, 28];
    let cs = vec![2];
    let eps = 1e-5;
    let x = data(&mut rng, numel(&shape), 1.0, 2.0);
    let dy = rng.data(numel(&shape));
    let gamma = data(&mut rng, 2, 1.0, 0.0);
    let beta = data(&mut rng, 2, 1.0, 0.0);
    forward_case(&mut j, &shape, &x, &mut Rng(7), eps);

    let t = |s: &Shape, d: &[f32]| (s.clone(), d.to_vec());
    let f64s = |s: &Shape, d: &[f32]| -> Tensor<f64> {
        ArrayD::from_shape_vec(IxDyn(s), d.iter().map(|&v| v as f64).collect()).unwrap()
    };
    // max |a − e| / max(1, |e|)
    let err = |a: &[f32], e: &Tensor<f64>| {
        a.iter()
            .zip(e.iter())
            .map(|(a, e)| (*a as f64 - e).abs() / e.abs().max(1.0))
            .fold(0.0, f64::max)
    };
    let report =
        |op: &str, names: [&str; 3], got: &[Vec<f32>], f32s: &[Vec<f32>], exact: &[Tensor<f64>]| {
            for (k, name) in names.iter().enumerate() {
                let (ej, ei) = (err(&got[k], &exact[k]), err(&f32s[k], &exact[k]));
                eprintln!("{op} {name}: |jit − f64| = {ej:.2e}, |interp f32 − f64| = {ei:.2e}");
                assert!(ej <= 1e-5, "{op} {name}: jit error {ej:e} against f64");
            }
        };

    let ins = [t(&shape, &x), t(&cs, &gamma), t(&cs, &beta)];
    let interp = oracle(Op::BatchNorm { eps }, &ins);
    let (xt, gt, bt) = (f64s(&shape, &x), f64s(&cs, &gamma), f64s(&cs, &beta));
    let outs = [shape.clone(), cs.clone(), cs.clone()];
    let exact = eval(&Op::BatchNorm { eps }, &[&xt, &gt, &bt], &outs);
    let got = forward(&mut j, &shape, [&x, &gamma, &beta], eps, false, true);
    report("batchnorm", ["y", "mean", "var"], &got, &interp, &exact);

    let (mean, var) = (&interp[1], &interp[2]);
    let ins = [
        t(&shape, &dy),
        t(&shape, &x),
        t(&cs, &gamma),
        t(&cs, mean),
        t(&cs, var),
    ];
    let want = oracle(Op::BatchNormGrad { eps }, &ins);
    let got = backward(
        &mut j,
        &shape,
        [&dy, &x, &gamma, mean, var],
        None,
        eps,
        true,
    );
    for (k, name) in ["dx", "dgamma", "dbeta"].iter().enumerate() {
        close(
            &got[k],
            &want[k],
            BWD_TOL,
            &format!("large batchnorm_grad: {name}"),
        );
    }
    let ts: Vec<Tensor<f64>> = ins.iter().map(|(s, d)| f64s(s, d)).collect();
    let refs: Vec<&Tensor<f64>> = ts.iter().collect();
    let exact = eval(&Op::BatchNormGrad { eps }, &refs, &outs);
    report(
        "batchnorm_grad",
        ["dx", "dgamma", "dbeta"],
        &got,
        &want,
        &exact,
    );
}

#[test]
fn only_single_node_ops_map_to_one_kernel() {
    let mut g = Graph::new("bn");
    let x = g.add_value("x", vec![2, 3, 4, 4], Role::Input);
    let p: Vec<Vid> = (0..4)
        .map(|i| g.add_value(format!("p{i}"), vec![3], Role::Input))
        .collect();
    g.push(Op::BatchNorm { eps: 1e-5 }, &[x, p[0], p[1]], None);
    g.push(
        Op::BatchNormGrad { eps: 1e-5 },
        &[x, x, p[0], p[1], p[2]],
        None,
    );
    g.push(
        Op::BatchNormInfer { eps: 1e-5 },
        &[x, p[0], p[1], p[2], p[3]],
        None,
    );
    let spec = |i: usize| KernelSpec::from_node(&g, &g.nodes[i]);
    assert_eq!(spec(0), None);
    assert_eq!(spec(1), None);
    assert_eq!(
        spec(2),
        Some(KernelSpec::Norm(NormKernel::BnApply {
            shape: vec![2, 3, 4, 4],
            eps: 1e-5,
            relu: false
        }))
    );
}

#[test]
fn kernels_are_vectorised_and_refuse_bad_shapes() {
    let mut j = Jit::new().unwrap();
    for shape in [vec![4, 9, 7, 7], vec![8, 9]] {
        let sum = KernelSpec::Norm(NormKernel::BnSum {
            shape: shape.clone(),
        });
        let id = j.compile("sum", sum).unwrap();
        let clif = &j.kernel(id).clif;
        assert!(clif.contains("f32x4"), "{shape:?}: vector loads:\n{clif}");
        if shape.len() == 4 {
            assert!(
                clif.contains("extractlane"),
                "one horizontal sum per channel"
            );
        }
        let spec = NormKernel::BnGradApply {
            shape,
            eps: 1e-5,
            relu: true,
        };
        let id = j.compile("grad_apply", KernelSpec::Norm(spec)).unwrap();
        assert!(j.kernel(id).clif.contains("sqrt"));
    }
    let bad = KernelSpec::Norm(NormKernel::BnSum { shape: vec![4] });
    assert!(j.compile("bad", bad).is_err(), "rank 1 is refused");
}
