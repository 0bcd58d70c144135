//! Gradient checks: every differentiable op, and whole small models, against
//! central differences in f64 on the reference interpreter (eps 1e-6, atol 1e-5,
//! rtol 1e-3). Small inputs get the full Jacobian-vector product element by
//! element; larger ones random directions. Points are kept away from ReLU kinks and
//! max-pool ties.

use cnnc_compiler::interp::{run, Tensor};
use cnnc_compiler::ir::autodiff::{backward, Seed};
use cnnc_compiler::ir::lower::train_graph;
use cnnc_compiler::ir::verify::verify;
use cnnc_compiler::ir::*;
use cnnc_compiler::pipeline::check_text;
use ndarray::{ArrayD, IxDyn};

const EPS: f64 = 1e-6;
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-3;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1), but never within 0.05 of zero (ReLU kinks).
    fn away_from_zero(&mut self) -> f64 {
        let v = self.next() * 0.95 + 0.05;
        if self.next() < 0.5 {
            -v
        } else {
            v
        }
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor<f64> {
        let n = shape.iter().product();
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n).map(|_| self.away_from_zero()).collect(),
        )
        .unwrap()
    }
    /// Values spaced at least 1e-3 apart in a random order: no max-pool ties.
    fn distinct(&mut self, shape: &[usize]) -> Tensor<f64> {
        let n: usize = shape.iter().product();
        let mut v: Vec<f64> = (0..n)
            .map(|i| (i as f64 + 0.5) / n as f64 * 2.0 - 1.0)
            .collect();
        for i in (1..n).rev() {
            let j = (self.next() * (i + 1) as f64) as usize;
            v.swap(i, j);
        }
        ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
    }
}

/// Compares an analytic directional derivative with a central difference.
fn close(analytic: f64, numeric: f64) -> bool {
    (analytic - numeric).abs() <= ATOL + RTOL * numeric.abs().max(analytic.abs())
}

