//! Backends run the compiled graphs of a model on batches: one training step
//! (loss, correct count, gradients, running-stat updates) and evaluation (loss,
//! correct count, logits). The reference interpreter is one; the Cranelift JIT
//! (the default) is the other, behind the same trait. After a step, the
//! optimizer update (clip policy, then the optimizer) is the runtime's Rust code
//! by default; the JIT runs it as generated kernels ([`FusedUpdate`]).

use crate::optim::{clip, clip_action, ClipAction, ClipOutcome, Kind, Optimizer, StepScalars};
use crate::params::Params;
use cnnc_compiler::checked::{CheckedModel, Clip};
use cnnc_compiler::codegen::check::BoundsViolation;
use cnnc_compiler::codegen::exec::{ExecOptions, Executable, ThreadPool};
use cnnc_compiler::codegen::optim::{
    AdamScalars, GradClip, OptimKernel, SgdScalars, SumSquaresOut,
};
use cnnc_compiler::codegen::{self, KernelId, KernelSpec, OptLevel};
use cnnc_compiler::interp::{self, Tensor};
use cnnc_compiler::ir::lower::{eval_graph, train_graph};
use cnnc_compiler::ir::{Graph, Role, Vid};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;

/// What one training step computed.
pub struct StepOut {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Images whose top class is the label.
    pub correct: usize,
    /// One gradient per trainable parameter, in `Params::trainable()` order
    /// (zeros for a parameter that does not influence the loss).
    pub grads: Vec<Vec<f32>>,
    /// New values of the batchnorm running statistics: (param index, values).
    pub updates: Vec<(usize, Vec<f32>)>,
}

/// What evaluating one batch computed.
pub struct EvalOut {
    pub loss: f32,
    pub correct: usize,
    /// `n × classes` scores.
    pub logits: Vec<f32>,
}

pub trait Backend {
    /// One training step on `n` images (`x` is `n × C × H × W`).
    fn train_step(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
        seed: u32,
    ) -> Result<StepOut, String>;
    /// Inference on `n` images.
    fn eval(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
    ) -> Result<EvalOut, String>;

    /// The update after a training step: the clip `policy` applied to `grads`
    /// (`grads[k]` the gradient of `params.trainable()[k]`, in layer
    /// `layer_of[k]`), then one optimizer step at learning rate `lr`. Returns what
    /// the clip did.
    ///
    /// The default is the reference: [`clip`], then [`Optimizer::step`]. A backend
    /// that overrides it must give the same parameters, optimizer state, step
    /// count and [`ClipOutcome`] (the norm to f32 rounding).
    fn update(
        &mut self,
        params: &mut Params,
        opt: &mut Optimizer,
        grads: Vec<Vec<f32>>,
        layer_of: &[usize],
        policy: &Clip,
        lr: f32,
    ) -> Result<ClipOutcome, String> {
        let mut grads = grads;
        let outcome = clip(&mut grads, layer_of, policy);
        opt.step(params, &grads, lr);
        Ok(outcome)
    }
}

/// The reference interpreter (f32), with graphs built per batch size on first use
/// (the last batch of an epoch is usually smaller).
pub struct Interpreter {
    model: CheckedModel,
    smoothing: f64,
    train: HashMap<usize, Graph>,
    eval: HashMap<usize, Graph>,
}

impl Interpreter {
    pub fn new(model: &CheckedModel, smoothing: f64) -> Self {
        Interpreter {
            model: model.clone(),
            smoothing,
            train: HashMap::new(),
            eval: HashMap::new(),
        }
    }
}

