//! The GEMM convolution kernels (`ConvKernel::Forward`, `GradInput`,
//! `GradWeight`: generated im2col / col2im around calls to `gemm::sgemm`) against
//! the reference interpreter, on random shapes (channels 1..20, groups 1, 2, 4,
//! kernels 1..5 incl. non-square, strides 1..3, padding, dilation 1..2, spatial
//! sizes down to 1×1, batches 1 and 3), whole and split into two work ranges
//! (partial sums added for the weight gradient). Tolerance: 5e-4 relative to the
//! largest output magnitude (each output is a sum over up to 500 products, in
//! another order than the interpreter's).

mod common;

use cnnc_compiler::codegen::conv::ConvKernel;
use cnnc_compiler::codegen::{Jit, KernelId, KernelSpec, Par};
use cnnc_compiler::ir::*;
use common::{check, oracle, Rng};

fn jit() -> Jit {
    Jit::new().expect("the host is supported")
}

/// 5e-4 relative to the largest magnitude of `want` (at least 1).
fn tolerance(want: &[Vec<f32>]) -> f32 {
    let max = want
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(1.0f32, |m, v| m.max(v.abs()));
    5e-4 * max
}

/// One convolution: x `[n, c, h, w]`, `o` filters of `k`, the attributes.
#[derive(Clone, Copy, Debug)]
struct Case {
    x: [usize; 4],
    o: usize,
    k: [usize; 2],
    a: ConvAttrs,
}

impl Case {
    fn x(&self) -> Shape {
        self.x.to_vec()
    }
    fn w(&self) -> Shape {
        vec![self.o, self.x[1] / self.a.groups, self.k[0], self.k[1]]
    }
    fn y(&self) -> Shape {
        Op::Conv2d(self.a).infer(&[&self.x(), &self.w()]).unwrap()[0].clone()
    }
    fn what(&self, op: &str) -> String {
        format!("{op} x{:?} w{:?} {:?}", self.x, self.w(), self.a)
    }
    fn pointwise(&self) -> bool {
        self.k == [1, 1] && self.a.stride == [1, 1] && self.a.pad == [0, 0]
    }
}

/// A random non-depthwise convolution whose output is not empty.
fn random_case(rng: &mut Rng) -> Case {
    loop {
        let groups = [1, 2, 4][rng.int(0, 2)];
        // Cg >= 2 when grouped: groups == C > 1 is depthwise.rs's.
        let cg_min = if groups > 1 { 2 } else { 1 };
        let c = groups * rng.int(cg_min, 20 / groups);
        let o = groups * rng.int(1, 20 / groups);
        let k = [rng.int(1, 5), rng.int(1, 5)];
        let a = ConvAttrs {
            stride: [rng.int(1, 3), rng.int(1, 3)],
            pad: [rng.int(0, k[0] / 2), rng.int(0, k[1] / 2)],
            dilation: [rng.int(1, 2), rng.int(1, 2)],
            groups,
        };
        // Mostly odd sizes, 1×1 included.
        let side = |rng: &mut Rng| {
            if rng.next() < 0.8 {
                2 * rng.int(0, 7) + 1
            } else {
                2 * rng.int(1, 7)
            }
        };
        let (h, w) = (side(rng), side(rng));
        let n = if rng.next() < 0.5 { 1 } else { 3 };
        let ok = window_out(h, k[0], a.stride[0], a.pad[0], a.dilation[0]).is_ok()
            && window_out(w, k[1], a.stride[1], a.pad[1], a.dilation[1]).is_ok();
        if ok {
            return Case {
                x: [n, c, h, w],
                o,
                k,
                a,
            };
        }
    }
}

/// A random 1×1, stride 1, unpadded convolution (the no-packing path).
fn random_pointwise(rng: &mut Rng) -> Case {
    let mut case = random_case(rng);
    case.k = [1, 1];
    case.a.stride = [1, 1];
    case.a.pad = [0, 0];
    case
}

