//! Single-threaded dense matrix multiply, `C = A·B` or `C += A·B`, for the
//! convolution and linear kernels the JIT generates: they call [`sgemm`] through a
//! C-ABI function pointer (conv forward `Y = W·col`, grad-weight `dW += dY·colᵀ`,
//! grad-input `col = Wᵀ·dY`). A and B take any row and column strides, so a
//! transpose is a stride swap; C is row-major with leading dimension `ldc`.
//!
//! # Blocking (Goto/BLIS loop nest)
//!
//! ```text
//! for jc in 0..n step NC
//!   for pc in 0..k step KC
//!     pack B[pc.., jc..] into NR-wide panels (kc×NR each, row p contiguous)
//!     for ic in 0..m step MC
//!       pack A[ic.., pc..] into MR-tall panels (kc×MR each, column p contiguous)
//!       for jr in 0..nc step NR     one B panel stays in L1 …
//!         for ir in 0..mc step MR   … while the A panels stream from L2
//!           microkernel: C[MR×NR] (+)= A panel · B panel
//! ```
//!
//! Sizes, for a Zen 3 core (32 KiB L1d, 512 KiB L2, 16 ymm registers, two 256-bit
//! FMA pipes of latency 4):
//!
//! - **MR×NR = 6×16**: twelve ymm accumulators (more than the 2 pipes × 4 cycles =
//!   8 FMAs that must be in flight), two B vectors and one A broadcast: 15 of the
//!   16 registers. Per k step: 12 FMAs, 2 loads, 6 broadcasts, within the 3 loads
//!   per cycle. 4×24 needs all 16 registers; LLVM then spills an accumulator every
//!   step (measured: 43 GFLOP/s on 512³ against 92). 8×8 has only the 8
//!   accumulators the latency needs, with no slack.
//! - **KC = 256**: a B panel is 256×16×4 B = 16 KiB, half of L1d; an A panel is
//!   6 KiB.
//! - **MC = 144**: an A block is 144×256×4 B = 144 KiB, well inside L2. Our M
//!   (16..256) is mostly one block. KC 192..512 and MC 72 measured within noise.
//! - **NC = 4096**: the packed B block (at most 4 MiB) lives in L3; the layer
//!   shapes (N ≤ 784) are one block.
//!
//! # Packing only where it pays
//!
//! At these sizes a pack is a real cost (it is one pass over the operand per
//! call, reused by few tiles: N = 49 has 4 column panels), so an operand whose
//! layout already suits the kernel is read in place and only its partial edge
//! panel is packed:
//!
//! - A, when its rows are contiguous (conv weights: six row streams) or its
//!   columns are (Wᵀ in grad-input), unless the column stride aliases in L1;
//! - B, when its rows are contiguous, M ≤ 64 (few reuses of each panel: unpacked
//!   rows are unaligned) and the row stride does not alias in L1.
//!
//! A column-major B (colᵀ in grad-weight) is packed by 8×8 register transposes.
//!
//! # Edges
//!
//! Packed panels are zero-padded to MR rows and NR (or 8) columns, so the
//! microkernel always runs a full tile and writes only the valid part of it to C.
//! When at most 8 columns remain (N = 49 leaves 1), the last panel is 8 wide and
//! a 6×8 kernel runs on it, with a second set of accumulators for odd k so that
//! it still has 12 FMAs in flight. Nothing outside the given matrices is read or
//! written.
//!
//! # Dispatch
//!
//! The AVX2+FMA kernel is chosen once, at the first call, when
//! `is_x86_feature_detected!` reports both features; otherwise (older x86_64,
//! other architectures) the same blocking runs a portable kernel in plain Rust
//! (separate multiply and add, so it never calls a software `fma`), which the
//! compiler vectorises with the baseline SIMD of the target. Packing is compiled
//! inside each kernel's target-feature context.
//!
//! Packing buffers are thread-local and grow to the largest call seen, so a call
//! allocates nothing after warm-up.
//!
//! [`dgemm`] (f64) exists for the gradient checks: a plain loop, exact and slow.
//!
//! Measured (`examples/gemm_gflops.rs`, one Zen 3 core whose FMA peak is about
//! 100 GFLOP/s): 512³ at 90, the conv shapes at 66..85, K = 9 at 48, the 64×10×64
//! linear layer at 39.

use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of a packed block (see the module doc).
const KC: usize = 256;
/// Rows of a packed A block; a multiple of MR.
const MC: usize = 144;
/// Columns of a packed B block; a multiple of NR.
const NC: usize = 4096;

/// B is read in place (not packed) only when M is at most this (see
/// [`read_b_in_place`]).
const B_IN_PLACE_MAX_M: usize = 64;

const _: () = assert!(MC.is_multiple_of(MR) && NC.is_multiple_of(NR));

