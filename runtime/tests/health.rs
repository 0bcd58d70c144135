//! Gradient health and non-finite values in `cnnc run`, end to end on tiny
//! models and the built-in `shapes` data: the per-layer norms in
//! `metrics.jsonl` and the epoch table; the vanishing (W0007) and exploding
//! (W0008) warnings on a layer's span; a NaN (a batchnorm dividing by zero) and
//! an overflow (huge weights, a huge learning rate) found, named and pointed at
//! (E0701); `on_nonfinite = abort` and `skip(max=N)`, and that a skipped step
//! leaves the weights and the optimizer state bit for bit as they were.
//!
//! These codes only occur while training, so they are tested here instead of in
//! `tests/ui` (see `NOT_IN_UI` in `tests/tests/ui.rs`).

use cnnc_compiler::checked::{CheckedModel, TrainConfig};
use cnnc_compiler::params::param_specs;
use cnnc_runtime::backend::{Backend, Interpreter, Jit};
use cnnc_runtime::data::Batch;
use cnnc_runtime::optim::Optimizer;
use cnnc_runtime::params::Params;
use cnnc_runtime::train::{train_step, StepPlan};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cnnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100")
        .output()
        .expect("cnnc runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh folder for one test.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnnc-health-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model file `m.cnn` in `d` with this body and `train` settings (on
/// `shapes(n=60)`: 60 training images, 4 steps per epoch: 3 of 16 and one of 12).
fn model_file(d: &Path, body: &str, train: &str) -> String {
    let src = format!(
        "model M {{\n  input image: [1, 16, 16]\n{body}}}\ntrain {{\n  data = shapes(n=60, size=16, color=grey, classes=3)\n  batch = 16\n  seed = 3\n{train}}}\n"
    );
    let f = d.join("m.cnn");
    std::fs::write(&f, src).unwrap();
    f.to_string_lossy().into_owned()
}

/// Runs `cnnc run FILE --out d/run` (JIT unless `extra` says otherwise).
fn run(d: &Path, file: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = d.join("run");
    let mut args = vec![
        "run",
        file,
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ];
    args.extend_from_slice(extra);
    let o = cnnc(&args);
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

fn metrics(d: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A conv whose kernel is all zeros feeds a batchnorm whose `eps` is 0 in f32:
/// every channel has variance 0, so `(x − mean)/sqrt(var + eps)` is 0/0. The
/// ReLU after it hides the NaN from the loss; the gradients carry it.
const ZERO_VARIANCE: &str =
    "  conv c1(4, kernel=3, pad=1, bias=false, weights=[[0, 0, 0], [0, 0, 0], [0, 0, 0]])
  batchnorm bn(eps=1e-50)
  relu
  global_avg_pool
  linear fc(3)
";

/// Two convs with 1e30 weights: `c1`'s output is ~1e31, `c2`'s overflows.
const HUGE_WEIGHTS: &str = "  conv c1(2, kernel=3, pad=1, weights=[[1e30, 1e30, 1e30], [1e30, 1e30, 1e30], [1e30, 1e30, 1e30]])
  conv c2(2, kernel=3, pad=1, weights=[[1e30, 1e30, 1e30], [1e30, 1e30, 1e30], [1e30, 1e30, 1e30]])
  global_avg_pool
  linear fc(3)
";

const SMALL: &str = "  conv c1(4, kernel=3, pad=1, bias=false)
  batchnorm bn
  relu
  maxpool(2)
  conv c2(8, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(3)
";

#[test]
fn a_division_by_zero_is_found_in_the_layer_that_did_it_and_aborts() {
    let d = dir("zero-var");
    let file = model_file(
        &d,
        ZERO_VARIANCE,
        "  epochs = 2\n  optimizer = sgd(lr=0.1)\n",
    );
    for backend in ["jit", "interp"] {
        let _ = std::fs::remove_dir_all(d.join("run"));
        let (code, _, err) = run(&d, &file, &["--backend", backend]);
        assert_eq!(code, Some(1), "{backend}: {err}");
        assert!(err.contains("E0701"), "{backend}: {err}");
        assert!(
            err.contains("step 1 (epoch 1): `batchnorm` of `bn` produced NaN (forward)"),
            "{backend}: {err}"
        );
        // The span is the `batchnorm bn(…)` statement: line 4 of the file.
        assert!(err.contains("m.cnn:4:3]"), "{backend}: {err}");
        assert!(
            err.contains("input conv2d of `c1` [16, 4, 16, 16]: min 0e0, max 0e0"),
            "{err}"
        );
        assert!(err.contains("raise `eps`"), "{err}");
        assert!(err.contains("on_nonfinite = abort"), "{err}");
        // Nothing was trained, so nothing was written but the empty metrics.
        assert!(!d.join("run/checkpoints/final.safetensors").exists());
        assert!(metrics(&d).is_empty());
    }
}

#[test]
fn an_overflow_names_the_layer_whose_output_overflowed() {
    let d = dir("overflow");
    let file = model_file(
        &d,
        HUGE_WEIGHTS,
        "  epochs = 1\n  optimizer = sgd(lr=0.1)\n",
    );
    let (code, _, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`conv2d` of `c2` produced inf (forward)"),
        "c1's output is finite, c2's is not: {err}"
    );
    assert!(err.contains("m.cnn:4:3]"), "{err}");
    assert!(err.contains("overflowed f32"), "{err}");
}

#[test]
fn skip_counts_skipped_steps_and_aborts_after_max() {
    let d = dir("skip-max");
    // Every step of this model is non-finite: 4 per epoch.
    let file = model_file(
        &d,
        ZERO_VARIANCE,
        "  epochs = 3\n  optimizer = sgd(lr=0.1)\n  on_nonfinite = skip(max=4)\n",
    );
    let (code, out, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("update skipped (4 of at most 4"), "{err}");
    assert!(
        err.contains("training stopped at step 5 (epoch 2)"),
        "the fifth non-finite step stops the run: {err}"
    );
    assert!(err.contains("more than 4 steps skipped"), "{err}");
    // Diagnosed twice: the first skip and the abort.
    assert_eq!(err.matches("E0701").count(), 2, "{err}");
    let m = metrics(&d);
    assert_eq!(m.len(), 1, "epoch 1 finished");
    assert_eq!(m[0]["nonfinite_skipped"], 4);
}

#[test]
fn a_resumed_run_continues_the_skip_budget() {
    // Epoch 1 skips its 4 steps and is checkpointed; resumed, the fifth
    // non-finite step (the first of epoch 2) must still stop the run, as it
    // does without the interruption.
    let d = dir("skip-resume");
    let file = model_file(
        &d,
        ZERO_VARIANCE,
        "  epochs = 3
  optimizer = sgd(lr=0.1)
  on_nonfinite = skip(max=4)
  checkpoint = every(epochs=1, keep=2)
",
    );
    let (code, out, err) = run(&d, &file, &["--epochs", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(&d, &file, &["--resume"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("training stopped at step 5 (epoch 2)"),
        "the budget carried over: {err}"
    );
}

#[test]
fn a_run_whose_steps_are_all_skipped_ends_with_its_initial_weights() {
    let d = dir("skip-all");
    let file = model_file(
        &d,
        ZERO_VARIANCE,
        "  epochs = 2\n  optimizer = sgd(lr=0.1, momentum=0.9)\n  on_nonfinite = skip(max=100)\n",
    );
    let (code, out, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let m = metrics(&d);
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|e| e["nonfinite_skipped"] == 4), "{m:?}");
    let (model, cfg) = load(Path::new(&file));
    let specs = param_specs(&model);
    let init = Params::init(&specs, cfg.seed).unwrap();
    let last = cnnc_runtime::checkpoint::load_weights(
        &d.join("run/checkpoints/final.safetensors"),
        &specs,
    )
    .unwrap();
    for (i, spec) in specs.iter().enumerate() {
        let bits = |p: &Params| p.data(i).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&init), bits(&last), "{}", spec.name);
    }
}

fn load(file: &Path) -> (CheckedModel, TrainConfig) {
    let fe = cnnc_compiler::pipeline::check_paths(&[file.to_path_buf()]);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    let c = fe.files[0].checked.as_ref().unwrap();
    (c.model.clone().unwrap(), c.train.clone().unwrap())
}

/// A batch of the model's input shape: a ramp, so no channel is constant.
fn batch(model: &CheckedModel, n: usize) -> Batch {
    let per: usize = model.input.iter().product::<u64>() as usize;
    Batch {
        x: (0..n * per).map(|i| (i % 17) as f32 / 17.0).collect(),
        labels: (0..n).map(|i| (i % 3) as u32).collect(),
        indices: (0..n).collect(),
        n,
    }
}

#[test]
fn a_skipped_step_leaves_weights_optimizer_state_and_running_stats_bit_identical() {
    let d = dir("bits");
    // Adam with a huge learning rate: step 1 is finite and moves every weight
    // by ~1e30; step 2 overflows in the forward pass.
    let body = "  conv c1(4, kernel=3, pad=1)\n  batchnorm bn\n  relu\n  conv c2(4, kernel=3, pad=1)\n  global_avg_pool\n  linear fc(3)\n";
    let file = model_file(&d, body, "  optimizer = adam(lr=1e30)\n");
    let (model, cfg) = load(Path::new(&file));
    let specs = param_specs(&model);
    let b = batch(&model, 4);
    let engines: [Box<dyn Backend>; 2] = [
        Box::new(Jit::new(&model, 0.0, 2)),
        Box::new(Interpreter::new(&model, 0.0)),
    ];
    for mut engine in engines {
        let mut params = Params::init(&specs, 1).unwrap();
        let mut opt = Optimizer::new(&cfg.optimizer, &specs);
        let plan = StepPlan::new(&params, &cfg.clip);
        let first = train_step(engine.as_mut(), &mut params, &mut opt, &plan, &b, 7, 1e30).unwrap();
        assert!(first.applied, "step 1 is finite (loss {})", first.loss);
        let (p0, o0) = (params.clone(), opt.clone());
        let second =
            train_step(engine.as_mut(), &mut params, &mut opt, &plan, &b, 8, 1e30).unwrap();
        assert!(!second.applied, "step 2 overflows (loss {})", second.loss);
        assert!(!second.clip.norm.is_finite() || !second.loss.is_finite());
        assert_eq!(opt.steps(), 1, "the optimizer did not count the step");
        for (i, spec) in specs.iter().enumerate() {
            let bits = |p: &Params| p.data(i).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p0), bits(&params), "{}", spec.name);
            assert_eq!(p0.counter(i), params.counter(i), "{}", spec.name);
        }
        for k in 0..opt.num_params() {
            for slot in 0..opt.state_names().len() {
                let bits = |o: &Optimizer| {
                    o.state(k, slot)
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&o0), bits(&opt), "state {k}/{slot}");
            }
        }
    }
}

#[test]
fn epoch_lines_carry_per_layer_norms_and_a_table_is_printed() {
    let d = dir("norms");
    let file = model_file(&d, SMALL, "  epochs = 2\n  optimizer = adam(lr=0.01)\n");
    let (code, out, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let m = metrics(&d);
    assert_eq!(m.len(), 2);
    for e in &m {
        // The fields that were there before are unchanged.
        assert!(e["train_loss"].as_f64().unwrap().is_finite(), "{e}");
        assert_eq!(e["nonfinite_skipped"], 0);
        let h = &e["health"];
        assert_eq!(h["every"], 1, "4 steps per epoch: every step is measured");
        assert_eq!(h["steps"].as_array().unwrap().len(), 4, "{h}");
        let layers: Vec<&str> = h["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["layer"].as_str().unwrap())
            .collect();
        assert_eq!(
            layers,
            ["c1", "bn", "c2", "fc"],
            "layers with parameters, in order"
        );
        for l in h["layers"].as_array().unwrap() {
            for key in ["weight_norm", "grad_norm"] {
                let v = l[key].as_array().unwrap();
                assert_eq!(v.len(), 4, "{key} of {l}");
                assert!(v.iter().all(|x| x.as_f64().unwrap() > 0.0), "{key} of {l}");
            }
        }
    }
    let steps: Vec<u64> = m
        .iter()
        .flat_map(|e| e["health"]["steps"].as_array().unwrap().clone())
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6, 7, 8]);
    // bn's weight norm at the start is |gamma| = sqrt(4) = 2; it moves from there.
    let bn0 = m[0]["health"]["layers"][1]["weight_norm"][0]
        .as_f64()
        .unwrap();
    assert!((bn0 - 2.0).abs() < 0.1, "{bn0}");
    assert_eq!(out.matches("gradient health:").count(), 2, "{out}");
    assert!(out.contains("|g|/|w|"), "{out}");
    assert!(out.contains("\n  fc "), "{out}");
    assert!(out.contains(" ×"), "the second epoch has a trend: {out}");
    assert!(!err.contains("W000"), "a healthy run has no warning: {err}");
}

#[test]
fn a_dead_relu_layer_is_reported_as_vanishing() {
    let d = dir("vanishing");
    // Non-negative images through an all-negative kernel without bias: every
    // output of `c1` is ≤ 0, the ReLU passes no gradient back, `c1` never moves.
    let body = "  conv c1(4, kernel=3, pad=1, bias=false, weights=[[-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
  relu
  conv c2(4, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(3)
";
    let file = model_file(&d, body, "  epochs = 2\n  optimizer = sgd(lr=0.1)\n");
    let (code, out, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("W0007"), "{err}");
    assert_eq!(err.matches("is vanishing").count(), 1, "warned once: {err}");
    assert!(err.contains("the gradient of `c1` is vanishing"), "{err}");
    assert!(err.contains("m.cnn:3:3]"), "{err}");
    assert!(!err.contains("`fc` is vanishing"), "{err}");
}

#[test]
fn a_clip_that_fires_on_every_step_is_reported() {
    let d = dir("clip");
    let file = model_file(
        &d,
        SMALL,
        "  epochs = 1\n  optimizer = sgd(lr=0.1)\n  clip = norm(1e-6)\n",
    );
    let (code, out, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("W0008"), "{err}");
    assert!(
        err.contains("clip `norm(0.000001)` fired on 100% of this epoch's steps"),
        "{err}"
    );
    assert!(err.contains("the gradient of `c2` is exploding"), "{err}");
    assert!(err.contains("m.cnn:7:3]"), "{err}");
    assert!(out.contains("clip fired on 100% of steps"), "{out}");
    // Without clipping there is nothing to report.
    let file = model_file(&d, SMALL, "  epochs = 1\n  optimizer = sgd(lr=0.1)\n");
    let _ = std::fs::remove_dir_all(d.join("run"));
    let (code, _, err) = run(&d, &file, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("W0008"), "{err}");
}

#[test]
fn the_run_time_codes_are_explained() {
    for code in ["E0701", "W0007", "W0008"] {
        let o = cnnc(&["explain-code", code]);
        assert_eq!(o.status.code(), Some(0), "{code}");
        assert!(
            text(&o.stdout).contains("cnnc run"),
            "{code}: {}",
            text(&o.stdout)
        );
    }
}
