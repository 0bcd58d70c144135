//! The JIT backend's fused optimizer update (`Backend::update` on `Jit`: the
//! generated sum-of-squares and update kernels) against the default update (the
//! runtime's `clip`, then `Optimizer::step`) on the same gradients, over several
//! steps with changing learning rates: SGD (plain, momentum, Nesterov, weight
//! decay), Adam and AdamW (with weight decay), each under every clip policy (none,
//! norm firing and not, value, layer_norm firing for one layer only).
//!
//! Parameters, optimizer state and step count must be bit-identical, and the
//! `ClipOutcome`s equal with the norm within 1e-6 relative (the kernels sum the
//! squares in another order; see `FusedUpdate` in `runtime/src/backend.rs`).
//! Tensors of 1, 3, 4, 17 and 1000 elements, spread over three layers, with a
//! frozen parameter between them.

use cnnc_compiler::checked::{self, CheckedModel, Clip};
use cnnc_compiler::params::{ParamKind, ParamSpec};
use cnnc_compiler::pipeline::check_paths;
use cnnc_runtime::backend::{Backend, EvalOut, Jit, StepOut};
use cnnc_runtime::optim::{clip_action, ClipAction, ClipOutcome, ClipStats, Optimizer};
use cnnc_runtime::params::Params;
use std::path::PathBuf;

/// A backend with only the default (Rust) update.
struct Reference;

impl Backend for Reference {
    fn train_step(
        &mut self,
        _: &Params,
        _: &[f32],
        _: &[u32],
        _: usize,
        _: u32,
    ) -> Result<StepOut, String> {
        unreachable!("only the update is tested")
    }
    fn eval(&mut self, _: &Params, _: &[f32], _: &[u32], _: usize) -> Result<EvalOut, String> {
        unreachable!("only the update is tested")
    }
}

/// Any checked model: the JIT backend needs one, its update does not use it.
fn model() -> CheckedModel {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/bench/m1.cnn");
    let fe = check_paths(&[path]);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

/// (elements, layer, trainable) of the test's parameters: layer 0 small
/// gradients, layer 1 large ones, layer 2 in between.
const TENSORS: [(usize, usize, bool); 6] = [
    (17, 0, true),
    (3, 0, true),
    (8, 1, false),
    (1000, 1, true),
    (1, 1, true),
    (4, 2, true),
];

/// Gradient scale per layer (the data is uniform in [-1, 1)).
const LAYER_SCALE: [f32; 3] = [0.02, 0.3, 1.5];

fn specs() -> Vec<ParamSpec> {
    TENSORS
        .iter()
        .enumerate()
        .map(|(i, &(n, layer, trainable))| ParamSpec {
            name: format!("l{layer}.t{i}"),
            shape: vec![n],
            kind: ParamKind::Weight,
            layer,
            trainable,
            fan_in: n,
            init: None,
        })
        .collect()
}

/// xorshift64*, uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
}

/// One step's gradients, in `params.trainable()` order.
fn grads(params: &Params, rng: &mut Rng) -> Vec<Vec<f32>> {
    params
        .trainable()
        .iter()
        .map(|&i| {
            let s = LAYER_SCALE[params.spec(i).layer];
            (0..params.data(i).len()).map(|_| rng.next() * s).collect()
        })
        .collect()
}

fn sgd(momentum: f64, nesterov: bool, weight_decay: f64) -> checked::Optimizer {
    checked::Optimizer::Sgd {
        lr: 0.1,
        momentum,
        nesterov,
        weight_decay,
    }
}

fn optimizers() -> Vec<(&'static str, checked::Optimizer)> {
    let (lr, betas, eps, weight_decay) = (0.01, [0.9, 0.999], 1e-8, 0.05);
    vec![
        ("sgd", sgd(0.0, false, 0.0)),
        ("sgd wd", sgd(0.0, false, 0.01)),
        ("sgd momentum", sgd(0.9, false, 0.0)),
        ("sgd momentum wd", sgd(0.9, false, 0.01)),
        ("sgd nesterov wd", sgd(0.9, true, 0.01)),
        (
            "adam",
            checked::Optimizer::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            },
        ),
        (
            "adamw",
            checked::Optimizer::AdamW {
                lr,
                betas,
                eps,
                weight_decay,
            },
        ),
    ]
}

/// The policies, and whether each fires on the test's gradients. The global
/// norm is about 5.5 (layer 1: ~5.5, layer 0: ~0.07, layer 2: ~1.7).
fn policies() -> Vec<(Clip, bool)> {
    vec![
        (Clip::None, false),
        (Clip::Norm(100.0), false),
        (Clip::Norm(1.0), true),
        (Clip::Value(0.25), true),
        (Clip::LayerNorm(1.0), true),
    ]
}

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "{what}: element {i}: jit {a:e} vs rust {b:e}"
        );
    }
}

fn same_outcome(got: &ClipOutcome, want: &ClipOutcome, what: &str) {
    assert_eq!(got.fired, want.fired, "{what}: fired");
    let ok = got.norm == want.norm
        || (got.norm.is_nan() && want.norm.is_nan())
        || (got.norm - want.norm).abs() <= 1e-6 * want.norm.abs();
    assert!(ok, "{what}: norm jit {} vs rust {}", got.norm, want.norm);
}

