//! `cnnc run` and `cnnc eval`: the training loop and evaluation of a checked model.
//!
//! One epoch: shuffled, augmented batches; per step the backend computes the loss
//! and gradients, the clip policy is applied, the optimizer updates the
//! parameters with the scheduled learning rate, and batchnorm's running statistics
//! are updated. After every epoch the test set is evaluated, a line is printed,
//! one object is appended to `metrics.jsonl`, and checkpoints are written.
//!
//! `cnnc run --resume` continues a run from the newest complete checkpoint of its
//! folder (`--out DIR`, or `runs/<file stem>`, not `runs/<file stem>-2`, …; see
//! `checkpoint.rs` for the format and what "complete" means). Everything is
//! checked before anything is written, so a refused resume changes no file. Since
//! every random choice is keyed by (seed, epoch, sample) or (seed, step), a resumed
//! run ends with the same weights, bit for bit, as one never interrupted
//! (`runtime/tests/resume.rs`). Checkpoints are taken at the end of an epoch, so a
//! run killed mid-epoch repeats that epoch. `--epochs` may change between the
//! parts of a run; a cosine schedule, whose length is the run's, is then
//! stretched to the new length (a note says so) and the result is not that of
//! an uninterrupted run.

use crate::backend::{Backend, Interpreter, Jit};
use crate::checkpoint::{self, CheckpointError, RunIdentity, TrainState};
use crate::data::{self, Batch, DataError, Dataset, Loader};
use crate::optim::{ClipOutcome, ClipStats, Optimizer, Schedule};
use crate::params::{Params, ParamsError};
use cnnc_compiler::checked::{CheckedModel, Clip, ExplainDirective, Loss, TrainConfig};
use cnnc_compiler::ir::lower::{eval_graph, train_graph};
use cnnc_compiler::params::{param_specs, ParamKind};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;

/// Errors of a run, each with what to do about it.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("the data gives {data:?} images but the model's input is {model:?}")]
    DataShape { data: [usize; 3], model: Vec<u64> },
    #[error("the data has {data} classes but the model gives {model} class scores")]
    Classes { data: usize, model: u64 },
    #[error("the run folder `{0}` already exists and is not empty; choose another --out, or add --overwrite")]
    OutExists(PathBuf),
    #[error("cannot write `{path}`: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("the model file has no `train` section, so there is nothing to train on")]
    NoTrain,
    #[error("bad --data `{0}`: expected mnist:PATH or folder:PATH")]
    DataSpec(String),
    #[error(
        "this model is too large for the JIT backend at batch {batch}: {reason}\n\
         help: use a smaller `batch`, or `--backend interp`"
    )]
    TooLargeForJit { batch: usize, reason: String },
    #[error("{0}")]
    Explain(String),
    #[error("{0}")]
    OutOfMemory(String),
    /// A step's loss or gradients were not finite (the diagnosis is printed
    /// before; `nonfinite.rs`).
    #[error("{0}")]
    NonFinite(String),
    #[error("internal error in the backend: {message}")]
    Backend { message: String },
    #[error(
        "there is no run folder `{}` to resume\n\
         help: name the run's folder with --out DIR",
        .0.display()
    )]
    NoRunFolder(PathBuf),
    #[error(
        "the newest complete checkpoint, `{}`, is at epoch {epoch}, past the {epochs} \
         epochs asked for\n\
         help: resume with --epochs {epoch} or more",
        path.display()
    )]
    ResumePast {
        path: PathBuf,
        epoch: u64,
        epochs: u64,
    },
    #[error(
        "checkpoint `{}` was trained on {saved} images per epoch, but the data now has \
         {now}\n\
         help: resume with the data the run started with, or start a new run without --resume",
        path.display()
    )]
    DataChanged { path: PathBuf, saved: u64, now: u64 },
}

