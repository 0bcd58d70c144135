//! The Cranelift JIT backend's foundation: a [`Jit`] owning one `JITModule`
//! (native ISA, `opt_level=speed`), and shape-specialised kernels compiled into it
//! (elementwise ReLU forward/backward and bias add; direct conv2d forward). The
//! fusion planner, backward conv kernels, threading and the runtime's `Backend`
//! come next (see ARCHITECTURE.md, "Stage: codegen").
//!
//! - `builder.rs`: the kernel-builder layer (rotated loops, addresses, flagged
//!   loads, f32x4 FMA);
//! - `elementwise.rs`: ReLU, ReLU mask, bias add;
//! - `conv.rs`: conv2d forward.
//!
//! Every kernel is `extern "C" fn(bufs: *const *mut f32, start: i64, end: i64)`:
//! `bufs` holds one pointer per buffer (the inputs, then the outputs, in the order
//! of [`KernelSpec::inputs`] and [`KernelSpec::outputs`]) and the call computes
//! batch items `start..end`, so the runtime can split a batch across threads.

mod builder;
mod conv;
mod elementwise;

use crate::ir::{Act, ConvAttrs, Graph, Node, Op, Shape};
use builder::Kb;
use cranelift_codegen::ir::UserFuncName;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module};
use std::fmt::Write as _;
use std::ops::Range;

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

/// What a kernel computes; every shape includes the batch (axis 0).
#[derive(Clone, Debug, PartialEq)]
pub enum KernelSpec {
    /// `x → max(x, 0)`. Buffers: `x`, `y`.
    Relu { shape: Shape },
    /// `(dy, x) → dy where x > 0, else 0`. Buffers: `dy`, `x`, `dx`.
    ReluGrad { shape: Shape },
    /// `(x[N,C,…], b[C]) → x + b`. Buffers: `x`, `b`, `y`.
    BiasAdd { shape: Shape },
    /// `(x[N,C,H,W], w[O,C/g,KH,KW]) → y[N,O,OH,OW]`. Buffers: `x`, `w`, `y`.
    Conv2d {
        x: Shape,
        w: Shape,
        attrs: ConvAttrs,
    },
}

impl KernelSpec {
    /// The kernel for a graph node, when one exists yet.
    pub fn from_node(g: &Graph, node: &Node) -> Option<KernelSpec> {
        let shape = |i: usize| g.shape(node.inputs[i]).clone();
        Some(match &node.op {
            Op::Act(Act::Relu) => KernelSpec::Relu { shape: shape(0) },
            Op::ActGrad(Act::Relu) => KernelSpec::ReluGrad { shape: shape(0) },
            Op::BiasAdd => KernelSpec::BiasAdd { shape: shape(0) },
            Op::Conv2d(a) => KernelSpec::Conv2d {
                x: shape(0),
                w: shape(1),
                attrs: *a,
            },
            _ => return None,
        })
    }

    /// The input buffers' shapes, in buffer order.
    pub fn inputs(&self) -> Vec<Shape> {
        match self {
            KernelSpec::Relu { shape } => vec![shape.clone()],
            KernelSpec::ReluGrad { shape } => vec![shape.clone(), shape.clone()],
            KernelSpec::BiasAdd { shape } => vec![shape.clone(), vec![shape[1]]],
            KernelSpec::Conv2d { x, w, .. } => vec![x.clone(), w.clone()],
        }
    }

    /// The output buffers' shapes, in buffer order (after the inputs).
    pub fn outputs(&self) -> Vec<Shape> {
        match self {
            KernelSpec::Relu { shape }
            | KernelSpec::ReluGrad { shape }
            | KernelSpec::BiasAdd { shape } => vec![shape.clone()],
            KernelSpec::Conv2d { x, w, attrs } => Op::Conv2d(*attrs)
                .infer(&[x, w])
                .expect("validated when compiled"),
        }
    }

