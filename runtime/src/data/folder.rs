//! Image folders: one sub-folder per class (class ids follow the sorted folder
//! names), PNG or JPEG files inside, all of one size. Grey images give one
//! channel; if any image is in colour, every image is read as RGB.
//!
//! Without a test folder, a fraction `split` of each class is held out as the
//! test set: files in name order, evenly spaced (with `split = 0.2`, every fifth
//! file), so the split is stratified and the same on every run.
//!
//! Hidden entries (names starting with `.`) and files with other extensions are
//! ignored; every image is decoded by its content, not its extension.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};

use super::{DataError, Dataset, Splits};

/// Loads a folder data set: `train` with its classes, and either the `test`
/// folder or a `split` fraction of each class held out from `train`.
pub fn load(train: &Path, test: Option<&Path>, split: f64) -> Result<Splits, DataError> {
    let classes = list_classes(train)?;
    let class_names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let mut train_files = Vec::new();
    let mut test_files = Vec::new();
    match test {
        Some(test_dir) => {
            for (label, c) in classes.iter().enumerate() {
                train_files.extend(c.files.iter().map(|f| (f.clone(), label as u32)));
            }
            for c in list_classes(test_dir)? {
                let Some(label) = class_names.iter().position(|n| *n == c.name) else {
                    return Err(DataError::UnknownTestClass {
                        test: test_dir.to_path_buf(),
                        train: train.to_path_buf(),
                        class: c.name,
                    });
                };
                test_files.extend(c.files.into_iter().map(|f| (f, label as u32)));
            }
            // Keep the test set in class order, whatever order its folders sort in.
            test_files.sort_by_key(|(_, label)| *label);
        }
        None => {
            for (label, c) in classes.iter().enumerate() {
                let held = held_out(c.files.len(), split);
                for (i, f) in c.files.iter().enumerate() {
                    let to = if held.contains(&i) {
                        &mut test_files
                    } else {
                        &mut train_files
                    };
                    to.push((f.clone(), label as u32));
                }
            }
            if test_files.is_empty() {
                return Err(DataError::EmptySplit {
                    path: train.to_path_buf(),
                    split,
                });
            }
        }
    }

    let all: Vec<&Path> = train_files
        .iter()
        .chain(&test_files)
        .map(|(p, _)| p.as_path())
        .collect();
    let decoded = decode_all(&all);
    let mut images = Vec::with_capacity(decoded.len());
    let mut first: Option<(&Path, (u32, u32))> = None;
    for (path, img) in all.iter().zip(decoded) {
        let img = img?;
        let size = (img.width, img.height);
        match first {
            None => first = Some((path, size)),
            Some((first_path, first_size)) if first_size != size => {
                return Err(DataError::SizeMismatch {
                    path: path.to_path_buf(),
                    size,
                    first: first_path.to_path_buf(),
                    first_size,
                });
            }
            Some(_) => {}
        }
        images.push(img);
    }
    let Some((_, (w, h))) = first else {
        // list_classes guarantees at least one image per class.
        return Err(DataError::NoClasses {
            path: train.to_path_buf(),
        });
    };
    let rgb = images.iter().any(|i| i.rgb);
    let shape = [if rgb { 3 } else { 1 }, h as usize, w as usize];
    let test_images = images.split_off(train_files.len());
    let make = |files: &[(PathBuf, u32)], imgs: Vec<Decoded>| Dataset {
        shape,
        classes: class_names.len(),
        images: imgs.iter().flat_map(|i| i.planar(rgb)).collect(),
        labels: files.iter().map(|(_, l)| *l).collect(),
        masks: None,
        class_names: class_names.clone(),
    };
    Ok(Splits {
        train: make(&train_files, images),
        test: make(&test_files, test_images),
    })
}

/// Which of `n` files (in name order) a class holds out for testing: about
/// `n × split` of them, at least one when the class has two or more files and
/// never all of them, spread evenly through the list.
pub fn held_out(n: usize, split: f64) -> Vec<usize> {
    if n < 2 {
        return Vec::new();
    }
    let t = ((n as f64 * split).round() as usize).clamp(1, n - 1);
    (0..n).filter(|&i| (i + 1) * t / n > i * t / n).collect()
}

struct Class {
    name: String,
    files: Vec<PathBuf>,
}