/// Which engine runs the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Fused native kernels compiled with Cranelift (the default).
    Jit,
    /// The reference interpreter (ndarray; simple and slow).
    Interp,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Jit => "jit",
            BackendKind::Interp => "interp",
        }
    }
}

/// A backend and the threads it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Engine {
    pub kind: BackendKind,
    /// Worker threads (the interpreter always runs on one).
    pub threads: usize,
    /// Bounds-check the JIT's kernels (`--checked`).
    pub checked: bool,
}

impl Engine {
    /// Threads the engine really runs on.
    pub fn effective_threads(self) -> usize {
        match self.kind {
            BackendKind::Jit => self.threads.max(1),
            BackendKind::Interp => 1,
        }
    }
}

pub struct RunOptions {
    pub out: Option<PathBuf>,
    pub overwrite: bool,
    pub epochs: Option<u64>,
    pub engine: Engine,
    pub init: Option<PathBuf>,
    /// Continue the run in `out` (or `runs/<file stem>`) from its newest complete
    /// checkpoint.
    pub resume: bool,
    /// The `explain` directives to run after training.
    pub explain: Vec<ExplainDirective>,
}

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
struct EpochMetrics {
    epoch: u64,
    train_loss: f64,
    train_accuracy: f64,
    test_loss: f64,
    test_accuracy: f64,
    images_per_sec: f64,
    seconds: f64,
    lr: f32,
    clip_fired: f64,
    grad_norm_mean: f64,
    grad_norm_max: f32,
    /// Steps whose update was skipped (`on_nonfinite = skip`), this epoch.
    nonfinite_skipped: u64,
    /// Per-layer weight and gradient norms (`health.rs`).
    health: crate::health::EpochHealth,
}

/// The final figures of a run.
pub struct RunSummary {
    pub out: PathBuf,
    pub test_accuracy: f64,
    pub test_loss: f64,
}

/// What every training step needs besides the batch: the clip policy, the layer
/// of each gradient (for `layer_norm` clipping) and the batch counters of the
/// batchnorm layers.
pub struct StepPlan<'a> {
    clip: &'a Clip,
    layer_of: Vec<usize>,
    counters: Vec<usize>,
}

impl<'a> StepPlan<'a> {
    pub fn new(params: &Params, clip: &'a Clip) -> Self {
        StepPlan {
            clip,
            layer_of: params.trainable_layers(),
            counters: (0..params.len())
                .filter(|&i| params.spec(i).kind == ParamKind::BatchesTracked)
                .collect(),
        }
    }
}

/// What [`train_step`] reports.
pub struct StepReport {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Images whose top class is the label.
    pub correct: usize,
    pub clip: ClipOutcome,
    /// The update was applied: false when the loss, a gradient or a running
    /// statistic was not finite (`nonfinite.rs`), and then nothing changed.
    pub applied: bool,
    /// Sum of squares (f64) of each gradient before clipping, in
    /// `Params::trainable()` order (gradient health reads them).
    pub grad_sq: Vec<f64>,
}

/// One full training step, the single code path of `cnnc run` and `cnnc bench`:
/// the backend's forward, loss and backward, its update (the clip policy, then
/// the optimizer at learning rate `lr`: [`Backend::update`], fused kernels on the
/// JIT), the new batchnorm running statistics and batch counters.
pub fn train_step(
    engine: &mut dyn Backend,
    params: &mut Params,
    opt: &mut Optimizer,
    plan: &StepPlan<'_>,
    batch: &Batch,
    seed: u32,
    lr: f32,
) -> Result<StepReport, RunError> {
    let s = engine
        .train_step(params, &batch.x, &batch.labels, batch.n, seed)
        .map_err(backend_error)?;
    // Non-finite check (nonfinite.rs): such a step changes nothing.
    let grad_sq = crate::nonfinite::sums_of_squares(&s.grads);
    if !crate::nonfinite::step_is_finite(s.loss, &grad_sq, &s.updates) {
        return Ok(StepReport {
            loss: s.loss,
            correct: s.correct,
            clip: ClipOutcome {
                fired: false,
                norm: grad_sq.iter().sum::<f64>().sqrt() as f32,
            },
            applied: false,
            grad_sq,
        });
    }
    let clip = engine
        .update(params, opt, s.grads, &plan.layer_of, plan.clip, lr)
        .map_err(backend_error)?;
    for (i, values) in s.updates {
        params.data_mut(i).copy_from_slice(&values);
    }
    for &i in &plan.counters {
        let c = params.counter(i).unwrap_or(0);
        params.set_counter(i, c + 1);
    }
    Ok(StepReport {
        loss: s.loss,
        correct: s.correct,
        clip,
        applied: true,
        grad_sq,
    })
}

