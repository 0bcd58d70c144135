//! `cnnc bench` end to end on a tiny model: the `--json` object has every field
//! scripts rely on (bench/compare.py among them) with positive times, the human
//! block is printed, no data file is read, and bad input is an error, not a panic.

mod common;

use common::{cnnc, text};
use std::path::Path;

/// The data folder does not exist: bench uses synthetic batches only.
const TINY: &str = "model Tiny {
  input image: [1, 12, 12]
  conv c1(4, kernel=3, pad=1, bias=false)
  batchnorm
  relu
  maxpool(2)
  conv c2(8, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(3)
}
train {
  data = folder(\"no-such-folder\")
  batch = 8
  optimizer = sgd(lr=0.01, momentum=0.9)
  clip = norm(1.0)
}
";

fn write(d: &Path, name: &str, src: &str) -> String {
    let f = d.join(name);
    std::fs::write(&f, src).unwrap();
    f.to_string_lossy().into_owned()
}

fn positive_spread(v: &serde_json::Value, key: &str) {
    let s = &v[key];
    let (med, min, max) = (
        s["median"].as_f64().unwrap_or(-1.0),
        s["min"].as_f64().unwrap_or(-1.0),
        s["max"].as_f64().unwrap_or(-1.0),
    );
    assert!(min > 0.0 && min <= med && med <= max, "{key}: {s}");
}

/// `--json` of the default (JIT) backend on one thread.
#[test]
fn json_has_every_field_with_positive_times() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "tiny.cnn", TINY);
    let out = cnnc(&[
        "bench",
        &f,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    positive_spread(&v, "train_step_ms");
    positive_spread(&v, "infer_ms");
    for key in ["compile_ms", "first_step_ms", "train_images_per_sec"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    if cfg!(target_os = "linux") {
        assert!(v["peak_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    } else {
        assert!(v["peak_bytes"].is_u64() || v["peak_bytes"].is_null(), "{v}");
    }
    assert_eq!(v["backend"], "jit");
    assert_eq!(v["threads"], 1);
    assert!(v["arena_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    let kernels = v["kernels"].as_array().expect("kernels");
    assert!(kernels.len() >= 10, "a kernel per step of the plan: {v}");
    assert!(
        kernels
            .iter()
            .any(|k| k["name"].as_str().unwrap_or("").contains("conv2d")
                && k["name"].as_str().unwrap_or("").ends_with("@c1")),
        "{v}"
    );
    assert!(
        v["isa"]["used"]
            .as_str()
            .unwrap_or("")
            .contains("cranelift"),
        "{v}"
    );
    assert_eq!(v["batch"], 8);
    assert_eq!(v["steps"], 2);
    assert_eq!(v["model"], "Tiny");
    for key in ["avx", "avx2", "fma", "avx512f"] {
        assert!(v["isa"][key].is_boolean(), "isa.{key}: {v}");
    }
    assert!(v["isa"]["used"].is_string(), "{v}");
    assert!(v["last_loss"].as_f64().is_some_and(f64::is_finite), "{v}");
}

/// `--explain` times one image's saliency and CAM (the CAM of the map fed to
/// global_avg_pool); a model without global_avg_pool then linear has no CAM.
#[test]
fn explain_flag_times_saliency_and_cam() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "tiny.cnn", TINY);
    let out = cnnc(&[
        "bench",
        &f,
        "--steps",
        "3",
        "--warmup",
        "1",
        "--explain",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    positive_spread(&v["explain"], "saliency_ms");
    positive_spread(&v["explain"], "cam_ms");
    assert_eq!(v["explain"]["cam_layer"], "relu2", "{v}");
    let without = cnnc(&["bench", &f, "--steps", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text(&without.stdout)).unwrap();
    assert!(v["explain"].is_null(), "only with --explain: {v}");

    let flat = TINY.replace("  global_avg_pool\n", "  flatten\n");
    let f = write(d.path(), "flat.cnn", &flat);
    let out = cnnc(&["bench", &f, "--steps", "2", "--explain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("saliency") && stdout.contains("cam          not measured"),
        "{stdout}"
    );
}

#[test]
fn interpreter_runs_on_one_thread_whatever_is_asked() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "tiny.cnn", TINY);
    let out = cnnc(&[
        "bench",
        &f,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--backend",
        "interp",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "bench `Tiny`: interp backend, 1 thread, batch 8",
        "2 threads asked for",
        "compile",
        "train step",
        "inference",
        "peak memory",
        "isa",
        "per-kernel   not measured by the interpreter",
    ] {
        assert!(s.contains(want), "missing `{want}` in:\n{s}");
    }
}

#[test]
fn jit_human_block_has_the_kernel_table() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "tiny.cnn", TINY);
    let out = cnnc(&[
        "bench",
        &f,
        "--steps",
        "2",
        "--warmup",
        "0",
        "--threads",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "bench `Tiny`: jit backend, 2 threads, batch 8",
        "arena",
        "per-kernel",
        "batchnorm+relu @batchnorm1",
        "cranelift",
    ] {
        assert!(s.contains(want), "missing `{want}` in:\n{s}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let no_train = write(
        d.path(),
        "no_train.cnn",
        "model M {\n  input image: [1, 8, 8]\n  global_avg_pool\n  linear fc(2)\n}\n",
    );
    let out = cnnc(&["bench", &no_train, "--steps", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no `train` section"));

    let missing = d.path().join("missing.cnn");
    let out = cnnc(&["bench", &missing.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    let tiny = write(d.path(), "tiny.cnn", TINY);
    for bad in [["--steps", "0"], ["--threads", "0"], ["--backend", "gpu"]] {
        let out = cnnc(&["bench", &tiny, bad[0], bad[1]]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
}

/// A model past the JIT's per-tensor limit is refused before anything is
/// allocated or written: a user error (exit 1) that says what to change.
#[test]
fn a_model_too_large_for_the_jit_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    // One tensor (the 64 input images) of 576 M numbers, past the JIT's 2^29,
    // while the whole step (about 4.6 GB) fits in memory: the memory check
    // (`bad_input.rs`) lets it through.
    let huge = "model Flat {
  input image: [1, 3000, 3000]
  global_avg_pool
  linear fc(3)
}
train {
  data = folder(\"no-such-folder\")
  batch = 64
  optimizer = sgd(lr=0.01)
}
";
    let f = write(d.path(), "huge.cnn", huge);
    for cmd in [vec!["bench", &f], vec!["run", &f, "--out", "never"]] {
        let out = cnnc(&cmd);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains("too large for the JIT backend at batch 64"),
            "{err}"
        );
        assert!(err.contains("--backend interp"), "{err}");
        assert!(!err.contains("internal error"), "{err}");
    }
    assert!(!std::path::Path::new("never").exists());
}
