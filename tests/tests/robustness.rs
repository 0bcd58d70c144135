//! Robustness of the front end: the parser and checker never panic or hang, and
//! every diagnostic span lies inside its file on a char boundary, on hundreds of
//! mutated examples, on arbitrary text (proptest), and on pathologically deep
//! nesting. Both renderings (`render::human` and `render::json`) must succeed on
//! every result too, and every error must be located.
//!
//! - `mutated_examples_*`, `mutated_stdlib_*`: a deterministic corpus (seeded
//!   xorshift, no timing in the choice of variants) of broken variants of
//!   `examples/**/*.cnn` and `stdlib/*.cnn`: truncations, deleted and duplicated
//!   lines, inserted garbage, numbers replaced by edge values, garbled names.
//!   Failing variants are listed together and written to
//!   `$CARGO_TARGET_TMPDIR/robustness-failures/` so they can be re-run by hand.
//! - `regressions`: every `.cnn` in `tests/robustness/regressions/` (inputs that
//!   once broke the front end, e.g. found by `cargo fuzz`; see `fuzz/README.md`).
//! - proptest properties over arbitrary strings, bytes, token soup and randomly
//!   assembled models (bounded case counts; failures are not persisted).
//! - `deep_*` and other pathological inputs, each checked in a child process (a
//!   stack overflow aborts the process, which a test cannot catch) with a time
//!   limit (a hang is killed and reported).
//!
//! The corpus and the pathological inputs run on threads with an 8 MiB stack,
//! the stack of the `cnnc` binary's main thread on Linux, so "does not overflow"
//! means what it means for users. Stack use differs between builds: in a debug
//! build pest's own stack guard stops a deeply nested parse early, so some deep
//! nesting bugs show only under `cargo test --release`.

use cnnc_compiler::pipeline::{check_text, Frontend};
use cnnc_runtime::render;
use miette::Diagnostic;
use proptest::prelude::*;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// No single input may take longer than this to check and render (debug build).
/// It guards against hangs; the usual time is a few milliseconds.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// The limit for one pathological input, each checked alone in a child process
/// (the largest, a chain of 10 000 blocks, takes about 4 s in a debug build on
/// an idle core: under a loaded CI machine 5 s was too tight). Still far below
/// the quadratic slowdowns these cases once had (10 s and more in release).
const PATHOLOGICAL_LIMIT: Duration = Duration::from_secs(20);

/// The stack of the `cnnc` binary's main thread on Linux.
const STACK: usize = 8 << 20;

/// The fields every `--message-format json` line has.
const JSON_FIELDS: &[&str] = &[
    "code", "severity", "message", "file", "start", "end", "line", "column",
];

// ---------------------------------------------------------------- invariants

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The name inputs without a file of their own are checked under: a file in
/// `examples/` (which does not exist), so `std/…` and relative imports behave as
/// they do for the examples.
fn scratch_name() -> String {
    repo()
        .join("examples/robustness-input.cnn")
        .display()
        .to_string()
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Every way `fe` breaks the front end's promises: an unlocated error, a label
/// outside its file or inside a UTF-8 character, a rendering that panics, JSON
/// lines that do not parse or lack fields.
fn violations(fe: &Frontend) -> Vec<String> {
    let mut out = Vec::new();
    let n_files = fe.sources.files().count();

    if fe.has_errors()
        && !fe
            .diags
            .iter()
            .any(|d| d.is_error() && d.file.is_some() && d.primary_span().is_some())
    {
        let codes: Vec<String> = fe.diags.iter().map(|d| d.code_str()).collect();
        out.push(format!(
            "errors reported ({codes:?}) but none has a file and a span"
        ));
    }

    for d in &fe.diags {
        let labels: Vec<_> = d.labels().map(|l| l.collect()).unwrap_or_default();
        let Some(id) = d.file else {
            if !labels.is_empty() {
                out.push(format!(
                    "{}: {} label(s) but no file to point into",
                    d.code_str(),
                    labels.len()
                ));
            }
            continue;
        };
        if id.0 as usize >= n_files {
            out.push(format!(
                "{}: file id {} but the source map has {n_files} files",
                d.code_str(),
                id.0
            ));
            continue;
        }
        let src = fe.sources.get(id);
        let text = &src.text;
        for l in &labels {
            let start = l.offset();
            let Some(end) = start.checked_add(l.len()) else {
                out.push(format!(
                    "{}: span {start}+{} overflows",
                    d.code_str(),
                    l.len()
                ));
                continue;
            };
            let what = format!(
                "{} `{d}`: span {start}..{end} in {} ({} bytes)",
                d.code_str(),
                src.name,
                text.len()
            );
            if end > text.len() {
                out.push(format!("{what} ends past the end of the file"));
            } else if !text.is_char_boundary(start) || !text.is_char_boundary(end) {
                out.push(format!("{what} is not on char boundaries"));
            }
        }
    }

    match catch_unwind(AssertUnwindSafe(|| render::human(fe, 80, false))) {
        Err(p) => out.push(format!(
            "render::human panicked: {}",
            panic_message(p.as_ref())
        )),
        Ok(h) if !fe.diags.is_empty() && h.trim().is_empty() => {
            out.push("render::human is empty although there are diagnostics".into())
        }
        Ok(_) => {}
    }

    match catch_unwind(AssertUnwindSafe(|| render::json(fe))) {
        Err(p) => out.push(format!(
            "render::json panicked: {}",
            panic_message(p.as_ref())
        )),
        Ok(json) => out.extend(json_violations(fe, &json)),
    }
    out
}

fn json_violations(fe: &Frontend, json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = json.lines().collect();
    if lines.len() != fe.diags.len() {
        out.push(format!(
            "render::json wrote {} lines for {} diagnostics",
            lines.len(),
            fe.diags.len()
        ));
    }
    for (line, d) in lines.iter().zip(&fe.diags) {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                out.push(format!("JSON line does not parse ({e}): {line}"));
                continue;
            }
        };
        for f in JSON_FIELDS {
            if v.get(f).is_none() {
                out.push(format!("JSON line lacks `{f}`: {line}"));
            }
        }
        if let (Some(_), Some((start, end))) = (d.file, d.primary_span()) {
            let located = v["start"] == start
                && v["end"] == end
                && v["line"].as_u64().is_some_and(|n| n >= 1)
                && v["column"].as_u64().is_some_and(|n| n >= 1)
                && v["file"].is_string();
            if !located {
                out.push(format!(
                    "JSON line of a located diagnostic ({start}..{end}) is not located: {line}"
                ));
            }
        }
    }
    out
}

