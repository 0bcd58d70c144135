//! Non-finite values in training: the cheap check after every step, the
//! `on_nonfinite` policy, and the diagnosis of a step that tripped it (E0701).
//!
//! - The check ([`sums_of_squares`], [`step_is_finite`]): the loss, every
//!   gradient (through its sum of squares in f64, which is finite exactly when
//!   every element is: the square of a finite f32 cannot overflow an f64) and
//!   the new batchnorm running statistics are finite. The sums of squares are
//!   also what gradient health reads (`health.rs`). A step that fails the check
//!   changes nothing: [`crate::train::train_step`] returns before the update.
//! - The policy ([`Guard`]): `abort` stops the run (exit code 1; the checkpoints
//!   written so far stay); `skip(max=N)` counts the step and goes on, and stops
//!   at the (N+1)-th.
//! - The diagnosis ([`diagnose`]): the step is replayed on the reference
//!   interpreter with the same batch, parameters and dropout seed; it keeps
//!   every value of the graph, so the first node in execution order (the forward
//!   nodes, then the backward ones) with a NaN or ±inf in an output is the
//!   culprit. Its layer (nodes carry the layer they implement) gives the span.
//!   A parameter that is itself non-finite is reported before any node.

use crate::backend::feeds;
use crate::data::Batch;
use crate::health::Reporter;
use crate::params::Params;
use crate::train::RunError;
use cnnc_compiler::check::CheckError;
use cnnc_compiler::checked::{CheckedModel, OnNonFinite};
use cnnc_compiler::diag::DiagKind;
use cnnc_compiler::interp;
use cnnc_compiler::ir::lower::{loss_graph, train_graph};
use cnnc_compiler::ir::{Graph, Role, Vid};

/// `Σ x²` of a tensor in f64 (eight independent sums, so it vectorises).
pub fn sum_sq(g: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = g.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = f64::from(x);
            *a += x * x;
        }
    }
    let tail: f64 = rest.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    acc.iter().sum::<f64>() + tail
}

/// The sum of squares of each gradient: finite exactly when the gradient is.
pub fn sums_of_squares(grads: &[Vec<f32>]) -> Vec<f64> {
    grads.iter().map(|g| sum_sq(g)).collect()
}

/// The per-step check: the loss, the gradients (`grad_sq`, from
/// [`sums_of_squares`]) and the new running statistics are finite.
pub fn step_is_finite(loss: f32, grad_sq: &[f64], updates: &[(usize, Vec<f32>)]) -> bool {
    loss.is_finite()
        && grad_sq.iter().all(|s| s.is_finite())
        && updates.iter().all(|(_, v)| v.iter().all(|x| x.is_finite()))
}

