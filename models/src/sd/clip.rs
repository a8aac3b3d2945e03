//! Stable Diffusion v1.5's text encoder, transformers' `CLIPTextModel`: token and position
//! embeddings, pre-LN transformer layers with causal self-attention and quick-GELU MLPs, a
//! final layer norm; its output is `last_hidden_state`. Parameter paths are the
//! `state_dict` names without the `text_model.` prefix (which loading strips).

use crate::config::{json_error, ConfigError};
use crate::nn::{gelu_erf, multihead_attention, Init, LayerNorm, Linear};
use crate::precond::ModelError;
use crate::weights::{load_named, NamedTensors, WeightError};
use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::Deserialize;
use std::path::Path;

/// The keys of `text_encoder/config.json` the network needs (others are ignored).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "quick_gelu".into()
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// SD v1.5's text encoder (openai/clip-vit-large-patch14's text tower).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError::File { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(json_error(&text, &e, true)))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be positive"));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return Err(format!("hidden_act `{}` is not supported (quick_gelu, gelu)", self.hidden_act));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(format!("layer_norm_eps {} must be positive", self.layer_norm_eps));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// x * sigmoid(1.702 x), CLIP's original activation.
    QuickGelu,
    /// The exact (erf) GELU.
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            Self::Gelu => gelu_erf(x),
        }
    }
}

/// A normal(0, std) parameter: transformers' CLIP initialisation.
fn normal<const D: usize>(init: &mut Init, shape: [usize; D], std: f64) -> Param<Tensor<D>> {
    init.param(shape, move |rng| (rng.sample::<f64, _>(StandardNormal) * std) as f32)
}

/// A linear layer with normal(0, std) weights and a zero bias.
fn linear(init: &mut Init, in_features: usize, out_features: usize, std: f64) -> Linear {
    Linear { weight: normal(init, [out_features, in_features], std), bias: Some(init.param([out_features], |_| 0.0)) }
}

/// A lookup table: `weight` [num, dim].
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub activation: Activation,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    #[module(skip)]
    pub config: ClipTextConfig,
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let (q, k, v) = (a.q_proj.forward_tokens(h.clone()), a.k_proj.forward_tokens(h.clone()), a.v_proj.forward_tokens(h));
        let x = x + a.out_proj.forward_tokens(multihead_attention(q, k, v, a.num_heads, true));
        let h = self.layer_norm2.forward(x.clone());
        let h = self.mlp.fc2.forward_tokens(self.mlp.activation.forward(self.mlp.fc1.forward_tokens(h)));
        x + h
    }
}

impl ClipTextModel {
    /// A randomly initialised encoder (transformers' CLIP initialisation, factor 1).
    ///
    /// Panics on an invalid config; configs read from files are validated when read.
    pub fn new(cfg: &ClipTextConfig, init: &mut Init) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("CLIP text config: {e}");
        }
        let (h, m, n) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers);
        let eps = cfg.layer_norm_eps;
        let activation = Activation::parse(&cfg.hidden_act).expect("validated");
        let embeddings = ClipEmbeddings {
            token_embedding: Embedding { weight: normal(init, [cfg.vocab_size, h], 0.02) },
            position_embedding: Embedding { weight: normal(init, [cfg.max_position_embeddings, h], 0.02) },
        };
        let in_std = (h as f64).powf(-0.5) * ((2 * n) as f64).powf(-0.5);
        let out_std = (h as f64).powf(-0.5);
        let fc_std = ((2 * h) as f64).powf(-0.5);
        let layers = (0..n)
            .map(|_| ClipEncoderLayer {
                layer_norm1: LayerNorm::new(init, h, eps),
                self_attn: ClipAttention {
                    q_proj: linear(init, h, h, in_std),
                    k_proj: linear(init, h, h, in_std),
                    v_proj: linear(init, h, h, in_std),
                    out_proj: linear(init, h, h, out_std),
                    num_heads: cfg.num_attention_heads,
                },
                layer_norm2: LayerNorm::new(init, h, eps),
                mlp: ClipMlp { fc1: linear(init, h, m, fc_std), fc2: linear(init, m, h, in_std), activation },
            })
            .collect();
        Self { embeddings, encoder: ClipEncoder { layers }, final_layer_norm: LayerNorm::new(init, h, eps), config: cfg.clone() }
    }

    /// The encoder of `cfg` with the weights of `tensors` (transformers' names, with or
    /// without the `text_model.` prefix; a `position_ids` buffer is ignored). `file` names
    /// the source in errors.
    pub fn from_named(cfg: &ClipTextConfig, tensors: &NamedTensors, file: &str, device: &Device) -> Result<Self, WeightError> {
        const PREFIX: &str = "text_model.";
        let prefixed = tensors.tensors.keys().any(|k| k.starts_with(PREFIX));
        let mut renamed = NamedTensors { metadata: tensors.metadata.clone(), ..Default::default() };
        for (key, t) in &tensors.tensors {
            let key = key.strip_prefix(PREFIX).unwrap_or(key);
            if key != "embeddings.position_ids" {
                renamed.insert(key, t.clone());
            }
        }
        let net = Self::new(cfg, &mut Init::placeholder(device));
        load_named(net, &renamed, file, "clip_text").map_err(|mut e| {
            // Name the tensor as the file does.
            if prefixed {
                if let WeightError::Missing { key, .. } | WeightError::Shape { key, .. } | WeightError::NonFinite { key, .. } = &mut e {
                    *key = format!("{PREFIX}{key}");
                }
            }
            e
        })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (the diffusers `text_encoder/`
    /// folder).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cfg = ClipTextConfig::from_json_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        let tensors = NamedTensors::read(&weights)?;
        Ok(Self::from_named(&cfg, &tensors, &weights.display().to_string(), device)?)
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// `last_hidden_state` [B, L, hidden] of token ids [B, L] (L <= max_position_embeddings).
    ///
    /// Panics on an id outside the vocabulary: the ids are read back to check (a small sync,
    /// once per prompt batch), since an out-of-range gather is undefined on some backends.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, l] = input_ids.dims();
        let h = self.hidden_size();
        assert!(l <= self.max_positions(), "CLIP text encoder: {l} tokens, at most {} positions", self.max_positions());
        let flat = input_ids.reshape([b * l]);
        let (lo, hi) = (flat.clone().min().into_scalar::<i64>(), flat.clone().max().into_scalar::<i64>());
        let vocab = self.config.vocab_size as i64;
        assert!(lo >= 0 && hi < vocab, "CLIP text encoder: token ids span {lo}..={hi}, the vocabulary has {vocab}");
        let tok = self.embeddings.token_embedding.weight.val().select(0, flat).reshape([b, l, h]);
        let pos = self.embeddings.position_embedding.weight.val().slice(0..l).unsqueeze::<3>();
        let mut x = tok + pos;
        for layer in &self.encoder.layers {
            x = layer.forward(x);
        }
        self.final_layer_norm.forward(x)
    }
}

/// Token ids (each row as long as the first) as an int tensor [rows, len] for
/// [`ClipTextModel::forward`].
pub fn ids_tensor(ids: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let len = ids.first().map_or(0, Vec::len);
    assert!(ids.iter().all(|r| r.len() == len), "token id rows differ in length");
    let flat: Vec<i64> = ids.iter().flatten().map(|&v| i64::from(v)).collect();
    Tensor::from_data(TensorData::new(flat, [ids.len(), len]), device)
}
