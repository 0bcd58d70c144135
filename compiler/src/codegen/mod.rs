//! The Cranelift JIT backend's foundation: a [`Jit`] owning one `JITModule`
//! (native ISA, `opt_level=speed`), and shape-specialised kernels compiled into it
//! (elementwise ReLU forward/backward and bias add; direct conv2d forward). The
//! fusion planner, backward conv kernels, threading and the runtime's `Backend`
//! come next (see ARCHITECTURE.md, "Stage: codegen").
//!
//! - `builder.rs`: the kernel-builder layer (rotated loops, addresses, flagged
//!   loads, f32x4 FMA);
//! - `check.rs`: the checked JIT (a bounds check on every load and store, and
//!   how a violation is reported);
//! - `elementwise.rs`: ReLU, ReLU mask, bias add;
//! - `conv.rs`: conv2d forward.
//!
//! Every kernel is `extern "C" fn(bufs: *const *mut f32, start: i64, end: i64)`:
//! `bufs` holds one pointer per buffer (the inputs, then the outputs, in the order
//! of [`KernelSpec::inputs`] and [`KernelSpec::outputs`]) and the call computes
//! batch items `start..end`, so the runtime can split a batch across threads.
//!
//! A kernel is compiled for one element type, [`DType`]: f32 (training and
//! inference) or f64 (gradient checks: the same kernels with f64/f64x2 values and
//! 8-byte elements, and `dgemm` for the matrix products; the buffers are then
//! `f64` although the ABI's pointer type says `f32`). Shapes, scratch sizes and
//! plans count elements, so they do not depend on the element type.

mod builder;
pub mod check;
pub mod conv;
pub mod depthwise;
pub mod elementwise;
pub mod exec;
pub mod gemm;
pub mod native;
pub mod norm;
pub mod optim;
pub mod plan;
pub mod pool;

use crate::ir::{Graph, Node, Shape};
use builder::Kb;
use cranelift_codegen::ir::UserFuncName;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::fmt::Write as _;
use std::ops::Range;

/// The element type a kernel (or a whole executable) computes in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// f32 values, f32x4 vectors: training and inference.
    #[default]
    F32,
    /// f64 values, f64x2 vectors: gradient checks (exactness, not speed).
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// Lanes of a 128-bit vector.
    pub fn lanes(self) -> usize {
        16 / self.bytes()
    }

    /// `f32` or `f64`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// The Cranelift scalar type.
    pub(crate) fn scalar(self) -> cranelift_codegen::ir::Type {
        match self {
            DType::F32 => cranelift_codegen::ir::types::F32,
            DType::F64 => cranelift_codegen::ir::types::F64,
        }
    }

    /// The Cranelift 128-bit vector type.
    pub(crate) fn vector(self) -> cranelift_codegen::ir::Type {
        match self {
            DType::F32 => cranelift_codegen::ir::types::F32X4,
            DType::F64 => cranelift_codegen::ir::types::F64X2,
        }
    }
}

/// The Rust element types of the kernels: `f32` and `f64`.
pub trait Elem: crate::interp::Scalar + std::ops::AddAssign + std::ops::SubAssign {
    const DTYPE: DType;

    /// `C = A·B` or `C += A·B` of this type ([`gemm::sgemm`] or
    /// [`gemm::dgemm`]).
    ///
    /// # Safety
    /// As for [`gemm::sgemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        c: *mut Self,
        ldc: isize,
        accumulate: u32,
    );
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        c: *mut f32,
        ldc: isize,
        accumulate: u32,
    ) {
        // SAFETY: the caller's contract is sgemm's.
        unsafe { gemm::sgemm(m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, accumulate) }
    }
}

impl Elem for f64 {
    const DTYPE: DType = DType::F64;
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        c: *mut f64,
        ldc: isize,
        accumulate: u32,
    ) {
        // SAFETY: the caller's contract is dgemm's (the same as sgemm's).
        unsafe { gemm::dgemm(m, n, k, a, rsa, csa, b, rsb, csb, c, ldc, accumulate) }
    }
}

/// The instruction-set features the JIT compiles for (detected on the host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsaInfo {
    /// `x86_64-unknown-linux-gnu`, …
    pub triple: String,
    pub has_avx: bool,
    pub has_avx2: bool,
    pub has_fma: bool,
    pub has_avx512f: bool,
    /// Whether Cranelift lowers `fma` to one instruction (x86: AVX and FMA).
    /// Without it the kernels use a multiply and an add.
    pub native_fma: bool,
    /// Every enabled boolean ISA flag (`has_sse41`, `has_avx2`, …).
    pub flags: Vec<String>,
}

