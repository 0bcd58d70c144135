//! Optimizers (SGD with momentum/Nesterov/weight decay, Adam, AdamW), learning-rate
//! schedules (constant, step, cosine, each with optional linear warm-up) and gradient
//! clipping policies (global norm, value, per-layer norm) with a count of how often
//! clipping fired.
//!
//! The optimizers follow `torch.optim`'s single-tensor CPU code step for step, in
//! `f32` with the scalar factors (bias corrections, step sizes) computed in `f64` as
//! Python does, so a run's numbers agree with PyTorch's to rounding.
//! `tools/check_torch_optim.py` prints PyTorch's numbers for the cases in the tests.

use crate::params::Params;
use cnnc_compiler::checked;
use cnnc_compiler::params::ParamSpec;
use serde::Serialize;

/// An optimizer's hyper-parameters (the learning rate comes from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// Adam (`decoupled: false`, weight decay as L2 added to the gradient) or AdamW
    /// (`decoupled: true`).
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    },
}

/// An optimizer and its state: one set of state tensors per trainable parameter, in
/// the order of [`Params::trainable`].
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    kind: Kind,
    base_lr: f64,
    /// Steps taken so far (PyTorch's `state['step']` for Adam).
    steps: u64,
    /// `state[k][s]`: state tensor `s` (see [`Optimizer::state_names`]) of trainable
    /// parameter `k`. Zeros before the first step.
    state: Vec<Vec<Vec<f32>>>,
}

impl Optimizer {
    /// The optimizer of a `train` section, with zeroed state for the trainable specs.
    pub fn new(cfg: &checked::Optimizer, specs: &[ParamSpec]) -> Optimizer {
        let (kind, base_lr) = match *cfg {
            checked::Optimizer::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
            } => (
                Kind::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                },
                lr,
            ),
            checked::Optimizer::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            }
            | checked::Optimizer::AdamW {
                lr,
                betas,
                eps,
                weight_decay,
            } => (
                Kind::Adam {
                    beta1: betas[0],
                    beta2: betas[1],
                    eps,
                    weight_decay,
                    decoupled: matches!(cfg, checked::Optimizer::AdamW { .. }),
                },
                lr,
            ),
        };
        Optimizer::with_kind(kind, base_lr, specs)
    }

    pub fn with_kind(kind: Kind, base_lr: f64, specs: &[ParamSpec]) -> Optimizer {
        let slots = state_names(&kind).len();
        let state = specs
            .iter()
            .filter(|s| s.trainable)
            .map(|s| vec![vec![0.0; crate::params::numel(&s.shape)]; slots])
            .collect();
        Optimizer {
            kind,
            base_lr,
            steps: 0,
            state,
        }
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The learning rate of the `train` section (before the schedule).
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// `sgd`, `adam` or `adamw`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sgd { .. } => "sgd",
            Kind::Adam {
                decoupled: false, ..
            } => "adam",
            Kind::Adam {
                decoupled: true, ..
            } => "adamw",
        }
    }

    /// Names of the state tensors kept per parameter, as in PyTorch's optimizer
    /// state: `momentum_buffer` (SGD with momentum), `exp_avg` and `exp_avg_sq`
    /// (Adam, AdamW); none for plain SGD.
    pub fn state_names(&self) -> &'static [&'static str] {
        state_names(&self.kind)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// State tensor `slot` (an index into [`Optimizer::state_names`]) of trainable
    /// parameter `k` (an index into [`Params::trainable`]).
    pub fn state(&self, k: usize, slot: usize) -> &[f32] {
        &self.state[k][slot]
    }

    pub fn state_mut(&mut self, k: usize, slot: usize) -> &mut [f32] {
        &mut self.state[k][slot]
    }

    /// Number of trainable parameters the optimizer keeps state for.
    pub fn num_params(&self) -> usize {
        self.state.len()
    }

    /// One update of every trainable parameter. `grads[k]` is the gradient of
    /// `params.trainable()[k]`, with its element count.
    ///
    /// Panics if the gradients do not match the parameters (a bug in the caller).
    pub fn step(&mut self, params: &mut Params, grads: &[Vec<f32>], lr: f32) {
        assert_eq!(
            grads.len(),
            params.trainable().len(),
            "one gradient per trainable parameter"
        );
        assert_eq!(
            grads.len(),
            self.state.len(),
            "optimizer built for other specs"
        );
        let scalars = self.begin_step(lr);
        for (k, g) in grads.iter().enumerate() {
            let i = params.trainable()[k];
            let p = params.data_mut(i);
            assert_eq!(p.len(), g.len(), "gradient size of parameter {i}");
            match (self.kind, scalars) {
                (
                    Kind::Sgd {
                        momentum,
                        nesterov,
                        weight_decay,
                    },
                    StepScalars::Sgd { neg_lr, first },
                ) => sgd(
                    p,
                    g,
                    self.state[k].first_mut(),
                    first,
                    neg_lr,
                    momentum,
                    nesterov,
                    weight_decay,
                ),
                (
                    Kind::Adam {
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                        decoupled,
                    },
                    StepScalars::Adam(s),
                ) => {
                    let (m, v) = self.state[k].split_at_mut(1);
                    adam(
                        p,
                        g,
                        &mut m[0],
                        &mut v[0],
                        s,
                        [beta1, beta2],
                        eps,
                        weight_decay,
                        decoupled,
                    )
                }
                _ => unreachable!("begin_step gives the scalars of the optimizer's kind"),
            }
        }
    }

    /// Starts one update: counts the step and returns its scalar factors, as
    /// [`Optimizer::step`] does before updating the tensors. For backends that
    /// update the parameters themselves (fused kernels): they call this once per
    /// step, then update every trainable parameter `k` and its state
    /// ([`Optimizer::state_tensors_mut`]) with these scalars.
    pub fn begin_step(&mut self, lr: f32) -> StepScalars {
        let first = self.steps == 0;
        self.steps += 1;
        let lr = f64::from(lr);
        match self.kind {
            Kind::Sgd { .. } => StepScalars::Sgd {
                neg_lr: -lr as f32,
                first,
            },
            Kind::Adam {
                beta1,
                beta2,
                weight_decay,
                ..
            } => StepScalars::Adam(AdamStep::new(self.steps, lr, [beta1, beta2], weight_decay)),
        }
    }

    /// Every state tensor of trainable parameter `k`, in the order of
    /// [`Optimizer::state_names`].
    pub fn state_tensors_mut(&mut self, k: usize) -> impl Iterator<Item = &mut [f32]> {
        self.state[k].iter_mut().map(|t| t.as_mut_slice())
    }
}

