//! pest parse tree → typed AST, with error recovery: every statement the grammar
//! could not read becomes a [`SyntaxError`] and the rest of the file is still built.

use crate::ast::*;
use crate::error::SyntaxError;
use pest::iterators::Pair;
use pest::Parser as _;
use std::sync::Once;

#[derive(pest_derive::Parser)]
#[grammar = "../cnn.pest"]
struct CnnParser;

/// The result of parsing one file: parsing never fails, it returns a (possibly
/// partial) tree and the list of syntax errors.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub file: File,
    pub errors: Vec<SyntaxError>,
}

/// Parses one `.cnn` source text.
pub fn parse(src: &str) -> Parsed {
    static DETAIL: Once = Once::new();
    DETAIL.call_once(|| pest::set_error_detail(true));

    if let Some(at) = too_deep(src) {
        return Parsed {
            file: File { items: Vec::new() },
            errors: vec![SyntaxError::TooDeep {
                limit: SyntaxError::MAX_NESTING,
                span: (at, 1).into(),
            }],
        };
    }
    let mut b = Builder {
        src,
        errors: Vec::new(),
    };
    let file = match CnnParser::parse(Rule::file, src) {
        Ok(mut pairs) => b.file(pairs.next().expect("file rule yields one pair")),
        Err(e) => {
            // The recovery rules accept any text, so this is only reached on
            // pathological input (e.g. nesting deep enough to hit pest's guard).
            b.errors.push(b.pest_error(e, 0));
            File { items: Vec::new() }
        }
    };
    b.errors.sort_by_key(|e| e.span().offset());
    Parsed {
        file,
        errors: b.errors,
    }
}

struct Builder<'s> {
    src: &'s str,
    errors: Vec<SyntaxError>,
}

fn span_of(p: &Pair<'_, Rule>) -> Span {
    let s = p.as_span();
    Span::new(s.start(), s.end())
}

