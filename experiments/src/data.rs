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
        /// Average-pools the (padded) images by this factor: 2 turns 32x32 into 16x16, the
        /// size a two-core CPU can train and distil in an hour.
        #[serde(default)]
        downsample: Option<usize>,
    },
}

fn ten() -> usize {
    10
}

pub enum DataSource {
    Toy { dist: ToyDistribution, conditional: bool },
    Images { set: ImageDataset, conditional: bool, pad_to: Option<usize>, downsample: usize },
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
                Self::Images { set, conditional: *conditional, pad_to: None, downsample: 1 }
            }
            DataConfig::Idx { images, labels, num_classes, conditional, pad_to, downsample } => {
                if *conditional && labels.is_none() {
                    bail!("data: conditional = true needs `labels`");
                }
                let set = ImageDataset::from_idx(images, labels.as_deref(), *num_classes)?;
                if let Some(p) = pad_to {
                    if *p < set.shape[1] || *p < set.shape[2] {
                        bail!("data: pad_to = {p} is smaller than the images ({}x{})", set.shape[1], set.shape[2]);
                    }
                }
                let f = downsample.unwrap_or(1);
                let [h, w] = pad_to.map_or([set.shape[1], set.shape[2]], |p| [p, p]);
                if f == 0 || h % f != 0 || w % f != 0 {
                    bail!("data: downsample = {f} must be positive and divide the (padded) image size {h}x{w}");
                }
                Self::Images { set, conditional: *conditional, pad_to: *pad_to, downsample: f }
            }
        })
    }

    /// [C, H, W] of a training example.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Self::Toy { .. } => [2, 1, 1],
            Self::Images { set, pad_to, downsample, .. } => match pad_to {
                Some(p) => [set.shape[0], p / downsample, p / downsample],
                None => [set.shape[0], set.shape[1] / downsample, set.shape[2] / downsample],
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
            Self::Images { set, pad_to, downsample, .. } => {
                let mut out = Vec::with_capacity(n * c * h * w);
                for _ in 0..n {
                    let i = rng.random_range(0..set.len());
                    let px = set.image(i)?;
                    let img = to_model_space(&px);
                    let (img, [ih, iw]) = match pad_to {
                        Some(p) => (pad(&img, set.shape, *p, *p), [*p, *p]),
                        None => (img, [set.shape[1], set.shape[2]]),
                    };
                    out.extend(box_downsample(&img, [c, ih, iw], *downsample));
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

/// Averages f x f blocks of a CHW image.
fn box_downsample(img: &[f32], [c, h, w]: [usize; 3], f: usize) -> Vec<f32> {
    if f == 1 {
        return img.to_vec();
    }
    let (oh, ow) = (h / f, w / f);
    let mut out = vec![0.0f32; c * oh * ow];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                out[ch * oh * ow + (y / f) * ow + x / f] += img[ch * h * w + y * w + x];
            }
        }
    }
    let inv = 1.0 / (f * f) as f32;
    out.iter_mut().for_each(|v| *v *= inv);
    out
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