/// Checks the gradients of `f = Σ output₀ ⊙ R` with respect to the inputs listed
/// in `wrt`, for a graph holding one node applied to fed inputs.
fn check_op(op: Op, inputs: Vec<Tensor<f64>>, wrt: &[usize], seed: u64) {
    let mut rng = Rng(seed);
    let mut g = Graph::new("check");
    let ids: Vec<Vid> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| g.add_value(format!("in{i}"), t.shape().to_vec(), Role::Input))
        .collect();
    let name = op.name();
    let outs = g.push(op, &ids, None);
    let r_shape = g.shape(outs[0]).clone();
    let r = g.add_value("r", r_shape.clone(), Role::Input);
    let wrt_ids: Vec<Vid> = wrt.iter().map(|i| ids[*i]).collect();
    let grads = backward(&mut g, &[Seed::Value(outs[0], r)], &wrt_ids);
    verify(&g).unwrap_or_else(|e| panic!("{name}: invalid graph: {e:?}"));
    let r_val = rng.tensor(&r_shape);
    let feeds = |ins: &[Tensor<f64>]| -> Vec<(Vid, Tensor<f64>)> {
        ids.iter()
            .copied()
            .zip(ins.iter().cloned())
            .chain([(r, r_val.clone())])
            .collect()
    };
    let objective = |ins: &[Tensor<f64>]| -> f64 {
        let vals = run(&g, feeds(ins)).unwrap();
        (vals.get(outs[0]) * &r_val).sum()
    };
    let vals = run(&g, feeds(&inputs)).unwrap();
    for (k, &i) in wrt.iter().enumerate() {
        let grad = match grads[k] {
            Some(gr) => vals.get(gr).clone(),
            None => ArrayD::zeros(inputs[i].shape()),
        };
        let n = inputs[i].len();
        // Full Jacobian-vector product for small inputs, 12 random directions otherwise.
        let directions: Vec<Tensor<f64>> = if n <= 64 {
            (0..n)
                .map(|e| {
                    let mut d = ArrayD::zeros(inputs[i].shape());
                    d.as_slice_mut().unwrap()[e] = 1.0;
                    d
                })
                .collect()
        } else {
            (0..12).map(|_| rng.tensor(inputs[i].shape())).collect()
        };
        for (di, d) in directions.iter().enumerate() {
            let mut plus = inputs.clone();
            plus[i] = &plus[i] + &(d * EPS);
            let mut minus = inputs.clone();
            minus[i] = &minus[i] - &(d * EPS);
            let numeric = (objective(&plus) - objective(&minus)) / (2.0 * EPS);
            let analytic = (&grad * d).sum();
            assert!(
                close(analytic, numeric),
                "{name}: input {i}, direction {di}: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}

fn conv(stride: usize, pad: usize, dilation: usize, groups: usize) -> ConvAttrs {
    ConvAttrs {
        stride: [stride, stride],
        pad: [pad, pad],
        dilation: [dilation, dilation],
        groups,
    }
}

#[test]
fn conv2d_every_combination_of_stride_pad_dilation_groups() {
    let mut rng = Rng(1);
    let mut seed = 100;
    for stride in [1, 2, 3] {
        for pad in [0, 1, 2] {
            for dilation in [1, 2] {
                for groups in [1, 2, 4] {
                    let (c, o, k) = (4, 4, 3);
                    let h = 9;
                    if (h + 2 * pad) < dilation * (k - 1) + 1 {
                        continue;
                    }
                    let x = rng.tensor(&[2, c, h, h - 1]);
                    let w = rng.tensor(&[o, c / groups, k, k - 1]);
                    seed += 1;
                    check_op(
                        Op::Conv2d(conv(stride, pad, dilation, groups)),
                        vec![x, w],
                        &[0, 1],
                        seed,
                    );
                }
            }
        }
    }
}

#[test]
fn conv2d_depthwise_and_pointwise() {
    let mut rng = Rng(2);
    check_op(
        Op::Conv2d(conv(2, 1, 1, 6)),
        vec![rng.tensor(&[1, 6, 7, 7]), rng.tensor(&[6, 1, 3, 3])],
        &[0, 1],
        3,
    );
    check_op(
        Op::Conv2d(conv(1, 0, 1, 1)),
        vec![rng.tensor(&[3, 5, 4, 4]), rng.tensor(&[7, 5, 1, 1])],
        &[0, 1],
        4,
    );
}

#[test]
fn bias_add_and_matmul() {
    let mut rng = Rng(3);
    check_op(
        Op::BiasAdd,
        vec![rng.tensor(&[2, 3, 4, 4]), rng.tensor(&[3])],
        &[0, 1],
        5,
    );
    check_op(
        Op::BiasAdd,
        vec![rng.tensor(&[4, 5]), rng.tensor(&[5])],
        &[0, 1],
        6,
    );
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if ta { [4, 3] } else { [3, 4] };
        let b = if tb { [5, 4] } else { [4, 5] };
        check_op(
            Op::MatMul { ta, tb },
            vec![rng.tensor(&a), rng.tensor(&b)],
            &[0, 1],
            7,
        );
    }
}

#[test]
fn batchnorm_train_mode_rank_4_and_rank_2() {
    let mut rng = Rng(4);
    let gamma = |rng: &mut Rng, c| rng.tensor(&[c]).mapv(|v: f64| v.abs() + 0.5);
    let g = gamma(&mut rng, 3);
    check_op(
        Op::BatchNorm { eps: 1e-5 },
        vec![rng.tensor(&[4, 3, 3, 3]), g, rng.tensor(&[3])],
        &[0, 1, 2],
        8,
    );
    let g = gamma(&mut rng, 5);
    check_op(
        Op::BatchNorm { eps: 1e-5 },
        vec![rng.tensor(&[6, 5]), g, rng.tensor(&[5])],
        &[0, 1, 2],
        9,
    );
}

#[test]
fn batchnorm_inference_mode_input_gradient() {
    let mut rng = Rng(5);
    let var = rng.tensor(&[3]).mapv(|v: f64| v.abs() + 0.1);
    check_op(
        Op::BatchNormInfer { eps: 1e-5 },
        vec![
            rng.tensor(&[2, 3, 4, 4]),
            rng.tensor(&[3]),
            rng.tensor(&[3]),
            rng.tensor(&[3]),
            var,
        ],
        &[0],
        10,
    );
}

#[test]
fn groupnorm() {
    let mut rng = Rng(6);
    for groups in [1, 2, 4] {
        check_op(
            Op::GroupNorm { groups, eps: 1e-5 },
            vec![
                rng.tensor(&[2, 4, 3, 3]),
                rng.tensor(&[4]),
                rng.tensor(&[4]),
            ],
            &[0, 1, 2],
            11,
        );
    }
}

#[test]
fn activations() {
    let mut rng = Rng(7);
    for a in [
        Act::Relu,
        Act::LeakyRelu(0.1),
        Act::Sigmoid,
        Act::Tanh,
        Act::Gelu,
    ] {
        check_op(Op::Act(a), vec![rng.tensor(&[2, 3, 4, 4])], &[0], 12);
    }
}

#[test]
fn pools() {
    let mut rng = Rng(8);
    for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)] {
        let attrs = PoolAttrs {
            kernel: [k, k],
            stride: [s, s],
            pad: [p, p],
        };
        check_op(
            Op::MaxPool(attrs),
            vec![rng.distinct(&[2, 2, 7, 6])],
            &[0],
            13,
        );
        check_op(
            Op::AvgPool(attrs),
            vec![rng.tensor(&[2, 2, 7, 6])],
            &[0],
            14,
        );
    }
    check_op(Op::GlobalAvgPool, vec![rng.tensor(&[2, 3, 5, 4])], &[0], 15);
}

