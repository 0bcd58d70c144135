//! JIT pooling kernels against the reference interpreter: max/average pooling
//! and their gradients on random windows (kernel 1–3, stride 1–3, pad up to half
//! the kernel, overlapping windows, odd sizes, data with ties), the specialised
//! 2×2 stride-2 window, global average pooling, NaN handling of the first
//! maximum, and the refusal of windows wholly in the padding. 1e-5 absolute,
//! whole batch and split in two work ranges.

mod common;

use cnnc_compiler::codegen::pool::PoolKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec};
use cnnc_compiler::ir::*;
use common::{check, oracle, Rng};

fn jit() -> Jit {
    let mut j = Jit::new().expect("the host is supported");
    j.set_disasm(true);
    j
}

/// Data in 0.5 steps (many equal values: ties in the max windows), or uniform.
fn data(rng: &mut Rng, n: usize, ties: bool) -> Vec<f32> {
    let d = rng.data(n);
    if ties {
        d.into_iter().map(|v| (v * 4.0).round() / 2.0).collect()
    } else {
        d
    }
}

/// Checks the four windowed pooling kernels on x `[n, c, h, w]` with `p`.
fn pool_case(j: &mut Jit, rng: &mut Rng, x: [usize; 4], p: PoolAttrs, ties: bool) {
    let xs = x.to_vec();
    let xd = data(rng, xs.iter().product(), ties);
    let y = Op::MaxPool(p).infer(&[&xs]).unwrap().remove(0);
    let dy = (y.clone(), rng.data(y.iter().product()));
    let what = |op: &str| format!("{op} x{x:?} {p:?} ties={ties}");
    let xin = (xs.clone(), xd);
    check(
        j,
        Op::MaxPool(p),
        std::slice::from_ref(&xin),
        1e-5,
        &what("maxpool"),
    );
    check(
        j,
        Op::MaxPoolGrad(p),
        &[dy.clone(), xin.clone()],
        1e-5,
        &what("maxpool_grad"),
    );
    check(j, Op::AvgPool(p), &[xin], 1e-5, &what("avgpool"));
    check(
        j,
        Op::AvgPoolGrad(p, [x[2], x[3]]),
        &[dy],
        1e-5,
        &what("avgpool_grad"),
    );
}

#[test]
fn pools_match_the_interpreter_on_random_windows() {
    let mut rng = Rng(0x5eed_0101);
    let mut j = jit();
    let sizes = [1, 3, 5, 7, 28];
    let mut done = 0;
    while done < 36 {
        let k = [rng.int(1, 3), rng.int(1, 3)];
        let p = PoolAttrs {
            kernel: k,
            stride: [rng.int(1, 3), rng.int(1, 3)],
            pad: [rng.int(0, k[0] / 2), rng.int(0, k[1] / 2)],
        };
        let (h, w) = if done % 3 == 0 {
            (sizes[rng.int(0, 4)], sizes[rng.int(0, 4)])
        } else {
            (rng.int(1, 13), rng.int(1, 13))
        };
        if h == 28 && w == 28 && done % 2 == 0 {
            continue; // keep the debug-build interpreter fast
        }
        let x = vec![1, 1, h, w];
        if Op::MaxPool(p).infer(&[&x]).is_err() {
            continue;
        }
        let n = [1, 3, 1, 5][done % 4];
        let c = rng.int(1, 3);
        pool_case(&mut j, &mut rng, [n, c, h, w], p, done % 2 == 0);
        done += 1;
    }
}

#[test]
fn overlapping_and_padded_windows() {
    let mut rng = Rng(0x5eed_0102);
    let mut j = jit();
    let cases = [
        // 3×3 stride 1 pad 1 (every tap overlaps 9 windows), vectorised rows.
        ([3, 2, 7, 7], [3, 3], [1, 1], [1, 1]),
        // ResNet's stem pool: 3×3 stride 2 pad 1.
        ([1, 3, 28, 28], [3, 3], [2, 2], [1, 1]),
        // 2×2 stride 1: overlapping pairs.
        ([1, 2, 5, 9], [2, 2], [1, 1], [0, 0]),
        // 3×1 and 1×3 windows with mixed strides.
        ([3, 2, 7, 5], [3, 1], [1, 2], [1, 0]),
        ([1, 1, 3, 5], [1, 3], [3, 1], [0, 1]),
        // 1×1 image with a padded 3×3 window (one valid tap).
        ([3, 2, 1, 1], [3, 3], [1, 1], [1, 1]),
        // Window as large as the input.
        ([1, 2, 3, 3], [3, 3], [3, 3], [0, 0]),
    ];
    for (x, kernel, stride, pad) in cases {
        let p = PoolAttrs {
            kernel,
            stride,
            pad,
        };
        pool_case(&mut j, &mut rng, x, p, true);
        pool_case(&mut j, &mut rng, x, p, false);
    }
}