/// Feeds for every input, parameter and buffer of `g`.
pub(crate) fn feeds(
    g: &Graph,
    params: &Params,
    x: &[f32],
    labels: &[u32],
    seed: u32,
) -> Result<Vec<(Vid, Tensor<f32>)>, String> {
    let mut out = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        let data: Vec<f32> = match (v.role, v.name.as_str()) {
            (Role::Temp, _) => continue,
            (Role::Input, "x") => x.to_vec(),
            (Role::Input, "labels") => labels.iter().map(|&l| l as f32).collect(),
            (Role::Input, "seed") => vec![seed as f32],
            (Role::Input, other) => return Err(format!("no data for graph input `{other}`")),
            (_, name) => params
                .get(name)
                .and_then(|t| t.as_f32())
                .ok_or_else(|| format!("no parameter `{name}`"))?
                .to_vec(),
        };
        let t = ArrayD::from_shape_vec(IxDyn(&v.shape), data)
            .map_err(|e| format!("{}: {e}", v.name))?;
        out.push((Vid(i), t));
    }
    Ok(out)
}

/// A training step's results from a graph's named outputs (`loss`, `correct`,
/// `grad:<param>`, `update:<buffer>`), wherever the backend keeps them: `get`
/// copies one out. A parameter without a gradient output gets zeros.
fn step_out<'a>(
    params: &Params,
    names: impl Iterator<Item = &'a str>,
    get: impl Fn(&str) -> Option<Vec<f32>>,
) -> Result<StepOut, String> {
    let grads = params
        .trainable()
        .iter()
        .map(|&i| {
            let spec = params.spec(i);
            get(&format!("grad:{}", spec.name))
                .unwrap_or_else(|| vec![0.0; spec.shape.iter().product()])
        })
        .collect();
    let mut updates = Vec::new();
    for name in names {
        if let Some(buffer) = name.strip_prefix("update:") {
            let i = params
                .index_of(buffer)
                .ok_or_else(|| format!("no buffer `{buffer}`"))?;
            updates.push((i, get(name).unwrap_or_default()));
        }
    }
    let first = |name: &str| get(name).and_then(|v| v.first().copied());
    Ok(StepOut {
        loss: first("loss").unwrap_or(f32::NAN),
        correct: first("correct").unwrap_or(0.0) as usize,
        grads,
        updates,
    })
}

fn scalar(t: &Tensor<f32>) -> f32 {
    t.iter().next().copied().unwrap_or(f32::NAN)
}

impl Backend for Interpreter {
    fn train_step(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
        seed: u32,
    ) -> Result<StepOut, String> {
        let g = self
            .train
            .entry(n)
            .or_insert_with(|| train_graph(&self.model, n, self.smoothing));
        let vals = interp::run(g, feeds(g, params, x, labels, seed)?)?;
        let names = g.outputs.iter().map(|(n, _)| n.as_str());
        step_out(params, names, |name| {
            vals.output(g, name).map(|t| t.iter().copied().collect())
        })
    }

    fn eval(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
    ) -> Result<EvalOut, String> {
        let g = self
            .eval
            .entry(n)
            .or_insert_with(|| eval_graph(&self.model, n));
        let vals = interp::run(g, feeds(g, params, x, labels, 0)?)?;
        let out = |name: &str| vals.output(g, name);
        Ok(EvalOut {
            loss: out("loss").map_or(f32::NAN, scalar),
            correct: out("correct").map_or(0.0, scalar) as usize,
            logits: out("logits")
                .map(|t| t.iter().copied().collect())
                .unwrap_or_default(),
        })
    }
}

/// The Cranelift JIT: each graph planned, fused and compiled once per batch size
/// into an [`Executable`] (kernels, arena, threads).
pub struct Jit {
    model: CheckedModel,
    smoothing: f64,
    threads: usize,
    /// Started with the first executable; shared by all of them.
    pool: Option<ThreadPool>,
    train: HashMap<usize, Executable>,
    eval: HashMap<usize, Executable>,
    /// The optimizer kernels, started with the first update (boxed: a JIT
    /// module's builder contexts are large).
    fused: Option<Box<FusedUpdate>>,
    /// Whether the kernels check their loads and stores (`--checked`).
    checked: bool,
}