fn check_forward(j: &mut Jit, rng: &mut Rng, c: &Case) {
    let inputs = [
        (c.x(), rng.data(c.x().iter().product())),
        (c.w(), rng.data(c.w().iter().product())),
    ];
    let tol = tolerance(&oracle(Op::Conv2d(c.a), &inputs));
    check(j, Op::Conv2d(c.a), &inputs, tol, &c.what("conv2d"));
}

fn check_grad_input(j: &mut Jit, rng: &mut Rng, c: &Case) {
    let op = Op::Conv2dGradInput(c.a, [c.x[2], c.x[3]]);
    let inputs = [
        (c.y(), rng.data(c.y().iter().product())),
        (c.w(), rng.data(c.w().iter().product())),
    ];
    let tol = tolerance(&oracle(op.clone(), &inputs));
    check(j, op, &inputs, tol, &c.what("conv2d_grad_input"));
}

fn check_grad_weight(j: &mut Jit, rng: &mut Rng, c: &Case) {
    let op = Op::Conv2dGradWeight(c.a, c.k);
    let inputs = [
        (c.x(), rng.data(c.x().iter().product())),
        (c.y(), rng.data(c.y().iter().product())),
    ];
    let tol = tolerance(&oracle(op.clone(), &inputs));
    check(j, op, &inputs, tol, &c.what("conv2d_grad_weight"));
}

#[test]
fn forward_matches_the_interpreter_on_random_shapes() {
    let (mut rng, mut j) = (Rng(0xc0_0001), jit());
    for _ in 0..40 {
        let c = random_case(&mut rng);
        check_forward(&mut j, &mut rng, &c);
    }
}

#[test]
fn grad_input_matches_the_interpreter_on_random_shapes() {
    let (mut rng, mut j) = (Rng(0xc0_0002), jit());
    for _ in 0..40 {
        let c = random_case(&mut rng);
        check_grad_input(&mut j, &mut rng, &c);
    }
}

#[test]
fn grad_weight_matches_the_interpreter_on_random_shapes() {
    let (mut rng, mut j) = (Rng(0xc0_0003), jit());
    for _ in 0..40 {
        let c = random_case(&mut rng);
        check_grad_weight(&mut j, &mut rng, &c);
    }
}

/// 1×1, stride 1, no padding: the input plane is the im2col matrix and nothing
/// is packed (no scratch, but the weight gradient's transposed result); any
/// other 1×1 convolution packs its `Cg × OH·OW` im2col matrix.
#[test]
fn pointwise_convolutions_need_no_packing() {
    let (mut rng, mut j) = (Rng(0xc0_0004), jit());
    // The scratch a kernel of `c` needs beyond its im2col matrix: the weight
    // gradient may keep dwᵀ (O × Cg) there.
    let extra = |spec: &KernelSpec, c: &Case| match spec {
        KernelSpec::Conv(ConvKernel::GradWeight { .. }) => c.o * c.x[1] / c.a.groups,
        _ => 0,
    };
    for _ in 0..12 {
        let c = random_pointwise(&mut rng);
        assert!(c.pointwise());
        let n = j.kernels().len();
        check_forward(&mut j, &mut rng, &c);
        check_grad_input(&mut j, &mut rng, &c);
        check_grad_weight(&mut j, &mut rng, &c);
        for k in &j.kernels()[n..] {
            assert!(k.spec.scratch() <= extra(&k.spec, &c), "{}", k.name);
            assert!(k.clif.contains("call_indirect"), "{} calls sgemm", k.name);
        }
    }
    // Strided or padded 1×1 convolutions take the im2col path.
    let base = random_pointwise(&mut rng);
    for a in [
        ConvAttrs {
            stride: [2, 1],
            ..base.a
        },
        ConvAttrs {
            pad: [0, 1],
            ..base.a
        },
    ] {
        let c = Case { a, ..base };
        let n = j.kernels().len();
        check_forward(&mut j, &mut rng, &c);
        check_grad_input(&mut j, &mut rng, &c);
        check_grad_weight(&mut j, &mut rng, &c);
        let (y, cg) = (c.y(), c.x[1] / c.a.groups);
        // Rows of P = OH·OW floats, padded by at most 16.
        let (col, padded) = (cg * y[2] * y[3], cg * (y[2] * y[3] + 16));
        for k in &j.kernels()[n..] {
            let s = k.spec.scratch();
            assert!(s >= col && s <= padded + extra(&k.spec, &c), "{}", k.name);
        }
    }
}

