//! The `cnnc` binary's contract: exit codes (0 ok, 1 bad input, 2 usage, 3 bug),
//! where output goes, the JSON diagnostic format, `dump` and `explain-code`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn cnnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("CNNC_TEST_PANIC")
        .output()
        .expect("cnnc runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file with `contents` in a fresh folder of the system's temp dir.
fn temp_file(test: &str, name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnnc-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("temp file");
    path
}

const VALID: &str = "model M {\n  input x: [1, 28, 28]\n  conv c1(8, kernel=3, pad=1)\n  relu\n  global_avg_pool\n  linear(10)\n}\n";
const BROKEN: &str = "model M {\n  input x: [1, 28, 28]\n  conv c1(8,, kernel=3)\n}\n";

#[test]
fn help_lists_exit_codes() {
    let out = cnnc(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for line in [
        "0  success",
        "1  the input is wrong",
        "2  usage error",
        "3  internal error",
    ] {
        assert!(help.contains(line), "`{line}` missing from --help:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(cnnc(&[]).status.code(), Some(2));
    assert_eq!(cnnc(&["check"]).status.code(), Some(2));
    assert_eq!(cnnc(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        cnnc(&["check", "--message-format", "xml", "a.cnn"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn missing_file_is_e0001_exit_1() {
    let out = cnnc(&["check", "--color", "never", "no/such/file.cnn"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("E0001"), "{err}");
    assert!(
        err.contains("cannot read `no/such/file.cnn`: no such file"),
        "{err}"
    );
    assert!(err.ends_with("error: 1 error in 1 file\n"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn json_has_one_object_per_diagnostic() {
    let path = temp_file("json", "broken.cnn", BROKEN);
    let path_str = path.to_string_lossy().into_owned();
    let out = cnnc(&[
        "check",
        "--message-format",
        "json",
        &path_str,
        "missing.cnn",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty(), "json goes to stdout only");
    let stdout = text(&out.stdout);
    let objs: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let syntax = objs
        .iter()
        .find(|o| o["code"] == "E0101")
        .expect("the syntax error is reported");
    assert_eq!(syntax["severity"], "error");
    assert_eq!(syntax["file"], path_str.as_str());
    assert_eq!(syntax["line"], 3);
    assert_eq!(syntax["column"], 13);
    assert_eq!(
        syntax["start"],
        BROKEN.find(",,").map(|i| i + 1).unwrap_or(0)
    );
    assert!(syntax["labels"].as_array().is_some_and(|l| !l.is_empty()));
    let load = objs
        .iter()
        .find(|o| o["code"] == "E0001")
        .expect("the missing file is reported");
    assert_eq!(load["file"], "missing.cnn");
    assert!(load["line"].is_null() && load["start"].is_null());
    assert!(load["help"].is_null());
}

#[test]
fn colour_follows_the_flag() {
    let never = cnnc(&["check", "--color", "never", "missing.cnn"]);
    assert!(!text(&never.stderr).contains('\x1b'));
    let always = cnnc(&["check", "--color", "always", "missing.cnn"]);
    assert!(text(&always.stderr).contains('\x1b'));
    // `auto` on a pipe: no colour.
    let auto = cnnc(&["check", "missing.cnn"]);
    assert!(!text(&auto.stderr).contains('\x1b'));
}

#[test]
fn valid_file_checks_with_exit_0() {
    let path = temp_file("valid", "ok.cnn", VALID);
    let out = cnnc(&["check", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn dump_ast_prints_the_tree() {
    let path = temp_file("dump", "ok.cnn", VALID);
    let out = cnnc(&["dump", "--stage=ast", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let tree = text(&out.stdout);
    assert!(tree.starts_with("model M @0.."), "{tree}");
    assert!(tree.contains("\n  layer conv c1 @"), "{tree}");
    assert!(tree.contains("\n    arg kernel=3 @"), "{tree}");
}

#[test]
fn dump_ast_of_broken_file_prints_diagnostics() {
    let path = temp_file("dumpbad", "bad.cnn", BROKEN);
    let out = cnnc(&["dump", "--stage=ast", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("E0101"));
}

#[test]
fn dump_plan_and_clif_show_the_fused_kernels() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench/m1.cnn");
    let file = path.to_string_lossy();
    let out = cnnc(&["dump", "--stage=plan", "--threads", "2", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(plan.starts_with("plan train: "), "{plan}");
    assert!(plan.contains("2 threads"), "{plan}");
    for want in [
        "batchnorm+relu",
        "relu_grad+batchnorm_grad",
        "conv2d_grad_weight",
        "jit reduce",
        "native gemm",
    ] {
        assert!(plan.contains(want), "missing `{want}`:\n{plan}");
    }
    let out = cnnc(&["dump", "--stage=clif", "--threads", "1", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let clif = text(&out.stdout);
    assert!(
        clif.contains("; kernel k0_conv2d"),
        "{}",
        &clif[..clif.len().min(400)]
    );
    assert!(
        clif.contains("call_indirect"),
        "the conv kernel calls sgemm"
    );
    // A broken file: its diagnostics, exit 1.
    let bad = temp_file("dumpplan", "bad.cnn", BROKEN);
    let out = cnnc(&["dump", "--stage=plan", &bad.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn dump_graph_and_grad_print_the_training_graph() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench/m1.cnn");
    let out = cnnc(&["dump", "--stage=graph", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let graph = text(&out.stdout);
    assert!(graph.contains("= conv2d(x, c1.weight)"), "{graph}");
    assert!(!graph.contains("conv2d_grad_weight"), "{graph}");
    let out = cnnc(&["dump", "--stage=grad", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0));
    let grad = text(&out.stdout);
    assert!(grad.contains("conv2d_grad_weight"), "{grad}");
    assert!(grad.contains("output grad:c1.weight = "), "{grad}");
}

#[test]
fn explain_code_prints_the_doc_comment() {
    let out = cnnc(&["explain-code", "E0104"]);
    assert_eq!(out.status.code(), Some(0));
    let doc = text(&out.stdout);
    assert!(doc.starts_with("E0104 (error): unknown escape"), "{doc}");
    assert!(doc.contains("The escapes are"), "{doc}");
    // Case does not matter.
    assert_eq!(cnnc(&["explain-code", "e0104"]).stdout, out.stdout);
}

#[test]
fn explain_code_unknown_suggests() {
    let out = cnnc(&["explain-code", "E104"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("unknown code `E104`"), "{err}");
    assert!(err.contains("did you mean `E0104`?"), "{err}");
}

#[test]
fn explain_code_list_has_one_line_per_code() {
    let out = cnnc(&["explain-code", "--list"]);
    assert_eq!(out.status.code(), Some(0));
    let list = text(&out.stdout);
    assert_eq!(list.lines().count(), cnnc_runtime::codes::ALL.len());
    assert!(list.lines().any(|l| l.starts_with("E0101  ")), "{list}");
}

#[test]
fn closed_stdout_is_not_a_crash() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(["explain-code", "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnnc runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("cnnc ends");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_panic_is_an_internal_error_exit_3() {
    let out = Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .arg("--help")
        .env("CNNC_TEST_PANIC", "1")
        .output()
        .expect("cnnc runs");
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.starts_with("error: internal error: "), "{err}");
    assert!(err.contains("note: this is a bug in cnnc"), "{err}");
}
