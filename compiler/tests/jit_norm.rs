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

/// Per-item partials of `x` as the conv epilogue writes them (`s[n, c]`,
/// `q[n, c]`, summed in f64 here and rounded once).
fn partials(shape: &Shape, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let inner: usize = shape[2..].iter().product();
    let (mut s, mut q) = (Vec::new(), Vec::new());
    for row in x.chunks(inner) {
        let sum: f64 = row.iter().map(|&v| v as f64).sum();
        let mean = sum / inner as f64;
        let sq: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        s.push(sum as f32);
        q.push(sq as f32);
    }
    (s, q)
}

/// `BnCombine` (the batch statistics from per-item partials) against the
/// interpreter's `BatchNorm` statistics, on the forward tests' shapes with
/// every third case off-centre, and the large off-centre case against the f64
/// interpreter within 1e-5 (the between-item term keeps the two-pass accuracy).
#[test]
fn statistics_from_per_item_partials_match_the_interpreter() {
    let mut rng = Rng(0x5eed_b406);
    let mut j = Jit::new().unwrap();
    let mut all = shapes(&mut rng);
    all.push(vec![64, 2, 28, 28]);
    for (i, shape) in all.iter().enumerate() {
        let c = shape[1];
        let large = numel(shape) > 100_000;
        let (scale, offset) = if large || i % 3 == 2 {
            (0.5, 3.0)
        } else {
            (1.0, 0.0)
        };
        let x = data(&mut rng, numel(shape), scale, offset);
        let (s, q) = partials(shape, &x);
        let spec = NormKernel::BnCombine {
            shape: shape.clone(),
        };
        let got = run(&mut j, spec, &[&s, &q], false);
        let t = |s: &Shape, d: &[f32]| (s.clone(), d.to_vec());
        let ones = vec![1.0; c];
        let cs = vec![c];
        let want = oracle(
            Op::BatchNorm { eps: 1e-5 },
            &[t(shape, &x), t(&cs, &ones), t(&cs, &ones)],
        );
        let what = format!("batchnorm statistics from partials {shape:?}");
        close(&got[0], &want[1], FWD_TOL, &format!("{what}: mean"));
        close(&got[1], &want[2], FWD_TOL, &format!("{what}: var"));
        if large {
            let x64: Tensor<f64> =
                ArrayD::from_shape_vec(IxDyn(shape), x.iter().map(|&v| v as f64).collect())
                    .unwrap();
            let p = ArrayD::from_elem(IxDyn(&cs), 1.0);
            let outs = [shape.clone(), cs.clone(), cs.clone()];
            let exact = eval(&Op::BatchNorm { eps: 1e-5 }, &[&x64, &p, &p], &outs);
            for (k, name) in [(1, "mean"), (2, "var")] {
                let err = got[k - 1]
                    .iter()
                    .zip(exact[k].iter())
                    .map(|(a, e)| (*a as f64 - e).abs() / e.abs().max(1.0))
                    .fold(0.0, f64::max);
                eprintln!("statistics from partials {name}: |jit − f64| = {err:.2e}");
                assert!(err <= 1e-5, "{what}: {name} error {err:e} against f64");
            }
        }
    }
}

mod fused_statistics {
    //! The conv epilogue's batch-norm partials (plan rule 5) in whole training
    //! graphs: random convolutions (strides, padding, dilation, groups, odd
    //! sizes, batch 1) followed by a training batchnorm, with the conv's bias,
    //! a ReLU between them, or a second conv → batchnorm; the plan must fuse
    //! them, every output must match the interpreter within 5e-4 of its scale
    //! on 1 and 2 threads, and be identical, bit for bit, on 1, 2 and 3 threads.
    //!
    //! The interpreter runs in f64 here: some outputs are sums that cancel to
    //! about 0 (the bias gradient of a batchnorm followed by another one), where
    //! the f32 interpreter's sequential sums are off by 5e-4 themselves (seen:
    //! exact −4e-13, JIT −1.1e-5, f32 interpreter 5.3e-4).

    use super::*;
    use cnnc_compiler::codegen::exec::Executable;
    use cnnc_compiler::interp::run as interpret;
    use cnnc_compiler::ir::lower::train_graph;
    use cnnc_compiler::pipeline::check_text;

    /// Random feeds for every input, parameter and buffer of `g`.
    fn feeds(g: &Graph, rng: &mut Rng, offset: f32) -> Vec<(Vid, Vec<f32>)> {
        let mut out = Vec::new();
        for (i, v) in g.values.iter().enumerate() {
            let n: usize = v.shape.iter().product();
            let data = match (v.role, v.name.as_str()) {
                (Role::Temp, _) => continue,
                (Role::Input, "labels") => (0..n).map(|k| (k % 3) as f32).collect(),
                (Role::Input, "image") => data(rng, n, 1.0, offset),
                (Role::Buffer, name) if name.ends_with("running_var") => {
                    (0..n).map(|_| 0.5 + rng.next() as f32).collect()
                }
                _ => rng.data(n),
            };
            out.push((Vid(i), data));
        }
        out
    }

