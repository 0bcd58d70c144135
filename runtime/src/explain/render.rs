//! Pictures of explanation maps: resampling, normalisation, the colormap, overlays,
//! grids, and atomic PNG / `.npy` writers.
//!
//! Every function here is pure (plain slices in, an `RgbImage` or a `Vec` out)
//! except the two writers, which write a temporary file in the target folder and
//! rename it over the target, so a failed write never leaves half a file.
//!
//! Conventions: a map is `h × w` in row-major order; a model input is CHW with
//! `c` = 1 (grey) or 3 (RGB) and may be normalised (any finite range). Length
//! mismatches between a slice and its stated shape are bugs in the caller, not user
//! errors, and panic with a message.

use std::io;
use std::path::Path;

use image::{ImageEncoder, Rgb, RgbImage};

use crate::checkpoint::write_atomic;

/// The grid's padding colour: a light neutral grey that neither the colormap nor a
/// typical input uses for large areas.
pub const BACKGROUND: Rgb<u8> = Rgb([236, 236, 236]);

/// How much of the input's brightness shows under the heat map (the input is also
/// turned grey there), so that the map's light colours stand out on a light input.
const UNDERLAY_BRIGHTNESS: f32 = 0.8;

/// The heat map's opacity that reads well over a greyed input: vivid where the map
/// is hot, with the input's shapes still visible under it.
pub const DEFAULT_ALPHA: f32 = 0.7;

/// Resizes an `h × w` map to `out_h × out_w` by bilinear interpolation with
/// half-pixel centres, as PyTorch's `F.interpolate(mode="bilinear",
/// align_corners=False)` (no antialiasing): output pixel `i` samples the input at
/// `(i + 0.5) * h / out_h - 0.5`, clamped to the edges.
///
/// The output is a convex combination of input values, so a map in `[0, 1]` stays
/// in `[0, 1]`.
pub fn upsample_bilinear(map: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "upsample_bilinear: map is not {h}×{w}");
    if out_h == 0 || out_w == 0 {
        return Vec::new();
    }
    assert!(
        h > 0 && w > 0,
        "upsample_bilinear: empty map to {out_h}×{out_w}"
    );
    let ys = axis_samples(h, out_h);
    let xs = axis_samples(w, out_w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, fy) in &ys {
        let (r0, r1) = (&map[y0 * w..(y0 + 1) * w], &map[y1 * w..(y1 + 1) * w]);
        for &(x0, x1, fx) in &xs {
            let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
            out.push(top + (bottom - top) * fy);
        }
    }
    out
}

/// For each output index along one axis: the two input indices it lies between and
/// the weight of the second.
fn axis_samples(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64) as f32)
        })
        .collect()
}

/// Min-max scales a map to `[0, 1]`. `None` when the map is empty, constant, or has
/// a non-finite value: there is nothing to show (the caller reports a degenerate
/// map). The arithmetic is done in `f64`, so even a range of ±3e38 gives no NaN.
pub fn normalize01(map: &[f32]) -> Option<Vec<f32>> {
    let (lo, hi) = finite_range(map)?;
    if map.iter().any(|v| !v.is_finite()) || lo >= hi {
        return None;
    }
    let (lo, span) = (f64::from(lo), f64::from(hi) - f64::from(lo));
    Some(
        map.iter()
            .map(|&v| ((f64::from(v) - lo) / span).clamp(0.0, 1.0) as f32)
            .collect(),
    )
}

