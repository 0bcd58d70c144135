//! The built-in layers: for each op, its arguments (positional order), their
//! checks, and its shape rule. Output size of windowed ops:
//! `out = floor((in + 2*pad - dilation*(kernel-1) - 1) / stride) + 1`.

use super::args::{BArg, Bound, PadSpec, VKind, V};
use super::error::{CheckError, Lint};
use super::Checker;
use crate::checked::{Hw, Op, Shape};
use crate::source::Loc;

/// Every built-in op, with its parameters in positional order.
pub const BUILTINS: &[(&str, &[&str])] = &[
    (
        "conv",
        &[
            "out", "kernel", "stride", "pad", "dilation", "groups", "bias", "weights",
        ],
    ),
    (
        "depthwise",
        &["kernel", "stride", "pad", "dilation", "multiplier", "bias"],
    ),
    ("pointwise", &["out", "bias"]),
    ("batchnorm", &["momentum", "eps"]),
    ("groupnorm", &["groups", "eps"]),
    ("relu", &[]),
    ("leaky_relu", &["slope"]),
    ("sigmoid", &[]),
    ("tanh", &[]),
    ("gelu", &[]),
    ("maxpool", &["kernel", "stride", "pad"]),
    ("avgpool", &["kernel", "stride", "pad"]),
    ("global_avg_pool", &[]),
    ("flatten", &[]),
    ("linear", &["out", "bias", "in"]),
    ("dropout", &["p"]),
    ("add", &[]),
    ("concat", &[]),
    ("detach", &[]),
];

pub fn is_builtin(op: &str) -> bool {
    BUILTINS.iter().any(|(n, _)| *n == op)
}

/// The result of checking one built-in layer.
pub struct Built {
    pub op: Op,
    pub shape: Shape,
    pub params: u64,
    pub macs: u64,
}

/// What a layer is applied to: the input's shape and a description for messages.
pub struct Input<'s> {
    pub shape: &'s Shape,
    /// e.g. "the output of `pool2`"
    pub from: String,
}

/// Largest number of elements per image in one tensor, and parameters in one layer.
const MAX_ELEMS: u128 = 1 << 31;

