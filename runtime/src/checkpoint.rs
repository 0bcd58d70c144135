//! Checkpoints as safetensors files: model weights with PyTorch's names, layouts and
//! dtypes (loadable by `load_state_dict` of the equivalent `torch.nn` module), and
//! the rest of the training state, enough for `cnnc run --resume` to continue a run
//! bit for bit. Loading checks the whole file before it returns anything; writing is
//! atomic (temp file, fsync, rename, fsync of the folder).
//!
//! # A checkpoint is a pair of files
//!
//! `checkpoints/<stem>.safetensors` (the weights) and
//! `checkpoints/<stem>.optimizer.safetensors` (the training state), where `<stem>` is
//! `epoch-NNNN` (after epoch NNNN, with `checkpoint = every(epochs=N, keep=K)`) or
//! `final`. Two files rather than one, so that the weights file holds only the
//! model's tensors and loads into PyTorch as it is.
//!
//! Weights file: one tensor per [`ParamSpec`], named as the spec (`c1.weight`,
//! `bn1.running_var`), `F32` in the spec's shape, except `*.num_batches_tracked`:
//! `I64`, shape `[]` (so batchnorm statistics and counters are in it). Metadata
//! (`__metadata__`, all strings): `format` = `pt` (what `safetensors.torch`
//! writes), `cnnc_format` = `weights`, `cnnc_format_version` = [`FORMAT_VERSION`],
//! `cnnc_version`, `model` (the model's name), `cnnc_checksum`; in a checkpoint also
//! `model_fingerprint`, `step` and `epoch` (as below).
//!
//! State file: for each trainable parameter `P` and each state tensor of the
//! optimizer, `P.momentum_buffer` (SGD with momentum) or `P.exp_avg` and
//! `P.exp_avg_sq` (Adam, AdamW), `F32` in `P`'s shape. Metadata: as above with
//! `cnnc_format` = `optimizer`, plus `optimizer` (`sgd`, `adam`, `adamw`),
//! `hyperparameters` (a JSON object), `base_lr`, `step` (training steps taken),
//! `optimizer_step` (the optimizer's own count, PyTorch's `state['step']`), `epoch`
//! (epochs completed), `epochs` (the epochs the run was planned for: the schedule's
//! horizon), `lr` (the learning rate of the last step), `train_images`,
//! `model_fingerprint`, `train`, and `weights_checksum` (the `cnnc_checksum` of the
//! weights file saved with it).
//!
//! `cnnc_checksum` is the CRC-32 (IEEE, as in gzip) in 8 lowercase hex digits of the
//! header without that entry, as compact JSON with sorted keys, followed by the
//! tensor data. Every load verifies it when it is there (files written by PyTorch
//! have none), so a changed byte anywhere in the file is an error, never a silent
//! change of a weight.
//!
//! # Complete checkpoints
//!
//! A save writes the weights file first and the state file second, each atomically:
//! the state file is the commit record. A checkpoint is *complete* when both files
//! exist, pass their checksums, have this format version, and agree: the state
//! file's `weights_checksum` is the weights file's `cnnc_checksum`, with the same
//! `step` and `epoch`. A save cut short (the process killed, the disk full) leaves
//! the pair incomplete — one file missing, or a new weights file beside the state
//! file of an older save — and [`resume`] passes over it to the newest complete one,
//! saying so. Halves of two saves are never combined. A file that is present but
//! damaged (truncated, a flipped bit, another format) is an error, not skipped:
//! atomic writes never leave such a file, so something else is wrong.
//!
//! # Why this is the whole training state
//!
//! - Weights, batchnorm running statistics and `num_batches_tracked`: the weights
//!   file. Optimizer moments and step count: the state file.
//! - The learning-rate schedule has no state: [`crate::optim::Schedule::lr_at`] is a
//!   function of the base rate, `step`, the steps per epoch (fixed by the data and
//!   the batch size) and `epochs`.
//! - No random generator carries state from step to step: shuffling is keyed by
//!   (seed, epoch), augmentation by (seed, epoch, sample), dropout masks by (seed,
//!   step), and initialisation happens once, before the first step. The seed is part
//!   of `train`, so `step` and `epoch` restore every stream.
//! - Clip statistics are summed per epoch and reset when the epoch's metrics line is
//!   written; checkpoints are taken at the end of an epoch, when nothing is pending.
//! - `metrics.jsonl` is not in the checkpoint: `cnnc run` flushes it to disk before
//!   each save, and a resumed run rewrites it (atomically) with exactly the lines of
//!   epochs `1..=epoch` before it appends its own.
//!
//! # Refusing a checkpoint of another run
//!
//! `model_fingerprint` is the CRC-32 of the checked model as JSON (layers, their
//! settings and shapes); `train` is the checked `train` section as compact JSON
//! without `epochs` and `checkpoint` (which may change between the parts of a run).
//! [`resume`] refuses a checkpoint whose fingerprint, `train` or optimizer differ from
//! the model being run (naming the models and the settings that differ), and
//! `cnnc run` refuses one trained on another number of images.
//!
//! # Testing hook
//!
//! In debug builds only, `CNNC_TEST_SAVE_DELAY_MS=N` makes every checkpoint save
//! slower: each file is written in two halves N ms apart, and the state file is
//! written N ms after the weights file, so that tests can kill `cnnc run` in the
//! middle of a save (`runtime/tests/resume.rs`). Release builds ignore it.