/// The smallest and largest finite values, `None` if there are none.
fn finite_range(values: &[f32]) -> Option<(f32, f32)> {
    values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// The inferno colormap (matplotlib's, perceptually uniform, monotone in lightness):
/// 0 is near-black, 1 is pale yellow. `t` is clamped to `[0, 1]`; NaN counts as 0.
pub fn colormap(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    colorous::INFERNO.eval_continuous(f64::from(t)).into_array()
}

/// The scale factor at which an `h × w` input is shown: the shorter side becomes
/// at least 128 px (32 → ×4, 28 → ×5, 224 → ×1), unless that would make the longer
/// side exceed 1024 px; never below 1.
pub fn display_scale(h: usize, w: usize) -> u32 {
    let short = h.min(w).max(1);
    let long = h.max(w).max(1);
    let wanted = 128usize.div_ceil(short);
    let allowed = (1024 / long).max(1);
    wanted.min(allowed).clamp(1, u32::MAX as usize) as u32
}

/// The model's input (CHW, `c` = 1 or 3) as an RGB image at its own size, min-max
/// scaled to `[0, 255]` over the whole image (all channels together, so colours
/// keep their balance); grey is replicated to RGB. A constant image is mid-grey;
/// non-finite values are black.
pub fn display_image(input: &[f32], c: usize, h: usize, w: usize) -> RgbImage {
    assert!(
        c == 1 || c == 3,
        "display_image: {c} channels (want 1 or 3)"
    );
    assert_eq!(
        input.len(),
        c * h * w,
        "display_image: input is not {c}×{h}×{w}"
    );
    let (lo, hi) = finite_range(input).unwrap_or((0.0, 0.0));
    let (lo, span) = (f64::from(lo), f64::from(hi) - f64::from(lo));
    let byte = |v: f32| -> u8 {
        if !v.is_finite() {
            0
        } else if span <= 0.0 {
            128
        } else {
            ((f64::from(v) - lo) / span * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        }
    };
    let plane = h * w;
    RgbImage::from_fn(dim(w), dim(h), |x, y| {
        let i = y as usize * w + x as usize;
        if c == 1 {
            let g = byte(input[i]);
            Rgb([g, g, g])
        } else {
            Rgb([
                byte(input[i]),
                byte(input[plane + i]),
                byte(input[2 * plane + i]),
            ])
        }
    })
}

/// The input upscaled by `scale` (nearest neighbour, so its pixels stay crisp) with
/// the heat map `map01` (`h × w`, values in `[0, 1]`) upscaled smoothly to the same
/// size, colour-mapped and blended on top.
///
/// `alpha` (clamped to `[0, 1]`) is the heat map's opacity where the map is 1; where
/// it is `t` the opacity is `alpha·√t`, so cold regions show the input (the map's
/// extent still shows: √ lifts faint values) and hot ones the map's colour. Under
/// the map the input is dimmed and loses its colour, fully from `alpha` ≥ 0.5, so
/// its colours are not mistaken for the map's:
///
/// ```text
/// under = lerp(input, 0.8·grey(input), min(1, 2·alpha))
/// pixel = lerp(under, colormap(t), alpha·√t)
/// ```
///
/// So `alpha = 0` is the upscaled input itself, and with `alpha = 1` a pixel where
/// the map is 1 has exactly the map's colour.
///
/// `None` (a degenerate map) shows the input alone inside a dashed grey frame, so it
/// is not mistaken for an overlay whose map happens to be faint.
pub fn overlay(
    input: &[f32],
    c: usize,
    h: usize,
    w: usize,
    map01: Option<&[f32]>,
    scale: u32,
    alpha: f32,
) -> RgbImage {
    let base = upscale_nearest(&display_image(input, c, h, w), scale);
    let Some(map) = map01 else {
        let mut img = base;
        dashed_frame(&mut img);
        return img;
    };
    let a = if alpha.is_nan() {
        0.0
    } else {
        alpha.clamp(0.0, 1.0)
    };
    let desaturate = (2.0 * a).min(1.0);
    let (out_w, out_h) = base.dimensions();
    let big = upsample_bilinear(map, h, w, out_h as usize, out_w as usize);
    let mut img = base;
    for (px, &t) in img.pixels_mut().zip(&big) {
        let heat = colormap(t);
        let [r, g, b] = px.0;
        let grey = (0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b))
            * UNDERLAY_BRIGHTNESS;
        let o = a * t.clamp(0.0, 1.0).sqrt();
        for (ch, hc) in px.0.iter_mut().zip(heat) {
            let under = (1.0 - desaturate) * f32::from(*ch) + desaturate * grey;
            *ch = ((1.0 - o) * under + o * f32::from(hc))
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    img
}

/// The heat map alone (`h × w`, values in `[0, 1]`), upscaled smoothly by `scale`
/// like the overlay's and colour-mapped.
pub fn heat(map01: &[f32], h: usize, w: usize, scale: u32) -> RgbImage {
    let (out_w, out_h) = (dim(w) * scale, dim(h) * scale);
    let big = upsample_bilinear(map01, h, w, out_h as usize, out_w as usize);
    let mut img = RgbImage::new(out_w, out_h);
    for (px, &t) in img.pixels_mut().zip(&big) {
        *px = Rgb(colormap(t));
    }
    img
}

/// Tiles in rows of `cols`, left to right then top to bottom, with `pad` pixels of
/// [`BACKGROUND`] around and between them. Tiles are meant to be the same size;
/// a smaller one is centred in a cell the size of the largest. No tiles give a
/// small blank image (a PNG cannot be empty).
pub fn grid(tiles: &[RgbImage], cols: usize, pad: u32) -> RgbImage {
    if tiles.is_empty() {
        return RgbImage::from_pixel(pad.max(1), pad.max(1), BACKGROUND);
    }
    let cols = cols.clamp(1, tiles.len());
    let rows = tiles.len().div_ceil(cols);
    let cell_w = tiles.iter().map(RgbImage::width).max().unwrap_or(0);
    let cell_h = tiles.iter().map(RgbImage::height).max().unwrap_or(0);
    let width = cols as u32 * (cell_w + pad) + pad;
    let height = rows as u32 * (cell_h + pad) + pad;
    let mut out = RgbImage::from_pixel(width.max(1), height.max(1), BACKGROUND);
    for (k, tile) in tiles.iter().enumerate() {
        let (col, row) = ((k % cols) as u32, (k / cols) as u32);
        let x0 = pad + col * (cell_w + pad) + (cell_w - tile.width()) / 2;
        let y0 = pad + row * (cell_h + pad) + (cell_h - tile.height()) / 2;
        for (x, y, px) in tile.enumerate_pixels() {
            out.put_pixel(x0 + x, y0 + y, *px);
        }
    }
    out
}

/// A legend for the colormap: 0 on the left, 1 on the right (or, for a bar taller
/// than wide, 0 at the bottom and 1 at the top).
pub fn colorbar(width: u32, height: u32) -> RgbImage {
    let (width, height) = (width.max(1), height.max(1));
    RgbImage::from_fn(width, height, |x, y| {
        let t = if width >= height {
            x as f32 / (width - 1).max(1) as f32
        } else {
            1.0 - y as f32 / (height - 1).max(1) as f32
        };
        Rgb(colormap(t))
    })
}

/// Writes `img` as a PNG at `path`, whole or not at all (a temporary file in the
/// same folder, renamed over `path`).
pub fn save_png(path: &Path, img: &RgbImage) -> io::Result<()> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Writes the raw map as an `h × w` float32 `.npy` array (NumPy's format v1,
/// little-endian) at `path`, whole or not at all. A map whose length is not
/// `h × w` is an `InvalidInput` error and writes nothing.
pub fn save_map_npy(path: &Path, map: &[f32], h: usize, w: usize) -> io::Result<()> {
    use ndarray_npy::WriteNpyExt;
    let array = ndarray::Array2::from_shape_vec((h, w), map.to_vec()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a map of {} values is not {h}×{w}: {e}", map.len()),
        )
    })?;
    let mut bytes = Vec::new();
    array.write_npy(&mut bytes).map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Nearest-neighbour upscaling by an integer factor (at least 1).
fn upscale_nearest(img: &RgbImage, scale: u32) -> RgbImage {
    let s = scale.max(1);
    if s == 1 {
        return img.clone();
    }
    RgbImage::from_fn(img.width() * s, img.height() * s, |x, y| {
        *img.get_pixel(x / s, y / s)
    })
}

/// Marks an image as "no map": a dashed frame of alternating light and dark grey,
/// about 1/64 of the shorter side thick (at least 2 px), visible on any input.
fn dashed_frame(img: &mut RgbImage) {
    let (w, h) = img.dimensions();
    let t = (w.min(h) / 64).max(2).min(w.min(h) / 2);
    let dash = (4 * t).max(6);
    for y in 0..h {
        for x in 0..w {
            let edge = x < t || y < t || x >= w - t || y >= h - t;
            if edge {
                // Dashes run along the frame: position measured along its length.
                let along = if x < t || x >= w - t { y } else { x };
                let light = (along / dash) % 2 == 0;
                img.put_pixel(
                    x,
                    y,
                    if light {
                        Rgb([200, 200, 200])
                    } else {
                        Rgb([70, 70, 70])
                    },
                );
            }
        }
    }
}

/// An image dimension from a size the caller has already checked against a slice
/// (so it fits in memory); sizes beyond `u32` are a caller bug.
fn dim(n: usize) -> u32 {
    u32::try_from(n).expect("image dimension exceeds u32")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-6, "at {i}: {x} vs {y}\n{a:?}\n{b:?}");
        }
    }

    fn luminance([r, g, b]: [u8; 3]) -> f32 {
        0.2126 * f32::from(r) + 0.7152 * f32::from(g) + 0.0722 * f32::from(b)
    }

    /// A `h × w` Gaussian blob centred at (`cy`, `cx`), peak 1.
    fn blob(h: usize, w: usize, cy: f32, cx: f32, sigma: f32) -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                (-((y - cy).powi(2) + (x - cx).powi(2)) / (2.0 * sigma * sigma)).exp()
            })
            .collect()
    }

    /// A 3×h×w input with a normalised range (about -2..2): a red-to-blue gradient
    /// with a bright square.
    fn synthetic_input(h: usize, w: usize) -> Vec<f32> {
        let mut v = vec![0.0; 3 * h * w];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let square = (h / 4..h / 2).contains(&y) && (w / 2..3 * w / 4).contains(&x);
                let s = if square { 2.0 } else { 0.0 };
                v[i] = -2.0 + 3.0 * x as f32 / w as f32 + s;
                v[h * w + i] = -1.0 + s;
                v[2 * h * w + i] = 1.0 - 2.0 * y as f32 / h as f32 + s;
            }
        }
        v
    }

    #[test]
    fn bilinear_is_the_identity_at_the_same_size() {
        let m: Vec<f32> = (0..12).map(|i| (i * i) as f32 * 0.5 - 3.0).collect();
        assert_eq!(upsample_bilinear(&m, 3, 4, 3, 4), m);
    }

    #[test]
    fn bilinear_keeps_a_constant_constant() {
        let m = vec![0.37f32; 5 * 3];
        let up = upsample_bilinear(&m, 5, 3, 17, 11);
        assert_eq!(up.len(), 17 * 11);
        assert!(up.iter().all(|&v| (v - 0.37).abs() < 1e-6), "{up:?}");
    }

    #[test]
    fn bilinear_2x2_to_4x4_matches_half_pixel_centres() {
        // Along each axis, 2 → 4 samples the input at -0.25 (clamped to 0), 0.25,
        // 0.75, 1.25 (past the last centre: clamped to index 1), so the weights of
        // the second value are 0, 1/4, 3/4, 1. With m = x + 2y the result is
        // wx + 2·wy. (PyTorch: F.interpolate([[0,1],[2,3]], size=4,
        // mode="bilinear", align_corners=False) gives the same.)
        let m = [0.0, 1.0, 2.0, 3.0];
        #[rustfmt::skip]
        let want = [
            0.0, 0.25, 0.75, 1.0,
            0.5, 0.75, 1.25, 1.5,
            1.5, 1.75, 2.25, 2.5,
            2.0, 2.25, 2.75, 3.0,
        ];
        close(&upsample_bilinear(&m, 2, 2, 4, 4), &want);
    }

    #[test]
    fn bilinear_downsampling_and_non_square() {
        // 1×4 → 1×2: samples at 0.5 and 2.5, the means of neighbouring pairs.
        close(
            &upsample_bilinear(&[1.0, 3.0, 10.0, 20.0], 1, 4, 1, 2),
            &[2.0, 15.0],
        );
        // 1×2 → 3×3: rows are copies (one input row), columns sample at
        // -1/6 → 0, 1/2, 7/6 → 1.
        close(
            &upsample_bilinear(&[4.0, 8.0], 1, 2, 3, 3),
            &[4.0, 6.0, 8.0, 4.0, 6.0, 8.0, 4.0, 6.0, 8.0],
        );
        assert!(upsample_bilinear(&[1.0], 1, 1, 0, 5).is_empty());
    }

    #[test]
    fn normalize_maps_to_unit_range_and_rejects_degenerate_maps() {
        close(
            &normalize01(&[2.0, 4.0, 3.0, 6.0]).unwrap(),
            &[0.0, 0.5, 0.25, 1.0],
        );
        assert_eq!(normalize01(&[0.0; 9]), None);
        assert_eq!(normalize01(&[1.5; 4]), None);
        assert_eq!(normalize01(&[]), None);
        assert_eq!(normalize01(&[0.0, f32::NAN, 1.0]), None);
        assert_eq!(normalize01(&[0.0, f32::INFINITY, 1.0]), None);
        // A huge range whose width overflows f32: still finite and in [0, 1].
        let n = normalize01(&[-3e38, 0.0, 3e38]).unwrap();
        close(&n, &[0.0, 0.5, 1.0]);
    }

    #[test]
    fn colormap_is_inferno_dark_to_light_and_clamps() {
        let (lo, hi) = (colormap(0.0), colormap(1.0));
        assert_ne!(lo, hi);
        assert!(luminance(lo) < 10.0, "{lo:?}");
        assert!(luminance(hi) > 200.0, "{hi:?}");
        let mut prev = -1.0;
        for i in 0..=64 {
            let l = luminance(colormap(i as f32 / 64.0));
            assert!(
                l > prev,
                "luminance not increasing at {i}/64: {l} after {prev}"
            );
            prev = l;
        }
        assert_eq!(colormap(-3.0), lo);
        assert_eq!(colormap(7.0), hi);
        assert_eq!(colormap(f32::NAN), lo);
    }

    #[test]
    fn display_scale_reaches_128_pixels() {
        assert_eq!(display_scale(32, 32), 4);
        assert_eq!(display_scale(28, 28), 5);
        assert_eq!(display_scale(224, 224), 1);
        assert_eq!(display_scale(1000, 1000), 1);
        assert_eq!(display_scale(16, 64), 8);
        // Long and thin: the long side stays within 1024 px.
        assert_eq!(display_scale(4, 512), 2);
        assert_eq!(display_scale(0, 0), 128);
    }

    #[test]
    fn display_image_scales_min_max_and_replicates_grey() {
        let img = display_image(&[-1.0, 0.0, 1.0, 3.0], 1, 2, 2);
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [64, 64, 64]);
        assert_eq!(img.get_pixel(0, 1).0, [128, 128, 128]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 255, 255]);
        // RGB: one range for all channels, CHW order.
        let img = display_image(&[0.0, 2.0, 1.0, 1.0, 2.0, 0.0], 3, 1, 2);
        assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 128, 0]);
        // Constant: mid-grey, and a NaN does not spoil the rest.
        assert_eq!(
            display_image(&[5.0; 4], 1, 2, 2).get_pixel(1, 1).0,
            [128; 3]
        );
        let img = display_image(&[0.0, f32::NAN, 2.0, 1.0], 1, 2, 2);
        assert_eq!(img.get_pixel(1, 0).0, [0; 3]);
        assert_eq!(img.get_pixel(0, 1).0, [255; 3]);
    }

    #[test]
    fn overlay_with_zero_alpha_is_the_crisp_upscaled_input() {
        let (h, w) = (6, 5);
        let input = synthetic_input(h, w);
        let map = normalize01(&blob(h, w, 2.0, 2.0, 1.5)).unwrap();
        let img = overlay(&input, 3, h, w, Some(&map), 3, 0.0);
        let small = display_image(&input, 3, h, w);
        assert_eq!(img.dimensions(), (15, 18));
        for (x, y, px) in img.enumerate_pixels() {
            assert_eq!(px, small.get_pixel(x / 3, y / 3), "at ({x}, {y})");
        }
    }

    #[test]
    fn overlay_with_full_alpha_shows_the_map_where_hot_and_grey_input_where_cold() {
        let (h, w) = (4, 4);
        let input = synthetic_input(h, w);
        let ones = vec![1.0; h * w];
        assert_eq!(
            overlay(&input, 3, h, w, Some(&ones), 2, 1.0),
            heat(&ones, h, w, 2)
        );
        // A map of zeros at any alpha ≥ 0.5: the input, grey and dimmed to 0.8.
        let zeros = vec![0.0; h * w];
        let img = overlay(&input, 3, h, w, Some(&zeros), 2, 0.5);
        let small = display_image(&input, 3, h, w);
        for (x, y, px) in img.enumerate_pixels() {
            let [r, g, b] = small.get_pixel(x / 2, y / 2).0;
            let grey = (0.8 * (0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b)))
                .round() as u8;
            assert_eq!(px.0, [grey; 3], "at ({x}, {y})");
        }
    }

    #[test]
    fn overlay_is_brighter_where_the_map_is_hot() {
        // A flat grey input: the blended result follows the map's lightness.
        let (h, w) = (8, 8);
        let input = vec![0.5; h * w];
        let map = normalize01(&blob(h, w, 2.0, 5.0, 1.5)).unwrap();
        let img = overlay(&input, 1, h, w, Some(&map), 4, 0.6);
        let hot = luminance(img.get_pixel(5 * 4 + 2, 2 * 4 + 2).0);
        let cold = luminance(img.get_pixel(1, 31).0);
        assert!(hot > cold + 60.0, "hot {hot}, cold {cold}");
    }

    #[test]
    fn a_degenerate_overlay_is_the_input_in_a_dashed_frame() {
        let (h, w) = (32, 32);
        let input = synthetic_input(h, w);
        let img = overlay(&input, 3, h, w, None, 4, 0.5);
        let plain = upscale_nearest(&display_image(&input, 3, h, w), 4);
        assert_eq!(img.dimensions(), plain.dimensions());
        // The inside is untouched, the border is not the input.
        assert_eq!(img.get_pixel(64, 64), plain.get_pixel(64, 64));
        let border: Vec<_> = (0..128).map(|x| img.get_pixel(x, 0).0).collect();
        assert!(border.contains(&[200, 200, 200]) && border.contains(&[70, 70, 70]));
        assert_ne!(img, plain);
    }

    #[test]
    fn heat_is_the_colormap_of_the_smooth_map() {
        let img = heat(&[0.0, 1.0, 1.0, 0.0], 2, 2, 2);
        assert_eq!(img.dimensions(), (4, 4));
        assert_eq!(img.get_pixel(0, 0).0, colormap(0.0));
        assert_eq!(img.get_pixel(3, 0).0, colormap(1.0));
        assert_eq!(img.get_pixel(1, 0).0, colormap(0.25));
    }

    #[test]
    fn grid_places_tiles_in_rows_with_padding() {
        let tiles: Vec<_> = (0..5u8)
            .map(|k| RgbImage::from_pixel(10, 6, Rgb([k * 40, 0, 0])))
            .collect();
        let g = grid(&tiles, 3, 2);
        // 3 columns × 2 rows: 3·(10+2)+2 by 2·(6+2)+2.
        assert_eq!(g.dimensions(), (38, 18));
        assert_eq!(g.get_pixel(0, 0), &BACKGROUND);
        assert_eq!(g.get_pixel(2, 2).0, [0, 0, 0]); // tile 0
        assert_eq!(g.get_pixel(2 + 2 * 12 + 9, 2).0, [80, 0, 0]); // tile 2
        assert_eq!(g.get_pixel(2 + 12, 2 + 8 + 5).0, [160, 0, 0]); // tile 4
        assert_eq!(g.get_pixel(2 + 24, 2 + 8), &BACKGROUND); // empty sixth cell
        assert_eq!(g.get_pixel(12, 2), &BACKGROUND); // gap between tiles
                                                     // More columns than tiles: one row, no empty cells.
        assert_eq!(grid(&tiles[..2], 8, 0).dimensions(), (20, 6));
        assert_eq!(grid(&[], 4, 3).dimensions(), (3, 3));
    }

    #[test]
    fn colorbar_runs_from_0_to_1() {
        let bar = colorbar(100, 8);
        assert_eq!(bar.get_pixel(0, 4).0, colormap(0.0));
        assert_eq!(bar.get_pixel(99, 4).0, colormap(1.0));
        let tall = colorbar(8, 50);
        assert_eq!(tall.get_pixel(3, 0).0, colormap(1.0));
        assert_eq!(tall.get_pixel(3, 49).0, colormap(0.0));
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn png_round_trips_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let img = heat(&normalize01(&blob(7, 9, 3.0, 4.0, 2.0)).unwrap(), 7, 9, 3);
        save_png(&path, &img).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        // The rename fails (a non-empty folder is in the way): an error, nothing
        // else written.
        let blocked = dir.path().join("y.png");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"x").unwrap();
        assert!(save_png(&blocked, &img).is_err());
        assert_eq!(file_names(dir.path()), ["x.png", "y.png"]);
    }

    #[test]
    fn npy_round_trips_through_ndarray_npy() {
        use ndarray_npy::ReadNpyExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        let map: Vec<f32> = (0..6).map(|i| i as f32 * -0.5 + 0.25).collect();
        save_map_npy(&path, &map, 2, 3).unwrap();
        let back = ndarray::Array2::<f32>::read_npy(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(back.dim(), (2, 3));
        assert_eq!(back.iter().copied().collect::<Vec<_>>(), map);
        assert_eq!(back[[1, 0]], map[3]);
        // Wrong length: an InvalidInput error and no file.
        let err = save_map_npy(&dir.path().join("bad.npy"), &map, 4, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(file_names(dir.path()), ["m.npy"]);
    }

    /// Writes the pictures a person should look at to `CNNC_EXPLAIN_PREVIEW` (a
    /// folder) when set; otherwise checks only that they are made.
    #[test]
    fn preview_pictures() {
        let (h, w) = (32, 32);
        let scale = display_scale(h, w);
        let mut tiles = Vec::new();
        let mut heats = Vec::new();
        for (k, (cy, cx)) in [(10.0, 20.0), (22.0, 8.0), (16.0, 16.0)].iter().enumerate() {
            let input = synthetic_input(h, w);
            let map = normalize01(&blob(h, w, *cy, *cx, 4.0 + k as f32)).unwrap();
            tiles.push(display_image(&input, 3, h, w));
            tiles.push(overlay(&input, 3, h, w, Some(&map), scale, DEFAULT_ALPHA));
            heats.push(heat(&map, h, w, scale));
        }
        let grey: Vec<f32> = synthetic_input(h, w)[..h * w].to_vec();
        let degenerate = overlay(&grey, 1, h, w, None, scale, DEFAULT_ALPHA);
        let mut all: Vec<RgbImage> = tiles
            .iter()
            .skip(1)
            .step_by(2)
            .cloned()
            .chain(heats)
            .collect();
        all.push(degenerate);
        let g = grid(&all, 3, 4);
        assert_eq!(g.width(), 3 * (128 + 4) + 4);
        if let Some(dir) = std::env::var_os("CNNC_EXPLAIN_PREVIEW") {
            let dir = Path::new(&dir);
            save_png(&dir.join("overlay.png"), &tiles[1]).unwrap();
            save_png(&dir.join("grid.png"), &g).unwrap();
            save_png(&dir.join("colorbar.png"), &colorbar(256, 16)).unwrap();
        }
    }
}
