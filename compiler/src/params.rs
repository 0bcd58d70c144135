//! The parameters and buffers of a checked model, with PyTorch's names and layouts
//! so weights move between cnnc and PyTorch without conversion:
//!
//! | layer | tensors |
//! | --- | --- |
//! | conv (and depthwise, pointwise) | `L.weight` `[out, in/groups, kh, kw]`, `L.bias` `[out]` |
//! | linear | `L.weight` `[out, in]`, `L.bias` `[out]` |
//! | batchnorm | `L.weight`, `L.bias`, `L.running_mean`, `L.running_var` `[C]`, `L.num_batches_tracked` `[]` (int64) |
//! | groupnorm | `L.weight`, `L.bias` `[C]` |
//!
//! `L` is the layer's full dotted name (`c1`, `stage1.0.conv1`).

use crate::checked::{CheckedModel, Op};
use serde::Serialize;

/// What a tensor is, which decides its initial value and how training treats it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ParamKind {
    /// Conv or linear weight: trained; PyTorch's default init
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (kaiming_uniform with a=sqrt(5)),
    /// unless the model gives literal weights.
    Weight,
    /// Conv or linear bias: trained; `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    Bias,
    /// Norm scale: trained; ones.
    Gamma,
    /// Norm shift: trained; zeros.
    Beta,
    /// Batchnorm running mean: updated by training steps, not by the optimizer; zeros.
    RunningMean,
    /// Batchnorm running variance (unbiased, as PyTorch); ones.
    RunningVar,
    /// Batchnorm step counter (int64 in checkpoints); zero.
    BatchesTracked,
}

impl ParamKind {
    /// Whether the optimizer updates it (unless the layer is frozen).
    pub fn is_trainable(self) -> bool {
        matches!(
            self,
            ParamKind::Weight | ParamKind::Bias | ParamKind::Gamma | ParamKind::Beta
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamSpec {
    /// e.g. `c1.weight`
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// Index of the layer in `CheckedModel::layers`.
    pub layer: usize,
    /// The optimizer updates it: a trainable kind in a layer that is not frozen.
    pub trainable: bool,
    /// `fan_in` for the default initialisation of weights and biases.
    pub fan_in: usize,
    /// Literal initial values (row-major), from `weights=` in the model.
    pub init: Option<Vec<f64>>,
}

/// Every parameter and buffer of the model, in layer order, then in the order of
/// the table above.
pub fn param_specs(m: &CheckedModel) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let mut push = |suffix: &str,
                        shape: Vec<usize>,
                        kind: ParamKind,
                        fan_in: usize,
                        init: Option<Vec<f64>>| {
            out.push(ParamSpec {
                name: format!("{}.{suffix}", l.name),
                shape,
                kind,
                layer: i,
                trainable: kind.is_trainable() && !l.frozen,
                fan_in,
                init,
            });
        };
        let in_shape = |k: usize| -> Vec<usize> {
            let v = l.inputs[k];
            m.shape(v).iter().map(|&d| d as usize).collect()
        };
        match &l.op {
            Op::Conv {
                out,
                kernel,
                groups,
                bias,
                weights,
                ..
            } => {
                let cin = in_shape(0)[0] / *groups as usize;
                let fan_in = cin * (kernel[0] * kernel[1]) as usize;
                let shape = vec![*out as usize, cin, kernel[0] as usize, kernel[1] as usize];
                push("weight", shape, ParamKind::Weight, fan_in, weights.clone());
                if *bias {
                    push("bias", vec![*out as usize], ParamKind::Bias, fan_in, None);
                }
            }
            Op::Linear { out, bias } => {
                let fan_in = in_shape(0)[0];
                push(
                    "weight",
                    vec![*out as usize, fan_in],
                    ParamKind::Weight,
                    fan_in,
                    None,
                );
                if *bias {
                    push("bias", vec![*out as usize], ParamKind::Bias, fan_in, None);
                }
            }
            Op::BatchNorm { .. } => {
                let c = in_shape(0)[0];
                push("weight", vec![c], ParamKind::Gamma, 0, None);
                push("bias", vec![c], ParamKind::Beta, 0, None);
                push("running_mean", vec![c], ParamKind::RunningMean, 0, None);
                push("running_var", vec![c], ParamKind::RunningVar, 0, None);
                push(
                    "num_batches_tracked",
                    vec![],
                    ParamKind::BatchesTracked,
                    0,
                    None,
                );
            }
            Op::GroupNorm { .. } => {
                let c = in_shape(0)[0];
                push("weight", vec![c], ParamKind::Gamma, 0, None);
                push("bias", vec![c], ParamKind::Beta, 0, None);
            }
            _ => {}
        }
    }
    out
}
