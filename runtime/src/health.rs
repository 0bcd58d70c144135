//! Gradient health during `cnnc run`: per-layer L2 norms of the weights and of
//! the gradients, written into each epoch's line of `metrics.jsonl`, a compact
//! table printed at the end of each epoch, and two warnings that name a layer and
//! point at its statement in the `.cnn` file: vanishing gradients (W0007) and
//! exploding gradients (W0008).
//!
//! What is measured: a layer's gradient norm is the L2 norm over all its
//! trainable tensors (weight and bias, gamma and beta), before clipping; its
//! weight norm likewise over the same tensors. The gradients' sums of squares
//! come with every applied step (the non-finite check computes them,
//! [`crate::nonfinite::sums_of_squares`]). A measurement closes every
//! `k = ceil(steps_per_epoch / 10)` applied steps, and at the end of each epoch:
//! `grad_norm` is the mean of the layer's gradient norm over the window's steps,
//! `weight_norm` the norm after the window's last update. So an epoch holds
//! about ten measurements, whatever its length; skipped steps (non-finite) are
//! not counted.
//!
//! The warnings, each at most once per layer and run:
//! - vanishing: `|g|/|w| < 1e-6` (or `|g| = 0`) at each of the last
//!   [`WINDOW`] measurements;
//! - exploding: `|g|` grew at each of the last [`WINDOW`] measurements and by
//!   at least 100× over them, or the clip policy fired on more than half of an
//!   epoch's steps (named: the layer with the largest gradient).
//!
//! Diagnostics need the file's source map, which `run` does not receive (it gets
//! the checked model): [`Reporter`] checks the file again, which is cheap and
//! gives the same map; if the file no longer gives the same model (it was edited
//! during the run), diagnostics are printed without their snippet.

use crate::optim::ClipStats;
use crate::params::Params;
use cnnc_compiler::check::Lint;
use cnnc_compiler::checked::{CheckedModel, Clip};
use cnnc_compiler::diag::{Diag, DiagKind};
use cnnc_compiler::pipeline;
use cnnc_compiler::source::SourceMap;
use serde::Serialize;
use std::cell::OnceCell;
use std::collections::VecDeque;
use std::path::Path;

/// Measurements per epoch (about: the last window of an epoch may be shorter).
pub const PER_EPOCH: u64 = 10;
/// Measurements a warning looks back over.
pub const WINDOW: usize = 5;
/// `|g|/|w|` below this is a vanishing gradient.
pub const VANISHING: f64 = 1e-6;
/// Growth of `|g|` over [`WINDOW`] measurements that is an exploding gradient.
pub const EXPLODING: f64 = 100.0;
/// Fraction of an epoch's steps where clipping fired that is an exploding gradient.
pub const CLIP_MOST: f64 = 0.5;

/// The gradient-health part of one `metrics.jsonl` line (the `health` field).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EpochHealth {
    /// Applied steps per measurement (`k`).
    pub every: u64,
    /// The global step (1-based) that closed each measurement.
    pub steps: Vec<u64>,
    /// One entry per layer with trainable parameters, in model order.
    pub layers: Vec<LayerSeries>,
}

/// One layer's measurements over an epoch, one value per entry of `steps`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerSeries {
    pub layer: String,
    /// L2 norm of the layer's trainable tensors after the window's last update.
    pub weight_norm: Vec<f64>,
    /// Mean over the window's steps of the L2 norm of the layer's gradients
    /// (before clipping).
    pub grad_norm: Vec<f64>,
}

/// What a warning is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trouble {
    Vanishing,
    Exploding,
}

/// A warning about one layer, before it becomes a diagnostic.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Index into `CheckedModel::layers`.
    pub layer: usize,
    pub trouble: Trouble,
    /// The latest `|g|/|w|` (vanishing) or `|g|` (exploding).
    pub value: f64,
    /// For exploding: what was seen.
    pub evidence: String,
}