/// C = A·B (`accumulate == 0`) or C += A·B (`accumulate != 0`), in f32.
///
/// C is m×n, element (i, j) at `c[i*ldc + j]`. A is m×k with element (i, p) at
/// `a[i*rsa + p*csa]`; B is k×n with element (p, j) at `b[p*rsb + j*csb]`. Any
/// strides, so transposes are free. With `k == 0`, C is zeroed (or left alone when
/// accumulating); with `m == 0` or `n == 0` nothing is touched.
///
/// # Safety
///
/// Every element of A, B and C addressed by the formulas above (for `i < m`,
/// `j < n`, `p < k`) must be valid to read (A, B) or read and write (C), and C must
/// not overlap A or B. Distinct (i, j) must address distinct elements of C.
pub unsafe extern "C" fn sgemm(
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
    let op = Operands {
        m,
        n,
        k,
        a,
        rsa,
        csa,
        b,
        rsb,
        csb,
        c,
        ldc,
        accumulate: accumulate != 0,
    };
    // SAFETY: the caller's contract is exactly `Operands::run`'s.
    unsafe { op.run(Microkernel::detected()) }
}

/// C = A·B (`accumulate == 0`) or C += A·B (`accumulate != 0`), in f64; the same
/// layout and contract as [`sgemm`]. A straightforward i-p-j loop (vectorised by
/// the compiler when B and C rows are contiguous): it is only used by gradient
/// checks, where exactness matters and speed does not.
///
/// # Safety
///
/// As for [`sgemm`].
pub unsafe extern "C" fn dgemm(
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
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY (whole body): every offset formed is one the caller vouched for.
    unsafe {
        for i in 0..m {
            let row = c.offset(i as isize * ldc);
            if accumulate == 0 {
                for j in 0..n {
                    *row.add(j) = 0.0;
                }
            }
            let a_row = a.offset(i as isize * rsa);
            for p in 0..k {
                let aip = *a_row.offset(p as isize * csa);
                let b_row = b.offset(p as isize * rsb);
                if csb == 1 {
                    let b_row = std::slice::from_raw_parts(b_row, n);
                    let c_row = std::slice::from_raw_parts_mut(row, n);
                    for (cj, bj) in c_row.iter_mut().zip(b_row) {
                        *cj += aip * bj;
                    }
                } else {
                    for j in 0..n {
                        *row.add(j) += aip * *b_row.offset(j as isize * csb);
                    }
                }
            }
        }
    }
}

/// Which microkernel [`sgemm`] uses on this machine: `"avx2+fma 6x16"` or
/// `"portable"`.
pub fn sgemm_kernel_name() -> &'static str {
    Microkernel::detected().name()
}

/// The register-tile kernels [`sgemm`] can run; both use the same blocking and
/// packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// 6×16 (and 6×8 for narrow edges) with `_mm256_fmadd_ps`; x86_64 with AVX2
    /// and FMA only.
    Avx2Fma,
    /// Plain Rust, any target.
    Portable,
}

impl Microkernel {
    /// The best kernel this CPU supports, detected at the first call and cached.
    pub fn detected() -> Microkernel {
        static DETECTED: OnceLock<Microkernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if Microkernel::Avx2Fma.is_available() {
                Microkernel::Avx2Fma
            } else {
                Microkernel::Portable
            }
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Microkernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Microkernel::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Microkernel::Avx2Fma => false,
        }
    }

    /// `"avx2+fma 6x16"` or `"portable"`.
    pub fn name(self) -> &'static str {
        match self {
            Microkernel::Avx2Fma => "avx2+fma 6x16",
            Microkernel::Portable => "portable",
        }
    }
}

/// A read-only strided matrix in a slice: element (i, j) at
/// `data[i*row_stride + j*col_stride]`. The dimensions come from the gemm call.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<'a, T> Strided<'a, T> {
    /// Rows `ld` elements apart, each contiguous.
    pub fn row_major(data: &'a [T], ld: usize) -> Self {
        Strided {
            data,
            row_stride: ld as isize,
            col_stride: 1,
        }
    }

    /// Columns `ld` elements apart, each contiguous: the transpose of a row-major
    /// matrix stored with leading dimension `ld`.
    pub fn col_major(data: &'a [T], ld: usize) -> Self {
        Strided {
            data,
            row_stride: 1,
            col_stride: ld as isize,
        }
    }

    /// Panics unless every element of a `rows`×`cols` matrix lies in `data`.
    fn check(&self, what: &str, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        let (lo, hi) = extent(rows, cols, self.row_stride, self.col_stride);
        assert!(
            lo >= 0 && hi < self.data.len() as i128,
            "gemm: {what} ({rows}×{cols}, strides {}, {}) reaches elements {lo}..={hi} \
             of a slice of length {}",
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// The lowest and highest offsets of a strided `rows`×`cols` matrix (non-empty).
fn extent(rows: usize, cols: usize, rs: isize, cs: isize) -> (i128, i128) {
    let r = (rows as i128 - 1) * rs as i128;
    let c = (cols as i128 - 1) * cs as i128;
    (r.min(0) + c.min(0), r.max(0) + c.max(0))
}

/// What a gemm does with the old contents of C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// C = A·B.
    Overwrite,
    /// C += A·B.
    Accumulate,
}

/// Safe [`sgemm`]: C (m×n, row-major, leading dimension `ldc`) = or += A·B with
/// A m×k and B k×n. Panics if an element of A, B or C lies outside its slice, or if
/// `ldc < n` (rows of C would overlap).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_slices(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_, f32>,
    b: Strided<'_, f32>,
    c: &mut [f32],
    ldc: usize,
    update: Update,
) {
    sgemm_slices_with(Microkernel::detected(), m, n, k, a, b, c, ldc, update);
}

