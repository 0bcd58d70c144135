//! Training data: loading a `train { data = … }` source into memory as train and
//! test sets, and cutting them into (shuffled, augmented) batches.
//!
//! - [`load`] reads MNIST IDX files ([`mnist`]), image folders ([`folder`]) or
//!   makes the synthetic localisation set ([`shapes`]) and returns [`Splits`].
//! - [`Loader`] turns a [`Dataset`] into [`Batch`]es: training batches in a
//!   seeded shuffled order with per-sample augmentation, evaluation batches in
//!   order. Every random choice comes from a ChaCha8 stream keyed by the seed, the
//!   epoch and the sample index, so results do not depend on the thread count.
//!
//! Bad files never panic: every problem is a [`DataError`] that names the file.

mod augment;
mod error;
pub mod folder;
mod loader;
pub mod mnist;
pub(crate) mod rng;
pub mod shapes;

use std::path::Path;

use cnnc_compiler::checked::DataSource;

pub use augment::{crop, hflip, normalize, Augmenter, Op};
pub use error::DataError;
pub use loader::{Batch, Batches, Loader};

/// Images and labels held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `[C, H, W]` of one image.
    pub shape: [usize; 3],
    /// Number of classes; every label is below it.
    pub classes: usize,
    /// `N × C × H × W` values, row-major (NCHW), scaled to `[0, 1]`.
    pub images: Vec<f32>,
    /// `N` class ids.
    pub labels: Vec<u32>,
    /// `N × H × W` object masks (0 or 1) when the data set knows where the
    /// object is (the synthetic `shapes` set).
    pub masks: Option<Vec<u8>>,
    /// A name for each class id.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values in one image: `C × H × W`.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Image `i` as `C × H × W` values.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The object mask of image `i` (`H × W`), when the data set has masks.
    pub fn mask(&self, i: usize) -> Option<&[u8]> {
        let n = self.shape[1] * self.shape[2];
        self.masks.as_ref().map(|m| &m[i * n..(i + 1) * n])
    }

    /// Number of images of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// The training set and the held-out test set.
#[derive(Clone, Debug, PartialEq)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

/// Loads a data source. Paths in the model file are relative to `base_dir`, the
/// model file's folder.
pub fn load(source: &DataSource, base_dir: &Path) -> Result<Splits, DataError> {
    match source {
        DataSource::Mnist { path } => mnist::load(&base_dir.join(path)),
        DataSource::Folder { train, test, split } => folder::load(
            &base_dir.join(train),
            test.as_ref().map(|t| base_dir.join(t)).as_deref(),
            *split,
        ),
        DataSource::Shapes {
            n,
            size,
            rgb,
            classes,
        } => {
            let n = usize::try_from(*n).map_err(|_| DataError::TooLarge {
                what: format!("shapes(n={n})"),
            })?;
            let size = usize::try_from(*size).map_err(|_| DataError::TooLarge {
                what: format!("shapes(size={size})"),
            })?;
            shapes::generate(&shapes::ShapesConfig {
                n,
                size,
                rgb: *rgb,
                classes: *classes as usize,
            })
        }
    }
}
