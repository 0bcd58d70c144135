//! The executable: a planned graph with its kernels compiled into one JIT module,
//! one arena holding every buffer, and a thread pool. Running it is one pass over
//! the steps; a step's work range (the batch) is split across the threads.
//! Reduction kernels run on fixed chunks of the batch whose partial sums are
//! added in chunk order afterwards, so the results are the same, bit for bit,
//! on any number of threads.
//!
//! The buffer-pointer table of every (step, thread) is built once, when the
//! arena is allocated, so a run does no allocation and no lookups.
//!
//! An executable computes in f32 ([`Executable::new`], [`Executable::with_pool`])
//! or, for gradient checks, in f64 ([`Executable::with_dtype`]): the same plan
//! (buffer offsets and lengths count elements), every kernel compiled for the
//! element type, the arena holding that type, and the native steps run on it;
//! [`Executable::feed_f64`] and [`Executable::get_f64`] move f64 data.
//!
//! Checked ([`ExecOptions::checked`], or `CNNC_CHECKED` set): every kernel
//! bounds-checks its loads and stores (see `check.rs`), the buffers of every
//! native step are checked against the arena, and a run stops after the first
//! step with a violation: [`Executable::try_run`] returns it, naming the kernel,
//! its layer and the buffer; [`Executable::run`] panics with it (a bug in cnnc).

use super::check::{self, BoundsViolation, Fault};
use super::plan::{reduce_chunks, BufRole, Plan, StepKind};
use super::{DType, Elem, Jit, KernelFn, OptLevel, Par};
use crate::ir::Graph;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Worker threads, shareable between executables (cloning shares the threads).
#[derive(Clone)]
pub struct ThreadPool {
    threads: usize,
    /// `None` for one thread: kernels run on the caller's thread.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl ThreadPool {
    pub fn new(threads: usize) -> Result<ThreadPool, String> {
        let threads = threads.max(1);
        let pool = if threads > 1 {
            let p = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("cnnc-worker-{i}"))
                .build()
                .map_err(|e| format!("starting {threads} threads: {e}"))?;
            Some(Arc::new(p))
        } else {
            None
        };
        Ok(ThreadPool { threads, pool })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// The pointers one kernel call receives (inputs, outputs, scratch).
struct Table(Vec<*mut f32>);

// SAFETY: the pointers address disjoint parts of the executable's arena (or the
// same read-only inputs); the executable hands each thread its own table and
// joins every thread before the next step, so no buffer is written by two
// threads or read while written.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

/// Elements a tensor may have for the JIT: byte offsets inside a tensor are
/// 32-bit immediates in the generated loads and stores.
pub const MAX_ELEMENTS: usize = (1 << 29) - 1;

/// Why `g` cannot run on the JIT, when it cannot: its first tensor with more
/// than [`MAX_ELEMENTS`] elements, named with its layer.
pub fn too_large(g: &Graph) -> Option<String> {
    let v = g
        .values
        .iter()
        .enumerate()
        .find(|(_, v)| v.shape.iter().product::<usize>() > MAX_ELEMENTS)?;
    let layer = g
        .nodes
        .iter()
        .find(|n| {
            n.outputs.contains(&crate::ir::Vid(v.0)) || n.inputs.contains(&crate::ir::Vid(v.0))
        })
        .and_then(|n| n.layer.clone())
        .map_or(String::new(), |l| format!(" (layer `{l}`)"));
    Some(format!(
        "`{}`{layer} has shape {:?}: {} numbers, more than the JIT's limit of {} per tensor",
        v.1.name,
        v.1.shape,
        v.1.shape.iter().product::<usize>(),
        MAX_ELEMENTS
    ))
}

/// The name of step `si`'s kernel: `k3_conv2d_bias_add_relu`.
pub fn kernel_name(si: usize, ops: &str) -> String {
    format!("k{si}_{}", ops.replace('+', "_"))
}

/// How to build an [`Executable`].
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// The element type of every buffer (f32; f64 for gradient checks).
    pub dtype: DType,
    /// Bounds-check every generated load and store (on anyway when
    /// `CNNC_CHECKED` is set).
    pub checked: bool,
    /// A deliberate miscompile of one kernel, for tests of the checks
    /// (`Fault::kernel` is the step's kernel name, `k{step}_{ops}`).
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

pub struct Executable {
    plan: Plan,
    jit: Jit,
    /// Per step: the kernel's entry point (`None` for native steps).
    funcs: Vec<Option<KernelFn>>,
    /// Per step, per thread.
    tables: Vec<Vec<Table>>,
    /// The element type of every buffer.
    dtype: DType,
    /// Storage for `plan.arena_len` elements of `dtype` from `base` (8-byte
    /// words, so aligned for either type).
    arena: Vec<f64>,
    /// Index (in `dtype` elements) of the arena's first 64-byte aligned element.
    base: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    profile: Option<Vec<Duration>>,
    compile_time: Duration,
}

impl Executable {
    /// Plans `g` for `threads` threads (a pool of its own) and compiles its
    /// kernels.
    pub fn new(g: &Graph, threads: usize) -> Result<Executable, String> {
        Executable::with_pool(g, &ThreadPool::new(threads)?)
    }

