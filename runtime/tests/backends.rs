//! The JIT backend against the reference interpreter through the runtime's own
//! training step (`train::train_step`: forward, loss, backward, clip, optimizer
//! update, running statistics): on the same batches, every example model has the
//! same parameters after one step and the same losses over three steps (within
//! tolerance; later steps amplify rounding differences through batchnorm on tiny
//! batches), on one and two threads; and evaluation gives the same logits.
//!
//! The weights are compared after an SGD step (momentum, weight decay, the file's
//! clip policy): Adam's first step is about `lr · g/|g|`, which turns rounding
//! noise in near-zero gradients into full-size, opposite steps.

use cnnc_compiler::checked::CheckedModel;
use cnnc_compiler::params::param_specs;
use cnnc_compiler::pipeline::check_paths;
use cnnc_runtime::backend::{Backend, Interpreter, Jit};
use cnnc_runtime::bench::synthetic_batch;
use cnnc_runtime::optim::Optimizer;
use cnnc_runtime::params::Params;
use cnnc_runtime::train::{train_step, StepPlan};
use std::path::PathBuf;

fn load(rel: &str) -> (CheckedModel, cnnc_compiler::checked::TrainConfig) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    let fe = check_paths(&[path]);
    assert!(!fe.has_errors(), "{rel}: {:?}", fe.diags);
    let c = fe.files[0].checked.as_ref().unwrap();
    (c.model.clone().unwrap(), c.train.clone().unwrap())
}

/// `steps` training steps of batch `n` on `engine`; the losses and final params.
fn train(
    engine: &mut dyn Backend,
    model: &CheckedModel,
    cfg: &cnnc_compiler::checked::TrainConfig,
    n: usize,
    steps: u64,
) -> (Vec<f32>, Params) {
    let specs = param_specs(model);
    let mut params = Params::init(&specs, 3).unwrap();
    let mut opt = Optimizer::new(&cfg.optimizer, &specs);
    let plan = StepPlan::new(&params, &cfg.clip);
    let classes = model.shape(model.output())[0];
    let mut losses = Vec::new();
    for step in 0..steps {
        let batch = synthetic_batch(&model.input, classes, n, step);
        let r = train_step(
            engine,
            &mut params,
            &mut opt,
            &plan,
            &batch,
            step as u32,
            0.05,
        )
        .unwrap();
        losses.push(r.loss);
    }
    (losses, params)
}

#[test]
fn training_steps_match_the_interpreter() {
    for (file, n) in [
        ("examples/mnist.cnn", 5),
        ("examples/bench/m1.cnn", 4),
        ("examples/resnet.cnn", 3),
        ("examples/depthwise.cnn", 3),
        ("examples/lines.cnn", 2),
    ] {
        let (model, mut cfg) = load(file);
        cfg.optimizer = cnnc_compiler::checked::Optimizer::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        };
        let interp = || Interpreter::new(&model, 0.0);
        let (want_loss, _) = train(&mut interp(), &model, &cfg, n, 3);
        let (_, want) = train(&mut interp(), &model, &cfg, n, 1);
        for threads in [1, 2] {
            let jit = || Jit::new(&model, 0.0, threads);
            let (loss, _) = train(&mut jit(), &model, &cfg, n, 3);
            for (a, b) in loss.iter().zip(&want_loss) {
                assert!(
                    (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                    "{file}: loss {a} vs {b}"
                );
            }
            let (_, got) = train(&mut jit(), &model, &cfg, n, 1);
            for i in 0..want.len() {
                let (a, b) = (got.data(i), want.data(i));
                let name = &want.spec(i).name;
                let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4 * scale,
                        "{file} ({threads} threads): {name}[{j}]: jit {x} vs interpreter {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn evaluation_matches_the_interpreter() {
    let (model, _) = load("examples/mnist.cnn");
    let specs = param_specs(&model);
    let params = Params::init(&specs, 5).unwrap();
    let batch = synthetic_batch(&model.input, 10, 7, 1);
    let want = Interpreter::new(&model, 0.0)
        .eval(&params, &batch.x, &batch.labels, 7)
        .unwrap();
    let got = Jit::new(&model, 0.0, 2)
        .eval(&params, &batch.x, &batch.labels, 7)
        .unwrap();
    assert_eq!(got.correct, want.correct);
    assert!((got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0));
    assert_eq!(got.logits.len(), want.logits.len());
    for (a, b) in got.logits.iter().zip(&want.logits) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}
