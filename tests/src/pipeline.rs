//! Fuzz target body `pipeline`: any bytes through every stage. The front end
//! (`check_text`) must keep its promises ([`crate::frontend::violations`]);
//! for a file that checks clean, every graph of its model is lowered, through
//! autodiff, and verified: training, evaluation and input gradient when the
//! model ends in class scores, and the graph of each `explain` directive
//! (features for CAM, the feature gradient for Grad-CAM); the models of
//! `example` lines too. A model small enough ([`Limits`]) then has its
//! training and evaluation graphs compiled by the JIT and run once on zeros
//! (running variances 1): every output must be finite, since with zero weights
//! every value is 0 or a constant.
//!
//! The limits keep the work per input bounded (no out-of-memory, no
//! minute-long compiles): the check stage's memory estimate, the
//! multiply-accumulates of a step, the number of layers; and the JIT's own
//! `too_large`.

use crate::frontend;
use cnnc_compiler::checked::{CheckedModel, ExplainDirective, Method};
use cnnc_compiler::codegen::exec::{too_large, Executable};
use cnnc_compiler::ir::lower::{
    cam_parts, eval_graph, feature_grad_graph, features_graph, input_grad_graph, train_graph,
};
use cnnc_compiler::ir::{verify, Graph, Role};
use cnnc_compiler::pipeline::check_text;
use cnnc_compiler::summary::estimate;

/// The name inputs are checked under: `std/…` imports resolve to the built-in
/// standard library, other imports relative to the current folder.
pub const INPUT_NAME: &str = "fuzz-input.cnn";

/// Bounds on the work done for one model.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Models with more layers are not lowered.
    pub lower_layers: usize,
    /// Models with more layers are not compiled.
    pub jit_layers: usize,
    /// The training-memory estimate (`summary::estimate`) at the training
    /// batch, in bytes.
    pub jit_bytes: u64,
    /// Multiply-accumulates of a training batch's forward pass.
    pub jit_macs: u64,
}

/// The limits of both the fuzz target and the bounded run in CI (a debug
/// build: the compiler crate unoptimised).
pub const LIMITS: Limits = Limits {
    lower_layers: 2000,
    jit_layers: 64,
    jit_bytes: 64 << 20,
    jit_macs: 30_000_000,
};

/// The training graph's batch; evaluation and explain graphs use 1.
pub const TRAIN_BATCH: usize = 2;

/// How far an input got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// The front end reported an error, or the file has no model.
    FrontEnd,
    /// Graphs lowered and verified; too big for the JIT (or no class scores).
    Lowered,
    /// Training and evaluation graphs compiled and run.
    Ran,
}

/// Runs `data` through every stage; panics when a stage breaks a promise.
pub fn pipeline(data: &[u8]) -> Reached {
    let text = String::from_utf8_lossy(data);
    let fe = check_text(INPUT_NAME, &text);
    let problems = frontend::violations(&fe);
    assert!(
        problems.is_empty(),
        "the front end broke its promises: {problems:#?}"
    );
    let Some(checked) = fe.files.first().and_then(|f| f.checked.as_ref()) else {
        return Reached::FrontEnd;
    };
    let mut reached = Reached::FrontEnd;
    if let Some(m) = &checked.model {
        reached = reached.max(model(m, &checked.explain, &text));
    }
    for ex in &checked.examples {
        reached = reached.max(model(&ex.model, &[], &text));
    }
    reached
}

/// Whether the model ends in class scores (`[K]`), as the loss needs.
fn scores(m: &CheckedModel) -> bool {
    m.shape(m.output()).len() == 1
}

fn model(m: &CheckedModel, explain: &[ExplainDirective], text: &str) -> Reached {
    if m.layers.len() > LIMITS.lower_layers {
        return Reached::FrontEnd;
    }
    let verified = |what: &str, g: Graph| -> Graph {
        if let Err(errs) = verify::verify(&g) {
            panic!(
                "the {what} graph of `{}` fails verification: {errs:#?}\n{text}",
                m.name
            );
        }
        g
    };
    let mut runnable = Vec::new();
    if scores(m) {
        runnable.push((
            "training",
            verified("training", train_graph(m, TRAIN_BATCH, 0.1)),
        ));
        runnable.push(("evaluation", verified("evaluation", eval_graph(m, 1))));
        verified("input-gradient", input_grad_graph(m, 1));
    }
    for d in explain {
        match d.method {
            Method::Saliency | Method::SmoothGrad { .. } | Method::IntegratedGradients { .. } => {
                verified("input-gradient", input_grad_graph(m, 1));
            }
            Method::Cam { layer } => {
                let (source, _) = cam_parts(m, layer).unwrap_or_else(|| {
                    panic!("the check stage accepted a CAM target with no path to global_avg_pool and linear\n{text}")
                });
                verified("features", features_graph(m, 1, source));
            }
            Method::GradCam { layer } => {
                verified("feature-gradient", feature_grad_graph(m, 1, layer));
            }
        }
    }
    if !scores(m) || !small_enough(m) {
        return Reached::Lowered;
    }
    for (what, g) in &runnable {
        if too_large(g).is_some() {
            return Reached::Lowered;
        }
        run_on_zeros(what, g, text);
    }
    Reached::Ran
}

fn small_enough(m: &CheckedModel) -> bool {
    let batch = TRAIN_BATCH as u64;
    let macs = m
        .layers
        .iter()
        .fold(0u64, |s, l| s.saturating_add(l.macs))
        .saturating_mul(batch);
    m.layers.len() <= LIMITS.jit_layers
        && macs <= LIMITS.jit_macs
        && estimate(m, batch, 0).total() <= LIMITS.jit_bytes
}

/// Compiles `g`, runs it once on zeros and checks that every output is finite.
fn run_on_zeros(what: &str, g: &Graph, text: &str) {
    let mut exe = Executable::new(g, 1)
        .unwrap_or_else(|e| panic!("the JIT refuses the {what} graph: {e}\n{text}"));
    for v in &g.values {
        if v.role == Role::Temp || !exe.has_feed(&v.name) {
            continue;
        }
        let n: usize = v.shape.iter().product();
        let x = if v.role == Role::Buffer && v.name.ends_with("running_var") {
            1.0
        } else {
            0.0
        };
        exe.feed(&v.name, &vec![x; n])
            .unwrap_or_else(|e| panic!("feeding `{}` of the {what} graph: {e}", v.name));
    }
    exe.run();
    for (name, _) in &g.outputs {
        let out = exe
            .get(name)
            .unwrap_or_else(|| panic!("the {what} graph's executable has no output `{name}`"));
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            panic!(
                "the {what} graph gives `{name}`[{i}] = {} on zeros\n{text}",
                out[i]
            );
        }
    }
}
