//! JIT kernels against the reference interpreter: each kernel runs on randomised
//! shapes and data and must match `interp::run` on a one-node graph (1e-5 absolute
//! for elementwise kernels, 5e-4 for conv2d), also when the batch is split into
//! work ranges; plus the ISA report, the CLIF dump and freeing on drop.

use cnnc_compiler::codegen::conv::ConvKernel;
use cnnc_compiler::codegen::elementwise::ElemKernel;
mod common;

use cnnc_compiler::codegen::{Jit, KernelSpec, OptLevel};
use cnnc_compiler::ir::*;
use common::{check, Rng};

fn jit() -> Jit {
    let mut j = Jit::new().expect("the host is supported");
    j.set_disasm(true);
    j
}

#[test]
fn isa_is_reported() {
    let j = jit();
    let isa = j.isa();
    assert!(!isa.triple.is_empty());
    assert!(isa.summary().contains(&isa.triple));
    if isa.has_avx && isa.has_fma {
        assert!(isa.native_fma);
        assert!(j.warnings().is_empty());
    } else {
        assert!(!j.warnings().is_empty(), "missing FMA must be reported");
    }
}

#[test]
fn elementwise_kernels_match_the_interpreter() {
    let mut rng = Rng(0x5eed_0001);
    let mut j = jit();
    for case in 0..24 {
        let n = rng.int(1, 3);
        let c = rng.int(1, 5);
        let h = rng.int(1, 9);
        let w = rng.int(1, 9);
        let shape = if case % 4 == 3 {
            vec![n, c * h * w]
        } else {
            vec![n, c, h, w]
        };
        let len: usize = shape.iter().product();
        let x = (shape.clone(), rng.data(len));
        let dy = (shape.clone(), rng.data(len));
        let b = (vec![shape[1]], rng.data(shape[1]));
        check(
            &mut j,
            Op::Act(Act::Relu),
            std::slice::from_ref(&x),
            1e-5,
            &format!("relu {shape:?}"),
        );
        check(
            &mut j,
            Op::ActGrad(Act::Relu),
            &[dy, x.clone()],
            1e-5,
            &format!("relu_grad {shape:?}"),
        );
        check(
            &mut j,
            Op::BiasAdd,
            &[x, b],
            1e-5,
            &format!("bias_add {shape:?}"),
        );
    }
}

/// One conv case: x `[n, c, h, w]`, `o` filters of `k`, the attributes.
fn conv_case(j: &mut Jit, rng: &mut Rng, x: [usize; 4], o: usize, k: [usize; 2], a: ConvAttrs) {
    let wshape = vec![o, x[1] / a.groups, k[0], k[1]];
    let xs = x.to_vec();
    let xd = rng.data(xs.iter().product());
    let wd = rng.data(wshape.iter().product());
    check(
        j,
        Op::Conv2d(a),
        &[(xs, xd), (wshape.clone(), wd)],
        5e-4,
        &format!("conv2d x{x:?} w{wshape:?} {a:?}"),
    );
}

#[test]
fn conv2d_matches_the_interpreter_on_random_shapes() {
    let mut rng = Rng(0x5eed_0002);
    let mut j = jit();
    let mut done = 0;
    while done < 40 {
        let groups_kind = rng.int(0, 2);
        let cg = rng.int(1, 4);
        let (groups, c, o) = match groups_kind {
            0 => (1, cg, rng.int(1, 9)),
            1 => (2, 2 * cg, 2 * rng.int(1, 6)),
            // depthwise (with a channel multiplier of 1 or 2)
            _ => {
                let c = rng.int(1, 6);
                (c, c, c * rng.int(1, 2))
            }
        };
        let a = ConvAttrs {
            stride: [rng.int(1, 3), rng.int(1, 3)],
            pad: [rng.int(0, 2), rng.int(0, 2)],
            dilation: [rng.int(1, 2), rng.int(1, 2)],
            groups,
        };
        let k = [rng.int(1, 4), rng.int(1, 4)];
        let (h, w) = (rng.int(1, 13), rng.int(1, 13));
        let shape_ok = window_out(h, k[0], a.stride[0], a.pad[0], a.dilation[0]).is_ok()
            && window_out(w, k[1], a.stride[1], a.pad[1], a.dilation[1]).is_ok();
        if !shape_ok {
            continue;
        }
        let n = if done % 3 == 0 { 2 } else { 1 };
        conv_case(&mut j, &mut rng, [n, c, h, w], o, k, a);
        done += 1;
    }
}

#[test]
fn conv2d_common_layers() {
    for opt in [OptLevel::Speed, OptLevel::None] {
        let mut j = Jit::with_opt_level(opt).unwrap();
        j.set_disasm(true);
        common_layers(j);
    }
}

