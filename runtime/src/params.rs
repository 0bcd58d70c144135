//! Parameter storage for training: one tensor per [`ParamSpec`] of a model (row-major,
//! PyTorch layout, `f32`; batchnorm's `num_batches_tracked` as `i64`), and PyTorch's
//! default initialisation, deterministic from the run's seed.
//!
//! Initial values, as `torch.nn` gives them:
//!
//! | kind | value |
//! | --- | --- |
//! | conv/linear `weight`, `bias` | `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, or the model's literal `weights=` |
//! | norm `weight` (gamma) | ones |
//! | norm `bias` (beta) | zeros |
//! | `running_mean` | zeros |
//! | `running_var` | ones |
//! | `num_batches_tracked` | 0 |
//!
//! The random numbers: each tensor has its own ChaCha8 stream, keyed by the seed and
//! the tensor's name (see [`tensor_rng`]), so a tensor's initial values depend only on
//! the seed, its name, its shape and its fan-in — adding a layer elsewhere in the
//! model does not change them. Element `k` is `b * (2u - 1)` with `u` the `k`-th
//! `next_u32() >> 8` scaled by `2^-24` (so `u` is in `[0, 1)` on a 24-bit grid that an
//! `f32` holds exactly), computed in `f64` and rounded once to `f32`.

use cnnc_compiler::params::{ParamKind, ParamSpec};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// The value of one parameter or buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// Row-major `f32` values, `numel(shape)` of them.
    F32(Vec<f32>),
    /// A scalar counter (`num_batches_tracked`, shape `[]`).
    I64(i64),
}

impl Tensor {
    /// The `f32` values, or `None` for an `i64` counter.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Tensor::F32(v) => Some(v),
            Tensor::I64(_) => None,
        }
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            Tensor::F32(v) => Some(v),
            Tensor::I64(_) => None,
        }
    }

    /// The counter, or `None` for an `f32` tensor.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Tensor::F32(_) => None,
            Tensor::I64(n) => Some(*n),
        }
    }
}

/// Number of elements of a shape (`1` for the scalar shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Whether a kind is stored as an `i64` counter rather than `f32` values.
pub fn is_counter(kind: ParamKind) -> bool {
    kind == ParamKind::BatchesTracked
}

#[derive(Debug, Error, PartialEq)]
pub enum ParamsError {
    #[error("`{name}` has {got} initial values, but its shape {shape:?} holds {expected}")]
    InitLength {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("{got} tensors given for {expected} parameters")]
    Count { expected: usize, got: usize },
    #[error("`{name}` should be {expected}, but the tensor given is {got}")]
    Mismatch {
        name: String,
        expected: String,
        got: String,
    },
}

/// Every parameter and buffer of a model, in the order of its specs.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    specs: Vec<ParamSpec>,
    tensors: Vec<Tensor>,
    /// Indices (into `specs`) of the tensors the optimizer updates, in order.
    trainable: Vec<usize>,
}

impl Params {
    /// PyTorch's default initial values (table in the module doc), or the literal
    /// `init` values of a spec, deterministic from `seed`.
    pub fn init(specs: &[ParamSpec], seed: u64) -> Result<Params, ParamsError> {
        let mut tensors = Vec::with_capacity(specs.len());
        for s in specs {
            let n = numel(&s.shape);
            let t = if let Some(init) = &s.init {
                if init.len() != n {
                    return Err(ParamsError::InitLength {
                        name: s.name.clone(),
                        shape: s.shape.clone(),
                        expected: n,
                        got: init.len(),
                    });
                }
                if is_counter(s.kind) {
                    Tensor::I64(init.first().copied().unwrap_or(0.0) as i64)
                } else {
                    Tensor::F32(init.iter().map(|&x| x as f32).collect())
                }
            } else {
                match s.kind {
                    ParamKind::Weight | ParamKind::Bias => {
                        Tensor::F32(uniform(&s.name, seed, n, fan_in_bound(s.fan_in)))
                    }
                    ParamKind::Gamma | ParamKind::RunningVar => Tensor::F32(vec![1.0; n]),
                    ParamKind::Beta | ParamKind::RunningMean => Tensor::F32(vec![0.0; n]),
                    ParamKind::BatchesTracked => Tensor::I64(0),
                }
            };
            tensors.push(t);
        }
        Params::from_tensors(specs, tensors)
    }

