//! The kernel-builder layer over cranelift-frontend: the few shapes of code every
//! generated kernel is made of (rotated counted loops with loop-carried values,
//! address arithmetic, flagged loads and stores, vector splat and FMA), so that the
//! kernel emitters read like the loop nests they generate. A kernel is built for
//! one element type ([`DType`]): `Kb` says which scalar and vector types, element
//! size and lanes the emitters use (f32/f32x4, or f64/f64x2 for gradient checks).
//!
//! Every kernel has the signature `fn(bufs: *const *mut f32, start: i64, end: i64)`:
//! `bufs` points at one pointer per buffer (inputs first, then outputs) and
//! `start..end` is the range of batch items this call computes.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, BlockArg, Function, InstBuilder, MemFlagsData, Signature, Type, Value,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

use super::DType;

pub(crate) const F32: Type = types::F32;
pub(crate) const F32X4: Type = types::F32X4;
pub(crate) const I64: Type = types::I64;

/// The signature shared by every kernel, in the ISA's default calling convention
/// (`extern "C"` on the host).
pub(crate) fn kernel_signature(mut sig: Signature) -> Signature {
    sig.params.push(AbiParam::new(I64)); // bufs
    sig.params.push(AbiParam::new(I64)); // start
    sig.params.push(AbiParam::new(I64)); // end
    sig
}

/// A loop bound: a compile-time constant or a run-time value.
#[derive(Clone, Copy)]
pub(crate) enum Bound {
    Const(i64),
    Val(Value),
}

/// Flags for loads from memory the kernel never writes (inputs, the buffer table):
/// the load cannot trap and may be hoisted out of loops or merged.
fn input_flags() -> MemFlagsData {
    MemFlagsData::new()
        .with_notrap()
        .with_readonly()
        .with_can_move()
}

/// Flags for stores to outputs (and loads of values the kernel writes).
fn output_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// A function under construction.
pub(crate) struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    /// Whether `fma` lowers to one instruction; else `mul` + `add` is emitted
    /// (never Cranelift's per-lane `fmaf` libcall).
    fma: bool,
    bufs: Value,
    /// The element type of the kernel's buffers.
    pub dt: DType,
    /// The work range over the batch.
    pub start: Value,
    pub end: Value,
}

