//! Argument values and binding: AST values are evaluated in a block's environment
//! (parameter names replaced by the caller's values, keeping the caller's spans),
//! bound to a signature by position or name, and read back as typed values with
//! range checks. Every failure is a diagnostic; readers return `None` after one.

use super::error::CheckError;
use super::Checker;
use crate::source::{FileId, Loc};
use cnnc_grammar::ast::{self, Span, ValueKind};
use std::collections::HashMap;

/// An evaluated value: like the AST value, but block parameters are substituted
/// and every part knows the file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct V {
    pub kind: VKind,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq)]
pub enum VKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Sym(String),
    List(Vec<V>),
    Call(String, Vec<BArg>),
}

/// One argument of a call: optional name (with its location) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct BArg {
    pub name: Option<(String, Loc)>,
    pub value: V,
    pub loc: Loc,
}

impl VKind {
    pub fn describe(&self) -> String {
        match self {
            VKind::Int(i) => format!("the integer {i}"),
            VKind::Float(f) => format!("the number {f}"),
            VKind::Str(s) => format!("the string \"{s}\""),
            VKind::Bool(b) => format!("`{b}`"),
            VKind::Sym(s) => format!("the name `{s}`"),
            VKind::List(_) => "a list".into(),
            VKind::Call(c, _) => format!("a call to `{c}`"),
        }
    }
}

/// Block parameters bound to values, for substitution.
pub type Env = HashMap<String, V>;

/// Evaluates an AST value: names that are block parameters become the bound value.
pub fn eval(v: &ast::Value, file: FileId, env: &Env) -> V {
    let loc = Loc { file, span: v.span };
    let kind = match &v.kind {
        ValueKind::Int(i) => VKind::Int(*i),
        ValueKind::Float(f) => VKind::Float(*f),
        ValueKind::Str(s) => VKind::Str(s.clone()),
        ValueKind::Bool(b) => VKind::Bool(*b),
        ValueKind::Name(n) => match env.get(n) {
            Some(bound) => return bound.clone(),
            None => VKind::Sym(n.clone()),
        },
        ValueKind::List(items) => VKind::List(items.iter().map(|i| eval(i, file, env)).collect()),
        ValueKind::Call { callee, args } => {
            VKind::Call(callee.name.clone(), eval_args(Some(args), file, env))
        }
    };
    V { kind, loc }
}

pub fn eval_args(args: Option<&ast::Args>, file: FileId, env: &Env) -> Vec<BArg> {
    args.map(|a| a.items.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| BArg {
            name: a
                .name
                .as_ref()
                .map(|n| (n.name.clone(), Loc { file, span: n.span })),
            value: eval(&a.value, file, env),
            loc: Loc { file, span: a.span },
        })
        .collect()
}

/// Arguments bound to a signature's parameter names.
#[derive(Debug)]
pub struct Bound {
    pub callee: String,
    /// The whole call (for "missing argument" errors).
    pub call: Loc,
    pub vals: HashMap<String, V>,
    /// False when an argument was unknown, repeated, surplus or missing: the
    /// others are still read and checked, but the call as a whole fails.
    pub ok: bool,
}

impl Bound {
    pub fn get(&self, name: &str) -> Option<&V> {
        self.vals.get(name)
    }
    pub fn has(&self, name: &str) -> bool {
        self.vals.contains_key(name)
    }
    /// The span of an argument if given, else of the call.
    pub fn loc_of(&self, name: &str) -> Loc {
        self.vals.get(name).map_or(self.call, |v| v.loc)
    }
}

/// A non-negative integer, a `[h, w]` pair of them, or a padding spec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadSpec {
    Explicit([u64; 2]),
    Same,
}

/// Largest integer any size-like argument may take; keeps all shape arithmetic
/// far from overflow.
pub const MAX_DIM: i64 = 1 << 24;