use crate::optim::{Kind, Optimizer};
use crate::params::{is_counter, Params, Tensor};
use cnnc_compiler::checked::{CheckedModel, TrainConfig};
use cnnc_compiler::params::ParamSpec;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;

/// Version of the layout described in the module doc. Version 1 files (no
/// checksums, fingerprints or link) still load as weights, but cannot be resumed.
pub const FORMAT_VERSION: &str = "2";

/// safetensors refuses headers larger than this (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The metadata entry holding a file's checksum, and its value while the checksum
/// is computed (replaced in place: same length).
const CHECKSUM_KEY: &str = "cnnc_checksum";
const CHECKSUM_PLACEHOLDER: &str = "00000000";

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
    #[error(
        "`{}` has checkpoint format {found}, but resuming needs format {FORMAT_VERSION}\n\
         help: it was written by another version of cnnc; its weights still load with --init",
        path.display()
    )]
    Version { path: PathBuf, found: String },
    #[error("{}", no_checkpoint_text(.dir, .incomplete))]
    NoCheckpoint {
        dir: PathBuf,
        incomplete: Vec<Skipped>,
    },
    #[error("{0}")]
    OtherModel(Box<OtherModel>),
    #[error(
        "checkpoint `{}` was written with other train settings: {} differ{}\n\
         help: resuming continues the same run, so only `epochs` and `checkpoint` may \
         change; start a new run without --resume to train with the new settings",
        path.display(),
        fields.join(", "),
        if fields.len() == 1 { "s" } else { "" }
    )]
    OtherTrain { path: PathBuf, fields: Vec<String> },
}

/// A checkpoint of another model than the one being run.
#[derive(Debug)]
pub struct OtherModel {
    /// The checkpoint (`…/checkpoints/epoch-0003`).
    pub path: PathBuf,
    pub saved_model: String,
    pub saved_fingerprint: String,
    pub model: String,
    pub fingerprint: String,
    /// How the checkpoint's tensors differ from the model's, if they do.
    pub tensors: Option<TensorMismatch>,
}

impl fmt::Display for OtherModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checkpoint `{}` was written for another model: `{}` (fingerprint {}), but this \
             file's model is `{}` (fingerprint {})",
            self.path.display(),
            self.saved_model,
            self.saved_fingerprint,
            self.model,
            self.fingerprint
        )?;
        if let Some(m) = self.tensors.as_ref().filter(|m| !m.is_empty()) {
            write!(f, "; its tensors differ: {m}")?;
        }
        write!(
            f,
            "\nhelp: resume with the model file that made the checkpoint, or start a new \
             run without --resume"
        )
    }
}

/// A save passed over by [`resume`], and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    /// `epoch-0004`, `final`.
    pub stem: String,
    pub reason: String,
}

fn no_checkpoint_text(dir: &Path, incomplete: &[Skipped]) -> String {
    let mut text = format!(
        "there is no complete checkpoint to resume from in `{}`",
        dir.display()
    );
    for s in incomplete {
        text.push_str(&format!("\nnote: `{}` is incomplete: {}", s.stem, s.reason));
    }
    text.push_str(
        "\nhelp: a run saves a checkpoint after every N epochs when its train section says \
         `checkpoint = every(epochs=N)`, and `final` when it ends; without one, start \
         again without --resume (with --overwrite to reuse the folder)",
    );
    text
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

/// What a checkpoint must have been written for: the model and the train settings
/// that decide the numbers (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct RunIdentity {
    /// The model's name.
    pub model: String,
    /// CRC-32 of the checked model as JSON, 8 hex digits.
    pub fingerprint: String,
    /// The checked `train` section as compact JSON (sorted keys) without `epochs`
    /// and `checkpoint`.
    pub train: String,
}

impl RunIdentity {
    pub fn new(
        model: &CheckedModel,
        train: &TrainConfig,
    ) -> Result<RunIdentity, serde_json::Error> {
        let model_json = serde_json::to_string(model)?;
        let mut t = serde_json::to_value(train)?;
        if let Some(o) = t.as_object_mut() {
            o.remove("epochs");
            o.remove("checkpoint");
        }
        Ok(RunIdentity {
            model: model.name.clone(),
            fingerprint: format!("{:08x}", crc32fast::hash(model_json.as_bytes())),
            train: serde_json::to_string(&t)?,
        })
    }
}

/// Where a run stands when a checkpoint is taken (the state file's metadata).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainState {
    /// Training steps taken.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// The epochs the run was planned for (the schedule's horizon).
    pub epochs: u64,
    /// The learning rate of the last step.
    pub lr: f32,
    /// Training images per epoch.
    pub train_images: u64,
    /// Steps skipped so far for non-finite values (`on_nonfinite = skip`): the
    /// budget a resumed run continues from.
    pub nonfinite_skipped: u64,
}

