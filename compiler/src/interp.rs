//! The reference interpreter: runs any graph on ndarray tensors, in f32 or f64.
//! It is the oracle for gradient checks and for the JIT, so every op is written
//! the plain way: loops over NCHW indices, and convolutions as im2col followed by a
//! matrix product.

use crate::ir::{Act, ConvAttrs, Graph, Op, PoolAttrs, Role, Vid};
use ndarray::{linalg::general_mat_mul, ArrayD, ArrayView2, ArrayViewMut2, IxDyn};
use num_traits::{Float, FromPrimitive};
use std::fmt::Debug;

/// The element types the interpreter runs in.
pub trait Scalar:
    Float + FromPrimitive + ndarray::LinalgScalar + Debug + Default + Send + Sync + 'static
{
    fn erf(self) -> Self;
    fn c(x: f64) -> Self {
        Self::from_f64(x).expect("representable constant")
    }
}

impl Scalar for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Scalar for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

pub type Tensor<T> = ArrayD<T>;

/// Every value of a graph after a run (`None` for values not computed).
pub struct Values<T> {
    pub values: Vec<Option<Tensor<T>>>,
}

impl<T: Scalar> Values<T> {
    pub fn get(&self, v: Vid) -> &Tensor<T> {
        self.values[v.0].as_ref().expect("value computed")
    }
    /// A named graph output.
    pub fn output(&self, g: &Graph, name: &str) -> Option<&Tensor<T>> {
        g.output(name).and_then(|v| self.values[v.0].as_ref())
    }
}

/// Runs `g`. Every input, param and buffer must be fed with its exact shape.
pub fn run<T: Scalar>(g: &Graph, feeds: Vec<(Vid, Tensor<T>)>) -> Result<Values<T>, String> {
    let mut values: Vec<Option<Tensor<T>>> = vec![None; g.values.len()];
    for (v, t) in feeds {
        let want = g.shape(v);
        if t.shape() != want.as_slice() {
            return Err(format!(
                "{} is fed with shape {:?}, expected {:?}",
                g.values[v.0].name,
                t.shape(),
                want
            ));
        }
        values[v.0] = Some(t.as_standard_layout().into_owned());
    }
    for (i, v) in g.values.iter().enumerate() {
        if v.role != Role::Temp && values[i].is_none() {
            return Err(format!("{} was not fed", v.name));
        }
    }
    for node in &g.nodes {
        let ins: Vec<&Tensor<T>> = node
            .inputs
            .iter()
            .map(|i| values[i.0].as_ref().expect("inputs computed before use"))
            .collect();
        let shapes: Vec<Vec<usize>> = node.outputs.iter().map(|o| g.shape(*o).clone()).collect();
        let outs = eval(&node.op, &ins, &shapes);
        for (o, t) in node.outputs.iter().zip(outs) {
            debug_assert_eq!(t.shape(), g.shape(*o).as_slice(), "{}", node.op.name());
            values[o.0] = Some(t);
        }
    }
    Ok(Values { values })
}

fn tensor<T: Scalar>(shape: &[usize], data: Vec<T>) -> Tensor<T> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("data matches shape")
}

fn zeros<T: Scalar>(shape: &[usize]) -> Tensor<T> {
    ArrayD::zeros(IxDyn(shape))
}

fn sl<T: Scalar>(t: &Tensor<T>) -> &[T] {
    t.as_slice().expect("standard layout")
}

