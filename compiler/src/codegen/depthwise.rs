//! Depthwise convolution kernels (conv2d with groups = input channels, each
//! channel convolved with its own `multiplier` filters): forward, input gradient
//! and weight gradient, as direct loops (a GEMM has `M = 1` here).
//!
//! # One loop nest for all three
//!
//! Every kernel walks one plane (`y` for the forward, `dx` for the input
//! gradient, `dy` for the weight gradient) in tiles of four consecutive columns
//! of one row (an f32x4), and reads, per kernel tap, four lanes of a row of the
//! other plane. Which input position tap `t` of walked position `o` reads is an
//! [`Axis`] per spatial axis:
//!
//! - forward and weight gradient: `i = o·s − p + t·d`;
//! - input gradient ("transposed"): `i = (o + p − t·d)/s` when `s` divides it.
//!
//! A position outside the input (padding), or a transposed one that `s` does
//! not divide, reads zero. So the stride-1 input gradient is the forward
//! convolution with the flipped kernel and padding `d·(k−1) − p`, by the same
//! code. Everything about positions is decided at compile time:
//!
//! - **Rows**: each walked row gets its list of `(tap, input row)`; rows whose
//!   lists have the same taps and advance linearly (by the stride, or by one
//!   every `s` rows when transposed) share one run-time loop ([`progressions`]).
//!   So padding costs no test in the hot loop: a 3×3 pad-1 stride-1 forward has
//!   three row loops (top, interior, bottom).
//! - **Columns**: each tile gets, per tap, a [`Read`]: one unaligned f32x4 load
//!   when its lanes are four consecutive columns (stride 1); two loads and a
//!   `shufps` when they are every other column (stride 2; the loads start at
//!   even columns so that the three taps of a kernel row share them); at the
//!   edges of a row, loads and a lane shuffle with zeros for the padding lanes,
//!   chosen among the shapes x86 does in one instruction (`palignr`, `unpcklps`,
//!   blend, `shufps`); lane-by-lane scalar loads only when nothing else fits
//!   (rows narrower than 4, strides above 3). Tiles whose reads are the same up
//!   to a constant shift share a run-time loop: a row of 16 outputs is a left
//!   edge tile, a loop of two plain tiles, a right edge tile.
//! - The **stride-2 input gradient** walks tiles of eight columns as two phases
//!   (even and odd columns of `dx`), each reading consecutive `dy` columns with
//!   its own taps, interleaved when stored (`unpcklps`/`unpckhps`). Four-column
//!   tiles read every other lane as zero (an FMA on zeros and a shuffle per
//!   read): measured about 2× slower (dw2 1.5 ms, dw4 0.74 ms; table below).
//! - Rows whose width is not a multiple of the tile end with a tile overlapping
//!   the one before (the forward and input gradient write the same values
//!   twice); the weight gradient, which sums, ends with a partial tile whose
//!   extra lanes read zero. Rows narrower than 4 are one partial tile.
//!
//! # Loops and registers
//!
//! Forward and input gradient ([`Par::Items`]): batch items, channels, and per
//! channel its `KH·KW` weights (`× multiplier` for the input gradient, which
//! sums over the channel's filters) loaded once and splatted, then the rows and
//! tiles. A tile accumulates its taps in [`CHAINS`] = 3 alternating f32x4
//! chains, each started by a product (measured at M3's stride-1 layers: one
//! chain 1.28–1.42 ms, two 1.01–1.10, three 0.92–0.99, four no better, nine
//! (all products, then a sum) 1.08–1.17: the chain latency limited one and
//! two).
//!
//! Weight gradient ([`Par::Reduce`]): batch items outermost (the planes are
//! read in memory order; channels outermost fetched a 4 KiB plane every
//! 256 KiB and ran 1.15–1.7× slower), then channels, rows and tiles, with one
//! f32x4 sum per filter and tap in the per-thread scratch, loaded into
//! registers for a plane and stored back after it; the sums are zeroed first
//! and added across lanes into `dw` last (zeros for an empty range).
//!
//! # Speed
//!
//! Measured by `examples/depthwise_speed.rs` (one Zen 3 core, batch 64, 3×3
//! pad 1; best of 40 runs, ±5% between runs on a shared machine):
//!
//! | layer | x | forward | input grad | weight grad |
//! |---|---|---|---|---|
//! | dw1 | `[64, 32, 32, 32]`, s1 | 0.94 ms | 0.97 ms | 0.94 ms |
//! | dw2 | `[64, 64, 32, 32]`, s2 | 0.90 ms | 0.72 ms | 0.77–0.98 ms |
//! | dw3 | `[64, 128, 16, 16]`, s1 | 0.92–0.99 ms | 0.95 ms | 0.81–0.90 ms |
//! | dw4 | `[64, 128, 16, 16]`, s2 | 0.43 ms | 0.31 ms | 0.39 ms |
//!
//! The stride-1 kernels run at 38–45 GFLOP/s: that is the multiply bound of
//! 128-bit vectors (9 multiplies per f32x4 of outputs, two per cycle; the
//! weight gradient's 45 GFLOP/s puts it at about 46 on this core), not the
//! memory bound (dw3 moves 16 MiB, about 0.45 ms at the 38 GB/s a copy reaches
//! here). Cranelift has no 256-bit vectors on x86, so going well below ~0.8 ms
//! needs fewer multiplies or native AVX2 code. Stride 2 with scalar-lane gathers instead of shuffles measured
//! 1.9× slower (dw2 forward 1.72 ms, dw4 0.83 ms).
//!
//! # f64
//!
//! The tiles above are f32x4's (their shuffles are four-lane). In f64 (gradient
//! checks) all three kernels are plain scalar loops instead ([`scalar_kernel`]):
//! per item, filter and output position, the valid taps from conv.rs's
//! [`runs`]; the input gradient is a scatter into the zeroed `dx` plane, the
//! weight gradient carries one sum per tap through the plane. The weight
//! gradient's f32x4 scratch is then unused.

use super::builder::{Bound, Kb, F32, F32X4};
use super::conv::runs;
use super::DType;
use super::{Emit, Par};
use crate::ir::{ConvAttrs, Graph, Node, Op, Shape};
use cranelift_codegen::ir::{types, ConstantData, Endianness, InstBuilder, MemFlagsData, Value};

