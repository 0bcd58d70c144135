//! Native (Rust) steps against the reference interpreter, bit for bit: sigmoid,
//! tanh, gelu (and relu, leaky relu) forward and backward, groupnorm and its
//! gradient, concat, slice, dropout and its gradient, count_correct and one_hot,
//! on random shapes (rank 2 and 4 where the op allows, batch 1, odd sizes) and
//! the awkward values (NaN, ±∞, ties, labels and seeds out of range). Each op
//! must also get its own native step from `Native::for_op`, not the interpreter.

mod common;

use cnnc_compiler::codegen::native::Native;
use cnnc_compiler::interp::{eval, Tensor};
use cnnc_compiler::ir::*;
use common::Rng;
use ndarray::{ArrayD, IxDyn};

/// Runs `op` on `inputs` as `Native::for_op` plans it and through
/// `interp::eval`, and asserts identical bits (any NaN matches any NaN).
/// Returns the native step.
fn check(op: Op, inputs: &[(Shape, Vec<f32>)], what: &str) -> Native {
    let shapes: Vec<&Shape> = inputs.iter().map(|(s, _)| s).collect();
    let out_shapes = op.infer(&shapes).unwrap_or_else(|e| panic!("{what}: {e}"));
    let tensors: Vec<Tensor<f32>> = inputs
        .iter()
        .map(|(s, d)| ArrayD::from_shape_vec(IxDyn(s), d.clone()).unwrap())
        .collect();
    let refs: Vec<&Tensor<f32>> = tensors.iter().collect();
    let want = eval(&op, &refs, &out_shapes);

    let native = Native::for_op(
        &op,
        inputs.iter().map(|(s, _)| s.clone()).collect(),
        out_shapes.clone(),
    );
    assert!(
        !matches!(native, Native::Reference { .. }),
        "{what}: {} runs on the interpreter",
        op.name()
    );
    assert!(native.label().starts_with("native "), "{what}");
    let ins: Vec<&[f32]> = inputs.iter().map(|(_, d)| d.as_slice()).collect();
    // Outputs start as NaN: every element must be written.
    let mut outs: Vec<Vec<f32>> = out_shapes
        .iter()
        .map(|s| vec![f32::NAN; s.iter().product()])
        .collect();
    let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
    native.run(&ins, &mut o);

    for (j, (got, want)) in outs.iter().zip(&want).enumerate() {
        let want: Vec<f32> = want.iter().copied().collect();
        assert_eq!(got.len(), want.len(), "{what}: output {j}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{what}: output {j} element {i}: native {a:e} vs interpreter {b:e}"
            );
        }
    }
    native
}

/// A random `[n, c]` or `[n, c, h, w]` shape: batch 1 or odd, odd sizes.
fn shape(rng: &mut Rng, case: usize) -> Shape {
    let n = [1, 3, 1, 5, 2][case % 5];
    if case.is_multiple_of(2) {
        vec![n, rng.int(1, 70)]
    } else {
        vec![
            n,
            rng.int(1, 9),
            [1, 3, 7, 14][rng.int(0, 3)],
            rng.int(1, 9),
        ]
    }
}

fn len(s: &Shape) -> usize {
    s.iter().product()
}

/// Values over the activations' interesting range: mostly in [-6, 6), some
/// large (saturation), exact zeros, and ±∞ and NaN.
fn act_data(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.int(0, 39) {
            0 => 0.0,
            1 => -0.0,
            2 => f32::INFINITY,
            3 => f32::NEG_INFINITY,
            4 => f32::NAN,
            5..=8 => ((rng.next() * 2.0 - 1.0) * 120.0) as f32,
            _ => ((rng.next() * 2.0 - 1.0) * 6.0) as f32,
        })
        .collect()
}

#[test]
fn activations_and_their_gradients_are_the_interpreters() {
    let mut rng = Rng(0x5eed_0a01);
    let acts = [
        Act::Sigmoid,
        Act::Tanh,
        Act::Gelu,
        Act::Relu,
        Act::LeakyRelu(0.01),
    ];
    for case in 0..40 {
        let s = shape(&mut rng, case);
        for act in acts {
            let what = format!("{act:?} {s:?}");
            let x = (s.clone(), act_data(&mut rng, len(&s)));
            let dy = (s.clone(), rng.data(len(&s)));
            check(Op::Act(act), std::slice::from_ref(&x), &what);
            check(Op::ActGrad(act), &[dy, x], &format!("{what} grad"));
        }
    }
}

