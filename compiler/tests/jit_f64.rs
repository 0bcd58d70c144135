//! The JIT in f64 (`DType::F64`), the backend of gradient checks: every kernel
//! family against the interpreter in f64 on random shapes (strides, padding,
//! dilation, groups, odd sizes, batch 1), whole training graphs (every fusion
//! pattern) on the f64 executable against the interpreter, and the gradient
//! check itself: the `grad:<param>` outputs of small models' training graphs, run
//! by the JIT in f64, against central differences of the same executable's loss
//! (eps 1e-6, atol 1e-5, rtol 1e-3, as `gradcheck.rs` does for the
//! interpreter).

mod common;

use cnnc_compiler::checked::CheckedModel;
use cnnc_compiler::codegen::conv::ConvKernel;
use cnnc_compiler::codegen::exec::{Executable, ThreadPool};
use cnnc_compiler::codegen::optim::{OptimKernel, SumSquaresOut};
use cnnc_compiler::codegen::{DType, Jit, KernelSpec, OptLevel};
use cnnc_compiler::interp::{run, Tensor};
use cnnc_compiler::ir::lower::train_graph;
use cnnc_compiler::ir::*;
use cnnc_compiler::pipeline::check_text;
use common::{check64, data64, Rng};
use ndarray::{ArrayD, IxDyn};

/// Kernels against the interpreter: within this much of the output's scale.
const TOL: f64 = 1e-10;

fn jit() -> Jit {
    Jit::with_opt_level(OptLevel::None).unwrap()
}

fn conv_attrs(s: usize, p: usize, d: usize, groups: usize) -> ConvAttrs {
    ConvAttrs {
        stride: [s, s],
        pad: [p, p],
        dilation: [d, d],
        groups,
    }
}

/// The forward output shape, when the convolution is valid.
fn conv_out(x: &Shape, w: &Shape, a: ConvAttrs) -> Option<Shape> {
    Op::Conv2d(a).infer(&[x, w]).ok().map(|mut v| v.remove(0))
}

/// The forward conv, its input gradient and its weight gradient on random data
/// of shapes `[x, w, y]`, each against the f64 interpreter; with `direct`, also
/// the direct (non-GEMM) forward kernel.
fn check_conv_family(
    jit: &mut Jit,
    rng: &mut Rng,
    a: ConvAttrs,
    [xs, ws, ys]: [&Shape; 3],
    direct: bool,
    what: &str,
) {
    let x = data64(rng, xs.iter().product());
    let wt = data64(rng, ws.iter().product());
    let dy = data64(rng, ys.iter().product());
    let fwd = [(xs.clone(), x.clone()), (ws.clone(), wt.clone())];
    check64(jit, Op::Conv2d(a), None, &fwd, TOL, what);
    if direct {
        let spec = KernelSpec::Conv(ConvKernel::Direct {
            x: xs.clone(),
            w: ws.clone(),
            attrs: a,
        });
        check64(jit, Op::Conv2d(a), Some(spec), &fwd, TOL, what);
    }
    let (h, w) = (xs[2], xs[3]);
    let gi = [(ys.clone(), dy.clone()), (ws.clone(), wt)];
    check64(jit, Op::Conv2dGradInput(a, [h, w]), None, &gi, TOL, what);
    let gw = [(xs.clone(), x), (ys.clone(), dy)];
    check64(
        jit,
        Op::Conv2dGradWeight(a, [ws[2], ws[3]]),
        None,
        &gw,
        TOL,
        what,
    );
}

#[test]
fn conv_kernels_match_the_interpreter() {
    let mut jit = jit();
    let mut rng = Rng(1);
    let mut done = 0;
    while done < 14 {
        let groups = rng.int(1, 2);
        let (cg, og) = (rng.int(1, 3), rng.int(1, 3));
        let (k, s, p, d) = (rng.int(1, 3), rng.int(1, 2), rng.int(0, 2), rng.int(1, 2));
        let (n, h, w) = (rng.int(1, 3), rng.int(3, 9), rng.int(3, 9));
        let a = conv_attrs(s, p, d, groups);
        let xs = vec![n, cg * groups, h, w];
        let ws = vec![og * groups, cg, k, k];
        let Some(ys) = conv_out(&xs, &ws, a) else {
            continue;
        };
        if groups == cg * groups && groups > 1 {
            continue; // depthwise: its own test
        }
        let what = format!("conv x{xs:?} w{ws:?} {a:?}");
        check_conv_family(&mut jit, &mut rng, a, [&xs, &ws, &ys], true, &what);
        done += 1;
    }
}