/// The run's gradient-health bookkeeping.
pub struct Health {
    /// Per tracked layer: its index in the model and its name.
    layers: Vec<(usize, String)>,
    /// Per trainable tensor `k`: its tracked layer.
    slot_of: Vec<usize>,
    /// Per tracked layer: the parameter indices of its trainable tensors.
    tensors: Vec<Vec<usize>>,
    every: u64,
    /// The open window: steps and summed gradient norms.
    window_steps: u64,
    window_g: Vec<f64>,
    /// This epoch's measurements.
    epoch: EpochHealth,
    /// Last [`WINDOW`] measurements per layer: (|w|, |g|).
    recent: Vec<VecDeque<(f64, f64)>>,
    /// Mean |g| of the previous epoch, per layer (for the trend).
    prev_mean: Vec<Option<f64>>,
    /// Warned already, per layer: [vanishing, exploding].
    warned: Vec<[bool; 2]>,
}

impl Health {
    pub fn new(model: &CheckedModel, params: &Params, steps_per_epoch: u64) -> Health {
        let mut layers: Vec<(usize, String)> = Vec::new();
        let mut tensors: Vec<Vec<usize>> = Vec::new();
        let mut slot_of = Vec::new();
        for (&i, l) in params.trainable().iter().zip(params.trainable_layers()) {
            let slot = match layers.iter().position(|(x, _)| *x == l) {
                Some(s) => s,
                None => {
                    let name = model
                        .layers
                        .get(l)
                        .map_or_else(|| format!("layer {l}"), |x| x.name.clone());
                    layers.push((l, name));
                    tensors.push(Vec::new());
                    layers.len() - 1
                }
            };
            tensors[slot].push(i);
            slot_of.push(slot);
        }
        let n = layers.len();
        let every = steps_per_epoch.div_ceil(PER_EPOCH).max(1);
        Health {
            epoch: EpochHealth {
                every,
                steps: Vec::new(),
                layers: layers
                    .iter()
                    .map(|(_, name)| LayerSeries {
                        layer: name.clone(),
                        weight_norm: Vec::new(),
                        grad_norm: Vec::new(),
                    })
                    .collect(),
            },
            layers,
            slot_of,
            tensors,
            every,
            window_steps: 0,
            window_g: vec![0.0; n],
            recent: vec![VecDeque::with_capacity(WINDOW + 1); n],
            prev_mean: vec![None; n],
            warned: vec![[false; 2]; n],
        }
    }

    /// Applied steps per measurement.
    pub fn every(&self) -> u64 {
        self.every
    }

    /// After an applied step (`step` is its global number, 1-based): `grad_sq[k]`
    /// is the sum of squares of the gradient of `params.trainable()[k]` before
    /// clipping; `params` are the updated parameters.
    pub fn record(&mut self, step: u64, grad_sq: &[f64], params: &Params) {
        let mut sq = vec![0.0f64; self.layers.len()];
        for (&slot, s) in self.slot_of.iter().zip(grad_sq) {
            sq[slot] += s;
        }
        for (acc, s) in self.window_g.iter_mut().zip(sq) {
            *acc += s.sqrt();
        }
        self.window_steps += 1;
        if self.window_steps >= self.every {
            self.measure(step, params);
        }
    }

    /// Closes the open window.
    fn measure(&mut self, step: u64, params: &Params) {
        if self.window_steps == 0 {
            return;
        }
        let steps = self.window_steps as f64;
        self.epoch.steps.push(step);
        for (slot, series) in self.epoch.layers.iter_mut().enumerate() {
            let w = self.tensors[slot]
                .iter()
                .map(|&i| crate::nonfinite::sum_sq(params.data(i)))
                .sum::<f64>()
                .sqrt();
            let g = self.window_g[slot] / steps;
            series.weight_norm.push(w);
            series.grad_norm.push(g);
            let recent = &mut self.recent[slot];
            recent.push_back((w, g));
            if recent.len() > WINDOW {
                recent.pop_front();
            }
        }
        self.window_g.iter_mut().for_each(|g| *g = 0.0);
        self.window_steps = 0;
    }

