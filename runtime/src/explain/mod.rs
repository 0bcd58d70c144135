//! Explanations of a trained model: the `explain` section's directives, run after
//! training (`cnnc run`) or on saved weights (`cnnc explain`).
//!
//! Each directive's method ([`methods`]) is computed from graphs compiled from
//! the model ([`runner`]: the input gradient, a feature map, its gradient), in
//! inference mode: batchnorm uses its running statistics, dropout is off, and
//! the weights are only read. Outputs go to the run folder's `explain/`:
//!
//! - `inputs/<sample>.png`, and `masks/<sample>.npy` / `.png` when the data
//!   knows where the object is (the `shapes` set);
//! - per directive `<output>/<sample>.png` (the heat map over the input),
//!   `<output>/<sample>.heat.png` (the map alone), `<output>/<sample>.npy` (the
//!   raw `H × W` float32 map) and `<output>/grid.png`;
//! - `evaluation.json` ([`evaluate`]) and `index.html` ([`html`]).
//!
//! `<sample>` is `<split>-<index>`, e.g. `test-3`.

pub mod evaluate;
pub mod html;
pub mod methods;
pub mod metrics;
pub mod render;
pub mod runner;

use crate::data::{Dataset, Loader, Splits};
use crate::params::Params;
use crate::train::{Engine, RunError};
use cnnc_compiler::checked::{
    Baseline, CheckedModel, ClassSel, ExplainDirective, Method, Split, TrainConfig,
};
use methods::Images;
use runner::Runner;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What to explain, with what.
pub struct Request<'a> {
    pub model: &'a CheckedModel,
    pub train: Option<&'a TrainConfig>,
    pub directives: &'a [ExplainDirective],
    pub splits: &'a Splits,
    pub params: &'a Params,
    pub engine: Engine,
    /// The folder to write into (`<run folder>/explain`).
    pub dir: &'a Path,
    /// Where the weights came from, for the page.
    pub weights: String,
    /// Also evaluate the maps (`evaluation.json`).
    pub evaluate: bool,
}

/// One explained image.
pub struct Sample {
    /// Index in its split.
    pub index: usize,
    /// `<split>-<index>`.
    pub name: String,
    pub label: usize,
    pub predicted: usize,
    /// Softmax probability of the predicted class.
    pub probability: f32,
    /// The class explained and its score (logit).
    pub class: usize,
    pub score: f32,
    /// `H × W`, signed for Integrated Gradients, otherwise `≥ 0`.
    pub map: Vec<f32>,
    /// The map is constant (e.g. all zero after Grad-CAM's ReLU): nothing to show.
    pub degenerate: bool,
}

/// The results of one directive.
pub struct Explained {
    pub directive: ExplainDirective,
    pub samples: Vec<Sample>,
    /// Integrated Gradients: per image, `Σ map − (s(x) − s(x'))`.
    pub completeness_gap: Option<Vec<f32>>,
}

/// What a run of the directives produced.
pub struct Summary {
    pub dir: PathBuf,
    pub explained: Vec<Explained>,
    pub evaluation: Option<evaluate::Evaluation>,
}

/// The words for a directive: `CAM of layer `features`, class = label`.
pub fn describe(model: &CheckedModel, d: &ExplainDirective) -> String {
    let layer = |v: &cnnc_compiler::checked::ValueId| {
        if v.0 == 0 {
            model.input_name.clone()
        } else {
            model.layers[v.0 - 1].name.clone()
        }
    };
    let method = match &d.method {
        Method::Saliency => "saliency |∂score/∂input|, max over channels".to_string(),
        Method::SmoothGrad { samples, noise } => {
            format!("SmoothGrad, {samples} noisy copies, noise {noise} of the image's range")
        }
        Method::IntegratedGradients { steps, baseline } => format!(
            "Integrated Gradients, {steps} steps from a {} baseline (signed; summed over channels)",
            match baseline {
                Baseline::Zero => "zero",
                Baseline::Mean => "mean-colour",
                Baseline::Blur => "blurred",
            }
        ),
        Method::Cam { layer: l } => format!("CAM of layer `{}`", layer(l)),
        Method::GradCam { layer: l } => format!("Grad-CAM of layer `{}`", layer(l)),
    };
    let class = match d.class {
        ClassSel::Predicted => "class = predicted".to_string(),
        ClassSel::Label => "class = label".to_string(),
        ClassSel::Index(k) => format!("class = {k}"),
    };
    format!("{method}, {class}")
}

