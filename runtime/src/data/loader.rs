//! Batches from a data set: training epochs in a seeded shuffled order with
//! per-sample augmentation, evaluation in order with only normalisation (and a
//! centre crop when the training crop changes the size). The last batch of an
//! epoch holds whatever is left (`n` below the batch size); nothing is dropped.

use cnnc_compiler::checked::{Augment, TrainConfig};

use super::augment::Augmenter;
use super::rng::{self, Purpose};
use super::{DataError, Dataset};

/// A batch of images ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `n × C × H × W` values (the loader's [`Loader::sample_shape`]).
    pub x: Vec<f32>,
    /// `n` class ids.
    pub labels: Vec<u32>,
    /// Which samples of the data set these are, in batch order.
    pub indices: Vec<usize>,
    /// Number of images in the batch (the batch size, or fewer in the last one).
    pub n: usize,
}

/// Cuts one data set into batches.
#[derive(Clone, Debug)]
pub struct Loader<'a> {
    data: &'a Dataset,
    batch: usize,
    seed: u64,
    augmenter: Augmenter,
}

impl<'a> Loader<'a> {
    /// A loader of `batch`-sized batches with the given augmentation (checked
    /// against the data's image shape) and seed.
    pub fn new(
        data: &'a Dataset,
        batch: usize,
        augment: &[Augment],
        seed: u64,
    ) -> Result<Self, DataError> {
        if batch == 0 {
            return Err(DataError::Settings(
                "the batch size must be at least 1".into(),
            ));
        }
        Ok(Loader {
            data,
            batch,
            seed,
            augmenter: Augmenter::new(data.shape, augment)?,
        })
    }

    /// The loader a `train` section asks for.
    pub fn from_config(data: &'a Dataset, cfg: &TrainConfig) -> Result<Self, DataError> {
        let batch = usize::try_from(cfg.batch).map_err(|_| DataError::TooLarge {
            what: format!("batch size {}", cfg.batch),
        })?;
        Self::new(data, batch, &cfg.augment, cfg.seed)
    }

    pub fn data(&self) -> &'a Dataset {
        self.data
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    pub fn augmenter(&self) -> &Augmenter {
        &self.augmenter
    }

    /// `[C, H, W]` of the images in a batch (after any crop).
    pub fn sample_shape(&self) -> [usize; 3] {
        self.augmenter.out_shape()
    }

    /// Batches in one pass over the data, the last one possibly partial.
    pub fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch)
    }

    /// The order of the samples in training epoch `epoch`: a permutation of
    /// `0..len` fixed by `(seed, epoch)`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        let mut r = rng::stream(self.seed, Purpose::Shuffle, epoch, 0);
        rng::shuffle(&mut r, &mut order);
        order
    }

    /// The training batches of `epoch`: shuffled, augmented.
    pub fn train_epoch(&self, epoch: u64) -> Batches<'_, 'a> {
        Batches {
            loader: self,
            order: self.order(epoch),
            epoch: Some(epoch),
            next: 0,
        }
    }

    /// The evaluation batches: in order, normalised, not otherwise augmented.
    pub fn eval(&self) -> Batches<'_, 'a> {
        Batches {
            loader: self,
            order: (0..self.data.len()).collect(),
            epoch: None,
            next: 0,
        }
    }

    /// A batch of the given samples: augmented for training epoch `epoch`, or
    /// prepared for evaluation when `epoch` is `None`.
    pub fn batch_of(&self, indices: &[usize], epoch: Option<u64>) -> Batch {
        let len: usize = self.sample_shape().iter().product();
        let n = indices.len();
        let mut x = vec![0.0; n * len];
        for (out, &i) in x.chunks_exact_mut(len.max(1)).zip(indices) {
            let img = self.data.image(i);
            match epoch {
                Some(e) => self.augmenter.train(img, self.seed, e, i, out),
                None => self.augmenter.eval(img, out),
            }
        }
        Batch {
            x,
            labels: indices.iter().map(|&i| self.data.labels[i]).collect(),
            indices: indices.to_vec(),
            n,
        }
    }
}

/// The batches of one pass, in order; built one at a time as they are asked for.
#[derive(Clone, Debug)]
pub struct Batches<'l, 'a> {
    loader: &'l Loader<'a>,
    order: Vec<usize>,
    epoch: Option<u64>,
    next: usize,
}