impl IsaInfo {
    /// One line for logs and `cnnc bench`: the triple and the SIMD features.
    pub fn summary(&self) -> String {
        let yes = |b: bool, s: &str| {
            if b {
                format!(" +{s}")
            } else {
                format!(" -{s}")
            }
        };
        format!(
            "{}{}{}{}{}",
            self.triple,
            yes(self.has_avx, "avx"),
            yes(self.has_avx2, "avx2"),
            yes(self.has_fma, "fma"),
            yes(self.has_avx512f, "avx512f"),
        )
    }
}

/// Cranelift's optimisation level.
///
/// Measured on the M1-like conv (batch 64, 16→32, 14×14, k3 p1; one core, AVX2):
/// `Speed` ran the conv kernel at ~15.5 GFLOP/s, `None` at ~26.5. The egraph
/// pass of `Speed` re-places pure instructions (FMAs, `can_move` loads) depth
/// first from their uses, so the hand-interleaved tile (one tap's loads, then its
/// `OB × NV` FMAs) becomes one accumulator's whole chain at a time, with every
/// operand live at once and spilled. `Speed` stays the default until the kernels
/// are reshaped for it (or the choice is made per kernel with two modules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptLevel {
    None,
    Speed,
}

/// How a kernel's work splits across threads. The work range `start..end` passed
/// to a kernel is a sub-range of `0..KernelSpec::work()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Each batch item's outputs depend only on that item: any split of the batch
    /// computes the same result.
    Items,
    /// The outputs are sums over batch items: a call overwrites its outputs with
    /// the partial sums over its range, and the caller adds the partials of a
    /// split (each thread writes private copies).
    Reduce,
    /// One call over the whole tensor (`work() == 1`).
    Whole,
}

/// What every kernel family (one module each) tells the JIT about its kernels.
pub(crate) trait Emit {
    /// The input buffers' shapes, in buffer order.
    fn inputs(&self) -> Vec<Shape>;
    /// The output buffers' shapes, in buffer order (after the inputs).
    fn outputs(&self) -> Vec<Shape>;
    /// Elements of scratch one call needs (the last buffer, after the outputs;
    /// one per thread), whatever the element type. Its contents are undefined on
    /// entry.
    fn scratch(&self) -> usize {
        0
    }
    fn par(&self) -> Par {
        Par::Items
    }
    /// Floating-point operations per unit of work (a multiply-add counts 2).
    fn flops_per_item(&self) -> u64;
    /// Refuses shapes the emitter cannot handle (checked before emitting).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    /// Emits the kernel's body into `kb` (the entry block is current).
    fn emit(&self, kb: &mut Kb);
}

/// What a kernel computes; every shape includes the batch (axis 0). One variant
/// per kernel family (module).
#[derive(Clone, Debug, PartialEq)]
pub enum KernelSpec {
    Elem(elementwise::ElemKernel),
    Conv(conv::ConvKernel),
    Depthwise(depthwise::DepthwiseKernel),
    Norm(norm::NormKernel),
    Pool(pool::PoolKernel),
    Optim(optim::OptimKernel),
}

impl KernelSpec {
    /// The kernel computing one graph node on its own, when there is one.
    pub fn from_node(g: &Graph, node: &Node) -> Option<KernelSpec> {
        elementwise::ElemKernel::from_node(g, node)
            .map(KernelSpec::Elem)
            .or_else(|| depthwise::DepthwiseKernel::from_node(g, node).map(KernelSpec::Depthwise))
            .or_else(|| conv::ConvKernel::from_node(g, node).map(KernelSpec::Conv))
            .or_else(|| norm::NormKernel::from_node(g, node).map(KernelSpec::Norm))
            .or_else(|| pool::PoolKernel::from_node(g, node).map(KernelSpec::Pool))
    }

    fn emitter(&self) -> &dyn Emit {
        match self {
            KernelSpec::Elem(k) => k,
            KernelSpec::Conv(k) => k,
            KernelSpec::Depthwise(k) => k,
            KernelSpec::Norm(k) => k,
            KernelSpec::Pool(k) => k,
            KernelSpec::Optim(k) => k,
        }
    }

    /// The input buffers' shapes, in buffer order.
    pub fn inputs(&self) -> Vec<Shape> {
        self.emitter().inputs()
    }

    /// The output buffers' shapes, in buffer order (after the inputs).
    pub fn outputs(&self) -> Vec<Shape> {
        self.emitter().outputs()
    }

    /// Elements of per-call scratch (the buffer after the outputs).
    pub fn scratch(&self) -> usize {
        self.emitter().scratch()
    }

    pub fn par(&self) -> Par {
        self.emitter().par()
    }