fn common_layers(mut j: Jit) {
    let mut rng = Rng(0x5eed_0003);
    let same3 = ConvAttrs {
        stride: [1, 1],
        pad: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    // M1's second conv (reduced batch), a strided 3x3, a depthwise 3x3, a 1x1.
    conv_case(&mut j, &mut rng, [2, 16, 14, 14], 32, [3, 3], same3);
    let s2 = ConvAttrs {
        stride: [2, 2],
        ..same3
    };
    conv_case(&mut j, &mut rng, [1, 8, 16, 16], 12, [3, 3], s2);
    let dw = ConvAttrs { groups: 8, ..s2 };
    conv_case(&mut j, &mut rng, [1, 8, 17, 17], 8, [3, 3], dw);
    let pw = ConvAttrs {
        pad: [0, 0],
        ..same3
    };
    conv_case(&mut j, &mut rng, [1, 12, 7, 9], 20, [1, 1], pw);
    // Padding wider than the kernel reach: rows and columns of zeros.
    let wide = ConvAttrs {
        pad: [2, 2],
        ..same3
    };
    conv_case(&mut j, &mut rng, [1, 3, 4, 5], 5, [1, 1], wide);

    // `from_node` gives the im2col + GEMM kernel (its FMAs are in the GEMM); the
    // direct kernel's own code is checked for vector FMAs.
    assert!(
        j.kernels()[0].clif.contains("call_indirect"),
        "conv calls sgemm"
    );
    let direct = ConvKernel::Direct {
        x: vec![2, 16, 14, 14],
        w: vec![32, 16, 3, 3],
        attrs: same3,
    };
    let id = j.compile("direct", KernelSpec::Conv(direct)).unwrap();
    let conv = j.kernel(id);
    assert!(conv.clif.contains("fma"), "the conv kernel uses fma");
    assert!(conv.clif.contains("f32x4"), "the conv kernel is vectorised");
    if j.isa().native_fma {
        let asm = conv.disasm.as_deref().expect("disassembly was requested");
        assert!(asm.contains("vfmadd"), "fma lowers to vfmadd:\n{asm}");
        assert!(!asm.contains("fmaf"), "no fmaf libcall");
    }
}

#[test]
fn clif_dump_lists_every_kernel() {
    let mut j = jit();
    let spec = KernelSpec::Elem(ElemKernel::Relu {
        shape: vec![2, 3, 5],
    });
    j.compile("relu_a", spec.clone()).unwrap();
    j.compile("relu_b", spec).unwrap();
    let dump = j.dump_clif();
    assert!(dump.contains("; kernel relu_a") && dump.contains("; kernel relu_b"));
    assert_eq!(dump.matches("function ").count(), 2, "{dump}");
    // Inputs are loaded read-only, movable and non-trapping.
    assert!(dump.contains("notrap readonly can_move") || dump.contains("can_move"));
}

#[test]
fn bad_calls_are_refused() {
    let mut j = jit();
    let id = j
        .compile(
            "relu",
            KernelSpec::Elem(ElemKernel::Relu { shape: vec![2, 4] }),
        )
        .unwrap();
    let x = vec![1.0f32; 8];
    let mut y = vec![0.0f32; 7];
    assert!(j.run(id, &[&x], &mut [&mut y], 0..2).is_err());
    let mut y = vec![0.0f32; 8];
    assert!(j.run(id, &[&x], &mut [&mut y], 0..3).is_err());
    assert!(j.run(id, &[&x], &mut [&mut y], 1..2).is_ok());
    assert_eq!(y, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let bad = KernelSpec::Conv(ConvKernel::Direct {
        x: vec![1, 3, 2, 2],
        w: vec![4, 3, 5, 5],
        attrs: ConvAttrs {
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            groups: 1,
        },
    });
    assert!(j.compile("too_small", bad).is_err());
}

/// Resident memory in bytes (Linux), else 0.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[test]
fn dropping_the_jit_frees_its_code() {
    let spec = KernelSpec::Conv(ConvKernel::Direct {
        x: vec![1, 4, 9, 9],
        w: vec![8, 4, 3, 3],
        attrs: ConvAttrs {
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
    });
    let round = || {
        let mut j = Jit::new().unwrap();
        j.compile("conv", spec.clone()).unwrap();
        j.compile(
            "relu",
            KernelSpec::Elem(ElemKernel::Relu { shape: vec![1, 9] }),
        )
        .unwrap();
    };
    for _ in 0..20 {
        round();
    }
    let before = rss();
    for _ in 0..200 {
        round();
    }
    let grown = rss().saturating_sub(before);
    // Each module maps pages of code and data: without `free_memory`, 200 rounds
    // leave about 3.5 MB resident (measured); with it, nothing.
    assert!(grown < 1 << 20, "resident memory grew by {grown} bytes");
}
