//! Errors from loading data: each names the file or folder and says what is wrong
//! with it, in words a user can act on.

use std::path::PathBuf;

/// A data source that cannot be loaded, or augmentation settings that do not fit
/// the data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder the data source needs does not exist.
    #[error("{what} not found: {}", path.display())]
    NotFound { what: &'static str, path: PathBuf },

    /// A path that must be a folder is a file.
    #[error("{} is not a folder", path.display())]
    NotAFolder { path: PathBuf },

    /// The operating system refused to read a file or folder.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that starts like gzip but does not decompress.
    #[error("{}: corrupt or truncated gzip data ({source})", path.display())]
    Gzip {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An IDX file whose first four bytes are not the expected magic number.
    #[error(
        "{} is not an IDX {kind} file: it starts with {found:#010x}, expected {expected:#010x}",
        path.display()
    )]
    BadMagic {
        path: PathBuf,
        kind: &'static str,
        expected: u32,
        found: u32,
    },

    /// An IDX file that ends inside its header.
    #[error(
        "{} is too short for an IDX header: it has {actual} bytes, the header needs {expected}",
        path.display()
    )]
    ShortHeader {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// An IDX file with less data than its header promises.
    #[error(
        "{} is truncated: its header promises {expected} bytes of data, the file holds {actual}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// An IDX file with more data than its header promises.
    #[error(
        "{} has more data than its header promises: expected {expected} bytes after the header, found more",
        path.display()
    )]
    TrailingData { path: PathBuf, expected: u64 },

    /// An IDX header with unusable dimensions.
    #[error("{}: {message}", path.display())]
    BadHeader { path: PathBuf, message: String },

    /// Image and label files that disagree on the number of items.
    #[error(
        "{} has {n_images} images but {} has {n_labels} labels",
        images.display(),
        labels.display()
    )]
    CountMismatch {
        images: PathBuf,
        n_images: u64,
        labels: PathBuf,
        n_labels: u64,
    },

    /// A label that is not a class id.
    #[error(
        "{}: label {label} of item {index} is out of range (classes are 0 to {})",
        path.display(),
        classes - 1
    )]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u32,
        classes: usize,
    },

    /// A folder data set with no class sub-folders.
    #[error(
        "{} has no class sub-folders: put the images of each class in a sub-folder named after the class",
        path.display()
    )]
    NoClasses { path: PathBuf },

    /// A class sub-folder with no images in it.
    #[error("class folder {} has no PNG or JPEG images", path.display())]
    EmptyClass { path: PathBuf },

    /// An image file that cannot be decoded.
    #[error("cannot read image {}: {source}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// An image whose size differs from the first image's.
    #[error(
        "{} is {}×{} but {} is {}×{}: all images must have the same size",
        path.display(), size.0, size.1, first.display(), first_size.0, first_size.1
    )]
    SizeMismatch {
        path: PathBuf,
        size: (u32, u32),
        first: PathBuf,
        first_size: (u32, u32),
    },

    /// A test folder with a class the training folder does not have.
    #[error(
        "test folder {} has class `{class}`, which the training folder {} does not have",
        test.display(),
        train.display()
    )]
    UnknownTestClass {
        test: PathBuf,
        train: PathBuf,
        class: String,
    },

    /// Holding out a fraction of each class left no test images.
    #[error(
        "holding out {split} of the images in {} leaves no test images: add images, or give a test folder",
        path.display()
    )]
    EmptySplit { path: PathBuf, split: f64 },

    /// A size that does not fit in memory on this machine.
    #[error("{what} is too large for this machine")]
    TooLarge { what: String },

    /// Augmentation or batch settings that do not fit the data.
    #[error("{0}")]
    Settings(String),
}