/// What checking one input gave.
struct Outcome {
    violations: Vec<String>,
    elapsed: Duration,
    /// The codes of the diagnostics, in order (`None` after a panic).
    codes: Option<Vec<String>>,
}

impl Outcome {
    fn errors(&self) -> bool {
        self.codes
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c.starts_with('E')))
    }
}

/// Checks and renders `text` as if read from `name`, catching panics.
fn run_case(name: &str, text: &str) -> Outcome {
    let t = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| check_text(name, text)));
    let (violations, codes) = match result {
        Err(p) => (
            vec![format!(
                "check_text panicked: {}",
                panic_message(p.as_ref())
            )],
            None,
        ),
        Ok(fe) => (
            violations(&fe),
            Some(fe.diags.iter().map(|d| d.code_str()).collect()),
        ),
    };
    Outcome {
        violations,
        elapsed: t.elapsed(),
        codes,
    }
}

/// `text` escaped and cut to about `max` characters, for failure messages.
fn shorten(text: &str, max: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return format!("{text:?}");
    }
    let head: String = chars[..max / 2].iter().collect();
    let tail: String = chars[chars.len() - max / 2..].iter().collect();
    format!("{head:?} … ({} chars) … {tail:?}", chars.len())
}

// ---------------------------------------------------------------- corpus runner

/// One input: where it comes from, the name it is checked under, its text.
struct Case {
    label: String,
    name: String,
    text: String,
}

/// Runs every case on a worker thread with an 8 MiB stack; the calling thread
/// watches it, so a case that hangs is reported (and the rest skipped) instead of
/// hanging the test. Panics with every failure listed.
fn run_corpus(what: &str, cases: Vec<Case>) {
    let total = cases.len();
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    let shared: std::sync::Arc<Vec<Case>> = std::sync::Arc::new(cases);
    let worker_cases = std::sync::Arc::clone(&shared);
    let started = Instant::now();
    std::thread::Builder::new()
        .name(format!("robustness-{what}"))
        .stack_size(STACK)
        .spawn(move || {
            for (i, c) in worker_cases.iter().enumerate() {
                if tx.send((i, run_case(&c.name, &c.text))).is_err() {
                    return;
                }
            }
        })
        .expect("spawn worker thread");

    let mut failures: Vec<(usize, Vec<String>)> = Vec::new();
    let mut slowest = (Duration::ZERO, 0usize);
    let mut with_errors = 0;
    let mut done = 0;
    while done < total {
        match rx.recv_timeout(TIME_LIMIT) {
            Ok((i, o)) => {
                done += 1;
                with_errors += usize::from(o.errors());
                if o.elapsed > slowest.0 {
                    slowest = (o.elapsed, i);
                }
                let mut v = o.violations;
                if o.elapsed > TIME_LIMIT {
                    v.push(format!("took {:.1?} (limit {TIME_LIMIT:?})", o.elapsed));
                }
                if !v.is_empty() {
                    failures.push((i, v));
                }
            }
            Err(_) => {
                failures.push((
                    done,
                    vec![format!(
                        "no result after {TIME_LIMIT:?}: hangs (the {} later cases were not run)",
                        total - done - 1
                    )],
                ));
                break;
            }
        }
    }
    println!(
        "{what}: {done}/{total} inputs checked in {:.1?} ({with_errors} with errors); slowest {:.1?}: {}",
        started.elapsed(),
        slowest.0,
        shared[slowest.1].label
    );
    if failures.is_empty() {
        return;
    }

    let dump = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("robustness-failures/{what}"));
    let _ = std::fs::remove_dir_all(&dump);
    let _ = std::fs::create_dir_all(&dump);
    let mut msg = format!("{} of {total} inputs failed:\n", failures.len());
    for (n, (i, v)) in failures.iter().enumerate() {
        let c = &shared[*i];
        let file = dump.join(format!("{n:03}.cnn"));
        let _ = std::fs::write(&file, &c.text);
        let _ = writeln!(msg, "\n[{n}] {} (checked as {})", c.label, c.name);
        for line in v {
            let _ = writeln!(msg, "    - {line}");
        }
        let _ = writeln!(msg, "    source: {}", shorten(&c.text, 300));
        let _ = writeln!(msg, "    written to {}", file.display());
    }
    panic!("{msg}");
}