/// The scalar factors of one optimizer step, the same for every tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepScalars {
    Sgd {
        /// `−lr`.
        neg_lr: f32,
        /// The first step: the momentum buffer starts as the gradient.
        first: bool,
    },
    Adam(AdamStep),
}

/// Adam's per-step factors, computed in f64 as Python does and cast to f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// `1 − lr · weight_decay` (AdamW's decoupled decay).
    pub decay: f32,
    /// `−lr / (1 − beta1^t)`.
    pub neg_step: f32,
    /// `sqrt(1 − beta2^t)`.
    pub bc2_sqrt: f32,
}

impl AdamStep {
    /// The factors of step `t` (1 on the first step).
    fn new(t: u64, lr: f64, [beta1, beta2]: [f64; 2], weight_decay: f64) -> AdamStep {
        let t = t as f64;
        let step_size = lr / (1.0 - beta1.powf(t));
        AdamStep {
            decay: (1.0 - lr * weight_decay) as f32,
            neg_step: -step_size as f32,
            bc2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
        }
    }
}

fn state_names(kind: &Kind) -> &'static [&'static str] {
    match kind {
        Kind::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
        Kind::Sgd { .. } => &[],
        Kind::Adam { .. } => &["exp_avg", "exp_avg_sq"],
    }
}

