//! Check-stage diagnostics: names (E02xx), arguments (E03xx), shapes (E04xx), the
//! train section (E05xx), the explain section (E06xx), and warnings (W0xxx).
//! The last variants of each enum are raised while training, by `cnnc run`
//! (non-finite values E0701, gradient health W0007–W0008); they point at a layer.
//! Each variant's doc comment is the long form printed by `cnnc explain-code`.

use miette::{Diagnostic, SourceSpan};
use thiserror::Error;

#[derive(Clone, Debug, Error, Diagnostic, PartialEq)]
pub enum CheckError {
    // ------------------------------------------------------------------ names
    /// An `import` names a file that does not exist or cannot be read.
    ///
    /// `std/…` names a file of the standard library built into cnnc
    /// (`std/blocks.cnn`, `std/nets.cnn`); any other path is relative to the
    /// folder of the importing file.
    ///
    /// Example: `import "std/block.cnn"` — the file is `std/blocks.cnn`.
    #[error("cannot import `{path}`: {reason}")]
    #[diagnostic(code(E0201))]
    ImportNotFound {
        path: String,
        reason: String,
        #[label("imported here")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A statement uses an op that is neither a built-in layer nor a block in scope.
    ///
    /// Built-in layers are listed in docs/language.md; blocks come from this file
    /// or from an `import`.
    ///
    /// Example: `convv(16)` — did you mean `conv`? `conv_bn_relu(32)` without
    /// `import "std/blocks.cnn"`.
    #[error("unknown layer or block `{name}`")]
    #[diagnostic(code(E0202))]
    UnknownOp {
        name: String,
        #[label("not a layer or a block in scope")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// Two blocks have the same name (in one file, or across imported files).
    ///
    /// Fix: rename one of them.
    #[error("block `{name}` is defined twice")]
    #[diagnostic(code(E0203))]
    DuplicateBlock {
        name: String,
        #[label("second definition")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A block has the name of a built-in layer, which would hide it.
    ///
    /// Example: `block pointwise(out) { … }` — `pointwise` is the built-in 1×1 conv.
    ///
    /// Fix: rename the block, e.g. `my_pointwise`.
    #[error("`{name}` is a built-in layer and cannot be a block name")]
    #[diagnostic(code(E0211), help("rename the block"))]
    BuiltinBlockName {
        name: String,
        #[label("the name of a built-in layer")]
        span: SourceSpan,
    },

    /// A name refers to no value in scope.
    ///
    /// `add`, `concat`, `from` and explain's `layer=` refer to named layers defined
    /// earlier in the same model or block instance (or `input`). Names inside a
    /// block are not visible outside it.
    ///
    /// Example: `add(c1, c3)` when no layer is named `c3`.
    #[error("no value named `{name}` in scope")]
    #[diagnostic(code(E0204))]
    UnknownValue {
        name: String,
        #[label("not defined here")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// Two layers in the same scope have the same name.
    ///
    /// Names identify values for `add`/`concat`/`from`, explain targets and weight
    /// names in checkpoints, so they must be unique in a model (or block instance).
    #[error("the name `{name}` is already used in this scope")]
    #[diagnostic(code(E0205))]
    DuplicateName {
        name: String,
        #[label("second use")]
        span: SourceSpan,
        #[label("first defined here")]
        first: Option<SourceSpan>,
    },

    /// A file has more than one `model`, `train` or `explain` section.
    ///
    /// Each file describes one network with at most one training setup and one
    /// explain section. Put other models in their own files.
    #[error("more than one `{what}` in this file")]
    #[diagnostic(code(E0206))]
    DuplicateSection {
        what: String,
        #[label("second `{what}`")]
        span: SourceSpan,
        #[label("first here")]
        first: SourceSpan,
    },

    /// A `train` or `explain` section without a `model` to apply to.
    #[error("`{what}` section but no `model` in this file")]
    #[diagnostic(
        code(E0207),
        help("add a `model Name {{ input x: [C, H, W] … }}` to this file")
    )]
    NoModel {
        what: String,
        #[label("nothing to {what}")]
        span: SourceSpan,
    },

    /// The model has no `input` statement, it is not the first statement, or there
    /// is more than one. Blocks take their input from where they are used and have
    /// no `input` statement.
    ///
    /// Example: `model M { input image: [1, 28, 28]  conv(8) … }`.
    #[error("{message}")]
    #[diagnostic(code(E0208))]
    BadInput {
        message: String,
        #[label("{label}")]
        span: SourceSpan,
        label: String,
        #[help]
        help: Option<String>,
    },

    /// A block uses itself, directly or through other blocks; expanding it would
    /// never end.
    #[error("block `{name}` uses itself")]
    #[diagnostic(
        code(E0209),
        help("a block cannot contain itself; use `repeat` to stack copies")
    )]
    RecursiveBlock {
        name: String,
        #[label("recursive use")]
        span: SourceSpan,
    },

