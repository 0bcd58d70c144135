//! The `cnnc check` binary on broken variants of the examples: every variant
//! exits 0 (still valid) or 1 (with a located diagnostic), in both message
//! formats, and never 101 (a panic), 3 (an internal error) or a signal. The
//! library-level robustness suite (tests/tests/robustness.rs) runs far more
//! variants; this one checks what a user sees: exit codes and output.

use std::path::{Path, PathBuf};
use std::process::Command;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cnn"))
        .collect();
    v.sort();
    v
}

/// A few deterministic breakages of `src`: truncations, a deleted line, a
/// garbled number and name, and inserted garbage.
fn variants(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for frac in [3, 5, 7] {
        let mut cut = src.len() * frac / 10;
        while !src.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(src[..cut].to_string());
    }
    let lines: Vec<&str> = src.lines().collect();
    for k in [lines.len() / 3, lines.len() / 2] {
        let mut l = lines.clone();
        l.remove(k);
        out.push(l.join("\n"));
    }
    out.push(src.replacen("28", "-1", 1));
    out.push(src.replacen("16", "1e40", 1));
    out.push(src.replacen("conv", "cnov", 1));
    out.push(src.replacen('(', "((", 1));
    out.push(format!(
        "{}\u{1F642} }} ]] ((\n{}",
        &src[..src.len() / 2],
        &src[src.len() / 2..]
    ));
    out
}

#[test]
fn broken_examples_exit_1_with_a_located_diagnostic() {
    let dir = std::env::temp_dir().join(format!("cnnc-mutations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut runs = 0;
    for ex in examples() {
        let src = std::fs::read_to_string(&ex).unwrap();
        for (k, v) in variants(&src).into_iter().enumerate() {
            // Imports are `std/…` and `check` reads no data, so a temp folder works.
            let path = dir.join(format!(
                "{}-{k}.cnn",
                ex.file_stem().unwrap().to_string_lossy()
            ));
            std::fs::write(&path, &v).unwrap();
            for format in ["human", "json"] {
                let out = Command::new(env!("CARGO_BIN_EXE_cnnc"))
                    .args(["check", "--message-format", format])
                    .arg(&path)
                    .env("NO_COLOR", "1")
                    .output()
                    .unwrap();
                let code = out.status.code();
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    code == Some(0) || code == Some(1),
                    "{} variant {k} ({format}): exit {code:?}\n{stderr}\n--- source\n{v}",
                    ex.display()
                );
                if code == Some(1) {
                    let located = if format == "json" {
                        stdout.lines().any(|l| {
                            let d: serde_json::Value = serde_json::from_str(l).unwrap();
                            d["severity"] == "error" && d["line"].is_u64()
                        })
                    } else {
                        stderr.contains("╭─[")
                    };
                    assert!(
                        located,
                        "{} variant {k} ({format}): no located error\n{stderr}{stdout}",
                        ex.display()
                    );
                }
                runs += 1;
            }
            std::fs::remove_file(&path).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(runs >= 100, "only {runs} runs");
}