/// What [`load_optimizer`] read besides the state tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerMeta {
    /// Training steps taken (for a version 1 file: the optimizer's step count).
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

/// Serialises tensors and metadata with a canonical header and a checksum; returns
/// the file's bytes and its checksum.
fn encode(
    path: &Path,
    tensors: &[(String, Raw)],
    mut meta: HashMap<String, String>,
) -> Result<(Vec<u8>, String), CheckpointError> {
    let fail = |reason: String| CheckpointError::Encode {
        path: path.to_path_buf(),
        reason,
    };
    meta.insert(CHECKSUM_KEY.to_string(), CHECKSUM_PLACEHOLDER.to_string());
    let bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (n, r)), Some(meta))
        .map_err(|e| fail(e.to_string()))?;
    let mut bytes = canonical_header(bytes).map_err(fail)?;
    let (sum, _) = checksum(path, &bytes)?;
    // The canonical header is compact JSON: the entry appears exactly like this.
    let entry = format!("\"{CHECKSUM_KEY}\":\"{CHECKSUM_PLACEHOLDER}\"");
    let n = header_len(&bytes).unwrap_or(0);
    let at = bytes
        .get(8..8 + n)
        .and_then(|h| h.windows(entry.len()).position(|w| w == entry.as_bytes()))
        .ok_or_else(|| fail("the checksum entry is not in the header".to_string()))?;
    let start = 8 + at + entry.len() - 1 - CHECKSUM_PLACEHOLDER.len();
    bytes[start..start + sum.len()].copy_from_slice(sum.as_bytes());
    Ok((bytes, sum))
}

/// The length of the JSON header of safetensors bytes.
fn header_len(bytes: &[u8]) -> Option<usize> {
    let len_bytes: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    usize::try_from(u64::from_le_bytes(len_bytes)).ok()
}

/// Rewrites the JSON header with its keys in sorted order. `safetensors` writes
/// the metadata map in hash order, so two saves of the same tensors would differ
/// byte for byte; sorted, equal checkpoints are equal files. Reordering keeps the
/// header's length, so every data offset stays valid.
fn canonical_header(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let n = header_len(&bytes).ok_or("no header")?;
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

/// The checksum of safetensors bytes (already framed by [`parse`]), as defined in
/// the module doc, and the value stored in them, if any.
fn checksum(path: &Path, bytes: &[u8]) -> Result<(String, Option<String>), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let n = header_len(bytes).ok_or_else(|| corrupt("no header".to_string()))?;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| corrupt("short header".to_string()))?;
    let mut value: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| corrupt(format!("its header is not valid JSON: {e}")))?;
    let stored = value
        .get_mut("__metadata__")
        .and_then(serde_json::Value::as_object_mut)
        .and_then(|m| m.remove(CHECKSUM_KEY))
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            v => v.to_string(),
        });
    let canonical = serde_json::to_string(&value).map_err(|e| corrupt(e.to_string()))?;
    let mut h = crc32fast::Hasher::new();
    h.update(canonical.as_bytes());
    h.update(&bytes[8 + n..]);
    Ok((format!("{:08x}", h.finalize()), stored))
}

/// Checks the framing, then the checksum. Files written by PyTorch (no `cnnc_`
/// metadata) and by cnnc's format 1 have none; any other file written by cnnc must
/// have one, so that damage to the checksum's own key is caught as well.
fn parse_verified<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    let st = parse(path, bytes)?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    match checksum(path, bytes)? {
        (computed, Some(stored)) if computed != stored => {
            return Err(corrupt(format!(
                "its checksum does not match its contents (stored {stored}, computed \
                 {computed}): it was changed or damaged after it was written"
            )))
        }
        (_, Some(_)) => {}
        (_, None) => {
            let meta = metadata_of(path, bytes)?;
            let by_cnnc = meta.keys().any(|k| k.starts_with("cnnc_"));
            let version = meta.get("cnnc_format_version").map(String::as_str);
            if by_cnnc && version != Some("1") {
                return Err(corrupt(format!(
                    "it was written by cnnc but has no `{CHECKSUM_KEY}`"
                )));
            }
        }
    }
    Ok(st)
}

/// How long each checkpoint save pauses (`CNNC_TEST_SAVE_DELAY_MS`, debug builds
/// only; see the module doc).
fn test_save_pause() -> Option<Duration> {
    #[cfg(debug_assertions)]
    {
        static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
        *PAUSE.get_or_init(|| {
            std::env::var("CNNC_TEST_SAVE_DELAY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis)
        })
    }
    #[cfg(not(debug_assertions))]
    {
        None
    }
}

fn write(path: &Path, bytes: &[u8], pause: Option<Duration>) -> Result<(), CheckpointError> {
    write_atomic_paced(path, bytes, pause).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    })
}

fn weight_tensors(params: &Params) -> Vec<(String, Raw)> {
    params
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
        .collect()
}

/// Writes the weights of a model (every parameter and buffer) to `path`, atomically.
pub fn save_weights(path: &Path, model: &str, params: &Params) -> Result<(), CheckpointError> {
    let (bytes, _) = encode(
        path,
        &weight_tensors(params),
        base_metadata("weights", model),
    )?;
    write(path, &bytes, None)
}