    /// Ends an epoch whose last step is `step`: closes the open window, and
    /// returns the epoch's measurements, its table (see [`Health::table`]) and
    /// the new warnings. `clip` is the epoch's clipping record.
    pub fn end_epoch(
        &mut self,
        step: u64,
        params: &Params,
        clip: &ClipStats,
        policy: &Clip,
    ) -> (EpochHealth, String, Vec<Finding>) {
        self.measure(step, params);
        let table = self.table(clip);
        let findings = self.findings(clip, policy);
        let fresh = EpochHealth {
            every: self.every,
            steps: Vec::new(),
            layers: self
                .layers
                .iter()
                .map(|(_, name)| LayerSeries {
                    layer: name.clone(),
                    weight_norm: Vec::new(),
                    grad_norm: Vec::new(),
                })
                .collect(),
        };
        let done = std::mem::replace(&mut self.epoch, fresh);
        for (prev, series) in self.prev_mean.iter_mut().zip(&done.layers) {
            *prev = mean(&series.grad_norm);
        }
        (done, table, findings)
    }

    /// The epoch's table: per layer the last `|w|`, the mean `|g|` of the epoch's
    /// measurements, their ratio, and the trend (this epoch's mean `|g|` over the
    /// previous epoch's).
    fn table(&self, clip: &ClipStats) -> String {
        let width = self
            .layers
            .iter()
            .map(|(_, n)| n.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        if self.epoch.steps.is_empty() {
            return "  gradient health: no measurement (no step of this epoch was applied)\n"
                .into();
        }
        let mut out = format!(
            "  gradient health: {} measurement{} of {} step{} each, |g| before clipping; clip fired on {:.0}% of steps\n",
            self.epoch.steps.len(),
            if self.epoch.steps.len() == 1 { "" } else { "s" },
            self.every,
            if self.every == 1 { "" } else { "s" },
            100.0 * clip.fired_fraction()
        );
        out.push_str(&format!(
            "  {:<width$}  {:>9}  {:>9}  {:>9}  trend\n",
            "layer", "|w|", "|g|", "|g|/|w|"
        ));
        for (slot, series) in self.epoch.layers.iter().enumerate() {
            let w = series.weight_norm.last().copied().unwrap_or(f64::NAN);
            let g = mean(&series.grad_norm).unwrap_or(f64::NAN);
            let trend = match (self.prev_mean[slot], mean(&series.grad_norm)) {
                (Some(p), Some(c)) if p > 0.0 => {
                    let r = c / p;
                    let arrow = if r > 1.5 {
                        "↑"
                    } else if r < 1.0 / 1.5 {
                        "↓"
                    } else {
                        "→"
                    };
                    format!("{arrow} ×{r:.2}")
                }
                _ => "—".to_string(),
            };
            out.push_str(&format!(
                "  {:<width$}  {:>9}  {:>9}  {:>9}  {trend}\n",
                series.layer,
                sci(w),
                sci(g),
                sci(ratio(g, w))
            ));
        }
        out
    }

    /// New warnings, each layer and kind once per run.
    fn findings(&mut self, clip: &ClipStats, policy: &Clip) -> Vec<Finding> {
        let mut out = Vec::new();
        for slot in 0..self.layers.len() {
            let recent = &self.recent[slot];
            if recent.len() < WINDOW {
                continue;
            }
            let (w, g) = *recent.back().expect("WINDOW > 0");
            if !self.warned[slot][0] && recent.iter().all(|&(w, g)| ratio(g, w) < VANISHING) {
                self.warned[slot][0] = true;
                out.push(Finding {
                    layer: self.layers[slot].0,
                    trouble: Trouble::Vanishing,
                    value: ratio(g, w),
                    evidence: String::new(),
                });
            }
            let growing = recent
                .iter()
                .zip(recent.iter().skip(1))
                .all(|(a, b)| b.1 > a.1);
            let first = recent.front().expect("WINDOW > 0").1;
            if !self.warned[slot][1] && growing && g >= EXPLODING * first {
                self.warned[slot][1] = true;
                out.push(Finding {
                    layer: self.layers[slot].0,
                    trouble: Trouble::Exploding,
                    value: g,
                    evidence: format!(
                        "its norm grew at each of the last {WINDOW} measurements, ×{:.0} in all (to {})",
                        g / first,
                        sci(g)
                    ),
                });
            }
        }
        // A clip that fires on most steps: name the layer with the largest mean
        // gradient (for `layer_norm`, one above the limit).
        if *policy != Clip::None && clip.steps > 0 && clip.fired_fraction() > CLIP_MOST {
            let largest = self
                .epoch
                .layers
                .iter()
                .enumerate()
                .filter_map(|(slot, s)| Some((slot, mean(&s.grad_norm)?)))
                .filter(|(_, g)| g.is_finite())
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((slot, g)) = largest {
                if !self.warned[slot][1] {
                    self.warned[slot][1] = true;
                    out.push(Finding {
                        layer: self.layers[slot].0,
                        trouble: Trouble::Exploding,
                        value: g,
                        evidence: format!(
                            "clip `{}` fired on {:.0}% of this epoch's steps, and this layer's gradient is the largest",
                            clip_name(policy),
                            100.0 * clip.fired_fraction()
                        ),
                    });
                }
            }
        }
        out
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// `g / w`, with `0/0 = 0` (a layer with no weights and no gradient is not
/// learning).
fn ratio(g: f64, w: f64) -> f64 {
    if g == 0.0 {
        0.0
    } else {
        g / w
    }
}

/// A number for the table: 3 significant digits, scientific.
fn sci(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2e}")
    } else {
        format!("{x}")
    }
}

fn clip_name(c: &Clip) -> String {
    match c {
        Clip::None => "none".into(),
        Clip::Norm(m) => format!("norm({m})"),
        Clip::Value(v) => format!("value({v})"),
        Clip::LayerNorm(m) => format!("layer_norm({m})"),
    }
}

/// Turns findings into diagnostics and prints them on stderr.
pub fn warn(reporter: &Reporter<'_>, findings: &[Finding]) {
    if findings.is_empty() {
        return;
    }
    let diags: Vec<Diag> = findings
        .iter()
        .map(|f| {
            let span = reporter.span_of(f.layer);
            let layer = reporter.layer_name(f.layer);
            let lint = match f.trouble {
                Trouble::Vanishing => Lint::VanishingGradient {
                    layer,
                    ratio: sci(f.value),
                    count: WINDOW,
                    span,
                    help: Some(
                        "see `cnnc explain-code W0007`; the norms of every measurement are in `metrics.jsonl` (`health`)"
                            .into(),
                    ),
                },
                Trouble::Exploding => Lint::ExplodingGradient {
                    layer,
                    evidence: f.evidence.clone(),
                    span,
                    norm: sci(f.value),
                    help: Some(
                        "lower `lr`, add warm-up or `clip = norm(1.0)`; a clip that always fires needs a higher limit (`cnnc explain-code W0008`)"
                            .into(),
                    ),
                },
            };
            reporter.diag(Some(f.layer), DiagKind::Lint(lint))
        })
        .collect();
    eprint!("{}", reporter.render(&diags));
}

/// Diagnostics about the model's layers raised while training, rendered like the
/// front end's (see the module comment on where the source map comes from).
pub struct Reporter<'a> {
    file: &'a Path,
    model: &'a CheckedModel,
    sources: OnceCell<Option<SourceMap>>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, model: &'a CheckedModel) -> Reporter<'a> {
        Reporter {
            file,
            model,
            sources: OnceCell::new(),
        }
    }

