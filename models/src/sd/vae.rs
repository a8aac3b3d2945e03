//! Stable Diffusion's `AutoencoderKL` (diffusers' `autoencoder_kl.py` and `vae.py`): the
//! encoder to the diagonal-Gaussian posterior (mean, log-variance) and the decoder from
//! latents to images. Field names are diffusers' parameter names, so the published
//! `vae/diffusion_pytorch_model.safetensors` loads one to one; `vae/config.json` gives the
//! shape.
//!
//! The latents are the raw ones: multiplying by [`AutoencoderKL::scaling_factor`] (0.18215
//! for SD v1.5) after encoding and dividing before decoding is the pipeline's business, as in
//! diffusers.

use crate::config::{json_error, ConfigError};
use crate::nn::{multihead_attention, GroupNorm, Init, Linear};
use crate::precond::ModelError;
use crate::sd::blocks::{linear, Conv, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::weights::{load_named, NamedTensors};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every resnet of the VAE uses this epsilon (diffusers hard-codes it in `Encoder`/`Decoder`).
const RESNET_EPS: f64 = 1e-6;

/// The keys of diffusers' `AutoencoderKL` config that shape the network; others
/// (`_class_name`, `sample_size`, `force_upcast`, ...) are ignored. Defaults are diffusers'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// `None` (absent or `null`): SD v1.5's 0.18215.
    #[serde(default)]
    pub scaling_factor: Option<f64>,
    /// Only `null` is supported: SD v1.5 has no shift (SD3 and FLUX do).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Only `null` is supported (per-channel latent statistics are SDXL-family extras).
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_1() -> usize {
    1
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_down_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}

impl Default for VaeConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialise")
    }
}

impl VaeConfig {
    /// SD v1.5's default latent scaling.
    pub const DEFAULT_SCALING_FACTOR: f64 = 0.18215;

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ConfigError::Invalid(json_error(text, &e, false)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let file_err = |msg: String| ConfigError::File { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| file_err(json_error(&text, &e, true)))?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(msg) => file_err(msg),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Refuses what this port does not implement, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels: must list at least one block".into());
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return bad(format!("down_block_types: `{t}` is not supported (only DownEncoderBlock2D)"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("up_block_types: `{t}` is not supported (only UpDecoderBlock2D)"));
        }
        if self.down_block_types.len() != n {
            return bad(format!("down_block_types: {} entries but block_out_channels has {n}", self.down_block_types.len()));
        }
        if self.up_block_types.len() != n {
            return bad(format!("up_block_types: {} entries but block_out_channels has {n}", self.up_block_types.len()));
        }
        if self.act_fn != "silu" {
            return bad(format!("act_fn: `{}` is not supported (only silu)", self.act_fn));
        }
        let counts = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
            ("layers_per_block", self.layers_per_block),
        ];
        for (key, v) in counts {
            if v == 0 {
                return bad(format!("{key}: must be positive"));
            }
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return bad(format!("block_out_channels: {c} is not a positive multiple of norm_num_groups {}", self.norm_num_groups));
        }
        if let Some(s) = self.scaling_factor.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!("scaling_factor: must be positive, got {s}"));
        }
        if let Some(s) = self.shift_factor {
            return bad(format!("shift_factor: {s} is not supported (only null)"));
        }
        for (key, v) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return bad(format!("{key}: not supported (only null)"));
            }
        }
        Ok(())
    }
}

/// diffusers' `Attention` as the VAE's mid-block uses it: group norm, one head over all C
/// channels, the H*W pixels as tokens, biased projections, and a residual connection
/// (`rescale_output_factor` 1). `to_out` is a list because diffusers' `to_out` is
/// `ModuleList([Linear, Dropout])`: the weights live under `to_out.0`.
#[derive(Module, Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
}