pub(crate) fn backend(
    engine: Engine,
    model: &CheckedModel,
    train: Option<&TrainConfig>,
) -> Box<dyn Backend> {
    let smoothing = train.map_or(0.0, |t| {
        let Loss::CrossEntropy { smoothing } = t.loss;
        smoothing
    });
    match engine.kind {
        BackendKind::Jit => {
            Box::new(Jit::new(model, smoothing, engine.threads).with_checks(engine.checked))
        }
        BackendKind::Interp => Box::new(Interpreter::new(model, smoothing)),
    }
}

/// Refuses, before any data is read, a model the JIT cannot compile at batch
/// `n` (a tensor of `graph()` past its size limit): a clear error instead of a
/// failure half-way.
pub fn check_jit_limits(
    engine: Engine,
    n: usize,
    graph: impl FnOnce() -> cnnc_compiler::ir::Graph,
) -> Result<(), RunError> {
    if engine.kind != BackendKind::Jit {
        return Ok(());
    }
    match cnnc_compiler::codegen::exec::too_large(&graph()) {
        Some(reason) => Err(RunError::TooLargeForJit { batch: n, reason }),
        None => Ok(()),
    }
}

/// What the JIT has to say about this CPU (no native FMA, …), checked once at
/// start-up; empty on a good host.
pub fn jit_warnings() -> Vec<String> {
    match cnnc_compiler::codegen::Jit::new() {
        Ok(j) => j.warnings().to_vec(),
        Err(e) => vec![format!("the JIT cannot start: {e}")],
    }
}

pub(crate) fn backend_error(message: String) -> RunError {
    RunError::Backend { message }
}

/// The data must fit the model (checked here for folders, whose image size is
/// only known once read).
pub(crate) fn check_data(model: &CheckedModel, d: &Dataset) -> Result<(), RunError> {
    let shape: Vec<u64> = d.shape.iter().map(|&x| x as u64).collect();
    if shape != model.input {
        return Err(RunError::DataShape {
            data: d.shape,
            model: model.input.clone(),
        });
    }
    let classes = model.shape(model.output())[0];
    if d.classes as u64 > classes {
        return Err(RunError::Classes {
            data: d.classes,
            model: classes,
        });
    }
    Ok(())
}