impl<'a> Kb<'a> {
    /// Starts the entry block of a kernel whose `func.signature` is
    /// [`kernel_signature`].
    pub fn new(
        func: &'a mut Function,
        fctx: &'a mut FunctionBuilderContext,
        fma: bool,
        dt: DType,
    ) -> Self {
        let mut b = FunctionBuilder::new(func, fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        Kb {
            b,
            fma,
            bufs: p[0],
            dt,
            start: p[1],
            end: p[2],
        }
    }

    /// Returns from the kernel and finishes the function.
    pub fn finish(mut self, config: TargetFrontendConfig) {
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        self.b.finalize(config);
    }

    /// The pointer to buffer `i` (read from the buffer table once, in the entry
    /// block).
    pub fn buffer(&mut self, i: usize) -> Value {
        self.b
            .ins()
            .load(I64, input_flags(), self.bufs, (8 * i) as i32)
    }

    pub fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    /// `base + idx * scale` (bytes); `scale` is a compile-time constant.
    pub fn offset(&mut self, base: Value, idx: Value, scale: i64) -> Value {
        let scaled = match scale {
            0 => return base,
            1 => idx,
            _ => self.b.ins().imul_imm_s(idx, scale),
        };
        self.b.ins().iadd(base, scaled)
    }

    /// A load from an input buffer (`readonly + notrap + can_move`).
    pub fn load_in(&mut self, ty: Type, ptr: Value, off: i64) -> Value {
        self.b.ins().load(ty, input_flags(), ptr, to_off(off))
    }

    /// A load from a buffer the kernel also writes.
    #[allow(dead_code)]
    pub fn load_out(&mut self, ty: Type, ptr: Value, off: i64) -> Value {
        self.b.ins().load(ty, output_flags(), ptr, to_off(off))
    }

    pub fn store(&mut self, v: Value, ptr: Value, off: i64) {
        self.b.ins().store(output_flags(), v, ptr, to_off(off));
    }

    /// The scalar element type: `F32` or `F64`.
    pub fn sty(&self) -> Type {
        self.dt.scalar()
    }

    /// The 128-bit vector type: `F32X4` or `F64X2`.
    pub fn vty(&self) -> Type {
        self.dt.vector()
    }

    /// Bytes per element (4 or 8).
    pub fn esz(&self) -> i64 {
        self.dt.bytes() as i64
    }

    /// Lanes per vector (4 or 2).
    pub fn lanes(&self) -> usize {
        self.dt.lanes()
    }

    /// The constant `x` of `ty` (a scalar or vector of the element type): for
    /// f32, `x as f32` (exact when `x` was computed as an f32).
    pub fn real(&mut self, ty: Type, x: f64) -> Value {
        let s = if ty.lane_type() == types::F64 {
            self.b.ins().f64const(x)
        } else {
            self.b.ins().f32const(x as f32)
        };
        self.splat(ty, s)
    }

    /// Zero of `ty` (a scalar or vector of the element type).
    pub fn zero(&mut self, ty: Type) -> Value {
        self.real(ty, 0.0)
    }

    /// `x` broadcast to `ty` (identity for a scalar type).
    pub fn splat(&mut self, ty: Type, x: Value) -> Value {
        if !ty.is_vector() {
            x
        } else {
            self.b.ins().splat(ty, x)
        }
    }

    /// `a * b + c`, fused when the ISA has native FMA.
    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let m = self.b.ins().fmul(a, b);
            self.b.ins().fadd(m, c)
        }
    }

    /// `v` where `x > 0`, else `+0.0` (NaN in `x` selects 0): the ReLU mask,
    /// branch-free. `ty` is the type of `v` and `x`.
    pub fn where_positive(&mut self, ty: Type, x: Value, v: Value) -> Value {
        let zero = self.zero(ty);
        let mask = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
        if !ty.is_vector() {
            self.b.ins().select(mask, v, zero)
        } else {
            let mask = self.b.ins().bitcast(ty, MemFlagsData::new(), mask);
            self.b.ins().band(v, mask)
        }
    }

    /// A counted loop `for iv in (from..to).step_by(step)` with loop-carried
    /// values, emitted rotated (the test at the bottom). The guard before the loop
    /// is omitted when both bounds are constants; a loop with constant bounds that
    /// runs zero times emits nothing. Returns the carried values after the loop.
    pub fn for_range(
        &mut self,
        from: Bound,
        to: Bound,
        step: i64,
        carried: &[Value],
        body: impl FnOnce(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        assert!(step > 0);
        let guard = match (from, to) {
            (Bound::Const(a), Bound::Const(b)) => {
                if a >= b {
                    return carried.to_vec();
                }
                false
            }
            _ => true,
        };
        let from = self.bound(from);
        let to = self.bound(to);
        let head = self.b.create_block();
        let exit = self.b.create_block();
        let iv = self.b.append_block_param(head, I64);
        let mut params = Vec::with_capacity(carried.len());
        for &c in carried {
            let ty = self.b.func.dfg.value_type(c);
            params.push(self.b.append_block_param(head, ty));
            self.b.append_block_param(exit, ty);
        }
        let enter: Vec<BlockArg> = std::iter::once(from)
            .chain(carried.iter().copied())
            .map(BlockArg::from)
            .collect();
        let skip: Vec<BlockArg> = carried.iter().copied().map(BlockArg::from).collect();
        if guard {
            let go = self.b.ins().icmp(IntCC::SignedLessThan, from, to);
            self.b.ins().brif(go, head, &enter, exit, &skip);
        } else {
            self.b.ins().jump(head, &enter);
        }
        self.b.switch_to_block(head);
        let out = body(self, iv, &params);
        assert_eq!(
            out.len(),
            carried.len(),
            "loop body returns its carried values"
        );
        let next = self.b.ins().iadd_imm_s(iv, step);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, next, to);
        let again: Vec<BlockArg> = std::iter::once(next)
            .chain(out.iter().copied())
            .map(BlockArg::from)
            .collect();
        let done: Vec<BlockArg> = out.iter().copied().map(BlockArg::from).collect();
        self.b.ins().brif(more, head, &again, exit, &done);
        self.b.switch_to_block(exit);
        self.b.block_params(exit).to_vec()
    }

    /// Calls the native `extern "C"` function at `addr` (a Rust function such as
    /// the GEMM microkernel driver) with `args`; it returns nothing. Argument
    /// types are the values' types (`I64` for pointers and sizes).
    pub fn call_native(&mut self, addr: usize, args: &[Value]) {
        let mut sig = Signature::new(self.b.func.signature.call_conv);
        for &a in args {
            let ty = self.b.func.dfg.value_type(a);
            sig.params.push(AbiParam::new(ty));
        }
        let sigref = self.b.import_signature(sig);
        let callee = self.iconst(addr as i64);
        self.b.ins().call_indirect(sigref, callee, args);
    }

    fn bound(&mut self, b: Bound) -> Value {
        match b {
            Bound::Const(k) => self.iconst(k),
            Bound::Val(v) => v,
        }
    }
}

fn to_off(off: i64) -> i32 {
    i32::try_from(off).expect("kernel offsets fit in 32 bits (tensors < 2 GiB)")
}