/// Evaluates one op on its inputs, given its output shapes (`Op::infer`'s). The
/// JIT executable uses it for ops without a native kernel, and the kernel tests
/// use it as the oracle.
pub fn eval<T: Scalar>(op: &Op, x: &[&Tensor<T>], out: &[Vec<usize>]) -> Vec<Tensor<T>> {
    match op {
        Op::Conv2d(a) => vec![conv2d(x[0], x[1], a, &out[0])],
        Op::Conv2dGradInput(a, _) => vec![conv2d_grad_input(x[0], x[1], a, &out[0])],
        Op::Conv2dGradWeight(a, _) => vec![conv2d_grad_weight(x[0], x[1], a, &out[0])],
        Op::BiasAdd => {
            let c = x[0].shape()[1];
            let inner: usize = x[0].shape()[2..].iter().product();
            let b = sl(x[1]);
            let data = sl(x[0])
                .iter()
                .enumerate()
                .map(|(i, v)| *v + b[(i / inner) % c])
                .collect();
            vec![tensor(x[0].shape(), data)]
        }
        Op::BiasGrad => {
            let c = x[0].shape()[1];
            let inner: usize = x[0].shape()[2..].iter().product();
            let mut db = vec![T::zero(); c];
            for (i, v) in sl(x[0]).iter().enumerate() {
                db[(i / inner) % c] = db[(i / inner) % c] + *v;
            }
            vec![tensor(&[c], db)]
        }
        Op::MatMul { ta, tb } => {
            let a = view2(x[0]);
            let b = view2(x[1]);
            let a = if *ta { a.reversed_axes() } else { a };
            let b = if *tb { b.reversed_axes() } else { b };
            let mut c = zeros::<T>(&out[0]);
            let mut cv = c
                .view_mut()
                .into_dimensionality::<ndarray::Ix2>()
                .expect("2-D");
            general_mat_mul(T::one(), &a, &b, T::zero(), &mut cv);
            vec![c]
        }
        Op::BatchNorm { eps } => batchnorm(x[0], x[1], x[2], *eps),
        Op::BatchNormInfer { eps } => {
            let (c, inner) = channel_layout(x[0].shape());
            let (g, b, m, v) = (sl(x[1]), sl(x[2]), sl(x[3]), sl(x[4]));
            let data = sl(x[0])
                .iter()
                .enumerate()
                .map(|(i, xv)| {
                    let k = (i / inner) % c;
                    g[k] * (*xv - m[k]) / (v[k] + T::c(*eps)).sqrt() + b[k]
                })
                .collect();
            vec![tensor(x[0].shape(), data)]
        }
        Op::BatchNormGrad { eps } => batchnorm_grad(x[0], x[1], x[2], x[3], x[4], *eps),
        Op::BatchNormInferGrad { eps } => {
            let (c, inner) = channel_layout(x[0].shape());
            let (g, v) = (sl(x[1]), sl(x[2]));
            let data = sl(x[0])
                .iter()
                .enumerate()
                .map(|(i, dy)| {
                    let k = (i / inner) % c;
                    *dy * g[k] / (v[k] + T::c(*eps)).sqrt()
                })
                .collect();
            vec![tensor(x[0].shape(), data)]
        }
        Op::RunningStats { momentum, n } => {
            let m = T::c(*momentum);
            let unbias = if *n > 1 {
                T::c(*n as f64 / (*n as f64 - 1.0))
            } else {
                T::one()
            };
            let (rm, rv, bm, bv) = (sl(x[0]), sl(x[1]), sl(x[2]), sl(x[3]));
            let nm = rm
                .iter()
                .zip(bm)
                .map(|(r, b)| (T::one() - m) * *r + m * *b)
                .collect();
            let nv = rv
                .iter()
                .zip(bv)
                .map(|(r, b)| (T::one() - m) * *r + m * *b * unbias)
                .collect();
            vec![tensor(x[0].shape(), nm), tensor(x[0].shape(), nv)]
        }
        Op::GroupNorm { groups, eps } => groupnorm(x[0], x[1], x[2], *groups, *eps),
        Op::GroupNormGrad { groups, eps } => {
            groupnorm_grad(x[0], x[1], x[2], x[3], x[4], *groups, *eps)
        }
        Op::Act(a) => vec![x[0].mapv(|v| act(a, v))],
        Op::ActGrad(a) => {
            let data = sl(x[0])
                .iter()
                .zip(sl(x[1]))
                .map(|(dy, xv)| *dy * act_grad(a, *xv))
                .collect();
            vec![tensor(x[0].shape(), data)]
        }
        Op::MaxPool(p) => vec![maxpool(x[0], p, &out[0])],
        Op::MaxPoolGrad(p) => vec![maxpool_grad(x[0], x[1], p)],
        Op::AvgPool(p) => vec![avgpool(x[0], p, &out[0])],
        Op::AvgPoolGrad(p, _) => vec![avgpool_grad(x[0], p, &out[0])],
        Op::GlobalAvgPool => {
            let s = x[0].shape();
            let hw = s[2] * s[3];
            let data = sl(x[0])
                .chunks(hw)
                .map(|c| c.iter().fold(T::zero(), |a, b| a + *b) / T::c(hw as f64))
                .collect();
            vec![tensor(&[s[0], s[1]], data)]
        }
        Op::GlobalAvgPoolGrad(hw) => {
            let n = hw[0] * hw[1];
            let data = sl(x[0])
                .iter()
                .flat_map(|d| std::iter::repeat_n(*d / T::c(n as f64), n))
                .collect();
            vec![tensor(&out[0], data)]
        }
        Op::Reshape(s) => vec![tensor(s, sl(x[0]).to_vec())],
        Op::Add => {
            let mut acc = x[0].clone();
            for t in &x[1..] {
                acc = acc + *t;
            }
            vec![acc]
        }
        Op::Concat => {
            let n = x[0].shape()[0];
            let mut data = Vec::with_capacity(out[0].iter().product());
            for i in 0..n {
                for t in x {
                    let per = t.len() / n;
                    data.extend_from_slice(&sl(t)[i * per..(i + 1) * per]);
                }
            }
            vec![tensor(&out[0], data)]
        }
        Op::Slice { start, len } => {
            let s = x[0].shape();
            let inner: usize = s[2..].iter().product();
            let mut data = Vec::with_capacity(out[0].iter().product());
            for i in 0..s[0] {
                let base = (i * s[1] + start) * inner;
                data.extend_from_slice(&sl(x[0])[base..base + len * inner]);
            }
            vec![tensor(&out[0], data)]
        }
        Op::Dropout { p, salt } | Op::DropoutGrad { p, salt } => {
            let seed = x[1]
                .iter()
                .next()
                .copied()
                .unwrap_or_else(T::zero)
                .to_u64()
                .unwrap_or(0);
            let scale = T::c(1.0 / (1.0 - p));
            let data = sl(x[0])
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if crate::ir::dropout_keep(seed, *salt, i as u64, *p) {
                        *v * scale
                    } else {
                        T::zero()
                    }
                })
                .collect();
            vec![tensor(x[0].shape(), data)]
        }
        Op::StopGradient => vec![x[0].clone()],
        Op::SoftmaxXent { smoothing } => softmax_xent(x[0], x[1], *smoothing),
        Op::SoftmaxXentGrad { smoothing } => {
            let s = x[0].shape();
            let (n, k) = (s[0], s[1]);
            let labels = sl(x[1]);
            let mut d = sl(x[0]).to_vec();
            for i in 0..n {
                let label = labels[i].to_usize().unwrap_or(0);
                for j in 0..k {
                    let t = target(j == label, *smoothing, k);
                    d[i * k + j] = (d[i * k + j] - T::c(t)) / T::c(n as f64);
                }
            }
            vec![tensor(s, d)]
        }
        Op::CountCorrect => {
            let s = x[0].shape();
            let (n, k) = (s[0], s[1]);
            let labels = sl(x[1]);
            let correct = (0..n)
                .filter(|&i| {
                    let row = &sl(x[0])[i * k..(i + 1) * k];
                    argmax(row) == labels[i].to_usize().unwrap_or(usize::MAX)
                })
                .count();
            vec![tensor(&[], vec![T::c(correct as f64)])]
        }
        Op::OneHot { classes } => {
            let n = x[0].len();
            let mut data = vec![T::zero(); n * classes];
            for (i, c) in sl(x[0]).iter().enumerate() {
                if let Some(c) = c.to_usize().filter(|c| c < classes) {
                    data[i * classes + c] = T::one();
                }
            }
            vec![tensor(&[n, *classes], data)]
        }
    }
}

