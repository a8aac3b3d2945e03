//! Building blocks shared by Stable Diffusion's UNet and VAE (diffusers' `resnet.py`,
//! `downsampling.py`, `upsampling.py`): a plain strided convolution, `ResnetBlock2D`,
//! `Downsample2D` and `Upsample2D`. Field names are diffusers' parameter names, so a
//! diffusers `state_dict` maps onto them one to one.

use crate::nn::{conv2d_dense, like, silu, upsample_nearest2x, GroupNorm, Init, InitMode, InitSpec, Linear};
use burn::module::{Module, Param};
use burn::tensor::ops::PadMode;
use burn::tensor::Tensor;

/// PyTorch's default initialisation of `nn.Linear` / `nn.Conv2d`: kaiming-uniform with
/// a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias alike.
pub fn torch_default_init() -> InitSpec {
    let s = (1.0f64 / 3.0).sqrt();
    InitSpec::new(InitMode::KaimingUniform, s, s)
}

/// A PyTorch-default `nn.Linear` (with bias).
pub fn linear(init: &mut Init, in_features: usize, out_features: usize) -> Linear {
    Linear::new(init, in_features, out_features, true, torch_default_init())
}

/// A plain `nn.Conv2d`: `weight` [out, in, k, k], `bias` [out], square stride and padding.
#[derive(Module, Debug)]
pub struct Conv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv {
    pub fn new(init: &mut Init, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        let spec = torch_default_init();
        let (fan_in, fan_out) = (in_channels * kernel * kernel, out_channels * kernel * kernel);
        let weight = init.param([out_channels, in_channels, kernel, kernel], spec.sampler(fan_in, fan_out, spec.weight));
        let bias = init.param([out_channels], spec.sampler(fan_in, fan_out, spec.bias));
        Self { weight, bias, stride, padding }
    }

    pub fn in_channels(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_channels(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let (s, p) = (self.stride, self.padding);
        let w = like(self.weight.val(), dtype);
        let b = like(self.bias.val(), dtype);
        conv2d_dense(x, w, Some(b), s, [p, p])
    }
}

/// diffusers' `ResnetBlock2D` with Stable Diffusion's settings: SiLU, the time embedding
/// added after `conv1` (the "default" norm type), no dropout, output scale 1, and a 1x1
/// `conv_shortcut` when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv,
    pub conv_shortcut: Option<Conv>,
}

impl ResnetBlock2D {
    pub fn new(init: &mut Init, in_channels: usize, out_channels: usize, temb_channels: Option<usize>, groups: usize, eps: f64) -> Self {
        let norm1 = GroupNorm::with_groups(init, in_channels, groups, eps);
        let conv1 = Conv::new(init, in_channels, out_channels, 3, 1, 1);
        let time_emb_proj = temb_channels.map(|t| linear(init, t, out_channels));
        let norm2 = GroupNorm::with_groups(init, out_channels, groups, eps);
        let conv2 = Conv::new(init, out_channels, out_channels, 3, 1, 1);
        let conv_shortcut = (in_channels != out_channels).then(|| Conv::new(init, in_channels, out_channels, 1, 1, 0));
        Self { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut }
    }

    pub fn in_channels(&self) -> usize {
        self.conv1.in_channels()
    }

    pub fn out_channels(&self) -> usize {
        self.conv1.out_channels()
    }

    /// `x` [N, C, H, W]; `temb` [N, T] (ignored by a block built without `temb_channels`).
    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone(), None));
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = like(proj.forward(silu(temb)), h.dtype());
                h + t.unsqueeze_dims::<4>(&[2, 3])
            }
            _ => h,
        };
        let h = self.conv2.forward(self.norm2.forward_silu(h, None));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        skip + h
    }
}

/// diffusers' `Downsample2D` with `use_conv=True`: a 3x3 stride-2 convolution. With
/// `padding == 0` (the VAE encoder) the input is first zero-padded on the right and bottom
/// only, as diffusers does, so that even sizes halve exactly.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv,
}

impl Downsample2D {
    pub fn new(init: &mut Init, channels: usize, out_channels: usize, padding: usize) -> Self {
        Self { conv: Conv::new(init, channels, out_channels, 3, 2, padding) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.conv.padding == 0 { x.pad((0, 1, 0, 1), PadMode::Constant(0.0)) } else { x };
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with `use_conv=True`: nearest-neighbour 2x, then a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv,
}

impl Upsample2D {
    pub fn new(init: &mut Init, channels: usize, out_channels: usize) -> Self {
        Self { conv: Conv::new(init, channels, out_channels, 3, 1, 1) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(upsample_nearest2x(x))
    }
}
