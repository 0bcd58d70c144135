//! The checked JIT: kernels miscompiled on purpose (every access to one buffer
//! moved past its end, or before its start) are caught by the bounds checks,
//! which name the kernel, the buffer and the layer; correct kernels run checked
//! with the same results; the checks show in the Cranelift IR only when on.
//! (The whole JIT suite also runs checked in CI: `CNNC_CHECKED=1`, `.ci/run`.)

mod common;

use cnnc_compiler::checked::CheckedModel;
use cnnc_compiler::codegen::check::Fault;
use cnnc_compiler::codegen::elementwise::ElemKernel;
use cnnc_compiler::codegen::exec::{kernel_name, ExecOptions, Executable, ThreadPool};
use cnnc_compiler::codegen::plan::StepKind;
use cnnc_compiler::codegen::{Jit, KernelSpec};
use cnnc_compiler::ir::lower::train_graph;
use cnnc_compiler::ir::Graph;
use cnnc_compiler::pipeline::check_text;
use common::Rng;

fn model(src: &str) -> CheckedModel {
    let fe = check_text("checked.cnn", src);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

const NET: &str = r#"
model Small {
  input image: [2, 8, 8]
  conv c1(6, kernel=3, pad=1)
  relu
  maxpool(kernel=2)
  depthwise dw(kernel=3, pad=same, bias=false)
  leaky_relu(0.1)
  conv c2(4, kernel=3, pad=1)
  batchnorm
  avgpool(kernel=2)
  flatten
  linear fc(3)
}
"#;

/// An executable of `g` on `threads` threads, checked, with `fault`, fed with
/// random data.
fn checked_exe(g: &Graph, threads: usize, fault: Option<Fault>) -> Result<Executable, String> {
    let opts = ExecOptions {
        checked: true,
        fault,
        ..ExecOptions::default()
    };
    let mut exe = Executable::with_options(g, &ThreadPool::new(threads)?, &opts)?;
    let mut rng = Rng(3);
    let feeds: Vec<(String, usize)> = exe
        .plan()
        .feeds
        .iter()
        .map(|(n, b)| (n.clone(), exe.plan().bufs[*b].len()))
        .collect();
    for (name, n) in feeds {
        let data = match name.as_str() {
            "labels" => (0..n).map(|k| (k % 3) as f32).collect(),
            "seed" => vec![1.0],
            _ => rng.data(n).iter().map(|x| x.abs() + 0.1).collect(),
        };
        exe.feed(&name, &data)?;
    }
    Ok(exe)
}

/// Every kernel of a training step, miscompiled in turn at each of its buffers
/// (all accesses moved one buffer length up, or 16 bytes down, in turn), is stopped by a
/// check naming the kernel, the buffer and the layer.
#[test]
fn a_miscompiled_kernel_is_caught_and_named() {
    let g = train_graph(&model(NET), 3, 0.0);
    let plan = cnnc_compiler::codegen::plan::Plan::new(&g, 2);
    let mut caught = 0;
    for (si, s) in plan.steps.iter().enumerate() {
        let StepKind::Jit(k) = &s.kind else { continue };
        let n_bufs = k.inputs().len() + k.outputs().len() + usize::from(k.scratch() > 0);
        for buffer in 0..n_bufs {
            let len = match buffer.checked_sub(k.inputs().len()) {
                None => k.inputs()[buffer].iter().product(),
                Some(o) if o < k.outputs().len() => k.outputs()[o].iter().product(),
                Some(_) => k.scratch(),
            };
            // Past the end or before the start, alternately.
            let shift = [4 * len as i64, -16][(si + buffer) % 2];
            let fault = Fault {
                kernel: kernel_name(si, &s.ops),
                buffer,
                shift,
            };
            let mut exe = checked_exe(&g, 2, Some(fault)).unwrap();
            let v = exe.try_run().expect_err(&format!(
                "step {si} ({}), buffer {buffer}, shift {shift}: not caught",
                s.ops
            ));
            caught += 1;
            let msg = v.to_string();
            assert_eq!(v.kernel, kernel_name(si, &s.ops), "{msg}");
            assert_eq!(v.buffer, buffer, "{msg}");
            assert_eq!(v.layer, s.layer, "{msg}");
            let b = s.args.get(buffer).or(s.scratch.first()).expect("a buffer");
            assert!(msg.contains(&kernel_name(si, &s.ops)), "{msg}");
            assert!(msg.contains(&format!("`{}`", plan.bufs[*b].name)), "{msg}");
            if let Some(l) = &s.layer {
                assert!(msg.contains(&format!("(layer `{l}`)")), "{msg}");
            }
            assert!(v.offset < 0 || v.offset >= 4 * len as i64, "{msg}");
        }
    }
    assert!(caught >= 80, "only {caught} miscompiles caught");
}

/// The message of one case, as `cnnc` would print it inside its internal error.
#[test]
fn the_message_names_kernel_layer_and_buffer() {
    let g = train_graph(&model(NET), 3, 0.0);
    let plan = cnnc_compiler::codegen::plan::Plan::new(&g, 1);
    let (si, s) = plan
        .steps
        .iter()
        .enumerate()
        .find(|(_, s)| s.ops == "relu" || s.ops.starts_with("conv2d+bias_add+relu"))
        .expect("a fused conv or relu step");
    let out = s.args[s.n_in];
    let fault = Fault {
        kernel: kernel_name(si, &s.ops),
        buffer: s.n_in,
        shift: 4 * plan.bufs[out].len() as i64,
    };
    let mut exe = checked_exe(&g, 1, Some(fault)).unwrap();
    let msg = exe.try_run().unwrap_err().to_string();
    let want = format!(
        "checked JIT: kernel `{}` (layer `c1`) accessed bytes {}..",
        kernel_name(si, &s.ops),
        4 * plan.bufs[out].len()
    );
    assert!(msg.starts_with(&want), "{msg}\nwanted: {want}…");
    assert!(
        msg.contains(&format!(
            "of buffer {} (output 0 `{}`",
            s.n_in, plan.bufs[out].name
        )),
        "{msg}"
    );
}

/// `run` (not `try_run`) treats a violation as the bug it is: a panic.
#[test]
#[should_panic(expected = "checked JIT: kernel")]
fn run_panics_on_a_violation() {
    let g = train_graph(&model(NET), 2, 0.0);
    let plan = cnnc_compiler::codegen::plan::Plan::new(&g, 1);
    let (si, s) = plan
        .steps
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s.kind, StepKind::Jit(_)))
        .expect("a kernel");
    let fault = Fault {
        kernel: kernel_name(si, &s.ops),
        buffer: 0,
        shift: -4,
    };
    checked_exe(&g, 1, Some(fault)).unwrap().run();
}