/// Group-norm shapes: batch 1 and odd batches, 1 to 6 groups, chunk counts
/// (batch × groups) and channel counts below, at and past the 8 sums the
/// native code runs side by side, odd spatial sizes up to 14×14.
fn groupnorm_shapes(rng: &mut Rng) -> Vec<(Shape, usize)> {
    let mut out = vec![
        (vec![1, 1, 1, 1], 1),
        (vec![1, 4, 3, 5], 2),
        (vec![3, 9, 7, 7], 3),
        (vec![2, 32, 14, 14], 4),
        (vec![5, 12, 1, 3], 6),
        (vec![9, 8, 5, 5], 1),
    ];
    for case in 0..16 {
        let groups = rng.int(1, 6);
        let n = [1, 3, 5, 2][case % 4];
        let c = groups * rng.int(1, 4);
        out.push((vec![n, c, rng.int(1, 14), rng.int(1, 14)], groups));
    }
    out
}

#[test]
fn groupnorm_is_the_interpreters() {
    let mut rng = Rng(0x5eed_0a02);
    for (s, groups) in groupnorm_shapes(&mut rng) {
        let what = format!("groupnorm({groups}) {s:?}");
        let c = s[1];
        // An offset, so the mean matters.
        let x: Vec<f32> = rng.data(len(&s)).iter().map(|v| 3.0 * v + 0.7).collect();
        let gamma: Vec<f32> = rng.data(c).iter().map(|v| 1.0 + v).collect();
        let beta = rng.data(c);
        let op = Op::GroupNorm { groups, eps: 1e-5 };
        check(
            op,
            &[(s.clone(), x), (vec![c], gamma), (vec![c], beta)],
            &what,
        );
    }
}

#[test]
fn groupnorm_grad_is_the_interpreters() {
    let mut rng = Rng(0x5eed_0a03);
    for (s, groups) in groupnorm_shapes(&mut rng) {
        let what = format!("groupnorm_grad({groups}) {s:?}");
        let (n, c) = (s[0], s[1]);
        let x: Vec<f32> = rng.data(len(&s)).iter().map(|v| 3.0 * v + 0.7).collect();
        let gamma: Vec<f32> = rng.data(c).iter().map(|v| 1.0 + v).collect();
        // The statistics the forward op gives (so x̂ is in range).
        let fwd = eval(
            &Op::GroupNorm { groups, eps: 1e-5 },
            &[
                &ArrayD::from_shape_vec(IxDyn(&s), x.clone()).unwrap(),
                &ArrayD::from_shape_vec(IxDyn(&[c]), gamma.clone()).unwrap(),
                &ArrayD::from_shape_vec(IxDyn(&[c]), vec![0.0; c]).unwrap(),
            ],
            &[s.clone(), vec![n, groups], vec![n, groups]],
        );
        let mean: Vec<f32> = fwd[1].iter().copied().collect();
        let var: Vec<f32> = fwd[2].iter().copied().collect();
        let op = Op::GroupNormGrad { groups, eps: 1e-5 };
        check(
            op,
            &[
                (s.clone(), rng.data(len(&s))),
                (s.clone(), x),
                (vec![c], gamma),
                (vec![n, groups], mean),
                (vec![n, groups], var),
            ],
            &what,
        );
    }
}

#[test]
fn concat_and_slice_are_the_interpreters() {
    let mut rng = Rng(0x5eed_0a04);
    for case in 0..30 {
        let s = shape(&mut rng, case);
        // Concat: 1 to 4 inputs differing in channels only.
        let parts: Vec<(Shape, Vec<f32>)> = (0..1 + case % 4)
            .map(|_| {
                let mut p = s.clone();
                p[1] = rng.int(1, 7);
                let d = rng.data(len(&p));
                (p, d)
            })
            .collect();
        let widths: Vec<usize> = parts.iter().map(|(p, _)| p[1]).collect();
        check(Op::Concat, &parts, &format!("concat {s:?} {widths:?}"));
        // Slice: every channel range of a small tensor, a random one of a larger.
        let x = (s.clone(), rng.data(len(&s)));
        let c = s[1];
        let ranges: Vec<(usize, usize)> = if c <= 6 {
            (0..c)
                .flat_map(|a| (1..=c - a).map(move |l| (a, l)))
                .collect()
        } else {
            let start = rng.int(0, c - 1);
            vec![(start, rng.int(1, c - start)), (0, c), (c - 1, 1)]
        };
        for (start, len) in ranges {
            let what = format!("slice {start}+{len} of {s:?}");
            check(Op::Slice { start, len }, std::slice::from_ref(&x), &what);
        }
    }
}

