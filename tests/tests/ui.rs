//! Diagnostic snapshot tests: every `tests/ui/**/*.cnn` is checked, its rendered
//! diagnostics are compared with the `.stderr` (and, if present, `.json`) file
//! next to it, and the `# ~ CODE` markers in its source must match the
//! diagnostics. `CNNC_BLESS=1` rewrites the expected files; the markers are still
//! checked, so a blind re-bless is caught. See `tests/ui/README.md`.

use cnnc_compiler::pipeline::{self, Frontend};
use cnnc_runtime::{codes, render};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Width of the rendered snapshots.
const WIDTH: usize = 80;

/// Folders whose `.cnn` files are not cases of their own (files imported by cases).
const AUX_DIR: &str = "aux";

/// Codes that no ui case can carry a marker for, with the reason and where they
/// are tested instead.
const NOT_IN_UI: &[(&str, &str)] = &[
    (
        "E0001",
        "a file that cannot be read has no text to hold a marker; runtime/tests/cli.rs",
    ),
    (
        "E0701",
        "non-finite values occur while training (`cnnc run`); runtime/tests/health.rs",
    ),
    (
        "W0007",
        "vanishing gradients are measured while training (`cnnc run`); runtime/tests/health.rs",
    ),
    (
        "W0008",
        "exploding gradients are measured while training (`cnnc run`); runtime/tests/health.rs",
    ),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_path_buf()
}

/// Every case, as a path relative to the repository root, sorted.
fn cases() -> Vec<PathBuf> {
    let root = repo_root();
    let mut found = Vec::new();
    walk(&root.join("tests/ui"), &mut found);
    let mut cases: Vec<PathBuf> = found
        .into_iter()
        .filter_map(|p| p.strip_prefix(&root).ok().map(Path::to_path_buf))
        .collect();
    cases.sort();
    cases
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != AUX_DIR) {
                walk(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "cnn") {
            out.push(path);
        }
    }
}

/// A `# ~ CODE` comment: a diagnostic `code` is expected with its primary span
/// starting on `line` (1-based), or, for `# ~? CODE`, with no position at all.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Marker {
    line: Option<usize>,
    code: String,
}

/// The markers of one source text. `# ~ C` points at its own line, `# ~^ C` at the
/// line above (one `^` per line up), `# ~? C` at no line. Several codes may follow
/// one marker, separated by spaces or commas. `//` comments work as well as `#`.
fn markers(text: &str) -> Result<Vec<Marker>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(pos) = line.find("# ~").or_else(|| line.find("// ~")) else {
            continue;
        };
        let rest = &line[pos..];
        let rest = rest[rest.find('~').unwrap_or(0) + 1..].trim_start_matches(' ');
        let (target, codes) = if let Some(codes) = rest.strip_prefix('?') {
            (None, codes)
        } else {
            let up = rest.chars().take_while(|c| *c == '^').count();
            let line_no = (i + 1)
                .checked_sub(up)
                .filter(|l| *l >= 1)
                .ok_or_else(|| format!("line {}: marker points above the file", i + 1))?;
            (Some(line_no), &rest[up..])
        };
        let codes: Vec<&str> = codes
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .collect();
        if codes.is_empty() {
            return Err(format!("line {}: marker without a code", i + 1));
        }
        for code in codes {
            if codes::find(code).is_none() {
                return Err(format!(
                    "line {}: marker names unknown code `{code}`",
                    i + 1
                ));
            }
            out.push(Marker {
                line: target,
                code: code.to_string(),
            });
        }
    }
    Ok(out)
}