/// The weights file of checkpoint `stem` in `dir`.
pub fn weights_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.safetensors"))
}

/// The state file of checkpoint `stem` in `dir`.
pub fn state_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.optimizer.safetensors"))
}

/// Saves checkpoint `stem` in `dir`: the weights file, then the state file that
/// completes it (see the module doc), each atomically.
pub fn save_checkpoint(
    dir: &Path,
    stem: &str,
    id: &RunIdentity,
    params: &Params,
    opt: &Optimizer,
    state: &TrainState,
) -> Result<(), CheckpointError> {
    let pause = test_save_pause();
    let path = weights_path(dir, stem);
    let mut meta = base_metadata("weights", &id.model);
    for (k, v) in [
        ("model_fingerprint", id.fingerprint.clone()),
        ("step", state.step.to_string()),
        ("epoch", state.epoch.to_string()),
    ] {
        meta.insert(k.to_string(), v);
    }
    let (bytes, weights_checksum) = encode(&path, &weight_tensors(params), meta)?;
    write(&path, &bytes, pause)?;
    if let Some(p) = pause {
        std::thread::sleep(p);
    }

    let path = state_path(dir, stem);
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
    let mut meta = base_metadata("optimizer", &id.model);
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
        ("hyperparameters", hyper.to_string()),
        ("base_lr", opt.base_lr().to_string()),
        ("step", state.step.to_string()),
        ("optimizer_step", opt.steps().to_string()),
        ("epoch", state.epoch.to_string()),
        ("epochs", state.epochs.to_string()),
        ("lr", state.lr.to_string()),
        ("train_images", state.train_images.to_string()),
        ("nonfinite_skipped", state.nonfinite_skipped.to_string()),
        ("model_fingerprint", id.fingerprint.clone()),
        ("train", id.train.clone()),
        ("weights_checksum", weights_checksum),
    ] {
        meta.insert(k.to_string(), v);
    }
    let (bytes, _) = encode(&path, &tensors, meta)?;
    write(&path, &bytes, pause)
}

/// Reads weights for these specs. Every spec must be in the file with its shape and
/// dtype, and the file must hold nothing else; all differences are reported at once.
/// Metadata is not required (files written by PyTorch load as well); a checksum, if
/// present, must match.
pub fn load_weights(path: &Path, specs: &[ParamSpec]) -> Result<Params, CheckpointError> {
    let bytes = read(path)?;
    let st = parse_verified(path, &bytes)?;
    let expected = expected_weights(specs);
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

fn expected_weights(specs: &[ParamSpec]) -> Vec<(String, Dtype, Vec<usize>)> {
    specs
        .iter()
        .map(|s| {
            if is_counter(s.kind) {
                (s.name.clone(), Dtype::I64, vec![])
            } else {
                (s.name.clone(), Dtype::F32, s.shape.clone())
            }
        })
        .collect()
}

/// A metadata value, required and parsed.
fn meta_field<T: std::str::FromStr>(
    path: &Path,
    meta: &HashMap<String, String>,
    key: &'static str,
) -> Result<T, CheckpointError>
where
    T::Err: fmt::Display,
{
    let bad = |reason: String| CheckpointError::Metadata {
        path: path.to_path_buf(),
        key,
        reason,
    };
    meta.get(key)
        .ok_or_else(|| bad("it is missing".to_string()))?
        .parse()
        .map_err(|e: T::Err| bad(e.to_string()))
}

/// Reads the optimizer state of a state file into `opt` (built for the same specs)
/// and returns the step count and training position. `opt` is left unchanged on
/// any error.
pub fn load_optimizer(
    path: &Path,
    specs: &[ParamSpec],
    opt: &mut Optimizer,
) -> Result<OptimizerMeta, CheckpointError> {
    let bytes = read(path)?;
    let st = parse_verified(path, &bytes)?;
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
    let step: u64 = meta_field(path, &meta, "step")?;
    let optimizer_step: u64 = if meta.contains_key("optimizer_step") {
        meta_field(path, &meta, "optimizer_step")?
    } else {
        step
    };
    let epoch: u64 = meta_field(path, &meta, "epoch")?;
    let lr: f32 = meta_field(path, &meta, "lr")?;

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
    opt.set_steps(optimizer_step);
    Ok(OptimizerMeta { step, epoch, lr })
}

/// The `__metadata__` of a safetensors file (empty if it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let bytes = read(path)?;
    parse_verified(path, &bytes)?;
    metadata_of(path, &bytes)
}

fn metadata_of(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// A checkpoint chosen by [`resume`] and loaded.
pub struct Resumed {
    /// `epoch-0003`, `final`.
    pub stem: String,
    pub params: Params,
    pub state: TrainState,
    /// Newer saves passed over because they are incomplete, newest first.
    pub skipped: Vec<Skipped>,
}

/// What [`probe`] found for one stem.
enum Probe {
    Complete(TrainState),
    Incomplete(String),
    /// Present but damaged, or of another format version.
    Unusable(CheckpointError),
}

/// The checkpoint stems in `dir` (`final`, `epoch-NNNN`), whichever of their files
/// exist; temporary files (`.name.tmp-…`) and anything else are ignored.
fn stems(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: dir.to_path_buf(),
                action: "list",
                source,
            })
        }
    };
    let mut stems: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let stem = name
                .strip_suffix(".optimizer.safetensors")
                .or_else(|| name.strip_suffix(".safetensors"))?;
            (stem == "final" || epoch_of_stem(stem).is_some()).then(|| stem.to_string())
        })
        .collect();
    stems.sort();
    stems.dedup();
    Ok(stems)
}

