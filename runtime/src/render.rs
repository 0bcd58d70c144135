//! Rendering front-end diagnostics for people (miette's graphical report) and for
//! editors (JSON, one object per line).
//!
//! Both renderings are stable: the ui snapshot tests (`tests/ui/`) compare them
//! byte for byte, and editors parse the JSON.

use cnnc_compiler::diag::{Diag, DiagKind, LoadError};
use cnnc_compiler::pipeline::Frontend;
use cnnc_compiler::source::SourceMap;
use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, Severity, SourceCode,
};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;

/// Every diagnostic of `fe`, rendered for a terminal `width` columns wide, then a
/// summary line (`error: 2 errors and 1 warning in 1 file`). Empty when there are
/// no diagnostics.
pub fn human(fe: &Frontend, width: usize, color: bool) -> String {
    let mut out = diagnostics(&fe.sources, &fe.diags, width, color);
    if let Some(line) = summary_line(fe) {
        if color {
            let (word, rest) = line.split_once(':').unwrap_or((&line, ""));
            let style = if word == "error" { "1;31" } else { "1;33" };
            out.push_str(&format!("\x1b[{style}m{word}\x1b[0m:{rest}\n"));
        } else {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// `diags` (their files in `sources`), each rendered as [`human`] does, without
/// the summary line: also for the diagnostics `cnnc run` raises while training
/// (gradient health, non-finite values).
pub fn diagnostics(sources: &SourceMap, diags: &[Diag], width: usize, color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    // Wrap help text at spaces only: paths (`std/blocks.cnn`) and arithmetic
    // (`3*(3-1)`) stay whole, so they can be copied.
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(width)
        .with_links(false)
        .with_word_separator(textwrap::WordSeparator::AsciiSpace)
        .with_word_splitter(textwrap::WordSplitter::NoHyphenation)
        .without_syntax_highlighting();

    let mut out = String::new();
    for diag in diags {
        let located = Located {
            diag,
            source: diag.file.map(|id| {
                let f = sources.get(id);
                FileSource {
                    name: &f.name,
                    text: &f.text,
                    line_starts: f.line_starts(),
                }
            }),
        };
        // miette can fail (or, on extreme lines, panic) while laying out a
        // snippet: fall back to a plain line rather than losing the diagnostic.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut one = String::new();
            handler.render_report(&mut one, &located).ok().map(|_| one)
        }));
        let one = match rendered {
            Ok(Some(one)) => one,
            _ => plain(sources, diag),
        };
        // No trailing spaces (miette pads empty source lines): snapshots survive
        // editors that strip them.
        for line in one.trim_end().lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// `E0401 file:line:col: message` and the help, when the graphical report fails.
fn plain(sources: &SourceMap, diag: &Diag) -> String {
    let at = match (diag.file, diag.primary_span()) {
        (Some(id), Some((start, _))) => {
            let (l, c) = sources.line_col(id, start);
            format!("{}:{l}:{c}: ", sources.get(id).name)
        }
        _ => String::new(),
    };
    let mut out = format!("{} {at}{diag}\n", diag.code_str());
    if let Some(help) = miette::Diagnostic::help(diag) {
        out.push_str(&format!("  help: {help}\n"));
    }
    out
}

/// `error: 3 errors and 1 warning in 2 files`, `warning: 1 warning in 1 file`, or
/// `None` without diagnostics. Files are those with at least one diagnostic.
pub fn summary_line(fe: &Frontend) -> Option<String> {
    if fe.diags.is_empty() {
        return None;
    }
    let errors = fe.diags.iter().filter(|d| d.is_error()).count();
    let warnings = fe.diags.len() - errors;
    let files: BTreeSet<Option<String>> = fe.diags.iter().map(|d| file_name(fe, d)).collect();
    let mut counts = Vec::new();
    if errors > 0 {
        counts.push(plural(errors, "error"));
    }
    if warnings > 0 {
        counts.push(plural(warnings, "warning"));
    }
    let lead = if errors > 0 { "error" } else { "warning" };
    Some(format!(
        "{lead}: {} in {}",
        counts.join(" and "),
        plural(files.len(), "file")
    ))
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The name of the file a diagnostic belongs to: its source-map name, or for a
/// load error the path that could not be read.
fn file_name(fe: &Frontend, diag: &Diag) -> Option<String> {
    match (diag.file, &diag.kind) {
        (Some(id), _) => Some(fe.sources.get(id).name.clone()),
        (None, DiagKind::Load(LoadError::CannotRead { path, .. }))
        | (None, DiagKind::Load(LoadError::NotUtf8 { path, .. })) => Some(path.clone()),
        (None, _) => None,
    }
}

/// Every diagnostic of `fe` as JSON, one object per line.
///
/// Fields: `code`, `severity` (`"error"`/`"warning"`), `message`, `file`, `start`,
/// `end` (byte offsets of the primary label), `line`, `column`, `end_line`,
/// `end_column` (1-based; columns count characters), `help` (string or null),
/// `labels` (`[{message, start, end}]`). Diagnostics without a location (a file
/// that could not be read) have null positions.
pub fn json(fe: &Frontend) -> String {
    let mut out = String::new();
    for diag in &fe.diags {
        // Serialising plain strings and numbers cannot fail.
        if let Ok(line) = serde_json::to_string(&json_diag(fe, diag)) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// One line of `--message-format json`. The field order is the output order.
#[derive(Serialize)]
struct JsonDiag {
    code: String,
    severity: &'static str,
    message: String,
    file: Option<String>,
    start: Option<usize>,
    end: Option<usize>,
    line: Option<usize>,
    column: Option<usize>,
    end_line: Option<usize>,
    end_column: Option<usize>,
    help: Option<String>,
    labels: Vec<JsonLabel>,
}

#[derive(Serialize)]
struct JsonLabel {
    message: Option<String>,
    start: usize,
    end: usize,
}

fn json_diag(fe: &Frontend, diag: &Diag) -> JsonDiag {
    let labels: Vec<LabeledSpan> = diag.labels().map(|l| l.collect()).unwrap_or_default();
    let mut d = JsonDiag {
        code: diag.code_str(),
        severity: if diag.is_error() { "error" } else { "warning" },
        message: diag.to_string(),
        file: file_name(fe, diag),
        start: None,
        end: None,
        line: None,
        column: None,
        end_line: None,
        end_column: None,
        help: diag.help().map(|h| h.to_string()),
        labels: labels
            .iter()
            .map(|l| JsonLabel {
                message: l.label().map(str::to_string),
                start: l.offset(),
                end: l.offset() + l.len(),
            })
            .collect(),
    };
    if let (Some(id), Some(first)) = (diag.file, labels.first()) {
        let (start, end) = (first.offset(), first.offset() + first.len());
        let (line, column) = fe.sources.line_col(id, start);
        let (end_line, end_column) = fe.sources.line_col(id, end);
        d.start = Some(start);
        d.end = Some(end);
        d.line = Some(line);
        d.column = Some(column);
        d.end_line = Some(end_line);
        d.end_column = Some(end_column);
    }
    d
}

/// A diagnostic together with the source text its labels point into, which is
/// what miette needs to draw the snippet.
struct Located<'a> {
    diag: &'a Diag,
    source: Option<FileSource<'a>>,
}

/// A source file for miette that finds the lines around a span by binary search
/// over the file's line starts, instead of scanning the text from its start: a
/// file with thousands of diagnostics renders in linear time, and is not copied.
struct FileSource<'a> {
    name: &'a str,
    text: &'a str,
    line_starts: &'a [usize],
}

impl SourceCode for FileSource<'_> {
    fn read_span<'b>(
        &'b self,
        span: &miette::SourceSpan,
        before: usize,
        after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'b> + 'b>, miette::MietteError> {
        let line_of = |off: usize| {
            self.line_starts
                .partition_point(|&s| s <= off)
                .saturating_sub(1)
        };
        let first = line_of(span.offset()).saturating_sub(before);
        let last = line_of(span.offset() + span.len()) + after + 1;
        let start = self.line_starts[first];
        let end = self
            .line_starts
            .get(last + 1)
            .copied()
            .unwrap_or(self.text.len());
        let window = &self.text[start..end.max(start)];
        let local = miette::SourceSpan::from((span.offset().saturating_sub(start), span.len()));
        let inner = window.read_span(&local, before, after)?;
        let found = inner.span();
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name.to_string(),
            inner.data(),
            (found.offset() + start, found.len()).into(),
            inner.line() + first,
            inner.column(),
            inner.line_count() + first,
        )))
    }
}

impl fmt::Debug for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.diag, f)
    }
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.diag, f)
    }
}

impl std::error::Error for Located<'_> {}

impl Diagnostic for Located<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diag.code()
    }
    fn severity(&self) -> Option<Severity> {
        self.diag.severity()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diag.help()
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        // Labels without source text cannot be drawn; miette would print an error
        // about the missing source instead of the diagnostic.
        self.source.as_ref()?;
        self.diag.labels()
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.source.as_ref().map(|s| s as &dyn SourceCode)
    }
}
