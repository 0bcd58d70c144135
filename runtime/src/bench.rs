//! `cnnc bench`: how fast a backend trains and runs a model, on synthetic batches
//! of the file's batch size (no data files are read).
//!
//! Measured: the compile time (for the interpreter: building the training graph
//! — lowering and autodiff — and the inference graph at the batch size), the first
//! training step on its own, then `--warmup` untimed and `--steps` timed full
//! training steps through [`train::train_step`], the same code path as `cnnc run`
//! (backend forward, loss and backward, clip, optimizer update, running
//! statistics), then inference (`Backend::eval`) at the batch size. Also reported:
//! the process's peak resident memory and the instruction-set extensions found at
//! run time. Data loading and augmentation are not part of a step (the PyTorch
//! yardstick, `bench/torch_baseline.py`, also times one fixed batch).
//!
//! Per-kernel times are not measured: the interpreter's op loop lives in the
//! compiler crate and has no timing hook; the JIT backend will report them.

use crate::backend::{Backend, Interpreter, Jit};
use crate::data::Batch;
use crate::optim::Optimizer;
use crate::params::Params;
use crate::train::{self, BackendKind, Engine, RunError, StepPlan};
use cnnc_compiler::checked::{CheckedModel, Loss, TrainConfig};
use cnnc_compiler::codegen::exec::Executable;
use cnnc_compiler::codegen::plan::StepKind;
use cnnc_compiler::ir::lower::{eval_graph, train_graph};
use cnnc_compiler::params::param_specs;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// What to measure.
pub struct BenchOptions {
    /// Timed training steps (and timed inference batches).
    pub steps: usize,
    /// Untimed steps after the first one, before the timed ones.
    pub warmup: usize,
    /// The backend and the threads asked for (the interpreter runs on one).
    pub engine: Engine,
    /// Also time the saliency and CAM of one image.
    pub explain: bool,
}

/// Median, fastest and slowest of a series of times, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `ms` (not empty); the median of an even count is the mean
    /// of the two middle values, as in Python's `statistics.median`.
    pub fn of(ms: &[f64]) -> Spread {
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The instruction-set extensions of this CPU (found at run time), and what the
/// backend makes of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Isa {
    pub arch: &'static str,
    pub avx: bool,
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    /// What the backend's code uses.
    pub used: String,
}

impl Isa {
    pub fn detect(backend: BackendKind) -> Isa {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        let (avx, avx2, fma, avx512f) = (
            std::arch::is_x86_feature_detected!("avx"),
            std::arch::is_x86_feature_detected!("avx2"),
            std::arch::is_x86_feature_detected!("fma"),
            std::arch::is_x86_feature_detected!("avx512f"),
        );
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let (avx, avx2, fma, avx512f) = (false, false, false, false);
        let used = match backend {
            // The JIT's kernels are generated for the flags Cranelift detects on
            // this CPU (checked when the JIT starts); their matrix products call
            // the GEMM microkernel chosen at run time.
            BackendKind::Jit => {
                let cl = match cnnc_compiler::codegen::Jit::new() {
                    Ok(j) => {
                        let f32x4 = if j.isa().native_fma {
                            "f32x4 + fma"
                        } else {
                            "f32x4, no native fma"
                        };
                        format!("cranelift {f32x4} ({})", j.isa().summary())
                    }
                    Err(e) => format!("cranelift unavailable: {e}"),
                };
                format!(
                    "{cl}, gemm microkernel {}",
                    cnnc_compiler::codegen::gemm::sgemm_kernel_name()
                )
            }
            // The interpreter's loops are compiled for the target's baseline
            // (features enabled at compile time); its matrix products go through
            // matrixmultiply, which picks its sgemm kernel at run time (fma+avx2,
            // else avx, else portable; its avx512 kernel is a cargo feature this
            // build does not enable).
            BackendKind::Interp => {
                let baseline: Vec<&str> = [
                    ("sse2", cfg!(target_feature = "sse2")),
                    ("avx", cfg!(target_feature = "avx")),
                    ("avx2", cfg!(target_feature = "avx2")),
                    ("fma", cfg!(target_feature = "fma")),
                    ("avx512f", cfg!(target_feature = "avx512f")),
                    ("neon", cfg!(target_feature = "neon")),
                ]
                .iter()
                .filter(|f| f.1)
                .map(|f| f.0)
                .collect();
                let gemm = if fma && avx2 {
                    "fma+avx2"
                } else if avx {
                    "avx"
                } else {
                    "portable"
                };
                let baseline = if baseline.is_empty() {
                    "portable".to_string()
                } else {
                    baseline.join("+")
                };
                format!("interpreter loops {baseline} (compile time), matrixmultiply sgemm {gemm}")
            }
        };
        Isa {
            arch: std::env::consts::ARCH,
            avx,
            avx2,
            fma,
            avx512f,
            used,
        }
    }
}

