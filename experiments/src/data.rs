//! Training data from a config: a built-in toy distribution, EDM's image dataset format, or
//! MNIST-style IDX files. Batches are drawn with a caller-supplied RNG, so a run that derives
//! that RNG from (seed, step) sees the same data whether or not it was resumed.

use anyhow::{bail, Result};
use dmd_datasets::{to_model_space, ImageDataset, ToyDistribution, ToyKind};
use dmd_models::HostTensor;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataConfig {
    /// A built-in 2-D distribution (`name`: eight_gaussians, twenty_five_gaussians,
    /// checkerboard, two_moons, swiss_roll). With `conditional`, the mixture component is the
    /// class label.
    Toy {
        name: ToyKind,
        #[serde(default)]
        conditional: bool,
    },
    /// EDM's format: a folder or zip of PNGs with `dataset.json` (e.g. from EDM's
    /// `dataset_tool.py`).
    Edm {
        path: PathBuf,
        #[serde(default)]
        conditional: bool,
    },
    /// MNIST-style IDX files (gzipped or not), e.g. Fashion-MNIST from the Debian package
    /// `dataset-fashion-mnist`. `pad_to` pads the images with black to a size the UNet can
    /// halve (28 -> 32).
    Idx {
        images: PathBuf,
        #[serde(default)]
        labels: Option<PathBuf>,
        #[serde(default = "ten")]
        num_classes: usize,
        #[serde(default)]
        conditional: bool,
        #[serde(default)]
        pad_to: Option<usize>,
    },
}

fn ten() -> usize {
    10
}

pub enum DataSource {
    Toy { dist: ToyDistribution, conditional: bool },
    Images { set: ImageDataset, conditional: bool, pad_to: Option<usize> },
}

impl DataSource {
    pub fn open(cfg: &DataConfig) -> Result<Self> {
        Ok(match cfg {
            DataConfig::Toy { name, conditional } => {
                let dist = ToyDistribution::new(*name);
                if *conditional && dist.num_classes() == 0 {
                    bail!("data: the toy distribution {name:?} has no classes; set conditional = false");
                }
                Self::Toy { dist, conditional: *conditional }
            }
            DataConfig::Edm { path, conditional } => {
                let set = ImageDataset::open(path)?;
                if *conditional && set.label_dim == 0 {
                    bail!("{}: has no labels in dataset.json; set conditional = false", path.display());
                }
                Self::Images { set, conditional: *conditional, pad_to: None }
            }
            DataConfig::Idx { images, labels, num_classes, conditional, pad_to } => {
                if *conditional && labels.is_none() {
                    bail!("data: conditional = true needs `labels`");
                }
                let set = ImageDataset::from_idx(images, labels.as_deref(), *num_classes)?;
                if let Some(p) = pad_to {
                    if *p < set.shape[1] || *p < set.shape[2] {
                        bail!("data: pad_to = {p} is smaller than the images ({}x{})", set.shape[1], set.shape[2]);
                    }
                }
                Self::Images { set, conditional: *conditional, pad_to: *pad_to }
            }
        })
    }

    /// [C, H, W] of a training example.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Self::Toy { .. } => [2, 1, 1],
            Self::Images { set, pad_to, .. } => match pad_to {
                Some(p) => [set.shape[0], *p, *p],
                None => set.shape,
            },
        }
    }

    /// Classes the network is conditioned on (0: unconditional).
    pub fn label_dim(&self) -> usize {
        match self {
            Self::Toy { dist, conditional } => if *conditional { dist.num_classes() } else { 0 },
            Self::Images { set, conditional, .. } => if *conditional { set.label_dim } else { 0 },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Toy { dist, .. } => format!("toy {:?}", dist.kind),
            Self::Images { set, .. } => format!("{} ({} images, {:?})", set.name, set.len(), set.shape),
        }
    }

    /// A batch of `n` examples in the network's space ([-1, 1] for images), with one-hot
    /// labels when conditional.
    pub fn batch(&self, n: usize, rng: &mut StdRng) -> Result<(HostTensor, Option<HostTensor>)> {
        let [c, h, w] = self.shape();
        let l = self.label_dim();
        let mut labels = Vec::with_capacity(n * l);
        let mut one_hot = |k: usize| labels.extend((0..l).map(|j| if j == k { 1.0f32 } else { 0.0 }));
        let data = match self {
            Self::Toy { dist, .. } => {
                let (pts, cls) = dist.sample_n(n, rng);
                if l > 0 {
                    cls.iter().for_each(|&k| one_hot(k));
                }
                pts
            }
            Self::Images { set, pad_to, .. } => {
                let mut out = Vec::with_capacity(n * c * h * w);
                for _ in 0..n {
                    let i = rng.random_range(0..set.len());
                    let px = set.image(i)?;
                    let img = to_model_space(&px);
                    match pad_to {
                        Some(_) => out.extend(pad(&img, set.shape, h, w)),
                        None => out.extend(img),
                    }
                    if l > 0 {
                        one_hot(set.label(i).expect("labelled dataset"));
                    }
                }
                out
            }
        };
        let images = HostTensor::new(vec![n, c, h, w], data);
        let labels = (l > 0).then(|| HostTensor::new(vec![n, l], labels));
        Ok((images, labels))
    }
}

/// Centres a CHW image in an h x w canvas of black (-1).
fn pad(img: &[f32], shape: [usize; 3], h: usize, w: usize) -> Vec<f32> {
    let [c, ih, iw] = shape;
    let (oy, ox) = ((h - ih) / 2, (w - iw) / 2);
    let mut out = vec![-1.0f32; c * h * w];
    for ch in 0..c {
        for y in 0..ih {
            let src = &img[ch * ih * iw + y * iw..ch * ih * iw + (y + 1) * iw];
            let dst = ch * h * w + (y + oy) * w + ox;
            out[dst..dst + iw].copy_from_slice(src);
        }
    }
    out
}
