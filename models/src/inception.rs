//! The FID Inception network (TF's `inception-2015-12-05`) up to its 2048-d pool features,
//! under pytorch-fid's names: torchvision's `Inception3` with `Mixed_5b..Mixed_7c` as FID's
//! blocks (average pools that exclude padding, a max pool in the last block's pool branch).
//! `tools/inception_to_safetensors.py` writes pytorch-fid's `.pth` or NVIDIA's port (EDM's
//! `fid.py` network) under these names. Inference only; batch norms use their running stats.

use crate::lpips::upsample_bilinear;
use crate::nn::{conv2d_dense, Init, ModuleDict};
use crate::weights::{load_named, NamedTensors, WeightError};
use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::module::{avg_pool2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, GridSampleOptions, GridSamplePaddingMode, InterpolateMode, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Convolution without bias + batch norm (eps 0.001) + ReLU: torchvision's `BasicConv2d`.
#[derive(Module, Debug)]
pub struct BasicConv2d {
    pub conv: ConvWeight,
    pub bn: BatchNorm,
    pub stride: usize,
    pub padding: [usize; 2],
}

#[derive(Module, Debug)]
pub struct ConvWeight {
    pub weight: Param<Tensor<4>>,
}

#[derive(Module, Debug)]
pub struct BatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: Param<Tensor<1>>,
    pub running_var: Param<Tensor<1>>,
}

impl BasicConv2d {
    /// `kernel` [kh, kw]; `padding` [ph, pw].
    fn new(init: &mut Init, cin: usize, cout: usize, kernel: [usize; 2], stride: usize, padding: [usize; 2]) -> Self {
        let zeros = |init: &mut Init| init.param([cout], |_| 0.0);
        Self {
            conv: ConvWeight { weight: init.param([cout, cin, kernel[0], kernel[1]], |_| 0.0) },
            bn: BatchNorm { weight: zeros(init), bias: zeros(init), running_mean: zeros(init), running_var: zeros(init) },
            stride,
            padding,
        }
    }

    /// A square kernel `k`, stride 1, "same" padding k/2.
    fn same(init: &mut Init, cin: usize, cout: usize, k: usize) -> Self {
        Self::new(init, cin, cout, [k, k], 1, [k / 2, k / 2])
    }

    /// A (kh, kw) kernel, stride 1, "same" padding.
    fn rect(init: &mut Init, cin: usize, cout: usize, kh: usize, kw: usize) -> Self {
        Self::new(init, cin, cout, [kh, kw], 1, [kh / 2, kw / 2])
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = conv2d_dense(x, self.conv.weight.val(), None, self.stride, self.padding);
        let bn = &self.bn;
        let scale = bn.weight.val() / bn.running_var.val().add_scalar(1e-3).sqrt();
        let shift = bn.bias.val() - bn.running_mean.val() * scale.clone();
        relu(x * scale.reshape([1, -1, 1, 1]) + shift.reshape([1, -1, 1, 1]))
    }
}

/// 3x3 average pool, stride 1, padding 1, not counting the padding (FID's blocks).
fn avg_pool_3x3(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(x, AvgPoolOptions::new([3, 3]).with_stride([1, 1]).with_padding([1, 1]).with_count_include_pad(false))
}

fn max_pool_3x3_s2(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]))
}

