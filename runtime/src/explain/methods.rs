//! The explanation methods: each turns images and the class to explain into one
//! `H × W` map per image (the input's size), from the outputs of compiled graphs
//! ([`Runner`]); no hooks, no state: weights and running statistics are only read.
//!
//! - saliency: `max_c |∂s/∂x_c|` (Simonyan et al. 2014), one backward pass.
//! - SmoothGrad (Smilkov et al. 2017): `|∂s/∂x|` averaged over `samples` copies
//!   of the image with Gaussian noise of standard deviation `noise × (max − min)`
//!   of the image, then the maximum over channels.
//! - Integrated Gradients (Sundararajan et al. 2017): `(x − x') ⊙` the mean
//!   gradient at `x' + α (x − x')`, `α = (k − ½)/steps` (the midpoint rule),
//!   summed over channels. The map is signed and adds up to about
//!   `s(x) − s(x')` (completeness; the gap is reported). Path points are run a
//!   batch at a time and summed into one buffer per image: memory does not grow
//!   with `steps`.
//! - CAM (Zhou et al. 2016): `ReLU(Σ_k W[c,k] A_k)`, `A` the map fed to
//!   `global_avg_pool` and `W` the final linear layer's weights, upsampled.
//! - Grad-CAM (Selvaraju et al. 2017): `ReLU(Σ_k α_k A_k)` with `α_k` the
//!   spatial mean of `∂s/∂A_k`, for any spatial map `A`, upsampled.
//!
//! `s` is the explained class's score (its logit, before the softmax). Coarse
//! maps are upsampled bilinearly (half-pixel centres, as PyTorch's
//! `interpolate(…, align_corners=False)`).

use super::render::upsample_bilinear;
use super::runner::{GraphKind, Runner};
use crate::data::rng::{self, Purpose};
use crate::params::Params;
use cnnc_compiler::checked::{Baseline, CheckedModel, Method, Op, ValueId};
use cnnc_compiler::ir::lower::cam_parts;

/// Images to explain, as the model reads them (after the evaluation transforms).
pub struct Images<'a> {
    /// `n × C × H × W`.
    pub x: &'a [f32],
    pub n: usize,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
}

impl Images<'_> {
    pub fn len_one(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.len_one();
        &self.x[i * l..(i + 1) * l]
    }
}

/// The largest batch an explain graph is compiled for.
pub const MAX_BATCH: usize = 64;

/// One map per image and what else the method found out.
pub struct Maps {
    /// `n` maps of `H × W`.
    pub maps: Vec<Vec<f32>>,
    /// Integrated Gradients: per image, `Σ map − (s(x) − s(x'))`.
    pub completeness_gap: Option<Vec<f32>>,
}

/// Runs graph `kind` over `m` items in batches of `min(m, MAX_BATCH)` (the last
/// batch padded with copies of the last item): `fill(i, buf)` writes item `i`'s
/// image, `class(i)` its class (when the graph takes one), and `take(i, outs)`
/// gets item `i`'s slice of each output in `names` (name, numbers per item).
#[allow(clippy::too_many_arguments)]
pub fn for_each_item(
    runner: &mut Runner,
    params: &Params,
    kind: GraphKind,
    m: usize,
    len: usize,
    mut fill: impl FnMut(usize, &mut [f32]),
    class: impl Fn(usize) -> usize,
    names: &[(&str, usize)],
    mut take: impl FnMut(usize, &[&[f32]]),
) -> Result<(), String> {
    if m == 0 {
        return Ok(());
    }
    let b = m.min(MAX_BATCH);
    let mut x = vec![0.0f32; b * len];
    let mut classes = vec![0.0f32; b];
    let labels = vec![0.0f32; b];
    for start in (0..m).step_by(b) {
        for j in 0..b {
            let i = (start + j).min(m - 1);
            fill(i, &mut x[j * len..(j + 1) * len]);
            classes[j] = class(i) as f32;
        }
        let out = runner.run(
            kind,
            b,
            params,
            &x,
            &[("class", &classes), ("labels", &labels)],
        )?;
        // A gradient that is identically zero is not an output: zeros.
        let outs: Vec<Vec<f32>> = names
            .iter()
            .map(|&(name, per)| match out.get(name) {
                Ok(v) => Ok(v.to_vec()),
                Err(_) if name.starts_with("grad:") => Ok(out.get_or_zeros(name, b * per)),
                Err(e) => Err(e),
            })
            .collect::<Result<_, String>>()?;
        for j in 0..b.min(m - start) {
            let slices: Vec<&[f32]> = outs
                .iter()
                .map(|o| {
                    let per = o.len() / b;
                    &o[j * per..(j + 1) * per]
                })
                .collect();
            take(start + j, &slices);
        }
    }
    Ok(())
}