impl Checker<'_> {
    /// Binds `args` to `params` (positional order = `params` order).
    /// Reports unknown, duplicate and surplus arguments; `required` ones must be
    /// present. Always returns the arguments that did bind (so they are checked
    /// too); `ok` says whether the call as a whole is valid.
    pub fn bind(
        &mut self,
        callee: &str,
        call: Loc,
        params: &[&str],
        required: &[&str],
        args: &[BArg],
    ) -> Option<Bound> {
        let mut vals: HashMap<String, V> = HashMap::new();
        let mut first: HashMap<String, Loc> = HashMap::new();
        let mut ok = true;
        let mut pos = 0;
        for a in args {
            let (name, name_loc) = match &a.name {
                Some((n, l)) => {
                    if !params.contains(&n.as_str()) {
                        let help = self.did_you_mean(n, params.iter().copied()).or_else(|| {
                            Some(if params.is_empty() {
                                format!("`{callee}` takes no arguments")
                            } else {
                                format!("`{callee}` takes {}", list_all(params))
                            })
                        });
                        self.error(
                            *l,
                            CheckError::UnknownArg {
                                callee: callee.into(),
                                name: n.clone(),
                                span: l.span.into(),
                                help,
                            },
                        );
                        ok = false;
                        continue;
                    }
                    (n.clone(), *l)
                }
                None => {
                    if pos >= params.len() {
                        let help = Some(if params.is_empty() {
                            format!("`{callee}` takes no arguments")
                        } else {
                            format!("`{callee}` takes {}", list_all(params))
                        });
                        self.error(
                            a.loc,
                            CheckError::TooManyArgs {
                                callee: callee.into(),
                                max: params.len(),
                                span: a.loc.span.into(),
                                help,
                            },
                        );
                        ok = false;
                        pos += 1;
                        continue;
                    }
                    pos += 1;
                    (params[pos - 1].to_string(), a.loc)
                }
            };
            if let Some(prev) = first.get(&name) {
                let first_span = if prev.file == a.loc.file {
                    prev.span
                } else {
                    a.loc.span
                };
                self.error(
                    a.loc,
                    CheckError::DuplicateArg {
                        callee: callee.into(),
                        name: name.clone(),
                        span: name_loc.span.to(a.loc.span).into(),
                        first: first_span.into(),
                    },
                );
                ok = false;
                continue;
            }
            first.insert(name.clone(), a.loc);
            vals.insert(name, a.value.clone());
        }
        for r in required {
            if !vals.contains_key(*r) {
                let help = Some(format!(
                    "write `{callee}({}{})`",
                    required
                        .iter()
                        .map(|r| format!("{r}=…"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if params.len() > required.len() {
                        ", …"
                    } else {
                        ""
                    }
                ));
                self.error(
                    call,
                    CheckError::MissingArg {
                        callee: callee.into(),
                        what: format!("the argument `{r}`"),
                        label: format!("`{r}` missing"),
                        span: call.span.into(),
                        help,
                    },
                );
                ok = false;
            }
        }
        Some(Bound {
            callee: callee.into(),
            call,
            vals,
            ok,
        })
    }

    pub fn wrong_type(&mut self, callee: &str, name: &str, v: &V, expected: &str) {
        self.error(
            v.loc,
            CheckError::WrongType {
                callee: callee.into(),
                name: name.into(),
                expected: expected.into(),
                found: v.kind.describe(),
                span: v.loc.span.into(),
            },
        );
    }

    pub fn out_of_range(&mut self, callee: &str, name: &str, loc: Loc, rule: &str, value: String) {
        self.error(
            loc,
            CheckError::OutOfRange {
                callee: callee.into(),
                name: name.into(),
                rule: rule.into(),
                value,
                span: loc.span.into(),
                help: None,
            },
        );
    }

    /// An integer `>= min`, or `default` when absent.
    pub fn int(&mut self, b: &Bound, name: &str, default: Option<i64>, min: i64) -> Option<u64> {
        let v = match b.get(name) {
            Some(v) => v.clone(),
            None => return default.map(|d| d as u64),
        };
        self.int_value(&b.callee, name, &v, min)
    }

    fn int_value(&mut self, callee: &str, name: &str, v: &V, min: i64) -> Option<u64> {
        match v.kind {
            VKind::Int(i) if i < min => {
                let rule = if min == 1 {
                    "must be at least 1".to_string()
                } else {
                    format!("must be at least {min}")
                };
                self.out_of_range(callee, name, v.loc, &rule, i.to_string());
                None
            }
            VKind::Int(i) if i > MAX_DIM => {
                self.out_of_range(
                    callee,
                    name,
                    v.loc,
                    &format!("must be at most {MAX_DIM}"),
                    i.to_string(),
                );
                None
            }
            VKind::Int(i) => Some(i as u64),
            _ => {
                self.wrong_type(callee, name, v, "an integer");
                None
            }
        }
    }

    /// An integer or `[h, w]` pair, each `>= min`.
    pub fn pair(
        &mut self,
        b: &Bound,
        name: &str,
        default: Option<i64>,
        min: i64,
    ) -> Option<[u64; 2]> {
        let v = match b.get(name) {
            Some(v) => v.clone(),
            None => return default.map(|d| [d as u64, d as u64]),
        };
        match &v.kind {
            VKind::List(items) if items.len() == 2 => {
                let h = self.int_value(&b.callee, name, &items[0], min);
                let w = self.int_value(&b.callee, name, &items[1], min);
                Some([h?, w?])
            }
            VKind::List(_) => {
                self.wrong_type(&b.callee, name, &v, "an integer or a [height, width] pair");
                None
            }
            _ => self.int_value(&b.callee, name, &v, min).map(|i| [i, i]),
        }
    }

    /// Padding: an integer, a pair, `same` or `valid`.
    pub fn pad(&mut self, b: &Bound, name: &str, default: PadSpec) -> Option<PadSpec> {
        match b.get(name).map(|v| &v.kind) {
            None => Some(default),
            Some(VKind::Sym(s)) => {
                let v = b.get(name).unwrap().clone();
                match s.as_str() {
                    "same" => Some(PadSpec::Same),
                    "valid" => Some(PadSpec::Explicit([0, 0])),
                    other => {
                        self.unknown_choice("padding", other, v.loc, &["same", "valid"], None);
                        None
                    }
                }
            }
            Some(_) => self.pair(b, name, None, 0).map(PadSpec::Explicit),
        }
    }

    /// A number (integer or float) satisfying `ok`, described by `rule`.
    pub fn float(
        &mut self,
        b: &Bound,
        name: &str,
        default: Option<f64>,
        ok: impl Fn(f64) -> bool,
        rule: &str,
    ) -> Option<f64> {
        let v = match b.get(name) {
            Some(v) => v.clone(),
            None => return default,
        };
        self.float_value(&b.callee, name, &v, ok, rule)
    }

    pub fn float_value(
        &mut self,
        callee: &str,
        name: &str,
        v: &V,
        ok: impl Fn(f64) -> bool,
        rule: &str,
    ) -> Option<f64> {
        let x = match v.kind {
            VKind::Int(i) => i as f64,
            VKind::Float(f) => f,
            _ => {
                self.wrong_type(callee, name, v, "a number");
                return None;
            }
        };
        if !ok(x) {
            self.out_of_range(callee, name, v.loc, rule, fmt_num(x));
            return None;
        }
        Some(x)
    }

    pub fn boolean(&mut self, b: &Bound, name: &str, default: bool) -> Option<bool> {
        match b.get(name) {
            None => Some(default),
            Some(V {
                kind: VKind::Bool(x),
                ..
            }) => Some(*x),
            Some(v) => {
                let v = v.clone();
                self.wrong_type(&b.callee, name, &v, "`true` or `false`");
                None
            }
        }
    }

    pub fn string(&mut self, b: &Bound, name: &str) -> Option<String> {
        match b.get(name) {
            None => None,
            Some(V {
                kind: VKind::Str(s),
                ..
            }) => Some(s.clone()),
            Some(v) => {
                let v = v.clone();
                self.wrong_type(&b.callee, name, &v, "a string");
                None
            }
        }
    }

    /// A symbol from `choices` (`what` names the kind of thing, for messages).
    pub fn symbol(
        &mut self,
        b: &Bound,
        name: &str,
        default: &str,
        what: &str,
        choices: &[&str],
    ) -> Option<String> {
        match b.get(name).cloned() {
            None => Some(default.into()),
            Some(V {
                kind: VKind::Sym(s),
                loc,
            }) => {
                if choices.contains(&s.as_str()) {
                    Some(s)
                } else {
                    self.unknown_choice(what, &s, loc, choices, None);
                    None
                }
            }
            Some(v) => {
                let expected = format!("one of {}", list_names(choices));
                self.wrong_type(&b.callee, name, &v, &expected);
                None
            }
        }
    }

    pub fn unknown_choice(
        &mut self,
        what: &str,
        found: &str,
        loc: Loc,
        choices: &[&str],
        extra: Option<String>,
    ) {
        let help = self.did_you_mean(found, choices.iter().copied()).or(extra);
        self.error(
            loc,
            CheckError::UnknownChoice {
                what: what.into(),
                found: found.into(),
                span: loc.span.into(),
                choices: list_names(choices),
                help,
            },
        );
    }

    /// "did you mean `x`?" for the closest candidate, if any is close.
    pub fn did_you_mean<'c>(
        &self,
        name: &str,
        candidates: impl Iterator<Item = &'c str>,
    ) -> Option<String> {
        closest(name, candidates).map(|c| format!("did you mean `{c}`?"))
    }
}

/// The candidate closest to `name` by edit distance, if close enough to be a typo.
pub fn closest<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .filter(|c| *c != name)
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= limit || c.starts_with(name) && name.len() >= 3)
        // Ties go to the alphabetically first name, so the suggestion is stable.
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)))
        .map(|(_, c)| c)
}

/// "`a`, `b` or `c`"
pub fn list_names(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".into(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// "`a`, `b` and `c`"
pub fn list_all(names: &[&str]) -> String {
    list_names(names).replacen(" or ", " and ", 1)
}

/// A number as written by a person: `0.1`, `5e-4`, `3`.
pub fn fmt_num(x: f64) -> String {
    format!("{x}")
}

/// A span that may be used as a label in `file`'s source: `loc` if it is in that
/// file, else `fallback`.
pub fn span_in(loc: Loc, file: FileId, fallback: Span) -> Span {
    if loc.file == file {
        loc.span
    } else {
        fallback
    }
}