/// [`sgemm_slices`] with a chosen microkernel (tests use it to cover the portable
/// one). Panics as [`sgemm_slices`] does, and if the CPU lacks the kernel.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_slices_with(
    kernel: Microkernel,
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_, f32>,
    b: Strided<'_, f32>,
    c: &mut [f32],
    ldc: usize,
    update: Update,
) {
    assert!(
        kernel.is_available(),
        "gemm: the {} kernel needs CPU features this machine lacks",
        kernel.name()
    );
    check_operands(m, n, k, &a, &b, c.len(), ldc);
    let op = Operands {
        m,
        n,
        k,
        a: a.data.as_ptr(),
        rsa: a.row_stride,
        csa: a.col_stride,
        b: b.data.as_ptr(),
        rsb: b.row_stride,
        csb: b.col_stride,
        c: c.as_mut_ptr(),
        ldc: ldc as isize,
        accumulate: update == Update::Accumulate,
    };
    // SAFETY: `check_operands` put every addressed element inside its slice; C is
    // an exclusive borrow, so it overlaps neither A nor B, and `ldc >= n` keeps its
    // elements distinct.
    unsafe { op.run(kernel) }
}

/// Safe [`dgemm`], with the arguments and panics of [`sgemm_slices`].
#[allow(clippy::too_many_arguments)]
pub fn dgemm_slices(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_, f64>,
    b: Strided<'_, f64>,
    c: &mut [f64],
    ldc: usize,
    update: Update,
) {
    check_operands(m, n, k, &a, &b, c.len(), ldc);
    // SAFETY: as in `sgemm_slices_with`.
    unsafe {
        dgemm(
            m,
            n,
            k,
            a.data.as_ptr(),
            a.row_stride,
            a.col_stride,
            b.data.as_ptr(),
            b.row_stride,
            b.col_stride,
            c.as_mut_ptr(),
            ldc as isize,
            u32::from(update == Update::Accumulate),
        )
    }
}

fn check_operands<T>(
    m: usize,
    n: usize,
    k: usize,
    a: &Strided<'_, T>,
    b: &Strided<'_, T>,
    c_len: usize,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check("A", m, k);
    b.check("B", k, n);
    assert!(
        m == 1 || ldc >= n,
        "gemm: ldc {ldc} < n {n} makes the rows of C overlap"
    );
    let c_end = (m - 1) as u128 * ldc as u128 + n as u128;
    assert!(
        c_end <= c_len as u128,
        "gemm: C ({m}×{n}, ldc {ldc}) needs {c_end} elements, the slice has {c_len}"
    );
}

/// One sgemm call's arguments (see [`sgemm`] for the layout).
struct Operands {
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
    accumulate: bool,
}

/// 64-byte aligned storage for the packed panels (a cache line; the B panels are
/// read with aligned loads).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A thread's packing buffers, grown on demand and reused across calls.
#[derive(Default)]
struct PackBuffers {
    a: Vec<Line>,
    b: Vec<Line>,
}

impl PackBuffers {
    /// Pointers to at least `a_len` and `b_len` floats.
    fn get(&mut self, a_len: usize, b_len: usize) -> (*mut f32, *mut f32) {
        fn grow(v: &mut Vec<Line>, floats: usize) -> *mut f32 {
            let lines = floats.div_ceil(16);
            if v.len() < lines {
                v.resize(lines, Line([0.0; 16]));
            }
            v.as_mut_ptr().cast()
        }
        (grow(&mut self.a, a_len), grow(&mut self.b, b_len))
    }
}

thread_local! {
    static BUFFERS: RefCell<PackBuffers> = RefCell::new(PackBuffers::default());
}

/// The width of the packed B panel holding `nr` (≤ NR) valid columns: 8 when a
/// 6×8 tile covers them, else NR.
fn panel_width(nr: usize) -> usize {
    if nr <= 8 {
        8
    } else {
        NR
    }
}

