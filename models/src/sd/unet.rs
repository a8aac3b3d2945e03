//! Stable Diffusion's `UNet2DConditionModel` (diffusers' `unet_2d_condition.py` with the
//! `CrossAttnDownBlock2D` / `DownBlock2D` / `UNetMidBlock2DCrossAttn` / `UpBlock2D` /
//! `CrossAttnUpBlock2D` blocks and `Transformer2DModel`). Parameter paths are diffusers'
//! `state_dict` names, so `unet/diffusion_pytorch_model.safetensors` loads as is.
//!
//! A diffusers naming quirk kept on purpose: in SD v1.x configs `attention_head_dim` is the
//! number of heads per block (8 heads of 40, 80, 160 channels), not the width of a head;
//! diffusers passes it as `num_attention_heads` and refuses an explicit `num_attention_heads`.

use super::blocks::{linear, torch_default_init, Conv, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::config::ConfigError;
use crate::nn::{gelu_erf, multihead_attention, silu, GroupNorm, Init, LayerNorm, Linear, ModuleDict};
use crate::precond::ModelError;
use crate::weights::{load_named, named_tensors, write_atomic, NamedTensors, WeightError};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// One value for every block, or one per block (diffusers accepts both).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl<'de> Deserialize<'de> for PerBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if let Some(n) = v.as_u64() {
            return Ok(Self::One(n as usize));
        }
        let list = v.as_array().and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>());
        list.map(Self::Each).ok_or_else(|| serde::de::Error::custom(format!("expected a non-negative integer or a list of them, found {v}")))
    }
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            Self::One(v) => *v,
            Self::Each(v) => v[i],
        }
    }

    fn check_len(&self, key: &str, n: usize) -> Result<(), String> {
        match self {
            Self::Each(v) if v.len() != n => Err(format!("{key}: {} values for {n} blocks", v.len())),
            _ => Ok(()),
        }
    }
}

/// The keys of `unet/config.json` this port reads. Every other key is kept (so `save` writes
/// it back) and, when it names an option this port lacks, must hold diffusers' default.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UNetConfig {
    /// Latent side the model was trained at (SD v1.5: 64). diffusers allows null; this port
    /// reads null or absent as 64, SD v1.x's value, since callers size latents by it.
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: String,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    pub transformer_layers_per_block: PerBlock,
    /// The number of heads per block (see the module doc).
    pub attention_head_dim: PerBlock,
    pub use_linear_projection: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub time_embedding_dim: Option<usize>,
    /// Every other key of the file, written back unchanged by `save`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

const CROSS_DOWN: &str = "CrossAttnDownBlock2D";
const DOWN: &str = "DownBlock2D";
const CROSS_UP: &str = "CrossAttnUpBlock2D";
const UP: &str = "UpBlock2D";
const MID: &str = "UNetMidBlock2DCrossAttn";