    /// The batch size: the work range is a sub-range of `0..batch()`.
    pub fn batch(&self) -> usize {
        self.inputs()[0][0]
    }

    /// Floating-point operations of one batch item (a multiply-add counts 2).
    pub fn flops_per_item(&self) -> u64 {
        match self {
            KernelSpec::Conv2d { w, .. } => {
                let y = &self.outputs()[0];
                2 * (y[1] * y[2] * y[3] * w[1] * w[2] * w[3]) as u64
            }
            _ => self.inputs()[0][1..].iter().product::<usize>() as u64,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let min_rank = match self {
            KernelSpec::Relu { .. } | KernelSpec::ReluGrad { .. } => 1,
            KernelSpec::BiasAdd { .. } => 2,
            KernelSpec::Conv2d { x, w, attrs } => {
                if x.len() != 4 || w.len() != 4 {
                    return Err(format!("conv2d needs rank-4 x and w, got {x:?}, {w:?}"));
                }
                Op::Conv2d(*attrs).infer(&[x, w])?;
                4
            }
        };
        if self.inputs()[0].len() < min_rank {
            return Err(format!("{self:?} needs a tensor of rank >= {min_rank}"));
        }
        for s in self.inputs().iter().chain(&self.outputs()) {
            if s.contains(&0) {
                return Err(format!("unsupported shape {s:?} for {self:?}"));
            }
            // Byte offsets inside a tensor must fit the loads' 32-bit immediates.
            if s.iter().product::<usize>() >= (1 << 29) {
                return Err(format!("tensor {s:?} is too large for the JIT (2 GiB)"));
            }
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

    fn module(&mut self) -> &mut JITModule {
        self.module.as_mut().expect("module lives until drop")
    }

    /// Compiles one kernel and makes it callable.
    pub fn compile(&mut self, name: &str, spec: KernelSpec) -> Result<KernelId, String> {
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
        {
            let mut kb = Kb::new(&mut self.ctx.func, &mut self.fctx, fma);
            match &spec {
                KernelSpec::Relu { shape } => elementwise::relu(&mut kb, item(shape)),
                KernelSpec::ReluGrad { shape } => elementwise::relu_grad(&mut kb, item(shape)),
                KernelSpec::BiasAdd { shape } => {
                    elementwise::bias_add(&mut kb, shape[1], shape[2..].iter().product())
                }
                KernelSpec::Conv2d { x, w, attrs } => {
                    let y = &spec.outputs()[0];
                    let geo = conv::ConvGeom {
                        c: x[1],
                        h: x[2],
                        w: x[3],
                        o: w[0],
                        kh: w[2],
                        kw: w[3],
                        oh: y[2],
                        ow: y[3],
                        a: *attrs,
                    };
                    conv::conv2d(&mut kb, &geo)
                }
            }
            kb.finish(config);
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

    /// Runs kernel `id` on batch items `range`, after checking every buffer's
    /// length against the kernel's shapes.
    pub fn run(
        &self,
        id: KernelId,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
        range: Range<usize>,
    ) -> Result<(), String> {
        let k = &self.kernels[id.0];
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
        if range.start > range.end || range.end > k.spec.batch() {
            return Err(format!(
                "{}: work range {range:?} outside the batch of {}",
                k.name,
                k.spec.batch()
            ));
        }
        let ptrs: Vec<*mut f32> = inputs
            .iter()
            .map(|b| b.as_ptr() as *mut f32)
            .chain(outputs.iter_mut().map(|b| b.as_mut_ptr()))
            .collect();
        // SAFETY: every buffer has the length the kernel was specialised for, the
        // range is inside the batch, inputs are only read, and the module is alive.
        unsafe { (k.func)(ptrs.as_ptr(), range.start as i64, range.end as i64) };
        Ok(())
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

/// Elements per batch item.
fn item(shape: &Shape) -> usize {
    shape[1..].iter().product()
}