impl Operands {
    /// # Safety
    ///
    /// The contract of [`sgemm`]; `kernel` must be available on this CPU.
    unsafe fn run(&self, kernel: Microkernel) {
        let Operands { m, n, k, .. } = *self;
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !self.accumulate {
                for i in 0..m {
                    // SAFETY: row i of C, n elements, is the caller's.
                    unsafe { std::ptr::write_bytes(self.c.offset(i as isize * self.ldc), 0, n) };
                }
            }
            return;
        }
        let a_len = m.min(MC).next_multiple_of(MR) * k.min(KC);
        let b_len = n.min(NC).next_multiple_of(NR) * k.min(KC);
        let with_own_buffers = || {
            let (ap, bp) = PackBuffers::default().get(a_len, b_len);
            // SAFETY: the buffers hold a_len and b_len floats.
            unsafe { self.blocked(kernel, ap, bp) }
        };
        let done = BUFFERS.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => {
                let (ap, bp) = bufs.get(a_len, b_len);
                // SAFETY: the buffers hold a_len and b_len floats.
                unsafe { self.blocked(kernel, ap, bp) }
            }
            // Only if a kernel re-entered sgemm on this thread.
            Err(_) => with_own_buffers(),
        });
        // Only while the thread's locals are being destroyed. Never panic here:
        // a panic cannot unwind out of an `extern "C"` function.
        if done.is_err() {
            with_own_buffers();
        }
    }

    /// The loop nest of the module doc, on the chosen kernel. `ap` and `bp` hold
    /// the packed A and B blocks (at least `min(m, MC)` rounded up to MR by
    /// `min(k, KC)`, and `min(n, NC)` rounded up to NR by `min(k, KC)`, floats).
    unsafe fn blocked(&self, kernel: Microkernel, ap: *mut f32, bp: *mut f32) {
        // SAFETY: the caller's contract; `run` checked the kernel is available.
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Microkernel::Avx2Fma => avx2::blocked(self, ap, bp),
                #[cfg(not(target_arch = "x86_64"))]
                Microkernel::Avx2Fma => unreachable!("checked by is_available"),
                Microkernel::Portable => portable::blocked(self, ap, bp),
            }
        }
    }
}

/// Whether the kernels read A in place instead of packing it. Packing costs a
/// pass over A per call and pays back only when A panels come from a bad layout:
/// six contiguous rows stream well at any stride, contiguous columns (Wᵀ in
/// grad-input) unless their stride aliases in L1 (see [`aliases_in_l1`]).
fn read_a_in_place(op: &Operands) -> bool {
    op.csa == 1 || (op.rsa == 1 && !aliases_in_l1(op.csa))
}

/// Whether the kernels read B in place instead of packing it: only when few A
/// panels reuse each B panel (M ≤ [`B_IN_PLACE_MAX_M`]), its rows are contiguous,
/// and their stride does not alias in L1. Unpacked B rows are unaligned, which
/// costs more than the packing as soon as a panel is reused often.
fn read_b_in_place(op: &Operands) -> bool {
    op.csb == 1 && op.m <= B_IN_PLACE_MAX_M && !aliases_in_l1(op.rsb)
}

/// Whether a stride of `stride` floats between the k steps of a panel maps them
/// to at most 8 of the 64 L1 sets (a multiple of 512 bytes), so that the panel's
/// lines (up to KC = 256 of them) evict each other. Measured: in place, a 512- or
/// 1024-float stride costs 5 to 12 % against packing; a 784- or 196-float one
/// gains 5 to 13 %.
fn aliases_in_l1(stride: isize) -> bool {
    (stride.unsigned_abs() * std::mem::size_of::<f32>()).is_multiple_of(512)
}

/// The depth of the K blocks: as few as KC allows, of equal depth (a multiple of
/// 8), so that K = 288 runs as 2×144 rather than 256 + 32: a shallow block pays
/// the whole load and store of C for little work.
fn depth_step(k: usize) -> usize {
    let blocks = k.div_ceil(KC).max(1);
    k.div_ceil(blocks).next_multiple_of(8).min(KC)
}