    /// The size of the work range: the batch, or 1 for [`Par::Whole`] kernels.
    pub fn work(&self) -> usize {
        match self.par() {
            Par::Whole => 1,
            Par::Items | Par::Reduce => self.inputs()[0][0],
        }
    }

    /// Floating-point operations per unit of work (a multiply-add counts 2).
    pub fn flops_per_item(&self) -> u64 {
        self.emitter().flops_per_item()
    }

    fn validate(&self) -> Result<(), String> {
        let e = self.emitter();
        e.validate()?;
        for s in e.inputs().iter().chain(&e.outputs()) {
            if s.contains(&0) {
                return Err(format!("unsupported shape {s:?} for {self:?}"));
            }
            // Byte offsets inside a tensor must fit the loads' 32-bit immediates.
            if s.iter().product::<usize>() >= (1 << 29) {
                return Err(format!("tensor {s:?} is too large for the JIT (2 GiB)"));
            }
        }
        if e.scratch() >= 1 << 29 {
            return Err(format!("scratch of {self:?} is too large for the JIT"));
        }
        Ok(())
    }
}

/// A compiled kernel's entry point (see the module doc).
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut f32, start: i64, end: i64);

/// A kernel of one [`Jit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId(pub usize);

/// A compiled kernel and what it was compiled from.
pub struct Kernel {
    pub name: String,
    pub spec: KernelSpec,
    /// The Cranelift IR as generated (before Cranelift's optimisations).
    pub clif: String,
    /// The machine code as Cranelift's VCode text, when disassembly was requested
    /// ([`Jit::set_disasm`]).
    pub disasm: Option<String>,
    /// The element type of its buffers.
    pub dtype: DType,
    func: KernelFn,
}

/// One JIT module and the kernels compiled into it. Dropping it frees their code;
/// function pointers taken with [`Jit::raw`] must not be called after that.
pub struct Jit {
    /// `Some` until dropped.
    module: Option<JITModule>,
    ctx: Context,
    fctx: FunctionBuilderContext,
    isa: IsaInfo,
    warnings: Vec<String>,
    kernels: Vec<Kernel>,
    disasm: bool,
    /// Process-unique, for telling apart the violations of JITs running at once.
    id: u32,
    /// Whether kernels compiled from now on check their accesses.
    checked: bool,
    /// A deliberate miscompile, for testing the checks.
    fault: Option<check::Fault>,
}

impl Jit {
    /// A JIT for the host CPU at `opt_level=speed`. Fails only when Cranelift does
    /// not support the host. Without native FMA (x86 without AVX+FMA) the kernels
    /// are built with separate multiplies and adds, and [`Jit::warnings`] says so.
    pub fn new() -> Result<Jit, String> {
        Jit::with_opt_level(OptLevel::Speed)
    }