impl VaeAttention {
    pub fn new(init: &mut Init, channels: usize, groups: usize, eps: f64) -> Self {
        Self {
            group_norm: GroupNorm::with_groups(init, channels, groups, eps),
            to_q: linear(init, channels, channels),
            to_k: linear(init, channels, channels),
            to_v: linear(init, channels, channels),
            to_out: vec![linear(init, channels, channels)],
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let l = h * w;
        // Group norm over channels is the same on [N, C, H, W] as on diffusers' [N, C, H*W].
        let tokens = self.group_norm.forward(x.clone()).reshape([n, c, l]).swap_dims(1, 2).reshape([n * l, c]);
        let project = |lin: &Linear| lin.forward(tokens.clone()).reshape([n, l, c]);
        let a = multihead_attention(project(&self.to_q), project(&self.to_k), project(&self.to_v), 1, false);
        let out = self.to_out[0].forward(a.reshape([n * l, c]));
        out.reshape([n, l, c]).swap_dims(1, 2).reshape([n, c, h, w]) + x
    }
}

/// diffusers' `UNetMidBlock2D` without a time embedding: resnet, (attention, resnet).
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<VaeAttention>,
}

impl VaeMidBlock {
    pub fn new(init: &mut Init, channels: usize, groups: usize, attention: bool) -> Self {
        let resnets = (0..2).map(|_| ResnetBlock2D::new(init, channels, channels, None, groups, RESNET_EPS)).collect();
        let attentions = if attention { vec![VaeAttention::new(init, channels, groups, RESNET_EPS)] } else { Vec::new() };
        Self { resnets, attentions }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            // Without attention (`mid_block_add_attention: false`) diffusers runs the resnets alone.
            if let Some(attn) = self.attentions.get(i - 1) {
                x = attn.forward(x);
            }
            x = resnet.forward(x, None);
        }
        x
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then (except on the last block) a stride-2
/// convolution after right/bottom zero padding.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.downsamplers.iter().fold(x, |x, d| d.forward(x))
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (except on the last block) nearest 2x and a
/// convolution.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.upsamplers.iter().fold(x, |x, u| u.forward(x))
    }
}

/// diffusers' `Encoder` with `double_z`: image -> 2 * latent_channels moments.
#[derive(Module, Debug)]
pub struct VaeEncoder {
    pub conv_in: Conv,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv,
}

impl VaeEncoder {
    pub fn new(cfg: &VaeConfig, init: &mut Init) -> Self {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let conv_in = Conv::new(init, cfg.in_channels, ch[0], 3, 1, 1);
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(init, if j == 0 { prev } else { out }, out, None, groups, RESNET_EPS))
                .collect();
            let downsamplers = if i + 1 < ch.len() { vec![Downsample2D::new(init, out, out, 0)] } else { Vec::new() };
            down_blocks.push(DownEncoderBlock2D { resnets, downsamplers });
            prev = out;
        }
        let top = ch[ch.len() - 1];
        Self {
            conv_in,
            down_blocks,
            mid_block: VaeMidBlock::new(init, top, groups, cfg.mid_block_add_attention),
            conv_norm_out: GroupNorm::with_groups(init, top, groups, RESNET_EPS),
            conv_out: Conv::new(init, top, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.forward(x);
        let x = self.down_blocks.iter().fold(x, |x, b| b.forward(x));
        let x = self.mid_block.forward(x);
        self.conv_out.forward(self.conv_norm_out.forward_silu(x, None))
    }
}

/// diffusers' `Decoder`: latents -> image, blocks in reversed channel order.
#[derive(Module, Debug)]
pub struct VaeDecoder {
    pub conv_in: Conv,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv,
}

impl VaeDecoder {
    pub fn new(cfg: &VaeConfig, init: &mut Init) -> Self {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let conv_in = Conv::new(init, cfg.latent_channels, rev[0], 3, 1, 1);
        let mid_block = VaeMidBlock::new(init, rev[0], groups, cfg.mid_block_add_attention);
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut prev = rev[0];
        for (i, &out) in rev.iter().enumerate() {
            // One resnet more than the encoder's blocks have, as in diffusers.
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(init, if j == 0 { prev } else { out }, out, None, groups, RESNET_EPS))
                .collect();
            let upsamplers = if i + 1 < rev.len() { vec![Upsample2D::new(init, out, out)] } else { Vec::new() };
            up_blocks.push(UpDecoderBlock2D { resnets, upsamplers });
            prev = out;
        }
        let bottom = rev[rev.len() - 1];
        Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::with_groups(init, bottom, groups, RESNET_EPS),
            conv_out: Conv::new(init, bottom, cfg.out_channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.forward(z);
        let x = self.mid_block.forward(x);
        let x = self.up_blocks.iter().fold(x, |x, b| b.forward(x));
        self.conv_out.forward(self.conv_norm_out.forward_silu(x, None))
    }
}