/// Where a step went non-finite, found by [`diagnose`].
#[derive(Clone, Debug, PartialEq)]
pub struct Culprit {
    /// The op (`conv2d`, `batchnorm`, …), or `parameter`.
    pub op: String,
    /// The model layer (index into `CheckedModel::layers`), if the node belongs
    /// to one; the loss belongs to none.
    pub layer: Option<usize>,
    /// The node's layer name as the graph has it (`c1`, `loss`), or the
    /// parameter's name.
    pub name: String,
    /// `forward`, `backward` or `a parameter`.
    pub phase: &'static str,
    /// Shape of the non-finite tensor.
    pub shape: Vec<usize>,
    pub nan: usize,
    pub inf: usize,
    /// Each input: what it is, its shape, its smallest and largest value (NaN
    /// ignored) and its non-finite count.
    pub inputs: Vec<InputRange>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InputRange {
    pub what: String,
    pub shape: Vec<usize>,
    pub min: f32,
    pub max: f32,
    pub nonfinite: usize,
}

/// NaN and ±inf counts of a tensor.
fn count(t: &[f32]) -> (usize, usize) {
    t.iter().fold((0, 0), |(n, i), x| {
        (
            n + usize::from(x.is_nan()),
            i + usize::from(x.is_infinite()),
        )
    })
}

fn range(what: String, shape: &[usize], t: &[f32]) -> InputRange {
    let (nan, inf) = count(t);
    InputRange {
        what,
        shape: shape.to_vec(),
        min: t.iter().copied().fold(f32::INFINITY, f32::min),
        max: t.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        nonfinite: nan + inf,
    }
}

/// Replays one training step on the reference interpreter (see the module
/// comment). `Ok(None)`: the replay is finite everywhere (the backend and the
/// interpreter disagree).
pub fn diagnose(
    model: &CheckedModel,
    smoothing: f64,
    params: &Params,
    batch: &Batch,
    seed: u32,
) -> Result<Option<Culprit>, String> {
    let g = train_graph(model, batch.n, smoothing);
    let forward_nodes = loss_graph(model, batch.n, smoothing).nodes.len();
    let fed = feeds(&g, params, &batch.x, &batch.labels, seed)?;
    let layer_of = |name: &str| model.layers.iter().position(|l| l.name == name);
    // A parameter or buffer that is already non-finite.
    for (v, t) in &fed {
        let value = &g.values[v.0];
        if value.role == Role::Input {
            continue;
        }
        let data: Vec<f32> = t.iter().copied().collect();
        let (nan, inf) = count(&data);
        if nan + inf > 0 {
            let owner = params.index_of(&value.name).map(|i| params.spec(i).layer);
            return Ok(Some(Culprit {
                op: "parameter".into(),
                layer: owner,
                name: value.name.clone(),
                phase: "a parameter",
                shape: value.shape.clone(),
                nan,
                inf,
                inputs: Vec::new(),
            }));
        }
    }
    let vals = interp::run(&g, fed)?;
    for (k, node) in g.nodes.iter().enumerate() {
        for &o in &node.outputs {
            let Some(t) = vals.values[o.0].as_ref() else {
                continue;
            };
            let data: Vec<f32> = t.iter().copied().collect();
            let (nan, inf) = count(&data);
            if nan + inf == 0 {
                continue;
            }
            let name = node.layer.clone().unwrap_or_default();
            let inputs = node
                .inputs
                .iter()
                .map(|&i| {
                    let d: Vec<f32> = vals.get(i).iter().copied().collect();
                    range(describe(&g, i), &g.values[i.0].shape, &d)
                })
                .collect();
            return Ok(Some(Culprit {
                op: node.op.name().to_string(),
                layer: layer_of(&name),
                name,
                phase: if k < forward_nodes {
                    "forward"
                } else {
                    "backward"
                },
                shape: g.values[o.0].shape.clone(),
                nan,
                inf,
                inputs,
            }));
        }
    }
    Ok(None)
}

/// A graph value for a person: its name for inputs and parameters, else the op
/// and layer that computed it (`conv2d of c1`).
fn describe(g: &Graph, v: Vid) -> String {
    let value = &g.values[v.0];
    if value.role != Role::Temp {
        return format!("`{}`", value.name);
    }
    g.nodes.iter().find(|n| n.outputs.contains(&v)).map_or_else(
        || value.name.clone(),
        |n| match &n.layer {
            Some(l) => format!("{} of `{l}`", n.op.name()),
            None => n.op.name().to_string(),
        },
    )
}

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// What is known about a step that tripped the check.
pub struct Trip<'b> {
    pub batch: &'b Batch,
    /// The dropout seed of the step.
    pub seed: u32,
    /// 1-based, over the run.
    pub step: u64,
    /// 1-based.
    pub epoch: u64,
    pub loss: f32,
    /// Global gradient norm (NaN or inf when a gradient is not finite).
    pub norm: f64,
}

/// The `on_nonfinite` policy of a run.
pub struct Guard<'a> {
    policy: OnNonFinite,
    model: &'a CheckedModel,
    smoothing: f64,
    reporter: &'a Reporter<'a>,
    /// Skipped steps over the run, and in the current epoch.
    skipped: u64,
    epoch_skipped: u64,
}

