//! JIT depthwise convolution kernels (forward, input gradient, weight gradient)
//! against the reference interpreter: random shapes (2–20 channels, multiplier 1–2,
//! kernels 1–5 including non-square, stride 1–3, pad up to half the kernel,
//! dilation 1–2, odd sizes down to 1×1, batch 1 and odd), M3's layers, rows of
//! 29 columns at strides 1–3, padding wider than the input, the weight
//! gradient's stale scratch and empty work range, the refusal of a conv that is
//! not depthwise, and which nodes `KernelSpec::from_node` gives to the
//! depthwise family. Whole batch and
//! split in two work ranges (partial sums added for the weight gradient);
//! tolerance `1e-5·sqrt(taps)` forward and `5e-4` backward, relative once the
//! values exceed 1.

mod common;

use cnnc_compiler::codegen::depthwise::DepthwiseKernel;
use cnnc_compiler::codegen::{Jit, KernelSpec, Par};
use cnnc_compiler::ir::*;
use common::{check, oracle, Rng};

fn jit() -> Jit {
    let mut j = Jit::new().expect("the host is supported");
    j.set_disasm(true);
    j
}

/// `check` with `tol` relative to the largest expected magnitude when it
/// exceeds 1 (sums over many taps and batch items grow).
fn check_rel(j: &mut Jit, op: Op, inputs: &[(Shape, Vec<f32>)], tol: f32, what: &str) {
    let scale = oracle(op.clone(), inputs)
        .iter()
        .flatten()
        .fold(1f32, |m, v| m.max(v.abs()));
    check(j, op, inputs, tol * scale, what);
}

/// All three kernels of a depthwise conv on x `[n, c, h, w]` with `mult` filters
/// per channel of size `k`.
fn case(j: &mut Jit, rng: &mut Rng, x: [usize; 4], mult: usize, k: [usize; 2], a: ConvAttrs) {
    let xs = x.to_vec();
    let ws = vec![x[1] * mult, 1, k[0], k[1]];
    let ys = Op::Conv2d(a).infer(&[&xs, &ws]).unwrap().remove(0);
    let xin = (xs.clone(), rng.data(xs.iter().product()));
    let win = (ws.clone(), rng.data(ws.iter().product()));
    let dyin = (ys.clone(), rng.data(ys.iter().product()));
    let what = |op: &str| format!("{op} x{x:?} w{ws:?} {a:?}");
    let taps = (k[0] * k[1]) as f32;
    check_rel(
        j,
        Op::Conv2d(a),
        &[xin.clone(), win.clone()],
        1e-5 * taps.sqrt(),
        &what("forward"),
    );
    check_rel(
        j,
        Op::Conv2dGradInput(a, [x[2], x[3]]),
        &[dyin.clone(), win],
        5e-4,
        &what("grad_input"),
    );
    check_rel(
        j,
        Op::Conv2dGradWeight(a, k),
        &[xin, dyin],
        5e-4,
        &what("grad_weight"),
    );
}

fn attrs(stride: [usize; 2], pad: [usize; 2], dilation: [usize; 2], groups: usize) -> ConvAttrs {
    ConvAttrs {
        stride,
        pad,
        dilation,
        groups,
    }
}

#[test]
fn depthwise_matches_the_interpreter_on_random_shapes() {
    let mut rng = Rng(0x5eed_0d01);
    let mut j = jit();
    let sizes = [1, 3, 5, 7, 9, 17];
    let mut done = 0;
    while done < 40 {
        let c = rng.int(2, 20);
        let k = [rng.int(1, 5), rng.int(1, 5)];
        let a = attrs(
            [rng.int(1, 3), rng.int(1, 3)],
            [rng.int(0, k[0] / 2), rng.int(0, k[1] / 2)],
            [rng.int(1, 2), rng.int(1, 2)],
            c,
        );
        let (h, w) = if done % 2 == 0 {
            (sizes[rng.int(0, 5)], sizes[rng.int(0, 5)])
        } else {
            (rng.int(1, 13), rng.int(1, 13))
        };
        let fits = (0..2).all(|i| {
            let n = [h, w][i];
            window_out(n, k[i], a.stride[i], a.pad[i], a.dilation[i]).is_ok()
        });
        if !fits {
            continue;
        }
        let (n, mult) = ([1, 3, 5][done % 3], rng.int(1, 2));
        case(&mut j, &mut rng, [n, c, h, w], mult, k, a);
        done += 1;
    }
}

