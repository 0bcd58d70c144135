//! The front end in one place: read → parse → check, for every file given.
//! Each stage collects all the errors it finds; a file whose stages reported an
//! error has no checked result.

use crate::check;
use crate::checked::CheckedFile;
use crate::diag::{Diag, DiagKind, LoadError};
use crate::source::{FileId, SourceMap};
use cnnc_grammar::ast;
use std::path::{Path, PathBuf};

/// What the front end made of the files it was given.
#[derive(Debug, Default)]
pub struct Frontend {
    pub sources: SourceMap,
    pub files: Vec<FileResult>,
    /// Every diagnostic of every file (and of the files they import), in file and
    /// source order.
    pub diags: Vec<Diag>,
}

#[derive(Debug)]
pub struct FileResult {
    /// The path as given on the command line.
    pub name: String,
    pub file: Option<FileId>,
    pub ast: Option<ast::File>,
    /// `Some` when the file and its imports have no errors.
    pub checked: Option<CheckedFile>,
}

impl Frontend {
    pub fn has_errors(&self) -> bool {
        self.diags.iter().any(Diag::is_error)
    }
}

/// Reads, parses and checks each file.
pub fn check_paths(paths: &[PathBuf]) -> Frontend {
    let mut fe = Frontend::default();
    for path in paths {
        let name = path.display().to_string();
        match read_source(path) {
            Ok(text) => {
                let canon = std::fs::canonicalize(path).ok();
                let id = fe.sources.add(name.clone(), canon, text);
                check_file(&mut fe, name, id);
            }
            Err(e) => {
                fe.diags.push(Diag::new(None, DiagKind::Load(e)));
                fe.files.push(FileResult {
                    name,
                    file: None,
                    ast: None,
                    checked: None,
                });
            }
        }
    }
    fe.diags
        .sort_by_key(|d| (d.file, d.primary_span().map(|s| s.0)));
    fe
}

/// Parses and checks one source text, as if read from `name` (imports resolve
/// relative to `name`'s folder).
pub fn check_text(name: &str, text: &str) -> Frontend {
    let mut fe = Frontend::default();
    let path = std::path::absolute(name).ok();
    let id = fe.sources.add(name, path, text.to_string());
    check_file(&mut fe, name.to_string(), id);
    fe.diags
        .sort_by_key(|d| (d.file, d.primary_span().map(|s| s.0)));
    fe
}

fn check_file(fe: &mut Frontend, name: String, id: FileId) {
    let parsed = cnnc_grammar::parse(&fe.sources.get(id).text);
    let syntax_ok = parsed.errors.is_empty();
    fe.diags.extend(
        parsed
            .errors
            .into_iter()
            .map(|e| Diag::new(Some(id), DiagKind::Syntax(e))),
    );
    let errors_before = fe.diags.iter().filter(|d| d.is_error()).count();
    let checked = check::check_file(&mut fe.sources, id, &parsed.file, &mut fe.diags);
    let errors_after = fe.diags.iter().filter(|d| d.is_error()).count();
    fe.files.push(FileResult {
        name,
        file: Some(id),
        ast: Some(parsed.file),
        checked: checked.filter(|_| syntax_ok && errors_after == errors_before),
    });
}

/// Reads a file as UTF-8, with a located error when it cannot.
pub fn read_source(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::CannotRead {
        path: path.display().to_string(),
        reason: io_reason(&e),
    })?;
    String::from_utf8(bytes).map_err(|e| LoadError::NotUtf8 {
        path: path.display().to_string(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// A short, lower-case reason for an I/O error.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::IsADirectory => "it is a directory".into(),
        _ => e.to_string(),
    }
}
