//! JIT elementwise kernels against the reference interpreter: the n-way add,
//! bias add with and without the fused ReLU, the bias gradient (a reduction over
//! the batch, its partial sums added across work ranges), leaky ReLU forward and
//! backward (the boundary at 0 and NaN as the interpreter), and the copy, on
//! random shapes of rank 2–4 (batch 1 and odd batches, odd spatial sizes).
//! 1e-5 absolute; sums 1e-5·sqrt(terms).

mod common;

use cnnc_compiler::codegen::elementwise::ElemKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec, Par};
use cnnc_compiler::ir::*;
use common::{check, oracle, Rng};

fn jit() -> Jit {
    Jit::new().expect("the host is supported")
}

/// A random `[n, c, …]` shape: rank 2 (up to 70 features), 3 or 4 (odd
/// spatial sizes); batch 1 or odd.
fn shape(rng: &mut Rng, case: usize) -> Shape {
    let n = [1, 3, 1, 5, 2][case % 5];
    let sizes = [1, 3, 5, 7, 28];
    match case % 4 {
        0 => vec![n, rng.int(1, 70)],
        1 => vec![n, rng.int(1, 6), rng.int(1, 40)],
        2 => vec![n, rng.int(1, 4), sizes[rng.int(0, 4)], sizes[rng.int(0, 3)]],
        _ => vec![n, rng.int(1, 9), rng.int(1, 9), rng.int(1, 9)],
    }
}

fn len(s: &Shape) -> usize {
    s.iter().product()
}

#[test]
fn add_bias_and_copy_match_the_interpreter() {
    let mut rng = Rng(0x5eed_0201);
    let mut j = jit();
    for case in 0..30 {
        let s = shape(&mut rng, case);
        let what = |op: &str| format!("{op} {s:?}");
        let n = 2 + case % 3;
        let xs: Vec<(Shape, Vec<f32>)> = (0..n).map(|_| (s.clone(), rng.data(len(&s)))).collect();
        check(&mut j, Op::Add, &xs, 1e-5, &what(&format!("add×{n}")));
        let b = (vec![s[1]], rng.data(s[1]));
        check(
            &mut j,
            Op::BiasAdd,
            &[xs[0].clone(), b],
            1e-5,
            &what("bias_add"),
        );
        check(
            &mut j,
            Op::StopGradient,
            &xs[..1],
            0.0,
            &what("stop_gradient"),
        );
        let terms = (len(&s) / s[1]) as f32;
        check(
            &mut j,
            Op::BiasGrad,
            &xs[..1],
            1e-5 * terms.sqrt(),
            &what("bias_grad"),
        );
    }
}

#[test]
fn bias_grad_over_large_sums() {
    let mut rng = Rng(0x5eed_0202);
    let mut j = jit();
    // A conv layer's dy (inner 196 = 12 vectors + 4), a 1×1 map, a wide linear
    // layer (column blocks of 16 and leftovers), odd batches.
    for s in [
        vec![5, 8, 14, 14],
        vec![7, 33, 1, 1],
        vec![3, 100],
        vec![9, 19],
        vec![1, 3, 28, 28],
    ] {
        let terms = (len(&s) / s[1]) as f32;
        let x = (s.clone(), rng.data(len(&s)));
        check(
            &mut j,
            Op::BiasGrad,
            &[x],
            1e-5 * terms.sqrt(),
            &format!("bias_grad {s:?}"),
        );
    }
}

/// Runs `spec` on `inputs` over the work ranges between consecutive `bounds`
/// (adding the partial sums of a `Par::Reduce` kernel).
fn run(j: &mut Jit, spec: KernelSpec, inputs: &[&[f32]], bounds: &[usize]) -> Vec<Vec<f32>> {
    let id = j.compile("k", spec.clone()).unwrap();
    let mut outs: Vec<Vec<f32>> = spec.outputs().iter().map(|s| vec![0.0; len(s)]).collect();
    for b in bounds.windows(2) {
        let mut part: Vec<Vec<f32>> = outs.iter().map(|v| vec![f32::NAN; v.len()]).collect();
        if spec.par() != Par::Reduce {
            part.clone_from(&outs);
        }
        let mut o: Vec<&mut [f32]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
        j.run(id, inputs, &mut o, b[0]..b[1]).unwrap();
        for (acc, p) in outs.iter_mut().zip(part) {
            if spec.par() == Par::Reduce {
                acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            } else {
                *acc = p;
            }
        }
    }
    outs
}