#[test]
fn m3_layers_match_the_interpreter() {
    let mut rng = Rng(0x5eed_0d02);
    let mut j = jit();
    // M3's four depthwise 3×3 pad-1 layers (batch 2 instead of 64).
    for (c, hw, s) in [(32, 32, 1), (64, 32, 2), (128, 16, 1), (128, 16, 2)] {
        let a = attrs([s, s], [1, 1], [1, 1], c);
        case(&mut j, &mut rng, [2, c, hw, hw], 1, [3, 3], a);
    }
    let fwd = &j.kernels()[0];
    assert!(
        matches!(fwd.spec, KernelSpec::Depthwise(_)),
        "{:?}",
        fwd.spec
    );
    assert!(fwd.clif.contains("fma"), "the forward uses fma");
    assert!(fwd.clif.contains("f32x4"), "the forward is vectorised");
    // Stride 2 forward: every-other-column lanes come from shuffles.
    assert!(j.kernels()[3].clif.contains("shuffle"));
    if j.isa().native_fma {
        let asm = fwd.disasm.as_deref().expect("disassembly was requested");
        assert!(asm.contains("vfmadd"), "fma lowers to vfmadd:\n{asm}");
    }
}

#[test]
fn wide_rows_every_stride() {
    let mut rng = Rng(0x5eed_0d05);
    let mut j = jit();
    // Rows long enough for loops of plain tiles, an overlapping last tile
    // (29 columns), and lanes 3 columns apart (scalar loads).
    for s in 1..=3 {
        for (k, p, d) in [(3, 1, 1), (5, 2, 1), (3, 2, 2), (4, 1, 1)] {
            let a = attrs([s, s], [p, p], [d, d], 3);
            case(&mut j, &mut rng, [3, 3, 9, 29], 1 + s % 2, [k, k], a);
        }
    }
}

#[test]
fn padding_wider_than_the_input() {
    let mut rng = Rng(0x5eed_0d03);
    let mut j = jit();
    // Rows and columns of outputs that read only padding, and 1×1 inputs.
    case(
        &mut j,
        &mut rng,
        [3, 2, 1, 1],
        1,
        [3, 3],
        attrs([1, 1], [2, 2], [1, 1], 2),
    );
    case(
        &mut j,
        &mut rng,
        [1, 3, 1, 2],
        2,
        [5, 1],
        attrs([1, 1], [3, 2], [1, 1], 3),
    );
    case(
        &mut j,
        &mut rng,
        [1, 4, 2, 3],
        1,
        [2, 3],
        attrs([2, 3], [3, 4], [2, 1], 4),
    );
    case(
        &mut j,
        &mut rng,
        [2, 5, 4, 6],
        1,
        [1, 1],
        attrs([1, 2], [2, 3], [1, 1], 5),
    );
}

/// A one-node graph of `op` on inputs of `shapes`.
fn one_node(op: Op, shapes: &[Shape]) -> Graph {
    let mut g = Graph::new("one");
    let ids: Vec<Vid> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| g.add_value(format!("in{i}"), s.clone(), Role::Input))
        .collect();
    g.push(op, &ids, None);
    g
}