/// `torch.optim.SGD` (dampening 0), per element, with `t` the step number:
///
/// ```text
/// g   = grad + weight_decay * p
/// b_1 = g                          (first step)
/// b_t = momentum * b_{t-1} + g     (later steps)
/// d   = g + momentum * b_t         (nesterov)
/// d   = b_t                        (otherwise; d = g when momentum = 0)
/// p   = p - lr * d
/// ```
#[allow(clippy::too_many_arguments)]
fn sgd(
    p: &mut [f32],
    grad: &[f32],
    buf: Option<&mut Vec<f32>>,
    first: bool,
    neg_lr: f32,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
) {
    let (wd, m) = (weight_decay as f32, momentum as f32);
    match buf {
        Some(buf) if momentum != 0.0 => {
            for ((p, &g), b) in p.iter_mut().zip(grad).zip(buf.iter_mut()) {
                let g = if weight_decay != 0.0 { g + wd * *p } else { g };
                *b = if first { g } else { *b * m + g };
                let d = if nesterov { g + m * *b } else { *b };
                *p += neg_lr * d;
            }
        }
        _ => {
            for (p, &g) in p.iter_mut().zip(grad) {
                let g = if weight_decay != 0.0 { g + wd * *p } else { g };
                *p += neg_lr * g;
            }
        }
    }
}

/// `torch.optim.Adam` / `torch.optim.AdamW` (no amsgrad), per element, with `t` the
/// step number (1 on the first step) and `m_0 = v_0 = 0`:
///
/// ```text
/// p   = p * (1 - lr * weight_decay)              (AdamW: decoupled decay, first)
/// g   = grad + weight_decay * p                  (Adam: L2 added to the gradient)
/// m_t = m_{t-1} + (1 - beta1) * (g - m_{t-1})    (= beta1 * m_{t-1} + (1 - beta1) * g)
/// v_t = beta2 * v_{t-1} + (1 - beta2) * g * g
/// p   = p - (lr / (1 - beta1^t)) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)
/// ```
///
/// On step 1 the last line moves each element by about `lr * sign(g)`.
#[allow(clippy::too_many_arguments)]
fn adam(
    p: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: AdamStep,
    [beta1, beta2]: [f64; 2],
    eps: f64,
    weight_decay: f64,
    decoupled: bool,
) {
    // Scalars as Python computes them (f64), cast to f32 where a kernel uses them
    // (the per-step ones in `s`).
    let AdamStep {
        decay,
        neg_step,
        bc2_sqrt,
    } = s;
    let w1 = 1.0 - beta1;
    let w1f = w1 as f32;
    let (b2, w2) = (beta2 as f32, (1.0 - beta2) as f32);
    let (epsf, wd) = (eps as f32, weight_decay as f32);
    for (((p, &g), m), v) in p.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = if decoupled {
            if weight_decay != 0.0 {
                *p *= decay;
            }
            g
        } else if weight_decay != 0.0 {
            g + wd * *p
        } else {
            g
        };
        // torch.lerp: the branch keeps it exact at both ends.
        let diff = g - *m;
        *m = if w1.abs() < 0.5 {
            *m + w1f * diff
        } else {
            g - diff * (1.0 - w1f)
        };
        *v = *v * b2 + w2 * g * g;
        let denom = v.sqrt() / bc2_sqrt + epsf;
        *p += neg_step * *m / denom;
    }
}

/// The learning-rate schedule of a `train` section.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule(pub checked::Schedule);

impl Schedule {
    pub fn new(s: &checked::Schedule) -> Schedule {
        Schedule(s.clone())
    }

    /// Epochs of linear warm-up.
    pub fn warmup(&self) -> u64 {
        match self.0 {
            checked::Schedule::Constant { warmup }
            | checked::Schedule::Step { warmup, .. }
            | checked::Schedule::Cosine { warmup, .. } => warmup,
        }
    }

