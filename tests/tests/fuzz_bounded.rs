//! A bounded run of every fuzz target in CI, on the same bodies cargo-fuzz
//! calls (`cnnc_tests::{check, pipeline, jit_vs_interp}`; see `fuzz/README.md`
//! for the long, coverage-guided runs):
//!
//! - `pipeline_on_a_fixed_stream`: 150 inputs, a deterministic stream (seeded
//!   xorshift) of mildly mutated examples, stdlib files and generated models:
//!   numbers made small, lines deleted, duplicated or swapped, the `train`
//!   block dropped and the input resized, layer lines inserted. Enough of them
//!   must check and reach the JIT for the stream to stay useful.
//! - `jit_vs_interp_on_a_fixed_stream`: 250 random byte strings, each a model
//!   (training, evaluation or input-gradient graph, f32 and f64).
//! - `generated_models_check`: 400 more generated models all check.
//! - `regressions`: every file in `tests/fuzz/regressions/<target>/` through its
//!   target (the corpus of past crashes; see the README there), and every
//!   front-end regression of `tests/robustness/regressions/` through `pipeline`.
//!
//! Each input runs on a worker thread with an 8 MiB stack (the `cnnc` main
//! thread's); the test thread watches it, so a hang is reported, not waited
//! for. Failing inputs are written to `$CARGO_TARGET_TMPDIR/fuzz-failures/` to
//! be re-run with `cargo fuzz run <target> <file>` or added as regressions.

use cnnc_tests::frontend::panic_message;
use cnnc_tests::pipeline::Reached;
use cnnc_tests::{check, gen, jit_vs_interp, pipeline};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most one input may take (debug build); a hang is reported after it.
const TIME_LIMIT: Duration = Duration::from_secs(20);

/// The stack of the `cnnc` binary's main thread on Linux.
const STACK: usize = 8 << 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

// ---------------------------------------------------------------- runner

/// One input of a target.
struct Input {
    label: String,
    bytes: Vec<u8>,
}

/// What a target did with one input: `Err` with the message after a panic.
type Outcome<T> = Result<T, String>;

/// Runs `target` on every input on a worker thread; panics listing every
/// failure (a panic or a hang), after writing the failing inputs to
/// `$CARGO_TARGET_TMPDIR/fuzz-failures/<what>/`. Returns the outcomes.
fn run_stream<T: Send + 'static>(what: &str, inputs: Vec<Input>, target: fn(&[u8]) -> T) -> Vec<T> {
    let total = inputs.len();
    let inputs = std::sync::Arc::new(inputs);
    let worker_inputs = std::sync::Arc::clone(&inputs);
    let (tx, rx) = mpsc::channel::<(usize, Outcome<T>, Duration)>();
    let started = Instant::now();
    std::thread::Builder::new()
        .name(format!("fuzz-{what}"))
        .stack_size(STACK)
        .spawn(move || {
            for (i, input) in worker_inputs.iter().enumerate() {
                let t = Instant::now();
                let r = catch_unwind(AssertUnwindSafe(|| target(&input.bytes)))
                    .map_err(|p| panic_message(&*p));
                if tx.send((i, r, t.elapsed())).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the worker");

    let mut results = Vec::new();
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut slowest = (Duration::ZERO, 0);
    while results.len() + failures.len() < total {
        match rx.recv_timeout(TIME_LIMIT) {
            Ok((i, r, took)) => {
                if took > slowest.0 {
                    slowest = (took, i);
                }
                match r {
                    Ok(x) => results.push(x),
                    Err(msg) => failures.push((i, msg)),
                }
            }
            Err(_) => {
                let i = results.len() + failures.len();
                failures.push((
                    i,
                    format!(
                        "no result after {TIME_LIMIT:?}: hangs (the {} later inputs were not run)",
                        total - i - 1
                    ),
                ));
                break;
            }
        }
    }
    println!(
        "{what}: {} of {total} inputs in {:.1?}; slowest {:.1?}: {}",
        results.len() + failures.len(),
        started.elapsed(),
        slowest.0,
        inputs.get(slowest.1).map_or("-", |i| i.label.as_str())
    );
    if failures.is_empty() {
        return results;
    }
    let dump = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-failures/{what}"));
    let _ = std::fs::remove_dir_all(&dump);
    let _ = std::fs::create_dir_all(&dump);
    let mut msg = format!("{what}: {} of {total} inputs failed:\n", failures.len());
    for (n, (i, why)) in failures.iter().enumerate() {
        let file = dump.join(format!("{n:03}"));
        let _ = std::fs::write(&file, &inputs[*i].bytes);
        let _ = writeln!(
            msg,
            "\n[{n}] {}\n    {}\n    written to {}",
            inputs[*i].label,
            why.replace('\n', "\n    "),
            file.display()
        );
    }
    panic!("{msg}");
}

// ---------------------------------------------------------------- inputs

/// xorshift64*: deterministic choices, no timing.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The `.cnn` files under `dir`, sorted.
fn cnn_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            out.extend(cnn_files(&p));
        } else if p.extension().is_some_and(|e| e == "cnn") {
            out.push(p);
        }
    }
    out
}

