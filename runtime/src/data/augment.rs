//! Per-image augmentation: random crop with zero padding, horizontal flip and
//! per-channel normalisation, on `C × H × W` images.
//!
//! Crop and flip run in the order written; normalisation always runs last, after
//! them. Training draws its random choices from a stream keyed by (seed, epoch,
//! sample index); evaluation crops the centre, never flips, and normalises.

use cnnc_compiler::checked::Augment;
use rand_chacha::ChaCha8Rng;

use super::rng::{self, below, Purpose};
use super::DataError;

/// One geometric step, as the augmenter runs it.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Zero-pad by `pad` on every side, then take a `size × size` window.
    Crop { size: usize, pad: usize },
    /// Mirror left–right with probability `p`.
    Flip { p: f64 },
}

/// The augmentation of a `train` section, checked against an image shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Augmenter {
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    ops: Vec<Op>,
    /// Per-channel `(mean, std)` pairs, applied in order after `ops`.
    norms: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Augmenter {
    /// Checks `augment` against images of `in_shape` (`[C, H, W]`): crops must fit
    /// the padded image, normalisation needs one value or one per channel and a
    /// positive standard deviation.
    pub fn new(in_shape: [usize; 3], augment: &[Augment]) -> Result<Self, DataError> {
        let [c, mut h, mut w] = in_shape;
        let mut ops = Vec::new();
        let mut norms = Vec::new();
        for a in augment {
            match a {
                Augment::RandomCrop { size, pad } => {
                    let (size, pad) = (*size as usize, *pad as usize);
                    if size == 0 || size > h + 2 * pad || size > w + 2 * pad {
                        return Err(DataError::Settings(format!(
                            "random_crop({size}, pad={pad}) does not fit {h}×{w} images \
                             (padded to {}×{})",
                            h + 2 * pad,
                            w + 2 * pad
                        )));
                    }
                    ops.push(Op::Crop { size, pad });
                    (h, w) = (size, size);
                }
                Augment::HFlip { p } => ops.push(Op::Flip { p: *p }),
                Augment::Normalize { mean, std } => {
                    let per_channel = |name: &str, v: &[f64]| -> Result<Vec<f32>, DataError> {
                        match v.len() {
                            1 => Ok(vec![v[0] as f32; c]),
                            n if n == c => Ok(v.iter().map(|&x| x as f32).collect()),
                            n => Err(DataError::Settings(format!(
                                "normalize has {n} {name} values but the images have {c} channels"
                            ))),
                        }
                    };
                    let (mean, std) = (per_channel("mean", mean)?, per_channel("std", std)?);
                    if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                        return Err(DataError::Settings(format!(
                            "normalize: std must be greater than 0, not {s}"
                        )));
                    }
                    norms.push((mean, std));
                }
            }
        }
        Ok(Augmenter {
            in_shape,
            out_shape: [c, h, w],
            ops,
            norms,
        })
    }

    /// Shape of the images that go in.
    pub fn in_shape(&self) -> [usize; 3] {
        self.in_shape
    }

    /// Shape of the images that come out (after any crop).
    pub fn out_shape(&self) -> [usize; 3] {
        self.out_shape
    }

    /// The training augmentation of sample `index` in `epoch`: the same output for
    /// the same `(seed, epoch, index)`, in any thread. `out` has
    /// `out_shape().product()` values.
    pub fn train(&self, img: &[f32], seed: u64, epoch: u64, index: usize, out: &mut [f32]) {
        let mut r = rng::stream(seed, Purpose::Augment, epoch, index as u64);
        self.run(img, Some(&mut r), out);
    }

    /// The evaluation transform: centre crop (if any crop), no flip, normalise.
    pub fn eval(&self, img: &[f32], out: &mut [f32]) {
        self.run(img, None, out);
    }

    fn run(&self, img: &[f32], mut r: Option<&mut ChaCha8Rng>, out: &mut [f32]) {
        let mut shape = self.in_shape;
        let mut cur: Option<Vec<f32>> = None;
        for op in &self.ops {
            let src = cur.as_deref().unwrap_or(img);
            match op {
                Op::Crop { size, pad } => {
                    let (ph, pw) = (shape[1] + 2 * pad, shape[2] + 2 * pad);
                    let (top, left) = match r.as_deref_mut() {
                        Some(r) => (
                            below(r, (ph - size + 1) as u64) as usize,
                            below(r, (pw - size + 1) as u64) as usize,
                        ),
                        None => ((ph - size) / 2, (pw - size) / 2),
                    };
                    let next = crop(src, shape, *size, *pad, top, left);
                    shape = [shape[0], *size, *size];
                    cur = Some(next);
                }
                Op::Flip { p } => {
                    if let Some(r) = r.as_deref_mut() {
                        if rng::unit(r) < *p {
                            let mut next = src.to_vec();
                            hflip(&mut next, shape);
                            cur = Some(next);
                        }
                    }
                }
            }
        }
        out.copy_from_slice(cur.as_deref().unwrap_or(img));
        for (mean, std) in &self.norms {
            normalize(out, shape, mean, std);
        }
    }
}

