//! The graph IR as text: every example's graphs verify and round-trip through the
//! printer and parser, and pass tests written as text files (graph in → graph out,
//! `compiler/tests/passes/*.ir`) give their expected output. `CNNC_BLESS=1`
//! rewrites the expected part of each pass test; read the diff.

use cnnc_compiler::ir::autodiff::{backward, Seed};
use cnnc_compiler::ir::lower::{eval_graph, input_grad_graph, loss_graph, train_graph};
use cnnc_compiler::ir::text::{parse, print};
use cnnc_compiler::ir::verify::verify;
use cnnc_compiler::ir::{Graph, Vid};
use cnnc_compiler::pipeline::check_paths;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
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

fn round_trip(g: &Graph, what: &str) {
    verify(g).unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let text = print(g);
    let back = parse(&text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
    verify(&back).unwrap_or_else(|e| panic!("{what} (parsed): {e:?}"));
    assert_eq!(
        print(&back),
        text,
        "{what}: printing the parsed graph changes it"
    );
}

#[test]
fn every_example_lowers_and_its_graphs_round_trip() {
    let mut files = Vec::new();
    cnn_files(&repo().join("examples"), &mut files);
    assert!(!files.is_empty());
    for path in files {
        let fe = check_paths(std::slice::from_ref(&path));
        assert!(!fe.has_errors(), "{}: {:?}", path.display(), fe.diags);
        let model = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
        let name = path.display();
        round_trip(&loss_graph(&model, 4, 0.1), &format!("{name}: loss graph"));
        round_trip(
            &train_graph(&model, 4, 0.1),
            &format!("{name}: training graph"),
        );
        round_trip(&eval_graph(&model, 3), &format!("{name}: eval graph"));
        round_trip(
            &input_grad_graph(&model, 2),
            &format!("{name}: input-gradient graph"),
        );
    }
}

/// Runs one pass test file: a header (`# test autodiff`, `# seed: v`,
/// `# wrt: a, b`), the input graph, a line `----`, the expected graph.
fn run_pass_test(path: &Path, bless: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let (input, expected) = text.split_once("\n----\n").ok_or("no `----` separator")?;
    let header = |key: &str| {
        input
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {key}:")))
            .map(|v| v.trim().to_string())
    };
    if !input.lines().any(|l| l.trim() == "# test autodiff") {
        return Err("the header must say `# test autodiff`".into());
    }
    let mut g = parse(input)?;
    verify(&g).map_err(|e| format!("input graph: {e:?}"))?;
    let find = |g: &Graph, n: &str| {
        g.value_by_name(n)
            .or_else(|| g.output(n))
            .ok_or(format!("no value `{n}`"))
    };
    let seed = header("seed").ok_or("missing `# seed:`")?;
    let seed = match seed.split_once(" with ") {
        Some((v, gr)) => Seed::Value(find(&g, v.trim())?, find(&g, gr.trim())?),
        None => Seed::One(find(&g, &seed)?),
    };
    let wrt: Vec<Vid> = header("wrt")
        .ok_or("missing `# wrt:`")?
        .split(',')
        .map(|n| find(&g, n.trim()))
        .collect::<Result<_, _>>()?;
    let grads = backward(&mut g, &[seed], &wrt);
    for (v, gr) in wrt.iter().zip(grads) {
        if let Some(gr) = gr {
            let name = format!("grad:{}", g.values[v.0].name);
            g.outputs.push((name, gr));
        }
    }
    verify(&g).map_err(|e| format!("after autodiff: {e:?}"))?;
    let actual = print(&g);
    if bless {
        std::fs::write(path, format!("{input}\n----\n{actual}")).unwrap();
        return Ok(());
    }
    if actual.trim_end() != expected.trim_end() {
        return Err(format!("--- expected\n{expected}\n--- actual\n{actual}"));
    }
    Ok(())
}

#[test]
fn pass_tests() {
    let dir = repo().join("compiler/tests/passes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the pass tests in {}",
        dir.display()
    );
    let bless = std::env::var_os("CNNC_BLESS").is_some();
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| {
            run_pass_test(f, bless)
                .err()
                .map(|e| format!("{}: {e}", f.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