/// Layer lines to insert, most of them valid after most layers.
const LAYER_LINES: &[&str] = &[
    "  relu",
    "  batchnorm",
    "  groupnorm(1)",
    "  maxpool(2)",
    "  avgpool(kernel=3, stride=1, pad=1)",
    "  conv(4, kernel=3, pad=same)",
    "  conv(4, kernel=1, stride=2)",
    "  depthwise(kernel=3, stride=2)",
    "  pointwise(3)",
    "  dropout(0.5)",
    "  detach",
    "  global_avg_pool",
    "  flatten",
    "  linear(10)",
    "  sigmoid",
];

/// One mild mutation of `text`, most of which keep it checking.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return text.to_string();
    }
    let at = rng.below(lines.len());
    match rng.below(8) {
        // A number made small.
        0 | 1 => {
            let numbered: Vec<usize> = (0..lines.len())
                .filter(|&i| {
                    !lines[i].trim_start().starts_with('#')
                        && lines[i].bytes().any(|b| b.is_ascii_digit())
                })
                .collect();
            if let Some(&i) = numbered.get(rng.below(numbered.len())) {
                let digits: Vec<(usize, usize)> = number_spans(&lines[i]);
                if let Some(&(s, e)) = digits.get(rng.below(digits.len())) {
                    let small = ["1", "2", "3", "4", "0", "8"][rng.below(6)];
                    lines[i].replace_range(s..e, small);
                }
            }
        }
        2 => {
            lines.remove(at);
        }
        3 => {
            let l = lines[at].clone();
            lines.insert(at, l);
        }
        4 if at + 1 < lines.len() => lines.swap(at, at + 1),
        // The train block dropped and the input made small.
        5 => {
            let start = lines
                .iter()
                .position(|l| l.trim_start().starts_with("train"));
            if let Some(s) = start {
                let end = (s..lines.len())
                    .find(|&i| lines[i].trim() == "}")
                    .unwrap_or(lines.len() - 1);
                lines.drain(s..=end);
            }
            if let Some(l) = lines
                .iter_mut()
                .find(|l| l.trim_start().starts_with("input"))
            {
                if let Some(open) = l.find('[') {
                    let (c, h, w) = (1 + rng.below(3), 2 + rng.below(10), 2 + rng.below(10));
                    l.replace_range(open.., &format!("[{c}, {h}, {w}]"));
                }
            }
        }
        _ => {
            let l = LAYER_LINES[rng.below(LAYER_LINES.len())];
            lines.insert(at, l.to_string());
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Byte ranges of the decimal integers in `line`.
fn number_spans(line: &str) -> Vec<(usize, usize)> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'_')
        {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

/// The pipeline stream: examples, stdlib files and generated models, each
/// mutated 0 to 3 times.
fn pipeline_inputs(n: usize) -> Vec<Input> {
    let root = repo();
    let mut files = cnn_files(&root.join("examples"));
    files.extend(cnn_files(&root.join("stdlib")));
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap_or(p).display().to_string();
            (rel, std::fs::read_to_string(p).expect("read a corpus file"))
        })
        .collect();
    assert!(!sources.is_empty(), "no examples found");
    let mut rng = Rng(0x5eed_f022);
    (0..n)
        .map(|i| {
            let (label, text) = if i % 2 == 0 {
                let (rel, text) = &sources[rng.below(sources.len())];
                (rel.clone(), text.clone())
            } else {
                let len = 4 + rng.below(60);
                let g = gen::model(&rng.bytes(len));
                (format!("generated model {i}"), g.text)
            };
            let k = rng.below(4);
            let text = (0..k).fold(text, |t, _| mutate(&mut rng, &t));
            Input {
                label: format!("{label}, {k} mutations (input {i})"),
                bytes: text.into_bytes(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------- tests

#[test]
fn pipeline_on_a_fixed_stream() {
    let outcomes = run_stream("pipeline", pipeline_inputs(150), pipeline::pipeline);
    let count = |r: Reached| outcomes.iter().filter(|&&o| o == r).count();
    let (front, lowered, ran) = (
        count(Reached::FrontEnd),
        count(Reached::Lowered),
        count(Reached::Ran),
    );
    println!(
        "pipeline: {front} stopped at the front end, {lowered} lowered only, {ran} compiled and run"
    );
    assert!(
        ran >= 40 && lowered + ran >= 55,
        "the stream has drifted: only {ran} of 150 inputs reached the JIT ({lowered} more were lowered)"
    );
}

#[test]
fn jit_vs_interp_on_a_fixed_stream() {
    let mut rng = Rng(0x0f_f1ce);
    let inputs = (0..250)
        .map(|i| {
            let len = 8 + rng.below(56);
            Input {
                label: format!("random bytes {i}"),
                bytes: rng.bytes(len),
            }
        })
        .collect();
    run_stream("jit_vs_interp", inputs, jit_vs_interp::jit_vs_interp);
}

/// Every generated model checks: the generator's shape arithmetic agrees with
/// the checker's (the `jit_vs_interp` target asserts it for each of its
/// inputs; this covers many more, cheaply).
#[test]
fn generated_models_check() {
    let mut rng = Rng(0xc4ec);
    for i in 0..400 {
        let len = rng.below(80);
        let bytes = rng.bytes(len);
        let g = gen::model(&bytes);
        let fe = cnnc_compiler::pipeline::check_text("generated.cnn", &g.text);
        assert!(
            !fe.has_errors(),
            "generated model {i} ({bytes:?}) does not check:\n{}\n{}",
            g.text,
            cnnc_tests::frontend::rendered(&fe)
        );
    }
}

/// The files of `tests/fuzz/regressions/<target>/` (README.md aside).
fn regression_inputs(target: &str) -> Vec<Input> {
    let dir = repo().join("tests/fuzz/regressions").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"));
    paths.sort();
    paths
        .into_iter()
        .map(|p| Input {
            label: p.display().to_string(),
            bytes: std::fs::read(&p).expect("read a regression"),
        })
        .collect()
}

#[test]
fn regressions() {
    run_stream("regressions-check", regression_inputs("check"), check);
    let mut pipeline_inputs = regression_inputs("pipeline");
    pipeline_inputs.extend(
        cnn_files(&repo().join("tests/robustness/regressions"))
            .into_iter()
            .map(|p| Input {
                label: p.display().to_string(),
                bytes: std::fs::read(&p).expect("read a regression"),
            }),
    );
    run_stream("regressions-pipeline", pipeline_inputs, pipeline::pipeline);
    run_stream(
        "regressions-jit_vs_interp",
        regression_inputs("jit_vs_interp"),
        jit_vs_interp::jit_vs_interp,
    );
}