/// Options this port does not implement, with the values that mean "off" in diffusers (an
/// absent key or `null` is off too).
const MUST_BE_OFF: &[(&str, &[&str])] = &[
    ("only_cross_attention", &["false"]),
    ("mid_block_scale_factor", &["1", "1.0"]),
    ("dropout", &["0", "0.0"]),
    ("act_fn", &["\"silu\""]),
    ("encoder_hid_dim", &[]),
    ("encoder_hid_dim_type", &[]),
    ("num_attention_heads", &[]),
    ("dual_cross_attention", &["false"]),
    ("class_embed_type", &[]),
    ("addition_embed_type", &[]),
    ("addition_time_embed_dim", &[]),
    ("num_class_embeds", &[]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("resnet_skip_time_act", &["false"]),
    ("resnet_out_scale_factor", &["1", "1.0"]),
    ("time_embedding_type", &["\"positional\""]),
    ("time_embedding_act_fn", &[]),
    ("timestep_post_act", &[]),
    ("time_cond_proj_dim", &[]),
    ("projection_class_embeddings_input_dim", &[]),
    ("attention_type", &["\"default\""]),
    ("class_embeddings_concat", &["false"]),
    ("mid_block_only_cross_attention", &["false"]),
    ("cross_attention_norm", &[]),
    ("reverse_transformer_layers_per_block", &[]),
];

impl UNetConfig {
    /// Stable Diffusion v1.5's `unet/config.json`.
    pub fn sd15() -> Self {
        let mut c = Self::from_value(Value::Object(Map::new())).expect("diffusers defaults are valid");
        c.cross_attention_dim = PerBlock::One(768);
        c.other.insert("_class_name".into(), Value::from("UNet2DConditionModel"));
        c
    }

    /// Parses a config from JSON; errors name the key.
    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| crate::config::json_error(text, &e, true))?;
        Self::from_value(value)
    }

    /// Reads `unet/config.json`; errors name the file and the key.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let file_err = |msg: String| ConfigError::File { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        Self::from_json_str(&text).map_err(file_err)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Reads every known key (diffusers' default where absent or null), then checks the rest.
    fn from_value(value: Value) -> Result<Self, String> {
        let Value::Object(mut map) = value else { return Err("the config is not a JSON object".into()) };
        fn take<T: serde::de::DeserializeOwned>(map: &mut Map<String, Value>, key: &str, default: T) -> Result<T, String> {
            match map.remove(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => serde_json::from_value(v).map_err(|e| format!("{key}: {e}")),
            }
        }
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let m = &mut map;
        let cfg = Self {
            sample_size: take(m, "sample_size", 64)?,
            in_channels: take(m, "in_channels", 4)?,
            out_channels: take(m, "out_channels", 4)?,
            center_input_sample: take(m, "center_input_sample", false)?,
            flip_sin_to_cos: take(m, "flip_sin_to_cos", true)?,
            freq_shift: take(m, "freq_shift", 0.0)?,
            down_block_types: take(m, "down_block_types", strings(&[CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN]))?,
            mid_block_type: match m.get("mid_block_type") {
                Some(Value::Null) => return Err(format!("mid_block_type: null (no mid block) is not supported; only {MID}")),
                _ => take(m, "mid_block_type", MID.to_string())?,
            },
            up_block_types: take(m, "up_block_types", strings(&[UP, CROSS_UP, CROSS_UP, CROSS_UP]))?,
            block_out_channels: take(m, "block_out_channels", vec![320, 640, 1280, 1280])?,
            layers_per_block: take(m, "layers_per_block", PerBlock::One(2))?,
            downsample_padding: take(m, "downsample_padding", 1)?,
            norm_num_groups: match m.get("norm_num_groups") {
                Some(Value::Null) => return Err("norm_num_groups: null (no output norm) is not supported".into()),
                _ => take(m, "norm_num_groups", 32)?,
            },
            norm_eps: take(m, "norm_eps", 1e-5)?,
            cross_attention_dim: take(m, "cross_attention_dim", PerBlock::One(1280))?,
            transformer_layers_per_block: take(m, "transformer_layers_per_block", PerBlock::One(1))?,
            attention_head_dim: take(m, "attention_head_dim", PerBlock::One(8))?,
            use_linear_projection: take(m, "use_linear_projection", false)?,
            conv_in_kernel: take(m, "conv_in_kernel", 3)?,
            conv_out_kernel: take(m, "conv_out_kernel", 3)?,
            time_embedding_dim: take(m, "time_embedding_dim", None)?,
            other: map,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        for (key, allowed) in MUST_BE_OFF {
            let Some(v) = self.other.get(*key) else { continue };
            let off = v.is_null()
                || allowed.iter().any(|a| serde_json::from_str::<Value>(a).is_ok_and(|a| a == *v || (a.as_f64().is_some() && a.as_f64() == v.as_f64())))
                || (*key == "only_cross_attention" && v.as_array().is_some_and(|a| a.iter().all(|b| b == &Value::Bool(false))));
            if !off {
                let hint = if *key == "num_attention_heads" { "; give the head count as attention_head_dim, as SD v1.x configs do" } else { "" };
                return Err(format!("{key}: {v} is not supported by this port (only {}){hint}", if allowed.is_empty() { "null".to_string() } else { allowed.join(" or ") }));
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels: empty".into());
        }
        if self.down_block_types.len() != n {
            return Err(format!("down_block_types: {} entries for {n} block_out_channels", self.down_block_types.len()));
        }
        if self.up_block_types.len() != n {
            return Err(format!("up_block_types: {} entries for {n} block_out_channels", self.up_block_types.len()));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != CROSS_DOWN && *t != DOWN) {
            return Err(format!("down_block_types: `{t}` is not supported (only {CROSS_DOWN} and {DOWN})"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != CROSS_UP && *t != UP) {
            return Err(format!("up_block_types: `{t}` is not supported (only {CROSS_UP} and {UP})"));
        }
        if self.mid_block_type != MID {
            return Err(format!("mid_block_type: `{}` is not supported (only {MID})", self.mid_block_type));
        }
        self.layers_per_block.check_len("layers_per_block", n)?;
        self.cross_attention_dim.check_len("cross_attention_dim", n)?;
        self.transformer_layers_per_block.check_len("transformer_layers_per_block", n)?;
        self.attention_head_dim.check_len("attention_head_dim", n)?;
        let g = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if g == 0 || !c.is_multiple_of(g) {
                return Err(format!("block_out_channels: {c} channels are not divisible into norm_num_groups = {g} groups"));
            }
            let heads = self.attention_head_dim.get(i);
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(format!("attention_head_dim: {heads} heads (diffusers' meaning of the key) do not divide {c} channels"));
            }
        }
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k.is_multiple_of(2) {
                return Err(format!("{key}: {k} is not an odd kernel size"));
            }
        }
        if !self.block_out_channels[0].is_multiple_of(2) {
            return Err("block_out_channels: the first entry sets the sinusoidal timestep width and must be even".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err("in_channels / out_channels: must be positive".into());
        }
        Ok(())
    }

    fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }
}