// ---------------------------------------------------------------- mutations

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    /// Seeded from a string (FNV-1a), so each file's variants do not change when
    /// other files are added.
    fn seeded(s: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in s.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    /// A char boundary of `text` (0 and `text.len()` included).
    fn boundary(&mut self, text: &str) -> usize {
        let mut i = self.below(text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Replacements for number tokens: the issue's list, then the edges of i64 and f64.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e40",
    "99999999999999999999",
    "1.5",
    "-0",
    "0.0",
    "-1e40",
    "1e-400",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "0x7FFFFFFFFFFFFFFF",
    "16777217",
    "4294967297",
];

/// Inserted text: brackets, quotes, unicode, whitespace and line endings, comment
/// and string openers, and fragments of the language.
const GARBAGE: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "\"",
    "'",
    "é",
    "🙂",
    "\t",
    "\r\n",
    "\r",
    "\n",
    "\0",
    "\u{FEFF}",
    "\u{202E}",
    "\u{301}",
    "\u{10FFFF}",
    "ﬁ",
    "日本",
    "/*",
    "*/",
    "#",
    "//",
    "\\",
    ",",
    ";",
    "=",
    ":",
    "->",
    "..",
    "-",
    "+",
    ".",
    "e",
    "0x",
    "_",
    "((((((((((((((((",
    "]]]]]]]]",
    "}}}}",
    "\"unterminated",
    " from input",
    " frozen ",
    "repeat 3 {",
    "model X {",
    "block b(x) {",
    "train {",
    "explain {",
    "input x: [1, 2, 2]\n",
    "import \"std/nope.cnn\"\n",
    "import \"missing.cnn\"\n",
    "import \"..\"\n",
    "import \"std/blocks.cnn\"\n",
    "example residual(8) on [8, 4, 4]\n",
    "add(input, input)",
    "concat(x)",
    " = ",
    "layer=",
    "on test[5..1]",
    "class=99999999999",
];

#[derive(Clone, Copy, PartialEq)]
enum Tok {
    Number,
    Ident,
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The number and identifier tokens of a `.cnn` text (outside comments and
/// strings), as byte ranges. A lexer just good enough to aim mutations.
fn tokens(text: &str) -> Vec<(Tok, usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev = if i > 0 { b[i - 1] } else { b' ' };
        if c == b'#' || (c == b'/' && b.get(i + 1) == Some(&b'/')) {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i += 2;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if !is_ident_byte(prev)
            && (prev != b'.' || (c.is_ascii_digit() && i >= 2 && b[i - 2] == b'.'))
            && (c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)))
        {
            let start = i;
            let hex = c == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X'));
            i += 1;
            while i < b.len() {
                let d = b[i];
                let exp_sign = !hex && matches!(d, b'+' | b'-') && matches!(b[i - 1], b'e' | b'E');
                let dot = d == b'.' && b.get(i + 1) != Some(&b'.');
                if is_ident_byte(d) || exp_sign || dot {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push((Tok::Number, start, i));
        } else if (c.is_ascii_alphabetic() || c == b'_') && !is_ident_byte(prev) {
            let start = i;
            while i < b.len() && is_ident_byte(b[i]) {
                i += 1;
            }
            out.push((Tok::Ident, start, i));
        } else {
            i += 1;
        }
    }
    out
}

/// `text` with the given byte ranges (sorted, disjoint) replaced.
fn replace_ranges(text: &str, edits: &[(usize, usize, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e, with) in edits {
        out.push_str(&text[at..*s]);
        out.push_str(with);
        at = *e;
    }
    out.push_str(&text[at..]);
    out
}

/// An identifier with one letter dropped, swapped with the next, or doubled.
fn garble(rng: &mut Rng, ident: &str) -> (String, &'static str) {
    let mut chars: Vec<char> = ident.chars().collect();
    let i = rng.below(chars.len());
    match rng.below(3) {
        0 if chars.len() > 1 => {
            chars.remove(i);
            (chars.into_iter().collect(), "dropped a letter")
        }
        1 if chars.len() > 1 => {
            let j = if i + 1 < chars.len() { i + 1 } else { i - 1 };
            chars.swap(i, j);
            (chars.into_iter().collect(), "swapped two letters")
        }
        _ => {
            chars.insert(i, chars[i]);
            (chars.into_iter().collect(), "doubled a letter")
        }
    }
}

/// Lines with their endings, so joining them gives the text back.
fn lines_of(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

/// A random piece of garbage: from [`GARBAGE`], or one random character.
fn garbage(rng: &mut Rng, self_name: &str) -> String {
    match rng.below(6) {
        0 => char::from(rng.below(128) as u8).to_string(),
        1 => char::from_u32(rng.below(0x11_0000) as u32)
            .unwrap_or('\u{FFFD}')
            .to_string(),
        2 => char::from_u32(0x80 + rng.below(0x780) as u32)
            .unwrap_or('ß')
            .to_string(),
        3 if rng.below(4) == 0 => format!("import \"{self_name}\"\n"),
        _ => rng.pick(GARBAGE).to_string(),
    }
}

/// One random mutation of `text`, with a description.
fn mutate_once(rng: &mut Rng, text: &str, self_name: &str) -> (String, String) {
    let lines = lines_of(text);
    let toks = tokens(text);
    match rng.below(7) {
        0 => {
            let at = rng.boundary(text);
            (text[..at].to_string(), format!("truncated at byte {at}"))
        }
        1 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let mut l = lines.clone();
            l.remove(i);
            (l.concat(), format!("deleted line {}", i + 1))
        }
        2 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let mut l = lines.clone();
            l.insert(i, lines[i]);
            (l.concat(), format!("duplicated line {}", i + 1))
        }
        3 => {
            let ns: Vec<_> = toks.iter().filter(|t| t.0 == Tok::Number).collect();
            if ns.is_empty() {
                return mutate_once(rng, text, self_name);
            }
            let &&(_, s, e) = rng.pick(&ns);
            let with = rng.pick(NUMBERS).to_string();
            let desc = format!("number `{}` at byte {s} replaced by {with}", &text[s..e]);
            (replace_ranges(text, &[(s, e, with)]), desc)
        }
        4 => {
            let is: Vec<_> = toks.iter().filter(|t| t.0 == Tok::Ident).collect();
            if is.is_empty() {
                return mutate_once(rng, text, self_name);
            }
            let &&(_, s, e) = rng.pick(&is);
            let (with, how) = garble(rng, &text[s..e]);
            let desc = format!("identifier `{}` at byte {s}: {how} (`{with}`)", &text[s..e]);
            (replace_ranges(text, &[(s, e, with)]), desc)
        }
        _ => {
            let at = rng.boundary(text);
            let g = garbage(rng, self_name);
            let desc = format!("inserted {g:?} at byte {at}");
            (replace_ranges(text, &[(at, at, g)]), desc)
        }
    }
}

/// The broken variants of one file: a fixed number of each kind, chosen by a
/// generator seeded with the file's path.
fn variants(rel: &str, text: &str) -> Vec<(String, String)> {
    let mut rng = Rng::seeded(rel);
    let self_name = Path::new(rel)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lines = lines_of(text);
    let toks = tokens(text);
    let numbers: Vec<_> = toks.iter().filter(|t| t.0 == Tok::Number).collect();
    let idents: Vec<_> = toks.iter().filter(|t| t.0 == Tok::Ident).collect();
    let mut out: Vec<(String, String)> = Vec::new();

    out.push((String::new(), "truncated to nothing".into()));
    for _ in 0..10 {
        let at = rng.boundary(text);
        out.push((text[..at].to_string(), format!("truncated at byte {at}")));
    }
    if !lines.is_empty() {
        for _ in 0..10 {
            let i = rng.below(lines.len());
            let mut l = lines.clone();
            l.remove(i);
            out.push((l.concat(), format!("deleted line {}", i + 1)));
        }
        for _ in 0..5 {
            let k = 2 + rng.below(4);
            let mut gone: Vec<usize> = (0..k).map(|_| rng.below(lines.len())).collect();
            gone.sort_unstable();
            gone.dedup();
            let kept: String = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(i))
                .map(|(_, l)| *l)
                .collect();
            let shown: Vec<usize> = gone.iter().map(|i| i + 1).collect();
            out.push((kept, format!("deleted lines {shown:?}")));
        }
        for _ in 0..3 {
            let a = rng.below(lines.len());
            let b = (a + 1 + rng.below(8)).min(lines.len());
            let mut l = lines.clone();
            l.drain(a..b);
            out.push((l.concat(), format!("deleted lines {}..={b}", a + 1)));
        }
        for _ in 0..5 {
            let i = rng.below(lines.len());
            let mut l = lines.clone();
            l.insert(i, lines[i]);
            out.push((l.concat(), format!("duplicated line {}", i + 1)));
        }
        for _ in 0..2 {
            let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
            let mut l = lines.clone();
            l.swap(a, b);
            out.push((l.concat(), format!("swapped lines {} and {}", a + 1, b + 1)));
        }
    }
    for _ in 0..12 {
        let k = 1 + rng.below(3);
        let mut at: Vec<usize> = (0..k).map(|_| rng.boundary(text)).collect();
        at.sort_unstable();
        let edits: Vec<(usize, usize, String)> = at
            .iter()
            .map(|&a| (a, a, garbage(&mut rng, &self_name)))
            .collect();
        let desc: Vec<String> = edits
            .iter()
            .map(|(a, _, g)| format!("{g:?} at byte {a}"))
            .collect();
        out.push((
            replace_ranges(text, &edits),
            format!("inserted {}", desc.join(", ")),
        ));
    }
    if !numbers.is_empty() {
        for with in &NUMBERS[..5] {
            let edits: Vec<_> = numbers
                .iter()
                .map(|&&(_, s, e)| (s, e, with.to_string()))
                .collect();
            out.push((
                replace_ranges(text, &edits),
                format!("every number replaced by {with}"),
            ));
        }
        for _ in 0..12 {
            let &&(_, s, e) = rng.pick(&numbers);
            let with = rng.pick(NUMBERS).to_string();
            let desc = format!("number `{}` at byte {s} replaced by {with}", &text[s..e]);
            out.push((replace_ranges(text, &[(s, e, with)]), desc));
        }
    }
    if !idents.is_empty() {
        for _ in 0..12 {
            let &&(_, s, e) = rng.pick(&idents);
            let (with, how) = garble(&mut rng, &text[s..e]);
            let desc = format!("identifier `{}` at byte {s}: {how} (`{with}`)", &text[s..e]);
            out.push((replace_ranges(text, &[(s, e, with)]), desc));
        }
        let mut edits = Vec::new();
        for &&(_, s, e) in &idents {
            if rng.below(3) == 0 {
                edits.push((s, e, garble(&mut rng, &text[s..e]).0));
            }
        }
        out.push((
            replace_ranges(text, &edits),
            "a third of the identifiers garbled".into(),
        ));
    }
    out.push((text.replace('\n', "\r\n"), "CRLF line endings".into()));
    out.push((text.replace('\n', "\r"), "CR line endings".into()));
    out.push((text.replace("  ", "\t"), "tabs for spaces".into()));
    out.push((
        text.replace('\n', ";"),
        "all on one line, `;` for newlines".into(),
    ));
    out.push((text.replace('}', ""), "every `}` removed".into()));
    out.push((text.replace(')', ""), "every `)` removed".into()));
    out.push((text.replace(']', ""), "every `]` removed".into()));
    out.push((text.replace('"', ""), "every `\"` removed".into()));
    out.push((text.trim_end().to_string(), "no final newline".into()));
    out.push((format!("\u{FEFF}{text}"), "a byte-order mark first".into()));
    for _ in 0..8 {
        let mut t = text.to_string();
        let mut desc = Vec::new();
        for _ in 0..2 + rng.below(3) {
            let (nt, d) = mutate_once(&mut rng, &t, &self_name);
            t = nt;
            desc.push(d);
        }
        out.push((t, format!("then: {}", desc.join("; then: "))));
    }
    out
}

/// `examples/**/*.cnn` and `stdlib/*.cnn`, relative to the repository root, sorted.
fn corpus_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "cnn") {
                out.push(p);
            }
        }
    }
    let root = repo();
    let mut files = Vec::new();
    walk(&root.join("examples"), &mut files);
    if let Ok(entries) = std::fs::read_dir(root.join("stdlib")) {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cnn")),
        );
    }
    let mut rel: Vec<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    rel.sort();
    rel
}

