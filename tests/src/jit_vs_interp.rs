//! Fuzz target body `jit_vs_interp`: bytes → a valid model ([`crate::gen`]) →
//! one graph (usually the training step: loss, correct count, every parameter
//! gradient, the running-statistics updates; sometimes the evaluation or the
//! input-gradient graph) → the same random inputs and parameters on the JIT
//! executable and on the reference interpreter, in f32 and in f64. Every named
//! output must agree within a tolerance relative to its scale (f32: 5e-4,
//! f64: 1e-9, of `max(1, max |x|)`, as `compiler/tests/exec.rs`); a
//! disagreement panics with the model's text.
//!
//! Rounding differs between the backends, so a value that lies next to a
//! kink can fall on different sides of it: a ReLU input near 0, two nearly
//! equal maxima in a max-pool window, two nearly equal logits. Where the
//! interpreter's values show such a near tie (closer than 1e-4 of the tensor's
//! scale in f32, 1e-9 in f64), the outputs that depend on which side it falls
//! (the gradients, the correct count) are not compared; the forward values
//! still are, since they are continuous there.

use crate::frontend;
use crate::gen::{self, Generated, Which};
use cnnc_compiler::codegen::exec::{Executable, ThreadPool};
use cnnc_compiler::codegen::{DType, Elem};
use cnnc_compiler::interp::{self, Tensor, Values};
use cnnc_compiler::ir::lower::{eval_graph, input_grad_graph, train_graph};
use cnnc_compiler::ir::{verify, Act, Graph, Op, Role, Vid};
use cnnc_compiler::pipeline::check_text;
use ndarray::{ArrayD, IxDyn};
use std::fmt::Write as _;
use std::sync::OnceLock;

/// Runs the model `data` describes on both backends and panics on a
/// disagreement.
pub fn jit_vs_interp(data: &[u8]) {
    run_model(&gen::model(data));
}

/// The model `data` describes and how it is run, for reproducing a failure.
pub fn describe(data: &[u8]) -> String {
    let g = gen::model(data);
    format!(
        "{:?} graph, batch {}, {} thread(s), smoothing {}, seed {}\n{}",
        g.which, g.batch, g.threads, g.smoothing, g.seed, g.text
    )
}

/// Checks, lowers and runs one generated model on both backends.
pub fn run_model(model: &Generated) {
    let fe = check_text("generated.cnn", &model.text);
    assert!(
        !fe.has_errors(),
        "the generator made a model the checker refuses (one of their shape rules is wrong):\n{}\n{}",
        model.text,
        frontend::rendered(&fe)
    );
    let m = fe.files[0]
        .checked
        .as_ref()
        .and_then(|c| c.model.clone())
        .expect("a checked model");
    let g = match model.which {
        Which::Train => train_graph(&m, model.batch, model.smoothing),
        Which::Eval => eval_graph(&m, model.batch),
        Which::InputGrad => input_grad_graph(&m, model.batch),
    };
    if let Err(errs) = verify::verify(&g) {
        panic!(
            "the {:?} graph fails verification: {errs:#?}\n{}",
            model.which, model.text
        );
    }
    let feeds = feeds(&g, model);
    compare::<f32>(&g, model, &feeds, Tolerance::F32);
    compare::<f64>(&g, model, &feeds, Tolerance::F64);
}

/// A shared pool per thread count (starting threads for every input would
/// dominate the run time).
fn pool(threads: usize) -> &'static ThreadPool {
    static POOLS: OnceLock<Vec<ThreadPool>> = OnceLock::new();
    let pools = POOLS.get_or_init(|| {
        (1..=2)
            .map(|t| ThreadPool::new(t).expect("start worker threads"))
            .collect()
    });
    &pools[threads.clamp(1, pools.len()) - 1]
}

/// xorshift64*, uniform in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self) -> f64 {
        2.0 * self.next() - 1.0
    }
}