    /// Like [`Executable::new`], running on a pool shared with other executables
    /// (one model's training and inference graphs at several batch sizes).
    pub fn with_pool(g: &Graph, pool: &ThreadPool) -> Result<Executable, String> {
        Executable::with_dtype(g, pool, DType::F32)
    }

    /// Like [`Executable::with_pool`], computing in `dtype`: with
    /// [`DType::F64`] every kernel and native step runs in f64 (for gradient
    /// checks), fed with [`Executable::feed_f64`] and read with
    /// [`Executable::get_f64`].
    pub fn with_dtype(g: &Graph, pool: &ThreadPool, dtype: DType) -> Result<Executable, String> {
        let opts = ExecOptions {
            dtype,
            ..ExecOptions::default()
        };
        Executable::with_options(g, pool, &opts)
    }

    /// Like [`Executable::with_pool`], with every choice in `opts`.
    pub fn with_options(
        g: &Graph,
        pool: &ThreadPool,
        opts: &ExecOptions,
    ) -> Result<Executable, String> {
        let dtype = opts.dtype;
        let t0 = Instant::now();
        let threads = pool.threads;
        let plan = Plan::new(g, threads);
        // `none`: the kernels are emitted already shaped (hoisted constants,
        // interleaved FMAs) and the egraph pass of `speed` undoes some of it;
        // measured on this machine (cnnc bench, 1 thread, 2 runs each): M1 13.7-14.1
        // ms at `none` vs 13.8-13.9 at `speed`, M3 113-114 ms vs 120-186, and
        // compiling is ~20% faster.
        let mut jit = Jit::with_opt_level(OptLevel::None)?;
        if opts.checked {
            jit.set_checked(true);
        }
        jit.set_fault(opts.fault.clone().or_else(Fault::from_env));
        let mut funcs = Vec::with_capacity(plan.steps.len());
        for (i, s) in plan.steps.iter().enumerate() {
            funcs.push(match &s.kind {
                StepKind::Jit(spec) => {
                    let name = kernel_name(i, &s.ops);
                    let id = jit.compile_dtype(&name, spec.clone(), dtype)?;
                    // SAFETY: the pointer lives as long as `jit`, which the
                    // executable owns; it is only called with the step's buffers.
                    Some(unsafe { jit.raw(id) })
                }
                StepKind::Native(_) => None,
            });
        }
        let bytes = dtype.bytes();
        let arena = vec![0f64; ((plan.arena_len + 16) * bytes).div_ceil(8)];
        let base = (arena.as_ptr() as usize).wrapping_neg() % 64 / bytes;
        let pool = pool.pool.clone();
        let mut exe = Executable {
            plan,
            jit,
            funcs,
            tables: Vec::new(),
            dtype,
            arena,
            base,
            pool,
            profile: None,
            compile_time: Duration::ZERO,
        };
        exe.build_tables();
        exe.compile_time = t0.elapsed();
        Ok(exe)
    }

    /// The address of element `at` (of the executable's type) of the arena.
    fn elem_ptr(&mut self, at: usize) -> *mut u8 {
        let root = self.arena.as_mut_ptr() as *mut u8;
        // SAFETY: callers pass `base + offset` of a buffer, whose elements lie
        // inside the arena (layout guarantees offset + len <= arena_len).
        unsafe { root.add(at * self.dtype.bytes()) }
    }

