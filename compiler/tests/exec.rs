//! Whole graphs on the JIT executable against the reference interpreter: the
//! training graph (forward, loss, backward, running statistics) and the
//! inference graph of every example model and of small models covering every
//! op, on 1 and 2 threads, with odd batch sizes. Every named output must agree
//! within 5e-4 of the output's scale.

mod common;

use cnnc_compiler::checked::CheckedModel;
use cnnc_compiler::codegen::exec::Executable;
use cnnc_compiler::interp::{run, Tensor};
use cnnc_compiler::ir::lower::{eval_graph, train_graph};
use cnnc_compiler::ir::*;
use cnnc_compiler::pipeline::{check_paths, check_text};
use common::Rng;
use ndarray::{ArrayD, IxDyn};
use std::path::PathBuf;

fn model_of_file(rel: &str) -> CheckedModel {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    let fe = check_paths(&[path]);
    assert!(!fe.has_errors(), "{rel}: {:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

fn model_of_text(src: &str) -> CheckedModel {
    let fe = check_text("exec.cnn", src);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

/// Random feeds for every input, parameter and buffer of `g`: images and
/// weights in [-1, 1), running variances positive, labels cycling over the
/// classes.
fn feeds(g: &Graph, rng: &mut Rng) -> Vec<(Vid, Vec<f32>)> {
    let mut out = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        let n: usize = v.shape.iter().product();
        let data = match (v.role, v.name.as_str()) {
            (Role::Temp, _) => continue,
            (Role::Input, "labels") => (0..n).map(|k| (k % 3) as f32).collect(),
            (Role::Input, "seed") => vec![7.0],
            (Role::Buffer, name) if name.ends_with("running_var") => {
                (0..n).map(|_| 0.5 + rng.next() as f32).collect()
            }
            _ => rng.data(n),
        };
        out.push((Vid(i), data));
    }
    out
}

/// Runs `g` on the interpreter and on the executable (`threads`) with the same
/// feeds and compares every named output.
fn compare(g: &Graph, threads: usize, seed: u64, what: &str) {
    let mut rng = Rng(seed);
    let feeds = feeds(g, &mut rng);
    let tensors: Vec<(Vid, Tensor<f32>)> = feeds
        .iter()
        .map(|(v, d)| {
            let t = ArrayD::from_shape_vec(IxDyn(g.shape(*v)), d.clone()).unwrap();
            (*v, t)
        })
        .collect();
    let want = run(g, tensors).unwrap();
    let mut exe = Executable::new(g, threads).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (v, d) in &feeds {
        let name = &g.values[v.0].name;
        if exe.has_feed(name) {
            exe.feed(name, d).unwrap();
        }
    }
    // Twice: the second run must not depend on what the first left in the arena.
    exe.run();
    exe.run();
    for (name, v) in &g.outputs {
        let w: Vec<f32> = want.get(*v).iter().copied().collect();
        let got = exe
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no output {name}"));
        assert_eq!(got.len(), w.len(), "{what}: {name}");
        let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in got.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= 5e-4 * scale,
                "{what} ({threads} threads): {name}[{i}]: jit {a} vs interpreter {b} (scale {scale})\n{}",
                exe.plan().dump()
            );
        }
    }
}

fn both_graphs(model: &CheckedModel, batch: usize, what: &str) {
    for threads in [1, 2] {
        compare(
            &train_graph(model, batch, 0.1),
            threads,
            11,
            &format!("{what} train"),
        );
        compare(
            &eval_graph(model, batch),
            threads,
            12,
            &format!("{what} eval"),
        );
    }
}

#[test]
fn example_models_match_the_interpreter() {
    for (file, batch) in [
        ("examples/mnist.cnn", 3),
        ("examples/bench/m1.cnn", 5),
        ("examples/lines.cnn", 2),
        ("examples/resnet.cnn", 3),
        ("examples/depthwise.cnn", 2),
        ("examples/explain_shapes.cnn", 1),
    ] {
        both_graphs(&model_of_file(file), batch, file);
    }
}

#[test]
fn every_op_matches_the_interpreter() {
    let src = r#"
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
    both_graphs(&model_of_text(src), 3, "every op");
}

#[test]
fn branches_and_detach_match_the_interpreter() {
    let src = r#"
model Branches {
  input image: [2, 8, 8]
  conv stem(4, kernel=3, pad=1)
  relu
  conv left(4, kernel=3, pad=1) from stem
  conv right(4, kernel=1) from stem
  detach rd
  add(left, rd)
  conv wide(3, kernel=1) from stem
  concat(add1, wide)
  relu
  global_avg_pool
  linear out(3)
}
"#;
    both_graphs(&model_of_text(src), 2, "branches");
}
