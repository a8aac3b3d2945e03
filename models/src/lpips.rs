//! LPIPS (Zhang et al. 2018), the VGG16 variant with the v0.1 linear heads: DMD's regression
//! loss. Weights come from two safetensors files under the original names: torchvision's VGG16
//! convolutions (`features.0.weight` ... `features.28.bias`) and the `lpips` package's heads
//! (`lin0.model.1.weight` ... `lin4.model.1.weight`); `tools/lpips_to_safetensors.py` makes
//! both from the published files.
//!
//! The network is frozen: its parameters never require gradients, but gradients flow through
//! it to the images.

use crate::nn::{Init, ModuleDict};
use crate::weights::{load_named, NamedTensors, WeightError};
use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::module::{interpolate, max_pool2d};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use std::path::Path;

/// torchvision's `vgg16().features` convolutions: (index, in, out). A 2x2 max-pool precedes
/// indices 5, 10, 17 and 24; LPIPS reads the ReLU after 2, 7, 14, 21 and 28.
const VGG16_CONVS: [(usize, usize, usize); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];
const POOL_BEFORE: [usize; 4] = [5, 10, 17, 24];
const TAPS: [usize; 5] = [2, 7, 14, 21, 28];

/// LPIPS' input normalisation (`ScalingLayer`): (x - shift) / scale per RGB channel, for
/// images in [-1, 1].
pub const SCALING_SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
pub const SCALING_SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// A 3x3 convolution with bias, padding 1.
#[derive(Module, Debug)]
pub struct VggConv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct Vgg16Features {
    pub features: ModuleDict<VggConv>,
}

impl Vgg16Features {
    fn placeholder(device: &Device) -> Self {
        let mut init = Init::placeholder(device);
        let mut features = ModuleDict::default();
        for (i, cin, cout) in VGG16_CONVS {
            features.insert(i.to_string(), VggConv { weight: init.param([cout, cin, 3, 3], |_| 0.0), bias: init.param([cout], |_| 0.0) });
        }
        Self { features }
    }

    /// The five ReLU activations LPIPS compares (relu1_2 ... relu5_3).
    pub fn taps(&self, x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut x = x;
        let mut taps = Vec::with_capacity(TAPS.len());
        for (name, conv) in self.features.iter() {
            let i: usize = name.parse().expect("numeric VGG layer names");
            if POOL_BEFORE.contains(&i) {
                x = max_pool2d(x, MaxPoolOptions::new([2, 2]));
            }
            x = relu(crate::nn::conv2d_dense(x, conv.weight.val(), Some(conv.bias.val()), 1, [1, 1]));
            if TAPS.contains(&i) {
                taps.push(x.clone());
            }
        }
        taps
    }
}

/// One v0.1 head: a 1x1 convolution without bias to one channel (`lin{k}.model.1.weight`;
/// `model.0` is a dropout with no parameters).
#[derive(Module, Debug)]
pub struct LinHead {
    pub model: ModuleDict<LinConv>,
}

#[derive(Module, Debug)]
pub struct LinConv {
    pub weight: Param<Tensor<4>>,
}

#[derive(Module, Debug)]
pub struct LpipsHeads {
    pub lin0: LinHead,
    pub lin1: LinHead,
    pub lin2: LinHead,
    pub lin3: LinHead,
    pub lin4: LinHead,
}

impl LpipsHeads {
    fn placeholder(device: &Device) -> Self {
        let mut init = Init::placeholder(device);
        let mut head = |c: usize| {
            let mut model = ModuleDict::default();
            model.insert("1", LinConv { weight: init.param([1, c, 1, 1], |_| 0.0) });
            LinHead { model }
        };
        Self { lin0: head(64), lin1: head(128), lin2: head(256), lin3: head(512), lin4: head(512) }
    }

    fn weights(&self) -> [Tensor<4>; 5] {
        [&self.lin0, &self.lin1, &self.lin2, &self.lin3, &self.lin4].map(|h| h.model.iter().next().expect("one conv").1.weight.val())
    }
}

/// LPIPS-VGG v0.1.
#[derive(Module, Debug)]
pub struct Lpips {
    pub vgg: Vgg16Features,
    pub heads: LpipsHeads,
}

impl Lpips {
    /// Loads the VGG16 features and the heads; errors name the file and tensor.
    pub fn load(vgg: &Path, heads: &Path, device: &Device) -> Result<Self, WeightError> {
        let v = NamedTensors::read(vgg)?;
        let h = NamedTensors::read(heads)?;
        Self::from_named(&v, &vgg.display().to_string(), &h, &heads.display().to_string(), device)
    }

    pub fn from_named(vgg: &NamedTensors, vgg_file: &str, heads: &NamedTensors, heads_file: &str, device: &Device) -> Result<Self, WeightError> {
        let net = Self {
            vgg: load_named(Vgg16Features::placeholder(device), vgg, vgg_file, "lpips.vgg")?,
            heads: load_named(LpipsHeads::placeholder(device), heads, heads_file, "lpips.heads")?,
        };
        Ok(net.no_grad())
    }

    /// The distance per pair, [N], for images in [-1, 1] ([N, 3, H, W]; a single channel is
    /// repeated to RGB). No resizing: see [`Lpips::distance_224`].
    pub fn distance(&self, img0: Tensor<4>, img1: Tensor<4>) -> Tensor<1> {
        let n = img0.dims()[0];
        let device = img0.device();
        let rgb = |x: Tensor<4>| if x.dims()[1] == 1 { x.repeat_dim(1, 3) } else { x };
        let shift = Tensor::<4>::from_data(TensorData::new(SCALING_SHIFT.to_vec(), [1, 3, 1, 1]), &device);
        let scale = Tensor::<4>::from_data(TensorData::new(SCALING_SCALE.to_vec(), [1, 3, 1, 1]), &device);
        // Both images in one batch: one pass through VGG.
        let x = (Tensor::cat(vec![rgb(img0), rgb(img1)], 0) - shift) / scale;
        let mut total: Option<Tensor<1>> = None;
        for (f, w) in self.vgg.taps(x).into_iter().zip(self.heads.weights()) {
            // Unit-normalise each position's feature vector (eps as in LPIPS).
            let f = f.clone() / f.square().sum_dim(1).sqrt().add_scalar(1e-10);
            let [_, c, h, wd] = f.dims();
            let d = (f.clone().narrow(0, 0, n) - f.narrow(0, n, n)).square();
            let layer = (d * w.reshape([1, c, 1, 1])).sum_dim(1).reshape([n, h * wd]).mean_dim(1).reshape([n]);
            total = Some(match total {
                Some(t) => t + layer,
                None => layer,
            });
        }
        total.expect("five layers")
    }

    /// The distance as DMD (and consistency models) use it: images smaller than 224 are first
    /// upsampled bilinearly to 224x224 (PyTorch's `interpolate`, `align_corners=False`).
    pub fn distance_224(&self, img0: Tensor<4>, img1: Tensor<4>) -> Tensor<1> {
        let up = |x: Tensor<4>| {
            let [_, _, h, w] = x.dims();
            if h < 224 || w < 224 { upsample_bilinear(x, [224, 224]) } else { x }
        };
        self.distance(up(img0), up(img1))
    }
}

/// Bilinear resize with half-pixel centres (PyTorch's `align_corners=False`).
pub fn upsample_bilinear(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    interpolate(x, InterpolateOptions::new(InterpolateMode::Bilinear).with_output_size(size).with_align_corners(false))
}