/// The depthwise kernels. `x` is `[N, C, H, W]`, `w` is `[C·mult, 1, KH, KW]`,
/// `y`/`dy` is `[N, C·mult, OH, OW]`; `attrs.groups == C > 1`.
#[derive(Clone, Debug, PartialEq)]
pub enum DepthwiseKernel {
    /// [`Par::Items`]: `y[n,o,oh,ow] = Σ_{kh,kw} x[n, o/mult, oh·s−p+kh·d,
    /// ow·s−p+kw·d] · w[o,0,kh,kw]` (zero outside `x`). Buffers: `x`, `w`, `y`.
    Forward {
        x: Shape,
        w: Shape,
        attrs: ConvAttrs,
    },
    /// [`Par::Items`]: `dx[n,c,ih,iw] = Σ_{m,kh,kw} dy[n, c·mult+m, oh, ow] ·
    /// w[c·mult+m,0,kh,kw]` over the `(oh, ow)` whose window reads `(ih, iw)`
    /// at tap `(kh, kw)`; every element of `dx` is written. `input` is `[H, W]`.
    /// Buffers: `dy`, `w`, `dx`.
    GradInput {
        dy: Shape,
        w: Shape,
        attrs: ConvAttrs,
        input: [usize; 2],
    },
    /// [`Par::Reduce`]: `dw[o,0,kh,kw] = Σ_{n,oh,ow} dy[n,o,oh,ow] · x[n, o/mult,
    /// oh·s−p+kh·d, ow·s−p+kw·d]` over the batch items of the work range
    /// (overwritten; zeros for an empty range). `kernel` is `[KH, KW]`.
    /// Buffers: `x`, `dy`, `dw`.
    GradWeight {
        x: Shape,
        dy: Shape,
        attrs: ConvAttrs,
        kernel: [usize; 2],
    },
}

/// Whether a convolution with `attrs` over `channels` input channels is
/// depthwise (one group per input channel, more than one channel): the
/// convolutions this file computes and `conv.rs` leaves alone.
pub fn is_depthwise(attrs: &ConvAttrs, channels: usize) -> bool {
    attrs.groups > 1 && attrs.groups == channels
}

impl DepthwiseKernel {
    /// The kernel of a `Conv2d`, `Conv2dGradInput` or `Conv2dGradWeight` node
    /// whose groups equal the input channels (and are more than one); every other
    /// node (ordinary and grouped convolutions included) gives `None`.
    pub(crate) fn from_node(g: &Graph, node: &Node) -> Option<DepthwiseKernel> {
        let shape = |i: usize| g.shape(node.inputs[i]).clone();
        let depthwise = is_depthwise;
        Some(match &node.op {
            Op::Conv2d(a) if depthwise(a, shape(0)[1]) => DepthwiseKernel::Forward {
                x: shape(0),
                w: shape(1),
                attrs: *a,
            },
            // x's channels are w[1]·groups.
            Op::Conv2dGradInput(a, hw) if depthwise(a, shape(1)[1] * a.groups) => {
                DepthwiseKernel::GradInput {
                    dy: shape(0),
                    w: shape(1),
                    attrs: *a,
                    input: *hw,
                }
            }
            Op::Conv2dGradWeight(a, k) if depthwise(a, shape(0)[1]) => {
                DepthwiseKernel::GradWeight {
                    x: shape(0),
                    dy: shape(1),
                    attrs: *a,
                    kernel: *k,
                }
            }
            _ => return None,
        })
    }

    fn op(&self) -> Op {
        match self {
            DepthwiseKernel::Forward { attrs, .. } => Op::Conv2d(*attrs),
            DepthwiseKernel::GradInput { attrs, input, .. } => Op::Conv2dGradInput(*attrs, *input),
            DepthwiseKernel::GradWeight { attrs, kernel, .. } => {
                Op::Conv2dGradWeight(*attrs, *kernel)
            }
        }
    }

    /// The sizes of the convolution.
    fn geom(&self) -> Geom {
        let (x, w, y, a) = match self {
            DepthwiseKernel::Forward { x, w, attrs } => (x.clone(), w.clone(), self.out(), *attrs),
            DepthwiseKernel::GradInput { dy, w, attrs, .. } => {
                (self.out(), w.clone(), dy.clone(), *attrs)
            }
            DepthwiseKernel::GradWeight { x, dy, attrs, .. } => {
                (x.clone(), self.out(), dy.clone(), *attrs)
            }
        };
        Geom {
            c: x[1],
            mult: w[0] / x[1],
            h: x[2],
            w: x[3],
            kh: w[2],
            kw: w[3],
            oh: y[2],
            ow: y[3],
            a,
        }
    }

    fn out(&self) -> Shape {
        let ins = self.inputs();
        let refs: Vec<&Shape> = ins.iter().collect();
        self.op()
            .infer(&refs)
            .expect("validated when compiled")
            .remove(0)
    }
}

impl Emit for DepthwiseKernel {
    fn inputs(&self) -> Vec<Shape> {
        match self {
            DepthwiseKernel::Forward { x, w, .. } => vec![x.clone(), w.clone()],
            DepthwiseKernel::GradInput { dy, w, .. } => vec![dy.clone(), w.clone()],
            DepthwiseKernel::GradWeight { x, dy, .. } => vec![x.clone(), dy.clone()],
        }
    }

    fn outputs(&self) -> Vec<Shape> {
        vec![self.out()]
    }

    /// The weight gradient's f32x4 sums, one per filter and tap.
    fn scratch(&self) -> usize {
        match self {
            DepthwiseKernel::GradWeight { .. } => {
                let g = self.geom();
                4 * g.c * g.mult * g.kh * g.kw
            }
            _ => 0,
        }
    }

    fn par(&self) -> Par {
        match self {
            DepthwiseKernel::Forward { .. } | DepthwiseKernel::GradInput { .. } => Par::Items,
            DepthwiseKernel::GradWeight { .. } => Par::Reduce,
        }
    }

    /// `2·O·OH·OW·KH·KW` for all three (one multiply-add per output and tap;
    /// the zero lanes of the strided input gradient not counted).
    fn flops_per_item(&self) -> u64 {
        let g = self.geom();
        2 * (g.c * g.mult * g.oh * g.ow * g.kh * g.kw) as u64
    }

