//! The synthetic localisation set `shapes(n, size, color, classes)`: each image
//! holds one object whose kind is its class, at a random position and size, on a
//! cluttered background, with a mask of the object's pixels (for checking that
//! explanations point at the object).
//!
//! Class `k` is shape kind `k` of [`KINDS`]. An object covers a random square
//! box of 20–45% of the image side (at least 7 pixels), placed anywhere inside
//! the image. The background is a random level with a gentle gradient, 3–6 soft
//! low-contrast blobs, 2–5 thin low-contrast lines and pixel noise, all drawn
//! independently of the class, so it tells nothing about the label. The object
//! stands out by intensity (at least 0.35 from the background level in grey,
//! at least 0.2 in luminance in colour, whether brighter or darker).
//!
//! The set is fixed: image `i` of the training set comes from its own random
//! stream (a fixed seed, the image size and colour mode, and `i`), the test set
//! (`n / 5` images) from a different stream, so every run sees the same images.

use rand_chacha::rand_core::Rng;
use rand_chacha::ChaCha8Rng;

use super::rng::{self, between, uniform, Purpose};
use super::{DataError, Dataset, Splits};

/// The kinds of shape, in class-id order.
pub const KINDS: [&str; 10] = [
    "circle", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "x", "L",
];

/// The seed of the built-in set (fixed: it is a data set, not a run setting).
const SEED: u64 = 0x5348_4150_4553; // "SHAPES"

/// Smallest image side the generator accepts.
pub const MIN_SIZE: usize = 8;

/// What to generate: `n` training images of `size × size`, RGB or grey, with
/// `classes` kinds of shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapesConfig {
    pub n: usize,
    pub size: usize,
    pub rgb: bool,
    pub classes: usize,
}

/// Generates the training set (`n` images) and the test set (`n / 5`, at least 1).
pub fn generate(cfg: &ShapesConfig) -> Result<Splits, DataError> {
    if cfg.classes == 0 || cfg.classes > KINDS.len() {
        return Err(DataError::Settings(format!(
            "shapes: classes must be between 1 and {}, not {}",
            KINDS.len(),
            cfg.classes
        )));
    }
    if cfg.size < MIN_SIZE {
        return Err(DataError::Settings(format!(
            "shapes: size must be at least {MIN_SIZE}, not {}",
            cfg.size
        )));
    }
    if cfg.n == 0 {
        return Err(DataError::Settings("shapes: n must be at least 1".into()));
    }
    let c = if cfg.rgb { 3 } else { 1 };
    let total = cfg
        .n
        .checked_mul(c * cfg.size * cfg.size)
        .filter(|&t| t < isize::MAX as usize / 8)
        .ok_or_else(|| DataError::TooLarge {
            what: format!("shapes(n={}, size={})", cfg.n, cfg.size),
        })?;
    debug_assert!(total > 0);
    Ok(Splits {
        train: make_set(cfg, cfg.n, Purpose::ShapesTrain),
        test: make_set(cfg, (cfg.n / 5).max(1), Purpose::ShapesTest),
    })
}

fn make_set(cfg: &ShapesConfig, n: usize, purpose: Purpose) -> Dataset {
    let s = cfg.size;
    let c = if cfg.rgb { 3 } else { 1 };
    let (img_len, mask_len) = (c * s * s, s * s);
    let mut images = vec![0.0f32; n * img_len];
    let mut masks = vec![0u8; n * mask_len];
    let labels: Vec<u32> = (0..n).map(|i| (i % cfg.classes) as u32).collect();
    let key = (s as u64) | (u64::from(cfg.rgb) << 32);
    // Each image has its own random stream, so the images can be drawn on all
    // cores and come out the same.
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1);
    let per_thread = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts = images
            .chunks_mut(per_thread * img_len)
            .zip(masks.chunks_mut(per_thread * mask_len));
        for (t, (imgs, ms)) in parts.enumerate() {
            let labels = &labels;
            scope.spawn(move || {
                let pairs = imgs
                    .chunks_exact_mut(img_len)
                    .zip(ms.chunks_exact_mut(mask_len));
                for (j, (img, mask)) in pairs.enumerate() {
                    let i = t * per_thread + j;
                    let mut r = rng::stream(SEED, purpose, key, i as u64);
                    draw(&mut r, labels[i] as usize, s, cfg.rgb, img, mask);
                }
            });
        }
    });
    Dataset {
        shape: [c, s, s],
        classes: cfg.classes,
        images,
        labels,
        masks: Some(masks),
        class_names: KINDS[..cfg.classes].iter().map(|k| k.to_string()).collect(),
    }
}