    /// The learning rate of training step `step` (0-based, counted over the whole
    /// run), with `S = steps_per_epoch`, `E = epochs`, `W = warmup * S` warm-up steps:
    ///
    /// ```text
    /// warm-up (step < W):  base_lr * (step + 1) / W     (base_lr/W on the first step,
    ///                                                     base_lr on the last)
    /// then, with s = step - W and e = floor(s / S) the epoch counted from the end
    /// of warm-up:
    /// constant:            base_lr
    /// step(every, gamma):  base_lr * gamma^floor(e / every)
    /// cosine(min_lr):      min_lr + (base_lr - min_lr) * (1 + cos(pi * s / T)) / 2
    ///                      with T = E*S - W, the steps after warm-up (so base_lr
    ///                      on the first of them, min_lr just after the last)
    /// ```
    ///
    /// `step(every, gamma)` without warm-up is PyTorch's `StepLR(step_size=every)`
    /// stepped each epoch; `cosine` is `CosineAnnealingLR(T_max=T, eta_min=min_lr)`
    /// stepped each batch. Computed in `f64`, returned as `f32`.
    pub fn lr_at(&self, base_lr: f64, step: u64, steps_per_epoch: u64, epochs: u64) -> f32 {
        let spe = steps_per_epoch.max(1);
        let w = self.warmup().saturating_mul(spe);
        if step < w {
            return (base_lr * (step + 1) as f64 / w as f64) as f32;
        }
        let s = step - w;
        let lr = match self.0 {
            checked::Schedule::Constant { .. } => base_lr,
            checked::Schedule::Step { every, gamma, .. } => {
                let e = s / spe;
                let k = e / every.max(1);
                base_lr * gamma.powi(k.min(i32::MAX as u64) as i32)
            }
            checked::Schedule::Cosine { min_lr, .. } => {
                let total = epochs.saturating_mul(spe).saturating_sub(w);
                if total == 0 {
                    base_lr
                } else {
                    let x = (s.min(total) as f64) / total as f64;
                    min_lr + (base_lr - min_lr) * (1.0 + (std::f64::consts::PI * x).cos()) / 2.0
                }
            }
        };
        lr as f32
    }
}

/// What one clipping did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ClipOutcome {
    /// Some gradient was changed.
    pub fired: bool,
    /// Global L2 norm of all the gradients before clipping (computed in `f64`).
    pub norm: f32,
}

/// Applies a clip policy to the gradients of one step:
///
/// - `norm(max)`: if the global L2 norm `n` of all gradients exceeds `max`, every
///   gradient is multiplied by `max / n` — the direction is kept and the new norm is
///   `max`. (PyTorch's `clip_grad_norm_` uses `max / (n + 1e-6)`, 1e-6 relative
///   smaller.)
/// - `value(v)`: each element is clamped to `[-v, v]`; fired if any was.
/// - `layer_norm(max)`: the same as `norm(max)`, separately for the gradients of
///   each layer (`layer_of[k]` is the layer of `grads[k]`); fired if any layer was.
///
/// A gradient norm that is not finite (NaN or infinite elements) is reported as it is
/// and nothing is scaled (the non-finite policy decides what happens to the step).
pub fn clip(grads: &mut [Vec<f32>], layer_of: &[usize], policy: &checked::Clip) -> ClipOutcome {
    let sq: Vec<f64> = grads.iter().map(|g| sum_sq(g)).collect();
    let (norm, action) = clip_action(&sq, layer_of, policy);
    let fired = match action {
        ClipAction::Keep => false,
        ClipAction::Scale(scales) => {
            for (g, s) in grads.iter_mut().zip(scales) {
                if let Some(s) = s {
                    for x in g.iter_mut() {
                        *x *= s;
                    }
                }
            }
            true
        }
        ClipAction::Clamp(v) => {
            let mut fired = false;
            for x in grads.iter_mut().flat_map(|g| g.iter_mut()) {
                if *x > v {
                    *x = v;
                    fired = true;
                } else if *x < -v {
                    *x = -v;
                    fired = true;
                }
            }
            fired
        }
    };
    ClipOutcome {
        fired,
        norm: norm as f32,
    }
}

/// What a clip policy does to the gradients of one step (see [`clip`]).
#[derive(Clone, Debug, PartialEq)]
pub enum ClipAction {
    /// Nothing: no policy, or a norm policy that did not fire.
    Keep,
    /// A norm policy fired: gradient `k` is multiplied by `scales[k]` where it is
    /// `Some` (every one for `norm`; the layers above the limit for `layer_norm`,
    /// at least one). Fired.
    Scale(Vec<Option<f32>>),
    /// `value(v)`: every element clamped to `[−v, v]` (`v` in f32). Fired when
    /// some element is outside (`|x| > v`; NaN never).
    Clamp(f32),
}