impl Jit {
    pub fn new(model: &CheckedModel, smoothing: f64, threads: usize) -> Self {
        Jit {
            model: model.clone(),
            smoothing,
            threads: threads.max(1),
            pool: None,
            train: HashMap::new(),
            eval: HashMap::new(),
            fused: None,
            checked: false,
        }
    }

    /// Bounds-checked kernels (`--checked`; on anyway with `CNNC_CHECKED=1`).
    pub fn with_checks(mut self, on: bool) -> Self {
        self.checked = on;
        self
    }

    fn options(&self) -> ExecOptions {
        ExecOptions {
            checked: self.checked,
            ..ExecOptions::default()
        }
    }

    fn pool(&mut self) -> Result<ThreadPool, String> {
        if self.pool.is_none() {
            self.pool = Some(ThreadPool::new(self.threads)?);
        }
        Ok(self.pool.clone().expect("started"))
    }

    /// The training executable for batches of `n`, compiled on first use.
    pub fn train_executable(&mut self, n: usize) -> Result<&mut Executable, String> {
        if !self.train.contains_key(&n) {
            let g = train_graph(&self.model, n, self.smoothing);
            let exe = Executable::with_options(&g, &self.pool()?, &self.options())?;
            self.train.insert(n, exe);
        }
        Ok(self.train.get_mut(&n).expect("inserted"))
    }

    /// The inference executable for batches of `n`, compiled on first use.
    pub fn eval_executable(&mut self, n: usize) -> Result<&mut Executable, String> {
        if !self.eval.contains_key(&n) {
            let g = eval_graph(&self.model, n);
            let exe = Executable::with_options(&g, &self.pool()?, &self.options())?;
            self.eval.insert(n, exe);
        }
        Ok(self.eval.get_mut(&n).expect("inserted"))
    }
}

/// Copies the images, labels, seed and every parameter and buffer the executable
/// reads into its arena; a graph input nobody can feed is an error (never a
/// silent zero).
fn feed_executable(
    exe: &mut Executable,
    params: &Params,
    x: &[f32],
    labels: &[u32],
    seed: u32,
) -> Result<(), String> {
    let names: Vec<String> = exe.plan().feeds.iter().map(|(n, _)| n.clone()).collect();
    for name in names {
        match name.as_str() {
            "x" => exe.feed("x", x)?,
            "labels" => {
                let l: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
                exe.feed("labels", &l)?;
            }
            "seed" => exe.feed("seed", &[seed as f32])?,
            _ => {
                let data = params
                    .get(&name)
                    .and_then(|t| t.as_f32())
                    .ok_or_else(|| format!("no data for graph input `{name}`"))?;
                exe.feed(&name, data)?;
            }
        }
    }
    Ok(())
}

/// A bounds violation of a checked kernel with its layer's place in the model
/// (the statement's byte span, and the block uses it was expanded from).
fn located(model: &CheckedModel, v: &BoundsViolation) -> String {
    let layer = v
        .layer
        .as_deref()
        .and_then(|l| model.layers.iter().find(|x| x.name == l));
    match layer {
        Some(l) => {
            // File 0 is the model's own; imports (the standard library) follow.
            let at = |loc: cnnc_compiler::source::Loc| {
                let file = match loc.file.0 {
                    0 => "the model file".to_string(),
                    n => format!("imported file #{n}"),
                };
                format!("bytes {}..{} of {file}", loc.span.start, loc.span.end)
            };
            let mut s = format!(
                "{v}\n  layer `{}` (`{}`) is made at {}",
                l.name,
                l.op_name,
                at(l.loc)
            );
            for (block, loc) in &l.trace {
                s.push_str(&format!(", in block `{block}` used at {}", at(*loc)));
            }
            s
        }
        None => v.to_string(),
    }
}