#[test]
fn reshape_add_concat() {
    let mut rng = Rng(9);
    check_op(
        Op::Reshape(vec![2, 48]),
        vec![rng.tensor(&[2, 3, 4, 4])],
        &[0],
        16,
    );
    check_op(
        Op::Add,
        vec![
            rng.tensor(&[2, 3, 2, 2]),
            rng.tensor(&[2, 3, 2, 2]),
            rng.tensor(&[2, 3, 2, 2]),
        ],
        &[0, 1, 2],
        17,
    );
    check_op(
        Op::Concat,
        vec![rng.tensor(&[2, 3, 2, 2]), rng.tensor(&[2, 1, 2, 2])],
        &[0, 1],
        18,
    );
    check_op(
        Op::Concat,
        vec![rng.tensor(&[3, 4]), rng.tensor(&[3, 2])],
        &[0, 1],
        19,
    );
}

#[test]
fn dropout_with_a_fixed_seed() {
    let mut rng = Rng(10);
    let seed = ArrayD::from_shape_vec(IxDyn(&[]), vec![1234.0]).unwrap();
    check_op(
        Op::Dropout { p: 0.3, salt: 5 },
        vec![rng.tensor(&[2, 3, 4, 4]), seed],
        &[0],
        20,
    );
}

#[test]
fn stop_gradient_blocks_the_gradient() {
    let mut g = Graph::new("detach");
    let x = g.add_value("x", vec![2, 3], Role::Input);
    let y = g.push1(Op::StopGradient, &[x], None);
    let r = g.add_value("r", vec![2, 3], Role::Input);
    let grads = backward(&mut g, &[Seed::Value(y, r)], &[x]);
    assert_eq!(
        grads,
        vec![None],
        "no gradient may flow through stop_gradient"
    );
}

#[test]
fn softmax_cross_entropy_with_and_without_smoothing() {
    for smoothing in [0.0, 0.1] {
        let mut rng = Rng(11);
        let mut g = Graph::new("xent");
        let z = g.add_value("z", vec![4, 5], Role::Input);
        let labels = g.add_value("labels", vec![4], Role::Input);
        let lp = g.push(Op::SoftmaxXent { smoothing }, &[z, labels], None);
        let grads = backward(&mut g, &[Seed::One(lp[0])], &[z]);
        let zv = rng.tensor(&[4, 5]);
        let lv = ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.0, 3.0, 4.0, 1.0]).unwrap();
        let loss = |zv: &Tensor<f64>| {
            run(&g, vec![(z, zv.clone()), (labels, lv.clone())])
                .unwrap()
                .get(lp[0])
                .sum()
        };
        let vals = run(&g, vec![(z, zv.clone()), (labels, lv.clone())]).unwrap();
        let grad = vals.get(grads[0].unwrap()).clone();
        for e in 0..20 {
            let mut d = ArrayD::zeros(IxDyn(&[4, 5]));
            d.as_slice_mut().unwrap()[e] = 1.0;
            let numeric = (loss(&(&zv + &(&d * EPS))) - loss(&(&zv - &(&d * EPS)))) / (2.0 * EPS);
            let analytic = (&grad * &d).sum();
            assert!(
                close(analytic, numeric),
                "smoothing {smoothing}, element {e}: {analytic} vs {numeric}"
            );
        }
    }
}