/// The logits of each image (`n × classes`).
pub fn logits(
    runner: &mut Runner,
    params: &Params,
    images: &Images,
) -> Result<Vec<Vec<f32>>, String> {
    let len = images.len_one();
    let mut out = vec![Vec::new(); images.n];
    for_each_item(
        runner,
        params,
        GraphKind::Logits,
        images.n,
        len,
        |i, buf| buf.copy_from_slice(images.image(i)),
        |_| 0,
        &[("logits", 0)],
        |i, o| out[i] = o[0].to_vec(),
    )?;
    Ok(out)
}

/// Computes `method`'s map of class `classes[i]` for every image. `stream` keys
/// the random noise of SmoothGrad (the directive's position and the seed).
pub fn compute(
    runner: &mut Runner,
    params: &Params,
    method: &Method,
    images: &Images,
    classes: &[usize],
    seed: u64,
    stream: u64,
) -> Result<Maps, String> {
    let [c, h, w] = images.shape;
    let len = images.len_one();
    let n = images.n;
    let plain = |maps| Maps {
        maps,
        completeness_gap: None,
    };
    match method {
        Method::Saliency => {
            let mut maps = vec![Vec::new(); n];
            for_each_item(
                runner,
                params,
                GraphKind::InputGrad,
                n,
                len,
                |i, buf| buf.copy_from_slice(images.image(i)),
                |i| classes[i],
                &[("grad:x", len)],
                |i, o| maps[i] = max_abs_over_channels(o[0], c, h * w),
            )?;
            Ok(plain(maps))
        }
        Method::SmoothGrad { samples, noise } => {
            let s = (*samples).max(1) as usize;
            let mut acc = vec![0.0f32; n * len];
            let sigma: Vec<f32> = (0..n)
                .map(|i| {
                    let img = images.image(i);
                    let (lo, hi) = min_max(img);
                    (*noise * f64::from(hi - lo)) as f32
                })
                .collect();
            for_each_item(
                runner,
                params,
                GraphKind::InputGrad,
                n * s,
                len,
                |i, buf| {
                    let (img, k) = (i / s, i % s);
                    let mut r = rng::stream(seed, Purpose::Explain, stream, (img * s + k) as u64);
                    for (o, &v) in buf.iter_mut().zip(images.image(img)) {
                        *o = v + sigma[img] * rng::normal(&mut r) as f32;
                    }
                },
                |i| classes[i / s],
                &[("grad:x", len)],
                |i, o| {
                    let img = i / s;
                    add_abs(&mut acc[img * len..(img + 1) * len], o[0]);
                },
            )?;
            let maps = (0..n)
                .map(|i| {
                    let mut m = max_abs_over_channels(&acc[i * len..(i + 1) * len], c, h * w);
                    m.iter_mut().for_each(|v| *v /= s as f32);
                    m
                })
                .collect();
            Ok(plain(maps))
        }
        Method::IntegratedGradients { steps, baseline } => {
            let steps = (*steps).max(1) as usize;
            let baselines: Vec<Vec<f32>> = (0..n)
                .map(|i| baseline_image(*baseline, images.image(i), images.shape))
                .collect::<Result<_, String>>()?;
            let mut acc = vec![0.0f32; n * len];
            for_each_item(
                runner,
                params,
                GraphKind::InputGrad,
                n * steps,
                len,
                |i, buf| {
                    let (img, k) = (i / steps, i % steps);
                    let alpha = (k as f32 + 0.5) / steps as f32;
                    let (x, x0) = (images.image(img), &baselines[img]);
                    for ((o, &a), &b) in buf.iter_mut().zip(x).zip(x0) {
                        *o = b + alpha * (a - b);
                    }
                },
                |i| classes[i / steps],
                &[("grad:x", len)],
                |i, o| {
                    let img = i / steps;
                    for (a, &g) in acc[img * len..(img + 1) * len].iter_mut().zip(o[0]) {
                        *a += g;
                    }
                },
            )?;
            let mut maps = Vec::with_capacity(n);
            for i in 0..n {
                let (x, x0) = (images.image(i), &baselines[i]);
                let acc_i = &acc[i * len..(i + 1) * len];
                let mut m = vec![0.0f32; h * w];
                for ((x, x0), g) in x
                    .chunks_exact(h * w)
                    .zip(x0.chunks_exact(h * w))
                    .zip(acc_i.chunks_exact(h * w))
                {
                    for (((o, &a), &b), &gi) in m.iter_mut().zip(x).zip(x0).zip(g) {
                        *o += (a - b) * gi / steps as f32;
                    }
                }
                maps.push(m);
            }
            // Completeness: the attributions add up to s(x) − s(x').
            let flat: Vec<f32> = baselines.concat();
            let base = Images {
                x: &flat,
                n,
                shape: images.shape,
            };
            let at_x = logits(runner, params, images)?;
            let at_base = logits(runner, params, &base)?;
            let gap = (0..n)
                .map(|i| {
                    let total: f32 = maps[i].iter().sum();
                    total - (at_x[i][classes[i]] - at_base[i][classes[i]])
                })
                .collect();
            Ok(Maps {
                maps,
                completeness_gap: Some(gap),
            })
        }
        Method::Cam { layer } => {
            let (maps, _) = cam(runner, params, *layer, images, Some(classes))?;
            Ok(plain(maps))
        }
        Method::GradCam { layer } => {
            let fshape = runner.model().shape(*layer).clone();
            let (k, fh, fw) = (fshape[0] as usize, fshape[1] as usize, fshape[2] as usize);
            let mut maps = vec![Vec::new(); n];
            for_each_item(
                runner,
                params,
                GraphKind::FeatureGrad(*layer),
                n,
                len,
                |i, buf| buf.copy_from_slice(images.image(i)),
                |i| classes[i],
                &[("features", 0), ("grad:features", k * fh * fw)],
                |i, o| {
                    let (a, g) = (o[0], o[1]);
                    let alpha: Vec<f32> = (0..k)
                        .map(|ch| {
                            let gk = g.get(ch * fh * fw..(ch + 1) * fh * fw).unwrap_or(&[]);
                            gk.iter().sum::<f32>() / (fh * fw) as f32
                        })
                        .collect();
                    let coarse = weighted_sum_relu(a, &alpha, fh * fw);
                    maps[i] = upsample_bilinear(&coarse, fh, fw, h, w);
                },
            )?;
            Ok(plain(maps))
        }
    }
}

