//! MNIST in IDX format: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` in one folder, each
//! gzip-compressed or plain (told apart by the gzip magic bytes, not the name).
//!
//! IDX layout: big-endian magic `00 00 08 NDIM` (unsigned bytes), NDIM big-endian
//! `u32` sizes, then the data. Images are `N × 28 × 28`, labels `N`, each label a
//! digit 0 to 9. Every header field and length is checked before use, and the
//! data is read no further than the header promises (plus one byte to notice
//! trailing data), so a corrupt or hostile file cannot make the loader allocate
//! more than the header claims.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{DataError, Dataset, Splits};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Image side: MNIST-format images are 28×28.
pub const SIDE: usize = 28;
/// Digits 0 to 9.
pub const CLASSES: usize = 10;

/// The stems of the four files, with the alternative spelling some mirrors use.
const FILES: [[&str; 2]; 4] = [
    ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
];

/// Loads the train and test sets from the IDX files in `dir`.
pub fn load(dir: &Path) -> Result<Splits, DataError> {
    if !dir.exists() {
        return Err(DataError::NotFound {
            what: "MNIST folder",
            path: dir.to_path_buf(),
        });
    }
    if !dir.is_dir() {
        return Err(DataError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }
    let [train_images, train_labels, test_images, test_labels] = FILES.map(|f| find(dir, f));
    Ok(Splits {
        train: load_pair(&train_images?, &train_labels?)?,
        test: load_pair(&test_images?, &test_labels?)?,
    })
}

/// The path of one of the four files: plain or `.gz`, either spelling.
fn find(dir: &Path, stems: [&str; 2]) -> Result<PathBuf, DataError> {
    for stem in stems {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{stem}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::NotFound {
        what: "MNIST file",
        path: dir.join(format!("{}[.gz]", stems[0])),
    })
}

/// Loads an image file and its label file as one data set.
pub fn load_pair(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let (dims, pixels) = read_idx(images, IMAGES_MAGIC, "images")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows as usize != SIDE || cols as usize != SIDE {
        return Err(DataError::BadHeader {
            path: images.to_path_buf(),
            message: format!("images are {rows}×{cols}, but MNIST-format images are {SIDE}×{SIDE}"),
        });
    }
    let (ldims, label_bytes) = read_idx(labels, LABELS_MAGIC, "labels")?;
    if ldims[0] != n {
        return Err(DataError::CountMismatch {
            images: images.to_path_buf(),
            n_images: u64::from(n),
            labels: labels.to_path_buf(),
            n_labels: u64::from(ldims[0]),
        });
    }
    let labels_out = label_bytes
        .iter()
        .enumerate()
        .map(|(index, &l)| {
            if usize::from(l) < CLASSES {
                Ok(u32::from(l))
            } else {
                Err(DataError::LabelOutOfRange {
                    path: labels.to_path_buf(),
                    index,
                    label: u32::from(l),
                    classes: CLASSES,
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Dataset {
        shape: [1, SIDE, SIDE],
        classes: CLASSES,
        images: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels: labels_out,
        masks: None,
        class_names: (0..CLASSES).map(|d| d.to_string()).collect(),
    })
}

/// Reads an IDX file of unsigned bytes with the given magic number (which fixes
/// the number of dimensions): its dimensions and its data.
pub fn read_idx(
    path: &Path,
    magic: u32,
    kind: &'static str,
) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let mut r = open(path)?;
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim;
    let mut header = vec![0u8; header_len];
    let got = read_full(&mut r, &mut header).map_err(|e| read_error(path, &r, e))?;
    if got >= 4 {
        let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if found != magic {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                kind,
                expected: magic,
                found,
            });
        }
    }
    if got < header_len {
        return Err(DataError::ShortHeader {
            path: path.to_path_buf(),
            expected: header_len as u64,
            actual: got as u64,
        });
    }
    let dims: Vec<u32> = header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if dims[0] == 0 {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            message: "the file holds no items".into(),
        });
    }
    if dims.contains(&0) {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            message: format!("the header has a zero dimension: {dims:?}"),
        });
    }
    let expected = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
        .filter(|&e| usize::try_from(e).is_ok())
        .ok_or_else(|| DataError::TooLarge {
            what: format!("{} (dimensions {dims:?})", path.display()),
        })?;
    // Read at most one byte past the promised length: enough to notice extra data
    // without trusting the header with a huge allocation up front.
    let mut data = Vec::with_capacity(expected.min(1 << 26) as usize);
    (&mut r)
        .take(expected + 1)
        .read_to_end(&mut data)
        .map_err(|e| read_error(path, &r, e))?;
    let actual = data.len() as u64;
    if actual < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(DataError::TrailingData {
            path: path.to_path_buf(),
            expected,
        });
    }
    Ok((dims, data))
}

