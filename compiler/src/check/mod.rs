//! The check stage: loads imports, resolves names, expands blocks and `repeat`,
//! validates every argument and infers every shape, collecting every error.
//!
//! Input: one parsed file (`ast::File`). Output: a [`CheckedFile`] (meaningful only
//! when no error was reported) and diagnostics pushed into the caller's list.
//!
//! - `args`: evaluating and binding arguments, typed readers with range checks;
//! - `layers`: the built-in ops and their shape rules;
//! - `model`: expanding a model (or a block example) into a flat layer list;
//! - `train`, `explain`: the other two sections;
//! - `lints`: warnings computed on the expanded model.

mod args;
mod error;
mod explain;
mod layers;
mod lints;
mod model;
mod train;

pub use error::{CheckError, Lint};
pub use layers::{fmt_shape, BUILTINS};

use crate::checked::{CheckedExample, CheckedFile};
use crate::diag::{Diag, DiagKind};
use crate::pipeline::io_reason;
use crate::source::{stdlib_file, FileId, Loc, SourceMap};
use cnnc_grammar::ast::{self, Item, Span};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A block definition and the file it is written in.
#[derive(Clone)]
pub(crate) struct BlockRef {
    pub file: FileId,
    pub def: Rc<ast::BlockDef>,
}

pub(crate) struct Checker<'a> {
    sources: &'a SourceMap,
    diags: Vec<Diag>,
    /// (code, file, start, end) of reported diagnostics: a block used many times
    /// reports an error in its body once.
    reported: HashSet<(String, Option<FileId>, usize, usize, String)>,
    /// The block instances being expanded, outermost first: (block, use site).
    trace: Vec<(String, Loc)>,
    blocks: HashMap<String, BlockRef>,
    /// Blocks instantiated at least once (for the unused-block warning).
    used_blocks: HashSet<String>,
    /// Layers produced so far in the current expansion (guards `repeat` blow-ups).
    expanded: usize,
    /// The `repeat` counts being unrolled, outermost first.
    repeats: Vec<Loc>,
}

impl<'a> Checker<'a> {
    pub fn error(&mut self, loc: Loc, e: CheckError) {
        self.push(loc, DiagKind::Check(e));
    }

    pub fn lint(&mut self, loc: Loc, l: Lint) {
        self.push(loc, DiagKind::Lint(l));
    }

    fn push(&mut self, loc: Loc, kind: DiagKind) {
        let mut d = Diag::new(Some(loc.file), kind);
        // The same mistake in a block body is reported once, however many times
        // the block is used; elsewhere two messages at one place are both kept.
        let message = if self.trace.is_empty() {
            d.to_string()
        } else {
            String::new()
        };
        let key = (d.code_str(), d.file, loc.span.start, loc.span.end, message);
        if !self.reported.insert(key) {
            return;
        }
        // The innermost uses, and how many enclosing ones are left out.
        const SHOWN: usize = 4;
        for (block, site) in self.trace.iter().rev().take(SHOWN) {
            d.notes.push(format!(
                "in block `{block}`, used at {}",
                self.sources.describe(*site)
            ));
        }
        if self.trace.len() > SHOWN {
            d.notes.push(format!(
                "… within {} more block uses",
                self.trace.len() - SHOWN
            ));
        }
        // Inside the standard library the user can change nothing but the use:
        // point there, and say where in the library it went wrong.
        if self.sources.get(loc.file).path.is_none() {
            let user_site = self
                .trace
                .iter()
                .rev()
                .find(|(_, site)| self.sources.get(site.file).path.is_some());
            if let Some((block, site)) = user_site {
                let text = &self.sources.get(loc.file).text;
                // The whole line of the library that failed.
                let start = text[..loc.span.start.min(text.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let code = text[start..].lines().next().unwrap_or("").trim();
                d.notes
                    .insert(0, format!("at {}: `{code}`", self.sources.describe(loc)));
                d.file = Some(site.file);
                d.site = Some((
                    site.span.start,
                    site.span.end,
                    format!("the error is inside this use of `{block}`"),
                ));
            }
        }
        self.diags.push(d);
    }
}

/// Checks one parsed file (loading its imports into `sources`), pushing every
/// diagnostic into `diags`.
pub fn check_file(
    sources: &mut SourceMap,
    file: FileId,
    ast: &ast::File,
    diags: &mut Vec<Diag>,
) -> Option<CheckedFile> {
    let mut early = Vec::new();
    let imported = load_imports(sources, file, ast, &mut early, &mut HashSet::from([file]));
    let mut ck = Checker {
        sources,
        diags: early,
        reported: HashSet::new(),
        trace: Vec::new(),
        blocks: HashMap::new(),
        used_blocks: HashSet::new(),
        expanded: 0,
        repeats: Vec::new(),
    };
    // Imported blocks first: a clash is then reported at the definition in the
    // user's own file, the one they can rename.
    for (f, a) in imported
        .iter()
        .map(|(f, a)| (*f, a))
        .chain(std::iter::once((file, ast)))
    {
        ck.collect_blocks(f, a);
    }
    let own_blocks: Vec<String> = ast
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Block(b) => Some(b.name.name.clone()),
            _ => None,
        })
        .collect();