/// The loop nest of the module doc, generic over the macro-kernel (which runs one
/// block) and the packer of full column-major B panels (a transpose, see
/// [`pack_b_cols`]). Inlined into each kernel's `blocked`, so that the packing is
/// compiled with the kernel's target features too.
#[inline(always)]
unsafe fn loop_nest(
    op: &Operands,
    ap: *mut f32,
    bp: *mut f32,
    pack_cols: impl Fn(usize, *const f32, isize, *mut f32),
    mut macro_kernel: impl FnMut(&Block),
) {
    let Operands { m, n, k, .. } = *op;
    let kc_step = depth_step(k);
    let a_in_place = read_a_in_place(op);
    let b_in_place = read_b_in_place(op);
    // SAFETY (whole body): every A, B, C offset is inside the caller's matrices,
    // every packed offset inside the buffers (see `Operands::blocked`).
    unsafe {
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(kc_step) {
                let kc = kc_step.min(k - pc);
                let b = Source {
                    ptr: op.b.offset(pc as isize * op.rsb + jc as isize * op.csb),
                    rs: op.rsb,
                    cs: op.csb,
                    packed: bp,
                    in_place: b_in_place,
                };
                pack_b(kc, nc, &b, bp, &pack_cols);
                let load = op.accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let a = Source {
                        ptr: op.a.offset(ic as isize * op.rsa + pc as isize * op.csa),
                        rs: op.rsa,
                        cs: op.csa,
                        packed: ap,
                        in_place: a_in_place,
                    };
                    pack_a(mc, kc, &a, ap);
                    macro_kernel(&Block {
                        mc,
                        nc,
                        kc,
                        a,
                        b,
                        c: op.c.offset(ic as isize * op.ldc + jc as isize),
                        ldc: op.ldc,
                        load,
                    });
                }
            }
        }
    }
}

/// One operand block: the matrix at `ptr` (element (r, s) at `ptr[r*rs + s*cs]`)
/// and its packed panels at `packed`. Packed panels are MR-tall for A (column p of
/// panel q at `packed[q*MR*kc + p*MR..]`) and [`panel_width`]-wide for B (row p of
/// a panel at `p*width`, panels back to back), zero-padded. When `in_place`, the
/// kernels read full panels from the matrix itself and only a partial edge panel
/// is packed, alone, at `packed`.
#[derive(Clone, Copy)]
struct Source {
    ptr: *const f32,
    rs: isize,
    cs: isize,
    packed: *mut f32,
    in_place: bool,
}

/// One A block times one B block into a block of C.
struct Block {
    mc: usize,
    nc: usize,
    kc: usize,
    a: Source,
    b: Source,
    c: *mut f32,
    ldc: isize,
    /// Add to C (true) or overwrite it.
    load: bool,
}

/// The A panel of a tile: element (i, p) at `ptr[i*rs + p*cs]`, where `rs == 1`
/// (packed, or a column-major A) or `cs == 1` (a row-major A). All MR rows are
/// readable.
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// The B panel of a tile: row p at `ptr + p*ld`, `width` (8 or NR) columns
/// readable.
#[derive(Clone, Copy)]
struct BPanel {
    ptr: *const f32,
    ld: isize,
    width: usize,
}

/// The tiles of a block, in the order the macro-kernels visit them: B panels
/// outer (one stays in L1), A panels inner. Calls `tile(a, b, c, mr, nr)` for the
/// `mr`×`nr` tile of C at `c`.
#[inline(always)]
unsafe fn for_each_tile(blk: &Block, mut tile: impl FnMut(APanel, BPanel, *mut f32, usize, usize)) {
    let (a, b) = (&blk.a, &blk.b);
    // SAFETY (whole body): the panel offsets follow `pack_a` and `pack_b`, or
    // address full panels inside the matrices; the C offsets stay inside the
    // mc×nc block.
    unsafe {
        let mut b_off = 0;
        for jr in (0..blk.nc).step_by(NR) {
            let nr = NR.min(blk.nc - jr);
            let width = panel_width(nr);
            let b_panel = if b.in_place && nr == NR {
                BPanel {
                    ptr: b.ptr.offset(jr as isize * b.cs),
                    ld: b.rs,
                    width,
                }
            } else {
                let off = if b.in_place { 0 } else { b_off };
                BPanel {
                    ptr: b.packed.add(off),
                    ld: width as isize,
                    width,
                }
            };
            for ir in (0..blk.mc).step_by(MR) {
                let mr = MR.min(blk.mc - ir);
                let a_panel = if a.in_place && mr == MR {
                    APanel {
                        ptr: a.ptr.offset(ir as isize * a.rs),
                        rs: a.rs,
                        cs: a.cs,
                    }
                } else {
                    let off = if a.in_place { 0 } else { ir * blk.kc };
                    APanel {
                        ptr: a.packed.add(off),
                        rs: 1,
                        cs: MR as isize,
                    }
                };
                let c = blk.c.offset(ir as isize * blk.ldc + jr as isize);
                tile(a_panel, b_panel, c, mr, nr);
            }
            b_off += blk.kc * width;
        }
    }
}