/// `N` of `epoch-N` (digits only).
fn epoch_of_stem(stem: &str) -> Option<u64> {
    let digits = stem.strip_prefix("epoch-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The metadata of one file of a checkpoint, verified: framing, checksum, format
/// and version.
fn checked_metadata(
    path: &Path,
    content: &str,
) -> Result<HashMap<String, String>, CheckpointError> {
    let bytes = read(path)?;
    parse_verified(path, &bytes)?;
    let meta = metadata_of(path, &bytes)?;
    let version = meta.get("cnnc_format_version").map(String::as_str);
    if version != Some(FORMAT_VERSION) || !meta.contains_key(CHECKSUM_KEY) {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: version.unwrap_or("none").to_string(),
        });
    }
    if meta.get("cnnc_format").map(String::as_str) != Some(content) {
        return Err(CheckpointError::Metadata {
            path: path.to_path_buf(),
            key: "cnnc_format",
            reason: format!("expected `{content}`"),
        });
    }
    Ok(meta)
}

/// Whether checkpoint `stem` is complete, and the epoch it is at (from its name,
/// else the newer of its files' metadata; `None` if unknown).
fn probe(dir: &Path, stem: &str) -> (Option<u64>, Probe) {
    let (wp, sp) = (weights_path(dir, stem), state_path(dir, stem));
    let named = epoch_of_stem(stem);
    let epoch_in = |m: &HashMap<String, String>| m.get("epoch").and_then(|e| e.parse().ok());
    match (wp.exists(), sp.exists()) {
        (false, false) => {
            return (
                named,
                Probe::Incomplete("both of its files are missing".into()),
            )
        }
        (true, false) => {
            let epoch = named.or_else(|| epoch_in(&checked_metadata(&wp, "weights").ok()?));
            return (
                epoch,
                Probe::Incomplete(format!(
                    "`{}` is missing (the save was cut short)",
                    file_name(&sp)
                )),
            );
        }
        (false, true) => {
            let epoch = named.or_else(|| epoch_in(&checked_metadata(&sp, "optimizer").ok()?));
            return (
                epoch,
                Probe::Incomplete(format!("`{}` is missing", file_name(&wp))),
            );
        }
        (true, true) => {}
    }
    let state = match checked_metadata(&sp, "optimizer") {
        Ok(m) => m,
        Err(e) => return (named, Probe::Unusable(e)),
    };
    let epoch = named.or_else(|| epoch_in(&state));
    let weights = match checked_metadata(&wp, "weights") {
        Ok(m) => m,
        Err(e) => return (epoch, Probe::Unusable(e)),
    };
    // A pair cut short is as new as its newer half.
    let epoch = named.or_else(|| epoch.max(epoch_in(&weights)));
    let parsed = (|| -> Result<TrainState, CheckpointError> {
        Ok(TrainState {
            step: meta_field(&sp, &state, "step")?,
            epoch: meta_field(&sp, &state, "epoch")?,
            epochs: meta_field(&sp, &state, "epochs")?,
            lr: meta_field(&sp, &state, "lr")?,
            train_images: meta_field(&sp, &state, "train_images")?,
            // Absent from checkpoints written before the key existed.
            nonfinite_skipped: if state.contains_key("nonfinite_skipped") {
                meta_field(&sp, &state, "nonfinite_skipped")?
            } else {
                0
            },
        })
    })();
    let s = match parsed {
        Ok(s) => s,
        Err(e) => return (epoch, Probe::Unusable(e)),
    };
    if let Some(n) = named.filter(|&n| n != s.epoch) {
        return (
            epoch,
            Probe::Unusable(CheckpointError::Corrupt {
                path: sp,
                reason: format!("it is named after epoch {n} but holds epoch {}", s.epoch),
            }),
        );
    }
    let link = state.get("weights_checksum");
    if link != weights.get(CHECKSUM_KEY)
        || weights.get("step") != state.get("step")
        || weights.get("epoch") != state.get("epoch")
    {
        let at = |m: &HashMap<String, String>| {
            format!(
                "epoch {}, step {}",
                m.get("epoch").map_or("?", String::as_str),
                m.get("step").map_or("?", String::as_str)
            )
        };
        return (
            epoch,
            Probe::Incomplete(format!(
                "its two files come from different saves (weights at {}, optimizer state at \
                 {}): the save was cut short",
                at(&weights),
                at(&state)
            )),
        );
    }
    (Some(s.epoch), Probe::Complete(s))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Finds the newest complete checkpoint in `dir` (by epoch; `final` after an
/// `epoch-` checkpoint of the same epoch) and loads it: the weights into new
/// [`Params`] for `specs`, the optimizer state into `opt`. Newer incomplete saves
/// are passed over and listed in [`Resumed::skipped`]; a damaged newest save, a
/// checkpoint of another model or other train settings, or wrong tensors are
/// errors. Reads only; `opt` is unchanged on any error.
pub fn resume(
    dir: &Path,
    specs: &[ParamSpec],
    id: &RunIdentity,
    opt: &mut Optimizer,
) -> Result<Resumed, CheckpointError> {
    let mut found: Vec<((u64, bool), String, Probe)> = stems(dir)?
        .into_iter()
        .map(|stem| {
            let (epoch, p) = probe(dir, &stem);
            ((epoch.unwrap_or(u64::MAX), stem == "final"), stem, p)
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut skipped = Vec::new();
    let mut chosen = None;
    for (_, stem, p) in found {
        match p {
            Probe::Incomplete(reason) => skipped.push(Skipped { stem, reason }),
            Probe::Unusable(e) => return Err(e),
            Probe::Complete(state) => {
                chosen = Some((stem, state));
                break;
            }
        }
    }
    let Some((stem, state)) = chosen else {
        return Err(CheckpointError::NoCheckpoint {
            dir: dir.to_path_buf(),
            incomplete: skipped,
        });
    };
    let (wp, sp) = (weights_path(dir, &stem), state_path(dir, &stem));
    let meta = read_metadata(&sp)?;
    let saved_fingerprint = meta.get("model_fingerprint").cloned().unwrap_or_default();
    if saved_fingerprint != id.fingerprint {
        let tensors = read(&wp).ok().and_then(|bytes| {
            let st = parse(&wp, &bytes).ok()?;
            match check_tensors(&wp, &st, &expected_weights(specs)) {
                Err(CheckpointError::Mismatch { mismatch, .. }) => Some(mismatch),
                _ => None,
            }
        });
        return Err(CheckpointError::OtherModel(Box::new(OtherModel {
            path: dir.join(&stem),
            saved_model: meta.get("model").cloned().unwrap_or_default(),
            saved_fingerprint,
            model: id.model.clone(),
            fingerprint: id.fingerprint.clone(),
            tensors,
        })));
    }
    let saved_train = meta.get("train").map(String::as_str).unwrap_or("");
    if saved_train != id.train {
        return Err(CheckpointError::OtherTrain {
            path: dir.join(&stem),
            fields: differing_fields(saved_train, &id.train),
        });
    }
    let params = load_weights(&wp, specs)?;
    load_optimizer(&sp, specs, opt)?;
    Ok(Resumed {
        stem,
        params,
        state,
        skipped,
    })
}

/// The top-level keys whose values differ between two JSON objects (the whole
/// thing if either is not an object).
fn differing_fields(a: &str, b: &str) -> Vec<String> {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    let (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) =
        (parse(a), parse(b))
    else {
        return vec!["the train section".to_string()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let fields: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("`{k}`"))
        .collect();
    if fields.is_empty() {
        vec!["the train section".to_string()]
    } else {
        fields
    }
}

/// Removes what a resumed run starts without: the saves [`resume`] passed over and
/// temporary files left by interrupted writes (`.name.tmp-…`).
pub fn discard(dir: &Path, skipped: &[Skipped]) -> Result<(), CheckpointError> {
    for s in skipped {
        for p in [state_path(dir, &s.stem), weights_path(dir, &s.stem)] {
            remove_if_present(&p)?;
        }
    }
    let entries = fs::read_dir(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        action: "list",
        source,
    })?;
    for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        if name.starts_with('.') && name.contains(".tmp-") {
            remove_if_present(&dir.join(name))?;
        }
    }
    Ok(())
}

/// Removes every checkpoint and temporary file from `dir` (if it exists): a new run
/// in an old run's folder (`--overwrite`) must not leave checkpoints that a later
/// `--resume` could take for its own.
pub fn clear(dir: &Path) -> Result<(), CheckpointError> {
    let skipped: Vec<Skipped> = stems(dir)?
        .into_iter()
        .map(|stem| Skipped {
            stem,
            reason: String::new(),
        })
        .collect();
    if dir.is_dir() {
        discard(dir, &skipped)?;
    }
    Ok(())
}

/// Keeps the newest `keep` `epoch-` checkpoints in `dir` and removes the others
/// (state file first, so that a cut-short removal leaves an incomplete pair, never
/// a complete-looking one).
pub fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let mut epochs: Vec<(u64, String)> = stems(dir)?
        .into_iter()
        .filter_map(|s| Some((epoch_of_stem(&s)?, s)))
        .collect();
    epochs.sort();
    let remove = epochs.len().saturating_sub(keep);
    for (_, stem) in &epochs[..remove] {
        remove_if_present(&state_path(dir, stem))?;
        remove_if_present(&weights_path(dir, stem))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), CheckpointError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CheckpointError::Io {
            path: path.to_path_buf(),
            action: "remove",
            source,
        }),
    }
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
    write_atomic_paced(path, bytes, None)
}

