//! Backends run the compiled graphs of a model on batches: one training step
//! (loss, correct count, gradients, running-stat updates) and evaluation (loss,
//! correct count, logits). The reference interpreter is one; the Cranelift JIT
//! (the default) is the other, behind the same trait.

use crate::params::Params;
use cnnc_compiler::checked::CheckedModel;
use cnnc_compiler::codegen::exec::{Executable, ThreadPool};
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
fn feeds(
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
        let out = |name: &str| vals.output(g, name);
        let grads = params
            .trainable()
            .iter()
            .map(|&i| {
                let spec = params.spec(i);
                match out(&format!("grad:{}", spec.name)) {
                    Some(t) => t.iter().copied().collect(),
                    None => vec![0.0; spec.shape.iter().product()],
                }
            })
            .collect();
        let mut updates = Vec::new();
        for (name, v) in &g.outputs {
            if let Some(buffer) = name.strip_prefix("update:") {
                let i = params
                    .index_of(buffer)
                    .ok_or_else(|| format!("no buffer `{buffer}`"))?;
                updates.push((i, vals.get(*v).iter().copied().collect()));
            }
        }
        Ok(StepOut {
            loss: out("loss").map_or(f32::NAN, scalar),
            correct: out("correct").map_or(0.0, scalar) as usize,
            grads,
            updates,
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
            let exe = Executable::with_pool(&g, &self.pool()?)?;
            self.train.insert(n, exe);
        }
        Ok(self.train.get_mut(&n).expect("inserted"))
    }

    /// The inference executable for batches of `n`, compiled on first use.
    pub fn eval_executable(&mut self, n: usize) -> Result<&mut Executable, String> {
        if !self.eval.contains_key(&n) {
            let g = eval_graph(&self.model, n);
            let exe = Executable::with_pool(&g, &self.pool()?)?;
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
        exe.run();
        let grads = params
            .trainable()
            .iter()
            .map(|&i| {
                let spec = params.spec(i);
                match exe.get(&format!("grad:{}", spec.name)) {
                    Some(g) => g.to_vec(),
                    None => vec![0.0; spec.shape.iter().product()],
                }
            })
            .collect();
        let mut updates = Vec::new();
        for (name, _) in &exe.plan().outputs {
            if let Some(buffer) = name.strip_prefix("update:") {
                let i = params
                    .index_of(buffer)
                    .ok_or_else(|| format!("no buffer `{buffer}`"))?;
                updates.push((i, exe.get(name).unwrap_or_default().to_vec()));
            }
        }
        Ok(StepOut {
            loss: first(exe, "loss"),
            correct: first(exe, "correct") as usize,
            grads,
            updates,
        })
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
        exe.run();
        Ok(EvalOut {
            loss: first(exe, "loss"),
            correct: first(exe, "correct") as usize,
            logits: exe.get("logits").unwrap_or_default().to_vec(),
        })
    }
}