#[derive(Module, Debug)]
pub struct InceptionA {
    pub branch1x1: BasicConv2d,
    pub branch5x5_1: BasicConv2d,
    pub branch5x5_2: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(init: &mut Init, cin: usize, pool_features: usize) -> Self {
        Self {
            branch1x1: BasicConv2d::same(init, cin, 64, 1),
            branch5x5_1: BasicConv2d::same(init, cin, 48, 1),
            branch5x5_2: BasicConv2d::same(init, 48, 64, 5),
            branch3x3dbl_1: BasicConv2d::same(init, cin, 64, 1),
            branch3x3dbl_2: BasicConv2d::same(init, 64, 96, 3),
            branch3x3dbl_3: BasicConv2d::same(init, 96, 96, 3),
            branch_pool: BasicConv2d::same(init, cin, pool_features, 1),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self.branch5x5_2.forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionB {
    pub branch3x3: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn new(init: &mut Init, cin: usize) -> Self {
        Self {
            branch3x3: BasicConv2d::new(init, cin, 384, [3, 3], 2, [0, 0]),
            branch3x3dbl_1: BasicConv2d::same(init, cin, 64, 1),
            branch3x3dbl_2: BasicConv2d::same(init, 64, 96, 3),
            branch3x3dbl_3: BasicConv2d::new(init, 96, 96, [3, 3], 2, [0, 0]),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        Tensor::cat(vec![b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionC {
    pub branch1x1: BasicConv2d,
    pub branch7x7_1: BasicConv2d,
    pub branch7x7_2: BasicConv2d,
    pub branch7x7_3: BasicConv2d,
    pub branch7x7dbl_1: BasicConv2d,
    pub branch7x7dbl_2: BasicConv2d,
    pub branch7x7dbl_3: BasicConv2d,
    pub branch7x7dbl_4: BasicConv2d,
    pub branch7x7dbl_5: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(init: &mut Init, cin: usize, c7: usize) -> Self {
        Self {
            branch1x1: BasicConv2d::same(init, cin, 192, 1),
            branch7x7_1: BasicConv2d::same(init, cin, c7, 1),
            branch7x7_2: BasicConv2d::rect(init, c7, c7, 1, 7),
            branch7x7_3: BasicConv2d::rect(init, c7, 192, 7, 1),
            branch7x7dbl_1: BasicConv2d::same(init, cin, c7, 1),
            branch7x7dbl_2: BasicConv2d::rect(init, c7, c7, 7, 1),
            branch7x7dbl_3: BasicConv2d::rect(init, c7, c7, 1, 7),
            branch7x7dbl_4: BasicConv2d::rect(init, c7, c7, 7, 1),
            branch7x7dbl_5: BasicConv2d::rect(init, c7, 192, 1, 7),
            branch_pool: BasicConv2d::same(init, cin, 192, 1),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = self.branch7x7_3.forward(self.branch7x7_2.forward(self.branch7x7_1.forward(x.clone())));
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        for conv in [&self.branch7x7dbl_2, &self.branch7x7dbl_3, &self.branch7x7dbl_4, &self.branch7x7dbl_5] {
            bd = conv.forward(bd);
        }
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionD {
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2: BasicConv2d,
    pub branch7x7x3_1: BasicConv2d,
    pub branch7x7x3_2: BasicConv2d,
    pub branch7x7x3_3: BasicConv2d,
    pub branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn new(init: &mut Init, cin: usize) -> Self {
        Self {
            branch3x3_1: BasicConv2d::same(init, cin, 192, 1),
            branch3x3_2: BasicConv2d::new(init, 192, 320, [3, 3], 2, [0, 0]),
            branch7x7x3_1: BasicConv2d::same(init, cin, 192, 1),
            branch7x7x3_2: BasicConv2d::rect(init, 192, 192, 1, 7),
            branch7x7x3_3: BasicConv2d::rect(init, 192, 192, 7, 1),
            branch7x7x3_4: BasicConv2d::new(init, 192, 192, [3, 3], 2, [0, 0]),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3_2.forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        for conv in [&self.branch7x7x3_2, &self.branch7x7x3_3, &self.branch7x7x3_4] {
            b7 = conv.forward(b7);
        }
        Tensor::cat(vec![b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionE {
    pub branch1x1: BasicConv2d,
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2a: BasicConv2d,
    pub branch3x3_2b: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3a: BasicConv2d,
    pub branch3x3dbl_3b: BasicConv2d,
    pub branch_pool: BasicConv2d,
    /// FID's last block pools with a 3x3 max (stride 1, padding 1), the one before with an
    /// average.
    pub max_pool: bool,
}

impl InceptionE {
    fn new(init: &mut Init, cin: usize, max_pool: bool) -> Self {
        Self {
            branch1x1: BasicConv2d::same(init, cin, 320, 1),
            branch3x3_1: BasicConv2d::same(init, cin, 384, 1),
            branch3x3_2a: BasicConv2d::rect(init, 384, 384, 1, 3),
            branch3x3_2b: BasicConv2d::rect(init, 384, 384, 3, 1),
            branch3x3dbl_1: BasicConv2d::same(init, cin, 448, 1),
            branch3x3dbl_2: BasicConv2d::same(init, 448, 384, 3),
            branch3x3dbl_3a: BasicConv2d::rect(init, 384, 384, 1, 3),
            branch3x3dbl_3b: BasicConv2d::rect(init, 384, 384, 3, 1),
            branch_pool: BasicConv2d::same(init, cin, 192, 1),
            max_pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let t = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(vec![self.branch3x3_2a.forward(t.clone()), self.branch3x3_2b.forward(t)], 1);
        let t = self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd = Tensor::cat(vec![self.branch3x3dbl_3a.forward(t.clone()), self.branch3x3dbl_3b.forward(t)], 1);
        let pooled = if self.max_pool {
            max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([1, 1]).with_padding([1, 1]))
        } else {
            avg_pool_3x3(x)
        };
        Tensor::cat(vec![b1, b3, bd, self.branch_pool.forward(pooled)], 1)
    }
}

#[derive(Module, Debug)]
pub enum Layer {
    Conv(BasicConv2d),
    A(InceptionA),
    B(InceptionB),
    C(InceptionC),
    D(InceptionD),
    E(InceptionE),
}

/// The FID Inception network; `features` gives the 2048-d pool3 features. (An enum of one
/// variant only so that parameter names start at the layer, as in pytorch-fid: enum variants
/// do not appear in names.)
#[derive(Module, Debug)]
pub enum FidInception {
    Layers(ModuleDict<Layer>),
}

/// How images become the network's 299x299 input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FidPreprocess {
    /// EDM's `fid.py` (NVIDIA's port of the TF graph): 0..255, TF1 `resize_bilinear` to 299
    /// (source = destination * size / 299, border clamped), then (x - 128) / 128. EDM's
    /// reference statistics (`imagenet-64x64.npz`, `cifar10-32x32.npz`) were made this way.
    #[default]
    Nvidia,
    /// pytorch-fid: x / 255, bilinear resize to 299 (`align_corners=False`), then 2x - 1.
    PytorchFid,
}

impl FidInception {
    /// Loads weights under pytorch-fid's names (`fc.*`, the classifier, is ignored).
    pub fn load(path: &Path, device: &Device) -> Result<Self, WeightError> {
        Self::from_named(NamedTensors::read(path)?, &path.display().to_string(), device)
    }

    /// [`FidInception::load`] from tensors already read; `file` names them in errors.
    pub fn from_named(mut tensors: NamedTensors, file: &str, device: &Device) -> Result<Self, WeightError> {
        tensors.tensors.retain(|k, _| !k.starts_with("fc."));
        load_named(Self::placeholder(device), &tensors, file, "inception")
    }

    /// The network with all-zero weights: the shapes and cost of the real one (benchmarks).
    pub fn zeros(device: &Device) -> Self {
        Self::placeholder(device)
    }

    fn placeholder(device: &Device) -> Self {
        let init = &mut Init::placeholder(device);
        let mut layers = ModuleDict::default();
        let mut add = |name: &str, layer: Layer| layers.insert(name, layer);
        add("Conv2d_1a_3x3", Layer::Conv(BasicConv2d::new(init, 3, 32, [3, 3], 2, [0, 0])));
        add("Conv2d_2a_3x3", Layer::Conv(BasicConv2d::new(init, 32, 32, [3, 3], 1, [0, 0])));
        add("Conv2d_2b_3x3", Layer::Conv(BasicConv2d::same(init, 32, 64, 3)));
        add("Conv2d_3b_1x1", Layer::Conv(BasicConv2d::same(init, 64, 80, 1)));
        add("Conv2d_4a_3x3", Layer::Conv(BasicConv2d::new(init, 80, 192, [3, 3], 1, [0, 0])));
        add("Mixed_5b", Layer::A(InceptionA::new(init, 192, 32)));
        add("Mixed_5c", Layer::A(InceptionA::new(init, 256, 64)));
        add("Mixed_5d", Layer::A(InceptionA::new(init, 288, 64)));
        add("Mixed_6a", Layer::B(InceptionB::new(init, 288)));
        add("Mixed_6b", Layer::C(InceptionC::new(init, 768, 128)));
        add("Mixed_6c", Layer::C(InceptionC::new(init, 768, 160)));
        add("Mixed_6d", Layer::C(InceptionC::new(init, 768, 160)));
        add("Mixed_6e", Layer::C(InceptionC::new(init, 768, 192)));
        add("Mixed_7a", Layer::D(InceptionD::new(init, 768)));
        add("Mixed_7b", Layer::E(InceptionE::new(init, 1280, false)));
        add("Mixed_7c", Layer::E(InceptionE::new(init, 2048, true)));
        Self::Layers(layers)
    }

    /// Pool features [N, 2048] of network inputs [N, 3, 299, 299] (already preprocessed).
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let Self::Layers(layers) = self;
        let mut x = x;
        for (name, layer) in layers.iter() {
            x = match layer {
                Layer::Conv(c) => c.forward(x),
                Layer::A(b) => b.forward(x),
                Layer::B(b) => b.forward(x),
                Layer::C(b) => b.forward(x),
                Layer::D(b) => b.forward(x),
                Layer::E(b) => b.forward(x),
            };
            // Max pools after the stem's 2b and 4a convolutions.
            if name == "Conv2d_2b_3x3" || name == "Conv2d_4a_3x3" {
                x = max_pool_3x3_s2(x);
            }
        }
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
    }

    /// Pool features of images with values 0..255 ([N, C, H, W], C = 1 or 3), preprocessed
    /// as `mode` says.
    pub fn features_of_pixels(&self, pixels: Tensor<4>, mode: FidPreprocess) -> Tensor<2> {
        self.features(preprocess(pixels, mode))
    }
}

/// Images with values 0..255 ([N, 1 or 3, H, W]) -> the network's input [N, 3, 299, 299].
pub fn preprocess(pixels: Tensor<4>, mode: FidPreprocess) -> Tensor<4> {
    let x = if pixels.dims()[1] == 1 { pixels.repeat_dim(1, 3) } else { pixels };
    match mode {
        FidPreprocess::PytorchFid => upsample_bilinear(x.div_scalar(255.0), [299, 299]).mul_scalar(2.0).sub_scalar(1.0),
        FidPreprocess::Nvidia => resize_tf1(x, 299).sub_scalar(128.0).div_scalar(128.0),
    }
}

/// TF1's `resize_bilinear` (align_corners=False, no half-pixel centres) as NVIDIA's port does
/// it with `grid_sample`: destination pixel d samples the source at d * size_in / size_out
/// (pixel units), clamped to the border.
fn resize_tf1(x: Tensor<4>, size: usize) -> Tensor<4> {
    let [n, _, h, w] = x.dims();
    // grid_sample with align_corners=False maps a normalised g to pixel (g + 1) * len / 2 - 0.5;
    // pick g so that pixel = d * len / size.
    let coords = |len: usize| -> Vec<f32> {
        (0..size).map(|d| ((d as f64 * len as f64 / size as f64 + 0.5) * 2.0 / len as f64 - 1.0) as f32).collect()
    };
    let (gx, gy) = (coords(w), coords(h));
    let mut grid = Vec::with_capacity(size * size * 2);
    for y in 0..size {
        for xx in 0..size {
            grid.push(gx[xx]);
            grid.push(gy[y]);
        }
    }
    let device = x.device();
    let grid = Tensor::<4>::from_data(TensorData::new(grid, [1, size, size, 2]), &device).repeat_dim(0, n);
    let opts = GridSampleOptions { mode: InterpolateMode::Bilinear, padding_mode: GridSamplePaddingMode::Border, align_corners: false };
    x.grid_sample_2d(grid, opts)
}
