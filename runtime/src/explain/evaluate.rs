//! How good the maps are, per directive, with the definitions of [`metrics`]:
//!
//! - pointing game (Zhang et al.): the share of images whose map peaks within
//!   15/224 of the image side of the object's mask, beside the centre baseline
//!   (a map that always points at the middle); only when the data has masks;
//! - deletion and insertion (Petsiuk et al.): the area under the explained
//!   class's probability as pixels are removed (set to 0) or inserted (onto a
//!   blurred copy) in the map's order, against a random order of the same image;
//!   a degenerate map has no order and is scored with the random one;
//! - model randomisation (Adebayo et al. 2018): the layers with parameters are
//!   re-initialised one by one from the top (as at the start of training, with
//!   another seed; literal `weights=` stay), the maps recomputed for the same
//!   classes, and the Spearman rank correlation of their magnitudes with the
//!   trained model's maps taken per image and averaged. Maps that explain the
//!   model fall towards 0; maps that only show the image stay high.

use super::methods::{self, Images};
use super::metrics::{self, CurveSettings, Mean, Morph, Rate};
use super::runner::{GraphKind, Runner};
use super::{backend, eval_images, method_name, Explained, Request};
use crate::params::{Params, Tensor};
use crate::train::RunError;
use cnnc_compiler::checked::Split;
use cnnc_compiler::params::ParamKind;
use serde::Serialize;

/// `evaluation.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// Always "inference": batchnorm running statistics, dropout off.
    pub mode: &'static str,
    /// The pointing game's tolerance in pixels (15/224 of the longer side).
    pub pointing_tolerance_px: f64,
    /// Points of each deletion / insertion curve (`steps + 1`).
    pub curve_steps: usize,
    pub deletion_baseline: &'static str,
    /// σ of the Gaussian blur of the insertion canvas, in pixels.
    pub insertion_blur_px: f64,
    pub directives: Vec<DirectiveEval>,
}

/// The figures of one directive.
#[derive(Clone, Debug, Serialize)]
pub struct DirectiveEval {
    /// The directive's output folder.
    pub output: String,
    pub method: &'static str,
    pub samples: usize,
    /// Maps that are constant (nothing to point with).
    pub degenerate: usize,
    /// Share of hits (a degenerate map is a miss); `None` without masks.
    pub pointing_game: Option<f64>,
    pub centre_baseline: Option<f64>,
    /// Mean area under the deletion curve (lower is better) and with random order.
    pub deletion_auc: f64,
    pub deletion_auc_random: f64,
    /// `1 − deletion_auc / deletion_auc_random`: how far below random.
    pub deletion_below_random: f64,
    /// Mean area under the insertion curve (higher is better) and with random order.
    pub insertion_auc: f64,
    pub insertion_auc_random: f64,
    /// Spearman correlation after re-initialising each layer from the top,
    /// cumulatively; the last entry has every layer re-initialised.
    pub randomisation: Vec<CascadeStep>,
    /// The last cascade step's correlation: trained vs fully randomised.
    pub spearman_randomised: Option<f64>,
    /// Integrated Gradients: mean `|Σ map − (s(x) − s(x'))|` over the images, and
    /// mean `|s(x) − s(x')|` for scale.
    pub completeness_gap: Option<f64>,
    pub score_difference: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CascadeStep {
    /// The layer re-initialised at this step (with those above it).
    pub layer: String,
    pub spearman: Option<f64>,
}

pub fn evaluate(
    runner: &mut Runner,
    req: &Request,
    explained: &[Explained],
) -> Result<Evaluation, RunError> {
    let [_, h, w] = req.splits.test.shape;
    let settings = CurveSettings::default();
    let mut out = Evaluation {
        mode: "inference",
        pointing_tolerance_px: metrics::pointing_tolerance(h, w),
        curve_steps: settings.steps,
        deletion_baseline: "blurred copy of the image (the insertion canvas)",
        insertion_blur_px: metrics::insertion_sigma(h, w),
        directives: Vec::new(),
    };
    let cascade = cascade_layers(req);
    for (k, e) in explained.iter().enumerate() {
        out.directives
            .push(evaluate_one(runner, req, e, k as u64, settings, &cascade)?);
    }
    Ok(out)
}

/// The layers with parameters to re-initialise, from the top: (layer name,
/// parameter indices).
fn cascade_layers(req: &Request) -> Vec<(String, Vec<usize>)> {
    let mut layers: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, s) in req.params.specs().iter().enumerate() {
        let randomisable = matches!(
            s.kind,
            ParamKind::Weight | ParamKind::Bias | ParamKind::Gamma | ParamKind::Beta
        ) && s.init.is_none();
        if !randomisable {
            continue;
        }
        let name = req.model.layers[s.layer].name.clone();
        match layers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(i),
            None => layers.push((name, vec![i])),
        }
    }
    // Specs are in model order.
    layers.reverse();
    layers
}