fn mutated_cases(files: &[String]) -> Vec<Case> {
    let root = repo();
    let mut cases = Vec::new();
    for rel in files {
        let path = root.join(rel);
        let text = std::fs::read_to_string(&path).expect("corpus file is UTF-8");
        let name = path.display().to_string();
        for (i, (t, desc)) in variants(rel, &text).into_iter().enumerate() {
            cases.push(Case {
                label: format!("{rel} variant {i}: {desc}"),
                name: name.clone(),
                text: t,
            });
        }
    }
    cases
}

// ---------------------------------------------------------------- corpus tests

#[test]
fn the_corpus_is_there_and_checks_cleanly() {
    let files = corpus_files();
    assert!(
        files.iter().any(|f| f.starts_with("examples/"))
            && files.iter().any(|f| f.starts_with("stdlib/")),
        "no examples or stdlib files found under {}: {files:?}",
        repo().display()
    );
    let root = repo();
    let cases = files
        .iter()
        .map(|rel| {
            let path = root.join(rel);
            Case {
                label: format!("{rel} unchanged"),
                name: path.display().to_string(),
                text: std::fs::read_to_string(&path).expect("corpus file is UTF-8"),
            }
        })
        .collect();
    run_corpus("unchanged", cases);
}

#[test]
fn mutated_examples_never_panic_hang_or_misplace_spans() {
    let files: Vec<String> = corpus_files()
        .into_iter()
        .filter(|f| f.starts_with("examples/"))
        .collect();
    let cases = mutated_cases(&files);
    assert!(cases.len() >= 200, "only {} variants", cases.len());
    run_corpus("examples", cases);
}

