//! `cnnc run` with an `explain` section and `cnnc explain` on saved weights, end to
//! end on a tiny model and the synthetic `shapes` data: every output file is
//! there and well-formed, the evaluation is complete, explaining saved weights
//! gives the maps the run wrote and leaves the checkpoint alone, and bad input is
//! a clear error that leaves the user's files alone.

mod common;

use common::{cnnc, fresh_dir, text};
use ndarray::Array2;
use ndarray_npy::ReadNpyExt;
use std::path::{Path, PathBuf};

const TINY: &str = "model Tiny {
  input image: [3, 16, 16]
  conv c1(6, kernel=3, pad=1, bias=false)
  batchnorm
  relu
  maxpool(2)
  conv features(8, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(3)
}
train {
  data = shapes(n=60, size=16, color=rgb, classes=3)
  batch = 16
  epochs = 1
  optimizer = adam(lr=0.01)
  seed = 3
}
explain {
  saliency on test[0..3] -> \"sal\"
  smoothgrad(samples=3, noise=0.1) on test[0, 2] class=label
  integrated_gradients(steps=4, baseline=blur) on test[1..3]
  cam layer=features on test[0..3] class=label
  gradcam layer=c1 on train[5, 7] class=1 -> \"gc\"
}
";

fn write_model(d: &Path, src: &str) -> String {
    let f = d.join("tiny.cnn");
    std::fs::write(&f, src).unwrap();
    f.to_string_lossy().into_owned()
}

fn read_map(p: &Path) -> Array2<f32> {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Array2::<f32>::read_npy(f).unwrap()
}

/// (folder, sample names) of each directive of `TINY`.
const OUTPUTS: [(&str, &[&str]); 5] = [
    ("sal", &["test-0", "test-1", "test-2"]),
    ("smoothgrad", &["test-0", "test-2"]),
    ("integrated_gradients", &["test-1", "test-2"]),
    ("cam", &["test-0", "test-1", "test-2"]),
    ("gc", &["train-5", "train-7"]),
];

#[test]
fn run_writes_maps_images_masks_evaluation_and_a_page() {
    let d = dir("run");
    let f = write_model(&d, TINY);
    let out = d.join("run");
    let r = cnnc(&["run", &f, "--out", out.to_str().unwrap()]);
    let stdout = text(&r.stdout);
    assert!(r.status.success(), "{}{}", stdout, text(&r.stderr));
    assert!(stdout.contains("inference mode"), "{stdout}");
    let ex = out.join("explain");
    let page = std::fs::read_to_string(ex.join("index.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    for (folder, samples) in OUTPUTS {
        assert!(
            ex.join(folder).join("grid.png").is_file(),
            "{folder}/grid.png"
        );
        for s in samples {
            let map = read_map(&ex.join(folder).join(format!("{s}.npy")));
            assert_eq!(map.shape(), &[16, 16], "{folder}/{s}.npy is H×W");
            assert!(map.iter().all(|v| v.is_finite()), "{folder}/{s}.npy");
            for png in [format!("{s}.png"), format!("{s}.heat.png")] {
                let img = image::open(ex.join(folder).join(&png)).unwrap();
                assert!(img.width() >= 64, "{folder}/{png} is upscaled for viewing");
                assert!(
                    page.contains(&format!("{folder}/{png}")),
                    "the page shows {folder}/{png}"
                );
            }
            assert!(ex.join("inputs").join(format!("{s}.png")).is_file());
            let mask = read_map(&ex.join("masks").join(format!("{s}.npy")));
            assert_eq!(mask.shape(), &[16, 16]);
            assert!(mask.iter().any(|&v| v == 1.0) && mask.iter().all(|&v| v == 0.0 || v == 1.0));
        }
    }
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ex.join("evaluation.json")).unwrap())
            .unwrap();
    assert_eq!(ev["mode"], "inference");
    let dirs = ev["directives"].as_array().unwrap();
    assert_eq!(dirs.len(), 5);
    for (d, (folder, samples)) in dirs.iter().zip(OUTPUTS) {
        assert_eq!(d["output"], folder);
        assert_eq!(d["samples"], samples.len());
        let pg = d["pointing_game"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&pg));
        for key in [
            "deletion_auc",
            "deletion_auc_random",
            "insertion_auc",
            "insertion_auc_random",
        ] {
            let v = d[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{folder}: {key} = {v}");
        }
        // One cascade step per layer with parameters: fc, features, batchnorm, c1.
        let cascade = d["randomisation"].as_array().unwrap();
        let layers: Vec<&str> = cascade
            .iter()
            .map(|s| s["layer"].as_str().unwrap())
            .collect();
        assert_eq!(layers, ["fc", "features", "batchnorm1", "c1"], "{folder}");
    }
    assert!(
        dirs[2]["completeness_gap"].as_f64().is_some(),
        "IG reports completeness"
    );
}