impl Batches<'_, '_> {
    /// The sample order of the whole pass.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

impl Iterator for Batches<'_, '_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.order.len() {
            return None;
        }
        let end = (self.next + self.loader.batch).min(self.order.len());
        let b = self
            .loader
            .batch_of(&self.order[self.next..end], self.epoch);
        self.next = end;
        Some(b)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.order.len() - self.next).div_ceil(self.loader.batch);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches<'_, '_> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` 1×2×2 images; image `i` is filled with `i`, label `i % 3`.
    fn toy(n: usize) -> Dataset {
        Dataset {
            shape: [1, 2, 2],
            classes: 3,
            images: (0..n).flat_map(|i| [i as f32; 4]).collect(),
            labels: (0..n).map(|i| (i % 3) as u32).collect(),
            masks: None,
            class_names: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn shuffling_is_a_deterministic_permutation() {
        let d = toy(100);
        let l = Loader::new(&d, 8, &[], 42).unwrap();
        let o1 = l.order(3);
        assert_eq!(o1, l.order(3));
        assert_eq!(o1, Loader::new(&d, 16, &[], 42).unwrap().order(3));
        let mut sorted = o1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(o1, (0..100).collect::<Vec<_>>());
        assert_ne!(o1, l.order(4));
        assert_ne!(o1, Loader::new(&d, 8, &[], 43).unwrap().order(3));
    }

    #[test]
    fn batches_cover_every_sample_once_with_a_partial_last_batch() {
        let d = toy(23);
        let l = Loader::new(&d, 5, &[], 1).unwrap();
        assert_eq!(l.num_batches(), 5);
        for batches in [l.train_epoch(0), l.eval()] {
            assert_eq!(batches.len(), 5);
            let order = batches.order().to_vec();
            let all: Vec<Batch> = batches.collect();
            assert_eq!(
                all.iter().map(|b| b.n).collect::<Vec<_>>(),
                vec![5, 5, 5, 5, 3]
            );
            let seen: Vec<usize> = all.iter().flat_map(|b| b.indices.clone()).collect();
            assert_eq!(seen, order);
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..23).collect::<Vec<_>>());
            for b in &all {
                assert_eq!(b.x.len(), b.n * 4);
                assert_eq!(b.labels.len(), b.n);
                for (k, &i) in b.indices.iter().enumerate() {
                    assert_eq!(b.labels[k], (i % 3) as u32);
                    assert_eq!(&b.x[k * 4..k * 4 + 4], &[i as f32; 4]);
                }
            }
        }
        let eval: Vec<usize> = l.eval().flat_map(|b| b.indices).collect();
        assert_eq!(eval, (0..23).collect::<Vec<_>>());
        // A batch larger than the data set: one partial batch.
        let l = Loader::new(&d, 64, &[], 1).unwrap();
        assert_eq!(l.train_epoch(0).map(|b| b.n).collect::<Vec<_>>(), vec![23]);
    }

    #[test]
    fn augmentation_depends_on_seed_epoch_and_sample_only() {
        let d = Dataset {
            shape: [1, 4, 4],
            images: (0..10 * 16).map(|v| (v % 16) as f32 / 16.0).collect(),
            ..toy(10)
        };
        let aug = [
            Augment::RandomCrop { size: 4, pad: 2 },
            Augment::HFlip { p: 0.5 },
        ];
        let l = Loader::new(&d, 3, &aug, 9).unwrap();
        let by_index = |batches: Batches| {
            let mut v: Vec<(usize, Vec<f32>)> = batches
                .flat_map(|b| {
                    (0..b.n)
                        .map(|k| (b.indices[k], b.x[k * 16..(k + 1) * 16].to_vec()))
                        .collect::<Vec<_>>()
                })
                .collect();
            v.sort_by_key(|(i, _)| *i);
            v
        };
        let a = by_index(l.train_epoch(2));
        // Another batch size cuts the epoch differently but augments alike.
        let l7 = Loader::new(&d, 7, &aug, 9).unwrap();
        assert_eq!(a, by_index(l7.train_epoch(2)));
        assert_ne!(a, by_index(l.train_epoch(3)));
        // Samples built one by one, in any order, match too.
        let one = l.batch_of(&[4], Some(2));
        assert_eq!(one.x, a[4].1);
    }

    #[test]
    fn crop_changes_the_sample_shape_and_bad_settings_fail() {
        let d = Dataset {
            shape: [1, 4, 4],
            images: vec![0.5; 5 * 16],
            ..toy(5)
        };
        let l = Loader::new(&d, 2, &[Augment::RandomCrop { size: 3, pad: 0 }], 0).unwrap();
        assert_eq!(l.sample_shape(), [1, 3, 3]);
        let b = l.eval().next().unwrap();
        assert_eq!(b.x.len(), 2 * 9);
        assert!(Loader::new(&d, 0, &[], 0).is_err());
        assert!(Loader::new(&d, 2, &[Augment::RandomCrop { size: 9, pad: 2 }], 0).is_err());
    }
}