/// What `cnnc bench` measured; `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: &'static str,
    /// Threads the backend ran on.
    pub threads: usize,
    pub threads_requested: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Building the backend's executable form of the graphs at the batch size.
    pub compile_ms: f64,
    /// The first training step (untimed in `train_step_ms`; a backend that builds
    /// lazily builds here).
    pub first_step_ms: f64,
    /// Full training steps: forward, loss, backward, clip, update, running stats.
    pub train_step_ms: Spread,
    /// Inference on one batch of `batch` images.
    pub infer_ms: Spread,
    /// Training images per second at the median step.
    pub train_images_per_sec: f64,
    /// Inference images per second at the median batch.
    pub infer_images_per_sec: f64,
    /// The JIT's arenas (training and inference executables at the batch size):
    /// every buffer of a step, laid out by lifetime; `null` for the interpreter.
    pub arena_bytes: Option<u64>,
    /// Peak resident memory of the process (Linux `VmHWM`); `null` elsewhere.
    pub peak_bytes: Option<u64>,
    /// Time per training-graph kernel (JIT only), slowest first, from a separate
    /// profiled series of steps.
    pub kernels: Vec<KernelTime>,
    pub isa: Isa,
    /// Loss of the last timed step (a sanity check: finite).
    pub last_loss: f32,
    /// With `--explain`: one image's saliency and CAM.
    pub explain: Option<ExplainTimes>,
}

/// The time to explain one image (batch 1) for its predicted class: the
/// forward pass that picks the class, the method's graph, the map (max over
/// channels; CAM's weighted sum, ReLU and bilinear upsampling to the input).
#[derive(Clone, Debug, Serialize)]
pub struct ExplainTimes {
    pub saliency_ms: Spread,
    /// `null` when the model does not end with `global_avg_pool` then `linear`.
    pub cam_ms: Option<Spread>,
    /// The layer CAM reads: the map fed to `global_avg_pool`.
    pub cam_layer: Option<String>,
}

/// One kernel (step) of the JIT's training executable.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    /// `k3 batchnorm+relu @bn1`
    pub name: String,
    /// How it runs: `jit items`, `jit reduce`, `native gemm …`, `ref interpreter`.
    pub kind: String,
    /// Median over the profiled steps.
    pub ms: f64,
    /// GFLOP/s at that time, for kernels that count their work.
    pub gflops: Option<f64>,
}

/// A backend kept concretely, for what only the JIT reports.
enum Built {
    Interp(Interpreter),
    Jit(Jit),
}

impl Built {
    fn engine(&mut self) -> &mut dyn Backend {
        match self {
            Built::Interp(b) => b,
            Built::Jit(b) => b,
        }
    }
}