impl<'de> Deserialize<'de> for UNetConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// diffusers' `Attention` (no bias on q/k/v, bias on `to_out.0`); self-attention when
/// `context` is `None`.
#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl Attention {
    fn new(init: &mut Init, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Self {
        let inner = heads * head_dim;
        let spec = torch_default_init();
        Self {
            to_q: Linear::new(init, query_dim, inner, false, spec),
            to_k: Linear::new(init, context_dim, inner, false, spec),
            to_v: Linear::new(init, context_dim, inner, false, spec),
            to_out: vec![linear(init, inner, query_dim)],
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let ctx = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward_tokens(x);
        let k = self.to_k.forward_tokens(ctx.clone());
        let v = self.to_v.forward_tokens(ctx);
        self.to_out[0].forward_tokens(multihead_attention(q, k, v, self.heads, false))
    }
}

/// diffusers' `GEGLU`: one projection to twice the inner width, split into value and gate.
#[derive(Module, Debug)]
pub struct GeGlu {
    pub proj: Linear,
}

#[derive(Module, Debug)]
pub enum FfLayer {
    GeGlu(GeGlu),
    Linear(Linear),
}

/// diffusers' `FeedForward` with `geglu`: `net.0` (GEGLU), `net.1` (dropout, no weights),
/// `net.2` (Linear).
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net: ModuleDict<FfLayer>,
}

impl FeedForward {
    fn new(init: &mut Init, dim: usize) -> Self {
        let inner = dim * 4;
        let mut net = ModuleDict::default();
        net.insert("0", FfLayer::GeGlu(GeGlu { proj: linear(init, dim, inner * 2) }));
        net.insert("2", FfLayer::Linear(linear(init, inner, dim)));
        Self { net }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mut x = x;
        for (_, layer) in self.net.iter() {
            x = match layer {
                FfLayer::GeGlu(g) => {
                    let h = g.proj.forward_tokens(x);
                    let inner = h.dims()[2] / 2;
                    let hidden = h.clone().narrow(2, 0, inner);
                    let gate = h.narrow(2, inner, inner);
                    hidden * gelu_erf(gate)
                }
                FfLayer::Linear(l) => l.forward_tokens(x),
            };
        }
        x
    }
}