/// Picks the run folder: `out` (which must be empty unless `overwrite`), or
/// `runs/<file stem><suffix>`, then `…-2`, … the first that does not exist; and
/// makes it.
pub(crate) fn run_folder(
    file: &Path,
    out: Option<&Path>,
    overwrite: bool,
    suffix: &str,
) -> Result<PathBuf, RunError> {
    let non_empty = |p: &Path| {
        std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    let dir = match out {
        Some(d) => {
            if non_empty(d) && !overwrite {
                return Err(RunError::OutExists(d.to_path_buf()));
            }
            d.to_path_buf()
        }
        None => {
            let stem = file
                .file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned());
            let stem = format!("{stem}{suffix}");
            let mut dir = PathBuf::from("runs").join(&stem);
            let mut k = 2;
            while dir.exists() {
                dir = PathBuf::from("runs").join(format!("{stem}-{k}"));
                k += 1;
            }
            dir
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| RunError::Write {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    Ok(dir)
}

/// Trains the model of `file` as its `train` section says.
pub fn run(
    file: &Path,
    model: &CheckedModel,
    train: Option<&TrainConfig>,
    opts: &RunOptions,
) -> Result<RunSummary, RunError> {
    let cfg = train.ok_or(RunError::NoTrain)?;
    let Loss::CrossEntropy { smoothing } = cfg.loss;
    let n = usize::try_from(cfg.batch).unwrap_or(usize::MAX);
    let available = crate::memory::available_bytes();
    if let Some(why) = crate::memory::too_big(model, cfg, cfg.batch, available) {
        return Err(RunError::OutOfMemory(why));
    }
    check_jit_limits(opts.engine, n, || train_graph(model, n, smoothing))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let splits = data::load(&cfg.data, base)?;
    check_data(model, &splits.train)?;
    check_data(model, &splits.test)?;
    let specs = param_specs(model);
    let identity = RunIdentity::new(model, cfg)
        .map_err(|e| backend_error(format!("cannot serialise the checked model: {e}")))?;
    let mut opt = Optimizer::new(&cfg.optimizer, &specs);
    let epochs = opts.epochs.unwrap_or(cfg.epochs);
    let train_images = splits.train.len() as u64;
    // Resuming reads and checks everything before the first write.
    let resumed = if opts.resume {
        Some(resume_point(
            file,
            opts.out.as_deref(),
            &specs,
            &identity,
            &mut opt,
            epochs,
            train_images,
        )?)
    } else {
        None
    };
    let (out, mut params, start) = match resumed {
        Some((out, r)) => (out, r.params, Some((r.stem, r.state, r.skipped))),
        None => {
            let params = match &opts.init {
                Some(path) => checkpoint::load_weights(path, &specs)?,
                None => Params::init(&specs, cfg.seed)?,
            };
            let out = run_folder(file, opts.out.as_deref(), opts.overwrite, "")?;
            checkpoint::clear(&out.join("checkpoints"))?;
            (out, params, None)
        }
    };
    let ckpt_dir = out.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).map_err(|e| RunError::Write {
        path: ckpt_dir.clone(),
        reason: e.to_string(),
    })?;
    let mut engine = backend(opts.engine, model, Some(cfg));
    let schedule = Schedule::new(&cfg.schedule);
    let train_loader = Loader::from_config(&splits.train, cfg)?;
    let test_loader = Loader::from_config(&splits.test, cfg)?;
    let steps_per_epoch = train_loader.num_batches() as u64;
    let plan = StepPlan::new(&params, &cfg.clip);
    let metrics_path = out.join("metrics.jsonl");
    if let Some((_, _, skipped)) = &start {
        // The saves passed over and temporary files go; so do checkpoints a
        // killed run had no time to prune.
        checkpoint::discard(&ckpt_dir, skipped)?;
        if let Some(ck) = &cfg.checkpoint {
            checkpoint::prune(&ckpt_dir, ck.keep as usize)?;
        }
    }
    let mut metrics = open_metrics(&metrics_path, start.as_ref().map(|s| s.1.epoch))?;
    println!(
        "training `{}` on {} images ({} test), {} epochs of {} steps, {}; run folder {}",
        model.name,
        splits.train.len(),
        splits.test.len(),
        epochs,
        steps_per_epoch,
        match opts.engine.kind {
            BackendKind::Interp => "interpreter backend".to_string(),
            BackendKind::Jit => format!(
                "jit backend, {} thread{}",
                opts.engine.threads,
                if opts.engine.threads == 1 { "" } else { "s" }
            ),
        },
        out.display()
    );
    if opts.engine.kind == BackendKind::Jit {
        for w in jit_warnings() {
            eprintln!("warning: {w}");
        }
    }
    // Gradient health and the non-finite policy (health.rs, nonfinite.rs).
    let reporter = crate::health::Reporter::new(file, model);
    let mut health = crate::health::Health::new(model, &params, steps_per_epoch);
    let mut guard = crate::nonfinite::Guard::new(&cfg.on_nonfinite, model, smoothing, &reporter);
    let (first_epoch, mut step, mut last_lr) = match &start {
        Some((stem, state, skipped)) => {
            report_resume(&ckpt_dir, stem, state, skipped, epochs, cfg);
            guard.resume_from(state.nonfinite_skipped);
            (state.epoch, state.step, state.lr)
        }
        None => (0, 0, 0.0),
    };
    let mut clip_stats = ClipStats::default();
    let mut last = if first_epoch >= epochs {
        // Nothing left to train: the figures of the checkpoint's weights.
        evaluate(engine.as_mut(), &params, &test_loader, None)?
    } else {
        (0.0, 0.0)
    };
    for epoch in first_epoch..epochs {
        let t0 = Instant::now();
        let bar = ProgressBar::new(splits.train.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{epochs}", epoch + 1));
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = 0.0;
        for batch in train_loader.train_epoch(epoch) {
            lr = schedule.lr_at(opt.base_lr(), step, steps_per_epoch, epochs);
            let seed = (cfg.seed.wrapping_mul(1_000_003).wrapping_add(step) % (1 << 24)) as u32;
            let s = train_step(
                engine.as_mut(),
                &mut params,
                &mut opt,
                &plan,
                &batch,
                seed,
                lr,
            )?;
            // Non-finite hook: abort, or skip (nothing was updated).
            if !s.applied {
                step += 1;
                let trip = crate::nonfinite::Trip {
                    batch: &batch,
                    seed,
                    step,
                    epoch: epoch + 1,
                    loss: s.loss,
                    norm: f64::from(s.clip.norm),
                };
                bar.suspend(|| guard.tripped(&trip, &params))?;
                continue;
            }
            health.record(step + 1, &s.grad_sq, &params);
            clip_stats.record(&s.clip);
            loss_sum += s.loss as f64 * batch.n as f64;
            correct += s.correct;
            seen += batch.n;
            step += 1;
            bar.set_position(seen as u64);
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4} acc {:.1}% {:.0} img/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / secs
            ));
        }
        bar.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = evaluate(engine.as_mut(), &params, &test_loader, None)?;
        let clipped = clip_stats.take();
        // Gradient health hook: the table, the warnings, the `health` field.
        let (epoch_health, health_table, findings) =
            health.end_epoch(step, &params, &clipped, &cfg.clip);
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_accuracy: test_acc,
            images_per_sec: seen as f64 / train_secs.max(1e-9),
            seconds: t0.elapsed().as_secs_f64(),
            lr,
            clip_fired: clipped.fired_fraction(),
            grad_norm_mean: clipped.mean_norm(),
            grad_norm_max: clipped.max_norm,
            nonfinite_skipped: guard.take_epoch_skipped(),
            health: epoch_health,
        };
        println!(
            "epoch {:>3}/{epochs}  train loss {:.4} acc {:5.1}%  test loss {:.4} acc {:5.1}%  {:>6.0} img/s  {:5.1} s  lr {:.4}  clipped {:.0}%",
            m.epoch,
            m.train_loss,
            100.0 * m.train_accuracy,
            m.test_loss,
            100.0 * m.test_accuracy,
            m.images_per_sec,
            m.seconds,
            m.lr,
            100.0 * m.clip_fired
        );
        print!("{health_table}");
        crate::health::warn(&reporter, &findings);
        let line = serde_json::to_string(&m).map_err(|e| RunError::Write {
            path: metrics_path.clone(),
            reason: e.to_string(),
        })?;
        writeln!(metrics, "{line}").map_err(|e| RunError::Write {
            path: metrics_path.clone(),
            reason: e.to_string(),
        })?;
        last_lr = lr;
        if let Some(ck) = &cfg.checkpoint {
            if (epoch + 1) % ck.every == 0 {
                let at = TrainState {
                    step,
                    epoch: epoch + 1,
                    epochs,
                    lr,
                    train_images,
                    nonfinite_skipped: guard.skipped(),
                };
                let stem = format!("epoch-{:04}", epoch + 1);
                save(&ckpt_dir, &stem, &identity, &params, &opt, &at, &metrics)?;
                checkpoint::prune(&ckpt_dir, ck.keep as usize)?;
            }
        }
        last = (test_loss, test_acc);
    }
    let at = TrainState {
        step,
        epoch: epochs,
        epochs,
        lr: last_lr,
        train_images,
        nonfinite_skipped: guard.skipped(),
    };
    save(&ckpt_dir, "final", &identity, &params, &opt, &at, &metrics)?;
    if !opts.explain.is_empty() {
        let summary = crate::explain::run(&crate::explain::Request {
            model,
            train: Some(cfg),
            directives: &opts.explain,
            splits: &splits,
            params: &params,
            engine: opts.engine,
            dir: &out.join("explain"),
            weights: "checkpoints/final.safetensors (this run)".into(),
            evaluate: true,
        })?;
        crate::explain::report(&summary);
    }
    Ok(RunSummary {
        out,
        test_loss: last.0,
        test_accuracy: last.1,
    })
}