impl<'a> Guard<'a> {
    pub fn new(
        policy: &OnNonFinite,
        model: &'a CheckedModel,
        smoothing: f64,
        reporter: &'a Reporter<'a>,
    ) -> Guard<'a> {
        Guard {
            policy: policy.clone(),
            model,
            smoothing,
            reporter,
            skipped: 0,
            epoch_skipped: 0,
        }
    }

    /// Steps skipped over the run so far (saved in checkpoints).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Continues a resumed run's budget: `skipped` steps were already skipped.
    pub fn resume_from(&mut self, skipped: u64) {
        self.skipped = skipped;
    }

    /// Skipped steps since the last call (for an epoch's line of `metrics.jsonl`).
    pub fn take_epoch_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.epoch_skipped)
    }

    /// A step failed the check (its update was not applied): with `skip` and
    /// room left, count it and go on (`Ok`); otherwise print the diagnosis and
    /// stop the run. The first skipped step is diagnosed too.
    pub fn tripped(&mut self, trip: &Trip<'_>, params: &Params) -> Result<(), RunError> {
        let max = match self.policy {
            OnNonFinite::Abort => None,
            OnNonFinite::Skip { max } => Some(max),
        };
        if let Some(max) = max {
            if self.skipped < max {
                self.skipped += 1;
                self.epoch_skipped += 1;
                eprintln!(
                    "warning: step {} (epoch {}): loss {} and gradient norm {}: update skipped ({} of at most {max}, `on_nonfinite = skip(max={max})`)",
                    trip.step, trip.epoch, trip.loss, trip.norm, self.skipped
                );
                if self.skipped == 1 {
                    self.report(trip, params);
                }
                return Ok(());
            }
        }
        self.report(trip, params);
        let why = match max {
            None => "`on_nonfinite = abort`".to_string(),
            Some(max) => {
                format!("more than {max} steps skipped (`on_nonfinite = skip(max={max})`)")
            }
        };
        Err(RunError::NonFinite(format!(
            "training stopped at step {} (epoch {}): the loss or the gradients are not finite, and {why}; the checkpoints written so far are kept",
            trip.step, trip.epoch
        )))
    }

    /// Prints the diagnosis of a tripped step on stderr.
    fn report(&self, trip: &Trip<'_>, params: &Params) {
        match diagnose(self.model, self.smoothing, params, trip.batch, trip.seed) {
            Ok(Some(c)) => {
                let d = self.reporter.diag(c.layer, DiagKind::Check(self.error(trip, &c)));
                eprint!("{}", self.reporter.render(&[d]));
            }
            Ok(None) => eprintln!(
                "note: replayed on the reference interpreter, step {} is finite everywhere: the backend computed the non-finite value (try `--backend interp`)",
                trip.step
            ),
            Err(e) => eprintln!("note: the step could not be replayed for a diagnosis: {e}"),
        }
    }

    fn error(&self, trip: &Trip<'_>, c: &Culprit) -> CheckError {
        let what = match (c.nan > 0, c.inf > 0) {
            (true, true) => "NaN and inf",
            (true, false) => "NaN",
            _ => "inf",
        };
        let label = format!(
            "{} of {} values of this {} {} are not finite",
            c.nan + c.inf,
            c.shape.iter().product::<usize>(),
            if c.phase == "a parameter" {
                "parameter"
            } else {
                "layer's output"
            },
            fmt_shape(&c.shape)
        );
        let mut help: Vec<String> = Vec::new();
        if c.layer.is_none() && c.phase != "a parameter" {
            help.push(format!("in `{}`, after the model's last layer", c.name));
        }
        for i in &c.inputs {
            help.push(format!(
                "input {} {}: min {:e}, max {:e}{}",
                i.what,
                fmt_shape(&i.shape),
                i.min,
                i.max,
                if i.nonfinite > 0 {
                    format!(", {} not finite", i.nonfinite)
                } else {
                    String::new()
                }
            ));
        }
        help.push(format!(
            "the step's loss is {}, its gradient norm {}",
            trip.loss, trip.norm
        ));
        help.push(hint(c).to_string());
        let layer = match c.layer {
            Some(i) => self.reporter.layer_name(i),
            None => c.name.clone(),
        };
        CheckError::NonFinite {
            step: trip.step,
            epoch: trip.epoch,
            op: if c.phase == "a parameter" {
                c.name.clone()
            } else {
                c.op.clone()
            },
            layer,
            what: what.into(),
            phase: c.phase.into(),
            span: c.layer.map_or((0, 0).into(), |i| self.reporter.span_of(i)),
            label,
            help: Some(help.join("\n")),
        }
    }
}

/// What usually makes this op non-finite.
fn hint(c: &Culprit) -> &'static str {
    match c.op.as_str() {
        "parameter" => "the previous update made this parameter non-finite: lower `lr` or add `clip = norm(1.0)`",
        "batchnorm" | "batchnorm_grad" | "groupnorm" | "groupnorm_grad" => {
            "a channel with zero variance divides by sqrt(var + eps): raise `eps` (it must stay above ~1e-38 in f32), or give the layer a varying input"
        }
        "conv2d" | "matmul" | "conv2d_grad_input" | "conv2d_grad_weight" | "bias_add" | "add" => {
            "the values overflowed f32 (|x| > 3.4e38): the weights or the inputs are far too large; lower `lr`, add `clip = norm(1.0)`, check `weights=` literals"
        }
        _ => "lower `lr`, add `clip = norm(1.0)`, or normalise the input of this layer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_of_squares_is_exact_and_finite_iff_the_tensor_is() {
        let g: Vec<f32> = (0..21).map(|i| i as f32).collect();
        assert_eq!(sum_sq(&g), (0..21).map(|i| (i * i) as f64).sum::<f64>());
        assert_eq!(sum_sq(&[]), 0.0);
        // The largest f32s square to ~1e77: still finite in f64.
        assert!(sum_sq(&[f32::MAX; 100]).is_finite());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 7, 8, 20] {
                let mut g = g.clone();
                g[at] = bad;
                assert!(!sum_sq(&g).is_finite(), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn the_step_check_looks_at_loss_gradients_and_running_stats() {
        assert!(step_is_finite(1.0, &[1.0, 2.0], &[(0, vec![1.0])]));
        assert!(!step_is_finite(f32::NAN, &[1.0], &[]));
        assert!(!step_is_finite(1.0, &[1.0, f64::INFINITY], &[]));
        assert!(!step_is_finite(1.0, &[1.0], &[(3, vec![0.0, f32::NAN])]));
    }

    #[test]
    fn ranges_ignore_nan_and_count_it() {
        let r = range("x".into(), &[3], &[1.0, f32::NAN, -2.0]);
        assert_eq!((r.min, r.max, r.nonfinite), (-2.0, 1.0, 1));
    }
}
