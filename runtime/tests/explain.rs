//! The explanation methods on small models, where the right answer is known:
//! the JIT and the interpreter agree on every method; Grad-CAM is CAM divided by
//! the map's area when `global_avg_pool` follows the target directly; SmoothGrad
//! without noise is saliency; Integrated Gradients add up to the score
//! difference; the saliency of a linear model is its weights; a map behind a
//! `detach` is reported degenerate, never NaN; explaining leaves the weights
//! alone. The CLI end to end is in `explain_cli.rs`.

use cnnc_compiler::checked::{Baseline, CheckedModel, Method};
use cnnc_compiler::params::param_specs;
use cnnc_compiler::pipeline::check_text;
use cnnc_runtime::explain::methods::{self, Images, Maps};
use cnnc_runtime::explain::runner::Runner;
use cnnc_runtime::params::{Params, Tensor};
use cnnc_runtime::train::{BackendKind, Engine};

fn model(src: &str) -> CheckedModel {
    let fe = check_text("t.cnn", src);
    assert!(!fe.has_errors(), "{:?}", fe.diags);
    fe.files[0].checked.as_ref().unwrap().model.clone().unwrap()
}

/// Parameters with non-trivial batchnorm statistics and affine terms.
fn params(m: &CheckedModel, seed: u64) -> Params {
    let specs = param_specs(m);
    let mut p = Params::init(&specs, seed).unwrap();
    for (i, s) in specs.iter().enumerate() {
        let name = &s.name;
        let v: Option<Vec<f32>> =
            if name.ends_with("running_var") || name.ends_with(".weight") && s.shape.len() == 1 {
                Some(
                    (0..s.shape[0])
                        .map(|k| 0.5 + 0.1 * (k % 7) as f32)
                        .collect(),
                )
            } else if name.ends_with("running_mean")
                || name.ends_with(".bias") && s.shape.len() == 1 && name.contains("batchnorm")
            {
                Some(
                    (0..s.shape[0])
                        .map(|k| 0.05 * (k % 5) as f32 - 0.1)
                        .collect(),
                )
            } else {
                None
            };
        if let Some(v) = v {
            *p.get_mut(&specs[i].name).unwrap() = Tensor::F32(v);
        }
    }
    p
}

/// Deterministic images in [0, 1].
fn images(n: usize, shape: [usize; 3]) -> Vec<f32> {
    let len = n * shape.iter().product::<usize>();
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn engine(kind: BackendKind) -> Engine {
    Engine {
        kind,
        threads: 2,
        checked: false,
    }
}

fn compute(
    kind: BackendKind,
    m: &CheckedModel,
    p: &Params,
    method: &Method,
    x: &[f32],
    n: usize,
    classes: &[usize],
) -> Maps {
    let shape = [
        m.input[0] as usize,
        m.input[1] as usize,
        m.input[2] as usize,
    ];
    let mut r = Runner::new(m, engine(kind));
    let imgs = Images { x, n, shape };
    methods::compute(&mut r, p, method, &imgs, classes, 7, 0).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |a, &b| a.max(b.abs()))
}

const NET: &str = "model Net {
  input image: [3, 12, 10]
  conv c1(6, kernel=3, pad=1)
  batchnorm
  relu
  maxpool(2)
  conv features(8, kernel=3, pad=1, stride=1)
  relu
  global_avg_pool
  linear fc(4)
}
";

fn layer(m: &CheckedModel, name: &str) -> cnnc_compiler::checked::ValueId {
    m.value_by_name(name).unwrap()
}