    fn executable(g: &Graph, threads: usize, feeds: &[(Vid, Vec<f32>)]) -> Executable {
        let mut exe = Executable::new(g, threads).unwrap();
        for (v, d) in feeds {
            let name = &g.values[v.0].name;
            if exe.has_feed(name) {
                exe.feed(name, d).unwrap();
            }
        }
        exe.run();
        exe
    }

    /// A random conv layer whose output is not depthwise (groups == C > 1).
    fn conv(rng: &mut Rng, c: usize, bias: bool) -> (String, usize) {
        let groups = if c.is_multiple_of(2) && c > 2 && rng.next() < 0.4 {
            2
        } else {
            1
        };
        let o = groups * rng.int(1, 5);
        let k = rng.int(1, 4);
        let (s, p, d) = (rng.int(1, 3), rng.int(0, k / 2 + 1), rng.int(1, 2));
        let layer = format!(
            "conv({o}, kernel={k}, stride={s}, pad={p}, dilation={d}, groups={groups}, bias={bias})"
        );
        (layer, o)
    }

    fn model(rng: &mut Rng, variant: usize) -> String {
        let c = rng.int(1, 6);
        // Mostly odd sizes.
        let (h, w) = (2 * rng.int(1, 7) + 1, rng.int(3, 14));
        let (first, o) = conv(rng, c, variant == 1);
        let mut layers = vec![first];
        match variant {
            // conv → batchnorm → relu: BnApply+relu after the fused statistics.
            0 => layers.extend(["batchnorm".into(), "relu".into()]),
            // conv + bias → batchnorm: the statistics of y + b.
            1 => layers.push("batchnorm".into()),
            // conv → relu → batchnorm: the statistics of the relu's output.
            2 => layers.extend(["relu".into(), "batchnorm".into()]),
            // Two fused pairs in a row.
            _ => {
                let (second, _) = conv(rng, o, false);
                layers.extend([
                    "batchnorm".into(),
                    "relu".into(),
                    second,
                    "batchnorm".into(),
                ]);
            }
        }
        let mut s = format!("model F {{\n  input image: [{c}, {h}, {w}]\n");
        for l in layers {
            s.push_str(&format!("  {l}\n"));
        }
        s.push_str("  global_avg_pool\n  linear(3)\n}\n");
        s
    }

    #[test]
    fn fused_conv_batchnorm_statistics_match_the_interpreter() {
        let mut rng = Rng(0x5eed_b407);
        let mut ran = 0;
        for i in 0..48 {
            let src = model(&mut rng, i % 4);
            let fe = check_text("fused.cnn", &src);
            if fe.has_errors() {
                continue; // a window larger than the padded input
            }
            let m = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
            let batch = [1, 2, 3, 5][rng.int(0, 3)];
            let g = train_graph(&m, batch, 0.0);
            let offset = if i % 3 == 2 { 3.0 } else { 0.0 };
            let feeds = feeds(&g, &mut rng, offset);
            let tensors: Vec<(Vid, Tensor<f64>)> = feeds
                .iter()
                .map(|(v, d)| {
                    let d = d.iter().map(|&x| x as f64).collect();
                    let t = ArrayD::from_shape_vec(IxDyn(g.shape(*v)), d).unwrap();
                    (*v, t)
                })
                .collect();
            let want = interpret(&g, tensors).unwrap();
            let mut bits: Option<Vec<Vec<u32>>> = None;
            for threads in [1, 2, 3] {
                let exe = executable(&g, threads, &feeds);
                let plan = exe.plan().dump();
                assert!(
                    plan.contains("+batchnorm_sums"),
                    "{src}: not fused:\n{plan}"
                );
                let got: Vec<Vec<u32>> = g
                    .outputs
                    .iter()
                    .map(|(n, _)| exe.get(n).unwrap().iter().map(|v| v.to_bits()).collect())
                    .collect();
                match &bits {
                    None => bits = Some(got),
                    Some(b) => assert!(*b == got, "{src}: 1 and {threads} threads differ"),
                }
                if threads == 3 {
                    continue;
                }
                for (name, v) in &g.outputs {
                    let w: Vec<f64> = want.get(*v).iter().copied().collect();
                    let got = exe.get(name).unwrap();
                    let scale = w.iter().fold(1f64, |m, x| m.max(x.abs()));
                    for (k, (&a, b)) in got.iter().zip(&w).enumerate() {
                        assert!(
                            (a as f64 - b).abs() <= 5e-4 * scale,
                            "{src} batch {batch}, {threads} threads: {name}[{k}]: jit {a} vs interpreter {b}\n{plan}"
                        );
                    }
                }
            }
            ran += 1;
        }
        eprintln!("{ran} of 48 fused models checked and compared");
        assert!(ran >= 30, "only {ran} of 48 models checked");
    }
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
