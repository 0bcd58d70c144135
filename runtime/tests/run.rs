//! End-to-end `cnnc run` and `cnnc eval` on a tiny model and synthetic data (fast
//! enough for a debug build): what the run folder holds, that the checkpoint
//! evaluates to the reported accuracy, that a run is reproducible bit for bit, and
//! that bad input is a clear error that leaves the user's files alone.

mod common;

use common::{cnnc, fresh_dir, text};
use std::path::{Path, PathBuf};

const TINY: &str = "model Tiny {
  input image: [1, 16, 16]
  conv c1(4, kernel=3, pad=1, bias=false)
  batchnorm
  relu
  maxpool(2)
  conv c2(8, kernel=3, pad=1)
  relu
  global_avg_pool
  dropout(0.1)
  linear fc(3)
}
train {
  data = shapes(n=60, size=16, color=grey, classes=3)
  augment = [hflip(p=0.5)]
  batch = 16
  epochs = 2
  optimizer = adam(lr=0.01)
  clip = norm(1.0)
  seed = 3
}
";

fn write_model(d: &Path, src: &str) -> String {
    let f = d.join("tiny.cnn");
    std::fs::write(&f, src).unwrap();
    f.to_string_lossy().into_owned()
}

#[test]
fn run_writes_metrics_and_checkpoints_that_eval_reads_back() {
    let d = dir("basic");
    let model = write_model(&d, TINY);
    let out = d.join("run");
    let o = cnnc(&["run", &model, "--out", &out.to_string_lossy()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let stdout = text(&o.stdout);
    assert!(stdout.contains("epoch   2/2"), "{stdout}");

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["epoch"], i as u64 + 1);
        for key in [
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "images_per_sec",
            "seconds",
        ] {
            let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} in {m}"));
            assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
        }
    }
    let weights = out.join("checkpoints/final.safetensors");
    assert!(out.join("checkpoints/final.optimizer.safetensors").exists());
    let o = cnnc(&[
        "eval",
        &model,
        "--weights",
        &weights.to_string_lossy(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let e: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(e["n"], 12, "shapes(n=60) holds out n/5 test images");
    // The checkpoint evaluates to what the last epoch reported.
    let reported = lines[1]["test_accuracy"].as_f64().unwrap();
    assert!(
        (e["accuracy"].as_f64().unwrap() - reported).abs() < 1e-9,
        "{e} vs {reported}"
    );
}

#[test]
fn the_same_seed_gives_bit_identical_weights() {
    let d = dir("repro");
    let model = write_model(&d, TINY);
    let mut files = Vec::new();
    for k in 0..2 {
        let out = d.join(format!("run{k}"));
        let o = cnnc(&[
            "run",
            &model,
            "--out",
            &out.to_string_lossy(),
            "--epochs",
            "1",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        files.push(std::fs::read(out.join("checkpoints/final.safetensors")).unwrap());
    }
    assert!(files[0] == files[1], "two runs with one seed differ");
}

#[test]
fn an_existing_run_folder_is_refused_and_left_alone() {
    let d = dir("exists");
    let model = write_model(&d, TINY);
    let out = d.join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = cnnc(&["run", &model, "--out", &out.to_string_lossy()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("already exists"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing else was written"
    );
}

#[test]
fn missing_data_is_a_clear_error() {
    let d = dir("nodata");
    let model = write_model(
        &d,
        &TINY
            .replace(
                "shapes(n=60, size=16, color=grey, classes=3)",
                "mnist(\"no-such-folder\")",
            )
            .replace("[1, 16, 16]", "[1, 28, 28]")
            .replace("linear fc(3)", "linear fc(10)"),
    );
    let o = cnnc(&["run", &model, "--out", &d.join("run").to_string_lossy()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("no-such-folder"), "{err}");
    assert!(
        !d.join("run").exists(),
        "no run folder for a run that could not start"
    );
}

#[test]
fn weights_of_another_model_are_refused_by_name() {
    let d = dir("mismatch");
    let model = write_model(&d, TINY);
    let out = d.join("run");
    let o = cnnc(&[
        "run",
        &model,
        "--out",
        &out.to_string_lossy(),
        "--epochs",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let other = d.join("other.cnn");
    std::fs::write(&other, TINY.replace("conv c2(8", "conv c2(6")).unwrap();
    let weights = out.join("checkpoints/final.safetensors");
    let o = cnnc(&[
        "eval",
        &other.to_string_lossy(),
        "--weights",
        &weights.to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("c2.weight"), "{}", text(&o.stderr));
}

/// A fresh folder for one test.
fn dir(test: &str) -> PathBuf {
    fresh_dir("run", test)
}