/// Zero-pads `img` (`[C, H, W]`) by `pad` on every side and returns the
/// `size × size` window whose top-left corner is at (`top`, `left`) in the padded
/// image (`top <= H + 2·pad − size`, `left <= W + 2·pad − size`).
pub fn crop(
    img: &[f32],
    shape: [usize; 3],
    size: usize,
    pad: usize,
    top: usize,
    left: usize,
) -> Vec<f32> {
    let [c, h, w] = shape;
    debug_assert!(top + size <= h + 2 * pad && left + size <= w + 2 * pad);
    let mut out = vec![0.0; c * size * size];
    for ch in 0..c {
        for y in 0..size {
            // Row in the original image, if this row is not padding.
            let Some(sy) = (top + y).checked_sub(pad).filter(|&sy| sy < h) else {
                continue;
            };
            for x in 0..size {
                if let Some(sx) = (left + x).checked_sub(pad).filter(|&sx| sx < w) {
                    out[(ch * size + y) * size + x] = img[(ch * h + sy) * w + sx];
                }
            }
        }
    }
    out
}

/// Mirrors `img` (`[C, H, W]`) left–right in place.
pub fn hflip(img: &mut [f32], shape: [usize; 3]) {
    let w = shape[2];
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// `(x − mean[c]) / std[c]` on every value of channel `c` of `img` (`[C, H, W]`).
pub fn normalize(img: &mut [f32], shape: [usize; 3], mean: &[f32], std: &[f32]) {
    let hw = shape[1] * shape[2];
    for (ch, plane) in img.chunks_exact_mut(hw).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        for v in plane {
            *v = (*v - m) / s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1×3×3 image with values 1..9, row by row.
    fn tiny() -> Vec<f32> {
        (1..=9).map(|v| v as f32).collect()
    }

    #[test]
    fn crop_pads_with_zeros_and_takes_the_window() {
        let img = tiny();
        // No pad: the top-left 2×2 and the bottom-right 2×2.
        assert_eq!(crop(&img, [1, 3, 3], 2, 0, 0, 0), vec![1., 2., 4., 5.]);
        assert_eq!(crop(&img, [1, 3, 3], 2, 0, 1, 1), vec![5., 6., 8., 9.]);
        // Pad 1 (5×5 padded), window at the corner: zeros then the image corner.
        assert_eq!(
            crop(&img, [1, 3, 3], 3, 1, 0, 0),
            vec![0., 0., 0., 0., 1., 2., 0., 4., 5.]
        );
        assert_eq!(
            crop(&img, [1, 3, 3], 3, 1, 2, 1),
            vec![4., 5., 6., 7., 8., 9., 0., 0., 0.]
        );
        // Centre of the padded image is the image itself.
        assert_eq!(crop(&img, [1, 3, 3], 3, 1, 1, 1), img);
        // Two channels are cropped alike.
        let two: Vec<f32> = img
            .iter()
            .chain(img.iter().map(|v| v * 10.0).collect::<Vec<_>>().iter())
            .copied()
            .collect();
        assert_eq!(
            crop(&two, [2, 3, 3], 2, 0, 1, 0),
            vec![4., 5., 7., 8., 40., 50., 70., 80.]
        );
    }

    #[test]
    fn flip_mirrors_each_row() {
        let mut img = tiny();
        hflip(&mut img, [1, 3, 3]);
        assert_eq!(img, vec![3., 2., 1., 6., 5., 4., 9., 8., 7.]);
    }

    #[test]
    fn normalize_per_channel_and_broadcast() {
        let mut img = vec![1.0, 3.0, 10.0, 30.0];
        normalize(&mut img, [2, 1, 2], &[1.0, 10.0], &[2.0, 10.0]);
        assert_eq!(img, vec![0.0, 1.0, 0.0, 2.0]);
        let a = Augmenter::new(
            [2, 1, 2],
            &[Augment::Normalize {
                mean: vec![0.5],
                std: vec![0.25],
            }],
        )
        .unwrap();
        let mut out = vec![0.0; 4];
        a.eval(&[0.5, 1.0, 0.0, 0.75], &mut out);
        assert_eq!(out, vec![0.0, 2.0, -2.0, 1.0]);
    }

    #[test]
    fn full_size_crop_without_pad_is_the_identity() {
        let a = Augmenter::new([1, 3, 3], &[Augment::RandomCrop { size: 3, pad: 0 }]).unwrap();
        let mut out = vec![0.0; 9];
        for i in 0..20 {
            a.train(&tiny(), 5, 1, i, &mut out);
            assert_eq!(out, tiny());
        }
    }

    #[test]
    fn random_crop_uses_every_offset_and_is_reproducible() {
        let a = Augmenter::new([1, 3, 3], &[Augment::RandomCrop { size: 3, pad: 1 }]).unwrap();
        assert_eq!(a.out_shape(), [1, 3, 3]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let mut out = vec![0.0; 9];
            a.train(&tiny(), 5, 1, i, &mut out);
            let mut again = vec![0.0; 9];
            a.train(&tiny(), 5, 1, i, &mut again);
            assert_eq!(out, again);
            // The crop keeps the centre pixel 5 somewhere, and only image values or 0.
            assert!(out.contains(&5.0));
            seen.insert(out.iter().map(|v| *v as u8).collect::<Vec<_>>());
        }
        assert_eq!(seen.len(), 9); // 3×3 offsets
                                   // Evaluation takes the centre: the image itself.
        let mut out = vec![0.0; 9];
        a.eval(&tiny(), &mut out);
        assert_eq!(out, tiny());
    }

    #[test]
    fn flip_probability_and_eval_never_flips() {
        let flipped = vec![3., 2., 1., 6., 5., 4., 9., 8., 7.];
        for (p, expect) in [(0.0, 0), (1.0, 400)] {
            let a = Augmenter::new([1, 3, 3], &[Augment::HFlip { p }]).unwrap();
            let mut n = 0;
            for i in 0..400 {
                let mut out = vec![0.0; 9];
                a.train(&tiny(), 0, 0, i, &mut out);
                n += usize::from(out == flipped);
            }
            assert_eq!(n, expect);
        }
        let a = Augmenter::new([1, 3, 3], &[Augment::HFlip { p: 0.5 }]).unwrap();
        let n = (0..400)
            .filter(|&i| {
                let mut out = vec![0.0; 9];
                a.train(&tiny(), 0, 0, i, &mut out);
                out == flipped
            })
            .count();
        assert!((150..250).contains(&n), "{n}");
        let mut out = vec![0.0; 9];
        a.eval(&tiny(), &mut out);
        assert_eq!(out, tiny());
    }

    #[test]
    fn normalize_runs_after_crop_and_flip() {
        // Written first, it still sees the padded zeros of the crop.
        let a = Augmenter::new(
            [1, 2, 2],
            &[
                Augment::Normalize {
                    mean: vec![1.0],
                    std: vec![1.0],
                },
                Augment::RandomCrop { size: 4, pad: 1 },
            ],
        )
        .unwrap();
        let mut out = vec![0.0; 16];
        a.eval(&[1.0, 1.0, 1.0, 1.0], &mut out);
        assert_eq!(out.iter().filter(|&&v| v == -1.0).count(), 12);
        assert_eq!(out.iter().filter(|&&v| v == 0.0).count(), 4);
    }

    #[test]
    fn settings_that_do_not_fit() {
        let e =
            Augmenter::new([1, 28, 28], &[Augment::RandomCrop { size: 40, pad: 2 }]).unwrap_err();
        assert!(e.to_string().contains("does not fit 28×28"), "{e}");
        let e = Augmenter::new(
            [3, 8, 8],
            &[Augment::Normalize {
                mean: vec![0.0, 0.0],
                std: vec![1.0],
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("2 mean values"), "{e}");
        let e = Augmenter::new(
            [1, 8, 8],
            &[Augment::Normalize {
                mean: vec![0.0],
                std: vec![0.0],
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("std"), "{e}");
    }
}