#[test]
fn explain_on_saved_weights_gives_the_runs_maps_and_leaves_the_checkpoint_alone() {
    let d = dir("saved");
    let f = write_model(&d, TINY);
    let run = d.join("run");
    let r = cnnc(&["run", &f, "--out", run.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let ckpt = run.join("checkpoints/final.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    let again = d.join("again");
    let r = cnnc(&[
        "explain",
        &f,
        "--weights",
        ckpt.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--no-evaluation",
    ]);
    assert!(r.status.success(), "{}{}", text(&r.stdout), text(&r.stderr));
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the weights are only read"
    );
    assert!(
        !again.join("explain/evaluation.json").exists(),
        "--no-evaluation"
    );
    for (folder, samples) in OUTPUTS {
        for s in samples {
            let name = format!("explain/{folder}/{s}.npy");
            assert_eq!(
                read_map(&run.join(&name)),
                read_map(&again.join(&name)),
                "{name}"
            );
        }
    }
    // The interpreter gives the same maps up to rounding.
    let interp = d.join("interp");
    let r = cnnc(&[
        "explain",
        &f,
        "--weights",
        ckpt.to_str().unwrap(),
        "--out",
        interp.to_str().unwrap(),
        "--no-evaluation",
        "--backend",
        "interp",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    for (folder, samples) in OUTPUTS {
        for s in samples {
            let name = format!("explain/{folder}/{s}.npy");
            let (a, b) = (read_map(&run.join(&name)), read_map(&interp.join(&name)));
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = a
                .iter()
                .zip(&b)
                .fold(0.0f32, |m, (u, v)| m.max((u - v).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "{name}: jit and interp differ by {diff}"
            );
        }
    }
}

#[test]
fn bad_explain_input_is_a_clear_error() {
    let d = dir("bad");
    let f = write_model(&d, TINY);
    let run = d.join("run");
    let r = cnnc(&["run", &f, "--out", run.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let ckpt = run.join("checkpoints/final.safetensors");
    let ckpt = ckpt.to_str().unwrap();

    // A sample past the end of the split (shapes(n=60) has 12 test images).
    let far = TINY.replace("saliency on test[0..3]", "saliency on test[40]");
    let far_f = d.join("far.cnn");
    std::fs::write(&far_f, &far).unwrap();
    let out = d.join("far-out");
    let r = cnnc(&[
        "explain",
        far_f.to_str().unwrap(),
        "--weights",
        ckpt,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let err = text(&r.stderr);
    assert!(
        err.contains("test[40]") && err.contains("12 images"),
        "{err}"
    );

    // A file without an explain section.
    let plain = TINY.split("explain {").next().unwrap().to_string();
    let plain_f = d.join("plain.cnn");
    std::fs::write(&plain_f, plain).unwrap();
    let r = cnnc(&["explain", plain_f.to_str().unwrap(), "--weights", ckpt]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        text(&r.stderr).contains("no `explain` section"),
        "{}",
        text(&r.stderr)
    );

    // Missing weights.
    let r = cnnc(&[
        "explain",
        &f,
        "--weights",
        d.join("nope.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));

    // An existing, non-empty --out is refused and left alone.
    let keep = d.join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("notes.txt"), "mine").unwrap();
    let r = cnnc(&[
        "explain",
        &f,
        "--weights",
        ckpt,
        "--out",
        keep.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        text(&r.stderr).contains("already exists"),
        "{}",
        text(&r.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(keep.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&keep).unwrap().count(), 1);

    // An unknown flag is a usage error.
    let r = cnnc(&["explain", &f, "--weights", ckpt, "--colour-map", "jet"]);
    assert_eq!(r.status.code(), Some(2));
}

/// A fresh folder for one test.
fn dir(test: &str) -> PathBuf {
    fresh_dir("explain", test)
}