    /// Blocks use blocks that use blocks … more than 64 levels deep.
    ///
    /// No network needs this; the limit keeps expansion bounded.
    #[error("blocks nest more than {limit} levels deep")]
    #[diagnostic(code(E0212), help("use fewer levels of blocks within blocks"))]
    BlocksTooDeep {
        limit: usize,
        #[label("block use at level {}", limit + 1)]
        span: SourceSpan,
    },

    /// The model expands to more layers than cnnc accepts (repeat counts and
    /// nested blocks multiply).
    #[error("the model expands to more than {limit} layers")]
    #[diagnostic(code(E0210), help("lower the `repeat` count"))]
    TooManyLayers {
        limit: usize,
        #[label("expansion passes the limit here")]
        span: SourceSpan,
    },

    // ------------------------------------------------------------------ arguments
    /// An argument name that the layer, block or setting does not take.
    ///
    /// Example: `conv(16, strid=2)` — did you mean `stride`?
    #[error("`{callee}` has no argument `{name}`")]
    #[diagnostic(code(E0301))]
    UnknownArg {
        callee: String,
        name: String,
        #[label("unknown argument")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A required argument is missing.
    ///
    /// Example: `conv(kernel=3)` — a conv needs its number of output channels:
    /// `conv(16, kernel=3)`.
    #[error("`{callee}` needs {what}")]
    #[diagnostic(code(E0302))]
    MissingArg {
        callee: String,
        /// "the argument `out`", "at least two values".
        what: String,
        #[label("{label}")]
        span: SourceSpan,
        label: String,
        #[help]
        help: Option<String>,
    },

    /// The same argument is given twice (by name, or by position and by name).
    #[error("argument `{name}` of `{callee}` is given twice")]
    #[diagnostic(code(E0303))]
    DuplicateArg {
        callee: String,
        name: String,
        #[label("again here")]
        span: SourceSpan,
        #[label("first given here")]
        first: SourceSpan,
    },

    /// More positional arguments than the layer takes.
    ///
    /// Example: `maxpool(2, 2, 0, 1)` — maxpool takes `kernel`, `stride`, `pad`.
    #[error("`{callee}` takes {}", match *max { 0 => "no arguments".to_string(), 1 => "at most 1 positional argument".to_string(), n => format!("at most {n} positional arguments") })]
    #[diagnostic(code(E0304))]
    TooManyArgs {
        callee: String,
        max: usize,
        #[label("extra argument")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// An argument has the wrong type.
    ///
    /// Example: `conv(16, kernel=3.5)` — a kernel size is an integer; `bias="no"`
    /// — write `bias=false`.
    #[error("`{name}` of `{callee}` must be {expected}, found {found}")]
    #[diagnostic(code(E0305))]
    WrongType {
        callee: String,
        name: String,
        expected: String,
        found: String,
        #[label("expected {expected}")]
        span: SourceSpan,
    },

    /// An argument is outside the range the layer or setting accepts.
    ///
    /// Examples: `stride=0` (must be ≥ 1), `dropout(p=1.5)` (a probability lies in
    /// [0, 1]), `lr=0` (must be > 0).
    #[error("`{name}` of `{callee}` {rule}, found {value}")]
    #[diagnostic(code(E0306))]
    OutOfRange {
        callee: String,
        name: String,
        rule: String,
        value: String,
        #[label("{rule}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A symbol that is not one of the choices allowed here.
    ///
    /// Example: `pad=sme` (choices: `same`, `valid`), `optimizer = sgdd(lr=0.1)`,
    /// `clip = nrm(1.0)`, an unknown explain method.
    #[error("unknown {what} `{found}`")]
    #[diagnostic(code(E0307))]
    UnknownChoice {
        what: String,
        found: String,
        #[label("expected {choices}")]
        span: SourceSpan,
        choices: String,
        #[help]
        help: Option<String>,
    },

    // ------------------------------------------------------------------ shapes
    /// A convolution or pooling window does not fit in its input: the output would
    /// have no rows or columns.
    ///
    /// The size rule is `out = floor((in + 2*pad - dilation*(kernel-1) - 1) / stride) + 1`;
    /// the message shows it with the numbers of your model.
    ///
    /// Example: a 9×9 kernel on a 7×7 map without padding:
    /// `floor((7 + 2*0 - 1*(9-1) - 1)/1) + 1 = -1`.
    ///
    /// Fix: pad the input, use a smaller kernel, or pool less before this layer.
    #[error("`{layer}` would produce an empty output: its {dim} would be {out}")]
    #[diagnostic(code(E0401))]
    EmptyOutput {
        layer: String,
        dim: String,
        out: i64,
        #[label("{arithmetic}")]
        span: SourceSpan,
        arithmetic: String,
        #[help]
        help: Option<String>,
    },

    /// A `linear` layer with an explicit `in=` gets an input of another size.
    #[error("`{layer}` expects {expected} input features but gets {got}")]
    #[diagnostic(code(E0402))]
    LinearSize {
        layer: String,
        expected: u64,
        got: u64,
        #[label("input has {got} features ({shape})")]
        span: SourceSpan,
        shape: String,
        #[help]
        help: Option<String>,
    },

    /// A layer that needs a flat vector (`linear`) gets a feature map.
    ///
    /// Example: `conv(64) … linear(10)` — the conv output is `[64, 7, 7]`.
    ///
    /// Fix: put `global_avg_pool` (→ `[64]`) or `flatten` (→ `[3136]`) before it.
    #[error("`{layer}` needs a flat vector but gets a feature map of shape {shape}")]
    #[diagnostic(code(E0403))]
    NeedsFlat {
        layer: String,
        shape: String,
        #[label("input is {shape}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A layer that works on feature maps (conv, pooling, norms) gets a flat vector.
    ///
    /// Example: `flatten` then `conv(8)`.
    #[error("`{layer}` needs a [C, H, W] feature map but gets {shape}")]
    #[diagnostic(code(E0404))]
    NeedsSpatial {
        layer: String,
        shape: String,
        #[label("input is {shape}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A grouped convolution (or group norm) whose group count does not divide the
    /// channels.
    ///
    /// Example: `conv(48, groups=5)` on 16 input channels; `groupnorm(3)` on 32
    /// channels.
    #[error("`{layer}`: {groups} groups do not divide {channels} {which} channels")]
    #[diagnostic(code(E0405))]
    Groups {
        layer: String,
        groups: u64,
        channels: u64,
        which: String,
        #[label("{channels} is not a multiple of {groups}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// `add` gets values of different shapes.
    ///
    /// Example: adding a `[32, 14, 14]` skip connection to a `[64, 7, 7]` branch.
    ///
    /// Fix: project the skip connection with a strided 1×1 conv:
    /// `conv proj(64, kernel=1, stride=2) from x`.
    #[error("`{layer}` adds values of different shapes: {left} and {right}")]
    #[diagnostic(code(E0406))]
    AddShapes {
        layer: String,
        left: String,
        right: String,
        #[label("{left}")]
        left_span: SourceSpan,
        #[label("{right}")]
        right_span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// `concat` gets feature maps whose spatial sizes (or ranks) differ; it joins
    /// along channels, so height and width must match.
    #[error("`{layer}` concatenates values of incompatible shapes: {left} and {right}")]
    #[diagnostic(code(E0407))]
    ConcatShapes {
        layer: String,
        left: String,
        right: String,
        #[label("{left}")]
        left_span: SourceSpan,
        #[label("{right}")]
        right_span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// The model's input shape is not three positive integers `[C, H, W]`, or is
    /// unreasonably large.
    #[error("bad input shape: {reason}")]
    #[diagnostic(
        code(E0408),
        help("write the input as [channels, height, width], e.g. [1, 28, 28]")
    )]
    InputShape {
        reason: String,
        #[label("{reason}")]
        span: SourceSpan,
    },

    /// A literal `weights=` kernel does not match the conv's shape, or is ragged.
    ///
    /// Accepted shapes: `[kh, kw]`, `[out, kh, kw]` and `[out, in/groups, kh, kw]`.
    #[error("`{layer}`: weights literal {reason}")]
    #[diagnostic(code(E0409))]
    WeightsShape {
        layer: String,
        reason: String,
        #[label("{reason}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// `pad=same` with an even (effective) kernel cannot pad both sides equally.
    ///
    /// `same` pads `dilation*(kernel-1)/2` on each side, which needs
    /// `dilation*(kernel-1)` to be even.
    #[error("`{layer}`: pad=same needs an odd kernel, but kernel {kernel} with dilation {dilation} spans {span_px} pixels")]
    #[diagnostic(code(E0410))]
    SameEvenKernel {
        layer: String,
        kernel: u64,
        dilation: u64,
        span_px: u64,
        #[label("cannot pad evenly")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A tensor in the model would be too large (more than 2^31 elements per image,
    /// or more than 2^31 parameters in one layer).
    #[error("`{layer}` is too large: {what}")]
    #[diagnostic(code(E0411), help("reduce the channels, kernel or input size"))]
    TooLarge {
        layer: String,
        what: String,
        #[label("{what}")]
        span: SourceSpan,
    },

    // ------------------------------------------------------------------ train
    /// A `train` setting that cnnc does not know.
    ///
    /// Settings: data, augment, batch, epochs, loss, optimizer, schedule, clip,
    /// checkpoint, on_nonfinite, seed.
    #[error("unknown train setting `{key}`")]
    #[diagnostic(code(E0501))]
    UnknownSetting {
        key: String,
        #[label("unknown setting")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// The same `train` setting is given twice.
    #[error("train setting `{key}` is given twice")]
    #[diagnostic(code(E0502))]
    DuplicateSetting {
        key: String,
        #[label("again here")]
        span: SourceSpan,
        #[label("first here")]
        first: SourceSpan,
    },

    /// A `train` section without a setting that has no default (`data`, `optimizer`).
    #[error("the train section needs `{key}`")]
    #[diagnostic(code(E0503))]
    MissingSetting {
        key: String,
        #[label("no `{key}` in this section")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// The data set's images do not have the shape of the model's input.
    ///
    /// Example: `mnist(...)` gives `[1, 28, 28]` images, but the model declares
    /// `input image: [3, 32, 32]`.
    #[error("the data gives {data} images but the model's input is {model}")]
    #[diagnostic(code(E0504))]
    DataShape {
        data: String,
        model: String,
        #[label("{data} images")]
        span: SourceSpan,
        #[label("model input {model}")]
        input_span: Option<SourceSpan>,
        #[help]
        help: Option<String>,
    },

    /// The model's last layer does not give one score per class of the data.
    ///
    /// Example: `linear(12)` at the end of a model trained on 10-class MNIST.
    #[error("the model gives {got} class scores but the data has {classes} classes")]
    #[diagnostic(code(E0505))]
    ClassCount {
        got: u64,
        classes: u64,
        #[label("{got} outputs")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// Cross-entropy needs the model to end in a vector of class scores `[K]`.
    ///
    /// Fix: end the model with `global_avg_pool` (or `flatten`) and `linear(K)`.
    #[error("the model ends with shape {shape}, but the loss needs class scores [classes]")]
    #[diagnostic(code(E0506))]
    OutputNotScores {
        shape: String,
        #[label("last layer gives {shape}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// An augmentation that cannot apply to the model's input: a crop larger than
    /// the image (before padding), or normalisation statistics with the wrong
    /// number of channels.
    #[error("{message}")]
    #[diagnostic(code(E0507))]
    Augment {
        message: String,
        #[label("{label}")]
        span: SourceSpan,
        label: String,
        #[help]
        help: Option<String>,
    },

    // ------------------------------------------------------------------ explain
    /// A CAM target must be a convolutional feature map that the model then reduces
    /// with `global_avg_pool` followed directly by a `linear` layer: CAM weighs the
    /// target's channels with that linear layer's weights.
    ///
    /// Fix: point `layer=` at the last conv block before `global_avg_pool`, or use
    /// `gradcam`, which works on any spatial feature map.
    #[error("`{layer}` cannot be a CAM target: {reason}")]
    #[diagnostic(code(E0601))]
    CamTarget {
        layer: String,
        reason: String,
        #[label("{reason}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A Grad-CAM target must be a spatial feature map `[C, H, W]`, not a vector.
    #[error(
        "`{layer}` cannot be a Grad-CAM target: its output {shape} is not a spatial feature map"
    )]
    #[diagnostic(
        code(E0602),
        help("choose a conv, norm, activation or pooling layer before global_avg_pool/flatten")
    )]
    GradcamTarget {
        layer: String,
        shape: String,
        #[label("output is {shape}")]
        span: SourceSpan,
    },

    /// A sample selection that selects nothing or uses negative indices.
    ///
    /// Example: `on test[16..0]`; ranges are half-open `start..end` with
    /// `start < end`.
    #[error("bad sample selection: {reason}")]
    #[diagnostic(code(E0603))]
    Selection {
        reason: String,
        #[label("{reason}")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// `class=INDEX` names a class the model does not have.
    #[error("class {index} is out of range: the model has {classes} classes (0 to {last})", last = classes.saturating_sub(1))]
    #[diagnostic(code(E0604))]
    ClassIndex {
        index: i64,
        classes: u64,
        #[label("no such class")]
        span: SourceSpan,
    },

    /// Explanations read samples from the data set of the `train` section; without
    /// one there is nothing to explain.
    #[error("explain needs data, but there is no `train` section with `data`")]
    #[diagnostic(
        code(E0605),
        help("add `train {{ data = mnist(\"data/mnist-5k\") … }}`")
    )]
    ExplainNoData {
        #[label("no data to take samples from")]
        span: SourceSpan,
    },

    /// Two explain directives write to the same output folder.
    #[error("two directives write to `{path}`")]
    #[diagnostic(code(E0606))]
    DuplicateOutput {
        path: String,
        #[label("second")]
        span: SourceSpan,
        #[label("first")]
        first: SourceSpan,
        #[help]
        help: Option<String>,
    },

    // ------------------------------------------------- run time (`cnnc run`)
    /// A training step computed a value that is not a finite number (NaN or
    /// ±infinity), so its update would wreck the weights.
    ///
    /// After every step `cnnc run` checks that the loss and the global gradient
    /// norm are finite. When they are not, the step is replayed (same batch,
    /// parameters and dropout seed) on the reference interpreter, and the first
    /// op whose output holds NaN or ±inf — in forward order, then backward — is
    /// reported on the layer it belongs to, with its output shape and the range
    /// of its inputs. Typical causes: a learning rate so large that the weights
    /// overflow (`inf` in a conv or linear layer), a division by zero (a
    /// batchnorm over a constant channel whose `eps` is too small for f32), huge
    /// `weights=` literals.
    ///
    /// What happens next is `on_nonfinite` in the `train` section: `abort` (the
    /// default) stops the run with exit code 1, keeping the checkpoints written
    /// so far; `skip(max=N)` drops the step's update (weights, optimizer state and
    /// running statistics stay as they were) and aborts after more than N
    /// skipped steps.
    ///
    /// Fix: lower `lr`, add `clip = norm(1.0)`, raise `eps`, or remove what the
    /// diagnostic points at.
    #[error("step {step} (epoch {epoch}): `{op}` of `{layer}` produced {what} ({phase})")]
    #[diagnostic(code(E0701))]
    NonFinite {
        step: u64,
        epoch: u64,
        op: String,
        layer: String,
        /// `NaN`, `inf`, `NaN and inf`.
        what: String,
        /// `forward`, `backward`, or `a parameter`.
        phase: String,
        #[label("{label}")]
        span: SourceSpan,
        label: String,
        #[help]
        help: Option<String>,
    },
}

/// Warnings: the model is valid but probably not what was meant.
#[derive(Clone, Debug, Error, Diagnostic, PartialEq)]
pub enum Lint {
    /// A conv with a bias feeds straight into a batch or group norm, which
    /// subtracts the mean and so cancels the bias: its parameters are wasted.
    ///
    /// Fix: `conv(…, bias=false)` before a norm.
    #[error("the bias of `{layer}` is cancelled by the `{norm}` after it")]
    #[diagnostic(
        code(W0001),
        severity(Warning),
        help("write `bias=false` on `{layer}`")
    )]
    BiasBeforeNorm {
        layer: String,
        norm: String,
        #[label("bias has no effect")]
        span: SourceSpan,
    },

    /// The window of a strided conv or pool does not reach the last rows or
    /// columns of its input: `(in + 2*pad - dilation*(kernel-1) - 1) mod stride`
    /// pixels are never read (PyTorch drops them silently too).
    #[error("`{layer}` never reads the last {}{dim} of its {size}-pixel input", if *dropped == 1 { String::new() } else { format!("{dropped} ") })]
    #[diagnostic(code(W0002), severity(Warning))]
    DroppedPixels {
        layer: String,
        dropped: u64,
        dim: String,
        size: u64,
        #[label("{arithmetic}")]
        span: SourceSpan,
        arithmetic: String,
        #[help]
        help: Option<String>,
    },

    /// A block defined in a file with a model is never used.
    #[error("block `{name}` is never used")]
    #[diagnostic(
        code(W0003),
        severity(Warning),
        help("use it in the model or remove it")
    )]
    UnusedBlock {
        name: String,
        #[label("defined here")]
        span: SourceSpan,
    },

    /// `frozen` on a layer without parameters does nothing.
    #[error("`frozen` has no effect on `{layer}`: it has no parameters")]
    #[diagnostic(code(W0004), severity(Warning), help("remove `frozen`"))]
    FrozenNothing {
        layer: String,
        #[label("nothing to freeze")]
        span: SourceSpan,
    },

    /// A block in a library file (a file with blocks and no model) has no
    /// `example` line, so `cnnc check` cannot check its shapes.
    ///
    /// Fix: add `example NAME(args) on [C, H, W]` after the block.
    #[error("block `{name}` has no `example`, so its shapes are not checked")]
    #[diagnostic(code(W0005), severity(Warning))]
    NoExample {
        name: String,
        #[label("no example")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A block parameter that the block's body never uses.
    #[error("parameter `{name}` of block `{block}` is never used")]
    #[diagnostic(
        code(W0006),
        severity(Warning),
        help("use it in the body or remove it")
    )]
    UnusedParam {
        name: String,
        block: String,
        #[label("unused")]
        span: SourceSpan,
    },

    /// A layer's gradient is vanishing: its L2 norm has stayed tiny next to the
    /// norm of its weights (`|g|/|w| < 1e-6`, or exactly zero) for the last five
    /// gradient-health measurements of `cnnc run`, so the layer barely learns.
    ///
    /// Raised while training (never by `cnnc check`). The norms are per layer
    /// (all its trainable tensors), before clipping; `metrics.jsonl` holds them.
    /// Typical causes: a ReLU whose inputs are all negative ("dead" units: the
    /// gradient is exactly 0), a saturated sigmoid or tanh, a deep stack without
    /// normalisation or residual connections, a tiny frozen layer downstream.
    ///
    /// Fix: normalise (`batchnorm`), use residual connections, `leaky_relu`, a
    /// better initialisation, or a larger learning rate for this part.
    #[error("the gradient of `{layer}` is vanishing: |g|/|w| = {ratio} over the last {count} measurements")]
    #[diagnostic(code(W0007), severity(Warning))]
    VanishingGradient {
        layer: String,
        /// The last ratio, formatted.
        ratio: String,
        count: usize,
        #[label("this layer's gradient is {ratio} of its weights")]
        span: SourceSpan,
        #[help]
        help: Option<String>,
    },

    /// A layer's gradient is exploding: its L2 norm grew at each of the last
    /// five gradient-health measurements of `cnnc run` and by at least 100×
    /// overall, or the clip policy fired on more than half of an epoch's steps
    /// (this layer having the largest gradient).
    ///
    /// Raised while training (never by `cnnc check`). Growing gradients usually
    /// end in non-finite values (E0701); a clip that fires on almost every step
    /// means the gradients are always larger than its limit, so the learning
    /// rate is in effect lowered.
    ///
    /// Fix: lower `lr` (or add warm-up), add `clip = norm(1.0)`, normalise the
    /// layer's input (`batchnorm`); for a clip that always fires, raise its limit.
    #[error("the gradient of `{layer}` is exploding: {evidence}")]
    #[diagnostic(code(W0008), severity(Warning))]
    ExplodingGradient {
        layer: String,
        /// What was seen (the growth, or the clip's firing rate).
        evidence: String,
        #[label("gradient norm {norm} here")]
        span: SourceSpan,
        norm: String,
        #[help]
        help: Option<String>,
    },
}