#[test]
fn two_by_two_stride_two_is_specialised() {
    let mut rng = Rng(0x5eed_0103);
    let mut j = jit();
    let p = PoolAttrs {
        kernel: [2, 2],
        stride: [2, 2],
        pad: [0, 0],
    };
    // M1's pools (28→14, 14→7), odd sizes (a dropped last row/column), output
    // rows of 1..=13 (scalars, one vector, vector loop and leftovers).
    let mut shapes = vec![[3, 4, 28, 28], [1, 3, 14, 14], [5, 2, 7, 7], [1, 1, 3, 5]];
    for ow in 1..=13 {
        shapes.push([1, 1, 2 + ow % 3, 2 * ow + ow % 2]);
    }
    for x in shapes {
        pool_case(&mut j, &mut rng, x, p, true);
        pool_case(&mut j, &mut rng, x, p, false);
    }
    // The forward max is four outputs per f32x4: shuffles and a lane-wise max.
    let spec = KernelSpec::Pool(PoolKernel::MaxPool {
        x: vec![2, 3, 28, 28],
        p,
    });
    let id = j.compile("maxpool2", spec).unwrap();
    let k = j.kernel(id);
    assert!(
        k.clif.contains("shuffle") && k.clif.contains("f32x4"),
        "{}",
        k.clif
    );
    let asm = k.disasm.as_deref().expect("disassembly was requested");
    assert!(
        asm.contains("maxps"),
        "lane-wise max lowers to maxps:\n{asm}"
    );
    assert!(
        asm.contains("shufps"),
        "column split lowers to shufps:\n{asm}"
    );
}

#[test]
fn global_average_pool_matches_the_interpreter() {
    let mut rng = Rng(0x5eed_0104);
    let mut j = jit();
    for (x, what) in [
        ([1, 3, 1, 1], "1x1"),
        ([3, 5, 3, 5], "3x5"),
        ([5, 2, 7, 7], "7x7"),
        ([3, 4, 28, 28], "28x28"),
        ([1, 7, 2, 2], "2x2"),
        ([2, 3, 4, 5], "4x5"),
    ] {
        let xs = x.to_vec();
        let xd = rng.data(xs.iter().product());
        check(
            &mut j,
            Op::GlobalAvgPool,
            &[(xs, xd)],
            1e-5,
            &format!("global_avg_pool {what}"),
        );
        let dy = vec![x[0], x[1]];
        let dyd = rng.data(x[0] * x[1]);
        check(
            &mut j,
            Op::GlobalAvgPoolGrad([x[2], x[3]]),
            &[(dy, dyd)],
            1e-5,
            &format!("global_avg_pool_grad {what}"),
        );
    }
}

/// Runs `op`'s kernel (from its node) on `inputs` over the whole batch.
fn run_whole(j: &mut Jit, op: Op, inputs: &[(Shape, Vec<f32>)]) -> Vec<Vec<f32>> {
    let mut g = Graph::new("one");
    let ids: Vec<Vid> = inputs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.add_value(format!("in{i}"), s.clone(), Role::Input))
        .collect();
    g.push(op, &ids, None);
    let spec = KernelSpec::from_node(&g, &g.nodes[0]).expect("a kernel for this op");
    let id = j.compile("nan", spec.clone()).unwrap();
    let ins: Vec<&[f32]> = inputs.iter().map(|(_, d)| d.as_slice()).collect();
    let mut outs: Vec<Vec<f32>> = spec
        .outputs()
        .iter()
        .map(|s| vec![0.5; s.iter().product()])
        .collect();
    let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
    j.run(id, &ins, &mut o, 0..spec.work()).unwrap();
    outs
}

/// Bitwise-equal up to NaN payloads.
fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.is_nan() && y.is_nan()) || x == y)
}

