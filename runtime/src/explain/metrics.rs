//! Evaluation metrics for explanation maps: the pointing game and its centre
//! baseline, RISE deletion and insertion curves with their AUC, Spearman rank
//! correlation for the model-randomisation check, and small aggregates.
//!
//! Conventions shared by every function here:
//!
//! - a **map** is `h × w` values, row-major; larger means more important;
//! - a **mask** is `h × w` bytes, row-major; nonzero marks an object pixel;
//! - an **image** is `c × h × w` values (CHW), its shape given as `[c, h, w]`
//!   like [`crate::data::Dataset::shape`];
//! - a pixel is the point at its centre: pixel `(y, x)` sits at `(y, x)`, so
//!   distances between pixels are distances between integer points.
//!
//! Nothing here panics on bad input: a question without an answer (an empty
//! mask, a constant map) is `None`, a malformed call (wrong lengths, an order
//! that is not a permutation) is an `Err` naming the problem.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------
// Pointing game
// ---------------------------------------------------------------------------

/// The pointing-game tolerance for an `h × w` image: `15/224 × max(h, w)`
/// pixels.
///
/// Zhang et al. ("Top-down neural attention by excitation backprop", ECCV
/// 2016; IJCV 2018) count a hit when the map's maximum lies within 15 pixels of
/// the object on ImageNet-sized (224-pixel) inputs. We keep that tolerance as a
/// fraction of the image side, so it means the same on the small images cnnc
/// trains (2.14 px on 32 × 32, 1.875 px on 28 × 28); the longer side is used
/// so the tolerance of a non-square image is not smaller than its square crop's.
pub fn pointing_tolerance(h: usize, w: usize) -> f64 {
    15.0 / 224.0 * h.max(w) as f64
}

/// Whether `map` is degenerate for ranking: empty, holding a non-finite value,
/// or constant (every value equal, e.g. a Grad-CAM that the ReLU zeroed). A
/// degenerate map has no maximum to point with and no order to delete by;
/// [`pointing_hit`] answers `None` for it, and callers of [`order_by_map`]
/// should skip it the same way.
pub fn is_degenerate(map: &[f32]) -> bool {
    let Some(&first) = map.first() else {
        return true;
    };
    map.iter().any(|v| !v.is_finite()) || map.iter().all(|&v| v == first)
}

/// The location `(y, x)` of the map's maximum, the first in raster order when
/// several pixels share it; `None` when the map is degenerate
/// ([`is_degenerate`]) or is not `h × w`.
pub fn map_peak(map: &[f32], h: usize, w: usize) -> Option<(usize, usize)> {
    if w == 0 || h.checked_mul(w) != Some(map.len()) || is_degenerate(map) {
        return None;
    }
    let mut best = 0;
    for (i, &v) in map.iter().enumerate() {
        // Strictly greater: an equal value later in raster order never wins.
        if v > map[best] {
            best = i;
        }
    }
    Some((best / w, best % w))
}

/// The pointing game (Zhang et al., "Top-down neural attention by excitation
/// backprop", ECCV 2016 / IJCV 2018): the map's maximum is a **hit** when it
/// lies within `tolerance_px` (Euclidean distance between pixel centres,
/// inclusive) of some mask pixel; a maximum inside the mask is at distance 0.
///
/// Ties for the maximum are decided by the first such pixel in raster order
/// (row by row, left to right). The answer is `None` (degenerate) when the map
/// is constant or holds a non-finite value, when the mask is empty, when the
/// lengths are not `h × w`, or when the tolerance is negative or not finite.
/// At the aggregate level a `None` counts as a miss (see [`Rate`]): a method
/// that produces a flat map has failed to point.
pub fn pointing_hit(
    map: &[f32],
    mask: &[u8],
    h: usize,
    w: usize,
    tolerance_px: f64,
) -> Option<bool> {
    let (y, x) = map_peak(map, h, w)?;
    hit_at(mask, h, w, y as f64, x as f64, tolerance_px)
}

/// The centre baseline of the pointing game: the same test as
/// [`pointing_hit`] for the image's centre point `((h - 1) / 2, (w - 1) / 2)`
/// (a half-integer point when a side is even), i.e. the score of a "method"
/// that always points at the middle. A method should beat it by a clear
/// margin. `None` when the mask is empty, its length is not `h × w`, or the
/// tolerance is negative or not finite.
pub fn centre_hit(mask: &[u8], h: usize, w: usize, tolerance_px: f64) -> Option<bool> {
    if h == 0 || w == 0 {
        return None;
    }
    let y = (h - 1) as f64 / 2.0;
    let x = (w - 1) as f64 / 2.0;
    hit_at(mask, h, w, y, x, tolerance_px)
}

/// Whether some mask pixel lies within `tol` of the point `(py, px)`.
fn hit_at(mask: &[u8], h: usize, w: usize, py: f64, px: f64, tol: f64) -> Option<bool> {
    if !(tol.is_finite() && tol >= 0.0) || h.checked_mul(w) != Some(mask.len()) {
        return None;
    }
    if mask.iter().all(|&m| m == 0) {
        return None;
    }
    let tol2 = tol * tol;
    let hit = mask.iter().enumerate().any(|(i, &m)| {
        let dy = (i / w) as f64 - py;
        let dx = (i % w) as f64 - px;
        m != 0 && dy * dy + dx * dx <= tol2
    });
    Some(hit)
}

// ---------------------------------------------------------------------------
// Deletion and insertion (RISE)
// ---------------------------------------------------------------------------

