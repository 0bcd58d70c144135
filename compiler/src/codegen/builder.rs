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
//!
//! In checked mode ([`Checks`], see `check.rs`) the load and store helpers
//! also emit a bounds check before every access; nothing else changes, and
//! unchecked kernels are emitted exactly as without it.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, Block, BlockArg, DataFlowGraph, Function, InstBuilder, MemFlagsData, Opcode,
    Signature, Type, Value, ValueDef,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use std::collections::HashMap;

use super::check::{self, Fault};
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
    /// Bounds checks, in checked mode.
    checks: Option<Box<Checks>>,
}

/// What a checked kernel needs to check its accesses (see `check.rs`).
pub(crate) struct Checks {
    /// The kernel's tag for [`check::record_violation`].
    tag: i64,
    /// Every buffer's length in bytes (inputs, outputs, scratch).
    lens: Vec<i64>,
    /// The move of every access to one buffer ([`Fault`]), for testing.
    fault: Option<(usize, i64)>,
    /// The buffer a pointer value points into (`None`: not a pointer), as
    /// traced so far.
    origin: HashMap<Value, Option<usize>>,
    /// The value a counted loop's parameter starts from.
    entry: HashMap<Value, Value>,
    /// Accesses that could not be attributed to one buffer.
    errors: Vec<String>,
    /// The kernel's one cold block reporting a violation (buffer, offset,
    /// size as parameters), made by the first check.
    fail: Option<Block>,
}

impl Checks {
    /// Checks for the kernel with `tag` whose buffers hold `lens` elements of
    /// `dt`; `fault` moves the accesses of one buffer (a test's miscompile).
    pub fn new(tag: i64, lens: &[usize], dt: DType, fault: Option<&Fault>) -> Checks {
        Checks {
            tag,
            lens: lens.iter().map(|&l| (l * dt.bytes()) as i64).collect(),
            fault: fault.map(|f| (f.buffer, f.shift)),
            origin: HashMap::new(),
            entry: HashMap::new(),
            errors: Vec::new(),
            fail: None,
        }
    }