#[test]
fn depthwise_kernels_match_the_interpreter() {
    let mut jit = jit();
    let mut rng = Rng(2);
    let mut done = 0;
    while done < 10 {
        let (c, mult) = (rng.int(2, 4), rng.int(1, 2));
        let (kh, kw) = (rng.int(1, 3), rng.int(1, 3));
        let (s, p, d) = (rng.int(1, 3), rng.int(0, 2), rng.int(1, 2));
        let (n, h, w) = (rng.int(1, 3), rng.int(2, 9), rng.int(2, 9));
        let a = conv_attrs(s, p, d, c);
        let xs = vec![n, c, h, w];
        let ws = vec![c * mult, 1, kh, kw];
        let Some(ys) = conv_out(&xs, &ws, a) else {
            continue;
        };
        let what = format!("depthwise x{xs:?} w{ws:?} {a:?}");
        check_conv_family(&mut jit, &mut rng, a, [&xs, &ws, &ys], false, &what);
        done += 1;
    }
}

#[test]
fn elementwise_kernels_match_the_interpreter() {
    let mut jit = jit();
    let mut rng = Rng(3);
    for shape in [
        vec![1, 7],
        vec![3, 5],
        vec![2, 3, 5, 7],
        vec![1, 33],
        vec![2, 9, 1, 1],
    ] {
        let len: usize = shape.iter().product();
        let t = |rng: &mut Rng| (shape.clone(), data64(rng, len));
        let what = format!("{shape:?}");
        let (x, dy) = (t(&mut rng), t(&mut rng));
        check64(
            &mut jit,
            Op::Act(Act::Relu),
            None,
            std::slice::from_ref(&x),
            TOL,
            &what,
        );
        let grad = [dy.clone(), x.clone()];
        check64(&mut jit, Op::ActGrad(Act::Relu), None, &grad, TOL, &what);
        let leaky = Act::LeakyRelu(0.1);
        check64(
            &mut jit,
            Op::Act(leaky),
            None,
            std::slice::from_ref(&x),
            TOL,
            &what,
        );
        check64(&mut jit, Op::ActGrad(leaky), None, &grad, TOL, &what);
        let add = [x.clone(), dy.clone(), t(&mut rng)];
        check64(&mut jit, Op::Add, None, &add, TOL, &what);
        check64(
            &mut jit,
            Op::StopGradient,
            None,
            std::slice::from_ref(&x),
            TOL,
            &what,
        );
        let b = (vec![shape[1]], data64(&mut rng, shape[1]));
        check64(&mut jit, Op::BiasAdd, None, &[x, b], TOL, &what);
        check64(&mut jit, Op::BiasGrad, None, &[dy], TOL, &what);
    }
}

#[test]
fn pool_kernels_match_the_interpreter() {
    let mut jit = jit();
    let mut rng = Rng(4);
    let windows = [
        ([2, 2], [2, 2], [0, 0]),
        ([3, 3], [2, 2], [1, 1]),
        ([3, 2], [1, 1], [1, 0]),
        ([2, 3], [1, 2], [0, 1]),
        ([3, 3], [1, 1], [1, 1]),
    ];
    for (i, (kernel, stride, pad)) in windows.into_iter().enumerate() {
        for (n, h, w) in [(1, 5, 7), (2, 8, 6)] {
            let p = PoolAttrs {
                kernel,
                stride,
                pad,
            };
            let xs = vec![n, 3, h, w];
            let ys = Op::MaxPool(p).infer(&[&xs]).unwrap().remove(0);
            let what = format!("pool {i} {p:?} x{xs:?}");
            let x = (xs.clone(), data64(&mut rng, xs.iter().product()));
            let dy = (ys.clone(), data64(&mut rng, ys.iter().product()));
            check64(
                &mut jit,
                Op::MaxPool(p),
                None,
                std::slice::from_ref(&x),
                TOL,
                &what,
            );
            let grad = [dy.clone(), x.clone()];
            check64(&mut jit, Op::MaxPoolGrad(p), None, &grad, TOL, &what);
            check64(
                &mut jit,
                Op::AvgPool(p),
                None,
                std::slice::from_ref(&x),
                TOL,
                &what,
            );
            let avg_grad = Op::AvgPoolGrad(p, [h, w]);
            check64(&mut jit, avg_grad, None, &[dy], TOL, &what);
            check64(&mut jit, Op::GlobalAvgPool, None, &[x], TOL, &what);
            let gdy = (vec![n, 3], data64(&mut rng, 3 * n));
            let op = Op::GlobalAvgPoolGrad([h, w]);
            check64(&mut jit, op, None, &[gdy], TOL, &what);
        }
    }
}

