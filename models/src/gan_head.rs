//! DMD2's GAN classifier: a small head on the fake score's bottleneck (the encoder output)
//! that tells diffused real images from diffused generator outputs. Weights keep DMD2's names
//! (`cls_pred_branch.{0,1,3,4,6}.*`), so a DMD2 guidance checkpoint's head loads as is.
//!
//! DMD2's head (ImageNet-64, bottleneck 768 x 8 x 8): conv 4x4 stride 2 (8 -> 4), GroupNorm(32),
//! SiLU, conv 4x4 stride 4 (4 -> 1), GroupNorm(32), SiLU, conv 1x1 to one logit. For other
//! bottleneck sizes r the second conv spans the remaining r/2 x r/2; a 1x1 bottleneck (the
//! toy MLP) gets 1x1 convs throughout, i.e. an MLP.

use crate::nn::{conv2d_dense, GroupNorm, Init, InitMode, InitSpec, ModuleDict};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

#[derive(Module, Debug)]
pub struct HeadConv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    pub stride: usize,
    pub padding: usize,
}

impl HeadConv {
    /// PyTorch's default `nn.Conv2d` initialisation: U(+-1/sqrt(fan_in)) for weight and bias.
    fn new(init: &mut Init, cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        let s = (1.0f64 / 3.0).sqrt();
        let spec = InitSpec::new(InitMode::KaimingUniform, s, s);
        let fan_in = cin * kernel * kernel;
        Self {
            weight: init.param([cout, cin, kernel, kernel], spec.sampler(fan_in, 0, spec.weight)),
            bias: init.param([cout], spec.sampler(fan_in, 0, spec.bias)),
            stride,
            padding,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (s, p) = (self.stride, self.padding);
        conv2d_dense(x, self.weight.val(), Some(self.bias.val()), s, [p, p])
    }
}

#[derive(Module, Debug)]
pub enum HeadLayer {
    Conv(HeadConv),
    Norm(GroupNorm),
}

#[derive(Module, Debug)]
pub struct GanHead {
    pub cls_pred_branch: ModuleDict<HeadLayer>,
}

impl GanHead {
    /// A freshly initialised head for a bottleneck of `channels` x `resolution`^2.
    pub fn new(channels: usize, resolution: usize, device: &Device, seed: u64) -> Self {
        Self::build(channels, resolution, &mut Init::new(device, seed))
    }

    /// The head's shape with zero weights, to load a checkpoint into.
    pub fn placeholder(channels: usize, resolution: usize, device: &Device) -> Self {
        Self::build(channels, resolution, &mut Init::placeholder(device))
    }

    fn build(c: usize, r: usize, init: &mut Init) -> Self {
        // torch.nn.GroupNorm(32, C) (not EDM's GroupNorm, which keeps >= 4 channels a group).
        let norm = |init: &mut Init| {
            let mut n = GroupNorm::new(init, c, 1e-5);
            n.num_groups = crate::nn::gcd(32, c);
            HeadLayer::Norm(n)
        };
        let (k0, s0, p0, r1) = if r >= 2 { (4, 2, 1, (r + 2 - 4) / 2 + 1) } else { (1, 1, 0, r) };
        let mut cls_pred_branch = ModuleDict::default();
        cls_pred_branch.insert("0", HeadLayer::Conv(HeadConv::new(init, c, c, k0, s0, p0)));
        cls_pred_branch.insert("1", norm(init));
        cls_pred_branch.insert("3", HeadLayer::Conv(HeadConv::new(init, c, c, r1, r1, 0)));
        cls_pred_branch.insert("4", norm(init));
        cls_pred_branch.insert("6", HeadLayer::Conv(HeadConv::new(init, c, 1, 1, 1, 0)));
        Self { cls_pred_branch }
    }

    /// Realism logits [N] from bottleneck features [N, C, r, r].
    pub fn forward(&self, features: Tensor<4>) -> Tensor<1> {
        let n = features.dims()[0];
        let mut x = features;
        for (_, layer) in self.cls_pred_branch.iter() {
            x = match layer {
                HeadLayer::Conv(conv) => conv.forward(x),
                // Every norm is followed by a SiLU.
                HeadLayer::Norm(norm) => norm.forward_silu(x, None),
            };
        }
        x.reshape([n])
    }
}