/// Stable Diffusion's KL autoencoder.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: VaeEncoder,
    pub decoder: VaeDecoder,
    pub quant_conv: Option<Conv>,
    pub post_quant_conv: Option<Conv>,
    #[module(skip)]
    pub config: VaeConfig,
}

impl AutoencoderKL {
    /// The weights file beside `config.json` in a diffusers `vae/` folder.
    pub const WEIGHTS_FILE: &'static str = "diffusion_pytorch_model.safetensors";

    /// A freshly initialised network (PyTorch's default initialisation), or zeros from
    /// [`Init::placeholder`] for one about to be loaded.
    pub fn new(cfg: &VaeConfig, init: &mut Init) -> Self {
        let l = cfg.latent_channels;
        Self {
            encoder: VaeEncoder::new(cfg, init),
            decoder: VaeDecoder::new(cfg, init),
            quant_conv: cfg.use_quant_conv.then(|| Conv::new(init, 2 * l, 2 * l, 1, 1, 0)),
            post_quant_conv: cfg.use_post_quant_conv.then(|| Conv::new(init, l, l, 1, 1, 0)),
            config: cfg.clone(),
        }
    }

    /// The network of `cfg` with the weights of `tensors` (diffusers names). `file` names the
    /// source in errors; `namespace` seeds the parameter ids (see `weights`). The parameters
    /// keep requiring gradients; [`AutoencoderKL::load`] freezes them.
    pub fn from_named(cfg: &VaeConfig, tensors: &NamedTensors, file: &str, device: &Device, namespace: &str) -> Result<Self, ModelError> {
        let net = Self::new(cfg, &mut Init::placeholder(device));
        Ok(load_named(net, tensors, file, namespace)?)
    }

    /// Loads a diffusers `vae/` folder: `dir/config.json` and
    /// `dir/diffusion_pytorch_model.safetensors`. The network comes back frozen (its
    /// parameters require no gradient, as SD's VAE is never trained here); gradients still
    /// flow through `decode`/`encode` to their inputs on an autodiff device.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cfg = VaeConfig::from_json_file(&dir.join("config.json"))?;
        let weights = dir.join(Self::WEIGHTS_FILE);
        let tensors = NamedTensors::read(&weights)?;
        Ok(Self::from_named(&cfg, &tensors, &weights.display().to_string(), device, "sd_vae")?.no_grad())
    }

    /// The posterior of `image` [N, in_channels, H, W] (H, W multiples of
    /// [`AutoencoderKL::downscale`], values in [-1, 1]): (mean, logvar), each
    /// [N, latent_channels, H / downscale, W / downscale], logvar clamped to [-30, 20] as
    /// diffusers' `DiagonalGaussianDistribution` does.
    pub fn encode(&self, image: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(c) => c.forward(moments),
            None => moments,
        };
        let l = self.config.latent_channels;
        let mean = moments.clone().narrow(1, 0, l);
        let logvar = moments.narrow(1, l, l).clamp(-30.0, 20.0);
        (mean, logvar)
    }

    /// Images [N, out_channels, H * downscale, W * downscale] from raw (unscaled) latents
    /// [N, latent_channels, H, W].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(latents),
            None => latents,
        };
        self.decoder.forward(z)
    }

    /// The factor the pipeline multiplies encoded latents by (config's, default 0.18215).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor.unwrap_or(VaeConfig::DEFAULT_SCALING_FACTOR)
    }

    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// Image side / latent side: 2^(number of blocks - 1) (8 for SD v1.5).
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}