/// The pixels of a map from most to least important: indices into the map
/// sorted by descending value, ties by ascending index, so the order is the
/// same on every run. Callers reject degenerate maps first ([`is_degenerate`]);
/// a NaN would still sort deterministically (positive NaN first), never panic.
pub fn order_by_map(map: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..map.len()).collect();
    // `+ 0.0` turns -0.0 into 0.0, so the two zeros tie as they compare equal.
    order.sort_by(|&a, &b| (map[b] + 0.0).total_cmp(&(map[a] + 0.0)).then(a.cmp(&b)));
    order
}

/// A random order of `hw` pixels, the chance baseline for deletion and
/// insertion: a Fisher–Yates shuffle (from the last element down) drawing from
/// a ChaCha8 stream keyed by `seed` and this purpose, with unbiased bounded
/// draws (Lemire's method). The same seed gives the same order on every
/// platform and version; different seeds give different orders.
pub fn random_order(hw: usize, seed: u64) -> Vec<usize> {
    /// Key bytes 8..16: what the stream is for, so it never coincides with a
    /// data-pipeline stream of the same seed (those use small purpose numbers).
    const PURPOSE: u64 = u64::from_le_bytes(*b"xplorder");
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&PURPOSE.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<usize> = (0..hw).collect();
    for i in (1..hw).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform integer in `0..n` (`n > 0`) without bias (Lemire's method).
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The Gaussian blur σ (in pixels) for the insertion canvas of an `h × w`
/// image: `max(h, w) / 8` (4 px on 32 × 32, 3.5 px on 28 × 28).
///
/// RISE (Petsiuk et al., BMVC 2018) starts insertion from a blurred copy of
/// the image so that the canvas keeps the image's colours and low frequencies
/// (staying near the data distribution, unlike a black canvas) while carrying
/// little class evidence. Its code blurs 224-pixel images with a σ = 5 kernel
/// cut to 11 × 11. cnnc's images are small and their objects are 20–45% of the
/// side, so a blur of the same size relative to the image would leave the
/// shapes recognisable; σ = side / 8 smears an object to a soft blob of about
/// its own size while keeping the background's levels.
pub fn insertion_sigma(h: usize, w: usize) -> f64 {
    h.max(w) as f64 / 8.0
}

/// A separable Gaussian blur of each channel of a `[c, h, w]` image with
/// standard deviation `sigma` pixels: the kernel is cut at `⌈3σ⌉` pixels each
/// side and normalised to sum 1, and pixels beyond the border repeat the edge
/// pixel (clamp), so a constant image stays constant. A `sigma` of 0 (or
/// below, or not finite) returns the image unchanged. `Err` when the image is
/// not `c × h × w` values.
pub fn blur(image: &[f32], shape: [usize; 3], sigma: f64) -> Result<Vec<f32>, String> {
    let [c, h, w] = shape;
    check_image("image", image, shape)?;
    if !(sigma.is_finite() && sigma > 0.0) || h == 0 || w == 0 || c == 0 {
        return Ok(image.to_vec());
    }
    // Past max(h, w) the clamped taps all read edge pixels; a longer kernel
    // changes nothing but the cost.
    let radius = ((3.0 * sigma).ceil() as usize).clamp(1, h.max(w));
    let kernel: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let d = i as f64 - radius as f64;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = kernel.iter().sum();
    let kernel: Vec<f64> = kernel.iter().map(|k| k / total).collect();
    let tap = |i: usize, k: usize, n: usize| (i + k).saturating_sub(radius).min(n - 1);

    let mut out = vec![0.0f32; image.len()];
    let mut rows = vec![0.0f32; h * w];
    for (plane, out_plane) in image.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        // Along each row.
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for x in 0..w {
                let s: f64 = kernel
                    .iter()
                    .enumerate()
                    .map(|(k, &g)| g * f64::from(row[tap(x, k, w)]))
                    .sum();
                rows[y * w + x] = s as f32;
            }
        }
        // Then along each column.
        for y in 0..h {
            for x in 0..w {
                let s: f64 = kernel
                    .iter()
                    .enumerate()
                    .map(|(k, &g)| g * f64::from(rows[tap(y, k, h) * w + x]))
                    .sum();
                out_plane[y * w + x] = s as f32;
            }
        }
    }
    Ok(out)
}

/// How finely to sample a deletion or insertion curve and how many images to
/// score at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurveSettings {
    /// Number of steps: the curve has `steps + 1` points, at the fractions
    /// `0, 1/steps, …, 1` of the pixels changed.
    pub steps: usize,
    /// The most images passed to the score callback in one call (bounds the
    /// memory to `max_batch × c × h × w` values).
    pub max_batch: usize,
}

impl Default for CurveSettings {
    /// 32 steps, 64 images a batch.
    fn default() -> Self {
        CurveSettings {
            steps: 32,
            max_batch: 64,
        }
    }
}

/// One curve to trace: start from the image `start` and, step by step, give
/// its pixels in `order` the values of `end` (all channels of a pixel
/// together; `end` of `None` is all zeros).
///
/// Deletion and insertion are both such morphs; build them with
/// [`Morph::deletion`] and [`Morph::insertion`] and trace many at once with
/// [`curves`].
#[derive(Clone, Copy, Debug)]
pub struct Morph<'a> {
    /// The image at fraction 0 (`c × h × w`).
    pub start: &'a [f32],
    /// The image at fraction 1 (`c × h × w`), or `None` for zeros.
    pub end: Option<&'a [f32]>,
    /// The pixels (`0..h·w`) in the order they change: a permutation.
    pub order: &'a [usize],
}