#[test]
fn mutated_stdlib_never_panics_hangs_or_misplaces_spans() {
    let files: Vec<String> = corpus_files()
        .into_iter()
        .filter(|f| f.starts_with("stdlib/"))
        .collect();
    let cases = mutated_cases(&files);
    assert!(cases.len() >= 100, "only {} variants", cases.len());
    run_corpus("stdlib", cases);
}

#[test]
fn the_mutations_are_deterministic() {
    let text = "model M {\n  input x: [1, 28, 28]\n  conv c(8, kernel=3)\n}\n";
    let a = variants("examples/x.cnn", text);
    let b = variants("examples/x.cnn", text);
    assert_eq!(a, b);
    let toks = tokens(text);
    let numbers: Vec<&str> = toks
        .iter()
        .filter(|t| t.0 == Tok::Number)
        .map(|&(_, s, e)| &text[s..e])
        .collect();
    assert_eq!(numbers, ["1", "28", "28", "8", "3"]);
    let t2 = "on test[0..16] lr=1e-3 x=0x1F # 5\n\"7\" .5";
    let numbers: Vec<&str> = tokens(t2)
        .iter()
        .filter(|t| t.0 == Tok::Number)
        .map(|&(_, s, e)| &t2[s..e])
        .collect();
    assert_eq!(numbers, ["0", "16", "1e-3", "0x1F", ".5"]);
}

// ---------------------------------------------------------------- regressions

fn regression_files() -> Vec<PathBuf> {
    let dir = repo().join("tests/robustness/regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|es| {
            es.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cnn"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Each regression input is checked in its own child process: some of them once
/// overflowed the stack, which would abort this whole test binary.
#[test]
fn regressions() {
    let mut failures = Vec::new();
    for f in regression_files() {
        if let Err(e) = in_child(&format!("file:{}", f.display()), Duration::from_secs(20)) {
            failures.push(format!("{}: {e}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------- pathological inputs

/// Inputs too big or too deep for the corpus, by name; each is checked in a child
/// process (see [`in_child`]).
fn pathological(name: &str) -> Option<String> {
    const N: usize = 10_000;
    const LIMIT: usize = cnnc_grammar::SyntaxError::MAX_NESTING;
    let model = |body: String| format!("model M {{\n  input x: [1, 8, 8]\n{body}\n}}\n");
    Some(match name {
        "open-brackets" => "[".repeat(N),
        "open-parens" => "(".repeat(N),
        "open-braces" => "{".repeat(N),
        "open-brackets-in-input" => model(format!("  input y: {}", "[".repeat(N))),
        "open-parens-in-args" => model(format!("  conv({}", "(".repeat(N))),
        "open-braces-after-model" => format!("model M {}\n", "{".repeat(N)),
        "closed-lists" => model(format!(
            "  conv(1, kernel={}1{})",
            "[".repeat(N),
            "]".repeat(N)
        )),
        "closed-calls-in-args" => model(format!(
            "  conv(1, kernel={}1{})",
            "f(".repeat(N),
            ")".repeat(N)
        )),
        "closed-calls-in-train" => format!(
            "train {{\n  data = {}1{}\n}}\n",
            "f(".repeat(N),
            ")".repeat(N)
        ),
        "closed-repeats" => model(format!(
            "  {}relu{}",
            "repeat 1 { ".repeat(N),
            " }".repeat(N)
        )),
        "open-repeats" => model("  repeat 2 {\n".repeat(400)),
        // As deep as the parser accepts (`model M {` is the first level).
        "open-repeats-at-limit" => model("  repeat 2 {\n".repeat(LIMIT - 1)),
        "closed-repeats-at-limit" => model(format!(
            "  {}relu{}",
            "repeat 1 { ".repeat(LIMIT - 1),
            " }".repeat(LIMIT - 1)
        )),
        "closed-calls-at-limit" => model(format!(
            "  conv(1, kernel={}1{})",
            "f(".repeat(LIMIT - 2),
            ")".repeat(LIMIT - 2)
        )),
        "closed-lists-at-limit" => model(format!(
            "  conv(1, weights={}1{})",
            "[".repeat(LIMIT - 2),
            "]".repeat(LIMIT - 2)
        )),
        "block-chain" => {
            let mut s: String = (0..N)
                .map(|i| format!("block b{i}() {{\n  b{}\n}}\n", i + 1))
                .collect();
            s.push_str(&format!("block b{N}() {{\n  relu\n}}\n"));
            s.push_str("model M {\n  input x: [1, 8, 8]\n  b0\n}\n");
            s
        }
        "long-line-in-model" => model(format!("  {}relu)", " ".repeat(70_000))),
        "many-lines" => model("  relu\n".repeat(N)),
        "many-errors" => model("  conv(,)\n".repeat(N / 4)),
        _ => return None,
    })
}

/// The environment variable that makes [`child_process_entry`] run one case.
const CHILD_VAR: &str = "CNNC_ROBUSTNESS_CHILD";

/// Runs the case `spec` (`file:PATH`, or a [`pathological`] name) in a child
/// process of this test binary, with an 8 MiB stack and a time limit; `Err` says
/// how it failed (violations, a panic, a crash by signal, or a hang).
fn in_child(spec: &str, limit: Duration) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, spec)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the child process: {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not finish within {limit:?}: hangs or is far too slow"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the child process: {e}")),
        }
    };
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let marker = format!("robustness child: {spec}: ok");
    if status.success() && stdout.contains(&marker) {
        return Ok(());
    }
    let how = match status.code() {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal (a stack overflow aborts)".to_string(),
    };
    let report: String = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| {
            l.contains("violation:") || l.contains("overflowed its stack") || l.contains("panicked")
        })
        .take(20)
        .collect::<Vec<_>>()
        .join("\n    ");
    Err(format!("{how}\n    {report}"))
}

/// Not a test of its own: the entry point of the child processes started by
/// [`in_child`]. Without `CNNC_ROBUSTNESS_CHILD` it does nothing.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var(CHILD_VAR) else {
        return;
    };
    let (name, text) = match spec.strip_prefix("file:") {
        Some(path) => (
            path.to_string(),
            String::from_utf8_lossy(&std::fs::read(path).expect("regression file")).into_owned(),
        ),
        None => (
            scratch_name(),
            pathological(&spec).unwrap_or_else(|| panic!("unknown case {spec}")),
        ),
    };
    let outcome = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || run_case(&name, &text))
        .expect("spawn")
        .join()
        .expect("run_case catches panics");
    let mut codes = outcome.codes.clone().unwrap_or_default();
    codes.dedup();
    println!(
        "robustness child: {spec}: {:.1?}, diagnostics {codes:?}",
        outcome.elapsed
    );
    for v in &outcome.violations {
        println!("violation: {v}");
    }
    if outcome.elapsed > PATHOLOGICAL_LIMIT {
        println!(
            "violation: took {:.1?} (limit {PATHOLOGICAL_LIMIT:?})",
            outcome.elapsed
        );
    }
    assert!(
        outcome.violations.is_empty() && outcome.elapsed <= PATHOLOGICAL_LIMIT,
        "{spec} failed"
    );
    println!("robustness child: {spec}: ok");
}