    /// Wraps given tensors, checking there is one per spec with the spec's element
    /// count and kind (`i64` for `num_batches_tracked`, `f32` otherwise).
    pub fn from_tensors(specs: &[ParamSpec], tensors: Vec<Tensor>) -> Result<Params, ParamsError> {
        if specs.len() != tensors.len() {
            return Err(ParamsError::Count {
                expected: specs.len(),
                got: tensors.len(),
            });
        }
        for (s, t) in specs.iter().zip(&tensors) {
            let n = numel(&s.shape);
            let ok = match t {
                Tensor::F32(v) => !is_counter(s.kind) && v.len() == n,
                Tensor::I64(_) => is_counter(s.kind),
            };
            if !ok {
                let expected = if is_counter(s.kind) {
                    "an i64 counter".to_string()
                } else {
                    format!("{n} f32 values")
                };
                let got = match t {
                    Tensor::F32(v) => format!("{} f32 values", v.len()),
                    Tensor::I64(_) => "an i64 counter".to_string(),
                };
                return Err(ParamsError::Mismatch {
                    name: s.name.clone(),
                    expected,
                    got,
                });
            }
        }
        let trainable = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.trainable)
            .map(|(i, _)| i)
            .collect();
        Ok(Params {
            specs: specs.to_vec(),
            tensors,
            trainable,
        })
    }

    /// Number of tensors (parameters and buffers).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn spec(&self, i: usize) -> &ParamSpec {
        &self.specs[i]
    }

    pub fn tensor(&self, i: usize) -> &Tensor {
        &self.tensors[i]
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The `f32` values of tensor `i` (empty for a `num_batches_tracked` counter).
    pub fn data(&self, i: usize) -> &[f32] {
        self.tensors[i].as_f32().unwrap_or(&[])
    }

    /// The `f32` values of tensor `i`, mutable (empty for a counter).
    pub fn data_mut(&mut self, i: usize) -> &mut [f32] {
        self.tensors[i].as_f32_mut().unwrap_or(&mut [])
    }

    /// The counter of tensor `i`, if it is one.
    pub fn counter(&self, i: usize) -> Option<i64> {
        self.tensors[i].as_i64()
    }

    /// Sets the counter of tensor `i`; does nothing if it is an `f32` tensor.
    pub fn set_counter(&mut self, i: usize, value: i64) {
        if let Tensor::I64(n) = &mut self.tensors[i] {
            *n = value;
        }
    }

    /// Index of the tensor with this name (`c1.weight`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index_of(name).map(|i| &self.tensors[i])
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.index_of(name).map(move |i| &mut self.tensors[i])
    }

    /// Indices of the tensors the optimizer updates, in spec order. Gradients and
    /// optimizer state are indexed by position in this list.
    pub fn trainable(&self) -> &[usize] {
        &self.trainable
    }

    /// For each trainable tensor, the index of its layer (for per-layer clipping).
    pub fn trainable_layers(&self) -> Vec<usize> {
        self.trainable
            .iter()
            .map(|&i| self.specs[i].layer)
            .collect()
    }

    /// Total number of trainable elements.
    pub fn trainable_numel(&self) -> usize {
        self.trainable.iter().map(|&i| self.data(i).len()).sum()
    }
}

/// `1/sqrt(fan_in)`, PyTorch's bound for conv/linear weights and biases (0 if the
/// fan-in is 0, which gives zeros).
fn fan_in_bound(fan_in: usize) -> f64 {
    if fan_in == 0 {
        0.0
    } else {
        1.0 / (fan_in as f64).sqrt()
    }
}

/// The random stream of one tensor: ChaCha8 keyed by 32 bytes — the seed
/// (little-endian), FNV-1a 64 of the tensor's name (little-endian), and the tag
/// `cnnc-init-v1` padded with zeros.
pub fn tensor_rng(name: &str, seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&fnv1a64(name.as_bytes()).to_le_bytes());
    let tag = b"cnnc-init-v1";
    key[16..16 + tag.len()].copy_from_slice(tag);
    ChaCha8Rng::from_seed(key)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `n` values of `U(-bound, bound)` from the tensor's stream.