    fn validate(&self) -> Result<(), String> {
        let ins = self.inputs();
        if ins.iter().any(|s| s.len() != 4) {
            return Err(format!("depthwise conv needs rank-4 operands, got {ins:?}"));
        }
        let refs: Vec<&Shape> = ins.iter().collect();
        self.op().infer(&refs)?;
        let g = self.geom();
        if g.a.groups != g.c || g.c < 2 {
            return Err(format!(
                "not a depthwise conv: groups {} with {} input channels",
                g.a.groups, g.c
            ));
        }
        Ok(())
    }

    fn emit(&self, kb: &mut Kb) {
        let g = self.geom();
        if kb.dt != DType::F32 {
            return scalar_kernel(kb, &g, self);
        }
        match self {
            DepthwiseKernel::Forward { .. } => forward(kb, &g),
            DepthwiseKernel::GradInput { .. } => grad_input(kb, &g),
            DepthwiseKernel::GradWeight { .. } => grad_weight(kb, &g),
        }
    }
}

/// The shapes of one depthwise convolution (`x[N, C, H, W]`, `w[C·mult, 1, KH,
/// KW]`, `y[N, C·mult, OH, OW]`).
#[derive(Clone, Copy, Debug)]
struct Geom {
    c: usize,
    mult: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    a: ConvAttrs,
}

impl Geom {
    /// Bytes of one `x` plane and one `y` plane.
    fn x_plane(&self) -> i64 {
        4 * (self.h * self.w) as i64
    }
    fn y_plane(&self) -> i64 {
        4 * (self.oh * self.ow) as i64
    }

    /// The row and column axes, walking `y` and reading `x` (forward, weight
    /// gradient) or walking `x` and reading `y` (`transposed`: input gradient).
    fn axes(&self, transposed: bool) -> [Axis; 2] {
        let a = &self.a;
        let axis = |i: usize, (y, x): (usize, usize), k: usize| {
            let (out, inp) = if transposed { (x, y) } else { (y, x) };
            Axis {
                out,
                inp,
                k,
                s: a.stride[i],
                p: a.pad[i],
                d: a.dilation[i],
                transposed,
            }
        };
        [
            axis(0, (self.oh, self.h), self.kh),
            axis(1, (self.ow, self.w), self.kw),
        ]
    }
}

// ---------------------------------------------------------------------------
// The compile-time plan: which input positions every tile reads.

/// One spatial axis: `out` positions walked, `inp` positions read, tap `t` of
/// `k` (see the module doc for the two mappings).
#[derive(Clone, Copy, Debug)]
struct Axis {
    out: usize,
    inp: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    transposed: bool,
}

impl Axis {
    /// The input position tap `t` of walked position `o` reads, if any.
    fn src(&self, o: usize, t: usize) -> Option<i64> {
        let (o, t) = (o as i64, t as i64);
        let (s, p, d) = (self.s as i64, self.p as i64, self.d as i64);
        let i = if self.transposed {
            let n = o + p - t * d;
            if n.rem_euclid(s) != 0 {
                return None;
            }
            n.div_euclid(s)
        } else {
            o * s - p + t * d
        };
        (0..self.inp as i64).contains(&i).then_some(i)
    }
}

/// Items at positions `o0 + j·ostep` (`j < count`) whose description is
/// `first` shifted by `j·delta` input positions (and `j·ostep` walked ones).
#[derive(Clone, Debug)]
struct Prog<D> {
    o0: usize,
    ostep: usize,
    count: usize,
    delta: i64,
    first: D,
}

/// What a description is made of, for [`progressions`].
trait Shifts: Clone + PartialEq {
    /// The first input position it reads (none: reads nothing).
    fn anchor(&self) -> Option<i64>;
    /// The same reads `din` input and `dout` walked positions further.
    fn shifted(&self, din: i64, dout: i64) -> Self;
}

/// Groups `(position, description)` items (in increasing position) into
/// arithmetic progressions of positions whose descriptions shift linearly: each
/// becomes one run-time loop. Interleaved progressions (the phases of a
/// transposed stride) are found too.
fn progressions<D: Shifts>(items: Vec<(usize, D)>) -> Vec<Prog<D>> {
    let mut out: Vec<Prog<D>> = Vec::new();
    'items: for (o, d) in items {
        for g in out.iter_mut().rev() {
            if g.count == 1 {
                let delta = match (d.anchor(), g.first.anchor()) {
                    (Some(a), Some(b)) => a - b,
                    (None, None) => 0,
                    _ => continue,
                };
                let ostep = o - g.o0;
                if g.first.shifted(delta, ostep as i64) == d {
                    (g.ostep, g.delta, g.count) = (ostep, delta, 2);
                    continue 'items;
                }
            } else if o == g.o0 + g.count * g.ostep {
                let j = g.count as i64;
                if g.first.shifted(j * g.delta, j * g.ostep as i64) == d {
                    g.count += 1;
                    continue 'items;
                }
            }
        }
        out.push(Prog {
            o0: o,
            ostep: 0,
            count: 1,
            delta: 0,
            first: d,
        });
    }
    out
}

/// A walked row's valid taps: `(tap, input row)`.
type RowTaps = Vec<(usize, i64)>;

impl Shifts for RowTaps {
    fn anchor(&self) -> Option<i64> {
        self.first().map(|&(_, i)| i)
    }
    fn shifted(&self, din: i64, _dout: i64) -> Self {
        self.iter().map(|&(t, i)| (t, i + din)).collect()
    }
}

/// The rows of `ax` in loops.
fn row_plan(ax: &Axis) -> Vec<Prog<RowTaps>> {
    let items = (0..ax.out)
        .map(|o| {
            let taps: RowTaps = (0..ax.k)
                .filter_map(|t| ax.src(o, t).map(|i| (t, i)))
                .collect();
            (o, taps)
        })
        .collect();
    progressions(items)
}

/// How four lanes are read from a row (columns are absolute within the row).
#[derive(Clone, Debug, PartialEq)]
enum Read {
    /// Columns `a..a+4`: one load.
    Vector(i64),
    /// One or two f32x4 loads at columns `at`, then lane `l` is lane
    /// `pick[l] = (load, lane)` of them, or zero.
    Shuffle {
        at: Vec<i64>,
        pick: [Option<(u8, u8)>; 4],
    },
    /// Lane `l` is column `cols[l]` (one scalar load each), or zero.
    Gather([Option<i64>; 4]),
}

