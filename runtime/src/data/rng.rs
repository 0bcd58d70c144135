//! Portable, reproducible random numbers for the data pipeline: a ChaCha8 stream
//! keyed by (seed, purpose, epoch) with the sample index as the stream number, and
//! the few draws the pipeline needs, written out so their values never change with
//! a library upgrade, the platform or the thread count.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for; part of the key, so that streams for
/// different purposes never overlap even with the same seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Shuffle = 1,
    Augment = 2,
    ShapesTrain = 3,
    ShapesTest = 4,
    /// SmoothGrad's noise (epoch = directive, stream = sample index).
    Explain = 5,
}

/// The generator for `(seed, purpose, epoch)` on stream `stream` (a sample
/// index, or 0). ChaCha8's output is fixed by its specification, so the values
/// are the same on every platform and in every version of this program.
pub(crate) fn stream(seed: u64, purpose: Purpose, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(purpose as u64).to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// A uniform integer in `0..n` (`n > 0`), without bias (Lemire's method).
pub(crate) fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// A uniform integer in `lo..=hi` (`lo <= hi`).
pub(crate) fn between(rng: &mut ChaCha8Rng, lo: usize, hi: usize) -> usize {
    lo + below(rng, (hi - lo) as u64 + 1) as usize
}

/// A uniform float in `[0, 1)` with 53 random bits.
pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform float in `[lo, hi)`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * unit(rng)
}

/// A standard normal draw (Box–Muller on two uniform draws).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // 1 - unit() is in (0, 1]: the logarithm is finite.
    let r = (-2.0 * (1.0 - unit(rng)).ln()).sqrt();
    r * (std::f64::consts::TAU * unit(rng)).cos()
}

/// A uniform `f32` in `[-1, 1)` from 16 random bits (cheap, for pixel noise:
/// one `u64` draw gives four).
pub(crate) fn noise16(bits: u16) -> f32 {
    f32::from(bits) * (2.0 / 65536.0) - 1.0
}

/// Shuffles `v` in place (Fisher–Yates, from the last element down).
pub(crate) fn shuffle<T>(rng: &mut ChaCha8Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let mut r = stream(7, Purpose::Augment, 3, 11);
        let a: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        let mut r = stream(7, Purpose::Augment, 3, 11);
        let b: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(a, b);
        let mut other = [
            stream(8, Purpose::Augment, 3, 11),
            stream(7, Purpose::Shuffle, 3, 11),
            stream(7, Purpose::Augment, 4, 11),
            stream(7, Purpose::Augment, 3, 12),
        ];
        for o in &mut other {
            assert_ne!(o.next_u64(), a[0]);
        }
    }

    #[test]
    fn noise_covers_its_range() {
        assert_eq!(noise16(0), -1.0);
        assert_eq!(noise16(32768), 0.0);
        assert!(noise16(u16::MAX) < 1.0 && noise16(u16::MAX) > 0.9999);
    }

    #[test]
    fn draws_stay_in_range() {
        let mut r = stream(1, Purpose::Shuffle, 0, 0);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let x = below(&mut r, 5) as usize;
            seen[x] = true;
            let u = unit(&mut r);
            assert!((0.0..1.0).contains(&u));
            let z = noise16(r.next_u32() as u16);
            assert!((-1.0..1.0).contains(&z));
            let k = between(&mut r, 3, 4);
            assert!((3..=4).contains(&k));
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn normal_draws_have_mean_zero_and_unit_variance() {
        let mut r = stream(3, Purpose::Explain, 0, 0);
        let n = 20_000;
        let z: Vec<f64> = (0..n).map(|_| normal(&mut r)).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert!(z.iter().all(|v| v.is_finite()));
    }
}