/// CAM maps of `images` for `classes`, or for each image's predicted class
/// (`None`: taken from the logits of the same forward pass). Returns the maps
/// and the classes.
pub fn cam(
    runner: &mut Runner,
    params: &Params,
    layer: ValueId,
    images: &Images,
    classes: Option<&[usize]>,
) -> Result<(Vec<Vec<f32>>, Vec<usize>), String> {
    let [_, h, w] = images.shape;
    let model = runner.model().clone();
    let (source, linear) =
        cam_parts(&model, layer).ok_or("the CAM target has no path to global_avg_pool")?;
    let weight = params
        .get(&format!("{}.weight", linear.name))
        .and_then(|t| t.as_f32())
        .ok_or_else(|| format!("no parameter `{}.weight`", linear.name))?
        .to_vec();
    let fshape = model.shape(source).clone();
    let (k, fh, fw) = (fshape[0] as usize, fshape[1] as usize, fshape[2] as usize);
    let mut maps = vec![Vec::new(); images.n];
    let mut chosen = vec![0; images.n];
    for_each_item(
        runner,
        params,
        GraphKind::Features(source),
        images.n,
        images.len_one(),
        |i, buf| buf.copy_from_slice(images.image(i)),
        |_| 0,
        &[("features", 0), ("logits", 0)],
        |i, o| {
            let c = classes.map_or_else(|| argmax(o[1]), |c| c[i]);
            chosen[i] = c;
            let wc = &weight[c * k..(c + 1) * k];
            let coarse = weighted_sum_relu(o[0], wc, fh * fw);
            maps[i] = upsample_bilinear(&coarse, fh, fw, h, w);
        },
    )?;
    Ok((maps, chosen))
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// `max_c |v[c, p]|` for each position `p` of `v` (`c × hw`).
fn max_abs_over_channels(v: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; hw];
    for ch in 0..c {
        for (o, &g) in m.iter_mut().zip(&v[ch * hw..(ch + 1) * hw]) {
            *o = o.max(g.abs());
        }
    }
    m
}