#[test]
fn nan_and_first_maximum_follow_the_interpreter() {
    let mut j = jit();
    let nan = f32::NAN;
    // One image, 4 rows × 12 columns: 2×2 windows (three f32x4 groups per output
    // row) with a NaN first tap, a NaN later tap, ties and a -0/+0 tie.
    #[rustfmt::skip]
    let x: Vec<f32> = vec![
        nan, 1.0, 2.0, nan, 1.0, 1.0, -0.0, 0.0, 3.0, 3.0, 5.0, 4.0,
        2.0, 3.0, 1.0, 3.0, 1.0, 1.0, 0.0, -0.0, 3.0, 3.0, 4.0, 5.0,
        1.0, 1.0, 1.0, 1.0, nan, nan, 2.0, 2.0, -1.0, -2.0, 7.0, 7.0,
        1.0, 1.0, nan, 1.0, nan, nan, 2.0, 2.0, -3.0, -1.0, 7.0, 7.0,
    ];
    let xs = vec![1, 1, 4, 12];
    for p in [
        PoolAttrs {
            kernel: [2, 2],
            stride: [2, 2],
            pad: [0, 0],
        },
        PoolAttrs {
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
        },
        PoolAttrs {
            kernel: [2, 3],
            stride: [2, 3],
            pad: [0, 0],
        },
    ] {
        let y = Op::MaxPool(p).infer(&[&xs]).unwrap().remove(0);
        let dy: Vec<f32> = (0..y.iter().product::<usize>())
            .map(|i| 1.0 + i as f32)
            .collect();
        let fwd = [(xs.clone(), x.clone())];
        let got = run_whole(&mut j, Op::MaxPool(p), &fwd);
        let want = oracle(Op::MaxPool(p), &fwd);
        assert!(
            same(&got[0], &want[0]),
            "maxpool {p:?}: {got:?} vs {want:?}"
        );
        let bwd = [(y, dy), (xs.clone(), x.clone())];
        let got = run_whole(&mut j, Op::MaxPoolGrad(p), &bwd);
        let want = oracle(Op::MaxPoolGrad(p), &bwd);
        assert!(
            same(&got[0], &want[0]),
            "maxpool_grad {p:?}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn windows_in_the_padding_are_refused_for_max_pooling() {
    let mut j = jit();
    // Pad 2 with a 2-wide window: the first window of each row and column holds
    // only padding.
    let p = PoolAttrs {
        kernel: [2, 2],
        stride: [1, 1],
        pad: [2, 2],
    };
    let x = vec![1, 1, 4, 4];
    let max = KernelSpec::Pool(PoolKernel::MaxPool { x: x.clone(), p });
    assert!(j.compile("max_pad", max).is_err());
    let grad = KernelSpec::Pool(PoolKernel::MaxPoolGrad { x: x.clone(), p });
    assert!(j.compile("max_pad_grad", grad).is_err());
    // Average pooling counts padding: such windows average to 0.
    let avg = KernelSpec::Pool(PoolKernel::AvgPool { x: x.clone(), p });
    let id = j.compile("avg_pad", avg).unwrap();
    let xd = vec![1.0f32; 16];
    let mut y = vec![f32::NAN; 49];
    j.run(id, &[&xd], &mut [&mut y], 0..1).unwrap();
    let want = oracle(Op::AvgPool(p), &[(x, xd.clone())]);
    assert!(same(&y, &want[0]), "{y:?} vs {want:?}");
    assert_eq!((y[0], y[8], y[9]), (0.0, 0.25, 0.5));
    let zero = KernelSpec::Pool(PoolKernel::MaxPool {
        x: vec![1, 1, 4, 4],
        p: PoolAttrs {
            stride: [0, 1],
            ..p
        },
    });
    assert!(j.compile("stride0", zero).is_err());
}

#[test]
fn a_work_range_writes_only_its_items() {
    let mut rng = Rng(0x5eed_0105);
    let mut j = jit();
    let x = vec![3, 2, 7, 9];
    let windows = [
        ([2, 2], [2, 2], [0, 0]),
        ([3, 3], [1, 1], [1, 1]),
        ([3, 2], [2, 3], [1, 0]),
    ];
    let mut specs = vec![
        PoolKernel::GlobalAvgPool { x: x.clone() },
        PoolKernel::GlobalAvgPoolGrad { x: x.clone() },
    ];
    for (kernel, stride, pad) in windows {
        let p = PoolAttrs {
            kernel,
            stride,
            pad,
        };
        specs.push(PoolKernel::MaxPool { x: x.clone(), p });
        specs.push(PoolKernel::MaxPoolGrad { x: x.clone(), p });
        specs.push(PoolKernel::AvgPool { x: x.clone(), p });
        specs.push(PoolKernel::AvgPoolGrad { x: x.clone(), p });
    }
    for k in specs {
        let spec = KernelSpec::Pool(k);
        let id = j.compile("range", spec.clone()).unwrap();
        let ins: Vec<Vec<f32>> = spec
            .inputs()
            .iter()
            .map(|s| rng.data(s.iter().product()))
            .collect();
        let ins: Vec<&[f32]> = ins.iter().map(|v| v.as_slice()).collect();
        let len: usize = spec.outputs()[0].iter().product();
        let mut whole = vec![0.0f32; len];
        j.run(id, &ins, &mut [&mut whole], 0..3).unwrap();
        let sentinel = -1234.5f32;
        let mut part = vec![sentinel; len];
        j.run(id, &ins, &mut [&mut part], 1..2).unwrap();
        let per = len / 3;
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