    /// [`Jit::new`] at a chosen Cranelift optimisation level.
    pub fn with_opt_level(opt: OptLevel) -> Result<Jit, String> {
        let mut flags = settings::builder();
        let set = |f: &mut settings::Builder, k: &str, v: &str| {
            f.set(k, v)
                .map_err(|e| format!("cranelift flag {k}={v}: {e}"))
        };
        let level = match opt {
            OptLevel::None => "none",
            OptLevel::Speed => "speed",
        };
        set(&mut flags, "opt_level", level)?;
        // cranelift-jit needs absolute, non-PIC calls.
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "is_pic", "false")?;
        let isa_builder =
            cranelift_native::builder().map_err(|e| format!("unsupported host CPU: {e}"))?;
        let isa = isa_builder
            .finish(settings::Flags::new(flags))
            .map_err(|e| format!("cranelift ISA: {e}"))?;
        let enabled: Vec<String> = isa
            .isa_flags()
            .iter()
            .filter(|v| v.as_bool() == Some(true))
            .map(|v| v.name.to_string())
            .collect();
        let has = |n: &str| enabled.iter().any(|f| f == n);
        let info = IsaInfo {
            triple: isa.triple().to_string(),
            has_avx: has("has_avx"),
            has_avx2: has("has_avx2"),
            has_fma: has("has_fma"),
            has_avx512f: has("has_avx512f"),
            native_fma: isa.has_native_fma(),
            flags: enabled.clone(),
        };
        let mut warnings = Vec::new();
        if !info.native_fma {
            warnings.push(format!(
                "the CPU ({}) has no native fused multiply-add usable by Cranelift (needs AVX and FMA): \
                 JIT kernels use separate multiplies and adds and run slower",
                info.summary()
            ));
        }
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let ctx = module.make_context();
        Ok(Jit {
            module: Some(module),
            ctx,
            fctx: FunctionBuilderContext::new(),
            isa: info,
            warnings,
            kernels: Vec::new(),
            disasm: false,
            id: check::next_jit_id(),
            checked: check::checks_from_env(),
            fault: None,
        })
    }

    pub fn isa(&self) -> &IsaInfo {
        &self.isa
    }

    /// Things the user should know (e.g. no native FMA); empty on a good host.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Keep the machine code text of kernels compiled from now on.
    pub fn set_disasm(&mut self, on: bool) {
        self.disasm = on;
    }

    /// Bounds-check every load and store of the kernels compiled from now on
    /// (see `check.rs`). On from the start when `CNNC_CHECKED` is set.
    pub fn set_checked(&mut self, on: bool) {
        self.checked = on;
    }

    /// Whether kernels compiled from now on are checked.
    pub fn checked(&self) -> bool {
        self.checked
    }

    /// Miscompiles one kernel on purpose (when it is compiled checked): for
    /// tests of the checks only.
    #[doc(hidden)]
    pub fn set_fault(&mut self, fault: Option<check::Fault>) {
        self.fault = fault;
    }

    /// The first bounds violation of this JIT's kernels since the last call, as
    /// (kernel, buffer index, byte offset, bytes accessed); `None` when there
    /// was none (always when unchecked).
    pub(crate) fn take_violation(&self) -> Option<(KernelId, check::RawViolation)> {
        check::take(self.id).map(|v| (KernelId(v.kernel as usize), v))
    }

    /// [`Jit::take_violation`] described with the kernel's buffer roles.
    fn violation(&self, layer: Option<String>) -> Option<check::BoundsViolation> {
        let (id, v) = self.take_violation()?;
        let k = &self.kernels[id.0];
        let shapes: Vec<usize> = k
            .spec
            .inputs()
            .iter()
            .chain(&k.spec.outputs())
            .map(|s| s.iter().product())
            .chain(std::iter::once(k.spec.scratch()))
            .collect();
        let b = v.buffer as usize;
        Some(check::BoundsViolation {
            kernel: k.name.clone(),
            layer,
            buffer: b,
            buffer_desc: check::role(b, k.spec.inputs().len(), k.spec.outputs().len()),
            len: shapes.get(b).copied().unwrap_or(0),
            dtype: k.dtype,
            offset: v.offset,
            size: v.size,
        })
    }

    fn module(&mut self) -> &mut JITModule {
        self.module.as_mut().expect("module lives until drop")
    }

    /// Compiles one f32 kernel and makes it callable.
    pub fn compile(&mut self, name: &str, spec: KernelSpec) -> Result<KernelId, String> {
        self.compile_dtype(name, spec, DType::F32)
    }

    /// Compiles one kernel whose buffers hold `dtype` elements.
    pub fn compile_dtype(
        &mut self,
        name: &str,
        spec: KernelSpec,
        dtype: DType,
    ) -> Result<KernelId, String> {
        spec.validate()?;
        let fma = self.isa.native_fma;
        let sig = builder::kernel_signature(self.module().make_signature());
        let id = self
            .module()
            .declare_anonymous_function(&sig)
            .map_err(|e| format!("declaring {name}: {e}"))?;
        let config = self.module().target_config();
        self.ctx.clear();
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        self.ctx.set_disasm(self.disasm);
        let checks = self.checked.then(|| {
            let lens: Vec<usize> = spec
                .inputs()
                .iter()
                .chain(&spec.outputs())
                .map(|s| s.iter().product())
                .chain((spec.scratch() > 0).then_some(spec.scratch()))
                .collect();
            let fault = self.fault.as_ref().filter(|f| f.kernel == name);
            let tag = check::tag(self.id, self.kernels.len());
            builder::Checks::new(tag, &lens, dtype, fault)
        });
        {
            let mut kb = Kb::new(&mut self.ctx.func, &mut self.fctx, fma, dtype);
            if let Some(c) = checks {
                kb.set_checks(c);
            }
            spec.emitter().emit(&mut kb);
            let errors = kb.check_errors().join("; ");
            kb.finish(config);
            if !errors.is_empty() {
                return Err(format!("checked JIT: {name}: {errors}"));
            }
        }
        let clif = format!("; kernel {name}\n{}", self.ctx.func.display());
        let module = self.module.as_mut().expect("module lives until drop");
        module
            .define_function(id, &mut self.ctx)
            .map_err(|e| format!("compiling {name}: {e:?}"))?;
        let disasm = self
            .ctx
            .compiled_code()
            .and_then(|c| c.vcode.clone())
            .filter(|_| self.disasm);
        module.clear_context(&mut self.ctx);
        module
            .finalize_definitions()
            .map_err(|e| format!("finalizing {name}: {e}"))?;
        let ptr = module.get_finalized_function(id);
        // SAFETY: the function was built with `kernel_signature`, which is this
        // type in the host's C calling convention.
        let func = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
        self.kernels.push(Kernel {
            name: name.to_string(),
            spec,
            clif,
            disasm,
            dtype,
            func,
        });
        Ok(KernelId(self.kernels.len() - 1))
    }

    pub fn kernel(&self, id: KernelId) -> &Kernel {
        &self.kernels[id.0]
    }

    pub fn kernels(&self) -> &[Kernel] {
        &self.kernels
    }

    /// The Cranelift IR of every kernel, in compile order (`cnnc dump --stage=clif`).
    pub fn dump_clif(&self) -> String {
        let mut out = String::new();
        for k in &self.kernels {
            let _ = writeln!(out, "{}", k.clif);
        }
        out
    }

    /// Runs f32 kernel `id` on work items `range` (batch items, or `0..1` for a
    /// [`Par::Whole`] kernel), after checking every buffer's length against the
    /// kernel's shapes. Scratch, when the kernel needs any, is allocated here.
    pub fn run(
        &self,
        id: KernelId,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
        range: Range<usize>,
    ) -> Result<(), String> {
        self.run_typed(id, inputs, outputs, range)
    }

    /// [`Jit::run`] for a kernel compiled for f64.
    pub fn run_f64(
        &self,
        id: KernelId,
        inputs: &[&[f64]],
        outputs: &mut [&mut [f64]],
        range: Range<usize>,
    ) -> Result<(), String> {
        self.run_typed(id, inputs, outputs, range)
    }

    /// [`Jit::run`] for either element type (the kernel's).
    pub fn run_typed<T: Elem>(
        &self,
        id: KernelId,
        inputs: &[&[T]],
        outputs: &mut [&mut [T]],
        range: Range<usize>,
    ) -> Result<(), String> {
        let k = &self.kernels[id.0];
        if k.dtype != T::DTYPE {
            return Err(format!(
                "{}: compiled for {}, run with {} buffers",
                k.name,
                k.dtype.name(),
                T::DTYPE.name()
            ));
        }
        let (ins, outs) = (k.spec.inputs(), k.spec.outputs());
        if inputs.len() != ins.len() || outputs.len() != outs.len() {
            return Err(format!(
                "{}: takes {} inputs and {} outputs, got {} and {}",
                k.name,
                ins.len(),
                outs.len(),
                inputs.len(),
                outputs.len()
            ));
        }
        let lens = inputs
            .iter()
            .map(|b| b.len())
            .chain(outputs.iter().map(|b| b.len()));
        for (i, (len, shape)) in lens.zip(ins.iter().chain(&outs)).enumerate() {
            if len != shape.iter().product::<usize>() {
                return Err(format!(
                    "{}: buffer {i} has {len} elements, shape {shape:?} needs {}",
                    k.name,
                    shape.iter().product::<usize>()
                ));
            }
        }
        if range.start > range.end || range.end > k.spec.work() {
            return Err(format!(
                "{}: work range {range:?} outside 0..{}",
                k.name,
                k.spec.work()
            ));
        }
        let mut scratch = vec![T::zero(); k.spec.scratch()];
        let mut ptrs: Vec<*mut f32> = inputs
            .iter()
            .map(|b| b.as_ptr() as *mut f32)
            .chain(outputs.iter_mut().map(|b| b.as_mut_ptr() as *mut f32))
            .collect();
        if !scratch.is_empty() {
            ptrs.push(scratch.as_mut_ptr() as *mut f32);
        }
        // SAFETY: every buffer has the length the kernel was specialised for, the
        // range is inside the batch, inputs are only read, and the module is alive.
        unsafe { (k.func)(ptrs.as_ptr(), range.start as i64, range.end as i64) };
        match self.violation(None) {
            Some(v) => Err(v.to_string()),
            None => Ok(()),
        }
    }

    /// The raw entry point of kernel `id`, for callers that manage buffers
    /// themselves (the runtime's arena and threads).
    ///
    /// # Safety
    /// The pointer is valid while this `Jit` lives; the caller must pass buffers of
    /// the kernel's shapes and a range inside the batch.
    pub unsafe fn raw(&self, id: KernelId) -> KernelFn {
        self.kernels[id.0].func
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: no kernel can run any more: `run` borrows `self`, and `raw`
            // pointers are documented to die with the `Jit`.
            unsafe { m.free_memory() };
        }
    }
}