fn first(exe: &Executable, name: &str) -> f32 {
    exe.get(name)
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

impl Backend for Jit {
    fn train_step(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
        seed: u32,
    ) -> Result<StepOut, String> {
        let exe = self.train_executable(n)?;
        feed_executable(exe, params, x, labels, seed)?;
        if let Err(v) = exe.try_run() {
            return Err(located(&self.model, &v));
        }
        let exe = &*exe;
        let names = exe.plan().outputs.iter().map(|(n, _)| n.as_str());
        step_out(params, names, |name| exe.get(name).map(<[f32]>::to_vec))
    }

    fn eval(
        &mut self,
        params: &Params,
        x: &[f32],
        labels: &[u32],
        n: usize,
    ) -> Result<EvalOut, String> {
        let exe = self.eval_executable(n)?;
        feed_executable(exe, params, x, labels, 0)?;
        if let Err(v) = exe.try_run() {
            return Err(located(&self.model, &v));
        }
        Ok(EvalOut {
            loss: first(exe, "loss"),
            correct: first(exe, "correct") as usize,
            logits: exe.get("logits").unwrap_or_default().to_vec(),
        })
    }

    fn update(
        &mut self,
        params: &mut Params,
        opt: &mut Optimizer,
        grads: Vec<Vec<f32>>,
        layer_of: &[usize],
        policy: &Clip,
        lr: f32,
    ) -> Result<ClipOutcome, String> {
        if self.fused.is_none() {
            self.fused = Some(Box::new(FusedUpdate::new(self.checked)?));
        }
        let fused = self.fused.as_mut().expect("started");
        fused.update(params, opt, &grads, layer_of, policy, lr)
    }
}

/// The optimizer update as generated kernels, each compiled once per distinct
/// kernel (kind, hyper-parameters, tensor length) into a JIT module of its own:
/// per gradient a sum-of-squares kernel ([`OptimKernel::SumSquares`]: the norm
/// and largest magnitude the clip policy needs); the policy's decision in Rust
/// ([`clip_action`], as [`clip`] decides); then per parameter one pass reading
/// the gradient, applying the clip (scale or clamp) and updating the parameter
/// and its optimizer state ([`OptimKernel::Sgd`], [`OptimKernel::Adam`]).
///
/// Equal to the default [`Backend::update`] bit for bit given the same clip
/// scale: the kernels do the runtime's f32 operations in its order
/// (`compiler/tests/jit_optim.rs`, `runtime/tests/fused_update.rs`). The sums of
/// squares are taken in another order (interleaved lanes), so the norm may
/// differ from the runtime's in the last f64 bits (the reported f32 norm almost
/// never); that reaches the parameters only if it moves `(max / norm) as f32`
/// across an f32 rounding boundary, or `norm` across `max` (odds of the order of
/// 1e-8 per step).
///
/// Measured on this machine (one core, M1's 24k parameters / M3's 68k, SGD with
/// momentum and `norm(1.0)`): 17 µs / 50 µs per update, against 31 µs / 85 µs for
/// the default (whose sequential f64 sum of squares is latency-bound). The
/// kernels run on the calling thread: at these sizes splitting would cost more
/// than it saves. Compiling them adds ~10 ms to the first step (two kernels per
/// distinct tensor length).
struct FusedUpdate {
    jit: codegen::Jit,
    kernels: Vec<(OptimKernel, KernelId)>,
}

impl FusedUpdate {
    fn new(checked: bool) -> Result<FusedUpdate, String> {
        // `none`, as the executables (loops of plain vector arithmetic gain
        // nothing from the egraph pass).
        let mut jit = codegen::Jit::with_opt_level(OptLevel::None)?;
        if checked {
            jit.set_checked(true);
        }
        Ok(FusedUpdate {
            jit,
            kernels: Vec::new(),
        })
    }

    /// The compiled kernel for `k`, compiled on first use.
    fn kernel(&mut self, k: OptimKernel) -> Result<KernelId, String> {
        if let Some((_, id)) = self.kernels.iter().find(|(s, _)| *s == k) {
            return Ok(*id);
        }
        let name = format!("optim{}_{}", self.kernels.len(), k.len());
        let id = self.jit.compile(&name, KernelSpec::Optim(k.clone()))?;
        self.kernels.push((k, id));
        Ok(id)
    }

    /// The update kernel of the optimizer `kind` for a tensor of `len` elements.
    fn update_kernel(&mut self, kind: Kind, len: usize) -> Result<KernelId, String> {
        self.kernel(match kind {
            Kind::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => OptimKernel::Sgd {
                len,
                momentum,
                nesterov,
                weight_decay,
            },
            Kind::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
            } => OptimKernel::Adam {
                len,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
            },
        })
    }

    fn update(
        &mut self,
        params: &mut Params,
        opt: &mut Optimizer,
        grads: &[Vec<f32>],
        layer_of: &[usize],
        policy: &Clip,
        lr: f32,
    ) -> Result<ClipOutcome, String> {
        let n = grads.len();
        if n != params.trainable().len() || n != opt.num_params() {
            return Err(format!(
                "update: {n} gradients for {} trainable parameters ({} in the optimizer)",
                params.trainable().len(),
                opt.num_params()
            ));
        }
        let kind = *opt.kind();
        // Every check and compilation before anything changes.
        let mut ids = Vec::with_capacity(n);
        for (k, g) in grads.iter().enumerate() {
            let i = params.trainable()[k];
            if params.data(i).len() != g.len() {
                return Err(format!(
                    "update: gradient {k} has {} elements, parameter {i} {}",
                    g.len(),
                    params.data(i).len()
                ));
            }
            ids.push(if g.is_empty() {
                None
            } else {
                let sum = self.kernel(OptimKernel::SumSquares { len: g.len() })?;
                Some((sum, self.update_kernel(kind, g.len())?))
            });
        }
        let mut sq = Vec::with_capacity(n);
        let mut max_abs = Vec::with_capacity(n);
        for (g, id) in grads.iter().zip(&ids) {
            let s = match id {
                Some((sum, _)) => {
                    let mut out = [0f32; 3];
                    self.jit.run(*sum, &[g], &mut [&mut out], 0..g.len())?;
                    SumSquaresOut::read(&out)
                }
                None => SumSquaresOut {
                    sum_sq: 0.0,
                    max_abs: 0.0,
                },
            };
            sq.push(s.sum_sq);
            max_abs.push(s.max_abs);
        }
        let (norm, action) = clip_action(&sq, layer_of, policy);
        let fired = match &action {
            ClipAction::Keep => false,
            ClipAction::Scale(_) => true,
            ClipAction::Clamp(v) => max_abs.iter().any(|m| m > v),
        };
        let clip_of = |k: usize| match &action {
            ClipAction::Keep => GradClip::NONE,
            ClipAction::Scale(s) => s[k].map_or(GradClip::NONE, |scale| GradClip {
                scale,
                clamp: f32::INFINITY,
            }),
            ClipAction::Clamp(v) => GradClip {
                scale: 1.0,
                clamp: *v,
            },
        };
        let scalars = opt.begin_step(lr);
        for (k, (g, id)) in grads.iter().zip(&ids).enumerate() {
            let Some((_, id)) = *id else { continue };
            let clip = clip_of(k);
            let i = params.trainable()[k];
            let p = params.data_mut(i);
            let mut outs: Vec<&mut [f32]> =
                std::iter::once(p).chain(opt.state_tensors_mut(k)).collect();
            match scalars {
                StepScalars::Sgd { neg_lr, first } => {
                    let s = SgdScalars {
                        neg_lr,
                        first,
                        clip,
                    };
                    self.jit.run(id, &[g, &s.buffer()], &mut outs, 0..g.len())?;
                }
                StepScalars::Adam(a) => {
                    let s = AdamScalars {
                        decay: a.decay,
                        neg_step: a.neg_step,
                        bc2_sqrt: a.bc2_sqrt,
                        clip,
                    };
                    self.jit.run(id, &[g, &s.buffer()], &mut outs, 0..g.len())?;
                }
            }
        }
        Ok(ClipOutcome {
            fired,
            norm: norm as f32,
        })
    }
}