pub fn fmt_shape(s: &[u64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl Checker<'_> {
    /// Checks a built-in single-input layer. `name` is its display name, `op_loc`
    /// the op identifier (the default culprit for errors).
    pub fn builtin(
        &mut self,
        op: &str,
        name: &str,
        op_loc: Loc,
        call: Loc,
        args: &[BArg],
        input: Option<Input<'_>>,
    ) -> Option<Built> {
        let params = BUILTINS.iter().find(|(n, _)| *n == op).map(|p| p.1)?;
        let required: &[&str] = match op {
            "conv" | "pointwise" | "linear" => &["out"],
            "groupnorm" => &["groups"],
            "maxpool" | "avgpool" => &["kernel"],
            _ => &[],
        };
        let b = self.bind(op, call, params, required, args)?;
        let ctx = LayerCtx {
            name,
            op_loc,
            b: &b,
        };
        let built = match op {
            "conv" => self.conv(&ctx, input),
            "depthwise" => self.depthwise(&ctx, input),
            "pointwise" => {
                let out = self.int(&b, "out", None, 1);
                let bias = self.boolean(&b, "bias", true);
                let input = self.spatial(&ctx, input?)?;
                self.conv_shape(
                    &ctx,
                    &input,
                    ConvArgs {
                        out: out?,
                        kernel: [1, 1],
                        stride: [1, 1],
                        pad: PadSpec::Explicit([0, 0]),
                        dilation: [1, 1],
                        groups: 1,
                        bias: bias?,
                        weights: None,
                    },
                )
            }
            "batchnorm" => {
                let momentum = self.float(
                    &b,
                    "momentum",
                    Some(0.1),
                    |x| (0.0..=1.0).contains(&x),
                    "must lie in [0, 1]",
                );
                let eps = self.float(&b, "eps", Some(1e-5), |x| x > 0.0, "must be greater than 0");
                let shape = input?.shape.clone();
                Some(Built {
                    params: 2 * shape[0],
                    op: Op::BatchNorm {
                        momentum: momentum?,
                        eps: eps?,
                    },
                    shape,
                    macs: 0,
                })
            }
            "groupnorm" => {
                let groups = self.int(&b, "groups", None, 1);
                let eps = self.float(&b, "eps", Some(1e-5), |x| x > 0.0, "must be greater than 0");
                let input = self.spatial(&ctx, input?)?;
                let (groups, eps) = (groups?, eps?);
                let c = input.shape[0];
                if c % groups != 0 {
                    let loc = b.loc_of("groups");
                    let help = Some(format!("use a divisor of {c}: {}", divisors(c)));
                    self.error(
                        loc,
                        CheckError::Groups {
                            layer: name.into(),
                            groups,
                            channels: c,
                            which: "input".into(),
                            span: loc.span.into(),
                            help,
                        },
                    );
                    return None;
                }
                Some(Built {
                    params: 2 * c,
                    op: Op::GroupNorm { groups, eps },
                    shape: input.shape.clone(),
                    macs: 0,
                })
            }
            "relu" | "sigmoid" | "tanh" | "gelu" | "detach" => {
                let op = match op {
                    "relu" => Op::Relu,
                    "sigmoid" => Op::Sigmoid,
                    "tanh" => Op::Tanh,
                    "gelu" => Op::Gelu,
                    _ => Op::Detach,
                };
                Some(elementwise(op, input?))
            }
            "leaky_relu" => {
                let slope = self.float(
                    &b,
                    "slope",
                    Some(0.01),
                    |x| (0.0..1.0).contains(&x),
                    "must lie in [0, 1)",
                );
                Some(elementwise(Op::LeakyRelu { slope: slope? }, input?))
            }
            "dropout" => {
                let p = self.float(
                    &b,
                    "p",
                    Some(0.5),
                    |x| (0.0..1.0).contains(&x),
                    "is a probability in [0, 1)",
                );
                Some(elementwise(Op::Dropout { p: p? }, input?))
            }
            "maxpool" | "avgpool" => self.pool(&ctx, op, input),
            "global_avg_pool" => {
                let input = self.spatial(&ctx, input?)?;
                Some(Built {
                    op: Op::GlobalAvgPool,
                    shape: vec![input.shape[0]],
                    params: 0,
                    macs: 0,
                })
            }
            "flatten" => {
                let input = input?;
                let n: u64 = input.shape.iter().product();
                Some(Built {
                    op: Op::Flatten,
                    shape: vec![n],
                    params: 0,
                    macs: 0,
                })
            }
            "linear" => self.linear(&ctx, input),
            _ => None,
        };
        built.filter(|_| b.ok)
    }

    /// The input, if it is a `[C, H, W]` feature map; E0404 otherwise.
    fn spatial<'s>(&mut self, ctx: &LayerCtx<'_>, input: Input<'s>) -> Option<Input<'s>> {
        if input.shape.len() == 3 {
            return Some(input);
        }
        let shape = fmt_shape(input.shape);
        self.error(
            ctx.op_loc,
            CheckError::NeedsSpatial {
                layer: ctx.name.into(),
                shape: shape.clone(),
                span: ctx.op_loc.span.into(),
                help: Some(format!(
                    "{} is already flat; move `flatten`/`global_avg_pool` after this layer",
                    input.from
                )),
            },
        );
        None
    }

    fn conv(&mut self, ctx: &LayerCtx<'_>, input: Option<Input<'_>>) -> Option<Built> {
        let b = ctx.b;
        let out = self.int(b, "out", None, 1);
        let weights = match b.get("weights") {
            Some(w) => Some(self.weights_literal(ctx, w.clone())?),
            None => None,
        };
        let default_kernel = weights.as_ref().map_or(3, |w| w.kh as i64);
        let kernel = self.pair(b, "kernel", Some(default_kernel), 1);
        let stride = self.pair(b, "stride", Some(1), 1);
        let pad = self.pad(b, "pad", PadSpec::Explicit([0, 0]));
        let dilation = self.pair(b, "dilation", Some(1), 1);
        let groups = self.int(b, "groups", Some(1), 1);
        let bias = self.boolean(b, "bias", true);
        let input = self.spatial(ctx, input?)?;
        self.conv_shape(
            ctx,
            &input,
            ConvArgs {
                out: out?,
                kernel: kernel?,
                stride: stride?,
                pad: pad?,
                dilation: dilation?,
                groups: groups?,
                bias: bias?,
                weights,
            },
        )
    }

    fn depthwise(&mut self, ctx: &LayerCtx<'_>, input: Option<Input<'_>>) -> Option<Built> {
        let b = ctx.b;
        let kernel = self.pair(b, "kernel", Some(3), 1);
        let stride = self.pair(b, "stride", Some(1), 1);
        let pad = self.pad(b, "pad", PadSpec::Same);
        let dilation = self.pair(b, "dilation", Some(1), 1);
        let multiplier = self.int(b, "multiplier", Some(1), 1);
        let bias = self.boolean(b, "bias", true);
        let input = self.spatial(ctx, input?)?;
        let c = input.shape[0];
        self.conv_shape(
            ctx,
            &input,
            ConvArgs {
                out: c * multiplier?,
                kernel: kernel?,
                stride: stride?,
                pad: pad?,
                dilation: dilation?,
                groups: c,
                bias: bias?,
                weights: None,
            },
        )
    }

    fn conv_shape(&mut self, ctx: &LayerCtx<'_>, input: &Input<'_>, a: ConvArgs) -> Option<Built> {
        let b = ctx.b;
        let c = input.shape[0];
        for (which, channels) in [("input", c), ("output", a.out)] {
            if channels % a.groups != 0 {
                let loc = b.loc_of("groups");
                let help = Some(format!(
                    "groups must divide both the {c} input and the {} output channels; common divisors: {}",
                    a.out,
                    divisors(gcd(c, a.out))
                ));
                self.error(
                    loc,
                    CheckError::Groups {
                        layer: ctx.name.into(),
                        groups: a.groups,
                        channels,
                        which: which.into(),
                        span: loc.span.into(),
                        help,
                    },
                );
                return None;
            }
        }
        let pad = match a.pad {
            PadSpec::Explicit(p) => p,
            PadSpec::Same => {
                let mut p = [0; 2];
                for (i, pi) in p.iter_mut().enumerate() {
                    let reach = a.dilation[i] * (a.kernel[i] - 1);
                    if !reach.is_multiple_of(2) {
                        let loc = b.loc_of("pad");
                        self.error(
                            loc,
                            CheckError::SameEvenKernel {
                                layer: ctx.name.into(),
                                kernel: a.kernel[i],
                                dilation: a.dilation[i],
                                span_px: reach + 1,
                                span: loc.span.into(),
                                help: Some(format!(
                                    "use an odd kernel, or explicit padding such as pad={}",
                                    reach / 2
                                )),
                            },
                        );
                        return None;
                    }
                    *pi = reach / 2;
                }
                p
            }
        };
        let hw = self.window(ctx, input, a.kernel, a.stride, pad, a.dilation, "kernel")?;
        if let Some(w) = &a.weights {
            self.check_weights(ctx, w, a.out, c / a.groups, a.kernel)?;
        }
        let per_out = (c / a.groups) as u128 * a.kernel[0] as u128 * a.kernel[1] as u128;
        let params = a.out as u128 * per_out + if a.bias { a.out as u128 } else { 0 };
        let shape = vec![a.out, hw[0], hw[1]];
        self.size_limits(ctx, &shape, params)?;
        let macs = a.out as u128 * hw[0] as u128 * hw[1] as u128 * per_out;
        Some(Built {
            op: Op::Conv {
                out: a.out,
                kernel: a.kernel,
                stride: a.stride,
                pad,
                dilation: a.dilation,
                groups: a.groups,
                bias: a.bias,
                weights: a.weights.map(|w| w.expand(a.out, c / a.groups)),
            },
            shape,
            params: params as u64,
            macs: macs.min(u64::MAX as u128) as u64,
        })
    }

    fn pool(&mut self, ctx: &LayerCtx<'_>, op: &str, input: Option<Input<'_>>) -> Option<Built> {
        let b = ctx.b;
        let kernel = self.pair(b, "kernel", None, 1);
        let stride = match b.has("stride") {
            true => self.pair(b, "stride", None, 1),
            false => kernel,
        };
        let pad = self.pair(b, "pad", Some(0), 0);
        let (kernel, stride, pad) = (kernel?, stride?, pad?);
        for i in 0..2 {
            if pad[i] * 2 > kernel[i] {
                let loc = b.loc_of("pad");
                self.error(
                    loc,
                    CheckError::OutOfRange {
                        callee: op.into(),
                        name: "pad".into(),
                        rule: format!("must be at most half the kernel ({})", kernel[i] / 2),
                        value: pad[i].to_string(),
                        span: loc.span.into(),
                        help: Some("a window with more padding than half its size can lie wholly in the padding".into()),
                    },
                );
                return None;
            }
        }
        let input = self.spatial(ctx, input?)?;
        let hw = self.window(ctx, &input, kernel, stride, pad, [1, 1], "kernel")?;
        let op = if op == "maxpool" {
            Op::MaxPool {
                kernel,
                stride,
                pad,
            }
        } else {
            Op::AvgPool {
                kernel,
                stride,
                pad,
            }
        };
        Some(Built {
            op,
            shape: vec![input.shape[0], hw[0], hw[1]],
            params: 0,
            macs: 0,
        })
    }

    /// Output height and width of a sliding window, with E0401 when empty and
    /// W0002 when the last rows/columns are never read.
    #[allow(clippy::too_many_arguments)]
    fn window(
        &mut self,
        ctx: &LayerCtx<'_>,
        input: &Input<'_>,
        kernel: Hw,
        stride: Hw,
        pad: Hw,
        dilation: Hw,
        kernel_arg: &str,
    ) -> Option<Hw> {
        let mut out = [0u64; 2];
        let mut dropped = Vec::new();
        for (i, dim) in ["height", "width"].into_iter().enumerate() {
            let (n, k, s, p, d) = (
                input.shape[1 + i] as i64,
                kernel[i] as i64,
                stride[i] as i64,
                pad[i] as i64,
                dilation[i] as i64,
            );
            let reach = n + 2 * p - d * (k - 1) - 1;
            let o = reach.div_euclid(s) + 1;
            let dil = d * (k - 1) + 1;
            let arithmetic = format!("floor(({n} + 2*{p} - {d}*({k}-1) - 1)/{s}) + 1 = {o}");
            if o <= 0 {
                let culprit = [kernel_arg, "dilation"]
                    .into_iter()
                    .find(|a| ctx.b.has(a))
                    .map_or(ctx.op_loc, |a| ctx.b.loc_of(a));
                let max_k = (n + 2 * p - 1) / d + 1;
                let need_pad = (d * (k - 1) + 1 - n + 1) / 2;
                let help = Some(format!(
                    "the {dim} of {} is {n}, smaller than the {dil}-pixel window; use pad={} or a kernel of at most {max_k}, or downsample less before this layer",
                    input.from,
                    need_pad.max(p + 1)
                ));
                self.error(
                    culprit,
                    CheckError::EmptyOutput {
                        layer: ctx.name.into(),
                        dim: dim.into(),
                        out: o,
                        span: culprit.span.into(),
                        arithmetic,
                        help,
                    },
                );
                return None;
            }
            // Input rows (not padding rows) below the last window. A window
            // smaller than its stride (a strided 1×1 projection) skips rows by
            // design, so only windows that tile their input are reported.
            let last_read = (o - 1) * s - p + d * (k - 1);
            let lost = if d * (k - 1) + 1 >= s {
                (n - 1 - last_read).max(0)
            } else {
                0
            };
            dropped.push((dim, lost, n, arithmetic));
            out[i] = o as u64;
        }
        // One warning for a square case, one per dimension otherwise.
        if dropped[0].1 == dropped[1].1 && dropped[0].2 == dropped[1].2 {
            dropped[0].0 = "rows and columns";
            dropped.truncate(1);
        }
        for (dim, lost, n, arithmetic) in dropped {
            if lost == 0 {
                continue;
            }
            let culprit = if ctx.b.has("stride") {
                ctx.b.loc_of("stride")
            } else {
                ctx.op_loc
            };
            self.lint(
                culprit,
                Lint::DroppedPixels {
                    layer: ctx.name.into(),
                    dropped: lost as u64,
                    dim: dims_word(dim, lost),
                    size: n as u64,
                    span: culprit.span.into(),
                    arithmetic,
                    help: Some(
                        "choose pad or the input size so that `in + 2*pad - dilation*(kernel-1) - 1` is a multiple of the stride"
                            .into(),
                    ),
                },
            );
        }
        Some(out)
    }

    fn linear(&mut self, ctx: &LayerCtx<'_>, input: Option<Input<'_>>) -> Option<Built> {
        let b = ctx.b;
        let out = self.int(b, "out", None, 1);
        let bias = self.boolean(b, "bias", true);
        let expected_in = self.int(b, "in", None, 1);
        if b.has("in") && expected_in.is_none() {
            return None;
        }
        let (out, bias) = (out?, bias?);
        let input = input?;
        if input.shape.len() != 1 {
            let shape = fmt_shape(input.shape);
            let n: u64 = input.shape.iter().product();
            self.error(
                ctx.op_loc,
                CheckError::NeedsFlat {
                    layer: ctx.name.into(),
                    shape: shape.clone(),
                    span: ctx.op_loc.span.into(),
                    help: Some(format!(
                        "put `global_avg_pool` (gives [{}]) or `flatten` (gives [{n}]) before it",
                        input.shape[0]
                    )),
                },
            );
            return None;
        }
        let n = input.shape[0];
        if let Some(e) = expected_in {
            if e != n {
                let loc = b.loc_of("in");
                self.error(
                    loc,
                    CheckError::LinearSize {
                        layer: ctx.name.into(),
                        expected: e,
                        got: n,
                        span: loc.span.into(),
                        shape: format!("{} from {}", fmt_shape(input.shape), input.from),
                        help: Some(format!("write `in={n}`, or leave `in` out: cnnc infers it")),
                    },
                );
                return None;
            }
        }
        let params = n as u128 * out as u128 + if bias { out as u128 } else { 0 };
        self.size_limits(ctx, &[out], params)?;
        Some(Built {
            op: Op::Linear { out, bias },
            shape: vec![out],
            params: params as u64,
            macs: n * out,
        })
    }

    fn size_limits(&mut self, ctx: &LayerCtx<'_>, shape: &[u64], params: u128) -> Option<()> {
        let elems: u128 = shape.iter().map(|&d| d as u128).product();
        let what = if elems > MAX_ELEMS {
            format!(
                "its output {} has {elems} elements per image (limit 2^31)",
                fmt_shape(shape)
            )
        } else if params > MAX_ELEMS {
            format!("it has {params} parameters (limit 2^31)")
        } else {
            return Some(());
        };
        self.error(
            ctx.op_loc,
            CheckError::TooLarge {
                layer: ctx.name.into(),
                what,
                span: ctx.op_loc.span.into(),
            },
        );
        None
    }

    /// Reads a `weights=` literal: nested lists of numbers, rectangular, 2 to 4 deep.
    fn weights_literal(&mut self, ctx: &LayerCtx<'_>, v: V) -> Option<WeightsLit> {
        let mut dims: Vec<usize> = Vec::new();
        let mut values = Vec::new();
        if !self.flatten_literal(ctx, &v, 0, &mut dims, &mut values) {
            return None;
        }
        if !(2..=4).contains(&dims.len()) {
            self.weights_error(
                ctx,
                v.loc,
                format!("has {} dimensions", dims.len()),
                "write [kh, kw], [out, kh, kw] or [out, in/groups, kh, kw]",
            );
            return None;
        }
        let n = dims.len();
        Some(WeightsLit {
            kh: dims[n - 2] as u64,
            kw: dims[n - 1] as u64,
            dims,
            values,
            loc: v.loc,
        })
    }

    fn flatten_literal(
        &mut self,
        ctx: &LayerCtx<'_>,
        v: &V,
        depth: usize,
        dims: &mut Vec<usize>,
        out: &mut Vec<f64>,
    ) -> bool {
        match &v.kind {
            VKind::Int(i) if depth > 0 => {
                out.push(*i as f64);
                self.leaf_depth(ctx, v, depth, dims)
            }
            VKind::Float(f) if depth > 0 => {
                out.push(*f);
                self.leaf_depth(ctx, v, depth, dims)
            }
            VKind::List(items) if depth < 4 => {
                if items.is_empty() {
                    self.weights_error(
                        ctx,
                        v.loc,
                        "has an empty list".into(),
                        "every list needs at least one entry",
                    );
                    return false;
                }
                if dims.len() == depth {
                    dims.push(items.len());
                } else if dims.len() > depth && dims[depth] != items.len() {
                    self.weights_error(
                        ctx,
                        v.loc,
                        format!(
                            "is ragged: this list has {} entries, an earlier one {}",
                            items.len(),
                            dims[depth]
                        ),
                        "every row must have the same length",
                    );
                    return false;
                }
                items
                    .iter()
                    .all(|i| self.flatten_literal(ctx, i, depth + 1, dims, out))
            }
            VKind::List(_) => {
                self.weights_error(
                    ctx,
                    v.loc,
                    "is nested more than 4 deep".into(),
                    "write [kh, kw], [out, kh, kw] or [out, in/groups, kh, kw]",
                );
                false
            }
            _ => {
                self.weights_error(
                    ctx,
                    v.loc,
                    format!("contains {}", v.kind.describe()),
                    "a kernel literal is a nested list of numbers",
                );
                false
            }
        }
    }

    fn leaf_depth(&mut self, ctx: &LayerCtx<'_>, v: &V, depth: usize, dims: &[usize]) -> bool {
        if dims.len() != depth {
            self.weights_error(
                ctx,
                v.loc,
                "is ragged: lists of different depths".into(),
                "every entry must be nested equally deep",
            );
            return false;
        }
        true
    }

    fn check_weights(
        &mut self,
        ctx: &LayerCtx<'_>,
        w: &WeightsLit,
        out: u64,
        in_per_group: u64,
        kernel: Hw,
    ) -> Option<()> {
        let k = [w.kh, w.kw];
        let problem = if k != kernel {
            Some(format!(
                "is {}×{} but the kernel is {}×{}",
                w.kh, w.kw, kernel[0], kernel[1]
            ))
        } else if w.dims.len() >= 3 && w.dims[0] as u64 != out {
            Some(format!(
                "has {} output channels but the conv has {out}",
                w.dims[0]
            ))
        } else if w.dims.len() == 4 && w.dims[1] as u64 != in_per_group {
            Some(format!(
                "has {} input channels per group but the conv has {in_per_group}",
                w.dims[1]
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.weights_error(ctx, w.loc, p, "the literal's shape must be [kh, kw], [out, kh, kw] or [out, in/groups, kh, kw] of this conv");
            return None;
        }
        Some(())
    }

    fn weights_error(&mut self, ctx: &LayerCtx<'_>, loc: Loc, reason: String, help: &str) {
        self.error(
            loc,
            CheckError::WeightsShape {
                layer: ctx.name.into(),
                reason,
                span: loc.span.into(),
                help: Some(help.into()),
            },
        );
    }
}

struct LayerCtx<'b> {
    name: &'b str,
    op_loc: Loc,
    b: &'b Bound,
}

struct ConvArgs {
    out: u64,
    kernel: Hw,
    stride: Hw,
    pad: PadSpec,
    dilation: Hw,
    groups: u64,
    bias: bool,
    weights: Option<WeightsLit>,
}

struct WeightsLit {
    dims: Vec<usize>,
    kh: u64,
    kw: u64,
    values: Vec<f64>,
    loc: Loc,
}

impl WeightsLit {
    /// The full `[out, in/groups, kh, kw]` tensor, repeating a smaller literal.
    fn expand(self, out: u64, in_per_group: u64) -> Vec<f64> {
        let k = (self.kh * self.kw) as usize;
        let mut full = Vec::with_capacity(out as usize * in_per_group as usize * k);
        for o in 0..out as usize {
            for i in 0..in_per_group as usize {
                let base = match self.dims.len() {
                    2 => 0,
                    3 => o * k,
                    _ => (o * in_per_group as usize + i) * k,
                };
                full.extend_from_slice(&self.values[base..base + k]);
            }
        }
        full
    }
}

/// "row", "rows", "rows and columns" … for the dropped-pixels warning.
fn dims_word(dim: &str, n: i64) -> String {
    let (row, col) = if n == 1 {
        ("row", "column")
    } else {
        ("rows", "columns")
    };
    match dim {
        "height" => row.into(),
        "width" => col.into(),
        _ => format!("{row} and {col}"),
    }
}

fn elementwise(op: Op, input: Input<'_>) -> Built {
    Built {
        op,
        shape: input.shape.clone(),
        params: 0,
        macs: 0,
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The divisors of `n`, for help texts (at most 12 shown).
fn divisors(n: u64) -> String {
    let small = (1..=n.min(4096)).filter(|d| n.is_multiple_of(*d));
    let mut d: Vec<u64> = small.take(12).collect();
    if !d.contains(&n) {
        d.push(n);
    }
    d.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