/// [`write_atomic`], with a pause half-way through writing the temporary file when
/// `pause` is set (the testing hook of the module doc).
fn write_atomic_paced(path: &Path, bytes: &[u8], pause: Option<Duration>) -> io::Result<()> {
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
        match pause {
            Some(p) => {
                let (a, b) = bytes.split_at(bytes.len() / 2);
                f.write_all(a)?;
                f.flush()?;
                std::thread::sleep(p);
                f.write_all(b)?;
            }
            None => f.write_all(bytes)?,
        }
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

    fn identity() -> RunIdentity {
        RunIdentity {
            model: "net".into(),
            fingerprint: "0123abcd".into(),
            train: r#"{"optimizer":{"Adam":{}},"seed":1}"#.into(),
        }
    }

    fn state(epoch: u64) -> TrainState {
        TrainState {
            step: epoch * 4,
            epoch,
            epochs: 9,
            lr: 0.005,
            train_images: 60,
            nonfinite_skipped: epoch % 2,
        }
    }

    #[test]
    fn optimizer_state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "c");
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
        save_checkpoint(dir.path(), "c", &identity(), &p, &opt, &state(3)).unwrap();

        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<_> = st.names().into_iter().map(String::from).collect();
        names.sort();
        assert_eq!(names.len(), 10);
        assert!(names.contains(&"c1.weight.exp_avg_sq".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("c1.bias")));
        let meta = read_metadata(&path).unwrap();
        assert_eq!(meta["optimizer"], "adam");
        assert_eq!(meta["step"], "12");
        assert_eq!(meta["optimizer_step"], "2");
        assert_eq!(meta["cnnc_format"], "optimizer");
        let weights = read_metadata(&weights_path(dir.path(), "c")).unwrap();
        assert_eq!(meta["weights_checksum"], weights[CHECKSUM_KEY]);

        let mut fresh = Optimizer::new(&adam_cfg(), &s);
        let got = load_optimizer(&path, &s, &mut fresh).unwrap();
        assert_eq!(
            got,
            OptimizerMeta {
                step: 12,
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
        save_checkpoint(dir.path(), "c", &identity(), &p, &opt, &state(1)).unwrap();
        let mut fresh = Optimizer::new(&cfg, &s);
        let path = state_path(dir.path(), "c");
        assert_eq!(load_optimizer(&path, &s, &mut fresh).unwrap().step, 4);
        assert_eq!(fresh.steps(), 7);
    }

    /// Saves checkpoints after epochs `epochs` of a model whose weights differ per
    /// epoch, with keep = all.
    fn saved_run(dir: &Path, epochs: &[u64]) -> Vec<Params> {
        let s = specs();
        let opt = Optimizer::new(&adam_cfg(), &s);
        epochs
            .iter()
            .map(|&e| {
                let p = Params::init(&s, e).unwrap();
                let stem = format!("epoch-{e:04}");
                save_checkpoint(dir, &stem, &identity(), &p, &opt, &state(e)).unwrap();
                p
            })
            .collect()
    }

    fn resume_in(dir: &Path) -> Result<Resumed, CheckpointError> {
        let mut opt = Optimizer::new(&adam_cfg(), &specs());
        resume(dir, &specs(), &identity(), &mut opt)
    }

    #[test]
    fn every_changed_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_weights(&path, "net", &params()).unwrap();
        let bytes = fs::read(&path).unwrap();
        let bad = dir.path().join("bad.safetensors");
        // One flipped bit at every position (the checksum's own key too): never
        // a silent load.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            fs::write(&bad, &b).unwrap();
            assert!(
                load_weights(&bad, &specs()).is_err(),
                "byte {i} flipped loads"
            );
        }
        let e = {
            let mut b = bytes.clone();
            let last = b.len() - 1;
            b[last] ^= 0x40;
            fs::write(&bad, &b).unwrap();
            load_weights(&bad, &specs()).unwrap_err()
        };
        assert!(e.to_string().contains("checksum does not match"), "{e}");
        let (sum, stored) = checksum(&path, &bytes).unwrap();
        assert_eq!(Some(sum), stored);
        // Format 1 files (no checksum) and PyTorch's (no metadata) still load.
        let tensors = weight_tensors(&params());
        for meta in [
            Some(HashMap::from([
                ("cnnc_format".to_string(), "weights".to_string()),
                ("cnnc_format_version".to_string(), "1".to_string()),
            ])),
            None,
        ] {
            let b = safetensors::serialize(tensors.iter().map(|(n, r)| (n, r)), meta).unwrap();
            fs::write(&bad, &b).unwrap();
            assert_eq!(
                bits(&load_weights(&bad, &specs()).unwrap()),
                bits(&params())
            );
        }
    }

    #[test]
    fn resume_takes_the_newest_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let saved = saved_run(d, &[1, 2, 3, 10]);
        // epoch 10 sorts after epoch 3 by number; its state file is missing.
        fs::remove_file(state_path(d, "epoch-0010")).unwrap();
        let r = resume_in(d).unwrap();
        assert_eq!(r.stem, "epoch-0003");
        assert_eq!(r.state, state(3));
        assert_eq!(bits(&r.params), bits(&saved[2]));
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].stem, "epoch-0010");
        assert!(
            r.skipped[0].reason.contains("is missing"),
            "{:?}",
            r.skipped
        );
    }

    #[test]
    fn halves_of_two_saves_are_never_combined() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = specs();
        let opt = Optimizer::new(&adam_cfg(), &s);
        let p2 = Params::init(&s, 2).unwrap();
        save_checkpoint(d, "epoch-0002", &identity(), &p2, &opt, &state(2)).unwrap();
        save_checkpoint(d, "final", &identity(), &p2, &opt, &state(2)).unwrap();
        // A later save of `final` was cut after its weights file.
        let p4 = Params::init(&s, 4).unwrap();
        save_weights(&weights_path(d, "final"), "net", &p4).unwrap();
        let r = resume_in(d).unwrap();
        assert_eq!(r.stem, "epoch-0002");
        assert_eq!(r.skipped[0].stem, "final");
        assert!(
            r.skipped[0].reason.contains("different saves"),
            "{:?}",
            r.skipped
        );
        // A complete `final` wins over an `epoch-` checkpoint of the same epoch.
        save_checkpoint(d, "final", &identity(), &p2, &opt, &state(2)).unwrap();
        assert_eq!(resume_in(d).unwrap().stem, "final");
    }

    #[test]
    fn a_damaged_newest_checkpoint_is_an_error_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        saved_run(d, &[1, 2]);
        let wp = weights_path(d, "epoch-0002");
        let mut b = fs::read(&wp).unwrap();
        let before = b.clone();
        let k = b.len() - 5;
        b[k] ^= 0x01;
        fs::write(&wp, &b).unwrap();
        let e = resume_in(d).err().unwrap();
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
        fs::write(&wp, &before[..before.len() - 3]).unwrap();
        let e = resume_in(d).err().unwrap();
        assert!(matches!(e, CheckpointError::Truncated { .. }), "{e}");
    }

    #[test]
    fn resume_refuses_other_models_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        saved_run(d, &[1]);
        let mut opt = Optimizer::new(&adam_cfg(), &specs());
        let mut other = identity();
        other.fingerprint = "ffff0000".into();
        other.model = "Other".into();
        let mut s = specs();
        s[0].shape = vec![8, 1, 3, 3];
        let e = resume(d, &s, &other, &mut opt).err().unwrap();
        let text = e.to_string();
        assert!(matches!(e, CheckpointError::OtherModel(_)), "{text}");
        assert!(text.contains("`net`") && text.contains("`Other`"), "{text}");
        assert!(text.contains("c1.weight is F32 [4, 1, 3, 3]"), "{text}");
        let mut other = identity();
        other.train = r#"{"optimizer":{"Sgd":{}},"seed":2}"#.into();
        let e = resume(d, &specs(), &other, &mut opt).err().unwrap();
        assert!(e.to_string().contains("`optimizer`, `seed` differ"), "{e}");
        let before = opt.clone();
        let sgd = checked::Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut wrong = Optimizer::new(&sgd, &specs());
        let e = resume(d, &specs(), &identity(), &mut wrong).err().unwrap();
        assert!(matches!(e, CheckpointError::WrongOptimizer { .. }), "{e}");
        assert_eq!(opt, before);
    }

    #[test]
    fn no_checkpoint_and_old_formats_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = resume_in(d).err().unwrap();
        assert!(e.to_string().contains("no complete checkpoint"), "{e}");
        assert!(
            e.to_string().contains("checkpoint = every(epochs=N)"),
            "{e}"
        );
        saved_run(d, &[1]);
        fs::remove_file(state_path(d, "epoch-0001")).unwrap();
        let e = resume_in(d).err().unwrap();
        assert!(e.to_string().contains("`epoch-0001` is incomplete"), "{e}");
        // A weights file without the checkpoint metadata (e.g. from PyTorch).
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        saved_run(d, &[1]);
        save_weights(&weights_path(d, "epoch-0002"), "net", &params()).unwrap();
        let bytes = fs::read(state_path(d, "epoch-0001")).unwrap();
        fs::write(state_path(d, "epoch-0002"), bytes).unwrap();
        let e = resume_in(d).err().unwrap();
        assert!(e.to_string().contains("named after epoch 2"), "{e}");
    }

    #[test]
    fn prune_keeps_the_newest_by_number_and_discard_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        saved_run(d, &[8, 9, 10, 11]);
        fs::write(d.join(".epoch-0012.safetensors.tmp-1-0"), b"half").unwrap();
        prune(d, 2).unwrap();
        let names = || {
            let mut n: Vec<String> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(),
            [
                ".epoch-0012.safetensors.tmp-1-0",
                "epoch-0010.optimizer.safetensors",
                "epoch-0010.safetensors",
                "epoch-0011.optimizer.safetensors",
                "epoch-0011.safetensors"
            ]
        );
        let skipped = [Skipped {
            stem: "epoch-0011".into(),
            reason: String::new(),
        }];
        discard(d, &skipped).unwrap();
        assert_eq!(
            names(),
            ["epoch-0010.optimizer.safetensors", "epoch-0010.safetensors"]
        );
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
