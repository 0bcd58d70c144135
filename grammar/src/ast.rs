//! The typed syntax tree of one `.cnn` file. Every node carries the byte span of its
//! source text; nothing here knows about pest.

use serde::Serialize;

/// A half-open byte range `start..end` in one source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        debug_assert!(start <= end);
        Span { start, end }
    }
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        (s.start, s.len()).into()
    }
}

/// An identifier with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Item {
    Import(Import),
    Block(BlockDef),
    Model(ModelDef),
    Train(TrainDef),
    Explain(ExplainDef),
    Example(ExampleDef),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Import(i) => i.span,
            Item::Block(b) => b.span,
            Item::Model(m) => m.span,
            Item::Train(t) => t.span,
            Item::Explain(e) => e.span,
            Item::Example(e) => e.span,
        }
    }
}

/// `import "std/blocks.cnn"`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Import {
    pub path: StrLit,
    pub span: Span,
}

/// A string literal, escapes already decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrLit {
    pub value: String,
    pub span: Span,
}

/// `block name(p1, p2=default) { statements }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockDef {
    pub name: Ident,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    pub name: Ident,
    pub default: Option<Value>,
    pub span: Span,
}

/// `model Name { statements }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelDef {
    pub name: Ident,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// `example block_name(args) on [C, H, W]`: a documented, checked use of a block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExampleDef {
    pub block: Ident,
    pub args: Option<Args>,
    pub input: Value,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Stmt {
    /// `input image: [1, 28, 28]`
    Input(InputStmt),
    /// `frozen? op name? (args)? (from value)?`
    Layer(LayerStmt),
    /// `repeat N { statements }`
    Repeat(RepeatStmt),
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::Input(s) => s.span,
            Stmt::Layer(s) => s.span,
            Stmt::Repeat(s) => s.span,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InputStmt {
    pub name: Ident,
    pub shape: Value,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerStmt {
    /// Span of the `frozen` keyword, when present.
    pub frozen: Option<Span>,
    pub op: Ident,
    pub name: Option<Ident>,
    pub args: Option<Args>,
    /// `from x`: take this value as input instead of the previous statement's output.
    pub from: Option<Ident>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RepeatStmt {
    pub count: Value,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// A parenthesised argument list; `span` covers the parentheses.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Args {
    pub items: Vec<Arg>,
    pub span: Span,
}

impl Args {
    pub fn positional(&self) -> impl Iterator<Item = &Arg> {
        self.items.iter().filter(|a| a.name.is_none())
    }
    pub fn named(&self) -> impl Iterator<Item = &Arg> {
        self.items.iter().filter(|a| a.name.is_some())
    }
}

/// `value` or `name = value`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Value,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ValueKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    /// A bare name: a named value, a block parameter, or a symbol such as `same`.
    Name(String),
    List(Vec<Value>),
    Call {
        callee: Ident,
        args: Args,
    },
}

impl ValueKind {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            ValueKind::Int(_) => "an integer",
            ValueKind::Float(_) => "a number",
            ValueKind::Str(_) => "a string",
            ValueKind::Bool(_) => "a boolean",
            ValueKind::Name(_) => "a name",
            ValueKind::List(_) => "a list",
            ValueKind::Call { .. } => "a call",
        }
    }
}

/// `train { key = value ... }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainDef {
    pub entries: Vec<TrainEntry>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainEntry {
    pub key: Ident,
    pub value: Value,
    pub span: Span,
}

/// `explain { directive ... }`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExplainDef {
    pub directives: Vec<Directive>,
    pub span: Span,
}

/// `method(args)? key=value... on split[sel]? -> "out"?`, clauses in any order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Directive {
    pub method: Ident,
    pub args: Option<Args>,
    pub options: Vec<Arg>,
    pub on: Vec<SampleSel>,
    pub outputs: Vec<StrLit>,
    pub span: Span,
}

/// `on test[0..16]`, `on train[1, 5, 9]`, `on test`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SampleSel {
    pub split: Ident,
    pub selection: Option<Selection>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Selection {
    /// `[a..b]`, half-open.
    Range { start: i64, end: i64, span: Span },
    /// `[i, j, k]`
    List {
        indices: Vec<(i64, Span)>,
        span: Span,
    },
}
