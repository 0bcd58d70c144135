//! Source files: the user's files, the files they import, and the standard library
//! (built into the binary so `import "std/…"` works from any folder).

use std::path::{Path, PathBuf};

/// Index of a file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct FileId(pub u32);

/// A byte span in a known file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Loc {
    pub file: FileId,
    pub span: cnnc_grammar::ast::Span,
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The name shown in diagnostics: the path as given, or `std/blocks.cnn`.
    pub name: String,
    /// Where it was read from; `None` for the built-in standard library.
    pub path: Option<PathBuf>,
    pub text: String,
    /// Byte offset of the start of every line, for `line_col` by binary search.
    line_starts: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

/// The standard library, embedded at build time: (import name, text).
pub const STDLIB: &[(&str, &str)] = &[
    ("std/blocks.cnn", include_str!("../../stdlib/blocks.cnn")),
    ("std/nets.cnn", include_str!("../../stdlib/nets.cnn")),
];

impl SourceMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, path: Option<PathBuf>, text: String) -> FileId {
        let id = FileId(self.files.len() as u32);
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        self.files.push(SourceFile {
            name: name.into(),
            path,
            text,
            line_starts,
        });
        id
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(i as u32), f))
    }

    /// An already-loaded file with this name or canonical path.
    pub fn find(&self, name: &str, path: Option<&Path>) -> Option<FileId> {
        self.files().find_map(|(id, f)| {
            let same_path = match (path, &f.path) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            };
            (same_path || (path.is_none() && f.name == name)).then_some(id)
        })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, id: FileId, offset: usize) -> (usize, usize) {
        let f = self.get(id);
        let offset = floor_char_boundary(&f.text, offset.min(f.text.len()));
        let line = f.line_starts.partition_point(|&s| s <= offset);
        let line_start = f.line_starts[line - 1];
        let col = f.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    /// `file:line:col` of a location, for notes that refer to another place.
    pub fn describe(&self, loc: Loc) -> String {
        let (l, c) = self.line_col(loc.file, loc.span.start);
        format!("{}:{l}:{c}", self.get(loc.file).name)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl SourceFile {
    /// Byte offsets where lines start (the first is 0).
    pub fn line_starts(&self) -> &[usize] {
        &self.line_starts
    }
}

/// The text of a standard-library file, by import name (`std/blocks.cnn`).
pub fn stdlib_file(name: &str) -> Option<&'static str> {
    STDLIB.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
