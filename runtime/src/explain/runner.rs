//! Runs the explain graphs (input gradient, feature map, feature-map gradient) on
//! the chosen engine: each graph built and compiled once per (kind, batch size)
//! and reused for every batch, on the JIT or on the reference interpreter.

use crate::params::Params;
use crate::train::{BackendKind, Engine};
use cnnc_compiler::checked::{CheckedModel, ValueId};
use cnnc_compiler::codegen::exec::{ExecOptions, Executable, ThreadPool};
use cnnc_compiler::interp::{self, Tensor};
use cnnc_compiler::ir::lower::{eval_graph, feature_grad_graph, features_graph, input_grad_graph};
use cnnc_compiler::ir::{Graph, Role, Vid};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;

/// Which explain graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GraphKind {
    /// Outputs `logits` (and `loss`, `correct`); feeds `x`, `labels`.
    Logits,
    /// Outputs `logits`, `grad:x`; feeds `x`, `class`.
    InputGrad,
    /// Outputs `logits`, `features`; feeds `x`.
    Features(ValueId),
    /// Outputs `logits`, `features`, `grad:features`; feeds `x`, `class`.
    FeatureGrad(ValueId),
}

impl GraphKind {
    fn build(self, m: &CheckedModel, batch: usize) -> Graph {
        match self {
            GraphKind::Logits => eval_graph(m, batch),
            GraphKind::InputGrad => input_grad_graph(m, batch),
            GraphKind::Features(t) => features_graph(m, batch, t),
            GraphKind::FeatureGrad(t) => feature_grad_graph(m, batch, t),
        }
    }
}

enum Compiled {
    Interp(Graph),
    Jit(Box<Executable>),
}

/// The outputs of one run, by name.
pub struct Outputs(HashMap<String, Vec<f32>>);

impl Outputs {
    /// A named output; zeros of `len` when the graph has no such output (a
    /// gradient that is identically zero is not computed).
    pub fn get_or_zeros(&self, name: &str, len: usize) -> Vec<f32> {
        self.0.get(name).cloned().unwrap_or_else(|| vec![0.0; len])
    }

    pub fn get(&self, name: &str) -> Result<&[f32], String> {
        self.0
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("the explain graph has no output `{name}`"))
    }
}

/// Compiled explain graphs of one model.
pub struct Runner {
    model: CheckedModel,
    engine: Engine,
    pool: Option<ThreadPool>,
    compiled: HashMap<(GraphKind, usize), Compiled>,
}

impl Runner {
    pub fn new(model: &CheckedModel, engine: Engine) -> Runner {
        Runner {
            model: model.clone(),
            engine,
            pool: None,
            compiled: HashMap::new(),
        }
    }

    pub fn model(&self) -> &CheckedModel {
        &self.model
    }

    fn compiled(&mut self, kind: GraphKind, batch: usize) -> Result<&mut Compiled, String> {
        if !self.compiled.contains_key(&(kind, batch)) {
            let g = kind.build(&self.model, batch);
            let c = match self.engine.kind {
                BackendKind::Interp => Compiled::Interp(g),
                BackendKind::Jit => {
                    if self.pool.is_none() {
                        self.pool = Some(ThreadPool::new(self.engine.effective_threads())?);
                    }
                    let pool = self.pool.as_ref().expect("started");
                    let opts = ExecOptions {
                        checked: self.engine.checked,
                        ..ExecOptions::default()
                    };
                    Compiled::Jit(Box::new(Executable::with_options(&g, pool, &opts)?))
                }
            };
            self.compiled.insert((kind, batch), c);
        }
        Ok(self.compiled.get_mut(&(kind, batch)).expect("inserted"))
    }

    /// Runs graph `kind` on `batch` images `x` with the given inputs (`class`,
    /// `labels`) and the parameters; returns every named output.
    pub fn run(
        &mut self,
        kind: GraphKind,
        batch: usize,
        params: &Params,
        x: &[f32],
        inputs: &[(&str, &[f32])],
    ) -> Result<Outputs, String> {
        let input = |name: &str| -> Option<&[f32]> {
            if name == "x" {
                return Some(x);
            }
            inputs.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
        };
        let param = |name: &str| -> Result<&[f32], String> {
            params
                .get(name)
                .and_then(|t| t.as_f32())
                .ok_or_else(|| format!("no parameter `{name}`"))
        };
        match self.compiled(kind, batch)? {
            Compiled::Interp(g) => {
                let mut feeds: Vec<(Vid, Tensor<f32>)> = Vec::new();
                for (i, v) in g.values.iter().enumerate() {
                    let data = match v.role {
                        Role::Temp => continue,
                        Role::Input => input(&v.name)
                            .ok_or_else(|| format!("no data for graph input `{}`", v.name))?,
                        _ => param(&v.name)?,
                    };
                    let t = ArrayD::from_shape_vec(IxDyn(&v.shape), data.to_vec())
                        .map_err(|e| format!("{}: {e}", v.name))?;
                    feeds.push((Vid(i), t));
                }
                let vals = interp::run(g, feeds)?;
                let mut out = HashMap::new();
                for (name, _) in &g.outputs {
                    if let Some(t) = vals.output(g, name) {
                        out.insert(name.clone(), t.iter().copied().collect());
                    }
                }
                Ok(Outputs(out))
            }
            Compiled::Jit(exe) => {
                let names: Vec<String> = exe.plan().feeds.iter().map(|(n, _)| n.clone()).collect();
                for name in names {
                    let data = match input(&name) {
                        Some(d) => d,
                        None => {
                            param(&name).map_err(|_| format!("no data for graph input `{name}`"))?
                        }
                    };
                    exe.feed(&name, data)?;
                }
                exe.run();
                let mut out = HashMap::new();
                for (name, _) in &exe.plan().outputs {
                    if let Some(d) = exe.get(name) {
                        out.insert(name.clone(), d.to_vec());
                    }
                }
                Ok(Outputs(out))
            }
        }
    }
}