fn view2<T: Scalar>(t: &Tensor<T>) -> ArrayView2<'_, T> {
    t.view().into_dimensionality().expect("2-D")
}

/// Label-smoothed target probability of a class.
fn target(is_label: bool, smoothing: f64, k: usize) -> f64 {
    (if is_label { 1.0 - smoothing } else { 0.0 }) + smoothing / k as f64
}

/// Index of the first maximum.
fn argmax<T: Scalar>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = j;
        }
    }
    best
}

fn act<T: Scalar>(a: &Act, x: T) -> T {
    match a {
        Act::Relu => x.max(T::zero()),
        Act::LeakyRelu(s) => {
            if x > T::zero() {
                x
            } else {
                x * T::c(*s)
            }
        }
        Act::Sigmoid => T::one() / (T::one() + (-x).exp()),
        Act::Tanh => x.tanh(),
        Act::Gelu => T::c(0.5) * x * (T::one() + (x / T::c(std::f64::consts::SQRT_2)).erf()),
    }
}

/// `f'(x)`. ReLU's derivative at 0 is 0 (as PyTorch).
fn act_grad<T: Scalar>(a: &Act, x: T) -> T {
    match a {
        Act::Relu => {
            if x > T::zero() {
                T::one()
            } else {
                T::zero()
            }
        }
        Act::LeakyRelu(s) => {
            if x > T::zero() {
                T::one()
            } else {
                T::c(*s)
            }
        }
        Act::Sigmoid => {
            let s = act(&Act::Sigmoid, x);
            s * (T::one() - s)
        }
        Act::Tanh => {
            let t = x.tanh();
            T::one() - t * t
        }
        // d/dx x·Φ(x) = Φ(x) + x·φ(x)
        Act::Gelu => {
            let cdf = T::c(0.5) * (T::one() + (x / T::c(std::f64::consts::SQRT_2)).erf());
            let pdf = (-x * x / T::c(2.0)).exp() / T::c((2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
    }
}

/// (channels, elements per channel block) of an `[N, C, …]` tensor.
fn channel_layout(s: &[usize]) -> (usize, usize) {
    (s[1], s[2..].iter().product())
}

fn batchnorm<T: Scalar>(x: &Tensor<T>, g: &Tensor<T>, b: &Tensor<T>, eps: f64) -> Vec<Tensor<T>> {
    let s = x.shape();
    let (c, inner) = channel_layout(s);
    let n = s[0];
    let m = T::c((n * inner) as f64);
    let xs = sl(x);
    let mut mean = vec![T::zero(); c];
    let mut var = vec![T::zero(); c];
    for (i, v) in xs.iter().enumerate() {
        let k = (i / inner) % c;
        mean[k] = mean[k] + *v;
    }
    for v in &mut mean {
        *v = *v / m;
    }
    for (i, v) in xs.iter().enumerate() {
        let k = (i / inner) % c;
        let d = *v - mean[k];
        var[k] = var[k] + d * d;
    }
    for v in &mut var {
        *v = *v / m;
    }
    let (gs, bs) = (sl(g), sl(b));
    let y = xs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let k = (i / inner) % c;
            gs[k] * (*v - mean[k]) / (var[k] + T::c(eps)).sqrt() + bs[k]
        })
        .collect();
    vec![tensor(s, y), tensor(&[c], mean), tensor(&[c], var)]
}

/// `x̄ = γ·σ⁻¹/M · (M·ȳ - Σȳ - x̂·Σ(ȳ·x̂))`, `γ̄ = Σ ȳ·x̂`, `β̄ = Σ ȳ`.
fn batchnorm_grad<T: Scalar>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    g: &Tensor<T>,
    mean: &Tensor<T>,
    var: &Tensor<T>,
    eps: f64,
) -> Vec<Tensor<T>> {
    let s = x.shape();
    let (c, inner) = channel_layout(s);
    let m = T::c((s[0] * inner) as f64);
    let (dys, xs, gs, ms, vs) = (sl(dy), sl(x), sl(g), sl(mean), sl(var));
    let inv: Vec<T> = vs
        .iter()
        .map(|v| T::one() / (*v + T::c(eps)).sqrt())
        .collect();
    let mut dbeta = vec![T::zero(); c];
    let mut dgamma = vec![T::zero(); c];
    for i in 0..xs.len() {
        let k = (i / inner) % c;
        let xhat = (xs[i] - ms[k]) * inv[k];
        dbeta[k] = dbeta[k] + dys[i];
        dgamma[k] = dgamma[k] + dys[i] * xhat;
    }
    let dx = (0..xs.len())
        .map(|i| {
            let k = (i / inner) % c;
            let xhat = (xs[i] - ms[k]) * inv[k];
            gs[k] * inv[k] / m * (m * dys[i] - dbeta[k] - xhat * dgamma[k])
        })
        .collect();
    vec![tensor(s, dx), tensor(&[c], dgamma), tensor(&[c], dbeta)]
}