/// Large images are packed a chunk of input channels at a time (at most 4 MiB
/// of im2col matrix, the scratch of one chunk), including a last, smaller chunk.
#[test]
fn large_images_are_packed_in_chunks() {
    let (mut rng, mut j) = (Rng(0xc0_0009), jit());
    let a = ConvAttrs {
        stride: [1, 1],
        pad: [2, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let cases = [
        // 1.4 MB of im2col per channel: chunks of 3 and 2 channels.
        Case {
            x: [1, 5, 119, 117],
            o: 4,
            k: [5, 5],
            a,
        },
        // Two groups of 5 channels, stride 2 (col2im by scatter): 2, 2, 1.
        Case {
            x: [1, 10, 237, 235],
            o: 4,
            k: [5, 5],
            a: ConvAttrs {
                stride: [2, 2],
                groups: 2,
                ..a
            },
        },
        // K = 20 rows < Og = 24: dw = dy · colᵀ, in chunks of 4, 1.
        Case {
            x: [1, 5, 256, 255],
            o: 24,
            k: [2, 2],
            a: ConvAttrs { pad: [0, 1], ..a },
        },
    ];
    for c in cases {
        let n = j.kernels().len();
        check_forward(&mut j, &mut rng, &c);
        check_grad_input(&mut j, &mut rng, &c);
        check_grad_weight(&mut j, &mut rng, &c);
        let (y, cg) = (c.y(), c.x[1] / c.a.groups);
        let whole = cg * c.k[0] * c.k[1] * y[2] * y[3];
        for k in &j.kernels()[n..] {
            let scratch = k.spec.scratch();
            // The weight gradient may keep dwᵀ (O × K) after the chunk.
            let col = match k.spec {
                KernelSpec::Conv(ConvKernel::GradWeight { .. }) => {
                    scratch.saturating_sub(c.o * cg * c.k[0] * c.k[1])
                }
                _ => scratch,
            };
            assert!(
                col <= 1 << 20 && col < whole,
                "{}: scratch {scratch}",
                k.name
            );
        }
    }
}

/// The work ranges a kernel is run over: the whole batch, and (batch > 1) split
/// in two.
fn splits(batch: usize) -> Vec<Vec<std::ops::Range<usize>>> {
    let mut splits = vec![vec![0..batch]];
    if batch > 1 {
        splits.push(vec![0..batch / 2, batch / 2..batch]);
    }
    splits
}

/// Runs kernel `id` (compiled from `spec`) over `ranges`, adding the partials of
/// a `Par::Reduce` kernel; outputs start as NaN, so every element must be
/// written.
fn run_ranges(
    j: &mut Jit,
    id: KernelId,
    spec: &KernelSpec,
    inputs: &[&[f32]],
    ranges: &[std::ops::Range<usize>],
) -> Vec<Vec<f32>> {
    let batch = spec.work();
    let mut outs: Vec<Vec<f32>> = spec
        .outputs()
        .iter()
        .map(|s| vec![0.0; s.iter().product()])
        .collect();
    for r in ranges {
        let mut part: Vec<Vec<f32>> = outs.iter().map(|v| vec![f32::NAN; v.len()]).collect();
        let mut o: Vec<&mut [f32]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
        j.run(id, inputs, &mut o, r.clone()).unwrap();
        for (acc, p) in outs.iter_mut().zip(&part) {
            if spec.par() == Par::Reduce {
                acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            } else {
                // Items: the range's items are written (the others are NaN).
                let item = acc.len() / batch;
                let at = r.start * item..r.end * item;
                acc[at.clone()].copy_from_slice(&p[at]);
            }
        }
    }
    outs
}

/// Runs `spec` over the whole batch and split in two work ranges (adding the
/// partials of a `Par::Reduce` kernel) and compares with `want`.
fn run_split(j: &mut Jit, spec: KernelSpec, inputs: &[&[f32]], want: &[Vec<f32>], what: &str) {
    let tol = tolerance(want);
    let id = j.compile(what, spec.clone()).unwrap();
    for ranges in splits(spec.work()) {
        let outs = run_ranges(j, id, &spec, inputs, &ranges);
        for (got, want) in outs.iter().zip(want) {
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= tol,
                    "{what} {ranges:?}: element {i}: jit {a} vs expected {b}"
                );
            }
        }
    }
}