fn add_abs(acc: &mut [f32], g: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(g) {
        *a += v.abs();
    }
}

/// `ReLU(Σ_k weights[k] · a[k])` over positions (`a` is `k × hw`).
fn weighted_sum_relu(a: &[f32], weights: &[f32], hw: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; hw];
    for (ch, &wk) in weights.iter().enumerate() {
        if let Some(ak) = a.get(ch * hw..(ch + 1) * hw) {
            for (o, &v) in m.iter_mut().zip(ak) {
                *o += wk * v;
            }
        }
    }
    m.iter_mut().for_each(|v| *v = v.max(0.0));
    m
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Integrated Gradients' starting image: zeros, the image's per-channel mean,
/// or the image blurred (a Gaussian of a tenth of the image side).
pub fn baseline_image(
    kind: Baseline,
    x: &[f32],
    [c, h, w]: [usize; 3],
) -> Result<Vec<f32>, String> {
    Ok(match kind {
        Baseline::Zero => vec![0.0; x.len()],
        Baseline::Mean => {
            let hw = h * w;
            let mut out = vec![0.0; x.len()];
            for ch in 0..c {
                let plane = &x[ch * hw..(ch + 1) * hw];
                let mean = plane.iter().sum::<f32>() / hw as f32;
                out[ch * hw..(ch + 1) * hw].fill(mean);
            }
            out
        }
        Baseline::Blur => {
            let sigma = h.max(w) as f64 / 10.0;
            super::metrics::blur(x, [c, h, w], sigma)?
        }
    })
}

/// The map of one image for its predicted class: what `cnnc bench --explain`
/// times (class selection, the method, the upsampling).
pub fn explain_predicted(
    runner: &mut Runner,
    params: &Params,
    method: &Method,
    image: &[f32],
    shape: [usize; 3],
) -> Result<Vec<f32>, String> {
    let images = Images {
        x: image,
        n: 1,
        shape,
    };
    let scores = logits(runner, params, &images)?;
    let class = scores.first().map_or(0, |l| {
        l.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0
    });
    let mut maps = compute(runner, params, method, &images, &[class], 0, 0)?;
    maps.maps.pop().ok_or_else(|| "no map".to_string())
}

/// The CAM target of a model that ends with `global_avg_pool` then `linear`: the
/// map fed to the pool. `None` for other models.
pub fn default_cam_target(m: &CheckedModel) -> Option<ValueId> {
    let out = m.output();
    let fc = m.layers.get(out.0.checked_sub(1)?)?;
    let gap = *fc.inputs.first()?;
    let pool = m.layers.get(gap.0.checked_sub(1)?)?;
    if !matches!(pool.op, Op::GlobalAvgPool) || !matches!(fc.op, Op::Linear { .. }) {
        return None;
    }
    let target = *pool.inputs.first()?;
    (m.shape(target).len() == 3 && cam_parts(m, target).is_some()).then_some(target)
}