fn groupnorm<T: Scalar>(
    x: &Tensor<T>,
    g: &Tensor<T>,
    b: &Tensor<T>,
    groups: usize,
    eps: f64,
) -> Vec<Tensor<T>> {
    let s = x.shape();
    let (n, c) = (s[0], s[1]);
    let hw = s[2] * s[3];
    let per = c / groups * hw;
    let xs = sl(x);
    let (gs, bs) = (sl(g), sl(b));
    let mut mean = vec![T::zero(); n * groups];
    let mut var = vec![T::zero(); n * groups];
    let mut y = vec![T::zero(); xs.len()];
    for (ng, chunk) in xs.chunks(per).enumerate() {
        let m = chunk.iter().fold(T::zero(), |a, v| a + *v) / T::c(per as f64);
        let v = chunk.iter().fold(T::zero(), |a, x| a + (*x - m) * (*x - m)) / T::c(per as f64);
        mean[ng] = m;
        var[ng] = v;
        let inv = T::one() / (v + T::c(eps)).sqrt();
        for (j, xv) in chunk.iter().enumerate() {
            let i = ng * per + j;
            let k = (i / hw) % c;
            y[i] = (*xv - m) * inv * gs[k] + bs[k];
        }
    }
    vec![
        tensor(s, y),
        tensor(&[n, groups], mean),
        tensor(&[n, groups], var),
    ]
}