fn check_pathological(name: &str) {
    assert!(pathological(name).is_some(), "unknown case {name}");
    // The child's own limit is PATHOLOGICAL_LIMIT; this one only catches real hangs.
    if let Err(e) = in_child(name, PATHOLOGICAL_LIMIT * 2) {
        panic!("`{name}`: {e}");
    }
}

#[test]
fn deep_unclosed_brackets_do_not_overflow_the_stack() {
    check_pathological("open-brackets");
    check_pathological("open-brackets-in-input");
}

#[test]
fn deep_unclosed_parens_do_not_overflow_the_stack() {
    check_pathological("open-parens");
    check_pathological("open-parens-in-args");
}

#[test]
fn deep_unclosed_braces_do_not_overflow_the_stack() {
    check_pathological("open-braces");
    check_pathological("open-braces-after-model");
}

/// 10 000 nested lists once overflowed the AST builder's stack in release builds
/// (in debug builds pest's stack guard stopped the parse first, so only
/// `cargo test --release` showed it). Nesting past the limit is now E0105.
#[test]
fn deep_nested_lists_do_not_overflow_the_stack() {
    check_pathological("closed-lists");
}

/// `f(f(f(…)))` 10 000 deep once overflowed the AST builder's stack in release
/// builds.
#[test]
fn deep_nested_calls_do_not_overflow_the_stack() {
    check_pathological("closed-calls-in-args");
    check_pathological("closed-calls-in-train");
}

/// `repeat 1 { repeat 1 { … } }` 10 000 deep once overflowed the AST builder's
/// stack in release builds.
#[test]
fn deep_nested_repeats_do_not_overflow_the_stack() {
    check_pathological("closed-repeats");
}

/// Unclosed `repeat 2 {` lines once took time more than quadratic in their
/// number (400 of them: 30 s in a debug build); past the nesting limit they are
/// now refused up front, so the case at the limit is the one that measures.
#[test]
fn deep_unclosed_repeats_finish_in_time() {
    check_pathological("open-repeats");
    check_pathological("open-repeats-at-limit");
}

/// Nesting as deep as the parser accepts: parsed, checked and rendered in time.
#[test]
fn nesting_at_the_limit_is_checked_in_time() {
    check_pathological("closed-repeats-at-limit");
    check_pathological("closed-calls-at-limit");
    check_pathological("closed-lists-at-limit");
}

/// A chain of 10 000 blocks, each using the next, once overflowed the checker's
/// stack (in debug builds too); it is now E0212.
#[test]
fn long_block_chains_do_not_overflow_the_stack() {
    check_pathological("block-chain");
}

/// A diagnostic past column 65 535 once panicked in miette's graphical renderer
/// ("Formatting argument out of range"); also in `tests/robustness/regressions/`.
#[test]
fn very_long_lines_render() {
    check_pathological("long-line-in-model");
}

#[test]
fn long_files_and_many_errors_finish_in_time() {
    check_pathological("many-lines");
    check_pathological("many-errors");
}