/// Whether the point `(dx, dy)` of an object's box (both in `[-1, 1]`, `y` down)
/// belongs to shape kind `kind`.
pub fn inside(kind: usize, dx: f32, dy: f32) -> bool {
    let (ax, ay) = (dx.abs(), dy.abs());
    let r2 = dx * dx + dy * dy;
    match kind {
        0 => r2 <= 1.0,                                          // filled disc
        1 => ax <= 0.8 && ay <= 0.8,                             // square
        2 => ax <= (dy + 1.0) * 0.5,                             // triangle, apex up
        3 => ax <= 0.3 || ay <= 0.3,                             // plus
        4 => (0.3..=1.0).contains(&r2),                          // ring
        5 => ay <= 0.3,                                          // horizontal bar
        6 => ax <= 0.3,                                          // vertical bar
        7 => ax + ay <= 1.0,                                     // diamond
        8 => (dx - dy).abs() <= 0.35 || (dx + dy).abs() <= 0.35, // X
        _ => dx <= -0.3 || dy >= 0.3,                            // L
    }
}

/// Draws one image (`C × s × s` planes) and its mask.
fn draw(r: &mut ChaCha8Rng, kind: usize, s: usize, rgb: bool, img: &mut [f32], mask: &mut [u8]) {
    let c = if rgb { 3 } else { 1 };
    let hw = s * s;
    let sf = s as f32;

    // Background level (grey) or colour: a mid level with a small tint.
    let level = uniform(r, 0.3, 0.7) as f32;
    let mut bg = [level; 3];
    if rgb {
        for b in &mut bg {
            *b += uniform(r, -0.1, 0.1) as f32;
        }
    }
    // A gentle gradient in a random direction.
    let angle = uniform(r, 0.0, std::f64::consts::TAU) as f32;
    let slope = uniform(r, -0.12, 0.12) as f32 / sf;
    let (gx, gy) = (angle.cos() * slope, angle.sin() * slope);
    for y in 0..s {
        for x in 0..s {
            let g = gx * (x as f32 - sf / 2.0) + gy * (y as f32 - sf / 2.0);
            for ch in 0..c {
                img[ch * hw + y * s + x] = bg[ch] + g;
            }
        }
    }

    // Soft low-contrast blobs.
    for _ in 0..between(r, 3, 6) {
        let cx = uniform(r, -0.1, 1.1) as f32 * sf;
        let cy = uniform(r, -0.1, 1.1) as f32 * sf;
        let rx = uniform(r, 0.08, 0.3) as f32 * sf;
        let ry = uniform(r, 0.08, 0.3) as f32 * sf;
        let delta = contrast(r, rgb, 0.15);
        let x0 = (cx - rx).floor().max(0.0) as usize;
        let x1 = ((cx + rx).ceil().max(0.0) as usize).min(s);
        let y0 = (cy - ry).floor().max(0.0) as usize;
        let y1 = ((cy + ry).ceil().max(0.0) as usize).min(s);
        for y in y0..y1 {
            for x in x0..x1 {
                let u = (x as f32 + 0.5 - cx) / rx;
                let v = (y as f32 + 0.5 - cy) / ry;
                let w = ((1.0 - (u * u + v * v).sqrt()) * 3.0).clamp(0.0, 1.0);
                for ch in 0..c {
                    img[ch * hw + y * s + x] += w * delta[ch];
                }
            }
        }
    }

    // Thin low-contrast lines.
    for _ in 0..between(r, 2, 5) {
        let (ax, ay) = (
            uniform(r, 0.0, 1.0) as f32 * sf,
            uniform(r, 0.0, 1.0) as f32 * sf,
        );
        let (bx, by) = (
            uniform(r, 0.0, 1.0) as f32 * sf,
            uniform(r, 0.0, 1.0) as f32 * sf,
        );
        let delta = contrast(r, rgb, 0.18);
        let steps = ((bx - ax).abs().max((by - ay).abs()) as usize).max(1);
        let mut last = usize::MAX;
        for k in 0..=steps {
            let t = k as f32 / steps as f32;
            let x = ((ax + (bx - ax) * t) as usize).min(s - 1);
            let y = ((ay + (by - ay) * t) as usize).min(s - 1);
            let p = y * s + x;
            if p != last {
                for ch in 0..c {
                    img[ch * hw + p] += delta[ch];
                }
                last = p;
            }
        }
    }

    // The object: a random box, a colour that stands out from the background.
    let lo = ((0.2 * sf).round() as usize).max(7).min(s);
    let hi = ((0.45 * sf).round() as usize).max(lo).min(s);
    let side = between(r, lo, hi);
    let ox = between(r, 0, s - side);
    let oy = between(r, 0, s - side);
    let colour = object_colour(r, rgb, bg);
    let half = side as f32 / 2.0;
    for y in oy..oy + side {
        for x in ox..ox + side {
            let dx = (x - ox) as f32 + 0.5 - half;
            let dy = (y - oy) as f32 + 0.5 - half;
            if inside(kind, dx / half, dy / half) {
                mask[y * s + x] = 1;
                for ch in 0..c {
                    img[ch * hw + y * s + x] = colour[ch];
                }
            }
        }
    }

    // Pixel noise everywhere, then clamp to [0, 1].
    for quad in img.chunks_mut(4) {
        let mut bits = r.next_u64();
        for v in quad {
            *v = (*v + 0.04 * rng::noise16(bits as u16)).clamp(0.0, 1.0);
            bits >>= 16;
        }
    }
}