/// diffusers' `BasicTransformerBlock` (pre-LayerNorm self-attention, cross-attention, GEGLU
/// feed-forward, each with a residual).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(init: &mut Init, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Self {
        Self {
            norm1: LayerNorm::new(init, dim, 1e-5),
            attn1: Attention::new(init, dim, dim, heads, head_dim),
            norm2: LayerNorm::new(init, dim, 1e-5),
            attn2: Attention::new(init, dim, context_dim, heads, head_dim),
            norm3: LayerNorm::new(init, dim, 1e-5),
            ff: FeedForward::new(init, dim),
        }
    }

    fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context)) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// `proj_in` / `proj_out`: a 1x1 convolution (SD v1.x) or a Linear (`use_linear_projection`).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` on continuous inputs.
#[derive(Module, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2D {
    fn new(init: &mut Init, channels: usize, heads: usize, layers: usize, context_dim: usize, cfg: &UNetConfig) -> Self {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let proj = |init: &mut Init, i: usize, o: usize| {
            if cfg.use_linear_projection { Projection::Linear(linear(init, i, o)) } else { Projection::Conv(Conv::new(init, i, o, 1, 1, 0)) }
        };
        let norm = GroupNorm::with_groups(init, channels, cfg.norm_num_groups, 1e-6);
        let proj_in = proj(init, channels, inner);
        let transformer_blocks = (0..layers).map(|_| BasicTransformerBlock::new(init, inner, heads, head_dim, context_dim)).collect();
        let proj_out = proj(init, inner, channels);
        Self { norm, proj_in, transformer_blocks, proj_out }
    }

    fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let tokens = |t: Tensor<4>| {
            let ch = t.dims()[1];
            t.permute([0, 2, 3, 1]).reshape([n, h * w, ch])
        };
        let image = |t: Tensor<3>| {
            let ch = t.dims()[2];
            t.reshape([n, h, w, ch]).permute([0, 3, 1, 2])
        };
        let hs = self.norm.forward(x.clone());
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => tokens(conv.forward(hs)),
            Projection::Linear(l) => l.forward_tokens(tokens(hs)),
        };
        for block in &self.transformer_blocks {
            t = block.forward(t, context.clone());
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(image(t)),
            Projection::Linear(l) => image(l.forward_tokens(t)),
        };
        debug_assert_eq!(out.dims()[1], c);
        out + x
    }
}

/// A down block: resnets, each followed by a transformer in `CrossAttnDownBlock2D`, and a
/// stride-2 `downsamplers.0` except in the last block.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub downsamplers: Vec<Downsample2D>,
}

/// An up block: `layers_per_block + 1` resnets on the concatenated skips, transformers in
/// `CrossAttnUpBlock2D`, and `upsamplers.0` except in the last block.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub upsamplers: Vec<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
}

#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

#[derive(Module, Debug)]
pub struct UNet2DCondition {
    pub conv_in: Conv,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv,
    #[module(skip)]
    pub config: UNetConfig,
}