/// Importing a FIFO once blocked forever (and `import "/dev/zero"` read until
/// memory ran out): imports must now be regular files.
#[cfg(unix)]
#[test]
fn importing_a_fifo_does_not_hang() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("robustness-fifo");
    let _ = std::fs::create_dir_all(&dir);
    let fifo = dir.join("fifo.cnn");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "mkfifo {} failed", fifo.display());
    let regression = dir.join("imports-fifo.cnn");
    std::fs::write(&regression, "import \"fifo.cnn\"\n").expect("write test file");
    let result = in_child(
        &format!("file:{}", regression.display()),
        PATHOLOGICAL_LIMIT * 2,
    );
    let _ = std::fs::remove_file(&fifo);
    if let Err(e) = result {
        panic!("`import` of a FIFO: {e}");
    }
}

// ---------------------------------------------------------------- properties

/// The whitespace-separated words of `s`.
fn words(s: &'static str) -> Vec<&'static str> {
    s.split_whitespace().collect()
}

/// Pieces of the language, for token soup: words, then punctuation, numbers,
/// strings, whitespace and comments.
fn soup_tokens() -> Vec<&'static str> {
    let mut t = words(
        "model block train explain import example repeat from frozen true false input on
         conv depthwise pointwise batchnorm groupnorm relu sigmoid linear maxpool avgpool
         global_avg_pool flatten add concat detach dropout conv_bn_relu residual classifier
         x y M kernel stride pad same weights data mnist optimizer sgd lr saliency cam
         gradcam layer class test { } ( ) [ ] , ; : = -> .. 0 1 3 28 -1 1e40 1.5 .5 5. 0x1F
         0b2 1_000 99999999999999999999 \"std/blocks.cnn\" \"x\" \" \\ é 🙂 /*",
    );
    t.extend([
        " ", " ", " ", "\n", "\n", "\r\n", "\t", "# c\n", "// c\n", "/* c */",
    ]);
    t
}

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(soup_tokens()), 0..200).prop_map(|t| t.concat())
}

/// A value for a layer, train or explain argument: mostly plausible, sometimes
/// an edge case, sometimes a list or a call.
fn value() -> impl Strategy<Value = String> {
    let plausible = prop::sample::select(words("1 2 3 4 8 16 32 0.5 same valid true false"));
    let edge = prop::sample::select(words(
        "0 -1 7 1e40 -0.0 1e-400 16777217 9223372036854775807 -9223372036854775808 input c1
         \"x\" zero",
    ));
    let leaf = prop_oneof![3 => plausible, 1 => edge].prop_map(str::to_string);
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            (
                prop::sample::select(words("f sgd adam mnist shapes step norm every")),
                prop::collection::vec(inner, 0..3)
            )
                .prop_map(|(f, v)| format!("{f}({})", v.join(", "))),
        ]
    })
}

fn args() -> impl Strategy<Value = String> {
    let key = prop::sample::select(words(
        "out kernel stride pad dilation groups bias weights in p slope momentum eps multiplier
         lr n size classes every",
    ));
    let arg = (prop::option::of(key), value())
        .prop_map(|(k, v)| k.map_or(v.clone(), |k| format!("{k}={v}")));
    prop::collection::vec(arg, 0..4).prop_map(|a| format!("({})", a.join(", ")))
}

/// A statement that is plausibly right: a template with small random numbers.
fn plausible_statement() -> impl Strategy<Value = String> {
    let templates = vec![
        "conv c1({o}, kernel={k}, stride={s}, pad={p})",
        "conv({o})",
        "conv c2({o}, kernel={k}, dilation={s}, groups={g})",
        "frozen conv({o}, weights=[[1, 0], [0, {s}]])",
        "depthwise(kernel={k}, stride={s}, multiplier={g})",
        "pointwise({o})",
        "batchnorm",
        "groupnorm({g})",
        "relu",
        "leaky_relu(0.1)",
        "maxpool({k})",
        "avgpool({k}, stride={s}, pad={p})",
        "global_avg_pool",
        "flatten",
        "linear({o})",
        "linear features({o}, in={o})",
        "dropout(0.5)",
        "add(c1, input)",
        "concat(c1, c2)",
        "detach",
        "conv_bn_relu({o})",
        "residual({o})",
        "residual_down({o}, stride={s})",
        "classifier(10)",
        "vgg_stage({o}, convs={s})",
        "repeat {s} { conv_bn_relu({o}) }",
    ];
    (
        prop::sample::select(templates),
        prop::sample::select(words("1 2 3 4 8 10 16")),
        prop::sample::select(words("1 2 3 5 [3,1] [1,2]")),
        prop::sample::select(words("1 2 3")),
        prop::sample::select(words("0 1 2 same valid [1,0]")),
        prop::sample::select(words("1 2 4")),
    )
        .prop_map(|(t, o, k, s, p, g)| {
            t.replace("{o}", o)
                .replace("{k}", k)
                .replace("{s}", s)
                .replace("{p}", p)
                .replace("{g}", g)
        })
}

/// Any statement: an op (or block) with random arguments.
fn random_statement() -> impl Strategy<Value = String> {
    let op = prop::sample::select(words(
        "conv depthwise pointwise batchnorm groupnorm relu leaky_relu maxpool avgpool
         global_avg_pool flatten linear dropout add concat detach conv_bn_relu residual
         residual_down classifier bottleneck vgg_stage nope",
    ));
    (
        op,
        prop::option::of(prop::sample::select(words("c1 c2 features input"))),
        prop::option::of(args()),
        prop::option::of(prop::sample::select(words("c1 c2 input zz"))),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(op, name, args, from, frozen, repeat)| {
            let mut s = if frozen { "frozen " } else { "" }.to_string();
            s.push_str(op);
            if let Some(n) = name {
                s.push_str(&format!(" {n}"));
            }
            s.push_str(&args.unwrap_or_default());
            if let Some(f) = from {
                s.push_str(&format!(" from {f}"));
            }
            if repeat {
                s = format!("repeat 2 {{ {s} }}");
            }
            s
        })
}