    /// The source map of the file, if checking it again gives the same model.
    fn sources(&self) -> Option<&SourceMap> {
        self.sources
            .get_or_init(|| {
                let fe = pipeline::check_paths(&[self.file.to_path_buf()]);
                let same = fe
                    .files
                    .first()
                    .and_then(|f| f.checked.as_ref())
                    .and_then(|c| c.model.as_ref())
                    == Some(self.model);
                same.then_some(fe.sources)
            })
            .as_ref()
    }

    /// The span of layer `i`'s statement (empty if there is no such layer).
    pub fn span_of(&self, i: usize) -> miette::SourceSpan {
        self.model
            .layers
            .get(i)
            .map_or((0, 0).into(), |l| l.loc.span.into())
    }

    pub fn layer_name(&self, i: usize) -> String {
        self.model
            .layers
            .get(i)
            .map_or_else(|| format!("layer {i}"), |l| l.name.clone())
    }

    /// `kind` located at layer `layer`'s statement, with the block uses it was
    /// expanded from as notes (as the check stage does).
    pub fn diag(&self, layer: Option<usize>, kind: DiagKind) -> Diag {
        let Some(l) = layer.and_then(|i| self.model.layers.get(i)) else {
            return Diag::new(None, kind);
        };
        let Some(sources) = self.sources() else {
            return Diag::new(None, kind);
        };
        let mut d = Diag::new(Some(l.loc.file), kind);
        for (block, site) in l.trace.iter().rev().take(4) {
            d.notes.push(format!(
                "in block `{block}`, used at {}",
                sources.describe(*site)
            ));
        }
        d
    }

