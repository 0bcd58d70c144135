//! The checked model: what the check stage hands to lowering. Blocks and `repeat`
//! are expanded, every argument is resolved to a concrete value, and every value
//! has a static shape.
//!
//! Invariants: layers are in topological order (a layer's inputs are earlier
//! values); `layers[i]` produces value `i + 1`, value 0 is the model input; every
//! shape is non-empty with positive dimensions; names are unique.

use crate::source::Loc;
use serde::Serialize;

/// A tensor shape without the batch dimension: `[C, H, W]` or `[N]`.
pub type Shape = Vec<u64>;

/// Index of a value: 0 is the model input, `i + 1` the output of `layers[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ValueId(pub usize);

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckedModel {
    pub name: String,
    pub input_name: String,
    pub input: Shape,
    pub layers: Vec<Layer>,
}

impl CheckedModel {
    pub fn shape(&self, v: ValueId) -> &Shape {
        if v.0 == 0 {
            &self.input
        } else {
            &self.layers[v.0 - 1].shape
        }
    }
    /// The model's output: the last layer's value (or the input if there is none).
    pub fn output(&self) -> ValueId {
        ValueId(self.layers.len())
    }
    pub fn layer_by_name(&self, name: &str) -> Option<(ValueId, &Layer)> {
        self.layers
            .iter()
            .enumerate()
            .find(|(_, l)| l.name == name)
            .map(|(i, l)| (ValueId(i + 1), l))
    }
    /// The value a name refers to: a layer's full name, or a block instance's name
    /// (its output is the last layer expanded inside it).
    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        if let Some((v, _)) = self.layer_by_name(name) {
            return Some(v);
        }
        let prefix = format!("{name}.");
        self.layers
            .iter()
            .rposition(|l| l.name.starts_with(&prefix))
            .map(|i| ValueId(i + 1))
    }
    /// The layers that read value `v`.
    pub fn users(&self, v: ValueId) -> impl Iterator<Item = (ValueId, &Layer)> {
        self.layers
            .iter()
            .enumerate()
            .filter(move |(_, l)| l.inputs.contains(&v))
            .map(|(i, l)| (ValueId(i + 1), l))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layer {
    /// Full dotted name: `c1`, `conv2`, `stage1.0.conv1`. Parameter names in
    /// checkpoints are `<name>.weight`, `<name>.bias`, ….
    pub name: String,
    /// The op as written (`conv`, `depthwise`, `pointwise`, `relu`, …).
    pub op_name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub shape: Shape,
    /// Trainable (or frozen) parameter count.
    pub params: u64,
    /// Multiply-accumulates per image.
    pub macs: u64,
    pub frozen: bool,
    /// The statement that made this layer.
    pub loc: Loc,
    /// The enclosing block instances, outermost first: (block, where it was used).
    pub trace: Vec<(String, Loc)>,
}

/// Height and width of a 2-D parameter.
pub type Hw = [u64; 2];

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Op {
    Conv {
        out: u64,
        kernel: Hw,
        stride: Hw,
        pad: Hw,
        dilation: Hw,
        groups: u64,
        bias: bool,
        /// Initial weights, `[out, in/groups, kh, kw]` row-major, when given.
        weights: Option<Vec<f64>>,
    },
    BatchNorm {
        momentum: f64,
        eps: f64,
    },
    GroupNorm {
        groups: u64,
        eps: f64,
    },
    Relu,
    LeakyRelu {
        slope: f64,
    },
    Sigmoid,
    Tanh,
    Gelu,
    MaxPool {
        kernel: Hw,
        stride: Hw,
        pad: Hw,
    },
    AvgPool {
        kernel: Hw,
        stride: Hw,
        pad: Hw,
    },
    GlobalAvgPool,
    Flatten,
    Linear {
        out: u64,
        bias: bool,
    },
    Dropout {
        p: f64,
    },
    Add,
    Concat,
    Detach,
}

impl Op {
    /// Whether the op has parameters (so `frozen` means something).
    pub fn has_params(&self) -> bool {
        matches!(
            self,
            Op::Conv { .. } | Op::BatchNorm { .. } | Op::GroupNorm { .. } | Op::Linear { .. }
        )
    }
}

/// A checked `train` section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainConfig {
    pub data: DataSource,
    pub augment: Vec<Augment>,
    pub batch: u64,
    pub epochs: u64,
    pub loss: Loss,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub clip: Clip,
    pub checkpoint: Option<Checkpoint>,
    pub on_nonfinite: OnNonFinite,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum DataSource {
    /// IDX files in a folder; the path is relative to the model file's folder.
    Mnist { path: String },
    /// One sub-folder per class.
    Folder {
        train: String,
        test: Option<String>,
        split: f64,
    },
    /// Synthetic localisation set with object masks.
    Shapes {
        n: u64,
        size: u64,
        rgb: bool,
        classes: u64,
    },
}

impl DataSource {
    /// Image shape `[C, H, W]` and class count, when known without reading files.
    pub fn known_shape(&self) -> Option<(Shape, u64)> {
        match self {
            DataSource::Mnist { .. } => Some((vec![1, 28, 28], 10)),
            DataSource::Shapes {
                size, rgb, classes, ..
            } => Some((vec![if *rgb { 3 } else { 1 }, *size, *size], *classes)),
            DataSource::Folder { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Augment {
    RandomCrop { size: u64, pad: u64 },
    HFlip { p: f64 },
    Normalize { mean: Vec<f64>, std: Vec<f64> },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Loss {
    CrossEntropy { smoothing: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Optimizer {
    Sgd {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    Adam {
        lr: f64,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    },
    AdamW {
        lr: f64,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    },
}

impl Optimizer {
    /// Number of state tensors kept per parameter (for the memory estimate).
    pub fn state_per_param(&self) -> u64 {
        match self {
            Optimizer::Sgd { momentum, .. } => u64::from(*momentum != 0.0),
            Optimizer::Adam { .. } | Optimizer::AdamW { .. } => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Schedule {
    Constant { warmup: u64 },
    Step { every: u64, gamma: f64, warmup: u64 },
    Cosine { min_lr: f64, warmup: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Clip {
    None,
    Norm(f64),
    Value(f64),
    LayerNorm(f64),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checkpoint {
    pub every: u64,
    pub keep: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum OnNonFinite {
    Abort,
    Skip { max: u64 },
}

/// A checked explain directive.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExplainDirective {
    pub method: Method,
    pub split: Split,
    pub samples: Vec<u64>,
    pub class: ClassSel,
    /// Output folder under the run folder's `explain/`.
    pub output: String,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Method {
    Saliency,
    SmoothGrad { samples: u64, noise: f64 },
    IntegratedGradients { steps: u64, baseline: Baseline },
    Cam { layer: ValueId },
    GradCam { layer: ValueId },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Baseline {
    Zero,
    Mean,
    Blur,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Split {
    Train,
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum ClassSel {
    Predicted,
    Label,
    Index(u64),
}

/// A checked `example` line of a library file: the block expanded on a sample input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckedExample {
    pub title: String,
    pub model: CheckedModel,
}

/// Everything checked in one file given on the command line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckedFile {
    pub model: Option<CheckedModel>,
    pub train: Option<TrainConfig>,
    pub explain: Vec<ExplainDirective>,
    pub examples: Vec<CheckedExample>,
    /// Names of the blocks defined in the file itself.
    pub blocks: Vec<String>,
}
