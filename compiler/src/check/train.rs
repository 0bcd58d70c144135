//! The `train` section: every setting is known, given once, well-typed and in
//! range, and agrees with the model (image shape, class count).

use super::args::{eval, BArg, Env, VKind, V};
use super::error::CheckError;
use super::layers::fmt_shape;
use super::Checker;
use crate::checked::*;
use crate::source::{FileId, Loc};
use cnnc_grammar::ast::{self, Span, Stmt};
use std::collections::HashMap;

/// The settings, in the order the docs list them.
pub const SETTINGS: &[&str] = &[
    "data",
    "augment",
    "batch",
    "epochs",
    "loss",
    "optimizer",
    "schedule",
    "clip",
    "checkpoint",
    "on_nonfinite",
    "seed",
];

/// Number of object kinds the synthetic `shapes` data set can draw.
pub const SHAPE_KINDS: i64 = 10;

impl Checker<'_> {
    pub(super) fn train(
        &mut self,
        file: FileId,
        t: &ast::TrainDef,
        model: Option<&CheckedModel>,
        md: &ast::ModelDef,
    ) -> Option<TrainConfig> {
        let mut vals: HashMap<&str, (V, Loc)> = HashMap::new();
        for e in &t.entries {
            let key = e.key.name.as_str();
            let key_loc = Loc {
                file,
                span: e.key.span,
            };
            let Some(known) = SETTINGS.iter().find(|s| **s == key) else {
                let help = self
                    .did_you_mean(key, SETTINGS.iter().copied())
                    .or_else(|| {
                        Some(format!(
                            "the settings are {}",
                            super::args::list_all(SETTINGS)
                        ))
                    });
                self.error(
                    key_loc,
                    CheckError::UnknownSetting {
                        key: key.into(),
                        span: e.key.span.into(),
                        help,
                    },
                );
                continue;
            };
            if let Some((_, first)) = vals.get(known) {
                self.error(
                    key_loc,
                    CheckError::DuplicateSetting {
                        key: key.into(),
                        span: e.key.span.into(),
                        first: first.span.into(),
                    },
                );
                continue;
            }
            vals.insert(known, (eval(&e.value, file, &Env::new()), key_loc));
        }
        let head = Loc {
            file,
            span: Span::new(t.span.start, t.span.start + "train".len()),
        };
        let mut ok = true;
        for key in ["data", "optimizer"] {
            if !vals.contains_key(key) {
                let example = if key == "data" {
                    "data = mnist(\"data/mnist-5k\")"
                } else {
                    "optimizer = sgd(lr=0.05, momentum=0.9)"
                };
                self.error(
                    head,
                    CheckError::MissingSetting {
                        key: key.into(),
                        span: head.span.into(),
                        help: Some(format!("add e.g. `{example}`")),
                    },
                );
                ok = false;
            }
        }
        let get = |k: &str| vals.get(k).map(|(v, _)| v.clone());

        let data = get("data").and_then(|v| self.data(&v));
        let input_span = md.body.iter().find_map(|s| match s {
            Stmt::Input(i) => Some(i.shape.span),
            _ => None,
        });
        let augment = match get("augment") {
            None => Some(Vec::new()),
            Some(v) => self.augment(&v, model),
        };
        let batch = self.setting_int(get("batch"), "batch", 64, 1, 65_536);
        let epochs = self.setting_int(get("epochs"), "epochs", 5, 1, 1_000_000);
        let loss = match get("loss") {
            None => Some(Loss::CrossEntropy { smoothing: 0.0 }),
            Some(v) => self.loss(&v),
        };
        let optimizer = get("optimizer").and_then(|v| self.optimizer(&v));
        let schedule = match get("schedule") {
            None => Some(Schedule::Constant { warmup: 0 }),
            Some(v) => self.schedule(&v, epochs),
        };
        let clip = match get("clip") {
            None => Some(Clip::None),
            Some(v) => self.clip(&v),
        };
        let checkpoint = match get("checkpoint") {
            None => Some(None),
            Some(v) => self.checkpoint(&v),
        };
        let on_nonfinite = match get("on_nonfinite") {
            None => Some(OnNonFinite::Abort),
            Some(v) => self.on_nonfinite(&v),
        };
        let seed = self.setting_int(get("seed"), "seed", 0, 0, i64::MAX);

        // Agreement with the model.
        if let (Some(d), Some(m)) = (&data, model) {
            ok &= self.data_matches_model(d, get("data").unwrap().loc, m, input_span);
        }
        Some(TrainConfig {
            data: data?,
            augment: augment?,
            batch: batch?,
            epochs: epochs?,
            loss: loss?,
            optimizer: optimizer?,
            schedule: schedule?,
            clip: clip?,
            checkpoint: checkpoint?,
            on_nonfinite: on_nonfinite?,
            seed: seed?,
        })
        .filter(|_| ok)
    }

    fn data_matches_model(
        &mut self,
        d: &DataSource,
        data_loc: Loc,
        m: &CheckedModel,
        input_span: Option<Span>,
    ) -> bool {
        let mut ok = true;
        let out = m.shape(m.output()).clone();
        let last_loc = m.layers.last().map_or(data_loc, |l| l.loc);
        if out.len() != 1 {
            self.error(
                last_loc,
                CheckError::OutputNotScores {
                    shape: fmt_shape(&out),
                    span: last_loc.span.into(),
                    help: Some(
                        "end the model with `global_avg_pool` (or `flatten`) and `linear(CLASSES)`"
                            .into(),
                    ),
                },
            );
            return false;
        }
        let Some((shape, classes)) = d.known_shape() else {
            return true;
        };
        if shape != m.input {
            let help = Some(match d {
                DataSource::Mnist { .. } => {
                    "MNIST digits are 1×28×28: write `input image: [1, 28, 28]`".to_string()
                }
                _ => format!(
                    "write `input image: {}` or change the data's size/color",
                    fmt_shape(&shape)
                ),
            });
            self.error(
                data_loc,
                CheckError::DataShape {
                    data: fmt_shape(&shape),
                    model: fmt_shape(&m.input),
                    span: data_loc.span.into(),
                    input_span: input_span.map(Into::into),
                    help,
                },
            );
            ok = false;
        }
        if out[0] != classes {
            self.error(
                last_loc,
                CheckError::ClassCount {
                    got: out[0],
                    classes,
                    span: last_loc.span.into(),
                    help: Some(format!("make the last layer `linear({classes})`")),
                },
            );
            ok = false;
        }
        ok
    }

    /// `name` or `name(args)`: the callee, its arguments and the value's location.
    fn call_parts(&mut self, v: &V, setting: &str, what: &str) -> Option<(String, Vec<BArg>)> {
        match &v.kind {
            VKind::Sym(s) => Some((s.clone(), Vec::new())),
            VKind::Call(c, args) => Some((c.clone(), args.clone())),
            _ => {
                self.wrong_type("train", setting, v, what);
                None
            }
        }
    }

    fn setting_int(
        &mut self,
        v: Option<V>,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> Option<u64> {
        let Some(v) = v else {
            return Some(default as u64);
        };
        match v.kind {
            VKind::Int(i) if (min..=max).contains(&i) => Some(i as u64),
            VKind::Int(i) => {
                let rule = if max == i64::MAX {
                    format!("must be at least {min}")
                } else {
                    format!("must lie between {min} and {max}")
                };
                self.out_of_range("train", key, v.loc, &rule, i.to_string());
                None
            }
            _ => {
                self.wrong_type("train", key, &v, "an integer");
                None
            }
        }
    }

    fn data(&mut self, v: &V) -> Option<DataSource> {
        let (name, args) = self.call_parts(v, "data", "a data source such as `mnist(\"dir\")`")?;
        match name.as_str() {
            "mnist" => {
                let b = self.bind("mnist", v.loc, &["path"], &["path"], &args)?;
                Some(DataSource::Mnist {
                    path: self.string(&b, "path")?,
                })
            }
            "folder" => {
                let b = self.bind(
                    "folder",
                    v.loc,
                    &["train", "test", "split"],
                    &["train"],
                    &args,
                )?;
                let train = self.string(&b, "train");
                let test = if b.has("test") {
                    Some(self.string(&b, "test")?)
                } else {
                    None
                };
                if test.is_some() && b.has("split") {
                    let loc = b.loc_of("split");
                    self.out_of_range(
                        "folder",
                        "split",
                        loc,
                        "cannot be combined with `test`",
                        "given".into(),
                    );
                    return None;
                }
                let split = self.float(
                    &b,
                    "split",
                    Some(if test.is_some() { 0.0 } else { 0.2 }),
                    |x| x > 0.0 && x < 1.0,
                    "must lie strictly between 0 and 1",
                );
                Some(DataSource::Folder {
                    train: train?,
                    test,
                    split: split?,
                })
            }
            "shapes" => {
                let b = self.bind(
                    "shapes",
                    v.loc,
                    &["n", "size", "color", "classes"],
                    &[],
                    &args,
                )?;
                let n = self.int(&b, "n", Some(2000), 10);
                let size = self.int(&b, "size", Some(32), 16);
                let color = self.symbol(&b, "color", "rgb", "colour", &["grey", "rgb"]);
                let classes = self.int(&b, "classes", Some(3), 2);
                let classes = classes.and_then(|c| {
                    if c as i64 > SHAPE_KINDS {
                        let loc = b.loc_of("classes");
                        self.out_of_range(
                            "shapes",
                            "classes",
                            loc,
                            &format!("must be at most {SHAPE_KINDS} (the kinds of shape drawn)"),
                            c.to_string(),
                        );
                        None
                    } else {
                        Some(c)
                    }
                });
                let size = size.and_then(|s| {
                    if s > 512 {
                        self.out_of_range(
                            "shapes",
                            "size",
                            b.loc_of("size"),
                            "must be at most 512",
                            s.to_string(),
                        );
                        None
                    } else {
                        Some(s)
                    }
                });
                Some(DataSource::Shapes {
                    n: n?,
                    size: size?,
                    rgb: color? == "rgb",
                    classes: classes?,
                })
            }
            other => {
                self.unknown_choice(
                    "data source",
                    other,
                    v.loc,
                    &["mnist", "folder", "shapes"],
                    None,
                );
                None
            }
        }
    }

    fn augment(&mut self, v: &V, model: Option<&CheckedModel>) -> Option<Vec<Augment>> {
        let VKind::List(items) = &v.kind else {
            self.wrong_type(
                "train",
                "augment",
                v,
                "a list such as [random_crop(28, pad=2)]",
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for it in items {
            match self.one_augment(it, model) {
                Some(a) => out.push(a),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn one_augment(&mut self, v: &V, model: Option<&CheckedModel>) -> Option<Augment> {
        let (name, args) =
            self.call_parts(v, "augment", "an augmentation such as `hflip(p=0.5)`")?;
        match name.as_str() {
            "random_crop" => {
                let b = self.bind("random_crop", v.loc, &["size", "pad"], &["size"], &args)?;
                let size = self.int(&b, "size", None, 1);
                let pad = self.int(&b, "pad", Some(0), 0);
                let (size, pad) = (size?, pad?);
                if let Some(m) = model {
                    let (h, w) = (m.input[1], m.input[2]);
                    if size != h || size != w {
                        let loc = b.loc_of("size");
                        self.error(
                            loc,
                            CheckError::Augment {
                                message: format!("random_crop gives {size}×{size} crops but the model's input is {h}×{w}"),
                                span: loc.span.into(),
                                label: format!("crop size {size}"),
                                help: Some(format!("crop to the input size: `random_crop({h}, pad={})`", pad.max(2))),
                            },
                        );
                        return None;
                    }
                }
                Some(Augment::RandomCrop { size, pad })
            }
            "hflip" => {
                let b = self.bind("hflip", v.loc, &["p"], &[], &args)?;
                let p = self.float(
                    &b,
                    "p",
                    Some(0.5),
                    |x| (0.0..=1.0).contains(&x),
                    "is a probability in [0, 1]",
                )?;
                Some(Augment::HFlip { p })
            }
            "normalize" => {
                let b = self.bind(
                    "normalize",
                    v.loc,
                    &["mean", "std"],
                    &["mean", "std"],
                    &args,
                )?;
                let mean = self.numbers(
                    &b.vals["mean"],
                    "normalize",
                    "mean",
                    |_| true,
                    "is a number",
                );
                let std = self.numbers(
                    &b.vals["std"],
                    "normalize",
                    "std",
                    |x| x > 0.0,
                    "must be greater than 0",
                );
                let (mean, std) = (mean?, std?);
                if let Some(m) = model {
                    let c = m.input[0] as usize;
                    let mut ok = true;
                    for (name, vals) in [("mean", &mean), ("std", &std)] {
                        if vals.len() != 1 && vals.len() != c {
                            let loc = b.loc_of(name);
                            let n = vals.len();
                            let channels = if c == 1 {
                                "1 channel".to_string()
                            } else {
                                format!("{c} channels")
                            };
                            self.error(
                                loc,
                                CheckError::Augment {
                                    message: format!("normalize has {n} {name} values but the input has {channels}"),
                                    span: loc.span.into(),
                                    label: format!("{n} values"),
                                    help: Some(if c == 1 {
                                        "give one number".to_string()
                                    } else {
                                        format!("give one number, or a list of {c}")
                                    }),
                                },
                            );
                            ok = false;
                        }
                    }
                    if !ok {
                        return None;
                    }
                }
                Some(Augment::Normalize { mean, std })
            }
            other => {
                self.unknown_choice(
                    "augmentation",
                    other,
                    v.loc,
                    &["random_crop", "hflip", "normalize"],
                    None,
                );
                None
            }
        }
    }

    /// A number or a non-empty list of numbers.
    fn numbers(
        &mut self,
        v: &V,
        callee: &str,
        name: &str,
        ok: impl Fn(f64) -> bool + Copy,
        rule: &str,
    ) -> Option<Vec<f64>> {
        match &v.kind {
            VKind::List(items) if !items.is_empty() => {
                let vals: Vec<Option<f64>> = items
                    .iter()
                    .map(|i| self.float_value(callee, name, i, ok, rule))
                    .collect();
                vals.into_iter().collect()
            }
            _ => self.float_value(callee, name, v, ok, rule).map(|x| vec![x]),
        }
    }

    fn loss(&mut self, v: &V) -> Option<Loss> {
        let (name, args) = self.call_parts(v, "loss", "`cross_entropy`")?;
        if name != "cross_entropy" {
            self.unknown_choice("loss", &name, v.loc, &["cross_entropy"], None);
            return None;
        }
        let b = self.bind("cross_entropy", v.loc, &["smoothing"], &[], &args)?;
        let smoothing = self.float(
            &b,
            "smoothing",
            Some(0.0),
            |x| (0.0..1.0).contains(&x),
            "must lie in [0, 1)",
        )?;
        Some(Loss::CrossEntropy { smoothing })
    }

    fn optimizer(&mut self, v: &V) -> Option<Optimizer> {
        let (name, args) = self.call_parts(v, "optimizer", "an optimizer such as `sgd(lr=0.1)`")?;
        let positive = |x: f64| x > 0.0;
        let nonneg = |x: f64| x >= 0.0;
        match name.as_str() {
            "sgd" => {
                let b = self.bind(
                    "sgd",
                    v.loc,
                    &["lr", "momentum", "nesterov", "weight_decay"],
                    &["lr"],
                    &args,
                )?;
                let lr = self.float(&b, "lr", None, positive, "must be greater than 0");
                let momentum = self.float(
                    &b,
                    "momentum",
                    Some(0.0),
                    |x| (0.0..1.0).contains(&x),
                    "must lie in [0, 1)",
                );
                let nesterov = self.boolean(&b, "nesterov", false);
                let wd = self.float(&b, "weight_decay", Some(0.0), nonneg, "must be at least 0");
                if nesterov == Some(true) && momentum == Some(0.0) {
                    let loc = b.loc_of("nesterov");
                    self.out_of_range("sgd", "nesterov", loc, "needs momentum > 0", "true".into());
                    return None;
                }
                Some(Optimizer::Sgd {
                    lr: lr?,
                    momentum: momentum?,
                    nesterov: nesterov?,
                    weight_decay: wd?,
                })
            }
            "adam" | "adamw" => {
                let b = self.bind(
                    &name,
                    v.loc,
                    &["lr", "betas", "eps", "weight_decay"],
                    &[],
                    &args,
                )?;
                let lr = self.float(&b, "lr", Some(1e-3), positive, "must be greater than 0");
                let eps = self.float(&b, "eps", Some(1e-8), positive, "must be greater than 0");
                let default_wd = if name == "adamw" { 0.01 } else { 0.0 };
                let wd = self.float(
                    &b,
                    "weight_decay",
                    Some(default_wd),
                    nonneg,
                    "must be at least 0",
                );
                let betas = match b.get("betas").cloned() {
                    None => Some([0.9, 0.999]),
                    Some(bv) => {
                        let list = self.numbers(
                            &bv,
                            &name,
                            "betas",
                            |x| (0.0..1.0).contains(&x),
                            "must lie in [0, 1)",
                        );
                        match list {
                            Some(l) if l.len() == 2 => Some([l[0], l[1]]),
                            Some(_) => {
                                self.wrong_type(&name, "betas", &bv, "a pair [beta1, beta2]");
                                None
                            }
                            None => None,
                        }
                    }
                };
                let (lr, betas, eps, weight_decay) = (lr?, betas?, eps?, wd?);
                Some(if name == "adam" {
                    Optimizer::Adam {
                        lr,
                        betas,
                        eps,
                        weight_decay,
                    }
                } else {
                    Optimizer::AdamW {
                        lr,
                        betas,
                        eps,
                        weight_decay,
                    }
                })
            }
            other => {
                self.unknown_choice("optimizer", other, v.loc, &["sgd", "adam", "adamw"], None);
                None
            }
        }
    }

    fn schedule(&mut self, v: &V, epochs: Option<u64>) -> Option<Schedule> {
        let (name, args) = self.call_parts(v, "schedule", "a schedule such as `cosine`")?;
        let s = match name.as_str() {
            "constant" => {
                self.bind("constant", v.loc, &[], &[], &args)?;
                Schedule::Constant { warmup: 0 }
            }
            "warmup" => {
                let b = self.bind("warmup", v.loc, &["epochs"], &["epochs"], &args)?;
                Schedule::Constant {
                    warmup: self.int(&b, "epochs", None, 1)?,
                }
            }
            "step" => {
                let b = self.bind(
                    "step",
                    v.loc,
                    &["every", "gamma", "warmup"],
                    &["every"],
                    &args,
                )?;
                let every = self.int(&b, "every", None, 1);
                let gamma = self.float(
                    &b,
                    "gamma",
                    Some(0.1),
                    |x| x > 0.0 && x <= 1.0,
                    "must lie in (0, 1]",
                );
                let warmup = self.int(&b, "warmup", Some(0), 0);
                Schedule::Step {
                    every: every?,
                    gamma: gamma?,
                    warmup: warmup?,
                }
            }
            "cosine" => {
                let b = self.bind("cosine", v.loc, &["min_lr", "warmup"], &[], &args)?;
                let min_lr =
                    self.float(&b, "min_lr", Some(0.0), |x| x >= 0.0, "must be at least 0");
                let warmup = self.int(&b, "warmup", Some(0), 0);
                Schedule::Cosine {
                    min_lr: min_lr?,
                    warmup: warmup?,
                }
            }
            other => {
                self.unknown_choice(
                    "schedule",
                    other,
                    v.loc,
                    &["constant", "step", "cosine", "warmup"],
                    None,
                );
                return None;
            }
        };
        let warmup = match s {
            Schedule::Constant { warmup }
            | Schedule::Step { warmup, .. }
            | Schedule::Cosine { warmup, .. } => warmup,
        };
        // Point at the warm-up count itself (`warmup=3`, or `warmup(3)`).
        let warmup_loc = args
            .iter()
            .find(|a| {
                matches!(&a.name, Some((n, _)) if n == "warmup" || n == "epochs")
                    || name == "warmup"
            })
            .map_or(v.loc, |a| a.value.loc);
        if let Some(e) = epochs {
            if warmup >= e && warmup > 0 {
                self.out_of_range(
                    &name,
                    "warmup",
                    warmup_loc,
                    &format!("must be less than the {e} epochs"),
                    warmup.to_string(),
                );
                return None;
            }
        }
        Some(s)
    }

    fn clip(&mut self, v: &V) -> Option<Clip> {
        let (name, args) = self.call_parts(v, "clip", "a clip policy such as `norm(1.0)`")?;
        let choices = ["none", "norm", "value", "layer_norm"];
        if !choices.contains(&name.as_str()) {
            self.unknown_choice("clip policy", &name, v.loc, &choices, None);
            return None;
        }
        if name == "none" {
            self.bind("none", v.loc, &[], &[], &args)?;
            return Some(Clip::None);
        }
        let arg = if name == "value" { "v" } else { "max" };
        let b = self.bind(&name, v.loc, &[arg], &[arg], &args)?;
        let x = self.float(&b, arg, None, |x| x > 0.0, "must be greater than 0")?;
        Some(match name.as_str() {
            "norm" => Clip::Norm(x),
            "value" => Clip::Value(x),
            _ => Clip::LayerNorm(x),
        })
    }

    fn checkpoint(&mut self, v: &V) -> Option<Option<Checkpoint>> {
        let (name, args) =
            self.call_parts(v, "checkpoint", "`none` or `every(epochs=1, keep=3)`")?;
        match name.as_str() {
            "none" => {
                self.bind("none", v.loc, &[], &[], &args)?;
                Some(None)
            }
            "every" => {
                let b = self.bind("every", v.loc, &["epochs", "keep"], &[], &args)?;
                let every = self.int(&b, "epochs", Some(1), 1);
                let keep = self.int(&b, "keep", Some(3), 1);
                Some(Some(Checkpoint {
                    every: every?,
                    keep: keep?,
                }))
            }
            other => {
                self.unknown_choice("checkpoint policy", other, v.loc, &["none", "every"], None);
                None
            }
        }
    }

    fn on_nonfinite(&mut self, v: &V) -> Option<OnNonFinite> {
        let (name, args) = self.call_parts(v, "on_nonfinite", "`abort` or `skip(max=10)`")?;
        match name.as_str() {
            "abort" => {
                self.bind("abort", v.loc, &[], &[], &args)?;
                Some(OnNonFinite::Abort)
            }
            "skip" => {
                let b = self.bind("skip", v.loc, &["max"], &[], &args)?;
                Some(OnNonFinite::Skip {
                    max: self.int(&b, "max", Some(10), 1)?,
                })
            }
            other => {
                self.unknown_choice("non-finite policy", other, v.loc, &["abort", "skip"], None);
                None
            }
        }
    }
}