fn uniform(name: &str, seed: u64, n: usize, bound: f64) -> Vec<f32> {
    let mut rng = tensor_rng(name, seed);
    (0..n)
        .map(|_| {
            let u = f64::from(rng.next_u32() >> 8) * (1.0 / (1u32 << 24) as f64);
            (bound * (2.0 * u - 1.0)) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(name: &str, shape: &[usize], kind: ParamKind, fan_in: usize) -> ParamSpec {
        ParamSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            layer: 0,
            trainable: kind.is_trainable(),
            fan_in,
            init: None,
        }
    }

    fn model_specs() -> Vec<ParamSpec> {
        let mut v = vec![
            spec("c1.weight", &[8, 3, 3, 3], ParamKind::Weight, 27),
            spec("c1.bias", &[8], ParamKind::Bias, 27),
            spec("bn1.weight", &[8], ParamKind::Gamma, 0),
            spec("bn1.bias", &[8], ParamKind::Beta, 0),
            spec("bn1.running_mean", &[8], ParamKind::RunningMean, 0),
            spec("bn1.running_var", &[8], ParamKind::RunningVar, 0),
            spec("bn1.num_batches_tracked", &[], ParamKind::BatchesTracked, 0),
            spec("fc.weight", &[10, 512], ParamKind::Weight, 512),
            spec("fc.bias", &[10], ParamKind::Bias, 512),
        ];
        for (i, s) in v.iter_mut().enumerate() {
            s.layer = i / 2;
        }
        v
    }

    #[test]
    fn init_is_deterministic_and_seed_dependent() {
        let specs = model_specs();
        let a = Params::init(&specs, 7).unwrap();
        let b = Params::init(&specs, 7).unwrap();
        let c = Params::init(&specs, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.data(0), c.data(0));
        // A tensor's values do not depend on the other tensors of the model.
        let alone = Params::init(&specs[7..8], 7).unwrap();
        assert_eq!(alone.data(0), a.data(7));
    }

    #[test]
    fn init_values_are_pytorch_defaults_within_bounds() {
        let specs = model_specs();
        let p = Params::init(&specs, 0).unwrap();
        for (i, s) in specs.iter().enumerate() {
            match s.kind {
                ParamKind::Weight | ParamKind::Bias => {
                    let b = (1.0 / (s.fan_in as f64).sqrt()) as f32;
                    let d = p.data(i);
                    assert_eq!(d.len(), numel(&s.shape));
                    assert!(d.iter().all(|x| x.abs() <= b), "{}", s.name);
                    // Spread over the interval, both signs, not constant.
                    let max = d.iter().cloned().fold(f32::MIN, f32::max);
                    let min = d.iter().cloned().fold(f32::MAX, f32::min);
                    assert!(max > 0.0 && min < 0.0, "{}", s.name);
                    if d.len() > 100 {
                        assert!(max > 0.9 * b && min < -0.9 * b, "{}", s.name);
                    }
                    if d.len() > 1000 {
                        let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
                        assert!(mean.abs() < 0.05 * b as f64, "{mean}");
                    }
                }
                ParamKind::Gamma | ParamKind::RunningVar => {
                    assert!(p.data(i).iter().all(|&x| x == 1.0))
                }
                ParamKind::Beta | ParamKind::RunningMean => {
                    assert!(p.data(i).iter().all(|&x| x == 0.0))
                }
                ParamKind::BatchesTracked => {
                    assert_eq!(p.counter(i), Some(0));
                    assert!(p.data(i).is_empty());
                }
            }
        }
    }

    #[test]
    fn literal_init_values_are_used() {
        let mut s = spec("k.weight", &[1, 1, 1, 3], ParamKind::Weight, 3);
        s.init = Some(vec![0.1, -2.0, 3.5]);
        let p = Params::init(std::slice::from_ref(&s), 0).unwrap();
        assert_eq!(p.data(0), &[0.1f32, -2.0, 3.5]);
        s.init = Some(vec![1.0]);
        assert!(matches!(
            Params::init(&[s], 0),
            Err(ParamsError::InitLength {
                expected: 3,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn accessors_and_trainable_list() {
        let mut specs = model_specs();
        specs[1].trainable = false; // a frozen bias
        let mut p = Params::init(&specs, 0).unwrap();
        assert_eq!(p.len(), 9);
        assert_eq!(p.trainable(), &[0, 2, 3, 7, 8]);
        assert_eq!(p.trainable_layers(), vec![0, 1, 1, 3, 4]);
        assert_eq!(p.trainable_numel(), 216 + 8 + 8 + 5120 + 10);
        assert_eq!(p.index_of("bn1.running_var"), Some(5));
        assert_eq!(p.index_of("nope"), None);
        assert_eq!(p.get("bn1.num_batches_tracked"), Some(&Tensor::I64(0)));
        p.set_counter(6, 41);
        assert_eq!(p.counter(6), Some(41));
        p.data_mut(2)[0] = 3.0;
        assert_eq!(
            p.get("bn1.weight").and_then(Tensor::as_f32).unwrap()[0],
            3.0
        );
        if let Some(Tensor::F32(v)) = p.get_mut("fc.bias") {
            v[9] = -1.0;
        }
        assert_eq!(p.data(8)[9], -1.0);
    }

    #[test]
    fn from_tensors_checks_sizes_and_kinds() {
        let specs = model_specs();
        let p = Params::init(&specs, 0).unwrap();
        let mut t = p.tensors().to_vec();
        t[1] = Tensor::F32(vec![0.0; 7]);
        assert!(matches!(
            Params::from_tensors(&specs, t),
            Err(ParamsError::Mismatch { .. })
        ));
        let mut t = p.tensors().to_vec();
        t[6] = Tensor::F32(vec![0.0]);
        assert!(Params::from_tensors(&specs, t).is_err());
        assert!(matches!(
            Params::from_tensors(&specs, vec![]),
            Err(ParamsError::Count { .. })
        ));
    }
}