impl Read {
    /// The read of lanes `src` (a column each, or `None` for zero) from a row of
    /// `width` columns; `None` when every lane is zero.
    fn new(src: [Option<i64>; 4], width: usize) -> Option<Read> {
        let mut cols: Vec<i64> = src.iter().flatten().copied().collect();
        let first = *cols.first()?;
        if src
            .iter()
            .enumerate()
            .all(|(l, &c)| c == Some(first + l as i64))
        {
            return Some(Read::Vector(first));
        }
        let width = width as i64;
        if width < 4 {
            return Some(Read::Gather(src));
        }
        cols.sort_unstable();
        // Every other column: start the loads at an even column, so that the
        // taps of one row (odd and even first columns) load the same vectors.
        let l0 = src.iter().position(Option::is_some).expect("a valid lane") as i64;
        let strided = src
            .iter()
            .enumerate()
            .all(|(l, &c)| c.is_none_or(|c| c == first + 2 * (l as i64 - l0)))
            && cols.len() > 1;
        let mut starts = vec![first.min(width - 4)];
        if strided && first % 2 == 1 {
            starts.insert(0, (first - 1).min(width - 4));
        }
        for b0 in starts {
            let mut at = vec![b0];
            let mut rest: Vec<i64> = cols.iter().copied().filter(|&c| c >= b0 + 4).collect();
            if cols[0] < b0 {
                continue;
            }
            if let Some(&c) = rest.first() {
                // Right after the first load when that covers the rest (so
                // that neighbouring taps share loads), else at the first
                // column left.
                let next = b0 + 4;
                let b1 = if rest.iter().all(|&c| c < next + 4) && next + 4 <= width {
                    next
                } else {
                    c.min(width - 4)
                };
                at.push(b1);
                rest.retain(|&c| c >= b1 + 4);
            }
            if !rest.is_empty() {
                continue;
            }
            let pick = src.map(|c| {
                c.map(|c| {
                    let i = at.iter().position(|&b| (b..b + 4).contains(&c)).unwrap();
                    (i as u8, (c - at[i]) as u8)
                })
            });
            return Some(Read::Shuffle { at, pick });
        }
        Some(Read::Gather(src))
    }

    fn anchor(&self) -> i64 {
        match self {
            Read::Vector(a) => *a,
            Read::Shuffle { at, .. } => at[0],
            Read::Gather(c) => c.iter().flatten().copied().next().unwrap_or(0),
        }
    }

    fn shifted(&self, d: i64) -> Read {
        match self {
            Read::Vector(a) => Read::Vector(a + d),
            Read::Shuffle { at, pick } => Read::Shuffle {
                at: at.iter().map(|a| a + d).collect(),
                pick: *pick,
            },
            Read::Gather(c) => Read::Gather(c.map(|c| c.map(|c| c + d))),
        }
    }
}

/// One tile from walked column `o` (the progression's position): four
/// consecutive columns, or, as two `phases`, eight columns whose even columns
/// are lanes of the first and odd columns lanes of the second (see [`col_plan`]).
#[derive(Clone, Debug, PartialEq)]
struct Tile {
    /// Valid lanes: 4, or fewer in a last partial tile.
    lanes: usize,
    /// Per phase, the reads of the other plane: `(tap, read)` for the taps that
    /// read anything.
    phases: Vec<Vec<(usize, Read)>>,
    /// The read of the walked plane itself (the weight gradient's `dy`).
    own: Option<Read>,
}

impl Shifts for Tile {
    fn anchor(&self) -> Option<i64> {
        self.phases.iter().flatten().next().map(|(_, r)| r.anchor())
    }
    fn shifted(&self, din: i64, dout: i64) -> Tile {
        Tile {
            lanes: self.lanes,
            phases: self
                .phases
                .iter()
                .map(|taps| taps.iter().map(|(t, r)| (*t, r.shifted(din))).collect())
                .collect(),
            own: self.own.as_ref().map(|r| r.shifted(dout)),
        }
    }
}

/// The column tiles of `ax` in loops. With `overlap`, a width that is not a
/// multiple of the tile ends with a tile overlapping the previous one; else (and
/// always below 4 columns) with a partial tile. `own`: tiles also read the
/// walked row.
///
/// The input gradient of a stride-2 axis walks tiles of eight columns as two
/// phases (even and odd columns): each phase's lanes read consecutive `dy`
/// columns with its own taps, and the two are interleaved when stored. That
/// does the FMAs of the valid taps only (four-column tiles would read every
/// other lane as zero and spend a shuffle on each read).
fn col_plan(ax: &Axis, overlap: bool, own: bool) -> Vec<Prog<Tile>> {
    let n = ax.out;
    let phases = if ax.transposed && ax.s == 2 && overlap && n >= 8 {
        2
    } else {
        1
    };
    let width = 4 * phases;
    let mut starts: Vec<(usize, usize)> = (0..n / width).map(|t| (width * t, 4)).collect();
    if !n.is_multiple_of(width) {
        starts.push(if overlap && n >= width {
            (n - width, 4)
        } else {
            (n / 4 * 4, n % 4)
        });
    }
    let items = starts
        .into_iter()
        .map(|(o, lanes)| {
            let col = |l: usize, ph: usize| (l < lanes).then_some(o + phases * l + ph);
            let phases = (0..phases)
                .map(|ph| {
                    (0..ax.k)
                        .filter_map(|t| {
                            let src = [0, 1, 2, 3].map(|l| col(l, ph).and_then(|c| ax.src(c, t)));
                            Read::new(src, ax.inp).map(|r| (t, r))
                        })
                        .collect()
                })
                .collect();
            let own = own.then(|| {
                let src = [0, 1, 2, 3].map(|l| col(l, 0).map(|c| c as i64));
                Read::new(src, n).expect("a tile has a lane")
            });
            (o, Tile { lanes, phases, own })
        })
        .collect();
    progressions(items)
}

// ---------------------------------------------------------------------------
// Emission.