impl<'s> Builder<'s> {
    fn file(&mut self, pair: Pair<'_, Rule>) -> File {
        let mut items = Vec::new();
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::import => items.push(Item::Import(self.import(p))),
                Rule::block => items.push(Item::Block(self.block(p))),
                Rule::model => items.push(Item::Model(self.model(p))),
                Rule::train => items.push(Item::Train(self.train(p))),
                Rule::explain => items.push(Item::Explain(self.explain(p))),
                Rule::example => items.push(Item::Example(self.example(p))),
                Rule::bad_item => self.bad(&p, Rule::probe_item, "an item"),
                Rule::EOI => {}
                r => unreachable!("file: unexpected rule {r:?}"),
            }
        }
        File { items }
    }

    /// Re-parses a region the grammar skipped, to report what was expected there.
    fn bad(&mut self, p: &Pair<'_, Rule>, probe: Rule, what: &str) {
        let start = p.as_span().start();
        let err = match CnnParser::parse(probe, &self.src[start..]) {
            Err(e) => self.pest_error(e, start),
            Ok(_) => {
                let sp = span_of(p);
                SyntaxError::Unexpected {
                    message: format!("could not read this as {what}"),
                    span: sp.into(),
                    label: "not understood".into(),
                    help: None,
                }
            }
        };
        self.errors.push(err);
    }

    fn pest_error(&self, e: pest::error::Error<Rule>, offset: usize) -> SyntaxError {
        let rule_pos = match e.location {
            pest::error::InputLocation::Pos(p) => p,
            pest::error::InputLocation::Span((s, _)) => s,
        };
        // pest reports rule-level expectations at one position and literal tokens
        // at the furthest position reached; the furthest one is where the user erred.
        let attempts = e.parse_attempts();
        let token_pos = attempts.as_ref().map_or(rule_pos, |a| a.max_position);
        let pos = rule_pos.max(token_pos);
        let mut expected: Vec<String> = Vec::new();
        if rule_pos == pos {
            if let pest::error::ErrorVariant::ParsingError { positives, .. } = &e.variant {
                expected.extend(
                    positives
                        .iter()
                        .filter_map(|r| describe_rule(*r))
                        .map(String::from),
                );
            }
        }
        if let Some(att) = attempts.filter(|_| token_pos == pos) {
            for t in att.expected_tokens() {
                // `ParsingToken` is not exported; its Display is the token text.
                let token = t.to_string();
                let d = match token.as_str() {
                    "\r\n" | "\n" | "\r" => "end of line".to_string(),
                    // Punctuation that structures the language is worth naming;
                    // the characters that start numbers, names and comments are not.
                    t @ ("(" | ")" | "[" | "]" | "{" | "}" | "," | "=" | ":" | ";" | "->"
                    | "..") => {
                        format!("`{t}`")
                    }
                    t if t.len() > 1 && t.chars().all(|c| c.is_ascii_lowercase()) => {
                        format!("`{t}`")
                    }
                    _ => continue,
                };
                expected.push(d);
            }
        }
        let pos = pos + offset;
        // Newlines are allowed inside brackets, but saying so only adds noise.
        if expected.iter().any(|e| e == "`)`" || e == "`]`") {
            expected.retain(|e| e != "end of line");
        }
        expected.sort();
        expected.dedup();
        // Keep the list short and readable: a name or a value subsumes the rest.
        if expected.iter().any(|e| e == "a value") {
            expected.retain(|e| {
                !matches!(
                    e.as_str(),
                    "a number"
                        | "a string"
                        | "`true` or `false`"
                        | "`true`"
                        | "`false`"
                        | "`input`"
                )
            });
        }
        let found = self.token_at(pos);
        let message = match &found {
            None => "unexpected end of file".to_string(),
            Some(t) if t == "\n" || t == "\r\n" => "unexpected end of line".to_string(),
            Some(t) => format!("unexpected `{t}`"),
        };
        if expected.is_empty() {
            // pest records no expectation when only whitespace was tried at the
            // furthest position (e.g. `maxpool(2 2)`): inside brackets, a
            // separator or the closing bracket is what was missing.
            match innermost_open(&self.src[offset..pos]) {
                Some('(') => expected = vec!["`,`".into(), "`)`".into()],
                Some('[') => expected = vec!["`,`".into(), "`]`".into()],
                _ => {}
            }
        }
        // In argument lists "a name" (of a named argument) and `[` (a list) are
        // kinds of value.
        if expected.iter().any(|e| e == "a value") {
            expected.retain(|e| e != "a name" && e != "`[`");
        }
        let label = if expected.is_empty() {
            "not expected here".to_string()
        } else {
            format!("expected {}", join_or(&expected))
        };
        let len = found.as_ref().map_or(0, |t| t.len());
        let help = self
            .unclosed_hint(pos)
            .or_else(|| keyword_typo(found.as_deref(), &expected));
        SyntaxError::Unexpected {
            message,
            span: (pos, len).into(),
            label,
            help,
        }
    }

    /// The token starting at `pos`: a word, a number, a newline or one character.
    fn token_at(&self, pos: usize) -> Option<String> {
        let rest = &self.src[pos.min(self.src.len())..];
        let mut chars = rest.char_indices();
        let (_, c) = chars.next()?;
        if c == '\r' && rest.starts_with("\r\n") {
            return Some("\r\n".into());
        }
        if c.is_alphanumeric() || c == '_' || c == '.' {
            let end = rest
                .char_indices()
                .find(|&(_, c)| !(c.is_alphanumeric() || c == '_' || c == '.'))
                .map_or(rest.len(), |(i, _)| i);
            return Some(rest[..end].to_string());
        }
        Some(c.to_string())
    }

    /// When the error is at the end of the file, name the bracket left open.
    fn unclosed_hint(&self, pos: usize) -> Option<String> {
        if pos < self.src.trim_end().len() {
            return None;
        }
        let mut stack: Vec<(char, usize)> = Vec::new();
        let mut in_str = false;
        let mut in_comment = false;
        let mut chars = self.src.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if in_comment {
                if c == '\n' {
                    in_comment = false;
                }
                continue;
            }
            if in_str {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' | '\n' => in_str = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_str = true,
                '#' => in_comment = true,
                '/' if chars.peek().map(|x| x.1) == Some('/') => in_comment = true,
                '(' | '[' | '{' => stack.push((c, i)),
                ')' | ']' | '}' => {
                    stack.pop();
                }
                _ => {}
            }
        }
        let (c, at) = stack.last()?;
        let line = self.src[..*at].matches('\n').count() + 1;
        let close = match c {
            '(' => ')',
            '[' => ']',
            _ => '}',
        };
        Some(format!(
            "the `{c}` on line {line} is never closed: add `{close}`"
        ))
    }

    fn import(&mut self, p: Pair<'_, Rule>) -> Import {
        let span = span_of(&p);
        let s = p
            .into_inner()
            .find(|q| q.as_rule() == Rule::string)
            .unwrap();
        Import {
            path: self.string(s),
            span,
        }
    }

    fn block(&mut self, p: Pair<'_, Rule>) -> BlockDef {
        let span = span_of(&p);
        let mut it = p.into_inner().skip(1); // kw_block
        let name = ident(it.next().unwrap());
        let params = it
            .next()
            .unwrap()
            .into_inner()
            .map(|q| {
                let span = span_of(&q);
                let mut qi = q.into_inner();
                let name = ident(qi.next().unwrap());
                let default = qi.next().map(|v| self.value(v));
                Param {
                    name,
                    default,
                    span,
                }
            })
            .collect();
        let body = self.body(it.next().unwrap());
        BlockDef {
            name,
            params,
            body,
            span,
        }
    }

    fn model(&mut self, p: Pair<'_, Rule>) -> ModelDef {
        let span = span_of(&p);
        let mut it = p.into_inner().skip(1);
        let name = ident(it.next().unwrap());
        let body = self.body(it.next().unwrap());
        ModelDef { name, body, span }
    }

    fn example(&mut self, p: Pair<'_, Rule>) -> ExampleDef {
        let span = span_of(&p);
        let mut block = None;
        let mut args = None;
        let mut input = None;
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::ident => block = Some(ident(q)),
                Rule::args => args = Some(self.args(q)),
                Rule::list => input = Some(self.value(q)),
                _ => {}
            }
        }
        ExampleDef {
            block: block.unwrap(),
            args,
            input: input.unwrap(),
            span,
        }
    }

    fn body(&mut self, p: Pair<'_, Rule>) -> Vec<Stmt> {
        let mut out = Vec::new();
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::input_stmt => {
                    let span = span_of(&q);
                    let mut it = q.into_inner().skip(1);
                    let name = ident(it.next().unwrap());
                    let shape = self.value(it.next().unwrap());
                    out.push(Stmt::Input(InputStmt { name, shape, span }));
                }
                Rule::repeat_stmt => {
                    let span = span_of(&q);
                    let mut it = q.into_inner().skip(1);
                    let count = self.value(it.next().unwrap());
                    let body = self.body(it.next().unwrap());
                    out.push(Stmt::Repeat(RepeatStmt { count, body, span }));
                }
                Rule::layer_stmt => out.push(Stmt::Layer(self.layer(q))),
                Rule::bad_stmt => self.bad(&q, Rule::probe_stmt, "a statement"),
                r => unreachable!("body: unexpected rule {r:?}"),
            }
        }
        out
    }

    fn layer(&mut self, p: Pair<'_, Rule>) -> LayerStmt {
        let span = span_of(&p);
        let mut frozen = None;
        let mut op = None;
        let mut name = None;
        let mut args = None;
        let mut from = None;
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::frozen => frozen = Some(span_of(&q)),
                Rule::ident => op = Some(ident(q)),
                Rule::layer_name => name = Some(ident(q.into_inner().next().unwrap())),
                Rule::args => args = Some(self.args(q)),
                Rule::from_clause => {
                    let n = q.into_inner().nth(1).unwrap();
                    from = Some(Ident {
                        name: n.as_str().to_string(),
                        span: span_of(&n),
                    });
                }
                r => unreachable!("layer: unexpected rule {r:?}"),
            }
        }
        // pest's span includes a trailing comment tried by the optional parts;
        // end the statement at its last token instead.
        let op = op.unwrap();
        let end = [
            Some(op.span.end),
            name.as_ref().map(|n| n.span.end),
            args.as_ref().map(|a| a.span.end),
            from.as_ref().map(|f| f.span.end),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(span.end);
        LayerStmt {
            frozen,
            op,
            name,
            args,
            from,
            span: Span::new(span.start, end),
        }
    }

    fn train(&mut self, p: Pair<'_, Rule>) -> TrainDef {
        let span = span_of(&p);
        let mut entries = Vec::new();
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::kw_train => {}
                Rule::train_entry => {
                    let span = span_of(&q);
                    let mut it = q.into_inner();
                    let key = ident(it.next().unwrap());
                    let value = self.value(it.next().unwrap());
                    entries.push(TrainEntry { key, value, span });
                }
                Rule::bad_stmt => self.bad(&q, Rule::probe_train_entry, "a setting"),
                r => unreachable!("train: unexpected rule {r:?}"),
            }
        }
        TrainDef { entries, span }
    }

    fn explain(&mut self, p: Pair<'_, Rule>) -> ExplainDef {
        let span = span_of(&p);
        let mut directives = Vec::new();
        for q in p.into_inner() {
            match q.as_rule() {
                Rule::kw_explain => {}
                Rule::directive => directives.push(self.directive(q)),
                Rule::bad_stmt => self.bad(&q, Rule::probe_directive, "a directive"),
                r => unreachable!("explain: unexpected rule {r:?}"),
            }
        }
        ExplainDef { directives, span }
    }

    fn directive(&mut self, p: Pair<'_, Rule>) -> Directive {
        let span = span_of(&p);
        let mut it = p.into_inner();
        let method = ident(it.next().unwrap());
        let mut d = Directive {
            method,
            args: None,
            options: Vec::new(),
            on: Vec::new(),
            outputs: Vec::new(),
            span,
        };
        for q in it {
            match q.as_rule() {
                Rule::args => d.args = Some(self.args(q)),
                Rule::named_arg => d.options.push(self.arg(q)),
                Rule::out_clause => {
                    let s = q.into_inner().next().unwrap();
                    d.outputs.push(self.string(s));
                }
                Rule::on_clause => {
                    let span = span_of(&q);
                    let mut qi = q.into_inner().skip(1);
                    let split = ident(qi.next().unwrap());
                    let selection = qi.next().map(|s| self.selection(s));
                    d.on.push(SampleSel {
                        split,
                        selection,
                        span,
                    });
                }
                r => unreachable!("directive: unexpected rule {r:?}"),
            }
        }
        let end = [
            Some(d.method.span.end),
            d.args.as_ref().map(|a| a.span.end),
            d.options.iter().map(|o| o.span.end).max(),
            d.on.iter().map(|o| o.span.end).max(),
            d.outputs.iter().map(|o| o.span.end).max(),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(d.span.end);
        d.span = Span::new(d.span.start, end);
        d
    }

    fn selection(&mut self, p: Pair<'_, Rule>) -> Selection {
        let span = span_of(&p);
        let inner = p.into_inner().next().unwrap();
        let mut ints = Vec::new();
        let rule = inner.as_rule();
        for n in inner.into_inner() {
            let sp = span_of(&n);
            let v = self.int(n.as_str(), sp, 10).unwrap_or(0);
            ints.push((v, sp));
        }
        match rule {
            Rule::range => Selection::Range {
                start: ints[0].0,
                end: ints[1].0,
                span,
            },
            _ => Selection::List {
                indices: ints,
                span,
            },
        }
    }

    fn args(&mut self, p: Pair<'_, Rule>) -> Args {
        let span = span_of(&p);
        let items = p.into_inner().map(|q| self.arg(q)).collect();
        Args { items, span }
    }

    fn arg(&mut self, p: Pair<'_, Rule>) -> Arg {
        let span = span_of(&p);
        if p.as_rule() == Rule::named_arg {
            let mut it = p.into_inner();
            let name = ident(it.next().unwrap());
            let value = self.value(it.next().unwrap());
            Arg {
                name: Some(name),
                value,
                span,
            }
        } else {
            Arg {
                name: None,
                value: self.value(p),
                span,
            }
        }
    }

    fn value(&mut self, p: Pair<'_, Rule>) -> Value {
        let span = span_of(&p);
        let text = p.as_str();
        let kind = match p.as_rule() {
            Rule::dec_int => ValueKind::Int(self.int(text, span, 10).unwrap_or(0)),
            Rule::hex_int => ValueKind::Int(self.int(text, span, 16).unwrap_or(0)),
            Rule::bin_int => ValueKind::Int(self.int(text, span, 2).unwrap_or(0)),
            Rule::oct_int => ValueKind::Int(self.int(text, span, 8).unwrap_or(0)),
            Rule::float => {
                let v: f64 = text.replace('_', "").parse().unwrap_or(f64::NAN);
                if !v.is_finite() {
                    self.errors.push(SyntaxError::NumberOutOfRange {
                        text: text.into(),
                        span: span.into(),
                    });
                    ValueKind::Float(0.0)
                } else {
                    ValueKind::Float(v)
                }
            }
            Rule::string => ValueKind::Str(self.string(p).value),
            Rule::boolean => ValueKind::Bool(text == "true"),
            Rule::name => ValueKind::Name(text.to_string()),
            Rule::list => ValueKind::List(p.into_inner().map(|q| self.value(q)).collect()),
            Rule::call => {
                let mut it = p.into_inner();
                let callee = ident(it.next().unwrap());
                let args = self.args(it.next().unwrap());
                ValueKind::Call { callee, args }
            }
            r => unreachable!("value: unexpected rule {r:?}"),
        };
        Value { kind, span }
    }

    /// Parses an integer literal (sign, radix prefix, underscores), reporting overflow.
    fn int(&mut self, text: &str, span: Span, radix: u32) -> Option<i64> {
        let (neg, body) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let digits: String = if radix == 10 { body } else { &body[2..] }
            .chars()
            .filter(|&c| c != '_')
            .collect();
        let magnitude = u64::from_str_radix(&digits, radix).ok();
        let v = magnitude.and_then(|m| {
            if neg {
                0i64.checked_sub_unsigned(m)
            } else {
                i64::try_from(m).ok()
            }
        });
        if v.is_none() {
            self.errors.push(SyntaxError::IntOutOfRange {
                text: text.into(),
                span: span.into(),
            });
        }
        v
    }

    fn string(&mut self, p: Pair<'_, Rule>) -> StrLit {
        let span = span_of(&p);
        let body = p.into_inner().next().unwrap();
        let base = body.as_span().start();
        let raw = body.as_str();
        let mut value = String::with_capacity(raw.len());
        let mut chars = raw.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some((_, '"')) => value.push('"'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((j, other)) => {
                    let end = j + other.len_utf8();
                    self.errors.push(SyntaxError::BadEscape {
                        text: raw[i..end].to_string(),
                        span: (base + i, end - i).into(),
                    });
                }
                None => {}
            }
        }
        StrLit { value, span }
    }
}

