//! The `cnnc` command line's arguments (clap derive). What each subcommand does is
//! in `commands.rs`; this file is the contract scripts rely on.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const LONG_ABOUT: &str = "\
cnnc compiles declarative CNN model files (.cnn): it checks them, trains them on \
their data, evaluates saved weights, shows what each compiler stage made of them \
and explains its diagnostics.

Exit codes:
  0  success (warnings may have been printed)
  1  the input is wrong: diagnostics were printed
  2  usage error: unknown command, bad option or argument
  3  internal error: a bug in cnnc";

#[derive(Debug, Parser)]
#[command(name = "cnnc", version, about = "The .cnn model compiler", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// When to colour diagnostics: `auto` colours them when stderr is a terminal
    /// and NO_COLOR is not set.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    pub color: Color,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse, resolve and shape-check files; print each model's layer table, or
    /// every diagnostic.
    Check(CheckArgs),
    /// Check, compile and train a model on its data; evaluate it after every
    /// epoch; write metrics and checkpoints to the run folder.
    Run(RunArgs),
    /// Loss and accuracy of saved weights on a data set.
    Eval(EvalArgs),
    /// Run a file's `explain` directives on saved weights: heat maps, their
    /// evaluation and an HTML page, in a run folder's `explain/`.
    Explain(ExplainArgs),
    /// Time a model's training step, inference and compilation on synthetic
    /// batches of its batch size; report per-kernel times, memory and the CPU
    /// features used.
    Bench(BenchArgs),
    /// Show what a compiler stage produced for a file.
    Dump(DumpArgs),
    /// Print the long explanation of a diagnostic code (e.g. `E0401`).
    ExplainCode(ExplainCodeArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The `.cnn` files to check.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,

    /// `human`: diagnostics on stderr, layer tables on stdout. `json`: one JSON
    /// object per diagnostic per line on stdout, for editors and scripts.
    #[arg(long, value_enum, default_value_t = MessageFormat::Human)]
    pub message_format: MessageFormat,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The `.cnn` file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The run folder (default: `runs/<file name>`, or `runs/<file name>-2`, … if
    /// that exists). An existing, non-empty folder is refused unless --overwrite.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Allow --out to name a folder that already holds files.
    #[arg(long)]
    pub overwrite: bool,

    /// Train for this many epochs instead of the file's `epochs`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: Option<u64>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Start from these weights (a safetensors file with cnnc's / PyTorch's names)
    /// instead of a random initialisation.
    #[arg(long, value_name = "W.safetensors")]
    pub init: Option<PathBuf>,

    /// Continue an interrupted run from the newest complete checkpoint in its
    /// folder (--out DIR, default `runs/<file name>`), to the same weights, bit for
    /// bit, as a run never interrupted. Needs checkpoints: the train section's
    /// `checkpoint = every(epochs=N)`, or the `final` of a finished run (to train
    /// it longer with --epochs). A damaged checkpoint or one of another model is
    /// refused and nothing is written.
    #[arg(long, conflicts_with_all = ["overwrite", "init"])]
    pub resume: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The `.cnn` file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The weights to evaluate (e.g. `runs/mnist/checkpoints/final.safetensors`).
    #[arg(long, value_name = "CKPT")]
    pub weights: PathBuf,

    /// Evaluate on this data instead of the file's test split: `mnist:PATH` (its
    /// t10k files) or `folder:PATH` (one sub-folder per class).
    #[arg(long, value_name = "SPEC")]
    pub data: Option<String>,

    /// Print `{"accuracy": …, "loss": …, "n": …}`.
    #[arg(long)]
    pub json: bool,

    /// Also write the class scores of every evaluated image, in data order, to this
    /// NumPy file: float32 `[n, classes]`. The labels go beside it as int64 `[n]`
    /// in `OUT.labels.npy` (`x.npy` → `x.labels.npy`). Each file is written whole
    /// or not at all (a temporary file, then a rename).
    #[arg(long, value_name = "OUT.npy")]
    pub logits: Option<PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The `.cnn` file (its `explain` section says what to explain; its `train`
    /// section which data).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The weights to explain (e.g. `runs/shapes/checkpoints/final.safetensors`).
    /// They are only read.
    #[arg(long, value_name = "CKPT")]
    pub weights: PathBuf,

    /// The folder to write `explain/` into (default: `runs/<file name>-explain`,
    /// or `…-explain-2`, … if that exists). An existing, non-empty folder is
    /// refused unless --overwrite.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Allow --out to name a folder that already holds files.
    #[arg(long)]
    pub overwrite: bool,

    /// Skip the evaluation (pointing game, deletion/insertion, randomisation
    /// check): only the maps, images and page.
    #[arg(long)]
    pub no_evaluation: bool,

    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `--backend`, `--threads` and `--checked`, shared by the commands that run a
/// model.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// The engine that runs the graphs: `jit` (fused native kernels) or `interp`
    /// (the reference interpreter, single-threaded).
    #[arg(long, value_enum, default_value_t = crate::train::BackendKind::Jit)]
    pub backend: crate::train::BackendKind,

    /// Worker threads for the JIT backend [default: all cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// Bounds-check every load and store of the JIT's generated kernels (slower;
    /// for finding bugs in cnnc). A failed check stops with an internal error
    /// naming the kernel, the buffer and the layer. Also on when the environment
    /// variable CNNC_CHECKED=1 is set.
    #[arg(long)]
    pub checked: bool,
}

impl EngineArgs {
    pub fn engine(&self) -> crate::train::Engine {
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        crate::train::Engine {
            kind: self.backend,
            threads: self
                .threads
                .map_or(all, |t| usize::try_from(t).unwrap_or(all)),
            checked: self.checked,
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The `.cnn` file (its `train` section gives the batch size, optimizer,
    /// clip policy and loss; its data is not read).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Timed training steps (and timed inference batches).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub steps: u64,

    /// Untimed steps after the first one, before the timed ones.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub warmup: u64,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Also time the saliency map and the CAM of one image (batch 1, predicted
    /// class): `explain` in the JSON, `saliency_ms` and `cam_ms` as `{median,
    /// min, max}`.
    #[arg(long)]
    pub explain: bool,

    /// Print one JSON object: `train_step_ms` and `infer_ms` as `{median, min,
    /// max}`, `compile_ms`, `first_step_ms`, `peak_bytes` (null where unknown),
    /// `arena_bytes` and `kernels` (per-kernel times; JIT only), `backend`,
    /// `threads`, `batch`, `steps`, `isa`, images per second.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The stage whose output to show.
    #[arg(long, value_enum)]
    pub stage: Stage,

    /// The `.cnn` file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Threads the plan is made for (`plan`, `clif`) [default: all cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// `clif`: the kernels as `--checked` builds them, with a bounds check
    /// before every load and store.
    #[arg(long)]
    pub checked: bool,
}

#[derive(Debug, Args)]
pub struct ExplainCodeArgs {
    /// The code, as printed with a diagnostic (`E0401`, `W0002`; case does not
    /// matter).
    #[arg(value_name = "CODE", required_unless_present = "list")]
    pub code: Option<String>,

    /// List every code with a one-line title.
    #[arg(long, conflicts_with = "code")]
    pub list: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MessageFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// The stages `cnnc dump` knows, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// The syntax tree, one node per line with byte spans.
    Ast,
    /// The checked model (blocks expanded, every shape known), as JSON.
    Checked,
    /// The training graph IR before autodiff (forward pass and loss).
    Graph,
    /// The training graph after autodiff (with the backward pass).
    Grad,
    /// The JIT's plan of the training graph: fused steps, their buffers and
    /// arena offsets.
    Plan,
    /// The Cranelift IR of every kernel of the training graph, as generated.
    Clif,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ast => "ast",
            Stage::Checked => "checked",
            Stage::Graph => "graph",
            Stage::Grad => "grad",
            Stage::Plan => "plan",
            Stage::Clif => "clif",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        for code in ["0  success", "1  the input", "2  usage", "3  internal"] {
            assert!(help.contains(code), "missing `{code}` in:\n{help}");
        }
    }
}
