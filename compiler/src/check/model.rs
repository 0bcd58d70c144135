//! Expanding a model body into a flat, shaped layer list: statements in order,
//! `from`/`add`/`concat` resolved against named values, blocks instantiated in a
//! scope of their own, `repeat` unrolled.
//!
//! An error makes the value it would have produced *unknown* (`None`): later
//! statements are still checked for names and arguments, but not for shapes, so
//! one mistake does not cascade into many.

use super::args::{eval, eval_args, span_in, BArg, Env, VKind, MAX_DIM};
use super::error::{CheckError, Lint};
use super::layers::{fmt_shape, is_builtin, Input, BUILTINS};
use super::{BlockRef, Checker};
use crate::checked::{CheckedModel, Layer, Op, Shape, ValueId};
use crate::source::{FileId, Loc, STDLIB};
use cnnc_grammar::ast::{self, Span, Stmt};
use std::collections::HashMap;

/// Largest number of layers a model may expand to.
pub const MAX_LAYERS: usize = 100_000;
/// How deeply block instances may nest.
const MAX_BLOCK_DEPTH: usize = 64;
/// Largest `repeat` count.
const MAX_REPEAT: i64 = 10_000;

/// A value that may be unknown because of an earlier error.
type Cur = Option<ValueId>;

pub(crate) struct ModelBuilder {
    input: Shape,
    input_name: String,
    layers: Vec<Layer>,
    /// Set when any statement failed: the model is then not handed on.
    failed: bool,
}

impl ModelBuilder {
    fn shape(&self, v: ValueId) -> &Shape {
        if v.0 == 0 {
            &self.input
        } else {
            &self.layers[v.0 - 1].shape
        }
    }

    fn describe(&self, v: ValueId) -> String {
        if v.0 == 0 {
            format!("the input `{}`", self.input_name)
        } else {
            format!("the output of `{}`", self.layers[v.0 - 1].name)
        }
    }
}

struct Scope {
    file: FileId,
    env: Env,
    names: HashMap<String, (Cur, Loc)>,
    /// Names given explicitly to statements of this scope (generated names avoid them).
    reserved: HashMap<String, Span>,
    input: Cur,
    prefix: String,
    counters: HashMap<String, usize>,
    /// Models and block instances are boundaries: name lookups stop there.
    boundary: bool,
    frozen: bool,
}

impl Scope {
    fn new(file: FileId, env: Env, input: Cur, prefix: String, frozen: bool) -> Self {
        Scope {
            file,
            env,
            names: HashMap::new(),
            reserved: HashMap::new(),
            input,
            prefix,
            counters: HashMap::new(),
            boundary: true,
            frozen,
        }
    }

    /// `<op><n>`, the first free one.
    fn fresh_name(&mut self, op: &str) -> String {
        loop {
            let n = self.counters.entry(op.to_string()).or_insert(0);
            *n += 1;
            let name = format!("{op}{n}");
            if !self.reserved.contains_key(&name) && !self.names.contains_key(&name) {
                return name;
            }
        }
    }
}