    /// `diags` rendered for stderr (colour as `--color auto` decides).
    pub fn render(&self, diags: &[Diag]) -> String {
        let empty = SourceMap::new();
        let sources = self.sources().unwrap_or(&empty);
        let color = crate::commands::use_color(crate::cli::Color::Auto);
        crate::render::diagnostics(sources, diags, crate::commands::stderr_width(), color)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_compiler::params::{ParamKind, ParamSpec};

    /// Two layers with parameters: `a` (weight [2], bias [1]) and `b` (weight [1],
    /// the model's third layer).
    fn setup() -> (CheckedModel, Params) {
        let spec = |name: &str, n: usize, layer: usize| ParamSpec {
            name: name.into(),
            shape: vec![n],
            kind: ParamKind::Weight,
            layer,
            trainable: true,
            fan_in: n,
            init: None,
        };
        let specs = vec![
            spec("a.weight", 2, 0),
            spec("a.bias", 1, 0),
            spec("b.weight", 1, 2),
        ];
        let mut params = Params::init(&specs, 0).unwrap();
        params.data_mut(0).copy_from_slice(&[3.0, 0.0]);
        params.data_mut(1).copy_from_slice(&[4.0]);
        params.data_mut(2).copy_from_slice(&[2.0]);
        let src = "model M {\n  input x: [1, 4, 4]\n  conv a(1, kernel=1)\n  global_avg_pool\n  linear b(1)\n}\n";
        let fe = pipeline::check_text("m.cnn", src);
        let model = fe.files[0].checked.as_ref().unwrap().model.clone().unwrap();
        (model, params)
    }

    #[test]
    fn norms_are_per_layer_and_averaged_over_the_window() {
        let (model, params) = setup();
        // 20 steps per epoch: a measurement every 2 steps.
        let mut h = Health::new(&model, &params, 20);
        assert_eq!(h.every(), 2);
        // Layer a's gradient norm is sqrt(sq0 + sq1): 5 then 13; b's 1 then 3.
        h.record(1, &[9.0, 16.0, 1.0], &params);
        assert!(h.epoch.steps.is_empty(), "the window is not full yet");
        h.record(2, &[25.0, 144.0, 9.0], &params);
        assert_eq!(h.epoch.steps, [2]);
        let (e, table, findings) = h.end_epoch(2, &params, &ClipStats::default(), &Clip::None);
        assert_eq!(e.every, 2);
        assert_eq!(e.steps, [2]);
        assert_eq!(e.layers[0].layer, "a");
        assert_eq!(e.layers[0].weight_norm, [5.0]);
        assert_eq!(e.layers[0].grad_norm, [9.0]);
        assert_eq!(e.layers[1].weight_norm, [2.0]);
        assert_eq!(e.layers[1].grad_norm, [2.0]);
        assert!(table.contains("1.80e0"), "a's |g|/|w| = 9/5:\n{table}");
        assert!(findings.is_empty());
        // The next epoch starts empty; a short epoch flushes its open window.
        h.record(3, &[0.0, 36.0, 4.0], &params);
        let (e, table, _) = h.end_epoch(3, &params, &ClipStats::default(), &Clip::None);
        assert_eq!(e.steps, [3]);
        assert_eq!(e.layers[0].grad_norm, [6.0]);
        assert!(
            table.contains("↓ ×0.67") || table.contains("→ ×0.67"),
            "{table}"
        );
    }

    #[test]
    fn a_sustained_zero_gradient_is_vanishing_once() {
        let (model, params) = setup();
        let mut h = Health::new(&model, &params, 1);
        let mut all = Vec::new();
        for step in 1..=(WINDOW as u64 + 3) {
            // Layer a gets nothing; b a healthy gradient.
            h.record(step, &[0.0, 0.0, 0.25], &params);
            let (_, _, f) = h.end_epoch(step, &params, &ClipStats::default(), &Clip::None);
            all.push((step, f));
        }
        let fired: Vec<_> = all.iter().filter(|(_, f)| !f.is_empty()).collect();
        assert_eq!(fired.len(), 1, "{all:?}");
        let (step, f) = fired[0];
        assert_eq!(*step, WINDOW as u64, "after the first WINDOW measurements");
        assert_eq!(f[0].layer, 0);
        assert_eq!(f[0].trouble, Trouble::Vanishing);
    }

    #[test]
    fn one_tiny_measurement_is_not_vanishing() {
        let (model, params) = setup();
        let mut h = Health::new(&model, &params, 1);
        for step in 1..=10u64 {
            let g = if step % 3 == 0 { 0.0 } else { 1.0 };
            h.record(step, &[g, 0.0, 1.0], &params);
            let (_, _, f) = h.end_epoch(step, &params, &ClipStats::default(), &Clip::None);
            assert!(f.is_empty(), "step {step}: {f:?}");
        }
    }

    #[test]
    fn fast_growth_is_exploding_slow_growth_is_not() {
        let (model, params) = setup();
        let mut h = Health::new(&model, &params, 1);
        let mut found = Vec::new();
        for step in 1..=8u64 {
            // a: ×4 per measurement (×256 over 5); b: ×1.5 (×5 over 5).
            let ga = 4f64.powi(step as i32);
            let gb = 1.5f64.powi(step as i32);
            h.record(step, &[ga * ga, 0.0, gb * gb], &params);
            let (_, _, f) = h.end_epoch(step, &params, &ClipStats::default(), &Clip::None);
            found.extend(f);
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].layer, found[0].trouble), (0, Trouble::Exploding));
        assert!(found[0].evidence.contains("×256"), "{}", found[0].evidence);
    }

    #[test]
    fn a_clip_firing_on_most_steps_names_the_largest_gradient() {
        let (model, params) = setup();
        let mut h = Health::new(&model, &params, 1);
        h.record(1, &[1.0, 0.0, 100.0], &params);
        let clip = ClipStats {
            steps: 4,
            fired: 3,
            ..ClipStats::default()
        };
        let (_, table, f) = h.end_epoch(1, &params, &clip, &Clip::Norm(0.5));
        assert!(table.contains("clip fired on 75%"), "{table}");
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].layer, f[0].trouble), (2, Trouble::Exploding));
        assert!(f[0].evidence.contains("norm(0.5)"), "{}", f[0].evidence);
        // Half the steps is not "most".
        let mut h = Health::new(&model, &params, 1);
        h.record(1, &[1.0, 0.0, 100.0], &params);
        let clip = ClipStats {
            steps: 4,
            fired: 2,
            ..ClipStats::default()
        };
        assert!(h
            .end_epoch(1, &params, &clip, &Clip::Norm(0.5))
            .2
            .is_empty());
    }
}