    /// The buffer `v` points into: traced through `iadd`, the first operand of
    /// `isub`, `select` and counted loops' parameters to a buffer-table load.
    /// `None` for a value derived from no buffer; two buffers are an error.
    fn origin(&mut self, dfg: &DataFlowGraph, v: Value) -> Option<usize> {
        if let Some(&o) = self.origin.get(&v) {
            return o;
        }
        self.origin.insert(v, None); // a loop's parameter may lead back to itself
        let from: Vec<Value> = match dfg.value_def(v) {
            ValueDef::Result(inst, _) => {
                let args = dfg.inst_args(inst);
                match dfg.insts[inst].opcode() {
                    Opcode::Iadd => args.to_vec(),
                    Opcode::Isub => args[..1].to_vec(),
                    Opcode::Select => args[1..].to_vec(),
                    _ => Vec::new(),
                }
            }
            ValueDef::Param(..) => self.entry.get(&v).copied().into_iter().collect(),
            ValueDef::Union(..) => Vec::new(),
        };
        let mut found = None;
        for a in from {
            if let Some(b) = self.origin(dfg, a) {
                if found.is_some_and(|f| f != b) {
                    self.errors.push(format!(
                        "{v} points into buffers {} and {b}",
                        found.unwrap_or(b)
                    ));
                }
                found = Some(b);
            }
        }
        self.origin.insert(v, found);
        found
    }
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
            checks: None,
        }
    }

    /// Turns on bounds checks for everything emitted from now on.
    pub fn set_checks(&mut self, checks: Checks) {
        self.checks = Some(Box::new(checks));
    }

    /// What the checks found wrong at compile time (accesses not attributable to
    /// one buffer, buffer indices past the table); empty when unchecked.
    pub fn check_errors(&self) -> &[String] {
        self.checks.as_ref().map_or(&[], |c| &c.errors)
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
        let p = self
            .b
            .ins()
            .load(I64, input_flags(), self.bufs, (8 * i) as i32);
        if let Some(c) = self.checks.as_mut() {
            if i >= c.lens.len() {
                c.errors
                    .push(format!("buffer {i} of a table of {}", c.lens.len()));
            }
            c.origin.insert(p, Some(i));
        }
        p
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

    /// A load from an input buffer (`readonly + notrap + can_move`; checked, not
    /// `can_move`, so it stays after its check).
    pub fn load_in(&mut self, ty: Type, ptr: Value, off: i64) -> Value {
        if self.checks.is_none() {
            return self.b.ins().load(ty, input_flags(), ptr, to_off(off));
        }
        let (ptr, off) = self.checked(ptr, off, ty.bytes() as i64);
        let flags = MemFlagsData::new().with_notrap().with_readonly();
        self.b.ins().load(ty, flags, ptr, to_off(off))
    }

    /// A load from a buffer the kernel also writes.
    #[allow(dead_code)]
    pub fn load_out(&mut self, ty: Type, ptr: Value, off: i64) -> Value {
        let (ptr, off) = self.checked(ptr, off, ty.bytes() as i64);
        self.b.ins().load(ty, output_flags(), ptr, to_off(off))
    }

    pub fn store(&mut self, v: Value, ptr: Value, off: i64) {
        let size = self.b.func.dfg.value_type(v).bytes() as i64;
        let (ptr, off) = self.checked(ptr, off, size);
        self.b.ins().store(output_flags(), v, ptr, to_off(off));
    }

    /// In checked mode, checks that the `bytes` bytes from `ptr` lie inside the
    /// buffer `ptr` points into (a span a native call such as the GEMM will
    /// access); emits nothing when unchecked.
    pub fn check_span(&mut self, ptr: Value, bytes: i64) {
        if self.checks.is_some() {
            self.checked(ptr, 0, bytes);
        }
    }

    /// The bounds check of an access of `size` bytes at `ptr + off` (checked
    /// mode; else nothing): traces `ptr` to its buffer and branches to a cold
    /// block that reports the violation and returns when the access is outside
    /// it. Returns the address to use (moved by a test's [`Fault`]).
    fn checked(&mut self, ptr: Value, off: i64, size: i64) -> (Value, i64) {
        let Some(mut c) = self.checks.take() else {
            return (ptr, off);
        };
        let Some(buf) = c.origin(&self.b.func.dfg, ptr) else {
            c.errors.push(format!(
                "an access at {ptr} + {off} is not derived from a buffer"
            ));
            self.checks = Some(c);
            return (ptr, off);
        };
        let off = match c.fault {
            Some((b, shift)) if b == buf => off + shift,
            _ => off,
        };
        let len = c.lens.get(buf).copied().unwrap_or(0);
        let base = self
            .b
            .ins()
            .load(I64, input_flags(), self.bufs, (8 * buf) as i32);
        let addr = if off == 0 {
            ptr
        } else {
            self.b.ins().iadd_imm_s(ptr, off)
        };
        let d = self.b.ins().isub(addr, base);
        // `d` as unsigned: an access before the buffer is a huge offset.
        let bad = if len >= size {
            self.b
                .ins()
                .icmp_imm_u(IntCC::UnsignedGreaterThan, d, len - size)
        } else {
            self.b.ins().iconst(types::I8, 1)
        };
        let (buf_v, size_v) = (self.iconst(buf as i64), self.iconst(size));
        let args = [buf_v, d, size_v].map(BlockArg::from);
        let ok = self.b.create_block();
        let fail = match c.fail {
            Some(fail) => {
                self.b.ins().brif(bad, fail, &args, ok, &[]);
                fail
            }
            None => {
                // The first check: make the reporting block.
                let fail = self.b.create_block();
                self.b.set_cold_block(fail);
                let params = [I64; 3].map(|t| self.b.append_block_param(fail, t));
                self.b.ins().brif(bad, fail, &args, ok, &[]);
                self.b.switch_to_block(fail);
                let tag = self.iconst(c.tag);
                let addr = check::record_violation as *const () as usize;
                self.call_native(addr, &[tag, params[0], params[1], params[2]]);
                self.b.ins().return_(&[]);
                fail
            }
        };
        c.fail = Some(fail);
        self.b.switch_to_block(ok);
        self.checks = Some(c);
        // The address is formed again by the access itself, as when unchecked.
        (ptr, off)
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
        let mut after = Vec::with_capacity(carried.len());
        for &c in carried {
            let ty = self.b.func.dfg.value_type(c);
            params.push(self.b.append_block_param(head, ty));
            after.push(self.b.append_block_param(exit, ty));
        }
        let enter: Vec<BlockArg> = std::iter::once(from)
            .chain(carried.iter().copied())
            .map(BlockArg::from)
            .collect();
        let skip: Vec<BlockArg> = carried.iter().copied().map(BlockArg::from).collect();
        if let Some(c) = self.checks.as_mut() {
            c.entry.insert(iv, from);
            let starts = carried.iter().copied();
            c.entry.extend(params.iter().copied().zip(starts.clone()));
            c.entry.extend(after.iter().copied().zip(starts));
        }
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