#[test]
fn norm_kernels_match_the_interpreter() {
    let mut jit = jit();
    let mut rng = Rng(5);
    for shape in [vec![3, 5, 3, 3], vec![1, 9], vec![4, 2, 5, 1]] {
        let c = shape[1];
        let len: usize = shape.iter().product();
        let vec_c = |rng: &mut Rng| (vec![c], data64(rng, c));
        let var = (
            vec![c],
            (0..c).map(|_| 0.5 + rng.next()).collect::<Vec<_>>(),
        );
        let what = format!("{shape:?}");
        let x = (shape.clone(), data64(&mut rng, len));
        let (gamma, beta, mean) = (vec_c(&mut rng), vec_c(&mut rng), vec_c(&mut rng));
        let eps = 1e-5;
        let ins = [x.clone(), gamma.clone(), beta, mean.clone(), var.clone()];
        check64(&mut jit, Op::BatchNormInfer { eps }, None, &ins, TOL, &what);
        let ins = [x, gamma, var.clone()];
        check64(
            &mut jit,
            Op::BatchNormInferGrad { eps },
            None,
            &ins,
            TOL,
            &what,
        );
        let rm = vec_c(&mut rng);
        let bvar = (vec![c], (0..c).map(|_| rng.next()).collect::<Vec<_>>());
        let op = Op::RunningStats {
            momentum: 0.1,
            n: len / c,
        };
        check64(&mut jit, op, None, &[rm, var, mean, bvar], TOL, &what);
    }
}

/// The f64 update kernels against the formulas in f64, and the f64 sum of
/// squares.
#[test]
fn optimizer_kernels_in_f64() {
    let mut jit = jit();
    let mut rng = Rng(6);
    let len = 23;
    let g = data64(&mut rng, len);
    let p0 = data64(&mut rng, len);
    let b0 = data64(&mut rng, len);
    let (lr, m, wd) = (0.05, 0.9, 0.01);
    let sgd = OptimKernel::Sgd {
        len,
        momentum: m,
        nesterov: true,
        weight_decay: wd,
    };
    let id = jit
        .compile_dtype("sgd", KernelSpec::Optim(sgd), DType::F64)
        .unwrap();
    // [neg_lr, scale, clamp, first]
    let s = [-lr, 1.0, f64::INFINITY, 0.0];
    let (mut p, mut b) = (p0.clone(), b0.clone());
    jit.run_f64(id, &[&g, &s], &mut [&mut p, &mut b], 0..len)
        .unwrap();
    for i in 0..len {
        let gi = g[i] + wd * p0[i];
        let bi = b0[i] * m + gi;
        let pi = p0[i] + -lr * (gi + m * bi);
        assert!(
            (b[i] - bi).abs() < 1e-15 && (p[i] - pi).abs() < 1e-15,
            "{i}"
        );
    }
    let sq = KernelSpec::Optim(OptimKernel::SumSquares { len });
    let id = jit.compile_dtype("sumsq", sq, DType::F64).unwrap();
    let mut out = [0f64; 3];
    jit.run_f64(id, &[&g], &mut [&mut out], 0..len).unwrap();
    let r = SumSquaresOut::read_f64(&out);
    let want: f64 = g.iter().map(|x| x * x).sum();
    assert!((r.sum_sq - want).abs() < 1e-13, "{} vs {want}", r.sum_sq);
    let max = g.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert_eq!(r.max_abs, max as f32);
    // An f32 run of an f64 kernel is refused.
    let mut o32 = [0f32; 3];
    let g32 = vec![0f32; len];
    assert!(jit.run(id, &[&g32], &mut [&mut o32], 0..len).is_err());
}

fn model(src: &str) -> CheckedModel {
    let fe = check_text("jit_f64.cnn", src);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

/// Random f64 feeds for every input, parameter and buffer of `g`, in [-1, 1)
/// but never within 0.05 of zero (ReLU kinks); running variances positive;
/// labels cycling over the classes.
fn feeds(g: &Graph, rng: &mut Rng) -> Vec<(String, Vid, Vec<f64>)> {
    let classes = g
        .nodes
        .iter()
        .find(|n| matches!(n.op, Op::SoftmaxXent { .. }))
        .map(|n| g.shape(n.inputs[0])[1])
        .expect("a loss");
    let mut out = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        let n: usize = v.shape.iter().product();
        let data = match (v.role, v.name.as_str()) {
            (Role::Temp, _) => continue,
            (Role::Input, "labels") => (0..n).map(|k| (k % classes) as f64).collect(),
            (Role::Input, "seed") => vec![77.0],
            (Role::Buffer, name) if name.ends_with("running_var") => {
                (0..n).map(|_| 0.5 + rng.next()).collect()
            }
            _ => (0..n)
                .map(|_| {
                    let v = rng.next() * 0.95 + 0.05;
                    if rng.next() < 0.5 {
                        -v
                    } else {
                        v
                    }
                })
                .collect(),
        };
        out.push((v.name.clone(), Vid(i), data));
    }
    out
}