    fn build_tables(&mut self) {
        if self.jit.checked() {
            self.check_plan();
        }
        let root = self.elem_ptr(0);
        let bytes = self.dtype.bytes();
        let ptr = |plan: &Plan, b: usize| -> *mut f32 {
            // SAFETY: every buffer lies inside the arena (layout guarantees
            // offset + len <= arena_len).
            unsafe { root.add((self.base + plan.bufs[b].offset) * bytes) as *mut f32 }
        };
        let mut tables = Vec::with_capacity(self.plan.steps.len());
        let threads = self.plan.threads;
        for s in &self.plan.steps {
            // Reductions: one table per chunk (its partials; the scratch of the
            // thread that runs it, `c % threads`). Other kernels: one per thread.
            let reduce = matches!(&s.kind, StepKind::Jit(k) if k.par() == Par::Reduce);
            let count = if reduce {
                s.partials.len() + 1
            } else {
                threads
            };
            let mut per = Vec::with_capacity(count);
            for c in 0..count {
                let mut v: Vec<*mut f32> = Vec::with_capacity(s.args.len() + 1);
                for (j, &b) in s.args.iter().enumerate() {
                    let b = if reduce && j >= s.n_in && c > 0 {
                        s.partials[c - 1][j - s.n_in]
                    } else {
                        b
                    };
                    v.push(ptr(&self.plan, b));
                }
                if let Some(&b) = s.scratch.get(c % threads) {
                    v.push(ptr(&self.plan, b));
                }
                per.push(Table(v));
            }
            tables.push(per);
        }
        self.tables = tables;
    }

    /// Checked mode: every buffer lies inside the arena, and every kernel's
    /// table holds buffers of the lengths it was compiled for (what its bounds
    /// checks assume). A failure is a bug in the planner.
    fn check_plan(&self) {
        let p = &self.plan;
        for b in &p.bufs {
            assert!(
                b.offset + b.len() <= p.arena_len,
                "checked JIT: buffer `{}` ({} elements at {}) ends past the arena ({})",
                b.name,
                b.len(),
                b.offset,
                p.arena_len
            );
        }
        for (si, s) in p.steps.iter().enumerate() {
            let StepKind::Jit(k) = &s.kind else { continue };
            let lens: Vec<usize> = k
                .inputs()
                .iter()
                .chain(&k.outputs())
                .map(|sh| sh.iter().product())
                .collect();
            let outs = s
                .partials
                .iter()
                .flatten()
                .zip(lens[s.n_in..].iter().cycle());
            for (&b, &len) in s.args.iter().zip(&lens).chain(outs) {
                assert_eq!(
                    p.bufs[b].len(),
                    len,
                    "checked JIT: step {si} ({}): buffer `{}` is not of the kernel's length",
                    s.ops,
                    p.bufs[b].name
                );
            }
            for &b in &s.scratch {
                assert_eq!(
                    p.bufs[b].len(),
                    k.scratch(),
                    "checked JIT: step {si} scratch"
                );
            }
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn jit(&self) -> &Jit {
        &self.jit
    }

    /// Time spent planning and compiling.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    pub fn threads(&self) -> usize {
        self.plan.threads
    }

    /// Whether the graph reads a feed of this name.
    pub fn has_feed(&self, name: &str) -> bool {
        self.plan.feeds.iter().any(|(n, _)| n == name)
    }

    /// The element type the executable computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Copies `data` into the input, parameter or buffer `name` (an f32
    /// executable).
    pub fn feed(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        self.feed_typed(name, data)
    }

    /// [`Executable::feed`] for an f64 executable.
    pub fn feed_f64(&mut self, name: &str, data: &[f64]) -> Result<(), String> {
        self.feed_typed(name, data)
    }

    /// [`Executable::feed`] in the executable's element type.
    pub fn feed_typed<T: Elem>(&mut self, name: &str, data: &[T]) -> Result<(), String> {
        if T::DTYPE != self.dtype {
            return Err(format!(
                "`{name}` is fed {} numbers, the executable computes in {}",
                T::DTYPE.name(),
                self.dtype.name()
            ));
        }
        let b = self
            .plan
            .feeds
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| *b)
            .ok_or_else(|| format!("the graph has no input `{name}`"))?;
        let buf = &self.plan.bufs[b];
        if data.len() != buf.len() {
            return Err(format!(
                "`{name}` is fed {} numbers, its shape {:?} holds {}",
                data.len(),
                buf.shape,
                buf.len()
            ));
        }
        let (at, len) = (self.base + buf.offset, buf.len());
        let dst = self.elem_ptr(at) as *mut T;
        // SAFETY: the buffer's `len` elements of type T lie inside the arena,
        // which is borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(dst, len) }.copy_from_slice(data);
        Ok(())
    }