/// Reads a file as text for marker parsing; bytes that are not UTF-8 (a case for
/// E0002) do not hide the markers.
fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Checks markers against diagnostics, returning one message per mismatch.
/// Markers come from every source the case loaded (the case and its imports), and
/// from the case file itself when it could not be loaded.
fn check_markers(case: &Path, fe: &Frontend) -> Vec<String> {
    let mut problems = Vec::new();
    // (file name, marker) for every marker; file name None = the case itself when
    // it was not loaded (positionless markers only).
    let mut expected: Vec<(Option<String>, Marker)> = Vec::new();
    let case_name = display(case);
    let mut case_loaded = false;
    for (_, f) in fe.sources.files() {
        if f.path.is_none() {
            continue; // the built-in stdlib has no markers
        }
        case_loaded |= f.name == case_name;
        match markers(&f.text) {
            Ok(ms) => expected.extend(ms.into_iter().map(|m| (Some(f.name.clone()), m))),
            Err(e) => problems.push(format!("{}: {e}", f.name)),
        }
    }
    if !case_loaded {
        match markers(&read_lossy(case)) {
            Ok(ms) => expected.extend(ms.into_iter().map(|m| (None, m))),
            Err(e) => problems.push(format!("{case_name}: {e}")),
        }
    }

    // What each diagnostic offers: (file name, line or None, code, is_error).
    let actual: Vec<(Option<String>, Option<usize>, String, bool)> = fe
        .diags
        .iter()
        .map(|d| {
            let (file, line) = match (d.file, d.primary_span()) {
                (Some(id), Some((start, _))) => (
                    Some(fe.sources.get(id).name.clone()),
                    Some(fe.sources.line_col(id, start).0),
                ),
                (Some(id), None) => (Some(fe.sources.get(id).name.clone()), None),
                (None, _) => (None, None),
            };
            (file, line, d.code_str(), d.is_error())
        })
        .collect();

    let matches =
        |(mf, m): &(Option<String>, Marker),
         (af, al, ac, _): &(Option<String>, Option<usize>, String, bool)| {
            ac == &m.code
                && match m.line {
                    Some(line) => mf == af && *al == Some(line),
                    // Positionless: a diagnostic of that code without a position, from
                    // this file or from no file.
                    None => al.is_none() && (af.is_none() || mf == af),
                }
        };
    for m in &expected {
        if !actual.iter().any(|a| matches(m, a)) {
            let (file, marker) = m;
            let at = match marker.line {
                Some(l) => format!("{}:{l}", file.as_deref().unwrap_or(&case_name)),
                None => format!("{} (no position)", file.as_deref().unwrap_or(&case_name)),
            };
            problems.push(format!(
                "marker {} at {at} has no matching diagnostic",
                marker.code
            ));
        }
    }
    for a in &actual {
        let (file, line, code, is_error) = a;
        if *is_error && !expected.iter().any(|m| matches(m, a)) {
            let at = match (file, line) {
                (Some(f), Some(l)) => format!("{f}:{l}"),
                (Some(f), None) => format!("{f} (no position)"),
                (None, _) => "(no file)".to_string(),
            };
            problems.push(format!(
                "error {code} at {at} has no marker (add `# ~ {code}` on that line)"
            ));
        }
    }
    problems
}

/// `tests/ui/x/y.cnn` with forward slashes on every platform.
fn display(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Compares `actual` with the expected file, or writes it when blessing. A missing
/// expected file means "no output". Returns a failure message.
fn compare(expected_path: &Path, actual: &str, bless: bool) -> Option<String> {
    if bless {
        let result = if actual.is_empty() {
            match std::fs::remove_file(expected_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            std::fs::write(expected_path, actual)
        };
        return result
            .err()
            .map(|e| format!("cannot write {}: {e}", expected_path.display()));
    }
    let expected = std::fs::read_to_string(expected_path).unwrap_or_default();
    if expected == actual {
        return None;
    }
    Some(format!(
        "{} differs (- expected, + actual):\n{}",
        expected_path.display(),
        diff(&expected, actual)
    ))
}

/// A line diff (longest common subsequence), with two lines of context.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            ops.push(('+', b[j]));
            j += 1;
        } else {
            ops.push(('-', a[i]));
            i += 1;
        }
    }
    let near_change = |k: usize| {
        let lo = k.saturating_sub(2);
        let hi = (k + 2).min(ops.len() - 1);
        ops[lo..=hi].iter().any(|(c, _)| *c != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, line)) in ops.iter().enumerate() {
        if near_change(k) {
            let _ = writeln!(out, "  {c} {line}");
            skipped = false;
        } else if !skipped {
            out.push_str("    …\n");
            skipped = true;
        }
    }
    if !expected.is_empty()
        && !actual.is_empty()
        && expected.ends_with('\n') != actual.ends_with('\n')
    {
        out.push_str("  (the final newline differs)\n");
    }
    out
}