/// An f64 executable of `g` with `feeds` fed.
fn executable(g: &Graph, threads: usize, feeds: &[(String, Vid, Vec<f64>)]) -> Executable {
    let pool = ThreadPool::new(threads).unwrap();
    let mut exe = Executable::with_dtype(g, &pool, DType::F64).unwrap();
    assert_eq!(exe.dtype(), DType::F64);
    for (name, _, d) in feeds {
        if exe.has_feed(name) {
            exe.feed_f64(name, d).unwrap();
        }
    }
    exe
}

const EVERY_OP: &str = r#"
model Every {
  input image: [3, 11, 9]
  conv a(8, kernel=3, stride=2, pad=1)
  groupnorm(groups=2)
  leaky_relu(0.1)
  conv b(8, kernel=3, pad=2, dilation=2, groups=4, bias=false)
  batchnorm
  sigmoid
  avgpool(kernel=3, stride=1, pad=1)
  conv c(6, kernel=1)
  tanh
  maxpool(kernel=3, stride=2, pad=1)
  flatten
  dropout(0.3)
  linear d(12)
  gelu
  linear e(3)
}
"#;

const FUSIONS: &str = r#"
model Fused {
  input image: [2, 8, 8]
  conv stem(4, kernel=3, pad=1)
  relu
  conv a(4, kernel=3, pad=1, bias=false)
  batchnorm
  relu
  add(relu1, stem)
  depthwise dw(kernel=3, stride=2, pad=1)
  conv wide(3, kernel=1) from stem
  avgpool p(2)
  concat(dw, p)
  maxpool(2)
  flatten
  linear h(6)
  relu
  linear out(3)
}
"#;

/// The training graph on the f64 executable (1 and 2 threads) against the
/// interpreter in f64: every named output within 1e-10 of its scale.
fn compare_with_interpreter(src: &str, batch: usize, seed: u64) {
    let g = train_graph(&model(src), batch, 0.1);
    let mut rng = Rng(seed);
    let feeds = feeds(&g, &mut rng);
    let tensors: Vec<(Vid, Tensor<f64>)> = feeds
        .iter()
        .map(|(_, v, d)| {
            let t = ArrayD::from_shape_vec(IxDyn(g.shape(*v)), d.clone()).unwrap();
            (*v, t)
        })
        .collect();
    let want = run(&g, tensors).unwrap();
    for threads in [1, 2] {
        let mut exe = executable(&g, threads, &feeds);
        exe.run();
        for (name, v) in &g.outputs {
            let w: Vec<f64> = want.get(*v).iter().copied().collect();
            let got = exe.get_f64(name).unwrap();
            assert!(exe.get(name).is_none(), "no f32 view of an f64 executable");
            let scale = w.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= TOL * scale,
                    "{threads} threads: {name}[{i}]: jit {a} vs interpreter {b}\n{}",
                    exe.plan().dump()
                );
            }
        }
    }
}

#[test]
fn training_graphs_match_the_interpreter() {
    compare_with_interpreter(EVERY_OP, 3, 7);
    compare_with_interpreter(FUSIONS, 1, 8);
    compare_with_interpreter(FUSIONS, 3, 9);
}

// ---------------------------------------------------------------------------
// The gradient check.

const EPS: f64 = 1e-6;
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-3;

/// One directional derivative: the analytic `⟨grad, d⟩` and the central
/// difference of the loss along `d`.
struct Probe {
    param: String,
    analytic: f64,
    numeric: f64,
}

/// Whether every probe agrees (`|a − n| ≤ atol + rtol·max(|a|, |n|)`); the
/// first that does not otherwise.
fn agree(probes: &[Probe]) -> Result<(), String> {
    for p in probes {
        let (a, n) = (p.analytic, p.numeric);
        if (a - n).abs() > ATOL + RTOL * a.abs().max(n.abs()) {
            return Err(format!("{}: analytic {a} vs numeric {n}", p.param));
        }
    }
    Ok(())
}