/// The class sub-folders of `root` in name order, each with its image files in
/// name order.
fn list_classes(root: &Path) -> Result<Vec<Class>, DataError> {
    if !root.exists() {
        return Err(DataError::NotFound {
            what: "image folder",
            path: root.to_path_buf(),
        });
    }
    if !root.is_dir() {
        return Err(DataError::NotAFolder {
            path: root.to_path_buf(),
        });
    }
    let mut classes = Vec::new();
    for (name, path) in entries(root)? {
        if !path.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = entries(&path)?
            .into_iter()
            .filter(|(n, p)| is_image_name(n) && p.is_file())
            .map(|(_, p)| p)
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::EmptyClass { path });
        }
        classes.push(Class { name, files });
    }
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: root.to_path_buf(),
        });
    }
    classes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(classes)
}

/// The non-hidden entries of a folder: (name, path).
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push((name, e.path()));
        }
    }
    Ok(out)
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"].iter().any(|e| lower.ends_with(e))
}

/// One decoded image, kept as 8-bit grey or RGB until the channel count of the
/// whole set is known.
struct Decoded {
    width: u32,
    height: u32,
    rgb: bool,
    /// Interleaved: 1 or 3 bytes a pixel.
    pixels: Vec<u8>,
}

impl Decoded {
    /// `C × H × W` values in `[0, 1]`, `C` = 3 when `rgb`, else 1.
    fn planar(&self, rgb: bool) -> Vec<f32> {
        let hw = (self.width * self.height) as usize;
        let c = if rgb { 3 } else { 1 };
        let mut out = vec![0.0; c * hw];
        for p in 0..hw {
            for ch in 0..c {
                let v = if self.rgb {
                    self.pixels[3 * p + ch]
                } else {
                    self.pixels[p]
                };
                out[ch * hw + p] = f32::from(v) / 255.0;
            }
        }
        out
    }
}

