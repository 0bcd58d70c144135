//! The checked JIT: a bounds check on every load and store the kernels generate,
//! for finding codegen bugs (`cnnc … --checked`, or `CNNC_CHECKED=1` for every JIT
//! a process builds, which is how the test suite runs a second time).
//!
//! How a check works (emitted by `builder.rs`, so the emitters do not change):
//! every address a kernel loads from or stores to is traced back through the
//! function's data flow (`iadd`, `isub`'s first operand, `select`, the values a
//! counted loop starts from) to the buffer-table load `kb.buffer(i)` it was
//! computed from; an address that cannot be traced, or that mixes two buffers,
//! fails the compilation. Before the access the kernel computes
//! `d = address − bufs[i]` and, when `d` (unsigned) exceeds `len(i) − size`
//! (the buffer's length in bytes of the element type, less the access's size),
//! branches to a cold block that calls [`record_violation`] with the kernel, the
//! buffer, `d` and the size, and returns from the kernel at once. The same check
//! covers the span a generated GEMM call reads or writes (`Kb::check_span`).
//! Loads of the buffer table itself are at constant offsets, checked when the
//! kernel is compiled.
//!
//! Why not a trap: a Cranelift trap is a SIGILL/SIGSEGV the process cannot turn
//! into a message. A recorded violation is picked up by whoever called the
//! kernel: [`super::Jit::run`] returns it as an error, and
//! [`super::exec::Executable::try_run`] as a [`BoundsViolation`] naming the
//! kernel, its layer and the buffer (the runtime adds the layer's place in the
//! `.cnn` file). A violation is a bug in cnnc, never the user's: the `cnnc`
//! binary reports it as an internal error, exit code 3.
//!
//! Off by default and free when off: unchecked kernels are emitted exactly as
//! before (`cnnc dump --stage clif` is byte-identical); `--checked` shows the
//! checks in the dump.

use super::DType;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Whether `CNNC_CHECKED` asks for checked kernels (set, not empty, not `0`).
pub fn checks_from_env() -> bool {
    std::env::var_os("CNNC_CHECKED").is_some_and(|v| !v.is_empty() && v != "0")
}

/// One failed check, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawViolation {
    /// The [`super::Jit`] (its `id`) and the kernel's index in it.
    pub jit: u32,
    pub kernel: u32,
    /// The buffer's index in the kernel's table (inputs, outputs, scratch).
    pub buffer: u32,
    /// Bytes from the buffer's start to the access (negative: before it).
    pub offset: i64,
    /// Bytes accessed.
    pub size: i64,
}

/// Violations not yet picked up (at most [`KEPT`]), and their number, read
/// without the lock on the hot path.
static PENDING: Mutex<Vec<RawViolation>> = Mutex::new(Vec::new());
static PENDING_COUNT: AtomicUsize = AtomicUsize::new(0);
const KEPT: usize = 64;

static NEXT_JIT: AtomicU32 = AtomicU32::new(1);

/// A process-unique id for a new [`super::Jit`] (violations name their JIT, so
/// JITs running at once, e.g. tests in parallel, never see each other's).
pub(crate) fn next_jit_id() -> u32 {
    NEXT_JIT.fetch_add(1, Ordering::Relaxed)
}

/// The `tag` argument a kernel passes to [`record_violation`].
pub(crate) fn tag(jit: u32, kernel: usize) -> i64 {
    ((jit as i64) << 32) | kernel as i64
}

/// Called by a checked kernel whose access at `offset` bytes (of `size`) from
/// buffer `buffer` falls outside it; the kernel returns right after. Never
/// panics (it is called from generated code).
pub(crate) extern "C" fn record_violation(tag: i64, buffer: i64, offset: i64, size: i64) {
    let v = RawViolation {
        jit: (tag >> 32) as u32,
        kernel: tag as u32,
        buffer: buffer as u32,
        offset,
        size,
    };
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if pending.len() < KEPT {
        pending.push(v);
        PENDING_COUNT.fetch_add(1, Ordering::Release);
    }
}

/// The first violation recorded by JIT `jit`'s kernels since the last call; the
/// others of that JIT are dropped.
pub(crate) fn take(jit: u32) -> Option<RawViolation> {
    if PENDING_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let first = pending.iter().position(|v| v.jit == jit)?;
    let v = pending[first];
    let before = pending.len();
    pending.retain(|v| v.jit != jit);
    PENDING_COUNT.fetch_sub(before - pending.len(), Ordering::Release);
    Some(v)
}

/// A deliberate miscompilation, for testing the checks: every load and store
/// of kernel `kernel` into buffer `buffer` is moved `shift` bytes. Only applied
/// to checked kernels (unchecked, it would corrupt memory).
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The kernel's name (`k3_conv2d_bias_add_relu` in an executable).
    pub kernel: String,
    pub buffer: usize,
    pub shift: i64,
}

impl Fault {
    /// The fault `CNNC_TEST_FAULT=KERNEL:BUFFER:SHIFT` asks for (tests of the
    /// `cnnc` binary; applied to checked executables only).
    pub fn from_env() -> Option<Fault> {
        let v = std::env::var("CNNC_TEST_FAULT").ok()?;
        let mut parts = v.rsplitn(3, ':');
        let shift = parts.next()?.parse().ok()?;
        let buffer = parts.next()?.parse().ok()?;
        let kernel = parts.next()?.to_string();
        Some(Fault {
            kernel,
            buffer,
            shift,
        })
    }
}

/// A failed bounds check: which kernel accessed which buffer where. A bug in
/// cnnc's code generation (or its plan), never in the user's model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundsViolation {
    /// The kernel's name (`k3_conv2d_bias_add_relu`).
    pub kernel: String,
    /// The model layer the kernel computes, when known.
    pub layer: Option<String>,
    /// The buffer's index in the kernel's table, and what it is: `input 0`,
    /// `output 1`, `scratch`, with the planned buffer's name when known.
    pub buffer: usize,
    pub buffer_desc: String,
    /// The buffer's length in elements.
    pub len: usize,
    pub dtype: DType,
    /// Bytes from the buffer's start to the access, and bytes accessed.
    pub offset: i64,
    pub size: i64,
}

impl fmt::Display for BoundsViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let esz = self.dtype.bytes() as i64;
        write!(f, "checked JIT: kernel `{}`", self.kernel)?;
        if let Some(l) = &self.layer {
            write!(f, " (layer `{l}`)")?;
        }
        write!(
            f,
            " accessed bytes {}..{} of buffer {} ({}, {} {} elements = {} bytes), \
             outside it",
            self.offset,
            self.offset + self.size,
            self.buffer,
            self.buffer_desc,
            self.len,
            self.dtype.name(),
            self.len as i64 * esz
        )?;
        if self.offset % esz == 0 {
            write!(f, " (element {})", self.offset / esz)?;
        }
        Ok(())
    }
}

impl std::error::Error for BoundsViolation {}

/// `input 0`, `output 1` or `scratch`: buffer `i` of a kernel with `n_in` inputs
/// and `n_out` outputs.
pub(crate) fn role(i: usize, n_in: usize, n_out: usize) -> String {
    if i < n_in {
        format!("input {i}")
    } else if i < n_in + n_out {
        format!("output {}", i - n_in)
    } else {
        "scratch".to_string()
    }
}
