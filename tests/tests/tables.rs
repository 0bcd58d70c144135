//! Every example and every stdlib file checks without errors or warnings, and its
//! layer table (shapes, parameters, MACs, memory estimate) matches the golden file
//! in `tests/tables/`. `CNNC_BLESS=1` rewrites the golden files; read the diff.

use cnnc_compiler::pipeline::check_paths;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cnn_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            cnn_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "cnn") {
            out.push(p);
        }
    }
}

#[test]
fn examples_and_stdlib_check_and_match_their_tables() {
    let root = repo_root();
    let mut files = Vec::new();
    cnn_files(&root.join("examples"), &mut files);
    cnn_files(&root.join("stdlib"), &mut files);
    assert!(
        files.len() >= 8,
        "expected the examples and stdlib, found {files:?}"
    );
    let bless = std::env::var_os("CNNC_BLESS").is_some();
    let mut failures = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&root).unwrap();
        let fe = check_paths(std::slice::from_ref(path));
        if !fe.diags.is_empty() {
            let rendered = cnnc_runtime::render::human(&fe, 100, false);
            failures.push(format!(
                "{}: expected no diagnostics, got:\n{rendered}",
                rel.display()
            ));
            continue;
        }
        let checked = fe.files[0].checked.as_ref().expect("no errors, so checked");
        let table = cnnc_compiler::summary::render(checked);
        let golden = root.join("tests/tables").join(rel).with_extension("txt");
        if bless {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &table).unwrap();
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(expected) if expected == table => {}
            Ok(expected) => failures.push(format!(
                "{}: table differs from {} (CNNC_BLESS=1 to update)\n--- expected\n{expected}\n--- actual\n{table}",
                rel.display(),
                golden.display()
            )),
            Err(_) => failures.push(format!("{}: no golden table at {} (CNNC_BLESS=1 to create)", rel.display(), golden.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} files failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}