/// The training graph of `src` on the f64 executable: for every `grad:<param>`
/// output, `dirs` random directions, each its analytic derivative (from the
/// gradient the executable computed) and the central difference of the
/// executable's own loss.
fn probes(src: &str, batch: usize, dirs: usize, seed: u64) -> Vec<Probe> {
    let g = train_graph(&model(src), batch, 0.0);
    let mut rng = Rng(seed);
    let mut feeds = feeds(&g, &mut rng);
    let mut exe = executable(&g, 1, &feeds);
    exe.run();
    let grads: Vec<(String, Vec<f64>)> = g
        .outputs
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("grad:"))
        .map(|p| {
            (
                p.to_string(),
                exe.get_f64(&format!("grad:{p}")).unwrap().to_vec(),
            )
        })
        .collect();
    assert!(!grads.is_empty());
    let mut out = Vec::new();
    for (param, grad) in &grads {
        let k = feeds.iter().position(|(n, _, _)| n == param).unwrap();
        let p0 = feeds[k].2.clone();
        for _ in 0..dirs {
            let d: Vec<f64> = (0..p0.len()).map(|_| rng.next() * 2.0 - 1.0).collect();
            let mut loss_at = |t: f64| {
                let p: Vec<f64> = p0.iter().zip(&d).map(|(x, d)| x + t * d).collect();
                exe.feed_f64(param, &p).unwrap();
                exe.run();
                exe.get_f64("loss").unwrap()[0]
            };
            let numeric = (loss_at(EPS) - loss_at(-EPS)) / (2.0 * EPS);
            exe.feed_f64(param, &p0).unwrap();
            let analytic = grad.iter().zip(&d).map(|(g, d)| g * d).sum();
            out.push(Probe {
                param: param.clone(),
                analytic,
                numeric,
            });
        }
        feeds[k].2 = p0;
    }
    out
}

fn gradient_check(src: &str, batch: usize, seed: u64) {
    let probes = probes(src, batch, 3, seed);
    if let Err(e) = agree(&probes) {
        panic!("{e}");
    }
}

#[test]
fn gradients_of_conv_batchnorm_pools_linear() {
    gradient_check(
        "model M {\n input x: [2, 9, 8]\n conv c1(4, kernel=3, stride=2, pad=1)\n batchnorm\n relu\n conv c2(6, kernel=3, pad=1, groups=2, bias=false)\n batchnorm\n relu\n maxpool(2)\n conv c3(4, kernel=2, dilation=2, pad=1)\n global_avg_pool\n linear fc(3)\n}",
        3,
        31,
    );
}

#[test]
fn gradients_of_residual_concat_groupnorm_dropout() {
    gradient_check(
        "model M {\n input x: [2, 6, 6]\n conv stem(4, kernel=3, pad=1)\n relu\n conv a(4, kernel=3, pad=1)\n groupnorm g(2)\n add(g, stem)\n depthwise dw(kernel=3, stride=2)\n conv b(2, kernel=1) from x\n detach d\n avgpool p(2)\n concat(dw, p)\n leaky_relu\n flatten\n dropout(0.25)\n linear fc(3)\n}",
        3,
        32,
    );
}

#[test]
fn gradients_of_smooth_activations_and_strided_pools() {
    gradient_check(
        "model M {\n input x: [3, 7, 7]\n conv a(6, kernel=3, pad=1, groups=3)\n sigmoid\n depthwise dw(kernel=3, pad=1, stride=1)\n tanh\n avgpool(kernel=3, stride=2, pad=1)\n conv b(4, kernel=1)\n gelu\n maxpool(kernel=3, stride=1, pad=1)\n flatten\n linear h(5)\n tanh\n linear fc(3)\n}",
        2,
        33,
    );
}

/// The comparison is real: a gradient off by 1% fails it, and so does a
/// gradient of another parameter.
#[test]
fn a_wrong_gradient_fails_the_check() {
    let src = "model M {\n input x: [1, 5, 5]\n conv c(3, kernel=3, pad=1)\n relu\n global_avg_pool\n linear fc(3)\n}";
    let good = probes(src, 2, 2, 34);
    assert!(agree(&good).is_ok());
    let scaled: Vec<Probe> = good
        .iter()
        .map(|p| Probe {
            param: p.param.clone(),
            analytic: p.analytic * 1.01,
            numeric: p.numeric,
        })
        .collect();
    assert!(agree(&scaled).is_err(), "a gradient 1% off passed");
    let swapped: Vec<Probe> = good
        .iter()
        .zip(good.iter().rev())
        .map(|(p, q)| Probe {
            param: p.param.clone(),
            analytic: q.analytic,
            numeric: p.numeric,
        })
        .collect();
    assert!(
        agree(&swapped).is_err(),
        "another parameter's gradient passed"
    );
}