    let model_def = ck.single(file, ast, "model", |i| match i {
        Item::Model(m) => Some(m),
        _ => None,
    });
    let train_def = ck.single(file, ast, "train", |i| match i {
        Item::Train(t) => Some(t),
        _ => None,
    });
    let explain_def = ck.single(file, ast, "explain", |i| match i {
        Item::Explain(e) => Some(e),
        _ => None,
    });

    let model = model_def.and_then(|m| ck.model(file, m));
    let mut examples = Vec::new();
    for item in &ast.items {
        if let Item::Example(ex) = item {
            if let Some(m) = ck.example(file, ex) {
                let end = ex.args.as_ref().map_or(ex.block.span.end, |a| a.span.end);
                let title = format!(
                    "example {}",
                    &ck.sources.get(file).text[ex.block.span.start..end]
                );
                examples.push(CheckedExample { title, model: m });
            }
        }
    }
    if let Some(m) = &model {
        ck.lints(m);
    }
    for ex in &examples {
        ck.lints(&ex.model);
    }

    let train = match (train_def, &model, model_def) {
        (Some(t), _, None) => {
            ck.no_model(file, "train", t.span);
            None
        }
        (Some(t), m, Some(md)) => ck.train(file, t, m.as_ref(), md),
        (None, ..) => None,
    };
    let explain = match (explain_def, model_def) {
        (Some(e), None) => {
            ck.no_model(file, "explain", e.span);
            Vec::new()
        }
        (Some(e), Some(_)) => ck.explain(file, e, model.as_ref(), train_def, train.as_ref()),
        (None, _) => Vec::new(),
    };

    ck.block_lints(file, ast, model_def.is_some());
    diags.append(&mut ck.diags);
    Some(CheckedFile {
        model,
        train,
        explain,
        examples,
        blocks: own_blocks,
    })
}

impl<'a> Checker<'a> {
    /// The one item of a kind in the file; later ones are E0206.
    fn single<'f, T>(
        &mut self,
        file: FileId,
        ast: &'f ast::File,
        what: &str,
        pick: impl Fn(&'f Item) -> Option<&'f T>,
    ) -> Option<&'f T> {
        let mut found: Option<(&T, Span)> = None;
        for item in &ast.items {
            if let Some(t) = pick(item) {
                let span = item.span();
                match found {
                    None => found = Some((t, span)),
                    Some((_, first)) => {
                        let head = Span::new(span.start, span.start + what.len());
                        let first_head = Span::new(first.start, first.start + what.len());
                        self.error(
                            Loc { file, span: head },
                            CheckError::DuplicateSection {
                                what: what.into(),
                                span: head.into(),
                                first: first_head.into(),
                            },
                        );
                    }
                }
            }
        }
        found.map(|f| f.0)
    }

    fn no_model(&mut self, file: FileId, what: &str, span: Span) {
        let head = Span::new(span.start, span.start + what.len());
        self.error(
            Loc { file, span: head },
            CheckError::NoModel {
                what: what.into(),
                span: head.into(),
            },
        );
    }

    fn collect_blocks(&mut self, file: FileId, ast: &ast::File) {
        for item in &ast.items {
            let Item::Block(b) = item else { continue };
            let name = &b.name.name;
            if let Some(prev) = self.blocks.get(name) {
                let help = Some(format!(
                    "the first definition is at {}",
                    self.sources.describe(Loc {
                        file: prev.file,
                        span: prev.def.name.span
                    })
                ));
                let loc = Loc {
                    file,
                    span: b.name.span,
                };
                self.error(
                    loc,
                    CheckError::DuplicateBlock {
                        name: name.clone(),
                        span: b.name.span.into(),
                        help,
                    },
                );
                continue;
            }
            if layers::is_builtin(name) {
                let loc = Loc {
                    file,
                    span: b.name.span,
                };
                self.error(
                    loc,
                    CheckError::BuiltinBlockName {
                        name: name.clone(),
                        span: b.name.span.into(),
                    },
                );
                continue;
            }
            self.blocks.insert(
                name.clone(),
                BlockRef {
                    file,
                    def: Rc::new(b.clone()),
                },
            );
        }
    }
}