/// A file's byte source: gzip-decompressed when it starts with `1f 8b`.
enum Source {
    Plain(BufReader<File>),
    Gzip(Box<GzDecoder<BufReader<File>>>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Plain(r) => r.read(buf),
            Source::Gzip(r) => r.read(buf),
        }
    }
}

fn open(path: &Path) -> Result<Source, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let got = read_full(&mut f, &mut magic).map_err(io)?;
    f.rewind().map_err(io)?;
    let r = BufReader::new(f);
    Ok(if got == 2 && magic == [0x1f, 0x8b] {
        Source::Gzip(Box::new(GzDecoder::new(r)))
    } else {
        Source::Plain(r)
    })
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_error(path: &Path, r: &Source, source: std::io::Error) -> DataError {
    match r {
        Source::Gzip(_) => DataError::Gzip {
            path: path.to_path_buf(),
            source,
        },
        Source::Plain(_) => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;
    use std::time::Instant;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-5k")
    }

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A valid set of four plain IDX files with `n` train and `n` test items.
    fn write_set(dir: &Path, n: u32, gzip: bool) {
        let images: Vec<u8> = (0..n as usize * SIDE * SIDE)
            .map(|i| (i % 256) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let files = [
            (
                "train-images-idx3-ubyte",
                idx(IMAGES_MAGIC, &[n, 28, 28], &images),
            ),
            ("train-labels-idx1-ubyte", idx(LABELS_MAGIC, &[n], &labels)),
            (
                "t10k-images-idx3-ubyte",
                idx(IMAGES_MAGIC, &[n, 28, 28], &images),
            ),
            ("t10k-labels-idx1-ubyte", idx(LABELS_MAGIC, &[n], &labels)),
        ];
        for (name, bytes) in files {
            if gzip {
                std::fs::write(dir.join(format!("{name}.gz")), gz(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn loads_the_shipped_mnist_5k() {
        let t = Instant::now();
        let s = load(&shipped()).unwrap();
        eprintln!("mnist-5k loaded in {:?}", t.elapsed());
        assert_eq!((s.train.len(), s.test.len()), (4000, 1000));
        for d in [&s.train, &s.test] {
            assert_eq!(d.shape, [1, 28, 28]);
            assert_eq!(d.classes, 10);
            assert_eq!(d.images.len(), d.len() * 784);
            assert!(d.masks.is_none());
            assert_eq!(d.class_names[3], "3");
            let lo = d.images.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = d.images.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((lo, hi), (0.0, 1.0));
        }
        assert_eq!(s.train.class_counts(), vec![400; 10]);
        assert_eq!(s.test.class_counts(), vec![100; 10]);
    }

    #[test]
    fn plain_and_gzip_files_load_the_same() {
        let plain = tempfile::tempdir().unwrap();
        let gzip = tempfile::tempdir().unwrap();
        write_set(plain.path(), 7, false);
        write_set(gzip.path(), 7, true);
        let a = load(plain.path()).unwrap();
        let b = load(gzip.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.train.len(), 7);
        assert_eq!(a.train.labels, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(a.train.images[1], 1.0 / 255.0);
        assert_eq!(a.train.images[255], 1.0);
    }

    #[test]
    fn gzip_is_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 3, false);
        // A gzip file under the plain name, and a plain file under the .gz name.
        let p = dir.path().join("train-labels-idx1-ubyte");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, gz(&bytes)).unwrap();
        let p = dir.path().join("t10k-labels-idx1-ubyte");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), bytes).unwrap();
        let s = load(dir.path()).unwrap();
        assert_eq!(s.train.labels, vec![0, 1, 2]);
        assert_eq!(s.test.labels, vec![0, 1, 2]);
    }

    /// Loads a set where `train-labels` is replaced by `bytes`.
    fn with_labels(bytes: &[u8]) -> (tempfile::TempDir, DataError) {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 3, false);
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), bytes).unwrap();
        let e = load(dir.path()).unwrap_err();
        (dir, e)
    }

    fn with_images(bytes: &[u8]) -> (tempfile::TempDir, DataError) {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 3, false);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), bytes).unwrap();
        let e = load(dir.path()).unwrap_err();
        (dir, e)
    }

    #[test]
    fn missing_folder_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("nope")).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::NotFound {
                    what: "MNIST folder",
                    ..
                }
            ),
            "{e}"
        );
        let e = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::NotFound {
                    what: "MNIST file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("train-images-idx3-ubyte[.gz]"),
            "{e}"
        );
        write_set(dir.path(), 2, false);
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("t10k-labels-idx1-ubyte"), "{e}");
        let file = dir.path().join("train-images-idx3-ubyte");
        let e = load(&file).unwrap_err();
        assert!(matches!(e, DataError::NotAFolder { .. }), "{e}");
    }

    #[test]
    fn wrong_magic() {
        // Labels where images belong: the magic says so.
        let (_d, e) = with_images(&idx(LABELS_MAGIC, &[3], &[0, 1, 2]));
        assert!(
            matches!(
                e,
                DataError::BadMagic {
                    found: 0x801,
                    expected: 0x803,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("not an IDX images file"), "{e}");
        assert!(e.to_string().contains("0x00000801"), "{e}");
        let (_d, e) = with_labels(b"GIF89a garbage, not IDX at all");
        assert!(
            matches!(e, DataError::BadMagic { kind: "labels", .. }),
            "{e}"
        );
    }

    #[test]
    fn empty_and_short_files() {
        let (_d, e) = with_labels(&[]);
        assert!(
            matches!(
                e,
                DataError::ShortHeader {
                    expected: 8,
                    actual: 0,
                    ..
                }
            ),
            "{e}"
        );
        let (_d, e) = with_images(&idx(IMAGES_MAGIC, &[3, 28], &[]));
        assert!(
            matches!(
                e,
                DataError::ShortHeader {
                    expected: 16,
                    actual: 12,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("too short for an IDX header"), "{e}");
    }

    #[test]
    fn truncated_and_overlong_data() {
        let (_d, e) = with_images(&idx(IMAGES_MAGIC, &[3, 28, 28], &[0; 2000]));
        assert!(
            matches!(
                e,
                DataError::Truncated {
                    expected: 2352,
                    actual: 2000,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("truncated") && msg.contains("2352") && msg.contains("2000"),
            "{msg}"
        );
        let (_d, e) = with_labels(&idx(LABELS_MAGIC, &[3], &[0, 1, 2, 3]));
        assert!(
            matches!(e, DataError::TrailingData { expected: 3, .. }),
            "{e}"
        );
        // Truncated inside gzip: the compressed stream ends early.
        let full = gz(&idx(IMAGES_MAGIC, &[3, 28, 28], &[7; 2352]));
        let (_d, e) = with_images(&full[..full.len() / 2]);
        assert!(
            matches!(e, DataError::Gzip { .. } | DataError::Truncated { .. }),
            "{e}"
        );
    }

    #[test]
    fn huge_header_claims_do_not_allocate() {
        let (_d, e) = with_images(&idx(IMAGES_MAGIC, &[u32::MAX, 28, 28], &[0; 100]));
        assert!(
            matches!(
                e,
                DataError::Truncated { actual: 100, .. } | DataError::TooLarge { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn corrupt_gzip() {
        let mut bytes = vec![0x1f, 0x8b];
        bytes.extend_from_slice(b"this is not deflate data at all, just noise");
        let (_d, e) = with_labels(&bytes);
        assert!(matches!(e, DataError::Gzip { .. }), "{e}");
        assert!(e.to_string().contains("train-labels-idx1-ubyte"), "{e}");
    }

    #[test]
    fn bad_dimensions_counts_and_labels() {
        let (_d, e) = with_images(&idx(IMAGES_MAGIC, &[3, 32, 32], &[0; 3 * 32 * 32]));
        assert!(e.to_string().contains("images are 32×32"), "{e}");
        let (_d, e) = with_images(&idx(IMAGES_MAGIC, &[3, 0, 28], &[]));
        assert!(e.to_string().contains("zero dimension"), "{e}");
        let (_d, e) = with_labels(&idx(LABELS_MAGIC, &[2], &[0, 1]));
        assert!(
            matches!(
                e,
                DataError::CountMismatch {
                    n_images: 3,
                    n_labels: 2,
                    ..
                }
            ),
            "{e}"
        );
        let (_d, e) = with_labels(&idx(LABELS_MAGIC, &[3], &[0, 12, 1]));
        assert!(
            matches!(
                e,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 12,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("label 12 of item 1"), "{e}");
    }
}