impl Checker<'_> {
    /// Expands and shapes a model. `None` when any statement failed.
    pub(super) fn model(&mut self, file: FileId, m: &ast::ModelDef) -> Option<CheckedModel> {
        self.expanded = 0;
        let inputs: Vec<&ast::InputStmt> = m
            .body
            .iter()
            .filter_map(|s| match s {
                Stmt::Input(i) => Some(i),
                _ => None,
            })
            .collect();
        let Some(first) = inputs.first() else {
            let loc = Loc {
                file,
                span: m.name.span,
            };
            self.error(
                loc,
                CheckError::BadInput {
                    message: format!("model `{}` has no `input` statement", m.name.name),
                    span: loc.span.into(),
                    label: "no input".into(),
                    help: Some(
                        "start the model with its input shape, e.g. `input image: [1, 28, 28]`"
                            .into(),
                    ),
                },
            );
            return None;
        };
        if !matches!(m.body.first(), Some(Stmt::Input(_))) {
            self.error(
                Loc {
                    file,
                    span: first.span,
                },
                CheckError::BadInput {
                    message: "`input` must be the first statement of the model".into(),
                    span: first.span.into(),
                    label: "not first".into(),
                    help: Some("move it to the top of the model".into()),
                },
            );
        }
        for extra in &inputs[1..] {
            self.error(
                Loc {
                    file,
                    span: extra.span,
                },
                CheckError::BadInput {
                    message: "a model has exactly one `input`".into(),
                    span: extra.span.into(),
                    label: "second input".into(),
                    help: Some(
                        "use `from NAME` to take a layer's input from an earlier value".into(),
                    ),
                },
            );
        }
        let shape = self.input_shape(file, &first.shape);
        let mut mb = ModelBuilder {
            input: shape.clone().unwrap_or_default(),
            input_name: first.name.name.clone(),
            layers: Vec::new(),
            failed: shape.is_none(),
        };
        let start: Cur = shape.map(|_| ValueId(0));
        let mut scope = Scope::new(file, Env::new(), start, String::new(), false);
        scope.names.insert(
            first.name.name.clone(),
            (
                start,
                Loc {
                    file,
                    span: first.name.span,
                },
            ),
        );
        let mut scopes = vec![scope];
        let body: Vec<&Stmt> = m
            .body
            .iter()
            .filter(|s| !matches!(s, Stmt::Input(_)))
            .collect();
        let out = self.stmts(&mut mb, &mut scopes, &body, start);
        if out.is_none() || mb.failed {
            return None;
        }
        Some(CheckedModel {
            name: m.name.name.clone(),
            input_name: mb.input_name,
            input: mb.input,
            layers: mb.layers,
        })
    }

    /// Expands `example block(args) on [C, H, W]` as a one-statement model.
    pub(super) fn example(&mut self, file: FileId, ex: &ast::ExampleDef) -> Option<CheckedModel> {
        self.expanded = 0;
        let shape = self.input_shape(file, &ex.input)?;
        let stmt = Stmt::Layer(ast::LayerStmt {
            frozen: None,
            op: ex.block.clone(),
            name: None,
            args: ex.args.clone(),
            from: None,
            span: Span::new(
                ex.block.span.start,
                ex.args.as_ref().map_or(ex.block.span.end, |a| a.span.end),
            ),
        });
        let mut mb = ModelBuilder {
            input: shape,
            input_name: "input".into(),
            layers: Vec::new(),
            failed: false,
        };
        let mut scopes = vec![Scope::new(
            file,
            Env::new(),
            Some(ValueId(0)),
            String::new(),
            false,
        )];
        let out = self.stmts(&mut mb, &mut scopes, &[&stmt], Some(ValueId(0)));
        if out.is_none() || mb.failed {
            return None;
        }
        Some(CheckedModel {
            name: ex.block.name.clone(),
            input_name: mb.input_name,
            input: mb.input,
            layers: mb.layers,
        })
    }

    /// `[C, H, W]`: three integers in 1..=MAX_DIM, at most 2^31 elements.
    fn input_shape(&mut self, file: FileId, v: &ast::Value) -> Option<Shape> {
        let loc = Loc { file, span: v.span };
        let bad = |ck: &mut Self, reason: String| {
            ck.error(
                loc,
                CheckError::InputShape {
                    reason,
                    span: loc.span.into(),
                },
            );
            None
        };
        let ast::ValueKind::List(items) = &v.kind else {
            return bad(
                self,
                format!("expected a list, found {}", v.kind.describe()),
            );
        };
        if items.len() != 3 {
            return bad(
                self,
                format!("expected 3 dimensions [C, H, W], found {}", items.len()),
            );
        }
        let mut shape = Vec::new();
        for it in items {
            match it.kind {
                ast::ValueKind::Int(i) if (1..=MAX_DIM).contains(&i) => shape.push(i as u64),
                ast::ValueKind::Int(i) if i < 1 => {
                    return bad(self, format!("dimension {i} is not positive"))
                }
                ast::ValueKind::Int(i) => {
                    return bad(self, format!("dimension {i} is larger than {MAX_DIM}"))
                }
                _ => {
                    return bad(
                        self,
                        format!("dimensions are integers, found {}", it.kind.describe()),
                    )
                }
            }
        }
        let n: u128 = shape.iter().map(|&d| d as u128).product();
        if n > 1 << 31 {
            return bad(self, format!("{n} elements per image is more than 2^31"));
        }
        Some(shape)
    }

    fn stmts(
        &mut self,
        mb: &mut ModelBuilder,
        scopes: &mut Vec<Scope>,
        body: &[&Stmt],
        mut cur: Cur,
    ) -> Cur {
        {
            let scope = scopes.last_mut().expect("a scope");
            for s in body {
                if let Stmt::Layer(l) = s {
                    if let Some(n) = &l.name {
                        scope.reserved.entry(n.name.clone()).or_insert(n.span);
                    }
                }
            }
        }
        for s in body {
            if self.expanded > MAX_LAYERS {
                mb.failed = true;
                return None;
            }
            cur = match s {
                Stmt::Input(i) => {
                    let loc = Loc {
                        file: scopes.last().unwrap().file,
                        span: i.span,
                    };
                    self.error(
                        loc,
                        CheckError::BadInput {
                            message: "`input` can only appear at the top of a model".into(),
                            span: loc.span.into(),
                            label: "not allowed here".into(),
                            help: Some("a block's input is the value it is applied to; refer to it as `input`".into()),
                        },
                    );
                    mb.failed = true;
                    cur
                }
                Stmt::Repeat(r) => self.repeat(mb, scopes, r, cur),
                Stmt::Layer(l) => self.layer(mb, scopes, l, cur),
            };
            if cur.is_none() {
                mb.failed = true;
            }
        }
        cur
    }

    fn repeat(
        &mut self,
        mb: &mut ModelBuilder,
        scopes: &mut Vec<Scope>,
        r: &ast::RepeatStmt,
        cur: Cur,
    ) -> Cur {
        let scope = scopes.last_mut().unwrap();
        let (file, env, frozen) = (scope.file, scope.env.clone(), scope.frozen);
        let local = scope.fresh_name("repeat");
        let prefix = format!("{}{local}.", scope.prefix);
        let count = eval(&r.count, file, &env);
        let n = match count.kind {
            VKind::Int(i) if (1..=MAX_REPEAT).contains(&i) => Some(i as usize),
            VKind::Int(i) => {
                self.out_of_range(
                    "repeat",
                    "count",
                    count.loc,
                    &format!("must lie between 1 and {MAX_REPEAT}"),
                    i.to_string(),
                );
                None
            }
            _ => {
                self.wrong_type("repeat", "count", &count, "an integer");
                None
            }
        };
        let body: Vec<&Stmt> = r.body.iter().collect();
        let mut out = cur;
        self.repeats.push(count.loc);
        for i in 0..n.unwrap_or(1) {
            let mut s = Scope::new(file, env.clone(), out, format!("{prefix}{i}."), frozen);
            s.boundary = false;
            scopes.push(s);
            out = self.stmts(mb, scopes, &body, out);
            scopes.pop();
            if out.is_none() {
                break;
            }
        }
        self.repeats.pop();
        n.and(out)
    }

    fn layer(
        &mut self,
        mb: &mut ModelBuilder,
        scopes: &mut Vec<Scope>,
        st: &ast::LayerStmt,
        cur: Cur,
    ) -> Cur {
        let file = scopes.last().unwrap().file;
        let at = |span: Span| Loc { file, span };
        let op = st.op.name.as_str();
        let op_loc = at(st.op.span);
        let call_loc = at(Span::new(
            st.op.span.start,
            st.args.as_ref().map_or(st.op.span.end, |a| a.span.end),
        ));
        let input: Cur = match &st.from {
            Some(from) => self.lookup(scopes, &from.name, at(from.span)),
            None => cur,
        };
        let args = eval_args(st.args.as_ref(), file, &scopes.last().unwrap().env);
        let frozen = scopes.last().unwrap().frozen || st.frozen.is_some();

        // Name the statement and check it is new in this scope.
        let scope = scopes.last_mut().unwrap();
        let local = match &st.name {
            Some(n) => {
                if let Some((_, prev)) = scope.names.get(&n.name) {
                    let first = (prev.file == file).then_some(prev.span.into());
                    self.error(
                        at(n.span),
                        CheckError::DuplicateName {
                            name: n.name.clone(),
                            span: n.span.into(),
                            first,
                        },
                    );
                }
                n.name.clone()
            }
            None => scope.fresh_name(op),
        };
        let full = format!("{}{local}", scope.prefix);
        let name_loc = at(st.name.as_ref().map_or(st.op.span, |n| n.span));

        let out = if op == "add" || op == "concat" {
            if let Some(f) = &st.from {
                self.error(
                    at(f.span),
                    CheckError::UnknownArg {
                        callee: op.into(),
                        name: "from".into(),
                        span: f.span.into(),
                        help: Some(format!(
                            "`{op}` takes its inputs as arguments: `{op}(a, b)`"
                        )),
                    },
                );
            }
            self.merge(
                mb,
                scopes,
                op,
                &full,
                op_loc,
                call_loc,
                &args,
                frozen,
                at(st.span),
            )
        } else if is_builtin(op) {
            let input_desc = input.map(|v| (mb.shape(v).clone(), mb.describe(v)));
            let built = self.builtin(
                op,
                &full,
                op_loc,
                call_loc,
                &args,
                input_desc.as_ref().map(|(shape, from)| Input {
                    shape,
                    from: from.clone(),
                }),
            );
            match (built, input) {
                (Some(b), Some(inp)) => {
                    if let Some(kw) = st.frozen.filter(|_| !b.op.has_params()) {
                        self.lint(
                            at(kw),
                            Lint::FrozenNothing {
                                layer: full.clone(),
                                span: kw.into(),
                            },
                        );
                    }
                    Some(self.push_layer(
                        mb,
                        full.clone(),
                        op,
                        b.op,
                        vec![inp],
                        b.shape,
                        b.params,
                        b.macs,
                        frozen,
                        at(st.span),
                    ))
                }
                _ => None,
            }
        } else if let Some(bref) = self.blocks.get(op).cloned() {
            self.instantiate(mb, scopes, &bref, st, &full, &args, input, frozen, call_loc)
        } else {
            self.unknown_op(op, op_loc);
            None
        };
        scopes
            .last_mut()
            .unwrap()
            .names
            .insert(local, (out, name_loc));
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn push_layer(
        &mut self,
        mb: &mut ModelBuilder,
        name: String,
        op_name: &str,
        op: Op,
        inputs: Vec<ValueId>,
        shape: Shape,
        params: u64,
        macs: u64,
        frozen: bool,
        loc: Loc,
    ) -> ValueId {
        self.expanded += 1;
        if self.expanded == MAX_LAYERS + 1 {
            // The outermost `repeat` count is what multiplies the layers.
            let at = self.repeats.first().copied().unwrap_or(loc);
            self.error(
                at,
                CheckError::TooManyLayers {
                    limit: MAX_LAYERS,
                    span: at.span.into(),
                },
            );
        }
        let trace = self.trace.clone();
        mb.layers.push(Layer {
            name,
            op_name: op_name.into(),
            op,
            inputs,
            shape,
            params,
            macs,
            frozen,
            loc,
            trace,
        });
        ValueId(mb.layers.len())
    }

    fn unknown_op(&mut self, op: &str, loc: Loc) {
        let candidates: Vec<&str> = BUILTINS
            .iter()
            .map(|(n, _)| *n)
            .chain(self.blocks.keys().map(String::as_str))
            .collect();
        let help = match stdlib_block(op) {
            Some(file) => Some(format!("`{op}` is a block of the standard library: add `import \"{file}\"` at the top of the file")),
            None => self.did_you_mean(op, candidates.into_iter()),
        };
        self.error(
            loc,
            CheckError::UnknownOp {
                name: op.into(),
                span: loc.span.into(),
                help,
            },
        );
    }

    /// Resolves a named value: the enclosing scopes up to the nearest block or
    /// model boundary; `input` is the nearest scope's input.
    fn lookup(&mut self, scopes: &[Scope], name: &str, loc: Loc) -> Cur {
        if name == "input" {
            return scopes.last().unwrap().input;
        }
        for s in scopes.iter().rev() {
            if let Some((v, _)) = s.names.get(name) {
                return *v;
            }
            if s.boundary {
                break;
            }
        }
        let mut visible: Vec<&str> = vec!["input"];
        let mut later = None;
        for s in scopes.iter().rev() {
            visible.extend(s.names.keys().map(String::as_str));
            if later.is_none() {
                later = s.reserved.get(name).copied().filter(|_| s.file == loc.file);
            }
            if s.boundary {
                break;
            }
        }
        let help =
            match later {
                Some(span) => Some(format!(
                "`{name}` is defined later, at {}; a layer can only use values defined before it",
                self.sources.describe(Loc { file: loc.file, span })
            )),
                None => self.did_you_mean(name, visible.into_iter()),
            };
        self.error(
            loc,
            CheckError::UnknownValue {
                name: name.into(),
                span: loc.span.into(),
                help,
            },
        );
        None
    }

    /// `add(a, b, …)` and `concat(a, b, …)`.
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        mb: &mut ModelBuilder,
        scopes: &[Scope],
        op: &str,
        full: &str,
        op_loc: Loc,
        call_loc: Loc,
        args: &[BArg],
        frozen: bool,
        stmt_loc: Loc,
    ) -> Cur {
        let mut ids: Vec<(Cur, Loc)> = Vec::new();
        let mut ok = true;
        for a in args {
            if let Some((n, l)) = &a.name {
                self.error(
                    *l,
                    CheckError::UnknownArg {
                        callee: op.into(),
                        name: n.clone(),
                        span: l.span.into(),
                        help: Some(format!(
                            "`{op}` takes only the names of the values to {op}: `{op}(a, b)`"
                        )),
                    },
                );
                ok = false;
                continue;
            }
            match &a.value.kind {
                VKind::Sym(s) => ids.push((self.lookup(scopes, s, a.value.loc), a.value.loc)),
                _ => {
                    self.wrong_type(op, "inputs", &a.value, "the name of a value");
                    ok = false;
                }
            }
        }
        if ids.len() < 2 && ok {
            self.error(
                call_loc,
                CheckError::MissingArg {
                    callee: op.into(),
                    what: format!("at least two values, got {}", ids.len()),
                    label: if ids.is_empty() {
                        "no values".into()
                    } else {
                        "only one value".into()
                    },
                    span: call_loc.span.into(),
                    help: Some(format!(
                        "`{op}` needs at least two named values, e.g. `{op}(skip, branch)`"
                    )),
                },
            );
            return None;
        }
        // Every input known (an unknown one was already reported).
        let known: Vec<(ValueId, Loc)> = ids
            .iter()
            .map(|&(v, l)| v.map(|v| (v, l)))
            .collect::<Option<_>>()?;
        if !ok {
            return None;
        }
        let file = op_loc.file;
        let (first, first_loc) = known[0];
        let mut shape = mb.shape(first).clone();
        for &(v, loc) in &known[1..] {
            let other = mb.shape(v).clone();
            let left_span = span_in(first_loc, file, op_loc.span);
            let right_span = span_in(loc, file, op_loc.span);
            if op == "add" {
                if other != shape {
                    let help = add_help(&shape, &other, mb.describe(first), mb.describe(v));
                    self.error(
                        loc,
                        CheckError::AddShapes {
                            layer: full.into(),
                            left: fmt_shape(&shape),
                            right: fmt_shape(&other),
                            left_span: left_span.into(),
                            right_span: right_span.into(),
                            help,
                        },
                    );
                    return None;
                }
            } else {
                let compatible = shape.len() == other.len() && shape[1..] == other[1..];
                if !compatible {
                    let help = Some(if shape.len() != other.len() {
                        "concat joins feature maps with feature maps, or vectors with vectors"
                            .to_string()
                    } else {
                        "concat joins along channels, so height and width must match: pool or stride the larger one".to_string()
                    });
                    self.error(
                        loc,
                        CheckError::ConcatShapes {
                            layer: full.into(),
                            left: fmt_shape(&shape),
                            right: fmt_shape(&other),
                            left_span: left_span.into(),
                            right_span: right_span.into(),
                            help,
                        },
                    );
                    return None;
                }
                shape[0] += other[0];
            }
        }
        let (op_enum, op_name) = if op == "add" {
            (Op::Add, "add")
        } else {
            (Op::Concat, "concat")
        };
        let inputs = known.iter().map(|(v, _)| *v).collect();
        Some(self.push_layer(
            mb,
            full.into(),
            op_name,
            op_enum,
            inputs,
            shape,
            0,
            0,
            frozen,
            stmt_loc,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn instantiate(
        &mut self,
        mb: &mut ModelBuilder,
        scopes: &mut Vec<Scope>,
        bref: &BlockRef,
        st: &ast::LayerStmt,
        full: &str,
        args: &[BArg],
        input: Cur,
        frozen: bool,
        call_loc: Loc,
    ) -> Cur {
        let def = bref.def.clone();
        let name = def.name.name.clone();
        let use_loc = Loc {
            file: scopes.last().unwrap().file,
            span: st.span,
        };
        if self.trace.iter().any(|(b, _)| *b == name) {
            self.error(
                Loc {
                    file: use_loc.file,
                    span: st.op.span,
                },
                CheckError::RecursiveBlock {
                    name: name.clone(),
                    span: st.op.span.into(),
                },
            );
            return None;
        }
        if self.trace.len() >= MAX_BLOCK_DEPTH {
            self.error(
                Loc {
                    file: use_loc.file,
                    span: st.op.span,
                },
                CheckError::BlocksTooDeep {
                    limit: MAX_BLOCK_DEPTH,
                    span: st.op.span.into(),
                },
            );
            return None;
        }
        self.used_blocks.insert(name.clone());
        let params: Vec<&str> = def.params.iter().map(|p| p.name.name.as_str()).collect();
        let required: Vec<&str> = def
            .params
            .iter()
            .filter(|p| p.default.is_none())
            .map(|p| p.name.name.as_str())
            .collect();
        let bound = self.bind(&name, call_loc, &params, &required, args);
        let mut env = Env::new();
        for p in &def.params {
            let v = match bound.as_ref().and_then(|b| b.get(&p.name.name)) {
                Some(v) => v.clone(),
                None => match &p.default {
                    Some(d) => eval(d, bref.file, &Env::new()),
                    // Missing (already reported): leave the name unbound.
                    None => continue,
                },
            };
            env.insert(p.name.name.clone(), v);
        }
        // A missing argument would leave a parameter unbound and every use of it
        // an error of its own: report only the missing argument.
        if required.iter().any(|r| !env.contains_key(*r)) {
            return None;
        }
        let scope = Scope::new(bref.file, env, input, format!("{full}."), frozen);
        scopes.push(scope);
        self.trace.push((name, use_loc));
        let body: Vec<&Stmt> = def.body.iter().collect();
        let out = self.stmts(mb, scopes, &body, input);
        self.trace.pop();
        scopes.pop();
        bound.filter(|b| b.ok).and(out)
    }
}

/// The stdlib file that defines block `name`, if any (found by a textual scan, so
/// the help can suggest the import without loading every file).
fn stdlib_block(name: &str) -> Option<&'static str> {
    STDLIB.iter().find_map(|(file, text)| {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix("block "))
            .any(|rest| {
                rest.trim_start()
                    .strip_prefix(name)
                    .is_some_and(|r| r.trim_start().starts_with('('))
            })
            .then_some(*file)
    })
}

fn add_help(left: &Shape, right: &Shape, left_desc: String, right_desc: String) -> Option<String> {
    if left.len() == 3 && right.len() == 3 {
        // Project the value with the larger map onto the other's shape.
        let (big, small, which) = if right[1] >= left[1] {
            (right, left, right_desc)
        } else {
            (left, right, left_desc)
        };
        let c = small[0];
        if big[1] != small[1] && big[1] % small[1] == 0 && big[2] % small[2] == 0 {
            let s = big[1] / small[1];
            return Some(format!(
                "project {which} with a strided 1×1 conv: `conv proj({c}, kernel=1, stride={s}) from …`"
            ));
        }
        if big[1] != small[1] {
            return Some(format!(
                "the maps are {}×{} and {}×{}: a conv without padding shrinks its input; give the branch `pad=same`",
                left[1], left[2], right[1], right[2]
            ));
        }
        if big[2] == small[2] {
            return Some(format!(
                "the channels differ: project {which} with `conv proj({c}, kernel=1) from …`"
            ));
        }
    }
    Some("both values must have the same shape".into())
}
