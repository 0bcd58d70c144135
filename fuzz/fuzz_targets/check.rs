//! Fuzz target `check`: any bytes (invalid UTF-8 replaced by U+FFFD) through the
//! whole front end, `check_text` then both renderings. It fails on a panic and on
//! a broken promise: every error located, every label span inside its own file
//! and on char boundaries, every JSON line valid with the editor fields.
//! The same checks, on a fixed corpus, run in CI: `tests/tests/robustness.rs`.
#![no_main]

use cnnc_compiler::pipeline::{check_text, Frontend};
use cnnc_runtime::render;
use libfuzzer_sys::fuzz_target;
use miette::Diagnostic;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // A name in the current folder: `std/…` imports resolve to the built-in
    // standard library, other imports relative to where the fuzzer runs.
    let fe = check_text("fuzz-input.cnn", &text);
    check_spans(&fe);
    let human = render::human(&fe, 80, false);
    assert!(fe.diags.is_empty() || !human.trim().is_empty());
    let json = render::json(&fe);
    assert_eq!(json.lines().count(), fe.diags.len());
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line parses");
        for f in [
            "code", "severity", "message", "file", "start", "end", "line", "column",
        ] {
            assert!(v.get(f).is_some(), "JSON line lacks `{f}`: {line}");
        }
    }
});

fn check_spans(fe: &Frontend) {
    if fe.has_errors() {
        assert!(
            fe.diags
                .iter()
                .any(|d| d.is_error() && d.file.is_some() && d.primary_span().is_some()),
            "errors reported but none is located"
        );
    }
    for d in &fe.diags {
        let labels: Vec<_> = d.labels().map(|l| l.collect()).unwrap_or_default();
        let Some(id) = d.file else {
            assert!(labels.is_empty(), "{}: labels without a file", d.code_str());
            continue;
        };
        let text = &fe.sources.get(id).text;
        for l in labels {
            let (start, end) = (l.offset(), l.offset() + l.len());
            assert!(
                end <= text.len() && text.is_char_boundary(start) && text.is_char_boundary(end),
                "{} `{d}`: span {start}..{end} outside or inside a character of a {}-byte file",
                d.code_str(),
                text.len()
            );
        }
    }
}