pub fn method_name(m: &Method) -> &'static str {
    match m {
        Method::Saliency => "saliency",
        Method::SmoothGrad { .. } => "smoothgrad",
        Method::IntegratedGradients { .. } => "integrated_gradients",
        Method::Cam { .. } => "cam",
        Method::GradCam { .. } => "gradcam",
    }
}

fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Test => "test",
    }
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn backend(e: String) -> RunError {
    crate::train::backend_error(e)
}

/// The images of `indices` of `data` as the model reads them in evaluation (the
/// evaluation transforms of the `augment` list, e.g. `normalize`).
fn eval_images(
    data: &Dataset,
    train: Option<&TrainConfig>,
    indices: &[usize],
) -> Result<Vec<f32>, RunError> {
    let (augment, seed) = match train {
        Some(t) => (t.augment.clone(), t.seed),
        None => (Vec::new(), 0),
    };
    let loader = Loader::new(data, indices.len().max(1), &augment, seed)?;
    Ok(loader.batch_of(indices, None).x)
}

/// The sample indices of `d`, each checked against the split's size.
fn indices(d: &ExplainDirective, data: &Dataset) -> Result<Vec<usize>, RunError> {
    d.samples
        .iter()
        .map(|&i| match usize::try_from(i) {
            Ok(i) if i < data.len() => Ok(i),
            _ => Err(RunError::Explain(format!(
                "the directive writing \"{}\" asks for {}[{i}], but the {} set has {} images (0..{})",
                d.output,
                split_name(d.split),
                split_name(d.split),
                data.len(),
                data.len()
            ))),
        })
        .collect()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Computes the maps of one directive (nothing written).
pub fn explain_one(
    runner: &mut Runner,
    params: &Params,
    d: &ExplainDirective,
    data: &Dataset,
    train: Option<&TrainConfig>,
    stream: u64,
) -> Result<Explained, RunError> {
    let idx = indices(d, data)?;
    let x = eval_images(data, train, &idx)?;
    let images = Images {
        x: &x,
        n: idx.len(),
        shape: data.shape,
    };
    let logits = methods::logits(runner, params, &images).map_err(backend)?;
    let classes: Vec<usize> = idx
        .iter()
        .zip(&logits)
        .map(|(&i, l)| match d.class {
            ClassSel::Predicted => argmax(l),
            ClassSel::Label => data.labels[i] as usize,
            ClassSel::Index(k) => k as usize,
        })
        .collect();
    let seed = train.map_or(0, |t| t.seed);
    let maps = methods::compute(runner, params, &d.method, &images, &classes, seed, stream)
        .map_err(backend)?;
    let samples = idx
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let p = softmax(&logits[j]);
            let predicted = argmax(&logits[j]);
            let map = maps.maps[j].clone();
            Sample {
                index: i,
                name: format!("{}-{i}", split_name(d.split)),
                label: data.labels[i] as usize,
                predicted,
                probability: p[predicted],
                class: classes[j],
                score: logits[j][classes[j]],
                degenerate: render::normalize01(&map).is_none(),
                map,
            }
        })
        .collect();
    Ok(Explained {
        directive: d.clone(),
        samples,
        completeness_gap: maps.completeness_gap,
    })
}