#[test]
fn ui() {
    let root = repo_root();
    // Cases are checked by their path relative to the repository root, so the
    // snapshots name `tests/ui/…` on every machine.
    std::env::set_current_dir(&root).expect("the repository root exists");
    let bless = std::env::var_os("CNNC_BLESS").is_some_and(|v| !v.is_empty() && v != "0");

    let cases = cases();
    assert!(!cases.is_empty(), "no cases under tests/ui");
    let mut failures: Vec<String> = Vec::new();
    for case in &cases {
        let fe = pipeline::check_paths(std::slice::from_ref(case));
        let mut problems = check_markers(case, &fe);

        let stderr = render::human(&fe, WIDTH, false);
        problems.extend(compare(&case.with_extension("stderr"), &stderr, bless));
        let json_path = case.with_extension("json");
        if json_path.exists() {
            problems.extend(compare(&json_path, &render::json(&fe), bless));
        }

        if !problems.is_empty() {
            let mut msg = format!("── {} ──\n", display(case));
            for p in problems {
                msg.push_str(&p);
                msg.push('\n');
            }
            failures.push(msg);
        }
    }
    if !failures.is_empty() {
        panic!(
            "\n{}\n{} of {} ui cases failed{}",
            failures.join("\n"),
            failures.len(),
            cases.len(),
            if bless {
                " (expected files were written; marker problems remain)"
            } else {
                "; if the new output is right, re-bless with CNNC_BLESS=1 after reading it"
            }
        );
    }
}

#[test]
fn every_code_has_a_ui_case() {
    let root = repo_root();
    let mut marked: BTreeSet<String> = BTreeSet::new();
    let mut all_files = Vec::new();
    walk_all_cnn(&root.join("tests/ui"), &mut all_files);
    for path in all_files {
        if let Ok(ms) = markers(&read_lossy(&path)) {
            marked.extend(ms.into_iter().map(|m| m.code));
        }
    }
    let exempt: BTreeSet<&str> = NOT_IN_UI.iter().map(|(c, _)| *c).collect();
    let missing: Vec<String> = codes::ALL
        .iter()
        .filter(|c| !marked.contains(c.code) && !exempt.contains(c.code))
        .map(|c| format!("  {}  {}", c.code, c.title))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} diagnostic codes have no ui case with a marker for them:\n{}",
        missing.len(),
        codes::ALL.len(),
        missing.join("\n")
    );
}

/// Every `.cnn` under `dir`, `aux/` folders included (their markers count).
fn walk_all_cnn(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk_all_cnn(&path, out);
        } else if path.extension().is_some_and(|e| e == "cnn") {
            out.push(path);
        }
    }
}

#[test]
fn marker_syntax() {
    let text = "conv(1) # ~ E0101\n\nrelu\n# ~^ E0102, W0002\n# ~^^^ E0103\n# ~? E0002\n";
    let got = markers(text).expect("valid markers");
    let want = |line, code: &str| Marker {
        line,
        code: code.to_string(),
    };
    assert_eq!(
        got,
        vec![
            want(Some(1), "E0101"),
            want(Some(3), "E0102"),
            want(Some(3), "W0002"),
            want(Some(2), "E0103"),
            want(None, "E0002"),
        ]
    );
    assert!(markers("# ~^ E0101").is_err(), "points above line 1");
    assert!(markers("x # ~ E9999").is_err(), "unknown code");
    assert!(markers("x # ~").is_err(), "no code");
}