fn decode(path: &Path) -> Result<Decoded, DataError> {
    let img = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .decode()
        .map_err(|source| DataError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    let rgb = img.color().has_color();
    let pixels = match &img {
        DynamicImage::ImageLuma8(b) if !rgb => b.as_raw().clone(),
        _ if rgb => img.to_rgb8().into_raw(),
        _ => img.to_luma8().into_raw(),
    };
    Ok(Decoded {
        width: img.width(),
        height: img.height(),
        rgb,
        pixels,
    })
}

/// Decodes the files on all cores, keeping their order.
fn decode_all(paths: &[&Path]) -> Vec<Result<Decoded, DataError>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(paths.len().max(1));
    let chunk = paths.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| decode(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                // A decoder panic is a bug in the decoder; carry it on here.
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn grey(dir: &Path, class: &str, name: &str, w: u32, h: u32, v: u8) {
        let d = dir.join(class);
        std::fs::create_dir_all(&d).unwrap();
        GrayImage::from_fn(w, h, |x, y| Luma([v.wrapping_add((x + y) as u8)]))
            .save(d.join(name))
            .unwrap();
    }

    fn colour(dir: &Path, class: &str, name: &str, w: u32, h: u32) {
        let d = dir.join(class);
        std::fs::create_dir_all(&d).unwrap();
        RgbImage::from_fn(w, h, |x, _| Rgb([255, (x * 10) as u8, 0]))
            .save(d.join(name))
            .unwrap();
    }

    /// Three classes of five 4×3 grey images each.
    fn grey_set(dir: &Path) {
        for (c, class) in ["dog", "ant", "cat"].iter().enumerate() {
            for i in 0..5 {
                grey(dir, class, &format!("{i:02}.png"), 4, 3, (c * 50 + i) as u8);
            }
        }
        std::fs::write(dir.join("cat").join("notes.txt"), "not an image").unwrap();
        std::fs::write(dir.join("README"), "ignored").unwrap();
    }

    #[test]
    fn split_picks_evenly_spaced_files() {
        assert_eq!(held_out(10, 0.2), vec![4, 9]);
        assert_eq!(held_out(5, 0.2), vec![4]);
        assert_eq!(held_out(3, 0.01), vec![2]);
        assert_eq!(held_out(3, 0.99), vec![1, 2]);
        assert_eq!(held_out(1, 0.5), Vec::<usize>::new());
        assert_eq!(held_out(100, 0.25).len(), 25);
    }

    #[test]
    fn grey_folder_with_split() {
        let dir = tempfile::tempdir().unwrap();
        grey_set(dir.path());
        let s = load(dir.path(), None, 0.2).unwrap();
        for d in [&s.train, &s.test] {
            assert_eq!(d.shape, [1, 3, 4]);
            assert_eq!(d.classes, 3);
            assert_eq!(d.class_names, ["ant", "cat", "dog"]);
        }
        assert_eq!(s.train.labels, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(s.test.labels, vec![0, 1, 2]);
        // "ant" is class 0, its files 00..04 have base value 50 + i; 04 is held out.
        assert_eq!(s.train.image(0)[0], 50.0 / 255.0);
        assert_eq!(s.train.image(0)[5], 52.0 / 255.0); // x=1, y=1
        assert_eq!(s.test.image(0)[0], 54.0 / 255.0);
        assert_eq!(s.test.image(2)[0], 4.0 / 255.0); // dog/04.png
    }

    #[test]
    fn separate_test_folder_and_colour() {
        let train = tempfile::tempdir().unwrap();
        let test = tempfile::tempdir().unwrap();
        grey_set(train.path());
        grey(test.path(), "dog", "a.png", 4, 3, 9);
        colour(test.path(), "ant", "b.png", 4, 3);
        let s = load(train.path(), Some(test.path()), 0.0).unwrap();
        assert_eq!(s.train.len(), 15);
        assert_eq!(s.test.labels, vec![0, 2]);
        // One colour image makes every image RGB, grey ones repeated in 3 planes.
        assert_eq!(s.train.shape, [3, 3, 4]);
        let g = s.train.image(0);
        assert_eq!(
            (g[0], g[12], g[24]),
            (50.0 / 255.0, 50.0 / 255.0, 50.0 / 255.0)
        );
        let c = s.test.image(0);
        assert_eq!((c[1], c[13], c[25]), (1.0, 10.0 / 255.0, 0.0));
    }

    #[test]
    fn jpeg_loads() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            for i in 0..2 {
                let d = dir.path().join(class);
                std::fs::create_dir_all(&d).unwrap();
                GrayImage::from_pixel(8, 8, Luma([200]))
                    .save(d.join(format!("{i}.JPG")))
                    .unwrap();
            }
        }
        let s = load(dir.path(), None, 0.5).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (2, 2));
        assert_eq!(s.train.shape, [1, 8, 8]);
        assert!((s.train.images[0] - 200.0 / 255.0).abs() < 0.02);
    }

    #[test]
    fn size_mismatch_names_the_file_and_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        grey_set(dir.path());
        grey(dir.path(), "cat", "02.png", 5, 3, 0);
        let e = load(dir.path(), None, 0.2).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::SizeMismatch { .. }), "{msg}");
        assert!(msg.contains("cat/02.png") && msg.contains("5×3"), "{msg}");
        assert!(msg.contains("ant/00.png") && msg.contains("4×3"), "{msg}");
    }

    #[test]
    fn corrupt_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        grey_set(dir.path());
        std::fs::write(dir.path().join("dog").join("03.png"), b"\x89PNG garbage").unwrap();
        let e = load(dir.path(), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::Image { .. }), "{e}");
        assert!(e.to_string().contains("dog/03.png"), "{e}");
        // An empty file with an image name, and a truncated real PNG.
        std::fs::write(dir.path().join("dog").join("03.png"), b"").unwrap();
        let e = load(dir.path(), None, 0.2).unwrap_err();
        assert!(e.to_string().contains("dog/03.png"), "{e}");
        let p = dir.path().join("ant").join("01.png");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(dir.path(), None, 0.2).unwrap_err();
        assert!(e.to_string().contains("ant/01.png"), "{e}");
    }

    #[test]
    fn folder_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("missing"), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::NotFound { .. }), "{e}");
        let e = load(dir.path(), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::NoClasses { .. }), "{e}");
        std::fs::write(dir.path().join("x.png"), b"").unwrap();
        let e = load(&dir.path().join("x.png"), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::NotAFolder { .. }), "{e}");
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        std::fs::write(dir.path().join("empty").join("a.txt"), b"").unwrap();
        let e = load(dir.path(), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::EmptyClass { .. }), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn unknown_test_class_and_empty_split() {
        let train = tempfile::tempdir().unwrap();
        let test = tempfile::tempdir().unwrap();
        grey_set(train.path());
        grey(test.path(), "zebra", "a.png", 4, 3, 0);
        let e = load(train.path(), Some(test.path()), 0.0).unwrap_err();
        assert!(e.to_string().contains("`zebra`"), "{e}");
        let one = tempfile::tempdir().unwrap();
        grey(one.path(), "a", "0.png", 2, 2, 0);
        grey(one.path(), "b", "0.png", 2, 2, 0);
        let e = load(one.path(), None, 0.2).unwrap_err();
        assert!(matches!(e, DataError::EmptySplit { .. }), "{e}");
    }
}