/// Runs `body(kb, ptrs, carried) → carried` `count` times, advancing each of
/// `ptrs` by its `steps` (bytes) between runs: a run-time loop, or the body
/// alone when `count == 1`.
fn repeat(
    kb: &mut Kb,
    count: usize,
    ptrs: &[Value],
    steps: &[i64],
    carried: &[Value],
    body: impl FnOnce(&mut Kb, &[Value], &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    if count == 1 {
        return body(kb, ptrs, carried);
    }
    let np = ptrs.len();
    let init: Vec<Value> = ptrs.iter().chain(carried).copied().collect();
    let out = kb.for_range(
        Bound::Const(0),
        Bound::Const(count as i64),
        1,
        &init,
        |kb, _, vals| {
            let (p, c) = vals.split_at(np);
            let next = body(kb, p, c);
            let mut v: Vec<Value> = p
                .iter()
                .zip(steps)
                .map(|(&p, &s)| kb.b.ins().iadd_imm_s(p, s))
                .collect();
            v.extend(next);
            v
        },
    );
    out[np..].to_vec()
}

/// Lanes `idx` of the eight lanes of `a ‖ b` (0–3 from `a`, 4–7 from `b`).
fn shuffle32(kb: &mut Kb, a: Value, b: Value, idx: [u8; 4]) -> Value {
    let le = MemFlagsData::new().with_endianness(Endianness::Little);
    let ab = kb.b.ins().bitcast(types::I8X16, le, a);
    let bb = kb.b.ins().bitcast(types::I8X16, le, b);
    let bytes: Vec<u8> = idx
        .iter()
        .flat_map(|&l| (0..4).map(move |k| 4 * l + k))
        .collect();
    let mask = kb.b.func.dfg.immediates.push(ConstantData::from(bytes));
    let r = kb.b.ins().shuffle(ab, bb, mask);
    kb.b.ins().bitcast(F32X4, le, r)
}

/// Lane `l` is lane `lanes[l]` of `v`, or zero: one shuffle with a zero
/// vector, in a form x86 does in one instruction when there is one (see
/// [`zero_pattern`]; else two `pshufb` and an `or`).
fn with_zeros(kb: &mut Kb, v: Value, lanes: [Option<u8>; 4]) -> Value {
    let zero = kb.zero(F32X4);
    match zero_pattern(lanes) {
        Some((true, idx)) => shuffle32(kb, v, zero, idx),
        Some((false, idx)) => shuffle32(kb, zero, v, idx),
        None => shuffle32(kb, v, zero, lanes.map(|k| k.unwrap_or(4))),
    }
}

/// The lanes of `v ‖ zero` (`true`) or `zero ‖ v` (`false`) that make lane `l`
/// lane `lanes[l]` of `v` (or zero) in one of the shapes Cranelift lowers to
/// one x86 instruction: a shift (`palignr`), `unpcklps`/`unpckhps`, a blend,
/// `shufps`.
fn zero_pattern(lanes: [Option<u8>; 4]) -> Option<(bool, [u8; 4])> {
    for v_first in [true, false] {
        let from_v = |k: u8| if v_first { k } else { 4 + k };
        let is_zero = |i: u8| (i >= 4) == v_first;
        let fits = |idx: &[u8; 4]| {
            (0..4).all(|l| match lanes[l] {
                Some(k) => idx[l] == from_v(k),
                None => is_zero(idx[l]),
            })
        };
        let z = if v_first { 4 } else { 0 };
        let mut candidates: Vec<[u8; 4]> = (0..=4).map(|s| [s, s + 1, s + 2, s + 3]).collect();
        candidates.push([0, 4, 1, 5]);
        candidates.push([2, 6, 3, 7]);
        // Blend: lanes in place.
        candidates.push([0u8, 1, 2, 3].map(|l| lanes[l as usize].map_or(z + l, |_| from_v(l))));
        // shufps: lanes 0-1 from `a`, 2-3 from `b` (or the reverse).
        let any = [0u8, 1, 2, 3].map(|l| lanes[l as usize].map_or(z, from_v));
        let halves = |lo: bool| (0..4).all(|l| (any[l] < 4) == ((l < 2) == lo));
        if halves(true) || halves(false) {
            candidates.push(any);
        }
        if let Some(idx) = candidates.into_iter().find(fits) {
            return Some((v_first, idx));
        }
    }
    None
}

/// Lanes `pick[l] = (load, lane)` of two loads, or zero: a `shufps` that
/// gathers the picked lanes (lanes 0-1 from the first load, 2-3 from the
/// second, in some order) and a [`with_zeros`] that places them, when such a
/// pair exists (the padded edge of a stride-2 row: `[0, x1, x3, x5]` is
/// `shufps` to `[x1, x3, x5, x7]` and a shift); else a general shuffle and a
/// blend.
fn two_loads_with_zeros(kb: &mut Kb, v: [Value; 2], pick: [Option<(u8, u8)>; 4]) -> Value {
    let valid: Vec<usize> = (0..4).filter(|&l| pick[l].is_some()).collect();
    // Every placement of the valid lanes at distinct positions of the
    // intermediate vector (position 0-1 for the first load, 2-3 the second).
    let n = valid.len();
    for code in 0..4usize.pow(n as u32) {
        let pos: Vec<u8> = (0..n)
            .map(|j| (code / 4usize.pow(j as u32) % 4) as u8)
            .collect();
        let distinct = (0..n).all(|a| (0..a).all(|b| pos[a] != pos[b]));
        let halves = valid
            .iter()
            .zip(&pos)
            .all(|(&l, &p)| (p >= 2) == (pick[l].expect("valid").0 == 1));
        if !distinct || !halves {
            continue;
        }
        let mut second = [None; 4];
        for (&l, &p) in valid.iter().zip(&pos) {
            second[l] = Some(p);
        }
        if zero_pattern(second).is_none() {
            continue;
        }
        let mut first = [0, 1, 4, 5];
        for (&l, &p) in valid.iter().zip(&pos) {
            let (i, k) = pick[l].expect("valid");
            first[p as usize] = 4 * i + k;
        }
        let s = shuffle32(kb, v[0], v[1], first);
        return with_zeros(kb, s, second);
    }
    let idx = pick.map(|q| q.map_or(0, |(i, k)| 4 * i + k));
    let s = shuffle32(kb, v[0], v[1], idx);
    with_zeros(kb, s, [0, 1, 2, 3].map(|l| pick[l as usize].map(|_| l)))
}

/// Emits `read` from the row at byte offset `row` from `p`.
fn emit_read(kb: &mut Kb, p: Value, row: i64, read: &Read) -> Value {
    match read {
        Read::Vector(a) => kb.load_in(F32X4, p, row + 4 * a),
        Read::Shuffle { at, pick } => {
            let v: Vec<Value> = at
                .iter()
                .map(|&a| kb.load_in(F32X4, p, row + 4 * a))
                .collect();
            if v.len() == 1 {
                return with_zeros(kb, v[0], pick.map(|q| q.map(|(_, l)| l)));
            }
            if pick.iter().all(Option::is_some) {
                return shuffle32(
                    kb,
                    v[0],
                    v[1],
                    pick.map(|q| q.map_or(0, |(i, k)| 4 * i + k)),
                );
            }
            two_loads_with_zeros(kb, [v[0], v[1]], *pick)
        }
        Read::Gather(cols) => {
            let mut v = kb.zero(F32X4);
            for (l, c) in cols.iter().enumerate() {
                if let Some(c) = c {
                    let s = kb.load_in(F32, p, row + 4 * c);
                    v = kb.b.ins().insertlane(v, s, l as u8);
                }
            }
            v
        }
    }
}

/// The `KH·KW` weights of filter `o` (a run-time index), splatted.
fn weights(kb: &mut Kb, g: &Geom, w: Value, o: Value) -> Vec<Value> {
    let taps = g.kh * g.kw;
    let wo = kb.offset(w, o, 4 * taps as i64);
    (0..taps)
        .map(|t| {
            let s = kb.load_in(F32, wo, 4 * t as i64);
            kb.splat(F32X4, s)
        })
        .collect()
}

/// `for i in 0..n` (constant bounds), the body emitted once without a loop
/// when `n == 1`.
fn each(kb: &mut Kb, n: usize, mut body: impl FnMut(&mut Kb, Value)) {
    if n == 1 {
        let i = kb.iconst(0);
        body(kb, i);
    } else {
        kb.for_range(
            Bound::Const(0),
            Bound::Const(n as i64),
            1,
            &[],
            |kb, i, _| {
                body(kb, i);
                vec![]
            },
        );
    }
}

/// The loops over one pair of planes: the walked plane's rows and tiles, and
/// the bytes per row of the walked (`out_row`) and the read (`in_row`) plane.
struct Plan {
    rows: Vec<Prog<RowTaps>>,
    cols: Vec<Prog<Tile>>,
    out_row: i64,
    in_row: i64,
    /// Taps per kernel row (`KW`).
    kw: usize,
}

impl Plan {
    fn new(g: &Geom, transposed: bool, sums: bool) -> Plan {
        let [rows, cols] = g.axes(transposed);
        Plan {
            rows: row_plan(&rows),
            cols: col_plan(&cols, !sums, sums),
            out_row: 4 * cols.out as i64,
            in_row: 4 * cols.inp as i64,
            kw: g.kw,
        }
    }

    /// Emits `body(kb, read ptr, walked ptr, row taps, tile, carried) →
    /// carried` for every tile, the pointers at the tile's row (the read
    /// plane's first row for the row progression) and advanced past
    /// `t·ostep` columns (`t·delta` read columns) inside a column progression.
    fn walk(
        &self,
        kb: &mut Kb,
        inp: Value,
        out: Value,
        carried: Vec<Value>,
        body: &mut TileBody,
    ) -> Vec<Value> {
        let mut carried = carried;
        for r in &self.rows {
            let out0 = kb.b.ins().iadd_imm_s(out, self.out_row * r.o0 as i64);
            let steps = [self.in_row * r.delta, self.out_row * r.ostep as i64];
            carried = repeat(kb, r.count, &[inp, out0], &steps, &carried, |kb, p, acc| {
                let mut acc = acc.to_vec();
                for c in &self.cols {
                    let steps = [4 * c.delta, 4 * c.ostep as i64];
                    acc = repeat(kb, c.count, p, &steps, &acc, |kb, q, acc| {
                        body(kb, q[0], q[1], &r.first, c, acc)
                    });
                }
                acc
            });
        }
        carried
    }
}

/// What [`Plan::walk`] does per tile: `(kb, read ptr, walked ptr, row taps,
/// tile, carried) → carried`.
type TileBody<'f> =
    dyn FnMut(&mut Kb, Value, Value, &RowTaps, &Prog<Tile>, &[Value]) -> Vec<Value> + 'f;

/// A plane read by the forward or input gradient: its byte offset from the
/// read pointer and the (splatted) weights applied to it.
struct Src {
    off: i64,
    w: Vec<Value>,
}

/// Independent f32x4 accumulation chains per output tile (the taps alternate
/// between them).
const CHAINS: usize = 3;

/// Writes the walked plane `out` from the planes `srcs` read at `inp`.
fn store_plane(kb: &mut Kb, plan: &Plan, inp: Value, out: Value, srcs: &[Src]) {
    let mut body = |kb: &mut Kb, p: Value, q: Value, rt: &RowTaps, c: &Prog<Tile>, _: &[Value]| {
        let ys: Vec<Value> = c
            .first
            .phases
            .iter()
            .map(|taps| {
                // The first term of a chain is a product (no zero register).
                let mut acc: Vec<Value> = Vec::with_capacity(CHAINS);
                let mut k = 0;
                for s in srcs {
                    for &(th, i) in rt {
                        for (tw, read) in taps {
                            let v = emit_read(kb, p, s.off + plan.in_row * i, read);
                            let w = s.w[th * plan.kw + tw];
                            if k < CHAINS {
                                acc.push(kb.b.ins().fmul(v, w));
                            } else {
                                let a = &mut acc[k % CHAINS];
                                *a = kb.fma(v, w, *a);
                            }
                            k += 1;
                        }
                    }
                }
                let mut y = match acc.first() {
                    Some(&a) => a,
                    None => kb.zero(F32X4),
                };
                for &a in &acc[1.min(acc.len())..] {
                    y = kb.b.ins().fadd(y, a);
                }
                y
            })
            .collect();
        let at = 4 * c.o0 as i64;
        match ys[..] {
            [y] if c.first.lanes == 4 => kb.store(y, q, at),
            [y] => {
                for l in 0..c.first.lanes {
                    let s = kb.b.ins().extractlane(y, l as u8);
                    kb.store(s, q, at + 4 * l as i64);
                }
            }
            [even, odd] => {
                let lo = shuffle32(kb, even, odd, [0, 4, 1, 5]);
                let hi = shuffle32(kb, even, odd, [2, 6, 3, 7]);
                kb.store(lo, q, at);
                kb.store(hi, q, at + 16);
            }
            _ => unreachable!("one or two phases"),
        }
        vec![]
    };
    plan.walk(kb, inp, out, vec![], &mut body);
}

/// Adds the products of the walked plane `out` (`dy`) with the read plane
/// `inp` (`x`) to `acc`, one f32x4 per tap.
fn sum_plane(kb: &mut Kb, plan: &Plan, inp: Value, out: Value, acc: Vec<Value>) -> Vec<Value> {
    let mut body =
        |kb: &mut Kb, p: Value, q: Value, rt: &RowTaps, c: &Prog<Tile>, acc: &[Value]| {
            let mut acc = acc.to_vec();
            let taps = &c.first.phases[0];
            if rt.is_empty() || taps.is_empty() {
                return acc;
            }
            let own = c
                .first
                .own
                .as_ref()
                .expect("a summing plan reads its own plane");
            let dy = emit_read(kb, q, 0, own);
            for &(th, i) in rt {
                for (tw, read) in taps {
                    let v = emit_read(kb, p, plan.in_row * i, read);
                    let a = &mut acc[th * plan.kw + tw];
                    *a = kb.fma(v, dy, *a);
                }
            }
            acc
        };
    plan.walk(kb, inp, out, acc, &mut body)
}

/// Forward. Buffers: `x`, `w`, `y`.
fn forward(kb: &mut Kb, g: &Geom) {
    let (x, w, y) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let plan = Plan::new(g, false, false);
    let (xp, yp) = (g.x_plane(), g.y_plane());
    let (c, mult) = (g.c, g.mult);
    let (start, end) = (kb.start, kb.end);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, c as i64 * xp);
        let yn = kb.offset(y, n, (c * mult) as i64 * yp);
        each(kb, c, |kb, ci| {
            let xc = kb.offset(xn, ci, xp);
            let yc = kb.offset(yn, ci, mult as i64 * yp);
            each(kb, mult, |kb, m| {
                let o = kb.b.ins().imul_imm_s(ci, mult as i64);
                let o = kb.b.ins().iadd(o, m);
                let src = Src {
                    off: 0,
                    w: weights(kb, g, w, o),
                };
                let ym = kb.offset(yc, m, yp);
                store_plane(kb, &plan, xc, ym, &[src]);
            });
        });
        vec![]
    });
}