/// Packs the mc×kc block of `a` into MR-tall panels at `dst` (see [`Source`]):
/// all of them, or only a partial last one when A is read in place.
#[inline(always)]
unsafe fn pack_a(mc: usize, kc: usize, a: &Source, dst: *mut f32) {
    let (rsa, csa) = (a.rs, a.cs);
    // SAFETY (whole body): reads stay in the block, writes in mc↑MR × kc floats.
    unsafe {
        for ir in (0..mc).step_by(MR) {
            let mr = MR.min(mc - ir);
            if a.in_place && mr == MR {
                continue;
            }
            let panel = dst.add(if a.in_place { 0 } else { ir * kc });
            let a = a.ptr.offset(ir as isize * rsa);
            if csa == 1 && mr == MR {
                // Row-major A (conv forward's weights): six rows side by side.
                let rows: [*const f32; MR] = std::array::from_fn(|i| a.offset(i as isize * rsa));
                for p in 0..kc {
                    for (i, row) in rows.iter().enumerate() {
                        *panel.add(p * MR + i) = *row.add(p);
                    }
                }
            } else {
                for p in 0..kc {
                    let col = a.offset(p as isize * csa);
                    for i in 0..MR {
                        *panel.add(p * MR + i) = if i < mr {
                            *col.offset(i as isize * rsa)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Packs the kc×nc block of `b` into panels of [`panel_width`] columns at `dst`
/// (see [`Source`]): all of them, or only a partial last one when B is read in
/// place.
#[inline(always)]
unsafe fn pack_b(
    kc: usize,
    nc: usize,
    b: &Source,
    dst: *mut f32,
    pack_cols: &impl Fn(usize, *const f32, isize, *mut f32),
) {
    let (rsb, csb) = (b.rs, b.cs);
    // SAFETY (whole body): reads stay in the block, writes in nc↑NR × kc floats.
    unsafe {
        let mut off = 0;
        for jr in (0..nc).step_by(NR) {
            let nr = NR.min(nc - jr);
            let width = panel_width(nr);
            if b.in_place && nr == NR {
                continue;
            }
            let panel = dst.add(if b.in_place { 0 } else { off });
            let b = b.ptr.offset(jr as isize * csb);
            if csb == 1 && nr == NR {
                // Row-major B (conv forward's col matrix): copy row segments, as
                // one fixed-size move each (vector loads and stores, no memcpy).
                for p in 0..kc {
                    let src = b.offset(p as isize * rsb).cast::<[f32; NR]>();
                    panel
                        .add(p * NR)
                        .cast::<[f32; NR]>()
                        .write(src.read_unaligned());
                }
            } else if csb == 1 {
                for p in 0..kc {
                    let src = b.offset(p as isize * rsb);
                    let row = panel.add(p * width);
                    for j in 0..width {
                        *row.add(j) = if j < nr { *src.add(j) } else { 0.0 };
                    }
                }
            } else if rsb == 1 && nr == NR {
                // Column-major B (grad-weight's colᵀ): a transpose.
                pack_cols(kc, b, csb, panel);
            } else if rsb == 1 {
                for j in 0..nr {
                    let src = b.offset(j as isize * csb);
                    for p in 0..kc {
                        *panel.add(p * width + j) = *src.add(p);
                    }
                }
                for j in nr..width {
                    for p in 0..kc {
                        *panel.add(p * width + j) = 0.0;
                    }
                }
            } else {
                for p in 0..kc {
                    let src = b.offset(p as isize * rsb);
                    for j in 0..width {
                        *panel.add(p * width + j) = if j < nr {
                            *src.offset(j as isize * csb)
                        } else {
                            0.0
                        };
                    }
                }
            }
            off += kc * width;
        }
    }
}

/// Packs a full NR-wide panel of a column-major B (column j at `b + j*csb`, kc
/// long) at `panel` (row p at `p*NR`): the portable transpose.
unsafe fn pack_b_cols(kc: usize, b: *const f32, csb: isize, panel: *mut f32) {
    for j in 0..NR {
        // SAFETY: column j < NR of the block has kc elements; the panel kc×NR.
        unsafe {
            let src = b.offset(j as isize * csb);
            for p in 0..kc {
                *panel.add(p * NR + j) = *src.add(p);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2+FMA register tiles: 6×16 (two ymm per row) and 6×8 (one).

    use super::{for_each_tile, loop_nest, Operands, MR, NR};
    use std::arch::x86_64::*;

    /// [`Operands::blocked`] with the AVX2+FMA tiles (packing compiled for AVX2
    /// too).
    ///
    /// # Safety
    ///
    /// The CPU has AVX2 and FMA; the contract of [`Operands::blocked`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn blocked(op: &Operands, ap: *mut f32, bp: *mut f32) {
        // SAFETY: the caller's contract; the tiles `for_each_tile` hands out are
        // inside the block.
        unsafe {
            let pack_cols = |kc, b, csb, panel| pack_b_cols(kc, b, csb, panel);
            loop_nest(op, ap, bp, pack_cols, |blk| {
                let (kc, ldc, load) = (blk.kc, blk.ldc, blk.load);
                for_each_tile(blk, |a, b, c, mr, nr| {
                    let t = Tile {
                        c,
                        ldc,
                        mr,
                        nr,
                        load,
                    };
                    match (b.width == 16, a.cs == 1) {
                        (true, false) => tile::<2, false>(kc, a.ptr, a.cs, b.ptr, b.ld, t),
                        (true, true) => tile::<2, true>(kc, a.ptr, a.rs, b.ptr, b.ld, t),
                        (false, false) => tile::<1, false>(kc, a.ptr, a.cs, b.ptr, b.ld, t),
                        (false, true) => tile::<1, true>(kc, a.ptr, a.rs, b.ptr, b.ld, t),
                    }
                })
            })
        }
    }

    /// Where a tile's result goes: the valid `mr`×`nr` corner at `c`.
    struct Tile {
        c: *mut f32,
        ldc: isize,
        mr: usize,
        nr: usize,
        load: bool,
    }

    /// [`super::pack_b_cols`] by 8×8 transposes in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack_b_cols(kc: usize, b: *const f32, csb: isize, panel: *mut f32) {
        // SAFETY (whole body): columns j < NR of the block have kc elements, the
        // panel holds kc×NR floats (64-byte aligned, rows of 16).
        unsafe {
            let mut p = 0;
            while p + 8 <= kc {
                for half in 0..NR / 8 {
                    let col = |j: usize| b.offset((8 * half + j) as isize * csb).add(p);
                    let rows = transpose8(std::array::from_fn(|j| _mm256_loadu_ps(col(j))));
                    for (q, row) in rows.iter().enumerate() {
                        _mm256_store_ps(panel.add((p + q) * NR + 8 * half), *row);
                    }
                }
                p += 8;
            }
            for p in p..kc {
                for j in 0..NR {
                    *panel.add(p * NR + j) = *b.offset(j as isize * csb).add(p);
                }
            }
        }
    }

    /// The transpose of an 8×8 block held as eight rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// One k step of a tile: `acc[i][v] += A[i, p] * B[p, 8v..8v+8]`, with the B
    /// row at `b` and the A column at `a` (element i at `a[i]`), or, when `ROWS`,
    /// at `a` and `a3` (rows 0–2 at `a + i*a_rs`, rows 3–5 at `a3 + (i-3)*a_rs`:
    /// two bases and one stride, so no address arithmetic per step).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step<const NV: usize, const ROWS: bool>(
        acc: &mut [[__m256; NV]; MR],
        a: *const f32,
        a3: *const f32,
        a_rs: isize,
        b: *const f32,
    ) {
        // SAFETY: the caller passes a readable A column (MR floats) and B row
        // (8NV floats).
        unsafe {
            let bv: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(b.add(8 * v)));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = if ROWS {
                    let (base, r) = if i < 3 { (a, i) } else { (a3, i - 3) };
                    _mm256_broadcast_ss(&*base.offset(r as isize * a_rs))
                } else {
                    _mm256_broadcast_ss(&*a.add(i))
                };
                for (acc, bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(ai, *bv, *acc);
                }
            }
        }
    }

    /// C[mr×nr] (+)= A (MR×kc) · B (kc×8NV), NV ymm columns. A's columns are
    /// `a_step` apart and its rows contiguous (`ROWS == false`), or its rows
    /// `a_step` apart and columns contiguous (`ROWS`); B's rows are `ldb` apart.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const NV: usize, const ROWS: bool>(
        kc: usize,
        a: *const f32,
        a_step: isize,
        b: *const f32,
        ldb: isize,
        out: Tile,
    ) {
        let (a_rs, a_next) = if ROWS { (a_step, 1) } else { (1, a_step) };
        // SAFETY (whole body): A and B hold MR×kc and kc×8NV readable floats
        // with these strides; C is touched only in its valid mr×nr corner.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            let (mut a, mut b) = (a, b);
            // Only used when ROWS (MR rows exist, so this stays inside A).
            let mut a3 = if ROWS { a.offset(3 * a_rs) } else { a };
            // The pointers advance with `wrapping_offset`: after the last step
            // they may point past an operand read in place.
            let mut steps = kc;
            if NV == 1 {
                // Six accumulators cannot cover the FMA latency (2 pipes × 4
                // cycles): a second set takes the odd k, summed at the end.
                let mut odd = [[_mm256_setzero_ps(); NV]; MR];
                while steps >= 2 {
                    step::<NV, ROWS>(&mut acc, a, a3, a_rs, b);
                    let (a1, a31) = (a.wrapping_offset(a_next), a3.wrapping_offset(a_next));
                    step::<NV, ROWS>(&mut odd, a1, a31, a_rs, b.offset(ldb));
                    a = a.wrapping_offset(2 * a_next);
                    a3 = a3.wrapping_offset(2 * a_next);
                    b = b.wrapping_offset(2 * ldb);
                    steps -= 2;
                }
                for (row, odd) in acc.iter_mut().zip(&odd) {
                    for (acc, odd) in row.iter_mut().zip(odd) {
                        *acc = _mm256_add_ps(*acc, *odd);
                    }
                }
            }
            while steps > 0 {
                step::<NV, ROWS>(&mut acc, a, a3, a_rs, b);
                a = a.wrapping_offset(a_next);
                a3 = a3.wrapping_offset(a_next);
                b = b.wrapping_offset(ldb);
                steps -= 1;
            }
            // Whole vectors straight to C; a partial one (nr not a multiple of
            // 8) through a scratch vector. Index loops with constant bounds: an
            // iterator over `acc` would take its address and keep the
            // accumulators in memory for the whole k loop.
            let Tile {
                c,
                ldc,
                mr,
                nr,
                load,
            } = out;
            #[allow(clippy::needless_range_loop)]
            for i in 0..MR {
                if i == mr {
                    break;
                }
                let c = c.offset(i as isize * ldc);
                for v in 0..NV {
                    let acc = acc[i][v];
                    let cols = nr.saturating_sub(8 * v).min(8);
                    let p = c.add(8 * v);
                    if cols == 8 {
                        let sum = if load {
                            _mm256_add_ps(_mm256_loadu_ps(p), acc)
                        } else {
                            acc
                        };
                        _mm256_storeu_ps(p, sum);
                    } else if cols > 0 {
                        let mut part = [0.0f32; 8];
                        _mm256_storeu_ps(part.as_mut_ptr(), acc);
                        for (j, x) in part.iter().enumerate().take(cols) {
                            *p.add(j) = if load { *p.add(j) + x } else { *x };
                        }
                    }
                }
            }
        }
    }
}

mod portable {
    //! The plain-Rust register tile, same shapes as the AVX2 one.

    use super::{for_each_tile, loop_nest, pack_b_cols, APanel, BPanel, Operands, MR, NR};

    /// [`Operands::blocked`] with the portable tiles.
    ///
    /// # Safety
    ///
    /// The contract of [`Operands::blocked`].
    pub(super) unsafe fn blocked(op: &Operands, ap: *mut f32, bp: *mut f32) {
        // SAFETY: the caller's contract; the tiles `for_each_tile` hands out are
        // inside the block.
        unsafe {
            loop_nest(
                op,
                ap,
                bp,
                |kc, b, csb, panel| pack_b_cols(kc, b, csb, panel),
                |blk| {
                    for_each_tile(blk, |a, b, c, mr, nr| {
                        if b.width == NR {
                            tile::<NR>(blk.kc, a, b, c, blk.ldc, mr, nr, blk.load)
                        } else {
                            tile::<8>(blk.kc, a, b, c, blk.ldc, mr, nr, blk.load)
                        }
                    })
                },
            )
        }
    }

    /// C[mr×nr] (+)= A panel · B panel (W columns), multiply then add.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const W: usize>(
        kc: usize,
        a: APanel,
        b: BPanel,
        c: *mut f32,
        ldc: isize,
        mr: usize,
        nr: usize,
        load: bool,
    ) {
        let mut acc = [[0.0f32; W]; MR];
        for p in 0..kc as isize {
            // SAFETY: the panels hold MR×kc and kc×W readable floats.
            let (a_col, b_row) = unsafe {
                let b_row = &*b.ptr.offset(p * b.ld).cast::<[f32; W]>();
                let a_col: [f32; MR] =
                    std::array::from_fn(|i| *a.ptr.offset(i as isize * a.rs + p * a.cs));
                (a_col, b_row)
            };
            for (row, ai) in acc.iter_mut().zip(a_col) {
                for (acc, &bj) in row.iter_mut().zip(b_row) {
                    *acc += ai * bj;
                }
            }
        }
        // SAFETY: the caller's tile of C is mr×nr.
        unsafe { store_partial(acc.as_flattened(), W, c, ldc, mr, nr, load) }
    }

    /// Writes the valid `mr`×`nr` corner of a full tile (`acc`, row stride `acc_ld`)
    /// to C, adding to it when `load`.
    #[inline(always)]
    unsafe fn store_partial(
        acc: &[f32],
        acc_ld: usize,
        c: *mut f32,
        ldc: isize,
        mr: usize,
        nr: usize,
        load: bool,
    ) {
        for i in 0..mr {
            // SAFETY: row i < mr of the tile, columns < nr, are inside C.
            let row = unsafe { c.offset(i as isize * ldc) };
            for j in 0..nr {
                let v = acc[i * acc_ld + j];
                // SAFETY: as above.
                unsafe { *row.add(j) = if load { *row.add(j) + v } else { v } };
            }
        }
    }
}
