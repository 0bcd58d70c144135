//! Checkpoints as safetensors files: model weights with PyTorch's names, layouts and
//! dtypes (loadable by `load_state_dict` of the equivalent `torch.nn` module), and
//! optimizer state for resuming. Loading checks the whole file before it returns
//! anything; writing is atomic (temp file, fsync, rename, fsync of the folder).
//!
//! Weights file: one tensor per [`ParamSpec`], named as the spec (`c1.weight`,
//! `bn1.running_var`), `F32` in the spec's shape, except `*.num_batches_tracked`:
//! `I64`, shape `[]`. Metadata (`__metadata__`, all strings): `format` = `pt` (what
//! `safetensors.torch` writes), `cnnc_format` = `weights`, `cnnc_format_version` =
//! [`FORMAT_VERSION`], `cnnc_version`, `model` (the model's name).
//!
//! Optimizer file: for each trainable parameter `P` and each state tensor of the
//! optimizer, `P.momentum_buffer` (SGD with momentum) or `P.exp_avg` and
//! `P.exp_avg_sq` (Adam, AdamW), `F32` in `P`'s shape. Metadata: as above with
//! `cnnc_format` = `optimizer`, plus `optimizer` (`sgd`, `adam`, `adamw`), `step`
//! (steps taken), `epoch` (epochs completed), `lr` (the last learning rate used),
//! `base_lr`, and `hyperparameters` (a JSON object).

use crate::optim::{Kind, Optimizer};
use crate::params::{is_counter, Params, Tensor};
use cnnc_compiler::params::ParamSpec;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Version of the layout described in the module doc.
pub const FORMAT_VERSION: &str = "1";

/// safetensors refuses headers larger than this (100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("`{}` is not a safetensors file: {reason}", path.display())]
    NotSafetensors { path: PathBuf, reason: String },
    #[error(
        "`{}` is truncated: it has {size} bytes, its header describes {needed}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("`{}` is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("`{}` does not match the model: {mismatch}", path.display())]
    Mismatch {
        path: PathBuf,
        mismatch: TensorMismatch,
    },
    #[error(
        "`{}` holds {found} optimizer state, but the model trains with {expected}",
        path.display()
    )]
    WrongOptimizer {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("`{}` has no valid `{key}` in its metadata: {reason}", path.display())]
    Metadata {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("cannot encode `{}`: {reason}", path.display())]
    Encode { path: PathBuf, reason: String },
}

/// Every difference between the tensors of a file and those expected.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorMismatch {
    /// Expected tensors the file lacks.
    pub missing: Vec<String>,
    /// Tensors of the file that nothing expects.
    pub unexpected: Vec<String>,
    /// Tensors present with another shape or dtype.
    pub wrong: Vec<WrongTensor>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WrongTensor {
    pub name: String,
    /// e.g. `F32 [8, 1, 3, 3]`
    pub expected: String,
    pub found: String,
}

impl TensorMismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong.is_empty()
    }
}

impl fmt::Display for TensorMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected {}", self.unexpected.join(", ")));
        }
        for w in &self.wrong {
            parts.push(format!(
                "{} is {} in the file, the model needs {}",
                w.name, w.found, w.expected
            ));
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// The training position saved with optimizer state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainPoint {
    /// Epochs completed.
    pub epoch: u64,
    /// The learning rate of the last step.
    pub lr: f32,
}

/// What [`load_optimizer`] read besides the state tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerMeta {
    pub step: u64,
    pub epoch: u64,
    pub lr: f32,
}

/// A tensor to serialise: dtype, shape and little-endian bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_f32(shape: &[usize], v: &[f32]) -> Raw {
    Raw {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn base_metadata(content: &str, model: &str) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("cnnc_format".to_string(), content.to_string()),
        (
            "cnnc_format_version".to_string(),
            FORMAT_VERSION.to_string(),
        ),
        (
            "cnnc_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("model".to_string(), model.to_string()),
    ])
}

