//! The `explain` section: methods and their options, sample selections, class
//! selectors, and the structural rules for CAM and Grad-CAM targets.

use super::args::{eval, eval_args, BArg, Env, VKind};
use super::error::CheckError;
use super::layers::fmt_shape;
use super::Checker;
use crate::checked::*;
use crate::source::{FileId, Loc};
use cnnc_grammar::ast::{self, Selection};
use std::collections::HashMap;

pub const METHODS: &[&str] = &[
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "cam",
    "gradcam",
];

/// Largest number of samples one directive may select.
const MAX_SAMPLES: i64 = 10_000;

impl Checker<'_> {
    pub(super) fn explain(
        &mut self,
        file: FileId,
        e: &ast::ExplainDef,
        model: Option<&CheckedModel>,
        train_def: Option<&ast::TrainDef>,
        train: Option<&TrainConfig>,
    ) -> Vec<ExplainDirective> {
        let has_data = train_def.is_some_and(|t| t.entries.iter().any(|e| e.key.name == "data"));
        if !has_data && !e.directives.is_empty() {
            let span = cnnc_grammar::ast::Span::new(e.span.start, e.span.start + "explain".len());
            self.error(
                Loc { file, span },
                CheckError::ExplainNoData { span: span.into() },
            );
        }
        let _ = train;
        let mut out = Vec::new();
        let mut outputs: HashMap<String, Loc> = HashMap::new();
        for d in &e.directives {
            if let Some(checked) = self.directive(file, d, model) {
                let loc = d.outputs.first().map_or(
                    Loc {
                        file,
                        span: d.method.span,
                    },
                    |o| Loc { file, span: o.span },
                );
                if let Some(first) = outputs.get(&checked.output) {
                    self.error(
                        loc,
                        CheckError::DuplicateOutput {
                            path: checked.output.clone(),
                            span: loc.span.into(),
                            first: first.span.into(),
                            help: Some("give one of them its own folder with `-> \"name\"`".into()),
                        },
                    );
                    continue;
                }
                outputs.insert(checked.output.clone(), loc);
                out.push(checked);
            }
        }
        out
    }

    fn directive(
        &mut self,
        file: FileId,
        d: &ast::Directive,
        model: Option<&CheckedModel>,
    ) -> Option<ExplainDirective> {
        let method_name = d.method.name.as_str();
        let method_loc = Loc {
            file,
            span: d.method.span,
        };
        if !METHODS.contains(&method_name) {
            self.unknown_choice("explain method", method_name, method_loc, METHODS, None);
            return None;
        }
        let env = Env::new();
        // Method arguments and options (`class=`, `layer=`, …) bind together.
        let mut args: Vec<BArg> = eval_args(d.args.as_ref(), file, &env);
        for o in &d.options {
            args.push(BArg {
                name: o
                    .name
                    .as_ref()
                    .map(|n| (n.name.clone(), Loc { file, span: n.span })),
                value: eval(&o.value, file, &env),
                loc: Loc { file, span: o.span },
            });
        }
        let params: &[&str] = match method_name {
            "saliency" => &["class"],
            "smoothgrad" => &["samples", "noise", "class"],
            "integrated_gradients" => &["steps", "baseline", "class"],
            _ => &["layer", "class"],
        };
        let required: &[&str] = if matches!(method_name, "cam" | "gradcam") {
            &["layer"]
        } else {
            &[]
        };
        let b = self.bind(method_name, method_loc, params, required, &args)?;
        let classes = model.and_then(|m| match m.shape(m.output()).as_slice() {
            [k] => Some(*k),
            _ => None,
        });
        let class = match b.get("class").cloned() {
            None => Some(ClassSel::Predicted),
            Some(v) => match v.kind {
                VKind::Sym(s) if s == "predicted" => Some(ClassSel::Predicted),
                VKind::Sym(s) if s == "label" => Some(ClassSel::Label),
                VKind::Sym(s) => {
                    self.unknown_choice(
                        "class selector",
                        &s,
                        v.loc,
                        &["predicted", "label"],
                        Some("or a class index such as `class=3`".into()),
                    );
                    None
                }
                VKind::Int(i) if i < 0 || classes.is_some_and(|k| i as u64 >= k) => {
                    self.error(
                        v.loc,
                        CheckError::ClassIndex {
                            index: i,
                            classes: classes.unwrap_or(0),
                            span: v.loc.span.into(),
                        },
                    );
                    None
                }
                VKind::Int(i) => Some(ClassSel::Index(i as u64)),
                _ => {
                    self.wrong_type(
                        method_name,
                        "class",
                        &v,
                        "`predicted`, `label` or a class index",
                    );
                    None
                }
            },
        };
        let method = match method_name {
            "saliency" => Some(Method::Saliency),
            "smoothgrad" => {
                let samples = self.int(&b, "samples", Some(25), 1);
                let noise = self.float(
                    &b,
                    "noise",
                    Some(0.15),
                    |x| x > 0.0 && x <= 1.0,
                    "must lie in (0, 1]",
                );
                Some(Method::SmoothGrad {
                    samples: samples?,
                    noise: noise?,
                })
            }
            "integrated_gradients" => {
                let steps = self.int(&b, "steps", Some(32), 2);
                let baseline = self.symbol(
                    &b,
                    "baseline",
                    "zero",
                    "baseline",
                    &["zero", "mean", "blur"],
                );
                let baseline = match baseline?.as_str() {
                    "zero" => Baseline::Zero,
                    "mean" => Baseline::Mean,
                    _ => Baseline::Blur,
                };
                Some(Method::IntegratedGradients {
                    steps: steps?,
                    baseline,
                })
            }
            _ => self.target(&b, method_name, model),
        };
        let (split, samples) = self.selection(file, d)?;
        if d.outputs.len() > 1 {
            let o = &d.outputs[1];
            let first = &d.outputs[0];
            self.error(
                Loc { file, span: o.span },
                CheckError::DuplicateArg {
                    callee: method_name.into(),
                    name: "->".into(),
                    span: o.span.into(),
                    first: first.span.into(),
                },
            );
            return None;
        }
        let output = d
            .outputs
            .first()
            .map_or_else(|| method_name.to_string(), |o| o.value.clone());
        if output.trim().is_empty() {
            let o = &d.outputs[0];
            self.out_of_range(
                method_name,
                "->",
                Loc { file, span: o.span },
                "must name a folder",
                "an empty string".into(),
            );
            return None;
        }
        Some(ExplainDirective {
            method: method?,
            split,
            samples,
            class: class?,
            output,
            loc: Loc { file, span: d.span },
        })
    }

    /// The `layer=` of CAM and Grad-CAM, checked against the model's structure.
    fn target(
        &mut self,
        b: &super::args::Bound,
        method: &str,
        model: Option<&CheckedModel>,
    ) -> Option<Method> {
        let v = b.get("layer")?.clone();
        let VKind::Sym(name) = &v.kind else {
            self.wrong_type(method, "layer", &v, "the name of a layer");
            return None;
        };
        let m = model?;
        let Some(id) = m.value_by_name(name) else {
            let names: Vec<&str> = m.layers.iter().map(|l| l.name.as_str()).collect();
            let suffix = format!(".{name}");
            let inside: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| n.ends_with(&suffix))
                .collect();
            let help = if !inside.is_empty() {
                Some(format!(
                    "layers inside blocks are named after their block instance: did you mean {}?",
                    super::args::list_names(&inside)
                ))
            } else {
                self.did_you_mean(name, names.into_iter())
                    .or_else(|| Some("explain targets are the names of layers in the model (`cnnc check` lists them)".into()))
            };
            self.error(
                v.loc,
                CheckError::UnknownValue {
                    name: name.clone(),
                    span: v.loc.span.into(),
                    help,
                },
            );
            return None;
        };
        let shape = m.shape(id).clone();
        if method == "gradcam" {
            if shape.len() != 3 {
                self.error(
                    v.loc,
                    CheckError::GradcamTarget {
                        layer: name.clone(),
                        shape: fmt_shape(&shape),
                        span: v.loc.span.into(),
                    },
                );
                return None;
            }
            return Some(Method::GradCam { layer: id });
        }
        match cam_problem(m, id) {
            None => Some(Method::Cam { layer: id }),
            Some((reason, help)) => {
                self.error(
                    v.loc,
                    CheckError::CamTarget {
                        layer: name.clone(),
                        reason,
                        span: v.loc.span.into(),
                        help: Some(help),
                    },
                );
                None
            }
        }
    }

    fn selection(&mut self, file: FileId, d: &ast::Directive) -> Option<(Split, Vec<u64>)> {
        if d.on.len() > 1 {
            let (a, b) = (&d.on[0], &d.on[1]);
            self.error(
                Loc { file, span: b.span },
                CheckError::DuplicateArg {
                    callee: d.method.name.clone(),
                    name: "on".into(),
                    span: b.span.into(),
                    first: a.span.into(),
                },
            );
            return None;
        }
        let Some(sel) = d.on.first() else {
            return Some((Split::Test, (0..16).collect()));
        };
        let split = match sel.split.name.as_str() {
            "test" => Split::Test,
            "train" => Split::Train,
            other => {
                self.unknown_choice(
                    "split",
                    other,
                    Loc {
                        file,
                        span: sel.split.span,
                    },
                    &["train", "test"],
                    None,
                );
                return None;
            }
        };
        let bad = |ck: &mut Self, span, reason: String, help: &str| {
            ck.error(
                Loc { file, span },
                CheckError::Selection {
                    reason,
                    span: span.into(),
                    help: Some(help.into()),
                },
            );
            None
        };
        let samples: Vec<u64> = match &sel.selection {
            None => (0..16).collect(),
            Some(Selection::Range { start, end, span }) => {
                if start < &0 || end < &0 {
                    return bad(
                        self,
                        *span,
                        "indices cannot be negative".into(),
                        "samples are numbered from 0",
                    );
                }
                if start >= end {
                    return bad(
                        self,
                        *span,
                        format!("the range {start}..{end} is empty"),
                        "ranges are half-open: `0..16` selects samples 0 to 15",
                    );
                }
                if end - start > MAX_SAMPLES {
                    return bad(
                        self,
                        *span,
                        format!("{} samples is more than {MAX_SAMPLES}", end - start),
                        "explain a smaller selection",
                    );
                }
                (*start as u64..*end as u64).collect()
            }
            Some(Selection::List { indices, .. }) => {
                let mut out = Vec::new();
                for (i, span) in indices {
                    if *i < 0 {
                        return bad(
                            self,
                            *span,
                            "indices cannot be negative".into(),
                            "samples are numbered from 0",
                        );
                    }
                    if out.contains(&(*i as u64)) {
                        return bad(
                            self,
                            *span,
                            format!("sample {i} is listed twice"),
                            "list each sample once",
                        );
                    }
                    out.push(*i as u64);
                }
                out
            }
        };
        Some((split, samples))
    }
}