/// Per (image, group): `x̄ = σ⁻¹/M · (M·d - Σd - x̂·Σ(d·x̂))` with `d = ȳ·γ[c]`.
fn groupnorm_grad<T: Scalar>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    g: &Tensor<T>,
    mean: &Tensor<T>,
    var: &Tensor<T>,
    groups: usize,
    eps: f64,
) -> Vec<Tensor<T>> {
    let s = x.shape();
    let c = s[1];
    let hw = s[2] * s[3];
    let per = c / groups * hw;
    let (dys, xs, gs, ms, vs) = (sl(dy), sl(x), sl(g), sl(mean), sl(var));
    let mut dx = vec![T::zero(); xs.len()];
    let mut dgamma = vec![T::zero(); c];
    let mut dbeta = vec![T::zero(); c];
    let m = T::c(per as f64);
    for ng in 0..xs.len() / per {
        let inv = T::one() / (vs[ng] + T::c(eps)).sqrt();
        let range = ng * per..(ng + 1) * per;
        let mut sum_d = T::zero();
        let mut sum_dx = T::zero();
        for i in range.clone() {
            let k = (i / hw) % c;
            let xhat = (xs[i] - ms[ng]) * inv;
            let d = dys[i] * gs[k];
            sum_d = sum_d + d;
            sum_dx = sum_dx + d * xhat;
            dgamma[k] = dgamma[k] + dys[i] * xhat;
            dbeta[k] = dbeta[k] + dys[i];
        }
        for i in range {
            let k = (i / hw) % c;
            let xhat = (xs[i] - ms[ng]) * inv;
            let d = dys[i] * gs[k];
            dx[i] = inv / m * (m * d - sum_d - xhat * sum_dx);
        }
    }
    vec![tensor(s, dx), tensor(&[c], dgamma), tensor(&[c], dbeta)]
}

