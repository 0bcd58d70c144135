//! `--checked` end to end: a kernel miscompiled on purpose (`CNNC_TEST_FAULT`)
//! stops `cnnc bench --checked` with an internal error (exit code 3) naming the
//! kernel, the layer, the buffer and the layer's place in the file; without the
//! fault the checked run succeeds; `dump --stage clif --checked` shows the checks.

use std::path::Path;
use std::process::{Command, Output};

fn cnnc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnnc"));
    c.args(args)
        .env("NO_COLOR", "1")
        .env_remove("CNNC_TEST_FAULT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("cnnc runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TINY: &str = "model Tiny {
  input image: [1, 12, 12]
  conv c1(4, kernel=3, pad=1)
  relu
  maxpool pool(2)
  conv c2(8, kernel=3, pad=1)
  relu
  global_avg_pool
  linear fc(3)
}
train {
  data = folder(\"no-such-folder\")
  batch = 8
  optimizer = sgd(lr=0.01, momentum=0.9)
}
";

fn write(d: &Path) -> String {
    let f = d.join("tiny.cnn");
    std::fs::write(&f, TINY).unwrap();
    f.to_string_lossy().into_owned()
}

/// The name of the training plan's (one thread) maxpool kernel: `k2_maxpool`.
fn maxpool_kernel(file: &str) -> String {
    let plan = cnnc(&["dump", "--stage", "plan", "--threads", "1", file], &[]);
    let plan = text(&plan.stdout);
    let line = plan
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("maxpool"))
        .unwrap_or_else(|| panic!("no maxpool step in\n{plan}"));
    let k = line.split_whitespace().next().unwrap();
    format!("{k}_maxpool")
}

#[test]
fn a_miscompiled_kernel_is_an_internal_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path());
    let kernel = maxpool_kernel(&f);
    let bench = [
        "bench",
        "--checked",
        "--threads",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
    ];
    let args: Vec<&str> = bench.iter().copied().chain([f.as_str()]).collect();
    let fault = format!("{kernel}:1:4"); // the output, moved one element up
    let out = cnnc(&args, &[("CNNC_TEST_FAULT", &fault)]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    for want in [
        "error: internal error",
        &format!("checked JIT: kernel `{kernel}` (layer `pool`)"),
        "of buffer 1 (output 0",
        "layer `pool` (`maxpool`) is made at bytes",
        "of the model file",
        "this is a bug in cnnc",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    // Without the fault, the same checked run is fine.
    let out = cnnc(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn dump_clif_checked_shows_the_checks() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path());
    let clif = |checked: bool| {
        let mut args = vec!["dump", "--stage", "clif", "--threads", "1", f.as_str()];
        if checked {
            args.push("--checked");
        }
        let out = cnnc(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let (on, off) = (clif(true), clif(false));
    assert!(on.contains(" cold:") && on.contains("icmp ugt"), "{on}");
    if std::env::var_os("CNNC_CHECKED").is_none() {
        assert!(!off.contains(" cold:"), "{off}");
    }
}