/// Why `target` cannot be a CAM target, with a help text; `None` when it can.
///
/// CAM needs `scores = W · gap(A) + b`: from the target, a single path of
/// position-wise layers (activations, batchnorm, dropout, detach) must reach
/// `global_avg_pool`, which must feed the model's final `linear` directly.
fn cam_problem(m: &CheckedModel, target: ValueId) -> Option<(String, String)> {
    let shape = m.shape(target);
    if shape.len() != 3 {
        return Some((
            format!("its output {} is not a feature map", fmt_shape(shape)),
            "point `layer=` at a conv layer before global_avg_pool".into(),
        ));
    }
    let gradcam = "or use `gradcam`, which works on any spatial feature map";
    let mut v = target;
    loop {
        let users: Vec<(ValueId, &Layer)> = m.users(v).collect();
        let [(next, user)] = users.as_slice() else {
            let n = users.len();
            return Some((
                if n == 0 {
                    "nothing uses its output".into()
                } else {
                    format!("its output feeds {n} layers, so the scores do not come from it alone")
                },
                format!("CAM needs one path from the target to global_avg_pool; {gradcam}"),
            ));
        };
        match user.op {
            Op::Relu
            | Op::LeakyRelu { .. }
            | Op::Sigmoid
            | Op::Tanh
            | Op::Gelu
            | Op::BatchNorm { .. }
            | Op::Dropout { .. }
            | Op::Detach => {
                v = *next;
            }
            Op::GlobalAvgPool => {
                let after: Vec<(ValueId, &Layer)> = m.users(*next).collect();
                return match after.as_slice() {
                    [(out, Layer { op: Op::Linear { .. }, .. })] if *out == m.output() => None,
                    [(_, l)] => Some((
                        format!("global_avg_pool is followed by `{}` ({}), not by the final linear layer", l.name, l.op_name),
                        format!("CAM reads the class weights of the linear layer right after global_avg_pool; {gradcam}"),
                    )),
                    _ => Some((
                        "global_avg_pool is not followed by a single linear layer".into(),
                        format!("end the model with `global_avg_pool` then `linear(CLASSES)`; {gradcam}"),
                    )),
                };
            }
            _ => {
                return Some((
                    format!(
                        "it is followed by `{}` ({}), not by global_avg_pool",
                        user.name, user.op_name
                    ),
                    format!("choose the last feature map before global_avg_pool; {gradcam}"),
                ));
            }
        }
    }
}