/// Runs every directive, writes the outputs, evaluates the maps.
pub fn run(req: &Request) -> Result<Summary, RunError> {
    let dir = req.dir;
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let mut runner = Runner::new(req.model, req.engine);
    let mut explained = Vec::new();
    // Inputs and masks already written (several directives share samples).
    let mut written = HashSet::new();
    for (k, d) in req.directives.iter().enumerate() {
        let data = match d.split {
            Split::Train => &req.splits.train,
            Split::Test => &req.splits.test,
        };
        let e = explain_one(&mut runner, req.params, d, data, req.train, k as u64)?;
        write_directive(dir, &e, data, &mut written)?;
        explained.push(e);
    }
    let evaluation = if req.evaluate {
        let ev = evaluate::evaluate(&mut runner, req, &explained)?;
        let path = dir.join("evaluation.json");
        let json = serde_json::to_string_pretty(&ev).map_err(|e| write_err(&path, e))?;
        crate::checkpoint::write_atomic(&path, format!("{json}\n").as_bytes())
            .map_err(|e| write_err(&path, e))?;
        Some(ev)
    } else {
        None
    };
    let page = html::index_html(&page(req, &explained, evaluation.as_ref()));
    let path = dir.join("index.html");
    crate::checkpoint::write_atomic(&path, page.as_bytes()).map_err(|e| write_err(&path, e))?;
    Ok(Summary {
        dir: dir.to_path_buf(),
        explained,
        evaluation,
    })
}

/// The map as shown: its magnitude (Integrated Gradients is signed), scaled to
/// `[0, 1]`; `None` for a constant map.
fn shown(map: &[f32]) -> Option<Vec<f32>> {
    let mag: Vec<f32> = map.iter().map(|v| v.abs()).collect();
    render::normalize01(&mag)
}

fn write_directive(
    dir: &Path,
    e: &Explained,
    data: &Dataset,
    written: &mut HashSet<String>,
) -> Result<(), RunError> {
    let [c, h, w] = data.shape;
    let scale = render::display_scale(h, w);
    let out = dir.join(&e.directive.output);
    let inputs = dir.join("inputs");
    let masks = dir.join("masks");
    for d in [&out, &inputs] {
        std::fs::create_dir_all(d).map_err(|err| write_err(d, err))?;
    }
    let png = |path: PathBuf, img: &image::RgbImage| {
        render::save_png(&path, img).map_err(|err| write_err(&path, err))
    };
    let mut tiles = Vec::new();
    for s in &e.samples {
        // The display is of the stored image (before any normalisation).
        let img = data.image(s.index);
        if written.insert(s.name.clone()) {
            let input = image::imageops::resize(
                &render::display_image(img, c, h, w),
                w as u32 * scale,
                h as u32 * scale,
                image::imageops::FilterType::Nearest,
            );
            png(inputs.join(format!("{}.png", s.name)), &input)?;
            if let Some(mask) = data.mask(s.index) {
                std::fs::create_dir_all(&masks).map_err(|err| write_err(&masks, err))?;
                let m: Vec<f32> = mask.iter().map(|&v| f32::from(v)).collect();
                let path = masks.join(format!("{}.npy", s.name));
                render::save_map_npy(&path, &m, h, w).map_err(|err| write_err(&path, err))?;
                png(
                    masks.join(format!("{}.png", s.name)),
                    &render::overlay(img, c, h, w, Some(&m), scale, 0.5),
                )?;
            }
        }
        let path = out.join(format!("{}.npy", s.name));
        render::save_map_npy(&path, &s.map, h, w).map_err(|err| write_err(&path, err))?;
        let map01 = shown(&s.map);
        let over = render::overlay(img, c, h, w, map01.as_deref(), scale, 0.6);
        png(out.join(format!("{}.png", s.name)), &over)?;
        let heat = match &map01 {
            Some(m) => render::heat(m, h, w, scale),
            None => render::heat(&vec![0.0; h * w], h, w, scale),
        };
        png(out.join(format!("{}.heat.png", s.name)), &heat)?;
        tiles.push(over);
    }
    let cols = (tiles.len() as f64).sqrt().ceil().max(1.0) as usize;
    png(out.join("grid.png"), &render::grid(&tiles, cols, 4))?;
    Ok(())
}

