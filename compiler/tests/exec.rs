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

/// Reductions over the batch use fixed chunks, so every output is identical,
/// bit for bit, whatever the number of threads.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    for (file, batch) in [("examples/mnist.cnn", 13), ("examples/depthwise.cnn", 9)] {
        let g = train_graph(&model_of_file(file), batch, 0.1);
        let mut rng = Rng(21);
        let feeds = feeds(&g, &mut rng);
        let run_on = |threads: usize| {
            let mut exe = Executable::new(&g, threads).unwrap();
            for (v, d) in &feeds {
                let name = &g.values[v.0].name;
                if exe.has_feed(name) {
                    exe.feed(name, d).unwrap();
                }
            }
            exe.run();
            g.outputs
                .iter()
                .map(|(n, _)| exe.get(n).unwrap().to_vec())
                .collect::<Vec<_>>()
        };
        let one = run_on(1);
        for threads in [2, 3, 8] {
            let other = run_on(threads);
            for ((name, _), (a, b)) in g.outputs.iter().zip(one.iter().zip(&other)) {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{file}: {name} differs between 1 and {threads} threads"
                );
            }
        }
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

mod random_models {
    //! Random valid models (layer sequences with random sizes, strides,
    //! paddings, groups and activations): the JIT's training graph equals the
    //! interpreter's, on 1 and 2 threads. Models the checker refuses (a map
    //! shrunk to nothing) are skipped.

    use super::*;
    use proptest::prelude::*;

    fn layer() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (1usize..9, 1usize..4, 1usize..3, 0usize..2, any::<bool>()).prop_map(
                |(o, k, s, p, b)| format!("conv({o}, kernel={k}, stride={s}, pad={p}, bias={b})")
            ),
            1 => (1usize..3, 1usize..3).prop_map(|(g, m)| format!("conv({}, kernel=3, pad=1, groups={g})", 2 * g * m)),
            1 => Just("depthwise(kernel=3, pad=1)".to_string()),
            1 => Just("depthwise(kernel=3, stride=2, pad=1, bias=false)".to_string()),
            2 => Just("batchnorm".to_string()),
            1 => Just("groupnorm(1)".to_string()),
            3 => prop::sample::select(vec!["relu", "sigmoid", "tanh", "gelu", "leaky_relu(0.2)"])
                .prop_map(str::to_string),
            1 => Just("maxpool(2)".to_string()),
            1 => Just("maxpool(kernel=3, stride=1, pad=1)".to_string()),
            1 => Just("avgpool(kernel=2, stride=1)".to_string()),
            1 => Just("dropout(0.2)".to_string()),
        ]
    }

    fn model() -> impl Strategy<Value = String> {
        (
            1usize..4,
            4usize..11,
            4usize..11,
            prop::collection::vec(layer(), 1..7),
        )
            .prop_map(|(c, h, w, layers)| {
                let mut s = format!("model R {{\n  input image: [{c}, {h}, {w}]\n");
                for l in layers {
                    s.push_str(&format!("  {l}\n"));
                }
                s.push_str("  global_avg_pool\n  linear(3)\n}\n");
                s
            })
    }

    /// 200 generated models; those that check (at least 100, so the generator
    /// stays useful) run on both backends.
    #[test]
    fn random_models_match_the_interpreter() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::{Config, TestRng, TestRunner};
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
        );
        let strategy = (model(), 1usize..4);
        let mut ran = 0;
        for _ in 0..200 {
            let (src, batch) = strategy.new_tree(&mut runner).unwrap().current();
            let fe = check_text("random.cnn", &src);
            if fe.has_errors() {
                continue;
            }
            let m = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
            for threads in [1, 2] {
                compare(&train_graph(&m, batch, 0.0), threads, 5, &src);
            }
            ran += 1;
        }
        eprintln!("{ran} of 200 random models checked and compared");
        assert!(ran >= 100, "only {ran} of 200 random models checked");
    }
}