fn encode(
    path: &Path,
    tensors: &[(String, Raw)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, r)| (n, r)), Some(meta)).map_err(|e| {
            CheckpointError::Encode {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    canonical_header(bytes).map_err(|reason| CheckpointError::Encode {
        path: path.to_path_buf(),
        reason,
    })
}

/// Rewrites the JSON header with its keys in sorted order. `safetensors` writes
/// the metadata map in hash order, so two saves of the same tensors would differ
/// byte for byte; sorted, equal checkpoints are equal files. Reordering keeps the
/// header's length, so every data offset stays valid.
fn canonical_header(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("no header")?;
    let n = u64::from_le_bytes(len_bytes) as usize;
    let header = bytes.get(8..8 + n).ok_or("short header")?;
    // serde_json's default map is ordered by key.
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let sorted = serde_json::to_string(&value).map_err(|e| e.to_string())?;
    if sorted.len() > n {
        return Err("the sorted header is longer than the original".into());
    }
    let mut padded = sorted.into_bytes();
    padded.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&padded);
    Ok(bytes)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    write_atomic(path, bytes).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    })
}

/// Writes the weights of a model (every parameter and buffer) to `path`, atomically.
pub fn save_weights(path: &Path, model: &str, params: &Params) -> Result<(), CheckpointError> {
    let tensors: Vec<(String, Raw)> = params
        .specs()
        .iter()
        .zip(params.tensors())
        .map(|(s, t)| {
            let raw = match t {
                Tensor::F32(v) => raw_f32(&s.shape, v),
                Tensor::I64(n) => Raw {
                    dtype: Dtype::I64,
                    shape: vec![],
                    bytes: n.to_le_bytes().to_vec(),
                },
            };
            (s.name.clone(), raw)
        })
        .collect();
    let bytes = encode(path, &tensors, base_metadata("weights", model))?;
    write(path, &bytes)
}

/// Reads weights for these specs. Every spec must be in the file with its shape and
/// dtype, and the file must hold nothing else; all differences are reported at once.
/// Metadata is not required (files written by PyTorch load as well).
pub fn load_weights(path: &Path, specs: &[ParamSpec]) -> Result<Params, CheckpointError> {
    let bytes = read(path)?;
    let st = parse(path, &bytes)?;
    let expected: Vec<(String, Dtype, Vec<usize>)> = specs
        .iter()
        .map(|s| {
            if is_counter(s.kind) {
                (s.name.clone(), Dtype::I64, vec![])
            } else {
                (s.name.clone(), Dtype::F32, s.shape.clone())
            }
        })
        .collect();
    check_tensors(path, &st, &expected)?;
    let mut tensors = Vec::with_capacity(specs.len());
    for (name, dtype, _) in &expected {
        let data = tensor_bytes(path, &st, name)?;
        tensors.push(if *dtype == Dtype::I64 {
            let mut b = [0u8; 8];
            if let Some(c) = data.chunks_exact(8).next() {
                b.copy_from_slice(c);
            }
            Tensor::I64(i64::from_le_bytes(b))
        } else {
            Tensor::F32(f32s(data))
        });
    }
    Params::from_tensors(specs, tensors).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes the optimizer's state for the trainable parameters of `params`, with the
/// step count and the training position in the metadata, atomically.
pub fn save_optimizer(
    path: &Path,
    model: &str,
    params: &Params,
    opt: &Optimizer,
    at: TrainPoint,
) -> Result<(), CheckpointError> {
    let mut tensors = Vec::new();
    for (k, &i) in params.trainable().iter().enumerate() {
        let s = params.spec(i);
        for (slot, name) in opt.state_names().iter().enumerate() {
            tensors.push((
                format!("{}.{name}", s.name),
                raw_f32(&s.shape, opt.state(k, slot)),
            ));
        }
    }
    let mut meta = base_metadata("optimizer", model);
    let hyper = match *opt.kind() {
        Kind::Sgd {
            momentum,
            nesterov,
            weight_decay,
        } => serde_json::json!({
            "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
        }),
        Kind::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } => serde_json::json!({
            "betas": [beta1, beta2], "eps": eps, "weight_decay": weight_decay,
        }),
    };
    for (k, v) in [
        ("optimizer", opt.name().to_string()),
        ("step", opt.steps().to_string()),
        ("epoch", at.epoch.to_string()),
        ("lr", at.lr.to_string()),
        ("base_lr", opt.base_lr().to_string()),
        ("hyperparameters", hyper.to_string()),
    ] {
        meta.insert(k.to_string(), v);
    }
    let bytes = encode(path, &tensors, meta)?;
    write(path, &bytes)
}