/// Parameters, every state tensor and the step count.
fn same_state(p: (&Params, &Optimizer), q: (&Params, &Optimizer), what: &str) {
    for i in 0..p.0.len() {
        same_bits(p.0.data(i), q.0.data(i), &format!("{what}: parameter {i}"));
    }
    assert_eq!(p.1.steps(), q.1.steps(), "{what}: steps");
    for k in 0..p.1.num_params() {
        for (slot, name) in p.1.state_names().iter().enumerate() {
            same_bits(
                p.1.state(k, slot),
                q.1.state(k, slot),
                &format!("{what}: {name} of {k}"),
            );
        }
    }
}

#[test]
fn fused_update_equals_the_rust_update() {
    let model = model();
    let specs = specs();
    for threads in [1, 2] {
        let mut jit = Jit::new(&model, 0.0, threads);
        for (name, cfg) in optimizers() {
            for (policy, fires) in policies() {
                let what = format!("{name}, {policy:?}, {threads} threads");
                let p0 = Params::init(&specs, 5).unwrap();
                let layer_of = p0.trainable_layers();
                let (mut pj, mut pr) = (p0.clone(), p0);
                let mut oj = Optimizer::new(&cfg, &specs);
                let mut or = oj.clone();
                let (mut sj, mut sr) = (ClipStats::default(), ClipStats::default());
                let mut rng = Rng(0x5eed ^ threads as u64);
                for (t, lr) in [0.1f32, 0.05, 0.08, 0.02].into_iter().enumerate() {
                    let what = format!("{what}, step {}", t + 1);
                    let g = grads(&pj, &mut rng);
                    let sq: Vec<f64> = g
                        .iter()
                        .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
                        .collect();
                    if let (Clip::LayerNorm(_), (_, ClipAction::Scale(s))) =
                        (&policy, clip_action(&sq, &layer_of, &policy))
                    {
                        assert!(
                            s.iter().any(Option::is_none),
                            "{what}: some layer not clipped"
                        );
                    }
                    let want = Reference
                        .update(&mut pr, &mut or, g.clone(), &layer_of, &policy, lr)
                        .unwrap();
                    let got = jit
                        .update(&mut pj, &mut oj, g, &layer_of, &policy, lr)
                        .unwrap();
                    assert_eq!(want.fired, fires, "{what}: the case fires as designed");
                    same_outcome(&got, &want, &what);
                    same_state((&pj, &oj), (&pr, &or), &what);
                    sj.record(&got);
                    sr.record(&want);
                }
                assert_eq!(
                    (sj.steps, sj.fired, sj.nonfinite),
                    (sr.steps, sr.fired, sr.nonfinite),
                    "{what}: clip stats"
                );
                assert!(
                    (sj.max_norm - sr.max_norm).abs() <= 1e-6 * sr.max_norm,
                    "{what}"
                );
                assert!(
                    (sj.sum_norm - sr.sum_norm).abs() <= 1e-6 * sr.sum_norm,
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn nonfinite_gradients_are_not_scaled_and_propagate_alike() {
    let model = model();
    let specs = specs();
    let mut jit = Jit::new(&model, 0.0, 1);
    for (name, cfg) in optimizers() {
        for policy in [Clip::Norm(1.0), Clip::LayerNorm(1.0), Clip::Value(0.25)] {
            let what = format!("{name}, {policy:?}");
            let p0 = Params::init(&specs, 9).unwrap();
            let layer_of = p0.trainable_layers();
            let (mut pj, mut pr) = (p0.clone(), p0);
            let mut oj = Optimizer::new(&cfg, &specs);
            let mut or = oj.clone();
            let mut rng = Rng(77);
            for (t, bad) in [f32::INFINITY, f32::NAN].into_iter().enumerate() {
                let mut g = grads(&pj, &mut rng);
                g[2][500] = bad;
                let want = Reference
                    .update(&mut pr, &mut or, g.clone(), &layer_of, &policy, 0.1)
                    .unwrap();
                let got = jit
                    .update(&mut pj, &mut oj, g, &layer_of, &policy, 0.1)
                    .unwrap();
                let what = format!("{what}, step {}", t + 1);
                assert!(!want.norm.is_finite(), "{what}");
                same_outcome(&got, &want, &what);
                same_state((&pj, &oj), (&pr, &or), &what);
            }
        }
    }
}

#[test]
fn mismatched_gradients_are_an_error_and_change_nothing() {
    let model = model();
    let specs = specs();
    let mut jit = Jit::new(&model, 0.0, 1);
    let mut p = Params::init(&specs, 1).unwrap();
    let before = p.clone();
    let mut opt = Optimizer::new(&sgd(0.9, false, 0.0), &specs);
    let layer_of = p.trainable_layers();
    let mut g = grads(&p, &mut Rng(3));
    g[1].pop();
    assert!(jit
        .update(&mut p, &mut opt, g, &layer_of, &Clip::None, 0.1)
        .is_err());
    g = grads(&p, &mut Rng(3));
    g.pop();
    assert!(jit
        .update(&mut p, &mut opt, g, &layer_of, &Clip::None, 0.1)
        .is_err());
    assert_eq!(opt.steps(), 0);
    for i in 0..p.len() {
        assert_eq!(p.data(i), before.data(i));
    }
}