#[test]
fn fused_bias_relu_is_bias_add_then_relu() {
    let mut rng = Rng(0x5eed_0203);
    let mut j = jit();
    for case in 0..20 {
        let s = shape(&mut rng, case);
        let x = rng.data(len(&s));
        let mut b = rng.data(s[1]);
        // A bias that cancels an element exactly: the ReLU boundary.
        b[0] = -x[0];
        let want: Vec<f32> = oracle(
            Op::BiasAdd,
            &[(s.clone(), x.clone()), (vec![s[1]], b.clone())],
        )
        .remove(0)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
        let spec = KernelSpec::Elem(ElemKernel::BiasAct {
            shape: s.clone(),
            relu: true,
        });
        let n = s[0];
        for bounds in [vec![0, n], vec![0, n / 2, n]] {
            let got = run(&mut j, spec.clone(), &[&x, &b], &bounds).remove(0);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5,
                    "bias_act relu {s:?} {bounds:?}: element {i}: jit {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn leaky_relu_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_0204);
    let mut j = jit();
    for case in 0..24 {
        let s = shape(&mut rng, case);
        let slope = [0.01, 0.2, 0.1, 1.5, -0.25, 0.0][case % 6];
        let x = (s.clone(), rng.data(len(&s)));
        let dy = (s.clone(), rng.data(len(&s)));
        check(
            &mut j,
            Op::Act(Act::LeakyRelu(slope)),
            std::slice::from_ref(&x),
            1e-5,
            &format!("leaky_relu({slope}) {s:?}"),
        );
        check(
            &mut j,
            Op::ActGrad(Act::LeakyRelu(slope)),
            &[dy, x],
            1e-5,
            &format!("leaky_relu_grad({slope}) {s:?}"),
        );
    }
}

#[test]
fn leaky_relu_at_zero_and_nan_follows_the_interpreter() {
    let mut j = jit();
    let nan = f32::NAN;
    // 9 elements: two f32x4 and a scalar tail.
    let x = vec![0.0, -0.0, nan, 2.0, -2.0, nan, 0.0, -1.0, nan];
    let dy = vec![1.0, 2.0, 3.0, 4.0, 5.0, nan, 7.0, 8.0, 9.0];
    let s = vec![1, 9];
    let slope = 0.1;
    for (op, inputs) in [
        (Op::Act(Act::LeakyRelu(slope)), vec![(s.clone(), x.clone())]),
        (
            Op::ActGrad(Act::LeakyRelu(slope)),
            vec![(s.clone(), dy.clone()), (s.clone(), x.clone())],
        ),
    ] {
        let want = oracle(op.clone(), &inputs).remove(0);
        let mut g = Graph::new("one");
        let ids: Vec<Vid> = inputs
            .iter()
            .enumerate()
            .map(|(i, (sh, _))| g.add_value(format!("in{i}"), sh.clone(), Role::Input))
            .collect();
        g.push(op.clone(), &ids, None);
        let spec = KernelSpec::from_node(&g, &g.nodes[0]).unwrap();
        let ins: Vec<&[f32]> = inputs.iter().map(|(_, d)| d.as_slice()).collect();
        let got = run(&mut j, spec, &ins, &[0, 1]).remove(0);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
                "{op:?} element {i}: jit {a} vs interpreter {b}"
            );
        }
    }
}

#[test]
fn specs_are_validated() {
    let mut j = jit();
    let add1 = KernelSpec::Elem(ElemKernel::Add {
        shape: vec![2, 3],
        n: 1,
    });
    assert!(j.compile("add1", add1).is_err());
    let bias = KernelSpec::Elem(ElemKernel::BiasGrad { shape: vec![4] });
    assert!(j.compile("bias_rank1", bias).is_err());
    let spec = KernelSpec::Elem(ElemKernel::BiasGrad {
        shape: vec![4, 3, 2],
    });
    assert_eq!(spec.par(), Par::Reduce);
    assert_eq!(spec.outputs(), vec![vec![3]]);
    assert_eq!(spec.flops_per_item(), 6);
    // An empty work range writes a zero partial sum.
    let x = vec![1.0f32; 24];
    let got = run(&mut j, spec, &[&x], &[2, 2]).remove(0);
    assert_eq!(got, vec![0.0; 3]);
}

#[test]
fn a_work_range_writes_only_its_items() {
    let mut rng = Rng(0x5eed_0205);
    let mut j = jit();
    for s in [vec![3, 5, 3, 7], vec![3, 37]] {
        let specs = [
            ElemKernel::Add {
                shape: s.clone(),
                n: 3,
            },
            ElemKernel::BiasAct {
                shape: s.clone(),
                relu: true,
            },
            ElemKernel::LeakyRelu {
                shape: s.clone(),
                slope: 0.1,
            },
            ElemKernel::LeakyReluGrad {
                shape: s.clone(),
                slope: 0.1,
            },
            ElemKernel::Copy { shape: s.clone() },
        ];
        for k in specs {
            let spec = KernelSpec::Elem(k);
            let ins: Vec<Vec<f32>> = spec.inputs().iter().map(|s| rng.data(len(s))).collect();
            let ins: Vec<&[f32]> = ins.iter().map(|v| v.as_slice()).collect();
            let whole = run(&mut j, spec.clone(), &ins, &[0, 3]).remove(0);
            let id = j.compile("range", spec.clone()).unwrap();
            let sentinel = -1234.5f32;
            let mut part = vec![sentinel; whole.len()];
            j.run(id, &ins, &mut [&mut part], 1..2).unwrap();
            let per = whole.len() / 3;
            assert!(
                part[..per]
                    .iter()
                    .chain(&part[2 * per..])
                    .all(|&v| v == sentinel),
                "{spec:?} wrote outside items 1..2"
            );
            assert_eq!(&part[per..2 * per], &whole[per..2 * per], "{spec:?}");
        }
    }
}