impl<'a> Morph<'a> {
    /// Deletion (RISE): pixels of `image`, most important first, are replaced
    /// by the `baseline` image's values (`None`: zeros, RISE's choice). A good
    /// order makes the score fall fast: lower AUC is better.
    pub fn deletion(image: &'a [f32], order: &'a [usize], baseline: Option<&'a [f32]>) -> Self {
        Morph {
            start: image,
            end: baseline,
            order,
        }
    }

    /// Insertion (RISE): starting from `canvas` (RISE's: a blurred copy of the
    /// image, see [`blur`] and [`insertion_sigma`]), pixels of `image`, most
    /// important first, are copied in. A good order makes the score rise fast:
    /// higher AUC is better.
    pub fn insertion(image: &'a [f32], order: &'a [usize], canvas: &'a [f32]) -> Self {
        Morph {
            start: canvas,
            end: Some(image),
            order,
        }
    }
}

/// The score callback of the batch API [`curves`]: given `n` images (`n × c ×
/// h × w` values, NCHW) and, for each, the index of the [`Morph`] it belongs
/// to (so the callback knows which class to score), returns the `n` scores
/// (the class probability).
pub type BatchScore<'a> = dyn FnMut(&[f32], &[usize]) -> Result<Vec<f32>, String> + 'a;

/// The score callback of the one-image API: given `n` images (`n × c × h × w`
/// values) and `n`, returns the `n` scores.
pub type Score<'a> = dyn FnMut(&[f32], usize) -> Result<Vec<f32>, String> + 'a;

/// The deletion curve of one image (Petsiuk et al., "RISE: Randomized Input
/// Sampling for Explanation of Black-box Models", BMVC 2018): point `k` of
/// `steps + 1` is the score of the image whose first `⌊k · h·w / steps⌋`
/// pixels in `order` (all channels together) are replaced by `baseline`'s
/// (`None`: zeros). The callback is called with at most
/// `settings.max_batch` images at a time. Summarise with [`auc`]; lower is
/// better.
pub fn deletion_curve(
    image: &[f32],
    order: &[usize],
    baseline: Option<&[f32]>,
    shape: [usize; 3],
    settings: CurveSettings,
    score: &mut Score<'_>,
) -> Result<Vec<f32>, String> {
    let morph = Morph::deletion(image, order, baseline);
    one_curve(morph, shape, settings, score)
}

/// The insertion curve of one image (Petsiuk et al., RISE, BMVC 2018): point
/// `k` of `steps + 1` is the score of `canvas` with the first
/// `⌊k · h·w / steps⌋` pixels in `order` (all channels together) copied from
/// `image`. The callback is called with at most `settings.max_batch` images
/// at a time. Summarise with [`auc`]; higher is better.
pub fn insertion_curve(
    image: &[f32],
    order: &[usize],
    canvas: &[f32],
    shape: [usize; 3],
    settings: CurveSettings,
    score: &mut Score<'_>,
) -> Result<Vec<f32>, String> {
    let morph = Morph::insertion(image, order, canvas);
    one_curve(morph, shape, settings, score)
}

fn one_curve(
    morph: Morph<'_>,
    shape: [usize; 3],
    settings: CurveSettings,
    score: &mut Score<'_>,
) -> Result<Vec<f32>, String> {
    let mut batch = |images: &[f32], owners: &[usize]| score(images, owners.len());
    let mut all = curves(&[morph], shape, settings, &mut batch)?;
    all.pop().ok_or_else(|| "no curve was traced".to_string())
}

/// The curves of many morphs at once (deletion and insertion may be mixed),
/// one `Vec` of `steps + 1` scores per morph in the order given. The images
/// of all morphs are scored together, in calls of at most
/// `settings.max_batch` images (the last call may be smaller), ordered morph
/// by morph and step by step; the callback also receives, for each image,
/// the index of its morph.
///
/// `Err` when `steps` or `max_batch` is 0, an image is not `c × h × w`
/// values, an order is not a permutation of `0..h·w`, or the callback fails,
/// returns the wrong number of scores or a non-finite score.
pub fn curves(
    morphs: &[Morph<'_>],
    shape: [usize; 3],
    settings: CurveSettings,
    score: &mut BatchScore<'_>,
) -> Result<Vec<Vec<f32>>, String> {
    let CurveSettings { steps, max_batch } = settings;
    if steps == 0 {
        return Err("a curve needs at least one step".into());
    }
    if max_batch == 0 {
        return Err("the batch size must be at least 1".into());
    }
    let [c, h, w] = shape;
    let hw = h
        .checked_mul(w)
        .ok_or_else(|| format!("the image shape {shape:?} is too large"))?;
    for (i, m) in morphs.iter().enumerate() {
        check_image(&format!("morph {i}: start image"), m.start, shape)?;
        if let Some(end) = m.end {
            check_image(&format!("morph {i}: end image"), end, shape)?;
        }
        check_order(&format!("morph {i}"), m.order, hw)?;
    }
    let per = steps + 1;
    let total = morphs
        .len()
        .checked_mul(per)
        .ok_or_else(|| "too many curve points".to_string())?;
    let chw = c * hw;

    let mut out: Vec<Vec<f32>> = morphs.iter().map(|_| Vec::with_capacity(per)).collect();
    let mut images: Vec<f32> = Vec::new();
    let mut owners: Vec<usize> = Vec::with_capacity(max_batch.min(total));
    for point in 0..total {
        let (m, k) = (point / per, point % per);
        let morph = &morphs[m];
        // k ≤ steps, so the count is at most h·w; u128 keeps k·h·w exact.
        let changed = (k as u128 * hw as u128 / steps as u128) as usize;
        let base = images.len();
        images.extend_from_slice(morph.start);
        let img = &mut images[base..base + chw];
        for &p in &morph.order[..changed] {
            for ch in 0..c {
                let i = ch * hw + p;
                img[i] = morph.end.map_or(0.0, |e| e[i]);
            }
        }
        owners.push(m);
        if owners.len() == max_batch || point + 1 == total {
            let scores = score(&images, &owners)?;
            if scores.len() != owners.len() {
                return Err(format!(
                    "the score callback returned {} scores for {} images",
                    scores.len(),
                    owners.len()
                ));
            }
            for (&o, s) in owners.iter().zip(scores) {
                if !s.is_finite() {
                    return Err(format!("the score callback returned {s} for morph {o}"));
                }
                out[o].push(s);
            }
            images.clear();
            owners.clear();
        }
    }
    Ok(out)
}

fn check_image(what: &str, image: &[f32], shape: [usize; 3]) -> Result<(), String> {
    let [c, h, w] = shape;
    let n = c.checked_mul(h).and_then(|n| n.checked_mul(w));
    if n != Some(image.len()) {
        return Err(format!(
            "{what} has {} values, but a {c} × {h} × {w} image has {}",
            image.len(),
            n.map_or_else(|| "too many".to_string(), |n| n.to_string())
        ));
    }
    Ok(())
}

fn check_order(what: &str, order: &[usize], hw: usize) -> Result<(), String> {
    if order.len() != hw {
        return Err(format!(
            "{what}: the pixel order has {} entries for {hw} pixels",
            order.len()
        ));
    }
    let mut seen = vec![false; hw];
    for &p in order {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            Some(_) => return Err(format!("{what}: pixel {p} appears twice in the order")),
            None => return Err(format!("{what}: pixel {p} is outside 0..{hw}")),
        }
    }
    Ok(())
}