#[test]
fn dropout_and_its_gradient_are_the_interpreters() {
    let mut rng = Rng(0x5eed_0a05);
    // The seed as the interpreter reads it: truncated, negative fractions are 0,
    // NaN, negative and out-of-range seeds give 0.
    let seeds = [
        0.0,
        7.0,
        12345.0,
        3.9,
        -0.5,
        -3.0,
        f32::NAN,
        1e30,
        16_777_216.0,
    ];
    for (case, seed) in seeds.iter().enumerate() {
        for (p, salt) in [(0.2, 1), (0.5, 0), (0.9, 77), (0.0, 3), (1.0, 5)] {
            let s = shape(&mut rng, case);
            let what = format!("dropout({p}, salt {salt}) seed {seed} {s:?}");
            let x = (s.clone(), rng.data(len(&s)));
            let seed = (vec![], vec![*seed]);
            check(Op::Dropout { p, salt }, &[x.clone(), seed.clone()], &what);
            check(Op::DropoutGrad { p, salt }, &[x, seed], &what);
        }
    }
}

#[test]
fn count_correct_is_the_interpreters() {
    let mut rng = Rng(0x5eed_0a06);
    for case in 0..40 {
        let n = [1, 3, 7, 64, 2][case % 5];
        let k = rng.int(1, 12);
        // Few distinct values, so ties are common (the first maximum counts).
        let logits: Vec<f32> = (0..n * k).map(|_| rng.int(0, 3) as f32).collect();
        let labels: Vec<f32> = (0..n)
            .map(|_| match rng.int(0, 9) {
                0 => -0.5,
                1 => f32::NAN,
                2 => -2.0,
                3 => k as f32,
                4 => rng.int(0, k - 1) as f32 + 0.75,
                _ => rng.int(0, k - 1) as f32,
            })
            .collect();
        check(
            Op::CountCorrect,
            &[(vec![n, k], logits), (vec![n], labels)],
            &format!("count_correct [{n}, {k}]"),
        );
    }
    // A NaN in a row: never greater, so the first maximum stays before it.
    check(
        Op::CountCorrect,
        &[
            (
                vec![3, 3],
                vec![f32::NAN, 1.0, 2.0, 0.0, f32::NAN, 5.0, 1.0, 1.0, 1.0],
            ),
            (vec![3], vec![0.0, 2.0, 0.0]),
        ],
        "count_correct with NaN logits",
    );
}

#[test]
fn one_hot_is_the_interpreters() {
    let mut rng = Rng(0x5eed_0a07);
    for case in 0..30 {
        let n = [1, 3, 7, 64, 2][case % 5];
        let classes = rng.int(1, 12);
        let idx: Vec<f32> = (0..n)
            .map(|_| match rng.int(0, 9) {
                0 => -0.5,
                1 => f32::NAN,
                2 => -1.0,
                3 => classes as f32,
                4 => rng.int(0, classes - 1) as f32 + 0.5,
                _ => rng.int(0, classes - 1) as f32,
            })
            .collect();
        check(
            Op::OneHot { classes },
            &[(vec![n], idx)],
            &format!("one_hot({classes}) [{n}]"),
        );
    }
}

/// The ops that keep the interpreter path still do (and give its results).
#[test]
fn other_ops_fall_back_to_the_interpreter() {
    let op = Op::SoftmaxXentGrad { smoothing: 0.1 };
    let native = Native::for_op(&op, vec![vec![2, 3], vec![2]], vec![vec![2, 3]]);
    assert!(matches!(native, Native::Reference { .. }));
    assert_eq!(native.label(), "ref interpreter");
}
