//! One diagnostic of any front-end stage, tied to the file it points into.
//!
//! Stages keep their own error enums (`LoadError`, `SyntaxError`, `CheckError`,
//! `Lint`); [`Diag`] wraps one of them with its file and the chain of block
//! instantiations it happened in, and implements [`miette::Diagnostic`] by
//! delegation so the CLI can render any of them the same way.

use crate::check::{CheckError, Lint};
use crate::source::FileId;
use cnnc_grammar::SyntaxError;
use miette::{Diagnostic, LabeledSpan, Severity};
use std::fmt;
use thiserror::Error;

/// Errors reading the files named on the command line (E00xx).
#[derive(Clone, Debug, Error, Diagnostic, PartialEq)]
pub enum LoadError {
    /// A file named on the command line could not be read.
    ///
    /// Example: `cnnc check modle.cnn` when the file is `model.cnn`.
    ///
    /// Fix: check the path; paths are relative to the current directory.
    #[error("cannot read `{path}`: {reason}")]
    #[diagnostic(code(E0001))]
    CannotRead { path: String, reason: String },

    /// A file is not valid UTF-8 text.
    ///
    /// `.cnn` files are UTF-8. This usually means a binary file (a checkpoint, an
    /// image) was given where a model file was expected.
    #[error("`{path}` is not UTF-8 text (invalid byte at offset {offset})")]
    #[diagnostic(code(E0002), help("`.cnn` files must be UTF-8 text"))]
    NotUtf8 { path: String, offset: usize },
}

/// The error of one stage.
#[derive(Clone, Debug, PartialEq)]
pub enum DiagKind {
    Load(LoadError),
    Syntax(SyntaxError),
    Check(CheckError),
    Lint(Lint),
}

/// A diagnostic located in a file (or in no file, for load errors).
#[derive(Clone, Debug, PartialEq)]
pub struct Diag {
    pub file: Option<FileId>,
    pub kind: DiagKind,
    /// Context lines added to the help, e.g. "in block `residual` used at a.cnn:12:3".
    pub notes: Vec<String>,
    /// Replaces the stage error's labels: an error inside a standard-library block
    /// is shown at the block's use in the user's file (which `file` then names).
    pub site: Option<(usize, usize, String)>,
}

impl Diag {
    pub fn new(file: Option<FileId>, kind: DiagKind) -> Self {
        Diag {
            file,
            kind,
            notes: Vec::new(),
            site: None,
        }
    }

    pub fn inner(&self) -> &(dyn Diagnostic + Send + Sync + 'static) {
        match &self.kind {
            DiagKind::Load(e) => e,
            DiagKind::Syntax(e) => e,
            DiagKind::Check(e) => e,
            DiagKind::Lint(e) => e,
        }
    }

    pub fn is_error(&self) -> bool {
        !matches!(
            self.severity(),
            Some(Severity::Warning) | Some(Severity::Advice)
        )
    }

    /// The stable code, e.g. `E0401`.
    pub fn code_str(&self) -> String {
        self.inner()
            .code()
            .map(|c| c.to_string())
            .unwrap_or_default()
    }

    /// The first label's byte range, if any.
    pub fn primary_span(&self) -> Option<(usize, usize)> {
        let mut labels = Diagnostic::labels(self)?;
        let l = labels.next()?;
        Some((l.offset(), l.offset() + l.len()))
    }
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner(), f)
    }
}

impl std::error::Error for Diag {}

impl Diagnostic for Diag {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.inner().code()
    }
    fn severity(&self) -> Option<Severity> {
        self.inner().severity()
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        let help = self.inner().help().map(|h| h.to_string());
        if self.notes.is_empty() {
            return help.map(|h| Box::new(h) as Box<dyn fmt::Display>);
        }
        let mut lines: Vec<String> = help.into_iter().collect();
        lines.extend(self.notes.iter().cloned());
        Some(Box::new(lines.join("\n")))
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        match &self.site {
            Some((start, end, label)) => Some(Box::new(std::iter::once(LabeledSpan::new(
                Some(label.clone()),
                *start,
                end - start,
            )))),
            None => self.inner().labels(),
        }
    }
}
