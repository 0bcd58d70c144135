//! Warnings: valid models that are probably not what was meant.

use super::error::Lint;
use super::Checker;
use crate::checked::{CheckedModel, Op, ValueId};
use crate::source::{FileId, Loc};
use cnnc_grammar::ast::{self, Item, Stmt, ValueKind};

impl Checker<'_> {
    /// Warnings on an expanded model.
    pub(super) fn lints(&mut self, m: &CheckedModel) {
        for (i, l) in m.layers.iter().enumerate() {
            let Op::Conv { bias: true, .. } = l.op else {
                continue;
            };
            let users: Vec<_> = m.users(ValueId(i + 1)).collect();
            if let [(_, user)] = users.as_slice() {
                if matches!(user.op, Op::BatchNorm { .. } | Op::GroupNorm { .. }) {
                    // Inside a block, the fix is in the block body: name the layer as
                    // written there, and say where the block was used.
                    let local = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
                    let (layer, norm) = if l.trace.is_empty() {
                        (l.name.clone(), user.name.clone())
                    } else {
                        (local(&l.name), local(&user.name))
                    };
                    self.trace = l.trace.clone();
                    self.lint(
                        l.loc,
                        Lint::BiasBeforeNorm {
                            layer,
                            norm,
                            span: l.loc.span.into(),
                        },
                    );
                    self.trace.clear();
                }
            }
        }
    }

    /// Warnings on the blocks defined in `file`.
    pub(super) fn block_lints(&mut self, file: FileId, ast: &ast::File, has_model: bool) {
        let examples: Vec<&str> = ast
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Example(e) => Some(e.block.name.as_str()),
                _ => None,
            })
            .collect();
        for item in &ast.items {
            let Item::Block(b) = item else { continue };
            let loc = Loc {
                file,
                span: b.name.span,
            };
            let name = b.name.name.clone();
            if has_model && !self.used_blocks.contains(&name) && !super::layers::is_builtin(&name) {
                self.lint(
                    loc,
                    Lint::UnusedBlock {
                        name: name.clone(),
                        span: loc.span.into(),
                    },
                );
            }
            if !has_model && !examples.contains(&name.as_str()) {
                let params: Vec<String> = b
                    .params
                    .iter()
                    .filter(|p| p.default.is_none())
                    .map(|p| format!("{}=…", p.name.name))
                    .collect();
                self.lint(
                    loc,
                    Lint::NoExample {
                        name: name.clone(),
                        span: loc.span.into(),
                        help: Some(format!(
                            "add `example {name}({}) on [C, H, W]` after the block",
                            params.join(", ")
                        )),
                    },
                );
            }
            for p in &b.params {
                if !b.body.iter().any(|s| stmt_uses(s, &p.name.name)) {
                    self.lint(
                        Loc {
                            file,
                            span: p.name.span,
                        },
                        Lint::UnusedParam {
                            name: p.name.name.clone(),
                            block: name.clone(),
                            span: p.name.span.into(),
                        },
                    );
                }
            }
        }
    }
}

fn stmt_uses(s: &Stmt, name: &str) -> bool {
    match s {
        Stmt::Input(_) => false,
        Stmt::Repeat(r) => value_uses(&r.count, name) || r.body.iter().any(|s| stmt_uses(s, name)),
        Stmt::Layer(l) => l
            .args
            .as_ref()
            .is_some_and(|a| a.items.iter().any(|a| value_uses(&a.value, name))),
    }
}

fn value_uses(v: &ast::Value, name: &str) -> bool {
    match &v.kind {
        ValueKind::Name(n) => n == name,
        ValueKind::List(items) => items.iter().any(|i| value_uses(i, name)),
        ValueKind::Call { args, .. } => args.items.iter().any(|a| value_uses(&a.value, name)),
        _ => false,
    }
}