fn ident(p: Pair<'_, Rule>) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: span_of(&p),
    }
}

/// A user-facing name for a grammar rule in "expected ..." lists.
fn describe_rule(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::ident | Rule::layer_name => "a name",
        Rule::split_name => "`train` or `test`",
        Rule::name | Rule::call | Rule::list => "a value",
        Rule::dec_int | Rule::hex_int | Rule::bin_int | Rule::oct_int | Rule::float => "a number",
        Rule::string => "a string",
        Rule::boolean => "`true` or `false`",
        Rule::args | Rule::params => "`(`",
        Rule::named_arg => "an argument",
        Rule::body => "`{`",
        Rule::selection => "`[`",
        Rule::range => "a range such as `0..16`",
        Rule::from_clause | Rule::kw_from => "`from`",
        Rule::kw_on | Rule::on_clause => "`on`",
        Rule::out_clause => "`->`",
        Rule::kw_import => "`import`",
        Rule::kw_block => "`block`",
        Rule::kw_model => "`model`",
        Rule::kw_train => "`train`",
        Rule::kw_explain => "`explain`",
        Rule::kw_example => "`example`",
        Rule::kw_repeat => "`repeat`",
        Rule::kw_frozen | Rule::frozen => "`frozen`",
        Rule::kw_input => "`input`",
        Rule::param => "a parameter",
        Rule::train_entry => "a setting",
        Rule::directive => "a directive",
        Rule::EOI => "end of file",
        _ => return None,
    })
}

