//! The syntax tree as readable text (`cnnc dump --stage=ast`): one node per line,
//! children indented by two spaces, each line ending in its byte span `@start..end`.
//! Values (arguments, shapes, settings) are printed inline in source syntax.
//!
//! ```text
//! model Digits @27..180
//!   input image: [1, 28, 28] @43..67
//!   layer conv c1 @70..98
//!     arg 16 @78..80
//!     arg kernel=3 @82..90
//! ```

use crate::ast::*;
use std::fmt::Write as _;

/// The tree of a parsed file.
pub fn ast(file: &File) -> String {
    let mut p = Printer::default();
    for item in &file.items {
        p.item(item);
    }
    p.out
}

#[derive(Default)]
struct Printer {
    out: String,
    depth: usize,
}

impl Printer {
    fn line(&mut self, text: &str, span: Span) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        // Writing into a String cannot fail.
        let _ = writeln!(self.out, "{text} @{}..{}", span.start, span.end);
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self)) {
        self.depth += 1;
        f(self);
        self.depth -= 1;
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Import(i) => self.line(&format!("import {}", string(&i.path.value)), i.span),
            Item::Block(b) => {
                self.line(&format!("block {}", b.name.name), b.span);
                self.nested(|p| {
                    for param in &b.params {
                        let text = match &param.default {
                            Some(v) => format!("param {}={}", param.name.name, value(v)),
                            None => format!("param {}", param.name.name),
                        };
                        p.line(&text, param.span);
                    }
                    p.stmts(&b.body);
                });
            }
            Item::Model(m) => {
                self.line(&format!("model {}", m.name.name), m.span);
                self.nested(|p| p.stmts(&m.body));
            }
            Item::Train(t) => {
                self.line("train", t.span);
                self.nested(|p| {
                    for e in &t.entries {
                        p.line(&format!("set {} = {}", e.key.name, value(&e.value)), e.span);
                    }
                });
            }
            Item::Explain(e) => {
                self.line("explain", e.span);
                self.nested(|p| {
                    for d in &e.directives {
                        p.directive(d);
                    }
                });
            }
            Item::Example(e) => {
                let args = e.args.as_ref().map(args).unwrap_or_default();
                self.line(
                    &format!("example {}{args} on {}", e.block.name, value(&e.input)),
                    e.span,
                );
            }
        }
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Input(i) => self.line(
                &format!("input {}: {}", i.name.name, value(&i.shape)),
                i.span,
            ),
            Stmt::Layer(l) => {
                let mut text = String::from("layer ");
                if l.frozen.is_some() {
                    text.push_str("frozen ");
                }
                text.push_str(&l.op.name);
                if let Some(name) = &l.name {
                    text.push(' ');
                    text.push_str(&name.name);
                }
                self.line(&text, l.span);
                self.nested(|p| {
                    if let Some(a) = &l.args {
                        p.args(a);
                    }
                    if let Some(from) = &l.from {
                        p.line(&format!("from {}", from.name), from.span);
                    }
                });
            }
            Stmt::Repeat(r) => {
                self.line(&format!("repeat {}", value(&r.count)), r.span);
                self.nested(|p| p.stmts(&r.body));
            }
        }
    }

    fn args(&mut self, a: &Args) {
        for arg in &a.items {
            self.line(&format!("arg {}", self::arg(arg)), arg.span);
        }
    }

    fn directive(&mut self, d: &Directive) {
        self.line(&format!("directive {}", d.method.name), d.span);
        // Clauses come in any order; show them in source order.
        let mut clauses: Vec<(String, Span)> = Vec::new();
        for a in d.args.iter().flat_map(|a| &a.items) {
            clauses.push((format!("arg {}", arg(a)), a.span));
        }
        for o in &d.options {
            clauses.push((format!("option {}", arg(o)), o.span));
        }
        for on in &d.on {
            let sel = match &on.selection {
                None => String::new(),
                Some(Selection::Range { start, end, .. }) => format!("[{start}..{end}]"),
                Some(Selection::List { indices, .. }) => {
                    let list: Vec<String> = indices.iter().map(|(i, _)| i.to_string()).collect();
                    format!("[{}]", list.join(", "))
                }
            };
            clauses.push((format!("on {}{sel}", on.split.name), on.span));
        }
        for out in &d.outputs {
            clauses.push((format!("-> {}", string(&out.value)), out.span));
        }
        clauses.sort_by_key(|(_, span)| span.start);
        self.nested(|p| {
            for (text, span) in clauses {
                p.line(&text, span);
            }
        });
    }
}

fn arg(a: &Arg) -> String {
    match &a.name {
        Some(n) => format!("{}={}", n.name, value(&a.value)),
        None => value(&a.value),
    }
}

fn args(a: &Args) -> String {
    let items: Vec<String> = a.items.iter().map(arg).collect();
    format!("({})", items.join(", "))
}

/// A value in source syntax.
fn value(v: &Value) -> String {
    match &v.kind {
        ValueKind::Int(i) => i.to_string(),
        ValueKind::Float(f) => format!("{f:?}"),
        ValueKind::Str(s) => string(s),
        ValueKind::Bool(b) => b.to_string(),
        ValueKind::Name(n) => n.clone(),
        ValueKind::List(items) => {
            let items: Vec<String> = items.iter().map(value).collect();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Call { callee, args: a } => format!("{}{}", callee.name, args(a)),
    }
}

/// A string literal with the `.cnn` escapes.
fn string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_one_node_per_line_with_spans() {
        let src = "model M {\n  input x: [1, 8, 8]\n  conv c1(4, kernel=3) from x\n  repeat 2 { relu }\n}\n";
        let parsed = crate::parse(src);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let text = ast(&parsed.file);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("model M @0.."), "{text}");
        assert!(lines[1].starts_with("  input x: [1, 8, 8] @"), "{text}");
        assert!(lines[2].starts_with("  layer conv c1 @"), "{text}");
        assert!(lines[3].starts_with("    arg 4 @"), "{text}");
        assert!(lines[4].starts_with("    arg kernel=3 @"), "{text}");
        assert!(lines[5].starts_with("    from x @"), "{text}");
        assert!(lines[6].starts_with("  repeat 2 @"), "{text}");
        assert!(lines[7].starts_with("    layer relu @"), "{text}");
    }

    #[test]
    fn strings_keep_their_escapes() {
        assert_eq!(string("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