fn evaluate_one(
    runner: &mut Runner,
    req: &Request,
    e: &Explained,
    stream: u64,
    settings: CurveSettings,
    cascade: &[(String, Vec<usize>)],
) -> Result<DirectiveEval, RunError> {
    let d = &e.directive;
    let data = match d.split {
        Split::Train => &req.splits.train,
        Split::Test => &req.splits.test,
    };
    let shape = data.shape;
    let [_, h, w] = shape;
    let hw = h * w;
    let indices: Vec<usize> = e.samples.iter().map(|s| s.index).collect();
    let x = eval_images(data, req.train, &indices)?;
    let images = Images {
        x: &x,
        n: indices.len(),
        shape,
    };
    let magnitude = |m: &[f32]| -> Vec<f32> { m.iter().map(|v| v.abs()).collect() };

    // Pointing game.
    let tol = metrics::pointing_tolerance(h, w);
    let (mut pointing, mut centre) = (Rate::default(), Rate::default());
    let has_masks = data.masks.is_some();
    for s in &e.samples {
        if let Some(mask) = data.mask(s.index) {
            pointing.add(metrics::pointing_hit(&magnitude(&s.map), mask, h, w, tol));
            centre.add(metrics::centre_hit(mask, h, w, tol));
        }
    }

    // Deletion and insertion, the map's order and a random one, all at once.
    let seed = req.train.map_or(0, |t| t.seed);
    let mut orders = Vec::new();
    for (j, s) in e.samples.iter().enumerate() {
        let random = metrics::random_order(hw, seed ^ (stream << 32) ^ j as u64);
        let by_map = if s.degenerate {
            random.clone()
        } else {
            metrics::order_by_map(&magnitude(&s.map))
        };
        orders.push((by_map, random));
    }
    let sigma = metrics::insertion_sigma(h, w);
    let canvases: Vec<Vec<f32>> = (0..images.n)
        .map(|j| metrics::blur(images.image(j), shape, sigma))
        .collect::<Result<_, String>>()
        .map_err(backend)?;
    let mut morphs = Vec::new();
    let mut owner = Vec::new();
    for (j, (by_map, random)) in orders.iter().enumerate() {
        let img = images.image(j);
        morphs.push(Morph::deletion(img, by_map, Some(&canvases[j])));
        morphs.push(Morph::deletion(img, random, Some(&canvases[j])));
        morphs.push(Morph::insertion(img, by_map, &canvases[j]));
        morphs.push(Morph::insertion(img, random, &canvases[j]));
        owner.extend([j; 4]);
    }
    let classes: Vec<usize> = e.samples.iter().map(|s| s.class).collect();
    let params = req.params;
    let mut score = |batch: &[f32], owners: &[usize]| -> Result<Vec<f32>, String> {
        probabilities(
            runner,
            params,
            batch,
            shape,
            |i| classes[owner[owners[i]]],
            owners.len(),
        )
    };
    let curves = metrics::curves(&morphs, shape, settings, &mut score).map_err(backend)?;
    let mut auc = [
        Mean::default(),
        Mean::default(),
        Mean::default(),
        Mean::default(),
    ];
    for (i, c) in curves.iter().enumerate() {
        auc[i % 4].add(Some(metrics::auc(c)));
    }
    let mean = |m: &Mean| m.mean().unwrap_or(f64::NAN);
    let (del, del_r, ins, ins_r) = (mean(&auc[0]), mean(&auc[1]), mean(&auc[2]), mean(&auc[3]));

    // Model randomisation, cascading from the top.
    let specs = req.params.specs();
    let fresh = Params::init(specs, seed.wrapping_add(0x5EED_5A17)).map_err(RunError::Params)?;
    let mut randomised = req.params.clone();
    let mut steps = Vec::new();
    for (layer, tensors) in cascade {
        for &i in tensors {
            if let (Some(src), Some(dst)) =
                (fresh.tensor(i).as_f32(), randomised.get_mut(&specs[i].name))
            {
                *dst = Tensor::F32(src.to_vec());
            }
        }
        let maps = methods::compute(
            runner,
            &randomised,
            &d.method,
            &images,
            &classes,
            seed,
            stream,
        )
        .map_err(backend)?;
        let mut rho = Mean::default();
        for (s, m) in e.samples.iter().zip(&maps.maps) {
            rho.add(metrics::spearman(&magnitude(&s.map), &magnitude(m)));
        }
        steps.push(CascadeStep {
            layer: layer.clone(),
            spearman: rho.mean(),
        });
    }

    let (gap, diff) = match &e.completeness_gap {
        Some(g) => {
            let n = g.len().max(1) as f64;
            let gap = g.iter().map(|v| f64::from(v.abs())).sum::<f64>() / n;
            let diff = e
                .samples
                .iter()
                .zip(g)
                .map(|(s, gi)| f64::from((s.map.iter().sum::<f32>() - gi).abs()))
                .sum::<f64>()
                / n;
            (Some(gap), Some(diff))
        }
        None => (None, None),
    };
    Ok(DirectiveEval {
        output: d.output.clone(),
        method: method_name(&d.method),
        samples: e.samples.len(),
        degenerate: e.samples.iter().filter(|s| s.degenerate).count(),
        pointing_game: if has_masks { pointing.fraction() } else { None },
        centre_baseline: if has_masks { centre.fraction() } else { None },
        deletion_auc: del,
        deletion_auc_random: del_r,
        deletion_below_random: 1.0 - del / del_r,
        insertion_auc: ins,
        insertion_auc_random: ins_r,
        spearman_randomised: steps.last().and_then(|s| s.spearman),
        randomisation: steps,
        completeness_gap: gap,
        score_difference: diff,
    })
}