/// The offset of the first bracket that opens level `MAX_NESTING + 1`, if any
/// (brackets in strings and comments do not count).
fn too_deep(src: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut chars = src.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match (in_str, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"' | '\n') => in_str = false,
            (true, _) => {}
            (false, '"') => in_str = true,
            (false, '#') => while chars.next_if(|(_, c)| *c != '\n').is_some() {},
            (false, '/') if chars.peek().map(|p| p.1) == Some('/') => {
                while chars.next_if(|(_, c)| *c != '\n').is_some() {}
            }
            (false, '/') if chars.peek().map(|p| p.1) == Some('*') => {
                chars.next();
                let mut prev = ' ';
                for (_, c) in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            (false, '(' | '[' | '{') => {
                depth += 1;
                if depth > SyntaxError::MAX_NESTING {
                    return Some(i);
                }
            }
            (false, ')' | ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The innermost bracket left open in `text` (strings and comments ignored).
fn innermost_open(text: &str) -> Option<char> {
    let mut stack = Vec::new();
    let mut in_str = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => in_str = false,
            (true, _) => {}
            (false, '"') => in_str = true,
            (false, '#') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            (false, '(' | '[' | '{') => stack.push(c),
            (false, ')' | ']' | '}') => {
                stack.pop();
            }
            _ => {}
        }
    }
    stack.pop()
}

/// "did you mean `train`?" when a misspelt keyword stands where keywords were expected.
fn keyword_typo(found: Option<&str>, expected: &[String]) -> Option<String> {
    let word = found?;
    expected
        .iter()
        .filter_map(|e| e.strip_prefix('`')?.strip_suffix('`'))
        .filter(|k| k.len() > 2 && k.chars().all(|c| c.is_ascii_lowercase()))
        .map(|k| (strsim::damerau_levenshtein(word, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}
