//! The front end's promises on any input, as a list of broken ones: every error
//! located, every label span inside its own file and on char boundaries, both
//! renderings succeed, one JSON line per diagnostic with the editor fields. The
//! fuzz targets `check` and `pipeline` assert that the list is empty.

use cnnc_compiler::pipeline::Frontend;
use cnnc_runtime::render;
use miette::Diagnostic;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The fields every `--message-format json` line has.
pub const JSON_FIELDS: &[&str] = &[
    "code", "severity", "message", "file", "start", "end", "line", "column",
];

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Every way `fe` breaks the front end's promises (empty when it keeps them).
pub fn violations(fe: &Frontend) -> Vec<String> {
    let mut out = Vec::new();
    if fe.has_errors()
        && !fe
            .diags
            .iter()
            .any(|d| d.is_error() && d.file.is_some() && d.primary_span().is_some())
    {
        let codes: Vec<String> = fe.diags.iter().map(|d| d.code_str()).collect();
        out.push(format!("errors reported ({codes:?}) but none is located"));
    }
    let n_files = fe.sources.files().count();
    for d in &fe.diags {
        let labels: Vec<_> = d.labels().map(|l| l.collect()).unwrap_or_default();
        let Some(id) = d.file else {
            if !labels.is_empty() {
                out.push(format!("{}: labels without a file", d.code_str()));
            }
            continue;
        };
        if id.0 as usize >= n_files {
            out.push(format!("{}: file id {} of {n_files}", d.code_str(), id.0));
            continue;
        }
        let text = &fe.sources.get(id).text;
        for l in labels {
            let start = l.offset();
            let end = start.saturating_add(l.len());
            if end > text.len() || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
                out.push(format!(
                    "{} `{d}`: span {start}..{end} outside or inside a character of a {}-byte file",
                    d.code_str(),
                    text.len()
                ));
            }
        }
    }
    match catch_unwind(AssertUnwindSafe(|| render::human(fe, 80, false))) {
        Err(p) => out.push(format!("render::human panicked: {}", panic_message(&*p))),
        Ok(h) if !fe.diags.is_empty() && h.trim().is_empty() => {
            out.push("render::human is empty although there are diagnostics".into());
        }
        Ok(_) => {}
    }
    match catch_unwind(AssertUnwindSafe(|| render::json(fe))) {
        Err(p) => out.push(format!("render::json panicked: {}", panic_message(&*p))),
        Ok(json) => {
            if json.lines().count() != fe.diags.len() {
                out.push(format!(
                    "render::json wrote {} lines for {} diagnostics",
                    json.lines().count(),
                    fe.diags.len()
                ));
            }
            for line in json.lines() {
                match serde_json::from_str::<serde_json::Value>(line) {
                    Err(e) => out.push(format!("JSON line does not parse ({e}): {line}")),
                    Ok(v) => {
                        for f in JSON_FIELDS {
                            if v.get(f).is_none() {
                                out.push(format!("JSON line lacks `{f}`: {line}"));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The rendered diagnostics of `fe`, for failure messages.
pub fn rendered(fe: &Frontend) -> String {
    render::human(fe, 100, false)
}