/// Inputs, parameters and buffers of `g` (in f64; each backend rounds them
/// to its type): images uniform in [-1, 1), conv and linear weights scaled by
/// `1/sqrt(fan_in)` so that values keep their size through the layers, norm
/// scales around 1, running variances positive, labels and classes cycling
/// over the classes, the dropout seed a small integer.
fn feeds(g: &Graph, model: &Generated) -> Vec<(Vid, Vec<f64>)> {
    let mut rng = Rng(model.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        let n: usize = v.shape.iter().product();
        let name = v.name.as_str();
        let data: Vec<f64> = match v.role {
            Role::Temp => continue,
            Role::Input if name == "labels" || name == "class" => (0..n)
                .map(|k| ((k as u64 + model.seed) % model.classes) as f64)
                .collect(),
            Role::Input if name == "seed" => vec![(model.seed % 1000) as f64],
            Role::Buffer if name.ends_with("running_var") => {
                (0..n).map(|_| 0.5 + rng.next()).collect()
            }
            Role::Param if name.ends_with(".weight") && v.shape.len() >= 2 => {
                let fan_in: usize = v.shape[1..].iter().product();
                let s = (3.0 / fan_in as f64).sqrt();
                (0..n).map(|_| s * rng.uniform()).collect()
            }
            Role::Param if name.ends_with(".weight") => (0..n).map(|_| 0.5 + rng.next()).collect(),
            _ => (0..n).map(|_| rng.uniform()).collect(),
        };
        out.push((Vid(i), data));
    }
    out
}

/// How close the backends must be, and what counts as a near tie.
#[derive(Clone, Copy)]
struct Tolerance {
    /// Outputs agree within `agree * max(1, max |x|)`.
    agree: f64,
    /// Values closer than `tie * scale` to a kink are near ties.
    tie: f64,
}

impl Tolerance {
    const F32: Tolerance = Tolerance {
        agree: 5e-4,
        tie: 1e-4,
    };
    const F64: Tolerance = Tolerance {
        agree: 1e-9,
        tie: 1e-9,
    };
}