/// `Forward { bias, relu }` against the interpreter's conv2d, then `+ b[o]` and
/// `max(·, 0)` by hand; a NaN in x must come out of the ReLU as 0.
#[test]
fn forward_fuses_bias_and_relu() {
    let (mut rng, mut j) = (Rng(0xc0_0005), jit());
    for i in 0..24 {
        let c = if i % 4 == 0 {
            random_pointwise(&mut rng)
        } else {
            random_case(&mut rng)
        };
        let (bias, relu) = (i % 2 == 1, i % 4 >= 2);
        let mut x = rng.data(c.x().iter().product());
        if relu && i % 8 >= 4 {
            let at = rng.int(0, x.len() - 1);
            x[at] = f32::NAN;
        }
        let w = rng.data(c.w().iter().product());
        let b = rng.data(c.o);
        let mut y = oracle(Op::Conv2d(c.a), &[(c.x(), x.clone()), (c.w(), w.clone())]).remove(0);
        let plane = c.y()[2] * c.y()[3];
        for (i, v) in y.iter_mut().enumerate() {
            if bias {
                *v += b[i / plane % c.o];
            }
            if relu {
                *v = if *v > 0.0 { *v } else { 0.0 };
            }
        }
        let spec = KernelSpec::Conv(ConvKernel::Forward {
            x: c.x(),
            w: c.w(),
            attrs: c.a,
            bias,
            relu,
            stats: false,
        });
        let mut inputs: Vec<&[f32]> = vec![&x, &w];
        if bias {
            inputs.push(&b);
        }
        let what = format!("{} bias {bias} relu {relu}", c.what("conv2d"));
        run_split(&mut j, spec, &inputs, &[y], &what);
    }
}