/// Input gradient. Buffers: `dy`, `w`, `dx`.
fn grad_input(kb: &mut Kb, g: &Geom) {
    let (dy, w, dx) = (kb.buffer(0), kb.buffer(1), kb.buffer(2));
    let plan = Plan::new(g, true, false);
    let (xp, yp) = (g.x_plane(), g.y_plane());
    let (c, mult) = (g.c, g.mult);
    let (start, end) = (kb.start, kb.end);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let dyn_ = kb.offset(dy, n, (c * mult) as i64 * yp);
        let dxn = kb.offset(dx, n, c as i64 * xp);
        each(kb, c, |kb, ci| {
            let dyc = kb.offset(dyn_, ci, mult as i64 * yp);
            let dxc = kb.offset(dxn, ci, xp);
            let o0 = kb.b.ins().imul_imm_s(ci, mult as i64);
            let srcs: Vec<Src> = (0..mult)
                .map(|m| {
                    let o = kb.b.ins().iadd_imm_s(o0, m as i64);
                    Src {
                        off: m as i64 * yp,
                        w: weights(kb, g, w, o),
                    }
                })
                .collect();
            store_plane(kb, &plan, dyc, dxc, &srcs);
        });
        vec![]
    });
}

/// Weight gradient over the work range's items. Buffers: `x`, `dy`, `dw`.
fn grad_weight(kb: &mut Kb, g: &Geom) {
    let (x, dy, dw, sums) = (kb.buffer(0), kb.buffer(1), kb.buffer(2), kb.buffer(3));
    let plan = Plan::new(g, false, true);
    let (xp, yp) = (g.x_plane(), g.y_plane());
    let (c, mult) = (g.c, g.mult);
    let taps = g.kh * g.kw;
    let per_filter = 16 * taps as i64;
    let zero = kb.zero(F32X4);
    each(kb, c * mult, |kb, o| {
        let so = kb.offset(sums, o, per_filter);
        for t in 0..taps {
            kb.store(zero, so, 16 * t as i64);
        }
    });
    let (start, end) = (kb.start, kb.end);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, c as i64 * xp);
        let dyn_ = kb.offset(dy, n, (c * mult) as i64 * yp);
        each(kb, c, |kb, ci| {
            let xc = kb.offset(xn, ci, xp);
            each(kb, mult, |kb, m| {
                let o = kb.b.ins().imul_imm_s(ci, mult as i64);
                let o = kb.b.ins().iadd(o, m);
                let dyo = kb.offset(dyn_, o, yp);
                let so = kb.offset(sums, o, per_filter);
                let acc: Vec<Value> = (0..taps)
                    .map(|t| kb.load_out(F32X4, so, 16 * t as i64))
                    .collect();
                let acc = sum_plane(kb, &plan, xc, dyo, acc);
                for (t, &a) in acc.iter().enumerate() {
                    kb.store(a, so, 16 * t as i64);
                }
            });
        });
        vec![]
    });
    each(kb, c * mult, |kb, o| {
        let so = kb.offset(sums, o, per_filter);
        let dwo = kb.offset(dw, o, 4 * taps as i64);
        for t in 0..taps {
            let a = kb.load_out(F32X4, so, 16 * t as i64);
            let s = hsum(kb, a);
            kb.store(s, dwo, 4 * t as i64);
        }
    });
}