/// Loads the files `ast` imports (recursively, each once), pushing their syntax
/// errors and E0201 for imports that cannot be read.
fn load_imports(
    sources: &mut SourceMap,
    file: FileId,
    ast: &ast::File,
    diags: &mut Vec<Diag>,
    seen: &mut HashSet<FileId>,
) -> Vec<(FileId, ast::File)> {
    let mut out = Vec::new();
    for item in &ast.items {
        let Item::Import(imp) = item else { continue };
        let loc = Loc {
            file,
            span: imp.path.span,
        };
        let id = match resolve_import(sources, file, &imp.path.value) {
            Ok(id) => id,
            Err((reason, help)) => {
                diags.push(Diag::new(
                    Some(file),
                    DiagKind::Check(CheckError::ImportNotFound {
                        path: imp.path.value.clone(),
                        reason,
                        span: loc.span.into(),
                        help,
                    }),
                ));
                continue;
            }
        };
        if !seen.insert(id) {
            continue;
        }
        let parsed = cnnc_grammar::parse(&sources.get(id).text);
        diags.extend(
            parsed
                .errors
                .into_iter()
                .map(|e| Diag::new(Some(id), DiagKind::Syntax(e))),
        );
        let nested = load_imports(sources, id, &parsed.file, diags, seen);
        out.push((id, parsed.file));
        out.extend(nested);
    }
    out
}

/// Finds (loading if needed) the file an import names.
fn resolve_import(
    sources: &mut SourceMap,
    from: FileId,
    path: &str,
) -> Result<FileId, (String, Option<String>)> {
    if path.starts_with("std/") {
        if let Some(id) = sources.find(path, None) {
            return Ok(id);
        }
        return match stdlib_file(path) {
            Some(text) => Ok(sources.add(path, None, text.to_string())),
            None => {
                let names: Vec<&str> = crate::source::STDLIB.iter().map(|(n, _)| *n).collect();
                let help = args::closest(path, names.iter().copied())
                    .map(|c| format!("did you mean `{c}`?"))
                    .or_else(|| {
                        Some(format!(
                            "the standard library has {}",
                            args::list_names(&names)
                        ))
                    });
                Err(("no such file in the standard library".into(), help))
            }
        };
    }
    let importer = sources.get(from);
    let base = importer
        .path
        .as_ref()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_default();
    let full = base.join(path);
    // Messages name files as the user would: relative to the importing file's name.
    let shown = Path::new(&importer.name)
        .parent()
        .unwrap_or(Path::new(""))
        .join(path);
    let canon = std::fs::canonicalize(&full).map_err(|e| {
        (
            io_reason(&e),
            Some(format!("looked for {}", normalize(&shown).display())),
        )
    })?;
    if let Some(id) = sources.find(path, Some(&canon)) {
        return Ok(id);
    }
    // A FIFO or device would block or never end: only regular files are read.
    if !std::fs::metadata(&canon).is_ok_and(|m| m.is_file()) {
        return Err(("it is not a regular file".into(), None));
    }
    let text = crate::pipeline::read_source(&canon).map_err(|e| (e.to_string(), None))?;
    let name = std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            canon
                .strip_prefix(cwd)
                .ok()
                .map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| normalize(&shown).display().to_string());
    Ok(sources.add(name, Some(canon), text))
}

/// Removes `.` and `a/..` pairs without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}