/// Geometry of a convolution: sizes and the im2col matrix `[Cg·kh·kw, Ho·Wo]`.
struct ConvGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    cg: usize,
    og: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    a: ConvAttrs,
}

impl ConvGeom {
    fn new(x: &[usize], wshape: &[usize], y: &[usize], a: &ConvAttrs) -> Self {
        ConvGeom {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: wshape[0],
            cg: wshape[1],
            og: wshape[0] / a.groups,
            kh: wshape[2],
            kw: wshape[3],
            ho: y[2],
            wo: y[3],
            a: *a,
        }
    }

    fn rows(&self) -> usize {
        self.cg * self.kh * self.kw
    }

    /// Calls `f(col, pixel)` for every entry of the im2col matrix that reads an
    /// input pixel (padding reads nothing): `col` indexes the `[rows, Ho·Wo]`
    /// matrix, `pixel` the group's input block `[Cg, H, W]`.
    fn taps(&self, mut f: impl FnMut(usize, usize)) {
        let cols = self.ho * self.wo;
        let (sy, sx) = (self.a.stride[0], self.a.stride[1]);
        let (dy, dx) = (self.a.dilation[0], self.a.dilation[1]);
        let (py, px) = (self.a.pad[0] as isize, self.a.pad[1] as isize);
        for ci in 0..self.cg {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let r = (ci * self.kh + ky) * self.kw + kx;
                    for oy in 0..self.ho {
                        let iy = (oy * sy + ky * dy) as isize - py;
                        if iy < 0 || iy as usize >= self.h {
                            continue;
                        }
                        let row = (ci * self.h + iy as usize) * self.w;
                        for ox in 0..self.wo {
                            let ix = (ox * sx + kx * dx) as isize - px;
                            if ix >= 0 && (ix as usize) < self.w {
                                f(r * cols + oy * self.wo + ox, row + ix as usize);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Offset of image `n`, group `g`'s input block `[Cg, H, W]`.
    fn block(&self, n: usize, g: usize) -> usize {
        (n * self.c + g * self.cg) * self.h * self.w
    }

    /// im2col of image `n`, group `g`.
    fn im2col<T: Scalar>(&self, x: &[T], n: usize, g: usize) -> Vec<T> {
        let mut m = vec![T::zero(); self.rows() * self.ho * self.wo];
        let x = &x[self.block(n, g)..];
        self.taps(|col, pixel| m[col] = x[pixel]);
        m
    }
}

fn conv2d<T: Scalar>(x: &Tensor<T>, w: &Tensor<T>, a: &ConvAttrs, out: &[usize]) -> Tensor<T> {
    let geo = ConvGeom::new(x.shape(), w.shape(), out, a);
    let cols = geo.ho * geo.wo;
    let mut y = vec![T::zero(); out.iter().product()];
    let ws = sl(w);
    for n in 0..geo.n {
        for g in 0..a.groups {
            let col = geo.im2col(sl(x), n, g);
            let wg = &ws[g * geo.og * geo.rows()..(g + 1) * geo.og * geo.rows()];
            let base = (n * geo.o + g * geo.og) * cols;
            let yg = &mut y[base..base + geo.og * cols];
            general_mat_mul(
                T::one(),
                &ArrayView2::from_shape((geo.og, geo.rows()), wg).expect("weight block"),
                &ArrayView2::from_shape((geo.rows(), cols), &col).expect("columns"),
                T::zero(),
                &mut ArrayViewMut2::from_shape((geo.og, cols), yg).expect("output block"),
            );
        }
    }
    tensor(out, y)
}

/// `dcol = Wgᵀ·ȳ`, scattered back into the input (col2im).
fn conv2d_grad_input<T: Scalar>(
    dy: &Tensor<T>,
    w: &Tensor<T>,
    a: &ConvAttrs,
    xshape: &[usize],
) -> Tensor<T> {
    let geo = ConvGeom::new(xshape, w.shape(), dy.shape(), a);
    let cols = geo.ho * geo.wo;
    let mut dx = vec![T::zero(); xshape.iter().product()];
    let ws = sl(w);
    for n in 0..geo.n {
        for g in 0..a.groups {
            let wg = ArrayView2::from_shape(
                (geo.og, geo.rows()),
                &ws[g * geo.og * geo.rows()..(g + 1) * geo.og * geo.rows()],
            )
            .expect("weight block");
            let base = (n * geo.o + g * geo.og) * cols;
            let dyg = ArrayView2::from_shape((geo.og, cols), &sl(dy)[base..base + geo.og * cols])
                .expect("dy block");
            let mut dcol = vec![T::zero(); geo.rows() * cols];
            general_mat_mul(
                T::one(),
                &wg.t(),
                &dyg,
                T::zero(),
                &mut ArrayViewMut2::from_shape((geo.rows(), cols), &mut dcol).expect("columns"),
            );
            let block = geo.block(n, g);
            geo.taps(|col, pixel| dx[block + pixel] = dx[block + pixel] + dcol[col]);
        }
    }
    tensor(xshape, dx)
}

/// `W̄g = Σₙ ȳ[n,g]·colᵀ`.
fn conv2d_grad_weight<T: Scalar>(
    x: &Tensor<T>,
    dy: &Tensor<T>,
    a: &ConvAttrs,
    wshape: &[usize],
) -> Tensor<T> {
    let geo = ConvGeom::new(x.shape(), wshape, dy.shape(), a);
    let cols = geo.ho * geo.wo;
    let mut dw = vec![T::zero(); wshape.iter().product()];
    for n in 0..geo.n {
        for g in 0..a.groups {
            let col = geo.im2col(sl(x), n, g);
            let base = (n * geo.o + g * geo.og) * cols;
            let dyg = ArrayView2::from_shape((geo.og, cols), &sl(dy)[base..base + geo.og * cols])
                .expect("dy block");
            let colv = ArrayView2::from_shape((geo.rows(), cols), &col).expect("columns");
            let dwg = &mut dw[g * geo.og * geo.rows()..(g + 1) * geo.og * geo.rows()];
            general_mat_mul(
                T::one(),
                &dyg,
                &colv.t(),
                T::one(),
                &mut ArrayViewMut2::from_shape((geo.og, geo.rows()), dwg).expect("weight block"),
            );
        }
    }
    tensor(wshape, dw)
}

/// Calls `f(out_index, in_index)` for every (output pixel, input pixel inside the
/// window, padding excluded) of a pooling.
fn windows(x: &[usize], y: &[usize], p: &PoolAttrs, mut f: impl FnMut(usize, Option<usize>)) {
    let (n, c, h, w) = (x[0], x[1], x[2], x[3]);
    let (ho, wo) = (y[2], y[3]);
    for nc in 0..n * c {
        for oy in 0..ho {
            for ox in 0..wo {
                let o = (nc * ho + oy) * wo + ox;
                for ky in 0..p.kernel[0] {
                    for kx in 0..p.kernel[1] {
                        let iy = (oy * p.stride[0] + ky) as isize - p.pad[0] as isize;
                        let ix = (ox * p.stride[1] + kx) as isize - p.pad[1] as isize;
                        let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                        f(o, inside.then(|| (nc * h + iy as usize) * w + ix as usize));
                    }
                }
            }
        }
    }
}

/// Index of the first maximum of each window (padding excluded).
fn argmax_windows<T: Scalar>(x: &Tensor<T>, p: &PoolAttrs, out: &[usize]) -> Vec<usize> {
    let xs = sl(x);
    let s = x.shape();
    let (h, w) = (s[2] as isize, s[3] as isize);
    let (ho, wo) = (out[2], out[3]);
    let mut best = Vec::with_capacity(out.iter().product());
    for nc in 0..s[0] * s[1] {
        let plane = nc * s[2] * s[3];
        for oy in 0..ho {
            for ox in 0..wo {
                let mut b = usize::MAX;
                for ky in 0..p.kernel[0] {
                    let iy = (oy * p.stride[0] + ky) as isize - p.pad[0] as isize;
                    if iy < 0 || iy >= h {
                        continue;
                    }
                    for kx in 0..p.kernel[1] {
                        let ix = (ox * p.stride[1] + kx) as isize - p.pad[1] as isize;
                        if ix < 0 || ix >= w {
                            continue;
                        }
                        let i = plane + (iy * w + ix) as usize;
                        if b == usize::MAX || xs[i] > xs[b] {
                            b = i;
                        }
                    }
                }
                // Every window overlaps the input: pad is at most half the kernel.
                best.push(b);
            }
        }
    }
    best
}

fn maxpool<T: Scalar>(x: &Tensor<T>, p: &PoolAttrs, out: &[usize]) -> Tensor<T> {
    let xs = sl(x);
    let data = argmax_windows(x, p, out)
        .into_iter()
        .map(|i| xs[i])
        .collect();
    tensor(out, data)
}

fn maxpool_grad<T: Scalar>(dy: &Tensor<T>, x: &Tensor<T>, p: &PoolAttrs) -> Tensor<T> {
    let mut dx = vec![T::zero(); x.len()];
    for (o, i) in argmax_windows(x, p, dy.shape()).into_iter().enumerate() {
        dx[i] = dx[i] + sl(dy)[o];
    }
    tensor(x.shape(), dx)
}

/// Mean over each window, padding counted in the divisor (PyTorch's default).
fn avgpool<T: Scalar>(x: &Tensor<T>, p: &PoolAttrs, out: &[usize]) -> Tensor<T> {
    let xs = sl(x);
    let k = T::c((p.kernel[0] * p.kernel[1]) as f64);
    let mut y = vec![T::zero(); out.iter().product()];
    windows(x.shape(), out, p, |o, i| {
        if let Some(i) = i {
            y[o] = y[o] + xs[i] / k;
        }
    });
    tensor(out, y)
}

fn avgpool_grad<T: Scalar>(dy: &Tensor<T>, p: &PoolAttrs, xshape: &[usize]) -> Tensor<T> {
    let k = T::c((p.kernel[0] * p.kernel[1]) as f64);
    let mut dx = vec![T::zero(); xshape.iter().product()];
    windows(xshape, dy.shape(), p, |o, i| {
        if let Some(i) = i {
            dx[i] = dx[i] + sl(dy)[o] / k;
        }
    });
    tensor(xshape, dx)
}

/// Mean cross-entropy with label smoothing, and the softmax probabilities.
fn softmax_xent<T: Scalar>(
    logits: &Tensor<T>,
    labels: &Tensor<T>,
    smoothing: f64,
) -> Vec<Tensor<T>> {
    let s = logits.shape();
    let (n, k) = (s[0], s[1]);
    let zs = sl(logits);
    let ls = sl(labels);
    let mut probs = vec![T::zero(); n * k];
    let mut loss = T::zero();
    for i in 0..n {
        let row = &zs[i * k..(i + 1) * k];
        let max = row.iter().fold(T::neg_infinity(), |a, b| a.max(*b));
        let sum = row.iter().fold(T::zero(), |a, z| a + (*z - max).exp());
        let lse = max + sum.ln();
        let label = ls[i].to_usize().unwrap_or(0);
        for j in 0..k {
            probs[i * k + j] = (row[j] - lse).exp();
            loss = loss - T::c(target(j == label, smoothing, k)) * (row[j] - lse);
        }
    }
    vec![tensor(&[], vec![loss / T::c(n as f64)]), tensor(s, probs)]
}