#[test]
fn jit_and_interpreter_give_the_same_maps_for_every_method() {
    let m = model(NET);
    let p = params(&m, 5);
    let n = 5;
    let x = images(n, [3, 12, 10]);
    let classes = [0, 1, 2, 3, 1];
    let f = layer(&m, "features");
    let c1 = layer(&m, "c1");
    let all = [
        Method::Saliency,
        Method::SmoothGrad {
            samples: 3,
            noise: 0.2,
        },
        Method::IntegratedGradients {
            steps: 5,
            baseline: Baseline::Zero,
        },
        Method::IntegratedGradients {
            steps: 3,
            baseline: Baseline::Mean,
        },
        Method::IntegratedGradients {
            steps: 3,
            baseline: Baseline::Blur,
        },
        Method::Cam { layer: f },
        Method::GradCam { layer: f },
        Method::GradCam { layer: c1 },
    ];
    for method in &all {
        let a = compute(BackendKind::Jit, &m, &p, method, &x, n, &classes);
        let b = compute(BackendKind::Interp, &m, &p, method, &x, n, &classes);
        assert_eq!(a.maps.len(), n);
        // (A CAM may be all zero after its ReLU for some image; not all of them.)
        assert!(
            a.maps.iter().any(|m| max_abs(m) > 0.0),
            "{method:?}: every map is zero"
        );
        for (ma, mb) in a.maps.iter().zip(&b.maps) {
            assert_eq!(ma.len(), 12 * 10, "{method:?}: maps are the input's size");
            let scale = max_abs(mb).max(1e-6);
            let diff = ma
                .iter()
                .zip(mb)
                .fold(0.0f32, |d, (u, v)| d.max((u - v).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{method:?}: JIT and interpreter differ by {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn gradcam_is_cam_over_the_area_when_global_avg_pool_follows_the_target() {
    // s_c = Σ_k W[c,k] mean(A_k) + b_c, so ∂s_c/∂A_k = W[c,k] / hw everywhere:
    // Grad-CAM's weights are CAM's divided by hw, and so are the maps.
    let m = model(
        "model Net {
  input image: [2, 9, 9]
  conv c1(5, kernel=3, pad=1)
  tanh
  conv features(6, kernel=3, stride=2)
  global_avg_pool
  linear fc(3)
}
",
    );
    let p = params(&m, 11);
    let x = images(4, [2, 9, 9]);
    let classes = [0, 1, 2, 1];
    let f = layer(&m, "features");
    let hw = 4.0 * 4.0;
    for kind in [BackendKind::Jit, BackendKind::Interp] {
        let cam = compute(kind, &m, &p, &Method::Cam { layer: f }, &x, 4, &classes);
        let grad = compute(kind, &m, &p, &Method::GradCam { layer: f }, &x, 4, &classes);
        let mut nonzero = 0;
        for (c, g) in cam.maps.iter().zip(&grad.maps) {
            let scale = max_abs(c).max(1e-6);
            for (u, v) in c.iter().zip(g) {
                assert!(
                    (u - v * hw).abs() <= 1e-5 * scale,
                    "{kind:?}: cam {u} vs gradcam×hw {}",
                    v * hw
                );
            }
            nonzero += usize::from(max_abs(c) > 0.0);
        }
        assert!(nonzero >= 2, "the test needs maps that are not all zero");
    }
}

#[test]
fn smoothgrad_without_noise_is_saliency() {
    let m = model(NET);
    let p = params(&m, 2);
    let x = images(3, [3, 12, 10]);
    let classes = [3, 0, 2];
    let s = compute(BackendKind::Jit, &m, &p, &Method::Saliency, &x, 3, &classes);
    let sg = compute(
        BackendKind::Jit,
        &m,
        &p,
        &Method::SmoothGrad {
            samples: 4,
            noise: 0.0,
        },
        &x,
        3,
        &classes,
    );
    for (a, b) in s.maps.iter().zip(&sg.maps) {
        let scale = max_abs(a);
        assert!(scale > 0.0);
        for (u, v) in a.iter().zip(b) {
            assert!((u - v).abs() <= 1e-6 * scale, "{u} vs {v}");
        }
    }
    // With noise the maps change.
    let noisy = compute(
        BackendKind::Jit,
        &m,
        &p,
        &Method::SmoothGrad {
            samples: 4,
            noise: 0.3,
        },
        &x,
        3,
        &classes,
    );
    assert_ne!(noisy.maps, s.maps);
}

#[test]
fn integrated_gradients_add_up_to_the_score_difference() {
    // A smooth model: the midpoint rule converges fast, so the attributions sum
    // to s(x) − s(x') closely.
    let m = model(
        "model Smooth {
  input image: [2, 8, 8]
  conv c1(4, kernel=3, pad=1)
  tanh
  avgpool(2)
  conv c2(5, kernel=3, pad=1)
  sigmoid
  global_avg_pool
  linear fc(3)
}
",
    );
    let mut p = params(&m, 9);
    // Larger weights: scores that move with the input.
    for name in ["c1.weight", "c2.weight", "fc.weight"] {
        if let Some(Tensor::F32(v)) = p.get_mut(name) {
            v.iter_mut().for_each(|w| *w *= 4.0);
        }
    }
    let x = images(3, [2, 8, 8]);
    let classes = [0, 1, 2];
    for baseline in [Baseline::Zero, Baseline::Mean, Baseline::Blur] {
        let ig = compute(
            BackendKind::Jit,
            &m,
            &p,
            &Method::IntegratedGradients {
                steps: 64,
                baseline,
            },
            &x,
            3,
            &classes,
        );
        let gaps = ig.completeness_gap.expect("IG reports completeness");
        for (map, gap) in ig.maps.iter().zip(&gaps) {
            let total: f32 = map.iter().sum();
            let diff = total - gap; // s(x) − s(x')
            assert!(
                diff.abs() > 2e-3,
                "{baseline:?}: the test needs a score difference, not {diff}"
            );
            assert!(
                gap.abs() <= 0.01 * diff.abs(),
                "{baseline:?}: Σ map {total} vs s(x) − s(x') {diff}"
            );
        }
    }
}

#[test]
fn the_saliency_and_integrated_gradients_of_a_linear_model_are_known() {
    // s_c = W[c] · x + b_c: ∂s_c/∂x = W[c] whatever x, so saliency is
    // max over channels of |W[c]| and IG from zero is Σ_ch x ⊙ W[c], exactly.
    let m = model(
        "model Lin {
  input image: [2, 3, 4]
  flatten
  linear fc(3)
}
",
    );
    let p = params(&m, 4);
    let w = p.get("fc.weight").unwrap().as_f32().unwrap().to_vec(); // [3, 24]
    let x = images(2, [2, 3, 4]);
    let classes = [2, 1];
    let sal = compute(BackendKind::Jit, &m, &p, &Method::Saliency, &x, 2, &classes);
    let ig = compute(
        BackendKind::Jit,
        &m,
        &p,
        &Method::IntegratedGradients {
            steps: 1,
            baseline: Baseline::Zero,
        },
        &x,
        2,
        &classes,
    );
    for i in 0..2 {
        let wc = &w[classes[i] * 24..(classes[i] + 1) * 24];
        let xi = &x[i * 24..(i + 1) * 24];
        for px in 0..12 {
            let want = wc[px].abs().max(wc[12 + px].abs());
            assert!((sal.maps[i][px] - want).abs() < 1e-6, "saliency at {px}");
            let want_ig = xi[px] * wc[px] + xi[12 + px] * wc[12 + px];
            assert!((ig.maps[i][px] - want_ig).abs() < 1e-5, "IG at {px}");
        }
    }
}

#[test]
fn a_map_behind_detach_is_all_zero_and_finite() {
    let m = model(
        "model Cut {
  input image: [1, 8, 8]
  conv early(4, kernel=3, pad=1)
  relu
  detach
  conv c2(4, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(2)
}
",
    );
    let p = params(&m, 1);
    let x = images(2, [1, 8, 8]);
    let early = layer(&m, "early");
    for kind in [BackendKind::Jit, BackendKind::Interp] {
        for method in [Method::Saliency, Method::GradCam { layer: early }] {
            let r = compute(kind, &m, &p, &method, &x, 2, &[0, 1]);
            for map in &r.maps {
                assert_eq!(map.len(), 64);
                assert!(
                    map.iter().all(|v| *v == 0.0),
                    "{kind:?} {method:?}: no gradient reaches the map"
                );
                assert!(
                    cnnc_runtime::explain::render::normalize01(map).is_none(),
                    "reported as degenerate"
                );
            }
        }
    }
}

#[test]
fn explaining_reads_the_weights_and_changes_nothing() {
    let m = model(NET);
    let p = params(&m, 5);
    let before = p.clone();
    let x = images(2, [3, 12, 10]);
    let f = layer(&m, "features");
    for method in [
        Method::Saliency,
        Method::SmoothGrad {
            samples: 2,
            noise: 0.1,
        },
        Method::IntegratedGradients {
            steps: 2,
            baseline: Baseline::Zero,
        },
        Method::Cam { layer: f },
        Method::GradCam { layer: f },
    ] {
        compute(BackendKind::Jit, &m, &p, &method, &x, 2, &[0, 1]);
    }
    assert_eq!(p, before);
}

#[test]
fn batches_larger_than_the_largest_graph_are_split_and_padded() {
    // 70 images: one batch of 64 and one padded batch; the result must not
    // depend on how the images were batched.
    let m = model(NET);
    let p = params(&m, 3);
    let n = methods::MAX_BATCH + 6;
    let x = images(n, [3, 12, 10]);
    let classes: Vec<usize> = (0..n).map(|i| i % 4).collect();
    let all = compute(BackendKind::Jit, &m, &p, &Method::Saliency, &x, n, &classes);
    let len = 3 * 12 * 10;
    for i in [0, 63, 64, n - 1] {
        let one = compute(
            BackendKind::Jit,
            &m,
            &p,
            &Method::Saliency,
            &x[i * len..(i + 1) * len],
            1,
            &classes[i..=i],
        );
        let scale = max_abs(&one.maps[0]);
        for (u, v) in all.maps[i].iter().zip(&one.maps[0]) {
            assert!((u - v).abs() <= 1e-5 * scale, "image {i}: {u} vs {v}");
        }
    }
}