/// Reads optimizer state written by [`save_optimizer`] into `opt` (built for the same
/// specs) and returns the step count and training position. `opt` is left unchanged
/// on any error.
pub fn load_optimizer(
    path: &Path,
    specs: &[ParamSpec],
    opt: &mut Optimizer,
) -> Result<OptimizerMeta, CheckpointError> {
    let bytes = read(path)?;
    let st = parse(path, &bytes)?;
    let meta = metadata_of(path, &bytes)?;
    let found = meta.get("optimizer").cloned().unwrap_or_default();
    if found != opt.name() {
        return Err(CheckpointError::WrongOptimizer {
            path: path.to_path_buf(),
            expected: opt.name().to_string(),
            found: if found.is_empty() {
                "no".to_string()
            } else {
                found
            },
        });
    }
    let field = |key: &'static str| -> Result<&str, CheckpointError> {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| CheckpointError::Metadata {
                path: path.to_path_buf(),
                key,
                reason: "it is missing".to_string(),
            })
    };
    let bad = |key: &'static str, e: &dyn fmt::Display| CheckpointError::Metadata {
        path: path.to_path_buf(),
        key,
        reason: e.to_string(),
    };
    let step: u64 = field("step")?.parse().map_err(|e| bad("step", &e))?;
    let epoch: u64 = field("epoch")?.parse().map_err(|e| bad("epoch", &e))?;
    let lr: f32 = field("lr")?.parse().map_err(|e| bad("lr", &e))?;

    let trainable: Vec<&ParamSpec> = specs.iter().filter(|s| s.trainable).collect();
    let mut expected = Vec::new();
    for s in &trainable {
        for name in opt.state_names() {
            expected.push((format!("{}.{name}", s.name), Dtype::F32, s.shape.clone()));
        }
    }
    check_tensors(path, &st, &expected)?;
    let mut values = Vec::with_capacity(expected.len());
    for (name, _, _) in &expected {
        values.push(f32s(tensor_bytes(path, &st, name)?));
    }
    if trainable.len() != opt.num_params() {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "the optimizer was built for {} parameters, the model trains {}",
                opt.num_params(),
                trainable.len()
            ),
        });
    }
    let slots = opt.state_names().len();
    for (j, v) in values.into_iter().enumerate() {
        opt.state_mut(j / slots, j % slots).copy_from_slice(&v);
    }
    opt.set_steps(step);
    Ok(OptimizerMeta { step, epoch, lr })
}

/// The `__metadata__` of a safetensors file (empty if it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let bytes = read(path)?;
    parse(path, &bytes)?;
    metadata_of(path, &bytes)
}

fn metadata_of(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        action: "read",
        source,
    })
}

/// Checks the framing (header length, JSON header, data size) so that a cut or
/// foreign file gets a precise error, then lets safetensors validate the rest.
fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    let not = |reason: String| CheckpointError::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let size = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(not(if bytes.is_empty() {
            "it is empty".to_string()
        } else {
            format!("it has only {size} bytes")
        }));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(b);
    if !(2..=MAX_HEADER).contains(&n) || bytes.get(8).is_some_and(|&c| c != b'{') {
        return Err(not(
            "it does not start with a header length and a JSON header".to_string(),
        ));
    }
    let truncated = |needed: u64| CheckpointError::Truncated {
        path: path.to_path_buf(),
        size,
        needed,
    };
    let header_end = 8 + n;
    let Some(header) = bytes.get(8..header_end as usize) else {
        return Err(truncated(header_end));
    };
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let json: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| corrupt(format!("its header is not valid JSON: {e}")))?;
    let data_end = json
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| *k != "__metadata__")
                .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let needed = header_end.saturating_add(data_end);
    if needed > size {
        return Err(truncated(needed));
    }
    if needed < size {
        return Err(corrupt(format!(
            "{} bytes follow the last tensor",
            size - needed
        )));
    }
    SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))
}