/// The softmax probability of class `class(i)` for each of the `n` images.
fn probabilities(
    runner: &mut Runner,
    params: &Params,
    x: &[f32],
    shape: [usize; 3],
    class: impl Fn(usize) -> usize,
    n: usize,
) -> Result<Vec<f32>, String> {
    let len: usize = shape.iter().product();
    let mut out = vec![0.0f32; n];
    methods::for_each_item(
        runner,
        params,
        GraphKind::Logits,
        n,
        len,
        |i, buf| buf.copy_from_slice(&x[i * len..(i + 1) * len]),
        |_| 0,
        &[("logits", 0)],
        |i, o| out[i] = super::softmax(o[0])[class(i)],
    )?;
    Ok(out)
}

impl Evaluation {
    /// The figures for the page.
    pub fn table(&self) -> super::html::Table {
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        let g = |v: f64| format!("{v:.3}");
        super::html::Table {
            columns: [
                "explanation",
                "method",
                "pointing game",
                "centre baseline",
                "deletion AUC ↓",
                "random order",
                "below random",
                "insertion AUC ↑",
                "random order",
                "Spearman vs randomised model ↓",
            ]
            .map(String::from)
            .to_vec(),
            rows: self
                .directives
                .iter()
                .map(|d| {
                    vec![
                        d.output.clone(),
                        d.method.to_string(),
                        f(d.pointing_game),
                        f(d.centre_baseline),
                        g(d.deletion_auc),
                        g(d.deletion_auc_random),
                        format!("{:.0}%", 100.0 * d.deletion_below_random),
                        g(d.insertion_auc),
                        g(d.insertion_auc_random),
                        f(d.spearman_randomised),
                    ]
                })
                .collect(),
            notes: vec![
                format!(
                    "Pointing game: the map's peak within {:.2} px (15/224 of the side) of the object's mask; \
                     a constant map is a miss. Centre baseline: the same for the image's centre.",
                    self.pointing_tolerance_px
                ),
                format!(
                    "Deletion / insertion: the explained class's probability as the image's pixels are \
                     replaced by those of a blurred copy (σ = {:.1} px) / copied onto it, in the map's \
                     order, {} steps; area under the curve, against a random order of the same pixels.",
                    self.insertion_blur_px, self.curve_steps
                ),
                "Model randomisation: Spearman rank correlation between the trained model's maps and \
                 the maps after re-initialising every layer (cascading from the top); see evaluation.json \
                 for each step."
                    .to_string(),
            ],
        }
    }

    /// The figures as text, one line per directive.
    pub fn human(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mut s = format!(
            "{:<22} {:>8} {:>6} {:>16} {:>16} {:>10}\n",
            "explanation",
            "pointing",
            "centre",
            "deletion (rand)",
            "insertion (rand)",
            "randomised"
        );
        for d in &self.directives {
            s += &format!(
                "{:<22} {:>8} {:>6} {:>16} {:>16} {:>10}\n",
                d.output,
                f(d.pointing_game),
                f(d.centre_baseline),
                format!("{:.3} ({:.3})", d.deletion_auc, d.deletion_auc_random),
                format!("{:.3} ({:.3})", d.insertion_auc, d.insertion_auc_random),
                f(d.spearman_randomised),
            );
        }
        s
    }
}