/// The element types compared, with conversions to and from f64.
trait Num: Elem {
    fn of_f64(x: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl Num for f32 {
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Num for f64 {
    fn of_f64(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Where values sit next to a kink, by what they make unreliable.
#[derive(Default)]
struct Ties {
    /// A ReLU input or max-pool window: every gradient.
    gradients: Option<String>,
    /// Two logits of a row: the correct count.
    argmax: Option<String>,
}

impl Ties {
    /// Whether output `name` can differ between the backends without a bug.
    fn excuses(&self, name: &str) -> Option<&str> {
        if name.starts_with("grad:") {
            self.gradients.as_deref()
        } else if name == "correct" {
            self.argmax.as_deref()
        } else {
            None
        }
    }
}

fn values_f64<T: Num>(t: &Tensor<T>) -> Vec<f64> {
    t.iter().map(|&x| x.as_f64()).collect()
}

fn scale_of(xs: &[f64]) -> f64 {
    xs.iter()
        .filter(|x| x.is_finite())
        .fold(0.0, |m, x| m.max(x.abs()))
}

/// The near ties among the interpreter's values `vals` of `g`.
fn near_ties<T: Num>(g: &Graph, vals: &Values<T>, tie: f64) -> Ties {
    let mut ties = Ties::default();
    for node in &g.nodes {
        let x = node.inputs.first().map(|&v| vals.get(v));
        match (&node.op, x) {
            (Op::Act(Act::Relu | Act::LeakyRelu(_)), Some(x)) if ties.gradients.is_none() => {
                let xs = values_f64(x);
                let eps = tie * scale_of(&xs);
                if let Some(v) = xs.iter().find(|v| **v != 0.0 && v.abs() <= eps) {
                    ties.gradients = Some(format!(
                        "{} input {v:e} is near 0 (layer {:?})",
                        node.op.name(),
                        node.layer
                    ));
                }
            }
            (Op::MaxPool(p), Some(x)) if ties.gradients.is_none() => {
                let shape = x.shape().to_vec();
                let xs = values_f64(x);
                let eps = tie * scale_of(&xs);
                let out = g.shape(node.outputs[0]);
                let (h, w) = (shape[2], shape[3]);
                'planes: for plane in 0..shape[0] * shape[1] {
                    let base = plane * h * w;
                    for oy in 0..out[2] {
                        for ox in 0..out[3] {
                            let mut top = [f64::NEG_INFINITY; 2];
                            for ky in 0..p.kernel[0] {
                                for kx in 0..p.kernel[1] {
                                    let y = (oy * p.stride[0] + ky).checked_sub(p.pad[0]);
                                    let xx = (ox * p.stride[1] + kx).checked_sub(p.pad[1]);
                                    let (Some(y), Some(xx)) = (y, xx) else {
                                        continue;
                                    };
                                    if y >= h || xx >= w {
                                        continue;
                                    }
                                    let v = xs[base + y * w + xx];
                                    if v > top[0] {
                                        top = [v, top[0]];
                                    } else if v > top[1] {
                                        top[1] = v;
                                    }
                                }
                            }
                            let [a, b] = top;
                            if b.is_finite() && a - b <= eps && !(a == b && a == 0.0) {
                                ties.gradients = Some(format!(
                                    "a max-pool window has maxima {a:e} and {b:e} (layer {:?})",
                                    node.layer
                                ));
                                break 'planes;
                            }
                        }
                    }
                }
            }
            (Op::CountCorrect, Some(x)) if ties.argmax.is_none() => {
                let k = x.shape()[1];
                let xs = values_f64(x);
                let eps = tie * scale_of(&xs).max(1.0);
                for row in xs.chunks(k) {
                    let mut sorted = row.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    if sorted.len() > 1 && sorted[0] - sorted[1] <= eps {
                        ties.argmax = Some(format!(
                            "two logits {:e} and {:e} of a row are nearly equal",
                            sorted[0], sorted[1]
                        ));
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    ties
}

/// Whether `a` (the JIT's) and `b` (the interpreter's) agree: both finite and
/// within `tol`, or the same non-finite value.
fn agree(a: f64, b: f64, tol: f64) -> bool {
    if a.is_finite() && b.is_finite() {
        (a - b).abs() <= tol
    } else {
        a == b || (a.is_nan() && b.is_nan())
    }
}

/// Runs `g` in `T` on both backends with `feeds` and compares every output.
fn compare<T: Num>(g: &Graph, model: &Generated, feeds: &[(Vid, Vec<f64>)], tol: Tolerance) {
    let dtype = match T::DTYPE {
        DType::F32 => "f32",
        DType::F64 => "f64",
    };
    let what = format!(
        "{:?} graph in {dtype}, batch {}, {} thread(s), smoothing {}, seed {}",
        model.which, model.batch, model.threads, model.smoothing, model.seed
    );
    let typed: Vec<(Vid, Vec<T>)> = feeds
        .iter()
        .map(|(v, d)| (*v, d.iter().map(|&x| T::of_f64(x)).collect()))
        .collect();
    let tensors: Vec<(Vid, Tensor<T>)> = typed
        .iter()
        .map(|(v, d)| {
            let t = ArrayD::from_shape_vec(IxDyn(g.shape(*v)), d.clone()).expect("feed shape");
            (*v, t)
        })
        .collect();
    let want = interp::run(g, tensors)
        .unwrap_or_else(|e| panic!("{what}: the interpreter refuses: {e}\n{}", model.text));
    let ties = near_ties(g, &want, tol.tie);

    let mut exe = Executable::with_dtype(g, pool(model.threads), T::DTYPE)
        .unwrap_or_else(|e| panic!("{what}: the JIT refuses the graph: {e}\n{}", model.text));
    for (v, d) in &typed {
        let name = &g.values[v.0].name;
        if exe.has_feed(name) {
            exe.feed_typed(name, d)
                .unwrap_or_else(|e| panic!("{what}: feeding `{name}`: {e}"));
        }
    }
    // Twice: the second run must not depend on what the first left behind.
    exe.run();
    exe.run();

    let mut report = String::new();
    for (name, v) in &g.outputs {
        let w = values_f64(want.get(*v));
        let got: Vec<f64> = exe
            .get_typed::<T>(name)
            .unwrap_or_else(|| panic!("{what}: the JIT has no output `{name}`\n{}", model.text))
            .iter()
            .map(|&x| x.as_f64())
            .collect();
        assert_eq!(got.len(), w.len(), "{what}: length of `{name}`");
        if ties.excuses(name).is_some() {
            continue;
        }
        let scale = scale_of(&w).max(1.0);
        let bad: Vec<usize> = (0..w.len())
            .filter(|&i| !agree(got[i], w[i], tol.agree * scale))
            .collect();
        if bad.is_empty() {
            continue;
        }
        let _ = writeln!(
            report,
            "`{name}` {:?}: {} of {} values differ (scale {scale:e}, tolerance {:e}):",
            g.shape(*v),
            bad.len(),
            w.len(),
            tol.agree * scale
        );
        for &i in bad.iter().take(4) {
            let _ = writeln!(
                report,
                "    [{i}] jit {:e} vs interpreter {:e}",
                got[i], w[i]
            );
        }
    }
    if !report.is_empty() {
        let skipped: Vec<&str> = [ties.gradients.as_deref(), ties.argmax.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        panic!(
            "JIT and interpreter disagree ({what}):\n{report}near ties: {skipped:?}\nmodel:\n{}",
            model.text
        );
    }
}
