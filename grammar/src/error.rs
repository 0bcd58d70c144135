//! Syntax diagnostics (codes E01xx). Each variant's doc comment is the long form
//! printed by `cnnc explain-code`.

use miette::{Diagnostic, SourceSpan};
use thiserror::Error;

#[derive(Clone, Debug, Error, Diagnostic, PartialEq)]
pub enum SyntaxError {
    /// The text does not follow the grammar of `.cnn` files.
    ///
    /// The parser reports the first place in each statement where it could not go on,
    /// and what it would have accepted there. Every broken statement in a file is
    /// reported, not only the first.
    ///
    /// Example: `conv c1(16,, kernel=3)` — remove the doubled comma.
    /// Statements end at a newline or `;`; inside
    /// `(...)` and `[...]` newlines are allowed.
    #[error("{message}")]
    #[diagnostic(code(E0101))]
    Unexpected {
        message: String,
        #[label("{label}")]
        span: SourceSpan,
        label: String,
        #[help]
        help: Option<String>,
    },

    /// An integer literal does not fit in 64 bits.
    ///
    /// Example: `epochs = 99999999999999999999`.
    ///
    /// Fix: use a smaller number; no argument of cnnc accepts values this large.
    #[error("integer literal `{text}` is too large")]
    #[diagnostic(code(E0102), help("integers must lie between -2^63 and 2^63-1"))]
    IntOutOfRange {
        text: String,
        #[label("does not fit in 64 bits")]
        span: SourceSpan,
    },

    /// A number literal is too large to represent (it overflows to infinity).
    ///
    /// Example: `lr = 1e400`.
    ///
    /// Fix: use a finite number; single and double precision stop near 3.4e38 and
    /// 1.8e308.
    #[error("number literal `{text}` is too large")]
    #[diagnostic(code(E0103), help("numbers must be finite (at most about 1.8e308)"))]
    NumberOutOfRange {
        text: String,
        #[label("overflows to infinity")]
        span: SourceSpan,
    },

    /// Brackets or braces nest deeper than cnnc reads (200 levels): no model needs
    /// that, and refusing it keeps every stage's recursion bounded.
    #[error("brackets nest more than {limit} levels deep")]
    #[diagnostic(
        code(E0105),
        help("flatten the nesting; kernel literals need at most 4 levels")
    )]
    TooDeep {
        limit: usize,
        #[label("too deep")]
        span: SourceSpan,
    },

    /// A string literal contains a backslash escape that cnnc does not know.
    ///
    /// The escapes are `\"`, `\\`, `\n` and `\t`.
    ///
    /// Example: `data = mnist("C:\data")` — write `"C:\\data"` or `"C:/data"`.
    #[error("unknown escape `{text}` in string")]
    #[diagnostic(
        code(E0104),
        help("known escapes are \\\" \\\\ \\n \\t; write a backslash as \\\\")
    )]
    BadEscape {
        text: String,
        #[label("unknown escape")]
        span: SourceSpan,
    },
}

impl SyntaxError {
    /// How deeply brackets and braces may nest; deeper input is refused before
    /// parsing, so no stage recurses without bound.
    pub const MAX_NESTING: usize = 200;
}

impl SyntaxError {
    /// The primary byte span of the error.
    pub fn span(&self) -> SourceSpan {
        match self {
            SyntaxError::Unexpected { span, .. }
            | SyntaxError::IntOutOfRange { span, .. }
            | SyntaxError::NumberOutOfRange { span, .. }
            | SyntaxError::BadEscape { span, .. }
            | SyntaxError::TooDeep { span, .. } => *span,
        }
    }
}