#[test]
fn from_node_takes_groups_equal_to_channels_only() {
    let s1 = |groups| attrs([1, 1], [1, 1], [1, 1], groups);
    let is_dw = |op: Op, shapes: &[Shape]| {
        let g = one_node(op, shapes);
        matches!(
            KernelSpec::from_node(&g, &g.nodes[0]),
            Some(KernelSpec::Depthwise(_))
        )
    };
    let (x, dy) = (vec![2, 4, 5, 5], vec![2, 8, 5, 5]);
    // Depthwise (multiplier 2).
    let w = vec![8, 1, 3, 3];
    assert!(is_dw(Op::Conv2d(s1(4)), &[x.clone(), w.clone()]));
    assert!(is_dw(
        Op::Conv2dGradInput(s1(4), [5, 5]),
        &[dy.clone(), w.clone()]
    ));
    assert!(is_dw(
        Op::Conv2dGradWeight(s1(4), [3, 3]),
        &[x.clone(), dy.clone()]
    ));
    // Ordinary and grouped convolutions.
    for (groups, w) in [(1, vec![8, 4, 3, 3]), (2, vec![8, 2, 3, 3])] {
        let a = s1(groups);
        assert!(!is_dw(Op::Conv2d(a), &[x.clone(), w.clone()]));
        assert!(!is_dw(
            Op::Conv2dGradInput(a, [5, 5]),
            &[dy.clone(), w.clone()]
        ));
        assert!(!is_dw(
            Op::Conv2dGradWeight(a, [3, 3]),
            &[x.clone(), dy.clone()]
        ));
    }
    // One channel: groups = C = 1 is an ordinary conv.
    let g = one_node(Op::Conv2d(s1(1)), &[vec![1, 1, 5, 5], vec![1, 1, 3, 3]]);
    assert!(matches!(
        KernelSpec::from_node(&g, &g.nodes[0]),
        Some(KernelSpec::Conv(_))
    ));
}

/// Calls kernel `id` directly with `scratch` as its scratch buffer (whose
/// contents are undefined on entry: the runtime reuses it across calls).
fn run_with_scratch(
    j: &Jit,
    id: cnnc_compiler::codegen::KernelId,
    ins: &[&[f32]],
    out: &mut [f32],
    scratch: &mut [f32],
    range: std::ops::Range<usize>,
) {
    let mut ptrs: Vec<*mut f32> = ins.iter().map(|b| b.as_ptr() as *mut f32).collect();
    ptrs.push(out.as_mut_ptr());
    ptrs.push(scratch.as_mut_ptr());
    // SAFETY: the buffers have the kernel's shapes (checked by the caller
    // against `Jit::run`), the range is inside the batch, the JIT is alive.
    unsafe { j.raw(id)(ptrs.as_ptr(), range.start as i64, range.end as i64) };
}

#[test]
fn grad_weight_ignores_stale_scratch_and_zeroes_an_empty_range() {
    let mut j = jit();
    let mut rng = Rng(0x5eed_0d04);
    let a = attrs([2, 2], [1, 1], [1, 1], 3);
    let spec = KernelSpec::Depthwise(DepthwiseKernel::GradWeight {
        x: vec![2, 3, 7, 7],
        dy: vec![2, 3, 4, 4],
        attrs: a,
        kernel: [3, 3],
    });
    assert_eq!(spec.par(), Par::Reduce);
    let mut scratch = vec![f32::NAN; spec.scratch()];
    assert!(!scratch.is_empty(), "the sums live in scratch");
    let id = j.compile("dw", spec).unwrap();
    let (x, dy) = (rng.data(2 * 3 * 49), rng.data(2 * 3 * 16));
    let ins: [&[f32]; 2] = [&x, &dy];
    for range in [0..0, 1..1, 2..2] {
        let mut dw = vec![f32::NAN; 27];
        run_with_scratch(&j, id, &ins, &mut dw, &mut scratch, range);
        assert!(dw.iter().all(|&v| v == 0.0), "{dw:?}");
    }
    let mut want = vec![0.0; 27];
    j.run(id, &ins, &mut [&mut want], 0..2).unwrap();
    scratch.fill(f32::NAN);
    let mut got = vec![f32::NAN; 27];
    run_with_scratch(&j, id, &ins, &mut got, &mut scratch, 0..2);
    assert_eq!(got, want);
}

#[test]
fn refuses_a_conv_that_is_not_depthwise() {
    let mut j = jit();
    let spec = KernelSpec::Depthwise(DepthwiseKernel::Forward {
        x: vec![1, 4, 5, 5],
        w: vec![4, 2, 3, 3],
        attrs: attrs([1, 1], [1, 1], [1, 1], 2),
    });
    let err = j.compile("not_dw", spec).unwrap_err();
    assert!(err.contains("not a depthwise"), "{err}");
}