/// The decision half of [`clip`]: the global L2 norm (f64) and what the policy
/// does, from each gradient's sum of squares `sq[k]` (f64) and its layer
/// `layer_of[k]`. Shared with backends that apply the clip inside their update.
pub fn clip_action(sq: &[f64], layer_of: &[usize], policy: &checked::Clip) -> (f64, ClipAction) {
    let norm = sq.iter().sum::<f64>().sqrt();
    let action = match *policy {
        checked::Clip::None => ClipAction::Keep,
        checked::Clip::Norm(max) => match scale_if_above(norm, max) {
            Some(s) => ClipAction::Scale(vec![Some(s); sq.len()]),
            None => ClipAction::Keep,
        },
        checked::Clip::Value(v) => ClipAction::Clamp(v as f32),
        checked::Clip::LayerNorm(max) => {
            assert_eq!(layer_of.len(), sq.len(), "one layer per gradient");
            let mut layers: Vec<usize> = layer_of.to_vec();
            layers.sort_unstable();
            layers.dedup();
            let mut scales = vec![None; sq.len()];
            for l in layers {
                let n = layer_of
                    .iter()
                    .zip(sq)
                    .filter(|(&x, _)| x == l)
                    .map(|(_, s)| s)
                    .sum::<f64>()
                    .sqrt();
                if let Some(s) = scale_if_above(n, max) {
                    for (slot, _) in scales.iter_mut().zip(layer_of).filter(|(_, &x)| x == l) {
                        *slot = Some(s);
                    }
                }
            }
            if scales.iter().any(Option::is_some) {
                ClipAction::Scale(scales)
            } else {
                ClipAction::Keep
            }
        }
    };
    (norm, action)
}

fn sum_sq(g: &[f32]) -> f64 {
    g.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// The scale `max / norm` (in f32) when a finite norm exceeds `max`.
fn scale_if_above(norm: f64, max: f64) -> Option<f32> {
    if !norm.is_finite() || norm <= max {
        return None;
    }
    Some((max / norm) as f32)
}

/// How often clipping fired, and the gradient norms seen, over an epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ClipStats {
    /// Steps recorded.
    pub steps: u64,
    /// Steps where clipping changed the gradients.
    pub fired: u64,
    /// Largest finite gradient norm (before clipping).
    pub max_norm: f32,
    /// Sum of the finite norms, for the mean.
    pub sum_norm: f64,
    /// Steps whose norm was NaN or infinite.
    pub nonfinite: u64,
}

impl ClipStats {
    pub fn record(&mut self, o: &ClipOutcome) {
        self.steps += 1;
        self.fired += u64::from(o.fired);
        if o.norm.is_finite() {
            self.max_norm = self.max_norm.max(o.norm);
            self.sum_norm += f64::from(o.norm);
        } else {
            self.nonfinite += 1;
        }
    }