/// Builds the backend and times its compilation at batch size `n`.
///
/// The interpreter builds its graphs lazily, on its first call; the same build
/// (the training graph with autodiff, and the inference graph) is timed here on
/// its own, and the backend repeats it during the first, separately reported,
/// step. A compiling backend (the JIT) adds its arm here and times its compile.
fn build(
    engine: Engine,
    model: &CheckedModel,
    cfg: &TrainConfig,
    n: usize,
) -> Result<(Built, f64), RunError> {
    let Loss::CrossEntropy { smoothing } = cfg.loss;
    let t0 = Instant::now();
    Ok(match engine.kind {
        BackendKind::Interp => {
            let graphs = (train_graph(model, n, smoothing), eval_graph(model, n));
            let ms = ms_since(t0);
            drop(graphs);
            (Built::Interp(Interpreter::new(model, smoothing)), ms)
        }
        BackendKind::Jit => {
            let mut jit = Jit::new(model, smoothing, engine.threads).with_checks(engine.checked);
            jit.train_executable(n).map_err(train::backend_error)?;
            jit.eval_executable(n).map_err(train::backend_error)?;
            (Built::Jit(jit), ms_since(t0))
        }
    })
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// One synthetic batch of `n` images of `shape`: pixels uniform in `[0, 1)`,
/// labels `0, 1, …, classes-1, 0, 1, …`.
pub fn synthetic_batch(shape: &[u64], classes: u64, n: usize, seed: u64) -> Batch {
    let per: usize = shape.iter().map(|&d| d as usize).product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = (0..n * per)
        .map(|_| (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32))
        .collect();
    let classes = classes.max(1);
    Batch {
        x,
        labels: (0..n as u64).map(|i| (i % classes) as u32).collect(),
        indices: (0..n).collect(),
        n,
    }
}

/// Peak resident memory of this process in bytes (`VmHWM` of
/// `/proc/self/status`), or `None` where that is not available.
pub fn peak_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Measures `model` with the settings of its `train` section (batch size,
/// optimizer, clip policy, loss) on synthetic data.
pub fn run(
    model: &CheckedModel,
    train: Option<&TrainConfig>,
    opts: &BenchOptions,
) -> Result<BenchReport, RunError> {
    let cfg = train.ok_or(RunError::NoTrain)?;
    let n = usize::try_from(cfg.batch).unwrap_or(usize::MAX);
    let Loss::CrossEntropy { smoothing } = cfg.loss;
    let available = crate::memory::available_bytes();
    if let Some(why) = crate::memory::too_big(model, cfg, cfg.batch, available) {
        return Err(RunError::OutOfMemory(why));
    }
    train::check_jit_limits(opts.engine, n, || train_graph(model, n, smoothing))?;
    let classes = model.shape(model.output()).first().copied().unwrap_or(1);
    let batch = synthetic_batch(&model.input, classes, n, cfg.seed);
    let specs = param_specs(model);
    let mut params: Params = Params::init(&specs, cfg.seed)?;
    let mut opt = Optimizer::new(&cfg.optimizer, &specs);
    let plan = StepPlan::new(&params, &cfg.clip);
    let lr = opt.base_lr() as f32;
    let (mut built, compile_ms) = build(opts.engine, model, cfg, n)?;
    let engine = built.engine();

    let mut seed = 0u32;
    let mut step = |engine: &mut dyn Backend,
                    params: &mut Params,
                    opt: &mut Optimizer|
     -> Result<(f64, f32), RunError> {
        let t0 = Instant::now();
        let s = train::train_step(engine, params, opt, &plan, &batch, seed, lr)?;
        seed = seed.wrapping_add(1) % (1 << 24);
        Ok((ms_since(t0), s.loss))
    };
    let (first_step_ms, _) = step(engine, &mut params, &mut opt)?;
    for _ in 0..opts.warmup {
        step(engine, &mut params, &mut opt)?;
    }
    let mut train_ms = Vec::with_capacity(opts.steps);
    let mut last_loss = f32::NAN;
    for _ in 0..opts.steps {
        let (ms, loss) = step(engine, &mut params, &mut opt)?;
        train_ms.push(ms);
        last_loss = loss;
    }

    let mut infer = || -> Result<f64, RunError> {
        let t0 = Instant::now();
        engine
            .eval(&params, &batch.x, &batch.labels, n)
            .map_err(train::backend_error)?;
        Ok(ms_since(t0))
    };
    // The first call builds the inference graph (interpreter); then warm-up.
    for _ in 0..=opts.warmup {
        infer()?;
    }
    let infer_ms = (0..opts.steps)
        .map(|_| infer())
        .collect::<Result<Vec<f64>, RunError>>()?;

    let (kernels, arena_bytes) = match &mut built {
        Built::Interp(_) => (Vec::new(), None),
        Built::Jit(jit) => {
            let exe = jit.train_executable(n).map_err(train::backend_error)?;
            let kernels = kernel_times(exe, opts.steps.clamp(3, 20));
            let train_arena = exe.plan().peak_bytes() as u64;
            let eval_arena = jit
                .eval_executable(n)
                .map_err(train::backend_error)?
                .plan()
                .peak_bytes() as u64;
            (kernels, Some(train_arena + eval_arena))
        }
    };

    let explain = if opts.explain {
        Some(explain_times(model, &params, opts)?)
    } else {
        None
    };

    let train_step_ms = Spread::of(&train_ms);
    let infer_ms = Spread::of(&infer_ms);
    let per_sec = |ms: f64| n as f64 / (ms / 1e3).max(1e-12);
    Ok(BenchReport {
        model: model.name.clone(),
        backend: opts.engine.kind.name(),
        threads: opts.engine.effective_threads(),
        threads_requested: opts.engine.threads,
        batch: n,
        steps: opts.steps,
        warmup: opts.warmup,
        compile_ms,
        first_step_ms,
        train_images_per_sec: per_sec(train_step_ms.median),
        infer_images_per_sec: per_sec(infer_ms.median),
        train_step_ms,
        infer_ms,
        arena_bytes,
        peak_bytes: peak_bytes(),
        kernels,
        isa: Isa::detect(opts.engine.kind),
        last_loss,
        explain,
    })
}

/// Times saliency and CAM of one synthetic image (after a compiling first call
/// and the warm-up).
fn explain_times(
    model: &CheckedModel,
    params: &Params,
    opts: &BenchOptions,
) -> Result<ExplainTimes, RunError> {
    use crate::explain::{methods, runner::Runner};
    use cnnc_compiler::checked::Method;
    let x = synthetic_batch(&model.input, 1, 1, 1).x;
    let shape = [
        model.input[0] as usize,
        model.input.get(1).copied().unwrap_or(1) as usize,
        model.input.get(2).copied().unwrap_or(1) as usize,
    ];
    let mut runner = Runner::new(model, opts.engine);
    let mut time = |method: &Method| -> Result<Spread, RunError> {
        let mut once = || -> Result<f64, RunError> {
            let t0 = Instant::now();
            methods::explain_predicted(&mut runner, params, method, &x, shape)
                .map_err(train::backend_error)?;
            Ok(ms_since(t0))
        };
        for _ in 0..=opts.warmup {
            once()?;
        }
        let ms = (0..opts.steps)
            .map(|_| once())
            .collect::<Result<Vec<f64>, RunError>>()?;
        Ok(Spread::of(&ms))
    };
    let saliency_ms = time(&Method::Saliency)?;
    let target = methods::default_cam_target(model);
    let cam_ms = match target {
        Some(layer) => Some(time(&Method::Cam { layer })?),
        None => None,
    };
    Ok(ExplainTimes {
        saliency_ms,
        cam_ms,
        cam_layer: target.map(|t| model.layers[t.0 - 1].name.clone()),
    })
}

/// The report as a short block of text for people.
pub fn human(r: &BenchReport) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let memory = match r.peak_bytes {
        Some(b) => format!("{:.1} MiB (VmHWM)", b as f64 / (1024.0 * 1024.0)),
        None => "unavailable on this system".to_string(),
    };
    let mut s = format!(
        "bench `{}`: {} backend, {} thread{}, batch {}, {} timed steps after {} untimed\n",
        r.model,
        r.backend,
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        r.batch,
        r.steps,
        r.warmup + 1,
    );
    if r.threads_requested != r.threads {
        s.push_str(&format!(
            "  note: {} threads asked for; the {} backend runs on {}\n",
            r.threads_requested, r.backend, r.threads
        ));
    }
    s.push_str(&format!(
        "  compile      {:9.2} ms  (first training step {:.2} ms)\n",
        r.compile_ms, r.first_step_ms
    ));
    s.push_str(&format!(
        "  train step   {:9.2} ms median  (min {:.2}, max {:.2})  {:.0} images/s\n",
        r.train_step_ms.median, r.train_step_ms.min, r.train_step_ms.max, r.train_images_per_sec
    ));
    s.push_str(&format!(
        "  inference    {:9.2} ms median  (min {:.2}, max {:.2})  {:.0} images/s\n",
        r.infer_ms.median, r.infer_ms.min, r.infer_ms.max, r.infer_images_per_sec
    ));
    if let Some(e) = &r.explain {
        s.push_str(&format!(
            "  saliency     {:9.3} ms median  (min {:.3}, max {:.3})  one image, predicted class\n",
            e.saliency_ms.median, e.saliency_ms.min, e.saliency_ms.max
        ));
        match (&e.cam_ms, &e.cam_layer) {
            (Some(c), Some(l)) => s.push_str(&format!(
                "  cam          {:9.3} ms median  (min {:.3}, max {:.3})  one image, layer `{l}`\n",
                c.median, c.min, c.max
            )),
            _ => s.push_str("  cam          not measured: the model does not end with global_avg_pool then linear\n"),
        }
    }
    s.push_str(&format!("  peak memory  {memory}\n"));
    s.push_str(&format!(
        "  isa          {}: avx {}, avx2 {}, fma {}, avx512f {}; {}\n",
        r.isa.arch,
        yes(r.isa.avx),
        yes(r.isa.avx2),
        yes(r.isa.fma),
        yes(r.isa.avx512f),
        r.isa.used
    ));
    if let Some(a) = r.arena_bytes {
        s.push_str(&format!(
            "  arena        {:.1} MiB (training + inference executables)\n",
            a as f64 / (1024.0 * 1024.0)
        ));
    }
    if r.kernels.is_empty() {
        s.push_str("  per-kernel   not measured by the interpreter\n");
    } else {
        let total: f64 = r.kernels.iter().map(|k| k.ms).sum();
        s.push_str(&format!(
            "  per-kernel   training step, median of profiled steps (sum {total:.2} ms):\n"
        ));
        for k in &r.kernels {
            let gf = k
                .gflops
                .map_or(String::new(), |g| format!("{g:6.1} GFLOP/s"));
            s.push_str(&format!(
                "    {:>8.3} ms {:>5.1}%  {:<44} {:<22} {gf}\n",
                k.ms,
                100.0 * k.ms / total.max(1e-12),
                k.name,
                k.kind
            ));
        }
    }
    s
}

/// Per-step medians of `runs` profiled runs of `exe` (its inputs are those of
/// the last training step), slowest first.
fn kernel_times(exe: &mut Executable, runs: usize) -> Vec<KernelTime> {
    let count = exe.plan().steps.len();
    let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); count];
    for _ in 0..runs {
        exe.set_profiling(true);
        exe.run();
        for (i, d) in exe.profile().unwrap_or_default().iter().enumerate() {
            per[i].push(d.as_secs_f64() * 1e3);
        }
    }
    exe.set_profiling(false);
    let mut out: Vec<KernelTime> = exe
        .plan()
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let ms = Spread::of(&per[i]).median;
            let (kind, flops) = match &st.kind {
                StepKind::Jit(k) => (
                    format!("jit {:?}", k.par()).to_lowercase(),
                    k.flops_per_item() * k.work() as u64,
                ),
                StepKind::Native(nat) => (nat.label(), nat.flops()),
            };
            let layer = st
                .layer
                .as_deref()
                .map_or(String::new(), |l| format!(" @{l}"));
            KernelTime {
                name: format!("k{i} {}{layer}", st.ops),
                kind,
                ms,
                gflops: (flops > 1_000_000 && ms > 0.0).then(|| flops as f64 / (ms * 1e6)),
            }
        })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    out
}
