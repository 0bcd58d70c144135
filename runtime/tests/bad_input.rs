//! Bad input through the `cnnc` binary: each is a clear error with exit code 1
//! (2 for a bad command line), never a panic, and nothing is created or
//! overwritten: broken MNIST files (missing, truncated, wrong magic, a label out
//! of range, the wrong image size), a model too big for this machine's memory
//! (refused from the check stage's estimate before any data is read).

mod common;

use common::{cnnc_in, fresh_dir, text};
use std::path::{Path, PathBuf};

/// An IDX file: magic, dimensions (big-endian u32), data.
fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

const IMAGES: u32 = 0x0000_0803;
const LABELS: u32 = 0x0000_0801;

/// A valid MNIST folder of `n` train and `n` test images of 28×28.
fn mnist(d: &Path, n: u32) {
    std::fs::create_dir_all(d).unwrap();
    let px = vec![7u8; (n * 28 * 28) as usize];
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for split in ["train", "t10k"] {
        std::fs::write(
            d.join(format!("{split}-images-idx3-ubyte")),
            idx(IMAGES, &[n, 28, 28], &px),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("{split}-labels-idx1-ubyte")),
            idx(LABELS, &[n], &labels),
        )
        .unwrap();
    }
}

const MODEL: &str = "model M {
  input image: [1, 28, 28]
  conv c1(4, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(10)
}
train {
  data = mnist(\"digits\")
  batch = 8
  epochs = 1
  optimizer = sgd(lr=0.01)
}
";

/// `cnnc run` in `d` on the model above; asserts exit 1, that stderr contains
/// every `needle`, and that no run folder was made.
fn run_fails(d: &Path, needles: &[&str]) {
    std::fs::write(d.join("m.cnn"), MODEL).unwrap();
    let r = cnnc_in(d, &["run", "m.cnn"]);
    let err = text(&r.stderr);
    assert_eq!(
        r.status.code(),
        Some(1),
        "stdout {}\nstderr {err}",
        text(&r.stdout)
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
    assert!(
        !d.join("runs").exists(),
        "no run folder for a run that could not start"
    );
}

#[test]
fn a_good_mnist_folder_trains() {
    // The baseline the broken variants below differ from.
    let d = dir("good");
    mnist(&d.join("digits"), 16);
    std::fs::write(d.join("m.cnn"), MODEL).unwrap();
    let r = cnnc_in(&d, &["run", "m.cnn"]);
    assert_eq!(r.status.code(), Some(0), "{}", text(&r.stderr));
    assert!(d.join("runs/m/checkpoints/final.safetensors").is_file());
}

#[test]
fn missing_data_is_named() {
    let d = dir("missing");
    run_fails(&d, &["not found", "digits"]);
    mnist(&d.join("digits"), 16);
    std::fs::remove_file(d.join("digits/t10k-labels-idx1-ubyte")).unwrap();
    run_fails(&d, &["t10k-labels"]);
}

#[test]
fn truncated_file_is_named_with_sizes() {
    let d = dir("truncated");
    mnist(&d.join("digits"), 16);
    let f = d.join("digits/train-images-idx3-ubyte");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    run_fails(&d, &["train-images-idx3-ubyte", "truncated"]);
}

#[test]
fn wrong_magic_is_named() {
    let d = dir("magic");
    mnist(&d.join("digits"), 16);
    let f = d.join("digits/train-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[3] = 0x03; // the images' magic in a labels file
    std::fs::write(&f, bytes).unwrap();
    run_fails(&d, &["train-labels-idx1-ubyte", "not an IDX"]);
}

#[test]
fn label_out_of_range_is_named() {
    let d = dir("label");
    mnist(&d.join("digits"), 16);
    let f = d.join("digits/t10k-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8 + 5] = 200;
    std::fs::write(&f, bytes).unwrap();
    run_fails(&d, &["t10k-labels-idx1-ubyte", "label 200 of item 5"]);
}

#[test]
fn wrong_image_size_is_named() {
    let d = dir("size");
    let digits = d.join("digits");
    mnist(&digits, 16);
    for split in ["train", "t10k"] {
        std::fs::write(
            digits.join(format!("{split}-images-idx3-ubyte")),
            idx(IMAGES, &[16, 32, 32], &vec![1u8; 16 * 32 * 32]),
        )
        .unwrap();
    }
    run_fails(&d, &["32×32"]);
}

#[test]
fn a_model_too_big_for_memory_is_refused_before_reading_data() {
    // About 400 GB of activations at this batch; no data folder exists, so the
    // refusal must come first.
    let d = dir("huge");
    let src = MODEL
        .replace("conv c1(4,", "conv c1(512,")
        .replace("batch = 8", "batch = 65536");
    std::fs::write(d.join("m.cnn"), src).unwrap();
    for backend in ["jit", "interp"] {
        let r = cnnc_in(&d, &["run", "m.cnn", "--backend", backend]);
        let err = text(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(
            err.contains("GiB available") && err.contains("smaller `batch`"),
            "{err}"
        );
        assert!(!d.join("runs").exists());
    }
}

#[test]
fn a_bad_command_line_is_a_usage_error() {
    let d = dir("usage");
    std::fs::write(d.join("m.cnn"), MODEL).unwrap();
    for args in [
        &["run", "m.cnn", "--epochz", "3"][..],
        &["run", "m.cnn", "--threads", "0"],
        &["run", "m.cnn", "--backend", "gpu"],
        &["eval", "m.cnn"],
        &["frobnicate"],
    ] {
        let r = cnnc_in(&d, args);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", text(&r.stderr));
    }
    assert!(!d.join("runs").exists());
}

/// A fresh folder for one test.
fn dir(test: &str) -> PathBuf {
    fresh_dir("bad", test)
}