/// Saves checkpoint `stem`, after flushing `metrics.jsonl` to disk so that a
/// complete checkpoint never gets ahead of the metrics lines it needs.
fn save(
    dir: &Path,
    stem: &str,
    id: &RunIdentity,
    params: &Params,
    opt: &Optimizer,
    at: &TrainState,
    metrics: &std::fs::File,
) -> Result<(), RunError> {
    metrics.sync_data().map_err(|e| RunError::Write {
        path: dir.with_file_name("metrics.jsonl"),
        reason: e.to_string(),
    })?;
    checkpoint::save_checkpoint(dir, stem, id, params, opt, at)?;
    Ok(())
}

/// For `--resume`: the run folder (`out`, or `runs/<file stem>`) and its newest
/// complete checkpoint, loaded and checked against the model, its `train` section,
/// the data and the epochs asked for. Writes nothing.
fn resume_point(
    file: &Path,
    out: Option<&Path>,
    specs: &[cnnc_compiler::params::ParamSpec],
    id: &RunIdentity,
    opt: &mut Optimizer,
    epochs: u64,
    train_images: u64,
) -> Result<(PathBuf, checkpoint::Resumed), RunError> {
    let dir = match out {
        Some(d) => d.to_path_buf(),
        None => {
            let stem = file
                .file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned());
            let dir = PathBuf::from("runs").join(&stem);
            if dir.is_dir() && PathBuf::from("runs").join(format!("{stem}-2")).exists() {
                println!(
                    "note: resuming `{}`; later runs of this file are in `{}-2`, …: name one \
                     with --out to resume it instead",
                    dir.display(),
                    dir.display()
                );
            }
            dir
        }
    };
    if !dir.is_dir() {
        return Err(RunError::NoRunFolder(dir));
    }
    let ckpt_dir = dir.join("checkpoints");
    let r = checkpoint::resume(&ckpt_dir, specs, id, opt)?;
    let path = ckpt_dir.join(&r.stem);
    if r.state.epoch > epochs {
        return Err(RunError::ResumePast {
            path,
            epoch: r.state.epoch,
            epochs,
        });
    }
    if r.state.train_images != train_images {
        return Err(RunError::DataChanged {
            path,
            saved: r.state.train_images,
            now: train_images,
        });
    }
    Ok((dir, r))
}