    /// A named graph output after [`Executable::run`] (or any feed), of an f32
    /// executable (`None` for an f64 one: see [`Executable::get_f64`]).
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.get_typed(name)
    }

    /// [`Executable::get`] for an f64 executable (`None` for an f32 one).
    pub fn get_f64(&self, name: &str) -> Option<&[f64]> {
        self.get_typed(name)
    }

    /// [`Executable::get`] in the executable's element type (`None` for the
    /// other type).
    pub fn get_typed<T: Elem>(&self, name: &str) -> Option<&[T]> {
        if T::DTYPE != self.dtype {
            return None;
        }
        let b = self.plan.buf(name)?;
        let buf = &self.plan.bufs[b];
        let at = self.base + buf.offset;
        let root = self.arena.as_ptr() as *const u8;
        // SAFETY: the buffer's elements of type T lie inside the arena (the
        // element size is the executable's), borrowed shared with `self`.
        Some(unsafe {
            std::slice::from_raw_parts(root.add(at * self.dtype.bytes()) as *const T, buf.len())
        })
    }

    /// Starts (or stops) timing every step; times add up over runs.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| vec![Duration::ZERO; self.plan.steps.len()]);
    }

    /// Time per step since profiling started.
    pub fn profile(&self) -> Option<&[Duration]> {
        self.profile.as_deref()
    }

    /// Runs every step once. Panics on a bounds violation (checked mode only):
    /// a bug in cnnc; [`Executable::try_run`] returns it instead.
    pub fn run(&mut self) {
        if let Err(v) = self.try_run() {
            panic!("{v}");
        }
    }

    /// Runs every step once; in checked mode, stops after the first step with a
    /// bounds violation and returns it (the outputs are then undefined).
    pub fn try_run(&mut self) -> Result<(), BoundsViolation> {
        let checked = self.jit.checked();
        for si in 0..self.plan.steps.len() {
            let t0 = self.profile.is_some().then(Instant::now);
            self.run_step(si);
            if let (Some(t0), Some(p)) = (t0, self.profile.as_mut()) {
                p[si] += t0.elapsed();
            }
            if checked {
                if let Some(v) = self.violation(si) {
                    return Err(v);
                }
            }
        }
        Ok(())
    }

    /// The violation step `si`'s kernel reported, if any, with the planned
    /// buffer's name.
    fn violation(&self, si: usize) -> Option<BoundsViolation> {
        let (_, raw) = self.jit.take_violation()?;
        let s = &self.plan.steps[si];
        let StepKind::Jit(k) = &s.kind else {
            unreachable!("only kernels report violations")
        };
        let (n_in, n_out) = (k.inputs().len(), k.outputs().len());
        let b = raw.buffer as usize;
        let buf = if b < n_in + n_out {
            s.args.get(b)
        } else {
            s.scratch.first()
        };
        let (name, len) = buf.map_or((String::new(), 0), |&b| {
            (
                format!(" `{}`", self.plan.bufs[b].name),
                self.plan.bufs[b].len(),
            )
        });
        Some(BoundsViolation {
            kernel: kernel_name(si, &s.ops),
            layer: s.layer.clone(),
            buffer: b,
            buffer_desc: format!("{}{name}", check::role(b, n_in, n_out)),
            len,
            dtype: self.dtype,
            offset: raw.offset,
            size: raw.size,
        })
    }

    fn run_step(&mut self, si: usize) {
        let step = &self.plan.steps[si];
        match &step.kind {
            StepKind::Native(_) => match self.dtype {
                DType::F32 => self.run_native::<f32>(si),
                DType::F64 => self.run_native::<f64>(si),
            },
            StepKind::Jit(spec) => {
                let f = self.funcs[si].expect("jit steps have a kernel");
                let work = spec.work();
                let par = spec.par();
                let tables = &self.tables[si];
                // Units of work: chunks of a reduction (fixed, see
                // `REDUCE_CHUNKS`), else one contiguous range per thread.
                let (size, units) = match par {
                    Par::Reduce => reduce_chunks(work),
                    Par::Whole => (work, 1),
                    Par::Items => {
                        let t = self.plan.threads.min(work).max(1);
                        (work.div_ceil(t), t)
                    }
                };
                let threads = self.plan.threads.min(units);
                // Thread t runs units t, t + threads, …
                let call = |t: usize| {
                    for u in (t..units).step_by(threads) {
                        let (a, z) = (u * size, ((u + 1) * size).min(work));
                        if a < z {
                            // SAFETY: the table holds the step's buffers (unit
                            // u's partials, thread t's scratch), of the kernel's
                            // shapes; a..z is inside the work range.
                            unsafe { f(tables[u].0.as_ptr(), a as i64, z as i64) }
                        }
                    }
                };
                // The calling thread computes its share while the pool's workers
                // take the others (one hand-off fewer than `scope`: M1 at 2
                // threads 8.0-8.2 -> 7.7-7.9 ms median, alternating runs).
                match (&self.pool, threads) {
                    (Some(pool), t) if t > 1 => pool.in_place_scope(|s| {
                        for t in 1..threads {
                            s.spawn(move |_| call(t));
                        }
                        call(0);
                    }),
                    _ => call(0),
                }
                if par == Par::Reduce && units > 1 {
                    self.add_partials(si, units, size, work);
                }
            }
        }
    }

    /// Runs native step `si` on the arena's buffers, of element type `T`.
    fn run_native<T: Elem>(&mut self, si: usize) {
        let step = &self.plan.steps[si];
        let StepKind::Native(n) = &step.kind else {
            unreachable!("a native step")
        };
        let base = self.base;
        let bufs = &self.plan.bufs;
        let arena = self.arena.as_mut_ptr() as *mut T;
        let slice = |b: usize| {
            let buf = &bufs[b];
            // SAFETY: buffers of one step never overlap (their lifetimes
            // intersect at this step), and each lies inside the arena, whose
            // elements are of type T.
            unsafe { std::slice::from_raw_parts_mut(arena.add(base + buf.offset), buf.len()) }
        };
        let ins: Vec<&[T]> = step.args[..step.n_in].iter().map(|&b| &*slice(b)).collect();
        let mut outs: Vec<&mut [T]> = step.args[step.n_in..].iter().map(|&b| slice(b)).collect();
        n.run(&ins, &mut outs);
    }

    /// Adds the partial outputs of chunks 1.. to chunk 0's, in chunk order.
    fn add_partials(&mut self, si: usize, chunks: usize, size: usize, work: usize) {
        match self.dtype {
            DType::F32 => self.add_partials_typed::<f32>(si, chunks, size, work),
            DType::F64 => self.add_partials_typed::<f64>(si, chunks, size, work),
        }
    }

    fn add_partials_typed<T: Elem>(&mut self, si: usize, chunks: usize, size: usize, work: usize) {
        let step = &self.plan.steps[si];
        let arena = self.arena.as_mut_ptr() as *mut T;
        for (j, &out) in step.args[step.n_in..].iter().enumerate() {
            let dst = self.base + self.plan.bufs[out].offset;
            let len = self.plan.bufs[out].len();
            for c in (1..chunks).take_while(|c| c * size < work) {
                let part = step.partials[c - 1][j];
                debug_assert_eq!(self.plan.bufs[part].role, BufRole::Private);
                let src = self.base + self.plan.bufs[part].offset;
                // SAFETY: both buffers lie inside the arena and are live at this
                // step, so they do not overlap.
                let (d, p) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(arena.add(dst), len),
                        std::slice::from_raw_parts(arena.add(src), len),
                    )
                };
                d.iter_mut().zip(p).for_each(|(d, &p)| *d += p);
            }
        }
    }
}