fn describe(dtype: Dtype, shape: &[usize]) -> String {
    format!("{dtype:?} {shape:?}")
}

/// Compares the file's tensors with the expected (name, dtype, shape) list.
fn check_tensors(
    path: &Path,
    st: &SafeTensors<'_>,
    expected: &[(String, Dtype, Vec<usize>)],
) -> Result<(), CheckpointError> {
    let found: BTreeMap<String, (Dtype, Vec<usize>)> = st
        .iter()
        .map(|(n, v)| (n.to_string(), (v.dtype(), v.shape().to_vec())))
        .collect();
    let mut m = TensorMismatch::default();
    for (name, dtype, shape) in expected {
        match found.get(name) {
            None => m.missing.push(name.clone()),
            Some((d, s)) if d != dtype || s != shape => m.wrong.push(WrongTensor {
                name: name.clone(),
                expected: describe(*dtype, shape),
                found: describe(*d, s),
            }),
            Some(_) => {}
        }
    }
    let names: std::collections::HashSet<&str> =
        expected.iter().map(|(n, _, _)| n.as_str()).collect();
    m.unexpected = found
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .cloned()
        .collect();
    if m.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            mismatch: m,
        })
    }
}

/// The bytes of a tensor already checked to exist with the expected shape and dtype.
fn tensor_bytes<'a>(
    path: &Path,
    st: &SafeTensors<'a>,
    name: &str,
) -> Result<&'a [u8], CheckpointError> {
    st.tensor(name)
        .map(|v| v.data())
        .map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b.copy_from_slice(c);
            f32::from_le_bytes(b)
        })
        .collect()
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new
/// one: a temporary file in the same folder, fsync, rename over `path`, fsync of the
/// folder. The temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path has no file name",
        ));
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_compiler::checked;
    use cnnc_compiler::params::ParamKind;

    fn spec(name: &str, shape: &[usize], kind: ParamKind, layer: usize) -> ParamSpec {
        ParamSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            layer,
            trainable: kind.is_trainable(),
            fan_in: shape.iter().skip(1).product::<usize>().max(1),
            init: None,
        }
    }

    fn specs() -> Vec<ParamSpec> {
        vec![
            spec("c1.weight", &[4, 1, 3, 3], ParamKind::Weight, 0),
            spec("c1.bias", &[4], ParamKind::Bias, 0),
            spec("bn1.weight", &[4], ParamKind::Gamma, 1),
            spec("bn1.bias", &[4], ParamKind::Beta, 1),
            spec("bn1.running_mean", &[4], ParamKind::RunningMean, 1),
            spec("bn1.running_var", &[4], ParamKind::RunningVar, 1),
            spec("bn1.num_batches_tracked", &[], ParamKind::BatchesTracked, 1),
            spec("fc.weight", &[3, 4], ParamKind::Weight, 2),
            spec("fc.bias", &[3], ParamKind::Bias, 2),
        ]
    }

    fn params() -> Params {
        let mut p = Params::init(&specs(), 5).unwrap();
        // Values that must survive bit for bit.
        p.data_mut(4)
            .copy_from_slice(&[-0.0, f32::MIN_POSITIVE / 4.0, 1e30, -7.25]);
        p.data_mut(5)
            .copy_from_slice(&[f32::INFINITY, 0.5, f32::EPSILON, 3.0]);
        p.set_counter(6, 123_456_789_012);
        p
    }

    fn bits(p: &Params) -> Vec<Vec<u32>> {
        (0..p.len())
            .map(|i| p.data(i).iter().map(|x| x.to_bits()).collect())
            .collect()
    }

    fn mismatch(e: CheckpointError) -> TensorMismatch {
        match e {
            CheckpointError::Mismatch { mismatch, .. } => mismatch,
            e => panic!("expected a mismatch, got {e}"),
        }
    }

    #[test]
    fn weights_round_trip_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let p = params();
        save_weights(&path, "net", &p).unwrap();
        let q = load_weights(&path, &specs()).unwrap();
        assert_eq!(bits(&p), bits(&q));
        assert_eq!(q.counter(6), Some(123_456_789_012));
        // Saving again over the file replaces it and leaves no temporary file.
        save_weights(&path, "net", &q).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let meta = read_metadata(&path).unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["cnnc_format"], "weights");
        assert_eq!(meta["cnnc_format_version"], FORMAT_VERSION);
        assert_eq!(meta["model"], "net");
    }

    #[test]
    fn weights_file_has_pytorch_dtypes_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_weights(&path, "net", &params()).unwrap();
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let c = st.tensor("c1.weight").unwrap();
        assert_eq!((c.dtype(), c.shape()), (Dtype::F32, &[4usize, 1, 3, 3][..]));
        let n = st.tensor("bn1.num_batches_tracked").unwrap();
        assert_eq!((n.dtype(), n.shape()), (Dtype::I64, &[][..]));
        assert_eq!(st.len(), 9);
    }

    #[test]
    fn load_reports_every_missing_extra_and_misshaped_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut s = specs();
        s.remove(1); // c1.bias missing
        s.remove(4); // bn1.running_var missing
        s[0].shape = vec![4, 3, 3, 1]; // c1.weight: same size, other shape
        s.push(spec("fc2.weight", &[2, 3], ParamKind::Weight, 3)); // unexpected
        save_weights(&path, "net", &Params::init(&s, 0).unwrap()).unwrap();
        let e = load_weights(&path, &specs()).unwrap_err();
        let text = e.to_string();
        let m = mismatch(e);
        assert_eq!(m.missing, vec!["c1.bias", "bn1.running_var"]);
        assert_eq!(m.unexpected, vec!["fc2.weight"]);
        assert_eq!(
            m.wrong,
            vec![WrongTensor {
                name: "c1.weight".into(),
                expected: "F32 [4, 1, 3, 3]".into(),
                found: "F32 [4, 3, 3, 1]".into(),
            }]
        );
        assert!(text.contains("w.safetensors"), "{text}");
        assert!(
            text.contains("missing c1.bias, bn1.running_var; unexpected fc2.weight; c1.weight is F32 [4, 3, 3, 1] in the file, the model needs F32 [4, 1, 3, 3]"),
            "{text}"
        );
    }

    #[test]
    fn load_checks_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut s = specs();
        s[6].kind = ParamKind::RunningMean; // num_batches_tracked written as F32 [] ...
        s[6].shape = vec![];
        save_weights(&path, "net", &Params::init(&s, 0).unwrap()).unwrap();
        let m = mismatch(load_weights(&path, &specs()).unwrap_err());
        assert_eq!(m.wrong.len(), 1);
        assert_eq!(m.wrong[0].found, "F32 []");
        assert_eq!(m.wrong[0].expected, "I64 []");
    }

    #[test]
    fn load_rejects_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_weights(&path, "net", &params()).unwrap();
        let bytes = fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        // Cut in the data, then in the header.
        for len in [bytes.len() - 1, bytes.len() / 2, 20] {
            fs::write(&cut, &bytes[..len]).unwrap();
            match load_weights(&cut, &specs()) {
                Err(CheckpointError::Truncated { size, needed, .. }) => {
                    assert_eq!(size, len as u64);
                    assert!(needed > size);
                }
                other => panic!("{len}: {other:?}"),
            }
        }
        // Trailing bytes are corruption too.
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 4]);
        fs::write(&cut, &long).unwrap();
        assert!(matches!(
            load_weights(&cut, &specs()),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[test]
    fn load_rejects_garbage_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        for bytes in [
            b"PK\x03\x04 this is a zip file, not tensors".to_vec(),
            (0..=255u8).cycle().take(3000).collect(),
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!".to_vec(),
            vec![1, 2, 3],
            vec![],
        ] {
            fs::write(&path, &bytes).unwrap();
            let e = load_weights(&path, &specs()).unwrap_err();
            assert!(
                matches!(e, CheckpointError::NotSafetensors { .. }),
                "{bytes:?}: {e}"
            );
            assert!(e.to_string().contains("g.safetensors"));
        }
        // A JSON header that is not valid safetensors metadata.
        let header = br#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 4]);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            load_weights(&path, &specs()),
            Err(CheckpointError::Corrupt { .. })
        ));
        let e = load_weights(&dir.path().join("none.safetensors"), &specs()).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }));
        assert!(e.to_string().starts_with("cannot read `"), "{e}");
    }

    fn adam_cfg() -> checked::Optimizer {
        checked::Optimizer::Adam {
            lr: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    #[test]
    fn optimizer_state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let mut s = specs();
        s[1].trainable = false; // frozen: no state
        let mut p = Params::init(&s, 1).unwrap();
        let mut opt = Optimizer::new(&adam_cfg(), &s);
        let grads: Vec<Vec<f32>> = p
            .trainable()
            .iter()
            .map(|&i| (0..p.data(i).len()).map(|k| k as f32 * 0.1 - 0.2).collect())
            .collect();
        opt.step(&mut p, &grads, 0.01);
        opt.step(&mut p, &grads, 0.01);
        let at = TrainPoint {
            epoch: 3,
            lr: 0.005,
        };
        save_optimizer(&path, "net", &p, &opt, at).unwrap();

        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<_> = st.names().into_iter().map(String::from).collect();
        names.sort();
        assert_eq!(names.len(), 10);
        assert!(names.contains(&"c1.weight.exp_avg_sq".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("c1.bias")));
        let meta = read_metadata(&path).unwrap();
        assert_eq!(meta["optimizer"], "adam");
        assert_eq!(meta["step"], "2");
        assert_eq!(meta["cnnc_format"], "optimizer");

        let mut fresh = Optimizer::new(&adam_cfg(), &s);
        let got = load_optimizer(&path, &s, &mut fresh).unwrap();
        assert_eq!(
            got,
            OptimizerMeta {
                step: 2,
                epoch: 3,
                lr: 0.005
            }
        );
        assert_eq!(fresh, opt);

        // Loading into another optimizer, or for other specs, fails and changes nothing.
        let sgd = checked::Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut other = Optimizer::new(&sgd, &s);
        let before = other.clone();
        let e = load_optimizer(&path, &s, &mut other).unwrap_err();
        assert!(matches!(e, CheckpointError::WrongOptimizer { .. }), "{e}");
        assert_eq!(other, before);
        let all = specs();
        let mut fresh = Optimizer::new(&adam_cfg(), &all);
        let before = fresh.clone();
        let m = mismatch(load_optimizer(&path, &all, &mut fresh).unwrap_err());
        assert_eq!(m.missing, vec!["c1.bias.exp_avg", "c1.bias.exp_avg_sq"]);
        assert_eq!(fresh, before);
    }

    #[test]
    fn optimizer_file_for_plain_sgd_has_no_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let s = specs();
        let p = Params::init(&s, 1).unwrap();
        let cfg = checked::Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut opt = Optimizer::new(&cfg, &s);
        opt.set_steps(7);
        save_optimizer(&path, "net", &p, &opt, TrainPoint { epoch: 1, lr: 0.1 }).unwrap();
        let mut fresh = Optimizer::new(&cfg, &s);
        assert_eq!(load_optimizer(&path, &s, &mut fresh).unwrap().step, 7);
        assert_eq!(fresh.steps(), 7);
    }

    #[test]
    fn atomic_write_failure_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        fs::write(&path, b"old").unwrap();
        // Renaming a file over a non-empty folder fails.
        let target = dir.path().join("sub");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }
}