impl UNet2DCondition {
    /// A freshly initialised UNet (PyTorch's default initialisation) on `init`'s device.
    pub fn new(cfg: &UNetConfig, init: &mut Init) -> Self {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let temb = cfg.time_embed_dim();
        let resnet = |init: &mut Init, i: usize, o: usize| ResnetBlock2D::new(init, i, o, Some(temb), groups, eps);

        let conv_in = Conv::new(init, cfg.in_channels, ch[0], cfg.conv_in_kernel, 1, cfg.conv_in_kernel / 2);
        let time_embedding = TimestepEmbedding { linear_1: linear(init, ch[0], temb), linear_2: linear(init, temb, temb) };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = ch[i];
            let layers = cfg.layers_per_block.get(i);
            let cross = kind == CROSS_DOWN;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                resnets.push(resnet(init, if j == 0 { in_c } else { out_c }, out_c));
                if cross {
                    let (heads, depth, ctx) = (cfg.attention_head_dim.get(i), cfg.transformer_layers_per_block.get(i), cfg.cross_attention_dim.get(i));
                    attentions.push(Transformer2D::new(init, out_c, heads, depth, ctx, cfg));
                }
            }
            let downsamplers = if i + 1 < n { vec![Downsample2D::new(init, out_c, out_c, cfg.downsample_padding)] } else { vec![] };
            down_blocks.push(DownBlock { resnets, attentions, downsamplers });
        }

        let last = ch[n - 1];
        // Built in diffusers' order (resnet 0, attention 0, resnet 1) so that a seeded
        // initialisation draws in the module order.
        let r0 = resnet(init, last, last);
        let mid_attention = Transformer2D::new(
            init,
            last,
            cfg.attention_head_dim.get(n - 1),
            cfg.transformer_layers_per_block.get(n - 1),
            cfg.cross_attention_dim.get(n - 1),
            cfg,
        );
        let r1 = resnet(init, last, last);
        let mid_block = MidBlock { resnets: vec![r0, r1], attentions: vec![mid_attention] };

        // Up blocks mirror the down blocks; the reversed per-block settings.
        let rev = |p: &PerBlock, i: usize| p.get(n - 1 - i);
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = ch[n - 1];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_c = out_c;
            out_c = ch[n - 1 - i];
            // The channels of this level's input skip: the next-shallower level's width.
            let in_c = ch[(n - 1).saturating_sub(i + 1)];
            let layers = rev(&cfg.layers_per_block, i) + 1;
            let cross = kind == CROSS_UP;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip_c = if j == layers - 1 { in_c } else { out_c };
                let res_in = if j == 0 { prev_c } else { out_c };
                resnets.push(resnet(init, res_in + skip_c, out_c));
                if cross {
                    let (heads, depth, ctx) = (rev(&cfg.attention_head_dim, i), rev(&cfg.transformer_layers_per_block, i), rev(&cfg.cross_attention_dim, i));
                    attentions.push(Transformer2D::new(init, out_c, heads, depth, ctx, cfg));
                }
            }
            let upsamplers = if i + 1 < n { vec![Upsample2D::new(init, out_c, out_c)] } else { vec![] };
            up_blocks.push(UpBlock { resnets, attentions, upsamplers });
        }

        let conv_norm_out = GroupNorm::with_groups(init, ch[0], groups, eps);
        let conv_out = Conv::new(init, ch[0], cfg.out_channels, cfg.conv_out_kernel, 1, cfg.conv_out_kernel / 2);
        Self { conv_in, time_embedding, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out, config: cfg.clone() }
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (parameter ids
    /// in the namespace "unet").
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_in_namespace(dir, device, "unet")
    }

    /// [`UNet2DCondition::load`] with the parameter ids derived from `namespace` (so real
    /// score, fake score and generator loaded from one folder never share ids).
    pub fn load_in_namespace(dir: &Path, device: &Device, namespace: &str) -> Result<Self, ModelError> {
        let cfg = UNetConfig::from_json_file(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors = NamedTensors::read(&weights)?;
        Ok(Self::from_named(&cfg, &tensors, &weights.display().to_string(), device, namespace)?)
    }

    /// The UNet of `cfg` with the weights of `tensors` (diffusers names); `file` names the
    /// source in errors.
    pub fn from_named(cfg: &UNetConfig, tensors: &NamedTensors, file: &str, device: &Device, namespace: &str) -> Result<Self, WeightError> {
        load_named(Self::new(cfg, &mut Init::placeholder(device)), tensors, file, namespace)
    }

    /// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` in diffusers'
    /// layout, loadable by [`UNet2DCondition::load`] and by diffusers.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let mut named = named_tensors(self);
        named.metadata.insert("format".into(), "pt".into());
        named.write(&dir.join(WEIGHTS_FILE))?;
        let json = dir.join(CONFIG_FILE);
        let mut cfg = self.config.clone();
        cfg.other.entry("_class_name").or_insert_with(|| Value::from("UNet2DConditionModel"));
        write_atomic(&json, cfg.to_json().as_bytes()).map_err(|e| WeightError::Io { path: json.display().to_string(), msg: e.to_string() })?;
        Ok(())
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Channels of the mid-block output (`block_out_channels[-1]`).
    pub fn mid_channels(&self) -> usize {
        *self.config.block_out_channels.last().expect("at least one block")
    }

    /// Epsilon prediction. `latents` [N, C, H, W]; `timesteps` [N] (or [1], broadcast) as
    /// floats; `context` [N, L, cross_attention_dim] (the text encoder's last hidden state).
    pub fn forward(&self, latents: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>) -> Tensor<4> {
        self.forward_with_mid(latents, timesteps, context).0
    }

    /// (epsilon prediction, mid-block output [N, mid_channels, H / 2^(n-1), W / 2^(n-1)]):
    /// the mid-block output is what DMD2's GAN head reads.
    pub fn forward_with_mid(&self, latents: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
        let cfg = &self.config;
        let batch = latents.dims()[0];
        let timesteps = match timesteps.dims()[0] {
            1 if batch > 1 => timesteps.expand([batch]),
            t => {
                assert_eq!(t, batch, "one timestep per sample (or one for all)");
                timesteps
            }
        };
        let x = if cfg.center_input_sample { latents.mul_scalar(2.0).sub_scalar(1.0) } else { latents };

        let t_emb = self.timestep_features(timesteps);
        let emb = self.time_embedding.linear_2.forward(silu(self.time_embedding.linear_1.forward(t_emb)));

        let mut h = self.conv_in.forward(x);
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(h, Some(emb.clone()));
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, context.clone());
                }
                skips.push(h.clone());
            }
            for down in &block.downsamplers {
                h = down.forward(h);
                skips.push(h.clone());
            }
        }

        let mid = &self.mid_block;
        h = mid.resnets[0].forward(h, Some(emb.clone()));
        for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets[1..]) {
            h = attn.forward(h, context.clone());
            h = resnet.forward(h, Some(emb.clone()));
        }
        let mid_out = h.clone();

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per down-path output");
                h = resnet.forward(Tensor::cat(vec![h, skip], 1), Some(emb.clone()));
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, context.clone());
                }
            }
            for up in &block.upsamplers {
                // Up to the size of the next skip, as diffusers' `upsample_size` does, so odd
                // latent sizes work too; 2x nearest whenever that is the size.
                let [_, _, th, tw] = skips.last().expect("a skip after every upsampler").dims();
                h = upsample_to(up, h, th, tw);
            }
        }
        let out = self.conv_out.forward(self.conv_norm_out.forward_silu(h, None));
        (out, mid_out)
    }

    /// diffusers' `Timesteps`: [sin | cos] (or [cos | sin] with `flip_sin_to_cos`) of
    /// t * exp(-ln(10000) i / (half - freq_shift)), `block_out_channels[0]` wide.
    fn timestep_features(&self, timesteps: Tensor<1>) -> Tensor<2> {
        let cfg = &self.config;
        let half = cfg.block_out_channels[0] / 2;
        // float32 as in diffusers: exponent = -ln(10000) * i / (half - shift), then exp.
        let denom = (half as f64 - cfg.freq_shift) as f32;
        let ln = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / denom).exp()).collect();
        let device = timesteps.device();
        let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
        let arg = timesteps.unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>();
        let (sin, cos) = (arg.clone().sin(), arg.cos());
        if cfg.flip_sin_to_cos { Tensor::cat(vec![cos, sin], 1) } else { Tensor::cat(vec![sin, cos], 1) }
    }
}

/// `Upsample2D` with an explicit output size: PyTorch's nearest interpolation
/// (source index floor(dst * in / out)), then the 3x3 convolution.
fn upsample_to(up: &Upsample2D, x: Tensor<4>, th: usize, tw: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if th == 2 * h && tw == 2 * w {
        return up.forward(x);
    }
    let device = x.device();
    let index = |out: usize, inp: usize| {
        let scale = inp as f32 / out as f32;
        let idx: Vec<i64> = (0..out).map(|d| ((d as f32 * scale).floor() as usize).min(inp - 1) as i64).collect();
        Tensor::<1, Int>::from_data(TensorData::new(idx, [out]), &device)
    };
    up.conv.forward(x.select(2, index(th, h)).select(3, index(tw, w)))
}