fn page(req: &Request, explained: &[Explained], ev: Option<&evaluate::Evaluation>) -> html::Page {
    let data_names = &req.splits.test.class_names;
    html::Page {
        title: req.model.name.clone(),
        subtitle: format!(
            "weights: {}; inference mode (batchnorm uses running statistics, dropout off); \
             the weights are only read",
            req.weights
        ),
        class_names: data_names.clone(),
        methods: explained
            .iter()
            .map(|e| {
                let o = &e.directive.output;
                let has_masks = match e.directive.split {
                    Split::Train => req.splits.train.masks.is_some(),
                    Split::Test => req.splits.test.masks.is_some(),
                };
                html::MethodSection {
                    name: o.clone(),
                    description: describe(req.model, &e.directive),
                    grid: format!("{o}/grid.png"),
                    samples: e
                        .samples
                        .iter()
                        .map(|s| html::SampleRow {
                            index: s.index,
                            input_png: format!("inputs/{}.png", s.name),
                            overlay_png: format!("{o}/{}.png", s.name),
                            heat_png: format!("{o}/{}.heat.png", s.name),
                            npy: format!("{o}/{}.npy", s.name),
                            mask_png: has_masks.then(|| format!("masks/{}.png", s.name)),
                            label: s.label,
                            predicted: s.predicted,
                            probability: s.probability,
                            explained_class: s.class,
                            explained_score: s.score,
                            degenerate: s.degenerate,
                        })
                        .collect(),
                }
            })
            .collect(),
        evaluation: ev.map(evaluate::Evaluation::table),
    }
}

/// `cnnc explain`'s settings.
pub struct SavedOptions<'a> {
    pub weights: &'a Path,
    pub out: Option<&'a Path>,
    pub overwrite: bool,
    pub engine: Engine,
    pub evaluate: bool,
}

/// `cnnc explain`: the directives on saved weights, into a new run folder
/// (`runs/<file stem>-explain` unless `--out`).
pub fn explain_saved(
    file: &Path,
    model: &CheckedModel,
    train: Option<&TrainConfig>,
    directives: &[ExplainDirective],
    opts: &SavedOptions,
) -> Result<Summary, RunError> {
    let cfg = train.ok_or(RunError::NoTrain)?;
    let specs = cnnc_compiler::params::param_specs(model);
    let params = crate::checkpoint::load_weights(opts.weights, &specs)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let splits = crate::data::load(&cfg.data, base)?;
    crate::train::check_data(model, &splits.train)?;
    crate::train::check_data(model, &splits.test)?;
    let out = crate::train::run_folder(file, opts.out, opts.overwrite, "-explain")?;
    println!(
        "explaining `{}` with {} ({} directive{}); run folder {}",
        model.name,
        opts.weights.display(),
        directives.len(),
        if directives.len() == 1 { "" } else { "s" },
        out.display()
    );
    run(&Request {
        model,
        train: Some(cfg),
        directives,
        splits: &splits,
        params: &params,
        engine: opts.engine,
        dir: &out.join("explain"),
        weights: opts.weights.display().to_string(),
        evaluate: opts.evaluate,
    })
}

/// Prints what the directives made: one line each, the evaluation table, the page.
pub fn report(s: &Summary) {
    println!("explained in inference mode (batchnorm uses running statistics, dropout off); weights unchanged");
    for e in &s.explained {
        let degenerate = e.samples.iter().filter(|x| x.degenerate).count();
        let mut line = format!("  {:<22} {} maps", e.directive.output, e.samples.len());
        if degenerate > 0 {
            line += &format!(
                ", {degenerate} degenerate (constant, e.g. all zero after ReLU: nothing to show)"
            );
        }
        println!("{line}");
    }
    if let Some(ev) = &s.evaluation {
        print!("{}", ev.human());
    }
    println!("page: {}", s.dir.join("index.html").display());
}