/// A random signed offset of at most `max` (the same on every channel in grey).
fn contrast(r: &mut ChaCha8Rng, rgb: bool, max: f64) -> [f32; 3] {
    let d = uniform(r, -max, max) as f32;
    if rgb {
        [
            d,
            d + uniform(r, -0.05, 0.05) as f32,
            d + uniform(r, -0.05, 0.05) as f32,
        ]
    } else {
        [d; 3]
    }
}

fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// An object colour far enough from the background colour `bg` to be seen:
/// brighter or darker at random.
fn object_colour(r: &mut ChaCha8Rng, rgb: bool, bg: [f32; 3]) -> [f32; 3] {
    if !rgb {
        let g = bg[0];
        let (brighter, darker) = (g + 0.35 <= 0.95, g - 0.35 >= 0.05);
        let up = match (brighter, darker) {
            (true, true) => between(r, 0, 1) == 1,
            (up, _) => up,
        };
        let v = if up {
            uniform(r, f64::from(g) + 0.35, 1.0)
        } else {
            uniform(r, 0.0, f64::from(g) - 0.35)
        };
        return [v as f32; 3];
    }
    let lb = luminance(bg);
    for _ in 0..32 {
        let c = [
            uniform(r, 0.0, 1.0) as f32,
            uniform(r, 0.0, 1.0) as f32,
            uniform(r, 0.0, 1.0) as f32,
        ];
        let dist = c
            .iter()
            .zip(bg)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        if (luminance(c) - lb).abs() >= 0.2 && dist >= 0.5 {
            return c;
        }
    }
    // Practically never reached: the opposite corner of the colour cube.
    bg.map(|b| if b < 0.5 { 1.0 } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn cfg(n: usize, size: usize, rgb: bool, classes: usize) -> ShapesConfig {
        ShapesConfig {
            n,
            size,
            rgb,
            classes,
        }
    }

    #[test]
    fn sizes_labels_and_masks() {
        for (rgb, classes) in [(false, 3), (true, 10)] {
            let s = generate(&cfg(200, 32, rgb, classes)).unwrap();
            let c = if rgb { 3 } else { 1 };
            assert_eq!((s.train.len(), s.test.len()), (200, 40));
            for d in [&s.train, &s.test] {
                assert_eq!(d.shape, [c, 32, 32]);
                assert_eq!(d.images.len(), d.len() * c * 32 * 32);
                assert_eq!(d.class_names.len(), classes);
                assert!(d.images.iter().all(|v| (0.0..=1.0).contains(v)));
                let counts = d.class_counts();
                let (lo, hi) = (counts.iter().min(), counts.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{counts:?}");
                for i in 0..d.len() {
                    let m = d.mask(i).unwrap();
                    assert_eq!(m.len(), 32 * 32);
                    assert!(m.iter().all(|&v| v <= 1));
                    let area = m.iter().filter(|&&v| v == 1).count();
                    // At least a few pixels, at most the largest box (45% of the side).
                    assert!((8..=15 * 15).contains(&area), "image {i}: area {area}");
                }
            }
        }
    }

    #[test]
    fn objects_stand_out_from_the_background() {
        let s = generate(&cfg(100, 32, false, 10)).unwrap();
        let d = &s.train;
        for i in 0..d.len() {
            let (img, m) = (d.image(i), d.mask(i).unwrap());
            let mean = |on: u8| {
                let v: Vec<f32> = img
                    .iter()
                    .zip(m)
                    .filter(|(_, &k)| k == on)
                    .map(|(v, _)| *v)
                    .collect();
                v.iter().sum::<f32>() / v.len() as f32
            };
            assert!((mean(1) - mean(0)).abs() > 0.15, "image {i}");
        }
    }

    #[test]
    fn deterministic_and_train_differs_from_test() {
        let a = generate(&cfg(50, 24, true, 4)).unwrap();
        let b = generate(&cfg(50, 24, true, 4)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.train.image(0), a.test.image(0));
        // A bigger set starts with the same images.
        let c = generate(&cfg(80, 24, true, 4)).unwrap();
        assert_eq!(a.train.image(7), c.train.image(7));
    }

    #[test]
    fn every_kind_is_a_distinct_shape() {
        let grid = |k: usize| -> Vec<bool> {
            (0..400)
                .map(|p| {
                    let (x, y) = ((p % 20) as f32 / 9.5 - 1.0, (p / 20) as f32 / 9.5 - 1.0);
                    inside(k, x, y)
                })
                .collect()
        };
        let grids: Vec<_> = (0..KINDS.len()).map(grid).collect();
        for (i, g) in grids.iter().enumerate() {
            let area = g.iter().filter(|&&b| b).count();
            assert!((60..=340).contains(&area), "{}: {area}", KINDS[i]);
            for (j, h) in grids.iter().enumerate().skip(i + 1) {
                let differ = g.iter().zip(h).filter(|(a, b)| a != b).count();
                assert!(differ >= 40, "{} vs {}: {differ}", KINDS[i], KINDS[j]);
            }
        }
    }

    #[test]
    fn small_images_and_bad_settings() {
        let s = generate(&cfg(10, 16, false, 10)).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (10, 2));
        assert!(generate(&cfg(10, 16, false, 11)).is_err());
        assert!(generate(&cfg(10, 4, false, 2)).is_err());
        assert!(generate(&cfg(0, 16, false, 2)).is_err());
    }

    #[test]
    fn four_thousand_at_32_is_fast() {
        let t = Instant::now();
        let s = generate(&cfg(4000, 32, true, 10)).unwrap();
        let rgb = t.elapsed();
        let t = Instant::now();
        generate(&cfg(4000, 32, false, 10)).unwrap();
        eprintln!("shapes(4000, 32): rgb {rgb:?}, grey {:?}", t.elapsed());
        assert_eq!(s.train.len(), 4000);
    }

    /// Writes sample images and masks as PNG files for a person to look at:
    /// `CNNC_SHAPES_PNG=/tmp/shapes cargo test -p cnnc-runtime shapes_png`.
    #[test]
    fn shapes_png() {
        let Some(dir) = std::env::var_os("CNNC_SHAPES_PNG") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for rgb in [false, true] {
            let size = 32;
            let s = generate(&cfg(20, size, rgb, 10)).unwrap();
            let d = &s.train;
            // Four rows of five: each image, then its mask outline drawn in red.
            let (cols, rows) = (5u32, 4u32);
            let (cw, ch) = (size as u32 * 2 + 4, size as u32 + 4);
            let mut out = image::RgbImage::new(cols * cw, rows * ch);
            for i in 0..20 {
                let (gx, gy) = ((i as u32 % cols) * cw, (i as u32 / cols) * ch);
                let (img, m) = (d.image(i), d.mask(i).unwrap());
                let hw = size * size;
                for p in 0..hw {
                    let (x, y) = ((p % size) as u32, (p / size) as u32);
                    let px = |ch: usize| (img[if rgb { ch * hw + p } else { p }] * 255.0) as u8;
                    let rgbv = [px(0), px(1), px(2)];
                    out.put_pixel(gx + x, gy + y, image::Rgb(rgbv));
                    let edge = m[p] == 1
                        && [(0i64, 1i64), (0, -1), (1, 0), (-1, 0)]
                            .iter()
                            .any(|(ddx, ddy)| {
                                let (nx, ny) = (x as i64 + ddx, y as i64 + ddy);
                                nx < 0
                                    || ny < 0
                                    || nx >= size as i64
                                    || ny >= size as i64
                                    || m[ny as usize * size + nx as usize] == 0
                            });
                    let ov = if edge { [255, 0, 0] } else { rgbv };
                    out.put_pixel(gx + size as u32 + 2 + x, gy + y, image::Rgb(ov));
                }
            }
            let (w, h) = out.dimensions();
            let out =
                image::imageops::resize(&out, w * 4, h * 4, image::imageops::FilterType::Nearest);
            let name = if rgb {
                "shapes_rgb.png"
            } else {
                "shapes_grey.png"
            };
            out.save(dir.join(name)).unwrap();
        }
    }
}