    /// Fraction of steps where clipping fired (0 with no steps).
    pub fn fired_fraction(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.fired as f64 / self.steps as f64
        }
    }

    /// Mean of the finite gradient norms (0 with none).
    pub fn mean_norm(&self) -> f64 {
        let n = self.steps - self.nonfinite;
        if n == 0 {
            0.0
        } else {
            self.sum_norm / n as f64
        }
    }

    /// The figures so far, and a reset for the next epoch.
    pub fn take(&mut self) -> ClipStats {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use cnnc_compiler::params::ParamKind;

    fn specs(sizes: &[usize]) -> Vec<ParamSpec> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ParamSpec {
                name: format!("l{i}.weight"),
                shape: vec![n],
                kind: ParamKind::Weight,
                layer: i,
                trainable: true,
                fan_in: n,
                init: None,
            })
            .collect()
    }

    /// One parameter `[1.0, -2.0, 0.5]`, the optimizer, and the values after each of
    /// the steps with these gradients.
    fn run(cfg: checked::Optimizer, grads: &[[f32; 3]], lr: f32) -> Vec<Vec<f32>> {
        let mut s = specs(&[3]);
        s[0].init = Some(vec![1.0, -2.0, 0.5]);
        let mut p = Params::init(&s, 0).unwrap();
        let mut opt = Optimizer::new(&cfg, &s);
        grads
            .iter()
            .map(|g| {
                opt.step(&mut p, &[g.to_vec()], lr);
                p.data(0).to_vec()
            })
            .collect()
    }

    fn close(got: &[Vec<f32>], want: &[[f64; 3]]) {
        assert_eq!(got.len(), want.len());
        for (t, (g, w)) in got.iter().zip(want).enumerate() {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "step {}: got {g:?}, want {w:?}",
                    t + 1
                );
            }
        }
    }

    const G: [[f32; 3]; 3] = [[0.5, 0.25, -1.0], [-1.0, 0.5, 2.0], [0.25, -0.75, 0.5]];

    fn sgd(momentum: f64, nesterov: bool, weight_decay: f64) -> checked::Optimizer {
        checked::Optimizer::Sgd {
            lr: 0.1,
            momentum,
            nesterov,
            weight_decay,
        }
    }

    #[test]
    fn sgd_plain() {
        // p_t = p_{t-1} - 0.1 g_t
        close(
            &run(sgd(0.0, false, 0.0), &G, 0.1),
            &[
                [0.95, -2.025, 0.6],
                [1.05, -2.075, 0.4],
                [1.025, -2.0, 0.35],
            ],
        );
    }

    #[test]
    fn sgd_momentum() {
        // b1 = g1 = [.5, .25, -1]            p1 = p0 - .1 b1 = [.95, -2.025, .6]
        // b2 = .9 b1 + g2 = [-.55, .725, 1.1] p2 = [1.005, -2.0975, .49]
        // b3 = .9 b2 + g3 = [-.245, -.0975, 1.49] p3 = [1.0295, -2.08775, .341]
        close(
            &run(sgd(0.9, false, 0.0), &G, 0.1),
            &[
                [0.95, -2.025, 0.6],
                [1.005, -2.0975, 0.49],
                [1.0295, -2.08775, 0.341],
            ],
        );
    }

    #[test]
    fn sgd_nesterov() {
        // b1 = g1; d1 = g1 + .9 b1 = [.95, .475, -1.9]   p1 = [.905, -2.0475, .69]
        // b2 = [-.55, .725, 1.1]; d2 = g2 + .9 b2 = [-1.495, 1.1525, 2.99]
        //                                                 p2 = [1.0545, -2.16275, .391]
        // b3 = [-.245, -.0975, 1.49]; d3 = g3 + .9 b3 = [.0295, -.83775, 1.841]
        //                                                 p3 = [1.05155, -2.078975, .2069]
        close(
            &run(sgd(0.9, true, 0.0), &G, 0.1),
            &[
                [0.905, -2.0475, 0.69],
                [1.0545, -2.16275, 0.391],
                [1.05155, -2.078975, 0.2069],
            ],
        );
    }

    #[test]
    fn sgd_weight_decay_adds_to_gradient() {
        // g' = g + .1 p;  b = .9 b + g';  p = p - .1 b
        // step 1: g' = [.6, .05, -.95]  b1 = g'          p1 = [.94, -2.005, .595]
        // step 2: g' = [-.906, .2995, 2.0595]
        //         b2 = [-.366, .3445, 1.2045]            p2 = [.9766, -2.03945, .47455]
        close(
            &run(sgd(0.9, false, 0.1), &G[..2], 0.1),
            &[[0.94, -2.005, 0.595], [0.9766, -2.03945, 0.47455]],
        );
    }

    fn adam(weight_decay: f64, w: bool) -> checked::Optimizer {
        let (lr, betas, eps) = (0.01, [0.9, 0.999], 1e-8);
        if w {
            checked::Optimizer::AdamW {
                lr,
                betas,
                eps,
                weight_decay,
            }
        } else {
            checked::Optimizer::Adam {
                lr,
                betas,
                eps,
                weight_decay,
            }
        }
    }

    /// The Adam formulas in f64, for the expected values.
    fn adam_ref(wd: f64, decoupled: bool, steps: usize) -> Vec<[f64; 3]> {
        let (lr, b1, b2, eps) = (0.01, 0.9, 0.999, 1e-8);
        let mut p = [1.0, -2.0, 0.5];
        let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
        let mut out = vec![];
        for (t, g) in G.iter().take(steps).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..3 {
                let mut g = f64::from(g[i]);
                if decoupled {
                    p[i] *= 1.0 - lr * wd;
                } else {
                    g += wd * p[i];
                }
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn adam_first_step_moves_by_lr_times_sign() {
        let got = run(adam(0.0, false), &G[..1], 0.01);
        close(&got, &[[0.99, -2.01, 0.51]]);
    }

    #[test]
    fn adam_three_steps() {
        // Hand-worked step 2, element 0: g = .5 then -1.
        //   m2 = .9*.05 + .1*(-1) = -.055, v2 = .999*.00025 + .001*1 = .00124975
        //   mh = -.055/.19 = -.289474, vh = .00124975/.001999 = .625188
        //   p2 = .99 - .01 * (-.289474 / .790688) = .993661
        let got = run(adam(0.0, false), &G, 0.01);
        assert!((f64::from(got[1][0]) - 0.993661).abs() < 1e-6);
        close(&got, &adam_ref(0.0, false, 3));
    }

    #[test]
    fn adam_l2_and_adamw_decoupled_decay() {
        close(&run(adam(0.1, false), &G, 0.01), &adam_ref(0.1, false, 3));
        let got = run(adam(0.1, true), &G, 0.01);
        close(&got, &adam_ref(0.1, true, 3));
        // AdamW step 1: p * (1 - .001) then the Adam step of ~lr * sign(g).
        close(&got[..1], &[[0.989, -2.008, 0.5095]]);
    }

    #[test]
    fn frozen_parameters_are_not_updated_and_state_is_exposed() {
        let mut s = specs(&[2, 2, 2]);
        s[1].trainable = false;
        let mut p = Params::init(&s, 3).unwrap();
        let before = p.clone();
        let mut opt = Optimizer::new(&sgd(0.9, false, 0.0), &s);
        assert_eq!(opt.num_params(), 2);
        assert_eq!(opt.state_names(), &["momentum_buffer"]);
        opt.step(&mut p, &[vec![1.0, 2.0], vec![3.0, 4.0]], 0.5);
        assert_eq!(p.data(1), before.data(1));
        assert_eq!(p.data(0)[0], before.data(0)[0] - 0.5);
        assert_eq!(opt.state(1, 0), &[3.0, 4.0]);
        assert_eq!(opt.steps(), 1);
        let adam = Optimizer::new(&adam(0.0, true), &s);
        assert_eq!(adam.state_names(), &["exp_avg", "exp_avg_sq"]);
        assert_eq!(adam.name(), "adamw");
        assert!(Optimizer::new(&sgd(0.0, false, 0.0), &s)
            .state_names()
            .is_empty());
    }

    fn lr(s: checked::Schedule, step: u64) -> f32 {
        // 10 steps per epoch, 10 epochs, base 0.1.
        Schedule::new(&s).lr_at(0.1, step, 10, 10)
    }

    fn eq(a: f32, b: f64) {
        assert!((f64::from(a) - b).abs() < 1e-7, "{a} != {b}");
    }

    #[test]
    fn schedule_constant_and_warmup() {
        let c = checked::Schedule::Constant { warmup: 0 };
        eq(lr(c.clone(), 0), 0.1);
        eq(lr(c, 99), 0.1);
        let w = checked::Schedule::Constant { warmup: 2 };
        eq(lr(w.clone(), 0), 0.1 / 20.0); // first step: base / warm-up steps
        eq(lr(w.clone(), 9), 0.1 * 10.0 / 20.0);
        eq(lr(w.clone(), 19), 0.1); // last warm-up step reaches base
        eq(lr(w, 20), 0.1);
    }

    #[test]
    fn schedule_step_decays_at_epoch_boundaries_after_warmup() {
        let s = checked::Schedule::Step {
            every: 3,
            gamma: 0.5,
            warmup: 0,
        };
        eq(lr(s.clone(), 0), 0.1);
        eq(lr(s.clone(), 29), 0.1); // last step of epoch 2
        eq(lr(s.clone(), 30), 0.05); // epoch 3
        eq(lr(s.clone(), 59), 0.05);
        eq(lr(s.clone(), 60), 0.025);
        eq(lr(s, 99), 0.0125);
        let s = checked::Schedule::Step {
            every: 3,
            gamma: 0.5,
            warmup: 1,
        };
        eq(lr(s.clone(), 0), 0.01);
        eq(lr(s.clone(), 10), 0.1); // first epoch after warm-up
        eq(lr(s.clone(), 39), 0.1);
        eq(lr(s, 40), 0.05); // three epochs after warm-up
    }

    #[test]
    fn schedule_cosine() {
        let s = checked::Schedule::Cosine {
            min_lr: 0.001,
            warmup: 0,
        };
        eq(lr(s.clone(), 0), 0.1);
        eq(lr(s.clone(), 50), 0.0505); // halfway: the mean of base and min
        let last = 0.001 + 0.099 * (1.0 + (std::f64::consts::PI * 0.99).cos()) / 2.0;
        eq(lr(s.clone(), 99), last);
        assert!(last < 0.0011);
        eq(lr(s.clone(), 100), 0.001); // just after the end
        eq(lr(s, 1000), 0.001);
        let s = checked::Schedule::Cosine {
            min_lr: 0.0,
            warmup: 2,
        };
        eq(lr(s.clone(), 0), 0.005);
        eq(lr(s.clone(), 19), 0.1);
        eq(lr(s.clone(), 20), 0.1);
        eq(lr(s, 60), 0.05); // halfway through the 80 steps after warm-up
    }

    fn norm(g: &[Vec<f32>]) -> f64 {
        g.iter().map(|g| sum_sq(g)).sum::<f64>().sqrt()
    }

    #[test]
    fn clip_norm_keeps_direction() {
        let mut g = vec![vec![3.0, 0.0], vec![0.0, -4.0]];
        let o = clip(&mut g, &[0, 1], &checked::Clip::Norm(1.0));
        assert_eq!(
            o,
            ClipOutcome {
                fired: true,
                norm: 5.0
            }
        );
        assert!((norm(&g) - 1.0).abs() < 1e-6);
        assert_eq!(g, vec![vec![0.6, 0.0], vec![0.0, -0.8]]);
        let before = g.clone();
        let o = clip(&mut g, &[0, 1], &checked::Clip::Norm(2.0));
        assert!(!o.fired && (o.norm - 1.0).abs() < 1e-6);
        assert_eq!(g, before);
    }

    #[test]
    fn clip_value_clamps() {
        let mut g = vec![vec![0.5, -3.0], vec![2.0, 0.1]];
        let o = clip(&mut g, &[0, 0], &checked::Clip::Value(1.0));
        assert!(o.fired);
        assert!((f64::from(o.norm) - (0.25f64 + 9.0 + 4.0 + 0.01).sqrt()).abs() < 1e-6);
        assert_eq!(g, vec![vec![0.5, -1.0], vec![1.0, 0.1]]);
        assert!(!clip(&mut g, &[0, 0], &checked::Clip::Value(1.0)).fired);
    }

    #[test]
    fn clip_layer_norm_clips_only_the_big_layer() {
        // Layer 0 has two tensors with norm sqrt(9+16) = 5; layer 1 has norm 0.5.
        let mut g = vec![vec![3.0], vec![0.5, 0.0], vec![4.0]];
        let o = clip(&mut g, &[0, 1, 0], &checked::Clip::LayerNorm(1.0));
        assert!(o.fired);
        assert!((f64::from(o.norm) - 25.25f64.sqrt()).abs() < 1e-6);
        assert_eq!(g, vec![vec![0.6], vec![0.5, 0.0], vec![0.8]]);
    }

    #[test]
    fn clip_none_and_nonfinite() {
        let mut g = vec![vec![30.0, 40.0]];
        let o = clip(&mut g, &[0], &checked::Clip::None);
        assert_eq!(
            o,
            ClipOutcome {
                fired: false,
                norm: 50.0
            }
        );
        let mut g = vec![vec![f32::NAN, 40.0]];
        let o = clip(&mut g, &[0], &checked::Clip::Norm(1.0));
        assert!(!o.fired && o.norm.is_nan());
        assert_eq!(g[0][1], 40.0);
    }

    #[test]
    fn clip_stats_count_per_epoch() {
        let mut st = ClipStats::default();
        st.record(&ClipOutcome {
            fired: true,
            norm: 3.0,
        });
        st.record(&ClipOutcome {
            fired: false,
            norm: 1.0,
        });
        st.record(&ClipOutcome {
            fired: false,
            norm: f32::INFINITY,
        });
        assert_eq!((st.steps, st.fired, st.nonfinite), (3, 1, 1));
        assert_eq!(st.max_norm, 3.0);
        assert!((st.fired_fraction() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(st.mean_norm(), 2.0);
        let epoch = st.take();
        assert_eq!(epoch.steps, 3);
        assert_eq!(st, ClipStats::default());
        assert_eq!(st.fired_fraction(), 0.0);
    }
}