/// Says which checkpoint a resumed run starts from, and which newer saves it
/// passed over.
fn report_resume(
    dir: &Path,
    stem: &str,
    state: &TrainState,
    skipped: &[checkpoint::Skipped],
    epochs: u64,
    cfg: &TrainConfig,
) {
    for s in skipped {
        println!(
            "skipping `{}`: {} (removed)",
            dir.join(&s.stem).display(),
            s.reason
        );
    }
    println!(
        "resuming from `{}`: epoch {} of {epochs} done, step {}",
        dir.join(stem).display(),
        state.epoch,
        state.step
    );
    if state.epochs != epochs
        && matches!(
            cfg.schedule,
            cnnc_compiler::checked::Schedule::Cosine { .. }
        )
    {
        println!(
            "note: the run was planned for {} epochs and now for {epochs}: the cosine \
             schedule is stretched to the new length, so the result differs from an \
             uninterrupted run of {epochs} epochs",
            state.epochs
        );
    }
    if state.epoch >= epochs {
        println!("nothing left to train: writing the final checkpoint");
    }
}

/// Opens `metrics.jsonl` for the epochs to come: a new file; or, resuming after
/// epoch `done`, the file with exactly its lines of epochs `1..=done` (rewritten
/// atomically: lines of later epochs and a line cut short by the interruption go),
/// opened for appending.
fn open_metrics(path: &Path, done: Option<u64>) -> Result<std::fs::File, RunError> {
    let fail = |e: std::io::Error| RunError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let Some(done) = done else {
        return std::fs::File::create(path).map_err(fail);
    };
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail(e)),
    };
    let mut kept = String::new();
    let mut seen = Vec::new();
    for line in old.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let epoch = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("epoch")?.as_u64());
        if let Some(e) = epoch.filter(|e| (1..=done).contains(e) && !seen.contains(e)) {
            kept.push_str(line);
            seen.push(e);
        }
    }
    let missing: Vec<String> = (1..=done)
        .filter(|e| !seen.contains(e))
        .map(|e| e.to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: `{}` has no line for epoch {}; the resumed run's lines follow from \
             epoch {}",
            path.display(),
            missing.join(", "),
            done + 1
        );
    }
    checkpoint::write_atomic(path, kept.as_bytes()).map_err(fail)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(fail)
}