/// `Forward { stats: true }` (the epilogue of a conv feeding a training
/// batchnorm): `y` as without it, and per item and channel the sum `s` and the
/// squared deviations from the row's own mean `q` of the *written* `y` (after
/// bias and ReLU), against f64 sums of the kernel's own `y` (so the conv's
/// rounding does not count): `s` within 1e-5 of `Σ|y|`, `q` within 1e-5 of
/// `Σ y²`. Whole and split work ranges give the same partials, bit for bit.
#[test]
fn forward_writes_batchnorm_partials() {
    let (mut rng, mut j) = (Rng(0xc0_0008), jit());
    for i in 0..32 {
        let mut c = if i % 4 == 0 {
            random_pointwise(&mut rng)
        } else {
            random_case(&mut rng)
        };
        if i % 3 == 0 {
            c.x[0] = 1;
        }
        let (bias, relu) = (i % 2 == 1, i % 8 >= 6);
        // Every third case off-centre (a large mean against the spread).
        let shift = if i % 3 == 2 { 3.0 } else { 0.0 };
        let x: Vec<f32> = rng
            .data(c.x().iter().product())
            .iter()
            .map(|v| v + shift)
            .collect();
        let w = rng.data(c.w().iter().product());
        let b = rng.data(c.o);
        let mut want = oracle(Op::Conv2d(c.a), &[(c.x(), x.clone()), (c.w(), w.clone())]).remove(0);
        let plane = c.y()[2] * c.y()[3];
        for (i, v) in want.iter_mut().enumerate() {
            if bias {
                *v += b[i / plane % c.o];
            }
            if relu {
                *v = if *v > 0.0 { *v } else { 0.0 };
            }
        }
        let spec = KernelSpec::Conv(ConvKernel::Forward {
            x: c.x(),
            w: c.w(),
            attrs: c.a,
            bias,
            relu,
            stats: true,
        });
        let what = format!("{} bias {bias} relu {relu} stats", c.what("conv2d"));
        let id = j.compile(&what, spec.clone()).unwrap();
        let mut inputs: Vec<&[f32]> = vec![&x, &w];
        if bias {
            inputs.push(&b);
        }
        let mut first: Option<Vec<Vec<f32>>> = None;
        for ranges in splits(spec.work()) {
            let outs = run_ranges(&mut j, id, &spec, &inputs, &ranges);
            let (y, s, q) = (&outs[0], &outs[1], &outs[2]);
            let tol = tolerance(std::slice::from_ref(&want));
            for (k, (a, e)) in y.iter().zip(&want).enumerate() {
                assert!((a - e).abs() <= tol, "{what}: y[{k}]: {a} vs {e}");
            }
            assert_eq!(s.len(), c.x[0] * c.o, "{what}: partials are [N, O]");
            for (row, yr) in y.chunks(plane).enumerate() {
                let sum: f64 = yr.iter().map(|&v| v as f64).sum();
                let abs: f64 = yr.iter().map(|&v| (v as f64).abs()).sum();
                let mean = sum / plane as f64;
                let sq: f64 = yr.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
                let sq_scale: f64 = yr.iter().map(|&v| (v as f64).powi(2)).sum();
                let (gs, gq) = (s[row] as f64, q[row] as f64);
                assert!(
                    (gs - sum).abs() <= 1e-5 * abs.max(1e-3),
                    "{what}: s[{row}] = {gs} vs {sum}"
                );
                assert!(
                    (gq - sq).abs() <= 1e-5 * sq_scale.max(1e-3),
                    "{what}: q[{row}] = {gq} vs {sq}"
                );
            }
            match &first {
                None => first = Some(outs),
                Some(f) => {
                    let bits = |v: &[Vec<f32>]| -> Vec<u32> {
                        v.iter().flatten().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(bits(f), bits(&outs), "{what}: split ranges differ");
                }
            }
        }
    }
}

/// A call over an empty range writes a zero weight gradient (its partial sum).
#[test]
fn grad_weight_of_an_empty_range_is_zero() {
    let (mut rng, mut j) = (Rng(0xc0_0006), jit());
    for c in [random_case(&mut rng), random_pointwise(&mut rng)] {
        let spec = KernelSpec::Conv(ConvKernel::GradWeight {
            x: c.x(),
            dy: c.y(),
            attrs: c.a,
            kernel: c.k,
        });
        let id = j.compile("dw", spec.clone()).unwrap();
        let x = rng.data(c.x().iter().product());
        let dy = rng.data(c.y().iter().product());
        for r in [0..0, 1..1] {
            let mut dw = vec![f32::NAN; c.w().iter().product()];
            j.run(id, &[&x, &dy], &mut [&mut dw], r.clone()).unwrap();
            assert!(dw.iter().all(|&v| v == 0.0), "{r:?}: {dw:?}");
        }
    }
}

/// groups == C > 1 belongs to the depthwise kernels; the GEMM kernels still
/// compute it correctly when built directly, as they do C = 1.
#[test]
fn depthwise_convolutions_are_left_to_their_module() {
    let (mut rng, mut j) = (Rng(0xc0_0007), jit());
    let a = ConvAttrs {
        stride: [1, 2],
        pad: [1, 1],
        dilation: [1, 1],
        groups: 4,
    };
    let c = Case {
        x: [3, 4, 9, 7],
        o: 8,
        k: [3, 3],
        a,
    };
    let mut g = Graph::new("one");
    let x = g.add_value("x", c.x(), Role::Input);
    let w = g.add_value("w", c.w(), Role::Input);
    let dy = g.add_value("dy", c.y(), Role::Input);
    g.push(Op::Conv2d(a), &[x, w], None);
    g.push(Op::Conv2dGradInput(a, [9, 7]), &[dy, w], None);
    g.push(Op::Conv2dGradWeight(a, [3, 3]), &[x, dy], None);
    for node in &g.nodes {
        let spec = KernelSpec::from_node(&g, node);
        assert!(
            matches!(spec, Some(KernelSpec::Depthwise(_))),
            "{:?} → {spec:?}",
            node.op
        );
    }
    let xd = rng.data(c.x().iter().product());
    let wd = rng.data(c.w().iter().product());
    let dyd = rng.data(c.y().iter().product());
    let fwd = oracle(Op::Conv2d(a), &[(c.x(), xd.clone()), (c.w(), wd.clone())]);
    let spec = KernelSpec::Conv(ConvKernel::Forward {
        x: c.x(),
        w: c.w(),
        attrs: a,
        bias: false,
        relu: false,
        stats: false,
    });
    run_split(&mut j, spec, &[&xd, &wd], &fwd, "depthwise forward");
    let op = Op::Conv2dGradInput(a, [9, 7]);
    let dx = oracle(op, &[(c.y(), dyd.clone()), (c.w(), wd.clone())]);
    let spec = KernelSpec::Conv(ConvKernel::GradInput {
        dy: c.y(),
        w: c.w(),
        attrs: a,
        input: [9, 7],
    });
    run_split(&mut j, spec, &[&dyd, &wd], &dx, "depthwise grad input");
    let op = Op::Conv2dGradWeight(a, [3, 3]);
    let dw = oracle(op, &[(c.x(), xd.clone()), (c.y(), dyd.clone())]);
    let spec = KernelSpec::Conv(ConvKernel::GradWeight {
        x: c.x(),
        dy: c.y(),
        attrs: a,
        kernel: [3, 3],
    });
    run_split(&mut j, spec, &[&xd, &dyd], &dw, "depthwise grad weight");

    // A single channel (groups == C == 1) is an ordinary convolution.
    let one = ConvAttrs { groups: 1, ..a };
    let mut g = Graph::new("one");
    let x = g.add_value("x", vec![2, 1, 5, 5], Role::Input);
    let w = g.add_value("w", vec![3, 1, 3, 3], Role::Input);
    g.push(Op::Conv2d(one), &[x, w], None);
    let spec = KernelSpec::from_node(&g, &g.nodes[0]);
    assert!(
        matches!(spec, Some(KernelSpec::Conv(ConvKernel::Forward { .. }))),
        "{spec:?}"
    );
}

/// The benchmark networks' layer shapes (batch 2): M1's 3×3 pad-1 convolutions,
/// M2's, M3's pointwise ones, in all three directions.
#[test]
fn benchmark_layers() {
    let (mut rng, mut j) = (Rng(0xc0_0008), jit());
    let same3 = ConvAttrs {
        stride: [1, 1],
        pad: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let pw = ConvAttrs {
        pad: [0, 0],
        ..same3
    };
    let layers = [
        (1, 16, 28, same3, 3),
        (16, 32, 14, same3, 3),
        (32, 64, 7, same3, 3),
        (3, 32, 32, same3, 3),
        (32, 32, 32, same3, 3),
        (64, 128, 8, same3, 3),
        (64, 128, 16, pw, 1),
    ];
    for (c, o, hw, a, k) in layers {
        let case = Case {
            x: [2, c, hw, hw],
            o,
            k: [k, k],
            a,
        };
        check_forward(&mut j, &mut rng, &case);
        check_grad_input(&mut j, &mut rng, &case);
        check_grad_weight(&mut j, &mut rng, &case);
    }
}