/// The area under a curve sampled at equally spaced fractions `0, 1/n, …, 1`
/// (`n + 1` points), by the trapezoid rule: the mean of the points with the
/// two ends weighted one half. A single point is a constant curve (its value);
/// an empty curve has no area (NaN; the curve functions never return one).
pub fn auc(curve: &[f32]) -> f64 {
    match curve {
        [] => f64::NAN,
        [only] => f64::from(*only),
        [first, .., last] => {
            let sum: f64 = curve.iter().map(|&v| f64::from(v)).sum();
            let inner = sum - 0.5 * (f64::from(*first) + f64::from(*last));
            inner / (curve.len() - 1) as f64
        }
    }
}

// ---------------------------------------------------------------------------
// Rank correlation
// ---------------------------------------------------------------------------

/// Spearman's rank correlation of `a` and `b`: the Pearson correlation of their
/// ranks, tied values sharing the average of their ranks. Used for the
/// model-randomisation sanity check (Adebayo et al., "Sanity Checks for
/// Saliency Maps", NeurIPS 2018): a map that barely changes when the model's
/// weights are randomised (correlation near 1) does not explain the model.
///
/// `None` when the lengths differ or are 0, a value is not finite, or either
/// side is constant (its ranks have no variance).
pub fn spearman(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let ra = ranks(a)?;
    let rb = ranks(b)?;
    pearson(&ra, &rb)
}

/// 1-based ranks with average ranks for ties; `None` on a non-finite value.
fn ranks(v: &[f32]) -> Option<Vec<f64>> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    // All finite; `+ 0.0` makes -0.0 and 0.0 one value.
    idx.sort_by(|&i, &j| (v[i] + 0.0).total_cmp(&(v[j] + 0.0)));
    let mut r = vec![0.0; v.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && v[idx[end]] == v[idx[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &idx[start..end] {
            r[i] = rank;
        }
        start = end;
    }
    Some(r)
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa == 0.0 || sbb == 0.0 {
        return None;
    }
    Some((sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0))
}

// ---------------------------------------------------------------------------
// Aggregates
// ---------------------------------------------------------------------------

/// A hit rate over samples, for the pointing game and its centre baseline.
/// A degenerate sample (`None`) counts as a miss and is also counted apart,
/// so a report can say how many maps were flat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    /// Samples that hit.
    pub hits: usize,
    /// All samples, degenerate ones included.
    pub total: usize,
    /// Samples whose answer was `None` (counted as misses).
    pub degenerate: usize,
}

impl Rate {
    /// Adds one sample's answer.
    pub fn add(&mut self, answer: Option<bool>) {
        self.total += 1;
        match answer {
            Some(true) => self.hits += 1,
            Some(false) => {}
            None => self.degenerate += 1,
        }
    }

    /// `hits / total`; `None` before any sample.
    pub fn fraction(&self) -> Option<f64> {
        (self.total > 0).then(|| self.hits as f64 / self.total as f64)
    }
}

impl FromIterator<Option<bool>> for Rate {
    fn from_iter<I: IntoIterator<Item = Option<bool>>>(iter: I) -> Self {
        let mut r = Rate::default();
        iter.into_iter().for_each(|a| r.add(a));
        r
    }
}

/// The mean and spread of a per-sample value (an AUC, a correlation), skipping
/// samples without a value (`None`, or not finite) and counting them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Mean {
    /// Samples with a value.
    pub count: usize,
    /// Samples skipped (no value).
    pub skipped: usize,
    mean: f64,
    /// Sum of squared deviations from the running mean (Welford).
    m2: f64,
}

