//! Backends run the compiled graphs of a model on batches: one training step
//! (loss, correct count, gradients, running-stat updates) and evaluation (loss,
//! correct count, logits). The reference interpreter is one; the Cranelift JIT
//! will be another, behind the same trait.

use crate::params::Params;
use cnnc_compiler::checked::CheckedModel;
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