/// Whole models: the gradient of the training loss with respect to every
/// parameter, from the lowered training graph, against central differences.
fn check_model(src: &str, batch: usize, seed: u64) {
    let fe = check_text("gradcheck.cnn", src);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    let model = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
    let g = train_graph(&model, batch, 0.0);
    verify(&g).unwrap();
    let mut rng = Rng(seed);
    let mut feeds: Vec<(Vid, Tensor<f64>)> = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        let t = match (v.role, v.name.as_str()) {
            (Role::Input, "labels") => {
                let k = g.shape(g.output("grad:fc.weight").unwrap())[0];
                ArrayD::from_shape_vec(
                    IxDyn(&v.shape),
                    (0..batch).map(|n| (n % k) as f64).collect(),
                )
                .unwrap()
            }
            (Role::Input, "seed") => ArrayD::from_shape_vec(IxDyn(&[]), vec![77.0]).unwrap(),
            (Role::Buffer, name) if name.ends_with("running_var") => {
                rng.tensor(&v.shape).mapv(|x: f64| x.abs() + 0.5)
            }
            (Role::Temp, _) => continue,
            _ => rng.tensor(&v.shape),
        };
        feeds.push((Vid(i), t));
    }
    let loss_of = |feeds: &[(Vid, Tensor<f64>)]| {
        run(&g, feeds.to_vec())
            .unwrap()
            .output(&g, "loss")
            .unwrap()
            .sum()
    };
    let vals = run(&g, feeds.clone()).unwrap();
    let mut checked = 0;
    for (name, gv) in g.outputs.iter().filter(|(n, _)| n.starts_with("grad:")) {
        let pname = &name["grad:".len()..];
        let pid = g.value_by_name(pname).unwrap();
        let k = feeds.iter().position(|(v, _)| *v == pid).unwrap();
        let grad = vals.get(*gv).clone();
        for _ in 0..4 {
            let d = rng.tensor(g.shape(pid));
            let mut plus = feeds.clone();
            plus[k].1 = &plus[k].1 + &(&d * EPS);
            let mut minus = feeds.clone();
            minus[k].1 = &minus[k].1 - &(&d * EPS);
            let numeric = (loss_of(&plus) - loss_of(&minus)) / (2.0 * EPS);
            let analytic = (&grad * &d).sum();
            assert!(
                close(analytic, numeric),
                "{pname}: analytic {analytic} vs numeric {numeric}"
            );
        }
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn whole_model_conv_bn_pool_linear() {
    check_model(
        "model M {\n input x: [1, 8, 8]\n conv c1(4, kernel=3, pad=1)\n batchnorm\n relu\n maxpool(2)\n conv c2(6, kernel=3, pad=1, bias=false)\n batchnorm\n relu\n global_avg_pool\n linear fc(3)\n}",
        4,
        21,
    );
}

#[test]
fn whole_model_residual_concat_groupnorm_dropout_detach() {
    check_model(
        "model M {\n input x: [2, 6, 6]\n conv stem(4, kernel=3, pad=1)\n relu\n conv a(4, kernel=3, pad=1)\n groupnorm g(2)\n add(g, stem)\n depthwise dw(kernel=3, stride=2)\n conv b(2, kernel=1) from x\n detach d\n avgpool p(2)\n concat(dw, p)\n leaky_relu\n flatten\n dropout(0.25)\n linear fc(3)\n}",
        3,
        22,
    );
}

/// A parameter behind `detach` gets no gradient (the training graph has no
/// `grad:` output for it), and neither does a frozen one.
#[test]
fn detached_and_frozen_parameters_get_no_gradient() {
    let fe = check_text(
        "nograd.cnn",
        "model M {\n input x: [1, 6, 6]\n frozen conv f(2, kernel=3, pad=1)\n conv b(2, kernel=1)\n detach\n conv c(2, kernel=3, pad=1)\n global_avg_pool\n linear fc(3)\n}",
    );
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    let model = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
    let g = train_graph(&model, 2, 0.0);
    let grads: Vec<&str> = g
        .outputs
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("grad:"))
        .collect();
    assert_eq!(
        grads,
        [
            "grad:c.weight",
            "grad:c.bias",
            "grad:fc.weight",
            "grad:fc.bias"
        ]
    );
}