/// A train setting: mostly a plausible one, sometimes a random key and value.
fn train_entry() -> impl Strategy<Value = String> {
    let plausible = prop::sample::select(vec![
        "data = shapes(n=20, size=32, classes=3)",
        "data = shapes(n=0, size=1, color=rgb, classes=10)",
        "data = mnist(\"../data/mnist-5k\")",
        "data = folder(\"nowhere\", split=0.2)",
        "optimizer = sgd(lr=0.1, momentum=0.9)",
        "optimizer = adam()",
        "schedule = cosine(warmup=1)",
        "schedule = step(0)",
        "clip = norm(1.0)",
        "batch = 0",
        "epochs = 3",
        "loss = cross_entropy(smoothing=1.5)",
        "augment = [random_crop(28, pad=2), hflip(), normalize([0.5], [0])]",
        "checkpoint = every(epochs=0, keep=-1)",
        "on_nonfinite = skip(max=10)",
        "seed = 9223372036854775807",
    ])
    .prop_map(str::to_string);
    let key = prop::sample::select(words(
        "data augment batch epochs loss optimizer schedule clip checkpoint on_nonfinite seed
         bogus",
    ));
    let random = (key, value()).prop_map(|(k, v)| format!("{k} = {v}"));
    prop_oneof![3 => plausible, 1 => random]
}

/// A model file assembled from plausible pieces and random ones: most get past
/// the parser and the input shape, so shape inference and the train and explain
/// checks run.
fn random_model() -> impl Strategy<Value = String> {
    let shape = prop_oneof![
        4 => prop::sample::select(words("1,28,28 3,32,32 8,7,7 1,1,1 16,5,9"))
            .prop_map(str::to_string),
        1 => prop::collection::vec(value(), 0..5).prop_map(|v| v.join(", ")),
    ];
    let stmt = prop_oneof![4 => plausible_statement(), 1 => random_statement()];
    let method = prop::sample::select(words(
        "saliency smoothgrad integrated_gradients cam gradcam nope",
    ));
    let clause = prop::sample::select(vec![
        "",
        " layer=c1",
        " layer=features",
        " on test[0..16]",
        " on test[5..1]",
        " on train[0, 99999999999]",
        " class=label",
        " class=-1",
        " -> \"out\"",
        " on test[0..9223372036854775807]",
    ]);
    (
        shape,
        prop::collection::vec(stmt, 0..10),
        prop::bool::ANY,
        prop::collection::vec(train_entry(), 0..6),
        prop::collection::vec((method, prop::option::of(args()), clause), 0..3),
    )
        .prop_map(|(shape, stmts, head, train, explain)| {
            let mut s = String::from("import \"std/nets.cnn\"\nimport \"std/blocks.cnn\"\n");
            s.push_str(&format!("model M {{\n  input x: [{shape}]\n"));
            for st in stmts {
                s.push_str(&format!("  {st}\n"));
            }
            if head {
                s.push_str("  global_avg_pool\n  linear(3)\n");
            }
            s.push_str("}\ntrain {\n");
            for e in train {
                s.push_str(&format!("  {e}\n"));
            }
            s.push_str("}\nexplain {\n");
            for (m, a, c) in explain {
                s.push_str(&format!("  {m}{}{c}\n", a.unwrap_or_default()));
            }
            s.push_str("}\n");
            s
        })
}

fn assert_robust(text: &str) -> Result<(), TestCaseError> {
    let o = run_case(&scratch_name(), text);
    prop_assert!(
        o.violations.is_empty(),
        "violations: {:#?}\nsource: {}",
        o.violations,
        shorten(text, 400)
    );
    prop_assert!(o.elapsed <= TIME_LIMIT, "took {:?}", o.elapsed);
    Ok(())
}

/// `cases` per property; shrunk failures are printed, not saved: add them to
/// `tests/robustness/regressions/` as `.cnn` files.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    // Cheap (about 1.5 ms each in a debug build): many cases.
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
        assert_robust(&text)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        assert_robust(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn token_soup_never_panics(text in token_soup()) {
        assert_robust(&text)?;
    }
}

proptest! {
    // A whole model with the standard library: about 80 ms each.
    #![proptest_config(config(128))]

    #[test]
    fn random_models_never_panic(text in random_model()) {
        assert_robust(&text)?;
    }
}

proptest! {
    // An example with the standard library: about 25 ms each.
    #![proptest_config(config(256))]

    #[test]
    fn token_soup_inside_an_example_never_panics(
        which in 0usize..64,
        at in any::<prop::sample::Index>(),
        soup in token_soup(),
    ) {
        let files = corpus_files();
        let rel = &files[which % files.len()];
        let path = repo().join(rel);
        let text = std::fs::read_to_string(&path).expect("corpus file");
        let mut i = at.index(text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        let mutated = format!("{}{soup}{}", &text[..i], &text[i..]);
        let o = run_case(&path.display().to_string(), &mutated);
        prop_assert!(
            o.violations.is_empty(),
            "{rel} with {soup:?} inserted at byte {i}: {:#?}",
            o.violations
        );
        prop_assert!(o.elapsed <= TIME_LIMIT, "took {:?}", o.elapsed);
    }
}

/// The variants of every file are distinct enough to be worth running: most are
/// not the original text, and they are not all the same.
#[test]
fn most_variants_differ_from_the_original() {
    let root = repo();
    for rel in corpus_files() {
        let text = std::fs::read_to_string(root.join(&rel)).expect("corpus file");
        let vs = variants(&rel, &text);
        let distinct: HashSet<&String> = vs.iter().map(|(t, _)| t).collect();
        let changed = vs.iter().filter(|(t, _)| *t != text).count();
        assert!(
            changed * 10 >= vs.len() * 9 && distinct.len() * 10 >= vs.len() * 8,
            "{rel}: {changed} of {} variants changed, {} distinct",
            vs.len(),
            distinct.len()
        );
    }
}