/// The sum of an f32x4's lanes, `(l0 + l1) + (l2 + l3)`.
fn hsum(kb: &mut Kb, v: Value) -> Value {
    let l: Vec<Value> = (0..4u8).map(|i| kb.b.ins().extractlane(v, i)).collect();
    let a = kb.b.ins().fadd(l[0], l[1]);
    let b = kb.b.ins().fadd(l[2], l[3]);
    kb.b.ins().fadd(a, b)
}

/// The three kernels as scalar loops in the kernel's element type (the f64
/// path; see "f64" in the module doc). Buffers as [`DepthwiseKernel`]'s.
fn scalar_kernel(kb: &mut Kb, g: &Geom, k: &DepthwiseKernel) {
    let (e, st) = (kb.esz(), kb.sty());
    let (c, mult, taps) = (g.c, g.mult, g.kh * g.kw);
    let (xp, yp) = (e * (g.h * g.w) as i64, e * (g.oh * g.ow) as i64);
    // In the forward convolution's roles: x, w, y (dx, w, dy; x, dw, dy).
    let (x, w, y) = match k {
        DepthwiseKernel::Forward { .. } => (kb.buffer(0), kb.buffer(1), kb.buffer(2)),
        DepthwiseKernel::GradInput { .. } => (kb.buffer(2), kb.buffer(1), kb.buffer(0)),
        DepthwiseKernel::GradWeight { .. } => (kb.buffer(0), kb.buffer(2), kb.buffer(1)),
    };
    let a = g.a;
    let rows = runs(g.oh, g.h, g.kh, a.stride[0], a.pad[0], a.dilation[0]);
    let cols = runs(g.ow, g.w, g.kw, a.stride[1], a.pad[1], a.dilation[1]);
    let zero = kb.zero(st);
    let grad_weight = matches!(k, DepthwiseKernel::GradWeight { .. });
    if grad_weight {
        each(kb, c * mult * taps, |kb, i| {
            let p = kb.offset(w, i, e);
            kb.store(zero, p, 0);
        });
    }
    let (start, end) = (kb.start, kb.end);
    kb.for_range(Bound::Val(start), Bound::Val(end), 1, &[], |kb, n, _| {
        let xn = kb.offset(x, n, c as i64 * xp);
        let yn = kb.offset(y, n, (c * mult) as i64 * yp);
        if let DepthwiseKernel::GradInput { .. } = k {
            kb.for_range(
                Bound::Const(0),
                Bound::Const((c * g.h * g.w) as i64),
                1,
                &[],
                |kb, i, _| {
                    let p = kb.offset(xn, i, e);
                    kb.store(zero, p, 0);
                    vec![]
                },
            );
        }
        each(kb, c, |kb, ci| {
            let xc = kb.offset(xn, ci, xp);
            each(kb, mult, |kb, m| {
                let o = kb.b.ins().imul_imm_s(ci, mult as i64);
                let o = kb.b.ins().iadd(o, m);
                let yo = kb.offset(yn, o, yp);
                let wo = kb.offset(w, o, e * taps as i64);
                // The weights (forward, input gradient) or the weight
                // gradient's running sums, one per tap.
                let vals: Vec<Value> = (0..taps)
                    .map(|t| {
                        if grad_weight {
                            kb.load_out(st, wo, e * t as i64)
                        } else {
                            kb.load_in(st, wo, e * t as i64)
                        }
                    })
                    .collect();
                let init = if grad_weight { vals.clone() } else { vec![] };
                let mut sums = init;
                for r in &rows {
                    sums = kb.for_range(
                        Bound::Const(r.o0 as i64),
                        Bound::Const(r.o1 as i64),
                        1,
                        &sums,
                        |kb, oh, acc| {
                            let xr = kb.offset(xc, oh, e * (a.stride[0] * g.w) as i64);
                            let yr = kb.offset(yo, oh, e * g.ow as i64);
                            let mut acc = acc.to_vec();
                            for cr in &cols {
                                acc = kb.for_range(
                                    Bound::Const(cr.o0 as i64),
                                    Bound::Const(cr.o1 as i64),
                                    1,
                                    &acc,
                                    |kb, ow, acc| {
                                        let xq = kb.offset(xr, ow, e * a.stride[1] as i64);
                                        let yq = kb.offset(yr, ow, e);
                                        let mut acc = acc.to_vec();
                                        let mut sum = None;
                                        let dy = match k {
                                            DepthwiseKernel::Forward { .. } => None,
                                            _ => Some(kb.load_in(st, yq, 0)),
                                        };
                                        for kh in r.k0..r.k1 {
                                            for kw in cr.k0..cr.k1 {
                                                let t = kh * g.kw + kw;
                                                let ih =
                                                    (kh * a.dilation[0]) as i64 - a.pad[0] as i64;
                                                let iw =
                                                    (kw * a.dilation[1]) as i64 - a.pad[1] as i64;
                                                let off = e * (ih * g.w as i64 + iw);
                                                match (k, dy) {
                                                    (DepthwiseKernel::Forward { .. }, _) => {
                                                        let v = kb.load_in(st, xq, off);
                                                        sum = Some(match sum {
                                                            None => kb.b.ins().fmul(v, vals[t]),
                                                            Some(s) => kb.fma(v, vals[t], s),
                                                        });
                                                    }
                                                    (
                                                        DepthwiseKernel::GradInput { .. },
                                                        Some(d),
                                                    ) => {
                                                        let old = kb.load_out(st, xq, off);
                                                        let new = kb.fma(d, vals[t], old);
                                                        kb.store(new, xq, off);
                                                    }
                                                    (_, Some(d)) => {
                                                        let v = kb.load_in(st, xq, off);
                                                        acc[t] = kb.fma(d, v, acc[t]);
                                                    }
                                                    _ => unreachable!("dy is loaded"),
                                                }
                                            }
                                        }
                                        if let DepthwiseKernel::Forward { .. } = k {
                                            let v = sum.unwrap_or(zero);
                                            kb.store(v, yq, 0);
                                        }
                                        acc
                                    },
                                );
                            }
                            acc
                        },
                    );
                }
                for (t, &v) in sums.iter().enumerate() {
                    kb.store(v, wo, e * t as i64);
                }
            });
        });
        vec![]
    });
}