impl Mean {
    /// Adds one sample's value; `None` and non-finite values are skipped.
    pub fn add(&mut self, value: Option<f64>) {
        match value {
            Some(v) if v.is_finite() => {
                self.count += 1;
                let d = v - self.mean;
                self.mean += d / self.count as f64;
                self.m2 += d * (v - self.mean);
            }
            _ => self.skipped += 1,
        }
    }

    /// The mean of the values; `None` when there are none.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// The sample standard deviation (divisor `count - 1`); `None` below two
    /// values.
    pub fn std_dev(&self) -> Option<f64> {
        (self.count > 1).then(|| (self.m2 / (self.count - 1) as f64).sqrt())
    }

    /// The standard error of the mean (`std_dev / √count`); `None` below two
    /// values.
    pub fn std_error(&self) -> Option<f64> {
        self.std_dev().map(|s| s / (self.count as f64).sqrt())
    }
}

impl FromIterator<Option<f64>> for Mean {
    fn from_iter<I: IntoIterator<Item = Option<f64>>>(iter: I) -> Self {
        let mut m = Mean::default();
        iter.into_iter().for_each(|v| m.add(v));
        m
    }
}

/// The mean of the values that are present and finite; `None` when none are.
pub fn mean_of(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    values.into_iter().collect::<Mean>().mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// An `h × w` map that is 0 everywhere but `peak` at `(y, x)`.
    fn peaked(h: usize, w: usize, y: usize, x: usize) -> Vec<f32> {
        let mut m = vec![0.0; h * w];
        m[y * w + x] = 1.0;
        m
    }

    /// An `h × w` mask of the rectangle rows `y0..y1`, columns `x0..x1`.
    fn rect(h: usize, w: usize, y0: usize, y1: usize, x0: usize, x1: usize) -> Vec<u8> {
        let mut m = vec![0; h * w];
        for y in y0..y1 {
            for x in x0..x1 {
                m[y * w + x] = 1;
            }
        }
        m
    }

    // --- pointing game -----------------------------------------------------

    #[test]
    fn tolerance_is_15_of_224_of_the_longer_side() {
        assert!(close(pointing_tolerance(224, 224), 15.0));
        assert!(close(pointing_tolerance(32, 32), 15.0 * 32.0 / 224.0));
        assert!(close(
            pointing_tolerance(16, 32),
            pointing_tolerance(32, 32)
        ));
    }

    #[test]
    fn pointing_inside_and_far_outside() {
        let mask = rect(32, 32, 4, 10, 4, 10);
        let tol = pointing_tolerance(32, 32);
        assert_eq!(
            pointing_hit(&peaked(32, 32, 6, 7), &mask, 32, 32, tol),
            Some(true)
        );
        assert_eq!(
            pointing_hit(&peaked(32, 32, 25, 25), &mask, 32, 32, tol),
            Some(false)
        );
        // Tolerance 0: only the mask itself counts.
        assert_eq!(
            pointing_hit(&peaked(32, 32, 9, 9), &mask, 32, 32, 0.0),
            Some(true)
        );
        assert_eq!(
            pointing_hit(&peaked(32, 32, 10, 9), &mask, 32, 32, 0.0),
            Some(false)
        );
    }

    #[test]
    fn pointing_at_the_tolerance_boundary() {
        // 32 × 32: tolerance 15/224 · 32 ≈ 2.143 px. The mask's nearest pixel
        // to the peaks below is (9, 9).
        let mask = rect(32, 32, 4, 10, 4, 10);
        let tol = pointing_tolerance(32, 32);
        let hit = |y, x| pointing_hit(&peaked(32, 32, y, x), &mask, 32, 32, tol);
        assert_eq!(hit(11, 9), Some(true)); // distance 2: just inside
        assert_eq!(hit(11, 10), Some(false)); // distance √5 ≈ 2.236: just outside
        assert_eq!(hit(10, 11), Some(false)); // √5 the other way
        assert_eq!(hit(10, 10), Some(true)); // distance √2
        assert_eq!(hit(12, 9), Some(false)); // distance 3
    }

    #[test]
    fn pointing_degenerate_maps_and_masks() {
        let mask = rect(8, 8, 2, 4, 2, 4);
        let tol = pointing_tolerance(8, 8);
        assert_eq!(pointing_hit(&[0.5; 64], &mask, 8, 8, tol), None);
        assert_eq!(pointing_hit(&[0.0; 64], &mask, 8, 8, tol), None);
        let mut nan = peaked(8, 8, 3, 3);
        nan[60] = f32::NAN;
        assert_eq!(pointing_hit(&nan, &mask, 8, 8, tol), None);
        let mut inf = peaked(8, 8, 3, 3);
        inf[60] = f32::INFINITY;
        assert_eq!(pointing_hit(&inf, &mask, 8, 8, tol), None);
        assert_eq!(pointing_hit(&peaked(8, 8, 3, 3), &[0; 64], 8, 8, tol), None);
        // Wrong lengths and bad tolerances.
        assert_eq!(
            pointing_hit(&peaked(8, 8, 3, 3), &mask[..63], 8, 8, tol),
            None
        );
        assert_eq!(pointing_hit(&[1.0, 0.0], &mask, 8, 8, tol), None);
        assert_eq!(pointing_hit(&peaked(8, 8, 3, 3), &mask, 8, 8, -1.0), None);
        assert_eq!(
            pointing_hit(&peaked(8, 8, 3, 3), &mask, 8, 8, f64::NAN),
            None
        );
    }

    #[test]
    fn pointing_ties_go_to_the_first_in_raster_order() {
        let mask = rect(8, 8, 5, 8, 5, 8);
        // Two equal maxima: (6, 6) inside the mask, (0, 0) far outside.
        let mut map = vec![0.0; 64];
        map[6 * 8 + 6] = 1.0;
        map[0] = 1.0;
        assert_eq!(map_peak(&map, 8, 8), Some((0, 0)));
        assert_eq!(pointing_hit(&map, &mask, 8, 8, 1.0), Some(false));
        // Order swapped: the first maximum is now inside.
        let mut map = vec![0.0; 64];
        map[6 * 8 + 6] = 1.0;
        map[56] = 1.0; // (7, 0)
        assert_eq!(map_peak(&map, 8, 8), Some((6, 6)));
        assert_eq!(pointing_hit(&map, &mask, 8, 8, 1.0), Some(true));
    }

    // --- centre baseline ---------------------------------------------------

    #[test]
    fn centre_baseline() {
        let tol = pointing_tolerance(32, 32);
        // Centre of 32 × 32 is (15.5, 15.5).
        assert_eq!(
            centre_hit(&rect(32, 32, 12, 20, 12, 20), 32, 32, tol),
            Some(true)
        );
        assert_eq!(
            centre_hit(&rect(32, 32, 0, 6, 0, 6), 32, 32, tol),
            Some(false)
        );
        // Nearest mask pixel (17, 17): distance √(1.5² + 1.5²) ≈ 2.12 ≤ 2.143.
        assert_eq!(
            centre_hit(&rect(32, 32, 17, 20, 17, 20), 32, 32, tol),
            Some(true)
        );
        // Nearest mask pixel (18, 16): distance √(2.5² + 0.5²) ≈ 2.55.
        assert_eq!(
            centre_hit(&rect(32, 32, 18, 20, 16, 20), 32, 32, tol),
            Some(false)
        );
        assert_eq!(centre_hit(&[0; 1024], 32, 32, tol), None);
    }

    // --- AUC ---------------------------------------------------------------

    #[test]
    fn auc_of_known_curves() {
        assert!(close(auc(&[0.7; 33]), f64::from(0.7f32)));
        assert!(close(auc(&[0.3]), f64::from(0.3f32)));
        let linear: Vec<f32> = (0..=32).map(|k| 1.0 - k as f32 / 32.0).collect();
        assert!(close(auc(&linear), 0.5));
        // A step down from 1 to 0 between fractions 1/4 and 2/4 (4 steps):
        // 1/4 + (1 + 0)/2 · 1/4 = 0.375.
        assert!(close(auc(&[1.0, 1.0, 0.0, 0.0, 0.0]), 0.375));
        assert!(auc(&[]).is_nan());
    }

    // --- deletion and insertion -------------------------------------------

    const SHAPE: [usize; 3] = [2, 4, 4];
    /// The region the linear "model" looks at: the centre 2 × 2 pixels.
    const REGION: [usize; 4] = [5, 6, 9, 10];

    /// The score of a linear model: the mean over both channels of the region's
    /// pixels (1 on the all-ones image, 0 when the region is zeroed). It fails
    /// if a pixel's channels disagree about whether it was changed.
    fn region_score(images: &[f32], n: usize) -> Result<Vec<f32>, String> {
        let [c, h, w] = SHAPE;
        let hw = h * w;
        Ok((0..n)
            .map(|i| {
                let img = &images[i * c * hw..(i + 1) * c * hw];
                for p in 0..hw {
                    if img[p] != img[hw + p] {
                        return f32::NAN; // channels out of step: curves() errs
                    }
                }
                let s: f32 = REGION.iter().map(|&p| img[p] + img[hw + p]).sum();
                s / (c * REGION.len()) as f32
            })
            .collect())
    }

    fn region_first() -> Vec<usize> {
        let mut order = REGION.to_vec();
        order.extend((0..16).filter(|p| !REGION.contains(p)));
        order
    }

    #[test]
    fn deletion_in_the_region_first_order_is_analytic() {
        let image = vec![1.0; 32];
        let settings = CurveSettings {
            steps: 16,
            max_batch: 5,
        };
        let mut sizes = Vec::new();
        let mut score = |imgs: &[f32], n: usize| {
            sizes.push(n);
            assert_eq!(imgs.len(), n * 32);
            region_score(imgs, n)
        };
        let curve =
            deletion_curve(&image, &region_first(), None, SHAPE, settings, &mut score).unwrap();
        let mut expected = vec![1.0, 0.75, 0.5, 0.25];
        expected.resize(17, 0.0);
        assert_eq!(curve, expected);
        // AUC = (|R| / hw) / 2: the region is gone after a quarter of the pixels.
        assert!(close(auc(&curve), 0.125));
        assert_eq!(sizes, vec![5, 5, 5, 2]);

        let random = random_order(16, 3);
        let mut score = |imgs: &[f32], n: usize| region_score(imgs, n);
        let rc = deletion_curve(&image, &random, None, SHAPE, settings, &mut score).unwrap();
        assert_eq!(rc.len(), 17);
        assert!(
            auc(&rc) > auc(&curve) + 0.1,
            "random {} vs region {}",
            auc(&rc),
            auc(&curve)
        );
    }

    #[test]
    fn deletion_with_uneven_steps_and_a_given_baseline() {
        // 16 pixels in 5 steps: ⌊k·16/5⌋ = 0, 3, 6, 9, 12, 16 pixels deleted.
        let image = vec![1.0; 32];
        let baseline = vec![0.5; 32];
        let settings = CurveSettings {
            steps: 5,
            max_batch: 64,
        };
        let mut score = |imgs: &[f32], n: usize| region_score(imgs, n);
        // The region's pixels sit at positions 2, 5, 8 and 9 of the order.
        let order = [0, 1, 5, 2, 3, 6, 4, 7, 9, 10, 8, 11, 12, 13, 14, 15];
        let curve =
            deletion_curve(&image, &order, Some(&baseline), SHAPE, settings, &mut score).unwrap();
        // Region pixels deleted: 1, 2, 3, 4, 4 after the first point (rounding
        // instead of ⌊⌋ would give 4 at the fourth) → score 1 − 0.5·(deleted/4).
        assert_eq!(curve, vec![1.0, 0.875, 0.75, 0.625, 0.5, 0.5]);
    }

    #[test]
    fn insertion_in_the_region_first_order_is_analytic() {
        let image = vec![1.0; 32];
        let canvas = vec![0.0; 32];
        let settings = CurveSettings {
            steps: 16,
            max_batch: 4,
        };
        let mut most = 0;
        let mut score = |imgs: &[f32], n: usize| {
            most = most.max(n);
            region_score(imgs, n)
        };
        let curve = insertion_curve(
            &image,
            &region_first(),
            &canvas,
            SHAPE,
            settings,
            &mut score,
        )
        .unwrap();
        let mut expected = vec![0.0, 0.25, 0.5, 0.75];
        expected.resize(17, 1.0);
        assert_eq!(curve, expected);
        assert!(close(auc(&curve), 0.875));
        assert_eq!(most, 4);

        let random = random_order(16, 3);
        let mut score = |imgs: &[f32], n: usize| region_score(imgs, n);
        let rc = insertion_curve(&image, &random, &canvas, SHAPE, settings, &mut score).unwrap();
        assert!(auc(&rc) < auc(&curve) - 0.1);
    }

    #[test]
    fn many_curves_batch_together_and_match_one_by_one() {
        // Three images of different brightness, deletion and insertion mixed.
        let images: Vec<Vec<f32>> = (1..=3).map(|k| vec![k as f32; 32]).collect();
        let zeros = vec![0.0; 32];
        let orders = [
            region_first(),
            random_order(16, 1),
            order_by_map(&[0.0; 16]),
        ];
        let mut morphs: Vec<Morph> = Vec::new();
        for (img, order) in images.iter().zip(&orders) {
            morphs.push(Morph::deletion(img, order, None));
            morphs.push(Morph::insertion(img, order, &zeros));
        }
        let settings = CurveSettings {
            steps: 8,
            max_batch: 7,
        };
        let mut calls = Vec::new();
        let mut score = |imgs: &[f32], owners: &[usize]| {
            calls.push(owners.to_vec());
            region_score(imgs, owners.len())
        };
        let all = curves(&morphs, SHAPE, settings, &mut score).unwrap();
        assert_eq!(all.len(), 6);
        // 6 morphs × 9 points = 54 images in calls of at most 7, in morph order.
        assert!(calls.iter().all(|c| !c.is_empty() && c.len() <= 7));
        let owners: Vec<usize> = calls.concat();
        let expected: Vec<usize> = (0..6).flat_map(|m| [m; 9]).collect();
        assert_eq!(owners, expected);
        for (m, curve) in morphs.iter().zip(&all) {
            assert_eq!(curve.len(), 9);
            let single = CurveSettings {
                steps: 8,
                max_batch: 1,
            };
            let mut one = |i: &[f32], o: &[usize]| region_score(i, o.len());
            let alone = curves(&[*m], SHAPE, single, &mut one).unwrap();
            assert_eq!(&alone[0], curve);
        }
        // The first deletion curve ends at 0 and starts at the image's score.
        assert_eq!(all[0][0], 1.0);
        assert_eq!(all[0][8], 0.0);
        assert_eq!(all[5][0], 0.0);
        assert_eq!(all[5][8], 3.0);
    }

    #[test]
    fn curves_reject_bad_calls() {
        let image = vec![1.0; 32];
        let good = CurveSettings::default();
        let mut ok = |imgs: &[f32], n: usize| region_score(imgs, n);
        let order = region_first();
        let run = |image: &[f32], order: &[usize], s: CurveSettings, f: &mut Score<'_>| {
            deletion_curve(image, order, None, SHAPE, s, f)
        };
        assert!(run(&image[..31], &order, good, &mut ok).is_err());
        assert!(run(&image, &order[..15], good, &mut ok).is_err());
        let mut dup = order.clone();
        dup[1] = dup[0];
        assert!(run(&image, &dup, good, &mut ok).is_err());
        let mut out_of_range = order.clone();
        out_of_range[0] = 16;
        assert!(run(&image, &out_of_range, good, &mut ok).is_err());
        let zero_steps = CurveSettings { steps: 0, ..good };
        assert!(run(&image, &order, zero_steps, &mut ok).is_err());
        let zero_batch = CurveSettings {
            max_batch: 0,
            ..good
        };
        assert!(run(&image, &order, zero_batch, &mut ok).is_err());
        let mut short = |_: &[f32], n: usize| Ok(vec![0.0; n - 1]);
        assert!(run(&image, &order, good, &mut short).is_err());
        let mut failing = |_: &[f32], _: usize| Err("model failed".to_string());
        assert_eq!(
            run(&image, &order, good, &mut failing),
            Err("model failed".into())
        );
        let mut nan = |_: &[f32], n: usize| Ok(vec![f32::NAN; n]);
        assert!(run(&image, &order, good, &mut nan).is_err());
        let canvas = vec![0.0; 31];
        assert!(insertion_curve(&image, &order, &canvas, SHAPE, good, &mut ok).is_err());
    }

    #[test]
    fn order_by_map_is_descending_with_index_ties() {
        assert_eq!(
            order_by_map(&[0.1, 0.9, 0.5, 0.9, -0.0, 0.0]),
            vec![1, 3, 2, 0, 4, 5]
        );
        assert_eq!(order_by_map(&[]), Vec::<usize>::new());
    }

    #[test]
    fn random_order_is_a_seeded_permutation() {
        let a = random_order(100, 7);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, random_order(100, 7));
        assert_ne!(a, random_order(100, 8));
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        assert!(random_order(0, 1).is_empty());
        assert_eq!(random_order(1, 1), vec![0]);
    }

    // --- Spearman ----------------------------------------------------------

    #[test]
    fn spearman_known_values() {
        let a = [0.3, -1.0, 2.5, 0.0, 7.0];
        assert!(close(spearman(&a, &a).unwrap(), 1.0));
        let reversed: Vec<f32> = a.iter().map(|v| -v).collect();
        assert!(close(spearman(&a, &reversed).unwrap(), -1.0));
        let cubed: Vec<f32> = a.iter().map(|v| v.powi(3) + v.exp()).collect();
        assert!(close(spearman(&a, &cubed).unwrap(), 1.0));
        // Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / √(4.5 · 5) = √0.9.
        let rho = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(close(rho, 0.9f64.sqrt()), "{rho}");
        // -0.0 and 0.0 tie.
        let rho = spearman(&[1.0, -0.0, 0.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let rho_tie = spearman(&[1.0, 0.0, 0.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(close(rho, rho_tie));
    }

    #[test]
    fn spearman_without_an_answer() {
        assert_eq!(spearman(&[1.0; 4], &[1.0, 2.0, 3.0, 4.0]), None);
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[0.0; 4]), None);
        assert_eq!(spearman(&[1.0, f32::NAN], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, f32::INFINITY]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[], &[]), None);
        assert_eq!(spearman(&[1.0], &[2.0]), None);
    }

    // --- blur --------------------------------------------------------------

    #[test]
    fn blur_keeps_a_constant_image() {
        let image = vec![0.25; 3 * 9 * 7];
        let out = blur(&image, [3, 9, 7], 2.0).unwrap();
        assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6));
        // A huge σ on a tiny image is still well defined.
        let out = blur(&image, [3, 9, 7], 100.0).unwrap();
        assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn blur_spreads_a_bump_and_keeps_its_mass() {
        let (h, w) = (32, 32);
        let mut image = vec![0.0; 2 * h * w];
        image[16 * w + 15] = 1.0; // channel 0: a bump far from the edges
        image[h * w + 16 * w + 16] = 2.0; // channel 1: another
        let out = blur(&image, [2, h, w], 2.0).unwrap();
        let mass0: f32 = out[..h * w].iter().sum();
        let mass1: f32 = out[h * w..].iter().sum();
        assert!((mass0 - 1.0).abs() < 1e-4, "{mass0}");
        assert!((mass1 - 2.0).abs() < 1e-4, "{mass1}");
        // The peak is lower and stays at the bump; the blur is symmetric.
        let peak = out[16 * w + 15];
        assert!(peak < 0.1 && peak > 0.0);
        assert!(out[..h * w].iter().all(|&v| v <= peak));
        assert!((out[15 * w + 15] - out[17 * w + 15]).abs() < 1e-7);
        assert!((out[16 * w + 14] - out[16 * w + 16]).abs() < 1e-7);
        // 1-D Gaussian normalised over ±6 taps: peak ≈ (1 / (σ√(2π)))².
        let g = 1.0 / (2.0 * (2.0 * std::f64::consts::PI).sqrt());
        assert!((f64::from(peak) - g * g).abs() < 1e-3, "{peak}");
    }

    #[test]
    fn blur_edge_cases() {
        let image: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(blur(&image, [1, 4, 4], 0.0).unwrap(), image);
        assert_eq!(blur(&image, [1, 4, 4], f64::NAN).unwrap(), image);
        assert!(blur(&image, [1, 4, 5], 1.0).is_err());
        assert!(close(insertion_sigma(32, 32), 4.0));
    }

    // --- aggregates --------------------------------------------------------

    #[test]
    fn rates_count_degenerate_as_misses() {
        let r: Rate = [Some(true), Some(false), None, Some(true)]
            .into_iter()
            .collect();
        assert_eq!(
            r,
            Rate {
                hits: 2,
                total: 4,
                degenerate: 1
            }
        );
        assert_eq!(r.fraction(), Some(0.5));
        assert_eq!(Rate::default().fraction(), None);
    }

    #[test]
    fn means_skip_missing_values() {
        let m: Mean = [Some(1.0), None, Some(3.0), Some(f64::NAN), Some(5.0)]
            .into_iter()
            .collect();
        assert_eq!((m.count, m.skipped), (3, 2));
        assert!(close(m.mean().unwrap(), 3.0));
        assert!(close(m.std_dev().unwrap(), 2.0));
        assert!(close(m.std_error().unwrap(), 2.0 / 3f64.sqrt()));
        assert_eq!(mean_of([None, None]), None);
        assert_eq!(mean_of([Some(2.0)]), Some(2.0));
        assert_eq!(Mean::default().std_dev(), None);
    }
}