/// Without a fault, a checked executable computes what an unchecked one does,
/// bit for bit.
#[test]
fn checked_kernels_compute_the_same() {
    let g = train_graph(&model(NET), 5, 0.1);
    let mut checked = checked_exe(&g, 2, None).unwrap();
    checked.try_run().unwrap();
    let mut plain = checked_exe(&g, 2, None).unwrap();
    plain.run();
    for (name, _) in &checked.plan().outputs.clone() {
        assert_eq!(checked.get(name), plain.get(name), "{name}");
    }
}

/// `Jit::run` reports a violation as an error naming the kernel and buffer.
#[test]
fn jit_run_reports_a_violation() {
    let mut jit = Jit::new().unwrap();
    jit.set_checked(true);
    jit.set_fault(Some(Fault {
        kernel: "relu".into(),
        buffer: 1,
        shift: 4 * 30,
    }));
    let spec = KernelSpec::Elem(ElemKernel::Relu { shape: vec![3, 10] });
    let id = jit.compile("relu", spec).unwrap();
    let x = vec![1.0f32; 30];
    let mut y = vec![0.0f32; 30];
    let err = jit.run(id, &[&x], &mut [&mut y], 0..3).unwrap_err();
    assert!(
        err.starts_with("checked JIT: kernel `relu` accessed bytes 120..")
            && err.contains("of buffer 1 (output 0, 30 f32 elements = 120 bytes)"),
        "{err}"
    );
}

/// The checks appear in the Cranelift IR only when on.
#[test]
fn checks_show_in_the_clif_only_when_on() {
    let spec = KernelSpec::Elem(ElemKernel::Relu { shape: vec![3, 10] });
    let clif = |on: bool| {
        let mut jit = Jit::new().unwrap();
        jit.set_checked(on);
        jit.compile("relu", spec.clone()).unwrap();
        jit.dump_clif()
    };
    let (on, off) = (clif(true), clif(false));
    assert!(
        !off.contains("call_indirect") && !off.contains("cold"),
        "{off}"
    );
    assert!(on.contains("call_indirect") && on.contains("cold"), "{on}");
    assert!(on.contains("icmp ugt"), "{on}");
}