/// Mean loss and accuracy over a data set, in inference mode.
fn evaluate(
    engine: &mut dyn Backend,
    params: &Params,
    loader: &Loader<'_>,
    mut scores: Option<&mut Vec<f32>>,
) -> Result<(f64, f64), RunError> {
    let (mut loss, mut correct, mut n) = (0.0f64, 0usize, 0usize);
    for b in loader.eval() {
        let e = engine
            .eval(params, &b.x, &b.labels, b.n)
            .map_err(backend_error)?;
        if let Some(s) = scores.as_deref_mut() {
            s.extend_from_slice(&e.logits);
        }
        loss += e.loss as f64 * b.n as f64;
        correct += e.correct;
        n += b.n;
    }
    Ok((loss / n.max(1) as f64, correct as f64 / n.max(1) as f64))
}

/// `cnnc eval`: loss and accuracy of saved weights on the file's test data, or on
/// `data` (`mnist:PATH`, `folder:PATH`). With `logits`, also writes the scores of
/// every image in data order to that `.npy` file and the labels beside it (see
/// [`labels_path`]).
#[allow(clippy::too_many_arguments)]
pub fn eval(
    file: &Path,
    model: &CheckedModel,
    train: Option<&TrainConfig>,
    weights: &Path,
    data: Option<&str>,
    engine: Engine,
    logits: Option<&Path>,
) -> Result<(f64, f64, usize), RunError> {
    use cnnc_compiler::checked::DataSource;
    let specs = param_specs(model);
    let params = checkpoint::load_weights(weights, &specs)?;
    let (source, base) = match data {
        Some(spec) => {
            let (kind, path) = spec
                .split_once(':')
                .ok_or_else(|| RunError::DataSpec(spec.into()))?;
            let source = match kind {
                "mnist" => DataSource::Mnist { path: path.into() },
                "folder" => DataSource::Folder {
                    train: path.into(),
                    test: Some(path.into()),
                    split: 0.0,
                },
                _ => return Err(RunError::DataSpec(spec.into())),
            };
            (source, PathBuf::from("."))
        }
        None => (
            train.ok_or(RunError::NoTrain)?.data.clone(),
            file.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
    };
    let splits = data::load(&source, &base)?;
    check_data(model, &splits.test)?;
    let (batch, augment, seed) = match train {
        Some(t) => (t.batch as usize, t.augment.clone(), t.seed),
        None => (64, Vec::new(), 0),
    };
    let loader = Loader::new(&splits.test, batch, &augment, seed)?;
    check_jit_limits(engine, batch, || eval_graph(model, batch))?;
    let mut engine = backend(engine, model, train);
    let Some(out) = logits else {
        let (loss, acc) = evaluate(engine.as_mut(), &params, &loader, None)?;
        return Ok((loss, acc, splits.test.len()));
    };
    let classes = model.shape(model.output())[0] as usize;
    let mut scores = Vec::with_capacity(splits.test.len() * classes);
    let (loss, acc) = evaluate(engine.as_mut(), &params, &loader, Some(&mut scores))?;
    let scores = ndarray::Array2::from_shape_vec((splits.test.len(), classes), scores)
        .map_err(|e| backend_error(format!("logits do not fill [images, {classes}]: {e}")))?;
    let labels = ndarray::Array1::from_iter(splits.test.labels.iter().map(|&l| i64::from(l)));
    write_npy(out, &scores)?;
    write_npy(&labels_path(out), &labels)?;
    Ok((loss, acc, splits.test.len()))
}

/// Where `cnnc eval --logits OUT` puts the labels: `OUT` with its `.npy` ending
/// (if any) replaced by `.labels.npy` (`x.npy` → `x.labels.npy`).
pub fn labels_path(logits: &Path) -> PathBuf {
    let name = logits
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let stem = name.strip_suffix(".npy").unwrap_or(&name);
    logits.with_file_name(format!("{stem}.labels.npy"))
}

/// Writes an array as a NumPy `.npy` file (format v1, little-endian), atomically:
/// a temporary file in the same folder renamed over `path`, so a failed write
/// leaves no half-written file.
pub fn write_npy<A, D>(path: &Path, array: &ndarray::ArrayRef<A, D>) -> Result<(), RunError>
where
    A: ndarray_npy::WritableElement,
    D: ndarray::Dimension,
{
    use ndarray_npy::WriteNpyExt;
    let fail = |reason: String| RunError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    array
        .write_npy(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    checkpoint::write_atomic(path, &bytes).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_go_beside_the_logits() {
        assert_eq!(
            labels_path(Path::new("/tmp/x.npy")),
            PathBuf::from("/tmp/x.labels.npy")
        );
        assert_eq!(
            labels_path(Path::new("out/scores")),
            PathBuf::from("out/scores.labels.npy")
        );
    }

    #[test]
    fn npy_files_are_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let a = ndarray::Array2::from_shape_vec((2, 3), vec![1.0f32, 2., 3., 4., 5., 6.]).unwrap();
        write_npy(&path, &a).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header = String::from_utf8_lossy(&bytes[10..]);
        assert!(header.contains("'descr': '<f4'"), "{header}");
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(&bytes[bytes.len() - 4..], &6.0f32.to_le_bytes());
        // The rename fails (a non-empty folder is in the way): an error, and no
        // temporary file left behind.
        let blocked = dir.path().join("b.npy");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"x").unwrap();
        assert!(matches!(
            write_npy(&blocked, &a),
            Err(RunError::Write { .. })
        ));
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.npy", "b.npy"]);
    }
}
